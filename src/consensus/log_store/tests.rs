//! The node log's tests: round trips through reopen, torn tails and damage, rotation and
//! deletion, group commit against a gated disk, failure, and openraft's own storage suite.

use std::sync::Arc;
use std::time::Duration;

use openraft::storage::{
    LogState, RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftSnapshotBuilder,
    RaftStateMachine, Snapshot,
};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LeaderId, LogId, SnapshotMeta, StorageError,
    StoredMembership, Vote,
};
use parking_lot::Mutex;

use super::*;
use crate::consensus::{NodeId, PeerNode, Proposal, TypeConfig};
use crate::storage::fs::{LogDir, LogFile, DIRECT_ALIGN};
use crate::storage::sim::SimDisk;

fn config() -> NodeLogConfig {
    NodeLogConfig {
        fsync: FsyncMode::Always,
        segment_bytes: 1 << 20,
        cache_bytes: NODE_LOG_CACHE_BYTES_DEFAULT,
    }
}

fn small_segments() -> NodeLogConfig {
    NodeLogConfig {
        fsync: FsyncMode::Always,
        segment_bytes: NODE_LOG_SEGMENT_BYTES_MIN,
        cache_bytes: NODE_LOG_CACHE_BYTES_DEFAULT,
    }
}

fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Proposal::Records {
            term,
            records: bytes::Bytes::from(vec![index as u8; 200]),
        }),
    }
}

fn vote(term: u64, node: NodeId) -> Vote<NodeId> {
    Vote {
        leader_id: LeaderId::new(term, node),
        committed: true,
    }
}

async fn indexes(group: &mut GroupLog) -> Vec<u64> {
    group
        .try_get_log_entries(..)
        .await
        .unwrap()
        .iter()
        .map(|e| e.log_id.index)
        .collect()
}

fn segment_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_owned))
        .filter(|n| segment_id(n).is_some())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn entries_votes_commits_truncations_and_purges_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, recovery) = NodeLog::open(dir.path(), config()).unwrap();
        assert_eq!(recovery.damage, None);
        assert_eq!(recovery.entries, 0);
        let mut g0 = log.group(0);
        let mut g7 = log.group(7);
        g0.blocking_append((1..=10).map(|i| entry(1, i)))
            .await
            .unwrap();
        g7.blocking_append((1..=3).map(|i| entry(2, i)))
            .await
            .unwrap();
        g0.save_vote(&vote(3, 2)).await.unwrap();
        g0.save_committed(Some(log_id(1, 8))).await.unwrap();
        g0.truncate(log_id(1, 9)).await.unwrap();
        g0.blocking_append([entry(3, 9)]).await.unwrap();
        g0.purge(log_id(1, 4)).await.unwrap();
        g7.save_vote(&vote(2, 7)).await.unwrap();
        assert_eq!(indexes(&mut g0).await, vec![5, 6, 7, 8, 9]);
        log.close();
        assert!(g0.blocking_append([entry(3, 10)]).await.is_err());
    }
    let (log, recovery) = NodeLog::open(dir.path(), config()).unwrap();
    assert_eq!(recovery.damage, None);
    assert_eq!(recovery.torn_tail_cut, None);
    assert_eq!(recovery.entries, 5 + 3);
    assert_eq!(recovery.highest_index_seen.get(&0), Some(&10));
    assert_eq!(recovery.highest_term_seen.get(&0), Some(&3));
    assert_eq!(recovery.highest_index_seen.get(&7), Some(&3));
    let mut g0 = log.group(0);
    assert_eq!(indexes(&mut g0).await, vec![5, 6, 7, 8, 9]);
    let nine = g0.try_get_log_entries(9..10).await.unwrap();
    assert_eq!(nine, vec![entry(3, 9)]);
    assert_eq!(g0.read_vote().await.unwrap(), Some(vote(3, 2)));
    assert_eq!(g0.read_committed().await.unwrap(), Some(log_id(1, 8)));
    let state = g0.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 4)));
    assert_eq!(state.last_log_id, Some(log_id(3, 9)));
    let mut g7 = log.group(7);
    assert_eq!(indexes(&mut g7).await, vec![1, 2, 3]);
    assert_eq!(g7.read_vote().await.unwrap(), Some(vote(2, 7)));
    // A group never written has nothing.
    let mut g9 = log.group(9);
    assert_eq!(
        g9.get_log_state().await.unwrap(),
        LogState {
            last_purged_log_id: None,
            last_log_id: None
        }
    );
    // Purging past the last entry leaves the purged id as the last log id.
    g7.purge(log_id(2, 5)).await.unwrap();
    assert_eq!(
        g7.get_log_state().await.unwrap().last_log_id,
        Some(log_id(2, 5))
    );
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = NodeLog::open(dir.path(), config()).unwrap();
        log.group(0)
            .blocking_append((1..=5).map(|i| entry(1, i)))
            .await
            .unwrap();
        log.close();
    }
    let newest = segment_files(dir.path()).pop().unwrap();
    let path = dir.path().join(&newest);
    // Where the next record would have gone: the end of the data (a direct write leaves zeros
    // after it, to the end of its block, which a torn write there overwrites).
    let mut bytes = std::fs::read(&path).unwrap();
    let intact_len = data_end(&bytes) as u64;
    // Half of a record: the header of a 300-byte record and a few bytes of it.
    let mut torn = Vec::new();
    format::encode_entry(0, &entry(1, 6), &mut torn).unwrap();
    torn.truncate(40);
    bytes.truncate(intact_len as usize);
    bytes.extend_from_slice(&torn);
    std::fs::write(&path, &bytes).unwrap();

    let (log, recovery) = NodeLog::open(dir.path(), config()).unwrap();
    assert_eq!(recovery.damage, None);
    let (file, offset) = recovery.torn_tail_cut.clone().unwrap();
    assert!(file.ends_with(&newest), "{file}");
    assert_eq!(offset, intact_len);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), intact_len);
    assert_eq!(indexes(&mut log.group(0)).await, vec![1, 2, 3, 4, 5]);
    assert!(!dir.path().join(recover::DAMAGED_DIR).exists());
}

#[tokio::test]
async fn a_flipped_byte_in_a_sealed_segment_is_damage_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = NodeLog::open(dir.path(), small_segments()).unwrap();
        let mut g = log.group(0);
        for i in 1..=60 {
            g.blocking_append([entry(1, i)]).await.unwrap();
        }
        g.save_vote(&vote(4, 1)).await.unwrap();
        log.close();
    }
    let files = segment_files(dir.path());
    assert!(files.len() >= 4, "{files:?}");
    // Damage the second segment, in its third record (after header and checkpoint).
    let victim = dir.path().join(&files[1]);
    let mut bytes = std::fs::read(&victim).unwrap();
    let mut pos = format::HEADER_BYTES;
    for _ in 0..2 {
        pos += format::read_frame(&bytes[pos..]).unwrap().unwrap().size;
    }
    let damaged_at = pos as u64;
    bytes[pos + 30] ^= 0x40;
    std::fs::write(&victim, &bytes).unwrap();

    let (log, recovery) = NodeLog::open(dir.path(), small_segments()).unwrap();
    let damage = recovery.damage.clone().unwrap();
    assert!(damage.file.ends_with(&files[1]), "{damage:?}");
    assert_eq!(damage.offset, damaged_at);
    assert!(damage.what.contains("checksum"), "{damage:?}");
    assert_eq!(recovery.torn_tail_cut, None);
    assert_eq!(recovery.highest_index_seen.get(&0), Some(&60));
    assert_eq!(recovery.highest_term_seen.get(&0), Some(&4));
    // The damaged segment and every later one moved aside, not deleted.
    let damaged_root = dir.path().join(recover::DAMAGED_DIR);
    let moved_dir = std::fs::read_dir(&damaged_root)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let moved = segment_files(&moved_dir);
    assert_eq!(moved, files[1..].to_vec());
    // What precedes the damage is kept: a prefix of the log, ending before 60.
    let mut g = log.group(0);
    let kept = indexes(&mut g).await;
    assert!(!kept.is_empty() && kept.len() < 60, "{kept:?}");
    assert_eq!(kept, (1..=kept.len() as u64).collect::<Vec<_>>());
    // Read back from the files (kept segments, and the rewritten part in the new one).
    let before = log.disk_reads();
    assert_eq!(
        g.try_get_log_entries(..).await.unwrap(),
        kept.iter().map(|&i| entry(1, i)).collect::<Vec<_>>()
    );
    assert_eq!(log.disk_reads() - before, kept.len() as u64);
    assert_eq!(g.read_vote().await.unwrap(), None);
    // The log goes on, and a reopen finds it clean with the same prefix (the kept entries
    // from the moved segment were written again).
    let next = kept.len() as u64 + 1;
    g.blocking_append([entry(5, next)]).await.unwrap();
    drop(g);
    log.close();
    drop(log);
    let (log, recovery) = NodeLog::open(dir.path(), small_segments()).unwrap();
    assert_eq!(recovery.damage, None);
    let mut expected: Vec<u64> = kept.clone();
    expected.push(next);
    assert_eq!(indexes(&mut log.group(0)).await, expected);
}

