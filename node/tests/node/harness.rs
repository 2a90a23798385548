//! Shared test helpers: a federation with one node certificate, a broker
//! address nothing listens on (and nothing else can take), and an in-process node
//! with a manual clock.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use trmx_node::NodeConfig;
use trmx_node::RunningNode;
use trmx_node::core::ManualClock;

/// The demo referral (valid).
pub(crate) const REFERRAL_JSON: &str = include_str!("../../../proto/examples/01-referral.json");

/// A temp dir with certificates for `NL-NRM` and a node config pointing at a
/// closed port.
pub(crate) struct Sandbox {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config: NodeConfig,
    /// The port of `config.broker`, held for as long as the sandbox lives.
    _broker_port: ClosedPort,
}

impl Sandbox {
    pub(crate) fn new() -> Sandbox {
        let dir = tempfile::tempdir().expect("temp dir");
        let federation =
            trmx_certs::Federation::create(&dir.path().join("pki"), "trmx.test").expect("ca");
        let node = federation.participant("NL-NRM").expect("node cert");
        let tls = trmx_transport::TlsPaths {
            ca: federation.ca_cert_path(),
            cert: node.cert,
            key: node.key,
        };
        let broker_port = ClosedPort::new();
        let mut config = NodeConfig::new(
            "NL-NRM",
            dir.path().join("data"),
            &broker_port.addr.to_string(),
            "localhost",
            tls,
        );
        // Keep the failing reconnects cheap.
        config.broker.reconnect_min_ms = 50;
        config.broker.reconnect_max_ms = 200;
        Sandbox {
            dir,
            config,
            _broker_port: broker_port,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the node in this process with a manual clock at "now".
    pub(crate) async fn start(&self) -> RunningNode {
        RunningNode::start(&self.config, Arc::new(ManualClock::new(SystemTime::now())))
            .await
            .expect("node starts with the broker down")
    }

    /// Writes a file into the sandbox.
    pub(crate) fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, content).expect("write file");
        path
    }
}

/// A port on 127.0.0.1 where nothing listens, for as long as the value lives: a socket
/// bound to it that never listens, so that a connection is refused and no other test
/// can take the port (one bound, then closed, could be taken by a test running in
/// parallel, and the node would talk to that).
pub(crate) struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    pub(crate) addr: std::net::SocketAddr,
}

impl ClosedPort {
    pub(crate) fn new() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        ClosedPort {
            _socket: socket,
            addr,
        }
    }
}

/// Polls `check` until it returns true or `deadline` passes.
pub(crate) async fn eventually(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The referral with one JSON field removed (dotted path of object keys).
pub(crate) fn referral_without(path: &[&str]) -> String {
    let mut value: serde_json::Value = serde_json::from_str(REFERRAL_JSON).expect("example json");
    let (last, parents) = path.split_last().expect("path");
    let mut node = &mut value;
    for key in parents {
        node = node.get_mut(*key).expect("key");
    }
    node.as_object_mut().expect("object").remove(*last);
    serde_json::to_string_pretty(&value).expect("json")
}

/// The log lines written on this thread (a current-thread `#[tokio::test]` runtime and its
/// tasks) while it lives, at INFO and above (or at the filter of [`LogCapture::start_at`]).
pub(crate) struct LogCapture {
    lines: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    pub(crate) fn start() -> LogCapture {
        LogCapture::start_at("info")
    }

    /// A capture at the tracing filter `filter` (e.g. `trace`).
    pub(crate) fn start_at(filter: &str) -> LogCapture {
        // tracing caches, for the whole process, whether a log line's callsite interests
        // any subscriber, the first time a thread reaches it. While one subscriber only
        // exists (this capture), it asks just the reaching thread's own: another test's
        // thread, without a capture, cached "never", and this capture lost that line for
        // good. A global subscriber that takes every line (and drops it) makes two, so
        // that every subscriber is asked; installing it re-asks the callsites cached
        // before. (As the node library's own tests do.)
        static ANCHOR: std::sync::Once = std::sync::Once::new();
        ANCHOR.call_once(|| {
            let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
        });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&lines);
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || LogWriter(Arc::clone(&writer)))
            .finish();
        LogCapture {
            lines,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// Everything written so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.lines.lock().expect("log lock")).into_owned()
    }

    /// The lines that contain every one of `parts`.
    pub(crate) fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        String::from_utf8_lossy(&self.lines.lock().expect("log lock"))
            .lines()
            .filter(|line| parts.iter().all(|p| line.contains(p)))
            .map(str::to_owned)
            .collect()
    }
}

/// A line is captured although another thread, without a capture, reached its callsite
/// first while this capture was the only subscriber (tracing had cached that the line
/// interested nobody, and the capture missed it: `probes`' "logs too thin" now and then).
#[test]
fn a_capture_gets_a_line_another_thread_reached_first() {
    fn said() {
        tracing::info!("said once here, once there");
    }
    let logs = LogCapture::start();
    std::thread::spawn(said).join().expect("the other thread");
    said();
    assert_eq!(
        logs.lines_with(&["said once here, once there"]).len(),
        1,
        "{}",
        logs.text()
    );
}
