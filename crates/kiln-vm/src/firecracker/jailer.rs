//! Starting Firecracker under its `jailer` (optional, `[firecracker] jailer = PATH`).
//!
//! The jailer (run as root) builds a chroot at `<chroot_base>/firecracker/<id>/root`, creates
//! the device nodes Firecracker needs in it, puts the process in a new cgroup
//! (`/sys/fs/cgroup/firecracker/<id>` with cgroup v2, one per controller with v1) with the limits
//! kiln derives from the VM spec,
//! drops to the configured uid/gid and execs Firecracker inside the chroot. So a guest that
//! escapes Firecracker lands as an unprivileged user in an empty directory, with a memory and
//! CPU ceiling. Turn it on for production hosts that run untrusted workflows.
//!
//! Everything the VM opens must be inside the chroot: kiln hard-links the kernel, the
//! initramfs and the read-only base disk into it (a hard link needs the chroot base on the same
//! file system as kiln's data dir; kiln says so when it is not), and creates the VM's scratch
//! disk there. The API and vsock sockets appear there too. Release kills the process, removes
//! the chroot and the cgroup; the per-VM directory's `jail` file names both, so the sweep after a
//! crashed kiln removes them as well.

use std::io;
use std::path::{Path, PathBuf};

use crate::VmSpec;

/// Memory the cgroup allows beyond the guest's RAM (Firecracker itself, device buffers).
const MEMORY_OVERHEAD_MIB: u64 = 256;

/// `[firecracker] jailer = PATH` and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    /// The `jailer` binary.
    pub binary: PathBuf,
    /// The user Firecracker runs as.
    pub uid: u32,
    /// The group Firecracker runs as.
    pub gid: u32,
    /// Where the jailer builds chroots (`/srv/jailer` by default).
    pub chroot_base: PathBuf,
}

impl JailerConfig {
    /// Defaults: uid/gid 65534 (nobody), chroots under `/srv/jailer`.
    pub fn new(binary: impl Into<PathBuf>) -> JailerConfig {
        JailerConfig {
            binary: binary.into(),
            uid: 65534,
            gid: 65534,
            chroot_base: PathBuf::from("/srv/jailer"),
        }
    }
}

/// Where one jailed VM lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Jail {
    /// `<chroot_base>/<exec name>/<id>`: removed on release.
    pub(super) dir: PathBuf,
    /// `<dir>/root`: the chroot, Firecracker's `/`.
    pub(super) root: PathBuf,
    /// The VM's cgroups: one (v2), or one per limited controller (v1).
    pub(super) cgroups: Vec<PathBuf>,
    /// The host's cgroup version.
    pub(super) cgroup_version: u8,
}

impl Jail {
    /// The jail of VM `id` running `firecracker` under `config`.
    pub(super) fn new(config: &JailerConfig, firecracker: &Path, id: &str) -> Jail {
        Jail::with_version(config, firecracker, id, host_cgroup_version())
    }

    fn with_version(config: &JailerConfig, firecracker: &Path, id: &str, version: u8) -> Jail {
        let exec_name = exec_name(firecracker);
        let dir = config.chroot_base.join(&exec_name).join(id);
        let base = Path::new("/sys/fs/cgroup");
        let cgroups = if version == 2 {
            vec![base.join(&exec_name).join(id)]
        } else {
            ["memory", "cpu"]
                .iter()
                .map(|controller| base.join(controller).join(&exec_name).join(id))
                .collect()
        };
        Jail {
            root: dir.join("root"),
            cgroups,
            cgroup_version: version,
            dir,
        }
    }

    /// The `jail` file's text, read back by [`remove_jail`].
    pub(super) fn record(&self) -> String {
        let mut text = format!("chroot={}\n", self.dir.display());
        for cgroup in &self.cgroups {
            text.push_str(&format!("cgroup={}\n", cgroup.display()));
        }
        text
    }
}

/// 2 when `/sys/fs/cgroup` is the unified (v2) hierarchy, else 1.
fn host_cgroup_version() -> u8 {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        2
    } else {
        1
    }
}

