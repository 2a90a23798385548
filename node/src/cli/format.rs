//! Human-readable output: aligned tables and words a caseworker reads
//! (`referral  → BE-PAYOKE  delivered  2026-11-29 10:02`). Times are UTC.

use std::time::SystemTime;

use trmx_proto::time::{Date, from_timestamp};
use trmx_proto::{Kind, pb};

use crate::core::CERT_EXPIRY_WARNING;

/// An instant as `YYYY-MM-DD HH:MM` (UTC); `-` when unset.
pub(crate) fn when(ts: Option<&pb::Timestamp>) -> String {
    let Some(at) = ts.and_then(|ts| from_timestamp(ts).ok()) else {
        return "-".to_owned();
    };
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let minutes_of_day = (secs % 86_400) / 60;
    format!(
        "{} {:02}:{:02}",
        Date::of(at),
        minutes_of_day / 60,
        minutes_of_day % 60
    )
}

/// A kind in words: `referral`, `referral response`, `follow-up`, …
pub(crate) fn kind(value: i32) -> String {
    match Kind::from_pb(value) {
        Some(Kind::Referral) => "referral",
        Some(Kind::ReferralResponse) => "referral response",
        Some(Kind::ReturnRiskAssessmentRequest) => "return risk assessment request",
        Some(Kind::ReturnRiskAssessment) => "return risk assessment",
        Some(Kind::FollowUp) => "follow-up",
        Some(Kind::DeliveryReceipt) => "delivery receipt",
        Some(Kind::NonDeliveryReport) => "non-delivery report",
        None => "unknown kind",
    }
    .to_owned()
}

/// A kind, with `(urgent)` for urgent messages.
fn kind_and_priority(kind_value: i32, priority: i32) -> String {
    if priority == pb::Priority::Urgent as i32 {
        format!("{} (urgent)", kind(kind_value))
    } else {
        kind(kind_value)
    }
}

/// An outbox state in words, with the failure reason and `answered`.
pub(crate) fn outbox_state(entry: &pb::OutboxEntry) -> String {
    let mut state = match pb::OutboxState::try_from(entry.state) {
        Ok(pb::OutboxState::Queued) => "queued".to_owned(),
        Ok(pb::OutboxState::Submitted) => "at the broker".to_owned(),
        Ok(pb::OutboxState::Delivered) => "delivered".to_owned(),
        Ok(pb::OutboxState::Failed) => match &entry.failure {
            Some(f) if f.outcome == "withdrawn" => "withdrawn".to_owned(),
            Some(f) => {
                let outcome = f.outcome.replace('-', " ");
                let mut text = format!("failed: {outcome}");
                let reason = f.reason_code.to_ascii_lowercase().replace(['_', '-'], " ");
                if !f.reason_code.is_empty() && reason != outcome {
                    text.push_str(&format!(" ({})", f.reason_code));
                }
                if !f.field_path.is_empty() {
                    text.push_str(&format!(" at {}", f.field_path));
                }
                text
            }
            None => "failed".to_owned(),
        },
        _ => "unknown".to_owned(),
    };
    if !entry.answered_by.is_empty() {
        state.push_str(", answered");
    }
    if entry.body_erased {
        state.push_str(", body erased");
    }
    // (the first report stands, but the broker also said otherwise: the user must see
    // that what the entry shows was contradicted)
    if !entry.contradicted_by.is_empty() {
        let said: Vec<String> = entry
            .contradicted_by
            .iter()
            .map(|o| o.replace('-', " "))
            .collect();
        state.push_str(&format!(
            ", contradicted by a later report: {}",
            said.join(", ")
        ));
    }
    state
}

