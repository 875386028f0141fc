//! Framing: a 4-byte big-endian length, then a postcard-encoded [`Message`].

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

use crate::{MAX_FRAME_LEN, Message};

/// Errors of the wire protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// A frame announced a payload above the limit. Framing is lost; the connection must end.
    #[error("Frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame's payload is not a valid message. The connection may continue.
    #[error("Malformed frame: {0}")]
    Malformed(String),
    /// A message could not be encoded (it is larger than a frame may be).
    #[error("Cannot encode message: {0}")]
    Encode(String),
    /// The two sides speak different protocol versions.
    #[error(
        "Protocol version mismatch: the host speaks kiln-proto v{host}, the agent speaks \
         v{agent}; the guest image's agent and kiln must come from the same build (rebuild the \
         image with `kiln image build --agent ...`)"
    )]
    VersionMismatch {
        /// The host's version.
        host: u32,
        /// The agent's version.
        agent: u32,
    },
    /// The byte stream failed.
    #[error("Channel I/O failed")]
    Io(#[from] std::io::Error),
}

/// Decodes one frame payload.
pub fn decode_payload(payload: &[u8]) -> Result<Message, ProtoError> {
    match postcard::take_from_bytes::<Message>(payload) {
        Ok((message, [])) => Ok(message),
        Ok((_, rest)) => Err(ProtoError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        ))),
        Err(e) => Err(ProtoError::Malformed(e.to_string())),
    }
}

/// Encodes a message as a frame payload, refusing payloads above [`MAX_FRAME_LEN`].
pub fn encode_payload(message: &Message) -> Result<Vec<u8>, ProtoError> {
    let payload = postcard::to_allocvec(message).map_err(|e| ProtoError::Encode(e.to_string()))?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(ProtoError::Encode(format!(
            "the message takes {} bytes, more than the frame limit of {MAX_FRAME_LEN}",
            payload.len()
        )));
    }
    Ok(payload)
}

/// The protocol version in a `Hello` or `HelloAck` payload, read without decoding the rest, so
/// it works on payloads from any version. `None` for other messages and garbage.
pub fn peek_version(payload: &[u8]) -> Option<u32> {
    // Variant index (varint) then the first field, `version` (varint): stable in every version.
    match postcard::take_from_bytes::<(u32, u32)>(payload) {
        Ok(((0 | 1, version), _)) => Some(version),
        _ => None,
    }
}

/// A [`tokio_util::codec`] codec for frames.
///
/// Decoding yields `Ok(Some(Ok(message)))` for a good frame and `Ok(Some(Err(Malformed)))` for a
/// frame whose payload does not decode (the stream stays usable). An oversized length prefix is
/// a hard error ([`ProtoError::FrameTooLarge`]) detected from the 4-byte header alone, before
/// any buffer grows.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max: usize,
}

impl FrameCodec {
    /// A codec with the protocol's limit, [`MAX_FRAME_LEN`].
    pub fn new() -> FrameCodec {
        FrameCodec { max: MAX_FRAME_LEN }
    }

    /// A codec with a smaller limit (tests).
    pub fn with_max_frame_len(max: usize) -> FrameCodec {
        FrameCodec {
            max: max.min(MAX_FRAME_LEN),
        }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new()
    }
}

/// Splits the next whole frame's payload off the front of `src`.
///
/// `Ok(None)` means more bytes are needed; `src` then has room reserved for the rest of the frame
/// (never more than `max` + 4 bytes). A length prefix above `max` is an error, raised from the
/// 4-byte header alone.
pub fn split_frame(src: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, ProtoError> {
    let Some(header) = src.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > max {
        return Err(ProtoError::FrameTooLarge { len, max });
    }
    let total = 4 + len;
    if src.len() < total {
        src.reserve(total - src.len());
        return Ok(None);
    }
    src.advance(4);
    Ok(Some(src.split_to(len)))
}

impl Decoder for FrameCodec {
    type Item = Result<Message, ProtoError>;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, ProtoError> {
        Ok(split_frame(src, self.max)?.map(|payload| decode_payload(&payload)))
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, message: &Message, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let payload = encode_payload(message)?;
        if payload.len() > self.max {
            return Err(ProtoError::Encode(format!(
                "the message takes {} bytes, more than the frame limit of {}",
                payload.len(),
                self.max
            )));
        }
        dst.reserve(4 + payload.len());
        // The length fits: it is at most MAX_FRAME_LEN, far below u32::MAX.
        dst.put_u32(payload.len() as u32);
        dst.extend_from_slice(&payload);
        Ok(())
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> Result<(), ProtoError> {
        self.encode(&message, dst)
    }
}

/// Reads frames from an async byte stream.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader with the protocol's frame limit.
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(READ_BUF),
            max: MAX_FRAME_LEN,
        }
    }

    /// The next frame's payload, undecoded; `None` at a clean end of stream (between frames).
    pub async fn next_payload(&mut self) -> Result<Option<BytesMut>, ProtoError> {
        loop {
            if let Some(payload) = split_frame(&mut self.buf, self.max)? {
                return Ok(Some(payload));
            }
            if self.buf.capacity() - self.buf.len() < READ_BUF / 2 {
                self.buf.reserve(READ_BUF);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(ProtoError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("The stream ended inside a frame ({} bytes)", self.buf.len()),
                )));
            }
        }
    }

    /// The next message: `Ok(Some(Err(Malformed)))` for a frame that does not decode (the
    /// stream stays usable), `Err` when the stream is unusable.
    pub async fn next(&mut self) -> Result<Option<Result<Message, ProtoError>>, ProtoError> {
        Ok(self
            .next_payload()
            .await?
            .map(|payload| decode_payload(&payload)))
    }
}

