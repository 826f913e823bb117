//! MarketStore's SQL subset (reference §7.3) on the `is_sqlstatement` path of `/rpc` and MarketStore gRPC.
//!
//! A statement is parsed and rewritten to MarketStore's semantics, then run by the SQL engine:
//! - time literals compared with `Epoch` (`=`, `<`, `<=`, `>`, `>=`, `BETWEEN`) in MarketStore's layouts
//!   `2006-01-02-15:04:05[.fraction]`, `2006-01-02-15:04:05 MST`, `2006-01-02-15:04`, `2006-01-02` (UTC),
//!   and, as mkts's SQL reads them (not MarketStore), RFC 3339 (`2023-12-01T00:00:00Z`, any offset) and
//!   `2023-12-01T00:00:00` / `2023-12-01 00:00:00[.fraction]` (UTC); any other string is MarketStore's
//!   error `unable to convert string to date`;
//!   epoch integers above [`NANOS_THRESHOLD`] are nanoseconds, others seconds;
//! - `BETWEEN a AND b` is exclusive at both ends (`> a AND < b`), as MarketStore's; `NOT BETWEEN` is its
//!   complement (`<= a OR >= b`);
//! - a select list of one MarketStore function (`candlecandler`, `tickcandler`, `count`, `min`, `max`,
//!   `avg`, `gap`, `adjust`) over one bucket: the `WHERE` rows of the bucket are read, then the function is
//!   applied to them as the `functions` parameter of a query does (`LIMIT` keeps the first rows of its
//!   output; an alias names its one non-Epoch output column).
//!
//! Anything else is passed to the SQL engine unchanged (mkts's own SQL, as on Flight SQL); statements on
//! Flight SQL and `{"sql"}` tickets are never rewritten.

use std::ops::ControlFlow;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::sql::sqlparser::ast::{
    visit_expressions_mut, BinaryOperator, Expr, LimitClause, SelectItem, SetExpr, Statement, TableFactor, Value,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::engine::{BucketKey, BucketRead, RecordKind, NANOSECONDS};
use crate::service::{Caller, Service, ServiceError};

/// Epoch integers above this (3000-01-01 in seconds) are nanoseconds, as in MarketStore.
pub const NANOS_THRESHOLD: i64 = 32_503_680_000;

/// Why a MarketStore statement cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MarketstoreSqlError {
    /// A string compared with `Epoch` is in none of MarketStore's time layouts.
    #[error("unable to convert string to date: {0}")]
    Date(String),
    /// An epoch integer out of range.
    #[error("epoch {0} is out of range")]
    Epoch(String),
    /// A function's table is not a bucket key.
    #[error("{0}")]
    Table(String),
}

/// What a statement becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Translated {
    /// One statement for the SQL engine.
    Sql(String),
    /// Read the rows of `scan` (a statement over one bucket), apply `function` to them, keep `limit` rows.
    Function { scan: String, key: BucketKey, function: String, limit: Option<usize>, alias: Option<String> },
}

