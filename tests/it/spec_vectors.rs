//! `spec/` and the code agree.
//!
//! Every golden frame in `spec/vectors/` goes through the same path as bytes from a socket
//! (`FrameCodec` then `parse_request`/`parse_response`) and must give the value this file's table
//! lists for it; that value, encoded again, must give the file's bytes exactly. The table and the
//! directory must name the same files, so a vector cannot be added or dropped on one side only.
//! `spec/errors.md` must list every code of `ErrorCode::ALL` with the same numbers.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use cmqd::error::ErrorCode;
use cmqd::model::{
    BatchDeleteFailure, ClusterNode, ClusterStatus, DeadLetterInfo, DeadLetterPolicy,
    DeadLetterReason, GroupStatus, MessageState, PeekedMessage, QueueAttributeSet, QueueAttributes,
    QueueSummary, ReceivedMessage, ReplicationStatus, SubscriptionAttributeSet,
    SubscriptionAttributes, SubscriptionSpec, SubscriptionSummary, TopicAttributeSet,
    TopicAttributes, TopicSummary,
};
use cmqd::protocol::{
    encode_push, encode_request, parse_push, parse_request, parse_response, try_encode_response,
    FrameCodec, Opcode, OutFrame, Push, PushOpcode, RawFrame, Reply, Request, Response,
    AUTH_CONTEXT, FLAG_PUSH, FLAG_RESPONSE,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::codec::{Decoder, Encoder};

fn spec_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("spec")
}

