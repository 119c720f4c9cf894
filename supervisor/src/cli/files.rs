//! `cove file push|pull|delete`: files in a running instance through
//! `/1.0/instances/<name>/files?path=`, with LXD's `X-LXD-uid`, `-gid`, `-mode` and `-type`
//! headers. As `lxc` does, a push keeps the local file's mode and owner unless `--mode`,
//! `--uid` or `--gid` say otherwise, and a pull keeps the remote mode.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::arguments::{InstancePath, Push};
use super::client::{encode, encode_path, envelope, Body, Client, HttpResponse};
use super::CliError;

fn files_url(target: &InstancePath) -> String {
    format!(
        "/1.0/instances/{}/files?path={}",
        encode(&target.instance),
        encode_path(&target.path)
    )
}

/// Joins a name onto an instance path.
fn child(parent: &InstancePath, name: &str) -> InstancePath {
    InstancePath {
        instance: parent.instance.clone(),
        path: format!("{}/{name}", parent.path.trim_end_matches('/')),
    }
}

fn base_name(path: &Path) -> Result<String, CliError> {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "cannot tell the file name of {}: name a file",
                path.display()
            ))
        })
}

/// Sends one entry; an error answer becomes an error.
fn post(
    client: &Client,
    target: &InstancePath,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> Result<(), CliError> {
    let response = client.http("POST", &files_url(target), headers, body)?;
    envelope(&response).map(drop)
}

fn push_entry(
    client: &Client,
    push: &Push,
    source: &Path,
    target: &InstancePath,
) -> Result<(), CliError> {
    let metadata =
        fs::symlink_metadata(source).map_err(|error| CliError::file("read", source, &error))?;
    let mode = format!("{:04o}", push.mode.unwrap_or(metadata.mode() & 0o7777));
    let uid = push.uid.unwrap_or(metadata.uid()).to_string();
    let gid = push.gid.unwrap_or(metadata.gid()).to_string();
    let owner = [
        ("X-LXD-uid", uid.as_str()),
        ("X-LXD-gid", gid.as_str()),
        ("X-LXD-mode", mode.as_str()),
    ];
    let file_type = metadata.file_type();
    if file_type.is_dir() {
        if !push.recursive {
            return Err(CliError::Usage(format!(
                "{} is a directory: push it with -r",
                source.display()
            )));
        }
        let mut headers = owner.to_vec();
        headers.push(("X-LXD-type", "directory"));
        post(client, target, &headers, Body::Empty)?;
        let mut entries: Vec<_> = fs::read_dir(source)
            .map_err(|error| CliError::file("read the directory", source, &error))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            push_entry(client, push, &entry.path(), &child(target, &name))?;
        }
        Ok(())
    } else if file_type.is_symlink() && push.recursive {
        let link = fs::read_link(source).map_err(|error| CliError::file("read", source, &error))?;
        let link = link.to_string_lossy().into_owned();
        let mut headers = owner.to_vec();
        headers.push(("X-LXD-type", "symlink"));
        post(client, target, &headers, Body::Bytes(link.as_bytes()))
    } else {
        let file =
            fs::File::open(source).map_err(|error| CliError::file("read", source, &error))?;
        let length = file
            .metadata()
            .map_err(|error| CliError::file("read", source, &error))?
            .len();
        let mut headers = owner.to_vec();
        headers.extend([("X-LXD-type", "file"), ("X-LXD-write", "overwrite")]);
        let mut progress = |_: u64| {};
        post(
            client,
            target,
            &headers,
            Body::Stream {
                parts: vec![Box::new(file)],
                length,
                progress: &mut progress,
            },
        )
    }
}

/// Creates every missing directory above `target` (`-p`).
fn create_parents(client: &Client, target: &InstancePath) -> Result<(), CliError> {
    let mut path = String::new();
    let components: Vec<&str> = target
        .path
        .split('/')
        .filter(|part| !part.is_empty())
        .collect();
    for component in components.iter().take(components.len().saturating_sub(1)) {
        path.push('/');
        path.push_str(component);
        let directory = InstancePath {
            instance: target.instance.clone(),
            path: path.clone(),
        };
        post(
            client,
            &directory,
            &[("X-LXD-type", "directory"), ("X-LXD-mode", "0755")],
            Body::Empty,
        )?;
    }
    Ok(())
}

