//! `/1.0/storage-pools` (+ `/resources`) and their custom volumes
//! (`/1.0/storage-pools/<pool>/volumes[/custom[/<name>]]`). The host side is
//! `crate::storage`; each change takes one lock so that two requests never make or remove
//! the same pool or volume at once.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use super::{
    check_if_match, json_body, list_urls, ok, sync, sync_tagged, ApiError, ApiResult, Query,
};
use crate::api::storage::{
    ResourceUsage, StoragePoolResources, StoragePoolsPost, StoragePut, StorageVolume,
    StorageVolumesPost,
};
use crate::api::types;
use crate::clock;
use crate::daemon::{blocking, Daemon, DaemonError};
use crate::storage::{self, placement, pools, volumes, StorageError};
use crate::store::{StoragePoolRecord, StorageVolumeRecord, StoreError};

/// One change to pools or volumes at a time.
static CHANGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Pool keys fixed at creation.
const FIXED_POOL_KEYS: &[&str] = &["source", "size"];

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/1.0/storage-pools", get(list_pools).post(create_pool))
        .route(
            "/1.0/storage-pools/{pool}",
            get(pool)
                .put(replace_pool)
                .patch(patch_pool)
                .delete(delete_pool),
        )
        .route("/1.0/storage-pools/{pool}/resources", get(resources))
        .route(
            "/1.0/storage-pools/{pool}/volumes",
            get(list_volumes).post(create_volume),
        )
        .route(
            "/1.0/storage-pools/{pool}/volumes/custom",
            get(list_custom_volumes).post(create_volume),
        )
        .route(
            "/1.0/storage-pools/{pool}/volumes/custom/{volume}",
            get(volume)
                .put(replace_volume)
                .patch(patch_volume)
                .delete(delete_volume),
        )
}

fn pool_url(pool: &str) -> String {
    format!("/1.0/storage-pools/{pool}")
}

fn volume_url(pool: &str, volume: &str) -> String {
    format!("/1.0/storage-pools/{pool}/volumes/custom/{volume}")
}

fn pool_view(daemon: &Daemon, record: StoragePoolRecord) -> Result<types::StoragePool, ApiError> {
    let used_by = daemon.pool_users(&record.name)?;
    Ok(types::StoragePool {
        name: record.name,
        driver: record.driver,
        description: record.description,
        config: record.config,
        used_by,
        status: "Created".into(),
        locations: vec!["none".into()],
    })
}

fn pool_tag(record: &StoragePoolRecord) -> serde_json::Value {
    json!({"config": record.config, "description": record.description})
}

async fn list_pools(State(daemon): State<Arc<Daemon>>, query: Query) -> ApiResult {
    let records = daemon.store.storage_pools()?;
    if query.recursion() == 0 {
        return sync(list_urls(
            "/1.0/storage-pools",
            records.into_iter().map(|record| record.name),
        ));
    }
    let views = records
        .into_iter()
        .map(|record| pool_view(&daemon, record))
        .collect::<Result<Vec<_>, _>>()?;
    sync(views)
}

async fn create_pool(State(daemon): State<Arc<Daemon>>, body: Body) -> ApiResult {
    let request: StoragePoolsPost = json_body(body).await?;
    storage::validate_name("storage pool", &request.name).map_err(DaemonError::from)?;
    let _change = CHANGES.lock().await;
    match daemon.store.storage_pool(&request.name) {
        Ok(_) => {
            return Err(ApiError::new(
                409,
                format!("storage pool \"{}\" already exists", request.name),
            ))
        }
        Err(StoreError::NotFound { .. }) => {}
        Err(error) => return Err(error.into()),
    }
    let directory = daemon.settings.directory.clone();
    let (name, driver, config) = (
        request.name.clone(),
        request.driver.clone(),
        request.config.clone(),
    );
    let recorded = blocking(move || pools::create(&directory, &name, &driver, &config))
        .await?
        .map_err(DaemonError::from)?;
    let record = StoragePoolRecord {
        name: request.name.clone(),
        driver: request.driver,
        description: request.description,
        config: recorded,
    };
    if let Err(error) = daemon.store.create_storage_pool(&record) {
        let directory = daemon.settings.directory.clone();
        let undone = record.clone();
        let _ = blocking(move || pools::destroy(&directory, &undone.name, &undone.config)).await;
        return Err(error.into());
    }
    daemon.events.lifecycle(
        "storage-pool-created",
        &pool_url(&record.name),
        BTreeMap::new(),
    );
    ok()
}

