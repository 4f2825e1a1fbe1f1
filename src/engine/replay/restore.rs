//! Loading a recovered state into an engine (and emptying one to load it again).

use super::*;

/// Why [`Engine::restore`] refused a state: the engine was not empty (a bug of the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The engine already holds topics, or (the `&str`) queues.
    #[error("restore needs an engine without {0}")]
    NotEmpty(&'static str),
    /// [`Engine::restore_topics`] found topics in the engine.
    #[error("restoring topics needs an engine without topics")]
    TopicsNotEmpty,
}

/// What [`Engine::restore`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Queues created.
    pub queues: usize,
    /// Messages put back (rewind areas included).
    pub messages: usize,
    /// Body bytes put back.
    pub body_bytes: u64,
    /// Messages skipped because their queue was not in the image or their id was already there
    /// (an inconsistent image; never expected).
    pub skipped: usize,
    /// Dead-letter policies dropped because their queue was not in the image (never expected).
    pub policies_dropped: usize,
    /// Topics put back.
    pub topics: usize,
    /// Subscriptions put back.
    pub subscriptions: usize,
    /// Published messages put back to wait for HTTP deliveries.
    pub retained: usize,
}

/// The queues an engine held before [`Engine::detach`]: where a reset finds the bodies of the
/// messages it puts back (no disk read for a message still in memory).
#[derive(Debug, Default)]
pub struct Detached {
    pub(super) queues: HashMap<u64, Arc<QueueCell>>,
    /// The topic and subscription id counters when detached.
    pub(super) next_ids: (u64, u64),
}

impl Detached {
    /// The body of message `msg_id` of queue `queue_id`, if the engine held it.
    pub fn body(&self, queue_id: u64, msg_id: u64) -> Option<Bytes> {
        self.queues
            .get(&queue_id)
            .and_then(|cell| cell.state.lock().body(msg_id))
    }
}

impl Engine {
    /// Loads a recovered state into this engine, which must hold no queue and no topic yet.
    /// Messages come back as the image says, ready or delayed, with their logged dequeue count
    /// and first-dequeue time (one whose count has reached its queue's maxReceiveCount is
    /// dead-lettered at the first tick: see the module docs); the id counters resume above
    /// everything the image used. Topics and subscriptions follow
    /// ([`Engine::restore_topics`]); messages waiting for HTTP deliveries are due at `now`.
    /// Nothing is logged: the state is already durable. The memory limit is not applied (the
    /// messages were accepted before).
    ///
    /// # Errors
    ///
    /// [`RestoreError::NotEmpty`] when the engine already has queues or topics.
    pub fn restore(&self, mut image: Image, now: Millis) -> Result<RestoreReport, RestoreError> {
        let messages = std::mem::take(&mut image.messages);
        self.restore_from(image, messages.into_iter(), now)
    }

    /// Empties the engine (queues, topics, subscriptions, timers) so that
    /// [`Engine::restore_from`] can load a state into it again: how the log undoes changes
    /// whose append failed (it resets the engine to what its model says is stored; see
    /// `storage::log`). The queues and topics taken out are marked deleted, so a caller that
    /// looked one up before fails rather than change something nobody sees. The id counters
    /// are kept: ids handed out for undone changes are never handed out again. Returns the
    /// old queues, for their bodies.
    ///
    /// The caller must keep every other change out while the engine is empty and until it is
    /// loaded again (the log holds its order lock exclusively); reads made meanwhile find
    /// nothing.
    pub fn detach(&self) -> Detached {
        let mut meta = self.meta.lock();
        meta.accounts.clear();
        let queues: HashMap<u64, Arc<QueueCell>> = self
            .by_id
            .iter()
            .map(|entry| (*entry.key(), Arc::clone(entry.value())))
            .collect();
        self.by_id.clear();
        self.queues.clear();
        for cell in queues.values() {
            cell.state.lock().deleted = true;
        }
        self.timers.lock().clear();
        self.stored_bytes.store(0, Ordering::Relaxed);
        drop(meta);
        let next_ids = self.detach_topics();
        Detached { queues, next_ids }
    }

    /// [`Engine::restore_from`] into an engine emptied by [`Engine::detach`]; the topic and
    /// subscription id counters stay at least where they were (ids handed out for undone
    /// changes are not handed out again).
    ///
    /// # Errors
    ///
    /// As [`Engine::restore`].
    pub fn restore_detached(
        &self,
        detached: &Detached,
        image: Image,
        messages: impl Iterator<Item = MessageImage>,
        now: Millis,
    ) -> Result<RestoreReport, RestoreError> {
        let report = self.restore_from(image, messages, now)?;
        self.keep_topic_ids(detached.next_ids);
        Ok(report)
    }