/// The time that goes with an outbox entry's state.
fn outbox_time(entry: &pb::OutboxEntry) -> String {
    when(
        entry
            .outcome_at
            .as_ref()
            .or(entry.submitted_at.as_ref())
            .or(entry.created_at.as_ref()),
    )
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths.get(i).copied().unwrap_or(0) - cell.chars().count() + 2;
                out.push_str(&" ".repeat(pad));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The outbox as a table.
pub(crate) fn outbox(entries: &[pb::OutboxEntry]) -> String {
    if entries.is_empty() {
        return "no sent messages\n".to_owned();
    }
    let rows = entries
        .iter()
        .map(|e| {
            vec![
                kind_and_priority(e.kind, e.priority),
                format!("→ {}", e.recipient),
                outbox_state(e),
                outbox_time(e),
                e.message_id.clone(),
                e.case_ref.clone(),
            ]
        })
        .collect();
    table(
        &["KIND", "TO", "STATE", "SINCE (UTC)", "MESSAGE", "CASE"],
        rows,
    )
}

fn inbox_state(e: &pb::InboxEntry) -> String {
    let mut state = if e.answered_by.is_empty() {
        "received".to_owned()
    } else {
        "answered".to_owned()
    };
    if e.body_erased {
        state.push_str(", body erased");
    }
    state
}

fn inbox_row(e: &pb::InboxEntry) -> Vec<String> {
    vec![
        kind_and_priority(e.kind, e.priority),
        format!("← {}", e.sender),
        inbox_state(e),
        when(e.received_at.as_ref()),
        e.seq.to_string(),
        e.message_id.clone(),
        e.case_ref.clone(),
    ]
}

const INBOX_HEADER: [&str; 7] = [
    "KIND",
    "FROM",
    "STATE",
    "RECEIVED (UTC)",
    "SEQ",
    "MESSAGE",
    "CASE",
];

/// The inbox as a table.
pub(crate) fn inbox(entries: &[pb::InboxEntry]) -> String {
    if entries.is_empty() {
        return "no received messages\n".to_owned();
    }
    table(&INBOX_HEADER, entries.iter().map(inbox_row).collect())
}

/// One streamed inbox entry, on one line.
pub(crate) fn watched(e: &pb::InboxEntry) -> String {
    format!(
        "#{}  {}  {}  ← {}  case {}  message {}\n",
        e.seq,
        when(e.received_at.as_ref()),
        kind_and_priority(e.kind, e.priority),
        e.sender,
        e.case_ref,
        e.message_id
    )
}

/// A message with its metadata and body.
pub(crate) fn message(response: &pb::GetMessageResponse) -> String {
    let mut rows: Vec<(&str, String)> = Vec::new();
    match &response.entry {
        Some(pb::get_message_response::Entry::Outbox(e)) => {
            rows.push(("message", e.message_id.clone()));
            rows.push(("sent to", e.recipient.clone()));
            rows.push(("kind", kind_and_priority(e.kind, e.priority)));
            rows.push(("case", e.case_ref.clone()));
            if !e.in_reply_to.is_empty() {
                rows.push(("in reply to", e.in_reply_to.clone()));
            }
            rows.push(("state", outbox_state(e)));
            if !e.answered_by.is_empty() {
                rows.push(("answered by", e.answered_by.clone()));
            }
            rows.push(("queued", when(e.created_at.as_ref())));
            if e.submitted_at.is_some() {
                rows.push(("at the broker", when(e.submitted_at.as_ref())));
            }
            if e.outcome_at.is_some() {
                rows.push(("outcome", when(e.outcome_at.as_ref())));
            }
            rows.push(("submit attempts", e.submit_attempts.to_string()));
            if !e.last_error.is_empty() {
                rows.push(("last error", e.last_error.clone()));
            }
            rows.push(("idempotency key", e.idempotency_key.clone()));
        }
        Some(pb::get_message_response::Entry::Inbox(e)) => {
            rows.push(("message", e.message_id.clone()));
            rows.push(("received from", e.sender.clone()));
            rows.push(("kind", kind_and_priority(e.kind, e.priority)));
            rows.push(("case", e.case_ref.clone()));
            if !e.in_reply_to.is_empty() {
                rows.push(("in reply to", e.in_reply_to.clone()));
            }
            rows.push(("state", inbox_state(e)));
            if !e.answered_by.is_empty() {
                rows.push(("answered by", e.answered_by.clone()));
            }
            rows.push(("created", when(e.created_at.as_ref())));
            rows.push(("received", when(e.received_at.as_ref())));
            rows.push(("inbox seq", e.seq.to_string()));
        }
        None => {}
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in rows {
        out.push_str(&format!("{key:<width$}  {value}\n"));
    }
    if response.body_erased {
        out.push_str("\nthe body was erased (retention period over)\n");
    } else {
        out.push('\n');
        out.push_str(response.body_json.trim_end());
        out.push('\n');
    }
    out
}

/// A case timeline (of at least one message).
pub(crate) fn case(response: &pb::GetCaseResponse) -> String {
    let rows = response
        .entries
        .iter()
        .map(|e| {
            let sent = e.direction == pb::MessageDirection::Sent as i32;
            vec![
                when(e.at.as_ref()),
                if sent { "sent" } else { "received" }.to_owned(),
                kind(e.kind),
                format!("{} {}", if sent { "→" } else { "←" }, e.counterpart),
                e.state.replace('+', ", ").replace('-', " "),
                e.message_id.clone(),
                e.in_reply_to.clone(),
            ]
        })
        .collect();
    format!(
        "case {}\n{}",
        response.case_ref,
        table(
            &[
                "WHEN (UTC)",
                "",
                "KIND",
                "WITH",
                "STATE",
                "MESSAGE",
                "IN REPLY TO"
            ],
            rows
        )
    )
}

/// What is due.
pub(crate) fn due(items: &[pb::DueItem]) -> String {
    if items.is_empty() {
        return "nothing is due\n".to_owned();
    }
    let rows = items
        .iter()
        .map(|i| {
            let (what, arrow) = match pb::DueKind::try_from(i.what) {
                Ok(pb::DueKind::AwaitingAnswer) => ("awaiting their answer", "→"),
                Ok(pb::DueKind::AnswerOwed) => ("we owe an answer", "←"),
                Ok(pb::DueKind::FollowUpDue) => ("follow-up due", "↔"),
                _ => ("due", "↔"),
            };
            vec![
                i.due.clone(),
                what.to_owned(),
                kind(i.kind),
                format!("{arrow} {}", i.counterpart),
                i.case_ref.clone(),
                i.message_id.clone(),
            ]
        })
        .collect();
    table(&["DUE", "WHAT", "KIND", "WITH", "CASE", "MESSAGE"], rows)
}

fn organisation_type(value: i32) -> String {
    match pb::OrganisationType::try_from(value) {
        Ok(pb::OrganisationType::Nrm) => "NRM",
        Ok(pb::OrganisationType::Ngo) => "NGO",
        Ok(pb::OrganisationType::Authority) => "authority",
        Ok(pb::OrganisationType::InternationalOrganisation) => "international organisation",
        Ok(pb::OrganisationType::ReturnCounselling) => "return counselling",
        _ => "-",
    }
    .to_owned()
}

/// The participant registry.
pub(crate) fn participants(list: &[pb::Participant]) -> String {
    if list.is_empty() {
        return "no participants known yet (the node has not reached the broker)\n".to_owned();
    }
    let rows = list
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.display_name.clone(),
                p.country.clone(),
                organisation_type(p.organisation_type),
                p.accepts
                    .iter()
                    .map(|k| kind(*k))
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        })
        .collect();
    table(&["PARTICIPANT", "NAME", "COUNTRY", "TYPE", "ACCEPTS"], rows)
}

