//! The typed workflow model.
//!
//! These types are what [`crate::parse_workflow`] returns: the whole documented workflow schema,
//! checked and with positions. Every string in which GitHub allows `${{ }}` is a [`Template`]
//! (parsed up front, so a bad expression is reported at load time, with its position); every
//! `if:` is a [`Condition`]. Values kiln records but does not interpret itself (`runs-on`,
//! `container`, `services`, `permissions`, `environment`) are kept as spanned JSON so the runner
//! can report "not supported yet" at run time with a position instead of silently ignoring them.

use std::sync::Arc;

use indexmap::IndexMap;

use crate::expr::{Condition, Template};
use crate::span::{Span, Spanned};
use crate::trigger::PatternList;

/// A whole workflow file.
#[derive(Debug, Clone)]
pub struct Workflow {
    /// The file name it was read from.
    pub file: Arc<str>,
    /// `name:`.
    pub name: Option<String>,
    /// `run-name:`.
    pub run_name: Option<Template>,
    /// `on:`.
    pub on: Triggers,
    /// `env:`.
    pub env: Env,
    /// `defaults:`.
    pub defaults: Defaults,
    /// `permissions:` (`read-all`, `write-all`, or a map of scopes).
    pub permissions: Option<Spanned<serde_json::Value>>,
    /// `concurrency:`.
    pub concurrency: Option<Concurrency>,
    /// `jobs:`, in declaration order.
    pub jobs: IndexMap<String, Job>,
    /// Things GitHub may reject or kiln cannot check, which do not stop the workflow from
    /// loading (e.g. an expression in a job's `uses`).
    pub warnings: Vec<crate::load::Diagnostic>,
}

impl Workflow {
    /// The workflow's `name`, else its file path (as GitHub shows it).
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.file)
    }
}

/// An `env:` map. Scalar YAML values become their string form.
pub type Env = IndexMap<String, Template>;

/// `defaults:`.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    /// `defaults.run`.
    pub run: RunDefaults,
}

/// `defaults.run`.
#[derive(Debug, Clone, Default)]
pub struct RunDefaults {
    /// `shell:`.
    pub shell: Option<Spanned<String>>,
    /// `working-directory:`.
    pub working_directory: Option<Template>,
}

/// A `true`/`false` setting that may also be an expression.
#[derive(Debug, Clone)]
pub enum BoolOrExpr {
    /// A literal boolean.
    Bool(bool),
    /// An expression evaluated at run time.
    Expr(Template),
}

impl Default for BoolOrExpr {
    fn default() -> Self {
        BoolOrExpr::Bool(false)
    }
}

/// A number setting that may also be an expression.
#[derive(Debug, Clone)]
pub enum NumberOrExpr {
    /// A literal number.
    Number(f64),
    /// An expression evaluated at run time.
    Expr(Template),
}

/// `concurrency:` (a string is shorthand for `group:`).
#[derive(Debug, Clone)]
pub struct Concurrency {
    /// `group:`.
    pub group: Template,
    /// `cancel-in-progress:` (default false).
    pub cancel_in_progress: BoolOrExpr,
}

/// `jobs.<id>.secrets` of a job calling a reusable workflow.
#[derive(Debug, Clone)]
pub enum JobSecrets {
    /// `secrets: inherit`.
    Inherit,
    /// `secrets: {name: value}`.
    Map(IndexMap<String, Template>),
}

/// `jobs.<id>.strategy`.
#[derive(Debug, Clone)]
pub struct Strategy {
    /// `matrix:`.
    pub matrix: Option<MatrixDef>,
    /// `fail-fast:` (default true).
    pub fail_fast: BoolOrExpr,
    /// `max-parallel:`.
    pub max_parallel: Option<NumberOrExpr>,
}

/// `strategy.matrix` as written.
#[derive(Debug, Clone)]
pub enum MatrixDef {
    /// A matrix written out in YAML. Any string in it may hold `${{ }}` expressions (see
    /// [`MatrixDef::has_expressions`]); those are evaluated by [`crate::matrix`] before expansion.
    Literal {
        /// The dimensions (`os: [ubuntu, windows]`), in order.
        dims: IndexMap<String, Vec<serde_json::Value>>,
        /// `include:` entries.
        include: Vec<IndexMap<String, serde_json::Value>>,
        /// `exclude:` entries.
        exclude: Vec<IndexMap<String, serde_json::Value>>,
        /// Where `matrix:` was written.
        span: Span,
        /// Parts of the matrix written as a single expression: a dimension, `include` or
        /// `exclude` (keys `"include"`/`"exclude"`), e.g. `os: ${{ fromJSON(needs.a.outputs.os) }}`.
        /// Such a dimension also appears in `dims`, without values, to keep its place.
        exprs: IndexMap<String, Template>,
    },
    /// The whole matrix is one expression (`matrix: ${{ fromJSON(needs.plan.outputs.m) }}`).
    Expr(Template),
}

