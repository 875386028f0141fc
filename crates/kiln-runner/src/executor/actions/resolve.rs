//! Remote action resolution on the host: `--local-action` overrides, then the action cache,
//! then `git fetch` from the base URL (unless offline).
//!
//! Cache layout under the cache directory:
//!
//! ```text
//! <owner>/<repo>/<commit>/...        the repository's tree at that commit (no .git)
//! <owner>/<repo>/refs/<ref>          the commit <ref> resolved to last time (one line)
//! ```
//!
//! A tree is written to a temporary sibling and renamed into place, so a half-written tree is
//! never used, and two runs fetching the same commit at once both succeed. `git` runs with
//! `GIT_TERMINAL_PROMPT=0`; kiln puts no credential in an argument or URL (git's own
//! credential helpers apply).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::RemoteRef;

/// Where remote actions come from.
#[derive(Debug, Clone)]
pub struct ActionConfig {
    /// Base URL of the action repositories: `<base>/<owner>/<repo>` is cloned.
    pub base_url: String,
    /// The action cache directory.
    pub cache_dir: PathBuf,
    /// Use only the cache (and overrides); a miss is an error.
    pub offline: bool,
    /// `owner/repo@ref` -> host directory (`--local-action`).
    pub overrides: Vec<(String, PathBuf)>,
}

impl Default for ActionConfig {
    /// `https://github.com`, the cache under kiln's data directory, online, no overrides.
    fn default() -> Self {
        ActionConfig {
            base_url: "https://github.com".into(),
            cache_dir: default_data_dir().join("actions"),
            offline: false,
            overrides: Vec::new(),
        }
    }
}

/// kiln's data directory: `KILN_DATA_DIR`, else `$XDG_DATA_HOME/kiln`, else
/// `~/.local/share/kiln`.
fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_DATA_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("kiln");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".local/share/kiln")
}

impl ActionConfig {
    /// Parses `owner/repo@ref=PATH` (`--local-action`).
    pub fn parse_override(spec: &str) -> Result<(String, PathBuf), String> {
        let (name, path) = spec
            .split_once('=')
            .ok_or_else(|| format!("`{spec}`: expected owner/repo@ref=PATH"))?;
        let (repo, git_ref) = name
            .split_once('@')
            .ok_or_else(|| format!("`{spec}`: expected owner/repo@ref=PATH"))?;
        if repo.split('/').count() != 2 || git_ref.is_empty() || path.is_empty() {
            return Err(format!("`{spec}`: expected owner/repo@ref=PATH"));
        }
        Ok((override_key(repo, git_ref), PathBuf::from(path)))
    }
}

fn override_key(repo: &str, git_ref: &str) -> String {
    format!("{}@{git_ref}", repo.to_ascii_lowercase())
}

/// A remote repository made available on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRepo {
    /// The repository's tree on the host (the action is at `root/<path>`).
    pub root: PathBuf,
    /// The commit (for an override: `local`).
    pub commit: String,
    /// Where it came from, for logs: `override`, `cache` or `fetched`.
    pub source: &'static str,
}

