//! The QEMU backend: one `qemu-system-x86_64 -M microvm` per VM, driven through the guest agent.
//!
//! # Allocation
//! 1. The image (see [`crate::image`]) is opened; a missing one is [`VmError::Unavailable`] with
//!    the command that builds it.
//! 2. A per-VM directory `<runtime_dir>/qemu-<id>/` (mode 0700) gets a qcow2 overlay backed by the
//!    image's read-only `rootfs.ext4` (`qemu-img create -f qcow2 -b BASE -F raw`), so allocation
//!    copies nothing and the base is never written. [`VmSpec::disk_mib`] is the size of the
//!    guest's root file system, so what a run can write is `disk_mib` less what the image uses:
//!    - larger than the image: the overlay is that large, and the root file system is grown
//!      online (`resize2fs`) at boot;
//!    - smaller: ext4 cannot shrink while mounted, so the difference is taken up at boot by a
//!      root-owned reserve file, `fallocate`d (blocks marked in use without a byte written, so
//!      the overlay does not grow). Writes past the quota fail with ENOSPC. The hard bound the
//!      host enforces is the overlay's virtual size (the image's size): the reserve is immutable
//!      (`chattr +i`), but guest root, which the `runner` user reaches with sudo, could lift
//!      that, delete it and write up to the image's size.
//! 3. QEMU starts with `-M microvm` (virtio-mmio devices announced through ACPI), `-nodefaults
//!    -no-user-config -nographic -no-reboot`, the image's kernel and initramfs, the overlay as a
//!    virtio-blk disk (`kiln.root=/dev/vda`), a virtio-serial port named `kiln.agent` whose host
//!    end is the Unix socket `agent.sock`, a virtio-rng device, user-mode NAT networking unless
//!    disabled, the QMP socket `qmp.sock` and the serial console in `console.log`. The guest
//!    kernel runs with `panic=-1`, so a panic ends QEMU and is seen at once.
//! 4. kiln connects to `agent.sock` and greets the agent (hostname = VM id, host clock); the VM
//!    is ready when the agent answers. No answer within the boot timeout, or QEMU exiting first,
//!    is [`VmError::Boot`] with the tail of the guest console.
//!
//! # Accelerator
//! `kvm` and `tcg` can be forced. `auto` uses KVM only when a probe boot with KVM actually reaches
//! the agent (an openable `/dev/kvm` is not enough: some paravirtual KVMs cannot run a stock
//! kernel). The verdict is cached in `<data_dir>/qemu-accel.json` per host kernel and QEMU binary,
//! and the choice of TCG is logged once, as a warning.
//!
//! # Release and leaks
//! Release asks the agent to power off (short timeout), then QMP `quit`, then SIGKILL, waits for
//! the process and removes the per-VM directory. Dropping a [`QemuVm`] that was not released kills
//! QEMU and removes the directory synchronously. QEMU also gets `PR_SET_PDEATHSIG = SIGKILL`, so
//! it dies with the thread that started it even if kiln itself is killed; the directory such a
//! killed kiln leaves behind names its owner pid, and the next [`QemuProvider::new`] removes it.

pub mod qmp;
mod snapshot;

use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio::sync::{Mutex, watch};

use crate::guest::{ConnectOptions, GuestClient};
use crate::image::{self, ImageError, ImageInfo};
use crate::{
    Allocation, ExecOutcome, ExecRequest, ExecUser, OutputSink, PtyRequest, PtySession, Vm,
    VmError, VmProvider, VmSpec,
};

use qmp::Qmp;

/// Default time from starting QEMU to the agent's answer.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a KVM probe boot may take before KVM is declared unusable.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long release waits at each step (agent shutdown, QMP quit, SIGKILL).
const RELEASE_STEP: Duration = Duration::from_secs(3);

/// The guest directory that belongs to the runner.
const WORK_ROOT: &str = "/home/runner/work";

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a probe boot works, else TCG.
    #[default]
    Auto,
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!(
                "unknown accelerator `{other}` (expected auto, kvm or tcg)"
            )),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Guest networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// QEMU user-mode NAT: the guest reaches what the host reaches, no root needed.
    #[default]
    User,
    /// No network device.
    None,
}

impl FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(Network::User),
            "none" => Ok(Network::None),
            other => Err(format!("unknown network `{other}` (expected user or none)")),
        }
    }
}

/// Settings of the QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Where per-VM directories live.
    pub runtime_dir: PathBuf,
    /// Where images (and the accelerator verdict) live.
    pub data_dir: PathBuf,
    /// The QEMU binary.
    pub binary: PathBuf,
    /// The accelerator.
    pub accel: Accel,
    /// Guest networking.
    pub network: Network,
    /// From starting QEMU to the agent's answer.
    pub boot_timeout: Duration,
}

