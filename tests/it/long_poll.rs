//! Long polling over TCP: waits end with a message or with 7000, never swallow a message, and
//! never hold up other requests on the same connection. Nothing here sleeps: tests wait on the
//! broker's waiter count, and the timeout case runs on paused Tokio time.

use std::time::Duration;

use cmqd::client::QueueAttributeSet;
use cmqd::protocol::{Reply, Request, Response};

use crate::support::{error_code, RawConn, TestServer, ALICE};

#[tokio::test]
async fn a_long_poll_returns_a_message_sent_during_the_wait() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let queue = alice.queue("lp");
    queue.create(&QueueAttributeSet::default()).await.unwrap();

    let waiting = {
        let queue = queue.clone();
        tokio::spawn(async move { queue.receive_message(Some(20)).await })
    };
    server.wait_for_waiters(1).await;
    let sender = server.alice().await;
    let id = sender.queue("lp").send_message("wake up", 0).await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the long poll must end when the message arrives, not after 20 s")
        .unwrap()
        .unwrap();
    assert_eq!(message.msg_id, id);
    server.wait_for_waiters(0).await;
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_long_poll_that_times_out_returns_7000() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let queue = alice.queue("empty");
    queue.create(&QueueAttributeSet::default()).await.unwrap();
    let started = tokio::time::Instant::now();
    let err = queue.receive_message(Some(30)).await.unwrap_err();
    assert!(err.is_no_message(), "{err}");
    assert!(
        started.elapsed() >= Duration::from_secs(30),
        "waited the full 30 s of (paused) time"
    );
    // The queue's default wait applies when the request names none.
    queue
        .set_attributes(&QueueAttributeSet {
            polling_wait_seconds: Some(5),
            ..Default::default()
        })
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = queue.batch_receive_message(4, None).await.unwrap_err();
    assert!(err.is_no_message());
    assert!(started.elapsed() >= Duration::from_secs(5));
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_poll_does_not_swallow_a_message() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let queue = alice.queue("gone");
    queue.create(&QueueAttributeSet::default()).await.unwrap();

    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;
    raw.send(
        10,
        &Request::ReceiveMessage {
            queue: "gone".into(),
            polling_wait_seconds: Some(30),
        },
    )
    .await;
    server.wait_for_waiters(1).await;
    drop(raw);
    // The broker notices the closed connection and drops the waiter without taking anything.
    server.wait_for_waiters(0).await;
    let id = queue.send_message("still here", 0).await.unwrap();
    let message = queue.receive_message(Some(0)).await.unwrap();
    assert_eq!(message.msg_id, id);
    assert_eq!(message.dequeue_count, 1, "nobody received it before");
    server.stop().await;
}

#[tokio::test]
async fn a_long_poll_does_not_delay_other_requests_on_the_connection() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    alice
        .create_queue("slow", &QueueAttributeSet::default())
        .await
        .unwrap();
    alice
        .create_queue("fast", &QueueAttributeSet::default())
        .await
        .unwrap();

    let poll = {
        let queue = alice.queue("slow");
        tokio::spawn(async move { queue.receive_message(Some(30)).await })
    };
    server.wait_for_waiters(1).await;
    // Same Account, same persistent connection: these complete while the poll is pending.
    let fast = alice.queue("fast");
    for i in 0..50 {
        fast.send_message(format!("m{i}"), 0).await.unwrap();
    }
    let got = fast.batch_receive_message(16, Some(0)).await.unwrap();
    assert_eq!(got.len(), 16);
    assert!(!poll.is_finished(), "the long poll is still waiting");
    alice.queue("slow").send_message("done", 0).await.unwrap();
    assert_eq!(&poll.await.unwrap().unwrap().body[..], b"done");
    server.stop().await;
}

#[tokio::test]
async fn pipelined_replies_may_come_back_out_of_order() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    alice
        .create_queue("pipe", &QueueAttributeSet::default())
        .await
        .unwrap();
    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;
    // Request 100 waits; request 101 is answered first.
    raw.send(
        100,
        &Request::ReceiveMessage {
            queue: "pipe".into(),
            polling_wait_seconds: Some(30),
        },
    )
    .await;
    server.wait_for_waiters(1).await;
    raw.send(
        101,
        &Request::SendMessage {
            queue: "pipe".into(),
            body: "x".into(),
            delay_seconds: 0,
        },
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (id, response) = raw.recv().await;
        assert!(error_code(&response).is_none(), "{response:?}");
        seen.push((id, matches!(response, Response::Ok(Reply::Received(_)))));
    }
    assert_eq!(seen, [(101, false), (100, true)]);
    server.stop().await;
}
