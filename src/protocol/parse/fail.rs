//! Errors inside the parsers: where a parser stopped and why, and how that becomes a
//! [`DecodeError`].

use std::fmt;

use nom::error::{ErrorKind, ParseError};
use nom::IResult;

use crate::limits::STRING_BYTES_MAX;
use crate::protocol::layout::tag;

use super::DecodeError;

pub(super) type Input<'a> = &'a [u8];
pub(super) type PResult<'a, T> = IResult<Input<'a>, T, Fail<'a>>;

/// A parser failure: where (`input` is always a suffix of the body, so its length gives the
/// offset) and why.
#[derive(Debug)]
pub(super) struct Fail<'a> {
    pub(super) input: Input<'a>,
    pub(super) why: Why,
}

/// What went wrong, kept as data until an error leaves this module, so that failing costs no
/// allocation inside the parsers.
#[derive(Debug)]
pub(super) enum Why {
    /// nom's own error. Every primitive here maps its end-of-input error to [`Why::Eof`], so
    /// `ErrorKind::Eof` can only come from `all_consuming`: bytes left after the last field.
    Nom(ErrorKind),
    Eof {
        needed: usize,
    },
    StringTooLong {
        length: usize,
    },
    InvalidUtf8,
    BadOption(u8),
    TooMany {
        count: usize,
        max: usize,
    },
    EmptyList,
    TooManyAttributes(u8),
    UnknownTag(u8),
    DuplicateTag(u8),
    TagOrder {
        tag: u8,
        previous: u8,
    },
    BadEnum {
        field: &'static str,
        value: u8,
    },
    SuccessModule(u16),
    ZeroCode,
}

impl<'a> ParseError<Input<'a>> for Fail<'a> {
    fn from_error_kind(input: Input<'a>, kind: ErrorKind) -> Self {
        Fail {
            input,
            why: Why::Nom(kind),
        }
    }

    /// Keeps the innermost error: it is the most precise about offset and cause.
    fn append(_: Input<'a>, _: ErrorKind, other: Self) -> Self {
        other
    }
}

pub(super) struct Reason<'a>(&'a Why, usize);

impl fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Reason(why, left) = *self;
        match why {
            Why::Nom(ErrorKind::Eof) => {
                let unit = if left == 1 { "byte" } else { "bytes" };
                write!(f, "{left} {unit} after the last field")
            }
            Why::Nom(kind) => write!(f, "parser error {kind:?}"),
            Why::Eof { needed } => write!(f, "body ends early: {needed} bytes needed, {left} left"),
            Why::StringTooLong { length } => write!(
                f,
                "string of {length} bytes, longer than the {STRING_BYTES_MAX} allowed"
            ),
            Why::InvalidUtf8 => f.write_str("string is not valid UTF-8"),
            Why::BadOption(value) => write!(f, "option marker {value}, expected 0 or 1"),
            Why::TooMany { count, max } => write!(f, "{count} entries, at most {max} allowed"),
            Why::EmptyList => f.write_str("list must not be empty"),
            Why::TooManyAttributes(count) => {
                write!(f, "{count} queue attributes, at most {} allowed", tag::LAST)
            }
            Why::UnknownTag(value) => write!(f, "unknown queue attribute tag {value}"),
            Why::DuplicateTag(value) => write!(f, "queue attribute tag {value} given twice"),
            Why::TagOrder { tag, previous } => write!(
                f,
                "queue attribute tag {tag} after tag {previous}: tags must increase"
            ),
            Why::BadEnum { field, value } => write!(f, "invalid {field} {value}"),
            Why::SuccessModule(module) => {
                write!(f, "status code 0 with module code {module}, expected 0")
            }
            Why::ZeroCode => f.write_str("error code 0 where an error is required"),
        }
    }
}

pub(super) fn fail<'a, T>(input: Input<'a>, why: Why) -> PResult<'a, T> {
    Err(nom::Err::Error(Fail { input, why }))
}

pub(super) fn decode_error(opcode: u16, body: &[u8], err: nom::Err<Fail<'_>>) -> DecodeError {
    match err {
        nom::Err::Error(fault) | nom::Err::Failure(fault) => {
            let left = fault.input.len();
            let offset = body.len().saturating_sub(left);
            match fault.why {
                Why::TooMany { count, max } => DecodeError::TooMany {
                    opcode,
                    offset,
                    count,
                    max,
                },
                why => DecodeError::Malformed {
                    opcode,
                    offset,
                    reason: Reason(&why, left).to_string(),
                },
            }
        }
        // `complete` parsers never ask for more input; kept total rather than trusted.
        nom::Err::Incomplete(_) => DecodeError::Malformed {
            opcode,
            offset: body.len(),
            reason: "body ends early".to_owned(),
        },
    }
}
