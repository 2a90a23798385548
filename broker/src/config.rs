//! The broker's TOML config: [`BrokerConfig`], its defaults and [`BrokerConfig::validate`].
//!
//! Every section has `deny_unknown_fields` and named default functions, so a
//! misspelt key is an error and a missing one takes the documented default.
//! `broker/broker.example.toml` is the commented reference.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trmx_proto::{Kind, ParticipantId, pb};

use crate::error::BrokerError;
use crate::units::{self, format_bytes, format_duration};

/// Largest `max_max_in_flight` the broker allows.
pub const MAX_IN_FLIGHT_CEILING: u32 = 1024;
/// Largest envelope size the broker can be configured for.
pub const MAX_ENVELOPE_CEILING: u64 = 64 << 20;

/// The whole broker config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Address to listen on (the binary binds it; `serve` takes a bound listener).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the admin HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); `None`
    /// (written `"off"`) runs no admin endpoint. Loopback unless configured otherwise.
    #[serde(default = "default_admin_listen", with = "admin_listen")]
    pub admin_listen: Option<SocketAddr>,
    /// Host names the admin endpoint answers to besides IP addresses and
    /// `localhost` (a web page's DNS rebinding reaches the endpoint under a
    /// name of its own; any other name gets 421).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_allowed_hosts: Vec<String>,
    /// The broker's name shown in `GetInfo`; defaults to the name in its certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Directory of the broker's database.
    pub data_dir: PathBuf,
    /// Certificates and the CRL.
    pub tls: TlsConfig,
    /// The storage engine.
    #[serde(default)]
    pub store: StoreConfig,
    /// Sizes, counts and rates.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Redelivery, expiry and retention.
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    /// The participant registry.
    #[serde(default)]
    pub participants: Vec<ParticipantConfig>,
}

/// `[tls]`: the broker's certificate, the federation CA and its CRL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The federation CA certificate (PEM): client certificates must chain to it.
    pub ca: PathBuf,
    /// The broker's certificate chain (PEM).
    pub cert: PathBuf,
    /// The broker's private key (PEM).
    pub key: PathBuf,
    /// The federation CA's CRL (PEM or DER); none means no revocation checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
    /// How often the CRL is re-read (besides SIGHUP).
    #[serde(default = "default_crl_reload_interval", with = "units::duration")]
    pub crl_reload_interval: Duration,
    /// What a CRL past its `nextUpdate` does.
    #[serde(default)]
    pub crl_policy: CrlPolicyConfig,
}

/// `tls.crl_policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrlPolicyConfig {
    /// Log an alert and keep accepting connections.
    #[default]
    Warn,
    /// Refuse connections until a fresh CRL is loaded.
    Strict,
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// sled page cache size in bytes (sled's own default is 1 GiB).
    #[serde(default = "default_cache_capacity", with = "units::bytes")]
    pub cache_capacity: u64,
    /// Nice value (-20..=19) of the store's writer and flusher threads. Every
    /// change passes through them in order, so on a busy machine they should
    /// get a core first. Below 0 needs CAP_SYS_NICE or RLIMIT_NICE (systemd:
    /// `LimitNICE=`); without it the broker warns and runs them at its own.
    #[serde(default = "default_writer_nice")]
    pub writer_nice: i32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            cache_capacity: default_cache_capacity(),
            writer_nice: default_writer_nice(),
        }
    }
}

