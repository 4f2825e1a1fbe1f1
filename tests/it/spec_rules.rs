//! Rules `spec/` states that a client written from it relies on, checked against the broker:
//! the answer to invalid names, a second Hello or Auth, the handshake throttle's error frame,
//! filters of the other topic kind, and how big a batch reply may be.

use bytes::Bytes;
use cmqd::config::Limits;
use cmqd::error::ErrorCode;
use cmqd::model::{
    QueueAttributeSet, SubscriptionAttributeSet, SubscriptionSpec, TopicAttributeSet,
};
use cmqd::protocol::{parse_response, Opcode, Reply, Request, Response, FLAG_RESPONSE};

use crate::support::{error_code, RawConn, TestServer, ALICE};

fn pair(code: ErrorCode) -> Option<(u16, u16)> {
    Some((code.code, code.module))
}

async fn authenticated(server: &TestServer) -> RawConn {
    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;
    raw
}

fn queue_sub(endpoint: &str) -> SubscriptionSpec {
    SubscriptionSpec {
        protocol: "queue".into(),
        endpoint: endpoint.into(),
        notify_strategy: None,
        notify_content_format: None,
        filter_tags: Vec::new(),
        binding_keys: Vec::new(),
    }
}

/// A name no queue, topic or subscription can have (a space), and one that could but does not
/// exist: the first gets the naming rule's code, the second not-found, on every request.
#[tokio::test]
async fn invalid_names_get_the_format_error_and_valid_missing_names_not_found() {
    let server = TestServer::start().await;
    let mut raw = authenticated(&server).await;
    let queue_requests = |queue: &str| {
        let queue = queue.to_string();
        vec![
            Request::DeleteQueue {
                queue: queue.clone(),
            },
            Request::GetQueueAttributes {
                queue: queue.clone(),
            },
            Request::SetQueueAttributes {
                queue: queue.clone(),
                attributes: QueueAttributeSet::default(),
            },
            Request::RewindQueue {
                queue: queue.clone(),
                start_consume_time: 0,
            },
            Request::PurgeQueue {
                queue: queue.clone(),
            },
            Request::ListDeadLetterSourceQueues {
                queue: queue.clone(),
                offset: 0,
                limit: 0,
            },
            Request::SendMessage {
                queue: queue.clone(),
                body: Bytes::from_static(b"x"),
                delay_seconds: 0,
            },
            Request::BatchSendMessage {
                queue: queue.clone(),
                bodies: vec![Bytes::from_static(b"x")],
                delay_seconds: 0,
            },
            Request::ReceiveMessage {
                queue: queue.clone(),
                polling_wait_seconds: Some(0),
            },
            Request::BatchReceiveMessage {
                queue: queue.clone(),
                num_of_msg: 2,
                polling_wait_seconds: Some(0),
            },
            Request::DeleteMessage {
                queue: queue.clone(),
                receipt_handle: "00000000000000010000000000000001".into(),
            },
            Request::BatchDeleteMessage {
                queue: queue.clone(),
                receipt_handles: vec!["00000000000000010000000000000001".into()],
            },
            Request::ChangeMessageVisibility {
                queue: queue.clone(),
                receipt_handle: "00000000000000010000000000000001".into(),
                visibility_timeout_seconds: 1,
            },
            Request::PeekMessage {
                queue: queue.clone(),
                num_of_msg: 1,
            },
            Request::RedriveDeadLetters {
                queue: queue.clone(),
                limit: 1,
            },
            Request::Consume {
                queue: queue.clone(),
                credit: 1,
                batch_max: 1,
                visibility_timeout_seconds: None,
            },
            // A dead-letter policy naming the queue.
            Request::CreateQueue {
                queue: "source".into(),
                attributes: QueueAttributeSet {
                    dead_letter_policy: Some(Some(cmqd::model::DeadLetterPolicy {
                        dead_letter_queue: queue,
                        policy: 0,
                        max_receive_count: 3,
                        max_time_to_live_seconds: 0,
                    })),
                    ..QueueAttributeSet::default()
                },
            },
        ]
    };
    let mut id = 10;
    for (name, want) in [
        ("no such", ErrorCode::QUEUE_NAME_FORMAT),
        ("", ErrorCode::QUEUE_NAME_FORMAT),
        ("under_score", ErrorCode::QUEUE_NAME_FORMAT),
        ("missing", ErrorCode::QUEUE_NOT_FOUND),
    ] {
        for request in queue_requests(name) {
            id += 1;
            let response = raw.call(id, &request).await;
            assert_eq!(
                error_code(&response),
                pair(want),
                "{} on {name:?}: {response:?}",
                request.opcode().name()
            );
        }
    }

    let topic_requests = |topic: &str| {
        let topic = topic.to_string();
        vec![
            Request::DeleteTopic {
                topic: topic.clone(),
            },
            Request::GetTopicAttributes {
                topic: topic.clone(),
            },
            Request::SetTopicAttributes {
                topic: topic.clone(),
                attributes: TopicAttributeSet::default(),
            },
            Request::PublishMessage {
                topic: topic.clone(),
                body: Bytes::from_static(b"x"),
                msg_tags: Vec::new(),
                routing_key: None,
            },
            Request::BatchPublishMessage {
                topic: topic.clone(),
                bodies: vec![Bytes::from_static(b"x")],
                msg_tags: Vec::new(),
                routing_key: None,
            },
            Request::Unsubscribe {
                topic: topic.clone(),
                subscription: "sub".into(),
            },
            Request::ListSubscriptionByTopic {
                topic: topic.clone(),
                search_word: String::new(),
                offset: 0,
                limit: 0,
            },
            Request::GetSubscriptionAttributes {
                topic: topic.clone(),
                subscription: "sub".into(),
            },
            Request::ClearSubscriptionFilterTags {
                topic: topic.clone(),
                subscription: "sub".into(),
            },
        ]
    };
    for (name, want) in [
        ("no such", ErrorCode::TOPIC_NAME_FORMAT),
        ("9lives", ErrorCode::TOPIC_NAME_FORMAT),
        ("missing_topic", ErrorCode::TOPIC_NOT_FOUND),
    ] {
        for request in topic_requests(name) {
            id += 1;
            let response = raw.call(id, &request).await;
            assert_eq!(
                error_code(&response),
                pair(want),
                "{} on {name:?}: {response:?}",
                request.opcode().name()
            );
        }
    }

    // Subscription names, on a topic that exists.
    let created = raw
        .call(
            1000,
            &Request::CreateTopic {
                topic: "events".into(),
                attributes: TopicAttributeSet::default(),
            },
        )
        .await;
    assert!(matches!(created, Response::Ok(_)), "{created:?}");
    for (name, want) in [
        ("no such", ErrorCode::SUBSCRIPTION_NAME_FORMAT),
        ("missing", ErrorCode::SUBSCRIPTION_NOT_FOUND),
    ] {
        for request in [
            Request::GetSubscriptionAttributes {
                topic: "events".into(),
                subscription: name.into(),
            },
            Request::Unsubscribe {
                topic: "events".into(),
                subscription: name.into(),
            },
            Request::SetSubscriptionAttributes {
                topic: "events".into(),
                subscription: name.into(),
                attributes: SubscriptionAttributeSet::default(),
            },
        ] {
            id += 1;
            let response = raw.call(id, &request).await;
            assert_eq!(
                error_code(&response),
                pair(want),
                "{} on {name:?}: {response:?}",
                request.opcode().name()
            );
        }
    }
    server.stop().await;
}

