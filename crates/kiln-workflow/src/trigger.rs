//! Matching an event against a workflow's `on:`.
//!
//! GitHub starts a workflow for an event when the event's name is listed under `on:` and every
//! filter configured for it passes:
//!
//! - **`types`**: the payload's `action` must be listed. `pull_request` and
//!   `pull_request_target` default to `opened`, `synchronize` and `reopened` when `types` is
//!   absent; other events accept every activity type by default.
//! - **`branches` / `branches-ignore` / `tags` / `tags-ignore`** (push): the pushed ref's branch
//!   or tag name is matched. When only branch filters are given, tag pushes do not run the
//!   workflow, and vice versa.
//! - **`branches` / `branches-ignore`** (pull_request, pull_request_target): matched against the
//!   *base* branch of the pull request (workflow_run: the triggering run's head branch;
//!   merge_group: the queue's base branch).
//! - **`paths` / `paths-ignore`**: `paths` passes when at least one changed file matches;
//!   `paths-ignore` fails only when *every* changed file matches. Path filters are not evaluated
//!   for tag pushes. When the changed files are unknown ([`Event::changed_files`] is `None`),
//!   path filters pass, since kiln cannot tell.
//!
//! Patterns follow GitHub's filter pattern cheat sheet, not glob(7): `*` matches any characters
//! except `/`, `**` any characters including `/` (so `**/` may match nothing), `?` and `+` make
//! the *preceding character* optional or repeatable, `[...]` is a class of characters and
//! `a-z`/`A-Z`/`0-9` ranges, `\` escapes the next character, and a leading `!` negates. Patterns
//! are applied in order and the last one that matches decides, so `['*.md', '!README.md']`
//! matches `hello.md` but not `README.md`.
//!
//! When a filter needs a value the payload lacks (no `ref`, no `action`), the filter passes:
//! a local run often has no full payload, and refusing to run would be the worse surprise.

use regex_lite::Regex;

use crate::model::{EventTrigger, Triggers};
use crate::span::Spanned;

/// An event that may start workflows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    /// The event name (`push`, `pull_request`, `workflow_dispatch`, ...).
    pub name: String,
    /// The webhook payload, as GitHub would deliver it (`{}` when unknown).
    pub payload: serde_json::Value,
    /// Files changed by the event, relative to the repository root, when known.
    pub changed_files: Option<Vec<String>>,
}

impl Event {
    /// An event with an empty payload.
    pub fn new(name: impl Into<String>) -> Event {
        Event {
            name: name.into(),
            payload: serde_json::Value::Object(serde_json::Map::new()),
            changed_files: None,
        }
    }

    fn payload_str(&self, path: &[&str]) -> Option<&str> {
        let mut v = &self.payload;
        for key in path {
            v = v.get(key)?;
        }
        v.as_str()
    }
}

/// A filter pattern that could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// A `[` without its `]`.
    #[error("Unclosed `[` in pattern `{0}`")]
    UnclosedClass(String),
    /// A class holding something other than `a-z`, `A-Z`, `0-9` ranges and plain characters.
    #[error(
        "Invalid character range `{range}` in pattern `{pattern}`; ranges may only use a-z, A-Z and 0-9"
    )]
    BadRange {
        /// The offending range.
        range: String,
        /// The whole pattern.
        pattern: String,
    },
    /// A trailing `\`.
    #[error("Pattern `{0}` ends with an escape character")]
    TrailingEscape(String),
    /// An empty pattern.
    #[error("Empty filter pattern")]
    Empty,
    /// The translated regex was rejected (should not happen for valid patterns).
    #[error("Pattern `{pattern}` cannot be compiled: {message}")]
    Regex {
        /// The pattern.
        pattern: String,
        /// The regex engine's message.
        message: String,
    },
}

/// One compiled filter pattern (`'**.js'`, `'!docs/**'`).
#[derive(Debug, Clone)]
pub struct FilterPattern {
    /// The pattern as written, including a leading `!`.
    pub source: String,
    /// Whether it started with `!`.
    pub negated: bool,
    regex: Regex,
}