/// Why a remote action could not be had. Every variant says what was tried.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Offline and not in the cache.
    #[error(
        "`{action}` is not in the action cache and kiln is offline; looked for {tried} \
         (pre-populate the cache, or give --local-action {repo}@{git_ref}=PATH)"
    )]
    NotCached {
        /// The action.
        action: String,
        /// `owner/repo`.
        repo: String,
        /// The ref.
        git_ref: String,
        /// The cache paths looked at.
        tried: String,
    },
    /// The override's directory does not exist.
    #[error("--local-action for `{action}` points at {path}, which is not a directory")]
    BadOverride {
        /// The action.
        action: String,
        /// The directory.
        path: PathBuf,
    },
    /// `git` failed.
    #[error("Fetching `{action}` failed: `git {command}` from {url}: {message}")]
    Git {
        /// The action.
        action: String,
        /// The repository URL.
        url: String,
        /// The git subcommand.
        command: String,
        /// git's stderr (last lines) or the spawn error.
        message: String,
    },
    /// Writing the cache failed.
    #[error("Writing `{action}` to the action cache at {path} failed")]
    Cache {
        /// The action.
        action: String,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Resolves remote actions (and remote reusable workflows) to host directories.
#[derive(Debug, Clone, Default)]
pub struct ActionResolver {
    config: ActionConfig,
}

impl ActionResolver {
    /// A resolver with `config`.
    pub fn new(config: ActionConfig) -> ActionResolver {
        ActionResolver { config }
    }

    /// The configuration.
    pub fn config(&self) -> &ActionConfig {
        &self.config
    }

    /// Makes `action`'s repository available on the host. Blocks (runs `git`).
    pub fn resolve(&self, action: &RemoteRef) -> Result<ResolvedRepo, ResolveError> {
        let name = action.to_string();
        let key = override_key(&action.repository(), &action.git_ref);
        if let Some((_, path)) = self.config.overrides.iter().find(|(k, _)| *k == key) {
            if !path.is_dir() {
                return Err(ResolveError::BadOverride {
                    action: name,
                    path: path.clone(),
                });
            }
            return Ok(ResolvedRepo {
                root: path.clone(),
                commit: "local".into(),
                source: "override",
            });
        }
        let repo_dir = self.config.cache_dir.join(&action.owner).join(&action.repo);
        let ref_file = repo_dir.join("refs").join(ref_file_name(&action.git_ref));
        let cached = |commit: &str| {
            let dir = repo_dir.join(commit);
            dir.is_dir().then(|| ResolvedRepo {
                root: dir,
                commit: commit.to_owned(),
                source: "cache",
            })
        };
        // A full commit id names its tree directly.
        if is_commit_id(&action.git_ref)
            && let Some(hit) = cached(&action.git_ref.to_ascii_lowercase())
        {
            return Ok(hit);
        }
        if self.config.offline {
            let recorded = std::fs::read_to_string(&ref_file)
                .ok()
                .map(|s| s.trim().to_owned());
            if let Some(commit) = &recorded
                && is_commit_id(commit)
                && let Some(hit) = cached(commit)
            {
                return Ok(hit);
            }
            let mut tried = vec![ref_file.display().to_string()];
            if let Some(commit) = recorded {
                tried.push(repo_dir.join(commit).display().to_string());
            }
            return Err(ResolveError::NotCached {
                action: name,
                repo: action.repository(),
                git_ref: action.git_ref.clone(),
                tried: tried.join(" and "),
            });
        }
        self.fetch(action, &repo_dir, &ref_file)
    }

    fn fetch(
        &self,
        action: &RemoteRef,
        repo_dir: &Path,
        ref_file: &Path,
    ) -> Result<ResolvedRepo, ResolveError> {
        let name = action.to_string();
        let url = format!(
            "{}/{}/{}",
            self.config.base_url.trim_end_matches('/'),
            action.owner,
            action.repo
        );
        let cache_err = |path: &Path, source| ResolveError::Cache {
            action: name.clone(),
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(repo_dir).map_err(|e| cache_err(repo_dir, e))?;
        let scratch = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempdir_in(repo_dir)
            .map_err(|e| cache_err(repo_dir, e))?;
        let git_dir = scratch.path().join("git");
        let git = |args: &[&str]| -> Result<String, ResolveError> {
            let output = Command::new("git")
                .arg("--git-dir")
                .arg(&git_dir)
                .args(args)
                .env("GIT_TERMINAL_PROMPT", "0")
                .env("GIT_ASKPASS", "true")
                .output()
                .map_err(|e| ResolveError::Git {
                    action: name.clone(),
                    url: url.clone(),
                    command: args.first().copied().unwrap_or_default().to_owned(),
                    message: format!("cannot run git: {e}"),
                })?;
            if !output.status.success() {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
                return Err(ResolveError::Git {
                    action: name.clone(),
                    url: url.clone(),
                    command: args.join(" "),
                    message: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
                });
            }
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        };
        git(&["init", "--quiet", "--bare"])?;
        git(&[
            "fetch",
            "--quiet",
            "--depth=1",
            "--no-tags",
            &url,
            &action.git_ref,
        ])?;
        let commit = git(&["rev-parse", "FETCH_HEAD^{commit}"])?;
        let final_dir = repo_dir.join(&commit);
        if !final_dir.is_dir() {
            let tree = scratch.path().join("tree");
            std::fs::create_dir_all(&tree).map_err(|e| cache_err(&tree, e))?;
            let tree_arg = tree.display().to_string();
            git(&[
                "--work-tree",
                &tree_arg,
                "checkout",
                "--quiet",
                "--force",
                "FETCH_HEAD",
                "--",
                ".",
            ])?;
            if let Err(e) = std::fs::rename(&tree, &final_dir)
                && !final_dir.is_dir()
            {
                return Err(cache_err(&final_dir, e));
            }
        }
        let refs = repo_dir.join("refs");
        if let Some(parent) = ref_file.parent() {
            std::fs::create_dir_all(parent).map_err(|e| cache_err(&refs, e))?;
        }
        std::fs::write(ref_file, format!("{commit}\n")).map_err(|e| cache_err(ref_file, e))?;
        Ok(ResolvedRepo {
            root: final_dir,
            commit,
            source: "fetched",
        })
    }
}

/// A ref as a file name: `/` (branches like `release/v1`) becomes `%2F`.
fn ref_file_name(git_ref: &str) -> String {
    git_ref.replace('%', "%25").replace('/', "%2F")
}

fn is_commit_id(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse() {
        let (key, path) =
            ActionConfig::parse_override("Actions/Setup-Node@v4=/opt/setup-node").expect("valid");
        assert_eq!(key, "actions/setup-node@v4");
        assert_eq!(path, PathBuf::from("/opt/setup-node"));
        assert!(ActionConfig::parse_override("actions/setup-node=/x").is_err());
        assert!(ActionConfig::parse_override("setup-node@v4=/x").is_err());
    }

    #[test]
    fn offline_miss_says_what_was_tried() {
        let cache = tempfile::tempdir().expect("tempdir");
        let resolver = ActionResolver::new(ActionConfig {
            base_url: "file:///nonexistent".into(),
            cache_dir: cache.path().to_path_buf(),
            offline: true,
            overrides: Vec::new(),
        });
        let action = RemoteRef {
            owner: "o".into(),
            repo: "r".into(),
            path: String::new(),
            git_ref: "release/v1".into(),
        };
        let err = resolver.resolve(&action).expect_err("offline miss");
        let text = err.to_string();
        assert!(text.contains("o/r@release/v1"), "{text}");
        assert!(text.contains("refs/release%2Fv1"), "{text}");
    }
}