/// The frame bytes of a vector file: hex digits outside `#` comments, whitespace ignored.
fn read_vector(name: &str) -> Vec<u8> {
    let path = spec_dir().join("vectors").join(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut digits = String::new();
    for (number, line) in text.lines().enumerate() {
        let data = line.split('#').next().unwrap_or("");
        for c in data.chars().filter(|c| !c.is_whitespace()) {
            assert!(
                c.is_ascii_hexdigit(),
                "{name}:{}: {c:?} is not hex",
                number + 1
            );
            digits.push(c);
        }
    }
    hex::decode(&digits).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// What a vector file stands for.
enum Expected {
    Request(u32, Request),
    Response(u32, u16, Response),
    /// A server-initiated frame: consumer id, push.
    Push(u32, Push),
}

impl Expected {
    fn out_frame(&self) -> OutFrame {
        match self {
            Expected::Request(request_id, request) => OutFrame::Request {
                request_id: *request_id,
                request: request.clone(),
            },
            Expected::Response(request_id, opcode, response) => OutFrame::Response {
                request_id: *request_id,
                opcode: *opcode,
                response: response.clone(),
            },
            Expected::Push(consumer_id, push) => OutFrame::Push {
                consumer_id: *consumer_id,
                push: push.clone(),
            },
        }
    }
}

const T0: u64 = 1_700_000_000_000;
const NONCE: [u8; 32] = {
    let mut nonce = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        nonce[i] = i as u8;
        i += 1;
    }
    nonce
};
const SIGNATURE: [u8; 32] = [
    0x49, 0x50, 0x91, 0x6e, 0xda, 0x1c, 0xab, 0x5f, 0x8a, 0x8d, 0x36, 0xa9, 0xf6, 0x55, 0xcd, 0xa3,
    0x95, 0x9a, 0x0a, 0x55, 0x32, 0x86, 0x2e, 0x9c, 0x76, 0xff, 0xca, 0x02, 0x6e, 0x3b, 0x98, 0x94,
];

fn ok(request_id: u32, opcode: Opcode, reply: Reply) -> Expected {
    Expected::Response(request_id, opcode as u16, Response::Ok(reply))
}

fn error(request_id: u32, opcode: u16, code: ErrorCode, message: &str) -> Expected {
    Expected::Response(request_id, opcode, Response::error(code, message))
}

fn orders() -> String {
    "orders".to_owned()
}

fn events() -> String {
    "events".to_owned()
}

fn orders_dead_letter_policy() -> DeadLetterPolicy {
    DeadLetterPolicy {
        dead_letter_queue: "orders-dlq".into(),
        policy: 0,
        max_receive_count: 5,
        max_time_to_live_seconds: 0,
    }
}

fn received(msg_id: u64, handle: &str, body: &'static [u8], count: u32) -> ReceivedMessage {
    ReceivedMessage {
        msg_id,
        receipt_handle: handle.into(),
        body: Bytes::from_static(body),
        enqueue_time_ms: T0,
        first_dequeue_time_ms: T0 + 2_000,
        next_visible_time_ms: T0 + 62_000,
        dequeue_count: count,
        dead_letter: None,
    }
}

/// The value of every vector, by file name.
fn expected() -> BTreeMap<&'static str, Expected> {
    use Expected::Request as Req;
    let handles = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    BTreeMap::from([
        (
            "hello.request.hex",
            Req(
                1,
                Request::Hello {
                    min_version: 1,
                    max_version: 1,
                    client_name: "cmq-cli/0.1".into(),
                },
            ),
        ),
        (
            "hello.response.hex",
            ok(
                1,
                Opcode::Hello,
                Reply::Hello {
                    version: 1,
                    nonce: NONCE,
                    server_name: "cmqd/0.1.0".into(),
                },
            ),
        ),
        (
            "auth.request.hex",
            Req(
                2,
                Request::Auth {
                    secret_id: "AKIDexample".into(),
                    signature: SIGNATURE,
                },
            ),
        ),
        (
            "auth.response.hex",
            ok(
                2,
                Opcode::Auth,
                Reply::Auth {
                    account: "default".into(),
                },
            ),
        ),
        (
            "auth.failed.response.hex",
            error(
                2,
                Opcode::Auth as u16,
                ErrorCode::AUTH_FAILED,
                "authentication failed",
            ),
        ),
        (
            "hello.throttled.response.hex",
            error(
                0,
                Opcode::Hello as u16,
                ErrorCode::AUTH_THROTTLED,
                "too many failed authentications from this address; new connections are refused for 42 s more",
            ),
        ),
        ("ping.request.hex", Req(3, Request::Ping)),
        ("ping.response.hex", ok(3, Opcode::Ping, Reply::Empty)),
        (
            "create-queue.request.hex",
            Req(
                4,
                Request::CreateQueue {
                    queue: orders(),
                    attributes: QueueAttributeSet {
                        max_msg_heap_num: Some(1_000_000),
                        visibility_timeout_seconds: Some(60),
                        rewind_seconds: Some(3_600),
                        dead_letter_policy: Some(Some(orders_dead_letter_policy())),
                        ..QueueAttributeSet::default()
                    },
                },
            ),
        ),
        (
            "create-queue.response.hex",
            ok(4, Opcode::CreateQueue, Reply::QueueCreated { queue_id: 42 }),
        ),
        (
            "delete-queue.request.hex",
            Req(5, Request::DeleteQueue { queue: orders() }),
        ),
        (
            "delete-queue.response.hex",
            ok(5, Opcode::DeleteQueue, Reply::Empty),
        ),
        (
            "list-queue.request.hex",
            Req(
                6,
                Request::ListQueue {
                    search_word: "ord".into(),
                    offset: 0,
                    limit: 20,
                },
            ),
        ),
        (
            "list-queue.response.hex",
            ok(
                6,
                Opcode::ListQueue,
                Reply::QueueList {
                    total_count: 2,
                    queues: vec![
                        QueueSummary {
                            queue_id: 42,
                            queue_name: orders(),
                        },
                        QueueSummary {
                            queue_id: 43,
                            queue_name: "orders-dlq".into(),
                        },
                    ],
                },
            ),
        ),
        (
            "get-queue-attributes.request.hex",
            Req(7, Request::GetQueueAttributes { queue: orders() }),
        ),
        (
            "get-queue-attributes.response.hex",
            ok(
                7,
                Opcode::GetQueueAttributes,
                Reply::QueueAttributes(Box::new(QueueAttributes {
                    queue_name: orders(),
                    queue_id: 42,
                    max_msg_heap_num: 1_000_000,
                    polling_wait_seconds: 0,
                    visibility_timeout_seconds: 60,
                    max_msg_size_bytes: 65_536,
                    msg_retention_seconds: 345_600,
                    rewind_seconds: 3_600,
                    create_time_ms: T0,
                    last_modify_time_ms: T0 + 100_000,
                    active_msg_num: 3,
                    inactive_msg_num: 1,
                    delay_msg_num: 0,
                    rewind_msg_num: 2,
                    min_msg_time_ms: T0 + 50_000,
                    max_delay_seconds: 3_600,
                    dead_letter_policy: Some(orders_dead_letter_policy()),
                    dead_letter_sources: Vec::new(),
                })),
            ),
        ),
        (
            "set-queue-attributes.request.hex",
            Req(
                8,
                Request::SetQueueAttributes {
                    queue: orders(),
                    attributes: QueueAttributeSet {
                        polling_wait_seconds: Some(10),
                        msg_retention_seconds: Some(86_400),
                        dead_letter_policy: Some(None),
                        ..QueueAttributeSet::default()
                    },
                },
            ),
        ),
        (
            "set-queue-attributes.response.hex",
            ok(8, Opcode::SetQueueAttributes, Reply::Empty),
        ),
        (
            "rewind-queue.request.hex",
            Req(
                9,
                Request::RewindQueue {
                    queue: orders(),
                    start_consume_time: 1_700_000_000,
                },
            ),
        ),
        (
            "rewind-queue.response.hex",
            ok(9, Opcode::RewindQueue, Reply::Count { count: 2 }),
        ),
        (
            "purge-queue.request.hex",
            Req(10, Request::PurgeQueue { queue: orders() }),
        ),
        (
            "purge-queue.response.hex",
            ok(10, Opcode::PurgeQueue, Reply::Count { count: 4 }),
        ),
        (
            "list-dead-letter-source-queues.request.hex",
            Req(
                11,
                Request::ListDeadLetterSourceQueues {
                    queue: "orders-dlq".into(),
                    offset: 0,
                    limit: 0,
                },
            ),
        ),
        (
            "list-dead-letter-source-queues.response.hex",
            ok(
                11,
                Opcode::ListDeadLetterSourceQueues,
                Reply::QueueList {
                    total_count: 1,
                    queues: vec![QueueSummary {
                        queue_id: 42,
                        queue_name: orders(),
                    }],
                },
            ),
        ),
        (
            "send-message.request.hex",
            Req(
                12,
                Request::SendMessage {
                    queue: orders(),
                    body: Bytes::from_static(b"hello"),
                    delay_seconds: 0,
                },
            ),
        ),
        (
            "send-message.response.hex",
            ok(12, Opcode::SendMessage, Reply::Sent { msg_id: 1001 }),
        ),
        (
            "send-message.queue-not-found.response.hex",
            error(
                12,
                Opcode::SendMessage as u16,
                ErrorCode::QUEUE_NOT_FOUND,
                "queue orders does not exist",
            ),
        ),
        (
            "batch-send-message.request.hex",
            Req(
                13,
                Request::BatchSendMessage {
                    queue: orders(),
                    bodies: vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")],
                    delay_seconds: 30,
                },
            ),
        ),
        (
            "batch-send-message.response.hex",
            ok(
                13,
                Opcode::BatchSendMessage,
                Reply::BatchSent {
                    msg_ids: vec![1002, 1003],
                },
            ),
        ),
        (
            "receive-message.request.hex",
            Req(
                14,
                Request::ReceiveMessage {
                    queue: orders(),
                    polling_wait_seconds: Some(30),
                },
            ),
        ),
        (
            "receive-message.response.hex",
            ok(
                14,
                Opcode::ReceiveMessage,
                Reply::Received(Box::new(ReceivedMessage {
                    msg_id: 1001,
                    receipt_handle: "00000000000003e90000000000000007".into(),
                    body: Bytes::from_static(b"hello"),
                    enqueue_time_ms: T0,
                    first_dequeue_time_ms: T0 + 1_000,
                    next_visible_time_ms: T0 + 61_000,
                    dequeue_count: 1,
                    dead_letter: None,
                })),
            ),
        ),
        (
            "receive-message.no-message.response.hex",
            error(
                14,
                Opcode::ReceiveMessage as u16,
                ErrorCode::NO_MESSAGE,
                "no message",
            ),
        ),
        (
            "batch-receive-message.request.hex",
            Req(
                15,
                Request::BatchReceiveMessage {
                    queue: orders(),
                    num_of_msg: 16,
                    polling_wait_seconds: None,
                },
            ),
        ),
        (
            "batch-receive-message.response.hex",
            ok(
                15,
                Opcode::BatchReceiveMessage,
                Reply::BatchReceived(vec![
                    received(1002, "00000000000003ea0000000000000008", b"a", 1),
                    ReceivedMessage {
                        dead_letter: Some(DeadLetterInfo {
                            source_queue: orders(),
                            reason: DeadLetterReason::MaxReceiveCount,
                            receive_count: 5,
                            dead_lettered_at_ms: T0 + 200_000,
                        }),
                        ..received(1003, "00000000000003eb0000000000000009", b"bc", 2)
                    },
                ]),
            ),
        ),
        (
            "delete-message.request.hex",
            Req(
                16,
                Request::DeleteMessage {
                    queue: orders(),
                    receipt_handle: "00000000000003e90000000000000007".into(),
                },
            ),
        ),
        (
            "delete-message.response.hex",
            ok(16, Opcode::DeleteMessage, Reply::Empty),
        ),
        (
            "batch-delete-message.request.hex",
            Req(
                17,
                Request::BatchDeleteMessage {
                    queue: orders(),
                    receipt_handles: handles(&[
                        "00000000000003e90000000000000007",
                        "00000000000003ea0000000000000008",
                        "00000000000003eb0000000000000009",
                    ]),
                },
            ),
        ),
        (
            "batch-delete-message.response.hex",
            ok(17, Opcode::BatchDeleteMessage, Reply::Empty),
        ),
        (
            "batch-delete-message.partial.response.hex",
            Expected::Response(
                17,
                Opcode::BatchDeleteMessage as u16,
                Response::Error {
                    code: ErrorCode::BATCH_DELETE_PARTIAL,
                    message: "1 of 3 receipt handles could not be deleted".into(),
                    failures: vec![BatchDeleteFailure {
                        receipt_handle: "00000000000003ea0000000000000008".into(),
                        code: ErrorCode::RECEIPT_HANDLE_INVALID,
                        message: "receipt handle is invalid".into(),
                    }],
                },
            ),
        ),
        (
            "change-message-visibility.request.hex",
            Req(
                18,
                Request::ChangeMessageVisibility {
                    queue: orders(),
                    receipt_handle: "00000000000003e90000000000000007".into(),
                    visibility_timeout_seconds: 120,
                },
            ),
        ),
        (
            "change-message-visibility.response.hex",
            ok(18, Opcode::ChangeMessageVisibility, Reply::Empty),
        ),
        (
            "peek-message.request.hex",
            Req(
                19,
                Request::PeekMessage {
                    queue: orders(),
                    num_of_msg: 2,
                },
            ),
        ),
        (
            "peek-message.response.hex",
            ok(
                19,
                Opcode::PeekMessage,
                Reply::Peeked(vec![
                    PeekedMessage {
                        msg_id: 1002,
                        body: Bytes::from_static(b"a"),
                        enqueue_time_ms: T0,
                        dequeue_count: 0,
                        state: MessageState::Active,
                        visible_time_ms: T0,
                        dead_letter: None,
                    },
                    PeekedMessage {
                        msg_id: 1003,
                        body: Bytes::from_static(b"bc"),
                        enqueue_time_ms: T0,
                        dequeue_count: 1,
                        state: MessageState::Inactive,
                        visible_time_ms: T0 + 62_000,
                        dead_letter: None,
                    },
                ]),
            ),
        ),
        (
            "redrive-dead-letters.request.hex",
            Req(
                20,
                Request::RedriveDeadLetters {
                    queue: "orders-dlq".into(),
                    limit: 100,
                },
            ),
        ),
        (
            "redrive-dead-letters.response.hex",
            ok(20, Opcode::RedriveDeadLetters, Reply::Count { count: 7 }),
        ),
        (
            "create-topic.request.hex",
            Req(
                21,
                Request::CreateTopic {
                    topic: events(),
                    attributes: TopicAttributeSet {
                        max_msg_size_bytes: Some(65_536),
                        filter_type: Some(2),
                    },
                },
            ),
        ),
        (
            "create-topic.response.hex",
            ok(21, Opcode::CreateTopic, Reply::TopicCreated { topic_id: 5 }),
        ),
        (
            "delete-topic.request.hex",
            Req(22, Request::DeleteTopic { topic: events() }),
        ),
        (
            "delete-topic.response.hex",
            ok(22, Opcode::DeleteTopic, Reply::Empty),
        ),
        (
            "list-topic.request.hex",
            Req(
                23,
                Request::ListTopic {
                    search_word: "ev".into(),
                    offset: 0,
                    limit: 20,
                },
            ),
        ),
        (
            "list-topic.response.hex",
            ok(
                23,
                Opcode::ListTopic,
                Reply::TopicList {
                    total_count: 1,
                    topics: vec![TopicSummary {
                        topic_id: 5,
                        topic_name: events(),
                    }],
                },
            ),
        ),
        (
            "get-topic-attributes.request.hex",
            Req(24, Request::GetTopicAttributes { topic: events() }),
        ),
        (
            "get-topic-attributes.response.hex",
            ok(
                24,
                Opcode::GetTopicAttributes,
                Reply::TopicAttributes(Box::new(TopicAttributes {
                    topic_name: events(),
                    topic_id: 5,
                    max_msg_size_bytes: 65_536,
                    msg_retention_seconds: 86_400,
                    filter_type: 2,
                    msg_count: 3,
                    create_time_ms: T0,
                    last_modify_time_ms: T0 + 100_000,
                })),
            ),
        ),
        (
            "set-topic-attributes.request.hex",
            Req(
                25,
                Request::SetTopicAttributes {
                    topic: events(),
                    attributes: TopicAttributeSet {
                        max_msg_size_bytes: Some(4096),
                        filter_type: None,
                    },
                },
            ),
        ),
        (
            "set-topic-attributes.response.hex",
            ok(25, Opcode::SetTopicAttributes, Reply::Empty),
        ),
        (
            "publish-message.request.hex",
            Req(
                26,
                Request::PublishMessage {
                    topic: events(),
                    body: Bytes::from_static(b"hello"),
                    msg_tags: vec!["a".into(), "b".into()],
                    routing_key: Some("order.created".into()),
                },
            ),
        ),
        (
            "publish-message.response.hex",
            ok(26, Opcode::PublishMessage, Reply::Sent { msg_id: 2001 }),
        ),
        (
            "publish-message.no-subscription.response.hex",
            error(
                26,
                Opcode::PublishMessage as u16,
                ErrorCode::TOPIC_NO_SUBSCRIPTION,
                "topic events has no subscription",
            ),
        ),
        (
            "batch-publish-message.request.hex",
            Req(
                27,
                Request::BatchPublishMessage {
                    topic: events(),
                    bodies: vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")],
                    msg_tags: Vec::new(),
                    routing_key: Some("order.paid".into()),
                },
            ),
        ),
        (
            "batch-publish-message.response.hex",
            ok(
                27,
                Opcode::BatchPublishMessage,
                Reply::BatchSent {
                    msg_ids: vec![2002, 2003],
                },
            ),
        ),
        (
            "subscribe.request.hex",
            Req(
                28,
                Request::Subscribe {
                    topic: events(),
                    subscription: "audit".into(),
                    spec: SubscriptionSpec {
                        protocol: "queue".into(),
                        endpoint: "audit-queue".into(),
                        notify_strategy: None,
                        notify_content_format: Some("SIMPLIFIED".into()),
                        filter_tags: Vec::new(),
                        binding_keys: vec!["order.#".into()],
                    },
                },
            ),
        ),
        (
            "subscribe.response.hex",
            ok(
                28,
                Opcode::Subscribe,
                Reply::SubscriptionCreated { subscription_id: 7 },
            ),
        ),
        (
            "unsubscribe.request.hex",
            Req(
                29,
                Request::Unsubscribe {
                    topic: events(),
                    subscription: "audit".into(),
                },
            ),
        ),
        (
            "unsubscribe.response.hex",
            ok(29, Opcode::Unsubscribe, Reply::Empty),
        ),
        (
            "list-subscription-by-topic.request.hex",
            Req(
                30,
                Request::ListSubscriptionByTopic {
                    topic: events(),
                    search_word: String::new(),
                    offset: 0,
                    limit: 20,
                },
            ),
        ),
        (
            "list-subscription-by-topic.response.hex",
            ok(
                30,
                Opcode::ListSubscriptionByTopic,
                Reply::SubscriptionList {
                    total_count: 2,
                    subscriptions: vec![
                        SubscriptionSummary {
                            subscription_id: 7,
                            subscription_name: "audit".into(),
                            protocol: "queue".into(),
                            endpoint: "audit-queue".into(),
                        },
                        SubscriptionSummary {
                            subscription_id: 8,
                            subscription_name: "webhook".into(),
                            protocol: "http".into(),
                            endpoint: "http://hooks.example.com/cmq".into(),
                        },
                    ],
                },
            ),
        ),
        (
            "get-subscription-attributes.request.hex",
            Req(
                31,
                Request::GetSubscriptionAttributes {
                    topic: events(),
                    subscription: "webhook".into(),
                },
            ),
        ),
        (
            "get-subscription-attributes.response.hex",
            ok(
                31,
                Opcode::GetSubscriptionAttributes,
                Reply::SubscriptionAttributes(Box::new(SubscriptionAttributes {
                    topic_owner: "default".into(),
                    topic_name: events(),
                    subscription_name: "webhook".into(),
                    subscription_id: 8,
                    protocol: "http".into(),
                    endpoint: "http://hooks.example.com/cmq".into(),
                    notify_strategy: "EXPONENTIAL_DECAY_RETRY".into(),
                    notify_content_format: "JSON".into(),
                    filter_tags: Vec::new(),
                    binding_keys: vec!["order.*".into()],
                    create_time_ms: T0,
                    last_modify_time_ms: T0,
                    msg_count: 1,
                    delivered_count: 41,
                    dropped_count: 0,
                    last_error: Some("message 2001, attempt 2: HTTP 503 (will retry)".into()),
                    last_error_time_ms: T0 + 200_000,
                    next_retry_time_ms: T0 + 202_000,
                })),
            ),
        ),
        (
            "set-subscription-attributes.request.hex",
            Req(
                32,
                Request::SetSubscriptionAttributes {
                    topic: events(),
                    subscription: "webhook".into(),
                    attributes: SubscriptionAttributeSet {
                        notify_strategy: Some("BACKOFF_RETRY".into()),
                        notify_content_format: None,
                        filter_tags: None,
                        binding_keys: Some(vec!["order.*".into(), "refund.#".into()]),
                    },
                },
            ),
        ),
        (
            "set-subscription-attributes.response.hex",
            ok(32, Opcode::SetSubscriptionAttributes, Reply::Empty),
        ),
        (
            "clear-subscription-filter-tags.request.hex",
            Req(
                33,
                Request::ClearSubscriptionFilterTags {
                    topic: events(),
                    subscription: "audit".into(),
                },
            ),
        ),
        (
            "clear-subscription-filter-tags.response.hex",
            ok(33, Opcode::ClearSubscriptionFilterTags, Reply::Empty),
        ),
        (
            "consume.request.hex",
            Req(
                34,
                Request::Consume {
                    queue: orders(),
                    credit: 256,
                    batch_max: 64,
                    visibility_timeout_seconds: Some(60),
                },
            ),
        ),
        (
            "consume.response.hex",
            ok(34, Opcode::Consume, Reply::Consuming { consumer_id: 34 }),
        ),
        (
            "cancel-consume.request.hex",
            Req(35, Request::CancelConsume { consumer_id: 34 }),
        ),
        (
            "cancel-consume.response.hex",
            ok(35, Opcode::CancelConsume, Reply::Empty),
        ),
        (
            "delivery.push.hex",
            Expected::Push(
                34,
                Push::Delivery(vec![
                    received(1001, "00000000000003e9000000000000002a", b"hello", 1),
                    received(1002, "00000000000003ea000000000000002b", b"world", 2),
                ]),
            ),
        ),
        (
            "consumer-ended.push.hex",
            Expected::Push(
                34,
                Push::ConsumerEnded {
                    code: ErrorCode::QUEUE_NOT_FOUND,
                    message: "queue orders does not exist".into(),
                },
            ),
        ),
        ("cluster-status.request.hex", Req(36, Request::ClusterStatus)),
        (
            "cluster-status.response.hex",
            ok(36, Opcode::ClusterStatus, Reply::ClusterStatus(Box::new(three_nodes()))),
        ),
        (
            "cluster-status.single-node.response.hex",
            ok(
                36,
                Opcode::ClusterStatus,
                Reply::ClusterStatus(Box::default()),
            ),
        ),
        (
            "send-message.not-leader.response.hex",
            Expected::Response(
                12,
                Opcode::SendMessage as u16,
                Response::NotLeader {
                    message: "this node does not lead: the leader is 10.0.0.2:7300 (term 5)"
                        .into(),
                    leader: "10.0.0.2:7300".into(),
                    epoch: 5,
                },
            ),
        ),
        (
            "unknown-opcode.response.hex",
            error(
                9,
                0x7fff,
                ErrorCode::UNKNOWN_ACTION,
                "unknown opcode 0x7fff",
            ),
        ),
    ])
}

