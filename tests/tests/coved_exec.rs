//! Exec's websockets end as LXD ends them: once an interactive command exited and its
//! terminal's output is drained, coved closes websocket `0` (a normal close frame) before the
//! operation completes with `metadata.return`; a client that goes away ends the command (the
//! terminal's hangup, then a kill). Real containers under real cove-shim monitors; run as
//! root.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use cove_tests::container::BOOT_MARKER;
use cove_tests::coved::{busybox_unified_tarball, eventually, Coved, WebsocketOperation};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

fn booted(coved: &Coved, name: &str) {
    eventually("the boot marker", BOOT_TIMEOUT, || {
        let response = coved.request("GET", &format!("/1.0/instances/{name}/console"), None);
        String::from_utf8_lossy(&response.body).contains(BOOT_MARKER)
    });
}

/// Starts an exec; returns its websocket operation.
fn start_exec(coved: &Coved, name: &str, request: Value) -> WebsocketOperation {
    coved.websocket_operation(&format!("/1.0/instances/{name}/exec"), request)
}

/// Reads what a websocket already holds, without waiting for more; returns the data and
/// whether its close frame was among it.
fn read_waiting(socket: &mut WebSocket<UnixStream>) -> (Vec<u8>, bool) {
    socket
        .get_ref()
        .set_nonblocking(true)
        .expect("a non-blocking socket");
    let mut data = Vec::new();
    loop {
        match socket.read() {
            Ok(Message::Binary(bytes)) => data.extend_from_slice(&bytes),
            Ok(Message::Close(_)) => return (data, true),
            Ok(_) => {}
            Err(_) => return (data, false),
        }
    }
}

/// The processes in the container whose command line mentions `needle` (through `ps` run by
/// a second exec).
fn container_processes(coved: &Coved, name: &str, needle: &str) -> Vec<String> {
    let (code, stdout, stderr) = coved.exec(name, &["ps", "-o", "pid,args"], b"");
    assert_eq!(code, 0, "{stderr}");
    stdout
        .lines()
        .filter(|line| line.contains(needle) && !line.contains("ps -o"))
        .map(str::to_string)
        .collect()
}

#[test]
fn exec_websockets_close_once_the_command_is_done_and_a_gone_client_ends_it() {
    let coved = Coved::start("exec-close", &[]);
    coved.import_image(&busybox_unified_tarball(&coved.directory), "busybox");
    coved.launch("shell", "busybox", json!({}));
    booted(&coved, "shell");

    // Interactive: websocket 0 closes (a normal close frame) once the command exited and its
    // output is drained, and only then does the operation complete: when `/wait` returns,
    // the output and the close frame are already waiting on the socket.
    let operation = start_exec(
        &coved,
        "shell",
        json!({
            "command": ["sh", "-c", "echo hi; exit 7"], "wait-for-websocket": true,
            "interactive": true, "width": 80, "height": 24,
        }),
    );
    let mut terminal = operation.connect("0");
    let _control = operation.connect("control");
    let done = coved.get(&format!("{}/wait?timeout=60", operation.url));
    assert_eq!(done["status"], "Success", "{done}");
    assert_eq!(done["metadata"]["return"], 7, "{done}");
    let (output, closed) = read_waiting(&mut terminal);
    let output = String::from_utf8_lossy(&output).into_owned();
    assert!(
        closed,
        "the operation completed before websocket 0 was closed (output so far {output:?})"
    );
    assert!(output.contains("hi"), "{output:?}");

    // Non-interactive: 1 and 2 close at their end-of-file, 0 once the command exited, and
    // all before the operation completes.
    let operation = start_exec(
        &coved,
        "shell",
        json!({
            "command": ["sh", "-c", "echo out; echo err >&2; exit 4"],
            "wait-for-websocket": true, "interactive": false,
        }),
    );
    let mut sockets: Vec<_> = ["0", "1", "2"]
        .into_iter()
        .map(|fd| operation.connect(fd))
        .collect();
    let done = coved.get(&format!("{}/wait?timeout=60", operation.url));
    assert_eq!(done["metadata"]["return"], 4, "{done}");
    let (out, out_closed) = read_waiting(&mut sockets[1]);
    let (err, err_closed) = read_waiting(&mut sockets[2]);
    assert!(out_closed && err_closed, "stdout or stderr still open");
    assert_eq!((&out[..], &err[..]), (&b"out\n"[..], &b"err\n"[..]));
    let (_, input_closed) = read_waiting(&mut sockets[0]);
    assert!(input_closed, "coved did not close websocket 0");

    // An interactive client that goes away: the command gets the terminal's hangup, the
    // operation ends, and the command is gone from the container.
    let operation = start_exec(
        &coved,
        "shell",
        json!({
            "command": ["sleep", "4242"], "wait-for-websocket": true, "interactive": true,
        }),
    );
    let terminal = operation.connect("0");
    eventually("sleep runs", Duration::from_secs(20), || {
        !container_processes(&coved, "shell", "sleep 4242").is_empty()
    });
    drop(terminal);
    let done = coved.get(&format!("{}/wait?timeout=60", operation.url));
    assert_ne!(done["status"], "Running", "{done}");
    assert!(
        container_processes(&coved, "shell", "sleep 4242").is_empty(),
        "sleep outlived its client"
    );

    // A piped command whose client went away (no stdin, nobody reading) is killed too.
    let operation = start_exec(
        &coved,
        "shell",
        json!({
            "command": ["sleep", "4343"], "wait-for-websocket": true, "interactive": false,
        }),
    );
    let sockets: Vec<_> = ["0", "1", "2"]
        .into_iter()
        .map(|fd| operation.connect(fd))
        .collect();
    eventually("sleep runs", Duration::from_secs(20), || {
        !container_processes(&coved, "shell", "sleep 4343").is_empty()
    });
    drop(sockets);
    let done = coved.get(&format!("{}/wait?timeout=60", operation.url));
    assert_ne!(done["status"], "Running", "{done}");
    assert!(
        container_processes(&coved, "shell", "sleep 4343").is_empty(),
        "sleep outlived its client"
    );
    coved.delete_all();
}
