//! `cove image import|list|info|delete` and `cove image alias create|delete|list`.
//!
//! An import streams the file (or a metadata and a rootfs file, as `multipart/form-data`, as
//! `lxc image import META ROOTFS` sends them) to `/1.0/images`, with a progress bar on stderr:
//! redrawn with `\r` on a terminal, one final line otherwise.

use std::fs;
use std::io::{self, Cursor, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::client::{encode, Body, Client};
use super::format::{self, Format};
use super::{print, yaml, CliError};
use crate::api::types::{Image, ImageAliasesEntry};

/// `Transferring image: 45% (1.50MiB/3.00MiB)`.
pub fn progress_line(sent: u64, total: u64) -> String {
    let percent = (sent.saturating_mul(100)).checked_div(total).unwrap_or(100);
    format!(
        "Transferring image: {percent}% ({}/{})",
        format::size(sent),
        format::size(total)
    )
}

/// Draws the progress bar on stderr, at most ten times a second.
struct Progress {
    total: u64,
    terminal: bool,
    last: Option<Instant>,
}

impl Progress {
    fn update(&mut self, sent: u64) {
        if !self.terminal {
            return;
        }
        let due = self
            .last
            .is_none_or(|last| last.elapsed() >= Duration::from_millis(100));
        if due || sent == self.total {
            self.last = Some(Instant::now());
            let mut stderr = io::stderr().lock();
            let _ = write!(stderr, "\r\x1b[K{}", progress_line(sent, self.total));
            let _ = stderr.flush();
        }
    }

    fn finish(&self, started: Instant) {
        let seconds = started.elapsed().as_secs_f64().max(0.001);
        let rate = format::size((self.total as f64 / seconds) as u64);
        let line = format!(
            "Transferring image: done, {} ({rate}/s)",
            format::size(self.total)
        );
        if self.terminal {
            eprintln!("\r\x1b[K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

fn open(path: &Path) -> Result<(fs::File, u64, String), CliError> {
    let file =
        fs::File::open(path).map_err(|error| CliError::file("read the image", path, &error))?;
    let length = file
        .metadata()
        .map_err(|error| CliError::file("read the image", path, &error))?
        .len();
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((file, length, name))
}

/// Keeps header values to printable ASCII (a file name is the user's).
fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub fn import(
    client: &Client,
    files: &[PathBuf],
    aliases: &[String],
    public: bool,
) -> Result<(), CliError> {
    let boundary = "cove-image-upload-6f1d3b2a9c";
    let mut parts: Vec<Box<dyn Read>> = Vec::new();
    let mut length = 0u64;
    let content_type;
    let filename;
    match files {
        [unified] => {
            let (file, size, name) = open(unified)?;
            parts.push(Box::new(file));
            length = size;
            content_type = "application/octet-stream".to_string();
            filename = name;
        }
        [metadata, rootfs] => {
            // A disk as the second file makes a VM image, as `lxc image import` sends it.
            let rootfs_field = if crate::images::machine::looks_like_disk(rootfs) {
                crate::images::machine::DISK_FILE
            } else {
                "rootfs"
            };
            for (field, path) in [("metadata", metadata), (rootfs_field, rootfs)] {
                let (file, size, name) = open(path)?;
                let head = format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; \
                     filename=\"{}\"\r\nContent-Type: application/octet-stream\r\n\r\n",
                    header_safe(&name).replace('"', "_")
                );
                length += head.len() as u64 + size + 2;
                parts.push(Box::new(Cursor::new(head.into_bytes())));
                parts.push(Box::new(file));
                parts.push(Box::new(Cursor::new(b"\r\n".to_vec())));
            }
            let tail = format!("--{boundary}--\r\n");
            length += tail.len() as u64;
            parts.push(Box::new(Cursor::new(tail.into_bytes())));
            content_type = format!("multipart/form-data; boundary={boundary}");
            filename = String::new();
        }
        _ => return Err(CliError::Usage("expected FILE [ROOTFS]".into())),
    }
    let mut progress = Progress {
        total: length,
        terminal: io::stderr().is_terminal(),
        last: None,
    };
    let started = Instant::now();
    let filename = header_safe(&filename);
    let mut headers = vec![
        ("Content-Type", content_type.as_str()),
        ("X-LXD-public", if public { "1" } else { "0" }),
    ];
    if !filename.is_empty() {
        headers.push(("X-LXD-filename", filename.as_str()));
    }
    let mut update = |sent| progress.update(sent);
    let response = client.http(
        "POST",
        "/1.0/images",
        &headers,
        Body::Stream {
            parts,
            length,
            progress: &mut update,
        },
    )?;
    let envelope = super::client::envelope(&response)?;
    progress.finish(started);
    let operation = client.finish(&envelope)?.ok_or_else(|| {
        CliError::Protocol("an image import answered without an operation".into())
    })?;
    let fingerprint = operation.metadata["fingerprint"]
        .as_str()
        .ok_or_else(|| CliError::Protocol("the import named no fingerprint".into()))?
        .to_string();
    print(&format!("Image imported with fingerprint: {fingerprint}\n"));
    for alias in aliases {
        client.request(
            "POST",
            "/1.0/images/aliases",
            Some(&json!({"name": alias, "target": fingerprint})),
        )?;
    }
    Ok(())
}

/// An alias's target, else `image` itself (a fingerprint or a unique prefix of one).
fn resolve(client: &Client, image: &str) -> Result<String, CliError> {
    match client.get::<ImageAliasesEntry>(&format!("/1.0/images/aliases/{}", encode(image))) {
        Ok(alias) => Ok(alias.target),
        Err(CliError::Api { code: 404, .. }) => {
            let found: Image = client
                .get(&format!("/1.0/images/{}", encode(image)))
                .map_err(|error| match error {
                    CliError::Api { code: 404, .. } => CliError::Api {
                        code: 404,
                        message: format!(
                            "no image has the alias or fingerprint \"{image}\": see cove image list"
                        ),
                    },
                    other => other,
                })?;
            Ok(found.fingerprint)
        }
        Err(error) => Err(error),
    }
}

fn short(fingerprint: &str) -> String {
    fingerprint.chars().take(12).collect()
}

/// The rows of `cove image list`.
pub fn image_rows(images: &[Image]) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = images
        .iter()
        .map(|image| {
            vec![
                image
                    .aliases
                    .iter()
                    .map(|alias| alias.name.clone())
                    .collect::<Vec<_>>()
                    .join("\n"),
                short(&image.fingerprint),
                if image.public { "yes" } else { "no" }.to_string(),
                image
                    .properties
                    .get("description")
                    .cloned()
                    .unwrap_or_default(),
                image.architecture.clone(),
                image.kind.to_ascii_uppercase(),
                format::size(image.size),
                format::date(&image.uploaded_at),
            ]
        })
        .collect();
    rows.sort();
    rows
}

fn emit(format: Format, raw: Vec<Value>, headers: &[&str], rows: &[Vec<String>]) {
    match format {
        Format::Json => print(&format!("{}\n", Value::Array(raw))),
        Format::Yaml => print(&yaml::emit(&Value::Array(raw))),
        Format::Csv => print(&format::csv(rows)),
        Format::Table => print(&format::table(headers, rows)),
    }
}

pub fn list(client: &Client, format: Format) -> Result<(), CliError> {
    let raw: Vec<Value> = client.get("/1.0/images?recursion=1")?;
    let images: Vec<Image> = serde_json::from_value(Value::Array(raw.clone()))
        .map_err(|error| CliError::Protocol(format!("an image: {error}")))?;
    emit(
        format,
        raw,
        &[
            "ALIAS",
            "FINGERPRINT",
            "PUBLIC",
            "DESCRIPTION",
            "ARCHITECTURE",
            "TYPE",
            "SIZE",
            "UPLOAD DATE",
        ],
        &image_rows(&images),
    );
    Ok(())
}

/// The text of `cove image info`.
pub fn info_text(image: &Image) -> String {
    let never = |text: &str| {
        if text.is_empty() || text.starts_with("0001-") {
            "never".to_string()
        } else {
            format::date(text)
        }
    };
    let mut text = format!(
        "Fingerprint: {}\nSize: {}\nArchitecture: {}\nType: {}\nPublic: {}\nTimestamps:\n",
        image.fingerprint,
        format::size(image.size),
        image.architecture,
        image.kind,
        if image.public { "yes" } else { "no" },
    );
    text.push_str(&format!("    Created: {}\n", never(&image.created_at)));
    text.push_str(&format!("    Uploaded: {}\n", never(&image.uploaded_at)));
    text.push_str(&format!("    Expires: {}\n", never(&image.expires_at)));
    text.push_str(&format!("    Last used: {}\n", never(&image.last_used_at)));
    text.push_str("Properties:\n");
    for (key, value) in &image.properties {
        text.push_str(&format!("    {key}: {value}\n"));
    }
    text.push_str("Aliases:\n");
    for alias in &image.aliases {
        text.push_str(&format!("    - {}\n", alias.name));
    }
    text.push_str(&format!(
        "Cached: {}\nAuto update: {}\nProfiles:\n",
        if image.cached { "yes" } else { "no" },
        if image.auto_update {
            "enabled"
        } else {
            "disabled"
        }
    ));
    for profile in &image.profiles {
        text.push_str(&format!("    - {profile}\n"));
    }
    text
}

pub fn info(client: &Client, image: &str) -> Result<(), CliError> {
    let fingerprint = resolve(client, image)?;
    let image: Image = client.get(&format!("/1.0/images/{}", encode(&fingerprint)))?;
    print(&info_text(&image));
    Ok(())
}

pub fn delete(client: &Client, images: &[String]) -> Result<(), CliError> {
    for image in images {
        let fingerprint = resolve(client, image)?;
        client.run(
            "DELETE",
            &format!("/1.0/images/{}", encode(&fingerprint)),
            None,
        )?;
    }
    Ok(())
}

pub fn alias_create(client: &Client, name: &str, image: &str) -> Result<(), CliError> {
    let fingerprint = resolve(client, image)?;
    client.request(
        "POST",
        "/1.0/images/aliases",
        Some(&json!({"name": name, "target": fingerprint})),
    )?;
    Ok(())
}

pub fn alias_delete(client: &Client, name: &str) -> Result<(), CliError> {
    client.request(
        "DELETE",
        &format!("/1.0/images/aliases/{}", encode(name)),
        None,
    )?;
    Ok(())
}

pub fn alias_list(client: &Client, format: Format) -> Result<(), CliError> {
    let raw: Vec<Value> = client.get("/1.0/images/aliases?recursion=1")?;
    let aliases: Vec<ImageAliasesEntry> = serde_json::from_value(Value::Array(raw.clone()))
        .map_err(|error| CliError::Protocol(format!("an alias: {error}")))?;
    let mut rows: Vec<Vec<String>> = aliases
        .iter()
        .map(|alias| {
            vec![
                alias.name.clone(),
                short(&alias.target),
                alias.kind.to_ascii_uppercase(),
                alias.description.clone(),
            ]
        })
        .collect();
    rows.sort();
    emit(
        format,
        raw,
        &["ALIAS", "FINGERPRINT", "TYPE", "DESCRIPTION"],
        &rows,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_as_percent_and_sizes() {
        assert_eq!(
            progress_line(1536 << 10, 3 << 20),
            "Transferring image: 50% (1.50MiB/3.00MiB)"
        );
        assert_eq!(progress_line(0, 0), "Transferring image: 100% (0B/0B)");
    }

    #[test]
    fn image_rows_are_lxc_columns() {
        let image: Image = serde_json::from_value(json!({
            "aliases": [{"name": "busybox", "description": ""}],
            "architecture": "x86_64", "fingerprint": "0123456789abcdef0123",
            "filename": "busybox.tar.gz", "properties": {"description": "busybox"},
            "public": false, "size": 2048, "created_at": "2024-01-31T12:00:00Z",
            "uploaded_at": "2024-01-31T12:00:00Z", "type": "container",
        }))
        .unwrap();
        assert_eq!(
            image_rows(std::slice::from_ref(&image)),
            [vec![
                "busybox",
                "0123456789ab",
                "no",
                "busybox",
                "x86_64",
                "CONTAINER",
                "2.00KiB",
                "2024/01/31 12:00 UTC"
            ]]
        );
        let text = info_text(&image);
        assert!(
            text.starts_with("Fingerprint: 0123456789abcdef0123\nSize: 2.00KiB\n"),
            "{text}"
        );
        assert!(text.contains("    Last used: never\n"), "{text}");
        assert!(text.contains("Aliases:\n    - busybox\n"), "{text}");
    }

    #[test]
    fn header_values_stay_printable() {
        assert_eq!(header_safe("a\r\nb.tar"), "a__b.tar");
    }
}
