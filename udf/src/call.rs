//! MarketStore's `functions` strings: parsing (`name('lit', Col, Param::Col)`) and binding the
//! arguments to each function's declared inputs.

use std::fmt;

use crate::error::{Result, UdfError};
use crate::timeframe::Timeframe;

/// One parameter of a call: a column, optionally bound to a named input (`Sum::Volume`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// The named input (`Sum` in `Sum::Volume`), if given.
    pub input: Option<String>,
    /// The column reference (`Volume`, or `*`).
    pub column: String,
}

/// A parsed (not yet bound) function call.
///
/// Produced by [`parse_call`]: single-quoted segments are literals (init arguments such as a
/// timeframe), everything else is split on commas into [`Param`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Function name, lower-cased (`candlecandler`).
    pub name: String,
    /// Single-quoted literal arguments, without quotes, in order.
    pub literals: Vec<String>,
    /// Column parameters, in order.
    pub params: Vec<Param>,
}

/// Parse a MarketStore function call such as `candlecandler('1H',Open,High,Low,Close,Sum::Volume)`.
///
/// The name is the text before the first `(` (spaces allowed: `COUNT (Example)`), compared
/// case-insensitively. Between the first `(` and the last `)`, every `'…'` segment is a
/// literal; the rest is split on commas into parameters (trimmed, empties dropped, surrounding
/// double quotes or backticks removed). `Input::Column` binds `Column` to the named input.
/// The function name is checked against the registry (`count`, `min`, `max`, `avg`, `gap`,
/// `candlecandler`, `tickcandler`, `adjust`).
pub fn parse_call(s: &str) -> Result<Call> {
    let err = |reason: &str| UdfError::Parse {
        call: s.to_string(),
        reason: reason.to_string(),
    };
    let open = s.find('(').ok_or_else(|| err("missing '('"))?;
    let close = s.rfind(')').ok_or_else(|| err("missing ')'"))?;
    if close < open {
        return Err(err("')' before '('"));
    }
    if !s[close + 1..].trim().is_empty() {
        return Err(err("text after the closing ')'"));
    }
    let name = s[..open].trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(err("invalid function name"));
    }
    let name = name.to_ascii_lowercase();
    if !REGISTRY.contains(&name.as_str()) {
        return Err(UdfError::UnknownFunction(name));
    }
    let body = &s[open + 1..close];
    let mut literals = Vec::new();
    let mut rest = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c == '\'' {
            let mut lit = String::new();
            let mut closed = false;
            for c in chars.by_ref() {
                if c == '\'' {
                    closed = true;
                    break;
                }
                lit.push(c);
            }
            if !closed {
                return Err(err("unterminated quoted literal"));
            }
            literals.push(lit);
        } else {
            rest.push(c);
        }
    }
    let params = rest
        .split(',')
        .map(|p| p.trim().trim_matches(|c| c == '"' || c == '`').trim())
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once("::") {
            Some((input, column)) => Param {
                input: Some(input.trim().to_string()),
                column: column.trim().to_string(),
            },
            None => Param {
                input: None,
                column: p.to_string(),
            },
        })
        .collect();
    Ok(Call {
        name,
        literals,
        params,
    })
}

/// Names accepted by [`parse_call`], as in MarketStore's UDA registry.
pub const REGISTRY: &[&str] = &[
    "tickcandler",
    "candlecandler",
    "count",
    "min",
    "max",
    "avg",
    "gap",
    "adjust",
];

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.name)?;
        let mut first = true;
        for l in &self.literals {
            write!(f, "{}'{l}'", if first { "" } else { "," })?;
            first = false;
        }
        for p in &self.params {
            let sep = if first { "" } else { "," };
            match &p.input {
                Some(i) => write!(f, "{sep}{i}::{}", p.column)?,
                None => write!(f, "{sep}{}", p.column)?,
            }
            first = false;
        }
        write!(f, ")")
    }
}

