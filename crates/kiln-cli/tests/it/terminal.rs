//! `kiln_cli::terminal`: attaching a terminal (here a pseudo-terminal the test plays the user
//! on) or plain pipes to a command on the local backend's pseudo-terminal.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use kiln_cli::terminal::{LocalTerminal, attach_with};
use kiln_vm::local::LocalProvider;
use kiln_vm::{Command, ExecUser, PtyRequest, Vm, VmProvider, VmSpec, WindowSize};
use rustix::termios::{LocalModes, tcgetattr};
use tokio::sync::mpsc;

const PATIENCE: Duration = Duration::from_secs(60);

fn request(argv: &[&str]) -> PtyRequest {
    PtyRequest {
        command: Command::Argv(argv.iter().map(|a| (*a).to_owned()).collect()),
        env: Vec::new(),
        cwd: None,
        user: ExecUser::Runner,
        size: WindowSize { rows: 24, cols: 80 },
    }
}

async fn local_vm(runtime: &std::path::Path) -> Arc<dyn Vm> {
    LocalProvider::new(runtime.to_owned())
        .allocate(&VmSpec::default())
        .await
        .expect("allocates")
        .vm
}

/// The user's side of a pseudo-terminal: what the screen shows, and a keyboard.
struct User {
    master: OwnedFd,
    screen: mpsc::UnboundedReceiver<Vec<u8>>,
    seen: String,
}

impl User {
    /// A new terminal of `rows` x `cols`; returns the user and the terminal kiln gets.
    fn new(rows: u16, cols: u16) -> (User, OwnedFd) {
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        let master =
            openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let slave = rustix::fs::open(
            name.as_c_str(),
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .expect("opens the terminal");
        resize(&master, rows, cols);
        let reader = master.try_clone().expect("dup");
        let (tx, screen) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = rustix::io::read(&reader, &mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        (
            User {
                master,
                screen,
                seen: String::new(),
            },
            slave,
        )
    }

    fn types(&self, keys: &[u8]) {
        rustix::io::write(&self.master, keys).expect("types");
    }

    async fn sees(&mut self, needle: &str) {
        let found = tokio::time::timeout(PATIENCE, async {
            while !self.seen.contains(needle) {
                match self.screen.recv().await {
                    Some(data) => self.seen.push_str(&String::from_utf8_lossy(&data)),
                    None => return false,
                }
            }
            true
        })
        .await;
        assert_eq!(found, Ok(true), "never saw {needle:?}; saw {:?}", self.seen);
    }
}

fn resize(master: &OwnedFd, rows: u16, cols: u16) {
    rustix::termios::tcsetwinsize(
        master,
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .expect("resizes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_is_raw_while_attached_follows_resizes_passes_ctrl_c_and_is_restored() {
    let runtime = tempfile::tempdir().expect("tempdir");
    let vm = local_vm(runtime.path()).await;
    let (mut user, terminal) = User::new(30, 90);
    let before = tcgetattr(&terminal).expect("tcgetattr");
    assert!(before.local_modes.contains(LocalModes::ICANON));
    let output = tokio::fs::File::from_std(std::fs::File::from(terminal.try_clone().expect("dup")));
    let local = LocalTerminal {
        input: terminal.try_clone().expect("dup"),
        output,
        terminal: Some(terminal.try_clone().expect("dup")),
    };
    // The last part polls with the `read` builtin (traps run between its timeouts), never waiting
    // for a child: bash ignores a SIGINT that arrives while it waits for a child that then
    // exits normally.
    let script = "stty size; echo ready; read -r x; echo got:$x; \
        trap 'echo winch:$(stty size)' WINCH; echo looping; \
        while :; do read -r -t 0.2 line; [ \"$line\" = go ] && { echo going; exec sleep 100; }; done";
    let attached = {
        let vm = vm.clone();
        tokio::spawn(
            async move { attach_with(&*vm, request(&["bash", "-c", script]), local).await },
        )
    };

    // The command's terminal has the local size; the local terminal is raw meanwhile.
    user.sees("30 90").await;
    user.sees("ready").await;
    let during = tcgetattr(&terminal).expect("tcgetattr");
    assert!(!during.local_modes.contains(LocalModes::ICANON));
    assert!(!during.local_modes.contains(LocalModes::ECHO));
    // Keys go through as typed; the guest's terminal makes a line of them.
    user.types(b"hi\r");
    user.sees("got:hi").await;
    user.sees("looping").await;
    // A resize of the local terminal, announced by SIGWINCH, reaches the command.
    resize(&user.master, 50, 120);
    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::WINCH)
        .expect("raises SIGWINCH");
    user.sees("winch:50 120").await;
    user.types(b"go\r");
    user.sees("going").await;
    // Ctrl-C is a byte in raw mode; the guest's terminal turns it into SIGINT.
    user.types(b"\x03");
    let code = tokio::time::timeout(PATIENCE, attached)
        .await
        .expect("the session ends")
        .expect("joins")
        .expect("attach works");
    assert_eq!(
        code, 130,
        "killed by SIGINT; the screen showed {:?}",
        user.seen
    );

    let after = tcgetattr(&terminal).expect("tcgetattr");
    assert_eq!(after.local_modes, before.local_modes);
    assert_eq!(after.input_modes, before.input_modes);
    assert_eq!(after.output_modes, before.output_modes);
    vm.release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_terminal_input_is_piped_and_its_end_is_end_of_file() {
    let runtime = tempfile::tempdir().expect("tempdir");
    let vm = local_vm(runtime.path()).await;
    // Piped input: a file, as in `kiln debug RUN < commands.txt`.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("input");
    std::fs::write(&path, b"hello\nrest of it\n").expect("writes");
    let read_end: OwnedFd = std::fs::File::open(&path).expect("opens").into();
    let mut output = Vec::new();
    let local = LocalTerminal {
        input: read_end,
        output: &mut output,
        terminal: None,
    };
    let code = tokio::time::timeout(
        PATIENCE,
        attach_with(
            &*vm,
            request(&[
                "sh",
                "-c",
                "read -r x; echo got:$x; cat >/dev/null; echo term:$TERM; exit 5",
            ]),
            local,
        ),
    )
    .await
    .expect("the session ends")
    .expect("attach works");
    let shown = String::from_utf8_lossy(&output);
    assert_eq!(code, 5, "{shown:?}");
    assert!(shown.contains("got:hello"), "{shown:?}");
    assert!(shown.contains("term:dumb"), "{shown:?}");
    vm.release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attach_restores_the_terminal() {
    let runtime = tempfile::tempdir().expect("tempdir");
    let vm = local_vm(runtime.path()).await;
    vm.release().await.expect("released");
    let (_user, terminal) = User::new(24, 80);
    let before = tcgetattr(&terminal).expect("tcgetattr");
    let local = LocalTerminal {
        input: terminal.try_clone().expect("dup"),
        output: Vec::new(),
        terminal: Some(terminal.try_clone().expect("dup")),
    };
    let err = attach_with(&*vm, request(&["true"]), local)
        .await
        .expect_err("a released VM runs nothing");
    assert!(format!("{err:#}").contains("released"), "{err:#}");
    let after = tcgetattr(&terminal).expect("tcgetattr");
    assert_eq!(after.local_modes, before.local_modes);
    assert_eq!(after.input_modes, before.input_modes);
}
