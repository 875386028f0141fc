//! The expression lexer.
//!
//! Turns the body of a `${{ }}` into tokens, following GitHub's lexer rule for rule:
//!
//! - Whitespace (space, tab, `\r`, `\n`) separates tokens and is otherwise ignored.
//! - Punctuation: `( ) [ ] , . * ! != == < <= > >= && ||`. A lone `=`, `&` or `|` is an error
//!   that swallows the following characters up to the next boundary (so `1 =2` reports `=2`).
//! - A `.` is a property dot only after an identifier, `]`, `)` or `*`; anywhere else it starts
//!   a number (`.5`). Numbers (also starting with a digit, `-` or `+`) extend to the next
//!   boundary and must be valid for JavaScript's `Number()`: `0xff`, `0o17`, `1e-3`, `-.5`.
//! - Strings are single-quoted; `''` inside is a literal quote.
//! - Identifiers start with a letter or `_` and continue with letters, digits, `_` and `-`.
//!   `true`, `false`, `null`, `NaN` and `Infinity` are keywords unless they follow a `.`.
//!
//! Positions in messages are 1-based character offsets into the whole expression.

use super::{ExprError, MAX_EXPRESSION_LENGTH};
use crate::value::string_to_number;

/// Token kinds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Dot,
    Bang,
    BangEq,
    EqEq,
    Gt,
    Ge,
    Lt,
    Le,
    And,
    Or,
    Star,
    Number(f64),
    Str(String),
    Ident,
    True,
    False,
    Null,
    Eof,
}

/// A token: its kind and its byte range in the source.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub kind: Tok,
    pub start: usize,
    pub end: usize,
}

impl Token {
    /// The token as messages show it: a string token's value, otherwise its source text.
    pub fn display<'s>(&'s self, src: &'s str) -> &'s str {
        match &self.kind {
            Tok::Str(s) => s,
            Tok::Eof => "EOF",
            _ => src.get(self.start..self.end).unwrap_or(""),
        }
    }
}

/// Characters that end an identifier or number.
fn is_boundary(c: char) -> bool {
    matches!(
        c,
        '(' | '[' | ')' | ']' | ',' | '.' | '!' | '>' | '<' | '=' | '&' | '|'
    ) || is_js_space(c)
}

/// JavaScript's `\s`.
fn is_js_space(c: char) -> bool {
    matches!(
        c,
        '\u{9}'..='\u{d}'
            | ' '
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202f}'
                | '\u{205f}'
                | '\u{3000}'
                | '\u{feff}'
    )
}

fn is_legal_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// 1-based character position of a byte offset, as used in messages.
pub(crate) fn char_position(src: &str, byte: usize) -> usize {
    src.get(..byte).map_or(0, |p| p.chars().count()) + 1
}

struct Lexer<'s> {
    src: &'s str,
    pos: usize,
    start: usize,
    tokens: Vec<Token>,
}

/// Splits `src` into tokens, ending with [`Tok::Eof`].
pub(crate) fn lex(src: &str) -> Result<Vec<Token>, ExprError> {
    if src.encode_utf16().count() > MAX_EXPRESSION_LENGTH {
        return Err(ExprError::Lex {
            message: format!("Exceeded max expression length {MAX_EXPRESSION_LENGTH}"),
            position: 1,
            expr: src.to_owned(),
            span: None,
        });
    }
    let mut lx = Lexer {
        src,
        pos: 0,
        start: 0,
        tokens: Vec::new(),
    };
    lx.run()?;
    Ok(lx.tokens)
}

impl<'s> Lexer<'s> {
    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn peek_next(&self) -> Option<char> {
        let mut it = self.src[self.pos..].chars();
        it.next();
        it.next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, expected: char) -> bool {
        if self.peek() == Some(expected) {
            self.pos += expected.len_utf8();
            true
        } else {
            false
        }
    }

    fn previous(&self) -> Option<&Tok> {
        self.tokens.last().map(|t| &t.kind)
    }

    fn push(&mut self, kind: Tok) {
        self.tokens.push(Token {
            kind,
            start: self.start,
            end: self.pos,
        });
    }

    fn push_at(&mut self, kind: Tok, start: usize, end: usize) {
        self.tokens.push(Token { kind, start, end });
    }

    fn error(&self, text: &str) -> ExprError {
        ExprError::Lex {
            message: format!("Unexpected symbol: '{text}'"),
            position: char_position(self.src, self.start),
            expr: self.src.to_owned(),
            span: None,
        }
    }

