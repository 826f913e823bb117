//! Engine tests of Arrow's everyday types: nulls (validity bitmaps on disk), variable-length strings and
//! binary, timestamps, dates, decimals, dictionaries — through appends, merges, overwrites, deletes,
//! year boundaries, crashes and replay, read zero-copy.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, Decimal128Array, DictionaryArray, Float64Array, Int64Array, LargeStringArray,
    RecordBatch, StringArray, TimestampNanosecondArray,
};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Int32Type, Schema, TimeUnit};

use super::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn reopen(dir: &std::path::Path) -> Engine {
    for _ in 0..500 {
        match Engine::open(EngineConfig::new(dir)) {
            Err(EngineError::Unavailable(m)) if m.contains("in use") => std::thread::sleep(std::time::Duration::from_millis(20)),
            other => return other.unwrap(),
        }
    }
    Engine::open(EngineConfig::new(dir)).unwrap()
}

const Y2024: i64 = 1_704_067_200;

/// A batch of `Epoch` plus nullable Close (f64), Volume (i64), Venue (utf8), Halted (bool).
fn mixed(epochs: &[i64], close: &[Option<f64>], vol: &[Option<i64>], venue: &[Option<&str>], halted: &[Option<bool>]) -> RecordBatch {
    let s = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Int64, false),
        Field::new("Close", DataType::Float64, true),
        Field::new("Volume", DataType::Int64, true),
        Field::new("Venue", DataType::Utf8, true),
        Field::new("Halted", DataType::Boolean, true),
    ]));
    RecordBatch::try_new(
        s,
        vec![
            Arc::new(Int64Array::from(epochs.to_vec())),
            Arc::new(Float64Array::from(close.to_vec())),
            Arc::new(Int64Array::from(vol.to_vec())),
            Arc::new(StringArray::from(venue.to_vec())),
            Arc::new(BooleanArray::from(halted.to_vec())),
        ],
    )
    .unwrap()
}

type Row = (i64, Option<f64>, Option<i64>, Option<String>, Option<bool>);

fn read_mixed(e: &Engine, key: &BucketKey) -> Vec<Row> {
    let r = e.read(&ReadRequest::key(key)).unwrap();
    let schema = r[0].schema.clone();
    let b = concat_batches(&schema, &r[0].batches).unwrap();
    let ep = b.column(0).as_primitive::<arrow::datatypes::TimestampSecondType>();
    let c = b.column(1).as_primitive::<arrow::datatypes::Float64Type>();
    let v = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
    let s = b.column(3).as_string::<i32>();
    let h = b.column(4).as_boolean();
    (0..b.num_rows())
        .map(|i| (ep.value(i), c.is_valid(i).then(|| c.value(i)), v.is_valid(i).then(|| v.value(i)), s.is_valid(i).then(|| s.value(i).to_string()), h.is_valid(i).then(|| h.value(i))))
        .collect()
}

fn row(e: i64, c: Option<f64>, v: Option<i64>, s: Option<&str>, h: Option<bool>) -> Row {
    (e, c, v, s.map(str::to_string), h)
}

