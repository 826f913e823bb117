//! SQL functions (`time_bucket`, `asof_join`) and the Rust as-of join.

mod common;

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, TimestampNanosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use common::*;
use datafusion::prelude::SessionContext;
use mkts_udf::{Timeframe, asof_join, bucket_array, register_all};

fn times_batch(t: &[i64]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![Field::new("Epoch", epoch_type(), false)]));
    RecordBatch::try_new(schema, vec![epoch_array(t)]).expect("batch")
}

#[tokio::test]
async fn time_bucket_across_dst_in_new_york() {
    let ctx = SessionContext::new();
    register_all(&ctx);
    let rows = [
        // spring forward 2024-03-10 07:00 UTC (02:00 EST -> 03:00 EDT); 2024-03-10 is a Sunday
        "2024-03-10 04:59:59", // 03-09 23:59:59 EST
        "2024-03-10 05:00:00", // 03-10 00:00 EST
        "2024-03-10 06:30:00", // 01:30 EST
        "2024-03-10 07:30:00", // 03:30 EDT
        "2024-03-11 03:59:59", // 03-10 23:59:59 EDT (a 23-hour day)
        "2024-03-11 04:00:00", // 03-11 00:00 EDT, Monday
        // fall back 2024-11-03 06:00 UTC (02:00 EDT -> 01:00 EST)
        "2024-11-03 05:30:00", // 01:30 EDT
        "2024-11-03 06:30:00", // 01:30 EST
        "2024-11-04 04:59:59", // 11-03 23:59:59 EST (a 25-hour day)
        "2024-11-04 05:00:00", // 11-04 00:00 EST
    ];
    let t: Vec<i64> = rows.iter().map(|s| ts(s)).collect();
    ctx.register_batch("t", times_batch(&t)).expect("register");
    let q = |tf: &str, tz: &str| {
        format!(r#"SELECT time_bucket('{tf}', "Epoch"{tz}) AS b FROM t ORDER BY "Epoch""#)
    };
    let run = |sql: String| {
        let ctx = ctx.clone();
        async move { collect(ctx.sql(&sql).await.expect("sql")).await }
    };
    let ny = ", 'America/New_York'";

    let b = run(q("1D", ny)).await;
    assert_eq!(dtype(&b, "b"), epoch_type(), "same type as the input");
    let day = ts;
    assert_eq!(
        ints(&b, "b"),
        [
            day("2024-03-09 05:00:00"),
            day("2024-03-10 05:00:00"),
            day("2024-03-10 05:00:00"),
            day("2024-03-10 05:00:00"),
            day("2024-03-10 05:00:00"),
            day("2024-03-11 04:00:00"),
            day("2024-11-03 04:00:00"),
            day("2024-11-03 04:00:00"),
            day("2024-11-03 04:00:00"),
            day("2024-11-04 05:00:00"),
        ]
    );

    // Hours stay one hour long across both transitions.
    let b = run(q("1H", ny)).await;
    assert_eq!(
        ints(&b, "b"),
        [
            day("2024-03-10 04:00:00"),
            day("2024-03-10 05:00:00"),
            day("2024-03-10 06:00:00"),
            day("2024-03-10 07:00:00"),
            day("2024-03-11 03:00:00"),
            day("2024-03-11 04:00:00"),
            day("2024-11-03 05:00:00"),
            day("2024-11-03 06:00:00"),
            day("2024-11-04 04:00:00"),
            day("2024-11-04 05:00:00"),
        ]
    );

    // Weeks start on local Monday midnight, months on local first-of-month midnight.
    let b = run(q("1W", ny)).await;
    let w = ints(&b, "b");
    assert_eq!(
        &w[..6],
        [day("2024-03-04 05:00:00"); 5]
            .iter()
            .copied()
            .chain([day("2024-03-11 04:00:00")])
            .collect::<Vec<_>>()
    );
    assert_eq!(w[6], day("2024-10-28 04:00:00"));
    let b = run(q("1M", ny)).await;
    let m = ints(&b, "b");
    assert_eq!(&m[0..6], [day("2024-03-01 05:00:00"); 6]);
    assert_eq!(&m[6..9], [day("2024-11-01 04:00:00"); 3]);

    // Without a timezone: UTC.
    let b = run(q("1D", "")).await;
    let d = ints(&b, "b");
    assert_eq!(d[0], day("2024-03-10 00:00:00"));
    assert_eq!(d[4], day("2024-03-11 00:00:00"));
    let b = run(q("1W", "")).await;
    assert_eq!(ints(&b, "b")[1], day("2024-03-04 00:00:00"));
    assert_eq!(ints(&b, "b")[5], day("2024-03-11 00:00:00"));
    let b = run(q("1Y", "")).await;
    assert_eq!(ints(&b, "b")[9], day("2024-01-01 00:00:00"));
}

#[tokio::test]
async fn time_bucket_keeps_unit_and_handles_nulls() {
    let v: ArrayRef = Arc::new(
        TimestampNanosecondArray::from(vec![
            Some(ts("2024-01-02 10:07:59") * 1_000_000_000 + 123),
            None,
        ])
        .with_timezone("UTC"),
    );
    let tf: Timeframe = "5Min".parse().expect("tf");
    let out = bucket_array(&v, tf, None).expect("bucket");
    assert_eq!(
        out.data_type(),
        &DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
    );
    let b = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(
            "b",
            out.data_type().clone(),
            true,
        )])),
        vec![out],
    )
    .expect("batch");
    assert_eq!(ints(&b, "b")[0], ts("2024-01-02 10:05:00") * 1_000_000_000);
    assert_eq!(nulls(&b, "b"), [false, true]);
}

