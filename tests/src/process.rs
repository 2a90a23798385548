//! Child processes of the demo and the end-to-end tests: a broker or a node
//! started from a real executable, with its output in a log file, its
//! readiness read from a `--ready-file`, and a guaranteed stop (SIGTERM, then
//! SIGKILL) even when the caller fails or is interrupted. [`ReservedPort`]
//! keeps a broker's address its own across restarts.

use std::ffi::OsString;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A loopback port held for a broker that stops and starts again on the same address
/// (the nodes' configs name it): a socket bound to it with `SO_REUSEADDR` that never
/// listens, kept as long as the value lives.
///
/// While the broker is down, a connection to the port is refused, as to a closed port,
/// and no other socket can take the port: Linux gives it to no `:0` bind and no outgoing
/// connection, and refuses it to a bind without `SO_REUSEADDR` and to any bind while a
/// listener holds it. The broker's listener binds it at each start, in this process or a
/// child (tokio's `TcpListener::bind` sets `SO_REUSEADDR`). Releasing the port between
/// two incarnations instead would let a test running in parallel take it.
#[derive(Debug)]
pub struct ReservedPort {
    _socket: tokio::net::TcpSocket,
    addr: SocketAddr,
}

impl ReservedPort {
    /// Reserves a free port on 127.0.0.1.
    pub fn new() -> anyhow::Result<Self> {
        let socket = tokio::net::TcpSocket::new_v4().context("creating a socket")?;
        socket.set_reuseaddr(true)?;
        socket
            .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .context("reserving a loopback port")?;
        let addr = socket.local_addr()?;
        Ok(Self {
            _socket: socket,
            addr,
        })
    }

    /// `127.0.0.1:<the port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A started broker or node process. Dropping it stops the process.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `program args…` with stdout and stderr appended to `log`, then
    /// waits (at most `timeout`) until it has written `ready_file`, whose
    /// trimmed content is returned (the broker writes its bound address, the
    /// node its socket path).
    pub fn start(
        name: &str,
        program: &Path,
        args: &[OsString],
        log: &Path,
        ready_file: &Path,
        timeout: Duration,
    ) -> anyhow::Result<(Self, String)> {
        Self::start_with_env(name, program, args, &[], log, ready_file, timeout)
    }

    /// Like [`Process::start`], with extra environment variables `env`
    /// (name, value) set on the child only (e.g. a test fail point).
    pub fn start_with_env(
        name: &str,
        program: &Path,
        args: &[OsString],
        env: &[(&str, &str)],
        log: &Path,
        ready_file: &Path,
        timeout: Duration,
    ) -> anyhow::Result<(Self, String)> {
        // A ready file from an earlier run would make us think it is ready.
        match std::fs::remove_file(ready_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", ready_file.display())),
        }
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let mut process = Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(ready_file)
                && !text.trim().is_empty()
            {
                return Ok((process, text.trim().to_owned()));
            }
            if let Some(status) = process
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "{name} exited during start-up ({status}); see {}",
                    log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} was not ready after {timeout:?}; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where its output goes.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Asks the process to stop (SIGTERM), waits up to `grace`, then kills it.
    /// Returns whether it stopped on its own with a success status.
    pub fn stop(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        signal(&child, "TERM");
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    }

    /// Waits (at most `timeout`) until the process exits on its own and
    /// returns its exit status; afterwards the process counts as stopped.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let name = &self.name;
        let Some(child) = self.child.as_mut() else {
            bail!("{name} is not running");
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for {name}"))?
            {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} still runs after {timeout:?}; see {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if the process has exited on its own, without waiting;
    /// afterwards the process counts as stopped.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// Kills the process at once (SIGKILL), like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Sends a signal with the system `kill` command (no unsafe code needed).
fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Multi-call: when this executable was started as `<exe> broker …` or
/// `<exe> node …`, runs exactly what `trmx-broker …` / `trmx-node …` run and
/// returns its exit code; otherwise `None`. The demo and the chaos runner
/// start their daemons this way, so one `cargo run` builds everything.
pub fn run_as_daemon() -> Option<ExitCode> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let daemon = args.get(1).and_then(|a| a.to_str()).map(str::to_owned)?;
    match daemon.as_str() {
        "broker" => {
            args.remove(1);
            args[0] = "trmx-broker".into();
            Some(trmx_broker::cli::main(args))
        }
        "node" => {
            args.remove(1);
            args[0] = "trmx-node".into();
            let code = trmx_node::cli::main_with_args(args);
            Some(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a broker restarted on its address relies on: between two incarnations the
    /// port stays refused and taken, and each incarnation can bind it.
    #[tokio::test]
    async fn a_reserved_port_is_refused_while_down_taken_for_others_and_free_for_the_broker() {
        let port = ReservedPort::new().unwrap();
        for _ in 0..2 {
            let refused = tokio::net::TcpStream::connect(port.addr()).await;
            assert_eq!(
                refused.map(drop).map_err(|e| e.kind()),
                Err(std::io::ErrorKind::ConnectionRefused)
            );
            // another socket cannot have it (a port bound, then released, it could)
            let other = tokio::net::TcpSocket::new_v4().unwrap();
            assert_eq!(
                other.bind(port.addr()).map_err(|e| e.kind()),
                Err(std::io::ErrorKind::AddrInUse)
            );
            // the broker's listener can
            let listener = tokio::net::TcpListener::bind(port.addr()).await.unwrap();
            tokio::net::TcpStream::connect(port.addr()).await.unwrap();
            drop(listener);
        }
    }
}
