//! The parameters of one CMQ HTTP API request: the form body (POST) or query string (GET),
//! percent-decoded, each name at most once, read with CMQ's rules for typed values and indexed
//! lists (`msgBody.n`: n from 0 or from 1, contiguous).
//!
//! Values are kept decoded and as sent: the signature is computed over exactly these strings.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;

use crate::error::{CmqError, ErrorCode};
use crate::limits;

use super::codes;

use crate::limits::http::INDEX_DIGITS_MAX;
pub use crate::limits::http::{PARAMS_MAX, PARAM_NAME_BYTES_MAX};

/// Longest value of a parameter that is not a message body (names, receipt handles, tags,
/// search words), bytes: the binary protocol's bound on the same strings.
pub const VALUE_BYTES_MAX: usize = limits::STRING_BYTES_MAX;

/// The decoded parameters, sorted by name (the order the signature needs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params {
    map: BTreeMap<String, String>,
}

impl Params {
    /// Adds the pairs of an `application/x-www-form-urlencoded` string (a query string or a
    /// form body).
    ///
    /// # Errors
    ///
    /// 4000/10420 for a value that is not UTF-8 once decoded or past [`PARAMS_MAX`] pairs,
    /// 4000/10310 for an empty or overlong name, 4000/10330 for a name given twice.
    pub fn add_encoded(&mut self, encoded: &[u8]) -> Result<(), CmqError> {
        for pair in encoded.split(|b| *b == b'&') {
            if pair.is_empty() {
                continue;
            }
            let (name, value) = match pair.iter().position(|b| *b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &pair[pair.len()..]),
            };
            let name = decode(name)?;
            let value = decode(value)?;
            self.insert(name, value)?;
        }
        Ok(())
    }

    /// Adds one decoded pair.
    ///
    /// # Errors
    ///
    /// As [`Params::add_encoded`].
    pub fn insert(&mut self, name: String, value: String) -> Result<(), CmqError> {
        if name.is_empty() || name.len() > PARAM_NAME_BYTES_MAX {
            return Err(CmqError::new(
                codes::PARAM_KEY_FORMAT,
                format!("parameter names are 1-{PARAM_NAME_BYTES_MAX} bytes"),
            ));
        }
        if self.map.len() >= PARAMS_MAX {
            return Err(CmqError::new(
                ErrorCode::MALFORMED_REQUEST,
                format!("more than {PARAMS_MAX} parameters"),
            ));
        }
        if self.map.contains_key(&name) {
            return Err(CmqError::new(
                codes::NOT_REPEATABLE,
                format!("parameter {name} is given more than once"),
            ));
        }
        self.map.insert(name, value);
        Ok(())
    }

    /// Every parameter, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The value of `name`, as sent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.map.get(name).map(String::as_str)
    }

    /// The value of `name`, which must be given.
    ///
    /// # Errors
    ///
    /// 4000/10010 when it is missing.
    pub fn required(&self, name: &str) -> Result<&str, CmqError> {
        self.get(name).ok_or_else(|| missing(name))
    }

    /// A string parameter other than a message body, at most [`VALUE_BYTES_MAX`] bytes.
    ///
    /// # Errors
    ///
    /// 4000/10350 when it is longer.
    pub fn text(&self, name: &str) -> Result<Option<String>, CmqError> {
        self.get(name).map(|value| bounded(name, value)).transpose()
    }

    /// A string parameter that must be given (queue names, receipt handles ...).
    ///
    /// # Errors
    ///
    /// 4000/10010 when missing, 4000/10350 when too long.
    pub fn required_text(&self, name: &str) -> Result<String, CmqError> {
        bounded(name, self.required(name)?)
    }

    /// A message body, which must be given; its length is the engine's to check (maxMsgSize).
    ///
    /// # Errors
    ///
    /// 4000/10010 when missing.
    pub fn body(&self, name: &str) -> Result<Bytes, CmqError> {
        Ok(Bytes::copy_from_slice(self.required(name)?.as_bytes()))
    }

    /// An unsigned integer parameter.
    ///
    /// # Errors
    ///
    /// 4000/10360 when it is not an integer, 4000/10350 when it is negative or too large for
    /// the field.
    pub fn number<T: TryFrom<u64>>(&self, name: &str) -> Result<Option<T>, CmqError> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        let parsed: u64 = match value.parse::<u64>() {
            Ok(parsed) => parsed,
            Err(_) if value.parse::<i64>().is_ok() => return Err(out_of_range(name, value)),
            Err(_) => {
                return Err(CmqError::new(
                    codes::WRONG_TYPE,
                    format!("{name} must be an integer, got {value:?}"),
                ))
            }
        };
        T::try_from(parsed)
            .map(Some)
            .map_err(|_| out_of_range(name, value))
    }

    /// An unsigned integer parameter that must be given.
    ///
    /// # Errors
    ///
    /// 4000/10010 when missing; as [`Params::number`] otherwise.
    pub fn required_number<T: TryFrom<u64>>(&self, name: &str) -> Result<T, CmqError> {
        self.number(name)?.ok_or_else(|| missing(name))
    }

    /// The values of the indexed list `name.n`, in index order; empty when none is given.
    ///
    /// CMQ's rule: the indices start at 0 or at 1 and are contiguous (`receiptHandle.1`,
    /// `receiptHandle.2` ...). Values are bounded like [`Params::text`].
    ///
    /// # Errors
    ///
    /// 4000/10310 for an index that is not a plain number, 4000/10380 for indices that do not
    /// start at 0 or 1 or have a gap, 4000/10350 for a value too long.
    pub fn list(&self, name: &str) -> Result<Vec<&str>, CmqError> {
        let values = self.indexed(name)?;
        for value in &values {
            if value.len() > VALUE_BYTES_MAX {
                return Err(out_of_range(name, value));
            }
        }
        Ok(values)
    }

    /// Like [`Params::list`] for message bodies, whose length is the engine's to check.
    ///
    /// # Errors
    ///
    /// As [`Params::list`], without the length bound.
    pub fn bodies(&self, name: &str) -> Result<Vec<&str>, CmqError> {
        self.indexed(name)
    }

    fn indexed(&self, name: &str) -> Result<Vec<&str>, CmqError> {
        let prefix = format!("{name}.");
        let mut entries: Vec<(u32, &str)> = Vec::new();
        // Keys are sorted, so every `name.*` key is in one run starting at the prefix.
        for (key, value) in self.map.range(prefix.clone()..) {
            let Some(index) = key.strip_prefix(&prefix) else {
                break;
            };
            entries.push((parse_index(key, index)?, value.as_str()));
        }
        // "msgBody.10" sorts before "msgBody.2" as text: order by number.
        entries.sort_unstable_by_key(|(index, _)| *index);
        if let Some(&(first, _)) = entries.first() {
            let contiguous = first <= 1
                && entries
                    .iter()
                    .zip(first..)
                    .all(|((index, _), expected)| *index == expected);
            if !contiguous {
                return Err(CmqError::new(
                    codes::NOT_CONSECUTIVE,
                    format!(
                        "{name} parameter is not consequent: indices start at 0 or 1 and have no gaps"
                    ),
                ));
            }
        }
        Ok(entries.into_iter().map(|(_, value)| value).collect())
    }
}

