//! The log under failing disks, and the log behind a real server: a full disk fails sends with
//! a clear error and the log catches up when space returns; a failed fsync stops the log and
//! the server; a locked data directory is refused; acknowledged messages, dequeue counts,
//! topics, subscriptions and publishes survive a restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use cmqd::client::{Account, ClientConfig, QueueAttributeSet};
use cmqd::clock::{Clock, ManualClock, SystemClock};
use cmqd::config::{AccountConfig, Limits};
use cmqd::engine::{Engine, EngineConfig, ReceiveOutcome};
use cmqd::model::{SubscriptionAttributeSet, SubscriptionSpec, TopicAttributeSet};
use cmqd::server::{Server, ServerOptions};
use cmqd::storage::log::{
    FsyncMode, LogConfig, LogStorage, DIRECT_WRITE_MIN_BYTES, REMOVAL_STEP_BYTES,
};
use cmqd::storage::sim::SimDisk;
use cmqd::storage::{Commit, Storage, StorageError, StorageFailure};

fn manual() -> LogConfig {
    LogConfig {
        fsync: FsyncMode::Always,
        segment_bytes: 64 * 1024,
        maintenance_interval: Duration::ZERO,
        threaded: false,
        body_cache_bytes: u64::MAX,
        direct_write_min_bytes: DIRECT_WRITE_MIN_BYTES,
        removal_step_bytes: REMOVAL_STEP_BYTES,
        spare_segment: true,
        disk_bytes_max: 0,
    }
}

/// The simulated time of the tests on a [`SimDisk`] (a reset after a failed write restores at
/// the storage clock's time, so the engine calls use the same).
const T0: u64 = 1_700_000_000_000;

fn open_sim(disk: &SimDisk, config: LogConfig) -> (LogStorage, Arc<Engine>) {
    let clock = Arc::new(ManualClock::new(T0));
    let storage = LogStorage::open_dir(Arc::new(disk.clone()), config, clock).unwrap();
    let engine = Arc::new(Engine::new(EngineConfig::default()));
    storage.recover(&engine).unwrap();
    storage.attach(&engine);
    (storage, engine)
}

/// The result of a commit, after the writer ran if it had to.
fn outcome(storage: &LogStorage, commit: Commit) -> Result<(), StorageError> {
    match commit {
        Commit::Done => Ok(()),
        Commit::Pending(mut rx) => {
            if let Ok(result) = rx.try_recv() {
                return result;
            }
            storage.pump();
            rx.try_recv()
                .unwrap_or(Err(StorageError(cmqd::storage::StorageFailure::Abandoned)))
        }
    }
}

/// A send as the server makes it: refused before the engine call while the log refuses
/// changes (`None`).
fn send(
    storage: &LogStorage,
    engine: &Engine,
    body: Bytes,
) -> Option<(u64, Result<(), StorageError>)> {
    if storage.refusal().is_some() {
        return None;
    }
    let mut out = Vec::new();
    let ids = engine.send("acct", "q", &[body], 0, T0, &mut out).unwrap();
    let commit = storage.append(out);
    Some((ids[0], outcome(storage, commit)))
}

fn create(storage: &LogStorage, engine: &Engine) {
    let mut out = Vec::new();
    engine
        .create_queue("acct", "q", &QueueAttributeSet::default(), T0, &mut out)
        .unwrap();
    outcome(storage, storage.append(out)).unwrap();
}

fn all_bodies(engine: &Engine) -> BTreeMap<u64, Bytes> {
    let mut found = BTreeMap::new();
    let mut out = Vec::new();
    while let Ok(ReceiveOutcome::Messages(messages)) =
        engine.receive("acct", "q", 16, T0 + 1, &mut out)
    {
        for m in messages {
            found.insert(m.msg_id, m.body);
        }
    }
    found
}

