//! The real binary on real workflows (local backend), as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Env {
    dir: tempfile::TempDir,
    runtime: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = dir.path().join("runtime");
        std::fs::create_dir_all(dir.path().join("repo")).expect("mkdir");
        Env { dir, runtime }
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.repo().join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, text).expect("write");
        path
    }

    fn kiln(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.current_dir(self.repo())
            .env("KILN_RUNTIME_DIR", &self.runtime)
            .env("KILN_DATA_DIR", self.dir.path().join("data"))
            .env("KILN_BACKEND", "local")
            .env("NO_COLOR", "1")
            .env_remove("KILN_LOG")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.kiln().args(args).output().expect("kiln runs")
    }

    fn leftovers(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.runtime)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const OK: &str = r#"
name: ok
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - run: echo hello-from-step
"#;

const FAILING: &str = r#"
name: failing
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - run: echo before; exit 4
"#;

#[test]
fn success_exits_0_with_live_output_and_summary() {
    let env = Env::new();
    env.write("ok.yml", OK);
    let out = env.run(&["run", "ok.yml"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("[ok/build]   | hello-from-step"),
        "{stderr}"
    );
    assert!(stderr.contains("Summary ok"), "{stderr}");
    assert!(stderr.contains("does NOT isolate"), "{stderr}");
    assert!(out.stdout.is_empty(), "people's output goes to stderr");
    assert!(env.leftovers().is_empty());
}

#[test]
fn failure_exits_1() {
    let env = Env::new();
    env.write("fail.yml", FAILING);
    let out = env.run(&["run", "fail.yml"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Process completed with exit code 4."),
        "{stderr}"
    );
    assert!(env.leftovers().is_empty());
}

fn assert_usage_error(env: &Env, file: &str, yaml: &str, expected: &str) {
    env.write(file, yaml);
    let out = env.run(&["run", file]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{file}: {stderr}");
    assert!(
        stderr.contains(expected),
        "{file}: expected `{expected}` in\n{stderr}"
    );
    assert!(env.leftovers().is_empty(), "nothing may be allocated");
}

#[test]
fn invalid_yaml_exits_2_with_position() {
    let env = Env::new();
    assert_usage_error(
        &env,
        "bad.yml",
        "on: push\njobs:\n  a: [\n",
        "bad.yml:3:6: Invalid YAML",
    );
}

#[test]
fn unknown_key_exits_2_with_position_and_suggestion() {
    let env = Env::new();
    assert_usage_error(
        &env,
        "unknown.yml",
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    stpes:\n      - run: echo\n",
        "unknown.yml:5:5: Unknown key `stpes` in job `a`",
    );
    let out = env.run(&["run", "unknown.yml"]);
    assert!(text(&out.stderr).contains("did you mean `steps`?"));
}

#[test]
fn job_cycle_exits_2_with_position() {
    let env = Env::new();
    assert_usage_error(
        &env,
        "cycle.yml",
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    needs: b\n    steps:\n      - run: echo\n  b:\n    runs-on: ubuntu-latest\n    needs: a\n    steps:\n      - run: echo\n",
        "cycle.yml:10:12: Job dependency cycle: a -> b -> a",
    );
}

#[test]
fn step_without_run_or_uses_exits_2_with_position() {
    let env = Env::new();
    assert_usage_error(
        &env,
        "norun.yml",
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - name: nothing\n",
        "norun.yml:6:9: A step must have either `run` or `uses`",
    );
}

#[test]
fn unsupported_options_are_rejected_not_ignored() {
    let env = Env::new();
    env.write("ok.yml", OK);
    // Step snapshots need live VM snapshots, which the local backend does not have.
    let out = env.run(&["run", "ok.yml", "--snapshots", "steps"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("which the local backend cannot take"));
    let out = env.run(&["worker"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not yet supported"));
}

#[test]
fn json_lines_follow_the_contract() {
    let env = Env::new();
    env.write("ok.yml", OK);
    let out = env.run(&["run", "ok.yml", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each stdout line is JSON"))
        .collect();
    let types: Vec<&str> = lines
        .iter()
        .map(|l| l["type"].as_str().expect("type"))
        .collect();
    for t in [
        "session_allocated",
        "job_started",
        "step_started",
        "log",
        "step_finished",
        "job_finished",
        "session_released",
        "run_finished",
    ] {
        assert!(types.contains(&t), "missing {t}: {types:?}");
    }
    let run = lines[0]["run"].as_str().expect("run id");
    assert!(lines.iter().all(|l| l["run"] == run && l["ts"].is_string()));
    let alloc = lines
        .iter()
        .find(|l| l["type"] == "session_allocated")
        .expect("allocation");
    assert_eq!(alloc["backend"], "local");
    assert_eq!(alloc["workflow"], "ok");
    assert!(alloc["allocation_ms"].is_u64());
}

#[test]
fn seed_log_lines_at_info_level() {
    let env = Env::new();
    env.write(
        "two.yml",
        "name: two\non: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - name: first\n        run: 'true'\n      - name: second\n        run: 'true'\n",
    );
    let out = env
        .kiln()
        .args(["run", "two.yml"])
        .env("KILN_LOG", "info")
        .output()
        .expect("run");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let allocated = stderr
        .lines()
        .find(|l| l.contains("Allocated VM "))
        .unwrap_or_else(|| panic!("no allocation line in {stderr}"));
    assert!(
        allocated.contains(" ms for session ") && allocated.contains(" in "),
        "{allocated}"
    );
    assert!(stderr.contains("Executing step 1/2: first"), "{stderr}");
    assert!(stderr.contains("Executing step 2/2: second"), "{stderr}");
    assert!(
        stderr.contains("Workflow 'two' completed successfully in "),
        "{stderr}"
    );
    assert_eq!(stderr.matches("Allocated VM ").count(), 1);

    env.write("fail.yml", FAILING);
    let out = env
        .kiln()
        .args(["run", "fail.yml"])
        .env("KILN_LOG", "info")
        .output()
        .expect("run");
    assert!(text(&out.stderr).contains("Workflow 'failing' failed in "));
}

#[test]
fn directory_runs_each_matching_workflow_in_its_own_session() {
    let env = Env::new();
    env.write(".github/workflows/a.yml", OK);
    env.write(
        ".github/workflows/b.yaml",
        &OK.replace("name: ok", "name: other"),
    );
    env.write(
        ".github/workflows/manual.yml",
        "on: workflow_dispatch\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n      - run: exit 9\n",
    );
    env.write(
        ".github/workflows/release-only.yml",
        "on:\n  push:\n    branches: [release/**]\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n      - run: exit 9\n",
    );
    let out = env.run(&["run", ".", "push", "--json", "--max-sessions", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let allocations: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|l| l["type"] == "session_allocated")
        .collect();
    assert_eq!(
        allocations.len(),
        2,
        "neither the dispatch-only nor the release-branch workflow runs on a push to main"
    );
    assert_ne!(allocations[0]["vm"], allocations[1]["vm"]);
    assert_ne!(allocations[0]["run"], allocations[1]["run"]);
}

#[test]
fn ctrl_c_cancels_runs_cleanup_and_exits_130() {
    let env = Env::new();
    let marker = env.dir.path().join("started");
    env.write(
        "slow.yml",
        &format!(
            "name: slow\non: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: touch {}; sleep 60\n      - if: always()\n        run: echo cleanup-step-ran\n",
            marker.display()
        ),
    );
    let child = env
        .kiln()
        .args(["run", "slow.yml"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the step never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
    let out = child.wait_with_output().expect("wait");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("cleanup-step-ran"), "{stderr}");
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

#[test]
fn dry_run_allocates_nothing() {
    let env = Env::new();
    env.write("ok.yml", OK);
    let out = env.run(&["run", "ok.yml", "-n"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("job build"));
    assert!(!env.runtime.exists() || env.leftovers().is_empty());
}

#[test]
fn list_and_validate() {
    let env = Env::new();
    env.write(".github/workflows/ci.yml", OK);
    let out = env.run(&["list"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("build"));
    let out = env.run(&["validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    env.write(".github/workflows/broken.yml", "on: push\njobs:\n  a: [\n");
    let out = env.run(&["validate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("broken.yml:3:6"));
}

#[test]
fn example_workflow_from_the_readme_runs() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello.yml");
    let env = Env::new();
    let out = env
        .kiln()
        .args(["run"])
        .arg(&example)
        .output()
        .expect("run");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("integration ok"), "{stderr}");
    assert!(env.leftovers().is_empty());
}

#[test]
fn example_workflow_runs_in_a_real_vm() {
    if kiln_test_support::skip_vm_tests() {
        return;
    }
    let image = kiln_test_support::default_image();
    let data = image
        .dir
        .parent()
        .and_then(Path::parent)
        .expect("images live in <data>/images/<name>")
        .to_path_buf();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello.yml");
    let env = Env::new();
    let out = env
        .kiln()
        .args(["run", "--json", "--backend", "qemu"])
        .arg(&example)
        .env("KILN_DATA_DIR", &data)
        .output()
        .expect("run");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let allocation = lines
        .iter()
        .find(|l| l["type"] == "session_allocated")
        .expect("allocation");
    assert_eq!(allocation["backend"], "qemu");
    let vm = allocation["vm"].as_str().expect("vm id");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["type"] == "session_allocated")
            .count(),
        1
    );
    assert!(
        lines
            .iter()
            .filter(|l| l["type"] == "step_started")
            .all(|l| l["vm"] == vm)
    );
    assert!(lines.iter().any(|l| {
        l["type"] == "log"
            && l["line"]
                .as_str()
                .is_some_and(|s| s.starts_with("Hello from Linux on VM kiln-qemu-"))
    }));
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

#[test]
fn every_corpus_workflow_validates() {
    let shared = std::env::var_os("KILN_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    let corpus = shared.join("corpus");
    assert!(
        corpus.is_dir(),
        "the shared corpus is missing at {}",
        corpus.display()
    );
    let env = Env::new();
    let out = env
        .kiln()
        .arg("validate")
        .arg(corpus.join("workflows"))
        .arg(corpus.join("actionlint-ok"))
        .output()
        .expect("validate");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let summary = stderr.lines().last().unwrap_or_default();
    assert!(summary.ends_with(" checked, 0 invalid"), "{summary}");
    let checked: usize = summary
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("count");
    assert!(checked >= 263, "{summary}");
}

#[test]
fn dispatch_inputs_are_typed_defaulted_and_checked() {
    let env = Env::new();
    env.write(
        "dispatch.yml",
        r#"
on:
  workflow_dispatch:
    inputs:
      level:
        type: choice
        options: [low, high]
        required: true
      dry:
        type: boolean
        default: true
      note:
        default: hello
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: echo "${{ inputs.level }} ${{ inputs.dry }} ${{ inputs.note }} ${{ inputs.dry == true }}"
"#,
    );
    let out = env.run(&[
        "run",
        "dispatch.yml",
        "workflow_dispatch",
        "--input",
        "level=high",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("| high true hello true"), "{stderr}");
    let out = env.run(&[
        "run",
        "dispatch.yml",
        "workflow_dispatch",
        "--input",
        "level=medium",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("invalid --input"),
        "{}",
        text(&out.stderr)
    );
    assert!(env.leftovers().is_empty());
}

#[test]
fn runs_on_labels_no_vm_type_offers_exit_2_before_any_vm() {
    let env = Env::new();
    env.write(
        "kiln.toml",
        "[vm_types.big]\nlabels = [\"16-core\"]\nvcpus = 1\nmemory_mib = 512\n",
    );
    env.write(
        "mac.yml",
        "on: push\njobs:\n  ok:\n    runs-on: [self-hosted, 16-core]\n    steps: [{run: echo}]\n  \
         build:\n    runs-on: ${{ matrix.os }}\n    strategy:\n      matrix:\n        \
         os: [ubuntu-22.04, macos-latest]\n    steps: [{run: echo}]\n",
    );
    let out = env.run(&["run", "mac.yml", "--isolation", "job", "--json"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr
            .contains("Job `build` runs on [macos-latest], but no VM type has all of those labels"),
        "{stderr}"
    );
    assert!(stderr.contains("big [big, 16-core]"), "{stderr}");
    assert!(
        !text(&out.stdout).contains("session_allocated"),
        "nothing may be allocated"
    );
    // Under isolation = workflow the run's one VM cannot be two types.
    env.write(
        "mixed.yml",
        "on: push\njobs:\n  a:\n    runs-on: 16-core\n    steps: [{run: echo}]\n  \
         b:\n    runs-on: ubuntu-latest\n    steps: [{run: echo}]\n",
    );
    let out = env.run(&["run", "mixed.yml"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("Job `a` runs on VM type `big` and job `b` on `default`"),
        "{stderr}"
    );
    // A job that does not run needs no VM type.
    env.write(
        "skipped.yml",
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps: [{run: echo}]\n  \
         mac:\n    if: github.event_name == 'release'\n    runs-on: macos-latest\n    \
         steps: [{run: echo}]\n",
    );
    let out = env.run(&["run", "skipped.yml"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(env.leftovers().is_empty());
}

/// `--backend auto` with QEMU installed and no image: the run falls back to local. Off a
/// terminal kiln prints the command that builds the image, and asks nothing.
#[test]
fn without_an_image_auto_prints_how_to_build_one_when_not_on_a_terminal() {
    let env = Env::new();
    env.write("ok.yml", OK);
    let out = env
        .kiln()
        .env("KILN_BACKEND", "auto")
        // The agent an image build would use: present, so the hint is the build command.
        .env("KILN_AGENT", env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "ok.yml"])
        .output()
        .expect("kiln runs");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let hint = stderr
        .lines()
        .find(|l| l.starts_with("hint: no guest image is built"))
        .unwrap_or_else(|| panic!("no hint (is QEMU installed?): {stderr}"));
    assert!(hint.ends_with(" image build"), "{hint}");
    assert!(!stderr.contains("[y/N]"), "{stderr}");
    assert!(stderr.contains("hello-from-step"), "{stderr}");
}

/// On a terminal (a pseudo-terminal from `script`) kiln asks; answering no runs locally. The
/// yes path builds an image (root, network, minutes): it is exercised by hand, not here.
#[test]
fn without_an_image_auto_asks_on_a_terminal_and_respects_no() {
    let env = Env::new();
    env.write("ok.yml", OK);
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let ask = |extra_env: &[(&str, &str)]| -> (Option<i32>, String) {
        let mut script = Command::new("script");
        script
            .args(["-qec", &format!("{kiln} run ok.yml"), "/dev/null"])
            .current_dir(env.repo())
            .env("KILN_RUNTIME_DIR", &env.runtime)
            .env("KILN_DATA_DIR", env.dir.path().join("data"))
            .env("KILN_BACKEND", "auto")
            .env("NO_COLOR", "1")
            .env("SHELL", "/bin/sh")
            // Present, so kiln offers the build (answering no never starts it).
            .env("KILN_AGENT", kiln)
            .env_remove("KILN_LOG")
            .env_remove("KILN_NO_PROMPT")
            .envs(extra_env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = script
            .spawn()
            .expect("`script` (util-linux) runs the command on a pseudo-terminal");
        // The answer waits in the terminal's input until kiln reads it; stdin stays open until
        // the command is done, so `script` never sees an early end of input.
        let mut stdin = child.stdin.take().expect("stdin");
        std::io::Write::write_all(&mut stdin, b"n\n").expect("answer");
        let deadline = Instant::now() + Duration::from_secs(300);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "kiln on the terminal never ended"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        drop(stdin);
        let out = child.wait_with_output().expect("output");
        (status.code(), text(&out.stdout) + &text(&out.stderr))
    };
    let (code, screen) = ask(&[]);
    assert_eq!(code, Some(0), "{screen}");
    assert!(
        screen.contains("Build the default image now"),
        "no question (QEMU must be installed for the offer): {screen}"
    );
    assert!(screen.contains("[y/N]"), "{screen}");
    assert!(screen.contains("Not building it"), "{screen}");
    assert!(screen.contains("hello-from-step"), "{screen}");
    let (code, screen) = ask(&[("KILN_NO_PROMPT", "1")]);
    assert_eq!(code, Some(0), "{screen}");
    assert!(
        !screen.contains("[y/N]"),
        "asked despite KILN_NO_PROMPT: {screen}"
    );
    assert!(screen.contains("hint: no guest image is built"), "{screen}");
}

/// A job whose `runs-on` selects `[vm_types.big]` is served by `[pool.big]`; a job of the
/// default type is not. (The local backend suffices: this is about routing, not VMs.)
#[test]
fn a_job_routed_to_a_vm_type_uses_that_types_pool() {
    let env = Env::new();
    env.write(
        "kiln.toml",
        "[vm_types.big]\nlabels = [\"16-core\"]\nvcpus = 1\nmemory_mib = 512\n\n\
         [pool.big]\nmin_idle = 1\nmax_total = 1\n",
    );
    env.write(
        "two.yml",
        "on: push\njobs:\n  a:\n    runs-on: [self-hosted, 16-core]\n    steps: [{run: echo}]\n  \
         b:\n    runs-on: ubuntu-latest\n    steps: [{run: echo}]\n",
    );
    let out = env.run(&["run", "two.yml", "--isolation", "job", "--json"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let sources: Vec<(String, String)> = text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["type"] == "session_allocated")
        .map(|e| {
            (
                e["session"].as_str().unwrap_or_default().to_owned(),
                e["source"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(sources.len(), 2, "{sources:?}");
    let source_of = |job: &str| {
        sources
            .iter()
            .find(|(s, _)| s.ends_with(&format!("-{job}")))
            .map(|(_, source)| source.as_str())
            .unwrap_or_else(|| panic!("no session of {job}: {sources:?}"))
    };
    assert_eq!(source_of("a"), "pool", "{sources:?}");
    assert_ne!(source_of("b"), "pool", "{sources:?}");
    assert!(
        env.leftovers().iter().all(|p| p.ends_with("pools")),
        "{:?}",
        env.leftovers()
    );
}

/// Quotas through `kiln run` on real VMs (each restored from its size's ready snapshot): the
/// `default` type's size, a `[workflows."PATH"]` override for one workflow, and the disk quota
/// ending a step's writes with ENOSPC.
#[test]
fn quotas_from_vm_types_and_workflow_overrides_hold_in_real_vms() {
    if kiln_test_support::skip_vm_tests() {
        return;
    }
    let image = kiln_test_support::default_image();
    let data = image
        .dir
        .parent()
        .and_then(Path::parent)
        .expect("images live in <data>/images/<name>")
        .to_path_buf();
    let env = Env::new();
    env.write(
        "kiln.toml",
        "[vm_types.default]\nvcpus = 1\nmemory_mib = 512\ndisk_mib = 1024\n\n\
         [workflows.\".github/workflows/big.yml\"]\nvcpus = 2\nmemory_mib = 1024\n",
    );
    let probe = "echo \"$NAME nproc=$(nproc) mem=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)\"";
    env.write(
        ".github/workflows/small.yml",
        &format!(
            "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    env: {{NAME: small}}\n    \
             steps:\n      - run: {probe:?}\n      - run: |\n          \
             dd if=/dev/zero of=fill bs=1M 2>&1 || echo \"dd-status=$?\"\n"
        ),
    );
    env.write(
        ".github/workflows/big.yml",
        &format!(
            "on: push\njobs:\n  j:\n    runs-on: ubuntu-latest\n    env: {{NAME: big}}\n    \
             steps:\n      - run: {probe:?}\n"
        ),
    );
    let out = env
        .kiln()
        .args(["run", "--json", "--backend", "qemu", "--max-sessions", "1"])
        .env("KILN_DATA_DIR", &data)
        .output()
        .expect("run");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let lines: Vec<String> = text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["type"] == "log")
        .filter_map(|e| e["line"].as_str().map(str::to_owned))
        .collect();
    let seen = |name: &str| -> (u32, u64) {
        let line = lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no line of {name}: {lines:?}"));
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("{k} in {line}"))
                .to_owned()
        };
        (
            field("nproc=").parse().expect("nproc"),
            field("mem=").parse().expect("kB"),
        )
    };
    let in_range = |kib: u64, mib: u64| (mib * 1024 * 8 / 10..=mib * 1024).contains(&kib);
    let (nproc, mem) = seen("small");
    assert!(
        nproc == 1 && in_range(mem, 512),
        "small: {nproc} CPUs, {mem} kB"
    );
    let (nproc, mem) = seen("big");
    assert!(
        nproc == 2 && in_range(mem, 1024),
        "big: {nproc} CPUs, {mem} kB"
    );
    assert!(
        lines.iter().any(|l| l.contains("No space left on device")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "dd-status=1"), "{lines:?}");
    assert!(
        env.leftovers().iter().all(|p| p.ends_with("pools")),
        "{:?}",
        env.leftovers()
    );
}