#[test]
fn nulls_and_strings_survive_appends_merges_overwrites_years_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("N/1Min/OHLCV").unwrap();
    let long = "x".repeat(1 << 20); // a 1 MiB value
    let expected = vec![
        row(Y2024 - 120, Some(0.5), None, Some("early"), Some(false)),
        row(Y2024 - 60, Some(1.0), Some(10), Some("NYSE"), None),
        row(Y2024, None, Some(20), None, Some(true)),
        row(Y2024 + 60, Some(3.0), None, Some(&long), Some(false)),
        row(Y2024 + 120, Some(4.5), Some(45), Some("a string longer than sixteen characters"), None),
    ];
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        // No nulls at first: no bitmap is written.
        e.write(&key, &mixed(&[Y2024 - 60, Y2024], &[Some(1.0), Some(2.0)], &[Some(10), Some(20)], &[Some("NYSE"), Some("ARCA")], &[Some(true), Some(true)]), WriteOptions::default())
            .await
            .unwrap();
        // Across the year boundary with nulls, then an append with the long string.
        e.write(&key, &mixed(&[Y2024 + 60], &[Some(3.0)], &[None], &[Some(&long)], &[Some(false)]), WriteOptions::default()).await.unwrap();
        // Out of order (merge) and an overwrite that makes values null.
        e.write(&key, &mixed(&[Y2024, Y2024 - 120], &[None, Some(0.5)], &[Some(20), None], &[None, Some("early")], &[Some(true), Some(false)]), WriteOptions::default())
            .await
            .unwrap();
        e.write(&key, &mixed(&[Y2024 - 60], &[Some(1.0)], &[Some(10)], &[Some("NYSE")], &[None]), WriteOptions::default()).await.unwrap();
        e.write(&key, &mixed(&[Y2024 + 120], &[Some(4.5)], &[Some(45)], &[Some("a string longer than sixteen characters")], &[None]), WriteOptions::default())
            .await
            .unwrap();
        assert_eq!(read_mixed(&e, &key), expected);
        // Crash: no shutdown, no checkpoint.
        drop(e);
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        assert_eq!(read_mixed(&e, &key), expected, "after replay");
        e.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        assert_eq!(read_mixed(&e, &key), expected, "after a checkpointed restart");
        // A range delete keeps the others, nulls included.
        e.delete_range(&key, TimePoint::secs(Y2024), TimePoint::secs(Y2024 + 60)).await.unwrap();
        let left: Vec<Row> = expected.iter().filter(|r| r.0 < Y2024 || r.0 > Y2024 + 60).cloned().collect();
        assert_eq!(read_mixed(&e, &key), left);
        drop(e);
        let e = reopen(dir.path());
        assert_eq!(read_mixed(&e, &key), left, "delete replayed");
        e.shutdown().await.unwrap();
    });
    // The 2024 manifest lists its bitmaps and says it needs the new format.
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("N/1Min/OHLCV/2024/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format"], 2);
    assert!(m["validity"].as_array().is_some_and(|v| !v.is_empty()), "{m}");
}

#[test]
fn nulls_in_a_column_that_is_not_nullable_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("R/1Min/OHLCV").unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        let schema = BucketSchema { kind: RecordKind::Fixed, columns: vec![ColumnDef::new("Close", ColumnType::F64)] };
        e.create(&key, schema).await.unwrap();
        let s = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false), Field::new("Close", DataType::Float64, true)]));
        let ok = RecordBatch::try_new(s.clone(), vec![Arc::new(Int64Array::from(vec![60])), Arc::new(Float64Array::from(vec![1.0]))]).unwrap();
        e.write(&key, &ok, WriteOptions::default()).await.unwrap();
        let bad = RecordBatch::try_new(s, vec![Arc::new(Int64Array::from(vec![120])), Arc::new(Float64Array::from(vec![None]))]).unwrap();
        let err = e.write(&key, &bad, WriteOptions::default()).await.unwrap_err().to_string();
        assert!(err.contains("\"Close\" contains nulls and is not nullable"), "{err}");
        // A null Epoch is refused too.
        let s = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, true), Field::new("Close", DataType::Float64, false)]));
        let bad = RecordBatch::try_new(s, vec![Arc::new(Int64Array::from(vec![None])), Arc::new(Float64Array::from(vec![2.0]))]).unwrap();
        assert!(e.write(&key, &bad, WriteOptions::default()).await.unwrap_err().to_string().contains("Epoch column contains nulls"));
        let r = e.read(&ReadRequest::key(&key)).unwrap();
        assert_eq!(r[0].rows, 1);
        e.shutdown().await.unwrap();
    });
}

fn addr_in_mapping(addr: usize, dir: &std::path::Path) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .find(|l| {
            let range = l.split_whitespace().next().unwrap_or("");
            let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
            let (a, b) = (usize::from_str_radix(a, 16).unwrap_or(0), usize::from_str_radix(b, 16).unwrap_or(0));
            a <= addr && addr < b
        })
        .filter(|l| l.contains(dir.to_str().unwrap()))
        .map(|l| l.rsplit('/').next().unwrap_or("").to_string())
}

