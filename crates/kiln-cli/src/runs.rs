//! Run records of local runs: `kiln run` records every run in the embedded store (the SQLite
//! file `kiln serve` uses), and `kiln runs` / `kiln logs RUN` read them back.
//!
//! A local run is stored as `running` from its start (never `queued`), so a server on the same
//! data dir never claims it; its events are appended as they come, in batches; its end sets the
//! result. A store that cannot be opened or written costs the run nothing: kiln warns once and
//! the run goes on unrecorded.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use kiln_runner::event::{Conclusion, RunEvent};
use kiln_store::{NewRun, RunFilter, RunRecord, RunResult, RunStore, SqliteStore};
use tokio::sync::mpsc;

use crate::config::{Dirs, FileConfig};
use crate::render::human_ms;
use crate::{Exit, exit, usage};

/// How many events are written in one transaction at most.
const BATCH: usize = 256;

/// The run database of this data dir: `[server] database` when it names a SQLite file, else
/// `<data dir>/kiln.db`.
pub fn database_path(file: &FileConfig, dirs: &Dirs) -> PathBuf {
    match file.server().database.as_deref().map(str::trim) {
        Some(db) if !db.is_empty() && !db.starts_with("postgres") => {
            PathBuf::from(db.strip_prefix("sqlite://").unwrap_or(db))
        }
        _ => dirs.data.join("kiln.db"),
    }
}

enum Message {
    Start(String, Box<NewRun>),
    Event(RunEvent),
    Finish(String, RunResult, Option<String>),
}

/// Records runs in the background. Cheap to clone and to use from the event loop: every call
/// only queues. [`RecorderTask::close`] waits until everything queued is written.
#[derive(Clone)]
pub struct Recorder {
    tx: Option<mpsc::UnboundedSender<Message>>,
}

/// The task that writes what [`Recorder`]s queue.
pub struct RecorderTask(Option<tokio::task::JoinHandle<()>>);

impl RecorderTask {
    /// Waits until every recorder is dropped and everything they queued is written.
    pub async fn close(self) {
        if let Some(task) = self.0 {
            let _ = task.await;
        }
    }
}

impl Recorder {
    /// Opens the store at `path`; when that fails, warns and returns a recorder that records
    /// nothing.
    pub async fn open(path: &Path) -> (Recorder, RecorderTask) {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let store = match SqliteStore::open(path).await {
            Ok(store) => store,
            Err(e) => {
                eprintln!(
                    "warning: the run will not be recorded: cannot open the run database {}: {}",
                    path.display(),
                    crate::chain(&anyhow::Error::new(e))
                );
                return (Recorder { tx: None }, RecorderTask(None));
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Recorder { tx: Some(tx) },
            RecorderTask(Some(tokio::spawn(write_loop(store, rx)))),
        )
    }

    /// A run starts.
    pub fn start(&self, id: &str, run: NewRun) {
        self.send(Message::Start(id.to_owned(), Box::new(run)));
    }

    /// One of a run's events.
    pub fn event(&self, event: &RunEvent) {
        self.send(Message::Event(event.clone()));
    }

    /// A run ended.
    pub fn finish(&self, id: &str, result: RunResult, error: Option<String>) {
        self.send(Message::Finish(id.to_owned(), result, error));
    }

    fn send(&self, message: Message) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(message);
        }
    }
}

/// Records how a run's task ended.
pub fn record_outcome(
    recorder: &Recorder,
    run_id: &str,
    outcome: &Result<
        Option<Result<kiln_runner::executor::RunReport, kiln_runner::executor::ExecError>>,
        tokio::task::JoinError,
    >,
) {
    let (result, error) = match outcome {
        Ok(Some(Ok(report))) => (result_of(report.result), None),
        Ok(Some(Err(e))) => (RunResult::Error, Some(e.to_string())),
        Ok(None) => (RunResult::Cancelled, Some("stopped".to_owned())),
        Err(e) => (RunResult::Error, Some(format!("crashed: {e}"))),
    };
    recorder.finish(run_id, result, error);
}

/// The store's result for a run's conclusion.
pub fn result_of(conclusion: Conclusion) -> RunResult {
    match conclusion {
        Conclusion::Success | Conclusion::Skipped => RunResult::Success,
        Conclusion::Failure => RunResult::Failure,
        Conclusion::Cancelled => RunResult::Cancelled,
    }
}

