//! Reusable workflows: a job whose `uses:` calls another workflow's `on: workflow_call`.
//!
//! ```text
//! caller job: if: -> with (typed, defaults, unknown or missing required = error)
//!                  -> secrets (mapped, or `inherit`)
//!   called workflow's jobs in dependency order, as jobs `<caller>/<called job>`
//!     (nested calls recurse, at most nine levels below the top caller, as on GitHub)
//!   outputs: on.workflow_call.outputs evaluated against the called jobs' `jobs` context
//! ```
//!
//! The called workflow was found and parsed before the run started (see `actions::catalog`).
//! Under `isolation = "workflow"` its jobs run in the caller's session, in the same VM and
//! workspace; under `isolation = "job"` each called job gets its own session.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use kiln_workflow::{EvalContext, Job, JobSecrets, JobStatus, Template, Value};

use super::{
    ExecError, JobReport, NeedResult, Prepared, RunState, StaticHost, WorkflowExecutor, context,
    eval_condition, eval_string, needs_status,
};
use crate::event::{Conclusion, EventKind};

type CallFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(Vec<JobReport>, NeedResult), ExecError>> + Send + 'a>>;

impl WorkflowExecutor {
    /// Runs one job of `state`'s workflow: a called workflow when it has `uses:`, otherwise its
    /// steps. Returns the legs' reports and what dependent jobs see.
    pub(super) fn run_any<'a>(
        &'a self,
        state: &'a RunState<'a>,
        job_id: &'a str,
        job: &'a Job,
        needs: &'a HashMap<String, NeedResult>,
        shared: Option<&'a Prepared>,
        depth: usize,
    ) -> CallFuture<'a> {
        Box::pin(async move {
            if job.uses.is_some() {
                return self
                    .run_call(state, job_id, job, needs, shared, depth)
                    .await;
            }
            let legs = self.run_job(state, job_id, job, needs, shared).await?;
            let need = NeedResult::from_legs(&legs);
            Ok((legs, need))
        })
    }

    async fn run_call(
        &self,
        state: &RunState<'_>,
        job_id: &str,
        job: &Job,
        needs: &HashMap<String, NeedResult>,
        shared: Option<&Prepared>,
        depth: usize,
    ) -> Result<(Vec<JobReport>, NeedResult), ExecError> {
        let started = Instant::now();
        let status = needs_status(job, needs, state.cancel.is_cancelled());
        let mut ctx = state.options.context.base_contexts(state.workflow, job_id);
        ctx.insert("needs".into(), context::needs_context(job, needs));
        let host = StaticHost::new(status);
        let run_it = match &job.if_cond {
            Some(cond) => eval_condition(cond, &ctx, &host),
            None => Ok(status == JobStatus::Success),
        };
        let single = |report: JobReport| {
            let need = NeedResult::from_legs(std::slice::from_ref(&report));
            Ok((vec![report], need))
        };
        match run_it {
            Ok(true) => {}
            Ok(false) => return single(self.skip_job(state, job_id, job, &ctx, &host)),
            Err(message) => return single(self.job_error(state, job_id, job, &message)),
        }
        let uses = job.uses.as_ref().map_or("", |u| u.value.trim());
        let Some(called) = state.catalog.workflow(uses).cloned() else {
            let message = format!("the called workflow `{uses}` was not loaded");
            return single(self.job_error(state, job_id, job, &message));
        };
        let options = match call_options(state, job, &called, &ctx, &host) {
            Ok(o) => o,
            Err(message) => return single(self.job_error(state, job_id, job, &message)),
        };
        let name = match &job.name {
            Some(t) => eval_string(t, &ctx, &host).unwrap_or_else(|_| t.source().to_owned()),
            None => job_id.to_owned(),
        };
        state.events.emit(EventKind::JobStarted {
            job: job_id.to_owned(),
            name: name.clone(),
        });
        let child = RunState {
            workflow: &called,
            options: &options,
            events: state.events,
            cancel: state.cancel,
            allocations: Default::default(),
            catalog: state.catalog.clone(),
            plan: state.plan.clone(),
            snapshots: state.snapshots,
            resume: None,
        };
        let levels = kiln_workflow::job_order(&called).map_err(|source| ExecError::Graph {
            workflow: called.file.to_string(),
            source: Box::new(source),
        })?;
        let mut inner_needs: HashMap<String, NeedResult> = HashMap::new();
        let mut reports = Vec::new();
        let mut jobs_ctx = IndexMap::new();
        let outcome: Result<(), ExecError> = async {
            for level in &levels {
                for inner_id in level {
                    let Some(inner) = called.jobs.get(inner_id) else {
                        continue;
                    };
                    let composed = format!("{job_id}/{inner_id}");
                    let (legs, need) = self
                        .run_any(&child, &composed, inner, &inner_needs, shared, depth + 1)
                        .await?;
                    jobs_ctx.insert(
                        inner_id.clone(),
                        Value::Object(IndexMap::from([
                            (
                                "result".to_owned(),
                                Value::String(need.result.as_str().into()),
                            ),
                            (
                                "outputs".to_owned(),
                                Value::Object(
                                    need.outputs
                                        .iter()
                                        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                                        .collect(),
                                ),
                            ),
                        ])),
                    );
                    inner_needs.insert(inner_id.clone(), need);
                    reports.extend(legs);
                }
            }
            Ok(())
        }
        .await;
        state.allocations.fetch_add(
            child.allocations.load(std::sync::atomic::Ordering::SeqCst),
            std::sync::atomic::Ordering::SeqCst,
        );
        outcome?;
        let result = NeedResult::from_legs(&reports).result;
        // Outputs of the call: `on.workflow_call.outputs`, from the called jobs.
        let mut out_ctx = child.options.context.base_contexts(&called, job_id);
        out_ctx.insert("jobs".into(), Value::Object(jobs_ctx));
        let out_host = StaticHost::new(match result {
            Conclusion::Failure => JobStatus::Failure,
            Conclusion::Cancelled => JobStatus::Cancelled,
            _ => JobStatus::Success,
        });
        let mut outputs = IndexMap::new();
        if let Some(trigger) = called.on.events.get("workflow_call") {
            for (key, output) in &trigger.outputs {
                if let Ok(value) = eval_string(&output.value, &out_ctx, &out_host) {
                    outputs.insert(key.clone(), value);
                }
            }
        }
        state.events.emit(EventKind::JobFinished {
            job: job_id.to_owned(),
            name: name.clone(),
            result,
            outputs: outputs.clone(),
            summary: String::new(),
            annotations: Vec::new(),
        });
        reports.push(JobReport {
            id: job_id.to_owned(),
            name,
            result,
            duration: started.elapsed().max(Duration::ZERO),
            steps: Vec::new(),
            outputs: outputs.clone(),
            summary: String::new(),
            annotations: Vec::new(),
        });
        Ok((reports, NeedResult { result, outputs }))
    }
}

