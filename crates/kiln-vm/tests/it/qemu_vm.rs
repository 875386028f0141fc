//! Real QEMU VMs booted from the default image (TCG on hosts without working KVM): commands,
//! streaming, file transfer, isolation between VMs, boot timeout, guest death, and no leaks.
//!
//! VM tests run one at a time (a shared async lock): two cores emulating several guests at once
//! would only make every boot slower.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_vm::local::LocalProvider;
use kiln_vm::qemu::{Accel, QemuConfig, QemuProvider};
use kiln_vm::{Command, ExecRequest, ExitStatus, Stream, Vm, VmError, VmProvider, VmSpec};

use crate::support;

static VM_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spec() -> VmSpec {
    VmSpec {
        vcpus: 2,
        memory_mib: 1024,
        ..VmSpec::default()
    }
}

fn provider(runtime: &Path, accel: Accel) -> QemuProvider {
    let mut config = QemuConfig::new(runtime.to_owned(), support::data_dir());
    config.accel = accel;
    QemuProvider::new(config).expect("qemu-system-x86_64 and qemu-img are installed")
}

struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    chunks: Vec<(Stream, String)>,
}

async fn run(vm: &dyn Vm, argv: &[&str]) -> Ran {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let request = ExecRequest {
        command: Command::Argv(argv.iter().map(|s| (*s).to_owned()).collect()),
        env: vec![("KILN_TEST".into(), "yes".into())],
        cwd: None,
        timeout: Some(Duration::from_secs(60)),
        user: kiln_vm::ExecUser::Runner,
    };
    let outcome = vm.exec(request, tx).await.expect("exec works");
    let mut ran = Ran {
        status: outcome.status,
        stdout: String::new(),
        stderr: String::new(),
        chunks: Vec::new(),
    };
    while let Ok(chunk) = rx.try_recv() {
        let text = String::from_utf8_lossy(&chunk.data).into_owned();
        match chunk.stream {
            Stream::Stdout => ran.stdout.push_str(&text),
            Stream::Stderr => ran.stderr.push_str(&text),
        }
        ran.chunks.push((chunk.stream, text));
    }
    ran
}

async fn sh(vm: &dyn Vm, script: &str) -> String {
    let ran = run(vm, &["sh", "-c", script]).await;
    assert!(
        ran.status.success(),
        "`{script}` failed: {} {}",
        ran.status,
        ran.stderr
    );
    ran.stdout.trim().to_owned()
}

/// Processes whose command line names `id` (QEMU runs with `-name <id>`).
fn processes_of(id: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            if args
                .windows(2)
                .any(|w| w[0] == b"-name" && w[1] == id.as_bytes())
            {
                pids.push(pid);
            }
        }
    }
    pids
}