/// The ClusterStatus of `cluster-status.response.hex`: node 2 of three leads group 0.
fn three_nodes() -> ClusterStatus {
    let node = |id: u64, http: &str| ClusterNode {
        id,
        peer: format!("10.0.0.{id}:7400"),
        api: format!("10.0.0.{id}:7300"),
        http: http.into(),
    };
    ClusterStatus {
        node_id: 2,
        nodes: vec![
            node(1, "10.0.0.1:8080"),
            node(2, "10.0.0.2:8080"),
            node(3, ""),
        ],
        groups: vec![GroupStatus {
            group: 0,
            leader: Some(2),
            term: 5,
            role: "leader".into(),
            last_log_index: 120,
            committed: 118,
            applied: 118,
            digest: 0x1f2e_3d4c_5b6a_7988,
            voting: true,
            replication: vec![
                ReplicationStatus {
                    node: 1,
                    matched: Some(120),
                },
                ReplicationStatus {
                    node: 3,
                    matched: None,
                },
            ],
        }],
    }
}

fn decode_whole(name: &str, bytes: &[u8]) -> RawFrame {
    let mut buf = BytesMut::from(bytes);
    let frame = FrameCodec::default()
        .decode(&mut buf)
        .unwrap_or_else(|e| panic!("{name}: framing error {e}"))
        .unwrap_or_else(|| panic!("{name}: incomplete frame"));
    assert!(
        buf.is_empty(),
        "{name}: {} bytes after the frame",
        buf.len()
    );
    frame
}

