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

fn topic_settings() -> TopicSettings {
    TopicSettings {
        max_msg_size_bytes: 2048,
        filter_type: FILTER_TYPE_ROUTING_KEY,
        msg_retention_seconds: 86_400,
    }
}

fn http_subscription() -> SubscriptionSettings {
    SubscriptionSettings {
        protocol: Protocol::Http,
        endpoint: Arc::from("http://127.0.0.1:8080/push"),
        notify_strategy: NotifyStrategy::BackoffRetry,
        content_format: ContentFormat::Json,
        filter_tags: vec!["red".into(), "blue".into()],
        binding_keys: vec!["a.*".into(), "#".into()],
    }
}

fn queue_subscription() -> SubscriptionSettings {
    SubscriptionSettings {
        protocol: Protocol::Queue,
        endpoint: Arc::from("orders"),
        notify_strategy: NotifyStrategy::ExponentialDecayRetry,
        content_format: ContentFormat::Simplified,
        filter_tags: Vec::new(),
        binding_keys: vec!["a.b".into()],
    }
}

fn topic_mutations() -> Vec<Mutation> {
    let a: Arc<str> = Arc::from("alice");
    let t: Arc<str> = Arc::from("events");
    vec![
        Mutation::TopicCreated {
            account: a.clone(),
            topic_id: 3,
            name: t.clone(),
            settings: topic_settings(),
            created_at_ms: 1_700_000_000_000,
        },
        Mutation::TopicAttributesSet {
            account: a.clone(),
            topic_id: 3,
            name: t.clone(),
            settings: TopicSettings::default(),
            modified_at_ms: 1_700_000_000_100,
        },
        Mutation::TopicDeleted {
            account: a.clone(),
            topic_id: 3,
            name: t.clone(),
            at_ms: 1_700_000_000_200,
        },
        Mutation::SubscriptionCreated {
            account: a.clone(),
            topic_id: 3,
            topic: t.clone(),
            subscription_id: 4,
            name: Arc::from("audit"),
            settings: http_subscription(),
            created_at_ms: 1_700_000_000_300,
        },
        Mutation::SubscriptionCreated {
            account: a.clone(),
            topic_id: 3,
            topic: t.clone(),
            subscription_id: 5,
            name: Arc::from("copy"),
            settings: queue_subscription(),
            created_at_ms: 1_700_000_000_300,
        },
        Mutation::SubscriptionAttributesSet {
            account: a.clone(),
            topic_id: 3,
            subscription_id: 4,
            name: Arc::from("audit"),
            settings: SubscriptionSettings {
                filter_tags: Vec::new(),
                ..http_subscription()
            },
            modified_at_ms: 1_700_000_000_400,
        },
        Mutation::SubscriptionDeleted {
            account: a.clone(),
            topic_id: 3,
            subscription_id: 4,
            name: Arc::from("audit"),
            at_ms: 1_700_000_000_500,
        },
        Mutation::TopicMessageRetained {
            account: a.clone(),
            topic_id: 3,
            topic: t,
            msg_id: 77,
            body: Bytes::from_static(b"published"),
            msg_tags: Arc::from(vec!["red".to_string()]),
            publish_time_ms: 1_700_000_000_600,
            expires_at_ms: 1_700_086_400_600,
            subscription_ids: vec![4, 9],
        },
        Mutation::PushFinished {
            account: a.clone(),
            topic_id: 3,
            subscription_id: 4,
            msg_id: 77,
            outcome: PushOutcome::Dropped,
            at_ms: 1_700_000_000_700,
        },
        Mutation::PublishedNowhere {
            account: a.clone(),
            topic_id: 3,
            topic: Arc::from("events"),
            first_msg_id: 90,
            count: 16,
            at_ms: 1_700_000_000_750,
        },
        Mutation::MessagesReceived {
            account: a,
            queue_id: 7,
            queue: Arc::from("orders"),
            at_ms: 1_700_000_000_800,
            invisible_until_ms: 1_700_000_030_800,
            messages: vec![
                Dequeue {
                    msg_id: 42,
                    dequeue_count: 1,
                    first_dequeue_ms: 1_700_000_000_800,
                },
                Dequeue {
                    msg_id: 43,
                    dequeue_count: 4,
                    first_dequeue_ms: 1_700_000_000_001,
                },
            ],
        },
    ]
}

