//! Actions for real: local composite and JavaScript actions from `tests/fixtures/actions`,
//! remote actions resolved with git from a local bare repository served by a `file://` URL
//! (no network), the action cache offline, overrides, native checkout, and the up-front
//! refusals. Steps run on the local backend (the host's `node`); `vm_*` runs a JavaScript
//! action with pre/post and a composite action in a real QEMU guest with the image's node.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kiln_runner::event::{Conclusion, EventKind, EventSink, RunEvent};
use kiln_runner::executor::actions::ActionConfig;
use kiln_runner::executor::{
    ExecError, GitInfo, Isolation, RunContext, RunOptions, RunReport, WorkflowExecutor,
};
use kiln_runner::session::{OnLimit, SessionConfig, SessionManager};
use kiln_vm::local::LocalProvider;
use kiln_vm::{VmProvider, VmSpec};
use tokio_util::sync::CancellationToken;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/actions")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "kiln")
        .env("GIT_AUTHOR_EMAIL", "kiln@example.invalid")
        .env("GIT_COMMITTER_NAME", "kiln")
        .env("GIT_COMMITTER_EMAIL", "kiln@example.invalid")
        .status()
        .expect("git runs");
    assert!(status.success(), "git {args:?} in {}", dir.display());
}

/// A bare repository `<base>/<owner>/<repo>.git` holding `tests/fixtures/actions/remote/<name>`
/// at tag `v1` (and branch `main`).
fn bare_repo(base: &Path, owner: &str, repo: &str, fixture: &str) {
    let work = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixtures().join("remote").join(fixture), work.path());
    git(work.path(), &["init", "--quiet", "--initial-branch=main"]);
    git(work.path(), &["add", "."]);
    git(work.path(), &["commit", "--quiet", "-m", "action"]);
    git(work.path(), &["tag", "v1"]);
    let target = base.join(owner).join(format!("{repo}.git"));
    std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
    let status = Command::new("git")
        .args(["clone", "--quiet", "--bare"])
        .arg(work.path())
        .arg(&target)
        .status()
        .expect("git clone");
    assert!(status.success());
}

struct Harness {
    _runtime: tempfile::TempDir,
    workspace: tempfile::TempDir,
    cache: tempfile::TempDir,
    remotes: tempfile::TempDir,
    provider: Arc<LocalProvider>,
}

impl Harness {
    fn new() -> Harness {
        let runtime = tempfile::tempdir().expect("tempdir");
        let workspace = tempfile::tempdir().expect("tempdir");
        copy_dir(&fixtures().join("workspace"), workspace.path());
        std::fs::write(workspace.path().join("README"), "the repository\n").expect("write");
        let provider = Arc::new(LocalProvider::new(runtime.path().to_path_buf()));
        Harness {
            _runtime: runtime,
            workspace,
            cache: tempfile::tempdir().expect("tempdir"),
            remotes: tempfile::tempdir().expect("tempdir"),
            provider,
        }
    }

    fn config(&self) -> ActionConfig {
        ActionConfig {
            base_url: format!("file://{}", self.remotes.path().display()),
            cache_dir: self.cache.path().to_path_buf(),
            offline: false,
            overrides: Vec::new(),
        }
    }

    async fn run(&self, yaml: &str, config: ActionConfig) -> Outcome {
        run_with(
            self.provider.clone(),
            self.workspace.path(),
            yaml,
            config,
            &[],
            VmSpec::default(),
            Isolation::Workflow,
        )
        .await
    }

    async fn run_isolated(&self, yaml: &str, isolation: Isolation) -> Outcome {
        run_with(
            self.provider.clone(),
            self.workspace.path(),
            yaml,
            self.config(),
            &[("token", "t")],
            VmSpec::default(),
            isolation,
        )
        .await
    }

    async fn run_secrets(&self, yaml: &str, secrets: &[(&str, &str)]) -> Outcome {
        run_with(
            self.provider.clone(),
            self.workspace.path(),
            yaml,
            self.config(),
            secrets,
            VmSpec::default(),
            Isolation::Workflow,
        )
        .await
    }
}

