//! `mkts estimate`: the storage a data set needs, MarketStore's `estimate` (reference §1.9) with mkts's
//! layout.
//!
//! MarketStore's flags and defaults: `--symbols 1000 --timeframe 1Min --years 10 --4byteCols 0
//! --8byteCols 5 --days 261 --hours 6.5`. Rows per symbol-year: for timeframes below a day, the trading
//! seconds of a year (`days × hours × 3600`) over the timeframe; for `1D`, `days`; for longer timeframes,
//! 365 days over the timeframe. mkts stores each column densely in its own file, so a row is 8 bytes of
//! Epoch plus 4 per 4-byte and 8 per 8-byte column (no header, no padding, no empty slots), plus one
//! `manifest.json` per symbol-year and one `bucket.json` per symbol (counted as a 4 KiB block each). The
//! figure MarketStore's own formula gives (37,024-byte header per file, records padded to 8 bytes) is
//! printed beside it for its five timeframes.

use clap::Args;

use crate::engine::{TfUnit, Timeframe};

/// MarketStore's `.bin` header size.
const MARKETSTORE_HEADER: f64 = 37_024.0;
/// A small file's share of the disk (one block).
const BLOCK: f64 = 4096.0;

#[derive(Debug, Args)]
pub struct EstimateArgs {
    /// Number of symbols stored.
    #[arg(long, short = 's', default_value_t = 1000)]
    pub symbols: u64,
    /// Timeframe of the buckets (any mkts timeframe: 1Sec, 1Min, 5Min, 1H, 1D, ...).
    #[arg(long, short = 't', default_value = "1Min")]
    pub timeframe: String,
    /// Years of data.
    #[arg(long, short = 'y', default_value_t = 10)]
    pub years: u64,
    /// Number of 4-byte columns (float32, int32).
    #[arg(long = "4byteCols", default_value_t = 0)]
    pub four_byte_cols: u64,
    /// Number of 8-byte columns (float64, int64).
    #[arg(long = "8byteCols", default_value_t = 5)]
    pub eight_byte_cols: u64,
    /// Trading days in a year.
    #[arg(long, short = 'd', default_value_t = 261)]
    pub days: u64,
    /// Hours per day the market is open.
    #[arg(long, default_value_t = 6.5)]
    pub hours: f64,
}

/// Why an estimate cannot be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EstimateError {
    #[error("timeframe {0:?}: {1}")]
    Timeframe(String, String),
    #[error("--hours must be in 0..=24, got {0}")]
    Hours(f64),
    #[error("--days must be in 0..=366, got {0}")]
    Days(u64),
}

/// The estimate, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub rows_per_symbol_year: f64,
    pub row_bytes: u64,
    pub total_bytes: f64,
    /// MarketStore's figure for the same flags (only for its timeframes 1D, 1Min, 1Sec).
    pub marketstore_bytes: Option<f64>,
}

/// Compute the estimate for `a`.
pub fn estimate(a: &EstimateArgs) -> Result<Estimate, EstimateError> {
    if !(0.0..=24.0).contains(&a.hours) {
        return Err(EstimateError::Hours(a.hours));
    }
    if a.days > 366 {
        return Err(EstimateError::Days(a.days));
    }
    let tf = Timeframe::parse(&a.timeframe).map_err(|e| EstimateError::Timeframe(a.timeframe.clone(), e.to_string()))?;
    let secs = tf.nominal_seconds() as f64;
    let rows = if tf.unit == TfUnit::Day && tf.n == 1 {
        a.days as f64
    } else if secs < 86_400.0 {
        (a.days as f64 * a.hours * 3600.0 / secs).floor()
    } else {
        (365.0 * 86_400.0 / secs).ceil()
    };
    let row_bytes = 8 + 4 * a.four_byte_cols + 8 * a.eight_byte_cols;
    let (symbols, years) = (a.symbols as f64, a.years as f64);
    let total = symbols * years * (rows * row_bytes as f64 + BLOCK) + symbols * BLOCK;
    // MarketStore's own formula (cmd/estimate): header + padded record × intervals per day × the open
    // fraction of the year's days, per file.
    let ms_intervals = match a.timeframe.as_str() {
        "1D" => Some(1.0),
        "1Min" => Some(1440.0),
        "1Sec" => Some(86_400.0),
        _ => None,
    };
    let marketstore_bytes = ms_intervals.map(|per_day| {
        let rec = 8 + 4 * a.four_byte_cols + 8 * a.eight_byte_cols;
        let rec = rec + rec % 8;
        let year_fraction = a.days as f64 * (a.hours / 24.0);
        (MARKETSTORE_HEADER + rec as f64 * per_day * year_fraction) * symbols * years
    });
    Ok(Estimate { rows_per_symbol_year: rows, row_bytes, total_bytes: total, marketstore_bytes })
}

