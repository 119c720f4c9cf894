//! cove-agent-ctl: the host's command for a cove-agent (see docs/agent.md). It prints a
//! command's output as it comes and exits with the command's status.
//!
//! A thin shell over `cove_agent::client`: the command line here, a terminal's raw mode and
//! signal forwarding in `terminal`, recursive copies in `copy`, measurements in `bench`.

mod bench;
mod copy;
mod terminal;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cove_agent::client::{self, Client, ClientError, Endpoint, ExecEvent};
use cove_agent::protocol::{
    Channel, ErrorCode, ExecRequest, PowerAction, WindowSize, DEFAULT_ANNOUNCE_PORT, DEFAULT_PATH,
    DEFAULT_PORT,
};

const USAGE: &str = "\
usage: cove-agent-ctl (--vsock-socket PATH [--port N] | --unix PATH) [--timeout S] COMMAND

  --vsock-socket PATH  cove-vmm's vsock socket (--vsock cid=N,socket=PATH); the agent is on
                       guest port --port (default 1025)
  --unix PATH          an agent started with `cove-agent --unix PATH`
  --timeout S          how long connecting and the hello may take (default 30)

commands:
  exec [-t|-T] [--env NAME=VALUE]... [--cwd DIR] [--user UID] [--group GID] [--] PROGRAM [ARG]...
        run PROGRAM; -t forces a pty, -T forbids one (default: a pty when stdin and stdout
        are terminals). Output is printed as it comes; the exit status is the command's
        (128+N when signal N killed it; 127 when it was not found, 126 when it could not be
        started, 255 when the agent could not be reached)
  push [-r] [--mode OCTAL] [--uid N] [--gid N] LOCAL REMOTE
        copy a file (a directory with -r) into the guest; mode and owner are LOCAL's unless
        given. A REMOTE ending in / gets LOCAL's name
  pull [-r] REMOTE LOCAL
        copy a file (a directory with -r) out of the guest; LOCAL - is stdout
  state
        the guest's memory, disk, interfaces, processes and uptime, as JSON
  shutdown [--reboot] [--grace S]
        power off (or reboot) the guest
  wait-ready [--listen PATH] [--announce-port N] [--wait S]
        listen where the agent announces itself (default: the vsock socket's
        PATH_<announce port>, 1024 unless given) and print the announcement
  bench [--execs N] [--bytes SIZE] [--remote-dir DIR]
        median exec round trip of N `true` execs and push/pull throughput, as JSON";

/// Exit status for failures of cove-agent-ctl itself (as ssh does).
const OWN_FAILURE: u8 = 255;

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    match run(&arguments) {
        Ok(status) => ExitCode::from(status),
        Err(Failure::Usage(message)) => {
            eprintln!("cove-agent-ctl: error: {message}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Client(error)) => {
            eprintln!("cove-agent-ctl: error: {}", describe(&error));
            ExitCode::from(OWN_FAILURE)
        }
        Err(Failure::Other(message)) => {
            eprintln!("cove-agent-ctl: error: {message}");
            ExitCode::from(OWN_FAILURE)
        }
    }
}

pub(crate) enum Failure {
    Usage(String),
    Client(ClientError),
    Other(String),
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        Failure::Client(error)
    }
}

/// An error and its causes, as one line.
pub(crate) fn describe(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// The command line's arguments, consumed front to back.
pub(crate) struct Arguments<'a> {
    rest: &'a [String],
}

impl<'a> Arguments<'a> {
    fn next(&mut self) -> Option<&'a str> {
        let (first, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(first)
    }

    fn peek(&self) -> Option<&'a str> {
        self.rest.first().map(String::as_str)
    }

    fn value(&mut self, flag: &str) -> Result<&'a str, Failure> {
        self.next()
            .ok_or_else(|| Failure::Usage(format!("{flag} needs a value")))
    }

    pub(crate) fn number<T: std::str::FromStr>(&mut self, flag: &str) -> Result<T, Failure> {
        let value = self.value(flag)?;
        value
            .parse()
            .map_err(|_| Failure::Usage(format!("{flag} {value:?} is not a valid number")))
    }
}

