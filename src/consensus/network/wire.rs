//! The peer protocol's messages and their encoding, without I/O.
//!
//! Every message is one frame: a 4-byte **big-endian** `u32` length, then that many bytes of
//! bincode 1.3 ([`options`]: varint integers, little-endian, no trailing bytes). A connection
//! opens with a [`Challenge`] from the server, an [`Auth`] from the client (answering it and
//! challenging the server in turn) and a [`Welcome`] from the server (answering that); then
//! the client sends a [`Request`] and waits for its [`Response`], one at a time.

use bincode::Options;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio_util::codec::LengthDelimitedCodec;

use crate::consensus::admin::{AdminRequest, AdminResponse};
use crate::consensus::{GroupId, NodeId, TypeConfig};
use crate::limits::cluster::PEER_FRAME_BYTES_MAX;

/// The protocol version in the [`Challenge`]; a client refuses any other.
pub(super) const PROTOCOL_VERSION: u32 = 1;

/// Bytes of the server's random challenge.
pub(super) const NONCE_BYTES: usize = 32;

/// Bytes of an HMAC-SHA256 tag.
pub(super) const MAC_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// The first frame of a connection, server to client.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Challenge {
    /// [`PROTOCOL_VERSION`].
    pub(super) version: u32,
    /// Fresh random bytes the client must sign.
    pub(super) nonce: [u8; NONCE_BYTES],
}

/// The client's answer to a [`Challenge`], and its own challenge to the server.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Auth {
    /// The client's node id.
    pub(super) node_id: NodeId,
    /// [`auth_mac`] of the challenge and `node_id`.
    pub(super) mac: [u8; MAC_BYTES],
    /// Fresh random bytes the server must sign.
    pub(super) nonce: [u8; NONCE_BYTES],
}

/// The server's answer to the client's challenge ([`Auth::nonce`]): the client talks only to
/// a node that knows the secret, and only to the node it meant to dial.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Welcome {
    /// The server's node id.
    pub(super) node_id: NodeId,
    /// [`welcome_mac`] of the client's nonce and `node_id`.
    pub(super) mac: [u8; MAC_BYTES],
}

/// A Raft RPC for one group.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Request {
    /// The group whose Raft answers it.
    pub(super) group: GroupId,
    /// The RPC.
    pub(super) rpc: Rpc,
}

/// The Raft RPCs.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Rpc {
    /// Log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// An election.
    Vote(VoteRequest<NodeId>),
    /// One chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// An operator's request ([`crate::consensus::admin`]); the only kind a node serves to
    /// [`ADMIN_CLIENT_ID`](crate::consensus::admin::ADMIN_CLIENT_ID).
    Admin(AdminRequest),
}

/// The answer to a [`Request`]: the variant of its [`Rpc`].
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Response {
    /// To [`Rpc::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, Refusal<RaftError<NodeId>>>),
    /// To [`Rpc::Vote`].
    Vote(Result<VoteResponse<NodeId>, Refusal<RaftError<NodeId>>>),
    /// To [`Rpc::InstallSnapshot`].
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, Refusal<RaftError<NodeId, InstallSnapshotError>>>,
    ),
    /// To [`Rpc::Admin`].
    Admin(AdminResponse),
}

/// Why a request got no Raft response.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Refusal<E> {
    /// The group's Raft answered with an error.
    Raft(E),
    /// The node did not hand the request to Raft (no such group, may not vote now).
    Refused(String),
}