impl FilterPattern {
    /// Compiles a pattern written in GitHub's filter syntax.
    pub fn new(source: &str) -> Result<FilterPattern, PatternError> {
        let (negated, body) = match source.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, source),
        };
        if body.is_empty() {
            return Err(PatternError::Empty);
        }
        let translated = translate(body, source)?;
        let regex = Regex::new(&translated).map_err(|e| PatternError::Regex {
            pattern: source.to_owned(),
            message: e.to_string(),
        })?;
        Ok(FilterPattern {
            source: source.to_owned(),
            negated,
            regex,
        })
    }

    /// Whether the pattern's body (ignoring `!`) matches `name`.
    pub fn is_match(&self, name: &str) -> bool {
        self.regex.is_match(name)
    }
}

impl PartialEq for FilterPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// Translates a pattern body into an anchored regex.
fn translate(body: &str, whole: &str) -> Result<String, PatternError> {
    let chars: Vec<char> = body.chars().collect();
    let mut out = String::from("^");
    // Whether the last emitted item is a single character (or class) that `?`/`+` may quantify.
    let mut quantifiable = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '*' => {
                if chars.get(i + 1) == Some(&'*') {
                    if chars.get(i + 2) == Some(&'/') {
                        out.push_str("(?:.*/)?");
                        i += 3;
                    } else {
                        out.push_str(".*");
                        i += 2;
                    }
                } else {
                    out.push_str("[^/]*");
                    i += 1;
                }
                quantifiable = false;
                continue;
            }
            '?' | '+' if quantifiable => {
                out.push(c);
                quantifiable = false;
            }
            '[' => {
                let close = chars[i + 1..]
                    .iter()
                    .position(|&ch| ch == ']')
                    .map(|p| p + i + 1)
                    .ok_or_else(|| PatternError::UnclosedClass(whole.to_owned()))?;
                out.push_str(&translate_class(&chars[i + 1..close], whole)?);
                i = close + 1;
                quantifiable = true;
                continue;
            }
            '\\' => {
                let next = chars
                    .get(i + 1)
                    .ok_or_else(|| PatternError::TrailingEscape(whole.to_owned()))?;
                push_literal(&mut out, *next);
                i += 2;
                quantifiable = true;
                continue;
            }
            _ => {
                push_literal(&mut out, c);
                quantifiable = true;
            }
        }
        i += 1;
    }
    out.push('$');
    Ok(out)
}

fn push_literal(out: &mut String, c: char) {
    if c.is_ascii_alphanumeric() || !c.is_ascii() {
        out.push(c);
    } else {
        out.push('\\');
        out.push(c);
    }
}

fn translate_class(inner: &[char], whole: &str) -> Result<String, PatternError> {
    let mut out = String::from("[");
    let mut i = 0;
    while i < inner.len() {
        let c = inner[i];
        if inner.get(i + 1) == Some(&'-') && i + 2 < inner.len() {
            let end = inner[i + 2];
            let ok = (c.is_ascii_lowercase() && end.is_ascii_lowercase()
                || c.is_ascii_uppercase() && end.is_ascii_uppercase()
                || c.is_ascii_digit() && end.is_ascii_digit())
                && c <= end;
            if !ok {
                return Err(PatternError::BadRange {
                    range: format!("{c}-{end}"),
                    pattern: whole.to_owned(),
                });
            }
            out.push(c);
            out.push('-');
            out.push(end);
            i += 3;
        } else {
            push_literal(&mut out, c);
            i += 1;
        }
    }
    out.push(']');
    Ok(out)
}

/// An ordered list of patterns, as written under `branches:` or `paths:`.
#[derive(Debug, Clone, PartialEq)]
pub struct PatternList {
    /// The patterns, in order.
    pub patterns: Vec<Spanned<FilterPattern>>,
}

impl PatternList {
    /// Whether `name` is selected: the last pattern that matches decides (`!` deselects).
    pub fn matches(&self, name: &str) -> bool {
        let mut selected = false;
        for p in &self.patterns {
            if p.value.is_match(name) {
                selected = !p.value.negated;
            }
        }
        selected
    }
}

