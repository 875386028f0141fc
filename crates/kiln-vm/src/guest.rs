//! Host side of the guest agent protocol (see `kiln-proto`): a client that speaks to the agent
//! over any byte stream (virtio-serial, vsock, or a pipe in tests).
//!
//! # Lifecycle
//! [`GuestClient::connect`] (or [`GuestClient::connect_with`]) sends `Hello` and waits, with a
//! timeout, for the agent's `HelloAck`; a different protocol version fails here with an error
//! naming both versions. The client then runs two tasks:
//! - a **writer** that takes messages from a bounded queue and writes frames (the bound gives
//!   file uploads backpressure);
//! - a **reader** that routes every incoming frame by its request id: output and exit to the
//!   exec waiting for them, transfer chunks to the transfer, replies to the request.
//!
//! When the channel ends (EOF, I/O error, an oversized frame from the guest), every pending
//! request fails with the reason and later requests fail at once; [`GuestClient::closed`]
//! resolves, which a backend can use to notice guest death. A malformed frame from the guest is
//! answered with an error frame and otherwise ignored. Dropping the client stops both tasks.
//!
//! # Cancellation
//! Dropping the future of [`GuestClient::exec`] before it finishes sends `Kill` (SIGKILL) for
//! that exec's process group.
//!
//! Every operation but `connect` returns [`VmError`] (mostly [`VmError::Guest`]), so a backend's
//! [`Vm`](crate::Vm) implementation can delegate to it directly.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_proto::transfer::{ChunkReader, ChunkWriter, mode_of, pack_tree, unpack_tree};
use kiln_proto::{
    CHUNK_LEN, Clock, ExecCommand, ExecSpec, FrameReader, FrameWriter, GetKind, HelloAckInfo,
    KillTarget, Message, PROTOCOL_VERSION, ProtoError, PutKind, RequestId, Signal, decode_payload,
    peek_version,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::{
    Command, ExecOutcome, ExecRequest, ExecUser, ExitStatus, Output, OutputSink, PtyDriver,
    PtyRequest, PtySession, Stream, VmError,
};

/// How long [`GuestClient::connect`] waits for the agent's hello.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(60);

/// How long replies to control requests (kill, ping, shutdown) may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Beyond an exec's own timeout, how long the host waits for the agent to report the exit
/// before giving up on the agent (it kills with SIGTERM, then SIGKILL after a grace period).
const EXEC_BACKSTOP_SLACK: Duration = Duration::from_secs(30);

/// Queue depths: outgoing frames, and incoming frames of one transfer.
const OUT_QUEUE: usize = 64;
const TRANSFER_QUEUE: usize = 16;

/// Errors of connecting to an agent.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The agent did not answer the hello in time.
    #[error("The guest agent did not answer within {0:?}")]
    HelloTimeout(Duration),
    /// The agent rejected the hello (for example, a version mismatch it detected).
    #[error("The guest agent rejected the connection: {0}")]
    Rejected(String),
    /// The channel ended before the hello completed.
    #[error("The channel to the guest agent closed during the hello: {0}")]
    Closed(String),
    /// The agent broke the protocol, or speaks another version.
    #[error(transparent)]
    Protocol(#[from] ProtoError),
    /// Starting the agent process failed (`spawn_stdio_agent`).
    #[error("Cannot start the agent {path}")]
    Spawn {
        /// The agent binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl GuestError {
    /// The error as a [`VmError::Guest`] of VM `vm`, with the whole cause chain in the message.
    pub fn into_vm_error(self, vm: &str) -> VmError {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(&self);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        VmError::Guest {
            vm: vm.to_owned(),
            message,
        }
    }
}

/// How to greet the agent.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The VM's id, used in errors.
    pub vm_id: String,
    /// Hostname for the guest (applied only when the agent is PID 1).
    pub hostname: Option<String>,
    /// Send the host's clock (applied only when the agent is PID 1).
    pub set_clock: bool,
    /// How long to wait for the agent's answer.
    pub hello_timeout: Duration,
}

impl ConnectOptions {
    /// Defaults for VM `vm_id`: send the clock, no hostname, [`DEFAULT_HELLO_TIMEOUT`].
    pub fn new(vm_id: impl Into<String>) -> Self {
        ConnectOptions {
            vm_id: vm_id.into(),
            hostname: None,
            set_clock: true,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
        }
    }
}

/// A connection to a guest agent. See the module docs.
pub struct GuestClient {
    shared: Arc<Shared>,
    info: HelloAckInfo,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl std::fmt::Debug for GuestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestClient")
            .field("vm", &self.shared.vm)
            .field("agent", &self.info)
            .finish()
    }
}

