//! The expression parser: tokens to a syntax tree.
//!
//! Precedence, lowest first (all binary operators are left-associative):
//!
//! | level | operators |
//! |---|---|
//! | or | `\|\|` |
//! | and | `&&` |
//! | equality | `==` `!=` |
//! | comparison | `<` `<=` `>` `>=` |
//! | unary | `!` |
//! | postfix | `.name` `.*` `[expr]` `[*]` (only after a context, a call or a group) |
//! | primary | literals, `( expr )`, `name`, `name(args)` |
//!
//! Each level is a function that calls the next tighter one (a precedence-climbing parser
//! written out by hand). `&&` and `||` chains become one n-ary node, and `==`/`<` chains one
//! flat node, so a long chain (`1 || 2 || ... || 5000`) never builds a deep tree.
//!
//! Nesting is limited the way GitHub limits it: every sub-expression (the whole expression,
//! a group, a call argument, an index), every `!`, every postfix access and every `&&`/`||`
//! chain adds one level, and more than [`MAX_DEPTH`](super::MAX_DEPTH) levels is the error
//! `Exceeded max expression depth 50`. Since the tree can be no deeper than that, evaluating
//! and dropping it cannot overflow the stack.
//!
//! Named values (contexts) and function names are checked while parsing, as GitHub does:
//! an unknown name or a wrong argument count is a parse error.

use super::lexer::{Tok, Token, char_position};
use super::{ExprError, MAX_DEPTH, NamedValues};

/// A syntax tree node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    /// A named value (context), as written.
    Context(String),
    /// `target.name`, `target[index]`, `target.*`, `target[*]`.
    Index {
        target: Box<Node>,
        index: Index,
    },
    Not(Box<Node>),
    /// `first op1 e1 op2 e2 ...` for the equality or comparison level, evaluated left to right.
    Chain {
        first: Box<Node>,
        rest: Vec<(CmpOp, Node)>,
    },
    /// `a && b && ...` (`and == true`) or `a || b || ...`.
    Logical {
        and: bool,
        args: Vec<Node>,
    },
    Call {
        func: Func,
        args: Vec<Node>,
        /// Byte offset of the function name.
        at: usize,
    },
}

/// What an index selects.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Index {
    /// `.*` or `[*]`.
    Star,
    /// `.name`.
    Property(String),
    /// `[expr]`.
    Expr(Box<Node>),
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// The built-in functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Func {
    Contains,
    StartsWith,
    EndsWith,
    Format,
    Join,
    ToJson,
    FromJson,
    HashFiles,
    Case,
    Success,
    Always,
    Cancelled,
    Failure,
}

impl Func {
    fn lookup(name: &str) -> Option<Func> {
        Some(match name.to_ascii_lowercase().as_str() {
            "contains" => Func::Contains,
            "startswith" => Func::StartsWith,
            "endswith" => Func::EndsWith,
            "format" => Func::Format,
            "join" => Func::Join,
            "tojson" => Func::ToJson,
            "fromjson" => Func::FromJson,
            "hashfiles" => Func::HashFiles,
            "case" => Func::Case,
            "success" => Func::Success,
            "always" => Func::Always,
            "cancelled" => Func::Cancelled,
            "failure" => Func::Failure,
            _ => return None,
        })
    }

    /// Minimum and maximum argument counts.
    fn arity(self) -> (usize, usize) {
        match self {
            Func::Contains | Func::StartsWith | Func::EndsWith => (2, 2),
            Func::Format | Func::HashFiles => (1, 255),
            Func::Join => (1, 2),
            Func::ToJson | Func::FromJson => (1, 1),
            Func::Case => (3, usize::MAX),
            Func::Success | Func::Always | Func::Cancelled | Func::Failure => (0, 0),
        }
    }

    /// Whether this is one of the job-status functions that cancel the implicit `success()`.
    pub(crate) fn is_status(self) -> bool {
        matches!(
            self,
            Func::Success | Func::Always | Func::Cancelled | Func::Failure
        )
    }
}

/// Parse error kinds and their fixed descriptions.
#[derive(Debug, Clone, Copy)]
enum ParseErrorKind {
    UnexpectedSymbol,
    UnexpectedEnd,
    UnrecognizedNamedValue,
    UnrecognizedFunction,
    ExceededMaxDepth,
    TooFewParameters,
    TooManyParameters,
    EvenParameters,
}

