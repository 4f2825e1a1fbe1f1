//! Every queue action through the Rust client, over real TCP.

use bytes::Bytes;
use cmqd::client::{ClientConfig, DeadLetterPolicy, ErrorKind, MessageState, QueueAttributeSet};

use crate::support::{TestServer, ALICE};

fn code(error: &cmqd::client::Error) -> (u16, u16) {
    let code = error.code().expect("a CMQ error code");
    (code.code, code.module)
}

#[tokio::test]
async fn queue_lifecycle_and_attributes() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    assert_eq!(alice.name().await.unwrap(), "alice");

    let attrs = QueueAttributeSet {
        visibility_timeout_seconds: Some(45),
        max_msg_size_bytes: Some(2048),
        msg_retention_seconds: Some(3600),
        rewind_seconds: Some(600),
        polling_wait_seconds: Some(3),
        max_msg_heap_num: Some(5000),
        ..Default::default()
    };
    let id = alice.create_queue("orders", &attrs).await.unwrap();
    let queue = alice.queue("orders");
    let got = queue.get_attributes().await.unwrap();
    assert_eq!(got.queue_id, id);
    assert_eq!(got.queue_name, "orders");
    assert_eq!(got.visibility_timeout_seconds, 45);
    assert_eq!(got.max_msg_size_bytes, 2048);
    assert_eq!(got.msg_retention_seconds, 3600);
    assert_eq!(got.rewind_seconds, 600);
    assert_eq!(got.polling_wait_seconds, 3);
    assert_eq!(got.max_msg_heap_num, 5000);
    assert_eq!(got.active_msg_num, 0);
    assert!(got.create_time_ms > 0);

    // Case-insensitive uniqueness (4460), bad names (4000/10020), bad ranges (4000).
    let err = alice
        .create_queue("ORDERS", &QueueAttributeSet::default())
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code, 4460);
    let err = alice
        .create_queue("9starts-with-digit", &QueueAttributeSet::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4000, 10020));
    let bad = QueueAttributeSet {
        visibility_timeout_seconds: Some(43_201),
        ..Default::default()
    };
    assert_eq!(
        alice
            .create_queue("other", &bad)
            .await
            .unwrap_err()
            .code()
            .unwrap()
            .code,
        4000
    );

    queue
        .set_attributes(&QueueAttributeSet {
            visibility_timeout_seconds: Some(60),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = queue.get_attributes().await.unwrap();
    assert_eq!(got.visibility_timeout_seconds, 60);
    assert!(got.last_modify_time_ms >= got.create_time_ms);

    for name in ["alpha-1", "alpha-2", "beta"] {
        alice
            .create_queue(name, &QueueAttributeSet::default())
            .await
            .unwrap();
    }
    let (total, page) = alice.list_queue("", 0, 2).await.unwrap();
    assert_eq!(total, 4);
    assert_eq!(page.len(), 2);
    let (total, page) = alice.list_queue("ALPHA", 0, 20).await.unwrap();
    assert_eq!(total, 2);
    assert_eq!(
        page.iter()
            .map(|q| q.queue_name.as_str())
            .collect::<Vec<_>>(),
        ["alpha-1", "alpha-2"]
    );

    alice.delete_queue("beta").await.unwrap();
    let err = alice.queue("beta").get_attributes().await.unwrap_err();
    assert_eq!(code(&err), (4440, 10100));
    let err = alice.delete_queue("beta").await.unwrap_err();
    assert_eq!(err.code().unwrap().code, 4440);
    server.stop().await;
}

#[tokio::test]
async fn send_receive_delete_and_batches() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let queue = alice.queue("work");
    queue.create(&QueueAttributeSet::default()).await.unwrap();

    let id = queue.send_message("hello", 0).await.unwrap();
    let ids = queue
        .batch_send_message(
            ["a", "b", "c"].map(|s: &'static str| Bytes::from_static(s.as_bytes())),
            0,
        )
        .await
        .unwrap();
    assert_eq!(ids.len(), 3);
    // Over the protocol's batch limit: refused by the client before anything is sent, and
    // the connection serves the next call.
    let too_many = vec![Bytes::from_static(b"x"); cmqd::limits::BATCH_COUNT_MAX + 1];
    let err = queue.batch_send_message(too_many, 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let attrs = queue.get_attributes().await.unwrap();
    assert_eq!(attrs.active_msg_num, 4);

    let message = queue.receive_message(Some(0)).await.unwrap();
    assert_eq!(message.msg_id, id);
    assert_eq!(&message.body[..], b"hello");
    assert_eq!(message.dequeue_count, 1);
    assert!(message.next_visible_time_ms > message.enqueue_time_ms);
    let attrs = queue.get_attributes().await.unwrap();
    assert_eq!((attrs.active_msg_num, attrs.inactive_msg_num), (3, 1));
    queue.delete_message(&message.receipt_handle).await.unwrap();
    // A second delete with the same handle: 4430.
    let err = queue
        .delete_message(&message.receipt_handle)
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4430, 10260));
    let err = queue.delete_message("not-a-handle").await.unwrap_err();
    assert_eq!(code(&err), (4000, 10470));

    let batch = queue.batch_receive_message(16, Some(0)).await.unwrap();
    assert_eq!(batch.len(), 3, "a batch receive returns what is there");
    assert_eq!(batch.iter().map(|m| m.msg_id).collect::<Vec<_>>(), ids);
    let mut handles: Vec<String> = batch.iter().map(|m| m.receipt_handle.clone()).collect();
    queue.batch_delete_message(&handles[..1]).await.unwrap();
    // Partial failure: one stale handle, one good one -> 6010 with the failure listed.
    handles.push("0000000000000000ffffffffffffffff".into());
    let err = queue.batch_delete_message(&handles[1..]).await.unwrap_err();
    assert_eq!(err.code().unwrap().code, 6010);
    assert_eq!(err.batch_failures().len(), 1);
    assert_eq!(err.batch_failures()[0].code.code, 4430);
    // Total failure: 6020.
    let err = queue
        .batch_delete_message(&handles[1..2])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code, 6020);

    // Empty queue, no wait: 7000.
    let err = queue.receive_message(Some(0)).await.unwrap_err();
    assert!(err.is_no_message(), "{err}");
    assert_eq!(code(&err), (7000, 10200));

    // Limits: empty body, oversized body, oversized batch, delay out of range.
    assert_eq!(
        code(&queue.send_message("", 0).await.unwrap_err()),
        (4000, 10120)
    );
    let big = vec![b'x'; 65_537];
    assert_eq!(
        queue
            .send_message(big, 0)
            .await
            .unwrap_err()
            .code()
            .unwrap()
            .code,
        4400
    );
    let many: Vec<Bytes> = (0..17).map(|i| Bytes::from(format!("m{i}"))).collect();
    assert!(queue.batch_send_message(many, 0).await.is_err());
    assert_eq!(
        code(&queue.send_message("x", 3601).await.unwrap_err()),
        (4000, 10692)
    );
    assert!(queue.receive_message(Some(31)).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn delay_peek_visibility_purge_and_rewind() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let queue = alice.queue("misc");
    queue
        .create(&QueueAttributeSet {
            rewind_seconds: Some(3600),
            ..Default::default()
        })
        .await
        .unwrap();

    queue.send_message("later", 600).await.unwrap();
    let now_id = queue.send_message("now", 0).await.unwrap();
    let attrs = queue.get_attributes().await.unwrap();
    assert_eq!((attrs.delay_msg_num, attrs.active_msg_num), (1, 1));
    assert!(attrs.min_msg_time_ms > 0);

    let peeked = queue.peek_message(16).await.unwrap();
    assert_eq!(peeked.len(), 2);
    assert!(peeked.iter().any(|m| m.state == MessageState::Delayed));
    // Peek changed nothing.
    let attrs = queue.get_attributes().await.unwrap();
    assert_eq!((attrs.delay_msg_num, attrs.active_msg_num), (1, 1));

    // ChangeMessageVisibility to 0 makes the message receivable again at once.
    let first = queue.receive_message(Some(0)).await.unwrap();
    assert_eq!(first.msg_id, now_id);
    queue
        .change_message_visibility(&first.receipt_handle, 0)
        .await
        .unwrap();
    let second = queue.receive_message(Some(0)).await.unwrap();
    assert_eq!(second.msg_id, now_id);
    assert_eq!(second.dequeue_count, 2);
    // The first handle died with the redelivery.
    let err = queue
        .delete_message(&first.receipt_handle)
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code, 4430);
    queue
        .change_message_visibility(&second.receipt_handle, 120)
        .await
        .unwrap();
    queue.delete_message(&second.receipt_handle).await.unwrap();

    // Rewind brings the deleted message back.
    let attrs = queue.get_attributes().await.unwrap();
    assert_eq!(attrs.rewind_msg_num, 1);
    let since = first.enqueue_time_ms / 1000;
    assert_eq!(queue.rewind(since).await.unwrap(), 1);
    let again = queue.receive_message(Some(0)).await.unwrap();
    assert_eq!(again.msg_id, now_id);
    // Rewinding to the future, or on a queue without rewind, is refused with 6050.
    let err = queue.rewind(since + 100_000).await.unwrap_err();
    assert_eq!(err.code().unwrap().code, 6050);
    let plain = alice.queue("plain");
    plain.create(&QueueAttributeSet::default()).await.unwrap();
    assert_eq!(
        plain.rewind(since).await.unwrap_err().code().unwrap().code,
        6050
    );

    // The delayed message and the rewound one (in flight again).
    assert_eq!(queue.purge().await.unwrap(), 2);
    let attrs = queue.get_attributes().await.unwrap();
    assert_eq!(
        (
            attrs.active_msg_num,
            attrs.inactive_msg_num,
            attrs.delay_msg_num,
            attrs.rewind_msg_num
        ),
        (0, 0, 0, 0)
    );
    server.stop().await;
}

