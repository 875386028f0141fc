//! `kiln.toml` and the one place where file < environment < flags is resolved.
//!
//! Two stages, as STYLE.md asks: [`FileConfig`] is what users write (unknown keys are errors),
//! [`Settings`] is the checked value the rest of the binary uses.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use indexmap::IndexMap;
use kiln_runner::executor::Isolation;
use kiln_runner::session::OnLimit;
use kiln_runner::vm_types::{
    DEFAULT_TYPE, Quota, VmConfig, VmType, VmTypes, normalize_workflow_key,
};
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
    workflows: IndexMap<String, WorkflowSection>,
    #[serde(default)]
    qemu: QemuSection,
    #[serde(default)]
    firecracker: Option<kiln_vm::firecracker::FirecrackerSection>,
    #[serde(default)]
    server: ServerSection,
}

/// `[server]`: `kiln serve`. Secrets are never here; they come from the environment.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on (`127.0.0.1:8080`).
    pub listen: Option<String>,
    /// The run database: empty = SQLite in the data dir, a path to a SQLite file, or a
    /// `postgres://` URL (its password from `KILN_DATABASE_PASSWORD`, never in argv).
    pub database: Option<String>,
    /// GitHub's REST API base (GHES: `https://HOST/api/v3`).
    pub github_api_url: Option<String>,
    /// Gitea's API base (`https://HOST/api/v1`); default: from each repository's URL.
    pub gitea_api_url: Option<String>,
    /// The URL people reach kiln at, for the `target_url` of commit statuses.
    pub public_url: Option<String>,
    /// A GitHub App's id (`KILN_GITHUB_APP_ID` overrides): with its private key
    /// (`KILN_GITHUB_APP_PRIVATE_KEY`), GitHub runs get check runs instead of commit statuses.
    pub github_app_id: Option<u64>,
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
    /// `--snapshots steps`: after-step snapshots kept per run (default 3).
    snapshot_keep: Option<usize>,
    /// `--snapshots steps`: disk the snapshots of one run may take, in MiB (default 8192).
    snapshot_max_mib: Option<u64>,
    boot_timeout_seconds: Option<u64>,
    /// Host ceiling on one VM's vCPUs (default: twice the host's CPUs).
    max_vcpus: Option<u32>,
    /// Host ceiling on one VM's memory (default: the host's memory).
    max_memory_mib: Option<u32>,
    /// Host ceiling on one VM's disk (default: none).
    max_disk_mib: Option<u32>,
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

/// `[vm_types.NAME]`: a VM type that `runs-on` labels select (see `kiln_runner::vm_types`).
/// Keys left out are taken from `[vm_types.default]`, then from the built-in default.
#[derive(Debug, Clone, Default, Deserialize)]
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

