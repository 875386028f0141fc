//! Step snapshots (`--snapshots steps`), and the run record that `kiln debug` and
//! `kiln rerun --from-failed` read back.
//!
//! # What is kept
//! After every successful step (`conclusion: success`, not skipped) the job's VM takes a live
//! snapshot ([`Vm::checkpoint`]) and runs on. When a step fails, one more snapshot is taken at
//! that moment, before any later step, post step or cleanup runs: the *failure state*. Only
//! the run's first failure is kept that way.
//!
//! Retention is bounded per run: at most [`SnapshotConfig::keep`] after-step snapshots, and
//! together at most [`SnapshotConfig::max_bytes`]; the oldest after-step snapshots are
//! collected first. The newest after-step snapshot (the *last good* one, which rollback and
//! rerun restore) and the failure state are never collected. A collected snapshot can no
//! longer be restored; on backends with diff snapshots its disk diff stays while later
//! snapshots build on it.
//!
//! A snapshot that fails is a `snapshot_failed` event and a warning; the run goes on (its
//! result is the steps' result), and the run record says which snapshots exist.
//!
//! # On disk
//! ```text
//! <root>/<run>/run.json                          RunManifest: workflow, spec, jobs, snapshots
//! <root>/<run>/snapshots/<job>-<leg>-step<N>/    after step N (1-based), backend's files
//! <root>/<run>/snapshots/<job>-<leg>-failed<N>/  the failure state of step N
//! ```
//! `run.json` is rewritten (to a temporary file, then renamed) after every change, so a crash
//! leaves the last complete version.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use indexmap::IndexMap;
use kiln_vm::{Vm, VmProvider, VmSnapshot, VmSpec};
use kiln_workflow::{Step, StepAction};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::event::{EventKind, EventSink};

/// The run record's file name in a run's directory.
pub const MANIFEST: &str = "run.json";
const FORMAT: u32 = 1;

/// Settings of `--snapshots steps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotConfig {
    /// Where runs' directories go (`<data dir>/runs`).
    pub root: PathBuf,
    /// After-step snapshots kept per run (the newest ones); at least 1.
    pub keep: usize,
    /// The most a run's snapshots may take on disk together, in bytes.
    pub max_bytes: u64,
}

/// Errors of the snapshot bookkeeping.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The backend cannot take live snapshots.
    #[error(
        "--snapshots steps needs live VM snapshots, which the {backend} backend cannot take; \
         use --backend qemu, or --snapshots off"
    )]
    Unsupported {
        /// Backend name.
        backend: &'static str,
    },
    /// The run's directory or record could not be written or read.
    #[error("{op} {path} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The run record is not one this kiln can read.
    #[error("{path} is not a run record this kiln can read: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Why a snapshot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// After a successful step.
    AfterStep,
    /// At the moment a step failed.
    Failure,
}

impl SnapshotKind {
    /// The word events use.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::AfterStep => "after_step",
            SnapshotKind::Failure => "failure",
        }
    }
}

/// The VM a run asked for, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecRecord {
    /// VM type.
    pub vm_type: String,
    /// Image.
    pub image: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Disk in MiB.
    pub disk_mib: u32,
}

impl From<&VmSpec> for SpecRecord {
    fn from(spec: &VmSpec) -> SpecRecord {
        SpecRecord {
            vm_type: spec.vm_type.clone(),
            image: spec.image.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
        }
    }
}

impl From<&SpecRecord> for VmSpec {
    fn from(spec: &SpecRecord) -> VmSpec {
        VmSpec {
            vm_type: spec.vm_type.clone(),
            image: spec.image.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
        }
    }
}

/// What a job leg's later steps depend on, as it was after a step: enough to go on from there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LegRecord {
    /// Variables set with `GITHUB_ENV` so far.
    pub env: IndexMap<String, String>,
    /// Directories added with `GITHUB_PATH` so far, in the order they were added.
    pub path: Vec<String>,
    /// The `steps` context (steps with an `id:`).
    pub steps: serde_json::Map<String, serde_json::Value>,
    /// What steps wrote to `GITHUB_STEP_SUMMARY` so far.
    pub summary: String,
}

