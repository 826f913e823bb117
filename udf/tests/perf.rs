//! Rough timing of the benchmark downsample (525,600 1Min rows -> 8,760 1H bars), compared
//! with DataFusion's built-in `date_bin`, plus the physical plan for time-sorted input.
//! Run with `cargo test -p mkts-udf --test perf -- --ignored --nocapture`.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::ident;
use datafusion::prelude::SessionContext;
use mkts_udf::apply_functions;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "timing only"]
async fn downsample_one_year_of_minutes() {
    let start = ts("2023-01-01 00:00:00");
    let rows: Vec<_> = (0..525_600i64)
        .map(|i| {
            let p = 100.0 + (i % 977) as f32 * 0.01;
            (start + 60 * i, p, p + 0.5, p - 0.5, p + 0.1, i % 100)
        })
        .collect();
    let ctx = SessionContext::new();
    let batch = bars_batch(&rows);
    ctx.register_batch("bars", batch.clone()).expect("register");
    // The same data declared sorted by Epoch (as a time-series store would): streaming aggregate.
    let mem = MemTable::try_new(batch.schema(), vec![vec![batch]])
        .expect("mem")
        .with_sort_order(vec![vec![ident("Epoch").sort(true, false)]]);
    ctx.register_table("sorted", Arc::new(mem))
        .expect("register");
    let calls = vec!["candlecandler('1H',Open,High,Low,Close,Sum::Volume)".to_string()];
    for (table, tz) in [
        ("bars", None),
        ("bars", Some("America/New_York")),
        ("sorted", None),
    ] {
        for _ in 0..3 {
            let t0 = Instant::now();
            let df = apply_functions(&ctx, ctx.table(table).await.expect("t"), &calls, tz)
                .await
                .expect("apply");
            let b = collect(df).await;
            println!(
                "{table} tz={tz:?}: {} bars in {:?}",
                b.num_rows(),
                t0.elapsed()
            );
            assert_eq!(b.num_rows(), 8760);
        }
    }
    for _ in 0..3 {
        let t0 = Instant::now();
        let df = ctx
            .sql(
                r#"SELECT date_bin(INTERVAL '1 hour', "Epoch") AS "Epoch", first_value("Open" ORDER BY "Epoch") AS "Open",
                   max("High") AS "High", min("Low") AS "Low", last_value("Close" ORDER BY "Epoch") AS "Close",
                   sum("Volume") AS "Volume" FROM bars GROUP BY 1 ORDER BY 1"#,
            )
            .await
            .expect("sql");
        let b = collect(df).await;
        println!(
            "built-in date_bin: {} bars in {:?}",
            b.num_rows(),
            t0.elapsed()
        );
    }
    let arr = epoch_array(&rows.iter().map(|r| r.0).collect::<Vec<_>>());
    for tz in [None, Some("America/New_York")] {
        let t0 = Instant::now();
        let out = mkts_udf::bucket_array(&arr, "1H".parse().expect("tf"), tz).expect("bucket");
        println!(
            "bucket_array tz={tz:?}: {} values in {:?}",
            out.len(),
            t0.elapsed()
        );
    }
    let df = apply_functions(&ctx, ctx.table("sorted").await.expect("t"), &calls, None)
        .await
        .expect("apply");
    df.explain(false, false)
        .expect("explain")
        .show()
        .await
        .expect("show");
}
