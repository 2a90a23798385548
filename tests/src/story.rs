//! The demo story of DOMAIN.md ("A case, end to end"), driven through the
//! nodes' local APIs with the example JSON documents of `proto/examples/`.
//!
//! [`Story`] sends each message from the right node, waits until the
//! recipient's node has it and the sender's node has the delivery receipt,
//! and narrates each step in words a caseworker reads. The demo binary and
//! the end-to-end tests run the same code; the tests then check the
//! [`StoryReport`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use tonic::transport::Channel;
use trmx_proto::Kind;
use trmx_proto::pb::node_api_client::NodeApiClient;
use trmx_proto::pb::{self, send_request};
use trmx_proto::time::{Date, from_timestamp};

/// How long one step may take before the story fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a step polls a node's state while waiting.
const POLL_EVERY: Duration = Duration::from_millis(25);

/// One message of the story, as sent.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Step number in DOMAIN.md's story.
    pub step: u32,
    /// Sender participant ID.
    pub from: String,
    /// Recipient participant ID.
    pub to: String,
    /// Kind.
    pub kind: Kind,
    /// The id the sender's node gave it.
    pub message_id: String,
    /// Whether the recipient's node has it in its inbox.
    pub received: bool,
    /// Whether the sender's node has its delivery receipt.
    pub delivered: bool,
}

/// What the story did.
#[derive(Debug, Clone, Default)]
pub struct StoryReport {
    /// The case reference every message carried.
    pub case_ref: String,
    /// Every message, in order.
    pub sent: Vec<Sent>,
    /// Each participant's timeline of the case: (participant, entries).
    pub timelines: BTreeMap<String, Vec<pb::TimelineEntry>>,
    /// Whether the broker held the request while NG-NAPTIP was offline
    /// (submitted, not yet delivered, before the node started).
    pub held_while_offline: bool,
}

impl StoryReport {
    /// Every message reached its recipient and its sender got the receipt.
    pub fn all_delivered(&self) -> bool {
        !self.sent.is_empty() && self.sent.iter().all(|s| s.received && s.delivered)
    }
}

/// Connects to a node's local API socket.
pub async fn connect(socket: &Path) -> anyhow::Result<NodeApiClient<Channel>> {
    trmx_node::connect_local(socket)
        .await
        .with_context(|| format!("connecting to the node API at {}", socket.display()))
}

/// The story runner: the nodes it talks to and where it narrates.
#[derive(Debug)]
pub struct Story<W: Write> {
    nodes: BTreeMap<String, NodeApiClient<Channel>>,
    out: W,
    report: StoryReport,
}

impl<W: Write> Story<W> {
    /// A runner narrating to `out`.
    pub fn new(out: W) -> Self {
        Self {
            nodes: BTreeMap::new(),
            out,
            report: StoryReport::default(),
        }
    }

    /// Makes the node of `participant` reachable through `client`.
    pub fn add_node(&mut self, participant: &str, client: NodeApiClient<Channel>) {
        self.nodes.insert(participant.to_owned(), client);
    }

    /// Prints one line of narration.
    pub fn say(&mut self, line: impl AsRef<str>) {
        // Narration is best effort: a closed stdout must not fail the story.
        let _ = writeln!(self.out, "{}", line.as_ref());
    }

