//! Engine tests in-process: replay idempotency, copy-on-write merges, zero-copy reads.

use std::sync::Arc;
use chrono::{Datelike, TimeZone};

use arrow::array::{Array, AsArray, Float32Array, Int32Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};

use super::*;

fn bars(epochs: &[i64], open: &[f32]) -> RecordBatch {
    let s = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false), Field::new("Open", DataType::Float32, false)]));
    RecordBatch::try_new(s, vec![Arc::new(Int64Array::from(epochs.to_vec())), Arc::new(Float32Array::from(open.to_vec()))]).unwrap()
}

fn ticks(epochs: &[i64], nanos: &[i32], px: &[f32]) -> RecordBatch {
    let s = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Int64, false),
        Field::new("Price", DataType::Float32, false),
        Field::new("Nanoseconds", DataType::Int32, false),
    ]));
    RecordBatch::try_new(
        s,
        vec![Arc::new(Int64Array::from(epochs.to_vec())), Arc::new(Float32Array::from(px.to_vec())), Arc::new(Int32Array::from(nanos.to_vec()))],
    )
    .unwrap()
}

fn read_all(e: &Engine, key: &BucketKey) -> (Vec<i64>, Vec<f32>) {
    let r = e.read(&ReadRequest::key(key)).unwrap();
    let mut ep = vec![];
    let mut v = vec![];
    for b in &r[0].batches {
        ep.extend(b.column(0).as_primitive::<arrow::datatypes::TimestampSecondType>().values().iter().copied());
        v.extend(b.column(1).as_primitive::<arrow::datatypes::Float32Type>().values().iter().copied());
    }
    (ep, v)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn fixed_upsert_merge_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("A/1Min/OHLCV").unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &bars(&[60, 120, 180], &[1.0, 2.0, 3.0]), WriteOptions::default()).await.unwrap();
        // Out of order + overwrite + within-batch duplicate (last wins) + truncation of 125 -> 120.
        e.write(&key, &bars(&[0, 125, 121], &[0.5, 9.0, 8.0]), WriteOptions::default()).await.unwrap();
        assert_eq!(read_all(&e, &key), (vec![0, 60, 120, 180], vec![0.5, 1.0, 8.0, 3.0]));
        // In-order append after the merge, no checkpoint, then "crash" (drop without shutdown).
        e.write(&key, &bars(&[240], &[4.0]), WriteOptions::default()).await.unwrap();
        drop(e);
    });
    rt().block_on(async {
        // The lock is held by the dropped engine's writer thread only until it exits; wait for it.
        let e = loop {
            match Engine::open(EngineConfig::new(dir.path())) {
                Ok(e) => break e,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        assert_eq!(read_all(&e, &key), (vec![0, 60, 120, 180, 240], vec![0.5, 1.0, 8.0, 3.0, 4.0]));
        e.shutdown().await.unwrap();
    });
}

#[test]
fn ticks_keep_duplicates_in_order_across_years() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("T/1Sec/TICK").unwrap();
    let y2024 = 1_704_067_200; // 2024-01-01T00:00:00Z
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &ticks(&[y2024 - 1, y2024, y2024], &[5, 7, 7], &[1.0, 2.0, 3.0]), WriteOptions::default()).await.unwrap();
        e.write(&key, &ticks(&[y2024, y2024 - 1], &[7, 1], &[4.0, 0.5]), WriteOptions::default()).await.unwrap();
        let r = e.read(&ReadRequest::key(&key)).unwrap();
        assert_eq!(r[0].batches.len(), 2, "one batch per year partition");
        let (ep, px) = read_all(&e, &key);
        assert_eq!(ep, vec![y2024 - 1, y2024 - 1, y2024, y2024, y2024]);
        assert_eq!(px, vec![0.5, 1.0, 2.0, 3.0, 4.0]);
        // Nanosecond-precise range: (y2024, 7) inclusive both ends.
        let mut q = ReadRequest::key(&key);
        q.start = Some(TimePoint { secs: y2024, nanos: 7 });
        q.end = Some(TimePoint { secs: y2024, nanos: 7 });
        let r = e.read(&q).unwrap();
        assert_eq!(r[0].rows, 3);
        e.shutdown().await.unwrap();
    });
}

/// Reads hand out buffers that live inside the mapped column file (checked against /proc/self/maps).
#[test]
fn reads_are_zero_copy_views_of_the_mapped_files() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("Z/1Min/OHLCV").unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        let ep: Vec<i64> = (0..10_000).map(|i| i * 60).collect();
        let px: Vec<f32> = (0..10_000).map(|i| i as f32).collect();
        e.write(&key, &bars(&ep, &px), WriteOptions::default()).await.unwrap();
        let r = e.read(&ReadRequest::key(&key)).unwrap();
        let col = r[0].batches[0].column(1).to_data();
        let addr = col.buffers()[0].as_ptr() as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let hit = maps.lines().find(|l| {
            let range = l.split_whitespace().next().unwrap_or("");
            let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
            let (a, b) = (usize::from_str_radix(a, 16).unwrap_or(0), usize::from_str_radix(b, 16).unwrap_or(0));
            a <= addr && addr < b
        });
        let line = hit.expect("buffer address is mapped");
        assert!(line.contains(dir.path().to_str().unwrap()) && line.ends_with(".f32"), "buffer is not in the column file mapping: {line}");
        // And the values are right.
        assert_eq!(r[0].batches[0].column(1).as_primitive::<arrow::datatypes::Float32Type>().value(9_999), 9_999.0);
        e.shutdown().await.unwrap();
    });
}

#[test]
fn bad_writes_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("B/1Min/OHLCV").unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &bars(&[60], &[1.0]), WriteOptions::default()).await.unwrap();
        let extra = {
            let s = Arc::new(Schema::new(vec![
                Field::new("Epoch", DataType::Int64, false),
                Field::new("Open", DataType::Float32, false),
                Field::new("Bogus", DataType::Float32, false),
            ]));
            RecordBatch::try_new(s, vec![Arc::new(Int64Array::from(vec![120])), Arc::new(Float32Array::from(vec![2.0])), Arc::new(Float32Array::from(vec![3.0]))]).unwrap()
        };
        let err = e.write(&key, &extra, WriteOptions::default()).await.unwrap_err();
        assert!(err.to_string().contains("unable to match data columns"), "{err}");
        let f64epoch = {
            let s = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Float64, false), Field::new("Open", DataType::Float32, false)]));
            RecordBatch::try_new(s, vec![Arc::new(arrow::array::Float64Array::from(vec![120.0])), Arc::new(Float32Array::from(vec![2.0]))]).unwrap()
        };
        assert!(e.write(&key, &f64epoch, WriteOptions::default()).await.unwrap_err().to_string().contains("Epoch"));
        assert_eq!(read_all(&e, &key), (vec![60], vec![1.0]));
        assert!(e.delete_range(&key, TimePoint::secs(0), TimePoint::secs(100)).await.unwrap() == 1);
        assert_eq!(read_all(&e, &key), (vec![], vec![]));
        e.destroy(&key).await.unwrap();
        assert!(e.read(&ReadRequest::key(&key)).is_err());
        assert!(!dir.path().join("B").exists());
        e.shutdown().await.unwrap();
    });
}

