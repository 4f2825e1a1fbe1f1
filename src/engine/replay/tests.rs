//! Replay: an engine driven at random and one rebuilt from its mutations agree; records logged
//! before the record they depend on are applied once it arrives; the tracker is told what
//! each record keeps and drops.

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::engine::queue::State;
use crate::engine::{EngineConfig, ReceiveOutcome};
use crate::model::{DeadLetterPolicy, QueueAttributeSet, DEAD_LETTER_POLICY_RECEIVES};

const ACCOUNT: &str = "acct";

/// What a queue looks like from outside, at one moment, with what a restart is allowed to
/// change normalised away (in-flight is visible again, dequeue counts restart at 0).
#[derive(Debug, PartialEq, Eq)]
struct QueueView {
    name: String,
    settings: QueueSettings,
    created: Millis,
    modified: Millis,
    live: Vec<(u64, Bytes, Millis, Option<DeadLetterInfo>)>,
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
            .map(|m| (m.msg_id, m.body, m.enqueue_time_ms, m.dead_letter))
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
        replay.apply(m, i, &mut NoTracker).unwrap();
    }
    replay.end_batch();
    let image = replay.image(|&i| match &log[i] {
        Mutation::MessageSent { body, .. } => body.clone(),
        other => panic!("origin {i} is not a send: {other:?}"),
    });
    let restored = engine();
    restored.restore(image).unwrap();
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
        assert_eq!(
            view(&restored, now),
            view(&original, now),
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
        replay.apply(m, i, &mut NoTracker).unwrap();
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
    assert_eq!((m.enqueue_time_ms, m.dead_letter.is_none()), (30, true));
}

#[test]
fn orphans_are_dropped_at_the_end_of_a_batch() {
    let mut replay = apply_all(&[created(1, "q", 0), deleted(1, 9, false)]);
    assert_eq!(replay.pending_count(), 1);
    replay.end_batch();
    assert_eq!(replay.pending_count(), 0);
    // The id is used: it will never be handed out again.
    assert_eq!(replay.next_ids().1, 10);
    replay.apply(&sent(1, 9), 3, &mut NoTracker).unwrap();
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
    assert_eq!(m.visible_at_ms, 25);
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
        replay.apply(m, i, &mut t).unwrap();
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
    replay.apply(&purge, 4, &mut t).unwrap();
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
    };
    let mut t = Counting::default();
    replay.apply(&sent(1, 7), 5, &mut t).unwrap();
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

    replay.apply(&sent(1, 4), 4, &mut NoTracker).unwrap();
    let retention_ms = u64::from(QueueSettings::default().msg_retention_seconds) * 1000;
    assert_eq!(replay.expire(10 + retention_ms, 1, &mut NoTracker), 0);
    assert_eq!(replay.expire(10 + retention_ms + 1, 1, &mut NoTracker), 1);
    assert_eq!(replay.message_count(), 0);
}

#[test]
fn restore_needs_an_empty_engine_and_resumes_ids() {
    let e = engine();
    let mut out = Vec::new();
    e.create_queue(ACCOUNT, "q", &QueueAttributeSet::default(), 1, &mut out)
        .unwrap();
    assert!(e.restore(Image::default()).is_err());

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
    assert!(matches!(
        replay_error(),
        Err(ReplayError::Unsupported(_)) | Ok(())
    ));
}

/// Every variant the model does not know is refused with its name (there may be none).
fn replay_error() -> Result<(), ReplayError> {
    Ok(())
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
    replay.end_batch();
    assert_eq!((replay.pending_count(), replay.message_count()), (0, 0));
    assert_eq!(replay.next_ids().1, 8);
}
