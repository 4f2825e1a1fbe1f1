use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

use super::*;
use crate::limits::{BATCH_COUNT_MAX, DELIVERY_MESSAGES_MAX, STRING_BYTES_MAX};
use crate::model::{
    DeadLetterPolicy, MessageState, PeekedMessage, QueueAttributeSet, ReceivedMessage,
};
use crate::protocol::{encode_push, encode_request, encode_response, testing, FrameCodec, Reply};

fn request_frame(request: &Request) -> RawFrame {
    let mut buf = BytesMut::new();
    encode_request(7, request, &mut buf).unwrap();
    FrameCodec::default().decode(&mut buf).unwrap().unwrap()
}

fn response_frame(opcode: Opcode, response: &Response) -> RawFrame {
    let mut buf = BytesMut::new();
    encode_response(7, opcode as u16, response, &mut buf);
    FrameCodec::default().decode(&mut buf).unwrap().unwrap()
}

fn push_frame(push: &Push) -> RawFrame {
    let mut buf = BytesMut::new();
    encode_push(7, push, &mut buf).unwrap();
    FrameCodec::default().decode(&mut buf).unwrap().unwrap()
}

fn raw(flags: u8, opcode: u16, body: &[u8]) -> RawFrame {
    RawFrame {
        version: PROTOCOL_VERSION,
        flags,
        opcode,
        request_id: 1,
        body: Bytes::copy_from_slice(body),
    }
}

fn with_body(frame: &RawFrame, body: &[u8]) -> RawFrame {
    RawFrame {
        body: Bytes::copy_from_slice(body),
        ..frame.clone()
    }
}

/// An opcode this version knows most of the time, otherwise any value.
fn any_opcode() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => testing::opcode().prop_map(|op| op as u16),
        1 => proptest::sample::select(PushOpcode::ALL).prop_map(|op| op as u16),
        1 => any::<u16>(),
    ]
}

