//! The peer protocol: Raft RPCs between the nodes of a cluster, over TCP on the peer listener
//! (`cluster.listen`), authenticated with the cluster secret.
//!
//! # Wire format
//!
//! Every message is a frame: a 4-byte big-endian `u32` length, then that many bytes of
//! bincode 1.3 (varint integers, little-endian, no trailing bytes; see `wire.rs`). Frames are
//! at most [`PEER_FRAME_BYTES_MAX`](crate::limits::cluster::PEER_FRAME_BYTES_MAX) once
//! authenticated, [`PEER_HANDSHAKE_FRAME_BYTES_MAX`](crate::limits::cluster::PEER_HANDSHAKE_FRAME_BYTES_MAX)
//! before.
//!
//! ```text
//! client (dialling node)                         server (peer listener)
//!                           <-- Challenge { version: u32, nonce: [u8; 32] }
//! Auth { node_id: u64, mac: [u8; 32], nonce: [u8; 32] } -->
//!     mac = HMAC-SHA256(secret, server nonce || client node_id as u64 big-endian)
//!                                                wrong mac: the server closes the connection
//!                           <-- Welcome { node_id: u64, mac: [u8; 32] }
//!     mac = HMAC-SHA256(secret, "cmqd-peer-welcome" || client nonce || server node_id)
//!     wrong mac, or not the node the client meant to dial: the client closes the connection
//! Request { group: u32, rpc } -->
//!                           <-- Response (the rpc's variant: Ok(response) | Err(refusal))
//! Request ... (one at a time, each answered before the next is sent)
//! ```
//!
//! An operator's tool (`cmqd cluster ...`) connects the same way as node id 0
//! ([`ADMIN_CLIENT_ID`](super::admin::ADMIN_CLIENT_ID), which no node has) and sends
//! `Request { group: 0, rpc: Admin(..) }` ([`super::admin`]); a node serves id 0 nothing else,
//! and serves Admin requests to nobody else.
//!
//! The authentication is mutual: neither side acts on a frame from a node that has not shown
//! it knows the secret, and a client talks to the node it meant to dial only (openraft's
//! "ensure connection to the correct node"). The frames after it are neither encrypted nor
//! signed: the peer network must be private, as the client listener's plain TCP is.

//! # Errors as openraft sees them
//!
//! | What happened | `RPCError` |
//! | --- | --- |
//! | connect refused, connection reset or closed, failed handshake (either side), the peer refused the request (no such group, may not vote now), wrong protocol version | `Unreachable` (openraft backs off, [`PeerClient`]'s backoff: 50 ms doubling to 1 s) |
//! | undecodable or mismatched response, a request too large for a frame | `Network` (an `AppendEntries` of several entries too large for a frame: `PayloadTooLarge`, so openraft halves it) |
//! | no response within the RPC's `hard_ttl` | `Timeout` (the connection is dropped) |
//! | the peer's Raft answered an error | `RemoteError` |

mod client;
mod server;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;

pub(crate) use client::admin_exchange;
pub use client::{PeerClient, PeerNetwork};
pub use server::{AdminFuture, PeerGroups, PeerServer};

use super::NodeId;

/// How this node talks to its peers.
#[derive(Clone)]
pub struct PeerConfig {
    /// This node's id, which it proves to the peers it dials.
    pub node_id: NodeId,
    /// The cluster secret (`cluster.secret`).
    pub secret: String,
    /// Where this node dials each peer (from its own config, so a test can put a proxy
    /// there); a peer missing here is dialled at the address in its membership entry.
    pub dial: HashMap<NodeId, String>,
}

impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("node_id", &self.node_id)
            .field("secret", &"<redacted>")
            .field("dial", &self.dial)
            .finish()
    }
}
