//! The HTTP API against hostile and careless clients: one address cannot take every
//! connection, idle kept-alive connections are closed at the deadline, the request limits the
//! README states are the ones enforced (each at the limit and one byte past it), HTTPS with the
//! binary port's certificate options, and what idle connections cost.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use cmqd::config::HttpApiConfig;
use cmqd::http_api::{
    KEPT_ALIVE_HEAD_BYTES_MAX, REQUEST_BODY_BYTES_MAX, REQUEST_HEADERS_MAX, REQUEST_HEAD_BYTES_MAX,
    REQUEST_TARGET_BYTES_MAX,
};

use super::http_api::{assert_error, assert_ok, encode, Cmq, HttpBroker, Options};
use super::support::{RealBroker, ALICE};
use super::tls::Pki;

/// Bounds every wait on the broker in these tests (a hang fails instead of blocking the suite;
/// nothing is asserted about how long anything takes).
const PATIENCE: Duration = Duration::from_secs(20);

/// A connection from `source` (an address of 127.0.0.0/8) to `to`.
async fn connect_from(source: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// A response as read off the wire.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    body: String,
}

impl RawResponse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// Reads one response (status line, headers, a `Content-Length` body); `None` if the broker
/// closed the connection before sending anything.
async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Option<RawResponse> {
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("not a status line: {head}"));
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .unwrap_or(0);
            let start = end + 4;
            while data.len() < start + length {
                let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
                    .await
                    .expect("the broker sent nothing")
                    .unwrap();
                assert!(n > 0, "response cut short: {head}");
                data.extend_from_slice(&buf[..n]);
            }
            let body = String::from_utf8_lossy(&data[start..start + length]).to_string();
            return Some(RawResponse { status, body });
        }
        let n = match tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("the broker sent nothing")
        {
            Ok(n) => n,
            Err(error) => panic!("read failed after {} bytes: {error}", data.len()),
        };
        if n == 0 {
            assert!(data.is_empty(), "response cut short: {data:?}");
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    }
}

/// Whether the broker has closed `stream` (it reads end of file or a reset).
async fn is_closed<S: AsyncRead + Unpin>(stream: &mut S) -> bool {
    let mut buf = [0u8; 1024];
    matches!(
        tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("neither data nor close"),
        Ok(0) | Err(_)
    )
}

