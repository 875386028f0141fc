//! The REST API under `/api/v1`, its auth, and its one error shape.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET  | `/api/v1/runs?status=&result=&repository=&sha=&before=&limit=` | runs, newest first; `next` is the `before` of the next page |
//! | POST | `/api/v1/runs` | trigger a run like `workflow_dispatch`: `{repository, ref, workflow?, inputs?, clone_url?, sha?, forge?}` |
//! | GET  | `/api/v1/runs/{id}` | the run with its jobs and steps (status, outcome, timings) |
//! | GET  | `/api/v1/runs/{id}/logs` | the log as text; Server-Sent Events of every run event with `Accept: text/event-stream` |
//! | POST | `/api/v1/runs/{id}/cancel` | cancel a queued or running run |
//! | POST | `/api/v1/runs/{id}/rerun` | queue the same workflow at the same commit again |
//! | GET  | `/api/v1/openapi.json` | this API as OpenAPI 3.1 |
//! | GET  | `/healthz`, `/readyz` | liveness; readiness (the store answers) |
//!
//! Everything but webhooks, health and the OpenAPI document needs `KILN_API_TOKEN`, as
//! `Authorization: Bearer <token>` or as the password of HTTP Basic auth (so that browsers can
//! open the UI without JavaScript). Without a configured token these routes answer 401.
//!
//! Every error is `{"error": {"code": "...", "message": "..."}}` with the HTTP status below;
//! internal details are logged, never sent.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_store::{NewRun, RunFilter, RunRecord, RunResult, RunStatus, StoreError};
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::ReceiverStream;
use tracing::error;

use crate::Shared;
use crate::webhook::{Forge, Trigger};

/// API errors; the one place that maps errors to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or wrong token.
    #[error("A valid API token is required")]
    Unauthorized,
    /// No such thing.
    #[error("{0} not found")]
    NotFound(String),
    /// The request is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// The thing is in the wrong state.
    #[error("{0}")]
    Conflict(String),
    /// Something on kiln's side failed (details are logged, not sent).
    #[error("Internal error")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Internal(detail) => {
                error!("API: {detail}");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"kiln\", charset=\"UTF-8\""),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ApiError::NotFound(format!("Run {id}")),
            StoreError::WrongState { id, status } => {
                ApiError::Conflict(format!("Run {id} is {status}"))
            }
            other => ApiError::Internal(chain(&other)),
        }
    }
}

