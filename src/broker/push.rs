//! HTTP delivery of topic messages: the async side of the engine's push state.
//!
//! One task asks the engine for deliveries that are due
//! ([`Engine::take_due_pushes`](crate::engine::Engine::take_due_pushes)), POSTs each on a task of
//! its own, and reports the outcome ([`Engine::push_result`](crate::engine::Engine::push_result)); the engine
//! decides what is due and when a failure is retried, so this file holds no schedule. The task
//! wakes when the engine says a delivery became due (a publish, a slot freed) and otherwise every
//! [`PUSH_TICK`], reading the broker's clock each time, so retries follow a manual test clock too.
//!
//! Requests follow CMQ (`CMQ.md` A.8): POST, `Content-Type: text/plain` (even for JSON),
//! `User-Agent: Qcloud Notification Service Agent`, `x-cmq-request-id`, `x-cmq-message-id`,
//! `x-cmq-message-tag` (tags joined with `, `); the body is the message (SIMPLIFIED) or a JSON
//! document (JSON). Any 2xx answer is success; another status, no answer within
//! [`limits::PUSH_TIMEOUT_SECONDS`], or no connection is a failure.
//!
//! Only the subscription's own URL is contacted: the client follows no redirect and uses no
//! proxy (a proxy from the environment would be an address no subscription named).
//!
//! In flight at once: at most [`limits::PUSH_INFLIGHT_TOTAL_MAX`] in total, at most
//! [`limits::PUSH_INFLIGHT_PER_ENDPOINT_MAX`] per endpoint host and port, and at most
//! [`limits::PUSH_INFLIGHT_PER_SUBSCRIPTION_MAX`] per subscription (the engine's bound).
//!
//! The engine's delivery results (`PushFinished` mutations: delivered, or dropped) go to the
//! storage as every other change does: under [`Storage::order`](crate::storage::Storage::order)
//! from the engine call to the append, so that the log never holds a delivery's end in an
//! earlier batch than the publish it ends. Nobody waits for their commit: a result lost in a
//! crash means one more delivery of that message after the restart (at-least-once).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use parking_lot::Mutex;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, USER_AGENT};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::{ContentFormat, PushDelivery, PushListener};
use crate::limits;
use crate::storage::Commit;

use super::Broker;
pub use crate::limits::broker::PUSH_TICK;

/// The User-Agent of every push, as CMQ's.
pub const USER_AGENT_VALUE: &str = "Qcloud Notification Service Agent";

/// Wakes the push task; registered with the engine as its [`PushListener`].
#[derive(Debug, Default)]
struct Wake(Notify);

impl PushListener for Wake {
    fn on_push_due(&self) {
        // `notify_one` stores a permit when the task is busy, so no wake-up is lost.
        self.0.notify_one();
    }
}

