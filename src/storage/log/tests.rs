//! The writer's internals: segment names, the check before a write, which segments reclamation
//! may delete (tombstones keep a segment while what they cancel is on disk), compaction, and
//! the fsync modes.

use super::*;

use crate::clock::ManualClock;
use crate::engine::EngineConfig;
use crate::model::QueueAttributeSet;
use crate::storage::sim::SimDisk;

/// A delivery that succeeded, for `Engine::push_result`.
const DELIVERED: Result<(), &str> = Ok(());

/// The time of every call: the engine's and the log's clocks agree, as in a broker.
const NOW: Millis = 1_700_000_000_000;

fn open(disk: &SimDisk, fsync: FsyncMode, threaded: bool) -> (LogStorage, Engine) {
    open_budget(disk, fsync, threaded, 0)
}

/// [`open`] with `storage.disk_bytes_max`.
fn open_budget(
    disk: &SimDisk,
    fsync: FsyncMode,
    threaded: bool,
    disk_bytes_max: u64,
) -> (LogStorage, Engine) {
    let config = LogConfig {
        fsync,
        segment_bytes: SEGMENT_BYTES_MIN,
        maintenance_interval: Duration::ZERO,
        threaded,
        body_cache_bytes: u64::MAX,
        direct_write_min_bytes: DIRECT_WRITE_MIN_BYTES,
        removal_step_bytes: REMOVAL_STEP_BYTES,
        spare_segment: true,
        disk_bytes_max,
    };
    let clock = Arc::new(ManualClock::new(NOW));
    let storage = LogStorage::open_dir(Arc::new(disk.clone()), config, clock).unwrap();
    let engine = Engine::new(EngineConfig::default());
    storage.recover(&engine).unwrap();
    (storage, engine)
}

/// Runs `f` on the manual writer.
fn with_writer<T>(storage: &LogStorage, f: impl FnOnce(&mut Writer) -> T) -> T {
    let mut slot = storage.writer.lock();
    match &mut *slot {
        WriterSlot::Manual(writer) => f(writer),
        _ => panic!("not a manual writer"),
    }
}

fn send(storage: &LogStorage, engine: &Engine, queue: &str, size: usize) -> u64 {
    let mut out = Vec::new();
    let ids = engine
        .send(
            "a",
            queue,
            &[Bytes::from(vec![b'x'; size])],
            0,
            NOW,
            &mut out,
        )
        .unwrap();
    let _ = storage.append(out);
    storage.pump();
    ids[0]
}

fn receive_and_delete(storage: &LogStorage, engine: &Engine, queue: &str, count: usize) {
    let mut out = Vec::new();
    for _ in 0..count {
        let crate::engine::ReceiveOutcome::Messages(ms) =
            engine.receive("a", queue, 1, NOW, &mut out).unwrap()
        else {
            panic!("nothing to receive in {queue}");
        };
        engine
            .delete_message("a", queue, &ms[0].receipt_handle, NOW, &mut out)
            .unwrap();
    }
    let _ = storage.append(out);
    storage.pump();
}

fn create(storage: &LogStorage, engine: &Engine, queue: &str) {
    let mut out = Vec::new();
    engine
        .create_queue("a", queue, &QueueAttributeSet::default(), NOW, &mut out)
        .unwrap();
    let _ = storage.append(out);
    storage.pump();
}

#[test]
fn segment_names_sort_in_log_order() {
    assert_eq!(segment_name(7), "00000000000000000007.seg");
    assert_eq!(parse_segment_name(&segment_name(7)), Some(7));
    assert_eq!(parse_segment_name(&segment_name(u32::MAX)), Some(u32::MAX));
    for bad in [
        "7.seg",
        "0000000000000000000x.seg",
        "00000000000000000007.log",
        "LOCK",
    ] {
        assert_eq!(parse_segment_name(bad), None, "{bad}");
    }
    assert!(segment_name(9) < segment_name(10));
}

#[test]
fn a_malformed_batch_is_never_written() {
    let mut buf = Vec::new();
    encode_batch(1, &mut buf);
    check_framing(&buf).unwrap();
    buf.extend_from_slice(&[1, 0, 0]);
    assert!(check_framing(&buf).is_err());
    let mut zero = Vec::new();
    encode_batch(1, &mut zero);
    zero.extend_from_slice(&[0; 8]);
    assert!(check_framing(&zero).is_err());
}

