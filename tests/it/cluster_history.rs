//! The history of a nemesis run and its checker: every send, receive and delete with its
//! outcome and times, and [`check`], a pure function that finds lost, resurrected, unexpected
//! and duplicated messages; also the failover gap ([`longest_ack_gap`]) and [`percentile`].
//! Tested here on synthetic histories.

use std::collections::BTreeMap;
use std::time::Duration;

/// What a send came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Acknowledged: it must be delivered.
    Ok,
    /// Every node answered NOT_LEADER (or refused the connection): it was not applied.
    NotLeader,
    /// Another error or no answer: it may or may not have been applied.
    Indeterminate,
}

/// One send. Times are since the run's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRecord {
    pub body: String,
    pub outcome: SendOutcome,
    pub start: Duration,
    pub end: Duration,
}

/// One message as a receive returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveRecord {
    pub body: String,
    /// The broker's id of the message: two ids for one body mean it was stored twice.
    pub msg_id: u64,
    /// When the receive that returned it was sent.
    pub start: Duration,
    pub end: Duration,
}

/// One delete of a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteRecord {
    pub body: String,
    pub msg_id: u64,
    /// Whether the cluster acknowledged it.
    pub acked: bool,
    pub start: Duration,
    pub end: Duration,
}

/// Everything the clients did, in the order they recorded it.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub sends: Vec<SendRecord>,
    pub receives: Vec<ReceiveRecord>,
    pub deletes: Vec<DeleteRecord>,
}

/// A message received by a receive that started after its delete was acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resurrection {
    pub body: String,
    pub delete_acked_at: Duration,
    pub received_at: Duration,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub acked: usize,
    pub not_leader: usize,
    pub indeterminate: usize,
    pub received: usize,
    pub deletes_acked: usize,
    /// Acknowledged sends never received.
    pub lost: Vec<String>,
    pub resurrected: Vec<Resurrection>,
    /// Received bodies that were never sent (a NOT_LEADER send counts as never sent).
    pub unexpected: Vec<String>,
    /// Bodies received more than once, with their count (allowed).
    pub duplicates: Vec<(String, usize)>,
    /// Bodies received under more than one message id: one send stored twice (the clients
    /// never send a body again, so this is the broker's doing).
    pub stored_twice: Vec<String>,
}

impl CheckReport {
    /// No loss, no resurrection, nothing unexpected.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.resurrected.is_empty()
            && self.unexpected.is_empty()
            && self.stored_twice.is_empty()
    }

    /// One line of counts, then up to 10 examples of each violation.
    pub fn summary(&self) -> String {
        let mut text = format!(
            "sends acked={} not_leader={} indeterminate={}; received={} distinct, deletes acked={}; \
             lost={} resurrected={} unexpected={} stored_twice={} duplicates={}",
            self.acked,
            self.not_leader,
            self.indeterminate,
            self.received,
            self.deletes_acked,
            self.lost.len(),
            self.resurrected.len(),
            self.unexpected.len(),
            self.stored_twice.len(),
            self.duplicates.len(),
        );
        let examples = |label: &str, items: Vec<String>, text: &mut String| {
            if !items.is_empty() {
                text.push_str(&format!("\n  {label}: {}", items.join(", ")));
            }
        };
        examples(
            "lost",
            self.lost.iter().take(10).cloned().collect(),
            &mut text,
        );
        examples(
            "resurrected",
            self.resurrected
                .iter()
                .take(10)
                .map(|r| {
                    format!(
                        "{} (delete acked at {:?}, received at {:?})",
                        r.body, r.delete_acked_at, r.received_at
                    )
                })
                .collect(),
            &mut text,
        );
        examples(
            "unexpected",
            self.unexpected.iter().take(10).cloned().collect(),
            &mut text,
        );
        examples(
            "stored twice",
            self.stored_twice.iter().take(10).cloned().collect(),
            &mut text,
        );
        examples(
            "duplicates",
            self.duplicates
                .iter()
                .take(10)
                .map(|(body, n)| format!("{body} x{n}"))
                .collect(),
            &mut text,
        );
        text
    }
}

