//! The local backend: no isolation at all.
//!
//! A "VM" here is a private directory under the runtime dir (mode 0700) plus the processes that
//! commands start on the host, each command in its own process group. It exists so that kiln can
//! be developed and tried without a hypervisor, and it is what `auto` falls back to when no VM
//! backend works. Steps run as the invoking user with full access to the host: whenever this
//! backend is chosen, kiln says so loudly.
//!
//! Cleanup guarantees:
//! - a timed-out command, or one whose `exec` future is dropped, has its process group killed;
//! - [`Vm::kill_all`] and release kill every process group the VM ever started (background
//!   processes left by a step included), then remove the directory;
//! - dropping a [`LocalVm`] that was never released does the same synchronously.
//!
//! Commands run as the invoking user whatever [`crate::ExecUser`] they ask for: there is no
//! other user to switch to here. [`Vm::exec_pty`] gives a command a host pseudo-terminal.
//!
//! Known limit: a process that leaves its process group (`setsid`, a daemon that double-forks
//! into a new session) escapes these kills. VM backends do not have this hole.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rustix::process::{Pid, Signal, kill_process_group};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

use crate::{
    Allocation, Command, ExecOutcome, ExecRequest, ExitStatus, Output, OutputSink, PtyDriver,
    PtyEvent, PtyRequest, PtySession, Stream, Vm, VmError, VmProvider, VmSpec, pty,
};

/// How long a timed-out command gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long output is still read after the command exited, for pipes a background process keeps
/// open. GitHub's runner likewise does not wait for background processes.
const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// The local (no isolation) backend.
#[derive(Debug)]
pub struct LocalProvider {
    runtime_dir: PathBuf,
}

impl LocalProvider {
    /// A provider whose VM directories live under `runtime_dir`.
    pub fn new(runtime_dir: PathBuf) -> LocalProvider {
        LocalProvider { runtime_dir }
    }
}

#[async_trait]
impl VmProvider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    fn isolates(&self) -> bool {
        false
    }

    async fn allocate(&self, _spec: &VmSpec) -> Result<Allocation, VmError> {
        let started = Instant::now();
        let id = format!("local-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = self.runtime_dir.join(&id);
        let io_err = |op: &str, source| VmError::Io {
            vm: id.clone(),
            op: format!("{op} {}", dir.display()),
            source,
        };
        tokio::fs::create_dir_all(&self.runtime_dir)
            .await
            .map_err(|e| io_err("creating the runtime dir for", e))?;
        tokio::fs::create_dir(&dir)
            .await
            .map_err(|e| io_err("creating", e))?;
        tokio::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .await
            .map_err(|e| io_err("restricting", e))?;
        let dir_str = dir
            .to_str()
            .ok_or_else(|| VmError::Unavailable {
                backend: "local",
                reason: format!("the runtime dir {} is not valid UTF-8", dir.display()),
            })?
            .to_owned();
        let vm = LocalVm {
            id,
            dir,
            dir_str,
            groups: Arc::new(Mutex::new(HashSet::new())),
            released: AtomicBool::new(false),
        };
        Ok(Allocation {
            vm: Arc::new(vm),
            elapsed: started.elapsed(),
        })
    }
}

/// A local "VM": a directory and the process groups started in it.
#[derive(Debug)]
pub struct LocalVm {
    id: String,
    dir: PathBuf,
    dir_str: String,
    /// Every process group a command of this VM started. Groups stay here after their leader
    /// exits, since background processes may still live in them.
    groups: Arc<Mutex<HashSet<i32>>>,
    released: AtomicBool,
}

impl LocalVm {
    /// The host directory that backs this VM.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_live(&self) -> Result<(), VmError> {
        if self.released.load(Ordering::Acquire) {
            return Err(VmError::Released {
                vm: self.id.clone(),
            });
        }
        Ok(())
    }

    fn io_err(&self, op: String, source: io::Error) -> VmError {
        VmError::Io {
            vm: self.id.clone(),
            op,
            source,
        }
    }

    fn kill_groups(&self) {
        let groups: Vec<i32> = lock(&self.groups).drain().collect();
        for pgid in groups {
            signal_group(pgid, Signal::KILL);
        }
    }

    async fn argv_for(&self, command: &Command) -> Result<Vec<String>, VmError> {
        match command {
            Command::Argv(argv) => Ok(argv.clone()),
            Command::Script {
                shell,
                script,
                extension,
            } => {
                let name = format!("{}{}", uuid::Uuid::new_v4().simple(), extension);
                let path = format!("{}/.kiln/scripts/{name}", self.dir_str);
                self.write_file(&path, script.as_bytes()).await?;
                Ok(Command::script_argv(shell, &path))
            }
        }
    }
}