/// The records of a segment file after its header, each with its offset (stops at the first
/// bad one).
fn records(bytes: &[u8]) -> Vec<(usize, format::Record)> {
    let mut out = Vec::new();
    let mut pos = format::HEADER_BYTES;
    while let Ok(Some(frame)) = format::read_frame(&bytes[pos..]) {
        out.push((pos, format::decode(&frame).unwrap()));
        pos += frame.size;
    }
    out
}

/// Where the data of a segment file ends: after its last record.
fn data_end(bytes: &[u8]) -> usize {
    let mut pos = format::HEADER_BYTES;
    while let Ok(Some(frame)) = format::read_frame(&bytes[pos..]) {
        pos += frame.size;
    }
    pos
}

/// A segment file's bytes to the end of its data, after checking that what follows is what a
/// direct write leaves there: zeros, to the next block boundary at most.
fn segment_data(name: &str, mut bytes: Vec<u8>) -> Vec<u8> {
    let end = data_end(&bytes);
    assert!(
        bytes.len() <= end.next_multiple_of(DIRECT_ALIGN),
        "{name}: {} bytes, the data ends at {end}",
        bytes.len()
    );
    assert!(
        bytes[end..].iter().all(|&b| b == 0),
        "{name}: bytes after the data at {end} are not zeros"
    );
    bytes.truncate(end);
    bytes
}

/// Appends single entries of term 1 to group 0 from `next` on until the writer has just
/// started a new segment (which then holds only its checkpoint) and at least `min` entries
/// are in; returns the next index.
async fn fill_until_rotation(log: &NodeLog, g: &mut GroupLog, mut next: u64, min: u64) -> u64 {
    let segments = |log: &NodeLog| {
        let names = log.dir.list().unwrap();
        names.iter().filter(|n| segment_id(n).is_some()).count()
    };
    loop {
        let before = segments(log);
        g.blocking_append([entry(1, next)]).await.unwrap();
        log.barrier().await.unwrap();
        next += 1;
        if next > min && segments(log) > before {
            return next;
        }
    }
}

/// Goal: a truncation recovery replayed before the damage stays in force after the damaged
/// segment is moved aside, so entries openraft truncated never come back. Method: entries
/// 1-N of term 1 fill older segments; in the newest, truncate from 10 and append 10-14 of
/// term 2; flip a byte in 12's record (13 and 14 intact after it, so it is damage, not a torn
/// tail). The first open and every later one serve 1-9, then 10-11 of term 2, nothing else.
#[tokio::test]
async fn a_truncation_before_damage_is_kept_after_the_damage_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let files;
    {
        let (log, _) = NodeLog::open(dir.path(), small_segments()).unwrap();
        let mut g = log.group(0);
        fill_until_rotation(&log, &mut g, 1, 20).await;
        files = segment_files(dir.path());
        assert!(files.len() >= 2, "{files:?}");
        g.truncate(log_id(1, 10)).await.unwrap();
        for i in 10..=14 {
            g.blocking_append([entry(2, i)]).await.unwrap();
        }
        log.close();
    }
    // Everything after the rotation is in the newest segment.
    assert_eq!(segment_files(dir.path()), files);
    let newest = dir.path().join(files.last().unwrap());
    let mut bytes = std::fs::read(&newest).unwrap();
    let in_newest = records(&bytes);
    assert!(
        matches!(
            in_newest[1].1,
            format::Record::Truncate {
                group: 0,
                since: 10
            }
        ),
        "{:?}",
        in_newest[1]
    );
    let (twelve, _) = in_newest
        .iter()
        .find(|(_, r)| matches!(r, format::Record::Entry { entry, .. } if entry.log_id.index == 12))
        .unwrap();
    bytes[twelve + 40] ^= 0x01;
    std::fs::write(&newest, &bytes).unwrap();

    let expected: Vec<LogId<NodeId>> = (1..=9)
        .map(|i| log_id(1, i))
        .chain((10..=11).map(|i| log_id(2, i)))
        .collect();
    let served = |log: &Arc<NodeLog>| {
        let mut g = log.group(0);
        async move {
            g.try_get_log_entries(..)
                .await
                .unwrap()
                .iter()
                .map(|e| e.log_id)
                .collect::<Vec<_>>()
        }
    };
    {
        let (log, recovery) = NodeLog::open(dir.path(), small_segments()).unwrap();
        let damage = recovery.damage.clone().unwrap();
        assert_eq!(damage.offset, *twelve as u64, "{damage:?}");
        assert_eq!(served(&log).await, expected);
        log.close();
    }
    // The older segments, still holding term 1's 10 and up, are kept; the truncation now
    // lives in the new segment.
    for name in &files[..files.len() - 1] {
        assert!(dir.path().join(name).exists(), "{name}");
    }
    for _ in 0..2 {
        let (log, recovery) = NodeLog::open(dir.path(), small_segments()).unwrap();
        assert_eq!(recovery.damage, None);
        assert_eq!(served(&log).await, expected);
        assert_eq!(
            log.group(0).get_log_state().await.unwrap().last_log_id,
            Some(log_id(2, 11))
        );
        log.close();
    }
}

/// A disk that, before every change to its directory (create, remove, rename, sync), keeps
/// the disk a power cut at that moment would leave.
#[derive(Debug)]
struct CrashPoints {
    disk: SimDisk,
    snapshots: Mutex<Vec<SimDisk>>,
}

impl CrashPoints {
    fn snapshot(&self) {
        let seed = self.snapshots.lock().len() as u64;
        let disk = self.disk.reboot(seed);
        self.snapshots.lock().push(disk);
    }
}

impl LogDir for CrashPoints {
    fn list(&self) -> std::io::Result<Vec<String>> {
        self.disk.list()
    }
    fn open(&self, name: &str) -> std::io::Result<Arc<dyn LogFile>> {
        self.disk.open(name)
    }
    fn create(&self, name: &str) -> std::io::Result<Arc<dyn LogFile>> {
        self.snapshot();
        self.disk.create(name)
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.snapshot();
        self.disk.remove(name)
    }
    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        self.snapshot();
        self.disk.rename(from, to)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.snapshot();
        self.disk.sync()
    }
    fn describe(&self, name: &str) -> String {
        self.disk.describe(name)
    }
}

