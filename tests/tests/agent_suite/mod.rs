//! The agent's behaviour, told as a user's stories, for any agent a `Client` reaches: one in
//! namespaces on the host (`agent.rs`) or one in a Linux guest over vsock (`agent_vm.rs`).
//! Each check looks at real outcomes: printed bytes, exit codes and signals, checksums, and
//! mode and owner as the guest's own tools report them.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Duration;

use cove_agent::client::{Attributes, Client, ClientError, ExecEvent};
use cove_agent::protocol::{
    Channel, ErrorCode, ExecRequest, FileKind, Frame, HostMessage, WindowSize, DEFAULT_PATH,
};

/// An agent to test, and a directory inside its guest that the tests may write in.
pub struct Target<'a> {
    pub client: &'a Client,
    pub scratch: String,
    /// Whether the guest's process count holds still between two looks. Not in a VM, where
    /// the kernel starts and ends worker threads of its own.
    pub processes_hold_still: bool,
}

pub fn command(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|argument| argument.to_string()).collect(),
        environment: BTreeMap::from([("PATH".to_string(), DEFAULT_PATH.to_string())]),
        ..ExecRequest::default()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `argv` in the guest; it must exit 0. Returns its stdout.
pub fn run_ok(target: &Target, argv: &[&str]) -> String {
    let output = target
        .client
        .run(&command(argv), &[])
        .unwrap_or_else(|error| panic!("exec {argv:?}: {error}"));
    assert_eq!(
        output.status.code,
        Some(0),
        "{argv:?} failed: stdout {:?}, stderr {:?}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// Deterministic bytes that no compression or pattern could fake.
pub fn noise(length: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// The SHA-256 of `bytes`, in hex, by the host's sha256sum.
pub fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sha256sum (coreutils)");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let output = child.wait_with_output().expect("sha256sum's output");
    writer.join().expect("writer").expect("feed sha256sum");
    text(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

pub fn echo_prints_hi_and_exits_0(target: &Target) {
    let output = target.client.run(&command(&["echo", "hi"]), &[]).unwrap();
    assert_eq!(text(&output.stdout), "hi\n");
    assert_eq!(text(&output.stderr), "");
    assert_eq!(output.status.code, Some(0));
    assert_eq!(output.status.signal, None);
}

pub fn exit_codes_and_signals_are_returned(target: &Target) {
    let three = target
        .client
        .run(&command(&["sh", "-c", "exit 3"]), &[])
        .unwrap();
    assert_eq!(three.status.code, Some(3));
    let killed = target
        .client
        .run(&command(&["sh", "-c", "kill -9 $$"]), &[])
        .unwrap();
    assert_eq!(killed.status.code, None);
    assert_eq!(killed.status.signal, Some(9));
}

pub fn stdout_and_stderr_stay_apart(target: &Target) {
    let output = target
        .client
        .run(
            &command(&["sh", "-c", "echo out; echo err >&2; echo more"]),
            &[],
        )
        .unwrap();
    assert_eq!(text(&output.stdout), "out\nmore\n");
    assert_eq!(text(&output.stderr), "err\n");
}

pub fn a_missing_program_is_a_clear_error(target: &Target) {
    let error = target
        .client
        .run(&command(&["no-such-program-anywhere"]), &[])
        .unwrap_err();
    assert_eq!(error.agent_code(), Some(ErrorCode::NotFound), "{error}");
    assert!(
        error.to_string().contains("no-such-program-anywhere"),
        "{error}"
    );
}

pub fn ten_mib_through_stdin_come_back_unchanged(target: &Target) {
    let input = noise(10 << 20, 7);
    let output = target.client.run(&command(&["cat"]), &input).unwrap();
    assert_eq!(output.status.code, Some(0));
    assert_eq!(output.stdout.len(), input.len());
    assert!(output.stdout == input, "cat changed the bytes");
}

pub fn environment_directory_and_user_are_the_requested_ones(target: &Target) {
    let mut request = command(&["env"]);
    request
        .environment
        .insert("GREETING".into(), "hello world".into());
    let output = target.client.run(&request, &[]).unwrap();
    let mut lines: Vec<String> = text(&output.stdout).lines().map(String::from).collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "GREETING=hello world".to_string(),
            format!("PATH={DEFAULT_PATH}")
        ],
        "the command's environment is exactly the requested one"
    );

    let mut request = command(&["sh", "-c", "pwd; id -u; id -g"]);
    request.cwd = Some(target.scratch.clone());
    request.uid = Some(1234);
    request.gid = Some(2345);
    let output = target.client.run(&request, &[]).unwrap();
    assert_eq!(
        text(&output.stdout),
        format!("{}\n1234\n2345\n", target.scratch)
    );

    let mut request = command(&["true"]);
    request.cwd = Some("/no/such/directory".into());
    let error = target.client.run(&request, &[]).unwrap_err();
    assert_eq!(error.agent_code(), Some(ErrorCode::NotFound), "{error}");
    assert!(error.to_string().contains("/no/such/directory"), "{error}");
}

pub fn a_pty_exec_sees_a_terminal_and_its_size(target: &Target) {
    let mut request = command(&[
        "sh",
        "-c",
        "test -t 0 && test -t 1 && test -t 2 && echo terminal; stty size; tty",
    ]);
    request.pty = Some(WindowSize {
        rows: 33,
        columns: 101,
    });
    let output = target.client.run(&request, &[]).unwrap();
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code, Some(0), "{stdout}");
    let lines: Vec<&str> = stdout.lines().map(str::trim_end).collect();
    assert_eq!(lines.first().copied(), Some("terminal"), "{stdout:?}");
    assert_eq!(lines.get(1).copied(), Some("33 101"), "{stdout:?}");
    assert!(
        lines.get(2).is_some_and(|tty| tty.starts_with("/dev/pts/")),
        "{stdout:?}"
    );
    // On a pty everything is stdout.
    assert!(output.stderr.is_empty());

    // A resize reaches the terminal of a running command.
    let mut request = command(&["sh", "-c", "stty size; read line; stty size"]);
    request.pty = Some(WindowSize {
        rows: 24,
        columns: 80,
    });
    let mut exec = target.client.exec(&request).unwrap();
    let control = exec.control();
    let mut seen = String::new();
    let mut resized = false;
    let status = loop {
        match exec.next_event().unwrap() {
            ExecEvent::Output(_, bytes) => {
                seen.push_str(&text(&bytes));
                if !resized && seen.contains("24 80") {
                    resized = true;
                    control
                        .resize(WindowSize {
                            rows: 50,
                            columns: 132,
                        })
                        .unwrap();
                    control.write_stdin(b"go\n").unwrap();
                }
            }
            ExecEvent::Closed(_) => {}
            ExecEvent::Exited(status) => break status,
        }
    };
    assert_eq!(status.code, Some(0), "{seen:?}");
    assert!(seen.contains("50 132"), "the new size: {seen:?}");
}

pub fn kill_reaches_the_process(target: &Target) {
    let mut exec = target.client.exec(&command(&["sleep", "1000"])).unwrap();
    assert!(exec.pid() > 0);
    exec.control().signal(libc::SIGTERM, false).unwrap();
    let output = exec.collect().unwrap();
    assert_eq!(output.status.signal, Some(libc::SIGTERM));
    assert_eq!(output.status.code, None);

    // To the whole process group: the shell and the sleep it waits for.
    let mut exec = target
        .client
        .exec(&command(&["sh", "-c", "sleep 1000; echo survived"]))
        .unwrap();
    // Give the shell time to start its sleep.
    std::thread::sleep(Duration::from_millis(300));
    exec.control().signal(libc::SIGKILL, true).unwrap();
    let output = exec.collect().unwrap();
    assert_eq!(output.status.signal, Some(libc::SIGKILL));
    assert!(output.stdout.is_empty(), "{:?}", text(&output.stdout));

    // A number that is no signal is refused.
    let mut exec = target.client.exec(&command(&["sleep", "1000"])).unwrap();
    exec.control().signal(99, false).unwrap();
    let error = exec.collect().unwrap_err();
    assert_eq!(error.agent_code(), Some(ErrorCode::BadRequest), "{error}");
}

/// Sixteen commands run at once: each waits for its own input, so none could finish if the
/// agent served them one after another.
pub fn many_execs_run_at_once(target: &Target) {
    let execs: Vec<_> = (0..16)
        .map(|index| {
            let exec = target
                .client
                .exec(&command(&["sh", "-c", "read line; echo \"$line from $$\""]))
                .unwrap_or_else(|error| panic!("exec {index}: {error}"));
            (index, exec)
        })
        .collect();
    let (sender, receiver) = mpsc::channel();
    for (index, mut exec) in execs.into_iter().rev() {
        let sender = sender.clone();
        std::thread::spawn(move || {
            let pid = exec.pid();
            exec.control()
                .write_stdin(format!("exec {index}\n").as_bytes())
                .unwrap();
            let output = exec.collect();
            let _ = sender.send((index, pid, output));
        });
    }
    drop(sender);
    let mut seen = 0;
    for (index, pid, output) in receiver {
        let output = output.unwrap_or_else(|error| panic!("exec {index}: {error}"));
        assert_eq!(output.status.code, Some(0));
        assert_eq!(text(&output.stdout), format!("exec {index} from {pid}\n"));
        seen += 1;
    }
    assert_eq!(seen, 16);
}

/// Pushes `bytes` to `path` with the given attributes, checks them with the guest's own
/// tools, and pulls the file back.
pub fn push_and_pull_keep_checksum_mode_and_owner(target: &Target, length: usize) {
    let bytes = noise(length, 42);
    let checksum = sha256(&bytes);
    let path = format!("{}/pushed.bin", target.scratch);
    let attributes = Attributes {
        mode: 0o640,
        uid: 1234,
        gid: 2345,
    };
    let written = target
        .client
        .push_file(&path, attributes, &mut &bytes[..])
        .unwrap();
    assert_eq!(written, length as u64);
    let in_guest = run_ok(target, &["sha256sum", &path]);
    assert_eq!(in_guest.split_whitespace().next(), Some(checksum.as_str()));
    assert_eq!(
        run_ok(target, &["stat", "-c", "%a %u %g %s %F", &path]).trim(),
        format!("640 1234 2345 {length} regular file")
    );

    let mut pulled = Vec::new();
    let info = target.client.pull(&path, &mut pulled).unwrap();
    assert_eq!(info.kind, FileKind::File);
    assert_eq!((info.mode, info.uid, info.gid), (0o640, 1234, 2345));
    assert_eq!(info.size, length as u64);
    assert_eq!(sha256(&pulled), checksum);

    // Pushing again replaces the file, with new attributes.
    let attributes = Attributes {
        mode: 0o4755,
        uid: 0,
        gid: 0,
    };
    target
        .client
        .push_file(&path, attributes, &mut &b"short\n"[..])
        .unwrap();
    assert_eq!(run_ok(target, &["cat", &path]), "short\n");
    assert_eq!(
        run_ok(target, &["stat", "-c", "%a %u %g", &path]).trim(),
        "4755 0 0",
        "set-id bits survive: the mode is set after the owner"
    );
}

pub fn directories_and_symlinks(target: &Target) {
    let directory = format!("{}/tree", target.scratch);
    target
        .client
        .push_directory(
            &directory,
            Attributes {
                mode: 0o750,
                uid: 5,
                gid: 6,
            },
        )
        .unwrap();
    let link = format!("{directory}/link");
    target
        .client
        .push_symlink(&link, "../pointed-at", 7, 8)
        .unwrap();
    target
        .client
        .push_file(
            &format!("{directory}/file"),
            Attributes {
                mode: 0o600,
                uid: 0,
                gid: 0,
            },
            &mut &b"x"[..],
        )
        .unwrap();
    assert_eq!(
        run_ok(target, &["stat", "-c", "%F %a %u %g", &directory]).trim(),
        "directory 750 5 6"
    );
    assert_eq!(
        run_ok(target, &["stat", "-c", "%F %u %g %N", &link]).trim(),
        format!("symbolic link 7 8 '{link}' -> '../pointed-at'")
    );

    let mut nothing = Vec::new();
    let info = target.client.pull(&directory, &mut nothing).unwrap();
    assert_eq!(info.kind, FileKind::Directory);
    assert_eq!((info.mode, info.uid, info.gid), (0o750, 5, 6));
    assert_eq!(info.entries, Some(vec!["file".into(), "link".into()]));
    let info = target.client.pull(&link, &mut nothing).unwrap();
    assert_eq!(info.kind, FileKind::Symlink);
    assert_eq!(info.target.as_deref(), Some("../pointed-at"));
    assert!(nothing.is_empty());

    // A file cannot replace a directory.
    let error = target
        .client
        .push_file(
            &directory,
            Attributes {
                mode: 0o644,
                uid: 0,
                gid: 0,
            },
            &mut &b"x"[..],
        )
        .unwrap_err();
    assert_eq!(error.agent_code(), Some(ErrorCode::WrongKind), "{error}");
}

pub fn missing_paths_and_a_full_disk_are_clear_errors(target: &Target) {
    let missing = format!("{}/missing", target.scratch);
    let error = target.client.pull(&missing, &mut Vec::new()).unwrap_err();
    assert_eq!(error.agent_code(), Some(ErrorCode::NotFound), "{error}");
    assert!(error.to_string().contains(&missing), "{error}");

    let orphan = format!("{}/no-directory/file", target.scratch);
    let attributes = Attributes {
        mode: 0o644,
        uid: 0,
        gid: 0,
    };
    let error = target
        .client
        .push_file(&orphan, attributes, &mut &b"x"[..])
        .unwrap_err();
    assert_eq!(error.agent_code(), Some(ErrorCode::NotFound), "{error}");
    assert!(
        error.to_string().contains("no-directory") && error.to_string().contains("does not exist"),
        "{error}"
    );

    // A 1 MiB file system, and 4 MiB to write into it.
    let small = format!("{}/small", target.scratch);
    run_ok(
        target,
        &[
            "sh",
            "-c",
            &format!("mkdir -p {small} && mount -t tmpfs -o size=1m cove-test {small}"),
        ],
    );
    let error = target
        .client
        .push_file(
            &format!("{small}/big"),
            attributes,
            &mut &noise(4 << 20, 3)[..],
        )
        .unwrap_err();
    assert_eq!(error.agent_code(), Some(ErrorCode::NoSpace), "{error}");
    assert!(
        error.to_string().contains("No space left on device"),
        "{error}"
    );
    // Nothing is left behind, and the agent goes on serving.
    assert_eq!(run_ok(target, &["ls", "-A", &small]), "");
    target
        .client
        .push_file(&format!("{small}/fits"), attributes, &mut &b"ok"[..])
        .unwrap();
    assert_eq!(run_ok(target, &["ls", "-A", &small]), "fits\n");
    run_ok(target, &["umount", &small]);
}

/// The state's figures against the guest's own /proc and tools, read at the same time.
pub fn state_reports_real_figures(target: &Target) {
    // Three commands that stay alive while the state is taken.
    let sleepers: Vec<_> = (0..3)
        .map(|_| target.client.exec(&command(&["sleep", "1000"])).unwrap())
        .collect();
    let state = target.client.state().unwrap();
    // `ls /proc` is one more process than the state saw.
    let listing = run_ok(target, &["ls", "/proc"]);
    let processes = listing
        .split_whitespace()
        .filter(|name| name.bytes().all(|byte| byte.is_ascii_digit()))
        .count() as u32;
    if target.processes_hold_still {
        assert_eq!(state.processes + 1, processes, "processes: {state:?}");
    } else {
        assert!(
            (state.processes + 1).abs_diff(processes) <= 8,
            "processes: {} by the state, {processes} by ls",
            state.processes
        );
    }
    for sleeper in &sleepers {
        sleeper.control().signal(libc::SIGKILL, false).unwrap();
    }
    for mut sleeper in sleepers {
        sleeper.collect().unwrap();
    }

    let meminfo = run_ok(target, &["cat", "/proc/meminfo"]);
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("MemTotal in /proc/meminfo");
    assert_eq!(state.memory.total_bytes, total_kib * 1024);
    assert!(state.memory.used_bytes > 0 && state.memory.used_bytes < state.memory.total_bytes);
    assert_eq!(
        state.memory.used_bytes + state.memory.available_bytes,
        state.memory.total_bytes
    );

    let figures = run_ok(target, &["stat", "-f", "-c", "%b %S", "/"]);
    let numbers: Vec<u64> = figures
        .split_whitespace()
        .map(|value| value.parse().unwrap())
        .collect();
    assert_eq!(state.disk.total_bytes, numbers[0] * numbers[1], "disk of /");
    assert!(state.disk.used_bytes > 0 && state.disk.used_bytes <= state.disk.total_bytes);

    let uptime: f64 = run_ok(target, &["cat", "/proc/uptime"])
        .split_whitespace()
        .next()
        .and_then(|value| value.parse().ok())
        .expect("a number in /proc/uptime");
    assert!(
        state.uptime_seconds > 0.0 && state.uptime_seconds <= uptime,
        "uptime {} then {uptime}",
        state.uptime_seconds
    );
    assert!(uptime - state.uptime_seconds < 120.0);

    assert_eq!(state.kernel, run_ok(target, &["uname", "-r"]).trim());
    assert!(state.cpus >= 1);
    let loopback = state
        .interfaces
        .iter()
        .find(|interface| interface.name == "lo")
        .unwrap_or_else(|| panic!("no lo in {:?}", state.interfaces));
    assert!(loopback.up, "the agent as init brings lo up");
    assert!(
        loopback
            .addresses
            .iter()
            .any(|address| address.family == "inet"
                && address.address == "127.0.0.1"
                && address.prefix_length == 8),
        "{loopback:?}"
    );
}

/// Connection A runs a command; B, C and D send garbage. Each bad one gets an error and is
/// closed; A and new connections carry on.
pub fn a_malformed_frame_closes_only_its_connection(target: &Target) {
    let exec = target.client.exec(&command(&["cat"])).unwrap();

    // A header of an unknown protocol version, after a good hello.
    let mut session = target.client.connect().unwrap();
    use std::io::Write;
    { session.raw_stream() }
        .write_all(&[9, 1, 0, 0, 0, 0, 0, 2, b'{', b'}'])
        .unwrap();
    expect_error_then_close(&mut session, "version 9");

    // A control frame that claims 4 GiB.
    let mut session = target.client.connect().unwrap();
    { session.raw_stream() }
        .write_all(&[1, 1, 0, 0, 255, 255, 255, 255])
        .unwrap();
    expect_error_then_close(&mut session, "longer than the limit");

    // Valid framing around JSON that is no message.
    let mut session = target.client.connect().unwrap();
    let body = br#"{"type":"format_disk"}"#;
    let mut frame = vec![1, 1, 0, 0, 0, 0, 0, body.len() as u8];
    frame.extend_from_slice(body);
    { session.raw_stream() }.write_all(&frame).unwrap();
    expect_error_then_close(&mut session, "malformed");

    // A message that does not fit the conversation: stdin data with no exec.
    let mut session = target.client.connect().unwrap();
    session.send_data(Channel::Stdin, b"hello").unwrap();
    expect_error_then_close(&mut session, "stdin");

    // A second hello instead of a request.
    let mut session = target.client.connect().unwrap();
    session
        .send(&HostMessage::Hello {
            version: 1,
            client: "again".into(),
        })
        .unwrap();
    expect_error_then_close(&mut session, "hello");

    // A is untouched.
    let control = exec.control();
    control.write_stdin(b"still here\n").unwrap();
    control.close_stdin().unwrap();
    let mut exec = exec;
    let output = exec.collect().unwrap();
    assert_eq!(text(&output.stdout), "still here\n");
    echo_prints_hi_and_exits_0(target);
}

fn expect_error_then_close(session: &mut cove_agent::client::Session, mentions: &str) {
    match session.next("the agent's answer to garbage") {
        Err(ClientError::Agent { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest, "{message}");
            assert!(
                message.contains(mentions),
                "the error {message:?} should mention {mentions:?}"
            );
        }
        other => panic!("expected an error message, got {:?}", other.map(describe)),
    }
    match session.next("after the error") {
        Err(ClientError::Closed { .. }) => {}
        other => panic!(
            "expected the connection closed, got {:?}",
            other.map(describe)
        ),
    }
}

fn describe(frame: Frame<cove_agent::protocol::AgentMessage>) -> String {
    format!("{frame:?}")
}
