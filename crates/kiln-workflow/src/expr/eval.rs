//! The evaluator: a syntax tree and an [`EvalContext`] to a [`Value`].
//!
//! Evaluation works on [`Ev`], which borrows from the contexts instead of copying them, and
//! which keeps two things a plain [`Value`] cannot express:
//!
//! - **Identity.** `==` on arrays and objects is true only for the same array or object
//!   (`a == a`, never `fromJSON('[]') == fromJSON('[]')`). Context data is compared by
//!   address; values built during evaluation live in an [`Rc`] and are compared by pointer.
//! - **Filtered arrays.** `.*` and `[*]` produce a filtered array: any further property or
//!   index access applies to each element and collects what is found (`labels.*.name`),
//!   dropping elements where nothing is found, and never fails.
//!
//! `&&` and `||` short-circuit and return the deciding operand (not a boolean), as in
//! JavaScript.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::rc::Rc;

use super::functions;
use super::lexer::char_position;
use super::parser::{CmpOp, Index, Node};
use super::{EvalContext, ExprError, MAX_MEMORY_BYTES};
use crate::value::{Kind, Scalar, Value, get_ignore_case, number_to_string, scalar_cmp, scalar_eq};

/// An intermediate value.
#[derive(Debug, Clone)]
pub(crate) enum Ev<'a> {
    Null,
    Bool(bool),
    Number(f64),
    String(Cow<'a, str>),
    /// An array or object in the contexts.
    Ref(&'a Value),
    /// An array or object built during evaluation.
    Own(Rc<Value>),
    /// The result of `.*` / `[*]`.
    Filtered(Rc<Vec<Ev<'a>>>),
}

impl<'a> Ev<'a> {
    /// Wraps a value from the contexts.
    pub(crate) fn borrowed(v: &'a Value) -> Ev<'a> {
        match v {
            Value::Null => Ev::Null,
            Value::Bool(b) => Ev::Bool(*b),
            Value::Number(n) => Ev::Number(*n),
            Value::String(s) => Ev::String(Cow::Borrowed(s)),
            Value::Array(_) | Value::Object(_) => Ev::Ref(v),
        }
    }

    /// Wraps a value built during evaluation.
    pub(crate) fn owned(v: Value) -> Ev<'a> {
        match v {
            Value::Null => Ev::Null,
            Value::Bool(b) => Ev::Bool(b),
            Value::Number(n) => Ev::Number(n),
            Value::String(s) => Ev::String(Cow::Owned(s)),
            Value::Array(_) | Value::Object(_) => Ev::Own(Rc::new(v)),
        }
    }

    /// A copy of a part of an owned value (identity of the part is not kept).
    fn owned_part(v: &Value) -> Ev<'a> {
        Ev::owned(v.clone())
    }

    pub(crate) fn kind(&self) -> Kind {
        match self {
            Ev::Null => Kind::Null,
            Ev::Bool(_) => Kind::Boolean,
            Ev::Number(_) => Kind::Number,
            Ev::String(_) => Kind::String,
            Ev::Ref(v) => v.kind(),
            Ev::Own(v) => v.kind(),
            Ev::Filtered(_) => Kind::Array,
        }
    }

    pub(crate) fn scalar(&self) -> Option<Scalar<'_>> {
        match self {
            Ev::Null => Some(Scalar::Null),
            Ev::Bool(b) => Some(Scalar::Bool(*b)),
            Ev::Number(n) => Some(Scalar::Number(*n)),
            Ev::String(s) => Some(Scalar::String(s)),
            Ev::Ref(_) | Ev::Own(_) | Ev::Filtered(_) => None,
        }
    }

    pub(crate) fn is_truthy(&self) -> bool {
        match self {
            Ev::Null => false,
            Ev::Bool(b) => *b,
            Ev::Number(n) => crate::value::number_is_truthy(*n),
            Ev::String(s) => !s.is_empty(),
            Ev::Ref(_) | Ev::Own(_) | Ev::Filtered(_) => true,
        }
    }

    /// GitHub's string coercion.
    pub(crate) fn coerce_string(&self) -> Cow<'_, str> {
        match self {
            Ev::Null => Cow::Borrowed(""),
            Ev::Bool(b) => Cow::Borrowed(crate::value::bool_to_string(*b)),
            Ev::Number(n) => Cow::Owned(number_to_string(*n)),
            Ev::String(s) => Cow::Borrowed(s),
            _ => Cow::Borrowed(self.kind().name()),
        }
    }

    /// GitHub's number coercion.
    pub(crate) fn coerce_number(&self) -> f64 {
        match self.scalar() {
            Some(s) => s.to_number(),
            None => f64::NAN,
        }
    }

    /// The elements of an array (plain or filtered), borrowed or copied; `None` otherwise.
    pub(crate) fn array_items(&self) -> Option<Vec<Ev<'a>>> {
        match self {
            Ev::Ref(Value::Array(items)) => Some(items.iter().map(Ev::borrowed).collect()),
            Ev::Own(v) => match &**v {
                Value::Array(items) => Some(items.iter().map(Ev::owned_part).collect()),
                _ => None,
            },
            Ev::Filtered(items) => Some(items.as_ref().clone()),
            _ => None,
        }
    }

    /// Converts into a plain value.
    pub(crate) fn into_value(self) -> Value {
        match self {
            Ev::Null => Value::Null,
            Ev::Bool(b) => Value::Bool(b),
            Ev::Number(n) => Value::Number(n),
            Ev::String(s) => Value::String(s.into_owned()),
            Ev::Ref(v) => v.clone(),
            Ev::Own(v) => Rc::try_unwrap(v).unwrap_or_else(|rc| (*rc).clone()),
            Ev::Filtered(items) => Value::Array(
                Rc::try_unwrap(items)
                    .unwrap_or_else(|rc| (*rc).clone())
                    .into_iter()
                    .map(Ev::into_value)
                    .collect(),
            ),
        }
    }
}

