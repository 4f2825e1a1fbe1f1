//! Request signatures of the CMQ HTTP API (CMQ.md A.10, as the official SDKs compute them) and
//! replay protection.
//!
//! The string to sign is `METHOD + Host + path + "?" + k1=v1&k2=v2...`: every parameter but
//! `Signature`, sorted by name, with the raw (decoded) values and `_` in names written as `.`.
//! In a POST, parameters whose value starts with `@` are left out (the SDKs treat those as file
//! uploads). The signature is the Base64 HMAC-SHA1 (default) or HMAC-SHA256 of that string
//! with the secret key.
//!
//! A signed request could be sent again by whoever saw it, so each also carries `Timestamp`
//! (unix seconds, within a window of the broker's clock) and `Nonce`: a nonce seen before with
//! the same timestamp is refused. Nonces are remembered only for the window, and only after the
//! signature checked out, so the memory is bounded and only account holders can fill it.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasher;

use base64::Engine as _;
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use subtle::ConstantTimeEq;

use crate::error::{CmqError, ErrorCode};

use super::codes;
use super::params::Params;

pub use crate::limits::http::NONCE_BYTES_MAX;

/// The HMAC a request is signed with (`SignatureMethod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureMethod {
    /// `HmacSHA1`, the default when `SignatureMethod` is absent.
    HmacSha1,
    /// `HmacSHA256`.
    HmacSha256,
}

impl SignatureMethod {
    /// The method a request names.
    ///
    /// # Errors
    ///
    /// 4000/10110 for a method other than `HmacSHA1` and `HmacSHA256`.
    pub fn from_param(value: Option<&str>) -> Result<Self, CmqError> {
        match value {
            None | Some("HmacSHA1") => Ok(Self::HmacSha1),
            Some("HmacSHA256") => Ok(Self::HmacSha256),
            Some(other) => Err(CmqError::new(
                ErrorCode::INVALID_PARAMETER,
                format!("SignatureMethod must be HmacSHA1 or HmacSHA256, got {other:?}"),
            )),
        }
    }

    /// The parameter value naming this method.
    pub fn name(self) -> &'static str {
        match self {
            Self::HmacSha1 => "HmacSHA1",
            Self::HmacSha256 => "HmacSHA256",
        }
    }
}

/// The text a request's signature covers.
pub fn string_to_sign(method: &str, host: &str, path: &str, params: &Params) -> String {
    let mut text = String::with_capacity(256);
    text.push_str(method);
    text.push_str(host);
    text.push_str(path);
    text.push('?');
    let skip_at_values = method == "POST";
    let mut first = true;
    // Sorted by the names as sent (`_` before the replacement), as the SDKs sort them.
    for (name, value) in params.iter() {
        if name == "Signature" || (skip_at_values && value.starts_with('@')) {
            continue;
        }
        if !first {
            text.push('&');
        }
        first = false;
        text.extend(name.chars().map(|c| if c == '_' { '.' } else { c }));
        text.push('=');
        text.push_str(value);
    }
    text
}

/// The Base64 signature of `text` with `key`.
pub fn sign(key: &str, method: SignatureMethod, text: &str) -> String {
    let digest = match method {
        SignatureMethod::HmacSha1 => mac::<Hmac<sha1::Sha1>>(key, text),
        SignatureMethod::HmacSha256 => mac::<Hmac<sha2::Sha256>>(key, text),
    };
    base64::engine::general_purpose::STANDARD.encode(digest)
}

