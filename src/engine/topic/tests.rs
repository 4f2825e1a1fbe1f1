//! Unit tests of topics and subscriptions on explicit times: the whole day of an
//! EXPONENTIAL_DECAY_RETRY schedule runs in microseconds. One test per rule of CMQ.md A.3, A.4,
//! A.7 and A.8 and of the decisions table.

use std::fmt;
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::engine::bodies::held_cost;
use crate::engine::{EngineConfig, ReceiveOutcome};
use crate::model::{
    QueueAttributeSet, SubscriptionAttributeSet, SubscriptionAttributes, SubscriptionSpec,
};

/// A delivery that succeeded, for `Engine::push_result`.
const DELIVERED: Result<(), &str> = Ok(());

const T0: Millis = 1_700_000_000_000;
const ACC: &str = "acct";
const SECOND: Millis = 1000;
const DAY: Millis = 86_400 * SECOND;

fn engine() -> Engine {
    Engine::new(EngineConfig::default())
}

fn code<T: fmt::Debug>(result: Result<T, CmqError>) -> (u16, u16) {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => (e.code.code, e.code.module),
    }
}

fn topic(e: &Engine, name: &str, filter_type: u8) -> u64 {
    let attrs = TopicAttributeSet {
        filter_type: Some(filter_type),
        ..TopicAttributeSet::default()
    };
    e.create_topic(ACC, name, &attrs, T0, &mut Vec::new())
        .unwrap()
}

