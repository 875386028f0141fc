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

#[test]
fn a_rootfs_tarball_imports_lists_and_removes() {
    if support::skip_vm_tests() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("var/lib/dpkg")).unwrap();
    std::fs::write(root.join("etc/os-release"), "ID=exported\n").unwrap();
    std::fs::write(
        root.join("var/lib/dpkg/status"),
        "Package: hello\nStatus: install ok installed\nVersion: 2.10-3\n",
    )
    .unwrap();
    let tarball = work.path().join("rootfs.tar");
    let status = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("-C")
        .arg(&root)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    // A private data dir: the import must not disturb the shared default image.
    let data = tempfile::tempdir().unwrap();
    let mut options = image::ImportOptions::new(support::agent());
    options.rootfs_mib = 64;
    let progress = |phase: image::Phase, detail: &str| eprintln!("[import {phase}] {detail}");
    let started = Instant::now();
    let info = image::import(data.path(), "exported", &tarball, &options, &progress).unwrap();
    eprintln!("import took {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(info.manifest.source, "import");
    assert_eq!(info.manifest.packages.len(), 1);
    assert!(info.rootfs().is_file() && info.kernel().is_file() && info.initramfs().is_file());
    // The ext4 filesystem holds the tarball's files (debugfs reads it without mounting).
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /etc/os-release"])
        .arg(info.rootfs())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "ID=exported\n");
    let names: Vec<String> = image::list(data.path())
        .unwrap()
        .iter()
        .map(|i| i.name().to_owned())
        .collect();
    assert_eq!(names, ["exported"]);
    image::remove(data.path(), "exported").unwrap();
    assert!(image::list(data.path()).unwrap().is_empty());
    assert!(matches!(
        image::open(data.path(), "exported"),
        Err(image::ImageError::NotFound { .. })
    ));
    // Nothing but the lock file is left in the images directory.
    let left: Vec<_> = std::fs::read_dir(image::images_dir(data.path()))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