#[tokio::test]
async fn sql_candles_with_builtins() {
    let ctx = SessionContext::new();
    register_all(&ctx);
    let t = |s: &str| ts(&format!("2024-01-02 {s}"));
    ctx.register_batch(
        "bars",
        bars_batch(&[
            (t("10:03:00"), 9.0, 10.0, 8.5, 10.0, 25),
            (t("10:00:00"), 10.0, 12.0, 9.0, 11.0, 100),
            (t("10:04:00"), 10.0, 11.0, 9.5, 10.5, 25),
            (t("10:07:00"), 20.0, 21.0, 19.0, 20.5, 7),
        ]),
    )
    .expect("register");
    let b = collect(
        ctx.sql(
            r#"SELECT time_bucket('5Min', "Epoch") AS "Epoch",
                      first_value("Open" ORDER BY "Epoch") AS "Open", max("High") AS "High",
                      min("Low") AS "Low", last_value("Close" ORDER BY "Epoch") AS "Close",
                      sum("Volume") AS "Volume"
               FROM bars GROUP BY 1 ORDER BY 1"#,
        )
        .await
        .expect("sql"),
    )
    .await;
    assert_eq!(ints(&b, "Epoch"), [t("10:00:00"), t("10:05:00")]);
    assert_eq!(floats(&b, "Open"), [10.0, 20.0]);
    assert_eq!(floats(&b, "High"), [12.0, 21.0]);
    assert_eq!(floats(&b, "Low"), [8.5, 19.0]);
    assert_eq!(floats(&b, "Close"), [10.5, 20.5]);
    assert_eq!(ints(&b, "Volume"), [150, 7]);
}

const MS: i32 = 1_000_000;

fn tick_table(cols: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let fields: Vec<Field> = cols
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), false))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        cols.into_iter().map(|(_, a)| a).collect(),
    )
    .expect("ticks")
}

fn quotes() -> RecordBatch {
    let s = ts("2024-01-02 10:00:00");
    tick_table(vec![
        ("Epoch", epoch_array(&[s, s, s + 1, s + 2])),
        (
            "Nanoseconds",
            Arc::new(Int32Array::from(vec![0, 500 * MS, 0, 0])),
        ),
        ("Symbol", strings(&["AAPL", "MSFT", "AAPL", "AAPL"])),
        (
            "Bid",
            Arc::new(Float64Array::from(vec![99.0, 199.0, 100.0, 101.0])),
        ),
        (
            "Ask",
            Arc::new(Float64Array::from(vec![101.0, 201.0, 102.0, 103.0])),
        ),
    ])
}

fn trades() -> RecordBatch {
    let s = ts("2024-01-02 10:00:00");
    tick_table(vec![
        ("Epoch", epoch_array(&[s, s, s + 1, s + 3, s - 1, s + 5])),
        (
            "Nanoseconds",
            Arc::new(Int32Array::from(vec![200 * MS, 900 * MS, 0, 0, 0, 0])),
        ),
        (
            "Symbol",
            strings(&["MSFT", "AAPL", "AAPL", "MSFT", "AAPL", "TSLA"]),
        ),
        (
            "Price",
            Arc::new(Float64Array::from(vec![
                200.0, 100.5, 101.0, 200.5, 98.0, 250.0,
            ])),
        ),
        ("Size", Arc::new(Int64Array::from(vec![1, 2, 3, 4, 5, 6]))),
    ])
}

