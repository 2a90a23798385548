//! Issue 7 item 3: certificates the broker must refuse, each beside a
//! positive control (the very same client code with a good certificate
//! succeeds in the same test) and each leaving nothing stored: the good
//! client of the same participant finds no status for the refused id, and
//! the recipient's queue holds only the control message.
//!
//! TLS-level refusals are checked twice: a bare handshake tells the TLS
//! alert the broker refused with (so a test cannot pass because its own
//! setup is broken), and a gRPC `Submit` over the same config fails.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::ExtendedKeyUsagePurpose;
use rustls::{AlertDescription, ClientConfig};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use trmx_certs::{Ca, CaOptions, CertPaths, Federation, IssueSpec};
use trmx_node::RunningNode;
use trmx_node::core::SystemClock;
use trmx_proto::pb::exchange_client::ExchangeClient;
use trmx_proto::{Kind, pb};
use trmx_tests::adversary::{
    Handshake, TLS12_ONLY, TLS13_ONLY, client_tls, exchange_over, handshake, issue_with_usages,
};
use trmx_tests::federation::TRUST_DOMAIN;
use trmx_tests::harness::{
    Exchange, Harness, QUIET, WAIT, envelope, expect_quiet, json_request, next_item, node_status,
    outbox_entry, send, wait_delivered, wait_until,
};
use trmx_tests::story::EXAMPLES;
use trmx_transport::{ClientOptions, client_channel};

type TestResult = anyhow::Result<()>;

const NL: &str = "NL-NRM";
const BE: &str = "BE-PAYOKE";
/// The name the broker's certificate carries (DNS SAN).
const BROKER_NAME: &str = "localhost";

/// A running broker, the good client of NL-NRM, and BE-PAYOKE's queue.
struct Setup {
    h: Harness,
    /// NL-NRM's good client (the federation's certificate).
    good: Exchange,
    /// BE-PAYOKE's `Receive` stream: every refused submit would land here.
    queue: Streaming<pb::Delivery>,
}

async fn setup() -> anyhow::Result<Setup> {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let good = h.exchange(NL)?;
    let queue = h
        .exchange(BE)?
        .receive(pb::ReceiveRequest { max_in_flight: 16 })
        .await?
        .into_inner();
    Ok(Setup { h, good, queue })
}

impl Setup {
    /// NL-NRM's good certificate and key.
    fn good_identity(&self) -> CertPaths {
        let tls = self.h.tls(NL);
        CertPaths {
            cert: tls.cert,
            key: tls.key,
        }
    }

    /// A client config trusting the federation CA with `identity`, TLS 1.3.
    fn config(&self, identity: Option<&CertPaths>) -> anyhow::Result<ClientConfig> {
        client_tls(&self.h.federation.pki.ca_cert_path(), identity, TLS13_ONLY)
    }

    /// A certificate for NL-NRM at `<dir>/<name>/NL-NRM`, from the
    /// federation CA, issued as if "now" were `issued_at`.
    fn issue_nl_at(
        &self,
        name: &str,
        issued_at: SystemTime,
        validity_days: u32,
    ) -> anyhow::Result<CertPaths> {
        let out = CertPaths::from_prefix(&self.h.dir().join(name).join(NL));
        let spec = IssueSpec {
            validity_days,
            ..IssueSpec::participant(NL)
        };
        self.h
            .federation
            .pki
            .ca
            .issue_at(&spec, &out, true, issued_at)?;
        Ok(out)
    }

    /// The refused attempt changed nothing: NL-NRM's good client finds no
    /// status for `id`.
    async fn assert_not_stored(&mut self, id: &str) -> TestResult {
        let status = self
            .good
            .get_status(pb::GetStatusRequest {
                message_id: id.to_owned(),
            })
            .await;
        match status {
            Err(status) if status.code() == Code::NotFound => Ok(()),
            other => anyhow::bail!("refused message {id} has a status: {other:?}"),
        }
    }

    /// Positive control: `client` submits a referral to BE-PAYOKE, and it is
    /// the one and only message in BE-PAYOKE's queue.
    async fn assert_control_delivers(&mut self, mut client: Exchange) -> TestResult {
        let (id, result) = submit(&mut client).await;
        let receipt = result.map_err(|s| anyhow::anyhow!("control refused: {s}"))?;
        assert_eq!(receipt.message_id, id);
        assert!(!receipt.duplicate);
        let delivery = next_item(&mut self.queue).await?;
        assert_eq!(delivery.envelope.map(|e| e.message_id), Some(id));
        expect_quiet(&mut self.queue).await
    }

