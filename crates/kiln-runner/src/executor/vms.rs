//! Which VM each session of a run gets, from the jobs' `runs-on` (see [`crate::vm_types`]),
//! and the run's time limit.
//!
//! ```text
//! before anything is allocated (plan):
//!   every selected job whose `if:` holds now and whose runs-on (and matrix) can be evaluated
//!   without `needs`:
//!     evaluate runs-on per matrix leg -> labels -> VM type        (no type: error, exit 2)
//!   isolation = "workflow": all of them must select one type; it sizes the run's one VM
//!   time limit: that type's timeout (isolation = "job": the longest of the types selected)
//! when a leg starts (leg_type):
//!   evaluate runs-on with needs and matrix -> VM type
//!   isolation = "job": the leg's own VM is of that type
//!   isolation = "workflow": the type must be the run's VM's, or the leg fails
//! ```
//!
//! Without [`RunOptions::vm_types`] every VM is [`RunOptions::spec`] and there is no limit.

use std::time::Duration;

use indexmap::IndexMap;
use kiln_vm::VmSpec;
use kiln_workflow::{EvalContext, Job, JobStatus, MatrixLeg, Template, Value, Workflow};

use super::{ExecError, Isolation, RunOptions, StaticHost, context, selected};
use crate::vm_types::{VmType, VmTypeError, runs_on_labels};

/// The VM of a run's sessions before any job ran.
#[derive(Debug, Clone)]
pub(super) struct RunPlan {
    /// The VM of the run's session (`isolation = "workflow"`), or of jobs whose type is only
    /// known when they start.
    pub(super) spec: VmSpec,
    /// The whole-run time limit.
    pub(super) timeout: Option<Duration>,
}

/// The run's VM and time limit, checking every `runs-on` that can be evaluated now.
pub(super) fn plan(workflow: &Workflow, options: &RunOptions) -> Result<RunPlan, ExecError> {
    let Some(types) = &options.vm_types else {
        return Ok(RunPlan {
            spec: options.spec.clone(),
            timeout: None,
        });
    };
    let error = |source| ExecError::VmType {
        workflow: workflow.file.to_string(),
        source,
    };
    let host = StaticHost::new(JobStatus::Success);
    // (job, type) of every leg known now, in job order.
    let mut chosen: Vec<(String, VmType)> = Vec::new();
    for (job_id, job) in &workflow.jobs {
        if !selected(job_id, &options.only_jobs) || job.uses.is_some() {
            continue;
        }
        let Some(runs_on) = &job.runs_on else {
            chosen.push((job_id.clone(), types.default_type().clone()));
            continue;
        };
        if mentions_needs(&runs_on.value) {
            continue;
        }
        let ctx = options.context.base_contexts(workflow, job_id);
        // A job that will not run needs no VM (an `if:` that depends on other jobs is
        // checked again when the job starts).
        if let Some(cond) = &job.if_cond
            && !super::eval_condition(cond, &ctx, &host).unwrap_or(false)
        {
            continue;
        }
        let Ok(legs) = context::matrix_legs(job, &ctx, &host, &options.matrix_filter) else {
            continue;
        };
        for (index, leg) in legs.iter().enumerate() {
            let ctx = leg_context(&ctx, job, leg, index, legs.len());
            let ty = select(types, job_id, &runs_on.value, &ctx).map_err(error)?;
            chosen.push((job_id.clone(), ty.clone()));
        }
    }
    let Some((_, first)) = chosen.first() else {
        let default = types.default_type();
        return Ok(RunPlan {
            spec: default.spec.clone(),
            timeout: default.timeout,
        });
    };
    match options.isolation {
        Isolation::Workflow => {
            if let Some((job, other)) = chosen.iter().find(|(_, t)| t.name() != first.name()) {
                return Err(error(VmTypeError::Mixed {
                    first: (chosen[0].0.clone(), first.name().to_owned()),
                    second: (job.clone(), other.name().to_owned()),
                }));
            }
            Ok(RunPlan {
                spec: first.spec.clone(),
                timeout: first.timeout,
            })
        }
        Isolation::Job => {
            // The run may take as long as its longest-allowed VM type; a type without a limit
            // lifts it.
            let timeout = chosen
                .iter()
                .map(|(_, t)| t.timeout)
                .try_fold(Duration::ZERO, |longest, t| t.map(|t| longest.max(t)));
            Ok(RunPlan {
                spec: types.default_type().spec.clone(),
                timeout,
            })
        }
    }
}

/// The VM spec for one leg of `job`, whose contexts (with `needs`) are `ctx`. `Err` is the
/// message the leg fails with.
pub(super) fn leg_spec(
    options: &RunOptions,
    job_id: &str,
    job: &Job,
    ctx: &IndexMap<String, Value>,
    leg: (&MatrixLeg, usize, usize),
) -> Result<VmSpec, String> {
    let Some(types) = &options.vm_types else {
        return Ok(options.spec.clone());
    };
    let spec = match &job.runs_on {
        None => types.default_type().spec.clone(),
        Some(runs_on) => {
            let ctx = leg_context(ctx, job, leg.0, leg.1, leg.2);
            select(types, job_id, &runs_on.value, &ctx)
                .map_err(|e| e.to_string())?
                .spec
                .clone()
        }
    };
    Ok(spec)
}

