//! cove-agent: serves the host from inside a guest (see docs/agent.md). A thin shell over
//! `cove_agent::agent`: the command line, then `agent::run`.

use std::path::PathBuf;
use std::process::ExitCode;

use cove_agent::agent::{self, AgentConfig};
use cove_agent::protocol::{DEFAULT_ANNOUNCE_PORT, DEFAULT_PORT};
use cove_agent::transport::Address;

const USAGE: &str = "\
usage: cove-agent [--port N] [--announce-port N | --no-announce] [--init]
       cove-agent --unix PATH [--announce PATH] [--init]

Serves exec, file push and pull, state and shutdown to the host.

  --port N            the vsock port to serve on (default 1025)
  --announce-port N   the host (CID 2) vsock port to announce readiness to (default 1024)
  --no-announce       do not announce readiness
  --unix PATH         serve on a Unix socket at PATH instead of vsock
  --announce PATH     with --unix: announce readiness to the Unix socket at PATH
  --init              act as init (mounts, loopback, reaping orphans) although not PID 1;
                      as PID 1 the agent always does
  --max-connections N connections served at once (default 256)

As PID 1 (e.g. /init of an initramfs), arguments come from the kernel command line after
`--`.";

fn main() -> ExitCode {
    // First, before any thread exists: the reaper reads SIGCHLD from a signalfd.
    if let Err(error) = agent::block_sigchld() {
        eprintln!("cove-agent: error: {error}");
        return ExitCode::FAILURE;
    }
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let config = match parse(&arguments) {
        Ok(Some(config)) => config,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("cove-agent: error: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match agent::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "cove-agent: error: {}",
                cove_agent::agent::describe_error(&error)
            );
            ExitCode::FAILURE
        }
    }
}

fn parse(arguments: &[String]) -> Result<Option<AgentConfig>, String> {
    let mut port = DEFAULT_PORT;
    let mut announce_port = Some(DEFAULT_ANNOUNCE_PORT);
    let mut unix: Option<PathBuf> = None;
    let mut announce_path: Option<PathBuf> = None;
    let mut init = false;
    let mut max_connections = 256;
    let mut arguments = arguments.iter();
    let number = |flag: &str, value: Option<&String>| -> Result<u32, String> {
        let value = value.ok_or(format!("{flag} needs a number"))?;
        value
            .parse()
            .map_err(|_| format!("{flag} {value:?} is not a number from 0 to 4294967295"))
    };
    while let Some(argument) = arguments.next() {
        match argument.as_str() {
            "--port" => port = number("--port", arguments.next())?,
            "--announce-port" => announce_port = Some(number("--announce-port", arguments.next())?),
            "--no-announce" => announce_port = None,
            "--unix" => {
                unix = Some(PathBuf::from(
                    arguments.next().ok_or("--unix needs a PATH")?,
                ))
            }
            "--announce" => {
                announce_path = Some(PathBuf::from(
                    arguments.next().ok_or("--announce needs a PATH")?,
                ))
            }
            "--init" => init = true,
            "--max-connections" => {
                max_connections = number("--max-connections", arguments.next())?.max(1) as usize
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--version" => {
                println!("{}", cove_agent::protocol::agent_name());
                return Ok(None);
            }
            // As init, the kernel passes on command-line words it does not know; refusing them
            // would end PID 1, and with it the guest.
            other if std::process::id() == 1 => {
                eprintln!("cove-agent: ignoring unknown argument {other:?}")
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let (listen, announce) = match unix {
        Some(path) => (Address::Unix(path), announce_path.map(Address::Unix)),
        None => {
            if announce_path.is_some() {
                return Err(
                    "--announce PATH goes with --unix; over vsock use --announce-port".into(),
                );
            }
            (
                Address::Vsock { port },
                announce_port.map(|port| Address::Vsock { port }),
            )
        }
    };
    Ok(Some(AgentConfig {
        listen,
        announce,
        init,
        max_connections,
    }))
}
