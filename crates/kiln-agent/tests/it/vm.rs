//! The agent as PID 1 in a real QEMU microVM: a hand-made initramfs (the agent as `/init`, a few
//! virtio modules listed in *reverse* dependency order, so the retry loop is exercised) and a
//! tiny ext4 root disk holding a second copy of the agent.
//!
//! Needs QEMU, `cpio`, `mke2fs`, a static agent, and a Debian cloud kernel with its modules:
//! ```text
//! KILN_TEST_KERNEL=/path/vmlinuz KILN_TEST_MODULES=/path/dir-of-ko-files \
//! KILN_TEST_STATIC_AGENT=target/x86_64-unknown-linux-gnu/release/kiln-agent \
//!   cargo test -p kiln-agent --test it -- --ignored vm::
//! ```
//! The full image pipeline (kiln-vm's `image` and `qemu` modules) is tested there; this test
//! pins down the agent's own boot contract independently of it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kiln_vm::guest::{ConnectOptions, GuestClient};
use kiln_vm::{Command, ExecRequest, ExitStatus};
use tokio::sync::mpsc;

use crate::collect;

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(
        std::env::var_os(name).unwrap_or_else(|| panic!("{name} must be set for this test")),
    )
}

fn run(cmd: &mut std::process::Command) {
    let status = cmd.status().expect("runs");
    assert!(status.success(), "{cmd:?} failed: {status}");
}

fn build_initramfs(dir: &Path, agent: &Path, modules: &Path) -> PathBuf {
    let root = dir.join("initramfs");
    std::fs::create_dir_all(root.join("kiln/modules")).expect("mkdir");
    std::fs::create_dir_all(root.join("dev")).expect("mkdir");
    std::fs::copy(agent, root.join("init")).expect("copy agent");
    // Dependencies last: the agent must retry until everything loads.
    let order = [
        "virtio_console",
        "virtio_blk",
        "virtio_net",
        "net_failover",
        "failover",
        "virtio_mmio",
        "virtio",
        "virtio_ring",
    ];
    let mut list = String::new();
    for name in order {
        std::fs::copy(
            modules.join(format!("{name}.ko")),
            root.join(format!("kiln/modules/{name}.ko")),
        )
        .expect("copy module");
        list.push_str(&format!("/kiln/modules/{name}.ko\n"));
    }
    std::fs::write(root.join("kiln/modules.order"), list).expect("write order");
    run(std::process::Command::new("mknod")
        .arg(root.join("dev/console"))
        .args(["c", "5", "1"]));
    let image = dir.join("initramfs.cpio");
    run(std::process::Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
        root.display(),
        image.display()
    )));
    image
}

fn build_rootfs(dir: &Path, agent: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    std::fs::create_dir_all(root.join("etc")).expect("mkdir");
    std::fs::copy(agent, root.join("bin/agent")).expect("copy agent");
    std::fs::write(root.join("etc/hosts"), "127.0.0.1\tlocalhost\n").expect("hosts");
    let image = dir.join("root.ext4");
    run(std::process::Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("64M"));
    image
}