impl MatrixDef {
    /// Where the matrix was written.
    pub fn span(&self) -> &Span {
        match self {
            MatrixDef::Literal { span, .. } => span,
            MatrixDef::Expr(t) => t.span(),
        }
    }

    /// Whether expressions must be evaluated before the matrix can be expanded.
    pub fn has_expressions(&self) -> bool {
        match self {
            MatrixDef::Expr(_) => true,
            MatrixDef::Literal {
                dims,
                include,
                exclude,
                exprs,
                ..
            } => {
                !exprs.is_empty()
                    || dims.values().flatten().any(json_has_expr)
                    || include
                        .iter()
                        .chain(exclude)
                        .flat_map(|m| m.values())
                        .any(json_has_expr)
            }
        }
    }
}

/// Whether a JSON value holds a string with `${{`.
pub(crate) fn json_has_expr(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains("${{"),
        serde_json::Value::Array(a) => a.iter().any(json_has_expr),
        serde_json::Value::Object(o) => o.values().any(json_has_expr),
        _ => false,
    }
}

/// A job (`jobs.<id>`).
#[derive(Debug, Clone)]
pub struct Job {
    /// The job id (the key under `jobs:`).
    pub id: String,
    /// Where the job id was written.
    pub span: Span,
    /// `name:`.
    pub name: Option<Template>,
    /// `needs:`, in order.
    pub needs: Vec<Spanned<String>>,
    /// `if:`.
    pub if_cond: Option<Condition>,
    /// `runs-on:` as written (a label, a list of labels, or `{group, labels}`).
    pub runs_on: Option<Spanned<serde_json::Value>>,
    /// `env:`.
    pub env: Env,
    /// `defaults:`.
    pub defaults: Defaults,
    /// `timeout-minutes:`.
    pub timeout_minutes: Option<NumberOrExpr>,
    /// `continue-on-error:`.
    pub continue_on_error: BoolOrExpr,
    /// `outputs:`.
    pub outputs: IndexMap<String, Template>,
    /// `strategy:`.
    pub strategy: Option<Strategy>,
    /// `steps:` (empty for a reusable workflow call).
    pub steps: Vec<Step>,
    /// `uses:` of a job calling a reusable workflow.
    pub uses: Option<Spanned<String>>,
    /// `with:` of a reusable workflow call.
    pub with: IndexMap<String, Template>,
    /// `secrets:` of a reusable workflow call.
    pub secrets: Option<JobSecrets>,
    /// `container:` as written.
    pub container: Option<Spanned<serde_json::Value>>,
    /// `services:` as written.
    pub services: Option<Spanned<serde_json::Value>>,
    /// `environment:` as written.
    pub environment: Option<Spanned<serde_json::Value>>,
    /// `concurrency:`.
    pub concurrency: Option<Concurrency>,
    /// `permissions:`.
    pub permissions: Option<Spanned<serde_json::Value>>,
    /// `env:` written as one expression, evaluated to an object at run time.
    pub env_expr: Option<Template>,
    /// `snapshot:` (custom runner images) as written.
    pub snapshot: Option<Spanned<serde_json::Value>>,
}

impl Job {
    /// Whether this job calls a reusable workflow instead of running steps.
    pub fn is_reusable_call(&self) -> bool {
        self.uses.is_some()
    }

    /// The job's `name` source, else its id.
    pub fn display_name(&self) -> &str {
        self.name.as_ref().map_or(&self.id, |n| n.source())
    }
}

/// A step (`jobs.<id>.steps[*]`).
#[derive(Debug, Clone)]
pub struct Step {
    /// 0-based position in the job.
    pub index: usize,
    /// Where the step starts.
    pub span: Span,
    /// `id:`.
    pub id: Option<Spanned<String>>,
    /// `name:`.
    pub name: Option<Template>,
    /// `if:`.
    pub if_cond: Option<Condition>,
    /// `run:` or `uses:`.
    pub action: StepAction,
    /// `env:`.
    pub env: Env,
    /// `continue-on-error:`.
    pub continue_on_error: BoolOrExpr,
    /// `timeout-minutes:`.
    pub timeout_minutes: Option<NumberOrExpr>,
    /// `env:` written as one expression (`env: ${{ fromJSON(...) }}`), evaluated to an object
    /// at run time; `env` is then empty.
    pub env_expr: Option<Template>,
    /// `background: true`: the step starts and the job moves on without waiting for it
    /// (GitHub's parallel steps).
    pub background: bool,
}