/// Names compare case-insensitively everywhere; replies give the name as created.
#[tokio::test]
async fn names_are_case_insensitive_and_reported_as_created() {
    let server = TestServer::start().await;
    let mut raw = authenticated(&server).await;
    let created = raw
        .call(
            3,
            &Request::CreateQueue {
                queue: "Orders".into(),
                attributes: QueueAttributeSet::default(),
            },
        )
        .await;
    assert!(matches!(created, Response::Ok(_)), "{created:?}");
    let again = raw
        .call(
            4,
            &Request::CreateQueue {
                queue: "oRDERS".into(),
                attributes: QueueAttributeSet::default(),
            },
        )
        .await;
    assert_eq!(error_code(&again), pair(ErrorCode::ALREADY_EXISTS));
    let attributes = raw
        .call(
            5,
            &Request::GetQueueAttributes {
                queue: "ORDERS".into(),
            },
        )
        .await;
    let Response::Ok(Reply::QueueAttributes(attributes)) = attributes else {
        panic!("{attributes:?}");
    };
    assert_eq!(attributes.queue_name, "Orders");
    server.stop().await;
}

/// A second Hello before Auth is refused and the first nonce stays the one to sign; Hello or
/// Auth after a successful Auth is refused; the connection lives on in both cases.
#[tokio::test]
async fn a_second_hello_or_auth_is_refused_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut raw = RawConn::connect(server.addr()).await;
    let hello = Request::Hello {
        min_version: 1,
        max_version: 1,
        client_name: "spec".into(),
    };
    let Response::Ok(Reply::Hello { nonce, version, .. }) = raw.call(1, &hello).await else {
        panic!("hello refused");
    };
    assert_eq!(version, 1);
    let again = raw.call(2, &hello).await;
    assert_eq!(error_code(&again), pair(ErrorCode::AUTH_FAILED));
    let auth = Request::Auth {
        secret_id: ALICE.0.into(),
        signature: cmqd::protocol::sign(ALICE.1, &nonce, ALICE.0),
    };
    let authed = raw.call(3, &auth).await;
    assert!(
        matches!(authed, Response::Ok(Reply::Auth { .. })),
        "{authed:?}"
    );
    let hello_after = raw.call(4, &hello).await;
    assert_eq!(error_code(&hello_after), pair(ErrorCode::INVALID_PARAMETER));
    let auth_after = raw.call(5, &auth).await;
    assert_eq!(error_code(&auth_after), pair(ErrorCode::INVALID_PARAMETER));
    // Still authenticated as before.
    let listed = raw
        .call(
            6,
            &Request::ListQueue {
                search_word: String::new(),
                offset: 0,
                limit: 0,
            },
        )
        .await;
    assert!(matches!(listed, Response::Ok(_)), "{listed:?}");
    server.stop().await;
}

