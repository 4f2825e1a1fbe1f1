//! Reply payloads (`spec/commands.md`).

use bytes::{BufMut, Bytes, BytesMut};

use crate::limits::cluster::{NODES_MAX, STATUS_GROUPS_MAX};
use crate::limits::{BATCH_COUNT_MAX, LIST_LIMIT_MAX, PEEK_COUNT_MAX};
use crate::model::{
    ClusterStatus, DeadLetterInfo, PeekedMessage, QueueAttributes, ReceivedMessage,
    SubscriptionAttributes, TopicAttributes,
};
use crate::protocol::Reply;

use super::primitives::{put_bytes, put_list, put_option, put_string, put_text};
use super::request::{put_dead_letter_policy, put_tag_list};
use super::EncodeError;

pub(super) fn reply_payload(reply: &Reply, dst: &mut BytesMut) -> Result<(), EncodeError> {
    match reply {
        Reply::Hello {
            version,
            nonce,
            server_name,
        } => {
            dst.put_u8(*version);
            dst.put_slice(nonce);
            put_string(dst, "server_name", server_name)
        }
        Reply::Auth { account } => put_string(dst, "account", account),
        Reply::Empty => Ok(()),
        Reply::QueueCreated { queue_id } => {
            dst.put_u64(*queue_id);
            Ok(())
        }
        Reply::QueueList {
            total_count,
            queues,
        } => {
            dst.put_u64(*total_count);
            put_list(
                dst,
                "queues",
                queues,
                LIST_LIMIT_MAX as usize,
                |queue, dst| {
                    dst.put_u64(queue.queue_id);
                    put_string(dst, "queue_name", &queue.queue_name)
                },
            )
        }
        Reply::QueueAttributes(attributes) => put_queue_attributes(attributes, dst),
        Reply::Count { count } => {
            dst.put_u64(*count);
            Ok(())
        }
        Reply::Sent { msg_id } => {
            dst.put_u64(*msg_id);
            Ok(())
        }
        Reply::BatchSent { msg_ids } => {
            put_list(dst, "msg_ids", msg_ids, BATCH_COUNT_MAX, |id, dst| {
                dst.put_u64(*id);
                Ok(())
            })
        }
        Reply::Received(message) => put_received_message(message, dst),
        Reply::BatchReceived(messages) => {
            if messages.is_empty() {
                return Err(EncodeError::Empty {
                    field: "BatchReceived",
                });
            }
            put_list(
                dst,
                "BatchReceived",
                messages,
                BATCH_COUNT_MAX,
                put_received_message,
            )
        }
        Reply::Peeked(messages) => {
            put_list(dst, "Peeked", messages, PEEK_COUNT_MAX, put_peeked_message)
        }
        Reply::TopicCreated { topic_id } => {
            dst.put_u64(*topic_id);
            Ok(())
        }
        Reply::TopicList {
            total_count,
            topics,
        } => {
            dst.put_u64(*total_count);
            put_list(
                dst,
                "topics",
                topics,
                LIST_LIMIT_MAX as usize,
                |topic, dst| {
                    dst.put_u64(topic.topic_id);
                    put_string(dst, "topic_name", &topic.topic_name)
                },
            )
        }
        Reply::TopicAttributes(attributes) => put_topic_attributes(attributes, dst),
        Reply::SubscriptionCreated { subscription_id } => {
            dst.put_u64(*subscription_id);
            Ok(())
        }
        Reply::SubscriptionList {
            total_count,
            subscriptions,
        } => {
            dst.put_u64(*total_count);
            put_list(
                dst,
                "subscriptions",
                subscriptions,
                LIST_LIMIT_MAX as usize,
                |s, dst| {
                    dst.put_u64(s.subscription_id);
                    put_string(dst, "subscription_name", &s.subscription_name)?;
                    put_string(dst, "protocol", &s.protocol)?;
                    put_string(dst, "endpoint", &s.endpoint)
                },
            )
        }
        Reply::SubscriptionAttributes(attributes) => put_subscription_attributes(attributes, dst),
        Reply::Consuming { consumer_id } => {
            dst.put_u32(*consumer_id);
            Ok(())
        }
        Reply::ClusterStatus(status) => put_cluster_status(status, dst),
    }
}

pub(super) fn put_cluster_status(
    status: &ClusterStatus,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    dst.put_u64(status.node_id);
    put_list(dst, "nodes", &status.nodes, NODES_MAX, |node, dst| {
        dst.put_u64(node.id);
        put_string(dst, "peer", &node.peer)?;
        put_string(dst, "api", &node.api)?;
        put_string(dst, "http", &node.http)
    })?;
    put_list(
        dst,
        "groups",
        &status.groups,
        STATUS_GROUPS_MAX,
        |group, dst| {
            dst.put_u32(group.group);
            put_option(dst, group.leader.as_ref(), |leader, dst| {
                dst.put_u64(*leader);
                Ok(())
            })?;
            dst.put_u64(group.term);
            put_string(dst, "role", &group.role)?;
            dst.put_u64(group.last_log_index);
            dst.put_u64(group.committed);
            dst.put_u64(group.applied);
            dst.put_u64(group.digest);
            dst.put_u8(u8::from(group.voting));
            put_list(
                dst,
                "replication",
                &group.replication,
                NODES_MAX,
                |progress, dst| {
                    dst.put_u64(progress.node);
                    put_option(dst, progress.matched.as_ref(), |matched, dst| {
                        dst.put_u64(*matched);
                        Ok(())
                    })
                },
            )
        },
    )
}

