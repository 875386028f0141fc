//! The default image builds, is complete and consistent, and is cached.

use std::time::Instant;

use kiln_vm::image::{self, ImageRecipe};

use crate::support;

#[test]
fn default_image_is_complete_and_cached() {
    if support::skip_vm_tests() {
        return;
    }
    let info = support::default_image();
    let m = &info.manifest;
    for file in [info.rootfs(), info.kernel(), info.initramfs(), info.agent()] {
        assert!(file.is_file(), "{} is missing", file.display());
    }
    assert!(
        m.kernel_version.contains("cloud-amd64"),
        "{}",
        m.kernel_version
    );
    assert!(
        info.vmlinux().is_some_and(|p| p.is_file()),
        "vmlinux was not extracted"
    );
    let vmlinux = std::fs::read(info.vmlinux().unwrap()).unwrap();
    assert!(vmlinux.starts_with(b"\x7fELF"));
    for module in [
        "virtio_mmio",
        "virtio_blk",
        "virtio_console",
        "vmw_vsock_virtio_transport",
    ] {
        assert!(
            m.modules.iter().any(|n| n == module),
            "{module} not in {:?}",
            m.modules
        );
    }
    // Dependencies come before their users.
    let pos = |n: &str| m.modules.iter().position(|m| m == n).unwrap();
    assert!(pos("vsock") < pos("vmw_vsock_virtio_transport"));
    for pkg in image::DEFAULT_PACKAGES {
        assert!(
            m.packages.iter().any(|p| p.name == *pkg),
            "package {pkg} missing"
        );
    }
    assert!(
        m.sizes.rootfs_allocated < m.sizes.rootfs,
        "rootfs.ext4 should be sparse"
    );
    // The initramfs lists as a valid cpio with init and the module order.
    let listing = std::process::Command::new("cpio")
        .arg("-t")
        .stdin(std::fs::File::open(info.initramfs()).unwrap())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.lines().any(|l| l == "init"), "{listing}");
    assert!(
        listing.lines().any(|l| l == "kiln/modules.order"),
        "{listing}"
    );

    // An unchanged recipe is not rebuilt.
    let started = Instant::now();
    let recipe = ImageRecipe::new("default", support::agent());
    let phases = std::sync::Mutex::new(Vec::new());
    let record = |phase: image::Phase, _: &str| phases.lock().unwrap().push(phase);
    let again = image::build(&recipe, &support::data_dir(), &record).unwrap();
    assert_eq!(again.manifest.created_at, m.created_at);
    assert_eq!(*phases.lock().unwrap(), [image::Phase::Cached]);
    eprintln!(
        "cached image build: {:.3} s",
        started.elapsed().as_secs_f64()
    );
    let listed = image::list(&support::data_dir()).unwrap();
    assert!(listed.iter().any(|i| i.name() == "default"));
}
