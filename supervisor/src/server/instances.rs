//! `/1.0/instances` and each instance: list, create, get, replace, patch, rename, delete,
//! state changes, console and logs. Exec and files live in their own files.
//!
//! Bad requests are refused before anything is written: a new instance's row is committed
//! before the answer (so an acknowledged instance survives a crash of coved), and the power
//! state a start or stop asks for is committed before its operation runs, so a restarted coved
//! finishes what it acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use super::{
    accepted, check_if_match, json_body, list_urls, ok, sync, sync_tagged, ApiError, ApiResult,
    Query,
};
use crate::api::types::{
    InstanceFull, InstancePost, InstancePut, InstanceSource, InstanceStatePut, InstancesPost,
};
use crate::clock;
use crate::daemon::{blocking, instance_url, state_view, Daemon, DaemonError};
use crate::instances::config;
use crate::instances::runtime::RuntimeStatus;
use crate::operations::{Class, Operations};
use crate::store::{InstanceRecord, Power, StoreError};

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/", get(list).post(create))
        .route(
            "/{name}",
            get(show)
                .put(replace)
                .patch(patch)
                .delete(delete)
                .post(rename),
        )
        .route("/{name}/state", get(state).put(change_state))
        .route("/{name}/exec", post(super::exec::exec))
        .route(
            "/{name}/files",
            get(super::files::pull)
                .post(super::files::push)
                .delete(super::files::remove),
        )
        .route(
            "/{name}/console",
            get(console_log).delete(clear_console).post(console_attach),
        )
        .route("/{name}/logs", get(logs))
        .route("/{name}/logs/{file}", get(log).delete(delete_log))
        .route("/{name}/backups", get(backups))
        .merge(super::snapshots::routes())
}

/// The resources an instance operation names (LXD lists both spellings).
pub fn resources(name: &str) -> BTreeMap<String, Vec<String>> {
    BTreeMap::from([
        ("instances".to_string(), vec![instance_url(name)]),
        (
            "containers".to_string(),
            vec![format!("/1.0/containers/{name}")],
        ),
    ])
}

/// The writable fields of an instance, for its ETag.
fn instance_etag(record: &InstanceRecord) -> Value {
    json!({
        "architecture": record.architecture,
        "config": record.config,
        "devices": record.devices,
        "ephemeral": record.ephemeral,
        "profiles": record.profiles,
        "description": record.description,
    })
}

fn record(daemon: &Daemon, name: &str) -> Result<InstanceRecord, ApiError> {
    daemon.store.instance(name).map_err(|error| match error {
        StoreError::NotFound { .. } => {
            ApiError::not_found(format!("instance \"{name}\" not found"))
        }
        other => other.into(),
    })
}

async fn list(State(daemon): State<Arc<Daemon>>, query: Query) -> ApiResult {
    match query.recursion() {
        0 => sync(list_urls("/1.0/instances", daemon.store.instance_names()?)),
        1 => {
            let records = daemon.store.instances()?;
            let statuses = statuses(&daemon, &records).await?;
            let profiles = daemon.profile_layers()?;
            let views: Vec<_> = records
                .iter()
                .zip(statuses)
                .map(|(record, status)| daemon.instance_view_with(record, status, &profiles))
                .collect();
            sync(views)
        }
        _ => {
            let records = daemon.store.instances()?;
            let profiles = daemon.profile_layers()?;
            let mut views = Vec::with_capacity(records.len());
            for record in &records {
                let state = daemon.full_state(&record.name).await?;
                views.push(InstanceFull {
                    instance: daemon.instance_view_with(record, state.status, &profiles),
                    state: Some(state_view(&state)),
                    snapshots: super::snapshots::views(&daemon, &record.name),
                    backups: Vec::new(),
                });
            }
            sync(views)
        }
    }
}

