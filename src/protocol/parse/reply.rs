//! Replies (`spec/commands.md`).

use bytes::Bytes;

use crate::error::ErrorCode;
use crate::limits::cluster::{NODES_MAX, STATUS_GROUPS_MAX};
use crate::limits::{BATCH_COUNT_MAX, LIST_LIMIT_MAX, PEEK_COUNT_MAX};
use crate::model::{
    BatchDeleteFailure, ClusterNode, ClusterStatus, DeadLetterInfo, DeadLetterReason, GroupStatus,
    MessageState, PeekedMessage, QueueAttributes, QueueSummary, ReceivedMessage, ReplicationStatus,
    SubscriptionAttributes, SubscriptionSummary, TopicAttributes, TopicSummary,
};
use crate::protocol::layout::ReplyKind;
use crate::protocol::{Reply, Response, NONCE_BYTES};

use super::fail::{fail, Input, PResult, Why};
use super::primitives::{
    array, be_u16, be_u32, be_u64, be_u8, boolean, bytes_field, list, option, string,
    MIN_CLUSTER_NODE_BYTES, MIN_FAILURE_BYTES, MIN_GROUP_STATUS_BYTES, MIN_PEEKED_BYTES,
    MIN_RECEIVED_BYTES, MIN_REPLICATION_BYTES, MIN_STRING_BYTES, MIN_SUBSCRIPTION_SUMMARY_BYTES,
    MIN_SUMMARY_BYTES,
};
use super::request::{dead_letter_policy, tag_list};

