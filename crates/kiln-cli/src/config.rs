//! `kiln.toml` and the one place where file < environment < flags is resolved.
//!
//! Two stages, as STYLE.md asks: [`FileConfig`] is what users write (unknown keys are errors),
//! [`Settings`] is the checked value the rest of the binary uses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use indexmap::IndexMap;
use kiln_runner::executor::Isolation;
use kiln_runner::session::OnLimit;
use kiln_vm::{BackendConfig, BackendKind, VmSpec};
use serde::Deserialize;

use crate::args::RunArgs;

/// `kiln.toml` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    runner: RunnerSection,
    #[serde(default)]
    images: IndexMap<String, ImageSection>,
    #[serde(default)]
    vm_types: IndexMap<String, VmTypeSection>,
    #[serde(default)]
    pool: IndexMap<String, PoolSection>,
    #[serde(default)]
    qemu: QemuSection,
    #[serde(default)]
    firecracker: Option<toml::Table>,
    #[serde(default)]
    server: ServerSection,
}

/// `[server]`: `kiln serve`. Secrets are never here; they come from the environment.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on (`127.0.0.1:8080`).
    pub listen: Option<String>,
    /// The run database: empty = SQLite in the data dir, or a path to a SQLite file.
    pub database: Option<String>,
    /// GitHub's REST API base (GHES: `https://HOST/api/v3`).
    pub github_api_url: Option<String>,
    /// Gitea's API base (`https://HOST/api/v1`); default: from each repository's URL.
    pub gitea_api_url: Option<String>,
    /// The URL people reach kiln at, for the `target_url` of commit statuses.
    pub public_url: Option<String>,
    /// Clone URL prefix -> replacement prefix (mirrors, tests).
    #[serde(default)]
    pub clone_url_rewrite: IndexMap<String, String>,
    /// Runs executed at once (default: `[runner] max_sessions`).
    pub workers: Option<usize>,
    /// Re-queue runs interrupted by a restart instead of failing them.
    pub requeue_interrupted: Option<bool>,
    /// On shutdown, how long running runs get to finish before they are cancelled.
    pub shutdown_grace_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunnerSection {
    backend: Option<String>,
    isolation: Option<String>,
    max_sessions: Option<usize>,
    on_limit: Option<String>,
    snapshots: Option<String>,
    boot_timeout_seconds: Option<u64>,
    /// Host ceiling on one VM's vCPUs (default: twice the host's CPUs).
    max_vcpus: Option<u32>,
    /// Host ceiling on one VM's memory (default: the host's memory).
    max_memory_mib: Option<u32>,
}

/// `[qemu]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QemuSection {
    /// `auto | kvm | tcg`.
    accel: Option<String>,
    /// `user | none`.
    network: Option<String>,
    /// The QEMU binary.
    binary: Option<PathBuf>,
}

/// `[images.NAME]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// Debian suite.
    pub suite: Option<String>,
    /// Extra packages.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Debian mirror.
    pub mirror: Option<String>,
}

/// `[pool.NAME]`: a warm pool for the VM type NAME (see `crate::pool`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    /// VMs kept ready.
    pub min_idle: Option<usize>,
    /// VMs in the pool at most.
    pub max_total: Option<usize>,
    /// `fifo`, `lru` or `round-robin`.
    pub strategy: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmTypeSection {
    #[serde(default)]
    labels: Vec<String>,
    image: Option<String>,
    vcpus: Option<u32>,
    memory_mib: Option<u32>,
    disk_mib: Option<u32>,
    timeout_minutes: Option<u64>,
}

/// Where kiln keeps things on this host.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// Images and the run database.
    pub data: PathBuf,
    /// Per-VM directories.
    pub runtime: PathBuf,
}