    fn run(&mut self) -> Result<(), ExprError> {
        loop {
            let at = self.pos;
            let Some(c) = self.bump() else { break };
            self.start = at;
            match c {
                '(' => self.push(Tok::LParen),
                ')' => self.push(Tok::RParen),
                '[' => self.push(Tok::LBracket),
                ']' => self.push(Tok::RBracket),
                ',' => self.push(Tok::Comma),
                '*' => self.push(Tok::Star),
                '.' => {
                    if matches!(
                        self.previous(),
                        Some(Tok::Ident | Tok::RBracket | Tok::RParen | Tok::Star)
                    ) {
                        self.push(Tok::Dot);
                    } else {
                        self.number()?;
                    }
                }
                '-' | '+' => self.number()?,
                '!' => {
                    let kind = if self.eat('=') {
                        Tok::BangEq
                    } else {
                        Tok::Bang
                    };
                    self.push(kind);
                }
                '=' => {
                    if self.eat('=') {
                        self.push(Tok::EqEq);
                    } else {
                        self.identifier()?;
                    }
                }
                '<' => {
                    let kind = if self.eat('=') { Tok::Le } else { Tok::Lt };
                    self.push(kind);
                }
                '>' => {
                    let kind = if self.eat('=') { Tok::Ge } else { Tok::Gt };
                    self.push(kind);
                }
                '&' => {
                    if self.eat('&') {
                        self.push(Tok::And);
                    } else {
                        self.identifier()?;
                    }
                }
                '|' => {
                    if self.eat('|') {
                        self.push(Tok::Or);
                    } else {
                        self.identifier()?;
                    }
                }
                ' ' | '\r' | '\t' | '\n' => {}
                '\'' => self.string()?,
                c if c.is_ascii_digit() => self.number()?,
                _ => self.identifier()?,
            }
        }
        // Like GitHub's lexer, the end token is placed where the last token (or whitespace)
        // started, which is where "Unexpected symbol: 'EOF'" points.
        self.push_at(Tok::Eof, self.start, self.pos);
        Ok(())
    }

    fn number(&mut self) -> Result<(), ExprError> {
        while let Some(c) = self.peek() {
            if is_boundary(c) && c != '.' {
                break;
            }
            self.bump();
        }
        let lexeme = &self.src[self.start..self.pos];
        let value = string_to_number(lexeme);
        // `Number()` also accepts the empty string and surrounding whitespace, neither of
        // which a lexeme can contain; NaN means it is not a number.
        if value.is_nan() {
            return Err(self.error(lexeme));
        }
        self.push(Tok::Number(value));
        Ok(())
    }

    fn string(&mut self) -> Result<(), ExprError> {
        let mut value = String::new();
        loop {
            match self.peek() {
                None => {
                    let rest = &self.src[self.start..];
                    return Err(self.error(rest));
                }
                Some('\'') if self.peek_next() == Some('\'') => {
                    self.pos += 2;
                    value.push('\'');
                }
                Some('\'') => {
                    self.pos += 1;
                    break;
                }
                Some(c) => {
                    self.pos += c.len_utf8();
                    value.push(c);
                }
            }
        }
        self.push(Tok::Str(value));
        Ok(())
    }

    fn identifier(&mut self) -> Result<(), ExprError> {
        while let Some(c) = self.peek() {
            if is_boundary(c) {
                break;
            }
            self.bump();
        }
        let lexeme = &self.src[self.start..self.pos];
        let mut kind = Tok::Ident;
        if self.previous() != Some(&Tok::Dot) {
            kind = match lexeme {
                "true" => Tok::True,
                "false" => Tok::False,
                "null" => Tok::Null,
                "NaN" => Tok::Number(f64::NAN),
                "Infinity" => Tok::Number(f64::INFINITY),
                _ => Tok::Ident,
            };
        }
        if !is_legal_identifier(lexeme) {
            return Err(self.error(lexeme));
        }
        self.push(kind);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<Tok> {
        lex(src)
            .map(|t| t.into_iter().map(|t| t.kind).collect())
            .unwrap_or_default()
    }

    #[test]
    fn dot_is_property_only_after_an_operand() {
        assert_eq!(
            kinds("a.b"),
            vec![Tok::Ident, Tok::Dot, Tok::Ident, Tok::Eof]
        );
        assert_eq!(kinds(".5"), vec![Tok::Number(0.5), Tok::Eof]);
        assert_eq!(
            kinds("a.*.b"),
            vec![
                Tok::Ident,
                Tok::Dot,
                Tok::Star,
                Tok::Dot,
                Tok::Ident,
                Tok::Eof
            ]
        );
    }

    #[test]
    fn keywords_after_dot_are_identifiers() {
        assert_eq!(
            kinds("a.true"),
            vec![Tok::Ident, Tok::Dot, Tok::Ident, Tok::Eof]
        );
        assert_eq!(kinds("true"), vec![Tok::True, Tok::Eof]);
        assert_eq!(kinds("TRUE"), vec![Tok::Ident, Tok::Eof]);
    }

    #[test]
    fn strings_unescape_every_doubled_quote() {
        assert_eq!(kinds("'a''b''c'"), vec![Tok::Str("a'b'c".into()), Tok::Eof]);
    }

    #[test]
    fn lone_equals_swallows_to_boundary() {
        let err = lex("1 =2 =3")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("Unexpected symbol: '=2'. Located at position 3"),
            "{err}"
        );
    }

    #[test]
    fn too_long_input_is_rejected() {
        let src = "1".repeat(MAX_EXPRESSION_LENGTH + 1);
        assert!(lex(&src).is_err());
    }
}
