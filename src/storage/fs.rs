//! The file operations the log needs, behind two small traits so that the same log code runs
//! on real files ([`OsDir`]) and on a simulated disk that loses what was not synced
//! ([`super::sim::SimDisk`]).

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use super::{StorageError, StorageFailure};

/// [`LogFile::write_direct_at`]'s offsets, lengths and buffer addresses are multiples of this:
/// the largest logical block size of the devices it is meant for.
pub const DIRECT_ALIGN: usize = 4096;

/// A file's bytes from the start of its last partial block ([`DIRECT_ALIGN`]) to the end of its
/// data, kept after a write: the next direct write starts at that block and writes them again,
/// so it need not read them back.
#[derive(Debug)]
pub(crate) struct TailBlock {
    start: u64,
    bytes: Vec<u8>,
}

impl TailBlock {
    /// Its bytes, if they are exactly the file's `pre` bytes from `block` on.
    pub(crate) fn holds(&self, block: u64, pre: usize) -> Option<&[u8]> {
        (self.start == block && self.bytes.len() == pre).then_some(self.bytes.as_slice())
    }

    /// The tail to keep after `written` was written at `at`, ending the file's data; `kept` is
    /// the tail kept before (its buffer is reused). `None` when the last block began before
    /// this write and `kept` does not hold that block's beginning.
    pub(crate) fn after_write(kept: Option<TailBlock>, written: &[u8], at: u64) -> Option<Self> {
        let end = at + written.len() as u64;
        let start = end - end % DIRECT_ALIGN as u64;
        let mut bytes = match kept {
            Some(tail) if start < at => {
                // The block began before this write: the tail kept must be its beginning.
                if tail.start != start || tail.start + tail.bytes.len() as u64 != at {
                    return None;
                }
                tail.bytes
            }
            Some(mut tail) => {
                tail.bytes.clear();
                tail.bytes
            }
            None if start < at => return None,
            None => Vec::with_capacity(DIRECT_ALIGN),
        };
        let from = usize::try_from(start.saturating_sub(at)).unwrap_or(0);
        bytes.extend_from_slice(&written[from..]);
        Some(TailBlock { start, bytes })
    }
}

/// A directory of log segments.
pub trait LogDir: Send + Sync + Debug {
    /// Names of the files in it.
    ///
    /// # Errors
    ///
    /// I/O errors.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Opens an existing file for reading and writing.
    ///
    /// # Errors
    ///
    /// I/O errors, `NotFound`.
    fn open(&self, name: &str) -> io::Result<Arc<dyn LogFile>>;
    /// Creates an empty file (replacing one of that name).
    ///
    /// # Errors
    ///
    /// I/O errors.
    fn create(&self, name: &str) -> io::Result<Arc<dyn LogFile>>;
    /// Removes a file.
    ///
    /// # Errors
    ///
    /// I/O errors.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Renames a file, replacing any file named `to` (atomically, as `rename(2)`).
    ///
    /// # Errors
    ///
    /// I/O errors, `NotFound`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes creations and removals durable (fsync of the directory).
    ///
    /// # Errors
    ///
    /// I/O errors.
    fn sync(&self) -> io::Result<()>;
    /// Where it is, for messages.
    fn describe(&self, name: &str) -> String;
}

/// One segment file.
pub trait LogFile: Send + Sync + Debug {
    /// Its length in bytes.
    ///
    /// # Errors
    ///
    /// I/O errors.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`.
    ///
    /// # Errors
    ///
    /// I/O errors, `UnexpectedEof` past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    ///
    /// # Errors
    ///
    /// I/O errors (`StorageFull` and the like).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset` as [`LogFile::write_at`] does, but around the page cache
    /// where the file system allows it (Linux `O_DIRECT`): the bytes go from `buf` to the
    /// device without a copy. `offset`, `buf.len()` and `buf`'s address must be multiples of
    /// [`DIRECT_ALIGN`]; anything else, or a file system without direct I/O, is written as
    /// `write_at` writes it. Durable only after a sync, as any write.
    ///
    /// # Errors
    ///
    /// As [`LogFile::write_at`].
    fn write_direct_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
    /// `fdatasync`: written bytes become durable.
    ///
    /// # Errors
    ///
    /// I/O errors. After one, what reached the disk is unknown: the log treats it as fatal.
    fn sync_data(&self) -> io::Result<()>;
    /// `fsync`: bytes and metadata (length) become durable.
    ///
    /// # Errors
    ///
    /// As [`LogFile::sync_data`].
    fn sync_all(&self) -> io::Result<()>;
    /// Truncates or extends (with zeros).
    ///
    /// # Errors
    ///
    /// I/O errors.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves disk blocks for the first `len` bytes (`fallocate`), extending with zeros, so
    /// that running out of space shows up here rather than in the middle of a commit.
    ///
    /// # Errors
    ///
    /// I/O errors, `StorageFull`.
    fn allocate(&self, len: u64) -> io::Result<()>;
}

