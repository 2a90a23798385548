//! Issue 7 item 4: bad input through a running broker and a running node,
//! property-based (proptest).
//!
//! - `Submit` request bodies sent as raw bytes (no prost encoder in the
//!   way): random bytes, byte-level mutations of a valid request, and
//!   envelopes broken on purpose (oversize fields, invalid UTF-8, wrong
//!   digests, timestamps out of range, unknown enum values, unknown fields,
//!   deep nesting). An oracle decodes each body locally with the same
//!   schema and says which answer it deserves; the broker must give it,
//!   never `INTERNAL`/`UNKNOWN`, never a dropped connection, and store
//!   nothing it refused: `GetStatus` is `NOT_FOUND` for the id, and the
//!   recipient's queue holds exactly the accepted messages, intact.
//!   Meanwhile another pair of participants keeps doing submit → receive →
//!   ack round trips on the same broker, and must never fail.
//! - Garbage payloads in well-formed envelopes, sent by a hand-made client
//!   to a real node: the node rejects each (the sender gets a
//!   `NON_DELIVERY_REPORT` with `REJECTED_BY_RECIPIENT`), stores none, and
//!   still stores a valid message afterwards.
//!
//! Every run prints its proptest seed; `PROPTEST_RNG_SEED=<seed>` replays
//! it, `PROPTEST_CASES=<n>` changes the number of cases.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use prost::Message;
use tokio::runtime::Runtime;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use trmx_proto::body::{Body, BodyContext};
use trmx_proto::envelope::{SubmitEnvelope, sha256};
use trmx_proto::time::{Date, to_timestamp};
use trmx_proto::{Kind, MessageId, pb};
use trmx_tests::adversary::{SUBMIT_PATH, raw_unary};
use trmx_tests::harness::{
    Api, Exchange, Harness, broker_status, envelope, expect_quiet, inbox, next_item, wait_received,
    watch,
};
use trmx_tests::story::EXAMPLES;
use trmx_transport::{ClientOptions, client_channel};

const NL: &str = "NL-NRM";
const BE: &str = "BE-PAYOKE";
const NG: &str = "NG-NAPTIP";
/// The broker's envelope limit in these tests (small, so oversize is cheap).
const MAX_ENVELOPE: u64 = 64 << 10;
/// Instants the envelope rules accept: 2000-01-01 ..= 9999-12-31T23:59:59.
const MIN_SECONDS: i64 = 946_684_800;
const MAX_SECONDS: i64 = 253_402_300_799;

// ---- running property tests inside a broker's runtime ----------------------------

/// How long proptest may shrink a failing input, in milliseconds.
const MAX_SHRINK_MILLIS: u32 = 60_000;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A proptest config with `cases` (unless `PROPTEST_CASES` says otherwise),
/// no failure files, a seed that is printed so a failure can be replayed, and
/// shrinking bounded in time: a case here can wait [`trmx_tests::harness::WAIT`]
/// (10 s) for a report, and proptest's own bound (4 × cases shrink steps) let
/// one failure run for over 40 minutes, past CI's limit, without a word.
fn config(cases: u32) -> Config {
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        });
    eprintln!("proptest seed {seed} (replay with PROPTEST_RNG_SEED={seed})");
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_time: MAX_SHRINK_MILLIS,
        ..Config::default()
    }
}

