//! Engine tests of tiering (`tier`): sealed years moved to a `file://` object store as Parquet, read back
//! through every read path, thawed by writes, removed by deletes, and every interrupted step of a move
//! finished or undone at the next start.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Schema};
use chrono::Datelike;

use super::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The three years the tests store: two sealed for more than a year (they move), and last year (it stays).
fn years() -> [i32; 3] {
    let y = chrono::Utc::now().year();
    [y - 3, y - 2, y - 1]
}

fn year_start(y: i32) -> i64 {
    chrono::NaiveDate::from_ymd_opt(y, 1, 1).unwrap().and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp()
}

fn cfg(root: &Path, store: &Path) -> EngineConfig {
    let mut c = EngineConfig::new(root);
    c.tiering = Some(TierConfig::new(format!("file://{}", store.display())));
    c
}

fn open(c: &EngineConfig) -> Engine {
    for _ in 0..500 {
        match Engine::open(c.clone()) {
            Err(EngineError::Unavailable(m)) if m.contains("in use") => std::thread::sleep(std::time::Duration::from_millis(20)),
            other => return other.unwrap(),
        }
    }
    Engine::open(c.clone()).unwrap()
}

/// Hourly bars: Epoch, Close = epoch/3600 + v, Volume = hour index, Venue (null every 5th row).
fn bars(start: i64, n: usize, v: f64) -> RecordBatch {
    let s = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Int64, false),
        Field::new("Close", DataType::Float64, false),
        Field::new("Volume", DataType::Int64, false),
        Field::new("Venue", DataType::Utf8, true),
    ]));
    let ep: Vec<i64> = (0..n as i64).map(|i| start + i * 3600).collect();
    RecordBatch::try_new(
        s,
        vec![
            Arc::new(Int64Array::from(ep.clone())),
            Arc::new(Float64Array::from(ep.iter().map(|e| (*e / 3600) as f64 + v).collect::<Vec<_>>())),
            Arc::new(Int64Array::from((0..n as i64).collect::<Vec<_>>())),
            Arc::new(StringArray::from((0..n).map(|i| (i % 5 != 0).then(|| format!("X{}", i % 7))).collect::<Vec<_>>())),
        ],
    )
    .unwrap()
}

type Row = (i64, f64, i64, Option<String>);

fn rows_of(r: &[BucketRead]) -> Vec<Row> {
    let b = concat_batches(&r[0].schema, &r[0].batches).unwrap();
    let ep = b.column(0).as_primitive::<arrow::datatypes::TimestampSecondType>();
    let c = b.column_by_name("Close").map(|a| a.as_primitive::<arrow::datatypes::Float64Type>().clone());
    let v = b.column_by_name("Volume").map(|a| a.as_primitive::<arrow::datatypes::Int64Type>().clone());
    let s = b.column_by_name("Venue").map(|a| a.as_string::<i32>().clone());
    (0..b.num_rows())
        .map(|i| {
            (
                ep.value(i),
                c.as_ref().map_or(0.0, |c| c.value(i)),
                v.as_ref().map_or(0, |v| v.value(i)),
                s.as_ref().and_then(|s| s.is_valid(i).then(|| s.value(i).to_string())),
            )
        })
        .collect()
}

fn expected(batches: &[RecordBatch]) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    for b in batches {
        let ep = b.column(0).as_primitive::<arrow::datatypes::Int64Type>();
        let c = b.column(1).as_primitive::<arrow::datatypes::Float64Type>();
        let v = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
        let s = b.column(3).as_string::<i32>();
        for i in 0..b.num_rows() {
            out.push((ep.value(i), c.value(i), v.value(i), s.is_valid(i).then(|| s.value(i).to_string())));
        }
    }
    out.sort_by_key(|r| r.0);
    out
}

fn tiers(e: &Engine, key: &BucketKey) -> Vec<(i32, &'static str)> {
    e.info(key).unwrap().partitions.iter().map(|p| (p.year, p.tier)).collect()
}

