//! MarketStore's query timeframe mapping (reference §1.11), for `/rpc` and MarketStore gRPC.
//!
//! MarketStore reads a requested timeframe (`3Min`, `8H`, `1W`, `1M`) from the largest timeframe of its
//! built-in list that divides it, scanned from the end of `[1Sec, 10Sec, 30Sec, 1Min, 5Min, 15Min, 30Min,
//! 1H, 4H, 2H, 1D]` (so `1D` first, then `2H` before `4H`: `4H` and `8H` read `2H`); months read `1D`. The
//! row limit is scaled by the ratio of the two durations (months: ×31) and the reply key names the
//! timeframe read (`AAPL/1Min/OHLCV` for a request of `AAPL/3Min/OHLCV`). This follows MarketStore's
//! `utils.CandleDuration.QueryableTimeframe` / `QueryableNrecords`.
//!
//! Difference (MarketStore issue #200): mkts first reads the requested timeframe as it is, so a bucket
//! stored under any timeframe (`2Min`, `1Q`) is queryable as itself; only when no selected bucket exists
//! under it does the mapping apply.

use crate::service::ReadRequest;

/// MarketStore's built-in queryable timeframes with their durations in seconds, in its order.
const QUERYABLE: [(&str, i64); 11] = [
    ("1Sec", 1),
    ("10Sec", 10),
    ("30Sec", 30),
    ("1Min", 60),
    ("5Min", 300),
    ("15Min", 900),
    ("30Min", 1800),
    ("1H", 3600),
    ("4H", 14_400),
    ("2H", 7200),
    ("1D", 86_400),
];

/// A requested timeframe as MarketStore's `CandleDurationFromString` reads it: the first match of
/// `(\d+)(Sec|Min|H|D|W|M|Y)` anywhere in the text. `None`: no match (MarketStore: "timeframe not found").
fn candle_duration(tf: &str) -> Option<(i64, &'static str)> {
    let b = tf.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let rest = &tf[i..];
            let suffix = ["Sec", "Min", "H", "D", "W", "M", "Y"].into_iter().find(|s| rest.starts_with(s));
            if let Some(s) = suffix {
                // Go's strconv.Atoi of an over-long number fails and MarketStore uses 0; refuse instead.
                let n: i64 = tf[start..i].parse().ok()?;
                return Some((n, s));
            }
            continue;
        }
        i += 1;
    }
    None
}

/// The timeframe MarketStore reads for `requested` and the factor its row limit is multiplied by;
/// `None` when it reads `requested` itself (or cannot parse it).
pub fn queryable(requested: &str) -> Option<(&'static str, i64)> {
    let (n, suffix) = candle_duration(requested)?;
    if n <= 0 {
        return None;
    }
    let (tf, factor) = if suffix == "M" {
        ("1D", 31)
    } else {
        let unit = match suffix {
            "Sec" => 1,
            "Min" => 60,
            "H" => 3600,
            "D" => 86_400,
            "W" => 7 * 86_400,
            _ => 365 * 86_400,
        };
        let secs = n.checked_mul(unit)?;
        let (tf, d) = QUERYABLE.iter().rev().find(|(_, d)| secs % d == 0).copied().unwrap_or(("1D", 86_400));
        (tf, secs / d)
    };
    (tf != requested).then_some((tf, factor))
}

/// `req` as MarketStore reads it when nothing is stored under its own timeframe: the mapped timeframe
/// and the scaled limit. `None` when the mapping changes nothing.
pub fn mapped(req: &ReadRequest) -> Option<ReadRequest> {
    let (tf, factor) = queryable(&req.selector.timeframe)?;
    let mut m = req.clone();
    m.selector.timeframe = tf.to_string();
    m.limit = req.limit.map(|l| l.saturating_mul(usize::try_from(factor).unwrap_or(usize::MAX)));
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marketstore_queryable_timeframes() {
        assert_eq!(queryable("3Min"), Some(("1Min", 3)));
        assert_eq!(queryable("2Min"), Some(("1Min", 2)));
        assert_eq!(queryable("1Min"), None);
        assert_eq!(queryable("5Min"), None);
        assert_eq!(queryable("10Min"), Some(("5Min", 2)));
        // The list is scanned from its end: 2H comes before 4H.
        assert_eq!(queryable("4H"), Some(("2H", 2)));
        assert_eq!(queryable("8H"), Some(("2H", 4)));
        assert_eq!(queryable("3H"), Some(("1H", 3)));
        assert_eq!(queryable("1W"), Some(("1D", 7)));
        assert_eq!(queryable("1M"), Some(("1D", 31)));
        assert_eq!(queryable("2M"), Some(("1D", 31)));
        assert_eq!(queryable("1Y"), Some(("1D", 365)));
        assert_eq!(queryable("45Sec"), Some(("1Sec", 45)));
        assert_eq!(queryable("1D"), None);
        assert_eq!(queryable("1Q"), None);
        assert_eq!(queryable("Min"), None);
    }

    #[test]
    fn mapped_requests_scale_the_limit() {
        let r = ReadRequest::parse("A/3Min/OHLCV").unwrap().limited(10, false).unwrap();
        let m = mapped(&r).unwrap();
        assert_eq!(m.selector.timeframe, "1Min");
        assert_eq!(m.limit, Some(30));
        let r = ReadRequest::parse("A/3Min/OHLCV").unwrap();
        assert_eq!(mapped(&r).unwrap().limit, None);
        assert!(mapped(&ReadRequest::parse("A/1Min/OHLCV").unwrap()).is_none());
    }
}