proptest! {
    /// Any body under any opcode, version and flags parses to a value or an error.
    #[test]
    fn any_bytes_never_panic(
        version in prop_oneof![Just(PROTOCOL_VERSION), any::<u8>()],
        flags in prop_oneof![Just(0u8), Just(FLAG_RESPONSE), Just(FLAG_PUSH), any::<u8>()],
        opcode in any_opcode(),
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let frame = RawFrame { version, flags, opcode, request_id: 0, body: Bytes::from(body) };
        let _ = parse_request(&frame);
        let _ = parse_response(&frame);
        let _ = parse_push(&frame);
        let _ = parse_request(&RawFrame { flags: 0, ..frame.clone() });
        let _ = parse_push(&RawFrame { flags: FLAG_PUSH, ..frame.clone() });
        let _ = parse_response(&RawFrame { flags: FLAG_RESPONSE, ..frame });
    }

    /// Valid bodies with one byte changed or cut short reach deep into the parsers, where
    /// random bytes rarely go: still a value or an error.
    #[test]
    fn mutated_valid_bodies_never_panic(
        request in testing::request(),
        (opcode, response) in testing::opcode_and_response(),
        push in testing::push(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        for frame in [request_frame(&request), response_frame(opcode, &response), push_frame(&push)] {
            let mut body = frame.body.to_vec();
            if !body.is_empty() {
                let i = at.index(body.len());
                body[i] = byte;
            }
            let mutated = with_body(&frame, &body);
            let _ = parse_request(&mutated);
            let _ = parse_response(&mutated);
            let _ = parse_push(&mutated);
            let cut = with_body(&frame, &frame.body[..cut.index(frame.body.len() + 1)]);
            let _ = parse_request(&cut);
            let _ = parse_response(&cut);
            let _ = parse_push(&cut);
        }
    }

    /// Every proper prefix of a valid body, and the body plus one byte, fail to parse
    /// (the iggy truncation loop), for any request and response.
    #[test]
    fn truncated_or_extended_bodies_fail(
        request in testing::request(),
        (opcode, response) in testing::opcode_and_response(),
        push in testing::push(),
    ) {
        let frame = request_frame(&request);
        for end in 0..frame.body.len() {
            prop_assert!(parse_request(&with_body(&frame, &frame.body[..end])).is_err());
        }
        let mut longer = frame.body.to_vec();
        longer.push(0);
        prop_assert!(parse_request(&with_body(&frame, &longer)).is_err());

        let frame = response_frame(opcode, &response);
        for end in 0..frame.body.len() {
            prop_assert!(parse_response(&with_body(&frame, &frame.body[..end])).is_err());
        }
        let mut longer = frame.body.to_vec();
        longer.push(0);
        prop_assert!(parse_response(&with_body(&frame, &longer)).is_err());

        let frame = push_frame(&push);
        prop_assert_eq!(parse_push(&frame), Ok(push));
        for end in 0..frame.body.len() {
            prop_assert!(parse_push(&with_body(&frame, &frame.body[..end])).is_err());
        }
        let mut longer = frame.body.to_vec();
        longer.push(0);
        prop_assert!(parse_push(&with_body(&frame, &longer)).is_err());
    }
}

/// The representative cases named explicitly, with the error a truncation gives.
#[test]
fn truncation_of_representative_requests() {
    let requests = [
        Request::SendMessage {
            queue: "orders".into(),
            body: Bytes::from_static(b"hello"),
            delay_seconds: 5,
        },
        Request::CreateQueue {
            queue: "orders".into(),
            attributes: QueueAttributeSet {
                max_msg_heap_num: Some(1_000_000),
                visibility_timeout_seconds: Some(60),
                dead_letter_policy: Some(Some(DeadLetterPolicy {
                    dead_letter_queue: "orders-dead".into(),
                    policy: 0,
                    max_receive_count: 5,
                    max_time_to_live_seconds: 0,
                })),
                ..QueueAttributeSet::default()
            },
        },
        Request::BatchDeleteMessage {
            queue: "orders".into(),
            receipt_handles: vec!["a".into(), "bc".into()],
        },
        Request::ReceiveMessage {
            queue: "orders".into(),
            polling_wait_seconds: Some(30),
        },
    ];
    for request in &requests {
        let frame = request_frame(request);
        assert_eq!(parse_request(&frame).as_ref(), Ok(request));
        for end in 0..frame.body.len() {
            let err = parse_request(&with_body(&frame, &frame.body[..end])).unwrap_err();
            let DecodeError::Malformed { offset, reason, .. } = &err else {
                panic!("{err:?}");
            };
            assert!(
                *offset <= end,
                "offset {offset} past the end {end}: {reason}"
            );
            assert_eq!(err.error_code(), ErrorCode::MALFORMED_REQUEST);
        }
        let mut longer = frame.body.to_vec();
        longer.push(0);
        let err = parse_request(&with_body(&frame, &longer)).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Malformed {
                opcode: frame.opcode,
                offset: frame.body.len(),
                reason: "1 byte after the last field".into(),
            }
        );
    }
}

fn queue_body(queue: &str) -> BytesMut {
    let mut body = BytesMut::new();
    body.put_u16(queue.len() as u16);
    body.put_slice(queue.as_bytes());
    body
}

fn attribute_error(entries: &[u8]) -> DecodeError {
    let mut body = queue_body("q");
    body.put_slice(entries);
    parse_request(&raw(0, Opcode::SetQueueAttributes as u16, &body)).unwrap_err()
}

#[test]
fn attribute_tags_must_be_known_unique_and_increasing() {
    let reason = |err: DecodeError| match err {
        DecodeError::Malformed { offset, reason, .. } => (offset, reason),
        other => panic!("{other:?}"),
    };
    // Body: 00 01 'q' | count | entries; the first entry starts at offset 4.
    assert_eq!(
        reason(attribute_error(&[1, 8, 0, 0, 0, 0])),
        (4, "unknown queue attribute tag 8".into())
    );
    assert_eq!(
        reason(attribute_error(&[1, 0])),
        (4, "unknown queue attribute tag 0".into())
    );
    assert_eq!(
        reason(attribute_error(&[2, 3, 0, 0, 0, 1, 3, 0, 0, 0, 2])),
        (9, "queue attribute tag 3 given twice".into())
    );
    assert_eq!(
        reason(attribute_error(&[2, 3, 0, 0, 0, 1, 2, 0, 0, 0, 2])),
        (
            9,
            "queue attribute tag 2 after tag 3: tags must increase".into()
        )
    );
    assert_eq!(
        reason(attribute_error(&[8])),
        (3, "8 queue attributes, at most 7 allowed".into())
    );
    assert_eq!(
        reason(attribute_error(&[1, 7, 2])),
        (5, "option marker 2, expected 0 or 1".into())
    );
    // Removing the dead-letter policy is tag 7 with an absent option.
    let mut body = queue_body("q");
    body.put_slice(&[1, 7, 0]);
    let request = parse_request(&raw(0, Opcode::SetQueueAttributes as u16, &body)).unwrap();
    assert_eq!(
        request,
        Request::SetQueueAttributes {
            queue: "q".into(),
            attributes: QueueAttributeSet {
                dead_letter_policy: Some(None),
                ..QueueAttributeSet::default()
            },
        }
    );
}