/// Under `isolation = "workflow"`: `Err` when the leg needs another VM type than the run's.
pub(super) fn check_shared(
    options: &RunOptions,
    plan: &RunPlan,
    job_id: &str,
    job: &Job,
    ctx: &IndexMap<String, Value>,
    leg: (&MatrixLeg, usize, usize),
) -> Result<(), String> {
    let spec = leg_spec(options, job_id, job, ctx, leg)?;
    if spec.vm_type == plan.spec.vm_type {
        return Ok(());
    }
    Err(format!(
        "Job `{job_id}` runs on VM type `{}`, but the run's one VM is of type `{}` \
         (isolation = \"workflow\"); use --isolation job, or runs-on labels of one type",
        spec.vm_type, plan.spec.vm_type
    ))
}

fn leg_context(
    ctx: &IndexMap<String, Value>,
    job: &Job,
    leg: &MatrixLeg,
    index: usize,
    total: usize,
) -> IndexMap<String, Value> {
    let mut ctx = ctx.clone();
    ctx.insert("matrix".into(), context::matrix_value(leg));
    ctx.insert(
        "strategy".into(),
        context::strategy_value(job, index, total),
    );
    ctx
}

fn select<'a>(
    types: &'a crate::vm_types::VmTypes,
    job_id: &str,
    runs_on: &serde_json::Value,
    ctx: &IndexMap<String, Value>,
) -> Result<&'a VmType, VmTypeError> {
    let host = StaticHost::new(JobStatus::Success);
    let eval = EvalContext {
        contexts: ctx,
        host: &host,
    };
    let value = evaluate(runs_on, &eval).map_err(|reason| VmTypeError::BadRunsOn {
        job: job_id.to_owned(),
        reason,
    })?;
    let labels = runs_on_labels(job_id, &value)?;
    types.select(job_id, &labels)
}

/// `runs-on` with every `${{ }}` evaluated; a list item that evaluates to a list is spliced in.
fn evaluate(
    value: &serde_json::Value,
    eval: &EvalContext<'_>,
) -> Result<serde_json::Value, String> {
    Ok(match value {
        serde_json::Value::String(s) if s.contains("${{") => {
            let template = Template::parse(s, kiln_workflow::Span::unknown())
                .map_err(|e| format!("{s}: {e}"))?;
            template
                .eval_value(eval)
                .map_err(|e| format!("{s}: {e}"))?
                .to_json()
        }
        serde_json::Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                match evaluate(item, eval)? {
                    serde_json::Value::Array(inner) => out.extend(inner),
                    other => out.push(other),
                }
            }
            serde_json::Value::Array(out)
        }
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), evaluate(v, eval)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// Whether `runs-on` depends on other jobs' outputs (only known when the job starts).
fn mentions_needs(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.to_ascii_lowercase().contains("needs."),
        serde_json::Value::Array(items) => items.iter().any(mentions_needs),
        serde_json::Value::Object(map) => map.values().any(mentions_needs),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(runs_on: serde_json::Value, matrix: serde_json::Value) -> Result<Vec<String>, String> {
        let mut ctx = IndexMap::new();
        ctx.insert("matrix".to_owned(), Value::from_json(matrix));
        ctx.insert(
            "inputs".to_owned(),
            Value::from_json(serde_json::json!({"size": "big"})),
        );
        let host = StaticHost::new(JobStatus::Success);
        let value = evaluate(
            &runs_on,
            &EvalContext {
                contexts: &ctx,
                host: &host,
            },
        )?;
        runs_on_labels("j", &value).map_err(|e| e.to_string())
    }

    #[test]
    fn runs_on_expressions_are_evaluated_and_lists_spliced() {
        let labels = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            eval(
                serde_json::json!("${{ matrix.os }}"),
                serde_json::json!({"os": "ubuntu-22.04"})
            ),
            Ok(labels(&["ubuntu-22.04"]))
        );
        assert_eq!(
            eval(
                serde_json::json!(["self-hosted", "${{ matrix.os }}"]),
                serde_json::json!({"os": ["linux", "gpu"]})
            ),
            Ok(labels(&["self-hosted", "linux", "gpu"]))
        );
        assert_eq!(
            eval(
                serde_json::json!({"group": "g", "labels": "${{ inputs.size }}-runner"}),
                serde_json::json!({})
            ),
            Ok(labels(&["big-runner"]))
        );
        assert_eq!(
            eval(
                serde_json::json!("${{ fromJSON('[\"a\", \"b\"]') }}"),
                serde_json::json!({})
            ),
            Ok(labels(&["a", "b"]))
        );
        assert!(eval(serde_json::json!("${{ matrix.os"), serde_json::json!({})).is_err());
    }

    #[test]
    fn runs_on_that_uses_needs_waits_for_the_job_to_start() {
        assert!(mentions_needs(&serde_json::json!([
            "${{ needs.setup.outputs.runner }}"
        ])));
        assert!(mentions_needs(
            &serde_json::json!({"labels": "${{ NEEDS.a.outputs.x }}"})
        ));
        assert!(!mentions_needs(&serde_json::json!("${{ matrix.os }}")));
    }
}
