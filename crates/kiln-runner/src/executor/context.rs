//! The expression contexts (`github`, `job`, `needs`, `matrix`, ...) and the default step
//! environment, built as GitHub's runner builds them.

use std::collections::HashMap;
use std::path::PathBuf;

use indexmap::IndexMap;
use kiln_workflow::{EvalContext, Job, MatrixLeg, Step, Value, Workflow};

use super::git::GitInfo;
use super::{Layout, NeedResult, StaticHost};
use crate::event::Conclusion;

/// Everything a run knows that is not in the workflow file.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// The triggering event's name (`push`, `pull_request`, ...).
    pub event_name: String,
    /// The event payload (`github.event`, and the file at `GITHUB_EVENT_PATH`).
    pub event_payload: serde_json::Value,
    /// The host directory copied into the VM as the workspace.
    pub workspace: Option<PathBuf>,
    /// Repository facts.
    pub git: GitInfo,
    /// `secrets` context; every value is masked in logs.
    pub secrets: IndexMap<String, String>,
    /// `vars` context.
    pub vars: IndexMap<String, String>,
    /// `inputs` context.
    pub inputs: IndexMap<String, serde_json::Value>,
    /// Environment for every step, below the workflow's `env:` (`--env-file`).
    pub env: IndexMap<String, String>,
    /// `github.run_number`.
    pub run_number: u64,
}

impl RunContext {
    /// A context for `event_name` on the repository at `workspace`, with an empty payload.
    pub fn new(event_name: impl Into<String>, workspace: Option<PathBuf>, git: GitInfo) -> Self {
        RunContext {
            event_name: event_name.into(),
            event_payload: serde_json::json!({}),
            workspace,
            git,
            secrets: IndexMap::new(),
            vars: IndexMap::new(),
            inputs: IndexMap::new(),
            env: IndexMap::new(),
            run_number: 1,
        }
    }

    /// The contexts every expression of `job_id` may see before its steps run.
    pub(crate) fn base_contexts(
        &self,
        workflow: &Workflow,
        job_id: &str,
    ) -> IndexMap<String, Value> {
        let mut map = IndexMap::new();
        map.insert("github".into(), self.github_value(workflow, job_id));
        map.insert("env".into(), Value::Object(IndexMap::new()));
        map.insert("vars".into(), strings(&self.vars));
        map.insert("secrets".into(), strings(&self.secrets));
        map.insert(
            "inputs".into(),
            Value::Object(
                self.inputs
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from_json(v.clone())))
                    .collect(),
            ),
        );
        map.insert("job".into(), job_value(kiln_workflow::JobStatus::Success));
        map.insert("steps".into(), Value::Object(IndexMap::new()));
        map.insert("matrix".into(), Value::Object(IndexMap::new()));
        map.insert("strategy".into(), Value::Object(IndexMap::new()));
        map.insert("needs".into(), Value::Object(IndexMap::new()));
        map.insert("runner".into(), runner_value("", "", ""));
        map
    }

    /// Whether `::debug::` lines are shown: the `ACTIONS_STEP_DEBUG` secret or variable is
    /// `true`, as on GitHub.
    pub fn step_debug(&self) -> bool {
        [
            self.secrets.get("ACTIONS_STEP_DEBUG"),
            self.vars.get("ACTIONS_STEP_DEBUG"),
        ]
        .into_iter()
        .flatten()
        .any(|v| v.eq_ignore_ascii_case("true"))
    }

    fn github_value(&self, workflow: &Workflow, job_id: &str) -> Value {
        let git = &self.git;
        let payload = &self.event_payload;
        let pr = |key: &str| {
            payload
                .pointer(&format!("/pull_request/{key}/ref"))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let s = |v: &str| Value::String(v.to_owned());
        object([
            ("event_name", s(&self.event_name)),
            ("event", Value::from_json(payload.clone())),
            ("sha", s(&git.sha)),
            ("ref", s(&git.git_ref)),
            ("ref_name", s(git.ref_name())),
            ("ref_type", s(git.ref_type())),
            ("ref_protected", Value::Bool(false)),
            ("head_ref", s(&pr("head"))),
            ("base_ref", s(&pr("base"))),
            ("repository", s(&git.repository)),
            ("repository_owner", s(git.owner())),
            ("actor", s(&git.actor)),
            ("triggering_actor", s(&git.actor)),
            ("workflow", s(workflow.display_name())),
            ("workflow_ref", s(&workflow_ref(workflow, git))),
            ("workflow_sha", s(&git.sha)),
            ("job", s(job_id)),
            ("run_id", s(&self.run_number.to_string())),
            ("run_number", s(&self.run_number.to_string())),
            ("run_attempt", s("1")),
            ("retention_days", s("90")),
            ("server_url", s("https://github.com")),
            ("api_url", s("https://api.github.com")),
            ("graphql_url", s("https://api.github.com/graphql")),
            ("action", s("")),
            (
                "token",
                s(self.secrets.get("GITHUB_TOKEN").map_or("", String::as_str)),
            ),
        ])
    }
}

