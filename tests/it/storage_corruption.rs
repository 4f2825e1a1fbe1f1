//! Damage to the log on real files. A torn tail of the newest segment (bytes after the synced
//! position the manifest records, with no intact batch after them: what a crash during a write
//! leaves) is cut off. Anything else (damage before the synced position, a bad record with an
//! intact batch after it, any damage in a sealed segment, a listed segment missing) stops the
//! broker with an error naming the file and the offset, and is never skipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use cmqd::clock::{Clock, ManualClock};
use cmqd::engine::{Engine, EngineConfig};
use cmqd::model::QueueAttributeSet;
use cmqd::storage::log::{
    FsyncMode, LogConfig, LogStorage, DIRECT_WRITE_MIN_BYTES, REMOVAL_STEP_BYTES,
};
use cmqd::storage::Storage;

fn config() -> LogConfig {
    LogConfig {
        fsync: FsyncMode::Always,
        segment_bytes: 64 * 1024,
        maintenance_interval: Duration::from_secs(3600),
        threaded: false,
        body_cache_bytes: u64::MAX,
        direct_write_min_bytes: DIRECT_WRITE_MIN_BYTES,
        removal_step_bytes: REMOVAL_STEP_BYTES,
        // Segments preallocated as without spares: the other storage tests make them from
        // spares, so both ways a segment starts are read back here.
        spare_segment: false,
        disk_bytes_max: 0,
    }
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(1_700_000_000_000))
}

/// Opens the log in `dir`, loads it into a new engine and returns both.
fn open(dir: &Path) -> Result<(LogStorage, Engine), String> {
    let storage = LogStorage::open(dir, config(), clock()).map_err(|e| e.0.to_string())?;
    let engine = Engine::new(EngineConfig::default());
    storage.recover(&engine).map_err(|e| e.0.to_string())?;
    Ok((storage, engine))
}

/// Writes `count` sends of `size`-byte bodies, one commit each; returns the segment files.
fn write_messages(dir: &Path, count: usize, size: usize) -> Vec<PathBuf> {
    write_messages_with_manifest(dir, count, size).0
}

/// As [`write_messages`], and returns the manifest as it was before the sends (what a crash
/// before the writer next recorded the synced position would leave).
fn write_messages_with_manifest(dir: &Path, count: usize, size: usize) -> (Vec<PathBuf>, Vec<u8>) {
    let (storage, engine) = open(dir).unwrap();
    let manifest = std::fs::read(dir.join("log/MANIFEST")).unwrap();
    let clock = clock();
    let mut out = Vec::new();
    if engine.queue_count() == 0 {
        engine
            .create_queue(
                "acct",
                "q",
                &QueueAttributeSet::default(),
                clock.now_ms(),
                &mut out,
            )
            .unwrap();
    }
    for i in 0..count {
        let body = Bytes::from(vec![b'a' + (i % 26) as u8; size]);
        engine
            .send("acct", "q", &[body], 0, clock.now_ms(), &mut out)
            .unwrap();
        let _ = storage.append(std::mem::take(&mut out));
        storage.pump();
    }
    storage.close();
    (segments(dir), manifest)
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    files
}

fn stored(dir: &Path) -> Result<usize, String> {
    open(dir).map(|(storage, _)| storage.recovery().messages)
}

/// Offset just past the last non-zero byte (the end of the records in a preallocated file).
fn data_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

#[test]
fn a_flipped_bit_in_the_tail_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (files, manifest) = write_messages_with_manifest(dir.path(), 10, 200);
    // The broker stopped before it recorded the last batches as synced.
    std::fs::write(dir.path().join("log/MANIFEST"), &manifest).unwrap();
    let newest = files.last().unwrap();
    let mut bytes = std::fs::read(newest).unwrap();
    let end = data_end(&bytes);
    // Inside the body of the last send.
    bytes[end - 50] ^= 0x10;
    std::fs::write(newest, &bytes).unwrap();
    let (storage, _engine) = open(dir.path()).unwrap();
    let report = storage.recovery().clone();
    let (file, offset, _) = report.truncated.expect("the damaged tail was cut");
    assert!(file.ends_with(".seg") && offset > 0 && offset < end as u64);
    assert_eq!(report.messages, 9);
    drop(storage);
    // Repaired for good: the next start finds nothing wrong.
    let (storage, _engine) = open(dir.path()).unwrap();
    assert!(storage.recovery().truncated.is_none());
    assert_eq!(storage.recovery().messages, 9);
}