#[test]
fn validity_offsets_and_string_data_are_read_zero_copy() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("Z/1Min/OHLCV").unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        let n = 10_000i64;
        let ep: Vec<i64> = (0..n).map(|i| i * 60).collect();
        let close: Vec<Option<f64>> = (0..n).map(|i| (i % 7 != 0).then_some(i as f64)).collect();
        let venue: Vec<Option<String>> = (0..n).map(|i| (i % 5 != 0).then(|| format!("venue-{i:014}"))).collect(); // 20 bytes
        let s = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false), Field::new("Close", DataType::Float64, true), Field::new("Venue", DataType::Utf8, true)]));
        let b = RecordBatch::try_new(s, vec![Arc::new(Int64Array::from(ep)), Arc::new(Float64Array::from(close)), Arc::new(StringArray::from(venue))]).unwrap();
        e.write(&key, &b, WriteOptions::default()).await.unwrap();
        let r = e.read(&ReadRequest::key(&key)).unwrap();
        let batch = &r[0].batches[0];
        let close = batch.column(1).to_data();
        assert_eq!(addr_in_mapping(close.buffers()[0].as_ptr() as usize, dir.path()).as_deref(), Some("c001.f64"));
        assert_eq!(addr_in_mapping(close.nulls().unwrap().buffer().as_ptr() as usize, dir.path()).as_deref(), Some("c001.valid"));
        let venue = batch.column(2).to_data();
        assert_eq!(addr_in_mapping(venue.buffers()[0].as_ptr() as usize, dir.path()).as_deref(), Some("c002.utf8.off"));
        assert_eq!(addr_in_mapping(venue.buffers()[1].as_ptr() as usize, dir.path()).as_deref(), Some("c002.data"));
        assert_eq!(addr_in_mapping(venue.nulls().unwrap().buffer().as_ptr() as usize, dir.path()).as_deref(), Some("c002.valid"));
        let v = batch.column(2).as_string::<i32>();
        assert_eq!((v.value(9_999), v.is_null(9_995)), ("venue-00000000009999", true));
        let c = batch.column(1).as_primitive::<arrow::datatypes::Float64Type>();
        assert_eq!((c.value(9_999), c.is_null(9_996)), (9_999.0, true));
        e.shutdown().await.unwrap();
    });
}

