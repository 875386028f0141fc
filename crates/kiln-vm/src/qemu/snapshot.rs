//! Snapshots of QEMU VMs: a whole VM saved to files, and fresh VMs started from them.
//!
//! # Format
//! A snapshot is one directory:
//! - `state`: QEMU's migration stream (device state and the RAM pages that are not zero),
//!   written by QMP `migrate` to `exec:cat > state` while the VM is stopped;
//! - `disk.qcow2`: the VM's writable layer as it was when it stopped (a qcow2 backed by the
//!   image's read-only rootfs). Nothing writes it again: restored VMs stack their own layer on it;
//! - `snapshot.json`: the [`VmSpec`], accelerator and network, and the QEMU binary and image
//!   recipe the snapshot belongs to. A restore refuses a snapshot whose QEMU or image changed.
//!
//! # Why migration to a file, not `savevm`/`loadvm`
//! `savevm` writes the RAM into the qcow2 itself (an internal snapshot), and `loadvm` only loads
//! from the top image: every restore would first copy the whole qcow2 with its RAM, and two VMs
//! could never share one saved state. Migration to a file keeps the state and the disk apart:
//! a restore creates an empty overlay over the frozen `disk.qcow2` (no copy) and streams the
//! state in with `-incoming`; any number of VMs restore from the same files at once. The
//! stream holds only the RAM pages the guest touched (zero pages are a flag each), so for a
//! freshly booted guest it is small whatever the memory size.
//!
//! # Save
//! QMP `stop`; lift the migration bandwidth cap (32 MiB/s by default); `migrate` to the file;
//! poll `query-migrate` until `completed`; `quit`; move the overlay into the snapshot. The VM is
//! spent afterwards: only its release remains.
//!
//! # Restore
//! 1. A new per-VM directory and id; an overlay backed by the snapshot's `disk.qcow2`.
//! 2. QEMU with the snapshot's machine (same devices, memory and vCPUs) and `-incoming defer`.
//! 3. The agent socket is connected *before* the state is loaded, so the guest's virtio-serial
//!    port never sees its host go away: the agent wakes up idle inside the connection that was
//!    open when the VM was saved.
//! 4. QMP `migrate-incoming exec:cat state`, then `cont` once it is loaded (QEMU restores the
//!    saved run state, which is stopped).
//! 5. The new host greets the agent again (`Hello` with the new VM id as hostname and the
//!    host's clock; the agent answers a second hello like the first), so a restored guest
//!    never keeps the identity, or the stale clock, of the VM that was saved.
//!
//! A restore that fails (QEMU exits, the load fails, the agent does not answer) is a
//! [`VmError::Boot`] and leaves nothing behind.
//!
//! # Checkpoints (live snapshots, `--snapshots steps`)
//! [`Vm::checkpoint`] saves a VM that then runs on. With the VM stopped:
//! 1. QMP `blockdev-snapshot-sync` freezes the disk file the VM writes and puts a new, empty
//!    qcow2 layer on top of it (backed by the frozen one); new writes go there;
//! 2. the memory and devices are written to `state` by migration, as for a save;
//! 3. `cont` resumes the VM (and takes its disks back from the finished migration).
//!
//! The frozen layer then moves into the snapshot as `disk.qcow2`, and QMP
//! `change-backing-file` points the new layer's header at that path (QEMU keeps the file it has
//! open). So each checkpoint's disk is only what changed since the one before: a diff, chained
//! to the previous checkpoint, down to the image (or the ready snapshot the VM came from). Such
//! a snapshot is marked `chained`: deleting it removes its state but keeps the disk layer,
//! which later checkpoints need; removing the run's snapshot directory removes the chain.
//! Restoring one is a restore like any other: the new VM's overlay is backed by the chain.
//!
//! # The ready snapshot
//! [`QemuProvider::ready`] keeps one snapshot per image, spec, accelerator, network and QEMU
//! binary in `<image dir>/snapshots/ready-<key>/`: a VM booted until its agent answered and its
//! work root exists, then saved. It is created on first use, in a temporary directory renamed
//! into place, so concurrent kiln processes never see half of one; a process-wide lock keeps
//! one process from creating it twice. It is stored with the image, and a rebuilt image (a new
//! recipe hash) gets a new key.
//!
//! # Known limit
//! Restored guests start with the same kernel RNG state. The virtio-rng device keeps feeding
//! the guest's pool, but a reseed at restore (Linux's vmgenid) is not wired up: microvm has no
//! ACPI table loader for the vmgenid device.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::{
    Accel, Network, QemuConfig, QemuProvider, QemuVm, VmDir, connect_unix, console_tail, qemu_args,
    qemu_identity, spawn_qemu, unavailable, wait_for_socket,
};
use crate::guest::{ConnectOptions, GuestClient};
use crate::image::{self, ImageError, ImageInfo};
use crate::{Allocation, Vm, VmError, VmSnapshot, VmSpec};

