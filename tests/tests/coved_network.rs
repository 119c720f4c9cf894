//! coved's managed networks as LXD users know them: the default `covebr0` made on the first
//! start and joined by the default profile's `eth0`; containers that get addresses from its
//! dnsmasq by DHCP, reach each other and the gateway, and find each other by name; a static
//! `ipv4.address`; dnsmasq restarted by coved after a `kill -9`; NAT to an outside network;
//! a subnet that overlaps a route refused with nothing left behind; a network in use kept.
//!
//! Every test runs coved in a network namespace of its own (a thread that unshared
//! CLONE_NEWNET, holding the bridge `covetest0` with 192.0.2.1/24), so nothing touches the
//! host's network. The busybox image runs no DHCP client of its own: the tests run busybox's
//! `udhcpc` through exec, with a script that applies the lease, as an LXD busybox image's init
//! would. Real containers, real dnsmasq, real nftables; run as root.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cove_tests::container::{in_private_network, ip, BOOT_MARKER, BRIDGE};
use cove_tests::coved::{busybox_unified_tarball, eventually, Coved};
use serde_json::{json, Value};

const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

/// What busybox's `udhcpc` runs with the lease: the address, the default route and the DNS
/// server it was given.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
bound|renew)
    ip -4 address flush dev "$interface"
    ip address add "$ip/$mask" dev "$interface"
    for gateway in $router; do ip route replace default via "$gateway" dev "$interface"; break; done
    : > /etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
    for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
    ;;
esac
"#;

/// A coved with its default network, in the calling thread's network namespace; on drop it
/// deletes its instances and then its networks (so their dnsmasq processes stop).
struct NetworkedCoved {
    coved: Coved,
}

impl NetworkedCoved {
    fn start(test: &str) -> Self {
        let coved = Coved::start(test, &["--default-network", "covebr0"]);
        coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
        Self { coved }
    }

    fn network(&self, name: &str) -> Value {
        self.coved.get(&format!("/1.0/networks/{name}"))
    }