/// Failure to encode or decode a frame.
#[derive(Debug, thiserror::Error)]
pub(super) enum WireError {
    /// The message would not fit in a frame.
    #[error("message of {bytes} bytes exceeds the peer frame limit of {max} bytes")]
    TooLarge {
        /// Its encoded size.
        bytes: u64,
        /// [`PEER_FRAME_BYTES_MAX`].
        max: usize,
    },
    /// bincode failed.
    #[error("bincode: {0}")]
    Bincode(#[from] bincode::Error),
}

/// The bincode options of every frame. The byte limit bounds what decoding may read (and so
/// allocate) whatever lengths a hostile frame claims.
fn options() -> impl Options {
    bincode::DefaultOptions::new().with_limit(PEER_FRAME_BYTES_MAX as u64)
}

/// The frame codec: a big-endian `u32` length, at most `max_frame_bytes` bytes after it.
pub(super) fn codec(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_type::<u32>()
        .max_frame_length(max_frame_bytes)
        .new_codec()
}

/// The size of `message` as a frame's payload, checked against the frame limit.
pub(super) fn encoded_size<T: Serialize>(message: &T) -> Result<usize, WireError> {
    let bytes = options()
        .serialized_size(message)
        .map_err(|error| match *error {
            bincode::ErrorKind::SizeLimit => WireError::TooLarge {
                bytes: PEER_FRAME_BYTES_MAX as u64 + 1,
                max: PEER_FRAME_BYTES_MAX,
            },
            _ => WireError::Bincode(error),
        })?;
    match usize::try_from(bytes) {
        Ok(n) if n <= PEER_FRAME_BYTES_MAX => Ok(n),
        _ => Err(WireError::TooLarge {
            bytes,
            max: PEER_FRAME_BYTES_MAX,
        }),
    }
}

/// Appends `message` to `out` as one whole frame of [`codec`] (its length, then its payload of
/// `size` bytes, from [`encoded_size`]): straight into a connection's write buffer, which
/// keeps its memory from one request to the next. Serializing an AppendEntries of several MiB
/// of bodies into a fresh buffer of its own, then copying it into the connection's, took a
/// quarter of a cluster leader's samples storing 64 KiB messages (most of it clearing the
/// fresh buffer's pages).
pub(super) fn encode_frame_into<T: Serialize>(
    message: &T,
    size: usize,
    out: &mut bytes::BytesMut,
) -> Result<(), WireError> {
    use bytes::BufMut as _;
    let len = u32::try_from(size).map_err(|_| WireError::TooLarge {
        bytes: size as u64,
        max: PEER_FRAME_BYTES_MAX,
    })?;
    let start = out.len();
    out.reserve(4 + size);
    out.put_u32(len);
    let mut writer = out.writer();
    options().serialize_into(&mut writer, message)?;
    let out = writer.into_inner();
    if out.len() - start != 4 + size {
        let wrote = out.len() - start - 4;
        out.truncate(start);
        return Err(WireError::Bincode(Box::new(bincode::ErrorKind::Custom(
            format!("the message took {wrote} bytes, not the {size} its size said"),
        ))));
    }
    Ok(())
}

/// Encodes one message as a frame's payload.
pub(super) fn encode<T: Serialize>(message: &T) -> Result<Bytes, WireError> {
    encoded_size(message)?;
    Ok(Bytes::from(options().serialize(message)?))
}

/// Decodes one frame's payload; the whole payload must be the message.
pub(super) fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    Ok(options().deserialize(payload)?)
}

/// The client's tag: HMAC-SHA256 keyed with the cluster secret over `nonce || node_id` (the
/// id as 8 bytes, big-endian).
pub(super) fn auth_mac(
    secret: &str,
    nonce: &[u8; NONCE_BYTES],
    node_id: NodeId,
) -> [u8; MAC_BYTES] {
    mac(secret, b"", nonce, node_id)
}

/// The server's tag: HMAC-SHA256 keyed with the cluster secret over
/// `"cmqd-peer-welcome" || nonce || node_id` (the id as 8 bytes, big-endian). The prefix makes
/// it differ from any client tag, so a server's answer can never be replayed as a client's.
pub(super) fn welcome_mac(
    secret: &str,
    nonce: &[u8; NONCE_BYTES],
    node_id: NodeId,
) -> [u8; MAC_BYTES] {
    mac(secret, WELCOME_CONTEXT, nonce, node_id)
}

const WELCOME_CONTEXT: &[u8] = b"cmqd-peer-welcome";

fn mac(
    secret: &str,
    context: &[u8],
    nonce: &[u8; NONCE_BYTES],
    node_id: NodeId,
) -> [u8; MAC_BYTES] {
    let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        // HMAC takes keys of any length; this arm is never taken.
        Err(_) => return [0; MAC_BYTES],
    };
    mac.update(context);
    mac.update(nonce);
    mac.update(&node_id.to_be_bytes());
    mac.finalize().into_bytes().into()
}

/// Whether `auth` proves knowledge of `secret` for `nonce` (compared in constant time).
pub(super) fn verify(secret: &str, nonce: &[u8; NONCE_BYTES], auth: &Auth) -> bool {
    let expected = auth_mac(secret, nonce, auth.node_id);
    bool::from(expected.ct_eq(&auth.mac))
}

