//! Host-side plumbing of Firecracker VMs: the process and its reaper, the per-VM directory,
//! the sweep of VMs a crashed kiln left behind, and sparse file copies.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::watch;

use super::jailer;
use crate::VmError;

/// Files of a per-VM directory.
pub(super) const OWNER_FILE: &str = "owner";
pub(super) const PID_FILE: &str = "pid";
pub(super) const CONSOLE_LOG: &str = "console.log";
pub(super) const STDERR_LOG: &str = "firecracker.stderr";
/// Names the jail (chroot dir and cgroup) of a jailed VM, for release and for the sweep.
pub(super) const JAIL_FILE: &str = "jail";

/// The prefix of per-VM directory names (and VM ids).
pub(super) const ID_PREFIX: &str = "fc-";

/// The Firecracker process: its pid and a task that reaps it and publishes how it ended.
pub(super) struct Process {
    pid: Option<rustix::process::Pid>,
    exit: watch::Receiver<Option<String>>,
}

impl Process {
    /// Starts `program args` in `cwd` with stdout (the guest's serial console) in
    /// `dir/console.log` and stderr in `dir/firecracker.stderr`, dying with the thread that
    /// started it where the kernel keeps that promise (not across the jailer's change of user).
    /// `root` is where Firecracker writes its log (the VM's root).
    pub(super) fn spawn(
        program: &Path,
        args: &[String],
        cwd: &Path,
        (dir, root): (&Path, &Path),
        id: &str,
    ) -> Result<Process, VmError> {
        let io = |op: String, source| VmError::Io {
            vm: id.to_owned(),
            op,
            source,
        };
        let console = File::create(dir.join(CONSOLE_LOG))
            .map_err(|e| io(format!("creating {CONSOLE_LOG}"), e))?;
        let stderr = File::create(dir.join(STDERR_LOG))
            .map_err(|e| io(format!("creating {STDERR_LOG}"), e))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(stderr)
            .kill_on_drop(true);
        // SAFETY: prctl and setrlimit are async-signal-safe and touch no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(io::Error::last_os_error());
                }
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| io(format!("starting {}", program.display()), e))?;
        let pid = child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32));
        if let Some(pid) = pid {
            std::fs::write(dir.join(PID_FILE), pid.as_raw_nonzero().to_string())
                .map_err(|e| io(format!("writing {PID_FILE}"), e))?;
        }
        let (tx, rx) = watch::channel(None);
        let stderr_path = dir.join(STDERR_LOG);
        let log_path = root.join(super::LOG_FILE);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            let said = last_errors(&stderr_path, &log_path);
            let status = if said.is_empty() {
                status
            } else {
                format!("{status}; Firecracker said: {said}")
            };
            let _ = tx.send(Some(status));
        });
        Ok(Process { pid, exit: rx })
    }

    /// The pid while the process runs.
    pub(super) fn pid(&self) -> Option<i32> {
        self.exit_status()
            .is_none()
            .then(|| self.pid.map(|p| p.as_raw_nonzero().get()))?
    }

    /// Resolves when the process has exited, with its status.
    pub(super) async fn exited(&self) -> String {
        let mut rx = self.exit.clone();
        loop {
            if let Some(status) = rx.borrow_and_update().clone() {
                return status;
            }
            if rx.changed().await.is_err() {
                return "unknown status".to_owned();
            }
        }
    }

    /// How it ended, once it has.
    pub(super) fn exit_status(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    /// SIGKILL, if it still runs.
    pub(super) fn kill(&self) {
        if self.exit_status().is_none()
            && let Some(pid) = self.pid
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }

    /// Whether it exits within `limit`.
    pub(super) async fn wait_for(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.exited()).await.is_ok()
    }

    /// SIGKILL and wait (bounded) for the reaper.
    pub(super) async fn kill_and_wait(&self) -> bool {
        self.kill();
        self.wait_for(Duration::from_secs(10)).await
    }
}

