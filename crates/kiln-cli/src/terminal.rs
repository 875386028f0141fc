//! Attaching the local terminal to a command on a VM's pseudo-terminal: the interactive half of
//! `kiln debug`.
//!
//! [`attach`] runs a [`PtyRequest`] with [`Vm::exec_pty`] and joins it to this process's stdin
//! and stdout until the command ends, then returns its exit code (128 + N for a command killed
//! by signal N, as shells report it).
//!
//! - **stdin is a terminal:** the terminal goes into raw mode for the session, so every key
//!   (Ctrl-C, Ctrl-Z, Ctrl-D, arrows) reaches the guest's terminal as bytes and the guest's line
//!   discipline does what a local one would (Ctrl-C becomes SIGINT for the guest's foreground
//!   job). The guest terminal starts at the local size and follows it (`SIGWINCH`); `TERM` is
//!   passed along. The previous mode is restored on every way out: normal end, error, panic.
//! - **stdin is not a terminal** (a pipe, a file): no raw mode; input is forwarded as it is
//!   read, and its end is sent as Ctrl-D (end of file for a reader at the start of a line).
//!   SIGINT received by kiln is forwarded to the guest's foreground job instead of ending kiln.

use std::os::fd::{AsFd, OwnedFd};

use anyhow::Context;
use kiln_vm::{ExitStatus, PtyRequest, Signal, Vm, WindowSize};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

/// `TERM` for the guest when the local one is unknown.
const DEFAULT_TERM: &str = "xterm-256color";

/// Runs `request` on `vm`'s pseudo-terminal, attached to this process's stdin and stdout (see
/// the module docs), and returns the command's exit code.
pub async fn attach(vm: &dyn Vm, request: PtyRequest) -> anyhow::Result<i32> {
    let stdin = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("Cannot use stdin")?;
    let terminal = if rustix::termios::isatty(&stdin) {
        Some(stdin.try_clone().context("Cannot use stdin")?)
    } else {
        None
    };
    let stdout = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("Cannot use stdout")?;
    let local = LocalTerminal {
        input: stdin,
        output: tokio::fs::File::from_std(std::fs::File::from(stdout)),
        terminal,
    };
    attach_with(vm, request, local).await
}

/// Where an attached session's input comes from and its output goes.
#[derive(Debug)]
pub struct LocalTerminal<W> {
    /// Keystrokes, or piped input. Read on a thread of its own until its end.
    pub input: OwnedFd,
    /// Where the command's output is written.
    pub output: W,
    /// The local terminal when `input` is one: raw mode for the session, its size followed.
    pub terminal: Option<OwnedFd>,
}

/// [`attach`] with explicit input, output and terminal (tests drive it with a pseudo-terminal
/// of their own).
pub async fn attach_with<W: AsyncWrite + Unpin>(
    vm: &dyn Vm,
    mut request: PtyRequest,
    local: LocalTerminal<W>,
) -> anyhow::Result<i32> {
    let LocalTerminal {
        input,
        mut output,
        terminal,
    } = local;
    if !request.env.iter().any(|(key, _)| key == "TERM") {
        let term = match &terminal {
            Some(_) => std::env::var("TERM").unwrap_or_else(|_| DEFAULT_TERM.to_owned()),
            None => "dumb".to_owned(),
        };
        request.env.push(("TERM".to_owned(), term));
    }
    if let Some(size) = terminal.as_ref().and_then(window_size) {
        request.size = size;
    }
    // Entered before the session exists, left (by drop) on every way out of this function.
    let _raw = match &terminal {
        Some(fd) => Some(RawMode::enter(fd)?),
        None => None,
    };
    let mut winch = match &terminal {
        Some(_) => Some(signal(SignalKind::window_change()).context("Cannot watch SIGWINCH")?),
        None => None,
    };
    let mut interrupts = match &terminal {
        Some(_) => None,
        None => Some(signal(SignalKind::interrupt()).context("Cannot watch SIGINT")?),
    };

    let mut session = vm
        .exec_pty(request)
        .await
        .context("Cannot start the command on a terminal")?;
    let writer = session.writer();
    let mut keys = read_on_a_thread(input);
    let mut keys_open = true;
    loop {
        tokio::select! {
            data = session.read() => match data {
                Some(data) => {
                    output.write_all(&data).await.context("Cannot write the output")?;
                    output.flush().await.context("Cannot write the output")?;
                }
                None => break,
            },
            key = keys.recv(), if keys_open => match key {
                Some(data) => {
                    let _ = writer.write(data);
                }
                None => {
                    keys_open = false;
                    if terminal.is_none() {
                        // End of piped input: Ctrl-D, end of file for the guest's reader.
                        let _ = writer.write(&b"\x04"[..]);
                    }
                }
            },
            Some(()) = next_signal(&mut winch) => {
                if let Some(size) = terminal.as_ref().and_then(window_size) {
                    let _ = writer.resize(size);
                }
            }
            Some(()) = next_signal(&mut interrupts) => {
                let _ = writer.signal(Signal::Int);
            }
        }
    }
    let status = session
        .wait()
        .await
        .context("The command on the terminal failed")?;
    Ok(exit_code(status))
}

/// The exit code a shell would report for `status`.
pub fn exit_code(status: ExitStatus) -> i32 {
    match status {
        ExitStatus::Exited(code) => code,
        ExitStatus::Signaled(signal) => 128 + signal,
        // What `timeout(1)` reports.
        ExitStatus::TimedOut => 124,
    }
}

async fn next_signal(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// The size of the terminal `fd`, unless it cannot say (or says 0x0).
fn window_size(fd: &OwnedFd) -> Option<WindowSize> {
    let size = rustix::termios::tcgetwinsize(fd).ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then_some(WindowSize {
        rows: size.ws_row,
        cols: size.ws_col,
    })
}

/// Reads `input` on a thread of its own (a blocked read must not hold up the runtime at exit)
/// and sends what it reads; the channel closes at its end.
fn read_on_a_thread(input: OwnedFd) -> mpsc::UnboundedReceiver<Vec<u8>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("kiln-terminal-input".to_owned())
        .spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match rustix::io::read(&input, &mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                    Err(rustix::io::Errno::INTR) => {}
                    Err(_) => return,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("Cannot read the terminal's input: {e}");
    }
    rx
}

/// A terminal in raw mode until this is dropped, which restores the mode it had.
struct RawMode {
    fd: OwnedFd,
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter(fd: &OwnedFd) -> anyhow::Result<RawMode> {
        let fd = fd.try_clone().context("Cannot use the terminal")?;
        let saved = rustix::termios::tcgetattr(&fd).context("Cannot read the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&fd, rustix::termios::OptionalActions::Now, &raw)
            .context("Cannot put the terminal in raw mode")?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing better to do if this fails: the terminal is gone.
        let _ = rustix::termios::tcsetattr(
            &self.fd,
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}
