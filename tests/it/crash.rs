//! kill -9 under load, on the real binary.
//!
//! The broker (`cmqd`, durable log, `fsync = "always"`) runs with 1 MiB segments so that
//! rotation and reclamation happen during the test. Two producers and two consumers work over
//! TCP; after a random 50-350 ms the broker gets SIGKILL and is started again on the same data
//! directory, 24 times. At the end every acknowledged send was delivered to a consumer at some
//! point or is still stored, no acknowledged delete came back, and every stored message is one
//! that was sent (same body). A second broker on the same directory refuses to start.
//!
//! Bounds: each run is bounded in time, each client loop by the run's stop flag and a request
//! timeout, and start-up by a deadline. Only 127.0.0.1; only the processes this test started
//! are killed, by their handle.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use cmqd::client::{Account, ClientConfig, QueueAttributeSet};

const SECRET_ID: &str = "AKIDcrash0001";
const SECRET_KEY: &str = "crash-secret-key-0123456789";
const QUEUE: &str = "crashq";
const KILLS: usize = 24;
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Record {
    /// Bodies of every send tried, acknowledged or not.
    tried: BTreeSet<String>,
    /// Acknowledged sends: id -> body.
    acked: BTreeMap<u64, String>,
    /// Ids a consumer received at least once.
    delivered: BTreeSet<u64>,
    /// Acknowledged deletes.
    deleted: BTreeSet<u64>,
}

struct Broker {
    child: Child,
    addr: String,
}

impl Broker {
    fn start(config: &Path, log: &Path) -> Broker {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cmqd"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the start-up lines, then keeps draining so the broker never blocks on stdout.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(STARTUP_DEADLINE) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the broker did not start in time; its log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        };
        Broker { child, addr }
    }

