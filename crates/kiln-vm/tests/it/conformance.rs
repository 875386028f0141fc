//! The backend conformance suite: what every backend (`local`, `qemu`, `firecracker`) must do,
//! written once and run against each. Backend-specific facts (the guest kernel, networking,
//! snapshots) stay in each backend's own tests; this is the contract the runner relies on.
//!
//! Everything here stays under [`Vm::work_root`], so the suite is safe against the `local`
//! backend, whose "guest" is the host.

use std::path::Path;
use std::time::Duration;

use kiln_vm::local::LocalProvider;
use kiln_vm::{Command, ExecRequest, ExitStatus, Stream, Vm, VmError, VmProvider, VmSpec};

/// Output of one command.
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub chunks: usize,
}

pub async fn run(vm: &dyn Vm, argv: &[&str], timeout: Option<Duration>) -> Ran {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let request = ExecRequest {
        command: Command::Argv(argv.iter().map(|s| (*s).to_owned()).collect()),
        env: vec![("KILN_TEST".into(), "yes".into())],
        cwd: None,
        timeout: Some(timeout.unwrap_or(Duration::from_secs(60))),
        user: kiln_vm::ExecUser::Runner,
    };
    let outcome = vm.exec(request, tx).await.expect("exec works");
    let mut ran = Ran {
        status: outcome.status,
        stdout: String::new(),
        stderr: String::new(),
        chunks: 0,
    };
    while let Ok(chunk) = rx.try_recv() {
        let text = String::from_utf8_lossy(&chunk.data).into_owned();
        match chunk.stream {
            Stream::Stdout => ran.stdout.push_str(&text),
            Stream::Stderr => ran.stderr.push_str(&text),
        }
        ran.chunks += 1;
    }
    ran
}

pub async fn sh(vm: &dyn Vm, script: &str) -> String {
    let ran = run(vm, &["sh", "-c", script], None).await;
    assert!(
        ran.status.success(),
        "`{script}` failed on {}: {} {}",
        vm.id(),
        ran.status,
        ran.stderr
    );
    ran.stdout.trim().to_owned()
}

fn fill_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("top.txt"), b"top\n").unwrap();
    std::fs::write(
        root.join("sub/deeper/data.bin"),
        (0..=255u8).cycle().take(300_000).collect::<Vec<_>>(),
    )
    .unwrap();
}

/// The contract, checked on two VMs of one backend.
pub async fn check_two_vms(backend: &str, a: &dyn Vm, b: &dyn Vm) {
    assert_ne!(a.id(), b.id());
    assert_eq!(a.backend(), backend);
    assert!(a.work_root().starts_with('/'), "{}", a.work_root());

    // Exit codes, and output streamed as it is produced with the streams kept apart.
    let ran = run(
        a,
        &[
            "sh",
            "-c",
            "echo out1; echo err1 >&2; sleep 0.3; echo out2; exit 3",
        ],
        None,
    )
    .await;
    assert_eq!(ran.status, ExitStatus::Exited(3));
    assert_eq!(ran.stdout, "out1\nout2\n");
    assert_eq!(ran.stderr, "err1\n");
    assert!(ran.chunks >= 2, "output came in one piece");

    // The request's environment; the work root as the default directory.
    assert_eq!(sh(a, "echo $KILN_TEST").await, "yes");
    assert_eq!(sh(a, "pwd").await, a.work_root());

    // A program that does not exist fails the command (or the exec), never the VM.
    let missing = a
        .exec(
            ExecRequest {
                command: Command::Argv(vec!["definitely-not-a-program".into()]),
                env: Vec::new(),
                cwd: None,
                timeout: None,
                user: kiln_vm::ExecUser::Runner,
            },
            tokio::sync::mpsc::unbounded_channel().0,
        )
        .await;
    match missing {
        Ok(outcome) => assert!(!outcome.status.success()),
        // The VM backends report it from the agent; `local` as a failed spawn on the host.
        Err(e) => assert!(
            matches!(e, VmError::Guest { .. } | VmError::Io { .. }),
            "{e}"
        ),
    }
    assert_eq!(sh(a, "echo still-alive").await, "still-alive");

    // A timeout kills the command and says so.
    let timed = run(a, &["sleep", "30"], Some(Duration::from_secs(1))).await;
    assert_eq!(timed.status, ExitStatus::TimedOut);

    // kill_all ends what is running.
    let long = a.exec(
        ExecRequest {
            command: Command::Argv(vec!["sleep".into(), "300".into()]),
            env: Vec::new(),
            cwd: None,
            timeout: None,
            user: kiln_vm::ExecUser::Runner,
        },
        tokio::sync::mpsc::unbounded_channel().0,
    );
    let killer = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.kill_all().await.unwrap();
    };
    let (outcome, ()) = tokio::join!(long, killer);
    let status = outcome.unwrap().status;
    assert!(!status.success(), "sleep 300 survived kill_all: {status}");

    // Files and trees in and out, byte for byte.
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("src");
    fill_tree(&src);
    let tree = format!("{}/tree", a.work_root());
    a.copy_in(&src, &tree).await.unwrap();
    assert_eq!(sh(a, &format!("cat {tree}/top.txt")).await, "top");
    sh(a, &format!("echo added > {tree}/sub/new.txt")).await;
    let back = host.path().join("back");
    a.copy_out(&tree, &back).await.unwrap();
    assert_eq!(std::fs::read(back.join("top.txt")).unwrap(), b"top\n");
    assert_eq!(
        std::fs::read(back.join("sub/deeper/data.bin")).unwrap(),
        std::fs::read(src.join("sub/deeper/data.bin")).unwrap()
    );
    assert_eq!(std::fs::read(back.join("sub/new.txt")).unwrap(), b"added\n");
    let file = format!("{}/w/x.txt", a.work_root());
    a.write_file(&file, b"written").await.unwrap();
    assert_eq!(a.read_file(&file).await.unwrap(), b"written");
    let err = a
        .read_file(&format!("{}/no-such-file", a.work_root()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, VmError::Guest { .. } | VmError::Io { .. }),
        "{err}"
    );

    // Two VMs share nothing.
    let b_tree = format!("{}/tree", b.work_root());
    assert_eq!(
        sh(
            b,
            &format!("test -e {b_tree}/top.txt && echo yes || echo no")
        )
        .await,
        "no"
    );
}

/// Releases both VMs through `provider` and checks that nothing is left: releasing twice is
/// fine, a released VM says so, and `runtime` is empty.
pub async fn release_and_check(provider: &dyn VmProvider, vms: &[&dyn Vm], runtime: &Path) {
    for vm in vms {
        provider.release(*vm).await.unwrap();
        vm.release().await.unwrap();
        let err = vm.read_file("/etc/hostname").await.unwrap_err();
        assert!(matches!(err, VmError::Released { .. }), "{err}");
    }
    let left: Vec<_> = std::fs::read_dir(runtime)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind in the runtime dir: {left:?}");
}

/// The whole suite against one provider: two VMs, the contract, release.
pub async fn suite(provider: &dyn VmProvider, spec: &VmSpec, runtime: &Path) {
    let (a, b) = tokio::join!(provider.allocate(spec), provider.allocate(spec));
    let (a, b) = (a.expect("VM a"), b.expect("VM b"));
    check_two_vms(provider.name(), &*a.vm, &*b.vm).await;
    release_and_check(provider, &[&*a.vm, &*b.vm], runtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_backend_conforms() {
    let runtime = tempfile::tempdir().unwrap();
    let local = LocalProvider::new(runtime.path().to_owned());
    suite(&local, &VmSpec::default(), runtime.path()).await;
}
