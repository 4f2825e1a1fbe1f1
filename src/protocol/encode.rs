//! Values to bytes: whole frames, length prefix included, in the layouts of `spec/commands.md`.
//!
//! The encoder holds itself to the limits the parser enforces, so that it never writes a frame
//! its peer must reject: a string over `STRING_BYTES_MAX`, a batch over `BATCH_COUNT_MAX`, or a
//! reply that does not answer its opcode is an [`EncodeError`], and nothing is left in the
//! buffer. Texts meant for people (error messages) are cut at a character boundary instead, since
//! a shortened message is better than none.

use bytes::{BufMut, Bytes, BytesMut};

use super::layout::{tag, ReplyKind, OPTION_NONE, OPTION_SOME};
use super::{Opcode, Push, Reply, Request, Response, FLAG_PUSH, FLAG_RESPONSE, PROTOCOL_VERSION};
use crate::error::ErrorCode;
use crate::limits::{
    BATCH_COUNT_MAX, DELIVERY_MESSAGES_MAX, FRAME_HEADER_BYTES, LIST_LIMIT_MAX, PEEK_COUNT_MAX,
    STRING_BYTES_MAX, TAG_LIST_WIRE_MAX,
};
use crate::model::{
    DeadLetterInfo, DeadLetterPolicy, PeekedMessage, QueueAttributeSet, QueueAttributes,
    ReceivedMessage, SubscriptionAttributes, SubscriptionSpec, TopicAttributeSet, TopicAttributes,
};

