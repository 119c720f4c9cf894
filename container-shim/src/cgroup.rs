//! Control groups: one cgroup per container, holding its limits and counting its memory and
//! processes. Works on both layouts a host may have: the unified (v2) hierarchy alone, or the
//! hybrid layout where each controller has its own v1 hierarchy beside an (often empty) v2 one.
//!
//! A container named `web` under the parent `cove` lives at `<mount>/cove/web` in every
//! hierarchy. A controller's files are written in the v1 hierarchy that holds it, else in the
//! unified one if it offers it there. The directories are handed to the container's root
//! (delegation) so an init such as systemd can make its own sub-cgroups.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{CpuAllowance, Limits};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read /proc/self/mountinfo to find the cgroup hierarchies: {0}")]
    Mountinfo(#[source] io::Error),
    #[error("no cgroup hierarchy is mounted: mount cgroup2 on /sys/fs/cgroup")]
    NoHierarchy,
    #[error(
        "cgroup {0} already exists: another container of that name runs or was not cleaned up; \
         stop it or remove the directory"
    )]
    Exists(PathBuf),
    #[error("cannot create cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write \"{value}\" to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{limit} needs the {controller} cgroup controller, which this host does not offer; \
         remove the limit or enable the controller"
    )]
    ControllerMissing {
        limit: &'static str,
        controller: &'static str,
    },
    #[error("limits.cpu={wanted} but only {available} CPUs are available to containers")]
    NotEnoughCpus { wanted: u32, available: usize },
    #[error("cannot remove cgroup {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A v1 hierarchy: where it is mounted and which controllers (or `name=` tags) it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyHierarchy {
    pub mount: PathBuf,
    pub controllers: Vec<String>,
}

/// Where the host's cgroup hierarchies are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLayout {
    pub unified: Option<PathBuf>,
    pub legacy: Vec<LegacyHierarchy>,
}

impl CgroupLayout {
    /// The layout of the host this process runs on.
    pub fn detect() -> Result<Self, CgroupError> {
        let text =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
        let layout = Self::from_mountinfo(&text);
        if layout.unified.is_none() && layout.legacy.is_empty() {
            return Err(CgroupError::NoHierarchy);
        }
        Ok(layout)
    }

    /// The layout described by the text of a mountinfo file.
    pub fn from_mountinfo(text: &str) -> Self {
        let mut layout = Self {
            unified: None,
            legacy: Vec::new(),
        };
        for line in text.lines() {
            // Fields: id parent major:minor root mount-point options [optional...] - type
            // source super-options.
            let Some((before, after)) = line.split_once(" - ") else {
                continue;
            };
            let mut mount_fields = before.split(' ');
            let Some(mount_point) = mount_fields.nth(4) else {
                continue;
            };
            let mut fs_fields = after.split(' ');
            let (Some(file_system), Some(_source), Some(options)) =
                (fs_fields.next(), fs_fields.next(), fs_fields.next())
            else {
                continue;
            };
            let mount = PathBuf::from(unescape_mountinfo(mount_point));
            match file_system {
                "cgroup2" if layout.unified.is_none() => layout.unified = Some(mount),
                "cgroup" => {
                    let controllers = options
                        .split(',')
                        .filter(|option| !matches!(*option, "rw" | "ro" | "clone_children"))
                        .filter(|option| !option.starts_with("release_agent="))
                        .map(str::to_string)
                        .collect();
                    layout.legacy.push(LegacyHierarchy { mount, controllers });
                }
                _ => {}
            }
        }
        layout
    }

    /// True when there are only v2 hierarchies.
    pub fn is_unified(&self) -> bool {
        self.legacy.is_empty()
    }

    /// Every hierarchy's mount point, v1 ones first.
    pub fn mounts(&self) -> impl Iterator<Item = &Path> {
        self.legacy
            .iter()
            .map(|hierarchy| hierarchy.mount.as_path())
            .chain(self.unified.as_deref())
    }

    /// Where `controller`'s files live for the cgroup at `relative`, or `None` if the host has
    /// no such controller.
    pub fn controller_directory(&self, controller: &str, relative: &Path) -> Option<PathBuf> {
        if let Some(hierarchy) = self
            .legacy
            .iter()
            .find(|hierarchy| hierarchy.controllers.iter().any(|c| c == controller))
        {
            return Some(hierarchy.mount.join(relative));
        }
        let unified = self.unified.as_ref()?;
        let offered = std::fs::read_to_string(unified.join("cgroup.controllers")).ok()?;
        offered
            .split_whitespace()
            .any(|c| c == controller)
            .then(|| unified.join(relative))
    }
}

