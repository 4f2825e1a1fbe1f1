//! Fixed loopback ports for processes whose address must be written down before they start (a
//! cluster node's config names every other node's address; Prometheus takes its listen address
//! on the command line).
//!
//! Such a port has to be released before the child binds it, and in that window anything may
//! take it. A port from `bind(127.0.0.1:0)` is in the kernel's ephemeral range, where the
//! kernel hands out ports on its own: to every other test's `bind(:0)` and to the source port of
//! every outgoing connection (a cluster test opens hundreds). That is how a node once failed
//! with "Address already in use" in CI. So the ports here come from below (or, if there is no
//! room below, above) `net.ipv4.ip_local_port_range`, which the kernel never assigns by
//! itself; each is checked free by binding it, and a process-wide cursor starting at a
//! PID-derived offset hands every port out once per sweep, so tests in one process never share
//! one and concurrent test processes start far apart.

use std::net::{SocketAddr, TcpListener};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The lowest port used (clear of the well-known and commonly configured low ports).
const FLOOR: u16 = 10_000;
/// How many candidates one reservation tries before giving up.
const ATTEMPTS: usize = 4_096;

/// The ports outside the kernel's ephemeral range that tests may use.
fn pool() -> &'static Range<u16> {
    static POOL: OnceLock<Range<u16>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| {
                let mut parts = text.split_whitespace().map(str::parse::<u16>);
                match (parts.next(), parts.next()) {
                    (Some(Ok(low)), Some(Ok(high))) => Some((low, high)),
                    _ => None,
                }
            })
            .unwrap_or((32_768, 60_999));
        if low >= FLOOR + 4_096 {
            FLOOR..low
        } else {
            assert!(
                high <= u16::MAX - 4_096,
                "the ephemeral port range {low}-{high} leaves no room for fixed test ports"
            );
            high + 1..u16::MAX
        }
    })
}

fn next_candidate() -> u16 {
    static CURSOR: OnceLock<AtomicUsize> = OnceLock::new();
    let pool = pool();
    let size = usize::from(pool.end - pool.start);
    let cursor = CURSOR.get_or_init(|| {
        // Spread concurrent test processes (nextest runs one per test) over the pool.
        let pid = std::process::id() as usize;
        AtomicUsize::new(pid.wrapping_mul(2_654_435_761) % size)
    });
    let step = cursor.fetch_add(1, Ordering::Relaxed) % size;
    pool.start + u16::try_from(step).unwrap()
}

/// A listener on a free 127.0.0.1 port outside the ephemeral range, held until dropped.
pub fn hold() -> TcpListener {
    for _ in 0..ATTEMPTS {
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", next_candidate())) {
            return listener;
        }
    }
    panic!("no free port in {:?} after {ATTEMPTS} tries", pool());
}

/// A 127.0.0.1 address outside the ephemeral range that was free a moment ago (bound and
/// released). Also what to use for an address where nothing listens: nothing takes it by itself.
pub fn free() -> SocketAddr {
    hold().local_addr().unwrap()
}

#[test]
fn held_ports_are_distinct_and_outside_the_ephemeral_range() {
    let held: Vec<TcpListener> = (0..64).map(|_| hold()).collect();
    let mut ports: Vec<u16> = held
        .iter()
        .map(|listener| listener.local_addr().unwrap().port())
        .collect();
    assert!(ports.iter().all(|port| pool().contains(port)), "{ports:?}");
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 64);
}