#[test]
fn timestamps_dates_decimals_binary_and_dictionaries_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("T/1Sec/TRADE").unwrap();
    let dict: DictionaryArray<Int32Type> = vec![Some("buy"), None, Some("sell"), Some("buy")].into_iter().collect();
    let s = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())), false),
        Field::new("Exch", DataType::Timestamp(TimeUnit::Nanosecond, Some("America/New_York".into())), true),
        Field::new("Day", DataType::Date32, false),
        Field::new("Px", DataType::Decimal128(18, 4), true),
        Field::new("Raw", DataType::Binary, true),
        Field::new("Side", dict.data_type().clone(), true),
        Field::new("Note", DataType::LargeUtf8, true),
    ]));
    let t0 = Y2024 * 1_000_000_000;
    let cols: Vec<ArrayRef> = vec![
        Arc::new(TimestampNanosecondArray::from(vec![t0 + 5, t0 + 1, t0 + 1, t0 + 3]).with_timezone("UTC")),
        Arc::new(TimestampNanosecondArray::from(vec![Some(t0 + 7), None, Some(t0 - 1), Some(t0)]).with_timezone("America/New_York")),
        Arc::new(Date32Array::from(vec![19723, 19723, 19722, 19724])),
        Arc::new(Decimal128Array::from(vec![Some(1_234_567), None, Some(-5), Some(0)]).with_precision_and_scale(18, 4).unwrap()),
        Arc::new(BinaryArray::from(vec![Some(&b"\x00\x01"[..]), Some(&b""[..]), None, Some(&b"\xff"[..])])),
        Arc::new(dict),
        Arc::new(LargeStringArray::from(vec![None, Some("n1"), Some("n2"), Some("")])),
    ];
    let batch = RecordBatch::try_new(s, cols).unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &batch, WriteOptions { variable: Some(true), ..Default::default() }).await.unwrap();
        drop(e);
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        let info = e.info(&key).unwrap();
        let names: Vec<String> = info.schema.columns.iter().map(|c| c.type_name()).collect();
        assert_eq!(names, ["timestamp[ns, America/New_York]?", "date32", "decimal128(18,4)?", "binary?", "utf8?", "large_utf8?"]);
        let r = e.read(&ReadRequest::key(&key)).unwrap();
        let b = concat_batches(&r[0].schema, &r[0].batches).unwrap();
        // Sorted by (Epoch, Nanoseconds); the two ticks at t0+1 keep arrival order.
        let ns = b.column_by_name("Nanoseconds").unwrap().as_primitive::<Int32Type>();
        assert_eq!(ns.values().to_vec(), vec![1, 1, 3, 5]);
        let exch = b.column_by_name("Exch").unwrap();
        assert_eq!(exch.data_type(), &DataType::Timestamp(TimeUnit::Nanosecond, Some("America/New_York".into())));
        let exch = exch.as_primitive::<arrow::datatypes::TimestampNanosecondType>();
        assert_eq!((0..4).map(|i| exch.is_valid(i).then(|| exch.value(i))).collect::<Vec<_>>(), vec![None, Some(t0 - 1), Some(t0), Some(t0 + 7)]);
        let day = b.column_by_name("Day").unwrap().as_primitive::<arrow::datatypes::Date32Type>();
        assert_eq!(day.values().to_vec(), vec![19723, 19722, 19724, 19723]);
        let px = b.column_by_name("Px").unwrap();
        assert_eq!(px.data_type(), &DataType::Decimal128(18, 4));
        let px = px.as_primitive::<arrow::datatypes::Decimal128Type>();
        assert_eq!((0..4).map(|i| px.is_valid(i).then(|| px.value(i))).collect::<Vec<_>>(), vec![None, Some(-5), Some(0), Some(1_234_567)]);
        let raw = b.column_by_name("Raw").unwrap().as_binary::<i32>();
        assert_eq!((0..4).map(|i| raw.is_valid(i).then(|| raw.value(i).to_vec())).collect::<Vec<_>>(), vec![Some(vec![]), None, Some(vec![0xff]), Some(vec![0, 1])]);
        let side = b.column_by_name("Side").unwrap().as_string::<i32>();
        assert_eq!((0..4).map(|i| side.is_valid(i).then(|| side.value(i))).collect::<Vec<_>>(), vec![None, Some("sell"), Some("buy"), Some("buy")]);
        let note = b.column_by_name("Note").unwrap().as_string::<i64>();
        assert_eq!((0..4).map(|i| note.is_valid(i).then(|| note.value(i))).collect::<Vec<_>>(), vec![Some("n1"), Some("n2"), Some(""), None]);
        e.shutdown().await.unwrap();
    });
}

#[test]
fn hot_tail_overwrites_set_and_clear_nulls_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("H/1Min/OHLCV").unwrap();
    let s = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false), Field::new("Close", DataType::Float64, true)]));
    let batch = |ep: Vec<i64>, c: Vec<Option<f64>>| RecordBatch::try_new(s.clone(), vec![Arc::new(Int64Array::from(ep)), Arc::new(Float64Array::from(c))]).unwrap();
    let read = |e: &Engine| -> Vec<Option<f64>> {
        let r = e.read(&ReadRequest::key(&key)).unwrap();
        let b = concat_batches(&r[0].schema, &r[0].batches).unwrap();
        let c = b.column(1).as_primitive::<arrow::datatypes::Float64Type>();
        (0..b.num_rows()).map(|i| c.is_valid(i).then(|| c.value(i))).collect()
    };
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &batch((0..300).map(|i| i * 60).collect(), (0..300).map(|i| Some(i as f64)).collect()), WriteOptions::default()).await.unwrap();
        // The first overwrite near the end makes the partition hot; the next ones are in place.
        e.write(&key, &batch(vec![299 * 60], vec![None]), WriteOptions::default()).await.unwrap();
        let before = read(&e);
        e.write(&key, &batch(vec![298 * 60, 299 * 60, 300 * 60], vec![None, Some(-1.0), None]), WriteOptions::default()).await.unwrap();
        // An earlier snapshot is unchanged.
        assert_eq!(before[298..], [Some(298.0), None]);
        let now = read(&e);
        assert_eq!(now[297..], [Some(297.0), None, Some(-1.0), None]);
        drop(e);
        let e = reopen(dir.path());
        assert_eq!(read(&e)[297..], [Some(297.0), None, Some(-1.0), None]);
        e.shutdown().await.unwrap();
    });
}