/// The error lines Firecracker wrote (stderr, then its log), joined, for exit messages.
fn last_errors(stderr: &Path, log: &Path) -> String {
    let mut lines: Vec<String> = Vec::new();
    for path in [stderr, log] {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        lines.extend(
            text.lines()
                .filter(|l| {
                    let l = l.to_ascii_lowercase();
                    l.contains("error") || l.contains("panic") || l.contains("exit")
                })
                // `2026-01-01T00:00:00.000 [id:thread] message`: keep the message.
                .map(|l| match l.split_once("] ") {
                    Some((head, message)) if head.starts_with(|c: char| c.is_ascii_digit()) => {
                        message.trim().to_owned()
                    }
                    _ => l.trim().to_owned(),
                }),
        );
    }
    let start = lines.len().saturating_sub(3);
    lines[start..].join(" | ")
}

/// A per-VM directory (and, for a jailed VM, its chroot and cgroup), removed on drop unless
/// kept.
pub(super) struct VmDir {
    dir: Option<PathBuf>,
}

impl VmDir {
    /// Creates `dir` (mode 0700) with the owner file naming this kiln process.
    pub(super) fn create(id: &str, dir: &Path) -> Result<VmDir, VmError> {
        let io = |op: &str, source| VmError::Io {
            vm: id.to_owned(),
            op: format!("{op} {}", dir.display()),
            source,
        };
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("creating the parent of", e))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("creating", e))?;
        let guard = VmDir {
            dir: Some(dir.to_owned()),
        };
        std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string())
            .map_err(|e| io("writing the owner file in", e))?;
        Ok(guard)
    }

    /// The directory.
    pub(super) fn path(&self) -> &Path {
        self.dir.as_deref().unwrap_or(Path::new(""))
    }

    /// Keeps the directory: its VM owns it now.
    pub(super) fn keep(mut self) -> PathBuf {
        self.dir.take().unwrap_or_default()
    }
}

impl Drop for VmDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = remove_vm_dir(&dir);
        }
    }
}

/// Removes a per-VM directory and the jail it names. Missing pieces are not errors.
pub(super) fn remove_vm_dir(dir: &Path) -> io::Result<()> {
    if let Ok(text) = std::fs::read_to_string(dir.join(JAIL_FILE)) {
        jailer::remove_jail(&text);
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: rustix::process::Pid) -> bool {
    rustix::process::test_kill_process(pid).is_ok()
        && std::fs::read_to_string(format!("/proc/{}/status", pid.as_raw_nonzero())).is_ok_and(
            |s| {
                !s.lines()
                    .any(|l| l.starts_with("State:") && l.contains('Z'))
            },
        )
}

fn read_pid(path: &Path) -> Option<rustix::process::Pid> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw)
}

/// Reaps VMs whose kiln process is gone: kills their Firecracker (when the pid file names a
/// process whose command line still carries the VM's id, so a recycled pid is never hit),
/// removes their jail (chroot and cgroup) and their directory. Returns the ids reaped.
pub(super) fn reap_orphans(runtime_dir: &Path) -> Vec<String> {
    let mut reaped = Vec::new();
    let Ok(entries) = std::fs::read_dir(runtime_dir) else {
        return reaped;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(id) = entry
            .file_name()
            .to_str()
            .filter(|n| n.starts_with(ID_PREFIX))
            .map(str::to_owned)
        else {
            continue;
        };
        // A directory without a readable owner is one being created right now, or not ours.
        let Some(owner) = read_pid(&path.join(OWNER_FILE)) else {
            continue;
        };
        if alive(owner) {
            continue;
        }
        if let Some(pid) = read_pid(&path.join(PID_FILE))
            && alive(pid)
            && std::fs::read(format!("/proc/{}/cmdline", pid.as_raw_nonzero()))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == id.as_bytes()))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            // It is not our child: wait for it to disappear so its jail can be removed.
            for _ in 0..200 {
                if !alive(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        tracing::info!(
            "reaping Firecracker VM {id} left behind by a kiln process that is gone ({})",
            path.display()
        );
        let _ = remove_vm_dir(&path);
        reaped.push(id);
    }
    reaped
}

/// Copies `src` to a new file `dst` of the same length, writing only `src`'s data regions, so
/// holes stay holes (a sparse scratch disk costs what it holds, not its size).
pub(super) fn copy_sparse(src: &Path, dst: &Path) -> io::Result<()> {
    let from = File::open(src)?;
    let to = File::options().write(true).create_new(true).open(dst)?;
    to.set_len(from.metadata()?.len())?;
    copy_data_ranges(&from, &to)
}