#[test]
fn a_segment_whose_tombstones_cancel_live_records_is_kept() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, false);
    create(&storage, &engine, "old");
    create(&storage, &engine, "new");
    // "old" fills the first segment with messages that stay.
    let first = with_writer(&storage, |w| w.head);
    let mut old_sent = 0;
    while with_writer(&storage, |w| w.head) == first {
        send(&storage, &engine, "old", 2000);
        old_sent += 1;
    }
    // Then "new" churns in later segments, and one "old" message is deleted there.
    let second = with_writer(&storage, |w| w.head);
    while with_writer(&storage, |w| w.head) == second {
        send(&storage, &engine, "new", 2000);
        receive_and_delete(&storage, &engine, "new", 1);
    }
    receive_and_delete(&storage, &engine, "old", 1);
    let tombstones = with_writer(&storage, |w| w.head);
    for _ in 0..80 {
        send(&storage, &engine, "new", 2000);
        receive_and_delete(&storage, &engine, "new", 1);
    }
    storage.maintain(5);
    with_writer(&storage, |w| {
        let segment = &w.segments[&tombstones];
        assert_eq!(segment.live_msgs, 0, "everything sent there was deleted");
        assert!(segment.blocked_by.contains(&first));
        assert!(
            w.segments.contains_key(&tombstones),
            "a needed tombstone went"
        );
        // Churn segments that cancel nothing older are gone.
        assert!(w.segments.len() < 10, "{:?}", w.segments.keys());
    });
    // Once the old messages go (the last one sent may sit in the next segment), so does
    // everything.
    receive_and_delete(&storage, &engine, "old", old_sent - 1);
    storage.maintain(5);
    with_writer(&storage, |w| {
        assert!(!w.segments.contains_key(&first));
        assert!(!w.segments.contains_key(&tombstones));
    });
    // The removals were made durable pass by pass: whatever unsynced change a power loss
    // undoes, the old segment does not come back without the one holding its tombstones
    // (which would revive its deleted messages).
    for seed in 0..32 {
        let rebooted = disk.reboot(seed);
        assert!(
            rebooted.read_file(&segment_name(first)).is_none()
                || rebooted.read_file(&segment_name(tombstones)).is_some(),
            "reboot {seed}"
        );
    }
}

#[test]
fn compaction_copies_the_few_live_messages_of_a_dead_log_forward() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, false);
    create(&storage, &engine, "keep");
    create(&storage, &engine, "churn");
    // Each segment gets one message that stays, and a lot that goes.
    let mut kept = Vec::new();
    for _ in 0..12 {
        kept.push(send(&storage, &engine, "keep", 100));
        for _ in 0..30 {
            send(&storage, &engine, "churn", 2000);
        }
        receive_and_delete(&storage, &engine, "churn", 30);
    }
    storage.maintain(50);
    let stats = storage.stats();
    assert!(stats.compacted > 0, "{stats:?}");
    let (segments, live): (usize, u64) = with_writer(&storage, |w| {
        (
            w.segments.len(),
            w.segments.values().map(|s| s.live_msgs).sum(),
        )
    });
    assert_eq!(live, 12);
    assert!(segments <= 5, "{segments} segments left");
    drop(engine);
    drop(storage);
    // The copies are what a restart finds.
    let (storage, engine) = open(&disk.reboot(1), FsyncMode::Always, false);
    assert_eq!(storage.recovery().messages, 12);
    let mut out = Vec::new();
    let attrs = engine.queue_attributes("a", "keep", NOW, &mut out).unwrap();
    assert_eq!(attrs.active_msg_num, 12);
}

#[test]
fn with_interval_commits_complete_before_the_sync() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Interval(Duration::from_secs(3600)), false);
    create(&storage, &engine, "q");
    let syncs = disk.syncs();
    let mut out = Vec::new();
    engine
        .send("a", "q", &[Bytes::from_static(b"x")], 0, NOW, &mut out)
        .unwrap();
    let Commit::Pending(mut rx) = storage.append(out) else {
        panic!("the log always answers later");
    };
    storage.pump();
    assert!(matches!(rx.try_recv(), Ok(Ok(()))));
    assert_eq!(disk.syncs(), syncs, "synced before the interval");
    // Closing syncs what was written.
    storage.close();
    assert!(disk.syncs() > syncs);
}

#[test]
fn the_threaded_writer_groups_commits() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, true);
    let mut out = Vec::new();
    engine
        .create_queue("a", "q", &QueueAttributeSet::default(), NOW, &mut out)
        .unwrap();
    let _ = storage.append(std::mem::take(&mut out));
    let mut pending = Vec::new();
    for _ in 0..200 {
        let order = storage.order();
        engine
            .send("a", "q", &[Bytes::from_static(b"x")], 0, NOW, &mut out)
            .unwrap();
        let commit = storage.append(std::mem::take(&mut out));
        drop(order);
        if let Commit::Pending(rx) = commit {
            pending.push(rx);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        for rx in pending {
            rx.await.unwrap().unwrap();
        }
    });
    let stats = storage.stats();
    assert_eq!(stats.records, 201);
    assert!(stats.syncs <= stats.batches);
    storage.close();
    // Closed: appends fail.
    engine
        .send("a", "q", &[Bytes::from_static(b"x")], 0, NOW, &mut out)
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let Commit::Pending(rx) = storage.append(out) else {
        panic!("the log always answers later");
    };
    assert!(runtime.block_on(rx).unwrap().is_err());
}

#[test]
fn recovery_discards_a_newest_segment_whose_creation_was_cut_short() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, false);
    create(&storage, &engine, "q");
    send(&storage, &engine, "q", 10);
    drop(engine);
    drop(storage);
    // A rotation named segment `next` in the manifest, created its file with half a header,
    // then the power went.
    let mut manifest = Manifest::read(&disk).unwrap().unwrap();
    let next = manifest.live.last().unwrap() + 1;
    manifest.retired.push(next);
    disk.write_file(MANIFEST_FILE, manifest.encode());
    disk.write_file(
        &segment_name(next),
        segment_header(u64::from(next))[..10].to_vec(),
    );
    let (storage, _engine) = open(&disk, FsyncMode::Always, false);
    assert_eq!(storage.recovery().messages, 1);
    assert!(storage.recovery().strays.is_empty());
    // Removed (the log's own), and the new head went above it.
    assert!(disk.read_file(&segment_name(next)).is_none());
    let head = disk.read_file(&segment_name(next + 1)).unwrap();
    assert_eq!(check_segment_header(&head), Ok(u64::from(next + 1)));
}

