//! Workflows parsed and planned per second over the shared corpus, and the ratio to the bare
//! YAML event scan of the same files (granit-parser alone), measured in the same run.
//!
//! `cargo bench -p kiln-workflow --bench parse`. The corpus is `../../../shared/corpus`, or
//! `$KILN_SHARED_DIR/corpus`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_workflow::{MatrixDef, expand_matrix, job_order, parse_workflow};

fn corpus() -> Vec<(String, String)> {
    let dir = std::env::var_os("KILN_SHARED_DIR")
        .map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
            PathBuf::from,
        )
        .join("corpus");
    let mut files = Vec::new();
    for sub in ["workflows", "actionlint-ok"] {
        for entry in std::fs::read_dir(dir.join(sub)).expect("corpus dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yml" || e == "yaml") {
                let text = std::fs::read_to_string(&path).expect("utf-8 workflow");
                files.push((path.display().to_string(), text));
            }
        }
    }
    files.sort();
    files
}

/// Parse, validate and plan (job order, literal matrices) one file.
fn plan(file: &str, text: &str) -> usize {
    let workflow = parse_workflow(file, text).expect("corpus workflows are valid");
    let mut legs = 0;
    for level in job_order(&workflow).expect("acyclic") {
        for id in level {
            let job = &workflow.jobs[&id];
            legs += match job.strategy.as_ref().and_then(|s| s.matrix.as_ref()) {
                Some(def @ MatrixDef::Literal { .. }) if !def.has_expressions() => {
                    expand_matrix(def).map_or(1, |l| l.len())
                }
                _ => 1,
            };
        }
    }
    legs
}

fn scan(text: &str) -> usize {
    let mut options = granit_parser::Options::default();
    options.set_emit_comments(false);
    granit_parser::Parser::new_from_str_with_options(text, options).count()
}

fn time(rounds: usize, mut f: impl FnMut() -> usize) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        std::hint::black_box(f());
        best = best.min(t.elapsed());
    }
    best
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rounds = if full { 15 } else { 1 };
    let files = corpus();
    let bytes: usize = files.iter().map(|(_, t)| t.len()).sum();
    let baseline = time(rounds, || files.iter().map(|(_, t)| scan(t)).sum());
    let ours = time(rounds, || files.iter().map(|(f, t)| plan(f, t)).sum());
    let per_sec = files.len() as f64 / ours.as_secs_f64();
    println!(
        "corpus: {} files, {:.1} KiB (best of {rounds})",
        files.len(),
        bytes as f64 / 1024.0
    );
    println!(
        "granit-parser event scan (baseline)   {:>8.2} ms",
        baseline.as_secs_f64() * 1e3
    );
    println!(
        "parse + validate + plan               {:>8.2} ms   {:.1}x baseline   {per_sec:.0} workflows/s",
        ours.as_secs_f64() * 1e3,
        ours.as_secs_f64() / baseline.as_secs_f64()
    );
}
