//! Time stamps in payloads, latency histograms, and the counters the workers share.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::OnceLock;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;

pub(crate) fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(cmqd::clock::monotonic_now)
}

/// Nanoseconds since the bench started: producers stamp it into payloads, consumers subtract.
pub(crate) fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

pub(crate) fn payload(size: usize, seq: u64) -> Bytes {
    let mut buf = BytesMut::with_capacity(size);
    buf.put_u64(now_ns());
    buf.put_u64(seq);
    buf.resize(size, b'x');
    buf.freeze()
}

pub(crate) fn sent_ns(body: &[u8]) -> Option<u64> {
    let stamp: [u8; 8] = body.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(stamp))
}

pub(crate) fn histogram() -> Histogram<u64> {
    // 1 us to 10 min, in microseconds, 3 significant digits. The bounds are constants that
    // hdrhistogram accepts, so failing here is a programming error, not an input error.
    match Histogram::new_with_bounds(1, 600_000_000, 3) {
        Ok(histogram) => histogram,
        Err(error) => panic!("hdrhistogram refused constant bounds: {error}"),
    }
}

/// Counters shared by the workers and the progress line.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) errors: AtomicU64,
    /// When the last send was acknowledged and the last delete done, ns since the epoch.
    pub(crate) last_ack_ns: AtomicU64,
    pub(crate) last_delete_ns: AtomicU64,
    pub(crate) stop: AtomicBool,
}