/// Writes every data region of `from` into `to` at the same offset (`SEEK_DATA`/`SEEK_HOLE`).
/// Applying a diff snapshot's sparse memory file onto a copy of its base is exactly this.
pub(super) fn copy_data_ranges(from: &File, to: &File) -> io::Result<()> {
    use std::io::Read;
    let len = from.metadata()?.len();
    let mut offset = 0u64;
    let mut reader = from;
    let mut writer = to;
    while offset < len {
        let start = match rustix::fs::seek(from, rustix::fs::SeekFrom::Data(offset)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(from, rustix::fs::SeekFrom::Hole(start))?;
        reader.seek(SeekFrom::Start(start))?;
        writer.seek(SeekFrom::Start(start))?;
        let copied = io::copy(&mut reader.take(end - start), &mut writer)?;
        if copied != end - start {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was copied",
            ));
        }
        offset = end;
    }
    Ok(())
}

/// Moves `src` to `dst`: a rename, or a sparse copy and delete across file systems.
pub(super) fn move_file(src: &Path, dst: &Path) -> io::Result<()> {
    match std::fs::rename(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_sparse(src, dst)?;
            std::fs::remove_file(src)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn allocated_bytes(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn sparse_copies_keep_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let file = File::create(&src).unwrap();
        file.set_len(64 << 20).unwrap();
        let mut w = &file;
        w.seek(SeekFrom::Start(10 << 20)).unwrap();
        w.write_all(&[7u8; 8192]).unwrap();
        w.seek(SeekFrom::Start(60 << 20)).unwrap();
        w.write_all(b"tail").unwrap();
        drop(file);
        let dst = dir.path().join("dst");
        copy_sparse(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(
            allocated_bytes(&dst) < 4 << 20,
            "{} bytes allocated for 8 KiB of data",
            allocated_bytes(&dst)
        );
        assert!(copy_sparse(&src, &dst).is_err(), "never overwrites");
    }

    #[test]
    fn data_ranges_apply_a_diff_onto_a_base() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::write(&base, vec![1u8; 3 * 4096]).unwrap();
        let diff = dir.path().join("diff");
        let file = File::create(&diff).unwrap();
        file.set_len(3 * 4096).unwrap();
        let mut w = &file;
        w.seek(SeekFrom::Start(4096)).unwrap();
        w.write_all(&[2u8; 4096]).unwrap();
        drop(file);
        let merged = dir.path().join("merged");
        copy_sparse(&base, &merged).unwrap();
        let to = File::options().write(true).open(&merged).unwrap();
        copy_data_ranges(&File::open(&diff).unwrap(), &to).unwrap();
        let data = std::fs::read(&merged).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 1));
        assert!(data[4096..8192].iter().all(|&b| b == 2));
        assert!(data[8192..].iter().all(|&b| b == 1));
    }

    #[test]
    fn orphans_of_dead_owners_are_reaped_with_their_process() {
        let runtime = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        // A stand-in for an orphaned Firecracker: a process whose argv carries the VM id
        // (a loop, so sh never execs into a command that would drop that argument).
        let mut orphan = std::process::Command::new("sh")
            .args(["-c", "while :; do sleep 1; done", "fc-orphan"])
            .spawn()
            .unwrap();
        let make = |name: &str, owner: Option<String>, pid: Option<u32>| {
            let dir = runtime.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(CONSOLE_LOG), "x").unwrap();
            if let Some(owner) = owner {
                std::fs::write(dir.join(OWNER_FILE), owner).unwrap();
            }
            if let Some(pid) = pid {
                std::fs::write(dir.join(PID_FILE), pid.to_string()).unwrap();
            }
        };
        make("fc-orphan", Some(dead.to_string()), Some(orphan.id()));
        make("fc-mine", Some(std::process::id().to_string()), None);
        make("fc-new", None, None);
        // A pid file naming a live process that is not this VM's is left alone.
        make(
            "fc-recycled",
            Some(dead.to_string()),
            Some(std::process::id()),
        );
        make("other", Some(dead.to_string()), None);
        let mut reaped = reap_orphans(runtime.path());
        reaped.sort();
        assert_eq!(reaped, ["fc-orphan", "fc-recycled"]);
        let status = orphan.wait().unwrap();
        assert!(!status.success(), "the orphan was killed: {status}");
        let mut left: Vec<String> = std::fs::read_dir(runtime.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["fc-mine", "fc-new", "other"]);
    }
}
