//! The binary protocol's front end: listeners, connections, streaming-consume windows, the
//! handshake and TLS. An adapter of the [`Broker`]: a connection decodes a request, calls one
//! broker method ([`Broker::execute`], [`Broker::long_poll`], ...) and encodes its answer.
//!
//! [`Server::bind`] opens the listener and the broker; [`Server::run`] accepts connections until
//! shutdown, each served by one task (`connection`) that also waits for the storage commits of
//! its requests, plus one task per long poll. The broker's own tasks (ticker, HTTP push) run
//! alongside ([`Broker::spawn_tasks`]).

mod connection;
mod consume;
pub mod observe;

/// The accounts and the authentication throttle, shared with the HTTP API (see [`crate::broker`]).
pub use crate::broker::auth;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::listen::{accept_loop, Front};
use crate::broker::{Admission, Broker, Gate, PerIp};
use crate::clock::{Clock, SystemClock};
use crate::config::{AccountConfig, Limits};
use crate::limits::connection::REFUSED_DRAIN_BYTES_MAX;
use crate::limits::connection::REFUSED_LINGER;
use crate::limits::connection::SHUTDOWN_GRACE;
use crate::storage::{MemoryStorage, Storage};

/// What a server is built from.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Bounds.
    pub limits: Limits,
    /// Accounts that may connect.
    pub accounts: Vec<AccountConfig>,
}

/// A bound, not yet running broker.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Broker>,
    tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("tls", &self.tls.as_ref().map(|(l, _)| l.local_addr().ok()))
            .finish()
    }
}

impl Server {
    /// Binds the listener and builds the engine, with memory storage and the wall clock.
    pub async fn bind(options: ServerOptions) -> std::io::Result<Self> {
        Self::bind_with(
            options,
            Arc::new(MemoryStorage::new()),
            Arc::new(SystemClock::new()),
        )
        .await
    }

    /// Binds with the given storage and clock.
    pub async fn bind_with(
        options: ServerOptions,
        storage: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(options.listen).await?;
        let shared = Broker::open(options.limits, &options.accounts, storage, clock)?;
        Ok(Self {
            listener,
            shared,
            tls: None,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The broker (engine, storage ...), for embedding, the other front ends and tests.
    pub fn shared(&self) -> &Arc<Broker> {
        &self.shared
    }

    /// Also accepts TLS connections on `addr`, with `config` (see [`crate::tls`]). The plain
    /// listener keeps serving; bind it to loopback to keep plaintext for local development
    /// only. Returns the TLS address actually bound.
    pub async fn listen_tls(
        &mut self,
        addr: SocketAddr,
        config: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        self.tls = Some((listener, tokio_rustls::TlsAcceptor::from(config)));
        Ok(bound)
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets connections finish what
    /// they are doing (up to a grace period) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let Server {
            listener,
            shared,
            tls,
        } = self;
        let tracker = TaskTracker::new();
        let storage = Arc::clone(&shared.storage);
        // A storage that cannot go on (a failed fsync) stops the server.
        let (fatal, stop) = (storage.fatal(), shutdown.clone());
        tracker.spawn(async move {
            tokio::select! {
                () = fatal.cancelled() => stop.cancel(),
                () = stop.cancelled() => {}
            }
        });
        let front = Arc::new(Binary {
            connections: Arc::new(Gate::new(&shared.limits)),
            handshakes: Arc::new(Handshakes::new(&shared.limits)),
            shared: shared.clone(),
        });
        shared.spawn_tasks(&tracker, &shutdown);
        shared
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some((tls_listener, acceptor)) = tls {
            tracker.spawn(accept_loop(
                tls_listener,
                Some(acceptor),
                front.clone(),
                tracker.clone(),
                shutdown.clone(),
            ));
        }
        accept_loop(listener, None, front, tracker.clone(), shutdown).await;
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
        // Writes and syncs what is queued (with fsync "interval" or "never", what is not synced).
        storage.close();
        match storage.fatal_error() {
            Some(error) => Err(std::io::Error::other(error.to_string())),
            None => Ok(()),
        }
    }

    /// Runs the server on a task of its own; for tests and embedding.
    pub fn spawn(self) -> std::io::Result<RunningServer> {
        let addr = self.local_addr()?;
        let shared = self.shared.clone();
        let token = CancellationToken::new();
        let handle = tokio::spawn(self.run(token.clone()));
        Ok(RunningServer {
            addr,
            shared,
            token,
            handle,
        })
    }
}

/// A server running on its own task.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    shared: Arc<Broker>,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its broker.
    pub fn shared(&self) -> &Arc<Broker> {
        &self.shared
    }

    /// Stops it and waits until it has stopped.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.token.cancel();
        match self.handle.await {
            Ok(result) => result,
            Err(join) => Err(std::io::Error::other(join)),
        }
    }
}

/// The binary listeners' side of the accept loop: what they admit connections with, and how
/// they serve them.
#[derive(Debug)]
struct Binary {
    shared: Arc<Broker>,
    connections: Arc<Gate>,
    handshakes: Arc<Handshakes>,
}

/// A binary connection's places at the gates, and whether its address is throttled.
struct Admitted {
    admission: Admission,
    handshake: HandshakePlace,
    throttled: Option<Duration>,
}

