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

pub mod cgroup;
pub mod config;
pub mod console;
pub mod container;
pub mod exec;
mod filesystem;
pub mod idmap;
mod init;
mod kernel;
pub mod rootfs;

pub use config::{ConfigError, ContainerConfig, CpuAllowance, InitSystem, Limits, Network};
pub use container::{Container, ContainerError, ContainerState, Host, Status, StopOutcome};
pub use exec::{ExecError, ExecOutput, ExecProcess, ExecRequest};
pub use idmap::{IdMap, IdRange};
