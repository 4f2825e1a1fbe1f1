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
use super::StorageFailure;
pub use crate::limits::storage::MANIFEST_SEGMENTS_MAX;

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
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestDamage> {
        if bytes.len() < FIXED_BYTES + 8 {
            return Err(ManifestDamage::Short(bytes.len()));
        }
        let body = &bytes[..bytes.len() - 4];
        let stored = u32_at(bytes, bytes.len() - 4);
        if stored != crc32c::crc32c(body) {
            return Err(ManifestDamage::Checksum(bytes.len() - 4));
        }
        if body[0..8] != MANIFEST_MAGIC {
            return Err(ManifestDamage::Magic);
        }
        let version = u32_at(body, 8);
        if version != MANIFEST_VERSION {
            return Err(ManifestDamage::Version(version));
        }
        let flags = u32_at(body, 12);
        if flags & !FLAG_SYNCED_EACH_BATCH != 0 {
            return Err(ManifestDamage::Flags(flags));
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
                .ok_or(ManifestDamage::Truncated(at))?;
            if count > MANIFEST_SEGMENTS_MAX {
                return Err(ManifestDamage::TooMany { count, at });
            }
            at += 4;
            if body.len() < at + 8 * count {
                return Err(ManifestDamage::Truncated(at));
            }
            for _ in 0..count {
                let id = id_at(body, at)?;
                if list.last().is_some_and(|&last| last >= id) {
                    return Err(ManifestDamage::OutOfOrder(at));
                }
                list.push(id);
                at += 8;
            }
        }
        if at != body.len() {
            return Err(ManifestDamage::LeftOver {
                left: body.len() - at,
                at,
            });
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
    /// [`StorageFailure::Io`] when it cannot be read, [`StorageFailure::Inconsistent`] when it
    /// is damaged (naming the file).
    pub fn read(dir: &dyn LogDir) -> Result<Option<Self>, StorageFailure> {
        let file = match dir.open(MANIFEST_FILE) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StorageFailure::io(
                    format!("cannot open {}", dir.describe(MANIFEST_FILE)),
                    e,
                ))
            }
        };
        let read = file.size().and_then(|len| {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > FIXED_BYTES + 8 + 16 * MANIFEST_SEGMENTS_MAX {
                return Err(std::io::Error::other(format!("{len} bytes is too long")));
            }
            let mut bytes = vec![0u8; len];
            file.read_at(&mut bytes, 0).map(|()| bytes)
        });
        let bytes = read.map_err(|e| {
            StorageFailure::io(format!("cannot read {}", dir.describe(MANIFEST_FILE)), e)
        })?;
        Self::decode(&bytes).map(Some).map_err(|why| {
            StorageFailure::Inconsistent(format!(
                "{} is damaged: {why}",
                dir.describe(MANIFEST_FILE)
            ))
        })
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
        let retry = |what: String| {
            move |e| WriteFailure {
                why: StorageFailure::io(what, e),
                fatal: false,
            }
        };
        let fatal = |what: String| {
            move |e| WriteFailure {
                why: StorageFailure::io(what, e),
                fatal: true,
            }
        };
        let file = dir
            .create(MANIFEST_TEMP_FILE)
            .map_err(retry(format!("cannot create {temp}")))?;
        file.write_at(&bytes, 0)
            .map_err(retry(format!("cannot write {temp}")))?;
        file.sync_all()
            .map_err(fatal(format!("fsync of {temp} failed")))?;
        dir.rename(MANIFEST_TEMP_FILE, MANIFEST_FILE)
            .map_err(retry(format!("cannot rename {temp}")))?;
        if sync_dir {
            dir.sync()
                .map_err(fatal("fsync of the log directory failed".to_string()))?;
        }
        Ok(())
    }
}

/// Why bytes are not a manifest; every message but the first names the offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestDamage {
    /// Shorter than the fixed part.
    #[error("truncated ({0} bytes)")]
    Short(usize),
    /// The checksum (at that offset) does not match.
    #[error("checksum mismatch at offset {0}")]
    Checksum(usize),
    /// Not a manifest.
    #[error("bad magic at offset 0")]
    Magic,
    /// A format version this broker does not read.
    #[error("version {0} at offset 8 (this broker reads version {MANIFEST_VERSION})")]
    Version(u32),
    /// Flags this broker does not know.
    #[error("unknown flags {0:#x} at offset 12")]
    Flags(u32),
    /// A list runs past the end.
    #[error("truncated at offset {0}")]
    Truncated(usize),
    /// A list longer than `MANIFEST_SEGMENTS_MAX`.
    #[error("{count} segments at offset {at}")]
    TooMany {
        /// The count stored.
        count: usize,
        /// Where.
        at: usize,
    },
    /// Segment ids not in increasing order.
    #[error("segment ids out of order at offset {0}")]
    OutOfOrder(usize),
    /// Bytes after the last list.
    #[error("{left} bytes left over at offset {at}")]
    LeftOver {
        /// How many.
        left: usize,
        /// Where they start.
        at: usize,
    },
    /// A segment id over `u32::MAX`.
    #[error("segment id {id} out of range at offset {at}")]
    IdOutOfRange {
        /// The id stored.
        id: u64,
        /// Where.
        at: usize,
    },
}

/// Why [`Manifest::write`] failed.
#[derive(Debug, Clone)]
pub struct WriteFailure {
    /// What failed, naming the file.
    pub why: StorageFailure,
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
fn id_at(buf: &[u8], at: usize) -> Result<u32, ManifestDamage> {
    let id = u64_at(buf, at);
    u32::try_from(id).map_err(|_| ManifestDamage::IdOutOfRange { id, at })
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
