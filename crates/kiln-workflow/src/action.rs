//! An action's metadata file (`action.yml` / `action.yaml`), read as GitHub's runner reads it.
//!
//! [`parse_action`] runs the same spanned [`crate::yaml`] loader as workflows and converts the
//! tree into an [`Action`]: its inputs (with defaults and `required`), its outputs, and how it
//! runs ([`ActionRuns`]): a composite list of steps, a JavaScript entry point for one of the
//! node runtimes (with optional `pre`/`post` scripts and their conditions), or a Docker
//! container. Every problem is a [`Diagnostic`] with `file:line:col`; all are reported at once.
//!
//! Composite steps become ordinary [`Step`] values, so the runner evaluates them with the same
//! code as workflow steps. GitHub requires `shell:` on every composite `run:` step; so does this
//! loader.

use std::sync::Arc;

use indexmap::IndexMap;

use crate::expr::{Condition, Template};
use crate::load::{Diagnostic, did_you_mean, valid_id};
use crate::model::{BoolOrExpr, Env, Step, StepAction};
use crate::span::{Span, Spanned};
use crate::yaml::{self, Node, NodeKind};

/// A parsed `action.yml`.
#[derive(Debug, Clone)]
pub struct Action {
    /// The file name used in positions.
    pub file: Arc<str>,
    /// `name:`.
    pub name: Option<String>,
    /// `description:`.
    pub description: Option<String>,
    /// `inputs:` in declaration order.
    pub inputs: IndexMap<String, ActionInput>,
    /// `outputs:` in declaration order.
    pub outputs: IndexMap<String, ActionOutput>,
    /// `runs:`.
    pub runs: ActionRuns,
}

/// One declared input.
#[derive(Debug, Clone)]
pub struct ActionInput {
    /// Where the input is declared.
    pub span: Span,
    /// `required:`. GitHub's runner does not enforce it; the action's toolkit does.
    pub required: bool,
    /// `default:` (may contain expressions, evaluated in the calling step's context).
    pub default: Option<Template>,
    /// `deprecationMessage:`: printed as a warning when the caller sets the input.
    pub deprecation_message: Option<String>,
}

/// One declared output.
#[derive(Debug, Clone)]
pub struct ActionOutput {
    /// Where the output is declared.
    pub span: Span,
    /// `value:` (composite actions map outputs from their steps; other kinds set them at run
    /// time).
    pub value: Option<Template>,
}

/// How an action runs.
#[derive(Debug, Clone)]
pub enum ActionRuns {
    /// `using: composite`.
    Composite {
        /// The steps; every `run:` step has a `shell:`.
        steps: Vec<Step>,
    },
    /// `using: node16|node20|node24` (and the retired `node12`).
    Node(Box<NodeRuns>),
    /// `using: docker`.
    Docker {
        /// The `using:` value with its position.
        using: Spanned<String>,
        /// `image:`.
        image: Option<Spanned<String>>,
    },
}

/// A JavaScript action's entry points.
#[derive(Debug, Clone)]
pub struct NodeRuns {
    /// The `using:` value (`node20`) with its position.
    pub using: Spanned<String>,
    /// The major Node.js version asked for (20 for `node20`).
    pub version: u32,
    /// `main:`, relative to the action's directory.
    pub main: Spanned<String>,
    /// `pre:`.
    pub pre: Option<Spanned<String>>,
    /// `pre-if:` (GitHub's default is `always()`).
    pub pre_if: Option<Condition>,
    /// `post:`.
    pub post: Option<Spanned<String>>,
    /// `post-if:` (GitHub's default is `always()`).
    pub post_if: Option<Condition>,
}

/// Every problem found in an action's metadata file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", .diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ActionError {
    /// The problems, in document order.
    pub diagnostics: Vec<Diagnostic>,
}