fn assert_no_leak(runtime: &Path, ids: &[String]) {
    for id in ids {
        assert!(processes_of(id).is_empty(), "QEMU of {id} is still running");
        assert!(
            !runtime.join(id).exists(),
            "the directory of {id} is left behind"
        );
    }
    let left: Vec<PathBuf> = std::fs::read_dir(runtime)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "runtime dir not empty: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_run_commands_transfer_files_are_distinct_and_leave_nothing() {
    if support::skip_vm_tests() {
        return;
    }
    let image = tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _guard = VM_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let qemu = provider(runtime.path(), Accel::Auto);
    let (accel, why) = qemu.resolve_accel(&spec()).await.unwrap();
    eprintln!("accelerator: {accel} ({why})");
    // The verdict is cached for doctor and later runs.
    let cached = kiln_vm::qemu::cached_accel(qemu.config());
    assert_eq!(cached.map(|c| c.0), Some(accel));
    let version = kiln_vm::qemu::qemu_version(qemu.config()).await.unwrap();
    assert!(version.contains("QEMU"), "{version}");

    let started = Instant::now();
    let vm_spec = spec();
    let (a, b) = tokio::join!(qemu.allocate(&vm_spec), qemu.allocate(&vm_spec));
    let (a, b) = (a.expect("VM a boots"), b.expect("VM b boots"));
    eprintln!(
        "two concurrent boots to agent ready ({accel}): {} ms and {} ms (wall {} ms)",
        a.elapsed.as_millis(),
        b.elapsed.as_millis(),
        started.elapsed().as_millis()
    );
    let local_runtime = tempfile::tempdir().unwrap();
    let local = LocalProvider::new(local_runtime.path().to_owned());
    let l = local.allocate(&spec()).await.unwrap();
    eprintln!(
        "local allocation: {} us; qemu/local ratio ~{}x",
        l.elapsed.as_micros(),
        a.elapsed.as_micros() / l.elapsed.as_micros().max(1)
    );
    l.vm.release().await.unwrap();
    let ids = [a.vm.id().to_owned(), b.vm.id().to_owned()];
    assert_ne!(ids[0], ids[1]);
    assert_eq!(a.vm.backend(), "qemu");

    // The guest kernel and the agent, not the host.
    let uname = sh(&*a.vm, "uname -r").await;
    assert_eq!(uname, image.manifest.kernel_version);
    let host = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    assert_ne!(uname, host);
    let pid1 = sh(&*a.vm, "cat /proc/1/comm").await;
    assert!(pid1 == "init" || pid1.contains("kiln"), "PID 1 is {pid1}");
    let root = sh(
        &*a.vm,
        "findmnt -n -o SOURCE,FSTYPE / || grep ' / ' /proc/mounts",
    )
    .await;
    assert!(root.contains("vda"), "root is {root}");

    // The backend contract, shared with every other backend.
    crate::conformance::check_two_vms("qemu", &*a.vm, &*b.vm).await;

    // User-mode NAT: the guest reaches a server on the host's loopback through 10.0.2.2.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf).await;
        conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nfrom-host\n")
            .await
            .unwrap();
    });
    let fetched = sh(
        &*a.vm,
        &format!("curl -sS --max-time 20 http://10.0.2.2:{port}/"),
    )
    .await;
    assert_eq!(fetched, "from-host");
    server.await.unwrap();

    // Exec round trip of `true` through the agent, against spawning `true` on the host.
    let mut guest_rtt = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        assert!(run(&*a.vm, &["true"]).await.status.success());
        guest_rtt.push(t.elapsed());
    }
    let mut host_rtt = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        assert!(
            std::process::Command::new("true")
                .status()
                .unwrap()
                .success()
        );
        host_rtt.push(t.elapsed());
    }
    guest_rtt.sort();
    host_rtt.sort();
    eprintln!(
        "exec `true` round trip ({accel}): guest p50 {:?} max {:?}; host spawn p50 {:?}",
        guest_rtt[10], guest_rtt[19], host_rtt[10]
    );
    // Host memory of an idle VM: QEMU's resident set beside the guest RAM it was given.
    if let Some(pid) = processes_of(a.vm.id()).first() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap_or("VmRSS: ?");
        let used_kib = sh(
            &*a.vm,
            "awk '/MemTotal/{t=$2} /MemFree/{f=$2} END{print t-f}' /proc/meminfo",
        )
        .await;
        eprintln!(
            "idle VM ({} MiB guest RAM, {used_kib} kB of it in use by the guest): QEMU {rss}",
            spec().memory_mib
        );
    }

    // Commands run as the runner user, which has passwordless sudo.
    assert_eq!(sh(&*a.vm, "id -un").await, "runner");
    assert_eq!(sh(&*a.vm, "sudo -n id -u").await, "0");
    assert!(a.vm.work_root().starts_with('/'));
    assert_eq!(
        sh(&*a.vm, &format!("stat -c %U {}", a.vm.work_root())).await,
        "runner"
    );

    // Two VMs are two machines.
    let (boot_a, boot_b) = (
        sh(&*a.vm, "cat /proc/sys/kernel/random/boot_id").await,
        sh(&*b.vm, "cat /proc/sys/kernel/random/boot_id").await,
    );
    assert_ne!(boot_a, boot_b);
    let (host_a, host_b) = (sh(&*a.vm, "hostname").await, sh(&*b.vm, "hostname").await);
    assert_ne!(host_a, host_b);
    // A file written in one is not in the other (each has its own overlay).
    sh(
        &*a.vm,
        "echo a | sudo -n tee /etc/kiln-mark >/dev/null && sync",
    )
    .await;
    assert_eq!(
        sh(&*b.vm, "cat /etc/kiln-mark 2>/dev/null || echo none").await,
        "none"
    );

    // Release: no process, no directory; releasing twice is fine; a released VM says so.
    let t = Instant::now();
    qemu.release(&*a.vm).await.unwrap();
    eprintln!("release took {} ms", t.elapsed().as_millis());
    qemu.release(&*b.vm).await.unwrap();
    a.vm.release().await.unwrap();
    let err = a.vm.read_file("/etc/hostname").await.unwrap_err();
    assert!(matches!(err, VmError::Released { .. }), "{err}");
    assert_no_leak(runtime.path(), &ids);
    // The base image was never written.
    let base_after = std::fs::metadata(image.rootfs())
        .unwrap()
        .modified()
        .unwrap();
    assert!(base_after <= std::time::SystemTime::now());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_death_fails_the_command_with_the_console_and_dropping_cleans_up() {
    if support::skip_vm_tests() {
        return;
    }
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _guard = VM_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let qemu = provider(runtime.path(), Accel::Auto);
    let allocation = qemu.allocate(&spec()).await.expect("VM boots");
    eprintln!(
        "single boot to agent ready: {} ms",
        allocation.elapsed.as_millis()
    );
    let vm = allocation.vm;
    let id = vm.id().to_owned();
    let pids = processes_of(&id);
    assert_eq!(pids.len(), 1, "one QEMU for {id}: {pids:?}");

    // Kill QEMU while a command runs: the command fails clearly, with the console tail.
    let exec = vm.exec(
        ExecRequest {
            command: Command::Argv(vec!["sleep".into(), "60".into()]),
            env: Vec::new(),
            cwd: None,
            timeout: None,
            user: kiln_vm::ExecUser::Runner,
        },
        tokio::sync::mpsc::unbounded_channel().0,
    );
    let killer = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pids[0] as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
    };
    let (result, ()) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(exec, killer)
    })
    .await
    .expect("the command ends when its VM dies");
    let err = result.expect_err("a command in a dead VM fails");
    let text = err.to_string();
    assert!(text.contains("the VM died"), "{text}");
    assert!(text.contains("guest console"), "{text}");
    vm.release().await.unwrap();
    assert_no_leak(runtime.path(), &[id]);

    // Dropping a VM that was never released kills QEMU and removes its directory.
    let vm = qemu.allocate(&spec()).await.expect("VM boots").vm;
    let id = vm.id().to_owned();
    assert_eq!(sh(&*vm, "echo up").await, "up");
    drop(vm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_no_leak(runtime.path(), &[id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_timeout_is_a_clear_error_and_leaves_nothing() {
    if support::skip_vm_tests() {
        return;
    }
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _guard = VM_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let mut config = QemuConfig::new(runtime.path().to_owned(), support::data_dir());
    config.accel = Accel::Tcg;
    // No guest kernel reaches its agent within 300 ms under emulation.
    config.boot_timeout = Duration::from_millis(300);
    let qemu = QemuProvider::new(config).unwrap();
    let err = qemu.allocate(&spec()).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, VmError::Boot { .. }), "{text}");
    assert!(text.contains("boot timeout"), "{text}");
    assert!(text.contains("guest console"), "{text}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_no_leak(runtime.path(), &[]);
    assert!(
        std::fs::read_dir("/proc").unwrap().flatten().all(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    !String::from_utf8_lossy(&c).contains(&runtime.path().display().to_string())
                })
                .unwrap_or(true)
        }),
        "a QEMU of the timed-out boot is still running"
    );
}