impl Step {
    /// The name GitHub shows: `name`, else `Run <first line of run>`, else `Run <uses>`.
    pub fn display_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.source().to_owned();
        }
        match &self.action {
            StepAction::Run { script, .. } => {
                let first = script
                    .source()
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or("");
                format!("Run {first}")
            }
            StepAction::Uses { uses, .. } => format!("Run {}", uses.value),
            StepAction::Wait { ids } => {
                let ids: Vec<&str> = ids.iter().map(|i| i.value.as_str()).collect();
                format!("Wait for {}", ids.join(", "))
            }
            StepAction::WaitAll => "Wait for all background steps".to_owned(),
            StepAction::Cancel { id } => format!("Cancel {}", id.value),
            StepAction::Parallel { steps } => format!("Run {} steps in parallel", steps.len()),
        }
    }
}

/// What a step does.
#[derive(Debug, Clone)]
pub enum StepAction {
    /// `run:` a script.
    Run {
        /// The script.
        script: Template,
        /// `shell:`.
        shell: Option<Spanned<String>>,
        /// `working-directory:`.
        working_directory: Option<Template>,
    },
    /// `uses:` an action.
    Uses {
        /// `owner/repo@ref`, `./path` or `docker://image`.
        uses: Spanned<String>,
        /// `with:` inputs.
        with: IndexMap<String, Template>,
    },
    /// `wait: id` / `wait: [ids]`: block until those background steps finish.
    Wait {
        /// The background steps waited for.
        ids: Vec<Spanned<String>>,
    },
    /// `wait-all:`: block until every earlier background step finishes.
    WaitAll,
    /// `cancel: id`: stop a background step.
    Cancel {
        /// The background step to stop.
        id: Spanned<String>,
    },
    /// `parallel: [steps]`: run the steps concurrently and wait for all of them.
    Parallel {
        /// The grouped steps (their `index` is their position in the group).
        steps: Vec<Step>,
    },
}

/// `on:`: the events that start the workflow, in the order written.
#[derive(Debug, Clone, Default)]
pub struct Triggers {
    /// Events by name.
    pub events: IndexMap<String, EventTrigger>,
}

impl Triggers {
    /// Whether `name` is one of the events.
    pub fn has_event(&self, name: &str) -> bool {
        self.events.contains_key(name)
    }
}

/// One event under `on:` with its filters and settings.
#[derive(Debug, Clone)]
pub struct EventTrigger {
    /// The event name.
    pub name: String,
    /// Where the event name was written.
    pub span: Span,
    /// `types:`.
    pub types: Option<Vec<Spanned<String>>>,
    /// `branches:`.
    pub branches: Option<PatternList>,
    /// `branches-ignore:`.
    pub branches_ignore: Option<PatternList>,
    /// `tags:`.
    pub tags: Option<PatternList>,
    /// `tags-ignore:`.
    pub tags_ignore: Option<PatternList>,
    /// `paths:`.
    pub paths: Option<PatternList>,
    /// `paths-ignore:`.
    pub paths_ignore: Option<PatternList>,
    /// `workflows:` (workflow_run).
    pub workflows: Option<Vec<Spanned<String>>>,
    /// `names:` (image_version).
    pub names: Option<Vec<Spanned<String>>>,
    /// `versions:` (image_version).
    pub versions: Option<Vec<Spanned<String>>>,
    /// `inputs:` (workflow_dispatch, workflow_call).
    pub inputs: IndexMap<String, InputDef>,
    /// `outputs:` (workflow_call).
    pub outputs: IndexMap<String, CallOutput>,
    /// `secrets:` (workflow_call).
    pub secrets: IndexMap<String, CallSecret>,
    /// `schedule:` entries (the `schedule` event).
    pub schedule: Vec<CronSchedule>,
}

impl EventTrigger {
    /// An event without filters.
    pub fn new(name: impl Into<String>, span: Span) -> EventTrigger {
        EventTrigger {
            name: name.into(),
            span,
            types: None,
            branches: None,
            branches_ignore: None,
            tags: None,
            tags_ignore: None,
            paths: None,
            paths_ignore: None,
            workflows: None,
            names: None,
            versions: None,
            inputs: IndexMap::new(),
            outputs: IndexMap::new(),
            secrets: IndexMap::new(),
            schedule: Vec::new(),
        }
    }
}

