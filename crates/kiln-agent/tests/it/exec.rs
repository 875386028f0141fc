//! Running commands through the agent.

use std::time::{Duration, Instant};

use kiln_proto::{KillTarget, Signal};
use kiln_vm::{Command, ExecRequest, ExitStatus, VmError};
use tokio::sync::mpsc;

use crate::{agent, alive, collect, script, wait_until};

#[tokio::test]
async fn hello_reports_the_agent() {
    let agent = agent().await;
    let info = agent.client.agent_info();
    assert!(!info.pid1);
    assert_eq!(info.pid, agent.pid());
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(!info.kernel.is_empty());
    agent.client.ping().await.expect("pong");
}

#[tokio::test]
async fn exec_streams_both_streams_and_reports_the_exit_code() {
    let agent = agent().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let outcome = agent
        .client
        .exec(script("echo out\necho err >&2\necho more\nexit 3\n"), tx)
        .await
        .expect("runs");
    assert_eq!(outcome.status, ExitStatus::Exited(3));
    assert_eq!(collect(&mut rx), ("out\nmore\n".into(), "err\n".into()));
}

#[tokio::test]
async fn argv_env_and_cwd_are_applied_on_a_clean_base_env() {
    let agent = agent().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let request = ExecRequest {
        command: Command::Argv(vec![
            "sh".into(),
            "-c".into(),
            "pwd; echo \"$FOO|$HOME|$PATH|${CARGO:-unset}\"".into(),
        ]),
        env: vec![("FOO".into(), "bar baz".into())],
        cwd: Some(dir.path().to_string_lossy().into_owned()),
        timeout: None,
        user: kiln_vm::ExecUser::Runner,
    };
    let outcome = agent.client.exec(request, tx).await.expect("runs");
    assert!(outcome.status.success());
    let (out, _) = collect(&mut rx);
    let cwd = dir.path().canonicalize().expect("canonical");
    assert_eq!(
        out,
        format!(
            "{}\nbar baz|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|unset\n",
            cwd.display()
        )
    );
}

#[tokio::test]
async fn script_without_placeholder_gets_its_path_appended() {
    let agent = agent().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let request = ExecRequest {
        command: Command::Script {
            shell: vec!["sh".into()],
            script: "echo \"$0\"".into(),
            extension: ".sh".into(),
        },
        env: Vec::new(),
        cwd: None,
        timeout: None,
        user: kiln_vm::ExecUser::Runner,
    };
    let outcome = agent.client.exec(request, tx).await.expect("runs");
    assert!(outcome.status.success());
    let (out, _) = collect(&mut rx);
    assert!(out.trim_end().ends_with(".sh"), "script path was {out:?}");
    // The script file is removed afterwards.
    assert!(!std::path::Path::new(out.trim_end()).exists());
}

#[tokio::test]
async fn concurrent_execs_keep_their_output_apart_and_in_order() {
    let agent = agent().await;
    let started = Instant::now();
    let runs = (0..4).map(|n| {
        let client = &agent.client;
        async move {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let text = format!(
                "for i in $(seq 1 300); do echo \"{n}-$i\"; echo \"e{n}-$i\" >&2; \
                 if [ $((i % 100)) = 0 ]; then sleep 0.5; fi; done"
            );
            let outcome = client.exec(script(&text), tx).await.expect("runs");
            (n, outcome, collect(&mut rx))
        }
    });
    let results = futures_join_all(runs).await;
    // Four runs of ~1.5 s each: concurrent (6 s if they ran one after another).
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "took {:?}",
        started.elapsed()
    );
    for (n, outcome, (out, err)) in results {
        assert!(outcome.status.success());
        let expected: String = (1..=300).map(|i| format!("{n}-{i}\n")).collect();
        let expected_err: String = (1..=300).map(|i| format!("e{n}-{i}\n")).collect();
        assert_eq!(out, expected);
        assert_eq!(err, expected_err);
    }
}

