//! From workflow text to a checked [`Workflow`].
//!
//! [`parse_workflow`] runs the [`crate::yaml`] loader, then walks the node tree with a
//! [`Loader`] that converts each documented key into the typed [`crate::model`] and records a
//! [`Diagnostic`] for everything wrong instead of stopping at the first problem:
//!
//! - unknown keys (naming the allowed keys and the nearest one: "did you mean `steps`?");
//! - values of the wrong type, and missing required keys (`on`, `jobs`, `runs-on`, `run`/`uses`);
//! - expressions that fail to parse, and expressions where GitHub does not allow them;
//! - invalid job and step ids, duplicate step ids, `needs` naming a missing job, and job
//!   dependency cycles (the message names the cycle);
//! - invalid filter patterns and cron expressions under `on:`.
//!
//! A workflow is returned only when no diagnostic was recorded.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use indexmap::IndexMap;

use crate::expr::{Condition, Expr, ExprError, Template};
use crate::model::{
    BoolOrExpr, CallOutput, CallSecret, Concurrency, CronSchedule, Defaults, Env, EventTrigger,
    InputDef, InputType, Job, JobSecrets, MatrixDef, NumberOrExpr, RunDefaults, Step, StepAction,
    Strategy, Triggers, Workflow,
};
use crate::span::{Span, Spanned};
use crate::trigger::{FilterPattern, PatternList, validate_cron};
use crate::yaml::{self, Node, NodeKind};

/// One problem found in a workflow file.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// Where the problem is.
    pub span: Span,
    /// What is wrong, starting with a capital letter.
    pub message: String,
    /// How to fix it, when there is something useful to say.
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.span, self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Every problem found in a workflow file.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowError {
    /// The problems, in the order found (roughly document order).
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for WorkflowError {}

/// Parses and validates a workflow. `file` is the name used in positions.
pub fn parse_workflow(file: &str, text: &str) -> Result<Workflow, WorkflowError> {
    let root = yaml::load(file, text).map_err(|diagnostics| WorkflowError { diagnostics })?;
    let mut loader = Loader {
        file: Arc::from(file),
        text,
        diagnostics: Vec::new(),
        warnings: Vec::new(),
        scope: None,
    };
    let mut workflow = loader.workflow(&root);
    if let Some(wf) = &mut workflow {
        wf.warnings = std::mem::take(&mut loader.warnings);
    }
    if let Some(wf) = &workflow {
        for e in crate::graph::check(wf) {
            loader.diagnostics.push(e.into_diagnostic());
        }
    }
    match workflow {
        Some(wf) if loader.diagnostics.is_empty() => Ok(wf),
        _ => Err(WorkflowError {
            diagnostics: loader.diagnostics,
        }),
    }
}

const WORKFLOW_KEYS: &[&str] = &[
    "name",
    "run-name",
    "on",
    "permissions",
    "env",
    "defaults",
    "concurrency",
    "jobs",
];
const JOB_KEYS: &[&str] = &[
    "name",
    "permissions",
    "needs",
    "if",
    "runs-on",
    "environment",
    "concurrency",
    "outputs",
    "env",
    "defaults",
    "steps",
    "timeout-minutes",
    "strategy",
    "continue-on-error",
    "container",
    "services",
    "snapshot",
    "uses",
    "with",
    "secrets",
];
/// Keys a job that calls a reusable workflow may not have.
const NOT_IN_CALL_JOB: &[&str] = &[
    "runs-on",
    "environment",
    "outputs",
    "env",
    "defaults",
    "steps",
    "timeout-minutes",
    "continue-on-error",
    "container",
    "services",
    "snapshot",
];
const STEP_KEYS: &[&str] = &[
    "id",
    "if",
    "name",
    "uses",
    "run",
    "shell",
    "with",
    "env",
    "continue-on-error",
    "timeout-minutes",
    "working-directory",
    "background",
    "wait",
    "wait-all",
    "cancel",
    "parallel",
];
/// The keys that say what a step does; a step has exactly one.
const ACTION_KEYS: &[&str] = &["run", "uses", "wait", "wait-all", "cancel", "parallel"];
const CONTAINER_KEYS: &[&str] = &["image", "credentials", "env", "ports", "volumes", "options"];
const SERVICE_KEYS: &[&str] = &[
    "image",
    "credentials",
    "env",
    "ports",
    "volumes",
    "options",
    "entrypoint",
    "command",
];
const PERMISSION_SCOPES: &[&str] = &[
    "actions",
    "artifact-metadata",
    "attestations",
    "checks",
    "contents",
    "deployments",
    "discussions",
    "id-token",
    "issues",
    "models",
    "packages",
    "pages",
    "pull-requests",
    "repository-projects",
    "security-events",
    "statuses",
];
/// Every event that can trigger a workflow.
pub const EVENTS: &[&str] = &[
    "branch_protection_rule",
    "check_run",
    "check_suite",
    "create",
    "delete",
    "deployment",
    "deployment_status",
    "discussion",
    "discussion_comment",
    "fork",
    "gollum",
    "image_version",
    "issue_comment",
    "issues",
    "label",
    "merge_group",
    "milestone",
    "page_build",
    "project",
    "project_card",
    "project_column",
    "public",
    "pull_request",
    "pull_request_review",
    "pull_request_review_comment",
    "pull_request_target",
    "push",
    "registry_package",
    "release",
    "repository_dispatch",
    "schedule",
    "status",
    "watch",
    "workflow_call",
    "workflow_dispatch",
    "workflow_run",
];

type Entries = [(Spanned<String>, Node)];

/// Converts a node tree into the model, collecting diagnostics.
struct Loader<'t> {
    file: Arc<str>,
    /// The whole file, so expression errors inside multi-line or quoted scalars can be placed
    /// exactly.
    text: &'t str,
    diagnostics: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
    /// What expressions may use in the key being read (`None`: not checked).
    scope: Option<Scope>,
}

/// Which contexts and special functions expressions may use in a key: GitHub's "context
/// availability" table. Anything else is rejected by GitHub with "Unrecognized named-value".
#[derive(Debug, Clone, Copy)]
struct Scope {
    /// The key, as GitHub's table names it.
    key: &'static str,
    contexts: &'static [&'static str],
    /// `hashFiles()` is allowed (step keys only).
    hash_files: bool,
    /// `success()`, `failure()`, `cancelled()`, `always()` are allowed (`if:` only).
    status: bool,
}

