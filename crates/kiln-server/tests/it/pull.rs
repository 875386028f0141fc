//! Pull requests run on their merge commit (`refs/pull/N/merge`), as on GitHub, and fall back
//! to the head commit, saying why, when the forge has no up-to-date merge ref. Statuses go to
//! the head commit either way (that is what the pull request shows).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_store::{RunFilter, RunResult};

use crate::support::{CLONE_URL, FakeGitHub, Harness, Options, Repo, wait_for};

const PR_WORKFLOW: &str = r#"name: PR
on: pull_request
jobs:
  show:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - run: |
          echo "marker=$(cat marker.txt) base=$(cat base.txt 2>/dev/null || echo none)"
          echo "sha=$GITHUB_SHA ref=$GITHUB_REF"
"#;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// main: workflow + marker "base"; the pull request's head changes the marker; then main gains
/// base.txt. Returns (head, merge) and pushes `refs/pull/{number}/head` (and `/merge` when
/// `with_merge`).
fn pull_request(repo: &Repo, number: u64, with_merge: bool) -> (String, String) {
    repo.commit("base");
    let w = &repo.work;
    git(w, &["checkout", "-q", "-b", &format!("feature-{number}")]);
    let head = repo_commit(w, "marker.txt", "feature");
    git(w, &["checkout", "-q", "main"]);
    repo_commit(w, "base.txt", "yes");
    git(
        w,
        &[
            "merge",
            "-q",
            "--no-ff",
            "-m",
            "merge",
            &format!("feature-{number}"),
        ],
    );
    let merge = git(w, &["rev-parse", "HEAD"]);
    // The merge exists only as GitHub's ref; main stays before it.
    git(w, &["reset", "-q", "--hard", "HEAD~1"]);
    let mut refspecs = vec!["main".to_owned(), format!("{head}:refs/pull/{number}/head")];
    if with_merge {
        refspecs.push(format!("{merge}:refs/pull/{number}/merge"));
    }
    let mut args = vec!["push", "-q", "-f", "origin"];
    args.extend(refspecs.iter().map(String::as_str));
    git(w, &args);
    (head, merge)
}

fn repo_commit(work: &Path, file: &str, text: &str) -> String {
    std::fs::write(work.join(file), text).expect("write");
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "-m", text]);
    git(work, &["rev-parse", "HEAD"])
}

fn payload(number: u64, head: &str) -> String {
    serde_json::json!({
        "action": "opened",
        "number": number,
        "pull_request": {
            "number": number,
            "head": {"sha": head, "ref": format!("feature-{number}")},
            "base": {"ref": "main"},
        },
        "repository": {
            "full_name": "octo/app",
            "clone_url": CLONE_URL,
            "html_url": "https://github.example/octo/app",
        },
        "sender": {"login": "octocat"},
    })
    .to_string()
}

async fn run_log(h: &Harness) -> (kiln_store::RunRecord, String) {
    let store = h.store.clone();
    wait_for("the run to finish", Duration::from_secs(60), || {
        let store = store.clone();
        async move {
            store
                .list(&RunFilter::default())
                .await
                .expect("list")
                .first()
                .is_some_and(|r| r.result.is_some())
        }
    })
    .await;
    let run = h.store.list(&RunFilter::default()).await.expect("list")[0].clone();
    let log = h
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/runs/{}/logs", run.id),
        )
        .await
        .send()
        .await
        .expect("logs")
        .text()
        .await
        .expect("text");
    (run, log)
}

#[tokio::test]
async fn a_pull_request_runs_on_its_merge_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("pr.yml", PR_WORKFLOW)]);
    let (head, merge) = pull_request(&repo, 7, true);
    let (github, api_url) = FakeGitHub::start().await;
    let h = Harness::start(
        dir.path(),
        repo.rewrite(),
        Options {
            github_api_url: Some(api_url),
            ..Options::default()
        },
    )
    .await;
    let response = h
        .signed_webhook("pull_request", "pr-7", &payload(7, &head))
        .await;
    assert_eq!(response.status(), 202);
    let (run, log) = run_log(&h).await;
    assert_eq!(run.result, Some(RunResult::Success), "{log}");
    assert!(log.contains("marker=feature base=yes"), "{log}");
    assert!(
        log.contains(&format!("sha={merge} ref=refs/pull/7/merge")),
        "{log}"
    );
    assert!(!log.contains("running its head commit"), "{log}");
    // Reported on the head commit, which the pull request shows.
    assert_eq!(run.spec.sha, head);
    let gh = github.clone();
    wait_for("statuses", Duration::from_secs(20), || {
        let gh = gh.clone();
        async move { gh.calls().len() >= 3 }
    })
    .await;
    for call in github.calls() {
        assert_eq!(call.path, format!("/repos/octo/app/statuses/{head}"));
    }
    h.stop().await;
}

#[tokio::test]
async fn without_a_merge_ref_a_pull_request_runs_its_head_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("pr.yml", PR_WORKFLOW)]);
    let (head, _) = pull_request(&repo, 8, false);
    let h = Harness::start(dir.path(), repo.rewrite(), Options::default()).await;
    let response = h
        .signed_webhook("pull_request", "pr-8", &payload(8, &head))
        .await;
    assert_eq!(response.status(), 202);
    let (run, log) = run_log(&h).await;
    assert_eq!(run.result, Some(RunResult::Success), "{log}");
    assert!(log.contains("marker=feature base=none"), "{log}");
    assert!(log.contains(&format!("sha={head} ")), "{log}");
    assert!(
        log.contains(&format!(
            "kiln: Pull request #8: running its head commit {head}: refs/pull/8/merge cannot be fetched"
        )),
        "{log}"
    );
    h.stop().await;
}