/// Runs `check` for every generated value in `rt`; fails with the smallest
/// failing value proptest finds.
fn run<S: Strategy>(
    rt: &Runtime,
    cases: u32,
    strategy: S,
    check: impl AsyncFn(S::Value) -> anyhow::Result<()>,
) where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(config(cases));
    let result = runner.run(&strategy, |value| {
        rt.block_on(check(value))
            .map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---- the broker side ----------------------------------------------------------------

/// What a `Submit` body deserves, by the wire contract.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// Not a protobuf `SubmitRequest` at all: `INVALID_ARGUMENT`.
    Malformed,
    /// Decodes, but breaks an envelope rule: `INVALID_ARGUMENT`.
    Invalid,
    /// A valid envelope the broker must refuse with this code.
    Refused(Code),
    /// A valid envelope the broker must accept and deliver.
    Accepted(Box<pb::Envelope>),
}

/// The oracle: decodes `body` as the broker must, and applies the
/// `Submit` rules of DESIGN.md §2–3 in the broker's order. The caller is
/// NL-NRM; every member accepts every application kind.
fn judge(body: &[u8]) -> Expect {
    let Ok(request) = pb::SubmitRequest::decode(body) else {
        return Expect::Malformed;
    };
    let Some(env) = request.envelope else {
        return Expect::Invalid;
    };
    if env.encoded_len() as u64 > MAX_ENVELOPE {
        return Expect::Invalid;
    }
    // who may send it comes before whether it is well formed: any sender
    // but empty or the caller, and a broker-made kind, are refused as such
    let broker_made = Kind::from_pb(env.kind).is_some_and(Kind::is_broker_made);
    if (!env.sender.is_empty() && env.sender != NL) || broker_made {
        return Expect::Refused(Code::PermissionDenied);
    }
    let Ok(checked) = SubmitEnvelope::check(&env) else {
        return Expect::Invalid;
    };
    if ![NL, BE, NG].contains(&checked.recipient.as_str()) {
        return Expect::Refused(Code::NotFound);
    }
    if checked.expires_at.is_some_and(|at| at <= SystemTime::now()) {
        return Expect::Refused(Code::FailedPrecondition);
    }
    Expect::Accepted(Box::new(env))
}

/// A broker with small envelopes and no rate limit, NL-NRM's raw channel
/// and good client, BE-PAYOKE's queue, and what the broker accepted.
struct Fuzz {
    h: Harness,
    raw: Channel,
    nl: Exchange,
    queue: tokio::sync::Mutex<Streaming<pb::Delivery>>,
    be: Exchange,
    accepted: Mutex<BTreeMap<String, pb::Envelope>>,
}

impl Fuzz {
    async fn start() -> anyhow::Result<Fuzz> {
        let mut h = Harness::new().await?;
        let config = h.broker_config_mut();
        config.limits.max_envelope_bytes = MAX_ENVELOPE;
        config.limits.sender_rate_per_second = 1_000_000;
        config.limits.sender_rate_burst = 1_000_000;
        h.start_broker().await?;
        let options = ClientOptions {
            server_name: "localhost".into(),
            ..ClientOptions::default()
        };
        let raw = client_channel(&h.broker_addr().to_string(), &h.tls(NL), &options)?;
        let nl = h.exchange(NL)?;
        let mut be = h.exchange(BE)?;
        let queue = be
            .receive(pb::ReceiveRequest { max_in_flight: 64 })
            .await?
            .into_inner();
        Ok(Fuzz {
            h,
            raw,
            nl,
            queue: tokio::sync::Mutex::new(queue),
            be,
            accepted: Mutex::new(BTreeMap::new()),
        })
    }

    /// Sends `body` as a `Submit` and checks the answer against [`judge`];
    /// for a refusal, that nothing is stored under `ids` (or the id that
    /// the body carries).
    async fn check(&self, body: Vec<u8>, ids: &[String]) -> anyhow::Result<()> {
        let expect = judge(&body);
        let result = raw_unary(self.raw.clone(), SUBMIT_PATH, body.clone()).await;
        let refused = |status: &Status, code: Code| status.code() == code;
        match (&expect, &result) {
            (Expect::Malformed, Err(s)) if refused(s, Code::InvalidArgument) => {}
            // The refusal names the envelope (or one of its fields).
            (Expect::Invalid, Err(s))
                if refused(s, Code::InvalidArgument) && s.message().contains("envelope") => {}
            (Expect::Refused(code), Err(s)) if refused(s, *code) => {}
            (Expect::Accepted(env), Ok(bytes)) => {
                let receipt = pb::SubmitReceipt::decode(bytes.as_slice())?;
                anyhow::ensure!(receipt.message_id == env.message_id, "{receipt:?}");
                anyhow::ensure!(!receipt.duplicate, "{receipt:?}");
                anyhow::ensure!(env.recipient == BE, "accepted for {}", env.recipient);
                self.accepted
                    .lock()
                    .unwrap()
                    .insert(env.message_id.clone(), (**env).clone());
            }
            _ => anyhow::bail!("expected {expect:?}, got {result:?}"),
        }
        if matches!(expect, Expect::Accepted(_)) {
            return Ok(());
        }
        // Nothing stored: neither under the ids the case was built from nor
        // under the id the body itself carries.
        let carried = pb::SubmitRequest::decode(body.as_slice())
            .ok()
            .and_then(|r| r.envelope)
            .map(|e| e.message_id);
        for id in ids.iter().chain(carried.iter()) {
            if MessageId::parse(id).is_err() {
                continue;
            }
            match self
                .nl
                .clone()
                .get_status(pb::GetStatusRequest {
                    message_id: id.clone(),
                })
                .await
            {
                Err(s) if s.code() == Code::NotFound => {}
                other => anyhow::bail!("refused id {id} has a status: {other:?}"),
            }
        }
        Ok(())
    }

    /// BE-PAYOKE's queue holds exactly the accepted messages, each intact
    /// (no partial message), and then nothing.
    async fn assert_queue_is_exactly_the_accepted(&self) -> anyhow::Result<()> {
        let accepted = self.accepted.lock().unwrap().clone();
        let mut queue = self.queue.lock().await;
        let mut seen = BTreeMap::new();
        while seen.len() < accepted.len() {
            let delivery = next_item(&mut queue).await?;
            let env = delivery.envelope.unwrap_or_default();
            self.be
                .clone()
                .ack(pb::AckRequest {
                    message_ids: vec![env.message_id.clone()],
                })
                .await?;
            seen.insert(env.message_id.clone(), env);
        }
        expect_quiet(&mut queue).await?;
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            accepted.keys().collect::<Vec<_>>()
        );
        for (id, sent) in &accepted {
            let got = &seen[id];
            assert_eq!(got.sender, NL);
            assert_eq!(got.payload, sent.payload, "{id}");
            assert_eq!(got.payload_sha256, sha256(&got.payload).to_vec(), "{id}");
            assert_eq!(
                (&got.recipient, got.kind, &got.case_ref, &got.content_type),
                (
                    &sent.recipient,
                    sent.kind,
                    &sent.case_ref,
                    &sent.content_type
                )
            );
        }
        Ok(())
    }

    async fn shutdown(self) -> anyhow::Result<()> {
        self.h.shutdown().await
    }
}