#[tokio::test]
async fn a_missing_image_says_how_to_build_it() {
    if support::skip_vm_tests() {
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = QemuConfig::new(runtime.path().to_owned(), data.path().to_owned());
    config.accel = Accel::Tcg;
    let qemu = QemuProvider::new(config).expect("qemu is installed");
    let err = qemu.allocate(&spec()).await.unwrap_err();
    assert!(
        err.to_string().contains("kiln image build default"),
        "{err}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(runtime.path())
        .unwrap()
        .flatten()
        .collect();
    assert!(leftovers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_kernel_panic_fails_the_command_and_disk_mib_grows_the_root() {
    if support::skip_vm_tests() {
        return;
    }
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _guard = VM_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let qemu = provider(runtime.path(), Accel::Auto);
    let big = VmSpec {
        disk_mib: 12 * 1024,
        ..spec()
    };
    let vm = qemu.allocate(&big).await.expect("VM boots").vm;
    let id = vm.id().to_owned();
    let size_kib: u64 = sh(&*vm, "df --output=size -k / | tail -1")
        .await
        .parse()
        .unwrap();
    assert!(size_kib > 11 * 1024 * 1024, "root is {size_kib} KiB");

    // Crash the guest kernel while a command runs in it.
    let console = runtime.path().join(&id).join("console.log");
    let crash = run_err(
        &*vm,
        "sleep 0.3; echo c > /proc/sysrq-trigger; sleep 30",
        &console,
    )
    .await;
    assert!(crash.contains("the VM died"), "{crash}");
    assert!(
        crash.contains("Kernel panic") || crash.contains("sysrq"),
        "no panic in the console tail: {crash}"
    );
    vm.release().await.unwrap();
    assert_no_leak(runtime.path(), &[id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_quota_below_the_image_size_ends_writes_with_enospc() {
    if support::skip_vm_tests() {
        return;
    }
    let image = tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let image_mib = std::fs::metadata(image.rootfs()).unwrap().len() >> 20;
    let _guard = VM_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let qemu = provider(runtime.path(), Accel::Auto);
    let quota_mib: u64 = 1024;
    assert!(
        image_mib > quota_mib,
        "the test needs an image above {quota_mib} MiB"
    );
    let small = VmSpec {
        disk_mib: quota_mib as u32,
        ..spec()
    };
    let vm = qemu.allocate(&small).await.expect("VM boots").vm;
    let id = vm.id().to_owned();
    let avail_mib: u64 = sh(&*vm, "df --output=avail -m / | tail -1")
        .await
        .parse()
        .unwrap();
    assert!(
        avail_mib < quota_mib,
        "{avail_mib} MiB free with a {quota_mib} MiB quota"
    );

    // The runner user (whom steps run as) writes until the disk is full.
    let request = ExecRequest {
        command: Command::Argv(vec![
            "sh".into(),
            "-c".into(),
            "sudo -u runner dd if=/dev/zero of=/home/runner/work/fill bs=1M 2>&1; \
             echo dd-exit=$?; sync; stat -c size=%s /home/runner/work/fill"
                .into(),
        ]),
        env: Vec::new(),
        cwd: None,
        timeout: Some(Duration::from_secs(600)),
        user: kiln_vm::ExecUser::Runner,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let outcome = vm.exec(request, tx).await.expect("exec works");
    let mut out = String::new();
    while let Ok(chunk) = rx.try_recv() {
        out.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    assert!(outcome.status.success(), "{out}");
    assert!(out.contains("No space left on device"), "{out}");
    assert!(!out.contains("dd-exit=0"), "dd must fail: {out}");
    let written: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("size="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no size in {out}"));
    eprintln!("the guest wrote {} MiB before ENOSPC", written >> 20);
    assert!(
        written >> 20 >= avail_mib.saturating_sub(16) && written >> 20 < quota_mib,
        "wrote {} MiB with {avail_mib} MiB free",
        written >> 20
    );
    // Not even a careless `sudo rm` frees the reserve.
    let rm = run(
        &*vm,
        &[
            "sh",
            "-c",
            "sudo -u runner sudo rm -f /var/lib/kiln-disk-reserve",
        ],
    )
    .await;
    assert!(
        !rm.status.success(),
        "the reserve could be removed: {}",
        rm.stdout
    );
    // The host's writable layer holds what the guest wrote, not the image-sized reserve.
    let overlay = runtime.path().join(&id).join("disk.qcow2");
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&overlay).unwrap().blocks() * 512
    };
    eprintln!("overlay: {} MiB allocated", allocated >> 20);
    assert!(
        allocated >> 20 <= quota_mib,
        "overlay holds {} MiB with a {quota_mib} MiB quota",
        allocated >> 20
    );
    // Below what the image's own files take, the VM is refused with a clear reason.
    let tiny = VmSpec {
        disk_mib: 256,
        ..spec()
    };
    let Err(err) = qemu.allocate(&tiny).await else {
        panic!("a 256 MiB disk is less than the image's files: the VM must be refused");
    };
    assert!(err.to_string().contains("disk_mib = 256"), "{err}");
    vm.release().await.unwrap();
    assert_no_leak(runtime.path(), &[id]);
}

/// Runs `script` as root (it crashes the guest) and returns the error it ends with.
async fn run_err(vm: &dyn Vm, script: &str, console: &Path) -> String {
    let request = ExecRequest {
        command: Command::Argv(vec!["sh".into(), "-c".into(), script.into()]),
        env: Vec::new(),
        cwd: None,
        timeout: Some(Duration::from_secs(60)),
        user: kiln_vm::ExecUser::Root,
    };
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let result = tokio::time::timeout(Duration::from_secs(40), vm.exec(request, tx)).await;
    match result {
        Ok(Err(e)) => e.to_string(),
        other => {
            let log = std::fs::read_to_string(console).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "`{script}` did not kill the VM: {other:?}\nconsole:\n{}",
                tail.join("\n")
            )
        }
    }
}

async fn run_as_root(vm: &dyn Vm, script: &str) -> String {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let request = ExecRequest {
        command: Command::Argv(vec!["sh".into(), "-c".into(), script.into()]),
        env: Vec::new(),
        cwd: None,
        timeout: Some(Duration::from_secs(60)),
        user: kiln_vm::ExecUser::Root,
    };
    let outcome = vm.exec(request, tx).await.expect("exec works");
    let mut out = Vec::new();
    while let Ok(chunk) = rx.try_recv() {
        out.extend_from_slice(&chunk.data);
    }
    let out = String::from_utf8_lossy(&out).trim().to_owned();
    assert!(
        outcome.status.success(),
        "`{script}` as root: {} {out}",
        outcome.status
    );
    out
}

/// Steps run as `runner` (passwordless sudo) and can write everything kiln lays out for them;
/// root is there for kiln's own housekeeping; a VM restored from the ready snapshot is the
/// same; and terminals work through the agent (tty, size, resize, input, SIGINT, exit code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_as_runner_files_belong_to_it_and_terminals_work() {
    if support::skip_vm_tests() {
        return;
    }
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _guard = VM_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let qemu = provider(runtime.path(), Accel::Auto);
    let vm = qemu.allocate(&spec()).await.expect("VM boots").vm;
    let mut ids = vec![vm.id().to_owned()];
    let root = vm.work_root().to_owned();

    assert_eq!(
        sh(&*vm, "echo $(id -un) $(id -u) $HOME $USER $LOGNAME $(pwd)").await,
        format!("runner 1001 /home/runner runner runner {root}")
    );
    assert_eq!(sh(&*vm, "sudo -n id -u").await, "0");
    assert_eq!(
        run_as_root(&*vm, "echo $(id -un) $HOME").await,
        "root /root"
    );

    // What kiln writes into the guest belongs to runner, so steps can write to it.
    vm.write_file(&format!("{root}/new/deep/env"), b"A=1\n")
        .await
        .unwrap();
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("top.txt"), b"top\n").unwrap();
    std::fs::write(src.join("sub/deeper/data.bin"), [7u8; 1000]).unwrap();
    vm.copy_in(&src, &format!("{root}/ws")).await.unwrap();
    vm.write_file("/tmp/made-by-kiln/f", b"x").await.unwrap();
    assert_eq!(
        sh(
            &*vm,
            &format!("find {root} /tmp/made-by-kiln ! -user runner -o ! -group runner")
        )
        .await,
        "",
        "everything kiln created belongs to runner"
    );
    sh(
        &*vm,
        &format!(
            "echo B=2 >> {root}/new/deep/env && echo more > {root}/ws/sub/deeper/new && \
             touch {root}/ws/top.txt {root}/new/file"
        ),
    )
    .await;
    assert_eq!(
        vm.read_file(&format!("{root}/new/deep/env")).await.unwrap(),
        b"A=1\nB=2\n"
    );
    // A file root already owns keeps its owner when kiln rewrites it.
    run_as_root(&*vm, "echo old > /etc/kiln-owned").await;
    vm.write_file("/etc/kiln-owned", b"new").await.unwrap();
    assert_eq!(sh(&*vm, "stat -c %U /etc/kiln-owned").await, "root");

    // Terminals, through the agent.
    support::terminal::check_terminal(|request| vm.exec_pty(request)).await;
    let mut session = vm
        .exec_pty(support::terminal::sh_request(
            "echo user=$(id -un) cwd=$(pwd)",
        ))
        .await
        .unwrap();
    let mut seen = String::new();
    support::terminal::read_until(&mut session, "\n", &mut seen).await;
    assert!(
        seen.contains(&format!("user=runner cwd={root}")),
        "{seen:?}"
    );
    drop(session);
    vm.release().await.unwrap();

    // A VM restored from the ready snapshot (its agent greeted a second time) is the same.
    let snapshot = qemu
        .ready_snapshot(&spec())
        .await
        .expect("a ready snapshot");
    let restored = qemu.restore(&snapshot).await.expect("restores").vm;
    ids.push(restored.id().to_owned());
    assert_eq!(sh(&*restored, "id -un").await, "runner");
    assert_eq!(sh(&*restored, "stat -c %U .").await, "runner");
    restored
        .write_file(&format!("{root}/after-restore"), b"1")
        .await
        .unwrap();
    sh(&*restored, &format!("echo 2 >> {root}/after-restore")).await;
    let mut session = restored
        .exec_pty(support::terminal::sh_request("tty"))
        .await
        .unwrap();
    let mut seen = String::new();
    support::terminal::read_until(&mut session, "/dev/pts/", &mut seen).await;
    drop(session);
    restored.release().await.unwrap();
    assert_no_leak(runtime.path(), &ids);
}

/// Not a test on its own: the child process of `a_killed_kiln_leaks_no_qemu`. It allocates a VM,
/// reports it and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_killed_kiln_leaks_no_qemu in a child process"]
async fn orphan_helper() {
    let runtime =
        PathBuf::from(std::env::var_os("KILN_ORPHAN_RUNTIME").expect("run by the parent test"));
    let qemu = provider(&runtime, Accel::Auto);
    let allocation = qemu.allocate(&spec()).await.expect("VM boots");
    println!("READY {}", allocation.vm.id());
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_kiln_leaks_no_qemu() {
    if support::skip_vm_tests() {
        return;
    }
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _guard = VM_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "qemu_vm::orphan_helper",
            "--nocapture",
        ])
        .env("KILN_ORPHAN_RUNTIME", runtime.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let id = tokio::time::timeout(Duration::from_secs(180), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(id) = line.strip_prefix("READY ") {
                return id.to_owned();
            }
        }
        panic!("the helper ended without a VM");
    })
    .await
    .expect("the helper boots a VM");
    assert_eq!(processes_of(&id).len(), 1);
    // SIGKILL: no destructor, no release runs in the helper.
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_of(&id).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        processes_of(&id).is_empty(),
        "QEMU outlived the kiln process that started it"
    );
    assert!(
        runtime.path().join(&id).exists(),
        "the helper could not have removed its VM dir"
    );
    // The next provider on this runtime dir sweeps the orphaned directory.
    let _next = provider(runtime.path(), Accel::Auto);
    assert_no_leak(runtime.path(), &[id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_keep_the_vm_running_and_restore_each_moment_as_a_diff_chain() {
    if support::skip_vm_tests() {
        return;
    }
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _guard = VM_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let qemu = provider(runtime.path(), Accel::Auto);
    assert!(qemu.supports_checkpoints());
    let vm = qemu.allocate(&spec()).await.expect("boots").vm;
    let mut ids = vec![vm.id().to_owned()];

    // Disk (the work root) and memory (tmpfs) at three moments.
    let write = |n: &'static str| {
        format!(
            "echo disk-{n} > /home/runner/work/f && mkdir -p /dev/shm && echo mem-{n} > /dev/shm/m"
        )
    };
    let read = "cat /home/runner/work/f /dev/shm/m | tr '\\n' ' '";
    sh(&*vm, &write("one")).await;
    let one = vm
        .checkpoint(&saved.path().join("one"))
        .await
        .expect("checkpoint 1");
    assert_eq!(sh(&*vm, read).await, "disk-one mem-one", "the VM runs on");
    sh(&*vm, &write("two")).await;
    let two = vm
        .checkpoint(&saved.path().join("two"))
        .await
        .expect("checkpoint 2");
    sh(&*vm, &write("three")).await;
    // Each checkpoint's disk is a diff: small, whatever the image's size.
    for snapshot in [&one, &two] {
        let disk = std::fs::metadata(snapshot.dir.join("disk.qcow2"))
            .unwrap()
            .len();
        assert!(disk < 64 << 20, "{disk} bytes");
    }
    // A destination that exists is an error, and the VM goes on.
    let err = vm
        .checkpoint(&saved.path().join("two"))
        .await
        .expect_err("the destination exists");
    assert!(err.to_string().contains("creating"), "{err}");
    assert_eq!(sh(&*vm, read).await, "disk-three mem-three");

    let restored_one = qemu.restore(&one).await.expect("restore 1").vm;
    ids.push(restored_one.id().to_owned());
    assert_eq!(sh(&*restored_one, read).await, "disk-one mem-one");
    // Collecting checkpoint 1 removes its state but keeps the disk diff checkpoint 2 builds on.
    qemu.delete_snapshot(&one).await.unwrap();
    assert!(!one.dir.join("state").exists());
    assert!(one.dir.join("disk.qcow2").exists());
    let restored_two = qemu.restore(&two).await.expect("restore 2").vm;
    ids.push(restored_two.id().to_owned());
    assert_eq!(sh(&*restored_two, read).await, "disk-two mem-two");
    assert_eq!(sh(&*vm, read).await, "disk-three mem-three");
    for vm in [&vm, &restored_one, &restored_two] {
        qemu.release(&**vm).await.unwrap();
    }
    assert_no_leak(runtime.path(), &ids);
    // The local backend has no live snapshots, and says so.
    let local = LocalProvider::new(runtime.path().to_owned());
    assert!(!local.supports_checkpoints());
}
