//! Wiring of warm pools, the ready snapshot and metrics into `kiln run`.
//!
//! `[pool.NAME]` in `kiln.toml` starts a pool for the VM type NAME for as long as the run
//! lasts; without one every session restores the image's ready snapshot (created on first
//! use), and `--cold` boots every VM instead. `--metrics-addr ADDR` serves Prometheus metrics
//! at `http://ADDR/metrics` while kiln runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use indexmap::IndexMap;
use kiln_runner::metrics::{self, Metrics};
use kiln_runner::pool::{PoolConfig, PoolSettings, PoolStatus, PooledProvider, Strategy};
use kiln_runner::vm_types::VmTypes;
use kiln_vm::{VmProvider, VmSpec};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::config::{Dirs, PoolSection};
use crate::{Exit, exit};

/// `kiln pool ...`.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Per-pool idle, busy, warming and failed counts of the running kiln processes, and the
    /// ready snapshots stored with the images.
    Status,
}

/// Defaults of a `[pool.NAME]` key left out (the design sketch's values).
const DEFAULT_MIN_IDLE: usize = 2;
const DEFAULT_MAX_TOTAL: usize = 8;

/// The checked `[pool.NAME]` sections: each NAME must be a VM type, whose VM the pool keeps
/// warm. (A run whose workflow has a quota asks for another size: it restores the ready
/// snapshot or boots instead.)
pub fn resolve_pools(
    sections: &IndexMap<String, PoolSection>,
    types: &VmTypes,
) -> anyhow::Result<Vec<(VmSpec, PoolConfig)>> {
    let mut pools = Vec::new();
    for (name, section) in sections {
        let Some(ty) = types.types().iter().find(|t| t.name() == name) else {
            let known: Vec<&str> = types.types().iter().map(|t| t.name()).collect();
            bail!(
                "[pool.{name}]: there is no VM type `{name}` (VM types: {}); a pool is named \
                 after the [vm_types.NAME] it keeps warm",
                known.join(", ")
            );
        };
        let strategy = match &section.strategy {
            Some(s) => s
                .parse::<Strategy>()
                .with_context(|| format!("[pool.{name}] strategy"))?,
            None => Strategy::default(),
        };
        let min_idle = section.min_idle.unwrap_or(DEFAULT_MIN_IDLE);
        let config = PoolConfig {
            min_idle,
            max_total: section.max_total.unwrap_or(DEFAULT_MAX_TOTAL.max(min_idle)),
            strategy,
        };
        config
            .validate()
            .with_context(|| format!("[pool.{name}]"))?;
        pools.push((ty.spec.clone(), config));
    }
    Ok(pools)
}

/// The provider sessions allocate from: pools and the ready snapshot over `backend`, or cold
/// boots only with `cold`.
pub fn provider(
    backend: Arc<dyn VmProvider>,
    pools: Vec<(VmSpec, PoolConfig)>,
    cold: bool,
    metrics: Option<Arc<Metrics>>,
) -> anyhow::Result<Arc<PooledProvider>> {
    let settings = PoolSettings {
        snapshots: !cold,
        pools: if cold { Vec::new() } else { pools },
    };
    Ok(Arc::new(PooledProvider::new(backend, settings, metrics)?))
}

/// Starts serving `metrics` at `http://addr/metrics`.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("Cannot serve metrics on {addr}"))?;
    let bound = listener.local_addr().unwrap_or(addr);
    eprintln!("Metrics at http://{bound}/metrics");
    Ok(tokio::spawn(metrics::serve(listener, metrics)))
}

