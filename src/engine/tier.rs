//! Tiering: sealed year partitions moved to object storage as Parquet, and read back from there.
//!
//! A year partition whose year ended more than `tiering.after` ago is written, at a checkpoint, as one
//! Parquet object (zstd, sorted by Epoch, row groups of [`ROW_GROUP_ROWS`] rows with statistics) under a
//! Hive-style layout any engine reads directly:
//!
//! ```text
//! <store>/symbol=AAPL/timeframe=1Min/attrgroup=OHLCV/year=2023/<lsn>.parquet
//! ```
//!
//! (`<lsn>`: the log position the year had applied when it moved). The bucket's `cold.json` lists its
//! cold years; it is the commit point of every move:
//! 1. the object's name goes into `cold.json`'s `pending` list (durable), 2. the object is put, 3. the
//!    year's entry replaces the pending name (durable: **committed**), 4. the local year directory is
//!    removed.
//!
//! A start after a crash finishes or undoes any step: pending objects are deleted (an interrupted move, a
//! year that was thawed or removed), and a local directory of a year that `cold.json` lists is removed
//! (an interrupted step 4, or a thaw interrupted before its commit). A write into a cold year first
//! *thaws* it: the object's rows become a local partition again (durable), then `cold.json` drops the
//! entry (commit), then the old object is deleted; the write is logged only after that, and the year is
//! written to a new object at a later checkpoint (copy-on-write). A range delete that covers a whole cold
//! year (retention, `DELETE`) drops the entry and deletes the object.
//!
//! Reads select row groups by their Epoch statistics and fetch only the columns asked for; decoded
//! column chunks are kept in a cache bounded by `tiering.cache_bytes`.

use std::collections::HashMap;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{new_null_array, Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{cast, concat};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parking_lot::Mutex;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::{KeyValue, SortingColumn};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::statistics::Statistics;
use serde::{Deserialize, Serialize};

use super::key::BucketKey;
use super::read::{partition_point_by, TimePoint};
use super::types::{RecordKind, EPOCH, NANOSECONDS};
use super::{wal, EngineError, Result};

/// Rows per Parquet row group: a day and a half of 1Min bars, so a one-day range reads one or two groups.
pub const ROW_GROUP_ROWS: usize = 65_536;

/// The bucket file that lists its cold years.
pub(super) const COLD_FILE: &str = "cold.json";

/// `tiering:` in `mkts.yml`.
#[derive(Debug, Clone, PartialEq)]
pub struct TierConfig {
    /// `file:///abs/dir` or `s3://bucket/prefix`.
    pub store: String,
    /// A year moves once it ended this long ago.
    pub after: Duration,
    /// S3 settings (`endpoint`, `region`, `allow_http`, `access_key_id`, `secret_access_key`, …: any key
    /// `object_store`'s `AmazonS3ConfigKey` accepts). `AWS_*` environment variables apply first.
    pub s3: Vec<(String, String)>,
    /// Bound of the cache of decoded cold column chunks.
    pub cache_bytes: usize,
}

impl TierConfig {
    /// Default cache bound: 256 MiB.
    pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;

    /// A config for `store` with the defaults (`after` 1 year).
    pub fn new(store: impl Into<String>) -> TierConfig {
        TierConfig { store: store.into(), after: Duration::from_secs(365 * 86_400), s3: Vec::new(), cache_bytes: Self::DEFAULT_CACHE_BYTES }
    }
}

/// One cold year of a bucket, as `cold.json` records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ColdYear {
    pub year: i32,
    /// Object path relative to the store's prefix.
    pub object: String,
    /// The log position the year had applied when it moved: replay skips records up to it.
    pub lsn: u64,
    pub rows: u64,
    /// Object size.
    pub bytes: u64,
    /// First and last row time `(epoch, nanos)`.
    pub first: (i64, i32),
    pub last: (i64, i32),
}

/// `cold.json`: the cold years (sorted) and objects to delete (see the module docs).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct ColdManifest {
    pub years: Vec<ColdYear>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
}

