//! kill -9 under load, on the real binary.
//!
//! The broker (`cmqd`, durable log, `fsync = "always"`) runs with 1 MiB segments so that
//! rotation and reclamation happen during the test. Two producers and two consumers work over
//! TCP, and a publisher publishes to a topic with two queue subscriptions; after a random
//! 50-350 ms the broker gets SIGKILL and is started again on the same data directory, 24 times.
//! At the end every acknowledged send was delivered to a consumer at some point or is still
//! stored, no acknowledged delete came back, and every stored message is one that was sent
//! (same body); the topic and its subscriptions are there, every acknowledged publish has its
//! copy in both subscribed queues, and every copy there was published. A second broker on the
//! same directory refuses to start.
//!
//! The body cache is the smallest allowed (1 MiB) and bodies are padded to about 250 bytes, so
//! the stored bodies beyond a few thousand are dropped from memory
//! and read back from the log by the consumers and the final check.
//!
//! A shorter test runs the same load with `fsync = "interval"` and `"never"`, which promise
//! nothing about acknowledged changes: the broker must recover after each kill, report no
//! damage, and hold nothing that was not sent.
//!
//! Bounds: each run is bounded in time, each client loop by the run's stop flag and a request
//! timeout, and start-up by a deadline. Only 127.0.0.1; only the processes this test started
//! are killed, by their handle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::RealBroker;
use cmqd::client::{Account, ClientConfig, QueueAttributeSet};
use cmqd::model::{SubscriptionSpec, TopicAttributeSet};

const SECRET_ID: &str = "AKIDcrash0001";
const SECRET_KEY: &str = "crash-secret-key-0123456789";
const QUEUE: &str = "crashq";
const TOPIC: &str = "crasht";
/// The queues the topic's two subscriptions fill.
const FANOUT: [&str; 2] = ["fan1", "fan2"];
const KILLS: usize = 24;
/// Makes each sent body about 250 bytes.
const PAD: &str = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789";

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
    /// Bodies of every publish tried.
    published_tried: BTreeSet<String>,
    /// Bodies of acknowledged publishes.
    published_acked: BTreeSet<String>,
}

struct Broker {
    real: RealBroker,
    addr: String,
}

impl Broker {
    /// Starts the broker with its stderr appended to `log`; panics with the log if it refuses.
    fn start(config: &Path, log: &Path) -> Broker {
        match RealBroker::start(config, Some(log)) {
            Ok(real) => Broker {
                addr: real.addr.to_string(),
                real,
            },
            Err(stderr) => panic!("the broker refused to start; its log:\n{stderr}"),
        }
    }

