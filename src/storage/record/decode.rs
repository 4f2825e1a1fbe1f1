//! Decoding: framed bytes back into records, every field validated, names shared across
//! the records of a recovery.

use super::*;

/// Shares one allocation per account and queue name across the records of a recovery (a
/// million message records name the same queue a million times).
#[derive(Debug, Default)]
pub struct Names {
    pub(super) names: HashMap<String, Arc<str>>,
    /// The last names seen: records come in runs naming the same account and queue, and
    /// comparing a short string is cheaper than hashing it.
    pub(super) recent: [Option<Arc<str>>; 4],
    pub(super) next: usize,
}

/// Distinct names kept; past it the table starts over (it is only a cache).
pub(super) const NAMES_MAX: usize = 100_000;

impl Names {
    /// One of the last names seen, if `bytes` are one.
    pub(super) fn recent(&self, bytes: &[u8]) -> Option<Arc<str>> {
        self.recent
            .iter()
            .flatten()
            .find(|name| name.as_bytes() == bytes)
            .map(Arc::clone)
    }

    pub(super) fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(name) = self.recent(s.as_bytes()) {
            return name;
        }
        let name = match self.names.get(s) {
            Some(name) => Arc::clone(name),
            None => {
                if self.names.len() >= NAMES_MAX {
                    self.names.clear();
                }
                let name: Arc<str> = Arc::from(s);
                self.names.insert(s.to_owned(), Arc::clone(&name));
                name
            }
        };
        self.recent[self.next] = Some(Arc::clone(&name));
        self.next = (self.next + 1) % self.recent.len();
        name
    }
}

/// A cursor over one payload; every read checks the length first.
pub(super) struct Reader<'a> {
    pub(super) buf: &'a [u8],
    pub(super) at: usize,
    pub(super) record: RecordType,
    pub(super) bodies: Bodies,
}

/// What [`decode_with`] does with the bodies it meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bodies {
    /// Copies each out of the buffer (a slice would keep the whole buffer in memory).
    Copy,
    /// Checks its length and leaves it out (the decoded body is empty): for a first pass that
    /// only needs to know where each body is, and reads the ones it keeps later
    /// ([`body_in`]).
    Skip,
}

impl<'a> Reader<'a> {
    pub(super) fn malformed(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError::Malformed {
            record: self.record,
            reason: reason.into(),
        }
    }