/// A call with its arguments bound to the function's inputs — what
/// [`crate::apply_functions`] executes. Build with [`Call::bind`] or [`Function::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Function {
    /// `candlecandler('<tf>', Open, High, Low, Close [, Sum::c…] [, Avg::c…])`: OHLC bars to
    /// coarser bars. Several columns bound to one price input are averaged row-wise.
    CandleCandler {
        /// Target bar size.
        timeframe: Timeframe,
        /// Column(s) for the open price.
        open: Vec<String>,
        /// Column(s) for the high price.
        high: Vec<String>,
        /// Column(s) for the low price.
        low: Vec<String>,
        /// Column(s) for the close price.
        close: Vec<String>,
        /// Columns summed per bar.
        sum: Vec<String>,
        /// Columns averaged per bar.
        avg: Vec<String>,
    },
    /// `tickcandler('<tf>', Price [, Sum::c…] [, Avg::c…])`: ticks (or any series) to OHLC bars.
    TickCandler {
        /// Target bar size.
        timeframe: Timeframe,
        /// Column(s) for the price (input `CandlePrice`, alias `Price`).
        price: Vec<String>,
        /// Columns summed per bar.
        sum: Vec<String>,
        /// Columns averaged per bar.
        avg: Vec<String>,
    },
    /// `count()` / `count(*)` (rows) or `count(Col)` (non-null values of `Col`).
    Count {
        /// `None` counts rows.
        column: Option<String>,
    },
    /// `min(Col)`.
    Min {
        /// Column.
        column: String,
    },
    /// `max(Col)`.
    Max {
        /// Column.
        column: String,
    },
    /// `avg(Col)`.
    Avg {
        /// Column.
        column: String,
    },
    /// `gap()` (z-score > 3) or `gap('<tf>')` (gaps longer than the timeframe).
    Gap {
        /// Fixed threshold; `None` = statistical detection.
        threshold: Option<Timeframe>,
    },
    /// `adjust()`, `adjust('split')`, `adjust('dividend')`, `adjust('split','dividend')`.
    Adjust {
        /// Apply split (and reverse split) events.
        splits: bool,
        /// Apply (stock) dividend events.
        dividends: bool,
    },
}

/// Declared inputs of a function: (required, optional) — MarketStore's `ArgumentMap`.
fn inputs(name: &str) -> (&'static [&'static str], &'static [&'static str]) {
    match name {
        "candlecandler" => (&["Open", "High", "Low", "Close"], &["Sum", "Avg"]),
        "tickcandler" => (&["CandlePrice"], &["Sum", "Avg"]),
        "count" | "min" | "max" | "avg" => (&["*"], &[]),
        _ => (&[], &[]),
    }
}

/// Canonical input name for a user-written binding name (case-insensitive, `Price` alias).
fn canonical_input<'a>(
    name: &str,
    declared: impl Iterator<Item = &'a &'static str>,
    func: &str,
) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    let declared: Vec<&'static str> = declared.copied().collect();
    declared
        .iter()
        .copied()
        .find(|d| d.to_ascii_lowercase() == lower)
        .or_else(|| (func == "tickcandler" && lower == "price").then_some("CandlePrice"))
}

