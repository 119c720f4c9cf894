//! `cove-shim`: the per-container monitor and its command-line clients, a thin shell over the
//! cove-shim library (`cove_shim::monitor`). See `cove-shim --help` and docs/containers.md.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cove_shim::control::{ExecCommand, StateRecord, DEFAULT_STOP_TIMEOUT};
use cove_shim::monitor::{self, attach, client, MonitorError, RunDirectory, StartOptions};
use cove_shim::{BridgedNic, ContainerConfig, DiskMount, Host, Network, TerminalSize};

const USAGE: &str = "\
usage:
  cove-shim start --name NAME --rootfs DIR [--config KEY=VALUE]... [--run-dir DIR]
                  [--containers-dir DIR] [--cgroup-parent NAME]
                  [--device NAME,type=nic,nictype=bridged,parent=BRIDGE[,KEY=VALUE]...]
                  [--device NAME,type=disk,source=HOST_PATH,path=PATH[,readonly=true]]...
  cove-shim state NAME [--run-dir DIR]
  cove-shim exec [-t] NAME [--env NAME=VALUE]... [--cwd DIR] [--user UID[:GID]]
                  [--run-dir DIR] -- COMMAND [ARGUMENT]...
  cove-shim stop NAME [--timeout SECONDS | --force] [--run-dir DIR]
  cove-shim freeze NAME [--run-dir DIR]
  cove-shim unfreeze NAME [--run-dir DIR]
  cove-shim delete NAME [--force] [--run-dir DIR]

start   starts the container under a monitor that outlives this command; returns once its
        init runs, printing its state as JSON (or fails with the start error, leaving nothing)
state   prints the container's state as JSON
exec    runs COMMAND in the container on this command's stdin, stdout and stderr and exits
        with its status (125 when cove-shim itself fails); SIGINT, SIGTERM, SIGHUP and
        SIGQUIT are passed on to it; -t: on a new terminal of its own (this terminal in raw
        mode meanwhile, its size followed)
stop    halts init (SIGKILL after --timeout, default 10 s; --force: at once), releases the
        cgroup and the mount; the container's directory stays until delete
delete  removes a stopped container (--force stops it first)

defaults: --run-dir /run/cove, --containers-dir /var/lib/cove/containers, --cgroup-parent cove
configuration keys (--config): limits.memory, limits.cpu, limits.cpu.allowance,
limits.processes, security.privileged, security.idmap.base, security.idmap.size,
security.nesting, security.idmap.shift, security.syscalls.deny_default,
security.syscalls.deny_compat, user.hostname; devices (--device): one LXD bridged nic
(keys type, nictype, parent, hwaddr, name, mtu, host_name; name defaults to the device's
name) and any number of disks (keys type, source, path, readonly: the host path source bound
at path inside); see docs/containers.md";

/// cove-shim's own failure in `exec`, told apart from the command's statuses (as docker exec).
const EXEC_FAILURE: u8 = 125;
/// A command line cove-shim cannot use.
const USAGE_FAILURE: u8 = 2;

#[derive(Debug)]
enum Failure {
    Usage(String),
    Monitor(MonitorError),
}

impl From<MonitorError> for Failure {
    fn from(error: MonitorError) -> Self {
        Failure::Monitor(error)
    }
}

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let is_exec = arguments.first().is_some_and(|command| command == "exec");
    match run(arguments) {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Usage(message)) => {
            eprintln!("cove-shim: {message}\n\n{USAGE}");
            ExitCode::from(USAGE_FAILURE)
        }
        Err(Failure::Monitor(error)) => {
            eprintln!("cove-shim: error: {error}");
            ExitCode::from(if is_exec { EXEC_FAILURE } else { 1 })
        }
    }
}

