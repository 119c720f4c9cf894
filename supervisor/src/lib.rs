//! cove-supervisor: `coved`, the daemon that serves the LXD-compatible REST API on a Unix socket
//! and launches one cove-vmm or cove-shim process per instance, and `cove`, its command line.
//!
//! This crate holds no code yet. What lives here: the API types shared by the daemon, the CLI and
//! the tests; the HTTP routes; the SQLite store; images, profiles, storage pools and networks.
//! What must not: device models or container internals, which belong to their own crates.
