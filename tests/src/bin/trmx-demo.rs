//! `trmx-demo`: the first run. Builds a local federation in a temp dir (CA,
//! certificates, a broker and three nodes as real processes over real mutual
//! TLS on loopback) and runs the story of DOMAIN.md through the nodes' local
//! APIs, narrating each step; exits 0 only if every message was delivered and
//! acknowledged.
//!
//! ```text
//! cargo run -p trmx-tests --bin trmx-demo            # temp dir, removed afterwards (kept if it fails)
//! cargo run -p trmx-tests --bin trmx-demo -- --dir demo-out --keep
//! ```
//!
//! The broker and the nodes are this same executable started as
//! `trmx-demo broker …` and `trmx-demo node …` (which run exactly what the
//! `trmx-broker` and `trmx-node` binaries run), so one `cargo run` builds
//! everything the demo needs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use trmx_tests::federation::{LocalFederation, STORY_MEMBERS, TRUST_DOMAIN};
use trmx_tests::process::Process;
use trmx_tests::story::{Story, connect};

/// How long a broker or node may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the DOMAIN.md demo story on a local federation.
#[derive(Debug, Parser)]
#[command(name = "trmx-demo", version)]
struct Args {
    /// Working directory for certificates, configs, databases and logs
    /// (default: a new temp dir, removed at the end unless --keep or the demo
    /// failed).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the working directory afterwards (always kept with --dir).
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    // Multi-call: `trmx-demo broker …` / `trmx-demo node …` are the daemons.
    if let Some(code) = trmx_tests::process::run_as_daemon() {
        return code;
    }
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trmx-demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("trmx-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: Args) -> anyhow::Result<bool> {
    let (temp, dir) = match &args.dir {
        Some(dir) => (None, working_dir(dir)?),
        None => {
            let temp = tempfile::Builder::new().prefix("trmx-demo-").tempdir()?;
            let dir = temp.path().to_owned();
            (Some(temp), dir)
        }
    };
    println!(
        "trmx demo: a case, end to end (working files in {})",
        dir.display()
    );
    let result = tokio::select! {
        result = run(&dir) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; every process it started has been stopped")),
    };
    // (a failed run keeps its temp dir: its logs say why, and the messages name it)
    let failed = !matches!(result, Ok(true));
    let kept = match temp {
        Some(temp) if args.keep || failed => {
            let kept = temp.keep();
            println!("working files kept in {}", kept.display());
            Some(kept)
        }
        Some(temp) => {
            // (said, since the first line named the directory: a reader would look there)
            match temp.close() {
                Ok(()) => println!("working files removed ({})", dir.display()),
                Err(e) => eprintln!(
                    "trmx-demo: could not remove the working files in {}: {e}; remove them \
                     by hand (they hold the demo CA's keys)",
                    dir.display()
                ),
            }
            None
        }
        None => {
            println!("working files kept in {}", dir.display());
            Some(dir)
        }
    };
    if !failed {
        print_next_steps(kept.as_deref());
    }
    result
}

/// After a run that went through: where a first-time reader goes from here.
fn print_next_steps(kept: Option<&Path>) {
    println!();
    println!("Where to look next");
    match kept {
        Some(dir) => {
            println!(
                "  {}  what the broker logged (no body value, at any level)",
                dir.join("broker").join("broker.log").display()
            );
            println!(
                "  {}  what each node logged",
                dir.join("<participant>").join("node.log").display()
            );
            println!(
                "  {} and <participant>/node.toml  the configs the demo wrote",
                dir.join("broker").join("broker.toml").display()
            );
            println!(
                "  (the directory holds the demo CA and its keys, and the stored messages: \
                 remove it when done)"
            );
        }
        None => println!(
            "  cargo run -p trmx-tests --bin trmx-demo -- --dir demo-out  runs it again and \
             keeps the certificates, configs, databases and logs in demo-out"
        ),
    }
    println!(
        "  README.md, \"Setting up a real federation\"  the same with trmx-certs, trmx-broker \
         and trmx-node, step by step"
    );
    println!(
        "  README.md, \"The node CLI at a glance\"  what a caseworker runs against a node \
         (inbox, case, due, send)"
    );
}

/// `--dir` made absolute (the node configs the demo writes name paths that
/// each node resolves against its own folder), and checked to be new or
/// empty: a previous run's federation there would be mixed into this one.
fn working_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = std::path::absolute(dir)
        .with_context(|| format!("--dir {}: cannot make it absolute", dir.display()))?;
    match std::fs::read_dir(&dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                anyhow::bail!(
                    "--dir {} is not empty (a previous run's federation?): \
                     name a new directory, or remove that one",
                    dir.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("--dir {}: cannot read it", dir.display()));
        }
    }
    Ok(dir)
}

/// The processes the demo started; dropping it stops them all.
type Processes = Arc<Mutex<Vec<Process>>>;

