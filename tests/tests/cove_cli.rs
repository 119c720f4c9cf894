//! The `cove` command line against a real coved on a throw-away COVE_DIR: a busybox image
//! imported with an alias, a container launched, listed (table, JSON, CSV), exec'd (output,
//! exit code, stdin, environment), files pushed and pulled with their mode, configuration set
//! and refused, a profile made and removed, the container stopped and deleted; and bad input
//! (an unknown instance, an invalid name, no daemon at all) answered with a message and exit
//! code 1. Containers need root; the no-daemon checks do not.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cove_tests::coved::{busybox_unified_tarball, Coved};
use serde_json::Value;

const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `cove --dir DIRECTORY ARGUMENTS` with `stdin`; kills it after a timeout.
fn cove_in(directory: &Path, arguments: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(cove_tests::coved::cove_binary())
        .arg("--dir")
        .arg(directory)
        .args(arguments)
        .env_remove("COVE_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cove");
    let mut input = child.stdin.take().expect("a stdin pipe");
    let bytes = stdin.to_vec();
    std::thread::spawn(move || {
        let _ = input.write_all(&bytes);
    });
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(COMMAND_TIMEOUT) {
        Ok(output) => output.expect("wait for cove"),
        Err(_) => {
            // SAFETY: kill(2) on our own child, not yet reaped (it is still running).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("cove {arguments:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
    }
}

/// Runs `cove --dir DIRECTORY ARGUMENTS` on a terminal of its own (under `script -qec`, which
/// exits with cove's code); kills it after a timeout.
fn cove_on_terminal(directory: &Path, arguments: &[&str]) -> Output {
    let quote = |word: &str| format!("'{}'", word.replace('\'', "'\\''"));
    let mut line = vec![
        quote(&cove_tests::coved::cove_binary().to_string_lossy()),
        "--dir".to_string(),
        quote(&directory.to_string_lossy()),
    ];
    line.extend(arguments.iter().map(|argument| quote(argument)));
    let child = Command::new("script")
        .args(["-qec", &line.join(" "), "/dev/null"])
        .env_remove("COVE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start script");
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(COMMAND_TIMEOUT) {
        Ok(output) => output.expect("wait for script"),
        Err(_) => {
            // SAFETY: kill(2) on our own child, not yet reaped (it is still running).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("cove {arguments:?} on a terminal did not finish within {COMMAND_TIMEOUT:?}");
        }
    }
}

fn cove(coved: &Coved, arguments: &[&str]) -> Output {
    cove_in(&coved.directory, arguments, b"")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `cove ARGUMENTS` must succeed; returns stdout.
fn cove_ok(coved: &Coved, arguments: &[&str]) -> String {
    let output = cove(coved, arguments);
    assert!(
        output.status.success(),
        "cove {} failed with {}:\n{}{}\n{}",
        arguments.join(" "),
        output.status,
        text(&output.stdout),
        text(&output.stderr),
        coved.log()
    );
    text(&output.stdout)
}

/// `cove ARGUMENTS` must fail with exit code 1 and a `cove: ` message; returns stderr.
fn cove_fails(directory: &Path, arguments: &[&str]) -> String {
    let output = cove_in(directory, arguments, b"");
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "cove {} should fail with 1: {}\n{stderr}",
        arguments.join(" "),
        text(&output.stdout)
    );
    assert!(stderr.starts_with("cove: "), "{stderr}");
    stderr
}

fn listed(coved: &Coved) -> Vec<Value> {
    let json = cove_ok(coved, &["list", "--format", "json"]);
    serde_json::from_str::<Value>(&json)
        .unwrap_or_else(|error| panic!("list --format json is not JSON ({error}): {json}"))
        .as_array()
        .cloned()
        .expect("a list")
}

#[test]
fn image_launch_list_exec_files_config_profile_stop_delete() {
    let coved = Coved::start("cli", &[]);
    let tarball = busybox_unified_tarball(&coved.directory);
    let tarball = tarball.to_string_lossy().into_owned();

    // Import with an alias; stderr is not a terminal, so the progress is one final line.
    let output = cove(&coved, &["image", "import", &tarball, "--alias", "busybox"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).starts_with("Image imported with fingerprint: "),
        "{}",
        text(&output.stdout)
    );
    let stderr = text(&output.stderr);
    assert!(stderr.contains("Transferring image: done"), "{stderr}");
    assert!(
        !stderr.contains('\r'),
        "no terminal, no redrawing: {stderr:?}"
    );
    let images = cove_ok(&coved, &["image", "list"]);
    assert!(images.contains("| busybox "), "{images}");
    assert!(cove_ok(&coved, &["image", "info", "busybox"]).contains("    - busybox\n"));

    // Launch and list.
    let launched = cove_ok(
        &coved,
        &["launch", "busybox", "web", "-c", "user.note=hello"],
    );
    assert_eq!(launched, "Creating web\nStarting web\n");
    let table = cove_ok(&coved, &["list"]);
    assert!(
        table.contains("| NAME |  STATE  | IPV4 | IPV6 |   TYPE    | SNAPSHOTS |"),
        "{table}"
    );
    assert!(
        table.contains("| web  | RUNNING |      |      | CONTAINER | 0         |"),
        "{table}"
    );
    let instances = listed(&coved);
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(instances[0]["name"], "web");
    assert_eq!(instances[0]["status"], "Running");
    assert_eq!(instances[0]["config"]["user.note"], "hello");
    assert_eq!(
        cove_ok(&coved, &["list", "-f", "csv", "-c", "nst"]),
        "web,RUNNING,CONTAINER\n"
    );
    let info = cove_ok(&coved, &["info", "web"]);
    assert!(info.contains("Status: RUNNING\n"), "{info}");
    assert!(info.contains("PID: "), "{info}");

    // Exec: output, exit code, stderr, stdin, environment, working directory.
    let output = cove(&coved, &["exec", "web", "--", "echo", "hello"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "hello\n");
    let output = cove(
        &coved,
        &["exec", "web", "--", "sh", "-c", "echo oops >&2; exit 3"],
    );
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(text(&output.stderr), "oops\n");
    // Interactive (`-t`, on a terminal): coved closes the terminal's websocket once the
    // command is done, and cove ends with its code.
    let output = cove_on_terminal(
        &coved.directory,
        &["exec", "web", "-t", "--", "sh", "-c", "echo hi; exit 7"],
    );
    assert_eq!(output.status.code(), Some(7), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("hi"),
        "{}",
        text(&output.stdout)
    );
    let output = cove_in(
        &coved.directory,
        &["exec", "web", "--", "cat"],
        b"through the pipe\n",
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "through the pipe\n");
    let output = cove(
        &coved,
        &[
            "exec",
            "web",
            "--env",
            "GREETING=hi",
            "--cwd",
            "/tmp",
            "--",
            "sh",
            "-c",
            "echo $GREETING; pwd",
        ],
    );
    assert_eq!(
        text(&output.stdout),
        "hi\n/tmp\n",
        "{}",
        text(&output.stderr)
    );

    // Files: contents and mode both ways.
    let local = coved.directory.join("cli-files");
    std::fs::create_dir_all(&local).expect("a local directory");
    let source = local.join("greeting.txt");
    std::fs::write(&source, "pushed by cove\n").expect("write a file");
    std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let source_text = source.to_string_lossy().into_owned();
    cove_ok(
        &coved,
        &["file", "push", &source_text, "web/tmp/greeting.txt"],
    );
    let output = cove(
        &coved,
        &["exec", "web", "--", "stat", "-c", "%a", "/tmp/greeting.txt"],
    );
    assert_eq!(text(&output.stdout), "640\n");
    cove_ok(
        &coved,
        &[
            "file",
            "push",
            &source_text,
            "web/tmp/private.txt",
            "--mode",
            "0600",
        ],
    );
    let pulled = local.join("pulled.txt");
    let pulled_text = pulled.to_string_lossy().into_owned();
    cove_ok(
        &coved,
        &["file", "pull", "web/tmp/private.txt", &pulled_text],
    );
    assert_eq!(
        std::fs::read_to_string(&pulled).expect("the pulled file"),
        "pushed by cove\n"
    );
    let mode = std::fs::metadata(&pulled)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o600);
    let into = local.join("into");
    std::fs::create_dir_all(&into).expect("a directory to pull into");
    cove_ok(
        &coved,
        &[
            "file",
            "pull",
            "web/tmp/greeting.txt",
            &into.to_string_lossy(),
        ],
    );
    let mode = std::fs::metadata(into.join("greeting.txt"))
        .expect("pulled into the directory")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640);
    let stderr = cove_fails(
        &coved.directory,
        &["file", "pull", "web/tmp/nothing", &pulled_text],
    );
    assert!(stderr.contains("/tmp/nothing"), "{stderr}");

    // Configuration.
    cove_ok(&coved, &["config", "set", "web", "user.color", "blue"]);
    assert_eq!(
        cove_ok(&coved, &["config", "get", "web", "user.color"]),
        "blue\n"
    );
    let shown = cove_ok(&coved, &["config", "show", "web"]);
    assert!(shown.contains("  user.color: blue\n"), "{shown}");
    let stderr = cove_fails(
        &coved.directory,
        &["config", "set", "web", "bogus.key", "1"],
    );
    assert!(stderr.contains("bogus.key"), "{stderr}");
    cove_ok(&coved, &["config", "unset", "web", "user.color"]);
    assert_eq!(
        cove_ok(&coved, &["config", "get", "web", "user.color"]),
        "\n"
    );

    // Profiles.
    cove_ok(&coved, &["profile", "create", "small"]);
    cove_ok(&coved, &["profile", "set", "small", "user.size", "small"]);
    let shown = cove_ok(&coved, &["profile", "show", "small"]);
    assert!(shown.contains("name: small\n"), "{shown}");
    assert!(shown.contains("  user.size: small\n"), "{shown}");
    assert!(cove_ok(&coved, &["profile", "list"]).contains("| small "));
    cove_ok(&coved, &["profile", "delete", "small"]);
    cove_fails(&coved.directory, &["profile", "show", "small"]);

    // Snapshots: take, change, restore, copy, rename, delete.
    let exec = |script: &str| cove_ok(&coved, &["exec", "web", "--", "sh", "-c", script]);
    exec("echo kept > /root/snapshotted");
    cove_ok(&coved, &["snapshot", "web", "first"]);
    exec("echo changed > /root/snapshotted");
    cove_ok(&coved, &["restore", "web", "first"]);
    assert_eq!(exec("cat /root/snapshotted"), "kept\n");
    let info = cove_ok(&coved, &["info", "web"]);
    assert!(
        info.contains("Snapshots:") && info.contains("| first "),
        "{info}"
    );
    cove_ok(&coved, &["copy", "web/first", "webcopy"]);
    assert_eq!(listed(&coved).len(), 2);
    cove_ok(&coved, &["rename", "web/first", "web/kept"]);
    cove_ok(&coved, &["delete", "web/kept", "webcopy"]);
    let stderr = cove_fails(&coved.directory, &["restore", "web", "kept"]);
    assert!(stderr.contains("not found"), "{stderr}");

    // Stop and delete.
    cove_ok(&coved, &["stop", "web"]);
    assert_eq!(listed(&coved)[0]["status"], "Stopped");
    cove_ok(&coved, &["delete", "web"]);
    assert!(listed(&coved).is_empty());
}

