//! `/1.0/instances/<name>/files` for virtual machines: the same requests and `X-LXD-*` headers
//! as for containers, carried out by the guest's cove-agent (push, pull; a delete is an exec
//! of `rm` or `rmdir` in the guest), since a VM's files are inside its disk, not on the host.
//! A push streams the upload to the agent as it arrives; a pull is held in memory (up to the
//! upload limit, since the guest decides its size) before it is answered.

use std::io::{Read, Write};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use cove_agent::client::{Attributes, Client, ClientError};
use cove_agent::protocol::{ErrorCode, ExecRequest, FileInfo, FileKind};
use futures_util::StreamExt;

use super::{ok, sync, ApiError, ApiResult, Query};
use crate::daemon::{blocking, Daemon};

fn agent_error(path: &str, error: ClientError) -> ApiError {
    let status = match error.agent_code() {
        Some(ErrorCode::NotFound) => 404,
        Some(ErrorCode::WrongKind | ErrorCode::BadRequest) => 400,
        Some(ErrorCode::PermissionDenied) => 403,
        _ => 500,
    };
    ApiError::new(status, format!("{path}: {error}"))
}

/// The checked path in the guest: absolute, no `..`, no NUL.
fn guest_path(query: &Query) -> Result<String, ApiError> {
    let given = query.get("path").unwrap_or_default();
    if given.is_empty() {
        return Err(ApiError::bad_request(
            "the request names no file: give ?path=/absolute/path/in/the/instance",
        ));
    }
    let text = if given.starts_with('/') {
        given.to_string()
    } else {
        format!("/{given}")
    };
    if text.split('/').any(|part| part == "..") {
        return Err(ApiError::bad_request(format!(
            "invalid path \"{text}\": \"..\" is not allowed"
        )));
    }
    if text.contains('\0') {
        return Err(ApiError::bad_request("the path holds a NUL byte"));
    }
    let trimmed = text.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

fn agent(daemon: &Daemon, name: &str) -> Result<Client, ApiError> {
    daemon.store.instance(name).map_err(|error| match error {
        crate::store::StoreError::NotFound { .. } => {
            ApiError::not_found(format!("instance \"{name}\" not found"))
        }
        other => other.into(),
    })?;
    daemon.runtime.guest_agent(name).ok_or_else(|| {
        ApiError::bad_request(format!(
            "instance \"{name}\" is not running: start it to reach its files"
        ))
    })
}

fn headers(response: &mut Response, info: &FileInfo) {
    let kind = match info.kind {
        FileKind::File => "file",
        FileKind::Directory => "directory",
        FileKind::Symlink => "symlink",
    };
    let pairs = [
        ("x-lxd-uid", info.uid.to_string()),
        ("x-lxd-gid", info.gid.to_string()),
        ("x-lxd-mode", format!("{:04o}", info.mode & 0o7777)),
        ("x-lxd-type", kind.to_string()),
    ];
    for (name, value) in pairs {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
}

fn octet_stream(response: &mut Response) {
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
}

pub async fn pull(daemon: Arc<Daemon>, name: String, query: Query) -> ApiResult {
    let path = guest_path(&query)?;
    let agent = agent(&daemon, &name)?;
    let limit = daemon.settings.max_image_size;
    let (info, content) = blocking(move || {
        let mut content = Limited {
            content: Vec::new(),
            limit,
        };
        agent
            .pull(&path, &mut content)
            .map(|info| (info, content.content))
            .map_err(|error| agent_error(&path, error))
    })
    .await??;
    let mut response = match info.kind {
        FileKind::Directory => sync(info.entries.clone().unwrap_or_default())?,
        FileKind::Symlink => {
            let mut response = info.target.clone().unwrap_or_default().into_response();
            octet_stream(&mut response);
            response
        }
        FileKind::File => {
            let mut response = Body::from(content).into_response();
            octet_stream(&mut response);
            response
        }
    };
    headers(&mut response, &info);
    Ok(response)
}

fn header_number(headers: &HeaderMap, name: &str, radix: u32) -> Result<Option<u32>, ApiError> {
    match headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
    {
        None => Ok(None),
        Some(value) => u32::from_str_radix(value, radix)
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid {name} header \"{value}\""))),
    }
}

