//! `POST /1.0/instances/<name>/console` for a virtual machine: LXD's interactive console, a
//! `websocket` operation with the secrets `0` (the console, both ways) and `control`. What the
//! client sends on `0` is typed into the guest's serial port through cove-vmm's serial input
//! socket; what the guest writes there (the serial log, from the moment of attaching) goes back
//! on `0`. The operation ends when the client closes either websocket or the VM stops.

use std::collections::{BTreeMap, HashMap};
use std::io::SeekFrom;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::instances::resources;
use super::{accepted, json_body, ApiError, ApiResult};
use crate::clock;
use crate::daemon::Daemon;
use crate::instances::runtime::RuntimeStatus;
use crate::operations::{Class, ConnectedSocket, OperationHandle};

/// How long the console waits for its websockets.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the serial log is read for new output.
const OUTPUT_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Default, Deserialize)]
struct ConsolePost {
    #[serde(default, rename = "type")]
    kind: String,
}

pub async fn attach(daemon: Arc<Daemon>, name: String, body: Body) -> ApiResult {
    let request: ConsolePost = json_body(body).await?;
    match request.kind.as_str() {
        "" | "console" => {}
        other => {
            return Err(ApiError::bad_request(format!(
                "console type \"{other}\" is not supported: use \"console\" (the serial console)"
            )))
        }
    }
    if daemon.status_of(&name) != RuntimeStatus::Running {
        return Err(ApiError::bad_request(format!(
            "instance \"{name}\" is not running: start it to attach to its console"
        )));
    }
    let Some(machines) = daemon.runtime.virtual_machines() else {
        return Err(ApiError::bad_request("this coved runs no virtual machines"));
    };
    let input = machines.console_input(&name);
    let log = machines.console_path(&name);
    let secrets: BTreeMap<String, String> = ["0", "control"]
        .iter()
        .map(|fd| (fd.to_string(), clock::secret()))
        .collect();
    let operation = daemon.operations.create(
        Class::Websocket,
        "Showing console",
        resources(&name),
        json!({ "fds": secrets }),
        false,
    );
    let sockets = operation.accept_websockets(&secrets);
    let task_operation = operation.clone();
    tokio::spawn(async move {
        match session(sockets, &task_operation, input, log).await {
            Ok(()) => task_operation.succeed(None),
            Err(message) => task_operation.fail(&message),
        }
    });
    accepted(&operation)
}

async fn connect_both(
    sockets: &mut tokio::sync::mpsc::UnboundedReceiver<ConnectedSocket>,
    operation: &OperationHandle,
) -> Result<HashMap<String, WebSocket>, String> {
    let mut connected = HashMap::new();
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    while !connected.contains_key("0") || !connected.contains_key("control") {
        tokio::select! {
            socket = sockets.recv() => match socket {
                Some((fd, socket)) => { connected.insert(fd, socket); }
                None => return Err("the operation ended before its websockets connected".into()),
            },
            () = tokio::time::sleep_until(deadline) => {
                return Err(format!(
                    "the console's websockets did not connect within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            }
            () = operation.cancel_requested() => return Err("cancelled".into()),
        }
    }
    Ok(connected)
}

async fn session(
    mut sockets: tokio::sync::mpsc::UnboundedReceiver<ConnectedSocket>,
    operation: &OperationHandle,
    input: std::path::PathBuf,
    log: std::path::PathBuf,
) -> Result<(), String> {
    let mut connected = connect_both(&mut sockets, operation).await?;
    let (Some(console), Some(control)) = (connected.remove("0"), connected.remove("control"))
    else {
        return Err("the console's websockets did not connect".into());
    };
    let mut serial = tokio::net::UnixStream::connect(&input)
        .await
        .map_err(|error| {
            format!(
                "cannot reach the VM's console at {}: {error}",
                input.display()
            )
        })?;
    let mut output = tokio::fs::File::open(&log)
        .await
        .map_err(|error| format!("cannot read the console log {}: {error}", log.display()))?;
    output
        .seek(SeekFrom::End(0))
        .await
        .map_err(|error| format!("cannot read the console log: {error}"))?;
    let (mut sink, mut stream) = console.split();
    let (_, mut control_stream) = control.split();
    let mut ticker = tokio::time::interval(OUTPUT_POLL);
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if serial.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if serial.write_all(text.as_bytes()).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            message = control_stream.next() => match message {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                // Window sizes mean nothing to a serial port.
                Some(Ok(_)) => {}
            },
            _ = ticker.tick() => {
                loop {
                    match output.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(read) => {
                            let message = Message::Binary(buffer[..read].to_vec().into());
                            if sink.send(message).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                }
                // cove-vmm removes the socket when the VM ends.
                if !input.exists() {
                    break;
                }
            }
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    Ok(())
}
