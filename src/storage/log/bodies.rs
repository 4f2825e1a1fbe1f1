//! [`LogBodies`]: message bodies read back from the log for an engine that dropped them from
//! memory (`engine::bodies`).
//!
//! The writer's model knows where each stored message's body was recorded (its send, or the
//! copy a compaction made). A read looks that up under the model's lock (held by the writer
//! only while it applies a batch), then reads outside every lock: a window of
//! [`READ_AHEAD_BYTES`] from the record on, kept in a small cache of windows, so that draining
//! a backlog reads each segment sequentially in large reads instead of one read per message.
//! Each record read is checked (framing, CRC32C, the size the model recorded) before its body
//! is handed out; a record that fails is read again from the file (a cached window can hold
//! bytes of the newest segment from before they were written), and if it fails there too the
//! read fails naming file and offset. A segment deleted between the lookup and the read (a
//! compaction moved the body, or the message was deleted) is looked up again.

use super::*;

use crate::engine::BodySource;
use crate::limits::storage::{READ_AHEAD_BYTES, READ_AHEAD_WINDOWS};

/// Reads bodies back from the log. See the module documentation.
#[derive(Debug)]
pub(crate) struct LogBodies {
    pub(super) model: Arc<Mutex<Replay<Loc>>>,
    dir: Arc<dyn LogDir>,
    /// Recently read windows, most recent last.
    windows: Mutex<Vec<CachedWindow>>,
}

/// Bytes of one segment from `base` on.
#[derive(Debug)]
struct CachedWindow {
    seg: u32,
    base: u64,
    bytes: Bytes,
}

impl CachedWindow {
    fn covers(&self, loc: Loc) -> bool {
        let start = u64::from(loc.off);
        self.seg == loc.seg
            && start >= self.base
            && start + u64::from(loc.len) <= self.base + self.bytes.len() as u64
    }
}

/// Why a record could not be used.
enum Miss {
    /// The segment is gone: the body moved or the message went; look it up again.
    Gone,
    /// The record at the location is not the one recorded there.
    Bad(String),
    /// The file could not be read.
    Io(std::io::Error),
}

impl LogBodies {
    pub(super) fn new(model: Arc<Mutex<Replay<Loc>>>, dir: Arc<dyn LogDir>) -> Self {
        Self {
            model,
            dir,
            windows: Mutex::new(Vec::new()),
        }
    }

    /// Where the body of `msg_id` is: in queue `queue_id`, or (moving between queues, its
    /// record not written yet) in any queue.
    fn locate(&self, queue_id: u64, msg_id: u64) -> Option<Loc> {
        let model = self.model.lock();
        if let Some(stored) = model.message(queue_id, msg_id) {
            return Some(stored.origin);
        }
        model.find_message(msg_id).map(|stored| stored.origin)
    }

    /// The body in `bytes` (the record at `loc`, the window starting at `base`).
    fn body_of(bytes: &Bytes, base: u64, loc: Loc) -> Result<Bytes, String> {
        let start = usize::try_from(u64::from(loc.off) - base).unwrap_or(usize::MAX);
        let end = start.saturating_add(loc.len as usize);
        let Some(record) = bytes.get(start..end) else {
            return Err("the record is cut short".into());
        };
        match read_frame(record) {
            Ok(Some(frame)) if frame.size == loc.len as usize => {
                let body = body_in(&frame).map_err(|e| e.to_string())?;
                let at = body.as_ptr() as usize - bytes.as_ptr() as usize;
                Ok(bytes.slice(at..at + body.len()))
            }
            Ok(_) => Err("not the record the log wrote there".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn cached(&self, loc: Loc) -> Option<Result<Bytes, String>> {
        // The checksum is computed outside the lock (a clone of `Bytes` is a reference count).
        let (bytes, base) = {
            let windows = self.windows.lock();
            let window = windows.iter().rev().find(|w| w.covers(loc))?;
            (window.bytes.clone(), window.base)
        };
        Some(Self::body_of(&bytes, base, loc))
    }

    fn forget(&self, loc: Loc) {
        self.windows.lock().retain(|w| !w.covers(loc));
    }

    /// Reads the window holding the record at `loc` from its segment, caches it, and returns
    /// the body.
    fn read_window(&self, loc: Loc) -> Result<Bytes, Miss> {
        let file = match self.dir.open(&segment_name(loc.seg)) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Miss::Gone),
            Err(e) => return Err(Miss::Io(e)),
        };
        let size = file.size().map_err(Miss::Io)?;
        let base = u64::from(loc.off);
        let want = (loc.len as usize).max(READ_AHEAD_BYTES) as u64;
        let len = want.min(size.saturating_sub(base));
        if len < u64::from(loc.len) {
            return Err(Miss::Bad(format!(
                "the segment ends at {size}, inside the record"
            )));
        }
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        file.read_at(&mut buf, base).map_err(Miss::Io)?;
        let bytes = Bytes::from(buf);
        let body = Self::body_of(&bytes, base, loc).map_err(Miss::Bad)?;
        let mut windows = self.windows.lock();
        if windows.len() >= READ_AHEAD_WINDOWS {
            windows.remove(0);
        }
        windows.push(CachedWindow {
            seg: loc.seg,
            base,
            bytes,
        });
        Ok(body)
    }

    /// Bytes of windows cached now.
    pub(crate) fn cached_bytes(&self) -> u64 {
        self.windows
            .lock()
            .iter()
            .map(|w| w.bytes.len() as u64)
            .sum()
    }
}

impl BodySource for LogBodies {
    fn read(&self, queue_id: u64, msg_id: u64) -> Result<Option<Bytes>, String> {
        // A location can go stale once (a compaction moved the body and deleted the segment
        // between the lookup and the read); more than a few times in a row is not a race.
        for _ in 0..4 {
            let Some(loc) = self.locate(queue_id, msg_id) else {
                return Ok(None);
            };
            match self.cached(loc) {
                Some(Ok(body)) => return Ok(Some(body)),
                Some(Err(_)) => self.forget(loc),
                None => {}
            }
            match self.read_window(loc) {
                Ok(body) => return Ok(Some(body)),
                Err(Miss::Gone) => continue,
                Err(miss) => {
                    if self.locate(queue_id, msg_id) != Some(loc) {
                        // Moved or deleted meanwhile: what was read is no longer its body.
                        continue;
                    }
                    let file = self.dir.describe(&segment_name(loc.seg));
                    return Err(match miss {
                        Miss::Bad(why) => {
                            format!("{file} at offset {}: {why} (message {msg_id})", loc.off)
                        }
                        Miss::Io(e) => format!("cannot read {file} at offset {}: {e}", loc.off),
                        Miss::Gone => unreachable_gone(),
                    });
                }
            }
        }
        Err(format!(
            "message {msg_id}: its body kept moving while it was read"
        ))
    }

    fn readable(&self, queue_id: u64, ids: &[u64], out: &mut Vec<u64>) -> u64 {
        let model = self.model.lock();
        let mut first_missing = u64::MAX;
        for &id in ids {
            if model.message(queue_id, id).is_some() {
                out.push(id);
            } else if first_missing == u64::MAX {
                first_missing = id;
            }
        }
        first_missing
    }
}

/// `Miss::Gone` is handled before the error is built.
fn unreachable_gone() -> String {
    "the segment is gone".into()
}
