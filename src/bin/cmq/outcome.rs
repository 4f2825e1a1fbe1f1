//! What a command returns: its result for people and programs, or why it failed.

use serde_json::{json, Value};

use cmqd::client::{Error as ClientError, ErrorKind};

use crate::render::failures_json;
use crate::{EXIT_ERROR, EXIT_USAGE};

/// Why a command failed.
#[derive(Debug)]
pub(crate) enum CliError {
    /// The broker or the connection failed.
    Client(ClientError),
    /// Something on this side: credentials, stdin ...
    Local(String),
    /// The command line makes no sense (exit code 2).
    Usage(String),
}

impl From<ClientError> for CliError {
    fn from(error: ClientError) -> Self {
        Self::Client(error)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Client(error) => write!(f, "{error}"),
            Self::Local(message) | Self::Usage(message) => f.write_str(message),
        }
    }
}

impl CliError {
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_USAGE,
            _ => EXIT_ERROR,
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        let error = match self {
            Self::Client(error) => {
                let kind = match error.kind() {
                    ErrorKind::Cmq => "cmq",
                    ErrorKind::Timeout => "timeout",
                    ErrorKind::Connection => "connection",
                    _ => "protocol",
                };
                let mut object = json!({
                    "kind": kind,
                    "code": error.code().map(|c| c.code),
                    "module": error.code().map(|c| c.module),
                    "message": error.message(),
                });
                if !error.batch_failures().is_empty() {
                    object["failures"] = failures_json(error.batch_failures());
                }
                object
            }
            Self::Local(message) => {
                json!({"kind": "local", "code": null, "module": null, "message": message})
            }
            Self::Usage(message) => {
                json!({"kind": "usage", "code": null, "module": null, "message": message})
            }
        };
        json!({ "error": error })
    }

    /// Extra lines for people after the one-line error.
    pub(crate) fn details(&self) -> String {
        match self {
            Self::Client(error) => error
                .batch_failures()
                .iter()
                .map(|f| {
                    format!(
                        "  {}: cmq error {}: {}\n",
                        f.receipt_handle, f.code, f.message
                    )
                })
                .collect(),
            _ => String::new(),
        }
    }
}

/// What a successful command shows: the same result for people and for programs.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) text: String,
    pub(crate) json: Value,
    pub(crate) exit: u8,
}

impl Outcome {
    pub(crate) fn new(text: impl Into<String>, json: Value) -> Self {
        Self {
            text: text.into(),
            json,
            exit: 0,
        }
    }
}
