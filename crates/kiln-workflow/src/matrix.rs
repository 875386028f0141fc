//! Matrix expansion, with GitHub's exact `include`/`exclude` rules.
//!
//! A `strategy.matrix` becomes a list of [`MatrixLeg`]s, one job each:
//!
//! 1. The dimensions (`os: [a, b]`, `node: [18, 20]`) give the cartesian product, first
//!    dimension outermost, in declaration order: `(a, 18) (a, 20) (b, 18) (b, 20)`.
//! 2. Each `exclude` entry removes every combination it matches; an entry may name only some
//!    dimensions (`{os: a}` removes both `a` legs). Exclusion happens before inclusion.
//! 3. Each `include` entry, in order, is merged into every *original* combination (from step 1
//!    and 2) whose original values it does not contradict: it may add keys and may overwrite
//!    keys that an earlier `include` added, but never an original dimension value. When it fits
//!    no original combination, it becomes a new combination of its own, appended at the end.
//!    Combinations created by `include` are never extended by later entries.
//! 4. At most [`MAX_LEGS`] legs (GitHub's limit).
//!
//! A matrix whose values are expressions (`fromJSON(needs.plan.outputs.m)`) is first turned
//! into a literal one by [`evaluate_matrix`], once the contexts it needs exist.
//!
//! A leg's display suffix is its values joined by `, ` in parentheses, as GitHub names matrix
//! jobs: `build (ubuntu-latest, 18)`.

use indexmap::IndexMap;
use serde_json::Value as Json;

use crate::expr::{EvalContext, ExprError, Template};
use crate::model::{MatrixDef, json_has_expr};
use crate::span::Span;

/// GitHub's limit on the number of jobs one matrix may generate.
pub const MAX_LEGS: usize = 256;

/// One combination of matrix values (one job).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MatrixLeg {
    /// The values, dimensions first in declaration order, then keys added by `include`.
    pub values: IndexMap<String, Json>,
}

impl MatrixLeg {
    /// GitHub's job display suffix: `"(ubuntu, 18)"`, or `""` without a matrix.
    pub fn suffix(&self) -> String {
        if self.values.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = self.values.values().map(display_value).collect();
        format!("({})", parts.join(", "))
    }

    /// The display name of this leg of a job, as GitHub forms it: the job's (evaluated) name
    /// followed by the suffix, `build (ubuntu, 18)`; when the job's `name:` itself uses the
    /// `matrix` context, the evaluated name alone.
    pub fn job_display_name(&self, job: &crate::model::Job, evaluated_name: &str) -> String {
        let suffix = self.suffix();
        let name_uses_matrix = job.name.as_ref().is_some_and(|n| {
            n.expressions()
                .any(|e| e.referenced_contexts().iter().any(|c| c == "matrix"))
        });
        if suffix.is_empty() || name_uses_matrix {
            evaluated_name.to_owned()
        } else {
            format!("{evaluated_name} {suffix}")
        }
    }

    /// Whether the leg passes a `--matrix KEY:VALUE` filter: for every key named in
    /// `filter`, the leg's value (in string form) is one of the listed values.
    pub fn matches_filter(&self, filter: &IndexMap<String, Vec<String>>) -> bool {
        filter.iter().all(|(key, allowed)| {
            self.values
                .get(key)
                .is_some_and(|v| allowed.iter().any(|a| *a == display_value(v)))
        })
    }
}

fn display_value(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Null => String::new(),
        other => other.to_string(),
    }
}

/// Why a matrix cannot be expanded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MatrixError {
    /// The matrix still holds expressions; call [`evaluate_matrix`] first.
    #[error("The matrix at {0} holds expressions that must be evaluated before expansion")]
    Unevaluated(Span),
    /// More than [`MAX_LEGS`] combinations.
    #[error("The matrix at {span} expands to {count} jobs; at most {MAX_LEGS} are allowed")]
    TooManyLegs {
        /// How many there would be.
        count: usize,
        /// Where the matrix was written.
        span: Span,
    },
    /// No combination is left.
    #[error("The matrix at {0} produces no jobs")]
    Empty(Span),
    /// A dimension with no values.
    #[error("Matrix dimension `{name}` at {span} has no values")]
    EmptyDimension {
        /// The dimension.
        name: String,
        /// Where the matrix was written.
        span: Span,
    },
    /// An evaluated expression gave a value of the wrong shape.
    #[error("Matrix at {span}: {message}")]
    Shape {
        /// What is wrong.
        message: String,
        /// Where the matrix was written.
        span: Span,
    },
    /// An expression failed.
    #[error("Cannot evaluate the matrix at {span}: {source}")]
    Expr {
        /// The failure.
        #[source]
        source: ExprError,
        /// Where the matrix was written.
        span: Span,
    },
}