fn workflow_ref(workflow: &Workflow, git: &GitInfo) -> String {
    format!("{}/{}@{}", git.repository, workflow.file, git.git_ref)
}

fn object<'a>(entries: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
    Value::Object(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

fn strings(map: &IndexMap<String, String>) -> Value {
    Value::Object(
        map.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

/// `needs.<job>.result` and `needs.<job>.outputs.*` for the jobs `job` needs.
pub(crate) fn needs_context(job: &Job, results: &HashMap<String, NeedResult>) -> Value {
    let mut map = IndexMap::new();
    for need in &job.needs {
        let (result, outputs) = match results.get(&need.value) {
            Some(r) => (r.result.as_str(), strings(&r.outputs)),
            None => ("skipped", Value::Object(IndexMap::new())),
        };
        map.insert(
            need.value.clone(),
            object([
                ("result", Value::String(result.into())),
                ("outputs", outputs),
            ]),
        );
    }
    Value::Object(map)
}

/// The matrix legs of `job`, after evaluating matrix expressions and applying
/// `--matrix KEY:VALUE` filters.
pub(crate) fn matrix_legs(
    job: &Job,
    ctx: &IndexMap<String, Value>,
    host: &StaticHost,
    filter: &[(String, String)],
) -> Result<Vec<MatrixLeg>, String> {
    let Some(def) = job.strategy.as_ref().and_then(|s| s.matrix.as_ref()) else {
        return Ok(vec![MatrixLeg::default()]);
    };
    let eval = EvalContext {
        contexts: ctx,
        host,
    };
    let evaluated = if def.has_expressions() {
        kiln_workflow::matrix::evaluate_matrix(def, &eval)
            .map_err(|e| format!("{}: {e}", def.span()))?
    } else {
        def.clone()
    };
    let legs =
        kiln_workflow::expand_matrix(&evaluated).map_err(|e| format!("{}: {e}", def.span()))?;
    Ok(legs
        .into_iter()
        .filter(|leg| {
            filter.iter().all(|(key, want)| {
                leg.values.get(key).is_none_or(|v| {
                    let text = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    text == *want
                })
            })
        })
        .collect())
}

/// The `job` context with the job's status so far.
pub(crate) fn job_value(status: kiln_workflow::JobStatus) -> Value {
    let status = match status {
        kiln_workflow::JobStatus::Success => "success",
        kiln_workflow::JobStatus::Failure => "failure",
        kiln_workflow::JobStatus::Cancelled => "cancelled",
    };
    object([
        ("status", Value::String(status.into())),
        ("container", Value::Object(IndexMap::new())),
        ("services", Value::Object(IndexMap::new())),
    ])
}

/// The `matrix` context of one leg.
pub(crate) fn matrix_value(leg: &MatrixLeg) -> Value {
    Value::Object(
        leg.values
            .iter()
            .map(|(k, v)| (k.clone(), Value::from_json(v.clone())))
            .collect(),
    )
}

/// The `strategy` context of one leg.
pub(crate) fn strategy_value(job: &Job, index: usize, total: usize) -> Value {
    let fail_fast = job
        .strategy
        .as_ref()
        .is_none_or(|s| !matches!(s.fail_fast, kiln_workflow::BoolOrExpr::Bool(false)));
    let max_parallel = job
        .strategy
        .as_ref()
        .and_then(|s| match &s.max_parallel {
            Some(kiln_workflow::NumberOrExpr::Number(n)) => Some(*n),
            _ => None,
        })
        .unwrap_or(total as f64);
    object([
        ("fail-fast", Value::Bool(fail_fast)),
        ("job-index", Value::Number(index as f64)),
        ("job-total", Value::Number(total as f64)),
        ("max-parallel", Value::Number(max_parallel)),
    ])
}

/// The `runner` context.
pub(crate) fn runner_value(temp: &str, tool_cache: &str, name: &str) -> Value {
    object([
        ("name", Value::String(format!("kiln-{name}"))),
        ("os", Value::String("Linux".into())),
        ("arch", Value::String("X64".into())),
        ("temp", Value::String(temp.into())),
        ("tool_cache", Value::String(tool_cache.into())),
        ("debug", Value::String(String::new())),
        ("environment", Value::String("self-hosted".into())),
    ])
}

/// `steps.<id>`: outputs, outcome, conclusion.
pub(crate) fn step_value(
    outputs: &IndexMap<String, String>,
    outcome: Conclusion,
    conclusion: Conclusion,
) -> Value {
    object([
        ("outputs", strings(outputs)),
        ("outcome", Value::String(outcome.as_str().into())),
        ("conclusion", Value::String(conclusion.as_str().into())),
    ])
}

/// The variables GitHub's runner sets for every step (the file-command paths are added by the
/// caller).
pub(crate) fn default_env(
    run: &RunContext,
    workflow: &Workflow,
    job_id: &str,
    step: &Step,
    layout: &Layout,
    vm_id: &str,
) -> IndexMap<String, String> {
    let git = &run.git;
    let payload = &run.event_payload;
    let pr = |key: &str| {
        payload
            .pointer(&format!("/pull_request/{key}/ref"))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let action = step
        .id
        .as_ref()
        .map_or_else(|| format!("__run_{}", step.index), |id| id.value.clone());
    let pairs = [
        ("CI", "true".to_owned()),
        ("GITHUB_ACTIONS", "true".to_owned()),
        ("GITHUB_ACTION", action),
        ("GITHUB_ACTOR", git.actor.clone()),
        ("GITHUB_TRIGGERING_ACTOR", git.actor.clone()),
        ("GITHUB_API_URL", "https://api.github.com".to_owned()),
        (
            "GITHUB_GRAPHQL_URL",
            "https://api.github.com/graphql".to_owned(),
        ),
        ("GITHUB_SERVER_URL", "https://github.com".to_owned()),
        ("GITHUB_BASE_REF", pr("base")),
        ("GITHUB_HEAD_REF", pr("head")),
        ("GITHUB_EVENT_NAME", run.event_name.clone()),
        ("GITHUB_EVENT_PATH", layout.event_path.clone()),
        ("GITHUB_JOB", job_id.to_owned()),
        ("GITHUB_REF", git.git_ref.clone()),
        ("GITHUB_REF_NAME", git.ref_name().to_owned()),
        ("GITHUB_REF_TYPE", git.ref_type().to_owned()),
        ("GITHUB_REF_PROTECTED", "false".to_owned()),
        ("GITHUB_REPOSITORY", git.repository.clone()),
        ("GITHUB_REPOSITORY_OWNER", git.owner().to_owned()),
        ("GITHUB_RETENTION_DAYS", "90".to_owned()),
        ("GITHUB_RUN_ID", run.run_number.to_string()),
        ("GITHUB_RUN_NUMBER", run.run_number.to_string()),
        ("GITHUB_RUN_ATTEMPT", "1".to_owned()),
        ("GITHUB_SHA", git.sha.clone()),
        ("GITHUB_WORKFLOW", workflow.display_name().to_owned()),
        ("GITHUB_WORKFLOW_REF", workflow_ref(workflow, git)),
        ("GITHUB_WORKFLOW_SHA", git.sha.clone()),
        ("GITHUB_WORKSPACE", layout.workspace.clone()),
        ("HOME", layout.home.clone()),
        ("RUNNER_ARCH", "X64".to_owned()),
        ("RUNNER_ENVIRONMENT", "self-hosted".to_owned()),
        ("RUNNER_NAME", format!("kiln-{vm_id}")),
        ("RUNNER_OS", "Linux".to_owned()),
        ("RUNNER_TEMP", layout.temp.clone()),
        ("RUNNER_TOOL_CACHE", layout.tool_cache.clone()),
    ];
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}