pub(super) fn put_topic_attributes(
    a: &TopicAttributes,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    put_string(dst, "topic_name", &a.topic_name)?;
    dst.put_u64(a.topic_id);
    dst.put_u32(a.max_msg_size_bytes);
    dst.put_u32(a.msg_retention_seconds);
    dst.put_u8(a.filter_type);
    dst.put_u64(a.msg_count);
    dst.put_u64(a.create_time_ms);
    dst.put_u64(a.last_modify_time_ms);
    Ok(())
}

pub(super) fn put_subscription_attributes(
    a: &SubscriptionAttributes,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    put_string(dst, "topic_owner", &a.topic_owner)?;
    put_string(dst, "topic_name", &a.topic_name)?;
    put_string(dst, "subscription_name", &a.subscription_name)?;
    dst.put_u64(a.subscription_id);
    put_string(dst, "protocol", &a.protocol)?;
    put_string(dst, "endpoint", &a.endpoint)?;
    put_string(dst, "notify_strategy", &a.notify_strategy)?;
    put_string(dst, "notify_content_format", &a.notify_content_format)?;
    put_tag_list(dst, "filter_tags", &a.filter_tags)?;
    put_tag_list(dst, "binding_keys", &a.binding_keys)?;
    dst.put_u64(a.create_time_ms);
    dst.put_u64(a.last_modify_time_ms);
    dst.put_u64(a.msg_count);
    dst.put_u64(a.delivered_count);
    dst.put_u64(a.dropped_count);
    put_option(dst, a.last_error.as_ref(), |error, dst| {
        put_text(dst, error);
        Ok(())
    })?;
    dst.put_u64(a.last_error_time_ms);
    dst.put_u64(a.next_retry_time_ms);
    Ok(())
}

pub(super) fn put_queue_attributes(
    a: &QueueAttributes,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    put_string(dst, "queue_name", &a.queue_name)?;
    dst.put_u64(a.queue_id);
    dst.put_u64(a.max_msg_heap_num);
    dst.put_u32(a.polling_wait_seconds);
    dst.put_u32(a.visibility_timeout_seconds);
    dst.put_u32(a.max_msg_size_bytes);
    dst.put_u32(a.msg_retention_seconds);
    dst.put_u32(a.rewind_seconds);
    dst.put_u64(a.create_time_ms);
    dst.put_u64(a.last_modify_time_ms);
    dst.put_u64(a.active_msg_num);
    dst.put_u64(a.inactive_msg_num);
    dst.put_u64(a.delay_msg_num);
    dst.put_u64(a.rewind_msg_num);
    dst.put_u64(a.min_msg_time_ms);
    dst.put_u32(a.max_delay_seconds);
    put_option(dst, a.dead_letter_policy.as_ref(), put_dead_letter_policy)?;
    put_list(
        dst,
        "dead_letter_sources",
        &a.dead_letter_sources,
        usize::from(u16::MAX),
        |source, dst| put_string(dst, "dead_letter_source", source),
    )
}

pub(super) fn put_received_message(
    m: &ReceivedMessage,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    put_received_message_with(m, dst, &mut put_bytes)
}

/// [`put_received_message`] with the body written by `body` (which must write the `bytes`
/// layout: u32 length, then the bytes, or leave the bytes to be sent separately).
pub(super) fn put_received_message_with(
    m: &ReceivedMessage,
    dst: &mut BytesMut,
    body: &mut dyn FnMut(&mut BytesMut, &Bytes) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    dst.put_u64(m.msg_id);
    put_string(dst, "receipt_handle", &m.receipt_handle)?;
    body(dst, &m.body)?;
    dst.put_u64(m.enqueue_time_ms);
    dst.put_u64(m.first_dequeue_time_ms);
    dst.put_u64(m.next_visible_time_ms);
    dst.put_u32(m.dequeue_count);
    put_option(dst, m.dead_letter.as_ref(), put_dead_letter_info)
}

pub(super) fn put_peeked_message(m: &PeekedMessage, dst: &mut BytesMut) -> Result<(), EncodeError> {
    dst.put_u64(m.msg_id);
    put_bytes(dst, &m.body)?;
    dst.put_u64(m.enqueue_time_ms);
    dst.put_u32(m.dequeue_count);
    dst.put_u8(m.state as u8);
    dst.put_u64(m.visible_time_ms);
    put_option(dst, m.dead_letter.as_ref(), put_dead_letter_info)
}

pub(super) fn put_dead_letter_info(
    info: &DeadLetterInfo,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    put_string(dst, "source_queue", &info.source_queue)?;
    dst.put_u8(info.reason as u8);
    dst.put_u32(info.receive_count);
    dst.put_u64(info.dead_lettered_at_ms);
    Ok(())
}
