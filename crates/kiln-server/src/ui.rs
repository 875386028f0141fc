//! The web UI: a runs list and a run page, rendered on the server.
//!
//! Pages are plain HTML with inline CSS and work without JavaScript: the runs list filters
//! with a form, the run page shows jobs, steps (status and duration) and the whole log so far,
//! with ANSI colours as `<span>`s and `::group::` sections as `<details>` folds. Cancel and
//! re-run are form posts (same-origin only). With JavaScript, a running run's page follows the
//! run live: it reads `/api/v1/runs/{id}/logs` as Server-Sent Events from the last event it
//! rendered, appends log lines, updates step rows, and reloads once when the run ends.
//!
//! The UI sits behind the API token like the API; browsers ask for it with their own HTTP Basic
//! prompt (any user name, the token as password).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use kiln_store::{RunRecord, RunStatus};

use crate::Shared;
use crate::api::{ApiError, JobView, ListQuery, all_events, fold_jobs, get_run};

pub(crate) fn routes(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(runs_page))
        .route("/runs/{id}", get(run_page))
        .route("/runs/{id}/cancel", post(cancel_form))
        .route("/runs/{id}/rerun", post(rerun_form))
        .route_layer(middleware::from_fn_with_state(
            shared,
            crate::api::require_token,
        ))
        .route("/static/kiln.css", get(css))
}

