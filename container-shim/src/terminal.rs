//! Pseudo-terminals for commands run with `exec -t` (as `lxc exec` gives by default): the
//! terminal end becomes the command's stdin, stdout, stderr and controlling terminal, the
//! controlling end goes to the caller.
//!
//! The pair is opened from the container's own devpts instance (`<init's root>/dev/pts/ptmx`,
//! reached with `openat2(RESOLVE_IN_ROOT)` so that no link the container made can lead
//! elsewhere), so the command sees a terminal that exists in its `/dev/pts` (`tty` prints
//! `/dev/pts/N`, programs that look their terminal up by name find it). Where the container
//! has no usable devpts, the host's `/dev/ptmx` serves instead: the command still gets a
//! working terminal, only without a name inside. Either way the terminal end is handed to the
//! command's user as the container maps it, group `tty`, as the console is.
//!
//! What must not live here: the copying between a caller's terminal and the controlling end
//! (that is the caller's business: `monitor::attach` for `cove-shim exec -t`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// `DEVPTS_SUPER_MAGIC` from `<linux/magic.h>`.
const DEVPTS_SUPER_MAGIC: libc::c_long = 0x1cd1;
/// `openat2(2)`: resolve the path as if the directory were the root.
const RESOLVE_IN_ROOT: u64 = 0x10;
/// `openat2(2)`: refuse `/proc/<pid>/fd`-style magic links on the way.
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;

/// A terminal's window size, as `TIOCSWINSZ` sets it and `stty size` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalSize {
    pub rows: u16,
    pub columns: u16,
}

impl Default for TerminalSize {
    fn default() -> Self {
        Self {
            rows: 24,
            columns: 80,
        }
    }
}

/// Both ends of a command's pseudo-terminal.
#[derive(Debug)]
pub struct TerminalPair {
    /// The controlling end, for the caller.
    pub controller: OwnedFd,
    /// The terminal end, for the command.
    pub terminal: OwnedFd,
}

/// `struct open_how` from `<linux/openat2.h>`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens a pseudo-terminal for a command in the container whose init is `init_pid`: from the
/// container's devpts if it has one, else the host's. The terminal end belongs to host ids
/// `owner` and has the window size `size`.
pub fn open_for_container(
    init_pid: u32,
    owner: (u32, u32),
    size: TerminalSize,
) -> io::Result<TerminalPair> {
    let controller = match open_container_multiplexer(init_pid) {
        Ok(controller) => controller,
        Err(_) => open_host_multiplexer()?,
    };
    // SAFETY: the fd is an open pseudo-terminal controller.
    if unsafe { libc::unlockpt(controller.as_raw_fd()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // TIOCGPTPEER opens the matching terminal end without looking up a path (which would be
    // the container's to redirect).
    // SAFETY: an ioctl on an open controller; the kernel returns a new fd.
    let terminal = unsafe {
        libc::ioctl(
            controller.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if terminal < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    let terminal = unsafe { OwnedFd::from_raw_fd(terminal) };
    std::os::unix::fs::fchown(&terminal, Some(owner.0), Some(owner.1))?;
    set_size(terminal.as_fd(), size)?;
    Ok(TerminalPair {
        controller,
        terminal,
    })
}

/// `<init's root>/dev/pts/ptmx`, resolved inside the container's root, checked to be a devpts
/// multiplexer.
fn open_container_multiplexer(init_pid: u32) -> io::Result<OwnedFd> {
    let root = CString::new(format!("/proc/{init_pid}/root"))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid NUL-terminated path; the fd returned is owned below.
    let root = unsafe {
        libc::open(
            root.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if root < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a new fd that nothing else owns.
    let root = unsafe { OwnedFd::from_raw_fd(root) };
    let how = OpenHow {
        flags: (libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    let path = c"dev/pts/ptmx";
    // SAFETY: `root` is open, `path` is NUL-terminated and `how` is a live open_how of the
    // size passed; the kernel only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    // SAFETY: fstatfs fills the zeroed statfs it is given.
    let mut file_system: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `fd` is open.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut file_system) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if file_system.f_type as libc::c_long != DEVPTS_SUPER_MAGIC {
        return Err(io::Error::other(
            "the container's /dev/pts/ptmx is not on devpts",
        ));
    }
    Ok(fd)
}

fn open_host_multiplexer() -> io::Result<OwnedFd> {
    // SAFETY: posix_openpt takes flags only.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: posix_openpt returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the window size of the terminal behind `fd` (either end); the kernel sends SIGWINCH
/// to the terminal's foreground process group when it changes.
pub fn set_size(fd: BorrowedFd<'_>, size: TerminalSize) -> io::Result<()> {
    let window = libc::winsize {
        ws_row: size.rows,
        ws_col: size.columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `window` is a live winsize; the kernel only reads it.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &window) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The window size of the terminal behind `fd`; fails when `fd` is no terminal.
pub fn size_of(fd: BorrowedFd<'_>) -> io::Result<TerminalSize> {
    // SAFETY: an all-zero winsize is valid storage for the kernel to fill.
    let mut window: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: `window` is a live winsize the kernel writes into.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut window) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TerminalSize {
        rows: window.ws_row,
        columns: window.ws_col,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_host_pair_carries_bytes_and_its_size() {
        // No container: init "pid" 0 has no /proc entry, so the host's multiplexer serves.
        // SAFETY: geteuid/getegid have no preconditions.
        let owner = unsafe { (libc::geteuid(), libc::getegid()) };
        let size = TerminalSize {
            rows: 33,
            columns: 101,
        };
        let pair = open_for_container(0, owner, size).expect("a pseudo-terminal");
        assert_eq!(size_of(pair.terminal.as_fd()).expect("a size"), size);
        let bigger = TerminalSize {
            rows: 50,
            columns: 132,
        };
        set_size(pair.controller.as_fd(), bigger).expect("resize");
        assert_eq!(size_of(pair.terminal.as_fd()).expect("a size"), bigger);

        let mut terminal = std::fs::File::from(pair.terminal);
        terminal.write_all(b"out\n").expect("write");
        let mut controller = std::fs::File::from(pair.controller);
        let mut buffer = [0u8; 16];
        let read = controller.read(&mut buffer).expect("read");
        // The line discipline turns \n into \r\n on the way out.
        assert_eq!(&buffer[..read], b"out\r\n");
    }

    #[test]
    fn sizes_serialize_as_the_protocol_documents() {
        let size = TerminalSize {
            rows: 24,
            columns: 80,
        };
        assert_eq!(
            serde_json::to_string(&size).expect("serializes"),
            "{\"rows\":24,\"columns\":80}"
        );
        assert!(serde_json::from_str::<TerminalSize>("{\"rows\":1}").is_err());
        assert!(serde_json::from_str::<TerminalSize>("{\"rows\":-1,\"columns\":2}").is_err());
    }
}