/// The spare files on `disk`, and the segments.
fn spares_and_segments(disk: &SimDisk) -> (Vec<String>, Vec<String>) {
    let names = disk.list().unwrap();
    let spares = names.iter().filter(|n| spare::is_spare_name(n)).cloned();
    let segments = names.iter().filter(|n| parse_segment_name(n).is_some());
    (spares.collect(), segments.cloned().collect())
}

#[test]
fn new_segments_are_spares_made_ahead_and_recovery_removes_a_leftover_one() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, false);
    create(&storage, &engine, "q");
    // One spare is ready before the first rotation, written with zeros and synced.
    let (spares, segments) = spares_and_segments(&disk);
    assert_eq!(spares, vec!["spare-1.tmp".to_string()]);
    assert_eq!(segments.len(), 1);
    let spare = disk.read_file("spare-1.tmp").unwrap();
    assert_eq!(spare.len() as u64, SEGMENT_BYTES_MIN);
    assert!(spare.iter().all(|&b| b == 0));
    // Fill three segments: each rotation renames the spare into place and asks for the next.
    let mut ids = Vec::new();
    while spares_and_segments(&disk).1.len() < 4 {
        ids.push(send(&storage, &engine, "q", 4000));
    }
    let (spares, segments) = spares_and_segments(&disk);
    assert_eq!(spares, vec!["spare-4.tmp".to_string()]);
    assert_eq!(segments.len(), 4);
    assert_eq!(storage.stats().segments_created, 3);
    // The disk bytes count the spare.
    storage.maintain(1);
    let usage = storage.space().unwrap();
    assert!(usage.log_bytes >= 5 * SEGMENT_BYTES_MIN - 4096, "{usage:?}");
    drop(engine);
    drop(storage);
    // The broker stopped without removing it (a crash): the next start does, and reads
    // every message from the segments that were spares.
    let (storage, _engine) = open(&disk, FsyncMode::Always, false);
    assert_eq!(storage.recovery().messages, ids.len());
    assert!(storage.recovery().strays.is_empty());
    // Its own new spare, numbered afresh.
    assert_eq!(
        spares_and_segments(&disk).0,
        vec!["spare-1.tmp".to_string()]
    );
}

#[test]
fn no_spare_is_kept_where_the_disk_budget_has_no_room_for_it() {
    // Two segments: the head and the next, no room for a spare besides.
    let disk = SimDisk::new();
    let (storage, engine) = open_budget(&disk, FsyncMode::Always, false, 2 * SEGMENT_BYTES_MIN);
    create(&storage, &engine, "q");
    assert!(spares_and_segments(&disk).0.is_empty());
    while spares_and_segments(&disk).1.len() < 2 {
        send(&storage, &engine, "q", 4000);
    }
    assert!(spares_and_segments(&disk).0.is_empty());
    drop((storage, engine));
    // Room for three: a spare is kept.
    let (_storage, _engine) = open_budget(&disk, FsyncMode::Always, false, 6 * SEGMENT_BYTES_MIN);
    assert_eq!(spares_and_segments(&disk).0.len(), 1);
}

#[test]
fn a_file_the_manifest_does_not_name_is_left_in_place_and_not_read() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, false);
    create(&storage, &engine, "q");
    send(&storage, &engine, "q", 10);
    drop(engine);
    drop(storage);
    let stray = segment_header(99)[..10].to_vec();
    disk.write_file(&segment_name(99), stray.clone());
    let (storage, _engine) = open(&disk, FsyncMode::Always, false);
    assert_eq!(storage.recovery().messages, 1);
    assert_eq!(
        storage.recovery().strays,
        vec![disk.describe(&segment_name(99))]
    );
    assert_eq!(disk.read_file(&segment_name(99)), Some(stray));
    // The new head went above it.
    assert!(disk.read_file(&segment_name(100)).is_some());
}

#[test]
fn a_log_without_a_manifest_still_opens_and_gets_one() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, false);
    create(&storage, &engine, "q");
    send(&storage, &engine, "q", 10);
    drop(engine);
    drop(storage);
    // As an earlier version left it: no manifest, and (its rules) a newest segment cut short
    // in its creation, which is discarded.
    disk.remove(MANIFEST_FILE).unwrap();
    disk.write_file(&segment_name(99), segment_header(99)[..10].to_vec());
    let (storage, _engine) = open(&disk, FsyncMode::Always, false);
    assert!(storage.recovery().manifest_created);
    assert_eq!(storage.recovery().messages, 1);
    assert!(disk.read_file(&segment_name(99)).is_none());
    drop(storage);
    let (storage, _engine) = open(&disk, FsyncMode::Always, false);
    assert!(!storage.recovery().manifest_created);
    assert_eq!(storage.recovery().messages, 1);
}