fn parse_index(key: &str, index: &str) -> Result<u32, CmqError> {
    let canonical = !index.is_empty()
        && index.len() <= INDEX_DIGITS_MAX
        && index.bytes().all(|b| b.is_ascii_digit())
        && (index == "0" || !index.starts_with('0'));
    match index.parse::<u32>() {
        Ok(n) if canonical => Ok(n),
        _ => Err(CmqError::new(
            codes::PARAM_KEY_FORMAT,
            format!("{key}: the index after the dot must be a number"),
        )),
    }
}

fn bounded(name: &str, value: &str) -> Result<String, CmqError> {
    if value.len() > VALUE_BYTES_MAX {
        return Err(out_of_range(name, value));
    }
    Ok(value.to_string())
}

fn missing(name: &str) -> CmqError {
    CmqError::new(
        ErrorCode::MISSING_PARAMETER,
        format!("lack of parameter {name}"),
    )
}

fn out_of_range(name: &str, value: &str) -> CmqError {
    let shown: String = value.chars().take(32).collect();
    CmqError::new(
        ErrorCode::OUT_OF_RANGE,
        format!("{name} is out of range: {shown:?}"),
    )
}

/// Decodes one name or value of a form: `+` is a space, `%XX` a byte; the result must be UTF-8
/// (CMQ's bodies are strings, and a lossy decode would change what was signed).
fn decode(raw: &[u8]) -> Result<String, CmqError> {
    // `+` first, so that an encoded plus (`%2B`) stays a plus.
    let spaced: Cow<'_, [u8]> = if raw.contains(&b'+') {
        Cow::Owned(
            raw.iter()
                .map(|&b| if b == b'+' { b' ' } else { b })
                .collect(),
        )
    } else {
        Cow::Borrowed(raw)
    };
    let bytes: Cow<'_, [u8]> = percent_encoding::percent_decode(&spaced).into();
    String::from_utf8(bytes.into_owned()).map_err(|_| {
        CmqError::new(
            ErrorCode::MALFORMED_REQUEST,
            "a parameter is not UTF-8 once decoded",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Params, CmqError> {
        let mut params = Params::default();
        params.add_encoded(text.as_bytes())?;
        Ok(params)
    }

    #[test]
    fn form_encoding_is_decoded() {
        let params = parse("a=1+2&b=%2B%26%3D&c=&d&e=%E4%BD%A0").unwrap();
        assert_eq!(params.get("a"), Some("1 2"));
        assert_eq!(params.get("b"), Some("+&="));
        assert_eq!(params.get("c"), Some(""));
        assert_eq!(params.get("d"), Some(""));
        assert_eq!(params.get("e"), Some("你"));
        assert_eq!(
            parse("a=%FF").unwrap_err().code,
            ErrorCode::MALFORMED_REQUEST
        );
        assert_eq!(parse("a=1&a=2").unwrap_err().code, codes::NOT_REPEATABLE);
        assert_eq!(parse("=1").unwrap_err().code, codes::PARAM_KEY_FORMAT);
    }

    #[test]
    fn too_many_parameters_are_refused() {
        let text: Vec<String> = (0..=PARAMS_MAX).map(|i| format!("p{i}=1")).collect();
        assert_eq!(
            parse(&text.join("&")).unwrap_err().code,
            ErrorCode::MALFORMED_REQUEST
        );
    }

    #[test]
    fn lists_start_at_zero_or_one_and_are_contiguous() {
        let from_one =
            parse("m.1=a&m.2=b&m.10=j&m.3=c&m.4=d&m.5=e&m.6=f&m.7=g&m.8=h&m.9=i").unwrap();
        assert_eq!(
            from_one.list("m").unwrap(),
            ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
        );
        let from_zero = parse("m.0=a&m.1=b&mm.5=x").unwrap();
        assert_eq!(from_zero.list("m").unwrap(), ["a", "b"]);
        assert!(parse("x=1").unwrap().list("m").unwrap().is_empty());
        for broken in ["m.2=a&m.3=b", "m.1=a&m.3=b", "m.0=a&m.2=b"] {
            assert_eq!(
                parse(broken).unwrap().list("m").unwrap_err().code,
                codes::NOT_CONSECUTIVE,
                "{broken}"
            );
        }
        for broken in ["m.01=a", "m.x=a", "m.=a", "m.-1=a", "m.1234567890=a"] {
            assert_eq!(
                parse(broken).unwrap().list("m").unwrap_err().code,
                codes::PARAM_KEY_FORMAT,
                "{broken}"
            );
        }
    }

    #[test]
    fn numbers_are_checked() {
        let params = parse("a=12&b=-1&c=x&d=70000&e=").unwrap();
        assert_eq!(params.number::<u32>("a").unwrap(), Some(12));
        assert_eq!(params.number::<u32>("missing").unwrap(), None);
        assert_eq!(
            params.number::<u32>("b").unwrap_err().code,
            ErrorCode::OUT_OF_RANGE
        );
        assert_eq!(
            params.number::<u32>("c").unwrap_err().code,
            codes::WRONG_TYPE
        );
        assert_eq!(
            params.number::<u32>("e").unwrap_err().code,
            codes::WRONG_TYPE
        );
        assert_eq!(
            params.number::<u16>("d").unwrap_err().code,
            ErrorCode::OUT_OF_RANGE
        );
        assert_eq!(
            params.required_number::<u32>("missing").unwrap_err().code,
            ErrorCode::MISSING_PARAMETER
        );
    }

    #[test]
    fn long_values_are_refused_except_bodies() {
        let long = "x".repeat(VALUE_BYTES_MAX + 1);
        let params = parse(&format!("q={long}&msgBody={long}&t.1={long}")).unwrap();
        assert_eq!(params.text("q").unwrap_err().code, ErrorCode::OUT_OF_RANGE);
        assert_eq!(params.body("msgBody").unwrap().len(), long.len());
        assert_eq!(params.list("t").unwrap_err().code, ErrorCode::OUT_OF_RANGE);
        assert_eq!(params.bodies("t").unwrap().len(), 1);
    }
}
