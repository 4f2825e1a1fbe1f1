//! Request bodies (`spec/commands.md`).

use bytes::{BufMut, BytesMut};

use crate::limits::{BATCH_COUNT_MAX, TAG_LIST_WIRE_MAX};
use crate::model::{DeadLetterPolicy, QueueAttributeSet, SubscriptionSpec, TopicAttributeSet};
use crate::protocol::layout::tag;
use crate::protocol::Request;

use super::primitives::{put_bytes, put_list, put_option, put_string};
use super::EncodeError;

pub(super) fn request_body(request: &Request, dst: &mut BytesMut) -> Result<(), EncodeError> {
    match request {
        Request::Hello {
            min_version,
            max_version,
            client_name,
        } => {
            dst.put_u8(*min_version);
            dst.put_u8(*max_version);
            put_string(dst, "client_name", client_name)
        }
        Request::Auth {
            secret_id,
            signature,
        } => {
            put_string(dst, "secret_id", secret_id)?;
            dst.put_slice(signature);
            Ok(())
        }
        Request::Ping | Request::ClusterStatus => Ok(()),
        Request::CreateQueue { queue, attributes }
        | Request::SetQueueAttributes { queue, attributes } => {
            put_string(dst, "queue", queue)?;
            put_attribute_set(dst, attributes)
        }
        Request::DeleteQueue { queue }
        | Request::GetQueueAttributes { queue }
        | Request::PurgeQueue { queue } => put_string(dst, "queue", queue),
        Request::ListQueue {
            search_word,
            offset,
            limit,
        } => {
            put_string(dst, "search_word", search_word)?;
            dst.put_u32(*offset);
            dst.put_u32(*limit);
            Ok(())
        }
        Request::RewindQueue {
            queue,
            start_consume_time,
        } => {
            put_string(dst, "queue", queue)?;
            dst.put_u64(*start_consume_time);
            Ok(())
        }
        Request::ListDeadLetterSourceQueues {
            queue,
            offset,
            limit,
        } => {
            put_string(dst, "queue", queue)?;
            dst.put_u32(*offset);
            dst.put_u32(*limit);
            Ok(())
        }
        Request::SendMessage {
            queue,
            body,
            delay_seconds,
        } => {
            put_string(dst, "queue", queue)?;
            put_bytes(dst, body)?;
            dst.put_u32(*delay_seconds);
            Ok(())
        }
        Request::BatchSendMessage {
            queue,
            bodies,
            delay_seconds,
        } => {
            put_string(dst, "queue", queue)?;
            put_list(dst, "bodies", bodies, BATCH_COUNT_MAX, |body, dst| {
                put_bytes(dst, body)
            })?;
            dst.put_u32(*delay_seconds);
            Ok(())
        }
        Request::ReceiveMessage {
            queue,
            polling_wait_seconds,
        } => {
            put_string(dst, "queue", queue)?;
            put_option(dst, polling_wait_seconds.as_ref(), |seconds, dst| {
                dst.put_u32(*seconds);
                Ok(())
            })
        }
        Request::BatchReceiveMessage {
            queue,
            num_of_msg,
            polling_wait_seconds,
        } => {
            put_string(dst, "queue", queue)?;
            dst.put_u16(*num_of_msg);
            put_option(dst, polling_wait_seconds.as_ref(), |seconds, dst| {
                dst.put_u32(*seconds);
                Ok(())
            })
        }
        Request::DeleteMessage {
            queue,
            receipt_handle,
        } => {
            put_string(dst, "queue", queue)?;
            put_string(dst, "receipt_handle", receipt_handle)
        }
        Request::BatchDeleteMessage {
            queue,
            receipt_handles,
        } => {
            put_string(dst, "queue", queue)?;
            put_list(
                dst,
                "receipt_handles",
                receipt_handles,
                BATCH_COUNT_MAX,
                |handle, dst| put_string(dst, "receipt_handle", handle),
            )
        }
        Request::ChangeMessageVisibility {
            queue,
            receipt_handle,
            visibility_timeout_seconds,
        } => {
            put_string(dst, "queue", queue)?;
            put_string(dst, "receipt_handle", receipt_handle)?;
            dst.put_u32(*visibility_timeout_seconds);
            Ok(())
        }
        Request::PeekMessage { queue, num_of_msg } => {
            put_string(dst, "queue", queue)?;
            dst.put_u16(*num_of_msg);
            Ok(())
        }
        Request::RedriveDeadLetters { queue, limit } => {
            put_string(dst, "queue", queue)?;
            dst.put_u32(*limit);
            Ok(())
        }
        Request::Consume {
            queue,
            credit,
            batch_max,
            visibility_timeout_seconds,
        } => {
            put_string(dst, "queue", queue)?;
            dst.put_u32(*credit);
            dst.put_u16(*batch_max);
            put_option(dst, visibility_timeout_seconds.as_ref(), |seconds, dst| {
                dst.put_u32(*seconds);
                Ok(())
            })
        }
        Request::CancelConsume { consumer_id } => {
            dst.put_u32(*consumer_id);
            Ok(())
        }
        Request::CreateTopic { topic, attributes }
        | Request::SetTopicAttributes { topic, attributes } => {
            put_string(dst, "topic", topic)?;
            put_topic_attribute_set(dst, attributes)
        }
        Request::DeleteTopic { topic } | Request::GetTopicAttributes { topic } => {
            put_string(dst, "topic", topic)
        }
        Request::ListTopic {
            search_word,
            offset,
            limit,
        } => {
            put_string(dst, "search_word", search_word)?;
            dst.put_u32(*offset);
            dst.put_u32(*limit);
            Ok(())
        }
        Request::PublishMessage {
            topic,
            body,
            msg_tags,
            routing_key,
        } => {
            put_string(dst, "topic", topic)?;
            put_bytes(dst, body)?;
            put_tag_list(dst, "msg_tags", msg_tags)?;
            put_option(dst, routing_key.as_ref(), |key, dst| {
                put_string(dst, "routing_key", key)
            })
        }
        Request::BatchPublishMessage {
            topic,
            bodies,
            msg_tags,
            routing_key,
        } => {
            put_string(dst, "topic", topic)?;
            put_list(dst, "bodies", bodies, BATCH_COUNT_MAX, |body, dst| {
                put_bytes(dst, body)
            })?;
            put_tag_list(dst, "msg_tags", msg_tags)?;
            put_option(dst, routing_key.as_ref(), |key, dst| {
                put_string(dst, "routing_key", key)
            })
        }
        Request::Subscribe {
            topic,
            subscription,
            spec,
        } => {
            put_string(dst, "topic", topic)?;
            put_string(dst, "subscription", subscription)?;
            put_subscription_spec(dst, spec)
        }
        Request::Unsubscribe {
            topic,
            subscription,
        }
        | Request::GetSubscriptionAttributes {
            topic,
            subscription,
        }
        | Request::ClearSubscriptionFilterTags {
            topic,
            subscription,
        } => {
            put_string(dst, "topic", topic)?;
            put_string(dst, "subscription", subscription)
        }
        Request::ListSubscriptionByTopic {
            topic,
            search_word,
            offset,
            limit,
        } => {
            put_string(dst, "topic", topic)?;
            put_string(dst, "search_word", search_word)?;
            dst.put_u32(*offset);
            dst.put_u32(*limit);
            Ok(())
        }
        Request::SetSubscriptionAttributes {
            topic,
            subscription,
            attributes,
        } => {
            put_string(dst, "topic", topic)?;
            put_string(dst, "subscription", subscription)?;
            put_option(dst, attributes.notify_strategy.as_ref(), |strategy, dst| {
                put_string(dst, "notify_strategy", strategy)
            })?;
            put_option(
                dst,
                attributes.notify_content_format.as_ref(),
                |format, dst| put_string(dst, "notify_content_format", format),
            )?;
            put_option(dst, attributes.filter_tags.as_ref(), |tags, dst| {
                put_tag_list(dst, "filter_tags", tags)
            })?;
            put_option(dst, attributes.binding_keys.as_ref(), |keys, dst| {
                put_tag_list(dst, "binding_keys", keys)
            })
        }
    }
}

