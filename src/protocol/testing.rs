//! proptest strategies for every request and reply, shared by the protocol's unit tests.
//! Values stay within the wire limits (strings up to `STRING_BYTES_MAX` bytes, lists up to their
//! maximum counts) but are otherwise arbitrary: the codec must carry any of them unchanged.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use super::layout::ReplyKind;
use super::{Opcode, Push, Reply, Request, Response, NONCE_BYTES, SIGNATURE_BYTES};
use crate::error::ErrorCode;
use crate::limits::cluster::NODES_MAX;
use crate::limits::{BATCH_COUNT_MAX, PEEK_COUNT_MAX, STRING_BYTES_MAX, TAG_LIST_WIRE_MAX};
use crate::model::{
    BatchDeleteFailure, ClusterNode, ClusterStatus, DeadLetterInfo, DeadLetterPolicy,
    DeadLetterReason, GroupStatus, MessageState, PeekedMessage, QueueAttributeSet, QueueAttributes,
    QueueSummary, ReceivedMessage, ReplicationStatus, SubscriptionAttributeSet,
    SubscriptionAttributes, SubscriptionSpec, SubscriptionSummary, TopicAttributeSet,
    TopicAttributes, TopicSummary,
};

/// Short arbitrary text most of the time, now and then a string of exactly the limit in one- or
/// two-byte characters, to exercise the boundary.
pub(crate) fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        16 => "\\PC{0,12}",
        1 => Just("a".repeat(STRING_BYTES_MAX)),
        1 => Just("\u{e9}".repeat(STRING_BYTES_MAX / 2)),
    ]
}

/// A message body, empty included.
pub(crate) fn body() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

/// Any opcode this version knows.
pub(crate) fn opcode() -> impl Strategy<Value = Opcode> {
    proptest::sample::select(Opcode::ALL)
}

fn dead_letter_policy() -> impl Strategy<Value = DeadLetterPolicy> {
    (text(), any::<u8>(), any::<u32>(), any::<u32>()).prop_map(
        |(dead_letter_queue, policy, max_receive_count, max_time_to_live_seconds)| {
            DeadLetterPolicy {
                dead_letter_queue,
                policy,
                max_receive_count,
                max_time_to_live_seconds,
            }
        },
    )
}

fn attribute_set() -> impl Strategy<Value = QueueAttributeSet> {
    (
        option::of(any::<u64>()),
        option::of(any::<u32>()),
        option::of(any::<u32>()),
        option::of(any::<u32>()),
        option::of(any::<u32>()),
        option::of(any::<u32>()),
        option::of(option::of(dead_letter_policy())),
    )
        .prop_map(
            |(heap, polling, visibility, size, retention, rewind, dlq)| QueueAttributeSet {
                max_msg_heap_num: heap,
                polling_wait_seconds: polling,
                visibility_timeout_seconds: visibility,
                max_msg_size_bytes: size,
                msg_retention_seconds: retention,
                rewind_seconds: rewind,
                dead_letter_policy: dlq,
            },
        )
}

/// Every [`Request`] variant with arbitrary fields.
pub(crate) fn request() -> impl Strategy<Value = Request> {
    prop_oneof![3 => queue_request(), 2 => topic_request(), 1 => consume_request()]
}

/// Consume and CancelConsume, with any values (ranges are the broker's to check).
fn consume_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (text(), any::<u32>(), any::<u16>(), option::of(any::<u32>())).prop_map(
            |(queue, credit, batch_max, visibility_timeout_seconds)| Request::Consume {
                queue,
                credit,
                batch_max,
                visibility_timeout_seconds,
            }
        ),
        any::<u32>().prop_map(|consumer_id| Request::CancelConsume { consumer_id }),
        Just(Request::ClusterStatus),
    ]
}

