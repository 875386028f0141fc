//! The GitHub Actions workflow language, read exactly as GitHub reads it.
//!
//! `kiln-workflow` takes workflow text and returns typed values; it does no I/O and no async,
//! so everything here is trivially testable and fuzzable.
//!
//! The pipeline is:
//!
//! 1. [`yaml`]: a YAML 1.2 loader on `granit-parser` events that keeps a [`Span`] on every
//!    node, rejects duplicate keys, merge keys and multi-document files, and expands aliases
//!    under a node budget.
//! 2. [`load`]: converts the node tree into the typed [`model`] ([`Workflow`], [`Job`],
//!    [`Step`], ...) and validates it, collecting every [`Diagnostic`] instead of stopping at
//!    the first.
//! 3. [`expr`]: the `${{ }}` expression language ([`Template`], [`Condition`]).
//! 4. [`graph`], [`matrix`], [`trigger`]: job ordering, matrix expansion and `on:` matching.
#![warn(missing_docs)]

pub mod action;
pub mod expr;
pub mod graph;
pub mod load;
pub mod matrix;
pub mod model;
pub mod span;
pub mod trigger;
pub mod value;
pub mod yaml;

pub use action::{
    Action, ActionError, ActionInput, ActionOutput, ActionRuns, NodeRuns, parse_action,
};
pub use expr::{Condition, EvalContext, Expr, ExprError, Host, JobStatus, Template};
pub use graph::{GraphError, job_order};
pub use load::{Diagnostic, WorkflowError, parse_workflow};
pub use matrix::{MatrixError, MatrixLeg, evaluate_matrix, expand_matrix};
pub use model::*;
pub use span::{Span, Spanned};
pub use trigger::{Event, FilterPattern, PatternError, PatternList};
pub use value::Value;
