//! VM backends for kiln.
//!
//! A backend implements [`VmProvider`]: it allocates a [`Vm`] for a [`VmSpec`] and releases it.
//! A [`Vm`] runs commands (streaming their output as it is produced), copies files in and out and
//! kills what it started. Backends know nothing about workflows; the runner drives them.
//!
//! Backends:
//! - [`local`]: no isolation at all; a private directory and a process group per command. It is
//!   the development backend, and says so loudly whenever it is chosen.
//! - `qemu`: a real microVM per session (KVM where it works, TCG elsewhere), driven through the
//!   guest agent (see [`guest`]).
//! - [`firecracker`]: a Firecracker microVM per session (needs working KVM), configured through
//!   its REST API, with the agent on vsock.
//!
//! [`select_backend`] is the one factory: it picks a backend for `auto|local|qemu|firecracker`
//! and reports why.
//!
//! # Guest paths
//! Paths inside a VM are plain strings (the guest is always Linux). [`Vm::work_root`] is a
//! directory in the guest that belongs to the runner; everything the runner lays out for a
//! session (workspace, temp files, file-command files) lives under it.
//!
//! # Users
//! In a guest, commands run as the unprivileged `runner` user (passwordless sudo, as on GitHub's
//! hosted runners) unless an [`ExecRequest`] asks for [`ExecUser::Root`], which is for kiln's own
//! housekeeping; files kiln writes into a guest belong to `runner`. A guest image without that
//! user runs everything as root, and the backend says so when the VM starts. The local backend
//! runs everything as the invoking user.
//!
//! # Terminals
//! [`Vm::exec_pty`] runs a command on a pseudo-terminal (the foundation of `kiln debug`): a
//! [`PtySession`] carries its output, takes input, window sizes and signals through a
//! [`PtyWriter`], and reports the exit status. Backends without it return
//! [`VmError::Unsupported`].
//!
//! # Cancellation
//! Dropping the future returned by [`Vm::exec`] (or a [`PtySession`]) kills the command's whole
//! process group. Releasing a VM kills everything it still runs. Both are guaranteed even when
//! the caller panics.

#![warn(missing_docs)]

mod factory;
pub mod firecracker;
pub mod guest;
pub mod image;
pub mod local;
mod pty;
pub mod qemu;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use factory::{BackendConfig, BackendKind, Selection, select_backend};
/// The signals a host may send to a command, a terminal's size, and what a [`PtyWriter`] asks
/// of a terminal: the guest protocol's own types, which every backend uses as they are.
pub use kiln_proto::{PtyEvent, Signal, WindowSize};

/// What a session asks of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// The VM type (a `[vm_types.NAME]` entry), e.g. `default`.
    pub vm_type: String,
    /// The guest image name, e.g. `default`.
    pub image: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Size of the writable disk layer in MiB.
    pub disk_mib: u32,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            vm_type: "default".to_owned(),
            image: "default".to_owned(),
            vcpus: 2,
            memory_mib: 2048,
            disk_mib: 8192,
        }
    }
}

/// A VM handed out by [`VmProvider::allocate`], with the time the allocation took.
pub struct Allocation {
    /// The VM. It stays alive until released (or dropped, which releases it best-effort).
    pub vm: Arc<dyn Vm>,
    /// Wall time from the request to a VM ready to run commands.
    pub elapsed: Duration,
}

impl fmt::Debug for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Allocation")
            .field("vm", &self.vm.id())
            .field("elapsed", &self.elapsed)
            .finish()
    }
}

