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

use kiln_workflow::{Action, ActionRuns, Span, Step, StepAction, Workflow};

use super::{ActionRef, ActionResolver, RemoteRef, ResolvedRepo, is_checkout};

/// GitHub's limit on composite actions nested in one another.
pub(crate) const MAX_ACTION_DEPTH: usize = 10;

/// Remote repositories resolved for one run, by `owner/repo@ref` (owner and repo lower case).
#[derive(Debug, Default, Clone)]
pub(crate) struct Catalog {
    repos: HashMap<String, ResolvedRepo>,
}

impl Catalog {
    pub(crate) fn repo(&self, r: &RemoteRef) -> Option<&ResolvedRepo> {
        self.repos.get(&repo_key(r))
    }

    pub(crate) fn insert(&mut self, r: &RemoteRef, resolved: ResolvedRepo) {
        self.repos.insert(repo_key(r), resolved);
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
