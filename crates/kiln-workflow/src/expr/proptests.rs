//! Property tests: no input makes the expression front end panic or overflow the stack.
//!
//! Inputs are either arbitrary strings or "token soup" (random sequences of the language's
//! own fragments, which reach much deeper into the parser and evaluator than random bytes).
//! Every outcome must be an `Ok` or a typed error whose message renders.

use indexmap::IndexMap;
use proptest::prelude::*;

use super::{Condition, EvalContext, Expr, Host, JobStatus, Template};
use crate::span::Span;
use crate::value::Value;

const FRAGMENTS: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    ".",
    "*",
    "!",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "&&",
    "||",
    ",",
    " ",
    "\n",
    "'",
    "''",
    "'a'",
    "'{0}'",
    "'{'",
    "'}}'",
    "'{0}{1}'",
    "0",
    "1",
    "-1",
    ".5",
    "0xff",
    "1e3",
    "-0",
    "NaN",
    "Infinity",
    "-Infinity",
    "true",
    "false",
    "null",
    "github",
    "matrix",
    "env",
    "needs",
    "steps",
    "foo",
    "bar",
    "a-b",
    "format(",
    "fromJSON(",
    "toJSON(",
    "join(",
    "contains(",
    "startsWith(",
    "endsWith(",
    "case(",
    "hashFiles(",
    "success()",
    "failure()",
    "always()",
    "cancelled()",
    "'[1,2,{\"a\":[3]}]'",
    "'{\"x\":{\"y\":1}}'",
    "${{",
    "}}",
    "=",
    "&",
    "|",
    "@",
    "😊",
];

struct TestHost(JobStatus);

impl Host for TestHost {
    fn job_status(&self) -> JobStatus {
        self.0
    }
    fn hash_files(&self, patterns: &[String]) -> Result<String, String> {
        if patterns.len().is_multiple_of(2) {
            Ok("0".repeat(64))
        } else {
            Err("no files".to_owned())
        }
    }
}

fn contexts() -> IndexMap<String, Value> {
    let mut c = IndexMap::new();
    let json = serde_json::json!({
        "event": {"labels": [{"name": "bug"}, {"name": "x"}], "n": 3, "s": "text"},
        "ref": "refs/heads/main"
    });
    c.insert("github".to_owned(), Value::from_json(json));
    c.insert(
        "matrix".to_owned(),
        Value::from_json(serde_json::json!({"os": ["a", "b"], "n": [1, 2.5, null]})),
    );
    c.insert(
        "env".to_owned(),
        Value::from_json(serde_json::json!({"A": "1"})),
    );
    c
}

/// Cases per property: 2000, or `KILN_PROPTEST_CASES` for a longer campaign.
fn cases() -> u32 {
    std::env::var("KILN_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..60).prop_map(|parts| parts.concat())
}

/// Parses and evaluates; only checks that nothing panics and errors render.
fn exercise(src: &str) {
    let c = contexts();
    for status in [JobStatus::Success, JobStatus::Failure] {
        let host = TestHost(status);
        let ctx = EvalContext::new(&c, &host);
        match Expr::parse(src) {
            Ok(e) => {
                if let Err(err) = e.eval(&ctx) {
                    assert!(!err.to_string().is_empty());
                }
                let _ = e.uses_status_function();
                let _ = e.referenced_contexts();
            }
            Err(err) => assert!(!err.to_string().is_empty()),
        }
        match Template::parse(src, Span::unknown()) {
            Ok(t) => {
                let _ = t.eval(&ctx);
                let _ = t.eval_value(&ctx);
            }
            Err(err) => assert!(!err.to_string().is_empty()),
        }
        if let Ok(cond) = Condition::parse(src, Span::unknown()) {
            let _ = cond.eval(&ctx);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn arbitrary_strings_never_panic(src in any::<String>()) {
        exercise(&src);
    }

    #[test]
    fn token_soup_never_panics(src in soup()) {
        exercise(&src);
    }

    #[test]
    fn token_soup_in_templates_never_panics(a in soup(), b in soup()) {
        exercise(&format!("x ${{{{ {a} }}}} y ${{{{{b}}}}}"));
    }

    #[test]
    fn deep_nesting_is_an_error_not_an_overflow(
        depth in 0usize..3000,
        open in prop::sample::select(&["(", "!", "fromJSON(", "github[", "format('{0}', ", "case(true, "][..]),
    ) {
        let close = match open {
            "(" | "fromJSON(" | "format('{0}', " => ")",
            "case(true, " => ", 1)",
            "github[" => "]",
            _ => "",
        };
        let src = format!("{}'1'{}", open.repeat(depth), close.repeat(depth));
        let parsed = Expr::parse(&src);
        if depth >= 50 {
            // Past the depth limit, or so long that the length limit comes first.
            let err = parsed.err().map(|e| e.message().to_owned()).unwrap_or_default();
            prop_assert!(
                err.starts_with("Exceeded max expression depth 50")
                    || err.starts_with("Exceeded max expression length"),
                "depth {}: {}",
                depth,
                err
            );
        } else {
            prop_assert!(parsed.is_ok(), "depth {}: {:?}", depth, parsed.err());
        }
    }

    #[test]
    fn long_postfix_chains_are_an_error_not_an_overflow(n in 0usize..4000) {
        let src = format!("github{}", ".a".repeat(n));
        let parsed = Expr::parse(&src);
        prop_assert_eq!(parsed.is_ok(), n < 50);
    }
}