/// Checks a whole history (the run and the final drain).
pub fn check(history: &History) -> CheckReport {
    // A body is sent once; should a history hold it twice, the strongest outcome counts.
    let mut outcome: BTreeMap<&str, SendOutcome> = BTreeMap::new();
    for send in &history.sends {
        let slot = outcome.entry(&send.body).or_insert(send.outcome);
        *slot = match (*slot, send.outcome) {
            (SendOutcome::Ok, _) | (_, SendOutcome::Ok) => SendOutcome::Ok,
            (SendOutcome::Indeterminate, _) | (_, SendOutcome::Indeterminate) => {
                SendOutcome::Indeterminate
            }
            _ => SendOutcome::NotLeader,
        };
    }
    let mut received: BTreeMap<&str, Vec<&ReceiveRecord>> = BTreeMap::new();
    for receive in &history.receives {
        received.entry(&receive.body).or_default().push(receive);
    }
    // When each message (body and id) was first acknowledged deleted.
    let mut delete_acked: BTreeMap<(&str, u64), Duration> = BTreeMap::new();
    for delete in history.deletes.iter().filter(|d| d.acked) {
        let at = delete_acked
            .entry((&delete.body, delete.msg_id))
            .or_insert(delete.end);
        *at = (*at).min(delete.end);
    }

    let count = |wanted: SendOutcome| outcome.values().filter(|&&o| o == wanted).count();
    let lost = outcome
        .iter()
        .filter(|(body, &o)| o == SendOutcome::Ok && !received.contains_key(*body))
        .map(|(body, _)| body.to_string())
        .collect();
    let unexpected = received
        .keys()
        .filter(|body| {
            !matches!(
                outcome.get(*body),
                Some(SendOutcome::Ok | SendOutcome::Indeterminate)
            )
        })
        .map(|body| body.to_string())
        .collect();
    let duplicates = received
        .iter()
        .filter(|(_, receives)| receives.len() > 1)
        .map(|(body, receives)| (body.to_string(), receives.len()))
        .collect();
    let stored_twice = received
        .iter()
        .filter(|(_, receives)| {
            let ids: std::collections::BTreeSet<u64> = receives.iter().map(|r| r.msg_id).collect();
            ids.len() > 1
        })
        .map(|(body, _)| body.to_string())
        .collect();
    let mut resurrected = Vec::new();
    for (&(body, msg_id), &acked_at) in &delete_acked {
        for receive in received.get(body).into_iter().flatten() {
            if receive.msg_id == msg_id && receive.start > acked_at {
                resurrected.push(Resurrection {
                    body: body.to_string(),
                    delete_acked_at: acked_at,
                    received_at: receive.start,
                });
            }
        }
    }
    CheckReport {
        acked: count(SendOutcome::Ok),
        not_leader: count(SendOutcome::NotLeader),
        indeterminate: count(SendOutcome::Indeterminate),
        received: received.len(),
        deletes_acked: delete_acked.len(),
        stored_twice,
        lost,
        resurrected,
        unexpected,
        duplicates,
    }
}

/// The longest time between consecutive acknowledged sends (of all producers) from the last
/// acknowledgement at or before `from` up to `to`; the span from that acknowledgement (or
/// `from`, if none) to `to` when nothing was acknowledged in between.
pub fn longest_ack_gap(history: &History, from: Duration, to: Duration) -> Duration {
    let mut acks: Vec<Duration> = history
        .sends
        .iter()
        .filter(|s| s.outcome == SendOutcome::Ok)
        .map(|s| s.end)
        .collect();
    acks.sort();
    let mut previous = acks.iter().rev().find(|&&t| t <= from).copied();
    let mut longest = Duration::ZERO;
    for &t in acks.iter().filter(|&&t| t > from && t <= to) {
        longest = longest.max(t - previous.unwrap_or(from));
        previous = Some(t);
    }
    if previous.is_none_or(|p| p <= from) {
        longest = longest.max(to.saturating_sub(previous.unwrap_or(from)));
    }
    longest
}

