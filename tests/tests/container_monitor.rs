//! System containers driven through the real `cove-shim` binary, as the supervisor drives
//! them: `cove-shim start` returns once init runs and leaves a monitor behind; `exec`, `state`,
//! `freeze`, `unfreeze` and `stop` go through its control socket; a stopped container persists
//! until `delete`. Every test checks what is left afterwards (run-directory entries, container
//! directories, cgroups, mounts, processes). Real namespaces, cgroups and mounts; run as root.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use cove_shim::control::{ControlClient, ExecCommand, RecordedStatus, Request, Response};
use cove_shim::{ContainerConfig, ExecError, ExecRequest, Status};
use cove_tests::container::{busybox_image, TestContainer, BOOT_MARKER};
use cove_tests::container_monitor::{process_exists, run_with_timeout, wait_until, MonitorHost};

const BOOT_TIMEOUT: Duration = Duration::from_secs(10);
/// busybox init takes about two seconds to halt.
const HALT_TIMEOUT: Duration = Duration::from_secs(15);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

fn wait_for_console(host: &MonitorHost, name: &str, needle: &str) {
    let log = host.container_directory(name).join("console.log");
    wait_until(
        &format!("{needle:?} on the console of {name}"),
        BOOT_TIMEOUT,
        || std::fs::read_to_string(&log).is_ok_and(|console| console.contains(needle)),
    );
}

/// Fields of `/proc/<pid>/stat` after the command name: [0] is the state, [1] the parent pid,
/// [3] the session.
fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let (_, fields) = stat.rsplit_once(')').expect("a stat line");
    fields.split_whitespace().map(str::to_string).collect()
}

/// The loop the freeze tests watch: it writes an increasing number to `/tmp/counter` about
/// fifty times a second, in the background. Each value replaces the file whole (a rename): a
/// freeze may catch the loop between truncating a file and writing it, and the file would
/// stay empty for as long as the container is frozen.
const COUNTER: &str = "(i=0; while :; do i=$((i+1)); echo $i > /tmp/counter.new; \
                       mv /tmp/counter.new /tmp/counter; usleep 20000; done) \
                       >/dev/null 2>&1 </dev/null &";

/// Starts the counter through `cove-shim exec`.
fn start_counter(host: &MonitorHost, name: &str) -> Counter {
    let output = host.run("exec", &[name, "--", "sh", "-c", COUNTER]);
    assert_success(&output, "starting the counter");
    let processes = host
        .cgroup_directories(name)
        .into_iter()
        .find(|directory| directory.to_string_lossy().contains("/pids/"))
        .map(|directory| directory.join("cgroup.procs"));
    Counter {
        path: host.container_directory(name).join("rootfs/tmp/counter"),
        processes,
    }
}

/// The counter's file on the host, and the container's `cgroup.procs` (to tell what runs there
/// when the counter does not show up).
struct Counter {
    path: PathBuf,
    processes: Option<PathBuf>,
}

/// Every v1 freezer cgroup on the host that is not THAWED (to tell a frozen container).
fn freezer_states() -> String {
    let output = std::process::Command::new("sh")
        .args([
            "-c",
            "grep -r -v THAWED /sys/fs/cgroup/freezer --include=freezer.state",
        ])
        .output()
        .map(|output| text(&output.stdout))
        .unwrap_or_default();
    format!("\nfrozen or freezing cgroups:\n{output}")
}

impl Counter {
    /// The counter's value (retrying over the moment the file is being rewritten, and giving a
    /// loop just started on a loaded machine time to write its first value).
    fn read(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(value) = std::fs::read_to_string(&self.path)
                .ok()
                .and_then(|value| value.trim().parse().ok())
            {
                return value;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no counter in {} within 20 s; the container's processes:\n{}",
                    self.path.display(),
                    self.describe_processes()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn describe_processes(&self) -> String {
        let Some(file) = &self.processes else {
            return "(no pids cgroup)".to_string();
        };
        let pids = std::fs::read_to_string(file).unwrap_or_default();
        pids.lines()
            .map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let command = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|line| text(&line).replace('\0', " "))
                    .unwrap_or_default();
                let state = stat.rsplit_once(") ").map_or("?", |(_, rest)| &rest[..1]);
                let wchan =
                    std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
                format!("  {pid} {state} {command} (waiting in {wchan})")
            })
            .collect::<Vec<_>>()
            .join("\n")
            + &freezer_states()
    }

    /// Asserts that the counter moves (`moving`) or stands still over a third of a second.
    fn assert(&self, moving: bool) {
        let before = self.read();
        std::thread::sleep(Duration::from_millis(330));
        let after = self.read();
        if moving {
            assert!(after > before, "the counter stood still at {before}");
        } else {
            assert_eq!(after, before, "the counter moved while frozen");
        }
    }
}

