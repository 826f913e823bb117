//! `mkts start`: compose the engine, the interfaces and the plugins into one running server.
//!
//! Start-up order: open the engine (replaying the log), bind both listeners (so a port in use is one clear
//! error before anything runs), serve, start plugins, then report ready. Shutdown (SIGINT/SIGTERM) runs in
//! reverse: not ready, grace period, plugins, listeners, final checkpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::context::ServerContext;
use crate::engine::{Engine, EngineConfig, Policy};

/// A started server (listeners bound, serving). Used by `mkts start` and by tests.
pub struct RunningServer {
    pub ctx: Arc<ServerContext>,
    pub http_addr: SocketAddr,
    pub grpc_addr: Option<SocketAddr>,
    /// The replication port (a master only).
    pub replication_addr: Option<SocketAddr>,
    /// The `utilities_url` listener (`/heartbeat`, CPU profiles), when configured.
    pub utilities_addr: Option<SocketAddr>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The configured triggers and background workers.
    plugins: Option<crate::plugins::PluginHost>,
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow!("cannot listen on {addr} ({what}): {e}"))
}

/// Open the engine and start serving per `config`.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    // Certificates and users first: a bad file is one clear error before the engine replays anything.
    let tls = config.tls.as_ref().map(crate::tls::load).transpose().map_err(|e| anyhow!(e))?;
    let auth = config.auth.as_ref().map(crate::auth::Authenticator::new).transpose().map_err(|e| anyhow!("auth: {e}"))?;
    let mut ecfg = EngineConfig::new(&config.root_directory);
    ecfg.policy = Policy { enable_add: config.enable_add, enable_remove: config.enable_remove, queryable: config.queryable };
    ecfg.retention = config.retention.clone();
    ecfg.auto_add_columns = config.auto_add_columns;
    ecfg.tiering = config.tiering.clone();
    ecfg.timezone = mkts_udf::parse_timezone(Some(&config.timezone)).map_err(|e| anyhow!("timezone: {e}"))?;
    if let Some(r) = &config.replication {
        if r.enabled {
            // What a reconnecting replica can resume from without an image.
            ecfg.change_window_bytes = r.retain_mb.saturating_mul(1 << 20);
        }
        if r.is_replica() {
            // The master's retention deletes arrive as changes; running them here too would race them.
            ecfg.retention.clear();
        }
    }
    let replication_tls = match config.replication.as_ref().filter(|r| r.enabled && r.tls_enabled) {
        Some(r) => {
            let files = crate::config::TlsConfig { cert_file: r.cert_file.clone().unwrap_or_default(), key_file: r.key_file.clone().unwrap_or_default(), ca_file: None };
            Some(crate::tls::load(&files).map_err(|e| anyhow!("replication TLS: {e}"))?)
        }
        None => None,
    };
    let engine = tokio::task::spawn_blocking(move || Engine::open(ecfg))
        .await
        .context("engine start-up panicked")?
        .map_err(|e| anyhow!("cannot open data directory {}: {e}", config.root_directory.display()))?;

    let http_listener = bind(&config.http_addr(), "listen_port").await?;
    let grpc_listener = match config.grpc_addr() {
        Some(a) => Some(bind(&a, "grpc_listen_port").await?),
        None => None,
    };
    let replication_listener = match config.replication.as_ref().filter(|r| r.enabled) {
        Some(r) => {
            let host = if config.listen_host.is_empty() { "0.0.0.0" } else { &config.listen_host };
            Some(bind(&format!("{host}:{}", r.listen_port), "replication.listen_port").await?)
        }
        None => None,
    };
    let utilities_listener = match &config.utilities_url {
        Some(a) => Some(bind(a, "utilities_url").await?),
        None => None,
    };
    // Same-host reads: a socket in use by a live server is an error like a port in use; one that cannot be
    // made (a read-only directory, a path too long) only costs the fast path, so it is a warning.
    let local_listener = match config.local_socket_path() {
        Some(p) => match crate::local::bind(&p).await {
            Ok(l) => Some((l, p)),
            Err(crate::local::BindError::InUse(e)) => return Err(anyhow!(e)),
            Err(crate::local::BindError::Unusable(e)) => {
                tracing::warn!("same-host reads off: {e}");
                None
            }
        },
        None => None,
    };
    let http_addr = http_listener.local_addr()?;
    let utilities_addr = utilities_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let replication_addr = replication_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let grpc_addr = grpc_listener.as_ref().map(|l| l.local_addr()).transpose()?;

    warn_about_exposure(&config, http_addr, grpc_addr, auth.as_deref());
    let ctx = ServerContext::new(engine, config.clone(), auth.clone());
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();

    // HTTP: MarketStore's /rpc, /ws, /heartbeat, /metrics; the console's /api/ and /console.
    {
        let router = http_router(&ctx);
        let mut rx = shutdown_rx.clone();
        let http_tls = tls.as_ref().map(|t| t.http.clone());
        tasks.push(tokio::spawn(async move {
            use axum::serve::ListenerExt;
            if let Some(rustls_config) = http_tls {
                serve_https(http_listener, router, rustls_config, rx).await;
                return;
            }
            let listener = http_listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let r = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|v| *v).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("HTTP server failed: {e}");
            }
        }));
    }

    // utilities_url: /heartbeat and CPU profiles (plain HTTP, no credentials, as MarketStore's).
    if let Some(listener) = utilities_listener {
        let router = crate::utilities::router(ctx.clone());
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let r = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|v| *v).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("utilities_url server failed: {e}");
            }
        }));
    }

    // gRPC: Arrow Flight + Flight SQL + MarketStore's proto.Marketstore on one port.
    if let Some(listener) = grpc_listener {
        let (recv, send) = config.grpc_limits();
        let flight = crate::flight_backend::flight_service(&ctx).into_server(recv, send);
        let marketstore = crate::compat::grpc::service(ctx.clone());
        let recorder = crate::metrics::GrpcMetricsLayer::new(ctx.metrics.clone());
        let authenticate = crate::auth::grpc::GrpcAuthLayer::new(auth.clone());
        let builder = grpc_builder(tls.as_ref(), "grpc_listen_port")?;
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            // TCP_NODELAY: small Flight replies must not wait for delayed ACKs (40 ms per round trip otherwise).
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            // Large HTTP/2 frames too (windows: grpc_builder).
            let r = builder
                .max_frame_size(1u32 << 20)
                .layer(tower::util::MapResponseLayer::new(oversize_is_resource_exhausted))
                // Request counts and durations of Flight, Flight SQL and proto.Marketstore, per method.
                .layer(recorder)
                // Inside the recorder, so refused calls are counted too.
                .layer(authenticate)
                .add_service(flight)
                .add_service(marketstore)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.wait_for(|v| *v).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!("gRPC server failed: {e}");
            }
        }));
    }

    if let Some((listener, path)) = local_listener {
        let abs = if path.is_absolute() { path.clone() } else { std::env::current_dir().map(|d| d.join(&path)).unwrap_or_else(|_| path.clone()) };
        let _ = ctx.local_socket.set(abs);
        tasks.push(tokio::spawn(crate::local::serve(ctx.clone(), listener, path, shutdown_rx.clone())));
    }

    // Replication: serve the master's port, or follow the master.
    match &*ctx.replication {
        crate::replication::Replication::Master { master, .. } => {
            if let Some(listener) = replication_listener {
                let svc = crate::replication::pb::replication_server::ReplicationServer::new(crate::replication::master::ReplicationService(master.clone()))
                    .max_decoding_message_size(crate::replication::MAX_MESSAGE)
                    .max_encoding_message_size(crate::replication::MAX_MESSAGE);
                let builder = grpc_builder(replication_tls.as_ref(), "replication.listen_port")?;
                let authenticate_replicas = crate::auth::grpc::GrpcAuthLayer::new(ctx.auth.clone());
                let mut rx = shutdown_rx.clone();
                tasks.push(tokio::spawn(async move {
                    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                    let r = builder
                        // With `auth:`, a replica must authenticate like any client (it reads everything).
                        .layer(authenticate_replicas)
                        .add_service(svc)
                        .serve_with_incoming_shutdown(incoming, async move {
                            let _ = rx.wait_for(|v| *v).await;
                        })
                        .await;
                    if let Err(e) = r {
                        tracing::error!("replication server failed: {e}");
                    }
                }));
                tracing::info!(addr = %replication_addr.map(|a| a.to_string()).unwrap_or_default(), store_id = ctx.engine.store_id(), "replication master: serving replicas");
            }
        }
        crate::replication::Replication::Replica { follower, cfg } => {
            tracing::info!(master = cfg.master_host.as_deref().unwrap_or(""), "replica: read-only, following the master");
            tasks.push(tokio::spawn(follower.clone().run(shutdown_rx.clone())));
        }
        crate::replication::Replication::Standalone => {}
    }

    let plugins = Some(crate::plugins::PluginHost::start(&ctx, crate::plugins::ServerAddrs { http: http_addr, flight: grpc_addr }));
    ctx.set_ready(true);
    tracing::info!(
        http = %http_addr,
        grpc = %grpc_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        utilities = %utilities_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        root = %config.root_directory.display(),
        buckets = ctx.engine.keys().len(),
        "mkts {} ready", crate::context::VERSION
    );
    Ok(RunningServer { ctx, http_addr, grpc_addr, replication_addr, utilities_addr, shutdown_tx, tasks, plugins })
}