impl ParseErrorKind {
    fn description(self) -> String {
        match self {
            ParseErrorKind::UnexpectedSymbol => "Unexpected symbol".into(),
            ParseErrorKind::UnexpectedEnd => "Unexpected end of expression".into(),
            ParseErrorKind::UnrecognizedNamedValue => "Unrecognized named-value".into(),
            ParseErrorKind::UnrecognizedFunction => "Unrecognized function".into(),
            ParseErrorKind::ExceededMaxDepth => {
                format!("Exceeded max expression depth {MAX_DEPTH}")
            }
            ParseErrorKind::TooFewParameters => "Too few parameters supplied".into(),
            ParseErrorKind::TooManyParameters => "Too many parameters supplied".into(),
            ParseErrorKind::EvenParameters => {
                "Even number of parameters supplied, requires an odd number of parameters".into()
            }
        }
    }
}

/// Parses tokens into a tree; `Ok(None)` for an empty expression.
pub(crate) fn parse(
    src: &str,
    tokens: &[Token],
    names: &NamedValues,
) -> Result<Option<Node>, ExprError> {
    let mut p = Parser {
        src,
        tokens,
        pos: 0,
        depth: 0,
        names,
    };
    if p.at_end() {
        return Ok(None);
    }
    let node = p.expression()?;
    if !p.at_end() {
        return Err(p.error(ParseErrorKind::UnexpectedSymbol, p.peek()));
    }
    Ok(Some(node))
}

struct Parser<'p> {
    src: &'p str,
    tokens: &'p [Token],
    pos: usize,
    depth: usize,
    names: &'p NamedValues,
}

/// The result of [`Parser::call`]/[`Parser::primary`]: whether postfix access may follow.
struct Operand {
    node: Node,
    indexable: bool,
}

