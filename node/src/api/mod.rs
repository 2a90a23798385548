//! The local API: the `trmx.v1.NodeApi` gRPC service over a Unix socket,
//! wrapping a [`NodeCore`].
//!
//! - [`serve_local_api`] binds the socket (mode 0600) and serves until the
//!   shutdown future completes; [`bind_local_socket`] + [`serve_bound`] do the
//!   same in two steps, so a caller knows the socket accepts connections
//!   before it serves.
//! - `convert` (private) turns requests into core calls and core results into
//!   wire messages; [`status`] is the one place where a [`NodeError`] becomes a
//!   [`tonic::Status`].
//! - [`client`]: [`client::connect_local`], the client side used by the CLI and
//!   by tests.
//! - `limits` (private): [`ApiLimits`] — connections and `Watch` streams open at
//!   once, beyond the per-connection caps (streams, request size) set here.
//!
//! # Socket
//! The socket is bound inside a fresh directory of mode 0700 next to the
//! target path (`.t<pid in base 36>/s`, no longer than `node.sock`: a path that
//! fits a Unix socket fits staged too, see [`socket_bind_len`]), set to mode
//! 0600, then linked into place (never over an existing file): at no moment can
//! another user connect. The directory must be the node's user's (or root's)
//! and not writable by every user, who could replace the socket. A socket file left
//! by a crashed node is removed only if nothing answers on it; a socket in
//! use, or a path that is not a socket, is an error. The file is removed when
//! the server stops (if it is still ours).

pub mod client;
mod convert;
mod limits;
pub mod status;

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use trmx_proto::pb;
use trmx_proto::pb::node_api_server::{NodeApi, NodeApiServer};
use trmx_proto::time::Date;

use crate::core::{Clock, MessageView, NodeCore, NodeError, SystemClock};
pub use limits::ApiLimits;
use limits::WatchSlots;
pub use status::to_status;

/// Largest request the local API decodes (a body with attachments).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// Concurrent HTTP/2 streams per connection (watch streams included).
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams a connection may make the local API reset (stream errors, refused streams)
/// before it is closed: hyper's own default, which tonic does not pass on (the broker
/// sets the same, `broker/src/server.rs`).
const LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Binds the local API socket at `socket_path` with mode 0600 and serves
/// `NodeApi` on it, with the default [`ApiLimits`], until `shutdown` completes;
/// open `Watch` streams end then. The socket file is removed when the server
/// stops.
pub async fn serve_local_api(
    core: NodeCore,
    socket_path: &Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let socket = bind_local_socket(socket_path)?;
    serve_bound(
        core,
        Arc::new(SystemClock),
        socket,
        ApiLimits::default(),
        shutdown,
    )
    .await
}

/// A bound local API socket; the socket file is removed when it is dropped
/// (if the file is still the one this node created).
#[derive(Debug)]
pub struct LocalSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl LocalSocket {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LocalSocket {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.dev_ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn socket_error(path: &Path, what: &str, e: impl std::fmt::Display) -> NodeError {
    NodeError::Config(format!("api.socket: {what} {}: {e}", path.display()))
}

/// The longest Unix socket path: `sun_path` holds 108 bytes with the terminating NUL.
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Name of the socket inside its staging directory.
const STAGED_NAME: &str = "s";

/// The most bytes the staged socket path adds to its directory's path:
/// `/.t` + the process id in base 36 (at most 5 digits: Linux's `pid_max` is at
/// most 2^22) + `/s`. No more than `/node.sock` adds: a default socket path that
/// fits fits staged too.
pub const STAGING_OVERHEAD_BYTES: usize = 10;

/// The private directory in which the socket for a path in `parent` is bound
/// first: short, so that the staged path is not longer than the socket's own
/// (see [`STAGING_OVERHEAD_BYTES`]).
fn staging_dir(parent: &Path) -> PathBuf {
    let mut pid = std::process::id();
    let mut digits = Vec::new();
    loop {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(pid % 36) as usize]);
        pid /= 36;
        if pid == 0 {
            break;
        }
    }
    digits.reverse();
    parent.join(format!(".t{}", String::from_utf8_lossy(&digits)))
}

