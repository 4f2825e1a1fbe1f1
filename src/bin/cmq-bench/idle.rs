//! `cmq-bench --idle-connections N`: what idle long-polling consumers cost the broker.
//!
//! CMQ's model is many consumers waiting in long polls, so an idle connection with a receive
//! waiting is the normal case. This opens `N` authenticated connections on the raw protocol,
//! each with one 30 s ReceiveMessage waiting on an empty queue (renewed when it times out), and
//! reports the broker's resident memory growth per connection, and a working client's round
//! trip (send, receive, delete) before and while they wait.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use cmqd::client::{Account, ClientConfig, QueueAttributeSet};
use cmqd::protocol::{
    encode_request, parse_response, sign, FrameCodec, Reply, Request, Response, PROTOCOL_VERSION,
};

use crate::broker::proc_status_bytes;

/// Connections opened at once while setting up (each handshake is two round trips).
const CONNECTING_AT_ONCE: usize = 64;

/// Round trips of the working client measured before and during.
const CYCLES: usize = 2_000;

/// Where to connect and as whom.
pub struct Target<'a> {
    pub endpoint: &'a str,
    pub secret_id: &'a str,
    pub secret_key: &'a str,
    /// The broker's PID, to read its resident memory.
    pub pid: Option<u32>,
}

/// Runs the idle-connection benchmark with `connections` waiting consumers on `queue`.
pub async fn run(
    target: &Target<'_>,
    connections: usize,
    queue: &str,
    deadline: Duration,
) -> Result<serde_json::Value, String> {
    let started = cmqd::clock::monotonic_now();
    let pid = target
        .pid
        .ok_or("--idle-connections needs the broker's PID: use --spawn or --broker-pid")?;
    let addr: SocketAddr = tokio::net::lookup_host(target.endpoint)
        .await
        .map_err(|e| format!("{}: {e}", target.endpoint))?
        .next()
        .ok_or_else(|| format!("{}: no address", target.endpoint))?;
    let config = ClientConfig::default().request_timeout(Duration::from_secs(60));
    let account = Account::connect(target.endpoint, target.secret_id, target.secret_key, config)
        .await
        .map_err(|e| e.to_string())?;
    let idle_queue = format!("{queue}-idle");
    let work_queue = format!("{queue}-work");
    for name in [&idle_queue, &work_queue] {
        let _ = account.queue(name).delete().await;
        account
            .queue(name)
            .create(&QueueAttributeSet::default())
            .await
            .map_err(|e| format!("create queue {name}: {e}"))?;
    }
    let work = account.queue(&work_queue);
    // Warm up, then measure with nothing else connected.
    cycles(&work, CYCLES / 4).await?;
    let rss_before =
        proc_status_bytes(pid, "VmRSS").ok_or("cannot read the broker's resident memory")?;
    let quiet = cycles(&work, CYCLES).await?;

    let stop = CancellationToken::new();
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(connections.max(1));
    let connecting = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let permit = Arc::clone(&connecting)
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        tasks.push(tokio::spawn(idle_connection(
            addr,
            target.secret_id.to_string(),
            target.secret_key.to_string(),
            idle_queue.clone(),
            ready_tx.clone(),
            permit,
            stop.clone(),
        )));
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < connections {
        let left = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => ready += 1,
            Ok(Some(Err(error))) => {
                stop.cancel();
                return Err(format!("idle connection {ready}: {error}"));
            }
            Ok(None) => break,
            Err(_) => {
                stop.cancel();
                return Err(format!(
                    "only {ready} of {connections} connections ready in time"
                ));
            }
        }
    }
    let rss_during =
        proc_status_bytes(pid, "VmRSS").ok_or("cannot read the broker's resident memory")?;
    let busy = cycles(&work, CYCLES).await?;
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    for name in [&idle_queue, &work_queue] {
        let _ = account.queue(name).delete().await;
    }
    let growth = rss_during.saturating_sub(rss_before);
    let per_connection = growth / u64::try_from(connections.max(1)).unwrap_or(u64::MAX);
    Ok(json!({
        "workload": "idle",
        "idle_connections": connections,
        "broker_rss_bytes_before": rss_before,
        "broker_rss_bytes_during": rss_during,
        "broker_rss_bytes_per_idle_connection": per_connection,
        "working_client_round_trip_us": {
            "before": { "p50": quiet.value_at_quantile(0.5), "p99": quiet.value_at_quantile(0.99), "samples": quiet.len() },
            "during": { "p50": busy.value_at_quantile(0.5), "p99": busy.value_at_quantile(0.99), "samples": busy.len() },
        },
    }))
}

