//! Running one command.
//!
//! Each exec runs as the user it asks for (see [`crate::user`]): by default the guest's
//! `runner`, with `HOME`, `USER` and `LOGNAME` set for it; the credentials change in the child
//! just before `exec`.
//!
//! Each exec is a new process group (`setpgid(0, 0)` in the child), so signals reach its whole
//! tree: a timeout sends SIGTERM to the group, waits [`KILL_GRACE`] for the leader, then sends
//! SIGKILL to the group regardless, which also kills grandchildren that ignored SIGTERM.
//! stdout and stderr are pipes read by two tasks that forward each read as it arrives; the exit
//! is reported after both pipes are drained. A pipe stays open while any process of the tree
//! holds it, so once the leader has exited the pumps only wait [`DRAIN_IDLE`] for more bytes,
//! and [`DRAIN_MAX`] in all: a background daemon cannot hold the exec open forever.
//!
//! # Terminal execs
//! With [`ExecSpec::pty`] set, the exec gets a fresh pseudo-terminal instead of pipes: the child
//! calls `setsid` (so it leads a new session and process group, which the kills above still
//! reach) and makes the terminal its controlling terminal (`TIOCSCTTY`) before `exec`. The agent
//! keeps the master side: what the command writes travels as `Stdout`; [`PtyEvent`]s from the
//! host are written to it (input), applied to it (`TIOCSWINSZ`), or turned into a signal for
//! the terminal's foreground process group (`TIOCGPGRP`), which is whom a real terminal's
//! Ctrl-C reaches. Reading the master fails with `EIO` once no process holds the terminal
//! any more: that is its end of file.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kiln_proto::{
    CHUNK_LEN, ExecCommand, ExecSpec, ExitStatus, Message, PtyEvent, RequestId, Signal, WindowSize,
};
use rustix::fs::{Mode, OFlags};
use rustix::process::{Pid, WaitStatus};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::channel::FdStream;
use crate::serve::Agent;

/// Between SIGTERM and SIGKILL when a timeout expires.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// After the leader exits, how long the pumps wait for more output before giving up.
const DRAIN_IDLE: Duration = Duration::from_millis(100);

/// After the leader exits, the longest the pumps keep forwarding output (a background process
/// that keeps writing must not hold the exec open).
const DRAIN_MAX: Duration = Duration::from_secs(1);

/// The base `PATH` of every exec.
pub const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static SCRIPT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Runs `spec` and reports `Started`, output, then `Exit` (or `Error`). `events` carries the
/// host's [`PtyEvent`]s for a terminal exec.
pub async fn run(
    agent: Arc<Agent>,
    spec: ExecSpec,
    events: Option<mpsc::UnboundedReceiver<PtyEvent>>,
) {
    let id = spec.id;
    let mut script = None;
    let result = run_inner(&agent, spec, events, &mut script).await;
    if let Some(path) = script {
        let _ = tokio::fs::remove_file(path).await;
    }
    match result {
        Ok(status) => agent.send(Message::Exit { id, status }).await,
        Err(message) => {
            agent
                .send(Message::Error {
                    id: Some(id),
                    message,
                })
                .await
        }
    }
    // Only now: a shutdown waits for this, and must find the exit already queued.
    agent.exec_finished(id);
}

