//! Maintenance: reclaiming dead segments, expiry and compaction (copying the live messages
//! of a segment forward a step at a time).

use super::*;

impl Writer {
    /// Reclamation, expiry, one compaction step. `force` runs expiry regardless of its
    /// interval. Returns whether anything was done.
    pub(super) fn maintenance(&mut self, force: bool) -> bool {
        if self.stopped {
            return false;
        }
        // A spare lost to a failure is asked for again, one that no longer fits the budget is
        // removed (threaded mode; manual mode asks only at rotation, deterministically). Either
        // way the log's bytes are counted.
        if self.config.spare_segment && self.config.threaded {
            self.want_spare();
        } else {
            self.count_log_bytes();
        }
        if let Some(why) = self.manifests.as_ref().and_then(|m| m.take_fatal()) {
            self.fail(why);
            return false;
        }
        let mut did = false;
        let now = self.clock.now_ms();
        if force || now.saturating_sub(self.last_expiry_ms) >= EXPIRY_SLACK_MS {
            self.last_expiry_ms = now;
            let mut t = Accounting {
                segments: &mut self.segments,
                current: self.head,
            };
            let expired = self.model.lock().expire(now, EXPIRY_SLACK_MS, &mut t);
            if expired > 0 {
                bump(&self.shared.counters.expired, expired as u64);
                did = true;
            }
        }
        match self.reclaim() {
            Ok(n) => did |= n > 0,
            Err(why) => {
                self.fail(why);
                return false;
            }
        }
        match self.removal_step(force) {
            Ok(step) => did |= step,
            Err(why) => {
                self.fail(why);
                return false;
            }
        }
        // The synced position, for recovery to tell damage from a torn tail.
        if self.synced != self.manifest.synced
            && (force || self.last_manifest.elapsed() >= MANIFEST_INTERVAL)
        {
            match self.record_synced_position() {
                Ok(()) => {}
                Err(failure) if failure.fatal => {
                    self.fail(failure.why);
                    return false;
                }
                Err(failure) => {
                    tracing::warn!(why = %failure.why, "cannot record the synced position in the log manifest; will retry");
                }
            }
        }
        if self.failing.is_none() {
            match self.compaction_step() {
                Ok(progress) => did |= progress,
                Err(WriteError::Fatal(why)) => {
                    self.fail(why);
                    return false;
                }
                Err(WriteError::Retry(why)) => {
                    tracing::warn!(%why, "compaction postponed");
                    self.compaction = None;
                }
            }
        }
        did
    }

    /// Retires every sealed segment with no live message whose tombstones no longer matter,
    /// and hands it to [`Writer::removal_step`], which removes it a step at a time. Returns
    /// how many.
    pub(super) fn reclaim(&mut self) -> Result<usize, StorageFailure> {
        // A segment being removed still counts as there until its unlink is synced: one
        // that only it blocked must wait (see `removal_step`).
        let existing: BTreeSet<u32> = self
            .segments
            .keys()
            .copied()
            .chain(self.removing.iter().map(|r| r.id))
            .collect();
        let dead: Vec<u32> = self
            .segments
            .values()
            .filter(|s| {
                s.sealed && s.live_msgs == 0 && s.blocked_by.iter().all(|b| !existing.contains(b))
            })
            .map(|s| s.id)
            .collect();
        if dead.is_empty() {
            return Ok(0);
        }
        // A segment may be dead only because of records (tombstones, copies) not yet synced:
        // sync them before the records they replace go.
        self.sync_head()?;
        // The manifest stops listing them before they go (a segment it lists is never
        // missing), and names them retired (a file left behind is the log's to remove).
        self.retired.extend(dead.iter().copied());
        let live = self
            .segments
            .keys()
            .copied()
            .filter(|id| !dead.contains(id))
            .collect();
        match self.write_manifest(Some(live), true) {
            Ok(()) => {}
            Err(failure) if failure.fatal => return Err(failure.why),
            Err(failure) => {
                for id in &dead {
                    self.retired.remove(id);
                }
                tracing::warn!(why = %failure.why, "cannot write the log manifest; reclamation postponed");
                return Ok(0);
            }
        }
        for &id in &dead {
            if self.compaction.as_ref().is_some_and(|c| c.seg == id) {
                self.compaction = None;
            }
            if let Some(segment) = self.segments.remove(&id) {
                self.removing.push_back(Removal {
                    id,
                    file: segment.file,
                    len: segment.len,
                });
            }
        }
        Ok(dead.len())
    }