impl RunningServer {
    /// Stop serving: not ready, grace period, plugins, listeners, final checkpoint.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.ctx.set_ready(false);
        let grace = self.ctx.config.stop_grace_period;
        if grace > 0 {
            tracing::info!("waiting stop_grace_period = {grace}s");
            tokio::time::sleep(Duration::from_secs(grace)).await;
        }
        // Plugins stop while the listeners still serve: out-of-process triggers drain over Flight.
        if let Some(p) = self.plugins.take() {
            p.shutdown(Duration::from_secs(30)).await;
        }
        let _ = self.shutdown_tx.send(true);
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        self.ctx.engine.shutdown().await.map_err(|e| anyhow!("final checkpoint failed: {e}"))?;
        tracing::info!("mkts stopped cleanly");
        Ok(())
    }
}

/// Every route of `listen_port`: MarketStore's ([`crate::compat::http_router`]), the JSON endpoints
/// ([`crate::api::router`]) and the web console ([`crate::console::router`]).
pub fn http_router(ctx: &Arc<ServerContext>) -> axum::Router {
    crate::compat::http_router(ctx.clone()).merge(crate::api::router(ctx.clone())).merge(crate::console::router(ctx.auth.clone()))
}

/// A gRPC server builder with TLS (when configured) and large HTTP/2 windows: market data results are
/// megabytes, and the 64 KiB defaults cost a flow-control round trip every 64 KiB.
fn grpc_builder(tls: Option<&crate::tls::TlsMaterial>, port: &str) -> anyhow::Result<tonic::transport::Server> {
    let mut builder = tonic::transport::Server::builder().initial_stream_window_size(16u32 << 20).initial_connection_window_size(64u32 << 20);
    if let Some(t) = tls {
        let identity = tonic::transport::Identity::from_pem(&t.cert_pem, &t.key_pem);
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity)).map_err(|e| anyhow!("tls ({port}): {e}"))?;
    }
    Ok(builder)
}

