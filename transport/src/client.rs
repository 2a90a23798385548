//! The client side: a TLS 1.3-only rustls config with our certificate, and a lazily
//! connecting tonic channel over it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rustls::ClientConfig;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncBufReadExt as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};
use trmx_certs::{CertInfo, Identity};

use crate::server::{certified_key_error, provider};
use crate::{TlsClock, TlsFile, TlsPaths, TransportError, pem};

/// How a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Time allowed for TCP connect (the TLS handshake follows within the same attempt).
    pub connect_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings, also sent while idle.
    pub http2_keepalive: Duration,
    /// Name the server certificate must carry (DNS name or IP); empty means the host part
    /// of the address.
    pub server_name: String,
    /// The federation's CRL (PEM or DER): a server certificate it lists is refused. Read
    /// again before a connection whenever the file has changed; a file that cannot be read
    /// then keeps the CRL read before (logged).
    pub crl: Option<PathBuf>,
    /// The time the server's certificate is checked at (its validity): the system clock
    /// by default. A client that holds its own time through a jump of the system clock
    /// (a node) passes that time, so that a clock set a year ahead does not make the
    /// server's certificate look expired while the client carries on.
    pub clock: TlsClock,
    /// Time allowed for the answer to each request, sent to the server as `grpc-timeout`
    /// too; `None`: no limit (the node's calls have their own). A request past it fails
    /// with `CANCELLED` "Timeout expired" ([`tonic::TimeoutExpired`]). Each call gets its
    /// own limit, so a command of many calls is not cut while its answers come.
    pub request_timeout: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            http2_keepalive: Duration::from_secs(30),
            server_name: String::new(),
            crl: None,
            clock: TlsClock::system(),
            request_timeout: None,
        }
    }
}

/// A rustls client config: TLS 1.3 only, the CA of `paths` as the only trust anchor, our
/// certificate and key for client authentication, ALPN `h2`; the server's certificate
/// checked on the system clock.
pub fn client_config(paths: &TlsPaths) -> Result<ClientConfig, TransportError> {
    build(paths, None, &TlsClock::system()).map(|(config, _)| config)
}

/// [`client_config`], refusing the server certificates that the CRLs in `crl` list, and
/// checking the server's certificate at the time `clock` gives; with the certificate and
/// key it presents.
fn build(
    paths: &TlsPaths,
    crl: Option<&Path>,
    clock: &TlsClock,
) -> Result<(ClientConfig, Arc<Credentials>), TransportError> {
    let roots = pem::roots(&paths.ca)?;
    let chain = pem::certs(TlsFile::Cert, &paths.cert)?;
    // (`pem::certs` refuses a file without one)
    let leaf = chain
        .first()
        .cloned()
        .ok_or_else(|| TransportError::Invalid {
            file: TlsFile::Cert,
            path: paths.cert.clone(),
            reason: "no certificate".to_owned(),
        })?;
    let credentials = Arc::new(Credentials {
        chain,
        key: pem::key(&paths.key)?,
        leaf,
    });
    let config = configure(paths, roots, crl, clock, &credentials)?;
    Ok((config, credentials))
}

/// [`build`] with the CA and CRL files as they are now, presenting `credentials` (read
/// before) instead of the certificate and key files.
fn build_presenting(
    paths: &TlsPaths,
    crl: Option<&Path>,
    clock: &TlsClock,
    credentials: &Credentials,
) -> Result<ClientConfig, TransportError> {
    let roots = pem::roots(&paths.ca)?;
    configure(paths, roots, crl, clock, credentials)
}

/// The client config that trusts `roots` (and the CRLs in `crl`) and presents
/// `credentials`.
fn configure(
    paths: &TlsPaths,
    roots: Arc<rustls::RootCertStore>,
    crl: Option<&Path>,
    clock: &TlsClock,
    credentials: &Credentials,
) -> Result<ClientConfig, TransportError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TransportError::Config {
            file: TlsFile::Ca,
            path: paths.ca.clone(),
            error,
        })?;
    let builder = match crl {
        None => builder.with_root_certificates(roots),
        Some(path) => {
            let crls = pem::crls(path)?;
            // (the broker's certificate is checked against them as a client's is on the
            // broker, so a CA bundle needs what it needs there, and only the first CRL of
            // a CA would count)
            crate::server::check_one_crl_per_ca(path, &crls.versions)?;
            crate::server::check_crls_cover_cas(paths, path, &crls)?;
            let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
                .with_crls(crls.ders)
                .build()
                .map_err(|error| TransportError::Verifier {
                    file: TlsFile::Crl,
                    path: path.to_owned(),
                    error,
                })?;
            builder.with_webpki_verifier(verifier)
        }
    };
    let mut config = builder
        .with_client_auth_cert(credentials.chain.clone(), credentials.key.clone_key())
        .map_err(|error| certified_key_error(paths, error))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.time_provider = clock.provider();
    if crl.is_some() {
        // a resumed session skips the server certificate's check, and so the CRL
        config.resumption = Resumption::disabled();
    }
    Ok(config)
}