#[test]
fn the_container_outlives_its_starter() {
    let host = MonitorHost::new("outlives");
    let started = Instant::now();
    let record = host.start("outlives", busybox_image(), &[]);
    eprintln!("cove-shim start returned in {:?}", started.elapsed());
    assert_eq!(record.status, RecordedStatus::Running);
    assert_eq!(record.name, "outlives");
    assert!(record.started_at.is_some(), "{record:?}");
    let init = record.init_pid.expect("init runs");

    // The starter has exited; the monitor runs on, in a session of its own, and is init's
    // parent.
    assert!(process_exists(
        record.monitor_pid,
        record.monitor_start_time
    ));
    let monitor = stat_fields(record.monitor_pid);
    assert_ne!(
        monitor[1],
        std::process::id().to_string(),
        "the monitor is our child"
    );
    // SAFETY: getsid(0) asks about this process only.
    let our_session = unsafe { libc::getsid(0) };
    assert_ne!(
        monitor[3],
        our_session.to_string(),
        "the monitor is in our session"
    );
    assert_eq!(stat_fields(init)[1], record.monitor_pid.to_string());

    assert_eq!(host.recorded_state("outlives"), record);
    assert!(host.run_directory.join("outlives/control.sock").exists());
    wait_for_console(&host, "outlives", BOOT_MARKER);

    let live = host.state("outlives");
    assert_eq!(live.status, RecordedStatus::Running);
    assert_eq!(live.init_pid, Some(init));
    let usage = live.usage.expect("live usage");
    assert!(usage.processes.unwrap_or(0) >= 1, "{usage:?}");
    assert!(usage.memory_bytes.unwrap_or(0) > 0, "{usage:?}");
}