#[tokio::test]
async fn dead_letters_and_redrive() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    alice
        .create_queue("dlq", &QueueAttributeSet::default())
        .await
        .unwrap();
    let source = alice.queue("source");
    source
        .create(&QueueAttributeSet {
            dead_letter_policy: Some(Some(DeadLetterPolicy {
                dead_letter_queue: "dlq".into(),
                policy: 0,
                max_receive_count: 1,
                max_time_to_live_seconds: 0,
            })),
            ..Default::default()
        })
        .await
        .unwrap();
    let attrs = source.get_attributes().await.unwrap();
    assert_eq!(attrs.dead_letter_policy.unwrap().dead_letter_queue, "dlq");
    let dlq = alice.queue("dlq");
    let (total, sources) = dlq.dead_letter_sources(0, 20).await.unwrap();
    assert_eq!((total, sources[0].queue_name.as_str()), (1, "source"));

    let id = source.send_message("poison", 0).await.unwrap();
    let received = source.receive_message(Some(0)).await.unwrap();
    // Received once (= maxReceiveCount); when it becomes visible it goes to the DLQ instead.
    source
        .change_message_visibility(&received.receipt_handle, 0)
        .await
        .unwrap();
    let dead = dlq.receive_message(Some(0)).await.unwrap();
    assert_eq!(dead.msg_id, id);
    let info = dead.dead_letter.clone().expect("dead-letter info");
    assert_eq!(info.source_queue, "source");
    assert_eq!(info.receive_count, 1);
    dlq.change_message_visibility(&dead.receipt_handle, 0)
        .await
        .unwrap();

    assert_eq!(dlq.redrive_dead_letters(100).await.unwrap(), 1);
    let back = source.receive_message(Some(0)).await.unwrap();
    assert_eq!(back.msg_id, id);
    assert!(back.dead_letter.is_none());
    source.delete_message(&back.receipt_handle).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn accounts_are_isolated() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let bob = server.bob().await;
    alice
        .create_queue("shared-name", &QueueAttributeSet::default())
        .await
        .unwrap();
    alice
        .create_queue("alice-only", &QueueAttributeSet::default())
        .await
        .unwrap();
    // Bob may use the same name: it is a different queue.
    bob.create_queue("shared-name", &QueueAttributeSet::default())
        .await
        .unwrap();
    alice
        .queue("shared-name")
        .send_message("for alice", 0)
        .await
        .unwrap();

    let (total, queues) = bob.list_queue("", 0, 20).await.unwrap();
    assert_eq!(total, 1);
    assert_eq!(queues[0].queue_name, "shared-name");
    let err = bob
        .queue("shared-name")
        .receive_message(Some(0))
        .await
        .unwrap_err();
    assert!(
        err.is_no_message(),
        "bob must not see alice's message: {err}"
    );
    for result in [
        bob.queue("alice-only").get_attributes().await.map(|_| ()),
        bob.queue("alice-only")
            .send_message("x", 0)
            .await
            .map(|_| ()),
        bob.delete_queue("alice-only").await,
    ] {
        assert_eq!(result.unwrap_err().code().unwrap().code, 4440);
    }
    let got = alice
        .queue("shared-name")
        .receive_message(Some(0))
        .await
        .unwrap();
    assert_eq!(&got.body[..], b"for alice");
    server.stop().await;
}

