//! A certificate that connects is refused after it is revoked and the CRL is
//! reloaded, and its open `Receive` stream is closed.

use anyhow::Context as _;
use tonic::Code;

use crate::harness::*;

#[tokio::test]
async fn a_revoked_certificate_is_refused_and_its_stream_closed() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let mut be = t.client("BE-PAYOKE")?;
    let mut nl = t.client("NL-NRM")?;
    let mut stream = receive(&mut be, 0).await?;
    submit(&mut nl, referral("BE-PAYOKE")).await?;
    next(&mut stream).await?;

    let be_cert = trmx_certs::CertPaths::for_cert(&t.pki.participant("BE-PAYOKE")?.cert);
    t.pki.federation.revoke(&be_cert)?;
    let report = t.broker.reload_tls()?;
    assert!(report.closed_connections >= 1, "{report:?}");
    // the report (and its log line) names whose connections were closed
    assert_eq!(report.closed.len(), report.closed_connections, "{report:?}");
    assert!(
        report
            .closed
            .iter()
            .all(|c| c == "participant BE-PAYOKE from 127.0.0.1"),
        "{report:?}"
    );

    // The open stream ends.
    match tokio::time::timeout(WAIT, stream.message()).await {
        Ok(Ok(None)) | Ok(Err(_)) => {}
        other => anyhow::bail!("revoked stream still open: {other:?}"),
    }
    // New calls with the revoked certificate fail (the handshake is refused).
    let mut fresh = t.client("BE-PAYOKE")?;
    let refused = fresh.get_info(trmx_proto::pb::GetInfoRequest {}).await;
    let status = refused.expect_err("revoked certificate accepted");
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Internal
        ),
        "{status}"
    );
    // Others are unaffected.
    nl.get_info(trmx_proto::pb::GetInfoRequest {}).await?;
    Ok(())
}

/// Why a broker on `t`'s config does not start (tried once, without the harness's
/// retries); fails the test if it starts.
async fn refused_start(t: &TestBroker, what: &str) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let started = trmx_broker::Broker::builder(t.config.clone())
        .clock(t.clock.clone())
        .start(listener)
        .await;
    match started {
        Ok(mut broker) => {
            broker.shutdown().await?;
            anyhow::bail!("{what}: the broker started")
        }
        Err(error) => Ok(error.to_string()),
    }
}

/// The `crlNumber` of the (one) CRL in the file at `path`.
fn crl_number(path: &std::path::Path) -> anyhow::Result<String> {
    let crls = trmx_certs::load_crls_pem(path)?;
    let der = crls.first().context("no CRL")?;
    let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())?;
    Ok(crl.crl_number().context("no crlNumber")?.to_string())
}

/// Revokes the certificate of participant `id` (issued on first use): a new CRL.
fn revoke(t: &TestBroker, id: &str) -> anyhow::Result<()> {
    let cert = trmx_certs::CertPaths::for_cert(&t.pki.participant(id)?.cert);
    Ok(t.pki.federation.revoke(&cert)?)
}