/// One step snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Job id.
    pub job: String,
    /// Matrix leg (0 without a matrix).
    pub leg: usize,
    /// The step (index in the job, from 0).
    pub step: usize,
    /// The step's display name.
    pub name: String,
    /// After a successful step, or the failure state.
    pub kind: SnapshotKind,
    /// The backend's files.
    pub dir: PathBuf,
    /// Their size when taken.
    pub size_bytes: u64,
    /// How long the VM was busy taking it.
    pub duration_ms: u64,
    /// Collected by retention: it can no longer be restored.
    pub collected: bool,
    /// The step's process environment (after its `GITHUB_ENV` and `GITHUB_PATH`), for
    /// `kiln debug`.
    pub env: IndexMap<String, String>,
    /// The step's working directory in the guest.
    pub cwd: String,
    /// The leg's state, for `kiln rerun`.
    pub leg_state: LegRecord,
    /// Fingerprints of the job's steps up to and including this one.
    pub fingerprints: Vec<String>,
}

/// A finished job leg, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// `success`, `failure`, `cancelled` or `skipped`.
    pub result: String,
    /// Evaluated outputs.
    pub outputs: IndexMap<String, String>,
    /// The names of its steps.
    pub steps: Vec<String>,
    /// Fingerprints of its steps (as the workflow file had them).
    pub fingerprints: Vec<String>,
}

/// The step that failed first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedStep {
    /// Job id.
    pub job: String,
    /// Matrix leg.
    pub leg: usize,
    /// Step index, from 0.
    pub step: usize,
}

/// `run.json`: what `kiln debug` and `kiln rerun` need to know about a run with snapshots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunManifest {
    /// Layout version.
    pub format: u32,
    /// The run id.
    pub run_id: String,
    /// The workflow file (absolute).
    pub workflow_file: PathBuf,
    /// The workflow's display name.
    pub workflow_name: String,
    /// The triggering event.
    pub event: String,
    /// The backend that took the snapshots.
    pub backend: String,
    /// `workflow` or `job`.
    pub isolation: String,
    /// The VM asked for.
    pub spec: SpecRecord,
    /// The guest's base `PATH` (before `GITHUB_PATH`).
    pub base_path: String,
    /// The run's result, once it ended.
    pub result: Option<String>,
    /// The step that failed first.
    pub failed: Option<FailedStep>,
    /// Job legs in the order they finished.
    pub jobs: Vec<JobRecord>,
    /// Every snapshot taken, in order (collected ones included).
    pub snapshots: Vec<SnapshotRecord>,
    /// The run this one re-ran, if it is a rerun.
    pub rerun_of: Option<String>,
}

impl RunManifest {
    /// Reads `<root>/<run>/run.json`.
    pub fn load(root: &Path, run: &str) -> Result<RunManifest, SnapshotError> {
        let path = root.join(run).join(MANIFEST);
        let text = std::fs::read(&path).map_err(|source| SnapshotError::Io {
            op: "reading",
            path: path.clone(),
            source,
        })?;
        let manifest: RunManifest =
            serde_json::from_slice(&text).map_err(|e| SnapshotError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if manifest.format != FORMAT {
            return Err(SnapshotError::Corrupt {
                path,
                reason: format!("format {} is not {FORMAT}", manifest.format),
            });
        }
        Ok(manifest)
    }

    /// The failure state, if one was taken and still exists.
    pub fn failure(&self) -> Option<&SnapshotRecord> {
        self.snapshots
            .iter()
            .find(|s| s.kind == SnapshotKind::Failure && !s.collected)
    }

    /// The last snapshot taken after a successful step of `job` (leg `leg`) before step
    /// `before`, whether or not it was collected.
    pub fn last_good(&self, job: &str, leg: usize, before: usize) -> Option<&SnapshotRecord> {
        self.snapshots.iter().rev().find(|s| {
            s.kind == SnapshotKind::AfterStep && s.job == job && s.leg == leg && s.step < before
        })
    }

    /// The backend-neutral handle of a recorded snapshot.
    pub fn vm_snapshot(&self, record: &SnapshotRecord) -> VmSnapshot {
        VmSnapshot {
            backend: backend_name(&self.backend),
            dir: record.dir.clone(),
            spec: VmSpec::from(&self.spec),
            size_bytes: record.size_bytes,
        }
    }
}

/// The `&'static` name of a backend recorded as a string.
fn backend_name(name: &str) -> &'static str {
    match name {
        "qemu" => "qemu",
        "firecracker" => "firecracker",
        "local" => "local",
        _ => "unknown",
    }
}

