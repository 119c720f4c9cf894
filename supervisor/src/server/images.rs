//! `/1.0/images` and `/1.0/images/aliases`: import as `lxc image import` and pylxd send images
//! (the raw bytes of a unified tarball, or `multipart/form-data` with a `metadata` and a
//! `rootfs` part, or for a VM image a `rootfs.img` part, with `X-LXD-public`,
//! `X-LXD-filename` and `X-LXD-properties`), list, show, update, delete, and aliases. An
//! image's type (`container` or `virtual-machine`) is what it holds: a rootfs or a disk
//! (`crate::images::machine`).
//!
//! An upload is streamed to a staging file while hashed, refused past `--max-image-size`,
//! unpacked, moved into place and recorded, all before the answer: a bad upload is a 4xx
//! error and leaves nothing behind. The answer is an operation that has already succeeded,
//! with `metadata.fingerprint` as LXD's.

use std::collections::BTreeMap;
use std::path::{Path as FilePath, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, State};
use axum::http::{header, HeaderMap, Request};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use super::instances::find_image;
use super::{
    accepted, check_if_match, json_body, list_urls, ok, percent_decode, sync, sync_tagged,
    ApiError, ApiResult, Query,
};
use crate::api::types::{
    self, ImageAlias, ImageAliasesEntry, ImageAliasesEntryPost, ImageAliasesEntryPut,
    ImageAliasesPost, ImagePut,
};
use crate::clock;
use crate::daemon::{blocking, Daemon};
use crate::images::{self, machine, Fingerprinter, ImageError};
use crate::operations::Class;
use crate::store::{AliasRecord, ImageRecord, StoreError};

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/1.0/images", get(list).post(create))
        .route("/1.0/images/aliases", get(aliases).post(create_alias))
        .route(
            "/1.0/images/aliases/{*name}",
            get(alias)
                .put(replace_alias)
                .patch(patch_alias)
                .post(rename_alias)
                .delete(delete_alias),
        )
        .route(
            "/1.0/images/{fingerprint}",
            get(show).put(replace).patch(patch).delete(delete),
        )
        .route("/1.0/images/{fingerprint}/export", get(export))
        .route("/1.0/images/{fingerprint}/refresh", post(unsupported))
        .route("/1.0/images/{fingerprint}/secret", post(unsupported))
}

impl From<ImageError> for ApiError {
    fn from(error: ImageError) -> Self {
        let status = match error {
            ImageError::TooLarge { .. } => 413,
            ImageError::Empty | ImageError::Format(_) => 400,
            ImageError::Io { .. } => 500,
        };
        ApiError::new(status, error.to_string())
    }
}

fn image_view(daemon: &Daemon, record: ImageRecord) -> Result<types::Image, ApiError> {
    let aliases = daemon
        .store
        .aliases()?
        .into_iter()
        .filter(|alias| alias.fingerprint == record.fingerprint)
        .map(|alias| ImageAlias {
            name: alias.name,
            description: alias.description,
        })
        .collect();
    Ok(types::Image {
        aliases,
        architecture: record.architecture,
        auto_update: record.auto_update,
        cached: false,
        fingerprint: record.fingerprint,
        filename: record.filename,
        properties: record.properties,
        public: record.public,
        size: record.size,
        created_at: record.created_at,
        expires_at: "0001-01-01T00:00:00Z".into(),
        last_used_at: record.last_used_at,
        uploaded_at: record.uploaded_at,
        kind: record.kind,
        profiles: vec!["default".into()],
        update_source: None,
    })
}

fn image_etag(record: &ImageRecord) -> Value {
    json!({"auto_update": record.auto_update, "properties": record.properties, "public": record.public})
}

async fn list(State(daemon): State<Arc<Daemon>>, query: Query) -> ApiResult {
    let records = daemon.store.images()?;
    if query.recursion() == 0 {
        return sync(list_urls(
            "/1.0/images",
            records.into_iter().map(|record| record.fingerprint),
        ));
    }
    let views = records
        .into_iter()
        .map(|record| image_view(&daemon, record))
        .collect::<Result<Vec<_>, _>>()?;
    sync(views)
}

