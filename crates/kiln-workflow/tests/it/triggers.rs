//! `on:` matching against events, written from GitHub's trigger documentation.

use kiln_workflow::{Event, Workflow, parse_workflow};
use serde_json::json;

fn wf(on: &str) -> Workflow {
    let text = format!("{on}\njobs:\n  a:\n    runs-on: x\n    steps: [{{run: echo}}]\n");
    parse_workflow("w.yml", &text).unwrap_or_else(|e| panic!("{e}"))
}

fn push(git_ref: &str) -> Event {
    Event {
        name: "push".into(),
        payload: json!({ "ref": git_ref }),
        changed_files: None,
    }
}

fn pr(action: &str, base: &str) -> Event {
    Event {
        name: "pull_request".into(),
        payload: json!({ "action": action, "pull_request": { "base": { "ref": base } } }),
        changed_files: None,
    }
}

#[test]
fn event_name_must_be_listed() {
    let w = wf("on: [push]");
    assert!(w.on.matches(&push("refs/heads/main")));
    assert!(!w.on.matches(&Event::new("pull_request")));
}

#[test]
fn branch_filters_skip_tag_pushes() {
    let w = wf("on:\n  push:\n    branches: [main]");
    assert!(w.on.matches(&push("refs/heads/main")));
    assert!(!w.on.matches(&push("refs/heads/dev")));
    assert!(!w.on.matches(&push("refs/tags/v1")));
}

#[test]
fn tag_filters_skip_branch_pushes() {
    let w = wf("on:\n  push:\n    tags: ['v*']");
    assert!(w.on.matches(&push("refs/tags/v1.2")));
    assert!(!w.on.matches(&push("refs/heads/main")));
}

#[test]
fn branches_and_tags_together() {
    let w = wf("on:\n  push:\n    branches: [main]\n    tags: ['v*']");
    assert!(w.on.matches(&push("refs/heads/main")));
    assert!(w.on.matches(&push("refs/tags/v2")));
    assert!(!w.on.matches(&push("refs/tags/x")));
}

#[test]
fn ignore_filters() {
    let w = wf("on:\n  push:\n    branches-ignore: ['mona/octocat', 'releases/**-alpha']");
    assert!(w.on.matches(&push("refs/heads/main")));
    assert!(!w.on.matches(&push("refs/heads/mona/octocat")));
    assert!(!w.on.matches(&push("refs/heads/releases/beta/3-alpha")));
    // Only branch filters: tags do not run the workflow.
    assert!(!w.on.matches(&push("refs/tags/v1")));
}

// GitHub docs, "Including and excluding branches": order of positive and negative patterns.
#[test]
fn negative_branch_patterns() {
    let w = wf("on:\n  push:\n    branches:\n      - 'releases/**'\n      - '!releases/**-alpha'");
    assert!(w.on.matches(&push("refs/heads/releases/10")));
    assert!(w.on.matches(&push("refs/heads/releases/beta/mona")));
    assert!(!w.on.matches(&push("refs/heads/releases/10-alpha")));
    assert!(!w.on.matches(&push("refs/heads/releases/beta/3-alpha")));
}

#[test]
fn pull_request_default_types() {
    let w = wf("on: pull_request");
    assert!(w.on.matches(&pr("opened", "main")));
    assert!(w.on.matches(&pr("synchronize", "main")));
    assert!(w.on.matches(&pr("reopened", "main")));
    assert!(!w.on.matches(&pr("labeled", "main")));
    let w = wf("on:\n  pull_request:\n    types: [labeled]");
    assert!(w.on.matches(&pr("labeled", "main")));
    assert!(!w.on.matches(&pr("opened", "main")));
}

#[test]
fn pull_request_branches_match_the_base() {
    let w = wf("on:\n  pull_request:\n    branches: ['releases/**']");
    assert!(w.on.matches(&pr("opened", "releases/1.0")));
    assert!(!w.on.matches(&pr("opened", "main")));
}

// GitHub docs: `paths` runs when at least one file matches; `paths-ignore` skips only when all
// files match; path filters are not evaluated for tag pushes.
#[test]
fn path_filters() {
    let w = wf("on:\n  push:\n    paths: ['**.js']");
    let mut e = push("refs/heads/main");
    e.changed_files = Some(vec!["README.md".into(), "src/app.js".into()]);
    assert!(w.on.matches(&e));
    e.changed_files = Some(vec!["README.md".into()]);
    assert!(!w.on.matches(&e));

    let w = wf("on:\n  push:\n    paths-ignore: ['docs/**']");
    e.changed_files = Some(vec!["docs/a.md".into()]);
    assert!(!w.on.matches(&e));
    e.changed_files = Some(vec!["docs/a.md".into(), "src/main.rs".into()]);
    assert!(w.on.matches(&e));

    let w = wf("on:\n  push:\n    paths: ['src/**']\n    tags: ['v*']");
    let mut tag = push("refs/tags/v1");
    tag.changed_files = Some(vec!["README.md".into()]);
    assert!(w.on.matches(&tag));
}

#[test]
fn other_events_filter_on_types() {
    let w = wf("on:\n  issues:\n    types: [opened, edited]");
    let mut e = Event::new("issues");
    e.payload = json!({"action": "edited"});
    assert!(w.on.matches(&e));
    e.payload = json!({"action": "closed"});
    assert!(!w.on.matches(&e));
}

#[test]
fn workflow_dispatch_and_schedule() {
    let w = wf("on:\n  workflow_dispatch:\n  schedule:\n    - cron: '0 0 * * *'");
    assert!(w.on.matches(&Event::new("workflow_dispatch")));
    assert!(w.on.matches(&Event::new("schedule")));
}

#[test]
fn merge_group_branches_match_the_base() {
    let w = wf("on:\n  merge_group:\n    branches: [main]");
    let mut e = Event::new("merge_group");
    e.payload =
        json!({"action": "checks_requested", "merge_group": {"base_ref": "refs/heads/main"}});
    assert!(w.on.matches(&e));
    e.payload =
        json!({"action": "checks_requested", "merge_group": {"base_ref": "refs/heads/dev"}});
    assert!(!w.on.matches(&e));
}

#[test]
fn workflow_run_filters_on_workflow_name_and_branch() {
    let w = wf(
        "on:\n  workflow_run:\n    workflows: [Build]\n    types: [completed]\n    branches: [main]",
    );
    let mut e = Event::new("workflow_run");
    e.payload =
        json!({"action": "completed", "workflow_run": {"name": "Build", "head_branch": "main"}});
    assert!(w.on.matches(&e));
    e.payload =
        json!({"action": "completed", "workflow_run": {"name": "Lint", "head_branch": "main"}});
    assert!(!w.on.matches(&e));
    e.payload =
        json!({"action": "requested", "workflow_run": {"name": "Build", "head_branch": "main"}});
    assert!(!w.on.matches(&e));
}