async fn pool(State(daemon): State<Arc<Daemon>>, Path(pool): Path<String>) -> ApiResult {
    let record = daemon.store.storage_pool(&pool)?;
    let tag = pool_tag(&record);
    sync_tagged(pool_view(&daemon, record)?, &tag)
}

/// PUT replaces the user keys, PATCH merges them; `source` and `size` stay as made.
async fn update_pool(
    daemon: &Daemon,
    pool: &str,
    headers: &HeaderMap,
    request: StoragePut,
    merge: bool,
) -> ApiResult {
    let _change = CHANGES.lock().await;
    let mut record = daemon.store.storage_pool(pool)?;
    check_if_match(headers, &pool_tag(&record))?;
    if let Some(config) = request.config {
        for (key, value) in &config {
            if FIXED_POOL_KEYS.contains(&key.as_str()) {
                if record.config.get(key) != Some(value) {
                    return Err(ApiError::bad_request(format!(
                        "storage pool key \"{key}\" cannot be changed: it is fixed when the pool \
                         is made"
                    )));
                }
            } else if !key.starts_with("user.") {
                return Err(ApiError::bad_request(format!(
                    "unknown storage pool key \"{key}\": only user.* keys can be set"
                )));
            }
        }
        if !merge {
            record
                .config
                .retain(|key, _| FIXED_POOL_KEYS.contains(&key.as_str()));
        }
        record.config.extend(config);
    }
    if let Some(description) = request.description {
        record.description = description;
    }
    daemon.store.update_storage_pool(&record)?;
    daemon
        .events
        .lifecycle("storage-pool-updated", &pool_url(pool), BTreeMap::new());
    ok()
}

async fn replace_pool(
    State(daemon): State<Arc<Daemon>>,
    Path(pool): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request: StoragePut = json_body(body).await?;
    update_pool(&daemon, &pool, &headers, request, false).await
}

async fn patch_pool(
    State(daemon): State<Arc<Daemon>>,
    Path(pool): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request: StoragePut = json_body(body).await?;
    update_pool(&daemon, &pool, &headers, request, true).await
}

async fn delete_pool(State(daemon): State<Arc<Daemon>>, Path(pool): Path<String>) -> ApiResult {
    let _change = CHANGES.lock().await;
    let record = daemon.store.storage_pool(&pool)?;
    let users = daemon.pool_users(&pool)?;
    if !users.is_empty() {
        return Err(DaemonError::from(StorageError::InUse {
            what: format!("storage pool \"{pool}\""),
            users: users.join(", "),
        })
        .into());
    }
    let directory = daemon.settings.directory.clone();
    let config = record.config.clone();
    let name = pool.clone();
    blocking(move || pools::destroy(&directory, &name, &config))
        .await?
        .map_err(DaemonError::from)?;
    daemon.store.delete_storage_pool(&pool)?;
    daemon
        .events
        .lifecycle("storage-pool-deleted", &pool_url(&pool), BTreeMap::new());
    ok()
}

async fn resources(State(daemon): State<Arc<Daemon>>, Path(pool): Path<String>) -> ApiResult {
    daemon.store.storage_pool(&pool)?;
    let directory = daemon.pool_directory(&pool);
    let usage = blocking(move || pools::usage(&directory))
        .await?
        .map_err(DaemonError::from)?;
    sync(StoragePoolResources {
        space: ResourceUsage {
            used: usage.space_used,
            total: usage.space_total,
        },
        inodes: ResourceUsage {
            used: usage.inodes_used,
            total: usage.inodes_total,
        },
    })
}

