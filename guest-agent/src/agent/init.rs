//! What the agent does first as the guest's init (PID 1 of a microVM's initramfs or root file
//! system, or `--init`): mount the file systems programs expect, bring up the loopback
//! interface, and become the reaper of orphans when it is not PID 1.
//!
//! Nothing is mounted where something already is, and the tmpfs mounts (/run, /tmp) go only
//! on empty directories, so that running the agent as init on a system that is already set up
//! (the host tests' namespaces) hides nothing. Problems are logged, never fatal: an agent that
//! serves with /tmp missing is more useful than one that stopped.

use std::ffi::CString;
use std::path::Path;

use super::log;
use super::state::interface_request;

/// A file system to mount: where, its type, its options, and whether the directory must be
/// empty first.
struct Mount {
    target: &'static str,
    fstype: &'static str,
    options: &'static str,
    flags: libc::c_ulong,
    only_on_empty: bool,
}

const MOUNTS: &[Mount] = &[
    Mount {
        target: "/proc",
        fstype: "proc",
        options: "",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        only_on_empty: false,
    },
    Mount {
        target: "/sys",
        fstype: "sysfs",
        options: "",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        only_on_empty: false,
    },
    Mount {
        target: "/dev",
        fstype: "devtmpfs",
        options: "mode=0755",
        flags: libc::MS_NOSUID,
        only_on_empty: false,
    },
    Mount {
        target: "/dev/pts",
        fstype: "devpts",
        options: "mode=0620,ptmxmode=0666,gid=5",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        only_on_empty: false,
    },
    Mount {
        target: "/run",
        fstype: "tmpfs",
        options: "mode=0755",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        only_on_empty: true,
    },
    Mount {
        target: "/tmp",
        fstype: "tmpfs",
        options: "mode=1777",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        only_on_empty: true,
    },
];

pub(crate) fn prepare_system(pid1: bool) {
    for mount in MOUNTS {
        if let Err(message) = mount_if_missing(mount) {
            log(&message);
        }
    }
    if let Err(message) = bring_up_loopback() {
        log(&message);
    }
    if !pid1 {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes no pointers.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            log(&format!(
                "cannot become the reaper of orphans: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
}

/// The mount points in /proc/self/mountinfo (empty before /proc is mounted).
fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(str::to_string))
        .collect()
}

fn mount_if_missing(mount: &Mount) -> Result<(), String> {
    if mount_points().iter().any(|point| point == mount.target) {
        return Ok(());
    }
    let target = Path::new(mount.target);
    if let Err(error) = std::fs::create_dir_all(target) {
        return Err(format!("cannot create {}: {error}", mount.target));
    }
    if mount.only_on_empty {
        let empty = std::fs::read_dir(target)
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Ok(());
        }
    }
    let source = CString::new(mount.fstype).map_err(|error| error.to_string())?;
    let target_c = CString::new(mount.target).map_err(|error| error.to_string())?;
    let options = CString::new(mount.options).map_err(|error| error.to_string())?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let result = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            source.as_ptr(),
            mount.flags,
            options.as_ptr().cast(),
        )
    };
    if result != 0 {
        return Err(format!(
            "cannot mount {} on {}: {}",
            mount.fstype,
            mount.target,
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Sets `lo` up; the kernel then gives it 127.0.0.1/8 and ::1.
fn bring_up_loopback() -> Result<(), String> {
    let error = |what: &str| {
        format!(
            "cannot bring up lo: {what}: {}",
            std::io::Error::last_os_error()
        )
    };
    let mut request = interface_request("lo").ok_or("no interface request for lo")?;
    // SAFETY: socket() takes no pointers.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(error("socket"));
    }
    // SAFETY: `request` is a valid ifreq naming lo, which outlives both calls.
    let result = unsafe {
        if libc::ioctl(socket, libc::SIOCGIFFLAGS, &mut request) != 0 {
            -1
        } else {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(socket, libc::SIOCSIFFLAGS, &request)
        }
    };
    let outcome = if result != 0 {
        Err(error("ioctl"))
    } else {
        Ok(())
    };
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(socket) };
    outcome
}
