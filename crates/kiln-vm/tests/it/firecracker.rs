//! The Firecracker backend against real Firecracker, in three tiers:
//!
//! 1. **Always** (CI has no Firecracker): a missing binary, and a "firecracker" that dies at
//!    once, give clear errors and leave nothing behind.
//! 2. **API level**, `#[ignore = "needs KILN_FIRECRACKER_BIN"]`: a real `firecracker` binary
//!    configures and starts a VM, serves pause/resume, writes full and diff snapshots that load
//!    in fresh processes, creates its vsock socket, reports a crash, and release (or the sweep
//!    after a dead kiln) leaves nothing. These need no guest to boot, so they run on hosts whose
//!    KVM cannot run the guest. `scripts/test` runs them with `--ignored` when
//!    `KILN_FIRECRACKER_BIN` is set.
//!    The jailer test also needs `KILN_JAILER_BIN`, root, and a statically linked Firecracker
//!    (the release binaries are; the jailer's chroot has no libc).
//! 3. **Guest level**, ignored unless the host's KVM boots guests too
//!    (`KILN_FIRECRACKER_KVM=1`, which `scripts/test` passes on): the backend conformance suite,
//!    the agent over vsock, the overlay root, and a snapshot restored into a working VM.
//!
//! Ignored tests show up as skipped in the test summary, with the reason; a skip never counts
//! as a pass. Run by hand with `--ignored` but without the binary, they fail saying what is
//! missing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_vm::firecracker::{FirecrackerConfig, FirecrackerProvider, vsock};
use kiln_vm::{BackendConfig, BackendKind, VmError, VmProvider, VmSpec, select_backend};

use crate::support;

static FC_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn spec() -> VmSpec {
    VmSpec {
        vcpus: 1,
        memory_mib: 256,
        disk_mib: 1024,
        ..VmSpec::default()
    }
}

fn binary() -> PathBuf {
    match std::env::var_os("KILN_FIRECRACKER_BIN") {
        Some(path) => PathBuf::from(path),
        None => panic!(
            "KILN_FIRECRACKER_BIN is not set: this test needs a firecracker binary \
             (see the README's \"Production hosts\")"
        ),
    }
}

fn config(runtime: &Path, binary: PathBuf, timeout: Duration) -> FirecrackerConfig {
    let mut config = FirecrackerConfig::new(runtime.to_owned(), support::data_dir());
    config.binary = binary;
    config.boot_timeout = timeout;
    config
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        !s.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    })
}