/// `[workflows."PATH"]`: the quota of one workflow's runs, overriding its jobs' VM types. PATH
/// is the workflow file relative to the repository root (`.github/workflows/ci.yml`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowSection {
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
        Ok(config)
    }

    /// The VM types and per-workflow quotas, checked against the ceilings (`--image` aside).
    pub fn vm_config(&self) -> anyhow::Result<VmConfig> {
        vm_config(self, None)
    }

    /// `[runner] snapshot_keep` and `snapshot_max_mib` (defaults: 3 snapshots, 8192 MiB).
    pub fn snapshot_limits(&self) -> anyhow::Result<(usize, u64)> {
        let keep = self.runner.snapshot_keep.unwrap_or(3);
        if keep == 0 {
            bail!("[runner] snapshot_keep must be at least 1");
        }
        Ok((keep, self.runner.snapshot_max_mib.unwrap_or(8192)))
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
        if let Some(section) = &self.firecracker {
            section
                .apply(&mut config.firecracker_binary, &mut config.jailer)
                .map_err(|e| anyhow::anyhow!("[firecracker] {e}"))?;
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
    /// The `default` VM type's VM.
    pub spec: VmSpec,
    /// The VM types `runs-on` selects and the per-workflow quotas, all within the ceilings.
    pub vms: Arc<VmConfig>,
    /// Until the guest agent answers (`None`: the backend's default).
    pub boot_timeout: Option<Duration>,
    /// `[pool.*]`, checked.
    pub pools: Vec<(VmSpec, kiln_runner::pool::PoolConfig)>,
    /// `--cold`: boot every VM (no pool, no snapshot).
    pub cold: bool,
    /// `--metrics-addr`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `--snapshots steps`: `(keep, max MiB)` of the step snapshots; `None` for `off`.
    pub step_snapshots: Option<(usize, u64)>,
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
        let step_snapshots = match pick(&args.snapshots, &runner.snapshots, "off").as_str() {
            "off" => None,
            "steps" => Some(file.snapshot_limits()?),
            other => bail!("--snapshots: unknown value `{other}` (expected off or steps)"),
        };
        let vms = vm_config(file, args.image.as_deref())?;
        let spec = vms.types.default_type().spec.clone();
        Ok(Settings {
            backend,
            isolation,
            max_sessions,
            on_limit,
            pools: crate::pool::resolve_pools(&file.pool, &vms.types)?,
            spec,
            vms: Arc::new(vms),
            boot_timeout: runner.boot_timeout_seconds.map(Duration::from_secs),
            cold: args.cold,
            metrics_addr: args.metrics_addr,
            step_snapshots,
        })
    }
}

/// `[vm_types.*]` and `[workflows.*]`, checked against each other and the host's ceilings.
/// `image` (`--image`) replaces every type's image.
fn vm_config(file: &FileConfig, image: Option<&str>) -> anyhow::Result<VmConfig> {
    let runner = &file.runner;
    let ceiling = crate::pool::Ceiling::from_config(
        runner.max_vcpus,
        runner.max_memory_mib,
        runner.max_disk_mib,
    );
    let builtin = VmSpec::default();
    let base = file.vm_types.get(DEFAULT_TYPE).cloned().unwrap_or_default();
    let mut types = Vec::new();
    let named = std::iter::once((DEFAULT_TYPE, &base)).chain(
        file.vm_types
            .iter()
            .filter(|(name, _)| *name != DEFAULT_TYPE)
            .map(|(name, section)| (name.as_str(), section)),
    );
    for (name, section) in named {
        let key = format!("[vm_types.{name}]");
        if name.is_empty() || name.chars().any(|c| c.is_whitespace()) {
            bail!("{key}: a VM type's name must be one word");
        }
        let spec = VmSpec {
            vm_type: name.to_owned(),
            image: image
                .map(str::to_owned)
                .or_else(|| section.image.clone())
                .or_else(|| base.image.clone())
                .unwrap_or(builtin.image.clone()),
            vcpus: section.vcpus.or(base.vcpus).unwrap_or(builtin.vcpus),
            memory_mib: section
                .memory_mib
                .or(base.memory_mib)
                .unwrap_or(builtin.memory_mib),
            disk_mib: section
                .disk_mib
                .or(base.disk_mib)
                .unwrap_or(builtin.disk_mib),
        };
        check_sizes(&key, spec.vcpus, spec.memory_mib, spec.disk_mib)?;
        ceiling.check(&key, &spec)?;
        if let Some(label) = section.labels.iter().find(|l| l.trim().is_empty()) {
            bail!("{key} labels: an empty label `{label}`");
        }
        types.push(VmType {
            spec,
            labels: section.labels.clone(),
            timeout: minutes(&key, section.timeout_minutes.or(base.timeout_minutes))?,
        });
    }
    let types = VmTypes::new(types);
    let mut quotas = IndexMap::new();
    for (path, section) in &file.workflows {
        let key = format!("[workflows.\"{path}\"]");
        let normalized = normalize_workflow_key(path);
        if normalized.is_empty() || normalized.starts_with('/') {
            bail!(
                "{key}: the key is the workflow file's path relative to the repository root, \
                 e.g. \".github/workflows/ci.yml\""
            );
        }
        let quota = Quota {
            vcpus: section.vcpus,
            memory_mib: section.memory_mib,
            disk_mib: section.disk_mib,
            timeout: minutes(&key, section.timeout_minutes)?,
        };
        check_sizes(
            &key,
            quota.vcpus.unwrap_or(1),
            quota.memory_mib.unwrap_or(MIN_MEMORY_MIB),
            quota.disk_mib.unwrap_or(MIN_DISK_MIB),
        )?;
        for ty in types.with_quota(&quota).types() {
            ceiling
                .check(&key, &ty.spec)
                .with_context(|| format!("with the VM type `{}`", ty.name()))?;
        }
        quotas.insert(normalized, quota);
    }
    Ok(VmConfig { types, quotas })
}

