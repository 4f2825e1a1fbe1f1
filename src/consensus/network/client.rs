//! The dialling side: openraft's network factory and its per-target clients.
//!
//! A [`PeerClient`] holds at most one connection, opened on its first RPC, and sends one
//! request at a time. Any failure — including an RPC that outlives its deadline, whose
//! response may still be on its way — drops the connection, so the next RPC starts on a fresh
//! one and never reads a stale response.
//!
//! # Deadlines and sizes
//!
//! openraft 0.9 gives every AppendEntries (heartbeats and leadership checks included) the
//! heartbeat interval (`cluster.raft.heartbeat_ms`) and then drops the call. A client that
//! waited that long would be dropped silently; it gives up at the `soft_ttl` instead (3/4 of
//! it), so that the timeout is counted (`cmq_cluster_peer_rpc_failures_total`) and logged with
//! what to change. So the round trip to a peer plus its fsync must stay under that deadline:
//! links slower than that need a larger `heartbeat_ms`.
//!
//! An AppendEntries sends at most [`APPEND_BYTES_TARGET`] of entries (at least one entry):
//! when openraft hands over more (a follower catching up is given up to 64 entries of up to
//! several MiB each), the client sends the first entries within the target and answers
//! `PartialSuccess` up to the last one sent, and openraft sends the rest next. A catching-up
//! follower's write and fsync of one request thus fit in the deadline.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use parking_lot::Mutex;
use rand::RngCore;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::wire::{
    self, Auth, Challenge, Refusal, Request, Response, Rpc, Welcome, WireError, NONCE_BYTES,
};
use super::PeerConfig;
use crate::consensus::admin::{AdminRequest, AdminResponse, ADMIN_CLIENT_ID};
use crate::consensus::{GroupId, NodeId, PeerNode, TypeConfig};
use crate::limits::cluster::{
    APPEND_BYTES_TARGET, PEER_BACKOFF_MAX, PEER_BACKOFF_MIN, PEER_FAILURE_LOG_INTERVAL,
    PEER_FRAME_BYTES_MAX, PEER_HANDSHAKE_FRAME_BYTES_MAX,
};
use crate::metrics as names;

/// openraft's network factory for one group: dials `config.dial[target]`, falling back to
/// the address in the target's membership entry (`node.peer`).
#[derive(Debug, Clone)]
pub struct PeerNetwork {
    config: Arc<PeerConfig>,
    group: GroupId,
    health: Arc<Health>,
}

impl PeerNetwork {
    /// The factory for `group`'s Raft on the node `config` describes.
    pub fn new(config: PeerConfig, group: GroupId) -> Self {
        // Every peer's failure series exist from the start (at 0), so a dashboard shows
        // "none" rather than "no data".
        for &target in config.dial.keys().filter(|&&id| id != config.node_id) {
            for reason in Failure::REASONS {
                metrics::counter!(names::CLUSTER_PEER_RPC_FAILURES, "peer" => target.to_string(), "reason" => reason)
                    .increment(0);
            }
        }
        Self {
            config: Arc::new(config),
            group,
            health: Arc::new(Health::default()),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> PeerClient {
        let addr = self
            .config
            .dial
            .get(&target)
            .cloned()
            .unwrap_or_else(|| node.peer.clone());
        PeerClient {
            config: self.config.clone(),
            group: self.group,
            target,
            node: node.clone(),
            addr,
            connection: None,
            health: self.health.clone(),
        }
    }
}

type PeerFramed = Framed<TcpStream, LengthDelimitedCodec>;

/// One group's RPCs to one peer, over one connection at a time.
pub struct PeerClient {
    config: Arc<PeerConfig>,
    group: GroupId,
    target: NodeId,
    node: PeerNode,
    addr: String,
    connection: Option<PeerFramed>,
    health: Arc<Health>,
}

impl fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerClient")
            .field("node_id", &self.config.node_id)
            .field("group", &self.group)
            .field("target", &self.target)
            .field("addr", &self.addr)
            .field("connected", &self.connection.is_some())
            .finish()
    }
}