#[test]
fn topics_outlive_their_segment_and_waiting_publishes_are_compacted_forward() {
    use crate::model::{SubscriptionSpec, TopicAttributeSet};
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, false);
    create(&storage, &engine, "churn");
    let mut out = Vec::new();
    engine
        .create_topic("a", "t", &TopicAttributeSet::default(), NOW, &mut out)
        .unwrap();
    let hook = SubscriptionSpec {
        protocol: "http".into(),
        endpoint: "http://127.0.0.1:9/hook".into(),
        ..SubscriptionSpec::default()
    };
    engine
        .subscribe("a", "t", "hook", &hook, NOW, &mut out)
        .unwrap();
    let _ = storage.append(std::mem::take(&mut out));
    storage.pump();
    let first = with_writer(&storage, |w| w.head);
    // Each segment gets one published message that waits for the HTTP subscription, and a
    // lot of churn that goes.
    let mut published = Vec::new();
    for i in 0..12u8 {
        let body = Bytes::from(vec![b'a' + i; 100]);
        let p = engine
            .publish("a", "t", &[body], &[], None, NOW, &mut out)
            .unwrap();
        published.extend(p.msg_ids);
        let _ = storage.append(std::mem::take(&mut out));
        storage.pump();
        for _ in 0..30 {
            send(&storage, &engine, "churn", 2000);
        }
        receive_and_delete(&storage, &engine, "churn", 30);
    }
    // One is delivered: it waits no more.
    let taken = engine.take_due_pushes(NOW, 100, &mut out);
    assert_eq!(taken.len(), 12);
    let done = &taken[0];
    engine.push_result(
        done.subscription_id,
        done.msg_id,
        done.attempt,
        DELIVERED,
        NOW,
        &mut out,
    );
    let _ = storage.append(std::mem::take(&mut out));
    storage.pump();
    storage.maintain(50);
    let stats = storage.stats();
    assert!(stats.compacted > 0, "{stats:?}");
    let (segments, live) = with_writer(&storage, |w| {
        (
            w.segments.keys().copied().collect::<Vec<_>>(),
            w.segments.values().map(|s| s.live_msgs).sum::<u64>(),
        )
    });
    assert_eq!(live, 11, "the waiting publishes, nothing else");
    assert!(
        !segments.contains(&first),
        "the segment that created the topic is gone: {segments:?}"
    );
    assert!(segments.len() <= 5, "{segments:?}");
    drop(engine);
    drop(storage);

    // The checkpoints kept the topic, the copies the waiting messages.
    let (storage, engine) = open(&disk.reboot(1), FsyncMode::Always, false);
    let report = storage.recovery();
    assert_eq!(
        (report.topics, report.subscriptions, report.retained),
        (1, 1, 11)
    );
    let again = engine.take_due_pushes(NOW, 100, &mut out);
    let mut ids: Vec<u64> = again.iter().map(|d| d.msg_id).collect();
    ids.sort_unstable();
    let mut expected: Vec<u64> = published
        .iter()
        .copied()
        .filter(|id| *id != done.msg_id)
        .collect();
    expected.sort_unstable();
    assert_eq!(ids, expected);
    for d in &again {
        let i = published.iter().position(|id| *id == d.msg_id).unwrap() as u8;
        assert_eq!(d.body, Bytes::from(vec![b'a' + i; 100]));
        assert_eq!(d.attempt, 1, "attempts start over");
    }
}

