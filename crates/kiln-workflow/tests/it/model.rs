//! The typed model holds what the YAML says, with positions.

use kiln_workflow::{
    BoolOrExpr, InputType, JobSecrets, MatrixDef, NumberOrExpr, StepAction, expand_matrix,
    parse_workflow,
};

const FULL: &str = r#"name: CI
run-name: Deploy by ${{ github.actor }}
on:
  push:
    branches: [main, 'releases/**']
    paths-ignore: ['docs/**']
  pull_request:
    types: [opened, labeled]
  workflow_dispatch:
    inputs:
      level:
        type: choice
        options: [info, debug]
        default: info
      dry:
        type: boolean
        required: true
  schedule:
    - cron: '30 5 * * 1-5'
permissions:
  contents: read
env:
  GLOBAL: 1
  VERSION: 3.10
  FLAG: true
defaults:
  run:
    shell: bash
    working-directory: src
concurrency:
  group: ci-${{ github.ref }}
  cancel-in-progress: true
jobs:
  build:
    name: Build ${{ matrix.os }}
    runs-on: ${{ matrix.os }}
    timeout-minutes: 30
    continue-on-error: ${{ matrix.experimental }}
    strategy:
      fail-fast: false
      max-parallel: 2
      matrix:
        os: [ubuntu-latest, windows-latest]
        node: [18, 20]
        include:
          - os: ubuntu-latest
            experimental: true
    outputs:
      version: ${{ steps.v.outputs.version }}
    env:
      JOB: x
    services:
      redis:
        image: redis
        ports: ['6379:6379']
    steps:
      - uses: actions/checkout@v4
        with:
          fetch-depth: 0
      - id: v
        name: Version
        if: github.event_name == 'push'
        run: |
          echo "version=1" >> "$GITHUB_OUTPUT"
          echo second line
        shell: sh
        env:
          STEP: y
        continue-on-error: true
        timeout-minutes: 5
  call:
    needs: build
    uses: ./.github/workflows/deploy.yml
    with:
      version: ${{ needs.build.outputs.version }}
    secrets: inherit
"#;

#[test]
fn full_workflow_is_modelled() {
    let wf = parse_workflow(".github/workflows/ci.yml", FULL).expect("valid workflow");
    assert!(wf.warnings.is_empty(), "{:?}", wf.warnings);
    assert_eq!(wf.display_name(), "CI");
    assert_eq!(
        wf.run_name.as_ref().map(|t| t.source()),
        Some("Deploy by ${{ github.actor }}")
    );
    let events: Vec<&str> = wf.on.events.keys().map(String::as_str).collect();
    assert_eq!(
        events,
        ["push", "pull_request", "workflow_dispatch", "schedule"]
    );
    let dispatch = &wf.on.events["workflow_dispatch"];
    assert_eq!(dispatch.inputs["level"].input_type, InputType::Choice);
    assert_eq!(dispatch.inputs["level"].options, ["info", "debug"]);
    assert!(dispatch.inputs["dry"].required);
    assert_eq!(
        wf.on.events["schedule"].schedule[0].cron.value,
        "30 5 * * 1-5"
    );
    assert_eq!(wf.env["GLOBAL"].source(), "1");
    assert_eq!(wf.env["VERSION"].source(), "3.1");
    assert_eq!(wf.env["FLAG"].source(), "true");
    assert_eq!(
        wf.defaults.run.shell.as_ref().map(|s| s.value.as_str()),
        Some("bash")
    );
    let concurrency = wf.concurrency.as_ref().expect("concurrency");
    assert!(matches!(
        concurrency.cancel_in_progress,
        BoolOrExpr::Bool(true)
    ));
    assert_eq!(
        wf.permissions.as_ref().map(|p| p.value.clone()),
        Some(serde_json::json!({"contents": "read"}))
    );

    let build = &wf.jobs["build"];
    assert_eq!(build.span.to_string(), ".github/workflows/ci.yml:34:3");
    assert!(matches!(build.timeout_minutes, Some(NumberOrExpr::Number(n)) if n == 30.0));
    assert!(matches!(build.continue_on_error, BoolOrExpr::Expr(_)));
    let strategy = build.strategy.as_ref().expect("strategy");
    assert!(matches!(strategy.fail_fast, BoolOrExpr::Bool(false)));
    let matrix = strategy.matrix.as_ref().expect("matrix");
    assert!(matches!(matrix, MatrixDef::Literal { .. }));
    let legs = expand_matrix(matrix).expect("literal matrix");
    let suffixes: Vec<String> = legs.iter().map(|l| l.suffix()).collect();
    assert_eq!(
        suffixes,
        [
            "(ubuntu-latest, 18, true)",
            "(ubuntu-latest, 20, true)",
            "(windows-latest, 18)",
            "(windows-latest, 20)"
        ]
    );
    assert_eq!(
        build.outputs["version"].source(),
        "${{ steps.v.outputs.version }}"
    );
    assert!(build.services.is_some());
    assert_eq!(build.steps.len(), 2);
    let checkout = &build.steps[0];
    assert_eq!(checkout.display_name(), "Run actions/checkout@v4");
    let StepAction::Uses { uses, with } = &checkout.action else {
        panic!("uses step expected")
    };
    assert_eq!(uses.span.to_string(), ".github/workflows/ci.yml:57:15");
    assert_eq!(with["fetch-depth"].source(), "0");
    let v = &build.steps[1];
    assert_eq!(v.id.as_ref().map(|i| i.value.as_str()), Some("v"));
    assert_eq!(v.display_name(), "Version");
    assert_eq!(
        v.if_cond.as_ref().map(|c| c.source()),
        Some("github.event_name == 'push'")
    );
    let StepAction::Run { script, shell, .. } = &v.action else {
        panic!("run step expected")
    };
    assert!(script.source().starts_with("echo \"version=1\""));
    assert_eq!(shell.as_ref().map(|s| s.value.as_str()), Some("sh"));
    assert!(matches!(v.continue_on_error, BoolOrExpr::Bool(true)));

    let call = &wf.jobs["call"];
    assert!(call.is_reusable_call());
    assert_eq!(call.needs[0].value, "build");
    assert!(matches!(call.secrets, Some(JobSecrets::Inherit)));
    assert_eq!(
        kiln_workflow::job_order(&wf).expect("acyclic"),
        vec![vec!["build"], vec!["call"]]
    );
}