impl<'p> Parser<'p> {
    fn peek(&self) -> &'p Token {
        let last = self.tokens.len().saturating_sub(1);
        &self.tokens[self.pos.min(last)]
    }

    fn previous(&self) -> &'p Token {
        &self.tokens[self.pos.saturating_sub(1)]
    }

    fn at_end(&self) -> bool {
        self.peek().kind == Tok::Eof
    }

    fn check(&self, kind: &Tok) -> bool {
        std::mem::discriminant(&self.peek().kind) == std::mem::discriminant(kind)
    }

    fn advance(&mut self) -> &'p Token {
        if !self.at_end() {
            self.pos += 1;
        }
        self.previous()
    }

    fn eat(&mut self, kind: &Tok) -> bool {
        if !self.at_end() && self.check(kind) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, kind: &Tok) -> Result<(), ExprError> {
        if self.eat(kind) {
            Ok(())
        } else {
            Err(self.error(ParseErrorKind::UnexpectedSymbol, self.peek()))
        }
    }

    fn error(&self, kind: ParseErrorKind, tok: &Token) -> ExprError {
        ExprError::Parse {
            message: format!("{}: '{}'", kind.description(), tok.display(self.src)),
            position: char_position(self.src, tok.start),
            expr: self.src.to_owned(),
            span: None,
        }
    }

    fn enter(&mut self) -> Result<(), ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error(ParseErrorKind::ExceededMaxDepth, self.peek()));
        }
        Ok(())
    }

    fn leave(&mut self, levels: usize) {
        self.depth -= levels;
    }

    fn expression(&mut self) -> Result<Node, ExprError> {
        self.enter()?;
        let node = self.logical(false)?;
        self.leave(1);
        Ok(node)
    }

    /// `||` (`and == false`) or `&&` (`and == true`) chains.
    fn logical(&mut self, and: bool) -> Result<Node, ExprError> {
        let op = if and { Tok::And } else { Tok::Or };
        let first = self.logical_operand(and)?;
        if !self.check(&op) {
            return Ok(first);
        }
        self.enter()?;
        let mut args = vec![first];
        while self.eat(&op) {
            args.push(self.logical_operand(and)?);
        }
        self.leave(1);
        Ok(Node::Logical { and, args })
    }

    fn logical_operand(&mut self, and: bool) -> Result<Node, ExprError> {
        if and {
            self.equality()
        } else {
            self.logical(true)
        }
    }

    fn equality(&mut self) -> Result<Node, ExprError> {
        let first = self.comparison()?;
        let mut rest = Vec::new();
        loop {
            let op = match self.peek().kind {
                Tok::EqEq => CmpOp::Eq,
                Tok::BangEq => CmpOp::Ne,
                _ => break,
            };
            self.advance();
            rest.push((op, self.comparison()?));
        }
        Ok(chain(first, rest))
    }

    fn comparison(&mut self) -> Result<Node, ExprError> {
        let first = self.unary()?;
        let mut rest = Vec::new();
        loop {
            let op = match self.peek().kind {
                Tok::Lt => CmpOp::Lt,
                Tok::Le => CmpOp::Le,
                Tok::Gt => CmpOp::Gt,
                Tok::Ge => CmpOp::Ge,
                _ => break,
            };
            self.advance();
            rest.push((op, self.unary()?));
        }
        Ok(chain(first, rest))
    }

    fn unary(&mut self) -> Result<Node, ExprError> {
        if self.eat(&Tok::Bang) {
            self.enter()?;
            let inner = self.unary()?;
            self.leave(1);
            return Ok(Node::Not(Box::new(inner)));
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Result<Node, ExprError> {
        let Operand {
            mut node,
            indexable,
        } = self.call()?;
        if !indexable {
            return Ok(node);
        }
        let mut levels = 0;
        let result = loop {
            if self.eat(&Tok::LBracket) {
                let index = if self.eat(&Tok::Star) {
                    Index::Star
                } else {
                    match self.expression() {
                        Ok(n) => Index::Expr(Box::new(n)),
                        Err(e) => break Err(e),
                    }
                };
                if let Err(e) = self.expect(&Tok::RBracket) {
                    break Err(e);
                }
                levels += 1;
                if let Err(e) = self.enter() {
                    break Err(e);
                }
                node = Node::Index {
                    target: Box::new(node),
                    index,
                };
            } else if self.eat(&Tok::Dot) {
                levels += 1;
                if let Err(e) = self.enter() {
                    break Err(e);
                }
                let index = if self.eat(&Tok::Ident) {
                    let tok = self.previous();
                    Index::Property(self.src[tok.start..tok.end].to_owned())
                } else if self.eat(&Tok::Star) {
                    Index::Star
                } else {
                    break Err(self.error(ParseErrorKind::UnexpectedSymbol, self.peek()));
                };
                node = Node::Index {
                    target: Box::new(node),
                    index,
                };
            } else {
                break Ok(node);
            }
        };
        self.leave(levels);
        result
    }

    fn call(&mut self) -> Result<Operand, ExprError> {
        if !self.check(&Tok::Ident) {
            return self.primary();
        }
        let ident = self.advance();
        let name = &self.src[ident.start..ident.end];
        if !self.eat(&Tok::LParen) {
            if !self.names.contains(name) {
                return Err(self.error(ParseErrorKind::UnrecognizedNamedValue, ident));
            }
            return Ok(Operand {
                node: Node::Context(name.to_owned()),
                indexable: true,
            });
        }
        let mut args = Vec::new();
        while !self.eat(&Tok::RParen) {
            args.push(self.expression()?);
            if !self.check(&Tok::RParen) {
                self.expect(&Tok::Comma)?;
            }
        }
        let Some(func) = Func::lookup(name) else {
            return Err(self.error(ParseErrorKind::UnrecognizedFunction, ident));
        };
        let (min, max) = func.arity();
        if args.len() < min {
            return Err(self.error(ParseErrorKind::TooFewParameters, ident));
        }
        if args.len() > max {
            return Err(self.error(ParseErrorKind::TooManyParameters, ident));
        }
        if func == Func::Case && args.len().is_multiple_of(2) {
            return Err(self.error(ParseErrorKind::EvenParameters, ident));
        }
        Ok(Operand {
            node: Node::Call {
                func,
                args,
                at: ident.start,
            },
            indexable: true,
        })
    }

    fn primary(&mut self) -> Result<Operand, ExprError> {
        let literal = |node| {
            Ok(Operand {
                node,
                indexable: false,
            })
        };
        let tok = self.peek();
        match &tok.kind {
            Tok::False => {
                self.advance();
                literal(Node::Bool(false))
            }
            Tok::True => {
                self.advance();
                literal(Node::Bool(true))
            }
            Tok::Null => {
                self.advance();
                literal(Node::Null)
            }
            Tok::Number(n) => {
                self.advance();
                literal(Node::Number(*n))
            }
            Tok::Str(s) => {
                self.advance();
                literal(Node::String(s.clone()))
            }
            Tok::LParen => {
                self.advance();
                let node = self.expression()?;
                if self.at_end() {
                    return Err(self.error(ParseErrorKind::UnexpectedEnd, self.previous()));
                }
                self.expect(&Tok::RParen)?;
                Ok(Operand {
                    node,
                    indexable: true,
                })
            }
            Tok::Eof => Err(self.error(ParseErrorKind::UnexpectedEnd, self.previous())),
            _ => Err(self.error(ParseErrorKind::UnexpectedSymbol, tok)),
        }
    }
}

fn chain(first: Node, rest: Vec<(CmpOp, Node)>) -> Node {
    if rest.is_empty() {
        first
    } else {
        Node::Chain {
            first: Box::new(first),
            rest,
        }
    }
}