impl QemuConfig {
    /// Defaults: `qemu-system-x86_64` from `PATH`, `auto` accelerator, user networking,
    /// [`DEFAULT_BOOT_TIMEOUT`].
    pub fn new(runtime_dir: PathBuf, data_dir: PathBuf) -> QemuConfig {
        QemuConfig {
            runtime_dir,
            data_dir,
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            network: Network::User,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
        }
    }
}

/// Why the QEMU backend cannot run here, or `None` when the binaries are present.
pub fn missing_tools(config: &QemuConfig) -> Option<String> {
    let qemu = if config.binary.components().count() > 1 {
        config.binary.is_file().then(|| config.binary.clone())
    } else {
        config.binary.to_str().and_then(image::find_in_path)
    };
    if qemu.is_none() {
        return Some(format!(
            "`{}` was not found (install the qemu-system-x86 package)",
            config.binary.display()
        ));
    }
    if image::find_in_path("qemu-img").is_none() {
        return Some("`qemu-img` was not found (install the qemu-utils package)".to_owned());
    }
    None
}

/// The accelerator verdict a previous `auto` probe cached for this host kernel and QEMU binary,
/// with its reason (for `kiln doctor`); `None` when no probe ran yet.
pub fn cached_accel(config: &QemuConfig) -> Option<(Accel, String)> {
    let text = std::fs::read(config.data_dir.join("qemu-accel.json")).ok()?;
    let verdict: AccelVerdict = serde_json::from_slice(&text).ok()?;
    let host_kernel = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    (verdict.host_kernel == host_kernel && verdict.qemu == qemu_identity(&config.binary)).then(
        || {
            let accel = if verdict.kvm { Accel::Kvm } else { Accel::Tcg };
            (accel, verdict.reason)
        },
    )
}

/// The first line of `qemu-system-x86_64 --version`, e.g. `QEMU emulator version 7.2.18 ...`.
pub async fn qemu_version(config: &QemuConfig) -> Option<String> {
    let out = tokio::process::Command::new(&config.binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    out.status
        .success()
        .then(|| text.lines().next().unwrap_or("").trim().to_owned())
}

/// The cached result of a KVM probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AccelVerdict {
    host_kernel: String,
    qemu: String,
    kvm: bool,
    reason: String,
}

/// The QEMU backend.
#[derive(Debug)]
pub struct QemuProvider {
    config: QemuConfig,
    accel: Mutex<Option<(Accel, String)>>,
}

impl QemuProvider {
    /// A provider; fails when QEMU or qemu-img is missing.
    pub fn new(config: QemuConfig) -> Result<QemuProvider, VmError> {
        if let Some(reason) = missing_tools(&config) {
            return Err(unavailable(reason));
        }
        sweep_orphans(&config.runtime_dir);
        Ok(QemuProvider {
            config,
            accel: Mutex::new(None),
        })
    }

    /// The settings.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The accelerator VMs use and why (probing KVM with a boot of `spec`'s image when the
    /// setting is `auto` and no verdict is cached).
    pub async fn resolve_accel(&self, spec: &VmSpec) -> Result<(Accel, String), VmError> {
        let mut slot = self.accel.lock().await;
        if let Some(resolved) = slot.clone() {
            return Ok(resolved);
        }
        let resolved = match self.config.accel {
            Accel::Kvm => (Accel::Kvm, "forced with accel = kvm".to_owned()),
            Accel::Tcg => (Accel::Tcg, "forced with accel = tcg".to_owned()),
            Accel::Auto => {
                let verdict = self.kvm_verdict(spec).await?;
                if verdict.kvm {
                    (Accel::Kvm, verdict.reason)
                } else {
                    tracing::warn!(
                        "QEMU uses TCG software emulation (slower than KVM): {}",
                        verdict.reason
                    );
                    (Accel::Tcg, verdict.reason)
                }
            }
        };
        *slot = Some(resolved.clone());
        Ok(resolved)
    }

