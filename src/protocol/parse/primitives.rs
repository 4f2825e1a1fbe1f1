//! Primitives (`spec/README.md`, "Primitive types").

use bytes::Bytes;

use crate::limits::STRING_BYTES_MAX;
use crate::protocol::layout::{OPTION_NONE, OPTION_SOME};

use super::fail::{fail, Fail, Input, PResult, Why};

/// Gives nom's end-of-input error the number of bytes the field needed.
pub(super) fn short(err: nom::Err<Fail<'_>>, needed: usize) -> nom::Err<Fail<'_>> {
    err.map(|fault| Fail {
        input: fault.input,
        why: Why::Eof { needed },
    })
}

pub(super) fn be_u8(input: Input<'_>) -> PResult<'_, u8> {
    nom::number::complete::be_u8(input).map_err(|err| short(err, 1))
}

pub(super) fn be_u16(input: Input<'_>) -> PResult<'_, u16> {
    nom::number::complete::be_u16(input).map_err(|err| short(err, 2))
}

pub(super) fn be_u32(input: Input<'_>) -> PResult<'_, u32> {
    nom::number::complete::be_u32(input).map_err(|err| short(err, 4))
}

pub(super) fn be_u64(input: Input<'_>) -> PResult<'_, u64> {
    nom::number::complete::be_u64(input).map_err(|err| short(err, 8))
}

pub(super) fn take(input: Input<'_>, count: usize) -> PResult<'_, Input<'_>> {
    nom::bytes::complete::take(count)(input).map_err(|err| short(err, count))
}

/// A fixed-size raw field (nonce, signature).
pub(super) fn array<const N: usize>(input: Input<'_>) -> PResult<'_, [u8; N]> {
    let (rest, raw) = take(input, N)?;
    match <[u8; N]>::try_from(raw) {
        Ok(array) => Ok((rest, array)),
        Err(_) => fail(input, Why::Eof { needed: N }),
    }
}

/// `string`: u16 byte length, at most `STRING_BYTES_MAX`, then UTF-8.
pub(super) fn string(input: Input<'_>) -> PResult<'_, String> {
    let (text, length) = be_u16(input)?;
    let length = usize::from(length);
    if length > STRING_BYTES_MAX {
        return fail(input, Why::StringTooLong { length });
    }
    let (rest, raw) = take(text, length)?;
    match std::str::from_utf8(raw) {
        Ok(valid) => Ok((rest, valid.to_owned())),
        // Point at the first bad byte; `text` runs to the end of the body, so the offset holds.
        Err(err) => fail(
            text.get(err.valid_up_to()..).unwrap_or(text),
            Why::InvalidUtf8,
        ),
    }
}

/// `bytes`: u32 length, then raw bytes, returned as a slice of the frame's buffer. No limit of
/// its own: the frame size bounds it, and the queue's maxMsgSize is the engine's to enforce
/// (with its own error code, 4400/10230).
pub(super) fn bytes_field<'a>(whole: &Bytes, input: Input<'a>) -> PResult<'a, Bytes> {
    let (raw, length) = be_u32(input)?;
    let Ok(length) = usize::try_from(length) else {
        return fail(raw, Why::Eof { needed: usize::MAX });
    };
    let (rest, field) = take(raw, length)?;
    Ok((rest, share(whole, field)))
}

/// The part of `whole` that `part` covers, without copying. `part` always comes from `whole`;
/// should that ever not hold, a copy is returned rather than a panic.
pub(super) fn share(whole: &Bytes, part: &[u8]) -> Bytes {
    let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if start <= whole.len() && end <= whole.len() => whole.slice(start..end),
        _ => Bytes::copy_from_slice(part),
    }
}

/// `option<T>`: u8 marker 0 (absent) or 1 (present, `T` follows).
pub(super) fn option<'a, T>(
    input: Input<'a>,
    mut some: impl FnMut(Input<'a>) -> PResult<'a, T>,
) -> PResult<'a, Option<T>> {
    let (rest, marker) = be_u8(input)?;
    match marker {
        OPTION_NONE => Ok((rest, None)),
        OPTION_SOME => {
            let (rest, value) = some(rest)?;
            Ok((rest, Some(value)))
        }
        other => fail(input, Why::BadOption(other)),
    }
}

/// `list<T>`: u16 count, then the items. The count is checked against `max`, and against the
/// bytes left at `min_item_bytes` per item, before the vector is allocated: a hostile count
/// cannot make us reserve more than the frame could describe.
pub(super) fn list<'a, T>(
    input: Input<'a>,
    max: usize,
    min_item_bytes: usize,
    mut item: impl FnMut(Input<'a>) -> PResult<'a, T>,
) -> PResult<'a, Vec<T>> {
    let (mut rest, count) = be_u16(input)?;
    let count = usize::from(count);
    if count > max {
        return fail(input, Why::TooMany { count, max });
    }
    let needed = count.saturating_mul(min_item_bytes);
    if needed > rest.len() {
        return fail(rest, Why::Eof { needed });
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let (next, value) = item(rest)?;
        items.push(value);
        rest = next;
    }
    Ok((rest, items))
}

/// `bool`: u8 0 (false) or 1 (true); any other value is malformed.
pub(super) fn boolean(input: Input<'_>) -> PResult<'_, bool> {
    let (rest, value) = be_u8(input)?;
    match value {
        0 => Ok((rest, false)),
        1 => Ok((rest, true)),
        other => fail(
            input,
            Why::BadEnum {
                field: "bool",
                value: other,
            },
        ),
    }
}

/// Smallest encodings, for [`list`]'s pre-allocation check.
pub(super) const MIN_STRING_BYTES: usize = 2;
pub(super) const MIN_BYTES_BYTES: usize = 4;
pub(super) const MIN_SUMMARY_BYTES: usize = 8 + MIN_STRING_BYTES;
pub(super) const MIN_FAILURE_BYTES: usize = MIN_STRING_BYTES + 4 + MIN_STRING_BYTES;
pub(super) const MIN_RECEIVED_BYTES: usize =
    8 + MIN_STRING_BYTES + MIN_BYTES_BYTES + 8 + 8 + 8 + 4 + 1;
pub(super) const MIN_PEEKED_BYTES: usize = 8 + MIN_BYTES_BYTES + 8 + 4 + 1 + 8 + 1;
pub(super) const MIN_SUBSCRIPTION_SUMMARY_BYTES: usize = 8 + 3 * MIN_STRING_BYTES;
pub(super) const MIN_CLUSTER_NODE_BYTES: usize = 8 + 3 * MIN_STRING_BYTES;
pub(super) const MIN_REPLICATION_BYTES: usize = 8 + 1;
pub(super) const MIN_GROUP_STATUS_BYTES: usize = 4 + 1 + 8 + MIN_STRING_BYTES + 8 * 4 + 1 + 2;
