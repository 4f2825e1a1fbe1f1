//! The broker under test: one spawned for the run (and stopped after it) or one already running.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cmqd::client::{Account, ClientConfig, Error};
use cmqd::engine::HELD_BODY_OVERHEAD_BYTES;
use cmqd::{config, limits};

use crate::measure::now_ns;
use crate::plan::{Args, Plan, Workload};

pub(crate) struct Broker {
    pub(crate) endpoint: String,
    pub(crate) secret_id: String,
    pub(crate) secret_key: String,
    pub(crate) pid: Option<u32>,
    pub(crate) child: Option<Child>,
    /// What the spawned broker said about its storage (mode, directory, fsync).
    pub(crate) storage: Option<String>,
    launch: Option<Launch>,
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

pub(crate) fn spawn_broker(args: &Args, plan: &Plan) -> Result<Broker, String> {
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
    let config_text = spawned_config(
        args,
        plan,
        &dir.path().join("data"),
        &secret_id,
        &secret_key,
    )?;
    std::fs::write(&config_path, config_text).map_err(|e| e.to_string())?;
    let launch = Launch {
        binary,
        config_path,
        args: args.broker_args.clone(),
    };
    let started = launch.start()?;
    Ok(Broker {
        endpoint: started.endpoint,
        secret_id,
        secret_key,
        pid: Some(started.pid),
        child: Some(started.child),
        storage: started.storage,
        launch: Some(launch),
        _dir: Some(dir),
    })
}

/// The spawned broker's configuration: the bench's account on 127.0.0.1:0, the durable log
/// with `fsync = "always"` (the broker's defaults, written out), room for the workload, then
/// each `--broker-config-extra` merged over it.
fn spawned_config(
    args: &Args,
    plan: &Plan,
    data_dir: &Path,
    secret_id: &str,
    secret_key: &str,
) -> Result<String, String> {
    let data_dir = data_dir
        .to_str()
        .ok_or("the temporary directory's path is not UTF-8")?;
    let mut config = toml::Table::new();
    config.insert("listen".into(), "127.0.0.1:0".into());
    config.insert("data_dir".into(), data_dir.into());
    config.insert(
        "metrics".into(),
        toml::Value::Table(table([("enabled", false.into())])),
    );
    // The bench does not use the HTTP API; on its default port it would collide with a broker
    // already running on this machine, and the spawned one would not start.
    config.insert(
        "http_api".into(),
        toml::Value::Table(table([("listen", "127.0.0.1:0".into())])),
    );
    config.insert(
        "storage".into(),
        toml::Value::Table(table([("mode", "log".into()), ("fsync", "always".into())])),
    );
    let account = table([
        ("name", "bench".into()),
        ("secret_id", secret_id.into()),
        ("secret_key", secret_key.into()),
    ]);
    config.insert(
        "accounts".into(),
        toml::Value::Array(vec![toml::Value::Table(account)]),
    );
    let mut room = toml::Table::new();
    if let Some(idle) = args.idle_connections {
        // Room for the idle crowd plus the bench's own connections, on one address and queue.
        let connections = toml_integer(idle.saturating_add(64));
        room.insert("connections_max".into(), connections.clone());
        room.insert("connections_per_ip_max".into(), connections.clone());
        room.insert("waiters_per_queue_max".into(), connections);
        room.insert(
            "waiters_total_max".into(),
            toml_integer(idle.saturating_add(64).max(100_000)),
        );
    }
    if args.workload == Some(Workload::Backlog) {
        // Every body of the backlog stored at once, whatever the default holds.
        let bodies = plan
            .messages
            .saturating_mul((plan.size as u64).saturating_add(HELD_BODY_OVERHEAD_BYTES));
        let bytes = bodies
            .saturating_add(BODY_MEMORY_HEADROOM_BYTES)
            .max(limits::BODY_MEMORY_BYTES_DEFAULT);
        room.insert("body_memory_bytes_max".into(), toml_integer(bytes));
    }
    if !room.is_empty() {
        config.insert("limits".into(), toml::Value::Table(room));
    }
    for text in &args.broker_config_extra {
        let extra: toml::Table = text
            .parse()
            .map_err(|e| format!("--broker-config-extra {text:?}: {e}"))?;
        for key in ["listen", "data_dir", "accounts"] {
            if extra.contains_key(key) {
                return Err(format!(
                    "--broker-config-extra may not set `{key}`: the bench sets it for the spawned broker"
                ));
            }
        }
        merge(&mut config, extra, CONFIG_DEPTH_MAX);
    }
    toml::to_string(&config).map_err(|e| format!("broker configuration: {e}"))
}

/// Headroom over the backlog's bodies in the spawned broker's body memory limit, bytes: the
/// bench's other requests (the queue's own few) never come near it.
const BODY_MEMORY_HEADROOM_BYTES: u64 = 64 * 1024 * 1024;

/// Tables nested deeper than this in `--broker-config-extra` replace the bench's instead of
/// being merged key by key (the broker's configuration nests two deep, `[http_api.tls]`).
const CONFIG_DEPTH_MAX: usize = 4;

fn table<const N: usize>(entries: [(&str, toml::Value); N]) -> toml::Table {
    entries
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
}

fn toml_integer<N: TryInto<i64>>(n: N) -> toml::Value {
    toml::Value::Integer(n.try_into().unwrap_or(i64::MAX))
}

/// Merges `extra` into `base`: tables key by key down to `depth` levels, anything else replaced.
fn merge(base: &mut toml::Table, extra: toml::Table, depth: usize) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) if depth > 1 => {
                merge(inner, value, depth - 1);
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// How to start the spawned broker, kept to start it again on the same data (`--restart`).
#[derive(Debug)]
pub(crate) struct Launch {
    binary: PathBuf,
    config_path: PathBuf,
    args: Vec<String>,
}

/// A broker process that has printed `cmqd ready`.
struct Started {
    child: Child,
    pid: u32,
    endpoint: String,
    /// The broker's own line about its storage, e.g. `log in /tmp/.../log (fsync always)`.
    storage: Option<String>,
}

impl Launch {
    /// Starts the broker and waits until every listener is bound (its `cmqd ready` line). A
    /// broker in the log mode reads its whole log before it listens.
    fn start(&self) -> Result<Started, String> {
        let mut child = Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config_path)
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        let pid = child.id();
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("no stdout from the broker".into());
        };
        let mut endpoint = None;
        let mut storage = None;
        let mut lines = BufReader::new(stdout).lines();
        // Until the broker says it is ready, or its stdout ends (it exited).
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.split(" listening on ").nth(1) {
                endpoint = Some(addr.trim().to_string());
            } else if let Some(what) = line.strip_prefix("storage: ") {
                storage = Some(what.to_string());
            } else if line.trim() == "cmqd ready" {
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
        Ok(Started {
            child,
            pid,
            endpoint,
            storage,
        })
    }
}