/// Why an RPC got no response from the peer's Raft.
#[derive(Debug)]
enum Failure {
    /// Not connected, refused us or went away: back off before trying again.
    Unreachable(PeerError),
    /// A broken exchange on a working connection: try again at once.
    Network(PeerError),
    /// The RPC got no answer within this deadline.
    Timeout(Duration),
    /// The request does not fit in a frame.
    TooLarge(PeerError),
}

impl Failure {
    /// Every [`Failure::reason`].
    const REASONS: [&'static str; 4] = ["unreachable", "network", "timeout", "too_large"];

    /// The `reason` label of its metric.
    fn reason(&self) -> &'static str {
        match self {
            Failure::Unreachable(_) => Self::REASONS[0],
            Failure::Network(_) => Self::REASONS[1],
            Failure::Timeout(_) => Self::REASONS[2],
            Failure::TooLarge(_) => Self::REASONS[3],
        }
    }
}

/// A failure, naming the peer.
#[derive(Debug, thiserror::Error)]
#[error("peer {target} at {addr}: {detail}")]
struct PeerError {
    target: NodeId,
    addr: String,
    detail: String,
}

impl PeerClient {
    fn error(&self, detail: impl Into<String>) -> PeerError {
        PeerError {
            target: self.target,
            addr: self.addr.clone(),
            detail: detail.into(),
        }
    }

    /// Sends `rpc` and waits for its response, within `ttl`.
    async fn call(&mut self, rpc: Rpc, ttl: Duration) -> Result<Response, Failure> {
        let kind = match &rpc {
            Rpc::AppendEntries(_) => "append_entries",
            Rpc::InstallSnapshot(_) => "install_snapshot",
            Rpc::Vote(_) => "vote",
            Rpc::Admin(_) => "admin",
        };
        let request = Request {
            group: self.group,
            rpc,
        };
        let size = match wire::encoded_size(&request) {
            Ok(size) => size,
            Err(error @ WireError::TooLarge { .. }) => {
                return Err(Failure::TooLarge(self.error(error.to_string())))
            }
            Err(error) => return Err(Failure::Network(self.error(error.to_string()))),
        };
        let outcome = match tokio::time::timeout(ttl, self.exchange(&request, size)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure::Timeout(ttl)),
        };
        match &outcome {
            Ok(_) => self.health.succeeded(self.target),
            Err(failure) => {
                // The connection may hold half a frame or a late response: never reuse it.
                self.connection = None;
                self.health.failed(self.target, &self.addr, kind, failure);
            }
        }
        outcome
    }

    async fn exchange(&mut self, request: &Request, size: usize) -> Result<Response, Failure> {
        let connection = match &mut self.connection {
            Some(connection) => connection,
            slot @ None => {
                let connection = connect(
                    &self.config.secret,
                    self.config.node_id,
                    Some(self.target),
                    &self.addr,
                )
                .await?;
                slot.insert(connection)
            }
        };
        // Serialized into the connection's write buffer, then flushed (a failure leaves the
        // buffer with part of a frame: the caller drops the connection on any failure).
        if let Err(error) = wire::encode_frame_into(request, size, connection.write_buffer_mut()) {
            return Err(Failure::Network(self.error(error.to_string())));
        }
        if let Err(error) = SinkExt::<bytes::Bytes>::flush(connection).await {
            let detail = format!("sending: {error}");
            return Err(Failure::Unreachable(self.error(detail)));
        }
        let frame = match connection.next().await {
            Some(Ok(frame)) => frame,
            None => {
                return Err(Failure::Unreachable(self.error("closed the connection")));
            }
            Some(Err(error)) if error.kind() == std::io::ErrorKind::InvalidData => {
                let detail = format!("bad response frame: {error}");
                return Err(Failure::Network(self.error(detail)));
            }
            Some(Err(error)) => {
                let detail = format!("reading: {error}");
                return Err(Failure::Unreachable(self.error(detail)));
            }
        };
        wire::decode(&frame)
            .map_err(|error| Failure::Network(self.error(format!("undecodable response: {error}"))))
    }

    /// openraft's error for `failure` of an RPC of kind `action`.
    fn rpc_error<E: std::error::Error>(
        &self,
        failure: Failure,
        action: RPCTypes,
    ) -> RPCError<NodeId, PeerNode, E> {
        match failure {
            Failure::Unreachable(error) => RPCError::Unreachable(Unreachable::new(&error)),
            Failure::Network(error) | Failure::TooLarge(error) => {
                RPCError::Network(NetworkError::new(&error))
            }
            Failure::Timeout(ttl) => RPCError::Timeout(Timeout {
                action,
                id: self.config.node_id,
                target: self.target,
                timeout: ttl,
            }),
        }
    }

    /// openraft's error for the peer's answer `refusal`.
    fn refusal<E: std::error::Error>(&self, refusal: Refusal<E>) -> RPCError<NodeId, PeerNode, E> {
        match refusal {
            Refusal::Raft(error) => RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                error,
            )),
            Refusal::Refused(reason) => {
                RPCError::Unreachable(Unreachable::new(&self.error(reason)))
            }
        }
    }

    fn mismatch<E: std::error::Error>(&self, sent: &str) -> RPCError<NodeId, PeerNode, E> {
        let error = self.error(format!(
            "answered a {sent} request with another kind of response"
        ));
        RPCError::Network(NetworkError::new(&error))
    }
}