    /// Runs steps 1–3 of the story up to the point where `BE-PAYOKE` asks
    /// `NG-NAPTIP`, whose node is offline; then calls `bring_online` (which
    /// must start `NG-NAPTIP`'s node and return its API client) and runs the
    /// rest.
    pub async fn run<F, Fut>(mut self, bring_online: F) -> anyhow::Result<StoryReport>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<NodeApiClient<Channel>>>,
    {
        self.say("");
        self.say(
            "Step 1 - NL-NRM identifies a presumed victim and refers her to BE-PAYOKE in Belgium",
        );
        let referral = self
            .send(1, "NL-NRM", "BE-PAYOKE", Kind::Referral, 0, None, true)
            .await?;
        self.await_received(0).await?;
        self.await_delivered(0).await?;

        self.say("");
        self.say("Step 2 - BE-PAYOKE accepts, and months later reports progress");
        self.send(
            2,
            "BE-PAYOKE",
            "NL-NRM",
            Kind::ReferralResponse,
            1,
            Some(&referral),
            false,
        )
        .await?;
        self.await_received(1).await?;
        self.await_delivered(1).await?;
        self.await_answered("NL-NRM", &referral).await?;
        self.send(2, "BE-PAYOKE", "NL-NRM", Kind::FollowUp, 2, None, false)
            .await?;
        self.await_received(2).await?;
        self.await_delivered(2).await?;

        self.say("");
        self.say("Step 3 - she decides to return home; BE-PAYOKE asks NG-NAPTIP for a return risk assessment");
        let request = self
            .send(
                3,
                "BE-PAYOKE",
                "NG-NAPTIP",
                Kind::ReturnRiskAssessmentRequest,
                3,
                None,
                false,
            )
            .await?;
        self.await_submitted("BE-PAYOKE", &request).await?;
        let still_held =
            self.outbox_state("BE-PAYOKE", &request).await? == pb::OutboxState::Submitted;
        self.report.held_while_offline = still_held;
        self.say(if still_held {
            "          NG-NAPTIP's node is offline: the broker holds the request safely on disk"
        } else {
            "          NG-NAPTIP's node is offline, but the request is no longer waiting at the broker"
        });
        self.say("          ... NG-NAPTIP's node comes online");
        let naptip = bring_online().await?;
        self.add_node("NG-NAPTIP", naptip);
        self.await_received(3).await?;
        self.await_delivered(3).await?;

        self.say("");
        self.say("Step 4 - NG-NAPTIP answers: medium risk, proceed with reception on arrival and safe accommodation");
        self.send(
            4,
            "NG-NAPTIP",
            "BE-PAYOKE",
            Kind::ReturnRiskAssessment,
            4,
            Some(&request),
            false,
        )
        .await?;
        self.await_received(4).await?;
        self.await_delivered(4).await?;
        self.await_answered("BE-PAYOKE", &request).await?;

        self.say("");
        self.say("Step 5 - after the return, NG-NAPTIP sends follow-ups to BE-PAYOKE");
        self.send(5, "NG-NAPTIP", "BE-PAYOKE", Kind::FollowUp, 5, None, false)
            .await?;
        self.await_received(5).await?;
        self.await_delivered(5).await?;
        self.send(5, "NG-NAPTIP", "BE-PAYOKE", Kind::FollowUp, 6, None, false)
            .await?;
        self.await_received(6).await?;
        self.await_delivered(6).await?;

        self.print_timelines().await?;
        Ok(self.report)
    }

