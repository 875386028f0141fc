//! Repository facts for the `github` context, read from the workspace with `git`.

use std::path::Path;
use std::process::Command;

/// What kiln knows about the repository being run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitInfo {
    /// The commit (`GITHUB_SHA`); 40 zeros when there is no git metadata.
    pub sha: String,
    /// The full ref (`GITHUB_REF`), e.g. `refs/heads/main`.
    pub git_ref: String,
    /// `owner/name` (`GITHUB_REPOSITORY`).
    pub repository: String,
    /// Who runs it (`GITHUB_ACTOR`).
    pub actor: String,
}

impl GitInfo {
    /// Reads HEAD, its ref and the `origin` remote of the repository at `dir`. Missing pieces
    /// get sensible local values: a zero SHA, `refs/heads/main`, `local/<dir name>`.
    pub fn discover(dir: &Path) -> GitInfo {
        let git = |args: &[&str]| -> Option<String> {
            let out = Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(args)
                .output()
                .ok()?;
            let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
            (out.status.success() && !text.is_empty()).then_some(text)
        };
        let dir_name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "workspace".to_owned());
        let repository = git(&["remote", "get-url", "origin"])
            .and_then(|url| repository_from_url(&url))
            .unwrap_or_else(|| format!("local/{dir_name}"));
        let actor = git(&["config", "user.name"])
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "kiln".to_owned());
        GitInfo {
            sha: git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "0".repeat(40)),
            git_ref: git(&["symbolic-ref", "-q", "HEAD"])
                .unwrap_or_else(|| "refs/heads/main".to_owned()),
            repository,
            actor,
        }
    }

    /// The owner part of `repository`.
    pub fn owner(&self) -> &str {
        self.repository
            .split_once('/')
            .map_or(self.repository.as_str(), |(o, _)| o)
    }

    /// The short ref name: `main` for `refs/heads/main`, `v1` for `refs/tags/v1`.
    pub fn ref_name(&self) -> &str {
        self.git_ref
            .strip_prefix("refs/heads/")
            .or_else(|| self.git_ref.strip_prefix("refs/tags/"))
            .unwrap_or(&self.git_ref)
    }

    /// `branch` or `tag`.
    pub fn ref_type(&self) -> &str {
        if self.git_ref.starts_with("refs/tags/") {
            "tag"
        } else {
            "branch"
        }
    }
}

/// `owner/name` from `https://host/owner/name(.git)` or `git@host:owner/name(.git)`.
fn repository_from_url(url: &str) -> Option<String> {
    let path = url
        .trim_end_matches('/')
        .trim_end_matches(".git")
        .rsplit(['/', ':'])
        .take(2)
        .collect::<Vec<_>>();
    match path.as_slice() {
        [name, owner] if !name.is_empty() && !owner.is_empty() => Some(format!("{owner}/{name}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_from_common_urls() {
        assert_eq!(
            repository_from_url("https://github.com/nektos/act.git").as_deref(),
            Some("nektos/act")
        );
        assert_eq!(
            repository_from_url("git@github.com:owner/repo.git").as_deref(),
            Some("owner/repo")
        );
    }

    #[test]
    fn no_git_metadata_gives_local_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let info = GitInfo::discover(dir.path());
        assert_eq!(info.sha, "0".repeat(40));
        assert_eq!(info.git_ref, "refs/heads/main");
        assert!(info.repository.starts_with("local/"), "{}", info.repository);
        assert_eq!(info.ref_name(), "main");
    }
}