const ROOT_KEYS: &[&str] = &[
    "name",
    "author",
    "description",
    "inputs",
    "outputs",
    "runs",
    "branding",
];
const INPUT_KEYS: &[&str] = &["description", "required", "default", "deprecationMessage"];
const OUTPUT_KEYS: &[&str] = &["description", "value"];
const RUNS_KEYS: &[&str] = &[
    "using",
    "main",
    "pre",
    "pre-if",
    "post",
    "post-if",
    "steps",
    "image",
    "args",
    "env",
    "entrypoint",
    "pre-entrypoint",
    "post-entrypoint",
];
const STEP_KEYS: &[&str] = &[
    "id",
    "if",
    "name",
    "uses",
    "run",
    "shell",
    "with",
    "env",
    "continue-on-error",
    "working-directory",
];

/// Parses and validates an action's metadata. `file` is the name used in positions.
pub fn parse_action(file: &str, text: &str) -> Result<Action, ActionError> {
    let root = yaml::load(file, text).map_err(|diagnostics| ActionError { diagnostics })?;
    let mut loader = ActionLoader {
        text,
        diagnostics: Vec::new(),
    };
    let action = loader.action(file, &root);
    match action {
        Some(a) if loader.diagnostics.is_empty() => Ok(a),
        _ => Err(ActionError {
            diagnostics: loader.diagnostics,
        }),
    }
}

struct ActionLoader<'t> {
    text: &'t str,
    diagnostics: Vec<Diagnostic>,
}

type Entries = [(Spanned<String>, Node)];

