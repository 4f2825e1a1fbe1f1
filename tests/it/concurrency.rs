//! Many producers and consumers on one queue: nothing lost, nothing delivered twice within its
//! visibility timeout.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use cmqd::client::QueueAttributeSet;
use parking_lot::Mutex;

use crate::support::TestServer;

const PRODUCERS: usize = 4;
const CONSUMERS: usize = 4;
const PER_PRODUCER: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_producers_four_consumers_lose_nothing_and_duplicate_nothing() {
    let server = TestServer::start().await;
    let setup = server.alice().await;
    setup
        .create_queue(
            "shared",
            &QueueAttributeSet {
                // Far longer than the test: any second delivery would be a bug, not a timeout.
                visibility_timeout_seconds: Some(3600),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let account = server.alice().await;
        producers.push(tokio::spawn(async move {
            let queue = account.queue("shared");
            let mut ids = Vec::with_capacity(PER_PRODUCER);
            // Batches and singles mixed, each pipelined with the other producers.
            let mut i = 0;
            while i < PER_PRODUCER {
                if i % 3 == 0 && i + 8 <= PER_PRODUCER {
                    let bodies: Vec<String> = (i..i + 8).map(|k| format!("p{p}-{k}")).collect();
                    ids.extend(queue.batch_send_message(bodies, 0).await.unwrap());
                    i += 8;
                } else {
                    ids.push(queue.send_message(format!("p{p}-{i}"), 0).await.unwrap());
                    i += 1;
                }
            }
            ids
        }));
    }

    let total = PRODUCERS * PER_PRODUCER;
    let delivered = Arc::new(Mutex::new(HashSet::new()));
    let mut consumers = Vec::new();
    for c in 0..CONSUMERS {
        let account = server.alice().await;
        let delivered = delivered.clone();
        consumers.push(tokio::spawn(async move {
            let queue = account.queue("shared");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                if delivered.lock().len() >= total {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "consumer {c} ran out of time"
                );
                let batch = match queue.batch_receive_message(16, Some(1)).await {
                    Ok(batch) => batch,
                    Err(e) if e.is_no_message() => continue,
                    Err(e) => panic!("receive failed: {e}"),
                };
                let mut handles = Vec::with_capacity(batch.len());
                {
                    let mut seen = delivered.lock();
                    for message in &batch {
                        assert_eq!(
                            message.dequeue_count, 1,
                            "message {} delivered twice",
                            message.msg_id
                        );
                        assert!(
                            seen.insert(message.msg_id),
                            "message {} delivered twice",
                            message.msg_id
                        );
                        handles.push(message.receipt_handle.clone());
                    }
                }
                queue.batch_delete_message(&handles).await.unwrap();
            }
        }));
    }

    let mut sent = HashSet::new();
    for producer in producers {
        for id in producer.await.unwrap() {
            assert!(sent.insert(id), "message id {id} issued twice");
        }
    }
    for consumer in consumers {
        consumer.await.unwrap();
    }
    assert_eq!(sent.len(), total);
    assert_eq!(
        *delivered.lock(),
        sent,
        "every sent message delivered exactly once"
    );
    let attrs = setup.queue("shared").get_attributes().await.unwrap();
    assert_eq!(
        (
            attrs.active_msg_num,
            attrs.inactive_msg_num,
            attrs.delay_msg_num
        ),
        (0, 0, 0)
    );
    server.stop().await;
}
