//! Times as MarketStore's reader computes them (`utils/io/timeindex.go`, `executor/rewritebuffer.go`).
//!
//! Exactness matters more than plausibility here: imported rows must equal what MarketStore served for
//! the same file, including the artefacts of its lossy 32-bit tick encoding (§1.6).

use chrono::{Datelike, NaiveDate, TimeZone};

/// Nanoseconds of a day; the 1D timeframe is special-cased by MarketStore.
pub const DAY_NS: i64 = 86_400_000_000_000;
/// (2^32 − 1) / 86400, spelled as MarketStore spells it so the f64 is the same.
#[allow(clippy::excessive_precision)]
const TICKS_PER_INTERVAL_DIV_SECS_PER_DAY: f64 = 49710.269629629629629629629629629;

fn local_midnight(tz: chrono_tz::Tz, date: NaiveDate) -> Option<i64> {
    let naive = date.and_hms_opt(0, 0, 0)?;
    // Go's time.Date normalises a local time in a gap forward; a midnight in a gap is vanishingly rare.
    tz.from_local_datetime(&naive).earliest().or_else(|| tz.from_local_datetime(&(naive + chrono::Duration::hours(1))).earliest()).map(|t| t.timestamp())
}

/// `IndexToTime(index, tf, year).Unix()`: the epoch second a slot's index stands for, in the configured
/// time zone. 1D: Jan 1 plus `index` calendar days; otherwise Jan 1 plus `tf * (index − 1)`.
pub fn index_to_epoch(index: i64, timeframe_ns: i64, year: i64, tz: chrono_tz::Tz) -> Option<i64> {
    let jan1 = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, 1, 1)?;
    if timeframe_ns == DAY_NS {
        let date = if index >= 0 {
            jan1.checked_add_days(chrono::Days::new(index as u64))?
        } else {
            jan1.checked_sub_days(chrono::Days::new(index.unsigned_abs()))?
        };
        let _ = date.year();
        return local_midnight(tz, date);
    }
    let t0 = local_midnight(tz, jan1)?;
    let offset_ns = timeframe_ns.checked_mul(index.checked_sub(1)?)?;
    // time.Time.Unix() floors towards −∞.
    t0.checked_add(offset_ns.div_euclid(1_000_000_000))
}

/// [`index_to_epoch`] for one file: Jan 1 in the zone computed once, not per record.
#[derive(Debug, Clone, Copy)]
pub struct YearClock {
    year: i64,
    timeframe_ns: i64,
    tz: chrono_tz::Tz,
    jan1: Option<i64>,
}

impl YearClock {
    pub fn new(year: i64, timeframe_ns: i64, tz: chrono_tz::Tz) -> YearClock {
        let jan1 = i32::try_from(year).ok().and_then(|y| NaiveDate::from_ymd_opt(y, 1, 1)).and_then(|d| local_midnight(tz, d));
        YearClock { year, timeframe_ns, tz, jan1 }
    }

    /// Same result as [`index_to_epoch`].
    pub fn epoch(&self, index: i64) -> Option<i64> {
        if self.timeframe_ns == DAY_NS {
            return index_to_epoch(index, self.timeframe_ns, self.year, self.tz);
        }
        let offset_ns = self.timeframe_ns.checked_mul(index.checked_sub(1)?)?;
        self.jan1?.checked_add(offset_ns.div_euclid(1_000_000_000))
    }
}

/// Intervals per day as MarketStore's `GetIntervals` (integer division), passed on as uint32.
pub fn intervals_per_day(timeframe_ns: i64) -> u32 {
    if timeframe_ns <= 0 {
        return 0;
    }
    (DAY_NS / timeframe_ns) as u32
}

/// `GetTimeFromTicks`: the (epoch seconds, nanoseconds) MarketStore returns for a tick record.
pub fn time_from_ticks(interval_start: i64, intervals_per_day: u32, ticks: u32) -> (i64, i32) {
    let mut fractional = ticks as f64 / (intervals_per_day as f64 * TICKS_PER_INTERVAL_DIV_SECS_PER_DAY);
    let mut subseconds = 1e9 * (fractional - fractional.floor());
    if subseconds >= 1e9 {
        subseconds -= 1e9;
        fractional += 1.0;
    }
    // Go: uint64(math.Round(f*1e8)/1e8) (truncation of a non-negative float), added to uint64(start).
    let whole = ((fractional * 1e8).round() / 1e8) as u64;
    let sec = (interval_start as u64).wrapping_add(whole) as i64;
    let nanos = (subseconds + 0.5) as u32;
    (sec, nanos as i32)
}

