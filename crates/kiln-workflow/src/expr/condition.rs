//! `if:` conditions.
//!
//! GitHub accepts an `if:` written with or without `${{ }}`:
//!
//! - `if: github.ref == 'refs/heads/main'` — the whole value is one expression;
//! - `if: ${{ github.ref == 'refs/heads/main' }}` — the same;
//! - `if: ${{ a }} && b` — text around an interpolation makes the value a *string*
//!   (`"true && b"`), which is truthy whenever it is not empty. This is a well-known trap, and
//!   GitHub behaves exactly so; kiln does the same.
//! - an empty `if:` means `success()`.
//!
//! Unless the condition calls a status function (`success()`, `failure()`, `cancelled()`,
//! `always()`), GitHub evaluates it as `success() && (condition)`, so a step or job after a
//! failure is skipped by default. [`Condition::eval`] applies that rule using
//! [`Host::job_status`](super::Host::job_status).

use std::sync::Arc;

use crate::span::Span;

use super::template::{Template, locate_error};
use super::{EvalContext, Expr, ExprError, JobStatus};

/// An `if:` value.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    src: String,
    span: Span,
    raw: Option<Arc<str>>,
    body: Body,
    implicit_success: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Body {
    /// Empty `if:`: `success()`.
    Empty,
    /// One expression, and the byte offset of its body in the source.
    Expr(Expr, usize),
    /// Text mixed with interpolations: a string, truthy when not empty.
    Text(Template),
}

impl Condition {
    /// Parses an `if:` value written at `span`; errors point into the file where possible.
    pub fn parse(src: &str, span: Span) -> Result<Condition, ExprError> {
        Condition::parse_raw(src, span, None)
    }

    /// Like [`Condition::parse`], with the text of the whole file, for exact error positions
    /// in multi-line and quoted values (see [`Template::parse_in_file`]).
    pub fn parse_in_file(src: &str, span: Span, file_text: &str) -> Result<Condition, ExprError> {
        let raw = file_text.get(span.start..span.end).map(Arc::from);
        Condition::parse_raw(src, span, raw)
    }

    fn parse_raw(src: &str, span: Span, raw: Option<Arc<str>>) -> Result<Condition, ExprError> {
        let raw_text = raw.as_deref();
        let body = if src.trim().is_empty() {
            Body::Empty
        } else if src.contains("${{") {
            let template = Template::parse_raw(src, span.clone(), raw.clone())?;
            match template.lone_with_offset() {
                Some((only, offset)) => Body::Expr(only.clone(), offset),
                None => Body::Text(template),
            }
        } else {
            Body::Expr(
                Expr::parse(src).map_err(|e| locate_error(e, &span, src, 0, raw_text))?,
                0,
            )
        };
        let uses_status = match &body {
            Body::Empty => true,
            Body::Expr(e, _) => e.uses_status_function(),
            Body::Text(t) => t.uses_status_function(),
        };
        Ok(Condition {
            src: src.to_owned(),
            span,
            raw,
            body,
            implicit_success: !uses_status,
        })
    }

    /// The condition GitHub uses when none is written: `success()`.
    pub fn default_success() -> Condition {
        Condition {
            src: String::new(),
            span: Span::unknown(),
            raw: None,
            body: Body::Empty,
            implicit_success: false,
        }
    }

    /// Evaluates: `false` without evaluating the expression when the implicit `success()`
    /// fails, else the truthiness of the value.
    pub fn eval(&self, ctx: &EvalContext<'_>) -> Result<bool, ExprError> {
        let success = ctx.host.job_status() == JobStatus::Success;
        if self.implicit_success && !success {
            return Ok(false);
        }
        match &self.body {
            Body::Empty => Ok(success),
            Body::Expr(e, offset) => e.eval(ctx).map(|v| v.is_truthy()).map_err(|err| {
                locate_error(err, &self.span, &self.src, *offset, self.raw.as_deref())
            }),
            Body::Text(t) => t.eval(ctx).map(|s| !s.is_empty()),
        }
    }

    /// The source text as written.
    pub fn source(&self) -> &str {
        &self.src
    }