    /// Sends the example document `example` (an index into [`EXAMPLES`]) as
    /// `kind` from `from` to `to` on the story's case (the first message opens
    /// it) and returns the message id.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &mut self,
        step: u32,
        from: &str,
        to: &str,
        kind: Kind,
        example: usize,
        in_reply_to: Option<&str>,
        urgent: bool,
    ) -> anyhow::Result<String> {
        let json = EXAMPLES[example];
        let new_case = self.report.case_ref.is_empty();
        let request = pb::SendRequest {
            kind: kind.to_pb() as i32,
            recipient: to.to_owned(),
            case_ref: self.report.case_ref.clone(),
            new_case,
            in_reply_to: in_reply_to.unwrap_or_default().to_owned(),
            priority: if urgent {
                pb::Priority::Urgent
            } else {
                pb::Priority::Normal
            } as i32,
            idempotency_key: format!("demo-step-{step}-{}", self.report.sent.len() + 1),
            expires_at: None,
            body: Some(send_request::Body::BodyJson(json.to_owned())),
        };
        let response = self
            .node(from)?
            .send(request)
            .await
            .with_context(|| format!("{from} could not send the {kind}"))?
            .into_inner();
        if new_case {
            self.report.case_ref = response.case_ref.clone();
            self.say(format!("          {from} opens case {}", response.case_ref));
        }
        let urgency = if urgent { " (urgent)" } else { "" };
        // (what the document says, so that the three follow-ups, say, are told apart)
        let says = match CAPTIONS[example] {
            "" => String::new(),
            caption => format!(": {caption}"),
        };
        self.say(format!(
            "  {}  {from:<9} -> {to:<9}  {}{urgency}{says}, sent",
            clock_time(SystemTime::now()),
            kind_words(kind),
        ));
        self.report.sent.push(Sent {
            step,
            from: from.to_owned(),
            to: to.to_owned(),
            kind,
            message_id: response.message_id.clone(),
            received: false,
            delivered: false,
        });
        Ok(response.message_id)
    }

    /// Waits until the recipient's node of message `index` has it.
    async fn await_received(&mut self, index: usize) -> anyhow::Result<()> {
        let sent = self.report.sent[index].clone();
        let node = self.node(&sent.to)?.clone();
        let entry = poll(
            &format!("{} to receive the {}", sent.to, kind_words(sent.kind)),
            || {
                let mut node = node.clone();
                let id = sent.message_id.clone();
                async move {
                    let found = node
                        .get_message(pb::GetMessageRequest {
                            message_id: id,
                            ..Default::default()
                        })
                        .await;
                    Ok(match found {
                        Ok(response) => match response.into_inner().entry {
                            Some(pb::get_message_response::Entry::Inbox(entry)) => Some(entry),
                            _ => None,
                        },
                        Err(status) if status.code() == tonic::Code::NotFound => None,
                        Err(status) => return Err(status.into()),
                    })
                }
            },
        )
        .await?;
        self.report.sent[index].received = true;
        let at = entry
            .received_at
            .as_ref()
            .and_then(|t| from_timestamp(t).ok());
        self.say(format!(
            "  {}  {:<9}    received the {} and stored it; its node acknowledged it",
            at.map(clock_time).unwrap_or_default(),
            sent.to,
            kind_words(sent.kind),
        ));
        Ok(())
    }

    /// Waits until the sender's node of message `index` has its delivery receipt.
    async fn await_delivered(&mut self, index: usize) -> anyhow::Result<()> {
        let sent = self.report.sent[index].clone();
        let entry = self
            .await_outbox(&sent.from, &sent.message_id, "its delivery receipt", |e| {
                e.state == pb::OutboxState::Delivered as i32
                    || e.state == pb::OutboxState::Failed as i32
            })
            .await?;
        if entry.state != pb::OutboxState::Delivered as i32 {
            let reason = entry
                .failure
                .map(|f| format!("{} {} {}", f.outcome, f.reason_code, f.field_path));
            bail!(
                "the {} from {} to {} failed: {}",
                kind_words(sent.kind),
                sent.from,
                sent.to,
                reason.unwrap_or_default()
            );
        }
        self.report.sent[index].delivered = true;
        let at = entry
            .outcome_at
            .as_ref()
            .and_then(|t| from_timestamp(t).ok());
        self.say(format!(
            "  {}  {:<9}    delivery receipt: {} delivered to {}",
            at.map(clock_time).unwrap_or_default(),
            sent.from,
            kind_words(sent.kind),
            sent.to,
        ));
        Ok(())
    }

    /// Waits until `participant`'s outbox shows `message_id` as answered.
    async fn await_answered(&mut self, participant: &str, message_id: &str) -> anyhow::Result<()> {
        let entry = self
            .await_outbox(participant, message_id, "the answer", |e| {
                !e.answered_by.is_empty()
            })
            .await?;
        self.say(format!(
            "            {participant:<9}    its {} is now marked answered",
            kind_words(Kind::from_pb(entry.kind).unwrap_or(Kind::Referral)),
        ));
        Ok(())
    }

    /// Waits until the broker has accepted `message_id` from `participant`.
    async fn await_submitted(&mut self, participant: &str, message_id: &str) -> anyhow::Result<()> {
        self.await_outbox(participant, message_id, "the broker to accept it", |e| {
            e.state != pb::OutboxState::Queued as i32
        })
        .await?;
        self.say(format!(
            "  {}  broker       accepted the request and keeps it until NG-NAPTIP connects",
            clock_time(SystemTime::now()),
        ));
        Ok(())
    }

    async fn outbox_state(
        &mut self,
        participant: &str,
        message_id: &str,
    ) -> anyhow::Result<pb::OutboxState> {
        let entry = self.outbox_entry(participant, message_id).await?;
        Ok(entry
            .and_then(|e| pb::OutboxState::try_from(e.state).ok())
            .unwrap_or(pb::OutboxState::Unspecified))
    }

    async fn outbox_entry(
        &mut self,
        participant: &str,
        message_id: &str,
    ) -> anyhow::Result<Option<pb::OutboxEntry>> {
        let response = self
            .node(participant)?
            .get_message(pb::GetMessageRequest {
                message_id: message_id.to_owned(),
                ..Default::default()
            })
            .await?;
        Ok(match response.into_inner().entry {
            Some(pb::get_message_response::Entry::Outbox(entry)) => Some(entry),
            _ => None,
        })
    }

    async fn await_outbox(
        &mut self,
        participant: &str,
        message_id: &str,
        what: &str,
        done: impl Fn(&pb::OutboxEntry) -> bool,
    ) -> anyhow::Result<pb::OutboxEntry> {
        let node = self.node(participant)?.clone();
        let done = &done;
        poll(&format!("{participant} to get {what}"), || {
            let mut node = node.clone();
            let id = message_id.to_owned();
            async move {
                let response = node
                    .get_message(pb::GetMessageRequest {
                        message_id: id,
                        ..Default::default()
                    })
                    .await?;
                Ok(match response.into_inner().entry {
                    Some(pb::get_message_response::Entry::Outbox(entry)) if done(&entry) => {
                        Some(entry)
                    }
                    _ => None,
                })
            }
        })
        .await
    }

    /// Prints each participant's timeline of the case and stores it in the report.
    async fn print_timelines(&mut self) -> anyhow::Result<()> {
        let case_ref = self.report.case_ref.clone();
        self.say("");
        self.say(format!(
            "The case as each organisation sees it (case {case_ref})"
        ));
        let participants: Vec<String> = self.nodes.keys().cloned().collect();
        for participant in participants {
            let timeline = crate::harness::timeline(self.node(&participant)?, &case_ref).await?;
            self.say("");
            self.say(format!("  {participant}"));
            for entry in &timeline {
                let at = entry.at.as_ref().and_then(|t| from_timestamp(t).ok());
                let kind = Kind::from_pb(entry.kind)
                    .map(kind_words)
                    .unwrap_or("message");
                let (verb, preposition) = if entry.direction == pb::MessageDirection::Sent as i32 {
                    ("sent    ", "to  ")
                } else {
                    ("received", "from")
                };
                self.say(format!(
                    "    {}  {verb}  {kind:<32} {preposition} {:<9}  {}",
                    at.map(date_time).unwrap_or_default(),
                    entry.counterpart,
                    entry.state,
                ));
            }
            self.report.timelines.insert(participant, timeline);
        }
        Ok(())
    }

    fn node(&mut self, participant: &str) -> anyhow::Result<&mut NodeApiClient<Channel>> {
        self.nodes
            .get_mut(participant)
            .with_context(|| format!("no node for {participant} is running"))
    }
}

