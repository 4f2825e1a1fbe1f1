//! Streaming consume over TCP: the credit window, visibility timeouts, giving messages back on
//! cancel and disconnect, a deleted queue, hostile Consume requests, and consumers sharing a
//! queue with each other and with long polls. No timing assertions: visibility runs on a manual
//! clock the tests advance, waits are on broker counters, and the one-second recheck of idle
//! consumers runs on paused Tokio time where a test needs it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cmqd::client::{
    Account, ClientConfig, ConsumeOptions, Consumer, DeadLetterPolicy, Delivery, ErrorKind,
    QueueAttributeSet,
};
use cmqd::clock::ManualClock;
use cmqd::config::Limits;
use cmqd::limits::{CONSUMERS_PER_CONNECTION_MAX, CONSUME_CREDIT_MAX, DELIVERY_MESSAGES_MAX};
use cmqd::model::ReceivedMessage;
use cmqd::protocol::{
    encode_request, parse_push, parse_response, Push, PushOpcode, RawFrame, Reply, Request,
    Response, FLAG_PUSH,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::support::{error_code, RawConn, TestServer, ALICE};

const T0: u64 = 1_700_000_000_000;

fn code(error: &cmqd::client::Error) -> (u16, u16) {
    let code = error.code().expect("a CMQ error code");
    (code.code, code.module)
}

/// A broker on a clock that stands still unless the test moves it: nothing expires by itself.
async fn frozen() -> (TestServer, ManualClock) {
    let clock = ManualClock::new(T0);
    let server = TestServer::start_with_clock(Limits::default(), clock.clone()).await;
    (server, clock)
}

async fn queue_with(account: &Account, name: &str, visibility_seconds: u32) {
    account
        .create_queue(
            name,
            &QueueAttributeSet {
                visibility_timeout_seconds: Some(visibility_seconds),
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

async fn send_n(account: &Account, queue: &str, n: usize) -> Vec<u64> {
    let queue = account.queue(queue);
    let mut ids = Vec::new();
    let bodies: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    for chunk in bodies.chunks(16) {
        ids.extend(queue.batch_send_message(chunk.to_vec(), 0).await.unwrap());
    }
    ids
}

/// The next delivery, or a panic naming what came instead (10 s of virtual or real time).
async fn next(consumer: &mut Consumer) -> Delivery {
    match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

/// Waits (yielding) until the queue's counters are (active, inactive).
async fn wait_for_counts(account: &Account, queue: &str, active: u64, inactive: u64) {
    let queue = account.queue(queue);
    for _ in 0..10_000 {
        let a = queue.get_attributes().await.unwrap();
        if (a.active_msg_num, a.inactive_msg_num) == (active, inactive) {
            return;
        }
        tokio::task::yield_now().await;
    }
    let a = queue.get_attributes().await.unwrap();
    panic!(
        "queue {}: active {} inactive {}, expected {active} {inactive}",
        queue.name(),
        a.active_msg_num,
        a.inactive_msg_num
    );
}

fn consume(queue: &str, credit: u32, batch_max: u16) -> Request {
    Request::Consume {
        queue: queue.into(),
        credit,
        batch_max,
        visibility_timeout_seconds: None,
    }
}

/// A frame from a raw connection: a reply (request id, response) or a push (consumer, push).
#[derive(Debug)]
enum Frame {
    Reply(u32, Response),
    Push(u32, Push),
}

async fn raw_next(raw: &mut RawConn) -> Frame {
    let frame: RawFrame = raw.next_frame().await.expect("connection closed");
    if frame.flags == FLAG_PUSH {
        Frame::Push(frame.request_id, parse_push(&frame).unwrap())
    } else {
        Frame::Reply(frame.request_id, parse_response(&frame).unwrap())
    }
}

fn delivered(frame: Frame, consumer: u32) -> Vec<ReceivedMessage> {
    match frame {
        Frame::Push(id, Push::Delivery(messages)) if id == consumer => messages,
        other => panic!("expected a delivery for consumer {consumer}, got {other:?}"),
    }
}

#[tokio::test]
async fn credit_bounds_the_messages_held_and_acks_restore_it() {
    let (server, _clock) = frozen().await;
    let alice = server.alice().await;
    queue_with(&alice, "credit", 30).await;
    send_n(&alice, "credit", 10).await;

    let mut consumer = alice
        .queue("credit")
        .consume(ConsumeOptions::new().credit(3))
        .await
        .unwrap();
    let first: Vec<Delivery> = vec![
        next(&mut consumer).await,
        next(&mut consumer).await,
        next(&mut consumer).await,
    ];
    // Three held, seven left for anyone: the consumer took no more than its credit.
    wait_for_counts(&alice, "credit", 7, 3).await;
    let other = server.alice().await.queue("credit");
    let taken = other.receive_message(Some(0)).await.unwrap();
    assert!(first.iter().all(|d| d.msg_id() != taken.msg_id));
    other.delete_message(&taken.receipt_handle).await.unwrap();
    wait_for_counts(&alice, "credit", 6, 3).await;

    // Each ack frees one place, and one more message comes.
    first[0].ack().await.unwrap();
    let fourth = next(&mut consumer).await;
    let fourth_id = fourth.msg_id();
    wait_for_counts(&alice, "credit", 5, 3).await;
    consumer
        .acker()
        .ack_deliveries(&[first[1].clone(), first[2].clone(), fourth])
        .await
        .unwrap();
    let mut seen: BTreeSet<u64> = first.iter().map(Delivery::msg_id).collect();
    seen.insert(taken.msg_id);
    assert!(seen.insert(fourth_id));
    while seen.len() < 10 {
        let delivery = next(&mut consumer).await;
        assert_eq!(delivery.dequeue_count(), 1);
        assert!(seen.insert(delivery.msg_id()), "delivered twice");
        delivery.ack().await.unwrap();
    }
    wait_for_counts(&alice, "credit", 0, 0).await;
    server.stop().await;
}

/// The same on the wire: the first Delivery carries exactly the credit, the window stays full
/// until a delete on the connection, and each delete lets exactly one more message through.
#[tokio::test]
async fn on_the_wire_a_delete_on_the_connection_lets_one_more_message_through() {
    let (server, _clock) = frozen().await;
    let alice = server.alice().await;
    queue_with(&alice, "wire", 30).await;
    send_n(&alice, "wire", 6).await;

    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;
    let consumer = 40;
    raw.send(consumer, &consume("wire", 2, 16)).await;
    match raw_next(&mut raw).await {
        Frame::Reply(40, Response::Ok(Reply::Consuming { consumer_id: 40 })) => {}
        other => panic!("expected the Consume reply first, got {other:?}"),
    }
    let held = delivered(raw_next(&mut raw).await, consumer);
    assert_eq!(held.len(), 2, "the first delivery fills the credit");
    wait_for_counts(&alice, "wire", 4, 2).await;

    raw.send(
        41,
        &Request::DeleteMessage {
            queue: "WIRE".into(), // queue names compare case-insensitively
            receipt_handle: held[0].receipt_handle.clone(),
        },
    )
    .await;
    let mut more = Vec::new();
    let mut replied = false;
    while !(replied && more.len() == 1) {
        match raw_next(&mut raw).await {
            Frame::Reply(41, Response::Ok(Reply::Empty)) => replied = true,
            frame => more.extend(delivered(frame, consumer)),
        }
    }
    // A ping's reply comes after anything the consumer had queued: still one message held
    // beyond the first, nothing more.
    raw.send(42, &Request::Ping).await;
    match raw_next(&mut raw).await {
        Frame::Reply(42, Response::Ok(Reply::Empty)) => {}
        other => panic!("nothing more may be delivered, got {other:?}"),
    }
    wait_for_counts(&alice, "wire", 3, 2).await;
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn visibility_timeouts_apply_and_an_expired_delivery_frees_its_credit() {
    let (server, clock) = frozen().await;
    let alice = server.alice().await;
    queue_with(&alice, "vis", 30).await;
    // `c` has the lower id but is delayed 20 s; `a` is the only message the consumer can take.
    let c = alice.queue("vis").send_message("c", 20).await.unwrap();
    let a = alice.queue("vis").send_message("a", 0).await.unwrap();

    let mut consumer = alice
        .queue("vis")
        .consume(ConsumeOptions::new().credit(1))
        .await
        .unwrap();
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.msg_id(), a);
    assert_eq!(delivery.dequeue_count(), 1);
    assert_eq!(delivery.first_dequeue_time_ms(), T0);
    assert_eq!(delivery.next_visible_time_ms(), T0 + 30_000);

    // Invisible to a plain receive until the queue's visibility timeout passes.
    let other = server.alice().await.queue("vis");
    assert!(other
        .receive_message(Some(0))
        .await
        .unwrap_err()
        .is_no_message());
    clock.advance_seconds(31);
    // Now `c` (delay over) and `a` (timeout over) are both visible. The consumer, with one
    // place again, takes at most one, and the lower id first: `c`. So `a` reaches the plain
    // receive whoever looks first.
    let got = other.batch_receive_message(16, Some(0)).await.unwrap();
    let again = got
        .iter()
        .find(|m| m.msg_id == a)
        .expect("the expired delivery is visible to ReceiveMessage");
    assert_eq!(again.dequeue_count, 2);
    assert_eq!(code(&delivery.ack().await.unwrap_err()), (4430, 10260));
    let handles: Vec<&str> = got.iter().map(|m| m.receipt_handle.as_str()).collect();
    other.batch_delete_message(&handles).await.unwrap();

    // The expired delivery no longer counts against the credit: a new one comes (`c` if the
    // consumer looked first, else the message sent now).
    let d = alice.queue("vis").send_message("d", 0).await.unwrap();
    let fresh = next(&mut consumer).await;
    assert!(fresh.msg_id() == c || fresh.msg_id() == d, "{fresh:?}");
    assert_eq!(fresh.dequeue_count(), 1);
    fresh.ack().await.unwrap();
    consumer.cancel().await.unwrap();
    alice.queue("vis").purge().await.unwrap();

    // A consumer may set its own visibility timeout, shorter than the queue's 30 s here.
    let mut short = alice
        .queue("vis")
        .consume(ConsumeOptions::new().credit(1).visibility_timeout(5))
        .await
        .unwrap();
    let e = alice.queue("vis").send_message("e", 0).await.unwrap();
    let delivery = next(&mut short).await;
    assert_eq!(delivery.msg_id(), e);
    assert_eq!(delivery.next_visible_time_ms(), T0 + 31_000 + 5_000);
    clock.advance_seconds(6);
    // Redelivered after 5 s, not 30: the override held, and the expiry freed the credit.
    let redelivered = next(&mut short).await;
    assert_eq!((redelivered.msg_id(), redelivered.dequeue_count()), (e, 2));
    assert_eq!(code(&delivery.ack().await.unwrap_err()), (4430, 10260));
    redelivered.ack().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_consumer_that_disconnects_gives_back_what_it_held() {
    let (server, _clock) = frozen().await;
    let alice = server.alice().await;
    queue_with(&alice, "gone", 30).await;
    let ids = send_n(&alice, "gone", 5).await;

    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;
    raw.send(9, &consume("gone", 100, 2)).await;
    let mut held = Vec::new();
    while held.len() < 5 {
        match raw_next(&mut raw).await {
            Frame::Reply(9, Response::Ok(Reply::Consuming { .. })) => {}
            frame => {
                let messages = delivered(frame, 9);
                assert!(messages.len() <= 2, "batch_max is 2");
                held.extend(messages);
            }
        }
    }
    wait_for_counts(&alice, "gone", 0, 5).await;
    drop(raw);
    server.wait_for_consumers(0).await;

    // The clock stands still, so only the disconnect can have made them visible again.
    let other = alice.queue("gone");
    let mut back = BTreeSet::new();
    while back.len() < 5 {
        for message in other.batch_receive_message(16, Some(5)).await.unwrap() {
            assert_eq!(
                message.dequeue_count, 2,
                "the delivery counted as a receive"
            );
            back.insert(message.msg_id);
        }
    }
    assert_eq!(back, ids.into_iter().collect());
    server.stop().await;
}

#[tokio::test]
async fn cancel_gives_back_held_messages_and_stops_deliveries() {
    let (server, _clock) = frozen().await;
    let alice = server.alice().await;
    queue_with(&alice, "cancel", 30).await;
    send_n(&alice, "cancel", 4).await;

    let mut consumer = alice
        .queue("cancel")
        .consume(ConsumeOptions::new().credit(4))
        .await
        .unwrap();
    let kept = next(&mut consumer).await;
    kept.ack().await.unwrap();
    for _ in 0..3 {
        next(&mut consumer).await;
    }
    wait_for_counts(&alice, "cancel", 0, 3).await;
    consumer.cancel().await.unwrap();
    // Back as soon as the cancel returns.
    let attributes = alice.queue("cancel").get_attributes().await.unwrap();
    assert_eq!(
        (attributes.active_msg_num, attributes.inactive_msg_num),
        (3, 0)
    );
    server.wait_for_consumers(0).await;

    // Dropping a consumer cancels it too.
    let mut dropped = alice
        .queue("cancel")
        .consume(ConsumeOptions::new().credit(2))
        .await
        .unwrap();
    next(&mut dropped).await;
    drop(dropped);
    server.wait_for_consumers(0).await;
    wait_for_counts(&alice, "cancel", 3, 0).await;

    // On the wire: no Delivery after the CancelConsume reply, and a second cancel is refused.
    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;
    raw.send(7, &consume("cancel", 1, 1)).await;
    let mut got_reply = false;
    let mut got_delivery = false;
    while !(got_reply && got_delivery) {
        match raw_next(&mut raw).await {
            Frame::Reply(7, Response::Ok(Reply::Consuming { consumer_id: 7 })) => got_reply = true,
            frame => got_delivery = delivered(frame, 7).len() == 1,
        }
    }
    raw.send(8, &Request::CancelConsume { consumer_id: 7 })
        .await;
    match raw_next(&mut raw).await {
        Frame::Reply(8, Response::Ok(Reply::Empty)) => {}
        other => panic!("expected the cancel reply, got {other:?}"),
    }
    alice.queue("cancel").send_message("late", 0).await.unwrap();
    let response = raw
        .call(10, &Request::CancelConsume { consumer_id: 7 })
        .await;
    assert_eq!(error_code(&response), Some((4440, 10760)));
    wait_for_counts(&alice, "cancel", 4, 0).await;
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn deleting_the_queue_ends_its_consumers_with_4440() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    queue_with(&alice, "doomed", 30).await;
    send_n(&alice, "doomed", 1).await;
    let mut consumer = alice
        .queue("doomed")
        .consume(ConsumeOptions::new().credit(1))
        .await
        .unwrap();
    next(&mut consumer).await;
    let mut idle = alice
        .queue("doomed")
        .consume(ConsumeOptions::new())
        .await
        .unwrap();
    alice.delete_queue("doomed").await.unwrap();
    // Both the full consumer and the idle one notice, and end with the queue's error.
    for consumer in [&mut consumer, &mut idle] {
        let ended = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap();
        let error = ended.expect("an error item").unwrap_err();
        assert_eq!(code(&error), (4440, 10100));
        assert!(consumer.next().await.is_none(), "then the stream ends");
    }
    server.wait_for_consumers(0).await;
    // Cancelling a consumer the broker ended is not an error.
    consumer.cancel().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn hostile_consume_requests_get_their_documented_errors() {
    let (server, _clock) = frozen().await;
    let alice = server.alice().await;
    queue_with(&alice, "q", 30).await;
    let mut raw = RawConn::connect(server.addr()).await;

    // Before authentication, like any request.
    let response = raw.call(1, &consume("q", 1, 1)).await;
    assert_eq!(error_code(&response), Some((4100, 10030)));
    raw.handshake(ALICE).await;

    let with = |credit, batch_max, visibility| Request::Consume {
        queue: "q".into(),
        credit,
        batch_max,
        visibility_timeout_seconds: visibility,
    };
    let cases: Vec<(&str, Request, (u16, u16))> = vec![
        ("zero credit", with(0, 1, None), (4000, 10350)),
        (
            "excessive credit",
            with(CONSUME_CREDIT_MAX + 1, 1, None),
            (4000, 10350),
        ),
        ("zero batch", with(1, 0, None), (4000, 10370)),
        (
            "excessive batch",
            with(1, DELIVERY_MESSAGES_MAX as u16 + 1, None),
            (4000, 10370),
        ),
        ("zero visibility", with(1, 1, Some(0)), (4000, 10350)),
        (
            "visibility over 12 h",
            with(1, 1, Some(43_201)),
            (4000, 10350),
        ),
        ("unknown queue", consume("nope", 1, 1), (4440, 10100)),
        ("invalid queue name", consume("1-bad", 1, 1), (4000, 10020)),
        (
            "unknown consumer",
            Request::CancelConsume { consumer_id: 999 },
            (4440, 10760),
        ),
    ];
    for (i, (what, request, expected)) in cases.into_iter().enumerate() {
        let response = raw.call(100 + i as u32, &request).await;
        assert_eq!(
            error_code(&response),
            Some(expected),
            "{what}: {response:?}"
        );
    }

    // An id in use, and one consumer more than a connection may run.
    let response = raw.call(500, &consume("q", 1, 1)).await;
    assert!(matches!(response, Response::Ok(Reply::Consuming { .. })));
    let response = raw.call(500, &consume("q", 1, 1)).await;
    assert_eq!(error_code(&response), Some((4460, 10780)));
    for id in 501..500 + CONSUMERS_PER_CONNECTION_MAX as u32 {
        let response = raw.call(id, &consume("q", 1, 1)).await;
        assert!(matches!(response, Response::Ok(Reply::Consuming { .. })));
    }
    let response = raw.call(900, &consume("q", 1, 1)).await;
    assert_eq!(error_code(&response), Some((4450, 10770)));
    server
        .wait_for_consumers(CONSUMERS_PER_CONNECTION_MAX)
        .await;

    // A client may not send pushes: flags 0x02 are malformed, push opcodes unknown requests.
    let mut frame = bytes::BytesMut::new();
    encode_request(901, &Request::Ping, &mut frame).unwrap();
    frame[5] = FLAG_PUSH;
    raw.send_bytes(&frame).await;
    let (id, response) = raw.recv().await;
    assert_eq!((id, error_code(&response)), (901, Some((4000, 10420))));
    let mut frame = bytes::BytesMut::new();
    encode_request(902, &Request::Ping, &mut frame).unwrap();
    frame[6..8].copy_from_slice(&(PushOpcode::Delivery as u16).to_be_bytes());
    raw.send_bytes(&frame).await;
    let (id, response) = raw.recv().await;
    assert_eq!((id, error_code(&response)), (902, Some((4000, 10280))));

    // The connection still works, and closing it ends its consumers.
    assert!(matches!(
        raw.call(903, &Request::Ping).await,
        Response::Ok(Reply::Empty)
    ));
    drop(raw);
    server.wait_for_consumers(0).await;
    server.stop().await;
}

#[tokio::test]
async fn consumers_of_one_queue_share_its_messages_without_duplicates() {
    let (server, _clock) = frozen().await;
    let alice = server.alice().await;
    queue_with(&alice, "shared", 30).await;
    let ids: BTreeSet<u64> = send_n(&alice, "shared", 200).await.into_iter().collect();

    let acked = Arc::new(AtomicUsize::new(0));
    let done = CancellationToken::new();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let account = server.alice().await;
        let mut consumer = account
            .queue("shared")
            .consume(ConsumeOptions::new().credit(8).batch_max(4))
            .await
            .unwrap();
        let (acked, done) = (acked.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let delivery = tokio::select! {
                    item = consumer.next() => item.unwrap().unwrap(),
                    () = done.cancelled() => break,
                };
                got.push(delivery.msg_id());
                delivery.ack().await.unwrap();
                if acked.fetch_add(1, Ordering::AcqRel) + 1 == 200 {
                    done.cancel();
                }
            }
            got
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let unique: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "a message was delivered twice");
    assert_eq!(unique, ids, "every message was delivered");
    wait_for_counts(&alice, "shared", 0, 0).await;
    server.stop().await;
}

#[tokio::test]
async fn a_full_consumer_does_not_swallow_a_long_polls_message() {
    let (server, _clock) = frozen().await;
    let alice = server.alice().await;
    queue_with(&alice, "mixed", 30).await;
    send_n(&alice, "mixed", 1).await;
    let mut consumer = alice
        .queue("mixed")
        .consume(ConsumeOptions::new().credit(1))
        .await
        .unwrap();
    let held = next(&mut consumer).await;
    // The consumer holds a waiter slot; a long poll joins it.
    let poll = {
        let queue = server.alice().await.queue("mixed");
        tokio::spawn(async move { queue.receive_message(Some(30)).await })
    };
    server.wait_for_waiters(2).await;
    let id = alice
        .queue("mixed")
        .send_message("for the poll", 0)
        .await
        .unwrap();
    let message = poll.await.unwrap().unwrap();
    assert_eq!(
        message.msg_id, id,
        "the full consumer left it to the long poll"
    );

    // With room, the consumer and long polls both take messages, each exactly once.
    held.ack().await.unwrap();
    let polls: Vec<_> = (0..2)
        .map(|_| {
            let queue = alice.queue("mixed");
            tokio::spawn(async move { queue.receive_message(Some(30)).await })
        })
        .collect();
    server.wait_for_waiters(3).await;
    let ids: BTreeSet<u64> = send_n(&alice, "mixed", 3).await.into_iter().collect();
    let mut seen = BTreeSet::new();
    for poll in polls {
        assert!(seen.insert(poll.await.unwrap().unwrap().msg_id));
    }
    let last = next(&mut consumer).await;
    assert!(seen.insert(last.msg_id()));
    assert_eq!(seen, ids);
    server.stop().await;
}

#[tokio::test]
async fn dead_letter_policies_apply_to_messages_a_consumer_gives_back() {
    let (server, _clock) = frozen().await;
    let alice = server.alice().await;
    queue_with(&alice, "dlq", 30).await;
    alice
        .create_queue(
            "src",
            &QueueAttributeSet {
                dead_letter_policy: Some(Some(DeadLetterPolicy {
                    dead_letter_queue: "dlq".into(),
                    policy: 0,
                    max_receive_count: 1,
                    max_time_to_live_seconds: 0,
                })),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let id = alice.queue("src").send_message("once", 0).await.unwrap();
    let mut consumer = alice
        .queue("src")
        .consume(ConsumeOptions::new())
        .await
        .unwrap();
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.msg_id(), id);
    // Handed back after its one allowed receive: it goes to the dead-letter queue.
    delivery.release().await.unwrap();
    let dead = alice.queue("dlq").receive_message(Some(5)).await.unwrap();
    assert_eq!(dead.body, Bytes::from_static(b"once"));
    assert_eq!(dead.dead_letter.unwrap().source_queue, "src");
    consumer.cancel().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn one_connection_per_call_mode_gives_the_consumer_its_own_connection() {
    let (server, _clock) = frozen().await;
    let alice = server.alice().await;
    queue_with(&alice, "percall", 30).await;
    send_n(&alice, "percall", 40).await;
    let config = ClientConfig::default().persistent_connection(false);
    let account = server.connect(ALICE, config).await;
    let mut consumer = account
        .queue("percall")
        .consume(ConsumeOptions::new().credit(16).batch_max(8))
        .await
        .unwrap();
    // Acks go over the consumer's connection and free its credit: 40 messages through 16,
    // a full window at a time.
    let mut seen = BTreeSet::new();
    let acker = consumer.acker();
    while seen.len() < 40 {
        let mut batch = Vec::new();
        while batch.len() < 16.min(40 - seen.len()) {
            batch.push(next(&mut consumer).await);
        }
        for delivery in &batch {
            assert!(seen.insert(delivery.msg_id()));
        }
        acker.ack_deliveries(&batch).await.unwrap();
    }
    wait_for_counts(&alice, "percall", 0, 0).await;
    // Acking a dead handle reports it, with the batch's failure list.
    let error = acker.ack_all(&["0".repeat(32)]).await.unwrap_err();
    assert_eq!(code(&error), (6020, 10290));
    assert_eq!(error.batch_failures().len(), 1);
    drop(consumer);
    server.wait_for_consumers(0).await;
    server.stop().await;
}

#[tokio::test]
async fn a_broken_connection_ends_the_stream_with_a_connection_error() {
    let (server, _clock) = frozen().await;
    let alice = server.alice().await;
    queue_with(&alice, "broken", 30).await;
    let mut consumer = alice
        .queue("broken")
        .consume(ConsumeOptions::new())
        .await
        .unwrap();
    server.wait_for_consumers(1).await;
    server.stop().await;
    let item = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap();
    let error = item.expect("an error item").unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
    assert!(consumer.next().await.is_none());
}

/// Big bodies go out of the broker in pieces (not copied into the Delivery frame); whatever the
/// mix of big and small, every body arrives whole, in one frame with its fields.
#[tokio::test]
async fn big_and_small_bodies_arrive_whole() {
    let (server, _clock) = frozen().await;
    let account = server.alice().await;
    account
        .create_queue(
            "big",
            &QueueAttributeSet {
                max_msg_size_bytes: Some(1024 * 1024),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let queue = account.queue("big");
    // Sizes around the 4 KiB cut and 64 KiB; each body filled with its index.
    let sizes = [1usize, 4095, 4096, 4097, 65_536, 10, 65_536, 3];
    let mut sent = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let body = Bytes::from(vec![i as u8; size]);
        let id = queue.send_message(body.clone(), 0).await.unwrap();
        sent.push((id, body));
    }
    // The same sizes again, all in flight at once: the client's writer puts small frames in
    // its buffer and writes frames from 16 KiB on from where they are, in one round.
    let bodies: Vec<Bytes> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| Bytes::from(vec![(100 + i) as u8; size]))
        .collect();
    let ids = futures::future::join_all(
        bodies
            .iter()
            .map(|body| queue.send_message(body.clone(), 0)),
    )
    .await;
    for (id, body) in ids.into_iter().zip(bodies) {
        sent.push((id.unwrap(), body));
    }
    let mut consumer = queue
        .consume(ConsumeOptions::new().credit(64).batch_max(64))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let delivery = next(&mut consumer).await;
        got.push((delivery.msg_id(), delivery.body().clone()));
    }
    got.sort_by_key(|(id, _)| *id);
    sent.sort_by_key(|(id, _)| *id);
    assert!(got == sent, "bodies changed on the way");
    consumer.cancel().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_delete_on_another_connection_frees_the_consumers_credit() {
    // The clock stands still, so nothing expires: only the delete elsewhere can free the place.
    let (server, _clock) = frozen().await;
    let alice = server.alice().await;
    queue_with(&alice, "elsewhere", 30).await;
    let ids = send_n(&alice, "elsewhere", 2).await;
    let mut consumer = alice
        .queue("elsewhere")
        .consume(ConsumeOptions::new().credit(1))
        .await
        .unwrap();
    let first = next(&mut consumer).await;
    assert_eq!(first.msg_id(), ids[0]);
    // Another connection (a worker that got the handle passed on) deletes it.
    let other = server.connect(ALICE, ClientConfig::default()).await;
    other
        .queue("elsewhere")
        .delete_message(first.receipt_handle())
        .await
        .unwrap();
    // The consumer notices at its next recheck (paused time: virtual seconds) and takes the
    // second message, without any visibility deadline passing.
    let second = next(&mut consumer).await;
    assert_eq!(second.msg_id(), ids[1]);
    second.ack().await.unwrap();
    consumer.cancel().await.unwrap();
    server.stop().await;
}
