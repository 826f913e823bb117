//! SQL stays inside the store on an embedded engine: statements that would touch files, outlive their
//! session or leave the bucket catalog are refused before anything runs; the memory pool fails one statement
//! and frees everything it held.

use std::sync::Arc;

use arrow::array::{AsArray, Float32Array, RecordBatch, TimestampSecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use mkts::engine::{BucketKey, Engine, EngineConfig, WriteOptions};
use mkts::query::{QueryEngine, QueryError};

const T0: i64 = 1_704_067_200;

async fn setup(limit: Option<usize>) -> (tempfile::TempDir, Engine, QueryEngine) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig::new(dir.path().join("data"))).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Timestamp(TimeUnit::Second, Some("UTC".into())), false),
        Field::new("Close", DataType::Float32, false),
    ]));
    let b = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(TimestampSecondArray::from((0..10).map(|i| T0 + 60 * i).collect::<Vec<_>>()).with_timezone("UTC")),
            Arc::new(Float32Array::from((0..10).map(|i| 100.0 + i as f32).collect::<Vec<_>>())),
        ],
    )
    .unwrap();
    engine.write(&BucketKey::parse("AAPL/1Min/OHLCV").unwrap(), &b, WriteOptions::default()).await.unwrap();
    let q = QueryEngine::with_memory_limit(engine.clone(), chrono_tz::UTC, limit);
    (dir, engine, q)
}