#[test]
fn bulk_appends_of_nullable_columns_replay() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("B/1Min/OHLCV").unwrap();
    let n = 40_000i64;
    let s = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false), Field::new("Close", DataType::Float64, true), Field::new("Sym", DataType::Utf8, true)]));
    let batch = |from: i64, nulls: bool| {
        let ep: Vec<i64> = (from..from + n).map(|i| i * 60).collect();
        let c: Vec<Option<f64>> = (from..from + n).map(|i| (!nulls || i % 3 != 0).then_some(i as f64)).collect();
        let sy: Vec<Option<String>> = (from..from + n).map(|i| Some(format!("s{i}"))).collect();
        RecordBatch::try_new(s.clone(), vec![Arc::new(Int64Array::from(ep)), Arc::new(Float64Array::from(c)), Arc::new(StringArray::from(sy))]).unwrap()
    };
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &batch(0, false), WriteOptions::default()).await.unwrap();
        e.write(&key, &batch(n, true), WriteOptions::default()).await.unwrap();
        e.write(&key, &batch(2 * n, false), WriteOptions::default()).await.unwrap();
        drop(e);
        let e = reopen(dir.path());
        let r = e.read(&ReadRequest::key(&key)).unwrap();
        let b = concat_batches(&r[0].schema, &r[0].batches).unwrap();
        assert_eq!(b.num_rows(), 3 * n as usize);
        let c = b.column(1).as_primitive::<arrow::datatypes::Float64Type>();
        let sy = b.column(2).as_string::<i32>();
        for i in 0..3 * n as usize {
            let null = (n as usize..2 * n as usize).contains(&i) && i % 3 == 0;
            assert_eq!(c.is_null(i), null, "row {i}");
            if !null {
                assert_eq!(c.value(i), i as f64);
            }
            assert_eq!(sy.value(i), format!("s{i}"));
        }
        e.shutdown().await.unwrap();
    });
}

#[test]
fn partitions_of_a_newer_format_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("F/1Min/OHLCV").unwrap();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &mixed(&[60], &[Some(1.0)], &[Some(1)], &[Some("a")], &[Some(true)]), WriteOptions::default()).await.unwrap();
        e.shutdown().await.unwrap();
    });
    let mp = dir.path().join("F/1Min/OHLCV/1970/manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&mp).unwrap()).unwrap();
    m["format"] = 3.into();
    std::fs::write(&mp, m.to_string()).unwrap();
    let _ = std::fs::remove_file(dir.path().join(".catalog"));
    rt().block_on(async {
        let e = reopen(dir.path());
        let err = e.read(&ReadRequest::key(&key)).unwrap_err().to_string();
        assert!(err.contains("partition format 3 is newer than this build reads"), "{err}");
        e.shutdown().await.unwrap();
    });
}

#[test]
fn buckets_of_different_schemas_reopen_from_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let a = BucketKey::parse("A/1Sec/TRADE").unwrap();
    let q = BucketKey::parse("A/1Sec/QUOTE").unwrap();
    let batch = |cols: &[(&str, DataType)]| {
        let mut f = vec![Field::new("Epoch", DataType::Int64, false), Field::new("Nanoseconds", DataType::Int32, false)];
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(vec![Y2024])), Arc::new(arrow::array::Int32Array::from(vec![5]))];
        for (n, t) in cols {
            f.push(Field::new(*n, t.clone(), false));
            arrays.push(arrow::array::new_null_array(t, 1).to_data().into_builder().nulls(None).build().map(arrow::array::make_array).unwrap());
        }
        RecordBatch::try_new(Arc::new(Schema::new(f)), arrays).unwrap()
    };
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&a, &batch(&[("Price", DataType::Float64), ("Size", DataType::UInt64), ("Exchange", DataType::UInt8)]), WriteOptions::default()).await.unwrap();
        e.write(&q, &batch(&[("Bid", DataType::Float64), ("Ask", DataType::Float64), ("BidSize", DataType::UInt64)]), WriteOptions::default()).await.unwrap();
        e.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let e = reopen(dir.path());


        assert_eq!(e.read(&ReadRequest::key(&a)).unwrap()[0].rows, 1);
        assert_eq!(e.read(&ReadRequest::key(&q)).unwrap()[0].rows, 1);
        e.shutdown().await.unwrap();
    });
}