#[async_trait]
impl Vm for LocalVm {
    fn id(&self) -> &str {
        &self.id
    }

    fn backend(&self) -> &'static str {
        "local"
    }

    fn work_root(&self) -> &str {
        &self.dir_str
    }

    async fn exec(&self, request: ExecRequest, output: OutputSink) -> Result<ExecOutcome, VmError> {
        self.check_live()?;
        let argv = self.argv_for(&request.command).await?;
        let Some((program, args)) = argv.split_first() else {
            return Err(VmError::Guest {
                vm: self.id.clone(),
                message: "empty command".to_owned(),
            });
        };
        let cwd = request.cwd.as_deref().unwrap_or(&self.dir_str);
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .envs(request.env.iter().map(|(k, v)| (k, v)))
            .current_dir(cwd)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| self.io_err(format!("starting `{program}` in {cwd}"), e))?;
        let pgid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .ok_or_else(|| VmError::Guest {
                vm: self.id.clone(),
                message: format!("`{program}` exited before its process group was known"),
            })?;
        lock(&self.groups).insert(pgid);
        // Killed on drop unless the command finished: covers cancellation and panics.
        let mut guard = GroupKillGuard { pgid, armed: true };
        let readers = ReaderTasks(vec![
            child
                .stdout
                .take()
                .map(|s| spawn_reader(s, Stream::Stdout, output.clone())),
            child
                .stderr
                .take()
                .map(|s| spawn_reader(s, Stream::Stderr, output.clone())),
        ]);

        let waited = match request.timeout {
            Some(limit) => tokio::time::timeout(limit, child.wait()).await.ok(),
            None => Some(child.wait().await),
        };
        let status = match waited {
            Some(result) => {
                let status =
                    result.map_err(|e| self.io_err(format!("waiting for `{program}`"), e))?;
                exit_status(status)
            }
            None => {
                signal_group(pgid, Signal::TERM);
                if tokio::time::timeout(KILL_GRACE, child.wait())
                    .await
                    .is_err()
                {
                    signal_group(pgid, Signal::KILL);
                }
                // Reap; the group is dead or dying.
                let _ = child.wait().await;
                signal_group(pgid, Signal::KILL);
                ExitStatus::TimedOut
            }
        };
        guard.armed = false;
        readers.drain(DRAIN_GRACE).await;
        Ok(ExecOutcome {
            status,
            duration: started.elapsed(),
        })
    }

    async fn exec_pty(&self, request: PtyRequest) -> Result<PtySession, VmError> {
        self.check_live()?;
        let argv = self.argv_for(&request.command).await?;
        let Some((program, args)) = argv.split_first() else {
            return Err(VmError::Guest {
                vm: self.id.clone(),
                message: "empty command".to_owned(),
            });
        };
        let cwd = request.cwd.as_deref().unwrap_or(&self.dir_str);
        let terminal_err = |e| self.io_err("opening a pseudo-terminal".to_owned(), e);
        let (master, slave) = pty::open(request.size).map_err(terminal_err)?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .envs(request.env.iter().map(|(k, v)| (k, v)))
            .current_dir(cwd)
            .stdin(Stdio::from(slave.try_clone().map_err(terminal_err)?))
            .stdout(Stdio::from(slave.try_clone().map_err(terminal_err)?))
            .stderr(Stdio::from(slave));
        // SAFETY: `become_session_leader` only makes async-signal-safe system calls.
        unsafe { cmd.pre_exec(pty::become_session_leader) };
        let spawned = cmd.spawn();
        // Our copies of the terminal must close, or the master never sees its end.
        drop(cmd);
        let child =
            spawned.map_err(|e| self.io_err(format!("starting `{program}` in {cwd}"), e))?;
        // setsid made the child a process group leader: its pid is the group.
        let pgid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .ok_or_else(|| VmError::Guest {
                vm: self.id.clone(),
                message: format!("`{program}` exited before its process group was known"),
            })?;
        lock(&self.groups).insert(pgid);
        let guard = GroupKillGuard { pgid, armed: true };
        let master = pty::Master::new(master).map_err(terminal_err)?;
        let (session, driver) = PtySession::channel(&self.id);
        tokio::spawn(drive_pty(self.id.clone(), child, guard, master, driver));
        Ok(session)
    }

    async fn kill_all(&self) -> Result<(), VmError> {
        self.kill_groups();
        Ok(())
    }

    async fn copy_in(&self, host: &Path, guest: &str) -> Result<(), VmError> {
        self.check_live()?;
        let (from, to) = (host.to_path_buf(), PathBuf::from(guest));
        run_blocking(move || copy_tree(&from, &to))
            .await
            .map_err(|e| self.io_err(format!("copying {} to {guest}", host.display()), e))
    }

    async fn copy_out(&self, guest: &str, host: &Path) -> Result<(), VmError> {
        self.check_live()?;
        let (from, to) = (PathBuf::from(guest), host.to_path_buf());
        run_blocking(move || copy_tree(&from, &to))
            .await
            .map_err(|e| self.io_err(format!("copying {guest} to {}", host.display()), e))
    }

    async fn write_file(&self, guest: &str, contents: &[u8]) -> Result<(), VmError> {
        self.check_live()?;
        let path = Path::new(guest);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| self.io_err(format!("creating {}", parent.display()), e))?;
        }
        tokio::fs::write(path, contents)
            .await
            .map_err(|e| self.io_err(format!("writing {guest}"), e))
    }

    async fn read_file(&self, guest: &str) -> Result<Vec<u8>, VmError> {
        self.check_live()?;
        tokio::fs::read(guest)
            .await
            .map_err(|e| self.io_err(format!("reading {guest}"), e))
    }

    async fn release(&self) -> Result<(), VmError> {
        if self.released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.kill_groups();
        let dir = self.dir.clone();
        run_blocking(move || remove_tree(&dir))
            .await
            .map_err(|e| self.io_err(format!("removing {}", self.dir.display()), e))
    }
}