/// A reload refused a CRL older than the one in force, but after a restart there was
/// nothing to compare with: a crl.pem restored from a backup was taken at start, and
/// un-revoked every certificate revoked since. The broker now records the newest CRL of
/// each CA in its data directory (at start and at every reload) and refuses an older one
/// at start too; the same CRL, or a newer one, starts.
#[tokio::test]
async fn a_crl_older_than_the_recorded_one_is_refused_at_start() -> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    let crl = t.pki.federation.crl_path();
    let record = t.config.data_dir.join(trmx_broker::CRL_RECORD_FILE);
    assert!(record.exists(), "the first start writes the record");
    let backup = t._dir.path().join("crl.pem.backup");
    std::fs::copy(&crl, &backup)?;
    // BE-PAYOKE is revoked, and the reload records the new CRL
    revoke(&t, "BE-PAYOKE")?;
    t.broker.reload_tls()?;
    let (old, new) = (crl_number(&backup)?, crl_number(&crl)?);
    let current = std::fs::read(&crl)?;
    t.broker.shutdown().await?;

    // the CRL from before the revocation comes back from the backup
    std::fs::copy(&backup, &crl)?;
    let refused = refused_start(&t, "an older CRL").await?;
    for part in [
        format!("crlNumber {old} < crlNumber {new}"),
        format!("recorded in {}", record.display()),
        crl.display().to_string(),
        format!("delete {}", record.display()),
        "tls.crl".to_owned(),
    ] {
        assert!(refused.contains(&part), "{part:?} in {refused}");
    }
    let checked = trmx_broker::check_config(&t.config).expect_err("an older CRL");
    assert_eq!(
        checked.to_string(),
        refused,
        "check-config says what the start says"
    );
    // a compaction of the store keeps the record
    trmx_broker::store::compact_offline(&t.config.data_dir, None)?;
    let after_compaction = refused_start(&t, "an older CRL after a compaction").await?;
    assert_eq!(after_compaction, refused);

    // the same CRL as before starts, and BE-PAYOKE is still refused
    std::fs::write(&crl, &current)?;
    t.restart().await?;
    let mut be = t.client("BE-PAYOKE")?;
    let answer = be.get_info(trmx_proto::pb::GetInfoRequest {}).await;
    assert!(answer.is_err(), "{answer:?}");
    // a newer one too, and the start records it
    revoke(&t, "INT-IOM")?;
    let newest = crl_number(&crl)?;
    t.restart().await?;
    t.broker.shutdown().await?;
    std::fs::write(&crl, &current)?;
    let refused = refused_start(&t, "an older CRL").await?;
    assert!(
        refused.contains(&format!("crlNumber {new} < crlNumber {newest}")),
        "{refused}"
    );

    // going back on purpose: without its record the broker takes the CRL it is given
    std::fs::remove_file(&record)?;
    t.restart().await?;
    assert!(record.exists(), "a new record");
    Ok(())
}

/// A record that does not parse must not count as no record (which would accept any CRL):
/// the start stops and names it. Deleted, the broker starts afresh.
#[tokio::test]
async fn a_damaged_crl_record_stops_the_start_naming_it() -> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    t.broker.shutdown().await?;
    let record = t.config.data_dir.join(trmx_broker::CRL_RECORD_FILE);
    let text = std::fs::read_to_string(&record)?;
    // cut short, as a disk that filled up might leave it
    std::fs::write(&record, &text[..text.len() / 2])?;
    let refused = refused_start(&t, "a damaged record").await?;
    for part in [
        format!("CRL record {} is damaged", record.display()),
        "delete it".to_owned(),
    ] {
        assert!(refused.contains(&part), "{part:?} in {refused}");
    }
    let checked = trmx_broker::check_config(&t.config).expect_err("a damaged record");
    assert_eq!(checked.to_string(), refused);

    std::fs::remove_file(&record)?;
    t.restart().await?;
    assert_eq!(
        std::fs::read_to_string(&record)?,
        text,
        "the same record again"
    );
    Ok(())
}

/// The `crl_number` of every CA in the CRL record at `path`, in its order.
fn recorded_numbers(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    json["crls"]
        .as_array()
        .context("no crls")?
        .iter()
        .map(|crl| {
            crl["crl_number"]
                .as_str()
                .map(str::to_owned)
                .context("no crl_number")
        })
        .collect()
}