/// A VM backend.
#[async_trait]
pub trait VmProvider: Send + Sync + 'static {
    /// The backend's name as the CLI spells it: `local`, `qemu`, `firecracker`.
    fn name(&self) -> &'static str;

    /// Whether the VMs of this backend isolate the host from the workload.
    fn isolates(&self) -> bool;

    /// Allocates a fresh VM ready to run commands.
    async fn allocate(&self, spec: &VmSpec) -> Result<Allocation, VmError>;

    /// Releases a VM: kills everything it runs and removes everything it owns on the host.
    /// Releasing twice is not an error.
    async fn release(&self, vm: &dyn Vm) -> Result<(), VmError> {
        vm.release().await
    }

    /// The "ready" snapshot of a fresh VM for `spec`: taken once the agent has answered, stored
    /// with the image, and created (by booting a VM and snapshotting it) when there is none yet.
    async fn ready_snapshot(&self, spec: &VmSpec) -> Result<VmSnapshot, VmError> {
        let _ = spec;
        Err(VmError::Unsupported {
            backend: self.name(),
            what: "snapshots".to_owned(),
        })
    }

    /// Restores `snapshot` into a fresh VM: its own writable layer on top of the snapshot's
    /// disk, its own id, and a new handshake with its agent (hostname and clock set anew).
    async fn restore(&self, snapshot: &VmSnapshot) -> Result<Allocation, VmError> {
        let _ = snapshot;
        Err(VmError::Unsupported {
            backend: self.name(),
            what: "snapshots".to_owned(),
        })
    }

    /// Whether VMs of this backend can take live snapshots ([`Vm::checkpoint`]), which
    /// `--snapshots steps` needs. Asked before anything starts, so that a backend without them
    /// fails up front instead of after the first step.
    fn supports_checkpoints(&self) -> bool {
        false
    }

    /// Deletes a snapshot's files. VMs restored from it keep running. Deleting twice is not an
    /// error. A checkpoint's disk diff may stay until the snapshots taken after it are gone
    /// (they build on it); the snapshot itself can no longer be restored.
    async fn delete_snapshot(&self, snapshot: &VmSnapshot) -> Result<(), VmError> {
        let _ = snapshot;
        Err(VmError::Unsupported {
            backend: self.name(),
            what: "snapshots".to_owned(),
        })
    }
}

/// A saved VM (memory, devices and disk) that [`VmProvider::restore`] can start again, any
/// number of times. Backend-neutral: the files under `dir` are the backend's business.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSnapshot {
    /// The backend that wrote it.
    pub backend: &'static str,
    /// The directory holding the snapshot's files.
    pub dir: std::path::PathBuf,
    /// What the snapshotted VM was; a restored VM is the same.
    pub spec: VmSpec,
    /// Size of the snapshot's files in bytes.
    pub size_bytes: u64,
}

/// One allocated VM.
#[async_trait]
pub trait Vm: Send + Sync + fmt::Debug + 'static {
    /// A short unique id, e.g. `local-3f2a9c1d` or `qemu-3f2a9c1d`.
    fn id(&self) -> &str;

    /// The backend's name.
    fn backend(&self) -> &'static str;

    /// A directory in the guest that belongs to the runner.
    fn work_root(&self) -> &str;

    /// Runs a command and waits for it, sending its output to `output` as it is produced.
    ///
    /// A timeout kills the command's whole process group and returns
    /// [`ExitStatus::TimedOut`]. Dropping the returned future kills the process group too.
    async fn exec(&self, request: ExecRequest, output: OutputSink) -> Result<ExecOutcome, VmError>;

    /// Kills every process that commands of this VM started and that is still running.
    async fn kill_all(&self) -> Result<(), VmError>;

    /// Copies a host file or directory (recursively) to `guest` in the VM.
    async fn copy_in(&self, host: &Path, guest: &str) -> Result<(), VmError>;

    /// Copies a guest file or directory (recursively) from the VM to `host`.
    async fn copy_out(&self, guest: &str, host: &Path) -> Result<(), VmError>;

    /// Writes a whole file in the guest, creating its parent directories.
    async fn write_file(&self, guest: &str, contents: &[u8]) -> Result<(), VmError>;

    /// Reads a whole file from the guest.
    async fn read_file(&self, guest: &str) -> Result<Vec<u8>, VmError>;

    /// Kills everything and frees every host resource of the VM. Idempotent.
    async fn release(&self) -> Result<(), VmError>;

    /// Runs a command on a new pseudo-terminal and returns at once with its session: the
    /// command leads a new session with the terminal as its controlling terminal, in
    /// `request.cwd` (else [`Vm::work_root`]) with `request.env` on top of the VM's base
    /// environment. See [`PtySession`] for input, resizes, signals, output and the exit.
    async fn exec_pty(&self, request: PtyRequest) -> Result<PtySession, VmError> {
        let _ = request;
        Err(VmError::Unsupported {
            backend: self.backend(),
            what: "Interactive terminals".to_owned(),
        })
    }

    /// Saves the whole VM (memory, devices, disk) under `dest`, a directory that must not exist
    /// yet, and stops it: the VM is spent afterwards and only [`Vm::release`] is left to call.
    async fn snapshot(&self, dest: &Path) -> Result<VmSnapshot, VmError> {
        let _ = dest;
        Err(VmError::Unsupported {
            backend: self.backend(),
            what: "snapshots".to_owned(),
        })
    }

    /// Saves the whole VM under `dest` (a directory that must not exist yet) and lets it go on
    /// running: a live snapshot, restorable with [`VmProvider::restore`]. The VM is paused while
    /// its state is written. No command may be running in it (the runner checkpoints between
    /// steps). Where the backend has them, the disk is saved as a diff against the previous
    /// checkpoint of the same VM.
    async fn checkpoint(&self, dest: &Path) -> Result<VmSnapshot, VmError> {
        let _ = dest;
        Err(VmError::Unsupported {
            backend: self.backend(),
            what: "live snapshots (--snapshots steps)".to_owned(),
        })
    }
}

