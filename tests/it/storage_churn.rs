//! Disk use stays proportional to live data under steady churn.
//!
//! One million 100-byte messages are sent, received and deleted through one queue, by the
//! engine and the log directly (no TCP, so it takes seconds). The log uses 1 MiB segments and
//! `fsync = "never"`: syncing changes when a commit completes, not which records exist or when
//! a segment may go, which is what this test is about (reclamation syncs before it deletes in
//! every mode). Bound: the log directory never holds more than 6 segments' worth of bytes,
//! 6 MiB, while 210 MB of records pass through it; a long-lived backlog of 2,000 messages
//! sent first is carried along by compaction rather than pinning the old segments.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use cmqd::clock::{Clock, ManualClock};
use cmqd::engine::{Engine, EngineConfig, ReceiveOutcome};
use cmqd::model::QueueAttributeSet;
use cmqd::storage::log::{
    FsyncMode, LogConfig, LogStorage, DIRECT_WRITE_MIN_BYTES, REMOVAL_STEP_BYTES,
};
use cmqd::storage::Storage;

const SEGMENT_BYTES: u64 = 1024 * 1024;
const MESSAGES: usize = 1_000_000;
const BACKLOG: usize = 2_000;
const DIR_BYTES_MAX: u64 = 6 * SEGMENT_BYTES;

fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn a_million_messages_through_one_queue_keep_the_log_small() {
    let data = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let config = LogConfig {
        fsync: FsyncMode::Never,
        segment_bytes: SEGMENT_BYTES,
        maintenance_interval: Duration::ZERO,
        threaded: false,
        body_cache_bytes: u64::MAX,
        direct_write_min_bytes: DIRECT_WRITE_MIN_BYTES,
        removal_step_bytes: REMOVAL_STEP_BYTES,
        spare_segment: true,
        disk_bytes_max: 0,
    };
    let storage = LogStorage::open(data.path(), config.clone(), Arc::new(clock.clone())).unwrap();
    let engine = Engine::new(EngineConfig::default());
    storage.recover(&engine).unwrap();
    let log_dir = data.path().join("log");
    let mut out = Vec::new();
    let now = clock.now_ms();
    engine
        .create_queue(
            "acct",
            "backlog",
            &QueueAttributeSet::default(),
            now,
            &mut out,
        )
        .unwrap();
    engine
        .create_queue(
            "acct",
            "churn",
            &QueueAttributeSet::default(),
            now,
            &mut out,
        )
        .unwrap();
    let _ = storage.append(std::mem::take(&mut out));
    let body = Bytes::from(vec![b'x'; 100]);
    let batch: Vec<Bytes> = vec![body; 16];
    for _ in 0..BACKLOG / 16 {
        engine
            .send("acct", "backlog", &batch, 0, now, &mut out)
            .unwrap();
        let _ = storage.append(std::mem::take(&mut out));
    }
    storage.pump();

    let mut largest = 0;
    let mut sent = 0;
    let mut deleted = 0;
    while sent < MESSAGES {
        let now = clock.now_ms();
        engine
            .send("acct", "churn", &batch, 0, now, &mut out)
            .unwrap();
        sent += batch.len();
        let _ = storage.append(std::mem::take(&mut out));
        let ReceiveOutcome::Messages(received) =
            engine.receive("acct", "churn", 16, now, &mut out).unwrap()
        else {
            panic!("a message was just sent");
        };
        let handles: Vec<String> = received.into_iter().map(|m| m.receipt_handle).collect();
        let failures = engine
            .batch_delete("acct", "churn", &handles, now, &mut out)
            .unwrap();
        assert!(failures.is_empty());
        deleted += handles.len();
        let _ = storage.append(std::mem::take(&mut out));
        // A batch per 16 requests or so, as under load.
        if sent % (16 * 16) == 0 {
            storage.pump();
            clock.advance_ms(1);
        }
        if sent % (64 * 1024) == 0 {
            let bytes = dir_bytes(&log_dir);
            largest = largest.max(bytes);
            assert!(
                bytes <= DIR_BYTES_MAX,
                "after {sent} messages the log holds {bytes} bytes, over {DIR_BYTES_MAX}: {:?}",
                storage.segments()
            );
        }
    }
    storage.pump();
    storage.maintain(10);
    assert_eq!(deleted, MESSAGES);
    let stats = storage.stats();
    assert!(stats.bytes > 200_000_000, "{stats:?}");
    assert!(stats.segments_deleted > 150, "{stats:?}");
    let bytes = dir_bytes(&log_dir);
    assert!(bytes <= DIR_BYTES_MAX, "{bytes}");
    eprintln!(
        "churn: {} MB written, largest log {} KiB, now {} KiB, {} segments deleted, {} messages copied forward",
        stats.bytes / 1_000_000,
        largest / 1024,
        bytes / 1024,
        stats.segments_deleted,
        stats.compacted
    );

    // The backlog survived the churn, copied forward.
    drop(engine);
    drop(storage);
    let storage = LogStorage::open(data.path(), config, Arc::new(clock.clone())).unwrap();
    assert_eq!(storage.recovery().messages, BACKLOG);
    let engine = Engine::new(EngineConfig::default());
    storage.recover(&engine).unwrap();
    let attrs = engine
        .queue_attributes("acct", "backlog", clock.now_ms(), &mut out)
        .unwrap();
    assert_eq!(attrs.active_msg_num, BACKLOG as u64);
    let attrs = engine
        .queue_attributes("acct", "churn", clock.now_ms(), &mut out)
        .unwrap();
    assert_eq!(attrs.active_msg_num, 0);
}

