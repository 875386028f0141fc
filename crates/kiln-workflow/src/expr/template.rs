//! Templates: YAML strings with `${{ }}` interpolations.
//!
//! A template is split into literal text and expressions when it is parsed, so every
//! expression error is found while loading the workflow, with its position in the file.
//! An expression ends at the first `}}` that is not inside a single-quoted string literal, so
//! `${{ format('}}') }}` works.
//!
//! Evaluation follows GitHub: when the whole template is one `${{ }}` with no text around it,
//! the expression's value keeps its type ([`Template::eval_value`]); otherwise the pieces are
//! joined as strings, like `format()` would (arrays and objects become `Array`/`Object`).
//! Where a string is required ([`Template::eval`]), a lone expression that yields an array or
//! an object is an error, as on GitHub.

use std::sync::Arc;

use crate::span::Span;
use crate::value::Value;

use super::{EvalContext, Expr, ExprError};

const UNCLOSED: &str = "The expression is not closed. An unescaped ${{ sequence was found, \
                        but the closing }} sequence was not found";

/// A string that may contain `${{ }}` interpolations.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    src: String,
    span: Span,
    /// The scalar as written in the file (quotes, indentation, folding), when known; used to
    /// map error offsets back to exact file positions.
    raw: Option<Arc<str>>,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Expr {
        expr: Expr,
        /// Byte offset of the expression body (after `${{`) in the template source.
        offset: usize,
    },
}

impl Template {
    /// Parses a YAML string value. `span` is where the scalar was written; errors point inside
    /// it when its text can be mapped back to the file (a plain or quoted single-line scalar
    /// without escapes), otherwise at the scalar.
    pub fn parse(src: &str, span: Span) -> Result<Template, ExprError> {
        Template::parse_raw(src, span, None)
    }

    /// Like [`Template::parse`], with the text of the whole file the scalar was read from, so
    /// that errors anywhere in the scalar (block scalars, quoted scalars, folded lines) point
    /// at the exact line and column of the offending token.
    pub fn parse_in_file(src: &str, span: Span, file_text: &str) -> Result<Template, ExprError> {
        let raw = file_text.get(span.start..span.end).map(Arc::from);
        Template::parse_raw(src, span, raw)
    }

    pub(crate) fn parse_raw(
        src: &str,
        span: Span,
        raw: Option<Arc<str>>,
    ) -> Result<Template, ExprError> {
        let raw_text = raw.as_deref();
        let mut parts = Vec::new();
        let mut pos = 0;
        while let Some(found) = src[pos..].find("${{") {
            let open = pos + found;
            if open > pos {
                parts.push(Part::Literal(src[pos..open].to_owned()));
            }
            let body_start = open + 3;
            let Some(close) = find_close(src, body_start) else {
                return Err(ExprError::Template {
                    message: UNCLOSED.to_owned(),
                    span: Some(Box::new(locate(&span, src, open, raw_text))),
                });
            };
            let body = &src[body_start..close];
            if body.trim().is_empty() {
                return Err(ExprError::Template {
                    message: "An expression was expected".to_owned(),
                    span: Some(Box::new(locate(&span, src, open, raw_text))),
                });
            }
            let expr =
                Expr::parse(body).map_err(|e| locate_error(e, &span, src, body_start, raw_text))?;
            parts.push(Part::Expr {
                expr,
                offset: body_start,
            });
            pos = close + 2;
        }
        if pos < src.len() || parts.is_empty() {
            parts.push(Part::Literal(src[pos..].to_owned()));
        }
        Ok(Template {
            src: src.to_owned(),
            span,
            raw,
            parts,
        })
    }

    /// A template without expressions (the text is used as is, even if it contains `${{`).
    pub fn literal(s: impl Into<String>) -> Template {
        let s = s.into();
        Template {
            parts: vec![Part::Literal(s.clone())],
            src: s,
            span: Span::unknown(),
            raw: None,
        }
    }

    /// Whether the template contains no expression.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    /// The source text as written (after YAML unquoting).
    pub fn source(&self) -> &str {
        &self.src
    }

    /// Where the template was written.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The expressions in the template, in order.
    pub fn expressions(&self) -> impl Iterator<Item = &Expr> {
        self.parts.iter().filter_map(|p| match p {
            Part::Expr { expr, .. } => Some(expr),
            Part::Literal(_) => None,
        })
    }