/// HTML-escapes `text`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = r#"
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:10px 20px}header a{color:#fff;text-decoration:none;font-weight:600}
main{padding:16px 20px;max-width:1200px}
table{border-collapse:collapse;width:100%;background:#fff}th,td{padding:6px 8px;border-bottom:1px solid #d0d7de;text-align:left}
.st{font-weight:600;padding:1px 6px;border-radius:10px;font-size:12px}
.success{background:#dafbe1;color:#1a7f37}.failure,.error{background:#ffebe9;color:#cf222e}
.running,.queued{background:#fff8c5;color:#9a6700}.cancelled,.skipped{background:#eaeef2;color:#57606a}
.jobs{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}.job{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:8px;min-width:260px}
.job ol{margin:4px 0;padding-left:20px}
pre.log{background:#0d1117;color:#e6edf3;padding:10px;overflow:auto;font:12px/1.4 ui-monospace,monospace;white-space:pre-wrap}
pre.log summary{cursor:pointer;color:#8b949e}.hd{color:#58a6ff}
.a-b{font-weight:bold}.a-f0{color:#6e7681}.a-f1{color:#ff7b72}.a-f2{color:#3fb950}.a-f3{color:#d29922}.a-f4{color:#58a6ff}.a-f5{color:#bc8cff}.a-f6{color:#39c5cf}.a-f7{color:#e6edf3}
form.inline{display:inline}button{cursor:pointer}
"#;

async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css")], CSS).into_response()
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{} · kiln</title><link rel=\"stylesheet\" href=\"/static/kiln.css\"></head>\
         <body><header><a href=\"/\">kiln</a></header><main>{body}</main></body></html>",
        escape(title)
    ))
}

fn badge(status: &str) -> String {
    let class = match status {
        "success" | "failure" | "error" | "running" | "queued" | "cancelled" | "skipped" => status,
        _ => "",
    };
    format!(
        "<span class=\"st {class}\" data-status=\"{0}\">{0}</span>",
        escape(status)
    )
}

/// `queued`, `running`, or the result.
pub fn run_state(run: &RunRecord) -> &'static str {
    match (run.status, run.result) {
        (RunStatus::Queued, _) => "queued",
        (RunStatus::Running, _) => "running",
        (RunStatus::Finished, Some(r)) => r.as_str(),
        (RunStatus::Finished, None) => "error",
    }
}

fn short(sha: &str) -> &str {
    sha.get(..10).unwrap_or(sha)
}

fn ms(duration: Option<u64>) -> String {
    match duration {
        None => String::new(),
        Some(ms) if ms < 1000 => format!("{ms} ms"),
        Some(ms) if ms < 60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        Some(ms) => format!("{}m {}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

fn run_duration(run: &RunRecord) -> Option<u64> {
    let start = run.started_at?;
    let end = run.finished_at.unwrap_or_else(jiff::Timestamp::now);
    u64::try_from(end.duration_since(start).as_millis()).ok()
}

async fn runs_page(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Html<String>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let filter = query.filter()?;
    let runs = shared.store.list(&filter).await?;
    let mut body = String::from("<h1>Runs</h1>");
    let sel = |name: &str, current: Option<&str>, options: &[&str]| {
        let mut s = format!("<select name=\"{name}\"><option value=\"\">any {name}</option>");
        for o in options {
            let selected = if current == Some(*o) { " selected" } else { "" };
            let _ = write!(s, "<option{selected}>{o}</option>");
        }
        s.push_str("</select> ");
        s
    };
    let status = filter.status.map(|s| s.as_str());
    let result = filter.result.map(|r| r.as_str());
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/\">{}{}<input name=\"repository\" placeholder=\"owner/name\" \
         value=\"{}\"> <button>Filter</button></form><br>",
        sel("status", status, &["queued", "running", "finished"]),
        sel(
            "result",
            result,
            &["success", "failure", "cancelled", "error"]
        ),
        escape(filter.repository.as_deref().unwrap_or_default()),
    );
    body.push_str(
        "<table id=\"runs\"><thead><tr><th>Status</th><th>Workflow</th><th>Repository</th>\
         <th>Ref</th><th>Commit</th><th>Event</th><th>Queued</th><th>Duration</th></tr></thead><tbody>",
    );
    for run in &runs {
        let _ = write!(
            body,
            "<tr data-run=\"{id}\"><td>{}</td><td><a href=\"/runs/{id}\">{}</a></td><td>{}</td>\
             <td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            badge(run_state(run)),
            escape(&run.spec.workflow_name),
            escape(&run.spec.repository),
            escape(&run.spec.git_ref),
            escape(short(&run.spec.sha)),
            escape(&run.spec.event),
            run.created_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
            ms(run_duration(run)),
            id = escape(&run.id),
        );
    }
    body.push_str("</tbody></table>");
    if runs.is_empty() {
        body.push_str("<p>No runs yet.</p>");
    }
    if runs.len() == filter.limit as usize
        && let Some(last) = runs.last()
    {
        let mut link = format!("/?before={}", last.seq);
        for (k, v) in [
            ("status", status),
            ("result", result),
            ("repository", filter.repository.as_deref()),
        ] {
            if let Some(v) = v {
                let _ = write!(link, "&{k}={}", url_encode(v));
            }
        }
        let _ = write!(body, "<p><a href=\"{}\">Older runs</a></p>", escape(&link));
    }
    Ok(page("Runs", &body))
}

fn url_encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn jobs_html(jobs: &[JobView]) -> String {
    let mut out = String::from("<div class=\"jobs\" id=\"jobs\">");
    for job in jobs {
        let _ = write!(
            out,
            "<div class=\"job\" data-job=\"{}\"><b>{}</b> {} {}<ol>",
            escape(&job.id),
            escape(&job.name),
            badge(&job.status),
            ms(job.duration_ms)
        );
        for step in &job.steps {
            let _ = write!(
                out,
                "<li id=\"step-{}-{}\">{} {} <span class=\"dur\">{}</span></li>",
                escape(&job.id),
                step.index,
                escape(&step.name),
                badge(&step.status),
                ms(step.duration_ms)
            );
        }
        out.push_str("</ol></div>");
    }
    out.push_str("</div>");
    out
}

/// One log line as HTML: SGR colour codes become spans, other escapes are dropped.
pub fn ansi_to_html(line: &str) -> String {
    let mut out = String::new();
    let mut open = false;
    let mut rest = line;
    while let Some(pos) = rest.find('\x1b') {
        out.push_str(&escape(&rest[..pos]));
        rest = &rest[pos + 1..];
        let Some(body) = rest.strip_prefix('[') else {
            continue;
        };
        let end = body
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(body.len());
        let (params, tail) = body.split_at(end);
        let command = tail.chars().next();
        rest = tail.get(1..).unwrap_or("");
        if command != Some('m') {
            continue;
        }
        let mut classes = Vec::new();
        for p in params.split(';') {
            match p.parse::<u32>().unwrap_or(0) {
                1 => classes.push("a-b".to_owned()),
                n @ 30..=37 => classes.push(format!("a-f{}", n - 30)),
                n @ 90..=97 => classes.push(format!("a-f{}", n - 90)),
                _ => {}
            }
        }
        if open {
            out.push_str("</span>");
            open = false;
        }
        if !classes.is_empty() {
            let _ = write!(out, "<span class=\"{}\">", classes.join(" "));
            open = true;
        }
    }
    out.push_str(&escape(rest));
    if open {
        out.push_str("</span>");
    }
    out
}

/// The log as HTML: step headers, coloured lines, `::group::` folds.
fn log_html(events: &[(i64, serde_json::Value)]) -> String {
    let mut out = String::new();
    let mut in_group = false;
    for (_, e) in events {
        let kind = e.get("type").and_then(|v| v.as_str()).unwrap_or_default();
        let s = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        match kind {
            "step_started" | "job_started" => {
                if in_group {
                    out.push_str("</details>");
                    in_group = false;
                }
                let mark = if kind == "job_started" { "===" } else { "---" };
                let _ = writeln!(
                    out,
                    "<span class=\"hd\">{mark} {} {mark}</span>",
                    escape(s("name"))
                );
            }
            "log" => {
                let line = s("line");
                if let Some(title) = line
                    .strip_prefix("::group::")
                    .or_else(|| line.strip_prefix("##[group]"))
                {
                    if in_group {
                        out.push_str("</details>");
                    }
                    let _ = write!(out, "<details><summary>{}</summary>", escape(title));
                    in_group = true;
                } else if line.starts_with("::endgroup::") || line.starts_with("##[endgroup]") {
                    if in_group {
                        out.push_str("</details>");
                        in_group = false;
                    }
                } else {
                    out.push_str(&ansi_to_html(line));
                    out.push('\n');
                }
            }
            _ => {}
        }
    }
    if in_group {
        out.push_str("</details>");
    }
    out
}

const LIVE_JS: &str = r#"
(function(){
  var main=document.getElementById('run'); if(!main||main.dataset.live!=='1')return;
  var log=document.getElementById('log'), after=main.dataset.after, id=main.dataset.run;
  var es=new EventSource('/api/v1/runs/'+encodeURIComponent(id)+'/logs?after='+after);
  function esc(t){var d=document.createElement('div');d.textContent=t;return d.innerHTML;}
  function ansi(line){var out='',open=false,parts=line.split('\x1b[');out+=esc(parts[0]);
    for(var i=1;i<parts.length;i++){var m=parts[i].match(/^([0-9;]*)([A-Za-z])/);if(!m){out+=esc(parts[i]);continue;}
      var rest=parts[i].slice(m[0].length);if(m[2]==='m'){if(open){out+='</span>';open=false;}
        var cls=[];m[1].split(';').forEach(function(p){var n=parseInt(p||'0',10);
          if(n===1)cls.push('a-b');else if(n>=30&&n<=37)cls.push('a-f'+(n-30));else if(n>=90&&n<=97)cls.push('a-f'+(n-90));});
        if(cls.length){out+='<span class="'+cls.join(' ')+'">';open=true;}}
      out+=esc(rest);}
    if(open)out+='</span>';return out;}
  function add(html){log.insertAdjacentHTML('beforeend',html);}
  function badge(s){return '<span class="st '+s+'" data-status="'+s+'">'+s+'</span>';}
  function stepRow(e,status){var rid='step-'+e.job+'-'+e.step, li=document.getElementById(rid);
    if(!li){var job=document.querySelector('.job[data-job="'+CSS.escape(e.job)+'"] ol');
      if(!job){document.getElementById('jobs').insertAdjacentHTML('beforeend','<div class="job" data-job="'+esc(e.job)+'"><b>'+esc(e.job)+'</b> '+badge('running')+'<ol></ol></div>');
        job=document.querySelector('.job[data-job="'+CSS.escape(e.job)+'"] ol');}
      job.insertAdjacentHTML('beforeend','<li id="'+esc(rid)+'"></li>');li=document.getElementById(rid);}
    li.innerHTML=esc(e.name)+' '+badge(status)+(e.duration_ms!=null?' <span class="dur">'+e.duration_ms+' ms</span>':'');}
  es.addEventListener('log',function(m){var e=JSON.parse(m.data);add(ansi(e.line)+'\n');});
  es.addEventListener('job_started',function(m){var e=JSON.parse(m.data);add('<span class="hd">=== '+esc(e.name)+' ===</span>\n');});
  es.addEventListener('step_started',function(m){var e=JSON.parse(m.data);add('<span class="hd">--- '+esc(e.name)+' ---</span>\n');stepRow(e,'running');});
  es.addEventListener('step_finished',function(m){var e=JSON.parse(m.data);stepRow(e,e.conclusion);});
  es.addEventListener('run_finished',function(m){var e=JSON.parse(m.data);var st=document.getElementById('state');if(st)st.innerHTML=badge(e.result);});
  es.addEventListener('end',function(){es.close();location.reload();});
})();
"#;

async fn run_page(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Html<String>, ApiError> {
    let run = get_run(&shared, &id).await?;
    let events = all_events(&shared, &id).await?;
    let values: Vec<serde_json::Value> = events.iter().map(|(_, v)| v.clone()).collect();
    let jobs = fold_jobs(&values);
    let last = events.last().map_or(0, |(i, _)| *i);
    let state = run_state(&run);
    let live = run.status != RunStatus::Finished;
    let spec = &run.spec;
    let mut body = format!(
        "<div id=\"run\" data-run=\"{id}\" data-after=\"{last}\" data-live=\"{live}\">\
         <h1>{name} <span id=\"state\">{badge}</span></h1>\
         <p>{repo} · <code>{git_ref}</code> · <code>{sha}</code> · {event} · run <code>{id}</code>{rerun}</p>",
        id = escape(&run.id),
        live = u8::from(live),
        name = escape(&spec.workflow_name),
        badge = badge(state),
        repo = escape(&spec.repository),
        git_ref = escape(&spec.git_ref),
        sha = escape(&spec.sha),
        event = escape(&spec.event),
        rerun = spec
            .rerun_of
            .as_deref()
            .map(|o| format!(" · re-run of <a href=\"/runs/{0}\">{0}</a>", escape(o)))
            .unwrap_or_default(),
    );
    if let Some(error) = &run.error {
        let _ = write!(body, "<p class=\"st error\">{}</p>", escape(error));
    }
    let _ = write!(
        body,
        "<p>Duration: {}{}</p>",
        ms(run_duration(&run)),
        if live {
            format!(
                " <form class=\"inline\" method=\"post\" action=\"/runs/{}/cancel\">\
                 <button>Cancel</button></form>",
                escape(&run.id)
            )
        } else {
            format!(
                " <form class=\"inline\" method=\"post\" action=\"/runs/{}/rerun\">\
                 <button>Re-run</button></form>",
                escape(&run.id)
            )
        }
    );
    body.push_str(&jobs_html(&jobs));
    let _ = write!(
        body,
        "<h2>Log</h2><pre class=\"log\" id=\"log\">{}</pre></div>",
        log_html(&events)
    );
    let _ = write!(body, "<script>{LIVE_JS}</script>");
    Ok(page(&spec.workflow_name, &body))
}

/// Form posts must come from this origin (browsers send `Sec-Fetch-Site` or `Origin`), so a
/// page elsewhere cannot use a browser's cached credentials.
fn same_origin(headers: &HeaderMap) -> bool {
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some(site) => site == "same-origin" || site == "none",
        None => {
            let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
            let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
            match (origin, host) {
                (None, _) => true,
                (Some(o), Some(h)) => o.split("://").nth(1) == Some(h),
                (Some(_), None) => false,
            }
        }
    }
}

async fn cancel_form(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    if !same_origin(request.headers()) {
        return Ok((StatusCode::FORBIDDEN, "Cross-site form post refused").into_response());
    }
    let run = shared.store.request_cancel(&id).await?;
    crate::worker::cancel_live(&shared, &id);
    if run.status == RunStatus::Finished {
        crate::report::queue_status(&shared, &run).await;
    }
    Ok(Redirect::to(&format!("/runs/{}", url_encode(&id))).into_response())
}

async fn rerun_form(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    if !same_origin(request.headers()) {
        return Ok((StatusCode::FORBIDDEN, "Cross-site form post refused").into_response());
    }
    let old = get_run(&shared, &id).await?;
    let mut spec = old.spec;
    spec.rerun_of = Some(old.id);
    spec.delivery = None;
    let run = shared.store.enqueue(spec).await?;
    if let Some(group) = run.spec.concurrency_group.clone() {
        crate::intake::apply_concurrency(&shared, &run, &group, run.spec.cancel_in_progress)
            .await?;
    }
    crate::report::queue_status(&shared, &run).await;
    shared.wake_workers.notify_waiters();
    Ok(Redirect::to(&format!("/runs/{}", url_encode(&run.id))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_colours_become_spans_and_text_is_escaped() {
        assert_eq!(
            ansi_to_html("\x1b[1;31merror\x1b[0m: <x>"),
            "<span class=\"a-b a-f1\">error</span>: &lt;x&gt;"
        );
        assert_eq!(ansi_to_html("\x1b[2Kplain"), "plain");
        assert_eq!(
            ansi_to_html("open \x1b[32mgreen"),
            "open <span class=\"a-f2\">green</span>"
        );
    }

    #[test]
    fn groups_fold() {
        let events: Vec<(i64, serde_json::Value)> =
            ["::group::Setup", "inside", "::endgroup::", "after"]
                .iter()
                .enumerate()
                .map(|(i, l)| (i as i64, serde_json::json!({"type": "log", "line": l})))
                .collect();
        assert_eq!(
            log_html(&events),
            "<details><summary>Setup</summary>inside\n</details>after\n"
        );
    }

    #[test]
    fn cross_site_posts_are_refused() {
        let mut h = HeaderMap::new();
        h.insert("sec-fetch-site", "cross-site".parse().expect("header"));
        assert!(!same_origin(&h));
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse().expect("header"));
        h.insert(
            header::ORIGIN,
            "http://127.0.0.1:8080".parse().expect("header"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            "http://evil.example".parse().expect("header"),
        );
        assert!(!same_origin(&h));
    }
}
