//! The `cmq` binary against a real broker: each test starts one in-process on 127.0.0.1 with an
//! ephemeral port and runs the built binary as a child process.

// Test code: a panic is a failed test. (clippy's allow-unwrap-in-tests covers `#[test]` functions
// only, not the helpers of an integration test crate.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use cmqd::config::{AccountConfig, Limits};
use cmqd::server::{RunningServer, Server, ServerOptions};

const SECRET_ID: &str = "AKIDtest";
const SECRET_KEY: &str = "test-secret-key-0123";

/// A broker on its own multi-thread runtime: its workers keep serving while the test thread
/// blocks on a child process.
struct Broker {
    runtime: tokio::runtime::Runtime,
    server: Option<RunningServer>,
    endpoint: String,
    /// Working directory of the children, so no `./cmqd-data` of the repository is picked up.
    cwd: tempfile::TempDir,
}

impl Broker {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = runtime
            .block_on(Server::bind(ServerOptions {
                listen: "127.0.0.1:0".parse().unwrap(),
                limits: Limits::default(),
                accounts: vec![AccountConfig {
                    name: "test".into(),
                    secret_id: SECRET_ID.into(),
                    secret_key: SECRET_KEY.into(),
                }],
            }))
            .unwrap();
        let server = {
            let _guard = runtime.enter();
            server.spawn().unwrap()
        };
        let endpoint = server.addr().to_string();
        Self {
            runtime,
            server: Some(server),
            endpoint,
            cwd: tempfile::tempdir().unwrap(),
        }
    }

    /// `cmq` with the endpoint only: no credentials, no `CMQ_*` variables from outside.
    fn bare(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cmq"));
        for var in [
            "CMQ_ENDPOINT",
            "CMQ_SECRET_ID",
            "CMQ_SECRET_KEY",
            "CMQ_CREDENTIALS",
        ] {
            command.env_remove(var);
        }
        command
            .current_dir(self.cwd.path())
            .args(["--endpoint", &self.endpoint, "--timeout", "5"]);
        command
    }

    /// `cmq` with the test account's credentials.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = self.bare();
        command
            .args(["--secret-id", SECRET_ID, "--secret-key", SECRET_KEY])
            .args(args);
        command
    }

    /// Runs `cmq args...` in text mode.
    fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().unwrap())
    }

    /// Runs `cmq --json args...` and parses stdout.
    fn json(&self, args: &[&str]) -> (i32, Value) {
        let run = self.run(&[&["--json"][..], args].concat());
        (run.code, run.json())
    }

    /// Runs `cmq --json args...`, asserting success.
    fn ok(&self, args: &[&str]) -> Value {
        let run = self.run(&[&["--json"][..], args].concat());
        assert_eq!(run.code, 0, "cmq {args:?} failed: {run:?}");
        run.json()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = self.runtime.block_on(server.shutdown());
        }
    }
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        Self {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }
}

