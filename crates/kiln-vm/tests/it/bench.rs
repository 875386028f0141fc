//! Figures for the QEMU backend, run on demand (they boot several VMs):
//! `cargo test -p kiln-vm --test it bench -- --ignored --nocapture`.
//!
//! Prints cold allocation (spawn to agent ready) p50/p95, the exec round trip of `true` through
//! the agent p50/p99 against spawning `true` on the host, and QEMU's resident memory per idle VM
//! beside what the guest itself uses, naming the accelerator.

use std::time::{Duration, Instant};

use kiln_vm::qemu::{QemuConfig, QemuProvider};
use kiln_vm::{Command, ExecRequest, VmProvider, VmSpec};

use crate::support;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored"]
async fn bench_qemu_allocation_exec_and_memory() {
    tokio::task::spawn_blocking(support::default_image)
        .await
        .unwrap();
    let runtime = tempfile::tempdir().unwrap();
    let config = QemuConfig::new(runtime.path().to_owned(), support::data_dir());
    let qemu = QemuProvider::new(config).unwrap();
    let spec = VmSpec {
        vcpus: 2,
        memory_mib: 1024,
        ..VmSpec::default()
    };
    let (accel, why) = qemu.resolve_accel(&spec).await.unwrap();
    let boots: usize = std::env::var("KILN_BENCH_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut cold = Vec::new();
    for _ in 0..boots {
        let allocation = qemu.allocate(&spec).await.unwrap();
        cold.push(allocation.elapsed);
        allocation.vm.release().await.unwrap();
    }
    cold.sort();
    println!(
        "accelerator {accel} ({why})\ncold allocation over {boots} boots: p50 {:?} p95 {:?}",
        percentile(&cold, 0.5),
        percentile(&cold, 0.95)
    );

    let vm = qemu.allocate(&spec).await.unwrap().vm;
    let request = || ExecRequest {
        command: Command::Argv(vec!["true".into()]),
        env: Vec::new(),
        cwd: None,
        timeout: None,
        user: kiln_vm::ExecUser::Runner,
    };
    let mut guest = Vec::new();
    for _ in 0..200 {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let t = Instant::now();
        vm.exec(request(), tx).await.unwrap();
        guest.push(t.elapsed());
    }
    let mut host = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        tokio::process::Command::new("true").status().await.unwrap();
        host.push(t.elapsed());
    }
    guest.sort();
    host.sort();
    println!(
        "exec `true` round trip over 200 runs: guest p50 {:?} p99 {:?}; host spawn p50 {:?} p99 {:?}",
        percentile(&guest, 0.5),
        percentile(&guest, 0.99),
        percentile(&host, 0.5),
        percentile(&host, 0.99)
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let meminfo = String::from_utf8(vm.read_file("/proc/meminfo").await.unwrap()).unwrap();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let guest_used = field("MemTotal:") - field("MemFree:");
    let mut rss: u64 = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(vm.id()) {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            rss = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    println!(
        "idle VM: QEMU RSS {} MiB, guest in use {} MiB, beyond the guest's use {} MiB ({} MiB guest RAM)",
        rss / 1024,
        guest_used / 1024,
        rss.saturating_sub(guest_used) / 1024,
        spec.memory_mib
    );
    assert!(rss > 0, "QEMU's resident memory was not found");
    vm.release().await.unwrap();
}