#[test]
fn a_truncated_tail_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (files, manifest) = write_messages_with_manifest(dir.path(), 10, 200);
    std::fs::write(dir.path().join("log/MANIFEST"), &manifest).unwrap();
    let newest = files.last().unwrap();
    let bytes = std::fs::read(newest).unwrap();
    let end = data_end(&bytes);
    // The file ends in the middle of the last record (a write torn at a sector boundary).
    std::fs::write(newest, &bytes[..end - 100]).unwrap();
    assert_eq!(stored(dir.path()), Ok(9));
}

#[test]
fn garbage_after_the_tail_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_messages(dir.path(), 10, 200);
    let newest = files.last().unwrap();
    let mut bytes = std::fs::read(newest).unwrap();
    let end = data_end(&bytes);
    bytes[end + 700..end + 900].fill(0xAB);
    std::fs::write(newest, &bytes).unwrap();
    let (storage, _engine) = open(dir.path()).unwrap();
    assert_eq!(storage.recovery().messages, 10);
    assert!(storage.recovery().truncated.is_some());
}

#[test]
fn a_flipped_bit_before_the_synced_position_stops_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_messages(dir.path(), 10, 200);
    let newest = files.last().unwrap();
    let mut bytes = std::fs::read(newest).unwrap();
    // The last send, which the manifest records as synced.
    let end = data_end(&bytes);
    bytes[end - 50] ^= 0x10;
    std::fs::write(newest, &bytes).unwrap();
    assert_refused(dir.path(), newest);
}

#[test]
fn a_flipped_bit_with_a_later_batch_after_it_stops_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let (files, manifest) = write_messages_with_manifest(dir.path(), 10, 200);
    // Even with the synced position behind it: every batch was synced before the next one.
    std::fs::write(dir.path().join("log/MANIFEST"), &manifest).unwrap();
    let newest = files.last().unwrap();
    let mut bytes = std::fs::read(newest).unwrap();
    let end = data_end(&bytes);
    bytes[end / 2] ^= 0x10;
    std::fs::write(newest, &bytes).unwrap();
    assert_refused(dir.path(), newest);
    let error = stored(dir.path()).unwrap_err();
    assert!(error.contains("intact later batch"), "{error}");
}

#[test]
fn a_newest_segment_cut_before_the_synced_position_stops_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_messages(dir.path(), 10, 200);
    let newest = files.last().unwrap();
    let bytes = std::fs::read(newest).unwrap();
    let end = data_end(&bytes);
    std::fs::write(newest, &bytes[..end - 100]).unwrap();
    assert_refused(dir.path(), newest);
    // Cut to its header: not taken for a segment whose creation never completed.
    std::fs::write(newest, &bytes[..24]).unwrap();
    assert_refused(dir.path(), newest);
}

#[test]
fn a_missing_segment_stops_the_broker() {
    for which in [0, 1] {
        let dir = tempfile::tempdir().unwrap();
        let sealed = sealed_log(dir.path());
        let files = segments(dir.path());
        let gone = if which == 0 {
            sealed
        } else {
            files.last().unwrap().clone()
        };
        std::fs::remove_file(&gone).unwrap();
        let error = stored(dir.path()).expect_err("a missing segment was not noticed");
        let name = gone.file_name().unwrap().to_str().unwrap();
        assert!(error.contains(name) && error.contains("missing"), "{error}");
    }
}

