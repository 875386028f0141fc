//! The `${{ }}` expression language, evaluated exactly as GitHub evaluates it.
//!
//! An expression goes through three stages, each with its own error kind:
//!
//! 1. **Lexing** ([`lexer`]): characters to tokens. Fails on characters that form no token
//!    (`=`, `@abc`, an unterminated string, a malformed number such as `0xFZ`) and on input
//!    longer than [`MAX_EXPRESSION_LENGTH`].
//! 2. **Parsing** ([`parser`]): tokens to a tree. Fails on syntax errors, on names that are not
//!    a known context, on unknown functions or wrong argument counts, and on nesting deeper
//!    than [`MAX_DEPTH`].
//! 3. **Evaluation** ([`eval`]): the tree against an [`EvalContext`] (the contexts plus the
//!    runner's [`Host`] hooks). Fails only inside functions (`format` with a bad format
//!    string, `fromJSON` on invalid JSON, `case` with a non-boolean predicate, `hashFiles` when
//!    the host cannot hash) or when the strings an expression builds exceed
//!    [`MAX_MEMORY_BYTES`].
//!
//! Error messages follow GitHub's wording and end with
//! `Located at position N within expression: <expr>` (positions are 1-based characters).
//!
//! On top of bare expressions sit [`Template`] (a YAML string with `${{ }}` interpolations)
//! and [`Condition`] (an `if:` value, with GitHub's implicit `success() &&`).

mod condition;
mod eval;
mod functions;
mod lexer;
mod parser;
#[cfg(test)]
mod proptests;
mod template;

use std::fmt;

use indexmap::IndexMap;

use crate::span::Span;
use crate::value::Value;

pub use condition::Condition;
pub use template::Template;

/// The longest expression accepted, in UTF-16 code units (GitHub's limit).
pub const MAX_EXPRESSION_LENGTH: usize = 21_000;

/// The deepest nesting accepted (GitHub's limit); see [`parser`] for what counts as a level.
pub const MAX_DEPTH: usize = 50;

/// How much string data one evaluation may build before it fails with
/// `The maximum allowed memory size was exceeded`. Strings are counted at two bytes per byte
/// of UTF-8, approximating GitHub's UTF-16 accounting; context data is not counted.
pub const MAX_MEMORY_BYTES: usize = 1024 * 1024;

/// The context names GitHub knows: a name outside this list (and not given to
/// [`Expr::parse_with_contexts`]) is a parse error.
pub const KNOWN_CONTEXTS: &[&str] = &[
    "github", "env", "vars", "secrets", "job", "jobs", "steps", "runner", "strategy", "matrix",
    "needs", "inputs",
];

/// An expression error: the stage that failed, GitHub's message and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExprError {
    /// The lexer found characters that form no token.
    #[error("{message}. Located at position {position} within expression: {expr}")]
    Lex {
        /// GitHub's message, e.g. `Unexpected symbol: '@abc'`.
        message: String,
        /// 1-based character position within `expr`.
        position: usize,
        /// The whole expression.
        expr: String,
        /// Where in the workflow file, when known.
        span: Option<Box<Span>>,
    },
    /// The tokens do not form a valid expression.
    #[error("{message}. Located at position {position} within expression: {expr}")]
    Parse {
        /// GitHub's message, e.g. `Unrecognized named-value: 'env'`.
        message: String,
        /// 1-based character position within `expr`.
        position: usize,
        /// The whole expression.
        expr: String,
        /// Where in the workflow file, when known.
        span: Option<Box<Span>>,
    },
    /// Evaluation failed.
    #[error("{}", eval_display(message, *position, expr))]
    Eval {
        /// GitHub's message, e.g. `The following format string is invalid: {0`.
        message: String,
        /// 1-based character position within `expr` of the failing call, when known.
        position: Option<usize>,
        /// The whole expression.
        expr: String,
        /// Where in the workflow file, when known.
        span: Option<Box<Span>>,
    },
    /// A template's `${{ }}` structure is broken (unclosed or empty), or its value does not
    /// fit where it is used.
    #[error("{message}")]
    Template {
        /// What is wrong.
        message: String,
        /// Where in the workflow file, when known.
        span: Option<Box<Span>>,
    },
}

fn eval_display(message: &str, position: Option<usize>, expr: &str) -> String {
    match position {
        Some(p) => format!("{message}. Located at position {p} within expression: {expr}"),
        None => format!("{message}. Located within expression: {expr}"),
    }
}

impl ExprError {
    /// Where in the workflow file the error is, when known (errors from [`Template`] and
    /// [`Condition`] carry one; errors from a bare [`Expr`] do not).
    pub fn span(&self) -> Option<&Span> {
        match self {
            ExprError::Lex { span, .. }
            | ExprError::Parse { span, .. }
            | ExprError::Eval { span, .. }
            | ExprError::Template { span, .. } => span.as_deref(),
        }
    }