pub async fn push(
    daemon: Arc<Daemon>,
    name: String,
    query: Query,
    request_headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let path = guest_path(&query)?;
    if path == "/" {
        return Err(ApiError::bad_request("cannot write to \"/\": name a file"));
    }
    let text = |header: &str| {
        request_headers
            .get(header)
            .and_then(|value| value.to_str().ok())
            .map(|value| value.trim().to_string())
            .filter(|value| !value.is_empty())
    };
    let kind = text("x-lxd-type").unwrap_or_else(|| "file".into());
    let append = match text("x-lxd-write").as_deref() {
        None | Some("overwrite") => false,
        Some("append") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "invalid x-lxd-write \"{other}\": use overwrite or append"
            )))
        }
    };
    let uid = header_number(&request_headers, "x-lxd-uid", 10)?.unwrap_or(0);
    let gid = header_number(&request_headers, "x-lxd-gid", 10)?.unwrap_or(0);
    let mode = header_number(&request_headers, "x-lxd-mode", 8)?;
    if mode.is_some_and(|mode| mode > 0o7777) {
        return Err(ApiError::bad_request(
            "invalid x-lxd-mode header: give octal permissions such as 0644",
        ));
    }
    if !matches!(kind.as_str(), "file" | "directory" | "symlink") {
        return Err(ApiError::bad_request(format!(
            "invalid x-lxd-type \"{kind}\": use file, directory or symlink"
        )));
    }
    let limit = daemon.settings.max_image_size;
    let agent = agent(&daemon, &name)?;
    if kind != "file" {
        // A directory has no content; a symlink's is its target.
        let content = axum::body::to_bytes(body, 64 * 1024)
            .await
            .map_err(|_| ApiError::new(413, "a symlink target is at most 64 KiB"))?;
        let owner = (uid, gid);
        return blocking(move || push_other(&agent, &path, &kind, &content, owner, mode))
            .await?
            .and_then(|()| ok());
    }
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let attributes = Attributes {
        mode: mode.unwrap_or(0o644),
        uid,
        gid,
    };
    // Started now, so it reads the upload while it arrives.
    let pushing = tokio::task::spawn_blocking(move || {
        push_file(&agent, &path, attributes, append, limit, receiver)
    });
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    let mut refusal = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => {
                let message = format!("the upload broke off: {error}");
                let _ = sender
                    .send(Err(std::io::Error::other(message.clone())))
                    .await;
                refusal = Some(ApiError::bad_request(message));
                break;
            }
        };
        received += chunk.len() as u64;
        if received > limit {
            let message = format!("the file is larger than the {limit} bytes coved accepts");
            let _ = sender
                .send(Err(std::io::Error::other(message.clone())))
                .await;
            super::drain(&mut stream).await;
            refusal = Some(ApiError::new(413, message));
            break;
        }
        if sender.send(Ok(chunk)).await.is_err() {
            // The push failed already; its answer says why.
            break;
        }
    }
    drop(sender);
    let pushed = pushing
        .await
        .map_err(|error| ApiError::new(500, format!("a background task failed: {error}")))?;
    if let Some(refusal) = refusal {
        return Err(refusal);
    }
    pushed?;
    ok()
}

/// An upload's chunks, read in a blocking thread as they arrive.
struct Upload {
    chunks: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    current: Bytes,
}

impl Read for Upload {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let count = buffer.len().min(self.current.len());
        buffer[..count].copy_from_slice(&self.current[..count]);
        self.current = self.current.slice(count..);
        Ok(count)
    }
}

/// A pulled file's content, refused past `limit` bytes (the guest decides the size).
struct Limited {
    content: Vec<u8>,
    limit: u64,
}

impl Write for Limited {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        if (self.content.len() + buffer.len()) as u64 > self.limit {
            return Err(std::io::Error::other(format!(
                "the file is larger than the {} bytes coved passes on",
                self.limit
            )));
        }
        self.content.extend_from_slice(buffer);
        Ok(buffer.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn push_file(
    agent: &Client,
    path: &str,
    attributes: Attributes,
    append: bool,
    limit: u64,
    chunks: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> Result<(), ApiError> {
    let failed = |error| agent_error(path, error);
    let mut existing = Limited {
        content: Vec::new(),
        limit,
    };
    if append {
        match agent.pull(path, &mut existing) {
            Ok(_) => {}
            Err(error) if error.agent_code() == Some(ErrorCode::NotFound) => {}
            Err(error) => return Err(failed(error)),
        }
    }
    let upload = Upload {
        chunks,
        current: Bytes::new(),
    };
    let mut source = existing.content.as_slice().chain(upload);
    agent
        .push_file(path, attributes, &mut source)
        .map(drop)
        .map_err(failed)
}

/// A directory or a symlink (whose target is `content`).
fn push_other(
    agent: &Client,
    path: &str,
    kind: &str,
    content: &[u8],
    (uid, gid): (u32, u32),
    mode: Option<u32>,
) -> Result<(), ApiError> {
    let failed = |error| agent_error(path, error);
    if kind == "directory" {
        let attributes = Attributes {
            mode: mode.unwrap_or(0o755),
            uid,
            gid,
        };
        return agent.push_directory(path, attributes).map_err(failed);
    }
    let target = String::from_utf8_lossy(content).into_owned();
    agent.push_symlink(path, &target, uid, gid).map_err(failed)
}

pub async fn remove(daemon: Arc<Daemon>, name: String, query: Query) -> ApiResult {
    let path = guest_path(&query)?;
    if path == "/" {
        return Err(ApiError::bad_request("cannot delete \"/\""));
    }
    let agent = agent(&daemon, &name)?;
    blocking(move || -> Result<(), ApiError> {
        // As for containers: a file, a symlink, or an empty directory.
        let request = ExecRequest {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "if [ -d \"$1\" ] && [ ! -L \"$1\" ]; then rmdir -- \"$1\"; else rm -- \"$1\"; fi"
                    .into(),
                "cove-file-delete".into(),
                path.clone(),
            ],
            environment: Default::default(),
            cwd: None,
            uid: None,
            gid: None,
            pty: None,
        };
        let output = agent
            .run(&request, &[])
            .map_err(|error| agent_error(&path, error))?;
        if output.status.shell_status() == 0 {
            return Ok(());
        }
        let message = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let status = if message.contains("No such file") || message.contains("can't remove") {
            404
        } else {
            400
        };
        Err(ApiError::new(
            status,
            format!("cannot delete {path}: {message}"),
        ))
    })
    .await??;
    ok()
}
