//! A disk in memory that separates what was written from what was synced, for crash tests.
//!
//! Every file keeps its durable bytes and the writes (and length changes) made since its last
//! sync; the directory keeps its durable entries and the creations and removals since its last
//! sync. [`SimDisk::crash`] stops the disk (every later operation of this incarnation fails,
//! as if the power went) and [`SimDisk::reboot`] builds the disk a restart would find: durable
//! state, plus each unsynced change kept, dropped or, for a write, torn (each 512-byte sector
//! of it kept or not, at random). Faults can be injected: a crash after a number of operations,
//! a capacity (writes past it fail with `StorageFull`), failing syncs, and the next few writes
//! or syncs failing (a write that fails leaves its first half behind, as a short write would).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::fs::{LogDir, LogFile, DIRECT_ALIGN};

/// Granularity of torn writes: a sector is written whole or not at all.
const SECTOR_BYTES: usize = 512;

#[derive(Debug, Clone)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Clone, Default)]
struct FileData {
    durable: Vec<u8>,
    current: Vec<u8>,
    unsynced: Vec<Change>,
}

fn apply(bytes: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write { offset, data } => {
            let start = usize::try_from(*offset).unwrap_or(usize::MAX);
            let end = start.saturating_add(data.len());
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[start..end].copy_from_slice(data);
        }
        Change::SetLen(len) => bytes.resize(usize::try_from(*len).unwrap_or(usize::MAX), 0),
    }
}

#[derive(Debug, Default)]
struct State {
    /// File contents by file number (a name maps to a number, as an inode).
    files: BTreeMap<u64, FileData>,
    next_file: u64,
    /// The directory as the running system sees it.
    names: BTreeMap<String, u64>,
    /// The directory as it is on the platter.
    durable_names: BTreeMap<String, u64>,
    /// Set by a crash: this incarnation's operations all fail.
    crashed: bool,
    /// Mutating operations left before a crash, if one is scheduled.
    crash_in: Option<u64>,
    /// Total bytes files may occupy; writes past it fail with `StorageFull`.
    capacity: Option<u64>,
    /// Syncs fail (with an I/O error) while set.
    fail_syncs: bool,
    /// The next this many syncs fail (as Linux reports a writeback error once).
    failing_syncs: u32,
    /// The next this many writes fail with this error, half written.
    failing_writes: (u32, Option<io::ErrorKind>),
    /// Mutating operations so far.
    ops: u64,
    /// Syncs so far.
    syncs: u64,
    /// Direct writes are refused (as by a file system without `O_DIRECT`): written as plain
    /// writes, as `OsFile` does then.
    refuse_direct: bool,
    /// Direct writes made so far, aligned as [`LogFile::write_direct_at`] requires (offset,
    /// length and buffer address multiples of [`DIRECT_ALIGN`]) and not refused.
    direct_writes: u64,
    /// Direct writes asked for with something not aligned (written as plain writes).
    unaligned_direct_writes: u64,
}

impl State {
    /// Counts a mutating operation; fails when the disk is down or the scheduled crash is due.
    fn op(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(io::Error::other("simulated power loss"));
        }
        if let Some(left) = self.crash_in.as_mut() {
            if *left == 0 {
                self.crashed = true;
                return Err(io::Error::other("simulated power loss"));
            }
            *left -= 1;
        }
        self.ops += 1;
        Ok(())
    }

    fn used(&self) -> u64 {
        self.names
            .values()
            .filter_map(|id| self.files.get(id))
            .map(|f| f.current.len() as u64)
            .sum()
    }
}