fn run(arguments: Vec<String>) -> Result<u8, Failure> {
    let Some((command, rest)) = arguments.split_first() else {
        return Err(Failure::Usage("give a command".into()));
    };
    match command.as_str() {
        "start" => start(rest),
        "state" => {
            let (name, options) = named(rest, &[], &[])?;
            let state = client::state(&options.run_directory(), &name)?;
            print_state(&state);
            Ok(0)
        }
        "exec" => exec(rest),
        "stop" => {
            let (name, options) = named(rest, &["--timeout"], &["--force"])?;
            let timeout = if options.flag("--force") {
                Duration::ZERO
            } else {
                options
                    .value("--timeout")
                    .map(parse_timeout)
                    .transpose()?
                    .unwrap_or(DEFAULT_STOP_TIMEOUT)
            };
            let stopped = client::stop(&options.run_directory(), &name, timeout)?;
            let exit_code = stopped
                .exit_code
                .map_or("null".to_string(), |code| code.to_string());
            println!("{{\"clean\":{},\"exit_code\":{exit_code}}}", stopped.clean);
            Ok(0)
        }
        "freeze" => {
            let (name, options) = named(rest, &[], &[])?;
            client::freeze(&options.run_directory(), &name)?;
            Ok(0)
        }
        "unfreeze" => {
            let (name, options) = named(rest, &[], &[])?;
            client::unfreeze(&options.run_directory(), &name)?;
            Ok(0)
        }
        "delete" => {
            let (name, options) = named(rest, &[], &["--force"])?;
            client::delete(&options.run_directory(), &name, options.flag("--force"))?;
            Ok(0)
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => Err(Failure::Usage(format!("unknown command \"{other}\""))),
    }
}

fn start(arguments: &[String]) -> Result<u8, Failure> {
    let options = Options::parse(
        arguments,
        &[
            "--name",
            "--rootfs",
            "--config",
            "--run-dir",
            "--containers-dir",
            "--cgroup-parent",
            "--device",
        ],
        &[],
    )?;
    if let Some(extra) = options.positional.first() {
        return Err(Failure::Usage(format!("unexpected argument \"{extra}\"")));
    }
    let required = |option: &str| {
        options
            .value(option)
            .ok_or_else(|| Failure::Usage(format!("start needs {option}")))
    };
    let name = required("--name")?;
    let rootfs = required("--rootfs")?;
    let mut keys = BTreeMap::new();
    for pair in options.values("--config") {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            Failure::Usage(format!("malformed --config \"{pair}\": expected KEY=VALUE"))
        })?;
        if keys.insert(key.to_string(), value.to_string()).is_some() {
            return Err(Failure::Usage(format!("--config {key} is given twice")));
        }
    }
    let mut config = ContainerConfig::from_keys(name, rootfs, &keys).map_err(MonitorError::from)?;
    for device in options.values("--device") {
        add_device(&mut config, device)?;
    }
    let defaults = Host::default();
    let host = Host {
        containers_directory: options
            .value("--containers-dir")
            .map_or(defaults.containers_directory, PathBuf::from),
        cgroup_parent: options
            .value("--cgroup-parent")
            .map_or(defaults.cgroup_parent, str::to_string),
    };
    let state = monitor::start(&StartOptions {
        config,
        host,
        run_directory: options.run_directory(),
    })?;
    print_state(&state);
    Ok(0)
}

fn exec(arguments: &[String]) -> Result<u8, Failure> {
    let split = arguments
        .iter()
        .position(|argument| argument == "--")
        .ok_or_else(|| Failure::Usage("exec needs -- before the command".into()))?;
    let (before, command) = (&arguments[..split], &arguments[split + 1..]);
    if command.is_empty() {
        return Err(Failure::Usage("exec needs a command after --".into()));
    }
    let (name, options) = named(before, &["--env", "--cwd", "--user"], &["-t", "--tty"])?;
    let mut request = ExecCommand {
        command: command.to_vec(),
        cwd: options.value("--cwd").map(str::to_string),
        terminal: (options.flag("-t") || options.flag("--tty")).then(TerminalSize::default),
        ..ExecCommand::default()
    };
    for pair in options.values("--env") {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            Failure::Usage(format!("malformed --env \"{pair}\": expected NAME=VALUE"))
        })?;
        request
            .environment
            .insert(key.to_string(), value.to_string());
    }
    if let Some(user) = options.value("--user") {
        let number = |text: &str| {
            text.parse::<u32>().map_err(|_| {
                Failure::Usage(format!(
                    "malformed --user \"{user}\": expected UID or UID:GID"
                ))
            })
        };
        let (uid, gid) = match user.split_once(':') {
            Some((uid, gid)) => (number(uid)?, number(gid)?),
            None => (number(user)?, number(user)?),
        };
        request.uid = uid;
        request.gid = gid;
    }
    let _ = std::io::stdout().flush();
    // SAFETY: 0, 1 and 2 stay open for the life of this process; they are only lent to the
    // request, which sends copies to the monitor.
    let stdio = unsafe {
        [
            BorrowedFd::borrow_raw(0),
            BorrowedFd::borrow_raw(1),
            BorrowedFd::borrow_raw(2),
        ]
    };
    let code = attach::exec(&options.run_directory(), &name, &request, stdio)?;
    Ok(code.clamp(0, 255) as u8)
}

