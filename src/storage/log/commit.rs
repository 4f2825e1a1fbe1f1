//! The writer: group commit (collect, write, sync, answer), undoing a failed write,
//! rotation and stopping (`storage::log` module docs, "Failure").

use super::*;

impl Writer {
    pub(super) fn run(mut self) {
        match manifest_bg::ManifestWriter::start(Arc::clone(&self.dir)) {
            Ok(manifests) => self.manifests = Some(manifests),
            Err(error) => tracing::warn!(
                %error,
                "cannot start the log manifest thread; the writer writes manifests itself"
            ),
        }
        if self.config.spare_segment {
            let shared = Arc::clone(&self.shared);
            let written = Arc::new(move || {
                shared
                    .counters
                    .bytes
                    .load(std::sync::atomic::Ordering::Relaxed)
            });
            self.spares =
                spare::Spares::threaded(Arc::clone(&self.dir), self.config.segment_bytes, written);
            self.want_spare();
        }
        loop {
            {
                let mut inbox = self.shared.inbox.lock();
                if inbox.appends.is_empty() && !inbox.closed {
                    let timeout = self.next_wakeup();
                    self.shared.wake.wait_for(&mut inbox, timeout);
                }
            }
            if !self.step() {
                break;
            }
        }
        self.finish();
    }

    /// How long the writer may sleep with nothing queued.
    pub(super) fn next_wakeup(&self) -> Duration {
        let mut wait = self.config.maintenance_interval;
        if !self.removing.is_empty() {
            wait = wait.min(REMOVAL_STEP_INTERVAL);
        }
        if self.failing.is_some() {
            wait = wait.min(RETRY_INTERVAL.saturating_sub(self.last_retry.elapsed()));
        }
        if let (FsyncMode::Interval(every), true) = (self.config.fsync, self.unsynced) {
            wait = wait.min(every.saturating_sub(self.last_sync.elapsed()));
        }
        wait.max(Duration::from_millis(1))
    }

    /// One round: collect and write a batch, then maintenance when due. Returns false once the
    /// writer has stopped (closed and drained, or fatal).
    pub(super) fn step(&mut self) -> bool {
        if self.stopped {
            return false;
        }
        let (appends, closed) = {
            // Exclusive: every caller that made a change has appended it (module docs).
            let _collect = self.shared.order.write();
            let mut inbox = self.shared.inbox.lock();
            let waited = inbox.waited > 0;
            let appends = inbox.take();
            inbox.in_flight = waited.then(Vec::new);
            (appends, inbox.closed)
        };
        if !appends.is_empty() {
            let mut appends = appends;
            let result = self.commit(&mut appends);
            // Dropped (records, bodies) before the lock that callers append under.
            appends.clear();
            // Whoever waits for this batch behind its appends (`append_behind`).
            let waiters = {
                let mut inbox = self.shared.inbox.lock();
                inbox.recycle(appends);
                inbox.in_flight.take()
            };
            for waiter in waiters.into_iter().flatten() {
                let _ = waiter.send(result.clone());
            }
        } else if self.failing.is_some()
            && (!self.config.threaded || self.last_retry.elapsed() >= RETRY_INTERVAL)
        {
            // Nothing to write, but the server refuses changes until a write succeeds: try an
            // empty batch (a marker). Manual mode tries at every pump. Its outcome shows in
            // `failing`; nobody waits for it.
            let _ = self.commit(&mut []);
        }
        if self.stopped {
            return false;
        }
        if let FsyncMode::Interval(every) = self.config.fsync {
            if self.unsynced && self.last_sync.elapsed() >= every {
                if let Err(error) = self.sync_head() {
                    self.fail(error);
                    return false;
                }
            }
        }
        if self.last_maintenance.elapsed() >= self.config.maintenance_interval {
            self.last_maintenance = crate::clock::monotonic_now();
            self.maintenance(false);
        } else if self.config.threaded && !self.removing.is_empty() && !self.stopped {
            // Between maintenance rounds too: a step every few milliseconds.
            if let Err(why) = self.removal_step(false) {
                self.fail(why);
                return false;
            }
        }
        if closed && self.shared.inbox.lock().appends.is_empty() {
            return false;
        }
        !self.stopped
    }

