//! File transfers: `Put` (host to guest) and `Get` (guest to host).
//!
//! What a `Put` creates (the file, the tree's entries, missing parent directories) belongs to
//! the default exec user (the guest's `runner`), so steps can write to what the host laid out
//! for them; files that already existed keep their owner.
//!
//! A plain file travels as its bytes, a directory as a tar stream (see
//! `kiln_proto::transfer`). The synchronous file and tar work runs on blocking threads that
//! exchange chunks with the async side through bounded channels.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use kiln_proto::transfer::{
    ChunkReader, ChunkWriter, create_dirs_owned, mode_of, pack_tree, unpack_tree_owned,
};
use kiln_proto::{CHUNK_LEN, GetKind, Message, PutKind, RequestId};
use tokio::sync::mpsc;

use crate::serve::Agent;

/// Applies an upload whose chunks arrive on `chunks` (closed at `End`), then reports `Done`
/// or `Error`.
pub async fn put(
    agent: Arc<Agent>,
    id: RequestId,
    path: String,
    kind: PutKind,
    chunks: mpsc::Receiver<Bytes>,
) {
    let target = match absolute(&path) {
        Ok(target) => target,
        Err(message) => return fail(&agent, id, message).await,
    };
    let owner = agent.identities.file_owner();
    let result = tokio::task::spawn_blocking(move || {
        let reader = ChunkReader::new(chunks);
        match kind {
            PutKind::File { mode } => write_file(reader, &target, mode, owner),
            PutKind::Tree => unpack_tree_owned(reader, &target, owner),
        }
    })
    .await
    .map_err(io::Error::other)
    .and_then(|r| r);
    match result {
        Ok(()) => agent.send(Message::Done { id }).await,
        Err(e) => fail(&agent, id, format!("Cannot write {path}: {e}")).await,
    }
}

fn write_file(
    mut reader: ChunkReader,
    target: &Path,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    if let Some(parent) = target.parent() {
        create_dirs_owned(parent, owner)?;
    }
    let existed = target.symlink_metadata().is_ok();
    let mut file = std::fs::File::create(target)?;
    if let Some((uid, gid)) = owner
        && !existed
    {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    }
    io::copy(&mut reader, &mut file)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
    file.sync_data()
}

/// Sends `path`: `Meta`, `Chunk`s, `End`; or `Error`.
pub async fn get(agent: Arc<Agent>, id: RequestId, path: String) {
    let source = match absolute(&path) {
        Ok(source) => source,
        Err(message) => return fail(&agent, id, message).await,
    };
    let metadata = match tokio::fs::metadata(&source).await {
        Ok(metadata) => metadata,
        Err(e) => return fail(&agent, id, format!("Cannot read {path}: {e}")).await,
    };
    let kind = if metadata.is_dir() {
        GetKind::Tree
    } else {
        GetKind::File {
            mode: mode_of(&metadata),
            size: metadata.len(),
        }
    };
    // Open a file before announcing it, so a permission error is a clean `Error`.
    let file = if metadata.is_dir() {
        None
    } else {
        match std::fs::File::open(&source) {
            Ok(file) => Some(file),
            Err(e) => return fail(&agent, id, format!("Cannot read {path}: {e}")).await,
        }
    };
    agent.send(Message::Meta { id, kind }).await;
    let out = agent.out.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut writer = ChunkWriter::new(|data| {
            out.blocking_send(Message::Chunk { id, data })
                .map_err(|_| io::Error::other("The channel to the host closed"))
        });
        match file {
            Some(mut file) => {
                let mut buf = vec![0u8; CHUNK_LEN];
                loop {
                    let n = io::Read::read(&mut file, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    io::Write::write_all(&mut writer, &buf[..n])?;
                }
            }
            None => pack_tree(&source, &mut writer)?,
        }
        writer.finish()
    })
    .await
    .map_err(io::Error::other)
    .and_then(|r| r);
    match result {
        Ok(()) => agent.send(Message::End { id }).await,
        Err(e) => fail(&agent, id, format!("Cannot read {path}: {e}")).await,
    }
}

fn absolute(path: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(path);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(format!("Guest paths must be absolute, got {:?}", path))
    }
}

async fn fail(agent: &Agent, id: RequestId, message: String) {
    agent
        .send(Message::Error {
            id: Some(id),
            message,
        })
        .await;
}