fn queue(e: &Engine, name: &str) {
    e.create_queue(
        ACC,
        name,
        &QueueAttributeSet::default(),
        T0,
        &mut Vec::new(),
    )
    .unwrap();
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn queue_spec(endpoint: &str, tags: &[&str], keys: &[&str]) -> SubscriptionSpec {
    SubscriptionSpec {
        protocol: "queue".into(),
        endpoint: endpoint.into(),
        filter_tags: strings(tags),
        binding_keys: strings(keys),
        ..SubscriptionSpec::default()
    }
}

fn http_spec(strategy: &str) -> SubscriptionSpec {
    SubscriptionSpec {
        protocol: "http".into(),
        endpoint: "http://127.0.0.1:9/push".into(),
        notify_strategy: Some(strategy.into()),
        ..SubscriptionSpec::default()
    }
}

fn subscribe(e: &Engine, t: &str, name: &str, spec: &SubscriptionSpec) -> Result<u64, CmqError> {
    e.subscribe(ACC, t, name, spec, T0, &mut Vec::new())
}

fn publish(
    e: &Engine,
    t: &str,
    tags: &[&str],
    key: Option<&str>,
    now: Millis,
) -> Result<Published, CmqError> {
    e.publish(
        ACC,
        t,
        &[Bytes::from_static(b"body")],
        &strings(tags),
        key,
        now,
        &mut Vec::new(),
    )
}

fn ready(e: &Engine, q: &str) -> usize {
    match e.receive(ACC, q, 16, T0, &mut Vec::new()).unwrap() {
        ReceiveOutcome::Messages(m) => m.len(),
        ReceiveOutcome::Empty { .. } => 0,
    }
}

fn sub_attrs(e: &Engine, t: &str, s: &str) -> SubscriptionAttributes {
    e.subscription_attributes(ACC, t, s).unwrap()
}

#[test]
fn topic_lifecycle_names_and_attributes() {
    let e = engine();
    let id = topic(&e, "My_Topic-1", FILTER_TYPE_TAG);
    let a = e.topic_attributes(ACC, "my_topic-1").unwrap();
    assert_eq!(a.topic_id, id);
    assert_eq!(a.topic_name, "My_Topic-1");
    assert_eq!(a.max_msg_size_bytes, 65_536);
    assert_eq!(a.msg_retention_seconds, 86_400);
    assert_eq!(a.filter_type, 1);
    assert_eq!(a.msg_count, 0);
    assert_eq!((a.create_time_ms, a.last_modify_time_ms), (T0, T0));

    let mut out = Vec::new();
    let none = TopicAttributeSet::default();
    assert_eq!(
        code(e.create_topic(ACC, "MY_TOPIC-1", &none, T0, &mut out)),
        (4460, 10550)
    );
    for bad in ["", "1abc", "a b", "a.b", &"a".repeat(65)] {
        assert_eq!(
            code(e.create_topic(ACC, bad, &none, T0, &mut out)),
            (4000, 10580),
            "{bad:?}"
        );
    }
    let bad_size = TopicAttributeSet {
        max_msg_size_bytes: Some(1023),
        ..none.clone()
    };
    assert_eq!(
        code(e.create_topic(ACC, "t2", &bad_size, T0, &mut out)),
        (4000, 10350)
    );
    let bad_type = TopicAttributeSet {
        filter_type: Some(3),
        ..none.clone()
    };
    assert_eq!(
        code(e.create_topic(ACC, "t2", &bad_type, T0, &mut out)),
        (4000, 10110)
    );

    // maxMsgSize changes; filterType cannot.
    let bigger = TopicAttributeSet {
        max_msg_size_bytes: Some(2048),
        ..none.clone()
    };
    e.set_topic_attributes(ACC, "my_topic-1", &bigger, T0 + SECOND, &mut out)
        .unwrap();
    let a = e.topic_attributes(ACC, "My_Topic-1").unwrap();
    assert_eq!(a.max_msg_size_bytes, 2048);
    assert_eq!(a.last_modify_time_ms, T0 + SECOND);
    let retype = TopicAttributeSet {
        filter_type: Some(2),
        ..none.clone()
    };
    assert_eq!(
        code(e.set_topic_attributes(ACC, "My_Topic-1", &retype, T0, &mut out)),
        (4000, 10110)
    );

    // Listing: sorted, searched, paged.
    for name in ["beta", "alpha-1", "alpha-2"] {
        topic(&e, name, FILTER_TYPE_TAG);
    }
    let (total, page) = e.list_topics(ACC, "ALPHA", 0, 0).unwrap();
    assert_eq!(total, 2);
    let names: Vec<_> = page.iter().map(|t| t.topic_name.as_str()).collect();
    assert_eq!(names, ["alpha-1", "alpha-2"]);
    let (total, page) = e.list_topics(ACC, "", 1, 2).unwrap();
    assert_eq!(total, 4);
    let names: Vec<_> = page.iter().map(|t| t.topic_name.as_str()).collect();
    assert_eq!(names, ["alpha-2", "beta"]);
    assert_eq!(code(e.list_topics(ACC, "", 0, 1001)), (4000, 10350));
    assert_eq!(e.list_topics("other", "", 0, 0).unwrap().0, 0);

    // Delete: refused with a subscription, allowed without, and the name is free at once.
    queue(&e, "q");
    subscribe(&e, "beta", "s", &queue_spec("q", &[], &[])).unwrap();
    assert_eq!(
        code(e.delete_topic(ACC, "beta", T0, &mut out)),
        (4000, 10540)
    );
    e.unsubscribe(ACC, "beta", "S", T0, &mut out).unwrap();
    e.delete_topic(ACC, "BETA", T0, &mut out).unwrap();
    assert_eq!(code(e.topic_attributes(ACC, "beta")), (4440, 10600));
    assert_eq!(
        code(e.delete_topic(ACC, "beta", T0, &mut out)),
        (4440, 10600)
    );
    topic(&e, "beta", FILTER_TYPE_ROUTING_KEY);
    assert_eq!(e.topic_count(), 4);

    assert!(matches!(
        out.first(),
        Some(Mutation::TopicCreated { .. }) | Some(Mutation::TopicAttributesSet { .. })
    ));
    assert!(out
        .iter()
        .any(|m| matches!(m, Mutation::TopicDeleted { name, .. } if &**name == "beta")));
}

#[test]
fn topics_per_account_and_subscriptions_per_topic_are_capped() {
    let e = engine().with_topic_config(TopicConfig {
        topics_per_account_max: 2,
        subscriptions_per_topic_max: 2,
        ..TopicConfig::default()
    });
    topic(&e, "a", 1);
    topic(&e, "b", 1);
    let none = TopicAttributeSet::default();
    assert_eq!(
        code(e.create_topic(ACC, "c", &none, T0, &mut Vec::new())),
        (4450, 10610)
    );
    // Another account has its own quota.
    e.create_topic("other", "c", &none, T0, &mut Vec::new())
        .unwrap();
    queue(&e, "q");
    subscribe(&e, "a", "s1", &queue_spec("q", &[], &[])).unwrap();
    subscribe(&e, "a", "s2", &queue_spec("q", &[], &[])).unwrap();
    assert_eq!(
        code(subscribe(&e, "a", "s3", &queue_spec("q", &[], &[]))),
        (4500, 10480)
    );
}

#[test]
fn subscribe_validates_as_cmq_does() {
    let e = engine();
    topic(&e, "tags", FILTER_TYPE_TAG);
    topic(&e, "keys", FILTER_TYPE_ROUTING_KEY);
    queue(&e, "q");
    let http = |endpoint: &str| SubscriptionSpec {
        protocol: "http".into(),
        endpoint: endpoint.into(),
        ..SubscriptionSpec::default()
    };
    let cases: Vec<(&str, SubscriptionSpec, (u16, u16))> = vec![
        ("bad name", queue_spec("q", &[], &[]), (4000, 10620)),
        (
            "s",
            SubscriptionSpec {
                protocol: "smtp".into(),
                ..queue_spec("q", &[], &[])
            },
            (4000, 10510),
        ),
        ("s", http("http://exa mple.com/"), (4510, 10570)),
        ("s", http("https://example.com/"), (4000, 10500)),
        ("s", http("example.com/push"), (4000, 10500)),
        ("s", http("http://user@example.com/"), (4000, 10500)),
        ("s", http("http://bad_host!/"), (4000, 10500)),
        ("s", http("http://example.com:99999/"), (4000, 10500)),
        (
            "s",
            http(&format!("http://e.com/{}", "x".repeat(500))),
            (4000, 10500),
        ),
        ("s", queue_spec("9bad", &[], &[]), (4000, 10630)),
        ("s", queue_spec("missing", &[], &[]), (4440, 10100)),
        (
            "s",
            SubscriptionSpec {
                notify_content_format: Some("JSON".into()),
                ..queue_spec("q", &[], &[])
            },
            (4000, 10640),
        ),
        (
            "s",
            SubscriptionSpec {
                notify_strategy: Some("SOMETIMES".into()),
                ..queue_spec("q", &[], &[])
            },
            (4000, 10520),
        ),
        (
            "s",
            SubscriptionSpec {
                notify_content_format: Some("XML".into()),
                ..http("http://example.com/")
            },
            (4000, 10530),
        ),
        (
            "s",
            queue_spec("q", &["a", "b", "c", "d", "e", "f"], &[]),
            (4000, 10490),
        ),
        (
            "s",
            queue_spec("q", &["a".repeat(17).as_str()], &[]),
            (4000, 10350),
        ),
        ("s", queue_spec("q", &[""], &[]), (4000, 10350)),
        (
            "s",
            queue_spec("q", &[], &["a", "b", "c", "d", "e", "f"]),
            (4000, 10680),
        ),
        (
            "s",
            queue_spec("q", &[], &[vec!["w"; 17].join(".").as_str()]),
            (4000, 10691),
        ),
        ("s", queue_spec("q", &[], &["a..b"]), (4000, 10110)),
        (
            "s",
            queue_spec("q", &[], &["x".repeat(65).as_str()]),
            (4000, 10350),
        ),
    ];
    for (name, spec, expected) in cases {
        assert_eq!(
            code(subscribe(&e, "tags", name, &spec)),
            expected,
            "{spec:?}"
        );
    }
    // A filterType 2 topic needs a binding key.
    assert_eq!(
        code(subscribe(&e, "keys", "s", &queue_spec("q", &["tag"], &[]))),
        (4000, 10710)
    );
    assert_eq!(
        code(subscribe(&e, "nope", "s", &queue_spec("q", &[], &[]))),
        (4440, 10600)
    );

    // The good ones, and their defaults.
    subscribe(&e, "tags", "s", &queue_spec("q", &["a"], &[])).unwrap();
    assert_eq!(
        code(subscribe(&e, "tags", "S", &queue_spec("q", &[], &[]))),
        (4490, 10470)
    );
    let a = sub_attrs(&e, "tags", "s");
    assert_eq!(
        (
            a.protocol.as_str(),
            a.notify_strategy.as_str(),
            a.notify_content_format.as_str()
        ),
        ("queue", "EXPONENTIAL_DECAY_RETRY", "SIMPLIFIED")
    );
    assert_eq!(a.topic_owner, ACC);
    for ok in [
        "http://example.com",
        "http://127.0.0.1:8080/push?x=1",
        "http://[::1]:80/p",
        "HTTP://a-b.example.com/",
    ] {
        let name = format!("h{}", ok.len());
        subscribe(&e, "tags", &name, &http(ok)).unwrap();
        let a = sub_attrs(&e, "tags", &name);
        assert_eq!(a.notify_content_format, "JSON", "{ok}");
        assert_eq!(a.endpoint, ok);
    }
    let (total, page) = e.list_subscriptions(ACC, "tags", "", 0, 0).unwrap();
    assert_eq!(total, 5);
    assert_eq!(page[4].subscription_name, "s");
    assert_eq!(page[4].protocol, "queue");
    assert_eq!(page[4].endpoint, "q");
    // h17, h18 (the names carry the endpoint's length).
    assert_eq!(e.list_subscriptions(ACC, "tags", "H1", 0, 0).unwrap().0, 2);
}

/// CMQ.md A.7's worked example: a message tagged {apple, imac, iphone, macbook} reaches the
/// subscriptions filtering on {apple}, {imac, xiaomi} and nothing, not the one on {xiaomi}; an
/// untagged message reaches only the untagged subscription.
#[test]
fn tag_fan_out_follows_a7() {
    let e = engine();
    topic(&e, "t", FILTER_TYPE_TAG);
    let subs: [(&str, &[&str]); 4] = [
        ("apple", &["apple"]),
        ("xiaomi", &["xiaomi"]),
        ("imac-xiaomi", &["imac", "xiaomi"]),
        ("all", &[]),
    ];
    for (name, tags) in subs {
        queue(&e, name);
        subscribe(&e, "t", name, &queue_spec(name, tags, &[])).unwrap();
    }
    let mut out = Vec::new();
    let published = e
        .publish(
            ACC,
            "t",
            &[Bytes::from_static(b"m1"), Bytes::from_static(b"m2")],
            &strings(&["apple", "imac", "iphone", "macbook"]),
            None,
            T0,
            &mut out,
        )
        .unwrap();
    assert_eq!(published.msg_ids.len(), 2);
    assert_eq!(published.matched, 3);
    // One MessageSent per message per matching queue, each copy with an id of its own.
    let sent: Vec<(&str, u64)> = out
        .iter()
        .filter_map(|m| match m {
            Mutation::MessageSent { queue, msg_id, .. } => Some((&**queue, *msg_id)),
            _ => None,
        })
        .collect();
    assert_eq!(sent.len(), 6);
    let mut ids: Vec<u64> = sent.iter().map(|(_, id)| *id).collect();
    ids.extend(&published.msg_ids);
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 8, "every copy and every publish has its own id");
    assert_eq!(
        [
            ready(&e, "apple"),
            ready(&e, "xiaomi"),
            ready(&e, "imac-xiaomi"),
            ready(&e, "all")
        ],
        [2, 0, 2, 2]
    );

    publish(&e, "t", &[], None, T0).unwrap();
    assert_eq!(
        [
            ready(&e, "apple"),
            ready(&e, "xiaomi"),
            ready(&e, "imac-xiaomi"),
            ready(&e, "all")
        ],
        [0, 0, 0, 1]
    );
    let a = sub_attrs(&e, "t", "apple");
    assert_eq!((a.delivered_count, a.dropped_count, a.msg_count), (2, 0, 0));

    // ClearSubscriptionFilterTags: the subscription now receives everything.
    e.clear_subscription_filter_tags(ACC, "t", "xiaomi", T0, &mut Vec::new())
        .unwrap();
    assert!(sub_attrs(&e, "t", "xiaomi").filter_tags.is_empty());
    publish(&e, "t", &["nothing-else"], None, T0).unwrap();
    assert_eq!(ready(&e, "xiaomi"), 1);
    assert_eq!(ready(&e, "apple"), 0);

    // SetSubscriptionAttributes moves a subscription to other tags.
    let changes = SubscriptionAttributeSet {
        filter_tags: Some(strings(&["pear"])),
        ..SubscriptionAttributeSet::default()
    };
    e.set_subscription_attributes(ACC, "t", "apple", &changes, T0 + SECOND, &mut Vec::new())
        .unwrap();
    publish(&e, "t", &["apple"], None, T0).unwrap();
    assert_eq!(ready(&e, "apple"), 0);
    publish(&e, "t", &["pear"], None, T0).unwrap();
    assert_eq!(ready(&e, "apple"), 1);
    assert_eq!(sub_attrs(&e, "t", "apple").last_modify_time_ms, T0 + SECOND);

    // Tag limits on publish.
    assert_eq!(
        code(publish(&e, "t", &["a", "b", "c", "d", "e", "f"], None, T0)),
        (4000, 10720)
    );
    assert_eq!(
        code(publish(&e, "t", &["a".repeat(17).as_str()], None, T0)),
        (4000, 10350)
    );
}

