//! The broker's admin side for operators (DESIGN.md §3 "service Operator", §7): Prometheus
//! metrics and health probes on a separate HTTP port, bound to loopback unless configured
//! otherwise.
//!
//! - [`metrics`]: [`Metrics`], a small hand-written Prometheus registry with exactly the
//!   series that `ops/grafana/trmx-broker.json` and `ops/prometheus/alerts.yml` use, rendered
//!   in the text exposition format 0.0.4. The service and the store counters call its cheap
//!   methods; gauges derived from the store are refreshed just before each scrape.
//! - [`http`]: [`serve_admin`], a bounded hyper HTTP/1 server for `GET /metrics`,
//!   `/healthz` (the process runs) and `/readyz` (store writable, certificates valid).
//!
//! Data flow: service/store events → [`Metrics`] counters and histograms; on each scrape
//! [`AdminHooks::refresh`] pulls `queue_stats()` from the store into the queue gauges, then
//! [`Metrics::render`] computes the time-derived gauges (ages, seconds until expiry) from
//! the injected clock and writes the text.

pub mod http;
pub mod metrics;

pub use http::{AdminHooks, AdminLimits, AdminState, HostCheck, serve_admin};
pub use metrics::{
    CertRole, DeadLetterReason, DropReason, ExchangeMethod, HeldCert, Metrics, Readiness,
    RefusalReason, sha256_label,
};
