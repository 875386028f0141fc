//! Bad input gives exact `file:line:col` messages, all of them at once.

use kiln_workflow::parse_workflow;

/// The full error text for `text`, which must fail to load.
fn errors(text: &str) -> String {
    match parse_workflow("ci.yml", text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn invalid_yaml_names_the_position() {
    let text = "on: push\njobs:\n  build:\n    runs-on: [ubuntu\n    steps: []\n";
    let got = errors(text);
    assert!(got.starts_with("ci.yml:"), "{got}");
    assert!(got.contains(": Invalid YAML: "), "{got}");
}

#[test]
fn unclosed_quote_is_invalid_yaml() {
    let got = errors("on: push\nname: \"oops\njobs: {}\n");
    assert!(got.starts_with("ci.yml:"), "{got}");
    assert!(got.contains("Invalid YAML"), "{got}");
}

#[test]
fn unknown_key_suggests_the_nearest() {
    let text =
        "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    stpes:\n      - run: echo\n";
    assert_eq!(
        errors(text),
        "ci.yml:5:5: Unknown key `stpes` in job `build`\n  help: did you mean `steps`? Expected one of `name`, `permissions`, `needs`, `if`, `runs-on`, `environment`, `concurrency`, `outputs`, `env`, `defaults`, `steps`, `timeout-minutes`, `strategy`, `continue-on-error`, `container`, `services`, `snapshot`, `uses`, `with`, `secrets`\nci.yml:3:3: Job `build` is missing `steps`"
    );
}

#[test]
fn unknown_step_key() {
    let text = "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo\n        shel: bash\n";
    let got = errors(text);
    assert!(
        got.starts_with(
            "ci.yml:7:9: Unknown key `shel` in step 1 of job `build`\n  help: did you mean `shell`?"
        ),
        "{got}"
    );
}

#[test]
fn job_cycle_names_the_cycle() {
    let text = "on: push
jobs:
  a:
    needs: b
    runs-on: ubuntu-latest
    steps: [{run: echo}]
  b:
    needs: [a]
    runs-on: ubuntu-latest
    steps: [{run: echo}]
";
    assert_eq!(
        errors(text),
        "ci.yml:8:13: Job dependency cycle: a -> b -> a\n  help: remove one of these `needs` to break the cycle"
    );
}

#[test]
fn missing_run_or_uses() {
    let text = "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    steps:\n      - name: nothing\n";
    assert_eq!(
        errors(text),
        "ci.yml:6:9: A step must have either `run` or `uses` (step 1 of job `build`)\n  help: add `run: <script>` or `uses: <action>`"
    );
}

#[test]
fn both_run_and_uses() {
    let text = "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo\n        uses: actions/checkout@v4\n";
    assert_eq!(
        errors(text),
        "ci.yml:7:9: A step cannot have both `run` and `uses` (step 1 of job `build`)"
    );
}

#[test]
fn duplicate_key_names_both_positions() {
    let text = "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    runs-on: windows-latest\n    steps: [{run: echo}]\n";
    assert_eq!(
        errors(text),
        "ci.yml:5:5: Duplicate key `runs-on` (first defined at ci.yml:4:5)"
    );
}

#[test]
fn missing_runs_on() {
    let text = "on: push\njobs:\n  build:\n    steps: [{run: echo}]\n";
    assert_eq!(
        errors(text),
        "ci.yml:3:3: Job `build` is missing `runs-on`\n  help: add e.g. `runs-on: ubuntu-latest`, or `uses:` to call a reusable workflow"
    );
}

#[test]
fn unknown_need_and_bad_ids_all_reported() {
    let text = "on: push
jobs:
  1build:
    runs-on: ubuntu-latest
    steps:
      - id: a
        run: echo
      - id: a
        run: echo
  test:
    needs: biuld
    runs-on: ubuntu-latest
    steps: [{run: echo}]
";
    let got = errors(text);
    let lines: Vec<&str> = got.lines().filter(|l| !l.starts_with("  help")).collect();
    assert_eq!(
        lines,
        vec![
            "ci.yml:3:3: Invalid job id `1build`",
            "ci.yml:8:13: Duplicate step id `a` in job `1build` (first defined at ci.yml:6:13)",
            "ci.yml:11:12: Job `test` needs `biuld`, which does not exist",
        ]
    );
}

#[test]
fn expression_error_points_into_the_file() {
    let text = "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.sha ==  }}\n";
    let got = errors(text);
    assert!(got.starts_with("ci.yml:6:"), "{got}");
    assert!(got.contains("Invalid expression in `run`"), "{got}");
}

#[test]
fn expressions_not_allowed_in_step_uses() {
    let text = "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    steps:\n      - uses: actions/${{ matrix.a }}@v4\n";
    assert_eq!(
        errors(text),
        "ci.yml:6:15: Expressions are not allowed in `uses`"
    );
}

#[test]
fn unknown_event_suggests() {
    let text = "on: [push, pull_requests]\njobs:\n  build:\n    runs-on: ubuntu-latest\n    steps: [{run: echo}]\n";
    assert_eq!(
        errors(text),
        "ci.yml:1:12: Unknown event `pull_requests`\n  help: did you mean `pull_request`?"
    );
}

#[test]
fn wrong_type() {
    let text = "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    timeout-minutes: soon\n    steps: [{run: echo}]\n";
    assert_eq!(
        errors(text),
        "ci.yml:5:22: `timeout-minutes` must be a number or an expression, found a string"
    );
}

#[test]
fn invalid_cron_and_filter() {
    let text = "on:
  schedule:
    - cron: '61 * * * *'
  push:
    branches: ['[z-a]']
    branches-ignore: [main]
jobs:
  build:
    runs-on: ubuntu-latest
    steps: [{run: echo}]
";
    let got = errors(text);
    let lines: Vec<&str> = got.lines().filter(|l| !l.starts_with("  help")).collect();
    assert_eq!(
        lines,
        vec![
            "ci.yml:3:13: Invalid minute `61` in cron expression `61 * * * *` (allowed 0-59)",
            "ci.yml:5:16: Invalid character range `z-a` in pattern `[z-a]`; ranges may only use a-z, A-Z and 0-9",
            "ci.yml:6:5: Cannot use both `branches` and `branches-ignore` for event `push`",
        ]
    );
}

#[test]
fn on_and_jobs_are_required() {
    let got = errors("name: x\n");
    assert_eq!(
        got.lines()
            .filter(|l| !l.starts_with("  help"))
            .collect::<Vec<_>>(),
        vec![
            "ci.yml:1:1: Missing required key `on`",
            "ci.yml:1:1: Missing required key `jobs`"
        ]
    );
}

// GitHub's context availability table: `secrets` is not available in `runs-on`, `matrix` not
// in workflow `env`, `hashFiles` only in steps, status functions only in `if`.
#[test]
fn contexts_where_github_does_not_allow_them() {
    let text = "on: push
env:
  A: ${{ matrix.os }}
jobs:
  build:
    runs-on: ${{ secrets.RUNNER }}
    name: ${{ hashFiles('x') }}
    timeout-minutes: ${{ success() && 1 }}
    steps:
      - run: echo ${{ secrets.X }} ${{ hashFiles('**/Cargo.lock') }}
        if: ${{ secrets.X != '' }}
";
    let got = errors(text);
    let lines: Vec<&str> = got.lines().filter(|l| !l.starts_with("  help")).collect();
    assert_eq!(
        lines,
        vec![
            "ci.yml:3:6: Context `matrix` is not available in `env.A`",
            "ci.yml:6:14: Context `secrets` is not available in `runs-on`",
            "ci.yml:7:11: Function `hashFiles()` is not available in `name`",
            "ci.yml:8:22: Function `success()` is not available in `timeout-minutes`",
            "ci.yml:11:13: Context `secrets` is not available in `if`",
        ]
    );
}

#[test]
fn expression_error_inside_a_block_scalar_is_exact() {
    let text = "on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - run: |
          echo start
          echo ${{ github.sha == }}
";
    let got = errors(text);
    assert!(got.starts_with("ci.yml:8:"), "{got}");
}

#[test]
fn expression_error_through_an_alias_is_reported() {
    let text = "on: push
env:
  A: &bad ${{ github.sha == }}
jobs:
  build:
    runs-on: ubuntu-latest
    env:
      B: *bad
    steps: [{run: echo}]
";
    let got = errors(text);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 2, "{got}");
    assert!(lines[0].starts_with("ci.yml:3:"), "{got}");
    assert!(lines[1].starts_with("ci.yml:8:"), "{got}");
}
