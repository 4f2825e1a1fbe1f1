//! Rendering for people (aligned tables, key-value lists, UTC times) and the JSON of each model type.

use serde_json::{json, Value};

use cmqd::client::{
    BatchDeleteFailure, DeadLetterInfo, DeadLetterPolicy, DeadLetterReason, MessageState,
    PeekedMessage, QueueAttributes, ReceivedMessage,
};
use cmqd::clock::Millis;

/// A listing table with its "n of m" footer, or a line saying there is nothing.
pub(crate) fn listing(
    total: u64,
    offset: u32,
    header: &[&str],
    rows: &[Vec<String>],
    what: &str,
    none: &str,
) -> String {
    if rows.is_empty() {
        return if total == 0 {
            none.to_string()
        } else {
            format!("{}; none from offset {offset}", plural(total, what))
        };
    }
    let mut text = table(header, rows);
    let first = u64::from(offset) + 1;
    let last = u64::from(offset) + rows.len() as u64;
    if first == 1 && last == total {
        text.push_str(&format!("{}\n", plural(total, what)));
    } else {
        text.push_str(&format!(
            "{first}-{last} of {} (see --offset, --limit)\n",
            plural(total, what)
        ));
    }
    text
}

pub(crate) fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// Key/value lines with the values aligned.
pub(crate) fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(key, value)| format!("{key:<width$}  {value}\n"))
        .collect()
}

/// A table with a header row; columns aligned, the last one left ragged.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push('\n');
        out
    };
    let mut text = line(header.to_vec());
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}

/// `YYYY-MM-DD HH:MM:SS UTC (ms)`, or `-` for 0 (never).
pub(crate) fn time_field(ms: Millis) -> String {
    if ms == 0 {
        "-".to_string()
    } else {
        format!("{} ({ms})", format_time(ms))
    }
}