fn objects(store: &Path) -> Vec<String> {
    fn walk(p: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), base, out);
            } else {
                out.push(e.path().strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(store, store, &mut out);
    out.sort();
    out
}

/// Three years written (1,000 hourly bars each), the oldest two moved.
fn setup(e: &Engine, key: &BucketKey) -> Vec<RecordBatch> {
    let rt = rt();
    let written: Vec<RecordBatch> = years().iter().map(|y| bars(year_start(*y), 1000, 0.5)).collect();
    for b in &written {
        rt.block_on(e.write(key, b, WriteOptions::default())).unwrap();
    }
    rt.block_on(e.checkpoint()).unwrap();
    written
}

#[test]
fn sealed_years_move_and_read_back_on_every_path() {
    let (root, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let c = cfg(root.path(), store.path());
    let e = open(&c);
    let key = BucketKey::parse("AAPL/1H/OHLCV").unwrap();
    let written = setup(&e, &key);
    let [a, b, last] = years();
    assert_eq!(tiers(&e, &key), vec![(a, "cold"), (b, "cold"), (last, "hot")]);
    let dir = e.bucket_dir(&key);
    assert!(!dir.join(a.to_string()).exists() && !dir.join(b.to_string()).exists() && dir.join(last.to_string()).exists());
    let objs = objects(store.path());
    assert_eq!(objs.len(), 2, "{objs:?}");
    assert!(objs[0].starts_with(&format!("symbol=AAPL/timeframe=1H/attrgroup=OHLCV/year={a}/")), "{objs:?}");
    let info = e.info(&key).unwrap();
    assert_eq!(info.rows, 3000);
    assert_eq!(info.first_epoch, Some(year_start(a)));

    // Full read, a range across cold and hot, a projection, the tail and the head.
    let all = expected(&written);
    assert_eq!(rows_of(&e.read(&ReadRequest::key(&key)).unwrap()), all);
    let (s, t) = (year_start(b) + 500 * 3600, year_start(last) + 10 * 3600);
    let mut req = ReadRequest::key(&key);
    req.start = Some(TimePoint::secs(s));
    req.end = Some(TimePoint::secs(t));
    let want: Vec<Row> = all.iter().filter(|r| r.0 >= s && r.0 <= t).cloned().collect();
    assert_eq!(rows_of(&e.read(&req).unwrap()), want);
    req.columns = Some(vec!["Volume".into()]);
    let got = e.read(&req).unwrap();
    assert_eq!(got[0].schema.fields().len(), 2);
    assert_eq!(rows_of(&got).iter().map(|r| (r.0, r.2)).collect::<Vec<_>>(), want.iter().map(|r| (r.0, r.2)).collect::<Vec<_>>());
    let mut tail = ReadRequest::key(&key);
    tail.end = Some(TimePoint::secs(year_start(last) - 1));
    tail.limit = Some(5);
    assert_eq!(rows_of(&e.read(&tail).unwrap()), all[1995..2000].to_vec());
    let mut head = ReadRequest::key(&key);
    head.limit = Some(1500);
    head.from_start = true;
    assert_eq!(rows_of(&e.read(&head).unwrap()), all[..1500].to_vec());
    // Same-host reads carry cold years inline.
    let local = e.local_read(&ReadRequest::key(&key)).unwrap();
    assert_eq!(local[0].rows, 3000);

    // A restart reads the same (from the catalog snapshot or the files).
    rt().block_on(e.shutdown()).unwrap();
    drop(e);
    let e = open(&c);
    assert_eq!(tiers(&e, &key), vec![(a, "cold"), (b, "cold"), (last, "hot")]);
    assert_eq!(rows_of(&e.read(&ReadRequest::key(&key)).unwrap()), all);
    // Without the store configured the cold years cannot be read, and say why.
    rt().block_on(e.shutdown()).unwrap();
    drop(e);
    let e = open(&EngineConfig::new(root.path()));
    let err = e.read(&ReadRequest::key(&key)).unwrap_err().to_string();
    assert!(err.contains("tiering is not configured"), "{err}");
}

#[test]
fn a_write_into_a_cold_year_thaws_and_moves_it_again() {
    let (root, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let c = cfg(root.path(), store.path());
    let e = open(&c);
    let key = BucketKey::parse("MSFT/1H/OHLCV").unwrap();
    let mut written = setup(&e, &key);
    let [a, b, last] = years();
    let before = objects(store.path());
    // Overwrite 10 bars of the oldest year and add 5 after its last one.
    let over = bars(year_start(a) + 100 * 3600, 10, 9.25);
    let more = bars(year_start(a) + 1000 * 3600, 5, 1.0);
    let rt = rt();
    rt.block_on(e.write(&key, &over, WriteOptions::default())).unwrap();
    rt.block_on(e.write(&key, &more, WriteOptions::default())).unwrap();
    assert_eq!(tiers(&e, &key), vec![(a, "hot"), (b, "cold"), (last, "hot")]);
    let mut want = expected(&written);
    for r in expected(&[over.clone()]) {
        let i = want.iter().position(|w| w.0 == r.0).unwrap();
        want[i] = r;
    }
    want.extend(expected(&[more.clone()]));
    want.sort_by_key(|r| r.0);
    assert_eq!(rows_of(&e.read(&ReadRequest::key(&key)).unwrap()), want);
    // The next checkpoint writes a new object (copy-on-write) and the old one is gone.
    rt.block_on(e.checkpoint()).unwrap();
    assert_eq!(tiers(&e, &key), vec![(a, "cold"), (b, "cold"), (last, "hot")]);
    let after = objects(store.path());
    assert_eq!(after.len(), 2);
    assert!(!after.contains(&before[0]) && after.contains(&before[1]), "{before:?} -> {after:?}");
    assert_eq!(rows_of(&e.read(&ReadRequest::key(&key)).unwrap()), want);

    // A crash after the write (no checkpoint): replay is idempotent on thawed and cold years.
    let over2 = bars(year_start(b) + 3 * 3600, 2, 4.5);
    rt.block_on(e.write(&key, &over2, WriteOptions::default())).unwrap();
    drop(e); // no shutdown: what was not checkpointed is replayed from the log at the next open
    let e = open(&c);
    for r in expected(&[over2]) {
        let i = want.iter().position(|w| w.0 == r.0).unwrap();
        want[i] = r;
    }
    assert_eq!(rows_of(&e.read(&ReadRequest::key(&key)).unwrap()), want);
    written.clear();

    // A delete that covers a whole cold year drops its object; one that covers part of one thaws it.
    rt.block_on(e.checkpoint()).unwrap();
    let n = rt.block_on(e.delete_range(&key, TimePoint::secs(year_start(a)), TimePoint::secs(year_start(a + 1) - 1))).unwrap();
    assert_eq!(n, 1005);
    assert_eq!(tiers(&e, &key), vec![(b, "cold"), (last, "hot")]);
    assert_eq!(objects(store.path()).len(), 1);
    let n = rt.block_on(e.delete_range(&key, TimePoint::secs(year_start(b)), TimePoint::secs(year_start(b) + 9 * 3600))).unwrap();
    assert_eq!(n, 10);
    assert_eq!(e.info(&key).unwrap().rows, 1990);
    // Destroy removes the objects too.
    rt.block_on(e.destroy(&key)).unwrap();
    assert!(objects(store.path()).is_empty(), "{:?}", objects(store.path()));
}

#[test]
fn interrupted_moves_are_finished_or_undone_at_start() {
    let (root, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let key = BucketKey::parse("IBM/1H/OHLCV").unwrap();
    let [a, _, _] = years();
    // Years stay local while `after` is a century.
    let mut local_only = cfg(root.path(), store.path());
    if let Some(t) = local_only.tiering.as_mut() {
        t.after = std::time::Duration::from_secs(100 * 365 * 86_400);
    }
    let e = open(&local_only);
    let all = expected(&setup(&e, &key));
    assert!(tiers(&e, &key).iter().all(|t| t.1 == "hot"));
    rt().block_on(e.shutdown()).unwrap();
    drop(e);
    let dir = catalog::bucket_dir(root.path(), &key);

    // 1. Killed after the object was put, before the commit: `cold.json` lists it as pending, the year's
    //    files are intact. The start deletes the object; the year stays local.
    let name = ColdStore::object_name(&key, a, 7);
    let obj = store.path().join(&name);
    std::fs::create_dir_all(obj.parent().unwrap()).unwrap();
    std::fs::write(&obj, b"a complete object nobody committed").unwrap();
    tier::ColdManifest { years: Vec::new(), pending: vec![name.clone()] }.store(&dir).unwrap();
    let e = open(&local_only);
    assert!(!obj.exists(), "the pending object was not deleted");
    assert!(!dir.join(tier::COLD_FILE).exists());
    assert_eq!(rows_of(&e.read(&ReadRequest::key(&key)).unwrap()), all);
    rt().block_on(e.shutdown()).unwrap();
    drop(e);

    // 2. Killed after the commit, before the local files were removed (here: files put back by hand,
    //    half of them): the start removes them and reads the year from the object.
    let c = cfg(root.path(), store.path());
    let e = open(&c);
    rt().block_on(e.checkpoint()).unwrap();
    let ydir = dir.join(a.to_string());
    assert!(!ydir.exists());
    rt().block_on(e.shutdown()).unwrap();
    drop(e);
    std::fs::create_dir_all(ydir.join("g1")).unwrap();
    std::fs::write(ydir.join("manifest.json"), b"{half a manifest").unwrap();
    let e = open(&c);
    assert!(!ydir.exists(), "the local files of a cold year were not removed");
    assert!(e.health().damaged.is_empty());
    assert_eq!(rows_of(&e.read(&ReadRequest::key(&key)).unwrap()), all);
}

#[test]
fn retention_deletes_the_objects_of_expired_cold_years() {
    let (root, store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut c = cfg(root.path(), store.path());
    let key = BucketKey::parse("RET/1H/OHLCV").unwrap();
    let [_, b, last] = years();
    let e = open(&c);
    let all = expected(&setup(&e, &key));
    assert_eq!(objects(store.path()).len(), 2);
    rt().block_on(e.shutdown()).unwrap();
    drop(e);
    // Keep everything from the start of year b: year a (cold) expires whole.
    let keep = chrono::Utc::now().timestamp() - year_start(b);
    c.retention = vec![RetentionRule { on: KeyPattern::parse("*/*/*").unwrap(), keep: std::time::Duration::from_secs(keep as u64) }];
    let e = open(&c);
    rt().block_on(e.checkpoint()).unwrap();
    assert_eq!(tiers(&e, &key), vec![(b, "cold"), (last, "hot")]);
    let objs = objects(store.path());
    assert_eq!(objs.len(), 1, "{objs:?}");
    assert!(objs[0].contains(&format!("year={b}/")), "{objs:?}");
    let left: Vec<Row> = all.iter().filter(|r| r.0 >= year_start(b)).cloned().collect();
    assert_eq!(rows_of(&e.read(&ReadRequest::key(&key)).unwrap()), left);
}