/// `[limits]`: DESIGN.md §7 limits. Overload is an explicit error, never a growing queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest encoded envelope accepted by `Submit`.
    #[serde(default = "default_max_envelope_bytes", with = "units::bytes")]
    pub max_envelope_bytes: u64,
    /// Authenticated TLS connections open at once (pending handshakes do not count).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Authenticated TLS connections of one certificate identity (a participant, an
    /// operator) open at once, so that one node leaking channels, or one stolen
    /// certificate, cannot take every one of `max_connections`.
    #[serde(default = "default_max_connections_per_identity")]
    pub max_connections_per_identity: usize,
    /// TLS handshakes in progress at once (sockets not yet authenticated).
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// TLS handshakes in progress at once from one IPv4 address or IPv6 /64.
    #[serde(default = "default_max_handshakes_per_ip")]
    pub max_handshakes_per_ip: usize,
    /// Concurrent HTTP/2 streams (RPCs, `Receive` streams included) per connection. The
    /// broker offers each connection the smaller of this and `concurrency_per_connection`
    /// ([`Self::streams_per_connection`]). At least 2: an open `Receive` stream holds one
    /// for its life, and a node acks and submits on the same connection.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// RPCs served at once per connection, an open `Receive` stream included (for its
    /// whole life). Enforced as the connection's HTTP/2 stream limit
    /// ([`Self::streams_per_connection`]): a client with more requests keeps them on its
    /// side, under its own deadline, and the broker holds none waiting for a slot. At
    /// least 2: a node acks and submits on the connection of its `Receive` stream.
    #[serde(default = "default_concurrency_per_connection")]
    pub concurrency_per_connection: usize,
    /// Open `Receive` streams per participant.
    #[serde(default = "default_max_streams_per_participant")]
    pub max_streams_per_participant: usize,
    /// Time allowed for the TLS handshake, and then again for the client's HTTP/2
    /// preface (a client that authenticates and stays silent would hold its slot).
    #[serde(default = "default_handshake_timeout", with = "units::duration")]
    pub handshake_timeout: Duration,
    /// HTTP/2 PING interval on idle connections.
    #[serde(default = "default_http2_keepalive_interval", with = "units::duration")]
    pub http2_keepalive_interval: Duration,
    /// How long a PING may stay unanswered before the connection is closed.
    #[serde(default = "default_http2_keepalive_timeout", with = "units::duration")]
    pub http2_keepalive_timeout: Duration,
    /// TCP keepalive on accepted sockets.
    #[serde(default = "default_tcp_keepalive", with = "units::duration")]
    pub tcp_keepalive: Duration,
    /// Longest time a unary RPC may take (not `Receive`, which is a stream).
    #[serde(default = "default_request_timeout", with = "units::duration")]
    pub request_timeout: Duration,
    /// `max_in_flight` of a `Receive` stream that asks for 0.
    #[serde(default = "default_default_max_in_flight")]
    pub default_max_in_flight: u32,
    /// Largest `max_in_flight` granted; larger requests are capped.
    #[serde(default = "default_max_max_in_flight")]
    pub max_max_in_flight: u32,
    /// Payload bytes a `Receive` stream holds ready ahead of its connection. A
    /// delivery's ack timeout runs from the moment the broker takes the message for
    /// the stream, so the stream takes more only while less than this waits to be
    /// sent: on a slow link, deliveries still waiting behind others are not timed
    /// out and sent again. Size `lifecycle.ack_timeout` for this, the node's HTTP/2
    /// window (2 MiB) and three of the largest messages (two that HTTP/2 holds on the
    /// broker's side, and the message itself) over the slowest link.
    #[serde(default = "default_receive_buffer_bytes", with = "units::bytes")]
    pub receive_buffer_bytes: u64,
    /// Lifetime of a message without `expires_at`, from acceptance.
    #[serde(default = "default_default_lifetime", with = "units::duration")]
    pub default_lifetime: Duration,
    /// Longest lifetime; later `expires_at` are capped.
    #[serde(default = "default_max_lifetime", with = "units::duration")]
    pub max_lifetime: Duration,
    /// Sustained submits per second per sender (token bucket refill).
    #[serde(default = "default_sender_rate_per_second")]
    pub sender_rate_per_second: u32,
    /// Submits a sender may make in a burst (token bucket size).
    #[serde(default = "default_sender_rate_burst")]
    pub sender_rate_burst: u32,
    /// Payload bytes one sender may have queued (not yet acknowledged).
    #[serde(default = "default_max_queued_bytes_per_sender", with = "units::bytes")]
    pub max_queued_bytes_per_sender: u64,
    /// How long a submit refused for the sender's rate or quota is held
    /// before its `RESOURCE_EXHAUSTED` answer. A well-behaved node backs off
    /// anyway; a client that floods is slowed to (its concurrent requests ÷
    /// this delay) refusals per second instead of taking the broker's CPU
    /// from the other participants. Also how long a request over
    /// `max_concurrent_requests_per_participant` or
    /// `max_ack_ids_in_progress_per_participant` waits for room before its
    /// `RESOURCE_EXHAUSTED` answer. `"0s"` answers at once.
    #[serde(default = "default_refusal_delay", with = "units::duration")]
    pub refusal_delay: Duration,
    /// Submits of one sender written at once; more wait their turn, so one
    /// sender's burst cannot fill the store's write batches and delay others.
    #[serde(default = "default_max_concurrent_submits_per_sender")]
    pub max_concurrent_submits_per_sender: u32,
    /// `Exchange` requests other than `Submit` (`Ack`, `Reject`, `Withdraw`, `GetStatus`,
    /// `GetInfo`, a `Receive` stream until its first lease) of one participant served at
    /// once. More wait up to `refusal_delay` for one to finish, then are refused
    /// (`RESOURCE_EXHAUSTED`), so that one participant's flood of them cannot fill the
    /// store's one writer and slow every other participant. A node makes up to four at
    /// once (its receive loop's ack or reject, its outbox check's `GetStatus`, a
    /// withdrawal, a `GetInfo`), and a participant may run `max_streams_per_participant`
    /// nodes: keep this at least four times that, or their calls are refused when they
    /// meet.
    #[serde(default = "default_max_concurrent_requests_per_participant")]
    pub max_concurrent_requests_per_participant: u32,
    /// Message ids of one participant's `Ack`s served at once (an `Ack` costs the store
    /// one lookup per id). Past it an `Ack` waits up to `refusal_delay`, then is refused
    /// (`RESOURCE_EXHAUSTED`). At least 1,024, the most ids one `Ack` may carry.
    #[serde(default = "default_max_ack_ids_in_progress_per_participant")]
    pub max_ack_ids_in_progress_per_participant: u32,
    /// Envelope bytes of one sender held in memory while its submits wait for their
    /// turn or for the store. A submit beyond it is refused at once
    /// (`RESOURCE_EXHAUSTED`, like the rate limit) and its envelope dropped, so a
    /// sender that sends faster than the store writes cannot fill the broker's
    /// memory. At least `max_envelope_bytes`.
    #[serde(
        default = "default_max_waiting_submit_bytes_per_sender",
        with = "units::bytes"
    )]
    pub max_waiting_submit_bytes_per_sender: u64,
    /// Request bytes one certificate identity (a participant, an operator) has on their
    /// way in at once, across its connections: received, but not yet a whole message
    /// handed to the service (tonic holds a message in memory until all of it has come).
    /// A request whose next bytes would go past it is refused (`RESOURCE_EXHAUSTED`), so
    /// that a client sending part of a large message on each of its streams and stalling
    /// cannot fill the broker's memory; the other identities are not affected. At least
    /// `max_envelope_bytes` and 1 MiB more (one largest request whole); unset in a config
    /// file, 64 MiB or that, whichever is larger.
    #[serde(
        default = "default_max_incoming_request_bytes_per_identity",
        with = "units::bytes"
    )]
    pub max_incoming_request_bytes_per_identity: u64,
    /// Below this much free space in `data_dir` new submits are refused
    /// (`RESOURCE_EXHAUSTED`) while delivery goes on.
    #[serde(default = "default_min_free_disk_bytes", with = "units::bytes")]
    pub min_free_disk_bytes: u64,
    /// How long graceful shutdown waits for open RPCs before closing them.
    #[serde(default = "default_shutdown_grace", with = "units::duration")]
    pub shutdown_grace: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_envelope_bytes: default_max_envelope_bytes(),
            max_connections: default_max_connections(),
            max_connections_per_identity: default_max_connections_per_identity(),
            max_handshakes: default_max_handshakes(),
            max_handshakes_per_ip: default_max_handshakes_per_ip(),
            max_concurrent_streams: default_max_concurrent_streams(),
            concurrency_per_connection: default_concurrency_per_connection(),
            max_streams_per_participant: default_max_streams_per_participant(),
            handshake_timeout: default_handshake_timeout(),
            http2_keepalive_interval: default_http2_keepalive_interval(),
            http2_keepalive_timeout: default_http2_keepalive_timeout(),
            tcp_keepalive: default_tcp_keepalive(),
            request_timeout: default_request_timeout(),
            default_max_in_flight: default_default_max_in_flight(),
            max_max_in_flight: default_max_max_in_flight(),
            receive_buffer_bytes: default_receive_buffer_bytes(),
            default_lifetime: default_default_lifetime(),
            max_lifetime: default_max_lifetime(),
            sender_rate_per_second: default_sender_rate_per_second(),
            sender_rate_burst: default_sender_rate_burst(),
            max_queued_bytes_per_sender: default_max_queued_bytes_per_sender(),
            refusal_delay: default_refusal_delay(),
            max_concurrent_submits_per_sender: default_max_concurrent_submits_per_sender(),
            max_waiting_submit_bytes_per_sender: default_max_waiting_submit_bytes_per_sender(),
            max_concurrent_requests_per_participant:
                default_max_concurrent_requests_per_participant(),
            max_ack_ids_in_progress_per_participant:
                default_max_ack_ids_in_progress_per_participant(),
            max_incoming_request_bytes_per_identity:
                default_max_incoming_request_bytes_per_identity(),
            min_free_disk_bytes: default_min_free_disk_bytes(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

/// Bytes a request may take on top of its envelope (the rest of the request, its gRPC
/// framing), so that a slightly oversize envelope is answered `INVALID_ARGUMENT` by the
/// handler rather than cut off by the decoder.
pub const REQUEST_MARGIN_BYTES: u64 = 1 << 20;

/// The least `limits.max_concurrent_streams` and `limits.concurrency_per_connection`: a
/// node's open `Receive` stream, and one request beside it on the same connection.
const MIN_STREAMS_PER_CONNECTION: u64 = 2;

impl LimitsConfig {
    /// The HTTP/2 streams a connection is offered: `max_concurrent_streams`, or
    /// `concurrency_per_connection` when smaller. Every stream a connection has open is
    /// then served at once; none waits inside the broker for a slot. Such a wait would
    /// not count against `request_timeout` (tonic's per-connection concurrency limit
    /// sits outside its request timeout), and a submit held in it for longer than twice
    /// the request timeout plus the keepalive's time to close a dead connection could
    /// reach the service after the time for which a withdrawal of its message refuses
    /// its submits ([`crate::admission::Submitting`]), and store the withdrawn message.
    pub fn streams_per_connection(&self) -> u32 {
        let concurrency = u32::try_from(self.concurrency_per_connection).unwrap_or(u32::MAX);
        self.max_concurrent_streams.min(concurrency)
    }
}

/// `[lifecycle]`: DESIGN.md §4 timers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// How long a delivery may stay unacknowledged before it is due again.
    #[serde(default = "default_ack_timeout", with = "units::duration")]
    pub ack_timeout: Duration,
    /// Deliveries of one message before it is dead-lettered (with a report).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First redelivery backoff; doubles per attempt.
    #[serde(default = "default_backoff_base", with = "units::duration")]
    pub backoff_base: Duration,
    /// Longest redelivery backoff.
    #[serde(default = "default_backoff_max", with = "units::duration")]
    pub backoff_max: Duration,
    /// How long expired and dead-lettered payloads are kept for redrive (not those never
    /// redriven: a rejected message's, an expired receipt's).
    #[serde(default = "default_dead_letter_retention", with = "units::duration")]
    pub dead_letter_retention: Duration,
    /// How long message metadata (and so id deduplication) is kept.
    #[serde(default = "default_metadata_retention", with = "units::duration")]
    pub metadata_retention: Duration,
    /// Longest real time between two runs of the timer loop.
    #[serde(default = "default_tick_interval", with = "units::duration")]
    pub tick_interval: Duration,
    /// Largest step of the system clock the broker follows; a larger jump
    /// is held (see [`crate::clock::GuardedClock`]).
    #[serde(default = "default_max_clock_step", with = "units::duration")]
    pub max_clock_step: Duration,
    /// Longest time between two runs of a broker on its store that a start accepts
    /// without `trmx-broker store accept-clock`: a system clock further than this
    /// from the store's last run, ahead or behind, is taken for a wrong clock. `0s`
    /// turns the check off; otherwise at least an hour.
    #[serde(default = "default_max_downtime", with = "units::duration")]
    pub max_downtime: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            ack_timeout: default_ack_timeout(),
            max_attempts: default_max_attempts(),
            backoff_base: default_backoff_base(),
            backoff_max: default_backoff_max(),
            dead_letter_retention: default_dead_letter_retention(),
            metadata_retention: default_metadata_retention(),
            tick_interval: default_tick_interval(),
            max_clock_step: default_max_clock_step(),
            max_downtime: default_max_downtime(),
        }
    }
}