/// Concurrent writers share fsyncs: many acknowledged writes, fewer log syncs.
#[test]
fn group_commit_shares_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        // Create the buckets first (creation is synced on its own).
        for k in 0..16 {
            let key = BucketKey::parse(&format!("S{k}/1Min/OHLCV")).unwrap();
            e.write(&key, &bars(&[0], &[0.0]), WriteOptions::default()).await.unwrap();
        }
        let (s0, r0) = e.wal_stats();
        let mut tasks = Vec::new();
        for k in 0..16 {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                let key = BucketKey::parse(&format!("S{k}/1Min/OHLCV")).unwrap();
                for i in 1..=20i64 {
                    e.write(&key, &bars(&[i * 60], &[i as f32]), WriteOptions::default()).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (s1, r1) = e.wal_stats();
        assert_eq!(r1 - r0, 320);
        assert!(s1 - s0 < 320, "expected shared fsyncs, got {} syncs for 320 writes", s1 - s0);
        for k in 0..16 {
            let key = BucketKey::parse(&format!("S{k}/1Min/OHLCV")).unwrap();
            assert_eq!(e.info(&key).unwrap().rows, 21);
        }
        e.shutdown().await.unwrap();
    });
}

/// Appends to one bucket submitted without waiting for each other share fsyncs; writes that are not
/// appends after the group's (an overwrite, ticks, another year) still see the rows before them; all of it
/// replays after a crash exactly as acknowledged.
#[test]
fn appends_to_one_bucket_share_fsyncs_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("ONE/1Min/OHLCV").unwrap();
    let tick = BucketKey::parse("ONE/1Sec/TICK").unwrap();
    let y2025 = 1_735_689_600i64;
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &bars(&[0], &[0.0]), WriteOptions::default()).await.unwrap();
        e.write(&tick, &ticks(&[0], &[5], &[0.5]), WriteOptions::default()).await.unwrap();
        let (s0, r0) = e.wal_stats();
        let mut pending = Vec::new();
        for i in 1..=100i64 {
            pending.push(e.submit_write(&key, &bars(&[i * 60], &[i as f32]), WriteOptions::default()).await.unwrap());
            // Ticks at the same second as the last one keep arrival order.
            pending.push(e.submit_write(&tick, &ticks(&[i / 2], &[5], &[i as f32]), WriteOptions::default()).await.unwrap());
        }
        // An overwrite of an interval the pending appends wrote, then an append into the next year.
        pending.push(e.submit_write(&key, &bars(&[30 * 60], &[-30.0]), WriteOptions::default()).await.unwrap());
        pending.push(e.submit_write(&key, &bars(&[y2025], &[2025.0]), WriteOptions::default()).await.unwrap());
        pending.push(e.submit_write(&key, &bars(&[101 * 60], &[101.0]), WriteOptions::default()).await.unwrap());
        for p in pending {
            assert_eq!(p.durable().await.unwrap().rows, 1);
        }
        let (s1, r1) = e.wal_stats();
        assert_eq!(r1 - r0, 203);
        assert!(s1 - s0 < 203, "expected appends to one bucket to share fsyncs, got {} syncs for 203 writes", s1 - s0);
        drop(e); // no checkpoint: everything comes back from the log
    });
    let mut want_e: Vec<i64> = (0..=101).map(|i| i * 60).collect();
    let mut want_v: Vec<f32> = (0..=101).map(|i| i as f32).collect();
    want_v[30] = -30.0;
    want_e.push(y2025);
    want_v.push(2025.0);
    let check = |e: &Engine| {
        assert_eq!(read_all(e, &key), (want_e.clone(), want_v.clone()));
        assert_eq!(read_all(e, &tick).1, std::iter::once(0.5).chain((1..=100).map(|i| i as f32)).collect::<Vec<_>>());
    };
    rt().block_on(async {
        let e = reopen(dir.path());
        check(&e);
        e.shutdown().await.unwrap();
    });
}

/// Open again once the previous ("crashed", i.e. dropped) engine's writer thread has released the lock.
fn reopen(dir: &std::path::Path) -> Engine {
    reopen_with(EngineConfig::new(dir))
}

fn reopen_with(cfg: EngineConfig) -> Engine {
    try_reopen(cfg).unwrap()
}

fn try_reopen(cfg: EngineConfig) -> Result<Engine> {
    for _ in 0..500 {
        match Engine::open(cfg.clone()) {
            Err(EngineError::Unavailable(m)) if m.contains("in use") => std::thread::sleep(std::time::Duration::from_millis(20)),
            other => return other,
        }
    }
    Engine::open(cfg)
}

/// Bulk appends skip the log copy; they must replay exactly, interleaved with small logged writes,
/// across years, and a large out-of-order write must fall back to the merge path.
#[test]
fn bulk_direct_appends_replay_without_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("D/1Min/OHLCV").unwrap();
    let n = 100_000i64;
    let y2024 = 1_704_067_200i64;
    let first: Vec<i64> = (0..n).map(|i| y2024 - 50_000 * 60 + i * 60).collect(); // spans New Year
    rt().block_on(async {
        let mut cfg = EngineConfig::new(dir.path());
        cfg.checkpoint_interval = std::time::Duration::from_secs(3600);
        let e = Engine::open(cfg).unwrap();
        e.write(&key, &bars(&[first[0] - 120], &[-1.0]), WriteOptions::default()).await.unwrap(); // small, logged
        let px: Vec<f32> = (0..n).map(|i| i as f32).collect();
        e.write(&key, &bars(&first, &px), WriteOptions::default()).await.unwrap(); // bulk, direct
        let last = *first.last().unwrap();
        e.write(&key, &bars(&[last + 60], &[7.0]), WriteOptions::default()).await.unwrap(); // small, logged
        // Large but out of order (overwrites the first 40k bars): merge path.
        let over: Vec<i64> = first[..40_000].to_vec();
        e.write(&key, &bars(&over, &vec![3.0; 40_000]), WriteOptions::default()).await.unwrap();
        let (ep, v) = read_all(&e, &key);
        assert_eq!(ep.len(), n as usize + 2);
        assert_eq!((v[0], v[1], v[40_000], v[40_001], *v.last().unwrap()), (-1.0, 3.0, 3.0, 40_000.0, 7.0));
        drop(e); // crash: no checkpoint
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        let (ep, v) = read_all(&e, &key);
        assert_eq!(ep.len(), n as usize + 2);
        assert_eq!((v[0], v[1], v[40_000], v[40_001], *v.last().unwrap()), (-1.0, 3.0, 3.0, 40_000.0, 7.0));
        assert!(ep.windows(2).all(|w| w[0] < w[1]));
        // Another bulk append after recovery, then a clean restart.
        let more: Vec<i64> = (0..50_000).map(|i| ep.last().unwrap() + 60 * (i + 1)).collect();
        e.write(&key, &bars(&more, &vec![9.0; 50_000]), WriteOptions::default()).await.unwrap();
        e.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        assert_eq!(e.info(&key).unwrap().rows, n as usize + 2 + 50_000);
        e.shutdown().await.unwrap();
    });
}

fn generations(dir: &std::path::Path, key: &BucketKey, year: i32) -> Vec<String> {
    let p = dir.join(&key.symbol).join(&key.timeframe).join(&key.attr_group).join(year.to_string());
    let mut g: Vec<String> = std::fs::read_dir(p).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('g')).collect();
    g.sort();
    g
}

