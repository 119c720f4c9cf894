//! What confines every process of a container, applied by init and by each command `exec`
//! starts, just before `execve`: capabilities dropped from the bounding set, then the seccomp
//! filter (which must come last: installing it needs CAP_SYS_ADMIN, and dropping needs
//! CAP_SETPCAP). Built once in the parent when the container starts, and kept by the
//! container for its commands.

use crate::capabilities::CapabilitySet;
use crate::config::ContainerConfig;
use crate::seccomp::{SeccompError, SeccompFilter};

/// Which step of [`Confinement::apply`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfinementStep {
    /// Dropping this capability from the bounding set.
    DropCapability(u32),
    InstallSeccomp,
}

/// Nothing dropped, no filter (`Default`): what a process outside any container has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    pub dropped_capabilities: CapabilitySet,
    pub seccomp: Option<SeccompFilter>,
}

impl Confinement {
    /// LXD's confinement for `config`: its capability drops for privileged containers and
    /// its seccomp policy.
    pub fn for_config(config: &ContainerConfig) -> Result<Self, SeccompError> {
        Ok(Self {
            dropped_capabilities: CapabilitySet::lxd_dropped(config.privileged),
            seccomp: SeccompFilter::for_policy(&config.syscalls)?,
        })
    }

    /// Confines the calling process and all it will exec and fork. Allocation-free, for a
    /// cloned child; returns the failing step and errno.
    pub fn apply(&self) -> Result<(), (ConfinementStep, i32)> {
        self.dropped_capabilities
            .drop_from_bounding_set()
            .map_err(|(capability, errno)| (ConfinementStep::DropCapability(capability), errno))?;
        if let Some(filter) = &self.seccomp {
            filter
                .install()
                .map_err(|errno| (ConfinementStep::InstallSeccomp, errno))?;
        }
        Ok(())
    }
}
