//! The daemon: a [`NodeCore`] and its local API, started and stopped in order.
//!
//! [`RunningNode::start`] binds the API socket (so that a node whose socket is
//! taken starts nothing), opens the core and serves the socket in a task; when
//! it returns, the socket accepts connections. [`RunningNode::stop`]
//! stops the API first (no new requests, open `Watch` streams end, those under way
//! answer), then shuts the core down (the sends and withdrawals whose clients gave up
//! end, within `CoreConfig::shutdown_grace`; link tasks stop, the store is flushed).
//! [`run`] is the same for callers that only have a shutdown future (the binary, tests).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{bind_local_socket, serve_bound};
use crate::config::NodeConfig;
use crate::core::{Clock, NodeCore, NodeError};

/// A node started in this process: core + local API.
#[derive(Debug)]
pub struct RunningNode {
    core: NodeCore,
    socket: PathBuf,
    stop_api: Option<oneshot::Sender<()>>,
    api: JoinHandle<Result<(), NodeError>>,
}

impl RunningNode {
    /// Validates `config`, binds the local API socket, starts the core with
    /// `clock` and starts serving the socket.
    pub async fn start(
        config: &NodeConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<RunningNode, NodeError> {
        config.validate()?;
        // The socket first: a second node configured on the socket of a
        // running one must stop before its core opens a store and takes
        // deliveries from the broker into it, where no integration sees them.
        let socket_path = config.socket_path();
        let socket = bind_local_socket(&socket_path)?;
        // (an error drops `socket`, which removes the file)
        let core = NodeCore::start(config.core_config()?, Arc::clone(&clock)).await?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let limits = config.api_limits();
        let api = tokio::spawn(serve_bound(
            core.clone(),
            clock,
            socket,
            limits,
            async move {
                let _ = stop_rx.await;
            },
        ));
        tracing::info!(
            participant = %config.participant,
            socket = %socket_path.display(),
            "node started"
        );
        Ok(RunningNode {
            core,
            socket: socket_path,
            stop_api: Some(stop_tx),
            api,
        })
    }

    /// The local API socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The core (for in-process tests).
    pub fn core(&self) -> &NodeCore {
        &self.core
    }

    /// Runs until `shutdown` completes (or the local API fails), then stops.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
        tokio::select! {
            () = shutdown => self.stop().await,
            joined = &mut self.api => {
                // The API stopped on its own: that is an error; still close the core.
                self.stop_api = None;
                self.core.shutdown().await;
                match joined {
                    Ok(Ok(())) => Err(NodeError::Config("api.socket: local api stopped unexpectedly".to_owned())),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(NodeError::Config(format!("api.socket: local api task failed: {e}"))),
                }
            }
        }
    }

    /// Stops the local API (open streams end), then the core.
    pub async fn stop(mut self) -> Result<(), NodeError> {
        if let Some(stop) = self.stop_api.take() {
            let _ = stop.send(());
        }
        let api = (&mut self.api).await;
        self.core.shutdown().await;
        tracing::info!(socket = %self.socket.display(), "node stopped");
        match api {
            Ok(result) => result,
            Err(e) => Err(NodeError::Config(format!(
                "api.socket: local api task failed: {e}"
            ))),
        }
    }
}

/// Runs a node with the (guarded) system clock until `shutdown` completes.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    RunningNode::start(&config, config.clock())
        .await?
        .run_until(shutdown)
        .await
}