/// Goal: damaged segments go aside only after the new segment holds what was kept of them,
/// so a power cut in between never leaves a log that lacks the kept prefix (or the vote in
/// it) and reports no damage. Method: damage the newest segment, after its vote and an
/// entry; open it on a disk that keeps the state a power cut would leave before each
/// directory change; every such state must open to the kept entries and the vote.
#[tokio::test]
async fn a_crash_while_damage_is_moved_aside_loses_neither_kept_entries_nor_the_vote() {
    let disk = SimDisk::new();
    let next;
    {
        let (log, _) =
            NodeLog::open_in(Arc::new(disk.clone()), None, None, small_segments()).unwrap();
        let mut g = log.group(0);
        next = fill_until_rotation(&log, &mut g, 1, 5).await;
        g.save_vote(&vote(3, 2)).await.unwrap();
        for i in next..next + 3 {
            g.blocking_append([entry(3, i)]).await.unwrap();
        }
        log.close();
    }
    let mut names: Vec<String> = disk.list().unwrap();
    names.retain(|n| segment_id(n).is_some());
    names.sort();
    let newest = names.last().unwrap().clone();
    let mut bytes = disk.read_file(&newest).unwrap();
    let in_newest = records(&bytes);
    // Checkpoint, vote, three entries: damage the second entry.
    assert!(
        matches!(in_newest[1].1, format::Record::Vote { .. }),
        "{in_newest:?}"
    );
    let (second, _) = in_newest[3];
    bytes[second + 40] ^= 0x01;
    disk.write_file(&newest, bytes);

    let crashing = Arc::new(CrashPoints {
        disk: disk.clone(),
        snapshots: Mutex::new(Vec::new()),
    });
    let (log, first) = NodeLog::open_in(crashing.clone(), None, None, small_segments()).unwrap();
    assert!(first.damage.is_some());
    let kept = indexes(&mut log.group(0)).await;
    assert_eq!(kept, (1..next + 1).collect::<Vec<_>>());
    log.close();
    drop(log);
    let snapshots = std::mem::take(&mut *crashing.snapshots.lock());
    assert!(snapshots.len() >= 3, "{}", snapshots.len());
    for (at, snapshot) in snapshots.into_iter().enumerate() {
        let (log, recovery) =
            NodeLog::open_in(Arc::new(snapshot), None, None, small_segments()).unwrap();
        let mut g = log.group(0);
        assert_eq!(
            indexes(&mut g).await,
            kept,
            "crash point {at}: {recovery:?}"
        );
        assert_eq!(
            g.read_vote().await.unwrap(),
            Some(vote(3, 2)),
            "crash point {at}: {recovery:?}"
        );
    }
}

/// Goal: the move of damaged segments is durable: the new directory, `damaged/` and the log
/// directory are each synced. Method: call the move on real files with a sync that records
/// the paths.
#[test]
fn moving_damaged_segments_aside_syncs_the_new_directory_and_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let os_dir = crate::storage::fs::OsDir::open(dir.path()).unwrap();
    let segments: Vec<(u64, String)> = [4u64, 5]
        .iter()
        .map(|&id| {
            let name = segment_name(id);
            std::fs::write(dir.path().join(&name), format::segment_header(id)).unwrap();
            (id, name)
        })
        .collect();
    let mut synced = Vec::new();
    let mut record = |path: &std::path::Path| {
        synced.push(path.to_path_buf());
        recover::sync_dir(path)
    };
    recover::move_aside(&os_dir, Some(dir.path()), &segments, None, &mut record).unwrap();
    let damaged_root = dir.path().join(recover::DAMAGED_DIR);
    let moved_to: Vec<std::path::PathBuf> = std::fs::read_dir(&damaged_root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(moved_to.len(), 1, "{moved_to:?}");
    assert_eq!(synced, vec![moved_to[0].clone(), damaged_root]);
    assert_eq!(
        segment_files(&moved_to[0]),
        vec![segment_name(4), segment_name(5)]
    );
    assert!(segment_files(dir.path()).is_empty());

    // A failed directory sync fails the open, naming the directory.
    let (id, name) = (6u64, segment_name(6));
    std::fs::write(dir.path().join(&name), format::segment_header(id)).unwrap();
    let mut failing = |_: &std::path::Path| Err(std::io::Error::other("injected"));
    let error = recover::move_aside(&os_dir, Some(dir.path()), &[(id, name)], None, &mut failing)
        .unwrap_err();
    assert!(error.to_string().contains("damaged"), "{error}");
}

/// Goal: the log directory's own entry is durable before anything in it is acknowledged
/// (`raft/` is created at a node's first start, and a vote given then must survive a power
/// cut). Method: the open's parent sync, with a sync that records its paths.
#[test]
fn opening_syncs_the_directory_that_holds_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("raft");
    let mut synced = Vec::new();
    let mut record = |path: &std::path::Path| {
        synced.push(path.to_path_buf());
        Ok(())
    };
    sync_parent(&log_dir, &mut record).unwrap();
    sync_parent(std::path::Path::new("raft"), &mut record).unwrap();
    assert_eq!(
        synced,
        vec![dir.path().to_path_buf(), std::path::PathBuf::from(".")]
    );
    let mut failing = |_: &std::path::Path| Err(std::io::Error::other("injected"));
    let error = sync_parent(&log_dir, &mut failing).unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&dir.path().display().to_string()),
        "{error}"
    );
    // The real open does it (and a real sync of a real directory succeeds).
    let (log, _) = NodeLog::open(&log_dir, config()).unwrap();
    log.close();
}

#[test]
fn the_segment_size_is_bounded_at_both_ends() {
    let dir = tempfile::tempdir().unwrap();
    let at = |segment_bytes| NodeLogConfig {
        segment_bytes,
        ..config()
    };
    for ok in [NODE_LOG_SEGMENT_BYTES_MIN, NODE_LOG_SEGMENT_BYTES_MAX] {
        let (log, _) = NodeLog::open(dir.path(), at(ok)).unwrap();
        log.close();
    }
    let error = NodeLog::open(dir.path(), at(NODE_LOG_SEGMENT_BYTES_MAX + 1)).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("above the maximum of 1073741824"),
        "{error}"
    );
    let error = NodeLog::open(dir.path(), at(NODE_LOG_SEGMENT_BYTES_MIN - 1)).unwrap_err();
    assert!(error.to_string().contains("below the minimum"), "{error}");
}

#[tokio::test]
async fn segments_rotate_and_dead_ones_are_deleted_after_purge() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = NodeLog::open(dir.path(), small_segments()).unwrap();
    let mut g0 = log.group(0);
    let mut g1 = log.group(1);
    for i in 1..=40 {
        g0.blocking_append([entry(1, i)]).await.unwrap();
    }
    g1.blocking_append([entry(1, 1)]).await.unwrap();
    // An append completes at its sync; rotation and deletion follow on the writer thread.
    log.barrier().await.unwrap();
    let before = segment_files(dir.path());
    assert!(before.len() >= 3, "{before:?}");
    // Group 0 purging everything is not enough: group 1's entry keeps its segment (and,
    // being a prefix deletion, the segments after it).
    g0.purge(log_id(1, 40)).await.unwrap();
    g0.blocking_append([entry(1, 41)]).await.unwrap();
    log.barrier().await.unwrap();
    let after_g0 = segment_files(dir.path());
    assert!(after_g0.len() < before.len(), "{before:?} -> {after_g0:?}");
    assert!(after_g0.contains(before.last().unwrap()));
    g1.purge(log_id(1, 1)).await.unwrap();
    g0.blocking_append([entry(1, 42)]).await.unwrap();
    log.barrier().await.unwrap();
    let after_both = segment_files(dir.path());
    assert_eq!(after_both.len(), 1, "{after_both:?}");
    assert!(log.disk_bytes() > 0);
    log.close();
    drop((g0, g1, log));
    let (log, recovery) = NodeLog::open(dir.path(), small_segments()).unwrap();
    assert_eq!(recovery.damage, None);
    let mut g0 = log.group(0);
    assert_eq!(indexes(&mut g0).await, vec![41, 42]);
    assert_eq!(
        g0.get_log_state().await.unwrap().last_purged_log_id,
        Some(log_id(1, 40))
    );
    assert_eq!(
        log.group(1).get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 1))
    );
}

#[tokio::test]
async fn an_oversized_entry_is_refused_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = NodeLog::open(dir.path(), config()).unwrap();
    let mut g = log.group(0);
    let big = Entry {
        log_id: log_id(1, 1),
        payload: EntryPayload::Normal(Proposal::Records {
            term: 1,
            records: bytes::Bytes::from(vec![0u8; format::RECORD_BYTES_MAX]),
        }),
    };
    let error = g.blocking_append([big]).await.unwrap_err();
    assert!(error.to_string().contains("limit"), "{error}");
    // Nothing was kept, and the log goes on.
    assert!(indexes(&mut g).await.is_empty());
    g.blocking_append([entry(1, 1)]).await.unwrap();
}

