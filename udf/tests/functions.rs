//! MarketStore `functions` chains on small hand-computed data.

mod common;

use std::sync::Arc;

use arrow::array::{Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch, UInt8Array};
use arrow::datatypes::{DataType, Field, Schema};
use common::*;
use datafusion::prelude::SessionContext;
use mkts_udf::{ApplyOptions, UdfError, apply_functions, apply_functions_with};

fn calls(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// 1Min bars around 10:00 UTC, deliberately not in time order.
fn minute_bars() -> RecordBatch {
    let t = |s: &str| ts(&format!("2024-01-02 {s}"));
    bars_batch(&[
        (t("10:16:00"), 30.25, 35.0, 28.0, 33.0, 2),
        (t("10:00:00"), 10.0, 12.0, 9.0, 11.0, 100),
        (t("10:01:00"), 11.0, 13.0, 10.0, 12.0, 200),
        (t("10:02:00"), 12.0, 12.5, 8.0, 9.0, 50),
        (t("10:03:00"), 9.0, 10.0, 8.5, 10.0, 25),
        (t("10:04:00"), 10.0, 11.0, 9.5, 10.5, 25),
        (t("10:07:00"), 20.0, 21.0, 19.0, 20.5, 7),
        (t("10:15:00"), 30.0, 31.0, 29.0, 30.25, 1),
        (t("11:00:00"), 40.0, 41.0, 39.0, 40.5, 1000),
    ])
}

#[tokio::test]
async fn candlecandler_1min_to_5min_drops_empty_windows() {
    let ctx = SessionContext::new();
    let input = table(&ctx, "bars", minute_bars()).await;
    let out = apply_functions(
        &ctx,
        input,
        &calls(&["candlecandler('5Min',Open,High,Low,Close,Sum::Volume)"]),
        None,
    )
    .await
    .expect("apply");
    let b = collect(out).await;
    assert_eq!(
        names(&b),
        ["Epoch", "Open", "High", "Low", "Close", "Volume_SUM"]
    );
    assert_eq!(dtype(&b, "Epoch"), epoch_type());
    assert_eq!(dtype(&b, "Open"), DataType::Float32);
    assert_eq!(dtype(&b, "Volume_SUM"), DataType::Float64);
    let t = |s: &str| ts(&format!("2024-01-02 {s}"));
    // 10:10 has no rows and must not appear.
    assert_eq!(
        ints(&b, "Epoch"),
        [t("10:00:00"), t("10:05:00"), t("10:15:00"), t("11:00:00")]
    );
    assert_eq!(floats(&b, "Open"), [10.0, 20.0, 30.0, 40.0]);
    assert_eq!(floats(&b, "High"), [13.0, 21.0, 35.0, 41.0]);
    assert_eq!(floats(&b, "Low"), [8.0, 19.0, 28.0, 39.0]);
    assert_eq!(floats(&b, "Close"), [10.5, 20.5, 33.0, 40.5]);
    assert_eq!(floats(&b, "Volume_SUM"), [400.0, 7.0, 3.0, 1000.0]);
}

#[tokio::test]
async fn candlecandler_1h_with_sum_and_avg() {
    let ctx = SessionContext::new();
    let input = table(&ctx, "bars", minute_bars()).await;
    let out = apply_functions(
        &ctx,
        input,
        &calls(&["CandleCandler('1H', Open, High, Low, Close, Avg::Volume, Sum::Volume)"]),
        None,
    )
    .await
    .expect("apply");
    let b = collect(out).await;
    // As MarketStore: every Sum column (`<col>_SUM`), then every Avg column (`<col>_AVG`), both float64,
    // whatever the order of the arguments.
    assert_eq!(
        names(&b),
        [
            "Epoch",
            "Open",
            "High",
            "Low",
            "Close",
            "Volume_SUM",
            "Volume_AVG"
        ]
    );
    assert_eq!(
        ints(&b, "Epoch"),
        [ts("2024-01-02 10:00:00"), ts("2024-01-02 11:00:00")]
    );
    assert_eq!(floats(&b, "Open"), [10.0, 40.0]);
    assert_eq!(floats(&b, "High"), [35.0, 41.0]);
    assert_eq!(floats(&b, "Low"), [8.0, 39.0]);
    assert_eq!(floats(&b, "Close"), [33.0, 40.5]);
    assert_eq!(floats(&b, "Volume_SUM"), [410.0, 1000.0]);
    assert_eq!(floats(&b, "Volume_AVG"), [51.25, 1000.0]);
    assert_eq!(dtype(&b, "Volume_SUM"), DataType::Float64);
    assert_eq!(dtype(&b, "Volume_AVG"), DataType::Float64);
}

#[tokio::test]
async fn candlecandler_marketstore_integ_example() {
    // MarketStore integ test: 1Sec bars at 00:00, 01:00, 02:00, 03:00.
    let ctx = SessionContext::new();
    let h = |x: i64| ts("2024-01-02 00:00:00") + x * 3600;
    let batch = bars_batch(&[
        (h(0), 20.0, 40.0, 10.0, 30.0, 1),
        (h(1), 40.0, 80.0, 20.0, 60.0, 1),
        (h(2), 60.0, 120.0, 30.0, 90.0, 1),
        (h(3), 80.0, 160.0, 40.0, 120.0, 1),
    ]);
    let input = table(&ctx, "bars", batch).await;
    let b = collect(
        apply_functions(
            &ctx,
            input.clone(),
            &calls(&["candlecandler('2H',Open,High,Low,Close)"]),
            None,
        )
        .await
        .expect("2H"),
    )
    .await;
    assert_eq!(names(&b), ["Epoch", "Open", "High", "Low", "Close"]);
    assert_eq!(ints(&b, "Epoch"), [h(0), h(2)]);
    assert_eq!(
        (
            floats(&b, "Open")[0],
            floats(&b, "High")[0],
            floats(&b, "Low")[0],
            floats(&b, "Close")[0]
        ),
        (20.0, 80.0, 10.0, 60.0)
    );
    let b = collect(
        apply_functions(
            &ctx,
            input.clone(),
            &calls(&["candlecandler('4H',Open,High,Low,Close)"]),
            None,
        )
        .await
        .expect("4H"),
    )
    .await;
    assert_eq!(
        (
            floats(&b, "Open"),
            floats(&b, "High"),
            floats(&b, "Low"),
            floats(&b, "Close")
        ),
        (vec![20.0], vec![160.0], vec![10.0], vec![120.0])
    );
    // tickcandler on a single column uses it for all four prices.
    let b = collect(
        apply_functions(&ctx, input, &calls(&["tickcandler('2H', Open)"]), None)
            .await
            .expect("tick"),
    )
    .await;
    assert_eq!(floats(&b, "Open"), [20.0, 60.0]);
    assert_eq!(floats(&b, "High"), [40.0, 80.0]);
    assert_eq!(floats(&b, "Low"), [20.0, 60.0]);
    assert_eq!(floats(&b, "Close"), [40.0, 80.0]);
}

#[tokio::test]
async fn tickcandler_orders_by_epoch_and_nanoseconds() {
    let ctx = SessionContext::new();
    let t = |s: &str| ts(&format!("2024-01-02 {s}"));
    let ticks = ticks_batch(&[
        (t("09:30:00"), 500_000_000, 100.0, 10),
        (t("09:30:00"), 100_000_000, 101.0, 5), // earliest tick: the open
        (t("09:30:59"), 900_000_000, 99.0, 1),
        (t("09:31:00"), 0, 102.0, 3),
        (t("09:34:59"), 0, 98.0, 2), // last tick of the window: the close
        (t("09:35:00"), 0, 97.0, 4),
    ]);
    let input = table(&ctx, "ticks", ticks).await;
    let b = collect(
        apply_functions(
            &ctx,
            input,
            &calls(&["tickcandler('5Min',Price,Sum::Size)"]),
            None,
        )
        .await
        .expect("apply"),
    )
    .await;
    assert_eq!(names(&b), ["Epoch", "Open", "High", "Low", "Close", "Size_SUM"]);
    assert_eq!(ints(&b, "Epoch"), [t("09:30:00"), t("09:35:00")]);
    assert_eq!(floats(&b, "Open"), [101.0, 97.0]);
    assert_eq!(floats(&b, "High"), [102.0, 97.0]);
    assert_eq!(floats(&b, "Low"), [98.0, 97.0]);
    assert_eq!(floats(&b, "Close"), [98.0, 97.0]);
    assert_eq!(floats(&b, "Size_SUM"), [21.0, 4.0]);
}

/// One `candlecandler` call over `rows` (Epoch, OHLC, Volume) under the server zone `tz`.
async fn candles_in(rows: &[(i64, f32, f32, f32, f32, i64)], call: &str, tz: &str) -> RecordBatch {
    let ctx = SessionContext::new();
    let input = table(&ctx, "bars", bars_batch(rows)).await;
    collect(apply_functions(&ctx, input, &calls(&[call]), Some(tz)).await.expect("apply")).await
}

#[tokio::test]
async fn candlecandler_daily_in_new_york() {
    // Daily bars follow local midnight: 2024-01-02 23:30 EST is 2024-01-03 04:30 UTC.
    let rows = [
        (ts("2024-01-02 14:30:00"), 1.0, 2.0, 0.5, 1.5, 10),
        (ts("2024-01-03 04:30:00"), 1.5, 3.0, 1.0, 2.5, 20),
        (ts("2024-01-03 05:00:00"), 2.5, 2.75, 2.0, 2.25, 30),
    ];
    let b = candles_in(&rows, "candlecandler('1D',Open,High,Low,Close,Sum::Volume)", "America/New_York").await;
    assert_eq!(ints(&b, "Epoch"), [ts("2024-01-02 05:00:00"), ts("2024-01-03 05:00:00")]);
    assert_eq!(floats(&b, "Open"), [1.0, 2.5]);
    assert_eq!(floats(&b, "Close"), [2.5, 2.25]);
    assert_eq!(floats(&b, "Volume_SUM"), [30.0, 30.0]);
}

#[tokio::test]
async fn candlecandler_intraday_in_new_york_is_absolute_as_marketstore() {
    // MarketStore truncates sub-day windows in absolute time (Go's Time.Truncate): 4H bars start at
    // 00:00, 04:00 ... UTC whatever the zone, not at New York midnight (05:00 UTC).
    let rows = [
        (ts("2024-01-02 03:59:00"), 1.0, 2.0, 0.5, 1.5, 10),
        (ts("2024-01-02 04:00:00"), 1.5, 3.0, 1.0, 2.5, 20),
        (ts("2024-01-02 05:30:00"), 2.5, 2.75, 2.0, 2.25, 30),
    ];
    let b = candles_in(&rows, "candlecandler('4H',Open,High,Low,Close,Sum::Volume)", "America/New_York").await;
    assert_eq!(ints(&b, "Epoch"), [ts("2024-01-02 00:00:00"), ts("2024-01-02 04:00:00")]);
    assert_eq!(floats(&b, "Volume_SUM"), [10.0, 50.0]);
}

#[tokio::test]
async fn candlecandler_empty_input_gives_empty_output() {
    let ctx = SessionContext::new();
    let input = table(&ctx, "bars", bars_batch(&[])).await;
    let b = collect(
        apply_functions(
            &ctx,
            input,
            &calls(&["candlecandler('5Min',Open,High,Low,Close)"]),
            None,
        )
        .await
        .expect("apply"),
    )
    .await;
    assert_eq!(b.num_rows(), 0);
    assert_eq!(names(&b), ["Epoch", "Open", "High", "Low", "Close"]);
}

#[tokio::test]
async fn count_min_max_avg_return_data_timestamps() {
    let ctx = SessionContext::new();
    let m = |i: i64| ts("2024-01-02 10:00:00") + 60 * i;
    let closes = [5.0f32, 3.0, 8.0, 3.0, 8.0];
    let rows: Vec<_> = closes
        .iter()
        .enumerate()
        .map(|(i, c)| (m(i as i64), *c, *c, *c, *c, 1))
        .collect();
    let input = table(&ctx, "bars", bars_batch(&rows)).await;

    let b = collect(
        apply_functions(&ctx, input.clone(), &calls(&["count()"]), None)
            .await
            .expect("count"),
    )
    .await;
    assert_eq!(names(&b), ["Epoch", "Count"]);
    assert_eq!(
        (ints(&b, "Epoch"), ints(&b, "Count")),
        (vec![m(4)], vec![5])
    );
    assert_eq!(dtype(&b, "Epoch"), epoch_type());
    let b = collect(
        apply_functions(&ctx, input.clone(), &calls(&["COUNT (Close)"]), None)
            .await
            .expect("count col"),
    )
    .await;
    assert_eq!(ints(&b, "Count"), [5]);

    let b = collect(
        apply_functions(&ctx, input.clone(), &calls(&["min(Close)"]), None)
            .await
            .expect("min"),
    )
    .await;
    assert_eq!(names(&b), ["Epoch", "Min"]);
    assert_eq!(
        (ints(&b, "Epoch"), floats(&b, "Min")),
        (vec![m(1)], vec![3.0])
    );
    assert_eq!(dtype(&b, "Min"), DataType::Float32);

    let b = collect(
        apply_functions(&ctx, input.clone(), &calls(&["max(Close)"]), None)
            .await
            .expect("max"),
    )
    .await;
    assert_eq!(
        (ints(&b, "Epoch"), floats(&b, "Max")),
        (vec![m(2)], vec![8.0])
    );

    let b = collect(
        apply_functions(&ctx, input.clone(), &calls(&["avg(Close)"]), None)
            .await
            .expect("avg"),
    )
    .await;
    assert_eq!(names(&b), ["Epoch", "Avg"]);
    assert_eq!(
        (ints(&b, "Epoch"), floats(&b, "Avg")),
        (vec![m(4)], vec![5.4])
    );
    assert_eq!(dtype(&b, "Avg"), DataType::Float64);

    // Chaining: 5 one-minute bars -> one 5Min bar -> count 1.
    let b = collect(
        apply_functions(
            &ctx,
            input,
            &calls(&["candlecandler('5Min',Open,High,Low,Close)", "count(*)"]),
            None,
        )
        .await
        .expect("chain"),
    )
    .await;
    assert_eq!(
        (ints(&b, "Epoch"), ints(&b, "Count")),
        (vec![m(0)], vec![1])
    );
}

#[tokio::test]
async fn count_on_empty_input() {
    let ctx = SessionContext::new();
    let input = table(&ctx, "bars", bars_batch(&[])).await;
    let b = collect(
        apply_functions(&ctx, input.clone(), &calls(&["count()"]), None)
            .await
            .expect("count"),
    )
    .await;
    assert_eq!((ints(&b, "Epoch"), ints(&b, "Count")), (vec![0], vec![0]));
    let b = collect(
        apply_functions(&ctx, input, &calls(&["max(Close)"]), None)
            .await
            .expect("max"),
    )
    .await;
    assert_eq!((ints(&b, "Epoch"), nulls(&b, "Max")), (vec![0], vec![true]));
}

#[tokio::test]
async fn gap_with_threshold_and_zscore() {
    let ctx = SessionContext::new();
    let base = ts("2024-01-02 00:00:00");
    // gaps of 10, 20 and 30 seconds
    let rows: Vec<_> = [0, 10, 30, 60]
        .iter()
        .map(|s| (base + s, 1.0, 1.0, 1.0, 1.0, 1))
        .collect();
    let input = table(&ctx, "bars", bars_batch(&rows)).await;
    for (tf, n) in [("1Sec", 3), ("10Sec", 2), ("20Sec", 1), ("30Sec", 0)] {
        let b = collect(
            apply_functions(
                &ctx,
                input.clone(),
                &calls(&[&format!("GAP('{tf}')")]),
                None,
            )
            .await
            .expect("gap"),
        )
        .await;
        assert_eq!(b.num_rows(), n, "gap('{tf}')");
        assert_eq!(names(&b), ["Epoch", "End", "Length"]);
    }
    let b = collect(
        apply_functions(&ctx, input, &calls(&["gap('10Sec')"]), None)
            .await
            .expect("gap"),
    )
    .await;
    assert_eq!(ints(&b, "Epoch"), [base + 10, base + 30]);
    assert_eq!(ints(&b, "End"), [base + 30, base + 60]);
    assert_eq!(ints(&b, "Length"), [20, 30]);
    assert_eq!(dtype(&b, "Epoch"), epoch_type());

    // z-score: 20 one-minute steps and one hour-long hole.
    // diffs: 19 x 60 s and 1 x 3600 s; mean 237, population sd 771.5, z(3600) = 4.36 > 3.
    let mut t = base;
    let mut rows = vec![(t, 1.0, 1.0, 1.0, 1.0, 1)];
    for i in 0..20 {
        t += if i == 10 { 3600 } else { 60 };
        rows.push((t, 1.0, 1.0, 1.0, 1.0, 1));
    }
    let ctx = SessionContext::new();
    let input = table(&ctx, "bars2", bars_batch(&rows)).await;
    let b = collect(
        apply_functions(&ctx, input, &calls(&["gap()"]), None)
            .await
            .expect("gap"),
    )
    .await;
    assert_eq!(ints(&b, "Epoch"), [base + 600]);
    assert_eq!(ints(&b, "End"), [base + 600 + 3600]);
    assert_eq!(ints(&b, "Length"), [3600]);
}

/// Daily bars around a 4:1 split (effective 2024-01-04) and a 5 % stock dividend (2024-01-08).
fn daily_bars() -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", epoch_type(), false),
        Field::new("Open", DataType::Float32, false),
        Field::new("Close", DataType::Float64, false),
        Field::new("Volume", DataType::Int64, false),
        Field::new("Trades", DataType::Int32, false),
    ]));
    let days = [
        "2024-01-02",
        "2024-01-03",
        "2024-01-04",
        "2024-01-05",
        "2024-01-08",
    ];
    RecordBatch::try_new(
        schema,
        vec![
            epoch_array(
                &days
                    .iter()
                    .map(|d| ts(&format!("{d} 00:00:00")))
                    .collect::<Vec<_>>(),
            ),
            Arc::new(Float32Array::from(vec![
                420.0f32, 410.0, 100.0, 105.0, 99.0,
            ])),
            Arc::new(Float64Array::from(vec![400.0, 404.0, 101.0, 102.0, 100.0])),
            Arc::new(Int64Array::from(vec![100, 200, 400, 300, 500])),
            Arc::new(Int32Array::from(vec![1, 2, 3, 4, 5])),
        ],
    )
    .expect("daily")
}

