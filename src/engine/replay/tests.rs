//! Replay: an engine driven at random and one rebuilt from its mutations agree (queues; topics,
//! subscriptions, publishes and HTTP deliveries; dequeue counts); records logged before the
//! record they depend on are applied once it arrives; the tracker is told what each record
//! keeps and drops.

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::engine::queue::State;
use crate::engine::{
    ContentFormat, EngineConfig, NotifyStrategy, Protocol, PushDelivery, PushOutcome,
    ReceiveOutcome, SubscriptionSettings, TopicSettings,
};
use crate::model::{
    DeadLetterPolicy, QueueAttributeSet, SubscriptionAttributeSet, SubscriptionSpec,
    TopicAttributeSet, DEAD_LETTER_POLICY_RECEIVES,
};

const ACCOUNT: &str = "acct";

/// What a queue looks like from outside, at one moment (taken once every visibility timeout
/// has run out, so that what a restart is allowed to change, in-flight becoming visible at
/// once, has happened on both sides).
#[derive(Debug, PartialEq, Eq)]
struct QueueView {
    name: String,
    settings: QueueSettings,
    created: Millis,
    modified: Millis,
    /// (id, body, enqueue time, dequeue count, dead-letter info)
    live: Vec<(u64, Bytes, Millis, u32, Option<DeadLetterInfo>)>,
    rewind: Vec<u64>,
}

fn view(engine: &Engine, now: Millis) -> BTreeMap<u64, QueueView> {
    let cells: Vec<Arc<QueueCell>> = engine.by_id.iter().map(|r| Arc::clone(r.value())).collect();
    let mut views = BTreeMap::new();
    for cell in cells {
        let mut q = cell.state.lock();
        if q.deleted {
            continue;
        }
        // Expire what is past its retention on both sides (expiry is not logged).
        q.advance(now, &mut Effects::default());
        let mut live: Vec<_> = q
            .peek(usize::MAX)
            .into_iter()
            .map(|m| {
                (
                    m.msg_id,
                    m.body,
                    m.enqueue_time_ms,
                    m.dequeue_count,
                    m.dead_letter,
                )
            })
            .collect();
        live.sort_by_key(|m| m.0);
        let rewind = q
            .snapshot()
            .into_iter()
            .filter(|(_, s, _)| *s == State::Rewind)
            .map(|(id, _, _)| id)
            .collect();
        views.insert(
            cell.id,
            QueueView {
                name: cell.name.to_string(),
                settings: q.settings().clone(),
                created: q.created_ms(),
                modified: q.modified_ms(),
                live,
                rewind,
            },
        );
    }
    views
}

fn engine() -> Engine {
    Engine::new(EngineConfig::default())
}

/// Replays `log` (origin = index in the log) and restores the result into a new engine.
fn rebuilt(log: &[Mutation]) -> Engine {
    let mut replay: Replay<usize> = Replay::new();
    for (i, m) in log.iter().enumerate() {
        replay.apply(m, i, &mut NoTracker);
    }
    replay.end_batch(&mut NoTracker);
    replay.check_extras();
    let image = replay.image(|&i| match &log[i] {
        Mutation::MessageSent { body, .. } | Mutation::TopicMessageRetained { body, .. } => {
            body.clone()
        }
        other => panic!("origin {i} is not a send: {other:?}"),
    });
    let restored = engine();
    restored.restore(image, 0).unwrap();
    restored
}

/// Drives an engine through `steps` random operations over a few queues.
fn drive(seed: u64, steps: usize) -> (Engine, Vec<Mutation>, Millis) {
    let mut rng = StdRng::seed_from_u64(seed);
    let e = engine();
    let mut log = Vec::new();
    let mut now: Millis = 1_700_000_000_000;
    let mut handles: Vec<(String, String)> = Vec::new();
    let names = ["a", "b", "dlq"];
    let mut out = Vec::new();
    for step in 0..steps {
        now += rng.gen_range(0..800);
        let queue = names[rng.gen_range(0..names.len())];
        let roll = rng.gen_range(0..100);
        let _ = match roll {
            0..=4 => {
                let attrs = QueueAttributeSet {
                    rewind_seconds: Some(if rng.gen_bool(0.5) { 3600 } else { 0 }),
                    visibility_timeout_seconds: Some(rng.gen_range(1..5)),
                    dead_letter_policy: (queue != "dlq" && rng.gen_bool(0.5)).then(|| {
                        Some(DeadLetterPolicy {
                            dead_letter_queue: "dlq".into(),
                            policy: DEAD_LETTER_POLICY_RECEIVES,
                            max_receive_count: 2,
                            max_time_to_live_seconds: 0,
                        })
                    }),
                    ..QueueAttributeSet::default()
                };
                if rng.gen_bool(0.5) {
                    e.create_queue(ACCOUNT, queue, &attrs, now, &mut out)
                        .map(|_| ())
                } else {
                    e.set_queue_attributes(ACCOUNT, queue, &attrs, now, &mut out)
                }
            }
            5..=39 => {
                let n = rng.gen_range(1..4);
                let bodies: Vec<Bytes> = (0..n)
                    .map(|i| Bytes::from(format!("m{step}-{i}")))
                    .collect();
                let delay = if rng.gen_bool(0.2) { 2 } else { 0 };
                e.send(ACCOUNT, queue, &bodies, delay, now, &mut out)
                    .map(|_| ())
            }
            40..=64 => match e.receive(ACCOUNT, queue, 3, now, &mut out) {
                Ok(ReceiveOutcome::Messages(ms)) => {
                    handles.extend(
                        ms.into_iter()
                            .map(|m| (queue.to_string(), m.receipt_handle)),
                    );
                    Ok(())
                }
                Ok(ReceiveOutcome::Empty { .. }) => Ok(()),
                Err(error) => Err(error),
            },
            65..=84 if !handles.is_empty() => {
                let (q, h) = handles.swap_remove(rng.gen_range(0..handles.len()));
                e.delete_message(ACCOUNT, &q, &h, now, &mut out)
            }
            85..=89 if !handles.is_empty() => {
                let (q, h) = handles.swap_remove(rng.gen_range(0..handles.len()));
                e.change_visibility(ACCOUNT, &q, &h, 0, now, &mut out)
                    .map(|_| ())
            }
            90..=92 => e
                .rewind(ACCOUNT, queue, (now - 1_000_000) / 1000, now, &mut out)
                .map(|_| ()),
            93..=95 => e.redrive(ACCOUNT, "dlq", 5, now, &mut out).map(|_| ()),
            96 => e.purge(ACCOUNT, queue, now, &mut out).map(|_| ()),
            97 if rng.gen_bool(0.3) => e.delete_queue(ACCOUNT, queue, now, &mut out),
            _ => {
                e.tick(now, &mut out);
                Ok(())
            }
        };
        log.append(&mut out);
    }
    e.tick(now, &mut out);
    log.append(&mut out);
    (e, log, now)
}

