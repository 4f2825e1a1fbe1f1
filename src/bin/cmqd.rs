//! The cmqd broker. Runs with no arguments on embedded defaults; see `cmqd --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use cmqd::clock::{Clock, SystemClock};
use cmqd::config::{self, Config, FsyncPolicy, StorageMode};
use cmqd::consensus::node::ClusterNode;

#[path = "cmqd/cluster_admin.rs"]
mod cluster_admin;
#[path = "cmqd/cluster_local.rs"]
mod cluster_local;
use cmqd::server::{Server, ServerOptions};
use cmqd::storage::log::{LogStorage, LOG_DIR};
use cmqd::storage::{MemoryStorage, Storage};

/// mimalloc rather than the system allocator: bodies, records and replies are allocated on the
/// runtime's threads and freed on others (the log writer, other workers), which glibc malloc
/// handles with arena locking and consolidation that took a quarter of the broker's CPU under a
/// durable send load (perf, W1 with fsync always).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Prints a start-up line on stdout. Write errors are ignored: a broker must keep serving when
/// whoever started it has closed its end of stdout (a pipe read only up to the address line).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// cmqd: a message broker with the Tencent Cloud CMQ model.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (every key optional; see README "Configuration").
    #[arg(long, env = "CMQD_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address of the binary protocol [default: 127.0.0.1:7300].
    #[arg(long, env = "CMQD_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory [default: ./cmqd-data].
    #[arg(long, env = "CMQD_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Log level or filter, e.g. `info` or `cmqd=debug` (`RUST_LOG` wins when set).
    #[arg(long, env = "CMQD_LOG_LEVEL")]
    log_level: Option<String>,
    /// Log JSON lines instead of text.
    #[arg(long, env = "CMQD_LOG_JSON")]
    log_json: bool,
    /// Address of /metrics, /healthz and /readyz [default: 127.0.0.1:7301].
    #[arg(long, env = "CMQD_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Do not serve /metrics, /healthz and /readyz.
    #[arg(long, env = "CMQD_NO_METRICS")]
    no_metrics: bool,
    /// Address of the CMQ-compatible HTTP API (/v2/index.php) [default: 127.0.0.1:7302].
    #[arg(long, env = "CMQD_HTTP_API_LISTEN")]
    http_api_listen: Option<SocketAddr>,
    /// Do not serve the CMQ-compatible HTTP API.
    #[arg(long, env = "CMQD_NO_HTTP_API")]
    no_http_api: bool,
    /// Storage: `log` (durable, under DATA_DIR/log) or `memory` (keeps nothing) [default: log].
    #[arg(long, env = "CMQD_STORAGE")]
    storage: Option<StorageMode>,
    /// When the log syncs: `always` (before acknowledging), `interval` or `never` (faster,
    /// a machine crash loses acknowledged changes) [default: always].
    #[arg(long, env = "CMQD_FSYNC")]
    fsync: Option<FsyncPolicy>,
    /// Sync interval with `--fsync interval`, ms [default: 10].
    #[arg(long, env = "CMQD_FSYNC_INTERVAL_MS")]
    fsync_interval_ms: Option<u64>,
    /// Starts a cluster of N nodes on loopback for trying it (each a `cmqd` process of its own,
    /// files under DATA_DIR/node-<i>; node i serves the binary protocol on 127.0.0.1:731<i>,
    /// the HTTP API on 732<i>, peers on 733<i>, metrics on 734<i>). Stops them on Ctrl-C.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=9))]
    cluster_local: Option<u64>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Repairs a damaged log (the broker must be stopped): keeps every intact record, moves
    /// damaged and stray files aside (nothing is deleted), and prints exactly what was lost.
    Repair,
    /// The cluster's membership: list it, add a node (to replace one), remove a node. Give the
    /// `--config` of a node of the cluster: its secret and peers are used.
    #[command(subcommand)]
    Cluster(cluster_admin::ClusterCommand),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => match Config::from_file(path) {
            Ok(config) => config,
            Err(error) => {
                eprintln!("cmqd: {error}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(level) = args.log_level {
        config.log.level = level;
    }
    config.log.json |= args.log_json;
    if let Some(listen) = args.metrics_listen {
        config.metrics.listen = listen;
    }
    if args.no_metrics {
        config.metrics.enabled = false;
    }
    if let Some(listen) = args.http_api_listen {
        config.http_api.listen = listen;
    }
    if args.no_http_api {
        config.http_api.enabled = false;
    }
    if let Some(mode) = args.storage {
        config.storage.mode = mode;
    }
    if let Some(fsync) = args.fsync {
        config.storage.fsync = fsync;
    }
    if let Some(ms) = args.fsync_interval_ms {
        config.storage.fsync_interval_ms = ms;
    }
    if let Err(error) = config.validate() {
        eprintln!("cmqd: {error}");
        return ExitCode::from(2);
    }
    init_logging(&config);
    if let Some(nodes) = args.cluster_local {
        return cluster_local::run(nodes, &config.data_dir);
    }
    match args.command {
        Some(Command::Repair) => return repair(&config),
        Some(Command::Cluster(command)) => return cluster_admin::run(&config, command),
        None => {}
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cmqd: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("cmqd: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `cmqd repair`: see [`Command::Repair`].
fn repair(config: &Config) -> ExitCode {
    say!(
        "repairing the log in {}",
        config.data_dir.join(LOG_DIR).display()
    );
    match cmqd::storage::log::repair(&config.data_dir, config.storage.segment_bytes) {
        Ok(report) => {
            say!("{}", report.render().trim_end());
            if report.lost_anything() {
                say!("repair done: the log starts again WITHOUT the ranges listed as LOST above");
            } else {
                say!("repair done: nothing acknowledged was lost");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("cmqd repair: {}", error.0);
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    // openraft narrates every election and replication step at INFO; cmqd logs what an
    // operator acts on (leader changes, failed proposals, unreachable peers) itself. Its own
    // errors still show, and a filter that names openraft decides for itself.
    let with_raft_quiet = |spec: &str| {
        if spec.contains("openraft") {
            spec.to_string()
        } else {
            format!("{spec},openraft=error")
        }
    };
    let filter = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .and_then(|spec| EnvFilter::try_new(with_raft_quiet(&spec)).ok())
        .or_else(|| EnvFilter::try_new(with_raft_quiet(&config.log.level)).ok())
        .unwrap_or_else(|| EnvFilter::new("info,openraft=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(mut config: Config) -> Result<(), String> {
    let mut generated = None;
    if config.accounts.is_empty() {
        let (account, created) =
            config::load_or_create_default_account(&config.data_dir).map_err(|e| e.to_string())?;
        generated = Some((account.clone(), created));
        config.accounts.push(account);
    }
    let options = ServerOptions {
        listen: config.listen,
        limits: config.limits.clone(),
        accounts: config.accounts.clone(),
    };
    if config.metrics.enabled {
        // Before anything records: what recovery and the cluster node record at start (the
        // peers' failure series at zero, the first term) would otherwise go nowhere.
        let _ = cmqd::metrics::install();
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let cluster_token = CancellationToken::new();
    let mut cluster_node = None;
    let storage: Arc<dyn Storage> = match config.storage.mode {
        _ if config.cluster.is_some() => {
            let node = ClusterNode::start(&config, clock.clone(), cluster_token.clone()).await?;
            let storage = node.storage.clone();
            cluster_node = Some(node);
            storage
        }
        StorageMode::Memory => Arc::new(MemoryStorage::new()),
        StorageMode::Log => {
            // Locks the data directory and reads the whole log: before listening, so that a
            // second broker on the same directory stops here, and off the async threads.
            let (dir, log, clock) = (
                config.data_dir.clone(),
                log_config(&config.storage),
                clock.clone(),
            );
            let opened = tokio::task::spawn_blocking(move || LogStorage::open(&dir, log, clock))
                .await
                .map_err(|e| format!("log recovery stopped: {e}"))?;
            Arc::new(opened.map_err(|e| e.0.to_string())?)
        }
    };
    let mut server = Server::bind_with(options, storage, clock)
        .await
        .map_err(|e| format!("cannot start on {}: {e}", config.listen))?;
    if let Some(tls) = &config.tls {
        let tls_config =
            cmqd::tls::server_config(&tls.cert_file, &tls.key_file, tls.client_ca_file.as_deref())
                .map_err(|e| e.to_string())?;
        let tls_addr = server
            .listen_tls(tls.listen, tls_config)
            .await
            .map_err(|e| format!("cannot listen on {} for TLS: {e}", tls.listen))?;
        say!("TLS on {tls_addr}");
        tracing::info!(addr = %tls_addr, mutual = tls.client_ca_file.is_some(), "TLS listening");
    }
    if !config.listen.ip().is_loopback() {
        tracing::warn!(addr = %config.listen, "plaintext listener on a non-loopback address: use [tls] for traffic that leaves this machine");
    }
    if let Some(node) = &cluster_node {
        node.attach(server.shared());
    }
    if cluster_node.is_some() || config.storage.mode == StorageMode::Log {
        // A cluster node's bodies beyond the cache are read back from its replicated state,
        // and its disk budget counts its Raft log.
        server
            .shared()
            .set_storage_budget(cmqd::broker::keeper::StorageBudget {
                body_cache_bytes: config.storage.body_cache_bytes,
                disk_bytes_max: config.storage.disk_bytes_max,
                disk_free_min_bytes: config.storage.disk_free_min_bytes,
            });
    }
    let addr = server.local_addr().map_err(|e| e.to_string())?;
    let storage_mode = server.shared().storage.mode();
    tracing::info!(%addr, storage = storage_mode, version = env!("CARGO_PKG_VERSION"), "cmqd listening");
    say!("cmqd {} listening on {addr}", env!("CARGO_PKG_VERSION"));
    if let (Some(node), Some(cluster)) = (&cluster_node, &config.cluster) {
        let dir = config.data_dir.join(cmqd::consensus::node::RAFT_DIR);
        let fsync = log_config(&config.storage).fsync;
        say!(
            "cluster node {} of {}: peers on {}; storage: replicated log in {} (fsync {fsync}; acknowledged once on disk on a majority)",
            node.id,
            cluster.nodes.len(),
            cluster.listen,
            dir.display()
        );
        tracing::info!(node = node.id, nodes = cluster.nodes.len(), peer = %cluster.listen, "cluster node");
    } else if server.shared().storage.is_durable() {
        let dir = config.data_dir.join(LOG_DIR);
        let fsync = log_config(&config.storage).fsync;
        tracing::info!(dir = %dir.display(), %fsync, "storage: durable log");
        say!(
            "storage: {storage_mode} in {} (fsync {fsync})",
            dir.display()
        );
    } else {
        tracing::warn!("storage is in memory: messages do not survive a restart");
        say!("storage: {storage_mode} (messages do not survive a restart)");
    }
    if let Some((account, created)) = generated {
        let file = config.data_dir.join(config::CREDENTIALS_FILE);
        let how = if created { "created" } else { "loaded" };
        say!("default account ({how}, saved in {}):", file.display());
        say!("  secretId  = {}", account.secret_id);
        say!("  secretKey = {}", account.secret_key);
    }

    let token = CancellationToken::new();
    let mut observe = None;
    if config.metrics.enabled {
        let listener = tokio::net::TcpListener::bind(config.metrics.listen)
            .await
            .map_err(|e| {
                format!(
                    "cannot listen on {} for metrics: {e}",
                    config.metrics.listen
                )
            })?;
        let metrics_addr = listener.local_addr().map_err(|e| e.to_string())?;
        say!("metrics on http://{metrics_addr}/metrics (also /healthz, /readyz)");
        tracing::info!(addr = %metrics_addr, "metrics endpoint listening");
        observe = Some(tokio::spawn(cmqd::server::observe::serve(
            listener,
            server.shared().clone(),
            config.metrics.queue_labels_max,
            token.clone(),
        )));
    }
    let mut http_api = None;
    if config.http_api.enabled {
        let listen = config.http_api.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen} for the CMQ HTTP API: {e}"))?;
        let http_addr = listener.local_addr().map_err(|e| e.to_string())?;
        say!("CMQ HTTP API on http://{http_addr}/v2/index.php");
        tracing::info!(addr = %http_addr, "CMQ HTTP API listening");
        if !http_addr.ip().is_loopback() {
            tracing::warn!(addr = %http_addr, "the CMQ HTTP API is plain HTTP on a non-loopback address: use [http_api.tls] for traffic that leaves this machine");
        }
        let mut https = None;
        if let Some(tls) = &config.http_api.tls {
            let tls_config = cmqd::tls::server_config(
                &tls.cert_file,
                &tls.key_file,
                tls.client_ca_file.as_deref(),
            )
            .map_err(|e| e.to_string())?;
            let tls_listener = tokio::net::TcpListener::bind(tls.listen)
                .await
                .map_err(|e| {
                    format!(
                        "cannot listen on {} for the CMQ HTTP API over TLS: {e}",
                        tls.listen
                    )
                })?;
            let https_addr = tls_listener.local_addr().map_err(|e| e.to_string())?;
            say!("CMQ HTTP API on https://{https_addr}/v2/index.php");
            tracing::info!(addr = %https_addr, mutual = tls.client_ca_file.is_some(), "CMQ HTTP API listening for TLS");
            https = Some((tls_listener, tls_config));
        }
        http_api = Some(tokio::spawn(cmqd::http_api::serve_with_tls(
            listener,
            https,
            server.shared().clone(),
            config.http_api.clone(),
            token.clone(),
        )));
    }
    // Every listener is bound: scripts and tests may wait for this line.
    say!("cmqd ready");
    let stop = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing in-flight requests");
        stop.cancel();
    });
    let served = server.run(token).await.map_err(|e| e.to_string());
    if let Some(node) = &cluster_node {
        node.stop().await;
        cluster_token.cancel();
    }
    served?;
    if let Some(observe) = observe {
        let _ = observe.await;
    }
    if let Some(http_api) = http_api {
        let _ = http_api.await;
    }
    tracing::info!("cmqd stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The log's settings from the `[storage]` section.
fn log_config(storage: &config::StorageConfig) -> cmqd::storage::log::LogConfig {
    use cmqd::storage::log::{FsyncMode, LogConfig};
    LogConfig {
        fsync: match storage.fsync {
            FsyncPolicy::Always => FsyncMode::Always,
            FsyncPolicy::Interval => {
                FsyncMode::Interval(std::time::Duration::from_millis(storage.fsync_interval_ms))
            }
            FsyncPolicy::Never => FsyncMode::Never,
        },
        segment_bytes: storage.segment_bytes,
        body_cache_bytes: storage.body_cache_bytes,
        direct_write_min_bytes: if storage.direct_io {
            cmqd::storage::log::DIRECT_WRITE_MIN_BYTES
        } else {
            u64::MAX
        },
        spare_segment: storage.spare_segment,
        disk_bytes_max: storage.disk_bytes_max,
        ..LogConfig::default()
    }
}
