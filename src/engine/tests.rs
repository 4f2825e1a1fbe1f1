//! Unit tests of the engine, each on explicit times: a 12-hour visibility timeout or a 15-day
//! retention takes microseconds to test. One test per rule of CMQ.md A.6 and of the engine's
//! decisions; the model-based test is in `model_tests.rs`.

use super::*;
use crate::model::{
    DeadLetterInfo, DeadLetterPolicy, DeadLetterReason, MessageState, QueueAttributeSet,
    QueueAttributes,
};

const T0: Millis = 1_700_000_000_000;
const ACC: &str = "acct";
const SECOND: Millis = 1000;

/// What bodies of these lengths count against the memory limits while held.
fn held(lens: &[usize]) -> u64 {
    lens.iter().map(|&len| bodies::held_cost(len)).sum()
}

fn engine() -> Engine {
    Engine::new(EngineConfig::default())
}

fn create(e: &Engine, name: &str, attrs: QueueAttributeSet) -> u64 {
    e.create_queue(ACC, name, &attrs, T0, &mut Vec::new())
        .unwrap()
}

fn send(e: &Engine, q: &str, body: &str, delay: u32, now: Millis) -> u64 {
    e.send(
        ACC,
        q,
        &[Bytes::from(body.to_owned())],
        delay,
        now,
        &mut Vec::new(),
    )
    .unwrap()[0]
}

fn recv(e: &Engine, q: &str, max: usize, now: Millis) -> Vec<ReceivedMessage> {
    match e.receive(ACC, q, max, now, &mut Vec::new()).unwrap() {
        ReceiveOutcome::Messages(m) => {
            assert!(!m.is_empty());
            m
        }
        ReceiveOutcome::Empty { .. } => Vec::new(),
    }
}

fn recv_one(e: &Engine, q: &str, now: Millis) -> ReceivedMessage {
    let mut got = recv(e, q, 1, now);
    assert_eq!(got.len(), 1, "expected one message at {now}");
    got.remove(0)
}

fn next_event(e: &Engine, q: &str, now: Millis) -> Option<Millis> {
    match e.receive(ACC, q, 1, now, &mut Vec::new()).unwrap() {
        ReceiveOutcome::Empty { next_event_ms, .. } => next_event_ms,
        ReceiveOutcome::Messages(m) => panic!("expected nothing, got {m:?}"),
    }
}

fn del(e: &Engine, q: &str, handle: &str, now: Millis) -> Result<(), CmqError> {
    e.delete_message(ACC, q, handle, now, &mut Vec::new())
}

fn attrs(e: &Engine, q: &str, now: Millis) -> QueueAttributes {
    e.queue_attributes(ACC, q, now, &mut Vec::new()).unwrap()
}

fn code<T: fmt::Debug>(result: Result<T, CmqError>) -> ErrorCode {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code,
    }
}

fn set(e: &Engine, q: &str, changes: QueueAttributeSet, now: Millis) -> Result<(), CmqError> {
    e.set_queue_attributes(ACC, q, &changes, now, &mut Vec::new())
}

fn policy(dlq: &str, kind: u8, count: u32, ttl: u32) -> QueueAttributeSet {
    QueueAttributeSet {
        dead_letter_policy: Some(Some(DeadLetterPolicy {
            dead_letter_queue: dlq.into(),
            policy: kind,
            max_receive_count: count,
            max_time_to_live_seconds: ttl,
        })),
        ..Default::default()
    }
}

fn consistent(e: &Engine) {
    // Collect first: never lock a queue while holding a map guard.
    let cells: Vec<Arc<QueueCell>> = e.by_id.iter().map(|r| Arc::clone(r.value())).collect();
    for cell in cells {
        cell.state.lock().assert_consistent();
    }
}

#[derive(Debug, Default)]
struct Recorder(parking_lot::Mutex<Vec<u64>>);

impl ReadyListener for Recorder {
    fn on_ready(&self, queue_id: u64) {
        self.0.lock().push(queue_id);
    }
}

impl Recorder {
    fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.0.lock())
    }
}

// ------------------------------------------------------------------------------------------
// Names, accounts, listing
// ------------------------------------------------------------------------------------------

#[test]
fn queue_name_rules() {
    let max = format!("a{}", "b".repeat(63));
    for good in ["a", "Z", "a-1", "queue-Name-9", max.as_str()] {
        assert!(Engine::validate_queue_name(good).is_ok(), "{good}");
    }
    let long = format!("a{}", "b".repeat(64));
    for bad in [
        "",
        "1abc",
        "-abc",
        "a_b",
        "a b",
        "a.b",
        "é",
        "aé",
        long.as_str(),
    ] {
        assert_eq!(
            code(Engine::validate_queue_name(bad)),
            ErrorCode::QUEUE_NAME_FORMAT,
            "{bad:?}"
        );
        assert_eq!(
            code(e_create(&engine(), ACC, bad)),
            ErrorCode::QUEUE_NAME_FORMAT
        );
    }
}

fn e_create(e: &Engine, account: &str, name: &str) -> Result<u64, CmqError> {
    e.create_queue(
        account,
        name,
        &QueueAttributeSet::default(),
        T0,
        &mut Vec::new(),
    )
}

#[test]
fn names_are_unique_case_insensitively_and_reported_as_created() {
    let e = engine();
    let id = e_create(&e, ACC, "Orders").unwrap();
    assert_eq!(code(e_create(&e, ACC, "orders")), ErrorCode::ALREADY_EXISTS);
    assert_eq!(code(e_create(&e, ACC, "ORDERS")), ErrorCode::ALREADY_EXISTS);
    // Any spelling finds it; the name as created is what is reported.
    let a = attrs(&e, "oRdErS", T0);
    assert_eq!(a.queue_name, "Orders");
    assert_eq!(a.queue_id, id);
    let (_, page) = e.list_queues(ACC, "", 0, 0).unwrap();
    assert_eq!(page[0].queue_name, "Orders");
}

#[test]
fn accounts_are_isolated() {
    let e = engine();
    let a = e_create(&e, "alice", "jobs").unwrap();
    let b = e_create(&e, "bob", "jobs").unwrap();
    assert_ne!(a, b);
    e_create(&e, "bob", "other").unwrap();
    e.send(
        "alice",
        "jobs",
        &[Bytes::from_static(b"x")],
        0,
        T0,
        &mut Vec::new(),
    )
    .unwrap();
    let (total, page) = e.list_queues("alice", "", 0, 0).unwrap();
    assert_eq!(total, 1);
    assert_eq!(page[0].queue_id, a);
    let (total, _) = e.list_queues("bob", "", 0, 0).unwrap();
    assert_eq!(total, 2);
    assert_eq!(e.list_queues("carol", "", 0, 0).unwrap().0, 0);
    // Bob's jobs queue is empty; alice's message is not visible to him.
    let bob = e
        .queue_attributes("bob", "jobs", T0, &mut Vec::new())
        .unwrap();
    assert_eq!(bob.active_msg_num, 0);
    assert_eq!(
        code(e.receive("carol", "jobs", 1, T0, &mut Vec::new())),
        ErrorCode::QUEUE_NOT_FOUND
    );
    // Dead-letter queues must be in the same account.
    assert_eq!(
        code(e.create_queue(
            "carol",
            "src",
            &policy("jobs", 0, 1, 0),
            T0,
            &mut Vec::new()
        )),
        ErrorCode::QUEUE_NOT_FOUND
    );
}

#[test]
fn per_account_queue_cap() {
    let e = Engine::new(EngineConfig {
        queues_per_account_max: 2,
        ..EngineConfig::default()
    });
    e_create(&e, ACC, "a").unwrap();
    e_create(&e, ACC, "b").unwrap();
    assert_eq!(code(e_create(&e, ACC, "c")), ErrorCode::TOO_MANY_QUEUES);
    // Another account has its own quota.
    e_create(&e, "other", "c").unwrap();
    e.delete_queue(ACC, "a", T0, &mut Vec::new()).unwrap();
    e_create(&e, ACC, "c").unwrap();
    assert_eq!(e.queue_count(), 3);
}

#[test]
fn list_paging_and_search() {
    let e = engine();
    for i in 0..25 {
        e_create(&e, ACC, &format!("q{i:02}")).unwrap();
    }
    e_create(&e, ACC, "Special-Queue").unwrap();
    let (total, page) = e.list_queues(ACC, "", 0, 0).unwrap();
    assert_eq!(total, 26);
    assert_eq!(page.len(), limits::LIST_LIMIT_DEFAULT as usize);
    assert_eq!(page[0].queue_name, "q00");
    let (total, page) = e.list_queues(ACC, "", 20, 10).unwrap();
    assert_eq!(total, 26);
    let names: Vec<_> = page.iter().map(|q| q.queue_name.as_str()).collect();
    assert_eq!(names, ["q20", "q21", "q22", "q23", "q24", "Special-Queue"]);
    let (total, page) = e.list_queues(ACC, "", 100, 10).unwrap();
    assert_eq!((total, page.len()), (26, 0));
    let (total, page) = e.list_queues(ACC, "SPECIAL", 0, 0).unwrap();
    assert_eq!(total, 1);
    assert_eq!(page[0].queue_name, "Special-Queue");
    let (total, page) = e.list_queues(ACC, "q1", 0, 3).unwrap();
    assert_eq!(total, 10);
    assert_eq!(page.len(), 3);
    assert!(e.list_queues(ACC, "", 0, limits::LIST_LIMIT_MAX).is_ok());
    assert_eq!(
        code(e.list_queues(ACC, "", 0, limits::LIST_LIMIT_MAX + 1)),
        ErrorCode::OUT_OF_RANGE
    );
}

