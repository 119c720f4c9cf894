//! Virtual machine images, as LXD has them: a metadata tarball plus a disk, either in one
//! tarball (`metadata.yaml` and `rootfs.img`) or uploaded as two parts, the second named
//! `rootfs.img`. The image's type is then `virtual-machine`.
//!
//! cove boots its own kernel straight into the disk (`root=/dev/vda`), with no firmware or
//! boot loader, so the disk must be a bare ext2/3/4 file system, not a partitioned (UEFI) disk
//! and not a qcow2 file; anything else is refused at import with what coved takes. The disk is
//! kept as `images/<fingerprint>/rootfs.img`; each VM's disk is made from it by
//! `crate::instances::vm_disk`.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::ImageError;

/// The disk of a VM image, in the tarball, in the upload and in the image's directory.
pub const DISK_FILE: &str = "rootfs.img";

/// The image (and instance) type of a VM image, as LXD spells it.
pub const KIND: &str = "virtual-machine";

/// What a disk file holds, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// An ext2/3/4 file system from its first byte: what coved boots.
    Ext,
    Qcow2,
    /// A partition table (MBR or GPT): a whole disk, as LXD's UEFI images are.
    Partitioned,
    Unknown,
}

/// Reads the format of a disk from its first 2 KiB.
pub fn disk_format(path: &Path) -> Result<DiskFormat, ImageError> {
    let mut head = Vec::with_capacity(2048);
    File::open(path)
        .and_then(|file| file.take(2048).read_to_end(&mut head))
        .map_err(|source| ImageError::Io {
            what: format!("read {}", path.display()),
            source,
        })?;
    Ok(format_of(&head))
}

fn format_of(head: &[u8]) -> DiskFormat {
    if head.starts_with(b"QFI\xfb") {
        return DiskFormat::Qcow2;
    }
    // The ext superblock starts at byte 1024; its magic 0xEF53 is at offset 56 in it.
    if head.get(1080..1082) == Some(&[0x53, 0xef][..]) {
        return DiskFormat::Ext;
    }
    if head.get(512..520) == Some(&b"EFI PART"[..]) || head.get(510..512) == Some(&[0x55, 0xaa][..])
    {
        return DiskFormat::Partitioned;
    }
    DiskFormat::Unknown
}

/// Refuses a disk coved cannot boot, saying what it takes.
pub fn check_disk(path: &Path) -> Result<(), ImageError> {
    const TAKES: &str = "coved boots a VM image's rootfs.img as a raw ext4 file system \
                         (mkfs.ext4 -d ROOTFS rootfs.img), since it starts its own kernel with \
                         root=/dev/vda";
    let problem = match disk_format(path)? {
        DiskFormat::Ext => return Ok(()),
        DiskFormat::Qcow2 => "rootfs.img is a qcow2 file",
        DiskFormat::Partitioned => {
            "rootfs.img is a partitioned disk (a UEFI image), not a file system"
        }
        DiskFormat::Unknown => "rootfs.img holds no ext2/3/4 file system",
    };
    Err(ImageError::Format(format!(
        "{problem}: {TAKES}; put metadata.yaml and rootfs.img in one tarball (tar -cf \
         image.tar metadata.yaml rootfs.img) and import that"
    )))
}

/// True for an unpacked image whose root is a disk (a VM image).
pub fn is_machine_image(directory: &Path) -> bool {
    !directory.join("rootfs").exists() && directory.join(DISK_FILE).is_file()
}

/// True for a file that is a VM disk rather than a rootfs tarball or squashfs: what `cove
/// image import META DISK` sends as `rootfs.img`.
pub fn looks_like_disk(path: &Path) -> bool {
    matches!(
        disk_format(path),
        Ok(DiskFormat::Ext | DiskFormat::Qcow2 | DiskFormat::Partitioned)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(patches: &[(usize, &[u8])]) -> Vec<u8> {
        let mut bytes = vec![0u8; 2048];
        for (offset, patch) in patches {
            bytes[*offset..offset + patch.len()].copy_from_slice(patch);
        }
        bytes
    }

    #[test]
    fn formats_are_told_apart_by_their_magic() {
        assert_eq!(format_of(&head(&[(1080, &[0x53, 0xef])])), DiskFormat::Ext);
        assert_eq!(format_of(&head(&[(0, b"QFI\xfb")])), DiskFormat::Qcow2);
        assert_eq!(
            format_of(&head(&[(510, &[0x55, 0xaa]), (512, b"EFI PART")])),
            DiskFormat::Partitioned
        );
        assert_eq!(format_of(&head(&[])), DiskFormat::Unknown);
        assert_eq!(format_of(b"short"), DiskFormat::Unknown);
    }

    #[test]
    fn refusals_say_what_coved_takes() {
        let directory = std::env::temp_dir().join(format!("cove-machine-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let disk = directory.join(DISK_FILE);
        std::fs::write(&disk, head(&[(0, b"QFI\xfb")])).unwrap();
        let error = check_disk(&disk).unwrap_err().to_string();
        assert!(
            error.contains("qcow2") && error.contains("raw ext4"),
            "{error}"
        );
        std::fs::write(&disk, head(&[(1080, &[0x53, 0xef])])).unwrap();
        check_disk(&disk).unwrap();
        assert!(is_machine_image(&directory));
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
