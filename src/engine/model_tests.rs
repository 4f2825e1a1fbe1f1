//! Model-based test: random sequences of sends, receives, deletes (with fresh or stale
//! handles), visibility changes, releases and clock jumps, run against the engine and against a
//! naive model (a `Vec` of messages scanned linearly), compared after every step.
//!
//! The clock moves only in `Advance` steps, which also call [`Engine::tick`]; the model applies
//! the same transitions at the same moments, in the engine's order (retention first, then due
//! delays, then visibility expiry with the maxReceiveCount dead-letter policy).

use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;

use super::queue::State;
use super::*;
use crate::model::{DeadLetterPolicy, QueueAttributeSet};

const T0: Millis = 1_700_000_000_000;
const ACC: &str = "acct";

#[derive(Debug, Clone)]
enum Op {
    Send {
        count: usize,
        delay_seconds: u32,
    },
    Receive {
        max: usize,
    },
    Delete {
        pick: usize,
    },
    ChangeVisibility {
        pick: usize,
        seconds: u32,
    },
    Release {
        pick: usize,
    },
    Advance {
        ms: u64,
    },
    /// Jump to the model's next deadline (retention, delay or visibility), or 1 ms before it:
    /// random jumps rarely land on a boundary.
    AdvanceToDeadline {
        one_ms_early: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..=3, prop_oneof![3 => Just(0u32), 1 => 1u32..=5])
            .prop_map(|(count, delay_seconds)| Op::Send { count, delay_seconds }),
        4 => (1usize..=4).prop_map(|max| Op::Receive { max }),
        3 => any::<usize>().prop_map(|pick| Op::Delete { pick }),
        1 => (any::<usize>(), prop_oneof![1 => Just(0u32), 2 => 1u32..=60])
            .prop_map(|(pick, seconds)| Op::ChangeVisibility { pick, seconds }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        4 => prop_oneof![
            2 => Just(0u64),
            8 => 0u64..=60_000,
            1 => 60_000u64..=3_600_000,
        ]
        .prop_map(|ms| Op::Advance { ms }),
        2 => any::<bool>().prop_map(|one_ms_early| Op::AdvanceToDeadline { one_ms_early }),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelState {
    Ready,
    Delayed(Millis),
    InFlight(Millis),
}

#[derive(Debug, Clone)]
struct ModelMsg {
    id: u64,
    enqueue: Millis,
    state: ModelState,
    dequeue_count: u32,
    first_dequeue: Millis,
    /// The only handle that may work, while in flight.
    handle: Option<String>,
    body: Bytes,
}

#[derive(Debug, Default)]
struct Model {
    visibility_ms: u64,
    retention_ms: u64,
    max_receive_count: Option<u32>,
    messages: Vec<ModelMsg>,
    acked: BTreeSet<u64>,
    expired: BTreeSet<u64>,
    /// Dead letters: id -> (enqueue time, body length). They keep their enqueue time, so the
    /// dead-letter queue's retention applies to them too.
    dead: HashMap<u64, (Millis, u64)>,
    dead_retention_ms: u64,
}

impl Model {
    /// The engine's advance, the naive way.
    fn observe(&mut self, now: Millis) {
        let retention = self.retention_ms;
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.messages)
            .into_iter()
            .partition(|m| m.enqueue + retention <= now);
        self.expired.extend(gone.iter().map(|m| m.id));
        self.messages = kept;
        let dead_retention = self.dead_retention_ms;
        self.dead.retain(|id, (enqueue, _)| {
            let keep = *enqueue + dead_retention > now;
            if !keep {
                self.expired.insert(*id);
            }
            keep
        });
        for m in &mut self.messages {
            if let ModelState::Delayed(due) = m.state {
                if due <= now {
                    m.state = ModelState::Ready;
                }
            }
        }
        let expired: Vec<u64> = self
            .messages
            .iter()
            .filter(|m| matches!(m.state, ModelState::InFlight(v) if v <= now))
            .map(|m| m.id)
            .collect();
        for id in expired {
            self.back_to_ready(id);
        }
    }

    /// An in-flight message becomes visible, or goes to the dead-letter queue.
    fn back_to_ready(&mut self, id: u64) {
        let Some(pos) = self.messages.iter().position(|m| m.id == id) else {
            return;
        };
        let limit_reached = self
            .max_receive_count
            .is_some_and(|max| self.messages[pos].dequeue_count >= max);
        if limit_reached {
            let m = self.messages.remove(pos);
            self.dead.insert(m.id, (m.enqueue, m.body.len() as u64));
        } else {
            let m = &mut self.messages[pos];
            m.state = ModelState::Ready;
            m.handle = None;
        }
    }

    fn ready_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .messages
            .iter()
            .filter(|m| m.state == ModelState::Ready)
            .map(|m| m.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    fn count(&self, pred: impl Fn(&ModelState) -> bool) -> u64 {
        self.messages.iter().filter(|m| pred(&m.state)).count() as u64
    }

    /// Index of the message a handle would act on, if the handle is valid now.
    fn holder(&self, id: u64, handle: &str, now: Millis) -> Option<usize> {
        self.messages.iter().position(|m| {
            m.id == id
                && matches!(m.state, ModelState::InFlight(v) if now < v)
                && m.handle.as_deref() == Some(handle)
        })
    }

    fn next_deadline(&self) -> Option<Millis> {
        let retention = self
            .messages
            .iter()
            .map(|m| m.enqueue + self.retention_ms)
            .min();
        match (self.next_event(), retention) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn next_event(&self) -> Option<Millis> {
        self.messages
            .iter()
            .filter_map(|m| match m.state {
                ModelState::Delayed(t) | ModelState::InFlight(t) => Some(t),
                ModelState::Ready => None,
            })
            .min()
    }
}

fn run_case(
    visibility_seconds: u32,
    retention_seconds: u32,
    max_receive_count: Option<u32>,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let e = Engine::new(EngineConfig::default());
    let mut out = Vec::new();
    let dlq_attrs = QueueAttributeSet {
        msg_retention_seconds: Some(limits::RETENTION_SECONDS_MAX),
        ..Default::default()
    };
    e.create_queue(ACC, "dlq", &dlq_attrs, T0, &mut out)
        .unwrap();
    let attrs = QueueAttributeSet {
        visibility_timeout_seconds: Some(visibility_seconds),
        msg_retention_seconds: Some(retention_seconds),
        dead_letter_policy: Some(max_receive_count.map(|n| DeadLetterPolicy {
            dead_letter_queue: "dlq".into(),
            policy: 0,
            max_receive_count: n,
            max_time_to_live_seconds: 0,
        })),
        ..Default::default()
    };
    e.create_queue(ACC, "src", &attrs, T0, &mut out).unwrap();

    let mut model = Model {
        visibility_ms: u64::from(visibility_seconds) * 1000,
        retention_ms: u64::from(retention_seconds) * 1000,
        max_receive_count,
        dead_retention_ms: u64::from(limits::RETENTION_SECONDS_MAX) * 1000,
        ..Model::default()
    };
    let mut now = T0;
    let mut handles: Vec<(u64, String)> = Vec::new();
    let mut sent: HashMap<u64, Bytes> = HashMap::new();
    let mut last_id = 0u64;
    let mut body_seq = 0u64;

    for op in ops {
        let mut out = Vec::new();
        match op {
            Op::Send {
                count,
                delay_seconds,
            } => {
                let bodies: Vec<Bytes> = (0..count)
                    .map(|_| {
                        body_seq += 1;
                        Bytes::from(format!("body-{body_seq}"))
                    })
                    .collect();
                let ids = e
                    .send(ACC, "src", &bodies, delay_seconds, now, &mut out)
                    .unwrap();
                prop_assert_eq!(out.len(), count);
                for (id, body) in ids.into_iter().zip(bodies) {
                    prop_assert!(id > last_id, "ids grow with send order");
                    last_id = id;
                    sent.insert(id, body.clone());
                    let state = if delay_seconds == 0 {
                        ModelState::Ready
                    } else {
                        ModelState::Delayed(now + u64::from(delay_seconds) * 1000)
                    };
                    model.messages.push(ModelMsg {
                        id,
                        enqueue: now,
                        state,
                        dequeue_count: 0,
                        first_dequeue: 0,
                        handle: None,
                        body,
                    });
                }
            }
            Op::Receive { max } => {
                let expected: Vec<u64> = model.ready_ids().into_iter().take(max).collect();
                match e.receive(ACC, "src", max, now, &mut out).unwrap() {
                    ReceiveOutcome::Messages(got) => {
                        let ids: Vec<u64> = got.iter().map(|m| m.msg_id).collect();
                        prop_assert_eq!(&ids, &expected);
                        // The one durable change of a receive: each message's count, as the
                        // reply reports it.
                        let logged: Vec<(u64, u32, Millis)> = match out.pop() {
                            Some(Mutation::MessagesReceived {
                                messages, at_ms, ..
                            }) => {
                                prop_assert_eq!(at_ms, now);
                                messages
                                    .iter()
                                    .map(|d| (d.msg_id, d.dequeue_count, d.first_dequeue_ms))
                                    .collect()
                            }
                            other => panic!("a receive logged {other:?}"),
                        };
                        let replied: Vec<(u64, u32, Millis)> = got
                            .iter()
                            .map(|m| (m.msg_id, m.dequeue_count, m.first_dequeue_time_ms))
                            .collect();
                        prop_assert_eq!(logged, replied);
                        for m in got {
                            let mm = model
                                .messages
                                .iter_mut()
                                .find(|x| x.id == m.msg_id)
                                .unwrap();
                            if mm.dequeue_count == 0 {
                                mm.first_dequeue = now;
                            }
                            mm.dequeue_count += 1;
                            mm.state = ModelState::InFlight(now + model.visibility_ms);
                            mm.handle = Some(m.receipt_handle.clone());
                            prop_assert_eq!(m.dequeue_count, mm.dequeue_count);
                            prop_assert_eq!(m.first_dequeue_time_ms, mm.first_dequeue);
                            prop_assert_eq!(&m.body, &mm.body);
                            prop_assert_eq!(m.enqueue_time_ms, mm.enqueue);
                            prop_assert_eq!(m.next_visible_time_ms, now + model.visibility_ms);
                            handles.push((m.msg_id, m.receipt_handle));
                        }
                    }
                    ReceiveOutcome::Empty { next_event_ms, .. } => {
                        prop_assert!(expected.is_empty(), "engine empty, model has {expected:?}");
                        prop_assert_eq!(next_event_ms, model.next_event());
                    }
                }
                prop_assert!(out.is_empty(), "a receive logs its receives only: {out:?}");
            }
            Op::Delete { pick } => {
                if handles.is_empty() {
                    let r = e.delete_message(ACC, "src", "bogus", now, &mut out);
                    prop_assert_eq!(
                        r.err().map(|x| x.code),
                        Some(ErrorCode::RECEIPT_HANDLE_FORMAT)
                    );
                    continue;
                }
                let (id, handle) = handles[pick % handles.len()].clone();
                let valid = model.holder(id, &handle, now);
                let r = e.delete_message(ACC, "src", &handle, now, &mut out);
                match valid {
                    Some(pos) => {
                        prop_assert!(r.is_ok(), "valid delete refused: {r:?}");
                        model.messages.remove(pos);
                        model.acked.insert(id);
                    }
                    None => prop_assert_eq!(
                        r.err().map(|x| x.code),
                        Some(ErrorCode::RECEIPT_HANDLE_INVALID)
                    ),
                }
            }
            Op::ChangeVisibility { pick, seconds } => {
                if handles.is_empty() {
                    continue;
                }
                let (id, handle) = handles[pick % handles.len()].clone();
                let valid = model.holder(id, &handle, now);
                let r = e.change_visibility(ACC, "src", &handle, seconds, now, &mut out);
                match valid {
                    Some(pos) => {
                        let next = if seconds == 0 {
                            now
                        } else {
                            now + u64::from(seconds) * 1000
                        };
                        prop_assert_eq!(r, Ok(next));
                        if seconds == 0 {
                            model.back_to_ready(id);
                        } else {
                            model.messages[pos].state = ModelState::InFlight(next);
                        }
                    }
                    None => prop_assert_eq!(
                        r.err().map(|x| x.code),
                        Some(ErrorCode::RECEIPT_HANDLE_INVALID)
                    ),
                }
            }
            Op::Release { pick } => {
                if handles.is_empty() {
                    continue;
                }
                let (id, handle) = handles[pick % handles.len()].clone();
                let valid = model.holder(id, &handle, now);
                let r = e.release(ACC, "src", &handle, now);
                match valid {
                    Some(pos) => {
                        prop_assert!(r.is_ok(), "valid release refused: {r:?}");
                        let m = &mut model.messages[pos];
                        m.dequeue_count -= 1;
                        if m.dequeue_count == 0 {
                            m.first_dequeue = 0;
                        }
                        m.state = ModelState::Ready;
                        m.handle = None;
                    }
                    None => prop_assert_eq!(
                        r.err().map(|x| x.code),
                        Some(ErrorCode::RECEIPT_HANDLE_INVALID)
                    ),
                }
            }
            Op::Advance { .. } | Op::AdvanceToDeadline { .. } => {
                now = match op {
                    Op::Advance { ms } => now + ms,
                    Op::AdvanceToDeadline { one_ms_early } => {
                        let target = model.next_deadline().unwrap_or(now);
                        now.max(target - u64::from(one_ms_early))
                    }
                    _ => now,
                };
                e.tick(now, &mut out);
                model.observe(now);
                let moved = out
                    .iter()
                    .filter(|m| matches!(m, Mutation::DeadLettered { .. }))
                    .count();
                prop_assert_eq!(moved, out.len(), "tick only dead-letters");
            }
        }
        check(&e, &model, &sent, now)?;
    }
    Ok(())
}

/// Everything the engine says agrees with the model.
fn check(
    e: &Engine,
    model: &Model,
    sent: &HashMap<u64, Bytes>,
    now: Millis,
) -> Result<(), TestCaseError> {
    let mut out = Vec::new();
    let a = e.queue_attributes(ACC, "src", now, &mut out).unwrap();
    prop_assert!(out.is_empty(), "nothing was due: {out:?}");
    prop_assert_eq!(a.active_msg_num, model.count(|s| *s == ModelState::Ready));
    prop_assert_eq!(
        a.inactive_msg_num,
        model.count(|s| matches!(s, ModelState::InFlight(_)))
    );
    prop_assert_eq!(
        a.delay_msg_num,
        model.count(|s| matches!(s, ModelState::Delayed(_)))
    );
    prop_assert_eq!(
        a.min_msg_time_ms,
        model.messages.iter().map(|m| m.enqueue).min().unwrap_or(0)
    );
    let d = e.queue_attributes(ACC, "dlq", now, &mut out).unwrap();
    prop_assert_eq!(d.active_msg_num, model.dead.len() as u64);

    // Message by message: same ids, same states.
    let src = e.lookup(ACC, "src").unwrap();
    let q = src.state.lock();
    q.assert_consistent();
    let engine_view: Vec<(u64, State)> =
        q.snapshot().into_iter().map(|(id, s, _)| (id, s)).collect();
    drop(q);
    let mut model_view: Vec<(u64, State)> = model
        .messages
        .iter()
        .map(|m| {
            let s = match m.state {
                ModelState::Ready => State::Ready,
                ModelState::Delayed(_) => State::Delayed,
                ModelState::InFlight(_) => State::InFlight,
            };
            (m.id, s)
        })
        .collect();
    model_view.sort_unstable_by_key(|&(id, _)| id);
    prop_assert_eq!(engine_view, model_view);
    e.lookup(ACC, "dlq")
        .unwrap()
        .state
        .lock()
        .assert_consistent();

    // Every message sent is in exactly one place; nothing appears that was never sent.
    let present: BTreeSet<u64> = model.messages.iter().map(|m| m.id).collect();
    for id in sent.keys() {
        let places = [
            present.contains(id),
            model.acked.contains(id),
            model.expired.contains(id),
            model.dead.contains_key(id),
        ];
        prop_assert_eq!(places.iter().filter(|&&p| p).count(), 1, "message {}", id);
    }
    prop_assert_eq!(
        sent.len(),
        present.len() + model.acked.len() + model.expired.len() + model.dead.len()
    );
    let cost = |len: u64| crate::engine::bodies::held_cost(len as usize);
    let held: u64 = model
        .messages
        .iter()
        .map(|m| cost(m.body.len() as u64))
        .sum();
    let dead: u64 = model.dead.values().map(|&(_, len)| cost(len)).sum();
    prop_assert_eq!(e.stored_body_bytes(), held + dead);
    Ok(())
}

proptest! {
    // No failure persistence: it would write files outside src/engine; a failure prints its
    // minimal input, which belongs in a named regression test.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn engine_matches_the_naive_model(
        visibility_seconds in 1u32..=60,
        retention_seconds in prop_oneof![60u32..=900, Just(345_600u32)],
        max_receive_count in proptest::option::of(1u32..=3),
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        run_case(visibility_seconds, retention_seconds, max_receive_count, ops)?;
    }
}