#[test]
fn every_type_name_reads_back_as_itself() {
    let mut all = ColumnType::ALL.to_vec();
    all.extend([
        ColumnType::Timestamp(TsUnit::S),
        ColumnType::Timestamp(TsUnit::Ms),
        ColumnType::Timestamp(TsUnit::Us),
        ColumnType::Timestamp(TsUnit::Ns),
        ColumnType::Date32,
        ColumnType::Decimal128(18, 4),
        ColumnType::Utf8,
        ColumnType::LargeUtf8,
        ColumnType::Binary,
    ]);
    for t in all {
        // bucket.json (serde) names and wire names each read back as the same type.
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<ColumnType>(&json).unwrap(), t, "{json}");
        assert_eq!(ColumnType::from_wire(&t.wire_name()).unwrap(), t, "{}", t.wire_name());
        let c = ColumnDef::parse("x", &format!("{}?", t.wire_name())).unwrap();
        assert_eq!((c.ty, c.nullable), (t, true));
    }
    // The stored names of the older one-byte types are not numpy's eight-byte i8/u8.
    assert_eq!(serde_json::from_str::<ColumnType>("\"u8\"").unwrap(), ColumnType::U8);
    assert_eq!(ColumnType::from_wire("u8").unwrap(), ColumnType::U64);
    assert_eq!(ColumnDef::parse("t", "timestamp[ms, Europe/London]").unwrap().tz.as_deref(), Some("Europe/London"));
    assert_eq!(ColumnDef::parse("b", "?").unwrap().ty, ColumnType::Bool);
}

/// `Epoch` plus the given nullable f64/i64/utf8 columns.
fn batch_of(epochs: &[i64], cols: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let mut fields = vec![Field::new("Epoch", DataType::Int64, false)];
    let mut arrays: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(epochs.to_vec()))];
    for (n, a) in cols {
        fields.push(Field::new(n, a.data_type().clone(), true));
        arrays.push(a);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap()
}

fn read_all(e: &Engine, key: &BucketKey) -> RecordBatch {
    let r = e.read(&ReadRequest::key(key)).unwrap();
    concat_batches(&r[0].schema, &r[0].batches).unwrap()
}

fn names(b: &RecordBatch) -> Vec<String> {
    b.schema().fields().iter().map(|f| f.name().clone()).collect()
}

