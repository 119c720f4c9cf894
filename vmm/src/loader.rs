//! Recognising and loading what the user asked to boot: an ELF vmlinux (entered through its PVH
//! note when it has one), a PVH ELF, or a bzImage; and placing the initramfs at the top of the
//! RAM below 4 GiB.
//!
//! Recognition (`KernelImage::open`) happens before any VM exists, so a file that is not a
//! kernel is refused without side effects. Loading is linux-loader's.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::x86_64::boot::Initramfs;
use crate::x86_64::layout::{low_memory_end, HIGH_MEMORY_START};
use crate::x86_64::registers::BootProtocol;

/// bzImage header fields (Documentation/arch/x86/boot.rst).
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const XLF_KERNEL_64: u16 = 1;
/// The 64-bit entry point of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read kernel {path}: {source}")]
    ReadKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a kernel: expected an ELF vmlinux, a PVH ELF or a bzImage")]
    NotAKernel(PathBuf),
    #[error("{0} is a 32-bit ELF: cove-vmm boots 64-bit kernels and PVH ELF64 images")]
    NotElf64(PathBuf),
    #[error("the bzImage {0} has no 64-bit entry point (XLF_KERNEL_64): boot a newer kernel")]
    NoLongModeEntry(PathBuf),
    #[error("cannot load kernel {path} into guest memory: {source}; is the memory large enough?")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("cannot open initramfs {path}: {source}")]
    OpenInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the initramfs {path} ({size} bytes) does not fit in guest memory above the kernel: give the VM more memory")]
    InitramfsTooLarge { path: PathBuf, size: u64 },
    #[error("cannot read initramfs {path} into guest memory: {source}")]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Elf,
    BzImage,
}

/// A kernel file that has been recognised but not loaded yet.
pub struct KernelImage {
    path: PathBuf,
    file: File,
    format: Format,
}

/// A loaded kernel: where and how the boot vCPU enters it.
#[derive(Debug)]
pub struct LoadedKernel {
    pub protocol: BootProtocol,
    pub entry: u64,
    /// The end of the loaded image; the initramfs must sit above it.
    pub end: u64,
    /// A bzImage's setup header, which the zero page must carry.
    pub setup_header: Option<setup_header>,
}

impl KernelImage {
    /// Opens `path` and checks that it is a kernel cove-vmm can boot.
    pub fn open(path: &Path) -> Result<Self, LoaderError> {
        let read_error = |source| LoaderError::ReadKernel {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(|source| LoaderError::OpenKernel {
            path: path.to_path_buf(),
            source,
        })?;
        if file.metadata().map_err(read_error)?.is_dir() {
            return Err(LoaderError::NotAKernel(path.to_path_buf()));
        }
        let mut ident = [0u8; 5];
        let ident_length = read_up_to(&mut file, &mut ident).map_err(read_error)?;
        let format = if ident_length >= 4 && ident[..4] == *b"\x7fELF" {
            if ident_length < 5 || ident[4] != 2 {
                return Err(LoaderError::NotElf64(path.to_path_buf()));
            }
            Format::Elf
        } else {
            let mut magic = [0u8; 4];
            file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
                .map_err(read_error)?;
            let magic_length = read_up_to(&mut file, &mut magic).map_err(read_error)?;
            if magic_length != 4 || magic != *BZIMAGE_MAGIC {
                return Err(LoaderError::NotAKernel(path.to_path_buf()));
            }
            Format::BzImage
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            format,
        })
    }

    /// Loads the kernel into guest memory.
    pub fn load(mut self, memory: &GuestMemoryMmap) -> Result<LoadedKernel, LoaderError> {
        let load_error = |source| LoaderError::Load {
            path: self.path.clone(),
            source,
        };
        let high_memory = Some(GuestAddress(HIGH_MEMORY_START));
        match self.format {
            Format::Elf => {
                let result =
                    Elf::load(memory, None, &mut self.file, high_memory).map_err(load_error)?;
                let (protocol, entry) = match result.pvh_boot_cap {
                    PvhBootCapability::PvhEntryPresent(entry) => (BootProtocol::Pvh, entry.0),
                    _ => (BootProtocol::Linux64, result.kernel_load.0),
                };
                Ok(LoadedKernel {
                    protocol,
                    entry,
                    end: result.kernel_end,
                    setup_header: None,
                })
            }
            Format::BzImage => {
                let result =
                    BzImage::load(memory, None, &mut self.file, high_memory).map_err(load_error)?;
                let header = result.setup_header;
                if header.is_none_or(|header| header.xloadflags & XLF_KERNEL_64 == 0) {
                    return Err(LoaderError::NoLongModeEntry(self.path));
                }
                Ok(LoadedKernel {
                    protocol: BootProtocol::Linux64,
                    entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                    end: result.kernel_end,
                    setup_header: header,
                })
            }
        }
    }
}

