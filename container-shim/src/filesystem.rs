//! What the container sees of files: the mounts its init makes in its new mount namespace
//! before `pivot_root` (`/proc` with its host-wide knobs read-only, a read-only `/sys`,
//! `/sys/fs/cgroup`, a `/dev` with the usual nodes, devpts, shm, mqueue and the console).
//!
//! The plan is built in the parent, where allocating is fine, and run in the cloned child,
//! where it is not: [`FilesystemPlan::run`] only walks prepared C strings and makes system
//! calls. A failing step is reported by its index, which [`FilesystemPlan::describe`] turns
//! back into words in the parent.

use std::ffi::CString;
use std::path::Path;

use crate::cgroup::CgroupLayout;
use crate::disk::{DiskError, DiskMount};
use crate::kernel;
use crate::rootfs::c_path;

/// Host device nodes bound into the container's `/dev`: they cannot be made in a user namespace,
/// and these are safe to share.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// One allocation-free step.
#[derive(Debug)]
enum Step {
    MakeDirectory {
        path: CString,
    },
    CreateFile {
        path: CString,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    Mount {
        source: Option<CString>,
        target: CString,
        file_system: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
        /// Skipped when the target does not exist (a file the host kernel may not have).
        optional: bool,
    },
}

/// Every step that builds the container's mounts, in order.
#[derive(Debug)]
pub struct FilesystemPlan {
    steps: Vec<Step>,
}

fn text(value: &str) -> CString {
    CString::new(value).unwrap_or_default()
}

impl FilesystemPlan {
    /// The plan for the snapshot mounted at `root`, with `console` (a pty's terminal) as
    /// `/dev/console`, and the host's cgroup hierarchies remounted under `/sys/fs/cgroup`
    /// (inside the container's cgroup namespace they show only its own cgroup).
    pub fn new(root: &Path, console: &Path, cgroups: &CgroupLayout) -> Self {
        let under = |relative: &str| c_path(&root.join(relative));
        let restricted = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        let mut plan = Self { steps: Vec::new() };
        // Nothing mounted from here on may leak back to the host.
        plan.mount(None, text("/"), None, libc::MS_REC | libc::MS_PRIVATE, None);
        plan.mount(
            Some(c_path(root)),
            c_path(root),
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        );
        for directory in ["proc", "sys", "dev"] {
            plan.steps.push(Step::MakeDirectory {
                path: under(directory),
            });
        }
        plan.mount(
            Some(text("proc")),
            under("proc"),
            Some("proc"),
            restricted,
            None,
        );
        // As LXD does: the kernel's knobs under /proc/sys and /proc/sysrq-trigger are
        // read-only (for a privileged container they would be the host's), but the
        // container's own network namespace stays tunable under /proc/sys/net.
        // (Kernels without CONFIG_MAGIC_SYSRQ, such as this project's development host's,
        // have no sysrq-trigger.)
        for protected in ["proc/sys", "proc/sysrq-trigger"] {
            for flags in [
                libc::MS_BIND,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | restricted,
            ] {
                plan.steps.push(Step::Mount {
                    source: (flags & libc::MS_REMOUNT == 0).then(|| under(protected)),
                    target: under(protected),
                    file_system: None,
                    flags,
                    data: None,
                    optional: true,
                });
            }
        }
        // A bind mount starts with its source's flags: make this one writable again.
        plan.mount(
            Some(under("proc/sys/net")),
            under("proc/sys/net"),
            None,
            libc::MS_BIND,
            None,
        );
        plan.mount(
            None,
            under("proc/sys/net"),
            None,
            libc::MS_BIND | libc::MS_REMOUNT | restricted,
            None,
        );
        plan.mount(
            Some(text("sysfs")),
            under("sys"),
            Some("sysfs"),
            restricted | libc::MS_RDONLY,
            None,
        );
        plan.mount(
            Some(text("tmpfs")),
            under("dev"),
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("mode=755,size=65536k"),
        );
        for device in DEVICES {
            let target = under(&format!("dev/{device}"));
            plan.steps.push(Step::CreateFile {
                path: target.clone(),
            });
            let source = text(&format!("/dev/{device}"));
            plan.mount(Some(source), target, None, libc::MS_BIND, None);
        }
        plan.steps.push(Step::CreateFile {
            path: under("dev/console"),
        });
        plan.mount(
            Some(c_path(console)),
            under("dev/console"),
            None,
            libc::MS_BIND,
            None,
        );
        for (directory, file_system, data) in [
            (
                "dev/pts",
                "devpts",
                "newinstance,ptmxmode=0666,mode=0620,gid=5",
            ),
            ("dev/shm", "tmpfs", "mode=1777,size=65536k"),
            ("dev/mqueue", "mqueue", ""),
        ] {
            plan.steps.push(Step::MakeDirectory {
                path: under(directory),
            });
            plan.mount(
                Some(text(file_system)),
                under(directory),
                Some(file_system),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                (!data.is_empty()).then_some(data),
            );
        }
        for (target, link) in [
            ("pts/ptmx", "dev/ptmx"),
            ("/proc/self/fd", "dev/fd"),
            ("/proc/self/fd/0", "dev/stdin"),
            ("/proc/self/fd/1", "dev/stdout"),
            ("/proc/self/fd/2", "dev/stderr"),
        ] {
            plan.steps.push(Step::Symlink {
                target: text(target),
                link: under(link),
            });
        }
        plan.add_cgroup_mounts(root, cgroups);
        plan
    }