    /// A config refused at the handshake with `alert`, its `Submit` failing
    /// and storing nothing; then `control` (same code, good certificate)
    /// accepted and delivering.
    async fn assert_refused_at_handshake(
        &mut self,
        bad: ClientConfig,
        alert: AlertDescription,
        control: ClientConfig,
    ) -> TestResult {
        let addr = self.h.broker_addr();
        match handshake(addr, bad.clone(), BROKER_NAME).await? {
            Handshake::Refused { alert: Some(a), .. } if a == alert => {}
            other => anyhow::bail!("expected a refusal with {alert:?}, got {other:?}"),
        }
        let (id, result) = submit(&mut exchange_over(addr, bad, BROKER_NAME)?).await;
        assert_transport_failure(result, "refused certificate")?;
        self.assert_not_stored(&id).await?;
        expect_quiet(&mut self.queue).await?;

        assert_eq!(
            handshake(addr, control.clone(), BROKER_NAME).await?,
            Handshake::Accepted
        );
        self.assert_control_delivers(exchange_over(addr, control, BROKER_NAME)?)
            .await
    }
}

/// Submits a fresh referral to BE-PAYOKE; returns its id and the outcome.
async fn submit(client: &mut Exchange) -> (String, Result<pb::SubmitReceipt, Status>) {
    let env = envelope(BE, Kind::Referral, b"opaque referral body".to_vec());
    let id = env.message_id.clone();
    let result = client
        .submit(pb::SubmitRequest {
            envelope: Some(env),
        })
        .await
        .map(tonic::Response::into_inner);
    (id, result)
}