/// The example documents of `proto/examples`, in story order.
pub const EXAMPLES: [&str; 7] = [
    include_str!("../../proto/examples/01-referral.json"),
    include_str!("../../proto/examples/02-referral-response.json"),
    include_str!("../../proto/examples/03-follow-up-training.json"),
    include_str!("../../proto/examples/04-return-risk-assessment-request.json"),
    include_str!("../../proto/examples/05-return-risk-assessment.json"),
    include_str!("../../proto/examples/06-follow-up-arrived.json"),
    include_str!("../../proto/examples/07-follow-up-3-months.json"),
];

/// What each of [`EXAMPLES`] says, in a few words of DOMAIN.md's story, for
/// the narration ("" where the kind says it all). Written here rather than
/// read from the documents: the narration names no body value.
pub const CAPTIONS: [&str; 7] = [
    "",
    "accepted",
    "language and vocational training started",
    "",
    "medium risk, return can proceed with measures",
    "arrived safely",
    "reintegration monitoring at 3 months",
];

/// A kind in a caseworker's words.
pub fn kind_words(kind: Kind) -> &'static str {
    match kind {
        Kind::Referral => "referral",
        Kind::ReferralResponse => "answer to the referral",
        Kind::ReturnRiskAssessmentRequest => "return risk assessment request",
        Kind::ReturnRiskAssessment => "return risk assessment",
        Kind::FollowUp => "follow-up report",
        Kind::DeliveryReceipt => "delivery receipt",
        Kind::NonDeliveryReport => "non-delivery report",
    }
}

/// `HH:MM:SS` (UTC) of an instant.
fn clock_time(at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of an instant.
fn date_time(at: SystemTime) -> String {
    format!("{} {}", Date::of(at), clock_time(at))
}

/// Calls `check` every [`POLL_EVERY`] until it returns `Some`, for at most
/// [`STEP_TIMEOUT`].
async fn poll<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {STEP_TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
