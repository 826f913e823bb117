//! MarketStore timeframes (`5Min`, `1H`, `1D`, `1W`, `1M`, `1Y`, …) and the bucketing rule
//! that maps a timestamp to the start of its bar.
//!
//! Without a timezone (or with UTC) bars are aligned on UTC: `Sec`/`Min`/`H` windows are
//! multiples of the duration since 1970-01-01 00:00 (MarketStore's `Truncate`), `D` windows
//! start at midnight (`nD` counted in whole days from 1970-01-01), `W` windows on Monday 00:00
//! (`nW` counted from Monday 1970-01-05), `M` windows on the first of a month (`nM` counted
//! from January 1970, so `3M` = calendar quarters) and `Y` windows on January 1st (`nY`
//! aligned to years divisible by `n`).
//!
//! With a timezone, `D`/`W`/`M`/`Y` windows start at *local* midnight (DST-aware: a day may
//! last 23 or 25 hours); if midnight falls into a DST gap the day starts at the first instant
//! after the gap, and an ambiguous local time resolves to its earliest instant. `Sec`/`Min`/`H`
//! windows are fixed durations counted from local midnight of each day, so `1H` bars stay one
//! hour long across DST changes, `4H` bars start at local 00:00, 04:00, … and the last window
//! of a day ends at the next local midnight (durations longer than a day stay UTC-aligned).
//! For zones with whole-hour offsets and bars that divide an hour this equals UTC alignment.
//!
//! The mapping is monotone (a later row never gets an earlier bar), so time-sorted input stays
//! sorted after bucketing.

use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone};
use chrono_tz::Tz;

use crate::error::{Result, UdfError};

/// Calendar unit of a [`Timeframe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Seconds (`Sec`).
    Sec,
    /// Minutes (`Min`).
    Min,
    /// Hours (`H`).
    Hour,
    /// Calendar days (`D`).
    Day,
    /// Monday-aligned weeks (`W`).
    Week,
    /// Calendar months (`M`).
    Month,
    /// Calendar years (`Y`).
    Year,
}

impl Unit {
    fn suffix(self) -> &'static str {
        match self {
            Unit::Sec => "Sec",
            Unit::Min => "Min",
            Unit::Hour => "H",
            Unit::Day => "D",
            Unit::Week => "W",
            Unit::Month => "M",
            Unit::Year => "Y",
        }
    }
}

/// A MarketStore timeframe: a count and a [`Unit`], written `<n><unit>` (e.g. `5Min`).
///
/// The one timeframe type of mkts: bucket keys (the engine re-exports it as `mkts::engine::Timeframe`,
/// with [`Unit`] as `TfUnit`), function arguments, plugin configuration.
///
/// Parse with [`Timeframe::parse`] (or `"5Min".parse::<Timeframe>()`): a count of at least 1, then a
/// unit. Accepted unit spellings (case-insensitive unless noted): `Sec`/`S`, `Min`/`T`, `H`/`Hour`,
/// `D`/`Day`, `W`/`Week`, `M` (upper-case only = month)/`Mon`/`Month`, `Y`/`Year`. A lone lower-case
/// `m` is rejected as ambiguous, and the count is required (as MarketStore's `TimeframeFromString`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timeframe {
    /// Number of units (≥ 1).
    pub n: i64,
    /// The unit.
    pub unit: Unit,
}

const SECS_PER_DAY: i64 = 86_400;
/// 1970-01-01 as days from 0001-01-01 (chrono's `num_days_from_ce` of 1970-01-01).
const UNIX_EPOCH_DAYS_FROM_CE: i64 = 719_163;
/// 1970-01-05 (first Monday after the Unix epoch) as days since the epoch.
const FIRST_MONDAY: i64 = 4;
/// From 1973 on every zone's UTC offset is a multiple of 15 minutes (Liberia was the last
/// exception, until 1972), so sub-15-minute bars need no zone lookups after this instant.
const WHOLE_QUARTER_OFFSETS_SINCE: i64 = 94_694_400;