    async fn kvm_verdict(&self, spec: &VmSpec) -> Result<AccelVerdict, VmError> {
        let host_kernel = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        let qemu = qemu_identity(&self.config.binary);
        // An unusable /dev/kvm is checked afresh each time (permissions may be fixed later);
        // only what a probe boot found is cached.
        if let Err(e) = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            return Ok(AccelVerdict {
                host_kernel,
                qemu,
                kvm: false,
                reason: format!("/dev/kvm is not usable ({e})"),
            });
        }
        let cache = self.config.data_dir.join("qemu-accel.json");
        if let Ok(text) = tokio::fs::read(&cache).await
            && let Ok(verdict) = serde_json::from_slice::<AccelVerdict>(&text)
            && verdict.host_kernel == host_kernel
            && verdict.qemu == qemu
        {
            return Ok(verdict);
        }
        let probe = VmSpec {
            memory_mib: spec.memory_mib.min(1024),
            vcpus: 1,
            ..spec.clone()
        };
        let (kvm, reason) = match self.boot(&probe, Accel::Kvm, KVM_PROBE_TIMEOUT).await {
            Ok(vm) => {
                let _ = vm.release().await;
                (true, "a KVM probe boot reached the guest agent".to_owned())
            }
            Err(e @ VmError::Unavailable { .. }) => return Err(e),
            Err(e) => {
                let first = e.to_string();
                let first = first.lines().next().unwrap_or("").to_owned();
                (
                    false,
                    format!(
                        "/dev/kvm exists but a KVM probe boot did not reach the agent ({first})"
                    ),
                )
            }
        };
        let verdict = AccelVerdict {
            host_kernel,
            qemu,
            kvm,
            reason,
        };
        if let Ok(json) = serde_json::to_vec_pretty(&verdict) {
            let _ = tokio::fs::create_dir_all(&self.config.data_dir).await;
            let _ = tokio::fs::write(&cache, json).await;
        }
        Ok(verdict)
    }

    /// Boots one VM with a fixed accelerator.
    async fn boot(
        &self,
        spec: &VmSpec,
        accel: Accel,
        timeout: Duration,
    ) -> Result<QemuVm, VmError> {
        let started = Instant::now();
        let data_dir = self.config.data_dir.clone();
        let name = spec.image.clone();
        let image = tokio::task::spawn_blocking(move || image::open(&data_dir, &name))
            .await
            .map_err(|e| unavailable(format!("opening the image failed: {e}")))?
            .map_err(|e| match e {
                ImageError::NotFound { name, .. } => unavailable(format!(
                    "the guest image `{name}` is not built; run `kiln image build {name}`"
                )),
                other => unavailable(format!(
                    "the guest image `{}` is unusable: {other}",
                    spec.image
                )),
            })?;
        let id = format!("qemu-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = self.config.runtime_dir.join(&id);
        let vm_dir = VmDir::create(&id, &dir).await?;
        let (mut process, root) = start_qemu(&self.config, &image, spec, accel, &id, &dir).await?;
        match self
            .connect(&id, &dir, &mut process, started + timeout, timeout)
            .await
        {
            Ok((client, qmp)) => {
                let vm = QemuVm {
                    meta: snapshot::Meta::new(spec, accel, &self.config, &image),
                    id: id.clone(),
                    dir: vm_dir.keep(),
                    client,
                    qmp: Mutex::new(Some(qmp)),
                    process,
                    released: AtomicBool::new(false),
                    accel,
                    top: std::sync::Mutex::new((dir.join("disk.qcow2"), 0)),
                };
                vm.prepare(root, spec.disk_mib).await?;
                Ok(vm)
            }
            Err(reason) => {
                // A QEMU that died by itself (e.g. KVM refused the CPU) explains more than the
                // broken socket that revealed it.
                let reason = if process.wait_for(Duration::from_millis(300)).await {
                    let status = process.exit_status().unwrap_or_default();
                    format!("QEMU exited before the agent answered ({status})")
                } else {
                    reason
                };
                process.kill_and_wait().await;
                let tail = console_tail(&dir.join("console.log"));
                Err(VmError::Boot {
                    vm: id,
                    reason: format!("{reason}\n--- guest console (last lines) ---\n{tail}"),
                })
            }
        }
    }

    /// Connects QMP and the agent before `deadline`, or says why not.
    async fn connect(
        &self,
        id: &str,
        dir: &Path,
        process: &mut Process,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(GuestClient, Qmp), String> {
        let work = async {
            let qmp_path = dir.join("qmp.sock");
            let agent_path = dir.join("agent.sock");
            wait_for_socket(&qmp_path).await;
            let qmp = Qmp::connect(&qmp_path, Duration::from_secs(10))
                .await
                .map_err(|e| format!("QMP: {e}"))?;
            wait_for_socket(&agent_path).await;
            let stream = connect_unix(&agent_path)
                .await
                .map_err(|e| format!("connecting to the agent socket: {e}"))?;
            let (reader, writer) = stream.into_split();
            let mut options = ConnectOptions::new(id);
            options.hostname = Some(id.to_owned());
            // The boot deadline below ends the wait; this only keeps the client from giving up
            // first with a less telling message.
            options.hello_timeout =
                deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
            let client = GuestClient::connect_with(reader, writer, options)
                .await
                .map_err(|e| e.into_vm_error(id).to_string())?;
            Ok::<_, String>((client, qmp))
        };
        tokio::select! {
            result = tokio::time::timeout_at(deadline.into(), work) => match result {
                Ok(inner) => inner,
                Err(_) => Err(format!("the guest agent did not answer within {timeout:?} (boot timeout)")),
            },
            status = process.exited() => Err(format!("QEMU exited before the agent answered ({status})")),
        }
    }
}

#[async_trait]
impl VmProvider for QemuProvider {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn isolates(&self) -> bool {
        true
    }

    async fn allocate(&self, spec: &VmSpec) -> Result<Allocation, VmError> {
        let started = Instant::now();
        let (accel, _) = self.resolve_accel(spec).await?;
        let vm = self.boot(spec, accel, self.config.boot_timeout).await?;
        tracing::debug!(vm = %vm.id, %accel, "QEMU VM ready");
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

fn unavailable(reason: impl Into<String>) -> VmError {
    VmError::Unavailable {
        backend: "qemu",
        reason: reason.into(),
    }
}

/// Identifies the QEMU binary for the verdict cache: its path, size and modification time.
fn qemu_identity(binary: &Path) -> String {
    let path = if binary.components().count() > 1 {
        Some(binary.to_owned())
    } else {
        binary.to_str().and_then(image::find_in_path)
    };
    match path
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok().map(|m| (p, m)))
    {
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

async fn wait_for_socket(path: &Path) {
    while !path.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects to a socket QEMU serves. QEMU creates the socket file (bind) a moment before it
/// listens, so a connection refused right after the file appears is retried; the caller's
/// deadline bounds the wait.
pub(crate) async fn connect_unix(path: &Path) -> std::io::Result<UnixStream> {
    loop {
        match UnixStream::connect(path).await {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

/// The last lines of the guest console. A kernel panic or oops further up than that is put first,
/// since it is what explains a dead guest and its backtrace pushes it out of the tail.
pub(crate) fn console_tail(path: &Path) -> String {
    const TAIL_BYTES: u64 = 16384;
    const TAIL_LINES: usize = 25;
    let Ok(mut file) = std::fs::File::open(path) else {
        return "(no console output)".to_owned();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut data = Vec::new();
    let _ = file.read_to_end(&mut data);
    let text = String::from_utf8_lossy(&data);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    let mut tail = String::new();
    let cause = lines[..start].iter().rev().find(|l| {
        ["Kernel panic", "BUG:", "Oops", "sysrq: Trigger a crash"]
            .iter()
            .any(|k| l.contains(k))
    });
    if let Some(cause) = cause {
        tail.push_str(cause);
        tail.push_str("\n[...]\n");
    }
    tail.push_str(&lines[start..].join("\n"));
    if tail.trim().is_empty() {
        "(no console output)".to_owned()
    } else {
        tail
    }
}

/// The file in a per-VM directory naming the pid of the kiln process that owns the VM.
const OWNER_FILE: &str = "owner";

/// Removes per-VM directories whose owning kiln process is gone (it was killed before it could
/// clean up). Their QEMU died with it (`PR_SET_PDEATHSIG`), so only files remain.
fn sweep_orphans(runtime_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(runtime_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_vm_dir = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("qemu-"));
        if !is_vm_dir {
            continue;
        }
        let owner = std::fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw);
        let alive = owner.is_some_and(|pid| {
            rustix::process::test_kill_process(pid).is_ok()
                && std::fs::read_to_string(format!("/proc/{}/status", pid.as_raw_nonzero()))
                    .is_ok_and(|s| {
                        !s.lines()
                            .any(|l| l.starts_with("State:") && l.contains('Z'))
                    })
        });
        // A directory without a readable owner is one being created right now, or not ours.
        if owner.is_some() && !alive {
            tracing::info!(
                "removing {} left by a kiln process that is gone",
                path.display()
            );
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// A per-VM directory that is removed on drop unless kept.
struct VmDir {
    dir: Option<PathBuf>,
}

impl VmDir {
    async fn create(id: &str, dir: &Path) -> Result<VmDir, VmError> {
        use std::os::unix::fs::DirBuilderExt;
        let io = |op: &str, source| VmError::Io {
            vm: id.to_owned(),
            op: format!("{op} {}", dir.display()),
            source,
        };
        if dir.join("agent.sock").as_os_str().len() >= 100 {
            return Err(unavailable(format!(
                "the runtime dir {} is too long for Unix socket paths",
                dir.display()
            )));
        }
        if let Some(parent) = dir.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io("creating the parent of", e))?;
        }
        let path = dir.to_owned();
        tokio::task::spawn_blocking(move || {
            std::fs::DirBuilder::new().mode(0o700).create(&path)?;
            std::fs::write(path.join(OWNER_FILE), std::process::id().to_string())
        })
        .await
        .map_err(|e| io("creating", std::io::Error::other(e)))?
        .map_err(|e| io("creating", e))?;
        Ok(VmDir {
            dir: Some(dir.to_owned()),
        })
    }

    fn keep(mut self) -> PathBuf {
        self.dir.take().unwrap_or_default()
    }
}

impl Drop for VmDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The QEMU process: its pid and a watcher task that reaps it and publishes how it ended.
struct Process {
    pid: Option<rustix::process::Pid>,
    exit: watch::Receiver<Option<String>>,
}

impl Process {
    /// Resolves when QEMU has exited, with its status.
    async fn exited(&self) -> String {
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

    fn exit_status(&self) -> Option<String> {
        self.exit.borrow().clone()
    }

    fn kill(&self) {
        if self.exit_status().is_none()
            && let Some(pid) = self.pid
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }

    async fn wait_for(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.exited()).await.is_ok()
    }

    async fn kill_and_wait(&self) {
        self.kill();
        let _ = self.wait_for(Duration::from_secs(10)).await;
    }
}

async fn start_qemu(
    config: &QemuConfig,
    image: &ImageInfo,
    spec: &VmSpec,
    accel: Accel,
    id: &str,
    dir: &Path,
) -> Result<(Process, RootDisk), VmError> {
    let io = |op: String, source| VmError::Io {
        vm: id.to_owned(),
        op,
        source,
    };
    let overlay = dir.join("disk.qcow2");
    let base = std::path::absolute(image.rootfs())
        .map_err(|e| io("resolving the image path".to_owned(), e))?;
    let base_size = std::fs::metadata(&base)
        .map_err(|e| io(format!("inspecting {}", base.display()), e))?
        .len();
    let wanted = u64::from(spec.disk_mib) << 20;
    let mut qemu_img = tokio::process::Command::new("qemu-img");
    qemu_img
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&overlay);
    let root = if wanted > base_size {
        qemu_img.arg(format!("{}M", spec.disk_mib));
        RootDisk::Grow
    } else if wanted < base_size {
        RootDisk::Reserve {
            mib: (base_size - wanted) >> 20,
        }
    } else {
        RootDisk::AsIs
    };
    let out = qemu_img
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| io("running qemu-img".to_owned(), e))?;
    if !out.status.success() {
        return Err(VmError::Boot {
            vm: id.to_owned(),
            reason: format!(
                "qemu-img create failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let args = qemu_args(config, image, spec, accel, id, dir);
    Ok((spawn_qemu(config, &args, id, dir)?, root))
}

/// How the guest's root file system is made `disk_mib` large at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RootDisk {
    /// The image is exactly that large.
    AsIs,
    /// The overlay is larger than the image: grow the file system into it.
    Grow,
    /// The image is larger: reserve this many MiB of it.
    Reserve {
        /// MiB.
        mib: u64,
    },
}

/// The file that takes up the part of a larger image that is beyond the disk quota.
const DISK_RESERVE: &str = "/var/lib/kiln-disk-reserve";

/// Starts QEMU with `args` in the per-VM directory `dir`, with a task that reaps it.
fn spawn_qemu(
    config: &QemuConfig,
    args: &[String],
    id: &str,
    dir: &Path,
) -> Result<Process, VmError> {
    let io = |op: String, source| VmError::Io {
        vm: id.to_owned(),
        op,
        source,
    };
    let mut cmd = tokio::process::Command::new(&config.binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(dir.join("qemu.log"))
                .map_err(|e| io("creating qemu.log".to_owned(), e))?,
        )
        .kill_on_drop(true);
    // QEMU runs in the per-VM directory, so anything it leaves (a core file) is removed with it.
    cmd.current_dir(dir);
    // SAFETY: prctl and setrlimit are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
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
        .map_err(|e| io(format!("starting {}", config.binary.display()), e))?;
    let pid = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32));
    let (tx, rx) = watch::channel(None);
    let log = dir.join("qemu.log");
    tokio::spawn(async move {
        let status = match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        let stderr = stderr.trim();
        let status = if stderr.is_empty() {
            status
        } else {
            format!("{status}; QEMU said: {stderr}")
        };
        let _ = tx.send(Some(status));
    });
    Ok(Process { pid, exit: rx })
}

/// The QEMU command line (everything after the binary).
fn qemu_args(
    config: &QemuConfig,
    image: &ImageInfo,
    spec: &VmSpec,
    accel: Accel,
    id: &str,
    dir: &Path,
) -> Vec<String> {
    let path = |name: &str| dir.join(name).display().to_string();
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| (*s).to_owned()));
    push(&["-name", id]);
    push(&[
        "-M",
        "microvm,acpi=on,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=on",
    ]);
    match accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // TCG's translation cache defaults to 1 GiB and fills with time: capped at 128 MiB, an
        // idle VM's QEMU stays ~200 MiB smaller with no measurable cost in exec latency.
        _ => push(&["-accel", "tcg,thread=multi,tb-size=128", "-cpu", "max"]),
    }
    let memory = format!("{}M", spec.memory_mib.max(128));
    let vcpus = spec.vcpus.max(1).to_string();
    push(&["-m", &memory, "-smp", &vcpus]);
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    let kernel = image.kernel().display().to_string();
    let initrd = image.initramfs().display().to_string();
    push(&["-kernel", &kernel, "-initrd", &initrd]);
    let cmdline = kernel_cmdline(accel, config.network);
    push(&["-append", &cmdline]);
    let console = format!("file,id=console,path={}", path("console.log"));
    push(&["-chardev", &console, "-serial", "chardev:console"]);
    let drive = format!(
        "id=root,file={},format=qcow2,if=none,cache=unsafe,discard=unmap",
        path("disk.qcow2")
    );
    push(&["-drive", &drive, "-device", "virtio-blk-device,drive=root"]);
    let agent = format!(
        "socket,id=agent,path={},server=on,wait=off",
        path("agent.sock")
    );
    push(&["-chardev", &agent, "-device", "virtio-serial-device"]);
    push(&["-device", "virtserialport,chardev=agent,name=kiln.agent"]);
    push(&["-object", "rng-random,id=rng,filename=/dev/urandom"]);
    push(&["-device", "virtio-rng-device,rng=rng"]);
    if config.network == Network::User {
        push(&[
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-device,netdev=net0",
        ]);
    }
    let qmp = format!("unix:{},server=on,wait=off", path("qmp.sock"));
    push(&["-qmp", &qmp]);
    args
}

/// The guest kernel command line.
///
/// `panic=-1 reboot=t` makes a guest panic reset the machine at once by a triple fault (microvm
/// has no keyboard controller, and its ACPI has no reset register), and `-no-reboot` turns that
/// reset into QEMU exiting: a dead guest is noticed at once instead of hanging.
///
/// microvm has neither HPET nor ACPI PM timer, so a guest under TCG cannot calibrate its TSC
/// against anything and hangs after "Marking TSC unstable". TCG's guest TSC is the host's TSC, so
/// kiln tells the guest its frequency (`tsc_early_khz`, measured on the host) and that it is
/// reliable.
///
/// With user-mode networking the agent configures the guest statically from `kiln.net=` (QEMU's
/// NAT: guest 10.0.2.15/24, host and gateway 10.0.2.2, DNS 10.0.2.3).
fn kernel_cmdline(accel: Accel, network: Network) -> String {
    let mut cmdline = String::from(
        "console=ttyS0 kiln.root=/dev/vda quiet panic=-1 reboot=t 8250.nr_uarts=1 i8042.noaux i8042.nokbd",
    );
    if network == Network::User {
        cmdline.push_str(" kiln.net=10.0.2.15/24,10.0.2.2,10.0.2.3");
    }
    if accel != Accel::Kvm {
        let khz = host_tsc_khz();
        // `lpj` spares each secondary vCPU a delay-loop calibration that fails under TCG after
        // ~0.7 s; it assumes Debian's HZ=250 (a wrong guess only skews udelay).
        cmdline.push_str(&format!(
            " tsc_early_khz={khz} tsc=reliable no_timer_check lpj={}",
            khz * 1000 / 250
        ));
    }
    cmdline
}

/// The host's TSC frequency in kHz, measured once against the monotonic clock over 50 ms.
fn host_tsc_khz() -> u64 {
    static KHZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        #[allow(unused_unsafe)]
        // SAFETY: RDTSC has no preconditions on x86_64.
        let read = || unsafe { core::arch::x86_64::_rdtsc() };
        let (t0, c0) = (Instant::now(), read());
        std::thread::sleep(Duration::from_millis(50));
        let (t1, c1) = (Instant::now(), read());
        let nanos = (t1 - t0).as_nanos().max(1) as u64;
        (c1.wrapping_sub(c0)).saturating_mul(1_000_000) / nanos
    })
}

/// A running QEMU VM.
pub struct QemuVm {
    /// What was allocated, as a snapshot of this VM records it.
    meta: snapshot::Meta,
    id: String,
    dir: PathBuf,
    client: GuestClient,
    qmp: Mutex<Option<Qmp>>,
    process: Process,
    released: AtomicBool,
    accel: Accel,
    /// The disk file the VM writes now, and how many checkpoints it has taken: each checkpoint
    /// freezes the current file and starts a new one on top (see `snapshot`).
    top: std::sync::Mutex<(PathBuf, u32)>,
}

impl fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuVm")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("accel", &self.accel)
            .finish()
    }
}

