//! The file operations the log needs, behind two small traits so that the same log code runs
//! on real files ([`OsDir`]) and on a simulated disk that loses what was not synced
//! ([`super::sim::SimDisk`]).

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{StorageError, StorageFailure};

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
        Ok(Arc::new(OsFile { file }))
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn LogFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.path.join(name))?;
        Ok(Arc::new(OsFile { file }))
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
