//! `hashFiles()`: GitHub's algorithm over the files of a workspace the host can read.
//!
//! Every regular file under the workspace that matches the patterns (a leading `!` excludes)
//! is hashed with SHA-256, in path order; the result is the SHA-256 of those digests, in hex.
//! No match gives the empty string.

use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSetBuilder};
use sha2::{Digest, Sha256};

/// Hashes the files under `root` that match `patterns`.
pub fn hash_files(root: &Path, patterns: &[String]) -> Result<String, String> {
    let mut include = GlobSetBuilder::new();
    let mut exclude = GlobSetBuilder::new();
    for pattern in patterns.iter().flat_map(|p| p.lines()) {
        let pattern = pattern.trim();
        if pattern.is_empty() {
            continue;
        }
        let (set, glob) = match pattern.strip_prefix('!') {
            Some(rest) => (&mut exclude, rest),
            None => (&mut include, pattern),
        };
        let glob = glob.trim_start_matches("./");
        let glob = glob
            .strip_prefix(&format!("{}/", root.display()))
            .unwrap_or(glob);
        // As in @actions/glob, `*` stays within one path segment; `**` crosses them.
        let compiled = GlobBuilder::new(glob)
            .literal_separator(true)
            .build()
            .map_err(|e| format!("hashFiles: bad pattern `{pattern}`: {e}"))?;
        set.add(compiled);
    }
    let include = include.build().map_err(|e| format!("hashFiles: {e}"))?;
    let exclude = exclude.build().map_err(|e| format!("hashFiles: {e}"))?;
    let mut files = Vec::new();
    walk(root, root, &mut files).map_err(|e| format!("hashFiles: {e}"))?;
    files.sort();
    let mut outer = Sha256::new();
    let mut any = false;
    for rel in files {
        if include.is_match(&rel) && !exclude.is_match(&rel) {
            let bytes = std::fs::read(root.join(&rel))
                .map_err(|e| format!("hashFiles: reading {}: {e}", rel.display()))?;
            outer.update(Sha256::digest(&bytes));
            any = true;
        }
    }
    Ok(if any {
        outer
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    } else {
        String::new()
    })
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            walk(root, &path, out)?;
        } else if let (true, Ok(rel)) = (kind.is_file(), path.strip_prefix(root)) {
            out.push(rel.to_path_buf());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_matching_files_and_ignores_excluded() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        std::fs::write(dir.path().join("a/b/x.lock"), "one").expect("write");
        std::fs::write(dir.path().join("y.lock"), "two").expect("write");
        std::fs::write(dir.path().join("z.txt"), "three").expect("write");
        let all = hash_files(dir.path(), &["**/*.lock".into()]).expect("hash");
        assert_eq!(all.len(), 64);
        let mut expected = Sha256::new();
        expected.update(Sha256::digest(b"one"));
        expected.update(Sha256::digest(b"two"));
        let expected: String = expected
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(all, expected);
        let fewer = hash_files(dir.path(), &["**/*.lock".into(), "!a/**".into()]).expect("hash");
        assert_ne!(fewer, all);
        assert_eq!(
            hash_files(dir.path(), &["*.none".into()]).expect("hash"),
            ""
        );
    }
}
