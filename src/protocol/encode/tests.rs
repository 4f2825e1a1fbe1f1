use tokio_util::codec::Decoder;

use proptest::prelude::*;

use super::request::put_attribute_set;
use super::*;
use crate::model::{BatchDeleteFailure, QueueAttributeSet};
use crate::protocol::{parse_response, FrameCodec};

fn response_of(opcode: u16, response: &Response) -> Response {
    let mut buf = BytesMut::new();
    encode_response(1, opcode, response, &mut buf);
    let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    parse_response(&frame).unwrap()
}

#[test]
fn the_request_id_sits_at_its_documented_offset() {
    let mut buf = BytesMut::new();
    encode_request(0x0102_0304, &Request::Ping, &mut buf).unwrap();
    assert_eq!(buf.len(), FRAME_HEAD_BYTES);
    assert_eq!(
        &buf[REQUEST_ID_OFFSET..FRAME_HEAD_BYTES],
        &0x0102_0304u32.to_be_bytes()
    );
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