/// Every [`Push`] variant: deliveries of 1 to 16 messages, and ends with any non-zero code.
/// Deliveries stay short because the truncation property parses every prefix of a body
/// (quadratic); the maximum count is pinned by a unit test of its own.
pub(crate) fn push() -> impl Strategy<Value = Push> {
    prop_oneof![
        3 => vec(received_message(), 1..=BATCH_COUNT_MAX).prop_map(Push::Delivery),
        2 => (1..=u16::MAX, any::<u16>(), text()).prop_map(|(code, module, message)| {
            Push::ConsumerEnded {
                code: ErrorCode { code, module },
                message,
            }
        }),
    ]
}

/// Tags or binding keys: up to the wire's limit.
fn tags() -> impl Strategy<Value = Vec<String>> {
    vec(text(), 0..=TAG_LIST_WIRE_MAX)
}

fn topic_attribute_set() -> impl Strategy<Value = TopicAttributeSet> {
    (option::of(any::<u32>()), option::of(any::<u8>())).prop_map(
        |(max_msg_size_bytes, filter_type)| TopicAttributeSet {
            max_msg_size_bytes,
            filter_type,
        },
    )
}

fn subscription_spec() -> impl Strategy<Value = SubscriptionSpec> {
    (
        text(),
        text(),
        option::of(text()),
        option::of(text()),
        tags(),
        tags(),
    )
        .prop_map(
            |(
                protocol,
                endpoint,
                notify_strategy,
                notify_content_format,
                filter_tags,
                binding_keys,
            )| {
                SubscriptionSpec {
                    protocol,
                    endpoint,
                    notify_strategy,
                    notify_content_format,
                    filter_tags,
                    binding_keys,
                }
            },
        )
}

fn subscription_attribute_set() -> impl Strategy<Value = SubscriptionAttributeSet> {
    (
        option::of(text()),
        option::of(text()),
        option::of(tags()),
        option::of(tags()),
    )
        .prop_map(
            |(notify_strategy, notify_content_format, filter_tags, binding_keys)| {
                SubscriptionAttributeSet {
                    notify_strategy,
                    notify_content_format,
                    filter_tags,
                    binding_keys,
                }
            },
        )
}

/// The topic and subscription requests.
fn topic_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (text(), topic_attribute_set())
            .prop_map(|(topic, attributes)| Request::CreateTopic { topic, attributes }),
        text().prop_map(|topic| Request::DeleteTopic { topic }),
        (text(), any::<u32>(), any::<u32>()).prop_map(|(search_word, offset, limit)| {
            Request::ListTopic {
                search_word,
                offset,
                limit,
            }
        }),
        text().prop_map(|topic| Request::GetTopicAttributes { topic }),
        (text(), topic_attribute_set())
            .prop_map(|(topic, attributes)| Request::SetTopicAttributes { topic, attributes }),
        (text(), body(), tags(), option::of(text())).prop_map(
            |(topic, body, msg_tags, routing_key)| Request::PublishMessage {
                topic,
                body,
                msg_tags,
                routing_key,
            }
        ),
        (
            text(),
            vec(body(), 0..=BATCH_COUNT_MAX),
            tags(),
            option::of(text())
        )
            .prop_map(|(topic, bodies, msg_tags, routing_key)| {
                Request::BatchPublishMessage {
                    topic,
                    bodies,
                    msg_tags,
                    routing_key,
                }
            }),
        (text(), text(), subscription_spec()).prop_map(|(topic, subscription, spec)| {
            Request::Subscribe {
                topic,
                subscription,
                spec,
            }
        }),
        (text(), text()).prop_map(|(topic, subscription)| Request::Unsubscribe {
            topic,
            subscription
        }),
        (text(), text(), any::<u32>(), any::<u32>()).prop_map(
            |(topic, search_word, offset, limit)| Request::ListSubscriptionByTopic {
                topic,
                search_word,
                offset,
                limit,
            }
        ),
        (text(), text()).prop_map(|(topic, subscription)| {
            Request::GetSubscriptionAttributes {
                topic,
                subscription,
            }
        }),
        (text(), text(), subscription_attribute_set()).prop_map(
            |(topic, subscription, attributes)| Request::SetSubscriptionAttributes {
                topic,
                subscription,
                attributes,
            }
        ),
        (text(), text()).prop_map(|(topic, subscription)| {
            Request::ClearSubscriptionFilterTags {
                topic,
                subscription,
            }
        }),
    ]
}