/// Per-endpoint limits on connections, created on first use and dropped when idle.
#[derive(Debug, Default)]
struct Endpoints {
    by_authority: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Endpoints {
    fn semaphore(&self, authority: &str) -> Arc<Semaphore> {
        let mut map = self.by_authority.lock();
        if map.len() > 4 * limits::PUSH_INFLIGHT_TOTAL_MAX {
            // Forget endpoints nobody is posting to, so the map cannot grow without bound.
            map.retain(|_, semaphore| {
                semaphore.available_permits() < limits::PUSH_INFLIGHT_PER_ENDPOINT_MAX
            });
        }
        Arc::clone(
            map.entry(authority.to_owned()).or_insert_with(|| {
                Arc::new(Semaphore::new(limits::PUSH_INFLIGHT_PER_ENDPOINT_MAX))
            }),
        )
    }
}

/// Runs HTTP delivery until `shutdown`. Deliveries in flight then are abandoned; the engine
/// goes away with the server.
pub async fn run(shared: Arc<Broker>, shutdown: CancellationToken) {
    let wake = Arc::new(Wake::default());
    if !shared.engine.set_push_listener(wake.clone()) {
        tracing::warn!("a push task already runs for this engine; not starting another");
        return;
    }
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(limits::PUSH_TIMEOUT_SECONDS))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_max_idle_per_host(limits::PUSH_INFLIGHT_PER_ENDPOINT_MAX)
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the HTTP client; HTTP subscriptions get no deliveries");
            return;
        }
    };
    let total = Arc::new(Semaphore::new(limits::PUSH_INFLIGHT_TOTAL_MAX));
    let endpoints = Arc::new(Endpoints::default());
    let tracker = TaskTracker::new();
    loop {
        let free = total.available_permits();
        if free > 0 {
            let (due, commit) = shared.take_due_pushes(free);
            let due = match commit.wait().await {
                Ok(()) => due,
                Err(error) => {
                    // The storage undid the changes (the publish among them, maybe): the
                    // engine holds what is stored, and these deliveries are not made.
                    tracing::warn!(%error, "HTTP deliveries not made: the log did not store");
                    Vec::new()
                }
            };
            for delivery in due {
                let Ok(permit) = Arc::clone(&total).try_acquire_owned() else {
                    // Cannot happen (we asked for at most `free`); if it did, the report puts
                    // the delivery back on its retry schedule rather than losing it.
                    shared.push_result(&delivery, Err("broker push capacity exhausted".into()));
                    continue;
                };
                tracker.spawn(deliver(
                    Arc::clone(&shared),
                    client.clone(),
                    Arc::clone(&endpoints),
                    delivery,
                    permit,
                ));
            }
        }
        tokio::select! {
            () = wake.0.notified() => {}
            () = tokio::time::sleep(PUSH_TICK) => {}
            () = shutdown.cancelled() => break,
        }
    }
    tracker.close();
}

/// Posts one delivery and reports the outcome.
async fn deliver(
    shared: Arc<Broker>,
    client: reqwest::Client,
    endpoints: Arc<Endpoints>,
    delivery: PushDelivery,
    _total: OwnedSemaphorePermit,
) {
    let outcome = match reqwest::Url::parse(&delivery.endpoint) {
        Ok(url) => {
            let authority = format!(
                "{}:{}",
                url.host_str().unwrap_or_default(),
                url.port_or_known_default().unwrap_or(80)
            );
            let semaphore = endpoints.semaphore(&authority);
            match semaphore.acquire_owned().await {
                Ok(_permit) => post(&client, url, &delivery).await,
                Err(_) => Err("endpoint limiter closed".to_owned()),
            }
        }
        Err(error) => Err(format!("invalid endpoint URL: {error}")),
    };
    if let Err(reason) = &outcome {
        tracing::debug!(
            subscription = %delivery.subscription,
            msg_id = delivery.msg_id,
            attempt = delivery.attempt,
            %reason,
            "push failed"
        );
    }
    shared.push_result(&delivery, outcome);
}

impl Broker {
    /// Takes up to `free` deliveries that are due now, and the commit to wait for before
    /// posting them: a message is posted only once its publish is durable (everything appended
    /// so far, the publish's record among it). Takes nothing while the storage refuses changes.
    pub fn take_due_pushes(&self, free: usize) -> (Vec<PushDelivery>, Commit) {
        let mut out = Vec::new();
        // Held from the engine call to the append, never across an await.
        let _order = self.storage.order();
        if self.storage.refusal().is_some() {
            // The log cannot write: nothing is taken until it can.
            return (Vec::new(), Commit::Done);
        }
        let now = self.clock.now_ms();
        let due = self.engine.take_due_pushes(now, free, &mut out);
        let commit = if due.is_empty() {
            self.record_pushes(out);
            Commit::Done
        } else if out.is_empty() {
            self.storage.barrier()
        } else {
            self.storage.append(out)
        };
        (due, commit)
    }

    /// Reports a delivery's outcome to the engine (which schedules a retry or ends it) and
    /// records the result; nobody waits for that commit.
    pub fn push_result(&self, delivery: &PushDelivery, outcome: Result<(), String>) {
        let mut out = Vec::new();
        // Held from the engine call to the append (see the module docs).
        let _order = self.storage.order();
        self.engine.push_result(
            delivery.subscription_id,
            delivery.msg_id,
            delivery.attempt,
            outcome,
            self.clock.now_ms(),
            &mut out,
        );
        self.record_pushes(out);
    }