impl Drop for LocalVm {
    fn drop(&mut self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            tracing::debug!(vm = %self.id, "local VM dropped without release; cleaning up");
            self.kill_groups();
            if let Err(e) = remove_tree(&self.dir) {
                tracing::warn!(vm = %self.id, "failed to remove {}: {e}", self.dir.display());
            }
        }
    }
}

fn exit_status(status: std::process::ExitStatus) -> ExitStatus {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitStatus::Exited(code),
        (None, Some(signal)) => ExitStatus::Signaled(signal),
        (None, None) => ExitStatus::Signaled(0),
    }
}

/// Runs one terminal session: output to the session, its events to the terminal, and the exit.
/// A dropped session (`cancelled`) kills the process group through `guard`.
async fn drive_pty(
    vm: String,
    mut child: tokio::process::Child,
    mut guard: GroupKillGuard,
    master: pty::Master,
    driver: PtyDriver,
) {
    let PtyDriver {
        mut events,
        output,
        exit,
        mut cancelled,
    } = driver;
    let mut buf = vec![0u8; 16 * 1024];
    let mut open = true;
    let waited = loop {
        tokio::select! {
            read = master.read(&mut buf), if open => match read {
                Ok(n) if n > 0 => {
                    let _ = output.send(Bytes::copy_from_slice(&buf[..n]));
                }
                // EIO: nobody holds the terminal any more.
                _ => open = false,
            },
            Some(event) = events.recv() => match event {
                PtyEvent::Input(data) => {
                    if let Err(e) = master.write_all(&data).await {
                        tracing::debug!(%vm, "writing to a terminal failed: {e}");
                    }
                }
                PtyEvent::Resize(size) => {
                    if let Err(e) = master.resize(size) {
                        tracing::debug!(%vm, "resizing a terminal failed: {e}");
                    }
                }
                PtyEvent::Signal(signal) => {
                    let group = master
                        .foreground_group()
                        .map(|g| g.as_raw_nonzero().get())
                        .unwrap_or(guard.pgid);
                    signal_group(group, to_rustix(signal));
                }
            },
            waited = child.wait() => break waited,
            _ = &mut cancelled => return,
        }
    };
    guard.armed = false;
    // What the command wrote just before exiting; background processes holding the terminal
    // get DRAIN_GRACE, as with pipes.
    while open {
        match tokio::time::timeout(DRAIN_GRACE, master.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                let _ = output.send(Bytes::copy_from_slice(&buf[..n]));
            }
            _ => open = false,
        }
    }
    drop(output);
    // Writers fail from now on, before anyone can see the exit.
    drop(events);
    let status = waited.map(exit_status).map_err(|source| VmError::Io {
        vm,
        op: "waiting for a terminal command".to_owned(),
        source,
    });
    let _ = exit.send(status);
}