impl Timeframe {
    /// Parse a timeframe string (see the type's documentation for the spellings).
    ///
    /// ```
    /// use mkts_udf::Timeframe;
    /// assert_eq!(Timeframe::parse("5Min").unwrap().fixed_seconds(), Some(300));
    /// assert_eq!(Timeframe::parse("1M").unwrap().fixed_seconds(), None); // calendar month
    /// assert!(Timeframe::parse("1m").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        s.parse()
    }

    /// Nominal duration in nanoseconds (months 30 days, years 365), as MarketStore's GetInfo `TimeFrame`.
    pub fn nominal_nanos(&self) -> i64 {
        self.nominal_seconds().saturating_mul(1_000_000_000)
    }

    /// Start (UTC seconds) of the window containing `t`: sub-day windows align to the Unix epoch, days
    /// to UTC midnight, weeks to Monday 00:00 UTC, months and years to the UTC calendar. A time outside
    /// the calendar's range is returned unchanged.
    pub fn truncate(&self, t: i64) -> i64 {
        self.floor_wall(t).unwrap_or(t)
    }

    /// End (exclusive, UTC seconds) of the window that starts at `start`; `i64::MAX` past the calendar.
    ///
    /// ```
    /// use mkts_udf::Timeframe;
    /// assert_eq!(Timeframe::parse("1M").unwrap().window_end(1_698_796_800), 1_701_388_800); // Nov → Dec 2023
    /// ```
    pub fn window_end(&self, start: i64) -> i64 {
        self.next_wall(start).unwrap_or(i64::MAX)
    }

    /// Start (UTC seconds) of the window containing `t` with days, weeks, months and years on the wall
    /// clock of `tz` (its midnight, Monday, 1st and Jan 1, DST-aware: the same windows as
    /// [`Bucketer`] draws for them); seconds, minutes and hours, and `tz = None`, as
    /// [`Timeframe::truncate`]. This is how MarketStore's `timezone` places day-and-longer intervals.
    /// A time outside the calendar's range is returned unchanged.
    ///
    /// ```
    /// use mkts_udf::Timeframe;
    /// let ny = Some(chrono_tz::America::New_York);
    /// let d = Timeframe::parse("1D").unwrap();
    /// assert_eq!(d.truncate_in(1_704_153_600, ny), 1_704_085_200); // 2024-01-02 00:00Z → 2024-01-01 00:00 EST
    /// assert_eq!(d.window_end_in(1_704_085_200, ny), 1_704_171_600);
    /// assert_eq!(Timeframe::parse("1H").unwrap().truncate_in(1_704_153_601, ny), 1_704_153_600);
    /// ```
    pub fn truncate_in(&self, t: i64, tz: Option<Tz>) -> i64 {
        match tz {
            Some(tz) if !self.is_sub_day() => calendar_range(*self, tz, t).map(|(start, _)| start).unwrap_or(t),
            _ => self.truncate(t),
        }
    }

    /// [`Timeframe::truncate_in`] over a whole column, in place (a write's `Epoch` column). Sub-day windows
    /// of the usual lengths divide by a constant, which compiles to a multiply instead of a division per row.
    ///
    /// ```
    /// use mkts_udf::Timeframe;
    /// let mut secs = vec![59, 60, 61, -1];
    /// Timeframe::parse("1Min").unwrap().truncate_all_in(&mut secs, None);
    /// assert_eq!(secs, [0, 60, 60, -60]);
    /// ```
    pub fn truncate_all_in(&self, secs: &mut [i64], tz: Option<Tz>) {
        fn by<const D: i64>(secs: &mut [i64]) {
            for s in secs {
                *s = s.checked_sub(s.rem_euclid(D)).unwrap_or(*s);
            }
        }
        if !self.is_sub_day() {
            for s in secs.iter_mut() {
                *s = self.truncate_in(*s, tz);
            }
            return;
        }
        match self.fixed_seconds().unwrap_or(1) {
            1 => {}
            5 => by::<5>(secs),
            10 => by::<10>(secs),
            15 => by::<15>(secs),
            30 => by::<30>(secs),
            60 => by::<60>(secs),
            300 => by::<300>(secs),
            600 => by::<600>(secs),
            900 => by::<900>(secs),
            1800 => by::<1800>(secs),
            3600 => by::<3600>(secs),
            14400 => by::<14400>(secs),
            d => {
                for s in secs {
                    *s = s.checked_sub(s.rem_euclid(d)).unwrap_or(*s);
                }
            }
        }
    }

    /// End (exclusive, UTC seconds) of the window that starts at `start`, as [`Timeframe::truncate_in`]
    /// draws them; `i64::MAX` past the calendar.
    pub fn window_end_in(&self, start: i64, tz: Option<Tz>) -> i64 {
        match tz {
            Some(tz) if !self.is_sub_day() => calendar_range(*self, tz, start).map(|(_, end)| end).unwrap_or(i64::MAX),
            _ => self.window_end(start),
        }
    }

    /// Build a timeframe; `n` must be ≥ 1.
    pub fn new(n: i64, unit: Unit) -> Result<Self> {
        if !(1..=1_000_000).contains(&n) {
            return Err(UdfError::InvalidTimeframe(format!("{n}{}", unit.suffix())));
        }
        Ok(Timeframe { n, unit })
    }

    /// Fixed length in seconds for `Sec`/`Min`/`H`/`D`/`W`; `None` for months and years.
    pub fn fixed_seconds(&self) -> Option<i64> {
        let unit = match self.unit {
            Unit::Sec => 1,
            Unit::Min => 60,
            Unit::Hour => 3_600,
            Unit::Day => SECS_PER_DAY,
            Unit::Week => 7 * SECS_PER_DAY,
            Unit::Month | Unit::Year => return None,
        };
        Some(self.n * unit)
    }

    /// Nominal length in seconds (months count 30 days, years 365 days). Used where a single
    /// duration is needed, e.g. the `gap('1M')` threshold.
    pub fn nominal_seconds(&self) -> i64 {
        self.fixed_seconds().unwrap_or(match self.unit {
            Unit::Month => self.n * 30 * SECS_PER_DAY,
            _ => self.n * 365 * SECS_PER_DAY,
        })
    }

    /// True for `Sec`/`Min`/`H` (windows that are pure multiples of a duration).
    fn is_sub_day(&self) -> bool {
        matches!(self.unit, Unit::Sec | Unit::Min | Unit::Hour)
    }

    /// Start of the window containing wall-clock second `s` (seconds since 1970-01-01 00:00 of
    /// the wall clock).
    fn floor_wall(&self, s: i64) -> Result<i64> {
        match self.unit {
            Unit::Sec | Unit::Min | Unit::Hour => {
                let d = self.fixed_seconds().unwrap_or(1);
                s.checked_sub(s.rem_euclid(d)).ok_or_else(|| UdfError::OutOfRange(s))
            }
            Unit::Day => {
                let days = s.div_euclid(SECS_PER_DAY);
                (days - days.rem_euclid(self.n))
                    .checked_mul(SECS_PER_DAY)
                    .ok_or_else(|| UdfError::OutOfRange(s))
            }
            Unit::Week => {
                // Days since the epoch fit easily in i64; only the way back to seconds can overflow.
                let weeks = (s.div_euclid(SECS_PER_DAY) - FIRST_MONDAY).div_euclid(7);
                let w = weeks - weeks.rem_euclid(self.n);
                (FIRST_MONDAY + w * 7)
                    .checked_mul(SECS_PER_DAY)
                    .ok_or_else(|| UdfError::OutOfRange(s))
            }
            Unit::Month => {
                let date = date_of(s)?;
                let idx = i64::from(date.year()) * 12 + i64::from(date.month0());
                month_start(idx - idx.rem_euclid(self.n), s)
            }
            Unit::Year => {
                let y = i64::from(date_of(s)?.year());
                month_start((y - y.rem_euclid(self.n)) * 12, s)
            }
        }
    }

    /// Start of the window following the one that starts at wall-clock second `start`.
    fn next_wall(&self, start: i64) -> Result<i64> {
        match self.unit {
            Unit::Month | Unit::Year => {
                let date = date_of(start)?;
                let idx = i64::from(date.year()) * 12 + i64::from(date.month0());
                let step = if self.unit == Unit::Month {
                    self.n
                } else {
                    self.n * 12
                };
                month_start(idx + step, start)
            }
            _ => start
                .checked_add(self.fixed_seconds().unwrap_or(1))
                .ok_or_else(|| UdfError::OutOfRange(start)),
        }
    }
}

