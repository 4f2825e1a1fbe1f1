//! The serving side: accepts peers, authenticates them, hands their RPCs to the group's Raft.
//!
//! Nothing an unauthenticated peer sends reaches Raft or costs more than a
//! [`PEER_HANDSHAKE_FRAME_BYTES_MAX`] buffer; a bad frame (garbage, oversized, undecodable)
//! closes its own connection only.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use rand::RngCore;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::wire::{self, Auth, Challenge, Refusal, Request, Response, Rpc, Welcome, NONCE_BYTES};
use super::PeerConfig;
use crate::broker::listen::{accept_loop, Front};
use crate::broker::log_limit::LogLimit;
use crate::broker::{Admission, Gate};
use crate::consensus::admin::{AdminRequest, AdminResponse, ADMIN_CLIENT_ID};
use crate::consensus::{GroupId, NodeId, Raft};
use crate::limits::cluster::{
    PEER_CONNECTIONS_MAX, PEER_CONNECTIONS_PER_IP_MAX, PEER_FRAME_BYTES_MAX,
    PEER_HANDSHAKE_DEADLINE, PEER_HANDSHAKE_FRAME_BYTES_MAX, PEER_IDLE_TIMEOUT,
    VOTE_REFUSAL_LOG_INTERVAL,
};

/// What the peer server serves.
pub trait PeerGroups: Send + Sync + 'static {
    /// The Raft handle of `group`, if this node has it.
    fn raft(&self, group: GroupId) -> Option<Raft>;
    /// Whether this node may grant votes in `group` now (false while a node whose log was
    /// damaged catches up): a vote request is then answered with an error, never a grant.
    fn may_vote(&self, group: GroupId) -> bool;
    /// This node answered a vote request of `group` whose candidate's last log entry was
    /// `candidate_last_log` with `response` (for [`ClusterNode`](crate::consensus::node)'s
    /// election nudges). By default nothing.
    fn vote_answered(
        &self,
        group: GroupId,
        candidate_last_log: Option<openraft::LogId<NodeId>>,
        response: &openraft::raft::VoteResponse<NodeId>,
    ) {
        let _ = (group, candidate_last_log, response);
    }
    /// Serves an operator's request ([`crate::consensus::admin`]); by default refuses it.
    fn admin(&self, request: AdminRequest) -> AdminFuture<'_> {
        let _ = request;
        Box::pin(std::future::ready(AdminResponse::Refused(
            "this node serves no membership changes".into(),
        )))
    }
}

/// What [`PeerGroups::admin`] answers with.
pub type AdminFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = AdminResponse> + Send + 'a>>;

/// The peer listener (`cluster.listen`): Raft RPCs from the other nodes.
#[derive(Debug)]
pub struct PeerServer;

/// What every connection of one server shares.
struct Shared {
    config: PeerConfig,
    groups: Arc<dyn PeerGroups>,
    /// [`PEER_CONNECTIONS_MAX`] connections in all, [`PEER_CONNECTIONS_PER_IP_MAX`] per address.
    gate: Arc<Gate>,
    /// When a refused vote was last logged ([`VOTE_REFUSAL_LOG_INTERVAL`]).
    vote_refusal_logged: Mutex<Option<Instant>>,
}

/// The peer listener is one more front end of the broker's accept loop (plain TCP only: peers
/// authenticate with the cluster secret, see the module docs).
impl Front for Shared {
    type Admitted = Admission;

    const NAME: &'static str = "cluster_peers";

    fn admit(&self, peer: SocketAddr) -> Result<Admission, &'static str> {
        self.gate.admit(peer.ip()).map_err(|reason| {
            if reason == "per_ip_limit" {
                "peer_per_ip_limit"
            } else {
                "peer_limit"
            }
        })
    }

    fn handshake_deadline(&self) -> std::time::Duration {
        PEER_HANDSHAKE_DEADLINE
    }

    async fn serve_plain(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        admitted: Admission,
        shutdown: CancellationToken,
    ) {
        let _admitted = admitted;
        tokio::select! {
            () = serve_connection(&self, stream, peer) => {}
            () = shutdown.cancelled() => {}
        }
    }

    async fn serve_tls(
        self: Arc<Self>,
        _stream: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        _admitted: Admission,
        _shutdown: CancellationToken,
    ) {
        // `serve` gives the accept loop no TLS acceptor, so no TLS stream comes here.
        tracing::error!(%peer, "a TLS connection reached the peer listener, which serves plain TCP only; closed");
    }
}