    /// The single expression when the template is exactly one `${{ }}` with no text around it.
    pub fn lone_expression(&self) -> Option<&Expr> {
        match self.parts.as_slice() {
            [Part::Expr { expr, .. }] => Some(expr),
            _ => None,
        }
    }

    /// Like [`Template::lone_expression`], but text made only of whitespace around the
    /// expression (such as a block scalar's final newline) is allowed.
    pub fn lone_expression_ignoring_space(&self) -> Option<&Expr> {
        self.lone_with_offset().map(|(e, _)| e)
    }

    /// The lone expression (whitespace around allowed) and the byte offset of its body.
    pub(crate) fn lone_with_offset(&self) -> Option<(&Expr, usize)> {
        let mut found = None;
        for part in &self.parts {
            match part {
                Part::Literal(s) if s.trim().is_empty() => {}
                Part::Literal(_) => return None,
                Part::Expr { expr, offset } if found.is_none() => found = Some((expr, *offset)),
                Part::Expr { .. } => return None,
            }
        }
        found
    }

    /// Whether any expression calls a status function (`success()`, `always()`, ...).
    pub fn uses_status_function(&self) -> bool {
        self.expressions().any(Expr::uses_status_function)
    }

    /// Evaluates to a string: the literal text with each expression's value interpolated.
    /// A lone expression yielding an array or object is an error (GitHub's "A sequence was
    /// not expected" / "A mapping was not expected").
    pub fn eval(&self, ctx: &EvalContext<'_>) -> Result<String, ExprError> {
        if let [Part::Expr { .. }] = self.parts.as_slice() {
            return match self.eval_value(ctx)? {
                Value::Array(_) => Err(self.shape_error("A sequence was not expected")),
                Value::Object(_) => Err(self.shape_error("A mapping was not expected")),
                v => Ok(v.to_display_string()),
            };
        }
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Expr { expr, offset } => {
                    let v = self.eval_expr(expr, *offset, ctx)?;
                    out.push_str(&v.to_display_string());
                }
            }
        }
        Ok(out)
    }

    /// Evaluates keeping types: a lone `${{ x }}` yields `x`'s value (number, boolean, array,
    /// object...); anything else yields the interpolated string.
    pub fn eval_value(&self, ctx: &EvalContext<'_>) -> Result<Value, ExprError> {
        match self.parts.as_slice() {
            [Part::Expr { expr, offset }] => self.eval_expr(expr, *offset, ctx),
            _ => self.eval(ctx).map(Value::String),
        }
    }

    fn eval_expr(
        &self,
        expr: &Expr,
        offset: usize,
        ctx: &EvalContext<'_>,
    ) -> Result<Value, ExprError> {
        expr.eval(ctx)
            .map_err(|e| locate_error(e, &self.span, &self.src, offset, self.raw.as_deref()))
    }

    fn shape_error(&self, message: &str) -> ExprError {
        ExprError::Template {
            message: message.to_owned(),
            span: Some(Box::new(self.span.clone())),
        }
    }
}

