//! Integration tests of kiln-runner.

mod session;