/// Longest wait for the spawned broker to stop after SIGTERM before it is killed.
const STOP_WAIT: Duration = Duration::from_secs(60);

/// How often the stopping broker is checked for having exited.
const STOP_POLL: Duration = Duration::from_millis(5);

/// What [`Broker::restart`] measured.
#[derive(Debug)]
pub(crate) struct Restarted {
    /// From SIGTERM to the process's exit.
    pub(crate) stop: Duration,
    /// When the new process was started: recovery is measured from here.
    pub(crate) spawned_at: Instant,
}

impl Broker {
    /// Stops the spawned broker cleanly (SIGTERM to its PID, then waits for it) and starts it
    /// again with the same configuration and data directory. Blocks; returns once the new
    /// process is ready. The endpoint changes (the broker listens on port 0).
    pub(crate) fn restart(&mut self) -> Result<Restarted, String> {
        let launch = self
            .launch
            .as_ref()
            .ok_or("only a broker started with --spawn can be restarted")?;
        let mut child = self
            .child
            .take()
            .ok_or("the spawned broker is not running")?;
        let pid = i32::try_from(child.id()).map_err(|e| format!("broker pid: {e}"))?;
        let asked = cmqd::clock::monotonic_now();
        // A child this process started and has not reaped: the PID is still its.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| format!("SIGTERM to the broker ({pid}): {e}"))?;
        let polls = STOP_WAIT.as_millis() / STOP_POLL.as_millis().max(1);
        let mut status = None;
        for _ in 0..=polls {
            status = child.try_wait().map_err(|e| format!("broker: {e}"))?;
            if status.is_some() {
                break;
            }
            std::thread::sleep(STOP_POLL);
        }
        let stop = asked.elapsed();
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the broker did not stop within {} s of SIGTERM: killed",
                STOP_WAIT.as_secs()
            ));
        };
        if !status.success() {
            return Err(format!("the broker stopped with {status}"));
        }
        let spawned_at = cmqd::clock::monotonic_now();
        let started = launch.start()?;
        self.endpoint = started.endpoint;
        self.pid = Some(started.pid);
        self.child = Some(started.child);
        self.storage = started.storage;
        Ok(Restarted { stop, spawned_at })
    }
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
        storage: None,
        launch: None,
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