/// `BTreeMap::range` panics on an inverted range; openraft, a peer's request or a bug may
/// hand the reader one. Every such range, and every range past the log, reads as empty.
#[tokio::test]
async fn inverted_empty_and_out_of_log_ranges_read_empty_without_a_panic() {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = NodeLog::open(dir.path(), config()).unwrap();
    let mut g = log.group(0);
    g.blocking_append((1..=5).map(|i| entry(1, i)))
        .await
        .unwrap();
    let read = |range: (std::ops::Bound<u64>, std::ops::Bound<u64>)| {
        let mut g = g.clone();
        async move {
            g.try_get_log_entries(range)
                .await
                .unwrap()
                .iter()
                .map(|e| e.log_id.index)
                .collect::<Vec<_>>()
        }
    };
    let none: Vec<u64> = Vec::new();
    // Inverted.
    assert_eq!(read((Included(4), Excluded(2))).await, none);
    assert_eq!(read((Included(4), Included(3))).await, none);
    // Empty: both ends excluded at one index, an exclusive end at 0, an exclusive start at
    // the top of u64.
    assert_eq!(read((Excluded(3), Excluded(3))).await, none);
    assert_eq!(read((Excluded(3), Excluded(4))).await, none);
    assert_eq!(read((Unbounded, Excluded(0))).await, none);
    assert_eq!(read((Excluded(u64::MAX), Unbounded)).await, none);
    assert_eq!(read((Included(3), Excluded(3))).await, none);
    // Past the log, and overlapping its end.
    assert_eq!(read((Included(100), Excluded(200))).await, none);
    assert_eq!(read((Included(4), Excluded(200))).await, vec![4, 5]);
    assert_eq!(
        read((Included(0), Included(u64::MAX))).await,
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(read((Excluded(1), Included(2))).await, vec![2]);
    // The limited reader, inverted and at the top of u64.
    assert!(g.limited_get_log_entries(5, 2).await.unwrap().is_empty());
    assert!(g
        .limited_get_log_entries(u64::MAX, u64::MAX)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(g.limited_get_log_entries(2, 4).await.unwrap().len(), 2);
    // A group never written.
    assert!(log
        .group(9)
        .try_get_log_entries((Included(7), Excluded(3)))
        .await
        .unwrap()
        .is_empty());
}

#[test]
fn a_corrupt_length_is_refused_before_any_allocation() {
    let mut bytes = vec![0u8; 64];
    bytes[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(format::read_frame(&bytes)
        .unwrap_err()
        .contains("out of range"));
    // A checkpoint claiming 4 billion groups in a few bytes fails on the bytes, not memory.
    let mut frame = Vec::new();
    format::frame(
        format::RecordType::Checkpoint,
        &u32::MAX.to_le_bytes(),
        &mut frame,
    )
    .unwrap();
    let parsed = format::read_frame(&frame).unwrap().unwrap();
    assert!(format::decode(&parsed).unwrap_err().contains("truncated"));
}

#[test]
fn broker_log_frames_inside_entries_never_read_as_records_of_this_log() {
    // Same layout, another checksum domain.
    let mut ours = Vec::new();
    format::encode_truncate(0, 5, &mut ours);
    let mut broker_style = ours.clone();
    let len = &broker_style[0..4].to_vec();
    let crc = crc32c::crc32c_append(crc32c::crc32c(len), &broker_style[8..]);
    broker_style[4..8].copy_from_slice(&crc.to_le_bytes());
    assert!(format::read_frame(&ours).unwrap().is_some());
    assert!(format::read_frame(&broker_style).is_err());
}

/// A disk whose data syncs wait for a gate, and tell the test when they are waiting.
#[derive(Debug, Clone)]
struct GatedDisk {
    disk: SimDisk,
    gate: Arc<Gate>,
}

#[derive(Debug, Default)]
struct Gate {
    state: Mutex<(bool, u64)>,
    changed: parking_lot::Condvar,
}

impl Gate {
    fn set_open(&self, open: bool) {
        self.state.lock().0 = open;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut state = self.state.lock();
        state.1 += 1;
        self.changed.notify_all();
        while !state.0 {
            self.changed.wait(&mut state);
        }
    }

    /// Waits (bounded) until `n` syncs have reached the gate.
    fn wait_for_arrivals(&self, n: u64) {
        let mut state = self.state.lock();
        while state.1 < n {
            assert!(
                !self
                    .changed
                    .wait_for(&mut state, Duration::from_secs(30))
                    .timed_out(),
                "no sync reached the gate"
            );
        }
    }
}

/// Opens the gate when dropped.
struct Release(Arc<Gate>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.set_open(true);
    }
}

#[derive(Debug)]
struct GatedFile {
    file: Arc<dyn LogFile>,
    gate: Arc<Gate>,
}

impl LogDir for GatedDisk {
    fn list(&self) -> std::io::Result<Vec<String>> {
        self.disk.list()
    }
    fn open(&self, name: &str) -> std::io::Result<Arc<dyn LogFile>> {
        Ok(Arc::new(GatedFile {
            file: self.disk.open(name)?,
            gate: Arc::clone(&self.gate),
        }))
    }
    fn create(&self, name: &str) -> std::io::Result<Arc<dyn LogFile>> {
        Ok(Arc::new(GatedFile {
            file: self.disk.create(name)?,
            gate: Arc::clone(&self.gate),
        }))
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.disk.remove(name)
    }
    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        self.disk.rename(from, to)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.disk.sync()
    }
    fn describe(&self, name: &str) -> String {
        self.disk.describe(name)
    }
}

impl LogFile for GatedFile {
    fn size(&self) -> std::io::Result<u64> {
        self.file.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.gate.pass();
        self.file.sync_data()
    }
    fn sync_all(&self) -> std::io::Result<()> {
        self.gate.pass();
        self.file.sync_all()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }
    fn allocate(&self, len: u64) -> std::io::Result<()> {
        self.file.allocate(len)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_complete_only_after_the_sync_and_are_readable_before() {
    let gate = Arc::new(Gate::default());
    gate.set_open(true);
    let disk = GatedDisk {
        disk: SimDisk::new(),
        gate: Arc::clone(&gate),
    };
    let (log, _) = NodeLog::open_in(Arc::new(disk.clone()), None, None, config()).unwrap();
    let arrived = gate.state.lock().1;
    gate.set_open(false);
    // Whatever happens below, the writer is let go (a failed assertion must not leave the
    // log's drop waiting for a writer held at the gate).
    let _release = Release(Arc::clone(&gate));
    let mut g0 = log.group(0);
    let mut g1 = log.group(1);
    let first = tokio::spawn({
        let mut g0 = g0.clone();
        async move { g0.blocking_append((1..=3).map(|i| entry(1, i))).await }
    });
    // The writer is now held in the sync of the batch holding those entries.
    tokio::task::spawn_blocking({
        let gate = Arc::clone(&gate);
        move || gate.wait_for_arrivals(arrived + 1)
    })
    .await
    .unwrap();
    // Appended, not yet durable: readable, callback not called.
    assert_eq!(indexes(&mut g0).await, vec![1, 2, 3]);
    assert!(!first.is_finished());
    // Meanwhile two groups queue more (in the next batch or batches).
    let second = tokio::spawn({
        let mut g0 = g0.clone();
        async move { g0.blocking_append([entry(1, 4)]).await }
    });
    let third = tokio::spawn(async move { g1.blocking_append([entry(1, 1)]).await });
    let syncs_before = disk.disk.syncs();
    gate.set_open(true);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    third.await.unwrap().unwrap();
    // The sim disk lost nothing it acknowledged.
    assert!(disk.disk.syncs() > syncs_before);
    log.close();
    let rebooted = disk.disk.reboot(7);
    let (log, recovery) = NodeLog::open_in(Arc::new(rebooted), None, None, config()).unwrap();
    assert_eq!(recovery.damage, None);
    assert_eq!(indexes(&mut log.group(0)).await, vec![1, 2, 3, 4]);
    assert_eq!(indexes(&mut log.group(1)).await, vec![1]);
}

#[tokio::test]
async fn a_failed_sync_fails_the_batch_and_stops_the_log() {
    let disk = SimDisk::new();
    let (log, _) = NodeLog::open_in(Arc::new(disk.clone()), None, None, config()).unwrap();
    let mut g = log.group(0);
    g.blocking_append([entry(1, 1)]).await.unwrap();
    disk.fail_next_syncs(1);
    let error = g.blocking_append([entry(1, 2)]).await.unwrap_err();
    assert!(error.to_string().contains("fdatasync"), "{error}");
    // Never retried into a success: everything after fails too.
    assert!(g.blocking_append([entry(1, 3)]).await.is_err());
    assert!(g.save_vote(&vote(2, 1)).await.is_err());
    assert!(g.save_committed(None).await.is_err());
}

#[tokio::test]
async fn acknowledged_entries_survive_power_loss() {
    for seed in 0..8u64 {
        let disk = SimDisk::new();
        let (log, _) =
            NodeLog::open_in(Arc::new(disk.clone()), None, None, small_segments()).unwrap();
        let mut g = log.group(0);
        let mut acknowledged = 0;
        disk.crash_after(10 + seed * 7);
        for i in 1..=50 {
            if g.blocking_append([entry(1, i)]).await.is_err() {
                break;
            }
            acknowledged = i;
        }
        drop(g);
        drop(log);
        let rebooted = disk.reboot(seed);
        let (log, recovery) =
            NodeLog::open_in(Arc::new(rebooted), None, None, small_segments()).unwrap();
        assert_eq!(recovery.damage, None, "seed {seed}");
        let kept = indexes(&mut log.group(0)).await;
        assert!(kept.len() as u64 >= acknowledged, "seed {seed}: {kept:?}");
        assert_eq!(
            kept,
            (1..=kept.len() as u64).collect::<Vec<_>>(),
            "seed {seed}"
        );
    }
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, _) = NodeLog::open(dir.path(), config()).unwrap();
    let error = NodeLog::open(dir.path(), config()).unwrap_err();
    assert!(error.to_string().contains("in use"), "{error}");
}

/// A log config whose cache holds at most `cache_bytes` of entry records.
fn with_cache(config: NodeLogConfig, cache_bytes: u64) -> NodeLogConfig {
    NodeLogConfig {
        cache_bytes,
        ..config
    }
}

/// Bytes of the record of [`entry`] (the same for every index and term).
fn entry_record_bytes() -> u64 {
    let mut bytes = Vec::new();
    format::encode_entry(0, &entry(1, 1), &mut bytes).unwrap();
    bytes.len() as u64
}

/// Goal: entries the cache no longer holds are read back from the segment files exactly as
/// they were appended, and the cache stays within its budget. Method: a cache of three
/// records, entries across several small segments; read everything (from disk but the newest
/// three), then the newest alone (from memory); the per-call byte bound at, below and past
/// one record.
#[tokio::test]
async fn entries_evicted_from_the_cache_are_read_back_from_disk_as_appended() {
    let disk = SimDisk::new();
    let record = entry_record_bytes();
    let config = with_cache(small_segments(), 3 * record);
    let (log, _) = NodeLog::open_in(Arc::new(disk.clone()), None, None, config).unwrap();
    let mut g = log.group(0);
    for i in 1..=40 {
        g.blocking_append([entry(1, i)]).await.unwrap();
    }
    log.barrier().await.unwrap();
    assert!(segment_files_on(&disk).len() >= 3);
    assert_eq!(log.cache_bytes(), 3 * record);
    let all = g.try_get_log_entries(..).await.unwrap();
    assert_eq!(all, (1..=40).map(|i| entry(1, i)).collect::<Vec<_>>());
    assert_eq!(log.disk_reads(), 37);
    // The newest three come from memory.
    let newest = g.try_get_log_entries(38..=40).await.unwrap();
    assert_eq!(newest, (38..=40).map(|i| entry(1, i)).collect::<Vec<_>>());
    assert_eq!(log.disk_reads(), 37);
    // The byte bound of one call: exactly three records fit, a byte less only two, and a
    // bound below one record still returns one (never an empty answer to a non-empty range).
    let indexes = |entries: Vec<Entry<TypeConfig>>| {
        entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>()
    };
    let bounded = |bytes| g.read_entries(5..=20, Some(bytes)).map(indexes);
    assert_eq!(bounded(3 * record).unwrap(), vec![5, 6, 7]);
    assert_eq!(bounded(3 * record - 1).unwrap(), vec![5, 6]);
    assert_eq!(bounded(0).unwrap(), vec![5]);
    assert_eq!(
        indexes(g.limited_get_log_entries(1, 41).await.unwrap()).len(),
        40
    );
}

/// The segment files on a simulated disk, in order.
fn segment_files_on(disk: &SimDisk) -> Vec<String> {
    let mut names: Vec<String> = disk.list().unwrap();
    names.retain(|n| segment_id(n).is_some());
    names.sort();
    names
}

/// Goal: after a restart the entries recovery kept are served from the files (recovery holds
/// no bodies), equal to what was appended, every group's. Method: append to two groups,
/// truncate and append again in one, reopen, read.
#[tokio::test]
async fn after_reopen_entries_are_read_from_disk() {
    let disk = SimDisk::new();
    {
        let (log, _) =
            NodeLog::open_in(Arc::new(disk.clone()), None, None, small_segments()).unwrap();
        let mut g0 = log.group(0);
        g0.blocking_append((1..=20).map(|i| entry(1, i)))
            .await
            .unwrap();
        g0.truncate(log_id(1, 15)).await.unwrap();
        g0.blocking_append((15..=17).map(|i| entry(2, i)))
            .await
            .unwrap();
        g0.purge(log_id(1, 3)).await.unwrap();
        log.group(5)
            .blocking_append((1..=3).map(|i| entry(4, i)))
            .await
            .unwrap();
        log.close();
    }
    let (log, recovery) =
        NodeLog::open_in(Arc::new(disk.clone()), None, None, small_segments()).unwrap();
    assert_eq!(recovery.damage, None);
    assert_eq!(log.cache_bytes(), 0);
    assert_eq!(log.disk_reads(), 0);
    let expected: Vec<Entry<TypeConfig>> = (4..=14)
        .map(|i| entry(1, i))
        .chain((15..=17).map(|i| entry(2, i)))
        .collect();
    assert_eq!(
        log.group(0).try_get_log_entries(..).await.unwrap(),
        expected
    );
    assert_eq!(
        log.group(5).try_get_log_entries(..).await.unwrap(),
        (1..=3).map(|i| entry(4, i)).collect::<Vec<_>>()
    );
    assert_eq!(log.disk_reads(), 14 + 3);
}

/// Goal: a truncation and a new append of the same indexes, both queued before the writer
/// wrote the entries they replace, leave the new entries readable, from the cache and from
/// the files: the writer records a location only in the slot still holding the entry it
/// wrote. Method: hold the writer in the sync of a vote; queue 2-4 of term 1, a truncation
/// from 3 and 3-4 of term 2; let it go; read (with the cache, then with none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncation_and_new_append_before_the_write_read_as_the_new_entries() {
    for cache_bytes in [NODE_LOG_CACHE_BYTES_DEFAULT, 0] {
        let gate = Arc::new(Gate::default());
        gate.set_open(true);
        let disk = GatedDisk {
            disk: SimDisk::new(),
            gate: Arc::clone(&gate),
        };
        let config = with_cache(config(), cache_bytes);
        let (log, _) = NodeLog::open_in(Arc::new(disk.clone()), None, None, config).unwrap();
        let mut g = log.group(0);
        g.blocking_append([entry(1, 1)]).await.unwrap();
        let arrived = gate.state.lock().1;
        gate.set_open(false);
        let _release = Release(Arc::clone(&gate));
        let voted = tokio::spawn({
            let mut g = g.clone();
            async move { g.save_vote(&vote(2, 1)).await }
        });
        tokio::task::spawn_blocking({
            let gate = Arc::clone(&gate);
            move || gate.wait_for_arrivals(arrived + 1)
        })
        .await
        .unwrap();
        // Queued behind the held batch, each visible (so queued) before the next: an append
        // queues its entries when first polled and then waits for the writer.
        let reader = g.clone();
        let queued = |expected: Vec<LogId<NodeId>>| {
            let mut g = reader.clone();
            async move {
                let now: Vec<LogId<NodeId>> = g
                    .try_get_log_entries(..)
                    .await
                    .unwrap()
                    .iter()
                    .map(|e| e.log_id)
                    .collect();
                assert_eq!(now, expected, "not queued");
            }
        };
        let mut old = Box::pin({
            let mut g = g.clone();
            async move { g.blocking_append((2..=4).map(|i| entry(1, i))).await }
        });
        assert!(futures::poll!(&mut old).is_pending());
        queued((1..=4).map(|i| log_id(1, i)).collect()).await;
        g.truncate(log_id(1, 3)).await.unwrap();
        let mut new = Box::pin({
            let mut g = g.clone();
            async move { g.blocking_append((3..=4).map(|i| entry(2, i))).await }
        });
        assert!(futures::poll!(&mut new).is_pending());
        let expected_ids = vec![log_id(1, 1), log_id(1, 2), log_id(2, 3), log_id(2, 4)];
        queued(expected_ids.clone()).await;
        assert!(futures::poll!(&mut old).is_pending() && futures::poll!(&mut new).is_pending());
        gate.set_open(true);
        voted.await.unwrap().unwrap();
        old.await.unwrap();
        new.await.unwrap();
        log.barrier().await.unwrap();
        let before = log.disk_reads();
        let expected = vec![entry(1, 1), entry(1, 2), entry(2, 3), entry(2, 4)];
        assert_eq!(g.try_get_log_entries(..).await.unwrap(), expected);
        let from_disk = log.disk_reads() - before;
        if cache_bytes == 0 {
            assert_eq!(from_disk, 4);
        } else {
            assert_eq!(from_disk, 0);
        }
        // And the same after a restart, from the files.
        log.close();
        drop((g, log));
        let (log, recovery) =
            NodeLog::open_in(Arc::new(disk.disk.clone()), None, None, config).unwrap();
        assert_eq!(recovery.damage, None);
        assert_eq!(
            log.group(0).try_get_log_entries(..).await.unwrap(),
            expected
        );
    }
}

/// Goal: a damaged record under an entry the cache does not hold fails the read with an error
/// naming the file and the offset: never a panic, never a wrong entry. Method: no cache; flip
/// a byte in entry 3's record after it was written; read ranges with and without it.
#[tokio::test]
async fn a_flipped_byte_under_an_uncached_entry_fails_the_read_naming_file_and_offset() {
    let disk = SimDisk::new();
    let (log, _) =
        NodeLog::open_in(Arc::new(disk.clone()), None, None, with_cache(config(), 0)).unwrap();
    let mut g = log.group(0);
    g.blocking_append((1..=5).map(|i| entry(1, i)))
        .await
        .unwrap();
    log.barrier().await.unwrap();
    let name = segment_files_on(&disk).pop().unwrap();
    let mut bytes = disk.read_file(&name).unwrap();
    let (three, _) = *records(&bytes)
        .iter()
        .find(|(_, r)| matches!(r, format::Record::Entry { entry, .. } if entry.log_id.index == 3))
        .unwrap();
    bytes[three + 60] ^= 0x08;
    disk.write_file(&name, bytes);

    let file = disk.describe(&name);
    let wanted = format!("at offset {three} of {file}");
    for error in [
        g.try_get_log_entries(3..4).await.unwrap_err(),
        g.try_get_log_entries(..).await.unwrap_err(),
        g.limited_get_log_entries(2, 5).await.unwrap_err(),
    ] {
        let error = error.to_string();
        assert!(error.contains(&wanted), "{error}");
        assert!(error.contains("checksum"), "{error}");
    }
    // The intact ones around it still read.
    assert_eq!(
        g.try_get_log_entries(1..3).await.unwrap(),
        vec![entry(1, 1), entry(1, 2)]
    );
    assert_eq!(
        g.try_get_log_entries(4..).await.unwrap(),
        vec![entry(1, 4), entry(1, 5)]
    );
}

/// Goal: deleting dead segments never takes a record an entry still needs. Method: no cache,
/// small segments; purge half, let the dead segments go, read every entry left from disk.
#[tokio::test]
async fn entries_left_after_a_purge_read_from_the_segments_kept() {
    let disk = SimDisk::new();
    let config = with_cache(small_segments(), 0);
    let (log, _) = NodeLog::open_in(Arc::new(disk.clone()), None, None, config).unwrap();
    let mut g = log.group(0);
    for i in 1..=60 {
        g.blocking_append([entry(1, i)]).await.unwrap();
    }
    log.barrier().await.unwrap();
    let before = segment_files_on(&disk);
    g.purge(log_id(1, 30)).await.unwrap();
    g.blocking_append([entry(1, 61)]).await.unwrap();
    log.barrier().await.unwrap();
    let after = segment_files_on(&disk);
    assert!(after.len() < before.len(), "{before:?} -> {after:?}");
    assert_eq!(
        g.try_get_log_entries(..).await.unwrap(),
        (31..=61).map(|i| entry(1, i)).collect::<Vec<_>>()
    );
    assert_eq!(log.disk_reads(), 31);
}

/// An entry whose record is about `size` bytes plus 77 of framing, its bytes differing with
/// the index and the position (so a record read from the wrong place never compares equal).
fn entry_sized(term: u64, index: u64, size: usize) -> Entry<TypeConfig> {
    let records: Vec<u8> = (0..size)
        .map(|j| (index as usize * 31 + j * 7) as u8)
        .collect();
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Proposal::Records {
            term,
            records: bytes::Bytes::from(records),
        }),
    }
}

