//! Integration tests: the real `kiln-agent --stdio` binary, driven by the real host client
//! (`kiln_vm::guest::GuestClient`), running real processes on this machine.

mod bench;
mod exec;
mod files;
mod protocol;
mod vm;

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_vm::guest::{StdioAgent, spawn_stdio_agent};
use kiln_vm::{Command, ExecRequest, Output, Stream};
use tokio::sync::mpsc;

/// The agent binary cargo built for these tests.
pub fn agent_path() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kiln-agent"))
}

/// Starts an agent and connects to it.
pub async fn agent() -> StdioAgent {
    spawn_stdio_agent(agent_path())
        .await
        .expect("the agent starts and answers the hello")
}

/// A bash script exec.
pub fn script(text: &str) -> ExecRequest {
    ExecRequest {
        command: Command::Script {
            shell: vec!["bash".into(), "-e".into(), "{0}".into()],
            script: text.into(),
            extension: ".sh".into(),
        },
        env: Vec::new(),
        cwd: None,
        timeout: None,
        user: kiln_vm::ExecUser::Runner,
    }
}

/// Everything received on an output channel, split by stream.
pub fn collect(rx: &mut mpsc::UnboundedReceiver<Output>) -> (String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Ok(chunk) = rx.try_recv() {
        match chunk.stream {
            Stream::Stdout => out.extend_from_slice(&chunk.data),
            Stream::Stderr => err.extend_from_slice(&chunk.data),
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// Whether process `pid` exists (zombies count as gone: they run nothing).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}
