//! Terminals on the local backend (a host pseudo-terminal); the QEMU backend's are checked with
//! the same scenario in `qemu_vm`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_vm::local::LocalProvider;
use kiln_vm::{Vm, VmProvider, VmSpec};

use crate::support::{self, terminal};

async fn local_vm(runtime: &Path) -> Arc<dyn Vm> {
    LocalProvider::new(runtime.to_owned())
        .allocate(&VmSpec::default())
        .await
        .expect("allocates")
        .vm
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_terminals_have_a_tty_size_input_and_signals() {
    let runtime = tempfile::tempdir().expect("tempdir");
    let vm = local_vm(runtime.path()).await;
    terminal::check_terminal(|request| vm.exec_pty(request)).await;
    vm.release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_local_terminal_session_kills_its_command() {
    let runtime = tempfile::tempdir().expect("tempdir");
    let vm = local_vm(runtime.path()).await;
    let mut session = vm
        .exec_pty(terminal::sh_request("echo pid=$$; exec sleep 100"))
        .await
        .expect("starts");
    let mut seen = String::new();
    terminal::read_until(&mut session, "\n", &mut seen).await;
    let pid: i32 = seen
        .trim()
        .strip_prefix("pid=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {seen:?}"));
    assert!(alive(pid));
    drop(session);
    support::wait_until(
        "the dropped session's command to die",
        Duration::from_secs(10),
        || !alive(pid),
    );
    vm.release().await.expect("released");
}
