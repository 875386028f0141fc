//! Host side of the guest agent protocol (see `kiln-proto`): a client that speaks to the agent
//! over any byte stream (virtio-serial, vsock, or a pipe in tests).
