//! Spare segments: the next segment's file, written with zeros and synced ahead of time, so
//! that the writer's syncs do not also write file system metadata.
//!
//! A segment made with `fallocate` has its blocks reserved but *unwritten*: the first write to
//! each block converts its extent, so every `fdatasync` after a commit also writes the inode's
//! extent tree before the cache flush (on ext4 `ext4_write_inode` and a second device write per
//! sync). A file whose blocks were all written once, with zeros, needs only the data and the
//! flush. Measured on this project's 2-core VM with `cmq-bench --workload w2` (fsync always),
//! zero-filled segments against preallocated ones: mean fsync 46 us against 61 us and 255k
//! against 212k messages per second in one pair; 3 more pairs 245-286k against 230-235k. A dd of
//! 2 GiB with `O_DIRECT` moved 4.2 GB/s over written blocks and 1.9 GB/s over new ones. This
//! is what PostgreSQL's `wal_init_zero` does for its WAL segments.
//!
//! Writing 64 MiB of zeros takes tens of milliseconds, which no commit may wait for: a thread
//! (`cmqd-log-spare`) keeps one spare ready. The writer takes it when it starts a new segment
//! and renames it into place ([`create_segment`](super::segment::create_segment)); when none
//! is ready (the thread fell behind, it failed, or the disk budget leaves no room for one), the
//! segment is preallocated as before. The writer never waits for the thread.
//!
//! A spare is named `spare-<n>.tmp`, a name no segment has, and is not part of the log until
//! the rename: recovery removes any spare it finds (a crash may leave one, or one half
//! written). A spare takes a segment's disk space, counted in the log's bytes
//! (`cmq_storage_disk_bytes`, `storage.disk_bytes_max`); none is prepared unless the budget has
//! room for it and one more segment, and one that no longer fits is removed.
//!
//! Recovery makes the segment it starts the same way, in line (tens of milliseconds at
//! start-up), so that a fresh broker's first segment does not sync metadata either.
//!
//! In manual mode (deterministic tests) the spare is prepared in line when the writer asks for
//! one, so that the power-loss tests crash in the middle of preparing and renaming it too.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::storage::fs::{LogDir, LogFile, DIRECT_ALIGN};

/// Bytes of zeros written per write: small, so that a commit's write queued behind one waits
/// little (about 0.1 ms on the 2-core box's disk).
const ZERO_CHUNK_BYTES: usize = 256 * 1024;

/// How often the thread looks at the writer's progress while it keeps pace, and the longest it
/// waits when the writer writes nothing (an idle broker with a spare under way).
const PACE_POLL: Duration = Duration::from_millis(10);
const PACE_POLL_IDLE: Duration = Duration::from_millis(500);