fn to_rustix(signal: crate::Signal) -> Signal {
    match signal {
        crate::Signal::Term => Signal::TERM,
        crate::Signal::Kill => Signal::KILL,
        crate::Signal::Int => Signal::INT,
        crate::Signal::Hup => Signal::HUP,
        crate::Signal::Quit => Signal::QUIT,
        crate::Signal::Usr1 => Signal::USR1,
        crate::Signal::Usr2 => Signal::USR2,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock leaves a plain set behind; it is still consistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn signal_group(pgid: i32, signal: Signal) {
    if let Some(pid) = Pid::from_raw(pgid) {
        // ESRCH (the group is gone) is the common, harmless case.
        let _ = kill_process_group(pid, signal);
    }
}

/// Kills a process group when dropped while armed.
struct GroupKillGuard {
    pgid: i32,
    armed: bool,
}

impl Drop for GroupKillGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, Signal::KILL);
        }
    }
}

/// Output reader tasks, aborted when dropped.
struct ReaderTasks(Vec<Option<JoinHandle<()>>>);

impl ReaderTasks {
    /// Waits up to `grace` for the readers to reach end of file, then stops them.
    async fn drain(mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        for task in self.0.iter_mut().flatten() {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
    }
}

impl Drop for ReaderTasks {
    fn drop(&mut self) {
        for task in self.0.iter().flatten() {
            task.abort();
        }
    }
}

fn spawn_reader(
    mut pipe: impl AsyncRead + Unpin + Send + 'static,
    stream: Stream,
    sink: OutputSink,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = Output {
                        stream,
                        data: Bytes::copy_from_slice(&buf[..n]),
                    };
                    // A closed receiver means nobody wants the output; keep draining the pipe
                    // so the command does not block on a full pipe.
                    let _ = sink.send(chunk);
                }
            }
        }
    })
}

async fn run_blocking<F>(f: F) -> io::Result<()>
where
    F: FnOnce() -> io::Result<()> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|join| Err(io::Error::other(join)))
}

/// Copies a file, symlink or directory tree from `from` to `to`, keeping modes and symlinks.
/// Sockets, FIFOs and devices are skipped.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = std::fs::read_link(from)?;
        if std::fs::symlink_metadata(to).is_ok() {
            std::fs::remove_file(to)?;
        }
        std::os::unix::fs::symlink(target, to)
    } else if kind.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        std::fs::set_permissions(to, meta.permissions())
    } else if kind.is_file() {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from, to).map(drop)
    } else {
        Ok(())
    }
}

/// Removes a tree, first making read-only directories writable (Go's module cache and similar
/// tools leave those behind).
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_writable(path);
            match std::fs::remove_dir_all(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        }
    }
}

