//! A hasher for ids this program assigns itself (message, queue and request ids), shared by
//! the broker and the client library.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes an id that this program assigned (sequential, never chosen by a peer) with one
/// multiplication: the log's model looks up several message ids per record and the client one
/// request id per reply, and SipHash's resistance to chosen keys buys nothing there.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        // Fibonacci hashing: spreads sequential ids over the high bits hashbrown uses.
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_u32(&mut self, id: u32) {
        self.write_u64(u64::from(id));
    }
}

/// A map keyed by broker-assigned ids.
pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;