#[test]
fn columns_added_and_dropped_read_as_null_survive_crashes_and_never_see_old_files() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("S/1Min/OHLCV").unwrap();
    let bdir = dir.path().join("S/1Min/OHLCV");
    let (a, b, c) = (Y2024 - 60, Y2024, Y2024 + 60); // 2023 and 2024 partitions
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        let close = |v: &[f64]| -> ArrayRef { Arc::new(Float64Array::from(v.to_vec())) };
        e.write(&key, &batch_of(&[a, b], vec![("Close", close(&[1.0, 2.0]))]), WriteOptions::default()).await.unwrap();
        // Without auto_add_columns a write with a new column is refused and stores nothing.
        let extra = batch_of(&[c], vec![("Close", close(&[3.0])), ("Venue", Arc::new(StringArray::from(vec!["X"])))]);
        let err = e.write(&key, &extra, WriteOptions::default()).await.unwrap_err().to_string();
        assert!(err.contains("Venue"), "{err}");
        assert_eq!(read_all(&e, &key).num_rows(), 2);

        let s = e
            .alter(&key, SchemaChange::AddColumns(vec![ColumnDef::new("Venue", ColumnType::Utf8), ColumnDef::new("Volume", ColumnType::I64)]))
            .await
            .unwrap();
        assert!(s.columns.iter().all(|c| c.nullable));
        // Refusals: an existing name, dropping Epoch or an unknown column.
        assert!(matches!(e.alter(&key, SchemaChange::AddColumns(vec![ColumnDef::new("Close", ColumnType::F64)])).await, Err(EngineError::AlreadyExists(_))));
        assert!(e.alter(&key, SchemaChange::DropColumns(vec!["Epoch".into()])).await.is_err());
        assert!(matches!(e.alter(&key, SchemaChange::DropColumns(vec!["Nope".into()])).await, Err(EngineError::NotFound(_))));
        let got = read_all(&e, &key);
        assert_eq!(names(&got), ["Epoch", "Close", "Venue", "Volume"]);
        assert_eq!(got.column(2).null_count(), 2);
        assert_eq!(got.column(3).null_count(), 2);
        // New rows carry the new columns; an overwrite of an old row (a merge) sets them.
        e.write(&key, &extra, WriteOptions::default()).await.unwrap();
        let over = batch_of(&[a], vec![("Close", close(&[1.5])), ("Venue", Arc::new(StringArray::from(vec!["Y"]))), ("Volume", Arc::new(Int64Array::from(vec![7])))]);
        e.write(&key, &over, WriteOptions::default()).await.unwrap();
        drop(e); // crash
    });
    let expect_added = |e: &Engine| {
        let got = read_all(e, &key);
        assert_eq!(names(&got), ["Epoch", "Close", "Venue", "Volume"]);
        assert_eq!(got.column(1).as_primitive::<arrow::datatypes::Float64Type>().values().to_vec(), [1.5, 2.0, 3.0]);
        let venue = got.column(2).as_string::<i32>();
        assert_eq!((0..3).map(|i| venue.is_valid(i).then(|| venue.value(i).to_string())).collect::<Vec<_>>(), [Some("Y".into()), None, Some("X".into())]);
        let vol = got.column(3).as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!((0..3).map(|i| vol.is_valid(i).then(|| vol.value(i))).collect::<Vec<_>>(), [Some(7), None, None]);
    };
    rt().block_on(async {
        let e = reopen(dir.path());
        expect_added(&e);
        // Drop Close, then add a column of the same name and another type: it starts all null, never
        // reading the dropped column's bytes.
        e.alter(&key, SchemaChange::DropColumns(vec!["Close".into()])).await.unwrap();
        assert_eq!(names(&read_all(&e, &key)), ["Epoch", "Venue", "Volume"]);
        e.alter(&key, SchemaChange::AddColumns(vec![ColumnDef::new("Close", ColumnType::I64)])).await.unwrap();
        let got = read_all(&e, &key);
        assert_eq!(names(&got), ["Epoch", "Venue", "Volume", "Close"]);
        assert_eq!(got.column(3).null_count(), 3);
        assert_eq!(got.column(2).as_primitive::<arrow::datatypes::Int64Type>().value(0), 7);
        e.shutdown().await.unwrap();
    });
    // The dropped column's files are gone from the partitions.
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(bdir.join("2023/manifest.json")).unwrap()).unwrap();
    let f2023 = std::fs::read_dir(bdir.join(format!("2023/g{}", m["generation"]))).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect::<Vec<_>>();
    assert!(!f2023.iter().any(|f| f.starts_with("c001.")), "{f2023:?}");
    rt().block_on(async {
        let e = reopen(dir.path());
        let got = read_all(&e, &key);
        assert_eq!(names(&got), ["Epoch", "Venue", "Volume", "Close"]);
        assert_eq!(got.column(3).null_count(), 3);
        e.shutdown().await.unwrap();
    });
}

#[test]
fn a_logged_schema_change_that_did_not_commit_is_finished_by_replay() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("R/1Min/OHLCV").unwrap();
    let bdir = dir.path().join("R/1Min/OHLCV");
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        e.write(&key, &batch_of(&[Y2024, Y2024 + 60], vec![("Close", Arc::new(Float64Array::from(vec![1.0, 2.0])))]), WriteOptions::default()).await.unwrap();
        e.checkpoint().await.unwrap();
        let before = std::fs::read(bdir.join("bucket.json")).unwrap();
        e.alter(&key, SchemaChange::AddColumns(vec![ColumnDef::new("Note", ColumnType::Utf8)])).await.unwrap();
        e.write(&key, &batch_of(&[Y2024 + 120], vec![("Close", Arc::new(Float64Array::from(vec![3.0]))), ("Note", Arc::new(StringArray::from(vec!["n"])))]), WriteOptions::default())
            .await
            .unwrap();
        drop(e); // crash
        // As if the crash came after the change was logged, before bucket.json and the new files were done.
        std::fs::write(bdir.join("bucket.json"), before).unwrap();
        std::fs::remove_file(bdir.join("2024/g0/c002.utf8.off")).unwrap();
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        let got = read_all(&e, &key);
        assert_eq!(names(&got), ["Epoch", "Close", "Note"]);
        let note = got.column(2).as_string::<i32>();
        assert_eq!((0..3).map(|i| note.is_valid(i).then(|| note.value(i).to_string())).collect::<Vec<_>>(), [None, None, Some("n".into())]);
        e.shutdown().await.unwrap();
    });
}