    fn kill(mut self) {
        // SIGKILL, to this child only.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

fn client_config() -> ClientConfig {
    ClientConfig::default()
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(2))
}

async fn connect(addr: &str) -> Account {
    Account::connect(addr, SECRET_ID, SECRET_KEY, client_config())
        .await
        .unwrap()
}

async fn produce(addr: String, tag: String, stop: Arc<AtomicBool>, record: Arc<Mutex<Record>>) {
    let Ok(account) = Account::connect(&addr, SECRET_ID, SECRET_KEY, client_config()).await else {
        return;
    };
    let queue = account.queue(QUEUE);
    let mut n = 0u64;
    // Ends when the run stops, or at the first error (the broker is gone).
    while !stop.load(Ordering::Relaxed) && n < 100_000 {
        let bodies: Vec<String> = (0..4).map(|i| format!("{tag}-{n}-{i}")).collect();
        n += 1;
        record.lock().unwrap().tried.extend(bodies.iter().cloned());
        match queue.batch_send_message(bodies.clone(), 0).await {
            Ok(ids) => {
                let mut r = record.lock().unwrap();
                for (id, body) in ids.into_iter().zip(bodies) {
                    r.acked.insert(id, body);
                }
            }
            Err(_) => return,
        }
    }
}

async fn consume(addr: String, stop: Arc<AtomicBool>, record: Arc<Mutex<Record>>) {
    let Ok(account) = Account::connect(&addr, SECRET_ID, SECRET_KEY, client_config()).await else {
        return;
    };
    let queue = account.queue(QUEUE);
    let mut rounds = 0u64;
    while !stop.load(Ordering::Relaxed) && rounds < 100_000 {
        rounds += 1;
        let messages = match queue.batch_receive_message(8, Some(0)).await {
            Ok(messages) => messages,
            Err(e) if e.is_no_message() => {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            Err(_) => return,
        };
        record
            .lock()
            .unwrap()
            .delivered
            .extend(messages.iter().map(|m| m.msg_id));
        // Deleted one by one: each acknowledgement is about one message.
        for m in messages {
            match queue.delete_message(&m.receipt_handle).await {
                Ok(()) => {
                    record.lock().unwrap().deleted.insert(m.msg_id);
                }
                Err(e) if e.code().is_some() => {}
                Err(_) => return,
            }
        }
    }
}

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("cmqd.toml");
    let config = format!(
        r#"
listen = "127.0.0.1:0"
data_dir = "{data}"

[[accounts]]
name = "crash"
secret_id = "{SECRET_ID}"
secret_key = "{SECRET_KEY}"

[metrics]
enabled = false

[storage]
segment_bytes = 1048576
"#,
        data = dir.join("data").display()
    );
    std::fs::write(&path, config).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_repeated_kill_minus_nine() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let log = dir.path().join("broker.log");
    let record = Arc::new(Mutex::new(Record::default()));
    let mut rng = StdRng::seed_from_u64(0xC0FFEE);
    let started = Instant::now();

    let broker = Broker::start(&config, &log);
    connect(&broker.addr)
        .await
        .create_queue(QUEUE, &QueueAttributeSet::default())
        .await
        .unwrap();
    let mut broker = Some(broker);
    for kill in 0..KILLS {
        let running = match broker.take() {
            Some(b) => b,
            None => Broker::start(&config, &log),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for p in 0..2 {
            tasks.push(tokio::spawn(produce(
                running.addr.clone(),
                format!("k{kill}p{p}"),
                stop.clone(),
                record.clone(),
            )));
        }
        for _ in 0..2 {
            tasks.push(tokio::spawn(consume(
                running.addr.clone(),
                stop.clone(),
                record.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..350))).await;
        // Killed mid-flight: requests are in the air, batches unsynced.
        running.kill();
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            // Every client call has a 2 s timeout and stops at its first error.
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("a client did not stop")
                .unwrap();
        }
    }

    // Restart for good and take stock.
    let broker = Broker::start(&config, &log);
    let account = connect(&broker.addr).await;
    let queue = account.queue(QUEUE);
    let mut stored: BTreeMap<u64, String> = BTreeMap::new();
    for _ in 0..1_000_000 {
        match queue.batch_receive_message(16, Some(0)).await {
            Ok(messages) => {
                for m in messages {
                    let body = String::from_utf8(m.body.to_vec()).unwrap();
                    assert!(
                        stored.insert(m.msg_id, body).is_none(),
                        "message {} received twice while draining",
                        m.msg_id
                    );
                }
            }
            Err(e) if e.is_no_message() => break,
            Err(e) => panic!("draining failed: {e}"),
        }
    }

    // A second broker on the same data directory refuses to start.
    let second = Command::new(env!("CARGO_BIN_EXE_cmqd"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!second.status.success(), "a second broker started");
    let why = String::from_utf8_lossy(&second.stderr);
    assert!(why.contains("in use by another cmqd"), "{why}");
    broker.kill();

    let r = record.lock().unwrap();
    for (id, body) in &stored {
        assert!(
            r.tried.contains(body),
            "stored message {id} ({body}) was never sent"
        );
        if let Some(acked) = r.acked.get(id) {
            assert_eq!(
                acked, body,
                "message {id} has another body than was acknowledged"
            );
        }
    }
    for (id, body) in &r.acked {
        assert!(
            r.deleted.contains(id) || stored.contains_key(id) || r.delivered.contains(id),
            "acknowledged send {id} ({body}) lost"
        );
    }
    for id in &r.deleted {
        assert!(
            !stored.contains_key(id),
            "acknowledged delete {id} came back"
        );
    }
    // The test exercised something: many sends and deletes were acknowledged across the kills.
    assert!(
        r.acked.len() > 1_000,
        "only {} sends acknowledged",
        r.acked.len()
    );
    assert!(
        r.deleted.len() > 500,
        "only {} deletes acknowledged",
        r.deleted.len()
    );
    eprintln!(
        "kill -9 x{KILLS}: {} sends and {} deletes acknowledged, {} stored at the end, {:?}",
        r.acked.len(),
        r.deleted.len(),
        stored.len(),
        started.elapsed()
    );
}
