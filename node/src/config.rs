//! The node's TOML configuration: parsed with `deny_unknown_fields`, defaults
//! named, validated with errors that name the field, then turned into a
//! [`CoreConfig`] for the core and a socket path and limits for the local API.
//!
//! Relative paths in a file loaded with [`NodeConfig::load`] are resolved
//! against the directory of that file, so a config and its certificates can
//! move together.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use trmx_proto::ParticipantId;

use crate::core::{CoreConfig, NodeError};

/// File name of the local API socket inside `data_dir` when `api.socket` is unset.
pub const DEFAULT_SOCKET_NAME: &str = "node.sock";

/// The whole node configuration (one TOML file, see `node/node.example.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's participant ID, e.g. `NL-NRM`; must match the node certificate.
    pub participant: String,
    /// Directory of the node's database (created if missing).
    pub data_dir: PathBuf,
    /// Log filter: `error`, `warn`, `info`, `debug`, `trace`, or a
    /// `tracing_subscriber` filter directive. `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// The broker.
    pub broker: BrokerSection,
    /// The node's TLS material.
    pub tls: TlsSection,
    /// The local API.
    #[serde(default)]
    pub api: ApiSection,
    /// Local storage and retention.
    #[serde(default)]
    pub storage: StorageSection,
}

/// `[broker]`: where the broker is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// `host:port` of the broker.
    pub address: String,
    /// The DNS name in the broker's certificate (checked during the TLS handshake).
    pub server_name: String,
    /// Most unacknowledged deliveries on the receive stream.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// First wait before reconnecting, in milliseconds (doubles, jittered).
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest wait before reconnecting, in milliseconds.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Lifetime of sent messages in hours (their `expires_at`); 0 leaves it to
    /// the broker's default.
    #[serde(default = "default_message_lifetime_hours")]
    pub message_lifetime_hours: u64,
    /// How often the node asks the broker about its messages that have no
    /// receipt after that long, in seconds; one the broker lost (its store
    /// restored from a backup) is submitted again. 0 turns the check off.
    #[serde(default = "default_outbox_check_interval_secs")]
    pub outbox_check_interval_secs: u64,
    /// How long after one of its messages failed as expired or dead-lettered the node
    /// still asks the broker about it with the outbox check (at most once an hour), in
    /// seconds: the broker's operator may redrive it while the broker keeps its payload
    /// (the broker's `lifecycle.dead_letter_retention`, 30 days by default), and if the
    /// delivery receipt of the redriven message is lost too, only the broker's status
    /// shows it delivered. 0 turns this off.
    #[serde(default = "default_redrive_watch_secs")]
    pub redrive_watch_secs: u64,
    /// How long a submit waits for the broker's answer, in seconds, sending the
    /// envelope included: past it, the submit counts as failed and is tried again. A
    /// large envelope on a slow link needs longer (as does the broker's
    /// `limits.request_timeout`).
    #[serde(default = "default_submit_answer_timeout_secs")]
    pub submit_answer_timeout_secs: u64,
}

/// The longest Unix socket path: `sun_path` holds 108 bytes with the terminating NUL.
const MAX_SOCKET_PATH: usize = crate::api::MAX_SOCKET_PATH_BYTES;

/// `[tls]`: the node's PEM files, made with `trmx-certs`.
///
/// All four are read again before a connection to the broker when one of them has
/// changed (a renewal, a CA rollover, a new CRL): no restart is needed. A changed
/// certificate is checked for every few seconds, and the node moves to a new connection
/// that presents it (the open one would go on presenting the old one until it breaks),
/// once the broker has accepted it there; a certificate the broker refuses leaves the
/// node presenting the old one, also on its next connections. A change that cannot be
/// used, or a certificate of another identity, is logged and the files read before stay
/// in force.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The federation CA certificate.
    pub ca: PathBuf,
    /// The node certificate (chain, leaf first).
    pub cert: PathBuf,
    /// The node's private key.
    pub key: PathBuf,
    /// The federation's CRL (PEM or DER), as the broker reads it: a broker certificate it
    /// lists is refused, so that a broker key that leaked and was revoked cannot pose as
    /// the broker. Unset: not checked.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// `[api]`: the local gRPC API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Unix socket path; unset means `<data_dir>/node.sock`. Created with mode 0600.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Most connections open at once; one more is closed at once (and logged), so that
    /// an integration leaking connections cannot take the node's file descriptors.
    #[serde(default = "default_api_max_connections")]
    pub max_connections: u32,
    /// Most `Watch` streams open at once, over all connections; one more is refused
    /// with `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_api_max_watch_streams")]
    pub max_watch_streams: u32,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            socket: None,
            max_connections: default_api_max_connections(),
            max_watch_streams: default_api_max_watch_streams(),
        }
    }
}

