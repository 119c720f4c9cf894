//! cove-shim: the container core shared by the host monitor, the in-guest agent and the
//! containerd shim.
//!
//! This crate holds no code yet. What lives here: creating a system container from a rootfs and a
//! typed configuration (namespaces, user-namespace id maps, cgroups, the root filesystem, devices,
//! seccomp), exec into it, and the per-container monitor process. What must not: a command line
//! parser (the binaries are thin shells over this library) or anything about HTTP.
