//! The scheduler and executor processes: Ballista's own, with mkts's catalog, codecs, functions and the
//! cold store installed in every session.
//!
//! What each process needs:
//! - the **scheduler** plans SQL (Ballista's Flight SQL endpoint, or plans sent by a Ballista client): its
//!   sessions have the `mkts` catalog ([`crate::table`]), `time_bucket` and `asof_join`, the server's SQL
//!   settings (case-sensitive identifiers, default catalog `mkts.public`), and the cold store;
//! - every **executor** runs tasks: it decodes plans with the same codecs, knows `time_bucket`, reads cold
//!   objects from the store it builds from its own `tiering:` settings, and fetches hot years from the
//!   server named in the plan.

use std::sync::Arc;
use std::time::Duration;

use ballista_core::extension::SessionConfigExt;
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_executor::executor_process::{start_executor_process, ExecutorProcessConfig};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_core::flight_proxy_service::BallistaFlightProxyService;
use ballista_core::serde::protobuf::scheduler_grpc_server::SchedulerGrpcServer;
use ballista_flight_sql::{BallistaFlightSqlService, QueryBackend, QueryResult};
use ballista_scheduler::scheduler_process::create_scheduler;
use ballista_scheduler::scheduler_server::SchedulerServer;
use arrow_flight::flight_service_server::FlightServiceServer;
use datafusion::logical_expr::LogicalPlan;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};
use mkts::engine::TierConfig;
use object_store::path::Path as ObjPath;
use object_store::ObjectStore;

use crate::codec::{MktsLogicalCodec, MktsPhysicalCodec};
use crate::remote::Remote;
use crate::table::{ColdLayout, RemoteCatalog, CATALOG, SCHEMA};
use crate::{ClusterError, Result, COLD_STORE_URL};

/// What every process of a cluster is configured with.
#[derive(Clone)]
pub struct ClusterSettings {
    /// The mkts server hot years are read from (scheduler: also its catalog).
    pub remote: Remote,
    /// The cold store, when the server tiers.
    pub store: Option<(Arc<dyn ObjectStore>, ObjPath)>,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings").field("remote", &self.remote).field("store", &self.store.as_ref().map(|(s, p)| format!("{s} {p}"))).finish()
    }
}

impl ClusterSettings {
    /// Settings for `remote`, with the cold store `tiering` names (None: the server does not tier).
    pub fn new(remote: Remote, tiering: Option<&TierConfig>) -> Result<ClusterSettings> {
        let store = tiering.map(mkts::engine::tier::object_store_of).transpose().map_err(|e| ClusterError::Config(e.to_string()))?;
        Ok(ClusterSettings { remote, store })
    }

    fn layout(&self) -> ColdLayout {
        ColdLayout { prefix: self.store.as_ref().map(|(_, p)| p.clone()).unwrap_or_default() }
    }

    /// The session configuration of every process: Ballista's, with the server's SQL settings.
    pub fn session_config() -> SessionConfig {
        let mut config = SessionConfig::new_with_ballista()
            .with_information_schema(true)
            .with_create_default_catalog_and_schema(false)
            .with_default_catalog_and_schema(CATALOG, SCHEMA);
        config.options_mut().sql_parser.enable_ident_normalization = false;
        // Ballista's static distributed planner: with the adaptive one (Ballista 55's default), a query whose
        // executor was killed mid-stage was resubmitted after a shuffle fetch failure and then waited
        // forever ("Can't find active stage"); the static planner reruns the lost tasks and answers
        // (tests/python/test_ballista.py, the executor-kill test).
        config.set_str(ballista_core::config::BALLISTA_ADAPTIVE_PLANNER_ENABLED, "false")
    }

    /// A runtime whose object-store registry has the cold store under [`COLD_STORE_URL`].
    pub fn runtime(&self) -> datafusion::error::Result<Arc<RuntimeEnv>> {
        let rt = RuntimeEnvBuilder::new().build_arc()?;
        let hot = datafusion::execution::object_store::ObjectStoreUrl::parse(crate::exec::HOT_STORE_URL)?;
        rt.register_object_store(hot.as_ref(), Arc::new(object_store::memory::InMemory::new()));
        if let Some((store, _)) = &self.store {
            let url = datafusion::execution::object_store::ObjectStoreUrl::parse(COLD_STORE_URL)?;
            rt.register_object_store(url.as_ref(), store.clone());
        }
        Ok(rt)
    }

    /// A scheduler session: catalog, functions, runtime.
    pub fn session_state(&self, config: SessionConfig) -> datafusion::error::Result<SessionState> {
        let state = SessionStateBuilder::new().with_config(config).with_runtime_env(self.runtime()?).with_default_features().build();
        let ctx = SessionContext::new_with_state(state);
        ctx.register_catalog(CATALOG, Arc::new(RemoteCatalog::new(self.remote.clone(), self.layout())));
        mkts_udf::register_all(&ctx);
        Ok(ctx.state())
    }

    /// The functions executors decode plans with: DataFusion's and Ballista's, plus `time_bucket`.
    pub fn function_registry() -> BallistaFunctionRegistry {
        let mut r = BallistaFunctionRegistry::default();
        let tb = mkts_udf::TimeBucket::udf();
        r.scalar_functions.insert(tb.name().to_string(), Arc::new(tb));
        r
    }

    pub fn logical_codec(&self) -> Arc<MktsLogicalCodec> {
        Arc::new(MktsLogicalCodec::new(self.layout()))
    }

    pub fn physical_codec() -> Arc<MktsPhysicalCodec> {
        Arc::new(MktsPhysicalCodec::default())
    }
}

