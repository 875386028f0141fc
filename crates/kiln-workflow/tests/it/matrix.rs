//! Matrices built from expressions: parsed, evaluated once `needs` outputs exist, expanded.

use indexmap::IndexMap;
use kiln_workflow::expr::StaticHost;
use kiln_workflow::matrix::evaluate_matrix;
use kiln_workflow::{EvalContext, MatrixDef, Value, expand_matrix, parse_workflow};

fn matrix_of(strategy: &str) -> MatrixDef {
    let text = format!(
        "on: push\njobs:\n  plan:\n    runs-on: x\n    steps: [{{run: echo}}]\n  a:\n    needs: plan\n    runs-on: x\n    strategy:\n{strategy}\n    steps: [{{run: echo}}]\n"
    );
    let wf = parse_workflow("w.yml", &text).unwrap_or_else(|e| panic!("{e}"));
    wf.jobs["a"]
        .strategy
        .as_ref()
        .and_then(|s| s.matrix.clone())
        .expect("matrix")
}

fn needs(outputs: serde_json::Value) -> IndexMap<String, Value> {
    let mut contexts = IndexMap::new();
    contexts.insert(
        "needs".to_owned(),
        Value::from_json(
            serde_json::json!({ "plan": { "result": "success", "outputs": outputs } }),
        ),
    );
    contexts
}

fn suffixes(def: &MatrixDef, contexts: &IndexMap<String, Value>) -> Vec<String> {
    let host = StaticHost::default();
    let ctx = EvalContext::new(contexts, &host);
    let literal = evaluate_matrix(def, &ctx).unwrap_or_else(|e| panic!("{e}"));
    assert!(!literal.has_expressions());
    expand_matrix(&literal)
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|l| l.suffix())
        .collect()
}

#[test]
fn whole_matrix_from_json_output() {
    let def = matrix_of("      matrix: ${{ fromJSON(needs.plan.outputs.m) }}");
    let contexts = needs(serde_json::json!({
        "m": r#"{"os": ["ubuntu", "macos"], "include": [{"os": "ubuntu", "big": true}]}"#
    }));
    assert_eq!(suffixes(&def, &contexts), ["(ubuntu, true)", "(macos)"]);
}

#[test]
fn dimension_and_include_from_expressions() {
    let def = matrix_of(
        "      matrix:\n        node: ${{ fromJSON(needs.plan.outputs.nodes) }}\n        os: [linux]\n        include: ${{ fromJSON(needs.plan.outputs.extra) }}",
    );
    let contexts = needs(serde_json::json!({
        "nodes": "[18, 20]",
        "extra": r#"[{"node": 22, "os": "linux"}]"#
    }));
    assert_eq!(
        suffixes(&def, &contexts),
        ["(18, linux)", "(20, linux)", "(22, linux)"]
    );
}

#[test]
fn interpolated_values_inside_a_literal_matrix() {
    let def =
        matrix_of("      matrix:\n        target: ['${{ needs.plan.outputs.t }}-gnu', plain]");
    let contexts = needs(serde_json::json!({ "t": "x86_64" }));
    assert_eq!(suffixes(&def, &contexts), ["(x86_64-gnu)", "(plain)"]);
}

#[test]
fn expression_of_the_wrong_shape_is_an_error() {
    let def = matrix_of("      matrix: ${{ fromJSON(needs.plan.outputs.m) }}");
    let contexts = needs(serde_json::json!({ "m": "[1, 2]" }));
    let host = StaticHost::default();
    let err = evaluate_matrix(&def, &EvalContext::new(&contexts, &host)).expect_err("array");
    assert!(err.to_string().contains("must produce an object"), "{err}");
}

#[test]
fn leg_display_names_like_github() {
    let text = "on: push
jobs:
  build:
    runs-on: x
    strategy:
      matrix: {os: [ubuntu], node: [18]}
    steps: [{run: echo}]
  named:
    name: Test on ${{ matrix.os }}
    runs-on: x
    strategy:
      matrix: {os: [ubuntu], node: [18]}
    steps: [{run: echo}]
";
    let wf = parse_workflow("w.yml", text).expect("valid");
    for (id, evaluated, expected) in [
        ("build", "build", "build (ubuntu, 18)"),
        ("named", "Test on ubuntu", "Test on ubuntu"),
    ] {
        let job = &wf.jobs[id];
        let def = job
            .strategy
            .as_ref()
            .and_then(|s| s.matrix.as_ref())
            .expect("matrix");
        let legs = expand_matrix(def).expect("literal");
        assert_eq!(legs[0].job_display_name(job, evaluated), expected);
    }
}