#[test]
fn a_replayed_engine_matches_the_original() {
    for seed in 0..60 {
        let (original, log, now) = drive(seed, 400);
        let restored = rebuilt(&log);
        // Past every visibility timeout (at most 5 s in `drive`): what was in flight in the
        // original is visible again, or dead-lettered when it reached maxReceiveCount, as the
        // restored engine did at once. Dequeue counts must agree.
        let later = now + 10_000;
        original.tick(later, &mut Vec::new());
        restored.tick(later, &mut Vec::new());
        assert_eq!(
            view(&restored, later),
            view(&original, later),
            "seed {seed}: replay of {} mutations differs",
            log.len()
        );
        // Ids resume above everything used.
        assert!(
            restored.next_msg_id.load(Ordering::Relaxed)
                >= original.next_msg_id.load(Ordering::Relaxed),
            "seed {seed}: message ids would be reused"
        );
    }
}

fn sent(queue_id: u64, msg_id: u64) -> Mutation {
    Mutation::MessageSent {
        account: Arc::from(ACCOUNT),
        queue_id,
        queue: Arc::from("q"),
        msg_id,
        body: Bytes::from_static(b"body"),
        enqueue_time_ms: 10,
        visible_at_ms: 10,
    }
}

fn deleted(queue_id: u64, msg_id: u64, to_rewind_area: bool) -> Mutation {
    deleted_at(queue_id, msg_id, to_rewind_area, 20)
}

fn deleted_at(queue_id: u64, msg_id: u64, to_rewind_area: bool, at_ms: Millis) -> Mutation {
    Mutation::MessageDeleted {
        account: Arc::from(ACCOUNT),
        queue_id,
        queue: Arc::from("q"),
        msg_id,
        at_ms,
        to_rewind_area,
    }
}

fn created(queue_id: u64, name: &str, rewind_seconds: u32) -> Mutation {
    Mutation::QueueCreated {
        account: Arc::from(ACCOUNT),
        queue_id,
        name: Arc::from(name),
        settings: QueueSettings {
            rewind_seconds,
            ..QueueSettings::default()
        },
        created_at_ms: 1,
    }
}

fn dead_lettered(from: u64, to: u64, msg_id: u64) -> Mutation {
    Mutation::DeadLettered {
        account: Arc::from(ACCOUNT),
        source_queue_id: from,
        source: Arc::from("q"),
        target: Arc::from("dlq"),
        target_queue_id: Some(to),
        msg_id,
        reason: crate::model::DeadLetterReason::MaxReceiveCount,
        receive_count: 2,
        at_ms: 15,
    }
}

fn redriven(from: u64, to: u64, msg_id: u64) -> Mutation {
    Mutation::Redriven {
        account: Arc::from(ACCOUNT),
        dead_letter_queue_id: from,
        dead_letter_queue: Arc::from("dlq"),
        target_queue_id: to,
        target: Arc::from("q"),
        msg_id,
        at_ms: 30,
    }
}

fn apply_all(log: &[Mutation]) -> Replay<usize> {
    let mut replay = Replay::new();
    for (i, m) in log.iter().enumerate() {
        replay.apply(m, i, &mut NoTracker);
    }
    replay
}

#[test]
fn a_delete_logged_before_its_send_still_deletes() {
    let replay = apply_all(&[created(1, "q", 0), deleted(1, 5, false), sent(1, 5)]);
    assert_eq!(replay.message(1, 5), None);
    assert_eq!(replay.pending_count(), 0);
    assert_eq!(replay.next_ids(), (2, 6));
}

#[test]
fn moves_logged_out_of_order_are_applied_in_causal_order() {
    // Sent to 1, dead-lettered to 2, redriven back to 1, deleted there: logged backwards. The
    // message is in queue 1 twice; the record times tell which visit the delete belongs to.
    let log = [
        created(1, "q", 0),
        created(2, "dlq", 0),
        deleted_at(1, 5, false, 40),
        redriven(2, 1, 5),
        dead_lettered(1, 2, 5),
        sent(1, 5),
    ];
    let replay = apply_all(&log);
    assert_eq!(replay.message(1, 5), None);
    assert_eq!(replay.message(2, 5), None);
    assert_eq!(replay.pending_count(), 0);

    // Without the delete, the message ends back in 1 as a fresh message.
    let replay = apply_all(
        &log[..2]
            .iter()
            .chain(&log[3..])
            .cloned()
            .collect::<Vec<_>>(),
    );
    let m = replay.message(1, 5).unwrap();
    assert_eq!((m.enqueue_time_ms(), m.dead_letter().is_none()), (30, true));
}

