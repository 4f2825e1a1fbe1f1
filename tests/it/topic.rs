//! Topics and subscriptions through the Rust client, over real TCP: fan-out to queue
//! subscriptions by tag and by binding key, CMQ's error codes, account isolation, and HTTP push
//! to a real HTTP server on 127.0.0.1 with retries driven by the broker's manual clock.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes as AxumBytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use cmqd::client::{
    Account, ClientConfig, QueueAttributeSet, SubscriptionAttributes, SubscriptionSpec,
    TopicAttributeSet,
};
use cmqd::clock::{Clock, ManualClock};
use cmqd::config::{AccountConfig, Limits};
use cmqd::server::{RunningServer, Server, ServerOptions};
use cmqd::storage::MemoryStorage;

use crate::support::{TestServer, ALICE};

fn code(error: &cmqd::client::Error) -> (u16, u16) {
    let code = error.code().expect("a CMQ error code");
    (code.code, code.module)
}

/// How many messages the queue holds ready now (receives and deletes them).
async fn drain(account: &Account, queue: &str) -> Vec<String> {
    let queue = account.queue(queue);
    let mut bodies = Vec::new();
    loop {
        match queue.batch_receive_message(16, Some(0)).await {
            Ok(messages) => {
                for m in messages {
                    bodies.push(String::from_utf8(m.body.to_vec()).unwrap());
                    queue.delete_message(&m.receipt_handle).await.unwrap();
                }
            }
            Err(error) if error.is_no_message() => return bodies,
            Err(error) => panic!("{error}"),
        }
    }
}

pub(crate) async fn queue_subscription(
    account: &Account,
    topic: &str,
    name: &str,
    spec: SubscriptionSpec,
) {
    account
        .create_queue(name, &QueueAttributeSet::default())
        .await
        .unwrap();
    account
        .subscription(topic, name)
        .create(&spec)
        .await
        .unwrap();
}

/// CMQ.md A.7's tag example: {apple, imac, iphone, macbook} reaches {apple}, {imac, xiaomi}
/// and the untagged subscription, not {xiaomi}; an untagged message reaches only the untagged.
#[tokio::test]
async fn tag_fan_out_to_queue_subscriptions() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let topic = alice.topic("gadgets");
    topic.create(&TopicAttributeSet::default()).await.unwrap();
    let subs: [(&str, &[&str]); 4] = [
        ("apple", &["apple"]),
        ("xiaomi", &["xiaomi"]),
        ("imac-or-xiaomi", &["imac", "xiaomi"]),
        ("everything", &[]),
    ];
    for (name, tags) in subs {
        queue_subscription(
            &alice,
            "gadgets",
            name,
            SubscriptionSpec::queue(name).filter_tags(tags.iter().copied()),
        )
        .await;
    }
    let id = topic
        .publish_message("launch", &["apple", "imac", "iphone", "macbook"], None)
        .await
        .unwrap();
    assert!(id > 0);
    let ids = topic
        .batch_publish_message(["plain-1", "plain-2"], &[], None)
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);

    assert_eq!(drain(&alice, "apple").await, ["launch"]);
    assert!(drain(&alice, "xiaomi").await.is_empty());
    assert_eq!(drain(&alice, "imac-or-xiaomi").await, ["launch"]);
    let mut all = drain(&alice, "everything").await;
    all.sort();
    assert_eq!(all, ["launch", "plain-1", "plain-2"]);

    let (total, subs) = topic.list_subscription("", 0, 0).await.unwrap();
    assert_eq!(total, 4);
    assert_eq!(subs[0].subscription_name, "apple");
    assert_eq!(
        (subs[0].protocol.as_str(), subs[0].endpoint.as_str()),
        ("queue", "apple")
    );
    let a = alice
        .subscription("gadgets", "apple")
        .get_attributes()
        .await
        .unwrap();
    assert_eq!((a.delivered_count, a.msg_count), (1, 0));
    assert_eq!(a.filter_tags, ["apple"]);

    // ClearSubscriptionFilterTags: xiaomi now receives everything.
    alice
        .subscription("gadgets", "xiaomi")
        .clear_filter_tags()
        .await
        .unwrap();
    topic.publish_message("any", &["pear"], None).await.unwrap();
    assert_eq!(drain(&alice, "xiaomi").await, ["any"]);
    assert!(drain(&alice, "apple").await.is_empty());

    let err = topic
        .publish_message("x", &["1", "2", "3", "4", "5", "6"], None)
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4000, 10720));
    server.stop().await;
}