/// A fingerprint of what a step does (name, id, `if:`, env and its `run:`/`uses:`), which
/// ignores where in the file it is: `kiln rerun` compares them to tell whether the steps it
/// does not run again were changed.
pub fn fingerprint(step: &Step) -> String {
    let mut hasher = Sha256::new();
    let mut put = |part: &str| {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    };
    put(step.name.as_ref().map_or("", |t| t.source()));
    put(step.id.as_ref().map_or("", |s| s.value.as_str()));
    put(step.if_cond.as_ref().map_or("", |c| c.source()));
    for (k, v) in &step.env {
        put(k);
        put(v.source());
    }
    put(step.env_expr.as_ref().map_or("", |t| t.source()));
    match &step.action {
        StepAction::Run {
            script,
            shell,
            working_directory,
        } => {
            put("run");
            put(script.source());
            put(shell.as_ref().map_or("", |s| s.value.as_str()));
            put(working_directory.as_ref().map_or("", |t| t.source()));
        }
        StepAction::Uses { uses, with } => {
            put("uses");
            put(&uses.value);
            for (k, v) in with {
                put(k);
                put(v.source());
            }
        }
        other => put(&format!("{other:?}")),
    }
    let digest = hasher.finalize();
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// The step snapshots of one run: takes them, collects old ones and keeps `run.json` current.
/// Shared by the run's job legs; the lock is never held across an `.await`.
pub(crate) struct StepSnapshots {
    config: SnapshotConfig,
    dir: PathBuf,
    manifest: Mutex<RunManifest>,
}

/// What to record with one snapshot (everything but the files).
pub(crate) struct Taking<'a> {
    pub job: &'a str,
    pub leg: usize,
    pub step: usize,
    pub name: &'a str,
    pub kind: SnapshotKind,
    pub env: IndexMap<String, String>,
    pub cwd: String,
    pub leg_state: LegRecord,
    pub fingerprints: Vec<String>,
}

impl StepSnapshots {
    /// Creates the run's directory and its first `run.json`.
    pub(crate) fn start(
        config: SnapshotConfig,
        manifest: RunManifest,
    ) -> Result<StepSnapshots, SnapshotError> {
        let dir = config.root.join(&manifest.run_id);
        let snapshots = dir.join("snapshots");
        std::fs::create_dir_all(&snapshots).map_err(|source| SnapshotError::Io {
            op: "creating",
            path: snapshots,
            source,
        })?;
        let this = StepSnapshots {
            config,
            dir,
            manifest: Mutex::new(manifest),
        };
        this.save()?;
        Ok(this)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunManifest> {
        self.manifest
            .lock()
            .expect("the run record's lock is never held across a panic")
    }

    /// Writes `run.json` (to a temporary file, then renamed over the old one).
    fn save(&self) -> Result<(), SnapshotError> {
        let json = serde_json::to_vec_pretty(&*self.lock())
            .expect("a RunManifest always serializes (strings, numbers and maps)");
        let path = self.dir.join(MANIFEST);
        let tmp = self.dir.join(format!(".{MANIFEST}.tmp"));
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| SnapshotError::Io {
                op: "writing",
                path,
                source,
            })
    }

    fn save_or_warn(&self) {
        if let Err(e) = self.save() {
            tracing::warn!("the run record could not be updated: {e}");
        }
    }

    /// Updates the record, then writes it.
    pub(crate) fn update(&self, change: impl FnOnce(&mut RunManifest)) {
        change(&mut self.lock());
        self.save_or_warn();
    }

    /// Whether a failure state was taken already.
    pub(crate) fn has_failure(&self) -> bool {
        self.lock().failed.is_some()
    }

