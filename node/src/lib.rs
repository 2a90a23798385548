//! trmx-node: the participant's daemon (outbox, inbox, case timelines, local
//! API) and the CLI that talks to it.
//!
//! Module map:
//! - [`core`]: the node itself — the sled-backed outbox, inbox, case and due
//!   indexes, retention, and the mutual-TLS link to the broker (submit loop,
//!   receive loop). Everything else is a front-end to [`core::NodeCore`].
//! - [`config`]: the TOML config file (`node.example.toml`), validated, turned
//!   into a [`core::CoreConfig`] and the local API socket path.
//! - [`api`]: the `trmx.v1.NodeApi` gRPC service on a Unix socket (mode 0600);
//!   [`api::status`] maps [`core::NodeError`] to gRPC codes in one place;
//!   [`api::client::connect_local`] is the client side.
//! - [`daemon`]: starts and stops core + API in order ([`daemon::RunningNode`],
//!   [`daemon::run`]); the `trmx-node run` command and in-process tests use it.
//! - [`cli`]: the `trmx-node` commands (`run`, `send`, `outbox`, `inbox`,
//!   `show`, `case`, `due`, `watch`, `withdraw`, `participants`, `status`) and
//!   their human-readable and `--json` output.
//!
//! Data flow: CLI or case-management system → Unix socket → [`api`] (request
//! validated, converted) → [`core::NodeCore`] → sled and broker; inbox entries
//! flow back through `NodeCore::watch` → `Watch` stream.

pub mod api;
pub mod cli;
pub mod config;
pub mod core;
pub mod daemon;

pub use api::client::connect_local;
pub use api::serve_local_api;
pub use config::NodeConfig;
pub use daemon::{RunningNode, run};