#[test]
fn auto_add_columns_adds_what_a_write_carries() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("A/1Min/OHLCV").unwrap();
    rt().block_on(async {
        let mut cfg = EngineConfig::new(dir.path());
        cfg.auto_add_columns = true;
        let e = Engine::open(cfg).unwrap();
        e.write(&key, &batch_of(&[Y2024], vec![("Close", Arc::new(Float64Array::from(vec![1.0])))]), WriteOptions::default()).await.unwrap();
        // A feed that starts sending a field, and one that stops sending Close (nullable: stored as null).
        e.write(&key, &batch_of(&[Y2024 + 60], vec![("Close", Arc::new(Float64Array::from(vec![2.0]))), ("Vwap", Arc::new(Float64Array::from(vec![2.5])))]), WriteOptions::default())
            .await
            .unwrap();
        e.write(&key, &batch_of(&[Y2024 + 120], vec![("Vwap", Arc::new(Float64Array::from(vec![3.5])))]), WriteOptions::default()).await.unwrap();
        let got = read_all(&e, &key);
        assert_eq!(names(&got), ["Epoch", "Close", "Vwap"]);
        let close = got.column(1).as_primitive::<arrow::datatypes::Float64Type>();
        assert_eq!((0..3).map(|i| close.is_valid(i).then(|| close.value(i))).collect::<Vec<_>>(), [Some(1.0), Some(2.0), None]);
        let vwap = got.column(2).as_primitive::<arrow::datatypes::Float64Type>();
        assert_eq!((0..3).map(|i| vwap.is_valid(i).then(|| vwap.value(i))).collect::<Vec<_>>(), [None, Some(2.5), Some(3.5)]);
        e.shutdown().await.unwrap();
    });
}

/// Appends of strings and nulls to one bucket submitted without waiting share log groups: each reserves
/// its string data and rows past the group's earlier appends (the first ones without nulls, later ones
/// with, so a validity bitmap appears mid-group); all of it reads back, and replays after a crash.
#[test]
fn grouped_appends_of_strings_and_nulls_reserve_past_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let key = BucketKey::parse("GRP/1Min/MIXED").unwrap();
    let mut want = Vec::new();
    rt().block_on(async {
        let e = Engine::open(EngineConfig::new(dir.path())).unwrap();
        let (s0, _) = e.wal_stats();
        let mut pending = Vec::new();
        for i in 0..120i64 {
            let t = Y2024 + 60 * i;
            let venue = "v".repeat(1 + (i as usize % 40));
            let close = if i >= 60 && i % 3 == 0 { None } else { Some(i as f64) };
            let halted = if i >= 90 && i % 2 == 0 { None } else { Some(i % 5 == 0) };
            pending.push(e.submit_write(&key, &mixed(&[t], &[close], &[Some(i)], &[Some(venue.as_str())], &[halted]), WriteOptions::default()).await.unwrap());
            want.push(row(t, close, Some(i), Some(&venue), halted));
        }
        for p in pending {
            assert_eq!(p.durable().await.unwrap().rows, 1);
        }
        let (s1, _) = e.wal_stats();
        assert!(s1 - s0 < 120, "expected shared fsyncs, got {} for 120 writes", s1 - s0);
        assert_eq!(read_mixed(&e, &key), want);
        drop(e);
    });
    rt().block_on(async {
        let e = reopen(dir.path());
        assert_eq!(read_mixed(&e, &key), want);
        e.shutdown().await.unwrap();
    });
}
