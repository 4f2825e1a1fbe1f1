//! Encoding: every record type into its framed bytes.

use super::*;

/// Appends one framed record: reserves the header, lets `payload` write, fills in length and
/// checksum.
pub(super) fn frame(
    out: &mut Vec<u8>,
    record_type: RecordType,
    payload: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    out.push(record_type as u8);
    if let Err(error) = payload(out) {
        out.truncate(start);
        return Err(error);
    }
    let len = out.len() - start - RECORD_HEADER_BYTES;
    if len > RECORD_BYTES_MAX {
        out.truncate(start);
        return Err(EncodeError::TooLong {
            what: "record",
            len,
        });
    }
    // `len <= RECORD_BYTES_MAX` fits in u32.
    let len_field = (len as u32).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len_field);
    let crc = checksum(&len_field, &out[start + RECORD_HEADER_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

pub(super) fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

pub(super) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(super) fn put_str(out: &mut Vec<u8>, what: &'static str, s: &str) -> Result<(), EncodeError> {
    let len = u16::try_from(s.len()).map_err(|_| EncodeError::TooLong { what, len: s.len() })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Frames a record whose last field is `body` (a `bytes` field) without copying the body:
/// `payload` writes the fields before it, then the body's length; the record's length and
/// checksum cover the body, which the caller writes right after what `out` holds.
pub(super) fn frame_before_body(
    out: &mut Vec<u8>,
    record_type: RecordType,
    payload: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
    body: &[u8],
) -> Result<(), EncodeError> {
    let start = out.len();
    let Ok(body_len) = u32::try_from(body.len()) else {
        return Err(EncodeError::TooLong {
            what: "message body",
            len: body.len(),
        });
    };
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    out.push(record_type as u8);
    if let Err(error) = payload(out) {
        out.truncate(start);
        return Err(error);
    }
    put_u32(out, body_len);
    let len = out.len() - start - RECORD_HEADER_BYTES + body.len();
    if len > RECORD_BYTES_MAX {
        out.truncate(start);
        return Err(EncodeError::TooLong {
            what: "record",
            len,
        });
    }
    // `len <= RECORD_BYTES_MAX` fits in u32.
    let len_field = (len as u32).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len_field);
    let crc = crc32c::crc32c_append(
        checksum(&len_field, &out[start + RECORD_HEADER_BYTES..]),
        body,
    );
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

pub(super) fn put_bytes(
    out: &mut Vec<u8>,
    what: &'static str,
    b: &[u8],
) -> Result<(), EncodeError> {
    let len = u32::try_from(b.len()).map_err(|_| EncodeError::TooLong { what, len: b.len() })?;
    put_u32(out, len);
    out.extend_from_slice(b);
    Ok(())
}

pub(super) fn put_settings(out: &mut Vec<u8>, s: &QueueSettings) -> Result<(), EncodeError> {
    put_u64(out, s.max_msg_heap_num);
    put_u32(out, s.polling_wait_seconds);
    put_u32(out, s.visibility_timeout_seconds);
    put_u32(out, s.max_msg_size_bytes);
    put_u32(out, s.msg_retention_seconds);
    put_u32(out, s.rewind_seconds);
    match &s.dead_letter_policy {
        None => put_u8(out, 0),
        Some(p) => {
            put_u8(out, 1);
            put_str(out, "dead-letter queue name", &p.dead_letter_queue)?;
            put_u8(out, p.policy);
            put_u32(out, p.max_receive_count);
            put_u32(out, p.max_time_to_live_seconds);
        }
    }
    Ok(())
}

pub(super) fn put_queue_image(out: &mut Vec<u8>, q: &QueueImage) -> Result<(), EncodeError> {
    put_u64(out, q.queue_id);
    put_str(out, "account", &q.account)?;
    put_str(out, "queue name", &q.name)?;
    put_settings(out, &q.settings)?;
    put_u64(out, q.created_at_ms);
    put_u64(out, q.modified_at_ms);
    Ok(())
}

pub(super) fn put_topic_settings(out: &mut Vec<u8>, s: &TopicSettings) {
    put_u32(out, s.max_msg_size_bytes);
    put_u8(out, s.filter_type);
    put_u32(out, s.msg_retention_seconds);
}

/// A list of tags or keys: `u16` count, then each a string.
pub(super) fn put_list(
    out: &mut Vec<u8>,
    what: &'static str,
    list: &[String],
) -> Result<(), EncodeError> {
    let count = u16::try_from(list.len()).map_err(|_| EncodeError::TooLong {
        what,
        len: list.len(),
    })?;
    out.extend_from_slice(&count.to_le_bytes());
    for item in list {
        put_str(out, what, item)?;
    }
    Ok(())
}

/// A list of ids: `u32` count, then each a `u64`.
pub(super) fn put_ids(
    out: &mut Vec<u8>,
    what: &'static str,
    ids: &[u64],
) -> Result<(), EncodeError> {
    let count = u32::try_from(ids.len()).map_err(|_| EncodeError::TooLong {
        what,
        len: ids.len(),
    })?;
    put_u32(out, count);
    for id in ids {
        put_u64(out, *id);
    }
    Ok(())
}

pub(super) fn put_subscription_settings(
    out: &mut Vec<u8>,
    s: &SubscriptionSettings,
) -> Result<(), EncodeError> {
    put_u8(out, protocol_code(s.protocol));
    put_str(out, "endpoint", &s.endpoint)?;
    put_u8(out, strategy_code(s.notify_strategy));
    put_u8(out, format_code(s.content_format));
    put_list(out, "filterTag", &s.filter_tags)?;
    put_list(out, "bindingKey", &s.binding_keys)
}

pub(super) fn put_topic_image(out: &mut Vec<u8>, t: &TopicImage) -> Result<(), EncodeError> {
    put_u64(out, t.topic_id);
    put_str(out, "account", &t.account)?;
    put_str(out, "topic name", &t.name)?;
    put_topic_settings(out, &t.settings);
    put_u64(out, t.created_at_ms);
    put_u64(out, t.modified_at_ms);
    Ok(())
}

pub(super) fn put_subscription_image(
    out: &mut Vec<u8>,
    s: &SubscriptionImage,
) -> Result<(), EncodeError> {
    put_u64(out, s.subscription_id);
    put_u64(out, s.topic_id);
    put_str(out, "subscription name", &s.name)?;
    put_subscription_settings(out, &s.settings)?;
    put_u64(out, s.created_at_ms);
    put_u64(out, s.modified_at_ms);
    Ok(())
}

// The codes of the engine's enums in the log. Part of the format: never renumber.

pub(super) fn protocol_code(p: Protocol) -> u8 {
    match p {
        Protocol::Http => 0,
        Protocol::Queue => 1,
    }
}

pub(super) fn strategy_code(s: NotifyStrategy) -> u8 {
    match s {
        NotifyStrategy::BackoffRetry => 0,
        NotifyStrategy::ExponentialDecayRetry => 1,
    }
}

pub(super) fn format_code(f: ContentFormat) -> u8 {
    match f {
        ContentFormat::Json => 0,
        ContentFormat::Simplified => 1,
    }
}

pub(super) fn outcome_code(o: PushOutcome) -> u8 {
    match o {
        PushOutcome::Delivered => 0,
        PushOutcome::Dropped => 1,
    }
}

/// A MessageSent record's fields before its body.
fn message_sent_fields(
    o: &mut Vec<u8>,
    account: &str,
    queue_id: u64,
    queue: &str,
    msg_id: u64,
    enqueue_time_ms: u64,
    visible_at_ms: u64,
) -> Result<(), EncodeError> {
    put_str(o, "account", account)?;
    put_u64(o, queue_id);
    put_str(o, "queue name", queue)?;
    put_u64(o, msg_id);
    put_u64(o, enqueue_time_ms);
    put_u64(o, visible_at_ms);
    Ok(())
}

/// A TopicMessageRetained record's fields before its body.
#[allow(clippy::too_many_arguments)]
fn retained_fields(
    o: &mut Vec<u8>,
    account: &str,
    topic_id: u64,
    topic: &str,
    msg_id: u64,
    publish_time_ms: u64,
    expires_at_ms: u64,
    msg_tags: &[String],
    subscription_ids: &[u64],
) -> Result<(), EncodeError> {
    put_str(o, "account", account)?;
    put_u64(o, topic_id);
    put_str(o, "topic name", topic)?;
    put_u64(o, msg_id);
    put_u64(o, publish_time_ms);
    put_u64(o, expires_at_ms);
    put_list(o, "msgTag", msg_tags)?;
    put_ids(o, "subscription list", subscription_ids)?;
    Ok(())
}

/// Encodes `m` as [`encode_mutation`] does, except that a message body, the last field of a
/// MessageSent or TopicMessageRetained record, is left out of `out` and returned: the record
/// is what `out` got followed by that body (its length and checksum cover the body). The log
/// writer copies bodies into its write buffer from where they are, once.
///
/// # Errors
///
/// As [`encode_mutation`]; `out` is left as it was.
pub fn encode_mutation_split(
    m: &Mutation,
    out: &mut Vec<u8>,
) -> Result<Option<Bytes>, EncodeError> {
    match m {
        Mutation::MessageSent {
            account,
            queue_id,
            queue,
            msg_id,
            body,
            enqueue_time_ms,
            visible_at_ms,
        } => frame_before_body(
            out,
            RecordType::MessageSent,
            |o| {
                message_sent_fields(
                    o,
                    account,
                    *queue_id,
                    queue,
                    *msg_id,
                    *enqueue_time_ms,
                    *visible_at_ms,
                )
            },
            body,
        )
        .map(|()| Some(body.clone())),
        Mutation::TopicMessageRetained {
            account,
            topic_id,
            topic,
            msg_id,
            body,
            msg_tags,
            publish_time_ms,
            expires_at_ms,
            subscription_ids,
        } => frame_before_body(
            out,
            RecordType::TopicMessageRetained,
            |o| {
                retained_fields(
                    o,
                    account,
                    *topic_id,
                    topic,
                    *msg_id,
                    *publish_time_ms,
                    *expires_at_ms,
                    msg_tags,
                    subscription_ids,
                )
            },
            body,
        )
        .map(|()| Some(body.clone())),
        other => encode_mutation(other, out).map(|()| None),
    }
}

/// Appends the record of one mutation.
///
/// # Errors
///
/// [`EncodeError::TooLong`]. Every variant has an arm below and there is no wildcard: a new
/// [`Mutation`] does not compile until it has a record type.
pub fn encode_mutation(m: &Mutation, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match m {
        Mutation::QueueCreated {
            account,
            queue_id,
            name,
            settings,
            created_at_ms,
        } => frame(out, RecordType::QueueCreated, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", name)?;
            put_settings(o, settings)?;
            put_u64(o, *created_at_ms);
            Ok(())
        }),
        Mutation::QueueAttributesSet {
            account,
            queue_id,
            name,
            settings,
            modified_at_ms,
        } => frame(out, RecordType::QueueAttributesSet, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", name)?;
            put_settings(o, settings)?;
            put_u64(o, *modified_at_ms);
            Ok(())
        }),
        Mutation::QueueDeleted {
            account,
            queue_id,
            name,
            at_ms,
        } => frame(out, RecordType::QueueDeleted, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", name)?;
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::MessageSent {
            account,
            queue_id,
            queue,
            msg_id,
            body,
            enqueue_time_ms,
            visible_at_ms,
        } => frame(out, RecordType::MessageSent, |o| {
            message_sent_fields(
                o,
                account,
                *queue_id,
                queue,
                *msg_id,
                *enqueue_time_ms,
                *visible_at_ms,
            )?;
            put_bytes(o, "message body", body)
        }),
        Mutation::MessageDeleted {
            account,
            queue_id,
            queue,
            msg_id,
            at_ms,
            to_rewind_area,
        } => frame(out, RecordType::MessageDeleted, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", queue)?;
            put_u64(o, *msg_id);
            put_u64(o, *at_ms);
            put_u8(o, u8::from(*to_rewind_area));
            Ok(())
        }),
        Mutation::Rewound {
            account,
            queue_id,
            queue,
            start_ms,
            at_ms,
        } => frame(out, RecordType::Rewound, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", queue)?;
            put_u64(o, *start_ms);
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::Purged {
            account,
            queue_id,
            queue,
            at_ms,
        } => frame(out, RecordType::Purged, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", queue)?;
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::DeadLettered {
            account,
            source_queue_id,
            source,
            target,
            target_queue_id,
            msg_id,
            reason,
            receive_count,
            at_ms,
        } => frame(out, RecordType::DeadLettered, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *source_queue_id);
            put_str(o, "queue name", source)?;
            put_str(o, "queue name", target)?;
            match target_queue_id {
                Some(id) => {
                    put_u8(o, 1);
                    put_u64(o, *id);
                }
                None => put_u8(o, 0),
            }
            put_u64(o, *msg_id);
            put_u8(o, *reason as u8);
            put_u32(o, *receive_count);
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::Redriven {
            account,
            dead_letter_queue_id,
            dead_letter_queue,
            target_queue_id,
            target,
            msg_id,
            at_ms,
        } => frame(out, RecordType::Redriven, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *dead_letter_queue_id);
            put_str(o, "queue name", dead_letter_queue)?;
            put_u64(o, *target_queue_id);
            put_str(o, "queue name", target)?;
            put_u64(o, *msg_id);
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::TopicCreated {
            account,
            topic_id,
            name,
            settings,
            created_at_ms,
        } => frame(out, RecordType::TopicCreated, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_str(o, "topic name", name)?;
            put_topic_settings(o, settings);
            put_u64(o, *created_at_ms);
            Ok(())
        }),
        Mutation::TopicAttributesSet {
            account,
            topic_id,
            name,
            settings,
            modified_at_ms,
        } => frame(out, RecordType::TopicAttributesSet, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_str(o, "topic name", name)?;
            put_topic_settings(o, settings);
            put_u64(o, *modified_at_ms);
            Ok(())
        }),
        Mutation::TopicDeleted {
            account,
            topic_id,
            name,
            at_ms,
        } => frame(out, RecordType::TopicDeleted, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_str(o, "topic name", name)?;
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::SubscriptionCreated {
            account,
            topic_id,
            topic,
            subscription_id,
            name,
            settings,
            created_at_ms,
        } => frame(out, RecordType::SubscriptionCreated, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_str(o, "topic name", topic)?;
            put_u64(o, *subscription_id);
            put_str(o, "subscription name", name)?;
            put_subscription_settings(o, settings)?;
            put_u64(o, *created_at_ms);
            Ok(())
        }),
        Mutation::SubscriptionAttributesSet {
            account,
            topic_id,
            subscription_id,
            name,
            settings,
            modified_at_ms,
        } => frame(out, RecordType::SubscriptionAttributesSet, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_u64(o, *subscription_id);
            put_str(o, "subscription name", name)?;
            put_subscription_settings(o, settings)?;
            put_u64(o, *modified_at_ms);
            Ok(())
        }),
        Mutation::SubscriptionDeleted {
            account,
            topic_id,
            subscription_id,
            name,
            at_ms,
        } => frame(out, RecordType::SubscriptionDeleted, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_u64(o, *subscription_id);
            put_str(o, "subscription name", name)?;
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::TopicMessageRetained {
            account,
            topic_id,
            topic,
            msg_id,
            body,
            msg_tags,
            publish_time_ms,
            expires_at_ms,
            subscription_ids,
        } => frame(out, RecordType::TopicMessageRetained, |o| {
            retained_fields(
                o,
                account,
                *topic_id,
                topic,
                *msg_id,
                *publish_time_ms,
                *expires_at_ms,
                msg_tags,
                subscription_ids,
            )?;
            put_bytes(o, "message body", body)
        }),
        Mutation::PushFinished {
            account,
            topic_id,
            subscription_id,
            msg_id,
            outcome,
            at_ms,
        } => frame(out, RecordType::PushFinished, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_u64(o, *subscription_id);
            put_u64(o, *msg_id);
            put_u8(o, outcome_code(*outcome));
            put_u64(o, *at_ms);
            Ok(())
        }),
        Mutation::MessagesReceived {
            account,
            queue_id,
            queue,
            at_ms,
            invisible_until_ms,
            messages,
        } => frame(out, RecordType::MessagesReceived, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *queue_id);
            put_str(o, "queue name", queue)?;
            put_u64(o, *at_ms);
            put_u64(o, *invisible_until_ms);
            let count = u16::try_from(messages.len()).map_err(|_| EncodeError::TooLong {
                what: "received message list",
                len: messages.len(),
            })?;
            o.extend_from_slice(&count.to_le_bytes());
            for d in messages {
                put_u64(o, d.msg_id);
                put_u32(o, d.dequeue_count);
                put_u64(o, d.first_dequeue_ms);
            }
            Ok(())
        }),
        Mutation::PublishedNowhere {
            account,
            topic_id,
            topic,
            first_msg_id,
            count,
            at_ms,
        } => frame(out, RecordType::PublishedNowhere, |o| {
            put_str(o, "account", account)?;
            put_u64(o, *topic_id);
            put_str(o, "topic name", topic)?;
            put_u64(o, *first_msg_id);
            put_u32(o, *count);
            put_u64(o, *at_ms);
            Ok(())
        }),
    }
}