impl PeerServer {
    /// Accepts peer connections until `shutdown`; each must authenticate, then sends
    /// requests tagged with a group. Returns once every connection has ended.
    pub async fn serve(
        listener: TcpListener,
        config: PeerConfig,
        groups: Arc<dyn PeerGroups>,
        shutdown: CancellationToken,
    ) {
        let shared = Arc::new(Shared {
            config,
            groups,
            gate: Arc::new(Gate::with_caps(
                PEER_CONNECTIONS_MAX,
                PEER_CONNECTIONS_PER_IP_MAX,
            )),
            vote_refusal_logged: Mutex::new(None),
        });
        let tracker = TaskTracker::new();
        accept_loop(listener, None, shared, tracker.clone(), shutdown).await;
        tracker.close();
        tracker.wait().await;
    }
}

type PeerFramed = Framed<TcpStream, LengthDelimitedCodec>;

/// Serves one connection until it ends, errs or idles out.
async fn serve_connection(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%peer, %error, "set_nodelay failed");
    }
    let mut framed = Framed::new(stream, wire::codec(PEER_HANDSHAKE_FRAME_BYTES_MAX));
    let handshake = tokio::time::timeout(
        PEER_HANDSHAKE_DEADLINE,
        handshake(&mut framed, &shared.config),
    );
    let from = match handshake.await {
        Ok(Ok(from)) => from,
        Ok(Err(Handshake::WrongSecret(claimed))) => {
            static LIMIT: LogLimit = LogLimit::new();
            if let Some(suppressed) = LIMIT.allow() {
                tracing::warn!(%peer, claimed_node = claimed, suppressed, "peer refused: it does not know the cluster secret");
            }
            return;
        }
        Ok(Err(Handshake::Failed(reason))) => {
            static LIMIT: LogLimit = LogLimit::new();
            if let Some(suppressed) = LIMIT.allow() {
                tracing::warn!(%peer, reason, suppressed, "peer handshake failed");
            }
            return;
        }
        Err(_) => {
            static LIMIT: LogLimit = LogLimit::new();
            if let Some(suppressed) = LIMIT.allow() {
                tracing::warn!(%peer, deadline = ?PEER_HANDSHAKE_DEADLINE, suppressed, "peer handshake deadline passed");
            }
            return;
        }
    };
    tracing::debug!(%peer, from, "peer authenticated");
    framed
        .codec_mut()
        .set_max_frame_length(PEER_FRAME_BYTES_MAX);
    loop {
        let frame = match tokio::time::timeout(PEER_IDLE_TIMEOUT, framed.next()).await {
            Err(_) => {
                tracing::debug!(%peer, from, "idle peer connection closed");
                return;
            }
            Ok(None) => return,
            Ok(Some(Err(error))) => {
                static LIMIT: LogLimit = LogLimit::new();
                if let Some(suppressed) = LIMIT.allow() {
                    tracing::warn!(%peer, from, %error, suppressed, "bad peer frame; connection closed");
                }
                return;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let request: Request = match wire::decode(&frame) {
            Ok(request) => request,
            Err(error) => {
                static LIMIT: LogLimit = LogLimit::new();
                if let Some(suppressed) = LIMIT.allow() {
                    tracing::warn!(%peer, from, %error, bytes = frame.len(), suppressed, "undecodable peer request; connection closed");
                }
                return;
            }
        };
        drop(frame);
        let response = shared.handle(from, request).await;
        let bytes = match wire::encode(&response) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::error!(%peer, from, %error, "peer response not encodable; connection closed");
                return;
            }
        };
        match tokio::time::timeout(PEER_IDLE_TIMEOUT, framed.send(bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(%peer, from, %error, "peer response not sent");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, from, "peer does not take its response; connection closed");
                return;
            }
        }
    }
}

/// How a handshake failed.
enum Handshake {
    /// The answer's tag is wrong (the node id it claimed).
    WrongSecret(NodeId),
    /// Anything else: closed, garbage, oversized.
    Failed(String),
}

