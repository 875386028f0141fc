//! `kiln run`, `kiln doctor` and `kiln image`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use indexmap::IndexMap;
use kiln_runner::event::{Conclusion, EventSink, RunEvent};
use kiln_runner::executor::actions::ActionConfig;
use kiln_runner::executor::{ExecError, GitInfo, RunContext, RunOptions, WorkflowExecutor};
use kiln_runner::session::{SessionConfig, SessionManager};
use kiln_runner::workspace;
use kiln_vm::{BackendKind, select_backend};
use kiln_workflow::{Event, StepAction, Workflow};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::args::RunArgs;
use crate::config::{Dirs, FileConfig, Settings};
use crate::render::{Style, Terminal, summary};
use crate::workflows::{discover, display_path, load};
use crate::{Exit, exit, inputs, usage};

/// `kiln run`.
pub async fn run(file: &FileConfig, args: RunArgs) -> Result<u8, Exit> {
    let settings = Settings::resolve(file, &args).map_err(usage)?;
    let context = run_context(&args)?;
    let matrix_filter = args
        .matrix
        .iter()
        .map(|m| {
            m.split_once(':')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| usage(anyhow!("--matrix {m}: expected KEY:VALUE")))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let single = args.path.is_file();
    // The event as the trigger filters see it: branch and tag filters apply to its ref.
    let event = Event {
        name: args.event.clone(),
        payload: context.event_payload.clone(),
        changed_files: None,
    };
    let root = workspace_root(&args)?;
    // Each workflow with the VM types of its runs (its `[workflows."PATH"]` quota applied).
    let mut workflows: Vec<Workflow> = Vec::new();
    let mut vm_types = Vec::new();
    for path in discover(&args.path)? {
        let workflow = load(&path)?;
        if single || workflow.on.matches(&event) {
            vm_types.push(Arc::new(
                settings.vms.for_workflow(&workflow_key(&root, &path)),
            ));
            workflows.push(workflow);
        }
    }
    if single && !workflows.iter().all(|w| w.on.matches(&event)) {
        eprintln!(
            "note: {} does not trigger on `{}`; running it anyway because it was named",
            display_path(&args.path),
            args.event
        );
    }
    if workflows.is_empty() {
        eprintln!(
            "No workflow in {} runs on `{}`; nothing to do.",
            display_path(&args.path),
            args.event
        );
        return Ok(exit::SUCCESS);
    }
    // `--input` values are checked against the inputs the triggering event declares (types,
    // choices, `required`) and defaults are filled in, before anything is allocated.
    let inputs = workflows
        .iter()
        .map(|w| resolve_inputs(w, &args.event, &context.inputs))
        .collect::<Result<Vec<_>, _>>()?;
    if args.dry_run {
        for workflow in &workflows {
            print_plan(workflow, &args.jobs)?;
        }
        return Ok(exit::SUCCESS);
    }

    let dirs = Dirs::from_env();
    let backend_config = file
        .backend_config(&dirs, settings.boot_timeout)
        .map_err(usage)?;
    let mut selection = select_backend(settings.backend, &backend_config)
        .await
        .map_err(|e| Exit::new(exit::INFRA, e))?;
    // `auto` fell back to local only because no image is built: offer to build it.
    if settings.backend == BackendKind::Auto
        && !selection.provider.isolates()
        && crate::image::only_the_image_is_missing(&backend_config)
        && crate::image::offer_default_image(file, &dirs.data, !args.no_build_prompt).await?
    {
        selection = select_backend(settings.backend, &backend_config)
            .await
            .map_err(|e| Exit::new(exit::INFRA, e))?;
    }
    let style = Style::detect();
    if !selection.provider.isolates() {
        eprintln!(
            "warning: the {} backend does NOT isolate: workflow steps run directly on this host as \
             your user ({})",
            selection.provider.name(),
            selection.reason
        );
    } else {
        eprintln!(
            "Backend {}: {}",
            selection.provider.name(),
            selection.reason
        );
    }

    // Only what git would commit is copied into the VM (no build output, no ignored files).
    let staged =
        match &context.workspace {
            Some(dir) => Some(workspace::stage(dir).map_err(|e| {
                Exit::new(exit::INFRA, anyhow!("Cannot stage {}: {e}", dir.display()))
            })?),
            None => None,
        };
    let mut context = context;
    context.workspace = staged.as_ref().map(|s| s.path().to_path_buf());

    let metrics = settings
        .metrics_addr
        .map(|_| std::sync::Arc::new(kiln_runner::metrics::Metrics::new()));
    let metrics_server = match (settings.metrics_addr, &metrics) {
        (Some(addr), Some(m)) => Some(
            crate::pool::serve_metrics(addr, m.clone())
                .await
                .map_err(|e| Exit::new(exit::INFRA, e))?,
        ),
        _ => None,
    };
    let pooled = crate::pool::provider(
        selection.provider.clone(),
        settings.pools.clone(),
        settings.cold,
        metrics.clone(),
    )
    .map_err(usage)?;
    let _pool_status = crate::pool::publish_status(&dirs.runtime, pooled.clone());
    let sessions = SessionManager::with_pools(
        pooled.clone(),
        SessionConfig {
            max_sessions: settings.max_sessions,
            on_limit: settings.on_limit,
            ..SessionConfig::default()
        },
    );
    let mut action_config = ActionConfig {
        base_url: args.actions_url.clone(),
        cache_dir: args
            .action_cache
            .clone()
            .unwrap_or_else(|| dirs.data.join("actions")),
        offline: args.offline,
        overrides: Vec::new(),
    };
    for spec in &args.local_actions {
        action_config.overrides.push(
            ActionConfig::parse_override(spec).map_err(|e| usage(anyhow!("--local-action {e}")))?,
        );
    }
    let mut executor = WorkflowExecutor::new(sessions.clone()).with_actions(action_config);
    if let Some((keep, max_mib)) = settings.step_snapshots {
        executor = executor.with_snapshots(crate::rerun::snapshot_config(&dirs, keep, max_mib));
    }
    let (recorder, recording) =
        crate::runs::Recorder::open(&crate::runs::database_path(file, &dirs)).await;
    let cancel = CancellationToken::new();
    let abort = CancellationToken::new();
    let interrupts = tokio::spawn(watch_interrupts(cancel.clone(), abort.clone()));

    let (tx, mut rx) = mpsc::unbounded_channel::<RunEvent>();
    let json = args.json;
    let (observer, backend) = (metrics.clone(), selection.provider.name());
    let record = recorder.clone();
    let renderer = tokio::spawn(async move {
        let mut terminal = Terminal::new(style, json);
        while let Some(event) = rx.recv().await {
            record.event(&event);
            terminal.event(&event);
            if let Some(metrics) = &observer {
                metrics.observe(backend, &event);
            }
        }
    });

    let mut tasks = Vec::new();
    for ((workflow, inputs), vm_types) in workflows.into_iter().zip(inputs).zip(vm_types) {
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let mut context = context.clone();
        context.inputs = inputs;
        recorder.start(&run_id, crate::runs::new_run(&workflow, &context, None));
        let options = RunOptions {
            run_id: run_id.clone(),
            isolation: settings.isolation,
            spec: settings.spec.clone(),
            vm_types: Some(vm_types),
            context,
            only_jobs: args.jobs.clone(),
            matrix_filter: matrix_filter.clone(),
        };
        let events = EventSink::new(run_id.clone(), tx.clone());
        let executor = executor.clone();
        let (cancel, abort) = (cancel.child_token(), abort.clone());
        tasks.push((
            run_id,
            tokio::spawn(async move {
                tokio::select! {
                    r = executor.execute(&workflow, &options, &events, &cancel) => Some(r),
                    () = abort.cancelled() => None,
                }
            }),
        ));
    }
    drop(tx);

    let mut outcomes = Vec::new();
    for (run_id, task) in tasks {
        outcomes.push((run_id, task.await));
    }
    let _ = renderer.await;
    interrupts.abort();
    // Aborted runs release their sessions from the guards' drop; wait for that to finish.
    wait_for_release(&sessions, Duration::from_secs(15)).await;
    pooled.shutdown().await;
    if let Some(server) = metrics_server {
        server.abort();
    }
    drop(staged);

    let mut code = exit::SUCCESS;
    let mut raise = |c: u8| {
        let rank = |c: u8| match c {
            exit::CANCELLED => 4,
            exit::INFRA => 3,
            exit::USAGE => 2,
            exit::FAILURE => 1,
            _ => 0,
        };
        if rank(c) > rank(code) {
            code = c;
        }
    };
    for (run_id, outcome) in outcomes {
        crate::runs::record_outcome(&recorder, &run_id, &outcome);
        match outcome {
            Ok(Some(Ok(report))) => {
                if !json {
                    eprint!("{}", summary(style, &report, &run_id));
                }
                raise(match report.result {
                    Conclusion::Success | Conclusion::Skipped => exit::SUCCESS,
                    Conclusion::Failure => exit::FAILURE,
                    Conclusion::Cancelled => exit::CANCELLED,
                });
            }
            Ok(Some(Err(e))) => {
                eprintln!("error: run {run_id}: {}", error_chain(&e));
                raise(if e.is_user_error() {
                    exit::USAGE
                } else {
                    exit::INFRA
                });
            }
            Ok(None) => {
                eprintln!("run {run_id}: stopped");
                raise(exit::CANCELLED);
            }
            Err(join) => {
                eprintln!("error: run {run_id} crashed: {join}; its VM was released");
                raise(exit::INFRA);
            }
        }
    }
    drop(recorder);
    recording.close().await;
    if cancel.is_cancelled() {
        raise(exit::CANCELLED);
    }
    Ok(code)
}

/// The `inputs` context of one workflow for `event`.
fn resolve_inputs(
    workflow: &Workflow,
    event: &str,
    given: &IndexMap<String, serde_json::Value>,
) -> Result<IndexMap<String, serde_json::Value>, Exit> {
    let Some(trigger) = workflow
        .on
        .events
        .get(event)
        .filter(|_| matches!(event, "workflow_dispatch" | "workflow_call"))
    else {
        return Ok(given.clone());
    };
    let raw: IndexMap<String, String> = given
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    trigger.resolve_inputs(&raw).map_err(|errors| {
        usage(anyhow!(
            "{}: invalid --input for `{event}`:\n  {}",
            workflow.file,
            errors.join("\n  ")
        ))
    })
}

fn error_chain(e: &ExecError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

async fn wait_for_release(sessions: &SessionManager, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while sessions.active_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// First Ctrl-C: cancel (running steps are killed, `always()` steps and cleanup still run).
/// Second: stop at once (sessions are still released).
async fn watch_interrupts(cancel: CancellationToken, abort: CancellationToken) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    eprintln!(
        "\nCancelling: running steps are stopped, cleanup still runs. Ctrl-C again to stop at once."
    );
    cancel.cancel();
    if tokio::signal::ctrl_c().await.is_ok() {
        eprintln!("\nStopping now; releasing VMs.");
        abort.cancel();
    }
}

/// The repository root of a run: the directory PATH names, else the current directory.
fn workspace_root(args: &RunArgs) -> Result<std::path::PathBuf, Exit> {
    if args.path.is_dir() {
        Ok(args.path.clone())
    } else {
        std::env::current_dir().map_err(|e| usage(anyhow!("No current directory: {e}")))
    }
}

/// A workflow file's `[workflows."PATH"]` key: its path relative to the repository root (as
/// given when it is outside it).
pub(crate) fn workflow_key(root: &std::path::Path, file: &std::path::Path) -> String {
    let absolute = |p: &std::path::Path| {
        std::fs::canonicalize(p)
            .or_else(|_| std::path::absolute(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let file_abs = absolute(file);
    let relative = file_abs
        .strip_prefix(absolute(root))
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|_| file.to_path_buf());
    relative.to_string_lossy().into_owned()
}

fn run_context(args: &RunArgs) -> Result<RunContext, Exit> {
    let workspace_dir = workspace_root(args)?;
    let git = GitInfo::discover(&workspace_dir);
    let mut context = RunContext::new(args.event.clone(), Some(workspace_dir), git);
    if let Some(path) = &args.event_path {
        let text = std::fs::read_to_string(path)
            .map_err(|e| usage(anyhow!("Cannot read {}: {e}", path.display())))?;
        context.event_payload = serde_json::from_str(&text)
            .map_err(|e| usage(anyhow!("{}: invalid JSON: {e}", path.display())))?;
    } else {
        context.event_payload = default_payload(&context);
    }
    let mut secrets = IndexMap::new();
    if let Some(path) = &args.secret_file {
        secrets.extend(inputs::read_env_file(path).map_err(usage)?);
    }
    for s in &args.secrets {
        let (k, v) = inputs::parse_pair("--secret", s, true).map_err(usage)?;
        secrets.insert(k, v);
    }
    let mut vars = IndexMap::new();
    if let Some(path) = &args.var_file {
        vars.extend(inputs::read_env_file(path).map_err(usage)?);
    }
    for s in &args.vars {
        let (k, v) = inputs::parse_pair("--var", s, false).map_err(usage)?;
        vars.insert(k, v);
    }
    for s in &args.inputs {
        let (k, v) = inputs::parse_pair("--input", s, false).map_err(usage)?;
        context.inputs.insert(k, serde_json::Value::String(v));
    }
    if let Some(path) = &args.env_file {
        context.env = inputs::read_env_file(path).map_err(usage)?;
    }
    context.secrets = secrets;
    context.vars = vars;
    Ok(context)
}

/// A minimal payload shaped like GitHub's for the event, so `github.event.*` lookups work.
fn default_payload(context: &RunContext) -> serde_json::Value {
    let git = &context.git;
    let repository = serde_json::json!({
        "full_name": git.repository,
        "name": git.repository.split_once('/').map_or(git.repository.as_str(), |(_, n)| n),
        "owner": { "login": git.owner() },
        "default_branch": "main",
    });
    match context.event_name.as_str() {
        "push" => serde_json::json!({
            "ref": git.git_ref,
            "after": git.sha,
            "before": "0".repeat(40),
            "repository": repository,
            "head_commit": { "id": git.sha },
        }),
        "workflow_dispatch" => serde_json::json!({
            "ref": git.git_ref,
            "inputs": context.inputs,
            "repository": repository,
        }),
        _ => serde_json::json!({ "repository": repository }),
    }
}

fn print_plan(workflow: &Workflow, only: &[String]) -> Result<(), Exit> {
    let levels = kiln_workflow::job_order(workflow).map_err(|e| usage(anyhow!("{e}")))?;
    println!("{} ({})", workflow.display_name(), workflow.file);
    for (stage, level) in levels.iter().enumerate() {
        for job_id in level {
            if !only.is_empty() && !only.contains(job_id) {
                continue;
            }
            let Some(job) = workflow.jobs.get(job_id) else {
                continue;
            };
            println!("  stage {stage}: job {job_id}");
            for step in &job.steps {
                let what = match &step.action {
                    StepAction::Run { .. } => "run",
                    StepAction::Uses { .. } => "uses",
                    _ => "background (not supported yet)",
                };
                println!("    {}. [{what}] {}", step.index + 1, step.display_name());
            }
        }
    }
    Ok(())
}

/// `kiln doctor`: each backend's availability and why, the host facts behind it, and a
/// one-line verdict.
pub async fn doctor(file: &FileConfig) -> Result<u8, Exit> {
    let dirs = Dirs::from_env();
    let config = file.backend_config(&dirs, None).map_err(usage)?;
    println!("data dir:     {}", dirs.data.display());
    println!("runtime dir:  {}", dirs.runtime.display());
    println!("free disk:    {}", free_space(&dirs.data));
    let kvm = std::path::Path::new("/dev/kvm");
    println!(
        "/dev/kvm:     {}",
        match std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
            Ok(_) => "present and openable (whether guests boot is decided by a probe boot)",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "absent",
            Err(_) => "present but not accessible to this user",
        }
    );
    let qemu = kiln_vm::qemu::missing_tools(&config.qemu()).map_or_else(
        || "qemu-system-x86_64 and qemu-img found".to_owned(),
        |missing| format!("missing: {missing}"),
    );
    println!("qemu:         {qemu}");
    if let Some(version) = kiln_vm::qemu::qemu_version(&config.qemu()).await {
        println!("qemu version: {version}");
    }
    for line in kiln_vm::firecracker::doctor(&config.firecracker()).await {
        println!("{line}");
    }
    match kiln_vm::image::list(&dirs.data) {
        Ok(images) if images.is_empty() => {
            println!("images:       none (build one with `kiln image build`)")
        }
        Ok(images) => {
            let names: Vec<String> = images
                .iter()
                .map(|i| format!("{} (kernel {})", i.name(), i.manifest.kernel_version))
                .collect();
            println!("images:       {}", names.join(", "));
        }
        Err(e) => println!("images:       unreadable: {e}"),
    }
    match file.vm_config() {
        Ok(vms) => {
            for ty in vms.types.types() {
                let limit = ty.timeout.map_or_else(
                    || "no run time limit".to_owned(),
                    |t| format!("runs up to {} min", t.as_secs() / 60),
                );
                println!(
                    "vm type:      {ty}, {limit}; runs-on [{}]",
                    vms.types.labels_of(ty).join(", ")
                );
            }
            for (path, quota) in &vms.quotas {
                let set: Vec<String> = [
                    quota.vcpus.map(|n| format!("{n} vCPU")),
                    quota.memory_mib.map(|n| format!("{n} MiB memory")),
                    quota.disk_mib.map(|n| format!("{n} MiB disk")),
                    quota
                        .timeout
                        .map(|t| format!("runs up to {} min", t.as_secs() / 60)),
                ]
                .into_iter()
                .flatten()
                .collect();
                println!("quota:        {path}: {}", set.join(", "));
            }
        }
        Err(e) => println!("vm types:     invalid: {e:#}"),
    }
    println!();
    let mut best = None;
    for kind in [
        BackendKind::Auto,
        BackendKind::Local,
        BackendKind::Qemu,
        BackendKind::Firecracker,
    ] {
        match select_backend(kind, &config).await {
            Ok(s) => {
                println!(
                    "{kind:<12} -> {} ({}){}",
                    s.provider.name(),
                    s.reason,
                    if s.provider.isolates() {
                        ""
                    } else {
                        " — no isolation"
                    }
                );
                if kind == BackendKind::Auto {
                    best = Some((s.provider.name(), s.provider.isolates()));
                }
            }
            Err(e) => println!("{kind:<12} unavailable: {e}"),
        }
    }
    println!();
    match best {
        Some((name, true)) => println!("verdict: ready — runs use the {name} backend (real VMs)"),
        Some((name, false)) => println!(
            "verdict: runs use the {name} backend WITHOUT isolation; install QEMU and run \
             `kiln image build` for real VMs"
        ),
        None => println!("verdict: no backend works on this host"),
    }
    Ok(exit::SUCCESS)
}

/// Free space on the file system holding `path` (or its nearest existing parent).
fn free_space(path: &std::path::Path) -> String {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
    match rustix::fs::statvfs(existing) {
        Ok(st) => format!(
            "{:.1} GiB at {}",
            (st.f_bavail * st.f_frsize) as f64 / (1u64 << 30) as f64,
            existing.display()
        ),
        Err(e) => format!("unknown ({e})"),
    }
}
