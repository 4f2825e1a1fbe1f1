//! Test support: a broker on 127.0.0.1 with an ephemeral port, clients for it, and a raw-frame
//! connection for protocol-level tests.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use cmqd::client::{Account, ClientConfig};
use cmqd::config::{AccountConfig, Limits};
use cmqd::protocol::{
    encode_request, parse_response, FrameCodec, RawFrame, Reply, Request, Response,
    PROTOCOL_VERSION,
};
use cmqd::server::{RunningServer, Server, ServerOptions};

pub const ALICE: (&str, &str) = ("AKIDalice0001", "alice-secret-key-0123456789");
pub const BOB: (&str, &str) = ("AKIDbob000001", "bob-secret-key-0123456789abc");

pub struct TestServer {
    pub running: RunningServer,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Limits::default()).await
    }

    pub async fn start_with(limits: Limits) -> Self {
        let accounts = vec![
            AccountConfig {
                name: "alice".into(),
                secret_id: ALICE.0.into(),
                secret_key: ALICE.1.into(),
            },
            AccountConfig {
                name: "bob".into(),
                secret_id: BOB.0.into(),
                secret_key: BOB.1.into(),
            },
        ];
        let options = ServerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            limits,
            accounts,
        };
        let server = Server::bind(options).await.unwrap();
        Self {
            running: server.spawn().unwrap(),
        }
    }

    /// A broker on the durable log in `dir` (fsync always), with the same accounts.
    pub async fn start_durable(dir: &std::path::Path) -> Self {
        let options = ServerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            limits: Limits::default(),
            accounts: vec![
                AccountConfig {
                    name: "alice".into(),
                    secret_id: ALICE.0.into(),
                    secret_key: ALICE.1.into(),
                },
                AccountConfig {
                    name: "bob".into(),
                    secret_id: BOB.0.into(),
                    secret_key: BOB.1.into(),
                },
            ],
        };
        let clock: std::sync::Arc<dyn cmqd::clock::Clock> =
            std::sync::Arc::new(cmqd::clock::SystemClock::new());
        let storage = cmqd::storage::log::LogStorage::open(
            dir,
            cmqd::storage::log::LogConfig::default(),
            clock.clone(),
        )
        .unwrap();
        let server = Server::bind_with(options, std::sync::Arc::new(storage), clock)
            .await
            .unwrap();
        Self {
            running: server.spawn().unwrap(),
        }
    }

    /// A broker on memory storage whose clock moves only when `clock` is advanced, with the
    /// same accounts (visibility timeouts and other deadlines without waiting).
    pub async fn start_with_clock(limits: Limits, clock: cmqd::clock::ManualClock) -> Self {
        let options = ServerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            limits,
            accounts: vec![
                AccountConfig {
                    name: "alice".into(),
                    secret_id: ALICE.0.into(),
                    secret_key: ALICE.1.into(),
                },
                AccountConfig {
                    name: "bob".into(),
                    secret_id: BOB.0.into(),
                    secret_key: BOB.1.into(),
                },
            ],
        };
        let server = Server::bind_with(
            options,
            std::sync::Arc::new(cmqd::storage::MemoryStorage::new()),
            std::sync::Arc::new(clock),
        )
        .await
        .unwrap();
        Self {
            running: server.spawn().unwrap(),
        }
    }

    /// Waits (by yielding, not sleeping) until the broker runs exactly `n` streaming consumers.
    pub async fn wait_for_consumers(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let count = || {
            self.running
                .shared()
                .consumers
                .load(std::sync::atomic::Ordering::Acquire)
        };
        while count() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "consumers stayed at {} instead of {n}",
                count()
            );
            tokio::task::yield_now().await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.addr()
    }

    pub async fn alice(&self) -> Account {
        self.connect(ALICE, ClientConfig::default()).await
    }

    pub async fn bob(&self) -> Account {
        self.connect(BOB, ClientConfig::default()).await
    }

    pub async fn connect(&self, who: (&str, &str), config: ClientConfig) -> Account {
        Account::connect(&self.addr().to_string(), who.0, who.1, config)
            .await
            .unwrap()
    }

    /// Waits (by yielding, not sleeping) until the broker has exactly `n` long-poll waiters.
    pub async fn wait_for_waiters(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.running.shared().waiters.total() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "waiters stayed at {} instead of {n}",
                self.running.shared().waiters.total()
            );
            tokio::task::yield_now().await;
        }
    }

    /// Client connections the broker is serving now.
    pub fn connections(&self) -> usize {
        self.running
            .shared()
            .connections
            .load(std::sync::atomic::Ordering::Acquire)
    }

    pub async fn stop(self) {
        self.running.shutdown().await.unwrap();
    }
}