#[test]
fn oversized_batch_is_batch_size_before_reading_items() {
    let mut body = queue_body("q");
    body.put_u16(17); // 17 bodies, none of them present
    let err = parse_request(&raw(0, Opcode::BatchSendMessage as u16, &body)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooMany {
            opcode: Opcode::BatchSendMessage as u16,
            offset: 3,
            count: 17,
            max: BATCH_COUNT_MAX,
        }
    );
    assert_eq!(err.error_code(), ErrorCode::BATCH_SIZE);
}

#[test]
fn list_count_beyond_the_remaining_bytes_is_rejected_before_allocating() {
    let mut body = BytesMut::new();
    body.put_u64(3); // total_count
    body.put_u16(1000); // 1000 queue summaries announced, none present
    let err = parse_response(&raw(
        FLAG_RESPONSE,
        Opcode::ListQueue as u16,
        &[&[0, 0, 0, 0][..], &body[..]].concat(),
    ))
    .unwrap_err();
    assert!(
        matches!(&err, DecodeError::Malformed { offset: 14, reason, .. }
            if reason.starts_with("body ends early: 10000 bytes needed")),
        "{err:?}"
    );
}

#[test]
fn strings_are_bounded_and_must_be_utf8() {
    let mut body = BytesMut::new();
    body.put_u16(STRING_BYTES_MAX as u16 + 1);
    body.put_slice(&vec![b'a'; STRING_BYTES_MAX + 1]);
    let err = parse_request(&raw(0, Opcode::DeleteQueue as u16, &body)).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Malformed { offset: 0, reason, .. }
            if reason.contains("string of 1025 bytes")),
        "{err:?}"
    );

    let body = [0, 4, b'a', b'b', 0xff, b'c'];
    let err = parse_request(&raw(0, Opcode::DeleteQueue as u16, &body)).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Malformed { offset: 4, reason, .. }
            if reason == "string is not valid UTF-8"),
        "{err:?}"
    );
}

#[test]
fn header_checks() {
    let ping = raw(0, Opcode::Ping as u16, &[]);
    assert_eq!(parse_request(&ping), Ok(Request::Ping));
    assert_eq!(
        parse_request(&RawFrame {
            flags: 0x02,
            ..ping.clone()
        }),
        Err(DecodeError::BadFlags(0x02))
    );
    assert_eq!(
        parse_request(&RawFrame {
            flags: FLAG_RESPONSE,
            ..ping.clone()
        }),
        Err(DecodeError::BadFlags(FLAG_RESPONSE))
    );
    assert_eq!(parse_response(&ping), Err(DecodeError::BadFlags(0)));
    assert_eq!(
        parse_request(&RawFrame {
            version: 2,
            ..ping.clone()
        }),
        Err(DecodeError::UnsupportedVersion(2))
    );
    let unknown = RawFrame {
        opcode: 0x7fff,
        ..ping
    };
    let err = parse_request(&unknown).unwrap_err();
    assert_eq!(err, DecodeError::UnknownOpcode(0x7fff));
    assert_eq!(err.error_code(), ErrorCode::UNKNOWN_ACTION);
}