struct Outcome {
    result: Result<RunReport, ExecError>,
    events: Vec<RunEvent>,
    allocations: usize,
}

impl Outcome {
    fn report(&self) -> &RunReport {
        match &self.result {
            Ok(r) => r,
            Err(e) => panic!("the run failed to start: {e}"),
        }
    }

    fn logs(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Log { line, .. } => Some(line.clone()),
                _ => None,
            })
            .collect()
    }

    fn has(&self, line: &str) -> bool {
        self.logs().iter().any(|l| l == line)
    }

    fn position(&self, needle: &str) -> usize {
        self.logs()
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no log line contains {needle:?}: {:#?}", self.logs()))
    }

    fn step_names(&self) -> Vec<(String, Conclusion)> {
        self.report().jobs[0]
            .steps
            .iter()
            .map(|s| (s.name.clone(), s.conclusion))
            .collect()
    }
}

async fn run_with(
    provider: Arc<dyn VmProvider>,
    workspace: &Path,
    yaml: &str,
    config: ActionConfig,
    secrets: &[(&str, &str)],
    spec: VmSpec,
    isolation: Isolation,
) -> Outcome {
    let sessions = SessionManager::new(
        provider,
        SessionConfig {
            max_sessions: 2,
            on_limit: OnLimit::Wait,
            ..SessionConfig::default()
        },
    );
    let executor = WorkflowExecutor::new(sessions).with_actions(config);
    let workflow =
        kiln_workflow::parse_workflow(".github/workflows/ci.yml", yaml).expect("valid workflow");
    let git = GitInfo::discover(workspace);
    let options = RunOptions {
        run_id: format!("run-{}", uuid::Uuid::new_v4().simple()),
        isolation,
        spec,
        vm_types: None,
        context: RunContext {
            secrets: secrets
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..RunContext::new("push", Some(workspace.to_path_buf()), git)
        },
        only_jobs: Vec::new(),
        matrix_filter: Vec::new(),
    };
    let (sink, mut rx) = EventSink::channel(options.run_id.clone());
    let result = executor
        .execute(&workflow, &options, &sink, &CancellationToken::new())
        .await;
    drop(sink);
    let mut events = Vec::new();
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    let allocations = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::SessionAllocated { .. }))
        .count();
    Outcome {
        result,
        events,
        allocations,
    }
}

#[tokio::test]
async fn composite_action_with_nested_composite_inputs_outputs_and_no_env_leak() {
    let h = Harness::new();
    let out = h
        .run(
            r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - id: greet
        uses: ./.github/actions/greet
        env:
          CALLER_STEP_ENV: from-the-caller
        with:
          who: world
      - run: |
          echo "message=${{ steps.greet.outputs.message }}"
          echo "first=${{ steps.greet.outputs.first }}"
          echo "leak=[${COMPOSE_ONLY:-}${CALLER_STEP_ENV:-}]"
          echo "github_env=[$FROM_COMPOSITE]"
"#,
            h.config(),
        )
        .await;
    let report = out.report();
    assert_eq!(report.result, Conclusion::Success, "{:#?}", out.logs());
    // Composite steps see inputs only through `${{ inputs.* }}`, as on GitHub.
    assert!(out.has(
        "INPUT_WHO=[unset] CALLER_STEP_ENV=[from-the-caller] COMPOSE_ONLY=[step-env-of-the-composite]"
    ));
    // GITHUB_ACTION_PATH is the action's directory inside the session's workspace.
    assert!(
        out.logs()
            .iter()
            .any(|l| l.starts_with("action path: /")
                && l.ends_with("/workspace/.github/actions/greet")),
        "{:#?}",
        out.logs()
    );
    assert!(out.has("message=HELLO, WORLD!"), "{:#?}", out.logs());
    assert!(out.has("first=Hello, world"));
    assert!(out.has("leak=[]"));
    assert!(out.has("github_env=[yes]"));
    assert!(!out.logs().iter().any(|l| l.contains("never-runs")));
    assert_eq!(out.allocations, 1);
}

