//! The protocol between the host and cove-agent, written down in `docs/agent.md`: frames
//! (`frame`) carrying JSON control messages (`messages`) and raw byte streams. Both sides use
//! this module; nothing here knows sockets, processes or files.

pub mod frame;
pub mod messages;

pub use frame::{Channel, Frame, FrameError, FrameReader, FrameWriter, DATA_CHUNK, VERSION};
pub use messages::*;

/// The vsock port the agent serves on unless told otherwise.
pub const DEFAULT_PORT: u32 = 1025;
/// The host (CID 2) vsock port the agent announces itself to unless told otherwise.
pub const DEFAULT_ANNOUNCE_PORT: u32 = 1024;

/// `cove-agent <version>`: how the agent names itself in its hello.
pub fn agent_name() -> String {
    format!("cove-agent {}", env!("CARGO_PKG_VERSION"))
}
