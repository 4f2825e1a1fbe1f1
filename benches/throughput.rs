//! A first end-to-end throughput figure over real TCP on 127.0.0.1: the broker runs in this
//! process, clients pipeline requests over their connections.
//!
//! `cargo bench --bench throughput` (optional env: `MESSAGES` total, default 200000;
//! `WINDOW` requests in flight per connection, default 256). Two workloads, 100-byte bodies,
//! 4 connections:
//! - send: 4 producer connections, every send acknowledged;
//! - send+receive+delete: 2 producer and 2 consumer connections, consumers receive one message
//!   per request and delete each one.
//!
//! `STORAGE=memory`, `STORAGE=log` or `STORAGE=both` (the default) picks the storage: `log` is
//! the durable log in a temporary directory with `fsync = "always"` (every acknowledged send is
//! on disk), and also reports how many records each fsync covered (group commit).
//!
//! This is a measurement tool, not a test: it asserts only that every message arrived. The
//! `cmq-bench` load generator will supersede it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use cmqd::client::{Account, ClientConfig, QueueAttributeSet};
use cmqd::clock::SystemClock;
use cmqd::config::{AccountConfig, Limits};
use cmqd::server::{Server, ServerOptions};
use cmqd::storage::log::{LogConfig, LogStats, LogStorage};
use cmqd::storage::{MemoryStorage, Storage};

const SECRET_ID: &str = "AKIDbench";
const SECRET_KEY: &str = "bench-secret-key-0123456789";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // A test runner listing the tests (`cargo nextest`: `--list --format terse`) gets this
    // whole run as one test, which it then runs by name like `cargo test` does.
    if std::env::args().any(|a| a == "--list") {
        println!("throughput: test");
        return;
    }
    // `cargo test --benches` runs this with `--bench` absent: stay quick there.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let messages = if benchmarking {
        env_usize("MESSAGES", 200_000)
    } else {
        2_000
    };
    let window = env_usize("WINDOW", 256);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start runtime: {error}");
            std::process::exit(1);
        }
    };
    let storage = std::env::var("STORAGE").unwrap_or_else(|_| "both".into());
    let modes: &[&str] = match storage.as_str() {
        "memory" => &["memory"],
        "log" => &["log"],
        _ => &["memory", "log"],
    };
    for mode in modes {
        if let Err(error) = runtime.block_on(run(messages, window, mode)) {
            eprintln!("throughput bench failed: {error}");
            std::process::exit(1);
        }
    }
}

/// The durable log of a run (for its counters), and the directory that holds it.
type Durable = Option<(Arc<LogStorage>, tempfile::TempDir)>;

/// The storage of one run, and the log when durable.
fn storage(mode: &str) -> Result<(Arc<dyn Storage>, Durable), Box<dyn std::error::Error>> {
    if mode == "memory" {
        return Ok((Arc::new(MemoryStorage::new()), None));
    }
    let dir = tempfile::tempdir()?;
    let log = Arc::new(LogStorage::open(
        dir.path(),
        LogConfig::default(),
        Arc::new(SystemClock::new()),
    )?);
    Ok((log.clone(), Some((log, dir))))
}

fn report_log(log: &Durable, before: LogStats) -> LogStats {
    let Some((log, _)) = log else {
        return before;
    };
    let now = log.stats();
    let syncs = now.syncs - before.syncs;
    let records = now.records - before.records;
    println!(
        "  log: {records} records in {} batches, {syncs} fsyncs = {:.1} records per fsync",
        now.batches - before.batches,
        records as f64 / syncs.max(1) as f64
    );
    now
}

