//! Serving one connection: the hello, then a loop dispatching requests.
//!
//! Replies from everywhere (exec output pumps, transfers, the loop itself) go through one
//! bounded queue to one writer task, so frames never interleave and a slow host slows the
//! producers down instead of growing memory. Execs and transfers run as their own tasks; the
//! loop only starts them and feeds upload chunks to them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use kiln_proto::{
    Clock, FrameReader, FrameWriter, HelloAckInfo, KillTarget, Message, PROTOCOL_VERSION,
    ProtoError, PtyEvent, RequestId, Signal, decode_payload, peek_version,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::reaper::Reaper;
use crate::user::Identities;
use crate::{exec, files, log, system};

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The stream broke or a frame was oversized.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// The host's hello was unacceptable.
    #[error("Rejected the hello: {0}")]
    Hello(String),
}

/// Why serving ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeEnd {
    /// The host asked for a shutdown (already acknowledged).
    Shutdown,
    /// The host closed the channel.
    Closed,
}

/// State shared by the tasks of one connection.
pub struct Agent {
    /// Outgoing frames.
    pub out: mpsc::Sender<Message>,
    /// The child reaper.
    pub reaper: Arc<Reaper>,
    /// Whether the agent is PID 1 (and manages the system).
    pub pid1: bool,
    /// Whom execs run as.
    pub identities: Identities,
    /// Execs from their request to their exit.
    execs: Mutex<HashMap<RequestId, ExecEntry>>,
}

/// One exec's kill bookkeeping. A kill that arrives before the process exists (the exec task
/// has not spawned it yet) is remembered and delivered as soon as it does.
#[derive(Debug, Default)]
struct ExecEntry {
    /// The process group, once spawned.
    pgid: Option<u32>,
    /// A signal requested before the spawn.
    pending: Option<Signal>,
    /// Where a terminal exec takes the host's terminal events (queued until it runs).
    terminal: Option<mpsc::UnboundedSender<PtyEvent>>,
}

impl Agent {
    fn execs(&self) -> MutexGuard<'_, HashMap<RequestId, ExecEntry>> {
        // Single inserts and removes: a poisoned map is still consistent.
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an exec as soon as it is requested, so a kill (or terminal input) can never
    /// miss it.
    pub fn exec_requested(&self, id: RequestId, terminal: Option<mpsc::UnboundedSender<PtyEvent>>) {
        self.execs().insert(
            id,
            ExecEntry {
                terminal,
                ..ExecEntry::default()
            },
        );
    }

    /// Hands a terminal event to its exec; one for an exec without a terminal, or one that has
    /// ended, is dropped.
    pub fn terminal_event(&self, id: RequestId, event: PtyEvent) {
        if let Some(tx) = self.execs().get(&id).and_then(|e| e.terminal.as_ref()) {
            let _ = tx.send(event);
        }
    }

    /// Records a spawned exec's process group, delivering a kill that came before.
    pub fn exec_started(&self, id: RequestId, pgid: u32) {
        let pending = {
            let mut execs = self.execs();
            let entry = execs.entry(id).or_default();
            entry.pgid = Some(pgid);
            entry.pending.take()
        };
        if let Some(signal) = pending {
            exec::kill_group(pgid, signal);
        }
    }

    /// Forgets a finished exec.
    pub fn exec_finished(&self, id: RequestId) {
        self.execs().remove(&id);
    }

    /// Queues a frame; a closed queue means the connection is ending, so it is dropped.
    pub async fn send(&self, message: Message) {
        let _ = self.out.send(message).await;
    }

    /// Signals one exec's group, or every exec's (under PID 1: every process).
    pub fn kill(&self, target: KillTarget, signal: Signal) {
        let mut groups = Vec::new();
        {
            let mut execs = self.execs();
            let mut mark = |entry: &mut ExecEntry| match entry.pgid {
                Some(pgid) => groups.push(pgid),
                None => entry.pending = Some(signal),
            };
            match target {
                KillTarget::Exec(id) => execs.get_mut(&id).into_iter().for_each(&mut mark),
                KillTarget::All => execs.values_mut().for_each(&mut mark),
            }
        }
        for pgid in groups {
            exec::kill_group(pgid, signal);
        }
        if target == KillTarget::All && self.pid1 {
            system::kill_everything(signal);
        }
    }