/// One `[[participants]]` entry of the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParticipantConfig {
    /// Participant ID, e.g. `NL-NRM`.
    pub id: String,
    /// Human-readable name.
    pub display_name: String,
    /// ISO 3166-1 alpha-2 country code or `INT`; must match the id's prefix.
    pub country: String,
    /// Kind of organisation.
    pub organisation_type: OrganisationType,
    /// Message kinds it accepts, by [`Kind::name`] (`referral`, `follow-up`, ...).
    /// Receipts are always accepted.
    pub accepts: Vec<String>,
}

/// `participants.organisation_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrganisationType {
    /// A national referral mechanism.
    Nrm,
    /// A non-governmental organisation.
    Ngo,
    /// A public authority.
    Authority,
    /// An international organisation.
    InternationalOrganisation,
    /// A return counselling service.
    ReturnCounselling,
}

impl OrganisationType {
    /// The wire enum.
    pub fn to_pb(self) -> pb::OrganisationType {
        match self {
            OrganisationType::Nrm => pb::OrganisationType::Nrm,
            OrganisationType::Ngo => pb::OrganisationType::Ngo,
            OrganisationType::Authority => pb::OrganisationType::Authority,
            OrganisationType::InternationalOrganisation => {
                pb::OrganisationType::InternationalOrganisation
            }
            OrganisationType::ReturnCounselling => pb::OrganisationType::ReturnCounselling,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7443))
}
/// The admin endpoint of a broker from a config file: loopback, Prometheus' port range.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);
fn default_admin_listen() -> Option<SocketAddr> {
    Some(DEFAULT_ADMIN_LISTEN)
}
fn default_crl_reload_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_writer_nice() -> i32 {
    -8
}

