//! `cmqd --cluster-local N`: a cluster of N nodes on loopback, one `cmqd` process each, for
//! trying the cluster on one machine. Not for production: every node is on this machine.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use rand::distributions::Alphanumeric;
use rand::Rng;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Ports of node `i` (from 1): binary protocol, HTTP API, peers, metrics.
fn ports(i: u64) -> (u16, u16, u16, u16) {
    let i = i as u16;
    (7310 + i, 7320 + i, 7330 + i, 7340 + i)
}

/// The secret and the account every node of the local cluster shares, generated once and kept
/// in `<dir>/cluster-local.toml` so that a restart finds the same.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Shared {
    secret: String,
    secret_id: String,
    secret_key: String,
}

fn random(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

fn shared(dir: &Path) -> Result<Shared, String> {
    let path = dir.join("cluster-local.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let shared = Shared {
                secret: random(32),
                secret_id: format!("AKID{}", random(12)),
                secret_key: random(32),
            };
            let text = toml::to_string(&shared).map_err(|e| e.to_string())?;
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(shared)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The configuration file of node `i` of `n`.
fn node_config(i: u64, n: u64, dir: &Path, shared: &Shared) -> String {
    let (api, http, peer, metrics) = ports(i);
    let mut text = format!(
        "listen = \"127.0.0.1:{api}\"\ndata_dir = {data:?}\n\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\n[http_api]\nlisten = \"127.0.0.1:{http}\"\n\n[[accounts]]\nname = \"local\"\nsecret_id = {sid:?}\nsecret_key = {skey:?}\n\n[cluster]\nnode_id = {i}\nlisten = \"127.0.0.1:{peer}\"\nsecret = {secret:?}\n",
        data = dir.display().to_string(),
        sid = shared.secret_id,
        skey = shared.secret_key,
        secret = shared.secret,
    );
    for j in 1..=n {
        let (api, http, peer, _) = ports(j);
        text.push_str(&format!(
            "\n[[cluster.nodes]]\nid = {j}\npeer = \"127.0.0.1:{peer}\"\napi = \"127.0.0.1:{api}\"\nhttp = \"127.0.0.1:{http}\"\n"
        ));
    }
    text
}

/// Runs the local cluster until Ctrl-C (or SIGTERM), then stops every node with SIGTERM.
pub fn run(n: u64, dir: &Path) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cmqd: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(supervise(n, dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cmqd --cluster-local: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn supervise(n: u64, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let shared = shared(dir)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find cmqd itself: {e}"))?;
    let mut children = Vec::new();
    for i in 1..=n {
        let node_dir: PathBuf = dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&node_dir).map_err(|e| format!("{}: {e}", node_dir.display()))?;
        let config_path = node_dir.join("cmqd.toml");
        std::fs::write(&config_path, node_config(i, n, &node_dir, &shared))
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let mut child = tokio::process::Command::new(&exe)
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start node {i}: {e}"))?;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(prefix(i, BufReader::new(out), false));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(prefix(i, BufReader::new(err), true));
        }
        children.push(child);
    }
    println!("local cluster of {n} nodes under {}:", dir.display());
    for i in 1..=n {
        let (api, http, peer, metrics) = ports(i);
        println!("  node {i}: binary 127.0.0.1:{api}  http http://127.0.0.1:{http}/v2/index.php  peers 127.0.0.1:{peer}  metrics http://127.0.0.1:{metrics}/metrics");
    }
    println!(
        "  account: secretId = {}  secretKey = {}",
        shared.secret_id, shared.secret_key
    );
    println!(
        "  status:  cmq --endpoint 127.0.0.1:7311 --secret-id {} --secret-key {} cluster status",
        shared.secret_id, shared.secret_key
    );
    println!(
        "  members: cmqd --config {} cluster members",
        dir.join("node-1").join("cmqd.toml").display()
    );
    println!("Ctrl-C stops every node.");
    super::wait_for_signal().await;
    println!("stopping the local cluster");
    for child in &children {
        if let Some(pid) = child.id() {
            if let Ok(pid) = i32::try_from(pid) {
                // A child this process started and has not reaped yet: the pid is still its.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
    }
    for (i, child) in children.iter_mut().enumerate() {
        match tokio::time::timeout(std::time::Duration::from_secs(15), child.wait()).await {
            Ok(Ok(status)) => println!("node {} stopped ({status})", i + 1),
            _ => {
                let _ = child.start_kill();
                println!("node {} did not stop within 15 s: killed", i + 1);
            }
        }
    }
    Ok(())
}

async fn prefix<R: tokio::io::AsyncRead + Unpin>(i: u64, reader: BufReader<R>, err: bool) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if err {
            eprintln!("[node {i}] {line}");
        } else {
            println!("[node {i}] {line}");
        }
    }
}
