//! The NASDAQ (US equities) regular-session calendar behind `filter: nasdaq`.
//!
//! Regular hours are 09:30–16:00 America/New_York (13:00 on early-close days), evaluated in New York time.
//! `ondiskagg` applies the filter only when the server's `timezone` is America/New_York, as MarketStore
//! (which warned and disabled it otherwise). Holidays follow the exchanges' rules and are computed, not
//! listed, so the calendar does not run out: New Year's Day, Martin Luther King Jr. Day (from 1998), Washington's Birthday, Good Friday,
//! Memorial Day, Juneteenth (from 2022), Independence Day, Labor Day, Thanksgiving and Christmas, with
//! Saturday holidays observed on Friday and Sunday holidays on Monday (except New Year's Day on a Saturday,
//! which is not observed). Unscheduled closures since 1990 (national mournings, 9/11, Hurricane Sandy) are
//! listed. Early closes (13:00): July 3 when it is Monday–Thursday, the day after Thanksgiving, and
//! December 24 when it is Monday–Thursday.
//!
//! ```
//! use mkts::contrib::calendar::Nasdaq;
//! // 2024-07-03 16:59:00 UTC = 12:59 New York on an early-close day: open; 13:00 New York: closed.
//! assert!(Nasdaq::is_open(1_720_025_940));
//! assert!(!Nasdaq::is_open(1_720_026_000));
//! ```

use chrono::{Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Weekday};
use chrono_tz::America::New_York;

/// The NASDAQ calendar (all functions take and return Unix seconds or New York dates).
pub struct Nasdaq;

/// Unscheduled full-day closures (New York dates) since 1990.
const SPECIAL_CLOSURES: &[(i32, u32, u32)] = &[
    (1994, 4, 27),  // President Nixon's funeral
    (2001, 9, 11),  // September 11
    (2001, 9, 12),
    (2001, 9, 13),
    (2001, 9, 14),
    (2004, 6, 11),  // President Reagan's funeral
    (2007, 1, 2),   // President Ford's funeral
    (2012, 10, 29), // Hurricane Sandy
    (2012, 10, 30),
    (2018, 12, 5),  // President George H. W. Bush's funeral
    (2025, 1, 9),   // President Carter's funeral
];

fn ymd(y: i32, m: u32, d: u32) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(y, m, d)
}

/// The `n`-th (1-based) `wd` of a month.
fn nth_weekday(y: i32, m: u32, wd: Weekday, n: u32) -> Option<NaiveDate> {
    NaiveDate::from_weekday_of_month_opt(y, m, wd, n as u8)
}

fn last_weekday(y: i32, m: u32, wd: Weekday) -> Option<NaiveDate> {
    let first_next = if m == 12 { ymd(y + 1, 1, 1)? } else { ymd(y, m + 1, 1)? };
    let mut d = first_next - Duration::days(1);
    while d.weekday() != wd {
        d -= Duration::days(1);
    }
    Some(d)
}

/// Easter Sunday (Gregorian, anonymous algorithm).
fn easter(y: i32) -> Option<NaiveDate> {
    let a = y % 19;
    let b = y / 100;
    let c = y % 100;
    let d = b / 4;
    let e = b % 4;
    let f = (b + 8) / 25;
    let g = (b - f + 1) / 3;
    let h = (19 * a + b - d - g + 15) % 30;
    let i = c / 4;
    let k = c % 4;
    let l = (32 + 2 * e + 2 * i - h - k) % 7;
    let m = (a + 11 * h + 22 * l) / 451;
    let month = (h + l - 7 * m + 114) / 31;
    let day = (h + l - 7 * m + 114) % 31 + 1;
    ymd(y, month as u32, day as u32)
}

/// Saturday → Friday, Sunday → Monday.
fn observed(d: NaiveDate) -> NaiveDate {
    match d.weekday() {
        Weekday::Sat => d - Duration::days(1),
        Weekday::Sun => d + Duration::days(1),
        _ => d,
    }
}

impl Nasdaq {
    /// IANA zone the calendar is evaluated in.
    pub const TIMEZONE: &'static str = "America/New_York";