/// Version of the snapshot directory layout; part of the ready snapshot's key.
const FORMAT: u32 = 1;
const STATE: &str = "state";
const DISK: &str = "disk.qcow2";
const META: &str = "snapshot.json";

/// How long saving the state may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Keeps one process from creating the same ready snapshot twice at once.
static CREATING: Mutex<()> = Mutex::const_new(());

/// `snapshot.json`: what a VM is, as far as restoring it is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Meta {
    format: u32,
    vm_type: String,
    image: String,
    vcpus: u32,
    memory_mib: u32,
    disk_mib: u32,
    accel: Accel,
    network: String,
    qemu: String,
    recipe_hash: String,
    /// A checkpoint: its disk is one layer of a chain (later checkpoints of the same VM build on
    /// it), so deleting the snapshot leaves the disk file. Left out when false, which keeps the
    /// ready snapshots' keys as they were.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    chained: bool,
}

impl Meta {
    /// A VM of `spec` booted with `accel` by a provider with `config` from `image`.
    pub(super) fn new(spec: &VmSpec, accel: Accel, config: &QemuConfig, image: &ImageInfo) -> Meta {
        Meta {
            format: FORMAT,
            vm_type: spec.vm_type.clone(),
            image: spec.image.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            accel,
            network: network_name(config.network).to_owned(),
            qemu: qemu_identity(&config.binary),
            recipe_hash: image.manifest.recipe_hash.clone(),
            chained: false,
        }
    }

    fn spec(&self) -> VmSpec {
        VmSpec {
            vm_type: self.vm_type.clone(),
            image: self.image.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_mib: self.disk_mib,
        }
    }
}

fn network_name(network: Network) -> &'static str {
    match network {
        Network::User => "user",
        Network::None => "none",
    }
}

/// Opens the image of a VM, mapping errors as allocation does.
async fn open_image(data_dir: &Path, name: &str) -> Result<ImageInfo, VmError> {
    let data_dir = data_dir.to_owned();
    let owned = name.to_owned();
    tokio::task::spawn_blocking(move || image::open(&data_dir, &owned))
        .await
        .map_err(|e| unavailable(format!("opening the image failed: {e}")))?
        .map_err(|e| match e {
            ImageError::NotFound { name, .. } => unavailable(format!(
                "the guest image `{name}` is not built; run `kiln image build {name}`"
            )),
            other => unavailable(format!("the guest image `{name}` is unusable: {other}")),
        })
}

/// The sum of the sizes of the files directly in `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// `path` quoted for `/bin/sh` (QEMU runs `exec:` URIs with it).
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

fn read_meta(dir: &Path) -> Result<Meta, String> {
    let text = std::fs::read(dir.join(META)).map_err(|e| format!("reading {META}: {e}"))?;
    let meta: Meta = serde_json::from_slice(&text).map_err(|e| format!("parsing {META}: {e}"))?;
    if meta.format != FORMAT {
        return Err(format!("snapshot format {} is not {FORMAT}", meta.format));
    }
    Ok(meta)
}

/// The ready snapshot's directory name for this image, spec, accelerator and QEMU.
fn ready_key(meta: &Meta) -> String {
    let mut hasher = Sha256::new();
    hasher.update(
        serde_json::to_vec(meta).expect("a Meta always serializes (plain strings and numbers)"),
    );
    let digest = hasher.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("ready-{hex}")
}

