//! The record format: golden bytes for the framing and one record, a round trip for every
//! record type, and invalid input: every truncation and every single-bit flip is an error.

use super::*;

use proptest::prelude::*;

fn settings() -> QueueSettings {
    QueueSettings {
        rewind_seconds: 600,
        dead_letter_policy: Some(DeadLetterPolicy {
            dead_letter_queue: "dlq".into(),
            policy: 0,
            max_receive_count: 3,
            max_time_to_live_seconds: 300,
        }),
        ..QueueSettings::default()
    }
}

fn every_mutation() -> Vec<Mutation> {
    let a: Arc<str> = Arc::from("alice");
    let q: Arc<str> = Arc::from("orders");
    vec![
        Mutation::QueueCreated {
            account: a.clone(),
            queue_id: 7,
            name: q.clone(),
            settings: settings(),
            created_at_ms: 1_700_000_000_000,
        },
        Mutation::QueueAttributesSet {
            account: a.clone(),
            queue_id: 7,
            name: q.clone(),
            settings: QueueSettings::default(),
            modified_at_ms: 1_700_000_000_500,
        },
        Mutation::QueueDeleted {
            account: a.clone(),
            queue_id: 7,
            name: q.clone(),
            at_ms: 1_700_000_001_000,
        },
        Mutation::MessageSent {
            account: a.clone(),
            queue_id: 7,
            queue: q.clone(),
            msg_id: 42,
            body: Bytes::from_static(b"hello"),
            enqueue_time_ms: 1_700_000_000_100,
            visible_at_ms: 1_700_000_010_100,
        },
        Mutation::MessageDeleted {
            account: a.clone(),
            queue_id: 7,
            queue: q.clone(),
            msg_id: 42,
            at_ms: 1_700_000_000_200,
            to_rewind_area: true,
        },
        Mutation::Rewound {
            account: a.clone(),
            queue_id: 7,
            queue: q.clone(),
            start_ms: 1_700_000_000_000,
            at_ms: 1_700_000_000_300,
        },
        Mutation::Purged {
            account: a.clone(),
            queue_id: 7,
            queue: q.clone(),
            at_ms: 1_700_000_000_400,
        },
        Mutation::DeadLettered {
            account: a.clone(),
            source_queue_id: 7,
            source: q.clone(),
            target: Arc::from("dlq"),
            target_queue_id: Some(8),
            msg_id: 43,
            reason: DeadLetterReason::MaxReceiveCount,
            receive_count: 3,
            at_ms: 1_700_000_000_500,
        },
        Mutation::DeadLettered {
            account: a.clone(),
            source_queue_id: 7,
            source: q.clone(),
            target: Arc::from("gone"),
            target_queue_id: None,
            msg_id: 44,
            reason: DeadLetterReason::TimeToLive,
            receive_count: 0,
            at_ms: 1_700_000_000_600,
        },
        Mutation::Redriven {
            account: a,
            dead_letter_queue_id: 8,
            dead_letter_queue: Arc::from("dlq"),
            target_queue_id: 7,
            target: q,
            msg_id: 43,
            at_ms: 1_700_000_000_700,
        },
    ]
}

fn every_record() -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    for m in every_mutation() {
        let mut out = Vec::new();
        encode_mutation(&m, &mut out).unwrap();
        records.push(out);
    }
    let mut out = Vec::new();
    encode_batch(9, &mut out);
    records.push(out);
    let mut out = Vec::new();
    encode_checkpoint(&checkpoint(), &mut out).unwrap();
    records.push(out);
    for image in images() {
        let mut out = Vec::new();
        encode_message_image(&image, &mut out).unwrap();
        records.push(out);
    }
    records
}

fn checkpoint() -> Checkpoint {
    Checkpoint {
        next_queue_id: 9,
        next_msg_id: 100,
        queues: vec![QueueImage {
            queue_id: 7,
            account: Arc::from("alice"),
            name: Arc::from("orders"),
            settings: settings(),
            created_at_ms: 1,
            modified_at_ms: 2,
        }],
    }
}

fn images() -> Vec<MessageImage> {
    vec![
        MessageImage {
            queue_id: 7,
            msg_id: 42,
            body: Bytes::from_static(b"x"),
            enqueue_time_ms: 5,
            visible_at_ms: 6,
            in_rewind_area: true,
            dead_letter: None,
        },
        MessageImage {
            queue_id: 8,
            msg_id: 43,
            body: Bytes::from_static(b"dead"),
            enqueue_time_ms: 5,
            visible_at_ms: 6,
            in_rewind_area: false,
            dead_letter: Some(DeadLetterInfo {
                source_queue: "orders".into(),
                reason: DeadLetterReason::TimeToLive,
                receive_count: 2,
                dead_lettered_at_ms: 6,
            }),
        },
    ]
}

fn decode_one(bytes: &[u8]) -> Result<Record, DecodeError> {
    let frame = read_frame(bytes)?.ok_or(DecodeError::BadLength(0))?;
    assert_eq!(frame.size, bytes.len(), "one record fills its buffer");
    decode(&frame, &mut Names::default())
}

#[test]
fn every_mutation_round_trips() {
    for m in every_mutation() {
        let mut out = Vec::new();
        encode_mutation(&m, &mut out).unwrap();
        assert_eq!(decode_one(&out).unwrap(), Record::Mutation(m));
    }
    let mut out = Vec::new();
    encode_checkpoint(&checkpoint(), &mut out).unwrap();
    assert_eq!(decode_one(&out).unwrap(), Record::Checkpoint(checkpoint()));
    for image in images() {
        let mut out = Vec::new();
        encode_message_image(&image, &mut out).unwrap();
        assert_eq!(decode_one(&out).unwrap(), Record::Message(image));
    }
    let mut out = Vec::new();
    encode_batch(9, &mut out);
    assert_eq!(decode_one(&out).unwrap(), Record::Batch { seq: 9 });
}

