//! TLS material the broker refuses at start (and `check-config` with it), naming the
//! file: what would otherwise start and report ready, then refuse every client. And a
//! system clock that jumped while the broker was down.

use std::time::Duration;

use tokio::net::TcpListener;
use trmx_broker::clock::{Clock, ManualClock};
use trmx_broker::{Broker, BrokerConfig, BrokerError};
use trmx_certs::Federation;
use trmx_proto::pb;
use trmx_proto::time::to_millis;

use crate::harness::*;

async fn start(config: &BrokerConfig) -> Result<trmx_broker::RunningBroker, BrokerError> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    Broker::builder(config.clone()).start(listener).await
}

/// The commented example config, with the files it names in place, passes `check-config`:
/// an operator who copies it and installs the certificates gets a broker that starts.
#[test]
fn the_example_config_passes_check_config_with_its_files_in_place() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let crl = pki.tls.crl.clone().expect("the harness makes a CRL");
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("broker.example.toml"),
    )?;
    let quoted = |path: &std::path::Path| format!("{:?}", path.display().to_string());
    let mut text = example.clone();
    for (from, to) in [
        ("\"/etc/trmx/ca.pem\"", quoted(&pki.tls.ca)),
        ("\"/etc/trmx/broker.pem\"", quoted(&pki.tls.cert)),
        ("\"/etc/trmx/broker.key\"", quoted(&pki.tls.key)),
        ("\"/etc/trmx/crl.pem\"", quoted(&crl)),
        (
            "\"/var/lib/trmx-broker/store\"",
            quoted(&dir.path().join("store")),
        ),
    ] {
        assert!(
            text.contains(from),
            "broker.example.toml no longer has {from}"
        );
        text = text.replace(from, &to);
    }
    let config = BrokerConfig::from_toml(&text)?;
    let checked = trmx_broker::check_config(&config);
    assert!(checked.is_ok(), "{checked:?}");
    Ok(())
}

#[tokio::test]
async fn broken_tls_material_is_refused_at_start_naming_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let other = Federation::create(&dir.path().join("other"), "trm.other")?;
    let stranger = other.broker("test-1")?;
    let node = pki.federation.participant("NL-NRM")?;
    let good = test_config(dir.path().join("data"), pki.tls.clone());

    let mut foreign_cert = good.clone();
    foreign_cert.tls.cert = stranger.cert.clone();
    foreign_cert.tls.key = stranger.key.clone();
    let mut node_cert = good.clone();
    node_cert.tls.cert = node.cert.clone();
    node_cert.tls.key = node.key.clone();
    let mut foreign_crl = good.clone();
    foreign_crl.tls.crl = Some(other.crl_path());
    // (a directory was "mode 0755 lets other users read or change it")
    let key_dir = dir.path().join("keys");
    std::fs::create_dir(&key_dir)?;
    let mut dir_as_key = good.clone();
    dir_as_key.tls.key = key_dir.clone();

    for (what, config, file, problem) in [
        (
            "a certificate of another CA",
            &foreign_cert,
            &stranger.cert,
            "not issued by the CA",
        ),
        (
            "a node certificate",
            &node_cert,
            &node.cert,
            "not a server certificate",
        ),
        (
            "another CA's CRL",
            &foreign_crl,
            &other.crl_path(),
            "not issued by the CA",
        ),
        (
            "a directory as the key",
            &dir_as_key,
            &key_dir,
            "it is a directory, not a regular file: give the path of the private key file in ",
        ),
    ] {
        let error = start(config).await.expect_err(what).to_string();
        assert!(error.contains(&*file.to_string_lossy()), "{what}: {error}");
        assert!(error.contains(problem), "{what}: {error}");
        let checked = trmx_broker::check_config(config)
            .expect_err(what)
            .to_string();
        assert_eq!(checked, error, "check-config says what the start says");
    }
    // nothing was created for the refused starts
    assert!(!good.data_dir.exists());
    let mut broker = start(&good).await?;
    broker.shutdown().await?;
    Ok(())
}

