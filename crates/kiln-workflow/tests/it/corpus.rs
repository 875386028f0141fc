//! Every workflow of the shared corpus parses, validates and plans.
//!
//! The corpus is real-world workflows (`workflows/`) and actionlint's accepted examples
//! (`actionlint-ok/`). It is found at `../../../shared/corpus` relative to this crate, or under
//! `$KILN_SHARED_DIR/corpus`.

use std::path::PathBuf;

use kiln_workflow::{MatrixDef, expand_matrix, job_order, parse_workflow};

pub fn corpus_dir() -> PathBuf {
    match std::env::var_os("KILN_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir).join("corpus"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus"),
    }
}

/// All corpus workflow files, sorted.
pub fn corpus_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in ["workflows", "actionlint-ok"] {
        let dir = corpus_dir().join(sub);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read corpus dir {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("readable dir entry").path();
            if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yml" | "yaml")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_corpus_workflow_parses_and_plans() {
    let files = corpus_files();
    assert!(
        files.len() >= 200,
        "corpus looks incomplete: {} files",
        files.len()
    );
    let mut failures = Vec::new();
    let mut jobs = 0;
    let mut legs = 0;
    for path in &files {
        let text = std::fs::read_to_string(path).expect("readable corpus file");
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        match parse_workflow(name, &text) {
            Ok(wf) => {
                let order = job_order(&wf).expect("validated workflows have an order");
                assert_eq!(order.iter().map(Vec::len).sum::<usize>(), wf.jobs.len());
                jobs += wf.jobs.len();
                for job in wf.jobs.values() {
                    let Some(def) = job.strategy.as_ref().and_then(|s| s.matrix.as_ref()) else {
                        continue;
                    };
                    if matches!(def, MatrixDef::Literal { .. }) && !def.has_expressions() {
                        match expand_matrix(def) {
                            Ok(l) => legs += l.len(),
                            Err(e) => failures.push(format!("{name}: matrix of {}: {e}", job.id)),
                        }
                    }
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} corpus files failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} files, {jobs} jobs, {legs} literal matrix legs",
        files.len()
    );
}

/// Parses and plans the whole corpus repeatedly and reports workflows per second (the
/// figure asked for in the issue; run with `--release -- --nocapture` for a real number).
#[test]
fn corpus_parse_and_plan_rate() {
    let texts: Vec<(String, String)> = corpus_files()
        .iter()
        .map(|p| {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("?")
                .to_owned();
            (
                name,
                std::fs::read_to_string(p).expect("readable corpus file"),
            )
        })
        .collect();
    let rounds = 3;
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        for (name, text) in &texts {
            let wf = parse_workflow(name, text).expect("corpus parses");
            job_order(&wf).expect("corpus plans");
        }
    }
    let elapsed = start.elapsed();
    let rate = (rounds * texts.len()) as f64 / elapsed.as_secs_f64();
    eprintln!(
        "parsed and planned {} workflows in {elapsed:?}: {rate:.0} workflows/s",
        rounds * texts.len()
    );
    assert!(rate > 0.0);
}
