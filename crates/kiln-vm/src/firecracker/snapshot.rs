//! Snapshots of Firecracker VMs.
//!
//! # Format
//! A snapshot is one directory:
//! - `vmstate`: Firecracker's microVM state (`/snapshot/create` `snapshot_path`);
//! - `memory`: the whole guest memory. Restores map it privately, so any number of VMs restore
//!   from one file at once and none writes it;
//! - `scratch.ext4`: the VM's writable layer as it was when it stopped (sparse);
//! - `snapshot.json`: the [`VmSpec`], the Firecracker binary, the image recipe and whether the
//!   VM was jailed. A restore refuses a snapshot whose binary or image changed.
//!
//! The state names the VM's files by the relative names of its root (see the module docs of
//! [`super`]), so a restore lays out a new root with the same names: a link to the image's
//! base disk and a sparse copy of `scratch.ext4`.
//!
//! # Save ([`Vm::snapshot`](crate::Vm::snapshot)) and checkpoint ([`Vm::checkpoint`](crate::Vm::checkpoint))
//! `PATCH /vm Paused`, then `PUT /snapshot/create` into the VM's root (a jailed Firecracker
//! sees nothing else), then the files move into the destination and the process is killed:
//! the VM is spent. A checkpoint copies the scratch disk (sparse) while the VM is paused and
//! resumes it. A VM's first snapshot is `Full`; later ones, and those of a VM restored from a
//! snapshot, are `Diff` — only the pages changed since the last snapshot or load, at their
//! offsets in a sparse file — which kiln applies onto a sparse copy of that earlier memory
//! file; the result is a full `memory` again, so every snapshot restores on its own. (When the
//! earlier file is gone, a `Full` snapshot is written instead.)
//!
//! # Restore
//! A new id and root; `PUT /snapshot/load` with the memory as a `File` backend,
//! `track_dirty_pages` and `resume_vm`; then kiln connects to the vsock proxy again (Firecracker
//! resets the guest's vsock connections on load, and the agent goes back to accepting) and
//! greets the agent with the new VM id and the host clock.
//!
//! # The ready snapshot
//! As with QEMU: one per image, spec and binary in `<image dir>/snapshots/fc-ready-<key>/`,
//! created on first use in a temporary directory renamed into place.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::api::{
    MemoryBackend, MemoryBackendType, Request, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType,
};
use super::client::ApiClient;
use super::process::{copy_data_ranges, copy_sparse, move_file};
use super::{
    API_SOCK, FirecrackerProvider, FirecrackerVm, Machine, SCRATCH_DISK, binary_identity,
    connect_agent, new_id, open_image, unavailable, wait_for_socket,
};
use crate::image::ImageInfo;
use crate::{Allocation, VmError, VmSnapshot, VmSpec};

/// Version of the snapshot directory layout; part of the ready snapshot's key.
const FORMAT: u32 = 1;
const STATE: &str = "vmstate";
const MEMORY: &str = "memory";
const MEMORY_DIFF: &str = "memory.diff";
const META: &str = "snapshot.json";

/// Keeps one process from creating the same ready snapshot twice at once.
static CREATING: Mutex<()> = Mutex::const_new(());

/// `snapshot.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Meta {
    format: u32,
    vm_type: String,
    image: String,
    vcpus: u32,
    memory_mib: u32,
    disk_mib: u32,
    firecracker: String,
    recipe_hash: String,
    jailed: bool,
}

