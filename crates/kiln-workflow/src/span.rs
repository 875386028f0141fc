//! Source positions.
//!
//! Every value read from a workflow file keeps the [`Span`] it was written at, so that any later
//! error (a bad key, a failing expression, a matrix that is too large) can name `file:line:col`.
//! Lines and columns are 1-based and count characters; `start`/`end` are byte offsets into the
//! file's text, so `&text[span.start..span.end]` is the source of the value.

use std::fmt;
use std::sync::Arc;

/// A range of a workflow file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Span {
    /// The file name as given to [`crate::parse_workflow`].
    pub file: Arc<str>,
    /// 1-based line of the first character.
    pub line: u32,
    /// 1-based column (in characters) of the first character.
    pub col: u32,
    /// Byte offset of the first character.
    pub start: usize,
    /// Byte offset one past the last character.
    pub end: usize,
}

impl Span {
    /// A span for values that were not read from a file (defaults, values built in code).
    pub fn unknown() -> Span {
        Span {
            file: Arc::from("<unknown>"),
            line: 0,
            col: 0,
            start: 0,
            end: 0,
        }
    }

    /// A span covering a whole file's first position.
    pub fn file_start(file: Arc<str>) -> Span {
        Span {
            file,
            line: 1,
            col: 1,
            start: 0,
            end: 0,
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// A value together with where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    /// The value.
    pub value: T,
    /// Where it was written.
    pub span: Span,
}

impl<T> Spanned<T> {
    /// Pairs a value with its span.
    pub fn new(value: T, span: Span) -> Spanned<T> {
        Spanned { value, span }
    }
}

impl<T> std::ops::Deref for Spanned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_file_line_col() {
        let span = Span {
            file: Arc::from(".github/workflows/ci.yml"),
            line: 3,
            col: 7,
            start: 20,
            end: 25,
        };
        assert_eq!(span.to_string(), ".github/workflows/ci.yml:3:7");
    }
}