fn every_mutation() -> Vec<Mutation> {
    let a: Arc<str> = Arc::from("alice");
    let q: Arc<str> = Arc::from("orders");
    let mut all = vec![
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
    ];
    all.extend(topic_mutations());
    all
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
    let mut out = Vec::new();
    encode_retained_image(&retained_image(), &mut out).unwrap();
    records.push(out);
    records
}

fn retained_image() -> RetainedImage {
    RetainedImage {
        topic_id: 3,
        msg_id: 77,
        body: Bytes::from_static(b"kept"),
        msg_tags: Arc::from(vec!["red".to_string(), "blue".to_string()]),
        publish_time_ms: 10,
        expires_at_ms: 20,
        subscription_ids: vec![4],
    }
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
        next_topic_id: 4,
        next_subscription_id: 6,
        topics: vec![TopicImage {
            topic_id: 3,
            account: Arc::from("alice"),
            name: Arc::from("events"),
            settings: topic_settings(),
            created_at_ms: 3,
            modified_at_ms: 4,
        }],
        subscriptions: vec![
            SubscriptionImage {
                subscription_id: 4,
                topic_id: 3,
                name: Arc::from("audit"),
                settings: http_subscription(),
                created_at_ms: 5,
                modified_at_ms: 6,
            },
            SubscriptionImage {
                subscription_id: 5,
                topic_id: 3,
                name: Arc::from("copy"),
                settings: queue_subscription(),
                created_at_ms: 5,
                modified_at_ms: 5,
            },
        ],
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
            dequeue_count: 0,
            first_dequeue_ms: 0,
            invisible_until_ms: 0,
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
            dequeue_count: 3,
            first_dequeue_ms: 7,
            invisible_until_ms: 9,
        },
    ]
}

fn decode_one(bytes: &[u8]) -> Result<Record, DecodeError> {
    let frame = read_frame(bytes)?.ok_or(DecodeError::BadLength(0))?;
    assert_eq!(frame.size, bytes.len(), "one record fills its buffer");
    decode(&frame, &mut Names::default())
}

#[test]
fn bodies_are_found_without_decoding_and_skipped_when_asked() {
    let mut with_bodies = 0;
    for bytes in every_record() {
        let frame = read_frame(&bytes).unwrap().unwrap();
        let full = decode(&frame, &mut Names::default()).unwrap();
        let skipped = decode_with(&frame, &mut Names::default(), Bodies::Skip).unwrap();
        let refound = reframe(&bytes).unwrap();
        assert_eq!(
            (refound.record_type, refound.payload, refound.size),
            (frame.record_type, frame.payload, frame.size)
        );
        match body_of(&full) {
            Some(body) => {
                with_bodies += 1;
                assert_eq!(body_in(&frame).unwrap(), &body[..], "{full:?}");
                assert_eq!(body_of(&skipped).map(Bytes::len), Some(0));
                // Everything but the body decodes the same.
                let mut emptied = full.clone();
                match &mut emptied {
                    Record::Mutation(Mutation::MessageSent { body, .. })
                    | Record::Mutation(Mutation::TopicMessageRetained { body, .. }) => {
                        *body = Bytes::new()
                    }
                    Record::Message(image) => image.body = Bytes::new(),
                    Record::Retained(image) => image.body = Bytes::new(),
                    other => panic!("{other:?} has no body"),
                }
                assert_eq!(skipped, emptied);
            }
            None => {
                assert!(body_in(&frame).is_err(), "{full:?}");
                assert_eq!(skipped, full);
            }
        }
    }
    // Sends, retained publishes, both images (with and without the optional fields).
    assert!(with_bodies >= 5, "{with_bodies}");
    // A skipped body is still checked: a payload cut inside its body does not decode, and
    // `reframe` refuses a buffer shorter than the record.
    let send = every_mutation()
        .into_iter()
        .find(|m| matches!(m, Mutation::MessageSent { .. }))
        .unwrap();
    let mut out = Vec::new();
    encode_mutation(&send, &mut out).unwrap();
    let frame = read_frame(&out).unwrap().unwrap();
    let cut = Frame {
        payload: &frame.payload[..frame.payload.len() - 1],
        ..frame
    };
    assert!(decode_with(&cut, &mut Names::default(), Bodies::Skip).is_err());
    assert!(body_in(&cut).is_err());
    assert!(reframe(&out[..out.len() - 1]).is_none());
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
    encode_retained_image(&retained_image(), &mut out).unwrap();
    assert_eq!(
        decode_one(&out).unwrap(),
        Record::Retained(retained_image())
    );
    let mut out = Vec::new();
    encode_batch(9, &mut out);
    assert_eq!(decode_one(&out).unwrap(), Record::Batch { seq: 9 });
}