async fn run_inner(
    agent: &Arc<Agent>,
    spec: ExecSpec,
    events: Option<mpsc::UnboundedReceiver<PtyEvent>>,
    script: &mut Option<PathBuf>,
) -> Result<ExitStatus, String> {
    let id = spec.id;
    let identity = agent.identities.for_user(spec.user)?;
    let argv = match spec.command {
        ExecCommand::Argv(argv) => argv,
        ExecCommand::Script {
            shell,
            script: text,
            extension,
        } => {
            let path = write_script(&text, &extension).await?;
            let path_str = path.to_string_lossy().into_owned();
            *script = Some(path);
            script_argv(&shell, &path_str)
        }
    };
    let Some((program, args)) = argv.split_first() else {
        return Err("Cannot run an empty command".to_owned());
    };

    let mut env: Vec<(String, String)> = vec![("PATH".to_owned(), BASE_PATH.to_owned())];
    env.extend(identity.base_env());
    for (key, value) in spec.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(format!("Invalid environment variable name {key:?}"));
        }
        env.retain(|(k, _)| *k != key);
        env.push((key, value));
    }
    let cwd = match spec.cwd {
        Some(cwd) => PathBuf::from(cwd),
        None => env
            .iter()
            .find(|(k, _)| k == "HOME")
            .map(|(_, home)| PathBuf::from(home))
            .filter(|home| home.is_dir())
            .unwrap_or_else(|| PathBuf::from("/")),
    };
    if !cwd.is_dir() {
        return Err(format!(
            "Cannot run `{program}`: the working directory {} does not exist",
            cwd.display()
        ));
    }

    let mut command = Command::new(program);
    command.args(args).env_clear().envs(env).current_dir(&cwd);
    let mut become_user = identity.pre_exec();
    let terminal = match spec.pty {
        None => {
            command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            let in_child = move || {
                default_signals();
                become_user()
            };
            // SAFETY: the closure only makes async-signal-safe system calls (see
            // `Identity::pre_exec` and `default_signals`).
            unsafe { command.pre_exec(in_child) };
            None
        }
        Some(size) => {
            let (master, slave) =
                open_pty(size).map_err(|e| format!("Cannot open a pseudo-terminal: {e}"))?;
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| format!("Cannot open a pseudo-terminal: {e}"))
            };
            command
                .stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            let in_child = move || {
                default_signals();
                rustix::process::setsid()?;
                // SAFETY: fd 0 is the terminal std has just installed; it stays open until
                // `exec`.
                let stdin = unsafe { std::os::fd::BorrowedFd::borrow_raw(0) };
                rustix::process::ioctl_tiocsctty(stdin)?;
                become_user()
            };
            // SAFETY: setsid, ioctl and the credential calls of `become_user` are
            // async-signal-safe system calls on values prepared before the fork.
            unsafe { command.pre_exec(in_child) };
            Some(master)
        }
    };
    let spawned = agent.reaper.spawn(&mut command);
    // The child has its copies of the terminal; ours must close, or the master never sees
    // the end of the session.
    drop(command);
    let (mut child, mut status_rx) = spawned.map_err(|e| format!("Cannot run `{program}`: {e}"))?;
    let pid = child.id();
    agent.exec_started(id, pid);
    agent.send(Message::Started { id, pid }).await;

    let (exited_tx, exited_rx) = watch::channel(false);
    let mut pumps = Vec::new();
    let mut input_task = None;
    match terminal {
        None => {
            for (pipe, stdout) in [
                child.stdout.take().map(|p| (OwnedFd::from(p), true)),
                child.stderr.take().map(|p| (OwnedFd::from(p), false)),
            ]
            .into_iter()
            .flatten()
            {
                match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
                    Ok(pipe) => pumps.push(tokio::spawn(pump(
                        pipe,
                        stdout,
                        id,
                        agent.clone(),
                        exited_rx.clone(),
                    ))),
                    Err(e) => crate::log!("cannot watch an output pipe: {e}"),
                }
            }
        }
        Some(master) => {
            let control = master
                .try_clone()
                .map_err(|e| format!("Cannot use the pseudo-terminal: {e}"))?;
            let stream = FdStream::new(master)
                .map_err(|e| format!("Cannot use the pseudo-terminal: {e}"))?;
            let (reader, writer) = tokio::io::split(stream);
            pumps.push(tokio::spawn(pump(
                reader,
                true,
                id,
                agent.clone(),
                exited_rx.clone(),
            )));
            if let Some(events) = events {
                input_task = Some(tokio::spawn(terminal_input(events, writer, control, pid)));
            }
        }
    }
    drop(child);

    let status = match spec.timeout_ms {
        None => wait_status(&mut status_rx).await,
        Some(ms) => {
            let limit = Duration::from_millis(ms);
            match tokio::time::timeout(limit, &mut status_rx).await {
                Ok(status) => status.map_err(|_| lost()).map(to_exit_status),
                Err(_) => {
                    kill_group(pid, Signal::Term);
                    let reaped = tokio::time::timeout(KILL_GRACE, &mut status_rx)
                        .await
                        .is_ok();
                    // Even when the leader is gone, the rest of its group may ignore SIGTERM.
                    kill_group(pid, Signal::Kill);
                    if !reaped {
                        // SIGKILL cannot be ignored: the leader is reaped very soon.
                        let _ = tokio::time::timeout(Duration::from_secs(5), &mut status_rx).await;
                    }
                    Ok(ExitStatus::TimedOut)
                }
            }
        }
    };
    let _ = exited_tx.send(true);
    for pump in pumps {
        let _ = pump.await;
    }
    if let Some(task) = input_task {
        task.abort();
    }
    status
}

