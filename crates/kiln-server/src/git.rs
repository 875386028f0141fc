//! Fetching the exact commit of an event with `git`.
//!
//! Each repository (by clone URL) has a bare cache under the server's work dir. An event's ref
//! is fetched into it (`git fetch <url> +<ref>:refs/kiln/fetched`), and when the event names a
//! commit that the ref no longer points to, that commit is fetched by id. Every commit a run
//! needs is pinned under `refs/kiln/keep/<sha>` so that later fetches cannot prune it.
//! Workflows are discovered from the cache (`git ls-tree`, `git show`) without a work tree; a
//! run's workspace is a fresh clone of the cache, checked out detached at the commit.
//!
//! Credentials never appear in a URL or in argv: with a token configured, git gets a credential
//! helper through `GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_0`/`GIT_CONFIG_VALUE_0` that prints the
//! token from the `KILN_GIT_TOKEN` environment variable of the git process. URLs are rewritten
//! by `clone_url_rewrite` (longest matching prefix) before git sees them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::process::Command;

/// Git errors.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// `git` could not be started.
    #[error("Cannot run git")]
    Spawn(#[source] std::io::Error),
    /// A git command failed.
    #[error("git {command} failed: {stderr}")]
    Failed {
        /// What ran (without URLs).
        command: String,
        /// Its stderr (trimmed).
        stderr: String,
    },
    /// The commit is not in the repository.
    #[error("Commit {0} not found")]
    MissingCommit(String),
    /// A file system operation failed.
    #[error("Cannot prepare {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The pull request number of a `refs/pull/{number}/merge` ref.
pub fn pull_number(git_ref: &str) -> Option<u64> {
    git_ref
        .strip_prefix("refs/pull/")?
        .strip_suffix("/merge")?
        .parse()
        .ok()
}

/// The per-repository bare caches.
#[derive(Debug)]
pub struct GitCache {
    root: PathBuf,
    rewrite: Vec<(String, String)>,
    token: Option<String>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A file of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// Path from the repository root.
    pub path: String,
    /// Its text.
    pub text: String,
}

impl GitCache {
    /// Caches under `root`; `rewrite` maps URL prefixes; `token` is offered to every remote.
    pub fn new(root: PathBuf, rewrite: Vec<(String, String)>, token: Option<String>) -> GitCache {
        GitCache {
            root,
            rewrite,
            token,
            locks: Mutex::default(),
        }
    }

    /// `url` after `clone_url_rewrite` (the longest matching prefix wins).
    pub fn rewrite_url(&self, url: &str) -> String {
        self.rewrite
            .iter()
            .filter(|(from, _)| url.starts_with(from.as_str()))
            .max_by_key(|(from, _)| from.len())
            .map_or_else(
                || url.to_owned(),
                |(from, to)| format!("{to}{}", &url[from.len()..]),
            )
    }

    fn cache_dir(&self, url: &str) -> PathBuf {
        let name: String = url
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        // Long URLs keep their tail (the repository name) and a hash of the whole.
        let digest = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            url.hash(&mut h);
            h.finish()
        };
        let tail: String = name
            .chars()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        self.root.join(format!("{tail}-{digest:016x}.git"))
    }

    fn lock_for(&self, dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(dir.display().to_string()).or_default().clone()
    }

    /// Fetches `git_ref` (and `sha`, when given and not at the ref) from `clone_url` into the
    /// cache, offering `token` to the remote (`None`: the configured token). Returns the cache
    /// dir and the commit id.
    pub async fn fetch(
        &self,
        clone_url: &str,
        git_ref: &str,
        sha: Option<&str>,
        token: Option<&str>,
    ) -> Result<(PathBuf, String), GitError> {
        let token = token.or(self.token.as_deref());
        let url = self.rewrite_url(clone_url);
        let dir = self.cache_dir(clone_url);
        let lock = self.lock_for(&dir);
        let _held = lock.lock().await;
        if !dir.join("HEAD").is_file() {
            std::fs::create_dir_all(&dir).map_err(|source| GitError::Io {
                path: dir.clone(),
                source,
            })?;
            self.git(Some(&dir), &["init", "--bare", "--quiet"], "init")
                .await?;
        }
        let refspec = format!("+{git_ref}:refs/kiln/fetched");
        let fetched = self
            .git_as(
                Some(&dir),
                &["fetch", "--quiet", "--no-tags", &url, &refspec],
                "fetch",
                token,
            )
            .await;
        let sha = match sha {
            Some(sha) => {
                if !self.has_commit(&dir, sha).await {
                    // The ref moved on (or could not be fetched): ask for the commit itself.
                    let by_id = format!("+{sha}:refs/kiln/keep/{sha}");
                    let by_id = self
                        .git_as(
                            Some(&dir),
                            &["fetch", "--quiet", "--no-tags", &url, &by_id],
                            "fetch",
                            token,
                        )
                        .await;
                    if !self.has_commit(&dir, sha).await {
                        return Err(match (by_id, fetched) {
                            (Err(e), _) | (_, Err(e)) => e,
                            _ => GitError::MissingCommit(sha.to_owned()),
                        });
                    }
                }
                sha.to_owned()
            }
            None => {
                fetched?;
                self.git(
                    Some(&dir),
                    &["rev-parse", "refs/kiln/fetched^{commit}"],
                    "rev-parse",
                )
                .await?
                .trim()
                .to_owned()
            }
        };
        let keep = format!("refs/kiln/keep/{sha}");
        self.git(Some(&dir), &["update-ref", &keep, &sha], "update-ref")
            .await?;
        Ok((dir, sha))
    }

    /// The commit a pull request runs on, as on GitHub: its merge commit
    /// (`refs/pull/{number}/merge`, the head merged into the base), fetched into the cache.
    /// The forge updates that ref asynchronously, and has none while the pull request conflicts
    /// (Gitea keeps none at all), so it is only used when it merges exactly `head`. `Err` says
    /// why the head commit must run instead.
    pub async fn fetch_pull_merge(
        &self,
        clone_url: &str,
        number: u64,
        head: &str,
        token: Option<&str>,
    ) -> Result<(PathBuf, String), String> {
        let merge_ref = format!("refs/pull/{number}/merge");
        let (dir, merge) = self
            .fetch(clone_url, &merge_ref, None, token)
            .await
            .map_err(|e| format!("{merge_ref} cannot be fetched: {}", crate::api::chain(&e)))?;
        let parents = self
            .git(
                Some(&dir),
                &["rev-list", "--parents", "--max-count=1", &merge],
                "rev-list",
            )
            .await
            .map_err(|e| crate::api::chain(&e))?;
        let parents: Vec<&str> = parents.split_whitespace().skip(1).collect();
        match parents.as_slice() {
            [_, merged] if *merged == head => Ok((dir, merge)),
            [_, merged] => Err(format!(
                "{merge_ref} merges {merged}, not the head {head} (the forge has not updated it yet)"
            )),
            _ => Err(format!("{merge_ref} ({merge}) is not a merge commit")),
        }
    }

    async fn has_commit(&self, dir: &Path, sha: &str) -> bool {
        let spec = format!("{sha}^{{commit}}");
        self.git(Some(dir), &["cat-file", "-e", &spec], "cat-file")
            .await
            .is_ok()
    }

    /// The workflow files (`.github/workflows/*.yml|yaml`) of commit `sha` in cache `dir`.
    pub async fn workflows(&self, dir: &Path, sha: &str) -> Result<Vec<RepoFile>, GitError> {
        let tree = format!("{sha}:.github/workflows");
        let listing = match self
            .git(Some(dir), &["ls-tree", "--name-only", &tree], "ls-tree")
            .await
        {
            Ok(listing) => listing,
            // No workflows directory at this commit.
            Err(GitError::Failed { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut files = Vec::new();
        for name in listing.lines() {
            if !(name.ends_with(".yml") || name.ends_with(".yaml")) {
                continue;
            }
            let path = format!(".github/workflows/{name}");
            let object = format!("{sha}:{path}");
            let text = self.git(Some(dir), &["show", &object], "show").await?;
            files.push(RepoFile { path, text });
        }
        Ok(files)
    }

    /// A work tree of commit `sha` from cache `dir`, in a new temporary directory, with
    /// `origin` set to `clone_url` (never the rewritten URL or credentials).
    pub async fn checkout(
        &self,
        dir: &Path,
        sha: &str,
        clone_url: &str,
    ) -> Result<tempfile::TempDir, GitError> {
        let work = tempfile::Builder::new()
            .prefix("kiln-checkout-")
            .tempdir()
            .map_err(|source| GitError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let tree = work.path().join("repo");
        let (src, dst) = (dir.display().to_string(), tree.display().to_string());
        self.git(
            None,
            &["clone", "--quiet", "--no-checkout", "--", &src, &dst],
            "clone",
        )
        .await?;
        self.git(
            Some(&tree),
            &["checkout", "--quiet", "--detach", sha],
            "checkout",
        )
        .await?;
        self.git(
            Some(&tree),
            &["remote", "set-url", "origin", clone_url],
            "remote set-url",
        )
        .await?;
        Ok(work)
    }

    /// Runs git in `dir` (its `.git` or a bare repository). `what` names the command in errors,
    /// so that URLs never reach a message.
    async fn git(&self, dir: Option<&Path>, args: &[&str], what: &str) -> Result<String, GitError> {
        self.git_as(dir, args, what, self.token.as_deref()).await
    }

    /// [`GitCache::git`] offering `token` to remotes (through a credential helper that reads it
    /// from the environment: never in argv or a URL).
    async fn git_as(
        &self,
        dir: Option<&Path>,
        args: &[&str],
        what: &str,
        token: Option<&str>,
    ) -> Result<String, GitError> {
        let mut command = Command::new("git");
        if let Some(dir) = dir {
            command.arg("-C").arg(dir);
        }
        command
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "true")
            .env_remove("GIT_DIR")
            .kill_on_drop(true);
        if let Some(token) = token {
            command
                .env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "credential.helper")
                .env(
                    "GIT_CONFIG_VALUE_0",
                    "!f() { test \"$1\" = get && echo username=x-access-token && \
                     echo \"password=$KILN_GIT_TOKEN\"; }; f",
                )
                .env("KILN_GIT_TOKEN", token);
        }
        let out = command.output().await.map_err(GitError::Spawn)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(GitError::Failed {
                command: what.to_owned(),
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_rewrite_wins() {
        let cache = GitCache::new(
            PathBuf::from("/nonexistent"),
            vec![
                ("https://github.com/".into(), "file:///srv/mirror/".into()),
                (
                    "https://github.com/octo/".into(),
                    "file:///srv/octo/".into(),
                ),
            ],
            None,
        );
        assert_eq!(
            cache.rewrite_url("https://github.com/octo/app.git"),
            "file:///srv/octo/app.git"
        );
        assert_eq!(
            cache.rewrite_url("https://github.com/other/x.git"),
            "file:///srv/mirror/other/x.git"
        );
        assert_eq!(
            cache.rewrite_url("https://gitea.example/x.git"),
            "https://gitea.example/x.git"
        );
    }
}