/// The queue and connection requests.
fn queue_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u8>(), any::<u8>(), text()).prop_map(|(min_version, max_version, client_name)| {
            Request::Hello {
                min_version,
                max_version,
                client_name,
            }
        }),
        (text(), any::<[u8; SIGNATURE_BYTES]>()).prop_map(|(secret_id, signature)| {
            Request::Auth {
                secret_id,
                signature,
            }
        }),
        Just(Request::Ping),
        (text(), attribute_set())
            .prop_map(|(queue, attributes)| Request::CreateQueue { queue, attributes }),
        text().prop_map(|queue| Request::DeleteQueue { queue }),
        (text(), any::<u32>(), any::<u32>()).prop_map(|(search_word, offset, limit)| {
            Request::ListQueue {
                search_word,
                offset,
                limit,
            }
        }),
        text().prop_map(|queue| Request::GetQueueAttributes { queue }),
        (text(), attribute_set())
            .prop_map(|(queue, attributes)| Request::SetQueueAttributes { queue, attributes }),
        (text(), any::<u64>()).prop_map(|(queue, start_consume_time)| Request::RewindQueue {
            queue,
            start_consume_time
        }),
        text().prop_map(|queue| Request::PurgeQueue { queue }),
        (text(), any::<u32>(), any::<u32>()).prop_map(|(queue, offset, limit)| {
            Request::ListDeadLetterSourceQueues {
                queue,
                offset,
                limit,
            }
        }),
        (text(), body(), any::<u32>()).prop_map(|(queue, body, delay_seconds)| {
            Request::SendMessage {
                queue,
                body,
                delay_seconds,
            }
        }),
        (text(), vec(body(), 0..=BATCH_COUNT_MAX), any::<u32>()).prop_map(
            |(queue, bodies, delay_seconds)| Request::BatchSendMessage {
                queue,
                bodies,
                delay_seconds,
            }
        ),
        (text(), option::of(any::<u32>())).prop_map(|(queue, polling_wait_seconds)| {
            Request::ReceiveMessage {
                queue,
                polling_wait_seconds,
            }
        }),
        (text(), any::<u16>(), option::of(any::<u32>())).prop_map(
            |(queue, num_of_msg, polling_wait_seconds)| Request::BatchReceiveMessage {
                queue,
                num_of_msg,
                polling_wait_seconds,
            }
        ),
        (text(), text()).prop_map(|(queue, receipt_handle)| Request::DeleteMessage {
            queue,
            receipt_handle
        }),
        (text(), vec(text(), 0..=BATCH_COUNT_MAX)).prop_map(|(queue, receipt_handles)| {
            Request::BatchDeleteMessage {
                queue,
                receipt_handles,
            }
        }),
        (text(), text(), any::<u32>()).prop_map(
            |(queue, receipt_handle, visibility_timeout_seconds)| {
                Request::ChangeMessageVisibility {
                    queue,
                    receipt_handle,
                    visibility_timeout_seconds,
                }
            }
        ),
        (text(), any::<u16>())
            .prop_map(|(queue, num_of_msg)| Request::PeekMessage { queue, num_of_msg }),
        (text(), any::<u32>())
            .prop_map(|(queue, limit)| Request::RedriveDeadLetters { queue, limit }),
    ]
}