/// The host's ceiling on any one VM: `[runner] max_vcpus`, `max_memory_mib` and
/// `max_disk_mib`; by default twice the host's CPUs (vCPUs are threads that may share a core,
/// and the default VM has 2 even on a 1-CPU host), the host's memory, and no disk limit.
/// Checked for every VM type and quota when the config is read, before anything starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ceiling {
    vcpus: (u32, &'static str),
    memory_mib: Option<(u32, &'static str)>,
    disk_mib: Option<(u32, &'static str)>,
}

impl Ceiling {
    /// The ceiling from the `[runner]` keys, with the host's defaults for those left out.
    pub fn from_config(
        max_vcpus: Option<u32>,
        max_memory_mib: Option<u32>,
        max_disk_mib: Option<u32>,
    ) -> Ceiling {
        let host_vcpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        Ceiling {
            vcpus: match max_vcpus {
                Some(n) => (n, "[runner] max_vcpus"),
                None => (host_vcpus.saturating_mul(2), "twice this host's CPUs"),
            },
            memory_mib: match max_memory_mib {
                Some(n) => Some((n, "[runner] max_memory_mib")),
                None => host_memory_mib().map(|n| (n, "this host's memory")),
            },
            disk_mib: max_disk_mib.map(|n| (n, "[runner] max_disk_mib")),
        }
    }

    /// Refuses `spec`, configured at `key` (`[vm_types.big]`), when it is above the ceiling.
    pub fn check(&self, key: &str, spec: &VmSpec) -> anyhow::Result<()> {
        let (vcpus, source) = self.vcpus;
        if spec.vcpus > vcpus {
            bail!(
                "{key} vcpus = {}: above the ceiling of {vcpus} vCPUs ({source})",
                spec.vcpus
            );
        }
        if let Some((memory, source)) = self.memory_mib
            && spec.memory_mib > memory
        {
            bail!(
                "{key} memory_mib = {}: above the ceiling of {memory} MiB ({source})",
                spec.memory_mib
            );
        }
        if let Some((disk, source)) = self.disk_mib
            && spec.disk_mib > disk
        {
            bail!(
                "{key} disk_mib = {}: above the ceiling of {disk} MiB ({source})",
                spec.disk_mib
            );
        }
        Ok(())
    }
}

/// `MemTotal` from `/proc/meminfo`, in MiB.
fn host_memory_mib() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    u32::try_from(kib / 1024).ok()
}

/// How often a running kiln writes its pools' counts for `kiln pool status`.
const PUBLISH_EVERY: Duration = Duration::from_millis(500);

/// One pool in a status file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PoolLine {
    vm_type: String,
    idle: usize,
    busy: usize,
    warming: usize,
    failed: u64,
    served: u64,
    min_idle: usize,
    max_total: usize,
    strategy: String,
}

impl From<&PoolStatus> for PoolLine {
    fn from(s: &PoolStatus) -> PoolLine {
        PoolLine {
            vm_type: s.vm_type.clone(),
            idle: s.idle,
            busy: s.busy,
            warming: s.warming,
            failed: s.failed,
            served: s.served,
            min_idle: s.config.min_idle,
            max_total: s.config.max_total,
            strategy: s.config.strategy.to_string(),
        }
    }
}

/// `<runtime>/pools/<pid>.json`, written by a running kiln that has pools.
#[derive(Debug, Serialize, Deserialize)]
struct StatusFile {
    pid: u32,
    pools: Vec<PoolLine>,
}

fn status_dir(runtime: &Path) -> PathBuf {
    runtime.join("pools")
}

