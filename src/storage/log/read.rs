//! How recovery reads segments: a window over each file, bodies copied into shared chunks,
//! and the reader that finds records, torn tails and damage.

use super::*;
pub(super) use crate::limits::storage::BODY_CHUNK_BYTES;
pub(super) use crate::limits::storage::READ_AHEAD_CHUNKS;
pub(super) use crate::limits::storage::READ_CHUNK_BYTES;
pub(super) use crate::limits::storage::READ_WINDOW_BYTES;

/// Bodies larger than this get an allocation of their own (a chunk wastes at most this much
/// at its end).
pub(super) const BODY_CHUNK_SHARE_MAX: usize = BODY_CHUNK_BYTES / 16;

/// A window on one segment file, for reading it front to back (or at increasing offsets).
#[derive(Debug, Default)]
pub(super) struct Window {
    pub(super) buf: Vec<u8>,
    /// File offset of `buf[0]`.
    pub(super) base: u64,
    /// Bytes of `buf` holding file data.
    pub(super) filled: usize,
}

impl Window {
    /// Forgets what it holds (the next read is of another file).
    pub(super) fn forget(&mut self) {
        self.base = 0;
        self.filled = 0;
    }

    /// The bytes of `file` (`len` bytes long) from `at` on: at least `want` of them, fewer only
    /// when the file ends first (as a buffer of the whole file would give them).
    pub(super) fn get(
        &mut self,
        file: &dyn LogFile,
        len: u64,
        at: u64,
        want: usize,
    ) -> std::io::Result<&[u8]> {
        let end = at.saturating_add(want as u64).min(len);
        let held_end = self.base + self.filled as u64;
        if at < self.base || at > held_end || end > held_end {
            let rest = len.saturating_sub(at);
            let n = usize::try_from(rest.min(want.max(READ_WINDOW_BYTES) as u64))
                .unwrap_or(READ_WINDOW_BYTES);
            if self.buf.len() < n {
                self.buf.resize(n, 0);
            }
            file.read_at(&mut self.buf[..n], at)?;
            self.base = at;
            self.filled = n;
        }
        // `base <= at <= base + filled` here.
        let from = usize::try_from(at - self.base).unwrap_or(self.filled);
        Ok(&self.buf[from.min(self.filled)..self.filled])
    }

    /// The bytes of the record at `at` (what [`read_frame`] needs to judge it: the header, then
    /// as much as its length says, within [`record::RECORD_BYTES_MAX`]).
    pub(super) fn record(
        &mut self,
        file: &dyn LogFile,
        len: u64,
        at: u64,
    ) -> std::io::Result<&[u8]> {
        let head = self.get(file, len, at, record::RECORD_HEADER_BYTES)?;
        let want = match head.get(0..4) {
            Some(word) => {
                let mut field = [0u8; 4];
                field.copy_from_slice(word);
                let payload = (u32::from_le_bytes(field) as usize).min(record::RECORD_BYTES_MAX);
                record::RECORD_HEADER_BYTES + payload
            }
            None => record::RECORD_HEADER_BYTES,
        };
        self.get(file, len, at, want)
    }

    /// The offset of the first byte that is not zero from `at` to the end of the file, if any.
    pub(super) fn first_nonzero(
        &mut self,
        file: &dyn LogFile,
        len: u64,
        mut at: u64,
    ) -> std::io::Result<Option<u64>> {
        while at < len {
            let bytes = self.get(file, len, at, READ_WINDOW_BYTES)?;
            if bytes.is_empty() {
                break;
            }
            if let Some(i) = bytes.iter().position(|&b| b != 0) {
                return Ok(Some(at + i as u64));
            }
            at += bytes.len() as u64;
        }
        Ok(None)
    }
}

/// Where recovered bodies are copied: see [`BODY_CHUNK_BYTES`].
#[derive(Debug, Default)]
pub(super) struct Arena {
    /// The chunks, and bodies too large to share one; the one being filled is empty here until
    /// it is sealed.
    pub(super) chunks: Vec<Bytes>,
    /// The chunk being filled, and its index in `chunks`.
    pub(super) filling: Vec<u8>,
    pub(super) filling_index: u32,
}