    fn running(&self) -> usize {
        self.execs().len()
    }
}

/// Serves one connection until the host closes it or asks for a shutdown, or until `stop`
/// resolves (treated like the host closing: every exec is terminated).
pub async fn serve<R, W>(
    reader: R,
    writer: W,
    reaper: Arc<Reaper>,
    pid1: bool,
    stop: impl Future<Output = ()>,
) -> Result<ServeEnd, ServeError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = FrameReader::new(reader);
    let mut writer = FrameWriter::new(writer);
    tokio::pin!(stop);
    let greeted = tokio::select! {
        greeted = hello(&mut reader, &mut writer, pid1) => greeted?,
        () = &mut stop => None,
    };
    let Some(identities) = greeted else {
        return Ok(ServeEnd::Closed);
    };

    let (out_tx, out_rx) = mpsc::channel(64);
    let writer_task = tokio::spawn(write_loop(writer, out_rx));
    let agent = Arc::new(Agent {
        out: out_tx,
        reaper,
        pid1,
        identities,
        execs: Mutex::new(HashMap::new()),
    });
    let mut uploads: HashMap<RequestId, mpsc::Sender<Bytes>> = HashMap::new();

    let result = loop {
        // Reading a frame is cancel-safe: partial frames stay in the reader's buffer.
        let next = tokio::select! {
            next = reader.next() => next,
            () = &mut stop => break Ok(ServeEnd::Closed),
        };
        let message = match next {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(malformed))) => {
                log!("rejected a frame: {malformed}");
                agent
                    .send(Message::Error {
                        id: None,
                        message: malformed.to_string(),
                    })
                    .await;
                continue;
            }
            Ok(None) => break Ok(ServeEnd::Closed),
            Err(e) => {
                if !matches!(e, ProtoError::Io(_)) {
                    agent
                        .send(Message::Error {
                            id: None,
                            message: e.to_string(),
                        })
                        .await;
                }
                break Err(ServeError::Proto(e));
            }
        };
        match message {
            Message::Exec(spec) => {
                let (terminal, events) = match spec.pty {
                    Some(_) => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        (Some(tx), Some(rx))
                    }
                    None => (None, None),
                };
                agent.exec_requested(spec.id, terminal);
                tokio::spawn(exec::run(agent.clone(), spec, events));
            }
            Message::Pty { id, event } => agent.terminal_event(id, event),
            Message::Kill { id, target, signal } => {
                agent.kill(target, signal);
                agent.send(Message::Done { id }).await;
            }
            Message::Put { id, path, kind } => {
                let (tx, rx) = mpsc::channel(16);
                uploads.insert(id, tx);
                tokio::spawn(files::put(agent.clone(), id, path, kind, rx));
            }
            Message::Chunk { id, data } => {
                if let Some(tx) = uploads.get(&id)
                    && tx.send(data).await.is_err()
                {
                    // The upload already failed and said so; drop the rest of its data.
                    uploads.remove(&id);
                }
            }
            Message::End { id } => {
                uploads.remove(&id);
            }
            Message::Get { id, path } => {
                tokio::spawn(files::get(agent.clone(), id, path));
            }
            Message::Ping { id } => agent.send(Message::Pong { id }).await,
            Message::Shutdown { id } => {
                stop_everything(&agent).await;
                if pid1 {
                    system::sync();
                }
                agent.send(Message::Done { id }).await;
                break Ok(ServeEnd::Shutdown);
            }
            Message::Error { id, message } => {
                log!("the host reported an error ({id:?}): {message}")
            }
            // A VM restored from a snapshot wakes up inside the connection that was open when
            // it was saved, but its host is a new one: that host greets again, and the guest
            // takes the new identity (hostname, clock) before anything else runs.
            Message::Hello {
                version,
                clock,
                hostname,
            } => {
                if version != PROTOCOL_VERSION {
                    let err = ProtoError::VersionMismatch {
                        host: version,
                        agent: PROTOCOL_VERSION,
                    };
                    agent
                        .send(Message::Error {
                            id: None,
                            message: err.to_string(),
                        })
                        .await;
                    continue;
                }
                if pid1 {
                    apply_system_settings(clock, hostname.as_deref());
                }
                agent
                    .send(Message::HelloAck {
                        version: PROTOCOL_VERSION,
                        info: ack_info(pid1, &agent.identities),
                    })
                    .await;
            }
            other => {
                let id = other.id();
                agent
                    .send(Message::Error {
                        id,
                        message: format!("Unexpected message from the host: {other:?}"),
                    })
                    .await;
            }
        }
    };

    drop(uploads);
    if result.as_ref().map_or(true, |end| *end == ServeEnd::Closed) {
        // Nobody is listening any more: do not leave the host's commands running.
        stop_everything(&agent).await;
    }
    // Let the writer drain (the Done of a shutdown, the last output) before returning.
    drop(agent);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    result
}

