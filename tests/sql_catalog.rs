//! SQL over the bucket catalog on an embedded engine: tables per key and per timeframe, pushdown in EXPLAIN,
//! exact filter semantics, INSERT ... SELECT through the engine, MarketStore spellings, functions.

use std::sync::Arc;

use arrow::array::{Array, AsArray, Float32Array, Int64Array, RecordBatch, StringArray, TimestampSecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use mkts::engine::{BucketKey, Engine, EngineConfig, ReadRequest, WriteOptions};
use mkts::query::QueryEngine;

fn ohlcv(epochs: &[i64], base: f32) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Timestamp(TimeUnit::Second, Some("UTC".into())), false),
        Field::new("Open", DataType::Float32, false),
        Field::new("High", DataType::Float32, false),
        Field::new("Low", DataType::Float32, false),
        Field::new("Close", DataType::Float32, false),
        Field::new("Volume", DataType::Int64, false),
    ]));
    let n = epochs.len();
    let f = |off: f32| Arc::new(Float32Array::from((0..n).map(|i| base + i as f32 + off).collect::<Vec<_>>()));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(TimestampSecondArray::from(epochs.to_vec()).with_timezone("UTC")),
            f(0.0),
            f(0.5),
            f(-0.5),
            f(0.25),
            Arc::new(Int64Array::from((0..n).map(|i| 100 + i as i64).collect::<Vec<_>>())),
        ],
    )
    .unwrap()
}

const T0: i64 = 1_704_067_200; // 2024-01-01T00:00:00Z

async fn setup() -> (tempfile::TempDir, Engine, QueryEngine) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig::new(dir.path())).unwrap();
    let epochs: Vec<i64> = (0..120).map(|i| T0 + 60 * i).collect();
    for (sym, base) in [("AAPL", 100.0), ("TSLA", 200.0), ("MSFT", 300.0)] {
        let key = BucketKey::parse(&format!("{sym}/1Min/OHLCV")).unwrap();
        engine.write(&key, &ohlcv(&epochs, base), WriteOptions::default()).await.unwrap();
    }
    let q = QueryEngine::new(engine.clone(), chrono_tz::UTC);
    (dir, engine, q)
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}

fn explain_text(batches: &[RecordBatch]) -> String {
    let mut s = String::new();
    for b in batches {
        let col = b.column(1).as_string::<i32>();
        for i in 0..col.len() {
            s.push_str(col.value(i));
            s.push('\n');
        }
    }
    s
}