    pub(super) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| {
                self.malformed(format!(
                    "{what} needs {n} bytes at offset {}, {} left",
                    self.at,
                    self.buf.len() - self.at
                ))
            })?;
        let bytes = &self.buf[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    pub(super) fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub(super) fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let mut word = [0u8; 4];
        word.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(word))
    }

    pub(super) fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let mut word = [0u8; 8];
        word.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(word))
    }

    pub(super) fn bool(&mut self, what: &str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.malformed(format!("{what} is {other}, not 0 or 1"))),
        }
    }

    pub(super) fn str(&mut self, what: &str) -> Result<&'a str, DecodeError> {
        let mut word = [0u8; 2];
        word.copy_from_slice(self.take(2, what)?);
        let len = usize::from(u16::from_le_bytes(word));
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| self.malformed(format!("{what} is not UTF-8")))
    }

    /// Skips a string (its length checked, its contents not).
    pub(super) fn skip_str(&mut self, what: &str) -> Result<(), DecodeError> {
        let mut word = [0u8; 2];
        word.copy_from_slice(self.take(2, what)?);
        self.take(usize::from(u16::from_le_bytes(word)), what)?;
        Ok(())
    }

    pub(super) fn name(&mut self, what: &str, names: &mut Names) -> Result<Arc<str>, DecodeError> {
        let mut word = [0u8; 2];
        word.copy_from_slice(self.take(2, what)?);
        let bytes = self.take(usize::from(u16::from_le_bytes(word)), what)?;
        // A name seen just before is valid UTF-8 already: skip the check.
        if let Some(name) = names.recent(bytes) {
            return Ok(name);
        }
        let s = std::str::from_utf8(bytes)
            .map_err(|_| self.malformed(format!("{what} is not UTF-8")))?;
        Ok(names.intern(s))
    }

    /// A body, copied out (a slice of the read buffer would keep the whole segment in memory),
    /// or left out under [`Bodies::Skip`].
    pub(super) fn body(&mut self) -> Result<Bytes, DecodeError> {
        let body = self.body_slice()?;
        Ok(match self.bodies {
            Bodies::Copy => Bytes::copy_from_slice(body),
            Bodies::Skip => Bytes::new(),
        })
    }

    pub(super) fn body_slice(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32("body length")? as usize;
        self.take(len, "body")
    }

    pub(super) fn reason(&mut self) -> Result<DeadLetterReason, DecodeError> {
        let value = self.u8("dead-letter reason")?;
        DeadLetterReason::from_u8(value)
            .ok_or_else(|| self.malformed(format!("dead-letter reason {value} is unknown")))
    }

    pub(super) fn settings(&mut self) -> Result<QueueSettings, DecodeError> {
        let max_msg_heap_num = self.u64("maxMsgHeapNum")?;
        let polling_wait_seconds = self.u32("pollingWaitSeconds")?;
        let visibility_timeout_seconds = self.u32("visibilityTimeout")?;
        let max_msg_size_bytes = self.u32("maxMsgSize")?;
        let msg_retention_seconds = self.u32("msgRetentionSeconds")?;
        let rewind_seconds = self.u32("rewindSeconds")?;
        let dead_letter_policy = if self.bool("dead-letter policy flag")? {
            Some(DeadLetterPolicy {
                dead_letter_queue: self.str("dead-letter queue name")?.to_owned(),
                policy: self.u8("policy")?,
                max_receive_count: self.u32("maxReceiveCount")?,
                max_time_to_live_seconds: self.u32("maxTimeToLive")?,
            })
        } else {
            None
        };
        let settings = QueueSettings {
            max_msg_heap_num,
            polling_wait_seconds,
            visibility_timeout_seconds,
            max_msg_size_bytes,
            msg_retention_seconds,
            rewind_seconds,
            dead_letter_policy,
        };
        // The engine only ever logs settings it validated: anything else is damage.
        settings
            .validate()
            .map_err(|e| self.malformed(format!("invalid queue settings: {}", e.message)))?;
        Ok(settings)
    }

    pub(super) fn queue_image(&mut self, names: &mut Names) -> Result<QueueImage, DecodeError> {
        Ok(QueueImage {
            queue_id: self.u64("queue id")?,
            account: self.name("account", names)?,
            name: self.name("queue name", names)?,
            settings: self.settings()?,
            created_at_ms: self.u64("createTime")?,
            modified_at_ms: self.u64("lastModifyTime")?,
        })
    }

    pub(super) fn time(&mut self, what: &str) -> Result<Millis, DecodeError> {
        self.u64(what)
    }

    /// A count of items that take at least `min_bytes` each: one the rest of the payload cannot
    /// hold is damage, and must not size an allocation.
    pub(super) fn count(
        &self,
        what: &str,
        count: usize,
        min_bytes: usize,
    ) -> Result<usize, DecodeError> {
        if count.saturating_mul(min_bytes) > self.buf.len() - self.at {
            return Err(self.malformed(format!("{what} count {count} exceeds the payload")));
        }
        Ok(count)
    }

    pub(super) fn topic_settings(&mut self) -> Result<TopicSettings, DecodeError> {
        let settings = TopicSettings {
            max_msg_size_bytes: self.u32("maxMsgSize")?,
            filter_type: self.u8("filterType")?,
            msg_retention_seconds: self.u32("msgRetentionSeconds")?,
        };
        // What the engine accepts (fixed bounds, not configuration): anything else is damage.
        if !(limits::TOPIC_MSG_BYTES_MIN..=limits::TOPIC_MSG_BYTES_MAX)
            .contains(&settings.max_msg_size_bytes)
        {
            return Err(self.malformed(format!(
                "topic maxMsgSize {} is out of range",
                settings.max_msg_size_bytes
            )));
        }
        if settings.filter_type != FILTER_TYPE_TAG
            && settings.filter_type != FILTER_TYPE_ROUTING_KEY
        {
            return Err(self.malformed(format!("filterType {} is unknown", settings.filter_type)));
        }
        if !(1..=limits::RETENTION_SECONDS_MAX).contains(&settings.msg_retention_seconds) {
            return Err(self.malformed(format!(
                "topic msgRetentionSeconds {} is out of range",
                settings.msg_retention_seconds
            )));
        }
        Ok(settings)
    }

    /// A list of tags or keys: at most [`limits::TAG_LIST_WIRE_MAX`] (the most any request
    /// can carry), each non-empty.
    pub(super) fn list(&mut self, what: &str) -> Result<Vec<String>, DecodeError> {
        let mut word = [0u8; 2];
        word.copy_from_slice(self.take(2, what)?);
        let count = usize::from(u16::from_le_bytes(word));
        if count > limits::TAG_LIST_WIRE_MAX {
            return Err(self.malformed(format!(
                "{count} {what} entries, at most {}",
                limits::TAG_LIST_WIRE_MAX
            )));
        }
        let mut list = Vec::with_capacity(count);
        for _ in 0..count {
            let item = self.str(what)?;
            if item.is_empty() {
                return Err(self.malformed(format!("an empty {what}")));
            }
            list.push(item.to_owned());
        }
        Ok(list)
    }

    /// A non-empty list of ids.
    pub(super) fn ids(&mut self, what: &str) -> Result<Vec<u64>, DecodeError> {
        let count = self.u32(what)? as usize;
        let count = self.count(what, count, 8)?;
        if count == 0 {
            return Err(self.malformed(format!("an empty {what}")));
        }
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(self.u64(what)?);
        }
        Ok(ids)
    }

    pub(super) fn subscription_settings(
        &mut self,
        names: &mut Names,
    ) -> Result<SubscriptionSettings, DecodeError> {
        let protocol = match self.u8("protocol")? {
            0 => Protocol::Http,
            1 => Protocol::Queue,
            other => return Err(self.malformed(format!("protocol {other} is unknown"))),
        };
        let endpoint = self.name("endpoint", names)?;
        let notify_strategy = match self.u8("notifyStrategy")? {
            0 => NotifyStrategy::BackoffRetry,
            1 => NotifyStrategy::ExponentialDecayRetry,
            other => return Err(self.malformed(format!("notifyStrategy {other} is unknown"))),
        };
        let content_format = match self.u8("notifyContentFormat")? {
            0 => ContentFormat::Json,
            1 => ContentFormat::Simplified,
            other => return Err(self.malformed(format!("notifyContentFormat {other} is unknown"))),
        };
        let filter_tags = self.list("filterTag")?;
        let binding_keys = self.list("bindingKey")?;
        // The checks of Subscribe that do not depend on configuration.
        let endpoint_ok = match protocol {
            Protocol::Http => validate_http_endpoint(&endpoint).is_ok(),
            Protocol::Queue => Engine::validate_queue_name(&endpoint).is_ok(),
        };
        if !endpoint_ok {
            return Err(self.malformed(format!("endpoint {endpoint:?} is invalid")));
        }
        if protocol == Protocol::Queue && content_format != ContentFormat::Simplified {
            return Err(self.malformed("a queue endpoint with a format other than SIMPLIFIED"));
        }
        if binding_keys.len() > limits::BINDING_KEYS_PER_SUBSCRIPTION_MAX
            || binding_keys
                .iter()
                .any(|k| validate_routing_key("bindingKey", k).is_err())
        {
            return Err(self.malformed("invalid bindingKey"));
        }
        Ok(SubscriptionSettings {
            protocol,
            endpoint,
            notify_strategy,
            content_format,
            filter_tags,
            binding_keys,
        })
    }

    pub(super) fn topic_image(&mut self, names: &mut Names) -> Result<TopicImage, DecodeError> {
        Ok(TopicImage {
            topic_id: self.u64("topic id")?,
            account: self.name("account", names)?,
            name: self.name("topic name", names)?,
            settings: self.topic_settings()?,
            created_at_ms: self.time("createTime")?,
            modified_at_ms: self.time("lastModifyTime")?,
        })
    }

    pub(super) fn subscription_image(
        &mut self,
        names: &mut Names,
    ) -> Result<SubscriptionImage, DecodeError> {
        Ok(SubscriptionImage {
            subscription_id: self.u64("subscription id")?,
            topic_id: self.u64("topic id")?,
            name: self.name("subscription name", names)?,
            settings: self.subscription_settings(names)?,
            created_at_ms: self.time("createTime")?,
            modified_at_ms: self.time("lastModifyTime")?,
        })
    }

    pub(super) fn outcome(&mut self) -> Result<PushOutcome, DecodeError> {
        match self.u8("outcome")? {
            0 => Ok(PushOutcome::Delivered),
            1 => Ok(PushOutcome::Dropped),
            other => Err(self.malformed(format!("push outcome {other} is unknown"))),
        }
    }

    /// The retained fields common to `TopicMessageRetained` and `RetainedImage`, from the
    /// message id on: (publish time, expiry, tags, subscriptions, body).
    #[allow(clippy::type_complexity)]
    pub(super) fn retained_tail(
        &mut self,
    ) -> Result<(Millis, Millis, Arc<[String]>, Vec<u64>, Bytes), DecodeError> {
        let publish_time_ms = self.time("publish time")?;
        let expires_at_ms = self.time("expiry time")?;
        if expires_at_ms < publish_time_ms {
            return Err(self.malformed("expires before it was published"));
        }
        let tags = self.list("msgTag")?;
        let subscription_ids = self.ids("subscription list")?;
        let body = self.body()?;
        Ok((
            publish_time_ms,
            expires_at_ms,
            Arc::from(tags),
            subscription_ids,
            body,
        ))
    }

    /// Skips what [`Reader::retained_tail`] reads before the body: publish time, expiry, the
    /// tag list and the subscription list (lengths checked, contents not).
    pub(super) fn skip_retained_head(&mut self) -> Result<(), DecodeError> {
        self.take(16, "publish and expiry times")?;
        let mut word = [0u8; 2];
        word.copy_from_slice(self.take(2, "msgTag")?);
        for _ in 0..u16::from_le_bytes(word) {
            self.skip_str("msgTag")?;
        }
        let count = self.u32("subscription list")? as usize;
        self.take(count.saturating_mul(8), "subscription list")?;
        Ok(())
    }

    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        if self.at == self.buf.len() {
            Ok(())
        } else {
            Err(self.malformed(format!(
                "{} bytes left over after the payload",
                self.buf.len() - self.at
            )))
        }
    }
}