    /// Takes one snapshot of `vm` and collects what retention no longer keeps. Failures are
    /// reported (event and warning), never returned: the run goes on.
    pub(crate) async fn take(
        &self,
        provider: &dyn VmProvider,
        vm: &dyn Vm,
        events: &EventSink,
        what: Taking<'_>,
    ) {
        let suffix = match what.kind {
            SnapshotKind::AfterStep => "step",
            SnapshotKind::Failure => "failed",
        };
        let name = format!(
            "{}-{}-{suffix}{}",
            sanitize(what.job),
            what.leg,
            what.step + 1
        );
        let dest = self.dir.join("snapshots").join(name);
        if what.kind == SnapshotKind::Failure {
            self.update(|m| {
                m.failed.get_or_insert(FailedStep {
                    job: what.job.to_owned(),
                    leg: what.leg,
                    step: what.step,
                });
            });
        }
        let started = Instant::now();
        let taken = vm.checkpoint(&dest).await;
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let snapshot = match taken {
            Ok(snapshot) => snapshot,
            Err(e) => {
                let error = e.to_string();
                tracing::warn!(
                    "no snapshot after step {} of job {}: {error}",
                    what.step + 1,
                    what.job
                );
                events.emit(EventKind::SnapshotFailed {
                    job: what.job.to_owned(),
                    step: what.step,
                    error,
                });
                return;
            }
        };
        events.emit(EventKind::SnapshotTaken {
            job: what.job.to_owned(),
            step: what.step,
            kind: what.kind.as_str().to_owned(),
            size_bytes: snapshot.size_bytes,
            duration_ms,
        });
        let record = SnapshotRecord {
            job: what.job.to_owned(),
            leg: what.leg,
            step: what.step,
            name: what.name.to_owned(),
            kind: what.kind,
            dir: snapshot.dir.clone(),
            size_bytes: snapshot.size_bytes,
            duration_ms,
            collected: false,
            env: what.env,
            cwd: what.cwd,
            leg_state: what.leg_state,
            fingerprints: what.fingerprints,
        };
        let doomed = {
            let mut manifest = self.lock();
            manifest.snapshots.push(record);
            let doomed = self.doomed(&manifest);
            for &i in &doomed {
                manifest.snapshots[i].collected = true;
            }
            let backend = manifest.backend.clone();
            doomed
                .into_iter()
                .map(|i| {
                    let record = &manifest.snapshots[i];
                    (
                        record.job.clone(),
                        record.step,
                        VmSnapshot {
                            backend: backend_name(&backend),
                            dir: record.dir.clone(),
                            spec: VmSpec::from(&manifest.spec),
                            size_bytes: record.size_bytes,
                        },
                    )
                })
                .collect::<Vec<_>>()
        };
        self.save_or_warn();
        for (job, step, snapshot) in doomed {
            if let Err(e) = provider.delete_snapshot(&snapshot).await {
                tracing::warn!(
                    "collecting the snapshot after step {} of job {job} failed: {e}",
                    step + 1
                );
            } else {
                tracing::debug!(
                    "collected the snapshot after step {} of job {job}",
                    step + 1
                );
            }
        }
    }

    /// Which snapshots retention collects now: the oldest after-step snapshots beyond `keep`,
    /// then more of the oldest while the total is over `max_bytes`. Never the newest after-step
    /// snapshot of a leg, nor a failure state.
    fn doomed(&self, manifest: &RunManifest) -> Vec<usize> {
        let live: Vec<usize> = manifest
            .snapshots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.collected)
            .map(|(i, _)| i)
            .collect();
        let newest_of_leg = |i: usize| {
            let s = &manifest.snapshots[i];
            !manifest.snapshots[i + 1..].iter().any(|later| {
                later.kind == SnapshotKind::AfterStep && later.job == s.job && later.leg == s.leg
            })
        };
        let candidates: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| manifest.snapshots[i].kind == SnapshotKind::AfterStep)
            .filter(|&i| !newest_of_leg(i))
            // A snapshot of an earlier run that this one was resumed from is that run's.
            .filter(|&i| manifest.snapshots[i].dir.starts_with(&self.dir))
            .collect();
        let after_step = live
            .iter()
            .filter(|&&i| manifest.snapshots[i].kind == SnapshotKind::AfterStep)
            .count();
        let mut total: u64 = live.iter().map(|&i| manifest.snapshots[i].size_bytes).sum();
        let keep = self.config.keep.max(1);
        let mut over_count = after_step.saturating_sub(keep);
        let mut doomed = Vec::new();
        for i in candidates {
            if over_count == 0 && total <= self.config.max_bytes {
                break;
            }
            over_count = over_count.saturating_sub(1);
            total = total.saturating_sub(manifest.snapshots[i].size_bytes);
            doomed.push(i);
        }
        doomed
    }
}

