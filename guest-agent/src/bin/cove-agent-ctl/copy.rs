//! `push` and `pull`: single files, or whole trees with `-r` (directories, files and symlinks
//! one request each).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cove_agent::client::{Attributes, Client};
use cove_agent::protocol::FileKind;

use crate::{Arguments, Failure};

/// Owner and mode to force on pushed files, instead of the local ones.
#[derive(Default, Clone, Copy)]
struct Overrides {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
}

fn local_error(what: String, error: std::io::Error) -> Failure {
    Failure::Other(format!("{what}: {error}"))
}

pub(crate) fn push(client: &Client, arguments: &mut Arguments) -> Result<(), Failure> {
    let mut recursive = false;
    let mut overrides = Overrides::default();
    let mut paths = Vec::new();
    while let Some(argument) = arguments.next() {
        match argument {
            "-r" | "--recursive" => recursive = true,
            "--mode" => {
                let value = arguments.value("--mode")?;
                overrides.mode = Some(u32::from_str_radix(value, 8).map_err(|_| {
                    Failure::Usage(format!("--mode {value:?} is not an octal mode"))
                })?);
            }
            "--uid" => overrides.uid = Some(arguments.number("--uid")?),
            "--gid" => overrides.gid = Some(arguments.number("--gid")?),
            flag if flag.starts_with('-') && flag.len() > 1 => {
                return Err(Failure::Usage(format!("unknown push option {flag:?}")))
            }
            path => paths.push(path.to_string()),
        }
    }
    let [local, remote] = paths.as_slice() else {
        return Err(Failure::Usage("push needs LOCAL and REMOTE".into()));
    };
    let local = Path::new(local);
    let remote = if remote.ends_with('/') {
        let name = local
            .file_name()
            .ok_or_else(|| Failure::Usage(format!("{} has no file name", local.display())))?;
        format!("{remote}{}", name.to_string_lossy())
    } else {
        remote.clone()
    };
    let metadata = fs::symlink_metadata(local)
        .map_err(|error| local_error(format!("cannot read {}", local.display()), error))?;
    if metadata.is_dir() && !recursive {
        return Err(Failure::Other(format!(
            "{} is a directory: push it with -r",
            local.display()
        )));
    }
    push_tree(client, local, &remote, overrides)
}

fn attributes(metadata: &fs::Metadata, overrides: Overrides) -> Attributes {
    Attributes {
        mode: overrides.mode.unwrap_or(metadata.mode() & 0o7777),
        uid: overrides.uid.unwrap_or(metadata.uid()),
        gid: overrides.gid.unwrap_or(metadata.gid()),
    }
}

fn push_tree(
    client: &Client,
    local: &Path,
    remote: &str,
    overrides: Overrides,
) -> Result<(), Failure> {
    let metadata = fs::symlink_metadata(local)
        .map_err(|error| local_error(format!("cannot read {}", local.display()), error))?;
    let file_type = metadata.file_type();
    if file_type.is_symlink() {
        let target = fs::read_link(local)
            .map_err(|error| local_error(format!("cannot read {}", local.display()), error))?;
        let attributes = attributes(&metadata, overrides);
        client.push_symlink(
            remote,
            &target.to_string_lossy(),
            attributes.uid,
            attributes.gid,
        )?;
    } else if file_type.is_dir() {
        client.push_directory(remote, attributes(&metadata, overrides))?;
        let mut entries: Vec<PathBuf> = fs::read_dir(local)
            .map_err(|error| local_error(format!("cannot list {}", local.display()), error))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .collect();
        entries.sort();
        for entry in entries {
            let name = entry.file_name().unwrap_or_default().to_string_lossy();
            let child = format!("{}/{name}", remote.trim_end_matches('/'));
            push_tree(client, &entry, &child, overrides)?;
        }
    } else if file_type.is_file() {
        let mut file = fs::File::open(local)
            .map_err(|error| local_error(format!("cannot open {}", local.display()), error))?;
        client.push_file(remote, attributes(&metadata, overrides), &mut file)?;
    } else {
        return Err(Failure::Other(format!(
            "{} is neither a file, a directory nor a symlink",
            local.display()
        )));
    }
    Ok(())
}