/// The certificate chain and key a client presents, as read from its files.
struct Credentials {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The first of `chain`.
    leaf: CertificateDer<'static>,
}

/// The client config of a channel, built again when one of its files changes.
///
/// A long-running client (a node) thus takes up, at its next connection and without a
/// restart, a renewed certificate and key, a CA bundle of a rollover, and a new CRL. A
/// change that cannot be used (a file half-copied or unreadable, a key that is not the
/// certificate's, a certificate of another identity, or one not valid yet by more than
/// [`trmx_certs::NOT_VALID_YET_WARN`]) is logged once, and the files read before stay in
/// force until the files change again, or, for a certificate not valid yet, until it is
/// within those minutes of valid by this client's clock: it is then taken up without the
/// files changing (nobody would touch them again to have it read).
struct ClientTls {
    paths: TlsPaths,
    crl: Option<PathBuf>,
    /// The time the server's certificate is checked at.
    clock: TlsClock,
    /// The identity of the certificate loaded first (`None`: it carries no trmx
    /// identity): a changed certificate must carry the same one, since whoever reads
    /// this client's traffic (a node's store) belongs to that identity.
    identity: Option<Identity>,
    current: Mutex<Current>,
    /// The server's certificate as the last handshake of a connection of these files
    /// (of any channel made from them) verified it (`None`: none yet, or not a trmx
    /// certificate).
    server: Mutex<Option<CertInfo>>,
}

struct Current {
    /// The stamps of the files when they were last read, whether that worked or not.
    read: Stamps,
    config: Arc<ClientConfig>,
    /// The certificate `config` presents (`None`: not a trmx certificate).
    presented: Option<CertInfo>,
    /// The same, as presented, with its key.
    credentials: Arc<Credentials>,
    /// Why the files as they were last read are not in force.
    refused: Option<String>,
    /// When to read the files again though they did not change: they hold a certificate
    /// refused as not valid yet, which the same files make acceptable at this time.
    retry_at: Option<SystemTime>,
}

/// The stamps of the CA, certificate, key and CRL files (`None`: cannot be read).
type Stamps = [Option<Stamp>; 4];

impl ClientTls {
    fn load(paths: &TlsPaths, crl: Option<&Path>, clock: TlsClock) -> Result<Self, TransportError> {
        let read = stamps(paths, crl);
        let (config, credentials) = build(paths, crl, &clock)?;
        Ok(Self {
            paths: paths.clone(),
            crl: crl.map(Path::to_owned),
            clock,
            identity: Identity::from_der(&credentials.leaf).ok(),
            current: Mutex::new(Current {
                read,
                config: Arc::new(config),
                presented: CertInfo::from_der(&credentials.leaf).ok(),
                credentials,
                refused: None,
                retry_at: None,
            }),
            server: Mutex::new(None),
        })
    }

