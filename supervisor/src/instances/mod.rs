//! Instances: what coved knows of each (the store), what runs them (a [`runtime::Runtime`]),
//! and the configuration rules between the two.

pub mod config;
pub mod layers;
pub mod library;
pub mod runtime;
pub mod shim;