    /// Stops: syncs what was written; fails whatever could not be.
    pub(super) fn finish(&mut self) {
        self.spares.stop(&*self.dir);
        // The last manifest is written below, in line, after any periodic one under way.
        if let Some(mut manifests) = self.manifests.take() {
            manifests.stop();
            if let Some(why) = manifests.take_fatal() {
                self.fail(why);
            }
        }
        if !self.stopped && self.unsynced {
            if let Err(error) = self.sync_head() {
                self.fail(error);
            }
        }
        if !self.stopped && self.synced != self.manifest.synced {
            if let Err(failure) = self.write_manifest(None, true) {
                tracing::warn!(why = %failure.why, "cannot record the synced position in the log manifest");
            }
        }
        let error = StorageError(StorageFailure::Closed);
        let mut inbox = self.shared.inbox.lock();
        inbox.closed = true;
        for mut append in inbox.take() {
            append.answer(Err(error.clone()));
        }
        for waiter in inbox.in_flight.take().into_iter().flatten() {
            let _ = waiter.send(Err(error.clone()));
        }
        self.stopped = true;
    }

    /// Writes a batch and completes its commits; undoes its changes when the write fails.
    pub(super) fn commit(&mut self, batch: &mut [Append]) -> Result<(), StorageError> {
        match self.write_batch(batch) {
            Ok(()) => {
                if let Some((why, _)) = self.failing.take() {
                    {
                        // Both under the `stalled` lock, which `wait_writable` waits with.
                        let mut stalled = self.shared.stalled.lock();
                        *stalled = None;
                        let fatal = self.shared.fatal_error.lock().is_some();
                        self.shared
                            .refusing
                            .store(fatal, std::sync::atomic::Ordering::Release);
                    }
                    self.shared.writable.notify_all();
                    metrics::gauge!(crate::metrics::STORAGE_WRITABLE).set(1.0);
                    tracing::info!(%why, "the log writes again");
                }
                for append in batch.iter_mut() {
                    append.answer(Ok(()));
                }
                Ok(())
            }
            Err(WriteError::Retry(why)) => {
                self.last_retry = crate::clock::monotonic_now();
                if !batch.is_empty() {
                    bump(&self.shared.counters.write_failures, 1);
                    metrics::counter!(crate::metrics::STORAGE_WRITE_FAILURES_TOTAL).increment(1);
                }
                if self.failing.is_none() {
                    tracing::error!(%why, "log write failed; its changes are undone");
                }
                let error = not_stored(&why);
                self.undo(batch, why);
                Err(self.shared.fatal_error.lock().clone().unwrap_or(error))
            }
            Err(WriteError::Fatal(why)) => {
                let error = StorageError(StorageFailure::Stopped {
                    why: why.to_string(),
                });
                for append in batch.iter_mut() {
                    append.answer(Err(error.clone()));
                }
                self.fail(why);
                Err(error)
            }
        }
    }

    /// After a failed write: makes sure its bytes are never replayed, fails its commits and
    /// everything queued behind it, and resets the engine to the model (module docs,
    /// "Failure"). Stops the log when any of that cannot be done.
    pub(super) fn undo(&mut self, batch: &mut [Append], why: StorageFailure) {
        // Erased and synced, so that not even a crash now brings the failed write back.
        let erased = self.erase_dirty().and_then(|()| self.sync_head());
        if let Err(error) = erased {
            let error = format!("{why}; then {error}");
            let stopped = StorageError(StorageFailure::Stopped { why: error.clone() });
            for append in batch.iter_mut() {
                append.answer(Err(stopped.clone()));
            }
            self.fail(error);
            return;
        }
        let error = not_stored(&why);
        // Exclusive: no caller is between its engine call and its append, so everything the
        // engine did since the last written batch is in `batch` or in the inbox.
        let order = Arc::clone(&self.shared);
        let _exclusive = order.order.write();
        let behind = self.shared.inbox.lock().take();
        let engine = self.shared.engine.lock().as_ref().and_then(Weak::upgrade);
        let had_changes = !batch.is_empty() || !behind.is_empty();
        let reset = match (&engine, had_changes) {
            (_, false) => Ok(()),
            (Some(engine), true) => self.reset_engine(engine),
            (None, true) => Err(StorageFailure::Internal(
                "no engine is attached to undo the changes in".to_string(),
            )),
        };
        *self.shared.stalled.lock() = Some(why.clone());
        self.shared
            .refusing
            .store(true, std::sync::atomic::Ordering::Release);
        metrics::gauge!(crate::metrics::STORAGE_WRITABLE).set(0.0);
        let failed_bytes = batch.iter().map(Append::len).sum::<usize>();
        let probe_bytes = self.failing.as_ref().map_or(0, |f| f.1);
        self.failing = Some((why.clone(), failed_bytes.max(probe_bytes)));
        for mut append in behind {
            append.answer(Err(error.clone()));
        }
        for append in batch.iter_mut() {
            append.answer(Err(error.clone()));
        }
        if let Err(reset) = reset {
            self.fail(format!("{why}; the changes cannot be undone: {reset}"));
        }
    }