/// The real `trmx-broker run` with its log on stderr in a file; stopped (SIGTERM) on drop.
struct Process {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Process {
    fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{name} failed");
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The contents of the ready file at `path`, waiting up to [`WAIT`] for it.
    async fn ready_file(&self, path: &std::path::Path) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match std::fs::read_to_string(path) {
                Ok(text) => return Ok(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no ready file; log:\n{}",
                self.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The first log line holding `what`, waiting up to [`WAIT`] for it.
    async fn line(&self, what: &str) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(what)) {
                return Ok(line.to_owned());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no log line with {what:?} in:\n{}",
                self.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // (one that exited and was waited for is not signalled: its pid may be another
        // test's child by now)
        if let Ok(None) = self.child.try_wait() {
            let _ = self.signal("TERM");
            let _ = self.child.wait();
        }
    }
}

/// What an operator reads in the log of the real binary: optional fields without
/// `Some(…)`, the CRL's next update as a date, a refused handshake at info with the peer's
/// address and the reason, and who a revocation plus SIGHUP cut off.
#[tokio::test]
async fn the_log_tells_an_operator_what_happened() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let mut config = test_config(dir.path().join("data"), pki.tls.clone());
    config.limits.shutdown_grace = std::time::Duration::from_millis(200);
    let config_file = dir.path().join("broker.toml");
    std::fs::write(&config_file, config.to_toml()?)?;
    let ready = dir.path().join("ready");
    let log = dir.path().join("broker.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
        .arg("run")
        .arg("--config")
        .arg(&config_file)
        .arg("--ready-file")
        .arg(&ready)
        .args(["--log-level", "info,trmx_broker=debug"])
        .env_remove("TRMX_BROKER_CONFIG")
        .env_remove("TRMX_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let broker = Process { child, log };
    let listening = broker.line("broker listening").await?;
    // (logged inside `start`; the ready file is written after it returns)
    let addr: std::net::SocketAddr = broker.ready_file(&ready).await?.trim().parse()?;

    assert!(listening.contains("admin=127.0.0.1:"), "{listening}");
    // a first start: the missing CRL record is said once, though it is read twice (to
    // load TLS, and again under the data directory's lock before it is written)
    let log = broker.log();
    assert_eq!(log.matches("no CRL record yet").count(), 1, "{log}");
    let loaded = broker.line("tls config loaded").await?;
    let date = loaded
        .split("next_update=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default();
    assert!(
        date.len() == 20 && date.as_bytes()[10] == b'T' && date.ends_with('Z'),
        "an RFC 3339 date in {loaded}"
    );

    // a refused request: its RPC span names the peer
    let mut nl = client(addr, &pki.participant("NL-NRM")?)?;
    assert!(submit(&mut nl, referral("XX-NOBODY")).await.is_err());
    let refused = broker.line("request refused").await?;
    assert!(refused.contains("remote=127.0.0.1:"), "{refused}");

    // a node of another federation: one info line with the reason and the address
    let other = Federation::create(&dir.path().join("other"), "trm.other")?;
    let stranger = other.participant("NL-NRM")?;
    let mut foreign = client(
        addr,
        &trmx_transport::TlsPaths {
            ca: pki.federation.ca_cert_path(),
            cert: stranger.cert,
            key: stranger.key,
        },
    )?;
    assert!(submit(&mut foreign, referral("BE-PAYOKE")).await.is_err());
    let failed = broker.line("tls handshake failed").await?;
    assert!(
        failed.contains("peer=127.0.0.1") && failed.contains("reason=unknown_ca"),
        "{failed}"
    );

    // BE-PAYOKE holds a stream open; revoked, then SIGHUP: the log names it
    let mut be = client(addr, &pki.participant("BE-PAYOKE")?)?;
    let _stream = receive(&mut be, 0).await?;
    let be_cert = trmx_certs::CertPaths::for_cert(&pki.participant("BE-PAYOKE")?.cert);
    pki.federation.revoke(&be_cert)?;
    broker.signal("HUP")?;
    let reloaded = broker.line("tls reloaded").await?;
    assert!(
        reloaded.contains("closed=participant BE-PAYOKE from 127.0.0.1"),
        "{reloaded}"
    );

    assert!(!broker.log().contains("Some("), "{}", broker.log());
    Ok(())
}

/// SIGHUP reloads only the TLS material and the CRL. An operator who added an
/// organisation to `[[participants]]` and sent SIGHUP was told nothing, and the new node
/// stayed refused until a restart; a file broken by an edit was found only by that
/// restart. A SIGHUP now applies the participants and says so, says which settings of the
/// file it did not apply, or that the file no longer loads, and nothing when the file says
/// what runs.
#[tokio::test]
async fn a_sighup_says_what_of_an_edited_config_file_it_does_not_apply() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let mut config = test_config(dir.path().join("data"), pki.tls.clone());
    config.limits.shutdown_grace = std::time::Duration::from_millis(200);
    let config_file = dir.path().join("broker.toml");
    std::fs::write(&config_file, config.to_toml()?)?;
    let ready = dir.path().join("ready");
    let log = dir.path().join("broker.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
        .arg("run")
        .arg("--config")
        .arg(&config_file)
        .arg("--ready-file")
        .arg(&ready)
        .env_remove("TRMX_BROKER_CONFIG")
        .env_remove("TRMX_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let mut broker = Process { child, log };
    broker.ready_file(&ready).await?;
    // The n-th SIGHUP, once its reload and what follows it are in the log (the reload's
    // line comes first; the file is read again after it). The file is edited only once
    // the line said after the previous SIGHUP's read of it is in the log: an edit made
    // once its "tls reloaded" is there may be what that read finds.
    async fn hangup(broker: &Process, n: usize, then: &str) -> anyhow::Result<String> {
        broker.signal("HUP")?;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let log = broker.log();
            let reloaded = log.match_indices("tls reloaded").nth(n - 1);
            if let Some((at, _)) = reloaded
                && log[at..].contains(then)
            {
                return Ok(log);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "SIGHUP {n}: no {then:?} in:\n{log}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let drift = "differs from the running config";

    let mut edited = config.clone();
    let mut joining = edited.participants[0].clone();
    joining.id = "DE-KOK".into();
    joining.country = "DE".into();
    edited.participants.push(joining);
    edited.participants.retain(|p| p.id != "BE-PAYOKE");
    edited.limits.max_envelope_bytes += 1;
    std::fs::write(&config_file, edited.to_toml()?)?;
    let log = hangup(&broker, 1, drift).await?;
    assert_eq!(log.matches(drift).count(), 1, "{log}");
    let line = log.lines().find(|l| l.contains(drift)).unwrap_or_default();
    assert!(line.contains("WARN"), "{line}");
    for what in ["(limits.max_envelope_bytes)", "restart the broker"] {
        assert!(line.contains(what), "{what:?} in {line}");
    }
    assert!(
        !line.contains("tls."),
        "the TLS paths did not change: {line}"
    );
    // the participants are applied, and said so
    let reloaded = log
        .lines()
        .find(|l| l.contains("participants reloaded"))
        .unwrap_or_default();
    assert!(
        reloaded.contains("added=DE-KOK") && reloaded.contains("removed=BE-PAYOKE"),
        "{log}"
    );

    // a file the edit broke: said, and the broker goes on
    std::fs::write(&config_file, "limits = 3\n")?;
    let log = hangup(&broker, 2, "no longer loads").await?;
    let line = log
        .lines()
        .find(|l| l.contains("no longer loads"))
        .unwrap_or_default();
    assert!(
        line.contains("WARN") && line.contains("check-config"),
        "{line}"
    );
    assert!(broker.child.try_wait()?.is_none(), "the broker stopped");

    // the file saying what runs (the participants applied above): the SIGHUP says
    // nothing of it. Nothing follows its reload in the log, so the broker is stopped
    // (it handles the SIGTERM after the SIGHUP) before what it said is read.
    let mut running = config.clone();
    running.participants = edited.participants.clone();
    std::fs::write(&config_file, running.to_toml()?)?;
    hangup(&broker, 3, "tls reloaded").await?;
    broker.signal("TERM")?;
    let stopped = broker.child.wait()?;
    assert!(stopped.success(), "{stopped}: {}", broker.log());
    let log = broker.log();
    let (third, _) = log
        .match_indices("tls reloaded")
        .nth(2)
        .ok_or_else(|| anyhow::anyhow!("no third reload in:\n{log}"))?;
    let after = &log[third..];
    assert!(after.contains("SIGTERM received"), "{log}");
    for unsaid in [drift, "participants reloaded", "no longer loads"] {
        assert!(
            !after.contains(unsaid),
            "{unsaid:?} after the third SIGHUP: {log}"
        );
    }
    Ok(())
}

/// `check-config` said "config OK" and nothing else for a broker certificate the CRL
/// revokes (loading only warns about it, so that a CRL reload is never refused): the
/// warning goes to stderr, as at a start.
#[test]
fn check_config_shows_what_loading_warns_about() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let config = test_config(dir.path().join("data"), pki.tls.clone());
    let config_file = dir.path().join("broker.toml");
    std::fs::write(&config_file, config.to_toml()?)?;
    let broker_cert = trmx_certs::CertPaths::for_cert(&pki.tls.cert);
    pki.federation.revoke(&broker_cert)?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
        .arg("check-config")
        .arg("--config")
        .arg(&config_file)
        .env_remove("TRMX_BROKER_CONFIG")
        .env_remove("TRMX_LOG")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("# config OK"), "{stdout}");
    assert!(
        stderr.contains("WARN") && stderr.contains("revoked by the CRL"),
        "{stderr}"
    );
    Ok(())
}

/// A participant may run more nodes than its request limit serves at once (four calls a
/// node): its acks can be refused. Nothing said so; the start and `check-config` warn,
/// naming both settings and the value to set, and the broker runs.
#[tokio::test]
async fn a_request_limit_below_four_per_stream_is_warned_about_at_start_and_in_check_config()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let mut config = test_config(dir.path().join("data"), pki.tls.clone());
    config.limits.max_streams_per_participant = 16;
    config.limits.max_concurrent_requests_per_participant = 32;
    config.limits.shutdown_grace = std::time::Duration::from_millis(200);
    let config_file = dir.path().join("broker.toml");
    std::fs::write(&config_file, config.to_toml()?)?;
    let said = "limits.max_concurrent_requests_per_participant = 32 is less than 4 × \
                limits.max_streams_per_participant (16)";
    let fix = "set limits.max_concurrent_requests_per_participant = 64";
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
        .arg("check-config")
        .arg("--config")
        .arg(&config_file)
        .env_remove("TRMX_BROKER_CONFIG")
        .env_remove("TRMX_LOG")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains(said) && stderr.contains(fix),
        "{stderr}"
    );

    let ready = dir.path().join("ready");
    let log = dir.path().join("broker.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
        .arg("run")
        .arg("--config")
        .arg(&config_file)
        .arg("--ready-file")
        .arg(&ready)
        .env_remove("TRMX_BROKER_CONFIG")
        .env_remove("TRMX_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let broker = Process { child, log };
    broker.ready_file(&ready).await?;
    let warned = broker.line(said).await?;
    assert!(warned.contains("WARN") && warned.contains(fix), "{warned}");
    Ok(())
}

/// `crl_policy = "strict"` without a `crl` was accepted without a word, and the broker ran
/// with no revocation check at all: an operator who asked for the strictest revocation
/// setting got none (a missing or commented-out `crl` line). It is refused, naming
/// `tls.crl`; and a broker without a CRL says so (a warning at start and in check-config).
#[test]
fn a_strict_crl_policy_without_a_crl_is_refused_and_no_crl_is_warned_about() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let mut config = test_config(dir.path().join("data"), pki.tls.clone());
    config.tls.crl = None;
    config.tls.crl_policy = trmx_broker::config::CrlPolicyConfig::Strict;
    let checked = trmx_broker::check_config(&config);
    assert!(
        checked
            .as_ref()
            .is_err_and(|e| e.to_string().starts_with("config: tls.crl is required")),
        "crl_policy = \"strict\" with no tls.crl passed check-config: {checked:?}"
    );

    // "warn" without a CRL runs, but not silently
    config.tls.crl_policy = trmx_broker::config::CrlPolicyConfig::Warn;
    let config_file = dir.path().join("broker.toml");
    std::fs::write(&config_file, config.to_toml()?)?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
        .arg("check-config")
        .arg("--config")
        .arg(&config_file)
        .env_remove("TRMX_BROKER_CONFIG")
        .env_remove("TRMX_LOG")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("no tls.crl configured"),
        "{stderr}"
    );
    Ok(())
}

/// A system clock set ahead while the broker was down would expire every queued message at
/// its first tick (and one set back to 1970 would hold every redelivery). The broker does
/// not start then: it says why, in human units, and what to do, naming its data directory,
/// and changes nothing. Once the operator accepts the clock (`trmx-broker store
/// accept-clock`), it starts. A clock a little behind is accepted: NTP correcting a clock
/// that ran fast (a jump the running broker held, and recorded as its time) must not keep
/// the restart from starting.
/// (`the_last_run_survives_a_reopen_and_can_be_accepted_offline` accepts a clock ahead.)
#[tokio::test]
async fn a_clock_that_jumped_while_the_broker_was_down_is_refused_until_accepted()
-> anyhow::Result<()> {
    const DAY: Duration = Duration::from_secs(86_400);
    let mut b = TestBroker::start().await?;
    let mut nl = b.client("NL-NRM")?;
    let env = referral("BE-PAYOKE");
    let id = env.message_id.clone();
    submit(&mut nl, env).await?;
    b.broker.shutdown().await?;
    let down_at = b.clock.now();
    let data_dir = b.config.data_dir.display().to_string();
    let config = b.config.clone();
    let start_refused = |clock: &ManualClock| {
        let (config, clock) = (config.clone(), clock.clone());
        async move {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            match Broker::builder(config).clock(clock).start(listener).await {
                Ok(_) => anyhow::bail!("the broker started"),
                Err(BrokerError::ClockJump(text)) => Ok(text),
                Err(other) => anyhow::bail!("another error: {other}"),
            }
        }
    };
    let restart = async |b: &mut TestBroker| -> anyhow::Result<Client> {
        b.broker = start_broker(&b.config, &b.clock).await?;
        b.addr = b.broker.local_addr();
        b.client("NL-NRM")
    };

    // a year (and a moment, as a real clock reads) ahead: past the referral's lifetime
    b.clock
        .set(down_at + 365 * DAY + Duration::from_millis(1_234));
    let text = start_refused(&b.clock).await?;
    for part in [
        "365.0 days after the last time a broker ran on this store",
        "more than lifecycle.max_downtime (7d)",
        &format!("trmx-broker store accept-clock --data-dir {data_dir}` once as the broker's user"),
    ] {
        assert!(text.contains(part), "{part:?} not in: {text}");
    }
    // eight days back
    b.clock.set(down_at - 8 * DAY);
    let text = start_refused(&b.clock).await?;
    assert!(
        text.contains("8.0 days before the last time a broker ran on this store"),
        "{text}"
    );

    // The refused starts changed nothing. A clock four minutes behind the last run (the
    // running broker held a step back of NTP, and recorded its own time) starts. (Not
    // five: the client's certificate was issued after the test clock started, valid from
    // five minutes before its issue, so a broker clock five minutes behind could find it
    // not yet valid, and refuse it as expired.)
    b.clock.set(down_at - Duration::from_secs(240));
    let mut nl = restart(&mut b).await?;
    assert_eq!(state_of(&mut nl, &id).await?, pb::MessageState::Accepted);
    b.broker.shutdown().await?;

    // A broker that ran with a clock ten days ahead (its last run recorded then); the
    // clock is right now: refused, until the operator accepts it with the command.
    let ahead = b.clock.now() + 10 * DAY;
    trmx_broker::store::accept_clock_offline(&b.config.data_dir, to_millis(ahead), "test")?;
    b.clock.set(std::time::SystemTime::now());
    start_refused(&b.clock).await?;
    let accepted = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
            .args(["store", "accept-clock", "--data-dir", &data_dir])
            .output()
    })
    .await??;
    let said = String::from_utf8_lossy(&accepted.stdout);
    assert!(accepted.status.success(), "{accepted:?}");
    assert!(said.contains("the broker starts with this clock"), "{said}");
    let mut nl = restart(&mut b).await?;
    assert_eq!(state_of(&mut nl, &id).await?, pb::MessageState::Accepted);
    Ok(())
}

/// `store accept-clock` moves the broker's time, and with it what expires at the next
/// start: it leaves an audit record of who ran it (the operating-system user, and the one
/// `sudo` names), the last run the store held, and the one it holds now; the audit chain
/// and the store still verify.
#[tokio::test]
async fn accepting_the_clock_is_audited_and_the_chain_still_verifies() -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    use trmx_broker::store::audit::{AuditEvent, OperatorAction};