impl ColdManifest {
    /// The manifest in a bucket directory (empty when there is none).
    pub fn load(dir: &FsPath) -> Result<ColdManifest> {
        let path = dir.join(COLD_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| EngineError::Corrupt { path: path.display().to_string(), reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ColdManifest::default()),
            Err(e) => Err(EngineError::io(&path, e)),
        }
    }

    /// Replace the manifest durably (temp file, fsync, rename, directory fsync); an empty one removes it.
    pub fn store(&self, dir: &FsPath) -> Result<()> {
        if self.years.is_empty() && self.pending.is_empty() {
            let path = dir.join(COLD_FILE);
            return match std::fs::remove_file(&path) {
                Ok(()) => wal::sync_dir(dir),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(EngineError::io(&path, e)),
            };
        }
        let text = serde_json::to_vec_pretty(self).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
        wal::replace_file(dir, COLD_FILE, &text).map_err(|e| EngineError::io(dir.join(COLD_FILE), e))
    }

    pub fn get(&self, year: i32) -> Option<&ColdYear> {
        self.years.iter().find(|y| y.year == year)
    }
}

fn store_err(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(format!("object store: {what}: {e}"))
}

/// The object store cold years live in, with the runtime that drives its requests and the read cache.
pub struct ColdStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    /// `store` without credentials, for messages.
    url: String,
    pub(super) after: Duration,
    /// The engine's zone (a thawed year's rows are stored as a write would store them).
    pub(super) tz: Option<chrono_tz::Tz>,
    /// The engine is synchronous (writer thread, blocking reads); object_store is async. Requests run on
    /// this runtime and the caller waits on a channel, which works from any thread, inside a Tokio
    /// runtime or not.
    rt: Option<tokio::runtime::Runtime>,
    meta: Mutex<HashMap<String, ArrowReaderMetadata>>,
    cache: Mutex<ChunkCache>,
}

impl std::fmt::Debug for ColdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ColdStore({})", self.url)
    }
}

impl Drop for ColdStore {
    fn drop(&mut self) {
        // Dropping a runtime inside another runtime's context panics; shutting it down in the
        // background does not.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The object store a `tiering` config names and the prefix objects live under (a `file://` store is
/// rooted at its directory, so its prefix is empty). Object names ([`ColdStore::object_name`]) are relative
/// to the prefix. No request is made; a `file://` directory is created. Also used by `mkts-ballista`, whose
/// executors read cold years straight from the store.
pub fn object_store_of(cfg: &TierConfig) -> Result<(Arc<dyn ObjectStore>, ObjPath)> {
    let bad = |m: String| EngineError::InvalidInput(format!("tiering.store {:?}: {m}", cfg.store));
    let url = url_parts(&cfg.store).ok_or_else(|| bad("expected file:///absolute/dir or s3://bucket[/prefix]".into()))?;
    Ok(match url {
        ("file", path) => {
            if !path.starts_with('/') {
                return Err(bad("a file:// store needs an absolute path (file:///dir)".into()));
            }
            std::fs::create_dir_all(path).map_err(|e| EngineError::io(path, e))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(path).map_err(|e| bad(e.to_string()))?;
            (Arc::new(fs), ObjPath::default())
        }
        ("s3", rest) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket name".into()));
            }
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
            for (k, v) in &cfg.s3 {
                let key: object_store::aws::AmazonS3ConfigKey =
                    k.parse().map_err(|_| bad(format!("unknown tiering.s3 setting {k:?}")))?;
                b = b.with_config(key, v.clone());
            }
            let s3 = b.build().map_err(|e| bad(e.to_string()))?;
            (Arc::new(s3), ObjPath::parse(prefix.trim_matches('/')).map_err(|e| bad(e.to_string()))?)
        }
        (scheme, _) => return Err(bad(format!("unsupported scheme {scheme:?} (file or s3)"))),
    })
}