async fn run(dir: &Path) -> anyhow::Result<bool> {
    let exe = std::env::current_exe().context("locating the trmx-demo executable")?;
    let processes: Processes = Arc::default();

    println!();
    println!("Setting up the federation");
    let federation = tokio::task::spawn_blocking({
        let dir = dir.to_owned();
        move || LocalFederation::create(&dir, &STORY_MEMBERS)
    })
    .await??;
    println!(
        "  federation CA for trust domain {TRUST_DOMAIN} created; certificates issued for the broker and {}",
        STORY_MEMBERS.map(|m| m.id).join(", ")
    );
    let broker_config = federation.write_broker_config("")?;
    let broker_dir = dir.join("broker");
    let broker_addr = start(
        &processes,
        "broker",
        &exe,
        vec![
            "broker".into(),
            "--config".into(),
            broker_config.into(),
            "--ready-file".into(),
            broker_dir.join("ready").into(),
        ],
        &broker_dir.join("broker.log"),
        &broker_dir.join("ready"),
    )
    .await?;
    println!("  broker listening on {broker_addr} (TLS 1.3, client certificates required)");
    let broker_addr = broker_addr
        .parse()
        .context("reading the broker's address")?;

    let mut story = Story::new(std::io::stdout());
    for member in ["NL-NRM", "BE-PAYOKE"] {
        let socket = start_node(&processes, &federation, &exe, member, broker_addr).await?;
        story.add_node(member, connect(Path::new(&socket)).await?);
        println!("  {member} node running");
    }
    println!("  NG-NAPTIP node kept offline for now");

    let report = story
        .run(|| {
            let processes = Arc::clone(&processes);
            let federation = &federation;
            let exe = exe.clone();
            async move {
                let socket =
                    start_node(&processes, federation, &exe, "NG-NAPTIP", broker_addr).await?;
                connect(Path::new(&socket)).await
            }
        })
        .await;
    let report = match report {
        Ok(report) => report,
        Err(e) => {
            eprintln!("trmx-demo: the story stopped: {e:#}");
            eprintln!("  logs: {}", dir.display());
            return Ok(false);
        }
    };

    println!();
    let delivered = report
        .sent
        .iter()
        .filter(|s| s.received && s.delivered)
        .count();
    println!(
        "{delivered} of {} messages delivered and acknowledged; every sender holds its delivery receipt.",
        report.sent.len()
    );
    println!("Stopping the nodes and the broker");
    let mut clean = true;
    let stopped = tokio::task::spawn_blocking(move || {
        let mut all = processes
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        // Nodes first, then the broker (started first).
        all.reverse();
        all.iter_mut()
            .map(|p| (p.name().to_owned(), p.stop(Duration::from_secs(10))))
            .collect::<Vec<_>>()
    })
    .await?;
    for (name, ok) in stopped {
        if !ok {
            clean = false;
            eprintln!("  {name} did not stop cleanly");
        }
    }
    if !report.all_delivered() {
        eprintln!("trmx-demo: not every message was delivered and acknowledged");
    }
    if !report.held_while_offline {
        eprintln!(
            "trmx-demo: the request to the offline NG-NAPTIP was not held by the broker \
             (logs: {})",
            dir.display()
        );
    }
    Ok(report.all_delivered() && report.held_while_offline && clean)
}

async fn start_node(
    processes: &Processes,
    federation: &LocalFederation,
    exe: &Path,
    member: &str,
    broker: std::net::SocketAddr,
) -> anyhow::Result<String> {
    let config = federation.write_node_config(member, broker)?;
    let node_dir = federation.dir.join(member);
    start(
        processes,
        member,
        exe,
        vec![
            "node".into(),
            "--config".into(),
            config.into(),
            "run".into(),
            "--ready-file".into(),
            node_dir.join("ready").into(),
        ],
        &node_dir.join("node.log"),
        &node_dir.join("ready"),
    )
    .await
}

async fn start(
    processes: &Processes,
    name: &str,
    exe: &Path,
    args: Vec<OsString>,
    log: &Path,
    ready: &Path,
) -> anyhow::Result<String> {
    let (name, exe, log, ready) = (
        name.to_owned(),
        exe.to_owned(),
        log.to_owned(),
        ready.to_owned(),
    );
    let (process, ready) = tokio::task::spawn_blocking(move || {
        Process::start(&name, &exe, &args, &log, &ready, START_TIMEOUT)
    })
    .await??;
    processes
        .lock()
        .map_err(|_| anyhow::anyhow!("process list poisoned"))?
        .push(process);
    Ok(ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_working_dir_is_made_absolute_and_must_be_new_or_empty() {
        let relative = working_dir(Path::new("demo-out-that-does-not-exist")).unwrap();
        assert!(relative.is_absolute(), "{}", relative.display());
        assert!(relative.ends_with("demo-out-that-does-not-exist"));

        let dir = tempfile::tempdir().unwrap();
        assert_eq!(working_dir(dir.path()).unwrap(), dir.path());
        std::fs::create_dir(dir.path().join("broker")).unwrap();
        let err = working_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not empty"), "{err}");
    }
}