#[test]
fn every_vector_decodes_to_its_value_and_encodes_to_its_bytes() {
    for (name, expected) in expected() {
        let bytes = read_vector(name);
        let frame = decode_whole(name, &bytes);
        let mut encoded = BytesMut::new();
        match &expected {
            Expected::Request(request_id, request) => {
                assert_eq!(frame.flags, 0, "{name}: flags");
                assert_eq!(frame.request_id, *request_id, "{name}: request id");
                assert_eq!(frame.opcode, request.opcode() as u16, "{name}: opcode");
                assert_eq!(parse_request(&frame).as_ref(), Ok(request), "{name}");
                encode_request(*request_id, request, &mut encoded)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            Expected::Response(request_id, opcode, response) => {
                assert_eq!(frame.flags, FLAG_RESPONSE, "{name}: flags");
                assert_eq!(frame.request_id, *request_id, "{name}: request id");
                assert_eq!(frame.opcode, *opcode, "{name}: opcode");
                assert_eq!(parse_response(&frame).as_ref(), Ok(response), "{name}");
                try_encode_response(*request_id, *opcode, response, &mut encoded)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            Expected::Push(consumer_id, push) => {
                assert_eq!(frame.flags, FLAG_PUSH, "{name}: flags");
                assert_eq!(frame.request_id, *consumer_id, "{name}: consumer id");
                assert_eq!(frame.opcode, push.opcode() as u16, "{name}: opcode");
                assert_eq!(parse_push(&frame).as_ref(), Ok(push), "{name}");
                encode_push(*consumer_id, push, &mut encoded)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        assert_eq!(
            hex::encode(&encoded),
            hex::encode(&bytes),
            "{name}: re-encoded bytes differ"
        );

        // The codec's encoder writes the same frame.
        let mut framed = BytesMut::new();
        FrameCodec::default()
            .encode(&expected.out_frame(), &mut framed)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&framed[..], &bytes[..], "{name}: codec encoder differs");
    }
}

#[test]
fn every_vector_file_has_an_entry_and_every_entry_a_file() {
    let mut files: Vec<String> = fs::read_dir(spec_dir().join("vectors"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".hex"))
        .collect();
    files.sort();
    let entries: Vec<String> = expected().keys().map(|name| name.to_string()).collect();
    assert_eq!(
        files, entries,
        "spec/vectors and the table in this file differ"
    );
}

#[test]
fn every_push_opcode_has_a_vector() {
    let table = expected();
    for opcode in PushOpcode::ALL {
        assert!(
            table.values().any(|expected| matches!(
                expected,
                Expected::Push(_, push) if push.opcode() == *opcode
            )),
            "no push vector for {}",
            opcode.name()
        );
    }
}

#[test]
fn every_opcode_has_a_request_and_a_response_vector() {
    let table = expected();
    for opcode in Opcode::ALL {
        let has = |want_request: bool| {
            table.values().any(|expected| match expected {
                Expected::Request(_, request) => want_request && request.opcode() == *opcode,
                Expected::Response(_, op, _) => !want_request && *op == *opcode as u16,
                Expected::Push(..) => false,
            })
        };
        assert!(has(true), "no request vector for {}", opcode.name());
        assert!(has(false), "no response vector for {}", opcode.name());
    }
}

/// The Auth vector signs the Hello vector's nonce exactly as `spec/README.md` describes.
#[test]
fn auth_vector_follows_the_documented_signature() {
    let frame = decode_whole("hello.response.hex", &read_vector("hello.response.hex"));
    let Ok(Response::Ok(Reply::Hello { nonce, .. })) = parse_response(&frame) else {
        panic!("hello.response.hex is not a Hello reply");
    };
    let frame = decode_whole("auth.request.hex", &read_vector("auth.request.hex"));
    let Ok(Request::Auth {
        secret_id,
        signature,
    }) = parse_request(&frame)
    else {
        panic!("auth.request.hex is not an Auth request");
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(b"secret-key").unwrap();
    mac.update(b"cmqd-auth-v1");
    mac.update(&nonce);
    mac.update(secret_id.as_bytes());
    assert_eq!(AUTH_CONTEXT, b"cmqd-auth-v1");
    assert_eq!(signature, <[u8; 32]>::from(mac.finalize().into_bytes()));
}

#[test]
fn errors_md_lists_every_error_code() {
    let text = fs::read_to_string(spec_dir().join("errors.md")).unwrap();
    for (name, code) in ErrorCode::ALL {
        let row = format!("| `{name}` | {} | {} |", code.code, code.module);
        assert!(
            text.contains(&row),
            "spec/errors.md has no row starting {row:?}: add {name} to the table"
        );
    }
}

/// Receipt handles in the vectors have the shape a broker hands out (`src/engine/receipt.rs`):
/// each parses, and a received message's handle names that message.
#[test]
fn vector_receipt_handles_have_the_brokers_shape() {
    use cmqd::engine::ReceiptHandle;
    let check = |name: &str, handle: &str, msg_id: Option<u64>| {
        let parsed = ReceiptHandle::parse(handle)
            .unwrap_or_else(|e| panic!("{name}: {handle:?} is not a broker's handle: {e}"));
        assert_eq!(parsed.encode(), handle, "{name}");
        if let Some(msg_id) = msg_id {
            assert_eq!(
                parsed.msg_id, msg_id,
                "{name}: {handle} names another message"
            );
        }
    };
    let mut seen = 0;
    for (name, expected) in expected() {
        let received: Vec<ReceivedMessage> = match &expected {
            Expected::Response(_, _, Response::Ok(Reply::Received(m))) => vec![(**m).clone()],
            Expected::Response(_, _, Response::Ok(Reply::BatchReceived(ms))) => ms.clone(),
            Expected::Push(_, Push::Delivery(ms)) => ms.clone(),
            _ => Vec::new(),
        };
        for m in &received {
            check(name, &m.receipt_handle, Some(m.msg_id));
            seen += 1;
        }
        let handles: Vec<String> = match &expected {
            Expected::Request(_, Request::DeleteMessage { receipt_handle, .. })
            | Expected::Request(_, Request::ChangeMessageVisibility { receipt_handle, .. }) => {
                vec![receipt_handle.clone()]
            }
            Expected::Request(
                _,
                Request::BatchDeleteMessage {
                    receipt_handles, ..
                },
            ) => receipt_handles.clone(),
            Expected::Response(_, _, Response::Error { failures, .. }) => {
                failures.iter().map(|f| f.receipt_handle.clone()).collect()
            }
            _ => Vec::new(),
        };
        for handle in &handles {
            check(name, handle, None);
            seen += 1;
        }
    }
    assert!(seen >= 10, "only {seen} handles checked");
}