    let mut b = TestBroker::start().await?;
    let mut nl = b.client("NL-NRM")?;
    submit(&mut nl, referral("BE-PAYOKE")).await?;
    // (recorded at start; the manual clock has not moved since)
    let last_run = b.clock.now_millis();
    b.broker.shutdown().await?;
    let data_dir = b.config.data_dir.clone();
    let records_before = trmx_broker::store::audit_records_offline(&data_dir)?.len();

    let binary = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
            .args(args)
            .env("SUDO_USER", "alice")
            .output()
    };
    let dir = data_dir.to_str().expect("utf-8 path");
    let started = to_millis(std::time::SystemTime::now());
    let accepted = binary(&["store", "accept-clock", "--data-dir", dir])?;
    let ended = to_millis(std::time::SystemTime::now());
    assert!(accepted.status.success(), "{accepted:?}");

    let records = trmx_broker::store::audit_records_offline(&data_dir)?;
    assert_eq!(records.len(), records_before + 1, "one record more");
    let record = records.last().expect("a record");
    let AuditEvent::Operator(OperatorAction::AcceptClock {
        operator,
        recorded_before,
        accepted,
    }) = &record.event
    else {
        panic!("not an accept-clock record: {record:?}");
    };
    assert_eq!(*recorded_before, Some(last_run));
    assert!((started..=ended).contains(accepted), "{accepted}");
    assert_eq!(record.at, *accepted);
    let uid = std::fs::metadata(&data_dir)?.uid();
    assert!(
        operator.contains(&format!("(uid {uid})")) && operator.ends_with(", via sudo by alice"),
        "{operator}"
    );

    for check in [["audit", "verify"], ["store", "verify"]] {
        let out = binary(&[check[0], check[1], "--data-dir", dir])?;
        assert!(out.status.success(), "{check:?}: {out:?}");
    }
    Ok(())
}

/// `trmx-broker check-config --config FILE` (a file written from `config` in `dir`).
fn check_config_binary(
    dir: &std::path::Path,
    config: &BrokerConfig,
) -> anyhow::Result<std::process::Output> {
    let config_file = dir.join("broker.toml");
    std::fs::write(&config_file, config.to_toml()?)?;
    Ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
            .arg("check-config")
            .arg("--config")
            .arg(&config_file)
            .env_remove("TRMX_BROKER_CONFIG")
            .env_remove("TRMX_LOG")
            .output()?,
    )
}