impl Dirs {
    /// `KILN_DATA_DIR`, else `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln`; the runtime dir
    /// is `$XDG_RUNTIME_DIR/kiln`, else `/tmp/kiln-<uid>`.
    pub fn from_env() -> Dirs {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let data = env("KILN_DATA_DIR")
            .or_else(|| env("XDG_DATA_HOME").map(|d| d.join("kiln")))
            .or_else(|| env("HOME").map(|h| h.join(".local/share/kiln")))
            .unwrap_or_else(|| PathBuf::from("/var/lib/kiln"));
        let runtime = env("KILN_RUNTIME_DIR")
            .or_else(|| env("XDG_RUNTIME_DIR").map(|d| d.join("kiln")))
            .unwrap_or_else(|| {
                let uid = rustix::process::getuid().as_raw();
                PathBuf::from(format!("/tmp/kiln-{uid}"))
            });
        Dirs { data, runtime }
    }
}

impl FileConfig {
    /// Reads `explicit`, else `./kiln.toml`, else `~/.config/kiln/kiln.toml`; no file is an
    /// empty config. An explicit file that does not exist is an error.
    pub fn load(explicit: Option<&Path>) -> anyhow::Result<FileConfig> {
        let path = match explicit {
            Some(p) => Some(p.to_path_buf()),
            None => {
                let home = std::env::var_os("HOME").map(PathBuf::from);
                [
                    Some(PathBuf::from("kiln.toml")),
                    home.map(|h| h.join(".config/kiln/kiln.toml")),
                ]
                .into_iter()
                .flatten()
                .find(|p| p.is_file())
            }
        };
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("Cannot read config file {}", path.display()))?;
        let config: FileConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for (section, present) in [("[firecracker]", config.firecracker.is_some())] {
            if present {
                bail!(
                    "{}: the {section} section is not yet supported by this kiln version",
                    path.display()
                );
            }
        }
        Ok(config)
    }

    /// The `[server]` section.
    pub fn server(&self) -> &ServerSection {
        &self.server
    }

    /// The `[images.NAME]` section, if any.
    pub fn image(&self, name: &str) -> Option<&ImageSection> {
        self.images.get(name)
    }

    /// Backend settings: the dirs, `[qemu]`, and the boot timeout.
    pub fn backend_config(
        &self,
        dirs: &Dirs,
        boot_timeout: Option<Duration>,
    ) -> anyhow::Result<BackendConfig> {
        let mut config = BackendConfig::new(dirs.runtime.clone(), dirs.data.clone());
        if let Some(accel) = &self.qemu.accel {
            config.accel = accel
                .parse()
                .map_err(|e| anyhow::anyhow!("[qemu] accel: {e}"))?;
        }
        if let Some(network) = &self.qemu.network {
            config.network = network
                .parse()
                .map_err(|e| anyhow::anyhow!("[qemu] network: {e}"))?;
        }
        if let Some(binary) = &self.qemu.binary {
            config.qemu_binary = binary.clone();
        }
        config.boot_timeout = boot_timeout
            .or(self.runner.boot_timeout_seconds.map(Duration::from_secs))
            .unwrap_or(config.boot_timeout);
        Ok(config)
    }
}

/// The checked settings of one `kiln run`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Backend to use.
    pub backend: BackendKind,
    /// Session granularity.
    pub isolation: Isolation,
    /// Session limit.
    pub max_sessions: usize,
    /// At the limit.
    pub on_limit: OnLimit,
    /// The VM to ask for.
    pub spec: VmSpec,
    /// Until the guest agent answers (`None`: the backend's default).
    pub boot_timeout: Option<Duration>,
    /// `[pool.*]`, checked.
    pub pools: Vec<(VmSpec, kiln_runner::pool::PoolConfig)>,
    /// `--cold`: boot every VM (no pool, no snapshot).
    pub cold: bool,
    /// `--metrics-addr`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The whole-run time limit (`[vm_types.NAME] timeout_minutes`).
    pub run_timeout: Option<Duration>,
}