/// Sends the challenge, checks the answer and answers the client's challenge; the peer's
/// node id when it knows the secret.
async fn handshake(framed: &mut PeerFramed, config: &PeerConfig) -> Result<NodeId, Handshake> {
    let mut nonce = [0u8; NONCE_BYTES];
    rand::thread_rng().fill_bytes(&mut nonce);
    let challenge = Challenge {
        version: wire::PROTOCOL_VERSION,
        nonce,
    };
    let bytes = wire::encode(&challenge).map_err(|e| Handshake::Failed(e.to_string()))?;
    framed
        .send(bytes)
        .await
        .map_err(|e| Handshake::Failed(format!("sending the challenge: {e}")))?;
    let frame = match framed.next().await {
        None => return Err(Handshake::Failed("closed before authenticating".into())),
        Some(Err(e)) => return Err(Handshake::Failed(format!("reading the answer: {e}"))),
        Some(Ok(frame)) => frame,
    };
    let auth: Auth =
        wire::decode(&frame).map_err(|e| Handshake::Failed(format!("undecodable answer: {e}")))?;
    if !wire::verify(&config.secret, &nonce, &auth) {
        return Err(Handshake::WrongSecret(auth.node_id));
    }
    // Only now, to a peer that knows the secret, does this node prove it knows it too.
    let welcome = Welcome {
        node_id: config.node_id,
        mac: wire::welcome_mac(&config.secret, &auth.nonce, config.node_id),
    };
    let bytes = wire::encode(&welcome).map_err(|e| Handshake::Failed(e.to_string()))?;
    framed
        .send(bytes)
        .await
        .map_err(|e| Handshake::Failed(format!("sending the welcome: {e}")))?;
    Ok(auth.node_id)
}

impl Shared {
    /// Hands one request to its group's Raft.
    async fn handle(&self, from: NodeId, request: Request) -> Response {
        let group = request.group;
        let raft = self.groups.raft(group);
        let node_id = self.config.node_id;
        let no_group = || format!("node {node_id} has no group {group}");
        // The operator's tool (id 0) may send admin requests only, and only it may.
        let admin = matches!(request.rpc, Rpc::Admin(_));
        if admin != (from == ADMIN_CLIENT_ID) {
            static LIMIT: LogLimit = LogLimit::new();
            if let Some(suppressed) = LIMIT.allow() {
                tracing::warn!(from, admin, suppressed, "peer request refused: Raft RPCs come from nodes (id 1 and up), admin requests from the operator's tool (id 0) only");
            }
            let why = format!("node {node_id} serves admin requests to id {ADMIN_CLIENT_ID} only, and Raft RPCs to nodes only");
            return match request.rpc {
                Rpc::AppendEntries(_) => Response::AppendEntries(Err(Refusal::Refused(why))),
                Rpc::Vote(_) => Response::Vote(Err(Refusal::Refused(why))),
                Rpc::InstallSnapshot(_) => Response::InstallSnapshot(Err(Refusal::Refused(why))),
                Rpc::Admin(_) => Response::Admin(AdminResponse::Refused(why)),
            };
        }
        match request.rpc {
            Rpc::Admin(rpc) => {
                tracing::info!(request = ?rpc, "admin request");
                Response::Admin(self.groups.admin(rpc).await)
            }
            Rpc::AppendEntries(rpc) => {
                tracing::debug!(from, group, entries = rpc.entries.len(), "append_entries");
                let result = match raft {
                    None => Err(Refusal::Refused(no_group())),
                    Some(raft) => raft.append_entries(rpc).await.map_err(Refusal::Raft),
                };
                Response::AppendEntries(result)
            }
            Rpc::Vote(rpc) => {
                tracing::debug!(from, group, vote = %rpc.vote, "vote");
                let result = match raft {
                    None => Err(Refusal::Refused(no_group())),
                    Some(_) if !self.groups.may_vote(group) => {
                        self.log_vote_refusal(from, group);
                        Err(Refusal::Refused(format!(
                            "node {} may not vote in group {group} while its log catches up",
                            self.config.node_id
                        )))
                    }
                    Some(raft) => {
                        let candidate_last_log = rpc.last_log_id;
                        let answer = raft.vote(rpc).await;
                        if let Ok(response) = &answer {
                            self.groups
                                .vote_answered(group, candidate_last_log, response);
                        }
                        answer.map_err(Refusal::Raft)
                    }
                };
                Response::Vote(result)
            }
            Rpc::InstallSnapshot(rpc) => {
                tracing::debug!(
                    from,
                    group,
                    offset = rpc.offset,
                    bytes = rpc.data.len(),
                    done = rpc.done,
                    "install_snapshot"
                );
                let result = match raft {
                    None => Err(Refusal::Refused(no_group())),
                    Some(raft) => raft.install_snapshot(rpc).await.map_err(Refusal::Raft),
                };
                Response::InstallSnapshot(result)
            }
        }
    }

    fn log_vote_refusal(&self, from: NodeId, group: GroupId) {
        let now = Instant::now();
        let mut logged = self.vote_refusal_logged.lock();
        let due = logged.is_none_or(|at| now.duration_since(at) >= VOTE_REFUSAL_LOG_INTERVAL);
        if due {
            *logged = Some(now);
            tracing::info!(
                from,
                group,
                "vote request refused: this node may not vote while its log catches up"
            );
        }
    }
}