#[test]
fn orphans_are_dropped_at_the_end_of_a_batch() {
    let mut replay = apply_all(&[created(1, "q", 0), deleted(1, 9, false)]);
    assert_eq!(replay.pending_count(), 1);
    replay.end_batch(&mut NoTracker);
    assert_eq!(replay.pending_count(), 0);
    // The id is used: it will never be handed out again.
    assert_eq!(replay.next_ids().1, 10);
    replay.apply(&sent(1, 9), 3, &mut NoTracker);
    assert!(replay.message(1, 9).is_some());
}

#[test]
fn a_rewind_revives_and_lets_a_pending_delete_apply() {
    let rewound = Mutation::Rewound {
        account: Arc::from(ACCOUNT),
        queue_id: 1,
        queue: Arc::from("q"),
        start_ms: 0,
        at_ms: 25,
    };
    // Deleted to the rewind area, rewound, deleted again; the second delete logged first.
    let replay = apply_all(&[
        created(1, "q", 600),
        sent(1, 5),
        deleted(1, 5, true),
        deleted_at(1, 5, true, 30),
        rewound.clone(),
    ]);
    assert!(replay.message(1, 5).unwrap().in_rewind_area);
    assert_eq!(replay.pending_count(), 0);
    let replay = apply_all(&[
        created(1, "q", 600),
        sent(1, 5),
        deleted(1, 5, true),
        rewound,
    ]);
    let m = replay.message(1, 5).unwrap();
    assert!(!m.in_rewind_area);
    assert_eq!(m.visible_at_ms(), 25);
}

#[derive(Default)]
struct Counting {
    stored: Vec<usize>,
    dropped: Vec<usize>,
    needs: Vec<usize>,
}

impl Tracker<usize> for Counting {
    fn stored(&mut self, origin: &usize) {
        self.stored.push(*origin);
    }
    fn dropped(&mut self, origin: &usize) {
        self.dropped.push(*origin);
    }
    fn needs(&mut self, origin: &usize) {
        self.needs.push(*origin);
    }
}

#[test]
fn the_tracker_hears_what_each_record_keeps_and_drops() {
    let mut replay: Replay<usize> = Replay::new();
    let mut t = Counting::default();
    for (i, m) in [
        created(1, "q", 600),
        sent(1, 5),
        sent(1, 6),
        deleted(1, 5, true),
    ]
    .iter()
    .enumerate()
    {
        replay.apply(m, i, &mut t);
    }
    // Into the rewind area: still stored, but the delete depends on the send.
    assert_eq!((t.stored.clone(), t.dropped.clone()), (vec![1, 2], vec![]));
    assert_eq!(t.needs, vec![1]);
    let purge = Mutation::Purged {
        account: Arc::from(ACCOUNT),
        queue_id: 1,
        queue: Arc::from("q"),
        at_ms: 30,
    };
    replay.apply(&purge, 4, &mut t);
    t.dropped.sort_unstable();
    assert_eq!(t.dropped, vec![1, 2]);
    assert_eq!(replay.message_count(), 0);

    // A copy replaces the original.
    let image = MessageImage {
        queue_id: 1,
        msg_id: 7,
        body: Bytes::from_static(b"b"),
        enqueue_time_ms: 10,
        visible_at_ms: 10,
        in_rewind_area: false,
        dead_letter: None,
        dequeue_count: 0,
        first_dequeue_ms: 0,
        invisible_until_ms: 0,
    };
    let mut t = Counting::default();
    replay.apply(&sent(1, 7), 5, &mut t);
    replay.restore_message(&image, 9, &mut t);
    assert_eq!((t.stored, t.dropped), (vec![5, 9], vec![5]));
    assert_eq!(replay.message(1, 7).unwrap().origin, 9);
}

#[test]
fn checkpoints_restore_metadata_and_retention_is_applied() {
    let mut replay = apply_all(&[created(1, "q", 0), created(2, "r", 0), sent(2, 3)]);
    let checkpoint = replay.checkpoint();
    assert_eq!(checkpoint.queues.len(), 2);
    // A checkpoint without queue 2 (deleted in a segment no longer on disk) removes it.
    let mut without = checkpoint.clone();
    without.queues.retain(|q| q.queue_id == 1);
    let mut t = Counting::default();
    replay.reset(&without, &mut t);
    assert_eq!(replay.queue_count(), 1);
    assert_eq!(t.dropped, vec![2]);
    replay.reset(&checkpoint, &mut NoTracker);
    assert_eq!(replay.queue_count(), 2);

    replay.apply(&sent(1, 4), 4, &mut NoTracker);
    let retention_ms = u64::from(QueueSettings::default().msg_retention_seconds) * 1000;
    assert_eq!(replay.expire(10 + retention_ms, 1, &mut NoTracker), 0);
    assert_eq!(replay.expire(10 + retention_ms + 1, 1, &mut NoTracker), 1);
    assert_eq!(replay.message_count(), 0);
}

/// A recovered image lists each queue's messages in id order, and the restore builds the
/// queue's indexes in bulk; an image in any other order (or naming an id twice) takes the
/// one-by-one path and must give the same queues.
#[test]
fn an_image_in_any_order_restores_the_same_queues() {
    for seed in 0..10 {
        let (_, log, now) = drive(seed, 400);
        let mut replay: Replay<usize> = Replay::new();
        for (i, m) in log.iter().enumerate() {
            replay.apply(m, i, &mut NoTracker);
        }
        replay.end_batch(&mut NoTracker);
        let in_order = replay.image(|&i| match &log[i] {
            Mutation::MessageSent { body, .. } | Mutation::TopicMessageRetained { body, .. } => {
                body.clone()
            }
            other => panic!("origin {i} is not a send: {other:?}"),
        });
        let mut shuffled = in_order.clone();
        shuffled.messages.reverse();
        let twice = shuffled.messages.first().cloned();
        shuffled.messages.extend(twice.clone());
        let (bulk, one_by_one) = (engine(), engine());
        let bulk_report = bulk.restore(in_order, 0).unwrap();
        let report = one_by_one.restore(shuffled, 0).unwrap();
        assert_eq!(bulk_report.skipped, 0);
        assert_eq!(report.skipped, usize::from(twice.is_some()), "seed {seed}");
        assert_eq!(
            (report.messages, report.body_bytes),
            (bulk_report.messages, bulk_report.body_bytes)
        );
        let later = now + 10_000;
        bulk.tick(later, &mut Vec::new());
        one_by_one.tick(later, &mut Vec::new());
        assert_eq!(view(&one_by_one, later), view(&bulk, later), "seed {seed}");
    }
}