/// `list<string>` of tags or binding keys, at most `TAG_LIST_WIRE_MAX`.
pub(super) fn put_tag_list(
    dst: &mut BytesMut,
    field: &'static str,
    tags: &[String],
) -> Result<(), EncodeError> {
    put_list(dst, field, tags, TAG_LIST_WIRE_MAX, |tag, dst| {
        put_string(dst, field, tag)
    })
}

/// `topic_attribute_set`: option<u32> maxMsgSize, option<u8> filterType.
pub(super) fn put_topic_attribute_set(
    dst: &mut BytesMut,
    set: &TopicAttributeSet,
) -> Result<(), EncodeError> {
    put_option(dst, set.max_msg_size_bytes.as_ref(), |size, dst| {
        dst.put_u32(*size);
        Ok(())
    })?;
    put_option(dst, set.filter_type.as_ref(), |filter_type, dst| {
        dst.put_u8(*filter_type);
        Ok(())
    })
}

pub(super) fn put_subscription_spec(
    dst: &mut BytesMut,
    spec: &SubscriptionSpec,
) -> Result<(), EncodeError> {
    put_string(dst, "protocol", &spec.protocol)?;
    put_string(dst, "endpoint", &spec.endpoint)?;
    put_option(dst, spec.notify_strategy.as_ref(), |strategy, dst| {
        put_string(dst, "notify_strategy", strategy)
    })?;
    put_option(dst, spec.notify_content_format.as_ref(), |format, dst| {
        put_string(dst, "notify_content_format", format)
    })?;
    put_tag_list(dst, "filter_tags", &spec.filter_tags)?;
    put_tag_list(dst, "binding_keys", &spec.binding_keys)
}

