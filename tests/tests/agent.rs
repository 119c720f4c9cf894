//! cove-agent on the host: the real static binary (`guest-agent/build`, the one the microVM
//! initramfs holds) started as PID 1 of new mount, pid and network namespaces, as it runs as
//! the init of a microVM, serving on a Unix socket. Each test gets an agent of its own. The
//! checks shared with the VM test are in `agent_suite`; the ones here look from the host's
//! side too (the namespaces share the host's file systems) and drive `cove-agent-ctl`.
//!
//! Needs root (namespaces, chown, mount inside the agent's mount namespace).

mod agent_suite;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use agent_suite::{noise, sha256, Target};
use cove_agent::protocol::{ErrorCode, PowerAction};
use cove_tests::{cove_agent_ctl, AgentInNamespaces};

fn with_agent(name: &str, check: impl FnOnce(&Target)) {
    let agent = AgentInNamespaces::start(name);
    let client = agent.client();
    let target = Target {
        client: &client,
        scratch: agent.scratch().display().to_string(),
        processes_hold_still: true,
    };
    check(&target);
}

#[test]
fn exec_echo_hi_prints_hi_and_exits_0() {
    with_agent("echo", agent_suite::echo_prints_hi_and_exits_0);
}

#[test]
fn exec_returns_exit_codes_and_signals() {
    with_agent("exit", agent_suite::exit_codes_and_signals_are_returned);
}

#[test]
fn exec_keeps_stdout_and_stderr_apart() {
    with_agent("streams", agent_suite::stdout_and_stderr_stay_apart);
}

#[test]
fn exec_of_a_missing_program_is_a_clear_error() {
    with_agent("missing", agent_suite::a_missing_program_is_a_clear_error);
}

#[test]
fn ten_mib_through_stdin_come_back_unchanged() {
    with_agent(
        "stdin",
        agent_suite::ten_mib_through_stdin_come_back_unchanged,
    );
}

#[test]
fn exec_gets_its_environment_directory_and_user() {
    with_agent(
        "environment",
        agent_suite::environment_directory_and_user_are_the_requested_ones,
    );
}

#[test]
fn pty_exec_sees_a_terminal_and_its_window_size() {
    with_agent("pty", agent_suite::a_pty_exec_sees_a_terminal_and_its_size);
}

#[test]
fn kill_reaches_the_process() {
    with_agent("kill", agent_suite::kill_reaches_the_process);
}

#[test]
fn many_execs_run_at_once() {
    with_agent("many", agent_suite::many_execs_run_at_once);
}

#[test]
fn push_and_pull_of_50_mib_keep_checksum_mode_and_owner() {
    with_agent("push", |target| {
        agent_suite::push_and_pull_keep_checksum_mode_and_owner(target, 50 << 20)
    });
}

#[test]
fn push_and_pull_directories_and_symlinks() {
    with_agent("tree", agent_suite::directories_and_symlinks);
}

#[test]
fn missing_paths_and_a_full_disk_are_clear_errors() {
    with_agent(
        "errors",
        agent_suite::missing_paths_and_a_full_disk_are_clear_errors,
    );
}

#[test]
fn a_malformed_frame_closes_only_its_connection() {
    with_agent(
        "malformed",
        agent_suite::a_malformed_frame_closes_only_its_connection,
    );
}

#[test]
fn state_reports_real_figures() {
    with_agent("state", |target| {
        agent_suite::state_reports_real_figures(target);
        // The namespaces share the host's memory, root file system and kernel.
        let state = target.client.state().unwrap();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let total_kib: u64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap();
        assert_eq!(state.memory.total_bytes, total_kib * 1024);
        // SAFETY: an all-zero statvfs is a valid output buffer, and the path is a C string.
        let mut figures: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `figures` is valid for writes during the call.
        assert_eq!(unsafe { libc::statvfs(c"/".as_ptr(), &mut figures) }, 0);
        assert_eq!(
            state.disk.total_bytes,
            figures.f_blocks as u64 * figures.f_frsize as u64
        );
        // Alone in its pid namespace, with nothing running, the agent is the only process.
        assert_eq!(state.processes, 1);
        // Its own network namespace: the loopback interface and nothing else.
        let names: Vec<&str> = state
            .interfaces
            .iter()
            .map(|interface| interface.name.as_str())
            .collect();
        assert_eq!(names, ["lo"]);
    });
}