/// A connection that speaks raw frames, for protocol-level tests.
pub struct RawConn {
    pub writer: tokio::net::tcp::OwnedWriteHalf,
    pub frames: FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read_half, writer) = stream.into_split();
        Self {
            writer,
            frames: FramedRead::new(read_half, FrameCodec::default()),
        }
    }

    /// As [`RawConn::connect`], from source address `from` (the whole of 127/8 is loopback on
    /// Linux, so tests can play several client addresses).
    pub async fn connect_from(from: std::net::IpAddr, addr: SocketAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (read_half, writer) = stream.into_split();
        Self {
            writer,
            frames: FramedRead::new(read_half, FrameCodec::default()),
        }
    }

    pub async fn send(&mut self, request_id: u32, request: &Request) {
        let mut buf = BytesMut::new();
        encode_request(request_id, request, &mut buf).unwrap();
        self.writer.write_all(&buf).await.unwrap();
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// The next frame, or `None` once the broker closed the connection.
    pub async fn next_frame(&mut self) -> Option<RawFrame> {
        self.next_frame_within(Duration::from_secs(10)).await
    }

    /// As [`RawConn::next_frame`], waiting at most `limit` (on paused time, a virtual limit
    /// longer than the broker deadline under test).
    pub async fn next_frame_within(&mut self, limit: Duration) -> Option<RawFrame> {
        match tokio::time::timeout(limit, self.frames.next()).await {
            Ok(Some(Ok(frame))) => Some(frame),
            Ok(Some(Err(_))) | Ok(None) => None,
            Err(_) => panic!("no frame from the broker within {limit:?}"),
        }
    }

    pub async fn recv(&mut self) -> (u32, Response) {
        let frame = self.next_frame().await.expect("connection closed");
        let response = parse_response(&frame).unwrap();
        (frame.request_id, response)
    }

    pub async fn call(&mut self, request_id: u32, request: &Request) -> Response {
        self.send(request_id, request).await;
        let (id, response) = self.recv().await;
        assert_eq!(id, request_id);
        response
    }

    pub async fn handshake(&mut self, who: (&str, &str)) {
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client_name: "raw-test".into(),
        };
        let Response::Ok(Reply::Hello { nonce, .. }) = self.call(1, &hello).await else {
            panic!("hello refused");
        };
        let auth = Request::Auth {
            secret_id: who.0.into(),
            signature: cmqd::protocol::sign(who.1, &nonce, who.0),
        };
        let response = self.call(2, &auth).await;
        assert!(
            matches!(response, Response::Ok(Reply::Auth { .. })),
            "{response:?}"
        );
    }
}

pub fn error_code(response: &Response) -> Option<(u16, u16)> {
    match response {
        Response::Error { code, .. } => Some((code.code, code.module)),
        Response::NotLeader { .. } => Some((6100, 10800)),
        Response::Ok(_) => None,
    }
}

/// The real `cmqd` binary, started with a config file: the endpoints it printed, and its
/// process (ours to stop, by its handle).
pub struct RealBroker {
    pub child: std::process::Child,
    /// The binary protocol's address.
    pub addr: SocketAddr,
    /// The metrics endpoint's address, if enabled.
    pub metrics: Option<SocketAddr>,
    /// The CMQ HTTP API's address, if enabled.
    pub http: Option<SocketAddr>,
}

/// How long a broker may take to start (recovery of a test-sized log included).
pub const REAL_BROKER_STARTUP: Duration = Duration::from_secs(30);

