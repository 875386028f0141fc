//! Shared fixtures of kiln's tests, like cloud-hypervisor's `test_infra`: the static guest
//! agent and the default guest image, built once per machine and cached (an unchanged recipe
//! is not rebuilt; the image builder's lock file serializes concurrent test binaries), and a
//! polling helper; [`postgres`] starts a private PostgreSQL cluster for store tests.
//!
//! Environment:
//! - `KILN_SKIP_VM_TESTS=1` skips the tests that need QEMU and an image. Without it they fail
//!   when QEMU or the image tools are missing: they never skip silently.
//! - `KILN_TEST_DATA_DIR` overrides where the image is cached (default:
//!   `<target>/kiln-test-data`; CI points it at a machine-wide cache).
//! - `KILN_AGENT_BIN` uses a prebuilt agent instead of building `kiln-agent` statically.
//! - `KILN_TEST_PG_BIN` names the directory of PostgreSQL's server binaries (default: Debian's
//!   `/usr/lib/postgresql/<version>/bin`, then `PATH`).

#![warn(missing_docs)]

pub mod postgres;
pub mod terminal;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use kiln_vm::image::{self, ImageInfo, ImageRecipe};

/// Whether VM tests are explicitly disabled (and says so on stderr).
pub fn skip_vm_tests() -> bool {
    if std::env::var("KILN_SKIP_VM_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("KILN_SKIP_VM_TESTS=1: skipping a real-VM test");
        return true;
    }
    false
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Cargo's target dir, absolute: a relative `CARGO_TARGET_DIR` is relative to where cargo was
/// started (the workspace root here), not to the test's working directory (its crate).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Where test images live.
pub fn data_dir() -> PathBuf {
    std::env::var_os("KILN_TEST_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("kiln-test-data"))
}

/// The static agent binary (built once per test binary; cargo makes rebuilds cheap).
pub fn agent() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("KILN_AGENT_BIN") {
                return PathBuf::from(path);
            }
            let target = data_dir().join("agent-target");
            let started = Instant::now();
            let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args([
                    "build",
                    "--release",
                    "-p",
                    "kiln-agent",
                    "--target",
                    "x86_64-unknown-linux-gnu",
                ])
                .env("CARGO_TARGET_DIR", &target)
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .current_dir(workspace_root())
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building the static kiln-agent failed");
            eprintln!(
                "static kiln-agent ready in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            target.join("x86_64-unknown-linux-gnu/release/kiln-agent")
        })
        .clone()
}

/// Image build timings seen by this test binary, for reports.
pub static BUILD_SECONDS: Mutex<Vec<f64>> = Mutex::new(Vec::new());

/// The default image, built (or found up to date) once per test binary.
pub fn default_image() -> ImageInfo {
    static IMAGE: OnceLock<ImageInfo> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let recipe = ImageRecipe::new("default", agent());
            let started = Instant::now();
            let progress =
                |phase: image::Phase, detail: &str| eprintln!("[image {phase}] {detail}");
            let info = image::build(&recipe, &data_dir(), &progress)
                .unwrap_or_else(|e| panic!("building the default image failed: {e}"));
            let secs = started.elapsed().as_secs_f64();
            eprintln!("default image ready in {secs:.1} s");
            BUILD_SECONDS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(secs);
            info
        })
        .clone()
}

/// Polls `condition` every 20 ms until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