impl Meta {
    /// A VM of `spec` started by `binary` from `image`.
    pub(super) fn new(spec: &VmSpec, binary: &Path, image: &ImageInfo, jailed: bool) -> Meta {
        Meta {
            format: FORMAT,
            vm_type: spec.vm_type.clone(),
            image: spec.image.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            firecracker: binary_identity(binary),
            recipe_hash: image.manifest.recipe_hash.clone(),
            jailed,
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

fn read_meta(dir: &Path) -> Result<Meta, String> {
    let text = std::fs::read(dir.join(META)).map_err(|e| format!("reading {META}: {e}"))?;
    let meta: Meta = serde_json::from_slice(&text).map_err(|e| format!("parsing {META}: {e}"))?;
    if meta.format != FORMAT {
        return Err(format!("snapshot format {} is not {FORMAT}", meta.format));
    }
    Ok(meta)
}

/// The ready snapshot's directory name for this image, spec and binary.
fn ready_key(meta: &Meta) -> String {
    let mut hasher = Sha256::new();
    hasher.update(
        serde_json::to_vec(meta).expect("a Meta always serializes (plain strings and numbers)"),
    );
    let hex: String = hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("fc-ready-{hex}")
}

/// The sum of the allocated sizes of the files directly in `dir` (sparse files count what
/// they hold).
fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len().min(m.blocks() * 512))
                .sum()
        })
        .unwrap_or(0)
}

/// Deletes a snapshot's directory; a missing one is not an error.
pub(super) async fn delete(snapshot: &VmSnapshot) -> Result<(), VmError> {
    let dir = snapshot.dir.clone();
    let result = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    result.map_err(|source| VmError::Io {
        vm: "-".to_owned(),
        op: format!("deleting the snapshot {}", snapshot.dir.display()),
        source,
    })
}

/// Runs blocking file work off the runtime, mapping errors to [`VmError::Io`].
async fn blocking<T: Send + 'static>(
    vm: &str,
    op: String,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, VmError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|source| VmError::Io {
            vm: vm.to_owned(),
            op,
            source,
        })
}

impl Machine {
    /// Pauses the VM, saves it under `dest` (see the module docs) and stops it: only
    /// [`Machine::release`] is left to call. `dest` must not exist yet.
    pub async fn save(&self, dest: &Path) -> Result<VmSnapshot, VmError> {
        self.write_snapshot(dest, false).await
    }

    /// Pauses the VM, saves it under `dest` and resumes it: a live snapshot. The scratch disk
    /// is copied (sparse) while the VM is paused; the memory is a diff against the previous
    /// snapshot of this VM (or the one it was restored from) when that is still there.
    pub async fn checkpoint(&self, dest: &Path) -> Result<VmSnapshot, VmError> {
        let written = self.write_snapshot(dest, true).await;
        let resumed = self.resume().await.map_err(|e| VmError::Guest {
            vm: self.id.clone(),
            message: format!("Resuming after a snapshot failed: {e}"),
        });
        let snapshot = written?;
        resumed?;
        Ok(snapshot)
    }

    /// Whether the next snapshot of this VM writes a diff (an earlier memory file is there).
    pub fn saves_diff(&self) -> bool {
        self.last_memory().is_some()
    }