/// Writes frames to an async byte stream, buffering until [`FrameWriter::flush`].
pub struct FrameWriter<W> {
    inner: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer over `inner`.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            buf: BytesMut::new(),
        }
    }

    /// Encodes a message into the buffer, writing the buffer out once it is large.
    pub async fn feed(&mut self, message: &Message) -> Result<(), ProtoError> {
        FrameCodec::new().encode(message, &mut self.buf)?;
        if self.buf.len() >= READ_BUF * 8 {
            self.write_out().await?;
        }
        Ok(())
    }

    /// Writes out everything buffered and flushes the stream.
    pub async fn flush(&mut self) -> Result<(), ProtoError> {
        self.write_out().await?;
        self.inner.flush().await?;
        Ok(())
    }

    /// Encodes, writes and flushes one message.
    pub async fn send(&mut self, message: &Message) -> Result<(), ProtoError> {
        self.feed(message).await?;
        self.flush().await
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    async fn write_out(&mut self) -> Result<(), ProtoError> {
        let data = self.buf.split();
        self.inner.write_all(&data).await?;
        Ok(())
    }
}

const READ_BUF: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::{
        Clock, ExecCommand, ExecSpec, ExecUser, ExitStatus, PROTOCOL_VERSION, PtyEvent, Signal,
        WindowSize,
    };

    fn frame(message: &Message) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::new()
            .encode(message, &mut buf)
            .expect("encodes");
        buf
    }

    #[test]
    fn round_trips_every_kind_of_message() {
        let messages = vec![
            Message::Hello {
                version: PROTOCOL_VERSION,
                clock: Some(Clock::now()),
                hostname: Some("box".into()),
            },
            Message::Exec(ExecSpec {
                id: 7,
                command: ExecCommand::Script {
                    shell: vec!["bash".into(), "{0}".into()],
                    script: "echo hi".into(),
                    extension: ".sh".into(),
                },
                env: vec![("A".into(), "b".into())],
                cwd: Some("/w".into()),
                timeout_ms: Some(1000),
                user: ExecUser::Root,
                pty: Some(WindowSize { rows: 24, cols: 80 }),
            }),
            Message::Pty {
                id: 7,
                event: PtyEvent::Input(Bytes::from_static(b"\x03")),
            },
            Message::Pty {
                id: 7,
                event: PtyEvent::Resize(WindowSize {
                    rows: 50,
                    cols: 132,
                }),
            },
            Message::Pty {
                id: 7,
                event: PtyEvent::Signal(Signal::Int),
            },
            Message::Stdout {
                id: 7,
                data: Bytes::from_static(b"\0\xffbytes"),
            },
            Message::Exit {
                id: 7,
                status: ExitStatus::Signaled(9),
            },
            Message::Error {
                id: None,
                message: "x".into(),
            },
        ];
        let mut buf = BytesMut::new();
        for m in &messages {
            FrameCodec::new().encode(m, &mut buf).expect("encodes");
        }
        let mut codec = FrameCodec::new();
        for m in &messages {
            let got = codec
                .decode(&mut buf)
                .expect("no hard error")
                .expect("a frame");
            assert_eq!(&got.expect("decodes"), m);
        }
        assert!(codec.decode(&mut buf).expect("no error").is_none());
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let whole = frame(&Message::Ping { id: 3 });
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        for (i, byte) in whole.iter().enumerate() {
            buf.put_u8(*byte);
            let got = codec.decode(&mut buf).expect("no error");
            assert_eq!(got.is_some(), i == whole.len() - 1);
        }
    }

    #[test]
    fn oversized_length_is_rejected_before_allocation() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2][..]);
        let err = FrameCodec::new().decode(&mut buf).expect_err("too large");
        assert!(matches!(err, ProtoError::FrameTooLarge { len, .. } if len == u32::MAX as usize));
        assert!(
            buf.capacity() < 1024,
            "no buffer growth for a refused frame"
        );
    }

    #[test]
    fn garbage_payload_is_a_soft_error_and_the_stream_continues() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        buf.extend_from_slice(&frame(&Message::Ping { id: 1 }));
        let mut codec = FrameCodec::new();
        let first = codec
            .decode(&mut buf)
            .expect("no hard error")
            .expect("frame");
        assert!(matches!(first, Err(ProtoError::Malformed(_))));
        let second = codec
            .decode(&mut buf)
            .expect("no hard error")
            .expect("frame");
        assert_eq!(second.expect("decodes"), Message::Ping { id: 1 });
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut payload = encode_payload(&Message::Ping { id: 1 }).expect("encodes");
        payload.push(0);
        assert!(matches!(
            decode_payload(&payload),
            Err(ProtoError::Malformed(_))
        ));
    }

    #[test]
    fn peek_version_reads_hello_and_ack_only() {
        let hello = encode_payload(&Message::Hello {
            version: 77,
            clock: None,
            hostname: None,
        })
        .expect("encodes");
        assert_eq!(peek_version(&hello), Some(77));
        let ping = encode_payload(&Message::Ping { id: 1 }).expect("encodes");
        assert_eq!(peek_version(&ping), None);
        assert_eq!(peek_version(&[]), None);
        // A future Hello with more fields still yields its version.
        let mut future = hello.clone();
        future.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(peek_version(&future), Some(77));
    }

    #[test]
    fn encoder_refuses_messages_above_the_limit() {
        let message = Message::Stdout {
            id: 1,
            data: Bytes::from(vec![0u8; 200]),
        };
        let mut buf = BytesMut::new();
        let err = FrameCodec::with_max_frame_len(100)
            .encode(&message, &mut buf)
            .expect_err("too large");
        assert!(matches!(err, ProtoError::Encode(_)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random bytes never panic the decoder, and it never buffers beyond one frame.
        #[test]
        fn decoder_survives_random_bytes(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            max in 1usize..4096,
        ) {
            let mut codec = FrameCodec::with_max_frame_len(max);
            let mut buf = BytesMut::new();
            let mut fed = 0usize;
            'feed: for chunk in chunks {
                fed += chunk.len();
                buf.extend_from_slice(&chunk);
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(ProtoError::FrameTooLarge { len, max: limit }) => {
                            prop_assert!(len > limit);
                            break 'feed;
                        }
                        Err(other) => prop_assert!(false, "unexpected hard error {other}"),
                    }
                }
                // Growth is bounded by the frame limit and the bytes fed, never by a length
                // prefix (which may announce up to 4 GiB).
                prop_assert!(buf.capacity() <= 2 * (4 + max + fed) + 64);
            }
        }

        /// Random payloads decode to a message or a Malformed error, never a panic.
        #[test]
        fn payload_decoder_survives_random_bytes(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            match decode_payload(&payload) {
                Ok(message) => {
                    // Whatever decoded must re-encode.
                    prop_assert!(encode_payload(&message).is_ok());
                }
                Err(ProtoError::Malformed(_)) => {}
                Err(other) => prop_assert!(false, "unexpected error {other}"),
            }
            let _ = peek_version(&payload);
        }

        /// Every terminal message round-trips, whatever its contents.
        #[test]
        fn pty_messages_round_trip(
            id in any::<u64>(),
            kind in 0u8..3,
            data in proptest::collection::vec(any::<u8>(), 0..2048),
            rows in any::<u16>(),
            cols in any::<u16>(),
            signal in 0usize..7,
        ) {
            let signals = [Signal::Term, Signal::Kill, Signal::Int, Signal::Hup, Signal::Quit, Signal::Usr1, Signal::Usr2];
            let event = match kind {
                0 => PtyEvent::Input(Bytes::from(data)),
                1 => PtyEvent::Resize(WindowSize { rows, cols }),
                _ => PtyEvent::Signal(signals[signal]),
            };
            let message = Message::Pty { id, event };
            let mut buf = frame(&message);
            let got = FrameCodec::new().decode(&mut buf).expect("no hard error").expect("a frame");
            prop_assert_eq!(got.expect("decodes"), message);
            prop_assert!(buf.is_empty());
        }

        /// A terminal exec request and a Pty frame, truncated or with one byte changed, decode
        /// to something or to Malformed; never a panic.
        #[test]
        fn decoder_survives_mutated_pty_frames(
            index in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
            rows in any::<u16>(),
        ) {
            let mut buf = frame(&Message::Exec(ExecSpec {
                id: 3,
                command: ExecCommand::Argv(vec!["bash".into()]),
                env: vec![("TERM".into(), "xterm".into())],
                cwd: Some("/w".into()),
                timeout_ms: None,
                user: ExecUser::Runner,
                pty: Some(WindowSize { rows, cols: 80 }),
            }));
            buf.extend_from_slice(&frame(&Message::Pty {
                id: 3,
                event: PtyEvent::Input(Bytes::from_static(b"echo hi\r")),
            }));
            let i = index.index(buf.len());
            buf[i] = byte;
            buf.truncate(cut.index(buf.len() + 1));
            let mut codec = FrameCodec::new();
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }

        /// Mutating one byte of a valid frame never panics.
        #[test]
        fn decoder_survives_mutated_frames(index in any::<prop::sample::Index>(), byte in any::<u8>(), id in any::<u64>()) {
            let mut buf = frame(&Message::Exec(ExecSpec {
                id,
                command: ExecCommand::Argv(vec!["echo".into(), "hello".into()]),
                env: vec![("K".into(), "V".into())],
                cwd: None,
                timeout_ms: Some(5),
                user: ExecUser::Runner,
                pty: None,
            }));
            let i = index.index(buf.len());
            buf[i] = byte;
            let mut codec = FrameCodec::new();
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
