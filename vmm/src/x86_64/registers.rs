//! The state a vCPU starts in. Every vCPU gets the FPU, MSR and LAPIC defaults a kernel expects
//! from firmware; the boot vCPU also gets segments, control registers and general registers for
//! the boot protocol of the kernel being started. The other vCPUs wait, as on real hardware, for
//! the INIT and SIPI the guest sends them.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

#[derive(Debug, thiserror::Error)]
pub enum RegistersError {
    #[error("cannot set the vCPU's {what}")]
    Set {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot read the vCPU's {what}")]
    Get {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused MSR {index:#x}, the {position}th of the boot MSRs")]
    Msr { index: u32, position: usize },
    #[error("cannot write the boot {what} into guest memory")]
    Memory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux's 64-bit boot protocol: long mode, identity paging, `rsi` = zero page.
    Linux64,
    /// Xen's PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh,
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs on, everything write-back by default.
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

/// A GDT descriptor from its flags (access byte and the granularity/size nibble), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM view of the descriptor at `index` of the GDT.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        s: bit(44),
        dpl: ((entry >> 45) & 3) as u8,
        present: bit(47),
        avl: bit(52),
        l: bit(53),
        db: bit(54),
        g: bit(55),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// The boot GDT for a protocol: null, code, data, TSS.
fn boot_gdt(protocol: BootProtocol) -> [u64; 4] {
    match protocol {
        BootProtocol::Linux64 => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
        BootProtocol::Pvh => [
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
    }
}

/// FPU, MSRs and the LAPIC's LINT pins: what every vCPU needs before it first runs.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegistersError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| RegistersError::Set {
        what: "FPU",
        source,
    })?;

    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).expect("the boot MSR list fits a KVM MSR array");
    let written = vcpu.set_msrs(&msrs).map_err(|source| RegistersError::Set {
        what: "MSRs",
        source,
    })?;
    if written != entries.len() {
        return Err(RegistersError::Msr {
            index: entries[written].index,
            position: written + 1,
        });
    }

    let mut lapic = vcpu.get_lapic().map_err(|source| RegistersError::Get {
        what: "LAPIC",
        source,
    })?;
    // LINT0 delivers the legacy PIC's interrupts (ExtINT), LINT1 delivers NMIs.
    for (offset, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let register = &mut lapic.regs[offset..offset + 4];
        let bytes: [u8; 4] = std::array::from_fn(|i| register[i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (slot, byte) in register.iter_mut().zip(value.to_le_bytes()) {
            *slot = byte as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|source| RegistersError::Set {
            what: "LAPIC",
            source,
        })
}

/// Segments, control registers and general registers for the boot vCPU entering at `entry`.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    memory: &GuestMemoryMmap,
    protocol: BootProtocol,
    entry: u64,
) -> Result<(), RegistersError> {
    let gdt = boot_gdt(protocol);
    for (index, descriptor) in gdt.iter().enumerate() {
        memory
            .write_obj(*descriptor, GuestAddress(BOOT_GDT_START + index as u64 * 8))
            .map_err(|source| RegistersError::Memory {
                what: "GDT",
                source,
            })?;
    }
    memory
        .write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| RegistersError::Memory {
            what: "IDT",
            source,
        })?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|source| RegistersError::Get {
        what: "special registers",
        source,
    })?;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let mut regs = kvm_regs {
        rflags: 2,
        rip: entry,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Linux64 => {
            write_identity_page_tables(memory)?;
            // Assigned, not OR'ed into KVM's reset values, whose CR0 has caching disabled
            // (CD and NW set).
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = PVH_INFO_START;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|source| RegistersError::Set {
            what: "special registers",
            source,
        })?;
    vcpu.set_regs(&regs).map_err(|source| RegistersError::Set {
        what: "general registers",
        source,
    })
}

/// Maps the first GiB 1:1 with 2 MiB pages, enough for the 64-bit entry to build its own tables.
fn write_identity_page_tables(memory: &GuestMemoryMmap) -> Result<(), RegistersError> {
    let write = |value: u64, address: u64| {
        memory
            .write_obj(value, GuestAddress(address))
            .map_err(|source| RegistersError::Memory {
                what: "page tables",
                source,
            })
    };
    // Present and writable (0x3); in the PD, also a large page (0x80).
    write(PDPTE_START | 0x03, PML4_START)?;
    write(PDE_START | 0x03, PDPTE_START)?;
    for index in 0..512u64 {
        write((index << 21) | 0x83, PDE_START + index * 8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip_through_kvm_segments() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db, code.g),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!(
            (code.base, code.limit, code.present, code.unusable),
            (0, 0xffff_ffff, 1, 0)
        );

        let code32 = segment(gdt_entry(0xc09b, 0, 0xffff_ffff), 1);
        assert_eq!((code32.l, code32.db, code32.limit), (0, 1, 0xffff_ffff));

        let tss = segment(gdt_entry(0x008b, 0x1234_5678, 0x67), 3);
        assert_eq!(
            (tss.base, tss.limit, tss.type_, tss.s, tss.g),
            (0x1234_5678, 0x67, 0xb, 0, 0)
        );
        assert_eq!(segment(0, 0).unusable, 1);
    }
}