/// The days a certificate ending at `not_after` has left at `now`, with `advice` once
/// they are fewer than [`CERT_EXPIRY_WARNING`] or none.
fn days_left(not_after: SystemTime, now: SystemTime, advice: &str) -> String {
    match not_after.duration_since(now) {
        Err(_) => format!("EXPIRED: {advice}"),
        Ok(left) if left < CERT_EXPIRY_WARNING => {
            format!("{} days left: {advice}", left.as_secs() / 86_400)
        }
        Ok(left) => format!("{} days left", left.as_secs() / 86_400),
    }
}

/// The node's status.
pub(crate) fn status(s: &pb::NodeStatus, now: SystemTime) -> String {
    let broker = if s.broker_connected {
        "connected".to_owned()
    } else if s.last_broker_error.is_empty() {
        "not connected".to_owned()
    } else {
        format!("not connected ({})", s.last_broker_error)
    };
    let certificate = match s
        .certificate_not_after
        .as_ref()
        .and_then(|ts| from_timestamp(ts).ok())
    {
        None => "cannot be read".to_owned(),
        Some(not_after) => format!(
            "serial {}, valid until {} ({})",
            s.certificate_serial,
            when(s.certificate_not_after.as_ref()),
            days_left(not_after, now, "renew it")
        ),
    };
    // the node cannot connect once the broker's certificate has ended: its operator
    // must renew it, and a node's operator is often the first to look
    let broker_certificate = match s
        .broker_certificate_not_after
        .as_ref()
        .and_then(|ts| from_timestamp(ts).ok())
    {
        None => "not seen yet (no handshake with the broker since the node started)".to_owned(),
        Some(not_after) => format!(
            "valid until {} ({})",
            when(s.broker_certificate_not_after.as_ref()),
            days_left(not_after, now, "tell the broker's operator to renew it")
        ),
    };
    let certificate = if s.certificate_refused.is_empty() {
        certificate
    } else {
        format!(
            "{certificate}\n             the TLS files changed but cannot be used, so the one above \
             stays: {}",
            s.certificate_refused
        )
    };
    let pending = if s.withdrawals_pending == 0 {
        String::new()
    } else {
        format!(
            ", {} withdrawn here and still to be withdrawn on the broker",
            s.withdrawals_pending
        )
    };
    // (said first: while it lasts nothing new is acknowledged, submitted or sent)
    let store = if s.store_error.is_empty() {
        String::new()
    } else {
        format!(
            "store        FAILING: cannot write to disk ({}); nothing new is received, \
             submitted or sent until it can: free disk space or repair the disk (restart the \
             node if this stays after the repair)\n",
            s.store_error
        )
    };
    format!(
        "{store}participant  {}\nbroker       {}\nbroker cert  {broker_certificate}\ncertificate  {}\noutbox       {} queued, {} at the broker, {} failed{pending}\ninbox        {} (last seq {})\n",
        s.participant,
        broker,
        certificate,
        s.outbox_queued,
        s.outbox_submitted,
        s.outbox_failed,
        count(s.inbox_total, "message", "messages"),
        s.last_inbox_seq
    )
}