    /// One step of removing the dead segments [`Writer::reclaim`] retired, oldest first: cuts
    /// the first by [`LogConfig::removal_step_bytes`], or unlinks it once it is empty and syncs the
    /// directory. Steps are [`REMOVAL_STEP_INTERVAL`] apart unless more than
    /// [`REMOVAL_HURRY_BYTES`] wait (`force`, or manual mode: now). Returns whether it did
    /// anything.
    ///
    /// The unlink is synced before the segment stops being retired and stops counting as
    /// there for `reclaim`: an unlink the directory never synced can be undone by a power
    /// loss, and an older segment coming back without the newer one holding its tombstones
    /// would bring back messages whose deletion was acknowledged. A file left behind (a crash
    /// between steps) is retired, and recovery removes it.
    pub(super) fn removal_step(&mut self, force: bool) -> Result<bool, StorageFailure> {
        if self.removing.is_empty() {
            return Ok(false);
        }
        let hurry = || self.removing.iter().map(|r| r.len).sum::<u64>() > REMOVAL_HURRY_BYTES;
        // Manual mode (deterministic tests) takes a step whenever asked.
        let paced = self.config.threaded && !force;
        if paced && self.last_removal_step.elapsed() < REMOVAL_STEP_INTERVAL && !hurry() {
            return Ok(false);
        }
        let Some(front) = self.removing.front_mut() else {
            return Ok(false);
        };
        self.last_removal_step = crate::clock::monotonic_now();
        let name = segment_name(front.id);
        if front.len > 0 {
            let to = front
                .len
                .saturating_sub(self.config.removal_step_bytes.max(1));
            match front.file.set_len(to) {
                Ok(()) => front.len = to,
                Err(error) => {
                    // Not needed for correctness: the unlink frees it whole.
                    tracing::warn!(file = %self.dir.describe(&name), %error, "cannot cut a dead segment; unlinking it whole");
                    front.len = 0;
                }
            }
            if front.len > 0 {
                return Ok(true);
            }
        }
        let id = front.id;
        match self.dir.remove(&name) {
            Ok(()) => {
                self.removing.pop_front();
                bump(&self.shared.counters.segments_deleted, 1);
                metrics::gauge!(crate::metrics::STORAGE_SEGMENTS).decrement(1.0);
            }
            Err(error) => {
                tracing::warn!(file = %self.dir.describe(&name), %error, "cannot delete a dead segment; will retry");
                // Behind the others, so that one stuck file does not hold them up.
                if let Some(stuck) = self.removing.pop_front() {
                    self.removing.push_back(stuck);
                }
                return Ok(true);
            }
        }
        self.dir
            .sync()
            .map_err(|e| StorageFailure::io("fsync of the log directory failed", e))?;
        self.retired.remove(&id);
        self.count_log_bytes();
        Ok(true)
    }

    /// Picks the sealed segment whose compaction frees the most per byte copied, once the log
    /// holds more dead bytes than live ones (plus [`COMPACTION_SLACK_SEGMENTS`]): disk use
    /// stays within about twice the live data, and a long-lived message is copied only when
    /// that bound needs it, not on every pass of the log.
    pub(super) fn pick_compaction(&self) -> Option<u32> {
        let existing: BTreeSet<u32> = self.segments.keys().copied().collect();
        let sealed = || self.segments.values().filter(|s| s.sealed);
        let live: u64 = sealed().map(|s| s.live_bytes).sum();
        let dead: u64 = sealed().map(|s| s.len.saturating_sub(s.live_bytes)).sum();
        if dead <= live.max(COMPACTION_SLACK_SEGMENTS * self.config.segment_bytes) {
            return None;
        }
        let mut best: Option<(u32, u64, u64)> = None;
        for o in sealed().filter(|s| s.live_msgs > 0) {
            // Dead segments that only `o` keeps: they go once `o` does.
            let freed_after: u64 = sealed()
                .filter(|s| {
                    s.live_msgs == 0
                        && !s.blocked_by.is_empty()
                        && s.blocked_by
                            .iter()
                            .filter(|b| existing.contains(b))
                            .all(|b| *b == o.id)
                })
                .map(|s| s.len)
                .sum();
            let gain = o.len.saturating_sub(o.live_bytes) + freed_after;
            if gain < COMPACTION_GAIN_MIN * o.live_bytes {
                continue;
            }
            let better = best.is_none_or(|(_, g, l)| {
                u128::from(gain) * u128::from(l + 1) > u128::from(g) * u128::from(o.live_bytes + 1)
            });
            if better {
                best = Some((o.id, gain, o.live_bytes));
            }
        }
        best.map(|(id, _, _)| id)
    }

