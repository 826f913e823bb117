//! The bus over a real engine: whole batches with LSNs, resume without gap or duplicate, gaps named,
//! slow subscribers ended, the gated feed switching to the `stream` trigger once it installs.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use futures::StreamExt;

use super::*;
use crate::engine::{EngineConfig, WriteOptions};

fn bars(epochs: &[i64]) -> RecordBatch {
    let s = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false), Field::new("Open", DataType::Float64, false)]));
    RecordBatch::try_new(s, vec![Arc::new(Int64Array::from(epochs.to_vec())), Arc::new(Float64Array::from(vec![1.0; epochs.len()]))]).unwrap()
}

fn all() -> KeyPattern {
    KeyPattern::parse("*/*/*").unwrap()
}

async fn next(s: &mut BusStream) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), s.next()).await.expect("a delivery in time").expect("not the end").expect("not an error")
}

async fn write(e: &Engine, key: &str, epochs: &[i64]) -> u64 {
    e.write(&BucketKey::parse(key).unwrap(), &bars(epochs), WriteOptions::default()).await.unwrap().lsn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_batches_resume_and_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig::new(dir.path())).unwrap();
    let bus = Bus::with_limits(engine.clone(), 0, usize::MAX, 3);
    let mut live = bus.subscribe(KeyPattern::parse("A/*/*").unwrap(), SubscribeOptions::default()).unwrap();
    let l1 = write(&engine, "A/1Min/OHLCV", &[60, 120, 180]).await;
    let _ = write(&engine, "B/1Min/OHLCV", &[60]).await;
    let l3 = write(&engine, "A/1Min/OHLCV", &[240]).await;
    let d = next(&mut live).await;
    assert_eq!((d.key.to_string(), d.lsn, d.batch.num_rows(), d.gap), ("A/1Min/OHLCV".into(), l1, 3, None));
    assert_eq!(next(&mut live).await.lsn, l3);

    // Resume after l1: exactly the held appends after it, then live ones, nothing twice.
    let mut resumed = bus.subscribe(KeyPattern::parse("A/*/*").unwrap(), SubscribeOptions { from_lsn: Some(l1), ..Default::default() }).unwrap();
    assert_eq!(next(&mut resumed).await.lsn, l3);
    let l4 = write(&engine, "A/1Min/OHLCV", &[300]).await;
    let d = next(&mut resumed).await;
    assert_eq!((d.lsn, d.gap), (l4, None));

    // Four appends written, three held: resuming from before the oldest held one names the gap.
    let _ = write(&engine, "B/1Min/OHLCV", &[120]).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the bus thread holds it
    let floor = bus.floor();
    assert!(floor >= l1, "{floor} {l1}");
    let mut gapped = bus.subscribe(all(), SubscribeOptions { from_lsn: Some(0), ..Default::default() }).unwrap();
    let d = next(&mut gapped).await;
    assert_eq!(d.gap, Some(Gap { after_lsn: 0, through_lsn: floor }));
    assert!(d.lsn > floor);

    // A gap with nothing held to attach it to rides on the first live delivery.
    let bus2 = Bus::with_limits(engine.clone(), 1_000, usize::MAX, 3);
    let mut s = bus2.subscribe(all(), SubscribeOptions { from_lsn: Some(5), ..Default::default() }).unwrap();
    let l = write(&engine, "C/1Min/OHLCV", &[60]).await;
    let d = next(&mut s).await;
    assert_eq!((d.lsn, d.gap), (l, Some(Gap { after_lsn: 5, through_lsn: 1_000 })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_is_ended_not_thinned() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig::new(dir.path())).unwrap();
    let bus = Bus::new(engine.clone());
    let mut s = bus.subscribe(all(), SubscribeOptions { capacity: 2, ..Default::default() }).unwrap();
    for i in 0..4 {
        write(&engine, "A/1Min/OHLCV", &[60 * (i + 1)]).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut got = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await.unwrap() {
            Some(Ok(_)) => got += 1,
            Some(Err(BusError::FellBehind(2))) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, 2);
    assert!(s.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gated_feed_carries_appends_until_a_stream_trigger_installs() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig::new(dir.path())).unwrap();
    let bus = Bus::new(engine.clone());
    assert!(bus.subscribe(all(), SubscribeOptions { feed: Feed::Stream, from_lsn: Some(1), capacity: 8 }).is_err());
    let mut s = bus.subscribe(all(), SubscribeOptions { feed: Feed::Stream, ..Default::default() }).unwrap();
    let l = write(&engine, "A/1Min/OHLCV", &[60, 120]).await;
    let d = next(&mut s).await;
    assert_eq!((d.lsn, d.batch.num_rows()), (l, 2));
    bus.gate().install();
    write(&engine, "A/1Min/OHLCV", &[180]).await;
    bus.gate().push(BucketKey::parse("A/1Min/OHLCV").unwrap(), 99, bars(&[180]));
    let d = next(&mut s).await;
    assert_eq!(d.lsn, 99, "only the installed trigger's pushes, not the raw append");
    assert_eq!(Feed::parse(Some("stream")).unwrap(), Feed::Stream);
    assert_eq!(Feed::parse(None).unwrap(), Feed::Appends);
    assert!(Feed::parse(Some("rows")).is_err());
}

#[test]
fn floor_is_the_log_position_the_engine_opened_at() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let last = {
        let engine = Engine::open(EngineConfig::new(dir.path())).unwrap();
        let l = rt.block_on(write(&engine, "A/1Min/OHLCV", &[60]));
        rt.block_on(engine.shutdown()).unwrap();
        l
    };
    // The lock is held by the dropped engine's writer thread only until it exits; wait for it.
    let engine = loop {
        match Engine::open(EngineConfig::new(dir.path())) {
            Ok(e) => break e,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let bus = Bus::new(engine);
    assert!(bus.floor() >= last, "floor {} below the last LSN before the restart {last}", bus.floor());
}