/// Expands a literal matrix (without expressions) into its legs.
pub fn expand_matrix(def: &MatrixDef) -> Result<Vec<MatrixLeg>, MatrixError> {
    if def.has_expressions() {
        return Err(MatrixError::Unevaluated(def.span().clone()));
    }
    let MatrixDef::Literal {
        dims,
        include,
        exclude,
        span,
        ..
    } = def
    else {
        return Err(MatrixError::Unevaluated(def.span().clone()));
    };
    expand(dims, include, exclude, span)
}

/// The legs of `dims` × `exclude` × `include`, per the module docs.
pub fn expand(
    dims: &IndexMap<String, Vec<Json>>,
    include: &[IndexMap<String, Json>],
    exclude: &[IndexMap<String, Json>],
    span: &Span,
) -> Result<Vec<MatrixLeg>, MatrixError> {
    let mut count: usize = 1;
    for (name, values) in dims {
        if values.is_empty() {
            return Err(MatrixError::EmptyDimension {
                name: name.clone(),
                span: span.clone(),
            });
        }
        count = count.saturating_mul(values.len());
    }
    if count > MAX_LEGS * 64 {
        // Refuse before building a huge product; excludes cannot plausibly save it.
        return Err(MatrixError::TooManyLegs {
            count,
            span: span.clone(),
        });
    }
    // 1. The cartesian product, first dimension outermost.
    let mut combos: Vec<IndexMap<String, Json>> = if dims.is_empty() {
        Vec::new()
    } else {
        vec![IndexMap::new()]
    };
    for (name, values) in dims {
        let mut next = Vec::with_capacity(combos.len() * values.len());
        for combo in &combos {
            for v in values {
                let mut c = combo.clone();
                c.insert(name.clone(), v.clone());
                next.push(c);
            }
        }
        combos = next;
    }
    // 2. Exclusions: an entry matches when every key it names has the same value.
    combos.retain(|combo| {
        !exclude.iter().any(|ex| {
            ex.iter()
                .all(|(k, v)| combo.get(k).is_some_and(|cv| values_match(cv, v)))
        })
    });
    // 3. Inclusions against the original combinations.
    let mut legs: Vec<MatrixLeg> = combos
        .iter()
        .map(|c| MatrixLeg { values: c.clone() })
        .collect();
    let original_len = legs.len();
    for entry in include {
        let mut merged = false;
        for (leg, original) in legs[..original_len].iter_mut().zip(&combos) {
            let fits = entry
                .iter()
                .all(|(k, v)| original.get(k).is_none_or(|ov| values_match(ov, v)));
            if fits {
                for (k, v) in entry {
                    leg.values.insert(k.clone(), v.clone());
                }
                merged = true;
            }
        }
        if !merged {
            legs.push(MatrixLeg {
                values: entry.clone(),
            });
        }
    }
    if legs.len() > MAX_LEGS {
        return Err(MatrixError::TooManyLegs {
            count: legs.len(),
            span: span.clone(),
        });
    }
    if legs.is_empty() {
        return Err(MatrixError::Empty(span.clone()));
    }
    Ok(legs)
}