/// A record encoded with its body apart is, with the body put back after it, byte for byte
/// the record [`encode_mutation`] makes; every other record comes out whole.
#[test]
fn a_record_with_its_body_apart_is_the_same_record() {
    let mut sent = 0;
    for m in every_mutation().into_iter().chain(topic_mutations()) {
        let mut whole = Vec::new();
        encode_mutation(&m, &mut whole).unwrap();
        let mut split = vec![7u8; 3];
        let body = encode_mutation_split(&m, &mut split).unwrap();
        assert_eq!(&split[..3], &[7, 7, 7], "what was there is kept");
        let mut joined = split[3..].to_vec();
        match (&m, body) {
            (
                Mutation::MessageSent { body: original, .. }
                | Mutation::TopicMessageRetained { body: original, .. },
                Some(body),
            ) => {
                assert_eq!(&body, original);
                joined.extend_from_slice(&body);
                sent += 1;
            }
            (_, None) => {}
            (m, Some(_)) => panic!("{} has no body to leave out", m.kind()),
        }
        assert_eq!(joined, whole, "{}", m.kind());
    }
    assert!(sent >= 2, "samples with bodies: {sent}");
}

/// Where `m`'s variant sits in [`one_of_each`]. An exhaustive match without a wildcard: a new
/// [`Mutation`] variant does not compile until it has a place here, and
/// `one_sample_of_every_variant_round_trips` fails until `every_mutation` has a sample of it.
fn place(m: &Mutation) -> usize {
    match m {
        Mutation::QueueCreated { .. } => 0,
        Mutation::QueueAttributesSet { .. } => 1,
        Mutation::QueueDeleted { .. } => 2,
        Mutation::MessageSent { .. } => 3,
        Mutation::MessageDeleted { .. } => 4,
        Mutation::Rewound { .. } => 5,
        Mutation::Purged { .. } => 6,
        Mutation::DeadLettered { .. } => 7,
        Mutation::Redriven { .. } => 8,
        Mutation::TopicCreated { .. } => 9,
        Mutation::TopicAttributesSet { .. } => 10,
        Mutation::TopicDeleted { .. } => 11,
        Mutation::SubscriptionCreated { .. } => 12,
        Mutation::SubscriptionAttributesSet { .. } => 13,
        Mutation::SubscriptionDeleted { .. } => 14,
        Mutation::TopicMessageRetained { .. } => 15,
        Mutation::PushFinished { .. } => 16,
        Mutation::PublishedNowhere { .. } => 17,
        Mutation::MessagesReceived { .. } => 18,
    }
}

/// Whether records of this type hold a [`Mutation`]. Exhaustive too: the encoder gives a new
/// variant a new record type, which does not compile here until it is sorted.
fn holds_mutation(t: RecordType) -> bool {
    match t {
        RecordType::QueueCreated
        | RecordType::QueueAttributesSet
        | RecordType::QueueDeleted
        | RecordType::MessageSent
        | RecordType::MessageDeleted
        | RecordType::Rewound
        | RecordType::Purged
        | RecordType::DeadLettered
        | RecordType::Redriven
        | RecordType::TopicCreated
        | RecordType::TopicAttributesSet
        | RecordType::TopicDeleted
        | RecordType::SubscriptionCreated
        | RecordType::SubscriptionAttributesSet
        | RecordType::SubscriptionDeleted
        | RecordType::TopicMessageRetained
        | RecordType::PushFinished
        | RecordType::MessagesReceived
        | RecordType::PublishedNowhere => true,
        RecordType::Checkpoint
        | RecordType::Batch
        | RecordType::MessageImage
        | RecordType::RetainedImage => false,
    }
}

