//! File push and pull: regular files of any size (streamed in data frames), directories and
//! symlinks, each with its mode and owner.
//!
//! A pushed file is written to a temporary file beside its target, given its owner and mode,
//! and renamed over the target only when all of it has arrived: a failed or interrupted push
//! leaves the old file as it was. When a push fails while the client is still sending (a full
//! disk), the error is sent at once and the rest of the content is read and dropped, so the
//! client reads the error rather than a broken connection.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{code_for_io, describe, error_chain, Connection, Failure};
use crate::protocol::{
    check_path, AgentMessage, Channel, ErrorCode, ErrorReply, FileInfo, FileKind, Frame,
    FrameError, HostMessage, InvalidRequest, PushRequest, DATA_CHUNK,
};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error("cannot push {path}: the directory {parent} does not exist")]
    NoParent { path: String, parent: String },
    #[error("cannot create {path}")]
    Create {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path} (after {written} bytes)")]
    Write {
        path: String,
        written: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot give {path} its owner, mode or name")]
    Finish {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a directory")]
    IsDirectory { path: String },
    #[error("{path} exists and is not a directory")]
    NotDirectory { path: String },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a {kind}; only regular files, directories and symlinks can be pulled")]
    Unsupported { path: String, kind: &'static str },
    #[error("{0}")]
    Unexpected(String),
    #[error(transparent)]
    Stream(#[from] FrameError),
}

impl From<FileError> for Failure {
    fn from(error: FileError) -> Self {
        match error {
            FileError::Stream(error) => Failure::from(error),
            error => Failure::new(code_of(&error), &error),
        }
    }
}

/// Serves a push request.
pub(crate) fn push(connection: &mut Connection, request: PushRequest) -> Result<(), Failure> {
    let result = match request.kind {
        FileKind::File => return push_file(connection, &request),
        FileKind::Directory => request
            .validate()
            .map_err(FileError::from)
            .and_then(|()| push_directory(&request)),
        FileKind::Symlink => request
            .validate()
            .map_err(FileError::from)
            .and_then(|()| push_symlink(&request)),
    };
    result?;
    connection.replies.send(&AgentMessage::Done { bytes: 0 })?;
    Ok(())
}

fn push_file(connection: &mut Connection, request: &PushRequest) -> Result<(), Failure> {
    let mut target = request
        .validate()
        .map_err(FileError::from)
        .and_then(|()| PendingFile::create(request));
    let mut written = 0u64;
    let mut reported = false;
    loop {
        // Tell the client at once; the rest of what it sends is dropped.
        if let (Err(error), false) = (&target, reported) {
            reported = true;
            connection.replies.send(&AgentMessage::Error(ErrorReply {
                code: code_of(error),
                message: error_chain(error),
            }))?;
        }
        let frame = match connection.reader.read::<HostMessage>() {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(FrameError::Truncated.into()),
            Err(error) => return Err(error.into()),
        };
        match frame {
            Frame::Data(Channel::File, bytes) => {
                if let Ok(file) = &mut target {
                    if let Err(source) = file.file.write_all(&bytes) {
                        target = Err(FileError::Write {
                            path: request.path.clone(),
                            written,
                            source,
                        });
                    }
                    written += bytes.len() as u64;
                }
            }
            Frame::End(Channel::File) => break,
            Frame::Control(message) => {
                return Err(FileError::Unexpected(format!(
                    "during a push the client may send the file's content, not {}",
                    describe(&message)
                ))
                .into())
            }
            Frame::Data(channel, _) | Frame::End(channel) => {
                return Err(FileError::Unexpected(format!(
                    "a push carries its content on the file stream, not on {}",
                    channel.name()
                ))
                .into())
            }
        }
    }
    match target.and_then(|file| file.finish(request)) {
        Ok(()) => {
            connection
                .replies
                .send(&AgentMessage::Done { bytes: written })?;
            Ok(())
        }
        Err(_) if reported => Ok(()),
        Err(error) => Err(error.into()),
    }
}

fn code_of(error: &FileError) -> ErrorCode {
    match error {
        FileError::Create { source, .. }
        | FileError::Write { source, .. }
        | FileError::Finish { source, .. }
        | FileError::Read { source, .. } => code_for_io(source),
        FileError::NoParent { .. } => ErrorCode::NotFound,
        FileError::IsDirectory { .. }
        | FileError::NotDirectory { .. }
        | FileError::Unsupported { .. } => ErrorCode::WrongKind,
        _ => ErrorCode::BadRequest,
    }
}

/// A file being pushed: a temporary file beside its target, removed unless finished.
struct PendingFile {
    file: File,
    temporary: PathBuf,
    finished: bool,
}

static TEMPORARY_COUNTER: AtomicU64 = AtomicU64::new(0);

impl PendingFile {
    fn create(request: &PushRequest) -> Result<PendingFile, FileError> {
        let path = Path::new(&request.path);
        if let Ok(metadata) = fs::symlink_metadata(path) {
            if metadata.is_dir() {
                return Err(FileError::IsDirectory {
                    path: request.path.clone(),
                });
            }
        }
        let parent = path.parent().unwrap_or(Path::new("/"));
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temporary = parent.join(format!(
            ".{name}.cove-agent-{}-{}",
            std::process::id(),
            TEMPORARY_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temporary)
            .map_err(|source| {
                if source.kind() == io::ErrorKind::NotFound {
                    FileError::NoParent {
                        path: request.path.clone(),
                        parent: parent.display().to_string(),
                    }
                } else {
                    FileError::Create {
                        path: request.path.clone(),
                        source,
                    }
                }
            })?;
        Ok(PendingFile {
            file,
            temporary,
            finished: false,
        })
    }

    /// Gives the file its owner and mode (in that order: chown clears set-id bits) and its
    /// name.
    fn finish(mut self, request: &PushRequest) -> Result<(), FileError> {
        let error = |source| FileError::Finish {
            path: request.path.clone(),
            source,
        };
        std::os::unix::fs::fchown(&self.file, Some(request.uid), Some(request.gid))
            .map_err(error)?;
        self.file
            .set_permissions(Permissions::from_mode(request.mode))
            .map_err(error)?;
        fs::rename(&self.temporary, &request.path).map_err(error)?;
        self.finished = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_file(&self.temporary);
        }
    }
}

fn push_directory(request: &PushRequest) -> Result<(), FileError> {
    let path = &request.path;
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            let is_directory = fs::symlink_metadata(path)
                .map(|metadata| metadata.is_dir())
                .unwrap_or(false);
            if !is_directory {
                return Err(FileError::NotDirectory { path: path.clone() });
            }
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(FileError::NoParent {
                path: path.clone(),
                parent: parent_of(path),
            })
        }
        Err(source) => {
            return Err(FileError::Create {
                path: path.clone(),
                source,
            })
        }
    }
    let error = |source| FileError::Finish {
        path: path.clone(),
        source,
    };
    std::os::unix::fs::lchown(path, Some(request.uid), Some(request.gid)).map_err(error)?;
    fs::set_permissions(path, Permissions::from_mode(request.mode)).map_err(error)
}

fn push_symlink(request: &PushRequest) -> Result<(), FileError> {
    let path = Path::new(&request.path);
    if let Ok(metadata) = fs::symlink_metadata(path) {
        if metadata.is_dir() {
            return Err(FileError::IsDirectory {
                path: request.path.clone(),
            });
        }
    }
    let target = request.target.as_deref().unwrap_or_default();
    let parent = path.parent().unwrap_or(Path::new("/"));
    let temporary = parent.join(format!(
        ".{}.cove-agent-{}-{}",
        path.file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id(),
        TEMPORARY_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::os::unix::fs::symlink(target, &temporary).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            FileError::NoParent {
                path: request.path.clone(),
                parent: parent.display().to_string(),
            }
        } else {
            FileError::Create {
                path: request.path.clone(),
                source,
            }
        }
    })?;
    let finish = std::os::unix::fs::lchown(&temporary, Some(request.uid), Some(request.gid))
        .and_then(|()| fs::rename(&temporary, path));
    if let Err(source) = finish {
        let _ = fs::remove_file(&temporary);
        return Err(FileError::Finish {
            path: request.path.clone(),
            source,
        });
    }
    Ok(())
}