/// Round trips of other participants (NG-NAPTIP → NL-NRM: submit, receive,
/// ack) while the fuzzing runs; every one must succeed. Returns how many.
struct Bystander {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<u32>>,
}

impl Bystander {
    async fn start(h: &Harness) -> anyhow::Result<Bystander> {
        let mut ng = h.exchange(NG)?;
        let mut nl = h.exchange(NL)?;
        let mut stream = nl
            .receive(pb::ReceiveRequest { max_in_flight: 1 })
            .await?
            .into_inner();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut trips = 0;
            loop {
                let env = envelope(NL, Kind::FollowUp, b"bystander".to_vec());
                let id = env.message_id.clone();
                ng.submit(pb::SubmitRequest {
                    envelope: Some(env),
                })
                .await?;
                let delivery = next_item(&mut stream).await?;
                anyhow::ensure!(delivery.envelope.map(|e| e.message_id) == Some(id.clone()));
                nl.ack(pb::AckRequest {
                    message_ids: vec![id],
                })
                .await?;
                trips += 1;
                if stopped.load(Ordering::Relaxed) {
                    return Ok(trips);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Ok(Bystander { stop, task })
    }

    async fn finish(self) -> anyhow::Result<u32> {
        self.stop.store(true, Ordering::Relaxed);
        let trips = self.task.await??;
        anyhow::ensure!(trips >= 1, "no round trip beside the fuzzing");
        Ok(trips)
    }
}

/// Starts a broker and a bystander, runs the property, checks the queue and
/// that the bystander never failed.
fn fuzz_broker<S: Strategy>(
    cases: u32,
    strategy: S,
    case: impl AsyncFn(&Fuzz, S::Value) -> anyhow::Result<()>,
) where
    S::Value: std::fmt::Debug,
{
    let rt = runtime();
    let fuzz = rt.block_on(Fuzz::start()).unwrap();
    let bystander = rt.block_on(Bystander::start(&fuzz.h)).unwrap();
    run(&rt, cases, strategy, async |value| case(&fuzz, value).await);
    rt.block_on(async {
        let trips = bystander.finish().await?;
        fuzz.assert_queue_is_exactly_the_accepted().await?;
        eprintln!(
            "{} accepted, {trips} bystander round trips",
            fuzz.accepted.lock().unwrap().len()
        );
        // and the broker still answers everyone
        let info = fuzz.nl.clone().get_info(pb::GetInfoRequest {}).await?;
        assert_eq!(info.into_inner().caller, NL);
        fuzz.shutdown().await
    })
    .unwrap();
}

/// A valid envelope from NL-NRM to BE-PAYOKE with every string field set
/// (so that each can be mutated), and its encoded `SubmitRequest`.
fn valid(payload: Vec<u8>) -> pb::Envelope {
    let mut env = envelope(BE, Kind::ReferralResponse, payload);
    env.sender = NL.into();
    env.in_reply_to = MessageId::new_v7().to_string();
    env.priority = pb::Priority::Urgent as i32;
    env.expires_at = Some(to_timestamp(SystemTime::now() + Duration::from_secs(3600)));
    env
}

fn request_bytes(env: &pb::Envelope) -> Vec<u8> {
    pb::SubmitRequest {
        envelope: Some(env.clone()),
    }
    .encode_to_vec()
}

/// A length-delimited field: tag, length, bytes.
fn ld(field: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// A request whose envelope is `envelope_bytes` plus `extra` top-level bytes.
fn request_with(envelope_bytes: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut out = ld(1, envelope_bytes);
    out.extend_from_slice(extra);
    out
}

// -- random and mutated bytes

#[derive(Debug, Clone)]
enum ByteEdit {
    Flip { at: usize, xor: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Delete { at: usize, len: usize },
    Truncate { at: usize },
    Splice { at: usize, bytes: Vec<u8> },
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    let at = any::<usize>();
    prop_oneof![
        (at, 1u8..).prop_map(|(at, xor)| ByteEdit::Flip { at, xor }),
        (at, prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| ByteEdit::Insert { at, bytes }),
        (at, 1usize..16).prop_map(|(at, len)| ByteEdit::Delete { at, len }),
        at.prop_map(|at| ByteEdit::Truncate { at }),
        (at, prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| ByteEdit::Splice { at, bytes }),
    ]
}

fn apply(body: &mut Vec<u8>, edit: &ByteEdit) {
    if body.is_empty() {
        return;
    }
    let pos = |at: usize, len: usize| at % len;
    match edit {
        ByteEdit::Flip { at, xor } => {
            let i = pos(*at, body.len());
            body[i] ^= xor;
        }
        ByteEdit::Insert { at, bytes } => {
            let i = pos(*at, body.len() + 1);
            body.splice(i..i, bytes.iter().copied());
        }
        ByteEdit::Delete { at, len } => {
            let i = pos(*at, body.len());
            let end = (i + len).min(body.len());
            body.drain(i..end);
        }
        ByteEdit::Truncate { at } => body.truncate(pos(*at, body.len())),
        ByteEdit::Splice { at, bytes } => {
            let i = pos(*at, body.len());
            let end = (i + bytes.len()).min(body.len());
            body.splice(i..end, bytes.iter().copied());
        }
    }
}

#[derive(Debug, Clone)]
enum RawBody {
    Random(Vec<u8>),
    Mutated {
        payload: Vec<u8>,
        edits: Vec<ByteEdit>,
    },
}

fn raw_body() -> impl Strategy<Value = RawBody> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600).prop_map(RawBody::Random),
        (
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(byte_edit(), 1..4)
        )
            .prop_map(|(payload, edits)| RawBody::Mutated { payload, edits }),
    ]
}

async fn raw_case(fuzz: &Fuzz, body: RawBody) -> anyhow::Result<()> {
    match body {
        RawBody::Random(bytes) => fuzz.check(bytes, &[]).await,
        RawBody::Mutated { payload, edits } => {
            let env = valid(payload);
            let mut bytes = request_bytes(&env);
            for edit in &edits {
                apply(&mut bytes, edit);
            }
            fuzz.check(bytes, &[env.message_id]).await
        }
    }
}

#[test]
fn random_and_mutated_submit_bodies_are_answered_and_never_stored_in_part() {
    fuzz_broker(128, raw_body(), raw_case);
}

// -- envelopes broken on purpose

/// A string field of the envelope (field number, name).
const STRING_FIELDS: [(u32, &str); 6] = [
    (1, "message_id"),
    (2, "sender"),
    (3, "recipient"),
    (5, "case_ref"),
    (6, "in_reply_to"),
    (11, "content_type"),
];

fn string_field(env: &mut pb::Envelope, field: u32) -> &mut String {
    match field {
        1 => &mut env.message_id,
        2 => &mut env.sender,
        3 => &mut env.recipient,
        5 => &mut env.case_ref,
        6 => &mut env.in_reply_to,
        _ => &mut env.content_type,
    }
}

#[derive(Debug, Clone)]
enum Broken {
    /// A string field far longer than any valid value.
    OversizeString { field: usize, len: usize },
    /// A payload (with its right digest) around the envelope limit.
    BigPayload { len: usize },
    /// One byte of a string field replaced by a byte >= 0x80 on the wire.
    InvalidUtf8 { field: usize, at: usize, byte: u8 },
    /// A digest that is not the payload's.
    WrongDigest { digest: Vec<u8> },
    /// `created_at` (or `expires_at`) out of range.
    Timestamp {
        expires: bool,
        seconds: i64,
        nanos: i32,
    },
    /// Kind and priority as any number.
    Enums { kind: i32, priority: i32 },
    /// Unknown fields (varint, fixed, length-delimited) in the envelope and
    /// in the request.
    UnknownFields {
        in_envelope: Vec<(u32, Vec<u8>)>,
        in_request: Vec<(u32, Vec<u8>)>,
    },
    /// Nested groups or nested length-delimited fields, `depth` deep, in
    /// the envelope, its `created_at`, or the request.
    Nesting {
        depth: usize,
        groups: bool,
        place: u8,
    },
}

fn out_of_range_timestamp() -> impl Strategy<Value = (i64, i32)> {
    let valid_nanos = 0..1_000_000_000i32;
    let valid_seconds = MIN_SECONDS..=MAX_SECONDS;
    prop_oneof![
        ((MAX_SECONDS + 1).., valid_nanos.clone()),
        (..0i64, valid_nanos.clone()),
        (0..MIN_SECONDS, valid_nanos),
        (valid_seconds.clone(), ..0i32),
        (valid_seconds, 1_000_000_000i32..),
    ]
}

fn unknown_fields() -> impl Strategy<Value = Vec<(u32, Vec<u8>)>> {
    // Field numbers the schema does not use (envelope: 1-14, request: 1).
    prop::collection::vec(
        (15u32..2000, prop::collection::vec(any::<u8>(), 0..24)),
        0..5,
    )
}

fn broken() -> impl Strategy<Value = Broken> {
    prop_oneof![
        (0..STRING_FIELDS.len(), 257usize..5000)
            .prop_map(|(field, len)| Broken::OversizeString { field, len }),
        ((MAX_ENVELOPE as usize - 2000)..(MAX_ENVELOPE as usize + 2000))
            .prop_map(|len| Broken::BigPayload { len }),
        (0..STRING_FIELDS.len(), any::<usize>(), 0x80u8..)
            .prop_map(|(field, at, byte)| Broken::InvalidUtf8 { field, at, byte }),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(|digest| Broken::WrongDigest { digest }),
        (any::<bool>(), out_of_range_timestamp()).prop_map(|(expires, (seconds, nanos))| {
            Broken::Timestamp {
                expires,
                seconds,
                nanos,
            }
        }),
        (any::<i32>(), any::<i32>()).prop_map(|(kind, priority)| Broken::Enums { kind, priority }),
        (unknown_fields(), unknown_fields()).prop_map(|(in_envelope, in_request)| {
            Broken::UnknownFields {
                in_envelope,
                in_request,
            }
        }),
        (1usize..400, any::<bool>(), 0u8..3).prop_map(|(depth, groups, place)| Broken::Nesting {
            depth,
            groups,
            place
        }),
    ]
}

/// `depth` nested unknown fields (number 15): groups, or length-delimited.
fn nested(depth: usize, groups: bool) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key};
    if groups {
        let mut out = Vec::new();
        for _ in 0..depth {
            encode_key(15, WireType::StartGroup, &mut out);
        }
        for _ in 0..depth {
            encode_key(15, WireType::EndGroup, &mut out);
        }
        out
    } else {
        (0..depth).fold(Vec::new(), |inner, _| ld(15, &inner))
    }
}