#[test]
fn exec_runs_commands_on_the_callers_streams() {
    let host = MonitorHost::new("execs");
    host.start("execs", busybox_image(), &[]);

    let output = host.run(
        "exec",
        &["execs", "--", "sh", "-c", "echo out; echo err >&2; exit 7"],
    );
    assert_eq!(output.status.code(), Some(7), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "out\n");
    assert_eq!(text(&output.stderr), "err\n");

    let mut upper = host
        .command("exec", &["execs", "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start cove-shim exec");
    upper
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(b"through stdin\n")
        .expect("write stdin");
    let output = upper.wait_with_output().expect("wait");
    assert!(output.status.success());
    assert_eq!(text(&output.stdout), "THROUGH STDIN\n");

    let output = host.run(
        "exec",
        &[
            "execs",
            "--env",
            "GREETING=hello",
            "--cwd",
            "/tmp",
            "--user",
            "1000:1000",
            "--",
            "sh",
            "-c",
            "pwd; id -u; id -g; echo $GREETING",
        ],
    );
    assert_success(&output, "exec as a user");
    assert_eq!(text(&output.stdout), "/tmp\n1000\n1000\nhello\n");

    // The command writes to the very file the caller opened: the fd travels, nothing relays.
    let file_path = host.scratch.join("written-by-exec");
    let file = std::fs::File::create(&file_path).expect("create a file");
    let mut command = host.command("exec", &["execs", "--", "echo", "into the file"]);
    let status = command.stdout(file).status().expect("run cove-shim exec");
    assert!(status.success());
    assert_eq!(
        std::fs::read_to_string(&file_path).expect("read it"),
        "into the file\n"
    );

    let output = host.run("exec", &["execs", "--", "no-such-command"]);
    assert_eq!(output.status.code(), Some(125));
    assert!(
        text(&output.stderr).contains("no-such-command"),
        "unclear error: {}",
        text(&output.stderr)
    );
    let output = host.run("exec", &["no-such-container", "--", "true"]);
    assert_eq!(output.status.code(), Some(125));
    assert!(
        text(&output.stderr).contains("no container \"no-such-container\""),
        "{}",
        text(&output.stderr)
    );
}

/// One raw request line, and the answer line.
fn raw_request(socket: &Path, line: &[u8]) -> Response {
    let mut stream = UnixStream::connect(socket).expect("connect to the control socket");
    stream.write_all(line).expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    assert_eq!(
        answer.matches('\n').count(),
        1,
        "one answer line: {answer:?}"
    );
    serde_json::from_str(&answer).expect("a JSON answer")
}

#[test]
fn the_control_socket_speaks_json_lines() {
    let host = MonitorHost::new("socket");
    host.start("socket", busybox_image(), &[]);
    let socket = host.run_directory.join("socket/control.sock");

    let state = raw_request(&socket, b"{\"request\":\"state\"}\n");
    assert!(state.ok);
    assert_eq!(
        state.state.expect("a state").status,
        RecordedStatus::Running
    );

    let refused = [
        (&b"not json\n"[..], "malformed request"),
        (b"{\"request\":\"reboot\"}\n", "unknown variant `reboot`"),
        (
            b"{\"request\":\"exec\",\"command\":[\"true\"]}\n",
            "SCM_RIGHTS",
        ),
        (
            b"{\"request\":\"exec\",\"command\":[]}\n",
            "exec needs a command",
        ),
        (
            b"{\"request\":\"state\",\"all\":true}\n",
            "unknown field `all`",
        ),
    ];
    for (line, expected) in refused {
        let answer = raw_request(&socket, line);
        assert!(!answer.ok, "{} was accepted", text(line));
        let error = answer.error.unwrap_or_default();
        assert!(error.contains(expected), "{}: {error}", text(line));
    }

    // The library's client, with socket pairs as the command's streams.
    let (mut stdout_read, stdout_write) = UnixStream::pair().expect("a socket pair");
    let (stdin_read, mut stdin_write) = UnixStream::pair().expect("a socket pair");
    stdin_write.write_all(b"piped in").expect("fill stdin");
    drop(stdin_write);
    let mut command = ExecCommand::new(&["sh", "-c", "cat; echo; hostname; exit 4"]);
    command.cwd = Some("/".into());
    let answer = ControlClient::connect(&socket)
        .expect("connect")
        .call(
            &Request::Exec(command),
            &[
                stdin_read.as_fd(),
                stdout_write.as_fd(),
                stdout_write.as_fd(),
            ],
        )
        .expect("exec");
    drop((stdin_read, stdout_write));
    assert_eq!(answer.exit_code, Some(4), "{answer:?}");
    let mut output = String::new();
    stdout_read.read_to_string(&mut output).expect("read");
    assert_eq!(output, "piped in\nsocket\n");

    // A caller that connects and says nothing does not hold up the others.
    let _silent = UnixStream::connect(&socket).expect("connect");
    let state = raw_request(&socket, b"{\"request\":\"state\"}\n");
    assert!(state.ok);
}

#[test]
fn freeze_stops_a_counter_and_unfreeze_resumes_it() {
    let host = MonitorHost::new("freezing");
    let record = host.start("freezing", busybox_image(), &[]);
    let counter = start_counter(&host, "freezing");
    counter.assert(true);

    assert_success(&host.run("freeze", &["freezing"]), "freeze");
    assert_eq!(host.state("freezing").status, RecordedStatus::Frozen);
    assert_eq!(
        host.recorded_state("freezing").status,
        RecordedStatus::Frozen
    );
    counter.assert(false);
    let output = host.run("exec", &["freezing", "--", "true"]);
    assert_eq!(output.status.code(), Some(125));
    assert!(
        text(&output.stderr).contains("is frozen"),
        "{}",
        text(&output.stderr)
    );

    assert_success(&host.run("unfreeze", &["freezing"]), "unfreeze");
    assert_eq!(host.state("freezing").status, RecordedStatus::Running);
    assert_eq!(
        host.recorded_state("freezing").status,
        RecordedStatus::Running
    );
    counter.assert(true);

    // A frozen container still stops: it is thawed first, so init can act on its signal.
    assert_success(&host.run("freeze", &["freezing"]), "freeze");
    assert_success(&host.run("stop", &["freezing", "--timeout", "1"]), "stop");
    host.assert_released("freezing", Some(&record));
}

#[test]
fn freeze_in_the_library_reports_frozen() {
    let config = ContainerConfig::new("frozen", busybox_image());
    let mut test = TestContainer::start("library-freeze", &config);
    test.wait_for_console(BOOT_MARKER, BOOT_TIMEOUT);
    let started = test
        .get()
        .exec_output(&ExecRequest::new(&["sh", "-c", COUNTER]), b"")
        .expect("start the counter");
    assert_eq!(started.exit_code, 0);
    let cgroup = test.get().cgroup();
    let counter = Counter {
        path: test.get().root_directory().join("tmp/counter"),
        processes: cgroup
            .layout()
            .controller_directory("pids", cgroup.relative())
            .map(|directory| directory.join("cgroup.procs")),
    };
    counter.assert(true);

    test.get().freeze().expect("freeze");
    assert!(test.get().is_frozen());
    assert_eq!(test.get_mut().state().status, Status::Frozen);
    counter.assert(false);
    let refused = test
        .get()
        .exec_output(&ExecRequest::new(&["true"]), b"")
        .expect_err("exec in a frozen container");
    assert!(matches!(refused, ExecError::Frozen(_)), "{refused}");

    test.get().unfreeze().expect("unfreeze");
    assert_eq!(test.get_mut().state().status, Status::Running);
    counter.assert(true);

    test.get().freeze().expect("freeze again");
    let outcome = test.get_mut().stop(HALT_TIMEOUT).expect("stop");
    assert!(outcome.clean, "a frozen init could not halt: {outcome:?}");
    let error = test
        .get()
        .freeze()
        .expect_err("a stopped container cannot freeze");
    assert!(error.to_string().contains("is not running"), "{error}");
}

#[test]
fn stop_releases_everything_and_delete_removes_the_rest() {
    let host = MonitorHost::new("stopping");
    let record = host.start("stopping", busybox_image(), &[]);
    wait_for_console(&host, "stopping", BOOT_MARKER);

    let started = Instant::now();
    let output = host.run("stop", &["stopping", "--timeout", "10"]);
    eprintln!("cove-shim stop returned in {:?}", started.elapsed());
    assert_success(&output, "stop");
    let stopped: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(stopped["clean"], true, "{stopped}");
    host.assert_released("stopping", Some(&record));

    // A stopped container persists, as in LXD, until it is deleted.
    let recorded = host.recorded_state("stopping");
    assert_eq!(recorded.status, RecordedStatus::Stopped);
    assert_eq!(recorded.init_pid, None);
    assert!(recorded.exit_code.is_some() && recorded.stopped_at.is_some());
    assert_eq!(host.state("stopping").status, RecordedStatus::Stopped);
    assert!(!host.run_directory.join("stopping/control.sock").exists());
    let console = std::fs::read_to_string(host.container_directory("stopping").join("console.log"))
        .expect("the console log stays");
    assert!(console.contains(BOOT_MARKER));

    let again = host.run("stop", &["stopping"]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("is not running"),
        "{}",
        text(&again.stderr)
    );
    let exec = host.run("exec", &["stopping", "--", "true"]);
    assert_eq!(exec.status.code(), Some(125));
    assert!(
        text(&exec.stderr).contains("is not running"),
        "{}",
        text(&exec.stderr)
    );

    assert_success(&host.run("delete", &["stopping"]), "delete");
    host.assert_nothing_left("stopping", Some(&record));
}

#[test]
fn a_stopped_container_starts_again_with_its_files() {
    for (name, config) in [
        ("again", &[][..]),
        // The chown fallback shifts the snapshot once: the second start must not shift the
        // container's own files again.
        ("again-chown", &["security.idmap.shift=chown"][..]),
    ] {
        let host = MonitorHost::new(name);
        let first = host.start(name, busybox_image(), config);
        wait_for_console(&host, name, BOOT_MARKER);
        assert_success(
            &host.run(
                "exec",
                &[
                    name,
                    "--",
                    "sh",
                    "-c",
                    "echo kept > /root/note && chown 1000:1000 /root/note /etc/inittab",
                ],
            ),
            "write a file",
        );
        assert_success(&host.run("stop", &[name, "--force"]), "stop");
        host.assert_released(name, Some(&first));

        let second = host.start(name, busybox_image(), config);
        assert_ne!(second.monitor_pid, first.monitor_pid);
        wait_for_console(&host, name, BOOT_MARKER);
        // An image file the container gave away stays given away (a second shift would
        // have set it back to the image's owner).
        let output = host.run(
            "exec",
            &[
                name,
                "--",
                "stat",
                "-c",
                "%u:%g %n",
                "/root/note",
                "/etc/inittab",
            ],
        );
        assert_success(&output, "stat the files");
        assert_eq!(
            text(&output.stdout),
            "1000:1000 /root/note\n1000:1000 /etc/inittab\n"
        );
        let output = host.run("exec", &[name, "--", "cat", "/root/note"]);
        assert_eq!(text(&output.stdout), "kept\n");
        // The image's files still belong to the container's root.
        let output = host.run("exec", &[name, "--", "stat", "-c", "%u", "/bin/busybox"]);
        assert_eq!(text(&output.stdout).trim(), "0");
        // One console log per boot; the previous boot's beside it.
        let directory = host.container_directory(name);
        assert!(directory.join("console.log.1").is_file());

        assert_success(&host.run("delete", &[name, "--force"]), "delete");
        host.assert_nothing_left(name, Some(&second));
    }
}

#[test]
fn a_running_container_is_deleted_only_with_force() {
    let host = MonitorHost::new("forced");
    let record = host.start("forced", busybox_image(), &[]);
    let refused = host.run("delete", &["forced"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("is running"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(host.state("forced").status, RecordedStatus::Running);
    assert_success(
        &host.run("delete", &["forced", "--force"]),
        "delete --force",
    );
    host.assert_nothing_left("forced", Some(&record));
}

#[test]
fn init_halting_by_itself_ends_the_monitor() {
    let host = MonitorHost::new("halting");
    let record = host.start("halting", busybox_image(), &[]);
    wait_for_console(&host, "halting", BOOT_MARKER);
    assert_success(
        &host.run("exec", &["halting", "--", "poweroff"]),
        "poweroff",
    );
    wait_until("the monitor records Stopped", HALT_TIMEOUT, || {
        host.recorded_state("halting").status == RecordedStatus::Stopped
    });
    wait_until("the monitor exits", Duration::from_secs(5), || {
        !process_exists(record.monitor_pid, record.monitor_start_time)
    });
    host.assert_released("halting", Some(&record));
    assert_success(&host.run("delete", &["halting"]), "delete");
    host.assert_nothing_left("halting", Some(&record));
}

/// As with LXC's monitor: killing the monitor leaves the container running under its init;
/// what needs no monitor (state, stop, delete) still works, and cleans up fully.
#[test]
fn killing_the_monitor_leaves_the_container_running() {
    let host = MonitorHost::new("orphan");
    let record = host.start("orphan", busybox_image(), &[]);
    wait_for_console(&host, "orphan", BOOT_MARKER);
    let init = record.init_pid.expect("init runs");
    let init_start = record.init_start_time.expect("init's start time");

    assert!(process_exists(
        record.monitor_pid,
        record.monitor_start_time
    ));
    // SAFETY: kill(2) on the monitor this test started (checked by pid and start time).
    unsafe { libc::kill(record.monitor_pid as i32, libc::SIGKILL) };
    wait_until("the monitor dies", Duration::from_secs(5), || {
        !process_exists(record.monitor_pid, record.monitor_start_time)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        process_exists(init, init_start),
        "init died with its monitor"
    );

    let state = host.state("orphan");
    assert_eq!(state.status, RecordedStatus::Running);
    assert!(state.orphaned, "{state:?}");
    let exec = host.run("exec", &["orphan", "--", "true"]);
    assert_eq!(exec.status.code(), Some(125));
    assert!(
        text(&exec.stderr).contains("monitor of container \"orphan\" is gone"),
        "{}",
        text(&exec.stderr)
    );

    assert_success(&host.run("stop", &["orphan", "--timeout", "0"]), "stop");
    assert!(!process_exists(init, init_start));
    host.assert_released("orphan", Some(&record));
    assert_eq!(host.state("orphan").status, RecordedStatus::Stopped);
    assert_success(&host.run("delete", &["orphan"]), "delete");
    host.assert_nothing_left("orphan", Some(&record));
}

#[test]
fn bad_input_is_refused_and_leaves_nothing_behind() {
    let host = MonitorHost::new("refused");
    let image = busybox_image().to_string_lossy().into_owned();
    let cases: [(&str, Vec<&str>, &str); 7] = [
        (
            "missing",
            vec!["--rootfs", "/nonexistent/image"],
            "the rootfs /nonexistent/image is not a directory",
        ),
        (
            "unknown",
            vec!["--rootfs", &image, "--config", "limits.colour=blue"],
            "unknown configuration key \"limits.colour\"",
        ),
        (
            "malformed",
            vec!["--rootfs", &image, "--config", "limits.memory"],
            "malformed --config \"limits.memory\": expected KEY=VALUE",
        ),
        (
            "lots",
            vec!["--rootfs", &image, "--config", "limits.memory=lots"],
            "invalid limits.memory \"lots\"",
        ),
        (
            "1badname",
            vec!["--rootfs", &image],
            "invalid container name \"1badname\"",
        ),
        (
            "tiny",
            vec!["--rootfs", &image, "--config", "limits.memory=1kB"],
            "too small",
        ),
        // Refused inside the monitor, after it made the container's directory and cgroup.
        (
            "greedy",
            vec!["--rootfs", &image, "--config", "limits.cpu=4096"],
            "limits.cpu=4096",
        ),
    ];
    for (name, arguments, expected) in cases {
        let mut all = vec!["--name", name];
        all.extend(arguments);
        let output = host.run("start", &all);
        assert!(!output.status.success(), "{name} was accepted");
        assert!(output.stdout.is_empty(), "{name}: {}", text(&output.stdout));
        let error = text(&output.stderr);
        assert!(error.contains(expected), "{name}: unclear error: {error}");
        host.assert_nothing_left(name, None);
    }

    // A name clash changes nothing about the container that has the name.
    let first = host.start("twice", busybox_image(), &[]);
    let output = host.run("start", &["--name", "twice", "--rootfs", &image]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("container \"twice\" already exists"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(host.recorded_state("twice"), first);
    assert_success(
        &host.run("exec", &["twice", "--", "true"]),
        "exec in the first",
    );

    // The same name in another run directory: the container directory clashes inside the
    // monitor, which then removes its own entry and leaves the first container alone.
    let other_run = host.scratch.join("other-run");
    let mut command = host.command("start", &["--name", "twice", "--rootfs", &image]);
    command.arg("--run-dir").arg(&other_run);
    let output = run_with_timeout(command, Duration::from_secs(60));
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("container \"twice\" already exists"),
        "{}",
        text(&output.stderr)
    );
    assert!(
        !other_run.join("twice").exists(),
        "the refused start left its entry"
    );
    assert_success(
        &host.run("exec", &["twice", "--", "true"]),
        "exec in the first",
    );

    // A directory that is no container's is a clash too, and stays untouched.
    let stranger = host.container_directory("stranger");
    std::fs::create_dir_all(stranger.join("data")).expect("a foreign directory");
    let output = host.run("start", &["--name", "stranger", "--rootfs", &image]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("container \"stranger\" already exists"),
        "{}",
        text(&output.stderr)
    );
    assert!(
        stranger.join("data").is_dir(),
        "the foreign directory was touched"
    );
    std::fs::remove_dir_all(&stranger).expect("remove the foreign directory");

    assert_success(&host.run("stop", &["twice", "--force"]), "stop");
    assert_success(&host.run("delete", &["twice"]), "delete");
    host.assert_nothing_left("twice", Some(&first));
    let second = host.start("twice", busybox_image(), &[]);
    assert_ne!(second.monitor_pid, first.monitor_pid);

    // Bad requests to the clients.
    for (arguments, expected) in [
        (vec!["state", "nobody"], "no container \"nobody\""),
        (
            vec!["stop", "twice", "--timeout", "soon"],
            "malformed --timeout",
        ),
        (vec!["freeze"], "name the container"),
        (
            vec!["exec", "twice", "true"],
            "exec needs -- before the command",
        ),
        (
            vec!["frobnicate", "twice"],
            "unknown command \"frobnicate\"",
        ),
    ] {
        let output = host.run(arguments[0], &arguments[1..]);
        assert!(!output.status.success(), "{arguments:?} was accepted");
        assert!(
            text(&output.stderr).contains(expected),
            "{arguments:?}: {}",
            text(&output.stderr)
        );
    }
    assert_eq!(host.state("twice").status, RecordedStatus::Running);
}