/// A live feed re-sending its newest bars: the first overwrite near the end copies the partition once, the
/// next ones are written in place — and a reader's snapshot taken before never changes.
#[test]
fn tail_overwrites_are_in_place_and_keep_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("LIVE/1Min/OHLCV").unwrap();
    let n = 5_000i64;
    let ep: Vec<i64> = (0..n).map(|i| 1_700_000_000 - 1_700_000_000 % 60 + i * 60).collect();
    let year = chrono::Utc.timestamp_opt(ep[0], 0).unwrap().year();
    let last = ep[n as usize - 1];
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        let px: Vec<f32> = (0..n).map(|i| i as f32).collect();
        e.write(&key, &bars(&ep, &px), WriteOptions::default()).await.unwrap();
        // First overwrite of the newest bar: copy-on-write, the partition turns hot.
        e.write(&key, &bars(&[last], &[-1.0]), WriteOptions::default()).await.unwrap();
        // The manifest's generation stays on disk until the next checkpoint names the new one.
        assert_eq!(generations(dir.path(), &key, year).len(), 2);
        e.checkpoint().await.unwrap();
        let g_hot = generations(dir.path(), &key, year);
        assert_eq!(g_hot.len(), 1);
        let before = e.read(&ReadRequest::key(&key)).unwrap();
        // Next ones: in place (same generation), and a mix of overwrites and appends in one write.
        e.write(&key, &bars(&[last], &[-2.0]), WriteOptions::default()).await.unwrap();
        e.write(&key, &bars(&[last - 60, last, last + 60], &[-3.0, -4.0, -5.0]), WriteOptions::default()).await.unwrap();
        assert_eq!(generations(dir.path(), &key, year), g_hot, "tail overwrites must not copy the partition");
        // The old snapshot still shows what it showed.
        let old_tail: Vec<f32> = before[0].batches.iter().flat_map(|b| b.column(1).as_primitive::<arrow::datatypes::Float32Type>().values().to_vec()).collect();
        assert_eq!(old_tail.len(), n as usize);
        assert_eq!(&old_tail[n as usize - 2..], &[(n - 2) as f32, -1.0]);
        let (eps, vals) = read_all(&e, &key);
        assert_eq!(eps.len(), n as usize + 1);
        assert_eq!(&vals[n as usize - 3..], &[(n - 3) as f32, -3.0, -4.0, -5.0]);
        assert_eq!(*eps.last().unwrap(), last + 60);
        // Ranges across the mapped part and the heap tail, and limits.
        let mut r = ReadRequest::key(&key);
        r.start = Some(TimePoint::secs(last - 300));
        r.end = Some(TimePoint::secs(last));
        let got = e.read(&r).unwrap();
        assert_eq!(got[0].rows, 6);
        let v: Vec<f32> = got[0].batches.iter().flat_map(|b| b.column(1).as_primitive::<arrow::datatypes::Float32Type>().values().to_vec()).collect();
        assert_eq!(v, vec![(n - 6) as f32, (n - 5) as f32, (n - 4) as f32, (n - 3) as f32, -3.0, -4.0]);
        assert_eq!(e.info(&key).unwrap().last_epoch, Some(last + 60));
        // An overwrite far from the end still merges (a new generation), correctly.
        e.write(&key, &bars(&[ep[10]], &[7.0]), WriteOptions::default()).await.unwrap();
        assert_eq!(read_all(&e, &key).1[10], 7.0);
        e.write(&key, &bars(&[last], &[-6.0]), WriteOptions::default()).await.unwrap();
        e.shutdown().await.unwrap();
    });
    // After a restart (replay or checkpoint), the last values stand.
    rt().block_on(async {
        let e = reopen(dir.path()); // the writer thread may still hold the lock for a moment after shutdown
        let (eps, vals) = read_all(&e, &key);
        assert_eq!(eps.len(), n as usize + 1);
        assert_eq!(&vals[n as usize - 1..], &[-6.0, -5.0]);
        assert_eq!(vals[10], 7.0);
        e.shutdown().await.unwrap();
    });
}

/// In-place tail overwrites are logged first: a crash before any checkpoint replays them.
#[test]
fn tail_overwrites_replay_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("CRASHT/1Min/OHLCV").unwrap();
    let ep: Vec<i64> = (0..500).map(|i| 1_700_000_040 + i * 60).collect();
    let last = ep[499];
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &bars(&ep, &vec![1.0; 500]), WriteOptions::default()).await.unwrap();
        for v in 0..5 {
            e.write(&key, &bars(&[last], &[v as f32]), WriteOptions::default()).await.unwrap();
        }
        drop(e); // crash: no checkpoint
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        let (eps, vals) = read_all(&e, &key);
        assert_eq!(eps.len(), 500);
        assert_eq!(vals[499], 4.0);
        assert_eq!(vals[498], 1.0);
        e.shutdown().await.unwrap();
    });
}

/// Readers racing in-place tail overwrites always see whole writes: each write sets the last three bars to
/// one value, so any snapshot must show three equal values.
#[test]
fn tail_overwrites_never_tear_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("RACE/1Min/OHLCV").unwrap();
    let ep: Vec<i64> = (0..2_000).map(|i| 1_700_000_040 + i * 60).collect();
    let tail = [ep[1_997], ep[1_998], ep[1_999]];
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &bars(&ep, &vec![0.0; 2_000]), WriteOptions::default()).await.unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (e, key, stop) = (e.clone(), key.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (_, v) = read_all(&e, &key);
                    let last3 = &v[v.len() - 3..];
                    assert!(last3[0] == last3[1] && last3[1] == last3[2], "torn snapshot: {last3:?}");
                    reads += 1;
                }
                reads
            })
        };
        for v in 1..300 {
            e.write(&key, &bars(&tail, &[v as f32; 3]), WriteOptions::default()).await.unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        assert_eq!(&read_all(&e, &key).1[1_997..], &[299.0; 3]);
        e.shutdown().await.unwrap();
    });
}

fn mapped_files_under(dir: &std::path::Path) -> usize {
    let d = dir.to_str().unwrap();
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.contains(d)).count()
}

/// A reopened catalog maps nothing until read; info needs no mapping; a read maps only the years it
/// touches.
#[test]
fn partitions_are_mapped_when_first_read() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("LAZY/1D/OHLCV").unwrap();
    // One bar a year for ten years: ten partitions.
    let ep: Vec<i64> = (0..10).map(|y| 1_262_304_000 + y * 366 * 86_400).collect();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &bars(&ep, &(0..10).map(|i| i as f32).collect::<Vec<_>>()), WriteOptions::default()).await.unwrap();
        e.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        assert_eq!(mapped_files_under(dir.path()), 0, "nothing mapped at start-up");
        let info = e.info(&key).unwrap();
        assert_eq!((info.rows, info.first_epoch, info.last_epoch), (10, Some(ep[0]), Some(ep[9])));
        assert_eq!(mapped_files_under(dir.path()), 0, "info needs no mapping");
        // A range inside one year maps that year only (Epoch + Open = 2 files).
        let mut r = ReadRequest::key(&key);
        r.start = Some(TimePoint::secs(ep[3] - 10));
        r.end = Some(TimePoint::secs(ep[3] + 10));
        let got = e.read(&r).unwrap();
        assert_eq!(got[0].rows, 1);
        assert_eq!(got[0].batches[0].column(1).as_primitive::<arrow::datatypes::Float32Type>().value(0), 3.0);
        assert_eq!(mapped_files_under(dir.path()), 2);
        let (eps, vals) = read_all(&e, &key);
        assert_eq!((eps, vals), (ep.clone(), (0..10).map(|i| i as f32).collect::<Vec<_>>()));
        // Writing to an unmapped partition maps it first (append, then an overwrite merge).
        e.write(&key, &bars(&[ep[9] + 86_400], &[10.0]), WriteOptions::default()).await.unwrap();
        e.write(&key, &bars(&[ep[0]], &[-1.0]), WriteOptions::default()).await.unwrap();
        let (eps, vals) = read_all(&e, &key);
        assert_eq!(eps.len(), 11);
        assert_eq!((vals[0], vals[10]), (-1.0, 10.0));
        assert_eq!(e.info(&key).unwrap().last_epoch, Some(ep[9] + 86_400));
        e.shutdown().await.unwrap();
    });
}

