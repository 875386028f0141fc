//! The messages of the protocol. The order of [`Message`]'s variants is part of the wire format.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Identifies one request (exec, transfer, kill, ping, shutdown) within a connection.
pub type RequestId = u64;

/// One frame's payload.
///
/// Variants 0 (`Hello`), 1 (`HelloAck`) and 2 (`Error`) must never move: they are how two
/// builds with different versions still understand each other well enough to disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Host -> agent, the first frame of a connection.
    Hello {
        /// The host's [`crate::PROTOCOL_VERSION`]. Must stay the first field.
        version: u32,
        /// Wall-clock time to set in the guest, if the agent manages the system clock.
        clock: Option<Clock>,
        /// Hostname to set in the guest, if the agent manages the system.
        hostname: Option<String>,
    },
    /// Agent -> host: the hello was accepted.
    HelloAck {
        /// The agent's [`crate::PROTOCOL_VERSION`]. Must stay the first field.
        version: u32,
        /// Facts about the agent and its system.
        info: HelloAckInfo,
    },
    /// Either direction: a request failed (`id` set) or a frame was rejected (`id` unset).
    Error {
        /// The request the error belongs to, if any.
        id: Option<RequestId>,
        /// What went wrong, in words for a user.
        message: String,
    },
    /// Host -> agent: run a command.
    Exec(ExecSpec),
    /// Agent -> host: the command of `id` is running as process (and process group) `pid`.
    Started {
        /// The exec.
        id: RequestId,
        /// Its process id, which is also its process group id.
        pid: u32,
    },
    /// Agent -> host: bytes the command wrote to its standard output.
    Stdout {
        /// The exec.
        id: RequestId,
        /// At most [`crate::CHUNK_LEN`] bytes.
        data: Bytes,
    },
    /// Agent -> host: bytes the command wrote to its standard error.
    Stderr {
        /// The exec.
        id: RequestId,
        /// At most [`crate::CHUNK_LEN`] bytes.
        data: Bytes,
    },
    /// Agent -> host: the command ended. Sent after all its output.
    Exit {
        /// The exec.
        id: RequestId,
        /// How it ended.
        status: ExitStatus,
    },
    /// Host -> agent: signal the process group of one exec, or of every running exec.
    Kill {
        /// This request (answered with [`Message::Done`]).
        id: RequestId,
        /// Whom to signal.
        target: KillTarget,
        /// Which signal.
        signal: Signal,
    },
    /// Host -> agent: write `path` from the [`Message::Chunk`]s that follow, up to
    /// [`Message::End`]. Answered with [`Message::Done`] or [`Message::Error`].
    Put {
        /// This transfer.
        id: RequestId,
        /// Absolute guest path of the file, or of the directory to unpack into.
        path: String,
        /// What the chunks hold.
        kind: PutKind,
    },
    /// Host -> agent: send `path`. Answered with [`Message::Meta`], [`Message::Chunk`]s and
    /// [`Message::End`], or with [`Message::Error`].
    Get {
        /// This transfer.
        id: RequestId,
        /// Absolute guest path of a file or directory.
        path: String,
    },
    /// Agent -> host: what the chunks of a [`Message::Get`] will hold.
    Meta {
        /// The transfer.
        id: RequestId,
        /// A plain file or a tar stream.
        kind: GetKind,
    },
    /// Either direction: the next piece of a transfer's data.
    Chunk {
        /// The transfer.
        id: RequestId,
        /// At most [`crate::CHUNK_LEN`] bytes.
        data: Bytes,
    },
    /// Either direction: a transfer's data is complete.
    End {
        /// The transfer.
        id: RequestId,
    },
    /// Agent -> host: a kill, put or shutdown request succeeded.
    Done {
        /// The request.
        id: RequestId,
    },
    /// Host -> agent: are you there?
    Ping {
        /// This request.
        id: RequestId,
    },
    /// Agent -> host: yes.
    Pong {
        /// The ping.
        id: RequestId,
    },
    /// Host -> agent: kill everything, sync the disks and power off (or exit, under `--stdio`).
    Shutdown {
        /// This request (answered with [`Message::Done`] before powering off).
        id: RequestId,
    },
    /// Host -> agent: input for a running terminal exec (one whose [`ExecSpec::pty`] is set).
    /// Not answered: keystrokes must not wait for a round trip. An exec that has ended, or that
    /// has no terminal, ignores it.
    Pty {
        /// The exec.
        id: RequestId,
        /// What happened at the host's terminal.
        event: PtyEvent,
    },
}

impl Message {
    /// The request id the message belongs to, if any.
    pub fn id(&self) -> Option<RequestId> {
        match self {
            Message::Hello { .. } | Message::HelloAck { .. } => None,
            Message::Error { id, .. } => *id,
            Message::Exec(spec) => Some(spec.id),
            Message::Started { id, .. }
            | Message::Stdout { id, .. }
            | Message::Stderr { id, .. }
            | Message::Exit { id, .. }
            | Message::Kill { id, .. }
            | Message::Put { id, .. }
            | Message::Get { id, .. }
            | Message::Meta { id, .. }
            | Message::Chunk { id, .. }
            | Message::End { id }
            | Message::Done { id }
            | Message::Ping { id }
            | Message::Pong { id }
            | Message::Shutdown { id }
            | Message::Pty { id, .. } => Some(*id),
        }
    }
}