    /// Copies up to [`COMPACTION_STEP_BYTES`] of live messages forward. Returns whether it
    /// did anything.
    pub(super) fn compaction_step(&mut self) -> Result<bool, WriteError> {
        if self.compaction.is_none() {
            let Some(seg) = self.pick_compaction() else {
                return Ok(false);
            };
            let mut todo = self.model.lock().find_origins(|l| l.seg == seg);
            todo.sort_unstable_by_key(|&(_, _, l)| l.off);
            tracing::debug!(segment = seg, messages = todo.len(), "compacting");
            self.compaction = Some(Compaction { seg, todo, next: 0 });
        }
        let Some(mut job) = self.compaction.take() else {
            return Ok(false);
        };
        let Some(file) = self.segments.get(&job.seg).map(|s| Arc::clone(&s.file)) else {
            return Ok(false);
        };
        let mut buf = Vec::new();
        encode_batch(self.batch_seq + 1, &mut buf);
        let mut images: Vec<(Copy, usize, usize)> = Vec::new();
        let mut names = Names::default();
        while job.next < job.todo.len() && buf.len() < COMPACTION_STEP_BYTES {
            let (holder, msg_id, loc) = job.todo[job.next];
            job.next += 1;
            // Still stored, and still there? (Deleted or copied since the list was made.)
            if self.model.lock().origin(holder, msg_id) != Some(&loc) {
                continue;
            }
            let mut raw = vec![0u8; loc.len as usize];
            let name = segment_name(loc.seg);
            file.read_at(&mut raw, u64::from(loc.off)).map_err(|e| {
                WriteError::Retry(StorageFailure::io(
                    format!("reading {}", self.dir.describe(&name)),
                    e,
                ))
            })?;
            // Validated again on the way back: a sealed segment that changed under us is
            // damage, and copying it forward would make it permanent.
            let body = read_frame(&raw)
                .and_then(|f| f.ok_or(record::DecodeError::BadLength(0)))
                .and_then(|f| decode(&f, &mut names))
                .map_err(|e| {
                    WriteError::Fatal(StorageFailure::DamagedRecord {
                        file: self.dir.describe(&name),
                        offset: u64::from(loc.off),
                        why: e,
                    })
                })
                .and_then(|record| {
                    record::body_of(&record).cloned().ok_or_else(|| {
                        WriteError::Fatal(StorageFailure::Internal(format!(
                            "{} offset {} holds no message body",
                            self.dir.describe(&name),
                            loc.off
                        )))
                    })
                })?;
            let start = buf.len();
            let copy = match holder {
                Holder::Queue(queue_id) => {
                    let Some(image) = self.model.lock().message_image(queue_id, msg_id, body)
                    else {
                        continue;
                    };
                    encode_message_image(&image, &mut buf)
                        .map_err(|e| WriteError::Fatal(StorageFailure::Internal(e.to_string())))?;
                    Copy::Message(image)
                }
                Holder::Topic(_) => {
                    let Some(image) = self.model.lock().retained_image(msg_id, body) else {
                        continue;
                    };
                    encode_retained_image(&image, &mut buf)
                        .map_err(|e| WriteError::Fatal(StorageFailure::Internal(e.to_string())))?;
                    Copy::Retained(image)
                }
            };
            images.push((copy, start, buf.len() - start));
        }
        let finished = job.next >= job.todo.len();
        if !finished {
            self.compaction = Some(job);
        }
        if images.is_empty() {
            return Ok(false);
        }
        let base = self.place(buf.len())?;
        self.write_at_head(&buf, base)?;
        self.batch_seq += 1;
        // With `always` every batch is synced before the next is written, copies included:
        // recovery relies on it (a bad record followed by a later batch is damage). Otherwise
        // reclamation syncs before it deletes what these copies replace.
        if self.config.fsync == FsyncMode::Always {
            self.sync_head().map_err(WriteError::Fatal)?;
        }
        bump(&self.shared.counters.batches, 1);
        let head = self.head;
        let mut model = self.model.lock();
        model.end_batch(&mut Accounting {
            segments: &mut self.segments,
            current: head,
        });
        let copied = images.len() as u64;
        for (copy, start, len) in images {
            let at = Loc {
                seg: head,
                off: u32::try_from(base + start as u64).unwrap_or(u32::MAX),
                len: u32::try_from(len).unwrap_or(u32::MAX),
            };
            let mut t = Accounting {
                segments: &mut self.segments,
                current: head,
            };
            match copy {
                Copy::Message(image) => model.restore_message(&image, at, &mut t),
                Copy::Retained(image) => model.restore_retained(&image, at, &mut t),
            }
        }
        bump(&self.shared.counters.compacted, copied);
        metrics::counter!(crate::metrics::STORAGE_COMPACTED_MESSAGES_TOTAL).increment(copied);
        Ok(true)
    }
}