/// Unix ms as `YYYY-MM-DD HH:MM:SS UTC` (proleptic Gregorian calendar).
pub(crate) fn format_time(ms: Millis) -> String {
    let seconds = ms / 1000;
    let (year, month, day) = civil_from_days(seconds / 86_400);
    let of_day = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// Year, month (1-12) and day (1-31) of a count of days since 1970-01-01 (H. Hinnant's
/// `civil_from_days`, for days on or after the epoch).
pub(crate) fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // March = 0
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

pub(crate) fn dead_letter_policy_text(policy: &Option<DeadLetterPolicy>) -> String {
    match policy {
        None => "none".to_string(),
        Some(p) if p.policy == cmqd::model::DEAD_LETTER_POLICY_RECEIVES => format!(
            "to {} after {} (policy 0)",
            p.dead_letter_queue,
            plural(u64::from(p.max_receive_count), "receive")
        ),
        Some(p) if p.policy == cmqd::model::DEAD_LETTER_POLICY_TIME_TO_LIVE => format!(
            "to {} when unconsumed for {} s (policy 1)",
            p.dead_letter_queue, p.max_time_to_live_seconds
        ),
        Some(p) => format!("to {} (policy {})", p.dead_letter_queue, p.policy),
    }
}

pub(crate) fn attributes_text(a: &QueueAttributes) -> String {
    let sources = if a.dead_letter_sources.is_empty() {
        "none".to_string()
    } else {
        a.dead_letter_sources.join(", ")
    };
    key_values(&[
        ("queueName", a.queue_name.clone()),
        ("queueId", a.queue_id.to_string()),
        ("maxMsgHeapNum", a.max_msg_heap_num.to_string()),
        ("pollingWaitSeconds", a.polling_wait_seconds.to_string()),
        (
            "visibilityTimeout",
            a.visibility_timeout_seconds.to_string(),
        ),
        ("maxMsgSize", a.max_msg_size_bytes.to_string()),
        ("msgRetentionSeconds", a.msg_retention_seconds.to_string()),
        (
            "rewindSeconds",
            if a.rewind_seconds == 0 {
                "0 (rewind off)".to_string()
            } else {
                a.rewind_seconds.to_string()
            },
        ),
        ("maxDelaySeconds", a.max_delay_seconds.to_string()),
        ("createTime", time_field(a.create_time_ms)),
        ("lastModifyTime", time_field(a.last_modify_time_ms)),
        ("activeMsgNum", a.active_msg_num.to_string()),
        ("inactiveMsgNum", a.inactive_msg_num.to_string()),
        ("delayMsgNum", a.delay_msg_num.to_string()),
        ("rewindMsgNum", a.rewind_msg_num.to_string()),
        ("minMsgTime", time_field(a.min_msg_time_ms)),
        (
            "deadLetterPolicy",
            dead_letter_policy_text(&a.dead_letter_policy),
        ),
        ("deadLetterSources", sources),
    ])
}

pub(crate) fn attributes_json(a: &QueueAttributes) -> Value {
    json!({
        "queue_name": a.queue_name,
        "queue_id": a.queue_id,
        "max_msg_heap_num": a.max_msg_heap_num,
        "polling_wait_seconds": a.polling_wait_seconds,
        "visibility_timeout_seconds": a.visibility_timeout_seconds,
        "max_msg_size_bytes": a.max_msg_size_bytes,
        "msg_retention_seconds": a.msg_retention_seconds,
        "rewind_seconds": a.rewind_seconds,
        "create_time_ms": a.create_time_ms,
        "last_modify_time_ms": a.last_modify_time_ms,
        "active_msg_num": a.active_msg_num,
        "inactive_msg_num": a.inactive_msg_num,
        "delay_msg_num": a.delay_msg_num,
        "rewind_msg_num": a.rewind_msg_num,
        "min_msg_time_ms": a.min_msg_time_ms,
        "max_delay_seconds": a.max_delay_seconds,
        "dead_letter_policy": a.dead_letter_policy.as_ref().map(|p| json!({
            "dead_letter_queue": p.dead_letter_queue,
            "policy": p.policy,
            "max_receive_count": p.max_receive_count,
            "max_time_to_live_seconds": p.max_time_to_live_seconds,
        })),
        "dead_letter_sources": a.dead_letter_sources,
    })
}

pub(crate) fn reason_name(reason: DeadLetterReason) -> &'static str {
    match reason {
        DeadLetterReason::MaxReceiveCount => "max_receive_count",
        DeadLetterReason::TimeToLive => "time_to_live",
    }
}

pub(crate) fn dead_letter_text(info: &DeadLetterInfo) -> String {
    format!(
        "from {} ({}, received {} times) at {}",
        info.source_queue,
        reason_name(info.reason),
        info.receive_count,
        time_field(info.dead_lettered_at_ms)
    )
}

pub(crate) fn dead_letter_json(info: &Option<DeadLetterInfo>) -> Value {
    match info {
        None => Value::Null,
        Some(info) => json!({
            "source_queue": info.source_queue,
            "reason": reason_name(info.reason),
            "receive_count": info.receive_count,
            "dead_lettered_at_ms": info.dead_lettered_at_ms,
        }),
    }
}

pub(crate) fn body_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

pub(crate) fn received_text(m: &ReceivedMessage) -> String {
    let mut pairs = vec![
        ("msgId", m.msg_id.to_string()),
        ("receiptHandle", m.receipt_handle.clone()),
        ("dequeueCount", m.dequeue_count.to_string()),
        ("enqueueTime", time_field(m.enqueue_time_ms)),
        ("firstDequeueTime", time_field(m.first_dequeue_time_ms)),
        ("nextVisibleTime", time_field(m.next_visible_time_ms)),
    ];
    if let Some(info) = &m.dead_letter {
        pairs.push(("deadLetter", dead_letter_text(info)));
    }
    pairs.push(("bodyBytes", m.body.len().to_string()));
    pairs.push(("body", body_text(&m.body)));
    key_values(&pairs)
}