/// `[storage]`: the local database and retention.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// sled page cache, in MiB.
    #[serde(default = "default_cache_capacity_mb")]
    pub cache_capacity_mb: u64,
    /// How often bodies past their `handling.retain_until` are erased, in seconds.
    #[serde(default = "default_retention_check_interval_secs")]
    pub retention_check_interval_secs: u64,
    /// Largest step of the system clock the node follows, in seconds; a
    /// larger jump is held (`trmx_durable::clock::GuardedClock`), so that a
    /// clock set ahead by mistake erases no body before its retention date, nor
    /// makes the broker's certificate (checked on the node's time) look expired.
    #[serde(default = "default_max_clock_step_secs")]
    pub max_clock_step_secs: u64,
    /// Longest time between two runs of the node on its store that a start accepts
    /// without `trmx-node accept-clock`, in seconds: a system clock further than this
    /// from the store's last run, ahead or behind, is taken for a wrong clock. 0 turns
    /// the check off; otherwise at least 3600.
    #[serde(default = "default_max_downtime_secs")]
    pub max_downtime_secs: u64,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            cache_capacity_mb: default_cache_capacity_mb(),
            retention_check_interval_secs: default_retention_check_interval_secs(),
            max_clock_step_secs: default_max_clock_step_secs(),
            max_downtime_secs: default_max_downtime_secs(),
        }
    }
}

fn default_log_level() -> String {
    "info".to_owned()
}
fn default_max_in_flight() -> u32 {
    32
}
fn default_reconnect_min_ms() -> u64 {
    500
}
fn default_reconnect_max_ms() -> u64 {
    60_000
}
fn default_message_lifetime_hours() -> u64 {
    // 30 days: long enough for a node that is offline for a holiday period.
    30 * 24
}
fn default_outbox_check_interval_secs() -> u64 {
    600
}
fn default_redrive_watch_secs() -> u64 {
    // the broker's default `lifecycle.dead_letter_retention`
    30 * 86_400
}
/// The longest `broker.redrive_watch_secs`: the broker's default metadata retention
/// (400 days), past which it no longer knows a message.
const MAX_REDRIVE_WATCH_SECS: u64 = 400 * 86_400;
fn default_submit_answer_timeout_secs() -> u64 {
    crate::core::SUBMIT_ANSWER_TIMEOUT.as_secs()
}
/// The shortest `broker.submit_answer_timeout_secs`: no call to the broker waits less
/// for its answer.
const MIN_SUBMIT_ANSWER_TIMEOUT_SECS: u64 = crate::core::BROKER_ANSWER_TIMEOUT.as_secs();
fn default_api_max_connections() -> u32 {
    64
}
fn default_api_max_watch_streams() -> u32 {
    64
}
fn default_cache_capacity_mb() -> u64 {
    64
}
fn default_retention_check_interval_secs() -> u64 {
    3_600
}
fn default_max_clock_step_secs() -> u64 {
    60
}
fn default_max_downtime_secs() -> u64 {
    7 * 86_400
}

/// Largest accepted `broker.max_in_flight`.
const MAX_IN_FLIGHT: u32 = 1_024;
/// Largest accepted `broker.message_lifetime_hours` (one year).
const MAX_LIFETIME_HOURS: u64 = 366 * 24;
/// Largest accepted `api.max_connections`: each takes a file descriptor, and a cap
/// above the usual limit of 1024 open files would not keep the node's own.
const MAX_API_CONNECTIONS: u32 = 1_000;
/// Largest accepted `api.max_watch_streams`.
const MAX_API_WATCH_STREAMS: u32 = 10_000;