/// `a: b: c` from an error and its sources.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Whether the request carries the API token (Bearer, or Basic with the token as password).
pub(crate) fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(expected) = &shared.config.secrets.api_token else {
        return false;
    };
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let given = if let Some(token) = value.strip_prefix("Bearer ") {
        token.trim().as_bytes().to_vec()
    } else if let Some(basic) = value.strip_prefix("Basic ") {
        let Some(decoded) = decode_base64(basic.trim()) else {
            return false;
        };
        match decoded.iter().position(|&b| b == b':') {
            Some(i) => decoded[i + 1..].to_vec(),
            None => return false,
        }
    } else {
        return false;
    };
    aws_lc_rs::constant_time::verify_slices_are_equal(&given, expected.as_bytes()).is_ok()
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        acc = (acc << 6) | u32::from(value(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Middleware: 401 without the token.
pub(crate) async fn require_token(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    if authorized(&shared, request.headers()) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

pub(crate) fn routes(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    let protected = Router::new()
        .route("/api/v1/runs", get(list_runs).post(trigger_run))
        .route("/api/v1/runs/{id}", get(run_detail))
        .route("/api/v1/runs/{id}/logs", get(run_logs))
        .route("/api/v1/runs/{id}/cancel", post(cancel_run))
        .route("/api/v1/runs/{id}/rerun", post(rerun_run))
        .route_layer(middleware::from_fn_with_state(shared, require_token));
    Router::new()
        .merge(protected)
        .route("/api/v1/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    if shared.stopping.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response();
    }
    match shared.store.counts().await {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => {
            error!("/readyz: {}", chain(&e));
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response()
        }
    }
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

/// `GET /api/v1/runs` query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    result: Option<String>,
    repository: Option<String>,
    sha: Option<String>,
    before: Option<i64>,
    limit: Option<u32>,
}

impl ListQuery {
    pub(crate) fn filter(&self) -> Result<RunFilter, ApiError> {
        let bad = |what: &str, v: &str| ApiError::BadRequest(format!("Unknown {what} `{v}`"));
        Ok(RunFilter {
            status: match self.status.as_deref() {
                None | Some("") => None,
                Some(s) => Some(s.parse::<RunStatus>().map_err(|_| bad("status", s))?),
            },
            result: match self.result.as_deref() {
                None | Some("") => None,
                Some(s) => Some(s.parse::<RunResult>().map_err(|_| bad("result", s))?),
            },
            repository: self.repository.clone().filter(|s| !s.is_empty()),
            sha: self.sha.clone().filter(|s| !s.is_empty()),
            before: self.before,
            limit: self.limit.unwrap_or(50).clamp(1, 500),
        })
    }
}

#[derive(Serialize)]
struct RunList {
    runs: Vec<RunRecord>,
    /// Pass as `before` for the next page (absent on the last page).
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<i64>,
}

async fn list_runs(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RunList>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let filter = query.filter()?;
    let runs = shared.store.list(&filter).await?;
    let next = (runs.len() == filter.limit as usize)
        .then(|| runs.last().map(|r| r.seq))
        .flatten();
    Ok(Json(RunList { runs, next }))
}

/// A job of a run, folded from its events.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobView {
    /// Job id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// `running`, or the job's result.
    pub status: String,
    /// When it started.
    pub started_at: Option<String>,
    /// Wall time, once finished.
    pub duration_ms: Option<u64>,
    /// Its steps.
    pub steps: Vec<StepView>,
}

/// A step of a job, folded from its events.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepView {
    /// Index in the job.
    pub index: u64,
    /// Display name.
    pub name: String,
    /// `running`, or the step's conclusion.
    pub status: String,
    /// Result before `continue-on-error`.
    pub outcome: Option<String>,
    /// Exit code.
    pub exit_code: Option<i64>,
    /// Wall time.
    pub duration_ms: Option<u64>,
}

/// The job graph of a run from its stored events, in start order.
pub fn fold_jobs(events: &[serde_json::Value]) -> Vec<JobView> {
    let mut jobs: Vec<JobView> = Vec::new();
    let str_of = |e: &serde_json::Value, k: &str| {
        e.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    for e in events {
        let kind = e.get("type").and_then(|v| v.as_str()).unwrap_or_default();
        let job_id = str_of(e, "job");
        let name = str_of(e, "name");
        match kind {
            "job_started" => jobs.push(JobView {
                id: job_id.clone(),
                name,
                status: "running".into(),
                started_at: e.get("ts").and_then(|v| v.as_str()).map(str::to_owned),
                duration_ms: None,
                steps: Vec::new(),
            }),
            "job_finished" => {
                let result = str_of(e, "result");
                match jobs
                    .iter_mut()
                    .rev()
                    .find(|j| j.id == job_id && j.name == name && j.status == "running")
                {
                    Some(job) => {
                        job.status = result;
                        let end = e.get("ts").and_then(|v| v.as_str());
                        job.duration_ms = duration_between(job.started_at.as_deref(), end);
                    }
                    // Skipped jobs finish without starting.
                    None => jobs.push(JobView {
                        id: job_id.clone(),
                        name,
                        status: result,
                        started_at: None,
                        duration_ms: Some(0),
                        steps: Vec::new(),
                    }),
                }
            }
            "step_started" | "step_finished" => {
                // The latest running leg of the job (matrix legs share a job id).
                let Some(job) = jobs
                    .iter_mut()
                    .rev()
                    .find(|j| j.id == job_id && j.status == "running")
                else {
                    continue;
                };
                let index = e.get("step").and_then(|v| v.as_u64()).unwrap_or(0);
                if kind == "step_started" {
                    job.steps.push(StepView {
                        index,
                        name,
                        status: "running".into(),
                        outcome: None,
                        exit_code: None,
                        duration_ms: None,
                    });
                } else {
                    let view = StepView {
                        index,
                        name,
                        status: str_of(e, "conclusion"),
                        outcome: Some(str_of(e, "outcome")),
                        exit_code: e.get("exit_code").and_then(|v| v.as_i64()),
                        duration_ms: e.get("duration_ms").and_then(|v| v.as_u64()),
                    };
                    match job.steps.iter_mut().rev().find(|s| s.index == index) {
                        Some(step) => *step = view,
                        None => job.steps.push(view),
                    }
                }
            }
            _ => {}
        }
    }
    jobs
}

fn duration_between(start: Option<&str>, end: Option<&str>) -> Option<u64> {
    let start: jiff::Timestamp = start?.parse().ok()?;
    let end: jiff::Timestamp = end?.parse().ok()?;
    u64::try_from(end.duration_since(start).as_millis()).ok()
}

/// Every stored event of a run, parsed.
pub(crate) async fn all_events(
    shared: &Shared,
    run: &str,
) -> Result<Vec<(i64, serde_json::Value)>, ApiError> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = shared.store.events(run, after, 5000).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for e in page {
            if let Ok(v) = serde_json::from_str(&e.body) {
                out.push((e.id, v));
            }
        }
    }
    Ok(out)
}

