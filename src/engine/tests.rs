//! Engine tests in-process: replay idempotency, copy-on-write merges, zero-copy reads.

use std::sync::Arc;

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

fn reopen(dir: &std::path::Path) -> Engine {
    loop {
        match Engine::open(EngineConfig::new(dir)) {
            Ok(e) => break e,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
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
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
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