fn invalid(field: &str, rule: impl std::fmt::Display) -> NodeError {
    NodeError::Config(format!("{field}: {rule}"))
}

impl NodeConfig {
    /// Reads, parses and validates a config file; relative paths are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<NodeConfig, NodeError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| NodeError::Config(read_error(path, &e)))?;
        let mut config = NodeConfig::parse(&text)
            .map_err(|e| NodeError::Config(format!("{}: {}", path.display(), config_msg(&e))))?;
        // Resolve against the file's directory, made absolute so that the
        // socket path printed and written to a ready file works from anywhere.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        if let Some(base) = absolute.parent() {
            config.resolve_relative_to(base);
        }
        config
            .validate()
            .map_err(|e| NodeError::Config(format!("{}: {}", path.display(), config_msg(&e))))?;
        Ok(config)
    }

    /// Parses TOML text (no validation, paths as written).
    pub fn parse(text: &str) -> Result<NodeConfig, NodeError> {
        toml::from_str(text).map_err(|e| {
            // The toml error names the key; keep its first line (no source excerpt).
            let message = e.message().to_owned();
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].lines().count().max(1);
                    NodeError::Config(format!("line {line}: {message}"))
                }
                None => NodeError::Config(message),
            }
        })
    }

    /// The filter to give tracing for `log_level`: each part a level or `target=level` (a
    /// bare word such as a mistyped `debgu` is a target to tracing: a silent node), without
    /// the whitespace around it (`info ` would be a target to tracing too).
    pub fn log_filter(&self) -> Result<String, NodeError> {
        let checked = trmx_durable::log_filter::check_log_filter(&self.log_level)
            .map_err(|e| invalid("log_level", e))?;
        if checked.is_empty() {
            return Err(invalid("log_level", "must not be empty"));
        }
        tracing_subscriber::EnvFilter::try_new(&checked)
            .map_err(|e| invalid("log_level", format!("is not a valid filter: {e}")))?;
        Ok(checked)
    }

    /// Checks every rule that serde cannot; the error names the field.
    pub fn validate(&self) -> Result<(), NodeError> {
        ParticipantId::parse(&self.participant).map_err(|_| {
            invalid(
                "participant",
                "must look like NL-NRM (country code or INT, a dash, 2-24 of A-Z 0-9)",
            )
        })?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "is required"));
        }
        self.log_filter()?;
        let b = &self.broker;
        if !looks_like_host_port(&b.address) {
            return Err(invalid("broker.address", "must be host:port"));
        }
        if b.server_name.trim().is_empty() {
            return Err(invalid("broker.server_name", "is required"));
        }
        if !(1..=MAX_IN_FLIGHT).contains(&b.max_in_flight) {
            return Err(invalid(
                "broker.max_in_flight",
                format!("must be between 1 and {MAX_IN_FLIGHT}"),
            ));
        }
        if b.reconnect_min_ms == 0 {
            return Err(invalid("broker.reconnect_min_ms", "must be at least 1"));
        }
        if b.reconnect_max_ms < b.reconnect_min_ms {
            return Err(invalid(
                "broker.reconnect_max_ms",
                "must not be less than broker.reconnect_min_ms",
            ));
        }
        if b.message_lifetime_hours > MAX_LIFETIME_HOURS {
            return Err(invalid(
                "broker.message_lifetime_hours",
                format!("must be at most {MAX_LIFETIME_HOURS} (one year)"),
            ));
        }
        for (field, path) in [
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if path.as_os_str().is_empty() {
                return Err(invalid(field, "is required"));
            }
        }
        if self
            .tls
            .crl
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid(
                "tls.crl",
                "must not be empty (leave it out to not check)",
            ));
        }
        if let Some(socket) = &self.api.socket {
            if socket.as_os_str().is_empty() {
                return Err(invalid(
                    "api.socket",
                    "must not be empty (leave it out for the default)",
                ));
            }
            // sun_path holds 108 bytes including the terminating NUL.
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(invalid(
                    "api.socket",
                    "must be at most 107 bytes long (a Unix socket path)",
                ));
            }
            // (the node binds it first in a private directory beside it)
            if crate::api::socket_bind_len(socket) > MAX_SOCKET_PATH {
                return Err(invalid(
                    "api.socket",
                    format!(
                        "must be in a directory of at most {} bytes: the node binds the \
                         socket first in a private directory inside it, and a Unix socket \
                         path holds at most 107 bytes",
                        MAX_SOCKET_PATH - crate::api::STAGING_OVERHEAD_BYTES
                    ),
                ));
            }
        } else {
            let socket = self.socket_path();
            if crate::api::socket_bind_len(&socket) > MAX_SOCKET_PATH {
                return Err(invalid(
                    "data_dir",
                    format!(
                        "is too long for the default socket {} ({} bytes, a Unix socket path \
                         holds at most 107): set api.socket to a shorter path",
                        socket.display(),
                        socket.as_os_str().len()
                    ),
                ));
            }
        }
        if !(1..=MAX_API_CONNECTIONS).contains(&self.api.max_connections) {
            return Err(invalid(
                "api.max_connections",
                format!("must be between 1 and {MAX_API_CONNECTIONS}"),
            ));
        }
        if !(1..=MAX_API_WATCH_STREAMS).contains(&self.api.max_watch_streams) {
            return Err(invalid(
                "api.max_watch_streams",
                format!("must be between 1 and {MAX_API_WATCH_STREAMS}"),
            ));
        }
        if self.broker.submit_answer_timeout_secs < MIN_SUBMIT_ANSWER_TIMEOUT_SECS {
            return Err(invalid(
                "broker.submit_answer_timeout_secs",
                format!(
                    "must be at least {MIN_SUBMIT_ANSWER_TIMEOUT_SECS} (the time a submit \
                     takes to send its envelope counts too)"
                ),
            ));
        }
        if self.broker.redrive_watch_secs > MAX_REDRIVE_WATCH_SECS {
            return Err(invalid(
                "broker.redrive_watch_secs",
                format!(
                    "must be at most {MAX_REDRIVE_WATCH_SECS} (400 days, the broker's default \
                     metadata retention: past it the broker no longer knows the message), or 0 \
                     to not ask"
                ),
            ));
        }
        if self.storage.cache_capacity_mb == 0 {
            return Err(invalid("storage.cache_capacity_mb", "must be at least 1"));
        }
        if self.storage.retention_check_interval_secs == 0 {
            return Err(invalid(
                "storage.retention_check_interval_secs",
                "must be at least 1",
            ));
        }
        // (the node records its time every minute: a shorter bound would refuse the
        // restart after a crash)
        if (1..3_600).contains(&self.storage.max_downtime_secs) {
            return Err(invalid(
                "storage.max_downtime_secs",
                "must be 0 (no check) or at least 3600 (an hour)",
            ));
        }
        if self.storage.max_clock_step_secs == 0 {
            return Err(invalid(
                "storage.max_clock_step_secs",
                "must be at least 1 (below, NTP's ordinary steps would be held)",
            ));
        }
        Ok(())
    }

    /// The guarded system clock a node with this config runs on.
    pub fn clock(&self) -> std::sync::Arc<dyn crate::core::Clock> {
        std::sync::Arc::new(crate::core::node_clock(Duration::from_secs(
            self.storage.max_clock_step_secs,
        )))
    }

    /// Makes every relative path absolute against `base`.
    pub fn resolve_relative_to(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.data_dir);
        resolve(&mut self.tls.ca);
        resolve(&mut self.tls.cert);
        resolve(&mut self.tls.key);
        if let Some(crl) = &mut self.tls.crl {
            resolve(crl);
        }
        if let Some(socket) = &mut self.api.socket {
            resolve(socket);
        }
    }

    /// The local API socket: `api.socket`, or `<data_dir>/node.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.api
            .socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join(DEFAULT_SOCKET_NAME))
    }

    /// Every limit and interval in effect (defaults filled in), by config key, in the
    /// order of `node.example.toml`: what `check-config` prints beside the paths. The
    /// sections are taken apart field by field, so that a setting added to one does not
    /// compile until it is listed here (or said to be shown elsewhere).
    pub fn limits(&self) -> Vec<(&'static str, u64)> {
        let BrokerSection {
            address: _,
            server_name: _,
            max_in_flight,
            reconnect_min_ms,
            reconnect_max_ms,
            message_lifetime_hours,
            outbox_check_interval_secs,
            redrive_watch_secs,
            submit_answer_timeout_secs,
        } = &self.broker;
        let ApiSection {
            socket: _,
            max_connections,
            max_watch_streams,
        } = &self.api;
        let StorageSection {
            cache_capacity_mb,
            retention_check_interval_secs,
            max_clock_step_secs,
            max_downtime_secs,
        } = &self.storage;
        vec![
            ("broker.max_in_flight", u64::from(*max_in_flight)),
            ("broker.reconnect_min_ms", *reconnect_min_ms),
            ("broker.reconnect_max_ms", *reconnect_max_ms),
            ("broker.message_lifetime_hours", *message_lifetime_hours),
            (
                "broker.outbox_check_interval_secs",
                *outbox_check_interval_secs,
            ),
            ("broker.redrive_watch_secs", *redrive_watch_secs),
            (
                "broker.submit_answer_timeout_secs",
                *submit_answer_timeout_secs,
            ),
            ("api.max_connections", u64::from(*max_connections)),
            ("api.max_watch_streams", u64::from(*max_watch_streams)),
            ("storage.cache_capacity_mb", *cache_capacity_mb),
            (
                "storage.retention_check_interval_secs",
                *retention_check_interval_secs,
            ),
            ("storage.max_clock_step_secs", *max_clock_step_secs),
            ("storage.max_downtime_secs", *max_downtime_secs),
        ]
    }

    /// The local API's limits.
    pub fn api_limits(&self) -> crate::api::ApiLimits {
        crate::api::ApiLimits {
            max_connections: usize::try_from(self.api.max_connections).unwrap_or(usize::MAX),
            max_watch_streams: usize::try_from(self.api.max_watch_streams).unwrap_or(usize::MAX),
        }
    }

    /// The core's view of this config (validate first).
    pub fn core_config(&self) -> Result<CoreConfig, NodeError> {
        let participant = ParticipantId::parse(&self.participant)
            .map_err(|_| invalid("participant", "must look like NL-NRM"))?;
        let b = &self.broker;
        Ok(CoreConfig {
            participant,
            data_dir: self.data_dir.clone(),
            broker_addr: b.address.clone(),
            broker_server_name: b.server_name.clone(),
            tls: trmx_transport::TlsPaths {
                ca: self.tls.ca.clone(),
                cert: self.tls.cert.clone(),
                key: self.tls.key.clone(),
            },
            crl: self.tls.crl.clone(),
            max_in_flight: b.max_in_flight,
            reconnect_min: Duration::from_millis(b.reconnect_min_ms),
            reconnect_max: Duration::from_millis(b.reconnect_max_ms),
            default_lifetime: (b.message_lifetime_hours > 0)
                .then(|| Duration::from_secs(b.message_lifetime_hours * 3_600)),
            outbox_check_interval: (b.outbox_check_interval_secs > 0)
                .then(|| Duration::from_secs(b.outbox_check_interval_secs)),
            redrive_watch: (b.redrive_watch_secs > 0)
                .then(|| Duration::from_secs(b.redrive_watch_secs)),
            retention_check_interval: Duration::from_secs(
                self.storage.retention_check_interval_secs,
            ),
            cache_capacity_bytes: self.storage.cache_capacity_mb.saturating_mul(1024 * 1024),
            withdraw_timeout: crate::core::WITHDRAW_TIMEOUT,
            broker_answer_timeout: crate::core::BROKER_ANSWER_TIMEOUT,
            submit_answer_timeout: Duration::from_secs(b.submit_answer_timeout_secs),
            shutdown_grace: crate::core::SHUTDOWN_GRACE,
            certificate_check_interval: crate::core::CERTIFICATE_CHECK_INTERVAL,
            clock_bounds: crate::core::ClockBounds {
                max_step: Duration::from_secs(self.storage.max_clock_step_secs),
                max_downtime: (self.storage.max_downtime_secs > 0)
                    .then(|| Duration::from_secs(self.storage.max_downtime_secs)),
            },
        })
    }

    /// A config with every default, for tests and tools that build one in code.
    pub fn new(
        participant: &str,
        data_dir: PathBuf,
        broker_address: &str,
        broker_server_name: &str,
        tls: trmx_transport::TlsPaths,
    ) -> NodeConfig {
        NodeConfig {
            participant: participant.to_owned(),
            data_dir,
            log_level: default_log_level(),
            broker: BrokerSection {
                address: broker_address.to_owned(),
                server_name: broker_server_name.to_owned(),
                max_in_flight: default_max_in_flight(),
                reconnect_min_ms: default_reconnect_min_ms(),
                reconnect_max_ms: default_reconnect_max_ms(),
                message_lifetime_hours: default_message_lifetime_hours(),
                outbox_check_interval_secs: default_outbox_check_interval_secs(),
                redrive_watch_secs: default_redrive_watch_secs(),
                submit_answer_timeout_secs: default_submit_answer_timeout_secs(),
            },
            tls: TlsSection {
                ca: tls.ca,
                cert: tls.cert,
                key: tls.key,
                crl: None,
            },
            api: ApiSection::default(),
            storage: StorageSection::default(),
        }
    }
}

