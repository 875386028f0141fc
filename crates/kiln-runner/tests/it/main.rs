//! Integration tests of kiln-runner.

mod actions;
mod commands;
mod executor;
mod qemu;
mod session;