/// Past `max_mapped_files`, the least recently used partitions are unmapped at the next checkpoint tick,
/// and read again transparently.
#[test]
fn coldest_partitions_are_unmapped_past_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("COLD/1D/OHLCV").unwrap();
    let ep: Vec<i64> = (0..10).map(|y| 1_262_304_000 + y * 366 * 86_400).collect();
    let vals: Vec<f32> = (0..10).map(|i| i as f32).collect();
    rt().block_on(async {
        let mut cfg = EngineConfig::new(dir.path());
        cfg.max_mapped_files = 8; // 4 partitions of 2 files
        let e = Engine::open(cfg).unwrap();
        e.write(&key, &bars(&ep, &vals), WriteOptions::default()).await.unwrap();
        assert_eq!(mapped_files_under(dir.path()), 20);
        // Read the last three years again, so they are the most recently used.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut r = ReadRequest::key(&key);
        r.start = Some(TimePoint::secs(ep[7]));
        assert_eq!(e.read(&r).unwrap()[0].rows, 3);
        e.checkpoint().await.unwrap();
        // Down to 80% of the budget (6 files = 3 partitions): the three just read.
        assert_eq!(mapped_files_under(dir.path()), 6);
        let (eps, got) = read_all(&e, &key);
        assert_eq!((eps, got), (ep.clone(), vals.clone()));
        e.shutdown().await.unwrap();
    });
}

// ---- Issue #10: the fault review's defects, each reproduced ----

fn minute_bars(start: i64, n: usize, v: f32) -> RecordBatch {
    let ep: Vec<i64> = (0..n as i64).map(|i| start + 60 * i).collect();
    bars(&ep, &vec![v; n])
}

/// Defect 1: write, overwrite the newest bar (hot), bulk-append 40,000 rows (direct path with a checksum
/// of the column bytes), overwrite the newest bar again, crash: every restart used to fail with
/// "bulk append record: checksum mismatch".
#[test]
fn bulk_append_then_live_overwrite_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("LIVE/1Min/OHLCV").unwrap();
    let t0 = 1_704_067_200i64; // 2024-01-01
    rt().block_on(async {
        let mut cfg = EngineConfig::new(dir.path());
        cfg.checkpoint_interval = std::time::Duration::from_secs(3600);
        let e = Engine::open(cfg).unwrap();
        e.write(&key, &minute_bars(t0, 10, 1.0), WriteOptions::default()).await.unwrap();
        e.write(&key, &bars(&[t0 + 9 * 60], &[2.0]), WriteOptions::default()).await.unwrap(); // hot
        e.write(&key, &minute_bars(t0 + 600, 40_000, 3.0), WriteOptions::default()).await.unwrap(); // direct
        let newest = t0 + 600 + 39_999 * 60;
        e.write(&key, &bars(&[newest], &[4.0]), WriteOptions::default()).await.unwrap(); // overwrite newest
        let (ep, v) = read_all(&e, &key);
        assert_eq!((ep.len(), v[9], v[10], *v.last().unwrap()), (40_010, 2.0, 3.0, 4.0));
        drop(e); // kill -9: no checkpoint
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        let (ep, v) = read_all(&e, &key);
        assert_eq!((ep.len(), v[9], v[10], v[40_008], *v.last().unwrap()), (40_010, 2.0, 3.0, 3.0, 4.0));
        e.write(&key, &bars(&[t0 + 600 + 39_999 * 60], &[5.0]), WriteOptions::default()).await.unwrap();
        drop(e);
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        assert_eq!(*read_all(&e, &key).1.last().unwrap(), 5.0);
        e.shutdown().await.unwrap();
    });
}

fn only_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let segs = wal::list_segments(&dir.join(".wal")).unwrap();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs[0].1.clone()
}

/// Defect 2: one bit flipped in the middle of a segment used to be treated as a torn tail: the segment was
/// cut there, 101 of 200 acknowledged rows vanished and later LSNs were reused. Now start-up refuses and
/// changes nothing; `recover_wal` keeps every readable record, quarantines the original, and LSNs go on
/// after the highest one ever written.
#[test]
fn flipped_bit_mid_log_refuses_to_start_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("F/1Min/OHLCV").unwrap();
    let t0 = 1_704_067_200i64;
    let mut last_lsn = 0;
    rt().block_on(async {
        let mut cfg = EngineConfig::new(dir.path());
        cfg.checkpoint_interval = std::time::Duration::from_secs(3600);
        let e = Engine::open(cfg).unwrap();
        for i in 0..200 {
            last_lsn = e.write(&key, &bars(&[t0 + 60 * i], &[i as f32]), WriteOptions::default()).await.unwrap().lsn;
        }
        drop(e);
    });
    let seg = only_segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = wal::segment_end(&seg).unwrap() as usize / 2; // the middle of the records, not of the zero-filled file
    bytes[mid] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    let err = match try_reopen(EngineConfig::new(dir.path())) {
        Ok(_) => panic!("a damaged log must not start"),
        Err(e) => e,
    };
    assert!(matches!(err, EngineError::LogDamaged(_)), "{err}");
    assert!(err.to_string().contains("recover-wal"), "{err}");
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "a refused start changes nothing");
    // A torn tail on top of that is still only a tail: the damage is what stops start-up.
    let rec = recover_wal(dir.path()).unwrap();
    assert_eq!(rec.dropped.len(), 1, "{:?}", rec.dropped);
    assert!(rec.dropped[0].before_lsn.is_some());
    assert_eq!(std::fs::read(&rec.quarantined[0]).unwrap(), bytes, "the damaged segment is kept as it was");
    rt().block_on(async {
        let e = reopen(dir.path());
        let (ep, _) = read_all(&e, &key);
        assert_eq!(ep.len(), 199, "exactly the one damaged record is lost");
        let ack = e.write(&key, &bars(&[t0 + 60 * 500], &[1.0]), WriteOptions::default()).await.unwrap();
        assert!(ack.lsn > last_lsn, "LSNs are never reused ({} <= {last_lsn})", ack.lsn);
        e.shutdown().await.unwrap();
    });
}

/// A torn tail (the last record cut short by a crash) is still cut silently, keeping everything before.
#[test]
fn torn_tail_is_cut_silently() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("T/1Min/OHLCV").unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        for i in 0..20 {
            e.write(&key, &bars(&[60 * i], &[i as f32]), WriteOptions::default()).await.unwrap();
        }
        drop(e);
    });
    let seg = only_segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let end = wal::segment_end(&seg).unwrap() as usize;
    assert!(bytes.len() > end && bytes[end..].iter().all(|&b| b == 0), "the segment is zero-filled after its records");
    bytes[end - 5..end].fill(0); // the last record loses its end, inside the zero-filled space
    std::fs::write(&seg, &bytes).unwrap();
    rt().block_on(async {
        let e = reopen(dir.path());
        assert_eq!(read_all(&e, &key).0.len(), 19);
        e.shutdown().await.unwrap();
    });
}

/// Defect 4: a write with 65,600 columns used to overflow the log's 16-bit column count and turn the whole
/// engine read-only. Now it is refused before logging; the engine keeps writing and restarts.
#[test]
fn too_many_columns_refused_before_logging() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        let mut fields = vec![Field::new("Epoch", DataType::Int64, false)];
        let mut cols: Vec<arrow::array::ArrayRef> = vec![Arc::new(Int64Array::from(vec![60]))];
        for i in 0..65_600 {
            fields.push(Field::new(format!("c{i}"), DataType::Float32, false));
            cols.push(Arc::new(Float32Array::from(vec![1.0])));
        }
        let wide = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
        let key = BucketKey::parse("W/1Min/OHLCV").unwrap();
        let err = e.write(&key, &wide, WriteOptions::default()).await.unwrap_err();
        assert!(matches!(err, EngineError::InvalidInput(_)) && err.to_string().contains("at most"), "{err}");
        assert!(e.keys().is_empty());
        let ok = BucketKey::parse("OK/1Min/OHLCV").unwrap();
        e.write(&ok, &bars(&[60], &[1.0]), WriteOptions::default()).await.unwrap();
        assert!(e.health().writable);
        drop(e);
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        assert_eq!(e.keys().len(), 1);
        e.shutdown().await.unwrap();
    });
}