/// Why the config file at `path` cannot be read, and, when it is a permission, what to do:
/// the file is the node user's and root's only (README: `root:trmx 0640`), so a client
/// command run as another user got only "Permission denied".
fn read_error(path: &Path, e: &std::io::Error) -> String {
    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
        format!(
            ": run the command as the node's user (e.g. `sudo -u trmx trmx-node --config {} …`), \
             or pass its socket with --socket if your user may open it",
            path.display()
        )
    } else {
        String::new()
    };
    format!("cannot read {}: {e}{hint}", path.display())
}

/// The message of a [`NodeError::Config`] without its `config: ` prefix.
fn config_msg(e: &NodeError) -> String {
    match e {
        NodeError::Config(message) => message.clone(),
        other => other.to_string(),
    }
}

fn looks_like_host_port(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client command run by a user who may not read the config (root:trmx 0640) was told
    /// only "Permission denied": it is told to run as the node's user, or to pass the socket.
    #[test]
    fn a_config_the_user_may_not_read_says_whose_it_is() {
        let path = Path::new("/etc/trmx/node.toml");
        let denied = read_error(
            path,
            &std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert!(
            denied.starts_with("cannot read /etc/trmx/node.toml: permission denied")
                && denied.contains("sudo -u trmx trmx-node --config /etc/trmx/node.toml")
                && denied.contains("--socket"),
            "{denied}"
        );
        let missing = read_error(path, &std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(missing, "cannot read /etc/trmx/node.toml: entity not found");
    }

    /// `broker.redrive_watch_secs` defaults to the broker's default dead-letter retention,
    /// 0 turns the watch off, and a value past the broker's default metadata retention
    /// is refused by name.
    #[test]
    fn the_redrive_watch_defaults_to_the_dead_letter_retention_and_is_bounded() {
        let mut config = NodeConfig::new(
            "NL-NRM",
            PathBuf::from("/var/lib/trmx"),
            "broker.example:7443",
            "broker.example",
            trmx_transport::TlsPaths {
                ca: PathBuf::from("ca.pem"),
                cert: PathBuf::from("node.pem"),
                key: PathBuf::from("node.key"),
            },
        );
        config.validate().unwrap();
        assert_eq!(
            config.core_config().unwrap().redrive_watch,
            Some(Duration::from_secs(30 * 86_400))
        );
        config.broker.redrive_watch_secs = 0;
        config.validate().unwrap();
        assert_eq!(config.core_config().unwrap().redrive_watch, None);
        config.broker.redrive_watch_secs = MAX_REDRIVE_WATCH_SECS;
        config.validate().unwrap();
        config.broker.redrive_watch_secs = MAX_REDRIVE_WATCH_SECS + 1;
        let refused = config.validate().unwrap_err().to_string();
        assert!(
            refused.contains("broker.redrive_watch_secs: must be at most 34560000"),
            "{refused}"
        );
    }
}