/// Connects to `addr`, answers its challenge as node `me` with `secret`, and checks the
/// server's answer (and that it is node `target`, when given).
async fn connect(
    secret: &str,
    me: NodeId,
    target: Option<NodeId>,
    addr: &str,
) -> Result<PeerFramed, Failure> {
    let error = |detail: String| PeerError {
        target: target.unwrap_or(0),
        addr: addr.to_string(),
        detail,
    };
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Failure::Unreachable(error(format!("connecting: {e}"))))?;
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(?target, addr, error = %e, "set_nodelay failed");
    }
    let mut framed = Framed::new(stream, wire::codec(PEER_HANDSHAKE_FRAME_BYTES_MAX));
    let frame = match framed.next().await {
        Some(Ok(frame)) => frame,
        None => {
            return Err(Failure::Unreachable(error(
                "closed before its challenge".into(),
            )))
        }
        Some(Err(e)) => {
            return Err(Failure::Unreachable(error(format!(
                "reading its challenge: {e}"
            ))))
        }
    };
    let challenge: Challenge = wire::decode(&frame)
        .map_err(|e| Failure::Unreachable(error(format!("undecodable challenge: {e}"))))?;
    if challenge.version != wire::PROTOCOL_VERSION {
        return Err(Failure::Unreachable(error(format!(
            "speaks peer protocol version {}, this node {}",
            challenge.version,
            wire::PROTOCOL_VERSION
        ))));
    }
    let mut nonce = [0u8; NONCE_BYTES];
    rand::thread_rng().fill_bytes(&mut nonce);
    let auth = Auth {
        node_id: me,
        mac: wire::auth_mac(secret, &challenge.nonce, me),
        nonce,
    };
    let bytes = wire::encode(&auth).map_err(|e| Failure::Network(error(e.to_string())))?;
    framed
        .send(bytes)
        .await
        .map_err(|e| Failure::Unreachable(error(format!("answering its challenge: {e}"))))?;
    let frame = match framed.next().await {
        Some(Ok(frame)) => frame,
        None => {
            let detail = "closed the connection before proving it knows the cluster secret \
                          (does it know ours?)";
            return Err(Failure::Unreachable(error(detail.into())));
        }
        Some(Err(e)) => {
            return Err(Failure::Unreachable(error(format!(
                "reading its welcome: {e}"
            ))))
        }
    };
    let welcome: Welcome = wire::decode(&frame)
        .map_err(|e| Failure::Unreachable(error(format!("undecodable welcome: {e}"))))?;
    if !wire::verify_welcome(secret, &nonce, &welcome) {
        return Err(Failure::Unreachable(error(
            "does not know the cluster secret".into(),
        )));
    }
    if let Some(target) = target.filter(|&target| welcome.node_id != target) {
        return Err(Failure::Unreachable(error(format!(
            "node {} answered there, not node {target}",
            welcome.node_id
        ))));
    }
    framed
        .codec_mut()
        .set_max_frame_length(PEER_FRAME_BYTES_MAX);
    Ok(framed)
}