/// Sizes of entry bodies for the direct-write tests: none makes a record a multiple of a
/// block, some are larger than one.
const ODD_SIZES: [usize; 9] = [1, 100, 4_093, 9_999, 33_333, 5, 70_001, 12_345, 2_049];

/// Appends to group 0, one acknowledged batch at a time, `rounds` batches of one to three
/// entries of [`ODD_SIZES`] and then one batch larger than the writer's chunk (so that it
/// goes out in several writes); returns what it appended, in order.
async fn append_odd_batches(g: &mut GroupLog, rounds: usize) -> Vec<Entry<TypeConfig>> {
    let mut appended = Vec::new();
    let mut index = 1;
    for (round, &size) in ODD_SIZES.iter().cycle().take(rounds).enumerate() {
        let batch: Vec<Entry<TypeConfig>> = (0..round % 3 + 1)
            .map(|k| entry_sized(1, index + k as u64, size + k))
            .collect();
        index += batch.len() as u64;
        appended.extend(batch.iter().cloned());
        g.blocking_append(batch).await.unwrap();
    }
    let chunk = crate::limits::storage::BATCH_CHUNK_BYTES;
    let large: Vec<Entry<TypeConfig>> = (0..5)
        .map(|k| entry_sized(1, index + k, chunk / 4 + 777))
        .collect();
    appended.extend(large.iter().cloned());
    g.blocking_append(large).await.unwrap();
    appended
}