/// A file's size, SHA-256 and modification time.
type FileState = (u64, [u8; 32], std::time::SystemTime);

/// Every file under `dir` (not the directories: check-config's probe comes and goes in
/// the data directory).
fn files_in(
    dir: &std::path::Path,
) -> anyhow::Result<std::collections::BTreeMap<std::path::PathBuf, FileState>> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(files_in(&path)?);
        } else {
            let meta = std::fs::metadata(&path)?;
            let digest = trmx_proto::envelope::sha256(&std::fs::read(&path)?);
            out.insert(path.clone(), (meta.len(), digest, meta.modified()?));
        }
    }
    Ok(out)
}

/// Records `at` as the last run of the stopped broker on `config`'s store, in the store
/// and in its last-run file, as a broker that ran then would have.
fn ran_at(config: &BrokerConfig, at: std::time::SystemTime) -> anyhow::Result<()> {
    trmx_broker::store::accept_clock_offline(&config.data_dir, to_millis(at), "test")?;
    trmx_broker::last_run::write(&config.data_dir, to_millis(at))?;
    Ok(())
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `check-config` said "config OK" for a config whose start the broker then refused for
/// a system clock that had jumped while it was down. It makes the start's clock check:
/// the start's refusal (and exit status 1) for a clock too far from the last run, the
/// start's warning for one behind, OK otherwise, and says when there is no store yet.
/// It reads the last run from the broker's last-run file, never from the store: it
/// changes no file of the store (it once copied them all, payloads included), and checks
/// beside a running broker too.
#[tokio::test]
async fn check_config_makes_the_clock_check_of_a_start() -> anyhow::Result<()> {
    const DAY: Duration = Duration::from_secs(86_400);
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let config = test_config(dir.path().join("data"), pki.tls.clone());

    // no store yet
    let out = check_config_binary(dir.path(), &config)?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("# clock: first start"),
        "{}",
        stdout(&out)
    );
    assert!(
        !config.data_dir.exists(),
        "check-config made the data directory"
    );

    // a running broker holds the store: checked all the same
    let clock = ManualClock::new(std::time::SystemTime::now());
    let mut broker = start_broker(&config, &clock).await?;
    let out = check_config_binary(dir.path(), &config)?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("# clock: OK: the system clock reads"),
        "{}",
        stdout(&out)
    );
    broker.shutdown().await?;

    // the broker stopped
    let before = files_in(&config.data_dir)?;
    let out = check_config_binary(dir.path(), &config)?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("# clock: OK: the system clock reads"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        files_in(&config.data_dir)?,
        before,
        "the store's files changed"
    );

    // a clock ten days after the last run: refused as the start refuses it, changing nothing
    ran_at(&config, std::time::SystemTime::now() - 10 * DAY)?;
    let before = files_in(&config.data_dir)?;
    let out = check_config_binary(dir.path(), &config)?;
    assert!(
        !out.status.success(),
        "a clock jump passed: {}",
        stdout(&out)
    );
    assert_eq!(
        files_in(&config.data_dir)?,
        before,
        "the store's files changed"
    );
    let error = stderr(&out);
    // (the start reads the store)
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let started = Broker::builder(config.clone())
        .clock(ManualClock::new(std::time::SystemTime::now()))
        .start(listener)
        .await;
    let Err(BrokerError::ClockJump(refused)) = started else {
        anyhow::bail!("the start was not refused for the clock");
    };
    let data_dir = config.data_dir.display().to_string();
    for part in [
        "10.0 days after the last time a broker ran on this store",
        "more than lifecycle.max_downtime (7d)",
        &format!("trmx-broker store accept-clock --data-dir {data_dir}` once"),
    ] {
        assert!(error.contains(part), "{part:?} not in: {error}");
        assert!(
            refused.contains(part),
            "{part:?} not in the start's: {refused}"
        );
    }

    // a clock three hours behind the last run: the start's warning, and OK
    ran_at(
        &config,
        std::time::SystemTime::now() + Duration::from_secs(3 * 3600),
    )?;
    let before = files_in(&config.data_dir)?;
    let out = check_config_binary(dir.path(), &config)?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("WARN")
            && stderr(&out).contains("the system clock is behind the last time a broker ran"),
        "{}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("# clock: OK, with the warning above")
            && stdout(&out).contains("3.0 hours before the last run"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        files_in(&config.data_dir)?,
        before,
        "the store's files changed"
    );
    Ok(())
}

/// The last-run file is what check-config checks the clock against, and the store stays
/// the start's truth: a store without the file (last run by an older broker) or with a
/// damaged one is "not checked", saying why and what writes the file, never a refusal or
/// an error (the start checks the store). A file left behind without a store is a first
/// start, as the start sees it.
#[tokio::test]
async fn check_config_without_a_readable_last_run_file_does_not_check_the_clock()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let config = test_config(dir.path().join("data"), pki.tls.clone());
    let clock = ManualClock::new(std::time::SystemTime::now());
    start_broker(&config, &clock).await?.shutdown().await?;
    let file = trmx_broker::last_run::path(&config.data_dir);

    // a store an older broker ran on
    std::fs::remove_file(&file)?;
    let out = check_config_binary(dir.path(), &config)?;
    assert!(out.status.success(), "{}", stderr(&out));
    for part in [
        "# clock: not checked: the store in data_dir has no last-run.json beside it",
        "the broker writes it at start and every minute",
        "the broker checks the clock against its store when it starts",
    ] {
        assert!(stdout(&out).contains(part), "{part:?} in {}", stdout(&out));
    }

    // a damaged file
    std::fs::write(&file, "{\"format\": 1, \"last_run_ms\": \"soon\"")?;
    let out = check_config_binary(dir.path(), &config)?;
    assert!(out.status.success(), "{}", stderr(&out));
    for part in [
        format!("# clock: not checked: {} is damaged: ", file.display()),
        "the broker checks the clock against its store when it starts".to_owned(),
    ] {
        assert!(stdout(&out).contains(&part), "{part:?} in {}", stdout(&out));
    }

    // a file without a store (the store was removed, the file left behind)
    let store = dir.path().join("store-removed");
    std::fs::rename(&config.data_dir, &store)?;
    std::fs::create_dir(&config.data_dir)?;
    trmx_broker::last_run::write(&config.data_dir, 0)?;
    let out = check_config_binary(dir.path(), &config)?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("# clock: first start"),
        "{}",
        stdout(&out)
    );
    Ok(())
}

/// `check-config` makes the clock check of a start from `last-run.json` in the data
/// directory, never from the store: the file must hold what the store holds. The broker
/// writes there, private to its user, the instant it records in its store at start, and
/// `store accept-clock` the clock it accepts (else check-config would refuse the clock
/// that the start now accepts).
#[tokio::test]
async fn the_last_run_file_is_written_at_start_and_follows_accept_clock() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    use trmx_broker::last_run::{self, LastRun};
    use trmx_broker::store::audit::{AuditEvent, OperatorAction};

    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let config = test_config(dir.path().join("data"), pki.tls.clone());
    let data_dir = config.data_dir.clone();
    // (an hour behind: what accept-clock records later is the system clock's time)
    let clock = ManualClock::new(std::time::SystemTime::now() - Duration::from_secs(3600));
    let mut broker = start_broker(&config, &clock).await?;
    assert_eq!(last_run::read(&data_dir), LastRun::At(clock.now_millis()));
    let mode = std::fs::metadata(last_run::path(&data_dir))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    broker.shutdown().await?;

    let dir = data_dir.to_str().expect("utf-8 path").to_owned();
    let accepted = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
            .args(["store", "accept-clock", "--data-dir", &dir])
            .output()
    })
    .await??;
    assert!(accepted.status.success(), "{accepted:?}");
    let records = trmx_broker::store::audit_records_offline(&data_dir)?;
    let Some(AuditEvent::Operator(OperatorAction::AcceptClock { accepted, .. })) =
        records.last().map(|record| &record.event)
    else {
        anyhow::bail!("no accept-clock record last: {:?}", records.last());
    };
    assert_eq!(last_run::read(&data_dir), LastRun::At(*accepted));
    Ok(())
}

