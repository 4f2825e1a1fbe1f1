//! The CMQ-compatible HTTP API against a real broker: signing (both methods, wrong key or
//! secretId, stale timestamps, replayed nonces), parameter rules, error codes, long polling over
//! HTTP, and messages crossing between HTTP and the binary protocol.
//!
//! Requests are signed here independently of the broker's code (HMAC over the string CMQ.md
//! A.10 describes), so a mistake on one side does not hide one on the other.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use cmqd::config::HttpApiConfig;

use super::support::{TestServer, ALICE};

/// Form encoding as Python's `urlencode` does it (letters, digits and `-._~` kept).
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A broker with the HTTP API on an ephemeral port.
pub struct HttpBroker {
    pub server: TestServer,
    pub addr: SocketAddr,
    token: CancellationToken,
}

impl HttpBroker {
    pub async fn start() -> Self {
        Self::start_with(HttpApiConfig::default()).await
    }

    pub async fn start_with(config: HttpApiConfig) -> Self {
        Self::start_with_tls(config, None).await.0
    }

    /// With HTTPS too, on an ephemeral port of its own: returns the broker and that port's
    /// address.
    pub async fn start_with_tls(
        config: HttpApiConfig,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    ) -> (Self, Option<SocketAddr>) {
        let server = TestServer::start().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tls_addr = None;
        let mut https = None;
        if let Some(tls) = tls {
            let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tls_addr = Some(tls_listener.local_addr().unwrap());
            https = Some((tls_listener, tls));
        }
        let token = CancellationToken::new();
        tokio::spawn(cmqd::http_api::serve_with_tls(
            listener,
            https,
            server.running.shared().clone(),
            config,
            token.clone(),
        ));
        let broker = Self {
            server,
            addr,
            token,
        };
        (broker, tls_addr)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self, who: (&str, &str)) -> Cmq {
        Cmq::new(self.addr, who)
    }

    /// A client whose connections come from `source` (any address of 127.0.0.0/8 is this
    /// machine's on Linux).
    pub fn client_from(&self, who: (&str, &str), source: std::net::IpAddr) -> Cmq {
        Cmq {
            http: reqwest::Client::builder()
                .local_address(source)
                .build()
                .unwrap(),
            ..self.client(who)
        }
    }

    pub async fn stop(self) {
        self.token.cancel();
        self.server.stop().await;
    }
}

/// How a request is signed and sent; the defaults are what the SDKs do.
#[derive(Clone)]
pub struct Options {
    pub method: &'static str,
    pub signature_method: Option<&'static str>,
    pub timestamp: Option<i64>,
    pub nonce: Option<String>,
    /// Sign with this key instead of the client's.
    pub key: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            method: "POST",
            signature_method: None,
            timestamp: None,
            nonce: None,
            key: None,
        }
    }
}

/// A minimal CMQ HTTP client: signs like the official SDKs and returns the JSON reply.
pub struct Cmq {
    url: String,
    host: String,
    secret_id: String,
    secret_key: String,
    http: reqwest::Client,
}

static NONCES: AtomicU64 = AtomicU64::new(1);

fn now_seconds() -> i64 {
    use cmqd::clock::Clock as _;
    (cmqd::clock::SystemClock::new().now_ms() / 1000) as i64
}

pub fn encode(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, FORM),
                utf8_percent_encode(v, FORM)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

