//! The job dependency graph (`needs:`).
//!
//! Jobs form a directed graph through `needs`. [`job_order`] returns it as topological
//! *levels*: level 0 holds the jobs that need nothing, level n the jobs whose needs all lie in
//! earlier levels. Within a level, jobs keep their declaration order, so output is
//! deterministic. The runner may start a job as soon as its own needs finish; the levels are
//! the plan `kiln list` shows as stages.
//!
//! [`check`] finds what makes a graph unusable: a `needs` naming a job that does not exist, a
//! job needing itself, and cycles (each reported once, naming every job on it:
//! `a -> b -> c -> a`).

use std::collections::HashMap;

use crate::load::Diagnostic;
use crate::model::Workflow;
use crate::span::Span;

/// Why the jobs cannot be ordered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GraphError {
    /// `needs` names a job that does not exist.
    #[error("Job `{job}` needs `{need}`, which does not exist")]
    UnknownNeed {
        /// The job with the bad `needs`.
        job: String,
        /// The missing job id.
        need: String,
        /// Where the missing id was written.
        span: Span,
        /// A nearby job id, if any.
        suggestion: Option<String>,
    },
    /// The jobs depend on each other in a cycle.
    #[error("Job dependency cycle: {}", cycle.join(" -> "))]
    Cycle {
        /// The jobs on the cycle, the first repeated at the end.
        cycle: Vec<String>,
        /// Where the edge closing the cycle was written.
        span: Span,
    },
}

impl GraphError {
    /// Where the problem was written.
    pub fn span(&self) -> &Span {
        match self {
            GraphError::UnknownNeed { span, .. } | GraphError::Cycle { span, .. } => span,
        }
    }

    /// The error as a positioned diagnostic.
    pub fn into_diagnostic(self) -> Diagnostic {
        let help = match &self {
            GraphError::UnknownNeed {
                suggestion: Some(s),
                ..
            } => Some(format!("did you mean `{s}`?")),
            GraphError::UnknownNeed { .. } => None,
            GraphError::Cycle { .. } => {
                Some("remove one of these `needs` to break the cycle".into())
            }
        };
        Diagnostic {
            span: self.span().clone(),
            message: self.to_string(),
            help,
        }
    }
}

/// Every problem in the job graph: unknown needs first, then each cycle once.
pub fn check(wf: &Workflow) -> Vec<GraphError> {
    let mut errors = Vec::new();
    let ids: Vec<&str> = wf.jobs.keys().map(String::as_str).collect();
    for job in wf.jobs.values() {
        for need in &job.needs {
            if !wf.jobs.contains_key(&need.value) {
                errors.push(GraphError::UnknownNeed {
                    job: job.id.clone(),
                    need: need.value.clone(),
                    span: need.span.clone(),
                    suggestion: crate::load::did_you_mean(&need.value, &ids).map(str::to_owned),
                });
            }
        }
    }
    errors.extend(cycles(wf));
    errors
}

#[derive(Clone, Copy, PartialEq)]
enum Mark {
    New,
    OnPath,
    Done,
}

/// Finds cycles with an iterative depth-first search, reporting each back edge once.
fn cycles(wf: &Workflow) -> Vec<GraphError> {
    let index: HashMap<&str, usize> = wf
        .jobs
        .keys()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    let jobs: Vec<_> = wf.jobs.values().collect();
    let mut mark = vec![Mark::New; jobs.len()];
    let mut errors = Vec::new();
    for root in 0..jobs.len() {
        if mark[root] != Mark::New {
            continue;
        }
        // (job, next need to look at)
        let mut path: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = Mark::OnPath;
        while let Some(&mut (job, ref mut next)) = path.last_mut() {
            let needs = &jobs[job].needs;
            if *next >= needs.len() {
                mark[job] = Mark::Done;
                path.pop();
                continue;
            }
            let need = &needs[*next];
            *next += 1;
            let Some(&target) = index.get(need.value.as_str()) else {
                continue;
            };
            match mark[target] {
                Mark::New => {
                    mark[target] = Mark::OnPath;
                    path.push((target, 0));
                }
                Mark::OnPath => {
                    // `needs` points from a job to what must run first; show the cycle in
                    // that direction, starting at `target`.
                    let start = path.iter().position(|(j, _)| *j == target).unwrap_or(0);
                    let mut cycle: Vec<String> = path[start..]
                        .iter()
                        .map(|(j, _)| jobs[*j].id.clone())
                        .collect();
                    cycle.push(jobs[target].id.clone());
                    errors.push(GraphError::Cycle {
                        cycle,
                        span: need.span.clone(),
                    });
                }
                Mark::Done => {}
            }
        }
    }
    errors
}

