//! Integration tests of kiln-runner.

mod actions;
mod commands;
mod executor;
mod pool;
mod qemu;
mod session;
mod snapshots;
