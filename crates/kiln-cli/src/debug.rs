//! `kiln debug RUN [--step N] [-- CMD]`: a run's step snapshot restored into a fresh VM.
//!
//! The failure state (or the snapshot after step N) is restored into a new VM of the backend
//! that took it. With `-- CMD`, CMD runs in the step's environment and working directory, its
//! output goes to stdout/stderr, and kiln exits with its exit code. Without a command, an
//! interactive shell (bash, else sh) runs there on a pseudo-terminal joined to kiln's own
//! terminal (see [`crate::terminal`]). The VM is released when debug ends, also on an error or
//! Ctrl-C.

use std::io::Write;
use std::sync::Arc;

use anyhow::anyhow;
use kiln_runner::executor::snapshots::{RunManifest, SnapshotError, SnapshotKind, SnapshotRecord};
use kiln_vm::{BackendKind, ExecRequest, ExitStatus, Stream, Vm, VmProvider, select_backend};
use tokio::sync::mpsc;

use crate::args::DebugArgs;
use crate::config::{Dirs, FileConfig};
use crate::{Exit, exit, usage};

/// `kiln debug`.
pub async fn debug(file: &FileConfig, args: DebugArgs) -> Result<u8, Exit> {
    let dirs = Dirs::from_env();
    let manifest = load_manifest(&dirs, &args.run)?;
    let record = pick(&manifest, args.step, args.job.as_deref())?;
    let provider = provider_for(file, &dirs, &manifest).await?;
    let snapshot = manifest.vm_snapshot(record);
    let what = match record.kind {
        SnapshotKind::Failure => format!("the failure state of step {}", record.step + 1),
        SnapshotKind::AfterStep => format!("the snapshot after step {}", record.step + 1),
    };
    eprintln!(
        "Restoring {what} (`{}`) of job {} of run {}…",
        record.name, record.job, manifest.run_id
    );
    let allocation = provider.restore(&snapshot).await.map_err(|e| {
        Exit::new(
            exit::INFRA,
            anyhow::Error::new(e).context(format!("Cannot restore {what}")),
        )
    })?;
    let vm = allocation.vm;
    eprintln!(
        "VM {} restored in {} ms; working directory {}",
        vm.id(),
        allocation.elapsed.as_millis(),
        record.cwd
    );
    let result = if args.command.is_empty() {
        // Ctrl-C belongs to the guest's shell (`terminal::attach` forwards it); `exit` ends it.
        eprintln!(
            "Shell in VM {}; `exit` ends it and releases the VM.",
            vm.id()
        );
        session(&vm, record, &args.command).await
    } else {
        tokio::select! {
            r = session(&vm, record, &args.command) => r,
            _ = tokio::signal::ctrl_c() => Ok(exit::CANCELLED),
        }
    };
    if let Err(e) = provider.release(&*vm).await {
        eprintln!("warning: releasing VM {} failed: {e}", vm.id());
    }
    result
}

/// Reads a run's record, with errors that say what to do.
pub fn load_manifest(dirs: &Dirs, run: &str) -> Result<RunManifest, Exit> {
    let root = crate::rerun::runs_root(dirs);
    RunManifest::load(&root, run).map_err(|e| match e {
        SnapshotError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            usage(anyhow!(
                "Run `{run}` has no step snapshots: run the workflow with `kiln run --snapshots \
                 steps` (records are in {})",
                root.display()
            ))
        }
        other => Exit::new(exit::INFRA, other),
    })
}