/// u8 count, then the fields that are set as tag + value, in tag order.
pub(super) fn put_attribute_set(
    dst: &mut BytesMut,
    set: &QueueAttributeSet,
) -> Result<(), EncodeError> {
    let u32_entries = [
        (tag::POLLING_WAIT_SECONDS, set.polling_wait_seconds),
        (tag::VISIBILITY_TIMEOUT, set.visibility_timeout_seconds),
        (tag::MAX_MSG_SIZE, set.max_msg_size_bytes),
        (tag::MSG_RETENTION_SECONDS, set.msg_retention_seconds),
        (tag::REWIND_SECONDS, set.rewind_seconds),
    ];
    let count = usize::from(set.max_msg_heap_num.is_some())
        + u32_entries.iter().filter(|(_, v)| v.is_some()).count()
        + usize::from(set.dead_letter_policy.is_some());
    // At most 7 entries: always fits the u8 count.
    dst.put_u8(u8::try_from(count).unwrap_or(tag::LAST));
    if let Some(value) = set.max_msg_heap_num {
        dst.put_u8(tag::MAX_MSG_HEAP_NUM);
        dst.put_u64(value);
    }
    for (entry_tag, value) in u32_entries {
        if let Some(value) = value {
            dst.put_u8(entry_tag);
            dst.put_u32(value);
        }
    }
    if let Some(policy) = &set.dead_letter_policy {
        dst.put_u8(tag::DEAD_LETTER_POLICY);
        put_option(dst, policy.as_ref(), put_dead_letter_policy)?;
    }
    Ok(())
}

pub(super) fn put_dead_letter_policy(
    policy: &DeadLetterPolicy,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    put_string(dst, "dead_letter_queue", &policy.dead_letter_queue)?;
    dst.put_u8(policy.policy);
    dst.put_u32(policy.max_receive_count);
    dst.put_u32(policy.max_time_to_live_seconds);
    Ok(())
}
