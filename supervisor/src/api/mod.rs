//! The API as both sides of the socket see it. `types` holds the JSON shapes; the daemon's
//! routes live in `crate::server`, not here, so that a client can import this module without
//! pulling in the daemon.

pub mod storage;
pub mod types;
