//! kiln serve with real QEMU VMs: a webhook run in a microVM, and a `kill -9` of the real
//! `kiln serve` process in the middle of a run followed by a restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kiln_store::{RunFilter, RunResult, RunStatus};
use kiln_vm::{BackendConfig, BackendKind, VmSpec, select_backend};

use crate::support::{
    API_TOKEN, FakeGitHub, GITHUB_TOKEN, Harness, Options, Repo, WEBHOOK_SECRET, push_payload,
    wait_for,
};

const VM_WORKFLOW: &str = r#"name: In a VM
on: push
jobs:
  vm:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: echo "marker=$(cat marker.txt) pid1=$(cat /proc/1/comm) kernel=$(uname -r)"
      - run: |
          if [ "$(cat marker.txt)" = slow ]; then echo "sleeping in the VM"; sleep 600; fi
          echo "done"
"#;

/// The image's data dir (built once per machine by kiln-test-support).
async fn image_data_dir() -> Option<PathBuf> {
    if kiln_test_support::skip_vm_tests() {
        return None;
    }
    let image = tokio::task::spawn_blocking(kiln_test_support::default_image)
        .await
        .expect("image builder");
    Some(
        image
            .dir
            .parent()
            .and_then(Path::parent)
            .expect("images live in <data>/images/<name>")
            .to_path_buf(),
    )
}

