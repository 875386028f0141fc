//! Hostile and mismatched peers, on both sides of the protocol.

use std::process::Stdio;
use std::time::Duration;

use bytes::BufMut;
use kiln_proto::{FrameReader, FrameWriter, HelloAckInfo, Message, PROTOCOL_VERSION, ProtoError};
use kiln_vm::guest::{ConnectOptions, GuestClient, GuestError};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;

use crate::{agent_path, script};

fn raw_agent() -> (Child, FrameReader<ChildStdout>, ChildStdin) {
    let mut child = tokio::process::Command::new(agent_path())
        .arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawns");
    let stdout = child.stdout.take().expect("stdout");
    let stdin = child.stdin.take().expect("stdin");
    (child, FrameReader::new(stdout), stdin)
}

async fn next(reader: &mut FrameReader<ChildStdout>) -> Message {
    tokio::time::timeout(Duration::from_secs(10), reader.next())
        .await
        .expect("answers in time")
        .expect("readable")
        .expect("a frame")
        .expect("decodes")
}

async fn hello(
    stdin: &mut ChildStdin,
    reader: &mut FrameReader<ChildStdout>,
    version: u32,
) -> Message {
    FrameWriter::new(&mut *stdin)
        .send(&Message::Hello {
            version,
            clock: None,
            hostname: None,
        })
        .await
        .expect("sends");
    next(reader).await
}

#[tokio::test]
async fn the_agent_rejects_another_protocol_version_naming_both() {
    let (mut child, mut reader, mut stdin) = raw_agent();
    let reply = hello(&mut stdin, &mut reader, PROTOCOL_VERSION + 41).await;
    let Message::Error { id: None, message } = reply else {
        panic!("expected an error, got {reply:?}");
    };
    assert!(
        message.contains(&format!("v{}", PROTOCOL_VERSION + 41)),
        "{message}"
    );
    assert!(
        message.contains(&format!("v{PROTOCOL_VERSION}")),
        "{message}"
    );
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits")
        .expect("waits");
    assert!(!status.success());
}

#[tokio::test]
async fn the_client_rejects_an_agent_of_another_version_naming_both() {
    let (host_side, agent_side) = tokio::io::duplex(64 * 1024);
    let (agent_read, agent_write) = tokio::io::split(agent_side);
    let fake_agent = tokio::spawn(async move {
        let mut reader = FrameReader::new(agent_read);
        let mut writer = FrameWriter::new(agent_write);
        let _hello = reader.next().await;
        writer
            .send(&Message::HelloAck {
                version: PROTOCOL_VERSION + 1,
                info: HelloAckInfo {
                    agent_version: "9.9.9".into(),
                    kernel: "x".into(),
                    pid1: true,
                    pid: 1,
                    user: kiln_proto::UserInfo {
                        name: "runner".into(),
                        uid: 1001,
                        gid: 1001,
                        home: "/home/runner".into(),
                    },
                    user_fallback: None,
                },
            })
            .await
            .expect("sends");
        writer
    });
    let err = GuestClient::connect(host_side, "vm-test")
        .await
        .expect_err("mismatch");
    let _keep_open = fake_agent.await;
    assert!(
        matches!(
            err,
            GuestError::Protocol(ProtoError::VersionMismatch { host, agent })
                if host == PROTOCOL_VERSION && agent == PROTOCOL_VERSION + 1
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("v{PROTOCOL_VERSION}"))
            && text.contains(&format!("v{}", PROTOCOL_VERSION + 1))
    );
}

#[tokio::test]
async fn a_silent_agent_hits_the_hello_timeout() {
    let (host_side, _agent_side) = tokio::io::duplex(1024);
    let (read, write) = tokio::io::split(host_side);
    let options = ConnectOptions {
        hello_timeout: Duration::from_millis(200),
        ..ConnectOptions::new("vm-silent")
    };
    let err = GuestClient::connect_with(read, write, options)
        .await
        .expect_err("times out");
    assert!(matches!(err, GuestError::HelloTimeout(_)), "{err}");
}

#[tokio::test]
async fn the_agent_answers_a_malformed_frame_with_an_error_and_keeps_serving() {
    let (_child, mut reader, mut stdin) = raw_agent();
    assert!(matches!(
        hello(&mut stdin, &mut reader, PROTOCOL_VERSION).await,
        Message::HelloAck { .. }
    ));
    let mut garbage = bytes::BytesMut::new();
    garbage.put_u32(5);
    garbage.put_slice(&[0xee, 0xff, 0x00, 0x13, 0x37]);
    stdin.write_all(&garbage).await.expect("writes");
    let reply = next(&mut reader).await;
    assert!(
        matches!(&reply, Message::Error { id: None, message } if message.contains("Malformed")),
        "{reply:?}"
    );
    FrameWriter::new(&mut stdin)
        .send(&Message::Ping { id: 5 })
        .await
        .expect("sends");
    assert_eq!(next(&mut reader).await, Message::Pong { id: 5 });
}