#[tokio::test]
async fn wrong_credentials_are_refused() {
    let server = TestServer::start().await;
    let addr = server.addr().to_string();
    let err = cmqd::client::Account::connect(
        &addr,
        ALICE.0,
        "wrong-key-0000000000",
        ClientConfig::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cmq);
    assert_eq!(err.code().unwrap().code, 4100);
    let err = cmqd::client::Account::connect(&addr, "AKIDnobody", ALICE.1, ClientConfig::default())
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code, 4100);
    server.stop().await;
}

#[tokio::test]
async fn non_persistent_client_and_reconnect() {
    let server = TestServer::start().await;
    let config = ClientConfig::default().persistent_connection(false);
    let account = server.connect(ALICE, config).await;
    let queue = account.queue("np");
    queue.create(&QueueAttributeSet::default()).await.unwrap();
    queue.send_message("one", 0).await.unwrap();
    assert_eq!(
        &queue.receive_message(Some(0)).await.unwrap().body[..],
        b"one"
    );

    // A persistent client survives the broker dropping its connection: the next call reconnects.
    let account = server.alice().await;
    account.ping().await.unwrap();
    let addr = server.addr();
    server.stop().await;
    let err = account.ping().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    let options = cmqd::server::ServerOptions {
        listen: addr,
        limits: Default::default(),
        accounts: vec![cmqd::config::AccountConfig {
            name: "alice".into(),
            secret_id: ALICE.0.into(),
            secret_key: ALICE.1.into(),
        }],
    };
    let restarted = cmqd::server::Server::bind(options)
        .await
        .unwrap()
        .spawn()
        .unwrap();
    account.ping().await.unwrap();
    restarted.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_batch_receive_never_exceeds_the_frame_limit() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let queue = alice.queue("big");
    queue
        .create(&QueueAttributeSet {
            max_msg_size_bytes: Some(1024 * 1024),
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..3 {
        queue
            .send_message(vec![b'b'; 1024 * 1024], 0)
            .await
            .unwrap();
    }
    // Three 1 MiB bodies do not fit in one 2 MiB reply: the broker returns what fits and
    // leaves the rest receivable, untouched.
    let got = queue.batch_receive_message(16, Some(0)).await.unwrap();
    assert_eq!(got.len(), 1);
    let attrs = queue.get_attributes().await.unwrap();
    assert_eq!((attrs.active_msg_num, attrs.inactive_msg_num), (2, 1));
    for message in queue.peek_message(16).await.unwrap() {
        let expected = u32::from(message.msg_id == got[0].msg_id);
        assert_eq!(message.dequeue_count, expected);
    }
    server.stop().await;
}
