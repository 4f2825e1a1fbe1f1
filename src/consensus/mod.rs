//! Replication: the broker's changes agreed by a Raft group before they are acknowledged.
//!
//! This module is the only one that imports `openraft` (pinned to exactly 0.9.25: the 0.9 line is
//! the registry's stable release, and its `storage-v2` log API calls back once appended entries
//! are durable — [`log_store`] completes that callback from one node-wide group commit; 0.10 is
//! still a series of alpha releases whose storage and network traits change between them).
//!
//! # How a change is replicated
//!
//! The leader's engine makes a change exactly as a single node does (see [`crate::broker`]), and
//! hands the change's mutations to a [`Storage`](crate::storage::Storage):
//! [`replicated::ReplicatedStorage`]. It encodes them as the log's records
//! (`spec/storage.md`), collects everything appended since its last proposal into one Raft
//! entry ([`Proposal::Records`]) and completes the commits once the entry is committed — on
//! disk on a majority of the voters, each of which fsyncs before it answers. Every replica
//! (the leader included) applies committed entries to a [`state::StateMachine`]: the same
//! [`Replay`](crate::engine::replay::Replay) model the single-node log keeps, with the bodies
//! in it. A node that becomes leader loads its engine from that model before it accepts a
//! change; a leader whose proposal fails (it lost its leadership) refuses changes until it
//! leads again and has reloaded its engine, so the engine never keeps a change the group did
//! not commit.
//!
//! A proposal carries the term it was made for; an entry whose term is not that term is
//! applied as nothing, on every replica alike. So a batch collected under one leadership can
//! never be committed under a later one after an earlier batch was lost.
//!
//! Replicas never read their own clocks: the times of a change are in its mutations (the
//! leader's), and the leader proposes [`Proposal::Tick`] so that replicas expire retained
//! messages at the leader's time.
//!
//! # Files
//!
//! - [`log_store`]: the node's one Raft log, shared by every group on the node: one writer,
//!   one `fdatasync` per batch for all groups' appends, votes and commits.
//! - [`network`]: the peer protocol (Raft RPCs over TCP, authenticated with the cluster
//!   secret).
//! - [`state`]: the state machine (the replay model) and its snapshots.
//! - [`replicated`]: the [`Storage`](crate::storage::Storage) the broker appends to.
//! - [`node`]: starting a node: the log, the group, the peer listener, leadership changes,
//!   what a node with an empty log does, and membership changes on the leader.
//! - [`admin`]: membership changes as an operator asks them (`cmqd cluster`), over the peer
//!   listener with the cluster secret, and the rules a change must pass.

pub mod admin;
pub mod log_store;
pub mod network;
pub mod node;
pub mod replicated;
pub mod state;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Replaces `dir/name` with `parts` written back to back so that a crash leaves the old file
/// or the new one, never a mix: written to `dir/temporary`, synced, renamed over `name`, and
/// the directory synced.
pub(crate) fn replace_file_durably(
    dir: &std::path::Path,
    temporary: &str,
    name: &str,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    use std::io::Write;
    let temporary = dir.join(temporary);
    let mut file = std::fs::File::create(&temporary)?;
    for part in parts {
        file.write_all(part)?;
    }
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// A node's id in the cluster (1, 2, 3 ... as configured).
pub type NodeId = u64;

/// A Raft group on a node. Group 0 replicates the whole broker today; the node's log and peer
/// protocol already carry a group id so that data shards can be added as further groups.
pub type GroupId = u32;

/// The group that replicates every queue, topic and subscription (today's only group).
pub const BROKER_GROUP: GroupId = 0;

/// What other nodes need to know about a node: where to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    /// Address of its peer (Raft) listener.
    pub peer: String,
    /// Address of its binary protocol listener, where clients are sent when it leads.
    pub api: String,
    /// Address of its HTTP API listener (empty when it has none), where other nodes forward
    /// HTTP requests when it leads.
    pub http: String,
}

impl std::fmt::Display for PeerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer {} api {}", self.peer, self.api)?;
        if !self.http.is_empty() {
            write!(f, " http {}", self.http)?;
        }
        Ok(())
    }
}

/// The payload of a Raft entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proposal {
    /// The engine's mutations, encoded as log records (`spec/storage.md`), one commit batch.
    /// Applied only when the entry's term is `term` (module docs).
    Records {
        /// The leader term the batch was collected under.
        term: u64,
        /// Framed records, back to back.
        records: Bytes,
    },
    /// The leader's time: replicas expire retained messages up to it.
    Tick {
        /// The leader term it was proposed under.
        term: u64,
        /// The leader's clock, ms since the Unix epoch.
        now_ms: u64,
    },
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proposal::Records { term, records } => {
                write!(f, "records({} bytes, term {term})", records.len())
            }
            Proposal::Tick { term, now_ms } => write!(f, "tick({now_ms}, term {term})"),
        }
    }
}

openraft::declare_raft_types!(
    /// The Raft types of the broker's groups.
    pub TypeConfig:
        D = Proposal,
        R = (),
        NodeId = NodeId,
        Node = PeerNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft group's handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// Snapshot data for the tests' own state machines: an anonymous temporary file.
#[cfg(test)]
pub(crate) mod test_snapshots {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};

    /// A file holding `data`, read from its start.
    pub(crate) fn file_of(data: &[u8]) -> Box<tokio::fs::File> {
        use std::io::{Seek, Write};
        let mut file = tempfile::tempfile().expect("a temporary file");
        file.write_all(data).expect("written");
        file.rewind().expect("rewound");
        Box::new(tokio::fs::File::from_std(file))
    }

    /// Everything in `file`, from its start.
    pub(crate) async fn bytes_of(mut file: Box<tokio::fs::File>) -> Vec<u8> {
        file.rewind().await.expect("rewound");
        let mut data = Vec::new();
        file.read_to_end(&mut data).await.expect("read");
        data
    }
}
