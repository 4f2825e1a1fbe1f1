//! The Grafana dashboard against the broker's real metrics:
//! - every metric name a panel uses is defined in `src/metrics.rs` (no Prometheus needed);
//! - a real Prometheus scraping a real broker evaluates every panel's expression, and each one
//!   must be valid and return data;
//! - a scrape with 10,000 queues stays under a stated size.
//!
//! The Prometheus test needs the `prometheus` binary (Debian's package; `.ci/run` installs it).
//! Without it the test says so and passes only outside CI: under `CI=true` a missing Prometheus
//! fails the test, so CI can never skip it silently.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cmqd::client::QueueAttributeSet;
use cmqd::protocol::Request;
use tokio_util::sync::CancellationToken;

use crate::cluster_support::{ClusterOptions, RealCluster, CLUSTER_SECRET_ID, CLUSTER_SECRET_KEY};
use crate::http_api::Cmq;
use crate::support::{RawConn, TestServer, ALICE};

fn dashboard() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/cmqd.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// (panel title, expression) for every target of every panel.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard()["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or("").to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.clone(), expr.to_string()));
            }
        }
    }
    out
}

/// Metric names in an expression: `cmq_` identifiers, histogram suffixes removed.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("cmq_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let mut name = &expr[start..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if cmqd::metrics::ALL
                    .iter()
                    .any(|d| d.name == base && d.kind == cmqd::metrics::Kind::Histogram)
                {
                    name = base;
                }
            }
        }
        names.insert(name.to_string());
        i = end;
    }
    names
}

#[test]
fn every_metric_the_dashboard_uses_is_defined() {
    let defined: BTreeSet<&str> = cmqd::metrics::ALL.iter().map(|d| d.name).collect();
    let exprs = expressions();
    assert!(
        exprs.len() >= 16,
        "the dashboard has {} expressions",
        exprs.len()
    );
    let mut used = BTreeSet::new();
    for (title, expr) in &exprs {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "panel {title:?} uses no cmq_ metric: {expr}"
        );
        for name in names {
            assert!(
                defined.contains(name.as_str()),
                "panel {title:?} uses undefined {name}"
            );
            used.insert(name);
        }
    }
    // And the dashboard shows every metric the broker defines.
    for def in cmqd::metrics::ALL {
        assert!(used.contains(def.name), "no panel shows {}", def.name);
    }
}

fn find_prometheus() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("prometheus"))
        .find(|candidate| candidate.is_file())
}

/// Kills the Prometheus this test started (by its own PID) when the test ends, pass or fail.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_metrics(server: &TestServer, labels: usize) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    tokio::spawn(cmqd::server::observe::serve(
        listener,
        server.running.shared().clone(),
        labels,
        token.clone(),
    ));
    (addr, token)
}

async fn drive_traffic(server: &TestServer) {
    let alice = server.alice().await;
    let queue = alice.queue("dash");
    let _ = queue.create(&QueueAttributeSet::default()).await;
    for i in 0..20 {
        queue.send_message(format!("m{i}"), 0).await.unwrap();
    }
    queue.send_message("later", 600).await.unwrap();
    for _ in 0..5 {
        let message = queue.receive_message(Some(0)).await.unwrap();
        queue.delete_message(&message.receipt_handle).await.unwrap();
    }
    let _ = queue.receive_message(Some(0)).await.unwrap();
    // A topic with a queue subscription, one routed and one unrouted publish.
    let topic = alice.topic("dash-topic");
    if topic.create(&Default::default()).await.is_ok() {
        alice
            .create_subscribe(
                "dash-topic",
                "to-dash",
                &cmqd::client::SubscriptionSpec::queue("dash").filter_tags(["keep"]),
            )
            .await
            .unwrap();
    }
    topic
        .publish_message("routed", &["keep"], None)
        .await
        .unwrap();
    topic
        .publish_message("unrouted", &["other"], None)
        .await
        .unwrap();
    // An error (4440) and an empty receive (7000).
    assert!(alice.queue("missing").get_attributes().await.is_err());
    let empty = alice.queue("dash-empty");
    let _ = empty.create(&QueueAttributeSet::default()).await;
    assert!(empty
        .receive_message(Some(0))
        .await
        .unwrap_err()
        .is_no_message());
    // A rejected frame.
    let mut raw = RawConn::connect(server.addr()).await;
    raw.handshake(ALICE).await;
    raw.send_bytes(&[0, 0, 0, 8, 1, 0, 0x77, 0x77, 0, 0, 0, 1])
        .await;
    let _ = raw.recv().await;
    let _ = raw.call(3, &Request::Ping).await;
}

