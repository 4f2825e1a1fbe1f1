//! Pipelined sends and publishes (`client::SendPipeline`, `client::PublishPipeline`): every
//! send answered once, in ticket order, with its ids or its own error; a bad request refused
//! before it is sent; timeouts and broken connections answered, never sent again.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cmqd::client::{
    Account, ClientConfig, ErrorKind, QueueAttributeSet, SubscriptionSpec, TopicAttributeSet,
};

use crate::support::{swallowing_broker, TestServer, ALICE};
use crate::topic::queue_subscription;

#[tokio::test]
async fn every_send_is_answered_once_in_ticket_order_with_its_ids() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let queue = alice.queue("orders");
    queue.create(&QueueAttributeSet::default()).await.unwrap();
    let mut pipeline = queue.send_pipeline(8);
    let mut answers = Vec::new();
    let mut expected_ids = 0;
    for i in 0..300u32 {
        let ticket = if i % 10 == 0 {
            expected_ids += 3;
            pipeline
                .batch_send_message([format!("b{i}-0"), format!("b{i}-1"), format!("b{i}-2")], 0)
                .await
                .unwrap()
        } else {
            expected_ids += 1;
            pipeline.send_message(format!("m{i}"), 0).await.unwrap()
        };
        assert_eq!(ticket, u64::from(i));
        assert!(pipeline.unanswered() <= 8);
        while let Some(sent) = pipeline.try_next() {
            answers.push(sent);
        }
    }
    while let Some(sent) = pipeline.next().await {
        answers.push(sent);
    }
    assert_eq!(pipeline.in_flight(), 0);
    let tickets: Vec<u64> = answers.iter().map(|sent| sent.ticket).collect();
    assert_eq!(tickets, (0..300).collect::<Vec<u64>>());
    let mut ids = HashSet::new();
    for sent in &answers {
        let stored = sent.result.as_ref().unwrap();
        assert_eq!(stored.len(), if sent.ticket % 10 == 0 { 3 } else { 1 });
        ids.extend(stored.iter().copied());
    }
    assert_eq!(ids.len(), expected_ids);
    assert_eq!(
        queue.get_attributes().await.unwrap().active_msg_num,
        expected_ids as u64
    );
    // An id answered is the message sent under it.
    let message = queue.receive_message(Some(0)).await.unwrap();
    let sent = answers
        .iter()
        .find(|sent| sent.result.as_ref().unwrap().contains(&message.msg_id))
        .unwrap();
    let body = std::str::from_utf8(&message.body).unwrap().to_string();
    assert!(
        body.starts_with(&format!("m{}", sent.ticket))
            || body.starts_with(&format!("b{}-", sent.ticket)),
        "ticket {} answered id {} whose body is {body}",
        sent.ticket,
        message.msg_id
    );
    server.stop().await;
}

#[tokio::test]
async fn a_refused_send_is_answered_in_its_place_and_the_others_are_stored() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let queue = alice.queue("orders");
    queue.create(&QueueAttributeSet::default()).await.unwrap();
    let mut pipeline = queue.send_pipeline(4);
    for i in 0..20u32 {
        // An empty body is refused by the broker (4000s), not by the client.
        let body = if i == 7 {
            String::new()
        } else {
            format!("m{i}")
        };
        pipeline.send_message(body, 0).await.unwrap();
    }
    let mut failed = Vec::new();
    while let Some(sent) = pipeline.next().await {
        if let Err(error) = sent.result {
            assert_eq!(error.kind(), ErrorKind::Cmq, "{error}");
            assert!(error.code().is_some());
            failed.push(sent.ticket);
        }
    }
    assert_eq!(failed, vec![7]);
    assert_eq!(queue.get_attributes().await.unwrap().active_msg_num, 19);
    // flush reports a failure too, and takes every answer.
    let mut pipeline = alice.queue("missing").send_pipeline(4);
    pipeline.send_message("x", 0).await.unwrap();
    pipeline.send_message("y", 0).await.unwrap();
    let error = pipeline.flush().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Cmq, "{error}");
    assert_eq!(pipeline.in_flight(), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_request_over_a_protocol_limit_is_refused_before_it_is_sent_and_uses_no_ticket() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let queue = alice.queue("orders");
    queue.create(&QueueAttributeSet::default()).await.unwrap();
    let mut pipeline = queue.send_pipeline(4);
    assert_eq!(pipeline.send_message("first", 0).await.unwrap(), 0);
    let too_many: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    let error = pipeline.batch_send_message(too_many, 0).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidInput, "{error}");
    assert_eq!(pipeline.send_message("second", 0).await.unwrap(), 1);
    assert_eq!(pipeline.flush().await.unwrap(), 2);
    assert_eq!(queue.get_attributes().await.unwrap().active_msg_num, 2);
    server.stop().await;
}