/// Every instance's status, asked of the runtime off the async threads.
async fn statuses(
    daemon: &Arc<Daemon>,
    records: &[InstanceRecord],
) -> Result<Vec<RuntimeStatus>, ApiError> {
    let runtime = daemon.runtime.clone();
    let names: Vec<String> = records.iter().map(|record| record.name.clone()).collect();
    Ok(blocking(move || names.iter().map(|name| runtime.status(name)).collect()).await?)
}

fn resolve_image(daemon: &Daemon, source: &InstanceSource) -> Result<String, ApiError> {
    match source.kind.as_str() {
        "image" => {}
        "" => {
            return Err(ApiError::bad_request(
                "the request has no source: give \"source\": {\"type\": \"image\", \"alias\": \
                 NAME} or a \"fingerprint\"",
            ))
        }
        "none" => {
            return Err(ApiError::bad_request(
                "instances without an image (source type \"none\") are not supported",
            ))
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "source type \"{other}\" is not supported: create instances from a local image"
            )))
        }
    }
    if !source.server.is_empty() {
        return Err(ApiError::bad_request(format!(
            "images from remote servers ({}) are not supported: import the image with `lxc \
             image import` first",
            source.server
        )));
    }
    if !source.alias.is_empty() {
        return match daemon.store.alias(&source.alias) {
            Ok(alias) => Ok(alias.fingerprint),
            Err(StoreError::NotFound { .. }) => Err(ApiError::not_found(format!(
                "image \"{}\" not found: no alias of that name",
                source.alias
            ))),
            Err(error) => Err(error.into()),
        };
    }
    if source.fingerprint.is_empty() {
        return Err(ApiError::bad_request(
            "the image source names no image: give an \"alias\" or a \"fingerprint\"",
        ));
    }
    find_image(daemon, &source.fingerprint)
}

/// An image by fingerprint or unique fingerprint prefix.
pub fn find_image(daemon: &Daemon, fingerprint: &str) -> Result<String, ApiError> {
    if !fingerprint.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::not_found(format!(
            "image \"{fingerprint}\" not found"
        )));
    }
    let mut matches = daemon
        .store
        .image_fingerprints_with_prefix(&fingerprint.to_ascii_lowercase())?;
    match matches.len() {
        0 => Err(ApiError::not_found(format!(
            "image \"{fingerprint}\" not found"
        ))),
        1 => Ok(matches.remove(0)),
        _ => Err(ApiError::bad_request(format!(
            "image fingerprint prefix \"{fingerprint}\" is ambiguous: give more of it"
        ))),
    }
}