fn exec_name(firecracker: &Path) -> String {
    firecracker.file_name().map_or_else(
        || "firecracker".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The jailer's argv (after the binary): jail settings, cgroup limits from `spec` (in the
/// host's cgroup version), then `--` and Firecracker's own arguments.
pub(super) fn args(
    config: &JailerConfig,
    jail: &Jail,
    firecracker: &Path,
    id: &str,
    spec: &VmSpec,
    firecracker_args: &[String],
) -> Vec<String> {
    let memory_max = (u64::from(spec.memory_mib) + MEMORY_OVERHEAD_MIB) << 20;
    let cpu_max = u64::from(spec.vcpus.max(1)) * 100_000;
    let limits = if jail.cgroup_version == 2 {
        vec![
            format!("memory.max={memory_max}"),
            format!("cpu.max={cpu_max} 100000"),
        ]
    } else {
        vec![
            format!("memory.limit_in_bytes={memory_max}"),
            "cpu.cfs_period_us=100000".to_owned(),
            format!("cpu.cfs_quota_us={cpu_max}"),
        ]
    };
    let mut args = vec![
        "--id".to_owned(),
        id.to_owned(),
        "--exec-file".to_owned(),
        firecracker.display().to_string(),
        "--uid".to_owned(),
        config.uid.to_string(),
        "--gid".to_owned(),
        config.gid.to_string(),
        "--chroot-base-dir".to_owned(),
        config.chroot_base.display().to_string(),
        "--cgroup-version".to_owned(),
        jail.cgroup_version.to_string(),
    ];
    for limit in limits {
        args.push("--cgroup".to_owned());
        args.push(limit);
    }
    args.push("--".to_owned());
    args.extend(firecracker_args.iter().cloned());
    args
}

/// Hard-links `src` into the chroot as `name`, owned as it was (read-only files need no chown).
pub(super) fn link_into(root: &Path, src: &Path, name: &str) -> io::Result<()> {
    std::fs::hard_link(src, root.join(name)).map_err(|e| {
        if e.raw_os_error() == Some(libc::EXDEV) {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot hard-link {} into the jail {}: they are on different file systems \
                     (put [firecracker] chroot_base_dir on the file system of the data dir)",
                    src.display(),
                    root.display()
                ),
            )
        } else {
            io::Error::new(
                e.kind(),
                format!("linking {} into {}: {e}", src.display(), root.display()),
            )
        }
    })
}

/// Makes `path` belong to the jailed user (the scratch disk, the chroot itself).
pub(super) fn give_to(config: &JailerConfig, path: &Path) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(config.uid), Some(config.gid))
}

/// Removes a jail named by a `jail` file's text: the chroot tree and the (empty) cgroup.
pub(super) fn remove_jail(record: &str) {
    for line in record.lines() {
        if let Some(dir) = line.strip_prefix("chroot=") {
            let _ = std::fs::remove_dir_all(dir);
        } else if let Some(cgroup) = line.strip_prefix("cgroup=") {
            // A cgroup directory is removed with rmdir once its processes are gone.
            let _ = std::fs::remove_dir(cgroup);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jailer_arguments_carry_the_jail_and_the_spec_limits() {
        let mut config = JailerConfig::new("/usr/local/bin/jailer");
        config.uid = 1234;
        config.gid = 4321;
        config.chroot_base = "/srv/kiln-jails".into();
        let spec = VmSpec {
            vcpus: 2,
            memory_mib: 1024,
            ..VmSpec::default()
        };
        let fc = Path::new("/usr/local/bin/firecracker");
        let fc_args = ["--api-sock".to_owned(), "api.sock".to_owned()];
        let v2 = Jail::with_version(&config, fc, "fc-abc", 2);
        assert_eq!(
            args(&config, &v2, fc, "fc-abc", &spec, &fc_args).join(" "),
            "--id fc-abc --exec-file /usr/local/bin/firecracker --uid 1234 --gid 4321 \
             --chroot-base-dir /srv/kiln-jails --cgroup-version 2 \
             --cgroup memory.max=1342177280 --cgroup cpu.max=200000 100000 \
             -- --api-sock api.sock"
        );
        assert_eq!(
            v2.root,
            Path::new("/srv/kiln-jails/firecracker/fc-abc/root")
        );
        assert_eq!(v2.cgroups, [Path::new("/sys/fs/cgroup/firecracker/fc-abc")]);
        let v1 = Jail::with_version(&config, fc, "fc-abc", 1);
        assert_eq!(
            args(&config, &v1, fc, "fc-abc", &spec, &fc_args).join(" "),
            "--id fc-abc --exec-file /usr/local/bin/firecracker --uid 1234 --gid 4321 \
             --chroot-base-dir /srv/kiln-jails --cgroup-version 1 \
             --cgroup memory.limit_in_bytes=1342177280 --cgroup cpu.cfs_period_us=100000 \
             --cgroup cpu.cfs_quota_us=200000 -- --api-sock api.sock"
        );
        assert_eq!(
            v1.cgroups,
            [
                Path::new("/sys/fs/cgroup/memory/firecracker/fc-abc"),
                Path::new("/sys/fs/cgroup/cpu/firecracker/fc-abc")
            ]
        );
    }

    #[test]
    fn a_jail_record_removes_the_chroot() {
        let base = tempfile::tempdir().unwrap();
        let mut config = JailerConfig::new("jailer");
        config.chroot_base = base.path().to_owned();
        let jail = Jail::new(&config, Path::new("firecracker"), "fc-x");
        std::fs::create_dir_all(&jail.root).unwrap();
        let src = base.path().join("kernel");
        std::fs::write(&src, "elf").unwrap();
        link_into(&jail.root, &src, "vmlinux").unwrap();
        assert_eq!(std::fs::read(jail.root.join("vmlinux")).unwrap(), b"elf");
        remove_jail(&jail.record());
        assert!(!jail.dir.exists());
        assert!(src.exists(), "the source of a hard link stays");
    }
}