fn processes_mentioning(text: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                    cmd.contains(text).then_some(cmd)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_runs_in_a_qemu_vm_and_reports_success() {
    let Some(data_dir) = image_data_dir().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("vm.yml", VM_WORKFLOW)]);
    let sha = repo.commit("vm");
    let selection = select_backend(
        BackendKind::Qemu,
        &BackendConfig::new(runtime.path().to_path_buf(), data_dir),
    )
    .await
    .expect("the QEMU backend is usable");
    let (github, api_url) = FakeGitHub::start().await;
    let h = Harness::start(
        dir.path(),
        repo.rewrite(),
        Options {
            provider: Some(selection.provider),
            spec: VmSpec {
                memory_mib: 512,
                vcpus: 1,
                ..VmSpec::default()
            },
            workers: 1,
            github_api_url: Some(api_url),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(
        h.signed_webhook("push", "vm-1", &push_payload(&sha))
            .await
            .status(),
        202
    );
    let store = h.store.clone();
    wait_for("the VM run to finish", Duration::from_secs(300), || {
        let store = store.clone();
        async move {
            store
                .list(&RunFilter::default())
                .await
                .expect("list")
                .first()
                .is_some_and(|r| r.status == RunStatus::Finished)
        }
    })
    .await;
    let run = h
        .store
        .list(&RunFilter::default())
        .await
        .expect("list")
        .remove(0);
    let events = h.store.events(&run.id, 0, 10_000).await.expect("events");
    let all: String = events.iter().map(|e| format!("{}\n", e.body)).collect();
    assert_eq!(run.result, Some(RunResult::Success), "{all}");
    assert!(all.contains("\"backend\":\"qemu\""), "{all}");
    assert!(all.contains("marker=vm pid1="), "{all}");
    assert_eq!(
        all.matches("\"type\":\"session_allocated\"").count(),
        1,
        "one VM per run"
    );
    let gh = github.clone();
    wait_for("three statuses", Duration::from_secs(20), || {
        let gh = gh.clone();
        async move { gh.calls().len() >= 3 }
    })
    .await;
    let states: Vec<String> = github
        .calls()
        .iter()
        .map(|c| c.body["state"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(states, ["pending", "pending", "success"]);
    h.stop().await;
    assert!(
        processes_mentioning(&runtime.path().display().to_string()).is_empty(),
        "a QEMU process outlived the run"
    );
}

/// The `kiln` binary of this workspace (built if needed, in this test's target dir).
pub(crate) fn kiln_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("KILN_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test exe");
    // target/<profile>/deps/it-<hash> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps")
        .to_path_buf();
    let target = profile_dir.parent().expect("target dir").to_path_buf();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "-p", "kiln-cli", "--bin", "kiln"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(root)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building kiln failed");
    profile_dir.join("kiln")
}

struct Serve {
    child: Child,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_serve(bin: &Path, config: &Path, data: &Path, runtime: &Path, log: &Path) -> Serve {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(config)
        .env("KILN_DATA_DIR", data)
        .env("KILN_RUNTIME_DIR", runtime)
        .env("KILN_GITHUB_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env("KILN_API_TOKEN", API_TOKEN)
        .env("KILN_GITHUB_TOKEN", GITHUB_TOKEN)
        .env("KILN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("kiln serve starts");
    Serve { child }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_serve_mid_run_then_restarting_keeps_the_queue_and_marks_the_run() {
    let Some(image_data) = image_data_dir().await else {
        return;
    };
    let bin = tokio::task::spawn_blocking(kiln_binary)
        .await
        .expect("build");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let runtime = dir.path().join("runtime");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::create_dir_all(&runtime).expect("mkdir");
    std::os::unix::fs::symlink(image_data.join("images"), data.join("images")).expect("symlink");
    let repo = Repo::new(dir.path(), &[("vm.yml", VM_WORKFLOW)]);
    let (github, api_url) = FakeGitHub::start().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("kiln.toml");
    let (from, to) = repo.rewrite().remove(0);
    std::fs::write(
        &config,
        format!(
            "[runner]\nbackend = \"qemu\"\nmax_sessions = 1\n\n\
             [vm_types.default]\nvcpus = 1\nmemory_mib = 512\n\n\
             [server]\nlisten = \"127.0.0.1:{port}\"\ndatabase = \"{db}\"\n\
             github_api_url = \"{api_url}\"\npublic_url = \"{url}\"\n\
             shutdown_grace_seconds = 5\n\
             clone_url_rewrite = {{ \"{from}\" = \"{to}\" }}\n",
            db = dir.path().join("kiln.db").display(),
        ),
    )
    .expect("config");
    let log = dir.path().join("serve.log");
    let http = reqwest::Client::new();
    let healthy = |http: reqwest::Client, url: String| async move {
        http.get(format!("{url}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    };
    let mut serve = start_serve(&bin, &config, &data, &runtime, &log);
    wait_for("kiln serve to answer", Duration::from_secs(60), || {
        healthy(http.clone(), url.clone())
    })
    .await;
    let harness_like = |event: &str, delivery: &str, body: String| {
        let signature =
            kiln_server::signature::sign_github(WEBHOOK_SECRET.as_bytes(), body.as_bytes());
        http.post(format!("{url}/webhooks/github"))
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", signature)
            .body(body)
            .send()
    };
    let slow = repo.commit("slow");
    assert_eq!(
        harness_like("push", "k-1", push_payload(&slow))
            .await
            .expect("post")
            .status(),
        202
    );
    let runs = |http: reqwest::Client, url: String| async move {
        let r: serde_json::Value = http
            .get(format!("{url}/api/v1/runs"))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .expect("runs")
            .json()
            .await
            .expect("json");
        r["runs"].as_array().cloned().unwrap_or_default()
    };
    // The first run sleeps in its VM.
    wait_for(
        "the run to sleep in its VM",
        Duration::from_secs(300),
        || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let Some(run) = runs(http.clone(), url.clone()).await.pop() else {
                    return false;
                };
                let id = run["id"].as_str().unwrap_or_default().to_owned();
                http.get(format!("{url}/api/v1/runs/{id}/logs"))
                    .bearer_auth(API_TOKEN)
                    .send()
                    .await
                    .expect("logs")
                    .text()
                    .await
                    .expect("text")
                    .contains("sleeping in the VM")
            }
        },
    )
    .await;
    // A second push waits in the queue (one session).
    let fast = repo.commit("fast");
    assert_eq!(
        harness_like("push", "k-2", push_payload(&fast))
            .await
            .expect("post")
            .status(),
        202
    );
    wait_for("two runs", Duration::from_secs(30), || {
        let (http, url) = (http.clone(), url.clone());
        async move { runs(http, url).await.len() == 2 }
    })
    .await;
    let runtime_text = runtime.display().to_string();
    assert!(
        !processes_mentioning(&runtime_text).is_empty(),
        "a QEMU process runs the first run"
    );

    // kill -9: no graceful anything.
    serve.child.kill().expect("kill");
    serve.child.wait().expect("wait");
    let rt = runtime_text.clone();
    wait_for(
        "the VM to die with kiln",
        Duration::from_secs(10),
        move || {
            let rt = rt.clone();
            async move { processes_mentioning(&rt).is_empty() }
        },
    )
    .await;

    let serve2 = start_serve(&bin, &config, &data, &runtime, &log);
    wait_for(
        "kiln serve to answer again",
        Duration::from_secs(60),
        || healthy(http.clone(), url.clone()),
    )
    .await;
    wait_for(
        "the queued run to finish after the restart",
        Duration::from_secs(300),
        || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                runs(http, url)
                    .await
                    .iter()
                    .all(|r| r["status"] == "finished")
            }
        },
    )
    .await;
    let all = runs(http.clone(), url.clone()).await;
    let by_sha = |sha: &str| {
        all.iter()
            .find(|r| r["sha"] == sha)
            .cloned()
            .unwrap_or_default()
    };
    let interrupted = by_sha(&slow);
    assert_eq!(interrupted["result"], "failure", "{interrupted}");
    assert_eq!(interrupted["error"], "interrupted", "{interrupted}");
    let queued = by_sha(&fast);
    assert_eq!(queued["result"], "success", "{queued}");
    // The interrupted run's final status reached the API.
    let calls = github.calls();
    assert!(
        calls.iter().any(|c| c.path.ends_with(&slow)
            && c.body["state"] == "failure"
            && c.body["description"] == "Failed: interrupted"),
        "{calls:#?}"
    );
    // Graceful stop (SIGTERM) exits 0 and leaves no QEMU process.
    let pid = rustix::process::Pid::from_raw(serve2.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let mut serve2 = serve2;
    let status = serve2.child.wait().expect("wait");
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(processes_mentioning(&runtime_text).is_empty());
}