    fn mount(
        &mut self,
        source: Option<CString>,
        target: CString,
        file_system: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) {
        self.steps.push(Step::Mount {
            source,
            target,
            file_system: file_system.map(text),
            flags,
            data: data.map(text),
            optional: false,
        });
    }

    fn add_cgroup_mounts(&mut self, root: &Path, cgroups: &CgroupLayout) {
        let cgroup_root = root.join("sys/fs/cgroup");
        let restricted = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        let mut hierarchies: Vec<(String, &str, String)> = cgroups
            .legacy
            .iter()
            .map(|hierarchy| {
                let name = hierarchy
                    .mount
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_else(|| hierarchy.controllers.join(","));
                (name, "cgroup", hierarchy.controllers.join(","))
            })
            .collect();
        if cgroups.unified.is_some() {
            let name = if cgroups.is_unified() {
                String::new()
            } else {
                "unified".to_string()
            };
            hierarchies.push((name, "cgroup2", String::new()));
        }
        if !cgroups.is_unified() {
            self.mount(
                Some(text("tmpfs")),
                c_path(&cgroup_root),
                Some("tmpfs"),
                restricted,
                Some("mode=755"),
            );
        }
        for (name, file_system, options) in hierarchies {
            let target = c_path(&cgroup_root.join(&name));
            if !name.is_empty() {
                self.steps.push(Step::MakeDirectory {
                    path: target.clone(),
                });
            }
            self.mount(
                Some(text(file_system)),
                target,
                Some(file_system),
                restricted,
                (!options.is_empty()).then_some(options.as_str()),
            );
        }
    }