/// `==` with identity for arrays and objects.
pub(crate) fn ev_eq(a: &Ev<'_>, b: &Ev<'_>) -> bool {
    match (a, b) {
        (Ev::Ref(x), Ev::Ref(y)) => std::ptr::eq(*x, *y),
        (Ev::Own(x), Ev::Own(y)) => Rc::ptr_eq(x, y),
        (Ev::Filtered(x), Ev::Filtered(y)) => Rc::ptr_eq(x, y),
        _ => match (a.scalar(), b.scalar()) {
            (Some(x), Some(y)) => scalar_eq(x, y),
            _ => false,
        },
    }
}

fn ev_cmp(a: &Ev<'_>, b: &Ev<'_>) -> Option<Ordering> {
    match (a.scalar(), b.scalar()) {
        (Some(x), Some(y)) => scalar_cmp(x, y),
        _ => None,
    }
}

fn compare(op: CmpOp, a: &Ev<'_>, b: &Ev<'_>) -> bool {
    match op {
        CmpOp::Eq => ev_eq(a, b),
        CmpOp::Ne => !ev_eq(a, b),
        CmpOp::Lt => ev_cmp(a, b) == Some(Ordering::Less),
        CmpOp::Gt => ev_cmp(a, b) == Some(Ordering::Greater),
        CmpOp::Le => ev_eq(a, b) || ev_cmp(a, b) == Some(Ordering::Less),
        CmpOp::Ge => ev_eq(a, b) || ev_cmp(a, b) == Some(Ordering::Greater),
    }
}

/// An evaluated index: the key as a string (primitives only) and as an array position
/// (non-negative finite numbers, floored).
enum Key {
    Star,
    Lookup {
        name: Option<String>,
        position: Option<usize>,
    },
}

impl Key {
    fn of(index: &Ev<'_>) -> Key {
        let name = index.scalar().map(|_| index.coerce_string().into_owned());
        let n = index.coerce_number();
        let position = if n.is_finite() && n >= 0.0 {
            // Saturating float-to-int: huge indexes are simply out of range.
            Some(n.floor() as usize)
        } else {
            None
        };
        Key::Lookup { name, position }
    }
}

/// Evaluates a tree.
pub(crate) fn evaluate(root: &Node, src: &str, ctx: &EvalContext<'_>) -> Result<Value, ExprError> {
    let mut ev = Evaluator {
        ctx: *ctx,
        src,
        memory: 0,
    };
    Ok(ev.eval(root)?.into_value())
}

pub(crate) struct Evaluator<'a, 's> {
    pub(crate) ctx: EvalContext<'a>,
    pub(crate) src: &'s str,
    memory: usize,
}