    /// Overwrites with zeros what the last failed write may have left past the head's length.
    pub(super) fn erase_dirty(&mut self) -> Result<(), StorageFailure> {
        let Some((from, to)) = self.dirty else {
            return Ok(());
        };
        let head = self
            .segments
            .get(&self.head)
            .ok_or_else(|| StorageFailure::Internal("the head segment is missing".into()))?;
        let name = self.dir.describe(&segment_name(head.id));
        // Only what the file holds: a write past its end that failed left nothing there.
        let size = head
            .file
            .size()
            .map_err(|e| StorageFailure::io(format!("cannot read the size of {name}"), e))?;
        let to = to.min(size);
        if to > from {
            let zeros = vec![0u8; usize::try_from(to - from).unwrap_or(0)];
            if let Err(write) = head.file.write_at(&zeros, from) {
                // Cutting the file there needs no space (the segment is no longer
                // preallocated after it, which only costs a later write a block allocation).
                head.file.set_len(from).map_err(|cut| {
                    StorageFailure::io(
                        format!(
                            "cannot erase the failed write at {name} offset {from}: {write}; \
                             nor cut the file there"
                        ),
                        cut,
                    )
                })?;
            }
            self.unsynced = true;
        }
        self.dirty = None;
        Ok(())
    }

    /// Loads the model's state into `engine` in place of what it holds (module docs).
    pub(super) fn reset_engine(&self, engine: &Engine) -> Result<(), StorageFailure> {
        let detached = engine.detach();
        let mut window = Window::default();
        let mut failed: Option<StorageError> = None;
        let model = self.model.lock();
        let (dir, segments, model) = (&*self.dir, &self.segments, &*model);
        let mut read = |loc: &Loc| match read_body(dir, segments, &mut window, *loc) {
            Ok(body) => body,
            Err(error) => {
                failed.get_or_insert(error);
                Bytes::new()
            }
        };
        let image = model.image_metadata(&mut read);
        let messages = model.message_images(|_| Bytes::new()).map(|mut m| {
            m.body = match detached.body(m.queue_id, m.msg_id) {
                Some(body) => body,
                None => match model.message(m.queue_id, m.msg_id) {
                    Some(stored) => read(&stored.origin),
                    None => Bytes::new(),
                },
            };
            m
        });
        let report = engine
            .restore_detached(&detached, image, messages, self.clock.now_ms())
            .map_err(|e| StorageFailure::Internal(e.to_string()))?;
        if let Some(error) = failed {
            return Err(error.0);
        }
        tracing::warn!(
            queues = report.queues,
            messages = report.messages,
            topics = report.topics,
            skipped = report.skipped,
            "the engine was reset to what the log holds"
        );
        Ok(())
    }

    /// Writes one batch: marker, then every append's records; syncs if the mode says so;
    /// applies it to the model.
    pub(super) fn write_batch(&mut self, batch: &[Append]) -> Result<(), WriteError> {
        let mut marker = Vec::with_capacity(32);
        encode_batch(self.batch_seq + 1, &mut marker);
        let len = marker.len() + batch.iter().map(Append::len).sum::<usize>();
        // A try after a failure must have the room the failed batch needed.
        let room = match (&self.failing, batch.is_empty()) {
            (Some((_, failed)), true) => len.max(*failed),
            _ => len,
        };
        let base = self.place(room)?;
        let mut buf = std::mem::take(&mut self.batch_buf);
        let written = self.lay_out_and_write(&mut buf, &marker, batch, base, len);
        self.batch_buf = buf;
        let starts = written?;
        self.batch_seq += 1;
        if self.config.fsync == FsyncMode::Always {
            self.sync_head().map_err(WriteError::Fatal)?;
        }
        bump(&self.shared.counters.batches, 1);
        let head = self.head;
        // Held for the whole batch: body reads (`bodies.rs`) look up locations between batches.
        let mut model = self.model.lock();
        model.end_batch(&mut Accounting {
            segments: &mut self.segments,
            current: head,
        });
        let mut records = 0u64;
        for (append, start) in batch.iter().zip(starts) {
            for (mutation, off, len) in &append.records {
                let at = Loc {
                    seg: head,
                    off: u32::try_from(base + (start + *off as usize) as u64).unwrap_or(u32::MAX),
                    len: *len,
                };
                let mut t = Accounting {
                    segments: &mut self.segments,
                    current: head,
                };
                model.apply(mutation, at, &mut t);
                records += 1;
            }
        }
        bump(&self.shared.counters.records, records);
        metrics::counter!(crate::metrics::STORAGE_RECORDS_WRITTEN_TOTAL).increment(records);
        Ok(())
    }