/// The smallest memory a guest kernel and the agent run in.
const MIN_MEMORY_MIB: u32 = 128;
/// The smallest disk: the image's files must fit.
const MIN_DISK_MIB: u32 = 256;

fn check_sizes(key: &str, vcpus: u32, memory_mib: u32, disk_mib: u32) -> anyhow::Result<()> {
    if vcpus == 0 {
        bail!("{key} vcpus: must be at least 1");
    }
    if memory_mib < MIN_MEMORY_MIB {
        bail!("{key} memory_mib = {memory_mib}: must be at least {MIN_MEMORY_MIB}");
    }
    if disk_mib < MIN_DISK_MIB {
        bail!("{key} disk_mib = {disk_mib}: must be at least {MIN_DISK_MIB}");
    }
    Ok(())
}

fn minutes(key: &str, minutes: Option<u64>) -> anyhow::Result<Option<Duration>> {
    match minutes {
        Some(0) => bail!("{key} timeout_minutes: must be at least 1"),
        Some(m) => Ok(Some(Duration::from_secs(m.saturating_mul(60)))),
        None => Ok(None),
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
    fn args(extra: &[&str]) -> RunArgs {
        use clap::{Args, FromArgMatches};
        let argv = std::iter::once("run").chain(extra.iter().copied());
        RunArgs::from_arg_matches(
            &RunArgs::augment_args(clap::Command::new("run"))
                .try_get_matches_from(argv)
                .expect("arguments"),
        )
        .expect("arguments")
    }

    fn settings(text: &str) -> anyhow::Result<Settings> {
        let file: FileConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        Settings::resolve(&file, &args(&[]))
    }

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| (*s).to_owned()).collect()
    }

    const TYPES: &str = r#"
[runner]
max_vcpus = 8
max_memory_mib = 16384

[vm_types.default]
vcpus = 1
memory_mib = 1024
timeout_minutes = 30

[vm_types.big]
labels = ["16-core", "gpu"]
vcpus = 4
memory_mib = 4096

[vm_types.jammy]
labels = ["ubuntu-22.04"]
image = "jammy"