/// Unknown fields of mixed wire types, from (number, bytes).
fn encode_unknown(fields: &[(u32, Vec<u8>)]) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut out = Vec::new();
    for (number, bytes) in fields {
        match bytes.len() % 3 {
            0 => out.extend(ld(*number, bytes)),
            1 => {
                encode_key(*number, WireType::Varint, &mut out);
                encode_varint(bytes.iter().map(|b| u64::from(*b)).sum(), &mut out);
            }
            _ => {
                encode_key(*number, WireType::SixtyFourBit, &mut out);
                out.extend_from_slice(&[bytes[0]; 8]);
            }
        }
    }
    out
}

/// The request bytes of `broken`, and the field an `INVALID_ARGUMENT`
/// refusal of it must name.
fn build(broken: &Broken) -> (pb::Envelope, Vec<u8>, Option<&'static str>) {
    let mut env = valid(b"opaque response body".to_vec());
    match broken {
        Broken::OversizeString { field, len } => {
            let (number, name) = STRING_FIELDS[*field];
            *string_field(&mut env, number) = "A".repeat(*len);
            let bytes = request_bytes(&env);
            // a sender that is not the caller is PERMISSION_DENIED, however long
            let name = (name != "sender").then_some(name);
            (env, bytes, name)
        }
        Broken::BigPayload { len } => {
            env.payload = vec![0x5a; *len];
            env.payload_sha256 = sha256(&env.payload).to_vec();
            let bytes = request_bytes(&env);
            (env, bytes, None)
        }
        Broken::InvalidUtf8 { field, at, byte } => {
            let (number, _) = STRING_FIELDS[*field];
            let value = string_field(&mut env, number).clone().into_bytes();
            let needle = ld(number, &value);
            let mut bytes = request_bytes(&env);
            let start = bytes
                .windows(needle.len())
                .position(|w| w == needle.as_slice())
                .unwrap();
            let value_start = start + needle.len() - value.len();
            bytes[value_start + at % value.len()] = *byte;
            (env, bytes, None)
        }
        Broken::WrongDigest { digest } => {
            let mut digest = digest.clone();
            if digest == env.payload_sha256 {
                digest.push(0);
            }
            env.payload_sha256 = digest;
            let bytes = request_bytes(&env);
            (env, bytes, Some("payload_sha256"))
        }
        Broken::Timestamp {
            expires,
            seconds,
            nanos,
        } => {
            let ts = pb::Timestamp {
                seconds: *seconds,
                nanos: *nanos,
            };
            let name = if *expires {
                env.expires_at = Some(ts);
                "expires_at"
            } else {
                env.created_at = Some(ts);
                "created_at"
            };
            let bytes = request_bytes(&env);
            (env, bytes, Some(name))
        }
        Broken::Enums { kind, priority } => {
            env.kind = *kind;
            env.priority = *priority;
            let bytes = request_bytes(&env);
            (env, bytes, None)
        }
        Broken::UnknownFields {
            in_envelope,
            in_request,
        } => {
            let mut envelope_bytes = env.encode_to_vec();
            envelope_bytes.extend(encode_unknown(in_envelope));
            let bytes = request_with(&envelope_bytes, &encode_unknown(in_request));
            (env, bytes, None)
        }
        Broken::Nesting {
            depth,
            groups,
            place,
        } => {
            let nest = nested(*depth, *groups);
            let bytes = match place {
                0 => {
                    let mut envelope_bytes = env.encode_to_vec();
                    envelope_bytes.extend(&nest);
                    request_with(&envelope_bytes, &[])
                }
                1 => {
                    // inside created_at (field 8), after its own fields
                    let mut ts = env.created_at.take().unwrap().encode_to_vec();
                    ts.extend(&nest);
                    let mut envelope_bytes = env.encode_to_vec();
                    envelope_bytes.extend(ld(8, &ts));
                    request_with(&envelope_bytes, &[])
                }
                _ => request_with(&env.encode_to_vec(), &nest),
            };
            (env, bytes, None)
        }
    }
}