async fn create(State(daemon): State<Arc<Daemon>>, body: Body) -> ApiResult {
    let request: InstancesPost = json_body(body).await?;
    config::validate_name(&request.name)
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    if request.source.kind == "copy" {
        return super::snapshots::create_copy(daemon, request).await;
    }
    let image = resolve_image(&daemon, &request.source)?;
    let virtual_machine = super::virtual_machines::instance_is_machine(
        &request.kind,
        &daemon.store.image(&image)?.kind,
    )?;
    let profiles = request
        .profiles
        .clone()
        .unwrap_or_else(|| vec!["default".to_string()]);
    match daemon.store.instance(&request.name) {
        Ok(_) => {
            return Err(ApiError::new(
                409,
                format!("instance \"{}\" already exists", request.name),
            ))
        }
        Err(StoreError::NotFound { .. }) => {}
        Err(error) => return Err(error.into()),
    }
    daemon.validate_definition(
        &request.name,
        &image,
        &profiles,
        &request.config,
        &request.devices,
    )?;
    if virtual_machine {
        super::virtual_machines::admit(&daemon, &profiles, &request.config, &request.devices)?;
    }
    let image_record = daemon.store.image(&image)?;
    let now = clock::now();
    let mut config_keys = request.config.clone();
    for (key, value) in &image_record.properties {
        config_keys
            .entry(format!("image.{key}"))
            .or_insert_with(|| value.clone());
    }
    config_keys.insert("volatile.base_image".into(), image.clone());
    let record = InstanceRecord {
        name: request.name.clone(),
        kind: if virtual_machine {
            super::virtual_machines::KIND.into()
        } else {
            "container".into()
        },
        architecture: image_record.architecture.clone(),
        description: request.description.clone(),
        config: config_keys,
        devices: request.devices.clone(),
        profiles,
        ephemeral: request.ephemeral,
        image: image.clone(),
        created_at: now.clone(),
        last_used_at: now.clone(),
        power: if request.start {
            Power::Running
        } else {
            Power::Stopped
        },
    };
    super::virtual_machines::claim_name(&daemon, &request.name, virtual_machine)?;
    daemon
        .store
        .create_instance(&record)
        .inspect_err(|_| {
            if virtual_machine {
                super::virtual_machines::release_name(&daemon, &request.name);
            }
        })
        .map_err(|error| match error {
            StoreError::AlreadyExists { .. } => {
                ApiError::new(409, format!("instance \"{}\" already exists", request.name))
            }
            other => other.into(),
        })?;
    let mut image_record = image_record;
    image_record.last_used_at = now;
    let _ = daemon.store.update_image(&image_record);
    daemon.events.lifecycle(
        "instance-created",
        &instance_url(&request.name),
        BTreeMap::new(),
    );
    let operation = daemon.operations.create(
        Class::Task,
        "Creating instance",
        resources(&request.name),
        Value::Object(Default::default()),
        false,
    );
    let name = request.name.clone();
    let start = request.start;
    let work_daemon = daemon.clone();
    Operations::run(operation.clone(), async move {
        if virtual_machine {
            super::virtual_machines::create(work_daemon, name, image, start).await?;
            return Ok(None);
        }
        if start {
            let lock = work_daemon.instance_lock(&name);
            let _guard = lock.lock().await;
            work_daemon
                .start_locked(&name)
                .await
                .map_err(|error| error.to_string())?;
        }
        Ok(None)
    });
    accepted(&operation)
}

async fn show(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    query: Query,
) -> ApiResult {
    let record = record(&daemon, &name)?;
    let tag = instance_etag(&record);
    if query.recursion() >= 1 {
        let state = daemon.full_state(&name).await?;
        let full = InstanceFull {
            instance: daemon.instance_view(&record, state.status)?,
            state: Some(state_view(&state)),
            snapshots: super::snapshots::views(&daemon, &name),
            backups: Vec::new(),
        };
        return sync_tagged(full, &tag);
    }
    let status = {
        let runtime = daemon.runtime.clone();
        let owned = name.clone();
        blocking(move || runtime.status(&owned)).await?
    };
    sync_tagged(daemon.instance_view(&record, status)?, &tag)
}

async fn update(
    daemon: Arc<Daemon>,
    name: String,
    headers: HeaderMap,
    request: InstancePut,
    patch: bool,
) -> ApiResult {
    if let Some(snapshot) = request.restore.clone().filter(|name| !name.is_empty()) {
        // `lxc restore` names the snapshot in full (`NAME/SNAPSHOT`), the API allows both.
        let prefix = format!("{name}/");
        let snapshot = snapshot
            .strip_prefix(&prefix)
            .map(str::to_string)
            .unwrap_or(snapshot);
        return super::snapshots::restore(daemon, name, snapshot).await;
    }
    let lock = daemon.instance_lock(&name);
    let _guard = lock.lock().await;
    let mut record = record(&daemon, &name)?;
    let before = record.clone();
    check_if_match(&headers, &instance_etag(&record))?;
    // Keys coved manages itself survive a PUT that omits them.
    let kept: BTreeMap<String, String> = record
        .config
        .iter()
        .filter(|(key, _)| key.starts_with("volatile.") || key.starts_with("image."))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    match (request.config, patch) {
        (Some(config), true) => record.config.extend(config),
        (Some(config), false) => {
            record.config = kept;
            record.config.extend(config);
        }
        (None, false) => record.config = kept,
        (None, true) => {}
    }
    record.config.retain(|_, value| !value.is_empty());
    match (request.devices, patch) {
        (Some(devices), true) => record.devices.extend(devices),
        (Some(devices), false) => record.devices = devices,
        (None, false) => record.devices.clear(),
        (None, true) => {}
    }
    match (request.profiles, patch) {
        (Some(profiles), _) => record.profiles = profiles,
        (None, false) => record.profiles.clear(),
        (None, true) => {}
    }
    if let Some(description) = request.description {
        record.description = description;
    } else if !patch {
        record.description.clear();
    }
    if let Some(ephemeral) = request.ephemeral {
        record.ephemeral = ephemeral;
    } else if !patch {
        record.ephemeral = false;
    }
    daemon.validate_definition(
        &name,
        &record.image,
        &record.profiles,
        &record.config,
        &record.devices,
    )?;
    daemon.check_pool_kept(&before, &record)?;
    daemon.store.update_instance(&record)?;
    daemon
        .events
        .lifecycle("instance-updated", &instance_url(&name), BTreeMap::new());
    // LXD answers a PUT with an operation; the change is already done.
    let operation = daemon.operations.create(
        Class::Task,
        "Updating instance",
        resources(&name),
        Value::Object(Default::default()),
        false,
    );
    operation.succeed(None);
    if patch {
        ok()
    } else {
        accepted(&operation)
    }
}