pub fn push(client: &Client, push: &Push) -> Result<(), CliError> {
    let Some(target) = &push.target else {
        return Err(CliError::Usage("expected SOURCE... NAME/PATH".into()));
    };
    let into_directory = push.sources.len() > 1 || target.path.ends_with('/');
    for source in &push.sources {
        let destination = if into_directory {
            child(target, &base_name(source)?)
        } else {
            target.clone()
        };
        if push.create_directories {
            create_parents(client, &destination)?;
        }
        push_entry(client, push, source, &destination)?;
    }
    Ok(())
}

fn get(client: &Client, source: &InstancePath) -> Result<HttpResponse, CliError> {
    let response = client.http("GET", &files_url(source), &[], Body::Empty)?;
    if response.status >= 400 || response.header("x-lxd-type").is_none() {
        envelope(&response)?;
        if response.status >= 400 {
            return Err(CliError::Api {
                code: response.status,
                message: format!("cannot read {}/{}", source.instance, source.path),
            });
        }
    }
    Ok(response)
}

fn pull_entry(
    client: &Client,
    source: &InstancePath,
    destination: &Path,
    recursive: bool,
) -> Result<(), CliError> {
    let response = get(client, source)?;
    let mode = response
        .header("x-lxd-mode")
        .and_then(|mode| u32::from_str_radix(mode, 8).ok());
    match response.header("x-lxd-type").unwrap_or("file") {
        "directory" => {
            if !recursive {
                return Err(CliError::Usage(format!(
                    "{}{} is a directory: pull it with -r",
                    source.instance, source.path
                )));
            }
            let names: Vec<String> = serde_json::from_value(envelope(&response)?.metadata)
                .map_err(|error| CliError::Protocol(format!("a directory listing: {error}")))?;
            match fs::create_dir(destination) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(CliError::file("create", destination, &error)),
            }
            for name in names {
                if name == "." || name == ".." || name.contains('/') {
                    continue;
                }
                pull_entry(
                    client,
                    &child(source, &name),
                    &destination.join(&name),
                    recursive,
                )?;
            }
            if let Some(mode) = mode {
                let _ = fs::set_permissions(destination, fs::Permissions::from_mode(mode));
            }
            Ok(())
        }
        "symlink" => {
            let link = String::from_utf8_lossy(&response.body).into_owned();
            let _ = fs::remove_file(destination);
            std::os::unix::fs::symlink(&link, destination)
                .map_err(|error| CliError::file("create", destination, &error))
        }
        _ => {
            if destination == Path::new("-") {
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(&response.body);
                let _ = stdout.flush();
                return Ok(());
            }
            fs::write(destination, &response.body)
                .map_err(|error| CliError::file("write", destination, &error))?;
            if let Some(mode) = mode {
                fs::set_permissions(destination, fs::Permissions::from_mode(mode))
                    .map_err(|error| CliError::file("set the mode of", destination, &error))?;
            }
            Ok(())
        }
    }
}

pub fn pull(
    client: &Client,
    sources: &[InstancePath],
    destination: &Path,
    recursive: bool,
) -> Result<(), CliError> {
    let into_directory = destination.is_dir();
    if sources.len() > 1 && !into_directory {
        return Err(CliError::Usage(format!(
            "{} is not a directory: several files need a directory to go into",
            destination.display()
        )));
    }
    for source in sources {
        let target: PathBuf = if into_directory {
            let name = source
                .path
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .filter(|name| !name.is_empty())
                .unwrap_or(&source.instance);
            destination.join(name)
        } else {
            destination.to_path_buf()
        };
        pull_entry(client, source, &target, recursive)?;
    }
    Ok(())
}

pub fn delete(client: &Client, paths: &[InstancePath]) -> Result<(), CliError> {
    for path in paths {
        let response = client.http("DELETE", &files_url(path), &[], Body::Empty)?;
        envelope(&response)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_the_path_but_keep_slashes() {
        let path = InstancePath {
            instance: "web".into(),
            path: "/tmp/a file".into(),
        };
        assert_eq!(
            files_url(&path),
            "/1.0/instances/web/files?path=/tmp/a%20file"
        );
        assert_eq!(child(&path, "x").path, "/tmp/a file/x");
        let root = InstancePath {
            instance: "web".into(),
            path: "/tmp/".into(),
        };
        assert_eq!(child(&root, "x").path, "/tmp/x");
    }
}
