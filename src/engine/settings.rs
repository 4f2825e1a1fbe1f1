//! A queue's configurable attributes as they are in force, and the range checks that guard them.
//!
//! [`QueueSettings`] is the full, effective set: what CreateQueue fills in from defaults and what
//! SetQueueAttributes produces by merging a [`QueueAttributeSet`] into the current values. It is
//! validated as a whole after merging, because some rules tie two attributes together
//! (rewindSeconds and maxTimeToLive must stay within msgRetentionSeconds) and either side may be
//! the one that changed. Whether a dead-letter queue exists is the registry's question and is
//! checked in `engine::mod`, not here.

use crate::error::{CmqError, ErrorCode};
use crate::limits;
use crate::model::{
    DeadLetterPolicy, QueueAttributeSet, DEAD_LETTER_POLICY_RECEIVES,
    DEAD_LETTER_POLICY_TIME_TO_LIVE,
};

/// Every configurable attribute of a queue, as in force. Mutations carry it whole so a log replay
/// never has to know the defaults that were current when the queue was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// Cap on stored (active, inactive and delayed) messages.
    pub max_msg_heap_num: u64,
    /// Default long-poll wait of a receive, seconds.
    pub polling_wait_seconds: u32,
    /// How long a received message stays invisible, seconds.
    pub visibility_timeout_seconds: u32,
    /// Largest message body accepted, bytes.
    pub max_msg_size_bytes: u32,
    /// How long a message is kept after it was sent, seconds.
    pub msg_retention_seconds: u32,
    /// How long deleted messages stay rewindable, seconds (0 = rewind off).
    pub rewind_seconds: u32,
    /// Where dead letters go, if anywhere. `dead_letter_queue` holds the target's name as created.
    pub dead_letter_policy: Option<DeadLetterPolicy>,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            max_msg_heap_num: limits::HEAP_COUNT_DEFAULT,
            // cmqd decision: the default long-poll wait is 0 (CMQ's API default).
            polling_wait_seconds: 0,
            visibility_timeout_seconds: limits::VISIBILITY_SECONDS_DEFAULT,
            max_msg_size_bytes: limits::MSG_BYTES_DEFAULT,
            msg_retention_seconds: limits::RETENTION_SECONDS_DEFAULT,
            rewind_seconds: 0,
            dead_letter_policy: None,
        }
    }
}

impl QueueSettings {
    /// These settings with every field `changes` gives replaced, then validated as a whole.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::OUT_OF_RANGE`] for a value outside its range,
    /// [`ErrorCode::REWIND_OVER_RETENTION`] when rewindSeconds exceeds msgRetentionSeconds,
    /// [`ErrorCode::INVALID_PARAMETER`] for an unknown dead-letter policy,
    /// [`ErrorCode::QUEUE_NAME_FORMAT`] for a dead-letter queue name that breaks the naming
    /// rules (the empty one included).
    pub fn merged(&self, changes: &QueueAttributeSet) -> Result<Self, CmqError> {
        let mut next = self.clone();
        if let Some(v) = changes.max_msg_heap_num {
            next.max_msg_heap_num = v;
        }
        if let Some(v) = changes.polling_wait_seconds {
            next.polling_wait_seconds = v;
        }
        if let Some(v) = changes.visibility_timeout_seconds {
            next.visibility_timeout_seconds = v;
        }
        if let Some(v) = changes.max_msg_size_bytes {
            next.max_msg_size_bytes = v;
        }
        if let Some(v) = changes.msg_retention_seconds {
            next.msg_retention_seconds = v;
        }
        if let Some(v) = changes.rewind_seconds {
            next.rewind_seconds = v;
        }
        if let Some(policy) = &changes.dead_letter_policy {
            next.dead_letter_policy = policy.clone();
        }
        next.validate()?;
        Ok(next)
    }

