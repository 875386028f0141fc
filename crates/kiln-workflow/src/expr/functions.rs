//! The built-in functions.
//!
//! All names are case-insensitive and argument counts are checked by the parser. Strings are
//! compared ignoring case (`contains` lower-cases, `startsWith`/`endsWith` upper-case except
//! the dotless `ı`, as GitHub does). Functions that build strings (`format`, `join`, `toJSON`)
//! and `fromJSON` charge what they build to the evaluation's memory budget, so nested
//! `format` calls cannot grow a string without bound.

use std::borrow::Cow;

use super::ExprError;
use super::JobStatus;
use super::eval::{Ev, Evaluator, ev_eq};
use super::parser::{Func, Node};
use crate::value::{
    Value, bool_to_string, push_indent, upper_special, write_json_number, write_json_string,
};

/// The canonical (documented) name of a function.
pub(crate) fn name(func: Func) -> &'static str {
    match func {
        Func::Contains => "contains",
        Func::StartsWith => "startsWith",
        Func::EndsWith => "endsWith",
        Func::Format => "format",
        Func::Join => "join",
        Func::ToJson => "toJSON",
        Func::FromJson => "fromJSON",
        Func::HashFiles => "hashFiles",
        Func::Case => "case",
        Func::Success => "success",
        Func::Always => "always",
        Func::Cancelled => "cancelled",
        Func::Failure => "failure",
    }
}

/// Calls `func`; `at` is the byte offset of its name (for error positions).
pub(crate) fn call<'a>(
    ev: &mut Evaluator<'a, '_>,
    func: Func,
    args: &[Node],
    at: usize,
) -> Result<Ev<'a>, ExprError> {
    // Like GitHub's evaluator, every argument is evaluated first (also for `case`).
    let mut values = Vec::with_capacity(args.len());
    for a in args {
        values.push(ev.eval(a)?);
    }
    if func == Func::Case {
        return case(ev, values);
    }
    let arg = |i: usize| values.get(i).unwrap_or(&Ev::Null);
    Ok(match func {
        Func::Contains => Ev::Bool(contains(arg(0), arg(1))),
        Func::StartsWith => Ev::Bool(affix(arg(0), arg(1), |s, p| s.starts_with(p))),
        Func::EndsWith => Ev::Bool(affix(arg(0), arg(1), |s, p| s.ends_with(p))),
        Func::Format => format(ev, &values, at)?,
        Func::Join => join(ev, arg(0), values.get(1), at)?,
        Func::ToJson => {
            let mut out = String::new();
            write_ev_json(arg(0), 0, &mut out);
            ev.charge(out.len(), at)?;
            Ev::String(Cow::Owned(out))
        }
        Func::FromJson => from_json(ev, arg(0), at)?,
        Func::HashFiles => {
            let patterns: Vec<String> = values
                .iter()
                .map(|v| v.coerce_string().into_owned())
                .collect();
            match ev.ctx.host.hash_files(&patterns) {
                Ok(hash) => Ev::String(Cow::Owned(hash)),
                Err(message) => {
                    return Err(ev.error(
                        format!("hashFiles('{}') failed: {message}", patterns.join(", ")),
                        Some(at),
                    ));
                }
            }
        }
        Func::Success => Ev::Bool(ev.ctx.host.job_status() == JobStatus::Success),
        Func::Failure => Ev::Bool(ev.ctx.host.job_status() == JobStatus::Failure),
        Func::Cancelled => Ev::Bool(ev.ctx.host.job_status() == JobStatus::Cancelled),
        Func::Always => Ev::Bool(true),
        Func::Case => Ev::Null, // returned above
    })
}

/// `case(pred1, val1, pred2, val2, ..., default)`: the value after the first `true`
/// predicate, else the default. Predicates up to the first `true` must be booleans.
fn case<'a>(ev: &Evaluator<'a, '_>, values: Vec<Ev<'a>>) -> Result<Ev<'a>, ExprError> {
    let default = values.len().saturating_sub(1);
    let mut values = values.into_iter();
    let mut i = 0;
    while i < default {
        let predicate = values.next();
        let value = values.next();
        match predicate {
            Some(Ev::Bool(true)) => return Ok(value.unwrap_or(Ev::Null)),
            Some(Ev::Bool(false)) => {}
            _ => return Err(ev.error("case predicate must evaluate to a boolean value", None)),
        }
        i += 2;
    }
    Ok(values.next().unwrap_or(Ev::Null))
}

