//! The CLI's side of the socket: a small blocking HTTP/1.1 client over `$COVE_DIR/unix.socket`
//! that reads LXD's envelopes (sync, async, error), waits on operations through
//! `/1.0/operations/<id>/wait`, and opens the websockets an exec hands out.
//!
//! One connection per request (`Connection: close`): the CLI makes a handful of requests, and
//! a fresh connection keeps the reading simple.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::CliError;
use crate::api::types::{Operation, Response, StatusCode};

/// An HTTP answer as read off the socket.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// What a request carries: nothing, bytes, or a file streamed with a progress callback.
pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// Parts written one after the other; `length` is their total size.
    Stream {
        parts: Vec<Box<dyn Read + 'a>>,
        length: u64,
        progress: &'a mut dyn FnMut(u64),
    },
}

/// A connection point: coved's state directory and its socket.
pub struct Client {
    pub directory: PathBuf,
}

/// `text` with Rust's ` (os error N)` suffix removed: the user wants the words.
pub fn plain_error(error: &io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error") {
        Some(index) => text[..index].to_string(),
        None => text,
    }
}

/// Percent-encodes one path segment or query value (names come from the command line).
pub fn encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Like [`encode`] but keeps `/`: a file path inside an instance.
pub fn encode_path(text: &str) -> String {
    text.split('/').map(encode).collect::<Vec<_>>().join("/")
}

impl Client {
    pub fn new(directory: PathBuf) -> Self {
        Self { directory }
    }

    pub fn socket(&self) -> PathBuf {
        self.directory.join("unix.socket")
    }

    /// Connects to the socket; the error says how to start coved.
    pub fn connect(&self) -> Result<UnixStream, CliError> {
        let socket = self.socket();
        UnixStream::connect(&socket).map_err(|error| unreachable(&self.directory, &socket, &error))
    }

    /// Sends one request and reads the whole answer.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
    ) -> Result<HttpResponse, CliError> {
        let mut stream = self.connect()?;
        let lost = |error: io::Error| CliError::Connection(plain_error(&error));
        let length = match &body {
            Body::Empty => 0,
            Body::Bytes(bytes) => bytes.len() as u64,
            Body::Stream { length, .. } => *length,
        };
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: cove\r\nConnection: close\r\nUser-Agent: cove\r\n\
             Content-Length: {length}\r\n"
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).map_err(lost)?;
        // A server that refuses an upload answers and closes before reading all of it: its
        // answer says why, so a failed write is not the error to report.
        let written = match body {
            Body::Empty => Ok(()),
            Body::Bytes(bytes) => stream.write_all(bytes),
            Body::Stream {
                parts, progress, ..
            } => copy_parts(parts, &mut stream, progress),
        };
        let response = read_response(stream).map_err(lost);
        match (response, written) {
            (Ok(response), _) => Ok(response),
            (Err(_), Err(error)) if error.kind() != io::ErrorKind::BrokenPipe => Err(
                CliError::Connection(format!("cannot send the request: {}", plain_error(&error))),
            ),
            (Err(error), _) => Err(error),
        }
    }

    /// A request whose answer is an envelope; error envelopes become [`CliError::Api`].
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response, CliError> {
        let bytes = body.map(Value::to_string).unwrap_or_default();
        let headers: &[(&str, &str)] = if body.is_some() {
            &[("Content-Type", "application/json")]
        } else {
            &[]
        };
        let response = self.http(method, path, headers, Body::Bytes(bytes.as_bytes()))?;
        envelope(&response)
    }

    /// GET that must answer sync; its metadata as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let response = self.request("GET", path, None)?;
        serde_json::from_value(response.metadata).map_err(|error| {
            CliError::Protocol(format!("unexpected answer to GET {path}: {error}"))
        })
    }

    /// Sends a request and, when it answers with an operation, waits for it to end; returns
    /// the final operation (or `None` for a sync answer).
    pub fn run(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Operation>, CliError> {
        let response = self.request(method, path, body)?;
        self.finish(&response)
    }

    /// Waits for the operation an async answer names; sync answers pass through.
    pub fn finish(&self, response: &Response) -> Result<Option<Operation>, CliError> {
        if response.kind != "async" {
            return Ok(None);
        }
        let operation = self.wait(&response.operation)?;
        Ok(Some(operation))
    }

    /// Waits on `/1.0/operations/<id>/wait` until the operation ends; a failed or cancelled
    /// operation is an error carrying its message.
    pub fn wait(&self, operation_url: &str) -> Result<Operation, CliError> {
        let operation: Operation = self.get(&format!("{operation_url}/wait?timeout=-1"))?;
        match StatusCode::from_code(operation.status_code) {
            Some(StatusCode::Success) => Ok(operation),
            Some(StatusCode::Cancelled) => Err(CliError::Api {
                code: 400,
                message: "the operation was cancelled".into(),
            }),
            _ => Err(CliError::Api {
                code: 400,
                message: if operation.err.is_empty() {
                    format!("the operation ended with status {}", operation.status)
                } else {
                    operation.err.clone()
                },
            }),
        }
    }

    /// Opens the websocket of an operation `secret` admits.
    pub fn websocket(
        &self,
        operation_url: &str,
        secret: &str,
    ) -> Result<tungstenite::WebSocket<UnixStream>, CliError> {
        let stream = self.connect()?;
        let url = format!(
            "ws://cove{operation_url}/websocket?secret={}",
            encode(secret)
        );
        tungstenite::client::client(url.as_str(), stream)
            .map(|(socket, _)| socket)
            .map_err(|error| CliError::Protocol(format!("cannot open a websocket: {error}")))
    }
}

