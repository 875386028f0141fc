//! Step snapshots, `kiln debug`, `kiln rerun --from-failed`, `kiln runs` and `kiln logs`: the
//! real binary on real QEMU VMs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    /// A private data dir (run database, run records, snapshots) that sees the cached test
    /// image through a symlink, and a private runtime dir.
    fn new() -> Env {
        let image = kiln_test_support::default_image();
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("images")).expect("mkdir");
        std::os::unix::fs::symlink(&image.dir, data.join("images").join("default"))
            .expect("symlink the image");
        // The accelerator verdict, so that no KVM probe boot runs again.
        let shared = image.dir.parent().and_then(Path::parent).expect("data dir");
        let _ = std::fs::copy(shared.join("qemu-accel.json"), data.join("qemu-accel.json"));
        std::fs::create_dir_all(dir.path().join("repo")).expect("mkdir");
        Env { dir }
    }

    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn runtime(&self) -> PathBuf {
        self.dir.path().join("runtime")
    }

    fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.repo().join(rel), text).expect("write");
    }

    fn kiln(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(self.repo())
            .env("KILN_RUNTIME_DIR", self.runtime())
            .env("KILN_DATA_DIR", self.data())
            .env("KILN_BACKEND", "qemu")
            .env("NO_COLOR", "1")
            .env_remove("KILN_LOG")
            .env_remove("KILN_CONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("kiln runs")
    }

    /// `kiln ARGS` with `input` on its stdin (a pipe, not a terminal).
    fn kiln_with_input(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(self.repo())
            .env("KILN_RUNTIME_DIR", self.runtime())
            .env("KILN_DATA_DIR", self.data())
            .env("KILN_BACKEND", "qemu")
            .env("NO_COLOR", "1")
            .env_remove("KILN_LOG")
            .env_remove("KILN_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kiln runs");
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())
            .expect("writes stdin");
        child.wait_with_output().expect("kiln runs")
    }

    /// Per-VM directories left in the runtime dir, and QEMU processes that use it.
    fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = std::fs::read_dir(self.runtime())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("qemu-"))
                    .collect()
            })
            .unwrap_or_default();
        let runtime = self.runtime().display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.starts_with("qemu-system") && cmdline.contains(&runtime) {
                left.push(format!("process {}", entry.file_name().to_string_lossy()));
            }
        }
        left
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn events(out: &Output) -> Vec<serde_json::Value> {
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn log_lines(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "log")
        .filter_map(|e| e["line"].as_str().map(str::to_owned))
        .collect()
}

const FAILING: &str = r#"
name: snap
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - name: Make marker
        run: |
          head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > marker
          echo "marker is $(cat marker)"
          echo ran >> counter
          echo "STEP1_VAR=from-step-1" >> "$GITHUB_ENV"
      - name: Second
        run: echo second >> trail
      - name: Third
        run: echo third >> trail
      - name: Check
        run: test -f fixed
"#;

const FIXED: &str = r#"
name: snap
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - name: Make marker
        run: |
          head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > marker
          echo "marker is $(cat marker)"
          echo ran >> counter
          echo "STEP1_VAR=from-step-1" >> "$GITHUB_ENV"
      - name: Second
        run: echo second >> trail
      - name: Third
        run: echo third >> trail
      - name: Check
        run: echo "after rerun marker=$(cat marker) runs=$(wc -l < counter) var=$STEP1_VAR trail=$(tr '\n' , < trail)"
"#;