/// How long after a failed preparation the thread tries again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Whether `name` is a spare's (recovery removes them).
pub(super) fn is_spare_name(name: &str) -> bool {
    name.strip_prefix("spare-")
        .and_then(|rest| rest.strip_suffix(".tmp"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn spare_name(n: u64) -> String {
    format!("spare-{n}.tmp")
}

/// A spare ready to become a segment: its name and its open file.
#[derive(Debug)]
pub(super) struct Spare {
    pub(super) name: String,
    pub(super) file: Arc<dyn LogFile>,
}

/// Creates `name` and fills its first `bytes` with zeros, synced (at the pace `pace` allows:
/// see [`Pace`]). Removes what it made when that fails or is given up.
fn prepare(
    dir: &dyn LogDir,
    name: String,
    bytes: u64,
    pace: &mut dyn FnMut(u64) -> bool,
) -> std::io::Result<Spare> {
    let file = dir.create(&name)?;
    let filled = fill_with_zeros(&*file, bytes, pace).and_then(|()| file.sync_all());
    match filled {
        Ok(()) => Ok(Spare { name, file }),
        Err(error) => {
            let _ = dir.remove(&name);
            Err(error)
        }
    }
}

/// Writes zeros over the first `bytes` of `file`; before each write, `pace(offset)` waits
/// until that part is due, or returns false to give up.
fn fill_with_zeros(
    file: &dyn LogFile,
    bytes: u64,
    pace: &mut dyn FnMut(u64) -> bool,
) -> std::io::Result<()> {
    // Aligned for direct writes, which keep 64 MiB of zeros out of the page cache.
    let chunk = ZERO_CHUNK_BYTES.min(usize::try_from(bytes).unwrap_or(usize::MAX));
    let mut buf = vec![0u8; chunk + DIRECT_ALIGN];
    let lead = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    let zeros = &mut buf[lead..lead + chunk];
    let mut at = 0u64;
    while at < bytes {
        if !pace(at) {
            return Err(std::io::Error::other(
                "given up: the log stops or has no room",
            ));
        }
        let n = usize::try_from(bytes - at).map_or(chunk, |left| left.min(chunk));
        file.write_direct_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The thread's pace: zeros at offset `at` of the spare are written once the writer has
/// written `at / 2` bytes since the spare was asked for. So the spare is ready when the head
/// is half full, and its writes are spread over the head's filling instead of taking the disk
/// for tens of milliseconds at once: unpaced, W3 (5,000 sends a second, fsync always) saw
/// p99 of 0.64-0.97 ms in the runs where the spare was written during the run, against 0.51-0.55 ms.
/// A writer that fills segments faster than zeros can be written gets no pacing at all.
struct Pace<'a> {
    written: &'a (dyn Fn() -> u64 + Send + Sync),
    from: u64,
    slot: &'a Slot,
}

impl Pace<'_> {
    /// Waits until offset `at` is due; false when the spare is no longer wanted.
    fn wait_for(&self, at: u64) -> bool {
        let mut poll = PACE_POLL;
        let mut last = (self.written)();
        loop {
            {
                let state = self.slot.state.lock();
                if state.closed || !state.wanted {
                    return false;
                }
            }
            let written = (self.written)();
            if written.saturating_sub(self.from).saturating_mul(2) >= at {
                return true;
            }
            poll = if written == last {
                (poll * 2).min(PACE_POLL_IDLE)
            } else {
                PACE_POLL
            };
            last = written;
            let mut state = self.slot.state.lock();
            if !state.closed {
                self.slot.wake.wait_for(&mut state, poll);
            }
        }
    }
}

/// A spare made now, on the caller's thread, for the segment recovery starts (so that the
/// first segment of a run is written-with-zeros too); `None` (logged) when it cannot be made.
pub(super) fn make_now(dir: &dyn LogDir, bytes: u64) -> Option<Spare> {
    match prepare(dir, spare_name(0), bytes, &mut |_| true) {
        Ok(spare) => Some(spare),
        Err(error) => {
            tracing::warn!(%error, "cannot prepare a spare segment; the new segment is preallocated");
            None
        }
    }
}

/// Keeps a spare segment ready: see the module documentation.
#[derive(Debug)]
pub(super) struct Spares {
    mode: Mode,
    /// Size of a spare: the segment size.
    bytes: u64,
}

#[derive(Debug)]
enum Mode {
    /// No spares: every segment is preallocated.
    Off,
    /// Prepared in line by [`Spares::want`] (manual mode).
    Inline {
        dir: Arc<dyn LogDir>,
        ready: Option<Spare>,
        next: u64,
    },
    /// Prepared by a thread.
    Thread {
        slot: Arc<Slot>,
        thread: Option<JoinHandle<()>>,
    },
}

#[derive(Debug, Default)]
struct Slot {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The writer wants a spare made.
    wanted: bool,
    /// One is being made (its bytes count as the log's).
    making: bool,
    ready: Option<Spare>,
    /// Not before this after a failure.
    retry_at: Option<Instant>,
    closed: bool,
}

impl Spares {
    /// No spares.
    pub(super) fn off() -> Self {
        Self {
            mode: Mode::Off,
            bytes: 0,
        }
    }

    /// Spares of `bytes`, prepared in line.
    pub(super) fn inline(dir: Arc<dyn LogDir>, bytes: u64) -> Self {
        Self {
            mode: Mode::Inline {
                dir,
                ready: None,
                next: 0,
            },
            bytes,
        }
    }

    /// Spares of `bytes`, prepared by a thread of their own at the pace of `written` (the
    /// bytes the writer has written so far, see [`Pace`]); [`Spares::off`] if it cannot be
    /// started.
    pub(super) fn threaded(
        dir: Arc<dyn LogDir>,
        bytes: u64,
        written: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Self {
        let slot = Arc::new(Slot::default());
        let spawned = {
            let slot = Arc::clone(&slot);
            std::thread::Builder::new()
                .name("cmqd-log-spare".into())
                .spawn(move || run(&slot, &*dir, bytes, &*written))
        };
        match spawned {
            Ok(thread) => Self {
                mode: Mode::Thread {
                    slot,
                    thread: Some(thread),
                },
                bytes,
            },
            Err(error) => {
                tracing::warn!(%error, "cannot start the spare segment thread; segments are preallocated");
                Self::off()
            }
        }
    }

    /// Asks for a spare to be made if none is ready or being made.
    pub(super) fn want(&mut self) {
        match &mut self.mode {
            Mode::Off => {}
            Mode::Inline { dir, ready, next } => {
                if ready.is_none() {
                    *next += 1;
                    match prepare(&**dir, spare_name(*next), self.bytes, &mut |_| true) {
                        Ok(spare) => *ready = Some(spare),
                        Err(error) => {
                            tracing::warn!(%error, "cannot prepare a spare segment; the next segment is preallocated");
                        }
                    }
                }
            }
            Mode::Thread { slot, .. } => {
                let mut state = slot.state.lock();
                if state.ready.is_none() && !state.making && !state.wanted {
                    state.wanted = true;
                    drop(state);
                    slot.wake.notify_one();
                }
            }
        }
    }

    /// The ready spare, if there is one: the caller renames it into place (or removes it).
    pub(super) fn take(&mut self) -> Option<Spare> {
        match &mut self.mode {
            Mode::Off => None,
            Mode::Inline { ready, .. } => ready.take(),
            Mode::Thread { slot, .. } => slot.state.lock().ready.take(),
        }
    }

    /// Removes the ready spare and stops one being made (the disk budget has no room for it).
    pub(super) fn discard(&mut self, dir: &dyn LogDir) {
        let spare = match &mut self.mode {
            Mode::Off => None,
            Mode::Inline { ready, .. } => ready.take(),
            Mode::Thread { slot, .. } => {
                let mut state = slot.state.lock();
                state.wanted = false;
                state.ready.take()
            }
        };
        if let Some(spare) = spare {
            remove(dir, &spare.name);
        }
    }

    /// Disk bytes the spare takes (ready or being made).
    pub(super) fn disk_bytes(&self) -> u64 {
        let held = match &self.mode {
            Mode::Off => false,
            Mode::Inline { ready, .. } => ready.is_some(),
            Mode::Thread { slot, .. } => {
                let state = slot.state.lock();
                state.making || state.ready.is_some()
            }
        };
        if held {
            self.bytes
        } else {
            0
        }
    }

    /// Stops the thread and removes the spare: a stopped log leaves none behind.
    pub(super) fn stop(&mut self, dir: &dyn LogDir) {
        if let Mode::Thread { slot, thread } = &mut self.mode {
            slot.state.lock().closed = true;
            slot.wake.notify_all();
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
        self.discard(dir);
        self.mode = Mode::Off;
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        // The thread ends when told to; a spare left behind is removed by the next recovery.
        if let Mode::Thread { slot, .. } = &self.mode {
            slot.state.lock().closed = true;
            slot.wake.notify_all();
        }
    }
}

fn remove(dir: &dyn LogDir, name: &str) {
    if let Err(error) = dir.remove(name) {
        tracing::warn!(file = %dir.describe(name), %error, "cannot remove a spare segment; the next start removes it");
    }
}

fn run(slot: &Slot, dir: &dyn LogDir, bytes: u64, written: &(dyn Fn() -> u64 + Send + Sync)) {
    let mut next = 0u64;
    loop {
        {
            let mut state = slot.state.lock();
            loop {
                if state.closed {
                    if let Some(spare) = state.ready.take() {
                        remove(dir, &spare.name);
                    }
                    return;
                }
                let due = state
                    .retry_at
                    .is_none_or(|at| crate::clock::monotonic_now() >= at);
                if state.wanted && state.ready.is_none() && due {
                    break;
                }
                match state.retry_at.filter(|_| state.wanted) {
                    Some(at) => {
                        slot.wake.wait_until(&mut state, at);
                    }
                    None => slot.wake.wait(&mut state),
                }
            }
            state.making = true;
        }
        next += 1;
        let pace = Pace {
            written,
            from: written(),
            slot,
        };
        let made = prepare(dir, spare_name(next), bytes, &mut |at| pace.wait_for(at));
        let mut state = slot.state.lock();
        state.making = false;
        match made {
            Ok(spare) if state.wanted => {
                state.wanted = false;
                state.retry_at = None;
                state.ready = Some(spare);
            }
            // Discarded while it was being made.
            Ok(spare) => remove(dir, &spare.name),
            // Given up (discarded, or the log stops): removed already.
            Err(_) if state.closed || !state.wanted => {}
            Err(error) => {
                if state.retry_at.is_none() {
                    tracing::warn!(
                        file = %dir.describe(&spare_name(next)),
                        %error,
                        "cannot prepare a spare segment; new segments are preallocated until one can be"
                    );
                }
                state.retry_at = Some(crate::clock::monotonic_now() + RETRY_AFTER);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sim::SimDisk;

    #[test]
    fn spare_names_are_told_apart_from_segments() {
        assert!(is_spare_name("spare-1.tmp"));
        assert!(is_spare_name(&spare_name(u64::MAX)));
        assert!(!is_spare_name("spare-.tmp"));
        assert!(!is_spare_name("spare-1x.tmp"));
        assert!(!is_spare_name("00000000000000000001.seg"));
        assert!(super::super::parse_segment_name(&spare_name(7)).is_none());
    }

    #[test]
    fn an_inline_spare_is_zeros_synced_and_taken_once() {
        let disk = SimDisk::new();
        let dir: Arc<dyn LogDir> = Arc::new(disk.clone());
        let mut spares = Spares::inline(Arc::clone(&dir), 3 * 4096 + 100);
        assert_eq!(spares.disk_bytes(), 0);
        spares.want();
        assert_eq!(spares.disk_bytes(), 3 * 4096 + 100);
        let spare = spares.take().expect("a spare");
        assert!(spares.take().is_none(), "taken once");
        assert_eq!(spare.file.size().unwrap(), 3 * 4096 + 100);
        let mut bytes = vec![1u8; 3 * 4096 + 100];
        spare.file.read_at(&mut bytes, 0).unwrap();
        assert!(bytes.iter().all(|&b| b == 0));
        assert_eq!(dir.list().unwrap(), vec![spare.name.clone()]);
    }

    #[test]
    fn a_discarded_or_stopped_spare_leaves_no_file() {
        let disk = SimDisk::new();
        let dir: Arc<dyn LogDir> = Arc::new(disk.clone());
        let mut spares = Spares::inline(Arc::clone(&dir), 8192);
        spares.want();
        spares.discard(&*dir);
        assert!(dir.list().unwrap().is_empty());
        assert_eq!(spares.disk_bytes(), 0);
        spares.want();
        spares.stop(&*dir);
        assert!(dir.list().unwrap().is_empty());
    }

    #[test]
    fn the_thread_prepares_one_spare_at_a_time_and_removes_it_when_stopped() {
        let disk = SimDisk::new();
        let dir: Arc<dyn LogDir> = Arc::new(disk.clone());
        // The writer has written plenty: no pacing.
        let mut spares = Spares::threaded(Arc::clone(&dir), 8192, Arc::new(|| u64::MAX / 4));
        spares.want();
        // The thread's work is bounded; wait for its result, not for a time.
        let deadline = crate::clock::monotonic_now() + Duration::from_secs(30);
        let spare = loop {
            if let Some(spare) = spares.take() {
                break spare;
            }
            assert!(
                crate::clock::monotonic_now() < deadline,
                "no spare was prepared"
            );
            std::thread::yield_now();
        };
        assert_eq!(spare.file.size().unwrap(), 8192);
        spares.want();
        let deadline = crate::clock::monotonic_now() + Duration::from_secs(30);
        while dir.list().unwrap().len() < 2 || spares.disk_bytes() == 0 {
            assert!(crate::clock::monotonic_now() < deadline, "no second spare");
            std::thread::yield_now();
        }
        spares.stop(&*dir);
        // Only the first (taken, never renamed here) is left.
        assert_eq!(dir.list().unwrap(), vec![spare.name]);
    }

    #[test]
    fn zeros_are_written_at_half_the_pace_of_the_writer_and_given_up_when_not_wanted() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let slot = Slot::default();
        slot.state.lock().wanted = true;
        let written = Arc::new(AtomicU64::new(1_000));
        let counter = Arc::clone(&written);
        let read = move || counter.load(Ordering::Relaxed);
        let pace = Pace {
            written: &read,
            from: 1_000,
            slot: &slot,
        };
        // Nothing written since: only offset 0 is due.
        assert!(pace.wait_for(0));
        written.store(1_000 + 300 * 1024, Ordering::Relaxed);
        assert!(
            pace.wait_for(600 * 1024),
            "due: twice what the writer wrote"
        );
        // Not due, and no longer wanted (discarded, or the log stops): given up, not waited.
        slot.state.lock().wanted = false;
        assert!(!pace.wait_for(601 * 1024));
        // The fill asks for each chunk's offset in turn and stops at the first refusal,
        // leaving no file.
        let disk = SimDisk::new();
        let dir: Arc<dyn LogDir> = Arc::new(disk.clone());
        let mut asked = Vec::new();
        let bytes = 3 * ZERO_CHUNK_BYTES as u64;
        let refused = prepare(&*dir, spare_name(1), bytes, &mut |at| {
            asked.push(at);
            at < 2 * ZERO_CHUNK_BYTES as u64
        });
        assert!(refused.is_err());
        assert_eq!(
            asked,
            vec![0, ZERO_CHUNK_BYTES as u64, 2 * ZERO_CHUNK_BYTES as u64]
        );
        assert!(dir.list().unwrap().is_empty());
    }
}