/// Gives the signals a command may be stopped or interrupted by their default actions: an agent
/// started in the background (or under `nohup`) inherits them ignored, and its commands would
/// then be deaf to Ctrl-C and to kills by SIGINT/SIGTERM. Only `sigaction` calls:
/// async-signal-safe, for the child between `fork` and `exec`.
fn default_signals() {
    for signal in [
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGHUP,
        libc::SIGTERM,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
    ] {
        // SAFETY: setting a default disposition installs no handler and touches no memory.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
}

/// A new pseudo-terminal of `size`: the master (non-blocking, for the agent) and the slave
/// (for the child; opened without becoming the agent's controlling terminal).
fn open_pty(size: WindowSize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    set_window_size(&master, size)?;
    rustix::fs::fcntl_setfl(&master, OFlags::RDWR | OFlags::NONBLOCK)?;
    Ok((master, slave))
}

fn set_window_size(fd: impl std::os::fd::AsFd, size: WindowSize) -> std::io::Result<()> {
    let winsize = rustix::termios::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    Ok(rustix::termios::tcsetwinsize(fd, winsize)?)
}

/// Applies the host's terminal events to the master until the exec ends (the task is
/// aborted) or the host stops sending.
async fn terminal_input(
    mut events: mpsc::UnboundedReceiver<PtyEvent>,
    mut master: tokio::io::WriteHalf<FdStream>,
    control: OwnedFd,
    session: u32,
) {
    while let Some(event) = events.recv().await {
        match event {
            PtyEvent::Input(data) => {
                if let Err(e) = master.write_all(&data).await {
                    crate::log!("cannot write to a terminal: {e}");
                    return;
                }
            }
            PtyEvent::Resize(size) => {
                if let Err(e) = set_window_size(&control, size) {
                    crate::log!("cannot resize a terminal: {e}");
                }
            }
            PtyEvent::Signal(signal) => {
                // Whom the terminal would signal: its foreground job, else the session.
                match rustix::termios::tcgetpgrp(&control) {
                    Ok(group) => {
                        let _ = rustix::process::kill_process_group(group, to_rustix(signal));
                    }
                    Err(_) => kill_group(session, signal),
                }
            }
        }
    }
}

async fn wait_status(rx: &mut oneshot::Receiver<WaitStatus>) -> Result<ExitStatus, String> {
    rx.await.map(to_exit_status).map_err(|_| lost())
}

fn lost() -> String {
    "The agent lost track of the process".to_owned()
}

fn to_exit_status(status: WaitStatus) -> ExitStatus {
    match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => ExitStatus::Exited(code),
        (None, Some(signal)) => ExitStatus::Signaled(signal),
        // Stopped/continued are not reported by a plain wait; treat anything else as a failure.
        (None, None) => ExitStatus::Exited(-1),
    }
}

