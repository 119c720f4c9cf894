//! One dnsmasq per managed network, for DHCP and DNS on its bridge, as LXD runs it: its files
//! in `$COVE_DIR/networks/<name>/` (`dhcp-hosts`, `leases`, `dnsmasq.pid`, `dnsmasq.log`), its
//! command line made from the network's config, and the watch that restarts it when it dies.
//!
//! dnsmasq runs in a process group of its own and outlives coved, as LXD's does: instances
//! keep their DHCP leases and DNS while coved restarts. The next coved finds it through the
//! pid file (checking that the process is that network's dnsmasq with the same command line)
//! and watches it again; a pidfd says when it exits, whether it is coved's child or not.

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::config::NetworkConfig;
use super::NetworkError;

/// One line of dnsmasq's hosts file: a MAC address, perhaps a fixed address, and the name
/// the instance is known by in DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    pub hwaddr: String,
    pub address: Option<Ipv4Addr>,
    pub name: String,
}

/// A lease dnsmasq handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub hwaddr: String,
    pub address: Ipv4Addr,
    pub hostname: String,
}

/// The network's files.
#[derive(Debug, Clone)]
pub struct Files {
    pub directory: PathBuf,
}

impl Files {
    pub fn new(networks_directory: &Path, name: &str) -> Self {
        Self {
            directory: networks_directory.join(name),
        }
    }
    pub fn hosts(&self) -> PathBuf {
        self.directory.join("dhcp-hosts")
    }
    pub fn leases(&self) -> PathBuf {
        self.directory.join("leases")
    }
    pub fn pid(&self) -> PathBuf {
        self.directory.join("dnsmasq.pid")
    }
    pub fn log(&self) -> PathBuf {
        self.directory.join("dnsmasq.log")
    }

    /// The directory and empty files, readable by dnsmasq once it has dropped root.
    fn prepare(&self) -> Result<(), NetworkError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| NetworkError::File { path, source }
        };
        std::fs::create_dir_all(&self.directory).map_err(io(&self.directory))?;
        std::fs::set_permissions(&self.directory, std::fs::Permissions::from_mode(0o755))
            .map_err(io(&self.directory))?;
        for file in [self.hosts(), self.leases()] {
            if !file.exists() {
                std::fs::write(&file, "").map_err(io(&file))?;
            }
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))
                .map_err(io(&file))?;
        }
        Ok(())
    }
}

/// dnsmasq's arguments (without the program name) for the network `name`.
pub fn arguments(name: &str, config: &NetworkConfig, files: &Files) -> Vec<String> {
    let domain = &config.domain;
    let mut arguments = vec![
        "--keep-in-foreground".to_string(),
        "--strict-order".into(),
        "--bind-interfaces".into(),
        "--except-interface=lo".into(),
        "--pid-file=".into(),
        "--no-ping".into(),
        format!("--interface={name}"),
        format!("--listen-address={}", config.gateway),
        "--conf-file=/dev/null".into(),
        "--log-facility=-".into(),
        format!("--domain={domain}"),
        format!("--local=/{domain}/"),
        "--expand-hosts".into(),
        format!("--interface-name=_gateway.{domain},{name}"),
    ];
    if config.dhcp {
        arguments.extend([
            "--dhcp-authoritative".to_string(),
            "--dhcp-no-override".into(),
            format!("--dhcp-leasefile={}", files.leases().display()),
            format!("--dhcp-hostsfile={}", files.hosts().display()),
        ]);
        for (first, last) in &config.ranges {
            arguments.push(format!("--dhcp-range={first},{last},1h"));
        }
    }
    arguments
}

/// The process `pid`'s command line, if it runs.
fn command_line(pid: u32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|byte| *byte == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect(),
    )
}

fn recorded_pid(files: &Files) -> Option<u32> {
    std::fs::read_to_string(files.pid())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The network's running dnsmasq, from the pid file: the pid, and whether it runs with
/// exactly `wanted` as its arguments (one from before a config change does not).
pub fn running(name: &str, files: &Files, wanted: &[String]) -> Option<(u32, bool)> {
    let pid = recorded_pid(files)?;
    let line = command_line(pid)?;
    let (program, arguments) = line.split_first()?;
    let interface = format!("--interface={name}");
    if !program.ends_with("dnsmasq") || !arguments.contains(&interface) {
        return None;
    }
    Some((pid, arguments == wanted))
}

/// Starts dnsmasq in a process group of its own (so it outlives coved) with its output
/// appended to `dnsmasq.log`; records its pid.
pub fn spawn(files: &Files, arguments: &[String]) -> Result<u32, NetworkError> {
    files.prepare()?;
    let log_path = files.log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| NetworkError::File {
            path: log_path.clone(),
            source,
        })?;
    let stderr = log.try_clone().map_err(|source| NetworkError::File {
        path: log_path.clone(),
        source,
    })?;
    let child = Command::new("dnsmasq")
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|error| NetworkError::Host {
            command: "dnsmasq".into(),
            message: format!("cannot start it: {error}; install dnsmasq-base"),
        })?;
    let pid = child.id();
    // The watch reaps it (waitpid on its pid) once its pidfd says it exited.
    drop(child);
    let pid_path = files.pid();
    std::fs::write(&pid_path, format!("{pid}\n")).map_err(|source| NetworkError::File {
        path: pid_path,
        source,
    })?;
    Ok(pid)
}