async fn show(State(daemon): State<Arc<Daemon>>, Path(fingerprint): Path<String>) -> ApiResult {
    let fingerprint = find_image(&daemon, &fingerprint)?;
    let record = daemon.store.image(&fingerprint)?;
    let tag = image_etag(&record);
    sync_tagged(image_view(&daemon, record)?, &tag)
}

async fn update(
    daemon: &Daemon,
    fingerprint: &str,
    headers: &HeaderMap,
    request: ImagePut,
    patch: bool,
) -> ApiResult {
    let fingerprint = find_image(daemon, fingerprint)?;
    let mut record = daemon.store.image(&fingerprint)?;
    check_if_match(headers, &image_etag(&record))?;
    match (request.properties, patch) {
        (Some(properties), true) => record.properties.extend(properties),
        (Some(properties), false) => record.properties = properties,
        (None, false) => record.properties.clear(),
        (None, true) => {}
    }
    if let Some(public) = request.public {
        record.public = public;
    }
    if let Some(auto_update) = request.auto_update {
        record.auto_update = auto_update;
    }
    daemon.store.update_image(&record)?;
    daemon.events.lifecycle(
        "image-updated",
        &format!("/1.0/images/{fingerprint}"),
        BTreeMap::new(),
    );
    ok()
}

async fn replace(
    State(daemon): State<Arc<Daemon>>,
    Path(fingerprint): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request: ImagePut = json_body(body).await?;
    update(&daemon, &fingerprint, &headers, request, false).await
}

async fn patch(
    State(daemon): State<Arc<Daemon>>,
    Path(fingerprint): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request: ImagePut = json_body(body).await?;
    update(&daemon, &fingerprint, &headers, request, true).await
}

async fn delete(State(daemon): State<Arc<Daemon>>, Path(fingerprint): Path<String>) -> ApiResult {
    let fingerprint = find_image(&daemon, &fingerprint)?;
    let users: Vec<String> = daemon
        .store
        .instances()?
        .into_iter()
        .filter(|instance| instance.image == fingerprint)
        .map(|instance| instance.name)
        .collect();
    if !users.is_empty() {
        return Err(ApiError::bad_request(format!(
            "image {fingerprint} is in use by instance(s) {}: their snapshots need it; delete \
             them first",
            users.join(", ")
        )));
    }
    daemon.store.delete_image(&fingerprint)?;
    let directory = images::image_directory(&daemon.settings.images(), &fingerprint);
    // Move it aside at once, remove it in the background.
    let doomed = daemon
        .settings
        .staging()
        .join(format!("deleted-{fingerprint}"));
    let _ = std::fs::create_dir_all(daemon.settings.staging());
    let target = if std::fs::rename(&directory, &doomed).is_ok() {
        doomed
    } else {
        directory
    };
    let _ = blocking(move || std::fs::remove_dir_all(target)).await;
    let pools = daemon.clone();
    let owned = fingerprint.clone();
    let _ = blocking(move || pools.remove_image_from_pools(&owned)).await;
    daemon.events.lifecycle(
        "image-deleted",
        &format!("/1.0/images/{fingerprint}"),
        BTreeMap::new(),
    );
    let operation = daemon.operations.create(
        Class::Task,
        "Deleting image",
        BTreeMap::from([(
            "images".to_string(),
            vec![format!("/1.0/images/{fingerprint}")],
        )]),
        Value::Object(Default::default()),
        false,
    );
    operation.succeed(None);
    accepted(&operation)
}

async fn export(Path(fingerprint): Path<String>) -> ApiResult {
    Err(ApiError::bad_request(format!(
        "exporting images is not supported: coved keeps image {fingerprint} unpacked, not as \
         the uploaded file"
    )))
}

async fn unsupported() -> ApiResult {
    Err(ApiError::bad_request(
        "image refresh and secrets are not supported: coved has no remote image servers",
    ))
}