impl Drop for GuestClient {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

struct Shared {
    vm: String,
    out: mpsc::Sender<Message>,
    routes: Mutex<Routes>,
    next_id: AtomicU64,
    closed: watch::Sender<Option<String>>,
}

#[derive(Default)]
struct Routes {
    closed: Option<String>,
    map: HashMap<RequestId, Route>,
}

enum Route {
    /// An exec: output goes to the sink, the exit (or an error) to `done`.
    Exec {
        sink: OutputSink,
        done: oneshot::Sender<Result<kiln_proto::ExitStatus, String>>,
    },
    /// One reply (`Done`, `Pong`) or an error.
    Reply(oneshot::Sender<Result<Message, String>>),
    /// A download: `Meta`, `Chunk`s, `End` or `Error`.
    Stream(mpsc::Sender<Message>),
}

impl Shared {
    fn next_id(&self) -> RequestId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn guest_error(&self, message: impl Into<String>) -> VmError {
        VmError::Guest {
            vm: self.vm.clone(),
            message: message.into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        // A panic while holding the lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, id: RequestId, route: Route) -> Result<(), VmError> {
        let mut routes = self.lock();
        if let Some(reason) = &routes.closed {
            return Err(self.guest_error(format!("The channel is closed: {reason}")));
        }
        routes.map.insert(id, route);
        Ok(())
    }

    fn unregister(&self, id: RequestId) {
        self.lock().map.remove(&id);
    }

    async fn send(&self, message: Message) -> Result<(), VmError> {
        self.out
            .send(message)
            .await
            .map_err(|_| self.guest_error(format!("The channel is closed: {}", self.reason())))
    }

    /// Queues a message without waiting (used from `Drop`).
    fn send_soon(&self, message: Message) {
        match self.out.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(message)) => {
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    let out = self.out.clone();
                    handle.spawn(async move {
                        let _ = out.send(message).await;
                    });
                }
            }
        }
    }

    fn reason(&self) -> String {
        self.closed
            .borrow()
            .clone()
            .unwrap_or_else(|| "closed".to_owned())
    }

    /// Fails one pending request.
    fn fail(&self, id: RequestId, reason: String) {
        let route = self.lock().map.remove(&id);
        match route {
            Some(Route::Exec { done, .. }) => {
                let _ = done.send(Err(reason));
            }
            Some(Route::Reply(tx)) => {
                let _ = tx.send(Err(reason));
            }
            Some(Route::Stream(tx)) => {
                let _ = tx.try_send(Message::Error {
                    id: Some(id),
                    message: reason,
                });
            }
            None => {}
        }
    }

    /// Marks the connection dead and fails every pending request.
    fn close(&self, reason: String) {
        let pending = {
            let mut routes = self.lock();
            if routes.closed.is_some() {
                return;
            }
            routes.closed = Some(reason.clone());
            std::mem::take(&mut routes.map)
        };
        tracing::debug!(vm = %self.vm, %reason, "guest channel closed");
        for (_, route) in pending {
            match route {
                Route::Exec { done, .. } => {
                    let _ = done.send(Err(format!("The channel closed: {reason}")));
                }
                Route::Reply(tx) => {
                    let _ = tx.send(Err(format!("The channel closed: {reason}")));
                }
                Route::Stream(_) => {}
            }
        }
        self.closed.send_replace(Some(reason));
    }

    /// Routes one message from the agent.
    async fn route(&self, message: Message) {
        let Some(id) = message.id() else {
            match message {
                Message::Error { message, .. } => {
                    tracing::warn!(vm = %self.vm, "guest agent reported: {message}");
                }
                other => {
                    tracing::warn!(vm = %self.vm, "unexpected message from the guest agent: {other:?}");
                }
            }
            return;
        };
        let stream_tx = {
            let mut routes = self.lock();
            match routes.map.get(&id) {
                None => {
                    tracing::debug!(vm = %self.vm, id, "frame for a finished request dropped");
                    return;
                }
                Some(Route::Stream(tx)) => {
                    let tx = tx.clone();
                    if matches!(message, Message::End { .. } | Message::Error { .. }) {
                        routes.map.remove(&id);
                    }
                    tx
                }
                Some(Route::Exec { sink, .. }) => {
                    match message {
                        Message::Stdout { data, .. } => {
                            let _ = sink.send(Output {
                                stream: Stream::Stdout,
                                data,
                            });
                        }
                        Message::Stderr { data, .. } => {
                            let _ = sink.send(Output {
                                stream: Stream::Stderr,
                                data,
                            });
                        }
                        Message::Started { pid, .. } => {
                            tracing::debug!(vm = %self.vm, id, pid, "exec started");
                        }
                        Message::Exit { status, .. } => {
                            if let Some(Route::Exec { done, .. }) = routes.map.remove(&id) {
                                let _ = done.send(Ok(status));
                            }
                        }
                        Message::Error { message, .. } => {
                            if let Some(Route::Exec { done, .. }) = routes.map.remove(&id) {
                                let _ = done.send(Err(message));
                            }
                        }
                        other => {
                            tracing::warn!(vm = %self.vm, "unexpected message for exec {id}: {other:?}");
                        }
                    }
                    return;
                }
                Some(Route::Reply(_)) => {
                    if let Some(Route::Reply(tx)) = routes.map.remove(&id) {
                        let _ = tx.send(match message {
                            Message::Error { message, .. } => Err(message),
                            other => Ok(other),
                        });
                    }
                    return;
                }
            }
        };
        // A download applies backpressure: wait for room, outside the lock.
        if stream_tx.send(message).await.is_err() {
            self.unregister(id);
        }
    }
}

