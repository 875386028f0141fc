//! One scenario that proves a backend's terminals ([`kiln_vm::Vm::exec_pty`]) work, so every
//! backend (and the bare agent) is held to the same checks.

use std::future::Future;
use std::time::Duration;

use kiln_vm::{Command, ExecUser, ExitStatus, PtyRequest, PtySession, Signal, VmError, WindowSize};

/// Long enough for a command under TCG on a loaded machine; only a guard against hangs.
const PATIENCE: Duration = Duration::from_secs(120);

/// A terminal request for `sh -c script`, 24x80.
pub fn sh_request(script: &str) -> PtyRequest {
    PtyRequest {
        command: Command::Argv(vec!["sh".into(), "-c".into(), script.into()]),
        env: vec![("TERM".into(), "xterm".into())],
        cwd: None,
        user: ExecUser::Runner,
        size: WindowSize { rows: 24, cols: 80 },
    }
}

/// Reads the session's output until it contains `needle`; returns everything read.
pub async fn read_until(session: &mut PtySession, needle: &str, seen: &mut String) {
    let found = tokio::time::timeout(PATIENCE, async {
        while !seen.contains(needle) {
            match session.read().await {
                Some(data) => seen.push_str(&String::from_utf8_lossy(&data)),
                None => return false,
            }
        }
        true
    })
    .await;
    assert!(
        found == Ok(true),
        "the terminal never showed {needle:?}; it showed {seen:?}"
    );
}

/// Reads everything until the terminal closes, then the exit status.
pub async fn finish(mut session: PtySession, seen: &mut String) -> ExitStatus {
    tokio::time::timeout(PATIENCE, async {
        while let Some(data) = session.read().await {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
        session.wait().await
    })
    .await
    .unwrap_or_else(|_| panic!("the terminal command did not end; it showed {seen:?}"))
    .expect("the terminal command reports its exit")
}

/// The checks, through `exec` (a backend's `exec_pty`):
/// - the command's stdin is a terminal (`tty` names a `/dev/pts` device) of the requested size
///   (`stty size`), and its exit code comes back;
/// - a resize reaches `stty size`, and typed input reaches `read`;
/// - a SIGINT sent through the writer, and a typed Ctrl-C, interrupt `sleep 100`, and the exit
///   status says so.
pub async fn check_terminal<F, Fut>(exec: F)
where
    F: Fn(PtyRequest) -> Fut,
    Fut: Future<Output = Result<PtySession, VmError>>,
{
    // A terminal, its size, and the exit code.
    let session = exec(sh_request("tty; stty size; exit 3"))
        .await
        .expect("a terminal exec starts");
    let mut seen = String::new();
    let status = finish(session, &mut seen).await;
    assert_eq!(status, ExitStatus::Exited(3), "{seen:?}");
    assert!(seen.contains("/dev/pts/"), "`tty` printed {seen:?}");
    assert!(seen.contains("24 80"), "`stty size` printed {seen:?}");

    // A resize, then a typed line (CR, as a terminal's Enter key sends it).
    let mut session = exec(sh_request(
        "stty size; echo ready; read x; stty size; echo got:$x; exit 7",
    ))
    .await
    .expect("a terminal exec starts");
    let mut seen = String::new();
    read_until(&mut session, "ready", &mut seen).await;
    assert!(seen.contains("24 80"), "{seen:?}");
    let writer = session.writer();
    writer
        .resize(WindowSize {
            rows: 40,
            cols: 100,
        })
        .expect("the session is open");
    writer.write(&b"hello\r"[..]).expect("the session is open");
    let status = finish(session, &mut seen).await;
    assert_eq!(status, ExitStatus::Exited(7), "{seen:?}");
    assert!(
        seen.contains("got:hello"),
        "`read` did not get the input: {seen:?}"
    );
    assert!(
        seen.contains("40 100"),
        "the resize did not arrive: {seen:?}"
    );
    // The terminal echoes what was typed, as a terminal does.
    assert!(seen.contains("hello\r\n"), "{seen:?}");
    assert!(writer.write(&b"late"[..]).is_err(), "the session has ended");

    // SIGINT to the foreground job, through the writer and as a typed Ctrl-C.
    for typed in [false, true] {
        let mut session = exec(sh_request("echo ready; exec sleep 100"))
            .await
            .expect("a terminal exec starts");
        let mut seen = String::new();
        read_until(&mut session, "ready", &mut seen).await;
        let writer = session.writer();
        if typed {
            writer.write(&b"\x03"[..]).expect("the session is open");
        } else {
            writer.signal(Signal::Int).expect("the session is open");
        }
        let status = finish(session, &mut seen).await;
        assert_eq!(
            status,
            ExitStatus::Signaled(2),
            "SIGINT (typed: {typed}) did not end `sleep 100`: {seen:?}"
        );
    }
}