/// How long a path the node needs to bind the socket at `path`: the longer of the
/// path and its staged form (see the module docs). More than
/// [`MAX_SOCKET_PATH_BYTES`] cannot be bound.
pub fn socket_bind_len(path: &Path) -> usize {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.as_os_str().len(),
        _ => 1,
    };
    path.as_os_str().len().max(parent + STAGING_OVERHEAD_BYTES)
}

/// Refuses a socket `path` that a client could not connect to, or whose `staged` form
/// could not be bound, with what to do (the system's own "path must be shorter than
/// SUN_LEN" names neither the path nor the limit).
fn check_bind_len(path: &Path, staged: &Path) -> Result<(), NodeError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH_BYTES {
        return Err(NodeError::Config(format!(
            "api.socket: {} is {len} bytes long, and a Unix socket path holds at most \
             {MAX_SOCKET_PATH_BYTES}: use a shorter path",
            path.display()
        )));
    }
    let needed = staged.as_os_str().len();
    if needed > MAX_SOCKET_PATH_BYTES {
        return Err(NodeError::Config(format!(
            "api.socket: {} is too long to bind: the node binds the socket first as {} \
             ({needed} bytes, and a Unix socket path holds at most {MAX_SOCKET_PATH_BYTES}), \
             then moves it into place; use a path whose directory is at most {} bytes long",
            path.display(),
            staged.display(),
            MAX_SOCKET_PATH_BYTES - STAGING_OVERHEAD_BYTES
        )));
    }
    Ok(())
}

/// Binds the local API socket at `path` (mode 0600, see the module docs).
/// Must be called inside a tokio runtime.
pub fn bind_local_socket(path: &Path) -> Result<LocalSocket, NodeError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // (before anything is created: a path that cannot be bound changes nothing)
    let staging = staging_dir(&parent);
    let staged = staging.join(STAGED_NAME);
    check_bind_len(path, &staged)?;
    // (nothing is made below a directory refused)
    if std::fs::metadata(&parent).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        check_socket_dir_ancestors(&parent, rustix::process::geteuid().as_raw())?;
    }
    // (private, as the data directory the socket is usually in: the node
    // binds before its store creates that)
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                // (`create` says "File exists" of a file where the directory should be)
                NodeError::Config(format!(
                    "api.socket: {} is not a directory, so the socket {} cannot be made in \
                     it: set api.socket to a path in a directory",
                    parent.display(),
                    path.display()
                ))
            } else {
                socket_error(&parent, "cannot create", e)
            }
        })?;

    // (before the node touches anything in it: a directory it refuses, another user's
    // `.t<pid>` in it included, is left as it is)
    check_socket_dir(&parent, rustix::process::geteuid().as_raw())?;
    // Bind in a private directory, restrict the mode, then move into place.
    if std::fs::symlink_metadata(&staging).is_ok() {
        std::fs::remove_dir_all(&staging)
            .map_err(|e| socket_error(&staging, "cannot remove", e))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                // (of the directory configured: `.t<pid>` is no name the operator gave)
                NodeError::Config(format!(
                    "api.socket: the node's user (uid {}) cannot make files in {} ({e}), \
                     where the node makes its socket: use a directory that user owns, e.g. \
                     /run/trmx-node (systemd's RuntimeDirectory=trmx-node)",
                    rustix::process::geteuid().as_raw(),
                    parent.display()
                ))
            } else {
                socket_error(&staging, "cannot create", e)
            }
        })?;
    if let Err(e) = remove_stale_socket(path) {
        let _ = std::fs::remove_dir(&staging);
        return Err(e);
    }
    let result = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged)
            .map_err(|e| socket_error(path, "cannot bind", e))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| socket_error(path, "cannot set mode 0600 on", e))?;
        move_into_place(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&staging);
    let listener = result?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| socket_error(path, "cannot stat", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| socket_error(path, "cannot configure", e))?;
    let listener =
        UnixListener::from_std(listener).map_err(|e| socket_error(path, "cannot register", e))?;
    Ok(LocalSocket {
        listener: Some(listener),
        path: path.to_path_buf(),
        dev_ino: (meta.dev(), meta.ino()),
    })
}