#[test]
fn created_queue_has_defaults_and_attribute_errors_are_reported() {
    let e = engine();
    let mut out = Vec::new();
    e.create_queue(ACC, "q", &QueueAttributeSet::default(), T0, &mut out)
        .unwrap();
    let a = attrs(&e, "q", T0 + 5);
    assert_eq!(a.max_msg_heap_num, limits::HEAP_COUNT_DEFAULT);
    assert_eq!(a.polling_wait_seconds, 0);
    assert_eq!(a.visibility_timeout_seconds, 30);
    assert_eq!(a.max_msg_size_bytes, 65_536);
    assert_eq!(a.msg_retention_seconds, 345_600);
    assert_eq!(a.rewind_seconds, 0);
    assert_eq!(a.create_time_ms, T0);
    assert_eq!(a.last_modify_time_ms, T0);
    assert_eq!(a.max_delay_seconds, limits::DELAY_SECONDS_DEFAULT_MAX);
    assert_eq!(a.min_msg_time_ms, 0);
    assert!(matches!(
        &out[..],
        [Mutation::QueueCreated { queue_id, name, settings, created_at_ms: T0, .. }]
            if *queue_id == a.queue_id && &**name == "q" && *settings == QueueSettings::default()
    ));
    // Attribute edges through the engine (settings.rs tests every range edge).
    let bad = QueueAttributeSet {
        visibility_timeout_seconds: Some(43_201),
        ..Default::default()
    };
    assert_eq!(
        code(e.create_queue(ACC, "q2", &bad, T0, &mut Vec::new())),
        ErrorCode::OUT_OF_RANGE
    );
    let bad = QueueAttributeSet {
        rewind_seconds: Some(120),
        msg_retention_seconds: Some(60),
        ..Default::default()
    };
    assert_eq!(
        code(e.create_queue(ACC, "q2", &bad, T0, &mut Vec::new())),
        ErrorCode::REWIND_OVER_RETENTION
    );
    assert_eq!(e.queue_count(), 1);
}

#[test]
fn set_attributes_updates_last_modify_time_and_emits_full_settings() {
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    let mut out = Vec::new();
    let changes = QueueAttributeSet {
        visibility_timeout_seconds: Some(43_200),
        polling_wait_seconds: Some(30),
        ..Default::default()
    };
    e.set_queue_attributes(ACC, "Q", &changes, T0 + 7, &mut out)
        .unwrap();
    let a = attrs(&e, "q", T0 + 8);
    assert_eq!(a.visibility_timeout_seconds, 43_200);
    assert_eq!(a.polling_wait_seconds, 30);
    assert_eq!(a.last_modify_time_ms, T0 + 7);
    assert_eq!(a.create_time_ms, T0);
    let expected = QueueSettings {
        visibility_timeout_seconds: 43_200,
        polling_wait_seconds: 30,
        ..QueueSettings::default()
    };
    assert!(matches!(
        &out[..],
        [Mutation::QueueAttributesSet { settings, modified_at_ms, .. }]
            if *settings == expected && *modified_at_ms == T0 + 7
    ));
    // A failed change changes nothing.
    let bad = QueueAttributeSet {
        polling_wait_seconds: Some(31),
        visibility_timeout_seconds: Some(10),
        ..Default::default()
    };
    assert_eq!(code(set(&e, "q", bad, T0 + 9)), ErrorCode::OUT_OF_RANGE);
    let a = attrs(&e, "q", T0 + 10);
    assert_eq!(a.visibility_timeout_seconds, 43_200);
    assert_eq!(a.last_modify_time_ms, T0 + 7);
    assert_eq!(
        code(set(&e, "missing", QueueAttributeSet::default(), T0)),
        ErrorCode::QUEUE_NOT_FOUND
    );
}

// ------------------------------------------------------------------------------------------
// Send and receive
// ------------------------------------------------------------------------------------------

#[test]
fn send_receive_delete_fields_and_mutations() {
    let e = engine();
    let qid = create(&e, "q", QueueAttributeSet::default());
    let mut out = Vec::new();
    let ids = e
        .send(
            ACC,
            "q",
            &[Bytes::from_static(b"one"), Bytes::from_static(b"two")],
            0,
            T0 + 1,
            &mut out,
        )
        .unwrap();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] < ids[1]);
    assert!(matches!(
        &out[0],
        Mutation::MessageSent { queue_id, msg_id, body, enqueue_time_ms, visible_at_ms, .. }
            if *queue_id == qid && *msg_id == ids[0] && body == "one"
                && *enqueue_time_ms == T0 + 1 && *visible_at_ms == T0 + 1
    ));
    assert_eq!(e.stored_body_bytes(), held(&[3, 3]));
    let a = attrs(&e, "q", T0 + 2);
    assert_eq!((a.active_msg_num, a.min_msg_time_ms), (2, T0 + 1));

    let got = recv(&e, "q", 16, T0 + 10);
    assert_eq!(got.iter().map(|m| m.msg_id).collect::<Vec<_>>(), ids);
    let m = &got[0];
    assert_eq!(m.body, "one");
    assert_eq!(m.enqueue_time_ms, T0 + 1);
    assert_eq!(m.first_dequeue_time_ms, T0 + 10);
    assert_eq!(m.next_visible_time_ms, T0 + 10 + 30 * SECOND);
    assert_eq!(m.dequeue_count, 1);
    assert_eq!(m.dead_letter, None);
    assert_eq!(m.receipt_handle.len(), RECEIPT_HANDLE_CHARS);
    let a = attrs(&e, "q", T0 + 11);
    assert_eq!((a.active_msg_num, a.inactive_msg_num), (0, 2));

    let mut out = Vec::new();
    e.delete_message(ACC, "q", &m.receipt_handle, T0 + 12, &mut out)
        .unwrap();
    assert!(matches!(
        &out[..],
        [Mutation::MessageDeleted { msg_id, at_ms, to_rewind_area: false, .. }]
            if *msg_id == ids[0] && *at_ms == T0 + 12
    ));
    assert_eq!(e.stored_body_bytes(), held(&[3]));
    let a = attrs(&e, "q", T0 + 13);
    assert_eq!((a.inactive_msg_num, a.rewind_msg_num), (1, 0));
    consistent(&e);
}

#[test]
fn receive_is_lowest_id_first_and_expired_messages_return_to_their_place() {
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    let ids: Vec<u64> = (0..4)
        .map(|i| send(&e, "q", &format!("m{i}"), 0, T0))
        .collect();
    let first = recv_one(&e, "q", T0);
    assert_eq!(first.msg_id, ids[0]);
    let second = recv_one(&e, "q", T0 + 1);
    assert_eq!(second.msg_id, ids[1]);
    // The first expires: it goes back before ids[2] and ids[3].
    let at = T0 + 30 * SECOND;
    let got = recv(&e, "q", 16, at);
    assert_eq!(
        got.iter().map(|m| m.msg_id).collect::<Vec<_>>(),
        vec![ids[0], ids[2], ids[3]]
    );
    assert_eq!(got[0].dequeue_count, 2);
    assert_eq!(got[0].first_dequeue_time_ms, T0);
}

#[test]
fn ids_are_unique_across_queues_and_grow_with_send_order() {
    let e = engine();
    create(&e, "a", QueueAttributeSet::default());
    create(&e, "b", QueueAttributeSet::default());
    let mut seen = Vec::new();
    for i in 0..10 {
        seen.push(send(&e, if i % 2 == 0 { "a" } else { "b" }, "x", 0, T0));
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, seen);
}