    /// `security.nesting`: what nested container runtimes and kubelet need beyond the usual
    /// mounts, as LXD gives it.
    ///
    /// - A second `proc` at `/dev/.lxc/proc` and `sysfs` at `/dev/.lxc/sys`, with nothing
    ///   mounted over them (LXD's `lxc.mount.entry` lines for nesting). A nested runtime that
    ///   makes a *user* namespace (nested LXD, rootless or user-namespaced containers) may only
    ///   mount a fresh proc or sysfs if one is already fully visible in its mount namespace
    ///   (the kernel's `mount_too_revealing`); there every mount it inherited is locked, and
    ///   the read-only overmounts on `/proc/sys` make the container's own `/proc` count as
    ///   hidden. (Without a new user namespace, `unshare -m -p --mount-proc` works anyway.)
    /// - `/dev/kmsg` bound from `kmsg_source`: kubelet refuses to start without a readable
    ///   one (its OOM watcher); see `container::kmsg_source`.
    pub fn add_nesting_mounts(&mut self, root: &Path, kmsg_source: &Path) {
        let under = |relative: &str| c_path(&root.join(relative));
        let restricted = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        for directory in ["dev/.lxc", "dev/.lxc/proc", "dev/.lxc/sys"] {
            self.steps.push(Step::MakeDirectory {
                path: under(directory),
            });
        }
        self.mount(
            Some(text("proc")),
            under("dev/.lxc/proc"),
            Some("proc"),
            restricted,
            None,
        );
        self.mount(
            Some(text("sysfs")),
            under("dev/.lxc/sys"),
            Some("sysfs"),
            restricted,
            None,
        );
        self.steps.push(Step::CreateFile {
            path: under("dev/kmsg"),
        });
        self.steps.push(Step::Mount {
            source: Some(c_path(kmsg_source)),
            target: under("dev/kmsg"),
            file_system: None,
            flags: libc::MS_BIND,
            data: None,
            optional: true,
        });
    }

    /// Disk devices: each source bound (recursively) on its path under `root`, the mount
    /// point created as a directory (or an empty file, for a file source) with the
    /// directories above it; a read-only one remounted read-only, keeping the flags a mount
    /// namespace of a user namespace may not drop (`nosuid`, `nodev`, `noexec`).
    pub fn add_disk_mounts(&mut self, root: &Path, disks: &[DiskMount]) -> Result<(), DiskError> {
        for disk in disks {
            let target = disk.target_under(root)?;
            let mut parents: Vec<&Path> = target
                .ancestors()
                .skip(1)
                .take_while(|ancestor| ancestor.starts_with(root) && *ancestor != root)
                .collect();
            parents.reverse();
            for parent in parents {
                self.steps.push(Step::MakeDirectory {
                    path: c_path(parent),
                });
            }
            if disk.source.is_dir() {
                self.steps.push(Step::MakeDirectory {
                    path: c_path(&target),
                });
            } else {
                self.steps.push(Step::CreateFile {
                    path: c_path(&target),
                });
            }
            self.mount(
                Some(c_path(&disk.source)),
                c_path(&target),
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            );
            if disk.read_only {
                self.mount(
                    None,
                    c_path(&target),
                    None,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | locked_flags(&disk.source),
                    None,
                );
            }
        }
        Ok(())
    }

    /// Runs every step; on failure returns the failing step's index and errno.
    /// Allocation-free: safe in a cloned child.
    pub fn run(&self) -> Result<(), (usize, i32)> {
        for (index, step) in self.steps.iter().enumerate() {
            run_step(step).map_err(|errno| (index, errno))?;
        }
        Ok(())
    }

    /// A step in words, for the error the parent reports.
    pub fn describe(&self, index: usize) -> String {
        match self.steps.get(index) {
            None => format!("step {index}"),
            Some(Step::MakeDirectory { path }) => format!("create directory {path:?}"),
            Some(Step::CreateFile { path }) => format!("create file {path:?}"),
            Some(Step::Symlink { target, link }) => format!("link {link:?} to {target:?}"),
            Some(Step::Mount {
                source,
                target,
                file_system,
                ..
            }) => format!(
                "mount {} ({}) on {target:?}",
                source
                    .as_ref()
                    .map_or("nothing".into(), |s| s.to_string_lossy()),
                file_system
                    .as_ref()
                    .map_or("bind or propagation".into(), |s| s.to_string_lossy())
            ),
        }
    }
}

/// The mount flags of the file system holding `path` that a remount inside a user namespace
/// must keep.
fn locked_flags(path: &Path) -> libc::c_ulong {
    let path = c_path(path);
    // SAFETY: an all-zero statvfs is a valid value for the kernel to overwrite.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stats` is a live, writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return 0;
    }
    let mut flags = 0;
    for (held, flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
    ] {
        if stats.f_flag & held != 0 {
            flags |= flag;
        }
    }
    flags
}