impl ColdStore {
    /// Connect to the configured store (no request is made yet).
    pub fn open(cfg: &TierConfig, tz: Option<chrono_tz::Tz>) -> Result<ColdStore> {
        let (store, prefix) = object_store_of(cfg)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mkts-objstore")
            .enable_all()
            .build()
            .map_err(|e| EngineError::io("tokio runtime", e))?;
        Ok(ColdStore {
            store,
            prefix,
            url: cfg.store.clone(),
            after: cfg.after,
            tz,
            rt: Some(rt),
            meta: Mutex::new(HashMap::new()),
            cache: Mutex::new(ChunkCache::new(cfg.cache_bytes)),
        })
    }

    /// The store's URL as configured (it carries no credentials: those are settings or environment).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Run one request on the store's runtime and wait for it.
    fn run<T: Send + 'static>(&self, f: impl std::future::Future<Output = T> + Send + 'static) -> Result<T> {
        let rt = self.rt.as_ref().ok_or_else(|| EngineError::Unavailable("object store stopped".into()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().map_err(|_| EngineError::Unavailable("object store request was dropped".into()))
    }

    fn full(&self, object: &str) -> Result<ObjPath> {
        let rel = ObjPath::parse(object).map_err(|e| EngineError::Corrupt { path: COLD_FILE.into(), reason: format!("object {object:?}: {e}") })?;
        Ok(self.prefix.parts().chain(rel.parts()).collect())
    }

    /// The object name of `key`'s `year` as moved at `lsn` (relative to the prefix).
    pub fn object_name(key: &BucketKey, year: i32, lsn: u64) -> String {
        format!(
            "symbol={}/timeframe={}/attrgroup={}/year={year}/{lsn}.parquet",
            escape(&key.symbol),
            escape(&key.timeframe),
            escape(&key.attr_group)
        )
    }

    /// Put a complete object (atomic: a reader sees all of it or nothing).
    pub fn put(&self, object: &str, body: Bytes) -> Result<()> {
        let path = self.full(object)?;
        let store = self.store.clone();
        self.run(async move { store.put(&path, PutPayload::from_bytes(body)).await })?.map_err(|e| store_err(&format!("put {object}"), e))?;
        Ok(())
    }

    /// Delete an object; one that is already gone is not an error.
    pub fn delete(&self, object: &str) -> Result<()> {
        self.meta.lock().remove(object);
        self.cache.lock().forget(object);
        let path = self.full(object)?;
        let store = self.store.clone();
        match self.run(async move { store.delete(&path).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(&format!("delete {object}"), e)),
        }
    }

    fn metadata(&self, y: &ColdYear) -> Result<ArrowReaderMetadata> {
        if let Some(m) = self.meta.lock().get(&y.object) {
            return Ok(m.clone());
        }
        let path = self.full(&y.object)?;
        let mut reader = ObjectReader { store: self.store.clone(), path, size: y.bytes };
        let m = self
            .run(async move { ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new()).await })?
            .map_err(|e| store_err(&format!("read the footer of {}", y.object), e))?;
        self.meta.lock().insert(y.object.clone(), m.clone());
        Ok(m)
    }

    /// Rows of cold year `y` inside `[start, end]` as batches of `schema` (the read schema: Epoch first,
    /// Nanoseconds last for tick buckets). Columns the object lacks (added later) come as nulls.
    pub fn read_year(&self, y: &ColdYear, schema: &SchemaRef, kind: RecordKind, start: TimePoint, end: TimePoint) -> Result<Vec<RecordBatch>> {
        let meta = self.metadata(y)?;
        let file_schema = meta.schema().clone();
        let epoch_ix = file_schema.index_of(EPOCH).map_err(|_| EngineError::Corrupt { path: y.object.clone(), reason: "no Epoch column".into() })?;
        let md = meta.metadata().clone();
        // Row groups whose Epoch statistics overlap the range (all of them when a group has none).
        let groups: Vec<usize> = (0..md.num_row_groups())
            .filter(|&g| match epoch_bounds(md.row_group(g).column(epoch_ix).statistics()) {
                Some((lo, hi)) => hi >= start.secs && lo <= end.secs,
                None => true,
            })
            .collect();
        let wanted: Vec<(usize, usize)> = schema.fields().iter().enumerate().filter_map(|(i, f)| Some((i, file_schema.index_of(f.name()).ok()?))).collect();
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            let mut cols: Vec<Option<ArrayRef>> = vec![None; schema.fields().len()];
            let mut missing = Vec::new();
            {
                let mut cache = self.cache.lock();
                for &(i, fi) in &wanted {
                    match cache.get(&y.object, g, fi) {
                        Some(a) => cols[i] = Some(a),
                        None => missing.push((i, fi)),
                    }
                }
            }
            if !missing.is_empty() {
                let fetched = self.fetch_group(y, &meta, g, &missing.iter().map(|m| m.1).collect::<Vec<_>>())?;
                let mut cache = self.cache.lock();
                for ((i, fi), a) in missing.into_iter().zip(fetched) {
                    cache.put(&y.object, g, fi, a.clone());
                    cols[i] = Some(a);
                }
            }
            let rows = md.row_group(g).num_rows().max(0) as usize;
            let arrays = cols
                .into_iter()
                .zip(schema.fields())
                .map(|(a, f)| match a {
                    Some(a) if a.data_type() == f.data_type() => Ok(a),
                    Some(a) => Ok(cast(&a, f.data_type())?),
                    None => Ok(new_null_array(f.data_type(), rows)),
                })
                .collect::<Result<Vec<_>>>()?;
            let batch = RecordBatch::try_new(schema.clone(), arrays)?;
            let (lo, hi) = batch_range(&batch, kind, start, end)?;
            if hi > lo {
                out.push(batch.slice(lo, hi - lo));
            }
        }
        Ok(out)
    }

    /// Columns `roots` (indices of the file schema's top-level fields) of row group `g`, each as one array.
    fn fetch_group(&self, y: &ColdYear, meta: &ArrowReaderMetadata, g: usize, roots: &[usize]) -> Result<Vec<ArrayRef>> {
        let path = self.full(&y.object)?;
        let reader = ObjectReader { store: self.store.clone(), path, size: y.bytes };
        let mask = ProjectionMask::roots(meta.parquet_schema(), roots.iter().copied());
        let rows = meta.metadata().row_group(g).num_rows().max(1) as usize;
        let builder = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, meta.clone()).with_projection(mask).with_row_groups(vec![g]).with_batch_size(rows);
        let batches = self
            .run(async move {
                let stream = builder.build()?;
                stream.try_collect::<Vec<RecordBatch>>().await
            })?
            .map_err(|e| store_err(&format!("read {}", y.object), e))?;
        // The projected batch holds the roots in file order.
        let mut order: Vec<usize> = roots.to_vec();
        order.sort_unstable();
        let mut by_root: HashMap<usize, ArrayRef> = HashMap::new();
        for (pos, root) in order.iter().enumerate() {
            let parts: Vec<&dyn Array> = batches.iter().map(|b| b.column(pos).as_ref()).collect();
            let a = if parts.len() == 1 { batches[0].column(pos).clone() } else { concat(&parts)? };
            by_root.insert(*root, a);
        }
        roots.iter().map(|r| by_root.remove(r).ok_or_else(|| EngineError::Corrupt { path: y.object.clone(), reason: "projection".into() })).collect()
    }

    /// Every row of a cold year in `schema` (for a thaw).
    pub fn read_all(&self, y: &ColdYear, schema: &SchemaRef, kind: RecordKind) -> Result<Vec<RecordBatch>> {
        self.read_year(y, schema, kind, TimePoint::MIN, TimePoint::MAX)
    }

    /// Cache use: (bytes held, bound).
    pub fn cache_use(&self) -> (usize, usize) {
        let c = self.cache.lock();
        (c.bytes, c.limit)
    }
}