#[tokio::test]
async fn single_bucket_table_and_marketstore_spelling() {
    let (_d, _e, q) = setup().await;
    let (schema, b) = q.sql("SELECT * FROM `AAPL/1Min/OHLCV` LIMIT 5;").await.unwrap();
    assert_eq!(schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>(), ["Epoch", "Open", "High", "Low", "Close", "Volume"]);
    assert_eq!(rows(&b), 5);
    let (_, b) = q.sql(r#"SELECT count(*) AS n, min(Open) AS lo, max(Close) AS hi FROM "AAPL/1Min/OHLCV""#).await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 120);
    assert_eq!(b[0].column(1).as_primitive::<arrow::datatypes::Float32Type>().value(0), 100.0);
    assert_eq!(b[0].column(2).as_primitive::<arrow::datatypes::Float32Type>().value(0), 219.25);
    // No column at all is read for count(*).
    let (_, b) = q.sql(r#"SELECT count(*) FROM "*/1Min/OHLCV""#).await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 360);
}

#[tokio::test]
async fn epoch_range_is_exact_and_pushed_down() {
    let (_d, _e, q) = setup().await;
    // 00:10 < Epoch <= 00:20 → 10 rows (exclusive start even though the engine reads whole bars).
    let sql = r#"SELECT Epoch, Close FROM "AAPL/1Min/OHLCV" WHERE Epoch > '2024-01-01T00:10:00Z' AND Epoch <= '2024-01-01T00:20:00Z'"#;
    let (_, b) = q.sql(sql).await.unwrap();
    assert_eq!(rows(&b), 10);
    let e = b[0].column(0).as_primitive::<arrow::datatypes::TimestampSecondType>();
    assert_eq!(e.value(0), T0 + 660);
    let (_, ex) = q.sql(&format!("EXPLAIN {sql}")).await.unwrap();
    let text = explain_text(&ex);
    assert!(text.contains("BucketScanExec: table=AAPL/1Min/OHLCV buckets=1 epoch_range=[2024-01-01T00:10:01Z, 2024-01-01T00:20:00.999999999Z]"), "{text}");
    assert!(!text.contains("FilterExec"), "the Epoch filter is exact in the scan: {text}");
    // BETWEEN and integer seconds.
    let (_, b) = q.sql(&format!(r#"SELECT * FROM "AAPL/1Min/OHLCV" WHERE Epoch BETWEEN to_timestamp({}) AND to_timestamp({})"#, T0 + 60, T0 + 180)).await.unwrap();
    assert_eq!(rows(&b), 3);
}

#[tokio::test]
async fn wildcard_table_symbol_pushdown_and_limit() {
    let (_d, _e, q) = setup().await;
    let (schema, b) = q.sql(r#"SELECT * FROM "*/1Min/OHLCV""#).await.unwrap();
    assert_eq!(schema.field(schema.fields().len() - 1).name(), "Symbol");
    assert_eq!(rows(&b), 360);
    let sql = r#"SELECT "Symbol", Epoch, Close FROM "*/1Min/OHLCV" WHERE "Symbol" IN ('AAPL', 'TSLA') AND Epoch >= '2024-01-01T01:00:00Z' LIMIT 7"#;
    let (_, b) = q.sql(sql).await.unwrap();
    assert_eq!(rows(&b), 7);
    let (_, ex) = q.sql(&format!("EXPLAIN {sql}")).await.unwrap();
    let text = explain_text(&ex);
    assert!(text.contains("buckets=2 symbols=[AAPL, TSLA] epoch_range=[2024-01-01T01:00:00Z, +inf) limit=7 projection=[Epoch, Close, Symbol]"), "{text}");
    // The short name and a listed table.
    let (_, b) = q.sql(r#"SELECT count(*) FROM "1Min/OHLCV" WHERE "Symbol" = 'MSFT'"#).await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 120);
    let (_, b) = q.sql(r#"SELECT DISTINCT "Symbol" FROM "AAPL,MSFT/1Min/OHLCV" ORDER BY 1"#).await.unwrap();
    let s = b[0].column(0).as_string::<i32>();
    assert_eq!((s.value(0), s.value(1), b[0].num_rows()), ("AAPL", "MSFT", 2));
    // OR of symbols narrows the buckets too.
    let (_, ex) = q.sql(r#"EXPLAIN SELECT * FROM "*/1Min/OHLCV" WHERE "Symbol" = 'AAPL' OR "Symbol" = 'MSFT'"#).await.unwrap();
    assert!(explain_text(&ex).contains("buckets=2 symbols=[AAPL, MSFT]"));
}

#[tokio::test]
async fn resample_group_and_join() {
    let (_d, _e, q) = setup().await;
    let sql = r#"SELECT "Symbol", date_bin(INTERVAL '1 hour', Epoch) AS bar,
                        first_value(Open ORDER BY Epoch) AS o, max(High) AS h, min(Low) AS l,
                        last_value(Close ORDER BY Epoch) AS c, sum(Volume) AS v
                 FROM "*/1Min/OHLCV" GROUP BY 1, 2 ORDER BY 1, 2"#;
    let (_, b) = q.sql(sql).await.unwrap();
    let b = arrow::compute::concat_batches(&b[0].schema(), &b).unwrap();
    assert_eq!(b.num_rows(), 6);
    // AAPL first hour: open 100, high 59.5+100, low 99.5, close 159.25, volume sum(100..160)
    assert_eq!(b.column(0).as_string::<i32>().value(0), "AAPL");
    assert_eq!(b.column(2).as_primitive::<arrow::datatypes::Float32Type>().value(0), 100.0);
    assert_eq!(b.column(3).as_primitive::<arrow::datatypes::Float32Type>().value(0), 159.5);
    assert_eq!(b.column(4).as_primitive::<arrow::datatypes::Float32Type>().value(0), 99.5);
    assert_eq!(b.column(5).as_primitive::<arrow::datatypes::Float32Type>().value(0), 159.25);
    assert_eq!(b.column(6).as_primitive::<arrow::datatypes::Int64Type>().value(0), (100..160).sum::<i64>());
    let join = r#"SELECT a.Epoch, t.Close - a.Close AS spread FROM "AAPL/1Min/OHLCV" a JOIN "TSLA/1Min/OHLCV" t ON a.Epoch = t.Epoch ORDER BY 1 LIMIT 3"#;
    let (_, b) = q.sql(join).await.unwrap();
    assert_eq!(rows(&b), 3);
    assert_eq!(b[0].column(1).as_primitive::<arrow::datatypes::Float32Type>().value(2), 100.0);
    // time_bucket from the udf crate.
    let (_, b) = q.sql(r#"SELECT time_bucket('1H', Epoch) AS t, count(*) AS n FROM "MSFT/1Min/OHLCV" GROUP BY 1 ORDER BY 1"#).await.unwrap();
    assert_eq!(rows(&b), 2);
}

#[tokio::test]
async fn insert_select_writes_through_the_engine() {
    let (_d, engine, q) = setup().await;
    let mut sub = engine.subscribe(16);
    engine
        .create(&BucketKey::parse("AAPL/1H/OHLCV").unwrap(), engine.schema(&BucketKey::parse("AAPL/1Min/OHLCV").unwrap()).unwrap())
        .await
        .unwrap();
    let sql = r#"INSERT INTO "AAPL/1H/OHLCV"
                 SELECT date_bin(INTERVAL '1 hour', Epoch) AS Epoch, first_value(Open ORDER BY Epoch), max(High), min(Low),
                        last_value(Close ORDER BY Epoch), sum(Volume)
                 FROM "AAPL/1Min/OHLCV" GROUP BY 1"#;
    let (_, b) = q.sql(sql).await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::UInt64Type>().value(0), 2);
    let read = engine.read(&ReadRequest::key(&BucketKey::parse("AAPL/1H/OHLCV").unwrap())).unwrap();
    assert_eq!(read[0].rows, 2);
    // The trigger bus saw the write.
    let ev = sub.rx.recv().await.unwrap();
    assert_eq!(ev.key.to_string(), "AAPL/1H/OHLCV");
    // Routing by Symbol into a wildcard table (creates buckets).
    let (_, b) = q
        .sql(r#"INSERT INTO "*/1Min/OHLCV" SELECT Epoch, Open, High, Low, Close, Volume, 'COPY' || "Symbol" FROM "*/1Min/OHLCV" WHERE "Symbol" <> 'MSFT' AND Epoch < '2024-01-01T00:05:00Z'"#)
        .await
        .unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::UInt64Type>().value(0), 10);
    let keys: Vec<String> = engine.keys().iter().map(|k| k.to_string()).collect();
    assert!(keys.contains(&"COPYAAPL/1Min/OHLCV".to_string()) && keys.contains(&"COPYTSLA/1Min/OHLCV".to_string()), "{keys:?}");
}

#[tokio::test]
async fn errors_and_listing() {
    let (_d, _e, q) = setup().await;
    let err = q.sql(r#"SELECT * FROM "NOPE/1Min/OHLCV""#).await.unwrap_err().to_string();
    assert!(err.contains("NOPE/1Min/OHLCV"), "{err}");
    let (_, b) = q.sql("SHOW TABLES").await.unwrap();
    let names: Vec<String> = b
        .iter()
        .flat_map(|b| {
            let c = b.column_by_name("table_name").unwrap().as_string::<i32>();
            (0..c.len()).map(|i| c.value(i).to_string()).collect::<Vec<_>>()
        })
        .collect();
    assert!(names.contains(&"AAPL/1Min/OHLCV".to_string()) && names.contains(&"*/1Min/OHLCV".to_string()), "{names:?}");
    let _ = StringArray::from(vec!["x"]).len();
}

#[tokio::test]
async fn functions_chain() {
    let (_d, engine, q) = setup().await;
    let read = engine.read(&ReadRequest::key(&BucketKey::parse("AAPL/1Min/OHLCV").unwrap())).unwrap().remove(0);
    let (schema, b) = q
        .apply_functions(read, &["candlecandler('1H',Open,High,Low,Close,Sum::Volume)".to_string()])
        .await
        .unwrap();
    assert_eq!(rows(&b), 2);
    let b = arrow::compute::concat_batches(&schema, &b).unwrap();
    let vol = b.column(schema.fields().len() - 1);
    let vol = arrow::compute::cast(vol, &DataType::Float64).unwrap();
    assert_eq!(vol.as_primitive::<arrow::datatypes::Float64Type>().value(0), (100..160).sum::<i64>() as f64, "{schema:?}");
    assert_eq!(b.column(1).as_primitive::<arrow::datatypes::Float32Type>().value(0), 100.0);
}

/// A table over several symbols whose buckets have different columns has the union of their columns:
/// a bucket lacking one reads null there (it used to hide the column from every symbol or fail the scan),
/// and a column of another type is cast to the first bucket's type.
#[tokio::test]
async fn multi_symbol_table_is_the_union_of_bucket_columns() {
    let (_d, engine, q) = setup().await;
    let epochs = [T0, T0 + 60];
    // BTC has only Close, as float64, and a Trades column nobody else has.
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Int64, false),
        Field::new("Close", DataType::Float64, false),
        Field::new("Trades", DataType::Int32, false),
    ]));
    let b = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(epochs.to_vec())),
            Arc::new(arrow::array::Float64Array::from(vec![42.5, 43.5])),
            Arc::new(arrow::array::Int32Array::from(vec![7, 8])),
        ],
    )
    .unwrap();
    engine.write(&BucketKey::parse("BTC/1Min/OHLCV").unwrap(), &b, WriteOptions::default()).await.unwrap();
    let (_, out) = q
        .sql(r#"SELECT "Symbol", "Close", "Volume", "Trades" FROM "*/1Min/OHLCV" WHERE "Epoch" = '2024-01-01T00:01:00Z' ORDER BY "Symbol""#)
        .await
        .unwrap();
    let out = arrow::compute::concat_batches(&out[0].schema(), &out).unwrap();
    let sym = out.column(0).as_string::<i32>();
    assert_eq!((0..out.num_rows()).map(|i| sym.value(i)).collect::<Vec<_>>(), ["AAPL", "BTC", "MSFT", "TSLA"]);
    let close = out.column(1).as_primitive::<arrow::datatypes::Float32Type>();
    assert_eq!(close.values().to_vec(), vec![101.25, 43.5, 301.25, 201.25]);
    let vol = out.column(2).as_primitive::<arrow::datatypes::Int64Type>();
    assert_eq!((0..4).map(|i| vol.is_valid(i).then(|| vol.value(i))).collect::<Vec<_>>(), [Some(101), None, Some(101), Some(101)]);
    let trades = out.column(3).as_primitive::<arrow::datatypes::Int32Type>();
    assert_eq!((0..4).map(|i| trades.is_valid(i).then(|| trades.value(i))).collect::<Vec<_>>(), [None, Some(8), None, None]);
    // Aggregates skip the nulls.
    let (_, out) = q.sql(r#"SELECT count("Volume"), count(*) FROM "*/1Min/OHLCV""#).await.unwrap();
    assert_eq!(out[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 360);
    assert_eq!(out[0].column(1).as_primitive::<arrow::datatypes::Int64Type>().value(0), 362);
}

/// MarketStore's functions from SQL give what the `functions` parameter gives.
#[tokio::test]
async fn marketstore_functions_as_sql_table_functions() {
    let (_d, engine, q) = setup().await;
    let key = BucketKey::parse("AAPL/1Min/OHLCV").unwrap();
    let chain = vec!["candlecandler('1H',Open,High,Low,Close,Sum::Volume)".to_string()];
    let read = engine.read(&ReadRequest::key(&key)).unwrap().into_iter().next().unwrap();
    let (_, want) = q.apply_functions(read, &chain).await.unwrap();
    let (_, got) = q
        .sql(r#"SELECT * FROM candlecandler('AAPL/1Min/OHLCV', '1H', 'Open', 'High', 'Low', 'Close', 'Sum::Volume')"#)
        .await
        .unwrap();
    let want = arrow::compute::concat_batches(&want[0].schema(), &want).unwrap();
    let got = arrow::compute::concat_batches(&got[0].schema(), &got).unwrap();
    assert_eq!(got.num_rows(), 2);
    assert_eq!(got, want);
    // The general form takes a chain; the result is a table like any other.
    let (_, b) = q
        .sql(r#"SELECT "Close", "Volume_SUM" FROM functions('AAPL/1Min/OHLCV', 'candlecandler(''1H'',Open,High,Low,Close,Sum::Volume)') WHERE "Epoch" >= '2024-01-01T01:00:00Z'"#)
        .await
        .unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::Float32Type>().value(0), 219.25);
    assert_eq!(b[0].column(1).as_primitive::<arrow::datatypes::Float64Type>().value(0), (160..220).sum::<i64>() as f64);
    let (_, b) = q.sql(r#"SELECT * FROM ms_max('AAPL/1Min/OHLCV', 'High')"#).await.unwrap();
    assert_eq!(b[0].column_by_name("Max").unwrap().as_primitive::<arrow::datatypes::Float32Type>().value(0), 219.5);
    let (_, b) = q.sql(r#"SELECT count(*) FROM gap('AAPL/1Min/OHLCV', '1Min')"#).await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 0);
    // Errors: not one bucket, a missing bucket, a bad call.
    let e = q.sql(r#"SELECT * FROM candlecandler('*/1Min/OHLCV', '1H', 'Open', 'High', 'Low', 'Close')"#).await.unwrap_err().to_string();
    assert!(e.contains("apply per bucket"), "{e}");
    let e = q.sql(r#"SELECT * FROM ms_min('NOPE/1Min/OHLCV', 'Close')"#).await.unwrap_err().to_string();
    assert!(e.contains("NOPE/1Min/OHLCV"), "{e}");
    let e = q.sql(r#"SELECT * FROM functions('AAPL/1Min/OHLCV', 'nosuch(1)')"#).await.unwrap_err().to_string();
    assert!(e.contains("nosuch"), "{e}");
}

/// `DELETE FROM "KEY" WHERE "Epoch" ...` deletes exactly that range through the engine (durable), on one
/// bucket or on the symbols a multi-symbol table's condition names; other conditions are refused.
#[tokio::test]
async fn sql_delete_by_epoch_range() {
    let (d, engine, q) = setup().await;
    let (_, b) = q.sql(r#"DELETE FROM "AAPL/1Min/OHLCV" WHERE "Epoch" < '2024-01-01T01:00:00Z'"#).await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::UInt64Type>().value(0), 60);
    let (_, b) = q.sql(r#"SELECT min("Epoch"), count(*) FROM "AAPL/1Min/OHLCV""#).await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::TimestampSecondType>().value(0), T0 + 3600);
    assert_eq!(b[0].column(1).as_primitive::<arrow::datatypes::Int64Type>().value(0), 60);
    // A multi-symbol table: only the named symbols, only the range.
    let (_, b) = q
        .sql(r#"DELETE FROM "*/1Min/OHLCV" WHERE "Symbol" IN ('TSLA', 'MSFT') AND "Epoch" BETWEEN '2024-01-01T00:10:00Z' AND '2024-01-01T00:19:00Z'"#)
        .await
        .unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::UInt64Type>().value(0), 20);
    let (_, b) = q.sql(r#"SELECT "Symbol", count(*) FROM "*/1Min/OHLCV" GROUP BY 1 ORDER BY 1"#).await.unwrap();
    let counts: Vec<i64> = b[0].column(1).as_primitive::<arrow::datatypes::Int64Type>().values().to_vec();
    assert_eq!(counts, vec![60, 110, 110]);
    // EXPLAIN deletes nothing; other conditions are refused and change nothing.
    q.sql(r#"EXPLAIN DELETE FROM "TSLA/1Min/OHLCV""#).await.unwrap();
    let e = q.sql(r#"DELETE FROM "TSLA/1Min/OHLCV" WHERE "Close" > 210"#).await.unwrap_err().to_string();
    assert!(e.contains("takes Epoch ranges"), "{e}");
    let (_, b) = q.sql(r#"SELECT count(*) FROM "TSLA/1Min/OHLCV""#).await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 110);
    // Durable: after a restart without a clean stop, the deletes hold.
    drop(q);
    drop(engine);
    let engine = loop {
        match Engine::open(EngineConfig::new(d.path())) {
            Ok(e) => break e,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let key = BucketKey::parse("AAPL/1Min/OHLCV").unwrap();
    assert_eq!(engine.info(&key).unwrap().rows, 60);
    assert_eq!(engine.info(&BucketKey::parse("MSFT/1Min/OHLCV").unwrap()).unwrap().rows, 110);
}