/// The last-run file only serves `check-config`; the store's mark is what the start
/// checks. A broker that cannot write the file (here a directory where its temporary
/// file goes) starts and serves all the same.
#[tokio::test]
async fn a_last_run_file_that_cannot_be_written_does_not_stop_the_broker() -> anyhow::Result<()> {
    use trmx_broker::last_run::{self, LastRun};

    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let config = test_config(dir.path().join("data"), pki.tls.clone());
    trmx_durable::private_dir(&config.data_dir)?;
    std::fs::create_dir(config.data_dir.join("last-run.json.tmp"))?;
    let clock = ManualClock::new(std::time::SystemTime::now());
    let mut broker = start_broker(&config, &clock).await?;
    let mut nl = client(broker.local_addr(), &pki.participant("NL-NRM")?)?;
    submit(&mut nl, referral("BE-PAYOKE")).await?;
    assert_eq!(last_run::read(&config.data_dir), LastRun::Missing);
    broker.shutdown().await?;
    Ok(())
}

/// `trmx-broker admin` with connection flags that cannot work, as run at 3 a.m.: what it
/// said was a bare transport error (`Connection refused`, `UnknownIssuer`, `received corrupt
/// message of type InvalidContentType`, `received fatal alert: CertificateRevoked`) that
/// names no flag. Each failure is now one line that says which flag or file to check; a
/// `--ca` holding a participant's certificate, or a `--broker` with a scheme, is refused
/// before connecting. The same flags set right reach the broker.
#[tokio::test]
async fn the_admin_cli_says_which_flag_to_check_when_it_cannot_reach_the_broker()
-> anyhow::Result<()> {
    use trmx_broker::admin_cli::{AdminArgs, AdminCommand, execute};
    let t = TestBroker::start().await?;
    let alice = t.pki.federation.operator("alice")?;
    let args = |broker: String, ca: &std::path::Path, cert: &trmx_certs::CertPaths| AdminArgs {
        broker,
        ca: ca.to_owned(),
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        server_name: None,
        timeout: trmx_broker::admin_cli::DEFAULT_TIMEOUT_SECS,
        json: true,
        command: AdminCommand::Participants,
    };
    let ca = t.pki.federation.ca_cert_path();
    let addr = t.addr.to_string();
    execute(args(addr.clone(), &ca, &alice))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // a bundle of certificate and key, given as both, is no swap
    let bundle = t.pki.federation.dir.join("alice-bundle.pem");
    let mut both = std::fs::read(&alice.cert)?;
    both.extend(std::fs::read(&alice.key)?);
    std::fs::write(&bundle, both)?;
    std::fs::set_permissions(&bundle, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let bundled = trmx_certs::CertPaths {
        cert: bundle.clone(),
        key: bundle,
    };
    execute(args(addr.clone(), &ca, &bundled))
        .await
        .map_err(|e| anyhow::anyhow!("a bundle: {e}"))?;

    // another CA, and one of the same name (a staging CA made with the default name)
    let other_dir = tempfile::tempdir()?;
    let other = Federation::create(other_dir.path(), "trm.other")?;
    let same_name_dir = tempfile::tempdir()?;
    let same_name = Federation::create(same_name_dir.path(), "trm.test")?;
    let node = t.pki.federation.participant("NL-NRM")?;
    let bob = t.pki.federation.operator("bob")?;
    t.pki.federation.ca.revoke(&bob.cert)?;
    t.broker.reload_tls()?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let admin_port = t.broker.admin_addr().expect("an admin port").to_string();
    let cases = [
        (
            args(addr.clone(), &other.ca_cert_path(), &alice),
            "UnknownIssuer",
            "the broker's certificate was not issued by the CA in --ca",
        ),
        (
            args(addr.clone(), &same_name.ca_cert_path(), &alice),
            "BadSignature",
            "the broker's certificate was not issued by the CA in --ca",
        ),
        (
            args(addr.clone(), &node.cert, &alice),
            "holds the certificate of spiffe://trm.test/participant/NL-NRM (serial ",
            "not a CA certificate: give the federation CA's certificate",
        ),
        (
            args(closed.to_string(), &ca, &alice),
            "Connection refused",
            "nothing listens there: is the broker running",
        ),
        (
            args(admin_port, &ca, &alice),
            "InvalidContentType",
            "not its admin port (`admin_listen`)",
        ),
        (
            args(addr.clone(), &ca, &bob),
            "CertificateRevoked",
            "the broker refused the operator certificate (--cert) as revoked",
        ),
        (
            args(
                addr.clone(),
                &ca,
                &trmx_certs::CertPaths {
                    cert: alice.key.clone(),
                    key: alice.cert.clone(),
                },
            ),
            "holds a private key, not a certificate",
            "are --cert and --key (TRMX_ADMIN_CERT, TRMX_ADMIN_KEY) swapped?",
        ),
        (
            args(format!("https://{addr}"), &ca, &alice),
            "has a scheme (https://)",
            &format!("give HOST:PORT, e.g. --broker {addr}"),
        ),
    ];
    for (args, cause, hint) in cases {
        let what = format!("--broker {} --ca {}", args.broker, args.ca.display());
        let error = execute(args).await.expect_err(&what).to_string();
        assert!(error.contains(cause), "{what}: {error}");
        assert!(error.contains(hint), "{what}: {error}");
        assert_eq!(error.lines().count(), 1, "{what}: {error}");
    }
    Ok(())
}

/// `trmx-broker check-config | grep -q …` (stdout closed before the check writes) panicked
/// with exit status 101 for a config that passed, which a script read as a failed check.
/// It now exits 0 and says nothing on stderr. (The pipe's reader is closed before the
/// broker starts, so every write meets it.)
#[test]
fn check_config_whose_stdout_is_closed_is_no_panic() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let config = test_config(dir.path().join("data"), pki.tls.clone());
    let config_file = dir.path().join("broker.toml");
    std::fs::write(&config_file, config.to_toml()?)?;
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
        .arg("check-config")
        .arg("--config")
        .arg(&config_file)
        .env_remove("TRMX_BROKER_CONFIG")
        .env_remove("RUST_BACKTRACE")
        .env("TRMX_LOG", "error")
        .stdout(writer)
        .output()?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    Ok(())
}