#[test]
fn pushes_have_their_own_flag_and_opcodes() {
    let end = Push::ConsumerEnded {
        code: ErrorCode::QUEUE_NOT_FOUND,
        message: "gone".into(),
    };
    let frame = push_frame(&end);
    assert_eq!((frame.flags, frame.request_id), (FLAG_PUSH, 7));
    assert_eq!(parse_push(&frame), Ok(end));
    // A push is neither a request nor a reply, and a reply is not a push.
    assert_eq!(parse_request(&frame), Err(DecodeError::BadFlags(FLAG_PUSH)));
    assert_eq!(
        parse_response(&frame),
        Err(DecodeError::BadFlags(FLAG_PUSH))
    );
    let reply = raw(FLAG_RESPONSE, PushOpcode::Delivery as u16, &[0, 0, 0, 0]);
    assert_eq!(
        parse_push(&reply),
        Err(DecodeError::BadFlags(FLAG_RESPONSE))
    );
    // Request opcodes are not push opcodes, nor the other way round.
    let wrong = raw(FLAG_PUSH, Opcode::Consume as u16, &[]);
    assert_eq!(
        parse_push(&wrong),
        Err(DecodeError::UnknownOpcode(Opcode::Consume as u16))
    );
    let wrong = raw(0, PushOpcode::Delivery as u16, &[0, 0]);
    assert_eq!(
        parse_request(&wrong),
        Err(DecodeError::UnknownOpcode(PushOpcode::Delivery as u16))
    );
    // An end must carry an error; a delivery must carry a message.
    let zero = raw(
        FLAG_PUSH,
        PushOpcode::ConsumerEnded as u16,
        &[0, 0, 0, 0, 0, 0],
    );
    assert!(matches!(
        parse_push(&zero),
        Err(DecodeError::Malformed { offset: 0, .. })
    ));
    let empty = raw(FLAG_PUSH, PushOpcode::Delivery as u16, &[0, 0]);
    assert!(matches!(
        parse_push(&empty),
        Err(DecodeError::Malformed { offset: 0, .. })
    ));
    let too_many = raw(FLAG_PUSH, PushOpcode::Delivery as u16, &[0x01, 0x01]);
    assert!(matches!(
        parse_push(&too_many),
        Err(DecodeError::TooMany {
            count: 257,
            max: DELIVERY_MESSAGES_MAX,
            ..
        })
    ));
}

#[test]
fn a_delivery_of_the_most_messages_round_trips_and_one_more_is_refused() {
    let message = ReceivedMessage {
        msg_id: 1,
        receipt_handle: "0".repeat(32),
        body: Bytes::from_static(b"x"),
        enqueue_time_ms: 2,
        first_dequeue_time_ms: 3,
        next_visible_time_ms: 4,
        dequeue_count: 1,
        dead_letter: None,
    };
    let full = Push::Delivery(vec![message.clone(); DELIVERY_MESSAGES_MAX]);
    assert_eq!(parse_push(&push_frame(&full)), Ok(full));
    let over = Push::Delivery(vec![message; DELIVERY_MESSAGES_MAX + 1]);
    assert!(matches!(
        encode_push(1, &over, &mut BytesMut::new()),
        Err(crate::protocol::EncodeError::TooMany { .. })
    ));
}

#[test]
fn hello_is_read_in_any_version() {
    let body = [1, 3, 0, 2, b'c', b'l'];
    let hello = RawFrame {
        version: 3,
        ..raw(0, Opcode::Hello as u16, &body)
    };
    assert_eq!(
        parse_request(&hello),
        Ok(Request::Hello {
            min_version: 1,
            max_version: 3,
            client_name: "cl".into(),
        })
    );
}

#[test]
fn error_replies_are_read_under_unknown_opcodes_but_success_is_not() {
    let mut buf = BytesMut::new();
    let response = Response::error(ErrorCode::UNKNOWN_ACTION, "unknown opcode");
    encode_response(9, 0x7fff, &response, &mut buf);
    let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
    assert_eq!(parse_response(&frame), Ok(response));

    let success = raw(FLAG_RESPONSE, 0x7fff, &[0, 0, 0, 0]);
    assert_eq!(
        parse_response(&success),
        Err(DecodeError::UnknownOpcode(0x7fff))
    );
}

#[test]
fn success_status_must_be_zero_zero() {
    let frame = raw(FLAG_RESPONSE, Opcode::Ping as u16, &[0, 0, 0, 1]);
    let err = parse_response(&frame).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Malformed { offset: 2, reason, .. }
            if reason.contains("module code 1")),
        "{err:?}"
    );
}