// Volumes.

fn volume_view(daemon: &Daemon, record: StorageVolumeRecord) -> Result<StorageVolume, ApiError> {
    let used_by = daemon.volume_users(&record.pool, &record.name)?;
    Ok(StorageVolume {
        name: record.name,
        kind: "custom".into(),
        description: record.description,
        config: record.config,
        used_by,
        location: "none".into(),
        content_type: "filesystem".into(),
        project: "default".into(),
        created_at: record.created_at,
    })
}

fn volume_tag(record: &StorageVolumeRecord) -> serde_json::Value {
    json!({"config": record.config, "description": record.description})
}

/// The instances on the pool, as LXD lists their volumes (`container/<name>`).
fn instance_volumes(daemon: &Daemon, pool: &str) -> Result<Vec<StorageVolume>, ApiError> {
    let layers = daemon.profile_layers()?;
    let mut views = Vec::new();
    for record in daemon.store.instances()? {
        let view = daemon.instance_view_with(
            &record,
            crate::instances::runtime::RuntimeStatus::Stopped,
            &layers,
        );
        if placement::root_pool(&view.expanded_devices) != pool {
            continue;
        }
        views.push(StorageVolume {
            name: record.name.clone(),
            kind: if record.kind == "virtual-machine" {
                "virtual-machine".into()
            } else {
                "container".into()
            },
            description: String::new(),
            config: BTreeMap::new(),
            used_by: vec![format!("/1.0/instances/{}", record.name)],
            location: "none".into(),
            content_type: "filesystem".into(),
            project: "default".into(),
            created_at: record.created_at,
        });
    }
    Ok(views)
}