    /// Where the condition was written.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Whether GitHub's implicit `success() &&` applies (no status function is called).
    pub fn has_implicit_success(&self) -> bool {
        self.implicit_success
    }

    /// The expressions in the condition.
    pub fn expressions(&self) -> Vec<&Expr> {
        match &self.body {
            Body::Empty => Vec::new(),
            Body::Expr(e, _) => vec![e],
            Body::Text(t) => t.expressions().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use indexmap::IndexMap;

    use super::*;
    use crate::expr::StaticHost;
    use crate::value::Value;

    fn check(src: &str, status: JobStatus) -> Result<bool, ExprError> {
        let mut contexts = IndexMap::new();
        contexts.insert(
            "github".to_owned(),
            Value::from_json(serde_json::json!({"ref": "refs/heads/main", "event_name": "push"})),
        );
        let host = StaticHost { status };
        Condition::parse(src, Span::unknown())?.eval(&EvalContext::new(&contexts, &host))
    }

    #[test]
    fn with_and_without_braces_agree() {
        for src in [
            "github.ref == 'refs/heads/main'",
            "${{ github.ref == 'refs/heads/main' }}",
            "${{ github.ref == 'refs/heads/main' }}\n",
            "${{ startsWith('${{ x', 'refs') || github.ref == 'refs/heads/main' }}",
        ] {
            assert_eq!(check(src, JobStatus::Success), Ok(true), "{src}");
        }
        assert_eq!(
            check("github.event_name == 'pull_request'", JobStatus::Success),
            Ok(false)
        );
    }

    #[test]
    fn implicit_success_skips_after_failure() {
        assert_eq!(check("true", JobStatus::Failure), Ok(false));
        assert_eq!(check("true", JobStatus::Cancelled), Ok(false));
        assert_eq!(check("always()", JobStatus::Failure), Ok(true));
        assert_eq!(check("failure()", JobStatus::Failure), Ok(true));
        assert_eq!(check("${{ cancelled() }}", JobStatus::Cancelled), Ok(true));
        assert_eq!(
            check("success() || failure()", JobStatus::Failure),
            Ok(true)
        );
    }

    #[test]
    fn empty_condition_means_success() {
        assert_eq!(check("", JobStatus::Success), Ok(true));
        assert_eq!(check("  ", JobStatus::Failure), Ok(false));
        let host = StaticHost::default();
        let contexts = IndexMap::new();
        assert_eq!(
            Condition::default_success().eval(&EvalContext::new(&contexts, &host)),
            Ok(true)
        );
    }

    #[test]
    fn mixed_text_is_a_truthy_string() {
        // GitHub's trap: this is the string "false && true", which is truthy.
        assert_eq!(check("${{ false }} && true", JobStatus::Success), Ok(true));
        // ...but the implicit success() still applies.
        assert_eq!(check("${{ false }} && true", JobStatus::Failure), Ok(false));
        assert_eq!(check("${{ failure() }} && x", JobStatus::Failure), Ok(true));
    }

    #[test]
    fn multi_line_conditions_are_located_with_the_file() {
        let raw = "github.ref == 'x' &&\n      nosuch";
        let file = format!("    if: {raw}\n");
        let start = file.find(raw).unwrap_or(0);
        let span = Span {
            file: Arc::from("wf.yml"),
            line: 1,
            col: 9,
            start,
            end: start + raw.len(),
        };
        let err = Condition::parse_in_file("github.ref == 'x' && nosuch", span, &file).err();
        assert_eq!(
            err.as_ref()
                .and_then(ExprError::span)
                .map(ToString::to_string)
                .as_deref(),
            Some("wf.yml:2:7")
        );
    }

    #[test]
    fn parse_errors_are_located() {
        use std::sync::Arc;
        let src = "github.ref == nosuch";
        let span = Span {
            file: Arc::from("wf.yml"),
            line: 7,
            col: 11,
            start: 50,
            end: 50 + src.len(),
        };
        let err = Condition::parse(src, span).err();
        assert_eq!(
            err.as_ref()
                .and_then(ExprError::span)
                .map(ToString::to_string)
                .as_deref(),
            Some("wf.yml:7:25")
        );
    }
}