/// Processes whose command line names `id` (Firecracker runs with `--id <id>`).
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
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && cmdline.split(|&b| b == 0).any(|a| a == id.as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

fn assert_empty(runtime: &Path) {
    let left: Vec<_> = std::fs::read_dir(runtime)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

// ---- tier 1: always ----

#[tokio::test]
async fn a_missing_binary_is_unavailable_and_named() {
    let runtime = tempfile::tempdir().unwrap();
    let mut config = BackendConfig::new(runtime.path().to_owned(), support::data_dir());
    config.firecracker_binary = "/nonexistent/firecracker".into();
    let err = select_backend(BackendKind::Firecracker, &config)
        .await
        .unwrap_err();
    assert!(matches!(err, VmError::Unavailable { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/firecracker"),
        "{err}"
    );
    assert_empty(runtime.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firecracker_that_dies_at_once_is_a_boot_error_and_leaves_nothing() {
    if support::skip_vm_tests() {
        return;
    }
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let bin = tempfile::tempdir().unwrap();
    let fake = bin.path().join("firecracker");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'Error: cannot open /dev/kvm (stand-in that always fails)' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &fake,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
    )
    .unwrap();
    let runtime = tempfile::tempdir().unwrap();
    let provider =
        match FirecrackerProvider::new(config(runtime.path(), fake, Duration::from_secs(20))) {
            Ok(p) => p,
            Err(e) => panic!("the provider needs /dev/kvm and mke2fs here: {e}"),
        };
    let err = provider.allocate(&spec()).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, VmError::Boot { .. }), "{text}");
    assert!(text.contains("Firecracker exited"), "{text}");
    assert!(text.contains("stand-in that always fails"), "{text}");
    assert!(text.contains("guest console"), "{text}");
    assert_empty(runtime.path());
}

// ---- tier 2: API level, needs the binary ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KILN_FIRECRACKER_BIN"]
async fn api_configure_start_console_pause_resume_vsock_and_release() {
    let binary = binary();
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _lock = FC_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let provider = FirecrackerProvider::new(config(
        runtime.path(),
        binary.clone(),
        Duration::from_secs(60),
    ))
    .unwrap();
    let version = kiln_vm::firecracker::version(&binary).await.unwrap();
    assert!(version.starts_with("Firecracker v"), "{version}");

    let machine = provider
        .start(&spec())
        .await
        .expect("configured and started");
    let info = machine.describe().await.unwrap();
    assert_eq!(info.id, machine.id());
    assert_eq!(info.state, "Running");
    assert!(
        version.contains(&info.vmm_version),
        "{version} vs {}",
        info.vmm_version
    );
    // The serial console is captured into the per-VM directory (on hosts whose KVM cannot run
    // the guest it may stay empty: Debian's kernel prints nothing there before it stops).
    assert!(machine.dir().join("console.log").is_file());
    // The vsock device's proxy socket is there and speaks the CONNECT protocol: a port nobody
    // listens on is refused (or unanswered by a guest that is not running its kernel).
    assert!(machine.vsock_path().exists());
    let err = vsock::connect(&machine.vsock_path(), 4321)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::ConnectionReset
        ),
        "{err}"
    );
    machine.pause().await.unwrap();
    assert_eq!(machine.describe().await.unwrap().state, "Paused");
    machine.resume().await.unwrap();
    assert_eq!(machine.describe().await.unwrap().state, "Running");

    let pid = machine.pid().unwrap();
    let id = machine.id().to_owned();
    machine.release().await.unwrap();
    machine.release().await.unwrap();
    assert!(!alive(pid), "Firecracker {pid} survived release");
    assert!(processes_of(&id).is_empty());
    assert_empty(runtime.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KILN_FIRECRACKER_BIN"]
async fn api_full_and_diff_snapshots_load_in_fresh_processes() {
    let binary = binary();
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _lock = FC_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let snapshots = tempfile::tempdir().unwrap();
    let provider =
        FirecrackerProvider::new(config(runtime.path(), binary, Duration::from_secs(60))).unwrap();
    let spec = spec();

    let first = provider.start(&spec).await.unwrap();
    assert!(!first.saves_diff(), "a cold VM writes a full snapshot");
    let full = first.save(&snapshots.path().join("full")).await.unwrap();
    first.release().await.unwrap();
    let memory = std::fs::metadata(full.dir.join("memory")).unwrap().len();
    assert_eq!(memory, u64::from(spec.memory_mib) << 20);
    assert!(full.dir.join("vmstate").is_file());
    assert!(full.dir.join("scratch.ext4").is_file());
    assert_eq!(full.spec, spec);

    // Load into a fresh process and resume.
    let second = provider.load(&full).await.expect("the full snapshot loads");
    assert_eq!(second.describe().await.unwrap().state, "Running");
    assert_ne!(second.id(), "");
    // A restored VM writes a diff snapshot, merged onto the memory it came from.
    assert!(second.saves_diff());
    let diff = second.save(&snapshots.path().join("diff")).await.unwrap();
    second.release().await.unwrap();
    assert_eq!(
        std::fs::metadata(diff.dir.join("memory")).unwrap().len(),
        memory
    );
    let third = provider.load(&diff).await.expect("the diff snapshot loads");
    assert_eq!(third.describe().await.unwrap().state, "Running");
    third.pause().await.unwrap();
    third.resume().await.unwrap();
    third.release().await.unwrap();

    // The snapshots survive their VMs; deleting them is the provider's job.
    provider.delete_snapshot(&full).await.unwrap();
    provider.delete_snapshot(&diff).await.unwrap();
    provider.delete_snapshot(&diff).await.unwrap();
    assert!(!full.dir.exists() && !diff.dir.exists());
    assert_empty(runtime.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KILN_FIRECRACKER_BIN"]
async fn api_a_refused_call_is_named_and_leaves_nothing() {
    let binary = binary();
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _lock = FC_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let provider =
        FirecrackerProvider::new(config(runtime.path(), binary, Duration::from_secs(60))).unwrap();
    // A snapshot whose state file is damaged: Firecracker refuses the load, and the error
    // names the call and carries Firecracker's fault message.
    let snapshots = tempfile::tempdir().unwrap();
    let machine = provider.start(&spec()).await.unwrap();
    let snapshot = machine.save(&snapshots.path().join("s")).await.unwrap();
    machine.release().await.unwrap();
    std::fs::write(snapshot.dir.join("vmstate"), b"not a microVM state").unwrap();
    let err = provider.load(&snapshot).await.unwrap_err();
    let text = err.to_string();
    eprintln!("{text}");
    assert!(matches!(err, VmError::Boot { .. }), "{text}");
    assert!(
        text.contains("Firecracker refused PUT /snapshot/load (HTTP 400): "),
        "{text}"
    );
    assert_empty(runtime.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KILN_FIRECRACKER_BIN"]
async fn api_a_crash_is_noticed_and_release_leaves_nothing() {
    let binary = binary();
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _lock = FC_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let provider =
        FirecrackerProvider::new(config(runtime.path(), binary, Duration::from_secs(60))).unwrap();
    let machine = provider.start(&spec()).await.unwrap();
    let pid = machine.pid().unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), machine.exited())
        .await
        .expect("the death is noticed");
    assert!(status.contains("signal: 9"), "{status}");
    assert!(machine.pid().is_none());
    machine.release().await.unwrap();
    assert_empty(runtime.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KILN_FIRECRACKER_BIN"]
async fn api_vms_of_a_dead_kiln_are_reaped_by_the_next() {
    let binary = binary();
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _lock = FC_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let fc_config = config(runtime.path(), binary, Duration::from_secs(60));
    let provider = FirecrackerProvider::new(fc_config.clone()).unwrap();
    let machine = provider.start(&spec()).await.unwrap();
    let (pid, dir, id) = (
        machine.pid().unwrap(),
        machine.dir().to_owned(),
        machine.id().to_owned(),
    );
    // As if kiln had been SIGKILLed: nothing ran the release, and the owner pid is dead.
    std::mem::forget(machine);
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(dir.join("owner"), dead.to_string()).unwrap();
    assert!(alive(pid));
    FirecrackerProvider::new(fc_config).unwrap();
    support::wait_until("the orphan to die", Duration::from_secs(10), || !alive(pid));
    assert!(processes_of(&id).is_empty());
    assert_empty(runtime.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KILN_FIRECRACKER_BIN"]
async fn api_allocation_either_boots_or_fails_with_the_console_and_leaves_nothing() {
    let binary = binary();
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _lock = FC_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let provider =
        FirecrackerProvider::new(config(runtime.path(), binary, Duration::from_secs(15))).unwrap();
    match provider.allocate(&spec()).await {
        Err(err) => {
            // Hosts whose KVM cannot run the guest: the boot timeout (or the guest's death)
            // is a boot error carrying the kernel's console output.
            let text = err.to_string();
            eprintln!("allocation failed as expected on a host without a usable KVM:\n{text}");
            assert!(matches!(err, VmError::Boot { .. }), "{text}");
            assert!(
                text.contains("--- guest console (last lines) ---"),
                "{text}"
            );
        }
        Ok(allocation) => {
            // Hosts whose KVM works: a VM with its agent, released without a trace.
            let out = crate::conformance::sh(&*allocation.vm, "cat /proc/1/comm").await;
            assert!(!out.is_empty());
            provider.release(&*allocation.vm).await.unwrap();
        }
    }
    assert_empty(runtime.path());
}

// ---- tier 3: guest level, needs the binary and a KVM that boots guests ----

async fn guest_provider(runtime: &Path) -> FirecrackerProvider {
    let binary = binary();
    assert!(
        std::env::var("KILN_FIRECRACKER_KVM").is_ok_and(|v| v == "1"),
        "KILN_FIRECRACKER_KVM=1 is not set: the guest-level tests need a KVM host that boots \
         guests (check with `kiln doctor`)"
    );
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let provider =
        FirecrackerProvider::new(config(runtime, binary, Duration::from_secs(60))).unwrap();
    let (works, why) = provider.kvm_probe(&spec()).await.unwrap();
    assert!(works, "KVM does not boot Firecracker guests here: {why}");
    provider
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KILN_FIRECRACKER_BIN and a KVM host that boots guests (KILN_FIRECRACKER_KVM=1)"]
async fn guest_firecracker_backend_conforms() {
    let _lock = FC_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let provider = guest_provider(runtime.path()).await;
    crate::conformance::suite(&provider, &spec(), runtime.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KILN_FIRECRACKER_BIN and a KVM host that boots guests (KILN_FIRECRACKER_KVM=1)"]
async fn guest_agent_over_vsock_overlay_root_and_snapshot_restore() {
    let _lock = FC_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let provider = guest_provider(runtime.path()).await;
    let image = support::default_image();
    let base_before = std::fs::read(image.rootfs()).unwrap().len();
    let a = provider.allocate(&spec()).await.unwrap();
    let sh = crate::conformance::sh;
    // The root is an overlay over the read-only base; writes land on the scratch disk.
    let root = sh(&*a.vm, "grep ' / ' /proc/mounts").await;
    assert!(root.contains("overlay"), "{root}");
    // Steps run as runner; writing /etc takes its passwordless sudo.
    sh(
        &*a.vm,
        "echo a | sudo -n tee /etc/kiln-mark >/dev/null && sync",
    )
    .await;
    assert_eq!(sh(&*a.vm, "uname -r").await, image.manifest.kernel_version);
    // Terminals through the agent over vsock, as on QEMU.
    support::terminal::check_terminal(|request| a.vm.exec_pty(request)).await;
    assert_eq!(sh(&*a.vm, "hostname").await, a.vm.id());
    // A checkpoint keeps the VM running; what it wrote after is not in the checkpoint.
    let checkpoints = tempfile::tempdir().unwrap();
    let checkpoint =
        a.vm.checkpoint(&checkpoints.path().join("c"))
            .await
            .unwrap();
    sh(
        &*a.vm,
        "echo later | sudo -n tee /etc/kiln-later >/dev/null && sync",
    )
    .await;
    let from_checkpoint = provider.restore(&checkpoint).await.unwrap();
    assert_eq!(sh(&*from_checkpoint.vm, "cat /etc/kiln-mark").await, "a");
    assert_eq!(
        sh(
            &*from_checkpoint.vm,
            "cat /etc/kiln-later 2>/dev/null || echo none"
        )
        .await,
        "none"
    );
    provider.release(&*from_checkpoint.vm).await.unwrap();
    provider.delete_snapshot(&checkpoint).await.unwrap();
    // Snapshot and restore: the restored VM has the file, a new identity, and works.
    let snapshots = tempfile::tempdir().unwrap();
    let snap = a.vm.snapshot(&snapshots.path().join("s")).await.unwrap();
    provider.release(&*a.vm).await.unwrap();
    let b = provider.restore(&snap).await.unwrap();
    assert_eq!(sh(&*b.vm, "cat /etc/kiln-mark").await, "a");
    assert_eq!(sh(&*b.vm, "hostname").await, b.vm.id());
    let c = provider.allocate(&spec()).await.unwrap();
    assert_eq!(
        sh(&*c.vm, "cat /etc/kiln-mark 2>/dev/null || echo none").await,
        "none"
    );
    provider.release(&*b.vm).await.unwrap();
    provider.release(&*c.vm).await.unwrap();
    provider.delete_snapshot(&snap).await.unwrap();
    assert_eq!(std::fs::read(image.rootfs()).unwrap().len(), base_before);
    assert_empty(runtime.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KILN_FIRECRACKER_BIN (static) and KILN_JAILER_BIN, as root"]
async fn jailer_a_jailed_vm_runs_in_its_chroot_and_release_removes_the_jail() {
    let binary = binary();
    let jailer = std::env::var_os("KILN_JAILER_BIN")
        .map(PathBuf::from)
        .expect("KILN_JAILER_BIN is not set: this test needs Firecracker's jailer binary");
    assert!(
        rustix::process::geteuid().is_root(),
        "the jailer needs root"
    );
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _lock = FC_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    // Hard links into the chroot need it on the data dir's file system.
    let jails = tempfile::tempdir_in(support::data_dir()).unwrap();
    let mut fc_config = config(runtime.path(), binary, Duration::from_secs(60));
    let mut jail = kiln_vm::firecracker::JailerConfig::new(jailer);
    jail.chroot_base = jails.path().to_owned();
    fc_config.jailer = Some(jail);
    let provider = FirecrackerProvider::new(fc_config).unwrap();
    let machine = provider.start(&spec()).await.expect("a jailed VM starts");
    assert_eq!(machine.describe().await.unwrap().state, "Running");
    let id = machine.id().to_owned();
    let root = jails.path().join("firecracker").join(&id).join("root");
    assert!(
        root.join("api.sock").exists(),
        "the API socket is in the chroot"
    );
    assert!(root.join("vmlinux").is_file());
    let pid = machine.pid().unwrap();
    // Firecracker runs as the jail's user, in the VM's own cgroup.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_owned();
    assert!(uid.contains("65534"), "{uid}");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&format!("firecracker/{id}")), "{cgroup}");
    // Snapshots work from inside the chroot too, and load into a new jail.
    let snapshot = machine
        .save(&jails.path().join("snapshot"))
        .await
        .expect("a jailed VM saves");
    machine.release().await.unwrap();
    let restored = provider.load(&snapshot).await.expect("a jailed VM loads");
    assert_eq!(restored.describe().await.unwrap().state, "Running");
    let restored_id = restored.id().to_owned();
    restored.release().await.unwrap();
    assert!(!jails.path().join("firecracker").join(&restored_id).exists());
    assert!(!alive(pid));
    assert!(!jails.path().join("firecracker").join(&id).exists());
    for cgroup in ["firecracker", "memory/firecracker", "cpu/firecracker"] {
        assert!(!Path::new("/sys/fs/cgroup").join(cgroup).join(&id).exists());
    }
    assert_empty(runtime.path());
}

/// The host's TSC frequency in kHz (a TCG guest on microvm needs it; see the QEMU backend).
fn host_tsc_khz() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86_64.
    let read = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (std::time::Instant::now(), read());
    std::thread::sleep(Duration::from_millis(50));
    let (t1, c1) = (std::time::Instant::now(), read());
    c1.wrapping_sub(c0).saturating_mul(1_000_000) / (t1 - t0).as_nanos().max(1) as u64
}

/// Firecracker's writable root — the image's base disk read-only, a scratch disk made by the
/// backend, and the init's overlayfs (`kiln.overlay=`) — checked in a real guest. Firecracker
/// cannot boot guests on hosts whose KVM cannot run them, so QEMU (TCG there) boots the same
/// image, initramfs and disks here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overlay_root_writes_only_the_scratch_disk() {
    if support::skip_vm_tests() {
        return;
    }
    let image = tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch.ext4");
    kiln_vm::firecracker::make_scratch("overlay-test", &scratch, 256)
        .await
        .unwrap();
    let base_before = std::fs::metadata(image.rootfs())
        .unwrap()
        .modified()
        .unwrap();
    let khz = host_tsc_khz();
    let agent_sock = dir.path().join("agent.sock");
    let console = dir.path().join("console.log");
    let cmdline = format!(
        "console=ttyS0 kiln.root=/dev/vda kiln.overlay=/dev/vdb panic=-1 reboot=t \
         8250.nr_uarts=1 i8042.noaux i8042.nokbd tsc_early_khz={khz} tsc=reliable \
         no_timer_check lpj={}",
        khz * 1000 / 250
    );
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=on,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=on",
            "-accel",
            "tcg,thread=multi,tb-size=128",
            "-cpu",
            "max",
            "-m",
            "512M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(image.kernel())
        .arg("-initrd")
        .arg(image.initramfs())
        .args(["-append", &cmdline])
        .arg("-chardev")
        .arg(format!("file,id=console,path={}", console.display()))
        .args(["-serial", "chardev:console"])
        .arg("-drive")
        .arg(format!(
            "id=base,file={},format=raw,if=none,readonly=on",
            image.rootfs().display()
        ))
        .args(["-device", "virtio-blk-device,drive=base"])
        .arg("-drive")
        .arg(format!(
            "id=scratch,file={},format=raw,if=none",
            scratch.display()
        ))
        .args(["-device", "virtio-blk-device,drive=scratch"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            agent_sock.display()
        ))
        .args(["-device", "virtio-serial-device"])
        .args(["-device", "virtserialport,chardev=agent,name=kiln.agent"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-system-x86_64 runs");
    support::wait_until("the agent socket", Duration::from_secs(30), || {
        agent_sock.exists()
    });
    let stream = tokio::net::UnixStream::connect(&agent_sock).await.unwrap();
    let (reader, writer) = stream.into_split();
    let mut options = kiln_vm::guest::ConnectOptions::new("overlay-test");
    options.hello_timeout = Duration::from_secs(180);
    let client = match kiln_vm::guest::GuestClient::connect_with(reader, writer, options).await {
        Ok(client) => client,
        Err(e) => panic!(
            "the guest did not come up: {e}\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        ),
    };
    let sh = |script: &'static str| {
        let request = kiln_vm::ExecRequest {
            command: kiln_vm::Command::Argv(vec!["sh".into(), "-c".into(), script.into()]),
            env: Vec::new(),
            cwd: Some("/".into()),
            timeout: Some(Duration::from_secs(60)),
            // These checks write all over the root filesystem, as only root can.
            user: kiln_vm::ExecUser::Root,
        };
        let client = &client;
        async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let outcome = client.exec(request, tx).await.unwrap();
            let mut out = String::new();
            while let Ok(chunk) = rx.try_recv() {
                out.push_str(&String::from_utf8_lossy(&chunk.data));
            }
            assert!(
                outcome.status.success(),
                "{script}: {}: {out}",
                outcome.status
            );
            out.trim().to_owned()
        }
    };
    let root = sh("grep ' / ' /proc/mounts").await;
    assert!(root.starts_with("overlay / overlay"), "{root}");
    sh("echo from-the-guest > /etc/kiln-mark && mkdir -p /home/runner/work && sync").await;
    assert_eq!(sh("cat /etc/kiln-mark").await, "from-the-guest");
    // The base's files are there (read through the overlay), and stay unwritten.
    assert!(sh("cat /etc/os-release").await.contains("Debian"));
    let _ = client.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(20), qemu.wait()).await;
    let _ = qemu.kill().await;
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        text.contains("no network"),
        "the guest says it has no network: {text}"
    );
    // The write landed in the scratch disk's upper layer, not in the base.
    let debugfs = |fs: &Path, request: &str| {
        let out = std::process::Command::new("debugfs")
            .args(["-R", request])
            .arg(fs)
            .output()
            .expect("debugfs runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        debugfs(&scratch, "cat /upper/etc/kiln-mark"),
        "from-the-guest"
    );
    assert_eq!(debugfs(&image.rootfs(), "cat /etc/kiln-mark"), "");
    assert_eq!(
        std::fs::metadata(image.rootfs())
            .unwrap()
            .modified()
            .unwrap(),
        base_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KILN_FIRECRACKER_BIN"]
async fn api_auto_picks_firecracker_exactly_when_its_probe_boot_works() {
    let binary = binary();
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _lock = FC_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let mut config = BackendConfig::new(runtime.path().to_owned(), support::data_dir());
    config.firecracker_binary = binary.clone();
    let auto = select_backend(BackendKind::Auto, &config).await.unwrap();
    // The verdict auto used is cached: asking the provider again gives it without a boot.
    let provider = FirecrackerProvider::new(config.firecracker()).unwrap();
    let (works, why) = provider.kvm_probe(&VmSpec::default()).await.unwrap();
    eprintln!(
        "auto: {} ({}); probe: {works} ({why})",
        auto.provider.name(),
        auto.reason
    );
    assert_eq!(
        auto.provider.name() == "firecracker",
        works,
        "{}",
        auto.reason
    );
    assert!(support::data_dir().join("firecracker-kvm.json").is_file());
    assert_empty(runtime.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs KILN_FIRECRACKER_BIN"]
async fn api_checkpoints_keep_the_vm_running_and_each_loads_on_its_own() {
    let binary = binary();
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let _lock = FC_LOCK.lock().await;
    let runtime = tempfile::tempdir().unwrap();
    let snapshots = tempfile::tempdir().unwrap();
    let provider =
        FirecrackerProvider::new(config(runtime.path(), binary, Duration::from_secs(60))).unwrap();
    assert!(provider.supports_checkpoints());
    let machine = provider.start(&spec()).await.unwrap();
    let first = machine
        .checkpoint(&snapshots.path().join("1"))
        .await
        .unwrap();
    assert_eq!(machine.describe().await.unwrap().state, "Running");
    // The second is a diff against the first, merged into a whole memory file.
    assert!(machine.saves_diff());
    let second = machine
        .checkpoint(&snapshots.path().join("2"))
        .await
        .unwrap();
    assert_eq!(machine.describe().await.unwrap().state, "Running");
    assert!(
        machine.dir().join("scratch.ext4").is_file(),
        "the VM keeps its disk"
    );
    machine.release().await.unwrap();
    // Deleting the first does not break the second.
    provider.delete_snapshot(&first).await.unwrap();
    let loaded = provider
        .load(&second)
        .await
        .expect("the second checkpoint loads");
    assert_eq!(loaded.describe().await.unwrap().state, "Running");
    loaded.release().await.unwrap();
    provider.delete_snapshot(&second).await.unwrap();
    assert_empty(runtime.path());
}