#[derive(Serialize)]
struct RunDetail {
    #[serde(flatten)]
    run: RunRecord,
    duration_ms: Option<u64>,
    jobs: Vec<JobView>,
}

pub(crate) async fn get_run(shared: &Shared, id: &str) -> Result<RunRecord, ApiError> {
    shared
        .store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("Run {id}")))
}

async fn run_detail(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let run = get_run(&shared, &id).await?;
    let events: Vec<serde_json::Value> = all_events(&shared, &id)
        .await?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let duration_ms = match (run.started_at, run.finished_at) {
        (Some(s), Some(e)) => u64::try_from(e.duration_since(s).as_millis()).ok(),
        _ => None,
    };
    let detail = RunDetail {
        jobs: fold_jobs(&events),
        duration_ms,
        run,
    };
    serde_json::to_value(&detail)
        .map(Json)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// The log of a run as text: one header per step, then its lines.
pub(crate) fn log_text(events: &[(i64, serde_json::Value)]) -> String {
    let mut text = String::new();
    for (_, e) in events {
        let kind = e.get("type").and_then(|v| v.as_str()).unwrap_or_default();
        let s = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        match kind {
            "job_started" => text.push_str(&format!("=== job {} ===\n", s("name"))),
            "step_started" => text.push_str(&format!("--- {} ---\n", s("name"))),
            "log" => {
                text.push_str(s("line"));
                text.push('\n');
            }
            "run_finished" => text.push_str(&format!("=== run {} ===\n", s("result"))),
            _ => {}
        }
    }
    text
}

/// `GET /api/v1/runs/{id}/logs` query.
#[derive(Debug, Default, Deserialize)]
pub struct LogQuery {
    /// Only events after this id (SSE; like `Last-Event-ID`).
    after: Option<i64>,
}

async fn run_logs(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    get_run(&shared, &id).await?;
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if !wants_sse {
        let events = all_events(&shared, &id).await?;
        return Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            log_text(&events),
        )
            .into_response());
    }
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .or(query.after)
        .unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, std::convert::Infallible>>(64);
    tokio::spawn(stream_events(shared.clone(), id, after, tx));
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Sends a run's events after `after`, then new ones as they are stored, then `end` once the
/// run is finished. Stops when the client goes away or the server stops.
async fn stream_events(
    shared: Arc<Shared>,
    run: String,
    mut after: i64,
    tx: tokio::sync::mpsc::Sender<Result<SseEvent, std::convert::Infallible>>,
) {
    let mut tick = shared.events_tick.subscribe();
    loop {
        tick.mark_unchanged();
        // Read the state before the events, so that a run finishing in between is not missed.
        let finished = match shared.store.get(&run).await {
            Ok(Some(r)) => r.status == RunStatus::Finished,
            _ => true,
        };
        let page = match shared.store.events(&run, after, 1000).await {
            Ok(page) => page,
            Err(e) => {
                error!("SSE {run}: {}", chain(&e));
                return;
            }
        };
        let full = page.len() == 1000;
        for e in page {
            after = e.id;
            let kind = serde_json::from_str::<serde_json::Value>(&e.body)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                .unwrap_or_else(|| "event".to_owned());
            let event = SseEvent::default()
                .id(e.id.to_string())
                .event(kind)
                .data(e.body);
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        if full {
            continue;
        }
        if finished {
            let _ = tx
                .send(Ok(SseEvent::default().event("end").data("{}")))
                .await;
            return;
        }
        tokio::select! {
            _ = tick.changed() => {}
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = tx.closed() => return,
            () = shared.stopping.cancelled() => return,
        }
    }
}

async fn cancel_run(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<RunRecord>), ApiError> {
    let run = shared.store.request_cancel(&id).await?;
    crate::worker::cancel_live(&shared, &id);
    if run.status == RunStatus::Finished {
        crate::report::queue_status(&shared, &run).await;
    }
    Ok((StatusCode::ACCEPTED, Json(run)))
}

async fn rerun_run(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<RunRecord>), ApiError> {
    let old = get_run(&shared, &id).await?;
    let mut spec: NewRun = old.spec;
    spec.rerun_of = Some(old.id);
    spec.delivery = None;
    let run = shared.store.enqueue(spec).await?;
    if let Some(group) = run.spec.concurrency_group.clone() {
        crate::intake::apply_concurrency(&shared, &run, &group, run.spec.cancel_in_progress)
            .await?;
    }
    crate::report::queue_status(&shared, &run).await;
    shared.wake_workers.notify_waiters();
    Ok((StatusCode::CREATED, Json(run)))
}

/// `POST /api/v1/runs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerRequest {
    /// `owner/name`.
    repository: String,
    /// Branch (`main`) or full ref.
    #[serde(rename = "ref")]
    git_ref: String,
    /// Only this workflow (file name or path).
    workflow: Option<String>,
    /// `workflow_dispatch` inputs.
    #[serde(default)]
    inputs: serde_json::Map<String, serde_json::Value>,
    /// Where to fetch from (default: the repository's last run's, else GitHub's).
    clone_url: Option<String>,
    /// An exact commit (default: the ref's head).
    sha: Option<String>,
    /// `github` (default) or `gitea`: where statuses go.
    forge: Option<String>,
}