pub(crate) fn received_json(m: &ReceivedMessage) -> Value {
    json!({
        "msg_id": m.msg_id,
        "receipt_handle": m.receipt_handle,
        "body": body_text(&m.body),
        "body_bytes": m.body.len(),
        "enqueue_time_ms": m.enqueue_time_ms,
        "first_dequeue_time_ms": m.first_dequeue_time_ms,
        "next_visible_time_ms": m.next_visible_time_ms,
        "dequeue_count": m.dequeue_count,
        "dead_letter": dead_letter_json(&m.dead_letter),
    })
}

pub(crate) fn state_name(state: MessageState) -> &'static str {
    match state {
        MessageState::Active => "active",
        MessageState::Inactive => "inactive",
        MessageState::Delayed => "delayed",
    }
}

pub(crate) fn peeked_text(m: &PeekedMessage) -> String {
    let mut pairs = vec![
        ("msgId", m.msg_id.to_string()),
        ("state", state_name(m.state).to_string()),
        ("dequeueCount", m.dequeue_count.to_string()),
        ("enqueueTime", time_field(m.enqueue_time_ms)),
        ("visibleTime", time_field(m.visible_time_ms)),
    ];
    if let Some(info) = &m.dead_letter {
        pairs.push(("deadLetter", dead_letter_text(info)));
    }
    pairs.push(("bodyBytes", m.body.len().to_string()));
    pairs.push(("body", body_text(&m.body)));
    key_values(&pairs)
}

pub(crate) fn peeked_json(m: &PeekedMessage) -> Value {
    json!({
        "msg_id": m.msg_id,
        "state": state_name(m.state),
        "body": body_text(&m.body),
        "body_bytes": m.body.len(),
        "enqueue_time_ms": m.enqueue_time_ms,
        "visible_time_ms": m.visible_time_ms,
        "dequeue_count": m.dequeue_count,
        "dead_letter": dead_letter_json(&m.dead_letter),
    })
}

pub(crate) fn failures_json(failures: &[BatchDeleteFailure]) -> Value {
    failures
        .iter()
        .map(|f| {
            json!({
                "receipt_handle": f.receipt_handle,
                "code": f.code.code,
                "module": f.code.module,
                "message": f.message,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_unix_ms_as_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_time(951_868_799_999), "2000-02-29 23:59:59 UTC");
        assert_eq!(format_time(1_700_000_000_123), "2023-11-14 22:13:20 UTC");
        assert_eq!(format_time(4_102_444_800_000), "2100-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_709_251_199_000), "2024-02-29 23:59:59 UTC");
        assert_eq!(format_time(1_735_689_599_000), "2024-12-31 23:59:59 UTC");
    }

    #[test]
    fn civil_from_days_round_trips_every_day_for_five_centuries() {
        // Walk day by day and check the calendar advances one day at a time.
        let mut previous = civil_from_days(0);
        assert_eq!(previous, (1970, 1, 1));
        for days in 1..(500 * 366) {
            let (y, m, d) = civil_from_days(days);
            let (py, pm, pd) = previous;
            let leap = (py % 4 == 0 && py % 100 != 0) || py % 400 == 0;
            let month_len = match pm {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            let expected = if pd < month_len {
                (py, pm, pd + 1)
            } else if pm < 12 {
                (py, pm + 1, 1)
            } else {
                (py + 1, 1, 1)
            };
            assert_eq!((y, m, d), expected, "day {days}");
            previous = (y, m, d);
        }
    }

    #[test]
    fn tables_and_key_values_align() {
        assert_eq!(
            key_values(&[("a", "1".into()), ("long", "2".into())]),
            "a     1\nlong  2\n"
        );
        assert_eq!(
            table(&["ID", "NAME"], &[vec!["1234".into(), "x".into()]]),
            "ID    NAME\n1234  x\n"
        );
    }
}
