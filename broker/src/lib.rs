//! trmx-broker: the store-and-forward broker (DESIGN.md §2–§4, §6–§7).
//!
//! Modules:
//! - [`config`]: [`config::BrokerConfig`] — the TOML file (`deny_unknown_fields`, named
//!   defaults, `validate()` naming the field); `broker.example.toml` is the reference.
//! - [`units`]: human-friendly durations (`"30d"`) and sizes (`"8MiB"`) for the config.
//! - [`registry`]: the participant registry (who may be sent what) built from the config.
//! - [`admission`]: what may reach the store on `Submit`: per-sender token bucket, free-disk
//!   watermark, and the latch that refuses submits after a failed flush; and the
//!   per-participant slots that bound the other `Exchange` requests on the store.
//! - [`streams`]: the open `Receive` streams — per-participant wake-ups, unacknowledged
//!   leases per stream, the per-participant stream limit.
//! - [`outbound`]: a `Receive` stream's send channel — the bytes waiting to be sent (the
//!   stream leases only while little waits), and the deliveries dropped there unsent
//!   (withdrawn, purged or expired while they waited).
//! - [`service`]: the `trmx.v1.Exchange` gRPC service: identity from the client
//!   certificate, request validation, calls into the store, `Receive` stream tasks.
//! - [`server`]: [`serve`] and [`Broker::builder`] — TLS, store, timer loop, CRL reloads,
//!   tonic with explicit limits, the gRPC health service, orderly shutdown.
//! - [`cli`]: the `trmx-broker` command line (flags over the config, signals, ready file),
//!   in the library so that other executables run exactly what the binary runs.
//! - [`admin`]: the operator side — Prometheus `/metrics`, `/healthz`, `/readyz` on a
//!   separate loopback HTTP port.
//! - [`operator`]: the `trmx.v1.Operator` gRPC service for operator certificates —
//!   queues, participants, metadata search, dead letters, redrive, purge, audit
//!   verification, federation statistics ([`operator::stats`]); never payloads.
//! - [`admin_cli`]: `trmx-broker admin …`, the operators' client of that service
//!   (tables, `--json`, `stats --csv`).
//! - [`store`]: the storage contract [`store::BrokerStore`] and its sled implementation.
//! - [`last_run`]: the last-run file in the data directory, the store's last run kept
//!   where `check-config` reads it without touching the store.
//! - [`clock`]: the injected time source ([`clock::GuardedClock`] in a running broker,
//!   [`clock::SystemClock`], [`clock::ManualClock`] in tests).
//! - [`error`]: [`BrokerError`] and its one mapping to `tonic::Status`.
//!
//! Data flow: a node's TLS connection is accepted by `trmx_transport::incoming` (client
//! certificate verified against the federation CA and CRL) → tonic → [`service`], which
//! takes the caller from the certificate, validates the envelope, asks [`admission`], and
//! calls `store.submit` (answered only once flushed) → the recipient's wake-up in
//! [`streams`] fires → its `Receive` task leases from the store and sends deliveries →
//! `Ack` settles them in the store (which queues the sender's receipt) and frees the
//! stream's slots. The timer loop in [`server`] calls `store.tick` for ack timeouts,
//! expiry and retentions, and wakes the streams of recipients with newly due messages.

pub mod admin;
pub mod admin_cli;
pub mod admission;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod last_run;
pub mod operator;
pub mod outbound;
pub mod registry;
pub mod server;
pub mod service;
pub mod store;
pub mod streams;
pub mod units;

pub use config::BrokerConfig;
pub use error::BrokerError;
pub use server::{
    Broker, BrokerBuilder, CRL_RECORD_FILE, ClockCheck, ConfigCheck, RunningBroker, check_config,
    serve,
};
