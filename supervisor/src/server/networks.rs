//! `/1.0/networks`: coved's managed bridge networks (create, change, delete, state, leases)
//! and, listed beside them as LXD lists them, the namespace's other interfaces (unmanaged,
//! read only). The rules live in `crate::networks`; this file parses and answers.

use std::collections::BTreeMap;
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
use crate::api::types::{self, NetworkPut, NetworksPost};
use crate::daemon::{blocking, Daemon};
use crate::networks::{host, NetworkError};
use crate::store::{NetworkRecord, StoreError};

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/1.0/networks", get(networks).post(create_network))
        .route(
            "/1.0/networks/{name}",
            get(network)
                .put(replace_network)
                .patch(patch_network)
                .post(rename_network)
                .delete(delete_network),
        )
        .route("/1.0/networks/{name}/state", get(network_state))
        .route("/1.0/networks/{name}/leases", get(network_leases))
}

/// What `lxc network list` shows for a host interface.
fn interface_kind(name: &str) -> &'static str {
    let base = std::path::Path::new("/sys/class/net").join(name);
    if name == "lo" {
        "loopback"
    } else if base.join("bridge").exists() {
        "bridge"
    } else if base.join("bonding").exists() {
        "bond"
    } else if base.join("device").exists() {
        "physical"
    } else {
        "unknown"
    }
}

fn unmanaged_view(name: &str) -> types::Network {
    types::Network {
        name: name.to_string(),
        description: String::new(),
        kind: interface_kind(name).to_string(),
        managed: false,
        config: BTreeMap::new(),
        used_by: Vec::new(),
        status: String::new(),
        locations: Vec::new(),
    }
}

fn managed_view(daemon: &Daemon, record: NetworkRecord) -> Result<types::Network, ApiError> {
    let used_by = daemon.network_used_by(&record.name)?;
    Ok(types::Network {
        name: record.name,
        description: record.description,
        kind: "bridge".into(),
        managed: true,
        config: record.config,
        used_by,
        status: "Created".into(),
        locations: vec!["none".into()],
    })
}

/// The writable part of a network, for its ETag.
fn network_etag(record: &NetworkRecord) -> Value {
    json!({"config": record.config, "description": record.description})
}

/// The managed networks, then the interfaces that are none of theirs.
fn all_networks(daemon: &Daemon) -> Result<(Vec<NetworkRecord>, Vec<String>), ApiError> {
    let records = daemon.store.networks()?;
    let interfaces = host::interfaces()
        .into_iter()
        .filter(|name| !records.iter().any(|record| &record.name == name))
        .collect();
    Ok((records, interfaces))
}

async fn networks(State(daemon): State<Arc<Daemon>>, query: Query) -> ApiResult {
    let (records, interfaces) = all_networks(&daemon)?;
    if query.recursion() == 0 {
        let names = records
            .into_iter()
            .map(|record| record.name)
            .chain(interfaces);
        return sync(list_urls("/1.0/networks", names));
    }
    let mut views = records
        .into_iter()
        .map(|record| managed_view(&daemon, record))
        .collect::<Result<Vec<_>, _>>()?;
    views.extend(interfaces.iter().map(|name| unmanaged_view(name)));
    sync(views)
}

async fn create_network(State(daemon): State<Arc<Daemon>>, body: Body) -> ApiResult {
    let request: NetworksPost = json_body(body).await?;
    let working = daemon.clone();
    blocking(move || {
        working.create_network(
            &request.name,
            &request.description,
            &request.kind,
            request.config,
        )
    })
    .await??;
    ok()
}

async fn network(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    match daemon.store.network(&name) {
        Ok(record) => {
            let tag = network_etag(&record);
            sync_tagged(managed_view(&daemon, record)?, &tag)
        }
        Err(StoreError::NotFound { .. }) if host::interface_exists(&name) => {
            sync(unmanaged_view(&name))
        }
        Err(StoreError::NotFound { .. }) => Err(not_found(&name)),
        Err(error) => Err(error.into()),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(NetworkError::NotFound(name.to_string()).to_string())
}

/// The managed network's record; a host interface is refused (it is not coved's to change).
fn managed(daemon: &Daemon, name: &str) -> Result<NetworkRecord, ApiError> {
    match daemon.store.network(name) {
        Ok(record) => Ok(record),
        Err(StoreError::NotFound { .. }) if host::interface_exists(name) => Err(
            ApiError::bad_request(NetworkError::NotManaged(name.to_string()).to_string()),
        ),
        Err(StoreError::NotFound { .. }) => Err(not_found(name)),
        Err(error) => Err(error.into()),
    }
}

async fn update_network(
    daemon: Arc<Daemon>,
    name: String,
    headers: HeaderMap,
    body: Body,
    patch: bool,
) -> ApiResult {
    let request: NetworkPut = json_body(body).await?;
    let record = managed(&daemon, &name)?;
    check_if_match(&headers, &network_etag(&record))?;
    blocking(move || daemon.update_network(&name, request.description, request.config, patch))
        .await??;
    ok()
}

async fn replace_network(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    update_network(daemon, name, headers, body, false).await
}

async fn patch_network(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    update_network(daemon, name, headers, body, true).await
}

async fn rename_network(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    managed(&daemon, &name)?;
    Err(ApiError::bad_request(NetworkError::Rename.to_string()))
}

async fn delete_network(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    managed(&daemon, &name)?;
    blocking(move || daemon.delete_network(&name)).await??;
    ok()
}

async fn network_state(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    let state = blocking(move || daemon.network_state(&name)).await??;
    sync(state)
}

async fn network_leases(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    managed(&daemon, &name)?;
    sync(daemon.network_leases(&name)?)
}
