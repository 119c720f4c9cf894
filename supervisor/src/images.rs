//! The image store: images as `lxc image import` uploads them (a unified tarball, or a
//! metadata tarball and a rootfs tarball or squashfs; for VM images a disk, see `machine`), named by the SHA-256 of the uploaded
//! bytes as LXD names them, unpacked once under `$COVE_DIR/images/<fingerprint>/` and never
//! written again: every instance runs on a snapshot of `rootfs/` there.
//!
//! Unpacking goes to a staging directory that is renamed into place when complete, so a crash
//! leaves either a whole image or a staging directory that the next start of coved removes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

pub mod machine;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the upload is larger than the {limit} bytes coved accepts (--max-image-size)")]
    TooLarge { limit: u64 },
    #[error("the upload is empty: send the image file as the request body")]
    Empty,
    #[error("{0}")]
    Format(String),
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Hashes uploaded parts in order, as LXD computes a fingerprint (metadata then rootfs).
#[derive(Debug, Default, Clone)]
pub struct Fingerprinter {
    hasher: Sha256,
    size: u64,
}

impl Fingerprinter {
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn finish(self) -> String {
        hex(&self.hasher.finalize())
    }
}

/// What `metadata.yaml` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub architecture: String,
    pub creation_date: Option<i64>,
    pub properties: BTreeMap<String, String>,
}

/// Reads the parts of `metadata.yaml` coved uses: top-level scalars and the `properties`
/// mapping. (Images' metadata is that simple; templates are not applied.)
pub fn parse_metadata(text: &str) -> Result<Metadata, ImageError> {
    let mut metadata = Metadata::default();
    let mut in_properties = false;
    for line in text.lines() {
        let without_comment = line.split(" #").next().unwrap_or_default();
        if without_comment.trim().is_empty() || without_comment.trim_start().starts_with('#') {
            continue;
        }
        let indented = line.starts_with(' ') || line.starts_with('\t');
        let Some((key, value)) = without_comment.trim().split_once(':') else {
            continue;
        };
        let key = key.trim();
        let value = unquote(value.trim());
        if !indented {
            in_properties = key == "properties";
            match key {
                "architecture" => metadata.architecture = value,
                "creation_date" => metadata.creation_date = value.parse().ok(),
                _ => {}
            }
        } else if in_properties && line.starts_with("  ") && !line.starts_with("    ") {
            metadata.properties.insert(key.to_string(), value);
        }
    }
    if metadata.architecture.is_empty() {
        return Err(ImageError::Format(
            "metadata.yaml has no architecture: an image's metadata.yaml needs `architecture: \
             x86_64` and `creation_date`"
                .into(),
        ));
    }
    Ok(metadata)
}

fn unquote(value: &str) -> String {
    let stripped = value
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .or_else(|| {
            value
                .strip_prefix('\'')
                .and_then(|rest| rest.strip_suffix('\''))
        });
    stripped.unwrap_or(value).to_string()
}

/// LXD's architecture names, with the aliases images use.
pub fn normalize_architecture(name: &str) -> String {
    match name {
        "amd64" | "x86_64" => "x86_64".into(),
        "arm64" | "aarch64" => "aarch64".into(),
        "i386" | "i686" => "i686".into(),
        other => other.into(),
    }
}

enum Compression {
    None,
    Gzip,
    Xz,
    Squashfs,
}

fn sniff(path: &Path) -> Result<Compression, ImageError> {
    let mut file = File::open(path).map_err(io_error(format!("open {}", path.display())))?;
    let mut head = [0u8; 512];
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) => return Err(io_error(format!("read {}", path.display()))(error)),
        }
    }
    let head = &head[..filled];
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Compression::Gzip)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Ok(Compression::Xz)
    } else if head.starts_with(b"hsqs") {
        Ok(Compression::Squashfs)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Ok(Compression::None)
    } else if head.starts_with(b"BZh") || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Err(ImageError::Format(
            "bzip2 and zstd tarballs are not supported: recompress the image with xz or gzip"
                .into(),
        ))
    } else {
        Err(ImageError::Format(
            "the upload is not an image: expected a tarball (plain, gzip or xz) or a squashfs"
                .into(),
        ))
    }
}

fn tar_reader(path: &Path, compression: Compression) -> Result<Box<dyn Read>, ImageError> {
    let mut file = File::open(path).map_err(io_error(format!("open {}", path.display())))?;
    file.rewind()
        .map_err(io_error(format!("read {}", path.display())))?;
    let file = BufReader::with_capacity(1 << 20, file);
    Ok(match compression {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(file)),
        _ => Box::new(file),
    })
}

/// Unpacks one tarball into `target`, keeping owners, modes and special files.
fn unpack_tarball(path: &Path, compression: Compression, target: &Path) -> Result<(), ImageError> {
    let mut archive = tar::Archive::new(tar_reader(path, compression)?);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    // unpack() refuses entries that would land outside `target` (`..`, absolute paths,
    // symlinked parents).
    archive.unpack(target).map_err(|error| {
        let cause = std::error::Error::source(&error)
            .map(|source| format!(" ({source})"))
            .unwrap_or_default();
        ImageError::Format(format!(
            "cannot unpack {}: {error}{cause}; is it a valid image tarball?",
            path.file_name().unwrap_or_default().to_string_lossy()
        ))
    })
}