/// A simulated disk holding one directory. Cheap to clone (clones share the disk).
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// Power goes after `ops` more mutating operations (writes, syncs, length changes,
    /// creations, removals): the one after them fails, and so does everything after it.
    pub fn crash_after(&self, ops: u64) {
        self.state.lock().crash_in = Some(ops);
    }

    /// Power goes now.
    pub fn crash(&self) {
        self.state.lock().crashed = true;
    }

    /// Whether the power went.
    pub fn is_crashed(&self) -> bool {
        self.state.lock().crashed
    }

    /// Files may hold at most `bytes` in total (`None`: unlimited).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state.lock().capacity = bytes;
    }

    /// Makes every sync fail (or succeed again).
    pub fn fail_syncs(&self, fail: bool) {
        self.state.lock().fail_syncs = fail;
    }

    /// Makes the next `count` syncs fail with an I/O error; later ones succeed.
    pub fn fail_next_syncs(&self, count: u32) {
        self.state.lock().failing_syncs = count;
    }

    /// Makes the next `count` writes fail with `kind` (`StorageFull`, or `Other` for an I/O
    /// error), each after writing the first half of its bytes.
    pub fn fail_next_writes(&self, count: u32, kind: io::ErrorKind) {
        self.state.lock().failing_writes = (count, Some(kind));
    }

    /// Mutating operations so far.
    pub fn ops(&self) -> u64 {
        self.state.lock().ops
    }

    /// Syncs so far.
    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Makes direct writes refused (or accepted again): they are written as plain writes, as
    /// a file system without direct I/O makes `OsFile` do.
    pub fn refuse_direct(&self, refuse: bool) {
        self.state.lock().refuse_direct = refuse;
    }

    /// Direct writes made so far (aligned, not refused). The bytes written are the same
    /// either way: a direct write differs only in what a real disk's page cache holds.
    pub fn direct_writes(&self) -> u64 {
        self.state.lock().direct_writes
    }

    /// Direct writes asked for with an offset, a length or a buffer address not aligned to
    /// [`DIRECT_ALIGN`] (which `OsFile` writes through the page cache).
    pub fn unaligned_direct_writes(&self) -> u64 {
        self.state.lock().unaligned_direct_writes
    }

    /// Bytes held by the files the directory lists now.
    pub fn used_bytes(&self) -> u64 {
        self.state.lock().used()
    }

    /// The disk a restart finds after a crash (or now, if there was none), with the fate of each
    /// unsynced change drawn from `seed`. A new, running disk.
    pub fn reboot(&self, seed: u64) -> SimDisk {
        let mut rng = StdRng::seed_from_u64(seed);
        let old = self.state.lock();
        let mut names = old.durable_names.clone();
        // Unsynced creations may or may not have reached the directory, and so may removals.
        for (name, id) in &old.names {
            if old.durable_names.get(name) != Some(id) && rng.gen_bool(0.5) {
                names.insert(name.clone(), *id);
            }
        }
        for name in old.durable_names.keys() {
            if !old.names.contains_key(name) && rng.gen_bool(0.5) {
                names.remove(name);
            }
        }
        let mut files = BTreeMap::new();
        for id in names.values().copied().collect::<BTreeSet<u64>>() {
            let Some(data) = old.files.get(&id) else {
                continue;
            };
            let mut bytes = data.durable.clone();
            for change in &data.unsynced {
                match rng.gen_range(0..3) {
                    // Kept whole.
                    0 => apply(&mut bytes, change),
                    // Lost.
                    1 => {}
                    // Torn: some sectors made it.
                    _ => match change {
                        Change::Write { offset, data } => {
                            for (i, sector) in data.chunks(SECTOR_BYTES).enumerate() {
                                if rng.gen_bool(0.5) {
                                    apply(
                                        &mut bytes,
                                        &Change::Write {
                                            offset: offset + (i * SECTOR_BYTES) as u64,
                                            data: sector.to_vec(),
                                        },
                                    );
                                }
                            }
                        }
                        Change::SetLen(_) => {}
                    },
                }
            }
            files.insert(
                id,
                FileData {
                    durable: bytes.clone(),
                    current: bytes,
                    unsynced: Vec::new(),
                },
            );
        }
        let state = State {
            files,
            next_file: old.next_file,
            names: names.clone(),
            durable_names: names,
            ..State::default()
        };
        SimDisk {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// A file's current bytes, for tests that damage a log by hand.
    pub fn read_file(&self, name: &str) -> Option<Vec<u8>> {
        let state = self.state.lock();
        let id = state.names.get(name)?;
        state.files.get(id).map(|f| f.current.clone())
    }

    /// Replaces a file's bytes, durably (damage done to the platter).
    pub fn write_file(&self, name: &str, bytes: Vec<u8>) {
        let mut state = self.state.lock();
        let id = match state.names.get(name) {
            Some(&id) => id,
            None => {
                let id = state.next_file;
                state.next_file += 1;
                state.names.insert(name.to_owned(), id);
                state.durable_names.insert(name.to_owned(), id);
                id
            }
        };
        state.files.insert(
            id,
            FileData {
                durable: bytes.clone(),
                current: bytes,
                unsynced: Vec::new(),
            },
        );
    }
}

impl LogDir for SimDisk {
    fn list(&self) -> io::Result<Vec<String>> {
        let state = self.state.lock();
        if state.crashed {
            return Err(io::Error::other("simulated power loss"));
        }
        Ok(state.names.keys().cloned().collect())
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn LogFile>> {
        let state = self.state.lock();
        if state.crashed {
            return Err(io::Error::other("simulated power loss"));
        }
        let id = *state
            .names
            .get(name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(Arc::new(SimFile {
            disk: self.clone(),
            id,
        }))
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn LogFile>> {
        let mut state = self.state.lock();
        state.op()?;
        let id = state.next_file;
        state.next_file += 1;
        state.files.insert(id, FileData::default());
        state.names.insert(name.to_owned(), id);
        Ok(Arc::new(SimFile {
            disk: self.clone(),
            id,
        }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.state.lock();
        state.op()?;
        state
            .names
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut state = self.state.lock();
        state.op()?;
        // Like a creation and a removal: durable with the next directory sync; a crash before
        // it may keep either half.
        let id = state
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        state.names.insert(to.to_owned(), id);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        state.op()?;
        if state.fail_syncs {
            return Err(io::Error::other("simulated fsync failure"));
        }
        if state.failing_syncs > 0 {
            state.failing_syncs -= 1;
            return Err(io::Error::other("simulated fsync failure"));
        }
        state.syncs += 1;
        state.durable_names = state.names.clone();
        Ok(())
    }

    fn describe(&self, name: &str) -> String {
        format!("sim:{name}")
    }
}

#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    id: u64,
}

impl SimFile {
    fn change(&self, change: Change) -> io::Result<()> {
        let mut state = self.disk.state.lock();
        state.op()?;
        if let (Change::Write { offset, data }, (n, Some(kind))) = (&change, state.failing_writes) {
            if n > 0 {
                state.failing_writes.0 = n - 1;
                let half = Change::Write {
                    offset: *offset,
                    data: data[..data.len() / 2].to_vec(),
                };
                if let Some(file) = state.files.get_mut(&self.id) {
                    apply(&mut file.current, &half);
                    file.unsynced.push(half);
                }
                return Err(io::Error::new(kind, "simulated write failure"));
            }
        }
        if let (Some(capacity), Change::Write { offset, data }) = (state.capacity, &change) {
            let current = state
                .files
                .get(&self.id)
                .map_or(0, |f| f.current.len() as u64);
            let end = offset + data.len() as u64;
            let used = state.used();
            if end > current && used + (end - current) > capacity {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "simulated disk full",
                ));
            }
        }
        let file = state
            .files
            .get_mut(&self.id)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        apply(&mut file.current, &change);
        file.unsynced.push(change);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut state = self.disk.state.lock();
        state.op()?;
        if state.fail_syncs {
            return Err(io::Error::other("simulated fsync failure"));
        }
        if state.failing_syncs > 0 {
            state.failing_syncs -= 1;
            return Err(io::Error::other("simulated fsync failure"));
        }
        state.syncs += 1;
        let file = state
            .files
            .get_mut(&self.id)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        for change in std::mem::take(&mut file.unsynced) {
            apply(&mut file.durable, &change);
        }
        Ok(())
    }
}

impl LogFile for SimFile {
    fn size(&self) -> io::Result<u64> {
        let state = self.disk.state.lock();
        if state.crashed {
            return Err(io::Error::other("simulated power loss"));
        }
        Ok(state
            .files
            .get(&self.id)
            .map_or(0, |f| f.current.len() as u64))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.disk.state.lock();
        if state.crashed {
            return Err(io::Error::other("simulated power loss"));
        }
        let file = state
            .files
            .get(&self.id)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(buf.len());
        if end > file.current.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf.copy_from_slice(&file.current[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.change(Change::Write {
            offset,
            data: buf.to_vec(),
        })
    }

    fn write_direct_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let aligned = buf.len() % DIRECT_ALIGN == 0
            && offset % DIRECT_ALIGN as u64 == 0
            && buf.as_ptr().align_offset(DIRECT_ALIGN) == 0;
        self.write_at(buf, offset)?;
        let mut state = self.disk.state.lock();
        if !aligned {
            state.unaligned_direct_writes += 1;
        } else if !state.refuse_direct {
            state.direct_writes += 1;
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.sync()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.change(Change::SetLen(len))
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let current = self.size()?;
        if len <= current {
            return Ok(());
        }
        // Reserving blocks extends the file with zeros; like any change, it is lost in a crash
        // unless synced.
        let state = self.disk.state.lock();
        if let Some(capacity) = state.capacity {
            if state.used() + (len - current) > capacity {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "simulated disk full",
                ));
            }
        }
        drop(state);
        self.change(Change::SetLen(len))
    }
}
