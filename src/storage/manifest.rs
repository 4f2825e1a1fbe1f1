//! The log's manifest: which segments the log holds, and a position known to be synced.
//!
//! Recovery needs both to tell a torn tail from damage: a segment the manifest lists that is
//! missing is lost data, not a gap left by reclamation; a bad record before the synced position
//! was acknowledged, so it cannot be a torn write. The manifest is small and is replaced whole:
//! written to `MANIFEST.tmp`, synced, renamed over `MANIFEST` (and the directory synced when
//! the segment lists change), so a reader finds either the old one or the new one. Its format is
//! in `spec/storage.md` ("Manifest").

use std::fmt;

use super::fs::LogDir;

/// Name of the manifest in the log directory.
pub const MANIFEST_FILE: &str = "MANIFEST";

/// Name of the manifest being written (renamed over [`MANIFEST_FILE`] once synced).
pub const MANIFEST_TEMP_FILE: &str = "MANIFEST.tmp";

/// First bytes of a manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"CMQDMAN\0";

/// Version of the manifest format.
pub const MANIFEST_VERSION: u32 = 1;

/// Flag: every batch in the newest segment was synced before the next one was written
/// (`fsync = "always"`, compaction batches included), so a bad record followed by an intact
/// later batch is damage, never a torn write.
pub const FLAG_SYNCED_EACH_BATCH: u32 = 1;

/// Segment ids a manifest may list (live and retired together): a bound for reading a damaged
/// one, far above what a log holds (a 1 GiB segment each would be 4 PiB).
pub const MANIFEST_SEGMENTS_MAX: usize = 1 << 22;

/// Bytes of a manifest before its lists: magic, version, flags, synced position, live count.
const FIXED_BYTES: usize = 44;

/// A position in the log known to be durable: every byte of segment `segment` before `offset`
/// was synced, and so was every segment before it that the manifest lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncedPos {
    /// Segment id.
    pub segment: u32,
    /// Byte offset in it: the end of the last batch synced.
    pub offset: u64,
    /// Sequence number of that batch (its batch marker's `seq`; 0: none yet in this segment's
    /// run).
    pub batch: u64,
}

impl fmt::Display for SyncedPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "segment {} offset {} (batch {})",
            self.segment, self.offset, self.batch
        )
    }
}

/// The manifest's contents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    /// [`FLAG_SYNCED_EACH_BATCH`] or 0.
    pub flags: u32,
    /// See [`SyncedPos`].
    pub synced: SyncedPos,
    /// The segments the log holds, ascending. Each must exist.
    pub live: Vec<u32>,
    /// Segments the log created or retired that hold nothing needed (a segment being created,
    /// or one reclamation is deleting): a file with one of these ids that is not live is the
    /// log's own and may be removed. Any other file with a segment's name is not the log's.
    pub retired: Vec<u32>,
}

impl Manifest {
    /// Whether every batch was synced before the next was written.
    pub fn synced_each_batch(&self) -> bool {
        self.flags & FLAG_SYNCED_EACH_BATCH != 0
    }