/// Parses a framed record.
///
/// # Errors
///
/// [`DecodeError::UnknownType`], [`DecodeError::Malformed`].
pub fn decode(frame: &Frame<'_>, names: &mut Names) -> Result<Record, DecodeError> {
    decode_with(frame, names, Bodies::Copy)
}

/// As [`decode`], with a choice of what to do with bodies: validated the same either way.
///
/// # Errors
///
/// As [`decode`].
pub fn decode_with(
    frame: &Frame<'_>,
    names: &mut Names,
    bodies: Bodies,
) -> Result<Record, DecodeError> {
    let record = RecordType::from_u8(frame.record_type)
        .ok_or(DecodeError::UnknownType(frame.record_type))?;
    let mut r = Reader {
        buf: frame.payload,
        at: 0,
        record,
        bodies,
    };
    let decoded = match record {
        RecordType::Checkpoint => {
            let next_queue_id = r.u64("next queue id")?;
            let next_msg_id = r.u64("next message id")?;
            let count = r.u32("queue count")? as usize;
            // Each queue takes at least 50 bytes, a topic 37, a subscription 43.
            let count = r.count("queue", count, 50)?;
            let mut queues = Vec::with_capacity(count);
            for _ in 0..count {
                queues.push(r.queue_image(names)?);
            }
            let mut cp = Checkpoint {
                next_queue_id,
                next_msg_id,
                queues,
                next_topic_id: 1,
                next_subscription_id: 1,
                topics: Vec::new(),
                subscriptions: Vec::new(),
            };
            // A checkpoint written before topics were logged ends here (it has none); any
            // other is followed by the whole topic section.
            if r.at < frame.payload.len() {
                cp.next_topic_id = r.u64("next topic id")?;
                cp.next_subscription_id = r.u64("next subscription id")?;
                let count = r.u32("topic count")? as usize;
                let count = r.count("topic", count, 37)?;
                cp.topics.reserve(count);
                for _ in 0..count {
                    cp.topics.push(r.topic_image(names)?);
                }
                let count = r.u32("subscription count")? as usize;
                let count = r.count("subscription", count, 43)?;
                cp.subscriptions.reserve(count);
                for _ in 0..count {
                    cp.subscriptions.push(r.subscription_image(names)?);
                }
            }
            Record::Checkpoint(cp)
        }
        RecordType::Batch => Record::Batch {
            seq: r.u64("batch sequence")?,
        },
        RecordType::QueueCreated => Record::Mutation(Mutation::QueueCreated {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            name: r.name("queue name", names)?,
            settings: r.settings()?,
            created_at_ms: r.time("createTime")?,
        }),
        RecordType::QueueAttributesSet => Record::Mutation(Mutation::QueueAttributesSet {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            name: r.name("queue name", names)?,
            settings: r.settings()?,
            modified_at_ms: r.time("lastModifyTime")?,
        }),
        RecordType::QueueDeleted => Record::Mutation(Mutation::QueueDeleted {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            name: r.name("queue name", names)?,
            at_ms: r.time("time")?,
        }),
        RecordType::MessageSent => Record::Mutation(Mutation::MessageSent {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            queue: r.name("queue name", names)?,
            msg_id: r.u64("message id")?,
            enqueue_time_ms: r.time("enqueue time")?,
            visible_at_ms: r.time("visible time")?,
            body: r.body()?,
        }),
        RecordType::MessageDeleted => Record::Mutation(Mutation::MessageDeleted {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            queue: r.name("queue name", names)?,
            msg_id: r.u64("message id")?,
            at_ms: r.time("time")?,
            to_rewind_area: r.bool("rewind flag")?,
        }),
        RecordType::Rewound => Record::Mutation(Mutation::Rewound {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            queue: r.name("queue name", names)?,
            start_ms: r.time("start time")?,
            at_ms: r.time("time")?,
        }),
        RecordType::Purged => Record::Mutation(Mutation::Purged {
            account: r.name("account", names)?,
            queue_id: r.u64("queue id")?,
            queue: r.name("queue name", names)?,
            at_ms: r.time("time")?,
        }),
        RecordType::DeadLettered => {
            let account = r.name("account", names)?;
            let source_queue_id = r.u64("source queue id")?;
            let source = r.name("queue name", names)?;
            let target = r.name("queue name", names)?;
            let target_queue_id = if r.bool("target flag")? {
                Some(r.u64("target queue id")?)
            } else {
                None
            };
            Record::Mutation(Mutation::DeadLettered {
                account,
                source_queue_id,
                source,
                target,
                target_queue_id,
                msg_id: r.u64("message id")?,
                reason: r.reason()?,
                receive_count: r.u32("receive count")?,
                at_ms: r.time("time")?,
            })
        }
        RecordType::Redriven => Record::Mutation(Mutation::Redriven {
            account: r.name("account", names)?,
            dead_letter_queue_id: r.u64("dead-letter queue id")?,
            dead_letter_queue: r.name("queue name", names)?,
            target_queue_id: r.u64("target queue id")?,
            target: r.name("queue name", names)?,
            msg_id: r.u64("message id")?,
            at_ms: r.time("time")?,
        }),
        RecordType::MessageImage => {
            let queue_id = r.u64("queue id")?;
            let msg_id = r.u64("message id")?;
            let enqueue_time_ms = r.time("enqueue time")?;
            let visible_at_ms = r.time("visible time")?;
            let flags = r.u8("flags")?;
            if flags & !0b111 != 0 {
                return Err(r.malformed(format!("unknown flags {flags:#04x}")));
            }
            let dead_letter = if flags & 0b10 != 0 {
                Some(DeadLetterInfo {
                    source_queue: r.str("source queue name")?.to_owned(),
                    reason: r.reason()?,
                    receive_count: r.u32("receive count")?,
                    dead_lettered_at_ms: r.time("dead-letter time")?,
                })
            } else {
                None
            };
            let (dequeue_count, first_dequeue_ms, invisible_until_ms) = if flags & 0b100 != 0 {
                let count = r.u32("dequeue count")?;
                if count == 0 {
                    // Written only for a message received at least once.
                    return Err(r.malformed("dequeue count 0 with the received flag"));
                }
                (
                    count,
                    r.time("first dequeue time")?,
                    r.time("visibility deadline")?,
                )
            } else {
                (0, 0, 0)
            };
            Record::Message(MessageImage {
                queue_id,
                msg_id,
                enqueue_time_ms,
                visible_at_ms,
                in_rewind_area: flags & 0b01 != 0,
                dead_letter,
                dequeue_count,
                first_dequeue_ms,
                invisible_until_ms,
                body: r.body()?,
            })
        }
        RecordType::TopicCreated => Record::Mutation(Mutation::TopicCreated {
            account: r.name("account", names)?,
            topic_id: r.u64("topic id")?,
            name: r.name("topic name", names)?,
            settings: r.topic_settings()?,
            created_at_ms: r.time("createTime")?,
        }),
        RecordType::TopicAttributesSet => Record::Mutation(Mutation::TopicAttributesSet {
            account: r.name("account", names)?,
            topic_id: r.u64("topic id")?,
            name: r.name("topic name", names)?,
            settings: r.topic_settings()?,
            modified_at_ms: r.time("lastModifyTime")?,
        }),
        RecordType::TopicDeleted => Record::Mutation(Mutation::TopicDeleted {
            account: r.name("account", names)?,
            topic_id: r.u64("topic id")?,
            name: r.name("topic name", names)?,
            at_ms: r.time("time")?,
        }),
        RecordType::SubscriptionCreated => Record::Mutation(Mutation::SubscriptionCreated {
            account: r.name("account", names)?,
            topic_id: r.u64("topic id")?,
            topic: r.name("topic name", names)?,
            subscription_id: r.u64("subscription id")?,
            name: r.name("subscription name", names)?,
            settings: r.subscription_settings(names)?,
            created_at_ms: r.time("createTime")?,
        }),
        RecordType::SubscriptionAttributesSet => {
            Record::Mutation(Mutation::SubscriptionAttributesSet {
                account: r.name("account", names)?,
                topic_id: r.u64("topic id")?,
                subscription_id: r.u64("subscription id")?,
                name: r.name("subscription name", names)?,
                settings: r.subscription_settings(names)?,
                modified_at_ms: r.time("lastModifyTime")?,
            })
        }
        RecordType::SubscriptionDeleted => Record::Mutation(Mutation::SubscriptionDeleted {
            account: r.name("account", names)?,
            topic_id: r.u64("topic id")?,
            subscription_id: r.u64("subscription id")?,
            name: r.name("subscription name", names)?,
            at_ms: r.time("time")?,
        }),
        RecordType::TopicMessageRetained => {
            let account = r.name("account", names)?;
            let topic_id = r.u64("topic id")?;
            let topic = r.name("topic name", names)?;
            let msg_id = r.u64("message id")?;
            let (publish_time_ms, expires_at_ms, msg_tags, subscription_ids, body) =
                r.retained_tail()?;
            Record::Mutation(Mutation::TopicMessageRetained {
                account,
                topic_id,
                topic,
                msg_id,
                body,
                msg_tags,
                publish_time_ms,
                expires_at_ms,
                subscription_ids,
            })
        }
        RecordType::PushFinished => Record::Mutation(Mutation::PushFinished {
            account: r.name("account", names)?,
            topic_id: r.u64("topic id")?,
            subscription_id: r.u64("subscription id")?,
            msg_id: r.u64("message id")?,
            outcome: r.outcome()?,
            at_ms: r.time("time")?,
        }),
        RecordType::RetainedImage => {
            let topic_id = r.u64("topic id")?;
            let msg_id = r.u64("message id")?;
            let (publish_time_ms, expires_at_ms, msg_tags, subscription_ids, body) =
                r.retained_tail()?;
            Record::Retained(RetainedImage {
                topic_id,
                msg_id,
                body,
                msg_tags,
                publish_time_ms,
                expires_at_ms,
                subscription_ids,
            })
        }
        RecordType::PublishedNowhere => {
            let account = r.name("account", names)?;
            let topic_id = r.u64("topic id")?;
            let topic = r.name("topic name", names)?;
            let first_msg_id = r.u64("first message id")?;
            let count = r.u32("message count")?;
            // A publish is 1-16 messages.
            if count == 0 || count as usize > limits::BATCH_COUNT_MAX {
                return Err(r.malformed(format!("a publish of {count} messages")));
            }
            Record::Mutation(Mutation::PublishedNowhere {
                account,
                topic_id,
                topic,
                first_msg_id,
                count,
                at_ms: r.time("time")?,
            })
        }
        RecordType::MessagesReceived => {
            let account = r.name("account", names)?;
            let queue_id = r.u64("queue id")?;
            let queue = r.name("queue name", names)?;
            let at_ms = r.time("time")?;
            let invisible_until_ms = r.time("visibility deadline")?;
            if invisible_until_ms < at_ms {
                return Err(r.malformed("visible again before it was received"));
            }
            let mut word = [0u8; 2];
            word.copy_from_slice(r.take(2, "received count")?);
            // 20 bytes per message.
            let count = r.count(
                "received message",
                usize::from(u16::from_le_bytes(word)),
                20,
            )?;
            if count == 0 {
                return Err(r.malformed("no message received"));
            }
            let mut messages = Vec::with_capacity(count);
            for _ in 0..count {
                let d = Dequeue {
                    msg_id: r.u64("message id")?,
                    dequeue_count: r.u32("dequeue count")?,
                    first_dequeue_ms: r.time("first dequeue time")?,
                };
                // A receive counts at least itself, and came after the first one.
                if d.dequeue_count == 0 || d.first_dequeue_ms > at_ms {
                    return Err(r.malformed(format!(
                        "message {} has dequeue count {} first received at {}",
                        d.msg_id, d.dequeue_count, d.first_dequeue_ms
                    )));
                }
                messages.push(d);
            }
            Record::Mutation(Mutation::MessagesReceived {
                account,
                queue_id,
                queue,
                at_ms,
                invisible_until_ms,
                messages,
            })
        }
    };
    r.finish()?;
    Ok(decoded)
}