/// Parquet's async reader over one object whose size `cold.json` records (no HEAD request). parquet 59
/// deprecates its own object_store reader in favour of implementing [`AsyncFileReader`]; this is that.
struct ObjectReader {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    size: u64,
}

fn pq_err(e: object_store::Error) -> parquet::errors::ParquetError {
    parquet::errors::ParquetError::External(Box::new(e))
}

impl AsyncFileReader for ObjectReader {
    fn get_bytes(&mut self, range: std::ops::Range<u64>) -> futures::future::BoxFuture<'_, parquet::errors::Result<Bytes>> {
        Box::pin(async move { self.store.get_range(&self.path, range).await.map_err(pq_err) })
    }

    fn get_byte_ranges(&mut self, ranges: Vec<std::ops::Range<u64>>) -> futures::future::BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        Box::pin(async move { self.store.get_ranges(&self.path, &ranges).await.map_err(pq_err) })
    }

    fn get_metadata<'a>(&'a mut self, options: Option<&'a ArrowReaderOptions>) -> futures::future::BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        Box::pin(async move {
            let size = self.size;
            let m = ParquetMetaDataReader::new().with_arrow_reader_options(options).load_and_finish(self, size).await?;
            Ok(Arc::new(m))
        })
    }
}

/// Crash tests' hook: with `MKTS_CRASH_AT=<point>` in the environment the process kills itself with
/// SIGKILL at that point of a move or thaw (`tier:pending`, `tier:put`, `tier:commit`, `thaw:local`,
/// `thaw:commit`), exactly as `kill -9` would, so tests can prove each step is recoverable.
pub(super) fn crash_point(point: &str) {
    if std::env::var_os("MKTS_CRASH_AT").is_some_and(|v| v == point) {
        tracing::warn!(point, "MKTS_CRASH_AT: killing the process");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// `scheme://rest` → (scheme, rest).
fn url_parts(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once("://")?;
    Some((scheme, rest))
}

/// Hive-style escaping of a key segment: anything but `[A-Za-z0-9._-]` as `%XX` (keys are already
/// restricted to safe path segments; this keeps the object names portable whatever they hold).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Epoch bounds (seconds) of a row group from its statistics (written as microseconds, see [`encode`]).
fn epoch_bounds(s: Option<&Statistics>) -> Option<(i64, i64)> {
    match s? {
        Statistics::Int64(v) => Some((v.min_opt()?.div_euclid(1_000_000), v.max_opt()?.div_euclid(1_000_000))),
        _ => None,
    }
}

/// Rows `[lo, hi)` of a sorted batch inside `[start, end]` (Epoch seconds, then Nanoseconds for ticks).
fn batch_range(b: &RecordBatch, kind: RecordKind, start: TimePoint, end: TimePoint) -> Result<(usize, usize)> {
    let secs = b.column(0).to_data();
    let secs = arrow::array::Int64Array::from(secs.into_builder().data_type(DataType::Int64).build()?);
    let nanos = match kind {
        RecordKind::Variable => b.column_by_name(NANOSECONDS).and_then(|a| a.as_primitive_opt::<arrow::datatypes::Int32Type>().cloned()),
        RecordKind::Fixed => None,
    };
    let at = |i: usize| (secs.value(i), nanos.as_ref().map_or(0, |n| n.value(i)));
    let n = b.num_rows();
    let lo = partition_point_by(n, |i| at(i) < (start.secs, if kind == RecordKind::Variable { start.nanos } else { 0 }));
    let hi = partition_point_by(n, |i| at(i) <= (end.secs, if kind == RecordKind::Variable { end.nanos } else { i32::MAX }));
    Ok((lo, hi.max(lo)))
}

/// A year's rows as one Parquet object: sorted by Epoch (and Nanoseconds), zstd, row-group and page
/// statistics, the bucket key and log position in the key-value metadata. Second-resolution timestamps
/// are written as microseconds, which Parquet can type (DuckDB reads `TIMESTAMP WITH TIME ZONE`).
pub fn encode(key: &BucketKey, kind: RecordKind, lsn: u64, batches: &[RecordBatch]) -> Result<Bytes> {
    let Some(first) = batches.first() else { return Err(EngineError::InvalidInput("no rows to tier".into())) };
    let fields: Vec<Field> = first
        .schema()
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Timestamp(TimeUnit::Second, tz) => Field::new(f.name(), DataType::Timestamp(TimeUnit::Microsecond, tz.clone()), f.is_nullable()).with_metadata(f.metadata().clone()),
            _ => f.as_ref().clone(),
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let mut sorting = vec![SortingColumn { column_idx: 0, descending: false, nulls_first: false }];
    if kind == RecordKind::Variable {
        if let Ok(i) = schema.index_of(NANOSECONDS) {
            sorting.push(SortingColumn { column_idx: i as i32, descending: false, nulls_first: false });
        }
    }
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).map_err(|e| EngineError::InvalidInput(e.to_string()))?))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_sorting_columns(Some(sorting))
        .set_key_value_metadata(Some(vec![KeyValue::new("mkts.key".into(), key.to_string()), KeyValue::new("mkts.lsn".into(), lsn.to_string())]))
        .build();
    let pq = |e: parquet::errors::ParquetError| EngineError::InvalidInput(format!("parquet: {e}"));
    let mut w = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props)).map_err(pq)?;
    for b in batches {
        let cols = b.columns().iter().zip(schema.fields()).map(|(a, f)| if a.data_type() == f.data_type() { Ok(a.clone()) } else { cast(a, f.data_type()) }).collect::<std::result::Result<Vec<_>, _>>()?;
        w.write(&RecordBatch::try_new(schema.clone(), cols)?).map_err(pq)?;
    }
    Ok(Bytes::from(w.into_inner().map_err(pq)?))
}