fn run(arguments: &[String]) -> Result<u8, Failure> {
    let mut arguments = Arguments { rest: arguments };
    let mut vsock_socket: Option<PathBuf> = None;
    let mut unix: Option<PathBuf> = None;
    let mut port = DEFAULT_PORT;
    let mut timeout = Duration::from_secs(30);
    let command = loop {
        match arguments.next() {
            Some("--vsock-socket") => {
                vsock_socket = Some(arguments.value("--vsock-socket")?.into())
            }
            Some("--unix") => unix = Some(arguments.value("--unix")?.into()),
            Some("--port") => port = arguments.number("--port")?,
            Some("--timeout") => timeout = Duration::from_secs(arguments.number("--timeout")?),
            Some("-h" | "--help") => {
                println!("{USAGE}");
                return Ok(0);
            }
            Some(flag) if flag.starts_with('-') => {
                return Err(Failure::Usage(format!("unknown option {flag:?}")))
            }
            Some(command) => break command,
            None => return Err(Failure::Usage("no command given".into())),
        }
    };
    let endpoint = match (&vsock_socket, &unix) {
        (Some(socket), None) => Endpoint::Vsock {
            socket: socket.clone(),
            port,
        },
        (None, Some(path)) => Endpoint::Unix(path.clone()),
        _ => {
            return Err(Failure::Usage(
                "give exactly one of --vsock-socket PATH and --unix PATH".into(),
            ))
        }
    };
    let client = Client::new(endpoint).with_connect_timeout(timeout);
    match command {
        "exec" => exec(&client, &mut arguments),
        "push" => copy::push(&client, &mut arguments).map(|()| 0),
        "pull" => copy::pull(&client, &mut arguments).map(|()| 0),
        "state" => {
            no_more(&arguments)?;
            let state = client.state()?;
            let json = serde_json::to_string_pretty(&state)
                .map_err(|error| Failure::Other(error.to_string()))?;
            println!("{json}");
            Ok(0)
        }
        "shutdown" => {
            let mut action = PowerAction::Poweroff;
            let mut grace = None;
            while let Some(flag) = arguments.next() {
                match flag {
                    "--reboot" => action = PowerAction::Reboot,
                    "--grace" => grace = Some(arguments.number("--grace")?),
                    other => {
                        return Err(Failure::Usage(format!("unknown shutdown option {other:?}")))
                    }
                }
            }
            client.shutdown(action, grace)?;
            Ok(0)
        }
        "wait-ready" => wait_ready(vsock_socket.as_deref(), &mut arguments),
        "bench" => bench::run(&client, &mut arguments).map(|()| 0),
        other => Err(Failure::Usage(format!("unknown command {other:?}"))),
    }
}

fn no_more(arguments: &Arguments) -> Result<(), Failure> {
    match arguments.peek() {
        Some(extra) => Err(Failure::Usage(format!("unexpected argument {extra:?}"))),
        None => Ok(()),
    }
}