/// Removes a staging directory unless disarmed.
struct Staging {
    path: Option<PathBuf>,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// Streams `stream` into `path`, hashing it and counting toward `limit`.
async fn receive<S, E>(
    mut stream: S,
    path: &FilePath,
    fingerprinter: &mut Fingerprinter,
    limit: u64,
) -> Result<u64, ApiError>
where
    S: futures_util::Stream<Item = Result<axum::body::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|error| ApiError::new(500, format!("cannot stage the upload: {error}")))?;
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|error| ApiError::bad_request(format!("the upload broke off: {error}")))?;
        fingerprinter.update(&chunk);
        size += chunk.len() as u64;
        if fingerprinter.size() > limit {
            super::drain(&mut stream).await;
            return Err(ImageError::TooLarge { limit }.into());
        }
        file.write_all(&chunk)
            .await
            .map_err(|error| ApiError::new(500, format!("cannot stage the upload: {error}")))?;
    }
    file.flush()
        .await
        .map_err(|error| ApiError::new(500, format!("cannot stage the upload: {error}")))?;
    Ok(size)
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

async fn create(State(daemon): State<Arc<Daemon>>, request: Request<Body>) -> ApiResult {
    // The request's parts stay whole for the multipart reader: they carry the body limit the
    // router lifted (without it, a part is cut off at 2 MiB).
    let (parts, body) = request.into_parts();
    let headers = parts.headers.clone();
    let content_type = header_text(&headers, header::CONTENT_TYPE.as_str())
        .unwrap_or("application/octet-stream")
        .to_string();
    if content_type.starts_with("application/json") {
        let request: Value = json_body(body).await?;
        let kind = request
            .pointer("/source/type")
            .and_then(Value::as_str)
            .unwrap_or("");
        return Err(ApiError::bad_request(match kind {
            "instance" | "container" | "snapshot" => {
                "publishing instances as images is not supported yet".to_string()
            }
            "" => "the request holds no image: upload the image file as the request body \
                   (lxc image import FILE)"
                .to_string(),
            other => format!(
                "image source \"{other}\" is not supported: coved cannot download images; \
                 upload the file with `lxc image import`"
            ),
        }));
    }
    let limit = daemon.settings.max_image_size;
    let staging = daemon.settings.staging().join(clock::uuid());
    std::fs::create_dir_all(&staging)
        .map_err(|error| ApiError::new(500, format!("cannot stage the upload: {error}")))?;
    let mut guard = Staging {
        path: Some(staging.clone()),
    };
    let mut fingerprinter = Fingerprinter::default();
    let metadata_file = staging.join("upload.metadata");
    let unpacked = staging.join("unpacked");
    let mut rootfs_file = None;
    let mut filename = header_text(&headers, "x-lxd-filename").map(str::to_string);
    if content_type.starts_with("multipart/form-data") {
        let request = Request::from_parts(parts, body);
        let mut multipart = Multipart::from_request(request, &())
            .await
            .map_err(|error| ApiError::bad_request(format!("invalid multipart upload: {error}")))?;
        let mut seen_metadata = false;
        let mut disk_part = false;
        loop {
            let field = multipart.next_field().await.map_err(|error| {
                ApiError::bad_request(format!("invalid multipart upload: {error}"))
            })?;
            let Some(field) = field else { break };
            let name = field.name().unwrap_or_default().to_string();
            match name.as_str() {
                "metadata" if !seen_metadata => {
                    if filename.is_none() {
                        filename = field.file_name().map(str::to_string);
                    }
                    receive(field, &metadata_file, &mut fingerprinter, limit).await?;
                    seen_metadata = true;
                }
                "rootfs" if seen_metadata && rootfs_file.is_none() && !disk_part => {
                    let path = staging.join("upload.rootfs");
                    receive(field, &path, &mut fingerprinter, limit).await?;
                    rootfs_file = Some(path);
                }
                machine::DISK_FILE if seen_metadata && rootfs_file.is_none() && !disk_part => {
                    // Received straight into the unpacked image: it is kept as it came.
                    std::fs::create_dir_all(&unpacked).map_err(|error| {
                        ApiError::new(500, format!("cannot stage the upload: {error}"))
                    })?;
                    let path = unpacked.join(machine::DISK_FILE);
                    receive(field, &path, &mut fingerprinter, limit).await?;
                    disk_part = true;
                }
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unexpected part \"{other}\" in the multipart upload: send \"metadata\" \
                         first, then \"rootfs\" (or \"rootfs.img\" for a VM image)"
                    )))
                }
            }
        }
        if !seen_metadata {
            return Err(ApiError::bad_request(
                "the multipart upload has no \"metadata\" part",
            ));
        }
    } else {
        receive(
            body.into_data_stream(),
            &metadata_file,
            &mut fingerprinter,
            limit,
        )
        .await?;
    }
    let size = fingerprinter.size();
    if size == 0 {
        return Err(ImageError::Empty.into());
    }
    let fingerprint = fingerprinter.finish();
    if daemon.store.image(&fingerprint).is_ok() {
        return Err(ApiError::new(
            409,
            format!("image with fingerprint {fingerprint} already exists"),
        ));
    }
    let metadata = {
        let (unpacked, metadata_file, rootfs_file) =
            (unpacked.clone(), metadata_file.clone(), rootfs_file.clone());
        blocking(move || images::unpack(&unpacked, &metadata_file, rootfs_file.as_deref()))
            .await??
    };
    let kind = if machine::is_machine_image(&unpacked) {
        machine::KIND
    } else {
        "container"
    };
    let directory = images::image_directory(&daemon.settings.images(), &fingerprint);
    if std::fs::rename(&unpacked, &directory).is_err() {
        return Err(ApiError::new(
            409,
            format!("image with fingerprint {fingerprint} already exists (uploaded concurrently)"),
        ));
    }
    let mut properties = metadata.properties.clone();
    if let Some(extra) = header_text(&headers, "x-lxd-properties") {
        for pair in extra.split('&') {
            if let Some((key, value)) = pair.split_once('=') {
                properties.insert(percent_decode(key), percent_decode(value));
            }
        }
    }
    let public = matches!(
        header_text(&headers, "x-lxd-public"),
        Some("true" | "1" | "yes")
    );
    let now = clock::now();
    let record = ImageRecord {
        fingerprint: fingerprint.clone(),
        filename: filename.unwrap_or_default(),
        size,
        architecture: images::normalize_architecture(&metadata.architecture),
        kind: kind.into(),
        properties,
        public,
        auto_update: false,
        created_at: metadata
            .creation_date
            .filter(|seconds| *seconds > 0)
            .map(|seconds| clock::format_timestamp(seconds, 0))
            .unwrap_or_else(|| now.clone()),
        uploaded_at: now.clone(),
        last_used_at: "0001-01-01T00:00:00Z".into(),
    };
    if let Err(error) = daemon.store.create_image(&record) {
        let _ = std::fs::remove_dir_all(&directory);
        return Err(match error {
            StoreError::AlreadyExists { .. } => ApiError::new(
                409,
                format!("image with fingerprint {fingerprint} already exists"),
            ),
            other => other.into(),
        });
    }
    drop(guard.path.take().map(std::fs::remove_dir_all));
    daemon.events.lifecycle(
        "image-created",
        &format!("/1.0/images/{fingerprint}"),
        BTreeMap::new(),
    );
    let operation = daemon.operations.create(
        Class::Task,
        "Importing image",
        BTreeMap::from([(
            "images".to_string(),
            vec![format!("/1.0/images/{fingerprint}")],
        )]),
        Value::Object(Default::default()),
        false,
    );
    operation.succeed(Some(json!({"fingerprint": fingerprint, "size": size})));
    accepted(&operation)
}