    /// Where a batch of `len` bytes goes in the head, rotating first when it does not fit.
    pub(super) fn place(&mut self, len: usize) -> Result<u64, WriteError> {
        let head = self.segments.get(&self.head).ok_or_else(|| {
            WriteError::Fatal(StorageFailure::Internal(
                "the head segment is missing".into(),
            ))
        })?;
        let end = head.len + len as u64;
        if end > self.config.segment_bytes && head.len > head.data_start {
            self.rotate()?;
        }
        let head = self.segments.get(&self.head).ok_or_else(|| {
            WriteError::Fatal(StorageFailure::Internal(
                "the head segment is missing".into(),
            ))
        })?;
        if head.len + len as u64 > u64::from(u32::MAX) {
            return Err(WriteError::Fatal(StorageFailure::Internal(format!(
                "a batch of {len} bytes does not fit in a segment"
            ))));
        }
        Ok(head.len)
    }

    pub(super) fn write_at_head(&mut self, buf: &[u8], at: u64) -> Result<(), WriteError> {
        // What a failed write left must not outlive the next write (it may be shorter).
        self.erase_dirty().map_err(WriteError::Retry)?;
        let head = self.segments.get_mut(&self.head).ok_or_else(|| {
            WriteError::Fatal(StorageFailure::Internal(
                "the head segment is missing".into(),
            ))
        })?;
        if let Err(e) = head.file.write_at(buf, at) {
            // Part of it may be there: erased before anything else is written.
            let (from, to) = (at, at + buf.len() as u64);
            self.dirty = Some(match self.dirty {
                Some((f, t)) => (f.min(from), t.max(to)),
                None => (from, to),
            });
            return Err(WriteError::Retry(StorageFailure::io(
                self.dir.describe(&segment_name(head.id)).to_string(),
                e,
            )));
        }
        head.len = at + buf.len() as u64;
        self.unsynced = true;
        bump(&self.shared.counters.bytes, buf.len() as u64);
        metrics::counter!(crate::metrics::STORAGE_BYTES_WRITTEN_TOTAL).increment(buf.len() as u64);
        self.remember_tail(buf, at);
        Ok(())
    }

