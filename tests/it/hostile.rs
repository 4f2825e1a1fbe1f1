//! Hostile clients over real TCP: invalid field values in otherwise valid frames, floods, idle
//! and slow connections, and every configured limit. Each case gets its documented error or a
//! closed connection; the broker stays up and a well-behaved client keeps working with no
//! message lost. Deadlines are tested on paused Tokio time, never by sleeping.

use std::time::Duration;

use bytes::Bytes;
use cmqd::client::QueueAttributeSet;
use cmqd::config::Limits;
use cmqd::model::DeadLetterPolicy;
use cmqd::protocol::{Reply, Request, Response};
use tokio::io::AsyncWriteExt;

use crate::support::{error_code, RawConn, TestServer, ALICE};

fn attrs() -> QueueAttributeSet {
    QueueAttributeSet::default()
}

/// A well-behaved client's round trip: send one message and get it back.
async fn still_serves(server: &TestServer, queue: &str) {
    let alice = server.alice().await;
    let q = alice.queue(queue);
    let _ = q.create(&attrs()).await;
    let id = q.send_message("still here", 0).await.unwrap();
    let got = q.receive_message(Some(1)).await.unwrap();
    assert_eq!(got.msg_id, id);
    q.delete_message(&got.receipt_handle).await.unwrap();
}

