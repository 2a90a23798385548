//! Federation statistics from envelope metadata and lifecycle times only
//! (issue 6 item 6): messages per corridor and kind per month, request-to-answer
//! times, the non-delivery rate. Never reads a payload.
//!
//! Disclosure control: every count under [`SUPPRESSION_THRESHOLD`] is suppressed
//! (shown as `<5`), the percentiles of a group with fewer pairs are not given, and a
//! rate is not given when it would reveal a suppressed count.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use trmx_proto::time::{Date, from_millis, to_timestamp};
use trmx_proto::{Kind, MessageId, ParticipantId, pb};

use crate::store::{Millis, State, StatusRecord};

/// Counts under this value are never shown exactly.
pub const SUPPRESSION_THRESHOLD: u64 = 5;

/// The request kinds whose answer times are measured, with their answer kind.
pub const REQUEST_ANSWER: [(Kind, Kind); 2] = [
    (Kind::Referral, Kind::ReferralResponse),
    (
        Kind::ReturnRiskAssessmentRequest,
        Kind::ReturnRiskAssessment,
    ),
];

/// A count, suppressed when under the threshold.
pub fn count(value: u64) -> pb::StatisticCount {
    if value < SUPPRESSION_THRESHOLD {
        pb::StatisticCount {
            value: 0,
            suppressed: true,
        }
    } else {
        pb::StatisticCount {
            value,
            suppressed: false,
        }
    }
}

/// `YYYY-MM` of an instant (UTC).
pub fn month_of(at: Millis) -> String {
    let date = Date::of(from_millis(at));
    format!("{:04}-{:02}", date.year, date.month)
}

/// The value at nearest rank `percent` of sorted `values` (non-empty).
fn percentile(sorted: &[Millis], percent: u64) -> Millis {
    let n = sorted.len() as u64;
    // nearest rank: ceil(p/100 * n), 1-based
    let rank = (percent * n).div_ceil(100).clamp(1, n);
    let index = usize::try_from(rank - 1).unwrap_or(0);
    sorted.get(index).copied().unwrap_or_default()
}