    /// The gateway's address and the subnet's prefix of a managed network.
    fn gateway(&self, name: &str) -> (Ipv4Addr, u8) {
        let network = self.network(name);
        let text = network["config"]["ipv4.address"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let (address, prefix) = text.split_once('/').expect("ADDRESS/PREFIX");
        (
            address.parse().expect("an IPv4 address"),
            prefix.parse().expect("a prefix"),
        )
    }

    fn dnsmasq_pid_file(&self, name: &str) -> PathBuf {
        self.coved
            .directory
            .join("networks")
            .join(name)
            .join("dnsmasq.pid")
    }

    fn dnsmasq_pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.dnsmasq_pid_file(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits until a dnsmasq other than `old` runs for the network.
    fn wait_for_new_dnsmasq(&self, name: &str, old: u32) {
        let deadline = Instant::now() + RESTART_TIMEOUT;
        loop {
            match self.dnsmasq_pid(name) {
                Some(pid) if pid != old && running(pid) => return,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "coved did not restart dnsmasq:\n{}",
                self.coved.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Creates a container from busybox with `devices`, starts it and waits for its init.
    fn launch(&self, name: &str, devices: Value) {
        self.coved.operation(
            "POST",
            "/1.0/instances",
            Some(json!({
                "name": name, "source": {"type": "image", "alias": "busybox"},
                "devices": devices,
            })),
        );
        self.coved.operation(
            "PUT",
            &format!("/1.0/instances/{name}/state"),
            Some(json!({"action": "start"})),
        );
        self.booted(name);
    }

    fn booted(&self, name: &str) {
        eventually("the boot marker", BOOT_TIMEOUT, || {
            let response =
                self.coved
                    .request("GET", &format!("/1.0/instances/{name}/console"), None);
            String::from_utf8_lossy(&response.body).contains(BOOT_MARKER)
        });
    }

    fn sh(&self, name: &str, script: &str) -> (i64, String) {
        let (code, stdout, stderr) = self.coved.exec(name, &["sh", "-c", script], b"");
        (code, stdout + &stderr)
    }

    /// Runs busybox's DHCP client on eth0 once; returns the address it got, as the
    /// instance's state reports it.
    fn dhcp(&self, name: &str) -> Ipv4Addr {
        let (code, _, stderr) = self.coved.exec(
            name,
            &[
                "sh",
                "-c",
                "cat > /udhcpc.script && chmod 755 /udhcpc.script",
            ],
            UDHCPC_SCRIPT.as_bytes(),
        );
        assert_eq!(code, 0, "{stderr}");
        let (code, output) = self.sh(name, "udhcpc -i eth0 -q -n -t 10 -T 1 -s /udhcpc.script");
        assert_eq!(code, 0, "udhcpc in {name} got no lease:\n{output}");
        self.address(name)
            .unwrap_or_else(|| panic!("{name} has no IPv4 address on eth0 after DHCP: {output}"))
    }

    /// The IPv4 address on the instance's eth0, from its state.
    fn address(&self, name: &str) -> Option<Ipv4Addr> {
        let state = self.coved.get(&format!("/1.0/instances/{name}/state"));
        state["network"]["eth0"]["addresses"]
            .as_array()?
            .iter()
            .find(|address| address["family"] == "inet")
            .and_then(|address| address["address"].as_str()?.parse().ok())
    }
}

impl Drop for NetworkedCoved {
    fn drop(&mut self) {
        self.coved.delete_all();
        let _ = self.coved.request(
            "PUT",
            "/1.0/profiles/default",
            Some(json!({"config": {}, "devices": {
                "root": {"type": "disk", "path": "/", "pool": "default"},
            }})),
        );
        let networks = self.coved.request("GET", "/1.0/networks?recursion=1", None);
        for network in networks.json()["metadata"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            if network["managed"] == true {
                let name = network["name"].as_str().unwrap_or_default();
                let _ = self
                    .coved
                    .request("DELETE", &format!("/1.0/networks/{name}"), None);
            }
        }
    }
}

fn in_subnet(address: Ipv4Addr, gateway: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX << (32 - u32::from(prefix));
    u32::from(address) & mask == u32::from(gateway) & mask
}

fn running(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|line| String::from_utf8_lossy(&line).contains("dnsmasq"))
}

#[test]
fn containers_get_addresses_by_dhcp_reach_each_other_and_resolve_names() {
    in_private_network(|| {
        let lab = NetworkedCoved::start("net-dhcp");

        // The default network, as LXD shows a managed bridge, and the default profile's eth0.
        let network = lab.network("covebr0");
        assert_eq!(network["managed"], true, "{network}");
        assert_eq!(network["type"], "bridge", "{network}");
        assert_eq!(network["status"], "Created", "{network}");
        assert_eq!(network["config"]["ipv4.nat"], "true", "{network}");
        assert_eq!(network["config"]["ipv6.address"], "none", "{network}");
        let (gateway, prefix) = lab.gateway("covebr0");
        assert_eq!(prefix, 24);
        assert_eq!(
            gateway.octets()[0],
            10,
            "auto picks from 10.0.0.0/8: {gateway}"
        );
        assert_eq!(gateway.octets()[3], 1, "{gateway}");
        let profile = lab.coved.get("/1.0/profiles/default");
        assert_eq!(
            profile["devices"]["eth0"],
            json!({"type": "nic", "network": "covebr0", "name": "eth0"})
        );
        // The bridge is up with the gateway address, in coved's namespace.
        let bridge = ip(&["-4", "-o", "address", "show", "dev", "covebr0"]);
        assert!(bridge.contains(&format!("{gateway}/24")), "{bridge}");

        // Two containers on the default profile get addresses by DHCP.
        lab.launch("alpha", json!({}));
        lab.launch("beta", json!({}));
        let alpha = lab.dhcp("alpha");
        let beta = lab.dhcp("beta");
        assert_ne!(alpha, beta);
        for address in [alpha, beta] {
            assert!(in_subnet(address, gateway, prefix), "{address}");
        }

        // They reach the gateway and each other, and find each other by name.
        for (from, to) in [("alpha", gateway), ("alpha", beta), ("beta", alpha)] {
            let (code, output) = lab.sh(from, &format!("ping -c 1 -W 5 {to}"));
            assert_eq!(code, 0, "{from} cannot reach {to}:\n{output}");
        }
        let (code, output) = lab.sh("alpha", &format!("nslookup beta.cove {gateway}"));
        assert_eq!(code, 0, "{output}");
        assert!(output.contains(&beta.to_string()), "{output}");
        let (code, output) = lab.sh("beta", "nslookup alpha.cove");
        assert_eq!(code, 0, "{output}");
        assert!(output.contains(&alpha.to_string()), "{output}");

        // A static address is honoured; a taken one or one outside the subnet is refused.
        let fixed = Ipv4Addr::from(u32::from(gateway) + 199);
        lab.launch(
            "gamma",
            json!({"eth0": {"type": "nic", "network": "covebr0", "name": "eth0",
                            "ipv4.address": fixed.to_string()}}),
        );
        assert_eq!(lab.dhcp("gamma"), fixed);
        for (address, problem) in [
            (fixed.to_string(), "already"),
            ("192.168.200.7".to_string(), "not a free host address"),
            (gateway.to_string(), "not a free host address"),
        ] {
            let refused = lab.coved.request(
                "POST",
                "/1.0/instances",
                Some(json!({
                    "name": "delta", "source": {"type": "image", "alias": "busybox"},
                    "devices": {"eth0": {"type": "nic", "network": "covebr0",
                                         "ipv4.address": address}},
                })),
            );
            let body = refused.json();
            assert_eq!(refused.status, 400, "{body}");
            assert!(
                body["error"].as_str().unwrap_or_default().contains(problem),
                "{body}"
            );
            assert_eq!(
                lab.coved
                    .request("GET", "/1.0/instances/delta", None)
                    .status,
                404
            );
        }

        // The leases, in LXD's shape.
        let leases = lab.coved.get("/1.0/networks/covebr0/leases");
        let lease_of = |name: &str| {
            leases
                .as_array()
                .into_iter()
                .flatten()
                .find(|lease| lease["hostname"] == name)
                .cloned()
                .unwrap_or_else(|| panic!("no lease for {name}: {leases}"))
        };
        assert_eq!(lease_of("alpha")["address"], alpha.to_string());
        assert_eq!(lease_of("alpha")["type"], "dynamic");
        assert_eq!(lease_of("gamma")["address"], fixed.to_string());
        assert_eq!(lease_of("gamma")["type"], "static");

        // In use: not deleted, the bridge stays.
        let refused = lab.coved.request("DELETE", "/1.0/networks/covebr0", None);
        let body = refused.json();
        assert_eq!(refused.status, 400, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("in use"),
            "{body}"
        );
        let used_by = lab.network("covebr0")["used_by"].clone();
        assert!(
            used_by
                .as_array()
                .is_some_and(|users| users.contains(&json!("/1.0/instances/alpha"))
                    && users.contains(&json!("/1.0/profiles/default"))),
            "{used_by}"
        );
        ip(&["link", "show", "dev", "covebr0"]);

        // Debian's lxc client sees the network and the addresses.
        let networks = lab.coved.lxc_ok(&["network", "list", "--format", "csv"]);
        assert!(
            networks
                .lines()
                .any(|line| line.starts_with("covebr0,bridge,YES,")
                    && line.contains(&format!("{gateway}/24"))),
            "{networks}"
        );
        let list = lab.coved.lxc_ok(&["list", "--format", "csv", "-c", "n4"]);
        assert!(list.contains(&format!("alpha,{alpha} (eth0)")), "{list}");
        let cove = lab.coved.directory.clone();
        let cove_list = Command::new(cove_binary())
            .args([
                "--dir",
                &cove.to_string_lossy(),
                "network",
                "list",
                "-f",
                "csv",
            ])
            .output()
            .expect("run cove network list");
        let text = String::from_utf8_lossy(&cove_list.stdout);
        assert!(text.contains("covebr0,bridge,YES"), "{text}");
    });
}

/// The `cove` CLI beside coved, built for this test run (a no-op when it is up to date).
fn cove_binary() -> PathBuf {
    let (coved, _) = cove_tests::coved::binaries();
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.current_dir(cove_tests::repository()).args([
        "build",
        "-p",
        "cove-supervisor",
        "--bin",
        "cove",
    ]);
    if coved
        .parent()
        .and_then(|profile| profile.file_name())
        .is_some_and(|profile| profile == "release")
    {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "building cove failed");
    coved.with_file_name("cove")
}

#[test]
fn a_killed_dnsmasq_is_restarted_and_outlives_coved() {
    in_private_network(|| {
        let mut lab = NetworkedCoved::start("net-restart");
        lab.launch("alpha", json!({}));
        let first = lab.dhcp("alpha");
        let pid = lab.dnsmasq_pid("covebr0").expect("dnsmasq's pid file");
        assert!(running(pid), "dnsmasq {pid} does not run");

        // SAFETY: kill(2) takes no pointers; `pid` is the test coved's dnsmasq.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        lab.wait_for_new_dnsmasq("covebr0", pid);
        // A new DHCP request is answered, with the same lease.
        assert_eq!(lab.dhcp("alpha"), first);

        // dnsmasq outlives coved; the next coved finds it and watches it again.
        let pid = lab.dnsmasq_pid("covebr0").expect("dnsmasq's pid file");
        lab.coved.restart();
        assert_eq!(lab.dnsmasq_pid("covebr0"), Some(pid));
        assert!(running(pid), "dnsmasq {pid} did not outlive coved");
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        lab.wait_for_new_dnsmasq("covebr0", pid);
        assert_eq!(lab.dhcp("alpha"), first);
    });
}

/// Accepts one TCP connection on `address` inside the named network namespace; returns the
/// peer's address.
fn accept_one_in(namespace: &str, address: SocketAddr) -> std::thread::JoinHandle<SocketAddr> {
    let path = format!("/run/netns/{namespace}");
    let file = std::fs::File::open(&path).unwrap_or_else(|error| panic!("{path}: {error}"));
    let (ready_sender, ready) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        // SAFETY: an open network namespace fd; setns moves only this thread.
        let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
        let listener = TcpListener::bind(address).expect("listen outside");
        listener.set_nonblocking(true).expect("non-blocking");
        let _ = ready_sender.send(());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match listener.accept() {
                Ok((_, peer)) => return peer,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "nothing connected from inside");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => panic!("accept: {error}"),
            }
        }
    });
    ready.recv().expect("the listener is ready");
    handle
}

