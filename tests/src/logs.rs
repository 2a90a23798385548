//! [`LogCapture`]: every log line of the in-process broker and nodes that run on the
//! calling thread, at `trace`, for a test to search (a line at ERROR, a message id, a
//! marker of personal data). Tests that use it run on one thread, so that every task of
//! the broker and the nodes logs into it: [`run_captured`] runs a test so.

use std::sync::{Arc, Mutex, PoisonError};

/// Every log line of this thread at `trace`, while it lives.
#[derive(Debug)]
pub struct LogCapture {
    lines: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Starts capturing this thread's log lines.
    pub fn start() -> LogCapture {
        // tracing caches, for the whole process, whether a log line's callsite interests
        // any subscriber, the first time a thread reaches it; while one subscriber only
        // exists, it asks just the reaching thread's own. A thread without a capture (a
        // broker's writer or blocking thread, another test's) then cached "never", and a
        // capture lost that line for good. A global subscriber that takes every line (and
        // drops it) makes every subscriber asked; installing it re-asks the callsites
        // cached before.
        static ANCHOR: std::sync::Once = std::sync::Once::new();
        ANCHOR.call_once(|| {
            let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
        });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&lines);
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_ansi(false)
            .with_writer(move || LogWriter(Arc::clone(&writer)))
            .finish();
        LogCapture {
            lines,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// What was captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lines.lock().unwrap_or_else(PoisonError::into_inner))
            .into_owned()
    }
}

/// Runs `test` on a runtime of one thread, with a [`LogCapture`] of it that outlives the
/// runtime: the tasks a test leaves behind (a failed test skips its shutdown) end with
/// the runtime, and their spans close in the subscriber that opened them. (Closed after
/// the capture, under `#[tokio::test]`, they reached the global subscriber, which knows
/// none of them and panics.)
pub fn run_captured<T>(test: impl AsyncFnOnce(&LogCapture) -> T) -> T {
    let logs = LogCapture::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot build a runtime for the test: {e}"));
    let result = runtime.block_on(test(&logs));
    drop(runtime);
    result
}
