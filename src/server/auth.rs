//! Accounts and the handshake's authentication check.
//!
//! The client proves it holds the secret key by sending
//! `HMAC-SHA256(secret_key, AUTH_CONTEXT || nonce || secret_id)` over a nonce the server chose
//! for this connection, so the key never crosses the wire and a recorded handshake is useless on
//! another connection. Signatures are compared in constant time.

use std::collections::HashMap;

use subtle::ConstantTimeEq;

use crate::config::AccountConfig;
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
}
