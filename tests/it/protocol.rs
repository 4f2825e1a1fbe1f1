//! The binary protocol at the byte level: the handshake, bad frames and bad bodies. Every case
//! gets the documented error reply or a closed connection, and other clients are unaffected.

use cmqd::client::QueueAttributeSet;
use cmqd::protocol::{Reply, Request, Response, FLAG_RESPONSE, PROTOCOL_VERSION};

use crate::support::{error_code, RawConn, TestServer, ALICE};

fn frame(version: u8, flags: u8, opcode: u16, request_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(8 + body.len() as u32).to_be_bytes());
    out.push(version);
    out.push(flags);
    out.extend_from_slice(&opcode.to_be_bytes());
    out.extend_from_slice(&request_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[tokio::test]
async fn requests_before_authentication_are_refused() {
    let server = TestServer::start().await;
    let mut raw = RawConn::connect(server.addr()).await;
    let response = raw
        .call(1, &Request::GetQueueAttributes { queue: "q".into() })
        .await;
    assert_eq!(error_code(&response), Some((4100, 10030)));
    // Ping works before authentication.
    assert_eq!(
        raw.call(2, &Request::Ping).await,
        Response::Ok(Reply::Empty)
    );
    // Auth before Hello is refused too (there is no nonce yet).
    let response = raw
        .call(
            3,
            &Request::Auth {
                secret_id: ALICE.0.into(),
                signature: [0; 32],
            },
        )
        .await;
    assert_eq!(error_code(&response), Some((4100, 10030)));
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_signature_closes_the_connection() {
    let server = TestServer::start().await;
    let mut raw = RawConn::connect(server.addr()).await;
    let hello = Request::Hello {
        min_version: 1,
        max_version: 1,
        client_name: "t".into(),
    };
    let Response::Ok(Reply::Hello { nonce, version, .. }) = raw.call(1, &hello).await else {
        panic!("hello refused");
    };
    assert_eq!(version, PROTOCOL_VERSION);
    let auth = Request::Auth {
        secret_id: ALICE.0.into(),
        signature: cmqd::protocol::sign("not-the-key-at-all-000", &nonce, ALICE.0),
    };
    let response = raw.call(2, &auth).await;
    assert_eq!(error_code(&response), Some((4100, 10030)));
    assert!(
        raw.next_frame().await.is_none(),
        "connection closed after a failed auth"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_unsupported_version_range_is_refused() {
    let server = TestServer::start().await;
    let mut raw = RawConn::connect(server.addr()).await;
    let hello = Request::Hello {
        min_version: 7,
        max_version: 9,
        client_name: "future".into(),
    };
    let response = raw.call(1, &hello).await;
    assert_eq!(error_code(&response).map(|c| c.0), Some(4000));
    server.stop().await;
}

#[tokio::test]
async fn bad_bodies_get_errors_and_the_connection_lives_on() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    alice
        .create_queue("q", &QueueAttributeSet::default())
        .await
        .unwrap();
    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;

    // Unknown opcode: 4000/10280.
    raw.send_bytes(&frame(PROTOCOL_VERSION, 0, 0x7777, 5, b""))
        .await;
    let (id, response) = raw.recv().await;
    assert_eq!((id, error_code(&response)), (5, Some((4000, 10280))));

    // A known opcode with a truncated body: 4000/10420.
    raw.send_bytes(&frame(PROTOCOL_VERSION, 0, 0x0110, 6, &[0, 5, b'a']))
        .await;
    let (id, response) = raw.recv().await;
    assert_eq!((id, error_code(&response)), (6, Some((4000, 10420))));

    // Trailing garbage after a valid body: 4000/10420.
    let mut body = Vec::new();
    body.extend_from_slice(&1u16.to_be_bytes());
    body.push(b'q');
    body.push(0xFF);
    raw.send_bytes(&frame(PROTOCOL_VERSION, 0, 0x0103, 7, &body))
        .await;
    let (id, response) = raw.recv().await;
    assert_eq!((id, error_code(&response)), (7, Some((4000, 10420))));

    // A frame flagged as a response, or of another version, is refused but not fatal.
    raw.send_bytes(&frame(PROTOCOL_VERSION, FLAG_RESPONSE, 0x0003, 8, b""))
        .await;
    let (id, response) = raw.recv().await;
    assert_eq!(id, 8);
    assert!(error_code(&response).is_some());

    // The connection still works.
    let response = raw
        .call(9, &Request::GetQueueAttributes { queue: "q".into() })
        .await;
    assert!(
        matches!(response, Response::Ok(Reply::QueueAttributes(_))),
        "{response:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn framing_errors_close_only_that_connection() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let queue = alice.queue("steady");
    queue.create(&QueueAttributeSet::default()).await.unwrap();

    // A giant length prefix: closed, nothing allocated for it.
    let mut raw = RawConn::connect(server.addr()).await;
    raw.send_bytes(&u32::MAX.to_be_bytes()).await;
    assert!(raw.next_frame().await.is_none());
    // A length shorter than the header: closed.
    let mut raw = RawConn::connect(server.addr()).await;
    raw.send_bytes(&[0, 0, 0, 3, 1, 2, 3]).await;
    assert!(raw.next_frame().await.is_none());
    // Random bytes after a good handshake: closed (or answered with errors), never a crash.
    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    raw.send_bytes(&garbage).await;
    // Half-close so that a length prefix in the garbage cannot leave the broker waiting for
    // the rest of a frame.
    tokio::io::AsyncWriteExt::shutdown(&mut raw.writer)
        .await
        .unwrap();
    while raw.next_frame().await.is_some() {}

    // The well-behaved client never noticed.
    let id = queue.send_message("fine", 0).await.unwrap();
    assert_eq!(queue.receive_message(Some(0)).await.unwrap().msg_id, id);
    server.stop().await;
}
