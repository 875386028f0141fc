//! GitHub's cross-language expression vectors (`shared/conformance/expressions/*.json`), run
//! exactly as the reference runner (`actions/languageservices`, `xlang.test.ts`) runs them;
//! the folder's README describes that runner.
//!
//! For each case: the top-level keys of `contexts` are the only named values the parser
//! accepts; lexing, parsing and evaluation run in turn; an expected error must come from
//! that very stage and its text must *contain* the expected string; an expected result must
//! have the same kind and the same value (numbers by `==`, so `-0` equals `0`; objects as
//! ordered key/value lists).
//!
//! Skips: none. The 5 cases the reference marks `skip: ["typescript"]` are run: kiln reports
//! absolute positions in multi-line expressions (what those 4 cases expect) and has an
//! evaluation memory limit (what the 5th expects).

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use kiln_workflow::expr::StaticHost;
use kiln_workflow::{EvalContext, Expr, ExprError, Value};
use serde_json::Value as Json;

/// Cases skipped on purpose, by `(file, group, expr)`, each with the reason. Empty: every
/// case runs.
const SKIPPED: &[(&str, &str, &str, &str)] = &[];

fn vectors_dir() -> PathBuf {
    match std::env::var_os("KILN_SHARED_DIR") {
        Some(shared) => Path::new(&shared).join("conformance/expressions"),
        None => {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/expressions")
        }
    }
}

/// The kind names the vectors use.
fn kind_name(v: &Value) -> &'static str {
    v.kind().name()
}

/// Compares an actual value with an expected JSON value as `JSON.stringify` would.
fn same_value(actual: &Value, expected: &Json) -> bool {
    match (actual, expected) {
        (Value::Null, Json::Null) => true,
        (Value::Bool(a), Json::Bool(b)) => a == b,
        (Value::Number(a), Json::Number(b)) => b.as_f64().is_some_and(|b| *a == b),
        (Value::String(a), Json::String(b)) => a == b,
        (Value::Array(a), Json::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_value(x, y))
        }
        (Value::Object(a), Json::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|((ka, va), (kb, vb))| ka == kb && same_value(va, vb))
        }
        _ => false,
    }
}

fn stage(err: &ExprError) -> &'static str {
    match err {
        ExprError::Lex { .. } => "lexing",
        ExprError::Parse { .. } => "parsing",
        ExprError::Eval { .. } => "evaluation",
        ExprError::Template { .. } => "template",
    }
}

/// Runs one case; `Err` describes the mismatch.
fn run_case(case: &Json) -> Result<(), String> {
    let expr = case["expr"].as_str().ok_or("case without `expr`")?;
    let mut contexts = IndexMap::new();
    if let Some(Json::Object(map)) = case.get("contexts") {
        for (k, v) in map {
            contexts.insert(k.clone(), Value::from_json(v.clone()));
        }
    }
    let names: Vec<&str> = contexts.keys().map(String::as_str).collect();
    let host = StaticHost::default();
    let outcome = Expr::parse_with_contexts(expr, &names)
        .and_then(|e| e.eval(&EvalContext::new(&contexts, &host)));

    match (case.get("err"), case.get("result"), outcome) {
        (Some(want), _, Err(got)) => {
            let kind = want["kind"].as_str().unwrap_or_default();
            let text = want["value"].as_str().unwrap_or_default();
            let msg = got.to_string();
            if stage(&got) != kind {
                return Err(format!(
                    "expected a {kind} error, got {} error: {msg}",
                    stage(&got)
                ));
            }
            if !msg.contains(text) {
                return Err(format!("error text {msg:?} does not contain {text:?}"));
            }
            Ok(())
        }
        (Some(want), _, Ok(v)) => Err(format!(
            "expected a {} error, got {} {v:?}",
            want["kind"].as_str().unwrap_or_default(),
            kind_name(&v)
        )),
        (None, Some(want), Ok(v)) => {
            let kind = want["kind"].as_str().unwrap_or_default();
            if kind_name(&v) != kind {
                return Err(format!("expected kind {kind}, got {} {v:?}", kind_name(&v)));
            }
            if !same_value(&v, &want["value"]) {
                return Err(format!("expected {}, got {v:?}", want["value"]));
            }
            Ok(())
        }
        (None, Some(_), Err(e)) => Err(format!("unexpected {} error: {e}", stage(&e))),
        (None, None, _) => Err("case has neither `result` nor `err`".to_owned()),
    }
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 120 {
        format!("{}…", s.chars().take(120).collect::<String>())
    } else {
        s.to_owned()
    }
}

#[test]
fn expression_vectors_pass() {
    let dir = vectors_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read the vectors at {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            !matches!(
                p.file_name().and_then(|n| n.to_str()),
                Some("README.md") | Some("LICENSE-languageservices")
            )
        })
        .collect();
    files.sort();

    let (mut passed, mut skipped, mut total) = (0usize, 0usize, 0usize);
    let mut failures = Vec::new();
    for path in &files {
        // The reference runner allows only `.json` files and no sub-folders.
        assert!(
            path.is_file(),
            "sub-folder in the vectors: {}",
            path.display()
        );
        assert_eq!(
            path.extension().and_then(|e| e.to_str()),
            Some("json"),
            "not a .json file: {}",
            path.display()
        );
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let groups: IndexMap<String, Vec<Json>> = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()));
        for (group, cases) in &groups {
            for case in cases {
                total += 1;
                let expr = case["expr"].as_str().unwrap_or_default();
                if let Some((.., reason)) = SKIPPED
                    .iter()
                    .find(|(f, g, e, _)| *f == stem && g == group && *e == expr)
                {
                    eprintln!("skipped {stem}: {group} ({}): {reason}", shorten(expr));
                    skipped += 1;
                    continue;
                }
                match run_case(case) {
                    Ok(()) => passed += 1,
                    Err(why) => failures.push(format!(
                        "{stem}: {group} ({}): {}",
                        shorten(expr),
                        shorten(&why)
                    )),
                }
            }
        }
    }
    println!(
        "expression conformance: {passed} passed, {} failed, {skipped} skipped, of {total} cases in {} files",
        failures.len(),
        files.len()
    );
    assert!(total >= 1020, "expected at least 1020 cases, found {total}");
    assert!(
        failures.is_empty(),
        "{} failing cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
