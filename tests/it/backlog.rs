//! A backlog bounded by disk, not by memory (log mode, `fsync = "always"`).
//!
//! - A backlog many times the body cache: the keeper's pass (called directly, in process)
//!   drops the bodies beyond the cache from memory and receives read them back from the log,
//!   byte for byte; on the real binary, a restart loads bodies only up to the cache and serves
//!   the rest from the log.
//! - The disk budget: once the log takes `storage.disk_bytes_max`, sends are refused with
//!   6000/10095 and nothing is stored; receives and deletes go on; once consumers have freed
//!   the space, sends are accepted again.
//!
//! Nothing sleeps: waits are on replies, bounded in count and by deadlines. Only 127.0.0.1;
//! only the processes this test started are stopped, by their handle.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::support::{metric, RealBroker, TestServer, ALICE};
use cmqd::broker::keeper::StorageBudget;
use cmqd::client::{Account, ClientConfig, Queue, QueueAttributeSet};

const CACHE: u64 = 1024 * 1024;

fn write_config(dir: &Path, storage: &str) -> std::path::PathBuf {
    let config = dir.join("cmqd.toml");
    let text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{data}\"\n\n[[accounts]]\nname = \"alice\"\n\
         secret_id = \"{id}\"\nsecret_key = \"{key}\"\n\n[metrics]\nenabled = true\n\
         listen = \"127.0.0.1:0\"\n\n[http_api]\nenabled = false\n\n[storage]\nmode = \"log\"\n\
         fsync = \"always\"\n{storage}\n",
        data = dir.join("data").display(),
        id = ALICE.0,
        key = ALICE.1,
    );
    std::fs::write(&config, text).unwrap();
    config
}

fn start(config: &Path, log: &Path) -> RealBroker {
    match RealBroker::start(config, Some(log)) {
        Ok(real) => real,
        Err(stderr) => panic!("the broker refused to start; its log:\n{stderr}"),
    }
}

async fn connect(addr: SocketAddr) -> Account {
    let config = ClientConfig::default()
        .connect_timeout(Duration::from_secs(5))
        .request_timeout(Duration::from_secs(10));
    Account::connect(&addr.to_string(), ALICE.0, ALICE.1, config)
        .await
        .unwrap()
}

/// Receives and deletes everything in `queue`; returns id -> body.
async fn drain(account: &Account, queue: &str, expect: usize) -> BTreeMap<u64, Vec<u8>> {
    let queue = account.queue(queue);
    let mut got = BTreeMap::new();
    for _ in 0..expect * 2 + 10 {
        if got.len() == expect {
            break;
        }
        let messages = match queue.batch_receive_message(16, Some(1)).await {
            Ok(messages) => messages,
            Err(e) if e.is_no_message() => continue,
            Err(e) => panic!("receive failed: {e}"),
        };
        let handles: Vec<String> = messages.iter().map(|m| m.receipt_handle.clone()).collect();
        for m in messages {
            assert!(
                got.insert(m.msg_id, m.body.to_vec()).is_none(),
                "message {} received twice",
                m.msg_id
            );
        }
        queue.batch_delete_message(&handles).await.unwrap();
    }
    got
}

/// Sends 16 MiB of distinct 4 KiB bodies (16 times the cache) to `queue`: id -> body.
async fn fill(queue: &Queue) -> BTreeMap<u64, Vec<u8>> {
    let mut sent: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for batch in 0..256 {
        let bodies: Vec<Vec<u8>> = (0..16)
            .map(|i| {
                let mut body = format!("{batch}-{i}-").into_bytes();
                body.resize(4096, b'a' + ((batch + i) % 26) as u8);
                body
            })
            .collect();
        let ids = queue.batch_send_message(bodies.clone(), 0).await.unwrap();
        sent.extend(ids.into_iter().zip(bodies));
    }
    sent
}

fn backlog_attributes() -> QueueAttributeSet {
    QueueAttributeSet {
        max_msg_heap_num: Some(1_000_000),
        ..QueueAttributeSet::default()
    }
}

