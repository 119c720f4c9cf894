//! cove-shim: the container core shared by the host monitor, the in-guest agent and the
//! containerd shim.
//!
//! What lives here: creating a system container from a rootfs directory and a typed
//! configuration (namespaces, user-namespace id maps, cgroups, a copy-on-write root, `/dev`,
//! the console), running commands in it, its state, and stopping it. The setup order reads top
//! to bottom in [`Container::start`]. What must not: a command line parser (the binaries are
//! thin shells over this library) or anything about HTTP.
//!
//! ```no_run
//! use std::time::Duration;
//! use cove_shim::{Container, ContainerConfig, ExecRequest, Host};
//!
//! let config = ContainerConfig::new("web", "/var/lib/cove/images/busybox");
//! let mut container = Container::start(&config, &Host::default())?;
//! let output = container.exec_output(&ExecRequest::new(&["hostname"]), b"")?;
//! assert_eq!(output.stdout, "web\n");
//! container.stop(Duration::from_secs(10))?;
//! container.delete()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod btrfs;
pub mod capabilities;
pub mod cgroup;
pub mod config;
mod confinement;
pub mod console;
pub mod container;
pub mod control;
pub mod disk;
pub mod exec;
mod filesystem;
pub mod freezer;
pub mod idmap;
mod init;
mod kernel;
pub mod monitor;
mod netlink;
pub mod network;
pub mod rootfs;
pub mod seccomp;
pub mod shift;
pub mod terminal;

pub use config::{
    BridgedNic, ConfigError, ContainerConfig, CpuAllowance, IdShift, InitSystem, Limits, Network,
    SnapshotMethod, SyscallPolicy,
};
pub use container::{Container, ContainerError, ContainerState, Host, Status, StopOutcome};
pub use disk::{DiskError, DiskMount};
pub use exec::{ExecError, ExecOutput, ExecProcess, ExecRequest};
pub use freezer::FreezeError;
pub use idmap::{IdMap, IdRange};
pub use network::{AddressFamily, InterfaceAddress};
pub use terminal::TerminalSize;