/// CMQ.md A.7's routing-key examples through real queue subscriptions, and one message per
/// subscription however many of its keys match.
#[test]
fn binding_key_fan_out_follows_a7() {
    let e = engine();
    topic(&e, "t", FILTER_TYPE_ROUTING_KEY);
    let subs: [(&str, &[&str]); 4] = [
        ("star", &["1.*.0"]),
        ("hash", &["1.#.0"]),
        ("all", &["#"]),
        ("many", &["1.*.0", "1.#", "#.0", "1.x.0", "2.#"]),
    ];
    for (name, keys) in subs {
        queue(&e, name);
        subscribe(&e, "t", name, &queue_spec(name, &[], keys)).unwrap();
    }
    let counts = |e: &Engine| {
        [
            ready(e, "star"),
            ready(e, "hash"),
            ready(e, "all"),
            ready(e, "many"),
        ]
    };
    publish(&e, "t", &[], Some("1.x.0"), T0).unwrap();
    assert_eq!(counts(&e), [1, 1, 1, 1]);
    publish(&e, "t", &[], Some("1.2.3.4.4.2.2.0"), T0).unwrap();
    assert_eq!(counts(&e), [0, 1, 1, 1]);
    publish(&e, "t", &[], Some("1.0"), T0).unwrap();
    assert_eq!(counts(&e), [0, 1, 1, 1]);
    publish(&e, "t", &[], Some("anything"), T0).unwrap();
    assert_eq!(counts(&e), [0, 0, 1, 0]);

    // A routing key is required here; tags are ignored.
    assert_eq!(code(publish(&e, "t", &["x"], None, T0)), (4000, 10010));
    let sixteen_dots = vec!["w"; 17].join(".");
    assert_eq!(
        code(publish(&e, "t", &[], Some(&sixteen_dots), T0)),
        (4000, 10691)
    );
    assert_eq!(code(publish(&e, "t", &[], Some("a..b"), T0)), (4000, 10110));
    // The last binding key cannot be taken away.
    let changes = SubscriptionAttributeSet {
        binding_keys: Some(Vec::new()),
        ..SubscriptionAttributeSet::default()
    };
    assert_eq!(
        code(e.set_subscription_attributes(ACC, "t", "all", &changes, T0, &mut Vec::new())),
        (4000, 10710)
    );
}

