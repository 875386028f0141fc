//! The Firecracker backend: one `firecracker` process per VM, configured through its REST API
//! on a Unix socket, with the guest agent reached over vsock.
//!
//! # Allocation
//! 1. The image (see [`crate::image`]) must have an ELF `vmlinux` (Firecracker boots no bzImage
//!    on x86_64) and an initramfs that loads the vsock and overlay modules.
//! 2. A per-VM directory `<runtime_dir>/fc-<id>/` (mode 0700) holds the owner file (the kiln
//!    pid), the Firecracker pid file, the guest console (`console.log`, Firecracker's stdout)
//!    and Firecracker's stderr. The VM's *root* — the directory Firecracker resolves every path
//!    in — is the same directory, or the jailer's chroot (see [`jailer`]). It holds:
//!    - `vmlinux`, `initramfs.cpio`, `base.ext4`: links to the image's files (symlinks, or hard
//!      links inside a chroot); `base.ext4` is attached **read-only**;
//!    - `scratch.ext4`: the VM's writable layer, a sparse file of [`VmSpec::disk_mib`] less what
//!      the image holds, formatted with `mke2fs` (only metadata is written). The guest init mounts the base read-only and
//!      an overlayfs with its upper directory on the scratch disk as `/` (`kiln.overlay=`), so
//!      allocation copies nothing proportional to the image and the base is never written;
//!    - `api.sock`, `vsock.sock`: Firecracker's API socket and vsock proxy socket.
//!
//!    All paths given to Firecracker are relative to the root, and Firecracker runs with the
//!    root as its working directory: a snapshot records only these names, so a restore in
//!    another directory opens that directory's files.
//! 3. `firecracker --api-sock api.sock --id <id> --log-path firecracker.log` starts in the root;
//!    once its socket is there kiln configures it in this order: `PUT /machine-config` (vCPUs,
//!    memory, dirty-page tracking for diff snapshots), `/boot-source` (vmlinux, initramfs,
//!    kernel command line), `/drives/rootfs`, `/drives/scratch`, `/vsock` (guest CID 3), then
//!    `/actions InstanceStart` ([`FirecrackerProvider::start`] stops here).
//! 4. kiln connects to `vsock.sock`, asks for the agent's port ([`AGENT_VSOCK_PORT`]) with
//!    `CONNECT`, retrying until the agent listens, and greets the agent (hostname = VM id, host
//!    clock). No answer within the boot timeout, or Firecracker exiting first, is
//!    [`VmError::Boot`] with the tail of the guest console; nothing is left behind.
//!
//! # Networking
//! None yet: Firecracker VMs get no network device, and the guest init says so on its console
//! ("no network"). TAP devices with NAT need root and are not implemented.
//!
//! # Snapshots
//! See [`snapshot`]: pause, `/snapshot/create` (full, or diff on a restored VM), and restore
//! into a fresh process with `/snapshot/load` + resume.
//!
//! # Release and leaks
//! Release SIGKILLs Firecracker (the VM is disposable: its only writable state is the scratch
//! disk, which is deleted), waits for it, and removes the per-VM directory and, when jailed, the
//! chroot and the cgroup. Dropping an unreleased [`FirecrackerVm`] does the same synchronously.
//! Firecracker gets `PR_SET_PDEATHSIG = SIGKILL` (lost when the jailer changes user), and
//! [`FirecrackerProvider::new`] reaps VMs whose kiln process is gone: per-VM directories whose
//! owner pid is dead, killing the process named in their pid file.

pub mod api;
mod client;
pub mod jailer;
mod process;
mod snapshot;
pub mod vsock;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use api::FirecrackerApiError;
pub use jailer::JailerConfig;

use crate::guest::{ConnectOptions, GuestClient};
use crate::image::{self, ImageError, ImageInfo};
use crate::qemu::console_tail;
use crate::{Allocation, ExecOutcome, ExecRequest, OutputSink, Vm, VmError, VmProvider, VmSpec};
use api::{
    ActionType, BootSource, CacheType, Drive, MachineConfiguration, Request, Vsock as VsockDevice,
};
use client::ApiClient;
use jailer::Jail;
use process::{Process, VmDir};

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = kiln_proto::AGENT_VSOCK_PORT;

/// The guest's vsock context id (each VM has its own device, so every guest can be 3).
const GUEST_CID: u32 = 3;

/// How long a KVM probe boot may take before KVM is declared unusable for Firecracker.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The guest directory that belongs to the runner.
const WORK_ROOT: &str = "/home/runner/work";

/// Names in a VM's root.
const API_SOCK: &str = "api.sock";
const VSOCK_SOCK: &str = "vsock.sock";
const KERNEL: &str = "vmlinux";
const INITRD: &str = "initramfs.cpio";
const BASE_DISK: &str = "base.ext4";
const SCRATCH_DISK: &str = "scratch.ext4";
/// Firecracker's own log (`--log-path`), in the VM's root.
const LOG_FILE: &str = "firecracker.log";

/// Settings of the Firecracker backend.
#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    /// Where per-VM directories live.
    pub runtime_dir: PathBuf,
    /// Where images (and the KVM verdict) live.
    pub data_dir: PathBuf,
    /// The `firecracker` binary (a path, or a name looked up in `PATH`).
    pub binary: PathBuf,
    /// Start VMs under the jailer.
    pub jailer: Option<JailerConfig>,
    /// From starting Firecracker to the agent's answer.
    pub boot_timeout: Duration,
}