async fn replace(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request: InstancePut = json_body(body).await?;
    update(daemon, name, headers, request, false).await
}

async fn patch(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request: InstancePut = json_body(body).await?;
    update(daemon, name, headers, request, true).await
}

async fn require_stopped(daemon: &Arc<Daemon>, name: &str, doing: &str) -> Result<(), ApiError> {
    let runtime = daemon.runtime.clone();
    let owned = name.to_string();
    if blocking(move || runtime.status(&owned)).await? != RuntimeStatus::Stopped {
        return Err(ApiError::bad_request(format!(
            "instance \"{name}\" is running: stop it before {doing} it"
        )));
    }
    Ok(())
}

async fn delete(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    record(&daemon, &name)?;
    require_stopped(&daemon, &name, "deleting").await?;
    let instance = name.clone();
    super::locked_task(
        daemon,
        "Deleting instance",
        resources(&name),
        name,
        |daemon| async move { daemon.delete_locked(&instance).await },
    )
}

async fn rename(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    let request: InstancePost = json_body(body).await?;
    if request.migration {
        return Err(ApiError::bad_request("migration is not supported"));
    }
    config::validate_name(&request.name)
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    record(&daemon, &name)?;
    if request.name != name {
        match daemon.store.instance(&request.name) {
            Ok(_) => {
                return Err(ApiError::new(
                    409,
                    format!("instance \"{}\" already exists", request.name),
                ))
            }
            Err(StoreError::NotFound { .. }) => {}
            Err(error) => return Err(error.into()),
        }
    }
    require_stopped(&daemon, &name, "renaming").await?;
    let operation = daemon.operations.create(
        Class::Task,
        "Renaming instance",
        resources(&name),
        Value::Object(Default::default()),
        false,
    );
    let new_name = request.name;
    Operations::run(operation.clone(), async move {
        if new_name == name {
            return Ok(None);
        }
        let lock = daemon.instance_lock(&name);
        let _guard = lock.lock().await;
        let new_lock = daemon.instance_lock(&new_name);
        let _new_guard = new_lock.lock().await;
        let runtime = daemon.runtime.clone();
        let (old, new) = (name.clone(), new_name.clone());
        let directory = daemon
            .store
            .instance(&name)
            .map_err(DaemonError::from)
            .and_then(|record| daemon.instance_directory(&record))
            .map_err(|error| error.to_string())?;
        let new_directory = directory.with_file_name(&new_name);
        blocking(move || runtime.rename(&old, &new, &directory, &new_directory))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| error.to_string())?;
        daemon
            .store
            .rename_instance(&name, &new_name)
            .map_err(|error| error.to_string())?;
        let logs = daemon.settings.logs();
        let _ = std::fs::rename(logs.join(&name), logs.join(&new_name));
        daemon.events.lifecycle(
            "instance-renamed",
            &instance_url(&new_name),
            BTreeMap::from([("old_name".to_string(), Value::from(name))]),
        );
        Ok(None)
    });
    accepted(&operation)
}

