//! The one place that turns `--backend auto|local|qemu|firecracker` into a provider.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::firecracker::{self, FirecrackerConfig, FirecrackerProvider, JailerConfig};
use crate::local::LocalProvider;
use crate::qemu::{self, Accel, Network, QemuConfig, QemuProvider};
use crate::{VmError, VmProvider, VmSpec, image};

/// The backend the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// The best backend that works on this host.
    #[default]
    Auto,
    /// No isolation: processes on the host.
    Local,
    /// QEMU microVMs.
    Qemu,
    /// Firecracker microVMs.
    Firecracker,
}

impl FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "local" => Ok(BackendKind::Local),
            "qemu" => Ok(BackendKind::Qemu),
            "firecracker" => Ok(BackendKind::Firecracker),
            other => Err(format!(
                "unknown backend `{other}` (expected auto, local, qemu or firecracker)"
            )),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Auto => "auto",
            BackendKind::Local => "local",
            BackendKind::Qemu => "qemu",
            BackendKind::Firecracker => "firecracker",
        })
    }
}

/// Host settings every backend may need.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Where per-VM directories (sockets, overlays, scratch) live.
    pub runtime_dir: PathBuf,
    /// Where images live.
    pub data_dir: PathBuf,
    /// The QEMU binary (`[qemu] binary`).
    pub qemu_binary: PathBuf,
    /// QEMU's accelerator (`[qemu] accel`).
    pub accel: Accel,
    /// Guest networking of VM backends (`[qemu] network`).
    pub network: Network,
    /// From starting a VM to its agent's answer (`[runner] boot_timeout_seconds`).
    pub boot_timeout: Duration,
    /// The Firecracker binary (`[firecracker] binary`).
    pub firecracker_binary: PathBuf,
    /// Firecracker's jailer, when enabled (`[firecracker] jailer`).
    pub jailer: Option<JailerConfig>,
}

impl BackendConfig {
    /// Settings with defaults: `qemu-system-x86_64`, accelerator `auto`, user networking, a
    /// boot timeout of [`qemu::DEFAULT_BOOT_TIMEOUT`].
    pub fn new(runtime_dir: PathBuf, data_dir: PathBuf) -> BackendConfig {
        BackendConfig {
            runtime_dir,
            data_dir,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            network: Network::User,
            boot_timeout: qemu::DEFAULT_BOOT_TIMEOUT,
            firecracker_binary: PathBuf::from("firecracker"),
            jailer: None,
        }
    }

    /// The Firecracker backend's settings.
    pub fn firecracker(&self) -> FirecrackerConfig {
        FirecrackerConfig {
            runtime_dir: self.runtime_dir.clone(),
            data_dir: self.data_dir.clone(),
            binary: self.firecracker_binary.clone(),
            jailer: self.jailer.clone(),
            boot_timeout: self.boot_timeout,
        }
    }

    /// The QEMU backend's settings.
    pub fn qemu(&self) -> QemuConfig {
        QemuConfig {
            runtime_dir: self.runtime_dir.clone(),
            data_dir: self.data_dir.clone(),
            binary: self.qemu_binary.clone(),
            accel: self.accel,
            network: self.network,
            boot_timeout: self.boot_timeout,
        }
    }
}

/// The chosen backend and why it was chosen.
pub struct Selection {
    /// The provider.
    pub provider: Arc<dyn VmProvider>,
    /// Why this backend, in one sentence for the user.
    pub reason: String,
}

impl fmt::Debug for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selection")
            .field("provider", &self.provider.name())
            .field("reason", &self.reason)
            .finish()
    }
}

/// Picks the backend for `kind` and says why.
pub async fn select_backend(
    kind: BackendKind,
    config: &BackendConfig,
) -> Result<Selection, VmError> {
    match kind {
        BackendKind::Local => Ok(Selection {
            provider: Arc::new(LocalProvider::new(config.runtime_dir.clone())),
            reason: "requested with --backend local".to_owned(),
        }),
        BackendKind::Auto => {
            if let Some(selection) = usable_firecracker(config).await {
                return Ok(selection);
            }
            auto_qemu_or_local(config).await
        }
        BackendKind::Qemu => {
            let qemu_config = config.qemu();
            if let Some(reason) = qemu::missing_tools(&qemu_config) {
                return Err(VmError::Unavailable {
                    backend: "qemu",
                    reason,
                });
            }
            let images = image::list(&config.data_dir).map_err(|e| VmError::Unavailable {
                backend: "qemu",
                reason: e.to_string(),
            })?;
            if images.is_empty() {
                return Err(VmError::Unavailable {
                    backend: "qemu",
                    reason: format!(
                        "no guest image is built in {}; run `kiln image build`",
                        image::images_dir(&config.data_dir).display()
                    ),
                });
            }
            Ok(Selection {
                provider: Arc::new(QemuProvider::new(qemu_config)?),
                reason: "requested with --backend qemu".to_owned(),
            })
        }
        BackendKind::Firecracker => {
            let provider = FirecrackerProvider::new(config.firecracker())?;
            let images = image::list(&config.data_dir).map_err(|e| VmError::Unavailable {
                backend: "firecracker",
                reason: e.to_string(),
            })?;
            let Some(image) = images
                .iter()
                .find(|i| i.name() == "default")
                .or(images.first())
            else {
                return Err(VmError::Unavailable {
                    backend: "firecracker",
                    reason: format!(
                        "no guest image is built in {}; run `kiln image build`",
                        image::images_dir(&config.data_dir).display()
                    ),
                });
            };
            if let Some(reason) = firecracker::image_problem(image) {
                return Err(VmError::Unavailable {
                    backend: "firecracker",
                    reason,
                });
            }
            Ok(Selection {
                provider: Arc::new(provider),
                reason: "requested with --backend firecracker".to_owned(),
            })
        }
    }
}

