//! Moving file data through the protocol: plain files as raw chunks, directories as tar streams.
//!
//! Both sides use these helpers, so the tar dialect is one definition: entries relative to the
//! directory (`.` first, carrying the directory's own mode), symlinks kept as symlinks, modes and
//! modification times preserved, no extended attributes, owners not applied on unpack. Unpacking
//! refuses entries that would land outside the destination (`..`, absolute paths, or a path
//! through a symlink), so a hostile peer cannot write elsewhere.
//!
//! The tar crate is synchronous; [`ChunkWriter`] and [`ChunkReader`] bridge it to the async
//! frame channels from a blocking thread.

use std::io::{self, Read, Write};
use std::path::Path;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::CHUNK_LEN;

/// A [`Write`] that cuts what it is given into chunks of [`CHUNK_LEN`] bytes and hands each to
/// `send`. Call [`ChunkWriter::finish`] to send the last, partial chunk.
pub struct ChunkWriter<F: FnMut(Bytes) -> io::Result<()>> {
    buf: BytesMut,
    send: F,
}

impl<F: FnMut(Bytes) -> io::Result<()>> ChunkWriter<F> {
    /// A writer that passes chunks to `send`.
    pub fn new(send: F) -> Self {
        ChunkWriter {
            buf: BytesMut::with_capacity(CHUNK_LEN),
            send,
        }
    }

    /// Sends what is buffered.
    pub fn finish(mut self) -> io::Result<()> {
        self.flush_chunk()
    }

    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK_LEN);
        (self.send)(chunk)
    }
}

impl<F: FnMut(Bytes) -> io::Result<()>> Write for ChunkWriter<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK_LEN - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_LEN {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A blocking [`Read`] over chunks arriving on a channel; the end of the data is the channel's
/// closing. Use it only from a blocking thread (it calls `blocking_recv`).
pub struct ChunkReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChunkReader {
    /// A reader of the chunks `rx` yields.
    pub fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        ChunkReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Writes a tar stream of `dir`'s contents to `out`.
pub fn pack_tree(dir: &Path, out: impl Write) -> io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    builder.append_dir_all(".", dir)?;
    builder.into_inner()?.flush()
}

/// Unpacks a tar stream into `dest` (created if missing), keeping modes and modification times.
pub fn unpack_tree(input: impl Read, dest: &Path) -> io::Result<()> {
    unpack_tree_owned(input, dest, None)
}

/// [`unpack_tree`], giving everything it creates (the missing directories up to `dest`
/// included) to `owner` (uid, gid), when set. Symlinks themselves are chowned, never their
/// targets; existing directories on the way to `dest` keep their owner.
pub fn unpack_tree_owned(
    input: impl Read,
    dest: &Path,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    create_dirs_owned(dest, owner)?;
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    archive.set_preserve_ownerships(false);
    let Some(owner) = owner else {
        return archive.unpack(dest);
    };
    // What `Archive::unpack` does, plus the chown of each entry right after it is unpacked (and
    // its path checked). Directories go last, deepest first, so a read-only directory's mode
    // is applied after its contents are in.
    let mut directories = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() == tar::EntryType::Directory {
            directories.push(entry);
        } else {
            unpack_entry_owned(&mut entry, dest, owner)?;
        }
    }
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut directory in directories {
        unpack_entry_owned(&mut directory, dest, owner)?;
    }
    Ok(())
}

fn unpack_entry_owned<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dest: &Path,
    owner: (u32, u32),
) -> io::Result<()> {
    let path = entry.path()?.into_owned();
    // `false`: the entry was refused (it would land outside `dest`), so there is nothing to own.
    if entry.unpack_in(dest)? {
        std::os::unix::fs::lchown(dest.join(path), Some(owner.0), Some(owner.1))?;
    }
    Ok(())
}

/// `create_dir_all`, giving each directory it creates to `owner` when set.
pub fn create_dirs_owned(path: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    let Some(owner) = owner else {
        return std::fs::create_dir_all(path);
    };
    let mut missing = Vec::new();
    let mut at = Some(path);
    while let Some(dir) = at {
        if dir.as_os_str().is_empty() || dir.symlink_metadata().is_ok() {
            break;
        }
        missing.push(dir);
        at = dir.parent();
    }
    std::fs::create_dir_all(path)?;
    for dir in missing.into_iter().rev() {
        std::os::unix::fs::lchown(dir, Some(owner.0), Some(owner.1))?;
    }
    Ok(())
}