async fn state(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    record(&daemon, &name)?;
    let state = daemon.full_state(&name).await?;
    sync(state_view(&state))
}

/// How long a stop waits for init to halt before killing it.
fn stop_timeout(request: &InstanceStatePut) -> Duration {
    if request.force || request.timeout == 0 {
        Duration::ZERO
    } else if request.timeout > 0 {
        Duration::from_secs(request.timeout as u64)
    } else {
        // LXD waits forever for a clean halt; coved kills after a minute.
        Duration::from_secs(60)
    }
}

async fn change_state(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    let request: InstanceStatePut = json_body(body).await?;
    record(&daemon, &name)?;
    let status = daemon.status_of(&name);
    let running = status != RuntimeStatus::Stopped;
    let (description, action) =
        match request.action.as_str() {
            "start" if status == RuntimeStatus::Frozen => ("Starting instance", "unfreeze"),
            "start" if running => {
                return Err(ApiError::bad_request(format!(
                    "instance \"{name}\" is already running"
                )))
            }
            "start" => ("Starting instance", "start"),
            "stop" if !running => {
                return Err(ApiError::bad_request(format!(
                    "instance \"{name}\" is already stopped"
                )))
            }
            "stop" => ("Stopping instance", "stop"),
            "restart" if !running => {
                return Err(ApiError::bad_request(format!(
                    "instance \"{name}\" is not running: start it instead"
                )))
            }
            "restart" => ("Restarting instance", "restart"),
            "freeze" if status != RuntimeStatus::Running => {
                return Err(ApiError::bad_request(format!(
                    "instance \"{name}\" is not running: only a running instance can be frozen"
                )))
            }
            "freeze" => ("Freezing instance", "freeze"),
            "unfreeze" if status != RuntimeStatus::Frozen => {
                return Err(ApiError::bad_request(format!(
                    "instance \"{name}\" is not frozen"
                )))
            }
            "unfreeze" => ("Unfreezing instance", "unfreeze"),
            "" => return Err(ApiError::bad_request(
                "the request names no action: give \"action\": start, stop, restart, freeze or \
                 unfreeze",
            )),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown action \"{other}\": use start, stop, restart, freeze or unfreeze"
                )))
            }
        };
    // The intent is committed before the answer: a coved that dies now finishes it at boot.
    match action {
        "start" | "restart" => daemon
            .store
            .set_power(&name, Power::Running, &clock::now())?,
        "stop" => daemon
            .store
            .set_power(&name, Power::Stopped, &clock::now())?,
        _ => {}
    }
    let timeout = stop_timeout(&request);
    let operation = daemon.operations.create(
        Class::Task,
        description,
        resources(&name),
        Value::Object(Default::default()),
        false,
    );
    let action = action.to_string();
    Operations::run(operation.clone(), async move {
        let lock = daemon.instance_lock(&name);
        let _guard = lock.lock().await;
        let result: Result<(), DaemonError> = match action.as_str() {
            "start" => daemon.start_locked(&name).await,
            "stop" => daemon.stop_locked(&name, timeout).await,
            "restart" => {
                let result = daemon.stop_locked(&name, timeout).await;
                match result {
                    Ok(()) if daemon.store.instance(&name).is_ok() => {
                        let started = daemon.start_locked(&name).await;
                        if started.is_ok() {
                            daemon.events.lifecycle(
                                "instance-restarted",
                                &instance_url(&name),
                                BTreeMap::new(),
                            );
                        }
                        started
                    }
                    other => other,
                }
            }
            "freeze" => {
                let runtime = daemon.runtime.clone();
                let owned = name.clone();
                let result = blocking(move || runtime.freeze(&owned)).await;
                let result = result.and_then(|inner| inner.map_err(Into::into));
                if result.is_ok() {
                    daemon.events.lifecycle(
                        "instance-paused",
                        &instance_url(&name),
                        BTreeMap::new(),
                    );
                }
                result
            }
            _ => {
                let runtime = daemon.runtime.clone();
                let owned = name.clone();
                let result = blocking(move || runtime.unfreeze(&owned)).await;
                let result = result.and_then(|inner| inner.map_err(Into::into));
                if result.is_ok() {
                    daemon.events.lifecycle(
                        "instance-resumed",
                        &instance_url(&name),
                        BTreeMap::new(),
                    );
                }
                result
            }
        };
        result.map(|()| None).map_err(|error| error.to_string())
    });
    accepted(&operation)
}