/// Decoded column chunks `(object, row group, column)` of recent cold reads, least recently used out
/// first once `limit` bytes are held.
struct ChunkCache {
    map: HashMap<(String, usize, usize), (ArrayRef, u64)>,
    bytes: usize,
    limit: usize,
    clock: u64,
}

impl ChunkCache {
    fn new(limit: usize) -> ChunkCache {
        ChunkCache { map: HashMap::new(), bytes: 0, limit, clock: 0 }
    }

    fn get(&mut self, object: &str, g: usize, c: usize) -> Option<ArrayRef> {
        self.clock += 1;
        let clock = self.clock;
        self.map.get_mut(&(object.to_string(), g, c)).map(|(a, used)| {
            *used = clock;
            a.clone()
        })
    }

    fn put(&mut self, object: &str, g: usize, c: usize, a: ArrayRef) {
        let size = a.get_array_memory_size();
        if size > self.limit {
            return;
        }
        self.clock += 1;
        if let Some((old, _)) = self.map.insert((object.to_string(), g, c), (a, self.clock)) {
            self.bytes -= old.get_array_memory_size();
        }
        self.bytes += size;
        while self.bytes > self.limit {
            let Some(k) = self.map.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| k.clone()) else { break };
            if let Some((a, _)) = self.map.remove(&k) {
                self.bytes -= a.get_array_memory_size();
            }
        }
    }

    fn forget(&mut self, object: &str) {
        let keys: Vec<_> = self.map.keys().filter(|k| k.0 == object).cloned().collect();
        for k in keys {
            if let Some((a, _)) = self.map.remove(&k) {
                self.bytes -= a.get_array_memory_size();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_hive_style_and_escaped() {
        let k = BucketKey::parse("BRK.B/1Min/OHLCV").unwrap();
        assert_eq!(ColdStore::object_name(&k, 2023, 42), "symbol=BRK.B/timeframe=1Min/attrgroup=OHLCV/year=2023/42.parquet");
        assert_eq!(escape("A B%"), "A%20B%25");
    }

    #[test]
    fn bad_store_urls_are_refused() {
        for bad in ["/tmp/x", "file://relative", "gs://b", "s3://"] {
            assert!(ColdStore::open(&TierConfig::new(bad), None).is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_stays_within_its_bound() {
        let a: ArrayRef = Arc::new(arrow::array::Int64Array::from(vec![0i64; 1000]));
        let size = a.get_array_memory_size();
        let mut c = ChunkCache::new(size * 2 + 1);
        for g in 0..5 {
            c.put("o", g, 0, a.clone());
            assert!(c.bytes <= c.limit);
        }
        assert!(c.get("o", 4, 0).is_some());
        assert!(c.get("o", 0, 0).is_none());
        c.forget("o");
        assert_eq!(c.bytes, 0);
    }
}
