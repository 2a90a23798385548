//! A broker PROCESS killed with SIGKILL in the middle of a load, then
//! restarted, keeps and delivers every message it answered `Submit` for.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use trmx_proto::pb;

use crate::harness::*;

struct BrokerProcess {
    child: Child,
    addr: std::net::SocketAddr,
}

fn spawn_broker(config: &Path, ready: &Path) -> anyhow::Result<BrokerProcess> {
    let _ = std::fs::remove_file(ready);
    let child = Command::new(env!("CARGO_BIN_EXE_trmx-broker"))
        .arg("--config")
        .arg(config)
        .arg("--ready-file")
        .arg(ready)
        .arg("--log-level")
        .arg("warn")
        .stdout(Stdio::null())
        .spawn()
        .context("spawning trmx-broker")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let addr = loop {
        if let Ok(text) = std::fs::read_to_string(ready) {
            break text.trim().parse().context("ready file")?;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "broker not ready in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(BrokerProcess { child, addr })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_with_sigkill_keeps_every_accepted_message() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let config = test_config(dir.path().join("data"), pki.tls.clone());
    let config_path: PathBuf = dir.path().join("broker.toml");
    std::fs::write(&config_path, config.to_toml()?)?;
    let ready = dir.path().join("ready");

    let mut broker = spawn_broker(&config_path, &ready)?;
    let nl = client(broker.addr, &pki.participant("NL-NRM")?)?;
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut senders = Vec::new();
    for _ in 0..8 {
        let mut nl = nl.clone();
        let accepted = accepted.clone();
        senders.push(tokio::spawn(async move {
            loop {
                let env = envelope("BE-PAYOKE", trmx_proto::Kind::Referral, &[42; 4096]);
                let id = env.message_id.clone();
                match tokio::time::timeout(Duration::from_secs(5), submit(&mut nl, env)).await {
                    Ok(Ok(_)) => accepted.lock().expect("lock").push(id),
                    _ => break,
                }
            }
        }));
    }
    // Let the load run, then kill the process without warning.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while accepted.lock().expect("lock").len() < 300 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "load too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broker.child.kill()?; // SIGKILL
    broker.child.wait()?;
    for sender in senders {
        sender.await?;
    }
    let accepted: HashSet<String> = accepted.lock().expect("lock").iter().cloned().collect();

    let mut broker = spawn_broker(&config_path, &ready)?;
    let mut be = client(broker.addr, &pki.participant("BE-PAYOKE")?)?;
    let mut stream = receive(&mut be, 256).await?;
    let mut delivered = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !accepted.is_subset(&delivered) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{} accepted messages not delivered after restart",
            accepted.difference(&delivered).count()
        );
        let delivery = next(&mut stream).await?;
        let id = id_of(&delivery);
        let results = ack(&mut be, [&id]).await?;
        assert_eq!(results, vec![pb::AckResult::Acknowledged]);
        delivered.insert(id);
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(broker.child.id().to_string())
        .status();
    let status = broker.child.wait()?;
    assert!(status.success(), "graceful exit after SIGTERM: {status}");
    Ok(())
}
