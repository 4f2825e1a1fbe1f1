//! The one accept loop of every front end (binary protocol, CMQ HTTP API), plain or TLS.
//!
//! Accepts until shutdown (backing off on accept errors such as running out of file
//! descriptors), admits each connection through its front end's [`Front::admit`] (a refusal is
//! counted in `cmq_connections_refused_total` under the reason it returns, logged at a limited
//! rate, and the socket closed), and serves it on a task of its own on the caller's tracker;
//! TLS connections first finish their handshake within [`Front::handshake_deadline`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics as names;

use super::log_limit::LogLimit;
use crate::limits::connection::ACCEPT_BACKOFF_MAX;
use crate::limits::connection::ACCEPT_BACKOFF_MIN;

/// A front end's side of the accept loop.
pub(crate) trait Front: Send + Sync + 'static {
    /// What an admitted connection holds for its life (its places at the gates).
    type Admitted: Send + 'static;

    /// The front end's name in log lines.
    const NAME: &'static str;

    /// Admits a connection from `peer`, or the reason it is refused (the label of
    /// `cmq_connections_refused_total`).
    fn admit(&self, peer: SocketAddr) -> Result<Self::Admitted, &'static str>;

    /// How long a TLS handshake may take.
    fn handshake_deadline(&self) -> Duration;

    /// Serves a plain TCP connection until it ends or `shutdown`.
    fn serve_plain(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        admitted: Self::Admitted,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send;

    /// Serves a TLS connection (handshake done) until it ends or `shutdown`.
    fn serve_tls(
        self: Arc<Self>,
        stream: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        admitted: Self::Admitted,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send;
}

/// Accepts connections on `listener` for `front` until `shutdown`, each served on a task of
/// `tracker`; with `tls`, each finishes its TLS handshake on that task first.
pub(crate) async fn accept_loop<F: Front>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    front: Arc<F>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut accept_backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                accept_backoff = ACCEPT_BACKOFF_MIN;
                pair
            }
            Err(error) => {
                // Out of file descriptors and the like: back off rather than spin.
                static LIMIT: LogLimit = LogLimit::new();
                if let Some(suppressed) = LIMIT.allow() {
                    tracing::warn!(front = F::NAME, %error, suppressed, "accept failed; backing off");
                }
                tokio::select! {
                    () = tokio::time::sleep(accept_backoff) => {}
                    () = shutdown.cancelled() => break,
                }
                accept_backoff = (accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let admitted = match front.admit(peer) {
            Ok(admitted) => admitted,
            Err(reason) => {
                metrics::counter!(names::CONNECTIONS_REFUSED_TOTAL, "reason" => reason)
                    .increment(1);
                static LIMIT: LogLimit = LogLimit::new();
                if let Some(suppressed) = LIMIT.allow() {
                    tracing::warn!(front = F::NAME, %peer, reason, suppressed, "connection refused");
                }
                drop(stream);
                continue;
            }
        };
        let front = front.clone();
        let token = shutdown.child_token();
        let tls = tls.clone();
        tracker.spawn(async move {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%peer, %error, "set_nodelay failed");
            }
            match tls {
                None => front.serve_plain(stream, peer, admitted, token).await,
                Some(acceptor) => {
                    let deadline = front.handshake_deadline();
                    let handshake = tokio::time::timeout(deadline, acceptor.accept(stream));
                    let outcome = tokio::select! {
                        outcome = handshake => outcome,
                        () = token.cancelled() => return,
                    };
                    match outcome {
                        Ok(Ok(tls_stream)) => {
                            front.serve_tls(tls_stream, peer, admitted, token).await;
                        }
                        Ok(Err(error)) => {
                            metrics::counter!(names::FRAMES_REJECTED_TOTAL, "reason" => "tls")
                                .increment(1);
                            static LIMIT: LogLimit = LogLimit::new();
                            if let Some(suppressed) = LIMIT.allow() {
                                tracing::info!(front = F::NAME, %peer, %error, suppressed, "TLS handshake failed");
                            }
                        }
                        Err(_) => {
                            tracing::debug!(front = F::NAME, %peer, "TLS handshake deadline passed");
                        }
                    }
                }
            }
        });
    }
}