fn exec(client: &Client, arguments: &mut Arguments) -> Result<u8, Failure> {
    let mut pty: Option<bool> = None;
    let mut environment: BTreeMap<String, String> = BTreeMap::new();
    let mut request = ExecRequest::default();
    loop {
        match arguments.peek() {
            Some("-t" | "--pty") => pty = Some(true),
            Some("-T" | "--no-pty") => pty = Some(false),
            Some("--env") => {
                arguments.next();
                let pair = arguments.value("--env")?;
                let (name, value) = pair
                    .split_once('=')
                    .ok_or_else(|| Failure::Usage(format!("--env {pair:?} is not NAME=VALUE")))?;
                environment.insert(name.to_string(), value.to_string());
                continue;
            }
            Some("--cwd") => {
                arguments.next();
                request.cwd = Some(arguments.value("--cwd")?.to_string());
                continue;
            }
            Some("--user") => {
                arguments.next();
                request.uid = Some(arguments.number("--user")?);
                continue;
            }
            Some("--group") => {
                arguments.next();
                request.gid = Some(arguments.number("--group")?);
                continue;
            }
            Some("--") => {
                arguments.next();
                break;
            }
            Some(flag) if flag.starts_with('-') => {
                return Err(Failure::Usage(format!("unknown exec option {flag:?}")))
            }
            _ => break,
        }
        arguments.next();
    }
    while let Some(argument) = arguments.next() {
        request.argv.push(argument.to_string());
    }
    if request.argv.is_empty() {
        return Err(Failure::Usage("exec needs a PROGRAM".into()));
    }
    let use_pty = pty.unwrap_or_else(|| terminal::is_terminal(0) && terminal::is_terminal(1));
    // A usable default environment, as `lxc exec` gives; --env overrides it.
    let mut full_environment = BTreeMap::from([
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
    ]);
    if request.uid.unwrap_or(0) == 0 {
        full_environment.insert("HOME".into(), "/root".into());
    }
    if use_pty {
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into());
        full_environment.insert("TERM".into(), term);
        request.pty = Some(terminal::window_size().unwrap_or(WindowSize {
            rows: 24,
            columns: 80,
        }));
    }
    full_environment.extend(environment);
    request.environment = full_environment;

    // Blocked before any thread starts, so only the forwarding thread takes them.
    let forwarded = terminal::block_forwarded_signals();
    let mut exec = match client.exec(&request) {
        Ok(exec) => exec,
        Err(error) => {
            eprintln!("cove-agent-ctl: {}", describe(&error));
            return Ok(match error.agent_code() {
                Some(ErrorCode::NotFound) => 127,
                Some(ErrorCode::ExecFailed | ErrorCode::PermissionDenied) => 126,
                _ => OWN_FAILURE,
            });
        }
    };
    let raw_mode = if use_pty && terminal::is_terminal(0) {
        terminal::RawMode::enter(0)
    } else {
        None
    };
    terminal::forward_signals(forwarded, exec.control(), use_pty);
    terminal::forward_stdin(exec.control());
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let status = loop {
        match exec.next_event() {
            Ok(ExecEvent::Output(Channel::Stderr, bytes)) => {
                let _ = stderr.write_all(&bytes);
                let _ = stderr.flush();
            }
            Ok(ExecEvent::Output(_, bytes)) => {
                let _ = stdout.write_all(&bytes);
                let _ = stdout.flush();
            }
            Ok(ExecEvent::Closed(_)) => {}
            Ok(ExecEvent::Exited(status)) => break status,
            Err(error) => {
                drop(raw_mode);
                eprintln!("cove-agent-ctl: {}", describe(&error));
                return Ok(OWN_FAILURE);
            }
        }
    };
    drop(raw_mode);
    Ok(status.shell_status().clamp(0, 255) as u8)
}

fn wait_ready(
    vsock_socket: Option<&std::path::Path>,
    arguments: &mut Arguments,
) -> Result<u8, Failure> {
    let mut listen: Option<PathBuf> = None;
    let mut announce_port = DEFAULT_ANNOUNCE_PORT;
    let mut wait = Duration::from_secs(600);
    while let Some(flag) = arguments.next() {
        match flag {
            "--listen" => listen = Some(arguments.value("--listen")?.into()),
            "--announce-port" => announce_port = arguments.number("--announce-port")?,
            "--wait" => wait = Duration::from_secs(arguments.number("--wait")?),
            other => {
                return Err(Failure::Usage(format!(
                    "unknown wait-ready option {other:?}"
                )))
            }
        }
    }
    let path = match (listen, vsock_socket) {
        (Some(path), _) => path,
        (None, Some(socket)) => client::announce_path(socket, announce_port),
        (None, None) => {
            return Err(Failure::Usage(
                "wait-ready needs --listen PATH, or --vsock-socket to listen beside".into(),
            ))
        }
    };
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .map_err(|error| Failure::Other(format!("cannot listen at {}: {error}", path.display())))?;
    let result = client::wait_ready(&listener, wait);
    let _ = std::fs::remove_file(&path);
    let hello = result?;
    let json = serde_json::to_string(&hello).map_err(|error| Failure::Other(error.to_string()))?;
    println!("{json}");
    Ok(0)
}
