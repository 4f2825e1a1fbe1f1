//! A TCP proxy for one directed peer link of a test cluster ([`LinkProxy`]): it forwards each
//! connection to its target and can cut the link (existing connections closed, new ones closed
//! at once), heal it, delay every chunk, or silently drop the bytes of one direction while the
//! connection stays open. Tested here against an echo server.
//!
//! Bounds: a connect timeout to the target, a bounded queue of held chunks per direction, a
//! fixed read size. Only 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Time a proxy allows to connect to its target before it closes the client's connection.
const PROXY_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Chunks a proxy direction holds while delaying (bounds its memory: 1024 x 16 KiB).
const PROXY_CHUNKS_MAX: usize = 1024;
/// Bytes a proxy reads at a time.
const PROXY_CHUNK_BYTES: usize = 16 * 1024;

/// What a link does to the bytes it carries. `Default`: a healthy link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkMode {
    /// Existing connections are closed and new ones closed at once.
    pub cut: bool,
    /// Every chunk is held this long before it is written on.
    pub delay_ms: u64,
    /// Bytes from the dialling side to the target are discarded (the connection stays open).
    pub drop_forward: bool,
    /// Bytes from the target back to the dialling side are discarded.
    pub drop_backward: bool,
}

/// Counters of a proxy, for tests that wait on what it did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Connections accepted and connected to the target.
    pub connections: u64,
    /// Bytes taken in to carry to the target (counted when read, before any delay).
    pub forwarded: u64,
    /// Bytes taken in to carry back to the dialling side (likewise).
    pub backwarded: u64,
    /// Bytes discarded going to the target.
    pub dropped_forward: u64,
    /// Bytes discarded coming back.
    pub dropped_backward: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Forward,
    Backward,
}

impl Direction {
    fn dropped(self, mode: &LinkMode) -> bool {
        match self {
            Direction::Forward => mode.drop_forward,
            Direction::Backward => mode.drop_backward,
        }
    }

    fn count(self, stats: &mut LinkStats, bytes: u64, dropped: bool) {
        let slot = match (self, dropped) {
            (Direction::Forward, false) => &mut stats.forwarded,
            (Direction::Backward, false) => &mut stats.backwarded,
            (Direction::Forward, true) => &mut stats.dropped_forward,
            (Direction::Backward, true) => &mut stats.dropped_backward,
        };
        *slot += bytes;
    }
}

/// A TCP proxy for one directed link: listens on 127.0.0.1 and forwards each connection to
/// `target`, as its [`LinkMode`] says. Dropping it stops it and closes its connections.
#[derive(Debug)]
pub struct LinkProxy {
    addr: SocketAddr,
    target: SocketAddr,
    mode: watch::Sender<LinkMode>,
    stats: watch::Sender<LinkStats>,
    accept: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    /// Binds 127.0.0.1:0 and starts forwarding to `target` (on the current Tokio runtime).
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(LinkMode::default());
        let (stats, _) = watch::channel(LinkStats::default());
        let accept = tokio::spawn(accept_loop(listener, target, mode.clone(), stats.clone()));
        Ok(Self {
            addr,
            target,
            mode,
            stats,
            accept,
        })
    }

    /// Where the proxy listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The current mode.
    pub fn mode(&self) -> LinkMode {
        *self.mode.borrow()
    }

    /// Closes every connection and closes new ones at once, until [`LinkProxy::heal`].
    pub fn cut(&self) {
        self.mode.send_modify(|m| m.cut = true);
    }

    /// Back to a healthy link: no cut, no delay, no drops.
    pub fn heal(&self) {
        self.mode.send_replace(LinkMode::default());
    }

    /// Holds every chunk `ms` before writing it on (0: none).
    pub fn delay(&self, ms: u64) {
        self.mode.send_modify(|m| m.delay_ms = ms);
    }

    /// Silently discards bytes going to the target; connections stay open.
    pub fn drop_forward(&self) {
        self.mode.send_modify(|m| m.drop_forward = true);
    }

    /// Silently discards bytes coming back from the target; connections stay open.
    pub fn drop_backward(&self) {
        self.mode.send_modify(|m| m.drop_backward = true);
    }

    /// The counters now.
    pub fn stats(&self) -> LinkStats {
        *self.stats.borrow()
    }

    /// Waits until the counters satisfy `ready`; panics after `limit`.
    pub async fn wait_for_stats(&self, limit: Duration, ready: impl FnMut(&LinkStats) -> bool) {
        let mut rx = self.stats.subscribe();
        let met = matches!(
            tokio::time::timeout(limit, rx.wait_for(ready)).await,
            Ok(Ok(_))
        );
        if !met {
            panic!(
                "proxy {} -> {}: counters stayed at {:?}",
                self.addr,
                self.target,
                self.stats()
            );
        }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        // Connection tasks end when the mode sender goes (their `changed()` fails).
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mode: watch::Sender<LinkMode>,
    stats: watch::Sender<LinkStats>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of descriptors, most likely: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if mode.borrow().cut {
            drop(client);
            continue;
        }
        tokio::spawn(serve(client, target, mode.subscribe(), stats.clone()));
    }
}