#[test]
fn restore_needs_an_empty_engine_and_resumes_ids() {
    let e = engine();
    let mut out = Vec::new();
    e.create_queue(ACCOUNT, "q", &QueueAttributeSet::default(), 1, &mut out)
        .unwrap();
    assert!(e.restore(Image::default(), 0).is_err());

    let restored = rebuilt(&[created(4, "q", 0), sent(4, 41)]);
    let mut out = Vec::new();
    let ids = restored
        .send(ACCOUNT, "q", &[Bytes::from_static(b"x")], 0, 100, &mut out)
        .unwrap();
    assert_eq!(ids, vec![42]);
    let id = restored
        .create_queue(
            ACCOUNT,
            "other",
            &QueueAttributeSet::default(),
            100,
            &mut out,
        )
        .unwrap();
    assert_eq!(id, 5);
}

#[test]
fn a_send_logged_before_its_queue_was_created_waits_for_it() {
    let replay = apply_all(&[
        sent(3, 5),
        deleted(3, 6, false),
        created(3, "q", 0),
        sent(3, 6),
    ]);
    assert!(replay.message(3, 5).is_some());
    assert!(replay.message(3, 6).is_none());
    assert_eq!(replay.pending_count(), 0);
    // A queue that never comes: the records are dropped at the end of the batch.
    let mut replay = apply_all(&[sent(4, 7)]);
    assert_eq!(replay.pending_count(), 1);
    replay.end_batch(&mut NoTracker);
    assert_eq!((replay.pending_count(), replay.message_count()), (0, 0));
    assert_eq!(replay.next_ids().1, 8);
}

// -------------------------------------------------------------------------------------------
// Receives
// -------------------------------------------------------------------------------------------

fn received(queue_id: u64, msg_id: u64, count: u32, at_ms: Millis) -> Mutation {
    Mutation::MessagesReceived {
        account: Arc::from(ACCOUNT),
        queue_id,
        queue: Arc::from("q"),
        at_ms,
        invisible_until_ms: at_ms + 30_000,
        messages: vec![Dequeue {
            msg_id,
            dequeue_count: count,
            first_dequeue_ms: 11,
        }],
    }
}

#[test]
fn receives_set_dequeue_counts_in_any_order() {
    // Logged as they happened.
    let replay = apply_all(&[
        created(1, "q", 0),
        sent(1, 5),
        received(1, 5, 1, 11),
        received(1, 5, 2, 50),
    ]);
    let m = replay.message(1, 5).unwrap();
    assert_eq!((m.dequeue_count, m.first_dequeue_ms()), (2, 11));
    assert_eq!(m.invisible_until_ms(), 50 + 30_000);
    // Two receives in the other order, and before the send: the later count wins.
    let replay = apply_all(&[
        created(1, "q", 0),
        received(1, 5, 2, 50),
        received(1, 5, 1, 11),
        sent(1, 5),
    ]);
    assert_eq!(replay.message(1, 5).unwrap().dequeue_count, 2);
    assert_eq!(replay.pending_count(), 0);
    // A receive of a message that never comes is dropped with the batch.
    let mut replay = apply_all(&[created(1, "q", 0), received(1, 6, 1, 11)]);
    assert_eq!(replay.pending_count(), 1);
    replay.end_batch(&mut NoTracker);
    assert_eq!(replay.pending_count(), 0);
    assert_eq!(replay.next_ids().1, 7);
}

#[test]
fn a_receive_from_before_a_move_counts_nothing_after_it() {
    // Received twice in 1, dead-lettered to 2 (count 0 there), received once in 2; the first
    // queue's receive logged last (a slow caller) finds its message gone and is dropped.
    let mut replay = apply_all(&[
        created(1, "q", 0),
        created(2, "dlq", 0),
        sent(1, 5),
        received(1, 5, 1, 11),
        dead_lettered(1, 2, 5),
        received(2, 5, 1, 16),
        received(1, 5, 2, 14),
    ]);
    replay.end_batch(&mut NoTracker);
    assert_eq!(replay.message(2, 5).unwrap().dequeue_count, 1);
    // Redriven back to 1 as a fresh message at 30: a receive of the first visit (at 14)
    // logged after the redrive does not count.
    let replay = apply_all(&[
        created(1, "q", 0),
        created(2, "dlq", 0),
        sent(1, 5),
        dead_lettered(1, 2, 5),
        redriven(2, 1, 5),
        received(1, 5, 2, 14),
    ]);
    let m = replay.message(1, 5).unwrap();
    assert_eq!((m.dequeue_count, m.enqueue_time_ms), (0, 30));
}

