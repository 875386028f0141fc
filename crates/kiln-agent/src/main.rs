//! `kiln-agent`: the guest side of the kiln protocol (see `kiln-proto`).
//!
//! # Modes
//! - **PID 1** (started by the kernel as `init`, with no arguments): boots the guest (see
//!   [`init`]: mounts, modules from `/kiln/modules.order`, switch to `kiln.root=`, loopback),
//!   then serves the protocol on the virtio-serial port `kiln.agent` (or on vsock, see [`vsock`]).
//!   If the host disconnects it
//!   waits for it again; on `Shutdown` it kills everything, syncs and powers off. PID 1 also
//!   reaps every orphan in the guest ([`reaper`]).
//!
//!   Kernel command line keys it reads: `kiln.root=DEV` (switch to this ext4 root;
//!   `kiln.rootfstype=` overrides the type), `kiln.net=ADDR/PREFIX,GW[,DNS]` (static network,
//!   see [`net`]).
//! - **`--stdio`**: serves one connection on stdin/stdout and exits when it ends. Tests and the
//!   local fallback use this on the host; nothing system-wide (clock, hostname, `kill(-1)`,
//!   power) is touched in this mode.
//!
//! Diagnostics go to stderr, which under PID 1 is the console (the VM's serial log).
//!
//! # A static binary
//! The guest's initramfs has no libc, so the agent is linked statically. Only the glibc target
//! is installed here, and glibc links statically as long as nothing calls NSS (no user or host
//! lookups, no libc DNS: the agent never does; it reads `/etc/passwd` and `/etc/group` itself,
//! see [`user`]):
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" \
//!   cargo build -p kiln-agent --release --target x86_64-unknown-linux-gnu
//! ```
//! The explicit `--target` keeps `RUSTFLAGS` away from build scripts and proc-macros. The result
//! is `target/x86_64-unknown-linux-gnu/release/kiln-agent`, a static-pie ELF (`ldd` says
//! "statically linked").

mod channel;
mod exec;
mod files;
mod init;
mod net;
mod reaper;
mod serve;
mod system;
mod user;
mod vsock;

use std::process::ExitCode;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::reaper::Reaper;
use crate::serve::{ServeEnd, serve};

/// Writes one diagnostic line to stderr.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("kiln-agent: {}", format_args!($($arg)*))
    };
}

const USAGE: &str = "\
Usage: kiln-agent [--stdio]

Without arguments the agent must be PID 1 (the guest's init).
  --stdio     serve the kiln protocol on stdin/stdout
  --version   print the agent and protocol versions
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pid1 = rustix::process::getpid().is_init();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--stdio"] => stdio_main(),
        ["--version"] => {
            println!(
                "kiln-agent {} (protocol v{})",
                env!("CARGO_PKG_VERSION"),
                kiln_proto::PROTOCOL_VERSION
            );
            ExitCode::SUCCESS
        }
        ["--help"] | ["-h"] => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        // The kernel passes unknown `key=value`-less cmdline words to init as arguments.
        _ if pid1 => pid1_main(),
        _ => {
            eprint!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn stdio_main() -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            log!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        // Orphans of our commands become our children, so the reaper collects them.
        let _ = rustix::process::set_child_subreaper(None);
        let reaper = match Reaper::start() {
            Ok(reaper) => reaper,
            Err(e) => {
                log!("cannot watch SIGCHLD: {e}");
                return ExitCode::FAILURE;
            }
        };
        // SIGTERM/SIGINT/SIGHUP end the connection as if the host had hung up: the execs'
        // process groups are terminated instead of outliving the agent.
        let stop = async {
            let mut signals = Vec::new();
            for kind in [
                SignalKind::terminate(),
                SignalKind::interrupt(),
                SignalKind::hangup(),
            ] {
                match signal(kind) {
                    Ok(s) => signals.push(s),
                    Err(e) => log!("cannot watch signal {kind:?}: {e}"),
                }
            }
            if signals.is_empty() {
                return std::future::pending().await;
            }
            let any = signals.iter_mut().map(|s| Box::pin(s.recv()));
            let _ = futures_select_any(any.collect()).await;
        };
        match serve(tokio::io::stdin(), tokio::io::stdout(), reaper, false, stop).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                log!("{e}");
                ExitCode::FAILURE
            }
        }
    });
    // Do not wait for the blocking thread parked in a stdin read.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

fn pid1_main() -> ExitCode {
    if let Err(e) = init::boot() {
        log!("boot failed: {}", error_chain(&e));
        halt();
    }
    match runtime() {
        Ok(runtime) => runtime.block_on(pid1_serve()),
        Err(e) => log!("cannot start the runtime: {e}"),
    }
    halt()
}

async fn pid1_serve() {
    let reaper = match Reaper::start() {
        Ok(reaper) => reaper,
        Err(e) => {
            log!("cannot watch SIGCHLD: {e}");
            return;
        }
    };
    let cmdline = init::cmdline();
    let channel = init::cmdline_value(&cmdline, "kiln.channel").unwrap_or("virtio-serial");
    // `kiln.channel=vsock` (Firecracker): one listener for the agent's whole life.
    let listener = match channel {
        "vsock" => match vsock::VsockListener::bind(kiln_proto::AGENT_VSOCK_PORT) {
            Ok(listener) => Some(listener),
            Err(e) => return log!("cannot listen on vsock: {e}"),
        },
        "virtio-serial" => None,
        other => {
            log!("unsupported kiln.channel={other}; using the virtio-serial port");
            None
        }
    };
    loop {
        let opened = match &listener {
            Some(listener) => listener.accept().await,
            None => channel::open_virtio_port().await,
        };
        let stream = match opened {
            Ok(stream) => stream,
            Err(e) => {
                log!("cannot open the agent channel: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (reader, writer) = tokio::io::split(stream);
        match serve(reader, writer, reaper.clone(), true, std::future::pending()).await {
            Ok(ServeEnd::Shutdown) => return,
            Ok(ServeEnd::Closed) => {}
            Err(e) => log!("connection ended: {}", error_chain(&e)),
        }
        // The host went away; wait for it to connect again.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Powers off. PID 1 must never exit (the kernel would panic), so if that fails, sleep forever.
fn halt() -> ! {
    let e = system::power_off();
    log!("cannot power off: {e}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Resolves when the first of `futures` does.
async fn futures_select_any<F: Future + Unpin>(mut futures: Vec<F>) -> F::Output {
    std::future::poll_fn(|cx| {
        for future in futures.iter_mut() {
            if let std::task::Poll::Ready(output) = std::pin::Pin::new(future).poll(cx) {
                return std::task::Poll::Ready(output);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
