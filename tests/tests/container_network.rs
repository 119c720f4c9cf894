//! Container networking through the cove-shim library: loopback in every container, and LXD's
//! bridged nic (a veth pair whose host end joins a bridge, the container's end `eth0` with the
//! MAC address given). Never on the host's real network: each test makes its own bridge in a
//! network namespace of its own (a thread that unshared CLONE_NEWNET) and starts its
//! container from there. Real namespaces, cgroups and mounts; run as root.

use std::time::Duration;

use cove_shim::{BridgedNic, Container, ContainerConfig, ContainerError, ExecRequest, Network};
use cove_tests::container::{
    busybox_image, in_private_network, ip, TestContainer, TestHost, BOOT_MARKER, BRIDGE,
};
const BOOT_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn run(container: &Container, command: &[&str]) -> (i32, String) {
    let output = container
        .exec_output(&ExecRequest::new(command), b"")
        .unwrap_or_else(|error| panic!("exec {command:?} failed: {error}"));
    (output.exit_code, output.stdout + &output.stderr)
}

fn veth_devices() -> String {
    ip(&["-o", "link", "show", "type", "veth"])
}

#[test]
fn bridged_nic_reaches_the_bridge_and_leaves_no_veth_behind() {
    in_private_network(|| {
        let mut config = ContainerConfig::new("bridged", busybox_image());
        let mut nic = BridgedNic::new(BRIDGE);
        nic.hwaddr = [0x00, 0x16, 0x3e, 0x12, 0x34, 0x56];
        config.network = Network::Bridged(nic);
        let mut test = TestContainer::start("bridged", &config);
        test.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
        let container = test.get();

        // The host end: named like LXD's, up, on the bridge, with the bridge's MTU.
        let host_end = container
            .host_interface()
            .expect("a bridged nic has a host end")
            .to_string();
        assert!(
            host_end.len() == 12 && host_end.starts_with("veth"),
            "{host_end}"
        );
        let ports = ip(&["-o", "link", "show", "master", BRIDGE]);
        assert!(
            ports.contains(&host_end),
            "{host_end} not on the bridge:\n{ports}"
        );
        assert!(ports.contains("mtu 1500"), "{ports}");

        // Inside: eth0 with the MAC given, up; loopback up too.
        assert_eq!(
            run(container, &["cat", "/sys/class/net/eth0/address"]),
            (0, "00:16:3e:12:34:56\n".to_string())
        );
        assert_eq!(
            run(container, &["cat", "/sys/class/net/eth0/mtu"]),
            (0, "1500\n".to_string())
        );
        let (status, links) = run(container, &["ip", "-o", "link"]);
        assert_eq!(status, 0, "{links}");
        let names: Vec<&str> = links
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name))
            .collect();
        assert_eq!(names, ["lo", "eth0"], "{links}");
        assert!(links.contains("eth0@") && links.contains(",UP"), "{links}");
        let (status, output) = run(container, &["ping", "-c", "1", "-W", "5", "127.0.0.1"]);
        assert_eq!(status, 0, "loopback is down: {output}");

        // An address on eth0 reaches the bridge's.
        let (status, output) = run(
            container,
            &[
                "sh",
                "-c",
                "ip addr add 192.0.2.2/24 dev eth0 && ping -c 1 -W 5 192.0.2.1",
            ],
        );
        assert_eq!(status, 0, "no answer from the bridge: {output}");
        let neighbours = ip(&["neigh", "show", "dev", BRIDGE]);
        assert!(
            neighbours.contains("192.0.2.2 lladdr 00:16:3e:12:34:56"),
            "the bridge did not learn the container's MAC:\n{neighbours}"
        );

        let outcome = test.get_mut().stop(STOP_TIMEOUT).expect("stop");
        assert!(outcome.clean, "{outcome:?}");
        assert_eq!(test.get().host_interface(), None);
        assert_eq!(veth_devices(), "", "a veth is left after stop");
        assert_eq!(ip(&["-o", "link", "show", "master", BRIDGE]), "");
    });
}

