//! Segment files: names, creation (preallocated, header and checkpoint, synced), the
//! manifest of a set of segments, and the framing check before a batch is written.

use super::*;

pub(super) fn segment_name(id: u32) -> String {
    format!("{id:020}.seg")
}

/// Renames `spare` to `name`: its file, or `None` (the spare is removed) when that fails.
fn take_spare(dir: &dyn LogDir, spare: spare::Spare, name: &str) -> Option<Arc<dyn LogFile>> {
    match dir.rename(&spare.name, name) {
        Ok(()) => {
            metrics::counter!(crate::metrics::STORAGE_SEGMENTS_CREATED_TOTAL, "how" => "spare")
                .increment(1);
            Some(spare.file)
        }
        Err(error) => {
            tracing::warn!(file = %dir.describe(&spare.name), %error, "cannot rename the spare segment into place; preallocating one");
            let _ = dir.remove(&spare.name);
            None
        }
    }
}

pub(super) fn parse_segment_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|id| u32::try_from(id).ok())
}

/// The manifest of a log holding `live`, with `retired` and `synced` (moved to the start of the
/// newest live segment if its own segment is no longer live).
pub(super) fn manifest_for(
    config: &LogConfig,
    live: Vec<u32>,
    retired: &BTreeSet<u32>,
    synced: SyncedPos,
    segments: &BTreeMap<u32, Segment>,
) -> Manifest {
    let synced = if live.contains(&synced.segment) {
        synced
    } else {
        let newest = live.last().copied().unwrap_or(0);
        SyncedPos {
            segment: newest,
            offset: segments.get(&newest).map_or(0, |s| s.data_start),
            batch: 0,
        }
    };
    Manifest {
        flags: if config.fsync == FsyncMode::Always {
            FLAG_SYNCED_EACH_BATCH
        } else {
            0
        },
        synced,
        retired: retired
            .iter()
            .copied()
            .filter(|id| !live.contains(id))
            .collect(),
        live,
    }
}

/// Checks that a batch tiles into well-formed records before it is written (paired with the
/// checks on read): an encoding bug must not reach the disk.
pub(super) fn check_framing(buf: &[u8]) -> Result<(), StorageFailure> {
    let mut at = 0;
    while at < buf.len() {
        match read_frame(&buf[at..]) {
            Ok(Some(frame)) => at += frame.size,
            Ok(None) => {
                return Err(StorageFailure::Internal(format!(
                    "batch has an empty record at {at}"
                )))
            }
            Err(error) => {
                return Err(StorageFailure::Internal(format!(
                    "batch is malformed at {at}: {error}"
                )))
            }
        }
    }
    Ok(())
}

/// [`check_framing`] for an append whose bodies are apart ([`Append::bodies`]): the records in
/// `bytes` before each body must be whole (checksums verified) but the last, which the body
/// must complete exactly (its checksum, computed over the body where it is, is not computed
/// again: that would read every body once more); what follows the last body must be whole.
pub(super) fn check_append_framing(append: &Append) -> Result<(), StorageFailure> {
    let mut at = 0;
    for (body_at, body) in &append.bodies {
        let inline = append.bytes.get(at..*body_at).ok_or_else(|| {
            StorageFailure::Internal(format!("a body is placed at {body_at}, before {at}"))
        })?;
        let mut p = 0;
        loop {
            let rest = &inline[p..];
            let declared = rest
                .get(..4)
                .and_then(|w| <[u8; 4]>::try_from(w).ok())
                .map(|w| u32::from_le_bytes(w) as usize);
            match declared {
                Some(len)
                    if (1..=record::RECORD_BYTES_MAX).contains(&len)
                        && record::RECORD_HEADER_BYTES + len == rest.len() + body.len() =>
                {
                    break;
                }
                Some(_) => match read_frame(rest) {
                    Ok(Some(frame)) => p += frame.size,
                    _ => {
                        return Err(StorageFailure::Internal(format!(
                            "batch is malformed at {} (before a body)",
                            at + p
                        )))
                    }
                },
                None => {
                    return Err(StorageFailure::Internal(format!(
                        "a body at {body_at} ends no record"
                    )))
                }
            }
        }
        at = *body_at;
    }
    check_framing(append.bytes.get(at..).unwrap_or_default())
}

/// Creates segment `id`: preallocated (or `spare`, zeros written ahead, renamed into place),
/// header and checkpoint written and synced, directory synced.
pub(super) fn create_segment<L>(
    dir: &dyn LogDir,
    id: u32,
    model: &Replay<L>,
    segment_bytes: u64,
    spare: Option<spare::Spare>,
) -> Result<Segment, WriteError> {
    let name = segment_name(id);
    let mut buf = Vec::with_capacity(4096);
    buf.extend_from_slice(&segment_header(u64::from(id)));
    encode_checkpoint(&model.checkpoint(), &mut buf)
        .map_err(|e| WriteError::Fatal(StorageFailure::Internal(e.to_string())))?;
    let where_ = dir.describe(&name);
    let file = match spare.and_then(|spare| take_spare(dir, spare, &name)) {
        Some(file) => file,
        None => {
            let file = dir.create(&name).map_err(|e| {
                WriteError::Retry(StorageFailure::io(format!("cannot create {where_}"), e))
            })?;
            if let Err(e) = file.allocate(segment_bytes.max(buf.len() as u64)) {
                // Leave no half-made segment behind; recovery would discard it anyway.
                let _ = dir.remove(&name);
                return Err(WriteError::Retry(StorageFailure::io(
                    format!("cannot preallocate {where_}"),
                    e,
                )));
            }
            metrics::counter!(crate::metrics::STORAGE_SEGMENTS_CREATED_TOTAL, "how" => "preallocated")
                .increment(1);
            file
        }
    };
    if let Err(e) = file.write_at(&buf, 0) {
        let _ = dir.remove(&name);
        return Err(WriteError::Retry(StorageFailure::io(
            format!("cannot write the header of {where_}"),
            e,
        )));
    }
    file.sync_all().map_err(|e| {
        WriteError::Fatal(StorageFailure::io(format!("fsync of {where_} failed"), e))
    })?;
    dir.sync().map_err(|e| {
        WriteError::Fatal(StorageFailure::io(
            "fsync of the log directory failed".to_string(),
            e,
        ))
    })?;
    Ok(Segment {
        id,
        file,
        len: buf.len() as u64,
        data_start: buf.len() as u64,
        live_msgs: 0,
        live_bytes: 0,
        blocked_by: BTreeSet::new(),
        sealed: false,
    })
}