/// Terminates every exec: SIGTERM, up to a second's grace, then SIGKILL.
async fn stop_everything(agent: &Agent) {
    agent.kill(KillTarget::All, Signal::Term);
    for _ in 0..20 {
        if agent.running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.kill(KillTarget::All, Signal::Kill);
}

/// Handles the first frame; returns the users execs will run as, or `None` when the stream
/// ended before any frame.
async fn hello<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    pid1: bool,
) -> Result<Option<Identities>, ServeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(payload) = reader.next_payload().await? else {
        return Ok(None);
    };
    let reject = |message: String| Message::Error { id: None, message };
    match peek_version(&payload) {
        Some(PROTOCOL_VERSION) => {}
        Some(host) => {
            let err = ProtoError::VersionMismatch {
                host,
                agent: PROTOCOL_VERSION,
            };
            writer.send(&reject(err.to_string())).await?;
            return Err(ServeError::Hello(err.to_string()));
        }
        None => {
            let message = "Expected Hello as the first frame".to_owned();
            writer.send(&reject(message.clone())).await?;
            return Err(ServeError::Hello(message));
        }
    }
    let (clock, hostname) = match decode_payload(&payload) {
        Ok(Message::Hello {
            clock, hostname, ..
        }) => (clock, hostname),
        Ok(_) | Err(_) => {
            let message = "Expected Hello as the first frame".to_owned();
            writer.send(&reject(message.clone())).await?;
            return Err(ServeError::Hello(message));
        }
    };
    if pid1 {
        apply_system_settings(clock, hostname.as_deref());
    }
    // After switch_root and the mounts: the guest's own /etc/passwd.
    let identities = Identities::resolve(pid1);
    if let Some(reason) = &identities.fallback
        && pid1
    {
        log!("{reason}");
    }
    writer
        .send(&Message::HelloAck {
            version: PROTOCOL_VERSION,
            info: ack_info(pid1, &identities),
        })
        .await?;
    Ok(Some(identities))
}

/// What the agent says about itself in a `HelloAck`.
fn ack_info(pid1: bool, identities: &Identities) -> HelloAckInfo {
    HelloAckInfo {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        kernel: system::kernel_release(),
        pid1,
        pid: std::process::id(),
        user: identities.runner.info.clone(),
        user_fallback: identities.fallback.clone(),
    }
}

fn apply_system_settings(clock: Option<Clock>, hostname: Option<&str>) {
    if let Some(clock) = clock
        && let Err(e) = system::set_clock(clock)
    {
        log!("cannot set the clock: {e}");
    }
    if let Some(hostname) = hostname
        && let Err(e) = system::set_hostname(hostname)
    {
        log!("cannot set the hostname: {e}");
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    mut rx: mpsc::Receiver<Message>,
) {
    while let Some(first) = rx.recv().await {
        // Batch what is queued into one flush.
        let mut next = Some(first);
        let mut result = Ok(());
        while let Some(message) = next.take() {
            match writer.feed(&message).await {
                Ok(()) => {}
                // Nothing was written for a message too large to encode: report that instead.
                Err(ProtoError::Encode(reason)) => {
                    log!("cannot send a message: {reason}");
                    let error = Message::Error {
                        id: message.id(),
                        message: format!("The agent could not send a reply: {reason}"),
                    };
                    if let Err(e) = writer.feed(&error).await {
                        result = Err(e);
                        break;
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
            log!("writing to the host failed: {e}");
            // Keep draining so producers never block on a dead channel.
            while rx.recv().await.is_some() {}
            return;
        }
    }
}
