//! Integration tests for kiln-workflow (one binary, one module per area).

mod bad_input;
mod conformance;
mod corpus;
mod fuzz;
mod matrix;
mod model;
mod triggers;