fn default_cache_capacity() -> u64 {
    16 << 20
}
/// 1 MiB: a few seconds of a slow (a few Mbit/s) link, and hundreds of typical
/// referrals, so a fast link's streams are never starved by it.
fn default_receive_buffer_bytes() -> u64 {
    1 << 20
}
fn default_max_envelope_bytes() -> u64 {
    8 << 20
}
fn default_max_connections() -> usize {
    1024
}
/// A node needs one connection (its channel multiplexes every RPC); 32 leaves room for
/// restarts and tools under one name, and it takes 32 identities at their cap to fill
/// the default `max_connections` of 1024.
fn default_max_connections_per_identity() -> usize {
    32
}
fn default_max_handshakes() -> usize {
    256
}
fn default_max_handshakes_per_ip() -> usize {
    8
}
fn default_max_concurrent_streams() -> u32 {
    128
}
fn default_concurrency_per_connection() -> usize {
    128
}
fn default_max_streams_per_participant() -> usize {
    8
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_http2_keepalive_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_http2_keepalive_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_tcp_keepalive() -> Duration {
    Duration::from_secs(60)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_default_max_in_flight() -> u32 {
    32
}
fn default_max_max_in_flight() -> u32 {
    256
}
fn default_default_lifetime() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_max_lifetime() -> Duration {
    Duration::from_secs(90 * 86_400)
}
fn default_sender_rate_per_second() -> u32 {
    200
}
fn default_sender_rate_burst() -> u32 {
    400
}
fn default_max_queued_bytes_per_sender() -> u64 {
    1 << 30
}
fn default_min_free_disk_bytes() -> u64 {
    1 << 30
}
fn default_max_concurrent_submits_per_sender() -> u32 {
    16
}
/// The `Exchange` calls other than `Submit` that one node makes at once at most: its
/// receive loop's ack or reject, its outbox check's `GetStatus`, a withdrawal, a `GetInfo`.
/// `limits.max_concurrent_requests_per_participant` should be at least this many times
/// `limits.max_streams_per_participant` ([`BrokerConfig::warnings`]).
pub const REQUESTS_PER_NODE: u64 = 4;
/// The largest `limits.max_concurrent_requests_per_participant`.
const MAX_REQUESTS_PER_PARTICIPANT: u64 = 1024;

/// Four per node (its ack or reject, `GetStatus`, withdrawal and `GetInfo` can meet) for
/// `max_streams_per_participant` (8) nodes; the benchmark's receiver makes one (it acks in
/// batches, in turn). At 16, eight nodes at full speed had calls refused
/// (`a_participants_nodes_at_full_speed_are_never_refused`, `refusal_delay = "0s"`).
fn default_max_concurrent_requests_per_participant() -> u32 {
    32
}
/// Two largest `Ack`s (`MAX_ACK_IDS`) at once; the benchmark's receiver acks up to 512
/// ids a call, one call at a time.
fn default_max_ack_ids_in_progress_per_participant() -> u32 {
    2048
}
fn default_max_waiting_submit_bytes_per_sender() -> u64 {
    64 << 20
}
/// Room for seven largest (8 MiB) envelopes arriving at once; a node sends a few.
fn default_max_incoming_request_bytes_per_identity() -> u64 {
    64 << 20
}
fn default_refusal_delay() -> Duration {
    Duration::from_millis(250)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_attempts() -> u32 {
    20
}
fn default_backoff_base() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(600)
}
fn default_dead_letter_retention() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_metadata_retention() -> Duration {
    Duration::from_secs(400 * 86_400)
}
fn default_tick_interval() -> Duration {
    Duration::from_millis(200)
}

fn default_max_clock_step() -> Duration {
    Duration::from_secs(60)
}
/// Shortest `lifecycle.max_downtime` other than 0.
const MIN_MAX_DOWNTIME: Duration = Duration::from_secs(3_600);

fn default_max_downtime() -> Duration {
    Duration::from_secs(7 * 86_400)
}

impl BrokerConfig {
    /// A config with every default, for `data_dir` and the given TLS files
    /// (used by tests and tools that build a config in code) — except
    /// `admin_listen`, which is a free loopback port (`127.0.0.1:0`) so that
    /// several brokers built in code never fight over the default admin port.
    pub fn new(data_dir: impl Into<PathBuf>, tls: TlsConfig) -> Self {
        Self {
            listen: default_listen(),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            admin_allowed_hosts: Vec::new(),
            name: None,
            data_dir: data_dir.into(),
            tls,
            store: StoreConfig::default(),
            limits: LimitsConfig::default(),
            lifecycle: LifecycleConfig::default(),
            participants: Vec::new(),
        }
    }

    /// Reads, parses and validates a TOML config file.
    pub fn load(path: &Path) -> Result<Self, BrokerError> {
        let text = std::fs::read_to_string(path).map_err(|error| BrokerError::ConfigRead {
            path: path.display().to_string(),
            error,
        })?;
        let config = Self::from_toml(&text).map_err(|e| match e {
            BrokerError::ConfigParse { message, .. } => BrokerError::ConfigParse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text. Relative paths stay relative (to the
    /// working directory).
    pub fn from_toml(text: &str) -> Result<Self, BrokerError> {
        let mut config: BrokerConfig =
            toml::from_str(text).map_err(|e| BrokerError::ConfigParse {
                path: "<text>".into(),
                message: e.message().to_string() + &span_hint(text, e.span()),
            })?;
        // Unset, the request-bytes budget grows with `max_envelope_bytes`: a config whose
        // envelopes are larger than its default holds (up to 64 MiB, valid before this
        // limit existed) must not stop the broker at its first start after an upgrade.
        let budget_set = toml::from_str::<toml::Table>(text)
            .ok()
            .and_then(|table| table.get("limits")?.as_table().cloned())
            .is_some_and(|limits| limits.contains_key("max_incoming_request_bytes_per_identity"));
        if !budget_set {
            let limits = &mut config.limits;
            limits.max_incoming_request_bytes_per_identity =
                limits.max_incoming_request_bytes_per_identity.max(
                    limits
                        .max_envelope_bytes
                        .saturating_add(REQUEST_MARGIN_BYTES),
                );
        }
        config.validate()?;
        Ok(config)
    }

    /// The config as TOML (what `load` reads back).
    pub fn to_toml(&self) -> Result<String, BrokerError> {
        toml::to_string(self).map_err(|e| BrokerError::ConfigParse {
            path: "<text>".into(),
            message: e.to_string(),
        })
    }

    /// What a valid config probably did not mean: one line each, naming the settings and
    /// the value to set. The broker runs with it all the same (logged at start, and by
    /// `check-config`): these are not rules, for no value can always satisfy them.
    pub fn warnings(&self) -> Vec<String> {
        let l = &self.limits;
        let mut out = Vec::new();
        // (the request limit caps at 1,024, so a stream limit above a quarter of that
        // has no request limit to match; and the limit may be kept low on purpose)
        let streams = l.max_streams_per_participant as u64;
        let requests = u64::from(l.max_concurrent_requests_per_participant);
        let wanted = streams.saturating_mul(REQUESTS_PER_NODE);
        if requests < wanted {
            let fix = if wanted <= MAX_REQUESTS_PER_PARTICIPANT {
                format!("set limits.max_concurrent_requests_per_participant = {wanted}")
            } else {
                format!(
                    "set limits.max_concurrent_requests_per_participant = \
                     {MAX_REQUESTS_PER_PARTICIPANT} and limits.max_streams_per_participant to at \
                     most {}",
                    MAX_REQUESTS_PER_PARTICIPANT / REQUESTS_PER_NODE
                )
            };
            out.push(format!(
                "limits.max_concurrent_requests_per_participant = {requests} is less than \
                 {REQUESTS_PER_NODE} × limits.max_streams_per_participant ({streams}): a \
                 participant running that many nodes makes up to {wanted} such calls at once \
                 (each node's ack or reject, status check, withdrawal and GetInfo), and those \
                 over the limit, acks among them, are refused; {fix}"
            ));
        }
        out
    }

    /// Checks every rule that serde cannot: ranges, cross-field rules and the
    /// registry. The error names the field.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let l = &self.limits;
        let c = &self.lifecycle;
        if self.data_dir.as_os_str().is_empty() {
            return Err(BrokerError::config("data_dir", "must not be empty"));
        }
        if let Some(admin) = self.admin_listen
            && admin.port() != 0
            && admin.port() == self.listen.port()
            && (admin.ip() == self.listen.ip()
                || admin.ip().is_unspecified()
                || self.listen.ip().is_unspecified())
        {
            return Err(BrokerError::config(
                "admin_listen",
                format!(
                    "must not be the gRPC listen address ({}), got {admin}",
                    self.listen
                ),
            ));
        }
        for (i, host) in self.admin_allowed_hosts.iter().enumerate() {
            let valid = !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !valid {
                return Err(BrokerError::config(
                    format!("admin_allowed_hosts[{i}]"),
                    format!("must be a host name (letters, digits, '-' and '.'), got {host:?}"),
                ));
            }
        }
        if let Some(name) = &self.name
            && (name.is_empty() || name.len() > 64)
        {
            return Err(BrokerError::config(
                "name",
                format!("must be 1 to 64 characters, got {}", name.len()),
            ));
        }
        for (field, path) in [
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if path.as_os_str().is_empty() {
                return Err(BrokerError::config(field, "must not be empty"));
            }
        }
        match &self.tls.crl {
            Some(crl) if crl.as_os_str().is_empty() => {
                return Err(BrokerError::config(
                    "tls.crl",
                    "must not be empty (leave it out to check no revocation)",
                ));
            }
            // The strictest revocation setting with no CRL at all would check nothing, and
            // say nothing: most likely a `crl` line left out or commented out by mistake.
            None if self.tls.crl_policy == CrlPolicyConfig::Strict => {
                return Err(BrokerError::config(
                    "tls.crl",
                    "is required with tls.crl_policy = \"strict\": without a CRL no \
                     certificate's revocation is checked; set tls.crl to the federation CA's \
                     CRL file, or tls.crl_policy = \"warn\" to run without one",
                ));
            }
            _ => {}
        }
        at_least_duration(
            "tls.crl_reload_interval",
            self.tls.crl_reload_interval,
            Duration::from_secs(1),
        )?;
        at_least("store.cache_capacity", self.store.cache_capacity, 1 << 20)?;
        if !(-20..=19).contains(&self.store.writer_nice) {
            return Err(BrokerError::config(
                "store.writer_nice",
                format!(
                    "must be a nice value from -20 to 19, got {}",
                    self.store.writer_nice
                ),
            ));
        }
        at_least("limits.max_envelope_bytes", l.max_envelope_bytes, 1 << 10)?;
        at_most(
            "limits.max_envelope_bytes",
            l.max_envelope_bytes,
            MAX_ENVELOPE_CEILING,
        )?;
        at_least("limits.max_connections", l.max_connections as u64, 1)?;
        at_least(
            "limits.max_connections_per_identity",
            l.max_connections_per_identity as u64,
            1,
        )?;
        at_least("limits.max_handshakes", l.max_handshakes as u64, 1)?;
        at_least(
            "limits.max_handshakes_per_ip",
            l.max_handshakes_per_ip as u64,
            1,
        )?;
        for (field, value) in [
            (
                "limits.max_concurrent_streams",
                u64::from(l.max_concurrent_streams),
            ),
            (
                "limits.concurrency_per_connection",
                l.concurrency_per_connection as u64,
            ),
        ] {
            if value < MIN_STREAMS_PER_CONNECTION {
                return Err(BrokerError::config(
                    field,
                    format!(
                        "must be >= {MIN_STREAMS_PER_CONNECTION}, got {value}: a node keeps its \
                         Receive stream open on the connection it submits and acknowledges on, \
                         and that stream holds one HTTP/2 stream for as long as it is open, so \
                         its acks and submits would wait behind it"
                    ),
                ));
            }
        }
        at_least(
            "limits.max_streams_per_participant",
            l.max_streams_per_participant as u64,
            1,
        )?;
        for (field, value) in [
            ("limits.handshake_timeout", l.handshake_timeout),
            (
                "limits.http2_keepalive_interval",
                l.http2_keepalive_interval,
            ),
            ("limits.http2_keepalive_timeout", l.http2_keepalive_timeout),
            ("limits.tcp_keepalive", l.tcp_keepalive),
            ("limits.request_timeout", l.request_timeout),
        ] {
            at_least_duration(field, value, Duration::from_millis(100))?;
        }
        at_least(
            "limits.max_concurrent_submits_per_sender",
            u64::from(l.max_concurrent_submits_per_sender),
            1,
        )?;
        at_most(
            "limits.max_concurrent_submits_per_sender",
            u64::from(l.max_concurrent_submits_per_sender),
            1024,
        )?;
        at_least(
            "limits.max_concurrent_requests_per_participant",
            u64::from(l.max_concurrent_requests_per_participant),
            1,
        )?;
        at_most(
            "limits.max_concurrent_requests_per_participant",
            u64::from(l.max_concurrent_requests_per_participant),
            MAX_REQUESTS_PER_PARTICIPANT,
        )?;
        if (l.max_ack_ids_in_progress_per_participant as usize) < crate::service::MAX_ACK_IDS {
            return Err(BrokerError::config(
                "limits.max_ack_ids_in_progress_per_participant",
                format!(
                    "must be at least {}, the most ids one Ack may carry, or such an Ack is \
                     never served; got {}",
                    crate::service::MAX_ACK_IDS,
                    l.max_ack_ids_in_progress_per_participant
                ),
            ));
        }
        at_most(
            "limits.max_ack_ids_in_progress_per_participant",
            u64::from(l.max_ack_ids_in_progress_per_participant),
            1 << 20,
        )?;
        if l.max_waiting_submit_bytes_per_sender < l.max_envelope_bytes {
            return Err(BrokerError::config(
                "limits.max_waiting_submit_bytes_per_sender",
                format!(
                    "must be at least limits.max_envelope_bytes ({}), or no envelope of that \
                     size is ever accepted; got {}",
                    l.max_envelope_bytes, l.max_waiting_submit_bytes_per_sender
                ),
            ));
        }
        at_most(
            "limits.max_waiting_submit_bytes_per_sender",
            l.max_waiting_submit_bytes_per_sender,
            u64::from(u32::MAX),
        )?;
        let largest_request = l.max_envelope_bytes.saturating_add(REQUEST_MARGIN_BYTES);
        if l.max_incoming_request_bytes_per_identity < largest_request {
            return Err(BrokerError::config(
                "limits.max_incoming_request_bytes_per_identity",
                format!(
                    "must be at least limits.max_envelope_bytes and 1 MiB more ({largest_request}), \
                     or the largest request is never taken; got {}",
                    l.max_incoming_request_bytes_per_identity
                ),
            ));
        }
        if l.refusal_delay > Duration::from_secs(10) || l.refusal_delay >= l.request_timeout {
            return Err(BrokerError::config(
                "limits.refusal_delay",
                format!(
                    "must be at most 10s and shorter than limits.request_timeout, got {:?}",
                    l.refusal_delay
                ),
            ));
        }
        at_least(
            "limits.max_max_in_flight",
            u64::from(l.max_max_in_flight),
            1,
        )?;
        at_most(
            "limits.max_max_in_flight",
            u64::from(l.max_max_in_flight),
            u64::from(MAX_IN_FLIGHT_CEILING),
        )?;
        at_least(
            "limits.default_max_in_flight",
            u64::from(l.default_max_in_flight),
            1,
        )?;
        // (at least one typical message ahead, so a stream on a fast link is never
        // starved; at most what a stream may hold in memory)
        at_least(
            "limits.receive_buffer_bytes",
            l.receive_buffer_bytes,
            16 << 10,
        )?;
        at_most(
            "limits.receive_buffer_bytes",
            l.receive_buffer_bytes,
            256 << 20,
        )?;
        if l.default_max_in_flight > l.max_max_in_flight {
            return Err(BrokerError::config(
                "limits.default_max_in_flight",
                format!(
                    "must be <= limits.max_max_in_flight ({}), got {}",
                    l.max_max_in_flight, l.default_max_in_flight
                ),
            ));
        }
        at_least_duration(
            "limits.default_lifetime",
            l.default_lifetime,
            Duration::from_secs(1),
        )?;
        if l.default_lifetime > l.max_lifetime {
            return Err(BrokerError::config(
                "limits.default_lifetime",
                format!(
                    "must be <= limits.max_lifetime ({}), got {}",
                    format_duration(l.max_lifetime),
                    format_duration(l.default_lifetime)
                ),
            ));
        }
        at_least(
            "limits.sender_rate_per_second",
            u64::from(l.sender_rate_per_second),
            1,
        )?;
        at_least(
            "limits.sender_rate_burst",
            u64::from(l.sender_rate_burst),
            1,
        )?;
        if l.max_queued_bytes_per_sender < l.max_envelope_bytes {
            return Err(BrokerError::config(
                "limits.max_queued_bytes_per_sender",
                format!(
                    "must be >= limits.max_envelope_bytes ({}), got {}",
                    format_bytes(l.max_envelope_bytes),
                    format_bytes(l.max_queued_bytes_per_sender)
                ),
            ));
        }
        at_least_duration(
            "lifecycle.ack_timeout",
            c.ack_timeout,
            Duration::from_secs(1),
        )?;
        at_least("lifecycle.max_attempts", u64::from(c.max_attempts), 1)?;
        at_most("lifecycle.max_attempts", u64::from(c.max_attempts), 1000)?;
        if c.backoff_base > c.backoff_max {
            return Err(BrokerError::config(
                "lifecycle.backoff_base",
                format!(
                    "must be <= lifecycle.backoff_max ({}), got {}",
                    format_duration(c.backoff_max),
                    format_duration(c.backoff_base)
                ),
            ));
        }
        if c.metadata_retention < l.max_lifetime {
            return Err(BrokerError::config(
                "lifecycle.metadata_retention",
                format!(
                    "must be >= limits.max_lifetime ({}) so that ids are deduplicated while a message lives, got {}",
                    format_duration(l.max_lifetime),
                    format_duration(c.metadata_retention)
                ),
            ));
        }
        at_least_duration(
            "lifecycle.tick_interval",
            c.tick_interval,
            Duration::from_millis(10),
        )?;
        // below a second, NTP's ordinary steps would hold the clock
        at_least_duration(
            "lifecycle.max_clock_step",
            c.max_clock_step,
            Duration::from_secs(1),
        )?;
        // (the broker records its time every minute: a shorter bound would refuse the
        // restart after a crash)
        if !c.max_downtime.is_zero() && c.max_downtime < MIN_MAX_DOWNTIME {
            return Err(BrokerError::config(
                "lifecycle.max_downtime",
                format!(
                    "must be 0s (no check) or >= {}, got {}",
                    format_duration(MIN_MAX_DOWNTIME),
                    format_duration(c.max_downtime)
                ),
            ));
        }
        self.validate_participants()
    }

    fn validate_participants(&self) -> Result<(), BrokerError> {
        if self.participants.is_empty() {
            return Err(BrokerError::config(
                "participants",
                "must list at least one participant",
            ));
        }
        let mut seen = HashSet::new();
        for (i, p) in self.participants.iter().enumerate() {
            let field = |name: &str| format!("participants[{i}].{name}");
            let id = ParticipantId::parse(&p.id).map_err(|e| {
                BrokerError::config(field("id"), format!("{}, got {:?}", e.rule, p.id))
            })?;
            if !seen.insert(p.id.clone()) {
                return Err(BrokerError::config(
                    field("id"),
                    format!("must be unique, {:?} is listed twice", p.id),
                ));
            }
            if p.display_name.trim().is_empty() || p.display_name.len() > 200 {
                return Err(BrokerError::config(
                    field("display_name"),
                    "must be 1 to 200 characters",
                ));
            }
            if p.country != id.country() {
                return Err(BrokerError::config(
                    field("country"),
                    format!(
                        "must match the id's country prefix {:?}, got {:?}",
                        id.country(),
                        p.country
                    ),
                ));
            }
            for (j, name) in p.accepts.iter().enumerate() {
                match Kind::from_name(name) {
                    Some(kind) if !kind.is_broker_made() => {}
                    Some(_) => {
                        return Err(BrokerError::config(
                            format!("participants[{i}].accepts[{j}]"),
                            format!("must not list a broker-made kind, got {name:?}"),
                        ));
                    }
                    None => {
                        return Err(BrokerError::config(
                            format!("participants[{i}].accepts[{j}]"),
                            format!(
                                "must be one of {}, got {name:?}",
                                Kind::APPLICATION.map(Kind::name).join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn at_least(field: &str, value: u64, min: u64) -> Result<(), BrokerError> {
    if value < min {
        return Err(BrokerError::config(
            field,
            format!("must be >= {min}, got {value}"),
        ));
    }
    Ok(())
}

fn at_most(field: &str, value: u64, max: u64) -> Result<(), BrokerError> {
    if value > max {
        return Err(BrokerError::config(
            field,
            format!("must be <= {max}, got {value}"),
        ));
    }
    Ok(())
}

fn at_least_duration(field: &str, value: Duration, min: Duration) -> Result<(), BrokerError> {
    if value < min {
        return Err(BrokerError::config(
            field,
            format!(
                "must be >= {}, got {}",
                format_duration(min),
                format_duration(value)
            ),
        ));
    }
    Ok(())
}

/// Serde adapter of `admin_listen`: an address (`"127.0.0.1:9464"`) or `"off"`.
mod admin_listen {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    const OFF: &str = "off";

    pub(super) fn serialize<S: Serializer>(
        value: &Option<SocketAddr>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(addr) => serializer.collect_str(addr),
            None => serializer.serialize_str(OFF),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == OFF {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "admin_listen must be an address like \"127.0.0.1:9464\" or \"off\", got {text:?}"
            ))
        })
    }
}

/// " (line N)" for a parse error span.
fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(range) => {
            let line = text
                .get(..range.start)
                .map_or(0, |before| before.matches('\n').count())
                + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> String {
        r#"
data_dir = "/tmp/x"
[tls]
ca = "ca.pem"
cert = "broker.pem"
key = "broker.key"
[[participants]]
id = "NL-NRM"
display_name = "Dutch NRM"
country = "NL"
organisation_type = "nrm"
accepts = ["referral", "MESSAGE_KIND_FOLLOW_UP"]
"#
        .to_string()
    }

    #[test]
    fn a_minimal_config_takes_the_defaults() {
        let config = BrokerConfig::from_toml(&minimal()).unwrap();
        assert_eq!(config.limits.max_envelope_bytes, 8 << 20);
        assert_eq!(config.limits.default_max_in_flight, 32);
        assert_eq!(config.lifecycle.ack_timeout, Duration::from_secs(60));
        assert_eq!(config.lifecycle.max_clock_step, Duration::from_secs(60));
        assert_eq!(config.tls.crl_policy, CrlPolicyConfig::Warn);
        assert_eq!(config.listen.port(), 7443);
        assert_eq!(config.admin_listen, Some(DEFAULT_ADMIN_LISTEN));
    }

    #[test]
    fn the_admin_endpoint_is_on_loopback_unless_configured() {
        let from_file = BrokerConfig::from_toml(&minimal()).unwrap();
        let admin = from_file.admin_listen.unwrap();
        assert!(admin.ip().is_loopback(), "{admin}");
        assert_eq!(admin.port(), 9464);
        let in_code = BrokerConfig::new("/tmp/x", from_file.tls.clone());
        let admin = in_code.admin_listen.unwrap();
        assert!(admin.ip().is_loopback(), "{admin}");
        assert_eq!(admin.port(), 0, "a free port for brokers built in code");

        let text = format!("admin_listen = \"0.0.0.0:9100\"\n{}", minimal());
        let open = BrokerConfig::from_toml(&text).unwrap();
        assert_eq!(open.admin_listen, Some("0.0.0.0:9100".parse().unwrap()));
        let text = format!("admin_listen = \"off\"\n{}", minimal());
        let off = BrokerConfig::from_toml(&text).unwrap();
        assert_eq!(off.admin_listen, None);
        assert!(off.to_toml().unwrap().contains("admin_listen = \"off\""));
        assert_eq!(
            BrokerConfig::from_toml(&off.to_toml().unwrap()).unwrap(),
            off
        );

        let text = format!("admin_listen = \"localhost\"\n{}", minimal());
        let err = BrokerConfig::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("admin_listen must be an address"), "{err}");
        let text = format!(
            "listen = \"0.0.0.0:7443\"\nadmin_listen = \"127.0.0.1:7443\"\n{}",
            minimal()
        );
        let err = BrokerConfig::from_toml(&text).unwrap_err().to_string();
        assert!(
            err.starts_with("config: admin_listen must not be the gRPC listen address"),
            "{err}"
        );
    }

    #[test]
    fn the_example_config_loads_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("broker.example.toml");
        let config = BrokerConfig::load(&path).unwrap();
        assert!(config.participants.len() >= 3);
        assert_eq!(config.tls.crl_policy, CrlPolicyConfig::Warn);
        // (the example shows the defaults of the per-participant request limits)
        let defaults = LimitsConfig::default();
        assert_eq!(
            config.limits.max_concurrent_requests_per_participant,
            defaults.max_concurrent_requests_per_participant
        );
        assert_eq!(
            config.limits.max_ack_ids_in_progress_per_participant,
            defaults.max_ack_ids_in_progress_per_participant
        );
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
    }

    /// More streams per participant than a quarter of its request limit is warned about,
    /// naming both settings and the value to set (a warning, not a refusal: the request
    /// limit caps at 1,024, and a low one may be meant).
    #[test]
    fn a_request_limit_below_four_per_stream_is_warned_about() {
        let mut config = BrokerConfig::from_toml(&minimal()).unwrap();
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
        config.limits.max_streams_per_participant = 16;
        config.validate().unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        for part in [
            "limits.max_concurrent_requests_per_participant = 32 is less than 4 × \
             limits.max_streams_per_participant (16)",
            "acks among them, are refused",
            "set limits.max_concurrent_requests_per_participant = 64",
        ] {
            assert!(
                warnings[0].contains(part),
                "{part:?} not in {}",
                warnings[0]
            );
        }
        config.limits.max_concurrent_requests_per_participant = 64;
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
        config.limits.max_streams_per_participant = 300;
        config.limits.max_concurrent_requests_per_participant = 1024;
        config.validate().unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains(
                "set limits.max_concurrent_requests_per_participant = 1024 and \
                 limits.max_streams_per_participant to at most 256"
            ),
            "{}",
            warnings[0]
        );
    }

    /// An operator reads `broker.example.toml` as the reference: every setting the broker
    /// takes is in it (set, or commented out where it has no value to show), and every
    /// value it sets is the default, but for the paths and the registry, which have none.
    /// The destructurings name every field, so a new setting does not compile here until
    /// the example has it.
    #[test]
    fn the_example_config_shows_every_setting_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("broker.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let example = BrokerConfig::load(&path).unwrap();
        let defaults = BrokerConfig::from_toml(&minimal()).unwrap();

        let BrokerConfig {
            listen: _,
            admin_listen: _,
            admin_allowed_hosts: _,
            name: _,
            data_dir: _,
            tls,
            store,
            limits,
            lifecycle,
            participants: _,
        } = &example;
        let TlsConfig {
            ca: _,
            cert: _,
            key: _,
            crl: _,
            crl_reload_interval: _,
            crl_policy: _,
        } = tls;
        let StoreConfig {
            cache_capacity: _,
            writer_nice: _,
        } = store;
        let LimitsConfig {
            max_envelope_bytes: _,
            max_connections: _,
            max_connections_per_identity: _,
            max_handshakes: _,
            max_handshakes_per_ip: _,
            max_concurrent_streams: _,
            concurrency_per_connection: _,
            max_streams_per_participant: _,
            handshake_timeout: _,
            http2_keepalive_interval: _,
            http2_keepalive_timeout: _,
            tcp_keepalive: _,
            request_timeout: _,
            default_max_in_flight: _,
            max_max_in_flight: _,
            receive_buffer_bytes: _,
            default_lifetime: _,
            max_lifetime: _,
            sender_rate_per_second: _,
            sender_rate_burst: _,
            max_queued_bytes_per_sender: _,
            refusal_delay: _,
            max_concurrent_submits_per_sender: _,
            max_waiting_submit_bytes_per_sender: _,
            max_concurrent_requests_per_participant: _,
            max_ack_ids_in_progress_per_participant: _,
            max_incoming_request_bytes_per_identity: _,
            min_free_disk_bytes: _,
            shutdown_grace: _,
        } = limits;
        let LifecycleConfig {
            ack_timeout: _,
            max_attempts: _,
            backoff_base: _,
            backoff_max: _,
            dead_letter_retention: _,
            metadata_retention: _,
            tick_interval: _,
            max_clock_step: _,
            max_downtime: _,
        } = lifecycle;
        let sections: [(&str, &[&str]); 5] = [
            (
                "",
                &[
                    "listen",
                    "admin_listen",
                    "admin_allowed_hosts",
                    "name",
                    "data_dir",
                ],
            ),
            (
                "tls",
                &[
                    "ca",
                    "cert",
                    "key",
                    "crl",
                    "crl_reload_interval",
                    "crl_policy",
                ],
            ),
            ("store", &["cache_capacity", "writer_nice"]),
            (
                "limits",
                &[
                    "max_envelope_bytes",
                    "max_connections",
                    "max_connections_per_identity",
                    "max_handshakes",
                    "max_handshakes_per_ip",
                    "max_concurrent_streams",
                    "concurrency_per_connection",
                    "max_streams_per_participant",
                    "handshake_timeout",
                    "http2_keepalive_interval",
                    "http2_keepalive_timeout",
                    "tcp_keepalive",
                    "request_timeout",
                    "default_max_in_flight",
                    "max_max_in_flight",
                    "receive_buffer_bytes",
                    "default_lifetime",
                    "max_lifetime",
                    "sender_rate_per_second",
                    "sender_rate_burst",
                    "max_queued_bytes_per_sender",
                    "refusal_delay",
                    "max_concurrent_submits_per_sender",
                    "max_waiting_submit_bytes_per_sender",
                    "max_concurrent_requests_per_participant",
                    "max_ack_ids_in_progress_per_participant",
                    "max_incoming_request_bytes_per_identity",
                    "min_free_disk_bytes",
                    "shutdown_grace",
                ],
            ),
            (
                "lifecycle",
                &[
                    "ack_timeout",
                    "max_attempts",
                    "backoff_base",
                    "backoff_max",
                    "dead_letter_retention",
                    "metadata_retention",
                    "tick_interval",
                    "max_clock_step",
                    "max_downtime",
                ],
            ),
        ];
        // each key, set or commented out (`# key = …`), in its own section of the file
        let mut section = "";
        let mut shown = HashSet::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name;
                continue;
            }
            let setting = line.trim_start_matches('#').trim_start();
            if let Some((key, _)) = setting.split_once(" = ") {
                shown.insert((section, key));
            }
        }
        for (section, keys) in sections {
            for key in keys {
                assert!(
                    shown.contains(&(section, *key)),
                    "broker.example.toml does not show [{section}] {key}"
                );
            }
        }

        // what the example sets is the default, but for what has none
        let mut expected = example.clone();
        expected.data_dir = defaults.data_dir.clone();
        expected.tls.ca = defaults.tls.ca.clone();
        expected.tls.cert = defaults.tls.cert.clone();
        expected.tls.key = defaults.tls.key.clone();
        expected.tls.crl = None;
        expected.participants = defaults.participants.clone();
        let table = |c: &BrokerConfig| c.to_toml().unwrap().parse::<toml::Table>().unwrap();
        let (set, default) = (table(&expected), table(&defaults));
        let mut differ = Vec::new();
        let mut compare =
            |name: String, set: Option<&toml::Value>, default: Option<&toml::Value>| {
                if set != default {
                    differ.push(format!(
                        "{name}: {set:?} in the example, {default:?} by default"
                    ));
                }
            };
        for key in set.keys().chain(default.keys()) {
            match (set.get(key), default.get(key)) {
                (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                    for inner in a.keys().chain(b.keys()) {
                        compare(format!("{key}.{inner}"), a.get(inner), b.get(inner));
                    }
                }
                (a, b) => compare(key.clone(), a, b),
            }
        }
        differ.sort();
        differ.dedup();
        assert!(
            differ.is_empty(),
            "broker.example.toml sets values other than the defaults: {differ:#?}"
        );
        assert_eq!(expected, defaults);
    }

    #[test]
    fn toml_round_trips() {
        let config = BrokerConfig::from_toml(&minimal()).unwrap();
        let again = BrokerConfig::from_toml(&config.to_toml().unwrap()).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = minimal().replace("[tls]", "colour = \"blue\"\n[tls]");
        let err = BrokerConfig::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "[limits]\nmax_max_in_flight = 5000\n",
                "config: limits.max_max_in_flight must be <= 1024, got 5000",
            ),
            (
                "[limits]\ndefault_max_in_flight = 300\n",
                "config: limits.default_max_in_flight must be <= limits.max_max_in_flight (256), got 300",
            ),
            (
                "[limits]\nreceive_buffer_bytes = \"1KiB\"\n",
                "config: limits.receive_buffer_bytes must be >= 16384, got 1024",
            ),
            (
                "[limits]\ndefault_lifetime = \"100d\"\n",
                "config: limits.default_lifetime must be <= limits.max_lifetime (90d), got 100d",
            ),
            (
                "[lifecycle]\nmetadata_retention = \"10d\"\n",
                "config: lifecycle.metadata_retention must be >= limits.max_lifetime (90d)",
            ),
            (
                "[limits]\nmax_handshakes_per_ip = 0\n",
                "config: limits.max_handshakes_per_ip must be >= 1, got 0",
            ),
            (
                "[lifecycle]\nmax_attempts = 0\n",
                "config: lifecycle.max_attempts must be >= 1, got 0",
            ),
            (
                "[lifecycle]\nmax_clock_step = \"500ms\"\n",
                "config: lifecycle.max_clock_step must be >= 1s, got 500ms",
            ),
            (
                "[limits]\nmax_envelope_bytes = \"1GiB\"\n",
                "config: limits.max_envelope_bytes must be <= 67108864",
            ),
            (
                "[store]\nwriter_nice = -21\n",
                "config: store.writer_nice must be a nice value from -20 to 19, got -21",
            ),
            (
                "[limits]\nmax_incoming_request_bytes_per_identity = \"8MiB\"\n",
                "config: limits.max_incoming_request_bytes_per_identity must be at least \
                 limits.max_envelope_bytes and 1 MiB more (9437184)",
            ),
            (
                "[limits]\nmax_waiting_submit_bytes_per_sender = \"4MiB\"\n",
                "config: limits.max_waiting_submit_bytes_per_sender must be at least \
                 limits.max_envelope_bytes (8388608)",
            ),
            (
                "[limits]\nmax_concurrent_requests_per_participant = 0\n",
                "config: limits.max_concurrent_requests_per_participant must be >= 1, got 0",
            ),
            (
                "[limits]\nmax_concurrent_requests_per_participant = 1025\n",
                "config: limits.max_concurrent_requests_per_participant must be <= 1024, got 1025",
            ),
            (
                "[limits]\nmax_ack_ids_in_progress_per_participant = 1023\n",
                "config: limits.max_ack_ids_in_progress_per_participant must be at least 1024, \
                 the most ids one Ack may carry",
            ),
            (
                "[limits]\nmax_ack_ids_in_progress_per_participant = 2000000\n",
                "config: limits.max_ack_ids_in_progress_per_participant must be <= 1048576",
            ),
        ];
        for (extra, expected) in cases {
            let text = format!("{}{extra}", minimal());
            let err = BrokerConfig::from_toml(&text).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{err}");
        }
        let text = format!(
            "admin_allowed_hosts = [\"broker.internal\", \"bad host\"]\n{}",
            minimal()
        );
        let err = BrokerConfig::from_toml(&text).unwrap_err().to_string();
        assert_eq!(
            err,
            "config: admin_allowed_hosts[1] must be a host name (letters, digits, '-' and '.'), \
             got \"bad host\""
        );
    }

    /// A config valid before the request-bytes budget existed stays valid: unset, the
    /// budget grows with `max_envelope_bytes`; set, it must hold one largest request.
    #[test]
    fn the_request_bytes_budget_grows_with_the_envelope_limit_unless_set() {
        let budget = |extra: &str| {
            BrokerConfig::from_toml(&format!("{}{extra}", minimal()))
                .map(|c| c.limits.max_incoming_request_bytes_per_identity)
        };
        assert_eq!(budget("").unwrap(), 64 << 20);
        assert_eq!(
            budget("[limits]\nmax_envelope_bytes = \"64MiB\"\n").unwrap(),
            65 << 20
        );
        assert_eq!(
            budget(
                "[limits]\nmax_envelope_bytes = \"64MiB\"\n\
                 max_incoming_request_bytes_per_identity = \"80MiB\"\n"
            )
            .unwrap(),
            80 << 20
        );
        let err = budget(
            "[limits]\nmax_envelope_bytes = \"64MiB\"\n\
             max_incoming_request_bytes_per_identity = \"64MiB\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("config: limits.max_incoming_request_bytes_per_identity"),
            "{err}"
        );
    }

    #[test]
    fn a_max_downtime_shorter_than_an_hour_is_refused_but_0s_turns_the_check_off() {
        for value in ["30s", "1m", "59m"] {
            let text = format!("{}[lifecycle]\nmax_downtime = \"{value}\"\n", minimal());
            let result = BrokerConfig::from_toml(&text);
            assert!(
                result
                    .as_ref()
                    .is_err_and(|e| e.to_string().contains("lifecycle.max_downtime")),
                "max_downtime = {value:?} accepted: {:?}",
                result.map(|c| c.lifecycle.max_downtime)
            );
        }
        for value in ["0s", "1h", "30d"] {
            let text = format!("{}[lifecycle]\nmax_downtime = \"{value}\"\n", minimal());
            BrokerConfig::from_toml(&text).unwrap();
        }
    }

    #[test]
    fn registry_errors_name_the_entry() {
        let cases = [
            ("id = \"NL-NRM\"", "id = \"nl-nrm\"", "participants[0].id"),
            (
                "country = \"NL\"",
                "country = \"BE\"",
                "participants[0].country",
            ),
            (
                "accepts = [\"referral\", \"MESSAGE_KIND_FOLLOW_UP\"]",
                "accepts = [\"referral\", \"delivery-receipt\"]",
                "participants[0].accepts[1]",
            ),
            (
                "accepts = [\"referral\", \"MESSAGE_KIND_FOLLOW_UP\"]",
                "accepts = [\"gossip\"]",
                "participants[0].accepts[0]",
            ),
        ];
        for (from, to, field) in cases {
            let text = minimal().replace(from, to);
            let err = BrokerConfig::from_toml(&text).unwrap_err().to_string();
            assert!(err.starts_with(&format!("config: {field} ")), "{err}");
        }
        let twice = format!(
            "{}{}",
            minimal(),
            minimal()
                .split("[[participants]]")
                .nth(1)
                .map(|p| format!("[[participants]]{p}"))
                .unwrap()
        );
        let err = BrokerConfig::from_toml(&twice).unwrap_err().to_string();
        assert!(
            err.starts_with("config: participants[1].id must be unique"),
            "{err}"
        );
        let bad_type = minimal().replace("\"nrm\"", "\"church\"");
        assert!(BrokerConfig::from_toml(&bad_type).is_err());
    }
}