pub(crate) fn pull(client: &Client, arguments: &mut Arguments) -> Result<(), Failure> {
    let mut recursive = false;
    let mut paths = Vec::new();
    while let Some(argument) = arguments.next() {
        match argument {
            "-r" | "--recursive" => recursive = true,
            flag if flag.starts_with('-') && flag.len() > 1 => {
                return Err(Failure::Usage(format!("unknown pull option {flag:?}")))
            }
            path => paths.push(path.to_string()),
        }
    }
    let [remote, local] = paths.as_slice() else {
        return Err(Failure::Usage("pull needs REMOTE and LOCAL".into()));
    };
    if local == "-" {
        let mut stdout = std::io::stdout().lock();
        let info = client.pull(remote, &mut stdout)?;
        let _ = stdout.flush();
        if info.kind != FileKind::File {
            return Err(Failure::Other(format!(
                "{remote} is not a file; only a file can be pulled to stdout"
            )));
        }
        return Ok(());
    }
    let mut local = PathBuf::from(local);
    if local.is_dir() {
        let name = Path::new(remote.trim_end_matches('/'))
            .file_name()
            .ok_or_else(|| Failure::Usage(format!("{remote} has no file name")))?;
        local.push(name);
    }
    pull_tree(client, remote, &local, recursive, true)
}

fn pull_tree(
    client: &Client,
    remote: &str,
    local: &Path,
    recursive: bool,
    top: bool,
) -> Result<(), Failure> {
    // The content goes to a temporary file beside the target, renamed once complete.
    let temporary = local.with_file_name(format!(
        ".{}.cove-agent-ctl-{}",
        local.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut sink = LazyFile {
        path: temporary.clone(),
        file: None,
    };
    let info = match client.pull(remote, &mut sink) {
        Ok(info) => info,
        Err(error) => {
            let _ = fs::remove_file(&temporary);
            return Err(error.into());
        }
    };
    let io = |what: &str, error| local_error(format!("cannot {what} {}", local.display()), error);
    match info.kind {
        FileKind::File => {
            let file = match sink.file.take() {
                Some(file) => file,
                None => fs::File::create(&temporary).map_err(|error| io("create", error))?,
            };
            set_owner_and_mode(&file, info.uid, info.gid, info.mode)
                .map_err(|error| io("set the owner and mode of", error))?;
            drop(file);
            fs::rename(&temporary, local).map_err(|error| io("create", error))?;
        }
        FileKind::Symlink => {
            let target = info.target.unwrap_or_default();
            let _ = fs::remove_file(local);
            std::os::unix::fs::symlink(&target, local).map_err(|error| io("create", error))?;
        }
        FileKind::Directory => {
            if !recursive && top {
                return Err(Failure::Other(format!(
                    "{remote} is a directory: pull it with -r"
                )));
            }
            match fs::create_dir(local) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(io("create", error)),
            }
            for entry in info.entries.unwrap_or_default() {
                let child = format!("{}/{entry}", remote.trim_end_matches('/'));
                pull_tree(client, &child, &local.join(&entry), recursive, false)?;
            }
            fs::set_permissions(local, fs::Permissions::from_mode(info.mode))
                .map_err(|error| io("set the mode of", error))?;
            if is_root() {
                std::os::unix::fs::chown(local, Some(info.uid), Some(info.gid))
                    .map_err(|error| io("set the owner of", error))?;
            }
        }
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid() takes no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// Owner (when running as root; others cannot give files away) and mode, in that order.
fn set_owner_and_mode(file: &fs::File, uid: u32, gid: u32, mode: u32) -> std::io::Result<()> {
    if is_root() {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
    }
    file.set_permissions(fs::Permissions::from_mode(mode))
}

/// A file created on the first write, so that pulling a directory creates no file.
struct LazyFile {
    path: PathBuf,
    file: Option<fs::File>,
}

impl Write for LazyFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.file.is_none() {
            self.file = Some(fs::File::create(&self.path)?);
        }
        match &mut self.file {
            Some(file) => file.write(bytes),
            None => Ok(0),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}