/// Refuses a socket directory `dir` that another user could write (not the node's
/// user's, nor root's, or writable by every user): that user could put a socket of
/// their own in place of the node's (with the sticky bit of `/tmp`, while the node is
/// stopped) and receive what the CLI and case-management systems send, personal data
/// included. (A directory writable by its group passes: with a umask of 002 every
/// directory a user makes is, and the group is often the user's own.) `ours` is the
/// node's user (the process's effective uid, the owner of what it creates).
///
/// The directories above it are checked too, as OpenSSH checks the path to a user's
/// `authorized_keys`: whoever may rename an entry of one of them could move the node's
/// directory away and put one of their own in its place. Each must be the node's
/// user's or root's, and not writable by every user unless it has the sticky bit
/// (`/tmp`: there, only an entry's owner may rename it). Both the path as written and
/// the one its symbolic links lead to are checked.
fn check_socket_dir(dir: &Path, ours: u32) -> Result<(), NodeError> {
    let meta = std::fs::metadata(dir).map_err(|e| socket_error(dir, "cannot stat", e))?;
    let what = if meta.uid() != ours && meta.uid() != 0 {
        format!("belongs to another user (uid {})", meta.uid())
    } else if meta.mode() & 0o002 != 0 {
        format!(
            "can be written by other users (mode {:o})",
            meta.mode() & 0o7777
        )
    } else {
        return check_socket_dir_ancestors(dir, ours);
    };
    Err(NodeError::Config(format!(
        "api.socket: the directory {} {what}, who could put their own socket in place of \
         the node's: use a directory only the node's user can write (e.g. \
         /run/trmx-node, mode 0700), or `chmod o-w` this one",
        dir.display()
    )))
}

/// The check of the directories above the socket directory `dir` (see
/// [`check_socket_dir`]). Of a `dir` not made yet (`check-config`, and the start before
/// it makes it), those above it that are not made yet either are left out (the node
/// makes them, its own, mode 0700), and the nearest one made is checked as they are.
fn check_socket_dir_ancestors(dir: &Path, ours: u32) -> Result<(), NodeError> {
    let written = std::path::absolute(dir).map_err(|e| socket_error(dir, "cannot resolve", e))?;
    let made = written
        .ancestors()
        .find(|d| std::fs::metadata(d).is_ok())
        .unwrap_or(&written);
    let resolved =
        std::fs::canonicalize(made).map_err(|e| socket_error(made, "cannot resolve", e))?;
    let above_written = written.ancestors().skip(1).filter(|d| made.starts_with(d));
    let above_resolved = resolved.ancestors().skip(usize::from(made == written));
    for above in above_written.chain(above_resolved) {
        let meta = std::fs::metadata(above).map_err(|e| socket_error(above, "cannot stat", e))?;
        let what = if meta.uid() != ours && meta.uid() != 0 {
            format!("belongs to another user (uid {})", meta.uid())
        } else if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
            format!(
                "can be written by other users (mode {:o})",
                meta.mode() & 0o7777
            )
        } else {
            continue;
        };
        return Err(NodeError::Config(format!(
            "api.socket: the directory {}, above the socket's directory {}, {what}, who \
             could move the socket's directory away and put their own in its place: use a \
             directory whose every parent only root or the node's user can write (e.g. \
             /run/trmx-node), or `chmod o-w` that one",
            above.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// Refuses, creating nothing, the directory of a socket `path` that [`bind_local_socket`]
/// would refuse for this process's user (see `check_socket_dir`), for `check-config`:
/// its "config OK" is a promise that the start gets this far. A directory not made yet
/// passes if the directories above it do (the node makes it, its own, mode 0700).
pub fn check_socket_dir_of(path: &Path) -> Result<(), NodeError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let ours = rustix::process::geteuid().as_raw();
    match std::fs::metadata(parent) {
        // (what is above it must be safe already)
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            check_socket_dir_ancestors(parent, ours)
        }
        Ok(meta) if !meta.is_dir() => Ok(()), // (the bind's own error says it best)
        _ => check_socket_dir(parent, ours),
    }
}

/// Gives the socket at `staged` the name `path`, unless something took that
/// name since the stale-socket check (another node starting at the same
/// moment): a rename would replace that node's live socket, leaving it
/// running unreachable. A hard link fails instead when the name exists.
fn move_into_place(staged: &Path, path: &Path) -> Result<(), NodeError> {
    match std::fs::hard_link(staged, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(NodeError::Config(format!(
            "api.socket: {} is in use (is another trmx-node running?)",
            path.display()
        ))),
        Err(e) => Err(socket_error(path, "cannot move socket to", e)),
    }
}

/// Removes a socket file that nothing listens on; refuses a live socket or a
/// path that is not a socket.
fn remove_stale_socket(path: &Path) -> Result<(), NodeError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(socket_error(path, "cannot stat", e)),
    };
    if !meta.file_type().is_socket() {
        return Err(NodeError::Config(format!(
            "api.socket: {} exists and is not a socket: set api.socket to another path \
             (the node replaces only a socket left by a node that stopped)",
            path.display()
        )));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(NodeError::Config(format!(
            "api.socket: {} is in use (is another trmx-node running?)",
            path.display()
        )));
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(socket_error(path, "cannot remove stale socket", e)),
    }
}