fn simple_actions() -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", epoch_type(), false),
        Field::new("Type", DataType::Utf8, false),
        Field::new("Rate", DataType::Float64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            epoch_array(&[ts("2024-01-08 00:00:00"), ts("2024-01-04 00:00:00")]),
            strings(&["dividend", "split"]),
            Arc::new(Float64Array::from(vec![1.05, 4.0])),
        ],
    )
    .expect("actions")
}

#[tokio::test]
async fn adjust_split_and_dividend() {
    let ctx = SessionContext::new();
    let input = table(&ctx, "daily", daily_bars()).await;
    let actions = table(&ctx, "actions", simple_actions()).await;
    let opts = ApplyOptions::default().with_actions(actions);

    // both: factors 4.2, 4.2, 1.05, 1.05, 1
    let b = collect(
        apply_functions_with(&ctx, input.clone(), &["adjust()"], &opts)
            .await
            .expect("adjust"),
    )
    .await;
    assert_eq!(names(&b), ["Epoch", "Open", "Close", "Volume", "Trades"]);
    assert_eq!(dtype(&b, "Open"), DataType::Float32);
    assert_eq!(dtype(&b, "Volume"), DataType::Int64);
    assert_eq!(
        floats(&b, "Close"),
        [95.2381, 96.1905, 96.1905, 97.1429, 100.0]
    );
    assert_eq!(
        floats(&b, "Open"),
        [100.0, 97.619_f32 as f64, 95.2381_f32 as f64, 100.0, 99.0]
    );
    assert_eq!(ints(&b, "Volume"), [420, 840, 420, 315, 500]);
    assert_eq!(ints(&b, "Trades"), [1, 2, 3, 4, 5]);
    assert_eq!(ints(&b, "Epoch"), ints(&daily_bars(), "Epoch"));

    let b = collect(
        apply_functions_with(&ctx, input.clone(), &["adjust('split')"], &opts)
            .await
            .expect("split"),
    )
    .await;
    assert_eq!(floats(&b, "Close"), [100.0, 101.0, 101.0, 102.0, 100.0]);
    assert_eq!(ints(&b, "Volume"), [400, 800, 400, 300, 500]);

    let b = collect(
        apply_functions_with(&ctx, input.clone(), &["adjust('dividend')"], &opts)
            .await
            .expect("div"),
    )
    .await;
    assert_eq!(
        floats(&b, "Close"),
        [380.9524, 384.7619, 96.1905, 97.1429, 100.0]
    );
    assert_eq!(ints(&b, "Volume"), [105, 210, 420, 315, 500]);

    // Without an actions table adjust is an error, not a silent no-op.
    let err = apply_functions(&ctx, input, &calls(&["adjust()"]), None)
        .await
        .err();
    assert!(matches!(err, Some(UdfError::Actions(_))), "{err:?}");
}