#[test]
fn visibility_timeout_of_twelve_hours_expires_exactly_at_the_boundary() {
    let e = engine();
    create(
        &e,
        "q",
        QueueAttributeSet {
            visibility_timeout_seconds: Some(43_200),
            ..Default::default()
        },
    );
    let id = send(&e, "q", "x", 0, T0);
    let other = send(&e, "q", "y", 0, T0);
    let got = recv(&e, "q", 2, T0);
    let deadline = T0 + 43_200 * SECOND;
    assert_eq!(got[0].next_visible_time_ms, deadline);
    // One millisecond before: still invisible, and the handle still deletes.
    assert_eq!(next_event(&e, "q", deadline - 1), Some(deadline));
    del(&e, "q", &got[1].receipt_handle, deadline - 1).unwrap();
    assert_eq!(got[1].msg_id, other);
    // At the deadline: visible again, and the old handle is dead.
    let again = recv_one(&e, "q", deadline);
    assert_eq!(again.msg_id, id);
    assert_eq!(again.dequeue_count, 2);
    assert_ne!(again.receipt_handle, got[0].receipt_handle);
    assert_eq!(
        code(del(&e, "q", &got[0].receipt_handle, deadline)),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
    del(&e, "q", &again.receipt_handle, deadline).unwrap();
}

#[test]
fn handle_expires_at_the_deadline_even_without_a_redelivery() {
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    send(&e, "q", "x", 0, T0);
    let m = recv_one(&e, "q", T0);
    assert_eq!(
        code(del(&e, "q", &m.receipt_handle, m.next_visible_time_ms)),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
}

#[test]
fn retention_of_fifteen_days() {
    let e = engine();
    create(
        &e,
        "q",
        QueueAttributeSet {
            msg_retention_seconds: Some(1_296_000),
            ..Default::default()
        },
    );
    send(&e, "q", "ready", 0, T0);
    send(&e, "q", "flight", 0, T0);
    send(&e, "q", "later", 0, T0 + 1);
    recv(&e, "q", 1, T0); // "ready" in flight for 30 s; it comes back
    let end = T0 + 1_296_000 * SECOND;
    let a = attrs(&e, "q", end - 1);
    assert_eq!(a.active_msg_num, 3);
    assert_eq!(a.min_msg_time_ms, T0);
    let a = attrs(&e, "q", end);
    assert_eq!(a.active_msg_num, 1);
    assert_eq!(a.min_msg_time_ms, T0 + 1);
    assert_eq!(e.stored_body_bytes(), held(&[5]));
    let a = attrs(&e, "q", end + 1);
    assert_eq!((a.active_msg_num, a.min_msg_time_ms), (0, 0));
    assert_eq!(e.stored_body_bytes(), 0);
}

#[test]
fn retention_removes_in_flight_messages_and_their_handles() {
    let e = engine();
    create(
        &e,
        "q",
        QueueAttributeSet {
            msg_retention_seconds: Some(60),
            visibility_timeout_seconds: Some(3_600),
            ..Default::default()
        },
    );
    send(&e, "q", "x", 0, T0);
    let m = recv_one(&e, "q", T0);
    assert_eq!(
        code(del(&e, "q", &m.receipt_handle, T0 + 60 * SECOND)),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
    assert_eq!(attrs(&e, "q", T0 + 60 * SECOND).inactive_msg_num, 0);
}

#[test]
fn delays_are_due_exactly_at_the_boundary_and_bounded() {
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    let id = send(&e, "q", "x", 10, T0);
    let a = attrs(&e, "q", T0);
    assert_eq!((a.active_msg_num, a.delay_msg_num), (0, 1));
    assert_eq!(a.min_msg_time_ms, T0);
    assert_eq!(
        next_event(&e, "q", T0 + 10 * SECOND - 1),
        Some(T0 + 10 * SECOND)
    );
    assert_eq!(recv_one(&e, "q", T0 + 10 * SECOND).msg_id, id);
    // The delay ceiling is the engine's configuration.
    assert!(e
        .send(
            ACC,
            "q",
            &[Bytes::from_static(b"x")],
            3_600,
            T0,
            &mut Vec::new()
        )
        .is_ok());
    assert_eq!(
        code(e.send(
            ACC,
            "q",
            &[Bytes::from_static(b"x")],
            3_601,
            T0,
            &mut Vec::new()
        )),
        ErrorCode::DELAY_OUT_OF_RANGE
    );
    let e = Engine::new(EngineConfig {
        delay_seconds_max: 86_400,
        ..EngineConfig::default()
    });
    create(&e, "q", QueueAttributeSet::default());
    assert!(e
        .send(
            ACC,
            "q",
            &[Bytes::from_static(b"x")],
            86_400,
            T0,
            &mut Vec::new()
        )
        .is_ok());
    assert_eq!(attrs(&e, "q", T0).max_delay_seconds, 86_400);
}

#[test]
fn empty_receive_reports_the_next_event() {
    let e = engine();
    let qid = create(
        &e,
        "q",
        QueueAttributeSet {
            polling_wait_seconds: Some(20),
            ..Default::default()
        },
    );
    assert_eq!(
        e.receive(ACC, "q", 1, T0, &mut Vec::new()).unwrap(),
        ReceiveOutcome::Empty {
            queue_id: qid,
            polling_wait_seconds: 20,
            next_event_ms: None
        }
    );
    send(&e, "q", "x", 0, T0);
    recv_one(&e, "q", T0 + 5); // visible again at T0 + 30.005 s
    assert_eq!(next_event(&e, "q", T0 + 6), Some(T0 + 5 + 30 * SECOND));
    send(&e, "q", "y", 20, T0 + 6); // due at T0 + 20.006 s: earlier
    assert_eq!(next_event(&e, "q", T0 + 7), Some(T0 + 6 + 20 * SECOND));
}

#[test]
fn receipt_handles_die_on_redelivery_and_first_delete_wins() {
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    send(&e, "q", "x", 0, T0);
    let first = recv_one(&e, "q", T0);
    let second = recv_one(&e, "q", T0 + 30 * SECOND);
    assert_eq!(first.msg_id, second.msg_id);
    assert_eq!(
        code(del(&e, "q", &first.receipt_handle, T0 + 30 * SECOND)),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
    del(&e, "q", &second.receipt_handle, T0 + 31 * SECOND).unwrap();
    assert_eq!(
        code(del(&e, "q", &second.receipt_handle, T0 + 31 * SECOND)),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
    assert_eq!(
        code(del(&e, "q", "not-a-handle", T0)),
        ErrorCode::RECEIPT_HANDLE_FORMAT
    );
    // A well-formed handle of a message that never existed.
    let forged = ReceiptHandle::new(999, 999).encode();
    assert_eq!(
        code(del(&e, "q", &forged, T0)),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
    // A handle of another queue's message does not work here.
    create(&e, "other", QueueAttributeSet::default());
    send(&e, "other", "z", 0, T0);
    let theirs = recv_one(&e, "other", T0);
    assert_eq!(
        code(del(&e, "q", &theirs.receipt_handle, T0)),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
    assert_eq!(
        code(del(&e, "missing", &theirs.receipt_handle, T0)),
        ErrorCode::QUEUE_NOT_FOUND
    );
}

#[test]
fn queue_full_at_max_msg_heap_num() {
    let e = engine();
    create(
        &e,
        "q",
        QueueAttributeSet {
            max_msg_heap_num: Some(limits::HEAP_COUNT_MIN),
            ..Default::default()
        },
    );
    let batch: Vec<Bytes> = (0..10).map(|_| Bytes::from_static(b"x")).collect();
    for _ in 0..99 {
        e.send(ACC, "q", &batch, 0, T0, &mut Vec::new()).unwrap();
    }
    // 990 stored: a batch of 11 would make 1001, so none of it goes in.
    let eleven: Vec<Bytes> = (0..11).map(|_| Bytes::from_static(b"x")).collect();
    assert_eq!(
        code(e.send(ACC, "q", &eleven, 0, T0, &mut Vec::new())),
        ErrorCode::QUEUE_FULL
    );
    assert_eq!(attrs(&e, "q", T0).active_msg_num, 990);
    e.send(ACC, "q", &batch, 0, T0, &mut Vec::new()).unwrap();
    assert_eq!(
        code(e.send(ACC, "q", &batch[..1], 0, T0, &mut Vec::new())),
        ErrorCode::QUEUE_FULL
    );
    // In-flight and delayed messages count; deleted ones do not.
    let m = recv_one(&e, "q", T0);
    assert_eq!(
        code(e.send(ACC, "q", &batch[..1], 0, T0, &mut Vec::new())),
        ErrorCode::QUEUE_FULL
    );
    del(&e, "q", &m.receipt_handle, T0).unwrap();
    e.send(ACC, "q", &batch[..1], 5, T0, &mut Vec::new())
        .unwrap();
    assert_eq!(
        code(e.send(ACC, "q", &batch[..1], 0, T0, &mut Vec::new())),
        ErrorCode::QUEUE_FULL
    );
}

#[test]
fn batch_and_body_limits() {
    let e = engine();
    create(
        &e,
        "q",
        QueueAttributeSet {
            max_msg_size_bytes: Some(1024),
            ..Default::default()
        },
    );
    let x = Bytes::from_static(b"x");
    let mut out = Vec::new();
    assert_eq!(
        code(e.send(ACC, "q", &[], 0, T0, &mut out)),
        ErrorCode::BATCH_SIZE
    );
    let seventeen = vec![x.clone(); 17];
    assert_eq!(
        code(e.send(ACC, "q", &seventeen, 0, T0, &mut out)),
        ErrorCode::BATCH_SIZE
    );
    assert_eq!(
        e.send(ACC, "q", &seventeen[..16], 0, T0, &mut out)
            .unwrap()
            .len(),
        16
    );
    // An empty body anywhere fails the whole batch.
    assert_eq!(
        code(e.send(ACC, "q", &[x.clone(), Bytes::new()], 0, T0, &mut out)),
        ErrorCode::EMPTY_BODY
    );
    // maxMsgSize is inclusive.
    let max = Bytes::from(vec![b'a'; 1024]);
    let over = Bytes::from(vec![b'a'; 1025]);
    assert!(e.send(ACC, "q", &[max], 0, T0, &mut out).is_ok());
    assert_eq!(
        code(e.send(ACC, "q", &[x.clone(), over], 0, T0, &mut out)),
        ErrorCode::MESSAGE_TOO_LARGE
    );
    assert_eq!(attrs(&e, "q", T0).active_msg_num, 17);
    assert_eq!(out.len(), 17);

    assert_eq!(
        code(e.receive(ACC, "q", 0, T0, &mut out)),
        ErrorCode::BATCH_SIZE
    );
    assert_eq!(
        code(e.receive(ACC, "q", 17, T0, &mut out)),
        ErrorCode::BATCH_SIZE
    );
    let got = recv(&e, "q", 16, T0);
    assert_eq!(got.len(), 16);
    assert_eq!(
        code(e.batch_delete(ACC, "q", &[], T0, &mut out)),
        ErrorCode::BATCH_SIZE
    );
    let handles: Vec<String> = got.iter().map(|m| m.receipt_handle.clone()).collect();
    let mut too_many = handles.clone();
    too_many.push(handles[0].clone());
    assert_eq!(
        code(e.batch_delete(ACC, "q", &too_many, T0, &mut out)),
        ErrorCode::BATCH_SIZE
    );
    assert_eq!(
        code(e.peek(ACC, "q", 0, T0, &mut out)),
        ErrorCode::BATCH_SIZE
    );
    assert_eq!(
        code(e.peek(ACC, "q", limits::PEEK_COUNT_MAX + 1, T0, &mut out)),
        ErrorCode::BATCH_SIZE
    );
    assert_eq!(
        code(e.send(ACC, "missing", &[x], 0, T0, &mut out)),
        ErrorCode::QUEUE_NOT_FOUND
    );
}

#[test]
fn batch_delete_reports_each_failure() {
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    for _ in 0..3 {
        send(&e, "q", "x", 0, T0);
    }
    let got = recv(&e, "q", 3, T0);
    let handles = vec![
        got[0].receipt_handle.clone(),
        "garbage".to_owned(),
        got[1].receipt_handle.clone(),
        got[0].receipt_handle.clone(), // already deleted by the first entry
    ];
    let mut out = Vec::new();
    let failures = e
        .batch_delete(ACC, "q", &handles, T0 + 1, &mut out)
        .unwrap();
    let codes: Vec<_> = failures
        .iter()
        .map(|f| (f.receipt_handle.as_str(), f.code))
        .collect();
    assert_eq!(
        codes,
        vec![
            ("garbage", ErrorCode::RECEIPT_HANDLE_FORMAT),
            (handles[0].as_str(), ErrorCode::RECEIPT_HANDLE_INVALID),
        ]
    );
    assert_eq!(out.len(), 2);
    let a = attrs(&e, "q", T0 + 2);
    assert_eq!(a.inactive_msg_num, 1);
    assert!(e
        .batch_delete(ACC, "q", &[got[2].receipt_handle.clone()], T0 + 3, &mut out)
        .unwrap()
        .is_empty());
}

// ------------------------------------------------------------------------------------------
// Visibility, release, peek, purge
// ------------------------------------------------------------------------------------------

#[test]
fn change_visibility_extends_shortens_and_releases() {
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    let id = send(&e, "q", "x", 0, T0);
    let m = recv_one(&e, "q", T0);
    // Extend past the original 30 s: the handle stays valid.
    let next = e
        .change_visibility(
            ACC,
            "q",
            &m.receipt_handle,
            100,
            T0 + 10 * SECOND,
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!(next, T0 + 110 * SECOND);
    assert_eq!(next_event(&e, "q", T0 + 40 * SECOND), Some(next));
    del(&e, "q", &m.receipt_handle, T0 + 109 * SECOND).ok();
    // (deleted above; start again with a fresh message)
    let id2 = send(&e, "q", "y", 0, T0 + 110 * SECOND);
    assert_ne!(id, id2);
    let m = recv_one(&e, "q", T0 + 110 * SECOND);
    // Shorten.
    let next = e
        .change_visibility(
            ACC,
            "q",
            &m.receipt_handle,
            1,
            T0 + 111 * SECOND,
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!(next, T0 + 112 * SECOND);
    assert_eq!(recv_one(&e, "q", next).msg_id, id2);
    let m = recv_one(&e, "q", T0 + 200 * SECOND);
    // Zero: visible at once, handle dead.
    let now = T0 + 201 * SECOND;
    assert_eq!(
        e.change_visibility(ACC, "q", &m.receipt_handle, 0, now, &mut Vec::new())
            .unwrap(),
        now
    );
    assert_eq!(
        code(del(&e, "q", &m.receipt_handle, now)),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
    let again = recv_one(&e, "q", now);
    assert_eq!(again.msg_id, id2);
    assert_eq!(
        code(e.change_visibility(
            ACC,
            "q",
            &again.receipt_handle,
            43_201,
            now,
            &mut Vec::new()
        )),
        ErrorCode::OUT_OF_RANGE
    );
    assert!(e
        .change_visibility(
            ACC,
            "q",
            &again.receipt_handle,
            43_200,
            now,
            &mut Vec::new()
        )
        .is_ok());
    assert_eq!(
        code(e.change_visibility(ACC, "q", &m.receipt_handle, 5, now, &mut Vec::new())),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
    assert_eq!(
        code(e.change_visibility(ACC, "q", "zz", 5, now, &mut Vec::new())),
        ErrorCode::RECEIPT_HANDLE_FORMAT
    );
    consistent(&e);
}

#[test]
fn release_undoes_the_receive() {
    let recorder = Arc::new(Recorder::default());
    let e = Engine::with_listener(EngineConfig::default(), recorder.clone());
    let qid = create(&e, "q", QueueAttributeSet::default());
    let id = send(&e, "q", "x", 0, T0);
    recorder.take();
    let m = recv_one(&e, "q", T0 + 1);
    e.release(ACC, "q", &m.receipt_handle, T0 + 2).unwrap();
    assert_eq!(recorder.take(), vec![qid]);
    assert_eq!(
        code(del(&e, "q", &m.receipt_handle, T0 + 2)),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
    let peeked = e.peek(ACC, "q", 1, T0 + 2, &mut Vec::new()).unwrap();
    assert_eq!(peeked[0].dequeue_count, 0);
    assert_eq!(peeked[0].state, MessageState::Active);
    let again = recv_one(&e, "q", T0 + 3);
    assert_eq!(again.msg_id, id);
    assert_eq!(again.dequeue_count, 1);
    assert_eq!(again.first_dequeue_time_ms, T0 + 3);
    // Releasing a second receive keeps the first dequeue time.
    e.change_visibility(ACC, "q", &again.receipt_handle, 0, T0 + 4, &mut Vec::new())
        .unwrap();
    let third = recv_one(&e, "q", T0 + 5);
    assert_eq!(third.dequeue_count, 2);
    e.release(ACC, "q", &third.receipt_handle, T0 + 6).unwrap();
    let fourth = recv_one(&e, "q", T0 + 7);
    assert_eq!(fourth.dequeue_count, 2);
    assert_eq!(fourth.first_dequeue_time_ms, T0 + 3);
    assert_eq!(
        code(e.release(ACC, "q", &third.receipt_handle, T0 + 8)),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
    assert_eq!(
        code(e.release(ACC, "q", "x", T0 + 8)),
        ErrorCode::RECEIPT_HANDLE_FORMAT
    );
}

#[test]
fn peek_changes_nothing() {
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    let a = send(&e, "q", "a", 0, T0);
    let b = send(&e, "q", "b", 60, T0 + 1);
    let c = send(&e, "q", "c", 0, T0 + 2);
    let held = recv_one(&e, "q", T0 + 3);
    assert_eq!(held.msg_id, a);
    let before = attrs(&e, "q", T0 + 4);
    let mut out = Vec::new();
    let peeked = e.peek(ACC, "q", 16, T0 + 4, &mut out).unwrap();
    assert!(out.is_empty());
    let view: Vec<_> = peeked
        .iter()
        .map(|p| (p.msg_id, p.state, p.dequeue_count, p.visible_time_ms))
        .collect();
    assert_eq!(
        view,
        vec![
            (a, MessageState::Inactive, 1, T0 + 3 + 30 * SECOND),
            (b, MessageState::Delayed, 0, T0 + 1 + 60 * SECOND),
            (c, MessageState::Active, 0, T0 + 2),
        ]
    );
    assert_eq!(e.peek(ACC, "q", 2, T0 + 4, &mut out).unwrap().len(), 2);
    assert_eq!(attrs(&e, "q", T0 + 4), before);
    // The handle still works and the next receive is unaffected by the peek.
    assert_eq!(recv_one(&e, "q", T0 + 5).msg_id, c);
    del(&e, "q", &held.receipt_handle, T0 + 5).unwrap();
}

#[test]
fn purge_removes_everything_including_the_rewind_area() {
    let e = engine();
    create(
        &e,
        "q",
        QueueAttributeSet {
            rewind_seconds: Some(600),
            ..Default::default()
        },
    );
    send(&e, "q", "ready", 0, T0);
    send(&e, "q", "delayed", 100, T0);
    send(&e, "q", "flight", 0, T0);
    send(&e, "q", "deleted", 0, T0);
    let got = recv(&e, "q", 16, T0);
    assert_eq!(got.len(), 3);
    del(&e, "q", &got[2].receipt_handle, T0).unwrap();
    e.release(ACC, "q", &got[0].receipt_handle, T0).unwrap();
    let a = attrs(&e, "q", T0);
    assert_eq!(
        (
            a.active_msg_num,
            a.inactive_msg_num,
            a.delay_msg_num,
            a.rewind_msg_num
        ),
        (1, 1, 1, 1)
    );
    let mut out = Vec::new();
    assert_eq!(e.purge(ACC, "q", T0 + 1, &mut out).unwrap(), 3);
    assert!(matches!(&out[..], [Mutation::Purged { at_ms, .. }] if *at_ms == T0 + 1));
    let a = attrs(&e, "q", T0 + 1);
    assert_eq!(
        (
            a.active_msg_num,
            a.inactive_msg_num,
            a.delay_msg_num,
            a.rewind_msg_num
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(e.stored_body_bytes(), 0);
    assert_eq!(
        code(del(&e, "q", &got[1].receipt_handle, T0 + 1)),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
    assert_eq!(e.purge(ACC, "q", T0 + 2, &mut out).unwrap(), 0);
}

// ------------------------------------------------------------------------------------------
// Rewind
// ------------------------------------------------------------------------------------------

#[test]
fn rewind_refused_when_disabled() {
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    assert_eq!(
        code(e.rewind(ACC, "q", T0 / 1000, T0, &mut Vec::new())),
        ErrorCode::REWIND_REFUSED
    );
    // Deletes do not keep anything when rewind is off.
    send(&e, "q", "x", 0, T0);
    let m = recv_one(&e, "q", T0);
    let mut out = Vec::new();
    e.delete_message(ACC, "q", &m.receipt_handle, T0, &mut out)
        .unwrap();
    assert!(matches!(
        &out[..],
        [Mutation::MessageDeleted {
            to_rewind_area: false,
            ..
        }]
    ));
    assert_eq!(attrs(&e, "q", T0).rewind_msg_num, 0);
}

#[test]
fn rewind_brings_back_messages_in_production_order() {
    let e = engine();
    create(
        &e,
        "q",
        QueueAttributeSet {
            rewind_seconds: Some(3_600),
            ..Default::default()
        },
    );
    let ids: Vec<u64> = (0..4)
        .map(|i| send(&e, "q", &format!("m{i}"), 0, T0 + i * SECOND))
        .collect();
    let now = T0 + 10 * SECOND;
    let got = recv(&e, "q", 16, now);
    // Delete in reverse order: the rewind must not care.
    for m in got.iter().rev() {
        let mut out = Vec::new();
        e.delete_message(ACC, "q", &m.receipt_handle, now, &mut out)
            .unwrap();
        assert!(matches!(
            &out[..],
            [Mutation::MessageDeleted {
                to_rewind_area: true,
                ..
            }]
        ));
    }
    let a = attrs(&e, "q", now);
    assert_eq!(
        (a.active_msg_num, a.rewind_msg_num, a.min_msg_time_ms),
        (0, 4, 0)
    );
    assert_eq!(
        e.stored_body_bytes(),
        held(&[2, 2, 2, 2]),
        "the rewind area keeps its bodies"
    );
    // Rewind to the second message's send time: three come back, oldest first.
    let mut out = Vec::new();
    let start = (T0 + SECOND) / 1000;
    assert_eq!(e.rewind(ACC, "q", start, now, &mut out).unwrap(), 3);
    assert!(matches!(
        &out[..],
        [Mutation::Rewound { start_ms, at_ms, .. }] if *start_ms == start * 1000 && *at_ms == now
    ));
    let a = attrs(&e, "q", now);
    assert_eq!((a.active_msg_num, a.rewind_msg_num), (3, 1));
    assert_eq!(a.min_msg_time_ms, T0 + SECOND);
    let again = recv(&e, "q", 16, now + 1);
    assert_eq!(
        again.iter().map(|m| m.msg_id).collect::<Vec<_>>(),
        ids[1..].to_vec()
    );
    // Fresh handles; dequeue counts kept.
    assert!(again.iter().all(|m| m.dequeue_count == 2));
    assert_eq!(
        code(del(&e, "q", &got[1].receipt_handle, now + 1)),
        ErrorCode::RECEIPT_HANDLE_INVALID
    );
    consistent(&e);
}

#[test]
fn rewind_window_bounds() {
    let e = engine();
    create(
        &e,
        "q",
        QueueAttributeSet {
            rewind_seconds: Some(600),
            ..Default::default()
        },
    );
    let now = T0 + 1_000 * SECOND;
    let now_s = now / 1000;
    let mut out = Vec::new();
    // Earliest allowed: now - rewindSeconds.
    assert!(e.rewind(ACC, "q", now_s - 600, now, &mut out).is_ok());
    assert_eq!(
        code(e.rewind(ACC, "q", now_s - 601, now, &mut out)),
        ErrorCode::REWIND_REFUSED
    );
    assert!(e.rewind(ACC, "q", now_s, now, &mut out).is_ok());
    assert_eq!(
        code(e.rewind(ACC, "q", now_s + 1, now, &mut out)),
        ErrorCode::REWIND_REFUSED
    );
    assert_eq!(
        code(e.rewind(ACC, "q", u64::MAX, now, &mut out)),
        ErrorCode::REWIND_REFUSED
    );
    assert_eq!(
        code(e.rewind(ACC, "missing", now_s, now, &mut out)),
        ErrorCode::QUEUE_NOT_FOUND
    );
}

#[test]
fn turning_rewind_off_drops_the_area_and_retention_still_applies() {
    let e = engine();
    create(
        &e,
        "q",
        QueueAttributeSet {
            rewind_seconds: Some(60),
            msg_retention_seconds: Some(120),
            ..Default::default()
        },
    );
    send(&e, "q", "aaaa", 0, T0);
    send(&e, "q", "bb", 0, T0 + 30 * SECOND);
    for m in recv(&e, "q", 16, T0 + 30 * SECOND) {
        del(&e, "q", &m.receipt_handle, T0 + 30 * SECOND).unwrap();
    }
    assert_eq!(attrs(&e, "q", T0 + 30 * SECOND).rewind_msg_num, 2);
    // The rewind area is kept until the retention of each message ends.
    assert_eq!(attrs(&e, "q", T0 + 120 * SECOND).rewind_msg_num, 1);
    assert_eq!(e.stored_body_bytes(), held(&[2]));
    set(
        &e,
        "q",
        QueueAttributeSet {
            rewind_seconds: Some(0),
            ..Default::default()
        },
        T0 + 121 * SECOND,
    )
    .unwrap();
    assert_eq!(attrs(&e, "q", T0 + 121 * SECOND).rewind_msg_num, 0);
    assert_eq!(e.stored_body_bytes(), 0);
    assert_eq!(
        code(e.rewind(
            ACC,
            "q",
            T0 / 1000 + 121,
            T0 + 121 * SECOND,
            &mut Vec::new()
        )),
        ErrorCode::REWIND_REFUSED
    );
}

#[test]
fn lowering_retention_expires_at_once() {
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    send(&e, "q", "x", 0, T0);
    send(&e, "q", "y", 0, T0 + 100 * SECOND);
    set(
        &e,
        "q",
        QueueAttributeSet {
            msg_retention_seconds: Some(60),
            ..Default::default()
        },
        T0 + 120 * SECOND,
    )
    .unwrap();
    assert_eq!(e.stored_body_bytes(), held(&[1]));
    assert_eq!(attrs(&e, "q", T0 + 120 * SECOND).active_msg_num, 1);
}

// ------------------------------------------------------------------------------------------
// Dead letters and redrive
// ------------------------------------------------------------------------------------------

#[test]
fn a_dead_letter_queue_serves_at_most_the_capped_number_of_sources() {
    let e = Engine::new(EngineConfig {
        queues_per_account_max: limits::DEAD_LETTER_SOURCES_MAX + 10,
        ..EngineConfig::default()
    });
    create(&e, "dlq", QueueAttributeSet::default());
    create(&e, "other-dlq", QueueAttributeSet::default());
    for i in 0..limits::DEAD_LETTER_SOURCES_MAX {
        create(&e, &format!("src-{i}"), policy("dlq", 0, 3, 0));
    }
    assert_eq!(
        code(e.create_queue(
            ACC,
            "one-more",
            &policy("dlq", 0, 3, 0),
            T0,
            &mut Vec::new()
        )),
        ErrorCode::OUT_OF_RANGE
    );
    create(&e, "one-more", QueueAttributeSet::default());
    assert_eq!(
        code(set(&e, "one-more", policy("dlq", 0, 3, 0), T0)),
        ErrorCode::OUT_OF_RANGE
    );
    // A source already counted may change its policy and keep its place.
    set(&e, "src-0", policy("DLQ", 0, 9, 0), T0).unwrap();
    // One that leaves frees a place.
    set(&e, "src-1", policy("other-dlq", 0, 3, 0), T0).unwrap();
    set(&e, "one-more", policy("dlq", 0, 3, 0), T0).unwrap();
    assert_eq!(
        attrs(&e, "dlq", T0).dead_letter_sources.len(),
        limits::DEAD_LETTER_SOURCES_MAX
    );
}

#[test]
fn invalid_names_get_the_naming_rule_code_and_valid_missing_ones_not_found() {
    let e = engine();
    for name in ["", "1abc", "a b", "under_score", &"a".repeat(65)] {
        assert_eq!(
            code(e.queue_attributes(ACC, name, T0, &mut Vec::new())),
            ErrorCode::QUEUE_NAME_FORMAT,
            "{name:?}"
        );
        assert_eq!(
            code(e.delete_queue(ACC, name, T0, &mut Vec::new())),
            ErrorCode::QUEUE_NAME_FORMAT,
            "{name:?}"
        );
    }
    assert_eq!(
        code(e.queue_attributes(ACC, "missing", T0, &mut Vec::new())),
        ErrorCode::QUEUE_NOT_FOUND
    );
    assert_eq!(
        code(e.create_queue(ACC, "src", &policy("a b", 0, 3, 0), T0, &mut Vec::new())),
        ErrorCode::QUEUE_NAME_FORMAT
    );
}

#[test]
fn dead_letter_policy_validation_and_bindings() {
    let e = engine();
    create(&e, "DLQ", QueueAttributeSet::default());
    assert_eq!(
        code(e.create_queue(ACC, "src", &policy("nope", 0, 3, 0), T0, &mut Vec::new())),
        ErrorCode::QUEUE_NOT_FOUND
    );
    assert_eq!(
        code(e.create_queue(ACC, "src", &policy("SRC", 0, 3, 0), T0, &mut Vec::new())),
        ErrorCode::INVALID_PARAMETER
    );
    assert_eq!(
        code(e.create_queue(ACC, "src", &policy("dlq", 7, 3, 0), T0, &mut Vec::new())),
        ErrorCode::INVALID_PARAMETER
    );
    assert_eq!(
        code(e.create_queue(ACC, "src", &policy("dlq", 0, 1001, 0), T0, &mut Vec::new())),
        ErrorCode::OUT_OF_RANGE
    );
    create(&e, "src", policy("dlq", 0, 3, 0));
    create(&e, "a-src", policy("dlq", 1, 0, 300));
    create(&e, "plain", QueueAttributeSet::default());
    let a = attrs(&e, "src", T0);
    let p = a.dead_letter_policy.unwrap();
    assert_eq!(p.dead_letter_queue, "DLQ", "the target's name as created");
    assert_eq!((p.policy, p.max_receive_count), (0, 3));
    assert_eq!(
        attrs(&e, "dlq", T0).dead_letter_sources,
        vec!["a-src", "src"]
    );
    let (total, page) = e.dead_letter_sources(ACC, "dlq", 0, 0).unwrap();
    assert_eq!(total, 2);
    assert_eq!(
        page.iter()
            .map(|q| q.queue_name.as_str())
            .collect::<Vec<_>>(),
        ["a-src", "src"]
    );
    let (total, page) = e.dead_letter_sources(ACC, "dlq", 1, 1).unwrap();
    assert_eq!((total, page.len()), (2, 1));
    assert_eq!(page[0].queue_name, "src");
    assert_eq!(
        code(e.dead_letter_sources(ACC, "missing", 0, 0)),
        ErrorCode::QUEUE_NOT_FOUND
    );
    assert_eq!(e.dead_letter_sources(ACC, "plain", 0, 0).unwrap().0, 0);
    // A queue cannot name itself through set either.
    assert_eq!(
        code(set(&e, "plain", policy("plain", 0, 1, 0), T0)),
        ErrorCode::INVALID_PARAMETER
    );
    // maxTimeToLive must stay below the retention, whichever side changes.
    assert_eq!(
        code(set(
            &e,
            "a-src",
            QueueAttributeSet {
                msg_retention_seconds: Some(300),
                ..Default::default()
            },
            T0
        )),
        ErrorCode::OUT_OF_RANGE
    );
    // Moving a source to another DLQ, and unbinding one.
    set(&e, "src", policy("plain", 0, 3, 0), T0 + 1).unwrap();
    assert_eq!(attrs(&e, "dlq", T0 + 1).dead_letter_sources, vec!["a-src"]);
    assert_eq!(attrs(&e, "plain", T0 + 1).dead_letter_sources, vec!["src"]);
    set(
        &e,
        "a-src",
        QueueAttributeSet {
            dead_letter_policy: Some(None),
            ..Default::default()
        },
        T0 + 2,
    )
    .unwrap();
    assert_eq!(attrs(&e, "a-src", T0 + 2).dead_letter_policy, None);
    assert!(attrs(&e, "dlq", T0 + 2).dead_letter_sources.is_empty());
    // Changing another attribute keeps the policy.
    set(
        &e,
        "src",
        QueueAttributeSet {
            polling_wait_seconds: Some(3),
            ..Default::default()
        },
        T0 + 3,
    )
    .unwrap();
    assert!(attrs(&e, "src", T0 + 3).dead_letter_policy.is_some());
    assert_eq!(attrs(&e, "plain", T0 + 3).dead_letter_sources, vec!["src"]);
}

#[test]
fn deleting_a_dead_letter_queue_unbinds_its_sources() {
    let e = engine();
    create(&e, "dlq", QueueAttributeSet::default());
    let src = create(&e, "src", policy("dlq", 0, 1, 0));
    let mut out = Vec::new();
    e.delete_queue(ACC, "dlq", T0 + 5, &mut out).unwrap();
    assert!(matches!(
        &out[..],
        [
            Mutation::QueueAttributesSet { queue_id, settings, modified_at_ms, .. },
            Mutation::QueueDeleted { name, .. },
        ] if *queue_id == src && settings.dead_letter_policy.is_none()
            && *modified_at_ms == T0 + 5 && &**name == "dlq"
    ));
    assert_eq!(attrs(&e, "src", T0 + 5).dead_letter_policy, None);
    // Without a policy, the message just comes back.
    send(&e, "src", "x", 0, T0 + 5);
    recv_one(&e, "src", T0 + 5);
    recv_one(&e, "src", T0 + 35 * SECOND);
    // A new queue by the old name is not a DLQ of anyone.
    create(&e, "dlq", QueueAttributeSet::default());
    assert!(attrs(&e, "dlq", T0 + 40 * SECOND)
        .dead_letter_sources
        .is_empty());
    // Deleting a source unbinds it from its DLQ.
    set(&e, "src", policy("dlq", 0, 1, 0), T0 + 41 * SECOND).unwrap();
    e.delete_queue(ACC, "src", T0 + 42 * SECOND, &mut Vec::new())
        .unwrap();
    assert!(attrs(&e, "dlq", T0 + 42 * SECOND)
        .dead_letter_sources
        .is_empty());
}

#[test]
fn max_receive_count_moves_the_message_with_its_source_recorded_then_redrive() {
    let recorder = Arc::new(Recorder::default());
    let e = Engine::with_listener(EngineConfig::default(), recorder.clone());
    let dlq = create(&e, "dlq", QueueAttributeSet::default());
    let src = create(&e, "Source", policy("dlq", 0, 2, 0));
    let id = send(&e, "source", "payload", 0, T0);
    let bytes = e.stored_body_bytes();
    recv_one(&e, "source", T0);
    let second = recv_one(&e, "source", T0 + 30 * SECOND);
    assert_eq!(second.dequeue_count, 2);
    // One ms before expiry: still in flight in the source.
    let deadline = T0 + 60 * SECOND;
    assert_eq!(attrs(&e, "source", deadline - 1).inactive_msg_num, 1);
    recorder.take();
    // At expiry it moves instead of coming back (driven by tick here).
    let mut out = Vec::new();
    e.tick(deadline, &mut out);
    assert!(matches!(
        &out[..],
        [Mutation::DeadLettered {
            source_queue_id, source, target, target_queue_id, msg_id, reason, receive_count, at_ms, ..
        }] if *source_queue_id == src && &**source == "Source" && &**target == "dlq"
            && *target_queue_id == Some(dlq) && *msg_id == id
            && *reason == DeadLetterReason::MaxReceiveCount && *receive_count == 2
            && *at_ms == deadline
    ));
    assert_eq!(recorder.take(), vec![dlq]);
    assert_eq!(e.stored_body_bytes(), bytes, "a move frees nothing");
    let a = attrs(&e, "source", deadline);
    assert_eq!((a.active_msg_num, a.inactive_msg_num), (0, 0));
    let dead = recv_one(&e, "dlq", deadline);
    assert_eq!(dead.msg_id, id);
    assert_eq!(dead.body, "payload");
    assert_eq!(dead.enqueue_time_ms, T0);
    assert_eq!(
        dead.dequeue_count, 1,
        "counts restart in the dead-letter queue"
    );
    assert_eq!(dead.first_dequeue_time_ms, deadline);
    let info = dead.dead_letter.clone().unwrap();
    assert_eq!(info.source_queue, "Source");
    assert_eq!(info.reason, DeadLetterReason::MaxReceiveCount);
    assert_eq!(info.receive_count, 2);
    assert_eq!(info.dead_lettered_at_ms, deadline);

    // Redrive takes only active dead letters: this one is in flight.
    let now = deadline + 1;
    assert_eq!(e.redrive(ACC, "dlq", 10, now, &mut Vec::new()).unwrap(), 0);
    e.release(ACC, "dlq", &dead.receipt_handle, now).unwrap();
    // A plain message in the DLQ is never redriven.
    send(&e, "dlq", "plain", 0, now);
    recorder.take();
    let mut out = Vec::new();
    assert_eq!(e.redrive(ACC, "dlq", 10, now + 1, &mut out).unwrap(), 1);
    assert!(matches!(
        &out[..],
        [Mutation::Redriven { dead_letter_queue_id, target_queue_id, msg_id, at_ms, .. }]
            if *dead_letter_queue_id == dlq && *target_queue_id == src && *msg_id == id
                && *at_ms == now + 1
    ));
    assert_eq!(recorder.take(), vec![src]);
    let back = recv_one(&e, "source", now + 2);
    assert_eq!(back.msg_id, id);
    assert_eq!(back.dequeue_count, 1);
    assert_eq!(back.first_dequeue_time_ms, now + 2);
    assert_eq!(back.enqueue_time_ms, now + 1);
    assert_eq!(back.dead_letter, None);
    assert_eq!(attrs(&e, "dlq", now + 2).active_msg_num, 1);
    assert_eq!(
        code(e.redrive(ACC, "dlq", 0, now, &mut Vec::new())),
        ErrorCode::OUT_OF_RANGE
    );
    assert_eq!(
        code(e.redrive(
            ACC,
            "dlq",
            limits::REDRIVE_COUNT_MAX + 1,
            now,
            &mut Vec::new()
        )),
        ErrorCode::OUT_OF_RANGE
    );
    assert_eq!(
        code(e.redrive(ACC, "missing", 1, now, &mut Vec::new())),
        ErrorCode::QUEUE_NOT_FOUND
    );
    consistent(&e);
}

#[test]
fn handing_back_a_message_at_its_receive_limit_dead_letters_it() {
    let e = engine();
    create(&e, "dlq", QueueAttributeSet::default());
    create(&e, "src", policy("dlq", 0, 1, 0));
    send(&e, "src", "x", 0, T0);
    let m = recv_one(&e, "src", T0);
    let mut out = Vec::new();
    e.change_visibility(ACC, "src", &m.receipt_handle, 0, T0 + 1, &mut out)
        .unwrap();
    assert!(matches!(&out[..], [Mutation::DeadLettered { .. }]));
    assert_eq!(attrs(&e, "dlq", T0 + 1).active_msg_num, 1);
    // Release undoes the receive instead: no dead letter.
    send(&e, "src", "y", 0, T0 + 2);
    let m = recv_one(&e, "src", T0 + 2);
    e.release(ACC, "src", &m.receipt_handle, T0 + 3).unwrap();
    assert_eq!(attrs(&e, "src", T0 + 3).active_msg_num, 1);
}

#[test]
fn time_to_live_moves_waiting_messages_at_once_and_in_flight_ones_at_expiry() {
    let e = engine();
    create(&e, "dlq", QueueAttributeSet::default());
    create(&e, "src", policy("dlq", 1, 0, 300));
    let waiting = send(&e, "src", "waiting", 0, T0);
    let delayed = send(&e, "src", "delayed", 600, T0);
    let held = send(&e, "src", "held", 0, T0 + 1);
    let fresh = send(&e, "src", "fresh", 0, T0 + 100 * SECOND);
    let got = recv(&e, "src", 16, T0 + 290 * SECOND);
    assert_eq!(
        got.iter().map(|m| m.msg_id).collect::<Vec<_>>(),
        vec![waiting, held, fresh]
    );
    // Hand "waiting" back: it is waiting again when the TTL ends.
    e.change_visibility(
        ACC,
        "src",
        &got[0].receipt_handle,
        0,
        T0 + 291 * SECOND,
        &mut Vec::new(),
    )
    .unwrap();
    let ttl_end = T0 + 300 * SECOND;
    assert_eq!(attrs(&e, "dlq", ttl_end - 1).active_msg_num, 0);
    let mut out = Vec::new();
    e.tick(ttl_end, &mut out);
    let moved: Vec<u64> = out
        .iter()
        .filter_map(|m| match m {
            Mutation::DeadLettered {
                msg_id,
                reason: DeadLetterReason::TimeToLive,
                ..
            } => Some(*msg_id),
            _ => None,
        })
        .collect();
    assert_eq!(moved, vec![waiting, delayed]);
    // "held" is in flight past its TTL: it moves when its visibility expires (T0 + 320 s).
    let a = attrs(&e, "src", ttl_end + 1);
    assert_eq!(
        (a.inactive_msg_num, a.delay_msg_num, a.active_msg_num),
        (2, 0, 0)
    );
    let expiry = T0 + 320 * SECOND;
    let mut out = Vec::new();
    e.tick(expiry, &mut out);
    assert!(matches!(&out[..], [Mutation::DeadLettered { msg_id, .. }] if *msg_id == held));
    // "fresh" (sent 100 s later) comes back normally: its TTL has not ended.
    assert_eq!(recv_one(&e, "src", expiry).msg_id, fresh);
    // Its TTL ends at T0 + 400 s; it is in flight until T0 + 350 s, waiting after that, and
    // moved at T0 + 400 s.
    let mut out = Vec::new();
    e.tick(T0 + 400 * SECOND, &mut out);
    assert!(matches!(&out[..], [Mutation::DeadLettered { msg_id, .. }] if *msg_id == fresh));
    let dead = recv(&e, "dlq", 16, T0 + 400 * SECOND);
    assert_eq!(dead.len(), 4);
    assert!(dead
        .iter()
        .all(|m| m.dead_letter.as_ref().unwrap().reason == DeadLetterReason::TimeToLive));
    consistent(&e);
}

#[test]
fn dead_letters_to_a_vanished_queue_are_dropped_and_freed() {
    let e = engine();
    let src = create(&e, "src", QueueAttributeSet::default());
    e.reserve(held(&[5])).unwrap();
    let letter = DeadLetter {
        source_id: src,
        target: "gone".into(),
        msg_id: 42,
        body: Bytes::from_static(b"hello"),
        enqueue_ms: T0,
        info: DeadLetterInfo {
            source_queue: "src".into(),
            reason: DeadLetterReason::MaxReceiveCount,
            receive_count: 3,
            dead_lettered_at_ms: T0 + 1,
        },
    };
    let mut out = Vec::new();
    e.deliver(&Arc::from(ACC), vec![letter], T0 + 1, &mut out);
    assert!(matches!(
        &out[..],
        [Mutation::DeadLettered {
            target_queue_id: None,
            msg_id: 42,
            ..
        }]
    ));
    assert_eq!(e.stored_body_bytes(), 0);
}

#[test]
fn redrive_leaves_dead_letters_whose_source_is_gone() {
    let e = engine();
    create(&e, "dlq", QueueAttributeSet::default());
    create(&e, "a", policy("dlq", 0, 1, 0));
    create(&e, "b", policy("dlq", 0, 1, 0));
    let from_a = send(&e, "a", "x", 0, T0);
    let from_b = send(&e, "b", "y", 0, T0);
    for q in ["a", "b"] {
        let m = recv_one(&e, q, T0);
        e.change_visibility(ACC, q, &m.receipt_handle, 0, T0, &mut Vec::new())
            .unwrap();
    }
    assert_eq!(attrs(&e, "dlq", T0).active_msg_num, 2);
    e.delete_queue(ACC, "a", T0, &mut Vec::new()).unwrap();
    assert_eq!(
        e.redrive(ACC, "dlq", 10, T0 + 1, &mut Vec::new()).unwrap(),
        1
    );
    assert_eq!(recv_one(&e, "b", T0 + 1).msg_id, from_b);
    let left = recv_one(&e, "dlq", T0 + 1);
    assert_eq!(left.msg_id, from_a);
    // Limit: one at a time.
    e.release(ACC, "dlq", &left.receipt_handle, T0 + 2).unwrap();
    create(&e, "a", QueueAttributeSet::default());
    assert_eq!(
        e.redrive(ACC, "dlq", 1, T0 + 3, &mut Vec::new()).unwrap(),
        1
    );
    assert_eq!(recv_one(&e, "a", T0 + 3).msg_id, from_a);
}

// ------------------------------------------------------------------------------------------
// Memory, deletion, tick, listener
// ------------------------------------------------------------------------------------------

#[test]
fn memory_limit_across_queues() {
    let e = Engine::new(EngineConfig {
        body_memory_bytes_max: held(&[60, 40]),
        ..EngineConfig::default()
    });
    create(
        &e,
        "a",
        QueueAttributeSet {
            rewind_seconds: Some(60),
            ..Default::default()
        },
    );
    create(&e, "b", QueueAttributeSet::default());
    let sixty = Bytes::from(vec![b'x'; 60]);
    let forty = Bytes::from(vec![b'x'; 40]);
    let one = Bytes::from_static(b"x");
    e.send(ACC, "a", &[sixty], 0, T0, &mut Vec::new()).unwrap();
    e.send(
        ACC,
        "b",
        std::slice::from_ref(&forty),
        0,
        T0,
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(e.stored_body_bytes(), held(&[60, 40]));
    assert_eq!(
        code(e.send(ACC, "b", std::slice::from_ref(&one), 0, T0, &mut Vec::new())),
        ErrorCode::MEMORY_FULL
    );
    // Deleted into the rewind area: still held.
    let m = recv_one(&e, "a", T0);
    del(&e, "a", &m.receipt_handle, T0).unwrap();
    assert_eq!(
        code(e.send(ACC, "b", std::slice::from_ref(&one), 0, T0, &mut Vec::new())),
        ErrorCode::MEMORY_FULL
    );
    // Deleted for good: freed.
    let m = recv_one(&e, "b", T0);
    del(&e, "b", &m.receipt_handle, T0).unwrap();
    assert_eq!(e.stored_body_bytes(), held(&[60]));
    e.send(
        ACC,
        "b",
        std::slice::from_ref(&forty),
        0,
        T0,
        &mut Vec::new(),
    )
    .unwrap();
    // Deleting a queue frees everything in it, rewind area included.
    e.delete_queue(ACC, "a", T0, &mut Vec::new()).unwrap();
    assert_eq!(e.stored_body_bytes(), held(&[40]));
}

#[test]
fn a_deleted_queue_is_gone_and_its_name_is_free() {
    let e = engine();
    let old = create(&e, "q", QueueAttributeSet::default());
    send(&e, "q", "x", 0, T0);
    let m = recv_one(&e, "q", T0);
    let cell = e.lookup(ACC, "q").unwrap();
    e.delete_queue(ACC, "Q", T0, &mut Vec::new()).unwrap();
    assert_eq!(e.stored_body_bytes(), 0);
    assert_eq!(e.queue_count(), 0);
    assert_eq!(
        code(del(&e, "q", &m.receipt_handle, T0)),
        ErrorCode::QUEUE_NOT_FOUND
    );
    assert_eq!(
        code(e.delete_queue(ACC, "q", T0, &mut Vec::new())),
        ErrorCode::QUEUE_NOT_FOUND
    );
    // An operation that found the queue before the delete fails rather than touching it.
    assert_eq!(
        code(e.run(&cell, T0, &mut Vec::new(), |_, _, _, _| Ok(()))),
        ErrorCode::QUEUE_NOT_FOUND
    );
    let new = create(&e, "q", QueueAttributeSet::default());
    assert_ne!(old, new);
    assert_eq!(attrs(&e, "q", T0).active_msg_num, 0);
}

#[test]
fn tick_wakes_delayed_messages_and_is_idle_otherwise() {
    let recorder = Arc::new(Recorder::default());
    let e = Engine::with_listener(EngineConfig::default(), recorder.clone());
    let qid = create(&e, "q", QueueAttributeSet::default());
    let mut out = Vec::new();
    e.tick(T0, &mut out);
    assert_eq!(e.next_deadline(), None);
    send(&e, "q", "x", 5, T0);
    assert_eq!(
        recorder.take(),
        Vec::<u64>::new(),
        "a delayed send wakes nobody"
    );
    assert_eq!(e.next_deadline(), Some(T0 + 5 * SECOND));
    e.tick(T0 + 5 * SECOND - 1, &mut out);
    assert!(recorder.take().is_empty());
    e.tick(T0 + 5 * SECOND, &mut out);
    assert_eq!(recorder.take(), vec![qid]);
    assert!(out.is_empty());
    // Next deadline: the message's retention.
    assert_eq!(e.next_deadline(), Some(T0 + 345_600 * SECOND));
    // Visibility expiry wakes waiters too.
    let m = recv_one(&e, "q", T0 + 6 * SECOND);
    assert!(recorder.take().is_empty());
    e.tick(m.next_visible_time_ms, &mut out);
    assert_eq!(recorder.take(), vec![qid]);
    // Retention through tick frees memory without any other operation.
    e.tick(T0 + 345_600 * SECOND, &mut out);
    assert_eq!(e.stored_body_bytes(), 0);
    assert_eq!(e.next_deadline(), None);
    assert!(recorder.take().is_empty());
}

#[test]
fn listener_hears_every_way_a_message_becomes_ready() {
    let recorder = Arc::new(Recorder::default());
    let e = Engine::with_listener(EngineConfig::default(), recorder.clone());
    let qid = create(
        &e,
        "q",
        QueueAttributeSet {
            rewind_seconds: Some(60),
            ..Default::default()
        },
    );
    send(&e, "q", "x", 0, T0);
    assert_eq!(recorder.take(), vec![qid], "send");
    let m = recv_one(&e, "q", T0);
    assert!(recorder.take().is_empty(), "receive took the only one");
    e.change_visibility(ACC, "q", &m.receipt_handle, 0, T0, &mut Vec::new())
        .unwrap();
    assert_eq!(recorder.take(), vec![qid], "change visibility to 0");
    let m = recv_one(&e, "q", T0);
    del(&e, "q", &m.receipt_handle, T0).unwrap();
    e.rewind(ACC, "q", T0 / 1000, T0 + 1, &mut Vec::new())
        .unwrap();
    assert_eq!(recorder.take(), vec![qid], "rewind");
    e.purge(ACC, "q", T0 + 1, &mut Vec::new()).unwrap();
    assert!(recorder.take().is_empty(), "purge");
}

#[test]
fn mutation_values_are_complete_for_replay() {
    let e = engine();
    let mut out = Vec::new();
    let attrs_set = QueueAttributeSet {
        rewind_seconds: Some(10),
        ..Default::default()
    };
    let qid = e.create_queue(ACC, "Q", &attrs_set, T0, &mut out).unwrap();
    let ids = e
        .send(ACC, "q", &[Bytes::from_static(b"b")], 3, T0 + 1, &mut out)
        .unwrap();
    let m = recv_one(&e, "q", T0 + 4 * SECOND);
    e.delete_message(ACC, "q", &m.receipt_handle, T0 + 5 * SECOND, &mut out)
        .unwrap();
    e.delete_queue(ACC, "q", T0 + 6 * SECOND, &mut out).unwrap();
    let account: Arc<str> = Arc::from(ACC);
    let name: Arc<str> = Arc::from("Q");
    assert_eq!(
        out,
        vec![
            Mutation::QueueCreated {
                account: account.clone(),
                queue_id: qid,
                name: name.clone(),
                settings: QueueSettings {
                    rewind_seconds: 10,
                    ..QueueSettings::default()
                },
                created_at_ms: T0,
            },
            Mutation::MessageSent {
                account: account.clone(),
                queue_id: qid,
                queue: name.clone(),
                msg_id: ids[0],
                body: Bytes::from_static(b"b"),
                enqueue_time_ms: T0 + 1,
                visible_at_ms: T0 + 1 + 3 * SECOND,
            },
            Mutation::MessageDeleted {
                account: account.clone(),
                queue_id: qid,
                queue: name.clone(),
                msg_id: ids[0],
                at_ms: T0 + 5 * SECOND,
                to_rewind_area: true,
            },
            Mutation::QueueDeleted {
                account,
                queue_id: qid,
                name,
                at_ms: T0 + 6 * SECOND,
            },
        ]
    );
}

#[test]
fn time_never_goes_back_within_a_queue() {
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    send(&e, "q", "x", 0, T0 + 10 * SECOND);
    // A caller with an older clock reading: the queue uses its own latest time.
    let m = recv_one(&e, "q", T0);
    assert_eq!(m.first_dequeue_time_ms, T0 + 10 * SECOND);
    assert_eq!(m.next_visible_time_ms, T0 + 40 * SECOND);
}

#[test]
fn concurrent_consumers_never_share_a_message() {
    let e = Arc::new(engine());
    create(&e, "q", QueueAttributeSet::default());
    let bodies: Vec<Bytes> = (0..16).map(|_| Bytes::from_static(b"x")).collect();
    for _ in 0..250 {
        e.send(ACC, "q", &bodies, 0, T0, &mut Vec::new()).unwrap();
    }
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let e = Arc::clone(&e);
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                loop {
                    let got = recv(&e, "q", 7, T0 + 1);
                    if got.is_empty() {
                        break ids;
                    }
                    for m in got {
                        del(&e, "q", &m.receipt_handle, T0 + 1).unwrap();
                        ids.push(m.msg_id);
                    }
                }
            })
        })
        .collect();
    let mut all: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(all.len(), 4000);
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 4000);
    assert_eq!(e.stored_body_bytes(), 0);
}

#[test]
fn the_timer_heap_stays_small_over_many_cycles() {
    let e = engine();
    create(
        &e,
        "q",
        QueueAttributeSet {
            visibility_timeout_seconds: Some(1),
            ..Default::default()
        },
    );
    send(&e, "q", "x", 0, T0);
    let mut now = T0;
    let mut out = Vec::new();
    for _ in 0..1_000 {
        recv_one(&e, "q", now);
        now += SECOND;
        e.tick(now, &mut out);
    }
    // One entry for the retention deadline, one for the next visibility expiry at most.
    assert!(e.timers.lock().len() <= 3, "{}", e.timers.lock().len());
}

#[test]
fn a_new_time_to_live_policy_applies_to_messages_already_there() {
    let e = engine();
    create(&e, "dlq", QueueAttributeSet::default());
    create(&e, "q", QueueAttributeSet::default());
    let old = send(&e, "q", "old", 0, T0);
    let young = send(&e, "q", "young", 0, T0 + 200 * SECOND);
    let mut out = Vec::new();
    e.set_queue_attributes(
        ACC,
        "q",
        &policy("dlq", 1, 0, 300),
        T0 + 400 * SECOND,
        &mut out,
    )
    .unwrap();
    assert!(matches!(
        &out[..],
        [Mutation::DeadLettered { msg_id, .. }, Mutation::QueueAttributesSet { .. }]
            if *msg_id == old
    ));
    assert_eq!(e.next_deadline(), Some(T0 + 500 * SECOND));
    let mut out = Vec::new();
    e.tick(T0 + 500 * SECOND, &mut out);
    assert!(matches!(&out[..], [Mutation::DeadLettered { msg_id, .. }] if *msg_id == young));
    assert_eq!(attrs(&e, "dlq", T0 + 500 * SECOND).active_msg_num, 2);
}

/// A body source for the eviction tests: bodies by message id, readable once `written`.
#[derive(Debug, Default)]
struct FakeBodies {
    bodies: parking_lot::Mutex<BTreeMap<u64, Bytes>>,
    written: parking_lot::Mutex<BTreeSet<u64>>,
    /// Ids whose records fail their check when read back.
    damaged: parking_lot::Mutex<BTreeSet<u64>>,
    reads: AtomicU64,
}

impl BodySource for FakeBodies {
    fn read(&self, _queue_id: u64, msg_id: u64) -> Result<Option<Bytes>, String> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if self.damaged.lock().contains(&msg_id) {
            return Err(format!("record of message {msg_id} fails its CRC"));
        }
        Ok(self.bodies.lock().get(&msg_id).cloned())
    }

    fn readable(&self, _queue_id: u64, ids: &[u64], out: &mut Vec<u64>) -> u64 {
        let written = self.written.lock();
        let mut first = u64::MAX;
        for &id in ids {
            if written.contains(&id) {
                out.push(id);
            } else if first == u64::MAX {
                first = id;
            }
        }
        first
    }
}

#[test]
fn evicted_bodies_are_read_back_and_unwritten_ones_are_kept() {
    let e = engine();
    let source = Arc::new(FakeBodies::default());
    e.set_body_source(source.clone());
    create(&e, "q", QueueAttributeSet::default());
    let mut ids = Vec::new();
    for i in 0..10 {
        let body = format!("body-{i}");
        let id = send(&e, "q", &body, 0, T0);
        source.bodies.lock().insert(id, Bytes::from(body));
        ids.push(id);
    }
    // Only the first 6 are written; the 4th is not (written out of order).
    source
        .written
        .lock()
        .extend(ids[..6].iter().copied().filter(|&id| id != ids[3]));
    let report = e.evict_bodies(0);
    assert_eq!(report.messages, 5);
    assert_eq!(e.stored_body_bytes(), held(&[6; 5]));
    // Once written, the rest go too: the cursor stayed at the first one not written.
    source.written.lock().extend(ids.iter().copied());
    assert_eq!(e.evict_bodies(0).messages, 5);
    assert_eq!(e.stored_body_bytes(), 0);
    // A receive reads them back, in order; a message deleted meanwhile is left out.
    source.bodies.lock().remove(&ids[1]);
    let got = recv(&e, "q", 4, T0);
    let bodies: Vec<_> = got.iter().map(|m| m.body.clone()).collect();
    assert_eq!(
        bodies,
        vec![
            Bytes::from("body-0"),
            Bytes::from("body-2"),
            Bytes::from("body-3")
        ]
    );
    assert_eq!(source.reads.load(Ordering::Relaxed), 4);
    let stats = e.body_stats();
    assert_eq!((stats.hits, stats.misses), (0, 4));
    // Eviction only runs above the budget.
    let id = send(&e, "q", "fresh", 0, T0);
    source.written.lock().insert(id);
    assert_eq!(e.evict_bodies(held(&[5])).messages, 0);
    assert_eq!(e.evict_bodies(held(&[5]) - 1).messages, 1);
}

#[test]
fn a_damaged_body_is_left_out_of_a_batch_and_fails_only_a_receive_of_it_alone() {
    let e = engine();
    let source = Arc::new(FakeBodies::default());
    e.set_body_source(source.clone());
    create(&e, "q", QueueAttributeSet::default());
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = format!("body-{i}");
        let id = send(&e, "q", &body, 0, T0);
        source.bodies.lock().insert(id, Bytes::from(body));
        source.written.lock().insert(id);
        ids.push(id);
    }
    assert_eq!(e.evict_bodies(0).messages, 3);
    source.damaged.lock().insert(ids[1]);
    // The batch serves the two good ones; the damaged one stays received.
    let got = recv(&e, "q", 3, T0);
    let served: Vec<u64> = got.iter().map(|m| m.msg_id).collect();
    assert_eq!(served, vec![ids[0], ids[2]]);
    let a = attrs(&e, "q", T0);
    assert_eq!((a.active_msg_num, a.inactive_msg_num), (0, 3));
    assert_eq!(e.body_stats().read_errors, 1);
    // The good ones are deleted as usual.
    for m in &got {
        del(&e, "q", &m.receipt_handle, T0).unwrap();
    }
    // Once visible again, a receive that gets only it is an error naming the damage.
    let visible = T0 + 30 * SECOND;
    let mut out = Vec::new();
    let error = e.receive(ACC, "q", 1, visible, &mut out).unwrap_err();
    assert_eq!(error.code, ErrorCode::INTERNAL);
    assert!(
        error
            .message
            .starts_with("a stored message body cannot be read")
            && error.message.contains("fails its CRC"),
        "{}",
        error.message
    );
    assert_eq!(e.body_stats().read_errors, 2);
    // Received again (never served): in flight for another visibility timeout.
    let a = attrs(&e, "q", visible);
    assert_eq!((a.active_msg_num, a.inactive_msg_num), (0, 1));
}

#[test]
fn without_a_body_source_nothing_is_evicted() {
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    send(&e, "q", "kept", 0, T0);
    assert_eq!(e.evict_bodies(0), EvictionReport::default());
    assert_eq!(recv(&e, "q", 1, T0)[0].body, Bytes::from("kept"));
}

#[test]
fn index_bytes_follow_the_messages_held() {
    let e = engine();
    create(&e, "idx", QueueAttributeSet::default());
    let empty = e.index_bytes();
    for i in 0..2_000 {
        send(&e, "idx", &format!("m{i}"), 0, 1_000);
    }
    let full = e.index_bytes();
    // At least the message map's entries (an id and a message each, bodies excluded) and the
    // ready and live sets.
    let per_message = (full - empty) / 2_000;
    assert!(
        per_message >= (std::mem::size_of::<u64>() * 2) as u64,
        "{per_message} bytes per message"
    );
    // Received and deleted: the map and the sets give their memory back.
    loop {
        let got = recv(&e, "idx", 16, 2_000);
        if got.is_empty() {
            break;
        }
        for m in got {
            del(&e, "idx", &m.receipt_handle, 2_000).unwrap();
        }
    }
    assert!(
        e.index_bytes() < full / 4,
        "{} bytes left of {full} after every message was deleted",
        e.index_bytes()
    );
}

#[test]
fn without_mutation_bodies_a_send_logs_no_body_and_the_queue_keeps_it_unshared() {
    // Memory mode: the storage keeps nothing, so the body goes to the queue alone.
    let e = Engine::new(EngineConfig::default()).with_mutation_bodies(false);
    create(&e, "q", QueueAttributeSet::default());
    let body = Bytes::from(b"hello".to_vec());
    let mut out = Vec::new();
    let ids = e.send_owned(ACC, "q", vec![body], 0, T0, &mut out).unwrap();
    let logged = out.iter().find_map(|m| match m {
        Mutation::MessageSent { msg_id, body, .. } => Some((*msg_id, body.clone())),
        _ => None,
    });
    assert_eq!(logged, Some((ids[0], Bytes::new())));
    assert_eq!(recv_one(&e, "q", T0).body, Bytes::from_static(b"hello"));

    // By default (a storage that logs bodies) the mutation carries it.
    let e = engine();
    create(&e, "q", QueueAttributeSet::default());
    let mut out = Vec::new();
    e.send_owned(ACC, "q", vec![Bytes::from(b"hi".to_vec())], 0, T0, &mut out)
        .unwrap();
    assert!(out
        .iter()
        .any(|m| matches!(m, Mutation::MessageSent { body, .. } if body.as_ref() == b"hi")));
}
