//! The broker under test: one spawned for the run (and stopped after it) or one already running.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cmqd::client::{Account, ClientConfig, Error};
use cmqd::config;

use crate::measure::now_ns;
use crate::plan::Args;

pub(crate) struct Broker {
    pub(crate) endpoint: String,
    pub(crate) secret_id: String,
    pub(crate) secret_key: String,
    pub(crate) pid: Option<u32>,
    pub(crate) child: Option<Child>,
    pub(crate) _dir: Option<tempdir::Dir>,
}

/// A temporary directory removed on drop (std only, to keep the bench's dependencies small).
mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> std::io::Result<Self> {
            let path = std::env::temp_dir().join(format!(
                "cmq-bench-{}-{}",
                std::process::id(),
                super::now_ns()
            ));
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Only the broker this run started, by its own handle.
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn spawn_broker(args: &Args) -> Result<Broker, String> {
    let binary = match &args.broker {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("cmqd"),
    };
    let dir = tempdir::Dir::new().map_err(|e| format!("temp dir: {e}"))?;
    let secret_id = "AKIDcmqbench".to_string();
    let secret_key = "cmq-bench-secret-key-0123456789".to_string();
    let config_path = dir.path().join("cmqd.toml");
    let config_text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[metrics]\nenabled = false\n[[accounts]]\nname = \"bench\"\nsecret_id = \"{secret_id}\"\nsecret_key = \"{secret_key}\"\n",
        dir.path().join("data").display()
    );
    let mut config_text = config_text;
    if let Some(idle) = args.idle_connections {
        // Room for the idle crowd plus the bench's own connections, on one address and queue.
        let room = idle + 64;
        config_text.push_str(&format!(
            "[limits]\nconnections_max = {room}\nconnections_per_ip_max = {room}\nwaiters_per_queue_max = {room}\nwaiters_total_max = {}\n",
            room.max(100_000)
        ));
    }
    std::fs::write(&config_path, config_text).map_err(|e| e.to_string())?;
    let mut child = Command::new(&binary)
        .arg("--config")
        .arg(&config_path)
        .args(&args.broker_args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().ok_or("no stdout from the broker")?;
    let mut endpoint = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(addr) = line.split(" listening on ").nth(1) {
            endpoint = Some(addr.trim().to_string());
            break;
        }
    }
    // Keep reading what the broker prints, so that it never writes into a closed pipe.
    std::thread::spawn(move || for _ in lines {});
    let Some(endpoint) = endpoint else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("the broker exited before it listened".into());
    };
    Ok(Broker {
        endpoint,
        secret_id,
        secret_key,
        pid: Some(pid),
        child: Some(child),
        _dir: Some(dir),
    })
}

pub(crate) fn existing_broker(args: &Args) -> Result<Broker, String> {
    let (secret_id, secret_key) = match (&args.secret_id, &args.secret_key) {
        (Some(id), Some(key)) => (id.clone(), key.clone()),
        _ => {
            let path = args
                .credentials
                .clone()
                .unwrap_or_else(|| Path::new("cmqd-data").join(config::CREDENTIALS_FILE));
            let account = config::read_credentials(&path).map_err(|e| {
                format!("{e}; pass --secret-id and --secret-key, --credentials, or --spawn")
            })?;
            (account.secret_id, account.secret_key)
        }
    };
    Ok(Broker {
        endpoint: args.endpoint.clone(),
        secret_id,
        secret_key,
        pid: args.broker_pid,
        child: None,
        _dir: None,
    })
}

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux.
    Some((utime + stime) / 100.0)
}

pub(crate) async fn connect(broker: &Broker) -> Result<Account, Error> {
    Account::connect(
        &broker.endpoint,
        &broker.secret_id,
        &broker.secret_key,
        ClientConfig::default().request_timeout(Duration::from_secs(60)),
    )
    .await
}