#[test]
fn run_step_display_name_uses_first_line() {
    let wf = parse_workflow(
        "w.yml",
        "on: push\njobs:\n  a:\n    runs-on: x\n    steps:\n      - run: |\n\n          make test\n          make lint\n",
    )
    .expect("valid");
    assert_eq!(wf.jobs["a"].steps[0].display_name(), "Run make test");
}

#[test]
fn every_form_of_on() {
    for (on, events) in [
        ("on: push", vec!["push"]),
        ("on: [push, pull_request]", vec!["push", "pull_request"]),
        (
            "on:\n  push:\n  workflow_dispatch:",
            vec!["push", "workflow_dispatch"],
        ),
        ("on:\n  issues:\n    types: [opened]", vec!["issues"]),
    ] {
        let text = format!("{on}\njobs:\n  a:\n    runs-on: x\n    steps: [{{run: echo}}]\n");
        let wf = parse_workflow("w.yml", &text).unwrap_or_else(|e| panic!("{on}: {e}"));
        let got: Vec<&str> = wf.on.events.keys().map(String::as_str).collect();
        assert_eq!(got, events, "{on}");
    }
}

#[test]
fn yaml_anchors_work() {
    let text = "on: push
jobs:
  a:
    runs-on: x
    env: &env
      A: one
    steps: [{run: echo}]
  b:
    runs-on: x
    env: *env
    steps: [{run: echo}]
";
    let wf = parse_workflow("w.yml", text).expect("valid");
    assert_eq!(wf.jobs["b"].env["A"].source(), "one");
}

#[test]
fn parallel_steps_are_modelled() {
    let text = "on: push
jobs:
  a:
    runs-on: x
    steps:
      - id: server
        run: ./serve
        background: true
      - parallel:
          - run: make test
          - run: make lint
      - wait: server
      - wait-all:
      - cancel: server
";
    let wf = parse_workflow("w.yml", text).expect("valid");
    let steps = &wf.jobs["a"].steps;
    assert!(steps[0].background);
    assert!(matches!(&steps[1].action, StepAction::Parallel { steps } if steps.len() == 2));
    assert!(matches!(&steps[2].action, StepAction::Wait { ids } if ids[0].value == "server"));
    assert!(matches!(steps[3].action, StepAction::WaitAll));
    assert!(matches!(&steps[4].action, StepAction::Cancel { id } if id.value == "server"));
}

#[test]
fn workflow_call_interface() {
    let text = "on:
  workflow_call:
    inputs:
      env:
        type: string
        required: true
    secrets:
      token:
        required: true
    outputs:
      url:
        value: ${{ jobs.a.outputs.url }}
jobs:
  a:
    runs-on: x
    steps: [{run: echo}]
";
    let wf = parse_workflow("w.yml", text).expect("valid");
    let call = &wf.on.events["workflow_call"];
    assert!(call.inputs["env"].required);
    assert!(call.secrets["token"].required);
    assert_eq!(
        call.outputs["url"].value.source(),
        "${{ jobs.a.outputs.url }}"
    );
}

#[test]
fn matrix_from_expression() {
    let text = "on: push
jobs:
  a:
    runs-on: x
    strategy:
      matrix: ${{ fromJSON(needs.plan.outputs.m) }}
    steps: [{run: echo}]
";
    let wf = parse_workflow("w.yml", text).expect("valid");
    let def = wf.jobs["a"]
        .strategy
        .as_ref()
        .and_then(|s| s.matrix.as_ref())
        .expect("matrix");
    assert!(matches!(def, MatrixDef::Expr(_)));
    assert!(def.has_expressions());
    assert!(expand_matrix(def).is_err());
}

#[test]
fn dispatch_inputs_are_typed_and_defaulted() {
    let text = "on:
  workflow_dispatch:
    inputs:
      level:
        type: choice
        options: [info, debug]
        default: info
      dry:
        type: boolean
      count:
        type: number
        required: true
      note:
        description: free text
jobs:
  a:
    runs-on: x
    steps: [{run: echo}]
";
    let wf = parse_workflow("w.yml", text).expect("valid");
    let dispatch = &wf.on.events["workflow_dispatch"];
    let given = |pairs: &[(&str, &str)]| -> indexmap::IndexMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let inputs = dispatch
        .resolve_inputs(&given(&[("count", "3"), ("dry", "true")]))
        .expect("valid inputs");
    assert_eq!(
        serde_json::Value::Object(inputs.into_iter().collect()),
        serde_json::json!({"level": "info", "dry": true, "count": 3, "note": ""})
    );
    let errors = dispatch
        .resolve_inputs(&given(&[
            ("level", "trace"),
            ("dry", "yes"),
            ("bogus", "1"),
        ]))
        .expect_err("bad inputs");
    assert_eq!(
        errors,
        [
            "Unexpected input `bogus`; declared inputs: level, dry, count, note",
            "Input `level` must be one of info, debug, got `trace`",
            "Input `dry` must be `true` or `false`, got `yes`",
            "Input `count` is required",
        ]
    );
}