/// Reads as much of `buffer` as the file has, stopping early at its end.
fn read_up_to(file: &mut File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..])? {
            0 => break,
            read => filled += read,
        }
    }
    Ok(filled)
}

/// Opens the initramfs before any VM exists, so that a missing file is reported first.
pub fn open_initramfs(path: &Path) -> Result<(File, u64), LoaderError> {
    let open_error = |source| LoaderError::OpenInitramfs {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(open_error)?;
    let metadata = file.metadata().map_err(open_error)?;
    if metadata.is_dir() {
        return Err(open_error(std::io::Error::from(
            std::io::ErrorKind::IsADirectory,
        )));
    }
    Ok((file, metadata.len()))
}

/// Copies the initramfs to the highest page-aligned place below 4 GiB (and below the 3 GiB MMIO
/// hole) that clears the kernel, as Linux expects to find it.
pub fn load_initramfs(
    memory: &GuestMemoryMmap,
    memory_size: u64,
    kernel_end: u64,
    path: &Path,
    file: &mut File,
    size: u64,
) -> Result<Initramfs, LoaderError> {
    let too_large = || LoaderError::InitramfsTooLarge {
        path: path.to_path_buf(),
        size,
    };
    let address = low_memory_end(memory_size)
        .checked_sub(size)
        .map(|top| top & !(PAGE_SIZE - 1))
        .filter(|address| *address >= kernel_end)
        .ok_or_else(too_large)?;
    memory
        .read_exact_volatile_from(GuestAddress(address), file, size as usize)
        .map_err(|source| LoaderError::ReadInitramfs {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Initramfs { address, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temporary_file(name: &str, contents: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("cove-loader-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(contents).unwrap();
        path
    }

    #[test]
    fn files_that_are_not_kernels_are_refused_by_name() {
        let text = temporary_file("text", b"#!/bin/sh\necho not a kernel\n");
        let error = KernelImage::open(&text).err().unwrap().to_string();
        assert!(error.contains("is not a kernel"), "{error}");
        let empty = temporary_file("empty", b"");
        assert!(matches!(
            KernelImage::open(&empty),
            Err(LoaderError::NotAKernel(_))
        ));
        let elf32 = temporary_file("elf32", b"\x7fELF\x01\x01\x01");
        assert!(matches!(
            KernelImage::open(&elf32),
            Err(LoaderError::NotElf64(_))
        ));
        let missing = KernelImage::open(Path::new("/nonexistent/vmlinux"))
            .err()
            .unwrap();
        assert!(missing
            .to_string()
            .starts_with("cannot open kernel /nonexistent/vmlinux"));
        assert!(matches!(
            KernelImage::open(Path::new("/")),
            Err(LoaderError::NotAKernel(_))
        ));
        for path in [text, empty, elf32] {
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn a_truncated_elf_fails_to_load_with_a_message() {
        let path = temporary_file("truncated", b"\x7fELF\x02\x01\x01\x00");
        let image = KernelImage::open(&path).unwrap();
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let error = image.load(&memory).unwrap_err().to_string();
        assert!(error.starts_with("cannot load kernel"), "{error}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_memory() {
        let contents = vec![0x5a; 5000];
        let path = temporary_file("initramfs", &contents);
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let (mut file, size) = open_initramfs(&path).unwrap();
        let placed = load_initramfs(&memory, 16 << 20, 2 << 20, &path, &mut file, size).unwrap();
        assert_eq!(
            placed,
            Initramfs {
                address: (16 << 20) - 2 * PAGE_SIZE,
                size: 5000
            }
        );
        let mut back = vec![0; 5000];
        memory
            .read_slice(&mut back, GuestAddress(placed.address))
            .unwrap();
        assert_eq!(back, contents);

        let (mut file, size) = open_initramfs(&path).unwrap();
        let error = load_initramfs(&memory, 16 << 20, (16 << 20) - 100, &path, &mut file, size);
        assert!(matches!(error, Err(LoaderError::InitramfsTooLarge { .. })));
        std::fs::remove_file(path).unwrap();
    }
}