/// Recovery reads segments in chunks of [`READ_CHUNK_BYTES`] and a second time for the bodies
/// it keeps: records straddling a chunk boundary, records larger than a chunk and bodies too
/// large to share an arena chunk all come back as sent, and a newest segment cut anywhere
/// (inside a record or on a boundary, near a chunk boundary or not) loses exactly the records
/// that are not whole.
#[test]
fn recovery_reads_records_of_every_size_across_its_read_chunks() {
    let config = LogConfig {
        fsync: FsyncMode::Always,
        segment_bytes: 4 * 1024 * 1024,
        maintenance_interval: Duration::ZERO,
        threaded: false,
        body_cache_bytes: u64::MAX,
        direct_write_min_bytes: DIRECT_WRITE_MIN_BYTES,
        removal_step_bytes: REMOVAL_STEP_BYTES,
        spare_segment: true,
        disk_bytes_max: 0,
    };
    let reopen = |disk: &SimDisk| {
        let clock = Arc::new(ManualClock::new(NOW));
        let storage = LogStorage::open_dir(Arc::new(disk.clone()), config.clone(), clock).unwrap();
        let engine = Engine::new(EngineConfig::default());
        storage.recover(&engine).unwrap();
        (storage, engine)
    };
    let disk = SimDisk::new();
    let (storage, engine) = reopen(&disk);
    let mut out = Vec::new();
    let attrs = QueueAttributeSet {
        max_msg_size_bytes: Some(crate::limits::MSG_BYTES_MAX_LIMIT),
        ..QueueAttributeSet::default()
    };
    engine
        .create_queue("a", "q", &attrs, NOW, &mut out)
        .unwrap();
    let _ = storage.append(std::mem::take(&mut out));
    storage.pump();
    let sizes = [
        100, 3_000, 70_000, 1, 300_000, 100, 100, 200_000, 5_000, 100,
    ];
    let mut sent = BTreeMap::new();
    for i in 0..30usize {
        let size = sizes[i % sizes.len()] + i;
        let body = Bytes::from(vec![(i % 251) as u8; size]);
        let ids = engine
            .send("a", "q", std::slice::from_ref(&body), 0, NOW, &mut out)
            .unwrap();
        let _ = storage.append(std::mem::take(&mut out));
        storage.pump();
        sent.insert(ids[0], body);
    }
    assert_eq!(
        storage.segments().len(),
        1,
        "one segment holds every record"
    );
    drop(engine);
    drop(storage);

    // Every body of a recovered queue, by id: (length, first byte, all bytes alike).
    let bodies_of = |engine: &Engine| {
        let mut out = Vec::new();
        let mut got = BTreeMap::new();
        while let crate::engine::ReceiveOutcome::Messages(ms) =
            engine.receive("a", "q", 16, NOW, &mut out).unwrap()
        {
            for m in ms {
                got.insert(m.msg_id, summary(&m.body));
            }
        }
        got
    };
    let sent: BTreeMap<u64, (usize, u8, bool)> =
        sent.iter().map(|(&id, body)| (id, summary(body))).collect();
    let (storage, engine) = reopen(&disk);
    assert_eq!(storage.recovery().messages, sent.len());
    assert_eq!(bodies_of(&engine), sent);
    drop(engine);
    drop(storage);

    // The segment as written, and where each of its records is.
    let name = segment_name(0);
    let bytes = disk.read_file(&name).unwrap();
    let mut at = SEGMENT_HEADER_BYTES;
    let mut records = Vec::new();
    while let Ok(Some(frame)) = read_frame(&bytes[at..]) {
        records.push((at, frame.size, frame.record_type));
        at += frame.size;
    }
    assert_eq!(at, bytes.len(), "a sealed segment is all records");
    assert!(records.iter().any(|&(_, size, _)| size > READ_CHUNK_BYTES));
    let mut cuts: Vec<usize> = records.iter().map(|&(at, _, _)| at).collect();
    for k in 1..=bytes.len() / READ_CHUNK_BYTES {
        let boundary = k * READ_CHUNK_BYTES;
        cuts.extend([boundary - 1, boundary, boundary + 1, boundary + 9]);
    }
    cuts.extend(records.iter().map(|&(at, size, _)| at + size / 2));
    cuts.push(bytes.len() - 1);
    // The checkpoint, a batch marker, the queue's creation, then the sends.
    let (created_at, created_size, kind) = records[2];
    assert_eq!(kind, record::RecordType::QueueCreated as u8);
    for cut in cuts {
        if cut < created_at + created_size || cut > bytes.len() {
            // Before the queue exists: nothing to look at.
            continue;
        }
        // Alone on a disk, the segment is the newest: a cut is a torn tail.
        let torn = SimDisk::new();
        torn.write_file(&name, bytes[..cut].to_vec());
        let (storage, engine) = reopen(&torn);
        let whole: Vec<u64> = records
            .iter()
            .filter(|&&(at, size, kind)| {
                kind == record::RecordType::MessageSent as u8 && at + size <= cut
            })
            .map(|&(at, _, _)| at as u64)
            .collect();
        assert_eq!(storage.recovery().messages, whole.len(), "cut at {cut}");
        // Cut on a boundary, or inside a length field so far all zeros: the records simply end
        // there. Anywhere else the tail is torn.
        let start = records
            .iter()
            .map(|&(at, _, _)| at)
            .filter(|&at| at <= cut)
            .max();
        let clean = start.is_some_and(|start| bytes[start..cut].iter().all(|&b| b == 0));
        assert_eq!(
            storage.recovery().truncated.is_some(),
            !clean,
            "cut at {cut}: {:?}",
            storage.recovery().truncated
        );
        let got = bodies_of(&engine);
        assert_eq!(got.len(), whole.len());
        for (id, body) in got {
            assert_eq!(sent.get(&id), Some(&body), "cut at {cut}");
        }
    }
}

/// A body's length, first byte, and whether all its bytes are that one.
fn summary(body: &[u8]) -> (usize, u8, bool) {
    let first = body.first().copied().unwrap_or(0);
    (body.len(), first, body.iter().all(|&b| b == first))
}

/// A receive's records through `append_behind`: (mutations of one receive of `queue`).
fn receive_records(engine: &Engine, queue: &str) -> Vec<Mutation> {
    let mut out = Vec::new();
    let crate::engine::ReceiveOutcome::Messages(_) =
        engine.receive("a", queue, 1, NOW, &mut out).unwrap()
    else {
        panic!("nothing to receive in {queue}");
    };
    assert!(out.iter().all(|m| !m.waits_for_commit()));
    out
}

#[test]
fn a_receive_waits_for_the_sends_before_it_and_rides_in_their_batch() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, false);
    create(&storage, &engine, "q");
    send(&storage, &engine, "q", 10);

    // The send is durable: the receive's reply waits for nothing (its record goes with the
    // next batch; the threaded writer is not even woken for it).
    let commit = storage.append_behind(receive_records(&engine, "q"));
    assert!(matches!(commit, Commit::Done));
    storage.pump();
    let syncs = disk.syncs();

    // A send appended and not yet written: a receive of it waits for that batch, and its own
    // record rides in it (one sync for both).
    let mut out = Vec::new();
    engine
        .send("a", "q", &[Bytes::from_static(b"y")], 0, NOW, &mut out)
        .unwrap();
    let Commit::Pending(mut sent) = storage.append(out) else {
        panic!("the log always answers a send later");
    };
    let Commit::Pending(mut received) = storage.append_behind(receive_records(&engine, "q")) else {
        panic!("a receive of an unwritten send did not wait");
    };
    assert!(received.try_recv().is_err(), "answered before the write");
    storage.pump();
    assert!(matches!(sent.try_recv(), Ok(Ok(()))));
    assert!(matches!(received.try_recv(), Ok(Ok(()))));
    assert_eq!(
        disk.syncs(),
        syncs + 1,
        "the send and the receive took more than one sync"
    );
}