/// The snapshot to restore: after step N of a job, or the failure state.
fn pick<'m>(
    manifest: &'m RunManifest,
    step: Option<usize>,
    job: Option<&str>,
) -> Result<&'m SnapshotRecord, Exit> {
    let run = &manifest.run_id;
    let record = match step {
        Some(0) => return Err(usage(anyhow!("--step counts from 1"))),
        Some(n) => {
            let job = job
                .map(str::to_owned)
                .or_else(|| manifest.failed.as_ref().map(|f| f.job.clone()))
                .or_else(|| manifest.snapshots.first().map(|s| s.job.clone()))
                .ok_or_else(|| usage(anyhow!("Run {run} has no step snapshots")))?;
            let found = manifest
                .snapshots
                .iter()
                .rev()
                .find(|s| s.kind == SnapshotKind::AfterStep && s.job == job && s.step + 1 == n);
            let Some(found) = found else {
                let have: Vec<String> = manifest
                    .snapshots
                    .iter()
                    .filter(|s| s.kind == SnapshotKind::AfterStep && s.job == job && !s.collected)
                    .map(|s| (s.step + 1).to_string())
                    .collect();
                return Err(usage(anyhow!(
                    "Run {run} has no snapshot after step {n} of job {job} (it did not succeed, \
                     or was not reached); snapshots exist after steps: {}",
                    if have.is_empty() {
                        "none".to_owned()
                    } else {
                        have.join(", ")
                    }
                )));
            };
            found
        }
        None => manifest.failure().ok_or_else(|| {
            usage(anyhow!(
                "Run {run} has no failure state (it {}); pick a snapshot with --step N",
                match &manifest.result {
                    Some(r) if r != "failure" => format!("ended with {r}"),
                    _ => "has none recorded".to_owned(),
                }
            ))
        })?,
    };
    if record.collected {
        return Err(usage(anyhow!(
            "The snapshot after step {} of job {} of run {run} was collected by retention \
             ([runner] snapshot_keep / snapshot_max_mib)",
            record.step + 1,
            record.job
        )));
    }
    if !record.dir.is_dir() {
        return Err(usage(anyhow!(
            "The snapshot files of run {run} are gone ({} does not exist)",
            record.dir.display()
        )));
    }
    Ok(record)
}

/// The backend that took a run's snapshots.
pub async fn provider_for(
    file: &FileConfig,
    dirs: &Dirs,
    manifest: &RunManifest,
) -> Result<Arc<dyn VmProvider>, Exit> {
    let kind: BackendKind = manifest.backend.parse().map_err(|e| {
        Exit::new(
            exit::INFRA,
            anyhow!(
                "Run {} was made by backend {}: {e}",
                manifest.run_id,
                manifest.backend
            ),
        )
    })?;
    let config = file.backend_config(dirs, None).map_err(usage)?;
    let selection = select_backend(kind, &config)
        .await
        .map_err(|e| Exit::new(exit::INFRA, e))?;
    Ok(selection.provider)
}

/// Runs the command, or an interactive shell, in the restored VM.
async fn session(
    vm: &Arc<dyn Vm>,
    record: &SnapshotRecord,
    command: &[String],
) -> Result<u8, Exit> {
    if command.is_empty() {
        let request = kiln_vm::PtyRequest {
            // Not a login shell: /etc/profile would reset the step's PATH.
            command: kiln_vm::Command::Argv(vec![
                "sh".into(),
                "-c".into(),
                "if command -v bash >/dev/null 2>&1; then exec bash -i; else exec sh -i; fi".into(),
            ]),
            env: record
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            cwd: Some(record.cwd.clone()),
            user: kiln_vm::ExecUser::Runner,
            size: kiln_vm::WindowSize { rows: 24, cols: 80 },
        };
        let code = crate::terminal::attach(&**vm, request)
            .await
            .map_err(|e| Exit::new(exit::INFRA, e))?;
        return Ok(u8::try_from(code & 0xff).unwrap_or(1));
    }
    let request = ExecRequest {
        command: kiln_vm::Command::Argv(command.to_vec()),
        env: record
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cwd: Some(record.cwd.clone()),
        timeout: None,
        user: kiln_vm::ExecUser::Runner,
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<kiln_vm::Output>();
    let printer = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            let _ = match chunk.stream {
                Stream::Stdout => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&chunk.data).and_then(|()| out.flush())
                }
                Stream::Stderr => {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&chunk.data).and_then(|()| err.flush())
                }
            };
        }
    });
    let outcome = vm.exec(request, tx).await;
    let _ = printer.await;
    let outcome = outcome.map_err(|e| Exit::new(exit::INFRA, e))?;
    Ok(match outcome.status {
        ExitStatus::Exited(code) => u8::try_from(code & 0xff).unwrap_or(1),
        ExitStatus::Signaled(signal) => u8::try_from((128 + signal) & 0xff).unwrap_or(1),
        ExitStatus::TimedOut => 124,
    })
}