fn contains(haystack: &Ev<'_>, needle: &Ev<'_>) -> bool {
    if haystack.kind().is_primitive() {
        if !needle.kind().is_primitive() {
            return false;
        }
        let h = haystack.coerce_string().to_lowercase();
        let n = needle.coerce_string().to_lowercase();
        return h.contains(&n);
    }
    match haystack.array_items() {
        Some(items) => items.iter().any(|item| ev_eq(needle, item)),
        None => false,
    }
}

/// `startsWith`/`endsWith`: both sides must be primitives.
fn affix(s: &Ev<'_>, part: &Ev<'_>, test: fn(&str, &str) -> bool) -> bool {
    if !s.kind().is_primitive() || !part.kind().is_primitive() {
        return false;
    }
    test(
        &upper_special(&s.coerce_string()),
        &upper_special(&part.coerce_string()),
    )
}

/// `format(fmt, args...)`: `{N}` is replaced by argument N, `{{` and `}}` are literal braces.
/// Any other brace is an error, as is `{N}` past the last argument.
fn format<'a>(
    ev: &mut Evaluator<'a, '_>,
    values: &[Ev<'a>],
    at: usize,
) -> Result<Ev<'a>, ExprError> {
    let fs = values.first().map(Ev::coerce_string).unwrap_or_default();
    let fs: &str = &fs;
    let invalid = |ev: &Evaluator<'_, '_>| {
        ev.error(
            format!("The following format string is invalid: {fs}"),
            Some(at),
        )
    };
    let mut out = String::new();
    let mut index = 0;
    while index < fs.len() {
        let lbrace = fs[index..].find('{').map(|i| i + index);
        let rbrace = fs[index..].find('}').map(|i| i + index);
        match (lbrace, rbrace) {
            (Some(l), r) if r.is_none_or(|r| r > l) => {
                if fs.as_bytes().get(l + 1) == Some(&b'{') {
                    out.push_str(&fs[index..=l]);
                    index = l + 2;
                    continue;
                }
                let Some(r) = r.filter(|r| *r > l + 1) else {
                    return Err(invalid(ev));
                };
                let digits = fs[l + 1..].bytes().take_while(u8::is_ascii_digit).count();
                if digits == 0 {
                    return Err(invalid(ev));
                }
                // Like GitHub, anything between the digits and the `}` is ignored.
                let arg = fs[l + 1..l + 1 + digits]
                    .parse::<usize>()
                    .ok()
                    .and_then(|n| n.checked_add(1))
                    .and_then(|n| values.get(n));
                let Some(arg) = arg else {
                    return Err(ev.error(
                        format!("The following format string references more arguments than were supplied: {fs}"),
                        Some(at),
                    ));
                };
                out.push_str(&fs[index..l]);
                out.push_str(&arg.coerce_string());
                index = r + 1;
            }
            (_, Some(r)) => {
                if fs.as_bytes().get(r + 1) == Some(&b'}') {
                    out.push_str(&fs[index..=r]);
                    index = r + 2;
                } else {
                    return Err(invalid(ev));
                }
            }
            _ => {
                out.push_str(&fs[index..]);
                break;
            }
        }
        if !ev.fits(out.len()) {
            return Err(ev.memory_error(at));
        }
    }
    ev.charge(out.len(), at)?;
    Ok(Ev::String(Cow::Owned(out)))
}

/// `join(array, separator = ',')`: a primitive is returned as a string; items are coerced to
/// strings; anything else is `''`.
fn join<'a>(
    ev: &mut Evaluator<'a, '_>,
    target: &Ev<'a>,
    separator: Option<&Ev<'a>>,
    at: usize,
) -> Result<Ev<'a>, ExprError> {
    if target.kind().is_primitive() {
        return Ok(Ev::String(Cow::Owned(target.coerce_string().into_owned())));
    }
    let Some(items) = target.array_items() else {
        return Ok(Ev::String(Cow::Borrowed("")));
    };
    let sep = match separator {
        Some(s) if s.kind().is_primitive() => s.coerce_string().into_owned(),
        _ => ",".to_owned(),
    };
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&sep);
        }
        out.push_str(&item.coerce_string());
        if !ev.fits(out.len()) {
            return Err(ev.memory_error(at));
        }
    }
    ev.charge(out.len(), at)?;
    Ok(Ev::String(Cow::Owned(out)))
}