fn duration(millis: Millis) -> pb::Duration {
    let d = Duration::from_millis(millis);
    pb::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Computes the statistics of the messages accepted in `[from, until)` among
/// `records` (in broker sequence order; see [`Tally`]).
pub fn compute(records: &[StatusRecord], from: Millis, until: Millis) -> pb::Statistics {
    let mut tally = Tally::new(from, until);
    for record in records {
        tally.add(record);
    }
    tally.finish()
}

/// The statistics of the messages accepted in `[from, until)`, tallied one
/// record at a time over the metadata of every message the broker still keeps,
/// in broker sequence order. Receipts and messages outside the range are not
/// counted, but an answer outside the range still answers a request inside it.
///
/// It keeps the figures and, per request of the range, what its answer needs
/// (participants as small numbers), never the records: its memory grows with
/// the requests of the range, not with the store.
///
/// An answer is matched to a request seen before it in broker sequence: a node
/// answers a request it received, which the broker had stored first. (An
/// `in_reply_to` naming an id that did not exist yet answers nothing.)
#[derive(Debug)]
pub struct Tally {
    from: Millis,
    until: Millis,
    corridors: BTreeMap<(String, String, String, Kind), u64>,
    /// (request id, its sender) → the request.
    requests: HashMap<(MessageId, u32), Request>,
    /// Participants seen in requests, numbered.
    participants: HashMap<ParticipantId, u32>,
    /// month → (delivered, not delivered)
    outcomes: BTreeMap<String, (u64, u64)>,
}

/// What a request of the range needs to be matched with its first answer.
#[derive(Debug)]
struct Request {
    kind: Kind,
    recipient: u32,
    accepted_at: Millis,
    first_answer: Option<Millis>,
}

impl Tally {
    /// An empty tally of the range `[from, until)`.
    pub fn new(from: Millis, until: Millis) -> Self {
        Self {
            from,
            until,
            corridors: BTreeMap::new(),
            requests: HashMap::new(),
            participants: HashMap::new(),
            outcomes: BTreeMap::new(),
        }
    }

    fn in_range(&self, r: &StatusRecord) -> bool {
        !r.kind.is_broker_made() && r.accepted_at >= self.from && r.accepted_at < self.until
    }

    fn number(&mut self, participant: &ParticipantId) -> u32 {
        let next = u32::try_from(self.participants.len()).unwrap_or(u32::MAX);
        *self.participants.entry(participant.clone()).or_insert(next)
    }

    /// Counts `r`, the next record in broker sequence order.
    pub fn add(&mut self, r: &StatusRecord) {
        if let Some(asked) = r.in_reply_to {
            self.answer(asked, r);
        }
        if !self.in_range(r) {
            return;
        }
        if let Some(sender) = &r.sender {
            let key = (
                month_of(r.accepted_at),
                sender.country().to_owned(),
                r.recipient.country().to_owned(),
                r.kind,
            );
            *self.corridors.entry(key).or_default() += 1;
            if REQUEST_ANSWER.iter().any(|(req, _)| *req == r.kind) {
                let sender = self.number(sender);
                let recipient = self.number(&r.recipient);
                self.requests.insert(
                    (r.message_id, sender),
                    Request {
                        kind: r.kind,
                        recipient,
                        accepted_at: r.accepted_at,
                        first_answer: None,
                    },
                );
            }
        }
        let entry = self.outcomes.entry(month_of(r.accepted_at)).or_default();
        match r.state {
            State::Acknowledged => entry.0 += 1,
            State::Expired | State::DeadLettered | State::Purged => entry.1 += 1,
            State::Accepted | State::InFlight | State::Withdrawn => {}
        }
    }

    /// `answer` answers the request `asked` of its recipient, if it is the
    /// expected kind of answer from that request's recipient.
    fn answer(&mut self, asked: MessageId, answer: &StatusRecord) {
        // the answer goes back to the request's sender
        let Some(&asker) = self.participants.get(&answer.recipient) else {
            return;
        };
        let answerer = answer
            .sender
            .as_ref()
            .and_then(|s| self.participants.get(s))
            .copied();
        let Some(request) = self.requests.get_mut(&(asked, asker)) else {
            return;
        };
        let expected = REQUEST_ANSWER
            .iter()
            .find(|(req, _)| *req == request.kind)
            .map(|(_, ans)| *ans);
        if expected != Some(answer.kind)
            || answerer != Some(request.recipient)
            || answer.accepted_at < request.accepted_at
        {
            return;
        }
        let first = request.first_answer.get_or_insert(answer.accepted_at);
        *first = (*first).min(answer.accepted_at);
    }

    /// The statistics, with small counts suppressed.
    pub fn finish(self) -> pb::Statistics {
        let mut waits: BTreeMap<(String, Kind), Vec<Millis>> = BTreeMap::new();
        for request in self.requests.values() {
            let Some(answered_at) = request.first_answer else {
                continue;
            };
            waits
                .entry((month_of(request.accepted_at), request.kind))
                .or_default()
                .push(answered_at.saturating_sub(request.accepted_at));
        }
        let response_times = waits
            .into_iter()
            .map(|((month, kind), mut values)| {
                values.sort_unstable();
                let pairs = count(values.len() as u64);
                let (median, p90) = if pairs.suppressed {
                    (None, None)
                } else {
                    (
                        Some(duration(percentile(&values, 50))),
                        Some(duration(percentile(&values, 90))),
                    )
                };
                let answer = REQUEST_ANSWER
                    .iter()
                    .find(|(req, _)| *req == kind)
                    .map_or(Kind::ReferralResponse, |(_, ans)| *ans);
                pb::ResponseTime {
                    month,
                    request_kind: kind.to_pb() as i32,
                    answer_kind: answer.to_pb() as i32,
                    pairs: Some(pairs),
                    median,
                    p90,
                }
            })
            .collect();
        let (from, until, corridors, outcomes) =
            (self.from, self.until, self.corridors, self.outcomes);
        let non_delivery = outcomes
            .into_iter()
            .filter(|(_, (delivered, failed))| delivered + failed > 0)
            .map(|(month, (delivered, failed))| {
                let total = delivered + failed;
                let reveals = |n: u64| n > 0 && n < SUPPRESSION_THRESHOLD;
                let rate_suppressed =
                    total < SUPPRESSION_THRESHOLD || reveals(failed) || reveals(delivered);
                let rate = if rate_suppressed {
                    0.0
                } else {
                    failed as f64 / total as f64
                };
                pb::NonDelivery {
                    month,
                    delivered: Some(count(delivered)),
                    not_delivered: Some(count(failed)),
                    rate,
                    rate_suppressed,
                }
            })
            .collect();
        pb::Statistics {
            corridors: corridors
                .into_iter()
                .map(|((month, sender, recipient, kind), n)| pb::CorridorCount {
                    month,
                    sender_country: sender,
                    recipient_country: recipient,
                    kind: kind.to_pb() as i32,
                    messages: Some(count(n)),
                })
                .collect(),
            response_times,
            non_delivery,
            from: Some(to_timestamp(from_millis(from))),
            until: Some(to_timestamp(from_millis(until))),
            suppression_threshold: SUPPRESSION_THRESHOLD as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trmx_proto::CaseRef;
    use trmx_proto::envelope::Priority;

    const DAY: Millis = 86_400_000;
    // 2025-03-01T00:00:00Z
    const MARCH: Millis = 1_740_787_200_000;

    fn record(
        from: &str,
        to: &str,
        kind: Kind,
        at: Millis,
        state: State,
        in_reply_to: Option<MessageId>,
    ) -> StatusRecord {
        StatusRecord {
            message_id: MessageId::new_v7(),
            sender: Some(ParticipantId::parse(from).unwrap()),
            recipient: ParticipantId::parse(to).unwrap(),
            kind,
            case_ref: CaseRef::new_random(),
            in_reply_to,
            priority: Priority::Normal,
            state,
            attempts: 1,
            accepted_at: at,
            expires_at: at + DAY,
            last_delivered_at: None,
            state_changed_at: at,
            next_attempt_at: None,
            reason_code: String::new(),
            field_path: String::new(),
            payload_size: 10,
            payload_kept: false,
            broker_seq: 1,
            redrivable: false,
        }
    }

    #[test]
    fn months_and_percentiles() {
        assert_eq!(month_of(MARCH), "2025-03");
        assert_eq!(month_of(MARCH - 1), "2025-02");
        let v: Vec<Millis> = (1..=10).collect();
        assert_eq!(percentile(&v, 50), 5);
        assert_eq!(percentile(&v, 90), 9);
        assert_eq!(percentile(&[7], 90), 7);
    }

    #[test]
    fn corridors_pairs_and_suppression() {
        let mut records = Vec::new();
        // 6 referrals NL → BE, each answered after i hours; 2 RRA requests NL → NG, answered
        for i in 1..=6u64 {
            let req = record(
                "NL-NRM",
                "BE-PAYOKE",
                Kind::Referral,
                MARCH + i,
                State::Acknowledged,
                None,
            );
            let answer = record(
                "BE-PAYOKE",
                "NL-NRM",
                Kind::ReferralResponse,
                MARCH + i + i * 3_600_000,
                State::Acknowledged,
                Some(req.message_id),
            );
            records.push(req);
            records.push(answer);
        }
        for i in 1..=2u64 {
            let req = record(
                "NL-NRM",
                "NG-NAPTIP",
                Kind::ReturnRiskAssessmentRequest,
                MARCH + i,
                State::Expired,
                None,
            );
            let answer = record(
                "NG-NAPTIP",
                "NL-NRM",
                Kind::ReturnRiskAssessment,
                MARCH + DAY,
                State::Acknowledged,
                Some(req.message_id),
            );
            records.push(req);
            records.push(answer);
        }
        let stats = compute(&records, MARCH, MARCH + 31 * DAY);
        let nl_be = stats
            .corridors
            .iter()
            .find(|c| c.sender_country == "NL" && c.recipient_country == "BE")
            .unwrap();
        assert_eq!(nl_be.messages.unwrap().value, 6);
        let nl_ng = stats
            .corridors
            .iter()
            .find(|c| c.sender_country == "NL" && c.recipient_country == "NG")
            .unwrap();
        assert!(nl_ng.messages.unwrap().suppressed);
        assert_eq!(nl_ng.messages.unwrap().value, 0);
        let referral = stats
            .response_times
            .iter()
            .find(|t| t.request_kind == pb::MessageKind::Referral as i32)
            .unwrap();
        assert_eq!(referral.pairs.unwrap().value, 6);
        assert_eq!(referral.median.unwrap().seconds, 3 * 3600);
        assert_eq!(referral.p90.unwrap().seconds, 6 * 3600);
        let rra = stats
            .response_times
            .iter()
            .find(|t| t.request_kind == pb::MessageKind::ReturnRiskAssessmentRequest as i32)
            .unwrap();
        assert!(rra.pairs.unwrap().suppressed);
        assert!(rra.median.is_none() && rra.p90.is_none());
        // 14 acknowledged, 2 expired: the rate would reveal the 2
        let month = &stats.non_delivery[0];
        assert_eq!(month.delivered.unwrap().value, 14);
        assert!(month.not_delivered.unwrap().suppressed);
        assert!(month.rate_suppressed);
        // outside the range: nothing
        let empty = compute(&records, MARCH + 40 * DAY, MARCH + 50 * DAY);
        assert!(empty.corridors.is_empty() && empty.response_times.is_empty());
    }

    #[test]
    fn an_answer_counts_after_its_request_even_outside_the_range() {
        let request = record(
            "NL-NRM",
            "BE-PAYOKE",
            Kind::Referral,
            MARCH + 1,
            State::Acknowledged,
            None,
        );
        // answered in April, for March's figures
        let answer = record(
            "BE-PAYOKE",
            "NL-NRM",
            Kind::ReferralResponse,
            MARCH + 40 * DAY,
            State::Acknowledged,
            Some(request.message_id),
        );
        let mut tally = Tally::new(MARCH, MARCH + 31 * DAY);
        tally.add(&request);
        tally.add(&answer);
        let first = tally.requests.values().next().and_then(|r| r.first_answer);
        assert_eq!(first, Some(MARCH + 40 * DAY));
        // an "answer" the broker stored before the request answers nothing
        let mut tally = Tally::new(MARCH, MARCH + 31 * DAY);
        tally.add(&answer);
        tally.add(&request);
        assert_eq!(tally.requests.values().next().unwrap().first_answer, None);
        // nor does one from somebody else than the request's recipient
        let mut other = answer.clone();
        other.sender = Some(ParticipantId::parse("NG-NAPTIP").unwrap());
        let mut tally = Tally::new(MARCH, MARCH + 31 * DAY);
        tally.add(&request);
        tally.add(&other);
        assert_eq!(tally.requests.values().next().unwrap().first_answer, None);
    }
}