/// `auto` without Firecracker: QEMU when it boots a guest, else `local`.
async fn auto_qemu_or_local(config: &BackendConfig) -> Result<Selection, VmError> {
    match usable_qemu(config).await {
        Ok((provider, why)) => Ok(Selection {
            provider,
            reason: format!("auto chose qemu: {why}"),
        }),
        Err(why) => Ok(Selection {
            provider: Arc::new(LocalProvider::new(config.runtime_dir.clone())),
            reason: format!("auto fell back to local because {why}"),
        }),
    }
}

/// Firecracker when its binary, `/dev/kvm` and a bootable image are there and a probe boot
/// (cached per host kernel, binary and image) reached the agent; `None` otherwise, quietly:
/// most hosts have no Firecracker and `auto` goes on to QEMU.
async fn usable_firecracker(config: &BackendConfig) -> Option<Selection> {
    let provider = FirecrackerProvider::new(config.firecracker()).ok()?;
    let images = image::list(&config.data_dir).ok()?;
    let image = images
        .iter()
        .find(|i| i.name() == "default")
        .or(images.first())?;
    if firecracker::image_problem(image).is_some() {
        return None;
    }
    let spec = VmSpec {
        image: image.name().to_owned(),
        ..VmSpec::default()
    };
    match provider.kvm_probe(&spec).await {
        Ok((true, why)) => Some(Selection {
            provider: Arc::new(provider),
            reason: format!("auto chose firecracker: {why} (image `{}`)", image.name()),
        }),
        Ok((false, why)) => {
            tracing::debug!("auto skips firecracker: {why}");
            None
        }
        Err(e) => {
            tracing::debug!("auto skips firecracker: {e}");
            None
        }
    }
}

/// QEMU when its binaries, a built image and a bootable accelerator are there, or why not.
async fn usable_qemu(config: &BackendConfig) -> Result<(Arc<dyn VmProvider>, String), String> {
    let qemu_config = config.qemu();
    if let Some(reason) = qemu::missing_tools(&qemu_config) {
        return Err(reason);
    }
    let images = image::list(&config.data_dir).map_err(|e| e.to_string())?;
    let Some(image) = images
        .iter()
        .find(|i| i.name() == "default")
        .or(images.first())
    else {
        return Err("no guest image is built (run `kiln image build`)".to_owned());
    };
    let provider = QemuProvider::new(qemu_config).map_err(|e| e.to_string())?;
    let spec = VmSpec {
        image: image.name().to_owned(),
        ..VmSpec::default()
    };
    let (accel, why) = provider
        .resolve_accel(&spec)
        .await
        .map_err(|e| format!("QEMU cannot boot image `{}`: {e}", image.name()))?;
    Ok((
        Arc::new(provider),
        format!(
            "QEMU and the image `{}` are present, accelerator {accel} ({why})",
            image.name()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn qemu_without_an_image_says_how_to_build_one() {
        let runtime = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let config = BackendConfig::new(runtime.path().to_owned(), data.path().to_owned());
        let err = select_backend(BackendKind::Qemu, &config)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("kiln image build") || text.contains("not found"),
            "{text}"
        );
        let auto = select_backend(BackendKind::Auto, &config).await.unwrap();
        assert_eq!(auto.provider.name(), "local");
        assert!(
            auto.reason.contains("fell back to local"),
            "{}",
            auto.reason
        );
    }

    #[tokio::test]
    async fn a_missing_qemu_binary_is_named() {
        let runtime = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let mut config = BackendConfig::new(runtime.path().to_owned(), data.path().to_owned());
        config.qemu_binary = PathBuf::from("/nonexistent/qemu-system-x86_64");
        let err = select_backend(BackendKind::Qemu, &config)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/qemu-system-x86_64"),
            "{err}"
        );
        let auto = select_backend(BackendKind::Auto, &config).await.unwrap();
        assert!(
            auto.reason.contains("qemu-system-x86_64"),
            "{}",
            auto.reason
        );
    }
}
