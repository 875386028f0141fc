//! Before any VM exists: every action a run may use, resolved and checked on the host.
//!
//! The walk starts at the `uses:` steps of the selected jobs and follows composite actions into
//! their own `uses:` steps. Remote actions are resolved (override, cache, fetch) and their
//! metadata read; local actions are read from the host's copy of the workspace when they are
//! there (one created by an earlier step is read in the VM when its step runs). Docker actions,
//! `docker://` references, unreadable metadata and resolution failures become problems that
//! name the step and `file:line:col`, so a run that cannot work fails before allocating.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use kiln_workflow::{Action, ActionRuns, Span, Step, StepAction, Workflow};

use super::{ActionRef, ActionResolver, RemoteRef, ResolvedRepo, is_checkout};

/// GitHub's limit on composite actions nested in one another.
pub(crate) const MAX_ACTION_DEPTH: usize = 10;

/// GitHub's limit on reusable workflows: the caller plus nine levels of called workflows.
pub(crate) const MAX_WORKFLOW_DEPTH: usize = 9;

/// What a run may use, resolved before it starts: remote repositories by `owner/repo@ref`
/// (owner and repo lower case), and called (reusable) workflows by their `uses:` value.
#[derive(Debug, Default, Clone)]
pub(crate) struct Catalog {
    repos: HashMap<String, ResolvedRepo>,
    workflows: HashMap<String, Arc<Workflow>>,
}

impl Catalog {
    pub(crate) fn repo(&self, r: &RemoteRef) -> Option<&ResolvedRepo> {
        self.repos.get(&repo_key(r))
    }

    pub(crate) fn insert(&mut self, r: &RemoteRef, resolved: ResolvedRepo) {
        self.repos.insert(repo_key(r), resolved);
    }

    /// The workflow a job's `uses:` calls.
    pub(crate) fn workflow(&self, uses: &str) -> Option<&Arc<Workflow>> {
        self.workflows.get(uses.trim())
    }
}

fn repo_key(r: &RemoteRef) -> String {
    format!(
        "{}/{}@{}",
        r.owner.to_ascii_lowercase(),
        r.repo.to_ascii_lowercase(),
        r.git_ref
    )
}

/// Reads `action.yml` (or `action.yaml`) in `dir`. `label` names the directory in positions.
pub(crate) fn load_host_action(dir: &Path, label: &str) -> Result<Option<Action>, String> {
    for name in ["action.yml", "action.yaml"] {
        let file = dir.join(name);
        if let Ok(text) = std::fs::read_to_string(&file) {
            let shown = if label.is_empty() {
                name.to_owned()
            } else {
                format!("{label}/{name}")
            };
            return kiln_workflow::parse_action(&shown, &text)
                .map(Some)
                .map_err(|e| e.to_string());
        }
    }
    Ok(None)
}

/// One `uses:` waiting to be checked.
struct Pending {
    uses: String,
    span: Span,
    place: String,
    depth: usize,
}

/// Resolves and checks every action the selected jobs use. Returns the catalog, or one line
/// per problem.
pub(crate) async fn build(
    resolver: &ActionResolver,
    workflow: &Workflow,
    only_jobs: &[String],
    workspace: Option<&Path>,
) -> Result<Catalog, Vec<String>> {
    let mut catalog = Catalog::default();
    let mut problems = Vec::new();
    let mut queue: std::collections::VecDeque<Pending> = Default::default();
    for (id, job) in &workflow.jobs {
        if !only_jobs.is_empty() && !only_jobs.iter().any(|j| j == id) {
            continue;
        }
        push_steps(&mut queue, &job.steps, &format!("of job `{id}`"), 1);
    }
    // Called workflows first: their steps join the queue of actions to check.
    let mut calls: std::collections::VecDeque<Pending> = Default::default();
    push_calls(&mut calls, workflow, only_jobs, 1);
    let mut called: HashSet<String> = HashSet::new();
    while let Some(call) = calls.pop_front() {
        if !called.insert(call.uses.clone()) {
            continue;
        }
        if call.depth > MAX_WORKFLOW_DEPTH {
            problems.push(format!(
                "{}: {}: reusable workflows are nested more than {MAX_WORKFLOW_DEPTH} levels \
                 below the caller (GitHub's limit)",
                call.span, call.place
            ));
            continue;
        }
        match load_called(resolver, &mut catalog, &call, workspace).await {
            Ok(wf) => {
                for (id, job) in &wf.jobs {
                    push_steps(
                        &mut queue,
                        &job.steps,
                        &format!("of job `{id}` in {}", wf.file),
                        1,
                    );
                }
                push_calls(&mut calls, &wf, &[], call.depth + 1);
                catalog.workflows.insert(call.uses.clone(), Arc::new(wf));
            }
            Err(message) => problems.push(format!("{}: {}: {message}", call.span, call.place)),
        }
    }
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(item) = queue.pop_front() {
        if !seen.insert(item.uses.clone()) {
            continue;
        }
        match check_one(resolver, &mut catalog, &item, workspace).await {
            Ok(Some(action)) => {
                if let ActionRuns::Composite { steps } = &action.runs {
                    if item.depth >= MAX_ACTION_DEPTH {
                        problems.push(format!(
                            "{}: {}: composite actions are nested more than {MAX_ACTION_DEPTH} \
                             deep (GitHub's limit)",
                            item.span, item.place
                        ));
                        continue;
                    }
                    push_steps(
                        &mut queue,
                        steps,
                        &format!("of the action `{}`", item.uses),
                        item.depth + 1,
                    );
                }
            }
            Ok(None) => {}
            Err(message) => problems.push(format!("{}: {}: {message}", item.span, item.place)),
        }
    }
    if problems.is_empty() {
        Ok(catalog)
    } else {
        problems.sort();
        Err(problems)
    }
}