pub(super) fn error_payload(code: ErrorCode, input: Input<'_>) -> PResult<'_, Response> {
    let (input, message) = string(input)?;
    if code == ErrorCode::NOT_LEADER {
        // The common error payload (its failure list always empty), then where the leader is.
        let (input, _) = list(input, 0, MIN_FAILURE_BYTES, batch_failure)?;
        let (input, leader) = string(input)?;
        let (input, epoch) = be_u64(input)?;
        let response = Response::NotLeader {
            message,
            leader,
            epoch,
        };
        return Ok((input, response));
    }
    let (input, failures) = list(input, BATCH_COUNT_MAX, MIN_FAILURE_BYTES, batch_failure)?;
    let response = Response::Error {
        code,
        message,
        failures,
    };
    Ok((input, response))
}

pub(super) fn batch_failure(input: Input<'_>) -> PResult<'_, BatchDeleteFailure> {
    let (input, receipt_handle) = string(input)?;
    let (input, code) = be_u16(input)?;
    let (input, module) = be_u16(input)?;
    let (input, message) = string(input)?;
    let failure = BatchDeleteFailure {
        receipt_handle,
        code: ErrorCode { code, module },
        message,
    };
    Ok((input, failure))
}

pub(super) fn reply_payload<'a>(
    kind: ReplyKind,
    whole: &Bytes,
    input: Input<'a>,
) -> PResult<'a, Reply> {
    match kind {
        ReplyKind::Hello => {
            let (input, version) = be_u8(input)?;
            let (input, nonce) = array::<NONCE_BYTES>(input)?;
            let (input, server_name) = string(input)?;
            let reply = Reply::Hello {
                version,
                nonce,
                server_name,
            };
            Ok((input, reply))
        }
        ReplyKind::Auth => {
            let (input, account) = string(input)?;
            Ok((input, Reply::Auth { account }))
        }
        ReplyKind::Empty => Ok((input, Reply::Empty)),
        ReplyKind::QueueCreated => {
            let (input, queue_id) = be_u64(input)?;
            Ok((input, Reply::QueueCreated { queue_id }))
        }
        ReplyKind::QueueList => {
            let (input, total_count) = be_u64(input)?;
            let (input, queues) = list(input, LIST_LIMIT_MAX as usize, MIN_SUMMARY_BYTES, |i| {
                let (i, queue_id) = be_u64(i)?;
                let (i, queue_name) = string(i)?;
                Ok((
                    i,
                    QueueSummary {
                        queue_id,
                        queue_name,
                    },
                ))
            })?;
            Ok((
                input,
                Reply::QueueList {
                    total_count,
                    queues,
                },
            ))
        }
        ReplyKind::QueueAttributes => {
            let (input, attributes) = queue_attributes(input)?;
            Ok((input, Reply::QueueAttributes(Box::new(attributes))))
        }
        ReplyKind::Count => {
            let (input, count) = be_u64(input)?;
            Ok((input, Reply::Count { count }))
        }
        ReplyKind::Sent => {
            let (input, msg_id) = be_u64(input)?;
            Ok((input, Reply::Sent { msg_id }))
        }
        ReplyKind::BatchSent => {
            let (input, msg_ids) = list(input, BATCH_COUNT_MAX, 8, be_u64)?;
            Ok((input, Reply::BatchSent { msg_ids }))
        }
        ReplyKind::Received => {
            let (input, message) = received_message(whole, input)?;
            Ok((input, Reply::Received(Box::new(message))))
        }
        ReplyKind::BatchReceived => {
            let (rest, messages) = list(input, BATCH_COUNT_MAX, MIN_RECEIVED_BYTES, |i| {
                received_message(whole, i)
            })?;
            // An empty receive is error 7000, never an empty list.
            if messages.is_empty() {
                return fail(input, Why::EmptyList);
            }
            Ok((rest, Reply::BatchReceived(messages)))
        }
        ReplyKind::Peeked => {
            let (input, messages) = list(input, PEEK_COUNT_MAX, MIN_PEEKED_BYTES, |i| {
                peeked_message(whole, i)
            })?;
            Ok((input, Reply::Peeked(messages)))
        }
        ReplyKind::TopicCreated => {
            let (input, topic_id) = be_u64(input)?;
            Ok((input, Reply::TopicCreated { topic_id }))
        }
        ReplyKind::TopicList => {
            let (input, total_count) = be_u64(input)?;
            let (input, topics) = list(input, LIST_LIMIT_MAX as usize, MIN_SUMMARY_BYTES, |i| {
                let (i, topic_id) = be_u64(i)?;
                let (i, topic_name) = string(i)?;
                Ok((
                    i,
                    TopicSummary {
                        topic_id,
                        topic_name,
                    },
                ))
            })?;
            Ok((
                input,
                Reply::TopicList {
                    total_count,
                    topics,
                },
            ))
        }
        ReplyKind::TopicAttributes => {
            let (input, attributes) = topic_attributes(input)?;
            Ok((input, Reply::TopicAttributes(Box::new(attributes))))
        }
        ReplyKind::SubscriptionCreated => {
            let (input, subscription_id) = be_u64(input)?;
            Ok((input, Reply::SubscriptionCreated { subscription_id }))
        }
        ReplyKind::SubscriptionList => {
            let (input, total_count) = be_u64(input)?;
            let (input, subscriptions) = list(
                input,
                LIST_LIMIT_MAX as usize,
                MIN_SUBSCRIPTION_SUMMARY_BYTES,
                |i| {
                    let (i, subscription_id) = be_u64(i)?;
                    let (i, subscription_name) = string(i)?;
                    let (i, protocol) = string(i)?;
                    let (i, endpoint) = string(i)?;
                    let summary = SubscriptionSummary {
                        subscription_id,
                        subscription_name,
                        protocol,
                        endpoint,
                    };
                    Ok((i, summary))
                },
            )?;
            Ok((
                input,
                Reply::SubscriptionList {
                    total_count,
                    subscriptions,
                },
            ))
        }
        ReplyKind::SubscriptionAttributes => {
            let (input, attributes) = subscription_attributes(input)?;
            Ok((input, Reply::SubscriptionAttributes(Box::new(attributes))))
        }
        ReplyKind::Consuming => {
            let (input, consumer_id) = be_u32(input)?;
            Ok((input, Reply::Consuming { consumer_id }))
        }
        ReplyKind::ClusterStatus => {
            let (input, status) = cluster_status(input)?;
            Ok((input, Reply::ClusterStatus(Box::new(status))))
        }
    }
}