    fn last_memory(&self) -> Option<PathBuf> {
        self.last_memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|p| p.is_file())
    }

    /// Pauses and writes `dest`; then kills the VM (`live` false) or leaves it paused.
    async fn write_snapshot(&self, dest: &Path, live: bool) -> Result<VmSnapshot, VmError> {
        let io = |op: String, source| VmError::Io {
            vm: self.id.clone(),
            op,
            source,
        };
        tokio::fs::create_dir(dest)
            .await
            .map_err(|e| io(format!("creating {}", dest.display()), e))?;
        let base = self.last_memory();
        let (kind, written) = match &base {
            Some(_) => (SnapshotType::Diff, MEMORY_DIFF),
            None => (SnapshotType::Full, MEMORY),
        };
        let failed = |e: super::FirecrackerApiError| VmError::Guest {
            vm: self.id.clone(),
            message: format!("Saving a snapshot failed: {e}"),
        };
        self.pause().await.map_err(failed)?;
        self.api
            .call(&Request::snapshot_create(&SnapshotCreateParams {
                snapshot_path: STATE.to_owned(),
                mem_file_path: written.to_owned(),
                snapshot_type: Some(kind),
            }))
            .await
            .map_err(failed)?;
        if !live {
            self.process.kill_and_wait().await;
        }
        let (root, dest_owned) = (self.root.clone(), dest.to_owned());
        blocking(
            &self.id,
            format!("moving the snapshot into {}", dest.display()),
            move || {
                move_file(&root.join(STATE), &dest_owned.join(STATE))?;
                if live {
                    copy_sparse(&root.join(SCRATCH_DISK), &dest_owned.join(SCRATCH_DISK))?;
                } else {
                    move_file(&root.join(SCRATCH_DISK), &dest_owned.join(SCRATCH_DISK))?;
                }
                match base {
                    Some(base) => {
                        // Diff: the pages dirtied since `base` was written, applied onto a
                        // copy of it.
                        let merged = dest_owned.join(MEMORY);
                        copy_sparse(&base, &merged)?;
                        let diff = std::fs::File::open(root.join(MEMORY_DIFF))?;
                        let to = std::fs::File::options().write(true).open(&merged)?;
                        copy_data_ranges(&diff, &to)?;
                        std::fs::remove_file(root.join(MEMORY_DIFF))
                    }
                    None => move_file(&root.join(MEMORY), &dest_owned.join(MEMORY)),
                }
            },
        )
        .await?;
        let memory = std::path::absolute(dest.join(MEMORY))
            .map_err(|e| io("resolving the snapshot path".to_owned(), e))?;
        *self.last_memory.lock().unwrap_or_else(|e| e.into_inner()) = Some(memory);
        let json = serde_json::to_vec_pretty(&self.meta)
            .expect("a Meta always serializes (plain strings and numbers)");
        tokio::fs::write(dest.join(META), json)
            .await
            .map_err(|e| io(format!("writing {}", dest.join(META).display()), e))?;
        Ok(VmSnapshot {
            backend: "firecracker",
            dir: dest.to_owned(),
            spec: self.meta.spec(),
            size_bytes: dir_size(dest),
        })
    }
}