#[test]
fn restored_counts_and_the_dead_letter_policy() {
    let policy = |name: &str, id: u64| Mutation::QueueCreated {
        account: Arc::from(ACCOUNT),
        queue_id: id,
        name: Arc::from(name),
        settings: QueueSettings {
            dead_letter_policy: Some(DeadLetterPolicy {
                dead_letter_queue: "dlq".into(),
                policy: DEAD_LETTER_POLICY_RECEIVES,
                max_receive_count: 3,
                max_time_to_live_seconds: 0,
            }),
            ..QueueSettings::default()
        },
        created_at_ms: 1,
    };
    let log = [
        created(2, "dlq", 0),
        policy("q", 1),
        sent(1, 5),
        sent(1, 6),
        sent(1, 7),
        // 5 was received twice: it comes back ready with count 2.
        received(1, 5, 2, 100),
        // 6 reached maxReceiveCount and was in flight when the log ended (its deadline, 60 s,
        // is after the last record, 40 s): it goes to the dead-letter queue at the first tick.
        received(1, 6, 3, 30_000),
        // 7 reached it too, but had come back before the log ended (deadline 30 s; the policy
        // was set after it came back, say): it stays, as in the engine.
        received(1, 7, 3, 10),
        Mutation::Purged {
            account: Arc::from(ACCOUNT),
            queue_id: 2,
            queue: Arc::from("dlq"),
            at_ms: 40_000,
        },
    ];
    let e = rebuilt(&log);
    let mut out = Vec::new();
    e.tick(40_000, &mut out);
    assert!(
        matches!(
            &out[..],
            [Mutation::DeadLettered {
                msg_id: 6,
                receive_count: 3,
                ..
            }]
        ),
        "{out:?}"
    );
    let ReceiveOutcome::Messages(ms) = e.receive(ACCOUNT, "q", 16, 40_000, &mut out).unwrap()
    else {
        panic!("nothing to receive");
    };
    let got: Vec<(u64, u32, Millis)> = ms
        .iter()
        .map(|m| (m.msg_id, m.dequeue_count, m.first_dequeue_time_ms))
        .collect();
    assert_eq!(got, vec![(5, 3, 11), (7, 4, 11)]);
    let ReceiveOutcome::Messages(ms) = e.receive(ACCOUNT, "dlq", 16, 40_000, &mut out).unwrap()
    else {
        panic!("nothing in the dead-letter queue");
    };
    assert_eq!((ms[0].msg_id, ms[0].dequeue_count), (6, 1));
}

#[test]
fn compaction_copies_keep_dequeue_counts() {
    let mut replay = apply_all(&[created(1, "q", 0), sent(1, 5), received(1, 5, 4, 20)]);
    let image = replay
        .message_image(1, 5, Bytes::from_static(b"b"))
        .unwrap();
    assert_eq!((image.dequeue_count, image.first_dequeue_ms), (4, 11));
    let mut t = Counting::default();
    replay.restore_message(&image, 9, &mut t);
    let m = replay.message(1, 5).unwrap();
    assert_eq!(
        (m.origin, m.dequeue_count, m.invisible_until_ms()),
        (9, 4, 20 + 30_000)
    );
}

// -------------------------------------------------------------------------------------------
// Topics
// -------------------------------------------------------------------------------------------

fn topic_created(topic_id: u64, name: &str) -> Mutation {
    Mutation::TopicCreated {
        account: Arc::from(ACCOUNT),
        topic_id,
        name: Arc::from(name),
        settings: TopicSettings::default(),
        created_at_ms: 1,
    }
}

fn http_settings() -> SubscriptionSettings {
    SubscriptionSettings {
        protocol: Protocol::Http,
        endpoint: Arc::from("http://127.0.0.1:9/p"),
        notify_strategy: NotifyStrategy::ExponentialDecayRetry,
        content_format: ContentFormat::Json,
        filter_tags: Vec::new(),
        binding_keys: Vec::new(),
    }
}

fn subscribed(topic_id: u64, subscription_id: u64) -> Mutation {
    Mutation::SubscriptionCreated {
        account: Arc::from(ACCOUNT),
        topic_id,
        topic: Arc::from("t"),
        subscription_id,
        name: Arc::from(format!("s{subscription_id}").as_str()),
        settings: http_settings(),
        created_at_ms: 2,
    }
}

fn unsubscribed(topic_id: u64, subscription_id: u64) -> Mutation {
    Mutation::SubscriptionDeleted {
        account: Arc::from(ACCOUNT),
        topic_id,
        subscription_id,
        name: Arc::from(format!("s{subscription_id}").as_str()),
        at_ms: 40,
    }
}

fn retained(topic_id: u64, msg_id: u64, subscription_ids: &[u64]) -> Mutation {
    Mutation::TopicMessageRetained {
        account: Arc::from(ACCOUNT),
        topic_id,
        topic: Arc::from("t"),
        msg_id,
        body: Bytes::from_static(b"pub"),
        msg_tags: Arc::from(vec!["red".to_string()]),
        publish_time_ms: 10,
        expires_at_ms: 10 + 86_400_000,
        subscription_ids: subscription_ids.to_vec(),
    }
}

fn finished(topic_id: u64, subscription_id: u64, msg_id: u64) -> Mutation {
    Mutation::PushFinished {
        account: Arc::from(ACCOUNT),
        topic_id,
        subscription_id,
        msg_id,
        outcome: PushOutcome::Delivered,
        at_ms: 20,
    }
}