fn files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn refused_statements_do_nothing() {
    let (_d, _e, q) = setup(None).await;
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("secret.csv");
    std::fs::write(&csv, "a,b\n1,2\n").unwrap();
    let out = tmp.path().join("out.csv");
    let cases = [
        (format!("COPY (SELECT 1 AS a) TO '{}' STORED AS CSV", out.display()), "COPY TO is not allowed: SQL runs inside the store"),
        (format!("COPY (SELECT * FROM \"AAPL/1Min/OHLCV\") TO '{}/' STORED AS PARQUET", tmp.path().display()), "COPY TO is not allowed"),
        (format!("EXPLAIN ANALYZE COPY (SELECT 1) TO '{}' STORED AS CSV", out.display()), "COPY TO is not allowed"),
        (format!("CREATE EXTERNAL TABLE s (a INT, b INT) STORED AS CSV LOCATION '{}'", csv.display()), "CREATE EXTERNAL TABLE is not allowed"),
        ("CREATE TABLE t AS SELECT 1 AS a".into(), "CREATE TABLE is not allowed"),
        ("CREATE TABLE t (a INT)".into(), "CREATE TABLE is not allowed"),
        (r#"DROP TABLE "AAPL/1Min/OHLCV""#.into(), "DROP TABLE is not allowed"),
        ("CREATE DATABASE other".into(), "CREATE DATABASE is not allowed"),
        ("CREATE SCHEMA mkts.other".into(), "CREATE SCHEMA is not allowed"),
        ("SET datafusion.execution.batch_size = 1".into(), "SET is not allowed"),
        ("SET datafusion.runtime.temp_directory = '/tmp/mkts-spill'".into(), "SET is not allowed"),
        ("RESET datafusion.execution.batch_size".into(), "SET is not allowed"),
        ("PREPARE p AS SELECT 1".into(), "PREPARE is not allowed"),
        ("SELECT 1 WHERE 1 IN (SELECT 1)".into(), ""),
    ];
    for (sql, want) in &cases {
        let r = q.sql(sql).await;
        if want.is_empty() {
            assert!(r.is_ok(), "{sql}: {r:?}");
            continue;
        }
        match r {
            Err(QueryError::NotAllowed(m)) => assert!(m.contains(want), "{sql}: {m}"),
            other => panic!("{sql}: expected a refusal, got {other:?}"),
        }
        // Planning alone (prepared statements) refuses the same statements.
        assert!(matches!(q.logical_plan(sql).await, Err(QueryError::NotAllowed(_))), "{sql}");
    }
    // Underneath the check, a session cannot reach files either: no object stores, no table factories.
    let ctx = q.context();
    let copy = format!("COPY (SELECT 1 AS a) TO '{}' STORED AS CSV", out.display());
    let r = match ctx.sql(&copy).await {
        Ok(df) => df.collect().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(r.unwrap_err().to_string().contains("No suitable object store"));
    let ext = format!("CREATE EXTERNAL TABLE s (a INT, b INT) STORED AS CSV LOCATION '{}'", csv.display());
    assert!(ctx.sql(&ext).await.unwrap_err().to_string().contains("CSV"));
    assert_eq!(files(tmp.path()), ["secret.csv"]);
    assert!(!std::path::Path::new("/tmp/mkts-spill").exists());
    // Nothing was registered, and the bucket is untouched.
    assert!(q.sql("SELECT * FROM s").await.is_err());
    let (_, b) = q.sql(r#"SELECT count(*) FROM "AAPL/1Min/OHLCV""#).await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 10);
    let (_, b) = q.sql("SELECT value FROM information_schema.df_settings WHERE name = 'datafusion.execution.batch_size'").await.unwrap();
    assert_eq!(b[0].column(0).as_string::<i32>().value(0), "8192");
}

#[tokio::test]
async fn views_are_shared_and_bounded_to_views() {
    let (_d, _e, q) = setup(None).await;
    q.sql(r#"CREATE VIEW up AS SELECT "Epoch", "Close" FROM "AAPL/1Min/OHLCV" WHERE "Close" >= 105"#).await.unwrap();
    // Another statement (its own session) sees the view: it lives in the shared catalog.
    let (_, b) = q.sql("SELECT count(*) FROM up").await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 5);
    // Only views can be registered in the bucket schema.
    let mem = datafusion::datasource::MemTable::try_new(Arc::new(Schema::new(vec![Field::new("a", DataType::Int32, true)])), vec![vec![]]).unwrap();
    let err = q.context().register_table("m", Arc::new(mem)).unwrap_err().to_string();
    assert!(err.contains("only views"), "{err}");
    q.sql("DROP VIEW up").await.unwrap();
    assert!(q.sql("SELECT * FROM up").await.is_err());
}

/// Wait until the failed statement's tasks (aborted when its stream was dropped) have returned their memory.
async fn released(q: &QueryEngine) {
    for _ in 0..1000 {
        if q.memory().0 == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("memory still reserved after the statement failed: {:?}", q.memory());
}

#[tokio::test]
async fn memory_pool_fails_the_statement_and_frees_it() {
    let (_d, _e, q) = setup(Some(16 << 20)).await;
    assert_eq!(q.memory(), (0, Some(16 << 20)));
    let big = "SELECT count(*) FROM (SELECT value % 40000000 AS k, count(*) AS c FROM range(40000000) GROUP BY 1)";
    match q.sql(big).await {
        Err(QueryError::ResourcesExhausted(m)) => assert!(m.contains("needs more memory than the SQL memory pool holds"), "{m}"),
        other => panic!("expected ResourcesExhausted, got {other:?}"),
    }
    released(&q).await;
    // Streaming fails the same way, and a collected result larger than the pool too.
    let (_, s) = q.sql_stream(big).await.unwrap();
    let r: Result<Vec<RecordBatch>, QueryError> = futures::TryStreamExt::try_collect(s).await;
    assert!(matches!(r, Err(QueryError::ResourcesExhausted(_))), "{r:?}");
    released(&q).await;
    assert!(matches!(q.sql("SELECT value FROM range(4000000)").await, Err(QueryError::ResourcesExhausted(_))));
    released(&q).await;
    let (_, b) = q.sql("SELECT count(*) FROM (SELECT value % 1000 AS k FROM range(100000) GROUP BY 1)").await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 1000);
}

#[tokio::test]
async fn not_queryable_lists_no_buckets() {
    let (d, engine, q) = setup(None).await;
    drop(q);
    engine.shutdown().await.unwrap();
    drop(engine);
    let mut cfg = EngineConfig::new(d.path().join("data"));
    cfg.policy = mkts::engine::Policy { enable_add: true, enable_remove: true, queryable: false };
    let engine = Engine::open(cfg).unwrap();
    let q = QueryEngine::new(engine.clone(), chrono_tz::UTC);
    let (_, b) = q.sql("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'").await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 0);
    let err = q.sql(r#"SELECT * FROM "AAPL/1Min/OHLCV""#).await.unwrap_err().to_string();
    assert!(err.contains("not queryable"), "{err}");
}