/// A POST of a signed `action` as raw bytes, with `extra` header lines (each ending in CRLF).
fn post(cmq: &Cmq, host: &str, action: &str, params: &[(&str, &str)], extra: &str) -> Vec<u8> {
    let body = encode(&cmq.signed(&Options::default(), action, params));
    format!(
        "POST /v2/index.php HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn head_len(request: &[u8]) -> usize {
    request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_its_cap_does_not_stop_another() {
    const PER_IP: usize = 4;
    let broker = HttpBroker::start_with(HttpApiConfig {
        connections_max: 16,
        connections_per_ip_max: PER_IP,
        ..HttpApiConfig::default()
    })
    .await;
    let cmq = broker.client(ALICE);
    let host = broker.addr.to_string();
    let hog = Ipv4Addr::new(127, 0, 0, 1);
    // One address opens its whole share, each connection kept alive after a request.
    let mut held = Vec::new();
    for _ in 0..PER_IP {
        let mut stream = connect_from(hog, broker.addr).await;
        let request = post(&cmq, &host, "ListQueue", &[], "");
        stream.write_all(&request).await.unwrap();
        let response = read_response(&mut stream).await.unwrap();
        assert_ok(&response.json());
        held.push(stream);
    }
    // One more from it is closed at once, without an answer.
    let mut refused = connect_from(hog, broker.addr).await;
    let request = post(&cmq, &host, "ListQueue", &[], "");
    let _ = refused.write_all(&request).await;
    assert!(is_closed(&mut refused).await);
    // Another address is served all the same, on several connections.
    let other = Ipv4Addr::new(127, 0, 0, 2);
    for _ in 0..PER_IP {
        let mut stream = connect_from(other, broker.addr).await;
        stream
            .write_all(&post(&cmq, &host, "ListQueue", &[], ""))
            .await
            .unwrap();
        assert_ok(&read_response(&mut stream).await.unwrap().json());
    }
    let neighbour = broker.client_from(ALICE, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
    assert_ok(&neighbour.call("ListQueue", &[]).await);
    // The connections held are still served.
    for stream in &mut held {
        stream
            .write_all(&post(&cmq, &host, "ListQueue", &[], ""))
            .await
            .unwrap();
        assert_ok(&read_response(stream).await.unwrap().json());
    }
    drop(held);
    broker.stop().await;
}

/// Virtual time: the deadline passes when the runtime has nothing else to do, so what is
/// checked is that the broker closes idle connections when `idle_seconds` have passed on its
/// timer and not before, without waiting for them in real time.
#[tokio::test(start_paused = true)]
async fn idle_connections_are_closed_at_the_deadline() {
    const IDLE: Duration = Duration::from_secs(10);
    let broker = HttpBroker::start_with(HttpApiConfig {
        idle_seconds: IDLE.as_secs(),
        ..HttpApiConfig::default()
    })
    .await;
    let cmq = broker.client(ALICE);
    let host = broker.addr.to_string();
    // A kept-alive connection after a request, and one that never sends anything.
    let mut kept = TcpStream::connect(broker.addr).await.unwrap();
    let mut silent = TcpStream::connect(broker.addr).await.unwrap();
    kept.write_all(&post(&cmq, &host, "ListQueue", &[], ""))
        .await
        .unwrap();
    assert_ok(&read_response(&mut kept).await.unwrap().json());
    let idle_since = tokio::time::Instant::now();
    assert!(is_closed(&mut silent).await);
    assert!(is_closed(&mut kept).await);
    assert!(
        idle_since.elapsed() >= IDLE - Duration::from_secs(1),
        "closed after {:?} of virtual time",
        idle_since.elapsed()
    );

    // A connection that keeps sending requests is not idle: each request restarts the timer.
    let mut busy = TcpStream::connect(broker.addr).await.unwrap();
    for _ in 0..3 {
        tokio::time::advance(IDLE / 2).await;
        busy.write_all(&post(&cmq, &host, "ListQueue", &[], ""))
            .await
            .unwrap();
        assert_ok(&read_response(&mut busy).await.unwrap().json());
    }
    // A head sent slowly does not restart it: the whole head is due within the deadline.
    let mut slow = TcpStream::connect(broker.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let request = post(&cmq, &host, "ListQueue", &[], "");
    for byte in request.iter().take(8) {
        slow.write_all(std::slice::from_ref(byte)).await.unwrap();
        tokio::time::advance(IDLE / 10).await;
    }
    assert!(is_closed(&mut slow).await);
    assert!(started.elapsed() < IDLE + IDLE / 2);
    broker.stop().await;
}

/// Sends `request` on a new connection and reads the one response.
async fn exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_response(&mut stream)
        .await
        .expect("closed without a response")
}

/// A signed `SendMessage` whose body is chosen so that `measure` of the encoded request is
/// exactly `want`: the signature's encoded length varies, so it is signed again until it fits.
fn fit(
    cmq: &Cmq,
    method: &'static str,
    queue: &str,
    want: usize,
    measure: impl Fn(&str) -> usize,
) -> String {
    let options = Options {
        method,
        ..Options::default()
    };
    let mut fill = 0usize;
    for _ in 0..200 {
        let body = "x".repeat(fill);
        let encoded = encode(&cmq.signed(
            &options,
            "SendMessage",
            &[("queueName", queue), ("msgBody", &body)],
        ));
        let len = measure(&encoded);
        if len == want {
            return encoded;
        }
        fill = (fill + want).saturating_sub(len).max(1);
    }
    panic!("could not make a request of {want} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_head_limits_hold_at_the_limit_and_one_byte_past() {
    let broker = HttpBroker::start().await;
    let cmq = broker.client(ALICE);
    let host = broker.addr.to_string();
    assert_ok(&cmq.call("CreateQueue", &[("queueName", "limits")]).await);

    // The request target (path and query): a GET whose target is exactly at the limit is
    // served; one byte more is 414.
    let path = "/v2/index.php?";
    let query = fit(&cmq, "GET", "limits", REQUEST_TARGET_BYTES_MAX, |q| {
        path.len() + q.len()
    });
    let request = format!("GET {path}{query} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let response = exchange(broker.addr, request.as_bytes()).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_ok(&response.json());
    let long = format!(
        "GET {path}{} HTTP/1.1\r\nHost: {host}\r\n\r\n",
        "x".repeat(REQUEST_TARGET_BYTES_MAX + 1 - path.len())
    );
    assert_eq!(exchange(broker.addr, long.as_bytes()).await.status, 414);

    // The whole head: exactly at the limit is served; one byte more is 431.
    let request = post(&cmq, &host, "ListQueue", &[], "X-Pad: \r\n");
    let pad = "p".repeat(REQUEST_HEAD_BYTES_MAX - head_len(&request));
    let request = post(&cmq, &host, "ListQueue", &[], &format!("X-Pad: {pad}\r\n"));
    assert_eq!(head_len(&request), REQUEST_HEAD_BYTES_MAX);
    let response = exchange(broker.addr, &request).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_ok(&response.json());
    let request = post(&cmq, &host, "ListQueue", &[], &format!("X-Pad: {pad}p\r\n"));
    assert_eq!(head_len(&request), REQUEST_HEAD_BYTES_MAX + 1);
    assert_eq!(exchange(broker.addr, &request).await.status, 431);

    // Header fields: Host and Content-Length, and fillers up to the limit; one more is 431.
    let fillers = |n: usize| -> String { (0..n).map(|i| format!("X-Fill-{i}: f\r\n")).collect() };
    let request = post(
        &cmq,
        &host,
        "ListQueue",
        &[],
        &fillers(REQUEST_HEADERS_MAX - 2),
    );
    let response = exchange(broker.addr, &request).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_ok(&response.json());
    let request = post(
        &cmq,
        &host,
        "ListQueue",
        &[],
        &fillers(REQUEST_HEADERS_MAX - 1),
    );
    assert_eq!(exchange(broker.addr, &request).await.status, 431);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_limit_holds_at_the_limit_and_one_byte_past() {
    let broker = HttpBroker::start().await;
    let cmq = broker.client(ALICE);
    let one_mib = (1024 * 1024).to_string();
    assert_ok(
        &cmq.call(
            "CreateQueue",
            &[("queueName", "bodies"), ("maxMsgSize", &one_mib)],
        )
        .await,
    );
    let body = fit(&cmq, "POST", "bodies", REQUEST_BODY_BYTES_MAX, str::len);
    let (status, reply) = cmq.send_raw("POST", &body).await;
    assert_eq!(status, 200);
    assert_ok(&serde_json::from_str(&reply).unwrap());
    let body = fit(&cmq, "POST", "bodies", REQUEST_BODY_BYTES_MAX + 1, str::len);
    let (status, reply) = cmq.send_raw("POST", &body).await;
    assert_eq!(status, 200);
    assert_error(&serde_json::from_str(&reply).unwrap(), 4000, 10420);
    // Only the first was stored.
    let attributes = cmq
        .call("GetQueueAttributes", &[("queueName", "bodies")])
        .await;
    assert_eq!(attributes["activeMsgNum"], 1, "{attributes}");
    broker.stop().await;
}

/// An HTTPS client for `pki`'s broker, verifying it against `ca`, with a client certificate if
/// given.
fn https_client(pki: &Pki, ca: &str, cert: Option<(&str, &str)>) -> tokio_rustls::TlsConnector {
    let cert_paths = cert.map(|(c, k)| (pki.path(c), pki.path(k)));
    let config = cmqd::tls::client_config(
        &pki.path(ca),
        cert_paths.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .unwrap();
    tokio_rustls::TlsConnector::from(config)
}

/// One signed request over HTTPS; `Err` if the TLS handshake fails or the broker closes.
async fn https_call(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    cmq: &Cmq,
) -> Result<RawResponse, String> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, stream)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(&post(cmq, &addr.to_string(), "ListQueue", &[], ""))
        .await
        .map_err(|e| e.to_string())?;
    https_response(&mut tls).await
}

async fn https_response<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<RawResponse, String> {
    // A refused client certificate shows up as an alert on the first read (TLS 1.3).
    let mut first = [0u8; 1];
    match tokio::time::timeout(PATIENCE, stream.read(&mut first))
        .await
        .expect("no answer")
    {
        Ok(1) => {}
        Ok(_) => return Err("closed".into()),
        Err(e) => return Err(e.to_string()),
    }
    let mut rest = Chained {
        first: Some(first[0]),
        inner: stream,
    };
    read_response(&mut rest)
        .await
        .ok_or_else(|| "closed".to_string())
}

/// A stream with one byte already read put back in front.
struct Chained<'a, S> {
    first: Option<u8>,
    inner: &'a mut S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Chained<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(byte) = self.first.take() {
            buf.put_slice(&[byte]);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_api_with_the_certificate_options_of_the_binary_port() {
    let pki = Pki::new();
    let server_config =
        cmqd::tls::server_config(&pki.path("server.pem"), &pki.path("server.key"), None).unwrap();
    let (broker, tls_addr) =
        HttpBroker::start_with_tls(HttpApiConfig::default(), Some(server_config)).await;
    let tls_addr = tls_addr.unwrap();
    let cmq = broker.client(ALICE).for_host(&tls_addr.to_string());
    // Over HTTPS, verified against the server CA, signed with the HTTPS Host.
    let response = https_call(&https_client(&pki, "server-ca.pem", None), tls_addr, &cmq)
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_ok(&response.json());
    // Plain HTTP keeps serving beside it.
    assert_ok(&broker.client(ALICE).call("ListQueue", &[]).await);
    // A client that cannot verify the server does not get through.
    assert!(
        https_call(&https_client(&pki, "other-ca.pem", None), tls_addr, &cmq)
            .await
            .is_err()
    );
    // Nor does plain HTTP spoken to the HTTPS port.
    let mut plain = TcpStream::connect(tls_addr).await.unwrap();
    plain
        .write_all(&post(&cmq, &tls_addr.to_string(), "ListQueue", &[], ""))
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(PATIENCE, plain.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    broker.stop().await;

    // Mutual TLS: a certificate from the client CA is required.
    let server_config = cmqd::tls::server_config(
        &pki.path("server.pem"),
        &pki.path("server.key"),
        Some(&pki.path("client-ca.pem")),
    )
    .unwrap();
    let (broker, tls_addr) =
        HttpBroker::start_with_tls(HttpApiConfig::default(), Some(server_config)).await;
    let tls_addr = tls_addr.unwrap();
    let cmq = broker.client(ALICE).for_host(&tls_addr.to_string());
    let with_cert = https_client(&pki, "server-ca.pem", Some(("client.pem", "client.key")));
    assert_ok(&https_call(&with_cert, tls_addr, &cmq).await.unwrap().json());
    for cert in [None, Some(("stranger.pem", "stranger.key"))] {
        let refused = https_call(&https_client(&pki, "server-ca.pem", cert), tls_addr, &cmq).await;
        assert!(
            refused.is_err(),
            "a client without a good certificate got in: {refused:?}"
        );
    }
    broker.stop().await;
}

/// The real broker (with its allocator) in a process of its own, so that its memory is not
/// mixed with the tests running beside this one.
struct BrokerProcess {
    real: RealBroker,
    http: SocketAddr,
    _dir: tempfile::TempDir,
}

impl BrokerProcess {
    fn start(per_ip: usize) -> Self {
        let (real, dir) = RealBroker::start_memory(&format!(
            "[metrics]\nenabled = false\n\n[http_api]\nlisten = \"127.0.0.1:0\"\n\
             connections_max = {per_ip}\nconnections_per_ip_max = {per_ip}"
        ));
        Self {
            http: real.http.unwrap(),
            real,
            _dir: dir,
        }
    }

    /// Resident memory, bytes (`VmRSS` of /proc/PID/status).
    fn rss(&self) -> u64 {
        self.real.rss_bytes()
    }
}

/// Opens `n` connections, each kept alive after one request made by `request`.
async fn open_idle(addr: SocketAddr, n: usize, request: impl Fn() -> Vec<u8>) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&request()).await.unwrap();
        let response = read_response(&mut stream).await.unwrap();
        assert_eq!(response.status, 200, "{response:?}");
        streams.push(stream);
    }
    streams
}

/// Issue 18's smaller-scale check: kept-alive HTTP connections that have gone idle hold a few
/// KiB each, not large buffers, also after large bodies; a connection whose head made hyper's
/// read buffer grow is closed after its reply rather than kept with that buffer.
///
/// RSS moves in 2 MiB steps where transparent huge pages back the heap, hence hundreds of
/// connections per measure. After large bodies the allocator keeps more around (pools of the
/// request's transient buffers, freed on other threads, returned to the system lazily), so that
/// bound is looser: 37-41 KiB was measured, and more when the machine is busy; a 64 KiB buffer
/// kept per connection, as hyper keeps by default, still exceeds it (about 94-100 KiB each was
/// measured before reads were capped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_hold_little_memory() {
    const WARM_UP: usize = 100;
    const IDLE: usize = 500;
    const PER_CONNECTION_MAX: u64 = 32 * 1024;
    const PER_CONNECTION_AFTER_BODY_MAX: u64 = 64 * 1024;
    let broker = BrokerProcess::start(4 * WARM_UP + 2 * IDLE + 2);
    let cmq = Cmq::new(broker.http, ALICE);
    let host = broker.http.to_string();
    let small = || post(&cmq, &host, "ListQueue", &[], "");
    // A 64 KiB body, to a queue that does not exist: nothing is stored.
    let body = "b".repeat(64 * 1024);
    let large = || {
        post(
            &cmq,
            &host,
            "SendMessage",
            &[("queueName", "missing"), ("msgBody", &body)],
            "",
        )
    };
    // First requests allocate what every later one reuses (runtime, replay guard, the
    // allocator's pools for large request buffers ...).
    let mut warm = open_idle(broker.http, WARM_UP, small).await;
    warm.extend(open_idle(broker.http, 3 * WARM_UP, large).await);
    let before = broker.rss();
    let idle = open_idle(broker.http, IDLE, small).await;
    let after = broker.rss();
    let per_connection = after.saturating_sub(before) / IDLE as u64;
    eprintln!(
        "{IDLE} idle kept-alive HTTP connections: RSS {} -> {} KiB, {per_connection} bytes each",
        before / 1024,
        after / 1024,
    );
    assert!(
        per_connection < PER_CONNECTION_MAX,
        "an idle HTTP connection holds {per_connection} bytes"
    );

    // Each sent a 64 KiB body first.
    let before = broker.rss();
    let bodied = open_idle(broker.http, IDLE, large).await;
    let after = broker.rss();
    let per_connection = after.saturating_sub(before) / IDLE as u64;
    eprintln!(
        "{IDLE} idle connections after a 64 KiB body: RSS {} -> {} KiB, {per_connection} bytes each",
        before / 1024,
        after / 1024,
    );
    assert!(
        per_connection < PER_CONNECTION_AFTER_BODY_MAX,
        "an idle HTTP connection holds {per_connection} bytes after a large body"
    );

    // A head over the kept-alive size: answered, then closed.
    let pad = "p".repeat(KEPT_ALIVE_HEAD_BYTES_MAX);
    let mut stream = TcpStream::connect(broker.http).await.unwrap();
    stream
        .write_all(&post(
            &cmq,
            &host,
            "ListQueue",
            &[],
            &format!("X-Pad: {pad}\r\n"),
        ))
        .await
        .unwrap();
    assert_ok(&read_response(&mut stream).await.unwrap().json());
    assert!(is_closed(&mut stream).await);
    // One just under it is kept.
    let pad = "p".repeat(KEPT_ALIVE_HEAD_BYTES_MAX - 1024);
    let request = post(&cmq, &host, "ListQueue", &[], &format!("X-Pad: {pad}\r\n"));
    let mut stream = TcpStream::connect(broker.http).await.unwrap();
    stream.write_all(&request).await.unwrap();
    assert_ok(&read_response(&mut stream).await.unwrap().json());
    stream.write_all(&small()).await.unwrap();
    assert_ok(&read_response(&mut stream).await.unwrap().json());
    drop((warm, idle, bodied));
}