    /// The manifest's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(FIXED_BYTES + 8 * (self.live.len() + self.retired.len()) + 8);
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&u64::from(self.synced.segment).to_le_bytes());
        out.extend_from_slice(&self.synced.offset.to_le_bytes());
        out.extend_from_slice(&self.synced.batch.to_le_bytes());
        for list in [&self.live, &self.retired] {
            let count = u32::try_from(list.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&count.to_le_bytes());
            for id in list {
                out.extend_from_slice(&u64::from(*id).to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a manifest's bytes.
    ///
    /// # Errors
    ///
    /// What is wrong, with the offset.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < FIXED_BYTES + 8 {
            return Err(format!("truncated ({} bytes)", bytes.len()));
        }
        let body = &bytes[..bytes.len() - 4];
        let stored = u32_at(bytes, bytes.len() - 4);
        if stored != crc32c::crc32c(body) {
            return Err(format!("checksum mismatch at offset {}", bytes.len() - 4));
        }
        if body[0..8] != MANIFEST_MAGIC {
            return Err("bad magic at offset 0".into());
        }
        let version = u32_at(body, 8);
        if version != MANIFEST_VERSION {
            return Err(format!(
                "version {version} at offset 8 (this broker reads version {MANIFEST_VERSION})"
            ));
        }
        let flags = u32_at(body, 12);
        if flags & !FLAG_SYNCED_EACH_BATCH != 0 {
            return Err(format!("unknown flags {flags:#x} at offset 12"));
        }
        let segment = id_at(body, 16)?;
        let synced = SyncedPos {
            segment,
            offset: u64_at(body, 24),
            batch: u64_at(body, 32),
        };
        let mut at = 40;
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let count = body
                .get(at..at + 4)
                .map(|_| u32_at(body, at) as usize)
                .ok_or_else(|| format!("truncated at offset {at}"))?;
            if count > MANIFEST_SEGMENTS_MAX {
                return Err(format!("{count} segments at offset {at}"));
            }
            at += 4;
            if body.len() < at + 8 * count {
                return Err(format!("truncated at offset {at}"));
            }
            for _ in 0..count {
                let id = id_at(body, at)?;
                if list.last().is_some_and(|&last| last >= id) {
                    return Err(format!("segment ids out of order at offset {at}"));
                }
                list.push(id);
                at += 8;
            }
        }
        if at != body.len() {
            return Err(format!(
                "{} bytes left over at offset {at}",
                body.len() - at
            ));
        }
        let [live, retired] = lists;
        Ok(Self {
            flags,
            synced,
            live,
            retired,
        })
    }

    /// Reads the manifest in `dir`: `None` if there is none (a new log, or one written by a
    /// version without manifests).
    ///
    /// # Errors
    ///
    /// It cannot be read, or is damaged (naming the file).
    pub fn read(dir: &dyn LogDir) -> Result<Option<Self>, String> {
        let file = match dir.open(MANIFEST_FILE) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot open {}: {e}", dir.describe(MANIFEST_FILE))),
        };
        let read = file.size().and_then(|len| {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > FIXED_BYTES + 8 + 16 * MANIFEST_SEGMENTS_MAX {
                return Err(std::io::Error::other(format!("{len} bytes is too long")));
            }
            let mut bytes = vec![0u8; len];
            file.read_at(&mut bytes, 0).map(|()| bytes)
        });
        let bytes =
            read.map_err(|e| format!("cannot read {}: {e}", dir.describe(MANIFEST_FILE)))?;
        Self::decode(&bytes)
            .map(Some)
            .map_err(|why| format!("{} is damaged: {why}", dir.describe(MANIFEST_FILE)))
    }

    /// Replaces the manifest in `dir` with this one: temp file written and synced, renamed over
    /// the manifest, and, when `sync_dir`, the directory synced (needed before a change that
    /// relies on it: using a new segment, deleting a retired one). Without it a power loss may
    /// bring back the previous manifest, which is still true of the log.
    ///
    /// # Errors
    ///
    /// I/O errors, naming the file; [`WriteFailure::fatal`] after a failed sync (what is on
    /// disk is then unknown).
    pub fn write(&self, dir: &dyn LogDir, sync_dir: bool) -> Result<(), WriteFailure> {
        let bytes = self.encode();
        let temp = dir.describe(MANIFEST_TEMP_FILE);
        let retry = |why: String| WriteFailure { why, fatal: false };
        let fatal = |why: String| WriteFailure { why, fatal: true };
        let file = dir
            .create(MANIFEST_TEMP_FILE)
            .map_err(|e| retry(format!("cannot create {temp}: {e}")))?;
        file.write_at(&bytes, 0)
            .map_err(|e| retry(format!("cannot write {temp}: {e}")))?;
        file.sync_all()
            .map_err(|e| fatal(format!("fsync of {temp} failed: {e}")))?;
        dir.rename(MANIFEST_TEMP_FILE, MANIFEST_FILE)
            .map_err(|e| retry(format!("cannot rename {temp}: {e}")))?;
        if sync_dir {
            dir.sync()
                .map_err(|e| fatal(format!("fsync of the log directory failed: {e}")))?;
        }
        Ok(())
    }
}

/// Why [`Manifest::write`] failed.
#[derive(Debug, Clone)]
pub struct WriteFailure {
    /// What failed, naming the file.
    pub why: String,
    /// A sync failed: what reached the disk is unknown (the log stops). Otherwise the previous
    /// manifest is still in place and the write may be tried again.
    pub fatal: bool,
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(word)
}

/// A segment id stored as a `u64`, which the log keeps in a `u32`.
fn id_at(buf: &[u8], at: usize) -> Result<u32, String> {
    let id = u64_at(buf, at);
    u32::try_from(id).map_err(|_| format!("segment id {id} out of range at offset {at}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_reads_back_and_any_damage_is_refused() {
        let manifest = Manifest {
            flags: FLAG_SYNCED_EACH_BATCH,
            synced: SyncedPos {
                segment: 3,
                offset: 4096,
                batch: 17,
            },
            live: vec![1, 3],
            retired: vec![4],
        };
        let bytes = manifest.encode();
        assert_eq!(bytes.len(), FIXED_BYTES + 16 + 4 + 8 + 4);
        assert_eq!(Manifest::decode(&bytes), Ok(manifest));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(Manifest::decode(&bad).is_err(), "flip at {i} accepted");
        }
        for len in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..len]).is_err());
        }
    }

    /// The example in `spec/storage.md`.
    #[test]
    fn golden_bytes_match_the_spec() {
        let manifest = Manifest {
            flags: FLAG_SYNCED_EACH_BATCH,
            synced: SyncedPos {
                segment: 2,
                offset: 0x1000,
                batch: 5,
            },
            live: vec![1, 2],
            retired: vec![3],
        };
        let hex: String = manifest
            .encode()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, GOLDEN);
    }

    const GOLDEN: &str = "434d51444d414e0001000000010000000200000000000000001000000000000005000000000000000200000001000000000000000200000000000000010000000300000000000000e2e44dd7";
}