    /// The config for a new connection: with the files as they are now.
    #[cfg(test)]
    fn config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.current().config)
    }

    /// The certificate a new connection presents, and its config, with the files as
    /// they are now: the files' certificate, or the one `held` holds (with the CA and CRL
    /// files as they are now).
    fn for_connection(&self, held: &Mutex<Option<Held>>) -> Opened {
        let current = self.current();
        let mut held = held.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(held) = held.as_mut() else {
            return Opened {
                credentials: Arc::clone(&current.credentials),
                info: current.presented.clone(),
                config: Arc::clone(&current.config),
            };
        };
        let read = [current.read[0], current.read[3]];
        drop(current);
        if held.read != Some(read) {
            held.read = Some(read);
            match build_presenting(
                &self.paths,
                self.crl.as_deref(),
                &self.clock,
                &held.opened.credentials,
            ) {
                Ok(config) => held.opened.config = Arc::new(config),
                Err(error) => tracing::warn!(
                    %error,
                    "the CA or CRL file changed but cannot be used: connecting with the \
                     ones read before until they change again"
                ),
            }
        }
        held.opened.clone()
    }

    /// The state with the files as they are now (read again if they changed).
    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        // (read outside the lock: a connection or a status waits for a rebuild only)
        let now = stamps(&self.paths, self.crl.as_deref());
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let due = current.retry_at.is_some_and(|at| self.clock.now() >= at);
        if now != current.read || due {
            current.read = now;
            current.retry_at = None;
            match self.rebuild() {
                Ok((config, credentials, presented)) => {
                    current.config = Arc::new(config);
                    current.presented = presented;
                    current.credentials = credentials;
                    current.refused = None;
                }
                Err((why, retry_at)) => {
                    current.refused = Some(why);
                    current.retry_at = retry_at;
                }
            }
        }
        current
    }

    /// A config from the files as they are now and the certificate it presents, or why
    /// they cannot be used (logged) and, for a certificate not valid yet, when the same
    /// files can be.
    #[allow(clippy::type_complexity)]
    fn rebuild(
        &self,
    ) -> Result<(ClientConfig, Arc<Credentials>, Option<CertInfo>), (String, Option<SystemTime>)>
    {
        let (config, credentials) = match build(&self.paths, self.crl.as_deref(), &self.clock) {
            Ok(built) => built,
            Err(error) => {
                tracing::warn!(
                    %error,
                    "the TLS files changed but cannot be used: connecting with the ones \
                     read before until they change again"
                );
                return Err((error.to_string(), None));
            }
        };
        let identity = Identity::from_der(&credentials.leaf).ok();
        if identity != self.identity {
            let name = |identity: &Option<Identity>| {
                identity
                    .as_ref()
                    .map_or_else(|| "no trmx identity".to_owned(), Identity::to_string)
            };
            let why = format!(
                "the certificate file {} holds a certificate of {}, not of {}",
                self.paths.cert.display(),
                name(&identity),
                name(&self.identity)
            );
            tracing::warn!(
                %why,
                "the certificate file now holds a certificate of another identity: not \
                 used, connecting with the one read before (restart with a matching \
                 configuration to change identity)"
            );
            return Err((why, None));
        }
        // (the start checked the first certificate by the same rule, see `run`)
        if let Err(error) = crate::server::check_own_not_valid_yet(
            &self.paths.cert,
            &credentials.leaf,
            self.clock.now(),
            "the broker",
        ) {
            // (read again once within the minutes the rule takes it up in)
            let retry_at = CertInfo::from_der(&credentials.leaf).ok().map(|info| {
                info.not_before
                    .checked_sub(trmx_certs::NOT_VALID_YET_WARN)
                    .unwrap_or(info.not_before)
            });
            tracing::warn!(
                %error,
                "the certificate file now holds a certificate not valid yet: not used, \
                 connecting with the one read before until it is valid here"
            );
            return Err((error.to_string(), retry_at));
        }
        let presented = CertInfo::from_der(&credentials.leaf).ok();
        match &presented {
            Some(info) => tracing::info!(
                cert = %self.paths.cert.display(),
                serial = %info.serial_hex,
                not_after = %trmx_certs::format_time(info.not_after),
                "the TLS files changed: new connections use them"
            ),
            None => tracing::info!("the TLS files changed: new connections use them"),
        }
        Ok((config, credentials, presented))
    }
}

/// The TLS files of a channel made by [`client_channel_with_tls`]: what its next
/// connection presents, for a status display, and what its connection opened last
/// presented. Clones are handles on the same channel.
#[derive(Clone)]
pub struct ChannelTls {
    tls: Arc<ClientTls>,
    dial: Arc<Dial>,
    /// The certificate the channel's connection opened last presented (`None`: none
    /// opened yet).
    opened: Arc<Mutex<Option<Opened>>>,
    /// The certificate the channel's connections present instead of the files' (`None`:
    /// the files'), see [`ChannelTls::hold`].
    held: Arc<Mutex<Option<Held>>>,
}

/// A certificate a channel goes on presenting at its next connections, whatever the
/// certificate and key files hold ([`ChannelTls::hold`]).
struct Held {
    /// The certificate, and the config that presents it.
    opened: Opened,
    /// The stamps of the CA and CRL files that config was built with (`None`: not built
    /// from them here; it is the config of the connection that presented the certificate).
    read: Option<[Option<Stamp>; 2]>,
    /// Whether the CRL file lists the certificate, with the stamps of the CA and CRL
    /// files it was found with (`None`: not looked yet), see [`ChannelTls::held_revoked`].
    revoked: Option<([Option<Stamp>; 2], bool)>,
}

/// Where and how a channel connects.
struct Dial {
    endpoint: Endpoint,
    server_name: ServerName<'static>,
    target: String,
}

/// A certificate a connection presents, and the config that presents it.
#[derive(Clone)]
struct Opened {
    credentials: Arc<Credentials>,
    /// (`None`: not a trmx certificate)
    info: Option<CertInfo>,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for ChannelTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelTls")
            .field("cert", &self.tls.paths.cert)
            .finish_non_exhaustive()
    }
}

/// What a channel's next connection presents ([`ChannelTls::status`]).
#[derive(Debug, Clone)]
pub struct ChannelTlsStatus {
    /// The certificate of the files (`None`: it carries no trmx identity), which the
    /// channel's next connection presents unless it is held (see `held`). The
    /// connection open now may still present the one before: see `outdated`.
    pub presented: Option<CertInfo>,
    /// Why the files as they are now are not used (they changed, and cannot be used):
    /// the certificate above is the one read before.
    pub refused: Option<String>,
    /// The certificate the channel's connection opened last presented (`None`: no
    /// connection opened yet, or no trmx identity in it).
    pub connected: Option<CertInfo>,
    /// Whether the channel's connection opened last presented another certificate than
    /// `presented`: an HTTP/2 connection lasts until it breaks, and goes on presenting
    /// the certificate it was opened with (to a broker that may revoke it). A client
    /// that must present the new one now moves to [`ChannelTls::new_channel`].
    pub outdated: bool,
    /// Whether the channel's next connections present the certificate its connection
    /// opened last presented, not `presented` ([`ChannelTls::hold`]).
    pub held: bool,
}