impl GuestClient {
    /// Connects over a bidirectional stream with [`ConnectOptions::new`]`(vm_id)`.
    pub async fn connect<S>(stream: S, vm_id: &str) -> Result<GuestClient, GuestError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        GuestClient::connect_with(reader, writer, ConnectOptions::new(vm_id)).await
    }

    /// Connects over a separate reader and writer (e.g. a child's stdout and stdin).
    pub async fn connect_with<R, W>(
        reader: R,
        writer: W,
        options: ConnectOptions,
    ) -> Result<GuestClient, GuestError>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let mut reader = FrameReader::new(reader);
        let mut writer = FrameWriter::new(writer);
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            clock: options.set_clock.then(Clock::now),
            hostname: options.hostname.clone(),
        };
        let info = tokio::time::timeout(options.hello_timeout, async {
            writer.send(&hello).await?;
            hello_reply(&mut reader).await
        })
        .await
        .map_err(|_| GuestError::HelloTimeout(options.hello_timeout))??;
        if info.pid1
            && let Some(reason) = &info.user_fallback
        {
            tracing::warn!(vm = %options.vm_id, "Commands in this VM run as {}: {reason}", info.user.name);
        }

        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let shared = Arc::new(Shared {
            vm: options.vm_id,
            out: out_tx,
            routes: Mutex::new(Routes::default()),
            next_id: AtomicU64::new(1),
            closed: watch::channel(None).0,
        });
        let writer = tokio::spawn(write_loop(writer, out_rx, Arc::downgrade(&shared)));
        let reader = tokio::spawn(read_loop(reader, shared.clone()));
        Ok(GuestClient {
            shared,
            info,
            reader,
            writer,
        })
    }

    /// What the agent said about itself.
    pub fn agent_info(&self) -> &HelloAckInfo {
        &self.info
    }

    /// The VM id this client reports in errors.
    pub fn vm_id(&self) -> &str {
        &self.shared.vm
    }

    /// Whether the channel has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.borrow().is_some()
    }

    /// Resolves when the channel ends, with the reason.
    pub async fn closed(&self) -> String {
        let mut rx = self.shared.closed.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return "The client is gone".to_owned();
            }
        }
    }

    /// Runs a command in the guest and waits for it, streaming its output to `output`.
    ///
    /// A `request.cwd` of `None` leaves the agent's default (`HOME`, else `/`). Dropping the
    /// future before it completes kills the command's process group.
    pub async fn exec(
        &self,
        request: ExecRequest,
        output: OutputSink,
    ) -> Result<ExecOutcome, VmError> {
        let shared = &self.shared;
        let id = shared.next_id();
        let (done_tx, done_rx) = oneshot::channel();
        shared.register(
            id,
            Route::Exec {
                sink: output,
                done: done_tx,
            },
        )?;
        let mut guard = KillOnDrop {
            shared: shared.clone(),
            id,
            armed: true,
        };
        let timeout = request.timeout;
        let started = Instant::now();
        shared
            .send(Message::Exec(ExecSpec {
                id,
                command: wire_command(request.command),
                env: request.env,
                cwd: request.cwd,
                timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                user: wire_user(request.user),
                pty: None,
            }))
            .await?;
        let result = match timeout {
            Some(limit) => {
                match tokio::time::timeout(limit.saturating_add(EXEC_BACKSTOP_SLACK), done_rx).await
                {
                    Ok(result) => result,
                    Err(_) => {
                        return Err(shared.guest_error(format!(
                            "The agent did not report the end of a command {:?} after its \
                             timeout of {limit:?}",
                            EXEC_BACKSTOP_SLACK
                        )));
                    }
                }
            }
            None => done_rx.await,
        };
        guard.armed = false;
        Ok(ExecOutcome {
            status: exit_status(shared, result)?,
            duration: started.elapsed(),
        })
    }

    /// Runs a command on a new pseudo-terminal in the guest (see [`crate::Vm::exec_pty`]).
    ///
    /// A task relays the session: output and the exit from the agent to the [`PtySession`],
    /// its writer's events to the agent as `Pty` frames (never waiting for an answer). When
    /// the session is dropped first, the task kills the command's process group.
    pub async fn exec_pty(&self, request: PtyRequest) -> Result<PtySession, VmError> {
        let shared = self.shared.clone();
        let id = shared.next_id();
        let (sink, output) = mpsc::unbounded_channel();
        let (done_tx, done) = oneshot::channel();
        shared.register(
            id,
            Route::Exec {
                sink,
                done: done_tx,
            },
        )?;
        let mut guard = KillOnDrop {
            shared: shared.clone(),
            id,
            armed: true,
        };
        shared
            .send(Message::Exec(ExecSpec {
                id,
                command: wire_command(request.command),
                env: request.env,
                cwd: request.cwd,
                timeout_ms: None,
                user: wire_user(request.user),
                pty: Some(request.size),
            }))
            .await?;
        guard.armed = false;
        let (session, driver) = PtySession::channel(&shared.vm);
        tokio::spawn(relay_pty(shared, id, driver, output, done));
        Ok(session)
    }

    /// Sends `signal` to the process groups of every running exec (under PID 1: to every
    /// process but the agent).
    pub async fn kill_all(&self) -> Result<(), VmError> {
        self.signal(KillTarget::All, Signal::Kill).await
    }

    /// Sends `signal` to `target`.
    pub async fn signal(&self, target: KillTarget, signal: Signal) -> Result<(), VmError> {
        let id = self.shared.next_id();
        self.request(Message::Kill { id, target, signal }, id)
            .await
            .map(drop)
    }

    /// Round-trip time of a `Ping`.
    pub async fn ping(&self) -> Result<Duration, VmError> {
        let id = self.shared.next_id();
        let started = Instant::now();
        self.request(Message::Ping { id }, id).await?;
        Ok(started.elapsed())
    }

    /// Asks the agent to kill everything, sync and power off (under `--stdio`: exit). Returns
    /// once the agent has acknowledged; the channel closes soon after.
    pub async fn shutdown(&self) -> Result<(), VmError> {
        let id = self.shared.next_id();
        self.request(Message::Shutdown { id }, id).await.map(drop)
    }

    /// Writes a whole file in the guest (mode 0644), creating its parent directories.
    pub async fn write_file(&self, guest: &str, contents: &[u8]) -> Result<(), VmError> {
        self.write_file_mode(guest, contents, 0o644).await
    }

    /// Writes a whole file in the guest with permission bits `mode`.
    pub async fn write_file_mode(
        &self,
        guest: &str,
        contents: &[u8],
        mode: u32,
    ) -> Result<(), VmError> {
        let data = Bytes::copy_from_slice(contents);
        self.put(guest, PutKind::File { mode }, |sender| async move {
            for start in (0..data.len()).step_by(CHUNK_LEN) {
                sender
                    .send(data.slice(start..data.len().min(start + CHUNK_LEN)))
                    .await?;
            }
            Ok(())
        })
        .await
    }

    /// Reads a whole file from the guest.
    pub async fn read_file(&self, guest: &str) -> Result<Vec<u8>, VmError> {
        let (kind, mut rx, id) = self.get(guest).await?;
        let _guard = Unregister {
            shared: &self.shared,
            id,
            armed: true,
        };
        if kind == DownloadKind::Tree {
            return Err(self
                .shared
                .guest_error(format!("Cannot read {guest}: it is a directory")));
        }
        let mut contents = Vec::new();
        loop {
            match self.next_download_message(&mut rx, guest).await? {
                Some(data) => contents.extend_from_slice(&data),
                None => return Ok(contents),
            }
        }
    }

    /// Copies a host file or directory (recursively, with modes) to `guest`.
    ///
    /// A directory's contents land in the guest directory `guest` (created if missing).
    pub async fn copy_in(&self, host: &Path, guest: &str) -> Result<(), VmError> {
        let vm = self.shared.vm.clone();
        let io_error = |source| VmError::Io {
            vm: vm.clone(),
            op: format!("copying {} into the VM", host.display()),
            source,
        };
        let metadata = tokio::fs::metadata(host).await.map_err(io_error)?;
        if metadata.is_dir() {
            let host = host.to_owned();
            return self
                .put(guest, PutKind::Tree, |sender| async move {
                    // The tar builder is synchronous: run it on a blocking thread that queues
                    // chunks straight onto the outgoing channel.
                    let ChunkSender { id, out, .. } = sender;
                    tokio::task::spawn_blocking(move || {
                        let mut writer = ChunkWriter::new(|data| {
                            out.blocking_send(Message::Chunk { id, data })
                                .map_err(|_| io::Error::other("The channel to the agent closed"))
                        });
                        pack_tree(&host, &mut writer)?;
                        writer.finish()
                    })
                    .await
                    .map_err(|e| io_error(io::Error::other(e.to_string())))?
                    .map_err(io_error)
                })
                .await;
        }
        let mut file = tokio::fs::File::open(host).await.map_err(io_error)?;
        let mode = mode_of(&metadata);
        self.put(guest, PutKind::File { mode }, |sender| async move {
            let mut buf = vec![0u8; CHUNK_LEN];
            loop {
                let n = file.read(&mut buf).await.map_err(io_error)?;
                if n == 0 {
                    return Ok(());
                }
                sender.send(Bytes::copy_from_slice(&buf[..n])).await?;
            }
        })
        .await
    }

    /// Copies a guest file or directory (recursively, with modes) to `host`.
    ///
    /// A directory's contents land in the host directory `host` (created if missing).
    pub async fn copy_out(&self, guest: &str, host: &Path) -> Result<(), VmError> {
        let vm = self.shared.vm.clone();
        let io_error = |source| VmError::Io {
            vm: vm.clone(),
            op: format!("copying {guest} out of the VM to {}", host.display()),
            source,
        };
        let (kind, mut rx, id) = self.get(guest).await?;
        let _guard = Unregister {
            shared: &self.shared,
            id,
            armed: true,
        };
        match kind {
            DownloadKind::File { mode } => {
                if let Some(parent) = host.parent() {
                    tokio::fs::create_dir_all(parent).await.map_err(io_error)?;
                }
                let mut file = tokio::fs::File::create(host).await.map_err(io_error)?;
                while let Some(data) = self.next_download_message(&mut rx, guest).await? {
                    tokio::io::AsyncWriteExt::write_all(&mut file, &data)
                        .await
                        .map_err(io_error)?;
                }
                tokio::io::AsyncWriteExt::flush(&mut file)
                    .await
                    .map_err(io_error)?;
                use std::os::unix::fs::PermissionsExt;
                tokio::fs::set_permissions(host, std::fs::Permissions::from_mode(mode))
                    .await
                    .map_err(io_error)
            }
            DownloadKind::Tree => {
                let (bytes_tx, bytes_rx) = mpsc::channel(TRANSFER_QUEUE);
                let dest = host.to_owned();
                let unpack = tokio::task::spawn_blocking(move || {
                    unpack_tree(ChunkReader::new(bytes_rx), &dest)
                });
                let mut failure = None;
                loop {
                    match self.next_download_message(&mut rx, guest).await {
                        Ok(Some(data)) => {
                            if bytes_tx.send(data).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                drop(bytes_tx);
                let unpacked = unpack
                    .await
                    .map_err(|e| io_error(io::Error::other(e.to_string())))?;
                if let Some(e) = failure {
                    return Err(e);
                }
                unpacked.map_err(io_error)
            }
        }
    }

    /// Sends a request and waits for its one reply.
    async fn request(&self, message: Message, id: RequestId) -> Result<Message, VmError> {
        let shared = &self.shared;
        let (tx, rx) = oneshot::channel();
        shared.register(id, Route::Reply(tx))?;
        let _guard = Unregister {
            shared,
            id,
            armed: true,
        };
        shared.send(message).await?;
        match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
            Err(_) => {
                Err(shared
                    .guest_error(format!("The agent did not answer within {REPLY_TIMEOUT:?}")))
            }
            Ok(Err(_)) => {
                Err(shared.guest_error(format!("The channel closed: {}", shared.reason())))
            }
            Ok(Ok(Err(message))) => Err(shared.guest_error(message)),
            Ok(Ok(Ok(reply))) => Ok(reply),
        }
    }

    /// Uploads: `Put`, the chunks `produce` sends, `End`, then waits for `Done`.
    async fn put<F, Fut>(&self, guest: &str, kind: PutKind, produce: F) -> Result<(), VmError>
    where
        F: FnOnce(ChunkSender) -> Fut,
        Fut: std::future::Future<Output = Result<(), VmError>>,
    {
        let shared = &self.shared;
        let id = shared.next_id();
        let (tx, rx) = oneshot::channel();
        shared.register(id, Route::Reply(tx))?;
        let _guard = Unregister {
            shared,
            id,
            armed: true,
        };
        shared
            .send(Message::Put {
                id,
                path: guest.to_owned(),
                kind,
            })
            .await?;
        let sender = ChunkSender {
            id,
            out: shared.out.clone(),
            vm: shared.vm.clone(),
        };
        let produced = produce(sender).await;
        // Always end the transfer, so the agent stops waiting for data even after a failure.
        shared.send(Message::End { id }).await?;
        produced?;
        match rx.await {
            Ok(Ok(_done)) => Ok(()),
            Ok(Err(message)) => Err(shared.guest_error(message)),
            Err(_) => Err(shared.guest_error(format!("The channel closed: {}", shared.reason()))),
        }
    }

    /// Starts a download; returns what it holds and the channel its frames arrive on.
    async fn get(
        &self,
        guest: &str,
    ) -> Result<(DownloadKind, mpsc::Receiver<Message>, RequestId), VmError> {
        let shared = &self.shared;
        let id = shared.next_id();
        let (tx, mut rx) = mpsc::channel(TRANSFER_QUEUE);
        shared.register(id, Route::Stream(tx))?;
        let mut guard = Unregister {
            shared,
            id,
            armed: true,
        };
        shared
            .send(Message::Get {
                id,
                path: guest.to_owned(),
            })
            .await?;
        let kind = match rx.recv().await {
            Some(Message::Meta { kind, .. }) => match kind {
                GetKind::File { mode, .. } => DownloadKind::File { mode },
                GetKind::Tree => DownloadKind::Tree,
            },
            Some(Message::Error { message, .. }) => return Err(shared.guest_error(message)),
            Some(other) => {
                return Err(shared.guest_error(format!(
                    "Protocol violation: expected Meta for {guest}, got {other:?}"
                )));
            }
            None => {
                return Err(shared.guest_error(format!("The channel closed: {}", shared.reason())));
            }
        };
        // The caller keeps the route (and removes it when done).
        guard.armed = false;
        Ok((kind, rx, id))
    }

    /// The next chunk of a download, `None` at its end.
    async fn next_download_message(
        &self,
        rx: &mut mpsc::Receiver<Message>,
        guest: &str,
    ) -> Result<Option<Bytes>, VmError> {
        let shared = &self.shared;
        match rx.recv().await {
            Some(Message::Chunk { data, .. }) => Ok(Some(data)),
            Some(Message::End { .. }) => Ok(None),
            Some(Message::Error { message, .. }) => Err(shared.guest_error(message)),
            Some(other) => Err(shared.guest_error(format!(
                "Protocol violation: unexpected {other:?} while reading {guest}"
            ))),
            None => Err(shared.guest_error(format!(
                "The channel closed while reading {guest}: {}",
                shared.reason()
            ))),
        }
    }
}

/// The wire form of a command.
fn wire_command(command: Command) -> ExecCommand {
    match command {
        Command::Argv(argv) => ExecCommand::Argv(argv),
        Command::Script {
            shell,
            script,
            extension,
        } => ExecCommand::Script {
            shell,
            script,
            extension,
        },
    }
}

fn wire_user(user: ExecUser) -> kiln_proto::ExecUser {
    match user {
        ExecUser::Runner => kiln_proto::ExecUser::Runner,
        ExecUser::Root => kiln_proto::ExecUser::Root,
    }
}

/// The exit status an exec's route delivered, or the error that ended it.
fn exit_status(
    shared: &Shared,
    result: Result<Result<kiln_proto::ExitStatus, String>, oneshot::error::RecvError>,
) -> Result<ExitStatus, VmError> {
    match result {
        Ok(Ok(status)) => Ok(match status {
            kiln_proto::ExitStatus::Exited(code) => ExitStatus::Exited(code),
            kiln_proto::ExitStatus::Signaled(signal) => ExitStatus::Signaled(signal),
            kiln_proto::ExitStatus::TimedOut => ExitStatus::TimedOut,
        }),
        Ok(Err(message)) => Err(shared.guest_error(message)),
        Err(_) => Err(shared.guest_error(format!("The channel closed: {}", shared.reason()))),
    }
}

/// Relays one terminal exec between the agent and its [`PtySession`].
async fn relay_pty(
    shared: Arc<Shared>,
    id: RequestId,
    driver: PtyDriver,
    mut output: mpsc::UnboundedReceiver<Output>,
    mut done: oneshot::Receiver<Result<kiln_proto::ExitStatus, String>>,
) {
    let PtyDriver {
        mut events,
        output: to_session,
        exit,
        mut cancelled,
    } = driver;
    let mut kill = KillOnDrop {
        shared: shared.clone(),
        id,
        armed: true,
    };
    let result = loop {
        tokio::select! {
            Some(chunk) = output.recv() => {
                let _ = to_session.send(chunk.data);
            }
            Some(event) = events.recv() => {
                if shared.send(Message::Pty { id, event }).await.is_err() {
                    // The channel is gone; `done` reports why.
                    continue;
                }
            }
            result = &mut done => break result,
            // The session was dropped: `kill` fires on return.
            _ = &mut cancelled => return,
        }
    };
    kill.armed = false;
    // The route delivers output before the exit, so what is left is already queued.
    while let Ok(chunk) = output.try_recv() {
        let _ = to_session.send(chunk.data);
    }
    drop(to_session);
    // Writers fail from now on, before anyone can see the exit.
    drop(events);
    let _ = exit.send(exit_status(&shared, result));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DownloadKind {
    File { mode: u32 },
    Tree,
}

/// Sends the data chunks of one upload.
struct ChunkSender {
    id: RequestId,
    out: mpsc::Sender<Message>,
    vm: String,
}

impl ChunkSender {
    async fn send(&self, data: Bytes) -> Result<(), VmError> {
        self.out
            .send(Message::Chunk { id: self.id, data })
            .await
            .map_err(|_| VmError::Guest {
                vm: self.vm.clone(),
                message: "The channel to the agent closed during an upload".to_owned(),
            })
    }
}

/// Removes a route when a request's future ends, early or not.
struct Unregister<'a> {
    shared: &'a Shared,
    id: RequestId,
    armed: bool,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.unregister(self.id);
        }
    }
}