#[tokio::test]
async fn failing_composite_fails_its_step_and_runs_its_failure_steps() {
    let h = Harness::new();
    let out = h
        .run(
            r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - id: f
        uses: ./.github/actions/fail
      - run: echo not-after-a-failure
      - if: failure()
        run: echo "outcome=${{ steps.f.outcome }} conclusion=${{ steps.f.conclusion }}"
"#,
            h.config(),
        )
        .await;
    let report = out.report();
    assert_eq!(report.result, Conclusion::Failure);
    let steps = &report.jobs[0].steps;
    assert_eq!(steps[0].conclusion, Conclusion::Failure);
    assert_eq!(steps[0].exit_code, Some(3));
    assert_eq!(
        steps[0].error.as_deref(),
        Some("Process completed with exit code 3.")
    );
    assert_eq!(steps[1].conclusion, Conclusion::Skipped);
    assert_eq!(steps[2].conclusion, Conclusion::Success);
    assert!(out.has("before-failure"));
    assert!(out.has("composite-cleanup-ran"));
    assert!(!out.logs().iter().any(|l| l.contains("after-failure-must")));
    assert!(out.has("outcome=failure conclusion=failure"));
}

#[tokio::test]
async fn input_defaults_required_and_input_env_names() {
    let h = Harness::new();
    let out = h
        .run(
            r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: ./.github/actions/inputs
        with:
          my-input: given
          extra: surplus
"#,
            h.config(),
        )
        .await;
    let report = out.report();
    assert_eq!(report.result, Conclusion::Success, "{:#?}", out.logs());
    // GitHub's INPUT_ names: upper case, spaces to `_`, `-` kept; defaults evaluated;
    // a missing required input is empty (the action's toolkit enforces `required`).
    for line in [
        "INPUT_DEFAULTED=[push-default]",
        "INPUT_EXTRA=[surplus]",
        "INPUT_MY-INPUT=[given]",
        "INPUT_REQUIRED-MISSING=[]",
        "INPUT_WITH_SPACE=[spaced]",
    ] {
        assert!(out.has(line), "{line} missing: {:#?}", out.logs());
    }
    assert!(out.has(
        "Warning: Unexpected input(s) 'extra', valid inputs are ['my-input', 'with space', \
         'defaulted', 'required-missing']"
    ));
    // `pre` is not run for a local action (GitHub warns the same way); `post` is.
    assert!(out.has(
        "Warning: `pre` execution is not supported for local action from './.github/actions/inputs'"
    ));
    assert!(out.has("local post ran with INPUT_MY-INPUT=given"));
    assert_eq!(
        out.step_names(),
        vec![
            (
                "Run ./.github/actions/inputs".to_owned(),
                Conclusion::Success
            ),
            (
                "Post Run ./.github/actions/inputs".to_owned(),
                Conclusion::Success
            ),
        ]
    );
}

const REMOTE_JS: &str = r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    env:
      JOB_LEVEL: job-env
    steps:
      - run: echo first-step
      - id: js
        uses: acme/js-action@v1
        with:
          name: world
      - uses: acme/js-action@v1
        with:
          name: second
      - run: |
          echo "greeting=${{ steps.js.outputs.greeting }} env=$JS_ACTION_RAN"
          case ":$PATH:" in *:"$RUNNER_TEMP/js-action-bin":*) echo path-added ;; esac
      - run: exit 1
"#;