#[test]
fn bad_input_prints_an_error_and_exits_1() {
    let coved = Coved::start("cli-bad", &[]);
    let stderr = cove_fails(&coved.directory, &["info", "nosuch"]);
    assert!(stderr.contains("\"nosuch\" not found"), "{stderr}");
    let stderr = cove_fails(&coved.directory, &["exec", "nosuch", "--", "true"]);
    assert!(stderr.contains("nosuch"), "{stderr}");
    let stderr = cove_fails(&coved.directory, &["launch", "nothing-here", "web"]);
    assert!(stderr.contains("nothing-here"), "{stderr}");
    let tarball = busybox_unified_tarball(&coved.directory);
    cove_ok(
        &coved,
        &[
            "image",
            "import",
            &tarball.to_string_lossy(),
            "--alias",
            "busybox",
        ],
    );
    let stderr = cove_fails(&coved.directory, &["init", "busybox", "bad_name!"]);
    assert!(stderr.contains("invalid instance name"), "{stderr}");
    assert!(listed(&coved).is_empty());
}

#[test]
fn without_coved_the_error_says_how_to_start_it() {
    let directory = std::env::temp_dir().join(format!("cove-cli-none-{}", std::process::id()));
    let stderr = cove_fails(&directory, &["list"]);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "cove: cannot reach coved at {}/unix.socket: No such file or directory; start it \
             with coved --dir {}",
            directory.display(),
            directory.display()
        )
    );
    let stderr = cove_fails(&directory, &["frobnicate"]);
    assert!(
        stderr.contains("unknown command \"frobnicate\""),
        "{stderr}"
    );
    let stderr = cove_fails(&directory, &["launch", "busybox"]);
    assert!(stderr.contains("expected IMAGE NAME"), "{stderr}");
}