/// The body of a record that stores one (`MessageSent`, `MessageImage`,
/// `TopicMessageRetained`, `RetainedImage`), found without decoding the rest: for a record
/// [`decode`] accepted before (recovery reads the bodies it keeps in a second pass). Fields
/// before the body are skipped with their lengths checked, not validated again.
///
/// # Errors
///
/// [`DecodeError::UnknownType`] or [`DecodeError::Malformed`]: another record type, or
/// lengths that do not add up.
pub fn body_in<'a>(frame: &Frame<'a>) -> Result<&'a [u8], DecodeError> {
    let record = RecordType::from_u8(frame.record_type)
        .ok_or(DecodeError::UnknownType(frame.record_type))?;
    let mut r = Reader {
        buf: frame.payload,
        at: 0,
        record,
        bodies: Bodies::Skip,
    };
    match record {
        RecordType::MessageSent => {
            // account, queue id, queue name, message id, enqueue time, visible time.
            r.skip_str("account")?;
            r.take(8, "queue id")?;
            r.skip_str("queue name")?;
            r.take(24, "message id and times")?;
        }
        RecordType::MessageImage => {
            // queue id, message id, enqueue time, visible time, flags.
            r.take(32, "ids and times")?;
            let flags = r.u8("flags")?;
            if flags & 0b10 != 0 {
                // source queue, reason, receive count, dead-letter time.
                r.skip_str("source queue name")?;
                r.take(13, "dead-letter info")?;
            }
            if flags & 0b100 != 0 {
                // dequeue count, first dequeue time, visibility deadline.
                r.take(20, "receive info")?;
            }
        }
        RecordType::TopicMessageRetained => {
            // account, topic id, topic name, message id, then the retained tail.
            r.skip_str("account")?;
            r.take(8, "topic id")?;
            r.skip_str("topic name")?;
            r.take(8, "message id")?;
            r.skip_retained_head()?;
        }
        RecordType::RetainedImage => {
            // topic id, message id, then the retained tail.
            r.take(16, "ids")?;
            r.skip_retained_head()?;
        }
        _ => return Err(r.malformed("the record holds no message body")),
    }
    let body = r.body_slice()?;
    r.finish()?;
    Ok(body)
}