    /// [`Engine::restore`] with the stored messages from `messages` (in the order of
    /// [`Image::messages`]) rather than from `image`, whose `messages` are ignored: a recovery
    /// passes [`Replay::message_images`] and never holds every message image at once.
    ///
    /// # Errors
    ///
    /// As [`Engine::restore`].
    pub fn restore_from(
        &self,
        image: Image,
        messages: impl Iterator<Item = MessageImage>,
        now: Millis,
    ) -> Result<RestoreReport, RestoreError> {
        if self.topic_count() > 0 {
            return Err(RestoreError::NotEmpty("topics"));
        }
        let mut meta = self.meta.lock();
        if !self.by_id.is_empty() || !meta.accounts.is_empty() {
            return Err(RestoreError::NotEmpty("queues"));
        }
        let mut report = RestoreReport::default();
        let names: HashMap<(Arc<str>, String), ()> = image
            .queues
            .iter()
            .map(|q| ((Arc::clone(&q.account), q.name.to_ascii_lowercase()), ()))
            .collect();
        let mut cells = HashMap::with_capacity(image.queues.len());
        for q in &image.queues {
            let mut settings = q.settings.clone();
            let lower = q.name.to_ascii_lowercase();
            let target = match &settings.dead_letter_policy {
                Some(policy) => {
                    let target = policy.dead_letter_queue.to_ascii_lowercase();
                    if target != lower
                        && names.contains_key(&(Arc::clone(&q.account), target.clone()))
                    {
                        Some(target)
                    } else {
                        settings.dead_letter_policy = None;
                        report.policies_dropped += 1;
                        None
                    }
                }
                None => None,
            };
            let acct: &mut AccountMeta = meta.accounts.entry(q.account.to_string()).or_default();
            let mut queue = Queue::new(q.queue_id, &q.name, settings.clone(), q.created_at_ms);
            if q.modified_at_ms != q.created_at_ms {
                // The only way to set lastModifyTime; on an empty queue it changes nothing else.
                queue.set_settings(settings, q.modified_at_ms, &mut Effects::default());
            }
            let cell = self.insert_queue(
                acct,
                lower,
                target,
                Arc::clone(&q.account),
                Arc::clone(&q.name),
                q.queue_id,
                queue,
            );
            cells.insert(q.queue_id, cell);
            report.queues += 1;
        }
        drop(meta);
        // The image lists messages queue by queue: one lock per run of the same queue.
        let log_end_ms = image.log_end_ms;
        let mut messages = messages.peekable();
        while let Some(first) = messages.next() {
            let queue_id = first.queue_id;
            let Some(cell) = cells.get(&queue_id) else {
                report.skipped += 1;
                continue;
            };
            let run = std::iter::once(first)
                .chain(std::iter::from_fn(|| {
                    messages.next_if(|m| m.queue_id == queue_id)
                }))
                .map(|m| RestoredMessage {
                    msg_id: m.msg_id,
                    body: m.body,
                    enqueue_time_ms: m.enqueue_time_ms,
                    visible_at_ms: m.visible_at_ms,
                    dead_letter: m.dead_letter,
                    in_rewind_area: m.in_rewind_area,
                    dequeue_count: m.dequeue_count,
                    first_dequeue_ms: m.first_dequeue_ms,
                    // Still in flight when the log ended (see `Queue::restore_many`).
                    in_flight: m.invisible_until_ms > log_end_ms,
                });
            let (restored, bytes, skipped) = cell.state.lock().restore_many(run);
            report.messages += restored;
            report.body_bytes += bytes;
            report.skipped += skipped;
        }
        self.stored_bytes
            .fetch_add(report.body_bytes, Ordering::Relaxed);
        self.next_queue_id
            .fetch_max(image.next_queue_id, Ordering::Relaxed);
        self.next_msg_id
            .fetch_max(image.next_msg_id, Ordering::Relaxed);
        for cell in cells.values() {
            let mut q = cell.state.lock();
            self.reschedule(cell.id, &mut q);
        }
        report.topics = image.topics.topics.len();
        report.subscriptions = image.topics.subscriptions.len();
        report.retained = image.topics.retained.len();
        self.restore_topics(image.topics, now)?;
        Ok(report)
    }
}