    /// Checks every range and every rule tying two attributes together.
    ///
    /// # Errors
    ///
    /// As [`QueueSettings::merged`].
    pub fn validate(&self) -> Result<(), CmqError> {
        in_range(
            "maxMsgHeapNum",
            self.max_msg_heap_num,
            limits::HEAP_COUNT_MIN,
            limits::HEAP_COUNT_MAX,
        )?;
        in_range(
            "pollingWaitSeconds",
            self.polling_wait_seconds.into(),
            0,
            limits::POLL_WAIT_SECONDS_MAX.into(),
        )?;
        in_range(
            "visibilityTimeout",
            self.visibility_timeout_seconds.into(),
            limits::VISIBILITY_SECONDS_MIN.into(),
            limits::VISIBILITY_SECONDS_MAX.into(),
        )?;
        in_range(
            "maxMsgSize",
            self.max_msg_size_bytes.into(),
            limits::MSG_BYTES_MIN_LIMIT.into(),
            limits::MSG_BYTES_MAX_LIMIT.into(),
        )?;
        in_range(
            "msgRetentionSeconds",
            self.msg_retention_seconds.into(),
            limits::RETENTION_SECONDS_MIN.into(),
            limits::RETENTION_SECONDS_MAX.into(),
        )?;
        in_range(
            "rewindSeconds",
            self.rewind_seconds.into(),
            0,
            limits::REWIND_SECONDS_MAX.into(),
        )?;
        if self.rewind_seconds > self.msg_retention_seconds {
            return Err(CmqError::new(
                ErrorCode::REWIND_OVER_RETENTION,
                format!(
                    "rewindSeconds {} is greater than msgRetentionSeconds {}",
                    self.rewind_seconds, self.msg_retention_seconds
                ),
            ));
        }
        if let Some(policy) = &self.dead_letter_policy {
            self.validate_policy(policy)?;
        }
        Ok(())
    }

    fn validate_policy(&self, policy: &DeadLetterPolicy) -> Result<(), CmqError> {
        // A name no queue can have (the empty one included) gets the naming rule's code, as
        // in every request that names a queue.
        super::Engine::validate_queue_name(&policy.dead_letter_queue)?;
        match policy.policy {
            DEAD_LETTER_POLICY_RECEIVES => in_range(
                "maxReceiveCount",
                policy.max_receive_count.into(),
                limits::MAX_RECEIVE_COUNT_MIN.into(),
                limits::MAX_RECEIVE_COUNT_MAX.into(),
            ),
            DEAD_LETTER_POLICY_TIME_TO_LIVE => {
                in_range(
                    "maxTimeToLive",
                    policy.max_time_to_live_seconds.into(),
                    limits::TIME_TO_LIVE_SECONDS_MIN.into(),
                    limits::TIME_TO_LIVE_SECONDS_MAX.into(),
                )?;
                // A time to live at or past the retention would never fire: the message
                // expires first. CMQ rejects it; so do we.
                if policy.max_time_to_live_seconds >= self.msg_retention_seconds {
                    return Err(CmqError::new(
                        ErrorCode::OUT_OF_RANGE,
                        format!(
                            "maxTimeToLive {} must be less than msgRetentionSeconds {}",
                            policy.max_time_to_live_seconds, self.msg_retention_seconds
                        ),
                    ));
                }
                Ok(())
            }
            other => Err(CmqError::new(
                ErrorCode::INVALID_PARAMETER,
                format!("dead-letter policy {other} is not 0 or 1"),
            )),
        }
    }

    /// Visibility timeout in milliseconds.
    pub(crate) fn visibility_ms(&self) -> u64 {
        u64::from(self.visibility_timeout_seconds) * 1000
    }

    /// Retention in milliseconds.
    pub(crate) fn retention_ms(&self) -> u64 {
        u64::from(self.msg_retention_seconds) * 1000
    }

    /// Rewind window in milliseconds.
    pub(crate) fn rewind_ms(&self) -> u64 {
        u64::from(self.rewind_seconds) * 1000
    }

    /// Policy 0's receive limit, when that policy is set.
    pub(crate) fn max_receive_count(&self) -> Option<u32> {
        self.dead_letter_policy
            .as_ref()
            .filter(|p| p.policy == DEAD_LETTER_POLICY_RECEIVES)
            .map(|p| p.max_receive_count)
    }

    /// Policy 1's time to live in milliseconds, when that policy is set.
    pub(crate) fn time_to_live_ms(&self) -> Option<u64> {
        self.dead_letter_policy
            .as_ref()
            .filter(|p| p.policy == DEAD_LETTER_POLICY_TIME_TO_LIVE)
            .map(|p| u64::from(p.max_time_to_live_seconds) * 1000)
    }
}

