//! The web UI in headless Chromium (Debian's `chromium` + `chromium-driver`), driven over the
//! W3C WebDriver protocol with plain HTTP: the runs list renders, the run page streams the log
//! while the run is going, and the final status appears. Screenshots are saved under
//! `<target>/kiln-ui-screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_store::{RunFilter, RunStatus};
use serde_json::{Value, json};

use crate::support::{API_TOKEN, Harness, Options, Repo, push_payload, wait_for, wait_for_event};

const TICKING: &str = r#"name: Ticking
on: push
jobs:
  tick:
    runs-on: ubuntu-latest
    steps:
      - run: echo "begin"
      - name: Tick
        run: |
          for i in $(seq 1 16); do printf '\033[33mtick %s\033[0m\n' "$i"; sleep 0.5; done
      - run: echo "finished ticking"
"#;

struct Driver {
    child: Child,
    url: String,
    http: reqwest::Client,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver) is installed");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let probe = http.clone();
        let status = url.clone();
        wait_for("chromedriver", Duration::from_secs(20), || {
            let (probe, status) = (probe.clone(), status.clone());
            async move { probe.get(format!("{status}/status")).send().await.is_ok() }
        })
        .await;
        let profile = tempfile::tempdir().expect("profile").keep();
        let created: Value = http
            .post(format!("{url}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ]}
            }}}))
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("json");
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        Driver {
            child,
            url,
            http,
            session,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let response: Value = self
            .http
            .request(
                method,
                format!("{}/session/{}{path}", self.url, self.session),
            )
            .json(&body)
            .send()
            .await
            .expect("webdriver")
            .json()
            .await
            .expect("json");
        response["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    async fn screenshot(&self, name: &str) {
        let b64 = self
            .call(reqwest::Method::GET, "/screenshot", json!({}))
            .await;
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("mkdir");
        let text = b64
            .as_str()
            .unwrap_or_else(|| panic!("screenshot {name}: {b64}"));
        std::fs::write(dir.join(format!("{name}.png.b64")), text).expect("write");
        let decoded = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "base64 -d '{0}/{1}.png.b64' > '{0}/{1}.png' && rm '{0}/{1}.png.b64'",
                dir.display(),
                name
            ))
            .status()
            .expect("sh runs");
        assert!(decoded.success(), "screenshot {name} is not base64");
        let png = std::fs::read(dir.join(format!("{name}.png"))).expect("png");
        assert!(
            png.starts_with(b"\x89PNG"),
            "screenshot {name} is not a PNG"
        );
    }
}

fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    exe.parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("kiln-ui-screenshots"))
        .unwrap_or_else(std::env::temp_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_list_and_live_run_page_in_headless_chromium() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("tick.yml", TICKING)]);
    let sha = repo.commit("ui");
    let h = Harness::start(dir.path(), repo.rewrite(), Options::default()).await;
    assert_eq!(
        h.signed_webhook("push", "ui-1", &push_payload(&sha))
            .await
            .status(),
        202
    );
    wait_for_event(&h.store, "the run to start ticking", |body| {
        body.contains("tick 1")
    })
    .await;
    let run = h
        .store
        .list(&RunFilter::default())
        .await
        .expect("list")
        .remove(0);
    let driver = Driver::start().await;
    let authed = h
        .url
        .replace("http://", &format!("http://kiln:{API_TOKEN}@"));

    driver.goto(&format!("{authed}/")).await;
    let rows = driver
        .script("return document.querySelectorAll('#runs tbody tr').length")
        .await;
    assert_eq!(rows, json!(1), "the runs list shows the run");
    let name = driver
        .script("return document.querySelector('#runs tbody tr td:nth-child(2)').textContent")
        .await;
    assert_eq!(name, json!("Ticking"));
    driver.screenshot("runs-list").await;

    driver.goto(&format!("{}/runs/{}", h.url, run.id)).await;
    let first = driver
        .script("return document.getElementById('log').textContent")
        .await;
    let first = first.as_str().unwrap_or_default().to_owned();
    assert!(
        !first.contains("tick 16"),
        "the page loaded mid-run: {first}"
    );
    // Without reloading, the log grows while the run is still going.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = driver
            .script("return document.getElementById('log').textContent")
            .await;
        let now = now.as_str().unwrap_or_default().to_owned();
        let running =
            h.store.get(&run.id).await.expect("get").map(|r| r.status) == Some(RunStatus::Running);
        if now.len() > first.len() && now.contains("tick") && running {
            break;
        }
        assert!(Instant::now() < deadline, "the log never grew live: {now}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let coloured = driver
        .script("return document.querySelectorAll('#log span.a-f3').length")
        .await;
    assert!(coloured.as_u64().unwrap_or(0) >= 1, "ANSI colour rendered");
    driver.screenshot("run-live").await;

    // The final status appears.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = driver
            .script(
                "var s=document.querySelector('#state [data-status]');return s?s.dataset.status:''",
            )
            .await;
        if state == json!("success") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "final status never shown: {state}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let log = driver
        .script("return document.getElementById('log').textContent")
        .await;
    assert!(
        log.as_str()
            .unwrap_or_default()
            .contains("finished ticking"),
        "{log}"
    );
    driver.screenshot("run-finished").await;
    h.stop().await;
}
