//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading TLS material or building a channel.
///
/// Messages are one line and name the file (or address) and the problem; they never
/// contain key material.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid PEM, or holds no object of the expected kind.
    #[error("{}: {what}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected in it ("certificate", "private key", "CRL").
        what: &'static str,
        /// The PEM decoder's complaint.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A file holds PEM but not a usable object (bad DER, unsupported CRL, …).
    #[error("{}: invalid {what}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What was expected in it.
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// rustls refused the assembled configuration (e.g. key does not match certificate).
    #[error("tls config from {}: {source}", path.display())]
    Config {
        /// The file the problem is most likely in (the certificate or the CA).
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA and CRLs.
    #[error("client verifier from {}: {source}", path.display())]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// An address given to [`crate::client_channel`] is not `host:port`.
    #[error("address {addr:?}: {reason}")]
    Address {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The name the server certificate is checked against is not a DNS name or IP.
    #[error("server name {name:?} is not a valid DNS name or IP address")]
    ServerName {
        /// The name as given.
        name: String,
    },
    /// tonic refused the endpoint.
    #[error("endpoint {addr}: {source}")]
    Endpoint {
        /// The address as given.
        addr: String,
        /// tonic's reason.
        #[source]
        source: tonic::transport::Error,
    },
}