impl Settings {
    /// Resolves file < environment < flags (clap has already merged environment and flags).
    pub fn resolve(file: &FileConfig, args: &RunArgs) -> anyhow::Result<Settings> {
        let runner = &file.runner;
        let backend = pick(&args.backend, &runner.backend, "auto")
            .parse::<BackendKind>()
            .map_err(|e| anyhow::anyhow!("--backend: {e}"))?;
        let isolation = pick(&args.isolation, &runner.isolation, "workflow")
            .parse::<Isolation>()
            .map_err(|e| anyhow::anyhow!("--isolation: {e}"))?;
        let on_limit = pick(&args.on_limit, &runner.on_limit, "wait")
            .parse::<OnLimit>()
            .map_err(|e| anyhow::anyhow!("--on-limit: {e}"))?;
        let max_sessions = args.max_sessions.or(runner.max_sessions).unwrap_or(4);
        if max_sessions == 0 {
            bail!("--max-sessions must be at least 1");
        }
        match pick(&args.snapshots, &runner.snapshots, "off").as_str() {
            "off" => {}
            "steps" => bail!(
                "--snapshots steps is not yet supported: step snapshots come with the warm-pool \
                 and snapshot work"
            ),
            other => bail!("--snapshots: unknown value `{other}` (expected off or steps)"),
        }
        let vm_type = file.vm_types.get("default");
        let image = args
            .image
            .clone()
            .or_else(|| vm_type.and_then(|t| t.image.clone()))
            .unwrap_or_else(|| "default".to_owned());
        let defaults = VmSpec::default();
        let spec = VmSpec {
            vm_type: "default".to_owned(),
            image,
            vcpus: vm_type.and_then(|t| t.vcpus).unwrap_or(defaults.vcpus),
            memory_mib: vm_type
                .and_then(|t| t.memory_mib)
                .unwrap_or(defaults.memory_mib),
            disk_mib: vm_type
                .and_then(|t| t.disk_mib)
                .unwrap_or(defaults.disk_mib),
        };
        // Labels map `runs-on` to VM types in a later version; they are accepted and validated
        // here so that a config written for it already loads.
        let _ = vm_type.map(|t| &t.labels);
        crate::pool::check_ceiling(&spec, runner.max_vcpus, runner.max_memory_mib)?;
        Ok(Settings {
            backend,
            isolation,
            max_sessions,
            on_limit,
            pools: crate::pool::resolve_pools(&file.pool, &spec)?,
            spec,
            boot_timeout: runner.boot_timeout_seconds.map(Duration::from_secs),
            cold: args.cold,
            metrics_addr: args.metrics_addr,
            run_timeout: vm_type
                .and_then(|t| t.timeout_minutes)
                .map(|m| Duration::from_secs(m.saturating_mul(60))),
        })
    }
}

fn pick(flag: &Option<String>, file: &Option<String>, default: &str) -> String {
    flag.clone()
        .or_else(|| file.clone())
        .unwrap_or_else(|| default.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = toml::from_str::<FileConfig>("[runner]\nbackedn = \"local\"\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("backedn"), "{err}");
    }

    #[test]
    fn design_sketch_sections_parse() {
        let text = r#"
[runner]
backend = "local"
isolation = "job"
max_sessions = 2
on_limit = "fail"
snapshots = "off"
boot_timeout_seconds = 60

[images.default]
suite = "bookworm"
packages = ["make"]

[vm_types.default]
labels = ["ubuntu-latest"]
image = "default"
vcpus = 1
memory_mib = 512
disk_mib = 4096
timeout_minutes = 30

[qemu]
accel = "tcg"

[server]
listen = "127.0.0.1:8080"
database = ""
github_api_url = "https://api.github.com"
public_url = "https://kiln.example"
clone_url_rewrite = { "https://github.com/" = "file:///srv/mirror/" }
"#;
        let config: FileConfig = toml::from_str(text).expect("parse");
        assert_eq!(config.runner.max_sessions, Some(2));
        assert_eq!(config.vm_types["default"].vcpus, Some(1));
        assert_eq!(
            config.server.clone_url_rewrite["https://github.com/"],
            "file:///srv/mirror/"
        );
    }
}