impl FirecrackerProvider {
    /// The ready snapshot for `spec`, created on first use.
    pub(super) async fn ready(&self, spec: &VmSpec) -> Result<VmSnapshot, VmError> {
        let image = open_image(&self.config.data_dir, &spec.image).await?;
        let wanted = Meta::new(spec, &self.binary, &image, self.config.jailer.is_some());
        let root = image.dir.join("snapshots");
        let dir = root.join(ready_key(&wanted));
        let found = |dir: &Path| {
            read_meta(dir)
                .ok()
                .filter(|meta| *meta == wanted)
                .map(|_| VmSnapshot {
                    backend: "firecracker",
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
        let vm = self.boot(spec, self.config.boot_timeout).await?;
        let tmp = root.join(format!(".tmp-{}", crate::Vm::id(&vm)));
        let saved = crate::Vm::snapshot(&vm, &tmp).await;
        let _ = crate::Vm::release(&vm).await;
        let saved = match saved {
            Ok(saved) => saved,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        if std::fs::rename(&tmp, &dir).is_err() {
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
            "Created the Firecracker ready snapshot of image `{}` in {} ms ({} MiB)",
            spec.image,
            started.elapsed().as_millis(),
            saved.size_bytes >> 20
        );
        Ok(VmSnapshot { dir, ..saved })
    }

    /// Loads `snapshot` into a fresh Firecracker process and resumes it, without waiting for
    /// the agent (see the module docs). On failure nothing is left behind.
    pub async fn load(&self, snapshot: &VmSnapshot) -> Result<Machine, VmError> {
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
        if meta.firecracker != binary_identity(&self.binary) {
            return Err(refuse(
                "it was saved by another Firecracker binary".to_owned(),
            ));
        }
        let id = new_id();
        let (vm_dir, root, jail) = self.lay_out(&id, &image, false)?;
        let memory =
            std::path::absolute(snapshot.dir.join(MEMORY)).map_err(|source| VmError::Io {
                vm: id.clone(),
                op: "resolving the snapshot path".to_owned(),
                source,
            })?;
        let (state_path, memory_path) = {
            let (from, to, jailed) = (snapshot.dir.clone(), root.clone(), jail.is_some());
            let memory = memory.clone();
            blocking(
                &id,
                "preparing the restored VM's files".to_owned(),
                move || {
                    copy_sparse(&from.join(SCRATCH_DISK), &to.join(SCRATCH_DISK))?;
                    if jailed {
                        // A jailed Firecracker sees only its chroot.
                        super::jailer::link_into(&to, &from.join(STATE), STATE)?;
                        super::jailer::link_into(&to, &memory, MEMORY)?;
                        Ok((STATE.to_owned(), MEMORY.to_owned()))
                    } else {
                        let state = std::path::absolute(from.join(STATE))?;
                        Ok((state.display().to_string(), memory.display().to_string()))
                    }
                },
            )
            .await?
        };
        if let (Some(config), Some(_)) = (&self.config.jailer, &jail) {
            super::jailer::give_to(config, &root.join(SCRATCH_DISK)).map_err(|source| {
                VmError::Io {
                    vm: id.clone(),
                    op: "handing the scratch disk to the jailed user".to_owned(),
                    source,
                }
            })?;
        }
        let spec = meta.spec();
        let process = self.spawn(&id, &spec, vm_dir.path(), &root, jail.as_ref())?;
        let machine = Machine {
            id,
            dir: vm_dir.keep(),
            api: ApiClient::new(root.join(API_SOCK)),
            root,
            process,
            meta,
            last_memory: std::sync::Mutex::new(Some(memory)),
            released: AtomicBool::new(false),
        };
        let load = SnapshotLoadParams {
            snapshot_path: state_path,
            mem_backend: Some(MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: memory_path,
            }),
            track_dirty_pages: Some(true),
            resume_vm: Some(true),
            vsock_override: None,
            network_overrides: Vec::new(),
        };
        let work = async {
            wait_for_socket(machine.api.socket()).await;
            machine
                .api
                .call(&Request::snapshot_load(&load))
                .await
                .map_err(|e| e.to_string())
        };
        machine.run_or_fail(work, self.config.boot_timeout).await?;
        Ok(machine)
    }

    /// Restores `snapshot` into a fresh VM and greets its agent anew.
    pub(super) async fn restore_snapshot(
        &self,
        snapshot: &VmSnapshot,
    ) -> Result<Allocation, VmError> {
        let started = Instant::now();
        let machine = self.load(snapshot).await?;
        let timeout = self.config.boot_timeout;
        let client = machine
            .run_or_fail(
                connect_agent(&machine.id, &machine.root, started + timeout),
                timeout,
            )
            .await?;
        tracing::debug!(vm = %machine.id, from = %snapshot.dir.display(), "Firecracker VM restored");
        Ok(Allocation {
            vm: std::sync::Arc::new(FirecrackerVm {
                machine,
                client,
                released: AtomicBool::new(false),
            }),
            elapsed: started.elapsed(),
        })
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
            memory_mib: 1024,
            disk_mib: 8192,
            firecracker: "/usr/bin/firecracker 1 2".into(),
            recipe_hash: "abc".into(),
            jailed: false,
        }
    }

    #[test]
    fn the_ready_key_changes_with_everything_that_makes_a_snapshot_unusable() {
        let base = ready_key(&meta());
        assert!(base.starts_with("fc-ready-") && base.len() == 25, "{base}");
        assert_eq!(base, ready_key(&meta()));
        for other in [
            Meta {
                memory_mib: 2048,
                ..meta()
            },
            Meta {
                recipe_hash: "abd".into(),
                ..meta()
            },
            Meta {
                firecracker: "other".into(),
                ..meta()
            },
            Meta {
                jailed: true,
                ..meta()
            },
        ] {
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
    }
}
