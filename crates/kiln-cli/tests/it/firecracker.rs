//! `kiln run --backend firecracker` end to end, with a real `firecracker` binary
//! (`KILN_FIRECRACKER_BIN`; ignored without it, see `scripts/test`).

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// On a host whose KVM cannot run the guest, the run fails as an infrastructure error (exit 3)
/// after the boot timeout, the error carries the guest console, and no Firecracker process or
/// per-VM file is left. On a host whose KVM works, the run succeeds.
#[test]
#[ignore = "needs KILN_FIRECRACKER_BIN"]
fn a_run_on_firecracker_boots_or_fails_with_exit_3_and_leaves_nothing() {
    let binary = std::env::var_os("KILN_FIRECRACKER_BIN")
        .map(PathBuf::from)
        .expect("KILN_FIRECRACKER_BIN is not set: this test needs a firecracker binary");
    let image = kiln_test_support::default_image();
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "[runner]\nboot_timeout_seconds = 10\n\n[firecracker]\nbinary = \"{}\"\n",
            binary.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("ok.yml"),
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo hi\n",
    )
    .unwrap();
    let data = image.dir.parent().and_then(|p| p.parent()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir.path())
        .args(["run", "ok.yml", "--backend", "firecracker", "--cold"])
        .env("KILN_RUNTIME_DIR", &runtime)
        .env("KILN_DATA_DIR", data)
        .env("NO_COLOR", "1")
        .env_remove("KILN_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    match out.status.code() {
        Some(3) => {
            assert!(stderr.contains("guest console"), "{stderr}");
            assert!(stderr.contains("boot timeout"), "{stderr}");
        }
        Some(0) => {}
        other => panic!("unexpected exit {other:?}: {stderr}"),
    }
    let left: Vec<_> = std::fs::read_dir(&runtime)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    // Firecracker runs with `--id fc-...`; none may survive the run.
    let procs = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| {
            let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
            args.first()
                .is_some_and(|a| a.ends_with(binary.as_os_str().as_encoded_bytes()))
        })
        .count();
    assert_eq!(procs, 0, "a Firecracker process survived");
}

/// `[firecracker]` is checked like every section: unknown keys and jail settings without a
/// jailer are usage errors (exit 2) naming the section, before anything starts.
#[test]
fn bad_firecracker_settings_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ok.yml"),
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo hi\n",
    )
    .unwrap();
    for (config, expected) in [
        (
            "[firecracker]\nuid = 5\n",
            "[firecracker] uid, gid and chroot_base_dir only apply with a jailer",
        ),
        (
            "[firecracker]\nnetwork = \"tap\"\n",
            "unknown field `network`",
        ),
        (
            "[firecracker]\njailer = \"/usr/bin/jailer\"\nchroot_base_dir = \"jails\"\n",
            "[firecracker] chroot_base_dir must be an absolute path",
        ),
    ] {
        std::fs::write(dir.path().join("kiln.toml"), config).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .current_dir(dir.path())
            .args([
                "--config",
                "kiln.toml",
                "run",
                "ok.yml",
                "--backend",
                "firecracker",
            ])
            .env("KILN_RUNTIME_DIR", dir.path().join("runtime"))
            .env("KILN_DATA_DIR", dir.path().join("data"))
            .env("NO_COLOR", "1")
            .env_remove("KILN_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{config}: {stderr}");
        assert!(stderr.contains(expected), "{config}: {stderr}");
    }
}