fn values_match(a: &Json, b: &Json) -> bool {
    match (a, b) {
        // Numbers compare by value (`18` and `18.0` are the same matrix value).
        (Json::Number(x), Json::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Evaluates every expression in a matrix, giving a literal matrix for [`expand_matrix`].
///
/// A whole-matrix expression must produce an object (dimensions plus optional
/// `include`/`exclude` lists); a dimension expression must produce a list; an
/// `include`/`exclude` expression a list of objects. Strings inside literal values are
/// interpolated (a lone `${{ x }}` keeps `x`'s type).
pub fn evaluate_matrix(def: &MatrixDef, ctx: &EvalContext<'_>) -> Result<MatrixDef, MatrixError> {
    let span = def.span().clone();
    let eval = |t: &Template| -> Result<Json, MatrixError> {
        t.eval_value(ctx)
            .map(|v| v.to_json())
            .map_err(|source| MatrixError::Expr {
                source,
                span: span.clone(),
            })
    };
    let shape = |message: String| MatrixError::Shape {
        message,
        span: span.clone(),
    };
    let (mut raw, exprs): (IndexMap<String, Json>, _) = match def {
        MatrixDef::Expr(t) => match eval(t)? {
            Json::Object(map) => (map.into_iter().collect(), IndexMap::new()),
            other => {
                return Err(shape(format!(
                    "the matrix expression must produce an object, got `{other}`"
                )));
            }
        },
        MatrixDef::Literal {
            dims,
            include,
            exclude,
            exprs,
            ..
        } => {
            let mut raw: IndexMap<String, Json> = dims
                .iter()
                .map(|(k, v)| (k.clone(), Json::Array(v.clone())))
                .collect();
            let objects = |list: &Vec<IndexMap<String, Json>>| {
                Json::Array(
                    list.iter()
                        .map(|m| Json::Object(m.clone().into_iter().collect()))
                        .collect(),
                )
            };
            if !include.is_empty() {
                raw.insert("include".into(), objects(include));
            }
            if !exclude.is_empty() {
                raw.insert("exclude".into(), objects(exclude));
            }
            (raw, exprs.clone())
        }
    };
    for (key, t) in &exprs {
        // `insert` keeps the position of a dimension already present in `raw`.
        raw.insert(key.clone(), eval(t)?);
    }
    for value in raw.values_mut() {
        interpolate(value, &|s: &str| {
            let t = Template::parse(s, span.clone()).map_err(|source| MatrixError::Expr {
                source,
                span: span.clone(),
            })?;
            eval(&t)
        })?;
    }
    let mut dims = IndexMap::new();
    let mut include = Vec::new();
    let mut exclude = Vec::new();
    for (key, value) in raw {
        match key.as_str() {
            "include" | "exclude" => {
                let list = match value {
                    Json::Array(items) => items,
                    Json::Null => Vec::new(),
                    other => return Err(shape(format!("`{key}` must be a list, got `{other}`"))),
                };
                let mut maps = Vec::new();
                for item in list {
                    match item {
                        Json::Object(m) => maps.push(m.into_iter().collect()),
                        other => {
                            return Err(shape(format!(
                                "`{key}` entries must be objects, got `{other}`"
                            )));
                        }
                    }
                }
                if key == "include" {
                    include = maps;
                } else {
                    exclude = maps;
                }
            }
            _ => match value {
                Json::Array(items) => {
                    dims.insert(key, items);
                }
                other => {
                    return Err(shape(format!(
                        "dimension `{key}` must be a list, got `{other}`"
                    )));
                }
            },
        }
    }
    Ok(MatrixDef::Literal {
        dims,
        include,
        exclude,
        span,
        exprs: IndexMap::new(),
    })
}

fn interpolate(
    value: &mut Json,
    eval: &dyn Fn(&str) -> Result<Json, MatrixError>,
) -> Result<(), MatrixError> {
    if !json_has_expr(value) {
        return Ok(());
    }
    match value {
        Json::String(s) => *value = eval(s)?,
        Json::Array(items) => {
            for item in items {
                interpolate(item, eval)?;
            }
        }
        Json::Object(map) => {
            for item in map.values_mut() {
                interpolate(item, eval)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Json) -> IndexMap<String, Json> {
        match v {
            Json::Object(m) => m.into_iter().collect(),
            _ => panic!("object expected"),
        }
    }

    fn legs(dims: Json, include: Json, exclude: Json) -> Result<Vec<Json>, MatrixError> {
        let dims: IndexMap<String, Vec<Json>> = map(dims)
            .into_iter()
            .map(|(k, v)| (k, v.as_array().cloned().unwrap_or_default()))
            .collect();
        let list = |v: Json| -> Vec<IndexMap<String, Json>> {
            v.as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(map)
                .collect()
        };
        Ok(
            expand(&dims, &list(include), &list(exclude), &Span::unknown())?
                .into_iter()
                .map(|l| Json::Object(l.values.into_iter().collect()))
                .collect(),
        )
    }

    // GitHub docs, "Using a matrix strategy": a two-dimensional matrix runs 6 jobs, first
    // dimension outermost.
    #[test]
    fn cartesian_product_order() {
        let got = legs(
            json!({"version": [10, 12, 14], "os": ["ubuntu-latest", "windows-latest"]}),
            json!([]),
            json!([]),
        )
        .expect("valid");
        assert_eq!(
            got,
            vec![
                json!({"version": 10, "os": "ubuntu-latest"}),
                json!({"version": 10, "os": "windows-latest"}),
                json!({"version": 12, "os": "ubuntu-latest"}),
                json!({"version": 12, "os": "windows-latest"}),
                json!({"version": 14, "os": "ubuntu-latest"}),
                json!({"version": 14, "os": "windows-latest"}),
            ]
        );
    }

    // GitHub docs, "Expanding or adding matrix configurations" (fruit/animal example).
    #[test]
    fn include_extends_or_adds() {
        let got = legs(
            json!({"fruit": ["apple", "pear"], "animal": ["cat", "dog"]}),
            json!([
                {"color": "green"},
                {"color": "pink", "animal": "cat"},
                {"fruit": "apple", "shape": "circle"},
                {"fruit": "banana"},
                {"fruit": "banana", "animal": "cat"}
            ]),
            json!([]),
        )
        .expect("valid");
        assert_eq!(
            got,
            vec![
                json!({"fruit": "apple", "animal": "cat", "color": "pink", "shape": "circle"}),
                json!({"fruit": "apple", "animal": "dog", "color": "green", "shape": "circle"}),
                json!({"fruit": "pear", "animal": "cat", "color": "pink"}),
                json!({"fruit": "pear", "animal": "dog", "color": "green"}),
                json!({"fruit": "banana"}),
                json!({"fruit": "banana", "animal": "cat"}),
            ]
        );
    }

    // GitHub docs, "Example: Expanding configurations": node 16 gets npm 6 on windows only.
    #[test]
    fn include_extends_matching_legs_only() {
        let got = legs(
            json!({"os": ["windows-latest", "ubuntu-latest"], "node": [14, 16]}),
            json!([{"os": "windows-latest", "node": 16, "npm": 6}]),
            json!([]),
        )
        .expect("valid");
        assert_eq!(got.len(), 4);
        assert_eq!(
            got[1],
            json!({"os": "windows-latest", "node": 16, "npm": 6})
        );
        assert_eq!(got[3], json!({"os": "ubuntu-latest", "node": 16}));
    }

    // GitHub docs, "Example: Adding configurations": include-only matrices.
    #[test]
    fn include_only_matrix() {
        let got = legs(
            json!({}),
            json!([{"site": "production", "datacenter": "site-a"}, {"site": "staging", "datacenter": "site-b"}]),
            json!([]),
        )
        .expect("valid");
        assert_eq!(
            got,
            vec![
                json!({"site": "production", "datacenter": "site-a"}),
                json!({"site": "staging", "datacenter": "site-b"}),
            ]
        );
    }

    // GitHub docs, "Excluding matrix configurations": 12 combinations minus 2 excluded.
    #[test]
    fn exclude_partial_matches() {
        let got = legs(
            json!({"os": ["macos-latest", "windows-latest"], "version": [12, 14, 16], "environment": ["staging", "production"]}),
            json!([]),
            json!([
                {"os": "macos-latest", "version": 12, "environment": "production"},
                {"os": "windows-latest", "version": 16}
            ]),
        )
        .expect("valid");
        assert_eq!(got.len(), 12 - 1 - 2);
        assert!(
            !got.contains(
                &json!({"os": "macos-latest", "version": 12, "environment": "production"})
            )
        );
        assert!(
            got.iter()
                .all(|l| !(l["os"] == "windows-latest" && l["version"] == 16))
        );
    }

    #[test]
    fn exclude_before_include() {
        let got = legs(
            json!({"os": ["a", "b"]}),
            json!([{"os": "b", "extra": true}]),
            json!([{"os": "b"}]),
        )
        .expect("valid");
        assert_eq!(
            got,
            vec![json!({"os": "a"}), json!({"os": "b", "extra": true})]
        );
    }

    #[test]
    fn limit_is_256() {
        let values: Vec<Json> = (0..16).map(Json::from).collect();
        assert_eq!(
            legs(json!({"a": values, "b": values}), json!([]), json!([]))
                .expect("256 ok")
                .len(),
            256
        );
        let err = legs(
            json!({"a": values, "b": values}),
            json!([{"a": 99}]),
            json!([]),
        )
        .expect_err("257");
        assert!(matches!(err, MatrixError::TooManyLegs { count: 257, .. }));
    }

    #[test]
    fn everything_excluded_is_an_error() {
        let err = legs(json!({"a": [1]}), json!([]), json!([{"a": 1}])).expect_err("empty");
        assert!(matches!(err, MatrixError::Empty(_)));
    }

    #[test]
    fn suffix_like_github() {
        let leg = MatrixLeg {
            values: map(json!({"os": "ubuntu", "node": 18, "exp": true})),
        };
        assert_eq!(leg.suffix(), "(ubuntu, 18, true)");
        assert_eq!(MatrixLeg::default().suffix(), "");
    }

    #[test]
    fn filter() {
        let leg = MatrixLeg {
            values: map(json!({"os": "ubuntu", "node": 18})),
        };
        let mut f = IndexMap::new();
        f.insert("node".to_owned(), vec!["18".to_owned()]);
        assert!(leg.matches_filter(&f));
        f.insert("os".to_owned(), vec!["windows".to_owned()]);
        assert!(!leg.matches_filter(&f));
    }
}