/// Writes the pools' counts for `kiln pool status` until dropped (which removes the file).
pub struct StatusPublisher {
    task: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Drop for StatusPublisher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts publishing `pooled`'s counts under the runtime dir (nothing when it has no pools).
pub fn publish_status(runtime: &Path, pooled: Arc<PooledProvider>) -> StatusPublisher {
    let path = status_dir(runtime).join(format!("{}.json", std::process::id()));
    if pooled.status().is_empty() {
        return StatusPublisher { task: None, path };
    }
    let file = path.clone();
    let task = tokio::spawn(async move {
        let _ = tokio::fs::create_dir_all(file.parent().unwrap_or(Path::new("."))).await;
        let tmp = file.with_extension("tmp");
        loop {
            let status = StatusFile {
                pid: std::process::id(),
                pools: pooled.status().iter().map(PoolLine::from).collect(),
            };
            if let Ok(json) = serde_json::to_vec(&status)
                && tokio::fs::write(&tmp, json).await.is_ok()
            {
                let _ = tokio::fs::rename(&tmp, &file).await;
            }
            tokio::time::sleep(PUBLISH_EVERY).await;
        }
    });
    StatusPublisher {
        task: Some(task),
        path,
    }
}

/// `kiln pool ...`.
pub fn command(cmd: PoolCommand) -> Result<u8, Exit> {
    match cmd {
        PoolCommand::Status => {
            let dirs = Dirs::from_env();
            print!("{}", status_text(&dirs.runtime, &dirs.data));
            Ok(exit::SUCCESS)
        }
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The report of `kiln pool status`.
fn status_text(runtime: &Path, data: &Path) -> String {
    let mut out = String::from("Pools of running kiln processes:\n");
    let mut files: Vec<StatusFile> = std::fs::read_dir(status_dir(runtime))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|bytes| serde_json::from_slice::<StatusFile>(&bytes).ok())
                .filter(|f| alive(f.pid))
                .collect()
        })
        .unwrap_or_default();
    files.sort_by_key(|f| f.pid);
    if files.iter().all(|f| f.pools.is_empty()) {
        out.push_str("  (none: pools live while `kiln run` runs with a [pool.NAME] section)\n");
    } else {
        out.push_str(&format!(
            "  {:<8} {:<10} {:>5} {:>5} {:>8} {:>7} {:>7} {:>4} {:>4}  {}\n",
            "PID",
            "VM TYPE",
            "IDLE",
            "BUSY",
            "WARMING",
            "FAILED",
            "SERVED",
            "MIN",
            "MAX",
            "STRATEGY"
        ));
        for file in &files {
            for p in &file.pools {
                out.push_str(&format!(
                    "  {:<8} {:<10} {:>5} {:>5} {:>8} {:>7} {:>7} {:>4} {:>4}  {}\n",
                    file.pid,
                    p.vm_type,
                    p.idle,
                    p.busy,
                    p.warming,
                    p.failed,
                    p.served,
                    p.min_idle,
                    p.max_total,
                    p.strategy
                ));
            }
        }
    }
    out.push_str("Ready snapshots (restored by `kiln run`; `--cold` boots instead):\n");
    let mut snapshots = Vec::new();
    if let Ok(images) = std::fs::read_dir(data.join("images")) {
        for image in images.flatten() {
            let Ok(entries) = std::fs::read_dir(image.path().join("snapshots")) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(bytes) = std::fs::read(path.join("snapshot.json")) else {
                    continue;
                };
                let Ok(meta) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                    continue;
                };
                let size: u64 = std::fs::read_dir(&path)
                    .map(|d| {
                        d.flatten()
                            .filter_map(|e| e.metadata().ok())
                            .map(|m| m.len())
                            .sum()
                    })
                    .unwrap_or(0);
                snapshots.push(format!(
                    "  {:<10} {:>2} vCPU {:>6} MiB RAM {:>6} MiB disk  {:<4} {:>5} MiB  {}\n",
                    image.file_name().to_string_lossy(),
                    meta["vcpus"],
                    meta["memory_mib"],
                    meta["disk_mib"],
                    meta["accel"].as_str().unwrap_or("?"),
                    size >> 20,
                    path.display()
                ));
            }
        }
    }
    snapshots.sort();
    if snapshots.is_empty() {
        out.push_str("  (none yet: the first `kiln run` of an image creates one)\n");
    }
    for line in snapshots {
        out.push_str(&line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(
        min_idle: Option<usize>,
        max_total: Option<usize>,
        strategy: Option<&str>,
    ) -> PoolSection {
        PoolSection {
            min_idle,
            max_total,
            strategy: strategy.map(str::to_owned),
        }
    }

    #[test]
    fn pool_sections_resolve_with_defaults_and_checks() {
        let big = VmSpec {
            vm_type: "big".into(),
            vcpus: 8,
            ..VmSpec::default()
        };
        let types = VmTypes::new(vec![kiln_runner::vm_types::VmType {
            spec: big.clone(),
            labels: Vec::new(),
            timeout: None,
        }]);
        let mut sections = IndexMap::new();
        sections.insert("default".to_owned(), section(Some(1), None, Some("lru")));
        let pools = resolve_pools(&sections, &types).expect("valid");
        assert_eq!(
            pools[0].1,
            PoolConfig {
                min_idle: 1,
                max_total: 8,
                strategy: Strategy::Lru
            }
        );
        assert_eq!(pools[0].0, VmSpec::default());
        sections.insert("default".to_owned(), section(Some(3), Some(2), None));
        let err = resolve_pools(&sections, &types).expect_err("min above max");
        assert!(format!("{err:#}").contains("min_idle = 3"), "{err:#}");
        sections.insert("default".to_owned(), section(None, None, Some("lifo")));
        let err = resolve_pools(&sections, &types).expect_err("bad strategy");
        assert!(format!("{err:#}").contains("lifo"), "{err:#}");
        // A pool for another VM type keeps that type's VM warm.
        let mut other = IndexMap::new();
        other.insert("big".to_owned(), section(None, None, None));
        let pools = resolve_pools(&other, &types).expect("big is a type");
        assert_eq!(pools[0].0, big);
        other.insert("huge".to_owned(), section(None, None, None));
        let err = resolve_pools(&other, &types).expect_err("unknown type");
        assert!(err.to_string().contains("[pool.huge]"), "{err}");
        assert!(err.to_string().contains("default, big"), "{err}");
    }

    #[test]
    fn status_lists_live_pools_and_stored_snapshots() {
        let runtime = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let text = status_text(runtime.path(), data.path());
        assert!(text.contains("(none: pools live"), "{text}");
        assert!(text.contains("(none yet"), "{text}");
        std::fs::create_dir_all(status_dir(runtime.path())).unwrap();
        let line = PoolLine {
            vm_type: "default".into(),
            idle: 2,
            busy: 1,
            warming: 0,
            failed: 3,
            served: 9,
            min_idle: 2,
            max_total: 8,
            strategy: "lru".into(),
        };
        let mine = StatusFile {
            pid: std::process::id(),
            pools: vec![line.clone()],
        };
        let gone = StatusFile {
            pid: u32::MAX - 1,
            pools: vec![line],
        };
        for (name, file) in [("a.json", &mine), ("b.json", &gone)] {
            std::fs::write(
                status_dir(runtime.path()).join(name),
                serde_json::to_vec(file).unwrap(),
            )
            .unwrap();
        }
        let snap = data.path().join("images/default/snapshots/ready-1");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(
            snap.join("snapshot.json"),
            r#"{"vcpus": 2, "memory_mib": 2048, "disk_mib": 8192, "accel": "tcg"}"#,
        )
        .unwrap();
        let text = status_text(runtime.path(), data.path());
        // The file of a process that is gone is ignored.
        let rows: Vec<&str> = text.lines().filter(|l| l.ends_with("lru")).collect();
        assert_eq!(rows.len(), 1, "{text}");
        assert!(rows[0].contains(&std::process::id().to_string()), "{text}");
        assert!(text.contains("2048 MiB RAM"), "{text}");
        assert!(text.contains("tcg"), "{text}");
    }

    #[test]
    fn vms_above_the_ceiling_are_refused_up_front() {
        let spec = VmSpec {
            vcpus: 4,
            memory_mib: 4096,
            disk_mib: 2048,
            ..VmSpec::default()
        };
        let key = "[vm_types.big]";
        let fits = Ceiling::from_config(Some(4), Some(4096), Some(2048));
        assert!(fits.check(key, &spec).is_ok());
        let err = Ceiling::from_config(Some(2), Some(8192), None)
            .check(key, &spec)
            .expect_err("vcpus");
        assert_eq!(
            err.to_string(),
            "[vm_types.big] vcpus = 4: above the ceiling of 2 vCPUs ([runner] max_vcpus)"
        );
        let err = Ceiling::from_config(Some(8), Some(1024), None)
            .check(key, &spec)
            .expect_err("memory");
        assert!(err.to_string().contains("memory_mib = 4096"), "{err}");
        assert!(err.to_string().contains("[runner] max_memory_mib"), "{err}");
        let err = Ceiling::from_config(Some(8), None, Some(1024))
            .check(key, &spec)
            .expect_err("disk");
        assert!(
            err.to_string()
                .contains("disk_mib = 2048: above the ceiling of 1024 MiB ([runner] max_disk_mib)"),
            "{err}"
        );
        let huge = VmSpec {
            vcpus: 1,
            memory_mib: u32::MAX,
            ..VmSpec::default()
        };
        let err = Ceiling::from_config(None, None, None)
            .check(key, &huge)
            .expect_err("more than the host has");
        assert!(err.to_string().contains("this host's memory"), "{err}");
    }
}