#[tokio::test]
async fn remote_javascript_action_pre_main_post_state_outputs_after_failure() {
    let h = Harness::new();
    bare_repo(h.remotes.path(), "acme", "js-action", "js-action");
    let out = h.run(REMOTE_JS, h.config()).await;
    let report = out.report();
    assert_eq!(report.result, Conclusion::Failure);
    let names: Vec<String> = out.step_names().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "Pre Run acme/js-action@v1",
            "Pre Run acme/js-action@v1",
            "Run echo first-step",
            "Run acme/js-action@v1",
            "Run acme/js-action@v1",
            "Run echo \"greeting=${{ steps.js.outputs.greeting }} env=$JS_ACTION_RAN\"",
            "Run exit 1",
            "Post Run acme/js-action@v1",
            "Post Run acme/js-action@v1",
        ]
    );
    // pre before the first step; state from pre and main reaches main and post; posts run
    // in reverse order after the failure.
    assert!(out.position("pre ran for world") < out.position("pre ran for second"));
    assert!(out.position("pre ran for second") < out.position("first-step"));
    assert!(out.has("main for world sees STATE_from_pre=pre-of-world"));
    assert!(out.has("pre sees JOB_LEVEL=job-env"));
    assert!(out.has("greeting=hello world env=second"));
    assert!(out.has("path-added"));
    let post_second = out.position(
        "post for second sees STATE_from_pre=pre-of-second STATE_from_main=main-of-second",
    );
    let post_world = out
        .position("post for world sees STATE_from_pre=pre-of-world STATE_from_main=main-of-world");
    assert!(post_second < post_world);
    for var in [
        "RUNNER_TEMP",
        "RUNNER_TOOL_CACHE",
        "GITHUB_ACTION_PATH",
        "GITHUB_ACTION_REPOSITORY",
        "GITHUB_ACTION_REF",
        "GITHUB_WORKSPACE",
    ] {
        assert!(out.has(&format!("{var} set=true")), "{var}");
    }
    assert!(out.has("repository=acme/js-action@v1"));
    assert!(out.has("action path has action.yml=true"));
    assert!(
        report.jobs[0]
            .summary
            .contains("### js-action ran for world")
    );
}

#[tokio::test]
async fn remote_actions_come_from_the_cache_offline_and_misses_are_clear() {
    let h = Harness::new();
    bare_repo(h.remotes.path(), "acme", "js-action", "js-action");
    // Online: fetched into the cache, keyed by commit, with the ref recorded.
    let online = h.run(REMOTE_JS, h.config()).await;
    assert_eq!(online.report().result, Conclusion::Failure);
    let repo_dir = h.cache.path().join("acme/js-action");
    let commit = std::fs::read_to_string(repo_dir.join("refs/v1")).expect("ref recorded");
    assert!(repo_dir.join(commit.trim()).join("action.yml").is_file());

    // Offline, with the remote gone: the cache alone runs it, step for step the same.
    std::fs::remove_dir_all(h.remotes.path().join("acme")).expect("remove remote");
    let offline = ActionConfig {
        offline: true,
        base_url: "file:///nonexistent".into(),
        ..h.config()
    };
    let out = h.run(REMOTE_JS, offline.clone()).await;
    assert_eq!(out.step_names(), online.step_names());
    assert!(out.has("main for world sees STATE_from_pre=pre-of-world"));

    // Offline miss: before any VM, naming the step, the action and what was looked at.
    let miss = h
        .run(
            &REMOTE_JS.replace("acme/js-action@v1", "acme/js-action@v2"),
            offline,
        )
        .await;
    let err = miss
        .result
        .as_ref()
        .expect_err("a miss is an error")
        .to_string();
    assert_eq!(miss.allocations, 0);
    assert!(err.contains(".github/workflows/ci.yml:11:15"), "{err}");
    assert!(
        err.contains("step `Run acme/js-action@v2` of job `build`"),
        "{err}"
    );
    assert!(err.contains("acme/js-action@v2"), "{err}");
    assert!(err.contains("refs/v2"), "{err}");
    assert!(err.contains("offline"), "{err}");

    // Online with a ref that does not exist: git's answer and the URL tried.
    let missing = h
        .run(
            &REMOTE_JS.replace("acme/js-action@v1", "acme/nothing@v1"),
            h.config(),
        )
        .await;
    let err = missing
        .result
        .as_ref()
        .expect_err("missing repo")
        .to_string();
    assert_eq!(missing.allocations, 0);
    assert!(err.contains("acme/nothing@v1"), "{err}");
    assert!(
        err.contains(&format!(
            "file://{}/acme/nothing",
            h.remotes.path().display()
        )),
        "{err}"
    );
}