/// Defect 5: a bucket whose files are damaged used to vanish from the catalog with one log line, its log
/// records trimmed anyway, and rows written to it later acknowledged and lost. Now it is reported damaged,
/// refuses reads and writes with that reason, the rest of the engine works, and its records are held
/// across checkpoints until its files are restored.
#[test]
fn damaged_bucket_is_isolated_and_its_log_held() {
    let dir = tempfile::tempdir().unwrap();
    let bad = BucketKey::parse("BAD/1Min/OHLCV").unwrap();
    let good = BucketKey::parse("GOOD/1Min/OHLCV").unwrap();
    rt().block_on(async {
        let mut cfg = EngineConfig::new(dir.path());
        cfg.checkpoint_interval = std::time::Duration::from_secs(3600);
        let e = Engine::open(cfg).unwrap();
        e.write(&bad, &minute_bars(0, 5, 1.0), WriteOptions::default()).await.unwrap();
        e.write(&good, &minute_bars(0, 5, 2.0), WriteOptions::default()).await.unwrap();
        drop(e); // the rows are only in the log
    });
    let bj = dir.path().join("BAD/1Min/OHLCV/bucket.json");
    let saved = std::fs::read(&bj).unwrap();
    std::fs::write(&bj, &saved[..saved.len() / 2]).unwrap(); // truncated
    rt().block_on(async {
        let e = reopen(dir.path());
        let h = e.health();
        assert_eq!(h.damaged.len(), 1, "{h:?}");
        assert_eq!(h.damaged[0].key, "BAD/1Min/OHLCV");
        assert!(h.writable);
        let err = e.read(&ReadRequest::key(&bad)).unwrap_err();
        assert!(matches!(err, EngineError::Damaged { .. }), "{err}");
        let err = e.write(&bad, &minute_bars(600, 1, 9.0), WriteOptions::default()).await.unwrap_err();
        assert!(matches!(err, EngineError::Damaged { .. }), "{err}");
        assert!(matches!(e.info(&bad).unwrap_err(), EngineError::Damaged { .. }));
        assert_eq!(read_all(&e, &good).1, vec![2.0; 5]);
        e.write(&good, &minute_bars(300, 1, 3.0), WriteOptions::default()).await.unwrap();
        e.checkpoint().await.unwrap(); // trims the log: BAD's records must survive it
        e.shutdown().await.unwrap();
    });
    std::fs::write(&bj, &saved).unwrap(); // the operator restores the file
    rt().block_on(async {
        let e = reopen(dir.path());
        assert!(e.health().damaged.is_empty());
        assert_eq!(read_all(&e, &bad).1, vec![1.0; 5], "held records replayed after repair");
        assert_eq!(read_all(&e, &good).1, vec![2.0, 2.0, 2.0, 2.0, 2.0, 3.0]);
        e.shutdown().await.unwrap();
    });
}

/// Destroying a damaged bucket gives it up: its files and held records go.
#[test]
fn destroying_a_damaged_bucket_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let bad = BucketKey::parse("BAD/1Min/OHLCV").unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&bad, &minute_bars(0, 5, 1.0), WriteOptions::default()).await.unwrap();
        e.shutdown().await.unwrap();
    });
    let year = dir.path().join("BAD/1Min/OHLCV/1970/manifest.json");
    std::fs::remove_file(&year).unwrap();
    rt().block_on(async {
        let e = reopen(dir.path());
        assert_eq!(e.health().damaged.len(), 1);
        e.destroy(&bad).await.unwrap();
        assert!(e.health().damaged.is_empty());
        e.write(&bad, &minute_bars(0, 2, 7.0), WriteOptions::default()).await.unwrap();
        e.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        assert_eq!(read_all(&e, &bad).1, vec![7.0; 2]);
        e.shutdown().await.unwrap();
    });
}

// ---- Disk full, on a real size-limited filesystem (tmpfs; needs root, skipped otherwise) ----

/// A tmpfs of `kib` KiB mounted on a fresh temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(kib: usize) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("skipping: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// Fill the filesystem with a filler file until the disk is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.path().join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.dir.path().join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Defect 6: a full disk during appends, a merge, a bulk append and a checkpoint. Each failing write gets a
/// clear error and changes nothing; acknowledged rows stay; reads go on; writes resume when space is freed,
/// without a restart; a write reported as failed never reappears after a restart.
#[test]
fn disk_full_fails_cleanly_and_writes_resume() {
    let Some(fs) = Tmpfs::mount(6 * 1024) else { return };
    let key = BucketKey::parse("FULL/1Min/OHLCV").unwrap();
    let t0 = 1_704_067_200i64;
    rt().block_on(async {
        let mut cfg = EngineConfig::new(fs.root());
        cfg.checkpoint_interval = std::time::Duration::from_secs(3600);
        let e = Engine::open(cfg).unwrap();
        e.write(&key, &minute_bars(t0, 100, 1.0), WriteOptions::default()).await.unwrap();
        e.checkpoint().await.unwrap();
        e.write(&key, &bars(&[t0 + 100 * 60], &[2.0]), WriteOptions::default()).await.unwrap(); // dirty
        fs.fill();
        // An append that needs new blocks, an out-of-order write (a merge: a new generation), a bulk
        // append (direct path), and a checkpoint (a new manifest file): all fail, none halts the engine.
        let append = e.write(&key, &minute_bars(t0 + 6000, 50_000, 9.0), WriteOptions::default()).await;
        let merge = e.write(&key, &bars(&[t0 - 60], &[9.0]), WriteOptions::default()).await;
        let bulk = e.write(&key, &minute_bars(t0 + 6000, 40_000, 9.0), WriteOptions::default()).await;
        for r in [&append, &merge, &bulk] {
            let err = r.as_ref().unwrap_err();
            assert!(err.is_disk_full(), "expected a disk-full error, got {err}");
        }
        let cp = e.checkpoint().await;
        assert!(cp.is_err(), "a checkpoint needs a new manifest file");
        let h = e.health();
        assert!(h.writable && h.halted.is_none() && h.checkpoint_error.is_some(), "{h:?}");
        let (ep, v) = read_all(&e, &key);
        assert_eq!(ep.len(), 101);
        assert!(v.iter().all(|&x| x != 9.0), "failed writes are not visible");
        fs.free();
        e.write(&key, &minute_bars(t0 + 6000, 1_000, 3.0), WriteOptions::default()).await.unwrap();
        e.write(&key, &bars(&[t0 - 60], &[4.0]), WriteOptions::default()).await.unwrap();
        e.checkpoint().await.unwrap();
        assert!(e.health().checkpoint_error.is_none());
        drop(e); // crash after the frees, with the failed writes' records long gone
    });
    rt().block_on(async {
        let e = reopen(&fs.root());
        let (ep, v) = read_all(&e, &key);
        assert!(v.iter().all(|&x| x != 9.0), "a write reported as failed reappeared after restart");
        assert_eq!(v[0], 4.0);
        assert_eq!(v.iter().filter(|&&x| x == 1.0).count(), 100);
        assert_eq!(ep.len(), 1_101); // the 3.0 bars start on the 2.0 bar
        assert_eq!(v.iter().filter(|&&x| x == 3.0).count(), 1_000);
        e.shutdown().await.unwrap();
    });
}