/// Forwards one pipe's (or a terminal's) bytes as `Stdout`/`Stderr` frames until EOF (or a
/// read error: `EIO` is a terminal's end), or until the leader has exited and nothing arrives
/// for [`DRAIN_IDLE`] (or [`DRAIN_MAX`] has passed).
async fn pump(
    mut pipe: impl AsyncRead + Unpin,
    stdout: bool,
    id: RequestId,
    agent: Arc<Agent>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; CHUNK_LEN];
    let mut leader_gone = false;
    let mut drain_deadline = None;
    loop {
        leader_gone = leader_gone || *exited.borrow();
        let read = if leader_gone {
            let deadline =
                *drain_deadline.get_or_insert_with(|| tokio::time::Instant::now() + DRAIN_MAX);
            let wait =
                DRAIN_IDLE.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            match tokio::time::timeout(wait, pipe.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                read = pipe.read(&mut buf) => read,
                changed = exited.changed() => {
                    // A dropped sender means the exec is over: drain as if the leader exited.
                    leader_gone = changed.is_err();
                    continue;
                }
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = Bytes::copy_from_slice(&buf[..n]);
        let message = if stdout {
            Message::Stdout { id, data }
        } else {
            Message::Stderr { id, data }
        };
        agent.send(message).await;
    }
}

/// Sends `signal` to process group `pgid`; a group that is already gone is not an error.
pub fn kill_group(pgid: u32, signal: Signal) {
    let Some(pid) = i32::try_from(pgid).ok().and_then(Pid::from_raw) else {
        return;
    };
    // A process group id of 1 would be the agent's own group under PID 1: never signal it.
    if pid.is_init() {
        return;
    }
    let _ = rustix::process::kill_process_group(pid, to_rustix(signal));
}

/// The rustix value of a protocol signal.
pub fn to_rustix(signal: Signal) -> rustix::process::Signal {
    use rustix::process::Signal as S;
    match signal {
        Signal::Term => S::TERM,
        Signal::Kill => S::KILL,
        Signal::Int => S::INT,
        Signal::Hup => S::HUP,
        Signal::Quit => S::QUIT,
        Signal::Usr1 => S::USR1,
        Signal::Usr2 => S::USR2,
    }
}

/// The argv for a script at `path`: every `{0}` in `shell` replaced, or the path appended.
fn script_argv(shell: &[String], path: &str) -> Vec<String> {
    if shell.iter().any(|a| a.contains("{0}")) {
        shell.iter().map(|a| a.replace("{0}", path)).collect()
    } else {
        let mut argv = shell.to_vec();
        argv.push(path.to_owned());
        argv
    }
}

/// Writes a script to a fresh, world-readable file (the shell may run as another user).
async fn write_script(text: &str, extension: &str) -> Result<PathBuf, String> {
    if extension.contains('/') || extension.contains('\0') {
        return Err(format!("Invalid script extension {extension:?}"));
    }
    let dir = std::env::temp_dir().join("kiln-agent");
    let n = SCRIPT_COUNTER.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("script-{}-{n}{extension}", std::process::id()));
    write_new_file(&dir, &path, text.as_bytes())
        .await
        .map_err(|e| format!("Cannot write the script file {}: {e}", path.display()))?;
    Ok(path)
}

async fn write_new_file(dir: &Path, path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let (dir, path, contents) = (dir.to_owned(), path.to_owned(), contents.to_owned());
    tokio::task::spawn_blocking(move || {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&path)?;
        std::io::Write::write_all(&mut file, &contents)
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_argv_replaces_or_appends() {
        let replaced = script_argv(&["bash".into(), "-e".into(), "{0}".into()], "/t/s.sh");
        assert_eq!(replaced, vec!["bash", "-e", "/t/s.sh"]);
        let appended = script_argv(&["python3".into()], "/t/s.py");
        assert_eq!(appended, vec!["python3", "/t/s.py"]);
    }
}