#[tokio::test]
async fn every_invalid_field_gets_its_documented_error() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    alice.create_queue("q", &attrs()).await.unwrap();
    alice.create_queue("dlq", &attrs()).await.unwrap();
    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;

    let q = || "q".to_string();
    let set = |a: QueueAttributeSet| Request::SetQueueAttributes {
        queue: q(),
        attributes: a,
    };
    let dlp = |queue: &str, policy: u8, receives: u32, ttl: u32| QueueAttributeSet {
        dead_letter_policy: Some(Some(DeadLetterPolicy {
            dead_letter_queue: queue.into(),
            policy,
            max_receive_count: receives,
            max_time_to_live_seconds: ttl,
        })),
        ..Default::default()
    };
    let cases: Vec<(&str, Request, (u16, u16))> = vec![
        (
            "empty queue name",
            Request::CreateQueue {
                queue: String::new(),
                attributes: attrs(),
            },
            (4000, 10020),
        ),
        (
            "name starting with a digit",
            Request::CreateQueue {
                queue: "1q".into(),
                attributes: attrs(),
            },
            (4000, 10020),
        ),
        (
            "name with an underscore",
            Request::CreateQueue {
                queue: "a_b".into(),
                attributes: attrs(),
            },
            (4000, 10020),
        ),
        (
            "name of 65 characters",
            Request::CreateQueue {
                queue: "a".repeat(65),
                attributes: attrs(),
            },
            (4000, 10020),
        ),
        (
            "heap below 1000",
            set(QueueAttributeSet {
                max_msg_heap_num: Some(999),
                ..Default::default()
            }),
            (4000, 10350),
        ),
        (
            "polling wait 31",
            set(QueueAttributeSet {
                polling_wait_seconds: Some(31),
                ..Default::default()
            }),
            (4000, 10350),
        ),
        (
            "visibility 0",
            set(QueueAttributeSet {
                visibility_timeout_seconds: Some(0),
                ..Default::default()
            }),
            (4000, 10350),
        ),
        (
            "max size 1023",
            set(QueueAttributeSet {
                max_msg_size_bytes: Some(1023),
                ..Default::default()
            }),
            (4000, 10350),
        ),
        (
            "retention 59",
            set(QueueAttributeSet {
                msg_retention_seconds: Some(59),
                ..Default::default()
            }),
            (4000, 10350),
        ),
        (
            "rewind over retention",
            set(QueueAttributeSet {
                msg_retention_seconds: Some(600),
                rewind_seconds: Some(601),
                ..Default::default()
            }),
            (4000, 10700),
        ),
        (
            "dead letters to itself",
            set(dlp("q", 0, 5, 0)),
            (4000, 10110),
        ),
        (
            "dead letters to nowhere",
            set(dlp("nowhere", 0, 5, 0)),
            (4440, 10100),
        ),
        ("policy 7", set(dlp("dlq", 7, 5, 0)), (4000, 10110)),
        ("receive count 0", set(dlp("dlq", 0, 0, 0)), (4000, 10350)),
        (
            "time to live 299",
            set(dlp("dlq", 1, 0, 299)),
            (4000, 10350),
        ),
        (
            "list limit 1001",
            Request::ListQueue {
                search_word: String::new(),
                offset: 0,
                limit: 1001,
            },
            (4000, 10350),
        ),
        (
            "send to a missing queue",
            Request::SendMessage {
                queue: "nope".into(),
                body: Bytes::from_static(b"x"),
                delay_seconds: 0,
            },
            (4440, 10100),
        ),
        (
            "empty body",
            Request::SendMessage {
                queue: q(),
                body: Bytes::new(),
                delay_seconds: 0,
            },
            (4000, 10120),
        ),
        (
            "body over maxMsgSize",
            Request::SendMessage {
                queue: q(),
                body: Bytes::from(vec![0u8; 65_537]),
                delay_seconds: 0,
            },
            (4400, 10230),
        ),
        (
            "delay over the maximum",
            Request::SendMessage {
                queue: q(),
                body: Bytes::from_static(b"x"),
                delay_seconds: 3601,
            },
            (4000, 10692),
        ),
        (
            "empty batch",
            Request::BatchSendMessage {
                queue: q(),
                bodies: vec![],
                delay_seconds: 0,
            },
            (4000, 10370),
        ),
        (
            "batch with an empty body",
            Request::BatchSendMessage {
                queue: q(),
                bodies: vec![Bytes::from_static(b"x"), Bytes::new()],
                delay_seconds: 0,
            },
            (4000, 10120),
        ),
        (
            "polling wait over 30",
            Request::ReceiveMessage {
                queue: q(),
                polling_wait_seconds: Some(31),
            },
            (4000, 10350),
        ),
        (
            "receive 0 messages",
            Request::BatchReceiveMessage {
                queue: q(),
                num_of_msg: 0,
                polling_wait_seconds: Some(0),
            },
            (4000, 10370),
        ),
        (
            "receive 17 messages",
            Request::BatchReceiveMessage {
                queue: q(),
                num_of_msg: 17,
                polling_wait_seconds: Some(0),
            },
            (4000, 10370),
        ),
        (
            "malformed handle",
            Request::DeleteMessage {
                queue: q(),
                receipt_handle: "zz".into(),
            },
            (4000, 10470),
        ),
        (
            "unknown handle",
            Request::DeleteMessage {
                queue: q(),
                receipt_handle: "0".repeat(32),
            },
            (4430, 10260),
        ),
        (
            "uppercase handle",
            Request::DeleteMessage {
                queue: q(),
                receipt_handle: "A".repeat(32),
            },
            (4000, 10470),
        ),
        (
            "batch delete of none",
            Request::BatchDeleteMessage {
                queue: q(),
                receipt_handles: vec![],
            },
            (4000, 10370),
        ),
        (
            "visibility over 12 h",
            Request::ChangeMessageVisibility {
                queue: q(),
                receipt_handle: "0".repeat(32),
                visibility_timeout_seconds: 43_201,
            },
            (4000, 10350),
        ),
        (
            "peek 0",
            Request::PeekMessage {
                queue: q(),
                num_of_msg: 0,
            },
            (4000, 10370),
        ),
        (
            "peek 17",
            Request::PeekMessage {
                queue: q(),
                num_of_msg: 17,
            },
            (4000, 10370),
        ),
        (
            "rewind without rewind",
            Request::RewindQueue {
                queue: q(),
                start_consume_time: 0,
            },
            (6050, 10670),
        ),
        (
            "redrive 0",
            Request::RedriveDeadLetters {
                queue: "dlq".into(),
                limit: 0,
            },
            (4000, 10350),
        ),
        (
            "hello twice",
            Request::Hello {
                min_version: 1,
                max_version: 1,
                client_name: String::new(),
            },
            (4000, 10110),
        ),
    ];
    let mut wrong = Vec::new();
    for (i, (what, request, expected)) in cases.into_iter().enumerate() {
        let response = raw.call(100 + i as u32, &request).await;
        if error_code(&response) != Some(expected) {
            wrong.push(format!("{what}: expected {expected:?}, got {response:?}"));
        }
    }
    assert!(wrong.is_empty(), "wrong replies:\n{}", wrong.join("\n"));
    // None of this disturbed anything.
    assert_eq!(
        raw.call(999, &Request::Ping).await,
        Response::Ok(Reply::Empty)
    );
    still_serves(&server, "q").await;
    server.stop().await;
}