/// How a scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    pub bind_host: String,
    pub port: u16,
    /// An executor that has not sent a heartbeat for this long is lost: its tasks run elsewhere.
    pub executor_timeout: Duration,
    /// How often a task may fail before its job does.
    pub task_max_failures: usize,
}

/// Run a scheduler (with its Flight SQL endpoint) until the process stops.
pub async fn run_scheduler(settings: ClusterSettings, opts: SchedulerOptions) -> Result<()> {
    let addr: std::net::SocketAddr = format!("{}:{}", opts.bind_host, opts.port).parse().map_err(|e| ClusterError::Config(format!("bind address: {e}")))?;
    let for_sessions = settings.clone();
    let timeout = opts.executor_timeout.as_secs().max(1);
    let config = SchedulerConfig {
        bind_host: opts.bind_host.clone(),
        external_host: opts.bind_host.clone(),
        bind_port: opts.port,
        flight_sql: true,
        executor_timeout_seconds: timeout,
        expire_dead_executor_interval_seconds: (timeout / 2).clamp(1, 5),
        executor_termination_grace_period: 0,
        task_max_failures: opts.task_max_failures.max(1),
        override_config_producer: Some(Arc::new(ClusterSettings::session_config)),
        override_session_builder: Some(Arc::new(move |c: SessionConfig| for_sessions.session_state(c))),
        override_logical_codec: Some(settings.logical_codec()),
        override_physical_codec: Some(ClusterSettings::physical_codec()),
        ..Default::default()
    };
    let ballista = |e: ballista_core::error::BallistaError| ClusterError::Ballista(e.to_string());
    config.validate().map_err(ballista)?;
    let config = Arc::new(config);
    let cluster = BallistaCluster::new_from_config(&config).await.map_err(ballista)?;
    let scheduler = create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, config.clone()).await.map_err(ballista)?;
    let (max_dec, max_enc) = (config.grpc_server_max_decoding_message_size as usize, config.grpc_server_max_encoding_message_size as usize);
    // Ballista's own scheduler service, and its Flight SQL front end over a backend that reports each
    // result's schema correctly (see `ResultSchema`); its DoGet fallback proxies partition fetches.
    let grpc = SchedulerGrpcServer::new(scheduler.clone()).max_decoding_message_size(max_dec).max_encoding_message_size(max_enc);
    let proxy = BallistaFlightProxyService::new(max_dec, max_enc, false, None);
    let flight_sql = BallistaFlightSqlService::new(Arc::new(ResultSchema { inner: Arc::new(scheduler) }), proxy);
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(grpc);
    routes.add_service(FlightServiceServer::new(flight_sql).max_decoding_message_size(max_dec).max_encoding_message_size(max_enc));
    let router = routes.routes().into_axum_router();
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| ClusterError::Config(format!("bind {addr}: {e}")))?;
    tracing::info!("Ballista scheduler with Flight SQL on {addr}");
    axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>())
        .await
        .map_err(|e| ClusterError::Ballista(e.to_string()))
}

/// The scheduler's Flight SQL backend with one correction: Ballista 55 reports a result's schema as its
/// final stage's plan schema, which can be the plan below the statement's last projection (aliases lost,
/// a sort key still there), and ADBC rejects data that does not match it. The schema of the statement's
/// physical plan is the one the result partitions carry.
struct ResultSchema {
    inner: Arc<SchedulerServer<LogicalPlanNode, PhysicalPlanNode>>,
}

#[async_trait::async_trait]
impl QueryBackend for ResultSchema {
    async fn session(&self, session_id: &str) -> ballista_core::error::Result<Arc<SessionContext>> {
        self.inner.session(session_id).await
    }

    async fn close_session(&self, session_id: &str) -> ballista_core::error::Result<()> {
        self.inner.close_session(session_id).await
    }

    async fn execute(&self, job_name: &str, ctx: Arc<SessionContext>, plan: LogicalPlan) -> ballista_core::error::Result<QueryResult> {
        let schema = ctx.state().create_physical_plan(&plan).await?.schema();
        let mut result = self.inner.execute(job_name, ctx, plan).await?;
        result.schema = schema;
        Ok(result)
    }
}

/// How an executor runs.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    pub bind_host: String,
    /// Its Flight port (shuffle data) and its gRPC port.
    pub port: u16,
    pub grpc_port: u16,
    pub scheduler_host: String,
    pub scheduler_port: u16,
    /// Task slots (default: the machine's cores).
    pub concurrent_tasks: usize,
    /// Where shuffle files go (default: a temporary directory).
    pub work_dir: Option<String>,
    pub heartbeat: Duration,
}

/// Run an executor until the process stops.
pub async fn run_executor(settings: ClusterSettings, opts: ExecutorOptions) -> Result<()> {
    let for_runtime = settings.clone();
    let config = ExecutorProcessConfig {
        bind_host: opts.bind_host.clone(),
        external_host: Some(opts.bind_host.clone()),
        port: opts.port,
        grpc_port: opts.grpc_port,
        scheduler_host: opts.scheduler_host.clone(),
        scheduler_port: opts.scheduler_port,
        vcores: opts.concurrent_tasks.max(1),
        work_dir: opts.work_dir.clone(),
        executor_heartbeat_interval_seconds: opts.heartbeat.as_secs().max(1),
        override_function_registry: Some(Arc::new(ClusterSettings::function_registry())),
        override_config_producer: Some(Arc::new(ClusterSettings::session_config)),
        override_runtime_producer: Some(Arc::new(move |_c: &SessionConfig| for_runtime.runtime())),
        override_logical_codec: Some(settings.logical_codec()),
        override_physical_codec: Some(ClusterSettings::physical_codec()),
        ..Default::default()
    };
    start_executor_process(Arc::new(config)).await.map_err(|e| ClusterError::Ballista(e.to_string()))
}