fn make_writable(path: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_dir() {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                make_writable(&entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn sh(script: &str) -> ExecRequest {
        ExecRequest {
            command: Command::Argv(vec!["sh".into(), "-c".into(), script.into()]),
            env: vec![("KILN_TEST".into(), "yes".into())],
            cwd: None,
            timeout: None,
            user: crate::ExecUser::Runner,
        }
    }

    async fn collect(mut rx: mpsc::UnboundedReceiver<Output>) -> (String, String) {
        let (mut out, mut err) = (String::new(), String::new());
        while let Some(chunk) = rx.recv().await {
            let text = String::from_utf8_lossy(&chunk.data);
            match chunk.stream {
                Stream::Stdout => out.push_str(&text),
                Stream::Stderr => err.push_str(&text),
            }
        }
        (out, err)
    }

    async fn vm(root: &Path) -> Arc<dyn Vm> {
        LocalProvider::new(root.to_path_buf())
            .allocate(&VmSpec::default())
            .await
            .expect("allocate")
            .vm
    }

    fn pid_alive(pid: i32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    }

    #[tokio::test]
    async fn exec_streams_output_env_and_exit_code() {
        let root = tempfile::tempdir().expect("tempdir");
        let vm = vm(root.path()).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let outcome = vm
            .exec(sh("echo out $KILN_TEST; echo err >&2; pwd; exit 3"), tx)
            .await
            .expect("exec");
        assert_eq!(outcome.status, ExitStatus::Exited(3));
        let (out, err) = collect(rx).await;
        assert_eq!(out, format!("out yes\n{}\n", vm.work_root()));
        assert_eq!(err, "err\n");
        vm.release().await.expect("release");
    }

    #[tokio::test]
    async fn script_command_runs_with_shell_template() {
        let root = tempfile::tempdir().expect("tempdir");
        let vm = vm(root.path()).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let request = ExecRequest {
            command: Command::Script {
                shell: vec!["bash".into(), "-e".into(), "{0}".into()],
                script: "echo \"$0\" | grep -q '\\.sh$' && echo ok".into(),
                extension: ".sh".into(),
            },
            env: vec![],
            cwd: None,
            timeout: None,
            user: crate::ExecUser::Runner,
        };
        let outcome = vm.exec(request, tx).await.expect("exec");
        assert!(outcome.status.success());
        assert_eq!(collect(rx).await.0, "ok\n");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let root = tempfile::tempdir().expect("tempdir");
        let vm = vm(root.path()).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut request = sh("sleep 60 & echo $!; wait");
        request.timeout = Some(Duration::from_millis(300));
        let outcome = vm.exec(request, tx).await.expect("exec");
        assert_eq!(outcome.status, ExitStatus::TimedOut);
        let grandchild: i32 = collect(rx).await.0.trim().parse().expect("pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(grandchild) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!pid_alive(grandchild), "grandchild {grandchild} survived");
    }

    #[tokio::test]
    async fn release_kills_background_processes_and_removes_the_dir() {
        let root = tempfile::tempdir().expect("tempdir");
        let vm = vm(root.path()).await;
        let dir = PathBuf::from(vm.work_root());
        let (tx, rx) = mpsc::unbounded_channel();
        let outcome = vm
            .exec(
                sh("sleep 60 >/dev/null 2>&1 & echo $!; mkdir -p ro/x; chmod 555 ro"),
                tx,
            )
            .await
            .expect("exec");
        assert!(outcome.status.success());
        let background: i32 = collect(rx).await.0.trim().parse().expect("pid");
        assert!(pid_alive(background));
        vm.release().await.expect("release");
        vm.release().await.expect("second release is a no-op");
        assert!(!dir.exists());
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(background) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!pid_alive(background));
        assert!(matches!(
            vm.exec(sh("true"), mpsc::unbounded_channel().0).await,
            Err(VmError::Released { .. })
        ));
    }

    #[tokio::test]
    async fn dropping_exec_future_kills_the_command() {
        let root = tempfile::tempdir().expect("tempdir");
        let vm = vm(root.path()).await;
        let marker = format!("{}/pid", vm.work_root());
        let (tx, _rx) = mpsc::unbounded_channel();
        let fut = vm.exec(sh(&format!("echo $$ > {marker}; sleep 60")), tx);
        let _ = tokio::time::timeout(Duration::from_millis(500), fut).await;
        let pid: i32 = std::fs::read_to_string(&marker)
            .expect("marker")
            .trim()
            .parse()
            .expect("pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!pid_alive(pid));
    }

    #[tokio::test]
    async fn copy_in_and_out_round_trips_a_tree() {
        let root = tempfile::tempdir().expect("tempdir");
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("a/b")).expect("mkdir");
        std::fs::write(src.path().join("a/b/f.sh"), "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(
            src.path().join("a/b/f.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("b/f.sh", src.path().join("a/link")).expect("symlink");
        let vm = vm(root.path()).await;
        let guest = format!("{}/ws", vm.work_root());
        vm.copy_in(src.path(), &guest).await.expect("copy in");
        let back = tempfile::tempdir().expect("tempdir");
        vm.copy_out(&guest, &back.path().join("out"))
            .await
            .expect("copy out");
        let copied = back.path().join("out/a/b/f.sh");
        assert_eq!(
            std::fs::read_to_string(&copied).expect("read"),
            "#!/bin/sh\n"
        );
        assert_eq!(
            std::fs::metadata(&copied)
                .expect("meta")
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert_eq!(
            std::fs::read_link(back.path().join("out/a/link")).expect("link"),
            PathBuf::from("b/f.sh")
        );
    }
}
