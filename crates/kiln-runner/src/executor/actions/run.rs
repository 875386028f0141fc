//! Running actions in the VM: composite steps, JavaScript entry points with their `pre` and
//! `post` scripts, and the native `actions/checkout`.
//!
//! ```text
//! job leg start   for each top-level remote JavaScript action with `pre:`: pre-if -> "Pre <step>"
//! the step        inputs (with > default > "") -> INPUT_* (JavaScript) or ${{ inputs.* }} (composite)
//!   node<N>       node <dir>/<main>, STATE_* from its pre; `post:` registered
//!   composite     each step: if -> env -> run (shell required) | uses (nested, depth <= 10)
//!                 outputs mapped from the composite's own `steps` context
//! job leg end     registered posts in reverse: post-if (default always()) -> "Post <step>"
//! ```
//!
//! A composite's steps see the caller's environment plus their own `env:`; none of it leaks
//! back to the caller. What they write to `GITHUB_ENV`/`GITHUB_PATH` changes the job, as on
//! GitHub. `GITHUB_STATE` values saved by an action's `pre` or main script reach its later
//! scripts as `STATE_<name>`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use kiln_vm::{ExecRequest, Vm};
use kiln_workflow::{
    Action, ActionRuns, Condition, JobStatus, NodeRuns, Spanned, Step, StepAction, Template, Value,
};
use tokio::sync::mpsc;

use super::super::{
    LegState, RunState, StaticHost, StepCx, StepDone, StepReport, WorkflowExecutor, context,
    eval_bool, eval_condition, eval_string, resolve_dir, shell, string_map_value,
};
use super::catalog::{MAX_ACTION_DEPTH, load_host_action};
use super::{ActionRef, input_env_name, is_checkout};
use crate::event::{Conclusion, EventKind, LogStream};

/// A `uses:` to run.
pub(crate) struct ActionCall<'a> {
    /// The reference as written.
    pub uses: &'a Spanned<String>,
    /// `with:`.
    pub with: &'a IndexMap<String, Template>,
    /// The calling step's environment (workflow, job, `GITHUB_ENV`, the step's `env:`).
    pub env: &'a IndexMap<String, String>,
    /// 0 for a job's step; +1 per enclosing composite.
    pub depth: usize,
}

/// An action's `post:` script, waiting for the end of the job.
#[derive(Debug, Clone)]
pub(crate) struct PostStep {
    /// "Post <step name>".
    name: String,
    /// The job step the action belongs to.
    step: Step,
    /// The script's guest path.
    script: String,
    /// `post-if:`.
    condition: Option<Condition>,
    /// Environment of the main script (inputs, action variables), without state.
    env: IndexMap<String, String>,
    /// What the pre and main scripts saved.
    state: IndexMap<String, String>,
}

/// An action found and ready to run in the VM.
struct Located {
    action: Action,
    /// The action's directory in the guest.
    dir: String,
    /// `owner/repo` (empty for a local action).
    repository: String,
    /// The ref (empty for a local action).
    git_ref: String,
    local: bool,
}

type BoxedStep<'a> = Pin<Box<dyn Future<Output = StepDone> + Send + 'a>>;