    /// Writes a batch at `base` in the head: `len` bytes, `marker` then every append's records,
    /// streamed through `buf` ([`crate::limits::storage::BATCH_CHUNK_BYTES`] at a time, so
    /// that a batch of any size needs no more memory than that, and no fresh pages). Returns
    /// where each append starts in the batch.
    ///
    /// With `fsync = "always"` the chunks are written around the page cache
    /// ([`LogFile::write_direct_at`]), which writes whole blocks from a block boundary: the
    /// first chunk starts at the block that holds `base` and so writes that block's bytes
    /// before `base` again, as they are (the same bytes: a torn write leaves them as they
    /// were), and the last ends with zeros to the next block boundary, which is what the
    /// preallocated segment holds there (zeros are the end of the data to recovery).
    fn lay_out_and_write(
        &mut self,
        buf: &mut Vec<u8>,
        marker: &[u8],
        batch: &[Append],
        base: u64,
        len: usize,
    ) -> Result<Vec<usize>, WriteError> {
        // An encoding bug must not reach the disk: every piece must tile into whole records.
        check_framing(marker).map_err(WriteError::Fatal)?;
        let mut starts = Vec::with_capacity(batch.len());
        let mut offset = marker.len();
        for append in batch {
            check_append_framing(append).map_err(WriteError::Fatal)?;
            starts.push(offset);
            offset += append.len();
        }
        let chunk = crate::limits::storage::BATCH_CHUNK_BYTES;
        let block = base - base % DIRECT_ALIGN as u64;
        let pre = usize::try_from(base - block).unwrap_or(0);
        buf.clear();
        buf.reserve(chunk + DIRECT_ALIGN);
        let mut direct = self.config.fsync == FsyncMode::Always
            && len as u64 >= self.config.direct_write_min_bytes;
        let mut lead = 0;
        if direct {
            lead = buf.as_ptr().align_offset(DIRECT_ALIGN);
            direct = lead < DIRECT_ALIGN && {
                buf.resize(lead, 0);
                self.head_bytes_before(block, pre, buf)
            };
            if !direct {
                buf.clear();
                lead = 0;
            }
        }
        // File offset of `buf[lead]`.
        let mut at = if direct { block } else { base };
        // What a failed write left must not outlive the next write (it may be shorter).
        self.erase_dirty().map_err(WriteError::Retry)?;
        let pieces = std::iter::once(marker).chain(batch.iter().flat_map(Append::pieces));
        for mut piece in pieces {
            while !piece.is_empty() {
                let take = (lead + chunk - buf.len()).min(piece.len());
                buf.extend_from_slice(&piece[..take]);
                piece = &piece[take..];
                if buf.len() == lead + chunk {
                    self.write_chunk(&buf[lead..], at, base, direct)?;
                    at += chunk as u64;
                    buf.truncate(lead);
                }
            }
        }
        let data = buf.len() - lead;
        if data > 0 {
            if direct {
                buf.resize(lead + data.next_multiple_of(DIRECT_ALIGN), 0);
            }
            self.write_chunk(&buf[lead..], at, base, direct)?;
        }
        let head = self.segments.get_mut(&self.head).ok_or_else(|| {
            WriteError::Fatal(StorageFailure::Internal(
                "the head segment is missing".into(),
            ))
        })?;
        head.len = base + len as u64;
        self.unsynced = true;
        bump(&self.shared.counters.bytes, len as u64);
        if direct {
            bump(&self.shared.counters.direct_bytes, len as u64);
        }
        metrics::counter!(crate::metrics::STORAGE_BYTES_WRITTEN_TOTAL).increment(len as u64);
        // The last chunk's data ends the head's data.
        self.remember_tail(&buf[lead..lead + data], at);
        Ok(starts)
    }