/// Start-up on a full disk: the log replays (reads see every acknowledged row), writes are refused with a
/// clear error until space is freed, then accepted without a restart.
#[test]
fn start_on_a_full_disk_is_read_only_until_space_is_freed() {
    let Some(fs) = Tmpfs::mount(4 * 1024) else { return };
    let key = BucketKey::parse("S/1Min/OHLCV").unwrap();
    rt().block_on(async {
        let mut cfg = EngineConfig::new(fs.root());
        cfg.checkpoint_interval = std::time::Duration::from_secs(3600);
        let e = Engine::open(cfg).unwrap();
        for i in 0..50 {
            e.write(&key, &bars(&[60 * i], &[i as f32]), WriteOptions::default()).await.unwrap();
        }
        drop(e); // crash: 50 acknowledged rows only in the log
    });
    fs.fill();
    rt().block_on(async {
        let mut cfg = EngineConfig::new(fs.root());
        cfg.checkpoint_interval = std::time::Duration::from_millis(100);
        let e = reopen_with(cfg);
        assert_eq!(read_all(&e, &key).0.len(), 50);
        let h = e.health();
        assert!(!h.writable, "{h:?}");
        let err = e.write(&key, &bars(&[6000], &[1.0]), WriteOptions::default()).await.unwrap_err();
        assert!(matches!(err, EngineError::Unavailable(_)) && err.to_string().contains("start-up"), "{err}");
        fs.free();
        let mut ok = false;
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            if e.health().writable {
                ok = true;
                break;
            }
        }
        assert!(ok, "writes resume once space is freed: {:?}", e.health());
        e.write(&key, &bars(&[6000], &[1.0]), WriteOptions::default()).await.unwrap();
        e.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let e = reopen(&fs.root());
        assert_eq!(read_all(&e, &key).0.len(), 51);
        e.shutdown().await.unwrap();
    });
}

/// The writer's queue holds byte permits; every one is returned after the writes.
#[test]
fn writer_queue_is_bounded_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        assert_eq!(e.health().queued_bytes, 0);
        let key = BucketKey::parse("Q/1Min/OHLCV").unwrap();
        let mut tasks = Vec::new();
        for i in 0..16 {
            let e = e.clone();
            let key = key.clone();
            tasks.push(tokio::spawn(async move { e.write(&key, &minute_bars(1_000_000 * i, 10_000, 1.0), WriteOptions::default()).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(e.health().queued_bytes, 0, "every permit is returned");
        assert_eq!(e.info(&key).unwrap().rows, 160_000);
        e.shutdown().await.unwrap();
    });
}

/// Found by the random kill test: after a crash and replay, an overwrite of the newest bar is in place at
/// run time (hot) but a merge at the next replay, so a bulk append logged after it expected a generation the
/// replay no longer had, and the bucket went offline. A bulk append now starts from a checkpointed partition.
#[test]
fn bulk_append_after_replayed_overwrite_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("K2/1Min/OHLCV").unwrap();
    let t0 = 1_704_067_200i64;
    let cfg = || {
        let mut c = EngineConfig::new(dir.path());
        c.checkpoint_interval = std::time::Duration::from_secs(3600);
        c
    };
    rt().block_on(async {
        let e = Engine::open(cfg()).unwrap();
        e.write(&key, &minute_bars(t0, 1, 1.0), WriteOptions::default()).await.unwrap();
        e.write(&key, &minute_bars(t0 + 60, 42_835, 2.0), WriteOptions::default()).await.unwrap();
        e.write(&key, &minute_bars(t0 + 60 * 42_836, 3, 3.0), WriteOptions::default()).await.unwrap();
        e.write(&key, &bars(&[t0 + 60 * 42_838], &[4.0]), WriteOptions::default()).await.unwrap();
        e.write(&key, &minute_bars(t0 + 60 * 42_839, 18, 5.0), WriteOptions::default()).await.unwrap();
        drop(e);
    });
    let newest = t0 + 60 * (42_839 + 17);
    rt().block_on(async {
        let e = reopen_with(cfg());
        e.write(&key, &bars(&[newest], &[6.0]), WriteOptions::default()).await.unwrap();
        e.write(&key, &minute_bars(newest + 60, 42_637, 7.0), WriteOptions::default()).await.unwrap();
        e.write(&key, &bars(&[newest + 60 * 42_637], &[8.0]), WriteOptions::default()).await.unwrap(); // newest
        drop(e);
    });
    rt().block_on(async {
        let e = reopen_with(cfg());
        assert!(e.health().damaged.is_empty(), "{:?}", e.health());
        let (ep, v) = read_all(&e, &key);
        assert_eq!(ep.len(), 1 + 42_835 + 3 + 18 + 42_637);
        assert_eq!((v[0], v[1], v[42_838], v[42_856 - 1 + 1], *v.last().unwrap()), (1.0, 2.0, 4.0, 6.0, 8.0));
        e.shutdown().await.unwrap();
    });
}

// ---- The catalog snapshot (start-up without reading every bucket's files) ----

fn snap_keys(n: usize) -> Vec<BucketKey> {
    (0..n).map(|i| BucketKey::parse(&format!("S{i:03}/1Min/OHLCV")).unwrap()).collect()
}

/// A clean stop writes `.catalog`; the next start takes every bucket from it and reads the same rows.
#[test]
fn snapshot_start_reads_no_bucket_files_and_sees_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    let keys = snap_keys(20);
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        for (i, k) in keys.iter().enumerate() {
            e.write(k, &minute_bars(0, 3 + i, i as f32), WriteOptions::default()).await.unwrap();
        }
        // A second year for one of them.
        e.write(&keys[0], &minute_bars(400 * 86400, 2, 7.0), WriteOptions::default()).await.unwrap();
        e.shutdown().await.unwrap();
    });
    assert!(dir.path().join(catalog::SNAPSHOT_FILE).exists());
    rt().block_on(async {
        let e = reopen(dir.path());
        let r = e.startup_report();
        assert_eq!((r.from_snapshot, r.from_files), (20, 0), "{r:?}");
        for (i, k) in keys.iter().enumerate().skip(1) {
            assert_eq!(read_all(&e, k).1, vec![i as f32; 3 + i]);
        }
        assert_eq!(read_all(&e, &keys[0]).1, vec![0.0, 0.0, 0.0, 7.0, 7.0]);
        // Writes after a snapshot start land and survive a crash (no clean stop).
        e.write(&keys[1], &minute_bars(3 * 60 + 60, 1, 9.0), WriteOptions::default()).await.unwrap();
        e.checkpoint().await.unwrap(); // switches keys[1]'s manifest: its directory time changes
        e.write(&keys[2], &minute_bars(0, 1, 5.0), WriteOptions::default()).await.unwrap(); // overwrite, in the log only
        drop(e);
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        let r = e.startup_report();
        assert!(r.from_files >= 1 && r.from_snapshot + r.from_files == 20, "{r:?}");
        assert_eq!(read_all(&e, &keys[1]).1, vec![1.0, 1.0, 1.0, 1.0, 9.0]);
        assert_eq!(read_all(&e, &keys[2]).1, vec![5.0, 2.0, 2.0, 2.0, 2.0]);
        e.shutdown().await.unwrap();
    });
}