impl WorkflowExecutor {
    /// Runs the action a `uses:` step names.
    pub(in crate::executor) fn run_action<'a>(
        &'a self,
        cx: &'a StepCx<'a, 'a>,
        leg: &'a mut LegState,
        call: &'a ActionCall<'a>,
        ctx: &'a IndexMap<String, Value>,
        host: &'a StaticHost,
    ) -> BoxedStep<'a> {
        Box::pin(async move {
            if call.depth > MAX_ACTION_DEPTH {
                return StepDone::failed(format!(
                    "`{}`: composite actions are nested more than {MAX_ACTION_DEPTH} deep \
                     (GitHub's limit)",
                    call.uses.value
                ));
            }
            let located = match self.locate(cx, &call.uses.value).await {
                Ok(l) => l,
                Err(e) => return StepDone::failed(e),
            };
            let inputs = match self.action_inputs(cx, &located.action, call.with, ctx, host) {
                Ok(i) => i,
                Err(e) => return StepDone::failed(e),
            };
            match &located.action.runs {
                ActionRuns::Docker { using, .. } => StepDone::failed(format!(
                    "{}: Docker container actions are not supported yet (no container engine \
                     runs in the guest)",
                    using.span
                )),
                ActionRuns::Node(node) => {
                    self.run_node_main(cx, leg, call, &located, node, &inputs)
                        .await
                }
                ActionRuns::Composite { steps } => {
                    self.run_composite(cx, leg, call, &located, steps, &inputs, ctx, host)
                        .await
                }
            }
        })
    }

    /// Finds the action's files in the VM (copying a remote one in once per session) and reads
    /// its metadata.
    async fn locate(&self, cx: &StepCx<'_, '_>, uses: &str) -> Result<Located, String> {
        let layout = &cx.prepared.layout;
        match ActionRef::parse(uses)? {
            ActionRef::Docker { .. } => Err(format!(
                "`{uses}`: Docker actions are not supported yet (no container engine runs in \
                 the guest)"
            )),
            ActionRef::Local { path } => {
                let dir = resolve_dir(&layout.workspace, Some(&path));
                for name in ["action.yml", "action.yaml"] {
                    if let Ok(bytes) = cx.vm.read_file(&format!("{dir}/{name}")).await {
                        let text = String::from_utf8_lossy(&bytes);
                        let label = if path.is_empty() {
                            name.to_owned()
                        } else {
                            format!("{path}/{name}")
                        };
                        let action = kiln_workflow::parse_action(&label, &text)
                            .map_err(|e| e.to_string())?;
                        return Ok(Located {
                            action,
                            dir,
                            repository: String::new(),
                            git_ref: String::new(),
                            local: true,
                        });
                    }
                }
                Err(format!(
                    "Can't find action.yml or action.yaml in {dir} for `{uses}`: a local action \
                     is read from the workspace (was it checked out or created by an earlier \
                     step?)"
                ))
            }
            ActionRef::Remote(remote) => {
                let resolved =
                    cx.state.catalog.repo(&remote).cloned().ok_or_else(|| {
                        format!("`{uses}` was not resolved before the run started")
                    })?;
                let guest_root = format!(
                    "{}/{}/{}/{}",
                    layout.actions, remote.owner, remote.repo, resolved.commit
                );
                let needs_copy = cx
                    .prepared
                    .copied
                    .lock()
                    .map(|set| !set.contains(&guest_root))
                    .unwrap_or(true);
                if needs_copy {
                    cx.vm
                        .copy_in(&resolved.root, &guest_root)
                        .await
                        .map_err(|e| format!("Copying `{uses}` into the VM failed: {e}"))?;
                    if let Ok(mut set) = cx.prepared.copied.lock() {
                        set.insert(guest_root.clone());
                    }
                }
                let host_dir = resolved.root.join(&remote.path);
                let action = load_host_action(&host_dir, &remote.to_string())?
                    .ok_or_else(|| format!("`{uses}` has no action.yml or action.yaml"))?;
                let dir = if remote.path.is_empty() {
                    guest_root
                } else {
                    format!("{guest_root}/{}", remote.path)
                };
                Ok(Located {
                    action,
                    dir,
                    repository: remote.repository(),
                    git_ref: remote.git_ref.clone(),
                    local: false,
                })
            }
        }
    }

    /// The action's inputs: `with:` (names match case-insensitively), else the evaluated
    /// `default`, else empty. Undeclared `with:` keys are kept and warned about, as GitHub
    /// does; `required` is left to the action (GitHub's runner does not enforce it).
    fn action_inputs(
        &self,
        cx: &StepCx<'_, '_>,
        action: &Action,
        with: &IndexMap<String, Template>,
        ctx: &IndexMap<String, Value>,
        host: &StaticHost,
    ) -> Result<IndexMap<String, String>, String> {
        let mut given: IndexMap<String, (String, String)> = IndexMap::new();
        for (key, template) in with {
            given.insert(
                key.to_ascii_lowercase(),
                (key.clone(), eval_string(template, ctx, host)?),
            );
        }
        let mut inputs = IndexMap::new();
        for (name, input) in &action.inputs {
            match given.shift_remove(&name.to_ascii_lowercase()) {
                Some((_, value)) => {
                    if let Some(message) = &input.deprecation_message {
                        warn(
                            cx,
                            &format!("Input '{name}' has been deprecated with message: {message}"),
                        );
                    }
                    inputs.insert(name.clone(), value);
                }
                None => {
                    let value = match &input.default {
                        Some(t) => eval_string(t, ctx, host)?,
                        None => String::new(),
                    };
                    inputs.insert(name.clone(), value);
                }
            }
        }
        if !given.is_empty() {
            let unexpected: Vec<String> = given.values().map(|(k, _)| format!("'{k}'")).collect();
            let valid: Vec<String> = action.inputs.keys().map(|k| format!("'{k}'")).collect();
            warn(
                cx,
                &format!(
                    "Unexpected input(s) {}, valid inputs are [{}]",
                    unexpected.join(", "),
                    valid.join(", ")
                ),
            );
            for (key, value) in given.into_values() {
                inputs.insert(key, value);
            }
        }
        Ok(inputs)
    }

    /// The environment of a JavaScript action's scripts (without `STATE_*`).
    fn node_env(
        call_env: &IndexMap<String, String>,
        located: &Located,
        inputs: &IndexMap<String, String>,
    ) -> IndexMap<String, String> {
        let mut env = call_env.clone();
        for (name, value) in inputs {
            env.insert(input_env_name(name), value.clone());
        }
        env.insert("GITHUB_ACTION_PATH".into(), located.dir.clone());
        env.insert(
            "GITHUB_ACTION_REPOSITORY".into(),
            located.repository.clone(),
        );
        env.insert("GITHUB_ACTION_REF".into(), located.git_ref.clone());
        env
    }

    async fn run_node_main(
        &self,
        cx: &StepCx<'_, '_>,
        leg: &mut LegState,
        call: &ActionCall<'_>,
        located: &Located,
        node: &NodeRuns,
        inputs: &IndexMap<String, String>,
    ) -> StepDone {
        if let Err(e) = self.check_node(cx, node).await {
            return StepDone::failed(e);
        }
        if node.pre.is_some() && located.local {
            warn(
                cx,
                &format!(
                    "`pre` execution is not supported for local action from '{}'",
                    call.uses.value
                ),
            );
        }
        let env = Self::node_env(call.env, located, inputs);
        let state = if call.depth == 0 {
            leg.pre_state.remove(&cx.step.index).unwrap_or_default()
        } else {
            IndexMap::new()
        };
        let mut run_env = env.clone();
        for (k, v) in &state {
            run_env.insert(format!("STATE_{k}"), v.clone());
        }
        let script = format!("{}/{}", located.dir, node.main.value);
        let result = self
            .exec_process(
                cx,
                leg,
                node_command(script),
                cx.prepared.layout.workspace.clone(),
                &run_env,
            )
            .await;
        if let Some(post) = &node.post {
            let mut all_state = state;
            all_state.extend(result.state.clone());
            leg.posts.push(PostStep {
                name: format!("Post {}", cx.step.display_name()),
                step: cx.step.clone(),
                script: format!("{}/{}", located.dir, post.value),
                condition: node.post_if.clone(),
                env,
                state: all_state,
            });
        }
        result.into()
    }

    /// Asks the guest for its node once per session; warns when it is older than the action
    /// asks for (and runs it anyway, as act does).
    async fn check_node(&self, cx: &StepCx<'_, '_>, node: &NodeRuns) -> Result<(), String> {
        let mut cached = cx.prepared.node.lock().await;
        if cached.is_none() {
            *cached = Some(guest_node_version(&**cx.vm).await);
        }
        match cached.as_ref().and_then(Option::as_ref) {
            None => Err(format!(
                "`using: {}` needs Node.js, and the guest has no `node` on its PATH (add nodejs \
                 to the image)",
                node.using.value
            )),
            Some((major, text)) => {
                if *major < node.version {
                    warn(
                        cx,
                        &format!(
                            "The action asks for `{}` but the guest's node is {text}; running it \
                             with that node anyway",
                            node.using.value
                        ),
                    );
                }
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_composite(
        &self,
        cx: &StepCx<'_, '_>,
        leg: &mut LegState,
        call: &ActionCall<'_>,
        located: &Located,
        steps: &[Step],
        inputs: &IndexMap<String, String>,
        ctx: &IndexMap<String, Value>,
        host: &StaticHost,
    ) -> StepDone {
        let mut inner_ctx = ctx.clone();
        inner_ctx.insert(
            "inputs".into(),
            Value::Object(
                inputs
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            ),
        );
        // Composite actions cannot read secrets on GitHub.
        inner_ctx.shift_remove("secrets");
        let mut inner_steps: IndexMap<String, Value> = IndexMap::new();
        let env_at_start = leg.env.clone();
        let mut status = JobStatus::Success;
        let mut failure: Option<(String, Option<i32>)> = None;
        for step in steps {
            // The caller's env, what GITHUB_ENV changed since the composite started, then the
            // step's own env.
            let mut env = call.env.clone();
            for (k, v) in &leg.env {
                if env_at_start.get(k) != Some(v) {
                    env.insert(k.clone(), v.clone());
                }
            }
            if cx.cancel.is_cancelled() {
                status = JobStatus::Cancelled;
            }
            let effective = match (leg.status, status) {
                (JobStatus::Success, s) => s,
                (s, _) => s,
            };
            let step_host = StaticHost {
                status: effective,
                workspace: host.workspace.clone(),
            };
            inner_ctx.insert("steps".into(), Value::Object(inner_steps.clone()));
            inner_ctx.insert("env".into(), string_map_value(&env));
            let run_it = match &step.if_cond {
                Some(cond) => eval_condition(cond, &inner_ctx, &step_host),
                None => Ok(effective == JobStatus::Success),
            };
            let done = match run_it {
                Ok(false) => {
                    if let Some(id) = &step.id {
                        inner_steps.insert(
                            id.value.clone(),
                            context::step_value(
                                &IndexMap::new(),
                                Conclusion::Skipped,
                                Conclusion::Skipped,
                            ),
                        );
                    }
                    continue;
                }
                Err(e) => StepDone::failed(e),
                Ok(true) => {
                    let mut env_error = None;
                    for (k, t) in &step.env {
                        match eval_string(t, &inner_ctx, &step_host) {
                            Ok(v) => {
                                env.insert(k.clone(), v);
                            }
                            Err(e) => env_error = Some(e),
                        }
                    }
                    inner_ctx.insert("env".into(), string_map_value(&env));
                    let name = match &step.name {
                        Some(t) => eval_string(t, &inner_ctx, &step_host)
                            .unwrap_or_else(|_| step.display_name()),
                        None => step.display_name(),
                    };
                    cx.state.events.emit(EventKind::Log {
                        job: cx.job_id.to_owned(),
                        step: Some(cx.step.index),
                        stream: LogStream::Stdout,
                        line: format!("Run {name}"),
                    });
                    match env_error {
                        Some(e) => StepDone::failed(e),
                        None => {
                            self.run_composite_step(
                                cx, leg, call, located, step, &env, &inner_ctx, &step_host,
                            )
                            .await
                        }
                    }
                }
            };
            let conclusion = if done.outcome == Conclusion::Failure
                && eval_bool(&step.continue_on_error, &inner_ctx, &step_host).unwrap_or(false)
            {
                Conclusion::Success
            } else {
                done.outcome
            };
            if let Some(id) = &step.id {
                inner_steps.insert(
                    id.value.clone(),
                    context::step_value(&done.outputs, done.outcome, conclusion),
                );
            }
            match conclusion {
                Conclusion::Failure => {
                    status = JobStatus::Failure;
                    if failure.is_none() {
                        failure = Some((
                            done.error
                                .unwrap_or_else(|| "A composite step failed".into()),
                            done.exit_code,
                        ));
                    }
                }
                Conclusion::Cancelled => status = JobStatus::Cancelled,
                _ => {
                    if let Some(e) = done.error {
                        // A failure that continue-on-error turned into success: still shown.
                        cx.state.events.emit(EventKind::Log {
                            job: cx.job_id.to_owned(),
                            step: Some(cx.step.index),
                            stream: LogStream::Stderr,
                            line: format!("Error: {}", leg.masker.mask(&e)),
                        });
                    }
                }
            }
        }
        // Outputs are mapped from the composite's own steps.
        inner_ctx.insert("steps".into(), Value::Object(inner_steps));
        let out_host = StaticHost {
            status,
            workspace: host.workspace.clone(),
        };
        let mut outputs = IndexMap::new();
        for (name, output) in &located.action.outputs {
            let value = match &output.value {
                Some(t) => match eval_string(t, &inner_ctx, &out_host) {
                    Ok(v) => v,
                    Err(e) => return StepDone::failed(format!("output `{name}`: {e}")),
                },
                None => String::new(),
            };
            outputs.insert(name.clone(), value);
        }
        match (status, failure) {
            (JobStatus::Failure, Some((error, exit_code))) => StepDone {
                outcome: Conclusion::Failure,
                exit_code,
                error: Some(error),
                outputs,
            },
            (JobStatus::Cancelled, _) => StepDone {
                outcome: Conclusion::Cancelled,
                exit_code: None,
                error: Some("cancelled".into()),
                outputs,
            },
            _ => StepDone::success(outputs),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_composite_step(
        &self,
        cx: &StepCx<'_, '_>,
        leg: &mut LegState,
        call: &ActionCall<'_>,
        located: &Located,
        step: &Step,
        env: &IndexMap<String, String>,
        ctx: &IndexMap<String, Value>,
        host: &StaticHost,
    ) -> StepDone {
        match &step.action {
            StepAction::Run {
                script,
                shell: step_shell,
                working_directory,
            } => {
                let script = match eval_string(script, ctx, host) {
                    Ok(s) => s,
                    Err(e) => return StepDone::failed(e),
                };
                let dir = match working_directory {
                    Some(t) => match eval_string(t, ctx, host) {
                        Ok(d) => Some(d),
                        Err(e) => return StepDone::failed(e),
                    },
                    None => None,
                };
                let command =
                    match shell::command(step_shell.as_ref().map(|s| s.value.as_str()), script) {
                        Ok(c) => c,
                        Err(e) => return StepDone::failed(e),
                    };
                let mut env = env.clone();
                env.insert("GITHUB_ACTION_PATH".into(), located.dir.clone());
                env.insert(
                    "GITHUB_ACTION_REPOSITORY".into(),
                    located.repository.clone(),
                );
                env.insert("GITHUB_ACTION_REF".into(), located.git_ref.clone());
                let cwd = resolve_dir(&cx.prepared.layout.workspace, dir.as_deref());
                self.exec_process(cx, leg, command, cwd, &env).await.into()
            }
            StepAction::Uses { uses, with } if is_checkout(&uses.value) => {
                self.checkout(cx, leg, with, ctx, host).await
            }
            StepAction::Uses { uses, with } => {
                let nested = ActionCall {
                    uses,
                    with,
                    env,
                    depth: call.depth + 1,
                };
                self.run_action(cx, leg, &nested, ctx, host).await
            }
            _ => StepDone::failed("this kind of step cannot appear in a composite action"),
        }
    }

    /// `actions/checkout`, natively: the repository being run is copied (with its `.git`) to
    /// `path:`. `clean: true` (the default) makes the target exactly that copy again; `ref:`
    /// checks that ref out of the copy's own history. Nothing is fetched.
    pub(in crate::executor) async fn checkout(
        &self,
        cx: &StepCx<'_, '_>,
        _leg: &mut LegState,
        with: &IndexMap<String, Template>,
        ctx: &IndexMap<String, Value>,
        host: &StaticHost,
    ) -> StepDone {
        let mut args: IndexMap<String, String> = IndexMap::new();
        for (k, t) in with {
            match eval_string(t, ctx, host) {
                Ok(v) => {
                    args.insert(k.to_ascii_lowercase(), v);
                }
                Err(e) => return StepDone::failed(e),
            }
        }
        let run = &cx.state.options.context;
        let arg = |k: &str| args.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        if let Some(repo) = arg("repository")
            && !repo.eq_ignore_ascii_case(&run.git.repository)
        {
            return StepDone::failed(format!(
                "actions/checkout of another repository (`{repo}`) is not supported yet: kiln's \
                 checkout provides the repository being run ({})",
                run.git.repository
            ));
        }
        let mut outputs = IndexMap::new();
        outputs.insert("ref".to_owned(), run.git.git_ref.clone());
        outputs.insert("commit".to_owned(), run.git.sha.clone());
        let Some(source) = &run.workspace else {
            info(cx, "kiln: no workspace to check out; nothing to do");
            return StepDone::success(outputs);
        };
        let path = arg("path").unwrap_or("");
        if path.split('/').any(|p| p == "..") || path.starts_with('/') {
            return StepDone::failed(format!(
                "checkout `path: {path}` must stay inside the workspace"
            ));
        }
        let clean = arg("clean").is_none_or(|c| !c.eq_ignore_ascii_case("false"));
        let layout = &cx.prepared.layout;
        let target = resolve_dir(&layout.workspace, Some(path));
        let at_root = target == layout.workspace;
        let pristine = cx
            .prepared
            .pristine
            .load(std::sync::atomic::Ordering::SeqCst);
        if at_root && pristine {
            info(
                cx,
                &format!(
                    "kiln: the workspace is already a fresh copy of {}",
                    source.display()
                ),
            );
        } else {
            cx.prepared.touch_workspace();
            if clean {
                let script =
                    "mkdir -p \"$1\" && find \"$1\" -mindepth 1 -maxdepth 1 -exec rm -rf {} +";
                if let Err(e) = internal(&**cx.vm, script, &[&target]).await {
                    return StepDone::failed(format!("Cleaning {target} failed: {e}"));
                }
            }
            if let Err(e) = cx.vm.copy_in(source, &target).await {
                return StepDone::failed(format!("Copying the workspace to {target} failed: {e}"));
            }
            info(
                cx,
                &format!("kiln: copied {} to {target}", source.display()),
            );
        }
        if let Some(git_ref) = arg("ref") {
            let script =
                "cd \"$1\" && git -c advice.detachedHead=false checkout --quiet --force \"$2\"";
            if let Err(e) = internal(&**cx.vm, script, &[&target, git_ref]).await {
                return StepDone::failed(format!(
                    "Checking out `ref: {git_ref}` in {target} failed ({e}); kiln checks out \
                     refs from the history of the repository being run and fetches nothing"
                ));
            }
            if let Ok(sha) = internal(&**cx.vm, "cd \"$1\" && git rev-parse HEAD", &[&target]).await
            {
                outputs.insert("commit".to_owned(), sha.trim().to_owned());
            }
            outputs.insert("ref".to_owned(), git_ref.to_owned());
        }
        StepDone::success(outputs)
    }

    /// Runs every registered `pre:` of the leg's remote JavaScript actions, in step order,
    /// before the first step. Returns the reports of the pre steps that ran.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::executor) async fn run_pre_steps(
        &self,
        state: &RunState<'_>,
        job_id: &str,
        steps: &[Step],
        next_index: &mut usize,
        base: (
            &Arc<dyn Vm>,
            &super::super::Prepared,
            &tokio_util::sync::CancellationToken,
        ),
        ctx: &IndexMap<String, Value>,
        leg: &mut LegState,
        deadline: tokio::time::Instant,
    ) -> Vec<StepReport> {
        let (vm, prepared, cancel) = base;
        let mut reports = Vec::new();
        for step in steps {
            let StepAction::Uses { uses, with } = &step.action else {
                continue;
            };
            let Ok(ActionRef::Remote(_)) = ActionRef::parse(&uses.value) else {
                continue;
            };
            if is_checkout(&uses.value) {
                continue;
            }
            let synthetic = synthetic_step(step, *next_index);
            let host = StaticHost::new(leg.status);
            let cx = StepCx {
                state,
                job_id,
                step: &synthetic,
                vm,
                prepared,
                cancel,
                timeout: deadline.saturating_duration_since(tokio::time::Instant::now()),
            };
            let located = match self.locate(&cx, &uses.value).await {
                Ok(l) => l,
                Err(_) => continue, // reported when the step itself runs
            };
            let ActionRuns::Node(node) = &located.action.runs else {
                continue;
            };
            let Some(pre) = &node.pre else {
                continue;
            };
            *next_index += 1;
            let name = format!("Pre {}", step.display_name());
            let started = Instant::now();
            self.hook_started(&cx, &name);
            let run_it = match &node.pre_if {
                Some(cond) => eval_condition(cond, ctx, &host),
                None => Ok(true),
            };
            let done = match run_it {
                Ok(false) => {
                    reports.push(self.hook_finished(&cx, name, StepDone::skipped(), started));
                    continue;
                }
                Err(e) => StepDone::failed(e),
                Ok(true) => match self.action_inputs(&cx, &located.action, with, ctx, &host) {
                    Err(e) => StepDone::failed(e),
                    Ok(inputs) => match self.check_node(&cx, node).await {
                        Err(e) => StepDone::failed(e),
                        Ok(()) => {
                            let env_ctx = match ctx.get("env") {
                                Some(Value::Object(map)) => map
                                    .iter()
                                    .map(|(k, v)| (k.clone(), v.to_display_string()))
                                    .collect(),
                                _ => IndexMap::new(),
                            };
                            let env = Self::node_env(&env_ctx, &located, &inputs);
                            let script = format!("{}/{}", located.dir, pre.value);
                            let result = self
                                .exec_process(
                                    &cx,
                                    leg,
                                    node_command(script),
                                    prepared.layout.workspace.clone(),
                                    &env,
                                )
                                .await;
                            leg.pre_state
                                .entry(step.index)
                                .or_default()
                                .extend(result.state.clone());
                            result.into()
                        }
                    },
                },
            };
            let report = self.hook_finished(&cx, name, done, started);
            if report.conclusion == Conclusion::Failure {
                leg.status = JobStatus::Failure;
            }
            if let Some(e) = &report.error {
                cx.state.events.emit(EventKind::Log {
                    job: job_id.to_owned(),
                    step: Some(synthetic.index),
                    stream: LogStream::Stderr,
                    line: format!("Error: {}", leg.masker.mask(e)),
                });
            }
            reports.push(report);
        }
        reports
    }

    /// Runs the registered `post:` scripts in reverse order (also after a failure); each
    /// checks its `post-if:` (default `always()`) against the job's status.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::executor) async fn run_post_steps(
        &self,
        state: &RunState<'_>,
        job_id: &str,
        next_index: &mut usize,
        base: (
            &Arc<dyn Vm>,
            &super::super::Prepared,
            &tokio_util::sync::CancellationToken,
        ),
        ctx: &IndexMap<String, Value>,
        leg: &mut LegState,
        deadline: tokio::time::Instant,
    ) -> Vec<StepReport> {
        let (vm, prepared, cancel) = base;
        let mut reports = Vec::new();
        let posts = std::mem::take(&mut leg.posts);
        for post in posts.into_iter().rev() {
            let synthetic = synthetic_step(&post.step, *next_index);
            *next_index += 1;
            let cx = StepCx {
                state,
                job_id,
                step: &synthetic,
                vm,
                prepared,
                cancel,
                timeout: deadline.saturating_duration_since(tokio::time::Instant::now()),
            };
            let started = Instant::now();
            self.hook_started(&cx, &post.name);
            let mut post_ctx = ctx.clone();
            post_ctx.insert("job".into(), context::job_value(leg.status));
            let host = StaticHost::new(leg.status);
            let run_it = match &post.condition {
                Some(cond) => eval_condition(cond, &post_ctx, &host),
                None => Ok(true),
            };
            let done = match run_it {
                Ok(false) => StepDone::skipped(),
                Err(e) => StepDone::failed(e),
                Ok(true) => {
                    let mut env = post.env.clone();
                    for (k, v) in &post.state {
                        env.insert(format!("STATE_{k}"), v.clone());
                    }
                    self.exec_process(
                        &cx,
                        leg,
                        node_command(post.script.clone()),
                        prepared.layout.workspace.clone(),
                        &env,
                    )
                    .await
                    .into()
                }
            };
            if let Some(e) = &done.error {
                cx.state.events.emit(EventKind::Log {
                    job: job_id.to_owned(),
                    step: Some(synthetic.index),
                    stream: LogStream::Stderr,
                    line: format!("Error: {}", leg.masker.mask(e)),
                });
            }
            let report = self.hook_finished(&cx, post.name, done, started);
            if report.conclusion == Conclusion::Failure {
                leg.status = JobStatus::Failure;
            }
            reports.push(report);
        }
        reports
    }

    fn hook_started(&self, cx: &StepCx<'_, '_>, name: &str) {
        cx.state.events.emit(EventKind::StepStarted {
            job: cx.job_id.to_owned(),
            step: cx.step.index,
            id: None,
            name: name.to_owned(),
            vm: cx.vm.id().to_owned(),
        });
    }

    fn hook_finished(
        &self,
        cx: &StepCx<'_, '_>,
        name: String,
        done: StepDone,
        started: Instant,
    ) -> StepReport {
        let duration = started.elapsed();
        cx.state.events.emit(EventKind::StepFinished {
            job: cx.job_id.to_owned(),
            step: cx.step.index,
            id: None,
            name: name.clone(),
            vm: cx.vm.id().to_owned(),
            outcome: done.outcome,
            conclusion: done.outcome,
            exit_code: done.exit_code,
            outputs: IndexMap::new(),
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        });
        StepReport {
            name,
            outcome: done.outcome,
            conclusion: done.outcome,
            exit_code: done.exit_code,
            duration,
            error: done.error,
            restored: false,
        }
    }
}

/// A copy of `step` under another index and without its id (a pre or post step must not
/// overwrite `steps.<id>`).
fn synthetic_step(step: &Step, index: usize) -> Step {
    let mut s = step.clone();
    s.index = index;
    s.id = None;
    s
}

fn node_command(script: String) -> kiln_vm::Command {
    kiln_vm::Command::Argv(vec!["node".into(), script])
}

fn warn(cx: &StepCx<'_, '_>, message: &str) {
    cx.state.events.emit(EventKind::Log {
        job: cx.job_id.to_owned(),
        step: Some(cx.step.index),
        stream: LogStream::Stderr,
        line: format!("Warning: {message}"),
    });
}

fn info(cx: &StepCx<'_, '_>, message: &str) {
    cx.state.events.emit(EventKind::Log {
        job: cx.job_id.to_owned(),
        step: Some(cx.step.index),
        stream: LogStream::Stdout,
        line: message.to_owned(),
    });
}

/// `node --version` in the guest: `(major, "vX.Y.Z")`, or `None` without a node.
async fn guest_node_version(vm: &dyn Vm) -> Option<(u32, String)> {
    let out = internal(vm, "node --version", &[]).await.ok()?;
    let text = out.trim().to_owned();
    let major = text
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()?;
    Some((major, text))
}

/// Runs a small runner-side shell script (`sh -c script sh args...`); its stdout on success.
async fn internal(vm: &dyn Vm, script: &str, args: &[&str]) -> Result<String, String> {
    let mut argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        script.to_owned(),
        "sh".to_owned(),
    ];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let outcome = vm
        .exec(
            ExecRequest {
                command: kiln_vm::Command::Argv(argv),
                env: Vec::new(),
                cwd: None,
                timeout: Some(Duration::from_secs(300)),
                user: kiln_vm::ExecUser::Runner,
            },
            tx,
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    while let Ok(chunk) = rx.try_recv() {
        match chunk.stream {
            kiln_vm::Stream::Stdout => stdout.extend_from_slice(&chunk.data),
            kiln_vm::Stream::Stderr => stderr.extend_from_slice(&chunk.data),
        }
    }
    if outcome.status.success() {
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&stderr);
        Err(format!(
            "{}: {}",
            outcome.status,
            err.lines().last().unwrap_or_default()
        ))
    }
}
