//! Booting the guest when the agent is PID 1.
//!
//! 1. Mount `/proc`, `/sys`, `/dev` (devtmpfs) and `/run`, and point stdio at `/dev/console`.
//! 2. **Initramfs stage**, when `/kiln/modules.order` exists (written by the image builder): load
//!    each listed `.ko` with `finit_module`, in order, repeating the failed ones while any pass
//!    makes progress (the order of a kernel's module dependencies changes between releases, so
//!    it is never hard-coded); a module already loaded (`EEXIST`) counts as loaded.
//! 3. When the kernel command line has `kiln.root=DEV`, wait for `DEV`, mount it (ext4) at
//!    `/newroot` (with `kiln.overlay=SCRATCH`: mount `DEV` read-only and an overlayfs at
//!    `/newroot` whose upper layer is on the ext4 disk `SCRATCH`, Firecracker's writable root),
//!    move `/dev`, `/proc`, `/sys` and `/run` onto it and switch to it the way
//!    `switch_root` does: `chdir`, `mount --move . /`, `chroot .`. The initramfs stays in memory
//!    (it holds only the agent and a few modules).
//! 4. In the final root: `/dev/pts`, `/dev/shm`, `/tmp`, the `/dev/fd` links, loopback up, and
//!    the network from `kiln.net=` (see [`crate::net`]).
//!
//! A failure to mount the root is fatal: the agent logs it to the console and powers off, so the
//! host sees a dead guest with the reason in its console log instead of a hung boot.

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::MountFlags;

use crate::log;

/// The module list the image builder writes into the initramfs.
pub const MODULES_ORDER: &str = "/kiln/modules.order";

/// How long to wait for the root disk to appear.
const ROOT_WAIT: Duration = Duration::from_secs(30);

/// Errors of booting.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount failed.
    #[error("Cannot mount {what} on {target}")]
    Mount {
        /// Source or filesystem.
        what: String,
        /// Mount point.
        target: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The root device never appeared.
    #[error("The root device {0} did not appear within {ROOT_WAIT:?}")]
    NoRootDevice(String),
    /// Switching to the new root failed.
    #[error("Cannot switch to the new root ({step})")]
    SwitchRoot {
        /// Which step.
        step: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The kernel command line.
pub fn cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

/// The value of `key=value` on a kernel command line.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .filter_map(|arg| arg.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

/// Runs the boot steps above.
pub fn boot() -> Result<(), InitError> {
    let nosuid_nodev = MountFlags::NOSUID | MountFlags::NODEV;
    mount_fs(
        "proc",
        "/proc",
        "proc",
        nosuid_nodev | MountFlags::NOEXEC,
        None,
    )?;
    mount_fs(
        "sysfs",
        "/sys",
        "sysfs",
        nosuid_nodev | MountFlags::NOEXEC,
        None,
    )?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MountFlags::NOSUID,
        Some(c"mode=0755"),
    )?;
    mount_fs("tmpfs", "/run", "tmpfs", nosuid_nodev, Some(c"mode=0755"))?;
    console_stdio();

    if Path::new(MODULES_ORDER).exists() {
        load_modules(Path::new(MODULES_ORDER));
    }
    let cmdline = cmdline();
    if let Some(root) = cmdline_value(&cmdline, "kiln.root") {
        switch_root(root)?;
    }

    let _ = std::fs::create_dir_all("/dev/pts");
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        Some(c"mode=0620,ptmxmode=0666,gid=5"),
    )?;
    mount_fs(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        nosuid_nodev,
        Some(c"mode=1777"),
    )?;
    mount_fs("tmpfs", "/tmp", "tmpfs", nosuid_nodev, Some(c"mode=1777"))?;
    if let Err(e) = mount_fs(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid_nodev | MountFlags::NOEXEC,
        None,
    ) {
        log!("{e} (continuing without cgroups)");
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    if let Err(e) = crate::net::link_up("lo") {
        log!("cannot bring up loopback: {e}");
    }
    if let Some(value) = cmdline_value(&cmdline, "kiln.net") {
        match crate::net::NetConfig::parse(value) {
            Some(config) => match crate::net::configure(&config) {
                Ok(name) => log!("configured {name} as {}/{}", config.address, config.prefix),
                Err(e) => log!("cannot configure the network ({value}): {e}"),
            },
            None => log!("ignoring malformed kiln.net={value}"),
        }
    } else {
        log!("no network: the host configured none (no kiln.net= on the kernel command line)");
    }
    Ok(())
}

/// Mounts a filesystem, creating the mount point; an existing mount there (`EBUSY`) is fine.
fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: Option<&CStr>,
) -> Result<(), InitError> {
    let _ = std::fs::create_dir_all(target);
    match rustix::mount::mount(source, target, fstype, flags, data) {
        Ok(()) | Err(Errno::BUSY) => Ok(()),
        Err(e) => Err(InitError::Mount {
            what: format!("{fstype} ({source})"),
            target: target.to_owned(),
            source: e.into(),
        }),
    }
}