fn date_of(s: i64) -> Result<NaiveDate> {
    let days = s.div_euclid(SECS_PER_DAY) + UNIX_EPOCH_DAYS_FROM_CE;
    i32::try_from(days)
        .ok()
        .and_then(NaiveDate::from_num_days_from_ce_opt)
        .ok_or_else(|| UdfError::OutOfRange(s))
}

/// Wall-clock second of 00:00 on the first day of month index `idx` (= year*12 + month0).
fn month_start(idx: i64, s: i64) -> Result<i64> {
    let year = i32::try_from(idx.div_euclid(12)).map_err(|_| UdfError::OutOfRange(s))?;
    let month = u32::try_from(idx.rem_euclid(12) + 1).map_err(|_| UdfError::OutOfRange(s))?;
    let d = NaiveDate::from_ymd_opt(year, month, 1).ok_or_else(|| UdfError::OutOfRange(s))?;
    Ok((i64::from(d.num_days_from_ce()) - UNIX_EPOCH_DAYS_FROM_CE) * SECS_PER_DAY)
}

impl fmt::Display for Timeframe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.n, self.unit.suffix())
    }
}

impl FromStr for Timeframe {
    type Err = UdfError;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().trim_matches('\'');
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, suffix) = t.split_at(split);
        let bad = || UdfError::InvalidTimeframe(s.to_string());
        let n: i64 = digits.parse().map_err(|_| bad())?;
        let unit = if suffix == "M" {
            Unit::Month
        } else {
            match suffix.to_ascii_lowercase().as_str() {
                "sec" | "s" | "secs" | "second" | "seconds" => Unit::Sec,
                "min" | "t" | "mins" | "minute" | "minutes" => Unit::Min,
                "h" | "hr" | "hour" | "hours" => Unit::Hour,
                "d" | "day" | "days" => Unit::Day,
                "w" | "week" | "weeks" => Unit::Week,
                "mon" | "month" | "months" => Unit::Month,
                "y" | "year" | "years" => Unit::Year,
                _ => return Err(bad()),
            }
        };
        Timeframe::new(n, unit).map_err(|_| bad())
    }
}