#[tokio::test]
async fn local_action_override_replaces_the_remote() {
    let h = Harness::new();
    let config = ActionConfig {
        offline: true,
        overrides: vec![
            ActionConfig::parse_override(&format!(
                "acme/js-action@v1={}",
                fixtures().join("remote/js-action").display()
            ))
            .expect("override"),
        ],
        ..h.config()
    };
    let out = h.run(REMOTE_JS, config).await;
    assert!(out.has("main for world sees STATE_from_pre=pre-of-world"));
    assert!(out.has("repository=acme/js-action@v1"));
}

#[tokio::test]
async fn docker_actions_are_refused_before_any_vm() {
    let h = Harness::new();
    let out = h
        .run(
            r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: docker://alpine:3
      - name: local docker
        uses: ./.github/actions/docker
"#,
            h.config(),
        )
        .await;
    assert_eq!(out.allocations, 0);
    let err = out.result.as_ref().expect_err("refused");
    assert!(err.is_user_error());
    let text = err.to_string();
    assert!(text.contains(".github/workflows/ci.yml:7:15: step `Run docker://alpine:3` of job `build`: `docker://alpine:3`: Docker actions are not supported yet"), "{text}");
    assert!(
        text.contains("step `local docker` of job `build`"),
        "{text}"
    );
    assert!(
        text.contains(".github/actions/docker/action.yml:3:10: `using: docker`"),
        "{text}"
    );
}

#[tokio::test]
async fn checkout_copies_the_workspace_to_path_and_cleans() {
    let h = Harness::new();
    let out = h
        .run(
            r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: echo junk > junk.txt
      - uses: actions/checkout@v4
        with:
          clean: false
      - run: test -f junk.txt && echo junk-kept
      - uses: actions/checkout@v4
      - run: test ! -e junk.txt && test -f README && echo junk-cleaned
      - uses: actions/checkout@v4
        id: sub
        with:
          path: sub/dir
      - run: |
          test -f sub/dir/README && test -f sub/dir/.github/actions/greet/action.yml && echo copied-to-path
          echo "commit=${{ steps.sub.outputs.commit }}"
"#,
            h.config(),
        )
        .await;
    assert_eq!(
        out.report().result,
        Conclusion::Success,
        "{:#?}",
        out.logs()
    );
    assert!(out.has("junk-kept"));
    assert!(out.has("junk-cleaned"));
    assert!(out.has("copied-to-path"));
}

#[tokio::test]
async fn reusable_workflow_with_inputs_secrets_outputs_nested_in_one_session() {
    let h = Harness::new();
    let out = h
        .run_secrets(
            r#"
on: push
jobs:
  call:
    uses: ./.github/workflows/reusable.yml
    with:
      who: mapped
      loud: true
    secrets:
      token: ${{ secrets.MY_TOKEN }}
  inherit:
    uses: ./.github/workflows/reusable.yml
    with:
      who: inherited
    secrets: inherit
  missing:
    uses: ./.github/workflows/reusable.yml
    secrets: inherit
  after:
    needs: [call, inherit]
    runs-on: ubuntu-latest
    steps:
      - run: |
          echo "got=${{ needs.call.outputs.greeting }} / ${{ needs.inherit.outputs.greeting }}"
          test -f from-called-mapped && test -f from-called-inherited && echo same-workspace
"#,
            &[
                ("MY_TOKEN", "tok-1"),
                ("token", "tok-2"),
                ("OTHER", "other-secret"),
            ],
        )
        .await;
    let report = out.report();
    let result_of = |id: &str| {
        report
            .jobs
            .iter()
            .find(|j| j.id == id)
            .map(|j| j.result)
            .unwrap_or_else(|| panic!("no job {id}"))
    };
    assert_eq!(result_of("call"), Conclusion::Success, "{:#?}", out.logs());
    assert_eq!(result_of("call/greet"), Conclusion::Success);
    assert_eq!(result_of("call/nested/show"), Conclusion::Success);
    assert_eq!(result_of("inherit"), Conclusion::Success);
    assert_eq!(result_of("after"), Conclusion::Success);
    // A required input not given fails the calling job, as on GitHub.
    assert_eq!(result_of("missing"), Conclusion::Failure);
    assert!(
        out.logs()
            .iter()
            .any(|l| l.contains("Input `who` is required"))
    );
    // Typed inputs and defaults; mapped secrets only, or all of them with `inherit`; masked.
    assert!(
        out.has("mapped: token is *** other=[]"),
        "{:#?}",
        out.logs()
    );
    assert!(out.has("inherited: token is *** other=[***]"));
    assert!(out.has("nested got hi mapped x2 loud=true"));
    assert!(out.has("got=hi mapped x2 loud=true / hi inherited x2 loud=false"));
    // Under workflow isolation the called jobs ran in the caller's session and workspace.
    assert!(out.has("same-workspace"));
    assert_eq!(out.allocations, 1);
}

