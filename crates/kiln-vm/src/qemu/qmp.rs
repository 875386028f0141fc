//! A small QMP (QEMU Machine Protocol) client.
//!
//! QMP is newline-delimited JSON over a Unix socket. On connect QEMU sends a greeting
//! (`{"QMP": {...}}`); the client answers `qmp_capabilities` to enter command mode. Each command
//! is `{"execute": NAME, "arguments": {...}, "id": N}`; its reply is `{"return": ...,"id": N}` or
//! `{"error": {"class", "desc"}, "id": N}`. Asynchronous `{"event": ...}` lines may arrive between
//! replies at any time; this client skips them (the backend watches the QEMU process itself).
//! Commands are issued one at a time, so replies are matched by id in order.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest QMP line accepted; QEMU's replies to our few commands are far shorter.
const MAX_LINE: usize = 1 << 20;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be used.
    #[error("QMP I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("QEMU sent an invalid QMP message: {0}")]
    Protocol(String),
    /// QEMU rejected a command.
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer in time.
    #[error("QEMU did not answer QMP within {0:?}")]
    Timeout(Duration),
}

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    /// QEMU's version from the greeting, e.g. `7.2.18`.
    pub version: String,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        tokio::time::timeout(timeout, async {
            let stream = super::connect_unix(path).await?;
            let (read, writer) = stream.into_split();
            let mut qmp = Qmp {
                reader: BufReader::new(read),
                writer,
                next_id: 1,
                version: String::new(),
            };
            let greeting = qmp.read_message().await?;
            let version = greeting.pointer("/QMP/version/qemu").ok_or_else(|| {
                QmpError::Protocol(format!("expected a greeting, got {greeting}"))
            })?;
            qmp.version = format!(
                "{}.{}.{}",
                version["major"], version["minor"], version["micro"]
            );
            qmp.execute("qmp_capabilities", None).await?;
            Ok(qmp)
        })
        .await
        .map_err(|_| QmpError::Timeout(timeout))?
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            let message = self.read_message().await?;
            if message.get("event").is_some() {
                continue;
            }
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let text = |k: &str| {
                    error
                        .get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected reply {message}")));
        }
    }

    /// Asks QEMU to exit. QEMU may close the socket before or after answering; both are success.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if line.last() != Some(&b'\n') && n >= MAX_LINE {
                return Err(QmpError::Protocol("line too long".to_owned()));
            }
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(text.trim())
                .map_err(|e| QmpError::Protocol(format!("{e}: {}", text.trim())));
        }
    }
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted QMP server: greets, then answers each command line with `reply(cmd, id)`.
    async fn serve(listener: UnixListener, events_first: bool) {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 18, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        while let Some(line) = lines.next_line().await.unwrap() {
            let req: Value = serde_json::from_str(&line).unwrap();
            let id = req["id"].clone();
            if events_first {
                let event =
                    json!({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}});
                write
                    .write_all(format!("{event}\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            let reply = match req["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({"return": {}, "id": id}),
                "query-status" => {
                    json!({"return": {"status": "running", "running": true}, "id": id})
                }
                "quit" => {
                    write
                        .write_all(format!("{}\r\n", json!({"return": {}, "id": id})).as_bytes())
                        .await
                        .unwrap();
                    return;
                }
                other => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}, "id": id})
                }
            };
            write
                .write_all(format!("{reply}\r\n").as_bytes())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn negotiates_executes_skips_events_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(serve(listener, true));
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(qmp.version, "7.2.18");
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "running");
        let err = qmp.execute("nope", None).await.unwrap_err();
        assert!(err.to_string().contains("CommandNotFound"), "{err}");
        qmp.quit().await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let err = Qmp::connect(&path, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout(_)), "{err}");
    }
}