#[test]
fn publish_outcomes() {
    let e = engine();
    topic(&e, "t", FILTER_TYPE_TAG);
    assert_eq!(code(publish(&e, "t", &[], None, T0)), (6030, 10650));
    assert_eq!(code(publish(&e, "nope", &[], None, T0)), (4440, 10600));
    queue(&e, "q");
    subscribe(&e, "t", "s", &queue_spec("q", &["only"], &[])).unwrap();

    // Matching nothing is a success, counted as unrouted.
    let published = publish(&e, "t", &["other"], None, T0).unwrap();
    assert_eq!(published.matched, 0);
    let stats = e.topic_stats();
    assert_eq!((stats.published, stats.unrouted), (1, 1));

    let mut out = Vec::new();
    assert_eq!(
        code(e.publish(ACC, "t", &[], &[], None, T0, &mut out)),
        (4000, 10370)
    );
    assert_eq!(
        code(e.publish(ACC, "t", &[Bytes::new()], &[], None, T0, &mut out)),
        (4000, 10120)
    );
    let big = Bytes::from(vec![b'x'; 65_537]);
    assert_eq!(
        code(e.publish(ACC, "t", &[big], &[], None, T0, &mut out)),
        (4400, 10230)
    );

    // The endpoint queue deleted after Subscribe: the publish succeeds, the failure is
    // counted on the subscription.
    e.delete_queue(ACC, "q", T0, &mut out).unwrap();
    publish(&e, "t", &["only"], None, T0).unwrap();
    let a = sub_attrs(&e, "t", "s");
    assert_eq!((a.delivered_count, a.dropped_count), (0, 1));
    assert!(a.last_error.unwrap().contains("does not exist"));
    assert_eq!(a.last_error_time_ms, T0);
    assert_eq!(e.topic_stats().queue_delivery_failures, 1);
    assert_eq!(
        e.stored_body_bytes(),
        0,
        "the failed copy's memory is given back"
    );
}