/// `n` and the noun that goes with it: "1 message", "2 messages".
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_counts_one_inbox_message_in_the_singular() {
        let one = status(
            &pb::NodeStatus {
                inbox_total: 1,
                ..Default::default()
            },
            SystemTime::now(),
        );
        assert!(one.contains("inbox        1 message (last seq"), "{one}");
        let two = status(
            &pb::NodeStatus {
                inbox_total: 2,
                ..Default::default()
            },
            SystemTime::now(),
        );
        assert!(two.contains("inbox        2 messages (last seq"), "{two}");
    }

    /// A store that cannot write says so on the first line, with what to do; a working
    /// one adds no line.
    #[test]
    fn status_says_first_that_the_store_cannot_write() {
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_946_520);
        let mut s = pb::NodeStatus {
            participant: "NL-NRM".into(),
            ..Default::default()
        };
        assert!(!status(&s, now).contains("store "), "{}", status(&s, now));
        s.store_error = "store: No space left on device".into();
        let text = status(&s, now);
        let first = text.lines().next().unwrap_or_default();
        for part in [
            "FAILING",
            "No space left on device",
            "free disk space",
            "restart",
        ] {
            assert!(first.contains(part), "{part}: {text}");
        }
    }

    /// An entry whose first report the broker contradicted says so where the user reads
    /// its state (outbox list, message view): the state shown stands, but is not all the
    /// broker said.
    #[test]
    fn an_outbox_entry_s_state_shows_its_contradictions() {
        let mut entry = pb::OutboxEntry {
            state: pb::OutboxState::Failed as i32,
            failure: Some(pb::DeliveryFailure {
                outcome: "rejected-by-recipient".into(),
                reason_code: "INVALID_BODY".into(),
                field_path: String::new(),
            }),
            ..Default::default()
        };
        assert!(!outbox_state(&entry).contains("contradicted"));
        entry.contradicted_by = vec!["delivered".into(), "purged".into()];
        let shown = outbox_state(&entry);
        assert!(
            shown.starts_with("failed: rejected by recipient"),
            "{shown}"
        );
        assert!(
            shown.ends_with("contradicted by a later report: delivered, purged"),
            "{shown}"
        );
    }

    #[test]
    fn status_says_how_long_the_certificate_is_valid() {
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_946_520);
        let days = |n: u64| std::time::Duration::from_secs(n * 86_400);
        let with = |not_after: Option<SystemTime>| pb::NodeStatus {
            participant: "NL-NRM".into(),
            certificate_serial: "3f2a".into(),
            certificate_not_after: not_after.map(trmx_proto::time::to_timestamp),
            ..Default::default()
        };
        let line = |s: &pb::NodeStatus| {
            status(s, now)
                .lines()
                .find(|l| l.starts_with("certificate"))
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            line(&with(Some(now + days(400)))),
            "certificate  serial 3f2a, valid until 2028-01-03 10:02 (400 days left)"
        );
        assert!(line(&with(Some(now + days(9)))).ends_with("(9 days left: renew it)"));
        assert!(line(&with(Some(now - days(1)))).ends_with("(EXPIRED: renew it)"));
        assert_eq!(line(&with(None)), "certificate  cannot be read");
        let broker_line = |not_after: Option<SystemTime>| {
            let s = pb::NodeStatus {
                broker_certificate_not_after: not_after.map(trmx_proto::time::to_timestamp),
                ..with(Some(now + days(400)))
            };
            status(&s, now)
                .lines()
                .find(|l| l.starts_with("broker cert"))
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            broker_line(Some(now + days(400))),
            "broker cert  valid until 2028-01-03 10:02 (400 days left)"
        );
        assert!(
            broker_line(Some(now + days(9)))
                .ends_with("(9 days left: tell the broker's operator to renew it)")
        );
        assert!(
            broker_line(Some(now - days(1)))
                .ends_with("(EXPIRED: tell the broker's operator to renew it)")
        );
        assert_eq!(
            broker_line(None),
            "broker cert  not seen yet (no handshake with the broker since the node started)"
        );
        let refused = pb::NodeStatus {
            certificate_refused: "the key is not the certificate's".into(),
            ..with(Some(now + days(400)))
        };
        assert!(
            status(&refused, now).contains(
                "\n             the TLS files changed but cannot be used, so the one above \
                 stays: the key is not the certificate's\n"
            ),
            "{}",
            status(&refused, now)
        );
    }

    #[test]
    fn times_read_as_utc_minutes() {
        let ts = pb::Timestamp {
            seconds: 1_795_946_520, // 2026-11-29 10:02:00 UTC
            nanos: 0,
        };
        assert_eq!(when(Some(&ts)), "2026-11-29 10:02");
        assert_eq!(when(None), "-");
    }

    #[test]
    fn tables_align_columns_with_arrows() {
        let out = table(
            &["KIND", "TO", "STATE"],
            vec![
                vec!["referral".into(), "→ BE-PAYOKE".into(), "delivered".into()],
                vec!["follow-up".into(), "→ NG-NAPTIP".into(), "queued".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[1], "referral   → BE-PAYOKE  delivered");
        assert_eq!(lines[2], "follow-up  → NG-NAPTIP  queued");
    }
}