/// GitHub's message for `fromJSON` failures (kiln adds the parser's detail after it).
const FROM_JSON_ERROR: &str = "Error parsing JSON when evaluating fromJson";

fn from_json<'a>(
    ev: &mut Evaluator<'a, '_>,
    input: &Ev<'a>,
    at: usize,
) -> Result<Ev<'a>, ExprError> {
    let text = input.coerce_string();
    if text.trim().is_empty() {
        return Err(ev.error(format!("{FROM_JSON_ERROR}: empty input"), Some(at)));
    }
    ev.charge(text.len(), at)?;
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(json) => Ok(Ev::owned(Value::from_json(json))),
        Err(e) => Err(ev.error(format!("{FROM_JSON_ERROR}: {e}"), Some(at))),
    }
}

/// `toJSON` of an intermediate value (same format as [`Value::to_json_pretty`]).
fn write_ev_json(v: &Ev<'_>, level: usize, out: &mut String) {
    match v {
        Ev::Null => out.push_str("null"),
        Ev::Bool(b) => out.push_str(bool_to_string(*b)),
        Ev::Number(n) => write_json_number(*n, out),
        Ev::String(s) => write_json_string(s, out),
        Ev::Ref(v) => crate::value::write_json(v, level, out),
        Ev::Own(v) => crate::value::write_json(v, level, out),
        Ev::Filtered(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_indent(level + 1, out);
                write_ev_json(item, level + 1, out);
            }
            push_indent(level, out);
            out.push(']');
        }
    }
}

#[cfg(test)]
mod tests {
    use indexmap::IndexMap;

    use super::super::{EvalContext, Expr, Host, JobStatus, StaticHost};
    use crate::value::Value;

    struct Hashing;

    impl Host for Hashing {
        fn job_status(&self) -> JobStatus {
            JobStatus::Failure
        }
        fn hash_files(&self, patterns: &[String]) -> Result<String, String> {
            if patterns.iter().any(|p| p.is_empty()) {
                Err("empty pattern".into())
            } else {
                Ok(format!("hash-of-{}", patterns.join("+")))
            }
        }
    }

    fn eval_on(src: &str, host: &dyn Host) -> Result<Value, String> {
        let contexts = IndexMap::new();
        Expr::parse(src)
            .and_then(|e| e.eval(&EvalContext::new(&contexts, host)))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn hash_files_asks_the_host() {
        assert_eq!(
            eval_on("hashFiles('**/Cargo.lock', 'x')", &Hashing),
            Ok(Value::from("hash-of-**/Cargo.lock+x"))
        );
        let err = eval_on("hashFiles('')", &Hashing).err().unwrap_or_default();
        assert!(err.contains("empty pattern"), "{err}");
    }

    #[test]
    fn status_functions_read_the_host() {
        assert_eq!(eval_on("failure()", &Hashing), Ok(Value::Bool(true)));
        assert_eq!(eval_on("success()", &Hashing), Ok(Value::Bool(false)));
        assert_eq!(eval_on("always()", &Hashing), Ok(Value::Bool(true)));
        assert_eq!(
            eval_on("cancelled()", &StaticHost::default()),
            Ok(Value::Bool(false))
        );
    }

    #[test]
    fn case_evaluates_every_argument_like_github() {
        // GitHub evaluates all arguments first, so an error in an untaken branch surfaces.
        let err = eval_on("case(true, 'a', fromJSON(''))", &StaticHost::default());
        assert!(err.is_err_and(|e| e.contains("empty input")));
        // Predicates after the first `true` are not checked.
        assert_eq!(
            eval_on(
                "case(true, 'a', 'not a bool', 'b', 'c')",
                &StaticHost::default()
            ),
            Ok(Value::from("a"))
        );
    }

    #[test]
    fn nested_format_hits_the_memory_limit() {
        let big = "'{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}{0}'";
        let mut src = "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'".to_owned();
        for _ in 0..8 {
            src = format!("format({big}, {src})");
        }
        let err = eval_on(&src, &StaticHost::default())
            .err()
            .unwrap_or_default();
        assert!(
            err.contains("The maximum allowed memory size was exceeded"),
            "{err}"
        );
    }

    #[test]
    fn from_json_errors_are_evaluation_errors() {
        let err = eval_on("fromJSON('{')", &StaticHost::default())
            .err()
            .unwrap_or_default();
        assert!(
            err.starts_with("Error parsing JSON when evaluating fromJson: "),
            "{err}"
        );
    }
}
