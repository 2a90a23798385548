//! Crash safety (issue 7, item 1), fast variants: real broker and node
//! processes (the `trmx-demo` multi-call binary) killed with SIGKILL, or the
//! broker aborted at a named fail point of its store, while two senders send
//! a few hundred messages; each run ends with the checker of
//! `trmx_tests::chaos`: nothing lost, nothing doubled at the application,
//! every sender holding its delivery receipts. The long run is
//! `cargo run --release -p trmx-tests --bin trmx-chaos`.
//!
//! Every run prints its seed; `TRMX_CHAOS_SEED=<seed>` replays its schedule.

use std::path::Path;
use std::time::Duration;

use trmx_tests::chaos::{self, ChaosPlan, ChaosReport, Fault, Point, seed_from_env};

const DEMO: &str = env!("CARGO_BIN_EXE_trmx-demo");

/// Runs two senders × `messages / 2` with `faults` and returns the figures
/// (the working directory is kept when the checker is unhappy).
async fn chaos_run(messages: usize, faults: Vec<Fault>) -> anyhow::Result<ChaosReport> {
    let seed = seed_from_env()?;
    eprintln!("chaos seed {seed} (replay: TRMX_CHAOS_SEED={seed})");
    let dir = tempfile::Builder::new().prefix("trmx-chaos-").tempdir()?;
    let plan = ChaosPlan {
        senders: 2,
        messages,
        faults,
        seed,
        window: 24,
        settle: Duration::from_secs(40),
        // some messages in sled's blob files, through every kill
        attachment_every: 10,
        verbose: true,
    };
    let report = chaos::run(Path::new(DEMO), dir.path(), &plan).await;
    match &report {
        Ok(report) if report.ok() => eprintln!("{report}"),
        Ok(report) => eprintln!("{report}\nlogs kept in {}", dir.keep().display()),
        Err(e) => eprintln!(
            "chaos run failed: {e:#}\nlogs kept in {}",
            dir.keep().display()
        ),
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_sigkilled_at_random_moments_loses_nothing_and_doubles_nothing()
-> anyhow::Result<()> {
    let report = chaos_run(240, vec![Fault::BrokerKill, Fault::BrokerKill]).await?;
    assert!(report.ok(), "{report}");
    assert!(report.store_consistent, "checked by store verify: {report}");
    assert_eq!(report.messages_sent, 240);
    assert_eq!(report.broker_kills_random, 2);
    assert_eq!(report.broker_incarnations, 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_aborted_at_each_fail_point_loses_nothing_and_doubles_nothing()
-> anyhow::Result<()> {
    let faults = Point::ALL.into_iter().map(Fault::BrokerAt).collect();
    let report = chaos_run(240, faults).await?;
    assert!(report.ok(), "{report}");
    assert!(report.fail_points_missed.is_empty(), "{report}");
    for point in Point::ALL {
        assert_eq!(
            report.broker_kills_at.get(point.name()),
            Some(&1),
            "{report}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_node_sigkilled_mid_stream_sees_each_message_once() -> anyhow::Result<()> {
    let report = chaos_run(240, vec![Fault::RecipientKill, Fault::RecipientKill]).await?;
    assert!(report.ok(), "{report}");
    assert_eq!(report.recipient_kills, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_node_sigkilled_with_messages_in_its_outbox_delivers_them_all()
-> anyhow::Result<()> {
    let report = chaos_run(240, vec![Fault::SenderKill, Fault::SenderKill]).await?;
    assert!(report.ok(), "{report}");
    assert_eq!(report.sender_kills.len(), 2);
    assert!(
        report.sender_kills.iter().any(|queued| *queued > 0),
        "a sender node must die with messages in its outbox: {report}"
    );
    Ok(())
}
