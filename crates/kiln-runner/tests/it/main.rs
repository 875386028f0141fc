//! Integration tests of kiln-runner.

mod executor;
mod qemu;
mod session;
