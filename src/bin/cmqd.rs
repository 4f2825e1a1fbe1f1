//! The cmqd broker. Runs with no arguments on embedded defaults; see `cmqd --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use cmqd::config::{self, Config};
use cmqd::server::{Server, ServerOptions};

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
    #[arg(long, env = "CMQD_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the binary protocol [default: 127.0.0.1:7300].
    #[arg(long, env = "CMQD_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory [default: ./cmqd-data].
    #[arg(long, env = "CMQD_DATA_DIR")]
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
    if let Err(error) = config.validate() {
        eprintln!("cmqd: {error}");
        return ExitCode::from(2);
    }
    init_logging(&config);

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

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
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
    let server = Server::bind(options)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = server.local_addr().map_err(|e| e.to_string())?;
    let storage_mode = server.shared().storage.mode();
    tracing::info!(%addr, storage = storage_mode, version = env!("CARGO_PKG_VERSION"), "cmqd listening");
    tracing::warn!("storage is in memory: messages do not survive a restart");
    say!("cmqd {} listening on {addr}", env!("CARGO_PKG_VERSION"));
    say!("storage: {storage_mode} (messages do not survive a restart)");
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
    let stop = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing in-flight requests");
        stop.cancel();
    });
    server.run(token).await.map_err(|e| e.to_string())?;
    if let Some(observe) = observe {
        let _ = observe.await;
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