/// Nanoseconds since the Unix epoch of a MarketStore time literal (UTC), or of an ISO 8601 time as
/// mkts's SQL takes them (see the module docs).
pub fn parse_time(s: &str) -> Result<i64, MarketstoreSqlError> {
    use chrono::NaiveDateTime;
    let bad = || MarketstoreSqlError::Date(s.to_string());
    let t = s.trim();
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(t) {
        return dt.timestamp_nanos_opt().ok_or_else(bad);
    }
    if let Ok(dt) = NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f").or_else(|_| NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f")) {
        return dt.and_utc().timestamp_nanos_opt().ok_or_else(bad);
    }
    // `2006-01-02-15:04:05 MST`: an abbreviation unknown to the layout is a zero offset, as Go parses it.
    let t = match t.rsplit_once(' ') {
        Some((head, zone)) if (3..=5).contains(&zone.len()) && zone.chars().all(|c| c.is_ascii_uppercase()) => head,
        _ => t,
    };
    let dt = NaiveDateTime::parse_from_str(t, "%Y-%m-%d-%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(t, "%Y-%m-%d-%H:%M"))
        .or_else(|_| chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d").map(|d| d.and_time(chrono::NaiveTime::MIN)))
        .map_err(|_| bad())?;
    dt.and_utc().timestamp_nanos_opt().ok_or_else(bad)
}

/// Nanoseconds of an epoch integer: above [`NANOS_THRESHOLD`] it already is, else it is seconds.
pub fn epoch_nanos(n: i64) -> Option<i64> {
    if n > NANOS_THRESHOLD { Some(n) } else { n.checked_mul(1_000_000_000) }
}

fn is_epoch(e: &Expr) -> bool {
    match e {
        Expr::Identifier(i) => i.value == "Epoch",
        Expr::CompoundIdentifier(parts) => parts.last().is_some_and(|i| i.value == "Epoch"),
        Expr::Nested(inner) => is_epoch(inner),
        _ => false,
    }
}

/// The instant a literal compared with `Epoch` stands for, as a SQL expression; `None`: not a literal.
fn epoch_literal(e: &Expr) -> Option<Result<Expr, MarketstoreSqlError>> {
    let (text, negative) = match e {
        Expr::Value(v) => (&v.value, false),
        Expr::UnaryOp { op: datafusion::sql::sqlparser::ast::UnaryOperator::Minus, expr } => match expr.as_ref() {
            Expr::Value(v) => (&v.value, true),
            _ => return None,
        },
        _ => return None,
    };
    let ns = match text {
        Value::SingleQuotedString(s) if !negative => parse_time(s),
        Value::Number(n, _) => n
            .parse::<i64>()
            .ok()
            .map(|v| if negative { -v } else { v })
            .and_then(epoch_nanos)
            .ok_or_else(|| MarketstoreSqlError::Epoch(n.to_string())),
        _ => return None,
    };
    Some(ns.and_then(|ns| {
        let sql = format!("to_timestamp_nanos({ns})");
        Parser::new(&GenericDialect {}).try_with_sql(&sql).and_then(|mut p| p.parse_expr()).map_err(|e| MarketstoreSqlError::Epoch(e.to_string()))
    }))
}

fn is_comparison(op: &BinaryOperator) -> bool {
    matches!(op, BinaryOperator::Eq | BinaryOperator::NotEq | BinaryOperator::Lt | BinaryOperator::LtEq | BinaryOperator::Gt | BinaryOperator::GtEq)
}

fn binary(left: Expr, op: BinaryOperator, right: Expr) -> Expr {
    Expr::BinaryOp { left: Box::new(left), op, right: Box::new(right) }
}

/// Rewrite one expression (children first): Epoch literals to instants, BETWEEN to its exclusive form.
fn rewrite(e: &mut Expr) -> ControlFlow<MarketstoreSqlError> {
    match e {
        Expr::BinaryOp { left, op, right } if is_comparison(op) => {
            if is_epoch(left) {
                if let Some(r) = epoch_literal(right) {
                    **right = r.map_or_else(ControlFlow::Break, ControlFlow::Continue)?;
                }
            } else if is_epoch(right) {
                if let Some(l) = epoch_literal(left) {
                    **left = l.map_or_else(ControlFlow::Break, ControlFlow::Continue)?;
                }
            }
        }
        Expr::Between { expr, negated, low, high } => {
            let (mut lo, mut hi) = ((**low).clone(), (**high).clone());
            if is_epoch(expr) {
                if let Some(l) = epoch_literal(&lo) {
                    lo = l.map_or_else(ControlFlow::Break, ControlFlow::Continue)?;
                }
                if let Some(h) = epoch_literal(&hi) {
                    hi = h.map_or_else(ControlFlow::Break, ControlFlow::Continue)?;
                }
            }
            let x = (**expr).clone();
            *e = Expr::Nested(Box::new(if *negated {
                binary(binary(x.clone(), BinaryOperator::LtEq, lo), BinaryOperator::Or, binary(x, BinaryOperator::GtEq, hi))
            } else {
                binary(binary(x.clone(), BinaryOperator::Gt, lo), BinaryOperator::And, binary(x, BinaryOperator::Lt, hi))
            }));
        }
        _ => {}
    }
    ControlFlow::Continue(())
}

/// Translate one MarketStore statement (see the module docs). Text the parser does not take is passed on
/// unchanged, for the SQL engine to report.
pub fn translate(text: &str) -> Result<Translated, MarketstoreSqlError> {
    let normalized = crate::query::normalize_sql(text);
    let Ok(mut statements) = Parser::parse_sql(&GenericDialect {}, &normalized) else {
        return Ok(Translated::Sql(text.to_string()));
    };
    if statements.len() != 1 {
        return Ok(Translated::Sql(text.to_string()));
    }
    let mut st = statements.remove(0);
    if let ControlFlow::Break(e) = visit_expressions_mut(&mut st, rewrite) {
        return Err(e);
    }
    if let Some(f) = function_call(&st)? {
        return Ok(f);
    }
    Ok(Translated::Sql(st.to_string()))
}

/// `SELECT f(…) FROM "KEY" [WHERE …] [LIMIT n]` with `f` one of MarketStore's functions.
fn function_call(st: &Statement) -> Result<Option<Translated>, MarketstoreSqlError> {
    let Statement::Query(q) = st else { return Ok(None) };
    let SetExpr::Select(sel) = q.body.as_ref() else { return Ok(None) };
    let [item] = sel.projection.as_slice() else { return Ok(None) };
    let (call, alias) = match item {
        SelectItem::UnnamedExpr(Expr::Function(f)) => (f, None),
        SelectItem::ExprWithAlias { expr: Expr::Function(f), alias } => (f, Some(alias.value.clone())),
        _ => return Ok(None),
    };
    let name = call.name.to_string().to_ascii_lowercase();
    if !mkts_udf::REGISTRY.contains(&name.as_str()) || q.order_by.is_some() || sel.group_by != datafusion::sql::sqlparser::ast::GroupByExpr::Expressions(vec![], vec![]) {
        return Ok(None);
    }
    let [from] = sel.from.as_slice() else { return Ok(None) };
    let TableFactor::Table { name: table, alias: None, args: None, .. } = &from.relation else { return Ok(None) };
    if !from.joins.is_empty() {
        return Ok(None);
    }
    let key_text: String = table.0.iter().map(|p| p.as_ident().map(|i| i.value.clone()).unwrap_or_else(|| p.to_string())).collect::<Vec<_>>().join("/");
    let key = BucketKey::parse(&key_text).map_err(|e| MarketstoreSqlError::Table(e.to_string()))?;
    let limit = match &q.limit_clause {
        Some(LimitClause::LimitOffset { limit: Some(Expr::Value(v)), offset: None, .. }) => match &v.value {
            Value::Number(n, _) => n.parse::<usize>().ok(),
            _ => return Ok(None),
        },
        None => None,
        Some(_) => return Ok(None),
    };
    let filter = sel.selection.as_ref().map(|w| format!(" WHERE {w}")).unwrap_or_default();
    Ok(Some(Translated::Function { scan: format!("SELECT * FROM {table}{filter}"), key, function: call.to_string(), limit, alias }))
}

/// Run a MarketStore statement for `caller` (policy checked by the SQL engine's path).
pub async fn run(service: &Service, caller: &Caller, text: &str) -> Result<(SchemaRef, Vec<RecordBatch>), ServiceError> {
    match translate(text).map_err(|e| ServiceError::invalid(e.to_string()))? {
        Translated::Sql(sql) => service.sql(caller, &sql).await,
        Translated::Function { scan, key, function, limit, alias } => {
            let (schema, batches) = service.sql(caller, &scan).await?;
            let kind = if schema.column_with_name(NANOSECONDS).is_some() { RecordKind::Variable } else { RecordKind::Fixed };
            let rows = batches.iter().map(|b| b.num_rows()).sum();
            let read = BucketRead { key, kind, schema, batches, rows };
            let (mut schema, mut batches) = service.query_engine().apply_functions(read, &[function]).await?;
            if let Some(n) = limit {
                let mut left = n;
                batches = batches
                    .into_iter()
                    .filter_map(|b| {
                        let take = b.num_rows().min(left);
                        left -= take;
                        (take > 0).then(|| b.slice(0, take))
                    })
                    .collect();
            }
            if let Some(alias) = alias {
                let others: Vec<usize> = (0..schema.fields().len()).filter(|&i| schema.field(i).name() != "Epoch").collect();
                if let [only] = others.as_slice() {
                    let fields: Vec<Field> = schema.fields().iter().enumerate().map(|(i, f)| if i == *only { f.as_ref().clone().with_name(&alias) } else { f.as_ref().clone() }).collect();
                    let renamed = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
                    batches = batches.into_iter().map(|b| RecordBatch::try_new(renamed.clone(), b.columns().to_vec())).collect::<Result<_, _>>().map_err(|e| ServiceError::invalid(e.to_string()))?;
                    schema = renamed;
                }
            }
            Ok((schema, batches))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(s: &str) -> String {
        match translate(s).unwrap() {
            Translated::Sql(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn time_literals_and_epoch_units() {
        assert_eq!(parse_time("2000-01-05-12:30").unwrap(), 947_075_400_000_000_000);
        assert_eq!(parse_time("2000-01-05").unwrap(), 947_030_400_000_000_000);
        assert_eq!(parse_time("2000-01-05-12:30:01.5").unwrap(), 947_075_401_500_000_000);
        assert_eq!(parse_time("2000-01-05-12:30:01 UTC").unwrap(), 947_075_401_000_000_000);
        assert_eq!(parse_time("2000-01-05 12:30"), Err(MarketstoreSqlError::Date("2000-01-05 12:30".into())));
        // ISO 8601 as mkts's SQL reads it (the migration notebook's `'2023-12-01T00:00:00Z'`).
        assert_eq!(parse_time("2000-01-05T12:30:00Z").unwrap(), 947_075_400_000_000_000);
        assert_eq!(parse_time("2000-01-05T07:30:00-05:00").unwrap(), 947_075_400_000_000_000);
        assert_eq!(parse_time("2000-01-05T12:30:00").unwrap(), 947_075_400_000_000_000);
        assert_eq!(parse_time("2000-01-05 12:30:01.5").unwrap(), 947_075_401_500_000_000);
        // Seconds past 2262 do not fit in nanoseconds: refused, not wrapped.
        assert_eq!(epoch_nanos(32_503_680_000), None);
        assert_eq!(epoch_nanos(947_075_400), Some(947_075_400_000_000_000));
        assert_eq!(epoch_nanos(32_503_680_001), Some(32_503_680_001));
    }

    #[test]
    fn between_is_exclusive_and_literals_become_instants() {
        assert_eq!(
            sql("SELECT * FROM `A/1Min/OHLCV` WHERE Epoch BETWEEN '2000-01-05-12:30' AND '2000-01-05-13:00';"),
            "SELECT * FROM \"A/1Min/OHLCV\" WHERE (Epoch > to_timestamp_nanos(947075400000000000) AND Epoch < to_timestamp_nanos(947077200000000000))"
        );
        assert_eq!(
            sql("SELECT Close FROM `A/1Min/OHLCV` WHERE Close NOT BETWEEN 1 AND 2 AND Epoch >= 947075400"),
            "SELECT Close FROM \"A/1Min/OHLCV\" WHERE (Close <= 1 OR Close >= 2) AND Epoch >= to_timestamp_nanos(947075400000000000)"
        );
        assert!(matches!(translate("SELECT * FROM `A/1Min/OHLCV` WHERE Epoch > 'noon'"), Err(MarketstoreSqlError::Date(_))));
    }

    #[test]
    fn select_list_functions_read_then_apply() {
        let t = translate("SELECT candlecandler('12Min',Open,High,Low,Close,Avg::Volume,Sum::Volume) FROM `TSLA/1Min/OHLCV` WHERE Epoch > '2017-01-01' LIMIT 10;").unwrap();
        assert_eq!(
            t,
            Translated::Function {
                scan: "SELECT * FROM \"TSLA/1Min/OHLCV\" WHERE Epoch > to_timestamp_nanos(1483228800000000000)".into(),
                key: BucketKey::parse("TSLA/1Min/OHLCV").unwrap(),
                function: "candlecandler('12Min', Open, High, Low, Close, Avg::Volume, Sum::Volume)".into(),
                limit: Some(10),
                alias: None,
            }
        );
        // SQL's own functions and table functions are the SQL engine's.
        assert_eq!(sql("SELECT max(Close) AS m, Epoch FROM `A/1Min/OHLCV` GROUP BY Epoch"), "SELECT max(Close) AS m, Epoch FROM \"A/1Min/OHLCV\" GROUP BY Epoch");
        assert_eq!(sql("SELECT * FROM candlecandler('A/1Min/OHLCV', '5Min', 'Open')"), "SELECT * FROM candlecandler('A/1Min/OHLCV', '5Min', 'Open')");
    }
}
