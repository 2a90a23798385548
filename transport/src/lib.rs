//! trmx-transport: the mutual-TLS plumbing shared by the broker (server side) and the
//! node (client side). rustls 0.23 with the ring provider, TLS 1.3 only, in front of
//! tonic (which is built without its own TLS).
//!
//! Module map:
//! - [`server`] — [`ServerTls`] — loads CA, certificate, key and CRL into a rustls
//!   `ServerConfig` (client certificate required, verified against the federation CA and
//!   the CRL; the server's own certificate checked to chain to the CA with serverAuth, and
//!   the CRL to be the CA's), swaps a freshly loaded config in on [`ServerTls::reload`], and keeps a
//!   registry of open connections so that a reload closes the ones whose certificate no
//!   longer verifies. [`CrlPolicy`] / [`CrlStatus`] cover a CRL past its `nextUpdate`.
//! - [`crl_record`] — [`CrlRecord`] — the newest CRL of each CA accepted, kept in a file,
//!   so that [`ServerTls::load_with_record`] refuses an older CRL after a restart as a
//!   reload does.
//! - [`listener`] — [`incoming`] — the accept loop (concurrent handshakes with a timeout,
//!   in a budget of their own with a per-address cap, so unauthenticated sockets cannot
//!   take the slots of authenticated connections; a connection cap, and one per
//!   certificate identity; a bound on the wait for the HTTP/2 preface; TCP keepalive,
//!   shutdown future) yielding [`TlsConn`]s for
//!   `tonic::transport::Server::serve_with_incoming_shutdown`. Failed handshakes are
//!   counted by [`HandshakeFailure`] in the [`ServerTls`].
//! - [`budget`] — [`RequestBytesLayer`] — a tower layer for the tonic server that holds
//!   the request bytes one certificate identity has on their way in (received, not yet
//!   decoded) to a budget across its connections, refusing past it with
//!   `RESOURCE_EXHAUSTED`: tonic buffers a whole message before any handler sees it.
//! - [`identity`] — [`peer_identity`] — the caller's `trmx_certs::Identity` from the
//!   verified client certificate of a tonic request.
//! - [`client`] — [`client_config`] and [`client_channel`] — a lazily connecting tonic
//!   `Channel` over mutual TLS 1.3 that takes up changed TLS files at its next connection;
//!   [`ChannelTls`] says what its connections present, and holds the certificate a
//!   server accepted for its next connections when the server refuses the files' new
//!   one; [`server_name_mismatch`] tells a failure to connect for a name the server's
//!   certificate does not carry.
//! - `time` (private) — [`TlsClock`] — the time a side checks its peer's certificate on:
//!   the system clock, or a process's own (server: [`ServerTls::load_with_clock`];
//!   client: [`ClientOptions::clock`]).
//! - `pem` (private): reading PEM files (and DER CRLs) with errors that name the file.
//! - [`status`] — [`code_name`] — a gRPC status code by its canonical name.
//! - [`error`] — [`TransportError`], with the [`TlsFile`] it is about.
//!
//! Data flow on the server: `TcpListener` → [`incoming`] (handshake with the current
//! config) → [`TlsConn`] registered in [`ServerTls`] → tonic/hyper → handlers call
//! [`peer_identity`]. A reload swaps the config and flags revoked connections, whose
//! next read fails so hyper drops them.
//!
//! ```text
//! // server (broker)
//! let tls = ServerTls::load(&paths, Some(&crl), CrlPolicy::Warn)?;
//! let conns = incoming(listener, tls.clone(), ListenerLimits::default(), shutdown);
//! tonic::transport::Server::builder().add_service(svc).serve_with_incoming(conns).await?;
//! // in a handler
//! let who = peer_identity(&request)?;
//! // on SIGHUP / interval (blocking file reads)
//! let report = tokio::task::spawn_blocking(move || tls.reload()).await??;
//!
//! // client (node)
//! let channel = client_channel("broker.example:4443", &paths, &ClientOptions::default())?;
//! ```

pub mod budget;
pub mod client;
pub mod crl_record;
pub mod error;
pub mod identity;
pub mod listener;
mod pem;
pub mod server;
pub mod status;
mod time;

pub use budget::RequestBytesLayer;
pub use client::{
    ChannelTls, ChannelTlsStatus, ClientOptions, client_channel, client_channel_with_tls,
    client_config, server_name_mismatch,
};
pub use crl_record::CrlRecord;
pub use error::{CrlRecordStep, TlsFile, TransportError};
pub use identity::peer_identity;
pub use listener::{HandshakeFailure, ListenerLimits, TlsConn, incoming};
pub use server::{CrlPolicy, CrlStatus, ReloadReport, ServerTls, TlsPaths};
pub use status::code_name;
pub use time::TlsClock;