/// A body in an [`Arena`]: 12 bytes where a `Bytes` takes 32 (a recovery holds one per
/// message until the engine takes them).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BodyRef {
    pub(super) chunk: u32,
    pub(super) off: u32,
    pub(super) len: u32,
}

impl Arena {
    /// Copies `body` in.
    pub(super) fn copy(&mut self, body: &[u8]) -> Result<BodyRef, StorageError> {
        let len = u32::try_from(body.len())
            .map_err(|_| StorageError(StorageFailure::Exhausted("a body too large to recover")))?;
        if body.len() > BODY_CHUNK_SHARE_MAX {
            let chunk = self.push(Bytes::copy_from_slice(body))?;
            return Ok(BodyRef { chunk, off: 0, len });
        }
        if self.filling.capacity() - self.filling.len() < body.len() {
            self.seal();
            self.filling = Vec::with_capacity(BODY_CHUNK_BYTES);
            self.filling_index = self.push(Bytes::new())?;
        }
        let off = u32::try_from(self.filling.len()).unwrap_or(u32::MAX);
        self.filling.extend_from_slice(body);
        Ok(BodyRef {
            chunk: self.filling_index,
            off,
            len,
        })
    }

    /// Adds a chunk; returns its index.
    pub(super) fn push(&mut self, chunk: Bytes) -> Result<u32, StorageError> {
        let index = u32::try_from(self.chunks.len())
            .map_err(|_| StorageError(StorageFailure::Exhausted("too many bodies to recover")))?;
        self.chunks.push(chunk);
        Ok(index)
    }

    /// Ends the chunk being filled: it takes its place in `chunks`.
    pub(super) fn seal(&mut self) {
        if !self.filling.is_empty() {
            let full = Bytes::from(std::mem::take(&mut self.filling));
            if let Some(slot) = self.chunks.get_mut(self.filling_index as usize) {
                *slot = full;
            }
        }
    }

    /// The chunks, with the last one sealed.
    pub(super) fn finish(mut self) -> Vec<Bytes> {
        self.seal();
        self.chunks
    }
}

/// The body `at` refers to, a slice of its chunk (empty if `at` is not one of `chunks`, which
/// recovery never makes).
pub(super) fn body_at(chunks: &[Bytes], at: BodyRef) -> Bytes {
    let (off, len) = (at.off as usize, at.len as usize);
    chunks
        .get(at.chunk as usize)
        .filter(|chunk| off + len <= chunk.len())
        .map(|chunk| chunk.slice(off..off + len))
        .unwrap_or_default()
}

/// What recovery's reading finds, in log order.
pub(super) enum Read {
    /// A segment whose header and checkpoint are sound; its records follow.
    Segment {
        id: u32,
        file: Arc<dyn LogFile>,
        len: u64,
        /// Where its records start (after the checkpoint).
        first: u64,
        checkpoint: Checkpoint,
        newest: bool,
    },
    /// The newest segment, whose creation never completed: to remove.
    Discard(u32),
    /// Whole records of the current segment, framing and checksums checked: `buf[..end]`,
    /// the first at file offset `base`.
    Records { buf: Vec<u8>, base: u64, end: usize },
    /// The end of the current segment's records, and why they end before the file does (the
    /// newest segment only: damage anywhere else is an error).
    End { at: u64, torn: Option<String> },
}

pub(super) fn cannot_read(dir: &dyn LogDir, id: u32, e: std::io::Error) -> StorageError {
    StorageError(StorageFailure::io(
        format!("cannot read {}", dir.describe(&segment_name(id))),
        e,
    ))
}

/// The segment a [`SegmentReader`] is in.
pub(super) struct Reading {
    pub(super) id: u32,
    pub(super) file: Arc<dyn LogFile>,
    pub(super) len: u64,
    /// Where the next record is.
    pub(super) at: u64,
    pub(super) newest: bool,
}