/// A config for the direct-write tests: segments of 64 KiB (a rotation every few batches),
/// no cache (every read goes to the files).
fn odd_batches_config() -> NodeLogConfig {
    NodeLogConfig {
        fsync: FsyncMode::Always,
        segment_bytes: 64 * 1024,
        cache_bytes: 0,
    }
}

/// Goal: with `fsync = always` every batch is written around the page cache, in whole aligned
/// blocks, and every entry reads back as appended, through the reader and after a reopen;
/// the segment files end with their data or with zeros to the end of its block, and
/// `disk_bytes` is what they take. Method: on the simulated disk (which counts the direct
/// writes that were aligned), batches of odd sizes across several segments and one batch
/// larger than the writer's chunk; no cache.
#[tokio::test]
async fn batches_of_odd_sizes_go_around_the_page_cache_and_read_back_as_appended() {
    let disk = SimDisk::new();
    let (log, _) =
        NodeLog::open_in(Arc::new(disk.clone()), None, None, odd_batches_config()).unwrap();
    let mut g = log.group(0);
    let appended = append_odd_batches(&mut g, 30).await;
    log.barrier().await.unwrap();
    let names = segment_files_on(&disk);
    assert!(names.len() >= 4, "{names:?}");
    // Every write of every batch went around the page cache, aligned.
    assert!(log.direct_writes() > 31, "{}", log.direct_writes());
    assert_eq!(disk.direct_writes(), log.direct_writes());
    assert_eq!(disk.unaligned_direct_writes(), 0);
    let mut file_bytes = 0;
    for name in &names {
        let bytes = disk.read_file(name).unwrap();
        file_bytes += bytes.len() as u64;
        segment_data(name, bytes);
    }
    assert_eq!(log.disk_bytes(), file_bytes);
    assert_eq!(g.try_get_log_entries(..).await.unwrap(), appended);
    assert_eq!(log.disk_reads(), appended.len() as u64);
    drop(g);
    log.close();
    drop(log);
    let (log, recovery) =
        NodeLog::open_in(Arc::new(disk.clone()), None, None, odd_batches_config()).unwrap();
    assert_eq!(recovery.damage, None);
    assert_eq!(recovery.torn_tail_cut, None);
    assert_eq!(recovery.entries, appended.len() as u64);
    assert_eq!(
        log.group(0).try_get_log_entries(..).await.unwrap(),
        appended
    );
}

