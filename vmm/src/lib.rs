//! cove-vmm: a lightweight virtual machine monitor on KVM, one process per VM.
//!
//! The boot path reads top to bottom: the command line or a JSON file becomes a `VmConfig`
//! (`cli`, `config`), `Vm::build` turns it into a VM ready to run (`vm`, with `loader` for the
//! kernel, `x86_64` for the machine's layout and registers, `cpuid` for what the guest CPU
//! shows), and `Vm::run` runs one thread per vCPU (`vcpu`) beside an event loop that serves the
//! console, signals and the HTTP API (`api`, `http`, `terminal`). Device models live in the
//! `cove-devices` crate and know nothing of KVM.

pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod cpuid;
pub mod http;
pub mod loader;
pub mod seccomp;
pub mod serial_input;
pub mod teardown;
pub mod terminal;
pub mod vcpu;
pub mod virtio;
pub mod vm;
pub mod x86_64;

pub use config::VmConfig;
pub use vm::{Vm, VmError};

/// An error and its causes on one line, each cause added only if the message does not already
/// contain it.
pub fn describe_error(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