/// A real directory.
#[derive(Debug, Clone)]
pub struct OsDir {
    path: PathBuf,
}

impl OsDir {
    /// The directory at `path`, created if missing.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn open(path: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(path)?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl LogDir for OsDir {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn LogFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path.join(name))?;
        Ok(Arc::new(OsFile::new(file)))
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn LogFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.path.join(name))?;
        Ok(Arc::new(OsFile::new(file)))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path.join(from), self.path.join(to))
    }

    fn sync(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }

    fn describe(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }
}

#[derive(Debug)]
struct OsFile {
    file: File,
    /// The same file opened with `O_DIRECT`, on the first direct write (`None`: the file system
    /// refused it).
    direct: OnceLock<Option<File>>,
    /// Set when a direct write was refused (`EINVAL`): this file is written through the page
    /// cache from then on.
    direct_refused: AtomicBool,
}

/// Whether the log said once that its file system writes through the page cache only.
static DIRECT_REFUSAL_REPORTED: AtomicBool = AtomicBool::new(false);

impl OsFile {
    fn new(file: File) -> Self {
        Self {
            file,
            direct: OnceLock::new(),
            direct_refused: AtomicBool::new(false),
        }
    }

    /// The `O_DIRECT` handle: the open file reopened through `/proc/self/fd`, so that it is
    /// the same inode whatever its name is now.
    fn direct_file(&self) -> Option<&File> {
        if self.direct_refused.load(Ordering::Relaxed) {
            return None;
        }
        self.direct
            .get_or_init(|| {
                let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                match OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)
                {
                    Ok(file) => Some(file),
                    Err(error) => {
                        self.refuse_direct(&error);
                        None
                    }
                }
            })
            .as_ref()
    }

    fn refuse_direct(&self, error: &io::Error) {
        self.direct_refused.store(true, Ordering::Relaxed);
        if !DIRECT_REFUSAL_REPORTED.swap(true, Ordering::Relaxed) {
            tracing::info!(
                %error,
                "the log's file system refuses direct I/O: large batches are written through the page cache"
            );
        }
    }
}

impl LogFile for OsFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_direct_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let aligned = buf.len() % DIRECT_ALIGN == 0
            && offset % DIRECT_ALIGN as u64 == 0
            && buf.as_ptr().align_offset(DIRECT_ALIGN) == 0;
        let Some(direct) = aligned.then(|| self.direct_file()).flatten() else {
            return self.write_at(buf, offset);
        };
        match direct.write_all_at(buf, offset) {
            // Refused before anything was written (alignment the device does not accept):
            // through the page cache, now and from now on.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                self.refuse_direct(&error);
                self.write_at(buf, offset)
            }
            other => other,
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        fs4::FileExt::allocate(&self.file, len)
    }
}

/// Holds the data directory's lock file for as long as it lives, so that two brokers never
/// write the same log.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Where the lock file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Name of the lock file in the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// Locks `data_dir` (creating it), or says who holds it.
///
/// # Errors
///
/// [`StorageError`] naming the directory, and the process id of the holder when it wrote one.
pub fn lock_data_dir(data_dir: &Path) -> Result<DirLock, StorageError> {
    std::fs::create_dir_all(data_dir).map_err(|e| {
        StorageError(StorageFailure::io(
            format!("cannot create data directory {}", data_dir.display()),
            e,
        ))
    })?;
    let path = data_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| {
            StorageError(StorageFailure::io(
                format!("cannot open lock file {}", path.display()),
                e,
            ))
        })?;
    match fs4::FileExt::try_lock(&file) {
        Ok(()) => {}
        Err(fs4::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .map(|pid| format!(" (process {pid})"))
                .unwrap_or_default();
            return Err(StorageError(StorageFailure::InUse(format!(
                "data directory {} is in use by another cmqd{holder}: two brokers must not share \
                 a log (lock file {})",
                data_dir.display(),
                path.display()
            ))));
        }
        Err(fs4::TryLockError::Error(e)) => {
            return Err(StorageError(StorageFailure::io(
                format!("cannot lock {}", path.display()),
                e,
            )))
        }
    }
    // Informational only: the flock is what excludes, and it dies with the process.
    let _ = file.set_len(0);
    let _ = file.write_all_at(std::process::id().to_string().as_bytes(), 0);
    Ok(DirLock { _file: file, path })
}