// Aliases.

fn validate_alias_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty()
        || name.len() > 255
        || name.trim() != name
        || name.chars().any(|c| c.is_control() || c == '?' || c == '#')
    {
        return Err(ApiError::bad_request(format!(
            "invalid alias name \"{name}\": give 1 to 255 printable characters"
        )));
    }
    Ok(())
}

fn alias_view(daemon: &Daemon, alias: AliasRecord) -> ImageAliasesEntry {
    let kind = daemon
        .store
        .image(&alias.fingerprint)
        .map(|image| image.kind)
        .unwrap_or_else(|_| "container".into());
    ImageAliasesEntry {
        name: alias.name,
        description: alias.description,
        target: alias.fingerprint,
        kind,
    }
}

fn alias_record(daemon: &Daemon, name: &str) -> Result<AliasRecord, ApiError> {
    daemon.store.alias(name).map_err(|error| match error {
        StoreError::NotFound { .. } => {
            ApiError::not_found(format!("image alias \"{name}\" not found"))
        }
        other => other.into(),
    })
}

async fn aliases(State(daemon): State<Arc<Daemon>>, query: Query) -> ApiResult {
    let records = daemon.store.aliases()?;
    if query.recursion() == 0 {
        return sync(list_urls(
            "/1.0/images/aliases",
            records.into_iter().map(|alias| alias.name),
        ));
    }
    sync(
        records
            .into_iter()
            .map(|alias| alias_view(&daemon, alias))
            .collect::<Vec<_>>(),
    )
}

