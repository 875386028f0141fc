//! Integration tests of kiln-runner.

mod commands;
mod executor;
mod qemu;
mod session;
