//! Requests (`spec/commands.md`).

use bytes::Bytes;

use crate::limits::{BATCH_COUNT_MAX, TAG_LIST_WIRE_MAX};
use crate::model::{
    DeadLetterPolicy, QueueAttributeSet, SubscriptionAttributeSet, SubscriptionSpec,
    TopicAttributeSet,
};
use crate::protocol::layout::tag;
use crate::protocol::{Opcode, Request, SIGNATURE_BYTES};

use super::fail::{fail, Input, PResult, Why};
use super::primitives::{
    array, be_u16, be_u32, be_u64, be_u8, bytes_field, list, option, string, MIN_BYTES_BYTES,
    MIN_STRING_BYTES,
};

pub(super) fn request_body<'a>(
    opcode: Opcode,
    whole: &Bytes,
    input: Input<'a>,
) -> PResult<'a, Request> {
    match opcode {
        Opcode::Hello => {
            let (input, min_version) = be_u8(input)?;
            let (input, max_version) = be_u8(input)?;
            let (input, client_name) = string(input)?;
            let request = Request::Hello {
                min_version,
                max_version,
                client_name,
            };
            Ok((input, request))
        }
        Opcode::Auth => {
            let (input, secret_id) = string(input)?;
            let (input, signature) = array::<SIGNATURE_BYTES>(input)?;
            Ok((
                input,
                Request::Auth {
                    secret_id,
                    signature,
                },
            ))
        }
        Opcode::Ping => Ok((input, Request::Ping)),
        Opcode::ClusterStatus => Ok((input, Request::ClusterStatus)),
        Opcode::CreateQueue => {
            let (input, queue) = string(input)?;
            let (input, attributes) = attribute_set(input)?;
            Ok((input, Request::CreateQueue { queue, attributes }))
        }
        Opcode::DeleteQueue => {
            let (input, queue) = string(input)?;
            Ok((input, Request::DeleteQueue { queue }))
        }
        Opcode::ListQueue => {
            let (input, search_word) = string(input)?;
            let (input, offset) = be_u32(input)?;
            let (input, limit) = be_u32(input)?;
            let request = Request::ListQueue {
                search_word,
                offset,
                limit,
            };
            Ok((input, request))
        }
        Opcode::GetQueueAttributes => {
            let (input, queue) = string(input)?;
            Ok((input, Request::GetQueueAttributes { queue }))
        }
        Opcode::SetQueueAttributes => {
            let (input, queue) = string(input)?;
            let (input, attributes) = attribute_set(input)?;
            Ok((input, Request::SetQueueAttributes { queue, attributes }))
        }
        Opcode::RewindQueue => {
            let (input, queue) = string(input)?;
            let (input, start_consume_time) = be_u64(input)?;
            let request = Request::RewindQueue {
                queue,
                start_consume_time,
            };
            Ok((input, request))
        }
        Opcode::PurgeQueue => {
            let (input, queue) = string(input)?;
            Ok((input, Request::PurgeQueue { queue }))
        }
        Opcode::ListDeadLetterSourceQueues => {
            let (input, queue) = string(input)?;
            let (input, offset) = be_u32(input)?;
            let (input, limit) = be_u32(input)?;
            let request = Request::ListDeadLetterSourceQueues {
                queue,
                offset,
                limit,
            };
            Ok((input, request))
        }
        Opcode::SendMessage => {
            let (input, queue) = string(input)?;
            let (input, body) = bytes_field(whole, input)?;
            let (input, delay_seconds) = be_u32(input)?;
            let request = Request::SendMessage {
                queue,
                body,
                delay_seconds,
            };
            Ok((input, request))
        }
        Opcode::BatchSendMessage => {
            let (input, queue) = string(input)?;
            let (input, bodies) = list(input, BATCH_COUNT_MAX, MIN_BYTES_BYTES, |item| {
                bytes_field(whole, item)
            })?;
            let (input, delay_seconds) = be_u32(input)?;
            let request = Request::BatchSendMessage {
                queue,
                bodies,
                delay_seconds,
            };
            Ok((input, request))
        }
        Opcode::ReceiveMessage => {
            let (input, queue) = string(input)?;
            let (input, polling_wait_seconds) = option(input, be_u32)?;
            let request = Request::ReceiveMessage {
                queue,
                polling_wait_seconds,
            };
            Ok((input, request))
        }
        Opcode::BatchReceiveMessage => {
            let (input, queue) = string(input)?;
            let (input, num_of_msg) = be_u16(input)?;
            let (input, polling_wait_seconds) = option(input, be_u32)?;
            let request = Request::BatchReceiveMessage {
                queue,
                num_of_msg,
                polling_wait_seconds,
            };
            Ok((input, request))
        }
        Opcode::DeleteMessage => {
            let (input, queue) = string(input)?;
            let (input, receipt_handle) = string(input)?;
            let request = Request::DeleteMessage {
                queue,
                receipt_handle,
            };
            Ok((input, request))
        }
        Opcode::BatchDeleteMessage => {
            let (input, queue) = string(input)?;
            let (input, receipt_handles) = list(input, BATCH_COUNT_MAX, MIN_STRING_BYTES, string)?;
            let request = Request::BatchDeleteMessage {
                queue,
                receipt_handles,
            };
            Ok((input, request))
        }
        Opcode::ChangeMessageVisibility => {
            let (input, queue) = string(input)?;
            let (input, receipt_handle) = string(input)?;
            let (input, visibility_timeout_seconds) = be_u32(input)?;
            let request = Request::ChangeMessageVisibility {
                queue,
                receipt_handle,
                visibility_timeout_seconds,
            };
            Ok((input, request))
        }
        Opcode::PeekMessage => {
            let (input, queue) = string(input)?;
            let (input, num_of_msg) = be_u16(input)?;
            Ok((input, Request::PeekMessage { queue, num_of_msg }))
        }
        Opcode::RedriveDeadLetters => {
            let (input, queue) = string(input)?;
            let (input, limit) = be_u32(input)?;
            Ok((input, Request::RedriveDeadLetters { queue, limit }))
        }
        Opcode::Consume => {
            let (input, queue) = string(input)?;
            let (input, credit) = be_u32(input)?;
            let (input, batch_max) = be_u16(input)?;
            let (input, visibility_timeout_seconds) = option(input, be_u32)?;
            let request = Request::Consume {
                queue,
                credit,
                batch_max,
                visibility_timeout_seconds,
            };
            Ok((input, request))
        }
        Opcode::CancelConsume => {
            let (input, consumer_id) = be_u32(input)?;
            Ok((input, Request::CancelConsume { consumer_id }))
        }
        Opcode::CreateTopic => {
            let (input, topic) = string(input)?;
            let (input, attributes) = topic_attribute_set(input)?;
            Ok((input, Request::CreateTopic { topic, attributes }))
        }
        Opcode::DeleteTopic => {
            let (input, topic) = string(input)?;
            Ok((input, Request::DeleteTopic { topic }))
        }
        Opcode::ListTopic => {
            let (input, search_word) = string(input)?;
            let (input, offset) = be_u32(input)?;
            let (input, limit) = be_u32(input)?;
            let request = Request::ListTopic {
                search_word,
                offset,
                limit,
            };
            Ok((input, request))
        }
        Opcode::GetTopicAttributes => {
            let (input, topic) = string(input)?;
            Ok((input, Request::GetTopicAttributes { topic }))
        }
        Opcode::SetTopicAttributes => {
            let (input, topic) = string(input)?;
            let (input, attributes) = topic_attribute_set(input)?;
            Ok((input, Request::SetTopicAttributes { topic, attributes }))
        }
        Opcode::PublishMessage => {
            let (input, topic) = string(input)?;
            let (input, body) = bytes_field(whole, input)?;
            let (input, msg_tags) = tag_list(input)?;
            let (input, routing_key) = option(input, string)?;
            let request = Request::PublishMessage {
                topic,
                body,
                msg_tags,
                routing_key,
            };
            Ok((input, request))
        }
        Opcode::BatchPublishMessage => {
            let (input, topic) = string(input)?;
            let (input, bodies) = list(input, BATCH_COUNT_MAX, MIN_BYTES_BYTES, |item| {
                bytes_field(whole, item)
            })?;
            let (input, msg_tags) = tag_list(input)?;
            let (input, routing_key) = option(input, string)?;
            let request = Request::BatchPublishMessage {
                topic,
                bodies,
                msg_tags,
                routing_key,
            };
            Ok((input, request))
        }
        Opcode::Subscribe => {
            let (input, topic) = string(input)?;
            let (input, subscription) = string(input)?;
            let (input, spec) = subscription_spec(input)?;
            let request = Request::Subscribe {
                topic,
                subscription,
                spec,
            };
            Ok((input, request))
        }
        Opcode::Unsubscribe => {
            let (input, topic) = string(input)?;
            let (input, subscription) = string(input)?;
            Ok((
                input,
                Request::Unsubscribe {
                    topic,
                    subscription,
                },
            ))
        }
        Opcode::ListSubscriptionByTopic => {
            let (input, topic) = string(input)?;
            let (input, search_word) = string(input)?;
            let (input, offset) = be_u32(input)?;
            let (input, limit) = be_u32(input)?;
            let request = Request::ListSubscriptionByTopic {
                topic,
                search_word,
                offset,
                limit,
            };
            Ok((input, request))
        }
        Opcode::GetSubscriptionAttributes => {
            let (input, topic) = string(input)?;
            let (input, subscription) = string(input)?;
            Ok((
                input,
                Request::GetSubscriptionAttributes {
                    topic,
                    subscription,
                },
            ))
        }
        Opcode::SetSubscriptionAttributes => {
            let (input, topic) = string(input)?;
            let (input, subscription) = string(input)?;
            let (input, attributes) = subscription_attribute_set(input)?;
            let request = Request::SetSubscriptionAttributes {
                topic,
                subscription,
                attributes,
            };
            Ok((input, request))
        }
        Opcode::ClearSubscriptionFilterTags => {
            let (input, topic) = string(input)?;
            let (input, subscription) = string(input)?;
            Ok((
                input,
                Request::ClearSubscriptionFilterTags {
                    topic,
                    subscription,
                },
            ))
        }
    }
}