/// Deletes a snapshot's directory; a missing one is not an error. Of a checkpoint only the
/// state and `snapshot.json` go: its disk layer may be the backing file of later checkpoints
/// (or of the VM still running), so it stays until its whole directory tree is removed.
pub(super) async fn delete(snapshot: &VmSnapshot) -> Result<(), VmError> {
    let dir = snapshot.dir.clone();
    let result = tokio::task::spawn_blocking(move || {
        let gone = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        if read_meta(&dir).is_ok_and(|meta| meta.chained) {
            gone(std::fs::remove_file(dir.join(STATE)))?;
            gone(std::fs::remove_file(dir.join(META)))
        } else {
            gone(std::fs::remove_dir_all(&dir))
        }
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    result.map_err(|source| VmError::Io {
        vm: "-".to_owned(),
        op: format!("deleting the snapshot {}", snapshot.dir.display()),
        source,
    })
}

impl QemuVm {
    /// Saves this VM under `dest` (see the module docs) and stops it.
    pub(super) async fn save(&self, dest: &Path) -> Result<VmSnapshot, VmError> {
        self.check()?;
        let io = |op: String, source| VmError::Io {
            vm: self.id.clone(),
            op,
            source,
        };
        let failed = |reason: String| VmError::Guest {
            vm: self.id.clone(),
            message: format!("Saving a snapshot failed: {reason}"),
        };
        tokio::fs::create_dir(dest)
            .await
            .map_err(|e| io(format!("creating {}", dest.display()), e))?;
        let state = dest.join(STATE);
        {
            let mut slot = self.qmp.lock().await;
            let qmp = slot
                .as_mut()
                .ok_or_else(|| failed("QMP is not connected".to_owned()))?;
            let qmp_err = |e: super::qmp::QmpError| failed(e.to_string());
            qmp.execute("stop", None).await.map_err(qmp_err)?;
            qmp.execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": 1u64 << 40 })),
            )
            .await
            .map_err(qmp_err)?;
            let uri = format!("exec:cat > {}", shell_quote(&state));
            qmp.execute("migrate", Some(json!({ "uri": uri })))
                .await
                .map_err(qmp_err)?;
            let deadline = Instant::now() + SAVE_TIMEOUT;
            loop {
                let status = qmp.execute("query-migrate", None).await.map_err(qmp_err)?;
                match status["status"].as_str().unwrap_or("") {
                    "completed" => break,
                    "failed" | "cancelled" => {
                        let desc = status["error-desc"].as_str().unwrap_or("no reason given");
                        return Err(failed(format!("QEMU's migration failed: {desc}")));
                    }
                    _ if Instant::now() > deadline => {
                        return Err(failed(format!(
                            "the state was not saved within {SAVE_TIMEOUT:?}"
                        )));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            let _ = qmp.quit().await;
        }
        if !self.process.wait_for(Duration::from_secs(10)).await {
            self.process.kill_and_wait().await;
        }
        let top = self.top_disk();
        tokio::fs::rename(&top, dest.join(DISK))
            .await
            .map_err(|e| io(format!("moving the disk into {}", dest.display()), e))?;
        let json = serde_json::to_vec_pretty(&self.meta)
            .expect("a Meta always serializes (plain strings and numbers)");
        tokio::fs::write(dest.join(META), json)
            .await
            .map_err(|e| io(format!("writing {}", dest.join(META).display()), e))?;
        Ok(VmSnapshot {
            backend: "qemu",
            dir: dest.to_owned(),
            spec: self.meta.spec(),
            size_bytes: dir_size(dest),
        })
    }
}

impl QemuVm {
    /// The disk file the VM writes now.
    fn top_disk(&self) -> std::path::PathBuf {
        self.top
            .lock()
            .expect("the disk-layer lock is never held across a panic")
            .0
            .clone()
    }

    /// A checkpoint: saves this VM under `dest` and lets it run on (see the module docs).
    pub(super) async fn live_save(&self, dest: &Path) -> Result<VmSnapshot, VmError> {
        self.check()?;
        let started = Instant::now();
        let io = |op: String, source| VmError::Io {
            vm: self.id.clone(),
            op,
            source,
        };
        let failed = |reason: String| VmError::Guest {
            vm: self.id.clone(),
            message: format!("Taking a live snapshot failed: {reason}"),
        };
        let dest = std::path::absolute(dest)
            .map_err(|e| io(format!("resolving {}", dest.display()), e))?;
        tokio::fs::create_dir(&dest)
            .await
            .map_err(|e| io(format!("creating {}", dest.display()), e))?;
        let (frozen, layers) = self
            .top
            .lock()
            .expect("the disk-layer lock is never held across a panic")
            .clone();
        let next = self.dir.join(format!("disk-{}.qcow2", layers + 1));
        let node = format!("layer{}", layers + 1);
        let state = dest.join(STATE);
        let mut slot = self.qmp.lock().await;
        let qmp = slot
            .as_mut()
            .ok_or_else(|| failed("QMP is not connected".to_owned()))?;
        let qmp_err = |e: super::qmp::QmpError| failed(e.to_string());
        qmp.execute("stop", None).await.map_err(qmp_err)?;
        // While the VM is stopped: freeze the disk (new writes go to a new layer on top), then
        // write the memory and devices. Both are the state of this one moment.
        let saved = async {
            qmp.execute(
                "blockdev-snapshot-sync",
                Some(json!({
                    "device": "root",
                    "snapshot-file": next,
                    "snapshot-node-name": node,
                    "format": "qcow2",
                })),
            )
            .await
            .map_err(qmp_err)?;
            *self
                .top
                .lock()
                .expect("the disk-layer lock is never held across a panic") =
                (next.clone(), layers + 1);
            migrate_to_file(qmp, &state).await.map_err(failed)
        }
        .await;
        // Whatever happened, the VM runs on (`cont` also takes its disks back from the
        // finished migration).
        let resumed = qmp.execute("cont", None).await.map_err(qmp_err);
        let frozen_now = self.top_disk() != frozen;
        let result = saved.and(resumed);
        if let Err(e) = result {
            drop(slot);
            if !frozen_now {
                let _ = tokio::fs::remove_dir_all(&dest).await;
            }
            return Err(e);
        }
        // The frozen layer moves into the snapshot, and the new layer's header learns where its
        // backing file went (QEMU keeps reading the file it has open).
        let disk = dest.join(DISK);
        if let Err(e) = move_file(&frozen, &disk).await {
            return Err(io(format!("moving the disk into {}", dest.display()), e));
        }
        if let Err(e) = qmp
            .execute(
                "change-backing-file",
                Some(json!({
                    "device": "root",
                    "image-node-name": node,
                    "backing-file": disk,
                })),
            )
            .await
        {
            let _ = move_file(&disk, &frozen).await;
            return Err(qmp_err(e));
        }
        drop(slot);
        let meta = Meta {
            chained: true,
            ..self.meta.clone()
        };
        let json = serde_json::to_vec_pretty(&meta)
            .expect("a Meta always serializes (plain strings and numbers)");
        tokio::fs::write(dest.join(META), json)
            .await
            .map_err(|e| io(format!("writing {}", dest.join(META).display()), e))?;
        tracing::debug!(
            vm = %self.id,
            dest = %dest.display(),
            "live snapshot taken in {} ms",
            started.elapsed().as_millis()
        );
        Ok(VmSnapshot {
            backend: "qemu",
            dir: dest.clone(),
            spec: self.meta.spec(),
            size_bytes: dir_size(&dest),
        })
    }
}

/// Writes the stopped VM's memory and devices to `state` with QMP `migrate`, and waits for it.
async fn migrate_to_file(qmp: &mut super::qmp::Qmp, state: &Path) -> Result<(), String> {
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 1u64 << 40 })),
    )
    .await
    .map_err(|e| e.to_string())?;
    let uri = format!("exec:cat > {}", shell_quote(state));
    qmp.execute("migrate", Some(json!({ "uri": uri })))
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + SAVE_TIMEOUT;
    loop {
        let status = qmp
            .execute("query-migrate", None)
            .await
            .map_err(|e| e.to_string())?;
        match status["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let desc = status["error-desc"].as_str().unwrap_or("no reason given");
                return Err(format!("QEMU's migration failed: {desc}"));
            }
            _ if Instant::now() > deadline => {
                return Err(format!("the state was not saved within {SAVE_TIMEOUT:?}"));
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Moves a file, copying it when `to` is on another file system.
async fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    match tokio::fs::rename(from, to).await {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
            tokio::fs::copy(from, to).await?;
            tokio::fs::remove_file(from).await
        }
        Err(e) => Err(e),
    }
}

impl QemuProvider {
    /// The ready snapshot for `spec`, created on first use (see the module docs).
    pub(super) async fn ready(&self, spec: &VmSpec) -> Result<VmSnapshot, VmError> {
        let (accel, _) = self.resolve_accel(spec).await?;
        let image = open_image(&self.config.data_dir, &spec.image).await?;
        let wanted = Meta::new(spec, accel, &self.config, &image);
        let root = image.dir.join("snapshots");
        let dir = root.join(ready_key(&wanted));
        let found = |dir: &Path| {
            read_meta(dir)
                .ok()
                .filter(|meta| *meta == wanted)
                .map(|_| VmSnapshot {
                    backend: "qemu",
                    dir: dir.to_owned(),
                    spec: spec.clone(),
                    size_bytes: dir_size(dir),
                })
        };
        if let Some(snapshot) = found(&dir) {
            return Ok(snapshot);
        }
        let _creating = CREATING.lock().await;
        if let Some(snapshot) = found(&dir) {
            return Ok(snapshot);
        }
        let started = Instant::now();
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(|source| VmError::Io {
                vm: "-".to_owned(),
                op: format!("creating {}", root.display()),
                source,
            })?;
        let vm = self.boot(spec, accel, self.config.boot_timeout).await?;
        let tmp = root.join(format!(".tmp-{}", vm.id));
        let saved = vm.save(&tmp).await;
        let _ = vm.release().await;
        let saved = match saved {
            Ok(saved) => saved,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another kiln process got there first; its snapshot is as good as ours.
            let _ = std::fs::remove_dir_all(&tmp);
            if let Some(snapshot) = found(&dir) {
                return Ok(snapshot);
            }
            return Err(unavailable(format!(
                "cannot store the ready snapshot in {}",
                dir.display()
            )));
        }
        tracing::info!(
            "Created the ready snapshot of image `{}` in {} ms ({} MiB)",
            spec.image,
            started.elapsed().as_millis(),
            saved.size_bytes >> 20
        );
        Ok(VmSnapshot { dir, ..saved })
    }

    /// Restores `snapshot` into a fresh VM (see the module docs).
    pub(super) async fn restore_snapshot(
        &self,
        snapshot: &VmSnapshot,
    ) -> Result<Allocation, VmError> {
        let started = Instant::now();
        let refuse = |reason: String| VmError::Boot {
            vm: "-".to_owned(),
            reason: format!(
                "cannot restore the snapshot {}: {reason}",
                snapshot.dir.display()
            ),
        };
        let meta = read_meta(&snapshot.dir).map_err(refuse)?;
        let image = open_image(&self.config.data_dir, &meta.image).await?;
        if meta.recipe_hash != image.manifest.recipe_hash {
            return Err(refuse(format!(
                "the image `{}` was rebuilt since",
                meta.image
            )));
        }
        if meta.qemu != qemu_identity(&self.config.binary) {
            return Err(refuse("it was saved by another QEMU binary".to_owned()));
        }
        if meta.network != network_name(self.config.network) {
            return Err(refuse(format!(
                "it was saved with network = {}",
                meta.network
            )));
        }
        let spec = meta.spec();
        let accel = meta.accel;
        let id = format!("qemu-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = self.config.runtime_dir.join(&id);
        let vm_dir = VmDir::create(&id, &dir).await?;
        let backing =
            std::path::absolute(snapshot.dir.join(DISK)).map_err(|source| VmError::Io {
                vm: id.clone(),
                op: "resolving the snapshot path".to_owned(),
                source,
            })?;
        let out = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&backing)
            .arg(dir.join(DISK))
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| VmError::Io {
                vm: id.clone(),
                op: "running qemu-img".to_owned(),
                source,
            })?;
        if !out.status.success() {
            return Err(VmError::Boot {
                vm: id,
                reason: format!(
                    "qemu-img create failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        let mut args = qemu_args(&self.config, &image, &spec, accel, &id, &dir);
        args.extend(["-incoming".to_owned(), "defer".to_owned()]);
        let process = spawn_qemu(&self.config, &args, &id, &dir)?;
        let timeout = self.config.boot_timeout;
        let state = snapshot.dir.join(STATE);
        let work = async {
            let qmp_path = dir.join("qmp.sock");
            let agent_path = dir.join("agent.sock");
            wait_for_socket(&qmp_path).await;
            let mut qmp = super::qmp::Qmp::connect(&qmp_path, Duration::from_secs(10))
                .await
                .map_err(|e| format!("QMP: {e}"))?;
            wait_for_socket(&agent_path).await;
            let stream = connect_unix(&agent_path)
                .await
                .map_err(|e| format!("connecting to the agent socket: {e}"))?;
            let uri = format!("exec:cat {}", shell_quote(&state));
            qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
                .await
                .map_err(|e| format!("loading the state: {e}"))?;
            loop {
                let status = qmp
                    .execute("query-status", None)
                    .await
                    .map_err(|e| format!("loading the state: {e}"))?;
                match status["status"].as_str().unwrap_or("") {
                    "running" => break,
                    "inmigrate" | "restore-vm" => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    // The VM was saved stopped, and QEMU restores that run state: resume it.
                    "paused" | "postmigrate" | "prelaunch" => {
                        qmp.execute("cont", None)
                            .await
                            .map_err(|e| format!("resuming the VM: {e}"))?;
                    }
                    other => return Err(format!("the VM is `{other}` after loading the state")),
                }
            }
            let (reader, writer) = stream.into_split();
            let mut options = ConnectOptions::new(&id);
            options.hostname = Some(id.clone());
            options.hello_timeout = timeout;
            let client = GuestClient::connect_with(reader, writer, options)
                .await
                .map_err(|e| e.into_vm_error(&id).to_string())?;
            Ok::<_, String>((client, qmp))
        };
        let connected = tokio::select! {
            result = tokio::time::timeout(timeout, work) => match result {
                Ok(inner) => inner,
                Err(_) => Err(format!("the restored guest agent did not answer within {timeout:?}")),
            },
            status = process.exited() => Err(format!("QEMU exited while restoring ({status})")),
        };
        match connected {
            Ok((client, qmp)) => {
                let vm = QemuVm {
                    meta,
                    id: id.clone(),
                    dir: vm_dir.keep(),
                    client,
                    qmp: Mutex::new(Some(qmp)),
                    process,
                    released: AtomicBool::new(false),
                    accel,
                    top: std::sync::Mutex::new((dir.join(DISK), 0)),
                };
                tracing::debug!(vm = %id, from = %snapshot.dir.display(), "QEMU VM restored");
                Ok(Allocation {
                    vm: std::sync::Arc::new(vm),
                    elapsed: started.elapsed(),
                })
            }
            Err(reason) => {
                process.kill_and_wait().await;
                let tail = console_tail(&dir.join("console.log"));
                Err(VmError::Boot {
                    vm: id,
                    reason: format!(
                        "restoring {} failed: {reason}\n--- guest console (last lines) ---\n{tail}",
                        snapshot.dir.display()
                    ),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            format: FORMAT,
            vm_type: "default".into(),
            image: "default".into(),
            vcpus: 2,
            memory_mib: 2048,
            disk_mib: 8192,
            accel: Accel::Tcg,
            network: "user".into(),
            qemu: "/usr/bin/qemu-system-x86_64 1 2".into(),
            recipe_hash: "abc".into(),
            chained: false,
        }
    }

    #[test]
    fn the_ready_key_changes_with_everything_that_makes_a_snapshot_unusable() {
        let base = ready_key(&meta());
        assert!(base.starts_with("ready-") && base.len() == 22, "{base}");
        assert_eq!(base, ready_key(&meta()));
        let changed = [
            Meta {
                memory_mib: 1024,
                ..meta()
            },
            Meta {
                recipe_hash: "abd".into(),
                ..meta()
            },
            Meta {
                accel: Accel::Kvm,
                ..meta()
            },
            Meta {
                qemu: "other".into(),
                ..meta()
            },
        ];
        for other in changed {
            assert_ne!(base, ready_key(&other), "{other:?}");
        }
    }

    #[test]
    fn meta_round_trips_and_rejects_other_formats() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(META), serde_json::to_vec(&meta()).unwrap()).unwrap();
        assert_eq!(read_meta(dir.path()).unwrap(), meta());
        let old = Meta {
            format: FORMAT + 1,
            ..meta()
        };
        std::fs::write(dir.path().join(META), serde_json::to_vec(&old).unwrap()).unwrap();
        assert!(read_meta(dir.path()).unwrap_err().contains("format"));
        assert!(read_meta(&dir.path().join("none")).is_err());
    }

    #[test]
    fn paths_are_quoted_for_the_shell() {
        assert_eq!(shell_quote(Path::new("/a b/c")), "'/a b/c'");
        assert_eq!(shell_quote(Path::new("/it's")), r"'/it'\''s'");
    }
}
