//! The one place that turns `--backend auto|local|qemu|firecracker` into a provider.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::local::LocalProvider;
use crate::{VmError, VmProvider};

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
        BackendKind::Auto => Ok(Selection {
            provider: Arc::new(LocalProvider::new(config.runtime_dir.clone())),
            reason: "no VM backend is usable on this host yet, so auto falls back to local"
                .to_owned(),
        }),
        BackendKind::Qemu => Err(VmError::Unavailable {
            backend: "qemu",
            reason: "the QEMU backend is not implemented yet".to_owned(),
        }),
        BackendKind::Firecracker => Err(VmError::Unavailable {
            backend: "firecracker",
            reason: "the Firecracker backend is not implemented yet".to_owned(),
        }),
    }
}