/// The keeper's pass, called directly (the broker runs it every 50 ms): it drops the bodies
/// beyond the cache, and receives read them back from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_drops_bodies_beyond_the_cache_and_receives_read_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_durable(dir.path()).await;
    let account = server.alice().await;
    account
        .create_queue("backlog", &backlog_attributes())
        .await
        .unwrap();
    let sent = fill(&account.queue("backlog")).await;
    let broker = server.running.shared().clone();
    let budget = StorageBudget {
        body_cache_bytes: CACHE,
        disk_bytes_max: 0,
        disk_free_min_bytes: 0,
    };
    let keeper = broker.clone();
    tokio::task::spawn_blocking(move || keeper.keep(budget))
        .await
        .unwrap();
    let held = broker.engine.stored_body_bytes();
    assert!(
        held <= CACHE,
        "{held} body bytes held, the cache is {CACHE}"
    );
    assert!(broker.engine.body_stats().evicted_bytes >= 15 * CACHE);
    let drained = drain(&account, "backlog", sent.len()).await;
    assert!(
        drained == sent,
        "a body came back different from what was sent"
    );
    let stats = broker.engine.body_stats();
    assert!(stats.misses > 0, "{stats:?}");
    assert!(stats.read_bytes >= 14 * CACHE, "{stats:?}");
    assert_eq!(stats.read_errors, 0);
    server.stop().await;
}

/// The real binary: a restart loads bodies only up to the cache, and the rest are served from
/// the log, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_many_times_the_body_cache_is_served_from_the_log_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cmqd.log");
    let config = write_config(
        dir.path(),
        &format!("segment_bytes = 4194304\nbody_cache_bytes = {CACHE}"),
    );
    let broker = start(&config, &log);
    let account = connect(broker.addr).await;
    account
        .create_queue("backlog", &backlog_attributes())
        .await
        .unwrap();
    let sent = fill(&account.queue("backlog")).await;
    drop(account);
    broker.terminate();

    // After a restart: bodies beyond the cache stay in the log.
    let broker = start(&config, &log);
    let metrics = broker.metrics.unwrap();
    let held = metric(metrics, "cmq_stored_body_bytes").await;
    assert!(
        held <= CACHE as f64,
        "{held} body bytes held after recovery"
    );
    let account = connect(broker.addr).await;
    let drained = drain(&account, "backlog", sent.len()).await;
    assert!(
        drained == sent,
        "a body came back different from what was sent"
    );
    assert!(metric(metrics, "cmq_body_cache_misses_total").await > 0.0);
    assert!(metric(metrics, "cmq_body_read_bytes_total").await >= (8 * CACHE) as f64);
    assert_eq!(metric(metrics, "cmq_body_read_errors_total").await, 0.0);
    drop(account);
    broker.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_refused_at_the_disk_budget_and_accepted_again_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cmqd.log");
    // Two 64 KiB segments' worth at most.
    let config = write_config(
        dir.path(),
        "segment_bytes = 65536\ndisk_bytes_max = 196608\ndisk_free_min_bytes = 0",
    );
    let broker = start(&config, &log);
    let metrics = broker.metrics.unwrap();
    let account = connect(broker.addr).await;
    account
        .create_queue("budget", &QueueAttributeSet::default())
        .await
        .unwrap();
    let queue = account.queue("budget");
    let body = vec![b'b'; 1024];
    let mut stored = 0usize;
    let mut refused = None;
    // The keeper notices the budget within 50 ms; sends go on until then (bounded in count
    // and time: 20,000 sends of 1 KiB are a hundred times the budget).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stored < 20_000 && tokio::time::Instant::now() < deadline {
        match queue.send_message(body.clone(), 0).await {
            Ok(_) => stored += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let error = refused.expect("the disk budget never refused a send");
    let code = error.code().map(|c| (c.code, c.module));
    assert_eq!(code, Some((6000, 10095)), "{error}");
    assert!(error.to_string().contains("disk budget"), "{error}");
    assert_eq!(metric(metrics, "cmq_storage_disk_full").await, 1.0);
    let attributes = queue.get_attributes().await.unwrap();
    assert_eq!(
        attributes.active_msg_num, stored as u64,
        "a refused send was stored"
    );

    // Receives and deletes go on; once the space is reclaimed, sends are accepted again.
    let drained = drain(&account, "budget", stored).await;
    assert_eq!(drained.len(), stored);
    // Retried back to back (each refusal is answered at once) until the log has reclaimed the
    // drained segments and the keeper has seen it; bounded in count and time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut tries = 0u32;
    loop {
        match queue.send_message(body.clone(), 0).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code().map(|c| (c.code, c.module)), Some((6000, 10095)));
                tries += 1;
                assert!(
                    tokio::time::Instant::now() < deadline && tries < 1_000_000,
                    "sends still refused after the queue was drained: {e}"
                );
            }
        }
    }
    assert_eq!(metric(metrics, "cmq_storage_disk_full").await, 0.0);
    drop(account);
    broker.terminate();
}
