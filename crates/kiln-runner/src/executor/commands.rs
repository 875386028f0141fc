//! File commands and workflow commands, as GitHub's runner reads them.
//!
//! File commands: before each step the runner creates fresh, empty files and passes their paths
//! in `GITHUB_ENV`, `GITHUB_OUTPUT`, `GITHUB_PATH`, `GITHUB_STATE` and `GITHUB_STEP_SUMMARY`.
//! After the step, `GITHUB_ENV`, `GITHUB_OUTPUT` and `GITHUB_STATE` hold `NAME=value` lines or
//! the multi-line form
//!
//! ```text
//! NAME<<DELIMITER
//! line 1
//! line 2
//! DELIMITER
//! ```
//!
//! `GITHUB_PATH` holds one directory per line, and `GITHUB_STEP_SUMMARY` Markdown.
//!
//! Workflow commands are `::name key=value,...::message` lines on stdout. kiln acts on
//! `add-mask`, `set-output`, `save-state`, `stop-commands`, `group`/`endgroup`, `debug` and the
//! annotation commands `notice`, `warning` and `error`.

use indexmap::IndexMap;

/// A malformed file command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileCommandError {
    /// `NAME<<DELIM` without a closing `DELIM` line.
    #[error("Line {line} of {file}: no closing delimiter `{delimiter}` for `{name}`")]
    MissingDelimiter {
        /// Which file command (`GITHUB_ENV`, ...).
        file: &'static str,
        /// 1-based line of the `NAME<<DELIM` line.
        line: usize,
        /// The variable name.
        name: String,
        /// The delimiter.
        delimiter: String,
    },
    /// A line that is neither `NAME=value` nor `NAME<<DELIM`.
    #[error("Line {line} of {file}: expected `NAME=value` or `NAME<<DELIMITER`, found `{text}`")]
    Malformed {
        /// Which file command.
        file: &'static str,
        /// 1-based line.
        line: usize,
        /// The line, shortened.
        text: String,
    },
    /// An empty name.
    #[error("Line {line} of {file}: the name is empty")]
    EmptyName {
        /// Which file command.
        file: &'static str,
        /// 1-based line.
        line: usize,
    },
}

/// Parses the `NAME=value` / `NAME<<DELIM` format of `GITHUB_ENV`, `GITHUB_OUTPUT` and
/// `GITHUB_STATE`. Later assignments to the same name win.
pub fn parse_key_values(
    file: &'static str,
    text: &str,
) -> Result<IndexMap<String, String>, FileCommandError> {
    let mut values = IndexMap::new();
    let lines: Vec<&str> = text.split('\n').collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].strip_suffix('\r').unwrap_or(lines[i]);
        let line_no = i + 1;
        i += 1;
        if line.is_empty() {
            continue;
        }
        let heredoc = line.find("<<");
        let equals = line.find('=');
        // Whichever separator comes first decides the form, as in GitHub's runner.
        let use_heredoc = match (heredoc, equals) {
            (Some(h), Some(e)) => h < e,
            (Some(_), None) => true,
            _ => false,
        };
        if use_heredoc {
            let (name, delimiter) = line.split_at(heredoc.unwrap_or_default());
            let delimiter = &delimiter[2..];
            if name.is_empty() {
                return Err(FileCommandError::EmptyName {
                    file,
                    line: line_no,
                });
            }
            let mut body: Vec<&str> = Vec::new();
            let mut closed = false;
            while i < lines.len() {
                let l = lines[i].strip_suffix('\r').unwrap_or(lines[i]);
                i += 1;
                if l == delimiter {
                    closed = true;
                    break;
                }
                body.push(l);
            }
            if !closed {
                return Err(FileCommandError::MissingDelimiter {
                    file,
                    line: line_no,
                    name: name.to_owned(),
                    delimiter: delimiter.to_owned(),
                });
            }
            values.insert(name.to_owned(), body.join("\n"));
        } else if let Some(e) = equals {
            let (name, value) = (&line[..e], &line[e + 1..]);
            if name.is_empty() {
                return Err(FileCommandError::EmptyName {
                    file,
                    line: line_no,
                });
            }
            values.insert(name.to_owned(), value.to_owned());
        } else {
            return Err(FileCommandError::Malformed {
                file,
                line: line_no,
                text: line.chars().take(60).collect(),
            });
        }
    }
    Ok(values)
}

/// Parses `GITHUB_PATH`: one directory per non-empty line.
pub fn parse_path_file(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// A workflow command found in a step's stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowCommand {
    /// The command name, lowercase (`add-mask`, `error`, ...).
    pub name: String,
    /// `key=value` properties, unescaped.
    pub properties: IndexMap<String, String>,
    /// The message after the second `::`, unescaped.
    pub message: String,
}

