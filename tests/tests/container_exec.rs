//! Commands in a running container beyond plain pipes: on a terminal of their own (`lxc exec
//! -t`), receiving signals, and the container's addresses in its state. Through the cove-shim
//! library, then through the `cove-shim` binary and its control socket. Real namespaces,
//! cgroups and mounts; run as root.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cove_shim::control::{ControlClient, ExecCommand};
use cove_shim::{
    AddressFamily, BridgedNic, ContainerConfig, ExecError, ExecRequest, Network, TerminalSize,
};
use cove_tests::container::{busybox_image, in_private_network, TestContainer, BRIDGE};
use cove_tests::container_monitor::{cove_shim, run_with_timeout, MonitorHost};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Reads the terminal's controlling end until `needle` has come (or the terminal closed, or
/// 20 s passed); returns everything read.
fn read_until(terminal: &mut std::fs::File, seen: &mut String, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buffer = [0u8; 1024];
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {needle:?} on the terminal; it said {seen:?}"
        );
        let mut poll = libc::pollfd {
            fd: terminal.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, left.as_millis() as i32) } <= 0 {
            continue;
        }
        match terminal.read(&mut buffer) {
            Ok(read) if read > 0 => seen.push_str(&text(&buffer[..read])),
            _ => panic!("the terminal closed before {needle:?}; it said {seen:?}"),
        }
    }
}

#[test]
fn a_terminal_exec_sees_a_terminal_and_follows_resizes() {
    let config = ContainerConfig::new("terminal", busybox_image());
    let test = TestContainer::start("terminal", &config);
    let mut request = ExecRequest::new(&[
        "sh",
        "-c",
        "tty; stty size; read line; stty size; echo got $line; exit 5",
    ]);
    request.terminal = Some(TerminalSize {
        rows: 33,
        columns: 101,
    });
    let process = test.get().exec(&request).expect("exec on a terminal");
    assert!(process.stdin.is_none() && process.stdout.is_none());
    let mut terminal = process
        .terminal
        .as_ref()
        .expect("the terminal's controlling end")
        .try_clone()
        .expect("a copy");
    let mut seen = String::new();
    read_until(&mut terminal, &mut seen, "33 101\r\n");
    // The terminal is one of the container's own: `tty` names it in its /dev/pts.
    let name = seen.lines().next().unwrap_or_default().trim();
    assert!(name.starts_with("/dev/pts/"), "tty said {seen:?}");

    process
        .resize(TerminalSize {
            rows: 50,
            columns: 132,
        })
        .expect("resize");
    terminal.write_all(b"hello\n").expect("type a line");
    read_until(&mut terminal, &mut seen, "got hello");
    assert!(
        seen.contains("50 132\r\n"),
        "the resize did not show: {seen:?}"
    );
    assert_eq!(process.wait().expect("wait"), 5);
}