const fn scope(key: &'static str, contexts: &'static [&'static str]) -> Option<Scope> {
    Some(Scope {
        key,
        contexts,
        hash_files: false,
        status: false,
    })
}

const JOB_LEVEL: &[&str] = &["github", "needs", "strategy", "matrix", "vars", "inputs"];
const STEP_LEVEL: &[&str] = &[
    "github", "needs", "strategy", "matrix", "job", "runner", "env", "vars", "secrets", "steps",
    "inputs",
];
const STEP_IF: &[&str] = &[
    "github", "needs", "strategy", "matrix", "job", "runner", "env", "vars", "steps", "inputs",
];
const CREDENTIALS: &[&str] = &[
    "github", "needs", "strategy", "matrix", "env", "vars", "secrets", "inputs",
];
const CONTAINER_ENV: &[&str] = &[
    "github", "needs", "strategy", "matrix", "job", "runner", "env", "vars", "secrets", "inputs",
];

/// The scope of a job-level key.
fn job_scope(key: &str) -> Option<Scope> {
    match key {
        "name" | "runs-on" | "concurrency" | "container" | "services" | "environment"
        | "timeout-minutes" | "continue-on-error" => scope("jobs.<job_id>.*", JOB_LEVEL),
        "with" => scope("jobs.<job_id>.with", JOB_LEVEL),
        "if" => Some(Scope {
            key: "jobs.<job_id>.if",
            contexts: &["github", "needs", "vars", "inputs"],
            hash_files: false,
            status: true,
        }),
        "strategy" => scope(
            "jobs.<job_id>.strategy",
            &["github", "needs", "vars", "inputs"],
        ),
        "env" => scope(
            "jobs.<job_id>.env",
            &[
                "github", "needs", "strategy", "matrix", "vars", "secrets", "inputs",
            ],
        ),
        "secrets" => scope(
            "jobs.<job_id>.secrets",
            &[
                "github", "needs", "strategy", "matrix", "secrets", "inputs", "vars",
            ],
        ),
        "defaults" => scope(
            "jobs.<job_id>.defaults.run",
            &[
                "github", "needs", "strategy", "matrix", "env", "vars", "inputs",
            ],
        ),
        "outputs" => scope("jobs.<job_id>.outputs", STEP_LEVEL),
        _ => None,
    }
}

/// The scope of a step-level key.
fn step_scope(key: &str) -> Option<Scope> {
    match key {
        "if" => Some(Scope {
            key: "jobs.<job_id>.steps.if",
            contexts: STEP_IF,
            hash_files: true,
            status: true,
        }),
        "id" | "uses" => None,
        _ => Some(Scope {
            key: "jobs.<job_id>.steps.*",
            contexts: STEP_LEVEL,
            hash_files: true,
            status: false,
        }),
    }
}

impl Loader<'_> {
    fn error(&mut self, span: &Span, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic {
            span: span.clone(),
            message: message.into(),
            help: None,
        });
    }

    fn warning(&mut self, span: &Span, message: impl Into<String>) {
        self.warnings.push(Diagnostic {
            span: span.clone(),
            message: message.into(),
            help: None,
        });
    }

    fn error_help(&mut self, span: &Span, message: impl Into<String>, help: impl Into<String>) {
        self.diagnostics.push(Diagnostic {
            span: span.clone(),
            message: message.into(),
            help: Some(help.into()),
        });
    }

    fn wrong_type(&mut self, node: &Node, what: &str, expected: &str) {
        self.error(
            &node.span,
            format!("`{what}` must be {expected}, found {}", node.kind_name()),
        );
    }

    fn map<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n Entries> {
        match &node.kind {
            NodeKind::Map(entries) => Some(entries),
            _ => {
                self.wrong_type(node, what, "a mapping");
                None
            }
        }
    }

    /// Reports keys of `entries` not in `allowed`.
    fn check_keys(&mut self, entries: &Entries, allowed: &[&str], context: &str) {
        for (key, _) in entries {
            if !allowed.contains(&key.value.as_str()) {
                self.unknown_key(key, allowed, context);
            }
        }
    }

    fn unknown_key(&mut self, key: &Spanned<String>, allowed: &[&str], context: &str) {
        let list = allowed
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let help = match did_you_mean(&key.value, allowed) {
            Some(s) => format!("did you mean `{s}`? Expected one of {list}"),
            None => format!("expected one of {list}"),
        };
        self.error_help(
            &key.span,
            format!("Unknown key `{}` in {context}", key.value),
            help,
        );
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<Spanned<String>> {
        match node.scalar_string() {
            Some(s) => Some(Spanned::new(s, node.span.clone())),
            None => {
                self.wrong_type(node, what, "a string");
                None
            }
        }
    }

    /// A string in which GitHub does not allow expressions.
    fn plain_string(&mut self, node: &Node, what: &str) -> Option<Spanned<String>> {
        let s = self.string(node, what)?;
        if s.value.contains("${{") {
            self.error(&s.span, format!("Expressions are not allowed in `{what}`"));
            return None;
        }
        Some(s)
    }

    /// `shell:`: a name or a custom command (`bash -e {0}`); an expression is checked here and
    /// evaluated by the runner.
    fn shell(&mut self, node: &Node) -> Option<Spanned<String>> {
        let s = self.string(node, "shell")?;
        if s.value.contains("${{") {
            self.template_str(&s.value, &s.span, "shell")?;
        }
        Some(s)
    }

    fn template(&mut self, node: &Node, what: &str) -> Option<Template> {
        let text = match &node.kind {
            NodeKind::Null => String::new(),
            _ => self.string(node, what)?.value,
        };
        self.template_str(&text, &node.span, what)
    }

    fn template_str(&mut self, text: &str, span: &Span, what: &str) -> Option<Template> {
        match Template::parse_in_file(text, span.clone(), self.text) {
            Ok(t) => {
                self.check_scope(t.expressions(), span, what);
                Some(t)
            }
            Err(e) => {
                self.expr_error(span, what, &e);
                None
            }
        }
    }

    /// Reports contexts and functions that `self.scope` does not allow.
    fn check_scope<'e>(&mut self, exprs: impl Iterator<Item = &'e Expr>, span: &Span, what: &str) {
        let Some(scope) = self.scope else {
            return;
        };
        let mut reported: Vec<String> = Vec::new();
        for e in exprs {
            for c in e.referenced_contexts() {
                if !scope.contexts.contains(&c.as_str()) && !reported.contains(&c) {
                    self.error_help(
                        span,
                        format!("Context `{c}` is not available in `{what}`"),
                        format!(
                            "in `{}` expressions may use: {}",
                            scope.key,
                            scope.contexts.join(", ")
                        ),
                    );
                    reported.push(c);
                }
            }
            for f in e.referenced_functions() {
                let allowed = match f.to_ascii_lowercase().as_str() {
                    "hashfiles" => scope.hash_files,
                    "success" | "failure" | "cancelled" | "always" => scope.status,
                    _ => true,
                };
                if !allowed && !reported.iter().any(|r| r == f) {
                    self.error(
                        span,
                        format!("Function `{f}()` is not available in `{what}`"),
                    );
                    reported.push(f.to_owned());
                }
            }
        }
    }

    fn with_scope<T>(&mut self, scope: Option<Scope>, f: impl FnOnce(&mut Self) -> T) -> T {
        let saved = std::mem::replace(&mut self.scope, scope);
        let out = f(self);
        self.scope = saved;
        out
    }

    fn expr_error(&mut self, span: &Span, what: &str, e: &ExprError) {
        let span = e.span().unwrap_or(span).clone();
        self.error(&span, format!("Invalid expression in `{what}`: {e}"));
    }

    fn condition(&mut self, node: &Node, what: &str) -> Option<Condition> {
        let s = self.string(node, what)?;
        match Condition::parse_in_file(&s.value, s.span.clone(), self.text) {
            Ok(c) => {
                self.check_scope(c.expressions().into_iter(), &s.span, what);
                Some(c)
            }
            Err(e) => {
                self.expr_error(&s.span, what, &e);
                None
            }
        }
    }

    fn bool_or_expr(&mut self, node: &Node, what: &str) -> BoolOrExpr {
        match &node.kind {
            NodeKind::Bool(b) => BoolOrExpr::Bool(*b),
            NodeKind::String { value, .. } if value.contains("${{") => self
                .template_str(value, &node.span, what)
                .map_or(BoolOrExpr::Bool(false), BoolOrExpr::Expr),
            _ => {
                self.wrong_type(node, what, "a boolean or an expression");
                BoolOrExpr::Bool(false)
            }
        }
    }

    fn number_or_expr(&mut self, node: &Node, what: &str) -> Option<NumberOrExpr> {
        match &node.kind {
            NodeKind::Number { value, .. } => Some(NumberOrExpr::Number(*value)),
            NodeKind::String { value, .. } if value.contains("${{") => self
                .template_str(value, &node.span, what)
                .map(NumberOrExpr::Expr),
            _ => {
                self.wrong_type(node, what, "a number or an expression");
                None
            }
        }
    }

    fn bool(&mut self, node: &Node, what: &str) -> Option<bool> {
        match &node.kind {
            NodeKind::Bool(b) => Some(*b),
            _ => {
                self.wrong_type(node, what, "a boolean");
                None
            }
        }
    }

    /// A map of names to strings (`env`, `with`, `outputs`, `secrets`).
    fn template_map(&mut self, node: &Node, what: &str) -> IndexMap<String, Template> {
        let mut out = IndexMap::new();
        if let NodeKind::Null = node.kind {
            return out;
        }
        let Some(entries) = self.map(node, what) else {
            return out;
        };
        for (key, value) in entries {
            if matches!(value.kind, NodeKind::Seq(_) | NodeKind::Map(_)) {
                self.wrong_type(value, &format!("{what}.{}", key.value), "a string");
                continue;
            }
            if let Some(t) = self.template(value, &format!("{what}.{}", key.value)) {
                out.insert(key.value.clone(), t);
            }
        }
        out
    }

    /// `env:` as a mapping.
    fn env(&mut self, node: &Node, what: &str) -> Env {
        self.template_map(node, what)
    }

    /// `env:` of a job or step: a mapping, or one expression producing an object.
    fn env_or_expr(&mut self, node: &Node, what: &str) -> (Env, Option<Template>) {
        match &node.kind {
            NodeKind::String { value, .. } if value.contains("${{") => {
                (Env::new(), self.template_str(value, &node.span, what))
            }
            _ => (self.env(node, what), None),
        }
    }

    /// A string or a sequence of strings.
    fn string_list(&mut self, node: &Node, what: &str) -> Vec<Spanned<String>> {
        match &node.kind {
            NodeKind::Seq(items) => items
                .iter()
                .filter_map(|item| self.string(item, what))
                .collect(),
            NodeKind::Null => Vec::new(),
            _ => self.string(node, what).into_iter().collect(),
        }
    }

    fn spanned_json(node: &Node) -> Spanned<serde_json::Value> {
        Spanned::new(node.to_json(), node.span.clone())
    }

    // ---- workflow ----------------------------------------------------------------------

    fn workflow(&mut self, root: &Node) -> Option<Workflow> {
        let entries = match &root.kind {
            NodeKind::Map(entries) => entries,
            _ => {
                self.error(
                    &root.span,
                    format!("A workflow must be a mapping, found {}", root.kind_name()),
                );
                return None;
            }
        };
        self.check_keys(entries, WORKFLOW_KEYS, "the workflow");
        let mut wf = Workflow {
            file: self.file.clone(),
            name: None,
            run_name: None,
            on: Triggers::default(),
            env: Env::new(),
            defaults: Defaults::default(),
            permissions: None,
            concurrency: None,
            jobs: IndexMap::new(),
            warnings: Vec::new(),
        };
        let mut saw_on = false;
        let mut saw_jobs = false;
        for (key, value) in entries {
            match key.value.as_str() {
                "name" => wf.name = self.plain_string(value, "name").map(|s| s.value),
                "run-name" => {
                    wf.run_name = self
                        .with_scope(scope("run-name", &["github", "inputs", "vars"]), |l| {
                            l.template(value, "run-name")
                        });
                }
                "on" => {
                    saw_on = true;
                    wf.on = self.triggers(value);
                }
                "permissions" => wf.permissions = self.permissions(value),
                "env" => {
                    wf.env = self.with_scope(
                        scope("env", &["github", "secrets", "inputs", "vars"]),
                        |l| l.env(value, "env"),
                    );
                }
                "defaults" => wf.defaults = self.defaults(value, "defaults"),
                "concurrency" => {
                    wf.concurrency = self
                        .with_scope(scope("concurrency", &["github", "inputs", "vars"]), |l| {
                            l.concurrency(value, "concurrency")
                        });
                }
                "jobs" => {
                    saw_jobs = true;
                    wf.jobs = self.jobs(value);
                }
                _ => {}
            }
        }
        if !saw_on {
            self.error_help(
                &root.span,
                "Missing required key `on`",
                "add the events that start this workflow, e.g. `on: push`",
            );
        }
        if !saw_jobs {
            self.error(&root.span, "Missing required key `jobs`");
        }
        Some(wf)
    }

    fn permissions(&mut self, node: &Node) -> Option<Spanned<serde_json::Value>> {
        match &node.kind {
            NodeKind::String { value, .. } => {
                if !matches!(value.as_str(), "read-all" | "write-all") {
                    self.error_help(
                        &node.span,
                        format!("Invalid permissions `{value}`"),
                        "expected `read-all`, `write-all` or a mapping of scopes",
                    );
                }
            }
            NodeKind::Map(entries) => {
                self.check_keys(entries, PERMISSION_SCOPES, "permissions");
                for (key, value) in entries {
                    let ok = matches!(
                        value.scalar_string().as_deref(),
                        Some("read" | "write" | "none")
                    );
                    if !ok {
                        self.error_help(
                            &value.span,
                            format!("Invalid permission for `{}`", key.value),
                            "expected `read`, `write` or `none`",
                        );
                    }
                }
            }
            _ => self.wrong_type(node, "permissions", "a string or a mapping"),
        }
        Some(Self::spanned_json(node))
    }

    fn defaults(&mut self, node: &Node, what: &str) -> Defaults {
        let mut out = Defaults::default();
        let Some(entries) = self.map(node, what) else {
            return out;
        };
        self.check_keys(entries, &["run"], &format!("`{what}`"));
        if let Some((_, run)) = entries.iter().find(|(k, _)| k.value == "run") {
            let what = format!("{what}.run");
            let Some(entries) = self.map(run, &what) else {
                return out;
            };
            self.check_keys(
                entries,
                &["shell", "working-directory"],
                &format!("`{what}`"),
            );
            let mut run_defaults = RunDefaults::default();
            for (key, value) in entries {
                match key.value.as_str() {
                    "shell" => run_defaults.shell = self.shell(value),
                    "working-directory" => {
                        run_defaults.working_directory = self.template(value, "working-directory");
                    }
                    _ => {}
                }
            }
            out.run = run_defaults;
        }
        out
    }

    fn concurrency(&mut self, node: &Node, what: &str) -> Option<Concurrency> {
        match &node.kind {
            NodeKind::Map(entries) => {
                self.check_keys(
                    entries,
                    &["group", "cancel-in-progress"],
                    &format!("`{what}`"),
                );
                let mut group = None;
                let mut cancel = BoolOrExpr::Bool(false);
                for (key, value) in entries {
                    match key.value.as_str() {
                        "group" => group = self.template(value, "concurrency.group"),
                        "cancel-in-progress" => {
                            cancel = self.bool_or_expr(value, "concurrency.cancel-in-progress");
                        }
                        _ => {}
                    }
                }
                match group {
                    Some(group) => Some(Concurrency {
                        group,
                        cancel_in_progress: cancel,
                    }),
                    None => {
                        if !entries.iter().any(|(k, _)| k.value == "group") {
                            self.error(&node.span, format!("`{what}` is missing `group`"));
                        }
                        None
                    }
                }
            }
            NodeKind::Seq(_) | NodeKind::Null => {
                self.wrong_type(node, what, "a string or a mapping");
                None
            }
            _ => self.template(node, what).map(|group| Concurrency {
                group,
                cancel_in_progress: BoolOrExpr::Bool(false),
            }),
        }
    }

    // ---- on: ---------------------------------------------------------------------------

    fn triggers(&mut self, node: &Node) -> Triggers {
        let mut out = Triggers::default();
        match &node.kind {
            NodeKind::String { .. } => {
                if let Some(name) = self.event_name(node) {
                    out.events
                        .insert(name.value.clone(), EventTrigger::new(name.value, name.span));
                }
            }
            NodeKind::Seq(items) => {
                for item in items {
                    if let Some(name) = self.event_name(item) {
                        if out.events.contains_key(&name.value) {
                            self.error(
                                &name.span,
                                format!("Event `{}` is listed twice", name.value),
                            );
                            continue;
                        }
                        out.events
                            .insert(name.value.clone(), EventTrigger::new(name.value, name.span));
                    }
                }
            }
            NodeKind::Map(entries) => {
                for (key, value) in entries {
                    if !EVENTS.contains(&key.value.as_str()) {
                        self.unknown_event(key);
                        continue;
                    }
                    let trigger = self.event_trigger(key, value);
                    out.events.insert(key.value.clone(), trigger);
                }
            }
            _ => self.wrong_type(node, "on", "an event name, a list of events or a mapping"),
        }
        let written = match &node.kind {
            NodeKind::Seq(items) => items.len(),
            NodeKind::Map(entries) => entries.len(),
            _ => 1,
        };
        if written == 0 {
            self.error(&node.span, "`on` lists no events");
        }
        out
    }

    fn event_name(&mut self, node: &Node) -> Option<Spanned<String>> {
        let name = self.string(node, "on")?;
        if !EVENTS.contains(&name.value.as_str()) {
            self.unknown_event(&name);
            return None;
        }
        if name.value == "schedule" {
            self.error(&name.span, "`schedule` needs a list of `cron` entries");
            return None;
        }
        Some(name)
    }

    fn unknown_event(&mut self, name: &Spanned<String>) {
        let help = match did_you_mean(&name.value, EVENTS) {
            Some(s) => format!("did you mean `{s}`?"),
            None => "see GitHub's list of events that trigger workflows".to_owned(),
        };
        self.error_help(&name.span, format!("Unknown event `{}`", name.value), help);
    }

    fn event_trigger(&mut self, key: &Spanned<String>, node: &Node) -> EventTrigger {
        let event = key.value.as_str();
        let mut out = EventTrigger::new(event, key.span.clone());
        if event == "schedule" {
            out.schedule = self.schedule(node);
            return out;
        }
        let entries = match &node.kind {
            NodeKind::Null => return out,
            NodeKind::Map(entries) => entries,
            _ => {
                self.wrong_type(node, &format!("on.{event}"), "a mapping or empty");
                return out;
            }
        };
        let allowed: &[&str] = match event {
            "push" => &[
                "branches",
                "branches-ignore",
                "tags",
                "tags-ignore",
                "paths",
                "paths-ignore",
            ],
            "pull_request" | "pull_request_target" => &[
                "types",
                "branches",
                "branches-ignore",
                "paths",
                "paths-ignore",
            ],
            "workflow_dispatch" => &["inputs"],
            "workflow_call" => &["inputs", "outputs", "secrets"],
            "workflow_run" => &["workflows", "types", "branches", "branches-ignore"],
            "merge_group" => &["types", "branches", "branches-ignore"],
            "image_version" => &["names", "versions"],
            _ => &["types"],
        };
        self.check_keys(entries, allowed, &format!("`on.{event}`"));
        for (k, v) in entries {
            let what = format!("on.{event}.{}", k.value);
            match k.value.as_str() {
                "types" => out.types = Some(self.string_list(v, &what)),
                "workflows" => out.workflows = Some(self.string_list(v, &what)),
                "names" => out.names = Some(self.string_list(v, &what)),
                "versions" => out.versions = Some(self.string_list(v, &what)),
                "branches" => out.branches = self.patterns(v, &what),
                "branches-ignore" => out.branches_ignore = self.patterns(v, &what),
                "tags" => out.tags = self.patterns(v, &what),
                "tags-ignore" => out.tags_ignore = self.patterns(v, &what),
                "paths" => out.paths = self.patterns(v, &what),
                "paths-ignore" => out.paths_ignore = self.patterns(v, &what),
                "inputs" => out.inputs = self.inputs(v, event),
                "outputs" => out.outputs = self.call_outputs(v),
                "secrets" => out.secrets = self.call_secrets(v),
                _ => {}
            }
        }
        for (a, b) in [
            ("branches", "branches-ignore"),
            ("tags", "tags-ignore"),
            ("paths", "paths-ignore"),
        ] {
            let has = |name: &str| entries.iter().find(|(k, _)| k.value == name);
            if let (Some(_), Some((second, _))) = (has(a), has(b)) {
                self.error_help(
                    &second.span,
                    format!("Cannot use both `{a}` and `{b}` for event `{event}`"),
                    format!("use `{a}` with `!` patterns to exclude"),
                );
            }
        }
        out
    }

    fn patterns(&mut self, node: &Node, what: &str) -> Option<PatternList> {
        let items: Vec<&Node> = match &node.kind {
            NodeKind::Seq(items) => items.iter().collect(),
            NodeKind::String { .. } => vec![node],
            _ => {
                self.wrong_type(node, what, "a list of patterns");
                return None;
            }
        };
        let mut patterns = Vec::new();
        for item in items {
            let Some(s) = self.string(item, what) else {
                continue;
            };
            match FilterPattern::new(&s.value) {
                Ok(p) => patterns.push(Spanned::new(p, s.span)),
                Err(e) => self.error(&s.span, e.to_string()),
            }
        }
        Some(PatternList { patterns })
    }

    fn schedule(&mut self, node: &Node) -> Vec<CronSchedule> {
        let mut out = Vec::new();
        let NodeKind::Seq(items) = &node.kind else {
            self.wrong_type(node, "on.schedule", "a list of `cron` entries");
            return out;
        };
        for item in items {
            let Some(entries) = self.map(item, "on.schedule[*]") else {
                continue;
            };
            self.check_keys(entries, &["cron", "timezone"], "`on.schedule[*]`");
            let mut cron = None;
            let mut timezone = None;
            for (k, v) in entries {
                match k.value.as_str() {
                    "cron" => {
                        if let Some(s) = self.string(v, "cron") {
                            match validate_cron(&s.value) {
                                Ok(()) => cron = Some(s),
                                Err(e) => self.error(&s.span, e),
                            }
                        }
                    }
                    "timezone" => timezone = self.string(v, "timezone"),
                    _ => {}
                }
            }
            match cron {
                Some(cron) => out.push(CronSchedule { cron, timezone }),
                None if !entries.iter().any(|(k, _)| k.value == "cron") => {
                    self.error(&item.span, "Schedule entry is missing `cron`");
                }
                None => {}
            }
        }
        out
    }

    fn inputs(&mut self, node: &Node, event: &str) -> IndexMap<String, InputDef> {
        let mut out = IndexMap::new();
        if let NodeKind::Null = node.kind {
            return out;
        }
        let what = format!("on.{event}.inputs");
        let Some(entries) = self.map(node, &what) else {
            return out;
        };
        let dispatch = event == "workflow_dispatch";
        let allowed: &[&str] = if dispatch {
            &[
                "description",
                "required",
                "default",
                "type",
                "options",
                "deprecationMessage",
            ]
        } else {
            &[
                "description",
                "required",
                "default",
                "type",
                "deprecationMessage",
            ]
        };
        for (name, value) in entries {
            let what = format!("{what}.{}", name.value);
            let mut input = InputDef {
                name: name.value.clone(),
                span: name.span.clone(),
                description: None,
                required: false,
                default: None,
                input_type: InputType::String,
                options: Vec::new(),
                deprecation_message: None,
            };
            let entries: &Entries = match &value.kind {
                NodeKind::Null => &[],
                _ => match self.map(value, &what) {
                    Some(e) => e,
                    None => continue,
                },
            };
            self.check_keys(entries, allowed, &format!("input `{}`", name.value));
            let mut saw_type = false;
            for (k, v) in entries {
                match k.value.as_str() {
                    "description" => {
                        input.description = self.string(v, "description").map(|s| s.value)
                    }
                    "deprecationMessage" => {
                        input.deprecation_message =
                            self.string(v, "deprecationMessage").map(|s| s.value);
                    }
                    "required" => input.required = self.bool(v, "required").unwrap_or(false),
                    "default" => input.default = Some(Self::spanned_json(v)),
                    "options" => {
                        input.options = self
                            .string_list(v, "options")
                            .into_iter()
                            .map(|s| s.value)
                            .collect()
                    }
                    "type" => {
                        saw_type = true;
                        let Some(t) = self.string(v, "type") else {
                            continue;
                        };
                        let types: &[&str] = if dispatch {
                            &["string", "boolean", "number", "choice", "environment"]
                        } else {
                            &["string", "boolean", "number"]
                        };
                        input.input_type = match t.value.as_str() {
                            "string" => InputType::String,
                            "boolean" => InputType::Boolean,
                            "number" => InputType::Number,
                            "choice" if dispatch => InputType::Choice,
                            "environment" if dispatch => InputType::Environment,
                            other => {
                                let list = types.join("`, `");
                                self.warning(
                                    &t.span,
                                    format!("Unknown input type `{other}` (expected one of `{list}`); treated as `string`"),
                                );
                                InputType::String
                            }
                        };
                    }
                    _ => {}
                }
            }
            if !dispatch && !saw_type {
                self.error(
                    &name.span,
                    format!(
                        "Input `{}` of `workflow_call` is missing `type`",
                        name.value
                    ),
                );
            }
            if input.input_type == InputType::Choice {
                if input.options.is_empty() {
                    self.error(
                        &name.span,
                        format!("Choice input `{}` has no `options`", name.value),
                    );
                } else if let Some(d) = &input.default {
                    let d_str = d
                        .value
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| d.value.to_string());
                    if !input.options.contains(&d_str) {
                        self.error(
                            &d.span,
                            format!(
                                "Default `{d_str}` of input `{}` is not one of its options",
                                name.value
                            ),
                        );
                    }
                }
            } else if !input.options.is_empty() {
                self.error(
                    &name.span,
                    format!(
                        "Input `{}` has `options` but is not of type `choice`",
                        name.value
                    ),
                );
            }
            out.insert(name.value.clone(), input);
        }
        out
    }

    fn call_outputs(&mut self, node: &Node) -> IndexMap<String, CallOutput> {
        let mut out = IndexMap::new();
        let Some(entries) = self.map(node, "on.workflow_call.outputs") else {
            return out;
        };
        for (name, value) in entries {
            let Some(fields) = self.map(value, &format!("on.workflow_call.outputs.{}", name.value))
            else {
                continue;
            };
            self.check_keys(
                fields,
                &["description", "value"],
                &format!("output `{}`", name.value),
            );
            let mut description = None;
            let mut val = None;
            for (k, v) in fields {
                match k.value.as_str() {
                    "description" => description = self.string(v, "description").map(|s| s.value),
                    "value" => {
                        val = self.with_scope(
                            scope(
                                "on.workflow_call.outputs.<output_id>.value",
                                &["github", "jobs", "vars", "inputs"],
                            ),
                            |l| l.template(v, "value"),
                        );
                    }
                    _ => {}
                }
            }
            match val {
                Some(value) => {
                    out.insert(name.value.clone(), CallOutput { description, value });
                }
                None if !fields.iter().any(|(k, _)| k.value == "value") => {
                    self.error(
                        &name.span,
                        format!("Output `{}` is missing `value`", name.value),
                    );
                }
                None => {}
            }
        }
        out
    }

    fn call_secrets(&mut self, node: &Node) -> IndexMap<String, CallSecret> {
        let mut out = IndexMap::new();
        if let NodeKind::Null = node.kind {
            return out;
        }
        let Some(entries) = self.map(node, "on.workflow_call.secrets") else {
            return out;
        };
        for (name, value) in entries {
            let mut secret = CallSecret {
                description: None,
                required: false,
            };
            if let NodeKind::Map(fields) = &value.kind {
                self.check_keys(
                    fields,
                    &["description", "required"],
                    &format!("secret `{}`", name.value),
                );
                for (k, v) in fields {
                    match k.value.as_str() {
                        "description" => {
                            secret.description = self.string(v, "description").map(|s| s.value)
                        }
                        "required" => secret.required = self.bool(v, "required").unwrap_or(false),
                        _ => {}
                    }
                }
            } else if !matches!(value.kind, NodeKind::Null) {
                self.wrong_type(
                    value,
                    &format!("on.workflow_call.secrets.{}", name.value),
                    "a mapping",
                );
            }
            out.insert(name.value.clone(), secret);
        }
        out
    }

    // ---- jobs --------------------------------------------------------------------------

    fn jobs(&mut self, node: &Node) -> IndexMap<String, Job> {
        let mut out = IndexMap::new();
        let Some(entries) = self.map(node, "jobs") else {
            return out;
        };
        if entries.is_empty() {
            self.error(&node.span, "`jobs` must define at least one job");
        }
        for (id, body) in entries {
            if !valid_id(&id.value) {
                if id.value.contains("${{") {
                    self.error(&id.span, "Expressions are not allowed in job ids");
                } else {
                    self.error_help(
                        &id.span,
                        format!("Invalid job id `{}`", id.value),
                        "a job id must start with a letter or `_` and contain only letters, digits, `-` and `_`",
                    );
                }
            }
            if let Some(job) = self.job(id, body) {
                out.insert(id.value.clone(), job);
            }
        }
        out
    }

    fn job(&mut self, id: &Spanned<String>, node: &Node) -> Option<Job> {
        let context = format!("job `{}`", id.value);
        let entries = self.map(node, &format!("jobs.{}", id.value))?;
        self.check_keys(entries, JOB_KEYS, &context);
        let mut job = Job {
            id: id.value.clone(),
            span: id.span.clone(),
            name: None,
            needs: Vec::new(),
            if_cond: None,
            runs_on: None,
            env: Env::new(),
            defaults: Defaults::default(),
            timeout_minutes: None,
            continue_on_error: BoolOrExpr::Bool(false),
            outputs: IndexMap::new(),
            strategy: None,
            steps: Vec::new(),
            uses: None,
            with: IndexMap::new(),
            secrets: None,
            container: None,
            services: None,
            environment: None,
            concurrency: None,
            permissions: None,
            env_expr: None,
            snapshot: None,
        };
        let is_call = entries.iter().any(|(k, _)| k.value == "uses");
        let mut saw_steps = false;
        for (key, value) in entries {
            let k = key.value.as_str();
            if is_call && NOT_IN_CALL_JOB.contains(&k) {
                self.error(
                    &key.span,
                    format!("Key `{k}` is not allowed in {context}, which calls a reusable workflow (`uses`)"),
                );
                continue;
            }
            if !is_call && matches!(k, "with" | "secrets") {
                self.error(
                    &key.span,
                    format!(
                        "Key `{k}` is only allowed in a job that calls a reusable workflow (`uses`)"
                    ),
                );
                continue;
            }
            self.scope = job_scope(k);
            match k {
                "name" => job.name = self.template(value, "name"),
                "needs" => {
                    for need in self.string_list(value, "needs") {
                        if need.value.contains("${{") {
                            self.error(&need.span, "Expressions are not allowed in `needs`");
                        } else {
                            job.needs.push(need);
                        }
                    }
                }
                "if" => job.if_cond = self.condition(value, "if"),
                "runs-on" => job.runs_on = self.runs_on(value),
                "env" => (job.env, job.env_expr) = self.env_or_expr(value, "env"),
                "defaults" => job.defaults = self.defaults(value, "defaults"),
                "timeout-minutes" => {
                    job.timeout_minutes = self.number_or_expr(value, "timeout-minutes")
                }
                "continue-on-error" => {
                    job.continue_on_error = self.bool_or_expr(value, "continue-on-error")
                }
                "outputs" => job.outputs = self.template_map(value, "outputs"),
                "strategy" => job.strategy = self.strategy(value),
                "steps" => {
                    saw_steps = true;
                    job.steps = self.steps(value, &id.value);
                }
                "uses" => {
                    job.uses = self.string(value, "uses");
                    if let Some(u) = &job.uses
                        && u.value.contains("${{")
                    {
                        let span = u.span.clone();
                        self.warning(
                            &span,
                            "GitHub does not evaluate expressions in a job's `uses`",
                        );
                    }
                }
                "snapshot" => job.snapshot = self.snapshot(value),
                "with" => job.with = self.template_map(value, "with"),
                "secrets" => job.secrets = self.job_secrets(value),
                "container" => job.container = self.container(value, "container"),
                "services" => job.services = self.services(value),
                "environment" => job.environment = self.environment(value),
                "concurrency" => job.concurrency = self.concurrency(value, "concurrency"),
                "permissions" => job.permissions = self.permissions(value),
                _ => {}
            }
        }
        self.scope = None;
        if !is_call {
            if job.runs_on.is_none() && !entries.iter().any(|(k, _)| k.value == "runs-on") {
                self.error_help(
                    &id.span,
                    format!("Job `{}` is missing `runs-on`", id.value),
                    "add e.g. `runs-on: ubuntu-latest`, or `uses:` to call a reusable workflow",
                );
            }
            if !saw_steps {
                self.error(&id.span, format!("Job `{}` is missing `steps`", id.value));
            }
        }
        Some(job)
    }

    fn runs_on(&mut self, node: &Node) -> Option<Spanned<serde_json::Value>> {
        match &node.kind {
            NodeKind::String { .. } => {}
            NodeKind::Seq(items) => {
                if items.is_empty() {
                    self.error(&node.span, "`runs-on` lists no labels");
                }
                for item in items {
                    self.string(item, "runs-on");
                }
            }
            NodeKind::Map(entries) => {
                self.check_keys(entries, &["group", "labels"], "`runs-on`");
            }
            _ => {
                self.wrong_type(node, "runs-on", "a label, a list of labels or a mapping");
                return None;
            }
        }
        self.check_json_templates(node, "runs-on");
        Some(Self::spanned_json(node))
    }

    /// Checks that every string below `node` is a valid template.
    fn check_json_templates(&mut self, node: &Node, what: &str) {
        match &node.kind {
            NodeKind::String { value, .. } if value.contains("${{") => {
                let _ = self.template_str(value, &node.span, what);
            }
            NodeKind::Seq(items) => {
                for item in items {
                    self.check_json_templates(item, what);
                }
            }
            NodeKind::Map(entries) => {
                for (_, v) in entries {
                    self.check_json_templates(v, what);
                }
            }
            _ => {}
        }
    }

    fn job_secrets(&mut self, node: &Node) -> Option<JobSecrets> {
        match &node.kind {
            NodeKind::String { value, .. } if value == "inherit" => Some(JobSecrets::Inherit),
            NodeKind::Map(_) => Some(JobSecrets::Map(self.template_map(node, "secrets"))),
            _ => {
                self.wrong_type(node, "secrets", "`inherit` or a mapping");
                None
            }
        }
    }

    fn container(&mut self, node: &Node, what: &str) -> Option<Spanned<serde_json::Value>> {
        let service = what.starts_with("services.");
        match &node.kind {
            NodeKind::Null if !service => return None,
            NodeKind::String { .. } => {}
            NodeKind::Map(entries) => {
                let allowed = if service {
                    SERVICE_KEYS
                } else {
                    CONTAINER_KEYS
                };
                self.check_keys(entries, allowed, &format!("`{what}`"));
                if !entries.iter().any(|(k, _)| k.value == "image") {
                    self.error(&node.span, format!("`{what}` is missing `image`"));
                }
                for (k, v) in entries {
                    let contexts = match k.value.as_str() {
                        "credentials" => CREDENTIALS,
                        "env" => CONTAINER_ENV,
                        _ => JOB_LEVEL,
                    };
                    let key_what = format!("{what}.{}", k.value);
                    self.with_scope(scope("jobs.<job_id>.container/services", contexts), |l| {
                        l.check_json_templates(v, &key_what);
                    });
                    match k.value.as_str() {
                        "env" => {
                            self.env_or_expr(v, &format!("{what}.env"));
                        }
                        "credentials" if !is_expr(v) => {
                            if let Some(c) = self.map(v, &format!("{what}.credentials")) {
                                self.check_keys(
                                    c,
                                    &["username", "password"],
                                    &format!("`{what}.credentials`"),
                                );
                            }
                        }
                        "ports" | "volumes"
                            if !matches!(v.kind, NodeKind::Seq(_)) && !is_expr(v) =>
                        {
                            self.wrong_type(v, &format!("{what}.{}", k.value), "a sequence");
                        }
                        _ => {}
                    }
                }
            }
            _ => {
                self.wrong_type(node, what, "an image name or a mapping");
                return None;
            }
        }
        if let NodeKind::String { .. } = node.kind {
            self.check_json_templates(node, what);
        }
        Some(Self::spanned_json(node))
    }

    fn services(&mut self, node: &Node) -> Option<Spanned<serde_json::Value>> {
        if is_expr(node) {
            self.check_json_templates(node, "services");
            return Some(Self::spanned_json(node));
        }
        let entries = self.map(node, "services")?;
        for (name, value) in entries {
            if !valid_id(&name.value) {
                self.error(&name.span, format!("Invalid service id `{}`", name.value));
            }
            if is_expr(value) {
                self.check_json_templates(value, "services");
                continue;
            }
            if !matches!(value.kind, NodeKind::Map(_)) {
                self.wrong_type(value, &format!("services.{}", name.value), "a mapping");
                continue;
            }
            self.container(value, &format!("services.{}", name.value));
        }
        Some(Self::spanned_json(node))
    }

    fn snapshot(&mut self, node: &Node) -> Option<Spanned<serde_json::Value>> {
        match &node.kind {
            NodeKind::String { .. } => {}
            NodeKind::Map(entries) => {
                self.check_keys(entries, &["image-name", "version", "if"], "`snapshot`");
                if !entries.iter().any(|(k, _)| k.value == "image-name") {
                    self.error(&node.span, "`snapshot` is missing `image-name`");
                }
                if let Some((_, cond)) = entries.iter().find(|(k, _)| k.value == "if") {
                    self.condition(cond, "snapshot.if");
                }
            }
            _ => {
                self.wrong_type(node, "snapshot", "an image name or a mapping");
                return None;
            }
        }
        Some(Self::spanned_json(node))
    }

    fn environment(&mut self, node: &Node) -> Option<Spanned<serde_json::Value>> {
        match &node.kind {
            NodeKind::String { .. } => {}
            NodeKind::Map(entries) => {
                self.check_keys(entries, &["name", "url", "deployment"], "`environment`");
                if !entries.iter().any(|(k, _)| k.value == "name") {
                    self.error(&node.span, "`environment` is missing `name`");
                }
                for (k, v) in entries {
                    let s = if k.value == "url" {
                        scope(
                            "jobs.<job_id>.environment.url",
                            &[
                                "github", "needs", "strategy", "matrix", "job", "runner", "env",
                                "vars", "steps", "inputs",
                            ],
                        )
                    } else {
                        self.scope
                    };
                    self.with_scope(s, |l| l.check_json_templates(v, "environment"));
                }
            }
            _ => {
                self.wrong_type(node, "environment", "a name or a mapping");
                return None;
            }
        }
        if let NodeKind::String { .. } = node.kind {
            self.check_json_templates(node, "environment");
        }
        Some(Self::spanned_json(node))
    }

    fn strategy(&mut self, node: &Node) -> Option<Strategy> {
        let entries = self.map(node, "strategy")?;
        self.check_keys(
            entries,
            &["matrix", "fail-fast", "max-parallel"],
            "`strategy`",
        );
        let mut out = Strategy {
            matrix: None,
            fail_fast: BoolOrExpr::Bool(true),
            max_parallel: None,
        };
        for (k, v) in entries {
            match k.value.as_str() {
                "matrix" => out.matrix = self.matrix(v),
                "fail-fast" => out.fail_fast = self.bool_or_expr(v, "strategy.fail-fast"),
                "max-parallel" => {
                    out.max_parallel = self.number_or_expr(v, "strategy.max-parallel")
                }
                _ => {}
            }
        }
        Some(out)
    }

    fn matrix(&mut self, node: &Node) -> Option<MatrixDef> {
        let entries = match &node.kind {
            NodeKind::String { value, .. } if value.contains("${{") => {
                return self
                    .template_str(value, &node.span, "strategy.matrix")
                    .map(MatrixDef::Expr);
            }
            NodeKind::Map(entries) => entries,
            _ => {
                self.wrong_type(node, "strategy.matrix", "a mapping or an expression");
                return None;
            }
        };
        let mut dims = IndexMap::new();
        let mut include = Vec::new();
        let mut exclude = Vec::new();
        let mut exprs = IndexMap::new();
        for (k, v) in entries {
            let what = format!("strategy.matrix.{}", k.value);
            if let NodeKind::String { value, .. } = &v.kind
                && value.contains("${{")
            {
                if let Some(t) = self.template_str(value, &v.span, &what) {
                    if !matches!(k.value.as_str(), "include" | "exclude") {
                        // Keeps the dimension's place in declaration order.
                        dims.insert(k.value.clone(), Vec::new());
                    }
                    exprs.insert(k.value.clone(), t);
                }
                continue;
            }
            self.check_json_templates(v, &what);
            match k.value.as_str() {
                "include" | "exclude" => {
                    let NodeKind::Seq(items) = &v.kind else {
                        self.wrong_type(v, &what, "a list of mappings");
                        continue;
                    };
                    let mut list = Vec::new();
                    for item in items {
                        match &item.kind {
                            NodeKind::Map(fields) => list.push(
                                fields
                                    .iter()
                                    .map(|(fk, fv)| (fk.value.clone(), fv.to_json()))
                                    .collect::<IndexMap<_, _>>(),
                            ),
                            NodeKind::String { value, .. } if value.contains("${{") => {
                                self.error(&item.span, format!("Expressions in `{what}` must produce whole lists; write `{}: ${{{{ ... }}}}`", k.value));
                            }
                            _ => self.wrong_type(item, &format!("{what}[*]"), "a mapping"),
                        }
                    }
                    if k.value == "include" {
                        include = list;
                    } else {
                        exclude = list;
                    }
                }
                _ => match &v.kind {
                    NodeKind::Seq(items) => {
                        if items.is_empty() {
                            self.error(
                                &v.span,
                                format!("Matrix dimension `{}` has no values", k.value),
                            );
                        }
                        dims.insert(k.value.clone(), items.iter().map(Node::to_json).collect());
                    }
                    _ => self.wrong_type(v, &what, "a list of values"),
                },
            }
        }
        Some(MatrixDef::Literal {
            dims,
            include,
            exclude,
            span: node.span.clone(),
            exprs,
        })
    }

    // ---- steps -------------------------------------------------------------------------

    fn steps(&mut self, node: &Node, job: &str) -> Vec<Step> {
        let NodeKind::Seq(items) = &node.kind else {
            self.wrong_type(node, "steps", "a list of steps");
            return Vec::new();
        };
        if items.is_empty() {
            self.error(&node.span, format!("Job `{job}` has no steps"));
        }
        let mut ids: HashMap<String, Span> = HashMap::new();
        self.step_list(items, job, &mut ids, false)
    }

    /// Steps of a job or of a `parallel` group; `ids` collects step ids across the whole job.
    fn step_list(
        &mut self,
        items: &[Node],
        job: &str,
        ids: &mut HashMap<String, Span>,
        in_group: bool,
    ) -> Vec<Step> {
        let mut out = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let Some(step) = self.step(index, item, job, ids, in_group) else {
                continue;
            };
            if let Some(id) = &step.id {
                if let Some(first) = ids.get(&id.value) {
                    self.error(
                        &id.span,
                        format!(
                            "Duplicate step id `{}` in job `{job}` (first defined at {first})",
                            id.value
                        ),
                    );
                } else {
                    ids.insert(id.value.clone(), id.span.clone());
                }
            }
            out.push(step);
        }
        out
    }

    fn step(
        &mut self,
        index: usize,
        node: &Node,
        job: &str,
        ids: &mut HashMap<String, Span>,
        in_group: bool,
    ) -> Option<Step> {
        let context = if in_group {
            format!("parallel step {} of job `{job}`", index + 1)
        } else {
            format!("step {} of job `{job}`", index + 1)
        };
        let entries = self.map(node, &format!("jobs.{job}.steps[{index}]"))?;
        self.check_keys(entries, STEP_KEYS, &context);
        let get = |name: &str| entries.iter().find(|(k, _)| k.value == name);
        let mut id = None;
        let mut name = None;
        let mut if_cond = None;
        let mut env = Env::new();
        let mut env_expr = None;
        let mut continue_on_error = BoolOrExpr::Bool(false);
        let mut timeout_minutes = None;
        let mut background = false;
        for (k, v) in entries {
            self.scope = step_scope(k.value.as_str());
            match k.value.as_str() {
                "id" => {
                    if let Some(s) = self.string(v, "id") {
                        if valid_id(&s.value) {
                            id = Some(s);
                        } else if s.value.contains("${{") {
                            self.error(&s.span, "Expressions are not allowed in step ids");
                        } else {
                            self.error_help(
                                &s.span,
                                format!("Invalid step id `{}`", s.value),
                                "a step id must start with a letter or `_` and contain only letters, digits, `-` and `_`",
                            );
                        }
                    }
                }
                "name" => name = self.template(v, "name"),
                "if" => if_cond = self.condition(v, "if"),
                "env" => (env, env_expr) = self.env_or_expr(v, "env"),
                "continue-on-error" => {
                    continue_on_error = self.bool_or_expr(v, "continue-on-error");
                }
                "timeout-minutes" => timeout_minutes = self.number_or_expr(v, "timeout-minutes"),
                "background" => background = self.bool(v, "background").unwrap_or(false),
                _ => {}
            }
        }
        let kinds: Vec<&Spanned<String>> = entries
            .iter()
            .map(|(k, _)| k)
            .filter(|k| ACTION_KEYS.contains(&k.value.as_str()))
            .collect();
        let kind = match kinds.as_slice() {
            [] => {
                self.error_help(
                    &node.span,
                    format!("A step must have either `run` or `uses` ({context})"),
                    "add `run: <script>` or `uses: <action>`",
                );
                return None;
            }
            [one] => one.value.as_str(),
            [first, second, ..] => {
                self.error(
                    &second.span,
                    format!(
                        "A step cannot have both `{}` and `{}` ({context})",
                        first.value, second.value
                    ),
                );
                return None;
            }
        };
        // Keys that only make sense with some kinds of step.
        for (key, allowed_with) in [
            ("with", &["uses"][..]),
            ("shell", &["run"][..]),
            ("working-directory", &["run"][..]),
            ("background", &["run", "uses"][..]),
        ] {
            if let Some((k, _)) = get(key)
                && !allowed_with.contains(&kind)
            {
                let with = allowed_with
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(" or ");
                self.error(
                    &k.span,
                    format!("`{key}` is only allowed in a step with {with}"),
                );
            }
        }
        if background
            && in_group
            && let Some((k, _)) = get("background")
        {
            self.error(
                &k.span,
                "Steps of a `parallel` group already run in the background",
            );
        }
        self.scope = step_scope(kind);
        let (_, value) = get(kind)?;
        let action = match kind {
            "run" => {
                let script = self.template(value, "run")?;
                let shell = get("shell").and_then(|(_, v)| self.shell(v));
                let working_directory = get("working-directory")
                    .and_then(|(_, v)| self.template(v, "working-directory"));
                StepAction::Run {
                    script,
                    shell,
                    working_directory,
                }
            }
            "uses" => {
                let uses = self.plain_string(value, "uses")?;
                if uses.value.trim().is_empty() {
                    self.error(&uses.span, "`uses` is empty");
                    return None;
                }
                let with = get("with")
                    .map(|(_, v)| self.template_map(v, "with"))
                    .unwrap_or_default();
                StepAction::Uses { uses, with }
            }
            "wait" => {
                let list = self.string_list(value, "wait");
                if list.is_empty() {
                    self.error(&value.span, "`wait` names no steps");
                }
                for w in &list {
                    if !ids.contains_key(&w.value) {
                        self.error(
                            &w.span,
                            format!(
                                "`wait` names `{}`, which is not an earlier step id",
                                w.value
                            ),
                        );
                    }
                }
                StepAction::Wait { ids: list }
            }
            "wait-all" => {
                if !matches!(value.kind, NodeKind::Null) {
                    self.wrong_type(value, "wait-all", "empty");
                }
                StepAction::WaitAll
            }
            "cancel" => {
                let target = self.string(value, "cancel")?;
                if !ids.contains_key(&target.value) {
                    self.error(
                        &target.span,
                        format!(
                            "`cancel` names `{}`, which is not an earlier step id",
                            target.value
                        ),
                    );
                }
                StepAction::Cancel { id: target }
            }
            _ => {
                if in_group {
                    self.error(&value.span, "`parallel` groups cannot be nested");
                    return None;
                }
                let NodeKind::Seq(items) = &value.kind else {
                    self.wrong_type(value, "parallel", "a list of steps");
                    return None;
                };
                if items.is_empty() {
                    self.error(&value.span, "`parallel` lists no steps");
                }
                let steps = self.step_list(items, job, ids, true);
                StepAction::Parallel { steps }
            }
        };
        self.scope = None;
        Some(Step {
            index,
            span: node.span.clone(),
            id,
            name,
            if_cond,
            action,
            env,
            continue_on_error,
            timeout_minutes,
            env_expr,
            background,
        })
    }
}

