//! Damage to a stopped broker's log, on the real binary: every segment position (oldest,
//! middle, newest sealed, active) times every damage (one flipped byte, a zeroed 4 KiB page,
//! truncation, the file deleted, a stray segment-named file added). After each, either the
//! broker starts and serves every acknowledged message, or it refuses to start naming the file
//! (and the offset); then `cmqd repair` reports the lost range and the broker serves every
//! message whose batch the damage did not touch, and nothing else.
//!
//! The log is made once (two runs of the broker, 64 KiB segments, `fsync = "always"`, one
//! message per batch) and copied for each case. The broker is stopped with SIGTERM (by its
//! process id), so the manifest records the end of the log as synced. Bounds: every start has
//! a deadline, every read loop a count. Only 127.0.0.1; only processes this test started are
//! signalled, by their id.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::RealBroker;
use cmqd::client::{Account, ClientConfig, QueueAttributeSet};

const SECRET_ID: &str = "AKIDdamage001";
const SECRET_KEY: &str = "damage-secret-key-0123456789";
const QUEUE: &str = "damageq";
/// Messages sent in the first run (they fill the sealed segments) and the second (the active
/// one).
const FIRST_RUN: usize = 200;
const SECOND_RUN: usize = 60;
const BODY_BYTES: usize = 700;

fn body(i: usize) -> String {
    let mut body = format!("BODY-{i:05}-");
    body.extend(std::iter::repeat_n('x', BODY_BYTES - body.len()));
    body
}

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("cmqd.toml");
    let config = format!(
        r#"
listen = "127.0.0.1:0"
data_dir = "{data}"

[[accounts]]
name = "damage"
secret_id = "{SECRET_ID}"
secret_key = "{SECRET_KEY}"

[metrics]
enabled = false

[http_api]
enabled = false

[storage]
segment_bytes = 65536
fsync = "always"
"#,
        data = dir.join("data").display()
    );
    std::fs::write(&path, config).unwrap();
    path
}

struct Broker {
    real: RealBroker,
    addr: String,
}

/// Starts the broker: its address, or (it exited) what it wrote on stderr.
fn start(config: &Path, log: &Path) -> Result<Broker, String> {
    // A fresh log per start: a refusal's message is what this start wrote.
    let _ = std::fs::remove_file(log);
    let real = RealBroker::start(config, Some(log))?;
    Ok(Broker {
        addr: real.addr.to_string(),
        real,
    })
}

impl Broker {
    /// SIGTERM to this child, by its id; waits for it.
    fn stop(self) {
        self.real.terminate();
    }
}

async fn connect(addr: &str) -> Account {
    let config = ClientConfig::default()
        .connect_timeout(Duration::from_secs(5))
        .request_timeout(Duration::from_secs(5));
    Account::connect(addr, SECRET_ID, SECRET_KEY, config)
        .await
        .unwrap()
}

/// Sends `range`'s bodies one at a time (one batch each).
async fn send(addr: &str, range: std::ops::Range<usize>, create: bool) {
    let account = connect(addr).await;
    if create {
        account
            .create_queue(QUEUE, &QueueAttributeSet::default())
            .await
            .unwrap();
    }
    let queue = account.queue(QUEUE);
    for i in range {
        queue.send_message(body(i), 0).await.unwrap();
    }
}

/// Every message the broker serves, by index.
async fn served(addr: &str) -> BTreeSet<usize> {
    let account = connect(addr).await;
    let queue = account.queue(QUEUE);
    let mut seen = BTreeSet::new();
    for _ in 0..(FIRST_RUN + SECOND_RUN) {
        match queue.batch_receive_message(16, Some(0)).await {
            Ok(messages) => {
                for m in messages {
                    let text = String::from_utf8(m.body.to_vec()).unwrap();
                    assert!(text.len() == BODY_BYTES && text.starts_with("BODY-"));
                    let i: usize = text[5..10].parse().unwrap();
                    assert_eq!(text, body(i), "a message came back changed");
                    assert!(seen.insert(i), "message {i} served twice");
                }
            }
            Err(e) if e.is_no_message() => return seen,
            Err(e) => panic!("receive failed: {e}"),
        }
    }
    panic!("more messages than were sent");
}

