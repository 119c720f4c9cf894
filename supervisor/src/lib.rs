//! cove-supervisor: `coved`, the daemon that serves the LXD-compatible REST API on a Unix
//! socket and runs one cove-shim monitor per container, and (later) `cove`, its command line.
//!
//! What lives here: the API types shared by the daemon, the CLI and the tests (`api`); the
//! HTTP routes (`server`); the SQLite store (`store`); managed networks (`networks`); images,
//! operations, events, and the instance layer that drives containers through a small runtime
//! trait (`instances`). What must not: device models or container internals, which belong to
//! their own crates. `docs/api.md` says what the API supports.

pub mod api;
pub mod cli;
pub mod clock;
pub mod daemon;
pub mod events;
pub mod images;
pub mod instances;
pub mod metrics;
pub mod networks;
pub mod operations;
pub mod server;
pub mod snapshots;
pub mod storage;
pub mod store;