impl Front for Binary {
    type Admitted = Admitted;

    const NAME: &'static str = "binary";

    fn admit(&self, peer: SocketAddr) -> Result<Admitted, &'static str> {
        let admission = self.connections.admit(peer.ip())?;
        let handshake = self.handshakes.admit(peer.ip(), &self.shared)?;
        // A throttled address gets one error frame saying so and when it lifts, then the
        // connection is closed: nothing it sends is read as a request.
        let throttled = self.shared.auth_throttle.blocked_for(peer.ip());
        if throttled.is_some() {
            metrics::counter!(crate::metrics::CONNECTIONS_REFUSED_TOTAL, "reason" => "auth_throttle")
                .increment(1);
        }
        Ok(Admitted {
            admission,
            handshake,
            throttled,
        })
    }

    fn handshake_deadline(&self) -> Duration {
        Duration::from_secs(self.shared.limits.handshake_seconds)
    }

    async fn serve_plain(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        admitted: Admitted,
        shutdown: CancellationToken,
    ) {
        let Admitted {
            admission,
            handshake,
            throttled,
        } = admitted;
        match throttled {
            // Boxed: every connection's task would otherwise reserve room for it.
            Some(lifts_in) => Box::pin(refuse_throttled(stream, lifts_in, &self.shared)).await,
            None => {
                let (read_half, write_half) = stream.into_split();
                let shared = self.shared.clone();
                connection::serve(read_half, write_half, peer, shared, handshake, shutdown).await;
            }
        }
        drop(admission);
    }

    async fn serve_tls(
        self: Arc<Self>,
        stream: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        admitted: Admitted,
        shutdown: CancellationToken,
    ) {
        let Admitted {
            admission,
            handshake,
            throttled,
        } = admitted;
        match throttled {
            Some(lifts_in) => Box::pin(refuse_throttled(stream, lifts_in, &self.shared)).await,
            None => {
                let (read_half, write_half) = tokio::io::split(stream);
                let shared = self.shared.clone();
                connection::serve(read_half, write_half, peer, shared, handshake, shutdown).await;
            }
        }
        drop(admission);
    }
}

/// The binary listeners' places for connections still in their handshake (accepted, not yet
/// authenticated), in total and per source address.
#[derive(Debug)]
struct Handshakes {
    places: Arc<Semaphore>,
    per_ip: PerIp,
}

/// A connection's place among those in their handshake: dropped once it has authenticated (or
/// closed), which frees the place for the next newcomer.
pub(crate) struct HandshakePlace {
    _permit: OwnedSemaphorePermit,
    handshakes: Arc<Handshakes>,
    ip: IpAddr,
    shared: Arc<Broker>,
}

impl Drop for HandshakePlace {
    fn drop(&mut self) {
        self.handshakes.per_ip.give_back(self.ip);
        self.shared
            .handshakes
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Handshakes {
    fn new(limits: &Limits) -> Self {
        Self {
            places: Arc::new(Semaphore::new(limits.handshakes_max)),
            per_ip: PerIp::new(limits.handshakes_per_ip_max),
        }
    }

    /// A place for a connection from `ip` in its handshake, or the reason it is refused:
    /// `"handshake_limit"` or `"handshake_per_ip_limit"`.
    fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        shared: &Arc<Broker>,
    ) -> Result<HandshakePlace, &'static str> {
        let permit = self
            .places
            .clone()
            .try_acquire_owned()
            .map_err(|_| "handshake_limit")?;
        if !self.per_ip.take(ip) {
            return Err("handshake_per_ip_limit");
        }
        shared
            .handshakes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(HandshakePlace {
            _permit: permit,
            handshakes: self.clone(),
            ip,
            shared: shared.clone(),
        })
    }
}

/// Answers a connection from a throttled address (`spec/README.md`, "Connection lifecycle"):
/// one error reply 4420/10790 under the Hello opcode and request id 0, sent before anything is
/// read, then the write side is closed. What the client had already sent is read and dropped
/// for a moment (bounded in bytes and time) so that closing does not reset the connection
/// before the client has read the frame.
async fn refuse_throttled<S>(mut stream: S, lifts_in: Duration, shared: &Broker)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Whole seconds, rounded up: "retry in 0 s" would invite a retry that is refused again.
    let seconds = lifts_in.as_millis().div_ceil(1000);
    let response = crate::protocol::Response::error(
        crate::error::ErrorCode::AUTH_THROTTLED,
        format!(
            "too many failed authentications from this address; new connections are refused for {seconds} s more"
        ),
    );
    let mut frame = bytes::BytesMut::new();
    crate::protocol::FrameCodec::new(shared.limits.frame_bytes_max).encode_response(
        0,
        crate::protocol::Opcode::Hello as u16,
        &response,
        &mut frame,
    );
    let write_deadline = Duration::from_secs(shared.limits.write_seconds);
    let written = tokio::time::timeout(write_deadline, async {
        stream.write_all(&frame).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(REFUSED_LINGER, async {
        let mut scratch = vec![0u8; 4096];
        let mut drained = 0usize;
        while drained < REFUSED_DRAIN_BYTES_MAX {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}