/// The body a record stores, if it stores one. Its offset inside a `MessageSent`,
/// `MessageImage`, `TopicMessageRetained` or `RetainedImage` record is not fixed (names, tags
/// and dead-letter info vary in length), so compaction decodes the whole record to get it.
pub fn body_of(record: &Record) -> Option<&Bytes> {
    match record {
        Record::Mutation(Mutation::MessageSent { body, .. })
        | Record::Mutation(Mutation::TopicMessageRetained { body, .. }) => Some(body),
        Record::Message(image) => Some(&image.body),
        Record::Retained(image) => Some(&image.body),
        // By name, no wildcard: a new variant that carries a body must say so here, or
        // compaction would not copy it forward.
        Record::Mutation(
            Mutation::QueueCreated { .. }
            | Mutation::QueueAttributesSet { .. }
            | Mutation::QueueDeleted { .. }
            | Mutation::MessageDeleted { .. }
            | Mutation::Rewound { .. }
            | Mutation::Purged { .. }
            | Mutation::DeadLettered { .. }
            | Mutation::Redriven { .. }
            | Mutation::TopicCreated { .. }
            | Mutation::TopicAttributesSet { .. }
            | Mutation::TopicDeleted { .. }
            | Mutation::SubscriptionCreated { .. }
            | Mutation::SubscriptionAttributesSet { .. }
            | Mutation::SubscriptionDeleted { .. }
            | Mutation::PushFinished { .. }
            | Mutation::PublishedNowhere { .. }
            | Mutation::MessagesReceived { .. },
        )
        | Record::Checkpoint(_)
        | Record::Batch { .. } => None,
    }
}