#[tokio::test]
#[ignore = "boots a VM: needs KILN_TEST_KERNEL, KILN_TEST_MODULES, KILN_TEST_STATIC_AGENT"]
async fn the_agent_boots_a_guest_as_pid1_and_powers_it_off() {
    let kernel = env_path("KILN_TEST_KERNEL");
    let modules = env_path("KILN_TEST_MODULES");
    let agent = env_path("KILN_TEST_STATIC_AGENT");
    let dir = tempfile::tempdir().expect("tempdir");
    let initramfs = build_initramfs(dir.path(), &agent, &modules);
    let rootfs = build_rootfs(dir.path(), &agent);
    let socket = dir.path().join("agent.sock");
    let console = dir.path().join("console.log");

    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=on",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initramfs)
        .args([
            "-append",
            "console=ttyS0 kiln.root=/dev/vda kiln.net=10.0.2.15/24,10.0.2.2,10.0.2.3 panic=-1 \
             tsc_early_khz=2000000 tsc=reliable no_timer_check",
        ])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none",
            rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .args([
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-device,netdev=net0",
        ])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            socket.display()
        ))
        .args(["-device", "virtio-serial-device"])
        .args(["-device", "virtserialport,chardev=agent,name=kiln.agent"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("qemu starts");

    let stream = loop {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(stream) => break stream,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let (read, write) = stream.into_split();
    let options = ConnectOptions {
        hostname: Some("kiln-guest".into()),
        hello_timeout: Duration::from_secs(120),
        ..ConnectOptions::new("vm-pid1")
    };
    let client = match GuestClient::connect_with(read, write, options).await {
        Ok(client) => client,
        Err(e) => panic!(
            "{e}\nconsole:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        ),
    };
    let info = client.agent_info().clone();
    assert!(info.pid1);
    assert_eq!(info.pid, 1);
    // This root has no /etc/passwd, so no `runner` user: commands fall back to root, and the
    // hello says so.
    assert_eq!(info.user.uid, 0);
    assert!(
        info.user_fallback
            .as_deref()
            .is_some_and(|r| r.contains("no `runner` user")),
        "{:?}",
        info.user_fallback
    );

    // Root switched to the ext4 disk; /proc etc. moved along.
    let mounts =
        String::from_utf8(client.read_file("/proc/mounts").await.expect("mounts")).expect("utf-8");
    assert!(mounts.contains("/dev/vda / ext4"), "{mounts}");
    for point in ["/proc", "/sys", "/dev", "/run", "/dev/pts", "/tmp"] {
        assert!(
            mounts
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(point)),
            "{point} missing from {mounts}"
        );
    }
    // The guest clock was set from the host's at hello time (microvm has no RTC).
    let stat =
        String::from_utf8(client.read_file("/proc/stat").await.expect("stat")).expect("utf-8");
    let boot_time: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .expect("btime");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    assert!(
        now.abs_diff(boot_time) < 600,
        "guest boot time {boot_time}, host now {now}"
    );
    // Hostname applied and made resolvable.
    assert_eq!(
        client
            .read_file("/proc/sys/kernel/hostname")
            .await
            .expect("read"),
        b"kiln-guest\n"
    );
    let hosts =
        String::from_utf8(client.read_file("/etc/hosts").await.expect("read")).expect("utf-8");
    assert!(hosts.contains("kiln-guest"), "{hosts}");
    // Network: an address on the NIC and a resolver.
    let route =
        String::from_utf8(client.read_file("/proc/net/route").await.expect("read")).expect("utf-8");
    assert!(
        route
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("00000000")),
        "no default route: {route}"
    );
    assert_eq!(
        client.read_file("/etc/resolv.conf").await.expect("read"),
        b"nameserver 10.0.2.3\n"
    );

    // Exec from the new root, with a real exit code.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let request = ExecRequest {
        command: Command::Argv(vec!["/bin/agent".into(), "--version".into()]),
        env: Vec::new(),
        cwd: Some("/".into()),
        timeout: None,
        user: kiln_vm::ExecUser::Runner,
    };
    let outcome = client.exec(request, tx).await.expect("exec");
    assert!(outcome.status.success());
    assert!(collect(&mut rx).0.starts_with("kiln-agent "));
    let (tx, _rx) = mpsc::unbounded_channel();
    let request = ExecRequest {
        command: Command::Argv(vec!["/bin/agent".into()]),
        env: Vec::new(),
        cwd: None,
        timeout: None,
        user: kiln_vm::ExecUser::Runner,
    };
    assert_eq!(
        client.exec(request, tx).await.expect("exec").status,
        ExitStatus::Exited(2)
    );

    // Round-trip figures under TCG (printed with --nocapture).
    let mut samples = Vec::new();
    for _ in 0..30 {
        let (tx, _rx) = mpsc::unbounded_channel();
        let request = ExecRequest {
            command: Command::Argv(vec!["/bin/agent".into(), "--version".into()]),
            env: Vec::new(),
            cwd: None,
            timeout: None,
            user: kiln_vm::ExecUser::Runner,
        };
        let outcome = client.exec(request, tx).await.expect("exec");
        assert!(outcome.status.success());
        samples.push(outcome.duration);
    }
    crate::bench::report("TCG guest: exec of the static agent (--version)", samples);
    let mut pings = Vec::new();
    for _ in 0..30 {
        pings.push(client.ping().await.expect("pong"));
    }
    crate::bench::report("TCG guest: ping", pings);

    // Files round-trip through the guest's tmpfs.
    client
        .write_file("/tmp/x/y.txt", b"inside the guest")
        .await
        .expect("write");
    assert_eq!(
        client.read_file("/tmp/x/y.txt").await.expect("read"),
        b"inside the guest"
    );

    // Shutdown powers the VM off: QEMU exits by itself.
    client.shutdown().await.expect("shutdown");
    let status = tokio::time::timeout(Duration::from_secs(60), qemu.wait())
        .await
        .expect("QEMU exits after the guest powers off")
        .expect("waits");
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(log.contains("switched to the root filesystem"), "{log}");
    assert!(!log.contains("cannot load module"), "{log}");
}