/// The `p`-th percentile (0-100) of `values`, nearest rank.
pub fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    let mut sorted = values.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

// ---------------------------------------------------------------------------------------------
// The checker on synthetic histories
// ---------------------------------------------------------------------------------------------

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn send(body: &str, outcome: SendOutcome, end: u64) -> SendRecord {
    SendRecord {
        body: body.into(),
        outcome,
        start: ms(end.saturating_sub(1)),
        end: ms(end),
    }
}

/// The id the test histories give a body's one stored copy.
fn id_of(body: &str) -> u64 {
    body.bytes().map(u64::from).sum()
}

fn receive(body: &str, start: u64) -> ReceiveRecord {
    ReceiveRecord {
        body: body.into(),
        msg_id: id_of(body),
        start: ms(start),
        end: ms(start + 1),
    }
}

fn delete(body: &str, acked: bool, end: u64) -> DeleteRecord {
    DeleteRecord {
        body: body.into(),
        msg_id: id_of(body),
        acked,
        start: ms(end.saturating_sub(1)),
        end: ms(end),
    }
}

#[test]
fn checker_passes_a_clean_history() {
    let history = History {
        sends: vec![
            send("p0-0", SendOutcome::Ok, 10),
            send("p0-1", SendOutcome::Ok, 20),
            send("p0-2", SendOutcome::NotLeader, 30),
            send("p0-3", SendOutcome::Indeterminate, 40),
        ],
        receives: vec![receive("p0-0", 15), receive("p0-1", 25)],
        deletes: vec![delete("p0-0", true, 17), delete("p0-1", true, 27)],
    };
    let report = check(&history);
    assert!(report.is_clean(), "{}", report.summary());
    assert_eq!(
        (report.acked, report.not_leader, report.indeterminate),
        (2, 1, 1)
    );
    assert_eq!((report.received, report.deletes_acked), (2, 2));
    assert!(report.duplicates.is_empty());
}

#[test]
fn checker_finds_an_acknowledged_send_never_received() {
    let history = History {
        sends: vec![
            send("p0-0", SendOutcome::Ok, 10),
            send("p1-0", SendOutcome::Ok, 11),
            // Indeterminate and never received: not lost (it may never have been applied).
            send("p1-1", SendOutcome::Indeterminate, 12),
        ],
        receives: vec![receive("p0-0", 15)],
        deletes: vec![],
    };
    let report = check(&history);
    assert_eq!(report.lost, vec!["p1-0".to_string()]);
    assert!(!report.is_clean());
}

#[test]
fn checker_finds_a_message_received_after_its_delete_was_acknowledged() {
    let history = History {
        sends: vec![
            send("a", SendOutcome::Ok, 1),
            send("b", SendOutcome::Ok, 2),
            send("c", SendOutcome::Ok, 3),
        ],
        receives: vec![
            receive("a", 10),
            // Received again after its delete was acknowledged at 12: resurrected.
            receive("a", 50),
            receive("b", 10),
            // A receive that started before the delete was acknowledged: a duplicate only.
            receive("b", 11),
            receive("c", 10),
            // Its delete was not acknowledged: a redelivery, allowed.
            receive("c", 60),
        ],
        deletes: vec![
            delete("a", true, 12),
            delete("b", true, 13),
            delete("c", false, 14),
        ],
    };
    let report = check(&history);
    assert_eq!(
        report.resurrected,
        vec![Resurrection {
            body: "a".into(),
            delete_acked_at: ms(12),
            received_at: ms(50),
        }]
    );
    assert!(report.lost.is_empty() && report.unexpected.is_empty());
    assert_eq!(
        report.duplicates,
        vec![("a".into(), 2), ("b".into(), 2), ("c".into(), 2)]
    );
}