/// `pull_request`'s activity types when `types` is not given.
pub const DEFAULT_PULL_REQUEST_TYPES: [&str; 3] = ["opened", "synchronize", "reopened"];

impl Triggers {
    /// Whether `event` starts this workflow (its name is listed and all its filters pass).
    pub fn matches(&self, event: &Event) -> bool {
        self.events
            .get(&event.name)
            .is_some_and(|trigger| trigger.matches(event))
    }
}

impl EventTrigger {
    /// Whether this event's filters accept `event` (whose name is assumed to be this one).
    pub fn matches(&self, event: &Event) -> bool {
        self.types_match(event) && self.refs_match(event) && self.paths_match(event)
    }

    fn types_match(&self, event: &Event) -> bool {
        let Some(action) = event.payload_str(&["action"]) else {
            return true;
        };
        match &self.types {
            Some(types) => types.iter().any(|t| t.value == action),
            None if is_pull_request(&event.name) => DEFAULT_PULL_REQUEST_TYPES.contains(&action),
            None => true,
        }
    }

    fn refs_match(&self, event: &Event) -> bool {
        let branch_filter = filter_pass(self.branches.as_ref(), self.branches_ignore.as_ref());
        if event.name == "push" {
            let Some(git_ref) = event.payload_str(&["ref"]) else {
                return true;
            };
            let has_branch = self.branches.is_some() || self.branches_ignore.is_some();
            let has_tag = self.tags.is_some() || self.tags_ignore.is_some();
            if let Some(branch) = git_ref.strip_prefix("refs/heads/") {
                if !has_branch && has_tag {
                    return false;
                }
                branch_filter(branch)
            } else if let Some(tag) = git_ref.strip_prefix("refs/tags/") {
                if has_branch && !has_tag {
                    return false;
                }
                filter_pass(self.tags.as_ref(), self.tags_ignore.as_ref())(tag)
            } else {
                !(has_branch || has_tag)
            }
        } else {
            let base = if is_pull_request(&event.name) {
                event.payload_str(&["pull_request", "base", "ref"])
            } else if event.name == "workflow_run" {
                event.payload_str(&["workflow_run", "head_branch"])
            } else if event.name == "merge_group" {
                event.payload_str(&["merge_group", "base_ref"])
            } else {
                event
                    .payload_str(&["ref"])
                    .map(|r| r.strip_prefix("refs/heads/").unwrap_or(r))
            };
            let workflows_ok = match (
                &self.workflows,
                event.payload_str(&["workflow_run", "name"]),
            ) {
                (Some(list), Some(name)) => list.iter().any(|w| w.value == name),
                _ => true,
            };
            let Some(base) = base else {
                return workflows_ok;
            };
            let base = base.strip_prefix("refs/heads/").unwrap_or(base);
            workflows_ok && branch_filter(base)
        }
    }

    fn paths_match(&self, event: &Event) -> bool {
        if event.name == "push"
            && event
                .payload_str(&["ref"])
                .is_some_and(|r| r.starts_with("refs/tags/"))
        {
            return true;
        }
        let Some(files) = &event.changed_files else {
            return true;
        };
        if let Some(paths) = &self.paths
            && !files.iter().any(|f| paths.matches(f))
        {
            return false;
        }
        if let Some(ignore) = &self.paths_ignore
            && !files.is_empty()
            && files.iter().all(|f| ignore.matches(f))
        {
            return false;
        }
        true
    }
}

fn is_pull_request(name: &str) -> bool {
    matches!(name, "pull_request" | "pull_request_target")
}

/// A predicate for an include list and/or an ignore list (GitHub forbids giving both).
fn filter_pass<'a>(
    include: Option<&'a PatternList>,
    ignore: Option<&'a PatternList>,
) -> impl Fn(&str) -> bool + 'a {
    move |name| {
        include.is_none_or(|list| list.matches(name))
            && !ignore.is_some_and(|list| list.matches(name))
    }
}

