//! The `mkts` command: `init`, `start`, `hash-password`, `tool recover-wal`, `backfill polygon`, and (from the
//! SQL tooling) `connect`, `import`, `export`.

use std::path::PathBuf;

/// mimalloc instead of glibc's malloc: the write path allocates and frees many small buffers per request
/// (h2 frames, IPC decode, log records) and a few large ones per bulk write; measured in benches/README.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

/// mkts: an Arrow-native market data server (MarketStore-compatible).
#[derive(Debug, Parser)]
#[command(name = "mkts", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write a commented default mkts.yml (data under ./data).
    Init {
        /// Directory to write mkts.yml into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Overwrite an existing mkts.yml.
        #[arg(long)]
        force: bool,
    },
    /// Run the server.
    Start {
        /// Configuration file. Without one (and no ./mkts.yml) the embedded default is used.
        #[arg(long, short = 'c', default_value = "mkts.yml")]
        config: PathBuf,
    },
    /// Read a password on stdin (without echo on a terminal) and print its argon2 hash for `auth.users`.
    HashPassword,
    /// Interactive SQL shell over a server (--url http://host:5993 JSON-RPC, grpc://host:5995 Flight SQL) or a data directory (--dir).
    Connect(mkts::cli::connect::ConnectArgs),
    /// Load a CSV (MarketStore control file supported) or Parquet file into a bucket.
    Import(mkts::cli::transfer::ImportArgs),
    /// Write a bucket or a SQL result to a CSV or Parquet file.
    Export(mkts::cli::transfer::ExportArgs),
    /// Import a MarketStore data directory (its .bin files, then its WAL) into mkts; --verify compares.
    ImportMarketstore(mkts::migrate::ImportMarketstoreArgs),
    /// Backfill a provider's history into a server (--url grpc://host:5995) or a data directory (--dir), in the
    /// buckets its feeder writes; a rerun continues after the stored rows.
    Backfill {
        #[command(subcommand)]
        provider: mkts::cli::backfill::BackfillCmd,
    },
    /// Estimate the storage a data set needs (MarketStore's `estimate`, with mkts's layout).
    Estimate(mkts::cli::estimate::EstimateArgs),
    /// Distributed SQL on Apache DataFusion Ballista: runs `mkts-ballista` (installed next to `mkts`) with these
    /// arguments, e.g. `mkts ballista scheduler --config mkts.yml` or `mkts ballista executor --scheduler
    /// 127.0.0.1:50050` (docs/scale-out.md).
    #[command(disable_help_flag = true)]
    Ballista {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Maintenance of a data directory (the server must be stopped).
    Tool {
        #[command(subcommand)]
        tool: ToolCmd,
    },
}

#[derive(Debug, Subcommand)]
enum ToolCmd {
    /// Make a data directory whose write-ahead log is damaged in the middle start again: keep every readable
    /// record, copy each damaged segment to .wal/quarantine/, drop the unreadable bytes and report them.
    RecoverWal {
        /// The data directory (`root_directory` of mkts.yml).
        #[arg(long)]
        root: PathBuf,
    },
    /// Check every checksum and manifest of a stopped data directory without changing it (log records,
    /// catalog snapshot, bucket.json, manifests, column file sizes, row order); non-zero exit on damage.
    #[command(visible_aliases = ["ic", "integritycheck"])]
    Integrity {
        /// The data directory (`root_directory` of mkts.yml).
        #[arg(value_name = "ROOT", required_unless_present = "dir", conflicts_with = "dir")]
        root: Option<PathBuf>,
        /// The data directory, as MarketStore's `--dir`.
        #[arg(long, short = 'd')]
        dir: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The server's `timezone` (mkts.yml): where fixed buckets of a day or longer start their intervals.
        /// Default: the zone recorded in the data directory (`.timezone`), else UTC.
        #[arg(long)]
        timezone: Option<String>,
    },
}

