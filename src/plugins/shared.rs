//! Shared-library plugins: `cdylib`s on the versioned C ABI of `mkts-plugin-api`, loaded with libloading.
//!
//! The host reads the exported descriptor, checks its ABI version before touching anything else, and talks
//! to the instance only through the descriptor's function tables. Every call into the library runs under
//! `catch_unwind` (the tables are `extern "C-unwind"`), and a plugin reporting a panic is disabled and never
//! called again — not even to free it, since its state may be broken. A crash that is not a panic (a
//! segfault in C code) cannot be contained in-process: run such plugins out of process instead.
//!
//! The host side of the ABI ([`HostState`], the `host_*` callbacks) gives plugins durable writes (which fire
//! triggers like any write), SQL and key/range reads through the operations layer ([`crate::service`], as
//! a [`Caller`] on the plugin interface, policy checked there), and the server log. Errors cross the ABI
//! as text with their class first (`permission denied: …`, [`crate::service::ServiceError::describe`]).

use std::ffi::{c_void, CStr};
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow::array::{RecordBatch, RecordBatchIterator};
use arrow::datatypes::SchemaRef;
use mkts_plugin_api::{
    guarded, batch_from_ffi, batch_to_ffi, panic_message, ErrorSink, FFI_ArrowArray, FFI_ArrowArrayStream, FFI_ArrowSchema, HostApi,
    PluginDescriptor, StrRef, TriggerVTable, WorkerVTable, ABI_VERSION, DESCRIPTOR_SYMBOL, STATUS_ERROR, STATUS_OK, STATUS_PANIC,
};

use super::{PluginError, TriggerPlugin, WorkerPlugin};
use crate::engine::{AppendEvent, TimePoint};
use crate::metrics::PluginStats;
use crate::service::request::parse_key;
use crate::service::{Client, QueryRequest, ReadRequest, ServiceError, WriteRequest};

struct Loaded {
    /// Never unloaded: a plugin thread that outlived a shutdown deadline may still run its code, and
    /// unloading buys nothing in a server that loads its plugins once.
    _lib: ManuallyDrop<libloading::Library>,
    desc: &'static PluginDescriptor,
    path: PathBuf,
    name: String,
}

/// A loaded plugin library whose ABI version matched.
#[derive(Clone)]
pub struct Library(Arc<Loaded>);

impl Library {
    /// Load `path` and check its descriptor. Errors are one line naming the file and the problem.
    pub fn load(path: &Path) -> Result<Library, PluginError> {
        let shown = path.display();
        let sym = String::from_utf8_lossy(&DESCRIPTOR_SYMBOL[..DESCRIPTOR_SYMBOL.len() - 1]).into_owned();
        // Loading runs a library's initialisers (a MarketStore Go plugin would start a Go runtime inside the
        // server): only load files that name our descriptor symbol at all.
        let bytes = std::fs::read(path).map_err(|e| PluginError::Incompatible(format!("cannot read {shown}: {e}")))?;
        if !bytes.windows(sym.len()).any(|w| w == sym.as_bytes()) {
            return Err(PluginError::Incompatible(format!("{shown} is not an mkts plugin (no `{sym}` symbol; build it on the mkts-plugin-api crate)")));
        }
        drop(bytes);
        // SAFETY: loading runs the library's initialisers; configuring a plugin is trusting it.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| PluginError::Incompatible(format!("cannot load {shown}: {e}")))?;
        let desc_fn = unsafe { lib.get::<unsafe extern "C" fn() -> *const PluginDescriptor>(DESCRIPTOR_SYMBOL) }
            .map_err(|_| PluginError::Incompatible(format!("{shown} is not an mkts plugin (no `{sym}` symbol; build it on the mkts-plugin-api crate)")))?;
        let desc = unsafe { desc_fn() };
        if desc.is_null() {
            return Err(PluginError::Incompatible(format!("{shown}: `{sym}` returned null")));
        }
        // `abi_version` is the first field in every ABI version: safe to read before knowing the rest.
        let version = unsafe { *(desc as *const u32) };
        if version != ABI_VERSION {
            return Err(PluginError::Incompatible(format!(
                "{shown} speaks plugin ABI version {version}, this server speaks {ABI_VERSION}: rebuild it against mkts-plugin-api {}",
                crate::context::VERSION
            )));
        }
        // SAFETY: the version matched, so the descriptor has this layout, and it is a static of the library,
        // which is never unloaded.
        let desc: &'static PluginDescriptor = unsafe { &*desc };
        let name = if desc.name.is_null() {
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        } else {
            unsafe { CStr::from_ptr(desc.name) }.to_string_lossy().into_owned()
        };
        tracing::info!(path = %shown, plugin = name, "loaded shared-library plugin");
        Ok(Library(Arc::new(Loaded { _lib: ManuallyDrop::new(lib), desc, path: path.to_path_buf(), name })))
    }

