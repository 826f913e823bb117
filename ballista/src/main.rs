//! `mkts-ballista`: a Ballista scheduler or executor for SQL over an mkts server (also run as
//! `mkts ballista …`). See `docs/scale-out.md`.
//!
//! ```text
//! mkts-ballista scheduler --config mkts.yml [--mkts grpc://host:5995] [--port 50050]
//! mkts-ballista executor  --config mkts.yml --scheduler 127.0.0.1:50050 [--port 50051 --grpc-port 50052]
//! ```
//! `--config` is the server's `mkts.yml`: its `tiering:` section names the cold store (credentials from it
//! or from `AWS_*`), and its `grpc_listen_port` / `listen_host` the server (unless `--mkts` is given).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use mkts_ballista::cluster::{run_executor, run_scheduler, ClusterSettings, ExecutorOptions, SchedulerOptions};
use mkts_ballista::remote::Remote;

#[derive(Debug, Parser)]
#[command(name = "mkts-ballista", version, about = "Ballista scheduler and executors for SQL over mkts")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a scheduler: plans SQL over the mkts catalog; Flight SQL on its port.
    Scheduler(SchedulerArgs),
    /// Run an executor: runs tasks the scheduler hands out.
    Executor(ExecutorArgs),
}

#[derive(Debug, Args)]
struct Common {
    /// The mkts server's mkts.yml (for `tiering:` and the server's address).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The mkts server's Flight endpoint (default: from --config, else grpc://127.0.0.1:5995).
    #[arg(long, value_name = "URL")]
    mkts: Option<String>,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    bind_host: String,
}

#[derive(Debug, Args)]
struct SchedulerArgs {
    #[command(flatten)]
    common: Common,
    /// Port of the scheduler (Ballista's gRPC and Flight SQL).
    #[arg(long, default_value_t = 50050)]
    port: u16,
    /// Seconds without a heartbeat after which an executor is lost and its tasks run elsewhere.
    #[arg(long, default_value_t = 30)]
    executor_timeout: u64,
    /// Failures of one task before its query fails.
    #[arg(long, default_value_t = 4)]
    task_max_failures: usize,
}

#[derive(Debug, Args)]
struct ExecutorArgs {
    #[command(flatten)]
    common: Common,
    /// The scheduler, `host:port`.
    #[arg(long, default_value = "127.0.0.1:50050")]
    scheduler: String,
    /// Flight port (shuffle data).
    #[arg(long, default_value_t = 50051)]
    port: u16,
    /// gRPC port.
    #[arg(long, default_value_t = 50052)]
    grpc_port: u16,
    /// Concurrent tasks (default: the machine's cores).
    #[arg(long)]
    concurrent_tasks: Option<usize>,
    /// Directory for shuffle files (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<String>,
    /// Seconds between heartbeats to the scheduler.
    #[arg(long, default_value_t = 2)]
    heartbeat: u64,
}

fn settings(c: &Common) -> anyhow::Result<ClusterSettings> {
    let config = c.config.as_deref().map(mkts::config::Config::load).transpose().context("reading --config")?;
    let url = match (&c.mkts, &config) {
        (Some(u), _) => u.clone(),
        (None, Some(cfg)) => {
            let host = if cfg.listen_host.is_empty() || cfg.listen_host == "0.0.0.0" { "127.0.0.1" } else { cfg.listen_host.as_str() };
            let Some(port) = cfg.grpc_listen_port else { bail!("the config has no grpc_listen_port; give --mkts") };
            let scheme = if cfg.tls.is_some() { "grpc+tls" } else { "grpc" };
            format!("{scheme}://{host}:{port}")
        }
        (None, None) => "grpc://127.0.0.1:5995".to_string(),
    };
    let tiering = config.as_ref().and_then(|c| c.tiering.clone());
    Ok(ClusterSettings::new(Remote::new(url), tiering.as_ref())?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_stack_size(32 << 20).build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Scheduler(a) => {
                let s = settings(&a.common)?;
                tracing::info!(mkts = %s.remote.url, "scheduler on {}:{}", a.common.bind_host, a.port);
                run_scheduler(s, SchedulerOptions {
                    bind_host: a.common.bind_host.clone(),
                    port: a.port,
                    executor_timeout: Duration::from_secs(a.executor_timeout),
                    task_max_failures: a.task_max_failures,
                })
                .await?;
            }
            Cmd::Executor(a) => {
                let s = settings(&a.common)?;
                let (host, port) = a.scheduler.rsplit_once(':').context("--scheduler must be host:port")?;
                let port: u16 = port.parse().context("--scheduler port")?;
                let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
                run_executor(s, ExecutorOptions {
                    bind_host: a.common.bind_host.clone(),
                    port: a.port,
                    grpc_port: a.grpc_port,
                    scheduler_host: host.to_string(),
                    scheduler_port: port,
                    concurrent_tasks: a.concurrent_tasks.unwrap_or(cores),
                    work_dir: a.work_dir.clone(),
                    heartbeat: Duration::from_secs(a.heartbeat),
                })
                .await?;
            }
        }
        Ok(())
    })
}
