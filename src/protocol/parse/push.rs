//! Push bodies (`spec/commands.md`, "Streaming consume").

use bytes::Bytes;

use crate::error::ErrorCode;
use crate::limits::DELIVERY_MESSAGES_MAX;
use crate::protocol::{Push, PushOpcode};

use super::fail::{fail, Input, PResult, Why};
use super::primitives::{be_u16, list, string, MIN_RECEIVED_BYTES};
use super::reply::received_message;

/// Push bodies (`spec/commands.md`, "Streaming consume").
pub(super) fn push_body<'a>(
    opcode: PushOpcode,
    whole: &Bytes,
    input: Input<'a>,
) -> PResult<'a, Push> {
    match opcode {
        PushOpcode::Delivery => {
            let (rest, messages) = list(input, DELIVERY_MESSAGES_MAX, MIN_RECEIVED_BYTES, |i| {
                received_message(whole, i)
            })?;
            // A delivery of nothing is never sent: the broker waits instead.
            if messages.is_empty() {
                return fail(input, Why::EmptyList);
            }
            Ok((rest, Push::Delivery(messages)))
        }
        PushOpcode::ConsumerEnded => {
            let (after_code, code) = be_u16(input)?;
            if code == 0 {
                return fail(input, Why::ZeroCode);
            }
            let (input, module) = be_u16(after_code)?;
            let (input, message) = string(input)?;
            let push = Push::ConsumerEnded {
                code: ErrorCode { code, module },
                message,
            };
            Ok((input, push))
        }
    }
}
