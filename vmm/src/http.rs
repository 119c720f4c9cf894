//! Just enough HTTP/1.1 for the VMM's API: parse one request from the bytes received so far,
//! and write one response. No async runtime: the event loop feeds bytes in as they arrive.
//!
//! Limits keep a client from making the VMM hold much memory: 16 KiB of request line and
//! headers, 64 KiB of body.

use std::fmt::Write as _;

pub const MAX_HEAD_BYTES: usize = 16 * 1024;
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("request line and headers exceed {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("request body exceeds {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("unsupported HTTP version {0}: use HTTP/1.0 or HTTP/1.1")]
    Version(String),
    #[error("chunked request bodies are not supported: send Content-Length")]
    Chunked,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            Self::HeadTooLarge => 431,
            Self::BodyTooLarge => 413,
            Self::Version(_) => 505,
            Self::Chunked => 411,
            Self::Malformed(_) => 400,
        }
    }
}

/// One parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// Parses a request from the start of `buffer`; `Ok(None)` means more bytes are needed.
pub fn parse_request(buffer: &[u8]) -> Result<Option<Request>, HttpError> {
    let Some(head_end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") else {
        return if buffer.len() > MAX_HEAD_BYTES {
            Err(HttpError::HeadTooLarge)
        } else {
            Ok(None)
        };
    };
    if head_end > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let head = std::str::from_utf8(&buffer[..head_end])
        .map_err(|_| HttpError::Malformed("the request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(
            "the request line is not METHOD PATH VERSION",
        ));
    };
    if method.is_empty() || !method.bytes().all(|byte| byte.is_ascii_uppercase()) {
        return Err(HttpError::Malformed("the method is not an HTTP method"));
    }
    if !target.starts_with('/') {
        return Err(HttpError::Malformed("the path does not start with /"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Version(version.chars().take(16).collect()));
    }
    let mut content_length = 0usize;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("a header line has no colon"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| HttpError::Malformed("Content-Length is not a number"))?;
            if content_length > MAX_BODY_BYTES {
                return Err(HttpError::BodyTooLarge);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(HttpError::Chunked);
        }
    }
    let body_start = head_end + 4;
    let Some(body) = buffer.get(body_start..body_start + content_length) else {
        return Ok(None);
    };
    let path = target.split('?').next().unwrap_or(target);
    Ok(Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        body: body.to_vec(),
    }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// A response: a status and an optional JSON body.
#[derive(Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Option<serde_json::Value>,
}

impl Response {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self {
            status,
            body: Some(body),
        }
    }

    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// An error response whose body is `{"error": message}`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Self::json(status, serde_json::json!({ "error": message.to_string() }))
    }

    /// The bytes on the wire; every response closes its connection.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = self
            .body
            .as_ref()
            .map(|body| body.to_string())
            .unwrap_or_default();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status)
        );
        if self.body.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        let _ = write!(head, "Content-Length: {}\r\n\r\n", body.len());
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_requests_parse_and_partial_ones_wait() {
        let request =
            b"PUT /api/v1/vm.pause?now=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        for cut in 0..request.len() {
            assert_eq!(parse_request(&request[..cut]), Ok(None), "cut at {cut}");
        }
        let parsed = parse_request(request).unwrap().unwrap();
        assert_eq!(parsed.method, "PUT");
        assert_eq!(parsed.path, "/api/v1/vm.pause");
        assert_eq!(parsed.body, b"{}");
    }

    #[test]
    fn malformed_requests_get_the_right_status() {
        let status = |bytes: &[u8]| parse_request(bytes).unwrap_err().status();
        assert_eq!(status(b"GET\r\n\r\n"), 400);
        assert_eq!(status(b"get / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET nopath HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/2\r\n\r\n"), 505);
        assert_eq!(status(b"GET / HTTP/1.1\r\nbroken header\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(status(b"GET / HTTP/1.1\r\n\xff: y\r\n\r\n"), 400);
        assert_eq!(status(&vec![b'a'; MAX_HEAD_BYTES + 1]), 431);
    }

    #[test]
    fn responses_carry_length_and_json() {
        let bytes = Response::error(409, "the VM is already paused").to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"error\":\"the VM is already paused\"}"));
        assert!(text.contains("Content-Length: 36\r\n"));
        let empty = String::from_utf8(Response::no_content().to_bytes()).unwrap();
        assert!(empty.contains("Content-Length: 0\r\n"));
    }
}