    /// Full-day holidays of a year (observed dates).
    pub fn holidays(y: i32) -> Vec<NaiveDate> {
        let mut v: Vec<NaiveDate> = Vec::new();
        // New Year's Day: Sunday → Monday; Saturday is not observed on the Friday before.
        if let Some(d) = ymd(y, 1, 1) {
            match d.weekday() {
                Weekday::Sat => {}
                Weekday::Sun => v.push(d + Duration::days(1)),
                _ => v.push(d),
            }
        }
        if y >= 1998 {
            v.extend(nth_weekday(y, 1, Weekday::Mon, 3));
        }
        if y >= 1971 {
            v.extend(nth_weekday(y, 2, Weekday::Mon, 3));
        } else {
            v.extend(ymd(y, 2, 22).map(observed));
        }
        v.extend(easter(y).map(|e| e - Duration::days(2)));
        v.extend(last_weekday(y, 5, Weekday::Mon));
        if y >= 2022 {
            v.extend(ymd(y, 6, 19).map(observed));
        }
        v.extend(ymd(y, 7, 4).map(observed));
        v.extend(nth_weekday(y, 9, Weekday::Mon, 1));
        v.extend(nth_weekday(y, 11, Weekday::Thu, 4));
        v.extend(ymd(y, 12, 25).map(observed));
        v.extend(SPECIAL_CLOSURES.iter().filter(|(cy, _, _)| *cy == y).filter_map(|&(cy, m, d)| ymd(cy, m, d)));
        v.sort();
        v.dedup();
        v
    }

    /// True on weekdays that are not holidays (New York date).
    pub fn is_market_day(d: NaiveDate) -> bool {
        !matches!(d.weekday(), Weekday::Sat | Weekday::Sun) && !Self::holidays(d.year()).contains(&d)
    }

    /// True when the session of `d` (a market day) closes at 13:00.
    pub fn is_early_close(d: NaiveDate) -> bool {
        let y = d.year();
        let weekday_mon_thu = |x: NaiveDate| matches!(x.weekday(), Weekday::Mon | Weekday::Tue | Weekday::Wed | Weekday::Thu);
        let jul3 = ymd(y, 7, 3).filter(|x| weekday_mon_thu(*x));
        let after_thanksgiving = nth_weekday(y, 11, Weekday::Thu, 4).map(|t| t + Duration::days(1));
        let dec24 = ymd(y, 12, 24).filter(|x| weekday_mon_thu(*x));
        Self::is_market_day(d) && (Some(d) == jul3 || Some(d) == after_thanksgiving || Some(d) == dec24)
    }

    /// Regular session of a New York date as `[open, close)` Unix seconds, `None` when closed all day.
    pub fn session(d: NaiveDate) -> Option<(i64, i64)> {
        if !Self::is_market_day(d) {
            return None;
        }
        let close_t = if Self::is_early_close(d) { NaiveTime::from_hms_opt(13, 0, 0)? } else { NaiveTime::from_hms_opt(16, 0, 0)? };
        let open = New_York.from_local_datetime(&d.and_time(NaiveTime::from_hms_opt(9, 30, 0)?)).single()?;
        let close = New_York.from_local_datetime(&d.and_time(close_t)).single()?;
        Some((open.timestamp(), close.timestamp()))
    }

    /// New York date of a Unix time.
    pub fn date_of(t: i64) -> Option<NaiveDate> {
        New_York.timestamp_opt(t, 0).single().map(|dt| dt.date_naive())
    }

    /// True when the market is in its regular session at `t` (open ≤ t < close).
    pub fn is_open(t: i64) -> bool {
        Self::date_of(t).and_then(Self::session).is_some_and(|(o, c)| o <= t && t < c)
    }

    /// Close of the session on the New York date containing `t`, for every market day (MarketStore only
    /// returned it on early-close days).
    pub fn market_close(t: i64) -> Option<i64> {
        Self::date_of(t).and_then(Self::session).map(|(_, c)| c)
    }
}

/// A per-date cache of sessions for filtering many rows quickly.
#[derive(Default)]
pub struct SessionCache {
    last: Option<(i64, i64, Option<(i64, i64)>)>,
}