/// One real QEMU guest (TCG here): a remote JavaScript action with pre and post (from the
/// cache via an override, offline) and a nested composite action, run with the image's node.
#[tokio::test]
async fn vm_javascript_action_with_pre_post_and_composite_action_use_the_image_node() {
    if kiln_test_support::skip_vm_tests() {
        return;
    }
    let image = tokio::task::spawn_blocking(kiln_test_support::default_image)
        .await
        .expect("image builder");
    let data_dir = image
        .dir
        .parent()
        .and_then(Path::parent)
        .expect("images live in <data>/images/<name>")
        .to_path_buf();
    let h = Harness::new();
    let config = kiln_vm::BackendConfig::new(h._runtime.path().to_path_buf(), data_dir);
    let selection = kiln_vm::select_backend(kiln_vm::BackendKind::Qemu, &config)
        .await
        .expect("the QEMU backend is usable");
    let actions = ActionConfig {
        offline: true,
        overrides: vec![
            ActionConfig::parse_override(&format!(
                "acme/js-action@v1={}",
                fixtures().join("remote/js-action").display()
            ))
            .expect("override"),
        ],
        ..h.config()
    };
    let yaml = r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - id: js
        uses: acme/js-action@v1
        with:
          name: guest
      - id: greet
        uses: ./.github/actions/greet
        with:
          who: vm
      - run: |
          echo "js=${{ steps.js.outputs.greeting }} greet=${{ steps.greet.outputs.message }}"
          node --version
"#;
    let out = run_with(
        selection.provider,
        h.workspace.path(),
        yaml,
        actions,
        &[],
        VmSpec {
            memory_mib: 1024,
            vcpus: 1,
            ..VmSpec::default()
        },
        Isolation::Workflow,
    )
    .await;
    let report = out.report();
    assert_eq!(report.result, Conclusion::Success, "{:#?}", out.logs());
    assert_eq!(report.vm_allocations, 1);
    assert!(out.position("pre ran for guest") < out.position("main for guest"));
    assert!(out.has("main for guest sees STATE_from_pre=pre-of-guest"));
    assert!(
        out.has("js=hello guest greet=HELLO, VM!"),
        "{:#?}",
        out.logs()
    );
    assert!(
        out.has("post for guest sees STATE_from_pre=pre-of-guest STATE_from_main=main-of-guest")
    );
    // The image's node runs the action; an older one than asked for is said clearly.
    let version = out
        .logs()
        .into_iter()
        .find(|l| l.starts_with('v') && l.chars().nth(1).is_some_and(|c| c.is_ascii_digit()))
        .expect("node --version in the guest");
    let major: u32 = version[1..]
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .expect("a node version");
    let warned = out.logs().iter().any(|l| {
        l == &format!(
            "Warning: The action asks for `node20` but the guest's node is {version}; running \
             it with that node anyway"
        )
    });
    assert_eq!(warned, major < 20, "{version}: {:#?}", out.logs());
}