/// CMQ.md A.7's routing-key examples through queue subscriptions over TCP.
#[tokio::test]
async fn binding_key_fan_out_to_queue_subscriptions() {
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
    let subs: [(&str, &[&str]); 4] = [
        ("star", &["1.*.0"]),
        ("hash", &["1.#.0"]),
        ("all", &["#"]),
        // Several keys match 1.x.0: still one copy.
        ("several", &["1.*.0", "1.#", "#.0"]),
    ];
    for (name, keys) in subs {
        queue_subscription(
            &alice,
            "routes",
            name,
            SubscriptionSpec::queue(name).binding_keys(keys.iter().copied()),
        )
        .await;
    }
    let topic = alice.topic("routes");
    topic
        .publish_message("a", &[], Some("1.x.0"))
        .await
        .unwrap();
    topic
        .publish_message("b", &[], Some("1.2.3.4.4.2.2.0"))
        .await
        .unwrap();
    topic.publish_message("c", &[], Some("1.0")).await.unwrap();
    topic
        .publish_message("d", &[], Some("other"))
        .await
        .unwrap();
    assert_eq!(drain(&alice, "star").await, ["a"]);
    assert_eq!(drain(&alice, "hash").await, ["a", "b", "c"]);
    assert_eq!(drain(&alice, "all").await, ["a", "b", "c", "d"]);
    assert_eq!(drain(&alice, "several").await, ["a", "b", "c"]);

    // A routing key is required; binding keys are checked as CMQ does.
    let err = topic.publish_message("x", &[], None).await.unwrap_err();
    assert_eq!(code(&err), (4000, 10010));
    let err = alice
        .subscription("routes", "no-keys")
        .create(&SubscriptionSpec::queue("all"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4000, 10710));
    let err = alice
        .subscription("routes", "six")
        .create(&SubscriptionSpec::queue("all").binding_keys(["a", "b", "c", "d", "e", "f"]))
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4000, 10680));
    server.stop().await;
}

#[tokio::test]
async fn topic_errors_and_lifecycle() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let topic = alice.topic("lonely_topic");
    let topic_id = topic.create(&TopicAttributeSet::default()).await.unwrap();
    let a = topic.get_attributes().await.unwrap();
    assert_eq!(a.topic_id, topic_id);
    assert_eq!(
        (a.filter_type, a.msg_retention_seconds, a.max_msg_size_bytes),
        (1, 86_400, 65_536)
    );

    // No subscription: 6030/10650.
    let err = topic.publish_message("x", &[], None).await.unwrap_err();
    assert_eq!(code(&err), (6030, 10650));
    let err = alice
        .create_topic("LONELY_TOPIC", &TopicAttributeSet::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4460, 10550));

    queue_subscription(
        &alice,
        "lonely_topic",
        "sink",
        SubscriptionSpec::queue("sink"),
    )
    .await;
    let err = alice
        .subscription("lonely_topic", "sink")
        .create(&SubscriptionSpec::queue("sink"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4490, 10470));
    // Deleting a topic with subscriptions is refused.
    let err = topic.delete().await.unwrap_err();
    assert_eq!(code(&err), (4000, 10540));
    let err = topic
        .set_attributes(&TopicAttributeSet {
            filter_type: Some(2),
            ..TopicAttributeSet::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4000, 10110));
    topic
        .set_attributes(&TopicAttributeSet {
            max_msg_size_bytes: Some(1024),
            ..TopicAttributeSet::default()
        })
        .await
        .unwrap();
    let err = topic
        .publish_message(vec![b'x'; 1025], &[], None)
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4400, 10230));

    alice
        .delete_subscribe("lonely_topic", "sink")
        .await
        .unwrap();
    let err = alice
        .subscription("lonely_topic", "sink")
        .get_attributes()
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4440, 10750));
    topic.delete().await.unwrap();
    let err = topic.get_attributes().await.unwrap_err();
    assert_eq!(code(&err), (4440, 10600));
    let (total, _) = alice.list_topic("", 0, 0).await.unwrap();
    assert_eq!(total, 0);
    server.stop().await;
}