impl Call {
    /// Bind literals and parameters to the function's inputs (MarketStore rules, with the
    /// off-by-one fixed):
    ///
    /// 1. `Input::Column` binds to the named input (several bindings accumulate).
    /// 2. Remaining plain parameters fill the still-unbound *required* inputs in declaration
    ///    order, then the optional inputs (`Sum`, then `Avg` for the candlers) — a single
    ///    trailing positional parameter binds to `Sum` (MarketStore rejected it).
    /// 3. Unbound required inputs or leftover parameters are errors.
    pub fn bind(&self) -> Result<Function> {
        let f = self.name.as_str();
        let (required, optional) = inputs(f);
        let mut bound: Vec<(&'static str, Vec<String>)> = required
            .iter()
            .chain(optional.iter())
            .map(|n| (*n, Vec::new()))
            .collect();
        let mut positional = Vec::new();
        for p in &self.params {
            match &p.input {
                Some(input) => {
                    let Some(canon) =
                        canonical_input(input, required.iter().chain(optional.iter()), f)
                    else {
                        return Err(UdfError::args(
                            f,
                            format!(
                                "unknown input {input:?} in {}::{} (inputs: {:?})",
                                input,
                                p.column,
                                [required, optional].concat()
                            ),
                        ));
                    };
                    if let Some(slot) = bound.iter_mut().find(|(n, _)| *n == canon) {
                        slot.1.push(p.column.clone());
                    }
                }
                None => positional.push(p.column.clone()),
            }
        }
        let mut positional = positional.into_iter();
        'fill: for (_, cols) in bound
            .iter_mut()
            .take(required.len())
            .filter(|(_, c)| c.is_empty())
        {
            match positional.next() {
                Some(c) => cols.push(c),
                None => break 'fill,
            }
        }
        for (_, cols) in bound
            .iter_mut()
            .skip(required.len())
            .filter(|(_, c)| c.is_empty())
        {
            match positional.next() {
                Some(c) => cols.push(c),
                None => break,
            }
        }
        let extra: Vec<String> = positional.collect();
        if !extra.is_empty() {
            return Err(UdfError::args(
                f,
                format!(
                    "extra args used: have {extra:?}, required {required:?}, optional {optional:?}"
                ),
            ));
        }
        let missing: Vec<&str> = bound
            .iter()
            .take(required.len())
            .filter(|(_, c)| c.is_empty())
            .map(|(n, _)| *n)
            .collect();
        // count() with no argument counts rows (MarketStore required `*`).
        if !missing.is_empty() && f != "count" {
            let have: Vec<String> = self.params.iter().map(|p| p.column.clone()).collect();
            return Err(UdfError::args(
                f,
                format!("insufficient args: have {have:?}, need {missing:?}"),
            ));
        }
        let take = |name: &str| -> Vec<String> {
            bound
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, c)| c.clone())
                .unwrap_or_default()
        };
        let single = |name: &str| -> Result<String> {
            let cols = take(name);
            match cols.as_slice() {
                [c] => Ok(c.clone()),
                _ => Err(UdfError::args(
                    f,
                    format!("expects exactly one column, got {cols:?}"),
                )),
            }
        };
        let max_literals = match f {
            "candlecandler" | "tickcandler" | "gap" => 1,
            "adjust" => 2,
            _ => 0,
        };
        if self.literals.len() > max_literals {
            return Err(UdfError::args(
                f,
                format!("too many literal arguments: {:?}", self.literals),
            ));
        }
        let timeframe = || -> Result<Timeframe> {
            match self.literals.first() {
                Some(l) => l.parse(),
                None => Err(UdfError::args(
                    f,
                    format!("not enough init arguments for {f}, need 1 have 0"),
                )),
            }
        };
        Ok(match f {
            "candlecandler" => Function::CandleCandler {
                timeframe: timeframe()?,
                open: take("Open"),
                high: take("High"),
                low: take("Low"),
                close: take("Close"),
                sum: take("Sum"),
                avg: take("Avg"),
            },
            "tickcandler" => Function::TickCandler {
                timeframe: timeframe()?,
                price: take("CandlePrice"),
                sum: take("Sum"),
                avg: take("Avg"),
            },
            "count" => {
                let cols = take("*");
                match cols.as_slice() {
                    [] => Function::Count { column: None },
                    [c] if c == "*" => Function::Count { column: None },
                    [c] => Function::Count {
                        column: Some(c.clone()),
                    },
                    _ => {
                        return Err(UdfError::args(
                            f,
                            format!("expects at most one column, got {cols:?}"),
                        ));
                    }
                }
            }
            "min" => Function::Min {
                column: single("*")?,
            },
            "max" => Function::Max {
                column: single("*")?,
            },
            "avg" => Function::Avg {
                column: single("*")?,
            },
            "gap" => Function::Gap {
                threshold: self.literals.first().map(|l| l.parse()).transpose()?,
            },
            "adjust" => {
                let (mut splits, mut dividends) =
                    (self.literals.is_empty(), self.literals.is_empty());
                for l in &self.literals {
                    match l.trim().to_ascii_lowercase().as_str() {
                        "split" | "splits" => splits = true,
                        "dividend" | "dividends" => dividends = true,
                        other => {
                            return Err(UdfError::args(
                                f,
                                format!(
                                    "unknown literal {other:?}, expected 'split' or 'dividend'"
                                ),
                            ));
                        }
                    }
                }
                Function::Adjust { splits, dividends }
            }
            other => return Err(UdfError::UnknownFunction(other.to_string())),
        })
    }
}