/// A named network namespace, the "outside" beyond coved's uplink, deleted when dropped.
struct Outside {
    name: String,
}

impl Outside {
    /// Makes the namespace and a veth pair: `uplink0` (198.51.100.1/24) in the calling
    /// thread's namespace, `uplink1` (198.51.100.2/24) outside, with no route back to the
    /// containers' subnet.
    fn new() -> Self {
        let name = format!("cove-test-outside-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        ip(&["netns", "add", &name]);
        let outside = Self { name };
        let name = outside.name.as_str();
        ip(&[
            "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1", "netns", name,
        ]);
        ip(&["address", "add", "198.51.100.1/24", "dev", "uplink0"]);
        ip(&["link", "set", "uplink0", "up"]);
        ip(&[
            "-n",
            name,
            "address",
            "add",
            "198.51.100.2/24",
            "dev",
            "uplink1",
        ]);
        ip(&["-n", name, "link", "set", "uplink1", "up"]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        outside
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

#[test]
fn nat_masquerades_to_the_outside_and_overlapping_subnets_are_refused() {
    in_private_network(|| {
        let outside = Outside::new();
        let lab = NetworkedCoved::start("net-nat");
        lab.launch("alpha", json!({}));
        let address = lab.dhcp("alpha");

        // The outside sees the uplink's address, not the container's.
        let peer = accept_one_in(&outside.name, "198.51.100.2:7000".parse().expect("address"));
        let (code, output) = lab.sh("alpha", "echo hello | nc -w 5 198.51.100.2 7000");
        assert_eq!(code, 0, "{output}");
        let peer = peer.join().expect("the listener");
        assert_eq!(
            peer.ip().to_string(),
            "198.51.100.1",
            "{address} was not masqueraded"
        );
        let rules = Command::new("nft")
            .args(["list", "table", "ip", "cove-covebr0"])
            .output()
            .expect("run nft");
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(rules.contains("masquerade"), "{rules}");

        // Subnets that overlap a route or an address here are refused; nothing is left.
        for (subnet, overlapped) in [
            ("198.51.100.9/24", "uplink0"),
            ("192.0.2.200/25", BRIDGE),
            (
                lab.network("covebr0")["config"]["ipv4.address"]
                    .as_str()
                    .unwrap_or_default(),
                "covebr0",
            ),
        ] {
            let refused = lab.coved.request(
                "POST",
                "/1.0/networks",
                Some(json!({"name": "lab1", "config": {"ipv4.address": subnet}})),
            );
            let body = refused.json();
            assert_eq!(refused.status, 400, "{subnet}: {body}");
            let error = body["error"].as_str().unwrap_or_default();
            assert!(
                error.contains("overlaps") && error.contains(overlapped),
                "{error}"
            );
            assert_eq!(
                lab.coved.request("GET", "/1.0/networks/lab1", None).status,
                404
            );
            let link = Command::new("ip")
                .args(["link", "show", "dev", "lab1"])
                .output()
                .expect("run ip");
            assert!(!link.status.success(), "a bridge lab1 was left behind");
            assert!(!lab.coved.directory.join("networks/lab1").exists());
        }

        // A free subnet is taken, and deleted again with everything it made.
        let created = lab.coved.request(
            "POST",
            "/1.0/networks",
            Some(json!({"name": "lab1", "config": {"ipv4.address": "172.31.250.1/24"}})),
        );
        assert_eq!(created.status, 200, "{}", created.json());
        ip(&["link", "show", "dev", "lab1"]);
        let pid = lab.dnsmasq_pid("lab1").expect("lab1's dnsmasq");
        assert!(running(pid));

        // lxc puts an instance on it with a static address.
        lab.coved
            .lxc_ok(&["init", "busybox", "db", "--network", "lab1"]);
        lab.coved.lxc_ok(&[
            "config",
            "device",
            "set",
            "db",
            "eth0",
            "ipv4.address=172.31.250.50",
        ]);
        lab.coved.lxc_ok(&["start", "db"]);
        lab.booted("db");
        assert_eq!(lab.dhcp("db"), Ipv4Addr::new(172, 31, 250, 50));
        let leases = lab
            .coved
            .lxc_ok(&["network", "list-leases", "lab1", "--format", "csv"]);
        assert!(
            leases.contains("db,") && leases.contains("172.31.250.50,STATIC"),
            "{leases}"
        );
        lab.coved.lxc_ok(&["delete", "db", "--force"]);
        let deleted = lab.coved.request("DELETE", "/1.0/networks/lab1", None);
        assert_eq!(deleted.status, 200, "{}", deleted.json());
        let link = Command::new("ip")
            .args(["link", "show", "dev", "lab1"])
            .output()
            .expect("run ip");
        assert!(!link.status.success(), "the bridge lab1 is still there");
        eventually("lab1's dnsmasq to stop", Duration::from_secs(10), || {
            !running(pid)
        });
    });
}