#[test]
fn a_full_disk_refuses_sends_undoes_the_failed_one_and_the_log_resumes_when_space_returns() {
    let disk = SimDisk::new();
    let (storage, engine) = open_sim(&disk, manual());
    create(&storage, &engine);
    let body = Bytes::from(vec![b'x'; 1000]);
    let mut acked = Vec::new();
    for _ in 0..5 {
        let (id, result) = send(&storage, &engine, body.clone()).unwrap();
        result.unwrap();
        acked.push(id);
    }
    // No room for another segment: the send that needs one fails.
    disk.set_capacity(Some(disk.used_bytes() + 1024));
    let mut failed = None;
    for _ in 0..500 {
        let (id, result) = send(&storage, &engine, body.clone()).unwrap();
        match result {
            Ok(()) => acked.push(id),
            Err(error) => {
                failed = Some((id, error));
                break;
            }
        }
    }
    let (undone, error) = failed.expect("the disk never filled up");
    assert!(
        error.0.is_disk_full()
            && error.to_string().contains("cannot write")
            && error.to_string().contains("disk full"),
        "{error}"
    );
    // Not stored means not made: the engine no longer has it, and has every acknowledged one.
    // (Receiving them all is not logged: the restart below does not see it.)
    let ids: Vec<u64> = all_bodies(&engine).into_keys().collect();
    assert!(!ids.contains(&undone), "the failed send is still there");
    assert_eq!(ids, acked);
    // While the disk is full, changes are refused before the engine is called.
    let refusal = storage.refusal().expect("changes are refused");
    assert!(
        matches!(refusal.0, StorageFailure::NotStored { .. }) && refusal.0.is_disk_full(),
        "{refusal:?}"
    );
    assert!(refusal.to_string().contains("disk full"), "{refusal}");
    assert!(send(&storage, &engine, body.clone()).is_none());
    storage.pump();
    assert!(storage.refusal().is_some(), "an empty batch fits no better");
    assert!(storage.stats().write_failures > 0);

    // Space returns: the next try writes, and sends succeed again.
    disk.set_capacity(None);
    storage.pump();
    assert!(storage.refusal().is_none());
    let (id, result) = send(&storage, &engine, body.clone()).unwrap();
    result.unwrap();
    acked.push(id);

    drop(engine);
    drop(storage);
    let (_storage, engine) = open_sim(&disk.reboot(7), manual());
    let found = all_bodies(&engine);
    for id in &acked {
        assert_eq!(found.get(id), Some(&body), "acknowledged send {id} lost");
    }
    // What failed was not stored, and does not come back (a retry would duplicate it).
    assert!(!found.contains_key(&undone));
    assert_eq!(found.len(), acked.len());
}

#[test]
fn a_failed_fsync_stops_the_log_and_its_change_does_not_come_back() {
    for seed in 0..16 {
        let disk = SimDisk::new();
        let (storage, engine) = open_sim(&disk, manual());
        create(&storage, &engine);
        let (first, ok) = send(&storage, &engine, Bytes::from_static(b"one")).unwrap();
        ok.unwrap();
        // Reported once, as Linux reports a writeback error.
        disk.fail_next_syncs(1);
        let (second, failed) = send(&storage, &engine, Bytes::from_static(b"two")).unwrap();
        let failed = failed.unwrap_err();
        assert!(
            matches!(failed.0, StorageFailure::Stopped { .. }),
            "{failed:?}"
        );
        assert!(failed.to_string().contains("fsync"));
        assert!(storage.fatal().is_cancelled());
        assert!(storage.fatal_error().unwrap().to_string().contains("fsync"));
        // Stopped for good: no retry could tell what reached the disk.
        assert!(storage.refusal().is_some());
        let mut out = Vec::new();
        engine
            .send(
                "acct",
                "q",
                &[Bytes::from_static(b"three")],
                0,
                T0,
                &mut out,
            )
            .unwrap();
        assert!(outcome(&storage, storage.append(out)).is_err());

        drop(engine);
        drop(storage);
        let (_storage, engine) = open_sim(&disk.reboot(seed), manual());
        let found = all_bodies(&engine);
        assert!(found.contains_key(&first));
        // The log erased (and synced) what it wrote after its last good sync.
        assert!(
            !found.contains_key(&second),
            "seed {seed}: the failed send came back"
        );
    }
}

#[test]
fn a_locked_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(SystemClock::new());
    let first = LogStorage::open(dir.path(), LogConfig::default(), clock.clone()).unwrap();
    let second = LogStorage::open(dir.path(), LogConfig::default(), clock.clone()).unwrap_err();
    assert!(matches!(second.0, StorageFailure::InUse(_)), "{second:?}");
    assert!(
        second.to_string().contains("in use by another cmqd"),
        "{second}"
    );
    assert!(
        second.to_string().contains(&std::process::id().to_string()),
        "{second}"
    );
    drop(first);
    // Released with the storage.
    LogStorage::open(dir.path(), LogConfig::default(), clock).unwrap();
}

const ID: &str = "AKIDstorage01";
const KEY: &str = "storage-secret-key-0123456789";