/// Recovery's reading, on a thread of its own: each segment in turn, headers, checkpoints,
/// framing and checksums checked, records handed on in chunks for the replay to decode.
pub(super) struct SegmentReader<'a> {
    pub(super) dir: &'a dyn LogDir,
    pub(super) ids: &'a [u32],
    /// Index in `ids` of the next segment to open.
    pub(super) next: usize,
    pub(super) names: Names,
    /// For headers, checkpoints and the zeros after the end.
    pub(super) window: Window,
    pub(super) current: Option<Reading>,
    /// An `End` found with the last chunk, handed on after it.
    pub(super) end: Option<Read>,
    /// Buffers the replay is done with.
    pub(super) spare: std::sync::mpsc::Receiver<Vec<u8>>,
    /// A log without a manifest (written by an earlier version): a newest segment whose header
    /// or checkpoint does not validate is taken for one whose creation never completed. With a
    /// manifest, such a segment is never listed, so a listed one is damaged.
    pub(super) discard_ok: bool,
}

impl<'a> SegmentReader<'a> {
    pub(super) fn new(
        dir: &'a dyn LogDir,
        ids: &'a [u32],
        spare: std::sync::mpsc::Receiver<Vec<u8>>,
        discard_ok: bool,
    ) -> Self {
        Self {
            discard_ok,
            dir,
            ids,
            next: 0,
            names: Names::default(),
            window: Window::default(),
            current: None,
            end: None,
            spare,
        }
    }

    /// Hands everything it reads to `found`, until the end, an error, or `found` returns false.
    pub(super) fn run(&mut self, found: &mut dyn FnMut(Result<Read, StorageError>) -> bool) {
        loop {
            match self.next() {
                Ok(Some(read)) => {
                    if !found(Ok(read)) {
                        return;
                    }
                }
                Ok(None) => return,
                Err(error) => {
                    found(Err(error));
                    return;
                }
            }
        }
    }

    pub(super) fn next(&mut self) -> Result<Option<Read>, StorageError> {
        if let Some(end) = self.end.take() {
            return Ok(Some(end));
        }
        if self.current.is_some() {
            return self.chunk().map(Some);
        }
        let Some(&id) = self.ids.get(self.next) else {
            return Ok(None);
        };
        self.next += 1;
        let newest = self.next == self.ids.len();
        self.open(id, newest).map(Some)
    }

    /// Checks the header and checkpoint of segment `id`.
    pub(super) fn open(&mut self, id: u32, newest: bool) -> Result<Read, StorageError> {
        let dir = self.dir;
        let name = segment_name(id);
        let file = dir.open(&name).map_err(|e| {
            StorageError(StorageFailure::io(
                format!("cannot open {}", dir.describe(&name)),
                e,
            ))
        })?;
        let len = file.size().map_err(|e| cannot_read(dir, id, e))?;
        self.window.forget();
        // A header or checkpoint that is not all there: a crash while the segment was created
        // (they are synced before the first batch). Only possible for the newest.
        let header = self
            .window
            .get(&*file, len, 0, SEGMENT_HEADER_BYTES)
            .map_err(|e| cannot_read(dir, id, e))?;
        let start = match check_segment_header(header) {
            Ok(found) if found == u64::from(id) => SEGMENT_HEADER_BYTES,
            Ok(found) => {
                return Err(corrupt(
                    dir,
                    id,
                    12,
                    format!("header names segment {found}"),
                ))
            }
            Err(_) if newest && self.discard_ok => return Ok(Read::Discard(id)),
            Err(why) => return Err(corrupt(dir, id, 0, why)),
        };
        let bytes = self
            .window
            .record(&*file, len, start as u64)
            .map_err(|e| cannot_read(dir, id, e))?;
        let checkpoint = read_frame(bytes).ok().flatten().and_then(|frame| {
            decode(&frame, &mut self.names)
                .ok()
                .map(|r| (r, frame.size))
        });
        let (checkpoint, first) = match checkpoint {
            Some((Record::Checkpoint(cp), size)) => (cp, (start + size) as u64),
            _ if newest && self.discard_ok => return Ok(Read::Discard(id)),
            _ => {
                return Err(corrupt(
                    dir,
                    id,
                    start as u64,
                    "the segment does not start with a checkpoint",
                ))
            }
        };
        self.current = Some(Reading {
            id,
            file: Arc::clone(&file),
            len,
            at: first,
            newest,
        });
        Ok(Read::Segment {
            id,
            file,
            len,
            first,
            checkpoint,
            newest,
        })
    }