/// Points fds 0-2 at the console: the kernel leaves them closed when the initramfs has no
/// `/dev/console`, and the console log is where a failing boot must say why.
fn console_stdio() {
    if let Ok(console) = rustix::fs::open(
        "/dev/console",
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        let _ = rustix::stdio::dup2_stdin(&console);
        let _ = rustix::stdio::dup2_stdout(&console);
        let _ = rustix::stdio::dup2_stderr(&console);
    }
}

/// Loads the modules listed in `order`, retrying failures until a pass loads nothing new.
fn load_modules(order: &Path) {
    let list = match std::fs::read_to_string(order) {
        Ok(list) => list,
        Err(e) => {
            log!("cannot read {}: {e}", order.display());
            return;
        }
    };
    let base = order.parent().unwrap_or(Path::new("/"));
    let mut pending: Vec<PathBuf> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| base.join(l))
        .collect();
    let mut failures = Vec::new();
    loop {
        let before = pending.len();
        failures.clear();
        pending.retain(|path| match load_module(path) {
            Ok(()) => false,
            Err(e) => {
                failures.push(format!("{}: {e}", path.display()));
                true
            }
        });
        if pending.is_empty() || pending.len() == before {
            break;
        }
    }
    for failure in &failures {
        log!("cannot load module {failure}");
    }
}

fn load_module(path: &Path) -> std::io::Result<()> {
    let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    match rustix::system::finit_module(&fd, c"", 0) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Mounts `base` read-only and an overlayfs at `/newroot` whose writable layer is on the ext4
/// `scratch` disk: the VM writes only to its scratch disk, and the shared base stays untouched.
fn mount_overlay(base: &str, fstype: &str, scratch: &str) -> Result<(), InitError> {
    wait_for_device(scratch)?;
    mount_fs(base, "/kiln/lower", fstype, MountFlags::RDONLY, None)?;
    mount_fs(scratch, "/kiln/rw", "ext4", MountFlags::empty(), None)?;
    for dir in ["/kiln/rw/upper", "/kiln/rw/work"] {
        std::fs::create_dir_all(dir).map_err(|source| InitError::Mount {
            what: "overlay".to_owned(),
            target: dir.to_owned(),
            source,
        })?;
    }
    mount_fs(
        "overlay",
        "/newroot",
        "overlay",
        MountFlags::empty(),
        Some(c"lowerdir=/kiln/lower,upperdir=/kiln/rw/upper,workdir=/kiln/rw/work"),
    )
}

fn wait_for_device(device: &str) -> Result<(), InitError> {
    let started = Instant::now();
    while !Path::new(device).exists() {
        if started.elapsed() > ROOT_WAIT {
            return Err(InitError::NoRootDevice(device.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Mounts `device` at `/newroot` (or the overlay of `kiln.overlay=`) and makes it `/`.
fn switch_root(device: &str) -> Result<(), InitError> {
    wait_for_device(device)?;
    let cmdline = cmdline();
    let fstype = cmdline_value(&cmdline, "kiln.rootfstype").unwrap_or("ext4");
    match cmdline_value(&cmdline, "kiln.overlay") {
        Some(scratch) => mount_overlay(device, fstype, scratch)?,
        None => mount_fs(device, "/newroot", fstype, MountFlags::empty(), None)?,
    }
    for dir in ["/dev", "/proc", "/sys", "/run"] {
        let target = format!("/newroot{dir}");
        let _ = std::fs::create_dir_all(&target);
        rustix::mount::mount_move(dir, target.as_str()).map_err(|e| InitError::SwitchRoot {
            step: "moving a mount",
            source: e.into(),
        })?;
    }
    let step = |step: &'static str| {
        move |e: Errno| InitError::SwitchRoot {
            step,
            source: e.into(),
        }
    };
    rustix::process::chdir("/newroot").map_err(step("chdir /newroot"))?;
    rustix::mount::mount_move(".", "/").map_err(step("mount --move . /"))?;
    rustix::process::chroot(".").map_err(step("chroot ."))?;
    rustix::process::chdir("/").map_err(step("chdir /"))?;
    log!("switched to the root filesystem on {device}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_values_take_the_last_occurrence() {
        let line = "console=ttyS0 kiln.root=/dev/vda quiet kiln.root=/dev/vdb init=/kiln/agent\n";
        assert_eq!(cmdline_value(line, "kiln.root"), Some("/dev/vdb"));
        assert_eq!(cmdline_value(line, "init"), Some("/kiln/agent"));
        assert_eq!(cmdline_value(line, "kiln.channel"), None);
    }
}
