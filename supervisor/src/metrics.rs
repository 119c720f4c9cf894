//! `/1.0/metrics`: each instance's CPU, memory, processes, disk, network and root file system
//! in the Prometheus text format, with LXD's metric names and labels (`name`, `project`,
//! `type`), so that dashboards and alerts made for LXD read coved unchanged.
//!
//! Where the numbers come from: a container's cgroup (`cpu.stat`, `memory.current`,
//! `memory.stat`, `memory.max`, `memory.events`, `io.stat`, `pids.current`; the cgroup v1
//! files where the host has only those), its init's network namespace (`/proc/<init>/net/dev`)
//! and its root on the host (statvfs); a virtual machine's from its runtime state (the guest
//! agent's figures). Nothing is kept between scrapes: counters are the kernel's own.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use cove_shim::cgroup::CgroupLayout;

use crate::instances::runtime::{RuntimeState, RuntimeStatus};

/// What a scrape reports for one running instance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceMetrics {
    pub name: String,
    /// `container` or `virtual-machine`.
    pub kind: String,
    pub cpu_user_seconds: Option<f64>,
    pub cpu_system_seconds: Option<f64>,
    pub cpu_total_seconds: Option<f64>,
    pub effective_cpus: Option<u64>,
    /// `memory.stat`-style figures by LXD's names (`MemTotal`, `MemFree`, `RSS`, ...), bytes.
    pub memory: BTreeMap<&'static str, u64>,
    pub oom_kills: Option<u64>,
    pub processes: Option<u64>,
    /// Per block device name: read bytes, written bytes, reads, writes.
    pub disks: BTreeMap<String, [u64; 4]>,
    /// Per interface: receive and transmit bytes, packets, errors, drops.
    pub interfaces: BTreeMap<String, NetworkCounters>,
    /// The root file system: size, free, available (bytes) and its type.
    pub root: Option<([u64; 3], String)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkCounters {
    pub receive_bytes: u64,
    pub receive_packets: u64,
    pub receive_errors: u64,
    pub receive_drops: u64,
    pub transmit_bytes: u64,
    pub transmit_packets: u64,
    pub transmit_errors: u64,
    pub transmit_drops: u64,
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn number(path: &Path) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

/// `key value` lines (`cpu.stat`, `memory.stat`, `memory.events`).
fn keyed(text: &str) -> BTreeMap<&str, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key, value.trim().parse().ok()?))
        })
        .collect()
}

/// The kernel's name of block device `major:minor` (`vda`, `sda1`), else the numbers.
fn block_device_name(numbers: &str) -> String {
    read(&Path::new("/sys/dev/block").join(numbers).join("uevent"))
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("DEVNAME="))
                .map(str::to_string)
        })
        .unwrap_or_else(|| numbers.to_string())
}

/// `io.stat` lines: `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ...`.
pub fn parse_io_stat(text: &str) -> BTreeMap<String, [u64; 4]> {
    let mut disks = BTreeMap::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(device) = fields.next() else {
            continue;
        };
        let mut counters = [0u64; 4];
        for field in fields {
            let Some((key, value)) = field.split_once('=') else {
                continue;
            };
            let slot = match key {
                "rbytes" => 0,
                "wbytes" => 1,
                "rios" => 2,
                "wios" => 3,
                _ => continue,
            };
            counters[slot] = value.parse().unwrap_or(0);
        }
        disks.insert(block_device_name(device), counters);
    }
    disks
}

/// cgroup v1's `blkio.throttle.io_service_bytes` and `io_serviced`: `MAJ:MIN Read N` lines.
pub fn parse_blkio(bytes: &str, operations: &str) -> BTreeMap<String, [u64; 4]> {
    let mut disks: BTreeMap<String, [u64; 4]> = BTreeMap::new();
    for (text, offset) in [(bytes, 0), (operations, 2)] {
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(device), Some(operation), Some(value)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let slot = match operation {
                "Read" => offset,
                "Write" => offset + 1,
                _ => continue,
            };
            disks.entry(block_device_name(device)).or_default()[slot] = value.parse().unwrap_or(0);
        }
    }
    disks
}