/// An operator appends the CA's new CRL to tls.crl instead of replacing the file (`cat
/// crl.pem >> /etc/trmx/crl.pem`). The reload took the file and recorded the new CRL,
/// which was not even in force (webpki checks a certificate against the first CRL of its
/// issuer only); weeks later the next start refused the very file the broker ran with, as
/// "a copy restored from a backup?", and the broker stayed down. The reload refuses the
/// file, naming the CA and saying to keep its newest CRL only, and the CRL in force stays;
/// check-config and a start refuse it with the same words.
#[tokio::test]
async fn a_crl_file_with_two_crls_of_one_ca_is_refused_at_reload_and_at_start() -> anyhow::Result<()>
{
    let mut t = TestBroker::start().await?;
    let crl = t
        .config
        .tls
        .crl
        .clone()
        .context("the harness sets tls.crl")?;
    let record = t.config.data_dir.join(trmx_broker::CRL_RECORD_FILE);
    let before = std::fs::read(&crl)?;
    revoke(&t, "BE-PAYOKE")?;
    let new = std::fs::read(&crl)?;
    std::fs::write(&crl, [before.as_slice(), new.as_slice()].concat())?;

    let refused = t
        .broker
        .reload_tls()
        .expect_err("two CRLs of one CA")
        .to_string();
    for part in [
        format!("tls.crl: CRL {}: ", crl.display()),
        "two CRLs of CN=".to_owned(),
        "Keep only that CA's newest CRL".to_owned(),
    ] {
        assert!(refused.contains(&part), "{part:?} in {refused}");
    }
    assert_eq!(
        recorded_numbers(&record)?,
        ["1"],
        "the refused CRL recorded"
    );
    t.broker.shutdown().await?;
    let checked = trmx_broker::check_config(&t.config).expect_err("two CRLs of one CA");
    assert_eq!(checked.to_string(), refused);
    let started = refused_start(&t, "two CRLs of one CA").await?;
    assert_eq!(started, refused);

    // the newest CRL alone starts, and BE-PAYOKE is refused
    std::fs::write(&crl, &new)?;
    t.restart().await?;
    let answer = t
        .client("BE-PAYOKE")?
        .get_info(trmx_proto::pb::GetInfoRequest {})
        .await;
    assert!(answer.is_err(), "{answer:?}");
    Ok(())
}

/// Loads `config`'s TLS files with the CRL record in its data directory and saves the
/// record, as a broker's start does: what the broker that ran before left behind.
fn record_as_a_start_would(config: &trmx_broker::BrokerConfig) -> anyhow::Result<()> {
    let paths = trmx_transport::TlsPaths {
        ca: config.tls.ca.clone(),
        cert: config.tls.cert.clone(),
        key: config.tls.key.clone(),
    };
    let record =
        trmx_transport::CrlRecord::read(&config.data_dir.join(trmx_broker::CRL_RECORD_FILE))?;
    trmx_durable::private_dir(&config.data_dir)?;
    trmx_transport::ServerTls::load_with_record(
        &paths,
        config.tls.crl.as_deref(),
        trmx_transport::CrlPolicy::Warn,
        record,
    )?
    .save_crl_record()?;
    Ok(())
}

/// A start reads the CRL record and tls.crl before it holds the data directory (its
/// store's lock). A broker started while the previous one is still stopping (a
/// supervisor that overlaps restarts) waits for the lock while the old one takes a newer
/// CRL (BE-PAYOKE revoked) and records it: the new broker then served the older CRL,
/// letting BE-PAYOKE in until its next interval reload, against the record it now owned.
/// Once it holds the directory, the start reads the record again and refuses a CRL older
/// than it, with the words of a start refused at once, and keeps the newer record.
///
/// The interleaving is set up without timing: one poll runs the start through loading TLS
/// (which never waits) until it waits for its store to open on a blocking thread, and the
/// start goes on to save the record only when polled again, after the test wrote the
/// newer record. (Had the store opened, and its first read ended, before that poll looked,
/// the start would save within it: the test would then fail, never pass for nothing.)
#[tokio::test]
async fn a_start_refuses_a_crl_older_than_the_record_written_while_it_waited() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let config = test_config(dir.path().join("data"), pki.tls.clone());
    let clock = trmx_broker::clock::ManualClock::new(std::time::SystemTime::now());
    let record = config.data_dir.join(trmx_broker::CRL_RECORD_FILE);
    record_as_a_start_would(&config)?;
    assert_eq!(recorded_numbers(&record)?, ["1"]);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let start = trmx_broker::Broker::builder(config.clone())
        .clock(clock.clone())
        .start(listener);
    let mut start = std::pin::pin!(start);
    assert!(
        futures::poll!(start.as_mut()).is_pending(),
        "the start ran to its end in one poll: the test cannot come between its load and \
         its save"
    );
    // the previous broker, still stopping, takes the second CRL and records it
    let be = trmx_certs::CertPaths::for_cert(&pki.participant("BE-PAYOKE")?.cert);
    pki.federation.revoke(&be)?;
    record_as_a_start_would(&config)?;
    assert_eq!(recorded_numbers(&record)?, ["2"]);

    let refused = match start.await {
        Ok(mut broker) => {
            let answer = client(broker.local_addr(), &pki.participant("BE-PAYOKE")?)?
                .get_info(trmx_proto::pb::GetInfoRequest {})
                .await;
            broker.shutdown().await?;
            panic!(
                "the broker started with the first CRL, older than the record; BE-PAYOKE's \
                 call: {answer:?}; record: {:?}",
                recorded_numbers(&record)?
            );
        }
        Err(error) => error.to_string(),
    };
    for part in [
        "tls.crl: ".to_owned(),
        "crlNumber 1 < crlNumber 2".to_owned(),
        format!("recorded in {}", record.display()),
    ] {
        assert!(refused.contains(&part), "{part:?} in {refused}");
    }
    assert_eq!(recorded_numbers(&record)?, ["2"], "the record moved back");

    // started again, the broker takes the second CRL, and BE-PAYOKE is refused
    let mut broker = start_broker(&config, &clock).await?;
    let answer = client(broker.local_addr(), &pki.participant("BE-PAYOKE")?)?
        .get_info(trmx_proto::pb::GetInfoRequest {})
        .await;
    broker.shutdown().await?;
    assert!(answer.is_err(), "{answer:?}");
    Ok(())
}

