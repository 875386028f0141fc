//! Running one command.
//!
//! Each exec is a new process group (`setpgid(0, 0)` in the child), so signals reach its whole
//! tree: a timeout sends SIGTERM to the group, waits [`KILL_GRACE`] for the leader, then sends
//! SIGKILL to the group regardless, which also kills grandchildren that ignored SIGTERM.
//! stdout and stderr are pipes read by two tasks that forward each read as it arrives; the exit
//! is reported after both pipes are drained. A pipe stays open while any process of the tree
//! holds it, so once the leader has exited the pumps only wait [`DRAIN_IDLE`] for more bytes,
//! and [`DRAIN_MAX`] in all: a background daemon cannot hold the exec open forever.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kiln_proto::{CHUNK_LEN, ExecCommand, ExecSpec, ExitStatus, Message, RequestId, Signal};
use rustix::process::{Pid, WaitStatus};
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch};

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

/// Runs `spec` and reports `Started`, output, then `Exit` (or `Error`).
pub async fn run(agent: Arc<Agent>, spec: ExecSpec) {
    let id = spec.id;
    let mut script = None;
    let result = run_inner(&agent, spec, &mut script).await;
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
    script: &mut Option<PathBuf>,
) -> Result<ExitStatus, String> {
    let id = spec.id;
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

    let mut env: Vec<(String, String)> = vec![
        ("PATH".to_owned(), BASE_PATH.to_owned()),
        ("HOME".to_owned(), "/root".to_owned()),
    ];
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
    command
        .args(args)
        .env_clear()
        .envs(env)
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let (mut child, mut status_rx) = agent
        .reaper
        .spawn(&mut command)
        .map_err(|e| format!("Cannot run `{program}`: {e}"))?;
    let pid = child.id();
    agent.exec_started(id, pid);
    agent.send(Message::Started { id, pid }).await;

    let (exited_tx, exited_rx) = watch::channel(false);
    let pumps: Vec<_> = [
        child.stdout.take().map(|p| (OwnedFd::from(p), true)),
        child.stderr.take().map(|p| (OwnedFd::from(p), false)),
    ]
    .into_iter()
    .flatten()
    .map(|(fd, stdout)| tokio::spawn(pump(fd, stdout, id, agent.clone(), exited_rx.clone())))
    .collect();
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
    status
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

/// Forwards one pipe's bytes as `Stdout`/`Stderr` frames until EOF, or until the leader has
/// exited and nothing arrives for [`DRAIN_IDLE`] (or [`DRAIN_MAX`] has passed).
async fn pump(
    fd: OwnedFd,
    stdout: bool,
    id: RequestId,
    agent: Arc<Agent>,
    mut exited: watch::Receiver<bool>,
) {
    let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(pipe) => pipe,
        Err(e) => {
            crate::log!("cannot watch an output pipe: {e}");
            return;
        }
    };
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