#[tokio::test]
async fn a_publish_pipeline_fans_out_every_publish() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    alice
        .create_topic(
            "routes",
            &TopicAttributeSet {
                filter_type: Some(2),
                ..TopicAttributeSet::default()
            },
        )
        .await
        .unwrap();
    for (name, key) in [("star", "fan.*"), ("hash", "fan.#")] {
        queue_subscription(
            &alice,
            "routes",
            name,
            SubscriptionSpec::queue(name).binding_keys([key]),
        )
        .await;
    }
    let mut pipeline = alice.topic("routes").publish_pipeline(16);
    for i in 0..100u32 {
        pipeline
            .publish_message(format!("p{i}"), &[], Some("fan.k"))
            .await
            .unwrap();
    }
    pipeline
        .batch_publish_message(["x", "y"], &[], Some("fan.k.deeper"))
        .await
        .unwrap();
    assert_eq!(pipeline.flush().await.unwrap(), 102);
    let active = |name: &'static str| {
        let queue = alice.queue(name);
        async move { queue.get_attributes().await.unwrap().active_msg_num }
    };
    assert_eq!(active("star").await, 100);
    assert_eq!(active("hash").await, 102);
    server.stop().await;
}

#[tokio::test]
async fn sends_nobody_answers_time_out_in_ticket_order() {
    let (addr, swallowed) = swallowing_broker(false).await;
    let config = ClientConfig::default().request_timeout(Duration::from_millis(200));
    let account = Account::connect(&addr.to_string(), ALICE.0, ALICE.1, config)
        .await
        .unwrap();
    let mut pipeline = account.queue("orders").send_pipeline(2);
    for i in 0..3 {
        // The third waits for room: the first two time out to make it.
        pipeline.send_message(format!("m{i}"), 0).await.unwrap();
    }
    let mut tickets = Vec::new();
    while let Some(sent) = pipeline.next().await {
        let error = sent.result.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
        tickets.push(sent.ticket);
    }
    assert_eq!(tickets, vec![0, 1, 2]);
    assert_eq!(swallowed.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn sends_whose_connection_broke_are_answered_and_never_sent_again() {
    let (addr, swallowed) = swallowing_broker(true).await;
    let config = ClientConfig::default().request_timeout(Duration::from_secs(10));
    let account = Account::connect(&addr.to_string(), ALICE.0, ALICE.1, config)
        .await
        .unwrap();
    let mut pipeline = account.queue("orders").send_pipeline(8);
    for i in 0..5 {
        pipeline.send_message(format!("m{i}"), 0).await.unwrap();
    }
    let mut answered = 0;
    while let Some(sent) = pipeline.next().await {
        let error = sent.result.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
        answered += 1;
    }
    assert_eq!(answered, 5);
    // Each swallowed request was one send, swallowed once: none went out twice (a send that
    // found the connection closed before it was written went out on a new one).
    assert!(swallowed.load(Ordering::SeqCst) <= 5);
    // The pipeline goes on, on a new connection.
    pipeline.send_message("later", 0).await.unwrap();
    let error = pipeline.next().await.unwrap().result.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connection, "{error}");
}