/// Directories changed while the server was down are read from their files: a bucket copied in, one
/// destroyed by hand, a manifest removed (damage), a new year directory.
#[test]
fn snapshot_sees_changes_made_while_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let keys = snap_keys(4);
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        for k in &keys {
            e.write(k, &minute_bars(0, 3, 1.0), WriteOptions::default()).await.unwrap();
        }
        e.shutdown().await.unwrap();
    });
    let root = dir.path();
    // A copy of S000 under a new symbol (bucket.json names the new key), and one under S001 with a new timeframe.
    let copy = |from: &str, to: &str, key: &str| {
        let (src, dst) = (root.join(from), root.join(to));
        for entry in walk(&src) {
            let rel = entry.strip_prefix(&src).unwrap();
            let target = dst.join(rel);
            if entry.is_dir() {
                std::fs::create_dir_all(&target).unwrap();
            } else {
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                let mut bytes = std::fs::read(&entry).unwrap();
                if rel.to_str() == Some("bucket.json") {
                    let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    v["key"] = serde_json::Value::String(key.into());
                    bytes = serde_json::to_vec(&v).unwrap();
                }
                std::fs::write(&target, bytes).unwrap();
            }
        }
    };
    copy("S000/1Min/OHLCV", "NEW/1Min/OHLCV", "NEW/1Min/OHLCV");
    copy("S000/1Min/OHLCV", "S001/1Min/QUOTE", "S001/1Min/QUOTE");
    std::fs::remove_dir_all(root.join("S002/1Min/OHLCV")).unwrap();
    std::fs::remove_file(root.join("S003/1Min/OHLCV/1970/manifest.json")).unwrap();
    rt().block_on(async {
        let e = reopen(root);
        let got: Vec<String> = e.keys().iter().map(|k| k.to_string()).collect();
        assert_eq!(got, ["NEW/1Min/OHLCV", "S000/1Min/OHLCV", "S001/1Min/OHLCV", "S001/1Min/QUOTE"]);
        assert_eq!(read_all(&e, &BucketKey::parse("NEW/1Min/OHLCV").unwrap()).1, vec![1.0; 3]);
        let h = e.health();
        assert_eq!(h.damaged.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(), ["S003/1Min/OHLCV"], "{h:?}");
        e.shutdown().await.unwrap();
    });
    // The damaged bucket stays visible as damaged at the next start, which still uses the snapshot.
    rt().block_on(async {
        let e = reopen(root);
        assert_eq!(e.health().damaged.len(), 1);
        assert!(e.startup_report().from_snapshot >= 3, "{:?}", e.startup_report());
        e.shutdown().await.unwrap();
    });
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![p.to_path_buf()];
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

/// A snapshot that is damaged (a flipped byte) is ignored: every bucket is read from its files.
#[test]
fn damaged_snapshot_falls_back_to_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let keys = snap_keys(5);
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        for k in &keys {
            e.write(k, &minute_bars(0, 2, 3.0), WriteOptions::default()).await.unwrap();
        }
        e.shutdown().await.unwrap();
    });
    let path = dir.path().join(catalog::SNAPSHOT_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    rt().block_on(async {
        let e = reopen(dir.path());
        let r = e.startup_report();
        assert_eq!((r.from_snapshot, r.from_files), (0, 5), "{r:?}");
        for k in &keys {
            assert_eq!(read_all(&e, k).1, vec![3.0; 2]);
        }
        e.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        assert_eq!(e.startup_report().from_snapshot, 5, "rewritten after the fallback");
        e.shutdown().await.unwrap();
    });
}

/// Retention: `keep: 30d` on a bucket holding 3 years of daily bars leaves exactly the last 30 days after
/// the next checkpoint (whole expired years removed, the oldest partly expired one cut), through a restart;
/// buckets no rule matches keep everything.
#[test]
fn retention_keeps_exactly_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let day = 86_400i64;
    let today = chrono::Utc::now().timestamp().div_euclid(day) * day;
    let epochs: Vec<i64> = (0..3 * 365).rev().map(|k| today - k * day).collect();
    let daily = BucketKey::parse("AAPL/1D/OHLCV").unwrap();
    let other = BucketKey::parse("AAPL/1H/OHLCV").unwrap();
    let mut cfg = EngineConfig::new(dir.path());
    cfg.retention = vec![RetentionRule::parse("*/1D/*", "30d").unwrap()];
    let cutoff = chrono::Utc::now().timestamp() - 30 * day;
    let want: Vec<i64> = epochs.iter().copied().filter(|e| *e >= cutoff).collect();
    rt().block_on(async {
        let e = Engine::open(cfg.clone()).unwrap();
        e.write(&daily, &bars(&epochs, &vec![1.0; epochs.len()]), WriteOptions::default()).await.unwrap();
        e.write(&other, &bars(&epochs, &vec![2.0; epochs.len()]), WriteOptions::default()).await.unwrap();
        e.checkpoint().await.unwrap();
        assert_eq!(read_all(&e, &daily).0, want);
        assert_eq!(read_all(&e, &other).0.len(), epochs.len(), "no rule matches 1H");
        let (rows, bytes) = e.retention_stats();
        assert_eq!(rows as usize, epochs.len() - want.len());
        assert!(bytes >= rows * 8, "{bytes}");
        e.checkpoint().await.unwrap(); // removes the emptied years
        let years = e.info(&daily).unwrap().years;
        let year_dirs = std::fs::read_dir(dir.path().join("AAPL/1D/OHLCV")).unwrap().flatten().filter(|d| d.path().is_dir()).count();
        assert_eq!(year_dirs, years.len(), "{years:?}");
        drop(e); // no clean stop
    });
    rt().block_on(async {
        let e = reopen_with(cfg.clone());
        assert_eq!(read_all(&e, &daily).0, want);
        assert_eq!(read_all(&e, &other).0.len(), epochs.len());
        e.shutdown().await.unwrap();
    });
}

/// LSNs are never handed out twice across restarts, even when the newest change left no record or
/// partition behind (a destroy, then a clean stop that trimmed the log).
#[test]
fn lsns_are_not_reused_after_a_destroy_and_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let a = BucketKey::parse("A/1Min/OHLCV").unwrap();
    let b = BucketKey::parse("B/1Min/OHLCV").unwrap();
    let last = rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&a, &minute_bars(0, 2, 1.0), WriteOptions::default()).await.unwrap();
        let w = e.write(&b, &minute_bars(0, 2, 1.0), WriteOptions::default()).await.unwrap();
        e.destroy(&b).await.unwrap();
        e.shutdown().await.unwrap();
        w.lsn + 1 // the destroy's
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        let w = e.write(&a, &minute_bars(600, 1, 2.0), WriteOptions::default()).await.unwrap();
        assert!(w.lsn > last, "lsn {} handed out again (destroy was {last})", w.lsn);
        e.shutdown().await.unwrap();
    });
}

/// Replication's engine half: the change feed carries every applied change in log order (rows as stored),
/// a capture is an image at one position, and a follower's upstream position is durable with each change
/// it applies, across a crash and a checkpoint.
#[test]
fn change_feed_capture_and_durable_origin() {
    let master_dir = tempfile::tempdir().unwrap();
    let replica_dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("A/1Min/OHLCV").unwrap();
    let tick = BucketKey::parse("T/1Sec/TICK").unwrap();
    let mut cfg = EngineConfig::new(master_dir.path());
    cfg.change_window_bytes = 64 << 20;
    let (store, applied) = rt().block_on(async {
        let m = Engine::open(cfg.clone()).unwrap();
        assert_eq!(m.store_id().len(), 32);
        let mut cursor = m.changes_after(0).unwrap();
        m.write(&key, &bars(&[60, 120, 121], &[1.0, 2.0, 3.0]), WriteOptions::default()).await.unwrap();
        m.write(&tick, &ticks(&[5, 5], &[1, 2], &[9.0, 8.0]), WriteOptions::default()).await.unwrap();
        m.delete_range(&key, TimePoint::secs(60), TimePoint::secs(60)).await.unwrap();
        let image = m.capture().await.unwrap();
        m.destroy(&tick).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(cursor.next().await.unwrap());
        }
        let kinds: Vec<&str> = seen
            .iter()
            .map(|r| match &r.change {
                Change::Create { .. } => "create",
                Change::Write { .. } => "write",
                Change::Destroy { .. } => "destroy",
                Change::DeleteRange { .. } => "delete",
                Change::Alter { .. } => "alter",
            })
            .collect();
        assert_eq!(kinds, ["create", "write", "create", "write", "delete", "destroy"]);
        assert!(seen.windows(2).all(|w| w[0].lsn < w[1].lsn));
        // Rows as stored: 121 truncated to 120 and deduplicated (last wins).
        let Change::Write { batch, .. } = &seen[1].change else { panic!() };
        assert_eq!(batch.num_rows(), 2);
        // The image holds everything up to the delete and nothing after.
        assert_eq!(image.lsn, seen[4].lsn);
        assert_eq!(image.buckets.len(), 2);
        assert_eq!(image.buckets[0].batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
        assert_eq!(m.last_change_lsn(), seen[5].lsn);
        let store = m.store_id().to_string();
        m.shutdown().await.unwrap();
        drop((m, cursor));
        // After a restart the window starts at the last position: earlier ones are a gap, the last one
        // resumes (a replica that was caught up continues without an image).
        let m = reopen_with(cfg.clone());
        assert_eq!(m.store_id(), store);
        assert!(m.changes_after(seen[4].lsn).is_err());
        assert!(m.changes_after(seen[5].lsn).is_ok());
        drop(m);

        // The follower side: apply with positions, crash without a checkpoint, reopen.
        let r = Engine::open(EngineConfig::new(replica_dir.path())).unwrap();
        assert_eq!(r.origin(), Origin::default());
        r.mark_origin(Origin { source: store.clone(), position: 0 }).await.unwrap();
        for rec in &seen[..4] {
            r.apply(&rec.change, rec.lsn, false).await.unwrap();
        }
        assert_eq!(r.origin().position, seen[3].lsn);
        drop(r);
        (store, seen[3].lsn)
    });
    // Crashed (dropped) before any checkpoint: the position comes back from the log records.
    let r = reopen(replica_dir.path());
    assert_eq!(r.origin(), Origin { source: store.clone(), position: applied });
    assert_eq!(read_all(&r, &key).0, vec![60, 120]);
    // Checkpointed (the log trimmed): from the origin file.
    rt().block_on(r.shutdown()).unwrap();
    drop(r);
    let r = reopen(replica_dir.path());
    assert_eq!(r.origin(), Origin { source: store, position: applied });
    drop(r);
}