#[test]
fn a_failed_run_is_debugged_and_resumed_from_its_snapshots_on_real_vms() {
    if kiln_test_support::skip_vm_tests() {
        return;
    }
    let env = Env::new();
    env.write("ci.yml", FAILING);
    // Retention: two after-step snapshots at most.
    env.write("kiln.toml", "[runner]\nsnapshot_keep = 2\n");

    // 1. The run fails at step 4, with a snapshot after steps 1-3 and the failure state.
    let out = env.kiln(&["run", "--json", "--snapshots", "steps", "ci.yml"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let first = events(&out);
    let run = first[0]["run"].as_str().expect("run id").to_owned();
    let marker = log_lines(&first)
        .iter()
        .find_map(|l| l.strip_prefix("marker is ").map(str::to_owned))
        .expect("step 1 printed its marker");
    assert_eq!(marker.len(), 32, "{marker}");
    let taken: Vec<(u64, String)> = first
        .iter()
        .filter(|e| e["type"] == "snapshot_taken")
        .map(|e| {
            (
                e["step"].as_u64().expect("step"),
                e["kind"].as_str().expect("kind").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        taken,
        [
            (0, "after_step".to_owned()),
            (1, "after_step".to_owned()),
            (2, "after_step".to_owned()),
            (3, "failure".to_owned()),
        ]
    );
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());

    // Retention collected the oldest after-step snapshot: its state is gone.
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.data().join("runs").join(&run).join("run.json")).expect("run.json"),
    )
    .expect("run.json parses");
    let collected: Vec<bool> = record["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .map(|s| s["collected"].as_bool().expect("collected"))
        .collect();
    assert_eq!(collected, [true, false, false, false]);
    let first_dir = PathBuf::from(record["snapshots"][0]["dir"].as_str().expect("dir"));
    assert!(!first_dir.join("state").exists());
    assert!(first_dir.join("disk.qcow2").exists(), "the diff stays");
    let out = env.kiln(&["debug", &run, "--step", "1", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("collected by retention"),
        "{}",
        text(&out.stderr)
    );

    // 2. `kiln debug RUN -- CMD` runs in the failure state, in the step's directory and env.
    let out = env.kiln(&["debug", &run, "--", "cat", "marker"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), marker);
    let out = env.kiln(&["debug", &run, "--", "sh", "-c", "echo $STEP1_VAR; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "from-step-1");
    let out = env.kiln(&["debug", &run, "--step", "2", "--", "cat", "trail"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "second\n", "the state after step 2");
    // Without a command: an interactive shell on a terminal in the guest, here fed from a pipe.
    let out = env.kiln_with_input(
        &["debug", &run],
        "cat marker; echo \"user=$(id -un) tty=$(tty)\"; exit 3\n",
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains(marker.trim()), "{shown}");
    assert!(shown.contains("user=runner tty=/dev/pts/"), "{shown}");
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());

    // 3. A change to a step the snapshot includes is refused.
    env.write("ci.yml", &FAILING.replace("echo second", "echo 2nd"));
    let out = env.kiln(&["rerun", &run, "--from-failed"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("step 2 (`Second`) of job `build` changed"),
        "{}",
        text(&out.stderr)
    );

    // 4. A rerun whose step still fails can itself be rerun: it keeps the snapshot it came
    // from as its own last good one. With the failing step fixed, the rerun goes on from there.
    env.write(
        "ci.yml",
        &FAILING.replace("test -f fixed", "echo try-again; test -f fixed"),
    );
    let out = env.kiln(&["rerun", &run, "--from-failed", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let failed_again = events(&out)[0]["run"].as_str().expect("id").to_owned();
    assert!(log_lines(&events(&out)).contains(&"try-again".to_owned()));
    env.write("ci.yml", FIXED);
    let out = env.kiln(&["rerun", &failed_again, "--from-failed", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let second = events(&out);
    let rerun = second[0]["run"].as_str().expect("rerun id").to_owned();
    assert_ne!(rerun, run);
    let restored: Vec<u64> = second
        .iter()
        .filter(|e| e["type"] == "step_restored")
        .map(|e| e["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(restored, [0, 1, 2]);
    let ran: Vec<u64> = second
        .iter()
        .filter(|e| e["type"] == "step_started")
        .map(|e| e["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(ran, [3], "only the failed step ran");
    let source = second
        .iter()
        .find(|e| e["type"] == "session_allocated")
        .expect("allocation");
    assert_eq!(source["source"], "snapshot");
    assert!(
        log_lines(&second).contains(&format!(
            "after rerun marker={marker} runs=1 var=from-step-1 trail=second,third,"
        )),
        "{:?}",
        log_lines(&second)
    );
    let finished = second.last().expect("events");
    assert_eq!(finished["type"], "run_finished");
    assert_eq!(finished["result"], "success");
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());

    // 5. Both runs are recorded, with their logs.
    let out = env.kiln(&["runs", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let runs = events(&out);
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert_eq!(runs[0]["id"], rerun.as_str());
    assert_eq!(runs[0]["result"], "success");
    assert_eq!(runs[0]["rerun_of"], failed_again.as_str());
    assert_eq!(runs[1]["id"], failed_again.as_str());
    assert_eq!(runs[1]["rerun_of"], run.as_str());
    assert_eq!(runs[2]["id"], run.as_str());
    assert_eq!(runs[2]["result"], "failure");
    assert_eq!(runs[2]["backend"], "qemu");
    assert_eq!(runs[2]["workflow"], "snap");
    assert_eq!(runs[2]["event"], "push");
    assert!(runs[2]["duration_ms"].as_u64().is_some_and(|d| d > 0));
    let out = env.kiln(&["runs"]);
    let table = text(&out.stdout);
    assert!(table.starts_with("RUN "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&run) && l.contains("failure") && l.contains("qemu")),
        "{table}"
    );
    let out = env.kiln(&["logs", &run]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let logs = text(&out.stdout);
    assert!(
        logs.contains(&format!("[build] | marker is {marker}")),
        "{logs}"
    );
    assert!(logs.contains("[build] ⭐ Step 4: Check"), "{logs}");
    let out = env.kiln(&["logs", "nosuchrun"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("No run `nosuchrun`"));

    // 6. Snapshot files that are gone are named, not restored.
    let failure = PathBuf::from(
        record["snapshots"][3]["dir"]
            .as_str()
            .expect("failure state dir"),
    );
    std::fs::remove_dir_all(&failure).expect("remove the failure state");
    let out = env.kiln(&["debug", &run, "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("snapshot files of run")
            && text(&out.stderr).contains("are gone"),
        "{}",
        text(&out.stderr)
    );
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

#[test]
fn a_backend_without_live_snapshots_is_refused_up_front() {
    let env = Env {
        dir: tempfile::tempdir().expect("tempdir"),
    };
    std::fs::create_dir_all(env.repo()).expect("mkdir");
    env.write("ci.yml", FAILING);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "run",
            "--backend",
            "local",
            "--snapshots",
            "steps",
            "ci.yml",
        ])
        .current_dir(env.repo())
        .env("KILN_RUNTIME_DIR", env.runtime())
        .env("KILN_DATA_DIR", env.data())
        .stdin(Stdio::null())
        .output()
        .expect("kiln runs");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the local backend cannot take"), "{stderr}");
    assert!(!stderr.contains("Make marker"), "nothing ran: {stderr}");
    // Even a run that could not start is recorded.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["runs", "--json"])
        .env("KILN_DATA_DIR", env.data())
        .output()
        .expect("kiln runs");
    let runs = events(&out);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["result"], "error");

    // A run without snapshots cannot be debugged or resumed, and kiln says why.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "--backend", "local", "ci.yml"])
        .current_dir(env.repo())
        .env("KILN_RUNTIME_DIR", env.runtime())
        .env("KILN_DATA_DIR", env.data())
        .stdin(Stdio::null())
        .output()
        .expect("kiln runs");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let run = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("run "))
        .expect("the summary names the run")
        .to_owned();
    for args in [
        vec!["debug", run.as_str(), "--", "true"],
        vec!["rerun", run.as_str(), "--from-failed"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .current_dir(env.repo())
            .env("KILN_DATA_DIR", env.data())
            .stdin(Stdio::null())
            .output()
            .expect("kiln runs");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains(
                "has no step snapshots: run the workflow with `kiln run --snapshots steps`"
            ),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_run_database_that_cannot_be_opened_costs_the_run_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // A directory where the database file should be.
    std::fs::create_dir_all(data.join("kiln.db")).expect("mkdir");
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).expect("mkdir");
    std::fs::write(
        repo.join("ok.yml"),
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo fine\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "--backend", "local", "ok.yml"])
        .current_dir(&repo)
        .env("KILN_RUNTIME_DIR", dir.path().join("runtime"))
        .env("KILN_DATA_DIR", &data)
        .stdin(Stdio::null())
        .output()
        .expect("kiln runs");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: the run will not be recorded: cannot open the run database"),
        "{stderr}"
    );
    assert!(stderr.contains("fine"), "{stderr}");
}