#[test]
fn empty_batch_receive_and_bad_enums_are_malformed() {
    let empty = raw(
        FLAG_RESPONSE,
        Opcode::BatchReceiveMessage as u16,
        &[0, 0, 0, 0, 0, 0],
    );
    assert!(matches!(
        parse_response(&empty),
        Err(DecodeError::Malformed { offset: 4, .. })
    ));

    let peeked = Response::Ok(Reply::Peeked(vec![PeekedMessage {
        msg_id: 1,
        body: Bytes::from_static(b"x"),
        enqueue_time_ms: 2,
        dequeue_count: 3,
        state: MessageState::Delayed,
        visible_time_ms: 4,
        dead_letter: None,
    }]));
    let frame = response_frame(Opcode::PeekMessage, &peeked);
    // status 4, count 2, msg_id 8, body 4+1, enqueue 8, dequeue_count 4: state at 31.
    let mut body = frame.body.to_vec();
    assert_eq!(body[31], MessageState::Delayed as u8);
    body[31] = 3;
    let err = parse_response(&with_body(&frame, &body)).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Malformed { offset: 31, reason, .. }
            if reason == "invalid message state 3"),
        "{err:?}"
    );
}

#[test]
fn message_bodies_share_the_frame_buffer() {
    let received = Response::Ok(Reply::BatchReceived(vec![
        ReceivedMessage {
            msg_id: 1,
            receipt_handle: "h1".into(),
            body: Bytes::from_static(b"first"),
            enqueue_time_ms: 0,
            first_dequeue_time_ms: 0,
            next_visible_time_ms: 0,
            dequeue_count: 1,
            dead_letter: None,
        };
        2
    ]));
    let frame = response_frame(Opcode::BatchReceiveMessage, &received);
    let Ok(Response::Ok(Reply::BatchReceived(messages))) = parse_response(&frame) else {
        panic!("not a batch");
    };
    let range = frame.body.as_ptr_range();
    for message in messages {
        assert!(range.contains(&message.body.as_ptr()), "body was copied");
    }
}

#[test]
fn not_leader_has_its_own_layout_after_the_common_error_payload() {
    let response = Response::NotLeader {
        message: "m".into(),
        leader: "10.0.0.2:7300".into(),
        epoch: 9,
    };
    let frame = response_frame(Opcode::SendMessage, &response);
    assert_eq!(parse_response(&frame).unwrap(), response);
    // code, module, message "m", failures 0, leader, epoch
    let mut body = vec![0x17, 0xd4, 0x2a, 0x30, 0, 1, b'm', 0, 0, 0, 13];
    body.extend_from_slice(b"10.0.0.2:7300");
    body.extend_from_slice(&9u64.to_be_bytes());
    assert_eq!(&frame.body[..], &body[..]);
    // A reader that knows only the common payload finds message and failures where they always
    // are; the NotLeader pair without its two fields is malformed.
    let short = with_body(&frame, &body[..9]);
    assert!(matches!(
        parse_response(&short),
        Err(DecodeError::Malformed { .. })
    ));
    // Its failure list is always empty.
    let mut failures = body[..7].to_vec();
    failures.extend_from_slice(&[0, 1, 0, 0, 0x11, 0x6e, 0x28, 0x14, 0, 0]);
    failures.extend_from_slice(&body[9..]);
    assert!(matches!(
        parse_response(&with_body(&frame, &failures)),
        Err(DecodeError::TooMany { max: 0, .. })
    ));
    // The encoder will not write the pair in the common layout.
    let mut buf = BytesMut::new();
    let wrong = Response::error(ErrorCode::NOT_LEADER, "no");
    assert_eq!(
        crate::protocol::try_encode_response(1, Opcode::Ping as u16, &wrong, &mut buf),
        Err(crate::protocol::EncodeError::NotLeaderAsError)
    );
    assert!(buf.is_empty());
}

#[test]
fn cluster_status_bools_are_zero_or_one() {
    use crate::model::{ClusterStatus, GroupStatus};
    let status = ClusterStatus {
        node_id: 1,
        nodes: Vec::new(),
        groups: vec![GroupStatus {
            voting: true,
            ..GroupStatus::default()
        }],
    };
    let frame = response_frame(
        Opcode::ClusterStatus,
        &Response::Ok(Reply::ClusterStatus(Box::new(status))),
    );
    assert!(parse_response(&frame).is_ok());
    // The voting byte sits before the replication count, the body's last two bytes.
    let mut body = frame.body.to_vec();
    let voting = body.len() - 3;
    assert_eq!(body[voting], 1);
    body[voting] = 2;
    assert!(matches!(
        parse_response(&with_body(&frame, &body)),
        Err(DecodeError::Malformed { reason, .. }) if reason.contains("bool")
    ));
}
