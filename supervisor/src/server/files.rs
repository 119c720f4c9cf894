//! `/1.0/instances/<name>/files?path=`: read (GET), write (POST) and delete (DELETE) files in
//! a running instance, with LXD's headers `X-LXD-uid`, `X-LXD-gid`, `X-LXD-mode`, `X-LXD-type`
//! (`file`, `directory`, `symlink`) and `X-LXD-write` (`overwrite`, `append`).
//!
//! Paths are resolved with `openat2(RESOLVE_IN_ROOT)` against the instance's root as mounted on
//! the host, so no symlink inside the instance can lead outside it; a path with a `..`
//! component is refused outright. Owners are the instance's ids, translated through its id map
//! to the host's.

use std::ffi::{CStr, CString};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use super::{ok, sync, ApiError, ApiResult, Query};
use crate::daemon::{blocking, Daemon};
use crate::instances::runtime::RuntimeStatus;

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` beneath `root` as if `root` were `/`.
fn open_in_root(root: &OwnedFd, path: &CStr, flags: i32) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    loop {
        // SAFETY: `path` is NUL-terminated and `how` is a valid open_how of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: openat2 returned a new fd that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EAGAIN) && error.kind() != io::ErrorKind::Interrupted
        {
            return Err(error);
        }
    }
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[derive(Debug)]
struct FileError(u16, String);

impl From<FileError> for ApiError {
    fn from(error: FileError) -> Self {
        ApiError::new(error.0, error.1)
    }
}

fn io_failure(path: &str, doing: &str, error: io::Error) -> FileError {
    let status = match error.raw_os_error() {
        Some(libc::ENOENT) => 404,
        Some(libc::ELOOP | libc::ENOTDIR | libc::EISDIR | libc::ENOTEMPTY | libc::EEXIST) => 400,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => 403,
        _ => 500,
    };
    FileError(status, format!("cannot {doing} {path}: {error}"))
}

/// A path in the instance, checked: absolute, no `..`, no NUL.
struct InstancePath {
    text: String,
    parent: CString,
    base: CString,
}

fn parse_path(query: &Query) -> Result<InstancePath, ApiError> {
    let given = query.get("path").unwrap_or_default();
    if given.is_empty() {
        return Err(ApiError::bad_request(
            "the request names no file: give ?path=/absolute/path/in/the/instance",
        ));
    }
    // `lxc file pull c1/etc/hostname` sends "etc/hostname": paths are from the root.
    let text = if given.starts_with('/') {
        given.to_string()
    } else {
        format!("/{given}")
    };
    if text.split('/').any(|part| part == "..") {
        return Err(ApiError::bad_request(format!(
            "invalid path \"{text}\": \"..\" would lead outside the instance's root and is not \
             allowed"
        )));
    }
    if text.contains('\0') {
        return Err(ApiError::bad_request("the path holds a NUL byte"));
    }
    let trimmed = text.trim_end_matches('/');
    let (parent, base) = match trimmed.rsplit_once('/') {
        Some((parent, base)) if !base.is_empty() => {
            (if parent.is_empty() { "/" } else { parent }, base)
        }
        _ => ("/", "."),
    };
    let cstring = |value: &str| {
        CString::new(value).map_err(|_| ApiError::bad_request("the path holds a NUL byte"))
    };
    Ok(InstancePath {
        parent: cstring(parent)?,
        base: cstring(base)?,
        text,
    })
}

/// Where a running instance's files are, and how its ids map to the host's.
struct Target {
    root: PathBuf,
    id_base: (u32, u32),
}

async fn target(daemon: &Arc<Daemon>, name: &str) -> Result<Target, ApiError> {
    let record = daemon.store.instance(name).map_err(|error| match error {
        crate::store::StoreError::NotFound { .. } => {
            ApiError::not_found(format!("instance \"{name}\" not found"))
        }
        other => other.into(),
    })?;
    if daemon.status_of(name) == RuntimeStatus::Stopped {
        return Err(ApiError::bad_request(format!(
            "instance \"{name}\" is not running: start it to reach its files"
        )));
    }
    let (expanded, _) = daemon.expand(&record.profiles, &record.config, &record.devices)?;
    let id_base = daemon.id_base(&expanded)?;
    Ok(Target {
        root: daemon.runtime.root(&daemon.instance_directory(&record)?),
        id_base,
    })
}

fn open_root(target: &Target) -> Result<OwnedFd, FileError> {
    let path = CString::new(target.root.as_os_str().as_bytes())
        .map_err(|_| FileError(500, "the instance's root path holds a NUL byte".into()))?;
    // SAFETY: `path` is NUL-terminated.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(FileError(
            500,
            format!(
                "cannot open the instance's root: {}",
                io::Error::last_os_error()
            ),
        ));
    }
    // SAFETY: open returned a new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_parent(target: &Target, path: &InstancePath) -> Result<OwnedFd, FileError> {
    let root = open_root(target)?;
    open_in_root(&root, &path.parent, libc::O_PATH | libc::O_DIRECTORY)
        .map_err(|error| io_failure(&path.text, "reach the directory of", error))
}

fn lstat(parent: &OwnedFd, base: &CStr) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data that fstatat fills.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `base` is NUL-terminated, `stat` writable, `parent` an open directory.
    check(unsafe {
        libc::fstatat(
            parent.as_raw_fd(),
            base.as_ptr(),
            &mut stat,
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH,
        )
    })?;
    Ok(stat)
}

fn open_at(parent: &OwnedFd, base: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `base` is NUL-terminated and `parent` an open directory.
    let fd = unsafe {
        libc::openat(
            parent.as_raw_fd(),
            base.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

enum Pulled {
    File {
        stat: libc::stat,
        file: std::fs::File,
    },
    Directory {
        stat: libc::stat,
        entries: Vec<String>,
    },
    Symlink {
        stat: libc::stat,
        target: Vec<u8>,
    },
}

fn pull_blocking(target: &Target, path: &InstancePath) -> Result<Pulled, FileError> {
    let parent = open_parent(target, path)?;
    let stat = lstat(&parent, &path.base).map_err(|error| io_failure(&path.text, "read", error))?;
    match stat.st_mode & libc::S_IFMT {
        libc::S_IFLNK => {
            let mut buffer = vec![0u8; 4096];
            // SAFETY: the buffer is writable for its length; `base` is NUL-terminated.
            let length = unsafe {
                libc::readlinkat(
                    parent.as_raw_fd(),
                    path.base.as_ptr(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                )
            };
            if length < 0 {
                return Err(io_failure(
                    &path.text,
                    "read the link",
                    io::Error::last_os_error(),
                ));
            }
            buffer.truncate(length as usize);
            Ok(Pulled::Symlink {
                stat,
                target: buffer,
            })
        }
        libc::S_IFDIR => {
            let directory = open_at(&parent, &path.base, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                .map_err(|error| io_failure(&path.text, "list", error))?;
            let listing = std::fs::read_dir(format!("/proc/self/fd/{}", directory.as_raw_fd()))
                .map_err(|error| io_failure(&path.text, "list", error))?;
            let mut entries: Vec<String> = listing
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect();
            entries.sort();
            Ok(Pulled::Directory { stat, entries })
        }
        libc::S_IFREG => {
            let file = open_at(&parent, &path.base, libc::O_RDONLY, 0)
                .map_err(|error| io_failure(&path.text, "read", error))?;
            Ok(Pulled::File {
                stat,
                file: std::fs::File::from(file),
            })
        }
        _ => Err(FileError(
            400,
            format!("{} is not a file, directory or symlink", path.text),
        )),
    }
}

fn headers(response: &mut Response, stat: &libc::stat, kind: &str, target: &Target) {
    let uid = stat.st_uid.saturating_sub(target.id_base.0);
    let gid = stat.st_gid.saturating_sub(target.id_base.1);
    let pairs = [
        ("x-lxd-uid", uid.to_string()),
        ("x-lxd-gid", gid.to_string()),
        ("x-lxd-mode", format!("{:04o}", stat.st_mode & 0o7777)),
        ("x-lxd-type", kind.to_string()),
    ];
    for (name, value) in pairs {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
}

pub async fn pull(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    query: Query,
) -> ApiResult {
    if daemon.runtime.is_virtual_machine(&name) {
        return super::vm_files::pull(daemon, name, query).await;
    }
    let path = parse_path(&query)?;
    let target = target(&daemon, &name).await?;
    let (pulled, target, path) = blocking(move || {
        let pulled = pull_blocking(&target, &path);
        (pulled, target, path)
    })
    .await?;
    match pulled? {
        Pulled::File { stat, file } => {
            let file = tokio::fs::File::from_std(file);
            let stream = futures_util::stream::unfold(file, |mut file| async move {
                use tokio::io::AsyncReadExt;
                let mut buffer = vec![0u8; 64 * 1024];
                match file.read(&mut buffer).await {
                    Ok(0) => None,
                    Ok(read) => {
                        buffer.truncate(read);
                        Some((Ok::<_, io::Error>(axum::body::Bytes::from(buffer)), file))
                    }
                    Err(error) => Some((Err(error), file)),
                }
            });
            let mut response = Body::from_stream(stream).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            let _ = &path;
            headers(&mut response, &stat, "file", &target);
            Ok(response)
        }
        Pulled::Symlink { stat, target: link } => {
            let mut response = link.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers(&mut response, &stat, "symlink", &target);
            Ok(response)
        }
        Pulled::Directory { stat, entries } => {
            let mut response = sync(entries)?;
            headers(&mut response, &stat, "directory", &target);
            Ok(response)
        }
    }
}

/// The `X-LXD-*` headers of a push.
struct PushHeaders {
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
    kind: String,
    append: bool,
}

fn push_headers(headers: &HeaderMap) -> Result<PushHeaders, ApiError> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
            .filter(|value| !value.is_empty())
    };
    let number = |name: &str, radix: u32| -> Result<Option<u32>, ApiError> {
        match text(name) {
            None => Ok(None),
            Some(value) => u32::from_str_radix(value, radix)
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("invalid {name} header \"{value}\""))),
        }
    };
    let mode = number("x-lxd-mode", 8)?;
    if mode.is_some_and(|mode| mode > 0o7777) {
        return Err(ApiError::bad_request(
            "invalid x-lxd-mode header: give octal permissions such as 0644",
        ));
    }
    let kind = text("x-lxd-type").unwrap_or("file").to_string();
    if !matches!(kind.as_str(), "file" | "directory" | "symlink") {
        return Err(ApiError::bad_request(format!(
            "invalid x-lxd-type \"{kind}\": use file, directory or symlink"
        )));
    }
    let append = match text("x-lxd-write") {
        None | Some("overwrite") => false,
        Some("append") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "invalid x-lxd-write \"{other}\": use overwrite or append"
            )))
        }
    };
    Ok(PushHeaders {
        uid: number("x-lxd-uid", 10)?,
        gid: number("x-lxd-gid", 10)?,
        mode,
        kind,
        append,
    })
}

fn host_ids(target: &Target, uid: u32, gid: u32) -> (u32, u32) {
    (
        target.id_base.0.saturating_add(uid),
        target.id_base.1.saturating_add(gid),
    )
}

pub async fn push(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    query: Query,
    request_headers: HeaderMap,
    body: Body,
) -> ApiResult {
    if daemon.runtime.is_virtual_machine(&name) {
        return super::vm_files::push(daemon, name, query, request_headers, body).await;
    }
    let path = parse_path(&query)?;
    if path.base.as_bytes() == b"." {
        return Err(ApiError::bad_request("cannot write to \"/\": name a file"));
    }
    let headers = push_headers(&request_headers)?;
    let target = target(&daemon, &name).await?;
    let limit = daemon.settings.max_image_size;
    match headers.kind.as_str() {
        "directory" | "symlink" => {
            let content = axum::body::to_bytes(body, 64 * 1024)
                .await
                .map_err(|_| ApiError::new(413, "a symlink target is at most 64 KiB"))?;
            blocking(move || make_entry(&target, &path, &headers, &content)).await??;
            ok()
        }
        _ => {
            let (file, existed, target, path) = blocking(move || {
                open_for_push(&target, &path, &headers)
                    .map(|(file, existed)| (file, existed, target, path))
            })
            .await??;
            let mut stream = body.into_data_stream();
            let mut file = file;
            let mut written: u64 = 0;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|error| {
                    ApiError::bad_request(format!("the upload broke off: {error}"))
                })?;
                written += chunk.len() as u64;
                if written > limit {
                    super::drain(&mut stream).await;
                    if !existed {
                        let _ = unlink(&target, &path);
                    }
                    return Err(ApiError::new(
                        413,
                        format!("the file is larger than the {limit} bytes coved accepts"),
                    ));
                }
                file = blocking(move || {
                    let mut file = file;
                    file.write_all(&chunk).map(|()| file)
                })
                .await?
                .map_err(|error| io_failure(&path.text, "write", error))?;
            }
            ok()
        }
    }
}

fn unlink(target: &Target, path: &InstancePath) -> Result<(), FileError> {
    let parent = open_parent(target, path)?;
    // SAFETY: `base` is NUL-terminated; `parent` an open directory.
    check(unsafe { libc::unlinkat(parent.as_raw_fd(), path.base.as_ptr(), 0) })
        .map_err(|error| io_failure(&path.text, "delete", error))
}

/// Opens (creating) a file for a push and sets its owner and mode; true if it existed.
fn open_for_push(
    target: &Target,
    path: &InstancePath,
    headers: &PushHeaders,
) -> Result<(std::fs::File, bool), FileError> {
    let parent = open_parent(target, path)?;
    let existing = lstat(&parent, &path.base).ok();
    if let Some(stat) = &existing {
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(FileError(
                400,
                format!("{} exists and is not a regular file", path.text),
            ));
        }
    }
    let flags = libc::O_WRONLY
        | libc::O_CREAT
        | if headers.append {
            libc::O_APPEND
        } else {
            libc::O_TRUNC
        };
    let mode = headers.mode.unwrap_or(0o644);
    let file = open_at(&parent, &path.base, flags, mode)
        .map_err(|error| io_failure(&path.text, "write", error))?;
    let (uid, gid) = match (&existing, headers.uid, headers.gid) {
        (Some(stat), None, None) => (stat.st_uid, stat.st_gid),
        (_, uid, gid) => host_ids(target, uid.unwrap_or(0), gid.unwrap_or(0)),
    };
    // SAFETY: fchown and fchmod on a file this function opened.
    check(unsafe { libc::fchown(file.as_raw_fd(), uid, gid) })
        .map_err(|error| io_failure(&path.text, "set the owner of", error))?;
    if existing.is_none() || headers.mode.is_some() {
        // SAFETY: as above.
        check(unsafe { libc::fchmod(file.as_raw_fd(), mode) })
            .map_err(|error| io_failure(&path.text, "set the mode of", error))?;
    }
    Ok((std::fs::File::from(file), existing.is_some()))
}

/// Creates a directory or a symlink.
fn make_entry(
    target: &Target,
    path: &InstancePath,
    headers: &PushHeaders,
    content: &[u8],
) -> Result<(), FileError> {
    let parent = open_parent(target, path)?;
    let (uid, gid) = host_ids(target, headers.uid.unwrap_or(0), headers.gid.unwrap_or(0));
    if headers.kind == "directory" {
        let mode = headers.mode.unwrap_or(0o755);
        // SAFETY: `base` is NUL-terminated; `parent` an open directory.
        match check(unsafe { libc::mkdirat(parent.as_raw_fd(), path.base.as_ptr(), mode) }) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::EEXIST) => {
                let stat = lstat(&parent, &path.base)
                    .map_err(|error| io_failure(&path.text, "create", error))?;
                if stat.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    return Err(FileError(
                        400,
                        format!("{} exists and is not a directory", path.text),
                    ));
                }
            }
            Err(error) => return Err(io_failure(&path.text, "create", error)),
        }
        let directory = open_at(&parent, &path.base, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|error| io_failure(&path.text, "open", error))?;
        // SAFETY: fchown/fchmod on a directory this function opened.
        check(unsafe { libc::fchown(directory.as_raw_fd(), uid, gid) })
            .map_err(|error| io_failure(&path.text, "set the owner of", error))?;
        // SAFETY: as above.
        check(unsafe { libc::fchmod(directory.as_raw_fd(), mode) })
            .map_err(|error| io_failure(&path.text, "set the mode of", error))?;
        return Ok(());
    }
    let link = CString::new(content)
        .map_err(|_| FileError(400, "the symlink target holds a NUL byte".into()))?;
    if content.is_empty() {
        return Err(FileError(
            400,
            "a symlink needs its target as the request body".into(),
        ));
    }
    // SAFETY: both strings are NUL-terminated; `parent` an open directory.
    check(unsafe { libc::symlinkat(link.as_ptr(), parent.as_raw_fd(), path.base.as_ptr()) })
        .map_err(|error| io_failure(&path.text, "create the symlink", error))?;
    // SAFETY: as above; AT_SYMLINK_NOFOLLOW changes the link itself.
    check(unsafe {
        libc::fchownat(
            parent.as_raw_fd(),
            path.base.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map_err(|error| io_failure(&path.text, "set the owner of", error))
}

pub async fn remove(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    query: Query,
) -> ApiResult {
    if daemon.runtime.is_virtual_machine(&name) {
        return super::vm_files::remove(daemon, name, query).await;
    }
    let path = parse_path(&query)?;
    if path.base.as_bytes() == b"." {
        return Err(ApiError::bad_request("cannot delete \"/\""));
    }
    let target = target(&daemon, &name).await?;
    blocking(move || -> Result<(), FileError> {
        let parent = open_parent(&target, &path)?;
        let stat =
            lstat(&parent, &path.base).map_err(|error| io_failure(&path.text, "delete", error))?;
        let flags = if stat.st_mode & libc::S_IFMT == libc::S_IFDIR {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        // SAFETY: `base` is NUL-terminated; `parent` an open directory.
        check(unsafe { libc::unlinkat(parent.as_raw_fd(), path.base.as_ptr(), flags) })
            .map_err(|error| io_failure(&path.text, "delete", error))
    })
    .await??;
    ok()
}