impl EventTrigger {
    /// The `inputs` context of a `workflow_dispatch`/`workflow_call` run: `given` values
    /// (as typed on the command line) checked against each input's declared type, and
    /// defaults filled in for the rest. Booleans and numbers become JSON booleans and numbers;
    /// an input without value or default is `""` (`false` for a boolean, `null` for a number).
    /// Returns every problem: unknown inputs, missing required ones, values of the wrong type
    /// and choices not among the options.
    pub fn resolve_inputs(
        &self,
        given: &IndexMap<String, String>,
    ) -> Result<IndexMap<String, serde_json::Value>, Vec<String>> {
        let mut errors = Vec::new();
        for name in given.keys() {
            if !self.inputs.contains_key(name) {
                let declared: Vec<&str> = self.inputs.keys().map(String::as_str).collect();
                errors.push(if declared.is_empty() {
                    format!(
                        "Unexpected input `{name}`: `{}` declares no inputs",
                        self.name
                    )
                } else {
                    format!(
                        "Unexpected input `{name}`; declared inputs: {}",
                        declared.join(", ")
                    )
                });
            }
        }
        let mut out = IndexMap::new();
        for (name, def) in &self.inputs {
            let value = match given.get(name) {
                Some(raw) => match def.input_type {
                    InputType::Boolean => match raw.as_str() {
                        "true" => serde_json::Value::Bool(true),
                        "false" => serde_json::Value::Bool(false),
                        _ => {
                            errors.push(format!(
                                "Input `{name}` must be `true` or `false`, got `{raw}`"
                            ));
                            continue;
                        }
                    },
                    InputType::Number => match raw.trim().parse::<f64>() {
                        Ok(n) if n.is_finite() => crate::yaml::number_json(n),
                        _ => {
                            errors.push(format!("Input `{name}` must be a number, got `{raw}`"));
                            continue;
                        }
                    },
                    InputType::Choice if !def.options.contains(raw) => {
                        errors.push(format!(
                            "Input `{name}` must be one of {}, got `{raw}`",
                            def.options.join(", ")
                        ));
                        continue;
                    }
                    _ => serde_json::Value::String(raw.clone()),
                },
                None => match &def.default {
                    Some(d) => d.value.clone(),
                    None if def.required => {
                        errors.push(format!("Input `{name}` is required"));
                        continue;
                    }
                    None => match def.input_type {
                        InputType::Boolean => serde_json::Value::Bool(false),
                        InputType::Number => serde_json::Value::Null,
                        _ => serde_json::Value::String(String::new()),
                    },
                },
            };
            out.insert(name.clone(), value);
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }
}

/// The type of a `workflow_dispatch`/`workflow_call` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputType {
    /// `string` (the default for workflow_dispatch).
    String,
    /// `boolean`.
    Boolean,
    /// `number`.
    Number,
    /// `choice` (workflow_dispatch), with `options`.
    Choice,
    /// `environment` (workflow_dispatch).
    Environment,
}

impl InputType {
    /// The type as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            InputType::String => "string",
            InputType::Boolean => "boolean",
            InputType::Number => "number",
            InputType::Choice => "choice",
            InputType::Environment => "environment",
        }
    }
}

/// An input of `workflow_dispatch` or `workflow_call`.
#[derive(Debug, Clone)]
pub struct InputDef {
    /// The input name.
    pub name: String,
    /// Where the name was written.
    pub span: Span,
    /// `description:`.
    pub description: Option<String>,
    /// `required:` (default false).
    pub required: bool,
    /// `default:` as written (string, boolean or number; may be an expression for
    /// workflow_call).
    pub default: Option<Spanned<serde_json::Value>>,
    /// `type:`.
    pub input_type: InputType,
    /// `options:` of a `choice` input.
    pub options: Vec<String>,
    /// `deprecationMessage:`.
    pub deprecation_message: Option<String>,
}

/// An output of `workflow_call`.
#[derive(Debug, Clone)]
pub struct CallOutput {
    /// `description:`.
    pub description: Option<String>,
    /// `value:`.
    pub value: Template,
}

/// A secret of `workflow_call`.
#[derive(Debug, Clone)]
pub struct CallSecret {
    /// `description:`.
    pub description: Option<String>,
    /// `required:`.
    pub required: bool,
}

/// One `schedule:` entry.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    /// The validated POSIX cron expression.
    pub cron: Spanned<String>,
    /// `timezone:` (IANA name), if given.
    pub timezone: Option<Spanned<String>>,
}