// Every bounded count and length must fit the wire field that carries it.
const _: () = assert!(STRING_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(BATCH_COUNT_MAX <= u16::MAX as usize);
const _: () = assert!(PEEK_COUNT_MAX <= u16::MAX as usize);
const _: () = assert!(LIST_LIMIT_MAX <= u16::MAX as u32);
const _: () = assert!(TAG_LIST_WIRE_MAX <= u16::MAX as usize);
const _: () = assert!(DELIVERY_MESSAGES_MAX <= u16::MAX as usize);
const _: () = assert!(FRAME_HEADER_BYTES == 8);

/// Bytes of the length prefix in front of every frame.
const LENGTH_PREFIX_BYTES: usize = 4;

/// Why a value cannot be put on the wire. Always a bug or a limit in the caller, never input
/// from the peer; the destination buffer is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string field is longer than the protocol allows.
    #[error("{field} is {length} bytes, more than the {max} a string may have")]
    StringTooLong {
        /// Which field.
        field: &'static str,
        /// Its length in bytes.
        length: usize,
        /// The limit.
        max: usize,
    },
    /// A list has more entries than the protocol allows.
    #[error("{field} has {count} entries, more than the {max} allowed")]
    TooMany {
        /// Which field.
        field: &'static str,
        /// Entries given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A list that must not be empty is (BatchReceived: an empty receive is error 7000).
    #[error("{field} must not be empty")]
    Empty {
        /// Which field.
        field: &'static str,
    },
    /// A message body longer than a u32 length can describe.
    #[error("message body of {length} bytes does not fit a u32 length")]
    BodyTooLong {
        /// Its length in bytes.
        length: usize,
    },
    /// The whole frame is longer than the limit (the peer's maximum, or the u32 length field).
    #[error("frame of {length} bytes exceeds the limit of {max} bytes")]
    FrameTooLong {
        /// Header plus body, in bytes.
        length: usize,
        /// The limit it exceeds.
        max: usize,
    },
    /// A success reply whose variant does not answer the opcode (or the opcode is unknown).
    #[error("reply {reply} does not answer opcode {opcode:#06x}")]
    ReplyMismatch {
        /// The opcode of the frame.
        opcode: u16,
        /// The reply variant given.
        reply: &'static str,
    },
    /// An error response whose public code is 0, which the peer would read as success.
    #[error("error response with code 0 (module {module})")]
    ZeroErrorCode {
        /// The module code given.
        module: u16,
    },
}

/// Appends a request frame (length prefix, header with flags 0 and this build's version, body)
/// to `dst`.
///
/// # Errors
///
/// [`EncodeError`] when a field exceeds the protocol's limits (a string over `STRING_BYTES_MAX`
/// bytes, more than `BATCH_COUNT_MAX` bodies or handles ...); `dst` is then left unchanged.
pub fn encode_request(
    request_id: u32,
    request: &Request,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    dst.reserve(request_size_hint(request));
    let opcode = request.opcode() as u16;
    frame(dst, 0, opcode, request_id, |dst| request_body(request, dst))
}

/// Appends a reply frame (length prefix, header with [`FLAG_RESPONSE`], status, payload) to
/// `dst`. Never fails: a peer waiting on `request_id` must get an answer.
///
/// `opcode` is the request's opcode as received, which need not be one this build knows (an
/// error reply to an unknown opcode echoes it). If the response cannot be encoded (see
/// [`try_encode_response`]), an error reply 6000/10050 (`ErrorCode::INTERNAL`) saying why is
/// written in its place, so the bug shows at the client instead of hanging it.
pub fn encode_response(request_id: u32, opcode: u16, response: &Response, dst: &mut BytesMut) {
    if let Err(err) = try_encode_response(request_id, opcode, response, dst) {
        encode_internal_error(request_id, opcode, &err, dst);
    }
}

/// Like [`encode_response`], but reports a response that cannot be encoded instead of replacing
/// it.
///
/// # Errors
///
/// [`EncodeError::ReplyMismatch`] when a success reply is not the variant the opcode fixes
/// (`spec/commands.md`), [`EncodeError::ZeroErrorCode`] for an error response with code 0, and
/// the limit errors of [`encode_request`]; `dst` is then left unchanged.
pub fn try_encode_response(
    request_id: u32,
    opcode: u16,
    response: &Response,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    dst.reserve(response_size_hint(response));
    frame(
        dst,
        FLAG_RESPONSE,
        opcode,
        request_id,
        |dst| match response {
            Response::Ok(reply) => {
                let kind = ReplyKind::of(reply);
                if Opcode::from_u16(opcode).map(ReplyKind::for_opcode) != Some(kind) {
                    return Err(EncodeError::ReplyMismatch {
                        opcode,
                        reply: kind.name(),
                    });
                }
                dst.put_u16(ErrorCode::OK.code);
                dst.put_u16(ErrorCode::OK.module);
                reply_payload(reply, dst)
            }
            Response::Error {
                code,
                message,
                failures,
            } => {
                if code.code == 0 {
                    return Err(EncodeError::ZeroErrorCode {
                        module: code.module,
                    });
                }
                dst.put_u16(code.code);
                dst.put_u16(code.module);
                put_text(dst, message);
                put_list(
                    dst,
                    "failures",
                    failures,
                    BATCH_COUNT_MAX,
                    |failure, dst| {
                        put_string(dst, "receipt_handle", &failure.receipt_handle)?;
                        dst.put_u16(failure.code.code);
                        dst.put_u16(failure.code.module);
                        put_text(dst, &failure.message);
                        Ok(())
                    },
                )
            }
        },
    )
}

/// Appends a push frame (length prefix, header with [`FLAG_PUSH`] and `consumer_id` in the
/// request-id field, body) to `dst`.
///
/// # Errors
///
/// [`EncodeError`] for an empty Delivery or one over
/// [`DELIVERY_MESSAGES_MAX`] messages, an end with code 0, or a field over its limit; `dst` is
/// then left unchanged.
pub fn encode_push(consumer_id: u32, push: &Push, dst: &mut BytesMut) -> Result<(), EncodeError> {
    if let Push::Delivery(messages) = push {
        const PER_MESSAGE: usize = 128;
        dst.reserve(
            64 + messages
                .iter()
                .map(|m| PER_MESSAGE + m.receipt_handle.len() + m.body.len())
                .sum::<usize>(),
        );
    }
    let opcode = push.opcode() as u16;
    frame(dst, FLAG_PUSH, opcode, consumer_id, |dst| match push {
        Push::Delivery(messages) => {
            if messages.is_empty() {
                return Err(EncodeError::Empty { field: "Delivery" });
            }
            put_list(
                dst,
                "Delivery",
                messages,
                DELIVERY_MESSAGES_MAX,
                put_received_message,
            )
        }
        Push::ConsumerEnded { code, message } => {
            if code.code == 0 {
                return Err(EncodeError::ZeroErrorCode {
                    module: code.module,
                });
            }
            dst.put_u16(code.code);
            dst.put_u16(code.module);
            put_text(dst, message);
            Ok(())
        }
    })
}

/// A Delivery frame ([`encode_push`] of [`Push::Delivery`]) as pieces to be written back to
/// back, without copying bodies of `inline_below` bytes or more: each of those is a piece of
/// its own (a clone of the message's `Bytes`), between pieces holding everything else. The
/// pieces joined are exactly the bytes `encode_push` writes.
///
/// # Errors
///
/// As [`encode_push`] for a Delivery.
pub fn encode_delivery_pieces(
    consumer_id: u32,
    messages: &[ReceivedMessage],
    inline_below: usize,
) -> Result<Vec<Bytes>, EncodeError> {
    if messages.is_empty() {
        return Err(EncodeError::Empty { field: "Delivery" });
    }
    const PER_MESSAGE: usize = 128;
    let inline: usize = messages
        .iter()
        .map(|m| PER_MESSAGE + m.receipt_handle.len())
        .chain(
            messages
                .iter()
                .filter(|m| m.body.len() < inline_below)
                .map(|m| m.body.len()),
        )
        .sum();
    let mut dst = BytesMut::with_capacity(64 + inline);
    // Bodies left out: where each goes in `dst`, and the body.
    let mut holes: Vec<(usize, Bytes)> = Vec::new();
    dst.put_u32(0); // patched below
    dst.put_u8(PROTOCOL_VERSION);
    dst.put_u8(FLAG_PUSH);
    dst.put_u16(Push::Delivery(Vec::new()).opcode() as u16);
    dst.put_u32(consumer_id);
    let mut body = |dst: &mut BytesMut, value: &Bytes| {
        if value.len() < inline_below {
            return put_bytes(dst, value);
        }
        let Ok(length) = u32::try_from(value.len()) else {
            return Err(EncodeError::BodyTooLong {
                length: value.len(),
            });
        };
        dst.put_u32(length);
        holes.push((dst.len(), value.clone()));
        Ok(())
    };
    put_list(
        &mut dst,
        "Delivery",
        messages,
        DELIVERY_MESSAGES_MAX,
        |m, dst| put_received_message_with(m, dst, &mut body),
    )?;
    let length =
        dst.len() - LENGTH_PREFIX_BYTES + holes.iter().map(|(_, b)| b.len()).sum::<usize>();
    let Ok(length_field) = u32::try_from(length) else {
        return Err(EncodeError::FrameTooLong {
            length,
            max: u32::MAX as usize,
        });
    };
    if let Some(prefix) = dst.get_mut(..LENGTH_PREFIX_BYTES) {
        prefix.copy_from_slice(&length_field.to_be_bytes());
    }
    let mut rest = dst.freeze();
    let mut pieces = Vec::with_capacity(2 * holes.len() + 1);
    let mut taken = 0;
    for (at, body) in holes {
        let before = rest.split_to(at - taken);
        taken = at;
        // Never an empty piece: a writer may take an empty slice for the end of its data.
        for piece in [before, body] {
            if !piece.is_empty() {
                pieces.push(piece);
            }
        }
    }
    if !rest.is_empty() {
        pieces.push(rest);
    }
    Ok(pieces)
}

/// Appends an INTERNAL (6000/10050) error reply whose message names `cause`. Cannot fail: the
/// message is cut to fit and there is nothing else variable in it.
pub(crate) fn encode_internal_error(
    request_id: u32,
    opcode: u16,
    cause: &dyn std::fmt::Display,
    dst: &mut BytesMut,
) {
    let message = format!("cmqd could not encode its reply: {cause}");
    let written = frame(dst, FLAG_RESPONSE, opcode, request_id, |dst| {
        dst.put_u16(ErrorCode::INTERNAL.code);
        dst.put_u16(ErrorCode::INTERNAL.module);
        put_text(dst, &message);
        dst.put_u16(0); // no failures
        Ok(())
    });
    // Only a frame over 4 GiB fails, and this one is under 1.1 KiB.
    debug_assert!(written.is_ok());
}

/// Writes the length prefix and header, then the body, then patches the length in. On error
/// the buffer is cut back to where it was, so a failed encode leaves no half frame behind.
fn frame(
    dst: &mut BytesMut,
    flags: u8,
    opcode: u16,
    request_id: u32,
    body: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = dst.len();
    dst.put_u32(0); // patched below, once the body's size is known
    dst.put_u8(PROTOCOL_VERSION);
    dst.put_u8(flags);
    dst.put_u16(opcode);
    dst.put_u32(request_id);
    if let Err(err) = body(dst) {
        dst.truncate(start);
        return Err(err);
    }
    let length = dst.len() - start - LENGTH_PREFIX_BYTES;
    let Ok(length_field) = u32::try_from(length) else {
        dst.truncate(start);
        return Err(EncodeError::FrameTooLong {
            length,
            max: u32::MAX as usize,
        });
    };
    if let Some(prefix) = dst.get_mut(start..start + LENGTH_PREFIX_BYTES) {
        prefix.copy_from_slice(&length_field.to_be_bytes());
    }
    Ok(())
}

/// Room for the fixed fields plus every message body, so a frame is written with at most one
/// allocation. Only a hint: under-estimates just grow the buffer.
fn request_size_hint(request: &Request) -> usize {
    const FIXED: usize = 128;
    match request {
        Request::SendMessage { body, .. } | Request::PublishMessage { body, .. } => {
            FIXED + body.len()
        }
        Request::BatchSendMessage { bodies, .. } | Request::BatchPublishMessage { bodies, .. } => {
            FIXED + bodies.iter().map(|body| 4 + body.len()).sum::<usize>()
        }
        _ => FIXED,
    }
}

/// See [`request_size_hint`].
fn response_size_hint(response: &Response) -> usize {
    const FIXED: usize = 128;
    const PER_MESSAGE: usize = 128;
    match response {
        Response::Ok(Reply::Received(message)) => {
            FIXED + message.receipt_handle.len() + message.body.len()
        }
        Response::Ok(Reply::BatchReceived(messages)) => {
            FIXED
                + messages
                    .iter()
                    .map(|m| PER_MESSAGE + m.receipt_handle.len() + m.body.len())
                    .sum::<usize>()
        }
        Response::Ok(Reply::Peeked(messages)) => {
            FIXED
                + messages
                    .iter()
                    .map(|m| PER_MESSAGE + m.body.len())
                    .sum::<usize>()
        }
        _ => FIXED,
    }
}

// ---------------------------------------------------------------------------------------------
// Primitives (`spec/README.md`, "Primitive types").

/// `string`: u16 byte length then UTF-8; over `STRING_BYTES_MAX` is an error.
fn put_string(dst: &mut BytesMut, field: &'static str, value: &str) -> Result<(), EncodeError> {
    let too_long = EncodeError::StringTooLong {
        field,
        length: value.len(),
        max: STRING_BYTES_MAX,
    };
    if value.len() > STRING_BYTES_MAX {
        return Err(too_long);
    }
    let Ok(length) = u16::try_from(value.len()) else {
        return Err(too_long);
    };
    dst.put_u16(length);
    dst.put_slice(value.as_bytes());
    Ok(())
}

/// A `string` for people: cut at the last character boundary within `STRING_BYTES_MAX`.
fn put_text(dst: &mut BytesMut, value: &str) {
    let mut end = value.len().min(STRING_BYTES_MAX);
    while !value.is_char_boundary(end) {
        // Terminates: offset 0 is always a boundary.
        end -= 1;
    }
    let text = value.get(..end).unwrap_or_default();
    // `end` <= STRING_BYTES_MAX <= u16::MAX (asserted above), so the conversion cannot fail.
    dst.put_u16(u16::try_from(text.len()).unwrap_or(0));
    dst.put_slice(text.as_bytes());
}

/// `bytes`: u32 length then the raw bytes.
fn put_bytes(dst: &mut BytesMut, value: &Bytes) -> Result<(), EncodeError> {
    let Ok(length) = u32::try_from(value.len()) else {
        return Err(EncodeError::BodyTooLong {
            length: value.len(),
        });
    };
    dst.put_u32(length);
    dst.put_slice(value);
    Ok(())
}

/// `list<T>`: u16 count then the items; more than `max` is an error.
fn put_list<T>(
    dst: &mut BytesMut,
    field: &'static str,
    items: &[T],
    max: usize,
    mut item: impl FnMut(&T, &mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let too_many = EncodeError::TooMany {
        field,
        count: items.len(),
        max,
    };
    if items.len() > max {
        return Err(too_many);
    }
    let Ok(count) = u16::try_from(items.len()) else {
        return Err(too_many);
    };
    dst.put_u16(count);
    items.iter().try_for_each(|value| item(value, dst))
}

/// `option<T>`: u8 0, or u8 1 then `T`.
fn put_option<T>(
    dst: &mut BytesMut,
    value: Option<&T>,
    some: impl FnOnce(&T, &mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    match value {
        None => {
            dst.put_u8(OPTION_NONE);
            Ok(())
        }
        Some(value) => {
            dst.put_u8(OPTION_SOME);
            some(value, dst)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Requests.

fn request_body(request: &Request, dst: &mut BytesMut) -> Result<(), EncodeError> {
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
        Request::Ping => Ok(()),
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
fn put_tag_list(
    dst: &mut BytesMut,
    field: &'static str,
    tags: &[String],
) -> Result<(), EncodeError> {
    put_list(dst, field, tags, TAG_LIST_WIRE_MAX, |tag, dst| {
        put_string(dst, field, tag)
    })
}

/// `topic_attribute_set`: option<u32> maxMsgSize, option<u8> filterType.
fn put_topic_attribute_set(dst: &mut BytesMut, set: &TopicAttributeSet) -> Result<(), EncodeError> {
    put_option(dst, set.max_msg_size_bytes.as_ref(), |size, dst| {
        dst.put_u32(*size);
        Ok(())
    })?;
    put_option(dst, set.filter_type.as_ref(), |filter_type, dst| {
        dst.put_u8(*filter_type);
        Ok(())
    })
}

fn put_subscription_spec(dst: &mut BytesMut, spec: &SubscriptionSpec) -> Result<(), EncodeError> {
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
fn put_attribute_set(dst: &mut BytesMut, set: &QueueAttributeSet) -> Result<(), EncodeError> {
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

fn put_dead_letter_policy(
    policy: &DeadLetterPolicy,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    put_string(dst, "dead_letter_queue", &policy.dead_letter_queue)?;
    dst.put_u8(policy.policy);
    dst.put_u32(policy.max_receive_count);
    dst.put_u32(policy.max_time_to_live_seconds);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Replies.

fn reply_payload(reply: &Reply, dst: &mut BytesMut) -> Result<(), EncodeError> {
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
    }
}

fn put_topic_attributes(a: &TopicAttributes, dst: &mut BytesMut) -> Result<(), EncodeError> {
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

fn put_subscription_attributes(
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

fn put_queue_attributes(a: &QueueAttributes, dst: &mut BytesMut) -> Result<(), EncodeError> {
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

fn put_received_message(m: &ReceivedMessage, dst: &mut BytesMut) -> Result<(), EncodeError> {
    put_received_message_with(m, dst, &mut put_bytes)
}

/// [`put_received_message`] with the body written by `body` (which must write the `bytes`
/// layout: u32 length, then the bytes, or leave the bytes to be sent separately).
fn put_received_message_with(
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

fn put_peeked_message(m: &PeekedMessage, dst: &mut BytesMut) -> Result<(), EncodeError> {
    dst.put_u64(m.msg_id);
    put_bytes(dst, &m.body)?;
    dst.put_u64(m.enqueue_time_ms);
    dst.put_u32(m.dequeue_count);
    dst.put_u8(m.state as u8);
    dst.put_u64(m.visible_time_ms);
    put_option(dst, m.dead_letter.as_ref(), put_dead_letter_info)
}

fn put_dead_letter_info(info: &DeadLetterInfo, dst: &mut BytesMut) -> Result<(), EncodeError> {
    put_string(dst, "source_queue", &info.source_queue)?;
    dst.put_u8(info.reason as u8);
    dst.put_u32(info.receive_count);
    dst.put_u64(info.dead_lettered_at_ms);
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio_util::codec::Decoder;

    use proptest::prelude::*;

    use super::*;
    use crate::model::BatchDeleteFailure;
    use crate::protocol::{parse_response, FrameCodec};

    fn response_of(opcode: u16, response: &Response) -> Response {
        let mut buf = BytesMut::new();
        encode_response(1, opcode, response, &mut buf);
        let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        parse_response(&frame).unwrap()
    }

    #[test]
    fn ping_frame_bytes() {
        let mut buf = BytesMut::new();
        encode_request(1, &Request::Ping, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0, 0, 0, 8, 1, 0, 0, 3, 0, 0, 0, 1]);
        buf.clear();
        encode_response(
            1,
            Opcode::Ping as u16,
            &Response::Ok(Reply::Empty),
            &mut buf,
        );
        assert_eq!(&buf[..], &[0, 0, 0, 12, 1, 1, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn reply_that_does_not_answer_the_opcode_is_refused() {
        let mut buf = BytesMut::from(&b"prefix"[..]);
        let wrong = Response::Ok(Reply::Count { count: 1 });
        let err = try_encode_response(1, Opcode::SendMessage as u16, &wrong, &mut buf);
        assert_eq!(
            err,
            Err(EncodeError::ReplyMismatch {
                opcode: Opcode::SendMessage as u16,
                reply: "Count",
            })
        );
        assert_eq!(&buf[..], b"prefix", "nothing written");

        let Response::Error { code, message, .. } = response_of(Opcode::SendMessage as u16, &wrong)
        else {
            panic!("expected an error reply");
        };
        assert_eq!(code, ErrorCode::INTERNAL);
        assert!(
            message.contains("reply Count does not answer opcode 0x0110"),
            "{message}"
        );

        // A success reply to an opcode this build does not know cannot be right either.
        let unknown = response_of(0x7fff, &Response::Ok(Reply::Empty));
        assert!(matches!(
            unknown,
            Response::Error {
                code: ErrorCode::INTERNAL,
                ..
            }
        ));
    }

    #[test]
    fn error_with_code_zero_is_refused() {
        let zero = Response::error(ErrorCode { code: 0, module: 5 }, "no");
        let mut buf = BytesMut::new();
        assert_eq!(
            try_encode_response(1, Opcode::Ping as u16, &zero, &mut buf),
            Err(EncodeError::ZeroErrorCode { module: 5 })
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn strings_over_the_limit_are_refused_and_nothing_is_written() {
        let request = Request::DeleteMessage {
            queue: "q".into(),
            receipt_handle: "h".repeat(STRING_BYTES_MAX + 1),
        };
        let mut buf = BytesMut::from(&b"prefix"[..]);
        assert_eq!(
            encode_request(1, &request, &mut buf),
            Err(EncodeError::StringTooLong {
                field: "receipt_handle",
                length: STRING_BYTES_MAX + 1,
                max: STRING_BYTES_MAX,
            })
        );
        assert_eq!(&buf[..], b"prefix");

        let batch = Request::BatchSendMessage {
            queue: "q".into(),
            bodies: vec![Bytes::from_static(b"x"); BATCH_COUNT_MAX + 1],
            delay_seconds: 0,
        };
        assert!(matches!(
            encode_request(1, &batch, &mut buf),
            Err(EncodeError::TooMany {
                field: "bodies",
                count: 17,
                max: 16
            })
        ));
        assert_eq!(&buf[..], b"prefix");
    }

    #[test]
    fn messages_for_people_are_cut_at_a_character_boundary() {
        // 'é' is two bytes: 600 of them are 1200 bytes, cut to 512 characters.
        let long = "\u{e9}".repeat(600);
        let response = Response::Error {
            code: ErrorCode::BATCH_DELETE_PARTIAL,
            message: format!("x{long}"),
            failures: vec![BatchDeleteFailure {
                receipt_handle: "h".into(),
                code: ErrorCode::RECEIPT_HANDLE_INVALID,
                message: long.clone(),
            }],
        };
        let Response::Error {
            message, failures, ..
        } = response_of(Opcode::BatchDeleteMessage as u16, &response)
        else {
            panic!("expected an error reply");
        };
        assert_eq!(message, format!("x{}", "\u{e9}".repeat(511)));
        assert_eq!(failures[0].message, "\u{e9}".repeat(512));
    }

    #[test]
    fn empty_batch_receive_is_refused() {
        let mut buf = BytesMut::new();
        assert_eq!(
            try_encode_response(
                1,
                Opcode::BatchReceiveMessage as u16,
                &Response::Ok(Reply::BatchReceived(Vec::new())),
                &mut buf,
            ),
            Err(EncodeError::Empty {
                field: "BatchReceived"
            })
        );
    }

    #[test]
    fn attribute_entries_are_written_in_tag_order() {
        let set = QueueAttributeSet {
            max_msg_heap_num: Some(2),
            rewind_seconds: Some(6),
            polling_wait_seconds: Some(3),
            dead_letter_policy: Some(None),
            ..QueueAttributeSet::default()
        };
        let mut buf = BytesMut::new();
        put_attribute_set(&mut buf, &set).unwrap();
        assert_eq!(
            &buf[..],
            &[4, 1, 0, 0, 0, 0, 0, 0, 0, 2, 2, 0, 0, 0, 3, 6, 0, 0, 0, 6, 7, 0]
        );
    }

    proptest! {
        /// The pieces of a Delivery, joined, are the frame `encode_push` writes, wherever the
        /// bodies are cut out.
        #[test]
        fn delivery_pieces_join_to_the_push_frame(
            push in crate::protocol::testing::push(),
            id in any::<u32>(),
            inline_below in prop_oneof![Just(0usize), Just(1), Just(16), Just(usize::MAX)],
        ) {
            let Push::Delivery(messages) = &push else { return Ok(()); };
            let mut whole = BytesMut::new();
            let expected = encode_push(id, &push, &mut whole);
            match encode_delivery_pieces(id, messages, inline_below) {
                Ok(pieces) => {
                    prop_assert!(expected.is_ok());
                    let joined: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
                    prop_assert_eq!(&joined[..], &whole[..]);
                    prop_assert!(pieces.iter().all(|p| !p.is_empty()));
                }
                Err(error) => prop_assert_eq!(Err::<(), _>(error), expected),
            }
        }
    }
}