fn unreachable(directory: &Path, socket: &Path, error: &io::Error) -> CliError {
    let advice = match error.kind() {
        io::ErrorKind::PermissionDenied => {
            "run cove as root or as a member of the socket's group (coved --group)".to_string()
        }
        _ => format!("start it with coved --dir {}", directory.display()),
    };
    CliError::Unreachable(format!(
        "cannot reach coved at {}: {}; {advice}",
        socket.display(),
        plain_error(error)
    ))
}

fn copy_parts(
    parts: Vec<Box<dyn Read + '_>>,
    stream: &mut UnixStream,
    progress: &mut dyn FnMut(u64),
) -> io::Result<()> {
    let mut buffer = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    for mut part in parts {
        loop {
            let read = match part.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            stream.write_all(&buffer[..read])?;
            sent += read as u64;
            progress(sent);
        }
    }
    Ok(())
}

fn read_response(stream: UnixStream) -> io::Result<HttpResponse> {
    let malformed = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    if reader.read_line(&mut status_line)? == 0 {
        return Err(malformed(
            "coved closed the connection without answering".into(),
        ));
    }
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| malformed(format!("malformed status line {status_line:?}")))?;
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|value| value.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line)?;
            let size_text = size_line.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| malformed(format!("malformed chunk size {size_line:?}")))?;
            if size == 0 {
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            let mut end = [0u8; 2];
            reader.read_exact(&mut end)?;
        }
    } else if let Some(length) = headers
        .get("content-length")
        .and_then(|value| value.parse::<u64>().ok())
    {
        reader.take(length).read_to_end(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Reads an envelope; an error envelope (or a non-JSON error) becomes [`CliError::Api`].
pub fn envelope(response: &HttpResponse) -> Result<Response, CliError> {
    match serde_json::from_slice::<Response>(&response.body) {
        Ok(envelope) if envelope.kind == "error" => Err(CliError::Api {
            code: envelope.error_code,
            message: envelope.error,
        }),
        Ok(envelope) => Ok(envelope),
        Err(_) if response.status >= 400 => Err(CliError::Api {
            code: response.status,
            message: String::from_utf8_lossy(&response.body).trim().to_string(),
        }),
        Err(error) => Err(CliError::Protocol(format!(
            "coved's answer is not an LXD envelope: {error}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_names_and_paths() {
        assert_eq!(encode("web"), "web");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
        assert_eq!(encode_path("/etc/host name"), "/etc/host%20name");
    }

    #[test]
    fn error_envelopes_become_api_errors() {
        let response = HttpResponse {
            status: 404,
            headers: BTreeMap::new(),
            body: br#"{"type":"error","error_code":404,"error":"instance \"x\" not found"}"#
                .to_vec(),
        };
        match envelope(&response) {
            Err(CliError::Api { code, message }) => {
                assert_eq!(code, 404);
                assert_eq!(message, "instance \"x\" not found");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn os_error_suffix_is_dropped() {
        let error = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(plain_error(&error), "No such file or directory");
    }

    #[test]
    fn unreachable_daemon_says_how_to_start_it() {
        let error = unreachable(
            Path::new("/var/lib/cove"),
            Path::new("/var/lib/cove/unix.socket"),
            &io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(
            error.to_string(),
            "cannot reach coved at /var/lib/cove/unix.socket: No such file or directory; \
             start it with coved --dir /var/lib/cove"
        );
    }
}