/// Past the failed-handshake limit, a new connection from the address gets one error frame,
/// 4420/10790 under the Hello opcode and request id 0, and then the end of the stream.
#[tokio::test]
async fn a_throttled_address_gets_an_error_frame_then_the_close() {
    let limits = Limits {
        auth_failures_per_ip_max: 2,
        ..Limits::default()
    };
    let server = TestServer::start_with(limits).await;
    for _ in 0..2 {
        let mut raw = RawConn::connect(server.addr()).await;
        let hello = Request::Hello {
            min_version: 1,
            max_version: 1,
            client_name: "guesser".into(),
        };
        assert!(matches!(raw.call(1, &hello).await, Response::Ok(_)));
        let wrong = Request::Auth {
            secret_id: ALICE.0.into(),
            signature: [7; 32],
        };
        assert_eq!(
            error_code(&raw.call(2, &wrong).await),
            pair(ErrorCode::AUTH_FAILED)
        );
        assert!(raw.next_frame().await.is_none(), "closed after a failure");
    }
    // Without sending anything, and after sending a Hello: the same frame either way.
    for send_hello in [false, true] {
        let mut raw = RawConn::connect(server.addr()).await;
        if send_hello {
            raw.send(
                7,
                &Request::Hello {
                    min_version: 1,
                    max_version: 1,
                    client_name: "again".into(),
                },
            )
            .await;
        }
        let frame = raw.next_frame().await.expect("an error frame");
        assert_eq!(frame.flags, FLAG_RESPONSE);
        assert_eq!(frame.opcode, Opcode::Hello as u16);
        assert_eq!(frame.request_id, 0);
        let Ok(Response::Error { code, message, .. }) = parse_response(&frame) else {
            panic!("not an error reply");
        };
        assert_eq!(code, ErrorCode::AUTH_THROTTLED);
        assert!(message.contains("s more"), "{message}");
        assert!(raw.next_frame().await.is_none(), "then the connection ends");
    }
    server.stop().await;
}