#[tokio::test]
async fn accounts_are_isolated() {
    let server = TestServer::start().await;
    let alice = server.alice().await;
    let bob = server.bob().await;
    alice
        .create_topic("shared-name", &TopicAttributeSet::default())
        .await
        .unwrap();
    queue_subscription(
        &alice,
        "shared-name",
        "alice-queue",
        SubscriptionSpec::queue("alice-queue"),
    )
    .await;

    // Bob sees none of Alice's topics, and has a namespace of his own.
    assert_eq!(bob.list_topic("", 0, 0).await.unwrap().0, 0);
    let err = bob
        .topic("shared-name")
        .publish_message("x", &[], None)
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4440, 10600));
    bob.create_topic("shared-name", &TopicAttributeSet::default())
        .await
        .unwrap();
    // Bob cannot point a subscription at Alice's queue.
    let err = bob
        .subscription("shared-name", "steal")
        .create(&SubscriptionSpec::queue("alice-queue"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4440, 10100));
    let err = bob
        .subscription("shared-name", "alice-queue")
        .get_attributes()
        .await
        .unwrap_err();
    assert_eq!(code(&err), (4440, 10750));
    // Bob publishing to his topic reaches nothing of Alice's.
    assert_eq!(
        code(
            &bob.topic("shared-name")
                .publish_message("x", &[], None)
                .await
                .unwrap_err()
        ),
        (6030, 10650)
    );
    assert!(drain(&alice, "alice-queue").await.is_empty());
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP push.