/// `GetIntervalTicks32Bit`: the ticks MarketStore's writer stores (used by the tests to build records).
#[cfg(test)]
pub fn ticks_for(epoch: i64, nanos: i64, index: i64, intervals_per_day: i64, year: i32) -> u32 {
    let jan1 = chrono::Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).unwrap().timestamp();
    let second_of_year = ((index - 1) as f64 * 86400.0 / intervals_per_day as f64) as i64;
    let base = jan1 + second_of_year;
    let seconds = (epoch - base) as f64 + nanos as f64 / 1e9;
    let v = intervals_per_day as f64 * TICKS_PER_INTERVAL_DIV_SECS_PER_DAY * seconds;
    (v as i64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_to_epoch_fixed_and_daily() {
        let utc = chrono_tz::UTC;
        // 2020-01-01 00:00 UTC = 1577836800; index 1 is the first minute.
        assert_eq!(index_to_epoch(1, 60_000_000_000, 2020, utc), Some(1_577_836_800));
        assert_eq!(index_to_epoch(61, 60_000_000_000, 2020, utc), Some(1_577_836_800 + 3600));
        // 1D: index = dayOfYear − 1, 0-based.
        assert_eq!(index_to_epoch(1, DAY_NS, 2020, utc), Some(1_577_836_800 + 86_400));
        let ny: chrono_tz::Tz = "America/New_York".parse().unwrap();
        assert_eq!(index_to_epoch(1, 60_000_000_000, 2020, ny), Some(1_577_836_800 + 5 * 3600));
        assert_eq!(index_to_epoch(1, i64::MAX, 2020, utc), Some(1_577_836_800));
        assert_eq!(index_to_epoch(3, i64::MAX, 2020, utc), None);
        for (i, tf) in [(1, 60_000_000_000), (777, 60_000_000_000), (5, DAY_NS), (0, DAY_NS), (3, i64::MAX)] {
            assert_eq!(YearClock::new(2020, tf, ny).epoch(i), index_to_epoch(i, tf, 2020, ny));
        }
    }

    #[test]
    fn ticks_round_trip_within_resolution() {
        let ipd = intervals_per_day(60_000_000_000) as i64; // 1440
        let start = 1_577_836_800 + 60 * 100; // index 101
        let t = ticks_for(start + 12, 345_678_901, 101, ipd, 2020);
        let (s, n) = time_from_ticks(start, ipd as u32, t);
        assert_eq!(s, start + 12);
        assert!((n - 345_678_901).abs() < 20, "{n}");
    }

    #[test]
    fn whole_minute_without_nanos_comes_back_as_marketstore_serves_it() {
        // §1.6: 1Min writes without nanos come back as ...:59 + 999999xxx ns or exact; either way the
        // decode is deterministic and matches the formula, checked against a hand computation.
        let ipd = 1440u32;
        let ticks = (1440.0 * TICKS_PER_INTERVAL_DIV_SECS_PER_DAY * 30.0) as i64 as u32;
        let frac = ticks as f64 / (1440.0 * TICKS_PER_INTERVAL_DIV_SECS_PER_DAY);
        let (s, n) = time_from_ticks(0, ipd, ticks);
        assert_eq!(s, ((frac * 1e8).round() / 1e8) as i64);
        assert_eq!(n, (1e9 * (frac - frac.floor()) + 0.5) as u32 as i32);
    }

    #[test]
    fn ticks_wrap_like_go_for_1d() {
        // 1D bases are a day early on write; the uint32 wraps and the read lands in the right day.
        let ipd = 1i64;
        let jan3 = 1_577_836_800 + 2 * 86_400;
        let t = ticks_for(jan3 + 3600, 0, 2, ipd, 2020);
        let start = index_to_epoch(2, DAY_NS, 2020, chrono_tz::UTC).unwrap();
        let (s, n) = time_from_ticks(start, 1, t);
        // 1D resolution is ~20 µs: 01:00:00 comes back as 00:59:59.99998…, as MarketStore serves it.
        let got = (s - jan3) as f64 + n as f64 / 1e9;
        assert!((got - 3600.0).abs() < 1e-4, "{s} {n}");
    }
}
