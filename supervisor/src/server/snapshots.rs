//! `/1.0/instances/<name>/snapshots` and each snapshot: list, take, show, change the expiry,
//! rename, delete; and the two requests that `instances.rs` hands over: a restore (`PUT
//! /1.0/instances/<name>` with `restore`) and a copy (`POST /1.0/instances` with a `copy`
//! source). The rules live in [`crate::snapshots`]; this file parses, refuses bad requests
//! before any operation exists, and answers as LXD does (with operations).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use super::{
    accepted, check_if_match, json_body, list_urls, ok, sync, sync_tagged, ApiError, ApiResult,
    Query,
};
use crate::api::types::{
    InstanceSnapshotPost, InstanceSnapshotPut, InstanceSnapshotsPost, InstancesPost,
};
use crate::daemon::{instance_url, Daemon};
use crate::operations::Class;
use crate::snapshots::snapshot_url;
use crate::store::{Power, SnapshotRecord, StoreError};

/// Routes under `/1.0/instances` (and `/1.0/containers`).
pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/{name}/snapshots", get(list).post(create))
        .route(
            "/{name}/snapshots/{snapshot}",
            get(show)
                .put(replace)
                .patch(patch)
                .post(rename)
                .delete(delete),
        )
}

/// The resources a snapshot operation names.
fn resources(instance: &str, snapshot: &str) -> BTreeMap<String, Vec<String>> {
    BTreeMap::from([
        ("instances".to_string(), vec![instance_url(instance)]),
        (
            "containers".to_string(),
            vec![format!("/1.0/containers/{instance}")],
        ),
        (
            "instances_snapshots".to_string(),
            vec![snapshot_url(instance, snapshot)],
        ),
    ])
}

fn instance(daemon: &Daemon, name: &str) -> Result<(), ApiError> {
    daemon
        .store
        .instance(name)
        .map(|_| ())
        .map_err(|error| match error {
            StoreError::NotFound { .. } => {
                ApiError::not_found(format!("instance \"{name}\" not found"))
            }
            other => other.into(),
        })
}

fn snapshot(daemon: &Daemon, name: &str, snapshot: &str) -> Result<SnapshotRecord, ApiError> {
    instance(daemon, name)?;
    daemon
        .store
        .snapshot(name, snapshot)
        .map_err(|error| match error {
            StoreError::NotFound { .. } => {
                ApiError::not_found(format!("snapshot \"{name}/{snapshot}\" not found"))
            }
            other => other.into(),
        })
}

/// The writable fields of a snapshot, for its ETag.
fn snapshot_etag(record: &SnapshotRecord) -> Value {
    serde_json::json!({ "expires_at": record.expires_at, "description": record.description })
}

/// An instance's snapshots as a list for `recursion=2` views of the instance.
pub fn views(daemon: &Daemon, name: &str) -> Vec<Value> {
    daemon
        .store
        .snapshots(name)
        .unwrap_or_default()
        .iter()
        .filter_map(|record| serde_json::to_value(daemon.snapshot_view(record)).ok())
        .collect()
}

async fn list(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    query: Query,
) -> ApiResult {
    instance(&daemon, &name)?;
    let records = daemon.store.snapshots(&name)?;
    if query.recursion() == 0 {
        let prefix = format!("/1.0/instances/{name}/snapshots");
        return sync(list_urls(
            &prefix,
            records.into_iter().map(|record| record.name),
        ));
    }
    let views: Vec<_> = records
        .iter()
        .map(|record| daemon.snapshot_view(record))
        .collect();
    sync(views)
}

async fn create(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    let mut request: InstanceSnapshotsPost = json_body(body).await?;
    instance(&daemon, &name)?;
    if request.name.is_empty() {
        request.name = daemon.next_snapshot_name(&name)?;
    }
    daemon.check_new_snapshot(&name, &request)?;
    let operation_resources = resources(&name, &request.name);
    let instance = name.clone();
    super::locked_task(
        daemon,
        "Snapshotting instance",
        operation_resources,
        name,
        |daemon| async move { daemon.create_snapshot_locked(&instance, &request).await },
    )
}

async fn show(
    State(daemon): State<Arc<Daemon>>,
    Path((name, snapshot_name)): Path<(String, String)>,
) -> ApiResult {
    let record = snapshot(&daemon, &name, &snapshot_name)?;
    sync_tagged(daemon.snapshot_view(&record), &snapshot_etag(&record))
}

