//! cove-agent: the program that runs inside every cove guest and serves the host over
//! virtio-vsock (exec, file transfer, state, shutdown).
//!
//! This crate holds no code yet: the agent arrives with virtio-vsock in cove-vmm. What lives
//! here: the agent's protocol, its server loop, and the host-side client library. What must not:
//! anything that knows about KVM or the supervisor's HTTP API.