/// A CRL past its nextUpdate passed `check-config` with "config OK" and exit status 0,
/// its only trace a WARN log line: under `crl_policy = "strict"` the broker then refuses
/// every connection. That is now a failure naming `tls.crl`, the CA, the time and what to
/// do; under "warn" it passes, and says so on stderr and in a `# crl:` line. A fresh CRL
/// gets its next update on that line.
#[test]
fn check_config_fails_a_stale_crl_under_a_strict_policy_and_says_it_under_warn()
-> anyhow::Result<()> {
    use trmx_broker::config::CrlPolicyConfig;
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let check = |policy| -> anyhow::Result<std::process::Output> {
        let mut config = test_config(dir.path().join("data"), pki.tls.clone());
        config.tls.crl_policy = policy;
        let config_file = dir.path().join("broker.toml");
        std::fs::write(&config_file, config.to_toml()?)?;
        Ok(
            std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
                .arg("check-config")
                .arg("--config")
                .arg(&config_file)
                .env_remove("TRMX_BROKER_CONFIG")
                .env("TRMX_LOG", "error")
                .output()?,
        )
    };
    let out = check(CrlPolicyConfig::Strict)?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("\n# crl: next update "),
        "{}",
        stdout(&out)
    );

    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(86_400);
    pki.federation
        .ca
        .write_crl_with_times(now - 10 * day, now - 3 * day)?;
    let out = check(CrlPolicyConfig::Strict)?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let error = stderr(&out);
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(
        error.starts_with(&format!(
            "trmx-broker: config: tls.crl: the CRL of CN=trm.test federation CA, O=trm.test in {} \
             is past its nextUpdate (",
            pki.federation.crl_path().display()
        )),
        "{error}"
    );
    assert!(
        error.contains("the broker refuses every connection; at the CA, run `trmx-certs crl`"),
        "{error}"
    );
    assert!(!stdout(&out).contains("config OK"), "{}", stdout(&out));

    let out = check(CrlPolicyConfig::Warn)?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("\n# crl: past its nextUpdate "),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("warning: tls.crl: the CRL of "),
        "{}",
        stderr(&out)
    );
    Ok(())
}

/// `admin messages --recipient NL-NMR` (a typo) printed "0 message(s)" and exit status 0,
/// as for a participant that has no messages. A search that finds nothing now notes on
/// stderr each `--sender`/`--recipient` the broker's registry does not hold; a known
/// participant with no messages gets no note.
#[tokio::test]
async fn an_empty_search_for_a_participant_the_broker_does_not_know_says_so() -> anyhow::Result<()>
{
    let t = TestBroker::start().await?;
    let alice = t.pki.federation.operator("alice")?;
    let run = |filter: &'static [&'static str]| {
        let mut args: Vec<String> = vec![
            "admin".into(),
            "--broker".into(),
            t.addr.to_string(),
            "--ca".into(),
            t.pki.federation.ca_cert_path().display().to_string(),
            "--cert".into(),
            alice.cert.display().to_string(),
            "--key".into(),
            alice.key.display().to_string(),
            "messages".into(),
        ];
        args.extend(filter.iter().map(|a| (*a).to_owned()));
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
                .args(&args)
                .env_remove("TRMX_BROKER_CONFIG")
                .output()
        })
    };
    let out = run(&["--recipient", "NL-NMR", "--sender", "BE-PAYOKE"]).await??;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("0 message(s)"), "{}", stdout(&out));
    assert_eq!(
        stderr(&out),
        "note: --recipient NL-NMR is not in the broker's participant registry: a typo? \
         `trmx-broker admin participants` lists them\n"
    );
    let out = run(&["--recipient", "NL-NRM"]).await??;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    Ok(())
}

/// A second `trmx-broker run` beside a running one (started by hand next to its service)
/// said `binding 127.0.0.1:7443: Address already in use (os error 98)`. It now names the
/// setting, the likely cause and how to see what holds the address, and exits 1.
#[test]
fn a_listen_address_in_use_names_the_setting_and_what_to_check() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut config = test_config(dir.path().join("data"), pki.tls.clone());
    config.listen = taken.local_addr()?;
    let config_file = dir.path().join("broker.toml");
    std::fs::write(&config_file, config.to_toml()?)?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
        .arg("run")
        .arg("--config")
        .arg(&config_file)
        .env_remove("TRMX_BROKER_CONFIG")
        .env("TRMX_LOG", "error")
        .output()?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let port = config.listen.port();
    assert_eq!(
        stderr(&out),
        format!(
            "trmx-broker: cannot listen on {} (`listen` in the config, or --listen): the \
             address is in use: is a broker already running (`systemctl status trmx-broker`)? \
             `ss -ltnp 'sport = :{port}'` shows what holds it\n",
            config.listen
        )
    );
    Ok(())
}

/// `trmx-broker admin participants --json | head -1` panicked with a backtrace ("failed
/// printing to stdout: Broken pipe") and exit status 101. A reader that goes away now
/// ends the output quietly, with success. (The registry's answer is larger than a pipe
/// holds, so the write meets the closed pipe whenever the reader goes.)
#[tokio::test]
async fn an_admin_answer_piped_into_a_reader_that_stops_early_is_no_panic() -> anyhow::Result<()> {
    let t = TestBroker::start_with(|config| {
        let template = participants().remove(0);
        for n in 0..1000 {
            config
                .participants
                .push(trmx_broker::config::ParticipantConfig {
                    id: format!("NL-X{n:04}"),
                    ..template.clone()
                });
        }
    })
    .await?;
    let alice = t.pki.federation.operator("alice")?;
    let args: Vec<String> = vec![
        "admin".into(),
        "--broker".into(),
        t.addr.to_string(),
        "--ca".into(),
        t.pki.federation.ca_cert_path().display().to_string(),
        "--cert".into(),
        alice.cert.display().to_string(),
        "--key".into(),
        alice.key.display().to_string(),
        "participants".into(),
        "--json".into(),
    ];
    let out = tokio::task::spawn_blocking(move || -> std::io::Result<std::process::Output> {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
            .args(&args)
            .env_remove("TRMX_BROKER_CONFIG")
            .env_remove("RUST_BACKTRACE")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        drop(child.stdout.take());
        child.wait_with_output()
    })
    .await??;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    Ok(())
}

/// A broker that takes the connection and answers nothing (its store stuck, as with sled's
/// hangs) kept `trmx-broker admin` waiting for ever, when the operator needs it most. It
/// now gives up after `--timeout` seconds, saying so and what to check; for a purge or
/// redrive, that it may still be carried out. (Here a TLS and HTTP/2 server with the
/// broker's certificate holds every request unanswered.)
#[tokio::test]
async fn the_admin_cli_gives_up_on_a_broker_that_answers_nothing() -> anyhow::Result<()> {
    use trmx_broker::admin_cli::{AdminCommand, execute};
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&requests);
    let (addr, silent) = fake_broker(&pki, move |_, respond| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            std::future::pending::<()>().await;
            drop(respond);
        }
    })
    .await?;
    let alice = pki.federation.operator("alice")?;
    let args = |command| alices_admin_args(&pki, &alice, addr, command);
    // (the outer limit only keeps a broken build from hanging the test run)
    let given_up = |command| async {
        tokio::time::timeout(Duration::from_secs(60), execute(args(command)))
            .await
            .expect("the admin CLI gave up by itself")
            .expect_err("no answer")
            .to_string()
    };
    let error = given_up(AdminCommand::Participants).await;
    assert_eq!(
        error,
        format!(
            "DEADLINE_EXCEEDED: no answer from the broker at {addr} within 1 s (--timeout, \
             TRMX_ADMIN_TIMEOUT): it took the connection but answered nothing; check its log \
             (`journalctl -u trmx-broker`) and its /readyz on the admin port, or give it \
             longer with --timeout."
        )
    );
    let purge = AdminCommand::Purge {
        id: "0190a5b0-0000-7000-8000-000000000000".into(),
        reason: "misaddressed".into(),
        sender: None,
    };
    let error = execute(args(purge))
        .await
        .expect_err("no answer")
        .to_string();
    assert!(
        error.ends_with("look with `admin messages --id ID` before trying again."),
        "{error}"
    );
    let watch = AdminCommand::Queues {
        watch: Some(1),
        count: Some(2),
    };
    let error = execute(args(watch))
        .await
        .expect_err("no answer")
        .to_string();
    assert!(error.starts_with("DEADLINE_EXCEEDED: no answer"), "{error}");
    // (the requests reached the server: the silence was the broker's)
    assert!(requests.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    silent.abort();
    Ok(())
}