impl QemuVm {
    /// The per-VM directory on the host.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// QEMU's process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.process
            .exit_status()
            .is_none()
            .then(|| self.process.pid.map(|p| p.as_raw_nonzero().get()))?
    }

    /// The accelerator this VM runs with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The guest agent client.
    pub fn guest(&self) -> &GuestClient {
        &self.client
    }

    /// Creates the work root, owned by the runner user when the image has one, and makes the
    /// root file system `disk_mib` large (see the module doc).
    async fn prepare(&self, root: RootDisk, disk_mib: u32) -> Result<(), VmError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut script = format!(
            "mkdir -p {WORK_ROOT} && (chown {user}:{user} {WORK_ROOT} 2>/dev/null || true)",
            user = image::RUNNER_USER
        );
        match root {
            RootDisk::AsIs => {}
            RootDisk::Grow => script.push_str(" && resize2fs /dev/vda >/dev/null"),
            RootDisk::Reserve { mib } => script.push_str(&format!(
                " && fallocate -l {mib}MiB {DISK_RESERVE} && chmod 0 {DISK_RESERVE} \
                 && (chattr +i {DISK_RESERVE} 2>/dev/null || true)"
            )),
        }
        let request = ExecRequest {
            command: crate::Command::Argv(vec!["/bin/sh".into(), "-c".into(), script]),
            env: Vec::new(),
            cwd: Some("/".to_owned()),
            timeout: Some(Duration::from_secs(30)),
            user: ExecUser::Root,
        };
        let outcome = self.client.exec(request, tx).await?;
        if !outcome.status.success() {
            let mut stderr = Vec::new();
            while let Ok(chunk) = rx.try_recv() {
                stderr.extend_from_slice(&chunk.data);
            }
            let stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
            let reason = match root {
                RootDisk::Reserve { .. } if stderr.contains("fallocate") => format!(
                    "disk_mib = {disk_mib} is less than the image's files take \
                     ({stderr}); raise disk_mib"
                ),
                _ => format!(
                    "preparing the guest's disk and {WORK_ROOT} failed ({}): {stderr}",
                    outcome.status
                ),
            };
            return Err(VmError::Boot {
                vm: self.id.clone(),
                reason,
            });
        }
        Ok(())
    }

    fn check(&self) -> Result<(), VmError> {
        if self.released.load(Ordering::SeqCst) {
            Err(VmError::Released {
                vm: self.id.clone(),
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

    /// Adds QEMU's exit status and the console tail to an error when the VM died.
    async fn explain(&self, error: VmError) -> VmError {
        if self.released.load(Ordering::SeqCst) || matches!(error, VmError::Released { .. }) {
            return error;
        }
        // The channel usually closes a moment before the process is reaped.
        if !self.process.wait_for(Duration::from_millis(500)).await {
            return error;
        }
        let status = self.process.exit_status().unwrap_or_default();
        let error = match error {
            VmError::Guest { message, .. } => message,
            other => other.to_string(),
        };
        VmError::Guest {
            vm: self.id.clone(),
            message: format!(
                "{error}; the VM died (QEMU: {status})\n--- guest console (last lines) ---\n{}",
                console_tail(&self.dir.join("console.log"))
            ),
        }
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn id(&self) -> &str {
        &self.id
    }

    fn backend(&self) -> &'static str {
        "qemu"
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

    async fn exec_pty(&self, mut request: PtyRequest) -> Result<PtySession, VmError> {
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
        if self.released.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if self.process.exit_status().is_none() {
            let _ = tokio::time::timeout(RELEASE_STEP, self.client.shutdown()).await;
            if !self.process.wait_for(RELEASE_STEP).await {
                if let Some(qmp) = self.qmp.lock().await.as_mut() {
                    let _ = tokio::time::timeout(RELEASE_STEP, qmp.quit()).await;
                }
                if !self.process.wait_for(RELEASE_STEP).await {
                    self.process.kill();
                    self.process.wait_for(Duration::from_secs(10)).await;
                }
            }
        }
        self.qmp.lock().await.take();
        let dir = self.dir.clone();
        let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        removed.map_err(|source| VmError::Io {
            vm: self.id.clone(),
            op: format!("removing {}", self.dir.display()),
            source,
        })?;
        if self.process.exit_status().is_none() {
            return Err(VmError::Io {
                vm: self.id.clone(),
                op: "stopping QEMU".to_owned(),
                source: std::io::Error::other("QEMU did not exit after SIGKILL"),
            });
        }
        Ok(())
    }

    async fn snapshot(&self, dest: &Path) -> Result<crate::VmSnapshot, VmError> {
        self.save(dest).await
    }

    async fn checkpoint(&self, dest: &Path) -> Result<crate::VmSnapshot, VmError> {
        self.checked(self.live_save(dest).await).await
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if !self.released.swap(true, Ordering::SeqCst) {
            self.process.kill();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path) -> ImageInfo {
        ImageInfo {
            dir: dir.to_owned(),
            manifest: image::Manifest {
                format: 1,
                name: "default".into(),
                recipe_hash: String::new(),
                rootfs_hash: String::new(),
                source: "build".into(),
                suite: "bookworm".into(),
                mirror: String::new(),
                kernel_version: "6.1.0".into(),
                vmlinux: false,
                modules: Vec::new(),
                packages: Vec::new(),
                sizes: image::Sizes::default(),
                created_at: String::new(),
                build_seconds: 0.0,
            },
        }
    }

    #[test]
    fn command_line_follows_spec_accel_and_network() {
        let mut config = QemuConfig::new("/run/k".into(), "/data".into());
        let spec = VmSpec {
            vcpus: 3,
            memory_mib: 1536,
            ..VmSpec::default()
        };
        let img = image(Path::new("/data/images/default"));
        let args = qemu_args(
            &config,
            &img,
            &spec,
            Accel::Tcg,
            "qemu-x",
            Path::new("/run/k/qemu-x"),
        );
        let line = args.join(" ");
        assert!(line.contains("-M microvm"), "{line}");
        assert!(line.contains("-accel tcg"), "{line}");
        assert!(line.contains("-m 1536M -smp 3"), "{line}");
        assert!(
            line.contains("-kernel /data/images/default/vmlinuz"),
            "{line}"
        );
        assert!(line.contains("kiln.root=/dev/vda"), "{line}");
        assert!(
            line.contains("virtserialport,chardev=agent,name=kiln.agent"),
            "{line}"
        );
        assert!(line.contains("path=/run/k/qemu-x/agent.sock"), "{line}");
        assert!(line.contains("-netdev user"), "{line}");
        assert!(
            line.contains("kiln.net=10.0.2.15/24,10.0.2.2,10.0.2.3"),
            "{line}"
        );
        config.network = Network::None;
        let args = qemu_args(
            &config,
            &img,
            &spec,
            Accel::Kvm,
            "qemu-x",
            Path::new("/run/k/qemu-x"),
        );
        let line = args.join(" ");
        assert!(line.contains("-accel kvm -cpu host"), "{line}");
        assert!(!line.contains("netdev"), "{line}");
        assert!(!line.contains("tsc_early_khz"), "{line}");
        assert!(!line.contains("kiln.net"), "{line}");
    }

    #[test]
    fn tsc_frequency_is_plausible() {
        let khz = host_tsc_khz();
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
    }

    #[test]
    fn directories_of_dead_owners_are_swept() {
        let runtime = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let make = |name: &str, owner: Option<String>| {
            let dir = runtime.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("console.log"), "x").unwrap();
            if let Some(owner) = owner {
                std::fs::write(dir.join(OWNER_FILE), owner).unwrap();
            }
        };
        make("qemu-dead", Some(dead.to_string()));
        make("qemu-mine", Some(std::process::id().to_string()));
        make("qemu-new", None);
        make("other", Some(dead.to_string()));
        sweep_orphans(runtime.path());
        let mut left: Vec<String> = std::fs::read_dir(runtime.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["other", "qemu-mine", "qemu-new"]);
    }

    #[test]
    fn settings_parse() {
        assert_eq!("tcg".parse::<Accel>(), Ok(Accel::Tcg));
        assert!("xen".parse::<Accel>().is_err());
        assert_eq!("none".parse::<Network>(), Ok(Network::None));
    }

    #[test]
    fn console_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        assert_eq!(console_tail(&path), "(no console output)");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = console_tail(&path);
        assert!(tail.ends_with("line 99"));
        assert!(!tail.contains("line 74\n"));
        let mut text =
            String::from("boot\n[ 1.0] Kernel panic - not syncing: sysrq triggered crash\n");
        text.extend((0..60).map(|i| format!(" trace {i}\n")));
        std::fs::write(&path, text).unwrap();
        let tail = console_tail(&path);
        assert!(tail.starts_with("[ 1.0] Kernel panic"), "{tail}");
        assert!(tail.ends_with("trace 59"), "{tail}");
    }
}