/// A command to run in a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// What to run.
    pub command: Command,
    /// Variables set on top of the VM's base environment.
    pub env: Vec<(String, String)>,
    /// Working directory in the guest; [`Vm::work_root`] when `None`.
    pub cwd: Option<String>,
    /// Kill the command (its whole process group) after this long.
    pub timeout: Option<Duration>,
    /// Whom to run as (see the crate docs).
    pub user: ExecUser,
}

/// Whom a command runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecUser {
    /// The guest's unprivileged `runner` user (root in an image without one; the invoking user
    /// on the local backend). What steps run as.
    #[default]
    Runner,
    /// root, for kiln's own housekeeping in the guest (the invoking user on the local
    /// backend).
    Root,
}

/// A command to run on a pseudo-terminal ([`Vm::exec_pty`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtyRequest {
    /// What to run.
    pub command: Command,
    /// Variables set on top of the VM's base environment (pass `TERM` here).
    pub env: Vec<(String, String)>,
    /// Working directory in the guest; [`Vm::work_root`] when `None`.
    pub cwd: Option<String>,
    /// Whom to run as.
    pub user: ExecUser,
    /// The terminal's initial size.
    pub size: WindowSize,
}

/// A command running on a pseudo-terminal, from [`Vm::exec_pty`].
///
/// - [`PtySession::writer`] hands out a [`PtyWriter`] (cloneable) for input bytes, window size
///   changes and signals;
/// - [`PtySession::read`] yields what the command writes to the terminal (stdout and stderr
///   together, as a terminal shows them), and `None` once the terminal has closed and all of
///   it has been read;
/// - [`PtySession::wait`] returns how the command ended.
///
/// Dropping the session before the command has ended kills its process group.
#[derive(Debug)]
pub struct PtySession {
    vm: String,
    writer: PtyWriter,
    output: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    exit: tokio::sync::oneshot::Receiver<Result<ExitStatus, VmError>>,
    /// Dropped with the session: tells the backend to kill the command if it still runs.
    _cancel: tokio::sync::oneshot::Sender<()>,
}

/// The backend's end of a [`PtySession`], made by [`PtySession::channel`].
#[derive(Debug)]
pub struct PtyDriver {
    /// What the host's side wants done, in order.
    pub events: tokio::sync::mpsc::UnboundedReceiver<PtyEvent>,
    /// Where the terminal's output goes; drop it once all output is sent.
    pub output: tokio::sync::mpsc::UnboundedSender<Bytes>,
    /// Where the exit goes, after all output.
    pub exit: tokio::sync::oneshot::Sender<Result<ExitStatus, VmError>>,
    /// Resolves (with an error) when the session is dropped: kill the command then.
    pub cancelled: tokio::sync::oneshot::Receiver<()>,
}

impl PtySession {
    /// A new session of VM `vm` and the driver a backend feeds it from.
    pub fn channel(vm: &str) -> (PtySession, PtyDriver) {
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let (output, output_rx) = tokio::sync::mpsc::unbounded_channel();
        let (exit, exit_rx) = tokio::sync::oneshot::channel();
        let (cancel, cancelled) = tokio::sync::oneshot::channel();
        (
            PtySession {
                vm: vm.to_owned(),
                writer: PtyWriter { tx: events_tx },
                output: output_rx,
                exit: exit_rx,
                _cancel: cancel,
            },
            PtyDriver {
                events,
                output,
                exit,
                cancelled,
            },
        )
    }

    /// A handle for input, resizes and signals.
    pub fn writer(&self) -> PtyWriter {
        self.writer.clone()
    }

    /// The next piece of output; `None` once the terminal has closed and everything was read.
    pub async fn read(&mut self) -> Option<Bytes> {
        self.output.recv().await
    }

    /// Waits for the command to end. Output not read yet is dropped.
    pub async fn wait(self) -> Result<ExitStatus, VmError> {
        let PtySession {
            vm, exit, _cancel, ..
        } = self;
        // `_cancel` lives until the exit is in: dropping it earlier would kill the command.
        let status = exit.await;
        drop(_cancel);
        status.unwrap_or_else(|_| {
            Err(VmError::Guest {
                vm,
                message: "The terminal session ended without an exit status".to_owned(),
            })
        })
    }
}

