//! Exec round-trip figures (run with `--ignored --nocapture`): `true` through the `--stdio`
//! agent against spawning `true` directly, in the same process.

use std::time::{Duration, Instant};

use kiln_vm::{Command, ExecRequest};
use tokio::sync::mpsc;

use crate::agent;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

/// Prints p50/p99 of `samples` and returns p50.
pub fn report(label: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!(
        "{label}: n={} p50={:.3} ms p99={:.3} ms",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    p50
}

#[tokio::test]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn exec_round_trip_of_true() {
    let agent = agent().await;
    let request = ExecRequest {
        command: Command::Argv(vec!["true".into()]),
        env: Vec::new(),
        cwd: None,
        timeout: None,
        user: kiln_vm::ExecUser::Runner,
    };
    let mut through_agent = Vec::new();
    let mut local = Vec::new();
    for _ in 0..200 {
        let (tx, _rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let outcome = agent.client.exec(request.clone(), tx).await.expect("runs");
        through_agent.push(start.elapsed());
        assert!(outcome.status.success());

        let start = Instant::now();
        let status = tokio::process::Command::new("true")
            .status()
            .await
            .expect("runs");
        local.push(start.elapsed());
        assert!(status.success());
    }
    let mut pings = Vec::new();
    for _ in 0..200 {
        pings.push(agent.client.ping().await.expect("pong"));
    }
    let agent_p50 = report("exec `true` via the --stdio agent", through_agent);
    report("spawn `true` locally", local);
    report("ping via the --stdio agent", pings);
    assert!(agent_p50 < Duration::from_secs(1));
}