    pub fn has_trigger(&self) -> bool {
        !self.0.desc.trigger.is_null()
    }

    pub fn has_worker(&self) -> bool {
        !self.0.desc.worker.is_null()
    }

    fn trigger_vt(&self) -> TriggerVTable {
        unsafe { *self.0.desc.trigger }
    }

    fn worker_vt(&self) -> WorkerVTable {
        unsafe { *self.0.desc.worker }
    }

    /// Build a trigger instance from its JSON config (on the trigger's own thread).
    pub fn create_trigger(&self, config: &str, host: HostState) -> Result<SharedTrigger, PluginError> {
        let vt = self.trigger_vt();
        let host = HostBox::new(host);
        let inst = create(&self.0, |out, err| unsafe { (vt.create)(StrRef::new(config), host.api(), out, err) })?;
        Ok(SharedTrigger { lib: self.clone(), vt, inst, poisoned: false, _host: host })
    }

    /// Build a worker instance and run it on a thread of its own.
    pub fn start_worker(&self, config: &str, host: HostState, stats: Arc<PluginStats>) -> Result<SharedWorker, PluginError> {
        let vt = self.worker_vt();
        let name = host.name.clone();
        let shared = Arc::new(WorkerShared { inst: Mutex::new(None), stop_requested: Default::default() });
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let lib = self.clone();
        let config = config.to_string();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("worker {}", self.0.name))
            .spawn(move || {
                let host = HostBox::new(host);
                run_worker(&lib, vt, &config, &host, &thread_shared, &stats);
                stats.up.store(false, Ordering::Relaxed);
                drop(host);
                let _ = done_tx.send(());
            })
            .map_err(|e| PluginError::Start(format!("cannot start a thread: {e}")))?;
        Ok(SharedWorker { vt, shared, done: done_rx, name })
    }
}

/// Call a `create` entry point under `catch_unwind`; the new instance pointer.
fn create(lib: &Loaded, f: impl FnOnce(*mut *mut c_void, ErrorSink) -> i32) -> Result<Inst, PluginError> {
    let mut out: *mut c_void = std::ptr::null_mut();
    let mut msg = String::new();
    let st = catch_unwind(AssertUnwindSafe(|| f(&mut out, ErrorSink::to_string(&mut msg))));
    match st {
        Ok(STATUS_OK) if !out.is_null() => Ok(Inst(out)),
        Ok(STATUS_OK) => Err(PluginError::Fatal(format!("{}: create returned no instance", lib.path.display()))),
        Ok(STATUS_PANIC) => Err(PluginError::Fatal(format!("panicked while starting: {msg}"))),
        Ok(_) => Err(PluginError::Start(if msg.is_empty() { "create failed".into() } else { msg })),
        Err(p) => Err(PluginError::Fatal(format!("panicked while starting: {}", panic_message(p.as_ref())))),
    }
}

/// An instance pointer owned by the library's code.
#[derive(Clone, Copy)]
struct Inst(*mut c_void);
// SAFETY: the ABI requires instances to be usable from the host's threads (one call at a time for triggers;
// `stop` concurrently with `run` for workers, which the ABI documents).
unsafe impl Send for Inst {}

