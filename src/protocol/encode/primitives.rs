//! Primitives (`spec/README.md`, "Primitive types").

use bytes::{BufMut, Bytes, BytesMut};

use crate::limits::STRING_BYTES_MAX;
use crate::protocol::layout::{OPTION_NONE, OPTION_SOME};

use super::EncodeError;

/// `string`: u16 byte length then UTF-8; over `STRING_BYTES_MAX` is an error.
pub(super) fn put_string(
    dst: &mut BytesMut,
    field: &'static str,
    value: &str,
) -> Result<(), EncodeError> {
    let too_long = EncodeError::StringTooLong {
        field,
        length: value.len(),
        max: STRING_BYTES_MAX,
    };
    if value.len() > STRING_BYTES_MAX {
        return Err(too_long);
    }
    let Ok(length) = u16::try_from(value.len()) else {
        return Err(too_long);
    };
    dst.put_u16(length);
    dst.put_slice(value.as_bytes());
    Ok(())
}

/// A `string` for people: cut at the last character boundary within `STRING_BYTES_MAX`.
pub(super) fn put_text(dst: &mut BytesMut, value: &str) {
    let mut end = value.len().min(STRING_BYTES_MAX);
    while !value.is_char_boundary(end) {
        // Terminates: offset 0 is always a boundary.
        end -= 1;
    }
    let text = value.get(..end).unwrap_or_default();
    // `end` <= STRING_BYTES_MAX <= u16::MAX (asserted above), so the conversion cannot fail.
    dst.put_u16(u16::try_from(text.len()).unwrap_or(0));
    dst.put_slice(text.as_bytes());
}

/// `bytes`: u32 length then the raw bytes.
pub(super) fn put_bytes(dst: &mut BytesMut, value: &Bytes) -> Result<(), EncodeError> {
    let Ok(length) = u32::try_from(value.len()) else {
        return Err(EncodeError::BodyTooLong {
            length: value.len(),
        });
    };
    dst.put_u32(length);
    dst.put_slice(value);
    Ok(())
}

/// `list<T>`: u16 count then the items; more than `max` is an error.
pub(super) fn put_list<T>(
    dst: &mut BytesMut,
    field: &'static str,
    items: &[T],
    max: usize,
    mut item: impl FnMut(&T, &mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let too_many = EncodeError::TooMany {
        field,
        count: items.len(),
        max,
    };
    if items.len() > max {
        return Err(too_many);
    }
    let Ok(count) = u16::try_from(items.len()) else {
        return Err(too_many);
    };
    dst.put_u16(count);
    items.iter().try_for_each(|value| item(value, dst))
}

/// `option<T>`: u8 0, or u8 1 then `T`.
pub(super) fn put_option<T>(
    dst: &mut BytesMut,
    value: Option<&T>,
    some: impl FnOnce(&T, &mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    match value {
        None => {
            dst.put_u8(OPTION_NONE);
            Ok(())
        }
        Some(value) => {
            dst.put_u8(OPTION_SOME);
            some(value, dst)
        }
    }
}