/// `NAME,KEY=VALUE,...`: an LXD device's name and keys.
fn parse_device(text: &str) -> Result<(String, BTreeMap<String, String>), Failure> {
    let malformed = || {
        Failure::Usage(format!(
            "malformed --device \"{text}\": expected NAME,KEY=VALUE[,KEY=VALUE]..."
        ))
    };
    let mut parts = text.split(',');
    let name = parts
        .next()
        .filter(|name| !name.is_empty())
        .ok_or_else(malformed)?;
    let mut keys = BTreeMap::new();
    for pair in parts {
        let (key, value) = pair.split_once('=').ok_or_else(malformed)?;
        keys.insert(key.to_string(), value.to_string());
    }
    Ok((name.to_string(), keys))
}

/// Adds one `--device` to the config: a bridged nic (its interface is named NAME unless
/// `name=` says) or a disk (a host path bound into the container).
fn add_device(config: &mut ContainerConfig, text: &str) -> Result<(), Failure> {
    let (name, mut keys) = parse_device(text)?;
    if keys.get("type").map(String::as_str) == Some("disk") {
        config.disks.push(
            DiskMount::from_device(&keys)
                .map_err(|error| MonitorError::from(cove_shim::ConfigError::from(error)))?,
        );
        return Ok(());
    }
    if config.network != Network::None {
        return Err(Failure::Usage(
            "only one nic --device (a bridged nic) is supported".into(),
        ));
    }
    keys.entry("name".to_string()).or_insert(name);
    config.network = Network::Bridged(BridgedNic::from_device(&keys).map_err(MonitorError::from)?);
    Ok(())
}

fn print_state(state: &StateRecord) {
    println!("{}", serde_json::to_string(state).unwrap_or_default());
}

fn parse_timeout(text: &str) -> Result<Duration, Failure> {
    text.parse::<f64>()
        .ok()
        .filter(|seconds| seconds.is_finite() && (0.0..=86_400.0).contains(seconds))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            Failure::Usage(format!(
                "malformed --timeout \"{text}\": expected seconds from 0 to 86400"
            ))
        })
}

/// The options after a command: `--option VALUE` pairs, flags, and positional arguments.
struct Options {
    values: Vec<(String, String)>,
    flags: Vec<String>,
    positional: Vec<String>,
}

impl Options {
    fn parse(arguments: &[String], with_values: &[&str], flags: &[&str]) -> Result<Self, Failure> {
        let mut options = Options {
            values: Vec::new(),
            flags: Vec::new(),
            positional: Vec::new(),
        };
        let mut arguments = arguments.iter();
        while let Some(argument) = arguments.next() {
            let (option, inline) = match argument.split_once('=') {
                Some((option, value)) if option.starts_with("--") => (option, Some(value)),
                _ => (argument.as_str(), None),
            };
            if option == "--run-dir" || with_values.contains(&option) {
                let value = match inline {
                    Some(value) => value.to_string(),
                    None => arguments
                        .next()
                        .cloned()
                        .ok_or_else(|| Failure::Usage(format!("{option} needs a value")))?,
                };
                options.values.push((option.to_string(), value));
            } else if flags.contains(&option) && inline.is_none() {
                options.flags.push(option.to_string());
            } else if option.starts_with('-') {
                return Err(Failure::Usage(format!("unknown option \"{argument}\"")));
            } else {
                options.positional.push(argument.clone());
            }
        }
        Ok(options)
    }

    fn value(&self, option: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(name, _)| name == option)
            .map(|(_, value)| value.as_str())
    }

    fn values<'a>(&'a self, option: &'a str) -> impl Iterator<Item = &'a str> {
        self.values
            .iter()
            .filter(move |(name, _)| name == option)
            .map(|(_, value)| value.as_str())
    }

    fn flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|name| name == flag)
    }

    fn run_directory(&self) -> RunDirectory {
        RunDirectory::new(
            self.value("--run-dir")
                .unwrap_or(monitor::DEFAULT_RUN_DIRECTORY),
        )
    }
}