/// Waits until the process `pid` has exited (reaping it when it is coved's child).
pub async fn wait_exit(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd >= 0 {
        // SAFETY: pidfd_open returned a new fd that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the AsyncFd owns the pidfd, which nothing else closes or replaces.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
        };
        if let Ok(readable) = registered {
            // A pidfd becomes readable when the process exits.
            let _ = readable.readable().await;
        }
    } else {
        while command_line(pid).is_some() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    reap(pid);
}

fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: waitpid on one pid with WNOHANG; fails harmlessly with ECHILD for a process
    // that is not coved's child.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
}

/// Stops the process `pid` (SIGTERM, SIGKILL after 2 s) and removes the pid file.
pub fn stop(files: &Files, pid: u32) {
    // SAFETY: kill(2) takes no pointers; `pid` is the network's dnsmasq, checked by the caller.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    for _ in 0..40 {
        reap(pid);
        if command_line(pid).is_none_or(|line| line.is_empty()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if command_line(pid).is_some_and(|line| !line.is_empty()) {
        // SAFETY: as above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(50));
        reap(pid);
    }
    let _ = std::fs::remove_file(files.pid());
}

/// Writes the hosts file (replaced whole, so dnsmasq never reads half of it).
pub fn write_hosts(files: &Files, entries: &[HostEntry]) -> Result<(), NetworkError> {
    files.prepare()?;
    let mut text = String::new();
    for entry in entries {
        match entry.address {
            Some(address) => text.push_str(&format!("{},{address},{}\n", entry.hwaddr, entry.name)),
            None => text.push_str(&format!("{},{}\n", entry.hwaddr, entry.name)),
        }
    }
    let path = files.hosts();
    let staging = files.directory.join(".dhcp-hosts.new");
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&staging)?;
        file.write_all(text.as_bytes())?;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.sync_all()?;
        std::fs::rename(&staging, &path)
    };
    write().map_err(|source| NetworkError::File { path, source })
}

/// The hosts file's entries.
pub fn read_hosts(files: &Files) -> Vec<HostEntry> {
    let text = std::fs::read_to_string(files.hosts()).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.trim().split(',').collect();
            match fields.as_slice() {
                [hwaddr, address, name] => Some(HostEntry {
                    hwaddr: hwaddr.to_string(),
                    address: address.parse().ok(),
                    name: name.to_string(),
                }),
                [hwaddr, name] => Some(HostEntry {
                    hwaddr: hwaddr.to_string(),
                    address: None,
                    name: name.to_string(),
                }),
                _ => None,
            }
        })
        .collect()
}

/// Tells dnsmasq to read its hosts file again (SIGHUP).
pub fn reload(pid: u32) {
    // SAFETY: kill(2) takes no pointers; `pid` is the network's dnsmasq, checked by the caller.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
}

/// dnsmasq's lease file: `EXPIRY MAC ADDRESS HOSTNAME CLIENT-ID` per line (`*`: no name).
pub fn parse_leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, hwaddr, address, hostname, ..] = fields.as_slice() else {
                return None;
            };
            Some(Lease {
                hwaddr: hwaddr.to_string(),
                address: address.parse().ok()?,
                hostname: if *hostname == "*" {
                    String::new()
                } else {
                    hostname.to_string()
                },
            })
        })
        .collect()
}

pub fn leases(files: &Files) -> Vec<Lease> {
    parse_leases(&std::fs::read_to_string(files.leases()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_read_and_nameless_ones_kept() {
        let leases = parse_leases(
            "1767000000 00:16:3e:aa:bb:cc 10.1.2.50 web 01:00:16:3e:aa:bb:cc\n\
             1767000001 00:16:3e:dd:ee:ff 10.1.2.51 * *\n\
             garbage\n",
        );
        assert_eq!(leases.len(), 2);
        assert_eq!(leases[0].hostname, "web");
        assert_eq!(leases[1].address, Ipv4Addr::new(10, 1, 2, 51));
        assert_eq!(leases[1].hostname, "");
    }

    #[test]
    fn the_command_line_follows_the_config() {
        let config = super::super::config::parse(&std::collections::BTreeMap::from([
            ("ipv4.address".to_string(), "10.4.5.1/24".to_string()),
            ("dns.domain".to_string(), "lab".to_string()),
        ]))
        .unwrap();
        let files = Files::new(Path::new("/var/lib/cove/networks"), "covebr0");
        let arguments = arguments("covebr0", &config, &files);
        for expected in [
            "--interface=covebr0",
            "--listen-address=10.4.5.1",
            "--dhcp-range=10.4.5.2,10.4.5.254,1h",
            "--dhcp-hostsfile=/var/lib/cove/networks/covebr0/dhcp-hosts",
            "--local=/lab/",
        ] {
            assert!(
                arguments.iter().any(|argument| argument == expected),
                "{expected}"
            );
        }
    }

    #[test]
    fn hosts_files_round_trip() {
        let directory = std::env::temp_dir().join(format!("cove-hosts-{}", std::process::id()));
        let files = Files::new(&directory, "covebr0");
        let entries = vec![
            HostEntry {
                hwaddr: "00:16:3e:00:00:01".into(),
                address: Some(Ipv4Addr::new(10, 0, 0, 9)),
                name: "web".into(),
            },
            HostEntry {
                hwaddr: "00:16:3e:00:00:02".into(),
                address: None,
                name: "db".into(),
            },
        ];
        write_hosts(&files, &entries).unwrap();
        assert_eq!(read_hosts(&files), entries);
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