/// The permission bits of a file's metadata.
pub fn mode_of(metadata: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    metadata.permissions().mode() & 0o7777
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn chunk_writer_cuts_at_chunk_len() {
        let mut chunks = Vec::new();
        let mut w = ChunkWriter::new(|c: Bytes| {
            chunks.push(c.len());
            Ok(())
        });
        w.write_all(&vec![1u8; CHUNK_LEN * 2 + 10]).expect("writes");
        w.finish().expect("finishes");
        assert_eq!(chunks, vec![CHUNK_LEN, CHUNK_LEN, 10]);
    }

    #[test]
    fn tree_round_trips_through_chunks_with_modes_and_symlinks() {
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("a/b")).expect("mkdir");
        std::fs::write(src.path().join("a/b/run.sh"), "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(
            src.path().join("a/b/run.sh"),
            std::fs::Permissions::from_mode(0o751),
        )
        .expect("chmod");
        std::fs::write(src.path().join("big"), vec![7u8; CHUNK_LEN * 3 + 5]).expect("write");
        std::os::unix::fs::symlink("a/b/run.sh", src.path().join("link")).expect("symlink");

        let (tx, rx) = mpsc::channel(4);
        let src_path = src.path().to_owned();
        let packer = std::thread::spawn(move || {
            let mut w = ChunkWriter::new(|c| {
                tx.blocking_send(c)
                    .map_err(|_| io::Error::other("receiver gone"))
            });
            pack_tree(&src_path, &mut w)?;
            w.finish()
        });
        let dest = tempfile::tempdir().expect("tempdir");
        unpack_tree(ChunkReader::new(rx), &dest.path().join("out")).expect("unpacks");
        packer.join().expect("joins").expect("packs");

        let out = dest.path().join("out");
        let mode = std::fs::metadata(out.join("a/b/run.sh"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o751);
        assert_eq!(
            std::fs::read(out.join("big")).expect("read"),
            vec![7u8; CHUNK_LEN * 3 + 5]
        );
        assert_eq!(
            std::fs::read_link(out.join("link")).expect("readlink"),
            Path::new("a/b/run.sh")
        );
    }

    #[test]
    fn owned_unpack_gives_created_entries_to_the_owner_and_keeps_modes() {
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("a/ro")).expect("mkdir");
        std::fs::write(src.path().join("a/ro/f"), "x").expect("write");
        std::os::unix::fs::symlink("/nonexistent", src.path().join("dangling")).expect("link");
        std::fs::set_permissions(
            src.path().join("a/ro"),
            std::fs::Permissions::from_mode(0o555),
        )
        .expect("chmod");
        let mut data = Vec::new();
        pack_tree(src.path(), &mut data).expect("packs");
        let root = tempfile::tempdir().expect("tempdir");
        let dest = root.path().join("new/dest");
        // Our own ids (those of a directory we made): the only owner a test that may not run
        // as root can give.
        use std::os::unix::fs::MetadataExt;
        let made = std::fs::metadata(root.path()).expect("stat");
        let me = (made.uid(), made.gid());
        unpack_tree_owned(&data[..], &dest, Some(me)).expect("unpacks");
        for path in [
            "new",
            "new/dest",
            "new/dest/a",
            "new/dest/a/ro",
            "new/dest/a/ro/f",
        ] {
            let meta = std::fs::symlink_metadata(root.path().join(path)).expect("stat");
            assert_eq!((meta.uid(), meta.gid()), me, "{path}");
        }
        assert!(
            std::fs::symlink_metadata(dest.join("dangling"))
                .expect("the symlink is kept")
                .is_symlink()
        );
        let mode = std::fs::metadata(dest.join("a/ro"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o555);
        assert_eq!(std::fs::read(dest.join("a/ro/f")).expect("read"), b"x");
        std::fs::set_permissions(dest.join("a/ro"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod back for cleanup");
    }

    #[test]
    fn unpack_refuses_paths_outside_the_destination() {
        let mut data = Vec::new();
        {
            let mut builder = tar::Builder::new(&mut data);
            let mut header = tar::Header::new_gnu();
            header.set_size(3);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            // Bypass the builder's own path checks to forge a hostile entry.
            let name = b"../escape";
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.set_cksum();
            builder.append(&header, &b"bad"[..]).expect("append");
            builder.finish().expect("finish");
        }
        let root = tempfile::tempdir().expect("tempdir");
        let dest = root.path().join("dest");
        let _ = unpack_tree(&data[..], &dest);
        assert!(!root.path().join("escape").exists());
    }
}