/// One proxied connection: both directions until EOF, an error, a cut or the proxy's end.
async fn serve(
    client: TcpStream,
    target: SocketAddr,
    mode: watch::Receiver<LinkMode>,
    stats: watch::Sender<LinkStats>,
) {
    let upstream =
        match tokio::time::timeout(PROXY_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(upstream)) => upstream,
            // The target is down: the dialling side sees its connection closed.
            _ => return,
        };
    if mode.borrow().cut {
        return;
    }
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    stats.send_modify(|s| s.connections += 1);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let forward = pump(
        client_read,
        upstream_write,
        mode.clone(),
        stats.clone(),
        Direction::Forward,
    );
    let backward = pump(
        upstream_read,
        client_write,
        mode,
        stats,
        Direction::Backward,
    );
    // A direction that ends by EOF has shut down its writer and the other carries on; a cut
    // ends both, and returning drops every half, which closes both sockets.
    tokio::join!(forward, backward);
}

/// One direction: a reader stamps each chunk with its due time, a writer writes it then.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mode: watch::Receiver<LinkMode>,
    stats: watch::Sender<LinkStats>,
    direction: Direction,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(PROXY_CHUNKS_MAX);
    let mut read_mode = mode.clone();
    let read_stats = stats.clone();
    let reader = async move {
        let mut buf = vec![0u8; PROXY_CHUNK_BYTES];
        loop {
            let n = tokio::select! {
                read = from.read(&mut buf) => match read {
                    Ok(0) | Err(_) => {
                        // EOF: let the writer drain what is queued, then shut down.
                        drop(tx);
                        std::future::pending::<()>().await;
                        return;
                    }
                    Ok(n) => n,
                },
                changed = read_mode.changed() => {
                    if changed.is_err() || read_mode.borrow().cut {
                        return;
                    }
                    continue;
                }
            };
            let now = *read_mode.borrow();
            if now.cut {
                return;
            }
            let dropped = direction.dropped(&now);
            read_stats.send_modify(|s| direction.count(s, n as u64, dropped));
            if dropped {
                continue;
            }
            let due = Instant::now() + Duration::from_millis(now.delay_ms);
            if tx
                .send((due, Bytes::copy_from_slice(&buf[..n])))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let mut write_mode = mode;
    let writer = async move {
        loop {
            let next = tokio::select! {
                next = rx.recv() => next,
                changed = write_mode.changed() => {
                    if changed.is_err() || write_mode.borrow().cut {
                        return;
                    }
                    continue;
                }
            };
            let Some((due, chunk)) = next else {
                let _ = to.shutdown().await;
                return;
            };
            // Held until due; a cut while holding ends the connection at once.
            let sleep = tokio::time::sleep_until(due);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    changed = write_mode.changed() => {
                        if changed.is_err() || write_mode.borrow().cut {
                            return;
                        }
                    }
                }
            }
            if write_mode.borrow().cut || to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Tests, against an echo server
// ---------------------------------------------------------------------------------------------

/// An echo server on 127.0.0.1:0: every chunk read is written back.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if socket.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

const TEST_WAIT: Duration = Duration::from_secs(10);

/// Reads exactly `n` bytes, or panics after [`TEST_WAIT`].
async fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(TEST_WAIT, stream.read_exact(&mut buf))
        .await
        .expect("no reply through the proxy in time")
        .unwrap();
    buf
}

/// Whether the connection is closed (EOF or reset) within [`TEST_WAIT`].
async fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(TEST_WAIT, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("the connection neither closed nor delivered in time"),
    }
}

