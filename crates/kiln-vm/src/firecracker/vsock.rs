//! The host end of the guest channel: Firecracker's vsock device proxied to a Unix socket.
//!
//! Firecracker listens on the device's `uds_path`. A host-initiated connection is a plain Unix
//! connection to it that first sends `CONNECT <port>\n`; Firecracker opens a vsock stream to
//! that port in the guest and answers `OK <host port>\n`, after which the connection carries the
//! guest stream's bytes. If nothing listens on the guest port (the agent is not up yet), or the
//! guest does not answer, Firecracker closes the connection without an `OK`. So the host needs
//! no `AF_VSOCK` at all.

use std::io;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long to wait for Firecracker's `OK` line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest acceptable answer line (`OK 4294967295\n` is 14 bytes).
const MAX_LINE: usize = 64;

/// Connects to guest vsock `port` through Firecracker's socket at `uds`.
///
/// Fails with [`io::ErrorKind::ConnectionRefused`] when Firecracker closes the connection
/// without an `OK` (no listener on the guest port yet), so a caller can retry until its
/// deadline.
pub async fn connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let line = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_line(&mut stream))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer to CONNECT {port} within {HANDSHAKE_TIMEOUT:?}"),
            )
        })??;
    parse_ok(&line, port)?;
    Ok(stream)
}

/// Reads up to and including `\n`, one byte at a time so nothing after the line is consumed.
async fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        let read = match stream.read(&mut byte).await {
            // Closing with our CONNECT line unread resets the connection.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
            other => other?,
        };
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "Firecracker closed the vsock connection (nothing listens on the guest port yet)",
            ));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
        if line.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "Firecracker's vsock answer line is too long",
            ));
        }
    }
}

/// Checks the answer to `CONNECT port`: `OK <host port>`.
fn parse_ok(line: &str, port: u32) -> io::Result<u32> {
    line.strip_prefix("OK ")
        .and_then(|n| n.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer to CONNECT {port}: {line:?}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use tokio::net::UnixListener;

    use super::*;

    #[test]
    fn ok_lines_are_parsed_and_others_rejected() {
        assert_eq!(parse_ok("OK 1073741824", 1024).unwrap(), 1073741824);
        for bad in ["", "OK", "OK x", "ERR 1024", "ok 5"] {
            let err = parse_ok(bad, 1024).unwrap_err();
            assert!(err.to_string().contains("CONNECT 1024"), "{err}");
        }
    }

    /// A peer speaking the proxy's side of the handshake, to check what crosses the socket.
    #[tokio::test]
    async fn the_handshake_leaves_the_stream_at_the_guest_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            // The OK line and the first guest bytes in one write.
            s.write_all(b"OK 1073741824\nhello").await.unwrap();
            // The second connection: refused, as Firecracker does without a guest listener.
            let (s, _) = listener.accept().await.unwrap();
            drop(s);
        });
        let mut stream = connect(&path, 1024).await.unwrap();
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        let err = connect(&path, 1024).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        peer.await.unwrap();
    }
}