/// A command that names one container: `NAME` plus options.
fn named(
    arguments: &[String],
    with_values: &[&str],
    flags: &[&str],
) -> Result<(String, Options), Failure> {
    let options = Options::parse(arguments, with_values, flags)?;
    match options.positional.as_slice() {
        [name] => Ok((name.clone(), options)),
        [] => Err(Failure::Usage("name the container".into())),
        [_, extra, ..] => Err(Failure::Usage(format!("unexpected argument \"{extra}\""))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(arguments: &[&str]) -> Vec<String> {
        arguments
            .iter()
            .map(|argument| argument.to_string())
            .collect()
    }

    fn usage_error(arguments: &[&str]) -> String {
        match run(strings(arguments)) {
            Err(Failure::Usage(message)) => message,
            other => panic!("{arguments:?} gave {other:?}, not a usage error"),
        }
    }

    #[test]
    fn options_take_values_separately_or_after_an_equals_sign() {
        let options = Options::parse(
            &strings(&["web", "--run-dir=/tmp/run", "--timeout", "2.5", "--force"]),
            &["--timeout"],
            &["--force"],
        )
        .expect("valid");
        assert_eq!(options.positional, ["web"]);
        assert_eq!(options.value("--run-dir"), Some("/tmp/run"));
        assert_eq!(options.value("--timeout"), Some("2.5"));
        assert!(options.flag("--force"));
        assert_eq!(
            options.run_directory(),
            RunDirectory::new("/tmp/run"),
            "--run-dir is known to every command"
        );
        let defaults = Options::parse(&strings(&["web"]), &[], &[]).expect("valid");
        assert_eq!(defaults.run_directory(), RunDirectory::new("/run/cove"));
    }

    #[test]
    fn repeated_config_keys_are_all_kept() {
        let options = Options::parse(
            &strings(&["--config", "a=1", "--config=b=2"]),
            &["--config"],
            &[],
        )
        .expect("valid");
        assert_eq!(
            options.values("--config").collect::<Vec<_>>(),
            ["a=1", "b=2"]
        );
    }

    #[test]
    fn command_lines_cove_shim_cannot_use_are_named() {
        assert_eq!(usage_error(&[]), "give a command");
        assert_eq!(
            usage_error(&["reboot", "web"]),
            "unknown command \"reboot\""
        );
        assert_eq!(usage_error(&["state"]), "name the container");
        assert_eq!(
            usage_error(&["state", "a", "b"]),
            "unexpected argument \"b\""
        );
        assert_eq!(
            usage_error(&["state", "web", "--verbose"]),
            "unknown option \"--verbose\""
        );
        assert_eq!(
            usage_error(&["stop", "web", "--timeout"]),
            "--timeout needs a value"
        );
        assert!(usage_error(&["stop", "web", "--timeout", "-1"]).contains("malformed --timeout"));
        assert!(usage_error(&["stop", "web", "--timeout", "nan"]).contains("malformed --timeout"));
        assert_eq!(
            usage_error(&["start", "--rootfs", "/x"]),
            "start needs --name"
        );
        assert_eq!(
            usage_error(&["start", "--name", "web", "--rootfs", "/x", "--config", "cpu"]),
            "malformed --config \"cpu\": expected KEY=VALUE"
        );
        assert_eq!(
            usage_error(&[
                "start", "--name", "web", "--rootfs", "/x", "--config", "a=1", "--config", "a=2"
            ]),
            "--config a is given twice"
        );
        assert_eq!(
            usage_error(&["exec", "web", "true"]),
            "exec needs -- before the command"
        );
        assert_eq!(
            usage_error(&["exec", "web", "--"]),
            "exec needs a command after --"
        );
        assert!(usage_error(&["exec", "web", "--user", "root", "--", "id"]).contains("--user"));
        assert!(usage_error(&["exec", "web", "--env", "A", "--", "env"]).contains("NAME=VALUE"));
    }

    #[test]
    fn exec_takes_a_terminal_flag() {
        let options =
            Options::parse(&strings(&["-t", "web"]), &["--env"], &["-t", "--tty"]).expect("valid");
        assert!(options.flag("-t"));
        assert_eq!(options.positional, ["web"]);
        assert_eq!(
            usage_error(&["exec", "-x", "web", "--", "true"]),
            "unknown option \"-x\""
        );
    }

    #[test]
    fn timeouts_are_seconds() {
        assert_eq!(parse_timeout("0").ok(), Some(Duration::ZERO));
        assert_eq!(parse_timeout("2.5").ok(), Some(Duration::from_millis(2500)));
        assert!(parse_timeout("86401").is_err());
    }
}