fn error_code(value: &Value) -> u64 {
    value["error"]["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("no error code in {value}"))
}

fn queue_names(list: &Value) -> Vec<String> {
    list["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["queue_name"].as_str().unwrap().to_string())
        .collect()
}

fn handles(received: &Value) -> Vec<String> {
    received["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["receipt_handle"].as_str().unwrap().to_string())
        .collect()
}

fn bodies(messages: &Value) -> Vec<String> {
    let mut bodies: Vec<String> = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect();
    bodies.sort();
    bodies
}

#[test]
fn queue_create_list_attributes_set_delete() {
    let broker = Broker::start();

    let run = broker.run(&["queue", "create", "orders"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("created queue orders"), "{run:?}");

    let created = broker.ok(&[
        "queue",
        "create",
        "invoices",
        "--visibility-timeout",
        "45",
        "--polling-wait-seconds",
        "2",
        "--max-msg-size",
        "2048",
    ]);
    assert_eq!(created["queue_name"], "invoices");
    assert!(created["queue_id"].is_u64());

    // A second create of the same name is refused with 4460.
    let run = broker.run(&["queue", "create", "ORDERS"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.starts_with("error: cmq error 4460/"), "{run:?}");

    let list = broker.ok(&["queue", "list"]);
    assert_eq!(list["total_count"], 2);
    assert_eq!(queue_names(&list), ["invoices", "orders"]);
    let list = broker.ok(&["queue", "list", "--search", "ord"]);
    assert_eq!(queue_names(&list), ["orders"]);
    let list = broker.ok(&["queue", "list", "--offset", "1", "--limit", "1"]);
    assert_eq!(list["total_count"], 2);
    assert_eq!(queue_names(&list), ["orders"]);
    let run = broker.run(&["queue", "list"]);
    assert!(run.stdout.starts_with("QUEUE ID"), "{run:?}");
    assert!(
        run.stdout.contains("invoices") && run.stdout.contains("2 queues"),
        "{run:?}"
    );

    let attributes = broker.ok(&["queue", "attributes", "invoices"]);
    assert_eq!(attributes["queue_name"], "invoices");
    assert_eq!(attributes["visibility_timeout_seconds"], 45);
    assert_eq!(attributes["polling_wait_seconds"], 2);
    assert_eq!(attributes["max_msg_size_bytes"], 2048);
    assert_eq!(attributes["active_msg_num"], 0);
    assert!(attributes["create_time_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert!(attributes["dead_letter_policy"].is_null());
    let run = broker.run(&["queue", "get", "invoices"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("visibilityTimeout"), "{run:?}");
    assert!(run.stdout.contains(" UTC ("), "{run:?}");

    broker.ok(&["queue", "set", "invoices", "--visibility-timeout", "60"]);
    let attributes = broker.ok(&["queue", "attributes", "invoices"]);
    assert_eq!(attributes["visibility_timeout_seconds"], 60);
    assert_eq!(attributes["polling_wait_seconds"], 2, "unchanged");

    // Dead-letter policy, its sources, and its removal.
    broker.ok(&[
        "queue",
        "set",
        "orders",
        "--dead-letter-queue",
        "invoices",
        "--dead-letter-policy",
        "0",
        "--max-receive-count",
        "3",
    ]);
    let attributes = broker.ok(&["queue", "attributes", "orders"]);
    assert_eq!(
        attributes["dead_letter_policy"]["dead_letter_queue"],
        "invoices"
    );
    assert_eq!(attributes["dead_letter_policy"]["policy"], 0);
    assert_eq!(attributes["dead_letter_policy"]["max_receive_count"], 3);
    let sources = broker.ok(&["queue", "dead-letter-sources", "invoices"]);
    assert_eq!(queue_names(&sources), ["orders"]);
    let run = broker.run(&["queue", "attributes", "invoices"]);
    assert!(
        run.stdout.contains("deadLetterSources    orders"),
        "{run:?}"
    );
    broker.ok(&["queue", "set", "orders", "--no-dead-letter"]);
    let attributes = broker.ok(&["queue", "attributes", "orders"]);
    assert!(attributes["dead_letter_policy"].is_null());
    let redriven = broker.ok(&["queue", "redrive", "invoices"]);
    assert_eq!(redriven["redriven"], 0);

    // `set` without anything to change is a usage error.
    let run = broker.run(&["queue", "set", "orders"]);
    assert_eq!(run.code, 2, "{run:?}");

    let run = broker.run(&["queue", "delete", "orders"]);
    assert_eq!(run.code, 0, "{run:?}");
    let (code, error) = broker.json(&["queue", "attributes", "orders"]);
    assert_eq!(code, 1);
    assert_eq!(error_code(&error), 4440);
    assert_eq!(error["error"]["module"], 10100);
    let list = broker.ok(&["queue", "list"]);
    assert_eq!(queue_names(&list), ["invoices"]);
}

#[test]
fn send_receive_and_delete_by_handle() {
    let broker = Broker::start();
    broker.ok(&["queue", "create", "jobs"]);

    let sent = broker.ok(&["send", "jobs", "one"]);
    assert_eq!(sent["msg_ids"].as_array().unwrap().len(), 1);
    let sent = broker.ok(&["send", "jobs", "two", "three", "four"]);
    assert_eq!(sent["msg_ids"].as_array().unwrap().len(), 3);
    // Text mode prints the ids, one a line.
    let run = broker.run(&["send", "jobs", "five"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.trim().parse::<u64>().is_ok(), "{run:?}");

    let received = broker.ok(&["receive", "jobs", "--count", "16", "--wait", "0"]);
    assert_eq!(bodies(&received), ["five", "four", "one", "three", "two"]);
    let first = &received["messages"][0];
    assert_eq!(first["dequeue_count"], 1);
    assert_eq!(first["body_bytes"], first["body"].as_str().unwrap().len());
    assert!(first["next_visible_time_ms"].as_u64() > first["enqueue_time_ms"].as_u64());
    assert!(first["dead_letter"].is_null());
    let handles = handles(&received);

    // One handle: DeleteMessage.
    let run = broker.run(&["delete", "jobs", &handles[0]]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("deleted 1 message"), "{run:?}");
    // Reusing it fails with 4430.
    let (code, error) = broker.json(&["delete", "jobs", &handles[0]]);
    assert_eq!(code, 1);
    assert_eq!(error_code(&error), 4430);

    // Several: BatchDeleteMessage; one stale handle makes a partial failure listed per handle.
    let mut args = vec!["delete", "jobs"];
    args.extend(handles[1..].iter().map(String::as_str));
    args.push(&handles[0]);
    let (code, error) = broker.json(&args);
    assert_eq!(code, 1, "{error}");
    assert_eq!(error_code(&error), 6010);
    let failures = error["error"]["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0]["receipt_handle"], handles[0].as_str());
    assert_eq!(failures[0]["code"], 4430);

    let attributes = broker.ok(&["queue", "attributes", "jobs"]);
    assert_eq!(attributes["active_msg_num"], 0);
    assert_eq!(attributes["inactive_msg_num"], 0);
}

#[test]
fn receive_with_delete_peek_stdin_and_visibility() {
    let broker = Broker::start();
    broker.ok(&["queue", "create", "work"]);

    // A body from stdin, kept as is.
    let mut command = broker.command(&["--json", "send", "work", "-"]);
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"from stdin\n").unwrap();
    }
    let run = Run::from(child.wait_with_output().unwrap());
    assert_eq!(run.code, 0, "{run:?}");
    broker.ok(&["send", "work", "second"]);

    let peeked = broker.ok(&["peek", "work"]);
    assert_eq!(bodies(&peeked), ["from stdin\n", "second"]);
    assert_eq!(peeked["messages"][0]["state"], "active");
    let run = broker.run(&["peek", "work", "--count", "1"]);
    assert!(
        run.stdout.contains("state") && run.stdout.contains("active"),
        "{run:?}"
    );

    // Receive one, make it visible again at once, and receive it again.
    let received = broker.ok(&["receive", "work", "--wait", "0"]);
    let handle = handles(&received).remove(0);
    let peeked = broker.ok(&["peek", "work"]);
    let states: Vec<&str> = peeked["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["state"].as_str().unwrap())
        .collect();
    assert!(states.contains(&"inactive"), "{peeked}");
    let run = broker.run(&["change-visibility", "work", &handle, "0"]);
    assert_eq!(run.code, 0, "{run:?}");

    // Text output shows the fields and says what --delete did.
    let run = broker.run(&["receive", "work", "--count", "2", "--wait", "0", "--delete"]);
    assert_eq!(run.code, 0, "{run:?}");
    for field in [
        "msgId",
        "receiptHandle",
        "dequeueCount",
        "enqueueTime",
        "nextVisibleTime",
        "body",
    ] {
        assert!(run.stdout.contains(field), "{field} missing: {run:?}");
    }
    assert!(run.stdout.contains("deleted 2 messages"), "{run:?}");
    assert!(run.stdout.contains("dequeueCount      2"), "{run:?}");

    let peeked = broker.ok(&["peek", "work"]);
    assert_eq!(peeked["messages"].as_array().unwrap().len(), 0);

    // --delete with --json.
    broker.ok(&["send", "work", "x", "y"]);
    let received = broker.ok(&["receive", "work", "--count", "2", "--wait", "0", "--delete"]);
    assert_eq!(bodies(&received), ["x", "y"]);
    assert_eq!(received["deleted"], 2);
    let attributes = broker.ok(&["queue", "attributes", "work"]);
    assert_eq!(attributes["active_msg_num"], 0);
    assert_eq!(attributes["inactive_msg_num"], 0);
}

#[test]
fn empty_receive_exits_3() {
    let broker = Broker::start();
    broker.ok(&["queue", "create", "empty"]);

    let run = broker.run(&["receive", "empty", "--wait", "0"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert_eq!(run.stdout.trim(), "no message");
    assert!(run.stderr.is_empty(), "{run:?}");

    // A long poll of one second, batch form, JSON.
    let (code, value) = broker.json(&["receive", "empty", "--wait", "1", "--count", "4"]);
    assert_eq!(code, 3);
    assert_eq!(value["code"], 7000);
    assert_eq!(value["messages"].as_array().unwrap().len(), 0);

    // A missing queue is an error, not "no message".
    let (code, error) = broker.json(&["receive", "missing", "--wait", "0"]);
    assert_eq!(code, 1);
    assert_eq!(error_code(&error), 4440);
}

#[test]
fn purge_and_rewind() {
    let broker = Broker::start();
    broker.ok(&["queue", "create", "plain"]);
    broker.ok(&["send", "plain", "a", "b", "c"]);
    let purged = broker.ok(&["purge", "plain"]);
    assert_eq!(purged["purged"], 3);
    let peeked = broker.ok(&["peek", "plain"]);
    assert_eq!(peeked["messages"].as_array().unwrap().len(), 0);
    let run = broker.run(&["purge", "plain"]);
    assert_eq!(run.stdout.trim(), "purged 0 messages");

    // Rewind is off by default: refused with 6050.
    let (code, error) = broker.json(&["rewind", "plain", "--seconds-ago", "60"]);
    assert_eq!(code, 1);
    assert_eq!(error_code(&error), 6050);
    // One of --since and --seconds-ago is required.
    assert_eq!(broker.run(&["rewind", "plain"]).code, 2);

    // With a rewind window, a consumed message comes back.
    broker.ok(&["queue", "create", "replay", "--rewind-seconds", "3600"]);
    broker.ok(&["send", "replay", "again"]);
    broker.ok(&["receive", "replay", "--wait", "0", "--delete"]);
    let rewound = broker.ok(&["rewind", "replay", "--seconds-ago", "60"]);
    assert_eq!(rewound["rewound"], 1);
    let received = broker.ok(&["receive", "replay", "--wait", "0"]);
    assert_eq!(bodies(&received), ["again"]);
}

#[test]
fn wrong_secret_key_is_refused() {
    let broker = Broker::start();
    let run = Run::from(
        broker
            .bare()
            .args([
                "--secret-id",
                SECRET_ID,
                "--secret-key",
                "not-the-right-key-000",
            ])
            .args(["--json", "queue", "list"])
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(error_code(&run.json()), 4100);
    assert!(run.stderr.contains("cmq error 4100/"), "{run:?}");

    let run = Run::from(
        broker
            .bare()
            .args([
                "--secret-id",
                "AKIDnobody",
                "--secret-key",
                SECRET_KEY,
                "queue",
                "list",
            ])
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("cmq error 4100/"), "{run:?}");
}

fn write_credentials(path: &Path) {
    std::fs::write(
        path,
        format!("name = \"test\"\nsecret_id = \"{SECRET_ID}\"\nsecret_key = \"{SECRET_KEY}\"\n"),
    )
    .unwrap();
}

#[test]
fn credentials_from_a_file() {
    let broker = Broker::start();

    // Nothing given, nothing in ./cmqd-data: a clear error.
    let run = Run::from(broker.bare().args(["queue", "list"]).output().unwrap());
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("--secret-id"), "{run:?}");
    assert!(run.stderr.contains("--credentials"), "{run:?}");

    // --credentials FILE.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("creds.toml");
    write_credentials(&file);
    let run = Run::from(
        broker
            .bare()
            .arg("--credentials")
            .arg(&file)
            .args(["queue", "create", "from-file"])
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 0, "{run:?}");

    // CMQ_CREDENTIALS.
    let run = Run::from(
        broker
            .bare()
            .env("CMQ_CREDENTIALS", &file)
            .args(["--json", "queue", "list"])
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(queue_names(&run.json()), ["from-file"]);

    // The default, ./cmqd-data/credentials.toml, as a broker started here would write it.
    let data_dir = broker.cwd.path().join("cmqd-data");
    std::fs::create_dir(&data_dir).unwrap();
    write_credentials(&data_dir.join(cmqd::config::CREDENTIALS_FILE));
    let run = Run::from(
        broker
            .bare()
            .args(["--json", "queue", "list"])
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(queue_names(&run.json()), ["from-file"]);

    // Explicit id and key win over the file.
    let run = Run::from(
        broker
            .bare()
            .args([
                "--secret-id",
                SECRET_ID,
                "--secret-key",
                "not-the-right-key-000",
            ])
            .args(["queue", "list"])
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 1, "{run:?}");

    // A missing file is an error that names it.
    let run = Run::from(
        broker
            .bare()
            .args(["--credentials", "no-such-file.toml", "queue", "list"])
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("no-such-file.toml"), "{run:?}");
}

#[test]
fn usage_errors_exit_2() {
    let broker = Broker::start();
    assert_eq!(broker.run(&["receive"]).code, 2);
    assert_eq!(broker.run(&["receive", "q", "--count", "0"]).code, 2);
    assert_eq!(broker.run(&["send", "q"]).code, 2);
    assert_eq!(broker.run(&["send", "q", "-", "-"]).code, 2);
    assert_eq!(
        broker
            .run(&["queue", "create", "q", "--dead-letter-policy", "1"])
            .code,
        2
    );
}

#[test]
fn topics_and_subscriptions() {
    let broker = Broker::start();
    broker.ok(&["queue", "create", "paid-orders"]);
    broker.ok(&["queue", "create", "all-orders"]);

    let created = broker.ok(&["topic", "create", "orders", "--max-msg-size", "4096"]);
    assert_eq!(created["topic_name"], "orders");
    assert!(created["topic_id"].is_u64());
    let routed = broker.ok(&["topic", "create", "routed", "--filter-type", "2"]);
    assert!(routed["topic_id"].is_u64());

    // No subscription yet: 6030.
    let (code, value) = broker.json(&["topic", "publish", "orders", "x"]);
    assert_eq!(code, 1);
    assert_eq!(error_code(&value), 6030);

    let sub = broker.ok(&[
        "sub",
        "create",
        "orders",
        "paid",
        "--queue",
        "paid-orders",
        "--filter-tag",
        "paid",
    ]);
    assert_eq!(sub["subscription_name"], "paid");
    broker.ok(&["sub", "create", "orders", "all", "--queue", "all-orders"]);
    let run = broker.run(&["sub", "create", "orders", "bad", "--url", "ftp://nope"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.starts_with("error: cmq error 4000/10500"),
        "{run:?}"
    );

    let published = broker.ok(&["topic", "publish", "orders", "o1", "o2", "--tag", "paid"]);
    assert_eq!(published["msg_ids"].as_array().unwrap().len(), 2);
    broker.ok(&["topic", "publish", "orders", "o3"]);
    let paid = broker.ok(&["receive", "paid-orders", "--count", "16", "--wait", "0"]);
    assert_eq!(bodies(&paid), ["o1", "o2"]);
    let all = broker.ok(&["receive", "all-orders", "--count", "16", "--wait", "0"]);
    assert_eq!(bodies(&all), ["o1", "o2", "o3"]);

    let list = broker.ok(&["sub", "list", "orders"]);
    assert_eq!(list["total_count"], 2);
    assert_eq!(list["subscriptions"][0]["subscription_name"], "all");
    assert_eq!(list["subscriptions"][1]["endpoint"], "paid-orders");
    let run = broker.run(&["sub", "list", "orders"]);
    assert!(run.stdout.starts_with("SUBSCRIPTION ID"), "{run:?}");

    let attributes = broker.ok(&["sub", "attributes", "orders", "paid"]);
    assert_eq!(attributes["filter_tags"], serde_json::json!(["paid"]));
    assert_eq!(attributes["delivered_count"], 2);
    assert_eq!(attributes["notify_content_format"], "SIMPLIFIED");
    broker.ok(&[
        "sub",
        "set",
        "orders",
        "paid",
        "--notify-strategy",
        "BACKOFF_RETRY",
    ]);
    broker.ok(&["sub", "clear-tags", "orders", "paid"]);
    let attributes = broker.ok(&["sub", "get", "orders", "paid"]);
    assert_eq!(attributes["filter_tags"], serde_json::json!([]));
    assert_eq!(attributes["notify_strategy"], "BACKOFF_RETRY");
    let run = broker.run(&["sub", "get", "orders", "paid"]);
    assert!(run.stdout.contains("BACKOFF_RETRY"), "{run:?}");

    let topic = broker.ok(&["topic", "attributes", "orders"]);
    assert_eq!(topic["max_msg_size_bytes"], 4096);
    assert_eq!(topic["filter_type"], 1);
    broker.ok(&["topic", "set", "orders", "--max-msg-size", "8192"]);
    assert_eq!(
        broker.ok(&["topic", "get", "orders"])["max_msg_size_bytes"],
        8192
    );
    let list = broker.ok(&["topic", "list"]);
    assert_eq!(list["total_count"], 2);

    // Deleting a topic with subscriptions is refused (4000/10540).
    let (code, value) = broker.json(&["topic", "delete", "orders"]);
    assert_eq!((code, error_code(&value)), (1, 4000));
    assert_eq!(value["error"]["module"], 10540);
    broker.ok(&["sub", "delete", "orders", "paid"]);
    broker.ok(&["subscription", "delete", "orders", "all"]);
    broker.ok(&["topic", "delete", "orders"]);
    let (code, value) = broker.json(&["topic", "get", "orders"]);
    assert_eq!((code, error_code(&value)), (1, 4440));

    // Nothing to change is a usage error.
    let run = broker.run(&["sub", "set", "routed", "x"]);
    assert_eq!(run.code, 2, "{run:?}");
}

/// A cluster view that says this node leads group 0 of two nodes, node 3 lagging.
#[derive(Debug)]
struct LeaderView;

impl cmqd::broker::ClusterView for LeaderView {
    fn redirect(&self) -> Option<cmqd::broker::Redirect> {
        None
    }

    fn status(&self) -> cmqd::model::ClusterStatus {
        use cmqd::model::{ClusterNode, ClusterStatus, GroupStatus, ReplicationStatus};
        ClusterStatus {
            node_id: 1,
            nodes: vec![
                ClusterNode {
                    id: 1,
                    peer: "127.0.0.1:7401".into(),
                    api: "127.0.0.1:7301".into(),
                    http: "127.0.0.1:8081".into(),
                },
                ClusterNode {
                    id: 3,
                    peer: "127.0.0.1:7403".into(),
                    api: "127.0.0.1:7303".into(),
                    http: String::new(),
                },
            ],
            groups: vec![GroupStatus {
                group: 0,
                leader: Some(1),
                term: 4,
                role: "leader".into(),
                last_log_index: 50,
                committed: 48,
                applied: 47,
                digest: 0xfeed,
                voting: true,
                replication: vec![ReplicationStatus {
                    node: 3,
                    matched: Some(45),
                }],
            }],
        }
    }
}

#[test]
fn cluster_status_of_a_single_node_and_of_a_cluster_leader() {
    let broker = Broker::start();
    let single = broker.run(&["cluster", "status"]);
    assert_eq!(single.code, 0, "{single:?}");
    assert!(single.stdout.contains("not a cluster"), "{single:?}");
    let json = broker.ok(&["cluster", "status"]);
    assert_eq!(json["cluster"], false, "{json}");

    let view: std::sync::Arc<dyn cmqd::broker::ClusterView> = std::sync::Arc::new(LeaderView);
    broker
        .server
        .as_ref()
        .unwrap()
        .shared()
        .cluster
        .set(view)
        .unwrap();
    let text = broker.run(&["cluster", "status"]);
    assert_eq!(text.code, 0, "{text:?}");
    for expected in [
        "group 0  leader 1  term 4  role leader",
        "last 50  committed 48  applied 47  digest 000000000000feed",
        "follower 3  matched 45  lag 5",
        "127.0.0.1:7303",
    ] {
        assert!(text.stdout.contains(expected), "{expected:?} in {text:?}");
    }
    let json = broker.ok(&["cluster", "status"]);
    assert_eq!(json["cluster"], true, "{json}");
    assert_eq!(json["groups"][0]["replication"][0]["lag"], 5, "{json}");
    assert_eq!(json["groups"][0]["voting"], true, "{json}");
}

/// `cmq-bench` against a broker it did not start, fan-out workload twice: each run creates its
/// topic, subscriptions and queues fresh and removes them after, so the second run finds the
/// names free and nothing is left behind (a topic with subscriptions cannot be deleted, so the
/// subscriptions must go first).
#[test]
fn bench_fan_out_runs_twice_and_leaves_nothing() {
    let broker = Broker::start();
    for run in 0..2 {
        let output = Command::new(env!("CARGO_BIN_EXE_cmq-bench"))
            .current_dir(broker.cwd.path())
            .args(["--endpoint", &broker.endpoint])
            .args(["--secret-id", SECRET_ID, "--secret-key", SECRET_KEY])
            .args([
                "--workload",
                "w4",
                "--messages",
                "200",
                "--subscriptions",
                "2",
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "cmq-bench run {run} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let topics = broker.ok(&["topic", "list"]);
    assert_eq!(
        topics["topics"].as_array().map(Vec::len),
        Some(0),
        "{topics}"
    );
    let queues = broker.ok(&["queue", "list"]);
    assert!(queue_names(&queues).is_empty(), "{queues}");
}