/// Sends input, window sizes and signals to a [`PtySession`]. Every method fails with
/// [`PtyClosed`] once the session is over.
#[derive(Debug, Clone)]
pub struct PtyWriter {
    tx: tokio::sync::mpsc::UnboundedSender<PtyEvent>,
}

/// The terminal session has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("The terminal session has ended")]
pub struct PtyClosed;

impl PtyWriter {
    /// Types `data` at the terminal (Ctrl-C is the byte 0x03; the guest's terminal turns it
    /// into SIGINT for its foreground job, as a real terminal would).
    pub fn write(&self, data: impl Into<Bytes>) -> Result<(), PtyClosed> {
        self.send(PtyEvent::Input(data.into()))
    }

    /// Changes the terminal's size; its foreground job gets SIGWINCH.
    pub fn resize(&self, size: WindowSize) -> Result<(), PtyClosed> {
        self.send(PtyEvent::Resize(size))
    }

    /// Sends `signal` to the terminal's foreground process group.
    pub fn signal(&self, signal: Signal) -> Result<(), PtyClosed> {
        self.send(PtyEvent::Signal(signal))
    }

    fn send(&self, event: PtyEvent) -> Result<(), PtyClosed> {
        self.tx.send(event).map_err(|_| PtyClosed)
    }
}

/// What an [`ExecRequest`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A program and its arguments. The program is looked up in `PATH`.
    Argv(Vec<String>),
    /// A script written to a fresh file in the guest, run with `shell`.
    ///
    /// Every `{0}` in `shell` is replaced by the script's path; when there is none, the path is
    /// appended. `extension` (e.g. `.sh`, `.py`) is the script file's suffix.
    Script {
        /// The interpreter's argv, e.g. `["bash", "--noprofile", "--norc", "-eo", "pipefail", "{0}"]`.
        shell: Vec<String>,
        /// The script's text.
        script: String,
        /// Suffix of the script file.
        extension: String,
    },
}

impl Command {
    /// The argv to run for a script at `path`: `{0}` replaced, or the path appended.
    pub fn script_argv(shell: &[String], path: &str) -> Vec<String> {
        if shell.iter().any(|a| a.contains("{0}")) {
            shell.iter().map(|a| a.replace("{0}", path)).collect()
        } else {
            let mut argv = shell.to_vec();
            argv.push(path.to_owned());
            argv
        }
    }
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A piece of a command's output, in the order it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Which stream.
    pub stream: Stream,
    /// The bytes, not necessarily whole lines.
    pub data: Bytes,
}

/// Where [`Vm::exec`] sends output. A closed receiver is not an error: output is then dropped.
pub type OutputSink = tokio::sync::mpsc::UnboundedSender<Output>;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// Its timeout expired and kiln killed it.
    TimedOut,
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }

    /// The exit code, if it exited.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Exited(code) => Some(code),
            _ => None,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Exited(code) => write!(f, "exit code {code}"),
            ExitStatus::Signaled(signal) => write!(f, "killed by signal {signal}"),
            ExitStatus::TimedOut => f.write_str("timed out"),
        }
    }
}

/// The result of [`Vm::exec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecOutcome {
    /// How the command ended.
    pub status: ExitStatus,
    /// How long it ran.
    pub duration: Duration,
}

/// Errors of VM backends.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The backend cannot be used on this host.
    #[error("The {backend} backend is unavailable: {reason}")]
    Unavailable {
        /// Backend name.
        backend: &'static str,
        /// Why, in words a user can act on.
        reason: String,
    },
    /// The VM did not come up.
    #[error("VM {vm} failed to start: {reason}")]
    Boot {
        /// VM id.
        vm: String,
        /// What went wrong.
        reason: String,
    },
    /// The VM was already released.
    #[error("VM {vm} is released")]
    Released {
        /// VM id.
        vm: String,
    },
    /// A host-side I/O operation failed.
    #[error("{op} for VM {vm} failed")]
    Io {
        /// VM id.
        vm: String,
        /// What was being done, e.g. `copying /src into the VM`.
        op: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The guest agent reported an error or broke the protocol.
    #[error("Guest agent of VM {vm}: {message}")]
    Guest {
        /// VM id.
        vm: String,
        /// The agent's message.
        message: String,
    },
    /// The backend does not implement this yet.
    #[error("{what} is not supported by the {backend} backend yet")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// The operation.
        what: String,
    },
}