fn in_range(name: &str, value: u64, min: u64, max: u64) -> Result<(), CmqError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(CmqError::new(
            ErrorCode::OUT_OF_RANGE,
            format!("{name} {value} is outside {min}..={max}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(result: Result<QueueSettings, CmqError>) -> ErrorCode {
        match result {
            Ok(_) => ErrorCode::OK,
            Err(e) => e.code,
        }
    }

    /// Each numeric attribute at min-1, min, max and max+1.
    #[test]
    fn every_range_edge() {
        let base = QueueSettings::default();
        type Setter = fn(&mut QueueAttributeSet, u64);
        let cases: Vec<(&str, Setter, u64, u64)> = vec![
            (
                "maxMsgHeapNum",
                |s, v| s.max_msg_heap_num = Some(v),
                limits::HEAP_COUNT_MIN,
                limits::HEAP_COUNT_MAX,
            ),
            (
                "pollingWaitSeconds",
                |s, v| s.polling_wait_seconds = Some(v as u32),
                0,
                30,
            ),
            (
                "visibilityTimeout",
                |s, v| s.visibility_timeout_seconds = Some(v as u32),
                1,
                43_200,
            ),
            (
                "maxMsgSize",
                |s, v| s.max_msg_size_bytes = Some(v as u32),
                u64::from(limits::MSG_BYTES_MIN_LIMIT),
                u64::from(limits::MSG_BYTES_MAX_LIMIT),
            ),
            (
                "msgRetentionSeconds",
                |s, v| s.msg_retention_seconds = Some(v as u32),
                60,
                1_296_000,
            ),
            (
                "rewindSeconds",
                |s, v| s.rewind_seconds = Some(v as u32),
                0,
                43_200,
            ),
        ];
        for (name, set, min, max) in cases {
            let at = |v: u64| {
                let mut changes = QueueAttributeSet::default();
                set(&mut changes, v);
                code(base.merged(&changes))
            };
            if min > 0 {
                assert_eq!(at(min - 1), ErrorCode::OUT_OF_RANGE, "{name} min-1");
            }
            assert_eq!(at(min), ErrorCode::OK, "{name} min");
            assert_eq!(at(max), ErrorCode::OK, "{name} max");
            assert_eq!(at(max + 1), ErrorCode::OUT_OF_RANGE, "{name} max+1");
        }
    }

    #[test]
    fn rewind_may_not_exceed_retention() {
        let base = QueueSettings::default();
        let changes = QueueAttributeSet {
            msg_retention_seconds: Some(600),
            rewind_seconds: Some(601),
            ..Default::default()
        };
        assert_eq!(
            code(base.merged(&changes)),
            ErrorCode::REWIND_OVER_RETENTION
        );
        let changes = QueueAttributeSet {
            msg_retention_seconds: Some(600),
            rewind_seconds: Some(600),
            ..Default::default()
        };
        assert_eq!(code(base.merged(&changes)), ErrorCode::OK);
        // Lowering the retention under an existing rewind window is the same violation.
        let with_rewind = base
            .merged(&QueueAttributeSet {
                rewind_seconds: Some(3_600),
                ..Default::default()
            })
            .unwrap();
        let lower = QueueAttributeSet {
            msg_retention_seconds: Some(3_599),
            ..Default::default()
        };
        assert_eq!(
            code(with_rewind.merged(&lower)),
            ErrorCode::REWIND_OVER_RETENTION
        );
    }

    fn policy(kind: u8, count: u32, ttl: u32) -> QueueAttributeSet {
        QueueAttributeSet {
            dead_letter_policy: Some(Some(DeadLetterPolicy {
                dead_letter_queue: "dlq".into(),
                policy: kind,
                max_receive_count: count,
                max_time_to_live_seconds: ttl,
            })),
            ..Default::default()
        }
    }

    #[test]
    fn dead_letter_policy_ranges() {
        let base = QueueSettings::default();
        assert_eq!(code(base.merged(&policy(0, 0, 0))), ErrorCode::OUT_OF_RANGE);
        assert_eq!(code(base.merged(&policy(0, 1, 0))), ErrorCode::OK);
        assert_eq!(code(base.merged(&policy(0, 1000, 0))), ErrorCode::OK);
        assert_eq!(
            code(base.merged(&policy(0, 1001, 0))),
            ErrorCode::OUT_OF_RANGE
        );
        assert_eq!(
            code(base.merged(&policy(1, 0, 299))),
            ErrorCode::OUT_OF_RANGE
        );
        assert_eq!(code(base.merged(&policy(1, 0, 300))), ErrorCode::OK);
        assert_eq!(code(base.merged(&policy(1, 0, 43_200))), ErrorCode::OK);
        assert_eq!(
            code(base.merged(&policy(1, 0, 43_201))),
            ErrorCode::OUT_OF_RANGE
        );
        assert_eq!(
            code(base.merged(&policy(2, 1, 300))),
            ErrorCode::INVALID_PARAMETER
        );
        // maxTimeToLive must stay below the retention.
        let mut short = policy(1, 0, 600);
        short.msg_retention_seconds = Some(600);
        assert_eq!(code(base.merged(&short)), ErrorCode::OUT_OF_RANGE);
        short.msg_retention_seconds = Some(601);
        assert_eq!(code(base.merged(&short)), ErrorCode::OK);
        // Some(None) removes the policy.
        let with = base.merged(&policy(0, 3, 0)).unwrap();
        let without = with
            .merged(&QueueAttributeSet {
                dead_letter_policy: Some(None),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(without.dead_letter_policy, None);
    }
}