/// Resolve a timezone name. `None`, `""`, `UTC`, `Z`, `+00:00` and `-00:00` all mean UTC
/// (returned as `None`, the fast path); anything else must be an IANA name known to chrono-tz.
pub fn parse_timezone(name: Option<&str>) -> Result<Option<Tz>> {
    let Some(name) = name.map(str::trim) else {
        return Ok(None);
    };
    if name.is_empty()
        || name.eq_ignore_ascii_case("utc")
        || name.eq_ignore_ascii_case("z")
        || name == "+00:00"
        || name == "-00:00"
        || name == "Etc/UTC"
    {
        return Ok(None);
    }
    match Tz::from_str(name) {
        Ok(Tz::UTC) | Ok(Tz::Etc__UTC) => Ok(None),
        Ok(tz) => Ok(Some(tz)),
        Err(_) => Err(UdfError::InvalidTimezone(name.to_string())),
    }
}

/// Maps timestamps (Unix seconds) to the start of their bar for one timeframe and timezone.
///
/// Keeps the last computed window, so sorted input costs one calendar/zone computation per bar
/// rather than per row. Create one per column/batch (it is cheap) and call
/// [`Bucketer::bucket`] for each value.
#[derive(Debug, Clone)]
pub struct Bucketer {
    tf: Timeframe,
    tz: Option<Tz>,
    cache: Option<(i64, i64)>,
}

impl Bucketer {
    /// A bucketer for `tf` on the wall clock of `tz` (UTC when `None`).
    pub fn new(tf: Timeframe, tz: Option<Tz>) -> Self {
        Bucketer {
            tf,
            tz,
            cache: None,
        }
    }

    /// Start (Unix seconds) of the bar containing Unix second `secs`.
    #[inline]
    pub fn bucket(&mut self, secs: i64) -> Result<i64> {
        if let Some((start, end)) = self.cache
            && start <= secs
            && secs < end
        {
            return Ok(start);
        }
        match self.tz {
            None => {
                if self.tf.unit == Unit::Month || self.tf.unit == Unit::Year {
                    let start = self.tf.floor_wall(secs)?;
                    self.cache = Some((start, self.tf.next_wall(start)?));
                    Ok(start)
                } else {
                    self.tf.floor_wall(secs)
                }
            }
            Some(tz) => {
                if self.tf.is_sub_day()
                    && secs >= WHOLE_QUARTER_OFFSETS_SINCE
                    && self.tf.fixed_seconds().is_some_and(|d| 900 % d == 0)
                {
                    return self.tf.floor_wall(secs);
                }
                let (start, end) = self.range_tz(tz, secs)?;
                self.cache = Some((start, end));
                Ok(start)
            }
        }
    }

    fn range_tz(&self, tz: Tz, secs: i64) -> Result<(i64, i64)> {
        if self.tf.is_sub_day() {
            let d = self.tf.fixed_seconds().unwrap_or(1);
            if d > SECS_PER_DAY {
                // Longer than a day: plain UTC multiples, as MarketStore's Truncate.
                let start = self.tf.floor_wall(secs)?;
                return Ok((start, start.saturating_add(d)));
            }
            // Fixed durations counted from local midnight of the row's day.
            let (day_start, day_end) = calendar_range(
                Timeframe {
                    n: 1,
                    unit: Unit::Day,
                },
                tz,
                secs,
            )?;
            let start = day_start + (secs - day_start).div_euclid(d) * d;
            return Ok((start, (start + d).min(day_end)));
        }
        calendar_range(self.tf, tz, secs)
    }
}