#[tokio::test]
async fn the_agent_refuses_an_oversized_frame_and_hangs_up() {
    let (mut child, mut reader, mut stdin) = raw_agent();
    assert!(matches!(
        hello(&mut stdin, &mut reader, PROTOCOL_VERSION).await,
        Message::HelloAck { .. }
    ));
    // Announce 4 GiB - 1 and send a few bytes: the agent must not try to buffer it.
    stdin
        .write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .await
        .expect("writes");
    let reply = next(&mut reader).await;
    assert!(
        matches!(&reply, Message::Error { id: None, message } if message.contains("exceeds the limit")),
        "{reply:?}"
    );
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits")
        .expect("waits");
    assert!(!status.success());
}

#[tokio::test]
async fn the_client_survives_a_hostile_agent() {
    let (host_side, agent_side) = tokio::io::duplex(64 * 1024);
    let (agent_read, mut agent_write) = tokio::io::split(agent_side);
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let fake_agent = tokio::spawn(async move {
        let mut reader = FrameReader::new(agent_read);
        let _hello = reader.next().await;
        let mut writer = FrameWriter::new(&mut agent_write);
        writer
            .send(&Message::HelloAck {
                version: PROTOCOL_VERSION,
                info: HelloAckInfo {
                    agent_version: "evil".into(),
                    kernel: "x".into(),
                    pid1: true,
                    pid: 1,
                    user: kiln_proto::UserInfo {
                        name: "runner".into(),
                        uid: 1001,
                        gid: 1001,
                        home: "/home/runner".into(),
                    },
                    user_fallback: None,
                },
            })
            .await
            .expect("sends");
        // A garbage frame: the client answers with an error frame and carries on.
        let mut garbage = bytes::BytesMut::new();
        garbage.put_u32(3);
        garbage.put_slice(&[0xff, 0xff, 0xff]);
        agent_write.write_all(&garbage).await.expect("writes");
        // Wait for the error answer and the exec request (in either order), then announce an
        // enormous frame.
        let _ = go_rx.await;
        let (mut saw_error, mut saw_exec) = (false, false);
        while !(saw_error && saw_exec) {
            match reader
                .next()
                .await
                .expect("reads")
                .expect("frame")
                .expect("decodes")
            {
                Message::Error { id: None, .. } => saw_error = true,
                Message::Exec(_) => saw_exec = true,
                other => panic!("unexpected {other:?}"),
            }
        }
        agent_write
            .write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 0, 0])
            .await
            .expect("writes");
        // Keep the stream open: the client must close on its own.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let client = GuestClient::connect(host_side, "vm-evil")
        .await
        .expect("hello");
    let (tx, _rx) = mpsc::unbounded_channel();
    let exec = client.exec(script("true"), tx);
    let _ = go_tx.send(());
    let err = tokio::time::timeout(Duration::from_secs(5), exec)
        .await
        .expect("fails fast")
        .expect_err("the channel is dead");
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    let reason = tokio::time::timeout(Duration::from_secs(5), client.closed())
        .await
        .expect("closed");
    assert!(reason.contains("exceeds the limit"), "{reason}");
    assert!(client.ping().await.is_err());
    fake_agent.abort();
}

/// A VM restored from a snapshot is inside the connection that was open when it was saved; its
/// new host greets again, and the agent must answer as to a first hello, then keep serving.
#[tokio::test]
async fn a_second_hello_in_a_connection_is_answered_like_the_first() {
    let (_child, mut reader, mut stdin) = raw_agent();
    let first = hello(&mut stdin, &mut reader, PROTOCOL_VERSION).await;
    assert!(matches!(first, Message::HelloAck { .. }), "{first:?}");
    let again = hello(&mut stdin, &mut reader, PROTOCOL_VERSION).await;
    let Message::HelloAck { version, info } = again else {
        panic!("expected a HelloAck, got {again:?}");
    };
    assert_eq!(version, PROTOCOL_VERSION);
    assert!(!info.pid1);
    let wrong = hello(&mut stdin, &mut reader, PROTOCOL_VERSION + 1).await;
    assert!(
        matches!(wrong, Message::Error { id: None, .. }),
        "{wrong:?}"
    );
    FrameWriter::new(&mut stdin)
        .send(&Message::Ping { id: 7 })
        .await
        .expect("sends");
    let pong = next(&mut reader).await;
    assert!(matches!(pong, Message::Pong { id: 7 }), "{pong:?}");
}
