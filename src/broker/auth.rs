//! Accounts and the handshake's authentication check.
//!
//! The client proves it holds the secret key by sending
//! `HMAC-SHA256(secret_key, AUTH_CONTEXT || nonce || secret_id)` over a nonce the server chose
//! for this connection, so the key never crosses the wire and a recorded handshake is useless on
//! another connection. Signatures are compared in constant time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use subtle::ConstantTimeEq;

use crate::config::AccountConfig;
use crate::limits::auth::{THROTTLE_ADDRESSES_MAX, THROTTLE_WINDOW};
use crate::protocol::{sign, NONCE_BYTES, SIGNATURE_BYTES};

/// The accounts the broker knows, by secretId.
#[derive(Debug, Default)]
pub struct Accounts {
    by_secret_id: HashMap<String, AccountConfig>,
}

impl Accounts {
    /// The registry of the given accounts.
    pub fn new(accounts: &[AccountConfig]) -> Self {
        Self {
            by_secret_id: accounts
                .iter()
                .map(|a| (a.secret_id.clone(), a.clone()))
                .collect(),
        }
    }

    /// The account name and secret key of `secret_id`, for a front end that checks signatures of
    /// its own making (the CMQ HTTP API signs each request, not a handshake). Crate-private: the
    /// key must not leave the broker.
    pub(crate) fn secret(&self, secret_id: &str) -> Option<(&str, &str)> {
        self.by_secret_id
            .get(secret_id)
            .map(|account| (account.name.as_str(), account.secret_key.as_str()))
    }

    /// The account name if `signature` is right for `secret_id` and `nonce`.
    pub fn verify(
        &self,
        secret_id: &str,
        nonce: &[u8; NONCE_BYTES],
        signature: &[u8; SIGNATURE_BYTES],
    ) -> Option<&str> {
        let account = self.by_secret_id.get(secret_id)?;
        let expected = sign(&account.secret_key, nonce, secret_id);
        if bool::from(expected.ct_eq(signature)) {
            Some(&account.name)
        } else {
            None
        }
    }
}

/// Failed authentications per source address: past the limit within a minute, new connections
/// from that address are refused until the minute is over. Slows secret guessing and bounds the
/// log and CPU cost of a flood of bad handshakes.
#[derive(Debug)]
pub struct AuthThrottle {
    failures: DashMap<IpAddr, (Instant, u32)>,
    max: u32,
}

impl AuthThrottle {
    /// A throttle allowing `max` failures per address per minute.
    pub fn new(max: u32) -> Self {
        Self {
            failures: DashMap::new(),
            max,
        }
    }

    /// Counts a failed authentication from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        self.record_failure_at(ip, crate::clock::monotonic_now());
    }

    /// Whether connections from `ip` are refused now.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        self.is_blocked_at(ip, crate::clock::monotonic_now())
    }

    /// How long connections from `ip` stay refused, if they are refused now: until the window
    /// that counted its failures ends.
    pub fn blocked_for(&self, ip: IpAddr) -> Option<Duration> {
        self.blocked_for_at(ip, crate::clock::monotonic_now())
    }

    fn blocked_for_at(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let (start, count) = *self.failures.get(&ip)?;
        let elapsed = now.duration_since(start);
        (elapsed < THROTTLE_WINDOW && count >= self.max).then(|| THROTTLE_WINDOW - elapsed)
    }

    fn record_failure_at(&self, ip: IpAddr, now: Instant) {
        if self.failures.len() >= THROTTLE_ADDRESSES_MAX {
            self.failures
                .retain(|_, (start, _)| now.duration_since(*start) < THROTTLE_WINDOW);
        }
        let mut entry = self.failures.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= THROTTLE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    fn is_blocked_at(&self, ip: IpAddr, now: Instant) -> bool {
        self.blocked_for_at(ip, now).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts() -> Accounts {
        Accounts::new(&[AccountConfig {
            name: "alice".into(),
            secret_id: "AKIDalice".into(),
            secret_key: "alice-secret-key-0123".into(),
        }])
    }

    #[test]
    fn right_signature_is_accepted() {
        let nonce = [7u8; NONCE_BYTES];
        let sig = sign("alice-secret-key-0123", &nonce, "AKIDalice");
        assert_eq!(accounts().verify("AKIDalice", &nonce, &sig), Some("alice"));
    }

    #[test]
    fn wrong_key_nonce_or_id_is_refused() {
        let nonce = [7u8; NONCE_BYTES];
        let other_nonce = [8u8; NONCE_BYTES];
        let accounts = accounts();
        let wrong_key = sign("not-the-key-000000000", &nonce, "AKIDalice");
        assert_eq!(accounts.verify("AKIDalice", &nonce, &wrong_key), None);
        let replayed = sign("alice-secret-key-0123", &other_nonce, "AKIDalice");
        assert_eq!(accounts.verify("AKIDalice", &nonce, &replayed), None);
        let sig = sign("alice-secret-key-0123", &nonce, "AKIDalice");
        assert_eq!(accounts.verify("AKIDbob", &nonce, &sig), None);
    }

    #[test]
    fn an_address_is_blocked_after_too_many_failures_for_one_window() {
        let throttle = AuthThrottle::new(3);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        let t0 = crate::clock::monotonic_now();
        for _ in 0..2 {
            throttle.record_failure_at(ip, t0);
        }
        assert!(!throttle.is_blocked_at(ip, t0));
        throttle.record_failure_at(ip, t0);
        assert!(throttle.is_blocked_at(ip, t0));
        assert!(
            !throttle.is_blocked_at(other, t0),
            "other addresses are not affected"
        );
        assert_eq!(
            throttle.blocked_for_at(ip, t0 + Duration::from_secs(20)),
            Some(THROTTLE_WINDOW - Duration::from_secs(20)),
            "the block lasts until the window that counted the failures ends"
        );
        assert!(
            !throttle.is_blocked_at(ip, t0 + THROTTLE_WINDOW),
            "the block ends with the window"
        );
    }
}