#[test]
fn the_agent_announces_itself_as_pid_1() {
    let agent = AgentInNamespaces::start("announce");
    let hello = agent.announcement();
    assert_eq!(hello.version, 1);
    assert!(hello.agent.starts_with("cove-agent "), "{hello:?}");
    let boot = hello.boot.as_ref().expect("boot facts");
    assert_eq!(boot.pid, 1, "the agent is its pid namespace's init");
    assert_eq!(boot.serving, format!("unix:{}", agent.socket().display()));
    let release = Command::new("uname").arg("-r").output().unwrap();
    assert_eq!(boot.kernel, String::from_utf8_lossy(&release.stdout).trim());
    assert!(boot.uptime_seconds > 0.0);
}

#[test]
fn an_unknown_protocol_version_is_refused_in_the_hello() {
    let agent = AgentInNamespaces::start("version");
    let mut stream = UnixStream::connect(agent.socket()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = br#"{"type":"hello","version":2,"client":"from the future"}"#;
    let mut frame = vec![1, 1, 0, 0, 0, 0, 0, body.len() as u8];
    frame.extend_from_slice(body);
    stream.write_all(&frame).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(answer.get(8..).unwrap_or_default()).into_owned();
    assert!(
        answer.contains(r#""code":"unsupported_version""#) && answer.contains("version 2"),
        "{answer}"
    );
}

/// How `unshare` reports the end of the namespace after a power-off: reboot(2) in a pid
/// namespace kills its init with SIGINT, or SIGHUP for a restart, which the agent asks for
/// when the kernel cannot power off.
fn power_off_signal() -> i32 {
    if std::path::Path::new("/sys/firmware/acpi").exists() {
        libc::SIGINT
    } else {
        libc::SIGHUP
    }
}

#[test]
fn shutdown_stops_every_process_and_ends_the_namespace() {
    let agent = AgentInNamespaces::start("shutdown");
    let client = agent.client();
    let mut sleeper = client
        .exec(&agent_suite::command(&["sleep", "1000"]))
        .unwrap();
    client.shutdown(PowerAction::Poweroff, Some(2)).unwrap();
    // The sleeper got SIGTERM (or its connection went with the namespace).
    if let Ok(output) = sleeper.collect() {
        assert_eq!(output.status.signal, Some(libc::SIGTERM));
    }
    let socket = agent.socket().to_path_buf();
    let log = agent.log();
    let status = agent.wait(Duration::from_secs(60));
    assert_eq!(
        status.signal(),
        Some(power_off_signal()),
        "unshare: {status:?}; log:\n{log}"
    );
    assert!(
        UnixStream::connect(&socket).is_err(),
        "nobody answers any more"
    );
}

#[test]
fn reboot_ends_the_namespace_as_a_restart() {
    let agent = AgentInNamespaces::start("reboot");
    agent
        .client()
        .shutdown(PowerAction::Reboot, Some(1))
        .unwrap();
    let status = agent.wait(Duration::from_secs(60));
    assert_eq!(status.signal(), Some(libc::SIGHUP), "{status:?}");
}

#[test]
fn shutdown_with_a_grace_beyond_a_minute_is_refused() {
    let agent = AgentInNamespaces::start("grace");
    let error = agent
        .client()
        .shutdown(PowerAction::Poweroff, Some(3600))
        .unwrap_err();
    assert_eq!(error.agent_code(), Some(ErrorCode::BadRequest), "{error}");
    // Still serving.
    assert_eq!(agent.client().state().unwrap().processes, 1);
}

fn ctl(agent: &AgentInNamespaces) -> Command {
    let mut command = Command::new(cove_agent_ctl());
    command.arg("--unix").arg(agent.socket());
    command
}

#[test]
fn cove_agent_ctl_prints_output_and_exits_with_the_command_status() {
    let agent = AgentInNamespaces::start("ctl-exec");
    let output = ctl(&agent)
        .args(["exec", "--", "sh", "-c", "echo hi; echo oops >&2; exit 3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hi\n");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "oops\n");
    assert_eq!(output.status.code(), Some(3));

    let output = ctl(&agent)
        .args(["exec", "--", "no-such-program"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&output.stderr).contains("command not found"));

    // stdin goes in, and output comes out as it is produced.
    let mut child = ctl(&agent)
        .args(["exec", "-T", "--env", "WHO=agent", "--", "sh", "-c"])
        .arg("echo started by $WHO; read line; echo got $line; exec sleep 1000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "started by agent");
    child.stdin.as_mut().unwrap().write_all(b"ping\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "got ping");
    // A signal to cove-agent-ctl is passed on to the command.
    // SAFETY: kill() takes no pointers; the pid is our own child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));

    // -t gives the command a terminal even without one here.
    let output = ctl(&agent)
        .args(["exec", "-t", "--", "tty"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("/dev/pts/"),
        "{output:?}"
    );
}

#[test]
fn cove_agent_ctl_pushes_and_pulls_files_and_trees() {
    let agent = AgentInNamespaces::start("ctl-files");
    let scratch = agent.scratch();
    let local = scratch.join("local.bin");
    let bytes = noise(50 << 20, 9);
    std::fs::write(&local, &bytes).unwrap();
    let remote = scratch.join("remote.bin");
    let status = ctl(&agent)
        .args(["push", "--mode", "0640", "--uid", "1234", "--gid", "2345"])
        .arg(&local)
        .arg(&remote)
        .status()
        .unwrap();
    assert!(status.success());
    // The agent's namespaces share the host's file system: look at the file directly.
    let metadata = std::fs::metadata(&remote).unwrap();
    assert_eq!(metadata.mode() & 0o7777, 0o640);
    assert_eq!((metadata.uid(), metadata.gid()), (1234, 2345));
    assert_eq!(sha256(&std::fs::read(&remote).unwrap()), sha256(&bytes));

    let back = scratch.join("back.bin");
    let status = ctl(&agent)
        .arg("pull")
        .arg(&remote)
        .arg(&back)
        .status()
        .unwrap();
    assert!(status.success());
    let metadata = std::fs::metadata(&back).unwrap();
    assert_eq!(metadata.mode() & 0o7777, 0o640);
    assert_eq!((metadata.uid(), metadata.gid()), (1234, 2345));
    assert_eq!(sha256(&std::fs::read(&back).unwrap()), sha256(&bytes));

    // A tree, there and back.
    let tree = scratch.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/file"), b"inner").unwrap();
    std::os::unix::fs::symlink("sub/file", tree.join("link")).unwrap();
    let copy = scratch.join("tree-copy");
    let status = ctl(&agent)
        .args(["push", "-r"])
        .arg(&tree)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read(copy.join("sub/file")).unwrap(), b"inner");
    assert_eq!(
        std::fs::read_link(copy.join("link")).unwrap(),
        std::path::Path::new("sub/file")
    );
    let pulled = scratch.join("tree-pulled");
    let status = ctl(&agent)
        .args(["pull", "-r"])
        .arg(&copy)
        .arg(&pulled)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read(pulled.join("sub/file")).unwrap(), b"inner");

    // A missing path: a clear message and a failing status.
    let output = ctl(&agent)
        .arg("pull")
        .arg(scratch.join("nothing-here"))
        .arg(scratch.join("x"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("No such file or directory"),
        "{output:?}"
    );

    let output = ctl(&agent).arg("state").output().unwrap();
    assert!(output.status.success());
    let state: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(state["processes"], 1);
}