/// Whether `welcome` proves knowledge of `secret` for the client's `nonce` (constant time).
pub(super) fn verify_welcome(secret: &str, nonce: &[u8; NONCE_BYTES], welcome: &Welcome) -> bool {
    let expected = welcome_mac(secret, nonce, welcome.node_id);
    bool::from(expected.ct_eq(&welcome.mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_encoded_into_a_buffer_is_the_codecs_frame_and_decodes_back() {
        use tokio_util::codec::{Decoder, Encoder};
        let entries: Vec<openraft::Entry<crate::consensus::TypeConfig>> = (1..=3)
            .map(|index| openraft::Entry {
                log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(2, 1), index),
                payload: openraft::EntryPayload::Normal(crate::consensus::Proposal::Records {
                    term: 2,
                    records: Bytes::from(vec![index as u8; 70_000]),
                }),
            })
            .collect();
        let request = Request {
            group: 0,
            rpc: Rpc::AppendEntries(openraft::raft::AppendEntriesRequest {
                vote: openraft::Vote::new_committed(2, 1),
                prev_log_id: None,
                entries,
                leader_commit: None,
            }),
        };
        let size = encoded_size(&request).unwrap();
        // Into a buffer that already holds a frame (as a write buffer may).
        let mut direct = bytes::BytesMut::from(&b"\0\0\0\x01x"[..]);
        encode_frame_into(&request, size, &mut direct).unwrap();
        let mut framed = bytes::BytesMut::from(&b"\0\0\0\x01x"[..]);
        codec(PEER_FRAME_BYTES_MAX)
            .encode(encode(&request).unwrap(), &mut framed)
            .unwrap();
        assert_eq!(direct, framed);
        let mut codec = codec(PEER_FRAME_BYTES_MAX);
        assert_eq!(&codec.decode(&mut direct).unwrap().unwrap()[..], b"x");
        let payload = codec.decode(&mut direct).unwrap().unwrap();
        let back: Request = decode(&payload).unwrap();
        assert_eq!(format!("{back:?}"), format!("{request:?}"));
    }

    #[test]
    fn mac_binds_secret_nonce_and_node_id() {
        let nonce = [7u8; NONCE_BYTES];
        let mac = auth_mac("a-cluster-secret-1234", &nonce, 2);
        let good = Auth {
            node_id: 2,
            mac,
            nonce,
        };
        assert!(verify("a-cluster-secret-1234", &nonce, &good));
        assert!(!verify("another-secret-12345", &nonce, &good));
        assert!(!verify("a-cluster-secret-1234", &[8u8; NONCE_BYTES], &good));
        let other_id = Auth {
            node_id: 3,
            mac,
            nonce,
        };
        assert!(!verify("a-cluster-secret-1234", &nonce, &other_id));

        // The server's tag is its own: a client's tag does not pass as one, nor the reverse.
        let welcome = Welcome {
            node_id: 2,
            mac: welcome_mac("a-cluster-secret-1234", &nonce, 2),
        };
        assert!(verify_welcome("a-cluster-secret-1234", &nonce, &welcome));
        assert!(!verify_welcome("another-secret-12345", &nonce, &welcome));
        let reflected = Welcome { node_id: 2, mac };
        assert!(!verify_welcome("a-cluster-secret-1234", &nonce, &reflected));
    }

    const CLIENT_TAG: &str = "cd595105ebf5e524c700647ba85567efea3b83b5cb4837d313af6c4aeb988d08";
    const SERVER_TAG: &str = "e4fa5c59a995f78bff04a4d6e9ee27053254145452ef4323b3aa7f33a37b173c";

    #[test]
    fn tags_match_an_independent_computation() {
        // python3 -c "import hmac,hashlib; print(hmac.new(b'k'*16, bytes(32)+(7).to_bytes(8,'big'), hashlib.sha256).hexdigest())"
        let mac = auth_mac(&"k".repeat(16), &[0; NONCE_BYTES], 7);
        assert_eq!(hex::encode(mac), CLIENT_TAG);
        // ... b'cmqd-peer-welcome'+bytes(32)+(7).to_bytes(8,'big') ...
        let mac = welcome_mac(&"k".repeat(16), &[0; NONCE_BYTES], 7);
        assert_eq!(hex::encode(mac), SERVER_TAG);
    }

    #[test]
    fn every_truncation_of_a_request_is_an_error() {
        let vote = VoteRequest::new(openraft::Vote::new(3, 1), None);
        let request = Request {
            group: 0,
            rpc: Rpc::Vote(vote),
        };
        let bytes = encode(&request).unwrap();
        let back: Request = decode(&bytes).unwrap();
        assert!(matches!(back.rpc, Rpc::Vote(ref v) if v.vote == openraft::Vote::new(3, 1)));
        for cut in 0..bytes.len() {
            assert!(decode::<Request>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(
            decode::<Request>(&longer).is_err(),
            "trailing byte accepted"
        );
    }

    #[test]
    fn a_hostile_length_prefix_does_not_allocate_it() {
        // A byte string claiming 4 GiB (varint 0xfc: a u32 follows) in a 5-byte payload: an
        // error, not an allocation of that size.
        let huge: Vec<u8> = [0xfc, 0xff, 0xff, 0xff, 0xff].to_vec();
        assert!(decode::<Vec<u8>>(&huge).is_err());
    }
}