fn run_step(step: &Step) -> Result<(), i32> {
    let tolerate_existing = |result: Result<(), i32>| match result {
        Err(libc::EEXIST) => Ok(()),
        other => other,
    };
    match step {
        Step::MakeDirectory { path } => {
            // SAFETY: `path` is a valid NUL-terminated string.
            tolerate_existing(kernel::errno_of(unsafe {
                libc::mkdir(path.as_ptr(), 0o755)
            }))
        }
        Step::CreateFile { path } => {
            // SAFETY: `path` is a valid NUL-terminated string.
            let fd = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    0o644,
                )
            };
            kernel::errno_of(fd)?;
            // SAFETY: `fd` was just opened here and is closed once.
            unsafe { libc::close(fd) };
            Ok(())
        }
        Step::Symlink { target, link } => tolerate_existing(kernel::errno_of(
            // SAFETY: both are valid NUL-terminated strings.
            unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) },
        )),
        Step::Mount {
            source,
            target,
            file_system,
            flags,
            data,
            optional,
        } => match kernel::mount(
            source.as_deref(),
            target,
            file_system.as_deref(),
            *flags,
            data.as_deref(),
        ) {
            Err(libc::ENOENT) if *optional => Ok(()),
            result => result,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn plan_mounts_dev_and_each_hierarchy() {
        let layout = CgroupLayout {
            unified: Some(PathBuf::from("/sys/fs/cgroup/unified")),
            legacy: vec![crate::cgroup::LegacyHierarchy {
                mount: PathBuf::from("/sys/fs/cgroup/memory"),
                controllers: vec!["memory".into()],
            }],
        };
        let plan = FilesystemPlan::new(Path::new("/c/rootfs"), Path::new("/dev/pts/7"), &layout);
        let described: Vec<String> = (0..plan.steps.len()).map(|i| plan.describe(i)).collect();
        let has = |needle: &str| {
            assert!(
                described.iter().any(|line| line.contains(needle)),
                "no step with {needle:?} in {described:#?}"
            )
        };
        has("mount /dev/pts/7 (bind or propagation) on \"/c/rootfs/dev/console\"");
        has("mount proc (proc) on \"/c/rootfs/proc\"");
        has("mount /c/rootfs/proc/sys/net (bind or propagation) on \"/c/rootfs/proc/sys/net\"");
        has("mount devpts (devpts) on \"/c/rootfs/dev/pts\"");
        has("mount cgroup (cgroup) on \"/c/rootfs/sys/fs/cgroup/memory\"");
        has("mount cgroup2 (cgroup2) on \"/c/rootfs/sys/fs/cgroup/unified\"");
        has("link \"/c/rootfs/dev/ptmx\" to \"pts/ptmx\"");
        assert!(
            !described.iter().any(|line| line.contains(".lxc")),
            "nesting mounts without nesting"
        );
    }

    #[test]
    fn nesting_adds_unobstructed_proc_and_sys_and_kmsg() {
        let layout = CgroupLayout {
            unified: Some(PathBuf::from("/sys/fs/cgroup")),
            legacy: Vec::new(),
        };
        let root = Path::new("/c/rootfs");
        let mut plan = FilesystemPlan::new(root, Path::new("/dev/pts/7"), &layout);
        let before = plan.steps.len();
        plan.add_nesting_mounts(root, Path::new("/dev/kmsg"));
        let added: Vec<String> = (before..plan.steps.len())
            .map(|i| plan.describe(i))
            .collect();
        assert_eq!(
            added,
            [
                "create directory \"/c/rootfs/dev/.lxc\"",
                "create directory \"/c/rootfs/dev/.lxc/proc\"",
                "create directory \"/c/rootfs/dev/.lxc/sys\"",
                "mount proc (proc) on \"/c/rootfs/dev/.lxc/proc\"",
                "mount sysfs (sysfs) on \"/c/rootfs/dev/.lxc/sys\"",
                "create file \"/c/rootfs/dev/kmsg\"",
                "mount /dev/kmsg (bind or propagation) on \"/c/rootfs/dev/kmsg\"",
            ]
        );
    }
}
