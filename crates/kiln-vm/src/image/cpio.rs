//! A minimal writer for the `newc` cpio format, the format the Linux kernel unpacks as an
//! initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` and 13 eight-digit hex fields: inode, mode,
//! uid, gid, nlink, mtime, file size, device major/minor, rdev major/minor, name size including
//! the NUL, checksum 0), then the name and a NUL padded to a multiple of 4, then the data padded
//! to a multiple of 4. The archive ends with an entry named `TRAILER!!!`. Parents must come
//! before their children and every entry gets a unique inode number; [`CpioWriter`] adds missing
//! parent directories itself.

use std::collections::HashSet;
use std::io::{self, Write};

/// `S_IFDIR`, `S_IFREG`, and `S_IFCHR` file type bits.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a newc archive entry by entry; [`CpioWriter::finish`] writes the trailer.
pub(crate) struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    dirs: HashSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            dirs: HashSet::new(),
        }
    }

    /// Adds a directory (and any missing parents). Paths are relative (`kiln/modules`).
    pub(crate) fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.dirs.insert(path.to_owned());
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file (and any missing parent directories).
    pub(crate) fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a character device node.
    pub(crate) fn char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
        let ino = if name == "TRAILER!!!" {
            0
        } else {
            self.next_ino
        };
        self.next_ino += 1;
        let name_size = name.len() + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{name_size:08x}{:08x}",
            0, 0, 0, 0, 0, rdev.0, rdev.1, 0
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + name_size)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let padding = (4 - len % 4) % 4;
        self.out.write_all(&[0; 3][..padding])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.file("kiln/modules/a.ko", 0o644, b"hello").unwrap();
        w.file("init", 0o755, b"#!").unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn entries_are_aligned_and_parents_come_first() {
        let data = archive();
        assert_eq!(data.len() % 4, 0);
        let mut names = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            let header = std::str::from_utf8(&data[pos..pos + 110]).unwrap();
            assert!(header.starts_with("070701"));
            let field = |i: usize| u32::from_str_radix(&header[6 + i * 8..14 + i * 8], 16).unwrap();
            let (size, name_size) = (field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&data[pos + 110..pos + 110 + name_size - 1]).unwrap();
            names.push(name.to_owned());
            pos += (110 + name_size).div_ceil(4) * 4;
            pos += size.div_ceil(4) * 4;
        }
        assert_eq!(
            names,
            [
                "kiln",
                "kiln/modules",
                "kiln/modules/a.ko",
                "init",
                "dev",
                "dev/console",
                "TRAILER!!!"
            ]
        );
    }

    #[test]
    fn debian_cpio_lists_the_archive() {
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "-v"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
        else {
            eprintln!("cpio(1) is not installed; skipping the cross-check");
            return;
        };
        child.stdin.take().unwrap().write_all(&archive()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        assert!(listing.contains("kiln/modules/a.ko"), "{listing}");
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with('c') && l.contains("dev/console")),
            "{listing}"
        );
    }
}