impl CgroupLayout {
    /// The `cgroup.procs` file of each cgroup a process is in, from the text of its
    /// `/proc/<pid>/cgroup` read in the host's cgroup namespace: joining these puts another
    /// process beside it. Lines for hierarchies this layout does not know are skipped.
    pub fn process_files_from(&self, proc_cgroup: &str) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for line in proc_cgroup.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(_id), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let mount = if controllers.is_empty() {
                self.unified.as_deref()
            } else {
                self.legacy
                    .iter()
                    .find(|hierarchy| {
                        controllers
                            .split(',')
                            .all(|controller| hierarchy.controllers.iter().any(|c| c == controller))
                    })
                    .map(|hierarchy| hierarchy.mount.as_path())
            };
            if let Some(mount) = mount {
                let relative = path.trim_start_matches('/');
                files.push(mount.join(relative).join("cgroup.procs"));
            }
        }
        files
    }
}

/// mountinfo writes spaces, tabs, newlines and backslashes as octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// One container's cgroup, present in every hierarchy.
#[derive(Debug)]
pub struct Cgroup {
    layout: CgroupLayout,
    relative: PathBuf,
}

impl Cgroup {
    /// Creates `<parent>/<name>` in every hierarchy; fails if it exists anywhere.
    pub fn create(layout: CgroupLayout, parent: &str, name: &str) -> Result<Self, CgroupError> {
        let relative = Path::new(parent).join(name);
        for mount in layout.mounts() {
            let path = mount.join(&relative);
            if path.exists() {
                return Err(CgroupError::Exists(path));
            }
        }
        let cgroup = Self { layout, relative };
        for mount in cgroup.layout.mounts() {
            let mut path = mount.to_path_buf();
            for component in cgroup.relative.components() {
                let parent = path.clone();
                path.push(component);
                match std::fs::create_dir(&path) {
                    Ok(()) => {}
                    Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(source) => {
                        let _ = cgroup.remove(Duration::ZERO);
                        return Err(CgroupError::Create { path, source });
                    }
                }
                // A v1 cpuset cgroup refuses tasks until it has CPUs and memory nodes.
                if path.join("cpuset.mems").exists() && !cgroup.layout.is_unified() {
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        let inherited = read_trimmed(&parent.join(file)).unwrap_or_default();
                        if read_trimmed(&path.join(file))
                            .unwrap_or_default()
                            .is_empty()
                        {
                            write(&path.join(file), &inherited)?;
                        }
                    }
                }
            }
        }
        cgroup.enable_unified_controllers()?;
        Ok(cgroup)
    }

    /// The cgroup `<parent>/<name>` as another process created it (a container whose monitor
    /// is gone), to read or remove it; creates nothing.
    pub fn existing(layout: CgroupLayout, parent: &str, name: &str) -> Self {
        Self {
            layout,
            relative: Path::new(parent).join(name),
        }
    }

    /// The cgroup's path below each hierarchy's mount point, such as `cove/web`.
    pub fn relative(&self) -> &Path {
        &self.relative
    }

    pub fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    /// On the unified hierarchy, a cgroup offers its children only the controllers its
    /// `cgroup.subtree_control` enables, from the root down.
    fn enable_unified_controllers(&self) -> Result<(), CgroupError> {
        let Some(unified) = &self.layout.unified else {
            return Ok(());
        };
        let mut path = unified.clone();
        for component in self.relative.components() {
            let offered = read_trimmed(&path.join("cgroup.controllers")).unwrap_or_default();
            let enable: Vec<String> = offered
                .split_whitespace()
                .filter(|c| matches!(*c, "memory" | "cpu" | "cpuset" | "pids"))
                .map(|c| format!("+{c}"))
                .collect();
            if !enable.is_empty() {
                write(&path.join("cgroup.subtree_control"), &enable.join(" "))?;
            }
            path.push(component);
        }
        Ok(())
    }

    fn directory(
        &self,
        controller: &'static str,
        limit: &'static str,
    ) -> Result<PathBuf, CgroupError> {
        self.layout
            .controller_directory(controller, &self.relative)
            .ok_or(CgroupError::ControllerMissing { limit, controller })
    }

    fn is_legacy(&self, controller: &str) -> bool {
        self.layout
            .legacy
            .iter()
            .any(|hierarchy| hierarchy.controllers.iter().any(|c| c == controller))
    }

    /// Writes every limit in `limits` to the controller files.
    pub fn apply_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        if let Some(bytes) = limits.memory_bytes {
            let directory = self.directory("memory", "limits.memory")?;
            let file = if self.is_legacy("memory") {
                "memory.limit_in_bytes"
            } else {
                "memory.max"
            };
            write(&directory.join(file), &bytes.to_string())?;
        }
        if let Some(processes) = limits.processes {
            let directory = self.directory("pids", "limits.processes")?;
            write(&directory.join("pids.max"), &processes.to_string())?;
        }
        if let Some(count) = limits.cpu_count {
            let directory = self.directory("cpuset", "limits.cpu")?;
            let parent = directory.parent().unwrap_or(&directory);
            let available =
                parse_cpu_list(&read_trimmed(&parent.join(if self.is_legacy("cpuset") {
                    "cpuset.cpus"
                } else {
                    "cpuset.cpus.effective"
                }))?);
            if available.len() < count as usize {
                return Err(CgroupError::NotEnoughCpus {
                    wanted: count,
                    available: available.len(),
                });
            }
            let chosen: Vec<String> = available[..count as usize]
                .iter()
                .map(u32::to_string)
                .collect();
            write(&directory.join("cpuset.cpus"), &chosen.join(","))?;
        }
        match limits.cpu_allowance {
            None => {}
            Some(CpuAllowance::SharePercent(percent)) => {
                let directory = self.directory("cpu", "limits.cpu.allowance")?;
                let shares = shares_for_percent(percent);
                if self.is_legacy("cpu") {
                    write(&directory.join("cpu.shares"), &shares.to_string())?;
                } else {
                    write(
                        &directory.join("cpu.weight"),
                        &weight_for_shares(shares).to_string(),
                    )?;
                }
            }
            Some(CpuAllowance::Quota { quota, period }) => {
                let directory = self.directory("cpu", "limits.cpu.allowance")?;
                let (quota, period) = (quota.as_micros(), period.as_micros());
                if self.is_legacy("cpu") {
                    write(&directory.join("cpu.cfs_period_us"), &period.to_string())?;
                    write(&directory.join("cpu.cfs_quota_us"), &quota.to_string())?;
                } else {
                    write(&directory.join("cpu.max"), &format!("{quota} {period}"))?;
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` file of every hierarchy: writing a pid there moves that process.
    pub fn process_files(&self) -> Vec<PathBuf> {
        self.layout
            .mounts()
            .map(|mount| mount.join(&self.relative).join("cgroup.procs"))
            .collect()
    }

    /// Moves the process `pid` into this cgroup in every hierarchy.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for file in self.process_files() {
            write(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// Hands the cgroup to the container's root (host ids `uid`, `gid`) so it can manage its
    /// own sub-cgroups; the limits files stay host root's.
    pub fn delegate(&self, uid: u32, gid: u32) -> Result<(), CgroupError> {
        for mount in self.layout.mounts() {
            let directory = mount.join(&self.relative);
            for name in [
                "",
                "cgroup.procs",
                "tasks",
                "cgroup.threads",
                "cgroup.subtree_control",
                "cgroup.clone_children",
            ] {
                let path = directory.join(name);
                if name.is_empty() || path.exists() {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(|source| {
                        CgroupError::Write {
                            path: path.clone(),
                            value: format!("owner {uid}:{gid}"),
                            source,
                        }
                    })?;
                }
            }
        }
        Ok(())
    }

    /// The memory the container uses now, in bytes.
    pub fn memory_usage(&self) -> Result<u64, CgroupError> {
        let directory = self.directory("memory", "memory usage")?;
        let file = if self.is_legacy("memory") {
            "memory.usage_in_bytes"
        } else {
            "memory.current"
        };
        read_number(&directory.join(file))
    }

    /// The CPU time the container has used so far.
    pub fn cpu_time(&self) -> Result<Duration, CgroupError> {
        if self.is_legacy("cpuacct") {
            let directory = self.directory("cpuacct", "CPU usage")?;
            return read_number(&directory.join("cpuacct.usage")).map(Duration::from_nanos);
        }
        let directory = self.directory("cpu", "CPU usage")?;
        let path = directory.join("cpu.stat");
        let stat = read_trimmed(&path)?;
        stat.lines()
            .find_map(|line| line.strip_prefix("usage_usec "))
            .and_then(|value| value.trim().parse().ok())
            .map(Duration::from_micros)
            .ok_or_else(|| CgroupError::Read {
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, "no usage_usec line"),
            })
    }

    /// How many tasks the container has now.
    pub fn process_count(&self) -> Result<u64, CgroupError> {
        let directory = self.directory("pids", "process count")?;
        read_number(&directory.join("pids.current"))
    }

    /// Removes the cgroup from every hierarchy, waiting up to `patience` for exiting processes
    /// to leave it. The parent (such as `cove`) stays for other containers.
    pub fn remove(&self, patience: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + patience;
        for mount in self.layout.mounts() {
            let path = mount.join(&self.relative);
            loop {
                match remove_tree(&path) {
                    Ok(()) => break,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => break,
                    Err(error)
                        if error.raw_os_error() == Some(libc::EBUSY)
                            && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(source) => return Err(CgroupError::Remove { path, source }),
                }
            }
        }
        Ok(())
    }
}

/// Removes a cgroup and the sub-cgroups its init made, deepest first (cgroup directories
/// hold only kernel files, which rmdir takes with them).
fn remove_tree(path: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(path)
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn read_trimmed(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .map_err(|source| CgroupError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn read_number(path: &Path) -> Result<u64, CgroupError> {
    read_trimmed(path)?.parse().map_err(|_| CgroupError::Read {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, "not a number"),
    })
}

/// The CPUs in a kernel CPU list such as `0-3,6`.
pub fn parse_cpu_list(list: &str) -> Vec<u32> {
    let mut cpus = Vec::new();
    for part in list
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        match part.split_once('-') {
            Some((first, last)) => {
                if let (Ok(first), Ok(last)) = (first.parse::<u32>(), last.parse::<u32>()) {
                    cpus.extend(first..=last);
                }
            }
            None => cpus.extend(part.parse::<u32>().ok()),
        }
    }
    cpus
}

/// v1 `cpu.shares` for an allowance percentage: 100% is the kernel's default 1024.
fn shares_for_percent(percent: u32) -> u64 {
    (1024 * u64::from(percent) / 100).clamp(2, 262_144)
}

/// The v2 `cpu.weight` that stands for v1 shares (the conversion runc and systemd use).
fn weight_for_shares(shares: u64) -> u64 {
    1 + ((shares - 2) * 9999) / 262_142
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset,clone_children
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,release_agent=/x,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const UNIFIED: &str = "\
25 20 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn hybrid_layout_is_read_from_mountinfo() {
        let layout = CgroupLayout::from_mountinfo(HYBRID);
        assert_eq!(
            layout.unified,
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(layout.legacy.len(), 5);
        assert_eq!(layout.legacy[1].controllers, ["cpuset"]);
        assert_eq!(layout.legacy[4].controllers, ["xattr", "name=systemd"]);
        assert!(!layout.is_unified());
        assert_eq!(
            layout.controller_directory("memory", Path::new("cove/web")),
            Some(PathBuf::from("/sys/fs/cgroup/memory/cove/web"))
        );
        assert_eq!(
            layout.controller_directory("pids", Path::new("cove/web")),
            Some(PathBuf::from("/sys/fs/cgroup/pids/cove/web"))
        );
        assert_eq!(layout.mounts().count(), 6);
    }

    #[test]
    fn unified_layout_has_no_legacy_hierarchies() {
        let layout = CgroupLayout::from_mountinfo(UNIFIED);
        assert_eq!(layout.unified, Some(PathBuf::from("/sys/fs/cgroup")));
        assert!(layout.is_unified());
        assert_eq!(
            layout.mounts().collect::<Vec<_>>(),
            [Path::new("/sys/fs/cgroup")]
        );
    }

    #[test]
    fn escaped_mount_points_are_unescaped() {
        let layout = CgroupLayout::from_mountinfo(
            "25 20 0:22 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(layout.unified, Some(PathBuf::from("/mnt/my cgroups")));
    }

    #[test]
    fn a_process_is_joined_where_it_is() {
        let layout = CgroupLayout::from_mountinfo(HYBRID);
        let files = layout.process_files_from(
            "9:name=systemd:/cove/web/init.scope\n8:pids:/cove/web\n4:memory:/cove/web\n\
             7:blkio:/cove/web\n0::/cove/web/init.scope\n",
        );
        assert_eq!(
            files,
            [
                "/sys/fs/cgroup/systemd/cove/web/init.scope/cgroup.procs",
                "/sys/fs/cgroup/pids/cove/web/cgroup.procs",
                "/sys/fs/cgroup/memory/cove/web/cgroup.procs",
                "/sys/fs/cgroup/unified/cove/web/init.scope/cgroup.procs",
            ]
            .map(PathBuf::from)
        );
        let unified = CgroupLayout::from_mountinfo(UNIFIED);
        assert_eq!(
            unified.process_files_from("0::/cove/web/init.scope\n"),
            [PathBuf::from(
                "/sys/fs/cgroup/cove/web/init.scope/cgroup.procs"
            )]
        );
    }

    #[test]
    fn cpu_lists_and_shares() {
        assert_eq!(parse_cpu_list("0-3,6\n"), [0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("1"), [1]);
        assert_eq!(parse_cpu_list(""), Vec::<u32>::new());
        assert_eq!(shares_for_percent(100), 1024);
        assert_eq!(shares_for_percent(50), 512);
        assert_eq!(weight_for_shares(1024), 39);
        assert_eq!(weight_for_shares(2), 1);
    }
}
