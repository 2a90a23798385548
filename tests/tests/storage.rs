//! Storage faults (issue 7, item 6) on the real broker executable (the
//! `trmx-demo broker` multi-call): a data directory that cannot be written or
//! is locked by another broker stops the start with one clear line naming the
//! directory; a disk that fails during a run (the test-only
//! `TRMX_BROKER_FAULT_FILE`: flushes fail while the file exists) makes the
//! broker refuse to acknowledge (UNAVAILABLE), say why in its log and on
//! `/readyz`, and resume without loss once writes succeed again.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tonic::Code;
use trmx_broker::BrokerConfig;
use trmx_proto::{Kind, pb};
use trmx_tests::chaos::{FAULT_FILE_ENV, Fleet, RECIPIENT};
use trmx_tests::harness::{WAIT, envelope, json_request, wait_until, watch_all};
use trmx_tests::story::EXAMPLES;

type TestResult = anyhow::Result<()>;

const DEMO: &str = env!("CARGO_BIN_EXE_trmx-demo");

/// Runs `trmx-demo broker --config <config>` and expects it to fail at start:
/// returns its exit code and its stderr.
fn failed_start(config: &Path) -> anyhow::Result<(Option<i32>, String)> {
    let mut child = Command::new(DEMO)
        .args([
            OsString::from("broker"),
            "--config".into(),
            config.into(),
            "--log-level".into(),
            "warn".into(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("the broker did not fail at start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr)?;
    }
    Ok((status.code(), stderr))
}

/// The one error line of a failed start: exit code 1, exactly one
/// `trmx-broker: ` line, naming `dir`.
fn assert_one_clear_line(code: Option<i32>, stderr: &str, dir: &Path) -> String {
    assert_eq!(code, Some(1), "exit code; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("trmx-broker: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line; stderr:\n{stderr}");
    assert!(
        lines[0].contains(&dir.display().to_string()),
        "the line names {}: {stderr}",
        dir.display()
    );
    lines[0].to_owned()
}

/// Writes a copy of the fleet's broker config with `data_dir`, another
/// listen port and no admin endpoint.
fn config_variant(fleet: &Fleet, name: &str, data_dir: &Path) -> anyhow::Result<PathBuf> {
    let mut config = BrokerConfig::load(&fleet.broker_config)?;
    config.data_dir = data_dir.to_owned();
    config.listen = "127.0.0.1:0".parse()?;
    config.admin_listen = None;
    let path = fleet.dir.join(name);
    std::fs::write(&path, config.to_toml()?)?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_that_cannot_be_written_fails_the_start_with_one_clear_line() -> TestResult
{
    let temp = tempfile::tempdir()?;
    let fleet = Fleet::create(temp.path(), Path::new(DEMO), 1, |_| {}).await?;

    // A file where the directory should be created.
    let blocker = fleet.dir.join("not-a-directory");
    std::fs::write(&blocker, b"")?;
    let under_a_file = blocker.join("data");
    let config = config_variant(&fleet, "under-a-file.toml", &under_a_file)?;
    let (code, stderr) = tokio::task::spawn_blocking(move || failed_start(&config)).await??;
    assert_one_clear_line(code, &stderr, &under_a_file);

    // A directory without write permission (meaningless for root, who may write anyway).
    let read_only = fleet.dir.join("read-only");
    std::fs::create_dir(&read_only)?;
    set_mode(&read_only, 0o500)?;
    let writable_anyway = std::fs::write(read_only.join("probe"), b"").is_ok();
    if writable_anyway {
        eprintln!("running as a user who may write anywhere: read-only directory case skipped");
    } else {
        let config = config_variant(&fleet, "read-only.toml", &read_only)?;
        let (code, stderr) = tokio::task::spawn_blocking(move || failed_start(&config)).await??;
        let line = assert_one_clear_line(code, &stderr, &read_only);
        assert!(line.contains("not writable"), "{line}");
    }
    set_mode(&read_only, 0o700)?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_locked_by_a_running_broker_fails_the_start_with_one_clear_line()
-> TestResult {
    let temp = tempfile::tempdir()?;
    let mut fleet = Fleet::create(temp.path(), Path::new(DEMO), 1, |_| {}).await?;
    fleet.start_broker(&[]).await?;
    let data_dir = BrokerConfig::load(&fleet.broker_config)?.data_dir;
    let config = config_variant(&fleet, "second.toml", &data_dir)?;
    let (code, stderr) = tokio::task::spawn_blocking(move || failed_start(&config)).await??;
    let line = assert_one_clear_line(code, &stderr, &data_dir);
    assert!(line.contains("locked"), "{line}");
    // The first broker is unharmed.
    let mut client = fleet.exchange(&fleet.senders[0])?;
    client.get_info(pb::GetInfoRequest {}).await?;
    assert!(fleet.stop_all().await?, "clean stop");
    Ok(())
}

/// `GET path` on the admin endpoint: (status code, body).
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(WAIT))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        anyhow::Ok((code, body))
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_disk_stops_acknowledgements_says_why_and_resumes_without_loss() -> TestResult {
    let temp = tempfile::tempdir()?;
    let mut fleet = Fleet::create(temp.path(), Path::new(DEMO), 1, |_| {}).await?;
    let fault = fleet.dir.join("disk-fails");
    fleet
        .start_broker(&[(FAULT_FILE_ENV.to_owned(), fault.display().to_string())])
        .await?;
    let sender = fleet.senders[0].clone();
    let mut nl = fleet.start_node(&sender).await?;
    let mut be = fleet.start_node(RECIPIENT).await?;
    let mut ids = Vec::new();
    let send = |key: String| json_request(&key, RECIPIENT, Kind::Referral, EXAMPLES[0]);
    for k in 0..10 {
        ids.push(
            nl.send(send(format!("disk-{k}")))
                .await?
                .into_inner()
                .message_id,
        );
    }
    wait_delivered(&nl, ids.len()).await?;
    assert_eq!(http_get(fleet.admin_addr, "/readyz").await?.0, 200);

    // The disk fails: a submit is refused with UNAVAILABLE, not acknowledged.
    std::fs::write(&fault, b"")?;
    let mut direct = fleet.exchange(&sender)?;
    let refused = wait_until(WAIT, "a submit refused with UNAVAILABLE", || {
        let mut direct = direct.clone();
        async move {
            let env = envelope(RECIPIENT, Kind::Referral, referral_body());
            Ok(direct
                .submit(pb::SubmitRequest {
                    envelope: Some(env),
                })
                .await
                .err()
                .filter(|s| s.code() == Code::Unavailable))
        }
    })
    .await?;
    assert!(refused.message().contains("retry"), "{refused:?}");
    // Messages sent meanwhile wait in the node's outbox.
    for k in 10..20 {
        ids.push(
            nl.send(send(format!("disk-{k}")))
                .await?
                .into_inner()
                .message_id,
        );
    }
    let (code, body) = http_get(fleet.admin_addr, "/readyz").await?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("store_writable false"), "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = nl
        .get_node_status(pb::GetNodeStatusRequest {})
        .await?
        .into_inner();
    assert!(
        status.outbox_queued > 0,
        "nothing is acknowledged while the disk fails: {status:?}"
    );
    let log = std::fs::read_to_string(fleet.broker.log())?;
    assert!(log.contains("store flush failed"), "{log}");
    assert!(log.contains("injected storage fault"), "{log}");
    assert!(log.contains("refusing submits"), "{log}");

    // Repaired: writes succeed again, everything is delivered, once.
    std::fs::remove_file(&fault)?;
    wait_delivered(&nl, ids.len()).await?;
    wait_until(WAIT, "/readyz 200 again", || async {
        Ok((http_get(fleet.admin_addr, "/readyz").await?.0 == 200).then_some(()))
    })
    .await?;
    direct
        .submit(pb::SubmitRequest {
            envelope: Some(envelope(RECIPIENT, Kind::Referral, referral_body())),
        })
        .await?;
    let mut copies: HashMap<String, usize> = HashMap::new();
    for entry in watch_all(&mut be, ids.len()).await? {
        *copies.entry(entry.message_id).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(copies.get(id), Some(&1), "{id}: {copies:?}");
    }
    assert!(fleet.stop_all().await?, "clean stop");
    Ok(())
}

/// A valid referral body (protobuf).
fn referral_body() -> Vec<u8> {
    trmx_proto::body::Body::from_json(Kind::Referral, EXAMPLES[0])
        .expect("the example is valid")
        .encode()
}

/// Waits until `count` outbox entries are DELIVERED.
async fn wait_delivered(api: &trmx_tests::harness::Api, count: usize) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(20), "every message delivered", || {
        let mut api = api.clone();
        async move {
            let entries = api
                .list_outbox(pb::ListOutboxRequest {
                    limit: 10_000,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .entries;
            let delivered = entries
                .iter()
                .filter(|e| e.state == pb::OutboxState::Delivered as i32)
                .count();
            Ok((delivered == count).then_some(()))
        }
    })
    .await?;
    Ok(())
}