/// Validates a POSIX cron expression as GitHub's `schedule` accepts it: five fields (minute,
/// hour, day of month, month, day of week), each `*` or a comma list of values and `a-b`
/// ranges, each optionally `/step`; months and weekdays may be written `JAN`..`DEC` and
/// `SUN`..`SAT`.
pub fn validate_cron(expr: &str) -> Result<(), String> {
    const FIELDS: [(&str, u32, u32); 5] = [
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day of month", 1, 31),
        ("month", 1, 12),
        ("day of week", 0, 6),
    ];
    let parts: Vec<&str> = expr.split_whitespace().collect();
    if parts.len() != 5 {
        return Err(format!(
            "Cron expression `{expr}` must have 5 fields (minute hour day-of-month month day-of-week), found {}",
            parts.len()
        ));
    }
    for (i, (part, (what, min, max))) in parts.iter().zip(FIELDS).enumerate() {
        for item in part.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (item, None),
            };
            if let Some(step) = step {
                match step.parse::<u32>() {
                    Ok(s) if s >= 1 && s <= max.max(1) => {}
                    _ => {
                        return Err(format!(
                            "Invalid step `{step}` in the {what} field of `{expr}`"
                        ));
                    }
                }
            }
            if range == "*" {
                continue;
            }
            let parse = |s: &str| cron_value(s, i).filter(|v| *v >= min && *v <= max);
            let ok = match range.split_once('-') {
                Some((a, b)) => matches!((parse(a), parse(b)), (Some(x), Some(y)) if x <= y),
                None => parse(range).is_some(),
            };
            if !ok {
                return Err(format!(
                    "Invalid {what} `{item}` in cron expression `{expr}` (allowed {min}-{max})"
                ));
            }
        }
    }
    Ok(())
}