impl FirecrackerConfig {
    /// Defaults: `firecracker` from `PATH`, no jailer, [`crate::qemu::DEFAULT_BOOT_TIMEOUT`].
    pub fn new(runtime_dir: PathBuf, data_dir: PathBuf) -> FirecrackerConfig {
        FirecrackerConfig {
            runtime_dir,
            data_dir,
            binary: PathBuf::from("firecracker"),
            jailer: None,
            boot_timeout: crate::qemu::DEFAULT_BOOT_TIMEOUT,
        }
    }
}

/// `[firecracker]` in `kiln.toml`, as users write it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerSection {
    /// The `firecracker` binary.
    pub binary: Option<PathBuf>,
    /// The `jailer` binary; empty or absent = no jailer.
    pub jailer: Option<PathBuf>,
    /// The user jailed VMs run as.
    pub uid: Option<u32>,
    /// The group jailed VMs run as.
    pub gid: Option<u32>,
    /// Where the jailer builds chroots.
    pub chroot_base_dir: Option<PathBuf>,
}

impl FirecrackerSection {
    /// Applies the section to `binary` and `jailer`; jail settings without a jailer are an error.
    pub fn apply(
        &self,
        binary: &mut PathBuf,
        jailer: &mut Option<JailerConfig>,
    ) -> Result<(), String> {
        if let Some(path) = &self.binary {
            if path.as_os_str().is_empty() {
                return Err("binary must not be empty".to_owned());
            }
            *binary = path.clone();
        }
        match self.jailer.as_ref().filter(|p| !p.as_os_str().is_empty()) {
            Some(path) => {
                let mut config = JailerConfig::new(path);
                if let Some(uid) = self.uid {
                    config.uid = uid;
                }
                if let Some(gid) = self.gid {
                    config.gid = gid;
                }
                if let Some(base) = &self.chroot_base_dir {
                    if !base.is_absolute() {
                        return Err(format!(
                            "chroot_base_dir must be an absolute path, not {}",
                            base.display()
                        ));
                    }
                    config.chroot_base = base.clone();
                }
                *jailer = Some(config);
            }
            None => {
                if self.uid.is_some() || self.gid.is_some() || self.chroot_base_dir.is_some() {
                    return Err(
                        "uid, gid and chroot_base_dir only apply with a jailer (set jailer = PATH)"
                            .to_owned(),
                    );
                }
                *jailer = None;
            }
        }
        Ok(())
    }
}

/// The binary's full path: as given when it has a directory part, else found in `PATH`.
pub fn resolve_binary(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        binary.is_file().then(|| binary.to_owned())
    } else {
        binary.to_str().and_then(image::find_in_path)
    }
}

/// Why the backend cannot run here (binaries, `/dev/kvm`, `mke2fs`), or `None`.
pub fn missing_tools(config: &FirecrackerConfig) -> Option<String> {
    if resolve_binary(&config.binary).is_none() {
        return Some(format!(
            "`{}` was not found (install the firecracker release binary, or set [firecracker] \
             binary)",
            config.binary.display()
        ));
    }
    if let Some(jailer) = &config.jailer {
        if resolve_binary(&jailer.binary).is_none() {
            return Some(format!(
                "the jailer `{}` was not found",
                jailer.binary.display()
            ));
        }
        // The chroot holds no libc: a dynamically linked Firecracker cannot start in it.
        if let Some(binary) = resolve_binary(&config.binary)
            && dynamically_linked(&binary)
        {
            return Some(format!(
                "{} is dynamically linked, so it cannot run in the jailer's chroot (use the \
                 static release binary)",
                binary.display()
            ));
        }
    }
    if let Err(e) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!(
            "/dev/kvm is not usable ({e}); Firecracker needs KVM"
        ));
    }
    if image::find_in_path("mke2fs").is_none() {
        return Some("`mke2fs` was not found (install the e2fsprogs package)".to_owned());
    }
    None
}

/// Whether `path` is an ELF executable with an interpreter (`PT_INTERP`), i.e. needs a dynamic
/// loader and libc at run time.
fn dynamically_linked(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |at: usize| {
        data.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        data.get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    // ELF64, little-endian (x86_64).
    if data.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        u32_at(at) == Some(PT_INTERP)
    })
}

/// The first line of `firecracker --version`, e.g. `Firecracker v1.16.1`.
pub async fn version(binary: &Path) -> Option<String> {
    let out = tokio::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())?
        .trim()
        .to_owned();
    out.status.success().then_some(line)
}

/// Identifies the binary for snapshots and the KVM verdict: path, size and modification time.
fn binary_identity(binary: &Path) -> String {
    match resolve_binary(binary).and_then(|p| std::fs::metadata(&p).ok().map(|m| (p, m))) {
        Some((p, m)) => {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            format!(
                "{} {} {}",
                p.display(),
                m.len(),
                mtime.map_or(0, |d| d.as_secs())
            )
        }
        None => binary.display().to_string(),
    }
}

fn unavailable(reason: impl Into<String>) -> VmError {
    VmError::Unavailable {
        backend: "firecracker",
        reason: reason.into(),
    }
}

