//! Consumers of the run event stream: the live terminal view (stderr) and `--json` (stdout).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};

use kiln_runner::event::{Conclusion, EventKind, LogStream, RunEvent};
use kiln_runner::executor::RunReport;

/// How the terminal view is drawn.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    color: bool,
}

impl Style {
    /// Colour when stderr is a terminal and `NO_COLOR` is unset or empty.
    pub fn detect() -> Style {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Style {
            color: std::io::stderr().is_terminal() && !no_color,
        }
    }

    /// Whether stderr gets ANSI colour (for the log subscriber).
    pub fn detect_ansi() -> bool {
        Style::detect().color
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn conclusion(&self, c: Conclusion) -> String {
        match c {
            Conclusion::Success => self.paint("32", "✓ success"),
            Conclusion::Failure => self.paint("31", "✗ failure"),
            Conclusion::Cancelled => self.paint("33", "⊘ cancelled"),
            Conclusion::Skipped => self.paint("2", "- skipped"),
        }
    }
}

/// Writes the live view of several concurrent runs, one line per event worth showing, each
/// prefixed `[workflow/job]` as act does.
pub struct Terminal {
    style: Style,
    workflows: HashMap<String, String>,
    job_names: HashMap<(String, String), String>,
    json: bool,
}

impl Terminal {
    /// A renderer. With `json`, events go to stdout as JSON lines and only problems to stderr.
    pub fn new(style: Style, json: bool) -> Terminal {
        Terminal {
            style,
            workflows: HashMap::new(),
            job_names: HashMap::new(),
            json,
        }
    }

    /// Handles one event.
    pub fn event(&mut self, event: &RunEvent) {
        if self.json {
            let mut out = std::io::stdout().lock();
            if let Ok(line) = serde_json::to_string(event) {
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            return;
        }
        let line = self.line(event);
        if let Some(line) = line {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
    }

    fn prefix(&self, run: &str, job: &str) -> String {
        let workflow = self.workflows.get(run).map_or(run, String::as_str);
        if job.is_empty() {
            // A message about the whole run (its time limit).
            return self.style.paint("36", &format!("[{workflow}]"));
        }
        let job = self
            .job_names
            .get(&(run.to_owned(), job.to_owned()))
            .map_or(job, String::as_str);
        self.style.paint("36", &format!("[{workflow}/{job}]"))
    }

    fn line(&mut self, event: &RunEvent) -> Option<String> {
        let run = event.run.as_str();
        Some(match &event.kind {
            EventKind::RunStarted { workflow, file, .. } => {
                self.workflows.insert(run.to_owned(), workflow.clone());
                format!("{} {workflow} ({file})", self.style.paint("1", "▶ Run"))
            }
            EventKind::SessionAllocated {
                vm,
                backend,
                allocation_ms,
                session,
                ..
            } => format!(
                "{} VM {vm} ({backend}) allocated in {allocation_ms} ms for session {session}",
                self.style.paint("1", "◆")
            ),
            EventKind::SessionReleased { vm, .. } => {
                format!("{} VM {vm} released", self.style.paint("1", "◇"))
            }
            EventKind::JobStarted { job, name } => {
                self.job_names
                    .insert((run.to_owned(), job.clone()), name.clone());
                format!("{} 🚀 Start job", self.prefix(run, job))
            }
            EventKind::JobFinished { job, result, .. } => {
                format!(
                    "{} 🏁 Job {}",
                    self.prefix(run, job),
                    self.style.conclusion(*result)
                )
            }
            EventKind::StepStarted { job, name, .. } => {
                format!("{} ⭐ {name}", self.prefix(run, job))
            }
            EventKind::StepFinished {
                job,
                name,
                outcome,
                conclusion,
                duration_ms,
                ..
            } => {
                if *outcome == Conclusion::Skipped {
                    format!("{}   - skipped: {name}", self.prefix(run, job))
                } else {
                    let note = if outcome != conclusion {
                        " (continue-on-error)"
                    } else {
                        ""
                    };
                    format!(
                        "{}   {} {name} [{}]{note}",
                        self.prefix(run, job),
                        self.style.conclusion(*outcome),
                        human_ms(*duration_ms)
                    )
                }
            }
            EventKind::Log {
                job, stream, line, ..
            } => {
                if let Some(title) = line.strip_prefix("::group::") {
                    return Some(format!("{}   ▼ {title}", self.prefix(run, job)));
                }
                if line.starts_with("::endgroup::") {
                    return None;
                }
                let bar = match stream {
                    LogStream::Stdout => "|",
                    LogStream::Stderr => "!",
                };
                format!("{}   {bar} {line}", self.prefix(run, job))
            }
            EventKind::SnapshotTaken {
                job,
                step,
                kind,
                size_bytes,
                duration_ms,
            } => format!(
                "{}   📸 snapshot {} step {} ({} MiB, {})",
                self.prefix(run, job),
                if kind == "failure" {
                    "at failed"
                } else {
                    "after"
                },
                step + 1,
                size_bytes >> 20,
                human_ms(*duration_ms)
            ),
            EventKind::SnapshotFailed { job, step, error } => format!(
                "{}   ! warning: no snapshot after step {}: {error}",
                self.prefix(run, job),
                step + 1
            ),
            EventKind::StepRestored {
                job,
                name,
                from_run,
                ..
            } => format!(
                "{}   ↺ restored from run {from_run}: {name}",
                self.prefix(run, job)
            ),
            EventKind::RunFinished { .. } => return None,
        })
    }
}

/// The end-of-run summary: each job leg and step with its result and duration.
pub fn summary(style: Style, report: &RunReport, run: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "\n{} {} — {} in {} ({} VM{})\n",
        style.paint("1", "Summary"),
        report.workflow,
        style.conclusion(report.result),
        human_ms(report.duration.as_millis() as u64),
        report.vm_allocations,
        if report.vm_allocations == 1 { "" } else { "s" },
    ));
    out.push_str(&format!("  run {run}\n"));
    for job in &report.jobs {
        out.push_str(&format!(
            "  {:<12} {} [{}]\n",
            style.conclusion(job.result),
            job.name,
            human_ms(job.duration.as_millis() as u64)
        ));
        for step in &job.steps {
            let note = match (&step.error, step.outcome != step.conclusion) {
                (_, true) => " (failed, continue-on-error)".to_owned(),
                (Some(e), _) if step.outcome == Conclusion::Failure => format!(" — {e}"),
                _ => String::new(),
            };
            if step.restored {
                out.push_str(&format!(
                    "      {:<12} {} (not run: restored from the snapshot)\n",
                    style.paint("36", "restored"),
                    step.name
                ));
                continue;
            }
            out.push_str(&format!(
                "      {:<12} {} [{}]{note}\n",
                style.conclusion(step.conclusion),
                step.name,
                human_ms(step.duration.as_millis() as u64)
            ));
        }
        for annotation in &job.annotations {
            out.push_str(&format!("      {} {annotation}\n", style.paint("33", "!")));
        }
        if !job.summary.trim().is_empty() {
            out.push_str("      step summary:\n");
            for line in job.summary.lines() {
                out.push_str(&format!("        {line}\n"));
            }
        }
    }
    out
}

/// `850 ms`, `3.2 s`, `2 m 05 s`.
pub fn human_ms(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms} ms"),
        1000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} m {:02} s", ms / 60_000, (ms / 1000) % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_ms(850), "850 ms");
        assert_eq!(human_ms(3200), "3.2 s");
        assert_eq!(human_ms(125_000), "2 m 05 s");
    }
}