async fn write_loop(store: SqliteStore, mut rx: mpsc::UnboundedReceiver<Message>) {
    let mut warned = false;
    let mut warn = |what: &str, e: kiln_store::StoreError| {
        if !warned {
            eprintln!(
                "warning: recording the run failed ({what}): {}; the run goes on unrecorded",
                crate::chain(&anyhow::Error::new(e))
            );
            warned = true;
        }
    };
    let mut pending: Vec<(String, String)> = Vec::new();
    let mut known: std::collections::HashSet<String> = Default::default();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH
            && let Ok(next) = rx.try_recv()
        {
            batch.push(next);
        }
        for message in batch {
            match message {
                Message::Start(id, run) => match store.record_local(&id, *run).await {
                    Ok(_) => {
                        known.insert(id);
                    }
                    Err(e) => warn("start", e),
                },
                Message::Event(event) => {
                    if known.contains(&event.run)
                        && let Ok(body) = serde_json::to_string(&event)
                    {
                        pending.push((event.run.clone(), body));
                    }
                }
                Message::Finish(id, result, error) => {
                    flush(&store, &mut pending, &mut warn).await;
                    if known.contains(&id)
                        && let Err(e) = store.finish(&id, result, error.as_deref()).await
                    {
                        warn("finish", e);
                    }
                }
            }
        }
        flush(&store, &mut pending, &mut warn).await;
    }
}

async fn flush(
    store: &SqliteStore,
    pending: &mut Vec<(String, String)>,
    warn: &mut impl FnMut(&str, kiln_store::StoreError),
) {
    while !pending.is_empty() {
        let run = pending[0].0.clone();
        let end = pending
            .iter()
            .position(|(r, _)| *r != run)
            .unwrap_or(pending.len());
        let bodies: Vec<String> = pending.drain(..end).map(|(_, b)| b).collect();
        if let Err(e) = store.append_events(&run, &bodies).await {
            warn("events", e);
        }
    }
}

/// Opens the store for reading, with a clear error.
async fn open_store(file: &FileConfig) -> Result<SqliteStore, Exit> {
    let path = database_path(file, &Dirs::from_env());
    if !path.exists() {
        return Err(usage(anyhow!(
            "No runs recorded yet ({} does not exist)",
            path.display()
        )));
    }
    SqliteStore::open(&path)
        .await
        .with_context(|| format!("Cannot open the run database {}", path.display()))
        .map_err(|e| Exit::new(exit::INFRA, e))
}

/// `kiln runs`.
pub async fn list(file: &FileConfig, json: bool, limit: u32) -> Result<u8, Exit> {
    let store = open_store(file).await?;
    let runs = store
        .list(&RunFilter {
            limit,
            ..RunFilter::default()
        })
        .await
        .context("Cannot list runs")
        .map_err(|e| Exit::new(exit::INFRA, e))?;
    let mut rows = Vec::new();
    for run in runs {
        let backend = backend_of(&store, &run.id).await;
        rows.push((run, backend));
    }
    if json {
        for (run, backend) in &rows {
            let line = serde_json::json!({
                "id": run.id,
                "workflow": run.spec.workflow_name,
                "workflow_file": run.spec.workflow_file,
                "event": run.spec.event,
                "status": run.status,
                "result": run.result,
                "duration_ms": duration_ms(run),
                "backend": backend,
                "started_at": run.started_at.map(|t| t.to_string()),
                "source": run.spec.forge,
                "rerun_of": run.spec.rerun_of,
            });
            println!("{line}");
        }
        return Ok(exit::SUCCESS);
    }
    if rows.is_empty() {
        eprintln!("No runs recorded yet.");
        return Ok(exit::SUCCESS);
    }
    println!(
        "{:<12}  {:<24}  {:<12}  {:<9}  {:>9}  {:<8}  STARTED",
        "RUN", "WORKFLOW", "EVENT", "RESULT", "DURATION", "BACKEND"
    );
    for (run, backend) in &rows {
        let result = match (run.status, run.result) {
            (_, Some(result)) => result.to_string(),
            (status, None) => status.to_string(),
        };
        let started = run
            .started_at
            .unwrap_or(run.created_at)
            .strftime("%Y-%m-%d %H:%M:%S")
            .to_string();
        println!(
            "{:<12}  {:<24}  {:<12}  {:<9}  {:>9}  {:<8}  {started}",
            run.id,
            truncate(&run.spec.workflow_name, 24),
            truncate(&run.spec.event, 12),
            result,
            duration_ms(run).map_or_else(|| "-".to_owned(), human_ms),
            backend.as_deref().unwrap_or("-"),
        );
    }
    Ok(exit::SUCCESS)
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(width - 1).collect();
        cut.push('…');
        cut
    }
}

fn duration_ms(run: &RunRecord) -> Option<u64> {
    let (start, end) = (run.started_at?, run.finished_at?);
    u64::try_from(end.as_millisecond() - start.as_millisecond()).ok()
}