fn dead_letter_info() -> impl Strategy<Value = DeadLetterInfo> {
    (
        text(),
        prop_oneof![
            Just(DeadLetterReason::MaxReceiveCount),
            Just(DeadLetterReason::TimeToLive)
        ],
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(source_queue, reason, receive_count, dead_lettered_at_ms)| DeadLetterInfo {
                source_queue,
                reason,
                receive_count,
                dead_lettered_at_ms,
            },
        )
}

fn received_message() -> impl Strategy<Value = ReceivedMessage> {
    (
        any::<u64>(),
        text(),
        body(),
        any::<[u64; 3]>(),
        any::<u32>(),
        option::of(dead_letter_info()),
    )
        .prop_map(
            |(msg_id, receipt_handle, body, [enqueue, first, next], dequeue_count, dead_letter)| {
                ReceivedMessage {
                    msg_id,
                    receipt_handle,
                    body,
                    enqueue_time_ms: enqueue,
                    first_dequeue_time_ms: first,
                    next_visible_time_ms: next,
                    dequeue_count,
                    dead_letter,
                }
            },
        )
}

fn peeked_message() -> impl Strategy<Value = PeekedMessage> {
    (
        any::<u64>(),
        body(),
        any::<u64>(),
        any::<u32>(),
        prop_oneof![
            Just(MessageState::Active),
            Just(MessageState::Inactive),
            Just(MessageState::Delayed)
        ],
        any::<u64>(),
        option::of(dead_letter_info()),
    )
        .prop_map(
            |(
                msg_id,
                body,
                enqueue_time_ms,
                dequeue_count,
                state,
                visible_time_ms,
                dead_letter,
            )| {
                PeekedMessage {
                    msg_id,
                    body,
                    enqueue_time_ms,
                    dequeue_count,
                    state,
                    visible_time_ms,
                    dead_letter,
                }
            },
        )
}

fn queue_attributes() -> impl Strategy<Value = QueueAttributes> {
    (
        (text(), any::<[u64; 2]>(), any::<[u32; 5]>()),
        (any::<[u64; 7]>(), any::<u32>()),
        option::of(dead_letter_policy()),
        vec(text(), 0..8),
    )
        .prop_map(
            |(
                (queue_name, [queue_id, heap], [polling, visibility, size, retention, rewind]),
                ([create, modify, active, inactive, delay, rewound, min_time], max_delay),
                dead_letter_policy,
                dead_letter_sources,
            )| QueueAttributes {
                queue_name,
                queue_id,
                max_msg_heap_num: heap,
                polling_wait_seconds: polling,
                visibility_timeout_seconds: visibility,
                max_msg_size_bytes: size,
                msg_retention_seconds: retention,
                rewind_seconds: rewind,
                create_time_ms: create,
                last_modify_time_ms: modify,
                active_msg_num: active,
                inactive_msg_num: inactive,
                delay_msg_num: delay,
                rewind_msg_num: rewound,
                min_msg_time_ms: min_time,
                max_delay_seconds: max_delay,
                dead_letter_policy,
                dead_letter_sources,
            },
        )
}

fn queue_summary() -> impl Strategy<Value = QueueSummary> {
    (any::<u64>(), text()).prop_map(|(queue_id, queue_name)| QueueSummary {
        queue_id,
        queue_name,
    })
}