fn init_logging(level: &str) {
    let lvl = match level {
        "fatal" | "error" => "error",
        "warning" | "warn" => "warn",
        "debug" => "debug",
        "trace" => "trace",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{lvl},h2=warn,tower=warn,hyper=warn")));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi).try_init();
}

/// Lift the open-file limit to its hard maximum: every partition column is an open, mapped file, and a
/// backfill of thousands of symbols must not run out of descriptors (MarketStore #183).
fn raise_fd_limit() {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("mkts: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Connect(args) => mkts::cli::connect::run(args),
        Cmd::Ballista { args } => {
            // A separate binary keeps Ballista out of the server's build; look beside this one, then on PATH.
            let beside = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("mkts-ballista"))).filter(|p| p.exists());
            let bin = beside.unwrap_or_else(|| PathBuf::from("mkts-ballista"));
            use std::os::unix::process::CommandExt;
            let err = std::process::Command::new(&bin).args(&args).exec();
            bail!("cannot run {}: {err} (build it with `cargo build -p mkts-ballista`)", bin.display())
        }
        Cmd::HashPassword => {
            let password = mkts::cli::read_password("password: ")?;
            if password.is_empty() {
                bail!("the password is empty");
            }
            println!("{}", mkts::auth::password::hash(&password).map_err(|e| anyhow::anyhow!(e))?);
            Ok(())
        }
        Cmd::Import(args) => mkts::cli::transfer::run_import(args),
        Cmd::Export(args) => mkts::cli::transfer::run_export(args),
        Cmd::ImportMarketstore(args) => Ok(mkts::migrate::run(args)?),
        Cmd::Backfill { provider: mkts::cli::backfill::BackfillCmd::Polygon(args) } => {
            init_logging("info");
            mkts::cli::backfill::run_polygon(args)
        }
        Cmd::Tool { tool: ToolCmd::RecoverWal { root } } => {
            let rec = mkts::engine::recover_wal(&root).with_context(|| format!("cannot recover the log of {}", root.display()))?;
            if rec.dropped.is_empty() {
                println!("the write-ahead log of {} is intact; nothing to do", root.display());
                return Ok(());
            }
            for d in &rec.dropped {
                println!("dropped unreadable bytes: {d}");
            }
            for q in &rec.quarantined {
                println!("damaged segment kept as {}", q.display());
            }
            println!("writes inside the dropped bytes are lost; `mkts start` now replays everything else");
            Ok(())
        }
        Cmd::Estimate(args) => Ok(mkts::cli::estimate::run(&args)?),
        Cmd::Tool { tool: ToolCmd::Integrity { root, dir, json, timezone } } => {
            let root = root.or(dir).context("give the data directory")?;
            let tz = match timezone {
                Some(z) => mkts_udf::parse_timezone(Some(&z)).map_err(|e| anyhow::anyhow!("--timezone: {e}"))?,
                None => mkts::engine::recorded_timezone(&root),
            };
            let rep = mkts::engine::check_integrity(&root, tz).with_context(|| format!("cannot check {}", root.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                for f in &rep.damage {
                    println!("DAMAGED {}: {}", f.path, f.what);
                }
                for f in &rep.notes {
                    println!("note    {}: {}", f.path, f.what);
                }
                println!(
                    "checked {}: {} buckets, {} year partitions, {} rows, {} column files, {} log records in {} segments: {}",
                    root.display(),
                    rep.buckets,
                    rep.partitions,
                    rep.rows,
                    rep.column_files,
                    rep.log_records,
                    rep.log_segments,
                    if rep.intact() { "intact".to_string() } else { format!("{} damaged", rep.damage.len()) }
                );
            }
            if !rep.intact() {
                bail!("{} is damaged ({} problems); see above", root.display(), rep.damage.len());
            }
            Ok(())
        }
        Cmd::Init { dir, force } => {
            let path = dir.join("mkts.yml");
            if path.exists() && !force {
                bail!("{} already exists (use --force to overwrite)", path.display());
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            std::fs::write(&path, mkts::config::DEFAULT_YAML).with_context(|| format!("cannot write {}", path.display()))?;
            println!("wrote {}", path.display());
            Ok(())
        }
        Cmd::Start { config } => {
            let cfg = if config.exists() {
                mkts::config::Config::load(&config)?
            } else if config == PathBuf::from("mkts.yml") {
                mkts::config::Config::parse(mkts::config::DEFAULT_YAML, &std::env::current_dir()?)?
            } else {
                bail!("config file {} does not exist", config.display());
            };
            init_logging(&cfg.log_level);
            for w in &cfg.warnings {
                tracing::warn!("{w}");
            }
            raise_fd_limit();
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async move {
                let server = mkts::server::start(cfg).await?;
                mkts::server::wait_for_signal().await;
                tracing::info!("shutting down");
                server.shutdown().await
            })
        }
    }
}
