//! trmx-tests: the local federation demo and the harness of the end-to-end tests.
//!
//! - [`chaos`]: crash safety under chaos — broker and node processes killed
//!   (SIGKILL, broker fail points) while messages flow, and the checker that
//!   counts lost, duplicated and redelivered messages.
//! - [`adversary`]: hostile clients for the certificate and bad-input tests —
//!   any TLS config, bare handshakes that report the alert, certificates
//!   with unusual key usages, raw gRPC bodies.
//! - [`federation`]: writes a whole local federation to a directory — PKI
//!   (via `trmx-certs`), a broker config with the participant registry, one
//!   node config per participant.
//! - [`process`]: starts a broker or node as a real child process, waits for
//!   its ready file, and always stops it (SIGTERM, then SIGKILL).
//! - [`story`]: the demo story of DOMAIN.md driven through the nodes' local
//!   APIs with the example documents; narrates and returns a report.
//! - [`proxy`]: a fault-injecting TCP proxy (cut, stall, delay) for network
//!   fault tests.
//! - [`logs`]: a capture of the in-process broker's and nodes' log lines, for
//!   tests that check what was logged (nothing at ERROR, no personal data).
//!
//! The `trmx-demo` binary (`src/bin/trmx-demo.rs`) puts these together; the
//! integration tests in `tests/main.rs` run the same pieces and check every
//! outcome.

pub mod adversary;
pub mod chaos;
pub mod federation;
pub mod harness;
pub mod logs;
pub mod process;
pub mod proxy;
pub mod story;