fn push_calls(
    calls: &mut std::collections::VecDeque<Pending>,
    workflow: &Workflow,
    only_jobs: &[String],
    depth: usize,
) {
    for (id, job) in &workflow.jobs {
        if !only_jobs.is_empty() && !only_jobs.iter().any(|j| j == id) {
            continue;
        }
        if let Some(uses) = &job.uses {
            calls.push_back(Pending {
                uses: uses.value.trim().to_owned(),
                span: uses.span.clone(),
                place: format!("job `{id}` of {}", workflow.file),
                depth,
            });
        }
    }
}

/// Reads and parses the workflow a job calls; it must be callable (`on: workflow_call`).
async fn load_called(
    resolver: &ActionResolver,
    catalog: &mut Catalog,
    call: &Pending,
    workspace: Option<&Path>,
) -> Result<Workflow, String> {
    let (file, label) = match ActionRef::parse(&call.uses)? {
        ActionRef::Local { path } => {
            let Some(ws) = workspace else {
                return Err(format!(
                    "`{}` is read from the workspace, and this run has none",
                    call.uses
                ));
            };
            (ws.join(&path), path)
        }
        ActionRef::Remote(remote) => {
            let resolved = resolve_blocking(resolver, &remote).await?;
            let file = resolved.root.join(&remote.path);
            catalog.insert(&remote, resolved);
            (file, remote.to_string())
        }
        ActionRef::Docker { .. } => {
            return Err(format!("`{}` is not a workflow", call.uses));
        }
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("Cannot read the called workflow {}: {e}", file.display()))?;
    let wf = kiln_workflow::parse_workflow(&label, &text).map_err(|e| e.to_string())?;
    if !wf.on.events.contains_key("workflow_call") {
        return Err(format!(
            "`{}` is not a reusable workflow: it has no `on: workflow_call`",
            call.uses
        ));
    }
    Ok(wf)
}

fn push_steps(
    queue: &mut std::collections::VecDeque<Pending>,
    steps: &[Step],
    owner: &str,
    depth: usize,
) {
    for step in steps {
        match &step.action {
            StepAction::Uses { uses, .. } if !is_checkout(&uses.value) => {
                queue.push_back(Pending {
                    uses: uses.value.clone(),
                    span: uses.span.clone(),
                    place: format!("step `{}` {owner}", step.display_name()),
                    depth,
                })
            }
            StepAction::Parallel { steps } => push_steps(queue, steps, owner, depth),
            _ => {}
        }
    }
}

/// Resolves one reference; returns its metadata when it could be read on the host.
async fn check_one(
    resolver: &ActionResolver,
    catalog: &mut Catalog,
    item: &Pending,
    workspace: Option<&Path>,
) -> Result<Option<Action>, String> {
    let action = match ActionRef::parse(&item.uses)? {
        ActionRef::Docker { .. } => {
            return Err(format!(
                "`{}`: Docker actions are not supported yet (no container engine runs in the \
                 guest)",
                item.uses
            ));
        }
        ActionRef::Local { path } => {
            let Some(ws) = workspace else {
                return Ok(None);
            };
            let dir = ws.join(&path);
            load_host_action(&dir, &path)?
        }
        ActionRef::Remote(remote) => {
            let resolved = resolve_blocking(resolver, &remote).await?;
            let dir = resolved.root.join(&remote.path);
            catalog.insert(&remote, resolved.clone());
            let label = remote.to_string();
            match load_host_action(&dir, &label)? {
                Some(action) => Some(action),
                None => {
                    return Err(format!(
                        "`{}` has no action.yml or action.yaml (looked in {})",
                        item.uses,
                        dir.display()
                    ));
                }
            }
        }
    };
    if let Some(Action {
        runs: ActionRuns::Docker { using, .. },
        ..
    }) = &action
    {
        return Err(format!(
            "`{}` is a Docker container action ({}: `using: {}`), which kiln does not run yet \
             (no container engine runs in the guest)",
            item.uses, using.span, using.value
        ));
    }
    Ok(action)
}

/// Runs the (blocking, `git`-spawning) resolver off the async threads.
pub(crate) async fn resolve_blocking(
    resolver: &ActionResolver,
    remote: &RemoteRef,
) -> Result<ResolvedRepo, String> {
    let resolver = resolver.clone();
    let remote = remote.clone();
    tokio::task::spawn_blocking(move || resolver.resolve(&remote))
        .await
        .map_err(|e| format!("the resolver stopped: {e}"))?
        .map_err(|e| e.to_string())
}