/// Appends a checkpoint record: queues, then the topic section.
///
/// # Errors
///
/// [`EncodeError::TooLong`] (more queues, topics or subscriptions than a record holds).
pub fn encode_checkpoint(cp: &Checkpoint, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let count = |what: &'static str, len: usize| {
        u32::try_from(len).map_err(|_| EncodeError::TooLong { what, len })
    };
    frame(out, RecordType::Checkpoint, |o| {
        put_u64(o, cp.next_queue_id);
        put_u64(o, cp.next_msg_id);
        put_u32(o, count("queue list", cp.queues.len())?);
        for q in &cp.queues {
            put_queue_image(o, q)?;
        }
        put_u64(o, cp.next_topic_id);
        put_u64(o, cp.next_subscription_id);
        put_u32(o, count("topic list", cp.topics.len())?);
        for t in &cp.topics {
            put_topic_image(o, t)?;
        }
        put_u32(o, count("subscription list", cp.subscriptions.len())?);
        for s in &cp.subscriptions {
            put_subscription_image(o, s)?;
        }
        Ok(())
    })
}

/// Appends a batch marker.
pub fn encode_batch(seq: u64, out: &mut Vec<u8>) {
    // Eight bytes of payload cannot be too long.
    let _ = frame(out, RecordType::Batch, |o| {
        put_u64(o, seq);
        Ok(())
    });
}