/// A byte count from `/proc/PID/status`, e.g. `VmRSS` (resident memory) or `VmHWM` (its peak).
pub(crate) fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))?;
    // "VmRSS:     12345 kB"
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(argv: &[&str]) -> Result<toml::Table, String> {
        let args = Args::parse_from(argv);
        let plan = Plan::from(&args)?;
        let text = spawned_config(&args, &plan, Path::new("/tmp/data"), "AKIDx", "key")?;
        // What the broker will read: the bench's text must be a valid configuration.
        toml::from_str::<config::Config>(&text).map_err(|e| e.to_string())?;
        text.parse().map_err(|e: toml::de::Error| e.to_string())
    }

    #[test]
    fn backlog_config_is_durable_with_room_for_the_bodies() {
        let table = config(&[
            "cmq-bench",
            "--workload=backlog",
            "--spawn",
            "--messages=100000000",
            "--size=100",
        ])
        .unwrap();
        assert_eq!(table["storage"]["mode"].as_str(), Some("log"));
        assert_eq!(table["storage"]["fsync"].as_str(), Some("always"));
        let room = table["limits"]["body_memory_bytes_max"]
            .as_integer()
            .unwrap();
        assert!(room >= 100_000_000 * 100, "{room}");
        assert_eq!(table["listen"].as_str(), Some("127.0.0.1:0"));
        assert_eq!(table["http_api"]["listen"].as_str(), Some("127.0.0.1:0"));
    }

    #[test]
    fn extra_config_merges_key_by_key_and_wins() {
        let table = config(&[
            "cmq-bench",
            "--workload=backlog",
            "--spawn",
            "--broker-config-extra=limits.body_memory_bytes_max = 2097152",
            "--broker-config-extra=[storage]\nsegment_bytes = 65536",
        ])
        .unwrap();
        assert_eq!(
            table["limits"]["body_memory_bytes_max"].as_integer(),
            Some(2_097_152)
        );
        assert_eq!(table["storage"]["segment_bytes"].as_integer(), Some(65_536));
        // The bench's own keys of the same table stay.
        assert_eq!(table["storage"]["mode"].as_str(), Some("log"));
        assert_eq!(table["accounts"][0]["secret_id"].as_str(), Some("AKIDx"));
    }

    #[test]
    fn extra_config_may_not_move_the_broker_or_its_account() {
        for extra in [
            "listen = \"0.0.0.0:7300\"",
            "data_dir = \"/\"",
            "[[accounts]]\nname = \"x\"",
        ] {
            let flag = format!("--broker-config-extra={extra}");
            let error = config(&["cmq-bench", "--spawn", &flag]).unwrap_err();
            assert!(error.contains("may not set"), "{extra}: {error}");
        }
        let error =
            config(&["cmq-bench", "--spawn", "--broker-config-extra=limits ="]).unwrap_err();
        assert!(error.contains("--broker-config-extra"), "{error}");
    }

    #[test]
    fn proc_status_of_this_process() {
        let pid = std::process::id();
        let rss = proc_status_bytes(pid, "VmRSS").unwrap();
        let hwm = proc_status_bytes(pid, "VmHWM").unwrap();
        assert!(rss > 0 && hwm >= rss, "rss {rss} hwm {hwm}");
        assert_eq!(proc_status_bytes(pid, "VmNoSuchField"), None);
    }
}