/// The backend of a run: from its `session_allocated` event (one of the first few).
async fn backend_of(store: &SqliteStore, run: &str) -> Option<String> {
    let events = store.events(run, 0, 32).await.ok()?;
    events.iter().find_map(|e| {
        let value: serde_json::Value = serde_json::from_str(&e.body).ok()?;
        (value["type"] == "session_allocated")
            .then(|| value["backend"].as_str().map(str::to_owned))?
    })
}

/// `kiln logs RUN`.
pub async fn logs(file: &FileConfig, run: &str, json: bool) -> Result<u8, Exit> {
    let store = open_store(file).await?;
    let record = store
        .get(run)
        .await
        .context("Cannot read the run")
        .map_err(|e| Exit::new(exit::INFRA, e))?
        .ok_or_else(|| usage(anyhow!("No run `{run}` (see `kiln runs`)")))?;
    let mut after = 0;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    loop {
        let events = store
            .events(&record.id, after, 1000)
            .await
            .context("Cannot read the run's events")
            .map_err(|e| Exit::new(exit::INFRA, e))?;
        let Some(last) = events.last() else { break };
        after = last.id;
        for event in &events {
            if json {
                let _ = writeln!(out, "{}", event.body);
                continue;
            }
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&event.body) else {
                continue;
            };
            if let Some(line) = log_line(&value) {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    Ok(exit::SUCCESS)
}

/// One event as a line of `kiln logs` (plain text, no colour).
fn log_line(v: &serde_json::Value) -> Option<String> {
    let s = |key: &str| v[key].as_str().unwrap_or("").to_owned();
    let step = || v["step"].as_u64().map_or(0, |i| i + 1);
    Some(match v["type"].as_str()? {
        "run_started" => format!("▶ Run {} ({}) on {}", s("workflow"), s("file"), s("event")),
        "session_allocated" => format!(
            "◆ VM {} ({}, {}) allocated in {} ms",
            s("vm"),
            s("backend"),
            s("source"),
            v["allocation_ms"]
        ),
        "job_started" => format!("[{}] Start job {}", s("job"), s("name")),
        "step_started" => format!("[{}] ⭐ Step {}: {}", s("job"), step(), s("name")),
        "step_finished" => format!(
            "[{}]   {} step {}: {} [{} ms]",
            s("job"),
            s("conclusion"),
            step(),
            s("name"),
            v["duration_ms"]
        ),
        "step_restored" => format!(
            "[{}]   ↺ restored from run {}: step {}: {}",
            s("job"),
            s("from_run"),
            step(),
            s("name")
        ),
        "log" => format!(
            "[{}] {} {}",
            s("job"),
            if s("stream") == "stderr" { "!" } else { "|" },
            s("line")
        ),
        "snapshot_taken" => format!(
            "[{}]   📸 snapshot ({}) after step {}: {} bytes",
            s("job"),
            s("kind"),
            step(),
            v["size_bytes"]
        ),
        "snapshot_failed" => format!(
            "[{}]   ! no snapshot after step {}: {}",
            s("job"),
            step(),
            s("error")
        ),
        "job_finished" => format!("[{}] Job {}", s("job"), s("result")),
        "run_finished" => format!(
            "■ {} {} in {} ms",
            s("workflow"),
            s("result"),
            v["duration_ms"]
        ),
        _ => return None,
    })
}

/// What `kiln run` stores about a local run.
pub fn new_run(
    workflow: &kiln_workflow::Workflow,
    context: &kiln_runner::executor::RunContext,
    rerun_of: Option<String>,
) -> NewRun {
    let file = std::path::absolute(&*workflow.file)
        .map_or_else(|_| workflow.file.to_string(), |p| p.display().to_string());
    NewRun {
        forge: "local".to_owned(),
        repository: context.git.repository.clone(),
        clone_url: String::new(),
        sha: context.git.sha.clone(),
        git_ref: context.git.git_ref.clone(),
        event: context.event_name.clone(),
        workflow_file: file,
        workflow_name: workflow.display_name().to_owned(),
        payload: context.event_payload.clone(),
        inputs: serde_json::to_value(&context.inputs).unwrap_or_default(),
        delivery: None,
        concurrency_group: None,
        cancel_in_progress: false,
        rerun_of,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_show_steps_logs_and_results() {
        let line = |v: serde_json::Value| log_line(&v);
        assert_eq!(
            line(
                serde_json::json!({"type":"log","job":"b","step":0,"stream":"stdout","line":"hi"})
            )
            .as_deref(),
            Some("[b] | hi")
        );
        assert_eq!(
            line(serde_json::json!({"type":"step_started","job":"b","step":1,"name":"Fail"}))
                .as_deref(),
            Some("[b] ⭐ Step 2: Fail")
        );
        assert!(line(serde_json::json!({"type":"session_released"})).is_none());
    }
}