#[tokio::test]
async fn a_flood_of_pipelined_requests_is_answered_in_full() {
    const REQUESTS: u32 = 20_000;
    let server = TestServer::start().await;
    let alice = server.alice().await;
    alice.create_queue("flood", &attrs()).await.unwrap();
    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;
    let (mut reader, mut writer) = (raw.frames, raw.writer);
    let writing = tokio::spawn(async move {
        let mut buf = bytes::BytesMut::new();
        for i in 0..REQUESTS {
            let request = Request::SendMessage {
                queue: "flood".into(),
                body: Bytes::from(format!("m{i}")),
                delay_seconds: 0,
            };
            cmqd::protocol::encode_request(i, &request, &mut buf).unwrap();
            if buf.len() > 64 * 1024 {
                writer.write_all(&buf).await.unwrap();
                buf.clear();
            }
        }
        writer.write_all(&buf).await.unwrap();
        writer
    });
    let mut answered = 0;
    while answered < REQUESTS {
        let frame = futures::StreamExt::next(&mut reader)
            .await
            .unwrap()
            .unwrap();
        let response = cmqd::protocol::parse_response(&frame).unwrap();
        assert!(
            matches!(response, Response::Ok(Reply::Sent { .. })),
            "{response:?}"
        );
        answered += 1;
    }
    let _writer = writing.await.unwrap();
    let stored = alice
        .queue("flood")
        .get_attributes()
        .await
        .unwrap()
        .active_msg_num;
    assert_eq!(stored, u64::from(REQUESTS));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_do_not_slow_the_others() {
    const IDLE: usize = 2_000;
    let server = TestServer::start().await;
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        // Half authenticate; the other half never do, spread over four source addresses to
        // stay under the cap on connections in their handshake per address.
        let from = std::net::IpAddr::from([127, 0, 0, 2 + (i % 4) as u8]);
        let mut raw = if i % 2 == 0 {
            RawConn::connect(server.addr()).await
        } else {
            RawConn::connect_from(from, server.addr()).await
        };
        if i % 2 == 0 {
            raw.handshake(ALICE).await;
        }
        idle.push(raw);
    }
    still_serves(&server, "busy").await;
    drop(idle);
    still_serves(&server, "busy").await;
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_dropped_and_others_carry_on() {
    let limits = Limits {
        inflight_requests_per_connection_max: 64,
        write_seconds: 5,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let alice = server.alice().await;
    let queue = alice.queue("big");
    queue.create(&attrs()).await.unwrap();
    queue.send_message(vec![b'x'; 65_536], 0).await.unwrap();
    let before = server.connections();

    // Ask for the 64 KiB message over and over and never read a reply: the socket buffers
    // fill, the broker stops reading at 64 requests in flight, and when a write has been stuck
    // for the write deadline it closes the connection instead of buffering more.
    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;
    let mut buf = bytes::BytesMut::new();
    for i in 0..4_000u32 {
        let request = Request::PeekMessage {
            queue: "big".into(),
            num_of_msg: 1,
        };
        cmqd::protocol::encode_request(10 + i, &request, &mut buf).unwrap();
    }
    let RawConn { mut writer, frames } = raw;
    // The write stalls once the broker stops reading; it runs on its own task.
    let writing = tokio::spawn(async move {
        let _ = writer.write_all(&buf).await;
        writer
    });
    // Virtual time: the broker's write deadline passes while this waits.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while server.connections() > before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck client was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(frames);
    writing.abort();
    still_serves(&server, "other").await;
    server.stop().await;
}

#[tokio::test]
async fn connections_per_address_are_limited() {
    let limits = Limits {
        connections_per_ip_max: 3,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut raw = RawConn::connect(server.addr()).await;
        assert_eq!(
            raw.call(1, &Request::Ping).await,
            Response::Ok(Reply::Empty)
        );
        open.push(raw);
    }
    let mut refused = RawConn::connect(server.addr()).await;
    refused.send(1, &Request::Ping).await;
    assert!(
        refused.next_frame().await.is_none(),
        "the fourth connection is closed at once"
    );
    drop(open);
    // Closed connections give their places back (the broker notices the close first).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = RawConn::connect(server.addr()).await;
        again.send(1, &Request::Ping).await;
        if again.next_frame().await.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "places were not given back"
        );
        tokio::task::yield_now().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn repeated_failed_authentication_blocks_the_address() {
    let limits = Limits {
        auth_failures_per_ip_max: 3,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    for _ in 0..3 {
        let err = cmqd::client::Account::connect(
            &server.addr().to_string(),
            ALICE.0,
            "wrong-secret-key-000000",
            Default::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code().map(|c| c.code), Some(4100));
    }
    // Now even the right key is refused from this address, for the rest of the minute, with
    // an error frame that says so (spec/README.md, "Connection lifecycle").
    let err = cmqd::client::Account::connect(
        &server.addr().to_string(),
        ALICE.0,
        ALICE.1,
        Default::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), cmqd::client::ErrorKind::Cmq, "{err}");
    assert_eq!(
        err.code(),
        Some(cmqd::error::ErrorCode::AUTH_THROTTLED),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn silent_connections_are_closed_at_the_handshake_and_idle_deadlines() {
    let limits = Limits {
        handshake_seconds: 5,
        idle_seconds: 60,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    // Never says Hello.
    let mut mute = RawConn::connect(server.addr()).await;
    assert!(mute.next_frame().await.is_none());
    // Authenticated, then silent.
    let mut quiet = RawConn::connect(server.addr()).await;
    quiet.handshake(ALICE).await;
    let started = tokio::time::Instant::now();
    assert!(quiet
        .next_frame_within(Duration::from_secs(600))
        .await
        .is_none());
    assert!(started.elapsed() >= Duration::from_secs(60));
    server.stop().await;
}

#[tokio::test]
async fn requests_in_flight_are_bounded_per_connection() {
    let limits = Limits {
        inflight_requests_per_connection_max: 2,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let alice = server.alice().await;
    alice.create_queue("held", &attrs()).await.unwrap();
    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;
    // Two long polls take both places; the Ping behind them is not even read.
    for id in [10, 11] {
        raw.send(
            id,
            &Request::ReceiveMessage {
                queue: "held".into(),
                polling_wait_seconds: Some(30),
            },
        )
        .await;
    }
    server.wait_for_waiters(2).await;
    raw.send(12, &Request::Ping).await;
    alice
        .queue("held")
        .send_message("release one", 0)
        .await
        .unwrap();
    let (first, response) = raw.recv().await;
    assert!(
        matches!(response, Response::Ok(Reply::Received(_))),
        "{response:?}"
    );
    assert!(first == 10 || first == 11);
    let (second, response) = raw.recv().await;
    assert_eq!(
        (second, response),
        (12, Response::Ok(Reply::Empty)),
        "the Ping came after a place freed up"
    );
    server.stop().await;
}

#[tokio::test]
async fn long_poll_waiters_are_bounded_per_queue() {
    let limits = Limits {
        waiters_per_queue_max: 2,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let alice = server.alice().await;
    let queue = alice.queue("crowded");
    queue.create(&attrs()).await.unwrap();
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let queue = queue.clone();
            tokio::spawn(async move { queue.receive_message(Some(30)).await })
        })
        .collect();
    server.wait_for_waiters(2).await;
    // The third waiter is answered at once with 7000 rather than queued.
    let err = queue.receive_message(Some(30)).await.unwrap_err();
    assert!(err.is_no_message());
    queue.batch_send_message(["a", "b"], 0).await.unwrap();
    for task in waiting {
        task.await.unwrap().unwrap();
    }
    server.stop().await;
}

#[tokio::test]
async fn queues_per_account_and_body_memory_are_bounded() {
    let limits = Limits {
        queues_per_account_max: 3,
        body_memory_bytes_max: 1024 * 1024,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let alice = server.alice().await;
    for name in ["a", "b", "c"] {
        alice.create_queue(name, &attrs()).await.unwrap();
    }
    let err = alice.create_queue("d", &attrs()).await.unwrap_err();
    assert_eq!(err.code().map(|c| (c.code, c.module)), Some((4450, 10220)));
    // Bob has his own quota.
    server
        .bob()
        .await
        .create_queue("d", &attrs())
        .await
        .unwrap();

    let queue = alice.queue("a");
    let body = vec![b'm'; 60 * 1024];
    let mut stored = 0;
    let err = loop {
        match queue.send_message(body.clone(), 0).await {
            Ok(_) => stored += 1,
            Err(err) => break err,
        }
        assert!(stored < 100, "the memory limit never stopped a send");
    };
    assert_eq!(err.code().map(|c| (c.code, c.module)), Some((6000, 10090)));
    assert!(
        stored >= 15,
        "1 MiB holds at least 15 messages of 60 KiB, stored {stored}"
    );
    // Deleting frees memory for new sends.
    let got = queue.receive_message(Some(0)).await.unwrap();
    queue.delete_message(&got.receipt_handle).await.unwrap();
    queue.send_message(body, 0).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn the_connection_limit_refuses_the_excess() {
    let limits = Limits {
        connections_max: 2,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    let mut a = RawConn::connect(server.addr()).await;
    let mut b = RawConn::connect(server.addr()).await;
    assert_eq!(a.call(1, &Request::Ping).await, Response::Ok(Reply::Empty));
    assert_eq!(b.call(1, &Request::Ping).await, Response::Ok(Reply::Empty));
    let mut c = RawConn::connect(server.addr()).await;
    c.send(1, &Request::Ping).await;
    assert!(c.next_frame().await.is_none());
    server.stop().await;
}

/// The broker-wide budget of request bytes in flight: four connections pipelining 200 frames
/// of about 48 KiB each (9.6 MiB) under a 256 KiB budget are answered in full, in order and
/// without loss; the budget is never overdrawn (a semaphore) and is whole again afterwards;
/// a small client keeps working meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bytes_in_flight_are_held_to_the_budget_and_every_request_is_answered() {
    const BUDGET: usize = 256 * 1024;
    const PER_CONNECTION: u32 = 200;
    let server = TestServer::start_with(Limits {
        inflight_request_bytes_max: BUDGET,
        frame_bytes_max: BUDGET,
        ..Limits::default()
    })
    .await;
    let units = BUDGET / cmqd::limits::INFLIGHT_REQUEST_BYTES_UNIT;
    assert_eq!(
        server.running.shared().request_bytes.available_permits(),
        units
    );
    let alice = server.alice().await;
    alice.create_queue("budget", &attrs()).await.unwrap();
    let mut floods = Vec::new();
    for c in 0..4u32 {
        let mut raw = RawConn::connect(server.addr()).await;
        raw.handshake(ALICE).await;
        floods.push(tokio::spawn(async move {
            let (mut reader, mut writer) = (raw.frames, raw.writer);
            let writing = tokio::spawn(async move {
                let mut buf = bytes::BytesMut::new();
                for i in 0..PER_CONNECTION {
                    let request = Request::SendMessage {
                        queue: "budget".into(),
                        body: Bytes::from(vec![b'a' + (c as u8); 48 * 1024]),
                        delay_seconds: 0,
                    };
                    cmqd::protocol::encode_request(i, &request, &mut buf).unwrap();
                    writer.write_all(&buf).await.unwrap();
                    buf.clear();
                }
                writer
            });
            for i in 0..PER_CONNECTION {
                let frame = futures::StreamExt::next(&mut reader)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(frame.request_id, i, "replies in order");
                let response = cmqd::protocol::parse_response(&frame).unwrap();
                assert!(
                    matches!(response, Response::Ok(Reply::Sent { .. })),
                    "{response:?}"
                );
            }
            writing.await.unwrap()
        }));
    }
    still_serves(&server, "budget-small").await;
    for flood in floods {
        tokio::time::timeout(Duration::from_secs(60), flood)
            .await
            .expect("the floods were answered")
            .unwrap();
    }
    let q = alice.queue("budget");
    assert_eq!(
        q.get_attributes().await.unwrap().active_msg_num,
        4 * u64::from(PER_CONNECTION)
    );
    // Every share is given back once its reply is written.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.running.shared().request_bytes.available_permits() != units {
        assert!(
            tokio::time::Instant::now() < deadline,
            "request bytes not given back"
        );
        tokio::task::yield_now().await;
    }
}

/// `call`'s answer; fails the test when it takes more than 10 s.
async fn answered_within_10s<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("a reading client is not held up by one that does not read")
}

/// A client that pipelines requests and never reads its replies holds only its own
/// connection's places, not the broker-wide request-bytes budget: once the replies it does not
/// read fill the socket and its 1,024 places are taken, another client's large sends still go
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_does_not_hold_the_request_bytes_budget() {
    const BUDGET: usize = 256 * 1024;
    const DEAF_MESSAGES: usize = 1_500;
    const _: () = assert!(DEAF_MESSAGES % 4 == 0);
    let server = TestServer::start_with(Limits {
        inflight_request_bytes_max: BUDGET,
        frame_bytes_max: BUDGET,
        ..Limits::default()
    })
    .await;
    let alice = server.alice().await;
    let long_visibility = QueueAttributeSet {
        visibility_timeout_seconds: Some(3_600),
        ..attrs()
    };
    alice.create_queue("deaf", &long_visibility).await.unwrap();
    alice.create_queue("reading", &attrs()).await.unwrap();
    let deaf = alice.queue("deaf");
    let body = Bytes::from(vec![b'd'; 48 * 1024]);
    for _ in 0..DEAF_MESSAGES / 4 {
        deaf.batch_send_message(vec![body.clone(); 4], 0)
            .await
            .unwrap();
    }
    // 1,500 receives of 48 KiB messages whose replies are never read: 72 MiB of replies, far
    // more than the socket buffers hold.
    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;
    let (reader, mut writer) = (raw.frames, raw.writer);
    let mut buf = bytes::BytesMut::new();
    for i in 0..DEAF_MESSAGES as u32 {
        let request = Request::ReceiveMessage {
            queue: "deaf".into(),
            polling_wait_seconds: Some(0),
        };
        cmqd::protocol::encode_request(i, &request, &mut buf).unwrap();
    }
    writer.write_all(&buf).await.unwrap();
    // Once 1,024 are received, at least ~800 replies (all but what the socket buffers hold,
    // about 10 MiB) wait unwritten: the deaf connection's places are all taken. Every call of
    // the reading client is answered within 10 s meanwhile.
    let mut received = 0;
    for _ in 0..100_000 {
        received = answered_within_10s(deaf.get_attributes())
            .await
            .unwrap()
            .inactive_msg_num;
        if received >= 1_024 {
            break;
        }
    }
    assert!(
        received >= 1_024,
        "only {received} of the deaf client's receives were made"
    );
    let reading = alice.queue("reading");
    for _ in 0..20 {
        answered_within_10s(reading.send_message(Bytes::from(vec![b'w'; 48 * 1024]), 0))
            .await
            .unwrap();
    }
    drop(writer);
    drop(reader);
}