    /// The next chunk of whole records of the current segment, or its end.
    pub(super) fn chunk(&mut self) -> Result<Read, StorageError> {
        let Some(Reading {
            id,
            ref file,
            len,
            at,
            newest,
        }) = self.current
        else {
            return Err(StorageError(StorageFailure::Internal(
                "log reading lost its segment".into(),
            )));
        };
        let (dir, file) = (self.dir, Arc::clone(file));
        if at >= len {
            self.current = None;
            return Ok(Read::End { at, torn: None });
        }
        let mut buf = self.spare.try_recv().unwrap_or_default();
        let mut want = READ_CHUNK_BYTES;
        loop {
            let n = usize::try_from(len.saturating_sub(at).min(want as u64)).unwrap_or(want);
            if buf.len() < n {
                buf.resize(n, 0);
            }
            file.read_at(&mut buf[..n], at)
                .map_err(|e| cannot_read(dir, id, e))?;
            // The chunk holds the rest of the file: a record cut short is cut short in it.
            let rest = at + n as u64 == len;
            let mut pos = 0;
            // Set when the records end in this chunk: why, if before the end of the file.
            let mut ended = None;
            while pos < n {
                if !rest && n - pos < record::RECORD_HEADER_BYTES {
                    break;
                }
                match read_frame(&buf[pos..n]) {
                    Ok(Some(frame)) => pos += frame.size,
                    Ok(None) => {
                        // The end of the data: nothing but zeros may follow.
                        let here = at + pos as u64;
                        let junk = match buf[pos..n].iter().position(|&b| b != 0) {
                            Some(i) => Some(here + i as u64),
                            None if rest => None,
                            None => self
                                .window
                                .first_nonzero(&*file, len, at + n as u64)
                                .map_err(|e| cannot_read(dir, id, e))?,
                        };
                        match junk {
                            Some(junk) if newest => {
                                ended = Some(Some(format!(
                                    "data after the end of the records at {junk}"
                                )))
                            }
                            Some(_) => {
                                return Err(corrupt(
                                    self.dir,
                                    id,
                                    here,
                                    "a sealed segment has a gap before its end",
                                ))
                            }
                            None => ended = Some(None),
                        }
                        break;
                    }
                    // The record goes on past the chunk.
                    Err(record::DecodeError::Truncated { .. }) if !rest => break,
                    Err(why) if newest => {
                        ended = Some(Some(why.to_string()));
                        break;
                    }
                    Err(why) => return Err(corrupt(self.dir, id, at + pos as u64, why)),
                }
            }
            if pos == 0 && ended.is_none() {
                // Not one whole record: one larger than the chunk. Read it whole.
                let mut word = [0u8; 4];
                word.copy_from_slice(buf.get(..4).unwrap_or(&[0; 4]));
                let size = record::RECORD_HEADER_BYTES
                    + (u32::from_le_bytes(word) as usize).min(record::RECORD_BYTES_MAX);
                if size <= want {
                    return Err(corrupt(self.dir, id, at, "log reading made no progress"));
                }
                want = size;
                continue;
            }
            let end_at = at + pos as u64;
            match ended {
                Some(torn) => {
                    self.current = None;
                    self.end = Some(Read::End { at: end_at, torn });
                }
                None => {
                    if let Some(reading) = &mut self.current {
                        reading.at = end_at;
                    }
                }
            }
            if pos == 0 {
                return Ok(self.end.take().unwrap_or(Read::End {
                    at: end_at,
                    torn: None,
                }));
            }
            return Ok(Read::Records {
                buf,
                base: at,
                end: pos,
            });
        }
    }
}