/// Kills an exec whose future was dropped before it finished.
struct KillOnDrop {
    shared: Arc<Shared>,
    id: RequestId,
    armed: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.shared.unregister(self.id);
        let id = self.shared.next_id();
        tracing::debug!(vm = %self.shared.vm, exec = self.id, "exec dropped; killing its process group");
        self.shared.send_soon(Message::Kill {
            id,
            target: KillTarget::Exec(self.id),
            signal: Signal::Kill,
        });
    }
}

/// Reads the agent's answer to our hello.
async fn hello_reply<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
) -> Result<HelloAckInfo, GuestError> {
    let payload = match reader.next_payload().await {
        Ok(Some(payload)) => payload,
        Ok(None) => return Err(GuestError::Closed("end of stream".to_owned())),
        Err(ProtoError::Io(e)) => return Err(GuestError::Closed(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    if let Some(version) = peek_version(&payload)
        && version != PROTOCOL_VERSION
    {
        return Err(ProtoError::VersionMismatch {
            host: PROTOCOL_VERSION,
            agent: version,
        }
        .into());
    }
    match decode_payload(&payload)? {
        Message::HelloAck { info, .. } => Ok(info),
        Message::Error { message, .. } => Err(GuestError::Rejected(message)),
        other => Err(ProtoError::Malformed(format!("expected HelloAck, got {other:?}")).into()),
    }
}

async fn read_loop<R: AsyncRead + Unpin>(mut reader: FrameReader<R>, shared: Arc<Shared>) {
    let reason = loop {
        match reader.next().await {
            Ok(Some(Ok(message))) => shared.route(message).await,
            Ok(Some(Err(malformed))) => {
                tracing::warn!(vm = %shared.vm, "rejected a frame from the guest agent: {malformed}");
                shared.send_soon(Message::Error {
                    id: None,
                    message: malformed.to_string(),
                });
            }
            Ok(None) => break "The agent closed the channel".to_owned(),
            Err(e) => {
                if !matches!(e, ProtoError::Io(_)) {
                    shared.send_soon(Message::Error {
                        id: None,
                        message: e.to_string(),
                    });
                }
                break error_chain(&e);
            }
        }
    };
    shared.close(reason);
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    mut rx: mpsc::Receiver<Message>,
    shared: std::sync::Weak<Shared>,
) {
    while let Some(first) = rx.recv().await {
        // Batch what is queued into one flush.
        let mut next = Some(first);
        let mut result = Ok(());
        while let Some(message) = next.take() {
            match writer.feed(&message).await {
                Ok(()) => {}
                // One message too large to send fails its own request, not the connection
                // (nothing was written for it).
                Err(ProtoError::Encode(reason)) => {
                    if let (Some(shared), Some(id)) = (shared.upgrade(), message.id()) {
                        shared.fail(id, format!("Cannot send the request: {reason}"));
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = match result {
            Ok(()) => writer.flush().await,
            Err(e) => Err(e),
        } {
            if let Some(shared) = shared.upgrade() {
                shared.close(format!("Writing to the agent failed: {}", error_chain(&e)));
            }
            return;
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// An agent running as a local child process in `--stdio` mode, with a client connected to it.
///
/// Dropping it sends the agent SIGTERM, on which the agent terminates the process groups of its
/// commands and exits; if it is still running 5 s later (and a runtime is around), SIGKILL.
#[derive(Debug)]
pub struct StdioAgent {
    /// The connected client.
    pub client: GuestClient,
    child: Option<tokio::process::Child>,
    pid: u32,
}

impl StdioAgent {
    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the agent to exit.
    pub async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        match self.child.as_mut() {
            Some(child) => child.wait().await,
            None => Err(io::Error::other("The agent process was already released")),
        }
    }
}

impl Drop for StdioAgent {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    if tokio::time::timeout(Duration::from_secs(5), child.wait())
                        .await
                        .is_err()
                    {
                        let _ = child.kill().await;
                    }
                });
            }
            Err(_) => {
                let _ = child.start_kill();
            }
        }
    }
}

/// Starts `agent --stdio` and connects a [`GuestClient`] to it (tests, local fallback).
pub async fn spawn_stdio_agent(agent: &Path) -> Result<StdioAgent, GuestError> {
    let mut child = tokio::process::Command::new(agent)
        .arg("--stdio")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|source| GuestError::Spawn {
            path: agent.to_owned(),
            source,
        })?;
    let pid = child.id().unwrap_or_default();
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.start_kill();
        return Err(GuestError::Spawn {
            path: agent.to_owned(),
            source: io::Error::other("The child has no stdio pipes"),
        });
    };
    // From here on, dropping `guard` stops the agent.
    let mut guard = StdioAgentGuard(Some(child));
    let options = ConnectOptions {
        hello_timeout: Duration::from_secs(10),
        ..ConnectOptions::new(format!("stdio-{pid}"))
    };
    let client = GuestClient::connect_with(stdout, stdin, options).await?;
    Ok(StdioAgent {
        client,
        child: guard.0.take(),
        pid,
    })
}

/// Kills a freshly spawned agent if connecting to it fails.
struct StdioAgentGuard(Option<tokio::process::Child>);

impl Drop for StdioAgentGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.start_kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_proto::ExitStatus as WireStatus;
    use tokio::io::{ReadHalf, WriteHalf};

    use super::*;

    type PeerReader = FrameReader<ReadHalf<tokio::io::DuplexStream>>;
    type PeerWriter = FrameWriter<WriteHalf<tokio::io::DuplexStream>>;

    /// A client connected to a scripted peer that has answered the hello.
    async fn connected() -> (GuestClient, PeerReader, PeerWriter) {
        let (host, peer) = tokio::io::duplex(256 * 1024);
        let (peer_read, peer_write) = tokio::io::split(peer);
        let mut reader = FrameReader::new(peer_read);
        let mut writer = FrameWriter::new(peer_write);
        let peer = async {
            let hello = reader
                .next()
                .await
                .expect("reads")
                .expect("frame")
                .expect("decodes");
            assert!(matches!(
                hello,
                Message::Hello { version: PROTOCOL_VERSION, hostname: Some(ref h), .. } if h == "box"
            ));
            writer
                .send(&Message::HelloAck {
                    version: PROTOCOL_VERSION,
                    info: HelloAckInfo {
                        agent_version: "test".into(),
                        kernel: "6.1".into(),
                        pid1: true,
                        pid: 1,
                        user: kiln_proto::UserInfo {
                            name: "runner".into(),
                            uid: 1001,
                            gid: 1001,
                            home: "/home/runner".into(),
                        },
                        user_fallback: None,
                    },
                })
                .await
                .expect("sends");
        };
        let (host_read, host_write) = tokio::io::split(host);
        let options = ConnectOptions {
            hostname: Some("box".into()),
            ..ConnectOptions::new("vm-unit")
        };
        let (client, ()) = tokio::join!(
            GuestClient::connect_with(host_read, host_write, options),
            peer
        );
        (client.expect("connects"), reader, writer)
    }

    async fn next(reader: &mut PeerReader) -> Message {
        reader
            .next()
            .await
            .expect("reads")
            .expect("frame")
            .expect("decodes")
    }

    #[tokio::test]
    async fn output_is_routed_by_exec_id_and_exit_ends_the_exec() {
        let (client, mut reader, mut writer) = connected().await;
        let (tx_a, mut rx_a) = mpsc::unbounded_channel();
        let (tx_b, mut rx_b) = mpsc::unbounded_channel();
        let peer = async {
            let (Message::Exec(a), Message::Exec(b)) =
                (next(&mut reader).await, next(&mut reader).await)
            else {
                panic!("expected two execs");
            };
            for (id, text) in [(b.id, "b1"), (a.id, "a1"), (b.id, "b2")] {
                writer
                    .feed(&Message::Stdout {
                        id,
                        data: Bytes::from(text),
                    })
                    .await
                    .expect("feeds");
            }
            writer
                .feed(&Message::Exit {
                    id: b.id,
                    status: WireStatus::Signaled(9),
                })
                .await
                .expect("feeds");
            writer
                .send(&Message::Exit {
                    id: a.id,
                    status: WireStatus::TimedOut,
                })
                .await
                .expect("sends");
        };
        let request = ExecRequest {
            command: Command::Argv(vec!["x".into()]),
            env: Vec::new(),
            cwd: None,
            timeout: None,
            user: ExecUser::Runner,
        };
        let (a, b, ()) = tokio::join!(
            client.exec(request.clone(), tx_a),
            client.exec(request, tx_b),
            peer
        );
        assert_eq!(a.expect("a").status, ExitStatus::TimedOut);
        assert_eq!(b.expect("b").status, ExitStatus::Signaled(9));
        assert_eq!(rx_a.try_recv().expect("a1").data, "a1");
        assert_eq!(rx_b.try_recv().expect("b1").data, "b1");
        assert_eq!(rx_b.try_recv().expect("b2").data, "b2");
        assert!(rx_a.try_recv().is_err());
    }

    #[tokio::test]
    async fn pending_requests_fail_when_the_agent_hangs_up() {
        let (client, mut reader, writer) = connected().await;
        let (tx, _rx) = mpsc::unbounded_channel();
        let request = ExecRequest {
            command: Command::Argv(vec!["sleep".into(), "9".into()]),
            env: Vec::new(),
            cwd: None,
            timeout: None,
            user: ExecUser::Runner,
        };
        let peer = async {
            assert!(matches!(next(&mut reader).await, Message::Exec(_)));
            drop(writer);
            drop(reader);
        };
        let (result, ()) = tokio::join!(client.exec(request, tx), peer);
        let err = result.expect_err("the channel closed");
        assert!(
            matches!(&err, VmError::Guest { vm, message } if vm == "vm-unit" && message.contains("closed")),
            "{err}"
        );
        assert!(client.is_closed());
        assert!(client.ping().await.is_err());
    }

    #[tokio::test]
    async fn a_dropped_exec_sends_kill_for_its_id() {
        let (client, mut reader, _writer) = connected().await;
        let (tx, _rx) = mpsc::unbounded_channel();
        let request = ExecRequest {
            command: Command::Argv(vec!["sleep".into(), "9".into()]),
            env: Vec::new(),
            cwd: None,
            timeout: None,
            user: ExecUser::Runner,
        };
        let exec_id = {
            let exec = client.exec(request, tx);
            tokio::pin!(exec);
            let _ = tokio::time::timeout(Duration::from_millis(20), &mut exec).await;
            let Message::Exec(spec) = next(&mut reader).await else {
                panic!("expected the exec");
            };
            spec.id
        };
        let kill = next(&mut reader).await;
        assert!(
            matches!(kill, Message::Kill { target: KillTarget::Exec(id), signal: Signal::Kill, .. } if id == exec_id),
            "{kill:?}"
        );
    }

    fn pty_request() -> PtyRequest {
        PtyRequest {
            command: Command::Argv(vec!["bash".into()]),
            env: vec![("TERM".into(), "xterm".into())],
            cwd: None,
            user: ExecUser::Root,
            size: kiln_proto::WindowSize { rows: 24, cols: 80 },
        }
    }

    #[tokio::test]
    async fn a_terminal_exec_relays_events_in_order_then_output_and_exit() {
        let (client, mut reader, mut writer) = connected().await;
        let mut session = client.exec_pty(pty_request()).await.expect("starts");
        let Message::Exec(spec) = next(&mut reader).await else {
            panic!("expected the exec");
        };
        assert_eq!(
            spec.pty,
            Some(kiln_proto::WindowSize { rows: 24, cols: 80 })
        );
        assert_eq!(spec.user, kiln_proto::ExecUser::Root);
        let input = session.writer();
        input.write(&b"ls\r"[..]).expect("open");
        input
            .resize(kiln_proto::WindowSize {
                rows: 50,
                cols: 120,
            })
            .expect("open");
        input.signal(Signal::Int).expect("open");
        for expected in [
            kiln_proto::PtyEvent::Input(Bytes::from_static(b"ls\r")),
            kiln_proto::PtyEvent::Resize(kiln_proto::WindowSize {
                rows: 50,
                cols: 120,
            }),
            kiln_proto::PtyEvent::Signal(Signal::Int),
        ] {
            assert_eq!(
                next(&mut reader).await,
                Message::Pty {
                    id: spec.id,
                    event: expected
                }
            );
        }
        writer
            .feed(&Message::Stdout {
                id: spec.id,
                data: Bytes::from_static(b"file\r\n"),
            })
            .await
            .expect("feeds");
        writer
            .send(&Message::Exit {
                id: spec.id,
                status: WireStatus::Signaled(2),
            })
            .await
            .expect("sends");
        assert_eq!(session.read().await.expect("output"), "file\r\n");
        assert!(session.read().await.is_none(), "the terminal closed");
        assert_eq!(session.wait().await.expect("exit"), ExitStatus::Signaled(2));
        assert!(input.write(&b"late"[..]).is_err());
    }

    #[tokio::test]
    async fn a_dropped_terminal_session_kills_its_exec() {
        let (client, mut reader, _writer) = connected().await;
        let session = client.exec_pty(pty_request()).await.expect("starts");
        let Message::Exec(spec) = next(&mut reader).await else {
            panic!("expected the exec");
        };
        drop(session);
        let kill = next(&mut reader).await;
        assert!(
            matches!(kill, Message::Kill { target: KillTarget::Exec(id), signal: Signal::Kill, .. } if id == spec.id),
            "{kill:?}"
        );
    }

    #[tokio::test]
    async fn guest_errors_carry_their_cause_chain() {
        let err = GuestError::Spawn {
            path: PathBuf::from("/x/agent"),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        let VmError::Guest { vm, message } = err.into_vm_error("vm-1") else {
            panic!("expected a guest error");
        };
        assert_eq!(vm, "vm-1");
        assert!(
            message.starts_with("Cannot start the agent /x/agent: "),
            "{message}"
        );
    }
}