    /// The message without the location suffix.
    pub fn message(&self) -> &str {
        match self {
            ExprError::Lex { message, .. }
            | ExprError::Parse { message, .. }
            | ExprError::Eval { message, .. }
            | ExprError::Template { message, .. } => message,
        }
    }

    /// 1-based character position within the expression, when known.
    pub fn position(&self) -> Option<usize> {
        match self {
            ExprError::Lex { position, .. } | ExprError::Parse { position, .. } => Some(*position),
            ExprError::Eval { position, .. } => *position,
            ExprError::Template { .. } => None,
        }
    }

    /// The same error with its file position set.
    pub fn with_span(mut self, new: Span) -> ExprError {
        match &mut self {
            ExprError::Lex { span, .. }
            | ExprError::Parse { span, .. }
            | ExprError::Eval { span, .. }
            | ExprError::Template { span, .. } => *span = Some(Box::new(new)),
        }
        self
    }
}

/// Which named values (contexts) an expression may use.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NamedValues {
    /// [`KNOWN_CONTEXTS`].
    Known,
    /// An explicit list, lowercased.
    Only(Vec<String>),
}

impl NamedValues {
    fn contains(&self, name: &str) -> bool {
        match self {
            NamedValues::Known => KNOWN_CONTEXTS.iter().any(|k| k.eq_ignore_ascii_case(name)),
            NamedValues::Only(list) => list.iter().any(|k| k.eq_ignore_ascii_case(name)),
        }
    }
}

/// A parsed expression: the body of a `${{ }}`.
#[derive(Clone, PartialEq)]
pub struct Expr {
    src: String,
    /// `None` for an empty expression, which evaluates to `null`.
    root: Option<parser::Node>,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Expr").field(&self.src).finish()
    }
}

impl Expr {
    /// Parses an expression body (without `${{ }}`), allowing the [`KNOWN_CONTEXTS`].
    pub fn parse(src: &str) -> Result<Expr, ExprError> {
        Expr::parse_named(src, &NamedValues::Known)
    }

    /// Parses an expression body allowing exactly the given context names (compared
    /// ignoring case).
    pub fn parse_with_contexts<S: AsRef<str>>(
        src: &str,
        contexts: &[S],
    ) -> Result<Expr, ExprError> {
        let names = contexts
            .iter()
            .map(|s| s.as_ref().to_ascii_lowercase())
            .collect();
        Expr::parse_named(src, &NamedValues::Only(names))
    }

    fn parse_named(src: &str, names: &NamedValues) -> Result<Expr, ExprError> {
        let tokens = lexer::lex(src)?;
        let root = parser::parse(src, &tokens, names)?;
        Ok(Expr {
            src: src.to_owned(),
            root,
        })
    }

    /// Evaluates against the given contexts and host.
    pub fn eval(&self, ctx: &EvalContext<'_>) -> Result<Value, ExprError> {
        match &self.root {
            None => Ok(Value::Null),
            Some(root) => eval::evaluate(root, &self.src, ctx),
        }
    }

    /// The expression's source text.
    pub fn source(&self) -> &str {
        &self.src
    }

    /// Whether the expression is empty (it evaluates to `null`).
    pub fn is_empty(&self) -> bool {
        self.root.is_none()
    }

    /// Whether the expression calls `success()`, `failure()`, `cancelled()` or `always()`
    /// anywhere (which turns off the implicit `success() &&` of an `if:`).
    pub fn uses_status_function(&self) -> bool {
        let mut found = false;
        if let Some(root) = &self.root {
            walk(root, &mut |n| {
                if let parser::Node::Call { func, .. } = n {
                    found |= func.is_status();
                }
            });
        }
        found
    }

    /// The context names the expression reads (lowercased, deduplicated, in order of first
    /// use), e.g. `["github", "needs"]`.
    pub fn referenced_contexts(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if let Some(root) = &self.root {
            walk(root, &mut |n| {
                if let parser::Node::Context(name) = n {
                    let lower = name.to_ascii_lowercase();
                    if !out.contains(&lower) {
                        out.push(lower);
                    }
                }
            });
        }
        out
    }

    /// The names of the functions the expression calls (lowercased, deduplicated).
    pub fn referenced_functions(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        if let Some(root) = &self.root {
            walk(root, &mut |n| {
                if let parser::Node::Call { func, .. } = n {
                    let name = functions::name(*func);
                    if !out.contains(&name) {
                        out.push(name);
                    }
                }
            });
        }
        out
    }
}

/// Visits every node, parents before children.
fn walk(node: &parser::Node, f: &mut dyn FnMut(&parser::Node)) {
    use parser::{Index, Node};
    f(node);
    match node {
        Node::Null | Node::Bool(_) | Node::Number(_) | Node::String(_) | Node::Context(_) => {}
        Node::Index { target, index } => {
            walk(target, f);
            if let Index::Expr(e) = index {
                walk(e, f);
            }
        }
        Node::Not(inner) => walk(inner, f),
        Node::Chain { first, rest } => {
            walk(first, f);
            for (_, n) in rest {
                walk(n, f);
            }
        }
        Node::Logical { args, .. } | Node::Call { args, .. } => {
            for a in args {
                walk(a, f);
            }
        }
    }
}