impl Function {
    /// Parse and bind in one step: `Function::parse("min(Close)")`.
    pub fn parse(s: &str) -> Result<Function> {
        parse_call(s)?.bind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_bind_candle() {
        let c = parse_call("candlecandler('1H',Open,High,Low,Close,Sum::Volume)").expect("parse");
        assert_eq!(c.name, "candlecandler");
        assert_eq!(c.literals, vec!["1H"]);
        assert_eq!(c.params.len(), 5);
        assert_eq!(
            c.to_string(),
            "candlecandler('1H',Open,High,Low,Close,Sum::Volume)"
        );
        match c.bind().expect("bind") {
            Function::CandleCandler {
                timeframe,
                open,
                close,
                sum,
                avg,
                ..
            } => {
                assert_eq!(timeframe.to_string(), "1H");
                assert_eq!(open, vec!["Open"]);
                assert_eq!(close, vec!["Close"]);
                assert_eq!(sum, vec!["Volume"]);
                assert!(avg.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn binding_rules() {
        // single trailing positional optional binds to Sum (MarketStore's off-by-one fixed)
        let f = Function::parse("candlecandler('5Min',Open,High,Low,Close,Volume)").expect("bind");
        assert!(
            matches!(f, Function::CandleCandler { ref sum, .. } if sum == &vec!["Volume".to_string()])
        );
        let f = Function::parse("tickcandler('5Min',Price,Sum::Size,Avg::Size)").expect("bind");
        assert!(
            matches!(f, Function::TickCandler { ref price, ref sum, ref avg, .. }
            if price == &vec!["Price".to_string()] && sum == &vec!["Size".to_string()] && avg == &vec!["Size".to_string()])
        );
        let f =
            Function::parse("TickCandler('2H', CandlePrice::Bid, CandlePrice::Ask)").expect("bind");
        assert!(matches!(f, Function::TickCandler { ref price, .. } if price.len() == 2));
        assert_eq!(
            Function::parse("COUNT (Example)").ok(),
            Some(Function::Count {
                column: Some("Example".into())
            })
        );
        assert_eq!(
            Function::parse("count(*)").ok(),
            Some(Function::Count { column: None })
        );
        assert_eq!(
            Function::parse("count()").ok(),
            Some(Function::Count { column: None })
        );
        assert_eq!(
            Function::parse("gap()").ok(),
            Some(Function::Gap { threshold: None })
        );
        assert_eq!(
            Function::parse("adjust('split')").ok(),
            Some(Function::Adjust {
                splits: true,
                dividends: false
            })
        );
        assert_eq!(
            Function::parse("adjust()").ok(),
            Some(Function::Adjust {
                splits: true,
                dividends: true
            })
        );
        assert!(matches!(
            Function::parse("candlecandler('1H',Open,High,Low)"),
            Err(UdfError::Arguments { .. })
        ));
        assert!(matches!(
            Function::parse("candlecandler(Open,High,Low,Close)"),
            Err(UdfError::Arguments { .. })
        ));
        assert!(matches!(
            Function::parse("min(Close,Open)"),
            Err(UdfError::Arguments { .. })
        ));
        assert!(matches!(
            Function::parse("tickcandler('1H',A,B,C,D)"),
            Err(UdfError::Arguments { .. })
        ));
        let e = Function::parse("median(Close)")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("no function in the UDA Registry named \"median\"")
        );
    }
}