/// The bytes of spec/storage.md's examples (checksums computed independently of the crc32c
/// crate): a batch marker, a MessageDeleted record, a segment header.
#[test]
fn golden_bytes_match_the_spec() {
    let mut out = Vec::new();
    encode_batch(1, &mut out);
    assert_eq!(
        hex::encode(&out),
        "09000000\
         1e8f59ab\
         02\
         0100000000000000"
            .replace(' ', ""),
        "batch marker"
    );
    let mut out = Vec::new();
    encode_mutation(
        &Mutation::MessageDeleted {
            account: Arc::from("a"),
            queue_id: 1,
            queue: Arc::from("q"),
            msg_id: 2,
            at_ms: 3,
            to_rewind_area: false,
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(
        hex::encode(&out),
        "20000000\
         b9dc94e8\
         07\
         0100 61\
         0100000000000000\
         0100 71\
         0200000000000000\
         0300000000000000\
         00"
        .replace(' ', "")
    );
    assert_eq!(
        hex::encode(segment_header(3)),
        "434d514453454700\
         01000000\
         0300000000000000\
         aeecf194"
            .replace(' ', "")
    );
}

#[test]
fn every_truncation_is_an_error() {
    for record in every_record() {
        for cut in 1..record.len() {
            assert!(
                decode_one(&record[..cut]).is_err(),
                "a record cut to {cut} of {} bytes decoded",
                record.len()
            );
        }
    }
}

#[test]
fn every_bit_flip_is_an_error() {
    for record in every_record() {
        for byte in 0..record.len() {
            for bit in 0..8 {
                let mut damaged = record.clone();
                damaged[byte] ^= 1 << bit;
                // A flip in the length may make the record end elsewhere (an error too, or the
                // end marker when the length becomes 0): never the same record.
                let decoded = read_frame(&damaged).map(|f| f.map(|f| f.size));
                if let Ok(Some(size)) = decoded {
                    if size <= damaged.len() {
                        assert!(
                            decode_one(&damaged[..size]).is_err(),
                            "flipping bit {bit} of byte {byte} went unnoticed"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn zeros_are_the_end_of_the_data() {
    assert!(read_frame(&[0u8; 64]).unwrap().is_none());
    assert!(read_frame(&[0u8; 3]).unwrap().is_none());
    assert!(read_frame(&[]).unwrap().is_none());
    assert!(read_frame(&[1u8, 0]).is_err());
}

#[test]
fn invalid_payloads_are_refused() {
    // Unknown type with a valid checksum.
    let mut out = Vec::new();
    frame(&mut out, RecordType::Batch, |o| {
        put_u64(o, 1);
        Ok(())
    })
    .unwrap();
    out[8] = 200;
    let crc = checksum(&out[0..4], &out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(decode_one(&out), Err(DecodeError::UnknownType(200)));
    // Trailing bytes.
    let mut out = Vec::new();
    frame(&mut out, RecordType::Batch, |o| {
        put_u64(o, 1);
        put_u8(o, 0);
        Ok(())
    })
    .unwrap();
    assert!(matches!(
        decode_one(&out),
        Err(DecodeError::Malformed { .. })
    ));
    // Settings the engine would never have accepted.
    let mut bad = settings();
    bad.msg_retention_seconds = 1;
    let mut out = Vec::new();
    encode_mutation(
        &Mutation::QueueCreated {
            account: Arc::from("a"),
            queue_id: 1,
            name: Arc::from("q"),
            settings: bad,
            created_at_ms: 0,
        },
        &mut out,
    )
    .unwrap();
    assert!(matches!(
        decode_one(&out),
        Err(DecodeError::Malformed { .. })
    ));
    // A length past the maximum is refused before anything is allocated.
    let mut huge = vec![0u8; 16];
    huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        read_frame(&huge).err(),
        Some(DecodeError::BadLength(u32::MAX as usize))
    );
}

#[test]
fn segment_headers_are_checked() {
    let header = segment_header(12);
    assert_eq!(check_segment_header(&header), Ok(12));
    let mut bad = header;
    bad[3] ^= 1;
    assert!(check_segment_header(&bad).is_err());
    let mut newer = header;
    newer[8] = 2;
    let crc = crc32c::crc32c(&newer[0..20]);
    newer[20..24].copy_from_slice(&crc.to_le_bytes());
    assert!(check_segment_header(&newer)
        .unwrap_err()
        .contains("version 2"));
    assert!(check_segment_header(&header[..10]).is_err());
}

proptest! {
    #[test]
    fn sends_round_trip(
        queue_id in any::<u64>(),
        msg_id in any::<u64>(),
        body in proptest::collection::vec(any::<u8>(), 1..300),
        account in "[a-z]{1,16}",
        queue in "[a-zA-Z][a-zA-Z0-9-]{0,63}",
        enqueue in any::<u64>(),
        delay in any::<u64>(),
    ) {
        let m = Mutation::MessageSent {
            account: Arc::from(account.as_str()),
            queue_id,
            queue: Arc::from(queue.as_str()),
            msg_id,
            body: Bytes::from(body),
            enqueue_time_ms: enqueue,
            visible_at_ms: delay,
        };
        let mut out = Vec::new();
        encode_mutation(&m, &mut out).unwrap();
        prop_assert_eq!(decode_one(&out).unwrap(), Record::Mutation(m));
    }

    #[test]
    fn any_bytes_give_a_record_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(Some(frame)) = read_frame(&bytes) {
            let _ = decode(&frame, &mut Names::default());
        }
    }
}