#[test]
fn a_receive_of_a_send_whose_write_fails_fails_too() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, false);
    let engine = Arc::new(engine);
    storage.attach(&engine);
    create(&storage, &engine, "q");
    let mut out = Vec::new();
    engine
        .send("a", "q", &[Bytes::from_static(b"z")], 0, NOW, &mut out)
        .unwrap();
    let Commit::Pending(mut sent) = storage.append(out) else {
        panic!("the log always answers a send later");
    };
    let Commit::Pending(mut received) = storage.append_behind(receive_records(&engine, "q")) else {
        panic!("a receive of an unwritten send did not wait");
    };
    disk.fail_next_writes(1, std::io::ErrorKind::StorageFull);
    storage.pump();
    assert!(matches!(sent.try_recv(), Ok(Err(_))));
    assert!(
        matches!(received.try_recv(), Ok(Err(_))),
        "a receive handed out a message whose send was not stored"
    );
    // The send was undone: the queue is empty again.
    let attrs = engine
        .queue_attributes("a", "q", NOW, &mut Vec::new())
        .unwrap();
    assert_eq!(attrs.active_msg_num + attrs.inactive_msg_num, 0);
}

/// Sends `count` messages of distinct bodies to `queue`, one commit each; returns id -> body.
fn send_distinct(
    storage: &LogStorage,
    engine: &Engine,
    queue: &str,
    count: usize,
    size: usize,
) -> std::collections::BTreeMap<u64, Bytes> {
    let mut sent = std::collections::BTreeMap::new();
    for i in 0..count {
        let mut body = format!("{queue}-{i}-").into_bytes();
        body.resize(size.max(body.len()), b'a' + (i % 26) as u8);
        let body = Bytes::from(body);
        let mut out = Vec::new();
        let ids = engine
            .send("a", queue, std::slice::from_ref(&body), 0, NOW, &mut out)
            .unwrap();
        let _ = storage.append(out);
        storage.pump();
        sent.insert(ids[0], body);
    }
    sent
}

/// Receives everything receivable in `queue` (handles discarded): id -> body.
fn receive_all(engine: &Engine, queue: &str) -> std::collections::BTreeMap<u64, Bytes> {
    let mut got = std::collections::BTreeMap::new();
    let mut out = Vec::new();
    while let crate::engine::ReceiveOutcome::Messages(ms) =
        engine.receive("a", queue, 16, NOW, &mut out).unwrap()
    {
        for m in ms {
            assert!(got.insert(m.msg_id, m.body).is_none(), "received twice");
        }
    }
    got
}

#[test]
fn bodies_dropped_from_memory_are_read_back_from_the_log_through_compaction() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, false);
    create(&storage, &engine, "keep");
    create(&storage, &engine, "churn");
    let mut kept = std::collections::BTreeMap::new();
    for _ in 0..12 {
        kept.extend(send_distinct(&storage, &engine, "keep", 1, 300));
        for _ in 0..30 {
            send(&storage, &engine, "churn", 2000);
        }
        receive_and_delete(&storage, &engine, "churn", 30);
    }
    // A send whose record is not written yet keeps its body.
    let mut out = Vec::new();
    let unwritten = engine
        .send(
            "a",
            "keep",
            &[Bytes::from_static(b"not yet")],
            0,
            NOW,
            &mut out,
        )
        .unwrap()[0];
    let report = engine.evict_bodies(0);
    assert_eq!(report.messages, 12, "{report:?}");
    assert_eq!(
        engine.stored_body_bytes(),
        7 + crate::engine::HELD_BODY_OVERHEAD_BYTES
    );
    let _ = storage.append(out);
    storage.pump();
    assert_eq!(engine.evict_bodies(0).messages, 1);
    assert_eq!(engine.stored_body_bytes(), 0);
    kept.insert(unwritten, Bytes::from_static(b"not yet"));
    // Compaction copies the kept messages forward and deletes their old segments: the bodies
    // are read from where they are now.
    storage.maintain(50);
    assert!(storage.stats().compacted > 0, "{:?}", storage.stats());
    let before = engine.body_stats();
    assert_eq!(receive_all(&engine, "keep"), kept);
    let stats = engine.body_stats();
    assert_eq!(
        (
            stats.hits - before.hits,
            stats.misses - before.misses,
            stats.read_errors
        ),
        (0, 13, 0)
    );
    assert!(storage.read_ahead_bytes() > 0);
}

