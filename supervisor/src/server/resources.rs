//! `/1.0` (server info) and `/1.0/profiles` (storage pools: `storage.rs`; networks:
//! `networks.rs`).

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use super::{
    check_if_match, json_body, list_urls, ok, sync, sync_tagged, ApiError, ApiResult, Query,
};
use crate::api::types::{
    self, ProfilePost, ProfilePut, ProfilesPost, Server, ServerEnvironment, StorageDriver,
};
use crate::daemon::{Daemon, API_EXTENSIONS};
use crate::instances::config;
use crate::store::ProfileRecord;

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route(
            "/1.0",
            get(server_info).put(server_update).patch(server_update),
        )
        .route("/1.0/profiles", get(profiles).post(create_profile))
        .route(
            "/1.0/profiles/{name}",
            get(profile)
                .put(replace_profile)
                .patch(patch_profile)
                .post(rename_profile)
                .delete(delete_profile),
        )
        .route("/1.0/certificates", get(empty_list))
        .route("/1.0/projects", get(projects))
        .route("/1.0/projects/{name}", get(project))
}

fn uname() -> (String, String, String) {
    // SAFETY: utsname is plain data; uname fills it with NUL-terminated strings.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid, writable utsname.
    if unsafe { libc::uname(&mut name) } != 0 {
        return ("Linux".into(), String::new(), "x86_64".into());
    }
    let text = |field: &[libc::c_char]| {
        // SAFETY: uname NUL-terminates every field within its array.
        unsafe { CStr::from_ptr(field.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    (
        text(&name.sysname),
        text(&name.release),
        text(&name.machine),
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|_| "cove".into())
}

fn os_release() -> (String, String) {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .map(|value| value.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    (field("NAME"), field("VERSION_ID"))
}

async fn server_info(State(daemon): State<Arc<Daemon>>) -> ApiResult {
    let (kernel, kernel_version, architecture) = uname();
    let (os_name, os_version) = os_release();
    let mut architectures = vec![architecture.clone()];
    if architecture == "x86_64" {
        architectures.push("i686".into());
    }
    let server = Server {
        config: BTreeMap::new(),
        api_extensions: API_EXTENSIONS.iter().map(|name| name.to_string()).collect(),
        api_status: "stable".into(),
        api_version: "1.0".into(),
        auth: "trusted".into(),
        auth_methods: vec!["tls".into()],
        public: false,
        environment: ServerEnvironment {
            addresses: Vec::new(),
            architectures,
            certificate: String::new(),
            certificate_fingerprint: String::new(),
            driver: "cove".into(),
            driver_version: env!("CARGO_PKG_VERSION").into(),
            firewall: String::new(),
            kernel,
            kernel_architecture: architecture,
            kernel_features: BTreeMap::new(),
            kernel_version,
            lxc_features: BTreeMap::new(),
            os_name,
            os_version,
            project: "default".into(),
            server: "cove".into(),
            server_clustered: false,
            server_event_mode: "full-mesh".into(),
            server_name: hostname(),
            server_pid: std::process::id(),
            server_version: "5.0.2".into(),
            storage: "dir".into(),
            storage_version: "1".into(),
            storage_supported_drivers: crate::storage::DRIVERS
                .iter()
                .map(|driver| StorageDriver {
                    name: driver.to_string(),
                    version: "1".into(),
                    remote: false,
                })
                .collect(),
        },
    };
    let _ = daemon;
    sync(server)
}

/// Server configuration: coved has no server keys; an empty config is accepted.
async fn server_update(body: Body) -> ApiResult {
    let request: Value = json_body(body).await?;
    match request.get("config").and_then(Value::as_object) {
        Some(config) if !config.is_empty() => {
            let key = config.keys().next().cloned().unwrap_or_default();
            Err(ApiError::bad_request(format!(
                "unknown server configuration key \"{key}\": coved has no server keys"
            )))
        }
        _ => ok(),
    }
}

async fn empty_list() -> ApiResult {
    sync(Vec::<String>::new())
}

fn default_project() -> Value {
    json!({
        "name": "default",
        "description": "Default project",
        "config": {"features.images": "true", "features.profiles": "true"},
        "used_by": [],
    })
}

async fn projects(query: Query) -> ApiResult {
    if query.recursion() > 0 {
        sync([default_project()])
    } else {
        sync(["/1.0/projects/default"])
    }
}

async fn project(Path(name): Path<String>) -> ApiResult {
    if name == "default" {
        sync(default_project())
    } else {
        Err(ApiError::not_found(format!("project \"{name}\" not found")))
    }
}

// Profiles.

fn validate_profile_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty()
        || name.len() > 63
        || name.contains('/')
        || name.contains(char::is_whitespace)
        || name == "."
        || name == ".."
    {
        return Err(ApiError::bad_request(format!(
            "invalid profile name \"{name}\": use 1 to 63 characters without slashes or spaces"
        )));
    }
    Ok(())
}

fn profile_view(daemon: &Daemon, record: ProfileRecord) -> Result<types::Profile, ApiError> {
    let used_by = daemon
        .store
        .instances()?
        .into_iter()
        .filter(|instance| instance.profiles.contains(&record.name))
        .map(|instance| format!("/1.0/instances/{}", instance.name))
        .collect();
    Ok(types::Profile {
        name: record.name,
        description: record.description,
        config: record.config,
        devices: record.devices,
        used_by,
    })
}

/// The writable part of a profile, for its ETag.
fn profile_etag(record: &ProfileRecord) -> Value {
    json!({"config": record.config, "description": record.description, "devices": record.devices})
}

async fn profiles(State(daemon): State<Arc<Daemon>>, query: Query) -> ApiResult {
    let records = daemon.store.profiles()?;
    if query.recursion() == 0 {
        return sync(list_urls(
            "/1.0/profiles",
            records.into_iter().map(|record| record.name),
        ));
    }
    let views = records
        .into_iter()
        .map(|record| profile_view(&daemon, record))
        .collect::<Result<Vec<_>, _>>()?;
    sync(views)
}

async fn create_profile(State(daemon): State<Arc<Daemon>>, body: Body) -> ApiResult {
    let request: ProfilesPost = json_body(body).await?;
    validate_profile_name(&request.name)?;
    config::validate_keys(&request.config)
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    config::validate_devices(&request.devices)
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    daemon.validate_storage_devices(&request.devices)?;
    daemon.store.create_profile(&ProfileRecord {
        name: request.name.clone(),
        description: request.description,
        config: request.config,
        devices: request.devices,
    })?;
    daemon.events.lifecycle(
        "profile-created",
        &format!("/1.0/profiles/{}", request.name),
        BTreeMap::new(),
    );
    ok()
}

async fn profile(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    let record = daemon.store.profile(&name)?;
    let tag = profile_etag(&record);
    sync_tagged(profile_view(&daemon, record)?, &tag)
}

async fn update_profile(
    daemon: &Daemon,
    name: &str,
    headers: &HeaderMap,
    request: ProfilePut,
    patch: bool,
) -> ApiResult {
    let mut record = daemon.store.profile(name)?;
    check_if_match(headers, &profile_etag(&record))?;
    if let Some(description) = request.description {
        record.description = description;
    }
    match (request.config, patch) {
        (Some(config), true) => record.config.extend(config),
        (Some(config), false) => record.config = config,
        (None, false) => record.config.clear(),
        (None, true) => {}
    }
    match (request.devices, patch) {
        (Some(devices), true) => record.devices.extend(devices),
        (Some(devices), false) => record.devices = devices,
        (None, false) => record.devices.clear(),
        (None, true) => {}
    }
    record.config.retain(|_, value| !value.is_empty());
    config::validate_keys(&record.config)
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    config::validate_devices(&record.devices)
        .map_err(|error| ApiError::bad_request(error.to_string()))?;
    daemon.validate_storage_devices(&record.devices)?;
    daemon.check_pools_kept_with_profile(&record)?;
    daemon.store.update_profile(&record)?;
    daemon.events.lifecycle(
        "profile-updated",
        &format!("/1.0/profiles/{name}"),
        BTreeMap::new(),
    );
    ok()
}

async fn replace_profile(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request: ProfilePut = json_body(body).await?;
    update_profile(&daemon, &name, &headers, request, false).await
}

async fn patch_profile(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request: ProfilePut = json_body(body).await?;
    update_profile(&daemon, &name, &headers, request, true).await
}

async fn rename_profile(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    let request: ProfilePost = json_body(body).await?;
    if name == "default" {
        return Err(ApiError::bad_request(
            "the default profile cannot be renamed",
        ));
    }
    validate_profile_name(&request.name)?;
    daemon.store.rename_profile(&name, &request.name)?;
    daemon.events.lifecycle(
        "profile-renamed",
        &format!("/1.0/profiles/{}", request.name),
        BTreeMap::from([("old_name".to_string(), Value::from(name))]),
    );
    ok()
}

async fn delete_profile(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    if name == "default" {
        return Err(ApiError::bad_request(
            "the default profile cannot be deleted",
        ));
    }
    let record = daemon.store.profile(&name)?;
    let view = profile_view(&daemon, record)?;
    if !view.used_by.is_empty() {
        return Err(ApiError::bad_request(format!(
            "profile \"{name}\" is in use by {}: remove it from them first",
            view.used_by.join(", ")
        )));
    }
    daemon.store.delete_profile(&name)?;
    daemon.events.lifecycle(
        "profile-deleted",
        &format!("/1.0/profiles/{name}"),
        BTreeMap::new(),
    );
    ok()
}