impl<'a> Evaluator<'a, '_> {
    /// An evaluation error located at byte offset `at` of the expression.
    pub(crate) fn error(&self, message: impl Into<String>, at: Option<usize>) -> ExprError {
        ExprError::Eval {
            message: message.into(),
            position: at.map(|b| char_position(self.src, b)),
            expr: self.src.to_owned(),
            span: None,
        }
    }

    /// Whether `bytes` more string data would still fit the memory budget.
    pub(crate) fn fits(&self, bytes: usize) -> bool {
        self.memory.saturating_add(bytes.saturating_mul(2)) <= MAX_MEMORY_BYTES
    }

    /// Records `bytes` of new string data, failing when the budget is exceeded.
    pub(crate) fn charge(&mut self, bytes: usize, at: usize) -> Result<(), ExprError> {
        if !self.fits(bytes) {
            return Err(self.memory_error(at));
        }
        self.memory += bytes * 2;
        Ok(())
    }

    pub(crate) fn memory_error(&self, at: usize) -> ExprError {
        self.error("The maximum allowed memory size was exceeded", Some(at))
    }

    pub(crate) fn eval(&mut self, node: &Node) -> Result<Ev<'a>, ExprError> {
        Ok(match node {
            Node::Null => Ev::Null,
            Node::Bool(b) => Ev::Bool(*b),
            Node::Number(n) => Ev::Number(*n),
            Node::String(s) => Ev::String(Cow::Owned(s.clone())),
            Node::Context(name) => {
                let contexts = self.ctx.contexts;
                match contexts
                    .get(name.as_str())
                    .or_else(|| get_ignore_case(contexts, name))
                {
                    Some(v) => Ev::borrowed(v),
                    None => Ev::Null,
                }
            }
            Node::Not(inner) => Ev::Bool(!self.eval(inner)?.is_truthy()),
            Node::Chain { first, rest } => {
                let mut left = self.eval(first)?;
                for (op, node) in rest {
                    let right = self.eval(node)?;
                    left = Ev::Bool(compare(*op, &left, &right));
                }
                left
            }
            Node::Logical { and, args } => {
                let mut result = Ev::Null;
                for arg in args {
                    result = self.eval(arg)?;
                    if result.is_truthy() != *and {
                        break;
                    }
                }
                result
            }
            Node::Index { target, index } => {
                let key = match index {
                    Index::Star => Key::Star,
                    Index::Property(name) => Key::Lookup {
                        name: Some(name.clone()),
                        position: None,
                    },
                    Index::Expr(e) => Key::of(&self.eval(e).map_err(index_error)?),
                };
                let target = self.eval(target)?;
                index_access(target, &key)
            }
            Node::Call { func, args, at } => functions::call(self, *func, args, *at)?,
        })
    }
}

/// GitHub prefixes errors from an index expression.
fn index_error(err: ExprError) -> ExprError {
    match err {
        ExprError::Eval {
            message,
            position,
            expr,
            span,
        } => ExprError::Eval {
            message: format!("could not evaluate index for index access: {message}"),
            position,
            expr,
            span,
        },
        other => other,
    }
}

fn index_access<'a>(target: Ev<'a>, key: &Key) -> Ev<'a> {
    match target {
        Ev::Filtered(items) => {
            let mut out = Vec::new();
            for item in items.iter() {
                match key {
                    Key::Star => out.extend(children(item)),
                    Key::Lookup { name, position } => {
                        let found = match item.kind() {
                            Kind::Object => name.as_deref().and_then(|n| member(item, n)),
                            Kind::Array => position.and_then(|p| element(item, p)),
                            _ => None,
                        };
                        out.extend(found);
                    }
                }
            }
            Ev::Filtered(Rc::new(out))
        }
        Ev::Ref(_) | Ev::Own(_) => match key {
            Key::Star => Ev::Filtered(Rc::new(children(&target))),
            Key::Lookup { name, position } => {
                let found = match target.kind() {
                    Kind::Object => name.as_deref().and_then(|n| member(&target, n)),
                    _ => position.and_then(|p| element(&target, p)),
                };
                found.unwrap_or(Ev::Null)
            }
        },
        _ => match key {
            Key::Star => Ev::Filtered(Rc::new(Vec::new())),
            Key::Lookup { .. } => Ev::Null,
        },
    }
}

/// All elements of an array or values of an object; nothing for other kinds.
fn children<'a>(v: &Ev<'a>) -> Vec<Ev<'a>> {
    match v {
        Ev::Ref(Value::Array(items)) => items.iter().map(Ev::borrowed).collect(),
        Ev::Ref(Value::Object(map)) => map.values().map(Ev::borrowed).collect(),
        Ev::Own(rc) => match &**rc {
            Value::Array(items) => items.iter().map(Ev::owned_part).collect(),
            Value::Object(map) => map.values().map(Ev::owned_part).collect(),
            _ => Vec::new(),
        },
        Ev::Filtered(items) => items.as_ref().clone(),
        _ => Vec::new(),
    }
}

fn member<'a>(v: &Ev<'a>, name: &str) -> Option<Ev<'a>> {
    match v {
        Ev::Ref(Value::Object(map)) => get_ignore_case(map, name).map(Ev::borrowed),
        Ev::Own(rc) => match &**rc {
            Value::Object(map) => get_ignore_case(map, name).map(Ev::owned_part),
            _ => None,
        },
        _ => None,
    }
}

fn element<'a>(v: &Ev<'a>, position: usize) -> Option<Ev<'a>> {
    match v {
        Ev::Ref(Value::Array(items)) => items.get(position).map(Ev::borrowed),
        Ev::Own(rc) => match &**rc {
            Value::Array(items) => items.get(position).map(Ev::owned_part),
            _ => None,
        },
        Ev::Filtered(items) => items.get(position).cloned(),
        _ => None,
    }
}
