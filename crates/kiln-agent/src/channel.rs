//! Finding and opening the agent's channel in the guest.
//!
//! Without udev there is no `/dev/virtio-ports/<name>` link, so the agent scans
//! `/sys/class/virtio-ports/*/name` for [`VIRTIO_PORT_NAME`] and opens the matching
//! `/dev/vportNpM` node (devtmpfs creates it under the same name as the sysfs entry). The port
//! is used non-blocking through the runtime's reactor (`poll` on a virtio port is supported),
//! so reads and writes proceed concurrently on one descriptor.

use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use kiln_proto::VIRTIO_PORT_NAME;
use rustix::fs::{Mode, OFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The `/dev` node of the virtio-serial port called `name`, if the port exists yet.
pub fn find_virtio_port(name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in entries.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Some(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Waits until the agent's port exists and opens it.
pub async fn open_virtio_port() -> io::Result<FdStream> {
    let mut waited = 0u32;
    loop {
        if let Some(path) = find_virtio_port(VIRTIO_PORT_NAME)
            && path.exists()
        {
            let fd = rustix::fs::open(
                &path,
                OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
                Mode::empty(),
            )?;
            return FdStream::new(fd);
        }
        if waited.is_multiple_of(200) {
            crate::log!("waiting for the virtio-serial port {VIRTIO_PORT_NAME}");
        }
        waited += 1;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A non-blocking character device or socket as an async byte stream.
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    /// Wraps a descriptor that is already in non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<FdStream> {
        // SAFETY: the OwnedFd is owned by the AsyncFd for its whole life, and an OwnedFd's
        // raw descriptor never changes, so it stays open and the same until the drop.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(FdStream { fd })
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut *unfilled)?)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| Ok(rustix::io::write(fd.get_ref(), data)?)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
