//! Staging the workspace that is copied into a session's VM.
//!
//! In a git work tree only what git would see is staged: tracked files plus untracked files
//! that are not ignored (`git ls-files -co --exclude-standard`), and the `.git` directory, so
//! build output such as `target/` or `node_modules/` never crosses into the VM. Outside git
//! the whole directory is used as it is.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory ready to copy into a VM. A staged copy is removed when this is dropped.
#[derive(Debug)]
pub enum Staged {
    /// A filtered copy in a temporary directory.
    Copy(tempfile::TempDir),
    /// The directory itself (not a git work tree).
    Direct(PathBuf),
}

impl Staged {
    /// The directory to copy in.
    pub fn path(&self) -> &Path {
        match self {
            Staged::Copy(dir) => dir.path(),
            Staged::Direct(path) => path,
        }
    }
}

/// Stages `dir` (see the module docs).
pub fn stage(dir: &Path) -> io::Result<Staged> {
    let listed = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["ls-files", "-z", "-co", "--exclude-standard"])
        .output();
    let files = match listed {
        Ok(out) if out.status.success() => out.stdout,
        // Not a git work tree, or no git: use the directory as it is.
        _ => return Ok(Staged::Direct(dir.to_path_buf())),
    };
    let stage = tempfile::Builder::new()
        .prefix("kiln-workspace-")
        .tempdir()?;
    for rel in files.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let rel = Path::new(std::str::from_utf8(rel).map_err(io::Error::other)?);
        let from = dir.join(rel);
        // Deleted-but-tracked files are listed too; skip what is gone.
        let Ok(meta) = std::fs::symlink_metadata(&from) else {
            continue;
        };
        let to = stage.path().join(rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if meta.is_file() {
            std::fs::copy(&from, &to)?;
        }
    }
    let git_dir = dir.join(".git");
    if git_dir.exists() {
        kiln_vm::local::copy_tree(&git_dir, &stage.path().join(".git"))?;
    }
    Ok(Staged::Copy(stage))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .expect("git runs")
            .status
            .success();
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn git_work_tree_is_staged_without_ignored_files() {
        let repo = tempfile::tempdir().expect("tempdir");
        git(repo.path(), &["init", "-q"]);
        std::fs::write(repo.path().join(".gitignore"), "target/\n").expect("write");
        std::fs::create_dir_all(repo.path().join("target")).expect("mkdir");
        std::fs::write(repo.path().join("target/big"), "x").expect("write");
        std::fs::create_dir_all(repo.path().join("src")).expect("mkdir");
        std::fs::write(repo.path().join("src/main.rs"), "fn main() {}").expect("write");
        let staged = stage(repo.path()).expect("stage");
        assert!(matches!(staged, Staged::Copy(_)));
        assert!(staged.path().join("src/main.rs").is_file());
        assert!(staged.path().join(".gitignore").is_file());
        assert!(staged.path().join(".git/HEAD").is_file());
        assert!(!staged.path().join("target").exists());
    }

    #[test]
    fn plain_directory_is_used_directly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let staged = stage(dir.path()).expect("stage");
        assert_eq!(staged.path(), dir.path());
    }
}