/// Serves `NodeApi` on an already bound socket until `shutdown` completes,
/// within `limits`. `clock` gives "today" for `ListDue` (inject the core's
/// clock in tests).
pub async fn serve_bound(
    core: NodeCore,
    clock: Arc<dyn Clock>,
    mut socket: LocalSocket,
    limits: ApiLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let listener = socket
        .listener
        .take()
        .ok_or_else(|| NodeError::Config("api.socket: already served".to_owned()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let service = LocalApi {
        core,
        clock,
        stop: stop_rx,
        watch_slots: WatchSlots::new(limits.max_watch_streams),
    };
    tracing::info!(
        socket = %socket.path.display(),
        max_connections = limits.max_connections,
        max_watch_streams = limits.max_watch_streams,
        "local api listening"
    );
    let result = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        // tonic 0.14 hands hyper `None` here unless it is set, which turns hyper's limit
        // off: a local client (a case-management system with a bug, or anything that can
        // open the socket) could make the node reset stream after stream, each reset
        // freeing its place among the connection's streams, and have request after
        // request dispatched for as long as it liked (CVE-2025-8671, "MadeYouReset").
        // Past this many, the connection gets GOAWAY.
        .http2_max_local_error_reset_streams(Some(LOCAL_ERROR_RESET_STREAMS))
        .add_service(
            NodeApiServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(
            limits::incoming(listener, limits.max_connections),
            async move {
                shutdown.await;
                // End the open watch streams so that the graceful shutdown completes.
                let _ = stop_tx.send(true);
            },
        )
        .await;
    tracing::info!(socket = %socket.path.display(), "local api stopped");
    drop(socket);
    result.map_err(|e| NodeError::Config(format!("api.socket: local api failed: {e}")))
}

/// The `NodeApi` implementation.
#[derive(Debug, Clone)]
struct LocalApi {
    core: NodeCore,
    clock: Arc<dyn Clock>,
    stop: watch::Receiver<bool>,
    watch_slots: WatchSlots,
}

type ApiResult<T> = Result<Response<T>, Status>;

fn reply<T>(result: Result<T, NodeError>) -> ApiResult<T> {
    result.map(Response::new).map_err(to_status)
}

impl LocalApi {
    async fn send(&self, req: pb::SendRequest) -> Result<pb::SendResponse, NodeError> {
        let request = convert::send_request(req)?;
        let entry = self.core.send(request).await?;
        tracing::debug!(
            message_id = %entry.message_id,
            recipient = %entry.recipient,
            kind = %entry.kind,
            state = %entry.state,
            "send accepted"
        );
        Ok(pb::SendResponse {
            message_id: entry.message_id.to_string(),
            case_ref: entry.case_ref.to_string(),
            state: convert::outbox_state(entry.state) as i32,
            entry: Some(convert::outbox_entry(entry)),
        })
    }

    async fn get_message(
        &self,
        req: &pb::GetMessageRequest,
    ) -> Result<pb::GetMessageResponse, NodeError> {
        let id = convert::message_id(&req.message_id, "message_id")?;
        let form = req.body_form;
        let (json, typed) = match pb::BodyForm::try_from(form) {
            Ok(pb::BodyForm::Unspecified) => (true, true),
            Ok(pb::BodyForm::Json) => (true, false),
            Ok(pb::BodyForm::Typed) => (false, true),
            Ok(pb::BodyForm::None) => (false, false),
            Err(_) => {
                return Err(NodeError::Invalid(trmx_proto::ValidationError::new(
                    "body_form",
                    format!("{form} is no BodyForm"),
                )));
            }
        };
        let view = self
            .core
            .message(id)
            .await?
            .ok_or(NodeError::NotFound(id))?;
        let (direction, entry, body) = match view {
            MessageView::Outbox(entry, body) => (
                pb::MessageDirection::Sent,
                pb::get_message_response::Entry::Outbox(convert::outbox_entry(entry)),
                body,
            ),
            MessageView::Inbox(entry, body) => (
                pb::MessageDirection::Received,
                pb::get_message_response::Entry::Inbox(convert::inbox_entry(entry)),
                body,
            ),
        };
        Ok(pb::GetMessageResponse {
            direction: direction as i32,
            entry: Some(entry),
            body_erased: body.is_none(),
            body_json: body
                .as_ref()
                .filter(|_| json)
                .map(|b| b.to_json())
                .unwrap_or_default(),
            body: body
                .as_ref()
                .filter(|_| typed)
                .and_then(convert::typed_message_body),
        })
    }

    async fn due(&self, req: &pb::ListDueRequest) -> Result<pb::ListDueResponse, NodeError> {
        let today = if req.today.is_empty() {
            None
        } else {
            Some(Date::parse(&req.today).map_err(|e| NodeError::Invalid(e.within("today")))?)
        };
        let (today, start) = convert::due_page(today, &req.page_token)?;
        let today = today.unwrap_or_else(|| Date::of(self.clock.now()));
        let page = self
            .core
            .due(today, start, convert::due_limit(req.limit))
            .await?;
        Ok(pb::ListDueResponse {
            items: page.entries.into_iter().map(convert::due_item).collect(),
            next_page_token: convert::due_page_token(today, page.next),
        })
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::InboxEntry, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl NodeApi for LocalApi {
    async fn send(&self, request: Request<pb::SendRequest>) -> ApiResult<pb::SendResponse> {
        reply(LocalApi::send(self, request.into_inner()).await)
    }

    async fn list_outbox(
        &self,
        request: Request<pb::ListOutboxRequest>,
    ) -> ApiResult<pb::ListOutboxResponse> {
        let result = async {
            let filter = convert::outbox_filter(request.get_ref())?;
            let page = self.core.outbox_page(&filter).await?;
            Ok(pb::ListOutboxResponse {
                entries: page
                    .entries
                    .into_iter()
                    .map(convert::outbox_entry)
                    .collect(),
                next_page_token: convert::next_page_token(page.next, convert::OUTBOX_PAGE),
            })
        };
        reply(result.await)
    }

    async fn list_inbox(
        &self,
        request: Request<pb::ListInboxRequest>,
    ) -> ApiResult<pb::ListInboxResponse> {
        let result = async {
            let filter = convert::inbox_filter(request.get_ref())?;
            let page = self.core.inbox_page(&filter).await?;
            Ok(pb::ListInboxResponse {
                entries: page.entries.into_iter().map(convert::inbox_entry).collect(),
                next_page_token: convert::next_page_token(page.next, convert::INBOX_PAGE),
            })
        };
        reply(result.await)
    }

    async fn get_message(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> ApiResult<pb::GetMessageResponse> {
        reply(LocalApi::get_message(self, request.get_ref()).await)
    }

    async fn get_case(
        &self,
        request: Request<pb::GetCaseRequest>,
    ) -> ApiResult<pb::GetCaseResponse> {
        let result = async {
            let req = request.get_ref();
            let case_ref = convert::case_ref(&req.case_ref, "case_ref")?;
            let start = convert::case_page(case_ref, &req.page_token)?;
            let limit = convert::case_page_size(req.page_size)?;
            let page = self.core.case_timeline(case_ref, start, limit).await?;
            Ok(pb::GetCaseResponse {
                case_ref: case_ref.to_string(),
                entries: page
                    .entries
                    .into_iter()
                    .map(convert::timeline_entry)
                    .collect(),
                next_page_token: convert::case_page_token(case_ref, page.next),
            })
        };
        reply(result.await)
    }

    async fn list_due(
        &self,
        request: Request<pb::ListDueRequest>,
    ) -> ApiResult<pb::ListDueResponse> {
        reply(self.due(request.get_ref()).await)
    }

    async fn list_participants(
        &self,
        _request: Request<pb::ListParticipantsRequest>,
    ) -> ApiResult<pb::ListParticipantsResponse> {
        let result = async {
            let participants = self.core.participants().await?;
            Ok(pb::ListParticipantsResponse {
                participants: participants.into_iter().map(convert::participant).collect(),
            })
        };
        reply(result.await)
    }

    async fn withdraw(
        &self,
        request: Request<pb::WithdrawMessageRequest>,
    ) -> ApiResult<pb::WithdrawMessageResponse> {
        let result = async {
            let id = convert::message_id(&request.get_ref().message_id, "message_id")?;
            let done = self.core.withdraw(id).await?;
            tracing::info!(message_id = %id, "message withdrawn");
            Ok(pb::WithdrawMessageResponse {
                broker_pending: done == crate::core::Withdrawal::BrokerPending,
            })
        };
        reply(result.await)
    }

    async fn get_node_status(
        &self,
        _request: Request<pb::GetNodeStatusRequest>,
    ) -> ApiResult<pb::NodeStatus> {
        // (it reads the node's TLS files when they changed: off the runtime)
        let core = self.core.clone();
        let status = tokio::task::spawn_blocking(move || core.status())
            .await
            .map_err(|e| Status::internal(format!("node status task failed: {e}")))?;
        Ok(Response::new(convert::node_status(status)))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> ApiResult<Self::WatchStream> {
        let after_seq = request.get_ref().after_seq;
        // (held by the stream: given back when it ends, or when the client drops it)
        let slot = self.watch_slots.take().map_err(to_status)?;
        let mut stop = self.stop.clone();
        let stopped = async move {
            // Ends when shutdown is signalled or the server is gone.
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        let stream = self
            .core
            .watch(after_seq)
            .await
            .map_err(to_status)?
            .map(move |item| {
                let _held = &slot;
                item.map(convert::inbox_entry).map_err(to_status)
            })
            .take_until(stopped)
            // A watch never ends as finished: a clean end would read to a client
            // as "nothing more will come", and it would not resume. (After an
            // error item tonic ends the stream there, so this is only sent when
            // the node stops.)
            .chain(futures::stream::once(async {
                Err(Status::unavailable(
                    "the node is stopping: resume with after_seq set to the last seq processed",
                ))
            }));
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket directory not made yet, under a directory every user can write (no
    /// sticky bit): `check-config` refuses it as the start would, naming that directory,
    /// and the start refuses it before it makes anything there.
    #[test]
    fn a_socket_directory_not_made_yet_under_one_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let ours = open.join("trmx").join("node");
        let socket = ours.join("node.sock");
        let above = format!(
            "the directory {}, above the socket's directory {}, can be written by other users",
            open.display(),
            ours.display()
        );
        let checked = check_socket_dir_of(&socket)
            .expect_err("check-config refuses what the start refuses")
            .to_string();
        assert!(checked.contains(&above), "{checked}");
        let refused = bind_local_socket(&socket).expect_err("refused").to_string();
        assert!(refused.contains(&above), "{refused}");
        assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0, "made nothing");
    }

    /// Two nodes starting on one socket path at the same moment: the second
    /// to move its socket into place must fail, not replace the first's.
    #[test]
    fn a_socket_is_never_moved_over_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.sock");
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let staged = dir.path().join("staged.sock");
        let _late = std::os::unix::net::UnixListener::bind(&staged).unwrap();

        let error = move_into_place(&staged, &path).unwrap_err();
        assert!(error.to_string().contains("in use"), "{error}");
        // the first node's socket is still the one at the path
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        live.set_nonblocking(true).unwrap();
        assert!(
            live.accept().is_ok(),
            "the connection reached the first node"
        );
    }
}