impl ActionLoader<'_> {
    fn error(&mut self, span: &Span, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic {
            span: span.clone(),
            message: message.into(),
            help: None,
        });
    }

    fn map<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n Entries> {
        match &node.kind {
            NodeKind::Map(entries) => Some(entries),
            NodeKind::Null => Some(&[]),
            _ => {
                self.error(
                    &node.span,
                    format!("`{what}` must be a mapping, found {}", node.kind_name()),
                );
                None
            }
        }
    }

    fn check_keys(&mut self, entries: &Entries, allowed: &[&str], context: &str) {
        for (key, _) in entries {
            if !allowed.contains(&key.value.as_str()) {
                let help = did_you_mean(&key.value, allowed)
                    .map(|s| format!("did you mean `{s}`?"))
                    .unwrap_or_else(|| {
                        format!(
                            "expected one of {}",
                            allowed
                                .iter()
                                .map(|k| format!("`{k}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    });
                self.diagnostics.push(Diagnostic {
                    span: key.span.clone(),
                    message: format!("Unknown key `{}` in {context}", key.value),
                    help: Some(help),
                });
            }
        }
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<Spanned<String>> {
        match node.scalar_string() {
            Some(s) => Some(Spanned::new(s, node.span.clone())),
            None => {
                self.error(
                    &node.span,
                    format!("`{what}` must be a string, found {}", node.kind_name()),
                );
                None
            }
        }
    }

    fn template(&mut self, node: &Node, what: &str) -> Option<Template> {
        let text = match &node.kind {
            NodeKind::Null => String::new(),
            _ => self.string(node, what)?.value,
        };
        match Template::parse_in_file(&text, node.span.clone(), self.text) {
            Ok(t) => Some(t),
            Err(e) => {
                let span = e.span().unwrap_or(&node.span).clone();
                self.error(&span, format!("Invalid expression in `{what}`: {e}"));
                None
            }
        }
    }

    fn condition(&mut self, node: &Node, what: &str) -> Option<Condition> {
        let s = self.string(node, what)?;
        match Condition::parse_in_file(&s.value, s.span.clone(), self.text) {
            Ok(c) => Some(c),
            Err(e) => {
                let span = e.span().unwrap_or(&s.span).clone();
                self.error(&span, format!("Invalid expression in `{what}`: {e}"));
                None
            }
        }
    }

    fn template_map(&mut self, node: &Node, what: &str) -> IndexMap<String, Template> {
        let mut out = IndexMap::new();
        let Some(entries) = self.map(node, what) else {
            return out;
        };
        for (key, value) in entries {
            if let Some(t) = self.template(value, &format!("{what}.{}", key.value)) {
                out.insert(key.value.clone(), t);
            }
        }
        out
    }

    fn action(&mut self, file: &str, root: &Node) -> Option<Action> {
        let entries = self.map(root, "action")?;
        self.check_keys(entries, ROOT_KEYS, "the action metadata");
        let mut action_name = None;
        let mut description = None;
        let mut inputs = IndexMap::new();
        let mut outputs = IndexMap::new();
        let mut runs = None;
        for (key, value) in entries {
            match key.value.as_str() {
                "name" => action_name = self.string(value, "name").map(|s| s.value),
                "description" => description = self.string(value, "description").map(|s| s.value),
                "inputs" => inputs = self.inputs(value),
                "outputs" => outputs = self.outputs(value),
                "runs" => runs = self.runs(value),
                _ => {}
            }
        }
        let Some(runs) = runs else {
            if !entries.iter().any(|(k, _)| k.value == "runs") {
                self.error(&root.span, "The action metadata has no `runs:`");
            }
            return None;
        };
        if !matches!(runs, ActionRuns::Composite { .. }) {
            for (name, output) in &outputs {
                if output.value.is_some() {
                    self.error(
                        &output.span,
                        format!("Output `{name}`: `value` is only allowed in composite actions"),
                    );
                }
            }
        }
        Some(Action {
            file: Arc::from(file),
            name: action_name,
            description,
            inputs,
            outputs,
            runs,
        })
    }

    fn inputs(&mut self, node: &Node) -> IndexMap<String, ActionInput> {
        let mut out = IndexMap::new();
        let Some(entries) = self.map(node, "inputs") else {
            return out;
        };
        for (key, value) in entries {
            let mut input = ActionInput {
                span: key.span.clone(),
                required: false,
                default: None,
                deprecation_message: None,
            };
            let Some(fields) = self.map(value, &format!("inputs.{}", key.value)) else {
                continue;
            };
            self.check_keys(fields, INPUT_KEYS, &format!("input `{}`", key.value));
            for (k, v) in fields {
                match k.value.as_str() {
                    "required" => match &v.kind {
                        NodeKind::Bool(b) => input.required = *b,
                        // GitHub accepts the strings too (`required: 'true'`).
                        NodeKind::String { value, .. } => {
                            input.required = value.eq_ignore_ascii_case("true");
                        }
                        _ => self.error(
                            &v.span,
                            format!(
                                "`inputs.{}.required` must be a boolean, found {}",
                                key.value,
                                v.kind_name()
                            ),
                        ),
                    },
                    "default" => {
                        input.default = self.template(v, &format!("inputs.{}.default", key.value));
                    }
                    "deprecationMessage" => {
                        input.deprecation_message = self
                            .string(v, &format!("inputs.{}.deprecationMessage", key.value))
                            .map(|s| s.value);
                    }
                    _ => {}
                }
            }
            out.insert(key.value.clone(), input);
        }
        out
    }

    fn outputs(&mut self, node: &Node) -> IndexMap<String, ActionOutput> {
        let mut out = IndexMap::new();
        let Some(entries) = self.map(node, "outputs") else {
            return out;
        };
        for (key, value) in entries {
            let Some(fields) = self.map(value, &format!("outputs.{}", key.value)) else {
                continue;
            };
            self.check_keys(fields, OUTPUT_KEYS, &format!("output `{}`", key.value));
            let value = fields
                .iter()
                .find(|(k, _)| k.value == "value")
                .and_then(|(_, v)| self.template(v, &format!("outputs.{}.value", key.value)));
            out.insert(
                key.value.clone(),
                ActionOutput {
                    span: key.span.clone(),
                    value,
                },
            );
        }
        out
    }

    fn runs(&mut self, node: &Node) -> Option<ActionRuns> {
        let entries = self.map(node, "runs")?;
        self.check_keys(entries, RUNS_KEYS, "`runs`");
        let get = |name: &str| entries.iter().find(|(k, _)| k.value == name);
        let Some((_, using_node)) = get("using") else {
            self.error(&node.span, "`runs` has no `using:`");
            return None;
        };
        let using = self.string(using_node, "runs.using")?;
        let kind = using.value.to_ascii_lowercase();
        match kind.as_str() {
            "composite" => {
                let Some((_, steps_node)) = get("steps") else {
                    self.error(&node.span, "A composite action needs `runs.steps`");
                    return None;
                };
                let steps = self.steps(steps_node);
                Some(ActionRuns::Composite { steps })
            }
            "docker" => {
                let image = get("image").and_then(|(_, v)| self.string(v, "runs.image"));
                Some(ActionRuns::Docker { using, image })
            }
            node_kind if node_kind.starts_with("node") => {
                let Ok(version) = node_kind["node".len()..].parse::<u32>() else {
                    self.error(&using.span, format!("Unknown runtime `{}`", using.value));
                    return None;
                };
                let Some((_, main_node)) = get("main") else {
                    self.error(&node.span, "A JavaScript action needs `runs.main`");
                    return None;
                };
                let main = self.string(main_node, "runs.main")?;
                let pre = get("pre").and_then(|(_, v)| self.string(v, "runs.pre"));
                let post = get("post").and_then(|(_, v)| self.string(v, "runs.post"));
                let pre_if = get("pre-if").and_then(|(_, v)| self.condition(v, "runs.pre-if"));
                let post_if = get("post-if").and_then(|(_, v)| self.condition(v, "runs.post-if"));
                Some(ActionRuns::Node(Box::new(NodeRuns {
                    using,
                    version,
                    main,
                    pre,
                    pre_if,
                    post,
                    post_if,
                })))
            }
            _ => {
                self.diagnostics.push(Diagnostic {
                    span: using.span.clone(),
                    message: format!("Unknown `runs.using: {}`", using.value),
                    help: Some("expected composite, node16, node20, node24 or docker".into()),
                });
                None
            }
        }
    }

    fn steps(&mut self, node: &Node) -> Vec<Step> {
        let NodeKind::Seq(items) = &node.kind else {
            self.error(
                &node.span,
                format!(
                    "`runs.steps` must be a sequence, found {}",
                    node.kind_name()
                ),
            );
            return Vec::new();
        };
        let mut ids: Vec<String> = Vec::new();
        items
            .iter()
            .enumerate()
            .filter_map(|(index, item)| self.step(index, item, &mut ids))
            .collect()
    }

    fn step(&mut self, index: usize, node: &Node, ids: &mut Vec<String>) -> Option<Step> {
        let context = format!("composite step {}", index + 1);
        let entries = self.map(node, &format!("runs.steps[{index}]"))?;
        self.check_keys(entries, STEP_KEYS, &context);
        let get = |name: &str| entries.iter().find(|(k, _)| k.value == name);
        let mut id = None;
        let mut name = None;
        let mut if_cond = None;
        let mut env = Env::new();
        let mut continue_on_error = BoolOrExpr::Bool(false);
        for (k, v) in entries {
            match k.value.as_str() {
                "id" => {
                    if let Some(s) = self.string(v, "id") {
                        if !valid_id(&s.value) {
                            self.error(&s.span, format!("Invalid step id `{}`", s.value));
                        } else if ids.contains(&s.value) {
                            self.error(&s.span, format!("Duplicate step id `{}`", s.value));
                        } else {
                            ids.push(s.value.clone());
                            id = Some(s);
                        }
                    }
                }
                "name" => name = self.template(v, "name"),
                "if" => if_cond = self.condition(v, "if"),
                "env" => env = self.template_map(v, "env"),
                "continue-on-error" => {
                    continue_on_error = match &v.kind {
                        NodeKind::Bool(b) => BoolOrExpr::Bool(*b),
                        _ => self
                            .template(v, "continue-on-error")
                            .map_or(BoolOrExpr::Bool(false), BoolOrExpr::Expr),
                    };
                }
                _ => {}
            }
        }
        let action = match (get("run"), get("uses")) {
            (Some((_, run)), None) => {
                let script = self.template(run, "run")?;
                let Some((_, shell_node)) = get("shell") else {
                    self.diagnostics.push(Diagnostic {
                        span: node.span.clone(),
                        message: format!(
                            "A `run` step in a composite action needs `shell:` ({context})"
                        ),
                        help: Some("add `shell: bash` (or sh, python, ...)".into()),
                    });
                    return None;
                };
                let shell = self.string(shell_node, "shell");
                let working_directory = get("working-directory")
                    .and_then(|(_, v)| self.template(v, "working-directory"));
                StepAction::Run {
                    script,
                    shell,
                    working_directory,
                }
            }
            (None, Some((_, uses_node))) => {
                let uses = self.string(uses_node, "uses")?;
                if uses.value.contains("${{") || uses.value.trim().is_empty() {
                    self.error(
                        &uses.span,
                        "`uses` must name an action, without expressions",
                    );
                    return None;
                }
                let with = get("with")
                    .map(|(_, v)| self.template_map(v, "with"))
                    .unwrap_or_default();
                StepAction::Uses { uses, with }
            }
            (Some(_), Some((k, _))) => {
                self.error(
                    &k.span,
                    format!("A step cannot have both `run` and `uses` ({context})"),
                );
                return None;
            }
            (None, None) => {
                self.error(
                    &node.span,
                    format!("A step must have either `run` or `uses` ({context})"),
                );
                return None;
            }
        };
        Some(Step {
            index,
            span: node.span.clone(),
            id,
            name,
            if_cond,
            action,
            env,
            continue_on_error,
            timeout_minutes: None,
            env_expr: None,
            background: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_with_inputs_outputs_and_steps() {
        let text = "name: greet\ninputs:\n  who:\n    required: true\n  greeting:\n    default: Hello ${{ github.actor }}\noutputs:\n  said:\n    value: ${{ steps.say.outputs.text }}\nruns:\n  using: composite\n  steps:\n    - id: say\n      run: echo hi\n      shell: bash\n    - uses: ./other\n      with:\n        x: 1\n";
        let action = parse_action("action.yml", text).expect("valid");
        assert_eq!(action.name.as_deref(), Some("greet"));
        assert!(action.inputs["who"].required);
        assert!(action.inputs["greeting"].default.is_some());
        assert!(action.outputs["said"].value.is_some());
        let ActionRuns::Composite { steps } = &action.runs else {
            panic!("composite expected");
        };
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].id.as_ref().map(|s| s.value.as_str()), Some("say"));
        assert!(
            matches!(&steps[1].action, StepAction::Uses { uses, .. } if uses.value == "./other")
        );
    }

    #[test]
    fn node_action_with_pre_and_post() {
        let text = "name: n\nruns:\n  using: node20\n  main: dist/index.js\n  pre: pre.js\n  pre-if: runner.os == 'Linux'\n  post: post.js\n";
        let action = parse_action("action.yml", text).expect("valid");
        let ActionRuns::Node(node) = &action.runs else {
            panic!("node expected");
        };
        assert_eq!(node.version, 20);
        assert_eq!(node.main.value, "dist/index.js");
        assert!(node.pre_if.is_some());
        assert!(node.post_if.is_none());
        assert_eq!(
            node.post.as_ref().map(|p| p.value.as_str()),
            Some("post.js")
        );
    }

    #[test]
    fn composite_run_without_shell_names_the_position() {
        let text = "name: x\nruns:\n  using: composite\n  steps:\n    - run: echo hi\n";
        let err = parse_action("a/action.yml", text).expect_err("shell is required");
        assert!(err.to_string().contains("a/action.yml:5:7"), "{err}");
        assert!(err.to_string().contains("needs `shell:`"), "{err}");
    }

    #[test]
    fn unknown_keys_and_runtimes_are_errors() {
        let err = parse_action("action.yml", "name: x\nrun:\n  using: node20\n").expect_err("bad");
        assert!(err.to_string().contains("Unknown key `run`"), "{err}");
        let err = parse_action("action.yml", "runs:\n  using: java\n  main: x\n").expect_err("bad");
        assert!(
            err.to_string()
                .contains("action.yml:2:10: Unknown `runs.using: java`"),
            "{err}"
        );
    }

    #[test]
    fn docker_actions_parse_so_the_runner_can_refuse_them() {
        let action = parse_action(
            "action.yml",
            "runs:\n  using: docker\n  image: Dockerfile\n",
        )
        .expect("valid");
        assert!(matches!(action.runs, ActionRuns::Docker { .. }));
    }
}