/// A success reply of the layout `kind`.
fn reply(kind: ReplyKind) -> BoxedStrategy<Reply> {
    match kind {
        ReplyKind::Hello => (any::<u8>(), any::<[u8; NONCE_BYTES]>(), text())
            .prop_map(|(version, nonce, server_name)| Reply::Hello {
                version,
                nonce,
                server_name,
            })
            .boxed(),
        ReplyKind::Auth => text().prop_map(|account| Reply::Auth { account }).boxed(),
        ReplyKind::Empty => Just(Reply::Empty).boxed(),
        ReplyKind::QueueCreated => any::<u64>()
            .prop_map(|queue_id| Reply::QueueCreated { queue_id })
            .boxed(),
        ReplyKind::QueueList => (any::<u64>(), vec(queue_summary(), 0..20))
            .prop_map(|(total_count, queues)| Reply::QueueList {
                total_count,
                queues,
            })
            .boxed(),
        ReplyKind::QueueAttributes => queue_attributes()
            .prop_map(|a| Reply::QueueAttributes(Box::new(a)))
            .boxed(),
        ReplyKind::Count => any::<u64>()
            .prop_map(|count| Reply::Count { count })
            .boxed(),
        ReplyKind::Sent => any::<u64>()
            .prop_map(|msg_id| Reply::Sent { msg_id })
            .boxed(),
        ReplyKind::BatchSent => vec(any::<u64>(), 0..=BATCH_COUNT_MAX)
            .prop_map(|msg_ids| Reply::BatchSent { msg_ids })
            .boxed(),
        ReplyKind::Received => received_message()
            .prop_map(|m| Reply::Received(Box::new(m)))
            .boxed(),
        ReplyKind::BatchReceived => vec(received_message(), 1..=BATCH_COUNT_MAX)
            .prop_map(Reply::BatchReceived)
            .boxed(),
        ReplyKind::Peeked => vec(peeked_message(), 0..=PEEK_COUNT_MAX)
            .prop_map(Reply::Peeked)
            .boxed(),
        ReplyKind::TopicCreated => any::<u64>()
            .prop_map(|topic_id| Reply::TopicCreated { topic_id })
            .boxed(),
        ReplyKind::TopicList => (
            any::<u64>(),
            vec(
                (any::<u64>(), text()).prop_map(|(topic_id, topic_name)| TopicSummary {
                    topic_id,
                    topic_name,
                }),
                0..20,
            ),
        )
            .prop_map(|(total_count, topics)| Reply::TopicList {
                total_count,
                topics,
            })
            .boxed(),
        ReplyKind::TopicAttributes => (
            text(),
            any::<u64>(),
            any::<[u32; 2]>(),
            any::<u8>(),
            any::<[u64; 3]>(),
        )
            .prop_map(
                |(
                    topic_name,
                    topic_id,
                    [size, retention],
                    filter_type,
                    [count, create, modify],
                )| {
                    Reply::TopicAttributes(Box::new(TopicAttributes {
                        topic_name,
                        topic_id,
                        max_msg_size_bytes: size,
                        msg_retention_seconds: retention,
                        filter_type,
                        msg_count: count,
                        create_time_ms: create,
                        last_modify_time_ms: modify,
                    }))
                },
            )
            .boxed(),
        ReplyKind::SubscriptionCreated => any::<u64>()
            .prop_map(|subscription_id| Reply::SubscriptionCreated { subscription_id })
            .boxed(),
        ReplyKind::SubscriptionList => (
            any::<u64>(),
            vec(
                (any::<u64>(), text(), text(), text()).prop_map(
                    |(subscription_id, subscription_name, protocol, endpoint)| {
                        SubscriptionSummary {
                            subscription_id,
                            subscription_name,
                            protocol,
                            endpoint,
                        }
                    },
                ),
                0..20,
            ),
        )
            .prop_map(|(total_count, subscriptions)| Reply::SubscriptionList {
                total_count,
                subscriptions,
            })
            .boxed(),
        ReplyKind::SubscriptionAttributes => subscription_attributes()
            .prop_map(|a| Reply::SubscriptionAttributes(Box::new(a)))
            .boxed(),
        ReplyKind::ClusterStatus => cluster_status()
            .prop_map(|status| Reply::ClusterStatus(Box::new(status)))
            .boxed(),
        ReplyKind::Consuming => any::<u32>()
            .prop_map(|consumer_id| Reply::Consuming { consumer_id })
            .boxed(),
    }
}