async fn list_volumes(
    State(daemon): State<Arc<Daemon>>,
    Path(pool): Path<String>,
    query: Query,
) -> ApiResult {
    daemon.store.storage_pool(&pool)?;
    let mut views = instance_volumes(&daemon, &pool)?;
    for record in daemon.store.storage_volumes(&pool)? {
        views.push(volume_view(&daemon, record)?);
    }
    if query.recursion() == 0 {
        return sync(
            views
                .iter()
                .map(|view| {
                    format!(
                        "/1.0/storage-pools/{pool}/volumes/{}/{}",
                        view.kind, view.name
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    sync(views)
}

async fn list_custom_volumes(
    State(daemon): State<Arc<Daemon>>,
    Path(pool): Path<String>,
    query: Query,
) -> ApiResult {
    daemon.store.storage_pool(&pool)?;
    let records = daemon.store.storage_volumes(&pool)?;
    if query.recursion() == 0 {
        return sync(list_urls(
            &format!("/1.0/storage-pools/{pool}/volumes/custom"),
            records.into_iter().map(|record| record.name),
        ));
    }
    let views = records
        .into_iter()
        .map(|record| volume_view(&daemon, record))
        .collect::<Result<Vec<_>, _>>()?;
    sync(views)
}

async fn create_volume(
    State(daemon): State<Arc<Daemon>>,
    Path(pool): Path<String>,
    body: Body,
) -> ApiResult {
    let request: StorageVolumesPost = json_body(body).await?;
    if !request.kind.is_empty() && request.kind != "custom" {
        return Err(ApiError::bad_request(format!(
            "volumes of type \"{}\" cannot be created: cove makes custom volumes",
            request.kind
        )));
    }
    if !request.content_type.is_empty() && request.content_type != "filesystem" {
        return Err(ApiError::bad_request(format!(
            "content type \"{}\" is not supported: cove's volumes are filesystem volumes",
            request.content_type
        )));
    }
    storage::validate_name("storage volume", &request.name).map_err(DaemonError::from)?;
    volumes::validate_config(&request.config).map_err(DaemonError::from)?;
    let _change = CHANGES.lock().await;
    let record = daemon.store.storage_pool(&pool)?;
    match daemon.store.storage_volume(&pool, &request.name) {
        Ok(_) => {
            return Err(ApiError::new(
                409,
                format!(
                    "storage volume \"{}\" already exists on pool \"{pool}\"",
                    request.name
                ),
            ))
        }
        Err(StoreError::NotFound { .. }) => {}
        Err(error) => return Err(error.into()),
    }
    // Owned by an unprivileged container's root, as LXD shifts a new volume.
    let owner = daemon.id_base(&BTreeMap::new())?;
    let pool_directory = daemon.pool_directory(&pool);
    let name = request.name.clone();
    let driver = record.driver.clone();
    let made = pool_directory.clone();
    blocking(move || volumes::create(&made, &driver, &name, owner))
        .await?
        .map_err(DaemonError::from)?;
    let volume = StorageVolumeRecord {
        pool: pool.clone(),
        name: request.name.clone(),
        description: request.description,
        config: request.config,
        created_at: clock::now(),
    };
    if let Err(error) = daemon.store.create_storage_volume(&volume) {
        let _ = volumes::remove(&pool_directory, &volume.name);
        return Err(error.into());
    }
    daemon.events.lifecycle(
        "storage-volume-created",
        &volume_url(&pool, &volume.name),
        BTreeMap::new(),
    );
    ok()
}

async fn volume(
    State(daemon): State<Arc<Daemon>>,
    Path((pool, volume)): Path<(String, String)>,
) -> ApiResult {
    let record = daemon.store.storage_volume(&pool, &volume)?;
    let tag = volume_tag(&record);
    sync_tagged(volume_view(&daemon, record)?, &tag)
}

async fn update_volume(
    daemon: &Daemon,
    pool: &str,
    volume: &str,
    headers: &HeaderMap,
    request: StoragePut,
    merge: bool,
) -> ApiResult {
    let _change = CHANGES.lock().await;
    let mut record = daemon.store.storage_volume(pool, volume)?;
    check_if_match(headers, &volume_tag(&record))?;
    if let Some(config) = request.config {
        volumes::validate_config(&config).map_err(DaemonError::from)?;
        if !merge {
            record.config.clear();
        }
        record.config.extend(config);
    }
    if let Some(description) = request.description {
        record.description = description;
    }
    daemon.store.update_storage_volume(&record)?;
    daemon.events.lifecycle(
        "storage-volume-updated",
        &volume_url(pool, volume),
        BTreeMap::new(),
    );
    ok()
}

async fn replace_volume(
    State(daemon): State<Arc<Daemon>>,
    Path((pool, volume)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request: StoragePut = json_body(body).await?;
    update_volume(&daemon, &pool, &volume, &headers, request, false).await
}

async fn patch_volume(
    State(daemon): State<Arc<Daemon>>,
    Path((pool, volume)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request: StoragePut = json_body(body).await?;
    update_volume(&daemon, &pool, &volume, &headers, request, true).await
}

async fn delete_volume(
    State(daemon): State<Arc<Daemon>>,
    Path((pool, volume)): Path<(String, String)>,
) -> ApiResult {
    let _change = CHANGES.lock().await;
    daemon.store.storage_volume(&pool, &volume)?;
    let users = daemon.volume_users(&pool, &volume)?;
    if !users.is_empty() {
        return Err(DaemonError::from(StorageError::InUse {
            what: format!("storage volume \"{volume}\""),
            users: users.join(", "),
        })
        .into());
    }
    let pool_directory = daemon.pool_directory(&pool);
    let name = volume.clone();
    blocking(move || volumes::remove(&pool_directory, &name))
        .await?
        .map_err(DaemonError::from)?;
    daemon.store.delete_storage_volume(&pool, &volume)?;
    daemon.events.lifecycle(
        "storage-volume-deleted",
        &volume_url(&pool, &volume),
        BTreeMap::new(),
    );
    ok()
}