/// The zone day bars were placed in is recorded in the root: a restart under another zone is refused
/// while a fixed day-and-longer bucket holds rows, and the zone is simply re-recorded when none does.
#[test]
fn the_recorded_timezone_guards_day_bars() {
    let dir = tempfile::tempdir().unwrap();
    let ny = Some(chrono_tz::America::New_York);
    let in_zone = |tz: Option<chrono_tz::Tz>| {
        let mut cfg = EngineConfig::new(dir.path());
        cfg.timezone = tz;
        cfg
    };
    let minute = BucketKey::parse("M/1Min/OHLCV").unwrap();
    let daily = BucketKey::parse("D/1D/OHLCV").unwrap();
    rt().block_on(async {
        // Only sub-day rows: changing the zone changes nothing stored, so it is allowed and recorded.
        let e = reopen_with(in_zone(None));
        e.write(&minute, &bars(&[60], &[1.0]), WriteOptions::default()).await.unwrap();
        e.shutdown().await.unwrap();
        drop(e);
        assert_eq!(zone::recorded_timezone(dir.path()), Some(chrono_tz::UTC));
        let e = reopen_with(in_zone(ny));
        assert_eq!(zone::recorded_timezone(dir.path()), ny);
        // 2024-01-02 12:00 UTC is stored at 2024-01-02 00:00 New York (05:00 UTC).
        e.write(&daily, &bars(&[1_704_196_800], &[2.0]), WriteOptions::default()).await.unwrap();
        assert_eq!(read_all(&e, &daily), (vec![1_704_171_600], vec![2.0]));
        e.shutdown().await.unwrap();
        drop(e);
    });
    // UTC would read that bar as starting 05:00 into its day: refused, nothing changed.
    let err = try_reopen(in_zone(None)).err().expect("a zone change over stored day bars is refused").to_string();
    assert!(err.contains("America/New_York") && err.contains("D/1D/OHLCV") && err.contains("timezone: America/New_York"), "{err}");
    assert_eq!(zone::recorded_timezone(dir.path()), ny);
    rt().block_on(async {
        let e = reopen_with(in_zone(ny));
        assert_eq!(read_all(&e, &daily), (vec![1_704_171_600], vec![2.0]));
        assert_eq!(read_all(&e, &minute), (vec![60], vec![1.0]));
        e.shutdown().await.unwrap();
    });
}

/// Column files of `root` the process holds open (from `/proc/self/fd`; the log and the lock excluded).
fn open_column_files(root: &std::path::Path) -> usize {
    let root = root.canonicalize().unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(&root) && p.components().any(|c| c.as_os_str().to_string_lossy().starts_with('g')))
        .count()
}

#[test]
fn a_write_committed_inline_comes_after_every_write_queued_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("O/1Min/OHLCV").unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &bars(&[0], &[0.0]), WriteOptions::default()).await.unwrap();
        for i in 1..200i64 {
            // Queued, not awaited: the inline write that follows must not overtake it.
            let queued = e.submit_write(&key, &bars(&[i * 60], &[-1.0]), WriteOptions::default()).await.unwrap();
            let now = e.write(&key, &bars(&[i * 60], &[i as f32]), WriteOptions::default()).await.unwrap();
            let before = queued.durable().await.unwrap();
            assert!(before.lsn < now.lsn, "append {i}: queued lsn {} after the later write's {}", before.lsn, now.lsn);
        }
        let (ep, v) = read_all(&e, &key);
        assert_eq!(ep, (0..200).map(|i| i * 60).collect::<Vec<_>>());
        assert_eq!(v, (0..200).map(|i| i as f32).collect::<Vec<_>>());
        e.shutdown().await.unwrap();
    });
    // Replayed the same way.
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        let (_, v) = read_all(&e, &key);
        assert_eq!(v, (0..200).map(|i| i as f32).collect::<Vec<_>>());
        e.shutdown().await.unwrap();
    });
}

#[test]
fn concurrent_small_writes_inline_or_queued_are_all_durable_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<BucketKey> = (0..4).map(|k| BucketKey::parse(&format!("C{k}/1Min/OHLCV")).unwrap()).collect();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        for k in &keys {
            e.write(k, &bars(&[0], &[0.0]), WriteOptions::default()).await.unwrap();
        }
        let tasks: Vec<_> = keys
            .iter()
            .cloned()
            .map(|k| {
                let e = e.clone();
                tokio::spawn(async move {
                    let mut lsns = vec![];
                    for i in 1..=150i64 {
                        lsns.push(e.write(&k, &bars(&[i * 60], &[i as f32]), WriteOptions::default()).await.unwrap().lsn);
                    }
                    lsns
                })
            })
            .collect();
        let mut all = vec![];
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "every write has its own log position");
        drop(e); // no shutdown: the log alone must bring every write back
    });
    let e = loop {
        match Engine::open(EngineConfig::new(dir.path())) {
            Ok(e) => break e,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    };
    for k in &keys {
        assert_eq!(read_all(&e, k).1, (0..=150).map(|i| i as f32).collect::<Vec<_>>(), "{k}");
    }
}

#[test]
fn written_column_files_stay_open_until_the_checkpoint_only() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        let keys: Vec<BucketKey> = (0..3).map(|k| BucketKey::parse(&format!("F{k}/1Min/OHLCV")).unwrap()).collect();
        for k in &keys {
            e.write(k, &bars(&[0], &[0.0]), WriteOptions::default()).await.unwrap();
            e.write(k, &bars(&[60], &[1.0]), WriteOptions::default()).await.unwrap();
        }
        // Epoch and Open of each bucket's year, held between appends.
        assert_eq!(open_column_files(dir.path()), 6);
        e.checkpoint().await.unwrap();
        assert_eq!(open_column_files(dir.path()), 0);
        // Reads map the files without holding them.
        for k in &keys {
            assert_eq!(read_all(&e, k).1, vec![0.0, 1.0]);
        }
        assert_eq!(open_column_files(dir.path()), 0);
        e.shutdown().await.unwrap();
    });
}