/// `list<string>` of tags or binding keys, at most `TAG_LIST_WIRE_MAX`. Longer lists are
/// malformed; up to it, the engine answers lists over its own limit (5) with CMQ's codes.
pub(super) fn tag_list(input: Input<'_>) -> PResult<'_, Vec<String>> {
    list(input, TAG_LIST_WIRE_MAX, MIN_STRING_BYTES, string)
}

/// `topic_attribute_set`: option<u32> maxMsgSize, option<u8> filterType. Values are the
/// engine's to check.
pub(super) fn topic_attribute_set(input: Input<'_>) -> PResult<'_, TopicAttributeSet> {
    let (input, max_msg_size_bytes) = option(input, be_u32)?;
    let (input, filter_type) = option(input, be_u8)?;
    let set = TopicAttributeSet {
        max_msg_size_bytes,
        filter_type,
    };
    Ok((input, set))
}

/// `subscription_spec`: protocol, endpoint, option strategy, option format, filter tags,
/// binding keys.
pub(super) fn subscription_spec(input: Input<'_>) -> PResult<'_, SubscriptionSpec> {
    let (input, protocol) = string(input)?;
    let (input, endpoint) = string(input)?;
    let (input, notify_strategy) = option(input, string)?;
    let (input, notify_content_format) = option(input, string)?;
    let (input, filter_tags) = tag_list(input)?;
    let (input, binding_keys) = tag_list(input)?;
    let spec = SubscriptionSpec {
        protocol,
        endpoint,
        notify_strategy,
        notify_content_format,
        filter_tags,
        binding_keys,
    };
    Ok((input, spec))
}

/// `subscription_attribute_set`: every field an option.
pub(super) fn subscription_attribute_set(
    input: Input<'_>,
) -> PResult<'_, SubscriptionAttributeSet> {
    let (input, notify_strategy) = option(input, string)?;
    let (input, notify_content_format) = option(input, string)?;
    let (input, filter_tags) = option(input, tag_list)?;
    let (input, binding_keys) = option(input, tag_list)?;
    let set = SubscriptionAttributeSet {
        notify_strategy,
        notify_content_format,
        filter_tags,
        binding_keys,
    };
    Ok((input, set))
}

/// Queue attribute set: u8 count, then `count` entries of u8 tag + value, tags strictly
/// increasing. Ranges are the engine's to check (with CMQ's codes); only the shape is ours.
pub(super) fn attribute_set(input: Input<'_>) -> PResult<'_, QueueAttributeSet> {
    let (mut rest, count) = be_u8(input)?;
    if count > tag::LAST {
        return fail(input, Why::TooManyAttributes(count));
    }
    let mut set = QueueAttributeSet::default();
    let mut previous = 0u8;
    for _ in 0..count {
        let entry = rest;
        let (value, tag) = be_u8(entry)?;
        if tag == 0 || tag > tag::LAST {
            return fail(entry, Why::UnknownTag(tag));
        }
        if tag == previous {
            return fail(entry, Why::DuplicateTag(tag));
        }
        if tag < previous {
            return fail(entry, Why::TagOrder { tag, previous });
        }
        rest = match tag {
            tag::MAX_MSG_HEAP_NUM => {
                let (next, v) = be_u64(value)?;
                set.max_msg_heap_num = Some(v);
                next
            }
            tag::POLLING_WAIT_SECONDS => {
                let (next, v) = be_u32(value)?;
                set.polling_wait_seconds = Some(v);
                next
            }
            tag::VISIBILITY_TIMEOUT => {
                let (next, v) = be_u32(value)?;
                set.visibility_timeout_seconds = Some(v);
                next
            }
            tag::MAX_MSG_SIZE => {
                let (next, v) = be_u32(value)?;
                set.max_msg_size_bytes = Some(v);
                next
            }
            tag::MSG_RETENTION_SECONDS => {
                let (next, v) = be_u32(value)?;
                set.msg_retention_seconds = Some(v);
                next
            }
            tag::REWIND_SECONDS => {
                let (next, v) = be_u32(value)?;
                set.rewind_seconds = Some(v);
                next
            }
            tag::DEAD_LETTER_POLICY => {
                let (next, v) = option(value, dead_letter_policy)?;
                set.dead_letter_policy = Some(v);
                next
            }
            unknown => return fail(entry, Why::UnknownTag(unknown)),
        };
        previous = tag;
    }
    Ok((rest, set))
}

/// `dead_letter_policy`: string queue, u8 policy, u32 maxReceiveCount, u32 maxTimeToLive.
/// The policy byte is passed through: the engine rejects values other than 0 and 1 with
/// CMQ's parameter error rather than the parser with a generic one.
pub(super) fn dead_letter_policy(input: Input<'_>) -> PResult<'_, DeadLetterPolicy> {
    let (input, dead_letter_queue) = string(input)?;
    let (input, policy) = be_u8(input)?;
    let (input, max_receive_count) = be_u32(input)?;
    let (input, max_time_to_live_seconds) = be_u32(input)?;
    let policy = DeadLetterPolicy {
        dead_letter_queue,
        policy,
        max_receive_count,
        max_time_to_live_seconds,
    };
    Ok((input, policy))
}