/// `/proc/<pid>/net/dev`: per interface, the receive and transmit counters.
pub fn parse_net_dev(text: &str) -> BTreeMap<String, NetworkCounters> {
    let mut interfaces = BTreeMap::new();
    for line in text.lines().skip(2) {
        let Some((name, numbers)) = line.split_once(':') else {
            continue;
        };
        let values: Vec<u64> = numbers
            .split_whitespace()
            .filter_map(|value| value.parse().ok())
            .collect();
        if values.len() < 16 {
            continue;
        }
        interfaces.insert(
            name.trim().to_string(),
            NetworkCounters {
                receive_bytes: values[0],
                receive_packets: values[1],
                receive_errors: values[2],
                receive_drops: values[3],
                transmit_bytes: values[8],
                transmit_packets: values[9],
                transmit_errors: values[10],
                transmit_drops: values[11],
            },
        );
    }
    interfaces
}

fn host_memory() -> u64 {
    read(Path::new("/proc/meminfo"))
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|value| {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

fn cpu_count(list: &str) -> u64 {
    cove_shim::cgroup::parse_cpu_list(list.trim()).len() as u64
}

fn statvfs(path: &Path) -> Option<[u64; 3]> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is plain data that statvfs(3) fills.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stats` is writable for the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return None;
    }
    let block = stats.f_frsize as u64;
    Some([
        stats.f_blocks as u64 * block,
        stats.f_bfree as u64 * block,
        stats.f_bavail as u64 * block,
    ])
}

/// The file system type of the mount at or above `path`, from /proc/self/mounts.
fn file_system_type(path: &Path) -> String {
    let Some(mounts) = read(Path::new("/proc/self/mounts")) else {
        return String::new();
    };
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let target = fields.next()?;
            let kind = fields.next()?;
            path.starts_with(target)
                .then(|| (target.len(), kind.to_string()))
        })
        .max_by_key(|(length, _)| *length)
        .map(|(_, kind)| kind)
        .unwrap_or_default()
}

/// A running container's figures, from its cgroup `<parent>/<name>` and its init.
pub fn container(
    layout: &CgroupLayout,
    cgroup: &Path,
    name: &str,
    state: &RuntimeState,
    root: &Path,
) -> InstanceMetrics {
    let mut metrics = InstanceMetrics {
        name: name.to_string(),
        kind: "container".to_string(),
        processes: state.processes,
        ..InstanceMetrics::default()
    };
    let directory = |controller: &str| layout.controller_directory(controller, cgroup);
    // cgroup v2 keeps `cpu.stat` in every cgroup, with or without the cpu controller.
    let cpu_directory = directory("cpu")
        .filter(|dir| dir.join("cpu.stat").exists())
        .or_else(|| layout.unified.as_ref().map(|unified| unified.join(cgroup)));
    if let Some(cpu) = cpu_directory.and_then(|dir| read(&dir.join("cpu.stat"))) {
        let stat = keyed(&cpu);
        let seconds = |key| stat.get(key).map(|micros| *micros as f64 / 1e6);
        metrics.cpu_user_seconds = seconds("user_usec");
        metrics.cpu_system_seconds = seconds("system_usec");
        metrics.cpu_total_seconds = seconds("usage_usec");
    }
    if metrics.cpu_user_seconds.is_none() {
        // cgroup v1: `cpuacct.stat` counts clock ticks.
        if let Some(stat) = directory("cpuacct").and_then(|dir| read(&dir.join("cpuacct.stat"))) {
            // SAFETY: sysconf takes no pointers.
            let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            let stat = keyed(&stat);
            let seconds = |key| stat.get(key).map(|count| *count as f64 / ticks);
            metrics.cpu_user_seconds = seconds("user");
            metrics.cpu_system_seconds = seconds("system");
        }
    }
    if metrics.cpu_total_seconds.is_none() {
        metrics.cpu_total_seconds = state.cpu_time_ns.map(|ns| ns as f64 / 1e9);
    }
    metrics.effective_cpus = directory("cpuset")
        .and_then(|dir| {
            read(&dir.join("cpuset.cpus.effective"))
                .or_else(|| read(&dir.join("cpuset.effective_cpus")))
        })
        .map(|list| cpu_count(&list))
        .filter(|count| *count > 0);
    if let Some(memory) = directory("memory") {
        let host = host_memory();
        let unified = memory.join("memory.current").exists();
        let (used, limit, stat) = if unified {
            (
                number(&memory.join("memory.current")),
                read(&memory.join("memory.max")).and_then(|text| text.trim().parse().ok()),
                read(&memory.join("memory.stat")).unwrap_or_default(),
            )
        } else {
            (
                number(&memory.join("memory.usage_in_bytes")),
                number(&memory.join("memory.limit_in_bytes")),
                read(&memory.join("memory.stat")).unwrap_or_default(),
            )
        };
        let total = limit.filter(|limit| *limit < host).unwrap_or(host);
        let used = used.or(state.memory_bytes).unwrap_or(0);
        let stat = keyed(&stat);
        let get = |keys: &[&str]| keys.iter().find_map(|key| stat.get(key).copied());
        metrics.memory.insert("MemTotal", total);
        metrics.memory.insert("MemFree", total.saturating_sub(used));
        let cached = get(&["file", "cache"]).unwrap_or(0);
        metrics.memory.insert(
            "MemAvailable",
            total.saturating_sub(used) + cached.min(used),
        );
        metrics.memory.insert("Cached", cached);
        metrics
            .memory
            .insert("RSS", get(&["anon", "rss"]).unwrap_or(0));
        metrics.memory.insert("Shmem", get(&["shmem"]).unwrap_or(0));
        metrics.memory.insert(
            "Active",
            get(&["active_anon", "total_active_anon"]).unwrap_or(0)
                + get(&["active_file", "total_active_file"]).unwrap_or(0),
        );
        metrics.memory.insert(
            "Inactive",
            get(&["inactive_anon", "total_inactive_anon"]).unwrap_or(0)
                + get(&["inactive_file", "total_inactive_file"]).unwrap_or(0),
        );
        if let Some(swap) = number(&memory.join("memory.swap.current")) {
            metrics.memory.insert("Swap", swap);
        }
        metrics.oom_kills = read(&memory.join("memory.events"))
            .or_else(|| read(&memory.join("memory.oom_control")))
            .and_then(|text| keyed(&text).get("oom_kill").copied());
    }
    metrics.disks = match directory("io").and_then(|dir| read(&dir.join("io.stat"))) {
        Some(text) => parse_io_stat(&text),
        None => directory("blkio")
            .map(|dir| {
                parse_blkio(
                    &read(&dir.join("blkio.throttle.io_service_bytes")).unwrap_or_default(),
                    &read(&dir.join("blkio.throttle.io_serviced")).unwrap_or_default(),
                )
            })
            .unwrap_or_default(),
    };
    if let Some(pid) = state.init_pid {
        metrics.interfaces = read(&PathBuf::from(format!("/proc/{pid}/net/dev")))
            .map(|text| parse_net_dev(&text))
            .unwrap_or_default();
    }
    metrics.root = statvfs(root).map(|sizes| (sizes, file_system_type(root)));
    metrics
}

/// A running virtual machine's figures, from what its agent reports.
pub fn virtual_machine(name: &str, state: &RuntimeState, memory_limit: u64) -> InstanceMetrics {
    let mut metrics = InstanceMetrics {
        name: name.to_string(),
        kind: "virtual-machine".to_string(),
        processes: state.processes,
        cpu_total_seconds: state.cpu_time_ns.map(|ns| ns as f64 / 1e9),
        ..InstanceMetrics::default()
    };
    if let Some(used) = state.memory_bytes {
        metrics.memory.insert("MemTotal", memory_limit);
        metrics
            .memory
            .insert("MemFree", memory_limit.saturating_sub(used));
    }
    metrics
}

/// Whether an instance in this state is scraped (LXD reports running instances only).
pub fn scraped(status: RuntimeStatus) -> bool {
    matches!(status, RuntimeStatus::Running | RuntimeStatus::Frozen)
}

/// One metric family: its samples, each with extra labels and a value.
struct Family {
    help: &'static str,
    kind: &'static str,
    samples: Vec<(String, String)>,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the figures in the Prometheus text format (version 0.0.4).
pub fn render(instances: &[InstanceMetrics]) -> String {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut add =
        |metric: &str, help: &'static str, kind: &'static str, labels: String, value: String| {
            families
                .entry(metric.to_string())
                .or_insert_with(|| Family {
                    help,
                    kind,
                    samples: Vec::new(),
                })
                .samples
                .push((labels, value));
        };
    for instance in instances {
        let base = format!(
            "name=\"{}\",project=\"default\",type=\"{}\"",
            escape(&instance.name),
            escape(&instance.kind)
        );
        let with = |extra: &str| {
            if extra.is_empty() {
                base.clone()
            } else {
                format!("{extra},{base}")
            }
        };
        for (mode, value) in [
            ("user", instance.cpu_user_seconds),
            ("system", instance.cpu_system_seconds),
        ] {
            if let Some(value) = value {
                add(
                    "lxd_cpu_seconds_total",
                    "The total number of CPU time used in seconds.",
                    "counter",
                    with(&format!("cpu=\"0\",mode=\"{mode}\"")),
                    format!("{value}"),
                );
            }
        }
        if let Some(value) = instance.cpu_total_seconds {
            add(
                "lxd_cpu_usage_seconds_total",
                "The total CPU time used in seconds, all modes and CPUs together.",
                "counter",
                with(""),
                format!("{value}"),
            );
        }
        if let Some(count) = instance.effective_cpus {
            add(
                "lxd_cpu_effective_total",
                "The total number of effective CPUs.",
                "gauge",
                with(""),
                count.to_string(),
            );
        }
        for (key, value) in &instance.memory {
            let metric = format!("lxd_memory_{key}_bytes");
            add(
                &metric,
                "The amount of memory, by kind, in bytes.",
                "gauge",
                with(""),
                value.to_string(),
            );
        }
        if let Some(kills) = instance.oom_kills {
            add(
                "lxd_memory_OOM_kills_total",
                "The number of out of memory kills.",
                "counter",
                with(""),
                kills.to_string(),
            );
        }
        if let Some(processes) = instance.processes {
            add(
                "lxd_procs_total",
                "The number of running processes.",
                "gauge",
                with(""),
                processes.to_string(),
            );
        }
        for (device, [read_bytes, written_bytes, reads, writes]) in &instance.disks {
            let labels = with(&format!("device=\"{}\"", escape(device)));
            for (metric, help, value) in [
                (
                    "lxd_disk_read_bytes_total",
                    "The total number of bytes read.",
                    read_bytes,
                ),
                (
                    "lxd_disk_written_bytes_total",
                    "The total number of bytes written.",
                    written_bytes,
                ),
                (
                    "lxd_disk_reads_completed_total",
                    "The total number of completed reads.",
                    reads,
                ),
                (
                    "lxd_disk_writes_completed_total",
                    "The total number of completed writes.",
                    writes,
                ),
            ] {
                add(metric, help, "counter", labels.clone(), value.to_string());
            }
        }
        for (device, counters) in &instance.interfaces {
            let labels = with(&format!("device=\"{}\"", escape(device)));
            for (metric, help, value) in [
                (
                    "lxd_network_receive_bytes_total",
                    "The amount of received bytes on a given interface.",
                    counters.receive_bytes,
                ),
                (
                    "lxd_network_receive_packets_total",
                    "The amount of received packets on a given interface.",
                    counters.receive_packets,
                ),
                (
                    "lxd_network_receive_errs_total",
                    "The amount of received errors on a given interface.",
                    counters.receive_errors,
                ),
                (
                    "lxd_network_receive_drop_total",
                    "The amount of received dropped bytes on a given interface.",
                    counters.receive_drops,
                ),
                (
                    "lxd_network_transmit_bytes_total",
                    "The amount of transmitted bytes on a given interface.",
                    counters.transmit_bytes,
                ),
                (
                    "lxd_network_transmit_packets_total",
                    "The amount of transmitted packets on a given interface.",
                    counters.transmit_packets,
                ),
                (
                    "lxd_network_transmit_errs_total",
                    "The amount of transmitted errors on a given interface.",
                    counters.transmit_errors,
                ),
                (
                    "lxd_network_transmit_drop_total",
                    "The amount of transmitted dropped bytes on a given interface.",
                    counters.transmit_drops,
                ),
            ] {
                add(metric, help, "counter", labels.clone(), value.to_string());
            }
        }
        if let Some(([size, free, available], kind)) = &instance.root {
            let labels = with(&format!(
                "device=\"root\",fstype=\"{}\",mountpoint=\"/\"",
                escape(kind)
            ));
            for (metric, help, value) in [
                (
                    "lxd_filesystem_size_bytes",
                    "The size of the filesystem in bytes.",
                    size,
                ),
                (
                    "lxd_filesystem_free_bytes",
                    "The number of free space in bytes.",
                    free,
                ),
                (
                    "lxd_filesystem_avail_bytes",
                    "The number of available space in bytes.",
                    available,
                ),
            ] {
                add(metric, help, "gauge", labels.clone(), value.to_string());
            }
        }
    }
    add(
        "lxd_instances",
        "The number of instances reported.",
        "gauge",
        "project=\"default\"".to_string(),
        instances.len().to_string(),
    );
    let mut text = String::new();
    for (metric, family) in &families {
        let _ = writeln!(text, "# HELP {metric} {}", family.help);
        let _ = writeln!(text, "# TYPE {metric} {}", family.kind);
        for (labels, value) in &family.samples {
            let _ = writeln!(text, "{metric}{{{labels}}} {value}");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_and_io_stat_are_read() {
        let net = "Inter-|   Receive                                                |  Transmit\n \
                   face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n  \
                   eth0:  1500      10    1    2    0     0          0         0     3000      20    3    4    0     0       0          0\n";
        let interfaces = parse_net_dev(net);
        assert_eq!(
            interfaces["eth0"],
            NetworkCounters {
                receive_bytes: 1500,
                receive_packets: 10,
                receive_errors: 1,
                receive_drops: 2,
                transmit_bytes: 3000,
                transmit_packets: 20,
                transmit_errors: 3,
                transmit_drops: 4,
            }
        );
        let disks = parse_io_stat("999:7 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n");
        assert_eq!(disks["999:7"], [4096, 8192, 1, 2]);
        let disks = parse_blkio(
            "999:8 Read 512\n999:8 Write 1024\nTotal 1536\n",
            "999:8 Read 1\n999:8 Write 2\n",
        );
        assert_eq!(disks["999:8"], [512, 1024, 1, 2]);
    }

    #[test]
    fn the_text_format_has_one_header_per_family() {
        let mut first = InstanceMetrics {
            name: "web".into(),
            kind: "container".into(),
            processes: Some(3),
            cpu_user_seconds: Some(1.5),
            ..InstanceMetrics::default()
        };
        first.memory.insert("MemTotal", 1024);
        let mut second = first.clone();
        second.name = "db\"x".into();
        let text = render(&[first, second]);
        assert_eq!(text.matches("# TYPE lxd_procs_total gauge").count(), 1);
        assert!(text
            .contains("lxd_procs_total{name=\"web\",project=\"default\",type=\"container\"} 3\n"));
        assert!(text.contains("name=\"db\\\"x\""));
        assert!(text.contains(
            "lxd_cpu_seconds_total{cpu=\"0\",mode=\"user\",name=\"web\",project=\"default\",type=\"container\"} 1.5\n"
        ));
        assert!(text.contains("lxd_memory_MemTotal_bytes{name=\"web\""));
        assert!(text.contains("lxd_instances{project=\"default\"} 2\n"));
    }
}
