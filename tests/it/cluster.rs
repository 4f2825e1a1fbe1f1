//! What clients see of a cluster, with a fake `ClusterView` on brokers started in-process: a
//! follower answers NotLeader (with the leader's address) and touches nothing, ClusterStatus is
//! answered everywhere, the client follows redirects and fails over to other known brokers,
//! a streaming consumer binds again on the leader, and the HTTP API answers 6100.

use std::sync::Arc;
use std::time::Duration;

use cmqd::broker::{ClusterView, Redirect};
use cmqd::client::{Account, ClientConfig, ConsumeOptions, ErrorCode, QueueAttributeSet};
use cmqd::model::{ClusterNode, ClusterStatus, GroupStatus, ReplicationStatus};
use cmqd::protocol::{Reply, Request, Response};
use futures::StreamExt;
use parking_lot::Mutex;

use crate::support::{RawConn, TestServer, ALICE};

/// A cluster view the test steers: where the leader is (None: this node leads).
#[derive(Debug, Default)]
struct FakeView {
    redirect: Mutex<Option<Redirect>>,
    /// How often the broker looked at the view, and a wake-up for each look.
    looks: std::sync::atomic::AtomicUsize,
    looked: tokio::sync::Notify,
}

impl FakeView {
    fn set(&self, redirect: Option<Redirect>) {
        *self.redirect.lock() = redirect;
    }

    fn looks(&self) -> usize {
        self.looks.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the broker has looked at the view `n` times in all.
    async fn looked_at_least(&self, n: usize) {
        loop {
            let looked = self.looked.notified();
            tokio::pin!(looked);
            looked.as_mut().enable();
            if self.looks() >= n {
                return;
            }
            looked.await;
        }
    }
}

impl ClusterView for FakeView {
    fn redirect(&self) -> Option<Redirect> {
        self.looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.looked.notify_waiters();
        self.redirect.lock().clone()
    }

