//! cove-agent: the program that runs inside every cove guest and serves the host over
//! virtio-vsock (exec, file transfer, state, shutdown), and the host's side of it.
//!
//! - `protocol`: frames and messages, shared by both sides (written down in docs/agent.md);
//! - `transport`: the byte streams (vsock, Unix sockets, cove-vmm's vsock `CONNECT`);
//! - `agent`: the server that runs in the guest (`cove-agent`);
//! - `client`: the host's library (used by `cove-agent-ctl` and the supervisor).
//!
//! What must not live here: anything that knows about KVM or the supervisor's HTTP API.

pub mod agent;
pub mod client;
pub mod protocol;
pub mod transport;
