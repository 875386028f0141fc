//! HTTP/1.1 over Firecracker's API Unix socket: one connection per call (Firecracker's API
//! server handles one request at a time, and a VM makes a handful of calls in its life), through
//! hyper's low-level connection API. See [`super::api`] for the calls themselves.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::api::{self, FirecrackerApiError, Request};

/// How long one call may take. Snapshot creation writes the whole guest memory, so it is long.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Refused connections retried 10 ms apart (a socket that is bound but not listening yet).
const CONNECT_RETRIES: u32 = 200;

/// A client of one Firecracker process's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// A client of the API socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> ApiClient {
        ApiClient {
            socket: socket.into(),
        }
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request`; a non-2xx answer is [`FirecrackerApiError::Fault`].
    pub async fn call(&self, request: &Request) -> Result<(), FirecrackerApiError> {
        let (status, body) = self.send(request).await?;
        api::check_status(request, status, &body)
    }

    /// Sends `request` and parses the JSON answer as `T`.
    pub async fn get<T: serde::de::DeserializeOwned>(
        &self,
        request: &Request,
    ) -> Result<T, FirecrackerApiError> {
        let (status, body) = self.send(request).await?;
        api::check_status(request, status, &body)?;
        api::parse_body(request, &body)
    }

    async fn send(&self, request: &Request) -> Result<(u16, Bytes), FirecrackerApiError> {
        let call = request.name();
        match tokio::time::timeout(CALL_TIMEOUT, self.exchange(request)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(source)) => Err(FirecrackerApiError::Transport {
                call,
                socket: self.socket.display().to_string(),
                source,
            }),
            Err(_) => Err(FirecrackerApiError::Timeout {
                call,
                seconds: CALL_TIMEOUT.as_secs(),
            }),
        }
    }

    /// Connects, retrying briefly while the socket is refused: Firecracker creates the socket
    /// file (bind) a moment before it listens.
    async fn connect(&self) -> std::io::Result<UnixStream> {
        let mut attempts = 0;
        loop {
            match UnixStream::connect(&self.socket).await {
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && attempts < CONNECT_RETRIES =>
                {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => return other,
            }
        }
    }

    async fn exchange(&self, request: &Request) -> std::io::Result<(u16, Bytes)> {
        let stream = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        let driver = tokio::spawn(connection);
        let body = match &request.body {
            Some(json) => Bytes::from(
                serde_json::to_vec(json).expect("a serde_json::Value always serializes"),
            ),
            None => Bytes::new(),
        };
        let mut builder = hyper::Request::builder()
            .method(request.method.as_str())
            .uri(&request.path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if request.body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let http_request = builder
            .body(Full::new(body))
            .map_err(std::io::Error::other)?;
        let result = async {
            let response = sender
                .send_request(http_request)
                .await
                .map_err(std::io::Error::other)?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(std::io::Error::other)?
                .to_bytes();
            Ok((status, body))
        }
        .await;
        driver.abort();
        result
    }
}

#[cfg(test)]
mod tests {
    //! The client against a socket that answers as Firecracker's API server does (its status
    //! lines and headers), to check the HTTP framing and the error mapping end to end. The real
    //! Firecracker is exercised by the integration tests when `KILN_FIRECRACKER_BIN` is set.

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;
    use crate::firecracker::api::{ActionType, FirecrackerVersion};

    /// Serves one connection: returns the raw request and sends `answer`.
    async fn serve_once(listener: &UnixListener, answer: &'static str) -> String {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request);
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                if request.len() >= end + 4 + length {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        stream.write_all(answer.as_bytes()).await.unwrap();
        String::from_utf8(request).unwrap()
    }

    #[tokio::test]
    async fn requests_are_framed_and_answers_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let client = ApiClient::new(&path);

        let server = tokio::spawn(async move {
            let first = serve_once(
                &listener,
                "HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n",
            )
            .await;
            let body = r#"{"fault_message":"The requested operation is not supported after starting the microVM."}"#;
            let answer: &'static str = Box::leak(
                format!(
                    "HTTP/1.1 400 \r\nServer: Firecracker API\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_boxed_str(),
            );
            let second = serve_once(&listener, answer).await;
            let version = r#"{"firecracker_version":"1.16.1"}"#;
            let answer: &'static str = Box::leak(
                format!(
                    "HTTP/1.1 200 \r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{version}",
                    version.len()
                )
                .into_boxed_str(),
            );
            let third = serve_once(&listener, answer).await;
            (first, second, third)
        });

        client
            .call(&Request::action(ActionType::InstanceStart))
            .await
            .unwrap();
        let err = client
            .call(&Request::action(ActionType::InstanceStart))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Firecracker refused PUT /actions (HTTP 400): The requested operation is not \
             supported after starting the microVM."
        );
        let version: FirecrackerVersion = client.get(&Request::version()).await.unwrap();
        assert_eq!(version.firecracker_version, "1.16.1");

        let (first, _, third) = server.await.unwrap();
        assert!(first.starts_with("PUT /actions HTTP/1.1\r\n"), "{first}");
        assert!(first.contains("content-type: application/json"), "{first}");
        assert!(
            first.ends_with("\r\n\r\n{\"action_type\":\"InstanceStart\"}"),
            "{first}"
        );
        assert!(third.starts_with("GET /version HTTP/1.1\r\n"), "{third}");
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_transport_error_naming_the_call_and_socket() {
        let client = ApiClient::new("/nonexistent/api.sock");
        let err = client.call(&Request::version()).await.unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("GET /version: "), "{text}");
        assert!(text.contains("/nonexistent/api.sock"), "{text}");
    }
}