async fn broken_case(fuzz: &Fuzz, broken: Broken) -> anyhow::Result<()> {
    let (env, bytes, names) = build(&broken);
    let expect = judge(&bytes);
    // The mutation decides part of the answer by itself, whatever the oracle says.
    match &broken {
        Broken::InvalidUtf8 { .. } => anyhow::ensure!(expect == Expect::Malformed),
        Broken::UnknownFields { .. } => {
            anyhow::ensure!(matches!(expect, Expect::Accepted(_)), "{expect:?}")
        }
        Broken::OversizeString { field, .. } if STRING_FIELDS[*field].1 == "sender" => {
            anyhow::ensure!(
                expect == Expect::Refused(Code::PermissionDenied),
                "{expect:?}"
            )
        }
        Broken::OversizeString { .. } | Broken::WrongDigest { .. } | Broken::Timestamp { .. } => {
            anyhow::ensure!(expect == Expect::Invalid, "{expect:?}")
        }
        _ => {}
    }
    if let Some(name) = names {
        let result = raw_unary(fuzz.raw.clone(), SUBMIT_PATH, bytes.clone()).await;
        // The refusal names the field (its path, never its value).
        let status = result.err().unwrap_or_else(|| Status::ok(""));
        anyhow::ensure!(
            status.code() == Code::InvalidArgument
                && status.message().contains(&format!("envelope.{name}")),
            "{broken:?}: {status:?}"
        );
    }
    fuzz.check(bytes, &[env.message_id]).await
}