/// Parses `::name k=v,k2=v2::message`. Returns `None` for a line that is not a command.
pub fn parse_workflow_command(line: &str) -> Option<WorkflowCommand> {
    let rest = line.trim_start().strip_prefix("::")?;
    let end = rest.find("::")?;
    let (head, message) = (&rest[..end], &rest[end + 2..]);
    let (name, props) = match head.find(' ') {
        Some(space) => (&head[..space], &head[space + 1..]),
        None => (head, ""),
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return None;
    }
    let mut properties = IndexMap::new();
    for pair in props.split(',').filter(|p| !p.trim().is_empty()) {
        if let Some((k, v)) = pair.split_once('=') {
            properties.insert(k.trim().to_owned(), unescape_property(v));
        }
    }
    Some(WorkflowCommand {
        name: name.to_ascii_lowercase(),
        properties,
        message: unescape_data(message),
    })
}

fn unescape_data(s: &str) -> String {
    s.replace("%0D", "\r")
        .replace("%0A", "\n")
        .replace("%25", "%")
}

fn unescape_property(s: &str) -> String {
    s.replace("%0D", "\r")
        .replace("%0A", "\n")
        .replace("%3A", ":")
        .replace("%2C", ",")
        .replace("%25", "%")
}

/// An `::error`, `::warning` or `::notice` annotation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Annotation {
    /// `error`, `warning` or `notice`.
    pub level: String,
    /// The message (secrets masked).
    pub message: String,
    /// `file=`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// `line=`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// `col=`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub col: Option<u32>,
    /// `title=`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The step index it came from.
    pub step: usize,
}

impl std::fmt::Display for Annotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.level)?;
        if let Some(file) = &self.file {
            write!(f, " {file}")?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
                if let Some(col) = self.col {
                    write!(f, ":{col}")?;
                }
            }
        }
        write!(f, ": ")?;
        if let Some(title) = &self.title {
            write!(f, "{title}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Replaces every secret (and every value added with `::add-mask::`) in log text by `***`.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    secrets: Vec<String>,
}

impl Masker {
    /// Adds a value to hide. Empty values and values of fewer than 2 characters are ignored
    /// (masking single characters would make logs unreadable without protecting anything).
    pub fn add(&mut self, secret: &str) {
        for part in std::iter::once(secret).chain(secret.lines()) {
            let part = part.trim_end_matches('\r');
            if part.chars().count() >= 2 && !self.secrets.iter().any(|s| s == part) {
                self.secrets.push(part.to_owned());
            }
        }
        // Longest first, so a secret that contains another is masked whole.
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    /// The text with every secret replaced.
    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "***");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_simple_and_multiline() {
        let text = "A=1\nB=x=y\r\nMULTI<<EOF\nline 1\nline 2\nEOF\nA=2\n";
        let values = parse_key_values("GITHUB_ENV", text).expect("parse");
        assert_eq!(values["A"], "2");
        assert_eq!(values["B"], "x=y");
        assert_eq!(values["MULTI"], "line 1\nline 2");
        assert_eq!(values.len(), 3);
    }

    #[test]
    fn key_values_equals_before_heredoc_is_a_plain_value() {
        let values = parse_key_values("GITHUB_OUTPUT", "X=a<<b\n").expect("parse");
        assert_eq!(values["X"], "a<<b");
    }

    #[test]
    fn key_values_missing_delimiter_is_an_error() {
        let err = parse_key_values("GITHUB_ENV", "OK=1\nM<<END\nbody\n").expect_err("error");
        assert_eq!(
            err.to_string(),
            "Line 2 of GITHUB_ENV: no closing delimiter `END` for `M`"
        );
    }

    #[test]
    fn key_values_malformed_line_is_an_error() {
        let err = parse_key_values("GITHUB_OUTPUT", "just text").expect_err("error");
        assert!(err.to_string().contains("expected `NAME=value`"), "{err}");
    }

    #[test]
    fn path_file_lines() {
        assert_eq!(
            parse_path_file("/a/bin\n\n/b/bin\r\n"),
            vec!["/a/bin".to_owned(), "/b/bin".to_owned()]
        );
    }

    #[test]
    fn workflow_commands_parse() {
        let cmd = parse_workflow_command("::error file=app.js,line=1,title=A%2CB::Bad%0Athing")
            .expect("command");
        assert_eq!(cmd.name, "error");
        assert_eq!(cmd.properties["file"], "app.js");
        assert_eq!(cmd.properties["title"], "A,B");
        assert_eq!(cmd.message, "Bad\nthing");
        let mask = parse_workflow_command("::add-mask::hunter2").expect("command");
        assert_eq!(mask.name, "add-mask");
        assert_eq!(mask.message, "hunter2");
        assert!(parse_workflow_command("plain text").is_none());
        assert!(parse_workflow_command(":: nope").is_none());
    }

    #[test]
    fn masker_hides_secrets_and_their_lines() {
        let mut masker = Masker::default();
        masker.add("hunter2");
        masker.add("multi\nline-secret");
        masker.add("x");
        assert_eq!(masker.mask("pw=hunter2!"), "pw=***!");
        assert_eq!(masker.mask("line-secret here"), "*** here");
        assert_eq!(masker.mask("x marks"), "x marks");
    }
}