#[test]
fn recovery_loads_bodies_up_to_the_cache_and_leaves_the_rest_in_the_log() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, false);
    create(&storage, &engine, "q");
    let sent = send_distinct(&storage, &engine, "q", 200, 1000);
    drop(engine);
    drop(storage);
    let config = LogConfig {
        fsync: FsyncMode::Always,
        segment_bytes: SEGMENT_BYTES_MIN,
        maintenance_interval: Duration::ZERO,
        threaded: false,
        body_cache_bytes: 50_000,
        direct_write_min_bytes: DIRECT_WRITE_MIN_BYTES,
        removal_step_bytes: REMOVAL_STEP_BYTES,
        spare_segment: true,
        disk_bytes_max: 0,
    };
    let clock = Arc::new(ManualClock::new(NOW));
    let storage = LogStorage::open_dir(Arc::new(disk.reboot(3)), config, clock).unwrap();
    let engine = Engine::new(EngineConfig::default());
    storage.recover(&engine).unwrap();
    let held = engine.stored_body_bytes();
    assert!(held > 0 && held <= 50_000, "{held} body bytes held");
    assert_eq!(receive_all(&engine, "q"), sent);
    assert!(
        engine.body_stats().misses > 100,
        "{:?}",
        engine.body_stats()
    );
}

#[test]
fn a_damaged_body_on_disk_is_reported_with_file_and_offset_never_served() {
    let disk = SimDisk::new();
    let (storage, engine) = open(&disk, FsyncMode::Always, false);
    create(&storage, &engine, "q");
    let sent = send_distinct(&storage, &engine, "q", 5, 400);
    engine.evict_bodies(0);
    // Flip one byte inside the third body.
    let victim = sent.keys().nth(2).copied().unwrap();
    let loc = storage
        .bodies
        .model
        .lock()
        .find_message(victim)
        .map(|s| s.origin)
        .unwrap();
    let name = segment_name(loc.seg);
    let mut bytes = disk.read_file(&name).unwrap();
    let at = loc.off as usize + loc.len as usize - 10;
    bytes[at] ^= 0x40;
    disk.write_file(&name, bytes);
    let mut out = Vec::new();
    let mut good = std::collections::BTreeMap::new();
    let mut failures = 0;
    for _ in 0..5 {
        match engine.receive("a", "q", 1, NOW, &mut out) {
            Ok(crate::engine::ReceiveOutcome::Messages(ms)) => {
                for m in ms {
                    assert_eq!(
                        sent.get(&m.msg_id),
                        Some(&m.body),
                        "a wrong body was served"
                    );
                    good.insert(m.msg_id, m.body);
                }
            }
            Ok(other) => panic!("{other:?}"),
            Err(error) => {
                failures += 1;
                assert!(error.message.contains(&name), "{}", error.message);
                assert!(
                    error.message.contains(&format!("offset {}", loc.off)),
                    "{}",
                    error.message
                );
            }
        }
    }
    assert_eq!(failures, 1);
    assert_eq!(good.len(), 4);
    assert!(!good.contains_key(&victim));
    assert_eq!(engine.body_stats().read_errors, 1);
}

/// Large batches go around the page cache (`O_DIRECT` where the file system allows it) from
/// the start of the block the head's data ends in, writing that block's earlier bytes again:
/// on a real file system, mixed with small batches through the cache, across segments and a
/// restart, every body reads back as sent, and a restart finds the log intact.
#[test]
fn direct_writes_leave_the_bytes_before_them_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        fsync: FsyncMode::Always,
        segment_bytes: 256 * 1024,
        maintenance_interval: Duration::ZERO,
        threaded: false,
        body_cache_bytes: u64::MAX,
        direct_write_min_bytes: 8 * 1024,
        removal_step_bytes: REMOVAL_STEP_BYTES,
        spare_segment: true,
        disk_bytes_max: 0,
    };
    let open = || {
        let clock = Arc::new(ManualClock::new(NOW));
        let log_dir = Arc::new(crate::storage::fs::OsDir::open(dir.path()).unwrap());
        let storage = LogStorage::open_dir(log_dir, config.clone(), clock).unwrap();
        let engine = Engine::new(EngineConfig::default());
        storage.recover(&engine).unwrap();
        (storage, engine)
    };
    // One commit per message, every body different in every byte position.
    let send_sizes = |storage: &LogStorage, engine: &Engine, queue: &str, sizes: &[usize]| {
        let mut sent = std::collections::BTreeMap::new();
        for (i, &size) in sizes.iter().enumerate() {
            let body: Vec<u8> = (0..size).map(|j| (i * 31 + j * 7) as u8).collect();
            let body = Bytes::from(body);
            let mut out = Vec::new();
            let ids = engine
                .send("a", queue, std::slice::from_ref(&body), 0, NOW, &mut out)
                .unwrap();
            let _ = storage.append(out);
            storage.pump();
            sent.insert(ids[0], body);
        }
        sent
    };
    // Sizes around the threshold and the block size, so that batches end anywhere in a block
    // and direct writes follow both direct and cached ones.
    let sizes: Vec<usize> = [
        100, 9_000, 3_000, 20_000, 10, 4_096, 8_192, 65_000, 1, 12_345,
    ]
    .into_iter()
    .cycle()
    .take(60)
    .collect();
    let (storage, engine) = open();
    create(&storage, &engine, "q");
    let sent = send_sizes(&storage, &engine, "q", &sizes);
    let stats = storage.stats();
    assert!(
        stats.direct_bytes > 0 && stats.direct_bytes < stats.bytes,
        "{stats:?}"
    );
    assert!(stats.segments_created >= 2, "{stats:?}");
    assert_same(&receive_all(&engine, "q"), &sent, true);
    drop(engine);
    drop(storage);
    // The restart reads every segment to its end (damage would stop it) and starts a new one.
    let (storage, engine) = open();
    assert_same(&receive_all(&engine, "q"), &sent, true);
    create(&storage, &engine, "r");
    let mut later = send_sizes(
        &storage,
        &engine,
        "r",
        &[30_000, 700, 50_000, 3, 9_999, 64_000],
    );
    // One batch larger than the writer's buffer: written in several chunks.
    let chunk = crate::limits::storage::BATCH_CHUNK_BYTES;
    let mut out = Vec::new();
    for i in 0..chunk * 5 / 2 / 60_000 {
        let body = Bytes::from(vec![(i % 251) as u8; 60_000 + i]);
        let ids = engine
            .send("a", "r", std::slice::from_ref(&body), 0, NOW, &mut out)
            .unwrap();
        let _ = storage.append(std::mem::take(&mut out));
        later.insert(ids[0], body);
    }
    storage.pump();
    later.extend(send_sizes(&storage, &engine, "r", &[5, 5_000]));
    assert!(storage.stats().bytes > chunk as u64 * 2);
    drop(engine);
    drop(storage);
    let (_storage, engine) = open();
    assert_same(&receive_all(&engine, "q"), &sent, true);
    assert_same(&receive_all(&engine, "r"), &later, true);
}