    /// Hands delivery records (finished, dropped) to storage; nobody waits on them.
    fn record_pushes(&self, out: Vec<crate::engine::Mutation>) {
        if !out.is_empty() {
            self.storage.append_unwaited(out);
        }
    }
}

async fn post(
    client: &reqwest::Client,
    url: reqwest::Url,
    delivery: &PushDelivery,
) -> Result<(), String> {
    let response = client
        .post(url)
        .headers(headers(delivery))
        .body(body(delivery))
        .send()
        .await
        .map_err(|error| describe(&error))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", status.as_u16()))
    }
}

/// A reqwest error in a few words: its kind and its innermost cause.
fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        format!("no answer within {} s", limits::PUSH_TIMEOUT_SECONDS)
    } else if error.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut cause: &dyn std::error::Error = error;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    format!("{kind}: {cause}")
}

/// CMQ's push headers.
pub fn headers(delivery: &PushDelivery) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    headers.insert("x-cmq-request-id", HeaderValue::from(delivery.request_id));
    headers.insert("x-cmq-message-id", HeaderValue::from(delivery.msg_id));
    // Tags are free text; one that cannot be a header value (a control character) is left
    // out rather than failing the delivery.
    if let Ok(value) = HeaderValue::from_str(&delivery.tags.join(", ")) {
        headers.insert("x-cmq-message-tag", value);
    }
    headers
}

/// The request body: the raw message (SIMPLIFIED) or CMQ's JSON document. `msgBody` is the body
/// as text; a body that is not UTF-8 is sent base64-encoded, with `"msgBodyEncoding":"base64"`.
pub fn body(delivery: &PushDelivery) -> Vec<u8> {
    match delivery.content_format {
        ContentFormat::Simplified => delivery.body.to_vec(),
        ContentFormat::Json => {
            let mut document = serde_json::json!({
                "TopicOwner": &*delivery.topic_owner,
                "topicName": &*delivery.topic,
                "subscriptionName": &*delivery.subscription,
                "msgId": delivery.msg_id.to_string(),
                "publishTime": delivery.publish_time_ms / 1000,
            });
            match std::str::from_utf8(&delivery.body) {
                Ok(text) => document["msgBody"] = serde_json::Value::from(text),
                Err(_) => {
                    document["msgBody"] = serde_json::Value::from(
                        base64::engine::general_purpose::STANDARD.encode(&delivery.body),
                    );
                    document["msgBodyEncoding"] = serde_json::Value::from("base64");
                }
            }
            document.to_string().into_bytes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn delivery(format: ContentFormat, body: &'static [u8]) -> PushDelivery {
        PushDelivery {
            subscription_id: 3,
            msg_id: 42,
            attempt: 1,
            request_id: 7,
            endpoint: Arc::from("http://127.0.0.1:1/"),
            content_format: format,
            topic_owner: Arc::from("alice"),
            topic: Arc::from("orders"),
            subscription: Arc::from("audit"),
            body: Bytes::from_static(body),
            tags: Arc::from(vec!["a".to_string(), "b".to_string()]),
            publish_time_ms: 1_700_000_000_123,
        }
    }

    #[test]
    fn headers_follow_cmq() {
        let h = headers(&delivery(ContentFormat::Json, b"x"));
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["user-agent"], USER_AGENT_VALUE);
        assert_eq!(h["x-cmq-request-id"], "7");
        assert_eq!(h["x-cmq-message-id"], "42");
        assert_eq!(h["x-cmq-message-tag"], "a, b");
    }

    #[test]
    fn json_and_simplified_bodies() {
        assert_eq!(
            body(&delivery(ContentFormat::Simplified, b"raw\xff")),
            b"raw\xff"
        );
        let json: serde_json::Value =
            serde_json::from_slice(&body(&delivery(ContentFormat::Json, b"hello"))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "TopicOwner": "alice",
                "topicName": "orders",
                "subscriptionName": "audit",
                "msgId": "42",
                "msgBody": "hello",
                "publishTime": 1_700_000_000u64,
            })
        );
        let json: serde_json::Value =
            serde_json::from_slice(&body(&delivery(ContentFormat::Json, b"\xff\x00"))).unwrap();
        assert_eq!(json["msgBody"], "/wA=");
        assert_eq!(json["msgBodyEncoding"], "base64");
    }
}