/// A byte count as MarketStore prints it: decimal units, the first below 10,000 of it (`114GB`).
pub fn human(bytes: f64) -> String {
    for (i, unit) in ["KB", "MB", "GB", "TB", "PB", "EB"].iter().enumerate() {
        let size = 10f64.powi(3 * (i as i32 + 1));
        if bytes < size * 10_000.0 {
            return format!("{:.0}{unit}", bytes / size);
        }
    }
    "more than 10,000EB".into()
}

/// `mkts estimate`: print the estimate.
pub fn run(a: &EstimateArgs) -> Result<(), EstimateError> {
    let e = estimate(a)?;
    let plural = |n: u64, w: &str| if n == 1 { w.to_string() } else { format!("{w}s") };
    println!(
        "Estimated space required for {} {} with {} {} of {} data: {}",
        a.symbols,
        plural(a.symbols, "symbol"),
        a.years,
        plural(a.years, "year"),
        a.timeframe,
        human(e.total_bytes)
    );
    println!(
        "  {} rows per symbol-year x {} bytes per row (Epoch 8 + {} x 4 + {} x 8), plus a 4 KiB manifest per symbol-year and bucket.json per symbol",
        e.rows_per_symbol_year, e.row_bytes, a.four_byte_cols, a.eight_byte_cols
    );
    match e.marketstore_bytes {
        Some(ms) => println!("  MarketStore's estimate for the same flags: {}", human(ms)),
        None => println!("  (MarketStore's estimate knows only 1D, 1Min and 1Sec)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(tf: &str) -> EstimateArgs {
        EstimateArgs { symbols: 1000, timeframe: tf.into(), years: 10, four_byte_cols: 0, eight_byte_cols: 5, days: 261, hours: 6.5 }
    }

    #[test]
    fn defaults_as_marketstore_and_mkts_compute_them() {
        let e = estimate(&args("1Min")).unwrap();
        // 261 days x 6.5 h x 60 = 101,790 one-minute rows a year, 48 bytes each.
        assert_eq!(e.rows_per_symbol_year, 101_790.0);
        assert_eq!(e.row_bytes, 48);
        assert_eq!(e.total_bytes, 1000.0 * 10.0 * (101_790.0 * 48.0 + 4096.0) + 1000.0 * 4096.0);
        assert_eq!(human(e.total_bytes), "49GB");
        // MarketStore: (37024 + 48 x 1440 x 261 x 6.5/24) x 1000 x 10 = 49,229,440,000 bytes.
        let ms = e.marketstore_bytes.unwrap();
        assert!((ms - 49_229_440_000.0).abs() < 1.0, "{ms}");
        assert_eq!(human(ms), "49GB");
    }

    #[test]
    fn other_timeframes_and_bad_flags() {
        assert_eq!(estimate(&args("1D")).unwrap().rows_per_symbol_year, 261.0);
        assert_eq!(estimate(&args("5Min")).unwrap().rows_per_symbol_year, 20_358.0);
        assert_eq!(estimate(&args("1W")).unwrap().rows_per_symbol_year, 53.0);
        assert_eq!(estimate(&args("5Min")).unwrap().marketstore_bytes, None);
        let mut a = args("1Min");
        a.four_byte_cols = 3;
        assert_eq!(estimate(&a).unwrap().row_bytes, 60);
        assert!(matches!(estimate(&args("1ms")), Err(EstimateError::Timeframe(..))));
        a.hours = 25.0;
        assert_eq!(estimate(&a), Err(EstimateError::Hours(25.0)));
        assert_eq!(human(1.0e4 * 1.0e18), "more than 10,000EB");
        assert_eq!(human(5_000.0), "5KB");
    }
}