/// A log whose first segment is sealed: written, reopened (which seals it), closed.
fn sealed_log(dir: &Path) -> PathBuf {
    write_messages(dir, 10, 200);
    let files = write_messages(dir, 1, 200);
    assert!(files.len() >= 2, "{files:?}");
    files[0].clone()
}

fn assert_refused(dir: &Path, file: &Path) {
    let error = stored(dir).expect_err("damage in a sealed segment was not reported");
    let name = file.file_name().unwrap().to_str().unwrap();
    assert!(
        error.contains(name),
        "error does not name the file: {error}"
    );
    assert!(
        error.contains("offset"),
        "error does not give the offset: {error}"
    );
    // Reported every time, never repaired on the way.
    assert_eq!(stored(dir).unwrap_err(), error);
}

#[test]
fn a_flipped_bit_in_a_sealed_segment_stops_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = sealed_log(dir.path());
    let mut bytes = std::fs::read(&sealed).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&sealed, &bytes).unwrap();
    assert_refused(dir.path(), &sealed);
}

#[test]
fn a_truncated_sealed_segment_stops_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = sealed_log(dir.path());
    let bytes = std::fs::read(&sealed).unwrap();
    std::fs::write(&sealed, &bytes[..bytes.len() - 30]).unwrap();
    assert_refused(dir.path(), &sealed);
}

#[test]
fn zeros_inside_a_sealed_segment_stop_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = sealed_log(dir.path());
    let mut bytes = std::fs::read(&sealed).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 600].fill(0);
    std::fs::write(&sealed, &bytes).unwrap();
    assert_refused(dir.path(), &sealed);
}

#[test]
fn a_damaged_segment_header_stops_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = sealed_log(dir.path());
    let mut bytes = std::fs::read(&sealed).unwrap();
    bytes[2] ^= 0xFF;
    std::fs::write(&sealed, &bytes).unwrap();
    assert_refused(dir.path(), &sealed);
}

#[test]
fn a_damaged_manifest_stops_the_broker_and_repair_reads_every_segment() {
    let dir = tempfile::tempdir().unwrap();
    sealed_log(dir.path());
    let manifest = dir.path().join("log/MANIFEST");
    let mut bytes = std::fs::read(&manifest).unwrap();
    bytes[20] ^= 0x01;
    std::fs::write(&manifest, &bytes).unwrap();
    let error = stored(dir.path()).unwrap_err();
    assert!(
        error.contains("MANIFEST") && error.contains("offset"),
        "{error}"
    );
    let report = cmqd::storage::log::repair(dir.path(), 64 * 1024).unwrap();
    assert!(!report.lost_anything(), "{}", report.render());
    assert!(report.notes.iter().any(|n| n.contains("MANIFEST")));
    assert_eq!(stored(dir.path()), Ok(11));
}

#[test]
fn repair_reports_the_lost_range_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = sealed_log(dir.path());
    let mut bytes = std::fs::read(&sealed).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&sealed, &bytes).unwrap();
    assert_refused(dir.path(), &sealed);
    let report = cmqd::storage::log::repair(dir.path(), 64 * 1024).unwrap();
    let name = sealed.file_name().unwrap().to_str().unwrap();
    assert_eq!(report.lost.len(), 1, "{}", report.render());
    let loss = &report.lost[0];
    assert!(loss.file.ends_with(name));
    assert!(loss.from <= middle as u64 && (middle as u64) < loss.to);
    // One message per batch: exactly one lost.
    assert_eq!(stored(dir.path()), Ok(10));
    // The damaged file is kept, aside.
    let (_, aside) = report
        .moved
        .iter()
        .find(|(from, _)| from == &sealed)
        .unwrap();
    assert_eq!(std::fs::read(aside).unwrap(), bytes);
    // And the repaired log is sound: nothing to repair the second time.
    let again = cmqd::storage::log::repair(dir.path(), 64 * 1024).unwrap();
    assert!(!again.lost_anything(), "{}", again.render());
    assert_eq!(stored(dir.path()), Ok(10));
}