#[test]
fn accounts_are_isolated() {
    let e = engine();
    topic(&e, "t", FILTER_TYPE_TAG);
    queue(&e, "q");
    subscribe(&e, "t", "s", &queue_spec("q", &[], &[])).unwrap();
    let mut out = Vec::new();
    assert_eq!(code(e.topic_attributes("other", "t")), (4440, 10600));
    assert_eq!(
        code(e.publish(
            "other",
            "t",
            &[Bytes::from_static(b"x")],
            &[],
            None,
            T0,
            &mut out
        )),
        (4440, 10600)
    );
    // Another account cannot subscribe its topic to our queue.
    e.create_topic("other", "t", &TopicAttributeSet::default(), T0, &mut out)
        .unwrap();
    assert_eq!(
        code(e.subscribe("other", "t", "s", &queue_spec("q", &[], &[]), T0, &mut out)),
        (4440, 10100)
    );
    assert_eq!(
        code(e.subscription_attributes("other", "t", "s")),
        (4440, 10750)
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP delivery.

/// A push listener that counts its calls.
#[derive(Debug, Default)]
struct Count(AtomicUsize);

impl PushListener for Count {
    fn on_push_due(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn http_engine(strategy: &str) -> Engine {
    let e = engine();
    topic(&e, "t", FILTER_TYPE_TAG);
    subscribe(&e, "t", "h", &http_spec(strategy)).unwrap();
    e
}

fn take(e: &Engine, now: Millis) -> Vec<PushDelivery> {
    e.take_due_pushes(now, 100, &mut Vec::new())
}

fn fail(e: &Engine, d: &PushDelivery, now: Millis) -> Vec<Mutation> {
    let mut out = Vec::new();
    e.push_result(
        d.subscription_id,
        d.msg_id,
        d.attempt,
        Err("HTTP 500"),
        now,
        &mut out,
    );
    out
}

/// EXPONENTIAL_DECAY_RETRY: retries after 1, 2, 4 ... 512 s, then every 512 s, and the message
/// is dropped when the next retry would fall after the topic's one-day retention: 176 retries.
#[test]
fn exponential_decay_schedule_over_a_day() {
    let e = http_engine("EXPONENTIAL_DECAY_RETRY");
    let listener = Arc::new(Count::default());
    assert!(e.set_push_listener(listener.clone()));
    let msg_id = publish(&e, "t", &[], None, T0).unwrap().msg_ids[0];
    assert_eq!(
        listener.0.load(Ordering::Relaxed),
        1,
        "a publish wakes the push task"
    );
    assert_eq!(e.topic_attributes(ACC, "t").unwrap().msg_count, 1);
    assert_eq!(e.stored_body_bytes(), held_cost(4));

    let mut now = T0;
    let mut intervals = Vec::new();
    let mut retries = 0;
    loop {
        let got = take(&e, now);
        assert_eq!(got.len(), 1, "one delivery due at {now}");
        let d = &got[0];
        assert_eq!((d.msg_id, d.attempt), (msg_id, retries + 1));
        // Nothing more is due while it is in flight.
        assert!(take(&e, now).is_empty());
        let out = fail(&e, d, now);
        let a = sub_attrs(&e, "t", "h");
        if a.msg_count == 0 {
            assert!(matches!(
                out.as_slice(),
                [Mutation::PushFinished {
                    outcome: PushOutcome::Dropped,
                    ..
                }]
            ));
            assert_eq!(a.dropped_count, 1);
            assert!(a.last_error.unwrap().contains("dropped"));
            break;
        }
        let next = a.next_retry_time_ms;
        intervals.push((next - now) / SECOND);
        assert!(a.last_error.unwrap().contains("HTTP 500"));
        // One millisecond early, nothing is due.
        assert!(take(&e, next - 1).is_empty());
        assert_eq!(e.next_push_deadline(), Some(next));
        now = next;
        retries += 1;
    }
    assert_eq!(
        intervals[..11],
        [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 512]
    );
    assert!(intervals[9..].iter().all(|&s| s == 512));
    assert_eq!(retries, 176, "CMQ: 176 retries within the day");
    assert!(now < T0 + DAY && now + 512 * SECOND >= T0 + DAY);
    assert_eq!(e.topic_attributes(ACC, "t").unwrap().msg_count, 0);
    assert_eq!(e.stored_body_bytes(), 0);
    assert_eq!(e.topic_stats().push_failed_attempts, 177);
}

/// BACKOFF_RETRY: three retries, each 10-20 s after the failure before it, then the message is
/// dropped for the subscription.
#[test]
fn backoff_retry_gives_up_after_three_retries() {
    let e = http_engine("BACKOFF_RETRY");
    publish(&e, "t", &[], None, T0).unwrap();
    let mut now = T0;
    for attempt in 1..=4 {
        let got = take(&e, now);
        assert_eq!(got.len(), 1, "attempt {attempt} due at {now}");
        assert_eq!(got[0].attempt, attempt);
        fail(&e, &got[0], now);
        let a = sub_attrs(&e, "t", "h");
        if attempt == 4 {
            assert_eq!((a.msg_count, a.dropped_count), (0, 1));
            assert_eq!(a.next_retry_time_ms, 0);
            break;
        }
        let wait = a.next_retry_time_ms - now;
        assert!(
            (10 * SECOND..=20 * SECOND).contains(&wait),
            "retry {attempt} after {wait} ms"
        );
        assert!(take(&e, a.next_retry_time_ms - 1).is_empty());
        now = a.next_retry_time_ms;
    }
    assert_eq!(e.stored_body_bytes(), 0);
    assert_eq!(e.next_push_deadline(), None);

    // Twenty messages, more than the in-flight bound: each still gets exactly four attempts.
    for i in 0..20 {
        publish(&e, "t", &[], None, now + i).unwrap();
    }
    let mut attempts: HashMap<u64, u32> = HashMap::new();
    now += 20;
    while let Some(next) = e.next_push_deadline() {
        now = now.max(next);
        for d in take(&e, now) {
            *attempts.entry(d.msg_id).or_default() += 1;
            fail(&e, &d, now);
        }
    }
    assert_eq!(attempts.len(), 20);
    assert!(attempts.values().all(|&n| n == 4), "{attempts:?}");
    let a = sub_attrs(&e, "t", "h");
    assert_eq!(
        (a.msg_count, a.dropped_count, a.delivered_count),
        (0, 21, 0)
    );
}

#[test]
fn backoff_intervals_are_random_in_range() {
    let mut seen = BTreeSet::new();
    for seed in 0..1000u64 {
        for attempts in 1..=3 {
            let d = retry_delay_ms(NotifyStrategy::BackoffRetry, attempts, seed).unwrap();
            assert!((10_000..=20_000).contains(&d), "{d}");
            seen.insert(d / 1000);
        }
        assert_eq!(retry_delay_ms(NotifyStrategy::BackoffRetry, 4, seed), None);
    }
    assert!(
        (10..20).all(|second| seen.contains(&second)),
        "every second from 10 to 19 s occurs: {seen:?}"
    );
}

#[test]
fn a_recovered_endpoint_gets_the_message() {
    let e = http_engine("EXPONENTIAL_DECAY_RETRY");
    let msg_id = publish(&e, "t", &["x"], None, T0).unwrap().msg_ids[0];
    let d = take(&e, T0).remove(0);
    assert_eq!(&*d.tags, ["x".to_string()]);
    assert_eq!(d.content_format, ContentFormat::Json);
    assert_eq!(
        (&*d.topic, &*d.subscription, &*d.topic_owner),
        ("t", "h", ACC)
    );
    assert_eq!(d.publish_time_ms, T0);
    fail(&e, &d, T0);
    let d = take(&e, T0 + SECOND).remove(0);
    assert_eq!(d.attempt, 2);
    fail(&e, &d, T0 + SECOND);
    let d = take(&e, T0 + 3 * SECOND).remove(0);
    assert_eq!(d.attempt, 3);
    // A stale report (an earlier attempt) changes nothing.
    e.push_result(d.subscription_id, msg_id, 2, DELIVERED, T0, &mut Vec::new());
    assert_eq!(sub_attrs(&e, "t", "h").msg_count, 1);
    let mut out = Vec::new();
    e.push_result(
        d.subscription_id,
        msg_id,
        3,
        DELIVERED,
        T0 + 3 * SECOND,
        &mut out,
    );
    assert!(matches!(
        out.as_slice(),
        [Mutation::PushFinished { outcome: PushOutcome::Delivered, msg_id: m, .. }] if *m == msg_id
    ));
    let a = sub_attrs(&e, "t", "h");
    assert_eq!((a.msg_count, a.delivered_count, a.dropped_count), (0, 1, 0));
    assert_eq!(a.next_retry_time_ms, 0);
    assert_eq!(e.stored_body_bytes(), 0);
    assert_eq!(e.next_push_deadline(), None);
}

#[test]
fn in_flight_pushes_are_bounded_per_subscription() {
    let e = http_engine("EXPONENTIAL_DECAY_RETRY");
    let listener = Arc::new(Count::default());
    e.set_push_listener(listener.clone());
    for i in 0..40 {
        publish(&e, "t", &[], None, T0 + i).unwrap();
    }
    let first = take(&e, T0 + 100);
    assert_eq!(first.len(), limits::PUSH_INFLIGHT_PER_SUBSCRIPTION_MAX);
    assert!(take(&e, T0 + 100).is_empty());
    // Freeing a slot makes the next message due at once, and says so.
    let before = listener.0.load(Ordering::Relaxed);
    let d = &first[0];
    e.push_result(
        d.subscription_id,
        d.msg_id,
        d.attempt,
        DELIVERED,
        T0 + 100,
        &mut Vec::new(),
    );
    assert_eq!(listener.0.load(Ordering::Relaxed), before + 1);
    assert_eq!(take(&e, T0 + 100).len(), 1);
    // `max` bounds one call too.
    for d in &first[1..4] {
        e.push_result(
            d.subscription_id,
            d.msg_id,
            d.attempt,
            DELIVERED,
            T0 + 100,
            &mut Vec::new(),
        );
    }
    assert_eq!(e.take_due_pushes(T0 + 100, 2, &mut Vec::new()).len(), 2);
    assert_eq!(e.take_due_pushes(T0 + 100, 2, &mut Vec::new()).len(), 1);
}

#[test]
fn retention_ends_waiting_and_unsubscribe_drops_the_backlog() {
    let e = engine();
    topic(&e, "t", FILTER_TYPE_TAG);
    subscribe(&e, "t", "a", &http_spec("EXPONENTIAL_DECAY_RETRY")).unwrap();
    subscribe(&e, "t", "b", &http_spec("EXPONENTIAL_DECAY_RETRY")).unwrap();
    let mut out = Vec::new();
    e.publish(
        ACC,
        "t",
        &[Bytes::from_static(b"12345678")],
        &[],
        None,
        T0,
        &mut out,
    )
    .unwrap();
    assert!(matches!(
        out.as_slice(),
        [Mutation::TopicMessageRetained { subscription_ids, expires_at_ms, .. }]
            if subscription_ids.len() == 2 && *expires_at_ms == T0 + DAY
    ));
    // One body held once for both subscriptions.
    assert_eq!(e.stored_body_bytes(), held_cost(8));
    // Nobody takes it for a day: it is dropped when next looked at.
    let mut out = Vec::new();
    assert!(e.take_due_pushes(T0 + DAY, 10, &mut out).is_empty());
    assert_eq!(out.len(), 2);
    assert_eq!(e.stored_body_bytes(), 0);
    assert_eq!(e.topic_stats().push_dropped, 2);

    // Unsubscribing gives back what waited only for that subscription.
    publish(&e, "t", &[], None, T0).unwrap();
    assert_eq!(e.stored_body_bytes(), held_cost(4));
    let taken = take(&e, T0);
    assert_eq!(taken.len(), 2);
    e.unsubscribe(ACC, "t", "a", T0, &mut Vec::new()).unwrap();
    assert_eq!(e.stored_body_bytes(), held_cost(4), "b still waits for it");
    // A report for the deleted subscription is ignored.
    let from_a = taken
        .iter()
        .find(|d| d.subscription.as_ref() == "a")
        .unwrap();
    e.push_result(
        from_a.subscription_id,
        from_a.msg_id,
        1,
        DELIVERED,
        T0,
        &mut Vec::new(),
    );
    let from_b = taken
        .iter()
        .find(|d| d.subscription.as_ref() == "b")
        .unwrap();
    e.push_result(
        from_b.subscription_id,
        from_b.msg_id,
        1,
        DELIVERED,
        T0,
        &mut Vec::new(),
    );
    assert_eq!(e.stored_body_bytes(), 0);
    assert_eq!(e.topic_attributes(ACC, "t").unwrap().msg_count, 0);
    e.unsubscribe(ACC, "t", "b", T0, &mut Vec::new()).unwrap();
    e.delete_topic(ACC, "t", T0, &mut Vec::new()).unwrap();
}

#[test]
fn memory_limit_fails_the_whole_publish() {
    let e = Engine::new(EngineConfig {
        body_memory_bytes_max: 2 * held_cost(4) + 2,
        ..EngineConfig::default()
    });
    topic(&e, "t", FILTER_TYPE_TAG);
    queue(&e, "q1");
    queue(&e, "q2");
    subscribe(&e, "t", "s1", &queue_spec("q1", &[], &[])).unwrap();
    subscribe(&e, "t", "s2", &queue_spec("q2", &[], &[])).unwrap();
    // Two copies of 4 bytes fit; two of 6 do not, and then neither queue gets one.
    publish(&e, "t", &[], None, T0).unwrap();
    assert_eq!(e.stored_body_bytes(), 2 * held_cost(4));
    let six = [Bytes::from_static(b"123456")];
    assert_eq!(
        code(e.publish(ACC, "t", &six, &[], None, T0, &mut Vec::new())),
        (6000, 10090)
    );
    assert_eq!((ready(&e, "q1"), ready(&e, "q2")), (1, 1));
}

#[test]
fn endpoint_validation_edges() {
    for ok in [
        "http://a",
        "http://a.b.c:1/",
        "http://1.2.3.4",
        "http://x.com#frag",
        "http://x.com?q",
        "http://[2001:db8::1]",
    ] {
        assert!(validate_http_endpoint(ok).is_ok(), "{ok}");
    }
    for bad in [
        "http://",
        "http://-a.com",
        "http://a.com:",
        "http://a.com:0",
        "http://[::1",
        "http://[::1]x",
        "http://é.com",
        "ftp://a.com",
    ] {
        assert!(validate_http_endpoint(bad).is_err(), "{bad}");
    }
    assert_eq!(
        validate_http_endpoint("http://a.com/\tx").unwrap_err().code,
        ErrorCode::URL_WHITESPACE
    );
}

/// What a log replay would rebuild (the images) loads into a fresh engine: topics route as
/// before, ids resume above the restored ones, and a waiting HTTP delivery is due at once.
#[test]
fn restore_topics_from_images() {
    let e = engine();
    let topic_id = topic(&e, "t", FILTER_TYPE_ROUTING_KEY);
    queue(&e, "q");
    let mut out = Vec::new();
    let spec = queue_spec("q", &[], &["a.#"]);
    e.subscribe(ACC, "t", "s", &spec, T0, &mut out).unwrap();
    let mut http = http_spec("BACKOFF_RETRY");
    http.binding_keys = strings(&["#"]);
    e.subscribe(ACC, "t", "h", &http, T0, &mut out).unwrap();
    e.publish(
        ACC,
        "t",
        &[Bytes::from_static(b"kept")],
        &[],
        Some("a.b"),
        T0,
        &mut out,
    )
    .unwrap();

    // Build the images from the mutations, as a replay would.
    let mut image = TopicsImage::default();
    for m in &out {
        match m {
            Mutation::TopicCreated {
                account,
                topic_id,
                name,
                settings,
                created_at_ms,
            } => image.topics.push(TopicImage {
                topic_id: *topic_id,
                account: Arc::clone(account),
                name: Arc::clone(name),
                settings: settings.clone(),
                created_at_ms: *created_at_ms,
                modified_at_ms: *created_at_ms,
            }),
            Mutation::SubscriptionCreated {
                topic_id,
                subscription_id,
                name,
                settings,
                created_at_ms,
                ..
            } => image.subscriptions.push(SubscriptionImage {
                subscription_id: *subscription_id,
                topic_id: *topic_id,
                name: Arc::clone(name),
                settings: settings.clone(),
                created_at_ms: *created_at_ms,
                modified_at_ms: *created_at_ms,
            }),
            Mutation::TopicMessageRetained {
                topic_id,
                msg_id,
                body,
                msg_tags,
                publish_time_ms,
                expires_at_ms,
                subscription_ids,
                ..
            } => image.retained.push(RetainedImage {
                topic_id: *topic_id,
                msg_id: *msg_id,
                body: body.clone(),
                msg_tags: Arc::clone(msg_tags),
                publish_time_ms: *publish_time_ms,
                expires_at_ms: *expires_at_ms,
                subscription_ids: subscription_ids.clone(),
            }),
            _ => {}
        }
    }
    let (topics, subs, retained) = (
        image.topics.len(),
        image.subscriptions.len(),
        image.retained.len(),
    );
    assert_eq!(
        (topics, subs, retained),
        (0, 2, 1),
        "the topic was created before `out`"
    );
    image.topics.push(TopicImage {
        topic_id,
        account: Arc::from(ACC),
        name: Arc::from("t"),
        settings: TopicSettings {
            filter_type: FILTER_TYPE_ROUTING_KEY,
            ..TopicSettings::default()
        },
        created_at_ms: T0,
        modified_at_ms: T0,
    });
    image.next_topic_id = topic_id + 1;

    let restored = engine();
    queue(&restored, "q");
    restored.restore_topics(image.clone(), T0 + 5).unwrap();
    assert!(restored.restore_topics(image, T0).is_err());
    let d = take(&restored, T0 + 5);
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].attempt, &d[0].body[..]), (1, &b"kept"[..]));
    assert_eq!(restored.stored_body_bytes(), held_cost(4));
    publish(&restored, "t", &[], Some("a.c"), T0).unwrap();
    assert_eq!(ready(&restored, "q"), 1);
    let new_id = restored
        .create_topic(
            ACC,
            "t2",
            &TopicAttributeSet::default(),
            T0,
            &mut Vec::new(),
        )
        .unwrap();
    assert!(new_id > topic_id);
    assert_eq!(sub_attrs(&restored, "t", "h").msg_count, 1);
}
