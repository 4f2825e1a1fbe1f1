//! Receipt handles: the token a receive hands out and a delete, visibility change or release
//! presents back.
//!
//! A handle names the message and the receive that issued it: 32 lowercase hex digits, the
//! message id then the receive sequence number, each a big-endian `u64`. The sequence comes from a
//! broker-wide counter, so every receive of every message gets a handle no other receive ever
//! had; the queue remembers only the newest sequence of each message, which is what makes older
//! handles of a redelivered message invalid (CMQ: only the most recent handle is valid).
//!
//! The handle is opaque to clients but parseable by us without any lookup table, so validating it
//! costs one map lookup in the queue and no extra memory per message.

use crate::error::{CmqError, ErrorCode};

/// Length of a handle string: two `u64` as hex.
pub const RECEIPT_HANDLE_CHARS: usize = 32;

/// A parsed receipt handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReceiptHandle {
    /// The message the handle deletes.
    pub msg_id: u64,
    /// The receive that issued it (broker-wide counter).
    pub receive_seq: u64,
}

impl ReceiptHandle {
    /// The handle for receive `receive_seq` of message `msg_id`.
    pub fn new(msg_id: u64, receive_seq: u64) -> Self {
        Self {
            msg_id,
            receive_seq,
        }
    }

    /// The handle as clients see it: 32 lowercase hex digits.
    pub fn encode(&self) -> String {
        // By hand rather than `format!`: this runs once per message received, and the
        // formatting machinery costs several times more than the 32 table lookups.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(RECEIPT_HANDLE_CHARS);
        for value in [self.msg_id, self.receive_seq] {
            for shift in (0..16).rev() {
                text.push(char::from(DIGITS[((value >> (shift * 4)) & 0xf) as usize]));
            }
        }
        text
    }

    /// Parses a handle string.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::RECEIPT_HANDLE_FORMAT`] unless the string is exactly 32 lowercase hex digits.
    pub fn parse(text: &str) -> Result<Self, CmqError> {
        let bytes = text.as_bytes();
        if bytes.len() != RECEIPT_HANDLE_CHARS {
            return Err(malformed());
        }
        let (high, low) = bytes.split_at(RECEIPT_HANDLE_CHARS / 2);
        Ok(Self {
            msg_id: parse_hex_u64(high)?,
            receive_seq: parse_hex_u64(low)?,
        })
    }
}

/// Parses 16 lowercase hex digits. Written by hand because `u64::from_str_radix` also accepts
/// uppercase digits and a leading `+`, and a handle has exactly one spelling.
fn parse_hex_u64(digits: &[u8]) -> Result<u64, CmqError> {
    let mut value: u64 = 0;
    for &digit in digits {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => return Err(malformed()),
        };
        value = (value << 4) | u64::from(nibble);
    }
    Ok(value)
}

fn malformed() -> CmqError {
    CmqError::new(
        ErrorCode::RECEIPT_HANDLE_FORMAT,
        "receipt handle is not well formed",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_extremes() {
        for (id, seq) in [(0, 0), (1, 2), (u64::MAX, u64::MAX), (0xabc, 0xdef0)] {
            let handle = ReceiptHandle::new(id, seq);
            let text = handle.encode();
            assert_eq!(text.len(), RECEIPT_HANDLE_CHARS);
            assert_eq!(ReceiptHandle::parse(&text), Ok(handle));
        }
    }

    #[test]
    fn rejects_malformed_text() {
        let good = ReceiptHandle::new(7, 9).encode();
        let upper = good.to_uppercase().replace('0', "A");
        for bad in [
            "",
            "abc",
            &good[1..],
            &format!("{good}0"),
            &upper,
            "0000000000000000000000000000000g",
            "+000000000000000000000000000000f",
            "éééééééééééééééé",
        ] {
            let err = ReceiptHandle::parse(bad).err();
            assert_eq!(
                err.map(|e| e.code),
                Some(ErrorCode::RECEIPT_HANDLE_FORMAT),
                "{bad:?}"
            );
        }
    }

    proptest! {
        // No failure persistence: it would write files outside src/engine.
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_pair_round_trips(id in any::<u64>(), seq in any::<u64>()) {
            let handle = ReceiptHandle::new(id, seq);
            prop_assert_eq!(ReceiptHandle::parse(&handle.encode()), Ok(handle));
        }

        #[test]
        fn any_string_parses_or_fails_cleanly(text in ".{0,40}") {
            if let Ok(handle) = ReceiptHandle::parse(&text) {
                prop_assert_eq!(handle.encode(), text);
            }
        }
    }
}