/// Appends a message image (compaction's copy of a stored message).
///
/// # Errors
///
/// [`EncodeError::TooLong`].
pub fn encode_message_image(m: &MessageImage, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    frame(out, RecordType::MessageImage, |o| {
        put_u64(o, m.queue_id);
        put_u64(o, m.msg_id);
        put_u64(o, m.enqueue_time_ms);
        put_u64(o, m.visible_at_ms);
        let received = m.dequeue_count > 0;
        let flags = u8::from(m.in_rewind_area)
            | (u8::from(m.dead_letter.is_some()) << 1)
            | (u8::from(received) << 2);
        put_u8(o, flags);
        if let Some(info) = &m.dead_letter {
            put_str(o, "queue name", &info.source_queue)?;
            put_u8(o, info.reason as u8);
            put_u32(o, info.receive_count);
            put_u64(o, info.dead_lettered_at_ms);
        }
        if received {
            put_u32(o, m.dequeue_count);
            put_u64(o, m.first_dequeue_ms);
            put_u64(o, m.invisible_until_ms);
        }
        put_bytes(o, "message body", &m.body)
    })
}

/// Appends a retained-message image (compaction's copy of a topic message waiting for HTTP
/// deliveries).
///
/// # Errors
///
/// [`EncodeError::TooLong`].
pub fn encode_retained_image(r: &RetainedImage, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    frame(out, RecordType::RetainedImage, |o| {
        put_u64(o, r.topic_id);
        put_u64(o, r.msg_id);
        put_u64(o, r.publish_time_ms);
        put_u64(o, r.expires_at_ms);
        put_list(o, "msgTag", &r.msg_tags)?;
        put_ids(o, "subscription list", &r.subscription_ids)?;
        put_bytes(o, "message body", &r.body)
    })
}