impl ChannelTls {
    /// The state with the files as they are now: they are read again (small files,
    /// synchronously) when they changed, as before a connection, so that a change that
    /// cannot be used is found now rather than at the next connection.
    pub fn status(&self) -> ChannelTlsStatus {
        let current = self.tls.current();
        let opened = self
            .opened
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let held = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        ChannelTlsStatus {
            presented: current.presented.clone(),
            refused: current.refused.clone(),
            outdated: opened
                .as_ref()
                .is_some_and(|o| o.credentials.leaf != current.credentials.leaf),
            connected: opened.and_then(|o| o.info),
            held,
        }
    }

    /// From now on, the channel's connections present the certificate (and key) its
    /// connection opened last presented, whatever the certificate and key files hold,
    /// until [`ChannelTls::release`]; the CA and CRL files are still read again when they
    /// change. For a client whose server refused the certificate the files hold now (a
    /// renewal of another CA, not yet valid, revoked): a connection that breaks is
    /// opened again with the certificate the server accepted, rather than with one it
    /// refuses. A channel made by [`ChannelTls::new_channel`] presents the files'.
    ///
    /// Returns whether a certificate is held: not before a connection has opened.
    pub fn hold(&self) -> bool {
        let opened = self
            .opened
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(opened) = opened else {
            return false;
        };
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held
            .as_ref()
            .is_none_or(|h| h.opened.credentials.leaf != opened.credentials.leaf)
        {
            *held = Some(Held {
                opened,
                read: None,
                revoked: None,
            });
        }
        true
    }

    /// The server's certificate as the last handshake verified it (of this channel's
    /// connections, or of another channel made from it by [`ChannelTls::new_channel`]):
    /// `None` before the first handshake, or when it is not a trmx certificate. For a
    /// client that warns of its end, as it does of its own certificate's.
    pub fn server_certificate(&self) -> Option<CertInfo> {
        self.tls
            .server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The certificate the channel holds ([`ChannelTls::hold`]) when the CRL file lists
    /// it (revoked by its CA): the server refuses it at its next handshake, or once it
    /// has that CRL too, and the client must get a certificate the server accepts before
    /// then. `None` when nothing is held, there is no CRL file, or it does not list the
    /// held certificate (or cannot be read: a CRL that cannot be used is said when the
    /// files are read). The CA and CRL files are read again when they changed, and the
    /// CRL is looked at then only; whatever the time, the certificate is checked at an
    /// instant of its validity, so an expired one is told revoked too.
    pub fn held_revoked(&self) -> Option<CertInfo> {
        let crl = self.tls.crl.as_deref()?;
        // (nothing to read while nothing is held, the usual case)
        if self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
        {
            return None;
        }
        let read = {
            let current = self.tls.current();
            [current.read[0], current.read[3]]
        };
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let held = held.as_mut()?;
        let revoked = match held.revoked {
            Some((at, revoked)) if at == read => revoked,
            _ => {
                let revoked = lists(&self.tls.paths, crl, &self.tls.clock, &held.opened);
                held.revoked = Some((read, revoked));
                revoked
            }
        };
        if revoked {
            held.opened.info.clone()
        } else {
            None
        }
    }

    /// Ends [`ChannelTls::hold`]: the channel's next connections present the files'
    /// certificate again.
    pub fn release(&self) {
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Another channel to the same address with the same TLS files (a certificate of
    /// another identity is still refused), with its own connection, and its handle.
    ///
    /// Moving to it is how a client presents a changed certificate at once: its new
    /// calls go to the new channel, whose first call connects with the files as they
    /// are then, and the old channel is dropped. The old connection ends when the calls
    /// still on it have (hyper closes an HTTP/2 connection whose handles are all
    /// dropped once its last stream ends): nothing in flight is cut off.
    pub fn new_channel(&self) -> (Channel, ChannelTls) {
        channel(&self.tls, &self.dial)
    }
}

/// Whether the CRLs of `crl` list the certificate of `opened` (as its server would find
/// it, trusting the CA of `paths`), at the time of `clock` brought within the
/// certificate's validity. `false` when a file cannot be read.
fn lists(paths: &TlsPaths, crl: &Path, clock: &TlsClock, opened: &Opened) -> bool {
    let (Ok(roots), Ok(crls)) = (pem::roots(&paths.ca), pem::crls(crl)) else {
        return false;
    };
    let Ok(verifier) =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
            .with_crls(crls.ders)
            .build()
    else {
        return false;
    };
    let mut at = clock.now();
    if let Some(info) = &opened.info {
        // (not `clamp`, which panics on a certificate whose validity ends before it
        // starts)
        at = at.min(info.not_after).max(info.not_before);
    }
    let at = rustls::pki_types::UnixTime::since_unix_epoch(
        at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default(),
    );
    let chain = &opened.credentials.chain;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return false;
    };
    matches!(
        verifier.verify_client_cert(leaf, intermediates, at),
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked
        ))
    )
}