/// The calendar window (latest local boundary at or before `secs`, next boundary) of `tf`.
fn calendar_range(tf: Timeframe, tz: Tz, secs: i64) -> Result<(i64, i64)> {
    let utc = chrono::DateTime::from_timestamp(secs, 0).ok_or_else(|| UdfError::OutOfRange(secs))?;
    let offset = i64::from(
        tz.offset_from_utc_datetime(&utc.naive_utc())
            .fix()
            .local_minus_utc(),
    );
    let mut wall = tf.floor_wall(secs + offset)?;
    let mut start = resolve(tz, wall)?;
    loop {
        let next_wall = tf.next_wall(wall)?;
        let next = resolve(tz, next_wall)?;
        if next <= secs {
            wall = next_wall;
            start = next;
        } else {
            return Ok((start.min(secs), next));
        }
    }
}

/// Earliest Unix second whose wall-clock time in `tz` is `wall` (or, inside a DST gap, the first
/// instant after the gap).
fn resolve(tz: Tz, wall: i64) -> Result<i64> {
    let to_naive = |w: i64| -> Result<NaiveDateTime> {
        chrono::DateTime::from_timestamp(w, 0)
            .map(|d| d.naive_utc())
            .ok_or_else(|| UdfError::OutOfRange(w))
    };
    // Gaps are at most a few hours; step minute by minute (rare path, cached by the caller).
    for step in 0..(48 * 60) {
        let w = wall + step * 60;
        match tz.from_local_datetime(&to_naive(w)?) {
            LocalResult::Single(dt) => return Ok(dt.timestamp()),
            LocalResult::Ambiguous(a, b) => return Ok(a.timestamp().min(b.timestamp())),
            LocalResult::None => {}
        }
    }
    Err(UdfError::OutOfRange(wall))
}

#[cfg(test)]
mod tests {

    /// The column form gives what the per-value form gives, for every timeframe shape (constant divisors,
    /// others, calendar ones, with and without a zone) and times around zero and near the ends of i64.
    #[test]
    fn truncate_all_in_matches_truncate_in() {
        use super::Timeframe;
        let mut times: Vec<i64> = vec![i64::MIN, i64::MIN + 1, i64::MIN + 59, -86_401, -61, -60, -59, -1, 0, 1, 59, 60, 61, 1_704_153_601];
        times.extend([i64::MAX - 59, i64::MAX - 1, i64::MAX]);
        times.extend((0..2_000).map(|i| 1_700_000_000 + i * 7_919 - 5_000_000));
        for tf in ["1S", "5S", "7S", "1Min", "5Min", "15Min", "1H", "4H", "7H", "1D", "2D", "1W", "1M", "3M", "1Y"] {
            let tf = Timeframe::parse(tf).unwrap();
            for tz in [None, Some(chrono_tz::America::New_York)] {
                let mut col = times.clone();
                tf.truncate_all_in(&mut col, tz);
                let one: Vec<i64> = times.iter().map(|&t| tf.truncate_in(t, tz)).collect();
                assert_eq!(col, one, "{tf:?} {tz:?}");
            }
        }
    }

    /// Found by the numpy_multidataset fuzzer: times near the ends of i64 overflowed the window
    /// arithmetic (a panic in debug builds, a wrapped bar start in release). They must be an error.
    #[test]
    fn extreme_times_are_out_of_range_not_overflow() {
        for tf in ["1Sec", "7Min", "5H", "3D", "2W", "1M", "1Y", "1000000W", "1000000D"] {
            let tf = Timeframe::parse(tf).unwrap();
            for tz in [None, Some(chrono_tz::America::New_York)] {
                for t in [i64::MIN, i64::MIN + 1, i64::MAX, i64::MAX - 1, -(1 << 62), 1 << 62] {
                    let mut b = Bucketer::new(tf, tz);
                    if let Ok(start) = b.bucket(t) {
                        assert!(start <= t, "{tf} {t}: {start}");
                    }
                    let _ = tf.truncate(t);
                    let _ = tf.window_end(t);
                }
            }
        }
    }
    use super::*;

    fn ts(s: &str) -> i64 {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
            .map(|d| d.and_utc().timestamp())
            .unwrap_or(i64::MIN)
    }