/// A shared-library trigger instance.
pub struct SharedTrigger {
    lib: Library,
    vt: TriggerVTable,
    inst: Inst,
    /// Set once the plugin panicked: it is never called again, nor freed.
    poisoned: bool,
    _host: HostBox,
}

impl TriggerPlugin for SharedTrigger {
    fn fire(&mut self, ev: &AppendEvent) -> Result<(), PluginError> {
        if self.poisoned {
            return Err(PluginError::Fatal("disabled after a panic".into()));
        }
        let (mut array, schema) = batch_to_ffi(&ev.batch).map_err(PluginError::Call)?;
        let key = ev.key.to_string();
        let mut msg = String::new();
        let (vt, inst) = (self.vt, self.inst);
        // The callee moves `array` out; if it does not (an early error), dropping ours releases it.
        let st = catch_unwind(AssertUnwindSafe(|| unsafe {
            (vt.fire)(inst.0, StrRef::new(&key), &mut array, &schema, ErrorSink::to_string(&mut msg))
        }));
        match st {
            Ok(STATUS_OK) => Ok(()),
            Ok(STATUS_PANIC) => {
                self.poisoned = true;
                Err(PluginError::Fatal(format!("{} panicked: {msg}", self.lib.0.name)))
            }
            Ok(_) => Err(PluginError::Call(if msg.is_empty() { "fire failed".into() } else { msg })),
            Err(p) => {
                self.poisoned = true;
                Err(PluginError::Fatal(format!("{} panicked: {}", self.lib.0.name, panic_message(p.as_ref()))))
            }
        }
    }
}

impl Drop for SharedTrigger {
    fn drop(&mut self) {
        if !self.poisoned {
            let (vt, inst) = (self.vt, self.inst);
            let _ = catch_unwind(AssertUnwindSafe(|| unsafe { (vt.destroy)(inst.0) }));
        }
    }
}

struct WorkerShared {
    /// The instance while it exists; `stop` and the final `destroy` take the lock, so they never overlap.
    inst: Mutex<Option<Inst>>,
    stop_requested: std::sync::atomic::AtomicBool,
}

fn run_worker(lib: &Library, vt: WorkerVTable, config: &str, host: &HostBox, shared: &WorkerShared, stats: &PluginStats) {
    let name = &host.state.name;
    let inst = match create(&lib.0, |out, err| unsafe { (vt.create)(StrRef::new(config), host.api(), out, err) }) {
        Ok(i) => i,
        Err(e) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(worker = name, "worker not started: {e}");
            return;
        }
    };
    {
        let mut slot = shared.inst.lock().unwrap_or_else(|p| p.into_inner());
        if shared.stop_requested.load(Ordering::Acquire) {
            let _ = catch_unwind(AssertUnwindSafe(|| unsafe { (vt.destroy)(inst.0) }));
            return;
        }
        *slot = Some(inst);
    }
    let mut msg = String::new();
    let st = catch_unwind(AssertUnwindSafe(|| unsafe { (vt.run)(inst.0, ErrorSink::to_string(&mut msg)) }));
    let mut slot = shared.inst.lock().unwrap_or_else(|p| p.into_inner());
    let inst = slot.take();
    match st {
        Ok(STATUS_OK) => tracing::info!(worker = name, "worker finished"),
        Ok(STATUS_ERROR) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(worker = name, "worker failed: {msg}");
        }
        Ok(_) | Err(_) => {
            let m = match st {
                Err(p) => panic_message(p.as_ref()),
                _ => msg,
            };
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(worker = name, "worker panicked and is disabled: {m}");
            return; // poisoned: not freed
        }
    }
    if let Some(inst) = inst {
        let _ = catch_unwind(AssertUnwindSafe(|| unsafe { (vt.destroy)(inst.0) }));
    }
}

/// A shared-library worker running on its own thread.
pub struct SharedWorker {
    vt: WorkerVTable,
    shared: Arc<WorkerShared>,
    done: std::sync::mpsc::Receiver<()>,
    name: String,
}