/// `cluster_status` (`spec/commands.md`, "0x0004 ClusterStatus").
pub(super) fn cluster_status(input: Input<'_>) -> PResult<'_, ClusterStatus> {
    let (input, node_id) = be_u64(input)?;
    let (input, nodes) = list(input, NODES_MAX, MIN_CLUSTER_NODE_BYTES, |i| {
        let (i, id) = be_u64(i)?;
        let (i, peer) = string(i)?;
        let (i, api) = string(i)?;
        let (i, http) = string(i)?;
        Ok((
            i,
            ClusterNode {
                id,
                peer,
                api,
                http,
            },
        ))
    })?;
    let (input, groups) = list(
        input,
        STATUS_GROUPS_MAX,
        MIN_GROUP_STATUS_BYTES,
        group_status,
    )?;
    let status = ClusterStatus {
        node_id,
        nodes,
        groups,
    };
    Ok((input, status))
}

fn group_status(input: Input<'_>) -> PResult<'_, GroupStatus> {
    let (input, group) = be_u32(input)?;
    let (input, leader) = option(input, be_u64)?;
    let (input, term) = be_u64(input)?;
    let (input, role) = string(input)?;
    let (input, last_log_index) = be_u64(input)?;
    let (input, committed) = be_u64(input)?;
    let (input, applied) = be_u64(input)?;
    let (input, digest) = be_u64(input)?;
    let (input, voting) = boolean(input)?;
    let (input, replication) = list(input, NODES_MAX, MIN_REPLICATION_BYTES, |i| {
        let (i, node) = be_u64(i)?;
        let (i, matched) = option(i, be_u64)?;
        Ok((i, ReplicationStatus { node, matched }))
    })?;
    let status = GroupStatus {
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
    };
    Ok((input, status))
}

/// Every field of [`TopicAttributes`] in declaration order.
pub(super) fn topic_attributes(input: Input<'_>) -> PResult<'_, TopicAttributes> {
    let (input, topic_name) = string(input)?;
    let (input, topic_id) = be_u64(input)?;
    let (input, max_msg_size_bytes) = be_u32(input)?;
    let (input, msg_retention_seconds) = be_u32(input)?;
    let (input, filter_type) = be_u8(input)?;
    let (input, msg_count) = be_u64(input)?;
    let (input, create_time_ms) = be_u64(input)?;
    let (input, last_modify_time_ms) = be_u64(input)?;
    let attributes = TopicAttributes {
        topic_name,
        topic_id,
        max_msg_size_bytes,
        msg_retention_seconds,
        filter_type,
        msg_count,
        create_time_ms,
        last_modify_time_ms,
    };
    Ok((input, attributes))
}

/// Every field of [`SubscriptionAttributes`] in declaration order.
pub(super) fn subscription_attributes(input: Input<'_>) -> PResult<'_, SubscriptionAttributes> {
    let (input, topic_owner) = string(input)?;
    let (input, topic_name) = string(input)?;
    let (input, subscription_name) = string(input)?;
    let (input, subscription_id) = be_u64(input)?;
    let (input, protocol) = string(input)?;
    let (input, endpoint) = string(input)?;
    let (input, notify_strategy) = string(input)?;
    let (input, notify_content_format) = string(input)?;
    let (input, filter_tags) = tag_list(input)?;
    let (input, binding_keys) = tag_list(input)?;
    let (input, create_time_ms) = be_u64(input)?;
    let (input, last_modify_time_ms) = be_u64(input)?;
    let (input, msg_count) = be_u64(input)?;
    let (input, delivered_count) = be_u64(input)?;
    let (input, dropped_count) = be_u64(input)?;
    let (input, last_error) = option(input, string)?;
    let (input, last_error_time_ms) = be_u64(input)?;
    let (input, next_retry_time_ms) = be_u64(input)?;
    let attributes = SubscriptionAttributes {
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
        create_time_ms,
        last_modify_time_ms,
        msg_count,
        delivered_count,
        dropped_count,
        last_error,
        last_error_time_ms,
        next_retry_time_ms,
    };
    Ok((input, attributes))
}

/// Every field of [`QueueAttributes`] in declaration order.
pub(super) fn queue_attributes(input: Input<'_>) -> PResult<'_, QueueAttributes> {
    let (input, queue_name) = string(input)?;
    let (input, queue_id) = be_u64(input)?;
    let (input, max_msg_heap_num) = be_u64(input)?;
    let (input, polling_wait_seconds) = be_u32(input)?;
    let (input, visibility_timeout_seconds) = be_u32(input)?;
    let (input, max_msg_size_bytes) = be_u32(input)?;
    let (input, msg_retention_seconds) = be_u32(input)?;
    let (input, rewind_seconds) = be_u32(input)?;
    let (input, create_time_ms) = be_u64(input)?;
    let (input, last_modify_time_ms) = be_u64(input)?;
    let (input, active_msg_num) = be_u64(input)?;
    let (input, inactive_msg_num) = be_u64(input)?;
    let (input, delay_msg_num) = be_u64(input)?;
    let (input, rewind_msg_num) = be_u64(input)?;
    let (input, min_msg_time_ms) = be_u64(input)?;
    let (input, max_delay_seconds) = be_u32(input)?;
    let (input, dead_letter_policy) = option(input, dead_letter_policy)?;
    // Bounded by the u16 count and the frame; `list` checks the count against the bytes left.
    let (input, dead_letter_sources) =
        list(input, usize::from(u16::MAX), MIN_STRING_BYTES, string)?;
    let attributes = QueueAttributes {
        queue_name,
        queue_id,
        max_msg_heap_num,
        polling_wait_seconds,
        visibility_timeout_seconds,
        max_msg_size_bytes,
        msg_retention_seconds,
        rewind_seconds,
        create_time_ms,
        last_modify_time_ms,
        active_msg_num,
        inactive_msg_num,
        delay_msg_num,
        rewind_msg_num,
        min_msg_time_ms,
        max_delay_seconds,
        dead_letter_policy,
        dead_letter_sources,
    };
    Ok((input, attributes))
}

pub(super) fn received_message<'a>(
    whole: &Bytes,
    input: Input<'a>,
) -> PResult<'a, ReceivedMessage> {
    let (input, msg_id) = be_u64(input)?;
    let (input, receipt_handle) = string(input)?;
    let (input, body) = bytes_field(whole, input)?;
    let (input, enqueue_time_ms) = be_u64(input)?;
    let (input, first_dequeue_time_ms) = be_u64(input)?;
    let (input, next_visible_time_ms) = be_u64(input)?;
    let (input, dequeue_count) = be_u32(input)?;
    let (input, dead_letter) = option(input, dead_letter_info)?;
    let message = ReceivedMessage {
        msg_id,
        receipt_handle,
        body,
        enqueue_time_ms,
        first_dequeue_time_ms,
        next_visible_time_ms,
        dequeue_count,
        dead_letter,
    };
    Ok((input, message))
}

pub(super) fn peeked_message<'a>(whole: &Bytes, input: Input<'a>) -> PResult<'a, PeekedMessage> {
    let (input, msg_id) = be_u64(input)?;
    let (input, body) = bytes_field(whole, input)?;
    let (input, enqueue_time_ms) = be_u64(input)?;
    let (input, dequeue_count) = be_u32(input)?;
    let (after_state, state) = be_u8(input)?;
    let Some(state) = MessageState::from_u8(state) else {
        return fail(
            input,
            Why::BadEnum {
                field: "message state",
                value: state,
            },
        );
    };
    let (input, visible_time_ms) = be_u64(after_state)?;
    let (input, dead_letter) = option(input, dead_letter_info)?;
    let message = PeekedMessage {
        msg_id,
        body,
        enqueue_time_ms,
        dequeue_count,
        state,
        visible_time_ms,
        dead_letter,
    };
    Ok((input, message))
}

/// `dead_letter_info`: string source queue, u8 reason, u32 receive count, u64 time.
pub(super) fn dead_letter_info(input: Input<'_>) -> PResult<'_, DeadLetterInfo> {
    let (input, source_queue) = string(input)?;
    let (after_reason, reason) = be_u8(input)?;
    let Some(reason) = DeadLetterReason::from_u8(reason) else {
        return fail(
            input,
            Why::BadEnum {
                field: "dead-letter reason",
                value: reason,
            },
        );
    };
    let (input, receive_count) = be_u32(after_reason)?;
    let (input, dead_lettered_at_ms) = be_u64(input)?;
    let info = DeadLetterInfo {
        source_queue,
        reason,
        receive_count,
        dead_lettered_at_ms,
    };
    Ok((input, info))
}
