//! Integration tests of kiln-vm against real tools: the image pipeline (mmdebstrap, mke2fs,
//! Debian's kernel) and the QEMU backend booting real VMs (under TCG on hosts without working
//! KVM). The shared fixtures (the cached image, the static agent, the environment switches)
//! are in the `kiln-test-support` crate.

mod bench;
mod conformance;
mod firecracker;
mod image_build;
mod qemu_vm;
mod terminal;

use kiln_test_support as support;