fn cron_value(s: &str, field: usize) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ];
    const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok();
    }
    let upper = s.to_ascii_uppercase();
    let index = match field {
        3 => MONTHS.iter().position(|m| *m == upper).map(|p| p + 1),
        4 => DAYS.iter().position(|d| *d == upper),
        _ => None,
    }?;
    u32::try_from(index).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(patterns: &[&str]) -> PatternList {
        PatternList {
            patterns: patterns
                .iter()
                .map(|p| {
                    Spanned::new(
                        FilterPattern::new(p).expect("valid pattern"),
                        crate::Span::unknown(),
                    )
                })
                .collect(),
        }
    }

    fn m(patterns: &[&str], name: &str) -> bool {
        list(patterns).matches(name)
    }

    // Examples from GitHub's "Patterns to match branches and tags" cheat sheet.
    #[test]
    fn branch_and_tag_cheat_sheet() {
        assert!(m(&["feature/*"], "feature/my-branch"));
        assert!(!m(&["feature/*"], "feature/beta-a/my-branch"));
        assert!(m(&["feature/**"], "feature/beta-a/my-branch"));
        assert!(m(&["feature/**"], "feature/mona/the/octocat"));
        assert!(m(
            &["main", "releases/mona-the-octocat"],
            "releases/mona-the-octocat"
        ));
        assert!(m(&["*"], "main"));
        assert!(!m(&["*"], "releases/v1"));
        assert!(m(&["**"], "all/the/branches"));
        assert!(m(&["*feature"], "mona-feature"));
        assert!(m(&["*feature"], "feature"));
        assert!(m(&["*feature"], "ver-10-feature"));
        assert!(m(&["v2*"], "v2"));
        assert!(m(&["v2*"], "v2.0"));
        assert!(m(&["v2*"], "v2.9"));
        assert!(m(&["v[12].[0-9]+.[0-9]+"], "v1.10.1"));
        assert!(m(&["v[12].[0-9]+.[0-9]+"], "v2.0.0"));
        assert!(!m(&["v[12].[0-9]+.[0-9]+"], "v3.0.0"));
    }

    // Examples from GitHub's "Patterns to match file paths" cheat sheet.
    #[test]
    fn path_cheat_sheet() {
        assert!(m(&["*"], "README.md"));
        assert!(!m(&["*"], "docs/README.md"));
        assert!(m(&["*.jsx?"], "page.js"));
        assert!(m(&["*.jsx?"], "page.jsx"));
        assert!(m(&["**"], "all/the/files.md"));
        assert!(m(&["*.js"], "app.js"));
        assert!(!m(&["*.js"], "js/app.js"));
        assert!(m(&["**.js"], "index.js"));
        assert!(m(&["**.js"], "js/index.js"));
        assert!(m(&["**.js"], "src/js/app.js"));
        assert!(m(&["docs/*"], "docs/README.md"));
        assert!(!m(&["docs/*"], "docs/mona/octocat.txt"));
        assert!(m(&["docs/**"], "docs/mona/octocat.txt"));
        assert!(m(&["docs/**/*.md"], "docs/README.md"));
        assert!(m(&["docs/**/*.md"], "docs/mona/hello-world.md"));
        assert!(m(&["docs/**/*.md"], "docs/a/markdown/file.md"));
        assert!(m(&["**/docs/**"], "docs/hello.md"));
        assert!(m(&["**/docs/**"], "dir/docs/my-file.txt"));
        assert!(m(&["**/docs/**"], "space/docs/plan/space.doc"));
        assert!(m(&["**/README.md"], "README.md"));
        assert!(m(&["**/README.md"], "js/README.md"));
        assert!(m(&["**/*src/**"], "a/src/app.js"));
        assert!(m(&["**/*src/**"], "my-src/code/js/app.js"));
        assert!(m(&["**/*-post.md"], "my-post.md"));
        assert!(m(&["**/*-post.md"], "path/their-post.md"));
        assert!(m(&["**/migrate-*.sql"], "migrate-10909.sql"));
        assert!(m(&["**/migrate-*.sql"], "db/migrate-v1.0.sql"));
        assert!(m(&["**/migrate-*.sql"], "db/sept/migrate-v1.sql"));
    }

    #[test]
    fn negation_order_matters() {
        let p = ["*.md", "!README.md"];
        assert!(m(&p, "hello.md"));
        assert!(!m(&p, "README.md"));
        assert!(!m(&p, "docs/hello.md"));
        let p = ["*.md", "!README.md", "README*"];
        assert!(m(&p, "hello.md"));
        assert!(m(&p, "README.md"));
        assert!(m(&p, "README.doc"));
    }

    #[test]
    fn special_characters_are_literal_when_escaped_or_unquantifiable() {
        assert!(m(&["releases/v1\\+build"], "releases/v1+build"));
        assert!(!m(&["releases/v1\\+build"], "releases/v11build"));
        assert!(m(&["a.b"], "a.b"));
        assert!(!m(&["a.b"], "axb"));
        assert!(m(&["*?"], "x?"));
        assert!(m(&["(x)"], "(x)"));
    }

    #[test]
    fn invalid_patterns_are_errors() {
        assert!(matches!(
            FilterPattern::new("[a-"),
            Err(PatternError::UnclosedClass(_))
        ));
        assert!(matches!(
            FilterPattern::new("[!-~]"),
            Err(PatternError::BadRange { .. })
        ));
        assert!(matches!(
            FilterPattern::new("abc\\"),
            Err(PatternError::TrailingEscape(_))
        ));
        assert!(matches!(FilterPattern::new("!"), Err(PatternError::Empty)));
    }

    #[test]
    fn cron_validation() {
        assert!(validate_cron("30 5,17 * * *").is_ok());
        assert!(validate_cron("*/15 * * * *").is_ok());
        assert!(validate_cron("0 0 * * MON-FRI").is_ok());
        assert!(validate_cron("0 0 1 JAN *").is_ok());
        assert!(validate_cron("0 0 * *").is_err());
        assert!(validate_cron("60 0 * * *").is_err());
        assert!(validate_cron("0 24 * * *").is_err());
        assert!(validate_cron("0 0 0 * *").is_err());
        assert!(validate_cron("0 0 * * 1#2").is_err());
        assert!(validate_cron("*/0 * * * *").is_err());
        assert!(validate_cron("5-1 * * * *").is_err());
    }
}
