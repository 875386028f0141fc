//! Integration tests of kiln-vm against real tools: the image pipeline (mmdebstrap, mke2fs,
//! Debian's kernel) and the QEMU backend booting real VMs (under TCG on hosts without working
//! KVM). See `support` for the environment switches.

mod bench;
mod image_build;
mod qemu_vm;
mod support;