/// One admin exchange with the node at `addr` (see [`crate::consensus::admin`]): connect,
/// authenticate as [`ADMIN_CLIENT_ID`] with `secret`, send `request`, read the answer.
pub(crate) async fn admin_exchange(
    secret: &str,
    addr: &str,
    request: &AdminRequest,
) -> Result<AdminResponse, String> {
    let mut connection = connect(secret, ADMIN_CLIENT_ID, None, addr)
        .await
        .map_err(|failure| match failure {
            Failure::Unreachable(e) | Failure::Network(e) | Failure::TooLarge(e) => {
                format!("{addr}: {}", e.detail)
            }
            Failure::Timeout(ttl) => format!("{addr}: no answer within {ttl:?}"),
        })?;
    let request = Request {
        group: crate::consensus::BROKER_GROUP,
        rpc: Rpc::Admin(request.clone()),
    };
    let bytes = wire::encode(&request).map_err(|e| format!("{addr}: {e}"))?;
    connection
        .send(bytes)
        .await
        .map_err(|e| format!("{addr}: sending: {e}"))?;
    let frame = match connection.next().await {
        Some(Ok(frame)) => frame,
        Some(Err(e)) => return Err(format!("{addr}: reading the answer: {e}")),
        None => return Err(format!("{addr}: closed the connection without answering")),
    };
    match wire::decode::<Response>(&frame) {
        Ok(Response::Admin(answer)) => Ok(answer),
        Ok(_) => Err(format!("{addr}: answered with another kind of response")),
        Err(e) => Err(format!("{addr}: undecodable answer: {e}")),
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        let ttl = option.soft_ttl();
        let given = rpc.entries.len();
        let entries = entries_within(&rpc.entries, APPEND_BYTES_TARGET);
        // Sending a prefix: a success covers the entries up to the last one sent.
        let partial = (entries < given).then(|| {
            rpc.entries.truncate(entries);
            rpc.entries.last().map(|entry| entry.log_id)
        });
        tracing::debug!(
            target = self.target,
            group = self.group,
            entries,
            given,
            "append_entries"
        );
        match self.call(Rpc::AppendEntries(rpc), ttl).await {
            Ok(Response::AppendEntries(Ok(AppendEntriesResponse::Success))) => match partial {
                Some(last_sent) => Ok(AppendEntriesResponse::PartialSuccess(last_sent)),
                None => Ok(AppendEntriesResponse::Success),
            },
            Ok(Response::AppendEntries(Ok(response))) => Ok(response),
            Ok(Response::AppendEntries(Err(refusal))) => Err(self.refusal(refusal)),
            Ok(_) => Err(self.mismatch("append_entries")),
            // Only a single entry larger than a frame gets here (several entries are sent
            // only while they total at most APPEND_BYTES_TARGET): a network error naming it.
            Err(failure) => Err(self.rpc_error(failure, RPCTypes::AppendEntries)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, PeerNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let ttl = option.soft_ttl();
        tracing::debug!(
            target = self.target,
            group = self.group,
            offset = rpc.offset,
            bytes = rpc.data.len(),
            done = rpc.done,
            "install_snapshot"
        );
        match self.call(Rpc::InstallSnapshot(rpc), ttl).await {
            Ok(Response::InstallSnapshot(Ok(response))) => Ok(response),
            Ok(Response::InstallSnapshot(Err(refusal))) => Err(self.refusal(refusal)),
            Ok(_) => Err(self.mismatch("install_snapshot")),
            Err(failure) => Err(self.rpc_error(failure, RPCTypes::InstallSnapshot)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        let ttl = option.soft_ttl();
        tracing::debug!(target = self.target, group = self.group, vote = %rpc.vote, "vote");
        match self.call(Rpc::Vote(rpc), ttl).await {
            Ok(Response::Vote(Ok(response))) => Ok(response),
            Ok(Response::Vote(Err(refusal))) => Err(self.refusal(refusal)),
            Ok(_) => Err(self.mismatch("vote")),
            Err(failure) => Err(self.rpc_error(failure, RPCTypes::Vote)),
        }
    }

    fn backoff(&self) -> Backoff {
        let waits = std::iter::successors(Some(PEER_BACKOFF_MIN), |wait| {
            Some((*wait * 2).min(PEER_BACKOFF_MAX))
        });
        Backoff::new(waits)
    }
}

/// How many of `entries`, from the first, make up at most `target` bytes of payload; at least
/// one (an entry larger than the target goes alone; the frame limit still applies to it).
fn entries_within(entries: &[openraft::Entry<TypeConfig>], target: usize) -> usize {
    let mut bytes = 0usize;
    for (sent, entry) in entries.iter().enumerate() {
        bytes = bytes.saturating_add(entry_bytes(entry));
        if bytes > target && sent > 0 {
            return sent;
        }
    }
    entries.len()
}

/// About how many bytes `entry` takes in a request: its records, plus a fixed allowance for the
/// log id and the rest.
fn entry_bytes(entry: &openraft::Entry<TypeConfig>) -> usize {
    const FIXED: usize = 64;
    match &entry.payload {
        openraft::EntryPayload::Normal(crate::consensus::Proposal::Records { records, .. }) => {
            FIXED + records.len()
        }
        _ => FIXED,
    }
}

/// Which peers are failing, so that a peer that stays down costs one warning per
/// [`PEER_FAILURE_LOG_INTERVAL`], not one per retry.
#[derive(Debug, Default)]
struct Health {
    targets: Mutex<HashMap<NodeId, Failing>>,
}

/// A peer whose last RPC failed.
#[derive(Debug)]
struct Failing {
    /// When its failures were last logged.
    logged_at: Instant,
    /// Failures since then.
    suppressed: u64,
}

impl Health {
    fn failed(&self, target: NodeId, addr: &str, rpc: &'static str, failure: &Failure) {
        metrics::counter!(names::CLUSTER_PEER_RPC_FAILURES, "peer" => target.to_string(), "reason" => failure.reason())
            .increment(1);
        let now = Instant::now();
        let mut targets = self.targets.lock();
        let (log, suppressed) = match targets.get_mut(&target) {
            None => {
                targets.insert(
                    target,
                    Failing {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                (true, 0)
            }
            Some(failing) if now.duration_since(failing.logged_at) >= PEER_FAILURE_LOG_INTERVAL => {
                let suppressed = failing.suppressed;
                failing.logged_at = now;
                failing.suppressed = 0;
                (true, suppressed)
            }
            Some(failing) => {
                failing.suppressed += 1;
                (false, 0)
            }
        };
        drop(targets);
        if log {
            match failure {
                Failure::Unreachable(error)
                | Failure::Network(error)
                | Failure::TooLarge(error) => {
                    tracing::warn!(target, addr, rpc, %error, suppressed, "peer RPC failed");
                }
                Failure::Timeout(deadline) => {
                    let deadline_ms = deadline.as_millis() as u64;
                    tracing::warn!(
                        target,
                        addr,
                        rpc,
                        deadline_ms,
                        suppressed,
                        "peer RPC timed out: every Raft RPC must be answered within 3/4 of cluster.raft.heartbeat_ms; if the round trip to this peer plus its fsync takes longer, the group cannot commit through it: raise heartbeat_ms (and the election timeouts with it)"
                    );
                }
            }
        }
    }

    fn succeeded(&self, target: NodeId) {
        let mut targets = self.targets.lock();
        if targets.remove(&target).is_some() {
            drop(targets);
            tracing::info!(target, "peer answers again");
        }
    }
}