/// Goal: the same on a real file system, where the writes go through `O_DIRECT` (on one
/// that refuses it, through the page cache: the bytes are the same). Method: as above, in a
/// temporary directory; the files are read with plain reads.
#[tokio::test]
async fn batches_of_odd_sizes_written_direct_to_real_files_read_back_as_appended() {
    let dir = tempfile::tempdir().unwrap();
    let appended;
    {
        let (log, _) = NodeLog::open(dir.path(), odd_batches_config()).unwrap();
        let mut g = log.group(0);
        appended = append_odd_batches(&mut g, 30).await;
        log.barrier().await.unwrap();
        assert!(log.direct_writes() > 31, "{}", log.direct_writes());
        let names = segment_files(dir.path());
        assert!(names.len() >= 4, "{names:?}");
        let mut file_bytes = 0;
        for name in &names {
            let bytes = std::fs::read(dir.path().join(name)).unwrap();
            file_bytes += bytes.len() as u64;
            segment_data(name, bytes);
        }
        assert_eq!(log.disk_bytes(), file_bytes);
        assert_eq!(g.try_get_log_entries(..).await.unwrap(), appended);
        log.close();
    }
    let (log, recovery) = NodeLog::open(dir.path(), odd_batches_config()).unwrap();
    assert_eq!(recovery.damage, None);
    assert_eq!(recovery.torn_tail_cut, None);
    assert_eq!(
        log.group(0).try_get_log_entries(..).await.unwrap(),
        appended
    );
}

/// Goal: a power cut in the middle of direct writes loses no acknowledged entry, and what
/// comes back beyond them is what was appended (never damage: a torn direct write leaves the
/// bytes before it in its first block as they were). Method: single entries of odd sizes
/// (one per batch, so that a torn batch is a torn tail), a crash after a varying number of
/// disk operations, a reboot that keeps, drops or tears each unsynced write, a reopen.
#[tokio::test]
async fn acknowledged_entries_written_direct_survive_power_loss() {
    let config = NodeLogConfig {
        segment_bytes: 16 * 1024,
        ..odd_batches_config()
    };
    for seed in 0..12u64 {
        let disk = SimDisk::new();
        let (log, _) = NodeLog::open_in(Arc::new(disk.clone()), None, None, config).unwrap();
        let mut g = log.group(0);
        let mut appended = Vec::new();
        let mut acknowledged = 0;
        disk.crash_after(20 + seed * 9);
        for (i, &size) in ODD_SIZES.iter().cycle().take(60).enumerate() {
            let e = entry_sized(1, i as u64 + 1, size);
            appended.push(e.clone());
            if g.blocking_append([e]).await.is_err() {
                break;
            }
            acknowledged = i + 1;
        }
        assert!(disk.is_crashed(), "seed {seed}: no crash");
        assert!(log.direct_writes() > 0, "seed {seed}");
        drop(g);
        drop(log);
        let rebooted = disk.reboot(seed);
        let (log, recovery) = NodeLog::open_in(Arc::new(rebooted), None, None, config).unwrap();
        assert_eq!(recovery.damage, None, "seed {seed}");
        let kept = log.group(0).try_get_log_entries(..).await.unwrap();
        assert!(
            kept.len() >= acknowledged,
            "seed {seed}: {} kept, {acknowledged} acknowledged",
            kept.len()
        );
        assert!(kept == appended[..kept.len()], "seed {seed}");
    }
}

/// A disk whose files cannot be read from the log's writer thread: the writer cannot read a
/// block's earlier bytes back, so it writes through the page cache.
#[derive(Debug)]
struct NoReadBack(SimDisk);

#[derive(Debug)]
struct NoReadBackFile(Arc<dyn LogFile>);

impl LogDir for NoReadBack {
    fn list(&self) -> std::io::Result<Vec<String>> {
        self.0.list()
    }
    fn open(&self, name: &str) -> std::io::Result<Arc<dyn LogFile>> {
        Ok(Arc::new(NoReadBackFile(self.0.open(name)?)))
    }
    fn create(&self, name: &str) -> std::io::Result<Arc<dyn LogFile>> {
        Ok(Arc::new(NoReadBackFile(self.0.create(name)?)))
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.0.remove(name)
    }
    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        self.0.rename(from, to)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
    fn describe(&self, name: &str) -> String {
        self.0.describe(name)
    }
}