fn subscription_attributes() -> impl Strategy<Value = SubscriptionAttributes> {
    (
        (text(), text(), text(), any::<u64>()),
        (text(), text(), text(), text()),
        (tags(), tags()),
        any::<[u64; 7]>(),
        option::of(text()),
    )
        .prop_map(
            |(
                (topic_owner, topic_name, subscription_name, subscription_id),
                (protocol, endpoint, notify_strategy, notify_content_format),
                (filter_tags, binding_keys),
                [create, modify, count, delivered, dropped, error_time, retry_time],
                last_error,
            )| SubscriptionAttributes {
                topic_owner,
                topic_name,
                subscription_name,
                subscription_id,
                protocol,
                endpoint,
                notify_strategy,
                notify_content_format,
                filter_tags,
                binding_keys,
                create_time_ms: create,
                last_modify_time_ms: modify,
                msg_count: count,
                delivered_count: delivered,
                dropped_count: dropped,
                last_error,
                last_error_time_ms: error_time,
                next_retry_time_ms: retry_time,
            },
        )
}

/// A ClusterStatus of up to 9 nodes and a few groups, any values.
fn cluster_status() -> impl Strategy<Value = ClusterStatus> {
    let node =
        (any::<u64>(), text(), text(), text()).prop_map(|(id, peer, api, http)| ClusterNode {
            id,
            peer,
            api,
            http,
        });
    let progress = (any::<u64>(), option::of(any::<u64>()))
        .prop_map(|(node, matched)| ReplicationStatus { node, matched });
    let group = (
        any::<u32>(),
        option::of(any::<u64>()),
        any::<[u64; 5]>(),
        text(),
        any::<bool>(),
        vec(progress, 0..=NODES_MAX),
    )
        .prop_map(
            |(
                group,
                leader,
                [term, last_log_index, committed, applied, digest],
                role,
                voting,
                replication,
            )| {
                GroupStatus {
                    group,
                    leader,
                    term,
                    role,
                    last_log_index,
                    committed,
                    applied,
                    digest,
                    voting,
                    replication,
                }
            },
        );
    (any::<u64>(), vec(node, 0..=NODES_MAX), vec(group, 0..4)).prop_map(
        |(node_id, nodes, groups)| ClusterStatus {
            node_id,
            nodes,
            groups,
        },
    )
}

/// A NotLeader answer with any leader address and epoch.
pub(crate) fn not_leader_response() -> impl Strategy<Value = Response> {
    (text(), text(), any::<u64>()).prop_map(|(message, leader, epoch)| Response::NotLeader {
        message,
        leader,
        epoch,
    })
}

/// An error response: any non-zero code, any message, and up to 16 failures.
pub(crate) fn error_response() -> impl Strategy<Value = Response> {
    let failure = (text(), 1..=u16::MAX, any::<u16>(), text()).prop_map(
        |(receipt_handle, code, module, message)| BatchDeleteFailure {
            receipt_handle,
            code: ErrorCode { code, module },
            message,
        },
    );
    (
        1..=u16::MAX,
        any::<u16>(),
        text(),
        vec(failure, 0..=BATCH_COUNT_MAX),
    )
        // 6100/10800 has a layout of its own: `not_leader_response`.
        .prop_filter("NotLeader", |(code, module, _, _)| {
            ErrorCode {
                code: *code,
                module: *module,
            } != ErrorCode::NOT_LEADER
        })
        .prop_map(|(code, module, message, failures)| Response::Error {
            code: ErrorCode { code, module },
            message,
            failures,
        })
}

/// A response that answers `opcode`: its success reply, or an error.
pub(crate) fn response_for(opcode: Opcode) -> impl Strategy<Value = Response> {
    prop_oneof![
        6 => reply(ReplyKind::for_opcode(opcode)).prop_map(Response::Ok),
        2 => error_response(),
        1 => not_leader_response(),
    ]
}

/// An opcode and a response that answers it.
pub(crate) fn opcode_and_response() -> impl Strategy<Value = (Opcode, Response)> {
    opcode().prop_flat_map(|op| (Just(op), response_for(op)))
}