fn raw(bytes: Vec<u8>, content_type: &'static str) -> Response {
    let mut response = bytes.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn console_log(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    let path = daemon
        .runtime
        .console_log(&daemon.instance_directory(&record(&daemon, &name)?)?);
    let bytes = tokio::fs::read(&path).await.unwrap_or_default();
    Ok(raw(bytes, "application/octet-stream"))
}

async fn clear_console(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    let path = daemon
        .runtime
        .console_log(&daemon.instance_directory(&record(&daemon, &name)?)?);
    if path.exists() {
        std::fs::File::create(&path).map_err(|error| {
            ApiError::new(500, format!("cannot clear the console log: {error}"))
        })?;
    }
    ok()
}

async fn console_attach(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    record(&daemon, &name)?;
    if daemon.runtime.is_virtual_machine(&name) {
        return super::vm_console::attach(daemon, name, body).await;
    }
    Err(ApiError::bad_request(format!(
        "attaching to the console of \"{name}\" is not supported yet: read its log with GET \
         /1.0/instances/{name}/console (lxc console {name} --show-log)"
    )))
}

/// A log file name: no path, nothing hidden.
fn valid_log_name(file: &str) -> bool {
    !file.is_empty()
        && !file.starts_with('.')
        && file
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

async fn logs(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    record(&daemon, &name)?;
    let mut files = vec!["console.log".to_string()];
    if let Ok(entries) = std::fs::read_dir(daemon.settings.logs().join(&name)) {
        let mut names: Vec<String> = entries
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|file| valid_log_name(file))
            .collect();
        names.sort();
        files.extend(names);
    }
    sync(list_urls(&format!("/1.0/instances/{name}/logs"), files))
}

fn log_path(daemon: &Daemon, name: &str, file: &str) -> Result<std::path::PathBuf, ApiError> {
    if !valid_log_name(file) {
        return Err(ApiError::bad_request(format!(
            "invalid log file name \"{file}\""
        )));
    }
    if file == "console.log" {
        let record = daemon.store.instance(name)?;
        return Ok(daemon
            .runtime
            .console_log(&daemon.instance_directory(&record)?));
    }
    Ok(daemon.settings.logs().join(name).join(file))
}

async fn log(
    State(daemon): State<Arc<Daemon>>,
    Path((name, file)): Path<(String, String)>,
) -> ApiResult {
    record(&daemon, &name)?;
    let path = log_path(&daemon, &name, &file)?;
    match tokio::fs::read(&path).await {
        Ok(bytes) => Ok(raw(bytes, "application/octet-stream")),
        Err(_) if file == "console.log" => Ok(raw(Vec::new(), "application/octet-stream")),
        Err(_) => Err(ApiError::not_found(format!(
            "log file \"{file}\" not found"
        ))),
    }
}

async fn delete_log(
    State(daemon): State<Arc<Daemon>>,
    Path((name, file)): Path<(String, String)>,
) -> ApiResult {
    record(&daemon, &name)?;
    if file == "console.log" {
        return Err(ApiError::bad_request(
            "the console log cannot be deleted: clear it with DELETE /console",
        ));
    }
    let path = log_path(&daemon, &name, &file)?;
    std::fs::remove_file(&path)
        .map_err(|_| ApiError::not_found(format!("log file \"{file}\" not found")))?;
    ok()
}

async fn backups(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    record(&daemon, &name)?;
    sync(Vec::<String>::new())
}