/// The byte offset of the `}}` closing an expression whose body starts at `from`, skipping
/// `}}` inside single-quoted strings.
fn find_close(src: &str, from: usize) -> Option<usize> {
    let bytes = src.as_bytes();
    let mut in_string = false;
    let mut i = from;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => in_string = !in_string,
            b'}' if !in_string && bytes.get(i + 1) == Some(&b'}') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Gives an expression error the file position of its offending token. `body_start` is the
/// byte offset of the expression within `src`, which was written at `span`.
pub(crate) fn locate_error(
    err: ExprError,
    span: &Span,
    src: &str,
    body_start: usize,
    raw: Option<&str>,
) -> ExprError {
    let body = &src[body_start..];
    let within = err
        .position()
        .and_then(|p| body.char_indices().nth(p.saturating_sub(1)))
        .map_or(0, |(b, _)| b);
    let at = locate(span, src, body_start + within, raw);
    err.with_span(at)
}

/// Maps byte offset `off` of the scalar text `src` to a file position. With the scalar's
/// `raw` text from the file, the value is aligned with it character by character (the value
/// is what remains of the raw text once quotes, escapes, indentation and line folding are
/// taken out), which gives the exact line and column. Without it, the position is exact when
/// the scalar was written verbatim on one line (plain, or quoted with no escapes); otherwise
/// it is the scalar's own span.
pub(crate) fn locate(span: &Span, src: &str, off: usize, raw: Option<&str>) -> Span {
    if let Some(found) = raw.and_then(|raw| align(span, src, raw, off)) {
        return found;
    }
    if src.contains('\n') || span.line == 0 {
        return span.clone();
    }
    let written = span.end.saturating_sub(span.start);
    // Every YAML escape is longer than what it stands for, so a quoted scalar whose length
    // is exactly the text plus two quotes has no escapes.
    let lead = if written == src.len() {
        0
    } else if written == src.len() + 2 {
        1
    } else {
        return span.clone();
    };
    let Some(prefix) = src.get(..off) else {
        return span.clone();
    };
    let chars = u32::try_from(prefix.chars().count()).unwrap_or(u32::MAX);
    let start = span.start + lead + off;
    Span {
        file: span.file.clone(),
        line: span.line,
        col: span
            .col
            .saturating_add(u32::from(lead == 1))
            .saturating_add(chars),
        start,
        end: start,
    }
}

/// Finds where value byte `off` was written, by matching the value's characters, in order,
/// against the raw text (skipping raw characters the value does not contain). `None` when
/// the value is not a subsequence of the raw text.
fn align(span: &Span, src: &str, raw: &str, off: usize) -> Option<Span> {
    if span.line == 0 {
        return None;
    }
    let (mut line, mut col) = (span.line, span.col);
    let mut raw_chars = raw.char_indices();
    let at = |line: u32, col: u32, byte: usize| Span {
        file: span.file.clone(),
        line,
        col,
        start: span.start + byte,
        end: span.start + byte,
    };
    for (vb, vc) in src.char_indices() {
        loop {
            let (rb, rc) = raw_chars.next()?;
            let matched = rc == vc;
            if matched && vb == off {
                return Some(at(line, col, rb));
            }
            if rc == '\n' {
                line += 1;
                col = 1;
            } else {
                col += 1;
            }
            if matched {
                break;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {

    use indexmap::IndexMap;

    use super::*;
    use crate::expr::StaticHost;

    fn span_for(text: &str, col: u32) -> Span {
        Span {
            file: Arc::from("wf.yml"),
            line: 4,
            col,
            start: 100,
            end: 100 + text.len(),
        }
    }

    fn contexts() -> IndexMap<String, Value> {
        let mut c = IndexMap::new();
        c.insert(
            "matrix".to_owned(),
            Value::from_json(serde_json::json!({"os": "ubuntu", "n": 3, "list": [1, 2]})),
        );
        c
    }

    fn render(src: &str) -> Result<String, ExprError> {
        let c = contexts();
        let host = StaticHost::default();
        Template::parse(src, Span::unknown())?.eval(&EvalContext::new(&c, &host))
    }

    fn value(src: &str) -> Result<Value, ExprError> {
        let c = contexts();
        let host = StaticHost::default();
        Template::parse(src, Span::unknown())?.eval_value(&EvalContext::new(&c, &host))
    }

    #[test]
    fn interpolates_between_text() {
        assert_eq!(
            render("build on ${{ matrix.os }} x${{matrix.n}}!"),
            Ok("build on ubuntu x3!".to_owned())
        );
        assert_eq!(render("no expressions"), Ok("no expressions".to_owned()));
        assert_eq!(render(""), Ok(String::new()));
    }

    #[test]
    fn lone_expression_keeps_its_type() {
        assert_eq!(value("${{ matrix.n }}"), Ok(Value::Number(3.0)));
        assert_eq!(value("${{ fromJSON('true') }}"), Ok(Value::Bool(true)));
        assert_eq!(value(" ${{ matrix.n }}"), Ok(Value::from(" 3")));
        assert_eq!(
            value("${{ matrix.list }}"),
            Ok(Value::from_json(serde_json::json!([1, 2])))
        );
    }

    #[test]
    fn lone_collection_is_not_a_string() {
        let err = render("${{ matrix.list }}").err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("A sequence was not expected"));
        assert_eq!(render("x ${{ matrix }}"), Ok("x Object".to_owned()));
    }

    #[test]
    fn closing_braces_inside_strings_do_not_end_the_expression() {
        assert_eq!(render("${{ format('{0}}}', 'a') }}"), Ok("a}".to_owned()));
    }

    #[test]
    fn unclosed_and_empty_expressions_are_errors() {
        let src = "echo ${{ matrix.os";
        let err = Template::parse(src, span_for(src, 10)).err();
        let span = err
            .as_ref()
            .and_then(ExprError::span)
            .map(ToString::to_string);
        assert_eq!(span.as_deref(), Some("wf.yml:4:15"));
        assert!(Template::parse("${{ }}", Span::unknown()).is_err());
    }

    #[test]
    fn parse_errors_point_into_the_file() {
        // Plain scalar at column 10: `nosuch` starts at character 9 of the scalar.
        let src = "echo ${{ nosuch.x }}";
        let err = Template::parse(src, span_for(src, 10)).err();
        let span = err
            .as_ref()
            .and_then(ExprError::span)
            .map(ToString::to_string);
        assert_eq!(span.as_deref(), Some("wf.yml:4:19"));
        // The same scalar double-quoted: one more column for the quote.
        let quoted = Span {
            end: 100 + src.len() + 2,
            ..span_for(src, 10)
        };
        let err = Template::parse(src, quoted).err();
        let span = err
            .as_ref()
            .and_then(ExprError::span)
            .map(ToString::to_string);
        assert_eq!(span.as_deref(), Some("wf.yml:4:20"));
        // A block scalar: the scalar itself.
        let block = "line\n${{ nosuch }}";
        let err = Template::parse(block, span_for("xx", 3)).err();
        let span = err
            .as_ref()
            .and_then(ExprError::span)
            .map(ToString::to_string);
        assert_eq!(span.as_deref(), Some("wf.yml:4:3"));
    }

    /// The span of `raw` inside `file`, as a YAML loader would report it.
    fn span_of(file: &str, raw: &str) -> Span {
        let start = file.find(raw).unwrap_or(0);
        let before = &file[..start];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Span {
            file: Arc::from("wf.yml"),
            line: u32::try_from(line).unwrap_or(0),
            col: u32::try_from(col).unwrap_or(0),
            start,
            end: start + raw.len(),
        }
    }

    fn error_at(value: &str, file: &str, raw: &str) -> Option<String> {
        let err = Template::parse_in_file(value, span_of(file, raw), file).err()?;
        err.span().map(ToString::to_string)
    }

    #[test]
    fn errors_in_block_scalars_point_at_the_line() {
        let raw = "echo hi\n          echo ${{ matrix.os ) }}\n";
        let file = format!("jobs:\n  b:\n    steps:\n      - run: |\n          {raw}");
        // `)` is on line 6: 10 spaces, then `echo ${{ matrix.os ` (19 characters).
        assert_eq!(
            error_at("echo hi\necho ${{ matrix.os ) }}\n", &file, raw).as_deref(),
            Some("wf.yml:6:30")
        );
    }

    #[test]
    fn errors_in_folded_and_escaped_scalars_point_at_the_token() {
        let raw = "a\n        b ${{ nosuch }}";
        let file = format!("x: >-\n        {raw}\n");
        assert_eq!(
            error_at("a b ${{ nosuch }}", &file, raw).as_deref(),
            Some("wf.yml:3:15")
        );
        let raw = "\"say \\\"hi\\\" ${{ nosuch }}\"";
        let file = format!("run: {raw}\n");
        assert_eq!(
            error_at("say \"hi\" ${{ nosuch }}", &file, raw).as_deref(),
            Some("wf.yml:1:22")
        );
    }

    #[test]
    fn eval_errors_in_block_scalars_point_at_the_line() {
        let raw = "one\n  two ${{ fromJSON('x') }}";
        let file = format!("run: |\n  {raw}\n");
        let t =
            Template::parse_in_file("one\ntwo ${{ fromJSON('x') }}", span_of(&file, raw), &file);
        let c = contexts();
        let host = StaticHost::default();
        let err = t.and_then(|t| t.eval(&EvalContext::new(&c, &host))).err();
        let at = err
            .as_ref()
            .and_then(ExprError::span)
            .map(ToString::to_string);
        assert_eq!(at.as_deref(), Some("wf.yml:3:11"));
    }

    #[test]
    fn literal_is_used_verbatim() {
        let t = Template::literal("${{ not parsed }}");
        assert!(t.is_literal());
        let c = contexts();
        let host = StaticHost::default();
        assert_eq!(
            t.eval(&EvalContext::new(&c, &host)),
            Ok("${{ not parsed }}".to_owned())
        );
    }
}