#[test]
fn configured_host_name_and_mtu_are_used() {
    in_private_network(|| {
        let mut config = ContainerConfig::new("named", busybox_image());
        let mut nic = BridgedNic::new(BRIDGE);
        nic.host_name = Some("vethnamed".to_string());
        nic.name = "net0".to_string();
        nic.mtu = Some(1400);
        config.network = Network::Bridged(nic);
        let test = TestContainer::start("named", &config);
        assert_eq!(test.get().host_interface(), Some("vethnamed"));
        // The host end keeps the bridge's MTU so as never to lower the bridge's.
        assert!(ip(&["-o", "link", "show", "vethnamed"]).contains("mtu 1500"));
        assert_eq!(
            run(test.get(), &["cat", "/sys/class/net/net0/mtu"]),
            (0, "1400\n".to_string())
        );
        drop(test);
        assert_eq!(veth_devices(), "", "delete left a veth behind");
    });
}

#[test]
fn a_missing_bridge_is_refused_before_anything_is_created() {
    in_private_network(|| {
        let test_host = TestHost::new("nobridge");
        let mut config = ContainerConfig::new("nobridge", busybox_image());
        config.network = Network::Bridged(BridgedNic::new("nosuchbr0"));
        let error = Container::start(&config, &test_host.host).expect_err("no such bridge");
        assert!(matches!(error, ContainerError::Network(_)), "{error}");
        assert_eq!(
            error.to_string(),
            "the bridge \"nosuchbr0\" does not exist: create it first, or name an existing \
             bridge in the nic's parent="
        );
        assert!(!test_host
            .host
            .containers_directory
            .join("nobridge")
            .exists());

        // Not a bridge: the loopback device.
        config.network = Network::Bridged(BridgedNic::new("lo"));
        let error = Container::start(&config, &test_host.host).expect_err("lo is no bridge");
        assert!(
            error.to_string().contains("\"lo\" is not a bridge"),
            "{error}"
        );
        assert!(!test_host
            .host
            .containers_directory
            .join("nobridge")
            .exists());
        assert_eq!(veth_devices(), "");
    });
}

#[test]
fn a_start_that_fails_after_the_veth_was_made_removes_it() {
    in_private_network(|| {
        // An image whose init does not exist: the start fails at execve, after the pair was
        // created.
        let image = cove_tests::scratch_dir("broken-init-image");
        std::fs::create_dir_all(image.join("sbin")).expect("create the image");
        let _ = std::os::unix::fs::symlink("/bin/missing-init", image.join("sbin/init"));
        let test_host = TestHost::new("brokeninit");
        let mut config = ContainerConfig::new("brokeninit", &image);
        config.network = Network::Bridged(BridgedNic::new(BRIDGE));
        let error = Container::start(&config, &test_host.host).expect_err("init is missing");
        assert!(error.to_string().contains("execute /sbin/init"), "{error}");
        assert_eq!(veth_devices(), "", "the failed start left a veth behind");
        assert!(!test_host
            .host
            .containers_directory
            .join("brokeninit")
            .exists());
        let _ = std::fs::remove_dir_all(&image);
    });
}

#[test]
fn a_container_without_a_nic_has_loopback_up_and_nothing_else() {
    let config = ContainerConfig::new("loopback", busybox_image());
    let test = TestContainer::start("loopback", &config);
    let container = test.get();
    assert_eq!(container.host_interface(), None);
    let (status, links) = run(container, &["ip", "-o", "link"]);
    assert_eq!(status, 0, "{links}");
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains(": lo: <LOOPBACK,UP,LOWER_UP>"), "{links}");
    let (status, output) = run(container, &["ping", "-c", "1", "-W", "5", "127.0.0.1"]);
    assert_eq!(status, 0, "{output}");
}