/// What the status functions look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Nothing has failed or been cancelled so far: `success()` is true.
    Success,
    /// Something failed: `failure()` is true.
    Failure,
    /// The run was cancelled: `cancelled()` is true.
    Cancelled,
}

/// Runtime hooks the runner provides to evaluation.
pub trait Host {
    /// The status `success()`, `failure()` and `cancelled()` look at (for a step: the job so
    /// far; for a job: its `needs`).
    fn job_status(&self) -> JobStatus;
    /// `hashFiles(patterns...)`: the hex SHA-256 of the matching workspace files, `''` when
    /// none match, or an error message.
    fn hash_files(&self, patterns: &[String]) -> Result<String, String>;
}

/// A [`Host`] for evaluation outside a running job (planning, validation, tests): a fixed
/// status, and `hashFiles` is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticHost {
    /// What the status functions see.
    pub status: JobStatus,
}

impl Default for StaticHost {
    fn default() -> StaticHost {
        StaticHost {
            status: JobStatus::Success,
        }
    }
}

impl Host for StaticHost {
    fn job_status(&self) -> JobStatus {
        self.status
    }

    fn hash_files(&self, _patterns: &[String]) -> Result<String, String> {
        Err("hashFiles is only available while a job runs".to_owned())
    }
}

/// What expressions are evaluated against.
#[derive(Clone, Copy)]
pub struct EvalContext<'a> {
    /// The contexts by lowercase name (`github`, `env`, `matrix`, ...). Lookups ignore case;
    /// a known context missing from the map is `null`.
    pub contexts: &'a IndexMap<String, Value>,
    /// Runtime hooks.
    pub host: &'a dyn Host,
}

impl<'a> EvalContext<'a> {
    /// Bundles contexts and a host.
    pub fn new(contexts: &'a IndexMap<String, Value>, host: &'a dyn Host) -> EvalContext<'a> {
        EvalContext { contexts, host }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval_with(src: &str, contexts: &IndexMap<String, Value>) -> Result<Value, ExprError> {
        let host = StaticHost::default();
        let names: Vec<&str> = contexts.keys().map(String::as_str).collect();
        Expr::parse_with_contexts(src, &names)?.eval(&EvalContext::new(contexts, &host))
    }

    fn eval(src: &str) -> Result<Value, ExprError> {
        eval_with(src, &IndexMap::new())
    }

    #[test]
    fn precedence_and_short_circuit() {
        assert_eq!(eval("1 || 2 && 0"), Ok(Value::Number(1.0)));
        assert_eq!(eval("(1 || 2) && 0"), Ok(Value::Number(0.0)));
        assert_eq!(eval("!0 == true"), Ok(Value::Bool(true)));
        assert_eq!(eval("1 < 2 == 2 < 3"), Ok(Value::Bool(true)));
        assert_eq!(eval(""), Ok(Value::Null));
    }

    #[test]
    fn unknown_context_is_a_parse_error() {
        let err = Expr::parse("nosuch.x").err();
        assert!(matches!(err, Some(ExprError::Parse { .. })), "{err:?}");
        assert!(Expr::parse("GitHub.sha").is_ok());
    }

    #[test]
    fn known_but_absent_context_is_null() {
        let contexts = IndexMap::new();
        let host = StaticHost::default();
        let v = Expr::parse("matrix.os").and_then(|e| e.eval(&EvalContext::new(&contexts, &host)));
        assert_eq!(v, Ok(Value::Null));
    }

    #[test]
    fn long_chains_do_not_nest() {
        let src = vec!["1"; 4000].join("==");
        assert!(matches!(eval(&src), Ok(Value::Bool(true))));
        let src = vec!["0"; 5000].join("||");
        assert!(matches!(eval(&src), Ok(Value::Number(_))));
    }

    #[test]
    fn deep_nesting_is_an_error() {
        let src = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
        let err = Expr::parse(&src)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("Exceeded max expression depth 50"), "{err}");
    }

    #[test]
    fn status_functions_are_found() {
        let uses = |s: &str| Expr::parse(s).map(|e| e.uses_status_function());
        assert_eq!(uses("always()"), Ok(true));
        assert_eq!(uses("github.x && !Failure()"), Ok(true));
        assert_eq!(uses("github.x == 'a'"), Ok(false));
    }

    #[test]
    fn referenced_contexts_are_listed_once() {
        let e = Expr::parse("needs.a.result == 'x' && NEEDS.b && github.sha");
        assert_eq!(
            e.map(|e| e.referenced_contexts()),
            Ok(vec!["needs".to_owned(), "github".to_owned()])
        );
    }
}