#[test]
fn topic_and_subscription_metadata_replay() {
    let changed = TopicSettings {
        max_msg_size_bytes: 4096,
        ..TopicSettings::default()
    };
    let tags = SubscriptionSettings {
        filter_tags: vec!["red".into()],
        ..http_settings()
    };
    let mut replay = apply_all(&[
        topic_created(3, "t"),
        Mutation::TopicAttributesSet {
            account: Arc::from(ACCOUNT),
            topic_id: 3,
            name: Arc::from("t"),
            settings: changed.clone(),
            modified_at_ms: 5,
        },
        subscribed(3, 7),
        subscribed(3, 8),
        Mutation::SubscriptionAttributesSet {
            account: Arc::from(ACCOUNT),
            topic_id: 3,
            subscription_id: 7,
            name: Arc::from("s7"),
            settings: tags.clone(),
            modified_at_ms: 6,
        },
        unsubscribed(3, 8),
    ]);
    let topic = replay.topic(3).unwrap();
    assert_eq!((&topic.settings, topic.modified_at_ms), (&changed, 5));
    let sub = replay.subscription(7).unwrap();
    assert_eq!(
        (&sub.settings, sub.created_at_ms, sub.modified_at_ms),
        (&tags, 2, 6)
    );
    assert!(replay.subscription(8).is_none());
    assert_eq!(replay.next_topic_ids(), (4, 9));

    // The checkpoint carries them; a checkpoint without them (deleted in a segment no longer
    // on disk) removes them.
    let checkpoint = replay.checkpoint();
    assert_eq!(
        (checkpoint.topics.len(), checkpoint.subscriptions.len()),
        (1, 1)
    );
    let mut without = checkpoint.clone();
    without.subscriptions.clear();
    replay.reset(&without, &mut NoTracker);
    assert_eq!(replay.subscription_count(), 0);
    replay.reset(&checkpoint, &mut NoTracker);
    assert_eq!(replay.subscription_count(), 1);

    // Deleted stays deleted; later records naming it wait, then go with the batch.
    replay.apply(&unsubscribed(3, 7), 10, &mut NoTracker);
    let deleted = Mutation::TopicDeleted {
        account: Arc::from(ACCOUNT),
        topic_id: 3,
        name: Arc::from("t"),
        at_ms: 50,
    };
    replay.apply(&deleted, 11, &mut NoTracker);
    replay.apply(&subscribed(3, 9), 12, &mut NoTracker);
    replay.end_batch(&mut NoTracker);
    assert_eq!((replay.topic_count(), replay.subscription_count()), (0, 0));
    assert_eq!(replay.next_topic_ids(), (4, 10));
}

#[test]
fn a_retained_message_waits_for_every_subscription_it_lists() {
    let mut replay: Replay<usize> = Replay::new();
    let mut t = Counting::default();
    let log = [
        topic_created(3, "t"),
        subscribed(3, 7),
        subscribed(3, 8),
        retained(3, 50, &[7, 8]),
        finished(3, 7, 50),
        unsubscribed(3, 8),
    ];
    for (i, m) in log[..5].iter().enumerate() {
        replay.apply(m, i, &mut t);
    }
    let r = replay.retained(50).unwrap();
    assert_eq!((r.origin, r.waiting.clone()), (3, vec![8]));
    assert_eq!((t.stored.clone(), t.needs.clone()), (vec![3], vec![3]));
    // The last subscription it waited for goes: so does the message.
    replay.apply(&log[5], 5, &mut t);
    assert!(replay.retained(50).is_none());
    assert_eq!(t.dropped, vec![3]);
    assert_eq!(replay.next_ids().1, 51);

    // A copy (compaction) replaces the original, and the image has what restore needs.
    let mut replay = apply_all(&log[..4]);
    let image = replay
        .retained_image(50, Bytes::from_static(b"pub"))
        .unwrap();
    assert_eq!(image.subscription_ids, vec![7, 8]);
    let mut t = Counting::default();
    replay.restore_retained(&image, 9, &mut t);
    assert_eq!((t.stored, t.dropped), (vec![9], vec![3]));
    assert_eq!(replay.origin(Holder::Topic(3), 50), Some(&9));
    let found = replay.find_origins(|&o| o == 9);
    assert_eq!(found, vec![(Holder::Topic(3), 50, 9)]);

    // Expiry forgets it (the engine drops it with a PushFinished of its own).
    assert_eq!(replay.expire(10 + 86_400_000, 0, &mut NoTracker), 1);
    assert_eq!(replay.retained_count(), 0);
}

#[test]
fn topic_records_logged_out_of_order_are_applied_in_causal_order() {
    // The subscription before its topic, a finished delivery before the publish, an
    // attribute change before the subscription.
    let log = [
        finished(3, 7, 50),
        retained(3, 50, &[7, 8]),
        Mutation::SubscriptionAttributesSet {
            account: Arc::from(ACCOUNT),
            topic_id: 3,
            subscription_id: 8,
            name: Arc::from("s8"),
            settings: http_settings(),
            modified_at_ms: 9,
        },
        subscribed(3, 8),
        subscribed(3, 7),
        topic_created(3, "t"),
    ];
    let mut replay = apply_all(&log);
    assert_eq!(replay.pending_count(), 0);
    assert_eq!(replay.retained(50).unwrap().waiting, vec![8]);
    assert_eq!(replay.subscription(8).unwrap().modified_at_ms, 9);
    replay.end_batch(&mut NoTracker);
    assert_eq!(replay.retained(50).unwrap().waiting, vec![8]);

    // A publish logged after an unsubscribe it raced with lists the gone subscription: it
    // waits for the others only, and for nobody means it is done.
    let mut replay = apply_all(&[
        topic_created(3, "t"),
        subscribed(3, 7),
        subscribed(3, 8),
        unsubscribed(3, 8),
        retained(3, 50, &[7, 8]),
        unsubscribed(3, 7),
        retained(3, 51, &[7]),
    ]);
    replay.end_batch(&mut NoTracker);
    assert!(replay.retained(50).is_none(), "7 went later, 8 before");
    assert!(replay.retained(51).is_none());

    // A subscription created after the publish that lists it (logged later) is waited for.
    let mut replay = apply_all(&[
        topic_created(3, "t"),
        retained(3, 52, &[9]),
        subscribed(3, 9),
    ]);
    replay.end_batch(&mut NoTracker);
    assert_eq!(replay.retained(52).unwrap().waiting, vec![9]);
}