    fn status(&self) -> ClusterStatus {
        fake_status()
    }
}

fn fake_status() -> ClusterStatus {
    ClusterStatus {
        node_id: 2,
        nodes: vec![ClusterNode {
            id: 2,
            peer: "127.0.0.1:1".into(),
            api: "127.0.0.1:2".into(),
            http: String::new(),
        }],
        groups: vec![GroupStatus {
            group: 0,
            leader: Some(1),
            term: 3,
            role: "follower".into(),
            last_log_index: 10,
            committed: 9,
            applied: 9,
            digest: 0xabcd,
            voting: true,
            replication: vec![ReplicationStatus {
                node: 1,
                matched: None,
            }],
        }],
    }
}

fn to(leader: Option<&TestServer>, epoch: u64) -> Option<Redirect> {
    Some(Redirect {
        leader_api: leader.map(|server| server.addr().to_string()),
        leader_http: None,
        epoch,
    })
}

/// Puts a fake view on `server` and returns it for steering.
fn view(server: &TestServer) -> Arc<FakeView> {
    let view = Arc::new(FakeView::default());
    let shared: Arc<dyn ClusterView> = view.clone();
    server
        .running
        .shared()
        .cluster
        .set(shared)
        .expect("the view is set once");
    view
}

fn with_endpoints(endpoints: &[&TestServer]) -> ClientConfig {
    ClientConfig::default()
        .request_timeout(Duration::from_secs(10))
        .endpoints(endpoints.iter().map(|s| s.addr().to_string()).collect())
}

async fn queue_names(account: &Account) -> Vec<String> {
    let (_, queues) = account.list_queue("", 0, 100).await.unwrap();
    queues.into_iter().map(|q| q.queue_name).collect()
}

#[tokio::test]
async fn a_follower_answers_not_leader_with_the_address_and_touches_nothing() {
    let follower = TestServer::start().await;
    let view = view(&follower);
    view.set(Some(Redirect {
        leader_api: Some("10.9.8.7:7300".into()),
        leader_http: None,
        epoch: 3,
    }));
    let mut raw = RawConn::connect(follower.addr()).await;
    raw.handshake(ALICE).await;
    assert_eq!(
        raw.call(3, &Request::Ping).await,
        Response::Ok(Reply::Empty)
    );
    assert_eq!(
        raw.call(4, &Request::ClusterStatus).await,
        Response::Ok(Reply::ClusterStatus(Box::new(fake_status())))
    );
    let requests = [
        Request::CreateQueue {
            queue: "orders".into(),
            attributes: QueueAttributeSet::default(),
        },
        Request::ListQueue {
            search_word: String::new(),
            offset: 0,
            limit: 10,
        },
        Request::SendMessage {
            queue: "orders".into(),
            body: "x".into(),
            delay_seconds: 0,
        },
        Request::ReceiveMessage {
            queue: "orders".into(),
            polling_wait_seconds: Some(0),
        },
        Request::Consume {
            queue: "orders".into(),
            credit: 1,
            batch_max: 1,
            visibility_timeout_seconds: None,
        },
    ];
    for (id, request) in (10..).zip(requests) {
        let response = raw.call(id, &request).await;
        let Response::NotLeader {
            leader,
            epoch,
            message,
        } = response
        else {
            panic!("{request:?}: {response:?}");
        };
        assert_eq!((leader.as_str(), epoch), ("10.9.8.7:7300", 3));
        assert!(message.contains("10.9.8.7:7300"), "{message}");
    }
    // The leader unknown: an empty address.
    view.set(to(None, 4));
    let response = raw
        .call(
            20,
            &Request::GetQueueAttributes {
                queue: "orders".into(),
            },
        )
        .await;
    assert!(
        matches!(&response, Response::NotLeader { leader, epoch: 4, .. } if leader.is_empty()),
        "{response:?}"
    );
    // Nothing reached the engine: leading again, the node has no queue.
    view.set(None);
    assert_eq!(
        queue_names(&follower.alice().await).await,
        Vec::<String>::new()
    );
    follower.stop().await;
}

#[tokio::test]
async fn cluster_status_round_trips_and_a_single_node_says_it_is_not_a_cluster() {
    let single = TestServer::start().await;
    let status = single.alice().await.cluster_status().await.unwrap();
    assert!(status.is_single_node(), "{status:?}");
    assert_eq!(status, ClusterStatus::default());

    let node = TestServer::start().await;
    let view = view(&node);
    view.set(to(None, 3));
    // Answered by a follower too, over the client.
    let account = node.alice().await;
    assert_eq!(account.cluster_status().await.unwrap(), fake_status());
    single.stop().await;
    node.stop().await;
}

#[tokio::test]
async fn a_client_follows_the_redirect_and_sends_and_receives_on_the_leader() {
    let leader = TestServer::start().await;
    let follower = TestServer::start().await;
    let view = view(&follower);
    view.set(to(Some(&leader), 5));
    // Connected to the follower only: the redirect names the leader.
    let account = follower.alice().await;
    let queue = account.queue("orders");
    queue.create(&QueueAttributeSet::default()).await.unwrap();
    let msg_id = queue.send_message("hello", 0).await.unwrap();
    let message = queue.receive_message(Some(1)).await.unwrap();
    assert_eq!((message.msg_id, &message.body[..]), (msg_id, &b"hello"[..]));
    queue.delete_message(&message.receipt_handle).await.unwrap();
    // It all happened on the leader; the follower's engine was never touched.
    assert_eq!(queue_names(&leader.alice().await).await, vec!["orders"]);
    view.set(None);
    assert_eq!(
        queue_names(&follower.alice().await).await,
        Vec::<String>::new()
    );
    leader.stop().await;
    follower.stop().await;
}

#[tokio::test]
async fn a_send_pipeline_follows_the_redirect_and_stores_every_send_once_on_the_leader() {
    let leader = TestServer::start().await;
    let follower = TestServer::start().await;
    let leader_queue = leader.alice().await.queue("orders");
    leader_queue
        .create(&QueueAttributeSet::default())
        .await
        .unwrap();
    let view = view(&follower);
    // The follower leads at first: the pipeline's connection is there.
    let account = follower.alice().await;
    account
        .queue("orders")
        .create(&QueueAttributeSet::default())
        .await
        .unwrap();
    let mut pipeline = account.queue("orders").send_pipeline(16);
    for i in 0..20u32 {
        pipeline.send_message(format!("f{i}"), 0).await.unwrap();
    }
    assert_eq!(pipeline.flush().await.unwrap(), 20);
    // Leadership moves: sends in flight are answered NotLeader, sent again to the leader.
    view.set(to(Some(&leader), 5));
    for i in 0..100u32 {
        pipeline.send_message(format!("l{i}"), 0).await.unwrap();
    }
    let mut tickets = Vec::new();
    while let Some(sent) = pipeline.next().await {
        sent.result.unwrap();
        tickets.push(sent.ticket);
    }
    assert_eq!(tickets, (20..120).collect::<Vec<u64>>());
    assert_eq!(
        leader_queue.get_attributes().await.unwrap().active_msg_num,
        100
    );
    view.set(None);
    assert_eq!(
        follower
            .alice()
            .await
            .queue("orders")
            .get_attributes()
            .await
            .unwrap()
            .active_msg_num,
        20
    );
    leader.stop().await;
    follower.stop().await;
}

#[tokio::test]
async fn without_a_known_leader_the_client_tries_its_other_endpoints() {
    let leader = TestServer::start().await;
    let follower = TestServer::start().await;
    view(&follower).set(to(None, 2));
    let account = Account::connect(
        &follower.addr().to_string(),
        ALICE.0,
        ALICE.1,
        with_endpoints(&[&leader]),
    )
    .await
    .unwrap();
    account
        .create_queue("orders", &QueueAttributeSet::default())
        .await
        .unwrap();
    assert_eq!(queue_names(&leader.alice().await).await, vec!["orders"]);
    leader.stop().await;
    follower.stop().await;
}

#[tokio::test]
async fn a_request_waits_out_an_election_longer_than_the_redirect_limit() {
    let node = TestServer::start().await;
    let view = view(&node);
    // No leader known (an election under way), for more tries than the redirect limit.
    view.set(to(None, 3));
    let account = node
        .connect(
            crate::support::ALICE,
            ClientConfig::default().request_timeout(Duration::from_secs(20)),
        )
        .await;
    let elected = {
        let view = view.clone();
        tokio::spawn(async move {
            view.looked_at_least(cmqd::limits::cluster::CLIENT_REDIRECTS_MAX + 4)
                .await;
            // This node wins the election.
            view.set(None);
        })
    };
    account
        .create_queue("orders", &QueueAttributeSet::default())
        .await
        .unwrap();
    elected.await.unwrap();
    assert_eq!(queue_names(&account).await, vec!["orders"]);
    node.stop().await;
}

#[tokio::test]
async fn two_nodes_naming_each_other_end_in_not_leader_after_a_bounded_number_of_redirects() {
    let a = TestServer::start().await;
    let b = TestServer::start().await;
    view(&a).set(to(Some(&b), 1));
    view(&b).set(to(Some(&a), 1));
    let account = a.alice().await;
    let error = account
        .create_queue("orders", &QueueAttributeSet::default())
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NOT_LEADER), "{error}");
    assert!(error.message().contains("redirects"), "{error}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_consumer_binds_again_on_the_leader_when_its_node_stops_leading() {
    let first = TestServer::start().await;
    let second = TestServer::start().await;
    let first_view = view(&first);
    let attributes = QueueAttributeSet::default();
    first
        .alice()
        .await
        .create_queue("orders", &attributes)
        .await
        .unwrap();
    second
        .alice()
        .await
        .create_queue("orders", &attributes)
        .await
        .unwrap();
    let account = first.alice().await;
    let mut consumer = account
        .queue("orders")
        .consume(ConsumeOptions::new().credit(4))
        .await
        .unwrap();
    first.wait_for_consumers(1).await;
    // Leadership moves to `second`: the consumer on `first` ends with NotLeader at its next
    // look at the queue (a recheck), and binds again where the redirect points.
    // The consumer binds again as its stream is polled.
    first_view.set(to(Some(&second), 2));
    let next = tokio::spawn(async move {
        let delivery = consumer.next().await;
        (consumer, delivery)
    });
    second.wait_for_consumers(1).await;
    first.wait_for_consumers(0).await;
    let msg_id = second
        .alice()
        .await
        .queue("orders")
        .send_message("after the move", 0)
        .await
        .unwrap();
    let (consumer, delivery) = tokio::time::timeout(Duration::from_secs(30), next)
        .await
        .expect("a delivery from the new leader")
        .unwrap();
    let delivery = delivery.expect("the stream goes on").expect("no error");
    assert_eq!(delivery.msg_id(), msg_id);
    delivery.ack().await.unwrap();
    drop(consumer);
    second.wait_for_consumers(0).await;
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_consumer_binds_again_on_another_endpoint_when_its_connection_breaks() {
    let first = TestServer::start().await;
    let second = TestServer::start().await;
    for server in [&first, &second] {
        server
            .alice()
            .await
            .create_queue("orders", &QueueAttributeSet::default())
            .await
            .unwrap();
    }
    let account = Account::connect(
        &first.addr().to_string(),
        ALICE.0,
        ALICE.1,
        with_endpoints(&[&second]),
    )
    .await
    .unwrap();
    let mut consumer = account
        .queue("orders")
        .consume(ConsumeOptions::new())
        .await
        .unwrap();
    first.wait_for_consumers(1).await;
    let next = tokio::spawn(async move {
        let delivery = consumer.next().await;
        (consumer, delivery)
    });
    first.stop().await;
    second.wait_for_consumers(1).await;
    let msg_id = second
        .alice()
        .await
        .queue("orders")
        .send_message("hello", 0)
        .await
        .unwrap();
    let (_consumer, delivery) = tokio::time::timeout(Duration::from_secs(30), next)
        .await
        .expect("a delivery")
        .unwrap();
    let delivery = delivery.expect("the stream goes on").expect("no error");
    assert_eq!(delivery.msg_id(), msg_id);
    second.stop().await;
}

#[tokio::test]
async fn a_send_whose_connection_broke_is_not_sent_again_but_a_receive_is() {
    let (hole, swallowed) = crate::support::swallowing_broker(true).await;
    let leader = TestServer::start().await;
    let queue = leader.alice().await.queue("orders");
    queue.create(&QueueAttributeSet::default()).await.unwrap();
    queue.send_message("waiting", 0).await.unwrap();
    let account = Account::connect(
        &hole.to_string(),
        ALICE.0,
        ALICE.1,
        with_endpoints(&[&leader]),
    )
    .await
    .unwrap();
    let error = account
        .queue("orders")
        .send_message("once", 0)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), cmqd::client::ErrorKind::Connection, "{error}");
    assert_eq!(swallowed.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Not sent again anywhere: the leader holds only the message it had.
    assert_eq!(queue.get_attributes().await.unwrap().active_msg_num, 1);
    // A receive is harmless to repeat: after the black hole swallows it, it goes to the next
    // endpoint and gets the message.
    let account = Account::connect(
        &hole.to_string(),
        ALICE.0,
        ALICE.1,
        with_endpoints(&[&leader]),
    )
    .await
    .unwrap();
    let message = account
        .queue("orders")
        .receive_message(Some(0))
        .await
        .unwrap();
    assert_eq!(&message.body[..], b"waiting");
    assert_eq!(swallowed.load(std::sync::atomic::Ordering::SeqCst), 2);
    leader.stop().await;
}