/// `join_all` without a futures dependency: spawn-free, polls all in one task.
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, fut) in results.iter_mut().zip(pinned.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

#[tokio::test]
async fn a_signal_death_is_reported_as_such() {
    let agent = agent().await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let outcome = agent
        .client
        .exec(script("kill -TERM $$\nsleep 5\n"), tx)
        .await
        .expect("runs");
    assert_eq!(outcome.status, ExitStatus::Signaled(15));
}

#[tokio::test]
async fn timeout_kills_the_whole_group_including_a_grandchild_ignoring_sigterm() {
    let agent = agent().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut request = script("sh -c 'trap \"\" TERM; echo $$; exec sleep 300' &\nwait\n");
    request.timeout = Some(Duration::from_millis(500));
    let started = Instant::now();
    let outcome = agent.client.exec(request, tx).await.expect("runs");
    assert_eq!(outcome.status, ExitStatus::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(10));
    let (out, _) = collect(&mut rx);
    let grandchild: u32 = out.trim().parse().expect("the grandchild printed its pid");
    assert!(
        wait_until(Duration::from_secs(3), || !alive(grandchild)).await,
        "grandchild {grandchild} (ignoring SIGTERM) survived the timeout"
    );
}

#[tokio::test]
async fn dropping_the_exec_future_kills_the_process_group() {
    let agent = agent().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let exec = agent
        .client
        .exec(script("sleep 300 &\necho $!\nwait\n"), tx);
    let pid = tokio::select! {
        _ = exec => panic!("the exec cannot finish by itself"),
        chunk = rx.recv() => {
            let chunk = chunk.expect("output");
            String::from_utf8_lossy(&chunk.data).trim().parse::<u32>().expect("a pid")
        }
    };
    assert!(alive(pid));
    assert!(
        wait_until(Duration::from_secs(5), || !alive(pid)).await,
        "sleep {pid} survived the dropped exec"
    );
    // The connection is still fine afterwards.
    agent.client.ping().await.expect("pong");
}

#[tokio::test]
async fn an_exec_dropped_right_after_the_request_is_still_killed() {
    let agent = agent().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("survived");
    for _ in 0..5 {
        let (tx, _rx) = mpsc::unbounded_channel();
        let exec = agent.client.exec(
            script(&format!("sleep 1\ntouch '{}'\n", marker.display())),
            tx,
        );
        tokio::pin!(exec);
        // Poll just enough to send the request, then drop: the kill may reach the agent
        // before it has even spawned the process.
        let _ = tokio::time::timeout(Duration::from_millis(1), &mut exec).await;
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(!marker.exists(), "a dropped exec ran to completion");
    agent.client.ping().await.expect("pong");
}

#[tokio::test]
async fn kill_all_signals_every_running_exec() {
    let agent = agent().await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let (tx2, _rx2) = mpsc::unbounded_channel();
    let client = &agent.client;
    let first = client.exec(script("sleep 300"), tx);
    let second = client.exec(script("sleep 300"), tx2);
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.kill_all().await.expect("kills");
    };
    let (a, b, ()) = tokio::join!(first, second, killer);
    assert_eq!(a.expect("runs").status, ExitStatus::Signaled(9));
    assert_eq!(b.expect("runs").status, ExitStatus::Signaled(9));
    // A signal to a finished exec is harmless.
    client
        .signal(KillTarget::Exec(9999), Signal::Term)
        .await
        .expect("no error");
}

#[tokio::test]
async fn a_missing_program_is_an_error_not_a_hang() {
    let agent = agent().await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let request = ExecRequest {
        command: Command::Argv(vec!["/nonexistent/kiln-test-program".into()]),
        env: Vec::new(),
        cwd: None,
        timeout: None,
        user: kiln_vm::ExecUser::Runner,
    };
    let err = agent.client.exec(request, tx).await.expect_err("fails");
    assert!(
        matches!(&err, VmError::Guest { message, .. } if message.contains("kiln-test-program")),
        "{err}"
    );
    let (tx, _rx) = mpsc::unbounded_channel();
    let mut request = script("true");
    request.cwd = Some("/nonexistent-kiln-dir".into());
    let err = agent.client.exec(request, tx).await.expect_err("fails");
    assert!(err.to_string().contains("/nonexistent-kiln-dir"), "{err}");
}

#[tokio::test]
async fn orphans_are_reaped() {
    let agent = agent().await;
    let agent_pid = agent.pid();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let outcome = agent
        .client
        .exec(script("(sleep 0.2 & echo $!)\n"), tx)
        .await
        .expect("runs");
    assert!(outcome.status.success());
    let (out, _) = collect(&mut rx);
    let orphan: u32 = out.trim().parse().expect("pid");
    // The orphan is re-parented to the agent (a subreaper) and must not stay a zombie.
    assert!(
        wait_until(Duration::from_secs(3), || !std::path::Path::new(&format!(
            "/proc/{orphan}"
        ))
        .exists())
        .await,
        "orphan {orphan} of agent {agent_pid} was never reaped"
    );
}

#[tokio::test]
async fn shutdown_ends_the_agent_cleanly() {
    let mut agent = agent().await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let client = &agent.client;
    let long = client.exec(script("sleep 300"), tx);
    let stop = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.shutdown().await.expect("acknowledged");
    };
    let (outcome, ()) = tokio::join!(long, stop);
    // The running exec was terminated (SIGTERM) as part of the shutdown.
    assert_eq!(outcome.expect("reported").status, ExitStatus::Signaled(15));
    let status = tokio::time::timeout(Duration::from_secs(5), agent.wait())
        .await
        .expect("exits")
        .expect("waits");
    assert!(status.success());
    assert!(
        tokio::time::timeout(Duration::from_secs(5), agent.client.closed())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn commands_get_the_default_sigpipe_disposition() {
    let agent = agent().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    // With SIGPIPE ignored (Rust's own default), `yes` would complain about a broken pipe.
    let outcome = agent
        .client
        .exec(script("yes | head -n 1\n"), tx)
        .await
        .expect("runs");
    assert!(outcome.status.success());
    assert_eq!(collect(&mut rx), ("y\n".into(), String::new()));
}

#[tokio::test]
async fn a_request_above_the_frame_limit_fails_alone() {
    let agent = agent().await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let huge = format!("# {}\ntrue\n", "x".repeat(kiln_proto::MAX_FRAME_LEN));
    let err = agent
        .client
        .exec(script(&huge), tx)
        .await
        .expect_err("too large to send");
    assert!(err.to_string().contains("frame limit"), "{err}");
    // The connection is unaffected.
    let (tx, _rx) = mpsc::unbounded_channel();
    let outcome = agent.client.exec(script("true"), tx).await.expect("runs");
    assert!(outcome.status.success());
}

#[tokio::test]
async fn a_background_process_that_keeps_writing_does_not_hold_the_exec_open() {
    let agent = agent().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        agent.client.exec(
            script("(while true; do echo tick; sleep 0.02; done) &\necho started\n"),
            tx,
        ),
    )
    .await
    .expect("the exec ends although its background child keeps stdout open")
    .expect("runs");
    assert!(outcome.status.success());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(collect(&mut rx).0.contains("started\n"));
    // The writer dies of SIGPIPE at its next write, now that nobody reads its output.
}

#[tokio::test]
async fn dropping_the_stdio_agent_terminates_its_commands() {
    let agent = agent().await;
    let agent_pid = agent.pid();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let exec = agent
        .client
        .exec(script("sleep 300 &\necho $!\nwait\n"), tx);
    let pid = tokio::select! {
        _ = exec => panic!("the exec cannot finish by itself"),
        chunk = rx.recv() => {
            let chunk = chunk.expect("output");
            String::from_utf8_lossy(&chunk.data).trim().parse::<u32>().expect("a pid")
        }
    };
    drop(agent);
    assert!(
        wait_until(Duration::from_secs(5), || !alive(pid)).await,
        "sleep {pid} outlived its agent"
    );
    assert!(wait_until(Duration::from_secs(5), || !alive(agent_pid)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_execs_have_a_tty_size_input_and_signals() {
    let agent = agent().await;
    kiln_test_support::terminal::check_terminal(|request| agent.client.exec_pty(request)).await;
}

#[tokio::test]
async fn under_stdio_execs_run_as_the_agent_user_and_root_needs_a_root_agent() {
    let agent = agent().await;
    let info = agent.client.agent_info();
    let me = rustix::process::geteuid().as_raw();
    assert_eq!(info.user.uid, me);
    assert!(
        info.user_fallback
            .as_deref()
            .is_some_and(|r| r.contains("--stdio")),
        "{:?}",
        info.user_fallback
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut request = script("id -u");
    request.user = kiln_vm::ExecUser::Root;
    let result = agent.client.exec(request, tx).await;
    if me == 0 {
        assert_eq!(result.expect("runs").status, ExitStatus::Exited(0));
        assert_eq!(collect(&mut rx).0, "0\n");
    } else {
        let err = result.expect_err("a non-root agent cannot run as root");
        assert!(err.to_string().contains("Cannot run as root"), "{err}");
    }
}