fn segments(data: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    files
}

/// The batches of an intact segment: byte range and the messages in it.
fn batches(bytes: &[u8]) -> (usize, Vec<(usize, usize, Vec<usize>)>) {
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let mut at = 24;
    at += 8 + word(at);
    let mut out: Vec<(usize, usize, Vec<usize>)> = Vec::new();
    while at + 8 <= bytes.len() && word(at) != 0 {
        let size = 8 + word(at);
        let record = &bytes[at..at + size];
        if record[8] == 2 {
            if let Some(last) = out.last_mut() {
                last.1 = at;
            }
            out.push((at, at, Vec::new()));
        } else if let Some(i) = record.windows(5).position(|w| w == b"BODY-") {
            let index: usize = std::str::from_utf8(&record[i + 5..i + 10])
                .unwrap()
                .parse()
                .unwrap();
            out.last_mut().unwrap().2.push(index);
        }
        at += size;
    }
    if let Some(last) = out.last_mut() {
        last.1 = at;
    }
    (at, out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    FlipByte,
    ZeroPage,
    Truncate,
    Delete,
    Stray,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    Oldest,
    Middle,
    NewestSealed,
    Active,
}

/// Damages `file` (a copy of `original`); returns the byte range hit, and the stray file's
/// path for [`Damage::Stray`].
fn damage(file: &Path, original: &[u8], data_end: usize, how: Damage) -> (usize, usize) {
    let middle = data_end / 2;
    match how {
        Damage::FlipByte => {
            let mut bytes = original.to_vec();
            bytes[middle] ^= 0x20;
            std::fs::write(file, bytes).unwrap();
            (middle, middle + 1)
        }
        Damage::ZeroPage => {
            let mut bytes = original.to_vec();
            let start = middle & !4095;
            let end = (start + 4096).min(bytes.len());
            bytes[start..end].fill(0);
            std::fs::write(file, bytes).unwrap();
            (start, end)
        }
        Damage::Truncate => {
            std::fs::write(file, &original[..middle]).unwrap();
            (middle, usize::MAX)
        }
        Damage::Delete => {
            std::fs::remove_file(file).unwrap();
            (0, usize::MAX)
        }
        Damage::Stray => {
            // A copy of the segment under a name the log never used.
            let stray = file.with_file_name("00000000000000000077.seg");
            std::fs::write(stray, original).unwrap();
            (0, 0)
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn damage_is_served_around_or_refused_and_repaired() {
    let started = cmqd::clock::monotonic_now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let template = tempfile::tempdir().unwrap();
    let config = write_config(template.path());
    let log = template.path().join("broker.log");
    // Run 1 fills the sealed segments; run 2 (which seals run 1's last) the active one.
    let broker = start(&config, &log).unwrap();
    runtime.block_on(send(&broker.addr, 0..FIRST_RUN, true));
    broker.stop();
    let broker = start(&config, &log).unwrap();
    runtime.block_on(send(&broker.addr, FIRST_RUN..FIRST_RUN + SECOND_RUN, false));
    broker.stop();
    let files = segments(&template.path().join("data"));
    assert!(files.len() >= 4, "{files:?}");
    let with_messages: Vec<&PathBuf> = files
        .iter()
        .filter(|f| !batches(&std::fs::read(f).unwrap()).1.is_empty())
        .collect();
    let pick = |p: Position| -> PathBuf {
        match p {
            Position::Oldest => with_messages[0].clone(),
            Position::Middle => with_messages[1].clone(),
            Position::NewestSealed => with_messages[with_messages.len() - 2].clone(),
            Position::Active => with_messages[with_messages.len() - 1].clone(),
        }
    };
    let all: BTreeSet<usize> = (0..FIRST_RUN + SECOND_RUN).collect();
    let mut table = Vec::new();
    for position in [
        Position::Oldest,
        Position::Middle,
        Position::NewestSealed,
        Position::Active,
    ] {
        for how in [
            Damage::FlipByte,
            Damage::ZeroPage,
            Damage::Truncate,
            Damage::Delete,
            Damage::Stray,
        ] {
            let case = tempfile::tempdir().unwrap();
            copy_dir(template.path(), case.path());
            let config = write_config(case.path());
            let log = case.path().join("broker.log");
            let original_path = pick(position);
            let name = original_path
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let file = case.path().join("data/log").join(&name);
            let original = std::fs::read(&original_path).unwrap();
            let (data_end, batches) = batches(&original);
            let (from, to) = damage(&file, &original, data_end, how);
            // Messages whose batch the damage touched (all after it, for a cut).
            let hit: BTreeSet<usize> = batches
                .iter()
                .filter(|(start, end, _)| *start < to && from < *end)
                .flat_map(|(_, _, ms)| ms.iter().copied())
                .collect();
            let outcome = match start(&config, &log) {
                Ok(broker) => {
                    let got = runtime.block_on(served(&broker.addr));
                    broker.stop();
                    assert_eq!(
                        got, all,
                        "{position:?} x {how:?}: the broker started without every acknowledged message"
                    );
                    if how == Damage::Stray {
                        let stray = file.with_file_name("00000000000000000077.seg");
                        assert_eq!(
                            std::fs::read(stray).unwrap(),
                            original,
                            "the stray was touched"
                        );
                    }
                    "starts, serves all".to_string()
                }
                Err(refusal) => {
                    assert!(
                        refusal.contains(&name),
                        "{position:?} x {how:?}: the refusal does not name {name}: {refusal}"
                    );
                    assert!(
                        refusal.contains("offset") || refusal.contains("missing"),
                        "{position:?} x {how:?}: no offset: {refusal}"
                    );
                    let offset = refusal
                        .split("at offset ")
                        .nth(1)
                        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                        .map(str::to_string)
                        .unwrap_or_else(|| "-".into());
                    let repair = Command::new(env!("CARGO_BIN_EXE_cmqd"))
                        .arg("repair")
                        .arg("--config")
                        .arg(&config)
                        .env("RUST_LOG", "warn")
                        .output()
                        .unwrap();
                    let printed = String::from_utf8_lossy(&repair.stdout).to_string();
                    assert!(
                        repair.status.success(),
                        "{position:?} x {how:?}: repair failed: {printed}{}",
                        String::from_utf8_lossy(&repair.stderr)
                    );
                    assert!(
                        printed.contains("LOST:") && printed.contains(&name),
                        "{position:?} x {how:?}: repair does not report the loss: {printed}"
                    );
                    let broker = start(&config, &log)
                        .unwrap_or_else(|e| panic!("{position:?} x {how:?}: still refused: {e}"));
                    let got = runtime.block_on(served(&broker.addr));
                    broker.stop();
                    let expected: BTreeSet<usize> = all.difference(&hit).copied().collect();
                    assert_eq!(
                        got, expected,
                        "{position:?} x {how:?}: after repair, not every intact message (or more)"
                    );
                    // Nothing deleted: the damaged file is kept aside.
                    if how != Damage::Delete {
                        let aside = std::fs::read_dir(case.path().join("data/log/damaged"))
                            .unwrap()
                            .next()
                            .unwrap()
                            .unwrap()
                            .path()
                            .join(&name);
                        assert!(
                            aside.exists(),
                            "{position:?} x {how:?}: {name} not kept aside"
                        );
                    }
                    format!(
                        "refused (offset {offset}); repair: {} lost, {} served",
                        all.len() - got.len(),
                        got.len()
                    )
                }
            };
            table.push(format!("| {position:?} | {how:?} | {outcome} |"));
        }
    }
    println!("| position | damage | outcome |\n| --- | --- | --- |");
    for row in &table {
        println!("{row}");
    }
    println!("suite took {:?}", started.elapsed());
}
