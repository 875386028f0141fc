//! `NAME=VALUE` arguments and files (`--secret`, `--var`, `--input`, `--env-file`, ...).

use std::path::Path;

use anyhow::{Context, bail};
use indexmap::IndexMap;

/// Parses `NAME=VALUE`; with `from_env`, a bare `NAME` reads the variable from the environment.
pub fn parse_pair(flag: &str, text: &str, from_env: bool) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((name, value)) if valid_name(name) => Ok((name.to_owned(), value.to_owned())),
        Some((name, _)) => bail!("{flag} {text}: `{name}` is not a valid name"),
        None if from_env && valid_name(text) => match std::env::var(text) {
            Ok(value) => Ok((text.to_owned(), value)),
            Err(_) => bail!("{flag} {text}: no value given and ${text} is not set"),
        },
        None => bail!("{flag} {text}: expected NAME=VALUE"),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// Reads a file of `NAME=VALUE` lines: `#` comments, blank lines, an optional `export `, and
/// values in single or double quotes (double quotes understand `\n`, `\"` and `\\`).
pub fn read_env_file(path: &Path) -> anyhow::Result<IndexMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("Cannot read {}", path.display()))?;
    parse_env_file(&text).map_err(|(line, msg)| anyhow::anyhow!("{}:{line}: {msg}", path.display()))
}

fn parse_env_file(text: &str) -> Result<IndexMap<String, String>, (usize, String)> {
    let mut out = IndexMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            return Err((i + 1, format!("expected NAME=VALUE, found `{line}`")));
        };
        let name = name.trim();
        if !valid_name(name) {
            return Err((i + 1, format!("`{name}` is not a valid name")));
        }
        let value = value.trim();
        let value = if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            inner
                .replace("\\n", "\n")
                .replace("\\\"", "\"")
                .replace("\\\\", "\\")
        } else if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            inner.to_owned()
        } else {
            value.to_owned()
        };
        out.insert(name.to_owned(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs() {
        assert_eq!(
            parse_pair("--var", "A=b=c", false).expect("pair"),
            ("A".to_owned(), "b=c".to_owned())
        );
        assert!(parse_pair("--var", "A", false).is_err());
        assert!(parse_pair("--var", "=x", false).is_err());
    }

    #[test]
    fn env_files() {
        let parsed = parse_env_file("# comment\nexport A=1\nB=\"two\\nlines\"\nC='raw $x'\n\nD=\n")
            .expect("parse");
        assert_eq!(parsed["A"], "1");
        assert_eq!(parsed["B"], "two\nlines");
        assert_eq!(parsed["C"], "raw $x");
        assert_eq!(parsed["D"], "");
        assert_eq!(parse_env_file("oops").expect_err("bad").0, 1);
    }
}