/// Issue 5's "done when": a project-style workflow with checkout, a setup action, a local
/// composite action and a remote reusable workflow runs online, then the same offline from
/// the cache alone, with the same outcome step for step.
#[tokio::test]
async fn project_workflow_runs_online_then_offline_from_the_cache() {
    let h = Harness::new();
    bare_repo(h.remotes.path(), "acme", "shared", "shared-workflows");
    bare_repo(h.remotes.path(), "acme", "setup-tool", "setup-tool");
    let yaml = r#"
name: CI
on: [push, pull_request]
jobs:
  lint:
    uses: acme/shared/.github/workflows/build.yml@v1
    with:
      target: lint
  test:
    needs: lint
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
        with:
          fetch-depth: 0
      - id: setup
        uses: acme/setup-tool@v1
        with:
          tool-version: '1.0'
      - run: mytool --check "${{ steps.setup.outputs.version }}"
      - id: greet
        uses: ./.github/actions/greet
        with:
          who: ${{ needs.lint.outputs.artifact }}
      - run: echo "${{ steps.greet.outputs.message }}"
"#;
    let online = h.run(yaml, h.config()).await;
    assert_eq!(
        online.report().result,
        Conclusion::Success,
        "{:#?}",
        online.logs()
    );
    assert!(online.has("mytool 1.0 --check 1.0"));
    assert!(online.has("HELLO, BUILT-LINT!"));
    // The called workflow's `./` action is the caller's repository's, as on GitHub.
    let build = online
        .report()
        .jobs
        .iter()
        .find(|j| j.id == "lint/build")
        .expect("the called job ran");
    assert_eq!(build.result, Conclusion::Success);
    assert_eq!(build.steps.len(), 3);

    std::fs::remove_dir_all(h.remotes.path().join("acme")).expect("remove remotes");
    let offline = ActionConfig {
        offline: true,
        ..h.config()
    };
    let again = h.run(yaml, offline).await;
    assert_eq!(again.report().result, Conclusion::Success);
    let shape = |o: &Outcome| {
        o.report()
            .jobs
            .iter()
            .map(|j| {
                (
                    j.id.clone(),
                    j.result,
                    j.steps
                        .iter()
                        .map(|s| (s.name.clone(), s.conclusion))
                        .collect::<Vec<_>>(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&again), shape(&online));
    assert!(again.has("mytool 1.0 --check 1.0"));
}

#[tokio::test]
async fn reusable_workflow_jobs_get_their_own_vms_under_job_isolation() {
    let h = Harness::new();
    let out = h
        .run_isolated(
            r#"
on: push
jobs:
  call:
    uses: ./.github/workflows/reusable.yml
    with:
      who: isolated
    secrets: inherit
  after:
    needs: call
    runs-on: ubuntu-latest
    steps:
      - run: echo "got=${{ needs.call.outputs.greeting }}"
"#,
            Isolation::Job,
        )
        .await;
    assert_eq!(
        out.report().result,
        Conclusion::Success,
        "{:#?}",
        out.logs()
    );
    assert!(out.has("nested got hi isolated x2 loud=false"));
    assert!(out.has("got=hi isolated x2 loud=false"));
    // call/greet, call/nested/show and after: one VM each.
    assert_eq!(out.allocations, 3);
    assert_eq!(out.report().vm_allocations, 3);
}

#[tokio::test]
async fn post_of_a_javascript_action_inside_a_composite_runs_at_job_end() {
    let h = Harness::new();
    let out = h
        .run(
            r#"
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: ./.github/actions/wrap-js
      - run: echo last-step
"#,
            h.config(),
        )
        .await;
    assert_eq!(
        out.report().result,
        Conclusion::Success,
        "{:#?}",
        out.logs()
    );
    assert!(out.has("INPUT_MY-INPUT=[nested]"));
    assert!(out.position("last-step") < out.position("local post ran with INPUT_MY-INPUT=nested"));
    assert_eq!(
        out.step_names().last().map(|(n, c)| (n.as_str(), *c)),
        Some(("Post Run ./.github/actions/wrap-js", Conclusion::Success))
    );
}
