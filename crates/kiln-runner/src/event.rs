//! The run event stream.
//!
//! Every stage of a run emits [`RunEvent`] values into one [`EventSink`]. The consumers (the
//! terminal renderer, the `--json` writer, the logs, later the store and SSE) all read that one
//! stream. The serialized form is a contract (DESIGN.md, "`--json` event lines"): every line has
//! `type`, `ts` (RFC 3339) and `run`, plus the fields of its type.

use indexmap::IndexMap;
use serde::Serialize;
use tokio::sync::mpsc;

/// One event of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunEvent {
    /// The run id.
    pub run: String,
    /// When it happened.
    pub ts: jiff::Timestamp,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// A job's or run's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Conclusion {
    /// Everything passed.
    Success,
    /// Something failed.
    Failure,
    /// Cancelled (Ctrl-C, or `cancel-in-progress`).
    Cancelled,
    /// Skipped by its `if:`.
    Skipped,
}

impl Conclusion {
    /// The lowercase word GitHub uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Conclusion::Success => "success",
            Conclusion::Failure => "failure",
            Conclusion::Cancelled => "cancelled",
            Conclusion::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for Conclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// The kinds of [`RunEvent`], tagged by `type` in JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The run began (before any VM exists).
    RunStarted {
        /// Workflow display name.
        workflow: String,
        /// Workflow file.
        file: String,
        /// Triggering event name.
        event: String,
    },
    /// A session got its VM.
    SessionAllocated {
        /// Session id.
        session: String,
        /// VM id.
        vm: String,
        /// Backend name.
        backend: String,
        /// Allocation time in milliseconds.
        allocation_ms: u64,
        /// Workflow display name.
        workflow: String,
        /// How the VM came: `cold` (booted), `snapshot` or `pool`.
        source: String,
    },
    /// A session's VM was released.
    SessionReleased {
        /// Session id.
        session: String,
        /// VM id.
        vm: String,
    },
    /// A job (one matrix leg) started.
    JobStarted {
        /// Job id.
        job: String,
        /// Display name, with the matrix suffix.
        name: String,
    },
    /// A job (one matrix leg) finished.
    JobFinished {
        /// Job id.
        job: String,
        /// Display name, with the matrix suffix.
        name: String,
        /// Result.
        result: Conclusion,
        /// Evaluated `outputs:`.
        outputs: IndexMap<String, String>,
        /// What the job's steps wrote to `GITHUB_STEP_SUMMARY` (secrets masked); omitted from
        /// the JSON when empty.
        #[serde(skip_serializing_if = "String::is_empty")]
        summary: String,
        /// The job's `::error`/`::warning`/`::notice` annotations, in order; omitted from the
        /// JSON when there are none.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        annotations: Vec<crate::executor::Annotation>,
    },
    /// A step started.
    StepStarted {
        /// Job id.
        job: String,
        /// Step index in the job, from 0.
        step: usize,
        /// The step's `id:`.
        id: Option<String>,
        /// Display name.
        name: String,
        /// The VM it runs in.
        vm: String,
    },
    /// A step finished.
    StepFinished {
        /// Job id.
        job: String,
        /// Step index in the job, from 0.
        step: usize,
        /// The step's `id:`.
        id: Option<String>,
        /// Display name.
        name: String,
        /// The VM it ran in.
        vm: String,
        /// Result before `continue-on-error`.
        outcome: Conclusion,
        /// Result after `continue-on-error`.
        conclusion: Conclusion,
        /// Exit code, or null if the step did not run or was killed.
        exit_code: Option<i32>,
        /// Outputs written to `GITHUB_OUTPUT`.
        outputs: IndexMap<String, String>,
        /// Wall time.
        duration_ms: u64,
    },
    /// One line of a step's output (secrets masked).
    Log {
        /// Job id.
        job: String,
        /// Step index, or null for job-level messages.
        step: Option<usize>,
        /// Which stream.
        stream: LogStream,
        /// The line, without its newline.
        line: String,
    },
    /// A step snapshot was taken (`--snapshots steps`): after a successful step
    /// (`kind: after_step`), or at the moment a step failed (`kind: failure`).
    SnapshotTaken {
        /// Job id.
        job: String,
        /// The step it was taken after (index in the job, from 0).
        step: usize,
        /// `after_step` or `failure`.
        kind: String,
        /// Size of the snapshot's files (for a diff snapshot: the diff).
        size_bytes: u64,
        /// How long the VM was busy saving it.
        duration_ms: u64,
    },
    /// A step snapshot could not be taken; the run goes on without it.
    SnapshotFailed {
        /// Job id.
        job: String,
        /// The step it was to be taken after.
        step: usize,
        /// Why.
        error: String,
    },
    /// A step that `kiln rerun --from-failed` did not run again: its effects come from the
    /// restored snapshot.
    StepRestored {
        /// Job id.
        job: String,
        /// Step index in the job, from 0.
        step: usize,
        /// Display name.
        name: String,
        /// The run whose snapshot was restored.
        from_run: String,
    },
    /// The run ended.
    RunFinished {
        /// Workflow display name.
        workflow: String,
        /// Result.
        result: Conclusion,
        /// Wall time.
        duration_ms: u64,
        /// How many VMs the run allocated.
        vm_allocations: usize,
    },
}

/// Where a run's events go. Cheap to clone; a closed receiver drops events silently.
#[derive(Debug, Clone)]
pub struct EventSink {
    run: String,
    tx: mpsc::UnboundedSender<RunEvent>,
}

impl EventSink {
    /// A sink for run `run`, and the receiver that reads it.
    pub fn channel(run: impl Into<String>) -> (EventSink, mpsc::UnboundedReceiver<RunEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (EventSink::new(run, tx), rx)
    }

    /// A sink for run `run` feeding `tx` (several runs may share one receiver).
    pub fn new(run: impl Into<String>, tx: mpsc::UnboundedSender<RunEvent>) -> EventSink {
        EventSink {
            run: run.into(),
            tx,
        }
    }

    /// The run id.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// Emits one event stamped now.
    pub fn emit(&self, kind: EventKind) {
        let _ = self.tx.send(RunEvent {
            run: self.run.clone(),
            ts: jiff::Timestamp::now(),
            kind,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_type_ts_and_run() {
        let event = RunEvent {
            run: "r1".into(),
            ts: "2026-11-27T10:00:00Z".parse().expect("timestamp"),
            kind: EventKind::SessionReleased {
                session: "s1".into(),
                vm: "local-1".into(),
            },
        };
        let json = serde_json::to_value(&event).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({
                "run": "r1",
                "ts": "2026-11-27T10:00:00Z",
                "type": "session_released",
                "session": "s1",
                "vm": "local-1",
            })
        );
    }

    #[test]
    fn step_finished_has_every_contract_field() {
        let kind = EventKind::StepFinished {
            job: "build".into(),
            step: 2,
            id: None,
            name: "Run make".into(),
            vm: "local-1".into(),
            outcome: Conclusion::Failure,
            conclusion: Conclusion::Success,
            exit_code: Some(2),
            outputs: IndexMap::new(),
            duration_ms: 12,
        };
        let json = serde_json::to_value(&kind).expect("serialize");
        for field in [
            "type",
            "job",
            "step",
            "id",
            "name",
            "vm",
            "outcome",
            "conclusion",
            "exit_code",
            "outputs",
            "duration_ms",
        ] {
            assert!(json.get(field).is_some(), "missing {field}");
        }
        assert_eq!(json["id"], serde_json::Value::Null);
        assert_eq!(json["conclusion"], "success");
    }
}
