//! The HTTP side of coved: LXD 1.0 routes on a Unix socket, their envelopes (sync, async with
//! HTTP 202 and `Location`, error with the HTTP status as `error_code`), ETags and
//! `If-Match`, recursion, and bad input answered with a 4xx error envelope.
//!
//! Each file here serves one part of the tree; the rules about instances live in
//! `crate::daemon`, the JSON shapes in `crate::api::types`.

mod exec;
mod files;
mod host;
mod images;
mod instances;
mod metrics;
mod networks;
mod operations;
mod resources;
mod snapshots;
mod storage;
mod virtual_machines;
mod vm_console;
mod vm_files;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::api::types;
use crate::daemon::{Daemon, DaemonError};
use crate::operations::{Class, OperationHandle, Operations};
use crate::store::StoreError;

/// The largest JSON body accepted.
const MAX_JSON_BODY: usize = 4 << 20;

pub type Shared = axum::extract::State<Arc<Daemon>>;

/// An error answered as LXD's error envelope.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }
}

impl From<DaemonError> for ApiError {
    fn from(error: DaemonError) -> Self {
        Self::new(error.http_status(), error.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        DaemonError::from(error).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, &types::Response::error(self.status, &self.message))
    }
}

pub type ApiResult = Result<Response, ApiError>;

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A sync response.
pub fn sync(metadata: impl Serialize) -> ApiResult {
    let metadata = serde_json::to_value(metadata)
        .map_err(|error| ApiError::new(500, format!("cannot encode the response: {error}")))?;
    Ok(json_response(
        StatusCode::OK,
        &types::Response::sync(metadata),
    ))
}

/// A sync response with an ETag over `tagged` (the object's writable fields).
pub fn sync_tagged(metadata: impl Serialize, tagged: &impl Serialize) -> ApiResult {
    let mut response = sync(metadata)?;
    if let Ok(value) = HeaderValue::from_str(&format!("\"{}\"", etag(tagged))) {
        response.headers_mut().insert(header::ETAG, value);
    }
    Ok(response)
}

/// An empty sync response.
pub fn ok() -> ApiResult {
    sync(Value::Object(Default::default()))
}

/// Answers with an operation that runs `work` under the instance's lock (as every change of
/// an instance runs), failing with its error's message.
pub fn locked_task<F, Fut>(
    daemon: Arc<Daemon>,
    description: &str,
    resources: BTreeMap<String, Vec<String>>,
    instance: String,
    work: F,
) -> ApiResult
where
    F: FnOnce(Arc<Daemon>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), DaemonError>> + Send + 'static,
{
    let operation = daemon.operations.create(
        Class::Task,
        description,
        resources,
        Value::Object(Default::default()),
        false,
    );
    Operations::run(operation.clone(), async move {
        let lock = daemon.instance_lock(&instance);
        let _guard = lock.lock().await;
        work(daemon.clone())
            .await
            .map_err(|error| error.to_string())?;
        Ok(None)
    });
    accepted(&operation)
}

/// HTTP 202 with the operation and its URL in `Location`.
pub fn accepted(operation: &OperationHandle) -> ApiResult {
    let mut response = json_response(
        StatusCode::ACCEPTED,
        &types::Response::async_operation(&operation.snapshot()),
    );
    if let Ok(value) = HeaderValue::from_str(&operation.url()) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// The ETag of a value: SHA-256 of its JSON.
pub fn etag(value: &impl Serialize) -> String {
    use sha2::Digest;
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    crate::images::hex(&sha2::Sha256::digest(&bytes))
}

/// Refuses a PUT or PATCH whose `If-Match` names another version (HTTP 412).
pub fn check_if_match(headers: &HeaderMap, current: &impl Serialize) -> Result<(), ApiError> {
    let Some(wanted) = headers.get(header::IF_MATCH) else {
        return Ok(());
    };
    let wanted = wanted.to_str().unwrap_or_default().trim().trim_matches('"');
    if wanted.is_empty() || wanted == "*" || wanted == etag(current) {
        Ok(())
    } else {
        Err(ApiError::new(
            412,
            "ETag doesn't match: the object changed since you read it; read it again",
        ))
    }
}

/// Reads a JSON body, refusing what is not JSON or misses fields with a 400 that says why.
pub async fn json_body<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_JSON_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                413,
                format!("the request body is larger than {MAX_JSON_BODY} bytes"),
            )
        })?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "the request has no body: send a JSON object",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|error| {
        ApiError::bad_request(format!("invalid JSON in the request body: {error}"))
    })
}

