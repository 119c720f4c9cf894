//! Which capabilities a container's processes may never hold: a mask of capabilities dropped
//! from the bounding set of init (and of every command run in the container) before `execve`,
//! as LXD's `lxc.cap.drop` does.
//!
//! LXD drops `sys_time sys_module sys_rawio` (plus `mac_admin mac_override` unless AppArmor
//! stacking is in use, which cove never does) from **privileged** containers only: in an
//! unprivileged container these capabilities belong to its user namespace and give no power
//! over the host's clock, modules or raw I/O, so LXD keeps the full bounding set there
//! (`lxd/instance/drivers/driver_lxc.go`, `initLXC`). cove follows it.

use std::fmt;

pub const CAP_SYS_MODULE: u32 = 16;
pub const CAP_SYS_RAWIO: u32 = 17;
pub const CAP_SYS_TIME: u32 = 25;
pub const CAP_MAC_OVERRIDE: u32 = 32;
pub const CAP_MAC_ADMIN: u32 = 33;

/// The names LXD's configuration uses, by capability number.
const NAMES: [(u32, &str); 5] = [
    (CAP_SYS_MODULE, "sys_module"),
    (CAP_SYS_RAWIO, "sys_rawio"),
    (CAP_SYS_TIME, "sys_time"),
    (CAP_MAC_OVERRIDE, "mac_override"),
    (CAP_MAC_ADMIN, "mac_admin"),
];

/// A set of capabilities as a bit mask (bit N is capability N), as `/proc/<pid>/status` prints
/// `CapBnd`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapabilitySet(pub u64);

impl CapabilitySet {
    pub const EMPTY: Self = Self(0);

    pub fn of(capabilities: &[u32]) -> Self {
        Self(
            capabilities
                .iter()
                .filter(|capability| **capability < 64)
                .fold(0, |mask, capability| mask | 1 << capability),
        )
    }

    /// What LXD drops from a container's bounding set.
    pub fn lxd_dropped(privileged: bool) -> Self {
        if privileged {
            Self::of(&[
                CAP_SYS_TIME,
                CAP_SYS_MODULE,
                CAP_SYS_RAWIO,
                CAP_MAC_ADMIN,
                CAP_MAC_OVERRIDE,
            ])
        } else {
            Self::EMPTY
        }
    }

    pub fn contains(&self, capability: u32) -> bool {
        capability < 64 && self.0 & (1 << capability) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// Every capability this kernel knows (0 to `last`, from
    /// `/proc/sys/kernel/cap_last_cap`) except these.
    pub fn complement_up_to(&self, last: u32) -> Self {
        let all = if last >= 63 {
            u64::MAX
        } else {
            (1u64 << (last + 1)) - 1
        };
        Self(all & !self.0)
    }

    /// Drops every capability in the set from the calling process's bounding set.
    /// Allocation-free, for a cloned child before `execve`; returns the capability that could
    /// not be dropped and the errno. A capability the running kernel does not know (EINVAL)
    /// cannot be held anyway and is skipped.
    pub fn drop_from_bounding_set(&self) -> Result<(), (u32, i32)> {
        for capability in 0..64u32 {
            if !self.contains(capability) {
                continue;
            }
            // SAFETY: prctl(PR_CAPBSET_DROP) takes plain integers.
            let result = unsafe {
                libc::prctl(
                    libc::PR_CAPBSET_DROP,
                    capability as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                )
            };
            if result < 0 {
                let errno = crate::kernel::last_errno();
                if errno != libc::EINVAL {
                    return Err((capability, errno));
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for CapabilitySet {
    /// LXD's spelling: `sys_module sys_rawio sys_time`; unknown ones as `cap_<number>`.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for capability in (0..64).filter(|capability| self.contains(*capability)) {
            if !first {
                formatter.write_str(" ")?;
            }
            first = false;
            match NAMES.iter().find(|(number, _)| *number == capability) {
                Some((_, name)) => formatter.write_str(name)?,
                None => write!(formatter, "cap_{capability}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lxd_drops_five_capabilities_from_privileged_containers_only() {
        let privileged = CapabilitySet::lxd_dropped(true);
        assert_eq!(
            privileged.0,
            1 << 16 | 1 << 17 | 1 << 25 | 1 << 32 | 1 << 33
        );
        assert_eq!(
            privileged.to_string(),
            "sys_module sys_rawio sys_time mac_override mac_admin"
        );
        assert!(CapabilitySet::lxd_dropped(false).is_empty());
    }

    #[test]
    fn the_bounding_set_left_is_the_complement() {
        // A kernel whose last capability is 40 (CAP_CHECKPOINT_RESTORE), as /proc shows it.
        let left = CapabilitySet::lxd_dropped(true).complement_up_to(40);
        assert_eq!(format!("{:016x}", left.0), "000001fcfdfcffff");
        assert_eq!(
            CapabilitySet::EMPTY.complement_up_to(40).0,
            0x0000_01ff_ffff_ffff
        );
        assert_eq!(CapabilitySet::EMPTY.complement_up_to(63).0, u64::MAX);
        assert!(!CapabilitySet::of(&[70]).contains(70));
        assert_eq!(CapabilitySet::of(&[1, 70]).to_string(), "cap_1");
    }
}
