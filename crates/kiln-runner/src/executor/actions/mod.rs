//! Actions: what a `uses:` names, and where its files come from.
//!
//! ```text
//! uses: ./path                      local: a directory of the workspace (read in the VM, at the step)
//! uses: owner/repo[/path]@ref       remote: resolved on the host before any VM exists
//!        --local-action override?  -> that host directory
//!        cache <dir>/<owner>/<repo>/refs/<ref> -> <commit>, tree at <dir>/<owner>/<repo>/<commit>/
//!        miss (and not --offline)  -> git fetch --depth 1 <base-url>/<owner>/<repo> <ref> -> cache
//! uses: docker://image              refused up front (no container engine in the guest yet)
//! uses: actions/checkout@*          handled natively (see `checkout`)
//! ```
//!
//! A remote action's tree is copied into the VM once per session, under the runner's
//! `_actions/<owner>/<repo>/<commit>` directory, and runs from there. The cache is keyed by the
//! resolved commit, so a moving ref (`v4`) resolves again online and reuses the tree when the
//! commit is unchanged; offline, the last resolution recorded for the ref is used.

pub(crate) mod catalog;
mod resolve;
mod run;

pub(crate) use catalog::Catalog;
pub use resolve::{ActionConfig, ActionResolver, ResolveError, ResolvedRepo};
pub(crate) use run::{ActionCall, PostStep};

/// What a `uses:` value names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ActionRef {
    /// `./path`: relative to the workspace.
    Local {
        /// The path as written, without the leading `./`.
        path: String,
    },
    /// `owner/repo[/path]@ref`.
    Remote(RemoteRef),
    /// `docker://image`.
    Docker {
        /// The image.
        image: String,
    },
}

/// `owner/repo[/path]@ref`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemoteRef {
    /// Repository owner.
    pub owner: String,
    /// Repository name.
    pub repo: String,
    /// Path inside the repository (empty for the root).
    pub path: String,
    /// Branch, tag or commit.
    pub git_ref: String,
}

impl RemoteRef {
    /// `owner/repo`.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.owner, self.repo)
    }
}

impl std::fmt::Display for RemoteRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.owner, self.repo)?;
        if !self.path.is_empty() {
            write!(f, "/{}", self.path)?;
        }
        write!(f, "@{}", self.git_ref)
    }
}

impl ActionRef {
    /// Parses a `uses:` value. Errors say what the accepted forms are.
    pub fn parse(uses: &str) -> Result<ActionRef, String> {
        let uses = uses.trim();
        if let Some(image) = uses.strip_prefix("docker://") {
            return Ok(ActionRef::Docker {
                image: image.to_owned(),
            });
        }
        if uses == "." || uses.starts_with("./") {
            let path = uses
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_owned();
            return Ok(ActionRef::Local { path });
        }
        let bad = || {
            format!(
                "`{uses}` is not an action reference: expected `./path`, `owner/repo@ref`, \
                 `owner/repo/path@ref` or `docker://image`"
            )
        };
        let (name, git_ref) = uses.rsplit_once('@').ok_or_else(bad)?;
        let mut parts = name.splitn(3, '/');
        let owner = parts.next().unwrap_or_default();
        let repo = parts.next().unwrap_or_default();
        let path = parts.next().unwrap_or_default().trim_end_matches('/');
        let safe = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !safe(owner)
            || !safe(repo)
            || git_ref.is_empty()
            || git_ref.contains("..")
            || path.split('/').any(|p| p == "..")
        {
            return Err(bad());
        }
        Ok(ActionRef::Remote(RemoteRef {
            owner: owner.to_owned(),
            repo: repo.to_owned(),
            path: path.to_owned(),
            git_ref: git_ref.to_owned(),
        }))
    }
}

/// Whether `uses` is `actions/checkout@...`, which kiln runs natively.
pub fn is_checkout(uses: &str) -> bool {
    uses.split('@')
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("actions/checkout"))
}

/// `INPUT_<NAME>` as GitHub's runner forms it: spaces become `_`, letters upper case, every
/// other character (including `-`) kept.
pub fn input_env_name(name: &str) -> String {
    format!("INPUT_{}", name.replace(' ', "_").to_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_of_uses() {
        assert_eq!(
            ActionRef::parse("./.github/actions/x").expect("local"),
            ActionRef::Local {
                path: ".github/actions/x".into()
            }
        );
        assert_eq!(
            ActionRef::parse("actions/setup-node@v4").expect("remote"),
            ActionRef::Remote(RemoteRef {
                owner: "actions".into(),
                repo: "setup-node".into(),
                path: String::new(),
                git_ref: "v4".into()
            })
        );
        let deep = ActionRef::parse("o/r/a/b@feature/x").expect("remote with path");
        assert!(
            matches!(&deep, ActionRef::Remote(r) if r.path == "a/b" && r.git_ref == "feature/x")
        );
        assert!(matches!(
            ActionRef::parse("docker://alpine:3").expect("docker"),
            ActionRef::Docker { .. }
        ));
        assert!(ActionRef::parse("owner-only@v1").is_err());
        assert!(ActionRef::parse("o/r").is_err());
        assert!(ActionRef::parse("o/../x@v1").is_err());
    }

    #[test]
    fn input_names_follow_github() {
        assert_eq!(input_env_name("node-version"), "INPUT_NODE-VERSION");
        assert_eq!(input_env_name("my input"), "INPUT_MY_INPUT");
        assert_eq!(input_env_name("who"), "INPUT_WHO");
    }
}