impl SessionCache {
    /// Like [`Nasdaq::is_open`], remembering the last New York day looked up.
    pub fn is_open(&mut self, t: i64) -> bool {
        if let Some((lo, hi, s)) = self.last {
            if lo <= t && t < hi {
                return s.is_some_and(|(o, c)| o <= t && t < c);
            }
        }
        let Some(d) = Nasdaq::date_of(t) else { return false };
        let day_start = New_York.from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default()).earliest().map(|x| x.timestamp());
        let next = d.succ_opt().and_then(|n| New_York.from_local_datetime(&n.and_hms_opt(0, 0, 0).unwrap_or_default()).earliest()).map(|x| x.timestamp());
        let s = Nasdaq::session(d);
        if let (Some(lo), Some(hi)) = (day_start, next) {
            self.last = Some((lo, hi, s));
        }
        s.is_some_and(|(o, c)| o <= t && t < c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, dd: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, dd).unwrap()
    }

    #[test]
    fn holidays_2024_match_the_exchange_schedule() {
        let h = Nasdaq::holidays(2024);
        let want = [d(2024, 1, 1), d(2024, 1, 15), d(2024, 2, 19), d(2024, 3, 29), d(2024, 5, 27), d(2024, 6, 19), d(2024, 7, 4), d(2024, 9, 2), d(2024, 11, 28), d(2024, 12, 25)];
        assert_eq!(h, want);
    }

    #[test]
    fn holidays_2025_include_carter_and_observed_rules() {
        let h = Nasdaq::holidays(2025);
        assert!(h.contains(&d(2025, 1, 9)));
        assert!(h.contains(&d(2025, 4, 18))); // Good Friday
        assert!(h.contains(&d(2025, 6, 19)));
        assert_eq!(Nasdaq::holidays(2026).iter().filter(|x| x.month() == 7).collect::<Vec<_>>(), vec![&d(2026, 7, 3)]);
        assert_eq!(Nasdaq::holidays(2022).first(), Some(&d(2022, 1, 17))); // New Year's on Saturday: not observed
        assert!(Nasdaq::holidays(2023).contains(&d(2023, 1, 2)));
        assert!(Nasdaq::holidays(2021).contains(&d(2021, 12, 24)));
    }

    #[test]
    fn early_closes() {
        assert!(Nasdaq::is_early_close(d(2024, 7, 3)));
        assert!(Nasdaq::is_early_close(d(2024, 11, 29)));
        assert!(Nasdaq::is_early_close(d(2024, 12, 24)));
        assert!(!Nasdaq::is_early_close(d(2024, 12, 23)));
        assert!(!Nasdaq::is_early_close(d(2026, 7, 2))); // July 3 2026 is the observed holiday
        assert!(!Nasdaq::is_early_close(d(2021, 12, 24))); // a Friday holiday
    }

    #[test]
    fn sessions_follow_daylight_saving() {
        // 2024-03-08 (EST): 14:30–21:00 UTC; 2024-03-11 (EDT): 13:30–20:00 UTC.
        assert_eq!(Nasdaq::session(d(2024, 3, 8)), Some((1_709_908_200, 1_709_931_600)));
        assert_eq!(Nasdaq::session(d(2024, 3, 11)), Some((1_710_163_800, 1_710_187_200)));
        assert_eq!(Nasdaq::session(d(2024, 3, 9)), None);
        assert_eq!(Nasdaq::market_close(1_710_170_000), Some(1_710_187_200));
    }

    #[test]
    fn is_open_boundaries() {
        let (o, c) = Nasdaq::session(d(2024, 3, 11)).unwrap();
        assert!(!Nasdaq::is_open(o - 1));
        assert!(Nasdaq::is_open(o));
        assert!(Nasdaq::is_open(c - 1));
        assert!(!Nasdaq::is_open(c));
        let mut cache = SessionCache::default();
        for t in (o - 7200..c + 7200).step_by(60) {
            assert_eq!(cache.is_open(t), Nasdaq::is_open(t), "{t}");
        }
    }
}