#[tokio::test]
async fn adjust_reads_marketstore_ice_actions() {
    let ctx = SessionContext::new();
    let input = table(&ctx, "daily", daily_bars()).await;
    // N#1 split rate 3, later U replaces #1 with rate 4; N#2 stock dividend 1.05;
    // N#3 split 2.0, later deleted by D.
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Int64, false),
        Field::new("TextNumber", DataType::Int64, false),
        Field::new("UpdateTextNumber", DataType::Int64, false),
        Field::new("DeleteTextNumber", DataType::Int64, false),
        Field::new("NotificationType", DataType::UInt8, false),
        Field::new("Status", DataType::UInt8, false),
        Field::new("ExpirationDate", DataType::Int64, false),
        Field::new("Rate", DataType::Float64, false),
    ]));
    let split_day = ts("2024-01-04 00:00:00");
    let div_day = ts("2024-01-08 00:00:00");
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5])),
            Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5])),
            Arc::new(Int64Array::from(vec![0, 0, 0, 1, 0])),
            Arc::new(Int64Array::from(vec![0, 0, 0, 0, 3])),
            Arc::new(UInt8Array::from(vec![b'7', b'/', b'7', b'7', b'7'])),
            Arc::new(UInt8Array::from(vec![b'N', b'N', b'N', b'U', b'D'])),
            Arc::new(Int64Array::from(vec![
                split_day,
                div_day,
                ts("2024-01-03 00:00:00"),
                split_day,
                0,
            ])),
            Arc::new(Float64Array::from(vec![3.0, 1.05, 2.0, 4.0, 0.0])),
        ],
    )
    .expect("ice");
    let actions = table(&ctx, "ACTIONS", batch).await;
    let opts = ApplyOptions::default().with_actions(actions);
    let b = collect(
        apply_functions_with(&ctx, input, &["adjust()"], &opts)
            .await
            .expect("adjust"),
    )
    .await;
    assert_eq!(
        floats(&b, "Close"),
        [95.2381, 96.1905, 96.1905, 97.1429, 100.0]
    );
    assert_eq!(ints(&b, "Volume"), [420, 840, 420, 315, 500]);
}