impl WorkerPlugin for SharedWorker {
    fn stop(self: Box<Self>, deadline: Instant) {
        {
            self.shared.stop_requested.store(true, Ordering::Release);
            let slot = self.shared.inst.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(inst) = *slot {
                let vt = self.vt;
                if catch_unwind(AssertUnwindSafe(|| unsafe { (vt.stop)(inst.0) })).is_err() {
                    tracing::error!(worker = self.name, "worker panicked in stop");
                }
            }
        }
        if self.done.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_err() {
            tracing::warn!(worker = self.name, "worker did not return from run before the shutdown deadline");
        }
    }
}

/// What the host gives one plugin instance: a client of the operations layer (as the plugin interface),
/// the plugin's name for its log lines, the runtime.
pub struct HostState {
    client: Client,
    name: String,
    rt: tokio::runtime::Handle,
}

impl HostState {
    /// Must be called inside the tokio runtime (it keeps a handle for SQL queries).
    pub fn new(client: Client, name: String) -> Self {
        HostState { client, name, rt: tokio::runtime::Handle::current() }
    }
}

/// The host table and the state it points to, kept at stable addresses for the instance's life.
pub struct HostBox {
    api: Box<HostApi>,
    state: Box<HostState>,
}

// SAFETY: `api.ctx` points into `state`, which is Send + Sync; the table is read-only.
unsafe impl Send for HostBox {}

impl HostBox {
    fn new(state: HostState) -> Self {
        let state = Box::new(state);
        let api = Box::new(HostApi {
            abi_version: ABI_VERSION,
            ctx: &*state as *const HostState as *const c_void,
            write: host_write,
            query: host_query,
            log: host_log,
        });
        HostBox { api, state }
    }

    fn api(&self) -> *const HostApi {
        &*self.api
    }
}

/// Host calls block; on one of the server's async threads they would stall it (and `block_on` panics).
fn off_runtime() -> Result<(), String> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err("host calls must be made from the plugin's own threads (fire, run, or threads it started)".into());
    }
    Ok(())
}

unsafe extern "C" fn host_write(
    ctx: *const c_void,
    key: StrRef,
    array: *mut FFI_ArrowArray,
    schema: *const FFI_ArrowSchema,
    rows_out: *mut u64,
    err: ErrorSink,
) -> i32 {
    guarded(err, || {
        // Take the batch first, so it is released whatever fails next.
        let batch = unsafe { batch_from_ffi(array, schema) }?;
        let st = unsafe { &*(ctx as *const HostState) };
        let key = unsafe { key.as_str() }?;
        let key = parse_key(key).map_err(|e| e.describe())?;
        off_runtime()?;
        let ack = st.client.write_blocking(&WriteRequest::new(key, batch)).map_err(|e| e.describe())?;
        if !rows_out.is_null() {
            unsafe { *rows_out = ack.rows as u64 };
        }
        Ok(())
    })
}

unsafe extern "C" fn host_query(ctx: *const c_void, request: StrRef, out: *mut FFI_ArrowArrayStream, err: ErrorSink) -> i32 {
    guarded(err, || {
        let st = unsafe { &*(ctx as *const HostState) };
        if out.is_null() {
            return Err("null output stream".into());
        }
        let text = unsafe { request.as_str() }?;
        let req: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("query request is not JSON: {e}"))?;
        off_runtime()?;
        let (schema, batches) = run_query(st, &req).map_err(|e| e.describe())?;
        let reader = RecordBatchIterator::new(batches.into_iter().map(Ok), schema);
        unsafe { std::ptr::write(out, FFI_ArrowArrayStream::new(Box::new(reader))) };
        Ok(())
    })
}