fn mac<M: Mac + hmac::digest::KeyInit>(key: &str, text: &str) -> Vec<u8> {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    match <M as hmac::digest::KeyInit>::new_from_slice(key.as_bytes()) {
        Ok(mut mac) => {
            mac.update(text.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

/// Whether `given` is the signature of `text` with `key`, compared in constant time.
pub fn verify(key: &str, method: SignatureMethod, text: &str, given: &str) -> bool {
    let expected = sign(key, method, text);
    bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

/// Nonces seen recently, per secretId, to refuse replayed requests.
#[derive(Debug)]
pub struct ReplayGuard {
    books: DashMap<String, NonceBook>,
    /// Keyed hashing of the nonces: what is kept is 8 bytes per request, and a client cannot
    /// choose nonces that collide with someone else's.
    hasher: RandomState,
    window_seconds: u64,
    per_secret_id_max: usize,
}

/// One secretId's nonces, by the request timestamp they came with.
#[derive(Debug, Default)]
struct NonceBook {
    by_second: BTreeMap<i64, HashSet<u64>>,
    count: usize,
}

impl ReplayGuard {
    /// A guard accepting timestamps within `window_seconds` of the clock, remembering at most
    /// `per_secret_id_max` nonces per secretId.
    pub fn new(window_seconds: u64, per_secret_id_max: usize) -> Self {
        Self {
            books: DashMap::new(),
            hasher: RandomState::new(),
            window_seconds,
            per_secret_id_max,
        }
    }

    /// Admits a request of `secret_id` (whose signature is already checked) with `timestamp`
    /// and `nonce` at `now_seconds`, and remembers its nonce.
    ///
    /// # Errors
    ///
    /// 4100/10030 for a timestamp outside the window or a nonce already used with this
    /// timestamp; 4420/10250 when the secretId has made more signed requests within the window
    /// than can be remembered.
    pub fn admit(
        &self,
        secret_id: &str,
        timestamp: i64,
        nonce: &str,
        now_seconds: i64,
    ) -> Result<(), CmqError> {
        if timestamp.abs_diff(now_seconds) > self.window_seconds {
            return Err(CmqError::new(
                ErrorCode::AUTH_FAILED,
                format!(
                    "Timestamp {timestamp} is more than {} s away from the broker's clock ({now_seconds})",
                    self.window_seconds
                ),
            ));
        }
        let key = self.hasher.hash_one(nonce);
        let oldest = now_seconds.saturating_sub_unsigned(self.window_seconds);
        let mut book = match self.books.get_mut(secret_id) {
            Some(book) => book,
            None => self.books.entry(secret_id.to_string()).or_default(),
        };
        book.forget_before(oldest);
        if book
            .by_second
            .get(&timestamp)
            .is_some_and(|seen| seen.contains(&key))
        {
            return Err(CmqError::new(
                ErrorCode::AUTH_FAILED,
                "Nonce already used: the request is a replay",
            ));
        }
        if book.count >= self.per_secret_id_max {
            return Err(CmqError::new(
                codes::THROTTLED,
                "qps throttling: too many requests of this secretId within the timestamp window",
            ));
        }
        book.by_second.entry(timestamp).or_default().insert(key);
        book.count += 1;
        Ok(())
    }
}

impl NonceBook {
    /// Drops the nonces of timestamps before `oldest`: such requests fail the timestamp check
    /// now, so their nonces no longer need remembering.
    fn forget_before(&mut self, oldest: i64) {
        while let Some(entry) = self.by_second.first_entry() {
            if *entry.key() >= oldest {
                break;
            }
            let seen = entry.remove();
            self.count = self.count.saturating_sub(seen.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        let mut params = Params::default();
        for (name, value) in pairs {
            params.insert((*name).into(), (*value).into()).unwrap();
        }
        params
    }

    #[test]
    fn the_string_to_sign_follows_the_sdk() {
        // The example of CMQ.md A.10.
        let p = params(&[
            ("Action", "SendMessage"),
            ("Nonce", "123"),
            ("SecretId", "AKIDx"),
            ("SignatureMethod", "HmacSHA1"),
            ("Timestamp", "1700000000"),
            ("delaySeconds", "0"),
            ("msgBody", "msg"),
            ("queueName", "test1"),
            ("Signature", "ignored"),
        ]);
        assert_eq!(
            string_to_sign(
                "POST",
                "cmq-queue-gz.api.tencentyun.com",
                "/v2/index.php",
                &p
            ),
            "POSTcmq-queue-gz.api.tencentyun.com/v2/index.php?Action=SendMessage&Nonce=123\
             &SecretId=AKIDx&SignatureMethod=HmacSHA1&Timestamp=1700000000&delaySeconds=0\
             &msgBody=msg&queueName=test1"
        );
        // `_` becomes `.` after sorting; `@` values are skipped in POST only.
        let p = params(&[("a_b", "1"), ("a.c", "2"), ("f", "@file")]);
        assert_eq!(string_to_sign("POST", "h", "/p", &p), "POSTh/p?a.c=2&a.b=1");
        assert_eq!(
            string_to_sign("GET", "h", "/p", &p),
            "GETh/p?a.c=2&a.b=1&f=@file"
        );
    }

    #[test]
    fn signatures_match_known_values() {
        // Python: base64(hmac.new(b"key", b"text", sha1/sha256).digest())
        assert_eq!(
            sign("key", SignatureMethod::HmacSha1, "text"),
            "Np4pWetJRQM4shJ0j3fY3tdIR7s="
        );
        assert_eq!(
            sign("key", SignatureMethod::HmacSha256, "text"),
            "avqQRqlXnK0UOjhMG1ZLmiUNJ9b2pj+fIL86dZTJ4sY="
        );
        assert!(verify(
            "key",
            SignatureMethod::HmacSha1,
            "text",
            "Np4pWetJRQM4shJ0j3fY3tdIR7s="
        ));
        assert!(!verify("key", SignatureMethod::HmacSha1, "text", "x"));
        assert!(!verify(
            "other",
            SignatureMethod::HmacSha1,
            "text",
            "Np4pWetJRQM4shJ0j3fY3tdIR7s="
        ));
        assert_eq!(
            SignatureMethod::from_param(None).unwrap(),
            SignatureMethod::HmacSha1
        );
        assert!(SignatureMethod::from_param(Some("HmacMD5")).is_err());
    }

    #[test]
    fn replays_and_stale_timestamps_are_refused() {
        let guard = ReplayGuard::new(300, 1000);
        let now = 1_700_000_000;
        guard.admit("AKIDa", now, "1", now).unwrap();
        assert_eq!(
            guard.admit("AKIDa", now, "1", now + 10).unwrap_err().code,
            ErrorCode::AUTH_FAILED
        );
        // Another secretId, timestamp or nonce is another request.
        guard.admit("AKIDb", now, "1", now).unwrap();
        guard.admit("AKIDa", now + 1, "1", now).unwrap();
        guard.admit("AKIDa", now, "2", now).unwrap();
        for stale in [now - 301, now + 301] {
            assert_eq!(
                guard.admit("AKIDa", stale, "9", now).unwrap_err().code,
                ErrorCode::AUTH_FAILED
            );
        }
    }

    #[test]
    fn nonces_are_bounded_and_age_out() {
        let guard = ReplayGuard::new(10, 3);
        let now = 1_000;
        for nonce in ["a", "b", "c"] {
            guard.admit("AKIDa", now, nonce, now).unwrap();
        }
        assert_eq!(
            guard.admit("AKIDa", now, "d", now).unwrap_err().code,
            codes::THROTTLED
        );
        // Eleven seconds later the first three are out of the window and forgotten.
        guard.admit("AKIDa", now + 11, "d", now + 11).unwrap();
        assert_eq!(guard.books.get("AKIDa").map(|b| b.count), Some(1));
    }
}
