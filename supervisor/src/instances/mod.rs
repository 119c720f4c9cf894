//! Instances: what coved knows of each (the store), what runs them (a [`runtime::Runtime`]),
//! and the configuration rules between the two.

pub mod config;
pub mod dispatch;
pub mod layers;
pub mod library;
pub mod runtime;
pub mod shim;
pub mod vm;
pub mod vm_disk;
pub mod vm_exec;
pub mod vm_launch;
pub mod vm_network;
