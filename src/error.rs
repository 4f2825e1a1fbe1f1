//! CMQ error codes, shared by the engine, the wire protocol and the client.
//!
//! A CMQ error is a pair: the public `code` (4000, 4440, 7000 ...) that clients branch on, and a
//! finer `module` code that says which rule failed (10110, 10100 ...). Both go on the wire and are
//! stable: a code is never reused for another meaning, and retired codes stay listed in
//! `spec/errors.md`. The table follows `CMQ.md` A.11.

use std::fmt;

/// A CMQ (code, module code) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode {
    /// Public code: 0 success, 4xxx client errors, 6xxx server/batch conditions, 7000 no message.
    pub code: u16,
    /// Module code naming the rule that failed (0 when none applies).
    pub module: u16,
}

macro_rules! codes {
    ($( $(#[$doc:meta])* $name:ident = ($code:expr, $module:expr); )*) => {
        impl ErrorCode {
            $( $(#[$doc])* pub const $name: ErrorCode = ErrorCode { code: $code, module: $module }; )*

            /// Every code this broker can return, for the spec and its tests.
            pub const ALL: &'static [(&'static str, ErrorCode)] = &[ $( (stringify!($name), ErrorCode::$name), )* ];
        }
    };
}

codes! {
    /// Success.
    OK = (0, 0);
    /// A parameter is invalid.
    INVALID_PARAMETER = (4000, 10110);
    /// A required parameter is missing.
    MISSING_PARAMETER = (4000, 10010);
    /// The action (opcode) does not exist.
    UNKNOWN_ACTION = (4000, 10280);
    /// A value or length is out of its range.
    OUT_OF_RANGE = (4000, 10350);
    /// A batch has too many or too few entries.
    BATCH_SIZE = (4000, 10370);
    /// The request could not be parsed, or is too large.
    MALFORMED_REQUEST = (4000, 10420);
    /// A queue name does not follow the naming rules.
    QUEUE_NAME_FORMAT = (4000, 10020);
    /// A message body is empty.
    EMPTY_BODY = (4000, 10120);
    /// A receipt handle is not a well-formed handle.
    RECEIPT_HANDLE_FORMAT = (4000, 10470);
    /// Delay out of range.
    DELAY_OUT_OF_RANGE = (4000, 10692);
    /// rewindSeconds is greater than msgRetentionSeconds.
    REWIND_OVER_RETENTION = (4000, 10700);
    /// Authentication failed.
    AUTH_FAILED = (4100, 10030);
    /// The secretId does not exist.
    SECRET_ID_UNKNOWN = (4100, 10270);
    /// A message is larger than the queue's maxMsgSize.
    MESSAGE_TOO_LARGE = (4400, 10230);
    /// The queue holds maxMsgHeapNum messages already.
    QUEUE_FULL = (4410, 10240);
    /// The receipt handle is not (or no longer) valid.
    RECEIPT_HANDLE_INVALID = (4430, 10260);
    /// The queue does not exist.
    QUEUE_NOT_FOUND = (4440, 10100);
    /// The account has as many queues as it may.
    TOO_MANY_QUEUES = (4450, 10220);
    /// A queue (or topic) with that name, compared case-insensitively, exists.
    ALREADY_EXISTS = (4460, 10550);
    /// The messages of a batch sum to more than allowed.
    BATCH_TOO_LARGE = (4470, 10300);
    /// Internal failure.
    INTERNAL = (6000, 10050);
    /// The broker's memory limit for message bodies is reached.
    MEMORY_FULL = (6000, 10090);
    /// The log's disk budget is reached (storage.disk_bytes_max, or less free space than
    /// storage.disk_free_min_bytes): sends and publishes are refused until space is freed.
    DISK_FULL = (6000, 10095);
    /// A batch delete partly failed.
    BATCH_DELETE_PARTIAL = (6010, 10150);
    /// A batch delete wholly failed.
    BATCH_DELETE_FAILED = (6020, 10290);
    /// The queue cannot be rewound (rewind off, or the time is outside the window).
    REWIND_REFUSED = (6050, 10670);
    /// The broker is shutting down or overloaded; try again.
    UNAVAILABLE = (6000, 10130);
    /// This node does not lead the group that owns the request (a cluster): ask the leader.
    NOT_LEADER = (6100, 10800);
    /// A topic name does not follow the naming rules.
    TOPIC_NAME_FORMAT = (4000, 10580);
    /// A subscription name does not follow the naming rules.
    SUBSCRIPTION_NAME_FORMAT = (4000, 10620);
    /// More filterTag than a subscription may have.
    TOO_MANY_FILTER_TAGS = (4000, 10490);
    /// More bindingKey than a subscription may have.
    TOO_MANY_BINDING_KEYS = (4000, 10680);
    /// A bindingKey or routingKey has more `.` than allowed (15).
    TOO_MANY_DELIMITERS = (4000, 10691);
    /// A subscription to a filterType 2 topic without a bindingKey.
    BINDING_KEY_MISSING = (4000, 10710);
    /// More msgTag than a message may have.
    TOO_MANY_MSG_TAGS = (4000, 10720);
    /// An HTTP endpoint that is not an `http://` URL with a valid host, or is too long.
    ENDPOINT_FORMAT = (4000, 10500);
    /// A protocol other than `http` and `queue`.
    UNKNOWN_PROTOCOL = (4000, 10510);
    /// A notifyStrategy other than BACKOFF_RETRY and EXPONENTIAL_DECAY_RETRY.
    UNKNOWN_NOTIFY_STRATEGY = (4000, 10520);
    /// A notifyContentFormat other than JSON and SIMPLIFIED.
    UNKNOWN_CONTENT_FORMAT = (4000, 10530);
    /// A queue endpoint that is not a valid queue name.
    ILLEGAL_ENDPOINT = (4000, 10630);
    /// A queue endpoint with a notifyContentFormat other than SIMPLIFIED.
    QUEUE_ENDPOINT_NEEDS_SIMPLIFIED = (4000, 10640);
    /// DeleteTopic while the topic still has subscriptions.
    TOPIC_HAS_SUBSCRIPTIONS = (4000, 10540);
    /// The topic does not exist.
    TOPIC_NOT_FOUND = (4440, 10600);
    /// The subscription does not exist (cmqd: CMQ's public table has no pair for it).
    SUBSCRIPTION_NOT_FOUND = (4440, 10750);
    /// The account has as many topics as it may.
    TOO_MANY_TOPICS = (4450, 10610);
    /// A subscription of that name exists on the topic.
    SUBSCRIPTION_EXISTS = (4490, 10470);
    /// The topic has as many subscriptions as it may.
    TOO_MANY_SUBSCRIPTIONS = (4500, 10480);
    /// An endpoint URL contains whitespace.
    URL_WHITESPACE = (4510, 10570);
    /// Publish to a topic that has no subscription.
    TOPIC_NO_SUBSCRIPTION = (6030, 10650);
    /// No message to receive (empty receive after the long-poll wait).
    NO_MESSAGE = (7000, 10200);
    /// No consumer with that id runs on this connection (cmqd: streaming consume).
    CONSUMER_NOT_FOUND = (4440, 10760);
    /// The connection runs as many consumers as it may (cmqd: streaming consume).
    TOO_MANY_CONSUMERS = (4450, 10770);
    /// A consumer with that id (the request id of its Consume) already runs on this connection.
    CONSUMER_ID_IN_USE = (4460, 10780);
    /// The source address failed to authenticate too often; its new connections are refused
    /// until the throttle window ends (cmqd: the binary protocol's handshake throttle).
    AUTH_THROTTLED = (4420, 10790);
}

impl ErrorCode {
    /// Whether this is success.
    pub fn is_ok(self) -> bool {
        self.code == 0
    }
}

/// The status of a batch delete of `total` receipt handles of which `failed` (at least one)
/// failed: 6020 when every one did, else 6010 (the others were deleted), with its message. The
/// one rule for the broker's reply and the client's merged answer over several requests.
pub fn batch_delete_status(failed: usize, total: usize) -> (ErrorCode, &'static str) {
    if failed >= total {
        (
            ErrorCode::BATCH_DELETE_FAILED,
            "every receipt handle failed",
        )
    } else {
        (
            ErrorCode::BATCH_DELETE_PARTIAL,
            "some receipt handles failed",
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.code, self.module)
    }
}

/// A CMQ error: codes and a message for people. The message may change between versions; the
/// codes do not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cmq error {code}: {message}")]
pub struct CmqError {
    /// The (code, module) pair clients branch on.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl CmqError {
    /// An error with the given codes and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn module_codes_are_unique_per_public_code() {
        let mut seen = HashSet::new();
        for (name, code) in ErrorCode::ALL {
            assert!(seen.insert(*code), "{name} reuses {code}");
        }
    }

    #[test]
    fn a_batch_delete_is_6020_only_when_every_handle_failed() {
        assert_eq!(
            batch_delete_status(16, 16),
            (
                ErrorCode::BATCH_DELETE_FAILED,
                "every receipt handle failed"
            )
        );
        assert_eq!(
            batch_delete_status(1, 16),
            (
                ErrorCode::BATCH_DELETE_PARTIAL,
                "some receipt handles failed"
            )
        );
        assert_eq!(
            batch_delete_status(15, 16).0,
            ErrorCode::BATCH_DELETE_PARTIAL
        );
    }
}