/// The operations-layer query of a plugin's JSON request: `{"sql": …}` or `{"key": …, "start", "end",
/// "limit"}` (epoch seconds, inclusive; `limit` keeps the last rows, MarketStore's default, unless
/// `"limit_from_first": true`).
pub fn plugin_query(req: &serde_json::Value) -> Result<QueryRequest, ServiceError> {
    if let Some(sql) = req.get("sql").and_then(|v| v.as_str()) {
        return Ok(QueryRequest::Sql(sql.to_string()));
    }
    let Some(key) = req.get("key").and_then(|v| v.as_str()) else {
        return Err(ServiceError::invalid("query request needs \"sql\" or \"key\""));
    };
    let mut r = ReadRequest::key(&parse_key(key)?);
    r.start = req.get("start").and_then(|v| v.as_i64()).map(TimePoint::secs);
    r.end = req.get("end").and_then(|v| v.as_i64()).map(TimePoint::secs);
    r.limit = req.get("limit").and_then(|v| v.as_u64()).map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    r.from_start = req.get("limit_from_first").and_then(|v| v.as_bool()).unwrap_or(false);
    Ok(QueryRequest::Read(r))
}

fn run_query(st: &HostState, req: &serde_json::Value) -> Result<(SchemaRef, Vec<RecordBatch>), ServiceError> {
    match plugin_query(req)? {
        QueryRequest::Sql(sql) => st.rt.block_on(st.client.sql(&sql)),
        QueryRequest::Read(r) => {
            let part = st.client.read_blocking(&r)?.parts.pop();
            let part = part.ok_or_else(|| ServiceError::not_found("no data"))?;
            Ok((part.schema, part.batches))
        }
    }
}

unsafe extern "C" fn host_log(ctx: *const c_void, level: u32, msg: StrRef) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let st = unsafe { &*(ctx as *const HostState) };
        let msg = unsafe { msg.as_str() }.unwrap_or("<log line is not UTF-8>");
        let plugin = st.name.as_str();
        match level {
            mkts_plugin_api::LOG_ERROR => tracing::error!(plugin, "{msg}"),
            mkts_plugin_api::LOG_WARN => tracing::warn!(plugin, "{msg}"),
            mkts_plugin_api::LOG_DEBUG => tracing::debug!(plugin, "{msg}"),
            _ => tracing::info!(plugin, "{msg}"),
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    /// The host side of the C ABI, driven through the plugin-side `Host` exactly as a library would.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn host_table_writes_queries_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::engine::Engine::open(crate::engine::EngineConfig::new(dir.path())).unwrap();
        let service = Arc::new(crate::service::Service::new(engine.clone(), chrono_tz::UTC, None));
        let client = Client::new(service, crate::service::Caller::anonymous(crate::service::Interface::Plugin));
        let hb = HostBox::new(HostState::new(client, "test".into()));
        let api = hb.api() as usize;
        let out = std::thread::spawn(move || {
            let host = unsafe { mkts_plugin_api::Host::from_raw(api as *const HostApi) }.unwrap();
            let schema = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false), Field::new("Value", DataType::Float64, false)]));
            let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![60, 120, 180])), Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0]))]).unwrap();
            assert_eq!(host.write("ABC/1Min/OHLCV", &batch).unwrap(), 3);
            let read = host.read("ABC/1Min/OHLCV", Some(120), None).unwrap();
            let values: Vec<f64> = read.iter().flat_map(|b| b.column_by_name("Value").unwrap().as_any().downcast_ref::<Float64Array>().unwrap().values().to_vec()).collect();
            let sql = host.sql("SELECT sum(\"Value\") AS s FROM \"ABC/1Min/OHLCV\"").unwrap();
            let sum = sql[0].column(0).as_any().downcast_ref::<Float64Array>().unwrap().value(0);
            let bad_key = host.write("../escape", &batch).unwrap_err();
            let bad_query = host.query_json(&serde_json::json!({"nope": 1})).unwrap_err();
            (values, sum, bad_key, bad_query)
        })
        .join()
        .unwrap();
        assert_eq!(out.0, vec![2.0, 3.0]);
        assert_eq!(out.1, 6.0);
        assert!(out.2.contains("escape") || out.2.contains("key"), "{}", out.2);
        assert!(out.3.contains("needs \"sql\" or \"key\""), "{}", out.3);
        // On the server's async threads host calls are refused instead of stalling them.
        let host = unsafe { mkts_plugin_api::Host::from_raw(hb.api()) }.unwrap();
        assert!(host.sql("SELECT 1").unwrap_err().contains("plugin's own threads"));
        assert_eq!(engine.keys().len(), 1);
    }
}