/// `--timeout` bounded the whole command: `admin messages` over a large store, whose
/// search the broker answers in pages, failed with "no answer within N s" while pages
/// were still coming. Each call now has the limit. (Here each page comes after 0.6 s,
/// three pages with `--timeout 1`.)
#[tokio::test]
async fn the_admin_clis_timeout_is_for_each_answer_not_the_whole_search() -> anyhow::Result<()> {
    use prost::Message as _;
    use trmx_broker::admin_cli::{AdminCommand, MessageFilter, execute};
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let (addr, server) = fake_broker(&pki, |n, mut respond| async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let page = pb::SearchMessagesResponse {
            next_page_token: if n < 2 {
                format!("page-{}", n + 1)
            } else {
                String::new()
            },
            ..Default::default()
        };
        let body = page.encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(&body);
        let head = tonic::codegen::http::Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let Ok(mut stream) = respond.send_response(head, false) else {
            return;
        };
        let _ = stream.send_data(framed.into(), false);
        let mut trailers = tonic::codegen::http::HeaderMap::new();
        trailers.insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("0"),
        );
        let _ = stream.send_trailers(trailers);
    })
    .await?;
    let alice = pki.federation.operator("alice")?;
    let command = AdminCommand::Messages(MessageFilter::default());
    let args = alices_admin_args(&pki, &alice, addr, command);
    let searched = tokio::time::timeout(Duration::from_secs(60), execute(args))
        .await
        .expect("the search ended");
    server.abort();
    searched.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// An empty `admin messages --recipient ID` asks the broker's registry whether the id is
/// known, to note a likely typo; when that one extra call failed, the command exited 1
/// after the search had worked and its answer was printed, which read as a failed search.
/// The search's result decides now; the failed check is only a note. (Here a stand-in
/// broker answers the search with nothing and the registry call with UNAVAILABLE.)
#[tokio::test]
async fn an_empty_search_stays_a_success_when_the_registry_cannot_be_read() -> anyhow::Result<()> {
    use prost::Message as _;
    use trmx_broker::admin_cli::{AdminCommand, MessageFilter, execute};
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&asked);
    let (addr, server) = fake_broker(&pki, move |n, mut respond| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let head = tonic::codegen::http::Response::builder()
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let mut trailers = tonic::codegen::http::HeaderMap::new();
            if n == 0 {
                let body = pb::SearchMessagesResponse::default().encode_to_vec();
                let mut framed = vec![0u8];
                framed.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
                framed.extend_from_slice(&body);
                let Ok(mut stream) = respond.send_response(head, false) else {
                    return;
                };
                let _ = stream.send_data(framed.into(), false);
                trailers.insert(
                    "grpc-status",
                    tonic::codegen::http::HeaderValue::from_static("0"),
                );
                let _ = stream.send_trailers(trailers);
            } else {
                let Ok(mut stream) = respond.send_response(head, false) else {
                    return;
                };
                trailers.insert(
                    "grpc-status",
                    tonic::codegen::http::HeaderValue::from_static("14"),
                );
                let _ = stream.send_trailers(trailers);
            }
        }
    })
    .await?;
    let alice = pki.federation.operator("alice")?;
    let command = AdminCommand::Messages(MessageFilter {
        recipient: Some("NL-NMR".to_owned()),
        ..MessageFilter::default()
    });
    let searched = execute(alices_admin_args(&pki, &alice, addr, command)).await;
    server.abort();
    searched.map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the search and the registry"
    );
    Ok(())
}

/// `trmx-broker admin --timeout 1 <command>` by the operator `alice` to the broker at `addr`.
fn alices_admin_args(
    pki: &Pki,
    alice: &trmx_certs::CertPaths,
    addr: std::net::SocketAddr,
    command: trmx_broker::admin_cli::AdminCommand,
) -> trmx_broker::admin_cli::AdminArgs {
    trmx_broker::admin_cli::AdminArgs {
        broker: addr.to_string(),
        ca: pki.federation.ca_cert_path(),
        cert: alice.cert.clone(),
        key: alice.key.clone(),
        server_name: None,
        timeout: 1,
        json: false,
        command,
    }
}

/// A TLS and HTTP/2 server with the broker's certificate of `pki`, standing in for a
/// broker: each request (numbered from 0 over all connections) goes to `answer` with its
/// responder.
async fn fake_broker<F, Fut>(
    pki: &Pki,
    answer: F,
) -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)>
where
    F: Fn(usize, h2::server::SendResponse<bytes::Bytes>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(&pki.tls.cert)?
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&pki.tls.key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let numbered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, answer, numbered) = (
                acceptor.clone(),
                answer.clone(),
                std::sync::Arc::clone(&numbered),
            );
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut connection) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((_, respond))) = connection.accept().await {
                    let n = numbered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::spawn(answer(n, respond));
                }
            });
        }
    });
    Ok((addr, server))
}

/// `pki`'s TLS config with a broker certificate `test-1` issued at `issued_at` (by the
/// CA's clock) for `validity_days`, written as `<name>.pem`/`.key` in `dir`.
fn broker_cert_issued_at(
    pki: &Pki,
    dir: &std::path::Path,
    name: &str,
    issued_at: std::time::SystemTime,
    validity_days: u32,
) -> anyhow::Result<(trmx_broker::config::TlsConfig, trmx_certs::CertInfo)> {
    let paths = trmx_certs::CertPaths::from_prefix(&dir.join(name));
    let spec = trmx_certs::IssueSpec {
        validity_days,
        ..trmx_certs::IssueSpec::broker(
            "test-1",
            vec!["localhost".to_owned()],
            vec![std::net::IpAddr::from([127, 0, 0, 1])],
        )
    };
    let info = pki.federation.ca.issue_at(&spec, &paths, true, issued_at)?;
    let mut tls = pki.tls.clone();
    tls.cert = paths.cert;
    tls.key = paths.key;
    Ok((tls, info))
}