/// A call that never reached the service: the connection failed. The code
/// is made by the tonic client, not by the broker, and depends on when the
/// refusal arrives: a TLS 1.3 server judges the client certificate after the
/// client's side of the handshake is done, so the client sees the alert on
/// its first HTTP/2 read (`UNKNOWN` "transport error", or `CANCELLED` when
/// the connection closed first) rather than at connect (`UNAVAILABLE`).
fn assert_transport_failure<T: std::fmt::Debug>(
    result: Result<T, Status>,
    what: &str,
) -> TestResult {
    match result {
        Err(status)
            if matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ) && std::error::Error::source(&status).is_some() =>
        {
            Ok(())
        }
        other => anyhow::bail!("{what}: expected a transport failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() -> TestResult {
    let mut s = setup().await?;
    let bad = s.config(None)?;
    let control = s.config(Some(&s.good_identity()))?;
    s.assert_refused_at_handshake(bad, AlertDescription::CertificateRequired, control)
        .await?;
    s.h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_with_the_same_identity_is_refused() -> TestResult {
    let mut s = setup().await?;
    // Two other CAs of the same trust domain issue NL-NRM's very SPIFFE id:
    // one that copies the federation CA's name, one with a name of its own.
    let root = s.h.dir().to_owned();
    let (lookalike, rogue) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let lookalike = Federation::create(&root.join("lookalike"), TRUST_DOMAIN)?;
        let rogue = Ca::init(
            &root.join("rogue").join("ca"),
            &CaOptions::new(TRUST_DOMAIN, "Rogue CA"),
        )?;
        let rogue_nl = CertPaths::from_prefix(&root.join("rogue").join(NL));
        rogue.issue(&IssueSpec::participant(NL), &rogue_nl, false)?;
        Ok((lookalike.participant(NL)?, rogue_nl))
    })
    .await??;
    for paths in [&lookalike, &rogue] {
        let info = trmx_certs::CertInfo::from_pem_file(&paths.cert)?;
        assert_eq!(info.identity.participant(), Some(NL));
    }

    let control = s.config(Some(&s.good_identity()))?;
    // The look-alike's issuer name matches the federation CA, so the
    // broker tries the federation CA's key and the signature fails.
    s.assert_refused_at_handshake(
        s.config(Some(&lookalike))?,
        AlertDescription::DecryptError,
        control.clone(),
    )
    .await?;
    s.assert_refused_at_handshake(
        s.config(Some(&rogue))?,
        AlertDescription::UnknownCA,
        control,
    )
    .await?;
    s.h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused() -> TestResult {
    let mut s = setup().await?;
    let day = Duration::from_secs(24 * 3600);
    let expired = s.issue_nl_at("expired", SystemTime::now() - 40 * day, 30)?;
    let info = trmx_certs::CertInfo::from_pem_file(&expired.cert)?;
    assert!(info.not_after < SystemTime::now());

    let bad = s.config(Some(&expired))?;
    let control = s.config(Some(&s.good_identity()))?;
    s.assert_refused_at_handshake(bad, AlertDescription::CertificateExpired, control)
        .await?;
    s.h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_not_yet_valid_is_refused() -> TestResult {
    let mut s = setup().await?;
    let day = Duration::from_secs(24 * 3600);
    let early = s.issue_nl_at("early", SystemTime::now() + 2 * day, 30)?;
    let info = trmx_certs::CertInfo::from_pem_file(&early.cert)?;
    assert!(info.not_before > SystemTime::now());

    let bad = s.config(Some(&early))?;
    let control = s.config(Some(&s.good_identity()))?;
    // rustls reports "not valid yet" with the same alert as "expired".
    s.assert_refused_at_handshake(bad, AlertDescription::CertificateExpired, control)
        .await?;
    s.h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_while_connected_is_refused_on_the_same_client() -> TestResult {
    let mut s = setup().await?;
    // A second certificate of NL-NRM (its own serial) that gets revoked;
    // the good one stays valid for the control.
    let doomed = s.issue_nl_at("doomed", SystemTime::now(), 30)?;
    let addr = s.h.broker_addr();
    let mut client = exchange_over(addr, s.config(Some(&doomed))?, BROKER_NAME)?;
    // It works before the revocation (a call that stores nothing).
    let info = client.get_info(pb::GetInfoRequest {}).await?.into_inner();
    assert_eq!(info.caller, NL);

    s.h.federation.pki.revoke(&doomed)?;
    let report = s.h.reload_broker_tls()?;
    assert!(report.closed_connections >= 1, "{report:?}");

    // The same client object (its connection closed, a reconnect refused).
    let (id, result) = submit(&mut client).await;
    assert_transport_failure(result, "revoked certificate")?;
    s.assert_not_stored(&id).await?;
    expect_quiet(&mut s.queue).await?;
    match handshake(addr, s.config(Some(&doomed))?, BROKER_NAME).await? {
        Handshake::Refused {
            alert: Some(AlertDescription::CertificateRevoked),
            ..
        } => {}
        other => anyhow::bail!("revoked certificate: {other:?}"),
    }

    let control = exchange_over(addr, s.config(Some(&s.good_identity()))?, BROKER_NAME)?;
    s.assert_control_delivers(control).await?;
    s.h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_the_client_auth_usage_is_refused() -> TestResult {
    let mut s = setup().await?;
    // Signed by the federation CA itself, right identity, serverAuth only.
    let ca_dir = s.h.federation.pki.dir.join("ca");
    let server_only = issue_with_usages(
        &ca_dir,
        TRUST_DOMAIN,
        NL,
        vec![ExtendedKeyUsagePurpose::ServerAuth],
        &s.h.dir().join("server-only"),
    )?;
    // The control is made by the same code with clientAuth: only the usage differs.
    let client_auth = issue_with_usages(
        &ca_dir,
        TRUST_DOMAIN,
        NL,
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        &s.h.dir().join("client-auth"),
    )?;
    let bad = s.config(Some(&server_only))?;
    let control = s.config(Some(&client_auth))?;
    s.assert_refused_at_handshake(bad, AlertDescription::UnsupportedCertificate, control)
        .await?;
    s.h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_1_2_only_client_is_refused() -> TestResult {
    let mut s = setup().await?;
    let ca = s.h.federation.pki.ca_cert_path();
    let good = s.good_identity();
    let bad = client_tls(&ca, Some(&good), TLS12_ONLY)?;
    let control = client_tls(&ca, Some(&good), TLS13_ONLY)?;
    s.assert_refused_at_handshake(bad, AlertDescription::ProtocolVersion, control)
        .await?;
    s.h.shutdown().await
}

/// Every `Exchange` call of `client` is PERMISSION_DENIED — including the
/// ones naming `victim`, a message of NL-NRM waiting for BE-PAYOKE, which
/// is left exactly as it was.
async fn assert_every_exchange_call_denied(
    s: &mut Setup,
    client: &mut Exchange,
    victim: &str,
) -> TestResult {
    let denied = |what: &str, result: Result<(), Status>| -> TestResult {
        match result {
            Err(status) if status.code() == Code::PermissionDenied => Ok(()),
            other => anyhow::bail!("{what}: expected PERMISSION_DENIED, got {other:?}"),
        }
    };
    let (id, result) = submit(client).await;
    denied("submit", result.map(drop))?;
    s.assert_not_stored(&id).await?;
    let id = victim.to_owned();
    denied(
        "receive",
        client
            .receive(pb::ReceiveRequest { max_in_flight: 1 })
            .await
            .map(drop),
    )?;
    denied(
        "ack",
        client
            .ack(pb::AckRequest {
                message_ids: vec![id.clone()],
            })
            .await
            .map(drop),
    )?;
    denied(
        "reject",
        client
            .reject(pb::RejectRequest {
                message_id: id.clone(),
                reason_code: "INVALID_BODY".into(),
                field_path: "payload".into(),
            })
            .await
            .map(drop),
    )?;
    denied(
        "withdraw",
        client
            .withdraw(pb::WithdrawRequest {
                message_id: id.clone(),
            })
            .await
            .map(drop),
    )?;
    denied(
        "get_status",
        client
            .get_status(pb::GetStatusRequest {
                message_id: id.clone(),
            })
            .await
            .map(drop),
    )?;
    denied(
        "get_info",
        client.get_info(pb::GetInfoRequest {}).await.map(drop),
    )?;
    Ok(())
}

/// A certificate that passes TLS but names no participant of the registry:
/// denied on every call, the victim message untouched and delivered; the
/// control (same code, NL-NRM's certificate) submits and is delivered.
async fn assert_denied_identity(mut s: Setup, identity: CertPaths) -> TestResult {
    let addr = s.h.broker_addr();
    // A message of NL-NRM waiting for BE-PAYOKE (its queue's stream is
    // ours, so it sits in flight there, unacknowledged).
    let (victim, result) = submit(&mut s.good.clone()).await;
    result?;
    let delivery = next_item(&mut s.queue).await?;
    assert_eq!(
        delivery.envelope.map(|e| e.message_id),
        Some(victim.clone())
    );

    assert_eq!(
        handshake(addr, s.config(Some(&identity))?, BROKER_NAME).await?,
        Handshake::Accepted
    );
    let mut client = exchange_over(addr, s.config(Some(&identity))?, BROKER_NAME)?;
    assert_every_exchange_call_denied(&mut s, &mut client, &victim).await?;

    // The victim is still in flight to BE-PAYOKE, not acknowledged,
    // withdrawn or rejected.
    let status = s
        .good
        .get_status(pb::GetStatusRequest {
            message_id: victim.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(
        status.state,
        pb::MessageState::InFlight as i32,
        "{status:?}"
    );
    expect_quiet(&mut s.queue).await?;

    let control = exchange_over(addr, s.config(Some(&s.good_identity()))?, BROKER_NAME)?;
    s.assert_control_delivers(control).await?;
    s.h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_certificate_is_denied_every_exchange_call() -> TestResult {
    let s = setup().await?;
    let operator = s.h.federation.pki.operator("alice")?;
    assert_denied_identity(s, operator).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_not_in_the_registry_is_denied_every_exchange_call() -> TestResult {
    let s = setup().await?;
    // Issued by the federation CA, but the broker's registry does not list it.
    let stranger = s.h.federation.pki.participant("FR-OFII")?;
    assert_denied_identity(s, stranger).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_of_another_trust_domain_is_denied_every_exchange_call() -> TestResult {
    let s = setup().await?;
    // Signed by the federation CA (as a CA shared by two federations would),
    // for a registry participant's id, but in another trust domain.
    let foreign = issue_with_usages(
        &s.h.federation.pki.dir.join("ca"),
        "other-federation.example",
        NL,
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        &s.h.dir().join("foreign"),
    )?;
    assert_denied_identity(s, foreign).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_used_as_a_client_is_denied_every_exchange_call() -> TestResult {
    let s = setup().await?;
    // The broker's own certificate (it carries clientAuth too).
    let broker = s.h.federation.broker_cert.clone();
    assert_denied_identity(s, broker).await
}

/// The node's own channel code (`trmx_transport::client_channel`) to the broker.
fn node_channel(s: &Setup, server_name: &str) -> anyhow::Result<Channel> {
    node_channel_with(
        s,
        &ClientOptions {
            server_name: server_name.to_owned(),
            ..ClientOptions::default()
        },
    )
}

/// NL-NRM's channel to the broker with `options`.
fn node_channel_with(s: &Setup, options: &ClientOptions) -> anyhow::Result<Channel> {
    Ok(client_channel(
        &s.h.broker_addr().to_string(),
        &s.h.tls(NL),
        options,
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_for_another_name_is_refused_by_the_node_side() -> TestResult {
    let mut s = setup().await?;
    let addr = s.h.broker_addr();
    // Our side refuses: no alert from the broker, a local certificate error.
    match handshake(
        addr,
        s.config(Some(&s.good_identity()))?,
        "broker.elsewhere.example",
    )
    .await?
    {
        Handshake::Refused { alert: None, error } => {
            assert!(error.contains("certificate"), "{error}");
        }
        other => anyhow::bail!("a wrong server name was accepted: {other:?}"),
    }
    let mut wrong = ExchangeClient::new(node_channel(&s, "broker.elsewhere.example")?);
    let (id, result) = submit(&mut wrong).await;
    assert_transport_failure(result, "wrong server name")?;
    s.assert_not_stored(&id).await?;
    expect_quiet(&mut s.queue).await?;

    let control = ExchangeClient::new(node_channel(&s, BROKER_NAME)?);
    s.assert_control_delivers(control).await?;
    s.h.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_expecting_another_broker_name_submits_nothing_until_configured_right() -> TestResult
{
    let mut s = setup().await?;
    // NL-NRM's node daemon, configured with a name the broker's
    // certificate does not carry.
    let mut config = s.h.node_config(NL)?;
    config.broker.server_name = "broker.elsewhere.example".into();
    let node = RunningNode::start(&config, Arc::new(SystemClock)).await?;
    let mut api = trmx_node::connect_local(node.socket_path()).await?;
    let sent = send(
        &mut api,
        json_request("k-1", BE, Kind::Referral, EXAMPLES[0]),
    )
    .await?;
    let status = wait_until(WAIT, "the node to report the TLS failure", || {
        let mut api = api.clone();
        async move {
            let status = node_status(&mut api).await?;
            Ok((!status.last_broker_error.is_empty()).then_some(status))
        }
    })
    .await?;
    assert!(!status.broker_connected, "{status:?}");
    tokio::time::sleep(QUIET).await;
    let entry = outbox_entry(&mut api, &sent.message_id).await?.unwrap();
    assert_eq!(entry.state, pb::OutboxState::Queued as i32, "{entry:?}");
    s.assert_not_stored(&sent.message_id).await?;
    expect_quiet(&mut s.queue).await?;
    node.stop().await?;

    // Control: the same node (same data dir, same outbox) with the right name.
    let config = s.h.node_config(NL)?;
    let node = RunningNode::start(&config, Arc::new(SystemClock)).await?;
    let api = trmx_node::connect_local(node.socket_path()).await?;
    let delivery = next_item(&mut s.queue).await?;
    assert_eq!(
        delivery.envelope.as_ref().map(|e| e.message_id.clone()),
        Some(sent.message_id.clone())
    );
    // Acknowledge as BE-PAYOKE so that the node sees the delivery receipt.
    s.h.exchange(BE)?
        .ack(pb::AckRequest {
            message_ids: vec![sent.message_id.clone()],
        })
        .await?;
    wait_delivered(&api, &sent.message_id).await?;
    node.stop().await?;
    s.h.shutdown().await
}

/// A node that reads the federation's CRL refuses a broker certificate the
/// CRL lists: a leaked broker key, once revoked, cannot pose as the broker.
/// The CRL is read again when it changes, also by a channel made before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_broker_certificate_is_refused_by_a_node_that_reads_the_crl() -> TestResult {
    let mut s = setup().await?;
    let crl_channel = |s: &Setup| {
        node_channel_with(
            s,
            &ClientOptions {
                server_name: BROKER_NAME.to_owned(),
                crl: Some(s.h.federation.pki.crl_path()),
                ..ClientOptions::default()
            },
        )
    };
    // Control: the CRL lists nothing of the broker's yet.
    let before = ExchangeClient::new(crl_channel(&s)?);
    s.assert_control_delivers(before).await?;
    // Made now, first connected after the revocation.
    let mut made_before = ExchangeClient::new(crl_channel(&s)?);

    s.h.federation
        .pki
        .revoke(&s.h.federation.broker_cert.clone())?;
    let mut fresh = ExchangeClient::new(crl_channel(&s)?);
    for client in [&mut made_before, &mut fresh] {
        let (id, result) = submit(client).await;
        assert_transport_failure(result, "revoked broker certificate")?;
        s.assert_not_stored(&id).await?;
    }
    expect_quiet(&mut s.queue).await?;
    s.h.shutdown().await
}

/// Certificates issued to the organisations' own keys (certificate requests, the key never
/// at the CA) work end to end: NL-NRM's from `trmx-certs request` (ECDSA P-256), BE-PAYOKE's
/// from an Ed25519 request made elsewhere. A referral goes from one node to the other
/// through the broker and is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_certificates_issued_to_their_own_requests_exchange_messages() -> TestResult {
    let mut h = Harness::new().await?;
    let ca = &h.federation.pki.ca;
    // NL-NRM: the request command's key and request (in place of the pair the harness
    // issued, which `request` would not replace while its certificate is valid)
    let nl = CertPaths::from_prefix(&h.federation.pki.dir.join(NL));
    std::fs::remove_file(&nl.key)?;
    let nl_request = trmx_certs::CertRequest::create(
        NL,
        &trmx_certs::RequestPaths {
            key: nl.key.clone(),
            request: nl.cert.with_extension("csr"),
        },
        true,
    )?;
    ca.issue_for_request(&IssueSpec::participant(NL), &nl_request, &nl.cert, true)?;
    // BE-PAYOKE: an Ed25519 key and request from another tool
    let be = CertPaths::from_prefix(&h.federation.pki.dir.join(BE));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let csr = be.cert.with_extension("csr");
    std::fs::write(
        &csr,
        rcgen::CertificateParams::default()
            .serialize_request(&key)?
            .pem()?,
    )?;
    std::fs::write(&be.key, key.serialize_pem())?;
    std::fs::set_permissions(&be.key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let be_request = trmx_certs::CertRequest::from_pem_file(&csr)?;
    ca.issue_for_request(&IssueSpec::participant(BE), &be_request, &be.cert, true)?;

    h.start_broker().await?;
    let mut nl_api = h.start_node(NL).await?;
    let _be_api = h.start_node(BE).await?;
    let sent = send(
        &mut nl_api,
        json_request("csr-1", BE, Kind::Referral, EXAMPLES[0]),
    )
    .await?;
    wait_delivered(&nl_api, &sent.message_id).await?;
    h.shutdown().await
}

/// A node's certificate renewed in place needs no restart: `trmx-node status` shows the
/// renewed certificate at once, and once the broker revokes the old serial (closing the
/// node's connection), the node connects again with the renewed files and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_renewed_in_place_carries_on_without_a_restart() -> TestResult {
    let mut h = Harness::new().await?;
    h.start_broker().await?;
    let mut nl_api = h.start_node(NL).await?;
    let _be_api = h.start_node(BE).await?;
    let first = send(
        &mut nl_api,
        json_request("renew-1", BE, Kind::Referral, EXAMPLES[0]),
    )
    .await?;
    wait_delivered(&nl_api, &first.message_id).await?;

    let nl = CertPaths::from_prefix(&h.federation.pki.dir.join(NL));
    let renewal = h.federation.pki.ca.renew(&nl, 365)?;
    let status = node_status(&mut nl_api).await?;
    assert_eq!(status.certificate_serial, renewal.new.serial_hex);
    assert_eq!(status.certificate_refused, "");

    h.federation
        .pki
        .ca
        .revoke_serial_hex(&renewal.old.serial_hex)?;
    let report = h.reload_broker_tls()?;
    assert!(
        report
            .closed
            .iter()
            .any(|c| c.starts_with("participant NL-NRM")),
        "{report:?}"
    );
    let second = send(
        &mut nl_api,
        json_request("renew-2", BE, Kind::Referral, EXAMPLES[0]),
    )
    .await?;
    wait_delivered(&nl_api, &second.message_id).await?;
    h.shutdown().await
}
