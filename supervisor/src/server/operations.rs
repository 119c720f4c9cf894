//! `/1.0/operations` (list, get, cancel, wait, websocket) and `/1.0/events`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::{Map, Value};

use super::{list_urls, ok, sync, ApiError, ApiResult, Query};
use crate::daemon::Daemon;
use crate::events::KINDS;

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/1.0/operations", get(list))
        .route("/1.0/operations/{id}", get(show).delete(cancel))
        .route("/1.0/operations/{id}/wait", get(wait))
        .route("/1.0/operations/{id}/websocket", get(websocket))
        .route("/1.0/events", get(events))
}

/// LXD groups operations by status name in lower case (`running`, `success`, ...).
async fn list(State(daemon): State<Arc<Daemon>>, query: Query) -> ApiResult {
    let mut groups: Map<String, Value> = Map::new();
    for operation in daemon.operations.all() {
        let snapshot = operation.snapshot();
        let key = snapshot.status.to_ascii_lowercase();
        let entry = if query.recursion() > 0 {
            serde_json::to_value(&snapshot).unwrap_or(Value::Null)
        } else {
            Value::from(list_urls("/1.0/operations", [snapshot.id.clone()]).remove(0))
        };
        if let Some(array) = groups
            .entry(key)
            .or_insert_with(|| Value::Array(Vec::new()))
            .as_array_mut()
        {
            array.push(entry);
        }
    }
    sync(groups)
}

fn find(daemon: &Daemon, id: &str) -> Result<Arc<crate::operations::OperationHandle>, ApiError> {
    daemon
        .operations
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("operation \"{id}\" not found")))
}

async fn show(State(daemon): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult {
    sync(find(&daemon, &id)?.snapshot())
}

async fn cancel(State(daemon): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult {
    let operation = find(&daemon, &id)?;
    if operation.status().is_final() {
        return Err(ApiError::bad_request(format!(
            "operation \"{id}\" has already finished"
        )));
    }
    if !operation.request_cancel() {
        return Err(ApiError::new(403, "this operation cannot be cancelled"));
    }
    ok()
}

/// `?timeout=N` seconds; absent or -1 waits until the operation ends.
async fn wait(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    query: Query,
) -> ApiResult {
    let operation = find(&daemon, &id)?;
    let timeout = match query.get("timeout") {
        None | Some("") | Some("-1") => None,
        Some(text) => match text.parse::<f64>() {
            Ok(seconds) if seconds >= 0.0 && seconds.is_finite() => {
                Some(Duration::from_secs_f64(seconds.min(1e9)))
            }
            Ok(_) => None,
            Err(_) => {
                return Err(ApiError::bad_request(format!(
                    "invalid timeout \"{text}\": give a number of seconds, or -1 to wait for the \
                     end"
                )))
            }
        },
    };
    sync(operation.wait(timeout).await)
}

/// An optional websocket upgrade: a plain GET gets a clear error instead of axum's rejection.
pub struct MaybeUpgrade(pub Option<WebSocketUpgrade>);

impl<S: Send + Sync> FromRequestParts<S> for MaybeUpgrade {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            WebSocketUpgrade::from_request_parts(parts, state)
                .await
                .ok(),
        ))
    }
}

async fn websocket(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    query: Query,
    upgrade: MaybeUpgrade,
) -> Result<axum::response::Response, ApiError> {
    let operation = find(&daemon, &id)?;
    let Some(upgrade) = upgrade.0 else {
        return Err(ApiError::bad_request(
            "this endpoint is a websocket: connect with a websocket upgrade",
        ));
    };
    let secret = query.get("secret").unwrap_or_default();
    let (fd, sender) = operation
        .claim_secret(secret)
        .ok_or_else(|| ApiError::new(403, "wrong or already used websocket secret"))?;
    Ok(upgrade
        .on_upgrade(move |socket| async move {
            let _ = sender.send((fd, socket));
        })
        .into_response())
}

async fn events(
    State(daemon): State<Arc<Daemon>>,
    query: Query,
    upgrade: MaybeUpgrade,
) -> Result<axum::response::Response, ApiError> {
    let Some(upgrade) = upgrade.0 else {
        return Err(ApiError::bad_request(
            "/1.0/events is a websocket: connect with a websocket upgrade",
        ));
    };
    let kinds: Vec<String> = match query.get("type") {
        None | Some("") => KINDS.iter().map(|kind| kind.to_string()).collect(),
        Some(list) => list
            .split(',')
            .map(|kind| kind.trim().to_string())
            .collect(),
    };
    if let Some(unknown) = kinds.iter().find(|kind| !KINDS.contains(&kind.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown event type \"{unknown}\": use operation, lifecycle or logging"
        )));
    }
    let receiver = daemon.events.subscribe();
    Ok(upgrade
        .on_upgrade(move |socket| forward_events(socket, receiver, kinds))
        .into_response())
}

async fn forward_events(
    mut socket: WebSocket,
    mut receiver: tokio::sync::broadcast::Receiver<crate::api::types::Event>,
    kinds: Vec<String>,
) {
    loop {
        tokio::select! {
            event = receiver.recv() => match event {
                Ok(event) => {
                    if !kinds.contains(&event.kind) {
                        continue;
                    }
                    let Ok(text) = serde_json::to_string(&event) else { continue };
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