    fn kill(self) {
        // SIGKILL, to this child only.
        self.real.kill();
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
        // Padded to about 250 bytes, so that a few thousand stored messages pass the 1 MiB
        // body cache.
        let bodies: Vec<String> = (0..4).map(|i| format!("{tag}-{n}-{i}-{PAD}")).collect();
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

/// Publishes pairs of messages to the topic; at most 200 publishes a run, to bound the draining.
async fn publish(addr: String, tag: String, stop: Arc<AtomicBool>, record: Arc<Mutex<Record>>) {
    let Ok(account) = Account::connect(&addr, SECRET_ID, SECRET_KEY, client_config()).await else {
        return;
    };
    let topic = account.topic(TOPIC);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && n < 200 {
        let bodies: Vec<String> = (0..2).map(|i| format!("{tag}-{n}-{i}")).collect();
        n += 1;
        record
            .lock()
            .unwrap()
            .published_tried
            .extend(bodies.iter().cloned());
        match topic.batch_publish_message(bodies.clone(), &[], None).await {
            Ok(_) => record.lock().unwrap().published_acked.extend(bodies),
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
        // A short long poll: waits for the next send rather than sleeping between looks.
        let messages = match queue.batch_receive_message(8, Some(1)).await {
            Ok(messages) => messages,
            Err(e) if e.is_no_message() => continue,
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

fn write_config(dir: &Path, fsync: &str) -> PathBuf {
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
enabled = true
listen = "127.0.0.1:0"

# Off: its fixed default port would collide when two of these tests run at once.
[http_api]
enabled = false

# The smallest body cache, so that bodies are dropped from memory and read back from the log
# across the kills (most of a run's backlog is beyond it).
[storage]
segment_bytes = 1048576
body_cache_bytes = 1048576
fsync = "{fsync}"
"#,
        data = dir.join("data").display()
    );
    std::fs::write(&path, config).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_repeated_kill_minus_nine() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "always");
    let log = dir.path().join("broker.log");
    let record = Arc::new(Mutex::new(Record::default()));
    let mut rng = StdRng::seed_from_u64(0xC0FFEE);
    let started = cmqd::clock::monotonic_now();

    let broker = Broker::start(&config, &log);
    set_up(&broker.addr).await;
    let mut broker = Some(broker);
    for kill in 0..KILLS {
        let running = match broker.take() {
            Some(b) => b,
            None => Broker::start(&config, &log),
        };
        run_and_kill(running, kill, rng.gen_range(50..350), &record).await;
    }

    // Restart for good and take stock.
    let broker = Broker::start(&config, &log);
    let account = connect(&broker.addr).await;
    let stored = drain(&account, QUEUE).await;
    // Recovery loaded bodies up to the 1 MiB cache only: a larger backlog was read from the log.
    if stored.len() * PAD.len() > 2 * 1024 * 1024 {
        let metrics = broker.real.metrics.expect("metrics are on");
        let misses = crate::support::metric(metrics, "cmq_body_cache_misses_total").await;
        assert!(
            misses > 0.0,
            "{} bodies, none read back from the log",
            stored.len()
        );
    }

    // The topic and both subscriptions are there; every acknowledged publish has a copy in
    // each subscribed queue, and every copy was published.
    let (_, subs) = account
        .topic(TOPIC)
        .list_subscription("", 0, 10)
        .await
        .unwrap();
    assert_eq!(subs.len(), 2, "{subs:?}");
    let fanned: Vec<BTreeMap<u64, String>> = {
        let mut all = Vec::new();
        for q in FANOUT {
            all.push(drain(&account, q).await);
        }
        all
    };

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
    check_nothing_invented(&r, &stored, &fanned);
    for (q, copies) in FANOUT.iter().zip(&fanned) {
        let bodies: BTreeSet<&String> = copies.values().collect();
        assert_eq!(bodies.len(), copies.len(), "a publish stored twice in {q}");
        for body in &r.published_acked {
            assert!(
                bodies.contains(body),
                "acknowledged publish {body} has no copy in {q}"
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
    assert!(
        r.published_acked.len() > 100,
        "only {} publishes acknowledged",
        r.published_acked.len()
    );
    eprintln!(
        "kill -9 x{KILLS}: {} sends, {} deletes and {} published messages acknowledged, {} \
         stored at the end, {:?}",
        r.acked.len(),
        r.deleted.len(),
        r.published_acked.len(),
        stored.len(),
        started.elapsed()
    );
}

/// The queue, the topic and its two queue subscriptions, all acknowledged before any kill.
async fn set_up(addr: &str) {
    let account = connect(addr).await;
    for q in [QUEUE].into_iter().chain(FANOUT) {
        account
            .create_queue(q, &QueueAttributeSet::default())
            .await
            .unwrap();
    }
    account
        .create_topic(TOPIC, &TopicAttributeSet::default())
        .await
        .unwrap();
    for (i, q) in FANOUT.iter().enumerate() {
        account
            .create_subscribe(TOPIC, &format!("sub{i}"), &SubscriptionSpec::queue(q))
            .await
            .unwrap();
    }
}

/// Runs two producers, two consumers and a publisher against `running` for `ms`, then kills
/// it and waits for the clients to stop.
async fn run_and_kill(running: Broker, kill: usize, ms: u64, record: &Arc<Mutex<Record>>) {
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
    tasks.push(tokio::spawn(publish(
        running.addr.clone(),
        format!("k{kill}t"),
        stop.clone(),
        record.clone(),
    )));
    tokio::time::sleep(Duration::from_millis(ms)).await;
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

/// Receives everything `queue` holds: id -> body.
async fn drain(account: &Account, queue: &str) -> BTreeMap<u64, String> {
    let queue = account.queue(queue);
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
    stored
}

/// Every stored message was sent (with the body it was acknowledged with, if it was), and
/// every copy in a subscribed queue was published.
fn check_nothing_invented(
    r: &Record,
    stored: &BTreeMap<u64, String>,
    fanned: &[BTreeMap<u64, String>],
) {
    for (id, body) in stored {
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
    for copies in fanned {
        for (id, body) in copies {
            assert!(
                r.published_tried.contains(body),
                "copy {id} ({body}) was never published"
            );
        }
    }
}

/// `fsync = "interval"` and `"never"` promise nothing about acknowledged changes; after
/// SIGKILL under load the broker must still recover every time, report no damage (a torn tail
/// is not damage), and hold nothing that was not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weaker_fsync_modes_recover_cleanly_after_kill_minus_nine() {
    for mode in ["interval", "never"] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), mode);
        let log = dir.path().join("broker.log");
        let record = Arc::new(Mutex::new(Record::default()));
        let mut rng = StdRng::seed_from_u64(0xF5);
        let broker = Broker::start(&config, &log);
        set_up(&broker.addr).await;
        let mut broker = Some(broker);
        for kill in 0..4 {
            let running = match broker.take() {
                Some(b) => b,
                None => Broker::start(&config, &log),
            };
            run_and_kill(running, kill, rng.gen_range(50..200), &record).await;
        }
        let broker = Broker::start(&config, &log);
        let account = connect(&broker.addr).await;
        let stored = drain(&account, QUEUE).await;
        let mut fanned = Vec::new();
        for q in FANOUT {
            fanned.push(drain(&account, q).await);
        }
        broker.kill();
        let r = record.lock().unwrap();
        check_nothing_invented(&r, &stored, &fanned);
        assert!(r.acked.len() > 100, "{mode}: only {} sends", r.acked.len());
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            !text.contains("corrupt") && !text.contains("panicked"),
            "{mode}: the broker reported damage:\n{text}"
        );
    }
}