fn options() -> ServerOptions {
    ServerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        limits: Limits::default(),
        accounts: vec![AccountConfig {
            name: "acct".into(),
            secret_id: ID.into(),
            secret_key: KEY.into(),
        }],
    }
}

async fn durable_server(dir: &std::path::Path) -> cmqd::server::RunningServer {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let storage = LogStorage::open(dir, LogConfig::default(), clock.clone()).unwrap();
    Server::bind_with(options(), Arc::new(storage), clock)
        .await
        .unwrap()
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_server_keeps_what_it_acknowledged_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = durable_server(dir.path()).await;
    let account = Account::connect(&server.addr().to_string(), ID, KEY, ClientConfig::default())
        .await
        .unwrap();
    let queue = account.queue("kept");
    queue
        .create(&QueueAttributeSet {
            rewind_seconds: Some(600),
            ..QueueAttributeSet::default()
        })
        .await
        .unwrap();
    let ids = queue
        .batch_send_message(["one", "two", "three"], 0)
        .await
        .unwrap();
    let delayed = queue.send_message("later", 600).await.unwrap();
    let got = queue.receive_message(Some(0)).await.unwrap();
    queue.delete_message(&got.receipt_handle).await.unwrap();
    let in_flight = queue.receive_message(Some(0)).await.unwrap();
    server.shutdown().await.unwrap();

    let server = durable_server(dir.path()).await;
    let account = Account::connect(&server.addr().to_string(), ID, KEY, ClientConfig::default())
        .await
        .unwrap();
    let queue = account.queue("kept");
    let attrs = queue.get_attributes().await.unwrap();
    assert_eq!(attrs.rewind_seconds, 600);
    // The received-but-not-deleted message is visible again; the deleted one is in the rewind
    // area; the delayed one still waits.
    assert_eq!(
        (
            attrs.active_msg_num,
            attrs.inactive_msg_num,
            attrs.delay_msg_num,
            attrs.rewind_msg_num
        ),
        (2, 0, 1, 1)
    );
    let peeked = queue.peek_message(16).await.unwrap();
    let mut bodies: Vec<(u64, String)> = peeked
        .iter()
        .map(|m| (m.msg_id, String::from_utf8(m.body.to_vec()).unwrap()))
        .collect();
    bodies.sort();
    assert!(bodies.iter().any(|(id, _)| *id == in_flight.msg_id));
    assert!(bodies.iter().any(|(id, b)| *id == delayed && b == "later"));
    assert!(!bodies.iter().any(|(id, _)| *id == got.msg_id));
    assert!(bodies
        .iter()
        .all(|(id, _)| ids.contains(id) || *id == delayed));
    // New ids never collide with recovered ones.
    let new = queue.send_message("four", 0).await.unwrap();
    assert!(new > delayed);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stops_when_its_log_cannot_sync() {
    let disk = SimDisk::new();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let storage = LogStorage::open_dir(
        Arc::new(disk.clone()),
        LogConfig {
            segment_bytes: 64 * 1024,
            ..LogConfig::default()
        },
        clock.clone(),
    )
    .unwrap();
    let server = Server::bind_with(options(), Arc::new(storage), clock)
        .await
        .unwrap()
        .spawn()
        .unwrap();
    let account = Account::connect(&server.addr().to_string(), ID, KEY, ClientConfig::default())
        .await
        .unwrap();
    let queue = account.queue("q");
    queue.create(&QueueAttributeSet::default()).await.unwrap();
    disk.fail_syncs(true);
    let error = queue.send_message("lost", 0).await.unwrap_err();
    assert!(error.message().contains("storage"), "{error}");
    // The server stops by itself: its listener goes away.
    let addr = server.addr();
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the server kept accepting connections");
    let stopped = tokio::time::timeout(Duration::from_secs(20), server.shutdown())
        .await
        .expect("the server did not stop");
    assert!(stopped.unwrap_err().to_string().contains("fsync"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dequeue_counts_topics_and_publishes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = durable_server(dir.path()).await;
    let account = Account::connect(&server.addr().to_string(), ID, KEY, ClientConfig::default())
        .await
        .unwrap();
    // A message received twice (handed back in between, no waiting).
    let counted = account.queue("counted");
    counted.create(&QueueAttributeSet::default()).await.unwrap();
    let id = counted.send_message("again", 0).await.unwrap();
    let first = counted.receive_message(Some(0)).await.unwrap();
    assert_eq!((first.msg_id, first.dequeue_count), (id, 1));
    counted
        .change_message_visibility(&first.receipt_handle, 0)
        .await
        .unwrap();
    let second = counted.receive_message(Some(0)).await.unwrap();
    assert_eq!(second.dequeue_count, 2);

    // A topic with two queue subscriptions and an HTTP one nobody answers, published to.
    for q in ["copies1", "copies2"] {
        account
            .queue(q)
            .create(&QueueAttributeSet::default())
            .await
            .unwrap();
    }
    let topic = account.topic("orders");
    let topic_id = topic.create(&TopicAttributeSet::default()).await.unwrap();
    topic
        .set_attributes(&TopicAttributeSet {
            max_msg_size_bytes: Some(4096),
            ..TopicAttributeSet::default()
        })
        .await
        .unwrap();
    let s1 = account.subscription("orders", "s1");
    s1.create(&SubscriptionSpec::queue("copies1"))
        .await
        .unwrap();
    let s2 = account.subscription("orders", "s2");
    s2.create(&SubscriptionSpec::queue("copies2"))
        .await
        .unwrap();
    // Port 9 on loopback refuses: the message waits for this subscription.
    account
        .subscription("orders", "hook")
        .create(&SubscriptionSpec::http("http://127.0.0.1:9/hook"))
        .await
        .unwrap();
    let published = topic
        .batch_publish_message(["p1", "p2"], &["red"], None)
        .await
        .unwrap();
    assert_eq!(published.len(), 2);
    s2.set_attributes(&SubscriptionAttributeSet {
        filter_tags: Some(vec!["blue".into()]),
        ..SubscriptionAttributeSet::default()
    })
    .await
    .unwrap();
    // Created and deleted: stays deleted.
    account
        .create_topic("gone", &TopicAttributeSet::default())
        .await
        .unwrap();
    account.delete_topic("gone").await.unwrap();
    server.shutdown().await.unwrap();

    let server = durable_server(dir.path()).await;
    let account = Account::connect(&server.addr().to_string(), ID, KEY, ClientConfig::default())
        .await
        .unwrap();
    // The count goes on from 2; the first receive time is the first one's.
    let counted = account.queue("counted");
    let third = counted.receive_message(Some(0)).await.unwrap();
    assert_eq!((third.msg_id, third.dequeue_count), (id, 3));
    assert_eq!(third.first_dequeue_time_ms, first.first_dequeue_time_ms);
    assert_eq!(third.enqueue_time_ms, first.enqueue_time_ms);

    let topic = account.topic("orders");
    let attrs = topic.get_attributes().await.unwrap();
    assert_eq!((attrs.topic_id, attrs.max_msg_size_bytes), (topic_id, 4096));
    assert_eq!(attrs.msg_count, 2, "both wait for the HTTP subscription");
    let (_, subs) = topic.list_subscription("", 0, 10).await.unwrap();
    let names: Vec<&str> = subs.iter().map(|s| s.subscription_name.as_str()).collect();
    assert_eq!(names, ["hook", "s1", "s2"]);
    let s2 = account
        .subscription("orders", "s2")
        .get_attributes()
        .await
        .unwrap();
    assert_eq!(s2.filter_tags, vec!["blue".to_string()]);
    let hook = account
        .subscription("orders", "hook")
        .get_attributes()
        .await
        .unwrap();
    assert_eq!(hook.msg_count, 2);
    let (_, topics) = account.list_topic("", 0, 10).await.unwrap();
    assert_eq!(topics.len(), 1, "the deleted topic stays deleted");
    // Each queue subscription has its copies.
    for q in ["copies1", "copies2"] {
        let got = account
            .queue(q)
            .batch_receive_message(16, Some(0))
            .await
            .unwrap();
        let mut bodies: Vec<String> = got
            .iter()
            .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
            .collect();
        bodies.sort();
        assert_eq!(bodies, ["p1", "p2"], "{q}");
    }
    // Routing works as it did: "red" goes to s1 only now (s2 wants "blue").
    topic.publish_message("p3", &["red"], None).await.unwrap();
    let got = account
        .queue("copies1")
        .receive_message(Some(0))
        .await
        .unwrap();
    assert_eq!(&got.body[..], b"p3");
    assert!(account
        .queue("copies2")
        .receive_message(Some(0))
        .await
        .unwrap_err()
        .is_no_message());
    // New ids never collide with recovered ones.
    let new_topic = account
        .create_topic("later", &TopicAttributeSet::default())
        .await
        .unwrap();
    assert!(new_topic > topic_id);
    server.shutdown().await.unwrap();
}

/// GET `path` on the observability endpoint: (status, body).
async fn observe_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_a_full_disk_refuses_changes_reports_not_ready_and_resumes() {
    let disk = SimDisk::new();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let storage = LogStorage::open_dir(
        Arc::new(disk.clone()),
        LogConfig {
            segment_bytes: 64 * 1024,
            ..LogConfig::default()
        },
        clock.clone(),
    )
    .unwrap();
    let log = Arc::new(storage);
    let server = Server::bind_with(options(), log.clone(), clock)
        .await
        .unwrap()
        .spawn()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let observe = listener.local_addr().unwrap();
    let stop_observe = tokio_util::sync::CancellationToken::new();
    tokio::spawn(cmqd::server::observe::serve(
        listener,
        server.shared().clone(),
        100,
        stop_observe.clone(),
    ));
    let account = Account::connect(&server.addr().to_string(), ID, KEY, ClientConfig::default())
        .await
        .unwrap();
    let queue = account.queue("q");
    queue.create(&QueueAttributeSet::default()).await.unwrap();
    let mut acked = Vec::new();
    for i in 0..3 {
        queue.send_message(format!("ok-{i}"), 0).await.unwrap();
        acked.push(format!("ok-{i}"));
    }
    assert_eq!(observe_get(observe, "/readyz").await.0, 200);

    // The disk fills: the send that needs a new segment fails, and is not made.
    disk.set_capacity(Some(disk.used_bytes() + 1024));
    let pad = "x".repeat(2000);
    let mut failed = None;
    for i in 0..200 {
        let body = format!("{i:04}{pad}");
        match queue.send_message(body.clone(), 0).await {
            Ok(_) => acked.push(body),
            Err(error) => {
                failed = Some((body, error));
                break;
            }
        }
    }
    let (failed_body, error) = failed.expect("the disk never filled up");
    assert_eq!(error.code().map(|c| c.code), Some(6000), "{error}");
    // Refused before the engine while the disk is full; reads still work.
    let refused = queue.send_message("refused", 0).await.unwrap_err();
    assert_eq!(refused.code().map(|c| c.code), Some(6000), "{refused}");
    assert!(refused.message().contains("cannot write"), "{refused}");
    let attrs = queue.get_attributes().await.unwrap();
    assert_eq!(attrs.active_msg_num, acked.len() as u64);
    let (status, body) = observe_get(observe, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("storage") && body.contains("disk full"),
        "{body}"
    );

    // Space returns: the writer's next probe succeeds, and the log says so (an event, not a
    // timer); then sends succeed and the broker is ready.
    disk.set_capacity(None);
    let waiting = Arc::clone(&log);
    let resumed =
        tokio::task::spawn_blocking(move || waiting.wait_writable(Duration::from_secs(30)))
            .await
            .unwrap();
    assert!(resumed, "the log did not write again");
    queue.send_message("after", 0).await.unwrap();
    acked.push("after".to_string());
    assert_eq!(observe_get(observe, "/readyz").await.0, 200);
    let (_, metrics) = observe_get(observe, "/metrics").await;
    assert!(metrics.contains("cmq_storage_writable 1"), "{metrics}");
    assert!(metrics.contains("cmq_storage_disk_bytes"), "{metrics}");

    // Neither now nor after a restart is the failed send there.
    let mut seen = Vec::new();
    while let Ok(m) = queue.receive_message(Some(0)).await {
        seen.push(String::from_utf8(m.body.to_vec()).unwrap());
    }
    seen.sort();
    acked.sort();
    assert!(!seen.contains(&failed_body));
    assert_eq!(seen, acked);
    stop_observe.cancel();
    server.shutdown().await.unwrap();
    let (_storage, engine) = open_sim(&disk.reboot(11), manual());
    let mut out = Vec::new();
    let mut count = 0;
    // Past the visibility timeout of the receives above (they were logged).
    let later = SystemClock::new().now_ms() + 60_000;
    while let Ok(ReceiveOutcome::Messages(ms)) = engine.receive("acct", "q", 16, later, &mut out) {
        for m in ms {
            assert_ne!(m.body, Bytes::from(failed_body.clone().into_bytes()));
            count += 1;
        }
    }
    assert_eq!(count, acked.len());
}