/// Opens `name` and checks that Firecracker can boot it.
async fn open_image(data_dir: &Path, name: &str) -> Result<ImageInfo, VmError> {
    let data_dir = data_dir.to_owned();
    let owned = name.to_owned();
    let image = tokio::task::spawn_blocking(move || image::open(&data_dir, &owned))
        .await
        .map_err(|e| unavailable(format!("opening the image failed: {e}")))?
        .map_err(|e| match e {
            ImageError::NotFound { name, .. } => unavailable(format!(
                "the guest image `{name}` is not built; run `kiln image build {name}`"
            )),
            other => unavailable(format!("the guest image `{name}` is unusable: {other}")),
        })?;
    image_problem(&image).map_or(Ok(image), |why| Err(unavailable(why)))
}

/// Why Firecracker cannot boot `image`, or `None`.
pub fn image_problem(image: &ImageInfo) -> Option<String> {
    let name = image.name();
    let Some(vmlinux) = image.vmlinux() else {
        return Some(format!(
            "the image `{name}` has no uncompressed vmlinux (Firecracker boots only ELF kernels \
             on x86_64); rebuild it with `kiln image build {name}`"
        ));
    };
    let mut magic = [0u8; 4];
    let elf = std::fs::File::open(&vmlinux)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF";
    if !elf {
        return Some(format!("{} is not an ELF kernel", vmlinux.display()));
    }
    // A kernel given with `--kernel` has its drivers built in; Debian's needs these modules.
    let modules = &image.manifest.modules;
    let missing: Vec<&str> = ["vmw_vsock_virtio_transport", "overlay"]
        .into_iter()
        .filter(|m| !modules.is_empty() && !modules.iter().any(|have| have == m))
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "the initramfs of image `{name}` does not load {} (built by an older kiln); run \
             `kiln image rm {name}` and `kiln image build {name}`",
            missing.join(", ")
        ));
    }
    None
}

/// The guest kernel command line.
///
/// `reboot=k panic=1`: a panic reboots at once, and a reboot ends Firecracker (its i8042 reset
/// line), so a dead guest is seen at once. `pci=off`: virtio devices are on MMIO, announced
/// through ACPI. `kiln.overlay=` makes the init stack the scratch disk over the read-only
/// base; `kiln.channel=vsock` makes the agent listen on vsock instead of virtio-serial.
fn kernel_cmdline() -> String {
    "console=ttyS0 reboot=k panic=1 pci=off 8250.nr_uarts=1 i8042.noaux \
     kiln.root=/dev/vda kiln.overlay=/dev/vdb kiln.channel=vsock"
        .to_owned()
}