/// `check-config` said "config OK" for a broker certificate that had expired (every node
/// refuses the broker then) and said nothing of one about to. An expired one now fails
/// the check, naming `tls.cert`, its serial and expiry and what to do; one with less than
/// 30 days left is warned about; every check prints a `# certificate:` line.
/// A certificate not valid yet (by this machine's clock) names both clocks; by minutes it
/// is a warning.
#[test]
fn check_config_fails_an_expired_broker_certificate_and_warns_of_one_expiring() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let day = Duration::from_secs(86_400);
    let now = std::time::SystemTime::now();
    let check = |issued_at: std::time::SystemTime, validity_days: u32| {
        let (tls, info) =
            broker_cert_issued_at(&pki, dir.path(), "broker-renewed", issued_at, validity_days)?;
        let config = test_config(dir.path().join("data"), tls);
        let config_file = dir.path().join("broker.toml");
        std::fs::write(&config_file, config.to_toml()?)?;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
            .arg("check-config")
            .arg("--config")
            .arg(&config_file)
            .env_remove("TRMX_BROKER_CONFIG")
            .env("TRMX_LOG", "error")
            .output()?;
        anyhow::Ok((out, info))
    };
    let (out, info) = check(now - 40 * day, 30)?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "trmx-broker: config: tls.cert: the broker certificate {} \
             (spiffe://trm.test/broker/test-1, serial {}) expired on {}: every node refuses the \
             broker; renew it at the CA (`trmx-certs renew`), install it here and reload \
             (`systemctl reload trmx-broker`)\n",
            dir.path().join("broker-renewed.pem").display(),
            info.serial_hex,
            trmx_certs::format_time(info.not_after)
        )
    );

    let (out, info) = check(now, 10)?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("warning: tls.cert: the broker certificate "),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(", in 9 days: "), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "\n# certificate: spiffe://trm.test/broker/test-1, serial {}, expires ",
            info.serial_hex
        )),
        "{}",
        stdout(&out)
    );

    let (out, _) = check(now, 365)?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");

    // Not valid yet: one of two clocks is off, and which cannot be told here. It blamed
    // the certificate ("issue it again") when only this clock was behind; it now says
    // both cases, and what each needs. Hours ahead fail the check; minutes warn.
    let (out, info) = check(now + Duration::from_secs(2 * 3600), 365)?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let said = stderr(&out);
    assert!(
        said.starts_with(&format!(
            "trmx-broker: config: tls.cert: the broker certificate {} \
             (spiffe://trm.test/broker/test-1, serial {}): it is not valid before {}, and \
             this machine's clock says ",
            dir.path().join("broker-renewed.pem").display(),
            info.serial_hex,
            trmx_certs::format_time(info.not_before)
        )),
        "{said}"
    );
    assert!(
        said.contains(
            " minute(s) earlier: either this clock is behind (the certificate is valid for \
             nodes with a right clock, but their certificates issued in the last "
        ),
        "{said}"
    );
    assert!(
        said.contains(
            "or the CA machine's clock was ahead when it issued the certificate (nodes would \
             refuse it until "
        ),
        "{said}"
    );
    // Minutes ahead and expiring soon: both warnings (the first hid the second).
    let (out, _) = check(now + Duration::from_secs(8 * 60), 10)?;
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stderr(&out);
    let warnings: Vec<&str> = said.lines().collect();
    assert_eq!(warnings.len(), 2, "{}", stderr(&out));
    assert!(
        warnings[0].starts_with("warning: tls.cert: the broker certificate ")
            && warnings[0].contains(" minute(s) earlier: either this clock is behind"),
        "{}",
        stderr(&out)
    );
    assert!(
        warnings[1].starts_with("warning: tls.cert: the broker certificate ")
            && warnings[1].contains(" expires on ")
            && warnings[1].contains(" days: every node refuses the broker after that"),
        "{}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("minute(s)), expires "),
        "{}",
        stdout(&out)
    );
    Ok(())
}

/// The broker takes a relative path of its config from its working directory. Run from
/// another directory, a relative TLS file was "No such file", and a relative `data_dir`
/// got a new, empty store there while the real one, with every queued message, sat beside
/// the config. A relative path that names nothing from the working directory but
/// something beside the config file is now refused by `run` and `check-config`, naming
/// the field, both places and what to do; nothing is created.
#[test]
fn relative_paths_that_only_exist_beside_the_config_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let elsewhere = tempfile::tempdir()?;
    let run = |config: &BrokerConfig, command: &str| -> anyhow::Result<std::process::Output> {
        let config_file = dir.path().join("broker.toml");
        std::fs::write(&config_file, config.to_toml()?)?;
        Ok(
            std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
                .current_dir(elsewhere.path())
                .arg(command)
                .arg("--config")
                .arg(&config_file)
                .env_remove("TRMX_BROKER_CONFIG")
                .env("TRMX_LOG", "error")
                .output()?,
        )
    };
    // the TLS files by relative paths, as seen from the config's directory
    let relative = |path: &std::path::Path| -> anyhow::Result<std::path::PathBuf> {
        Ok(path.strip_prefix(dir.path())?.to_owned())
    };
    let mut tls = pki.tls.clone();
    tls.cert = relative(&tls.cert)?;
    let config = test_config(dir.path().join("data"), tls);
    let out = run(&config, "check-config")?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "trmx-broker: config: tls.cert = {:?} is a relative path, which the broker takes \
             from its working directory ({}), where there is none (it would not be found), \
             while {} is beside the config file: write absolute paths in {} (as \
             broker.example.toml does), or run from {}\n",
            config.tls.cert.display().to_string(),
            elsewhere.path().display(),
            pki.tls.cert.display(),
            dir.path().join("broker.toml").display(),
            dir.path().display()
        )
    );

    // a relative data_dir that exists beside the config: no new store elsewhere
    std::fs::create_dir(dir.path().join("data"))?;
    let config = test_config("data".into(), pki.tls.clone());
    for command in ["check-config", "run"] {
        let out = run(&config, command)?;
        assert_eq!(out.status.code(), Some(1), "{command}: {}", stdout(&out));
        assert!(
            stderr(&out).starts_with("trmx-broker: config: data_dir = \"data\" is a relative path"),
            "{command}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("(a new, empty store would be made there)"),
            "{}",
            stderr(&out)
        );
        assert!(
            !elsewhere.path().join("data").exists(),
            "{command} made a store"
        );
    }
    Ok(())
}

/// `run` started with a broker certificate hours from valid (by this clock), and every
/// node refused it at the handshake; only `check-config` said it. It is refused now with
/// check-config's message, naming both clocks; minutes ahead start with a warning. One
/// that has expired was started in silence: it starts (a renewal is taken up by a reload)
/// with check-config's error at ERROR.
#[tokio::test]
async fn run_refuses_a_broker_certificate_not_valid_yet_and_warns_within_minutes()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let now = std::time::SystemTime::now();
    let ready = dir.path().join("ready");
    let start_issued = |issued_at: std::time::SystemTime, validity_days: u32| {
        let (tls, info) =
            broker_cert_issued_at(&pki, dir.path(), "broker-ahead", issued_at, validity_days)?;
        let mut config = test_config(dir.path().join("data"), tls);
        config.limits.shutdown_grace = Duration::from_millis(200);
        let config_file = dir.path().join("broker.toml");
        std::fs::write(&config_file, config.to_toml()?)?;
        let log = dir.path().join("broker.log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
            .arg("run")
            .arg("--config")
            .arg(&config_file)
            .arg("--ready-file")
            .arg(&ready)
            .env_remove("TRMX_BROKER_CONFIG")
            .env("TRMX_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        anyhow::Ok((Process { child, log }, info))
    };
    let start = |ahead: Duration| start_issued(now + ahead, 365);

    let (mut broker, info) = start(Duration::from_secs(2 * 3600))?;
    // (until it exits, or is ready: a start would not end by itself)
    let status = loop {
        if let Some(status) = broker.child.try_wait()? {
            break Some(status);
        }
        if ready.exists() {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "it started: {}",
        broker.log()
    );
    assert!(
        broker.log().starts_with(&format!(
            "trmx-broker: config: tls.cert: the broker certificate {} \
             (spiffe://trm.test/broker/test-1, serial {}): it is not valid before {}, and \
             this machine's clock says ",
            dir.path().join("broker-ahead.pem").display(),
            info.serial_hex,
            trmx_certs::format_time(info.not_before)
        )),
        "{}",
        broker.log()
    );
    assert!(
        broker
            .log()
            .contains("or the CA machine's clock was ahead when it issued the certificate"),
        "{}",
        broker.log()
    );
    assert!(!ready.exists(), "a refused start is not ready");
    drop(broker);

    let (broker, _) = start(Duration::from_secs(8 * 60))?;
    broker.ready_file(&ready).await?;
    let warned = broker.line("it is not valid before ").await?;
    assert!(warned.contains(" WARN "), "{warned}");
    assert!(
        warned.contains(" minute(s) earlier: either this clock is behind"),
        "{warned}"
    );
    drop(broker);
    std::fs::remove_file(&ready)?;

    let day = Duration::from_secs(86_400);
    let (broker, info) = start_issued(now - 40 * day, 30)?;
    broker.ready_file(&ready).await?;
    let said = broker.line(" expired on ").await?;
    assert!(said.contains(" ERROR "), "{said}");
    assert!(
        said.contains(&format!(
            "(spiffe://trm.test/broker/test-1, serial {}) expired on {}: every node refuses \
             the broker; renew it at the CA",
            info.serial_hex,
            trmx_certs::format_time(info.not_after)
        )),
        "{said}"
    );
    Ok(())
}