/// A job id as a directory name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Where `kiln rerun --from-failed` goes on from: the snapshot to restore and the leg's state
/// then. Built by the caller from a [`RunManifest`].
#[derive(Debug, Clone)]
pub struct ResumePlan {
    /// The run whose snapshot is restored.
    pub from_run: String,
    /// The last good snapshot.
    pub snapshot: VmSnapshot,
    /// Its record (the resumed run records it as its own first snapshot, never collecting it:
    /// it belongs to the earlier run).
    pub record: SnapshotRecord,
    /// The job it belongs to.
    pub job: String,
    /// The last step it includes (index, from 0): the run goes on with the next one.
    pub step: usize,
    /// The names of the steps it includes, for the summary.
    pub restored_steps: Vec<String>,
    /// The leg's state after that step.
    pub leg_state: LegRecord,
    /// The guest's base `PATH`.
    pub base_path: String,
    /// Job legs that finished before that job: not run again, their results and outputs as
    /// recorded.
    pub finished_jobs: Vec<JobRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(job: &str, step: usize, kind: SnapshotKind, size: u64) -> SnapshotRecord {
        SnapshotRecord {
            job: job.into(),
            leg: 0,
            step,
            name: format!("step {step}"),
            kind,
            dir: PathBuf::from(format!("/x/r1/snapshots/{job}-{step}")),
            size_bytes: size,
            duration_ms: 1,
            collected: false,
            env: IndexMap::new(),
            cwd: "/w".into(),
            leg_state: LegRecord::default(),
            fingerprints: Vec::new(),
        }
    }

    fn manifest(snapshots: Vec<SnapshotRecord>) -> RunManifest {
        RunManifest {
            format: FORMAT,
            run_id: "r1".into(),
            workflow_file: "/w/ci.yml".into(),
            workflow_name: "ci".into(),
            event: "push".into(),
            backend: "qemu".into(),
            isolation: "workflow".into(),
            spec: SpecRecord::from(&VmSpec::default()),
            base_path: "/usr/bin".into(),
            result: None,
            failed: None,
            jobs: Vec::new(),
            snapshots,
            rerun_of: None,
        }
    }

    fn snaps(keep: usize, max_bytes: u64) -> StepSnapshots {
        StepSnapshots {
            config: SnapshotConfig {
                root: "/x".into(),
                keep,
                max_bytes,
            },
            dir: "/x/r1".into(),
            manifest: Mutex::new(manifest(Vec::new())),
        }
    }

    #[test]
    fn retention_keeps_the_newest_by_count_and_never_the_last_good_or_the_failure() {
        let m = manifest(vec![
            record("build", 0, SnapshotKind::AfterStep, 10),
            record("build", 1, SnapshotKind::AfterStep, 10),
            record("build", 2, SnapshotKind::AfterStep, 10),
            record("build", 3, SnapshotKind::Failure, 10),
        ]);
        assert_eq!(snaps(2, u64::MAX).doomed(&m), vec![0]);
        assert_eq!(snaps(1, u64::MAX).doomed(&m), vec![0, 1]);
        // Over the size bound: everything that may go, goes; the last good and the failure stay.
        assert_eq!(snaps(10, 5).doomed(&m), vec![0, 1]);
        assert_eq!(snaps(10, 30).doomed(&m), vec![0]);
        assert!(snaps(10, 40).doomed(&m).is_empty());
    }

    #[test]
    fn the_last_good_snapshot_is_per_leg_and_before_the_failed_step() {
        let mut m = manifest(vec![
            record("a", 0, SnapshotKind::AfterStep, 1),
            record("b", 0, SnapshotKind::AfterStep, 1),
            record("b", 1, SnapshotKind::AfterStep, 1),
            record("b", 2, SnapshotKind::Failure, 1),
        ]);
        assert_eq!(m.last_good("b", 0, 2).map(|s| s.step), Some(1));
        assert_eq!(m.last_good("b", 0, 1).map(|s| s.step), Some(0));
        assert_eq!(m.last_good("a", 0, 5).map(|s| s.job.as_str()), Some("a"));
        assert!(m.last_good("b", 1, 5).is_none());
        assert_eq!(m.failure().map(|s| s.step), Some(2));
        m.snapshots[3].collected = true;
        assert!(m.failure().is_none());
    }

    #[test]
    fn fingerprints_ignore_position_but_not_content() {
        let load = |text: &str| {
            kiln_workflow::parse_workflow("ci.yml", text)
                .map_err(|e| format!("{e:?}"))
                .expect("valid workflow")
        };
        let a = load(
            "on: push\njobs:\n  b:\n    runs-on: x\n    steps:\n      - run: echo 1\n      - run: exit 1\n",
        );
        let b = load(
            "# moved\non: push\njobs:\n  b:\n    runs-on: x\n    steps:\n      - run: echo 1\n      - run: exit 0\n",
        );
        let (sa, sb) = (&a.jobs["b"].steps, &b.jobs["b"].steps);
        assert_eq!(fingerprint(&sa[0]), fingerprint(&sb[0]));
        assert_ne!(fingerprint(&sa[1]), fingerprint(&sb[1]));
    }
}