impl RealBroker {
    /// Starts `cmqd --config CONFIG` with its stderr appended to `log` (or discarded), and
    /// waits for its "cmqd ready" line. `Err` with what it wrote on stderr when it exits first
    /// (a refused start); a panic when it does neither in time.
    pub fn start(config: &std::path::Path, log: Option<&std::path::Path>) -> Result<Self, String> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            None => Stdio::null(),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_cmqd"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the start-up lines, then keeps draining so the broker never blocks on stdout.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(Some(line));
            }
            let _ = tx.send(None);
        });
        let deadline = cmqd::clock::monotonic_now() + REAL_BROKER_STARTUP;
        let (mut addr, mut metrics, mut http) = (None, None, None);
        loop {
            let left = deadline.saturating_duration_since(cmqd::clock::monotonic_now());
            match rx.recv_timeout(left) {
                Ok(Some(line)) => {
                    let after = |marker: &str| {
                        line.split(marker)
                            .nth(1)
                            .and_then(|rest| rest.split(['/', ' ']).next())
                            .and_then(|text| text.trim().parse::<SocketAddr>().ok())
                    };
                    if line.contains(" listening on ") {
                        addr = after(" listening on ");
                    } else if line.starts_with("metrics on http://") {
                        metrics = after("http://");
                    } else if line.starts_with("CMQ HTTP API on http://") {
                        http = after("http://");
                    } else if line.trim() == "cmqd ready" {
                        let addr = addr.expect("a ready broker printed its address");
                        return Ok(Self {
                            child,
                            addr,
                            metrics,
                            http,
                        });
                    }
                }
                Ok(None) => {
                    let status = child.wait().unwrap();
                    assert!(!status.success(), "the broker exited without serving");
                    return Err(log
                        .map(|path| std::fs::read_to_string(path).unwrap_or_default())
                        .unwrap_or_default());
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the broker neither started nor stopped in time");
                }
            }
        }
    }

    /// Starts the broker on memory storage in a fresh directory, with ALICE's account and
    /// `sections` of configuration besides (TOML, not `[storage]`); the directory lives as long
    /// as the returned guard.
    pub fn start_memory(sections: &str) -> (Self, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("cmqd.toml");
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{data}\"\n\n[[accounts]]\nname = \"alice\"\n\
             secret_id = \"{id}\"\nsecret_key = \"{key}\"\n\n{sections}\n\n[storage]\nmode = \"memory\"\n",
            data = dir.path().join("data").display(),
            id = ALICE.0,
            key = ALICE.1,
        );
        std::fs::write(&config, text).unwrap();
        (Self::start(&config, None).unwrap(), dir)
    }

    /// Resident memory of the broker process, from `/proc/<pid>/status`.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    /// SIGKILL, to this child only; waits for it.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, to this child only (by its id); waits until it has stopped.
    pub fn terminate(mut self) {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        // Waits for the exit itself; the watchdog only bounds a broker that hangs (it then
        // kills this child, by its PID, and the test fails).
        let (stopped, watch) = std::sync::mpsc::channel::<()>();
        let pid = self.child.id().to_string();
        let watchdog = std::thread::spawn(move || {
            let hung = watch.recv_timeout(REAL_BROKER_STARTUP).is_err();
            if hung {
                let _ = std::process::Command::new("kill")
                    .arg("-KILL")
                    .arg(&pid)
                    .status();
            }
            hung
        });
        self.child.wait().unwrap();
        let _ = stopped.send(());
        assert!(
            !watchdog.join().unwrap(),
            "the broker did not stop after SIGTERM"
        );
    }
}

impl Drop for RealBroker {
    /// A test that fails midway leaves no broker behind (ours only, by its handle; a no-op once
    /// it has been waited for).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value of an unlabelled metric on the broker's `/metrics`.
pub async fn metric(metrics: SocketAddr, name: &str) -> f64 {
    let text = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("{name} is not on /metrics"))
}

/// What a [`scripted_broker`] does with a request after the handshake.
pub enum Scripted {
    /// Answers it.
    Answer(Response),
    /// Leaves it unanswered, the connection open.
    Swallow,
    /// Closes the connection (the request was sent and may or may not have been made).
    Close,
}

/// A fake broker: completes the handshake, then treats every other request as `script` says.
/// Returns its address and how many requests (handshake aside) it was sent.
pub async fn scripted_broker(
    script: fn(&Request) -> Scripted,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = sent.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut frames = FramedRead::new(read, FrameCodec::default());
                while let Some(Ok(frame)) = frames.next().await {
                    let response = match cmqd::protocol::parse_request(&frame) {
                        Ok(Request::Hello { .. }) => Response::Ok(Reply::Hello {
                            version: 1,
                            nonce: [7; 32],
                            server_name: "scripted".into(),
                        }),
                        Ok(Request::Auth { .. }) => Response::Ok(Reply::Auth {
                            account: "alice".into(),
                        }),
                        parsed => {
                            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let Ok(request) = parsed else { continue };
                            match script(&request) {
                                Scripted::Answer(response) => response,
                                Scripted::Swallow => continue,
                                Scripted::Close => return,
                            }
                        }
                    };
                    let mut buf = BytesMut::new();
                    cmqd::protocol::encode_response(
                        frame.request_id,
                        frame.opcode,
                        &response,
                        &mut buf,
                    );
                    if write.write_all(&buf).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, sent)
}

/// A broker that completes the handshake, then swallows every request: unanswered, the
/// connection kept open (`close` false) or closed at the first one (`close` true: the request
/// was sent and may or may not have been made). Counts the requests it swallowed.
pub async fn swallowing_broker(
    close: bool,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    if close {
        scripted_broker(|_| Scripted::Close).await
    } else {
        scripted_broker(|_| Scripted::Swallow).await
    }
}