/// The first sample of each variant in `every_mutation`, in [`place`] order.
fn one_of_each() -> Vec<Mutation> {
    let mut all: Vec<Mutation> = Vec::new();
    for m in every_mutation() {
        if all.iter().all(|seen| place(seen) != place(&m)) {
            all.push(m);
        }
    }
    all.sort_by_key(place);
    all
}

#[test]
fn one_sample_of_every_variant_round_trips() {
    let samples = one_of_each();
    let places: Vec<usize> = samples.iter().map(place).collect();
    assert_eq!(places, (0..samples.len()).collect::<Vec<_>>());
    // Every record type that holds a mutation (as the decoder knows them) has its sample.
    let expected: Vec<u8> = (0..=u8::MAX)
        .filter(|code| RecordType::from_u8(*code).is_some_and(holds_mutation))
        .collect();
    let mut encoded = Vec::new();
    let mut kinds = Vec::new();
    for m in samples {
        let mut out = Vec::new();
        encode_mutation(&m, &mut out).unwrap();
        let frame = reframe(&out).unwrap();
        encoded.push(frame.record_type);
        kinds.push(m.kind());
        assert_eq!(
            decode_one(&out).unwrap(),
            Record::Mutation(m.clone()),
            "{}",
            m.kind()
        );
    }
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds.len(), encoded.len(), "one kind name per variant");
    encoded.sort_unstable();
    assert_eq!(encoded, expected, "a sample for every mutation record type");
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
    let golden = |m: Mutation, expected: &str, what: &str| {
        let mut out = Vec::new();
        encode_mutation(&m, &mut out).unwrap();
        assert_eq!(hex::encode(&out), expected.replace(' ', ""), "{what}");
    };
    golden(
        Mutation::TopicCreated {
            account: Arc::from("a"),
            topic_id: 1,
            name: Arc::from("t"),
            settings: TopicSettings {
                max_msg_size_bytes: 65_536,
                filter_type: FILTER_TYPE_TAG,
                msg_retention_seconds: 86_400,
            },
            created_at_ms: 2,
        },
        "20000000 7c7edb91 0d 0100 61 0100000000000000 0100 74 00000100 01 80510100 \
         0200000000000000",
        "TopicCreated",
    );
    golden(
        Mutation::PushFinished {
            account: Arc::from("a"),
            topic_id: 1,
            subscription_id: 2,
            msg_id: 3,
            outcome: PushOutcome::Delivered,
            at_ms: 4,
        },
        "25000000 eb940b95 14 0100 61 0100000000000000 0200000000000000 0300000000000000 00 \
         0400000000000000",
        "PushFinished",
    );
    golden(
        Mutation::MessagesReceived {
            account: Arc::from("a"),
            queue_id: 1,
            queue: Arc::from("q"),
            at_ms: 5,
            invisible_until_ms: 6,
            messages: vec![Dequeue {
                msg_id: 2,
                dequeue_count: 1,
                first_dequeue_ms: 5,
            }],
        },
        "35000000 fde2cbca 16 0100 61 0100000000000000 0100 71 0500000000000000 \
         0600000000000000 0100 0200000000000000 01000000 0500000000000000",
        "MessagesReceived",
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

/// A record of `record_type` whose payload `payload` writes, with a valid checksum.
fn raw(record_type: RecordType, payload: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    frame(&mut out, record_type, |o| {
        payload(o);
        Ok(())
    })
    .unwrap();
    out
}

fn malformed(bytes: &[u8], what: &str) {
    assert!(
        matches!(decode_one(bytes), Err(DecodeError::Malformed { .. })),
        "{what}: {:?}",
        decode_one(bytes)
    );
}

#[test]
fn invalid_topic_payloads_are_refused() {
    let topic = |settings: (u32, u8, u32)| {
        raw(RecordType::TopicCreated, |o| {
            put_str(o, "a", "a").unwrap();
            put_u64(o, 1);
            put_str(o, "t", "t").unwrap();
            put_u32(o, settings.0);
            put_u8(o, settings.1);
            put_u32(o, settings.2);
            put_u64(o, 2);
        })
    };
    assert!(decode_one(&topic((65_536, 1, 86_400))).is_ok());
    malformed(&topic((65_536, 3, 86_400)), "filterType 3");
    malformed(&topic((65_536, 0, 86_400)), "filterType 0");
    malformed(&topic((100, 1, 86_400)), "maxMsgSize below the minimum");
    malformed(&topic((65_537, 1, 86_400)), "maxMsgSize above the maximum");
    malformed(&topic((65_536, 1, 0)), "retention 0");

    // Subscription settings: enum values, endpoints, the queue/format rule, lists.
    let subscription =
        |protocol: u8, endpoint: &str, strategy: u8, format: u8, tags: &[&str], keys: &[&str]| {
            let endpoint = endpoint.to_string();
            let tags: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
            let keys: Vec<String> = keys.iter().map(|s| s.to_string()).collect();
            raw(RecordType::SubscriptionCreated, move |o| {
                put_str(o, "a", "a").unwrap();
                put_u64(o, 1);
                put_str(o, "t", "t").unwrap();
                put_u64(o, 2);
                put_str(o, "s", "s").unwrap();
                put_u8(o, protocol);
                put_str(o, "e", &endpoint).unwrap();
                put_u8(o, strategy);
                put_u8(o, format);
                put_list(o, "tag", &tags).unwrap();
                put_list(o, "key", &keys).unwrap();
                put_u64(o, 3);
            })
        };
    let url = "http://example.com/x";
    assert!(decode_one(&subscription(0, url, 0, 0, &["x"], &["a.b"])).is_ok());
    assert!(decode_one(&subscription(1, "q1", 1, 1, &[], &[])).is_ok());
    malformed(&subscription(2, url, 0, 0, &[], &[]), "protocol 2");
    malformed(&subscription(0, url, 2, 0, &[], &[]), "strategy 2");
    malformed(&subscription(0, url, 0, 2, &[], &[]), "format 2");
    malformed(&subscription(0, "ftp://x", 0, 0, &[], &[]), "not http");
    malformed(&subscription(1, "1bad", 1, 1, &[], &[]), "not a queue name");
    malformed(
        &subscription(1, "q1", 1, 0, &[], &[]),
        "queue endpoint with JSON",
    );
    malformed(&subscription(0, url, 0, 0, &[""], &[]), "empty tag");
    malformed(
        &subscription(0, url, 0, 0, &[], &["a..b"]),
        "empty word in a key",
    );
    let many: Vec<&str> = vec!["t"; limits::TAG_LIST_WIRE_MAX + 1];
    malformed(&subscription(0, url, 0, 0, &many, &[]), "too many tags");

    // Retained messages: no subscription, expiry before publish, a count past the payload.
    let retained = |ids: &[u64], publish: u64, expires: u64| {
        let ids = ids.to_vec();
        raw(RecordType::TopicMessageRetained, move |o| {
            put_str(o, "a", "a").unwrap();
            put_u64(o, 1);
            put_str(o, "t", "t").unwrap();
            put_u64(o, 9);
            put_u64(o, publish);
            put_u64(o, expires);
            put_list(o, "tag", &[]).unwrap();
            put_ids(o, "ids", &ids).unwrap();
            put_bytes(o, "body", b"b").unwrap();
        })
    };
    assert!(decode_one(&retained(&[4], 1, 2)).is_ok());
    malformed(&retained(&[], 1, 2), "no subscription");
    malformed(&retained(&[4], 3, 2), "expires before published");
    let mut huge = retained(&[4], 1, 2);
    // The id count sits after 9 + 3 + 8 + 3 + 8 + 8 + 8 + 2 bytes of the record.
    let at = RECORD_HEADER_BYTES + 1 + 3 + 8 + 3 + 8 + 8 + 8 + 2;
    huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = checksum(&huge[0..4], &huge[RECORD_HEADER_BYTES..]);
    huge[4..8].copy_from_slice(&crc.to_le_bytes());
    malformed(&huge, "id count past the payload");

    // PushFinished outcome, MessagesReceived counts.
    let finished = |outcome: u8| {
        raw(RecordType::PushFinished, move |o| {
            put_str(o, "a", "a").unwrap();
            put_u64(o, 1);
            put_u64(o, 2);
            put_u64(o, 3);
            put_u8(o, outcome);
            put_u64(o, 4);
        })
    };
    assert!(decode_one(&finished(1)).is_ok());
    malformed(&finished(2), "outcome 2");
    let nowhere = |count: u32| {
        raw(RecordType::PublishedNowhere, move |o| {
            put_str(o, "a", "a").unwrap();
            put_u64(o, 1);
            put_str(o, "t", "t").unwrap();
            put_u64(o, 2);
            put_u32(o, count);
            put_u64(o, 3);
        })
    };
    assert!(decode_one(&nowhere(16)).is_ok());
    malformed(&nowhere(0), "a publish of nothing");
    malformed(&nowhere(17), "a publish of 17");
    let received = |list: &[(u64, u32, u64)], at: u64| {
        let list = list.to_vec();
        raw(RecordType::MessagesReceived, move |o| {
            put_str(o, "a", "a").unwrap();
            put_u64(o, 1);
            put_str(o, "q", "q").unwrap();
            put_u64(o, at);
            put_u64(o, at + 30_000);
            o.extend_from_slice(&(list.len() as u16).to_le_bytes());
            for (id, count, first) in list {
                put_u64(o, id);
                put_u32(o, count);
                put_u64(o, first);
            }
        })
    };
    assert!(decode_one(&received(&[(2, 1, 5)], 5)).is_ok());
    malformed(&received(&[], 5), "nothing received");
    malformed(&received(&[(2, 0, 5)], 5), "dequeue count 0");
    malformed(
        &received(&[(2, 1, 6)], 5),
        "first dequeue after the receive",
    );
    let early = raw(RecordType::MessagesReceived, |o| {
        put_str(o, "a", "a").unwrap();
        put_u64(o, 1);
        put_str(o, "q", "q").unwrap();
        put_u64(o, 5);
        put_u64(o, 4);
        o.extend_from_slice(&1u16.to_le_bytes());
        put_u64(o, 2);
        put_u32(o, 1);
        put_u64(o, 5);
    });
    malformed(&early, "visible again before it was received");

    // A message image with the received flag must carry a count.
    let image = raw(RecordType::MessageImage, |o| {
        put_u64(o, 1);
        put_u64(o, 2);
        put_u64(o, 3);
        put_u64(o, 4);
        put_u8(o, 0b100);
        put_u32(o, 0);
        put_u64(o, 0);
        put_u64(o, 0);
        put_bytes(o, "body", b"b").unwrap();
    });
    malformed(&image, "received flag with count 0");
}

#[test]
fn a_checkpoint_without_a_topic_section_has_no_topics() {
    // As written before topics were logged: the queue list is the end of the payload.
    let cp = checkpoint();
    let old = raw(RecordType::Checkpoint, |o| {
        put_u64(o, cp.next_queue_id);
        put_u64(o, cp.next_msg_id);
        put_u32(o, cp.queues.len() as u32);
        for q in &cp.queues {
            put_queue_image(o, q).unwrap();
        }
    });
    let Record::Checkpoint(read) = decode_one(&old).unwrap() else {
        panic!("not a checkpoint");
    };
    assert_eq!(read.queues, cp.queues);
    assert!(read.topics.is_empty() && read.subscriptions.is_empty());
    assert_eq!((read.next_topic_id, read.next_subscription_id), (1, 1));
    // A topic section cut short is damage, not an old checkpoint.
    let mut out = Vec::new();
    encode_checkpoint(&cp, &mut out).unwrap();
    let full = read_frame(&out).unwrap().unwrap();
    let cut = raw(RecordType::Checkpoint, |o| {
        o.extend_from_slice(&full.payload[..full.payload.len() - 3]);
    });
    malformed(&cut, "topic section cut short");
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
    assert_eq!(check_segment_header(&newer), Err(HeaderError::Version(2)));
    assert!(check_segment_header(&newer)
        .unwrap_err()
        .to_string()
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