/// What topics look like from outside, without the delivery state a restart resets
/// (attempt counters, errors, retry times).
fn topic_view(e: &Engine) -> Vec<String> {
    let mut view = Vec::new();
    let (_, topics) = e.list_topics(ACCOUNT, "", 0, 1000).unwrap();
    for t in topics {
        view.push(format!(
            "{:?}",
            e.topic_attributes(ACCOUNT, &t.topic_name).unwrap()
        ));
        let (_, subs) = e
            .list_subscriptions(ACCOUNT, &t.topic_name, "", 0, 1000)
            .unwrap();
        for s in subs {
            let mut a = e
                .subscription_attributes(ACCOUNT, &t.topic_name, &s.subscription_name)
                .unwrap();
            a.delivered_count = 0;
            a.dropped_count = 0;
            a.last_error = None;
            a.last_error_time_ms = 0;
            a.next_retry_time_ms = 0;
            view.push(format!("{a:?}"));
        }
    }
    view
}

/// Drives topics, subscriptions, publishes, HTTP deliveries and the queues they feed at random.
fn drive_topics(seed: u64, steps: usize) -> (Engine, Vec<Mutation>, Millis) {
    let mut rng = StdRng::seed_from_u64(seed);
    let e = engine();
    let mut log = Vec::new();
    let mut now: Millis = 1_700_000_000_000;
    let mut out = Vec::new();
    for q in ["qa", "qb"] {
        e.create_queue(ACCOUNT, q, &QueueAttributeSet::default(), now, &mut out)
            .unwrap();
    }
    let topics = ["t1", "t2"];
    let subs = ["s1", "s2", "s3"];
    let mut taken: Vec<PushDelivery> = Vec::new();
    let mut handles: Vec<(String, String)> = Vec::new();
    let pick = |rng: &mut StdRng, list: &[&'static str]| list[rng.gen_range(0..list.len())];
    for step in 0..steps {
        now += rng.gen_range(0..800);
        let topic = pick(&mut rng, &topics);
        let sub = pick(&mut rng, &subs);
        let _ = match rng.gen_range(0..100) {
            0..=5 => {
                let attrs = TopicAttributeSet {
                    filter_type: Some(rng.gen_range(1..=2)),
                    ..TopicAttributeSet::default()
                };
                e.create_topic(ACCOUNT, topic, &attrs, now, &mut out)
                    .map(|_| ())
            }
            6..=8 => {
                let attrs = TopicAttributeSet {
                    max_msg_size_bytes: Some(rng.gen_range(1024..=65_536)),
                    ..TopicAttributeSet::default()
                };
                e.set_topic_attributes(ACCOUNT, topic, &attrs, now, &mut out)
            }
            9..=10 => e.delete_topic(ACCOUNT, topic, now, &mut out),
            11..=22 => {
                let http = rng.gen_bool(0.5);
                let spec = SubscriptionSpec {
                    protocol: if http { "http" } else { "queue" }.into(),
                    endpoint: if http {
                        "http://127.0.0.1:9/p".into()
                    } else {
                        pick(&mut rng, &["qa", "qb"]).into()
                    },
                    notify_strategy: Some(
                        pick(&mut rng, &["BACKOFF_RETRY", "EXPONENTIAL_DECAY_RETRY"]).into(),
                    ),
                    notify_content_format: (!http).then(|| "SIMPLIFIED".into()),
                    filter_tags: if rng.gen_bool(0.5) {
                        vec!["red".into()]
                    } else {
                        Vec::new()
                    },
                    binding_keys: vec![pick(&mut rng, &["a.*", "#", "a.b"]).into()],
                };
                e.subscribe(ACCOUNT, topic, sub, &spec, now, &mut out)
                    .map(|_| ())
            }
            23..=27 => {
                let changes = SubscriptionAttributeSet {
                    filter_tags: Some(if rng.gen_bool(0.5) {
                        vec!["blue".into()]
                    } else {
                        Vec::new()
                    }),
                    binding_keys: Some(vec![pick(&mut rng, &["#", "a.c"]).into()]),
                    ..SubscriptionAttributeSet::default()
                };
                e.set_subscription_attributes(ACCOUNT, topic, sub, &changes, now, &mut out)
            }
            28..=31 => e.unsubscribe(ACCOUNT, topic, sub, now, &mut out),
            32..=59 => {
                let bodies: Vec<Bytes> = (0..rng.gen_range(1..4))
                    .map(|i| Bytes::from(format!("p{step}-{i}")))
                    .collect();
                let tags = if rng.gen_bool(0.5) {
                    vec!["red".to_string()]
                } else {
                    vec!["blue".to_string()]
                };
                let key = pick(&mut rng, &["a.b", "a.c", "x"]);
                e.publish(ACCOUNT, topic, &bodies, &tags, Some(key), now, &mut out)
                    .map(|_| ())
            }
            60..=72 => {
                taken.extend(e.take_due_pushes(now, rng.gen_range(1..6), &mut out));
                Ok(())
            }
            73..=87 if !taken.is_empty() => {
                let d = taken.swap_remove(rng.gen_range(0..taken.len()));
                let result = if rng.gen_bool(0.6) {
                    Ok(())
                } else {
                    Err("HTTP 500".to_string())
                };
                e.push_result(
                    d.subscription_id,
                    d.msg_id,
                    d.attempt,
                    result,
                    now,
                    &mut out,
                );
                Ok(())
            }
            88..=93 => {
                let q = pick(&mut rng, &["qa", "qb"]);
                if let Ok(ReceiveOutcome::Messages(ms)) = e.receive(ACCOUNT, q, 3, now, &mut out) {
                    handles.extend(ms.into_iter().map(|m| (q.to_string(), m.receipt_handle)));
                }
                Ok(())
            }
            94..=99 if !handles.is_empty() => {
                let (q, h) = handles.swap_remove(rng.gen_range(0..handles.len()));
                e.delete_message(ACCOUNT, &q, &h, now, &mut out)
            }
            _ => {
                e.tick(now, &mut out);
                Ok(())
            }
        };
        log.append(&mut out);
    }
    (e, log, now)
}

#[test]
fn a_replayed_engine_matches_the_original_with_topics() {
    let mut retained_seen = 0;
    let mut finished_seen = 0;
    for seed in 0..40 {
        let (original, log, now) = drive_topics(seed, 400);
        retained_seen += log
            .iter()
            .filter(|m| matches!(m, Mutation::TopicMessageRetained { .. }))
            .count();
        finished_seen += log
            .iter()
            .filter(|m| matches!(m, Mutation::PushFinished { .. }))
            .count();
        let restored = rebuilt(&log);
        assert_eq!(
            topic_view(&restored),
            topic_view(&original),
            "seed {seed}: topics differ after a replay of {} mutations",
            log.len()
        );
        let later = now + 60_000;
        original.tick(later, &mut Vec::new());
        restored.tick(later, &mut Vec::new());
        assert_eq!(
            view(&restored, later),
            view(&original, later),
            "seed {seed}: queues differ"
        );
        // Publishing still routes the same way.
        let mut a = Vec::new();
        let mut b = Vec::new();
        for t in ["t1", "t2"] {
            let body = [Bytes::from_static(b"after")];
            let tags = ["red".to_string()];
            let x = original.publish(ACCOUNT, t, &body, &tags, Some("a.b"), later, &mut a);
            let y = restored.publish(ACCOUNT, t, &body, &tags, Some("a.b"), later, &mut b);
            assert_eq!(
                x.map(|p| p.matched).map_err(|e| e.code),
                y.map(|p| p.matched).map_err(|e| e.code),
                "seed {seed}: {t} routes differently"
            );
        }
        assert!(
            restored.next_msg_id.load(Ordering::Relaxed)
                >= original.next_msg_id.load(Ordering::Relaxed),
            "seed {seed}: message ids would be reused"
        );
    }
    // The drive exercised what it is about.
    assert!(
        retained_seen > 200 && finished_seen > 100,
        "{retained_seen} {finished_seen}"
    );
}

/// The compact times of a stored message give back exactly what was put in, near the enqueue
/// time (kept relative) and far from it (kept apart), and two messages made from the same
/// values are equal whichever way they got there.
#[test]
fn a_stored_message_keeps_every_time_exactly() {
    let bases: [Millis; 5] = [0, 1, 1_700_000_000_000, u64::MAX / 2, u64::MAX];
    let offsets: [i128; 9] = [
        0,
        1,
        -1,
        i128::from(i32::MAX),
        i128::from(i32::MAX) + 1,
        i128::from(i32::MIN) + 1,
        i128::from(i32::MIN) + 2,
        i128::from(i32::MIN),
        40 * 24 * 3600 * 1000,
    ];
    let mut values = vec![0, 1, u64::MAX];
    for &base in &bases {
        for &offset in &offsets {
            if let Ok(v) = u64::try_from(i128::from(base) + offset) {
                values.push(v);
            }
        }
    }
    let view = |stored: &Stored<()>, extras: &Extras| {
        let r = MessageRef::new(1, stored, extras);
        (
            r.enqueue_time_ms(),
            r.visible_at_ms(),
            r.invisible_until_ms(),
            r.first_dequeue_ms(),
            r.dead_letter().cloned(),
        )
    };
    for &enqueue in &bases {
        for &visible in &values {
            for &until in &[0, enqueue, visible, u64::MAX] {
                let first = until / 2;
                let image = MessageImage {
                    queue_id: 1,
                    msg_id: 1,
                    body: Bytes::new(),
                    enqueue_time_ms: enqueue,
                    visible_at_ms: visible,
                    in_rewind_area: false,
                    dead_letter: None,
                    dequeue_count: 3,
                    first_dequeue_ms: first,
                    invisible_until_ms: until,
                };
                let mut extras = Extras::default();
                let stored = Stored::from_image((), &image, &mut extras);
                assert_eq!(
                    view(&stored, &extras),
                    (enqueue, visible, until, first, None),
                    "{enqueue} {visible} {until}"
                );
                let mut extras2 = Extras::default();
                let mut by_steps = Stored::sent(1, (), enqueue, u64::MAX, &mut extras2);
                by_steps.set_received(1, &mut extras2, 3, first, until);
                by_steps.set_visible_at(1, &mut extras2, visible);
                assert_eq!(by_steps, stored, "{enqueue} {visible} {until}");
                assert_eq!(extras2, extras, "{enqueue} {visible} {until}");
                // Kept apart only when something does not fit.
                let fits = [visible, until, first]
                    .iter()
                    .all(|&t| t == 0 || Rel::of(t, enqueue).is_some());
                assert_eq!(extras.is_empty(), fits, "{enqueue} {visible} {until}");
            }
        }
    }
    let mut extras = Extras::default();
    let mut moved = Stored::sent(1, (), 5, 7, &mut extras);
    moved.set_received(1, &mut extras, 2, 6, u64::MAX);
    assert_eq!(extras.len(), 1);
    // Moving to another queue: what it kept apart stays behind (taken out with it).
    extras.clear();
    let mut target = Extras::default();
    moved.arrive(
        1,
        &mut target,
        9,
        10,
        Some(DeadLetterInfo {
            source_queue: "q".into(),
            reason: crate::model::DeadLetterReason::MaxReceiveCount,
            receive_count: 2,
            dead_lettered_at_ms: 10,
        }),
    );
    assert_eq!(moved.dequeue_count, 0);
    let (_, visible, until, _, dead_letter) = view(&moved, &target);
    assert_eq!((visible, until), (10, 0));
    assert!(dead_letter.is_some());
    moved.arrive(1, &mut target, 11, 11, None);
    assert!(target.is_empty());
    assert_eq!(moved, Stored::sent(1, (), 11, 11, &mut Extras::default()));
}