#[tokio::test]
async fn errors_are_typed() {
    let ctx = SessionContext::new();
    let input = table(&ctx, "bars", minute_bars()).await;
    let err = apply_functions(&ctx, input.clone(), &calls(&["median(Close)"]), None)
        .await
        .err();
    assert_eq!(
        err.map(|e| e.to_string()).as_deref(),
        Some("no function in the UDA Registry named \"median\"")
    );
    let err = apply_functions(&ctx, input.clone(), &calls(&["min(Nope)"]), None)
        .await
        .err();
    assert!(
        matches!(err, Some(UdfError::ColumnNotFound { .. })),
        "{err:?}"
    );
    let err = apply_functions(
        &ctx,
        input.clone(),
        &calls(&["candlecandler('5Min',Open,High,Low,Close)"]),
        Some("Mars/Base"),
    )
    .await
    .err();
    assert!(matches!(err, Some(UdfError::InvalidTimezone(_))), "{err:?}");
    let err = apply_functions(
        &ctx,
        input,
        &calls(&["candlecandler('5Minutes?',Open,High,Low,Close)"]),
        None,
    )
    .await
    .err();
    assert!(
        matches!(err, Some(UdfError::InvalidTimeframe(_))),
        "{err:?}"
    );
    let df_err: datafusion::error::DataFusionError = UdfError::InvalidTimezone("x".into()).into();
    assert!(df_err.to_string().contains("unknown timezone"));
}