/// Firecracker's argv (after the binary). Paths are relative to the VM's root.
fn firecracker_args(id: &str) -> Vec<String> {
    [
        "--api-sock",
        API_SOCK,
        "--id",
        id,
        "--log-path",
        LOG_FILE,
        "--level",
        "Warning",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// The configuration calls of a fresh VM, in order, ending with `InstanceStart`.
fn boot_requests(spec: &VmSpec) -> Vec<Request> {
    vec![
        Request::machine_config(&MachineConfiguration {
            vcpu_count: spec.vcpus.clamp(1, 32),
            mem_size_mib: spec.memory_mib.max(128),
            smt: None,
            track_dirty_pages: Some(true),
            huge_pages: None,
        }),
        Request::boot_source(&BootSource {
            kernel_image_path: KERNEL.to_owned(),
            initrd_path: Some(INITRD.to_owned()),
            boot_args: Some(kernel_cmdline()),
        }),
        Request::drive(&Drive {
            drive_id: "rootfs".to_owned(),
            is_root_device: false,
            path_on_host: Some(BASE_DISK.to_owned()),
            is_read_only: Some(true),
            cache_type: Some(CacheType::Unsafe),
            io_engine: None,
        }),
        Request::drive(&Drive {
            drive_id: "scratch".to_owned(),
            is_root_device: false,
            path_on_host: Some(SCRATCH_DISK.to_owned()),
            is_read_only: Some(false),
            cache_type: Some(CacheType::Unsafe),
            io_engine: None,
        }),
        Request::vsock(&VsockDevice {
            guest_cid: GUEST_CID,
            uds_path: VSOCK_SOCK.to_owned(),
        }),
        Request::action(ActionType::InstanceStart),
    ]
}

/// The KVM probe's cached verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KvmVerdict {
    host_kernel: String,
    firecracker: String,
    recipe_hash: String,
    works: bool,
    reason: String,
}

/// The Firecracker backend.
#[derive(Debug)]
pub struct FirecrackerProvider {
    config: FirecrackerConfig,
    binary: PathBuf,
}

impl FirecrackerProvider {
    /// A provider; fails when Firecracker (or the jailer, `/dev/kvm`, `mke2fs`) is missing.
    /// Reaps VMs left behind by kiln processes that are gone.
    pub fn new(config: FirecrackerConfig) -> Result<FirecrackerProvider, VmError> {
        if let Some(reason) = missing_tools(&config) {
            return Err(unavailable(reason));
        }
        let binary = resolve_binary(&config.binary)
            .ok_or_else(|| unavailable(format!("`{}` vanished", config.binary.display())))?;
        process::reap_orphans(&config.runtime_dir);
        Ok(FirecrackerProvider { config, binary })
    }

    /// The settings.
    pub fn config(&self) -> &FirecrackerConfig {
        &self.config
    }

    /// Whether this host's KVM boots a Firecracker guest to its agent: a probe boot of `spec`'s
    /// image (1 vCPU, at most 512 MiB), cached per host kernel, binary and image.
    pub async fn kvm_probe(&self, spec: &VmSpec) -> Result<(bool, String), VmError> {
        let image = open_image(&self.config.data_dir, &spec.image).await?;
        let host_kernel = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        let identity = binary_identity(&self.binary);
        let cache = self.config.data_dir.join("firecracker-kvm.json");
        if let Ok(text) = tokio::fs::read(&cache).await
            && let Ok(verdict) = serde_json::from_slice::<KvmVerdict>(&text)
            && verdict.host_kernel == host_kernel
            && verdict.firecracker == identity
            && verdict.recipe_hash == image.manifest.recipe_hash
        {
            return Ok((verdict.works, verdict.reason));
        }
        let probe = VmSpec {
            vcpus: 1,
            memory_mib: spec.memory_mib.min(512),
            ..spec.clone()
        };
        let (works, reason) = match self.boot(&probe, KVM_PROBE_TIMEOUT).await {
            Ok(vm) => {
                let _ = vm.release().await;
                (
                    true,
                    "a Firecracker probe boot reached the guest agent".to_owned(),
                )
            }
            Err(e @ VmError::Unavailable { .. }) => return Err(e),
            Err(e) => {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("").to_owned();
                (
                    false,
                    format!("a Firecracker probe boot did not reach the agent ({first})"),
                )
            }
        };
        let verdict = KvmVerdict {
            host_kernel,
            firecracker: identity,
            recipe_hash: image.manifest.recipe_hash.clone(),
            works,
            reason: reason.clone(),
        };
        if let Ok(json) = serde_json::to_vec_pretty(&verdict) {
            let _ = tokio::fs::create_dir_all(&self.config.data_dir).await;
            let _ = tokio::fs::write(&cache, json).await;
        }
        Ok((works, reason))
    }

    /// Creates a VM's directories and links (see the module docs); returns the VM dir guard,
    /// the root and the jail.
    fn lay_out(
        &self,
        id: &str,
        image: &ImageInfo,
        with_kernel: bool,
    ) -> Result<(VmDir, PathBuf, Option<Jail>), VmError> {
        let io = |op: String, source: std::io::Error| VmError::Io {
            vm: id.to_owned(),
            op,
            source,
        };
        let dir = self.config.runtime_dir.join(id);
        let vm_dir = VmDir::create(id, &dir)?;
        let jail = self
            .config
            .jailer
            .as_ref()
            .map(|j| Jail::new(j, &self.binary, id));
        let root = match &jail {
            Some(jail) => {
                std::fs::write(dir.join(process::JAIL_FILE), jail.record())
                    .map_err(|e| io("recording the jail".to_owned(), e))?;
                std::fs::create_dir_all(&jail.root)
                    .map_err(|e| io(format!("creating {}", jail.root.display()), e))?;
                jail.root.clone()
            }
            None => dir.clone(),
        };
        if root.join(API_SOCK).as_os_str().len() >= 100 {
            return Err(unavailable(format!(
                "the runtime dir {} is too long for Unix socket paths",
                root.display()
            )));
        }
        let mut files = vec![(image.rootfs(), BASE_DISK)];
        if with_kernel {
            let vmlinux = image
                .vmlinux()
                .ok_or_else(|| unavailable("the image has no vmlinux"))?;
            files.push((vmlinux, KERNEL));
            files.push((image.initramfs(), INITRD));
        }
        for (src, name) in files {
            let src = std::path::absolute(&src)
                .map_err(|e| io(format!("resolving {}", src.display()), e))?;
            let linked = match &jail {
                Some(_) => jailer::link_into(&root, &src, name),
                None => std::os::unix::fs::symlink(&src, root.join(name)),
            };
            linked.map_err(|e| io(format!("linking {name} into {}", root.display()), e))?;
        }
        Ok((vm_dir, root, jail))
    }

    /// Starts Firecracker for a laid-out VM.
    fn spawn(
        &self,
        id: &str,
        spec: &VmSpec,
        dir: &Path,
        root: &Path,
        jail: Option<&Jail>,
    ) -> Result<Process, VmError> {
        let fc_args = firecracker_args(id);
        match (&self.config.jailer, jail) {
            (Some(config), Some(jail)) => {
                jailer::give_to(config, &jail.root).map_err(|source| VmError::Io {
                    vm: id.to_owned(),
                    op: format!("handing {} to the jailed user", jail.root.display()),
                    source,
                })?;
                // The jailer passes `--id` on to Firecracker itself.
                let fc_args: Vec<String> = fc_args
                    .chunks(2)
                    .filter(|pair| pair[0] != "--id")
                    .flatten()
                    .cloned()
                    .collect();
                let args = jailer::args(config, jail, &self.binary, id, spec, &fc_args);
                let binary = resolve_binary(&config.binary).unwrap_or(config.binary.clone());
                Process::spawn(&binary, &args, dir, (dir, root), id)
            }
            _ => Process::spawn(&self.binary, &fc_args, root, (dir, root), id),
        }
    }

    /// Starts a VM up to `InstanceStart`, without waiting for its agent: the API, the serial
    /// console and the vsock proxy socket are there, the guest is booting. On failure nothing is
    /// left behind.
    pub async fn start(&self, spec: &VmSpec) -> Result<Machine, VmError> {
        let image = open_image(&self.config.data_dir, &spec.image).await?;
        let id = new_id();
        let (vm_dir, root, jail) = self.lay_out(&id, &image, true)?;
        make_scratch(&id, &root.join(SCRATCH_DISK), scratch_mib(spec, &image)).await?;
        if let (Some(config), Some(_)) = (&self.config.jailer, &jail) {
            jailer::give_to(config, &root.join(SCRATCH_DISK)).map_err(|source| VmError::Io {
                vm: id.clone(),
                op: "handing the scratch disk to the jailed user".to_owned(),
                source,
            })?;
        }
        let process = self.spawn(&id, spec, vm_dir.path(), &root, jail.as_ref())?;
        let machine = Machine {
            id,
            dir: vm_dir.keep(),
            api: ApiClient::new(root.join(API_SOCK)),
            root,
            process,
            meta: snapshot::Meta::new(spec, &self.binary, &image, jail.is_some()),
            last_memory: std::sync::Mutex::new(None),
            released: AtomicBool::new(false),
        };
        let configure = async {
            wait_for_socket(machine.api.socket()).await;
            for request in boot_requests(spec) {
                machine
                    .api
                    .call(&request)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        };
        machine
            .run_or_fail(configure, self.config.boot_timeout)
            .await?;
        Ok(machine)
    }

    /// Boots one VM and waits for its agent.
    async fn boot(&self, spec: &VmSpec, timeout: Duration) -> Result<FirecrackerVm, VmError> {
        let started = Instant::now();
        let machine = self.start(spec).await?;
        let deadline = started + timeout;
        let client = machine
            .run_or_fail(connect_agent(&machine.id, &machine.root, deadline), timeout)
            .await?;
        let vm = FirecrackerVm {
            machine,
            client,
            released: AtomicBool::new(false),
        };
        vm.prepare().await?;
        Ok(vm)
    }
}

fn new_id() -> String {
    format!(
        "{}{}",
        process::ID_PREFIX,
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// One Firecracker process and its files: a VM as the host sees it, with or without an agent.
/// Released (killed, files removed) by [`Machine::release`] or on drop.
pub struct Machine {
    id: String,
    /// The per-VM directory.
    dir: PathBuf,
    /// Where Firecracker resolves paths: `dir`, or the jail's chroot.
    root: PathBuf,
    api: ApiClient,
    process: Process,
    meta: snapshot::Meta,
    /// The memory file of this VM's last snapshot (or of the one it was restored from): the
    /// base of its next, diff, snapshot.
    last_memory: std::sync::Mutex<Option<PathBuf>>,
    released: AtomicBool,
}

impl fmt::Debug for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Machine {
    /// The VM id (`fc-…`), also Firecracker's `--id`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The per-VM directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Firecracker's (or the jailer's) process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.process.pid()
    }

    /// The guest's serial console as captured so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join(process::CONSOLE_LOG)).unwrap_or_default()
    }

    /// Firecracker's vsock proxy socket (see [`vsock`]).
    pub fn vsock_path(&self) -> PathBuf {
        self.root.join(VSOCK_SOCK)
    }

    /// `GET /`: the instance's id, state (`Not started`, `Running`, `Paused`) and version.
    pub async fn describe(&self) -> Result<api::InstanceInfo, FirecrackerApiError> {
        self.api.get(&Request::describe_instance()).await
    }

    /// `PATCH /vm Paused`.
    pub async fn pause(&self) -> Result<(), FirecrackerApiError> {
        self.api
            .call(&Request::vm_state(api::RunState::Paused))
            .await
    }

    /// `PATCH /vm Resumed`.
    pub async fn resume(&self) -> Result<(), FirecrackerApiError> {
        self.api
            .call(&Request::vm_state(api::RunState::Resumed))
            .await
    }

    /// Resolves when Firecracker has exited, with its status.
    pub async fn exited(&self) -> String {
        self.process.exited().await
    }

    /// How Firecracker ended, once it has.
    pub fn exit_status(&self) -> Option<String> {
        self.process.exit_status()
    }

    /// Runs `work` until `timeout`, unless Firecracker exits first; on failure kills it, removes
    /// every file and returns [`VmError::Boot`] with the console tail.
    async fn run_or_fail<T>(
        &self,
        work: impl Future<Output = Result<T, String>>,
        timeout: Duration,
    ) -> Result<T, VmError> {
        // The work goes first: an API refusal explains more than the exit that follows it.
        let result = tokio::select! {
            biased;
            result = tokio::time::timeout(timeout, work) => match result {
                Ok(Err(reason)) if reason.starts_with("Firecracker refused") => Err((reason, true)),
                Ok(inner) => inner.map_err(|reason| (reason, false)),
                Err(_) => Err((
                    format!("the guest agent did not answer within {timeout:?} (boot timeout)"),
                    false,
                )),
            },
            status = self.process.exited() => Err((
                format!("Firecracker exited before the agent answered ({status})"),
                true,
            )),
        };
        match result {
            Ok(value) => Ok(value),
            Err((reason, explained)) => {
                // A Firecracker that died by itself explains more than the broken socket or
                // the timeout that revealed it.
                let reason =
                    if !explained && self.process.wait_for(Duration::from_millis(300)).await {
                        let status = self.process.exit_status().unwrap_or_default();
                        format!("Firecracker exited before the agent answered ({status})")
                    } else {
                        reason
                    };
                let tail = console_tail(&self.dir.join(process::CONSOLE_LOG));
                let _ = self.release().await;
                Err(VmError::Boot {
                    vm: self.id.clone(),
                    reason: format!("{reason}\n--- guest console (last lines) ---\n{tail}"),
                })
            }
        }
    }

    /// Kills Firecracker and removes the per-VM directory and the jail. Idempotent.
    pub async fn release(&self) -> Result<(), VmError> {
        if self.released.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let stopped = self.process.kill_and_wait().await;
        let dir = self.dir.clone();
        let removed = tokio::task::spawn_blocking(move || process::remove_vm_dir(&dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        removed.map_err(|source| VmError::Io {
            vm: self.id.clone(),
            op: format!("removing {}", self.dir.display()),
            source,
        })?;
        if !stopped {
            return Err(VmError::Io {
                vm: self.id.clone(),
                op: "stopping Firecracker".to_owned(),
                source: std::io::Error::other("Firecracker did not exit after SIGKILL"),
            });
        }
        Ok(())
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if !self.released.swap(true, Ordering::SeqCst) {
            self.process.kill();
            let _ = process::remove_vm_dir(&self.dir);
        }
    }
}

/// The scratch disk's size: `disk_mib` is the guest root file system's size (as with QEMU), so
/// a run can write `disk_mib` less what the image holds (its allocated blocks), and at least
/// 64 MiB.
fn scratch_mib(spec: &VmSpec, image: &ImageInfo) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let used_mib = std::fs::metadata(image.rootfs())
        .map(|m| (m.blocks() * 512) >> 20)
        .unwrap_or(0);
    let used_mib = u32::try_from(used_mib).unwrap_or(u32::MAX);
    spec.disk_mib.saturating_sub(used_mib).max(64)
}

/// Creates the sparse scratch disk of `disk_mib` MiB and formats it (metadata only).
pub async fn make_scratch(id: &str, path: &Path, disk_mib: u32) -> Result<(), VmError> {
    let io = |op: String, source| VmError::Io {
        vm: id.to_owned(),
        op,
        source,
    };
    let file =
        std::fs::File::create(path).map_err(|e| io(format!("creating {}", path.display()), e))?;
    file.set_len(u64::from(disk_mib.max(64)) << 20)
        .map_err(|e| io(format!("sizing {}", path.display()), e))?;
    drop(file);
    let out = tokio::process::Command::new("mke2fs")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            "-L",
            "kiln-scratch",
        ])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| io("running mke2fs".to_owned(), e))?;
    if !out.status.success() {
        return Err(VmError::Boot {
            vm: id.to_owned(),
            reason: format!(
                "mke2fs of the scratch disk failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

async fn wait_for_socket(path: &Path) {
    while !path.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Connects to the agent through the vsock proxy, retrying until it listens, and greets it.
async fn connect_agent(id: &str, root: &Path, deadline: Instant) -> Result<GuestClient, String> {
    let uds = root.join(VSOCK_SOCK);
    let stream = loop {
        match vsock::connect(&uds, AGENT_VSOCK_PORT).await {
            Ok(stream) => break stream,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::NotFound
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::TimedOut
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(format!("connecting to the agent over vsock: {e}")),
        }
    };
    let (reader, writer) = stream.into_split();
    let mut options = ConnectOptions::new(id);
    options.hostname = Some(id.to_owned());
    options.hello_timeout =
        deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
    GuestClient::connect_with(reader, writer, options)
        .await
        .map_err(|e| e.into_vm_error(id).to_string())
}

#[async_trait]
impl VmProvider for FirecrackerProvider {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn isolates(&self) -> bool {
        true
    }

    async fn allocate(&self, spec: &VmSpec) -> Result<Allocation, VmError> {
        let started = Instant::now();
        let vm = self.boot(spec, self.config.boot_timeout).await?;
        tracing::debug!(vm = %vm.machine.id, "Firecracker VM ready");
        Ok(Allocation {
            vm: Arc::new(vm),
            elapsed: started.elapsed(),
        })
    }

    async fn ready_snapshot(&self, spec: &VmSpec) -> Result<crate::VmSnapshot, VmError> {
        self.ready(spec).await
    }

    async fn restore(&self, snapshot: &crate::VmSnapshot) -> Result<Allocation, VmError> {
        self.restore_snapshot(snapshot).await
    }

    fn supports_checkpoints(&self) -> bool {
        true
    }

    async fn delete_snapshot(&self, snapshot: &crate::VmSnapshot) -> Result<(), VmError> {
        snapshot::delete(snapshot).await
    }
}

/// A running Firecracker VM with its agent connected.
pub struct FirecrackerVm {
    machine: Machine,
    client: GuestClient,
    released: AtomicBool,
}

impl fmt::Debug for FirecrackerVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FirecrackerVm")
            .field("id", &self.machine.id)
            .field("dir", &self.machine.dir)
            .finish()
    }
}

impl FirecrackerVm {
    /// The per-VM directory on the host.
    pub fn dir(&self) -> &Path {
        &self.machine.dir
    }

    /// Firecracker's (or the jailer's) process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.machine.pid()
    }

    /// The guest agent client.
    pub fn guest(&self) -> &GuestClient {
        &self.client
    }

    /// Creates the work root, owned by the runner user when the image has one.
    async fn prepare(&self) -> Result<(), VmError> {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let script = format!(
            "mkdir -p {WORK_ROOT} && (chown {user}:{user} {WORK_ROOT} 2>/dev/null || true)",
            user = image::RUNNER_USER
        );
        let request = ExecRequest {
            command: crate::Command::Argv(vec!["/bin/sh".into(), "-c".into(), script]),
            env: Vec::new(),
            cwd: Some("/".to_owned()),
            timeout: Some(Duration::from_secs(30)),
            // Housekeeping: creating and handing over the work root needs root.
            user: crate::ExecUser::Root,
        };
        let outcome = self.client.exec(request, tx).await?;
        if !outcome.status.success() {
            return Err(VmError::Boot {
                vm: self.machine.id.clone(),
                reason: format!(
                    "creating {WORK_ROOT} in the guest failed ({})",
                    outcome.status
                ),
            });
        }
        Ok(())
    }

    fn check(&self) -> Result<(), VmError> {
        if self.released.load(Ordering::SeqCst) {
            Err(VmError::Released {
                vm: self.machine.id.clone(),
            })
        } else {
            Ok(())
        }
    }

    /// `result`, its error explained (see `explain`) when the VM has died.
    async fn checked<T>(&self, result: Result<T, VmError>) -> Result<T, VmError> {
        match result {
            Ok(value) => Ok(value),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// Adds Firecracker's exit status and the console tail to an error when the VM died.
    async fn explain(&self, error: VmError) -> VmError {
        if self.released.load(Ordering::SeqCst) || matches!(error, VmError::Released { .. }) {
            return error;
        }
        if !self
            .machine
            .process
            .wait_for(Duration::from_millis(500))
            .await
        {
            return error;
        }
        let status = self.machine.exit_status().unwrap_or_default();
        let error = match error {
            VmError::Guest { message, .. } => message,
            other => other.to_string(),
        };
        VmError::Guest {
            vm: self.machine.id.clone(),
            message: format!(
                "{error}; the VM died (Firecracker: {status})\n--- guest console (last lines) ---\n{}",
                console_tail(&self.machine.dir.join(process::CONSOLE_LOG))
            ),
        }
    }
}

#[async_trait]
impl Vm for FirecrackerVm {
    fn id(&self) -> &str {
        &self.machine.id
    }

    fn backend(&self) -> &'static str {
        "firecracker"
    }

    fn work_root(&self) -> &str {
        WORK_ROOT
    }

    async fn exec(
        &self,
        mut request: ExecRequest,
        output: OutputSink,
    ) -> Result<ExecOutcome, VmError> {
        self.check()?;
        if request.cwd.is_none() {
            request.cwd = Some(WORK_ROOT.to_owned());
        }
        self.checked(self.client.exec(request, output).await).await
    }

    async fn exec_pty(&self, mut request: crate::PtyRequest) -> Result<crate::PtySession, VmError> {
        self.check()?;
        if request.cwd.is_none() {
            request.cwd = Some(WORK_ROOT.to_owned());
        }
        self.checked(self.client.exec_pty(request).await).await
    }

    async fn kill_all(&self) -> Result<(), VmError> {
        self.check()?;
        self.checked(self.client.kill_all().await).await
    }

    async fn copy_in(&self, host: &Path, guest: &str) -> Result<(), VmError> {
        self.check()?;
        self.checked(self.client.copy_in(host, guest).await).await
    }

    async fn copy_out(&self, guest: &str, host: &Path) -> Result<(), VmError> {
        self.check()?;
        self.checked(self.client.copy_out(guest, host).await).await
    }

    async fn write_file(&self, guest: &str, contents: &[u8]) -> Result<(), VmError> {
        self.check()?;
        self.checked(self.client.write_file(guest, contents).await)
            .await
    }

    async fn read_file(&self, guest: &str) -> Result<Vec<u8>, VmError> {
        self.check()?;
        self.checked(self.client.read_file(guest).await).await
    }

    async fn release(&self) -> Result<(), VmError> {
        self.released.store(true, Ordering::SeqCst);
        self.machine.release().await
    }

    async fn snapshot(&self, dest: &Path) -> Result<crate::VmSnapshot, VmError> {
        self.check()?;
        self.machine.save(dest).await
    }

    async fn checkpoint(&self, dest: &Path) -> Result<crate::VmSnapshot, VmError> {
        self.check()?;
        self.machine.checkpoint(dest).await
    }
}

/// `kiln doctor`'s Firecracker lines: the binary and its version, the jailer, the image's
/// kernel format and vsock support, and whether KVM boots a guest (a probe boot, cached).
pub async fn doctor(config: &FirecrackerConfig) -> Vec<String> {
    let mut lines = Vec::new();
    let binary = resolve_binary(&config.binary);
    match &binary {
        Some(path) => {
            let version = version(path)
                .await
                .unwrap_or_else(|| "version unknown".into());
            lines.push(format!("firecracker:  {} ({version})", path.display()));
        }
        None => lines.push(format!(
            "firecracker:  `{}` not found (install the firecracker release binary)",
            config.binary.display()
        )),
    }
    lines.push(match &config.jailer {
        None => "jailer:       off (set [firecracker] jailer = PATH to jail VMs)".to_owned(),
        Some(j) => match resolve_binary(&j.binary) {
            Some(path) => format!(
                "jailer:       {} ({}), uid {} gid {}, chroots in {}",
                path.display(),
                version(&path)
                    .await
                    .unwrap_or_else(|| "version unknown".into()),
                j.uid,
                j.gid,
                j.chroot_base.display()
            ),
            None => format!("jailer:       `{}` not found", j.binary.display()),
        },
    });
    let images = image::list(&config.data_dir).unwrap_or_default();
    let image = images
        .iter()
        .find(|i| i.name() == "default")
        .or(images.first());
    match image {
        None => lines.push("fc kernel:    no image built (`kiln image build`)".to_owned()),
        Some(image) => {
            let kernel = match image.vmlinux() {
                Some(path) if image_problem(image).is_none() => {
                    format!(
                        "ELF vmlinux in image `{}` ({})",
                        image.name(),
                        path.display()
                    )
                }
                _ => image_problem(image).unwrap_or_default(),
            };
            lines.push(format!("fc kernel:    {kernel}"));
            let modules = &image.manifest.modules;
            let vsock = if modules.is_empty() {
                "the image's own kernel (vsock must be built in)".to_owned()
            } else {
                let has = |m: &str| modules.iter().any(|have| have == m);
                format!(
                    "the initramfs of `{}` {} virtio vsock (the agent's channel) and {} overlay \
                     (the writable root)",
                    image.name(),
                    if has("vmw_vsock_virtio_transport") {
                        "loads"
                    } else {
                        "LACKS"
                    },
                    if has("overlay") { "loads" } else { "LACKS" },
                )
            };
            lines.push(format!("fc vsock:     {vsock}"));
        }
    }
    let kvm = match (binary, image) {
        (None, _) => "not probed (no firecracker binary)".to_owned(),
        (_, None) => "not probed (no image)".to_owned(),
        (Some(_), Some(image)) => match FirecrackerProvider::new(config.clone()) {
            Err(e) => format!("not probed: {e}"),
            Ok(provider) => {
                let spec = VmSpec {
                    image: image.name().to_owned(),
                    ..VmSpec::default()
                };
                match provider.kvm_probe(&spec).await {
                    Ok((true, why)) => format!("usable: {why}"),
                    Ok((false, why)) => format!("NOT usable: {why}"),
                    Err(e) => format!("not probed: {e}"),
                }
            }
        },
    };
    lines.push(format!("fc KVM:       {kvm}"));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_configuration_follows_the_spec_in_order() {
        let spec = VmSpec {
            vcpus: 3,
            memory_mib: 1536,
            ..VmSpec::default()
        };
        let calls: Vec<String> = boot_requests(&spec).iter().map(Request::name).collect();
        assert_eq!(
            calls,
            [
                "PUT /machine-config",
                "PUT /boot-source",
                "PUT /drives/rootfs",
                "PUT /drives/scratch",
                "PUT /vsock",
                "PUT /actions"
            ]
        );
        let requests = boot_requests(&spec);
        let machine = requests[0].body.as_ref().unwrap();
        assert_eq!(machine["vcpu_count"], 3);
        assert_eq!(machine["mem_size_mib"], 1536);
        assert_eq!(machine["track_dirty_pages"], true);
        let root = requests[2].body.as_ref().unwrap();
        assert_eq!(
            root["is_read_only"], true,
            "the base image is never written"
        );
        assert_eq!(root["path_on_host"], BASE_DISK);
        let boot = requests[1].body.as_ref().unwrap();
        let args = boot["boot_args"].as_str().unwrap();
        assert!(args.contains("kiln.overlay=/dev/vdb"), "{args}");
        assert!(args.contains("kiln.channel=vsock"), "{args}");
        assert_eq!(
            requests[5].body.as_ref().unwrap()["action_type"],
            "InstanceStart"
        );
    }

    #[test]
    fn the_config_section_sets_binary_and_jailer() {
        let mut binary = PathBuf::from("firecracker");
        let mut jailer = None;
        let section: FirecrackerSection = toml_like(
            r#"{"binary": "/opt/fc/firecracker", "jailer": "/opt/fc/jailer", "uid": 100,
                "chroot_base_dir": "/var/lib/kiln/jail"}"#,
        );
        section.apply(&mut binary, &mut jailer).unwrap();
        assert_eq!(binary, Path::new("/opt/fc/firecracker"));
        let jailer = jailer.unwrap();
        assert_eq!(jailer.uid, 100);
        assert_eq!(jailer.gid, 65534);
        assert_eq!(jailer.chroot_base, Path::new("/var/lib/kiln/jail"));
        let mut none = None;
        let err = toml_like::<FirecrackerSection>(r#"{"uid": 1}"#)
            .apply(&mut binary, &mut none)
            .unwrap_err();
        assert!(err.contains("jailer"), "{err}");
        let off: FirecrackerSection = toml_like(r#"{"jailer": ""}"#);
        off.apply(&mut binary, &mut none).unwrap();
        assert!(none.is_none());
        let relative: FirecrackerSection =
            toml_like(r#"{"jailer": "j", "chroot_base_dir": "rel"}"#);
        assert!(relative.apply(&mut binary, &mut none).is_err());
        assert!(serde_json::from_str::<FirecrackerSection>(r#"{"network": "tap"}"#).is_err());
    }

    fn toml_like<T: serde::de::DeserializeOwned>(json: &str) -> T {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn dynamic_executables_are_told_from_static_ones() {
        // This test binary is linked dynamically (the gnu target); a shell script is no ELF.
        let me = std::env::current_exe().unwrap();
        assert!(dynamically_linked(&me), "{}", me.display());
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("x");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(!dynamically_linked(&script));
    }

    #[test]
    fn a_missing_binary_is_named_with_what_to_install() {
        let mut config = FirecrackerConfig::new("/tmp".into(), "/tmp".into());
        config.binary = "/nonexistent/firecracker".into();
        let why = missing_tools(&config).unwrap();
        assert!(why.contains("/nonexistent/firecracker"), "{why}");
        assert!(why.contains("install"), "{why}");
        let err = FirecrackerProvider::new(config).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/firecracker"),
            "{err}"
        );
    }
}
