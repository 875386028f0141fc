//! Workflow commands on stdout, as GitHub's runner treats them (real steps, local backend).

use kiln_runner::event::{Conclusion, EventKind, EventSink, RunEvent};
use kiln_runner::executor::{
    GitInfo, Isolation, RunContext, RunOptions, RunReport, WorkflowExecutor,
};
use kiln_runner::session::{SessionConfig, SessionManager};
use kiln_vm::VmSpec;
use kiln_vm::local::LocalProvider;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

async fn run(yaml: &str, secrets: &[(&str, &str)]) -> (RunReport, Vec<String>) {
    let runtime = tempfile::tempdir().expect("tempdir");
    let workspace = tempfile::tempdir().expect("tempdir");
    let executor = WorkflowExecutor::new(SessionManager::new(
        Arc::new(LocalProvider::new(runtime.path().to_path_buf())),
        SessionConfig::default(),
    ));
    let workflow = kiln_workflow::parse_workflow("commands.yml", yaml).expect("valid");
    let mut context = RunContext::new(
        "push",
        Some(workspace.path().to_path_buf()),
        GitInfo::discover(workspace.path()),
    );
    for (k, v) in secrets {
        context.secrets.insert((*k).into(), (*v).into());
    }
    let options = RunOptions {
        run_id: "commands".into(),
        isolation: Isolation::Workflow,
        spec: VmSpec::default(),
        vm_types: None,
        context,
        only_jobs: Vec::new(),
        matrix_filter: Vec::new(),
    };
    let (sink, mut rx) = EventSink::channel("commands");
    let report = executor
        .execute(&workflow, &options, &sink, &CancellationToken::new())
        .await
        .expect("run");
    drop(sink);
    let mut events: Vec<RunEvent> = Vec::new();
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    let logs = events
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Log { line, .. } => Some(line),
            _ => None,
        })
        .collect();
    (report, logs)
}

#[tokio::test]
async fn annotations_are_collected_for_the_summary_and_masked() {
    let (report, logs) = run(
        r#"
on: push
jobs:
  a:
    runs-on: x
    steps:
      - run: |
          echo "::error file=src/app.rs,line=3,col=7,title=Broken::token hunter22 leaked"
          echo "::warning::careful"
          echo "::notice title=FYI::all good"
          echo "::group::Details"
          echo inside
          echo "::endgroup::"
          echo 'summary with hunter22' >> "$GITHUB_STEP_SUMMARY"
"#,
        &[("TOKEN", "hunter22")],
    )
    .await;
    assert_eq!(report.result, Conclusion::Success);
    let annotations: Vec<String> = report.jobs[0]
        .annotations
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        annotations,
        [
            "error src/app.rs:3:7: Broken: token *** leaked",
            "warning: careful",
            "notice: FYI: all good",
        ]
    );
    assert!(logs.contains(&"::group::Details".to_owned()));
    assert!(logs.contains(&"inside".to_owned()));
    assert!(!report.jobs[0].summary.contains("hunter22"));
    assert!(logs.iter().all(|l| !l.contains("hunter22")), "{logs:?}");
}

#[tokio::test]
async fn set_env_and_add_path_are_disabled_as_on_github() {
    let (report, logs) = run(
        r#"
on: push
jobs:
  a:
    runs-on: x
    steps:
      - run: echo "::set-env name=X::1"
"#,
        &[],
    )
    .await;
    assert_eq!(report.result, Conclusion::Failure);
    let error = report.jobs[0].steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("The `set-env` command is disabled."),
        "{error}"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("ACTIONS_ALLOW_UNSECURE_COMMANDS"))
    );
}

#[tokio::test]
async fn set_output_still_works_with_a_deprecation_warning() {
    let (report, logs) = run(
        r#"
on: push
jobs:
  a:
    runs-on: x
    steps:
      - id: old
        run: echo "::set-output name=v::legacy"
      - run: echo "got ${{ steps.old.outputs.v }}"
"#,
        &[],
    )
    .await;
    assert_eq!(report.result, Conclusion::Success);
    assert!(logs.contains(&"got legacy".to_owned()), "{logs:?}");
    assert!(
        logs.iter()
            .any(|l| l.contains("`set-output` command is deprecated"))
    );
}

#[tokio::test]
async fn debug_lines_show_only_with_step_debug() {
    let yaml = r#"
on: push
jobs:
  a:
    runs-on: x
    steps:
      - run: echo "::debug::hidden detail"; echo "::stop-commands::tok"; echo "::debug::literal"; echo "::tok::"
"#;
    let (_, logs) = run(yaml, &[]).await;
    assert!(
        !logs.contains(&"::debug::hidden detail".to_owned()),
        "{logs:?}"
    );
    assert!(
        logs.contains(&"::debug::literal".to_owned()),
        "stop-commands: {logs:?}"
    );
    let (_, logs) = run(yaml, &[("ACTIONS_STEP_DEBUG", "true")]).await;
    assert!(
        logs.contains(&"::debug::hidden detail".to_owned()),
        "{logs:?}"
    );
}