#[test]
fn broken_envelopes_get_invalid_argument_naming_the_field_and_store_nothing() {
    fuzz_broker(128, broken(), broken_case);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_decoding_limit_is_refused_and_the_broker_goes_on() -> anyhow::Result<()> {
    let fuzz = Fuzz::start().await?;
    let mut env = valid(vec![0x5a; 2 << 20]);
    env.payload_sha256 = sha256(&env.payload).to_vec();
    let id = env.message_id.clone();
    let result = raw_unary(fuzz.raw.clone(), SUBMIT_PATH, request_bytes(&env)).await;
    let status = result.err().unwrap_or_else(|| Status::ok(""));
    // tonic refuses a message over its decoding limit before the handler
    // runs, with OUT_OF_RANGE (gRPC suggests RESOURCE_EXHAUSTED).
    assert!(
        matches!(
            status.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{status:?}"
    );
    fuzz.check(request_bytes(&valid(b"small".to_vec())), &[])
        .await?;
    match broker_status(&mut fuzz.nl.clone(), &id).await {
        Err(e) if e.downcast_ref::<Status>().map(Status::code) == Some(Code::NotFound) => {}
        other => anyhow::bail!("oversize message has a status: {other:?}"),
    }
    fuzz.assert_queue_is_exactly_the_accepted().await?;
    fuzz.shutdown().await
}

// ---- the node side ------------------------------------------------------------------

/// A payload for a well-formed envelope that no valid body is.
#[derive(Debug, Clone)]
enum Garbage {
    /// Random bytes as a protobuf body of `kind`.
    Bytes { kind: usize, bytes: Vec<u8> },
    /// The example document's protobuf encoding, edited.
    EditedProto {
        example: usize,
        edits: Vec<ByteEdit>,
    },
    /// The example JSON document, edited, sent as `application/json`.
    EditedJson {
        example: usize,
        edits: Vec<ByteEdit>,
    },
}

/// The kinds of the example documents, in their order.
const EXAMPLE_KINDS: [Kind; 7] = [
    Kind::Referral,
    Kind::ReferralResponse,
    Kind::FollowUp,
    Kind::ReturnRiskAssessmentRequest,
    Kind::ReturnRiskAssessment,
    Kind::FollowUp,
    Kind::FollowUp,
];

/// Answers carry the id of the request they answer.
fn needs_in_reply_to(kind: Kind) -> bool {
    matches!(kind, Kind::ReferralResponse | Kind::ReturnRiskAssessment)
}

fn garbage() -> impl Strategy<Value = Garbage> {
    let edits = || prop::collection::vec(byte_edit(), 1..4);
    prop_oneof![
        (
            0..Kind::APPLICATION.len(),
            prop::collection::vec(any::<u8>(), 0..300)
        )
            .prop_map(|(kind, bytes)| Garbage::Bytes { kind, bytes }),
        (0..EXAMPLES.len(), edits())
            .prop_map(|(example, edits)| Garbage::EditedProto { example, edits }),
        (0..EXAMPLES.len(), edits())
            .prop_map(|(example, edits)| Garbage::EditedJson { example, edits }),
    ]
}

/// The kind, payload and content type of `garbage`.
fn payload_of(garbage: &Garbage) -> (Kind, Vec<u8>, String) {
    let proto = |kind: Kind| kind.content_type();
    let json = |kind: Kind| format!("application/json; proto={}", kind.body_message());
    match garbage {
        Garbage::Bytes { kind, bytes } => {
            let kind = Kind::APPLICATION[*kind];
            (kind, bytes.clone(), proto(kind))
        }
        Garbage::EditedProto { example, edits } => {
            let kind = EXAMPLE_KINDS[*example];
            let mut bytes = Body::from_json(kind, EXAMPLES[*example]).unwrap().encode();
            for edit in edits {
                apply(&mut bytes, edit);
            }
            (kind, bytes, proto(kind))
        }
        Garbage::EditedJson { example, edits } => {
            let kind = EXAMPLE_KINDS[*example];
            let mut bytes = EXAMPLES[*example].as_bytes().to_vec();
            for edit in edits {
                apply(&mut bytes, edit);
            }
            (kind, bytes, json(kind))
        }
    }
}

/// What the node must say about this payload (the rules the node applies):
/// `Ok` to store it, or the error whose field path it rejects it with.
fn judge_body(
    kind: Kind,
    payload: &[u8],
    content_type: &str,
    in_reply_to: Option<MessageId>,
) -> Result<(), trmx_proto::ValidationError> {
    let body = if content_type.starts_with("application/json") {
        std::str::from_utf8(payload)
            .map_err(|_| trmx_proto::ValidationError::new(Body::root(kind), "is not UTF-8 JSON"))
            .and_then(|text| Body::from_json(kind, text))
    } else {
        Body::decode(kind, payload)
    };
    let ctx = BodyContext {
        in_reply_to,
        today: Date::of(SystemTime::now()),
    };
    body.and_then(|b| b.validate(&ctx))
}

/// A node rejects `payload` (a body of `kind`) sent by NG-NAPTIP's
/// hand-made client `ng`; the sender's `reports` stream gets the
/// non-delivery report, and the broker dead-letters the message.
async fn assert_rejected_by_node(
    ng: &Exchange,
    reports: &mut Streaming<pb::Delivery>,
    kind: Kind,
    payload: Vec<u8>,
    content_type: String,
) -> anyhow::Result<()> {
    let mut env = envelope(BE, kind, payload);
    env.content_type = content_type;
    if needs_in_reply_to(kind) {
        env.in_reply_to = MessageId::new_v7().to_string();
    }
    let id = env.message_id.clone();
    ng.clone()
        .submit(pb::SubmitRequest {
            envelope: Some(env),
        })
        .await?;
    let delivery = match next_item(reports).await {
        Ok(delivery) => delivery,
        Err(e) => {
            let status = broker_status(&mut ng.clone(), &id).await;
            anyhow::bail!("{e:#}; the broker's status of {id}: {status:?}");
        }
    };
    let report_env = delivery.envelope.unwrap_or_default();
    ng.clone()
        .ack(pb::AckRequest {
            message_ids: vec![report_env.message_id.clone()],
        })
        .await?;
    anyhow::ensure!(
        report_env.kind == pb::MessageKind::NonDeliveryReport as i32,
        "{report_env:?}"
    );
    let Body::Receipt(report) = Body::decode(Kind::NonDeliveryReport, &report_env.payload)? else {
        anyhow::bail!("a report carries a receipt");
    };
    anyhow::ensure!(report.message_id == id, "{report:?}");
    anyhow::ensure!(
        report.outcome == pb::Outcome::RejectedByRecipient as i32,
        "{report:?}"
    );
    anyhow::ensure!(report.reason_code.contains("INVALID_BODY"), "{report:?}");
    let status = broker_status(&mut ng.clone(), &id).await?;
    anyhow::ensure!(
        status.state == pb::MessageState::DeadLettered as i32,
        "{status:?}"
    );
    Ok(())
}

/// A broker, BE-PAYOKE's node, and NG-NAPTIP as a hand-made client with
/// its report stream.
async fn node_setup() -> anyhow::Result<(Harness, Api, Exchange, Streaming<pb::Delivery>)> {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let be_api = h.start_node(BE).await?;
    // NG-NAPTIP runs no node: a hand-made client with its certificate.
    let mut ng = h.exchange(NG)?;
    let reports = ng
        .receive(pb::ReceiveRequest { max_in_flight: 8 })
        .await?
        .into_inner();
    Ok((h, be_api, ng, reports))
}

#[test]
fn garbage_bodies_are_rejected_by_the_recipient_node_and_never_stored() {
    let rt = runtime();
    let (h, mut be_api, ng, reports) = rt.block_on(node_setup()).unwrap();
    let reports = tokio::sync::Mutex::new(reports);
    let rejected = Mutex::new(0u32);

    let strategy = garbage().prop_filter("garbage the node must reject", |g| {
        let (kind, payload, content_type) = payload_of(g);
        let in_reply_to = needs_in_reply_to(kind).then(MessageId::new_v7);
        judge_body(kind, &payload, &content_type, in_reply_to).is_err()
    });
    run(&rt, 64, strategy, async |g| {
        let (kind, payload, content_type) = payload_of(&g);
        let mut reports = reports.lock().await;
        assert_rejected_by_node(&ng, &mut reports, kind, payload, content_type).await?;
        *rejected.lock().unwrap() += 1;
        Ok(())
    });

    rt.block_on(async {
        // The node stored none of them...
        assert!(inbox(&mut be_api).await?.is_empty());
        let mut stream = watch(&mut be_api, 0).await?;
        expect_quiet(&mut stream).await?;
        // ...and still stores a valid message.
        let body = Body::from_json(Kind::Referral, EXAMPLES[0])?.encode();
        let env = envelope(BE, Kind::Referral, body);
        let id = env.message_id.clone();
        ng.clone()
            .submit(pb::SubmitRequest {
                envelope: Some(env),
            })
            .await?;
        wait_received(&be_api, &id).await?;
        eprintln!("{} garbage bodies rejected", rejected.lock().unwrap());
        h.shutdown().await
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_body_with_an_odd_key_is_rejected_and_its_sender_told() -> anyhow::Result<()> {
    let (h, mut be_api, ng, mut reports) = node_setup().await?;
    let json = EXAMPLES[0].replacen("\"person\"", "\"per son\"", 1);
    let kind = Kind::Referral;
    let content_type = format!("application/json; proto={}", kind.body_message());
    let error = judge_body(kind, json.as_bytes(), &content_type, None).unwrap_err();
    // The path ends at the object holding the odd key: a valid dotted path
    // the broker accepts in the Reject, and no echo of the key itself.
    assert_eq!(error.field, "referral");
    assert_rejected_by_node(&ng, &mut reports, kind, json.into_bytes(), content_type).await?;
    assert!(inbox(&mut be_api).await?.is_empty());
    h.shutdown().await
}