[workflows.".github/workflows/heavy.yml"]
memory_mib = 8192
timeout_minutes = 5
"#;

    #[test]
    fn runs_on_labels_select_configured_types_and_unset_keys_come_from_default() {
        let settings = settings(TYPES).expect("valid");
        let types = &settings.vms.types;
        let pick = |l: &[&str]| types.select("job", &labels(l)).map(|t| t.spec.clone());
        let big = pick(&["self-hosted", "16-core"]).expect("big");
        assert_eq!(
            (big.vm_type.as_str(), big.vcpus, big.memory_mib),
            ("big", 4, 4096)
        );
        assert_eq!(big.image, "default", "image from the built-in default");
        let jammy = pick(&["ubuntu-22.04"]).expect("jammy claims it");
        assert_eq!(
            (jammy.vm_type.as_str(), jammy.image.as_str()),
            ("jammy", "jammy")
        );
        assert_eq!(jammy.vcpus, 1, "vcpus from [vm_types.default]");
        assert_eq!(
            pick(&["ubuntu-latest"]).expect("default").vm_type,
            "default"
        );
        let err = pick(&["windows-latest"]).expect_err("no type");
        assert!(err.to_string().contains("[windows-latest]"), "{err}");
        assert_eq!(settings.spec, types.default_type().spec);
        assert_eq!(
            types
                .types()
                .iter()
                .find(|t| t.name() == "big")
                .unwrap()
                .timeout,
            Some(Duration::from_secs(30 * 60)),
            "timeout from [vm_types.default]"
        );
    }

    #[test]
    fn a_workflow_quota_overrides_the_types_for_that_workflow_only() {
        let settings = settings(TYPES).expect("valid");
        let heavy = settings.vms.for_workflow("./.github/workflows/heavy.yml");
        let big = heavy.select("j", &labels(&["big"])).expect("big");
        assert_eq!((big.spec.vcpus, big.spec.memory_mib), (4, 8192));
        assert_eq!(big.timeout, Some(Duration::from_secs(5 * 60)));
        let other = settings.vms.for_workflow(".github/workflows/ci.yml");
        assert_eq!(
            other
                .select("j", &labels(&["big"]))
                .unwrap()
                .spec
                .memory_mib,
            4096
        );
    }

    #[test]
    fn the_image_flag_replaces_every_types_image() {
        let file: FileConfig = toml::from_str(TYPES).expect("parse");
        let settings = Settings::resolve(&file, &args(&["--image", "mine"])).expect("valid");
        assert!(
            settings
                .vms
                .types
                .types()
                .iter()
                .all(|t| t.spec.image == "mine")
        );
    }

    #[test]
    fn sizes_above_the_ceiling_are_refused_naming_the_key() {
        let err =
            settings("[runner]\nmax_vcpus = 2\n[vm_types.big]\nvcpus = 3\n").expect_err("above");
        assert_eq!(
            err.to_string(),
            "[vm_types.big] vcpus = 3: above the ceiling of 2 vCPUs ([runner] max_vcpus)"
        );
        let err = settings(
            "[runner]\nmax_disk_mib = 4096\n[vm_types.default]\ndisk_mib = 4096\n\
             [workflows.\"ci.yml\"]\ndisk_mib = 5000\n",
        )
        .expect_err("quota above");
        let text = format!("{err:#}");
        assert!(
            text.contains("[workflows.\"ci.yml\"] disk_mib = 5000: above the ceiling of 4096 MiB"),
            "{text}"
        );
        // The built-in default disk is above a small ceiling too.
        let err = settings("[runner]\nmax_disk_mib = 1024\n").expect_err("default disk");
        assert!(
            err.to_string()
                .starts_with("[vm_types.default] disk_mib = 8192"),
            "{err}"
        );
        let err = settings("[vm_types.small]\nmemory_mib = 64\n").expect_err("too small");
        assert!(
            err.to_string().contains("[vm_types.small] memory_mib = 64"),
            "{err}"
        );
        let err = settings("[workflows.\"/abs/ci.yml\"]\nvcpus = 1\n").expect_err("absolute");
        assert!(
            err.to_string().contains("relative to the repository root"),
            "{err}"
        );
        let err = settings("[pool.huge]\nmin_idle = 1\n").expect_err("no such type");
        assert!(err.to_string().contains("[pool.huge]"), "{err}");
    }

    /// The `kiln.toml` examples in the README load and resolve.
    #[test]
    fn readme_config_examples_load() {
        let readme = include_str!("../../../README.md");
        let mut found = 0;
        for block in readme.split("```toml\n").skip(1) {
            let text = block.split("```").next().expect("a closed block");
            let file: FileConfig = toml::from_str(text)
                .unwrap_or_else(|e| panic!("README example does not parse: {e}\n{text}"));
            Settings::resolve(&file, &args(&[]))
                .unwrap_or_else(|e| panic!("README example is refused: {e:#}\n{text}"));
            found += 1;
        }
        assert!(found >= 2, "README toml examples found: {found}");
    }
}