/// bindingKey on a filterType 1 topic and filterTag on a filterType 2 topic are refused, at
/// Subscribe and at SetSubscriptionAttributes; empty lists of the other kind are fine.
#[tokio::test]
async fn filters_of_the_other_topic_kind_are_refused() {
    let server = TestServer::start().await;
    let mut raw = authenticated(&server).await;
    let mut id = 10;
    let mut call = |request: Request| {
        id += 1;
        let current = id;
        (current, request)
    };
    let (i, r) = call(Request::CreateQueue {
        queue: "inbox".into(),
        attributes: QueueAttributeSet::default(),
    });
    assert!(matches!(raw.call(i, &r).await, Response::Ok(_)));
    for (topic, filter_type) in [("tags", 1u8), ("keys", 2u8)] {
        let (i, r) = call(Request::CreateTopic {
            topic: topic.into(),
            attributes: TopicAttributeSet {
                max_msg_size_bytes: None,
                filter_type: Some(filter_type),
            },
        });
        assert!(matches!(raw.call(i, &r).await, Response::Ok(_)));
    }
    let refused = [
        (
            "tags",
            SubscriptionSpec {
                binding_keys: vec!["a.#".into()],
                ..queue_sub("inbox")
            },
        ),
        (
            "tags",
            SubscriptionSpec {
                filter_tags: vec!["red".into()],
                binding_keys: vec!["a.#".into()],
                ..queue_sub("inbox")
            },
        ),
        (
            "keys",
            SubscriptionSpec {
                filter_tags: vec!["red".into()],
                binding_keys: vec!["a.#".into()],
                ..queue_sub("inbox")
            },
        ),
    ];
    for (topic, spec) in refused {
        let (i, r) = call(Request::Subscribe {
            topic: topic.into(),
            subscription: "s".into(),
            spec: spec.clone(),
        });
        let response = raw.call(i, &r).await;
        assert_eq!(
            error_code(&response),
            pair(ErrorCode::INVALID_PARAMETER),
            "{topic}: {spec:?}"
        );
    }
    // The right kind is accepted.
    for (topic, spec) in [
        (
            "tags",
            SubscriptionSpec {
                filter_tags: vec!["red".into()],
                ..queue_sub("inbox")
            },
        ),
        (
            "keys",
            SubscriptionSpec {
                binding_keys: vec!["a.#".into()],
                ..queue_sub("inbox")
            },
        ),
    ] {
        let (i, r) = call(Request::Subscribe {
            topic: topic.into(),
            subscription: "s".into(),
            spec,
        });
        let response = raw.call(i, &r).await;
        assert!(matches!(response, Response::Ok(_)), "{topic}: {response:?}");
    }
    for (topic, attributes, want) in [
        (
            "tags",
            SubscriptionAttributeSet {
                binding_keys: Some(vec!["a.*".into()]),
                ..SubscriptionAttributeSet::default()
            },
            pair(ErrorCode::INVALID_PARAMETER),
        ),
        (
            "keys",
            SubscriptionAttributeSet {
                filter_tags: Some(vec!["blue".into()]),
                ..SubscriptionAttributeSet::default()
            },
            pair(ErrorCode::INVALID_PARAMETER),
        ),
        (
            "tags",
            SubscriptionAttributeSet {
                binding_keys: Some(Vec::new()),
                filter_tags: Some(vec!["blue".into()]),
                ..SubscriptionAttributeSet::default()
            },
            None,
        ),
        (
            "keys",
            SubscriptionAttributeSet {
                filter_tags: Some(Vec::new()),
                binding_keys: Some(vec!["b.#".into()]),
                ..SubscriptionAttributeSet::default()
            },
            None,
        ),
    ] {
        let (i, r) = call(Request::SetSubscriptionAttributes {
            topic: topic.into(),
            subscription: "s".into(),
            attributes: attributes.clone(),
        });
        let response = raw.call(i, &r).await;
        assert_eq!(error_code(&response), want, "{topic}: {attributes:?}");
    }
    server.stop().await;
}

/// A BatchReceiveMessage or PeekMessage reply holds messages while their bodies plus 256 bytes
/// each stay within the frame limit minus 4096; the rest stay as they were (not received).
#[tokio::test]
async fn batch_replies_stop_at_the_documented_size() {
    let server = TestServer::start().await;
    let mut raw = authenticated(&server).await;
    let created = raw
        .call(
            3,
            &Request::CreateQueue {
                queue: "big".into(),
                attributes: QueueAttributeSet {
                    max_msg_size_bytes: Some(1024 * 1024),
                    ..QueueAttributeSet::default()
                },
            },
        )
        .await;
    assert!(matches!(created, Response::Ok(_)), "{created:?}");
    // (2 MiB - 4096) / (1,000,000 + 256) = 2.09: two such messages fit, three do not.
    for id in 0..3 {
        let sent = raw
            .call(
                10 + id,
                &Request::SendMessage {
                    queue: "big".into(),
                    body: Bytes::from(vec![b'x'; 1_000_000]),
                    delay_seconds: 0,
                },
            )
            .await;
        assert!(matches!(sent, Response::Ok(_)), "{sent:?}");
    }
    let peeked = raw
        .call(
            20,
            &Request::PeekMessage {
                queue: "big".into(),
                num_of_msg: 16,
            },
        )
        .await;
    let Response::Ok(Reply::Peeked(peeked)) = peeked else {
        panic!("{peeked:?}");
    };
    assert_eq!(peeked.len(), 2);
    let received = raw
        .call(
            21,
            &Request::BatchReceiveMessage {
                queue: "big".into(),
                num_of_msg: 16,
                polling_wait_seconds: Some(0),
            },
        )
        .await;
    let Response::Ok(Reply::BatchReceived(received)) = received else {
        panic!("{received:?}");
    };
    assert_eq!(received.len(), 2);
    // The third was not received: the next receive gets it as its first receive.
    let reply = raw
        .call(
            22,
            &Request::ReceiveMessage {
                queue: "big".into(),
                polling_wait_seconds: Some(0),
            },
        )
        .await;
    let Response::Ok(Reply::Received(third)) = reply else {
        panic!("{reply:?}");
    };
    assert!(received.iter().all(|r| r.msg_id != third.msg_id));
    assert_eq!(third.dequeue_count, 1, "never received before");
    server.stop().await;
}