impl LogFile for NoReadBackFile {
    fn size(&self) -> std::io::Result<u64> {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if std::thread::current().name() == Some("raft-log-writer") {
            return Err(std::io::Error::other("no reads on the writer thread"));
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn write_direct_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_direct_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&self) -> std::io::Result<()> {
        self.0.sync_all()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn allocate(&self, len: u64) -> std::io::Result<()> {
        self.0.allocate(len)
    }
}

/// Goal: when direct writes are refused, the log works as before: by a file system without
/// direct I/O (the file takes the direct writes as plain ones), and by the writer itself
/// when it cannot read back the bytes a direct write would write again (it writes the batch
/// through the page cache, from where the data ends). Method: the odd batches on a simulated
/// disk that refuses direct writes, then on one the writer cannot read from; read back,
/// reopen, read back.
#[tokio::test]
async fn refused_direct_writes_fall_back_to_the_page_cache() {
    for refused_by in ["file system", "writer"] {
        let disk = SimDisk::new();
        let dir: Arc<dyn LogDir> = if refused_by == "file system" {
            disk.refuse_direct(true);
            Arc::new(disk.clone())
        } else {
            Arc::new(NoReadBack(disk.clone()))
        };
        let (log, _) =
            NodeLog::open_in(Arc::clone(&dir), None, None, odd_batches_config()).unwrap();
        let mut g = log.group(0);
        let appended = append_odd_batches(&mut g, 20).await;
        log.barrier().await.unwrap();
        assert_eq!(disk.unaligned_direct_writes(), 0, "{refused_by}");
        if refused_by == "file system" {
            // Asked for, taken as plain writes.
            assert!(log.direct_writes() > 0);
            assert_eq!(disk.direct_writes(), 0);
        } else {
            // A batch written through the page cache that crosses a block boundary leaves the
            // writer the new last block's bytes, so the next batch goes direct again: some
            // did each way, and every direct one was aligned.
            let appended_bytes: u64 = appended
                .iter()
                .map(|e| {
                    let mut record = Vec::new();
                    format::encode_entry(0, e, &mut record).unwrap();
                    record.len() as u64
                })
                .sum();
            assert!(log.direct_bytes() > 0);
            assert!(log.direct_bytes() < appended_bytes);
            assert_eq!(disk.direct_writes(), log.direct_writes());
        }
        let names = segment_files_on(&disk);
        assert!(names.len() >= 3, "{refused_by}: {names:?}");
        for name in &names {
            segment_data(name, disk.read_file(name).unwrap());
        }
        assert_eq!(
            g.try_get_log_entries(..).await.unwrap(),
            appended,
            "{refused_by}"
        );
        drop(g);
        log.close();
        drop(log);
        let (log, recovery) = NodeLog::open_in(dir, None, None, odd_batches_config()).unwrap();
        assert_eq!(recovery.damage, None, "{refused_by}");
        assert_eq!(recovery.torn_tail_cut, None, "{refused_by}");
        assert_eq!(
            log.group(0).try_get_log_entries(..).await.unwrap(),
            appended,
            "{refused_by}"
        );
    }
}

/// Goal: only the zeros a direct write leaves (to the end of the last record's block) are the
/// end of the data; more zeros than that are read as before: a torn tail in the newest
/// segment, damage in an older one. Method: a log of several segments on the simulated disk;
/// zeros added past the block's end of the newest, then of an older one; reopen each.
#[tokio::test]
async fn zeros_past_the_last_block_are_a_torn_tail_or_damage_not_padding() {
    let disk = SimDisk::new();
    {
        let (log, _) =
            NodeLog::open_in(Arc::new(disk.clone()), None, None, odd_batches_config()).unwrap();
        append_odd_batches(&mut log.group(0), 12).await;
        log.close();
    }
    let names = segment_files_on(&disk);
    assert!(names.len() >= 3, "{names:?}");
    let with_zeros = |name: &str| {
        let mut bytes = disk.read_file(name).unwrap();
        let end = data_end(&bytes);
        bytes.resize(end.next_multiple_of(DIRECT_ALIGN) + 8, 0);
        disk.write_file(name, bytes);
        end as u64
    };
    let newest = names.last().unwrap();
    let end = with_zeros(newest);
    let (log, recovery) =
        NodeLog::open_in(Arc::new(disk.clone()), None, None, odd_batches_config()).unwrap();
    assert_eq!(recovery.damage, None);
    assert_eq!(recovery.torn_tail_cut, Some((disk.describe(newest), end)));
    log.close();
    drop(log);
    let older = &names[names.len() - 2];
    let end = with_zeros(older);
    let (_log, recovery) =
        NodeLog::open_in(Arc::new(disk.clone()), None, None, odd_batches_config()).unwrap();
    let damage = recovery.damage.unwrap();
    assert_eq!((damage.file, damage.offset), (disk.describe(older), end));
}

/// A state machine that keeps only what openraft's suite asks about.
#[derive(Debug, Clone, Default)]
struct TestStateMachine {
    inner: Arc<Mutex<Machine>>,
}

#[derive(Debug, Default)]
struct Machine {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, PeerNode>,
    snapshot: Option<(SnapshotMeta<NodeId, PeerNode>, Vec<u8>)>,
}

impl RaftSnapshotBuilder<TypeConfig> for TestStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut machine = self.inner.lock();
        let meta = SnapshotMeta {
            last_log_id: machine.last_applied,
            last_membership: machine.membership.clone(),
            snapshot_id: format!("{:?}", machine.last_applied),
        };
        machine.snapshot = Some((meta.clone(), Vec::new()));
        Ok(Snapshot {
            meta,
            snapshot: crate::consensus::test_snapshots::file_of(&[]),
        })
    }
}

impl RaftStateMachine<TypeConfig> for TestStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, PeerNode>), StorageError<NodeId>>
    {
        let machine = self.inner.lock();
        Ok((machine.last_applied, machine.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut machine = self.inner.lock();
        let mut replies = Vec::new();
        for entry in entries {
            machine.last_applied = Some(entry.log_id);
            if let EntryPayload::Membership(membership) = &entry.payload {
                machine.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
            }
            replies.push(());
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        Ok(crate::consensus::test_snapshots::file_of(&[]))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, PeerNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = crate::consensus::test_snapshots::bytes_of(snapshot).await;
        let mut machine = self.inner.lock();
        machine.last_applied = meta.last_log_id;
        machine.membership = meta.last_membership.clone();
        machine.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let machine = self.inner.lock();
        Ok(machine.snapshot.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: crate::consensus::test_snapshots::file_of(data),
        }))
    }
}

/// Builds the suite's stores with a cache of `cache_bytes`.
struct Builder {
    cache_bytes: u64,
}

impl StoreBuilder<TypeConfig, GroupLog, TestStateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, GroupLog, TestStateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = NodeLog::open(dir.path(), with_cache(config(), self.cache_bytes)).unwrap();
        // A group other than 0, to show nothing assumes the broker's group.
        Ok((dir, log.group(3), TestStateMachine::default()))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(Builder {
        cache_bytes: NODE_LOG_CACHE_BYTES_DEFAULT,
    })
    .unwrap();
}

/// The same with every written entry read back from the files.
#[test]
fn openraft_storage_suite_passes_with_no_cache() {
    Suite::test_all(Builder { cache_bytes: 0 }).unwrap();
}

/// The bytes of a vector file under `spec/vectors/` (hex digits outside `#` comments,
/// whitespace ignored), as `tests/it/spec_vectors.rs` reads the wire vectors.
fn spec_vector(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("spec/vectors")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let digits: String = text
        .lines()
        .flat_map(|line| line.split('#').next().unwrap_or("").chars())
        .filter(|c| !c.is_whitespace())
        .collect();
    hex::decode(&digits).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Goal: `spec/storage.md` ("Raft log (cluster nodes)") describes the bytes the log writes.
/// Method: write a small fixed log (every record type, every entry payload), reopen it (the
/// new segment's checkpoint holds two groups), and compare both segment files with the
/// vectors the spec walks through.
#[tokio::test]
async fn golden_segments_match_the_spec_vectors() {
    let disk = SimDisk::new();
    let log_direct_writes = {
        let (log, _) = NodeLog::open_in(Arc::new(disk.clone()), None, None, config()).unwrap();
        let mut g0 = log.group(0);
        g0.save_vote(&Vote {
            leader_id: LeaderId::new(1, 1),
            committed: false,
        })
        .await
        .unwrap();
        let membership = openraft::Membership::new(
            vec![[1u64].into_iter().collect()],
            [(
                1u64,
                PeerNode {
                    peer: "p".to_owned(),
                    api: "a".to_owned(),
                    http: String::new(),
                },
            )]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        );
        g0.blocking_append([
            Entry {
                log_id: log_id(1, 1),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(1, 2),
                payload: EntryPayload::Membership(membership),
            },
            Entry {
                log_id: log_id(1, 3),
                payload: EntryPayload::Normal(Proposal::Records {
                    term: 1,
                    records: bytes::Bytes::from_static(b"abc"),
                }),
            },
            Entry {
                log_id: log_id(1, 4),
                payload: EntryPayload::Normal(Proposal::Tick {
                    term: 1,
                    now_ms: 1_000,
                }),
            },
        ])
        .await
        .unwrap();
        g0.save_vote(&vote(1, 1)).await.unwrap();
        g0.save_committed(Some(log_id(1, 2))).await.unwrap();
        g0.truncate(log_id(1, 4)).await.unwrap();
        g0.purge(log_id(1, 1)).await.unwrap();
        log.group(7).save_vote(&vote(2, 3)).await.unwrap();
        log.close();
        log.direct_writes()
    };
    // Written around the page cache: the file ends with zeros to its block's end.
    assert!(log_direct_writes > 0);
    assert_eq!(disk.direct_writes(), log_direct_writes);
    let first = disk.read_file(&segment_name(1)).unwrap();
    assert_eq!(first.len() % DIRECT_ALIGN, 0);
    let first = segment_data("segment 1", first);
    assert_eq!(
        hex::encode(&first),
        hex::encode(spec_vector("raft-log/segment-1.hex")),
        "segment 1"
    );
    let (log, recovery) = NodeLog::open_in(Arc::new(disk.clone()), None, None, config()).unwrap();
    assert_eq!(recovery.damage, None);
    assert_eq!(indexes(&mut log.group(0)).await, vec![2, 3]);
    log.close();
    let second = segment_data("segment 2", disk.read_file(&segment_name(2)).unwrap());
    assert_eq!(
        hex::encode(&second),
        hex::encode(spec_vector("raft-log/segment-2.hex")),
        "segment 2"
    );
}