/// A record the start cannot write stops the start (an older CRL would otherwise not be
/// refused after the next restart), naming the file that failed, the temporary file a new
/// record is written to first, and saying what to check.
#[tokio::test]
async fn a_crl_record_that_cannot_be_written_stops_the_start_saying_what_to_check()
-> anyhow::Result<()> {
    let mut t = TestBroker::start().await?;
    t.broker.shutdown().await?;
    let record = t.config.data_dir.join(trmx_broker::CRL_RECORD_FILE);
    let tmp = t
        .config
        .data_dir
        .join(format!("{}.tmp", trmx_broker::CRL_RECORD_FILE));
    std::fs::remove_file(&record)?;
    // (a directory in the way fails the write as root too, unlike a mode)
    std::fs::create_dir(&tmp)?;
    // (the stopped broker's store may let go of its lock a moment late)
    let deadline = tokio::time::Instant::now() + WAIT;
    let refused = loop {
        let refused = refused_start(&t, "a record that cannot be written").await?;
        if !refused.contains("locked by another process") || tokio::time::Instant::now() > deadline
        {
            break refused;
        }
    };
    for part in [
        format!("cannot write the new record to {}", tmp.display()),
        format!("{} (its data directory)", t.config.data_dir.display()),
        "space left".to_owned(),
    ] {
        assert!(refused.contains(&part), "{part:?} in {refused}");
    }
    std::fs::remove_dir(&tmp)?;
    t.restart().await?;
    assert!(record.exists());
    Ok(())
}

/// A reload that cannot write the CRL record keeps the newer CRL in force (refusing it
/// would keep its revoked certificates in), but after a restart an older CRL would then
/// not be refused: `trmx_crl_recorded` says so (alert `TrmxCrlNotRecorded`) until a reload
/// writes it again.
#[tokio::test]
async fn a_reload_that_cannot_write_the_crl_record_is_reported() -> anyhow::Result<()> {
    let t = TestBroker::start().await?;
    let recorded = |t: &TestBroker| {
        let text = t.broker.metrics().render();
        text.lines()
            .find(|line| line.starts_with("trmx_crl_recorded "))
            .map(str::to_owned)
    };
    assert_eq!(recorded(&t).as_deref(), Some("trmx_crl_recorded 1"));
    let tmp = t
        .config
        .data_dir
        .join(format!("{}.tmp", trmx_broker::CRL_RECORD_FILE));
    // (a directory in the way fails the write as root too, unlike a mode)
    std::fs::create_dir(&tmp)?;
    t.pki
        .federation
        .revoke(&t.pki.federation.participant("BE-PAYOKE")?)?;
    t.broker.reload_tls()?;
    assert_eq!(recorded(&t).as_deref(), Some("trmx_crl_recorded 0"));
    std::fs::remove_dir(&tmp)?;
    t.broker.reload_tls()?;
    assert_eq!(recorded(&t).as_deref(), Some("trmx_crl_recorded 1"));
    Ok(())
}
