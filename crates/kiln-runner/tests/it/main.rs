//! Integration tests of kiln-runner.

mod executor;
mod session;