/// Whether a node is a string holding an expression.
fn is_expr(node: &Node) -> bool {
    matches!(&node.kind, NodeKind::String { value, .. } if value.contains("${{"))
}

/// Whether `id` is a valid job or step id: a letter or `_`, then letters, digits, `-`, `_`.
pub fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The candidate closest to `word`, if it is a plausible typo.
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let lower = word.to_lowercase();
    candidates
        .iter()
        .map(|c| (edit_distance(&lower, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4) && *d < c.len().max(word.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and adjacent
/// transpositions each cost 1 (so `stpes` is one edit from `steps`).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_transpositions_once() {
        assert_eq!(edit_distance("stpes", "steps"), 1);
        assert_eq!(edit_distance("runs-of", "runs-on"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn did_you_mean_picks_nearest() {
        assert_eq!(did_you_mean("stpes", JOB_KEYS), Some("steps"));
        assert_eq!(did_you_mean("runs_on", JOB_KEYS), Some("runs-on"));
        assert_eq!(did_you_mean("zzzzzzzz", JOB_KEYS), None);
    }

    #[test]
    fn ids() {
        assert!(valid_id("build"));
        assert!(valid_id("_x-1"));
        assert!(!valid_id("1build"));
        assert!(!valid_id("a.b"));
        assert!(!valid_id(""));
    }
}