#[derive(Serialize)]
struct Triggered {
    runs: Vec<RunRecord>,
}

async fn trigger_run(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<TriggerRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Triggered>), ApiError> {
    let Json(request) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if request
        .repository
        .split('/')
        .filter(|p| !p.is_empty())
        .count()
        != 2
    {
        return Err(ApiError::BadRequest(
            "`repository` must be owner/name".to_owned(),
        ));
    }
    let forge = match request.forge.as_deref() {
        None => Forge::GitHub,
        Some(f) => {
            Forge::parse(f).ok_or_else(|| ApiError::BadRequest(format!("Unknown forge `{f}`")))?
        }
    };
    let git_ref = if request.git_ref.starts_with("refs/") {
        request.git_ref.clone()
    } else {
        format!("refs/heads/{}", request.git_ref)
    };
    let clone_url = match request.clone_url.clone() {
        Some(url) => url,
        None => {
            let last = shared
                .store
                .list(&RunFilter {
                    repository: Some(request.repository.clone()),
                    limit: 1,
                    ..RunFilter::default()
                })
                .await?;
            last.into_iter()
                .next()
                .map(|r| r.spec.clone_url)
                .unwrap_or_else(|| format!("https://github.com/{}.git", request.repository))
        }
    };
    let payload = serde_json::json!({
        "ref": git_ref,
        "inputs": request.inputs,
        "workflow": request.workflow,
        "repository": { "full_name": request.repository, "clone_url": clone_url },
        "sender": { "login": "kiln-api" },
    });
    let trigger = Trigger {
        forge,
        event: "workflow_dispatch".to_owned(),
        repository: request.repository.clone(),
        clone_url,
        fetch_ref: git_ref.clone(),
        git_ref,
        sha: request.sha.clone(),
        payload,
        inputs: serde_json::Value::Object(request.inputs.clone()),
        only_workflow: request.workflow.clone(),
        changed_files: None,
    };
    let runs = crate::intake::enqueue_trigger(&shared, &trigger, None)
        .await
        .map_err(|e| match e {
            crate::intake::IntakeError::Store(e) => ApiError::from(e),
            other => ApiError::BadRequest(chain(&other)),
        })?;
    if runs.is_empty() {
        return Err(ApiError::BadRequest(
            "No workflow at that ref runs on workflow_dispatch".to_owned(),
        ));
    }
    Ok((StatusCode::CREATED, Json(Triggered { runs })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_basic_credentials() {
        assert_eq!(
            decode_base64("a2lsbjpzM2NyZXQ="),
            Some(b"kiln:s3cret".to_vec())
        );
        assert_eq!(decode_base64("!!"), None);
    }

    #[test]
    fn jobs_and_steps_fold_from_events() {
        let events: Vec<serde_json::Value> = [
            r#"{"type":"job_started","job":"build","name":"build","ts":"2026-11-27T10:00:00Z"}"#,
            r#"{"type":"step_started","job":"build","step":0,"name":"Run make","id":null,"vm":"v"}"#,
            r#"{"type":"step_finished","job":"build","step":0,"name":"Run make","outcome":"failure","conclusion":"failure","exit_code":2,"duration_ms":12}"#,
            r#"{"type":"job_finished","job":"build","name":"build","result":"failure","ts":"2026-11-27T10:00:03Z"}"#,
            r#"{"type":"job_finished","job":"deploy","name":"deploy","result":"skipped"}"#,
        ]
        .iter()
        .map(|t| serde_json::from_str(t).expect("json"))
        .collect();
        let jobs = fold_jobs(&events);
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].status, "failure");
        assert_eq!(jobs[0].duration_ms, Some(3000));
        assert_eq!(jobs[0].steps[0].exit_code, Some(2));
        assert_eq!(jobs[0].steps[0].status, "failure");
        assert_eq!(jobs[1].status, "skipped");
    }
}