impl Cmq {
    /// A client of the API on `addr`.
    pub fn new(addr: SocketAddr, who: (&str, &str)) -> Self {
        Cmq {
            url: format!("http://{addr}/v2/index.php"),
            host: addr.to_string(),
            secret_id: who.0.to_string(),
            secret_key: who.1.to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// The same client signing for another `Host` (the HTTPS listener's address).
    pub fn for_host(self, host: &str) -> Self {
        Self {
            host: host.to_string(),
            ..self
        }
    }

    /// Calls `action` by POST, signed with HmacSHA1.
    pub async fn call(&self, action: &str, params: &[(&str, &str)]) -> Value {
        self.call_with(&Options::default(), action, params).await
    }

    /// The parameters of a signed request, Signature included.
    pub fn signed(
        &self,
        options: &Options,
        action: &str,
        params: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        pairs.push(("Action".into(), action.into()));
        pairs.push(("SecretId".into(), self.secret_id.clone()));
        pairs.push((
            "Timestamp".into(),
            options.timestamp.unwrap_or_else(now_seconds).to_string(),
        ));
        let nonce = options.nonce.clone().unwrap_or_else(|| {
            format!(
                "{}{}",
                std::process::id(),
                NONCES.fetch_add(1, Ordering::Relaxed)
            )
        });
        pairs.push(("Nonce".into(), nonce));
        pairs.push(("RequestClient".into(), "cmqd-tests".into()));
        if let Some(method) = options.signature_method {
            pairs.push(("SignatureMethod".into(), method.into()));
        }
        pairs.sort();
        let query = pairs
            .iter()
            .filter(|(_, v)| !(options.method == "POST" && v.starts_with('@')))
            .map(|(k, v)| format!("{}={v}", k.replace('_', ".")))
            .collect::<Vec<_>>()
            .join("&");
        let text = format!("{}{}/v2/index.php?{query}", options.method, self.host);
        let key = options.key.as_deref().unwrap_or(&self.secret_key);
        let digest = if options.signature_method == Some("HmacSHA256") {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
            mac.update(text.as_bytes());
            mac.finalize().into_bytes().to_vec()
        } else {
            let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key.as_bytes()).unwrap();
            mac.update(text.as_bytes());
            mac.finalize().into_bytes().to_vec()
        };
        pairs.push((
            "Signature".into(),
            base64::engine::general_purpose::STANDARD.encode(digest),
        ));
        pairs
    }

    pub async fn call_with(
        &self,
        options: &Options,
        action: &str,
        params: &[(&str, &str)],
    ) -> Value {
        let pairs = self.signed(options, action, params);
        self.send(options.method, &pairs).await
    }

    /// Sends already signed parameters; the reply must be HTTP 200 with JSON.
    pub async fn send(&self, method: &str, pairs: &[(String, String)]) -> Value {
        let (status, body) = self.send_raw(method, &encode(pairs)).await;
        assert_eq!(status, 200, "HTTP status of {pairs:?}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
    }

    /// Sends an encoded parameter string (query for GET, body otherwise).
    pub async fn send_raw(&self, method: &str, encoded: &str) -> (u16, String) {
        let request = match method {
            "GET" => self.http.get(format!("{}?{encoded}", self.url)),
            "POST" => self.http.post(&self.url).body(encoded.to_string()),
            other => self
                .http
                .request(other.parse().unwrap(), &self.url)
                .body(encoded.to_string()),
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }
}

/// Asserts a CMQ error reply: its code, and the module code that opens its message.
#[track_caller]
pub fn assert_error(reply: &Value, code: u64, module: u32) {
    assert_eq!(reply["code"], code, "{reply}");
    let message = reply["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("({module})")),
        "module {module} expected: {reply}"
    );
    assert!(reply["requestId"].is_string(), "{reply}");
}

#[track_caller]
pub fn assert_ok(reply: &Value) {
    assert_eq!(reply["code"], 0, "{reply}");
    assert_eq!(reply["message"], "", "{reply}");
    assert!(reply["requestId"].is_string(), "{reply}");
}

async fn create_queue(cmq: &Cmq, name: &str) {
    assert_ok(&cmq.call("CreateQueue", &[("queueName", name)]).await);
}

#[tokio::test]
async fn both_signature_methods_and_both_http_methods_are_accepted() {
    let broker = HttpBroker::start().await;
    let cmq = broker.client(ALICE);
    let created = cmq
        .call(
            "CreateQueue",
            &[("queueName", "signed"), ("visibilityTimeout", "45")],
        )
        .await;
    assert_ok(&created);
    assert!(created["queueId"].as_str().unwrap().starts_with("queue-"));
    for (method, signature_method) in [
        ("POST", None),
        ("POST", Some("HmacSHA1")),
        ("POST", Some("HmacSHA256")),
        ("GET", None),
        ("GET", Some("HmacSHA256")),
    ] {
        let options = Options {
            method,
            signature_method,
            ..Options::default()
        };
        let reply = cmq
            .call_with(&options, "GetQueueAttributes", &[("queueName", "signed")])
            .await;
        assert_ok(&reply);
        assert_eq!(
            reply["visibilityTimeout"], 45,
            "{method} {signature_method:?}"
        );
    }
    // Values that need encoding are signed decoded; `_` in a name is signed as `.`.
    let body = "a b+c&d=e/f?%ü 中文";
    let sent = cmq
        .call(
            "SendMessage",
            &[("queueName", "signed"), ("msgBody", body), ("x_y", "1")],
        )
        .await;
    assert_ok(&sent);
    let received = cmq
        .call(
            "ReceiveMessage",
            &[("queueName", "signed"), ("pollingWaitSeconds", "0")],
        )
        .await;
    assert_ok(&received);
    assert_eq!(received["msgBody"], body);
    assert_eq!(received["msgId"], sent["msgId"]);
    // In a POST, a value starting with `@` is left out of the string to sign (the SDKs do so).
    let reply = cmq
        .call(
            "SendMessage",
            &[("queueName", "signed"), ("msgBody", "@not-signed")],
        )
        .await;
    assert_ok(&reply);
    broker.stop().await;
}

#[tokio::test]
async fn wrong_keys_and_unknown_secret_ids_are_refused() {
    let broker = HttpBroker::start().await;
    let cmq = broker.client(ALICE);
    create_queue(&cmq, "guarded").await;
    let wrong_key = Options {
        key: Some("not-alice-secret-key-000000".into()),
        ..Options::default()
    };
    let reply = cmq
        .call_with(
            &wrong_key,
            "GetQueueAttributes",
            &[("queueName", "guarded")],
        )
        .await;
    assert_error(&reply, 4100, 10030);
    let stranger = broker.client(("AKIDnobody000", "whatever-key-0123456789"));
    assert_error(&stranger.call("ListQueue", &[]).await, 4100, 10270);
    // A signature over other parameters than those sent.
    let mut pairs = cmq.signed(
        &Options::default(),
        "SendMessage",
        &[("queueName", "guarded"), ("msgBody", "original")],
    );
    for (name, value) in &mut pairs {
        if name == "msgBody" {
            *value = "tampered".into();
        }
    }
    assert_error(&cmq.send("POST", &pairs).await, 4100, 10030);
    // A POST signature does not sign a GET.
    let pairs = cmq.signed(&Options::default(), "ListQueue", &[]);
    assert_error(&cmq.send("GET", &pairs).await, 4100, 10030);
    // Missing signature parameters.
    assert_error(
        &cmq.send("POST", &[("Action".into(), "ListQueue".into())])
            .await,
        4000,
        10010,
    );
    assert_error(
        &cmq.call_with(
            &Options {
                signature_method: Some("HmacMD5"),
                ..Options::default()
            },
            "ListQueue",
            &[],
        )
        .await,
        4000,
        10110,
    );
    // Nothing happened with the refused requests.
    let attributes = cmq
        .call("GetQueueAttributes", &[("queueName", "guarded")])
        .await;
    assert_eq!(attributes["activeMsgNum"], 0);
    broker.stop().await;
}

#[tokio::test]
async fn stale_timestamps_and_replayed_nonces_are_refused() {
    let broker = HttpBroker::start_with(HttpApiConfig {
        timestamp_window_seconds: 60,
        ..HttpApiConfig::default()
    })
    .await;
    let cmq = broker.client(ALICE);
    for skew in [-61, 61] {
        let options = Options {
            timestamp: Some(now_seconds() + skew),
            ..Options::default()
        };
        assert_error(
            &cmq.call_with(&options, "ListQueue", &[]).await,
            4100,
            10030,
        );
    }
    let within = Options {
        timestamp: Some(now_seconds() - 30),
        ..Options::default()
    };
    assert_ok(&cmq.call_with(&within, "ListQueue", &[]).await);

    // The same signed request twice: the second is a replay.
    let pairs = cmq.signed(&Options::default(), "CreateQueue", &[("queueName", "once")]);
    assert_ok(&cmq.send("POST", &pairs).await);
    assert_error(&cmq.send("POST", &pairs).await, 4100, 10030);
    // The same nonce with another timestamp is another request.
    let nonce = Options {
        nonce: Some("42".into()),
        timestamp: Some(now_seconds() - 1),
        ..Options::default()
    };
    assert_ok(&cmq.call_with(&nonce, "ListQueue", &[]).await);
    let again = Options {
        timestamp: Some(now_seconds() - 2),
        ..nonce.clone()
    };
    assert_ok(&cmq.call_with(&again, "ListQueue", &[]).await);
    assert_error(&cmq.call_with(&again, "ListQueue", &[]).await, 4100, 10030);
    broker.stop().await;
}

#[tokio::test]
async fn indexed_parameters_follow_cmq_rules() {
    let broker = HttpBroker::start().await;
    let cmq = broker.client(ALICE);
    create_queue(&cmq, "indexed").await;
    for first in [0, 1] {
        let names: Vec<String> = (first..first + 3).map(|i| format!("msgBody.{i}")).collect();
        let mut params = vec![("queueName", "indexed")];
        for (i, name) in names.iter().enumerate() {
            params.push((name.as_str(), ["a", "b", "c"][i]));
        }
        let reply = cmq.call("BatchSendMessage", &params).await;
        assert_ok(&reply);
        let ids = reply["msgList"].as_array().unwrap();
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().all(|m| m["msgId"].is_string()));
    }
    // Ten or more: ordered by number, not as text.
    let names: Vec<String> = (1..=12).map(|i| format!("msgBody.{i}")).collect();
    let values: Vec<String> = (1..=12).map(|i| format!("m{i}")).collect();
    let mut params = vec![("queueName", "indexed")];
    params.extend(
        names
            .iter()
            .map(String::as_str)
            .zip(values.iter().map(String::as_str)),
    );
    assert_ok(&cmq.call("BatchSendMessage", &params).await);
    let batch = cmq
        .call(
            "BatchReceiveMessage",
            &[("queueName", "indexed"), ("numOfMsg", "16")],
        )
        .await;
    let bodies: Vec<&str> = batch["msgInfoList"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["msgBody"].as_str().unwrap())
        .collect();
    assert_eq!(
        &bodies[6..],
        values
            .iter()
            .map(String::as_str)
            .take(10)
            .collect::<Vec<_>>()
    );

    let gap = cmq
        .call(
            "BatchSendMessage",
            &[
                ("queueName", "indexed"),
                ("msgBody.1", "a"),
                ("msgBody.3", "c"),
            ],
        )
        .await;
    assert_error(&gap, 4000, 10380);
    let from_two = cmq
        .call(
            "BatchSendMessage",
            &[
                ("queueName", "indexed"),
                ("msgBody.2", "a"),
                ("msgBody.3", "b"),
            ],
        )
        .await;
    assert_error(&from_two, 4000, 10380);
    let not_a_number = cmq
        .call(
            "BatchDeleteMessage",
            &[("queueName", "indexed"), ("receiptHandle.one", "h")],
        )
        .await;
    assert_error(&not_a_number, 4000, 10310);
    let leading_zero = cmq
        .call(
            "BatchSendMessage",
            &[("queueName", "indexed"), ("msgBody.01", "a")],
        )
        .await;
    assert_error(&leading_zero, 4000, 10310);
    let names: Vec<String> = (1..=17).map(|i| format!("msgBody.{i}")).collect();
    let mut params = vec![("queueName", "indexed")];
    params.extend(names.iter().map(|n| (n.as_str(), "x")));
    assert_error(&cmq.call("BatchSendMessage", &params).await, 4000, 10370);
    let big = "x".repeat(33 * 1024);
    let too_large = cmq
        .call(
            "BatchSendMessage",
            &[
                ("queueName", "indexed"),
                ("msgBody.1", &big),
                ("msgBody.2", &big),
            ],
        )
        .await;
    assert_error(&too_large, 4470, 10300);
    // A name given twice.
    let mut pairs = cmq.signed(&Options::default(), "ListQueue", &[]);
    pairs.push(("limit".into(), "1".into()));
    pairs.push(("limit".into(), "2".into()));
    assert_error(&cmq.send("POST", &pairs).await, 4000, 10330);
    broker.stop().await;
}

#[tokio::test]
async fn errors_have_cmq_codes() {
    let broker = HttpBroker::start().await;
    let cmq = broker.client(ALICE);
    assert_error(&cmq.call("NoSuchAction", &[]).await, 4000, 10280);
    assert_error(
        &cmq.call("SendMessage", &[("msgBody", "x")]).await,
        4000,
        10010,
    );
    assert_error(
        &cmq.call("SendMessage", &[("queueName", "missing"), ("msgBody", "x")])
            .await,
        4440,
        10100,
    );
    create_queue(&cmq, "errors").await;
    assert_error(
        &cmq.call("SendMessage", &[("queueName", "errors"), ("msgBody", "")])
            .await,
        4000,
        10120,
    );
    assert_error(
        &cmq.call(
            "SendMessage",
            &[
                ("queueName", "errors"),
                ("msgBody", "x"),
                ("delaySeconds", "soon"),
            ],
        )
        .await,
        4000,
        10360,
    );
    assert_error(
        &cmq.call(
            "ReceiveMessage",
            &[("queueName", "errors"), ("pollingWaitSeconds", "0")],
        )
        .await,
        7000,
        10200,
    );
    let empty = cmq
        .call(
            "ReceiveMessage",
            &[("queueName", "errors"), ("pollingWaitSeconds", "0")],
        )
        .await;
    assert_eq!(empty["message"], "(10200)no message");
    assert_error(
        &cmq.call(
            "DeleteMessage",
            &[
                ("queueName", "errors"),
                ("receiptHandle", "0000000000000001ffffffffffffffff"),
            ],
        )
        .await,
        4430,
        10260,
    );
    assert_error(
        &cmq.call("CreateQueue", &[("queueName", "Errors")]).await,
        4460,
        10550,
    );
    // Batch delete: one good handle and one stale: 6010 with the failure listed.
    cmq.call("SendMessage", &[("queueName", "errors"), ("msgBody", "x")])
        .await;
    let received = cmq.call("ReceiveMessage", &[("queueName", "errors")]).await;
    let handle = received["receiptHandle"].as_str().unwrap();
    let partial = cmq
        .call(
            "BatchDeleteMessage",
            &[
                ("queueName", "errors"),
                ("receiptHandle.1", handle),
                ("receiptHandle.2", "0000000000000001ffffffffffffffff"),
            ],
        )
        .await;
    assert_error(&partial, 6010, 10150);
    let failures = partial["errorList"].as_array().unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0]["code"], 4430);
    assert_eq!(
        failures[0]["receiptHandle"],
        "0000000000000001ffffffffffffffff"
    );
    // Transport: method, size, path.
    let (status, body) = cmq.send_raw("PUT", "Action=ListQueue").await;
    assert_eq!(status, 200);
    assert_error(&serde_json::from_str(&body).unwrap(), 4000, 10410);
    let huge = format!("Action=ListQueue&pad={}", "x".repeat(1024 * 1024));
    let (status, body) = cmq.send_raw("POST", &huge).await;
    assert_eq!(status, 200);
    assert_error(&serde_json::from_str(&body).unwrap(), 4000, 10420);
    let (status, _) = reqwest::get(format!("{}/v2/other.php", broker.endpoint()))
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 404);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_wait_over_http_without_a_thread_each() {
    let broker = HttpBroker::start().await;
    let cmq = broker.client(ALICE);
    create_queue(&cmq, "polled").await;
    // Empty after the wait: 7000, no earlier than asked.
    let started = cmqd::clock::monotonic_now();
    let empty = cmq
        .call(
            "ReceiveMessage",
            &[("queueName", "polled"), ("pollingWaitSeconds", "1")],
        )
        .await;
    assert_error(&empty, 7000, 10200);
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Many waiters at once, each woken by a send (over the binary protocol).
    let waiters = 20;
    let mut polls = Vec::new();
    for _ in 0..waiters {
        let cmq = broker.client(ALICE);
        polls.push(tokio::spawn(async move {
            cmq.call(
                "ReceiveMessage",
                &[("queueName", "polled"), ("pollingWaitSeconds", "20")],
            )
            .await
        }));
    }
    broker.server.wait_for_waiters(waiters).await;
    let tcp = broker.server.alice().await;
    let started = cmqd::clock::monotonic_now();
    for i in 0..waiters {
        tcp.queue("polled")
            .send_message(format!("m{i}"), 0)
            .await
            .unwrap();
    }
    let mut bodies = Vec::new();
    for poll in polls {
        let reply = poll.await.unwrap();
        assert_ok(&reply);
        bodies.push(reply["msgBody"].as_str().unwrap().to_string());
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), waiters, "each message went to one waiter");

    // A batch receive waits too, and the queue's pollingWaitSeconds is the default wait.
    assert_ok(
        &cmq.call(
            "SetQueueAttributes",
            &[("queueName", "polled"), ("pollingWaitSeconds", "20")],
        )
        .await,
    );
    let batch_cmq = broker.client(ALICE);
    let batch = tokio::spawn(async move {
        batch_cmq
            .call(
                "BatchReceiveMessage",
                &[("queueName", "polled"), ("numOfMsg", "4")],
            )
            .await
    });
    broker.server.wait_for_waiters(1).await;
    assert_ok(
        &cmq.call(
            "SendMessage",
            &[("queueName", "polled"), ("msgBody", "late")],
        )
        .await,
    );
    let batch = batch.await.unwrap();
    assert_ok(&batch);
    assert_eq!(batch["msgInfoList"][0]["msgBody"], "late");
    assert_error(
        &cmq.call(
            "ReceiveMessage",
            &[("queueName", "polled"), ("pollingWaitSeconds", "31")],
        )
        .await,
        4000,
        10350,
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_between_http_and_the_binary_protocol() {
    let broker = HttpBroker::start().await;
    let cmq = broker.client(ALICE);
    let tcp = broker.server.alice().await;
    create_queue(&cmq, "bridge").await;
    let queue = tcp.queue("bridge");

    // HTTP -> TCP.
    let sent = cmq
        .call(
            "SendMessage",
            &[("queueName", "bridge"), ("msgBody", "from http")],
        )
        .await;
    assert_ok(&sent);
    let message = queue.receive_message(Some(0)).await.unwrap();
    assert_eq!(&message.body[..], b"from http");
    assert_eq!(message.msg_id.to_string(), sent["msgId"].as_str().unwrap());
    // ... deleted over HTTP with the handle TCP got.
    assert_ok(
        &cmq.call(
            "DeleteMessage",
            &[
                ("queueName", "bridge"),
                ("receiptHandle", &message.receipt_handle),
            ],
        )
        .await,
    );

    // TCP -> HTTP.
    let msg_id = queue.send_message("from tcp", 0).await.unwrap();
    let received = cmq.call("ReceiveMessage", &[("queueName", "bridge")]).await;
    assert_ok(&received);
    assert_eq!(received["msgBody"], "from tcp");
    assert_eq!(received["msgId"], msg_id.to_string());
    assert_eq!(received["dequeueCount"], 1);
    let enqueue = received["enqueueTime"].as_u64().unwrap();
    let now = now_seconds() as u64;
    assert!(
        enqueue <= now && enqueue + 60 > now,
        "enqueueTime in seconds"
    );
    queue
        .delete_message(received["receiptHandle"].as_str().unwrap())
        .await
        .unwrap();
    let attributes = queue.get_attributes().await.unwrap();
    assert_eq!(attributes.active_msg_num + attributes.inactive_msg_num, 0);

    // Accounts are the same on both sides: bob sees none of alice's queues.
    let bob = broker.client(super::support::BOB);
    let listed = bob.call("ListQueue", &[]).await;
    assert_eq!(listed["totalCount"], 0);
    broker.stop().await;
}

#[tokio::test]
async fn topics_route_to_queues_over_http() {
    let broker = HttpBroker::start().await;
    let cmq = broker.client(ALICE);
    create_queue(&cmq, "apples").await;
    create_queue(&cmq, "everything").await;
    let created = cmq
        .call(
            "CreateTopic",
            &[("topicName", "fruit"), ("filterType", "1")],
        )
        .await;
    assert_ok(&created);
    assert!(created["topicId"].as_str().unwrap().starts_with("topic-"));
    // Publishing with no subscription: 6030/10650.
    assert_error(
        &cmq.call(
            "PublishMessage",
            &[("topicName", "fruit"), ("msgBody", "x")],
        )
        .await,
        6030,
        10650,
    );
    let subscribed = cmq
        .call(
            "Subscribe",
            &[
                ("topicName", "fruit"),
                ("subscriptionName", "apples-only"),
                ("protocol", "queue"),
                ("endpoint", "apples"),
                ("notifyContentFormat", "SIMPLIFIED"),
                ("filterTag.1", "apple"),
            ],
        )
        .await;
    assert_ok(&subscribed);
    assert!(subscribed["subscriptionId"]
        .as_str()
        .unwrap()
        .starts_with("subsc-"));
    assert_ok(
        &cmq.call(
            "Subscribe",
            &[
                ("topicName", "fruit"),
                ("subscriptionName", "all"),
                ("protocol", "queue"),
                ("endpoint", "everything"),
                ("notifyContentFormat", "SIMPLIFIED"),
            ],
        )
        .await,
    );
    assert_error(
        &cmq.call(
            "Subscribe",
            &[
                ("topicName", "fruit"),
                ("subscriptionName", "json-queue"),
                ("protocol", "queue"),
                ("endpoint", "everything"),
                ("notifyContentFormat", "JSON"),
            ],
        )
        .await,
        4000,
        10640,
    );
    let published = cmq
        .call(
            "PublishMessage",
            &[
                ("topicName", "fruit"),
                ("msgBody", "red apple"),
                ("msgTag.1", "apple"),
                ("msgTag.2", "red"),
                ("routingKey", ""),
            ],
        )
        .await;
    assert_ok(&published);
    assert!(published["msgId"].is_string());
    let batch = cmq
        .call(
            "BatchPublishMessage",
            &[
                ("topicName", "fruit"),
                ("msgBody.1", "pear 1"),
                ("msgBody.2", "pear 2"),
                ("msgTag.1", "pear"),
            ],
        )
        .await;
    assert_ok(&batch);
    assert_eq!(batch["msgList"].as_array().unwrap().len(), 2);

    let apples = cmq
        .call(
            "BatchReceiveMessage",
            &[("queueName", "apples"), ("numOfMsg", "16")],
        )
        .await;
    assert_eq!(
        apples["msgInfoList"].as_array().unwrap().len(),
        1,
        "{apples}"
    );
    let everything = cmq
        .call(
            "BatchReceiveMessage",
            &[("queueName", "everything"), ("numOfMsg", "16")],
        )
        .await;
    assert_eq!(everything["msgInfoList"].as_array().unwrap().len(), 3);

    let attributes = cmq
        .call(
            "GetSubscriptionAttributes",
            &[("topicName", "fruit"), ("subscriptionName", "apples-only")],
        )
        .await;
    assert_ok(&attributes);
    assert_eq!(attributes["protocol"], "queue");
    assert_eq!(attributes["endpoint"], "apples");
    assert_eq!(attributes["filterTag"], serde_json::json!(["apple"]));
    assert_ok(
        &cmq.call(
            "ClearSubscriptionFilterTags",
            &[("topicName", "fruit"), ("subscriptionName", "apples-only")],
        )
        .await,
    );
    let listed = cmq
        .call(
            "ListSubscriptionByTopic",
            &[("topicName", "fruit"), ("limit", "1"), ("offset", "1")],
        )
        .await;
    assert_eq!(listed["totalCount"], 2);
    assert_eq!(listed["subscriptionList"].as_array().unwrap().len(), 1);
    assert_error(
        &cmq.call("DeleteTopic", &[("topicName", "fruit")]).await,
        4000,
        10540,
    );
    for name in ["apples-only", "all"] {
        assert_ok(
            &cmq.call(
                "Unsubscribe",
                &[("topicName", "fruit"), ("subscriptionName", name)],
            )
            .await,
        );
    }
    assert_ok(&cmq.call("DeleteTopic", &[("topicName", "fruit")]).await);
    let topics = cmq.call("ListTopic", &[]).await;
    assert_eq!(topics["totalCount"], 0);
    broker.stop().await;
}

#[tokio::test]
async fn shutdown_ends_a_long_poll_with_no_message() {
    let broker = HttpBroker::start().await;
    let cmq = broker.client(ALICE);
    create_queue(&cmq, "closing").await;
    let poll = tokio::spawn(async move {
        cmq.call(
            "ReceiveMessage",
            &[("queueName", "closing"), ("pollingWaitSeconds", "30")],
        )
        .await
    });
    broker.server.wait_for_waiters(1).await;
    let started = cmqd::clock::monotonic_now();
    broker.token.cancel();
    let reply = poll.await.unwrap();
    assert_error(&reply, 7000, 10200);
    assert!(started.elapsed() < Duration::from_secs(5));
    broker.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_during_a_long_poll_takes_nothing() {
    use tokio::io::AsyncWriteExt;
    let broker = HttpBroker::start().await;
    let cmq = broker.client(ALICE);
    create_queue(&cmq, "gone").await;
    let pairs = cmq.signed(
        &Options::default(),
        "ReceiveMessage",
        &[("queueName", "gone"), ("pollingWaitSeconds", "20")],
    );
    let body = encode(&pairs);
    let mut stream = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let request = format!(
        "POST /v2/index.php HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n{body}",
        broker.addr,
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    broker.server.wait_for_waiters(1).await;
    // The connection closes: the wait ends with it, so the next message is not taken for a
    // client that is gone.
    drop(stream);
    broker.server.wait_for_waiters(0).await;
    assert_ok(
        &cmq.call("SendMessage", &[("queueName", "gone"), ("msgBody", "kept")])
            .await,
    );
    let received = cmq
        .call(
            "ReceiveMessage",
            &[("queueName", "gone"), ("pollingWaitSeconds", "0")],
        )
        .await;
    assert_eq!(received["msgBody"], "kept", "{received}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = HttpBroker::start_with(HttpApiConfig {
        connections_max: 1,
        ..HttpApiConfig::default()
    })
    .await;
    let cmq = broker.client(ALICE);
    let pairs = cmq.signed(&Options::default(), "ListQueue", &[]);
    let body = encode(&pairs);
    let request = format!(
        "POST /v2/index.php HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n{body}",
        broker.addr,
        body.len()
    );
    // The one connection allowed, kept alive after a request.
    let mut first = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    first.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // A second one is closed at once. (Idle connections closing: `http_hostile`.)
    let mut second = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .expect("the second connection should be closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    drop(first);
    broker.stop().await;
}