async fn update(
    daemon: Arc<Daemon>,
    name: String,
    snapshot_name: String,
    headers: HeaderMap,
    body: Body,
    patch: bool,
) -> ApiResult {
    let mut request: InstanceSnapshotPut = json_body(body).await?;
    let lock = daemon.instance_lock(&name);
    let _guard = lock.lock().await;
    let record = snapshot(&daemon, &name, &snapshot_name)?;
    check_if_match(&headers, &snapshot_etag(&record))?;
    if !patch {
        // PUT replaces the writable fields: what it omits goes back to its default.
        request.expires_at.get_or_insert_with(String::new);
        request.description.get_or_insert_with(String::new);
    }
    daemon.update_snapshot(&name, &snapshot_name, &request)?;
    if patch {
        return ok();
    }
    let operation = daemon.operations.create(
        Class::Task,
        "Updating snapshot",
        resources(&name, &snapshot_name),
        Value::Object(Default::default()),
        false,
    );
    operation.succeed(None);
    accepted(&operation)
}

async fn replace(
    State(daemon): State<Arc<Daemon>>,
    Path((name, snapshot_name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    update(daemon, name, snapshot_name, headers, body, false).await
}

async fn patch(
    State(daemon): State<Arc<Daemon>>,
    Path((name, snapshot_name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    update(daemon, name, snapshot_name, headers, body, true).await
}

async fn rename(
    State(daemon): State<Arc<Daemon>>,
    Path((name, snapshot_name)): Path<(String, String)>,
    body: Body,
) -> ApiResult {
    let request: InstanceSnapshotPost = json_body(body).await?;
    if request.migration {
        return Err(ApiError::bad_request(
            "migrating snapshots is not supported: copy the instance with `cove copy`",
        ));
    }
    snapshot(&daemon, &name, &snapshot_name)?;
    if request.name != snapshot_name {
        daemon.check_snapshot_rename(&name, &snapshot_name, &request.name)?;
    }
    let operation_resources = resources(&name, &snapshot_name);
    let instance = name.clone();
    super::locked_task(
        daemon,
        "Renaming snapshot",
        operation_resources,
        name,
        |daemon| async move {
            if request.name == snapshot_name {
                return Ok(());
            }
            daemon
                .rename_snapshot_locked(&instance, &snapshot_name, &request.name)
                .await
        },
    )
}

async fn delete(
    State(daemon): State<Arc<Daemon>>,
    Path((name, snapshot_name)): Path<(String, String)>,
) -> ApiResult {
    snapshot(&daemon, &name, &snapshot_name)?;
    let operation_resources = resources(&name, &snapshot_name);
    let instance = name.clone();
    super::locked_task(
        daemon,
        "Deleting snapshot",
        operation_resources,
        name,
        |daemon| async move {
            daemon
                .delete_snapshot_locked(&instance, &snapshot_name)
                .await
        },
    )
}

/// `PUT /1.0/instances/<name>` with `restore`: an operation that brings back the snapshot's
/// files and configuration (a running instance is stopped and started again around it).
pub async fn restore(daemon: Arc<Daemon>, name: String, snapshot: String) -> ApiResult {
    instance(&daemon, &name)?;
    daemon
        .store
        .snapshot(&name, &snapshot)
        .map_err(|error| match error {
            StoreError::NotFound { .. } => {
                ApiError::not_found(format!("snapshot \"{name}/{snapshot}\" not found"))
            }
            other => other.into(),
        })?;
    let instance = name.clone();
    super::locked_task(
        daemon,
        "Restoring snapshot",
        super::instances::resources(&name),
        name,
        |daemon| async move { daemon.restore_snapshot_locked(&instance, &snapshot).await },
    )
}

/// `POST /1.0/instances` with a `copy` source: the new instance's row now (its name taken, the
/// request checked), its files in the operation.
pub async fn create_copy(daemon: Arc<Daemon>, request: InstancesPost) -> ApiResult {
    let (mut new_record, snapshot) = daemon.plan_copy(&request)?;
    if request.start {
        new_record.power = Power::Running;
    }
    daemon
        .store
        .create_instance(&new_record)
        .map_err(|error| match error {
            StoreError::AlreadyExists { .. } => {
                ApiError::new(409, format!("instance \"{}\" already exists", request.name))
            }
            other => other.into(),
        })?;
    daemon.events.lifecycle(
        "instance-created",
        &instance_url(&request.name),
        BTreeMap::from([("source".to_string(), json!(request.source.source))]),
    );
    let source = request
        .source
        .source
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let name = request.name.clone();
    super::locked_task(
        daemon,
        "Copying instance",
        super::instances::resources(&name),
        name,
        move |daemon| async move {
            daemon
                .copy_files_locked(
                    &source,
                    snapshot.as_deref(),
                    &request.name,
                    request.source.instance_only,
                )
                .await?;
            if request.start {
                daemon.start_locked(&request.name).await?;
            }
            Ok(())
        },
    )
}