async fn create_alias(State(daemon): State<Arc<Daemon>>, body: Body) -> ApiResult {
    let request: ImageAliasesPost = json_body(body).await?;
    validate_alias_name(&request.name)?;
    let fingerprint = find_image(&daemon, &request.target)?;
    daemon
        .store
        .create_alias(&AliasRecord {
            name: request.name.clone(),
            fingerprint,
            description: request.description,
        })
        .map_err(|error| match error {
            StoreError::AlreadyExists { .. } => ApiError::new(
                409,
                format!("image alias \"{}\" already exists", request.name),
            ),
            other => other.into(),
        })?;
    ok()
}

async fn alias(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    let record = alias_record(&daemon, &name)?;
    let tag = json!({"description": record.description, "target": record.fingerprint});
    sync_tagged(alias_view(&daemon, record), &tag)
}

async fn update_alias(
    daemon: &Daemon,
    name: &str,
    headers: &HeaderMap,
    request: ImageAliasesEntryPut,
    patch: bool,
) -> ApiResult {
    let mut record = alias_record(daemon, name)?;
    check_if_match(
        headers,
        &json!({"description": record.description, "target": record.fingerprint}),
    )?;
    match request.target {
        Some(target) => record.fingerprint = find_image(daemon, &target)?,
        None if !patch => {
            return Err(ApiError::bad_request(
                "the alias needs a \"target\" image fingerprint",
            ))
        }
        None => {}
    }
    if let Some(description) = request.description {
        record.description = description;
    } else if !patch {
        record.description.clear();
    }
    daemon.store.update_alias(&record)?;
    ok()
}

async fn replace_alias(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request: ImageAliasesEntryPut = json_body(body).await?;
    update_alias(&daemon, &name, &headers, request, false).await
}

async fn patch_alias(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let request: ImageAliasesEntryPut = json_body(body).await?;
    update_alias(&daemon, &name, &headers, request, true).await
}

async fn rename_alias(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    let request: ImageAliasesEntryPost = json_body(body).await?;
    validate_alias_name(&request.name)?;
    alias_record(&daemon, &name)?;
    daemon
        .store
        .rename_alias(&name, &request.name)
        .map_err(|error| match error {
            StoreError::AlreadyExists { .. } => ApiError::new(
                409,
                format!("image alias \"{}\" already exists", request.name),
            ),
            other => other.into(),
        })?;
    ok()
}

async fn delete_alias(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    alias_record(&daemon, &name)?;
    daemon.store.delete_alias(&name)?;
    ok()
}