/// Recovery speed (target: under 2 s per GiB of log). A measurement, not a test: run it in
/// release, `cargo test --release --test it recovery_speed -- --ignored --nocapture`.
/// `CMQD_RECOVERY_MB` (default 1024) sets the log size and `CMQD_RECOVERY_BODY_BYTES` (default
/// 100) the size of its message bodies; `CMQD_RECOVERY_DIR` keeps the log in that directory
/// and reuses it, to measure or profile recovery alone (delete it to change the other two).
#[test]
#[ignore = "a measurement: run it in release (see its doc)"]
fn recovery_speed() {
    let megabytes: u64 = std::env::var("CMQD_RECOVERY_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let temp = tempfile::tempdir().unwrap();
    let path = std::env::var("CMQD_RECOVERY_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| temp.path().to_path_buf());
    let clock = ManualClock::new(1_700_000_000_000);
    let config = LogConfig {
        fsync: FsyncMode::Never,
        segment_bytes: 64 * 1024 * 1024,
        maintenance_interval: Duration::from_secs(3600),
        threaded: false,
        body_cache_bytes: u64::MAX,
        direct_write_min_bytes: DIRECT_WRITE_MIN_BYTES,
        removal_step_bytes: REMOVAL_STEP_BYTES,
        spare_segment: true,
        disk_bytes_max: 0,
    };
    let engine_config = EngineConfig {
        body_memory_bytes_max: u64::MAX,
        ..EngineConfig::default()
    };
    let body_bytes: usize = std::env::var("CMQD_RECOVERY_BODY_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    if !path.join("log").exists() {
        write_log(
            &path,
            &config,
            &clock,
            &engine_config,
            megabytes,
            body_bytes,
        );
    }
    let started = cmqd::clock::monotonic_now();
    let storage = LogStorage::open(&path, config, Arc::new(clock.clone())).unwrap();
    let engine = Engine::new(engine_config);
    storage.recover(&engine).unwrap();
    let elapsed = started.elapsed();
    let report = storage.recovery();
    let gib = report.bytes as f64 / (1024.0 * 1024.0 * 1024.0);
    eprintln!(
        "recovery: {:.2} GiB, {} records, {} messages in {:.2} s = {:.2} s/GiB \
         (reading and replaying {:.2} s)",
        gib,
        report.records,
        report.messages,
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() / gib,
        report.elapsed.as_secs_f64()
    );
}

/// Writes about `megabytes` of log for [`recovery_speed`]: sends of `body_bytes` bodies, a
/// quarter of them deleted, the log a busy queue with a backlog leaves.
fn write_log(
    path: &Path,
    config: &LogConfig,
    clock: &ManualClock,
    engine_config: &EngineConfig,
    megabytes: u64,
    body_bytes: usize,
) {
    let storage = LogStorage::open(path, config.clone(), Arc::new(clock.clone())).unwrap();
    let engine = Engine::new(engine_config.clone());
    storage.recover(&engine).unwrap();
    let mut out = Vec::new();
    let now = clock.now_ms();
    let attrs = QueueAttributeSet {
        max_msg_heap_num: Some(1_000_000_000),
        max_msg_size_bytes: Some(body_bytes.max(1024) as u32),
        ..QueueAttributeSet::default()
    };
    engine
        .create_queue("acct", "q", &attrs, now, &mut out)
        .unwrap();
    let _ = storage.append(std::mem::take(&mut out));
    let batch: Vec<Bytes> = vec![Bytes::from(vec![b'x'; body_bytes]); 16];
    while storage.stats().bytes < megabytes * 1024 * 1024 {
        engine.send("acct", "q", &batch, 0, now, &mut out).unwrap();
        if let ReceiveOutcome::Messages(ms) = engine.receive("acct", "q", 4, now, &mut out).unwrap()
        {
            let handles: Vec<String> = ms.into_iter().map(|m| m.receipt_handle).collect();
            engine
                .batch_delete("acct", "q", &handles, now, &mut out)
                .unwrap();
        }
        let _ = storage.append(std::mem::take(&mut out));
        storage.pump();
    }
}
