//! The agent's channel over `AF_VSOCK`, for hosts without virtio-serial (Firecracker).
//!
//! With `kiln.channel=vsock` on the kernel command line the agent listens on
//! [`kiln_proto::AGENT_VSOCK_PORT`] for any CID and serves one host connection at a time.
//! Firecracker's host side is a Unix-socket proxy (`CONNECT <port>`), which opens a vsock
//! stream to this listener. The listening socket lives as long as the agent: after a snapshot
//! restore Firecracker resets the guest's vsock connections, and the agent simply accepts the
//! next one.
//!
//! The virtio vsock modules must be loaded first (the initramfs does it), or `socket()` fails
//! with `EAFNOSUPPORT`. rustix has the address family but no vsock address type, so
//! [`VsockAddr`] encodes `struct sockaddr_vm` itself.

use std::io;
use std::mem::size_of;
use std::os::fd::OwnedFd;

use rustix::net::addr::{SocketAddrArg, SocketAddrLen, SocketAddrOpaque};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use tokio::io::unix::AsyncFd;

use crate::channel::FdStream;

/// `VMADDR_CID_ANY`: accept connections addressed to any of this guest's CIDs.
const CID_ANY: u32 = u32::MAX;

/// A vsock address (`struct sockaddr_vm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockAddr {
    /// The context id.
    pub cid: u32,
    /// The port.
    pub port: u32,
}

impl VsockAddr {
    fn sockaddr(&self) -> libc::sockaddr_vm {
        // SAFETY: sockaddr_vm is plain integers; all-zero is a valid value (zeroed padding is
        // what the kernel expects in `svm_zero`).
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = self.cid;
        addr.svm_port = self.port;
        addr
    }
}

// SAFETY: `with_sockaddr` passes a pointer to a live, fully initialized `sockaddr_vm` on the
// stack and its exact size, valid for the duration of the call.
unsafe impl SocketAddrArg for VsockAddr {
    unsafe fn with_sockaddr<R>(
        &self,
        f: impl FnOnce(*const SocketAddrOpaque, SocketAddrLen) -> R,
    ) -> R {
        let addr = self.sockaddr();
        f(
            (&raw const addr).cast::<SocketAddrOpaque>(),
            size_of::<libc::sockaddr_vm>() as SocketAddrLen,
        )
    }
}

/// A listening vsock socket.
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    /// Listens on `port` for any CID.
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        let fd = rustix::net::socket_with(
            AddressFamily::VSOCK,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::net::bind(&fd, &VsockAddr { cid: CID_ANY, port })?;
        rustix::net::listen(&fd, 4)?;
        // SAFETY: the OwnedFd is owned by the AsyncFd for its whole life, and an OwnedFd's raw
        // descriptor never changes, so it stays open and the same until the drop.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(VsockListener { fd })
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<FdStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| {
                Ok(rustix::net::accept_with(
                    fd.get_ref(),
                    SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                )?)
            }) {
                Ok(Ok(conn)) => return FdStream::new(conn),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_a_sockaddr_vm() {
        let addr = VsockAddr { cid: 3, port: 1024 };
        let raw = addr.sockaddr();
        assert_eq!(i32::from(raw.svm_family), libc::AF_VSOCK);
        assert_eq!((raw.svm_cid, raw.svm_port), (3, 1024));
        // SAFETY: the closure only reads the length rustix would pass to bind().
        let len = unsafe { addr.with_sockaddr(|_, len| len) };
        assert_eq!(len as usize, size_of::<libc::sockaddr_vm>());
    }

    /// Hosts with vsock support (no guest needed to listen) bind and listen for real; the
    /// accept path needs a guest and is covered by the Firecracker guest-level tests.
    #[tokio::test]
    async fn listening_works_or_names_the_missing_support() {
        match VsockListener::bind(kiln_proto::AGENT_VSOCK_PORT + 7) {
            Ok(_) => {}
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::ENODEV)),
                "unexpected error: {e}"
            ),
        }
    }
}