#[tokio::test]
async fn asof_join_trades_to_quotes_by_symbol() {
    let ctx = SessionContext::new();
    let left = table(&ctx, "trades", trades()).await;
    let right = table(&ctx, "quotes", quotes()).await;
    let b = collect(
        asof_join(left.clone(), right.clone(), "Epoch", Some("Symbol"))
            .await
            .expect("asof"),
    )
    .await;
    assert_eq!(
        names(&b),
        [
            "Epoch",
            "Nanoseconds",
            "Symbol",
            "Price",
            "Size",
            "Epoch_right",
            "Nanoseconds_right",
            "Bid",
            "Ask"
        ]
    );
    // left order is preserved
    assert_eq!(ints(&b, "Size"), [1, 2, 3, 4, 5, 6]);
    // MSFT@.2 before any MSFT quote; AAPL@.9 -> q1; AAPL@1.0 -> q3 (equal time matches);
    // MSFT@3 -> q2; AAPL@-1 -> none; TSLA -> no quotes for the key.
    assert_eq!(nulls(&b, "Bid"), [true, false, false, false, true, true]);
    let bids = floats(&b, "Bid");
    assert_eq!([bids[1], bids[2], bids[3]], [99.0, 100.0, 199.0]);
    let asks = floats(&b, "Ask");
    assert_eq!([asks[1], asks[2], asks[3]], [101.0, 102.0, 201.0]);
    let s = ts("2024-01-02 10:00:00");
    assert_eq!(ints(&b, "Epoch_right")[1..4], [s, s + 1, s]);
    assert_eq!(ints(&b, "Nanoseconds_right")[1..4], [0, 0, 500 * MS as i64]);

    // Without a key: the latest quote of any symbol.
    let b = collect(asof_join(left, right, "Epoch", None).await.expect("asof")).await;
    assert_eq!(
        names(&b),
        [
            "Epoch",
            "Nanoseconds",
            "Symbol",
            "Price",
            "Size",
            "Epoch_right",
            "Nanoseconds_right",
            "Symbol_right",
            "Bid",
            "Ask"
        ]
    );
    assert_eq!(nulls(&b, "Bid"), [false, false, false, false, true, false]);
    let bids = floats(&b, "Bid");
    assert_eq!(
        [bids[0], bids[1], bids[2], bids[3], bids[5]],
        [99.0, 199.0, 100.0, 101.0, 101.0]
    );
}

#[tokio::test]
async fn asof_join_sql_table_function() {
    let ctx = SessionContext::new();
    register_all(&ctx);
    ctx.register_batch("trades", trades()).expect("register");
    ctx.register_batch("quotes", quotes()).expect("register");
    let b = collect(
        ctx.sql(r#"SELECT "Size", "Bid", "Ask" FROM asof_join('trades', 'quotes', 'Epoch', 'Symbol') WHERE "Bid" IS NOT NULL ORDER BY "Size""#)
            .await
            .expect("sql"),
    )
    .await;
    assert_eq!(ints(&b, "Size"), [2, 3, 4]);
    assert_eq!(floats(&b, "Bid"), [99.0, 100.0, 199.0]);
    assert_eq!(floats(&b, "Ask"), [101.0, 102.0, 201.0]);
    let err = ctx
        .sql("SELECT * FROM asof_join('trades', 'nope', 'Epoch')")
        .await
        .err();
    assert!(err.is_some_and(|e| e.to_string().contains("not found")));
}

/// The fixed-window path reuses the last bar's bounds: every value, in any order, still gets its own bar
/// (checked against the definition), including negative epochs, week bars and values near the i64 ends.
#[tokio::test]
async fn time_bucket_reused_window_equals_the_definition() {
    let mut vals: Vec<i64> = (0..500).map(|i| 1_700_000_000 + 37 * i).collect(); // in order
    vals.extend([5, -1, -3600, -3601, 3599, 3600, 1_700_000_000, 7, i64::MAX, i64::MAX - 3599, 0]); // out of order
    vals.extend((0..50).rev().map(|i| -86_400 * 3 + 1_000 * i)); // descending, negative
    let arr: ArrayRef = Arc::new(Int64Array::from(vals.clone()));
    for (tf, origin) in [("1H", 0i64), ("1Min", 0), ("1W", 4 * 86_400), ("1D", 0)] {
        let d: i64 = match tf { "1H" => 3600, "1Min" => 60, "1W" => 604_800, _ => 86_400 };
        let out = bucket_array(&arr, tf.parse().expect("tf"), None).expect("bucket");
        let out = out.as_any().downcast_ref::<Int64Array>().expect("int64");
        for (i, &v) in vals.iter().enumerate() {
            let want = v - (v.wrapping_sub(origin)).rem_euclid(d);
            assert_eq!(out.value(i), want, "{tf} of {v}");
        }
    }
    // A bar start below i64::MIN is an error, after values that were fine.
    let low: ArrayRef = Arc::new(Int64Array::from(vec![0, 10, i64::MIN + 5]));
    assert!(bucket_array(&low, "1H".parse().expect("tf"), None).is_err());
}