async fn query(client: &reqwest::Client, prometheus: &str, expr: &str) -> Result<usize, String> {
    let response = client
        .get(format!("http://{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let text = response.text().await.map_err(|e| e.to_string())?;
    let body: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    if body["status"] != "success" {
        return Err(format!("query failed: {body}"));
    }
    Ok(body["data"]["result"].as_array().map_or(0, Vec::len))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_returns_data_from_a_real_prometheus() {
    let Some(prometheus_bin) = find_prometheus() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run this test: install Debian's prometheus package (.ci/run does)"
        );
        eprintln!("SKIPPED: no `prometheus` binary on PATH (apt-get install prometheus)");
        return;
    };
    let server = TestServer::start().await;
    let (metrics_addr, token) = start_metrics(&server, 100).await;
    drive_traffic(&server).await;
    // A second broker on the durable log, so that the storage panels have data (its metrics go
    // to the same process-wide recorder the first broker's endpoint renders).
    let log_dir = tempfile::tempdir().unwrap();
    let durable = TestServer::start_durable(log_dir.path()).await;
    let durable_client = durable.alice().await;
    durable_client
        .create_queue("durable", &QueueAttributeSet::default())
        .await
        .unwrap();
    // Scraped too: gauges sampled from a broker's state at scrape time (disk use, say) are set
    // only when that broker's endpoint is scraped.
    let (durable_metrics_addr, durable_token) = start_metrics(&durable, 100).await;
    // And a 3-node cluster of real processes, for the cluster panels: its HTTP API is called on
    // every node, so that followers forward to the leader.
    let cluster = RealCluster::start(
        3,
        ClusterOptions {
            http: true,
            metrics: true,
            ..ClusterOptions::default()
        },
    )
    .await;
    let cluster_http: Vec<Cmq> = (0..3)
        .map(|i| Cmq::new(cluster.http(i), (CLUSTER_SECRET_ID, CLUSTER_SECRET_KEY)))
        .collect();
    // A follower holds the request while an election runs, so one call is enough.
    let reply = cluster_http[0]
        .call("CreateQueue", &[("queueName", "dash")])
        .await;
    assert_eq!(
        reply["code"], 0,
        "the cluster did not create a queue: {reply}"
    );
    let cluster_targets: Vec<String> = (0..3)
        .map(|i| format!("'{}'", cluster.metrics(i)))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: cmqd\n    static_configs:\n      - targets: ['{metrics_addr}', '{durable_metrics_addr}', {}]\n",
            cluster_targets.join(", ")
        ),
    )
    .unwrap();
    let web = crate::ports::free().to_string();
    let child = Command::new(prometheus_bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = ChildGuard(child);
    let client = reqwest::Client::new();

    // Wait for scrapes, driving traffic meanwhile so that rates have something to show. The
    // deadline bounds the wait; nothing is asserted about how long it takes.
    let exprs = expressions();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut missing: Vec<String>;
    loop {
        drive_traffic(&server).await;
        for i in 0..20 {
            durable_client
                .queue("durable")
                .send_message(format!("d{i}"), 0)
                .await
                .unwrap();
        }
        // Outcomes are not checked here: a call during an election may be refused (6100).
        for (i, cmq) in cluster_http.iter().enumerate() {
            cmq.call(
                "SendMessage",
                &[("queueName", "dash"), ("msgBody", &format!("c{i}"))],
            )
            .await;
        }
        missing = Vec::new();
        for (title, expr) in &exprs {
            let expr = expr.replace("$__rate_interval", "1m");
            match query(&client, &web, &expr).await {
                Ok(n) if n > 0 => {}
                Ok(_) => missing.push(format!("{title}: no data for {expr}")),
                Err(e) => missing.push(format!("{title}: {expr}: {e}")),
            }
        }
        if missing.is_empty() || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        missing.is_empty(),
        "panels without data:\n{}",
        missing.join("\n")
    );
    token.cancel();
    durable_token.cancel();
    durable.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn health_and_readiness_endpoints_answer() {
    let server = TestServer::start().await;
    let (addr, token) = start_metrics(&server, 100).await;
    let client = reqwest::Client::new();
    let health = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = client
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    token.cancel();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_with_10000_queues_stays_small() {
    const QUEUES: usize = 10_000;
    /// 100 labelled queues x 5 per-queue series plus the recorded metrics: well under this.
    const SCRAPE_BYTES_MAX: usize = 256 * 1024;
    let server = TestServer::start().await;
    let shared = server.running.shared().clone();
    let now = shared.clock.now_ms();
    for i in 0..QUEUES {
        let mut out = Vec::new();
        shared
            .engine
            .create_queue(
                "alice",
                &format!("bulk-{i}"),
                &QueueAttributeSet::default(),
                now,
                &mut out,
            )
            .unwrap();
    }
    let (addr, token) = start_metrics(&server, 100).await;
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.len() < SCRAPE_BYTES_MAX,
        "a scrape with {QUEUES} queues is {} bytes",
        body.len()
    );
    let labelled = body
        .lines()
        .filter(|l| l.starts_with("cmq_queue_active_messages{"))
        .count();
    assert_eq!(labelled, 101, "100 labelled queues and the _other series");
    assert!(body.contains("cmq_queues_unlabelled 9900"));
    token.cancel();
    server.stop().await;
}
