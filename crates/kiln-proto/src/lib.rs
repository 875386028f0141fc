//! The wire protocol between kiln (the host) and `kiln-agent` (inside the guest).
//!
//! # Transport
//! One reliable byte stream: a virtio-serial port (`kiln.agent`), a vsock connection, or a pair
//! of pipes (`kiln-agent --stdio`). The stream carries **frames**: a 4-byte big-endian payload
//! length followed by that many bytes of payload. A payload longer than [`MAX_FRAME_LEN`] is a
//! protocol violation: the decoder refuses it before allocating anything (see [`FrameCodec`]),
//! and because framing is then lost, the connection ends.
//!
//! # Encoding
//! Each payload is one [`Message`] encoded with [postcard]: a compact, non-self-describing serde
//! format with varint integers and length-prefixed byte strings. It was chosen over JSON because
//! most traffic is raw bytes (command output, file chunks): JSON would encode every byte as a
//! decimal number or need base64, while postcard carries them with a one-to-three-byte length.
//! Decoding is bounded: every length is checked against the bytes left in the frame, so a
//! hostile frame cannot make the decoder allocate more than the frame itself. A payload that
//! does not decode is answered with [`Message::Error`]; the frame boundary is intact, so the
//! connection survives.
//!
//! # Versioning
//! [`Message::Hello`], [`Message::HelloAck`] and [`Message::Error`] are variants 0, 1 and 2
//! forever, and `version` is the first field of both hello messages. Whatever else changes, a
//! peer can therefore read the other side's version ([`peek_version`]) and send an error it can
//! read. The versions must be equal; otherwise the hello is rejected with an error naming both.
//!
//! # Conversation
//! ```text
//! host                                   agent
//! Hello{version, clock, hostname}  ->
//!                                  <-    HelloAck{version, agent, kernel, pid1, user}
//!                                        (or Error naming both versions, then EOF)
//! Exec{id, user, pty, ..}          ->
//!                                  <-    Started{id, pid}
//!                                  <-    Stdout{id, ..} / Stderr{id, ..} ... (as produced)
//! Pty{id, Input|Resize|Signal}     ->    (terminal execs only; not answered)
//!                                  <-    Exit{id, status}     (after all output of id)
//! Kill{id, target, signal}         ->
//!                                  <-    Done{id}
//! Put{id, path, kind}              ->
//! Chunk{id, ..} ... End{id}        ->
//!                                  <-    Done{id}             (or Error{id})
//! Get{id, path}                    ->
//!                                  <-    Meta{id, kind}, Chunk{id, ..} ..., End{id} (or Error{id})
//! Ping{id}                         ->
//!                                  <-    Pong{id}
//! Shutdown{id}                     ->
//!                                  <-    Done{id}, then the guest powers off
//! ```
//! # Users and terminals
//! An exec runs as the agent's default user, the guest's `runner` (passwordless sudo, as on
//! GitHub's hosted runners), or as root when [`ExecSpec::user`] asks for it; the hello reply
//! names the default user, and says why when it had to fall back (no `runner` in the guest:
//! root; `--stdio`: the agent's own user). An exec with [`ExecSpec::pty`] set gets a fresh
//! pseudo-terminal instead of pipes; it is the foundation of `kiln debug`.
//!
//! Every request carries an `id` chosen by the host, unique for the connection; the agent tags
//! every reply with it, so several execs and transfers can be in flight at once. File contents
//! travel as [`Message::Chunk`]s of at most [`CHUNK_LEN`] bytes: a plain file as its bytes, a
//! directory as a tar stream (see [`transfer`]).
//!
//! # Fuzzing
//! The decoder is property-tested in `cargo test` (random bytes, random payloads, mutated frames)
//! and has a libFuzzer target that feeds arbitrary bytes in arbitrary slices:
//! `cd crates/kiln-proto/fuzz && cargo fuzz run -s none frame_decoder -- -max_total_time=60`
//! (`-s none` works on stable; the crate is safe Rust, so the finds would be panics, hangs and
//! unbounded buffers, which the target asserts against).

#![warn(missing_docs)]

mod codec;
mod message;
pub mod transfer;

pub use codec::{
    FrameCodec, FrameReader, FrameWriter, ProtoError, decode_payload, encode_payload, peek_version,
    split_frame,
};
pub use message::{
    Clock, ExecCommand, ExecSpec, ExecUser, ExitStatus, GetKind, HelloAckInfo, KillTarget, Message,
    PtyEvent, PutKind, RequestId, Signal, UserInfo, WindowSize,
};

/// The protocol version this build speaks. Bump it on any change to [`Message`].
///
/// History: 1, the first; 2, execs run as a user ([`ExecSpec::user`], [`HelloAckInfo::user`])
/// and on a pseudo-terminal ([`ExecSpec::pty`], [`Message::Pty`]).
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest payload a frame may carry (4 MiB). Covers any exec request the kernel could run
/// (argv + environment are capped at a few MiB by Linux) with room for a large script.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// Size of the data chunks that output and file transfers are cut into (64 KiB).
pub const CHUNK_LEN: usize = 64 * 1024;

/// The name of the virtio-serial port the agent serves the protocol on.
pub const VIRTIO_PORT_NAME: &str = "kiln.agent";

/// The vsock port the agent listens on when the host asks for `kiln.channel=vsock`
/// (Firecracker, which has no virtio-serial).
pub const AGENT_VSOCK_PORT: u32 = 1024;