#[test]
fn checker_counts_a_not_leader_send_that_is_received_as_unexpected() {
    let history = History {
        sends: vec![
            send("p0-0", SendOutcome::NotLeader, 1),
            send("p0-1", SendOutcome::Indeterminate, 2),
        ],
        // p0-1 was indeterminate, so receiving it is fine; p0-0 was refused; "zz" never sent.
        receives: vec![receive("p0-0", 5), receive("p0-1", 5), receive("zz", 5)],
        deletes: vec![],
    };
    let report = check(&history);
    assert_eq!(
        report.unexpected,
        vec!["p0-0".to_string(), "zz".to_string()]
    );
    assert!(report.lost.is_empty());
}

#[test]
fn checker_reports_duplicates_without_failing() {
    let history = History {
        sends: vec![send("x", SendOutcome::Ok, 1)],
        receives: vec![receive("x", 2), receive("x", 9), receive("x", 20)],
        deletes: vec![delete("x", false, 3), delete("x", true, 21)],
    };
    let report = check(&history);
    assert!(report.is_clean(), "{}", report.summary());
    assert_eq!(report.duplicates, vec![("x".into(), 3)]);
}

#[test]
fn checker_summary_names_examples() {
    let history = History {
        sends: vec![send("gone", SendOutcome::Ok, 1)],
        receives: vec![receive("ghost", 2)],
        deletes: vec![],
    };
    let summary = check(&history).summary();
    assert!(summary.contains("lost=1"), "{summary}");
    assert!(summary.contains("lost: gone"), "{summary}");
    assert!(summary.contains("unexpected: ghost"), "{summary}");
}

#[test]
fn ack_gap_spans_the_fault() {
    let history = History {
        sends: vec![
            send("a", SendOutcome::Ok, 100),
            send("b", SendOutcome::Ok, 200),
            // Refused sends during the election do not close the gap.
            send("c", SendOutcome::NotLeader, 900),
            send("d", SendOutcome::Indeterminate, 950),
            send("e", SendOutcome::Ok, 1_700),
            send("f", SendOutcome::Ok, 1_750),
            send("g", SendOutcome::Ok, 5_000),
        ],
        receives: vec![],
        deletes: vec![],
    };
    // The kill at 300: the last ack before it (200) to the next (1700).
    assert_eq!(longest_ack_gap(&history, ms(300), ms(1_800)), ms(1_500));
    // No ack between the kill and the end of the window: the whole span.
    assert_eq!(longest_ack_gap(&history, ms(2_000), ms(3_000)), ms(1_250));
    // Nothing acknowledged before the window either: measured from its start.
    assert_eq!(longest_ack_gap(&history, ms(50), ms(60)), ms(10));
    assert_eq!(longest_ack_gap(&History::default(), ms(0), ms(7)), ms(7));
}

#[test]
fn percentile_is_nearest_rank() {
    let values: Vec<Duration> = (1..=100).map(ms).collect();
    assert_eq!(percentile(&values, 99.0), Some(ms(99)));
    assert_eq!(percentile(&values, 50.0), Some(ms(50)));
    assert_eq!(percentile(&[ms(7)], 99.0), Some(ms(7)));
    assert_eq!(percentile(&[], 99.0), None);
}

#[test]
fn checker_tells_a_send_stored_twice_from_a_resurrection() {
    // "a" stored twice (ids 1 and 2): the first copy deleted, the second received later. Not a
    // resurrection (that copy was never deleted), but a send stored twice.
    let copy = |msg_id, start| ReceiveRecord {
        msg_id,
        ..receive("a", start)
    };
    let history = History {
        sends: vec![send("a", SendOutcome::Ok, 1)],
        receives: vec![copy(1, 10), copy(2, 50)],
        deletes: vec![DeleteRecord {
            msg_id: 1,
            ..delete("a", true, 12)
        }],
    };
    let report = check(&history);
    assert!(report.resurrected.is_empty(), "{report:?}");
    assert_eq!(report.stored_twice, vec!["a".to_string()]);
    assert!(!report.is_clean());
}