/// The called workflow's run options: its `inputs` (from `with:`, typed, with defaults) and
/// `secrets` (mapped or inherited). Errors are the ones GitHub reports before the call starts.
fn call_options(
    state: &RunState<'_>,
    job: &Job,
    called: &kiln_workflow::Workflow,
    ctx: &IndexMap<String, Value>,
    host: &StaticHost,
) -> Result<super::RunOptions, String> {
    let trigger = called
        .on
        .events
        .get("workflow_call")
        .ok_or_else(|| format!("{} has no `on: workflow_call`", called.file))?;
    let eval = |t: &Template| {
        t.eval_value(&EvalContext {
            contexts: ctx,
            host,
        })
        .map_err(|e| format!("{}: {e}", t.span()))
    };
    let mut inputs: IndexMap<String, serde_json::Value> = IndexMap::new();
    for key in job.with.keys() {
        if !trigger.inputs.contains_key(key) {
            return Err(format!(
                "Invalid input, `{key}` is not defined in the called workflow {}",
                called.file
            ));
        }
    }
    for (name, def) in &trigger.inputs {
        let value = match job.with.get(name) {
            Some(t) => eval(t)?.to_json(),
            None => match &def.default {
                Some(d) => match &d.value {
                    serde_json::Value::String(s) if s.contains("${{") => {
                        let t = Template::parse(s, d.span.clone()).map_err(|e| e.to_string())?;
                        eval(&t)?.to_json()
                    }
                    other => other.clone(),
                },
                None if def.required => {
                    return Err(format!(
                        "Input `{name}` is required by the called workflow {}, but not provided",
                        called.file
                    ));
                }
                None => match def.input_type {
                    kiln_workflow::InputType::Boolean => serde_json::Value::Bool(false),
                    kiln_workflow::InputType::Number => serde_json::json!(0),
                    _ => serde_json::Value::String(String::new()),
                },
            },
        };
        let value = match (def.input_type, value) {
            (kiln_workflow::InputType::Boolean, serde_json::Value::String(s)) => {
                serde_json::Value::Bool(s == "true")
            }
            (kiln_workflow::InputType::Number, serde_json::Value::String(s)) => s
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or(serde_json::Value::String(s), serde_json::Value::Number),
            (_, v) => v,
        };
        inputs.insert(name.clone(), value);
    }
    let secrets = match &job.secrets {
        Some(JobSecrets::Inherit) => state.options.context.secrets.clone(),
        Some(JobSecrets::Map(map)) => {
            let mut out = IndexMap::new();
            for (k, t) in map {
                out.insert(k.clone(), eval_string(t, ctx, host)?);
            }
            out
        }
        None => IndexMap::new(),
    };
    for (name, def) in &trigger.secrets {
        if def.required && !secrets.contains_key(name) {
            return Err(format!(
                "Secret `{name}` is required by the called workflow {}, but not provided",
                called.file
            ));
        }
    }
    let mut options = state.options.clone();
    options.context.inputs = inputs;
    options.context.secrets = secrets;
    options.only_jobs = Vec::new();
    Ok(options)
}
