//! Integration tests of the `kiln` binary: exit codes, messages, `--json`, Ctrl-C.

mod cli;
mod firecracker;
mod snapshots;
mod terminal;