/// A point in wall-clock time: seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clock {
    /// Whole seconds since 1970-01-01T00:00:00Z.
    pub secs: i64,
    /// Nanoseconds past `secs` (below 1,000,000,000).
    pub nanos: u32,
}

impl Clock {
    /// The host's current time.
    pub fn now() -> Clock {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            secs: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            nanos: since.subsec_nanos(),
        }
    }
}

/// What the agent says about itself in [`Message::HelloAck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAckInfo {
    /// The agent's crate version, e.g. `0.1.0`.
    pub agent_version: String,
    /// The running kernel's release (`uname -r`).
    pub kernel: String,
    /// Whether the agent is PID 1 (and so manages the system: clock, hostname, power).
    pub pid1: bool,
    /// The agent's process id.
    pub pid: u32,
    /// Whom execs run as by default ([`ExecUser::Runner`]).
    pub user: UserInfo,
    /// Why [`HelloAckInfo::user`] is not the guest's `runner` user, when it is not (for example
    /// an image without one, where execs fall back to root).
    pub user_fallback: Option<String>,
}

/// A user execs run as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// The login name, e.g. `runner`.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory: `HOME` of its execs, and their working directory when none is given.
    pub home: String,
}

/// A command to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// This exec; output and exit carry it.
    pub id: RequestId,
    /// What to run.
    pub command: ExecCommand,
    /// Variables set on top of the agent's base environment: `PATH`, and the `HOME`, `USER`
    /// and `LOGNAME` of [`ExecSpec::user`].
    pub env: Vec<(String, String)>,
    /// Working directory; the agent's default (`HOME`, else `/`) when unset.
    pub cwd: Option<String>,
    /// Kill the process group after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Whom to run as.
    pub user: ExecUser,
    /// Run on a new pseudo-terminal of this size instead of pipes: the command is a session
    /// leader with the terminal as its controlling terminal and as its stdin, stdout and
    /// stderr. Everything it writes arrives as [`Message::Stdout`]; input, resizes and signals
    /// go to it as [`Message::Pty`].
    pub pty: Option<WindowSize>,
}

/// Whom an exec runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ExecUser {
    /// The agent's default user ([`HelloAckInfo::user`]): the guest's unprivileged `runner`
    /// (with passwordless sudo) where it exists.
    #[default]
    Runner,
    /// root, for the host's own housekeeping. Refused by an agent that is not root itself.
    Root,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// What a [`Message::Pty`] carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PtyEvent {
    /// Bytes typed at the host's terminal, written to the terminal's input as they are (in raw
    /// mode, Ctrl-C is the byte 0x03 and the guest's line discipline turns it into SIGINT).
    Input(Bytes),
    /// The host's terminal changed size (`TIOCSWINSZ`; the foreground job gets `SIGWINCH`).
    Resize(WindowSize),
    /// Send a signal to the terminal's foreground process group, as the terminal itself would.
    Signal(Signal),
}

/// What an exec runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecCommand {
    /// A program (looked up in `PATH`) and its arguments.
    Argv(Vec<String>),
    /// A script written to a fresh file, run with `shell`: every `{0}` in `shell` is replaced
    /// by the file's path, or the path is appended when there is none.
    Script {
        /// The interpreter's argv.
        shell: Vec<String>,
        /// The script's text.
        script: String,
        /// Suffix of the script file, e.g. `.sh`.
        extension: String,
    },
}

/// How an exec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// This signal killed it.
    Signaled(i32),
    /// Its timeout expired and the agent killed its process group.
    TimedOut,
}

/// Whom a [`Message::Kill`] signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KillTarget {
    /// The process group of one exec.
    Exec(RequestId),
    /// Every process the agent's execs started (under PID 1: every process but the agent).
    All,
}

/// The signals a host may send. A closed set: the agent never forwards arbitrary numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signal {
    /// `SIGTERM`.
    Term,
    /// `SIGKILL`.
    Kill,
    /// `SIGINT`.
    Int,
    /// `SIGHUP`.
    Hup,
    /// `SIGQUIT`.
    Quit,
    /// `SIGUSR1`.
    Usr1,
    /// `SIGUSR2`.
    Usr2,
}

impl Signal {
    /// The Linux signal number.
    pub fn number(self) -> i32 {
        match self {
            Signal::Hup => 1,
            Signal::Int => 2,
            Signal::Quit => 3,
            Signal::Kill => 9,
            Signal::Usr1 => 10,
            Signal::Usr2 => 12,
            Signal::Term => 15,
        }
    }
}

/// What the chunks of a [`Message::Put`] hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PutKind {
    /// The bytes of one file, created (with its parent directories) or truncated, then given
    /// this mode.
    File {
        /// Permission bits, e.g. `0o644`.
        mode: u32,
    },
    /// A tar stream unpacked into the directory `path` (created if missing), keeping modes.
    Tree,
}

/// What the chunks of a [`Message::Get`] hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GetKind {
    /// The bytes of one file.
    File {
        /// Permission bits.
        mode: u32,
        /// Size when the transfer started.
        size: u64,
    },
    /// A tar stream of the directory's contents, with modes.
    Tree,
}