/// A batch larger than the writer's buffer goes out in several writes. When a later one fails
/// (the disk fills up), the whole batch is answered with an error and undone, its bytes are
/// erased from where it starts (not from the block before, which holds acknowledged records),
/// and what was acknowledged before it is intact, in memory and after a crash; both with
/// direct and with cached writes.
#[test]
fn a_batch_written_in_chunks_fails_whole_and_leaves_what_came_before() {
    for (seed, direct) in [(1, true), (2, false)] {
        let disk = SimDisk::new();
        let config = LogConfig {
            fsync: FsyncMode::Always,
            segment_bytes: SEGMENT_BYTES_MIN,
            maintenance_interval: Duration::ZERO,
            threaded: false,
            body_cache_bytes: u64::MAX,
            direct_write_min_bytes: if direct { 0 } else { u64::MAX },
            removal_step_bytes: 256,
            spare_segment: true,
            disk_bytes_max: 0,
        };
        let clock = Arc::new(ManualClock::new(NOW));
        let storage = LogStorage::open_dir(Arc::new(disk.clone()), config.clone(), clock).unwrap();
        let engine = Arc::new(Engine::new(EngineConfig::default()));
        storage.recover(&engine).unwrap();
        storage.attach(&engine);
        create(&storage, &engine, "q");
        let before = send_distinct(&storage, &engine, "q", 5, 1000);
        // About 1.5 chunks: the first write fits, the second does not.
        let chunk = crate::limits::storage::BATCH_CHUNK_BYTES;
        let count = chunk * 3 / 2 / 60_000;
        disk.set_capacity(Some(
            disk.used_bytes() + SEGMENT_BYTES_MIN + chunk as u64 + 64 * 1024,
        ));
        let mut pending = Vec::new();
        for i in 0..count {
            let mut out = Vec::new();
            let body = Bytes::from(vec![b'a' + (i % 26) as u8; 60_000]);
            engine.send("a", "q", &[body], 0, NOW, &mut out).unwrap();
            let Commit::Pending(rx) = storage.append(out) else {
                panic!("the log always answers a send later");
            };
            pending.push(rx);
        }
        storage.pump();
        for mut rx in pending {
            assert!(matches!(rx.try_recv(), Ok(Err(_))), "direct {direct}");
        }
        let stats = storage.stats();
        assert_eq!(stats.write_failures, 1, "direct {direct}: {stats:?}");
        assert_same(&receive_all(&engine, "q"), &before, direct);
        disk.set_capacity(None);
        drop(engine);
        drop(storage);
        let clock = Arc::new(ManualClock::new(NOW));
        let storage = LogStorage::open_dir(Arc::new(disk.reboot(seed)), config, clock).unwrap();
        let engine = Engine::new(EngineConfig::default());
        storage.recover(&engine).unwrap();
        assert_same(&receive_all(&engine, "q"), &before, direct);
    }
}

/// The messages received are those expected (ids and bodies); says which differ, not the
/// megabytes of bodies.
fn assert_same(
    got: &std::collections::BTreeMap<u64, Bytes>,
    want: &std::collections::BTreeMap<u64, Bytes>,
    direct: bool,
) {
    let differ: Vec<(u64, Option<usize>, Option<usize>)> = got
        .keys()
        .chain(want.keys())
        .copied()
        .collect::<BTreeSet<u64>>()
        .into_iter()
        .filter(|id| got.get(id) != want.get(id))
        .map(|id| {
            (
                id,
                got.get(&id).map(Bytes::len),
                want.get(&id).map(Bytes::len),
            )
        })
        .collect();
    assert!(
        differ.is_empty(),
        "direct {direct}: messages that differ (id, bytes received, bytes expected): {differ:?}"
    );
}