#[tokio::test]
async fn proxy_carries_bytes_both_ways() {
    let proxy = LinkProxy::start(echo_server().await).await.unwrap();
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    for round in 0..20u32 {
        let message = format!("hello {round} ").repeat(100);
        stream.write_all(message.as_bytes()).await.unwrap();
        assert_eq!(read_n(&mut stream, message.len()).await, message.as_bytes());
    }
    let stats = proxy.stats();
    assert_eq!(stats.connections, 1);
    assert_eq!(stats.forwarded, stats.backwarded);
}

#[tokio::test]
async fn proxy_cut_closes_connections_and_refuses_new_ones_until_healed() {
    let proxy = LinkProxy::start(echo_server().await).await.unwrap();
    let mut before = TcpStream::connect(proxy.addr()).await.unwrap();
    before.write_all(b"ping").await.unwrap();
    assert_eq!(read_n(&mut before, 4).await, b"ping");

    proxy.cut();
    assert!(
        closed(&mut before).await,
        "an existing connection survived the cut"
    );
    // New connections are accepted by the kernel and closed by the proxy.
    let mut during = TcpStream::connect(proxy.addr()).await.unwrap();
    let _ = during.write_all(b"lost").await;
    assert!(
        closed(&mut during).await,
        "a new connection was served while cut"
    );

    proxy.heal();
    let mut after = TcpStream::connect(proxy.addr()).await.unwrap();
    after.write_all(b"back").await.unwrap();
    assert_eq!(read_n(&mut after, 4).await, b"back");
}

#[tokio::test]
async fn proxy_delay_holds_chunks_and_keeps_their_order() {
    let proxy = LinkProxy::start(echo_server().await).await.unwrap();
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    proxy.delay(150);
    let started = Instant::now();
    let mut expected = Vec::new();
    for i in 0..10u8 {
        let chunk = [b'a' + i; 7];
        stream.write_all(&chunk).await.unwrap();
        expected.extend_from_slice(&chunk);
    }
    assert_eq!(read_n(&mut stream, expected.len()).await, expected);
    // A lower bound only (the proxy sleeps at least this long each way), never an upper one.
    assert!(started.elapsed() >= Duration::from_millis(300));
    proxy.delay(0);
    stream.write_all(b"quick").await.unwrap();
    assert_eq!(read_n(&mut stream, 5).await, b"quick");
}

#[tokio::test]
async fn proxy_cut_ends_a_connection_whose_bytes_are_held_by_a_delay() {
    let proxy = LinkProxy::start(echo_server().await).await.unwrap();
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    // Far longer than the test's wait: only the cut can end this.
    proxy.delay(3_600_000);
    stream.write_all(b"held").await.unwrap();
    proxy
        .wait_for_stats(TEST_WAIT, |s| s.forwarded == 4 && s.connections == 1)
        .await;
    proxy.cut();
    assert!(closed(&mut stream).await);
}

#[tokio::test]
async fn proxy_drop_forward_discards_requests_and_keeps_the_connection() {
    let proxy = LinkProxy::start(echo_server().await).await.unwrap();
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    proxy.drop_forward();
    stream.write_all(b"discard me").await.unwrap();
    proxy
        .wait_for_stats(TEST_WAIT, |s| s.dropped_forward == 10)
        .await;
    proxy.heal();
    stream.write_all(b"keep").await.unwrap();
    // Only the bytes after the heal made the round trip.
    assert_eq!(read_n(&mut stream, 4).await, b"keep");
    assert_eq!(proxy.stats().forwarded, 4);
}

#[tokio::test]
async fn proxy_drop_backward_discards_replies_and_keeps_the_connection() {
    let proxy = LinkProxy::start(echo_server().await).await.unwrap();
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    proxy.drop_backward();
    stream.write_all(b"echo lost").await.unwrap();
    // The request reached the server (forwarded) and its echo was discarded on the way back.
    proxy
        .wait_for_stats(TEST_WAIT, |s| s.forwarded == 9 && s.dropped_backward == 9)
        .await;
    proxy.heal();
    stream.write_all(b"echo kept").await.unwrap();
    assert_eq!(read_n(&mut stream, 9).await, b"echo kept");
    assert_eq!(proxy.stats().backwarded, 9);
    assert_eq!(proxy.stats().connections, 1);
}

#[tokio::test]
async fn proxy_closes_the_client_when_the_target_is_down() {
    // A port nothing listens on (bound and released).
    let proxy = LinkProxy::start(crate::cluster_support::free_port())
        .await
        .unwrap();
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(closed(&mut stream).await);
    assert_eq!(proxy.stats().connections, 0);
}
