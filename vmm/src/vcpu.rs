//! One thread per vCPU: run the vCPU, route its port and MMIO exits to the buses, and turn the
//! exits that end a VM (reset, triple fault, emulation failure) into an exit reason with a
//! message that says what happened.
//!
//! Other threads interrupt a vCPU that sits in KVM_RUN with a signal ("kick"). The handler sets
//! `immediate_exit` in that thread's `kvm_run`, so a kick that lands just before KVM_RUN is not
//! lost: the next KVM_RUN returns at once.

use std::cell::Cell;
use std::sync::Arc;

use cove_devices::Bus;
use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::control::{ExitReason, VmControl};

thread_local! {
    /// This thread's `kvm_run`, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was set by this thread to its own vCPU's kvm_run mapping, which
        // lives as long as the thread's VcpuFd; a single byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler; call once before any vCPU thread starts.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
}

/// What a vCPU thread needs.
pub struct Vcpu {
    pub index: u32,
    pub host: crate::cpuid::HostKind,
    pub fd: VcpuFd,
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub memory: GuestMemoryMmap,
    pub control: Arc<VmControl>,
    pub seccomp: Option<seccompiler::BpfProgram>,
}

/// KVM's internal-error suberrors (include/uapi/linux/kvm.h).
fn describe_suberror(suberror: u32) -> &'static str {
    match suberror {
        1 => "instruction emulation failed",
        2 => "an exception occurred while delivering another",
        3 => "an event could not be delivered",
        4 => "an unexpected VM exit",
        _ => "unknown suberror",
    }
}

impl Vcpu {
    /// Runs the vCPU until the VM stops.
    pub fn run(mut self) {
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run() as *mut kvm_run));
        if let Err(error) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu, &self.seccomp) {
            self.control
                .request_exit(ExitReason::Failure(crate::describe_error(&error)));
        }
        while self.control.vcpu_may_run() {
            if let Some(reason) = self.run_once() {
                self.control.request_exit(reason);
                break;
            }
        }
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
        self.control.vcpu_finished();
    }

    /// One KVM_RUN and the handling of its exit; returns a reason when the VM must end.
    fn run_once(&mut self) -> Option<ExitReason> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.io_bus.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.io_bus.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioWrite(address, data)) => {
                self.mmio_bus.write(address, data);
                None
            }
            Ok(VcpuExit::MmioRead(address, data)) => {
                self.mmio_bus.read(address, data);
                None
            }
            // With the in-kernel irqchip KVM handles HLT itself; an exit means something is off.
            Ok(VcpuExit::Hlt) => Some(ExitReason::Failure(format!(
                "vCPU {index} halted and KVM handed the HLT to cove-vmm, which cannot wake it"
            ))),
            Ok(VcpuExit::Shutdown) => Some(ExitReason::Failure(format!(
                "the guest triple-faulted on vCPU {index} {}",
                self.where_it_stopped()
            ))),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::GuestPowerOff),
                KVM_SYSTEM_EVENT_RESET => Some(ExitReason::GuestReset),
                KVM_SYSTEM_EVENT_CRASH => Some(ExitReason::Failure(format!(
                    "the guest reported a crash on vCPU {index}"
                ))),
                other => Some(ExitReason::Failure(format!(
                    "unexpected system event {other} on vCPU {index}"
                ))),
            },
            Ok(VcpuExit::InternalError) => Some(self.internal_error()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Failure(format!(
                "KVM could not enter vCPU {index} (hardware entry failure reason {reason:#x} on \
                 host CPU {cpu})"
            ))),
            Ok(VcpuExit::MemoryFault { gpa, size, .. }) => Some(ExitReason::Failure(format!(
                "vCPU {index} touched guest memory KVM could not map: {size} bytes at {gpa:#x}"
            ))),
            Ok(other) => Some(ExitReason::Failure(format!(
                "unexpected exit on vCPU {index}: {other:?}"
            ))),
            Err(error) if matches!(error.errno(), libc::EINTR | libc::EAGAIN) => {
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(error) => Some(ExitReason::Failure(format!(
                "vCPU {index} failed to run: {error}"
            ))),
        }
    }

    /// The report for KVM_EXIT_INTERNAL_ERROR: suberror, RIP and the bytes of the instruction.
    fn internal_error(&mut self) -> ExitReason {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // KVM filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let count = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..count]
            .iter()
            .map(|word| format!("{word:#x}"))
            .collect();
        ExitReason::Failure(format!(
            "KVM internal error on vCPU {}: {} (suberror {}) {}; data [{}]{}",
            self.index,
            describe_suberror(internal.suberror),
            internal.suberror,
            self.where_it_stopped(),
            data.join(", "),
            if self.host == crate::cpuid::HostKind::KvmPvm {
                "; this host is kvm-pvm, which cannot emulate every instruction in guest kernel \
                 mode (see docs/kvm-pvm.md)"
            } else {
                ""
            }
        ))
    }

    /// "at RIP 0x...: instruction bytes ..." as far as the registers and memory can be read.
    fn where_it_stopped(&self) -> String {
        let Ok(regs) = self.fd.get_regs() else {
            return "(registers unreadable)".into();
        };
        let Ok(sregs) = self.fd.get_sregs() else {
            return format!("at RIP {:#x}", regs.rip);
        };
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        let physical = match self.fd.translate_gva(linear) {
            Ok(translation) if translation.valid != 0 => translation.physical_address,
            _ if sregs.cr0 & (1 << 31) == 0 => linear,
            _ => return format!("at RIP {:#x} (not mapped)", regs.rip),
        };
        let mut bytes = [0u8; 15];
        let mut read = 0;
        while read < bytes.len()
            && self
                .memory
                .read_slice(
                    &mut bytes[read..read + 1],
                    GuestAddress(physical + read as u64),
                )
                .is_ok()
        {
            read += 1;
        }
        let hex: Vec<String> = bytes[..read]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        format!(
            "at RIP {:#x} (physical {physical:#x}): instruction bytes [{}]",
            regs.rip,
            hex.join(" ")
        )
    }
}
