//! x86_64 machine setup: where things sit in guest-physical memory, the registers a vCPU starts
//! with for each boot protocol, the MP table and ACPI tables that describe the vCPUs and the IOAPIC, and the
//! boot structures (Linux zero page, PVH start info) that hand the kernel its memory map.

pub mod acpi;
pub mod boot;
pub mod layout;
pub mod mptable;
pub mod registers;