/// Serve the HTTP port over TLS until `shutdown` (in-flight requests get 10 s to finish).
async fn serve_https(
    listener: TcpListener,
    router: axum::Router,
    config: std::sync::Arc<rustls::ServerConfig>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("HTTPS server failed: {e}");
            return;
        }
    };
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        let _ = shutdown.wait_for(|v| *v).await;
        stopper.graceful_shutdown(Some(Duration::from_secs(10)));
    });
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(axum_server::tls_rustls::RustlsConfig::from_config(config))
        .acceptor(axum_server::accept::NoDelayAcceptor::new());
    if let Err(e) = axum_server::from_tcp(listener)
        .acceptor(acceptor).handle(handle).serve(router.into_make_service_with_connect_info::<SocketAddr>()).await {
        tracing::error!("HTTPS server failed: {e}");
    }
}

/// Say at start-up how open the server is: without `auth:` anyone who reaches a port may read and write
/// (loudly when a port listens beyond loopback); with `auth:` but no TLS, passwords travel in clear.
fn warn_about_exposure(config: &Config, http: SocketAddr, grpc: Option<SocketAddr>, auth: Option<&crate::auth::Authenticator>) {
    let ports: Vec<String> = std::iter::once(http).chain(grpc).filter(|a| !a.ip().is_loopback()).map(|a| a.to_string()).collect();
    match auth {
        None if !ports.is_empty() => tracing::warn!(
            "NO AUTHENTICATION: anyone who can reach {} may read, write and destroy data; add `auth:` users (and `tls:`) to mkts.yml, see docs/operations.md",
            ports.join(" and ")
        ),
        None => tracing::info!("no authentication configured (auth:): every client may read and write; the ports listen on loopback only"),
        Some(a) => {
            if config.tls.is_none() {
                tracing::warn!("auth: is configured without tls:: passwords and tokens travel in clear text");
            }
            tracing::info!(
                users = config.auth.as_ref().map(|c| c.users.len()).unwrap_or(0),
                tokens_survive_restart = a.tokens_survive_restart(),
                "authentication required on every interface but /heartbeat"
            );
        }
    }
}

/// tonic refuses a message over the size limit with `OUT_OF_RANGE` before any handler runs; gRPC-Go (and
/// so MarketStore and its clients) say `RESOURCE_EXHAUSTED`. Rewrite that trailers-only status.
fn oversize_is_resource_exhausted<B>(mut r: axum::http::Response<B>) -> axum::http::Response<B> {
    let h = r.headers();
    let oversize = h.get("grpc-status").is_some_and(|v| v == "11")
        && h.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| m.contains("message%20length%20too%20large"));
    if oversize {
        r.headers_mut().insert("grpc-status", axum::http::HeaderValue::from_static("8"));
    }
    r
}

/// Wait for SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