/// A digest of a file's contents. The contents, not the time and size: a file fixed by a
/// `chmod`, or rewritten with the same length within one tick of a coarse clock, is a
/// change too. The files are small, and read before a connection and when a status is
/// asked for.
type Stamp = u64;

fn stamp(path: &Path) -> Option<Stamp> {
    use std::hash::{Hash as _, Hasher as _};
    let bytes = trmx_certs::pem::read_regular_file(path, "TLS").ok()?;
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

fn stamps(paths: &TlsPaths, crl: Option<&Path>) -> Stamps {
    [
        stamp(&paths.ca),
        stamp(&paths.cert),
        stamp(&paths.key),
        crl.and_then(stamp),
    ]
}

/// Whether a failed connection (given the causes of a tonic status or transport error)
/// failed because the server's certificate does not carry the name it was checked for
/// ([`ClientOptions::server_name`], by default the host of the address): the caller can
/// then say how to give the name.
pub fn server_name_mismatch(error: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::CertificateError as C;
    let mut current = Some(error);
    while let Some(error) = current {
        // tokio-rustls hands rustls' error over inside an I/O error
        let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        )) = tls
        {
            return true;
        }
        current = error.source();
    }
    false
}

/// The host part of `host:port`, `[v6]:port`; errors name the address.
fn host_of(addr: &str) -> Result<&str, TransportError> {
    let bad = |reason| TransportError::Address {
        addr: addr.to_owned(),
        reason,
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    port.parse::<u16>()
        .map_err(|_| bad("port is not a number 0-65535"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    Ok(host)
}

/// A tonic channel to `addr` (`"127.0.0.1:4443"`, `"broker.example:4443"`) over mutual TLS
/// 1.3 with the certificate of `paths`, checking the server certificate against the CA
/// (and the CRL of `opts.crl`, if any) for `opts.server_name` (default: the host part of
/// `addr`), at the time of `opts.clock`.
///
/// Connects lazily on first use and reconnects after a failure; nothing is dialled here.
pub fn client_channel(
    addr: &str,
    paths: &TlsPaths,
    opts: &ClientOptions,
) -> Result<Channel, TransportError> {
    client_channel_with_tls(addr, paths, opts).map(|(channel, _)| channel)
}

/// [`client_channel`], and a handle on its TLS files: which certificate its next
/// connection presents, whether a change of the files was refused, and whether its
/// connection presents an older certificate (then [`ChannelTls::new_channel`] moves on).
pub fn client_channel_with_tls(
    addr: &str,
    paths: &TlsPaths,
    opts: &ClientOptions,
) -> Result<(Channel, ChannelTls), TransportError> {
    let host = host_of(addr)?;
    let name = if opts.server_name.is_empty() {
        host.to_owned()
    } else {
        opts.server_name.clone()
    };
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| TransportError::ServerName { name })?;
    let tls = Arc::new(ClientTls::load(
        paths,
        opts.crl.as_deref(),
        opts.clock.clone(),
    )?);
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|error| TransportError::Endpoint {
            addr: addr.to_owned(),
            error,
        })?
        .connect_timeout(opts.connect_timeout)
        .http2_keep_alive_interval(opts.http2_keepalive)
        .keep_alive_while_idle(true);
    let endpoint = match opts.request_timeout {
        Some(limit) => endpoint.timeout(limit),
        None => endpoint,
    };
    let dial = Arc::new(Dial {
        endpoint,
        server_name,
        target: addr.to_owned(),
    });
    Ok(channel(&tls, &dial))
}

/// A lazily connecting channel with `tls` as `dial` says, and its handle.
fn channel(tls: &Arc<ClientTls>, dial: &Arc<Dial>) -> (Channel, ChannelTls) {
    let handle = ChannelTls {
        tls: Arc::clone(tls),
        dial: Arc::clone(dial),
        opened: Arc::new(Mutex::new(None)),
        held: Arc::new(Mutex::new(None)),
    };
    let tls = Arc::clone(tls);
    let server_name = dial.server_name.clone();
    let target = dial.target.clone();
    let opened = Arc::clone(&handle.opened);
    let held = Arc::clone(&handle.held);
    let connect = tower::service_fn(move |_: Uri| {
        let presented = tls.for_connection(&held);
        let connector = TlsConnector::from(Arc::clone(&presented.config));
        let server_name = server_name.clone();
        let target = target.clone();
        let opened = Arc::clone(&opened);
        let files = Arc::clone(&tls);
        async move {
            let tcp = TcpStream::connect(target.as_str()).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            // (verified by the handshake: the certificate the server presents now)
            let server = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(<[_]>::first)
                .and_then(|leaf| CertInfo::from_der(leaf).ok());
            *files.server.lock().unwrap_or_else(PoisonError::into_inner) = server;
            // In TLS 1.3 the server checks our certificate after our side of the
            // handshake is done. Wait for its first bytes (the HTTP/2 server preface,
            // sent at once): a refusal then arrives as its alert ("received fatal alert:
            // CertificateRevoked") instead of a broken pipe on the first request.
            let mut tls = tokio::io::BufReader::new(tls);
            if tls.fill_buf().await?.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection after the TLS handshake",
                ));
            }
            *opened.lock().unwrap_or_else(PoisonError::into_inner) = Some(presented);
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    (
        dial.endpoint.clone().connect_with_connector_lazy(connect),
        handle,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use trmx_certs::Federation;

    use super::{ClientOptions, ClientTls, Held, client_channel_with_tls, host_of};
    use crate::{TlsClock, TlsPaths};

    /// Whether two configs are the same one (not rebuilt in between).
    fn same(a: &Arc<rustls::ClientConfig>, b: &Arc<rustls::ClientConfig>) -> bool {
        Arc::ptr_eq(a, b)
    }

    #[test]
    fn changed_files_are_taken_up_unless_they_cannot_be_used() {
        let dir = tempfile::tempdir().unwrap();
        let fed = Federation::create(dir.path(), "trm.test").unwrap();
        let node = fed.participant("NL-NRM").unwrap();
        let other = fed.participant("DE-NRM").unwrap();
        let paths = TlsPaths {
            ca: fed.ca_cert_path(),
            cert: node.cert.clone(),
            key: node.key.clone(),
        };
        let crl = fed.crl_path();
        let tls = ClientTls::load(&paths, Some(&crl), TlsClock::system()).unwrap();
        let first = tls.config();
        assert!(same(&first, &tls.config()), "nothing changed: not rebuilt");

        // a renewal (new certificate and key) is taken up
        fed.ca.renew(&node, 30).unwrap();
        let renewed = tls.config();
        assert!(!same(&first, &renewed));

        // a certificate of another participant is not, though it is valid
        let cert = std::fs::read(&node.cert).unwrap();
        let key = std::fs::read(&node.key).unwrap();
        std::fs::copy(&other.cert, &node.cert).unwrap();
        std::fs::copy(&other.key, &node.key).unwrap();
        assert!(same(&renewed, &tls.config()));
        std::fs::write(&node.cert, &cert).unwrap();
        std::fs::write(&node.key, &key).unwrap();
        let back = tls.config();
        assert!(!same(&renewed, &back));

        // nor is a certificate whose key is not beside it yet (a copy half done), and the
        // status says so; once the key follows, the pair is taken up, even when it has
        // the same length and time as the wrong one (a `cp -p`, a coarse clock)
        let serial = |tls: &ClientTls| {
            let current = tls.current();
            current.presented.as_ref().unwrap().serial_hex.clone()
        };
        let before = serial(&tls);
        fed.ca.renew(&node, 30).unwrap();
        let new_key = std::fs::read(&node.key).unwrap();
        assert_eq!(new_key.len(), key.len());
        let stamped = std::fs::metadata(&node.key).unwrap().modified().unwrap();
        // (written with the time the renewal gave the key file)
        let write_stamped = |contents: &[u8]| {
            std::fs::write(&node.key, contents).unwrap();
            let file = std::fs::File::options()
                .write(true)
                .open(&node.key)
                .unwrap();
            file.set_modified(stamped).unwrap();
        };
        write_stamped(&key);
        assert!(same(&back, &tls.config()));
        assert_eq!(serial(&tls), before, "still the one read before");
        let refused = tls.current().refused.clone().unwrap();
        assert!(refused.contains("key"), "{refused}");
        write_stamped(&new_key);
        let again = tls.config();
        assert!(!same(&back, &again));
        assert!(same(&again, &tls.config()));
        assert_ne!(serial(&tls), before);
        assert!(tls.current().refused.is_none());

        // a new CRL too
        fed.ca
            .write_crl(std::time::Duration::from_secs(86_400))
            .unwrap();
        assert!(!same(&again, &tls.config()));
    }

    /// A renewed node certificate hours from valid (by this clock) was taken up at the
    /// next connection without a word, and the broker refused every handshake until
    /// then. It is not used now (the status says why, naming both clocks), as the node's
    /// start refuses one; minutes from valid, it is taken up.
    #[test]
    fn a_changed_certificate_not_valid_yet_beyond_minutes_is_not_taken_up() {
        let dir = tempfile::tempdir().unwrap();
        let fed = Federation::create(dir.path(), "trm.test").unwrap();
        let node = fed.participant("NL-NRM").unwrap();
        let paths = TlsPaths {
            ca: fed.ca_cert_path(),
            cert: node.cert.clone(),
            key: node.key.clone(),
        };
        let tls = ClientTls::load(&paths, Some(&fed.crl_path()), TlsClock::system()).unwrap();
        let first = tls.config();
        // (issued by a CA machine whose clock is ahead: its notBefore is 5 minutes before)
        let issue_ahead = |ahead: std::time::Duration| {
            let spec = trmx_certs::IssueSpec::participant("NL-NRM");
            let now = std::time::SystemTime::now();
            fed.ca.issue_at(&spec, &node, true, now + ahead).unwrap()
        };

        let info = issue_ahead(std::time::Duration::from_secs(2 * 3600));
        assert!(same(&first, &tls.config()), "taken up");
        let refused = tls.current().refused.clone().unwrap();
        for said in [
            &*node.cert.to_string_lossy(),
            &*info.serial_hex,
            &*format!(
                "it is not valid before {}, and this machine's clock says ",
                trmx_certs::format_time(info.not_before)
            ),
            "the broker would refuse it until",
            "the certificate in force stays",
        ] {
            assert!(refused.contains(said), "{said:?} not in {refused}");
        }

        let info = issue_ahead(std::time::Duration::from_secs(8 * 60));
        assert!(!same(&first, &tls.config()), "not taken up");
        assert!(tls.current().refused.is_none());
        let presented = tls.current().presented.clone().unwrap();
        assert_eq!(presented.serial_hex, info.serial_hex);
    }

    /// A changed certificate refused as not valid yet was read again only when the files
    /// changed again: nobody touches them once the renewal is in place, so the node
    /// presented the certificate before (until it expired) instead of taking the renewed
    /// one up once valid. It is taken up once its time comes by this client's clock.
    #[test]
    fn a_refused_certificate_not_valid_yet_is_taken_up_once_its_time_comes() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::time::{Duration, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let fed = Federation::create(dir.path(), "trm.test").unwrap();
        let node = fed.participant("NL-NRM").unwrap();
        let paths = TlsPaths {
            ca: fed.ca_cert_path(),
            cert: node.cert.clone(),
            key: node.key.clone(),
        };
        let ahead = Arc::new(AtomicU64::new(0));
        let clock = {
            let ahead = Arc::clone(&ahead);
            TlsClock::new(move || {
                SystemTime::now() + Duration::from_secs(ahead.load(Ordering::Relaxed))
            })
        };
        let tls = ClientTls::load(&paths, Some(&fed.crl_path()), clock).unwrap();
        let first = tls.config();
        let spec = trmx_certs::IssueSpec::participant("NL-NRM");
        let at = SystemTime::now() + Duration::from_secs(2 * 3600);
        let info = fed.ca.issue_at(&spec, &node, true, at).unwrap();
        assert!(same(&first, &tls.config()), "taken up hours early");
        assert!(tls.current().refused.is_some());

        // an hour on: still hours from valid, still refused
        ahead.store(3600, Ordering::Relaxed);
        assert!(same(&first, &tls.config()), "taken up an hour early");
        assert!(tls.current().refused.is_some());

        // valid now by this clock, the files unchanged
        ahead.store(2 * 3600, Ordering::Relaxed);
        assert!(!same(&first, &tls.config()), "not taken up once valid");
        let current = tls.current();
        assert_eq!(current.refused, None);
        assert_eq!(
            current.presented.as_ref().unwrap().serial_hex,
            info.serial_hex
        );
    }

    /// A held certificate is presented whatever the certificate and key files hold, with
    /// the CA and CRL files as they are, until released.
    #[test]
    fn a_held_certificate_is_presented_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let fed = Federation::create(dir.path(), "trm.test").unwrap();
        let node = fed.participant("NL-NRM").unwrap();
        let paths = TlsPaths {
            ca: fed.ca_cert_path(),
            cert: node.cert.clone(),
            key: node.key.clone(),
        };
        let tls = ClientTls::load(&paths, Some(&fed.crl_path()), TlsClock::system()).unwrap();
        let held = Mutex::new(None);
        let first = tls.for_connection(&held);
        *held.lock().unwrap() = Some(Held {
            opened: first.clone(),
            read: None,
            revoked: None,
        });

        fed.ca.renew(&node, 30).unwrap();
        let renewed = tls.config();
        assert!(!same(&first.config, &renewed), "the files are read");
        let next = tls.for_connection(&held);
        assert!(next.credentials.leaf == first.credentials.leaf, "not held");
        assert!(same(&next.config, &tls.for_connection(&held).config));
        // a new CRL is taken up, for the held certificate
        fed.ca
            .write_crl(std::time::Duration::from_secs(86_400))
            .unwrap();
        let crl = tls.for_connection(&held);
        assert!(!same(&next.config, &crl.config));
        assert!(crl.credentials.leaf == first.credentials.leaf);

        *held.lock().unwrap() = None;
        let released = tls.for_connection(&held);
        assert!(released.credentials.leaf != first.credentials.leaf);
        assert!(same(&released.config, &tls.config()));
    }

    /// The held certificate is told revoked once the CRL file lists it, and not before;
    /// nothing is told while nothing is held.
    #[tokio::test]
    async fn a_held_certificate_is_told_revoked_once_the_crl_lists_it() {
        let dir = tempfile::tempdir().unwrap();
        let fed = Federation::create(dir.path(), "trm.test").unwrap();
        let node = fed.participant("NL-NRM").unwrap();
        let paths = TlsPaths {
            ca: fed.ca_cert_path(),
            cert: node.cert.clone(),
            key: node.key.clone(),
        };
        let opts = ClientOptions {
            crl: Some(fed.crl_path()),
            ..ClientOptions::default()
        };
        let (_channel, handle) = client_channel_with_tls("127.0.0.1:1", &paths, &opts).unwrap();
        let first = handle.tls.for_connection(&handle.held);
        let serial = first.info.as_ref().unwrap().serial_hex.clone();
        // (as a connection that opened does)
        *handle.opened.lock().unwrap() = Some(first);
        fed.ca.revoke_serial_hex(&serial).unwrap();
        assert!(handle.held_revoked().is_none(), "nothing held");

        fed.ca.renew(&node, 30).unwrap();
        fed.ca
            .write_crl(std::time::Duration::from_secs(86_400))
            .unwrap();
        assert!(handle.hold());
        let told = handle.held_revoked().map(|info| info.serial_hex);
        assert_eq!(told, Some(serial.clone()));
        handle.release();
        assert!(handle.held_revoked().is_none(), "released");
    }

    /// A held certificate that has expired on the client's clock, and that the CRL lists,
    /// is told revoked; a CRL file that is missing or cannot be parsed tells nothing, and
    /// once it is back (its stamp changed) the revocation is found, not a stale answer.
    #[tokio::test]
    async fn an_expired_held_certificate_is_told_revoked_whatever_the_crl_went_through() {
        let dir = tempfile::tempdir().unwrap();
        let fed = Federation::create(dir.path(), "trm.test").unwrap();
        let node = fed.participant("NL-NRM").unwrap();
        let paths = TlsPaths {
            ca: fed.ca_cert_path(),
            cert: node.cert.clone(),
            key: node.key.clone(),
        };
        let later = std::sync::Arc::new(std::sync::Mutex::new(std::time::SystemTime::now()));
        let clock = {
            let later = later.clone();
            TlsClock::new(move || *later.lock().unwrap())
        };
        let opts = ClientOptions {
            crl: Some(fed.crl_path()),
            clock,
            ..ClientOptions::default()
        };
        let (_channel, handle) = client_channel_with_tls("127.0.0.1:1", &paths, &opts).unwrap();
        let first = handle.tls.for_connection(&handle.held);
        let info = first.info.clone().unwrap();
        *handle.opened.lock().unwrap() = Some(first);
        fed.ca.renew(&node, 30).unwrap();
        assert!(handle.hold());
        assert!(handle.held_revoked().is_none(), "not revoked yet");

        // the held certificate expires on the client's clock, and the CA revokes it
        *later.lock().unwrap() = info.not_after + std::time::Duration::from_secs(86_400);
        let good_crl = {
            fed.ca.revoke_serial_hex(&info.serial_hex).unwrap();
            std::fs::read(fed.crl_path()).unwrap()
        };
        let told = handle.held_revoked().map(|i| i.serial_hex);
        assert_eq!(told.as_deref(), Some(info.serial_hex.as_str()), "expired");

        // a CRL half-written, then gone: nothing told; back: told again
        std::fs::write(fed.crl_path(), &good_crl[..good_crl.len() / 2]).unwrap();
        assert!(handle.held_revoked().is_none(), "half a CRL");
        std::fs::remove_file(fed.crl_path()).unwrap();
        assert!(handle.held_revoked().is_none(), "no CRL");
        std::fs::write(fed.crl_path(), &good_crl).unwrap();
        let told = handle.held_revoked().map(|i| i.serial_hex);
        assert_eq!(told.as_deref(), Some(info.serial_hex.as_str()), "CRL back");
    }

    #[test]
    fn host_part_of_addresses() {
        assert_eq!(host_of("127.0.0.1:4443").unwrap(), "127.0.0.1");
        assert_eq!(host_of("broker.example:1").unwrap(), "broker.example");
        assert_eq!(host_of("[::1]:4443").unwrap(), "::1");
        assert!(host_of("nohost").is_err());
        assert!(host_of(":4443").is_err());
        assert!(host_of("h:99999").is_err());
    }
}