fn unsquash(path: &Path, target: &Path) -> Result<(), ImageError> {
    let output = Command::new("unsquashfs")
        .args(["-f", "-n", "-d"])
        .arg(target)
        .arg(path)
        .output()
        .map_err(|error| {
            ImageError::Format(format!(
                "the rootfs is a squashfs and unsquashfs cannot run ({error}): install \
                 squashfs-tools"
            ))
        })?;
    if !output.status.success() {
        return Err(ImageError::Format(format!(
            "unsquashfs failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Unpacks an upload into `staging` (`metadata.yaml`, `rootfs/`, `templates/`) and reads its
/// metadata. `rootfs` is the second file of a split image. A VM image's disk (`rootfs.img`,
/// from the tarball or placed in `staging` before) is checked, not unpacked.
pub fn unpack(
    staging: &Path,
    metadata_file: &Path,
    rootfs_file: Option<&Path>,
) -> Result<Metadata, ImageError> {
    std::fs::create_dir_all(staging).map_err(io_error(format!("create {}", staging.display())))?;
    match sniff(metadata_file)? {
        Compression::Squashfs => {
            return Err(ImageError::Format(
                "the first file is a squashfs: give the metadata tarball first, then the rootfs"
                    .into(),
            ))
        }
        compression => unpack_tarball(metadata_file, compression, staging)?,
    }
    let root = staging.join("rootfs");
    if let Some(rootfs_file) = rootfs_file {
        std::fs::create_dir_all(&root).map_err(io_error(format!("create {}", root.display())))?;
        match sniff(rootfs_file)? {
            Compression::Squashfs => unsquash(rootfs_file, &root)?,
            compression => unpack_tarball(rootfs_file, compression, &root)?,
        }
    }
    let text = std::fs::read_to_string(staging.join("metadata.yaml")).map_err(|_| {
        ImageError::Format(
            "the image has no metadata.yaml: an image tarball holds metadata.yaml and rootfs/"
                .into(),
        )
    })?;
    let metadata = parse_metadata(&text)?;
    if machine::is_machine_image(staging) {
        machine::check_disk(&staging.join(machine::DISK_FILE))?;
        return Ok(metadata);
    }
    if !root.is_dir() {
        return Err(ImageError::Format(
            "the image has no rootfs/ directory: a unified image tarball holds metadata.yaml \
             and rootfs/ (a VM image: metadata.yaml and rootfs.img); a split image needs its \
             rootfs as a second file"
                .into(),
        ));
    }
    Ok(metadata)
}

/// The directory holding an image's unpacked files.
pub fn image_directory(images: &Path, fingerprint: &str) -> PathBuf {
    images.join(fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_yaml_scalars_and_properties() {
        let metadata = parse_metadata(
            "architecture: amd64\ncreation_date: 1424284563\nproperties:\n  description: \
             Debian bookworm\n  os: \"Debian\"\n  release: '12'\ntemplates:\n  /etc/hostname:\n    \
             when:\n    - create\n",
        )
        .unwrap();
        assert_eq!(metadata.architecture, "amd64");
        assert_eq!(metadata.creation_date, Some(1424284563));
        assert_eq!(metadata.properties["os"], "Debian");
        assert_eq!(metadata.properties["release"], "12");
        assert_eq!(metadata.properties.len(), 3);
        assert!(parse_metadata("properties:\n  os: x\n").is_err());
    }

    #[test]
    fn fingerprints_are_sha256_of_all_parts_in_order() {
        let mut fingerprinter = Fingerprinter::default();
        fingerprinter.update(b"ab");
        fingerprinter.update(b"c");
        assert_eq!(fingerprinter.size(), 3);
        assert_eq!(
            fingerprinter.finish(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn unified_tarballs_unpack_and_junk_is_refused() {
        let directory = std::env::temp_dir().join(format!("cove-images-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).unwrap();
        let tarball = directory.join("image.tar.gz");
        {
            let file = File::create(&tarball).unwrap();
            let encoder = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
            let mut builder = tar::Builder::new(encoder);
            let text = b"architecture: x86_64\ncreation_date: 1\n";
            let mut header = tar::Header::new_gnu();
            header.set_size(text.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1);
            builder
                .append_data(&mut header, "metadata.yaml", &text[..])
                .unwrap();
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            header.set_mode(0o755);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1);
            builder
                .append_data(&mut header, "rootfs/etc", &[][..])
                .unwrap();
            builder.into_inner().unwrap().finish().unwrap();
        }
        let metadata = unpack(&directory.join("staging"), &tarball, None).unwrap();
        assert_eq!(metadata.architecture, "x86_64");
        assert!(directory.join("staging/rootfs/etc").is_dir());

        let junk = directory.join("junk");
        std::fs::write(&junk, b"not an image").unwrap();
        let error = unpack(&directory.join("staging2"), &junk, None).unwrap_err();
        assert!(error.to_string().contains("not an image"), "{error}");
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