/// One request the test endpoint received.
#[derive(Debug)]
struct Hit {
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// A real HTTP server on 127.0.0.1: records every request and answers with the next scripted
/// status (200 once the script runs out).
#[derive(Clone)]
struct Endpoint {
    hits: mpsc::UnboundedSender<Hit>,
    script: Arc<Mutex<VecDeque<u16>>>,
}

async fn record(
    State(endpoint): State<Endpoint>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: AxumBytes,
) -> StatusCode {
    let status = endpoint.script.lock().pop_front().unwrap_or(200);
    let _ = endpoint.hits.send(Hit {
        path: uri.path().to_string(),
        headers,
        body: body.to_vec(),
    });
    StatusCode::from_u16(status).unwrap()
}

struct HttpSink {
    base: String,
    hits: mpsc::UnboundedReceiver<Hit>,
    script: Arc<Mutex<VecDeque<u16>>>,
}

impl HttpSink {
    async fn start() -> Self {
        let (tx, hits) = mpsc::unbounded_channel();
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(record))
            .with_state(Endpoint {
                hits: tx,
                script: script.clone(),
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { base, hits, script }
    }

    fn answer(&self, statuses: &[u16]) {
        self.script.lock().extend(statuses);
    }

    async fn next(&mut self) -> Hit {
        tokio::time::timeout(Duration::from_secs(10), self.hits.recv())
            .await
            .expect("no push within 10 s")
            .expect("endpoint stopped")
    }
}

/// A broker whose clock moves only when the test says so.
async fn manual_clock_server() -> (RunningServer, ManualClock, Account) {
    let clock = ManualClock::new(1_700_000_000_000);
    let options = ServerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        limits: Limits::default(),
        accounts: vec![AccountConfig {
            name: "alice".into(),
            secret_id: ALICE.0.into(),
            secret_key: ALICE.1.into(),
        }],
    };
    let server = Server::bind_with(
        options,
        Arc::new(MemoryStorage::new()),
        Arc::new(clock.clone()),
    )
    .await
    .unwrap();
    let running = server.spawn().unwrap();
    let account = Account::connect(
        &running.addr().to_string(),
        ALICE.0,
        ALICE.1,
        ClientConfig::default(),
    )
    .await
    .unwrap();
    (running, clock, account)
}

/// Polls the subscription until `done` holds: the push task reports asynchronously.
async fn wait_for(
    account: &Account,
    topic: &str,
    name: &str,
    done: impl Fn(&SubscriptionAttributes) -> bool,
) -> SubscriptionAttributes {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = account
            .subscription(topic, name)
            .get_attributes()
            .await
            .unwrap();
        if done(&a) {
            return a;
        }
        assert!(tokio::time::Instant::now() < deadline, "stuck at {a:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn header<'h>(hit: &'h Hit, name: &str) -> &'h str {
    hit.headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn http_push_headers_and_both_body_formats() {
    let mut sink = HttpSink::start().await;
    let (server, clock, alice) = manual_clock_server().await;
    let topic = alice.topic("news");
    topic.create(&TopicAttributeSet::default()).await.unwrap();
    alice
        .subscription("news", "as-json")
        .create(&SubscriptionSpec::http(&format!("{}/json", sink.base)))
        .await
        .unwrap();
    alice
        .subscription("news", "as-text")
        .create(
            &SubscriptionSpec::http(&format!("{}/text", sink.base))
                .content_format("SIMPLIFIED")
                .filter_tags(["a"]),
        )
        .await
        .unwrap();
    let msg_id = topic
        .publish_message("hello \u{e9}", &["a", "b"], None)
        .await
        .unwrap();
    let mut hits = vec![sink.next().await, sink.next().await];
    hits.sort_by(|x, y| x.path.cmp(&y.path));
    let [json, text] = <[Hit; 2]>::try_from(hits).unwrap();
    assert_eq!((json.path.as_str(), text.path.as_str()), ("/json", "/text"));
    for hit in [&json, &text] {
        assert_eq!(header(hit, "content-type"), "text/plain");
        assert_eq!(
            header(hit, "user-agent"),
            "Qcloud Notification Service Agent"
        );
        assert_eq!(header(hit, "x-cmq-message-id"), msg_id.to_string());
        assert_eq!(header(hit, "x-cmq-message-tag"), "a, b");
        assert!(header(hit, "x-cmq-request-id").parse::<u64>().is_ok());
    }
    assert_ne!(
        header(&json, "x-cmq-request-id"),
        header(&text, "x-cmq-request-id")
    );
    assert_eq!(text.body, "hello \u{e9}".as_bytes());
    let document: serde_json::Value = serde_json::from_slice(&json.body).unwrap();
    assert_eq!(
        document,
        serde_json::json!({
            "TopicOwner": "alice",
            "topicName": "news",
            "subscriptionName": "as-json",
            "msgId": msg_id.to_string(),
            "msgBody": "hello \u{e9}",
            "publishTime": clock.now_ms() / 1000,
        })
    );
    let a = wait_for(&alice, "news", "as-json", |a| a.delivered_count == 1).await;
    assert_eq!(
        (a.msg_count, a.dropped_count, a.last_error.as_deref()),
        (0, 0, None)
    );
    assert_eq!(topic.get_attributes().await.unwrap().msg_count, 0);
    server.shutdown().await.unwrap();
}

/// EXPONENTIAL_DECAY_RETRY against an endpoint that fails twice: the broker's manual clock
/// decides when each retry is due (1 s, then 2 s after the failure); the third attempt
/// succeeds.
#[tokio::test]
async fn http_push_retries_on_the_manual_clock_until_the_endpoint_recovers() {
    let mut sink = HttpSink::start().await;
    sink.answer(&[500, 503]);
    let (server, clock, alice) = manual_clock_server().await;
    let topic = alice.topic("flaky");
    topic.create(&TopicAttributeSet::default()).await.unwrap();
    alice
        .subscription("flaky", "hook")
        .create(&SubscriptionSpec::http(&format!("{}/hook", sink.base)))
        .await
        .unwrap();
    let t0 = clock.now_ms();
    let msg_id = topic.publish_message("retry me", &[], None).await.unwrap();

    let first = sink.next().await;
    let a = wait_for(&alice, "flaky", "hook", |a| a.last_error.is_some()).await;
    assert_eq!(a.msg_count, 1);
    assert_eq!(
        a.next_retry_time_ms,
        t0 + 1_000,
        "first retry 1 s after the failure"
    );
    assert!(a.last_error.unwrap().contains("HTTP 500"));
    assert_eq!(a.last_error_time_ms, t0);
    assert_eq!(topic.get_attributes().await.unwrap().msg_count, 1);

    clock.advance_ms(1_000);
    let second = sink.next().await;
    let a = wait_for(&alice, "flaky", "hook", |a| {
        a.last_error
            .as_deref()
            .is_some_and(|e| e.contains("HTTP 503"))
    })
    .await;
    assert_eq!(a.next_retry_time_ms, t0 + 1_000 + 2_000, "then 2 s");

    clock.advance_ms(2_000);
    let third = sink.next().await;
    let a = wait_for(&alice, "flaky", "hook", |a| a.delivered_count == 1).await;
    assert_eq!(
        (a.msg_count, a.dropped_count, a.next_retry_time_ms),
        (0, 0, 0)
    );

    // The same message each time, a new request id per attempt.
    let ids: Vec<&str> = [&first, &second, &third]
        .iter()
        .map(|h| header(h, "x-cmq-message-id"))
        .collect();
    assert!(ids.iter().all(|id| *id == msg_id.to_string()));
    let requests: std::collections::HashSet<&str> = [&first, &second, &third]
        .iter()
        .map(|h| header(h, "x-cmq-request-id"))
        .collect();
    assert_eq!(requests.len(), 3);
    assert_eq!(topic.get_attributes().await.unwrap().msg_count, 0);
    server.shutdown().await.unwrap();
}

/// BACKOFF_RETRY: the first attempt and 3 retries, each 10-20 s after the failure before it,
/// then the message is dropped for the subscription.
#[tokio::test]
async fn http_push_backoff_retry_gives_up_after_three_retries() {
    let mut sink = HttpSink::start().await;
    sink.answer(&[500; 10]);
    let (server, clock, alice) = manual_clock_server().await;
    alice
        .create_topic("doomed", &TopicAttributeSet::default())
        .await
        .unwrap();
    alice
        .subscription("doomed", "hook")
        .create(&SubscriptionSpec::http(&format!("{}/down", sink.base)).backoff_retry())
        .await
        .unwrap();
    alice
        .topic("doomed")
        .publish_message("never delivered", &[], None)
        .await
        .unwrap();
    for attempt in 1..=4u64 {
        sink.next().await;
        if attempt == 4 {
            break;
        }
        let failures_seen = attempt;
        let a = wait_for(&alice, "doomed", "hook", |a| {
            a.last_error
                .as_deref()
                .is_some_and(|e| e.contains(&format!("attempt {failures_seen}:")))
        })
        .await;
        let wait = a.next_retry_time_ms - clock.now_ms();
        assert!(
            (10_000..=20_000).contains(&wait),
            "retry {attempt} is {wait} ms after the failure"
        );
        clock.advance_ms(wait);
    }
    let a = wait_for(&alice, "doomed", "hook", |a| a.dropped_count == 1).await;
    assert_eq!(
        (a.msg_count, a.delivered_count, a.next_retry_time_ms),
        (0, 0, 0)
    );
    assert!(a.last_error.unwrap().contains("dropped"));
    // Nothing is left to deliver, however far the clock goes.
    clock.advance_ms(3_600_000);
    let a = alice
        .subscription("doomed", "hook")
        .get_attributes()
        .await
        .unwrap();
    assert_eq!(a.msg_count, 0);
    assert!(sink.hits.try_recv().is_err(), "a fifth attempt was made");
    server.shutdown().await.unwrap();
}