/// The jobs in topological levels, declaration order within a level.
pub fn job_order(wf: &Workflow) -> Result<Vec<Vec<String>>, GraphError> {
    if let Some(e) = check(wf).into_iter().next() {
        return Err(e);
    }
    let mut level: HashMap<&str, usize> = HashMap::new();
    let mut remaining: Vec<&str> = wf.jobs.keys().map(String::as_str).collect();
    let mut levels: Vec<Vec<String>> = Vec::new();
    while !remaining.is_empty() {
        let current = levels.len();
        let ready: Vec<&str> = remaining
            .iter()
            .copied()
            .filter(|id| {
                wf.jobs[*id]
                    .needs
                    .iter()
                    .all(|n| level.get(n.value.as_str()).is_some_and(|l| *l < current))
            })
            .collect();
        if ready.is_empty() {
            // Unreachable after `check`, but never loop forever on a bad graph.
            let first = remaining[0];
            return Err(GraphError::Cycle {
                cycle: vec![first.to_owned(), first.to_owned()],
                span: wf.jobs[first].span.clone(),
            });
        }
        for id in &ready {
            level.insert(id, current);
        }
        remaining.retain(|id| !ready.contains(id));
        levels.push(ready.into_iter().map(str::to_owned).collect());
    }
    Ok(levels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_workflow;

    fn wf(jobs: &str) -> Result<Workflow, crate::WorkflowError> {
        parse_workflow("w.yml", &format!("on: push\njobs:\n{jobs}"))
    }

    fn job(id: &str, needs: &str) -> String {
        format!(
            "  {id}:\n    runs-on: ubuntu-latest\n    needs: {needs}\n    steps:\n      - run: echo\n"
        )
    }

    #[test]
    fn levels_keep_declaration_order() {
        let text = [
            job("c", "[a, b]"),
            job("a", "[]"),
            job("b", "a"),
            job("d", "[]"),
        ]
        .concat();
        let wf = wf(&text).expect("valid");
        let order = job_order(&wf).expect("acyclic");
        assert_eq!(order, vec![vec!["a", "d"], vec!["b"], vec!["c"]]);
    }

    #[test]
    fn cycle_is_named() {
        let text = [job("a", "c"), job("b", "a"), job("c", "b")].concat();
        let err = wf(&text).expect_err("cycle");
        assert_eq!(err.diagnostics.len(), 1, "{err}");
        assert_eq!(
            err.diagnostics[0].message,
            "Job dependency cycle: a -> c -> b -> a"
        );
    }

    #[test]
    fn self_need_is_a_cycle() {
        let err = wf(&job("a", "a")).expect_err("cycle");
        assert_eq!(err.diagnostics[0].message, "Job dependency cycle: a -> a");
    }

    #[test]
    fn unknown_need_suggests() {
        let text = [job("build", "[]"), job("test", "biuld")].concat();
        let err = wf(&text).expect_err("unknown");
        assert_eq!(
            err.diagnostics[0].message,
            "Job `test` needs `biuld`, which does not exist"
        );
        assert_eq!(
            err.diagnostics[0].help.as_deref(),
            Some("did you mean `build`?")
        );
    }
}