/// Queues on `broker` (account ALICE).
async fn reply_count(broker: &crate::http_api::HttpBroker) -> u64 {
    let reply = broker.client(ALICE).call("ListQueue", &[]).await;
    reply["totalCount"].as_u64().unwrap()
}

#[tokio::test]
async fn the_http_api_of_a_follower_forwards_to_the_leader_and_rides_out_elections() {
    use crate::http_api::{assert_ok, HttpBroker};
    let leader = HttpBroker::start().await;
    let follower = HttpBroker::start().await;
    let view = view(&follower.server);
    view.set(Some(Redirect {
        leader_api: Some(leader.server.addr().to_string()),
        leader_http: Some(leader.addr.to_string()),
        epoch: 6,
    }));
    // Through the follower, the change is made on the leader, and the leader's answer comes back.
    let via_follower = follower.client(ALICE);
    assert_ok(
        &via_follower
            .call("CreateQueue", &[("queueName", "orders")])
            .await,
    );
    let reply = leader.client(ALICE).call("ListQueue", &[]).await;
    assert_ok(&reply);
    assert_eq!(reply["totalCount"], 1, "{reply}");
    let reply = via_follower.call("ListQueue", &[]).await;
    assert_eq!(reply["totalCount"], 1, "{reply}");

    // An election: the request waits for a leader instead of failing the SDK's call; here the
    // old leader's address refuses connections (it died) until the view names the new one.
    // The view changes once the request is waiting: once the follower has looked at it three
    // times (on arrival, on starting to wait or after the refusal, and in the wait).
    let gone = crate::cluster_support::free_port().to_string();
    let steer = |redirect: Option<Redirect>| {
        let view = Arc::clone(&view);
        let waiting = view.looks() + 3;
        tokio::spawn(async move {
            view.looked_at_least(waiting).await;
            view.set(redirect);
        })
    };
    for first in [None, Some(gone.clone())] {
        view.set(Some(Redirect {
            leader_api: None,
            leader_http: first,
            epoch: 7,
        }));
        let elected = steer(Some(Redirect {
            leader_api: Some(leader.server.addr().to_string()),
            leader_http: Some(leader.addr.to_string()),
            epoch: 8,
        }));
        let name = format!("waited-{}", reply_count(&leader).await);
        assert_ok(
            &via_follower
                .call("CreateQueue", &[("queueName", &name)])
                .await,
        );
        elected.await.unwrap();
    }
    assert_eq!(reply_count(&leader).await, 3);
    // This node elected while a request waits: it serves it itself.
    view.set(Some(Redirect {
        leader_api: None,
        leader_http: None,
        epoch: 9,
    }));
    let elected = steer(None);
    assert_ok(
        &via_follower
            .call("CreateQueue", &[("queueName", "here")])
            .await,
    );
    elected.await.unwrap();
    // ... also when it was elected after the old leader refused the request (the body was
    // already read then).
    view.set(Some(Redirect {
        leader_api: None,
        leader_http: Some(gone),
        epoch: 10,
    }));
    let elected = steer(None);
    assert_ok(
        &via_follower
            .call("SendMessage", &[("queueName", "here"), ("msgBody", "kept")])
            .await,
    );
    elected.await.unwrap();
    let reply = via_follower
        .call(
            "ReceiveMessage",
            &[("queueName", "here"), ("pollingWaitSeconds", "0")],
        )
        .await;
    assert_eq!(reply["msgBody"], "kept", "{reply}");
    let reply = via_follower.call("ListQueue", &[]).await;
    assert_eq!(
        reply["totalCount"], 1,
        "only the follower's own queue: {reply}"
    );
    follower.stop().await;
    leader.stop().await;
}

#[tokio::test]
async fn a_long_poll_waiting_when_leadership_moves_ends_with_not_leader() {
    let node = TestServer::start().await;
    let view = view(&node);
    node.alice()
        .await
        .create_queue("orders", &QueueAttributeSet::default())
        .await
        .unwrap();
    let mut raw = RawConn::connect(node.addr()).await;
    raw.handshake(ALICE).await;
    let receive = Request::ReceiveMessage {
        queue: "orders".into(),
        polling_wait_seconds: Some(1),
    };
    raw.send(3, &receive).await;
    node.wait_for_waiters(1).await;
    view.set(to(None, 8));
    // The wait ends (at its deadline at the latest) with NotLeader, not with "no message".
    let (id, response) = raw.recv().await;
    assert_eq!(id, 3);
    assert!(
        matches!(&response, Response::NotLeader { epoch: 8, .. }),
        "{response:?}"
    );
    node.stop().await;
}