    /// Appends the head's bytes from `block` to `block + pre` (its data before the next
    /// write) to `out`: from [`Writer::tail`] when it holds them, else read back. Returns
    /// false (and appends nothing) when they cannot be read.
    fn head_bytes_before(&self, block: u64, pre: usize, out: &mut Vec<u8>) -> bool {
        if pre == 0 {
            return true;
        }
        if let Some(bytes) = self
            .tail
            .as_ref()
            .filter(|(seg, _)| *seg == self.head)
            .and_then(|(_, tail)| tail.holds(block, pre))
        {
            out.extend_from_slice(bytes);
            return true;
        }
        let Some(head) = self.segments.get(&self.head) else {
            return false;
        };
        let from = out.len();
        out.resize(from + pre, 0);
        match head.file.read_at(&mut out[from..], block) {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(%error, "cannot read the head's last block back; writing through the page cache");
                out.truncate(from);
                false
            }
        }
    }

    /// Writes one chunk of a batch at `at` (around the page cache if `direct`). On failure
    /// everything from `base` (where the batch starts) to the chunk's end may hold some of it:
    /// erased before the next write. Bytes before `base` were written again as they were.
    fn write_chunk(
        &mut self,
        bytes: &[u8],
        at: u64,
        base: u64,
        direct: bool,
    ) -> Result<(), WriteError> {
        let head = self.segments.get(&self.head).ok_or_else(|| {
            WriteError::Fatal(StorageFailure::Internal(
                "the head segment is missing".into(),
            ))
        })?;
        let written = if direct {
            head.file.write_direct_at(bytes, at)
        } else {
            head.file.write_at(bytes, at)
        };
        if let Err(e) = written {
            let (from, to) = (base, at + bytes.len() as u64);
            self.dirty = Some(match self.dirty {
                Some((f, t)) => (f.min(from), t.max(to)),
                None => (from, to),
            });
            self.tail = None;
            return Err(WriteError::Retry(StorageFailure::io(
                self.dir.describe(&segment_name(head.id)).to_string(),
                e,
            )));
        }
        Ok(())
    }

    /// After `written` was written at `at`, ending the head's data: keeps the head's last
    /// partial block for the next direct write ([`Writer::tail`]).
    fn remember_tail(&mut self, written: &[u8], at: u64) {
        let kept = self.tail.take().filter(|(seg, _)| *seg == self.head);
        self.tail = TailBlock::after_write(kept.map(|(_, tail)| tail), written, at)
            .map(|tail| (self.head, tail));
    }

    pub(super) fn sync_head(&mut self) -> Result<(), StorageFailure> {
        if !self.unsynced {
            return Ok(());
        }
        let head = self
            .segments
            .get(&self.head)
            .ok_or_else(|| StorageFailure::Internal("the head segment is missing".into()))?;
        let started = crate::clock::monotonic_now();
        head.file.sync_data().map_err(|e| {
            StorageFailure::io(
                format!(
                    "fsync of {} failed",
                    self.dir.describe(&segment_name(head.id))
                ),
                e,
            )
        })?;
        metrics::histogram!(crate::metrics::STORAGE_FSYNC_DURATION_SECONDS)
            .record(started.elapsed().as_secs_f64());
        bump(&self.shared.counters.syncs, 1);
        self.synced = SyncedPos {
            segment: head.id,
            offset: head.len,
            batch: self.batch_seq,
        };
        self.synced_len = head.len;
        self.unsynced = false;
        self.last_sync = crate::clock::monotonic_now();
        Ok(())
    }

    /// Writes the manifest: the segments, `live` (the writer's segments unless given), and
    /// the synced position. `sync_dir`: durable before it returns (see [`Manifest::write`]).
    pub(super) fn write_manifest(
        &mut self,
        live: Option<Vec<u32>>,
        sync_dir: bool,
    ) -> Result<(), WriteFailure> {
        let manifest = self.next_manifest(live);
        match &self.manifests {
            Some(manifests) => {
                manifests.write_now(self.manifest_generation, &manifest, &*self.dir, sync_dir)?;
            }
            None => manifest.write(&*self.dir, sync_dir)?,
        }
        self.manifest = manifest;
        self.last_manifest = crate::clock::monotonic_now();
        Ok(())
    }

    /// The manifest of the log as it is now (`live`: the writer's segments unless given),
    /// numbered.
    fn next_manifest(&mut self, live: Option<Vec<u32>>) -> Manifest {
        let live = live.unwrap_or_else(|| self.segments.keys().copied().collect());
        self.manifest_generation += 1;
        manifest_for(
            &self.config,
            live,
            &self.retired,
            self.synced,
            &self.segments,
        )
    }

    /// Records the synced position: handed to the manifest thread when there is one (not on
    /// any commit's path, see `manifest_bg`), else written in line.
    pub(super) fn record_synced_position(&mut self) -> Result<(), WriteFailure> {
        if self.manifests.is_none() {
            return self.write_manifest(None, false);
        }
        let manifest = self.next_manifest(None);
        if let Some(manifests) = &self.manifests {
            manifests.submit(self.manifest_generation, manifest.clone());
        }
        self.manifest = manifest;
        self.last_manifest = crate::clock::monotonic_now();
        Ok(())
    }

    /// Seals the head and starts a new segment with a checkpoint.
    pub(super) fn rotate(&mut self) -> Result<(), WriteError> {
        self.sync_head().map_err(WriteError::Fatal)?;
        let (old_id, old_len, old_file) = {
            let head = self.segments.get(&self.head).ok_or_else(|| {
                WriteError::Fatal(StorageFailure::Internal(
                    "the head segment is missing".into(),
                ))
            })?;
            (head.id, head.len, Arc::clone(&head.file))
        };
        // Trim the preallocated zeros: only the newest segment may end in anything but a
        // record, which is how recovery tells a torn tail from damage.
        old_file.set_len(old_len).map_err(|e| {
            WriteError::Retry(StorageFailure::io(
                self.dir.describe(&segment_name(old_id)),
                e,
            ))
        })?;
        old_file.sync_all().map_err(|e| {
            WriteError::Fatal(StorageFailure::io(
                format!(
                    "fsync of {} failed",
                    self.dir.describe(&segment_name(old_id))
                ),
                e,
            ))
        })?;
        let id = old_id
            .checked_add(1)
            .ok_or(WriteError::Fatal(StorageFailure::Exhausted(
                "segment ids exhausted",
            )))?;
        self.model.lock().end_batch(&mut Accounting {
            segments: &mut self.segments,
            current: old_id,
        });
        // The manifest names the new segment as the log's before it exists (so that recovery
        // may remove it if its creation does not complete), and lists it before it is used (so
        // that recovery knows it holds acknowledged changes).
        let to_write = |f: WriteFailure| {
            if f.fatal {
                WriteError::Fatal(f.why)
            } else {
                WriteError::Retry(f.why)
            }
        };
        self.retired.insert(id);
        self.write_manifest(None, true).map_err(to_write)?;
        let spare = self.spares.take();
        let segment = create_segment(
            &*self.dir,
            id,
            &self.model.lock(),
            self.config.segment_bytes,
            spare,
        );
        // The next one is made while this segment fills (never while the rename is pending:
        // that is done).
        self.want_spare();
        let segment = segment?;
        let mut live: Vec<u32> = self.segments.keys().copied().collect();
        live.push(id);
        self.retired.remove(&id);
        if let Err(failure) = self.write_manifest(Some(live), true) {
            // Not listed: not used. It stays retired, so recovery may remove it.
            self.retired.insert(id);
            return Err(to_write(failure));
        }
        bump(&self.shared.counters.segments_created, 1);
        metrics::gauge!(crate::metrics::STORAGE_SEGMENTS).increment(1.0);
        if let Some(old) = self.segments.get_mut(&old_id) {
            old.sealed = true;
        }
        self.synced_len = segment.len;
        self.segments.insert(id, segment);
        self.head = id;
        self.unsynced = false;
        // The old head was cut to its data: nothing of a failed write is left.
        self.dirty = None;
        self.count_log_bytes();
        Ok(())
    }

    /// Asks for a spare segment (`spare`) when the disk budget has room for it and one more
    /// segment; removes the one there is when it has not.
    pub(super) fn want_spare(&mut self) {
        let budget = self.config.disk_bytes_max;
        let segment = self.config.segment_bytes;
        let without_spare = self.count_log_bytes();
        if budget == 0 || without_spare.saturating_add(segment.saturating_mul(2)) <= budget {
            self.spares.want();
        } else {
            self.spares.discard(&*self.dir);
        }
        self.shared.counters.log_bytes.store(
            without_spare + self.spares.disk_bytes(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Fatal: fail every commit, tell the server.
    pub(super) fn fail(&mut self, why: impl std::fmt::Display) {
        tracing::error!(%why, "the log stops");
        self.spares.stop(&*self.dir);
        self.erase_unacknowledged();
        let error = StorageError(StorageFailure::Stopped {
            why: why.to_string(),
        });
        *self.shared.fatal_error.lock() = Some(error.clone());
        self.shared
            .refusing
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared.fatal.cancel();
        metrics::gauge!(crate::metrics::STORAGE_WRITABLE).set(0.0);
        let mut inbox = self.shared.inbox.lock();
        inbox.closed = true;
        for mut append in inbox.take() {
            append.answer(Err(error.clone()));
        }
        for waiter in inbox.in_flight.take().into_iter().flatten() {
            let _ = waiter.send(Err(error.clone()));
        }
        self.stopped = true;
    }

    /// On stopping with `fsync = always`: overwrites with zeros what was written to the head
    /// after its last completed sync (never acknowledged), and what a failed write left, so
    /// that a restart does not bring back changes answered with an error. Best effort: it
    /// cannot be synced (module docs, "Failure"). In the other modes written means
    /// acknowledged, and only a failed write's bytes are erased.
    pub(super) fn erase_unacknowledged(&mut self) {
        if self.config.fsync == FsyncMode::Always {
            if let Some(head) = self.segments.get(&self.head) {
                if head.len > self.synced_len {
                    let (from, to) = (self.synced_len, head.len);
                    self.dirty = Some(match self.dirty {
                        Some((f, t)) => (f.min(from), t.max(to)),
                        None => (from, to),
                    });
                }
            }
        }
        let erased = self.erase_dirty().and_then(|()| {
            // A writeback error is reported once: this sync may well make the zeros durable.
            match self.segments.get(&self.head) {
                Some(head) if self.unsynced => head
                    .file
                    .sync_data()
                    .map_err(|e| StorageFailure::io("cannot sync the erased tail", e)),
                _ => Ok(()),
            }
        });
        if let Err(error) = erased {
            tracing::error!(%error, "what was written but not acknowledged may come back after a restart");
        }
    }
}