/// Prints the report of [`run`] for a person.
pub fn print(report: &serde_json::Value) {
    let n = &report["idle_connections"];
    let mib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / (1024.0 * 1024.0);
    println!("idle connections:   {n}, each with a 30 s long poll waiting");
    println!(
        "broker RSS:         {:.1} MiB before, {:.1} MiB during: {} bytes per idle connection",
        mib(&report["broker_rss_bytes_before"]),
        mib(&report["broker_rss_bytes_during"]),
        report["broker_rss_bytes_per_idle_connection"]
    );
    let rt = &report["working_client_round_trip_us"];
    println!(
        "working client:     send+receive+delete p50/p99 {}/{} us before, {}/{} us during",
        rt["before"]["p50"], rt["before"]["p99"], rt["during"]["p50"], rt["during"]["p99"]
    );
}

/// `count` round trips of send, receive, delete on one queue; their times in microseconds.
async fn cycles(
    queue: &cmqd::client::Queue,
    count: usize,
) -> Result<hdrhistogram::Histogram<u64>, String> {
    let mut times = crate::measure::histogram();
    for _ in 0..count {
        let begun = cmqd::clock::monotonic_now();
        queue
            .send_message("idle-bench", 0)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let message = queue
            .receive_message(Some(1))
            .await
            .map_err(|e| format!("receive: {e}"))?;
        queue
            .delete_message(&message.receipt_handle)
            .await
            .map_err(|e| format!("delete: {e}"))?;
        let micros = u64::try_from(begun.elapsed().as_micros()).unwrap_or(u64::MAX);
        times.saturating_record(micros.max(1));
    }
    Ok(times)
}

/// One idle consumer: handshake, then a 30 s receive waiting, renewed until `stop`.
async fn idle_connection(
    addr: SocketAddr,
    secret_id: String,
    secret_key: String,
    queue: String,
    ready: mpsc::Sender<Result<(), String>>,
    connecting: tokio::sync::OwnedSemaphorePermit,
    stop: CancellationToken,
) {
    let result = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (read_half, mut writer) = stream.into_split();
        let mut frames = FramedRead::new(read_half, FrameCodec::default());
        let call = |id: u32, request: Request| {
            let mut buf = BytesMut::new();
            let encoded = encode_request(id, &request, &mut buf).map_err(|e| e.to_string());
            (encoded, buf)
        };
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client_name: "cmq-bench-idle".into(),
        };
        let (encoded, buf) = call(1, hello);
        encoded?;
        writer.write_all(&buf).await.map_err(|e| e.to_string())?;
        let Response::Ok(Reply::Hello { nonce, .. }) = next_reply(&mut frames).await? else {
            return Err("hello refused".to_string());
        };
        let auth = Request::Auth {
            signature: sign(&secret_key, &nonce, &secret_id),
            secret_id: secret_id.clone(),
        };
        let (encoded, buf) = call(2, auth);
        encoded?;
        writer.write_all(&buf).await.map_err(|e| e.to_string())?;
        let Response::Ok(Reply::Auth { .. }) = next_reply(&mut frames).await? else {
            return Err("authentication refused".to_string());
        };
        let receive = Request::ReceiveMessage {
            queue: queue.clone(),
            polling_wait_seconds: Some(30),
        };
        // The first receive with a ping behind it: the ping's reply says the receive waits.
        let mut buf = BytesMut::new();
        encode_request(3, &receive, &mut buf).map_err(|e| e.to_string())?;
        encode_request(4, &Request::Ping, &mut buf).map_err(|e| e.to_string())?;
        writer.write_all(&buf).await.map_err(|e| e.to_string())?;
        match next_reply(&mut frames).await? {
            Response::Ok(Reply::Empty) => {}
            other => return Err(format!("unexpected reply {other:?}")),
        }
        drop(connecting);
        let _ = ready.send(Ok(())).await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                reply = next_reply(&mut frames) => {
                    // 7000 after 30 s (or a message): wait again.
                    reply?;
                    let mut buf = BytesMut::new();
                    encode_request(3, &receive, &mut buf).map_err(|e| e.to_string())?;
                    writer.write_all(&buf).await.map_err(|e| e.to_string())?;
                }
            }
        }
    }
    .await;
    if let Err(error) = result {
        let _ = ready.send(Err(error)).await;
    }
}

async fn next_reply(
    frames: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
) -> Result<Response, String> {
    match frames.next().await {
        Some(Ok(frame)) => parse_response(&frame).map_err(|e| e.to_string()),
        Some(Err(error)) => Err(error.to_string()),
        None => Err("the broker closed the connection".into()),
    }
}