    #[test]
    fn parse() {
        assert_eq!(
            "5Min".parse::<Timeframe>().ok(),
            Some(Timeframe {
                n: 5,
                unit: Unit::Min
            })
        );
        assert_eq!(
            "1M".parse::<Timeframe>().ok(),
            Some(Timeframe {
                n: 1,
                unit: Unit::Month
            })
        );
        assert_eq!(
            "10Sec".parse::<Timeframe>().ok(),
            Some(Timeframe {
                n: 10,
                unit: Unit::Sec
            })
        );
        assert!("1m".parse::<Timeframe>().is_err());
        assert!("Min".parse::<Timeframe>().is_err());
        assert!("0H".parse::<Timeframe>().is_err());
        assert_eq!(
            "2H".parse::<Timeframe>().map(|t| t.to_string()).ok(),
            Some("2H".to_string())
        );
    }

    #[test]
    fn utc_buckets() {
        let b = |tf: &str, t: &str| {
            let tf: Timeframe = tf.parse().unwrap_or(Timeframe {
                n: 1,
                unit: Unit::Sec,
            });
            Bucketer::new(tf, None).bucket(ts(t)).unwrap_or(i64::MIN)
        };
        assert_eq!(b("5Min", "2024-03-10 10:07:59"), ts("2024-03-10 10:05:00"));
        assert_eq!(b("1D", "2024-03-10 23:59:59"), ts("2024-03-10 00:00:00"));
        assert_eq!(b("1W", "2024-03-10 23:59:59"), ts("2024-03-04 00:00:00")); // Sunday -> Monday
        assert_eq!(b("1W", "2024-03-11 00:00:00"), ts("2024-03-11 00:00:00"));
        assert_eq!(b("1M", "2024-02-29 12:00:00"), ts("2024-02-01 00:00:00"));
        assert_eq!(b("3M", "2024-05-15 12:00:00"), ts("2024-04-01 00:00:00"));
        assert_eq!(b("1Y", "2024-05-15 12:00:00"), ts("2024-01-01 00:00:00"));
        assert_eq!(b("1H", "1969-12-31 23:30:00"), ts("1969-12-31 23:00:00"));
    }

    /// `truncate_in`/`window_end_in` under New York: days from local midnight across both DST changes
    /// (23- and 25-hour days), weeks from Monday local midnight, months from the local 1st; hours are
    /// multiples of an hour from the Unix epoch in any zone; no zone is `truncate`.
    #[test]
    fn zoned_intervals() {
        let ny = Some(chrono_tz::America::New_York);
        let tf = |s: &str| s.parse::<Timeframe>().unwrap_or(Timeframe { n: 1, unit: Unit::Sec });
        let d = tf("1D");
        // 2024-03-10 (spring forward): 05:00Z to 04:00Z next day.
        assert_eq!(d.truncate_in(ts("2024-03-10 12:00:00"), ny), ts("2024-03-10 05:00:00"));
        assert_eq!(d.window_end_in(ts("2024-03-10 05:00:00"), ny), ts("2024-03-11 04:00:00"));
        // 2024-11-03 (fall back): 04:00Z to 05:00Z next day.
        assert_eq!(d.truncate_in(ts("2024-11-04 04:59:59"), ny), ts("2024-11-03 04:00:00"));
        assert_eq!(d.window_end_in(ts("2024-11-03 04:00:00"), ny), ts("2024-11-04 05:00:00"));
        // 00:00Z is the evening before in New York.
        assert_eq!(d.truncate_in(ts("2024-07-02 00:00:00"), ny), ts("2024-07-01 04:00:00"));
        assert_eq!(d.truncate_in(ts("2024-07-02 00:00:00"), None), ts("2024-07-02 00:00:00"));
        // Monday 2024-07-01 00:00 EDT.
        assert_eq!(tf("1W").truncate_in(ts("2024-07-08 03:59:59"), ny), ts("2024-07-01 04:00:00"));
        assert_eq!(tf("1M").truncate_in(ts("2024-07-01 03:00:00"), ny), ts("2024-06-01 04:00:00"));
        assert_eq!(tf("1M").window_end_in(ts("2024-06-01 04:00:00"), ny), ts("2024-07-01 04:00:00"));
        assert_eq!(tf("4H").truncate_in(ts("2024-07-01 05:00:00"), ny), ts("2024-07-01 04:00:00"));
        assert_eq!(tf("4H").window_end_in(ts("2024-07-01 04:00:00"), ny), ts("2024-07-01 08:00:00"));
    }
}