/// A request's query parameters, percent-decoded.
#[derive(Debug, Default, Clone)]
pub struct Query(pub HashMap<String, String>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Self {
        let mut parameters = HashMap::new();
        for pair in raw.unwrap_or_default().split('&') {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            parameters.insert(percent_decode(key), percent_decode(value));
        }
        Self(parameters)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// `recursion`: 0, 1 or 2 (anything else is 0, as LXD reads it).
    pub fn recursion(&self) -> u8 {
        match self.get("recursion") {
            Some("1") => 1,
            Some("2") => 2,
            _ => 0,
        }
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Query {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self::parse(parts.uri.query()))
    }
}

pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        decoded.push(byte);
                        index += 3;
                    }
                    Err(_) => {
                        decoded.push(b'%');
                        index += 1;
                    }
                }
            }
            b'+' => {
                decoded.push(b' ');
                index += 1;
            }
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// LXD's list answer: URLs at recursion 0, objects above.
pub fn list_urls(prefix: &str, names: impl IntoIterator<Item = String>) -> Vec<String> {
    names
        .into_iter()
        .map(|name| format!("{prefix}/{name}"))
        .collect()
}

async fn root() -> ApiResult {
    sync(["/1.0"])
}

async fn not_found() -> ApiError {
    ApiError::not_found("not found")
}

/// Every route.
pub fn router(daemon: Arc<Daemon>) -> Router {
    let instance_routes = instances::routes();
    Router::new()
        .route("/", get(root))
        .merge(resources::routes())
        .merge(storage::routes())
        .nest("/1.0/instances", instance_routes.clone())
        .nest("/1.0/containers", instance_routes)
        .merge(operations::routes())
        .merge(metrics::routes())
        .merge(host::routes())
        .merge(images::routes())
        .merge(networks::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::disable())
        .method_not_allowed_fallback(|| async { ApiError::new(405, "method not allowed") })
        .with_state(daemon)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another coved already listens on {0}: stop it first")]
    AlreadyRunning(std::path::PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown group \"{0}\" for the socket: give an existing group name or number")]
    Group(String),
    #[error("cannot set the socket's owner and mode: {0}")]
    Permissions(#[source] std::io::Error),
    #[error("the server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// The gid of a group given by name or number.
fn group_id(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse() {
        return Some(gid);
    }
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == group).then(|| fields.nth(1)?.parse().ok())?
    })
}

/// Binds `$COVE_DIR/unix.socket` (mode 0660, group as configured), replacing a stale socket
/// but never one another coved still answers on.
pub fn bind(daemon: &Daemon) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let path = daemon.settings.socket();
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(ServeError::AlreadyRunning(path));
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).map_err(|source| ServeError::Bind {
        path: path.clone(),
        source,
    })?;
    let gid = match &daemon.settings.socket_group {
        Some(group) => Some(group_id(group).ok_or_else(|| ServeError::Group(group.clone()))?),
        None => None,
    };
    std::os::unix::fs::chown(&path, None, gid).map_err(ServeError::Permissions)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
        .map_err(ServeError::Permissions)?;
    Ok(listener)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    axum::serve(listener, router(daemon))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServeError::Serve)
}

/// How much of a refused upload is still read (and thrown away) before the answer goes out.
const DRAIN_LIMIT: u64 = 64 << 20;

/// Reads and drops what the client is still sending, up to [`DRAIN_LIMIT`], so that a client
/// that writes its whole request before reading gets the 413 instead of a connection reset
/// (closing a socket with unread bytes makes the kernel answer with a reset).
pub(super) async fn drain<S, E>(stream: &mut S)
where
    S: futures_util::Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
{
    let mut drained = 0u64;
    while let Some(Ok(chunk)) = stream.next().await {
        drained += chunk.len() as u64;
        if drained > DRAIN_LIMIT {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode() {
        let query = Query::parse(Some("recursion=2&path=%2Fetc%2Fhost+name&flag"));
        assert_eq!(query.recursion(), 2);
        assert_eq!(query.get("path"), Some("/etc/host name"));
        assert_eq!(query.get("flag"), Some(""));
        assert_eq!(Query::parse(Some("recursion=9")).recursion(), 0);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