async fn run(messages: usize, window: usize, mode: &str) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "storage: {mode}{}",
        if mode == "log" { " (fsync always)" } else { "" }
    );
    let (store, log) = storage(mode)?;
    let mut stats = log.as_ref().map(|(l, _)| l.stats()).unwrap_or_default();
    let options = ServerOptions {
        listen: "127.0.0.1:0".parse()?,
        limits: Limits::default(),
        accounts: vec![AccountConfig {
            name: "bench".into(),
            secret_id: SECRET_ID.into(),
            secret_key: SECRET_KEY.into(),
        }],
    };
    let server = Server::bind_with(options, store, Arc::new(SystemClock::new()))
        .await?
        .spawn()?;
    let endpoint = server.addr().to_string();
    let connect = || Account::connect(&endpoint, SECRET_ID, SECRET_KEY, ClientConfig::default());
    let admin = connect().await?;
    let body = bytes::Bytes::from(vec![b'x'; 100]);

    // W1 shape: 4 producer connections.
    admin
        .create_queue("send-only", &QueueAttributeSet::default())
        .await?;
    let started = cmqd::clock::monotonic_now();
    let mut tasks = Vec::new();
    for p in 0..4 {
        let account = connect().await?;
        let body = body.clone();
        let count = messages / 4 + usize::from(p < messages % 4);
        tasks.push(tokio::spawn(produce(
            account,
            "send-only",
            body,
            count,
            window,
        )));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let stored = admin
        .queue("send-only")
        .get_attributes()
        .await?
        .active_msg_num;
    assert_eq!(stored, messages as u64, "every acknowledged send is stored");
    report("send, 4 producer connections", messages, elapsed);
    stats = report_log(&log, stats);

    // W2 shape: 2 producers, 2 consumers, receive + delete every message.
    admin
        .create_queue("send-receive", &QueueAttributeSet::default())
        .await?;
    let received = Arc::new(AtomicU64::new(0));
    let started = cmqd::clock::monotonic_now();
    let mut tasks = Vec::new();
    for p in 0..2 {
        let account = connect().await?;
        let body = body.clone();
        let count = messages / 2 + usize::from(p < messages % 2);
        tasks.push(tokio::spawn(produce(
            account,
            "send-receive",
            body,
            count,
            window,
        )));
    }
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let account = connect().await?;
        consumers.push(tokio::spawn(consume(
            account,
            received.clone(),
            messages as u64,
            window,
        )));
    }
    for task in tasks {
        task.await??;
    }
    let mut finished = started;
    for task in consumers {
        finished = finished.max(task.await??);
    }
    // Up to the last delete, not including the idle long polls that end the consumers.
    let elapsed = finished - started;
    report("send+receive+delete, 2+2 connections", messages, elapsed);
    report_log(&log, stats);
    server.shutdown().await?;
    Ok(())
}

fn report(what: &str, messages: usize, elapsed: Duration) {
    let rate = messages as f64 / elapsed.as_secs_f64();
    println!(
        "{what}: {messages} messages of 100 B in {:.3} s = {:.0} msg/s",
        elapsed.as_secs_f64(),
        rate
    );
}

async fn produce(
    account: Account,
    queue: &'static str,
    body: bytes::Bytes,
    count: usize,
    window: usize,
) -> Result<(), cmqd::client::Error> {
    let queue = account.queue(queue);
    let mut sends = futures::stream::iter(0..count)
        .map(|_| {
            let queue = queue.clone();
            let body = body.clone();
            async move { queue.send_message(body, 0).await }
        })
        .buffer_unordered(window);
    while let Some(result) = sends.next().await {
        result?;
    }
    Ok(())
}

async fn consume(
    account: Account,
    received: Arc<AtomicU64>,
    total: u64,
    window: usize,
) -> Result<Instant, cmqd::client::Error> {
    let queue = account.queue("send-receive");
    let mut last_delete = cmqd::clock::monotonic_now();
    let deadline = cmqd::clock::monotonic_now() + Duration::from_secs(300);
    let mut inflight = futures::stream::FuturesUnordered::new();
    loop {
        while inflight.len() < window && received.load(Ordering::Relaxed) < total {
            let queue = queue.clone();
            let received = received.clone();
            inflight.push(async move {
                match queue.receive_message(Some(1)).await {
                    Ok(message) => {
                        queue.delete_message(&message.receipt_handle).await?;
                        received.fetch_add(1, Ordering::Relaxed);
                        Ok(Some(cmqd::clock::monotonic_now()))
                    }
                    Err(e) if e.is_no_message() => Ok(None),
                    Err(e) => Err(e),
                }
            });
        }
        match inflight.next().await {
            Some(result) => {
                if let Some(at) = result? {
                    last_delete = last_delete.max(at);
                }
            }
            None => return Ok(last_delete),
        }
        if received.load(Ordering::Relaxed) >= total && inflight.is_empty() {
            return Ok(last_delete);
        }
        if cmqd::clock::monotonic_now() > deadline {
            eprintln!("consumer gave up after 300 s");
            return Ok(last_delete);
        }
    }
}