#[test]
fn signals_reach_the_command() {
    let config = ContainerConfig::new("signals", busybox_image());
    let test = TestContainer::start("signals", &config);
    let container = test.get();

    let mut sleeper = container
        .exec(&ExecRequest::new(&["sleep", "100"]))
        .expect("exec sleep");
    let started = Instant::now();
    sleeper.signal(libc::SIGTERM).expect("SIGTERM");
    assert_eq!(sleeper.wait().expect("wait"), 128 + libc::SIGTERM);
    assert!(started.elapsed() < Duration::from_secs(20));

    // A shell that traps a signal handles it itself.
    let mut trapping = container
        .exec(&ExecRequest::new(&[
            "sh",
            "-c",
            "trap 'echo caught; exit 7' USR1; echo ready; while :; do sleep 1; done",
        ]))
        .expect("exec a trap");
    let mut stdout = trapping.stdout.take().expect("piped stdout");
    let mut ready = [0u8; 6];
    stdout.read_exact(&mut ready).expect("ready");
    trapping.signal(libc::SIGUSR1).expect("SIGUSR1");
    let mut rest = String::new();
    let code = trapping.wait().expect("wait");
    stdout.read_to_string(&mut rest).expect("the rest");
    assert_eq!((code, rest.as_str()), (7, "caught\n"));

    // SIGKILL cannot be forwarded by a handler: it kills the helper, and the command with it.
    let mut killed = container
        .exec(&ExecRequest::new(&["sleep", "100"]))
        .expect("exec sleep");
    killed.signal(libc::SIGKILL).expect("SIGKILL");
    assert_eq!(killed.wait().expect("wait"), 128 + libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = container
            .exec_output(
                &ExecRequest::new(&["sh", "-c", "cat /proc/[0-9]*/comm"]),
                b"",
            )
            .expect("list the container's processes");
        if !output.stdout.lines().any(|name| name == "sleep") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sleep outlived its helper: {}",
            output.stdout
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut stopped = container
        .exec(&ExecRequest::new(&["true"]))
        .expect("exec true");
    let error = stopped
        .signal(libc::SIGSTOP)
        .expect_err("SIGSTOP is refused");
    assert!(matches!(error, ExecError::Unforwardable(_)), "{error}");
    assert_eq!(stopped.wait().expect("wait"), 0);
}

#[test]
fn state_lists_loopback_addresses() {
    let config = ContainerConfig::new("addresses", busybox_image());
    let mut test = TestContainer::start("addresses", &config);
    let state = test.get_mut().state();
    assert!(
        state.addresses.iter().any(|entry| entry.interface == "lo"
            && entry.family == AddressFamily::Inet
            && entry.address == IpAddr::from([127, 0, 0, 1])
            && entry.prefix == 8),
        "{:?}",
        state.addresses
    );
    test.get_mut().stop(Duration::from_secs(10)).expect("stop");
    assert!(test.get_mut().state().addresses.is_empty());
}

#[test]
fn state_lists_the_address_set_inside_on_the_bridged_nic() {
    in_private_network(|| {
        let mut config = ContainerConfig::new("nicaddress", busybox_image());
        config.network = Network::Bridged(BridgedNic::new(BRIDGE));
        let mut test = TestContainer::start("nicaddress", &config);
        let output = test
            .get()
            .exec_output(
                &ExecRequest::new(&["ip", "addr", "add", "192.0.2.7/24", "dev", "eth0"]),
                b"",
            )
            .expect("ip addr add");
        assert_eq!(output.exit_code, 0, "{}", output.stderr);
        let addresses = test.get_mut().state().addresses;
        assert!(
            addresses.iter().any(|entry| entry.interface == "eth0"
                && entry.family == AddressFamily::Inet
                && entry.address == IpAddr::from([192, 0, 2, 7])
                && entry.prefix == 24),
            "{addresses:?}"
        );
        assert!(
            addresses
                .iter()
                .any(|entry| entry.interface == "lo" && entry.address.is_loopback()),
            "{addresses:?}"
        );
        // The caller's own namespace was never left: its bridge is still here.
        assert!(cove_tests::container::ip(&["-o", "link", "show", BRIDGE]).contains(BRIDGE));
    });
}

#[test]
fn cove_shim_exec_t_runs_on_a_terminal_of_its_own() {
    let host = MonitorHost::new("shimtty");
    host.start("shimtty", busybox_image(), &[]);
    // The live state lists the container's addresses (state.json, written at changes, not).
    let addresses = host.state("shimtty").addresses.expect("live addresses");
    assert!(
        addresses
            .iter()
            .any(|entry| entry.interface == "lo" && entry.address == IpAddr::from([127, 0, 0, 1])),
        "{addresses:?}"
    );
    assert_eq!(host.recorded_state("shimtty").addresses, None);
    let run_directory = host.run_directory.to_string_lossy().into_owned();
    // `script` gives cove-shim a terminal as stdin, sized by `stty` first.
    let inner = format!(
        "stty rows 40 cols 100; {} exec -t shimtty --run-dir {run_directory} -- \
         sh -c 'tty; stty size; exit 3'",
        cove_shim().display()
    );
    let mut script = std::process::Command::new("script");
    script
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::null());
    let output = run_with_timeout(script, Duration::from_secs(60));
    let said = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(3),
        "{said}{}",
        text(&output.stderr)
    );
    assert!(said.contains("/dev/pts/"), "{said}");
    assert!(said.contains("40 100"), "{said}");

    // Without a terminal on stdin, -t still gives the command one (of the default size).
    let output = host.run("exec", &["-t", "shimtty", "--", "sh", "-c", "stty size"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), "24 80");
}

#[test]
fn the_monitor_passes_signals_on_to_a_command() {
    let host = MonitorHost::new("shimsignal");
    host.start("shimsignal", busybox_image(), &[]);
    let socket = host.run_directory.join("shimsignal/control.sock");

    // The library's client: the exec connection carries {"signal":N} lines.
    let null = std::fs::File::open("/dev/null").expect("open /dev/null");
    let connection = ControlClient::connect(&socket)
        .expect("connect")
        .exec(
            &ExecCommand::new(&["sleep", "100"]),
            &[null.as_fd(), null.as_fd(), null.as_fd()],
        )
        .expect("exec");
    connection.signal(libc::SIGTERM).expect("send the signal");
    let answer = connection.wait().expect("the exit answer");
    assert_eq!(answer.exit_code, Some(128 + libc::SIGTERM), "{answer:?}");

    // A terminal exec through the raw protocol: the first answer brings the terminal.
    let mut command = ExecCommand::new(&["sh", "-c", "stty size; exit 4"]);
    command.terminal = Some(TerminalSize {
        rows: 11,
        columns: 22,
    });
    let mut connection = ControlClient::connect(&socket)
        .expect("connect")
        .exec(&command, &[])
        .expect("exec on a terminal");
    let mut terminal = std::fs::File::from(connection.take_terminal().expect("a terminal"));
    let mut seen = String::new();
    read_until(&mut terminal, &mut seen, "11 22");
    assert_eq!(
        connection.wait().expect("the exit answer").exit_code,
        Some(4)
    );

    // cove-shim exec passes on the SIGTERM it receives.
    let mut exec = host
        .command(
            "exec",
            &[
                "shimsignal",
                "--",
                "sh",
                "-c",
                "echo started; exec sleep 100",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("start cove-shim exec");
    let mut stdout = exec.stdout.take().expect("piped stdout");
    let mut started = [0u8; 8];
    stdout
        .read_exact(&mut started)
        .expect("the command started");
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(exec.id() as libc::pid_t, libc::SIGTERM) };
    let status = exec.wait().expect("wait for cove-shim exec");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status}");
}
