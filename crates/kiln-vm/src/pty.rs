//! Host pseudo-terminals, for the local backend's [`crate::Vm::exec_pty`].
//!
//! The guest agent does the same inside VMs (its own copy: the agent does not link kiln-vm).
//! The master is non-blocking and driven by the runtime's reactor; reading it fails with `EIO`
//! once no process holds the terminal any more, which is its end of file.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::WindowSize;

/// A new pseudo-terminal of `size`: the master (non-blocking) and the slave (opened without
/// becoming anyone's controlling terminal).
pub(crate) fn open(size: WindowSize) -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    set_size(&master, size)?;
    rustix::fs::fcntl_setfl(&master, OFlags::RDWR | OFlags::NONBLOCK)?;
    Ok((master, slave))
}

/// `TIOCSWINSZ`: the terminal's foreground job gets `SIGWINCH`.
pub(crate) fn set_size(fd: impl AsFd, size: WindowSize) -> io::Result<()> {
    let winsize = rustix::termios::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    Ok(rustix::termios::tcsetwinsize(fd, winsize)?)
}

/// What the child does between `fork` and `exec`: lead a new session whose controlling
/// terminal is its stdin. Only async-signal-safe system calls.
pub(crate) fn become_session_leader() -> io::Result<()> {
    default_signals();
    rustix::process::setsid()?;
    // SAFETY: fd 0 is the terminal std has just installed; it stays open until `exec`.
    let stdin = unsafe { BorrowedFd::borrow_raw(0) };
    Ok(rustix::process::ioctl_tiocsctty(stdin)?)
}

/// Gives the terminal's job-control signals their default actions: a command started from a
/// shell's background job (or under `nohup`) inherits them ignored, and then neither a typed
/// Ctrl-C nor a forwarded SIGINT would reach it. Only `sigaction` calls: async-signal-safe.
pub(crate) fn default_signals() {
    for signal in [
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGHUP,
        libc::SIGTERM,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
    ] {
        // SAFETY: setting a default disposition installs no handler and touches no memory.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
}

/// The master side, for async reads and writes.
pub(crate) struct Master {
    fd: AsyncFd<OwnedFd>,
}

impl Master {
    /// Wraps a non-blocking master (from [`open`]).
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Master> {
        // SAFETY: the AsyncFd owns the OwnedFd for its whole life, and an OwnedFd's raw
        // descriptor never changes, so it stays open and the same until the drop.
        let fd = unsafe {
            AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)
        }?;
        Ok(Master { fd })
    }

    /// Reads what the terminal shows; `Ok(0)` or `EIO` once it has closed.
    pub(crate) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd
            .async_io(Interest::READABLE, |fd| {
                Ok(rustix::io::read(fd, &mut *buf)?)
            })
            .await
    }

    /// Types all of `data` at the terminal.
    pub(crate) async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self
                .fd
                .async_io(Interest::WRITABLE, |fd| Ok(rustix::io::write(fd, data)?))
                .await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// The terminal's foreground process group: whom its Ctrl-C would signal.
    pub(crate) fn foreground_group(&self) -> io::Result<rustix::process::Pid> {
        Ok(rustix::termios::tcgetpgrp(self.fd.get_ref())?)
    }

    /// Changes the terminal's size.
    pub(crate) fn resize(&self, size: WindowSize) -> io::Result<()> {
        set_size(self.fd.get_ref(), size)
    }
}