fn parent_of(path: &str) -> String {
    Path::new(path)
        .parent()
        .map(|parent| parent.display().to_string())
        .unwrap_or_else(|| "/".into())
}

/// Serves a pull request.
pub(crate) fn pull(connection: &mut Connection, path: &str) -> Result<(), Failure> {
    check_path("path", path).map_err(FileError::from)?;
    let read_error = |source| FileError::Read {
        path: path.to_string(),
        source,
    };
    let metadata = fs::symlink_metadata(path).map_err(read_error)?;
    let file_type = metadata.file_type();
    let mut info = FileInfo {
        kind: FileKind::File,
        mode: metadata.mode() & 0o7777,
        uid: metadata.uid(),
        gid: metadata.gid(),
        size: 0,
        target: None,
        entries: None,
    };
    if file_type.is_symlink() {
        let target = fs::read_link(path).map_err(read_error)?;
        info.kind = FileKind::Symlink;
        info.target = Some(target.to_string_lossy().into_owned());
        connection.replies.send(&AgentMessage::FileInfo(info))?;
        return Ok(());
    }
    if file_type.is_dir() {
        let mut entries = Vec::new();
        for entry in fs::read_dir(path).map_err(read_error)? {
            let entry = entry.map_err(read_error)?;
            entries.push(entry.file_name().to_string_lossy().into_owned());
        }
        entries.sort();
        info.kind = FileKind::Directory;
        info.entries = Some(entries);
        connection.replies.send(&AgentMessage::FileInfo(info))?;
        return Ok(());
    }
    if !file_type.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let kind = if file_type.is_char_device() {
            "character device"
        } else if file_type.is_block_device() {
            "block device"
        } else if file_type.is_fifo() {
            "named pipe"
        } else {
            "socket"
        };
        return Err(FileError::Unsupported {
            path: path.to_string(),
            kind,
        }
        .into());
    }
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(read_error)?;
    // The opened file's own figures: the path may have changed since the lstat.
    let metadata = file.metadata().map_err(read_error)?;
    info.mode = metadata.mode() & 0o7777;
    info.uid = metadata.uid();
    info.gid = metadata.gid();
    info.size = metadata.len();
    connection.replies.send(&AgentMessage::FileInfo(info))?;
    let mut buffer = vec![0u8; DATA_CHUNK];
    loop {
        let read = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(read_error(source).into()),
        };
        connection.replies.data(Channel::File, &buffer[..read])?;
    }
    connection.replies.end(Channel::File)?;
    Ok(())
}
