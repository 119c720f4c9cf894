//! The command line, read once into a typed [`Command`]: `lxc`'s shape (`cove launch IMAGE
//! NAME -c key=value`, `cove exec NAME -- CMD`, ...). Nothing past this module looks at the raw
//! arguments; the flags of each subcommand are read by `super::flags`.

use std::path::PathBuf;

use super::flags::{
    at_least_one, exactly, key_value, number, read_flags, switch, usage, valued, Flag, Parsed,
};
use super::format::{Column, Format};
use super::CliError;

pub const USAGE: &str = "usage: cove [--dir DIR] COMMAND [ARGUMENTS]

Talks to coved over DIR/unix.socket (DIR: --dir, else $COVE_DIR, else /var/lib/cove).

Instances:
  launch IMAGE NAME [-c KEY=VALUE]... [-p PROFILE]... [-e|--ephemeral] [--vm]
  init IMAGE NAME [-c KEY=VALUE]... [-p PROFILE]... [-e|--ephemeral] [--vm]   create, do not start
  start NAME...
  stop NAME... [-f|--force] [--timeout SECONDS]
  restart NAME... [-f|--force] [--timeout SECONDS]
  pause NAME...
  delete NAME... [-f|--force]       (NAME/SNAPSHOT deletes a snapshot)
  rename NAME NEW_NAME              (NAME/SNAPSHOT NAME/NEW renames a snapshot)
  snapshot NAME [SNAPSHOT] [--expiry TIME]
  restore NAME SNAPSHOT
  copy SOURCE[/SNAPSHOT] TARGET [--instance-only] [-c KEY=VALUE]... [-e|--ephemeral]
  list [PREFIX] [-f|--format table|json|yaml|csv] [-c|--columns ns46tS]
  info NAME
  exec NAME [--env KEY=VALUE]... [--cwd DIR] [--user UID] [--group GID] [-t|-T] [-n] -- COMMAND...
  console NAME --show-log
  file push SOURCE... NAME/PATH [--uid UID] [--gid GID] [--mode MODE] [-r] [-p]
  file pull NAME/PATH... DESTINATION [-r]
  file delete NAME/PATH...
  config set NAME KEY VALUE | config set NAME KEY=VALUE...
  config get NAME KEY [-e|--expanded]
  config unset NAME KEY
  config show NAME [-e|--expanded]
Profiles:
  profile list [-f FORMAT] | show NAME | create NAME | delete NAME
  profile set NAME KEY VALUE | unset NAME KEY | edit NAME   (edit reads YAML or JSON on stdin)
Images:
  image import FILE [ROOTFS] [--alias NAME]... [--public]
  image list [-f FORMAT] | info IMAGE | delete IMAGE...
  image alias create NAME IMAGE | delete NAME | list [-f FORMAT]
Storage:
  storage create NAME DRIVER [KEY=VALUE]...   (DRIVER: dir or btrfs; keys source, size)
  storage list [-f FORMAT] | info NAME | delete NAME | set NAME KEY=VALUE...
  storage volume create POOL NAME [KEY=VALUE]... | list POOL [-f FORMAT] | delete POOL NAME
Networks:
  network list [-f FORMAT] | show NAME | delete NAME | list-leases NAME [-f FORMAT]
  network create NAME [KEY=VALUE]...    (ipv4.address=auto|ADDRESS/PREFIX, ipv4.nat, ...)
  network set NAME KEY VALUE | set NAME KEY=VALUE... | unset NAME KEY | get NAME KEY

List columns: n name, s state, 4 IPv4, 6 IPv6, t type, S snapshots, p pid, P profiles,
c created, l last used, N processes, m memory, a architecture, d description.";

/// Everything the command line asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    /// coved's directory: `--dir`, `$COVE_DIR`, `/var/lib/cove`.
    pub directory: PathBuf,
    pub command: Command,
}

/// `launch` and `init`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Create {
    pub image: String,
    pub name: String,
    pub config: Vec<(String, String)>,
    /// `None`: the server's default (`default`).
    pub profiles: Option<Vec<String>>,
    pub ephemeral: bool,
    pub start: bool,
    /// `--vm`: a virtual machine instead of a container.
    pub virtual_machine: bool,
}

/// Whether exec runs on a terminal: as `lxc` decides by default, or forced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Terminal {
    /// Interactive when stdin and stdout are terminals.
    #[default]
    Automatic,
    Forced,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Exec {
    pub name: String,
    pub command: Vec<String>,
    pub environment: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub user: Option<u32>,
    pub group: Option<u32>,
    pub terminal: Terminal,
    /// `-n`: stdin is /dev/null.
    pub no_stdin: bool,
}

/// `NAME/PATH`: a file inside an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancePath {
    pub instance: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Push {
    pub sources: Vec<PathBuf>,
    pub target: Option<InstancePath>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
    pub recursive: bool,
    pub create_directories: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help,
    Version,
    Create(Create),
    Start(Vec<String>),
    Stop {
        names: Vec<String>,
        force: bool,
        timeout: Option<i64>,
    },
    Restart {
        names: Vec<String>,
        force: bool,
        timeout: Option<i64>,
    },
    Pause(Vec<String>),
    Delete {
        names: Vec<String>,
        force: bool,
    },
    Rename {
        name: String,
        new_name: String,
    },
    List {
        prefix: Option<String>,
        format: Format,
        columns: Vec<Column>,
    },
    Info(String),
    Exec(Exec),
    ConsoleLog(String),
    FilePush(Push),
    FilePull {
        sources: Vec<InstancePath>,
        destination: PathBuf,
        recursive: bool,
    },
    FileDelete(Vec<InstancePath>),
    ConfigSet {
        name: String,
        pairs: Vec<(String, String)>,
    },
    ConfigGet {
        name: String,
        key: String,
        expanded: bool,
    },
    ConfigUnset {
        name: String,
        key: String,
    },
    ConfigShow {
        name: String,
        expanded: bool,
    },
    ProfileList(Format),
    ProfileShow(String),
    ProfileCreate(String),
    ProfileDelete(String),
    ProfileSet {
        name: String,
        pairs: Vec<(String, String)>,
    },
    ProfileUnset {
        name: String,
        key: String,
    },
    ProfileEdit(String),
    ImageImport {
        files: Vec<PathBuf>,
        aliases: Vec<String>,
        public: bool,
    },
    ImageList(Format),
    ImageInfo(String),
    ImageDelete(Vec<String>),
    AliasCreate {
        name: String,
        image: String,
    },
    AliasDelete(String),
    AliasList(Format),
    Snapshots(super::snapshots::SnapshotCommand),
    Storage(super::storage::StorageCommand),
    Network(super::networks::NetworkCommand),
}

fn format_flag(parsed: &Parsed) -> Result<Format, CliError> {
    match parsed.last("--format") {
        Some(text) => Format::parse(&text),
        None => Ok(Format::Table),
    }
}

/// `NAME/PATH`, the path taken from the instance's root.
pub fn instance_path(text: &str) -> Result<InstancePath, CliError> {
    match text.split_once('/') {
        Some((instance, path)) if !instance.is_empty() && !path.is_empty() => Ok(InstancePath {
            instance: instance.to_string(),
            path: format!("/{path}"),
        }),
        _ => Err(usage(format!(
            "invalid instance path \"{text}\": give NAME/PATH, such as web/etc/hostname"
        ))),
    }
}

/// `KEY VALUE` or `KEY=VALUE...` after the name, as `lxc config set` takes them.
fn pairs(arguments: &[String], what: &str) -> Result<Vec<(String, String)>, CliError> {
    match arguments {
        [key, value] if !key.contains('=') => Ok(vec![(key.clone(), value.clone())]),
        [] => Err(usage(format!("expected {what}"))),
        _ => arguments
            .iter()
            .map(|pair| key_value(pair, "setting"))
            .collect(),
    }
}

const TIMEOUT: Flag = valued(&["--timeout"]);
const FORCE: Flag = switch(&["--force", "-f"]);
const FORMAT: Flag = valued(&["--format", "-f"]);

fn create(arguments: &[String], start: bool) -> Result<Command, CliError> {
    let parsed = read_flags(
        arguments,
        &[
            valued(&["--config", "-c"]),
            valued(&["--profile", "-p"]),
            switch(&["--ephemeral", "-e"]),
            switch(&["--no-profiles"]),
            switch(&["--vm"]),
        ],
        None,
    )?;
    let positionals = exactly(&parsed, 2, "IMAGE NAME")?;
    let config = parsed
        .all("--config")
        .iter()
        .map(|pair| key_value(pair, "-c"))
        .collect::<Result<_, _>>()?;
    let mut profiles = parsed.all("--profile");
    let profiles = if parsed.has("--no-profiles") {
        profiles.clear();
        Some(profiles)
    } else if profiles.is_empty() {
        None
    } else {
        Some(profiles)
    };
    Ok(Command::Create(Create {
        image: positionals[0].clone(),
        name: positionals[1].clone(),
        config,
        profiles,
        ephemeral: parsed.has("--ephemeral"),
        start,
        virtual_machine: parsed.has("--vm"),
    }))
}

fn exec(arguments: &[String]) -> Result<Command, CliError> {
    let parsed = read_flags(
        arguments,
        &[
            valued(&["--env"]),
            valued(&["--cwd"]),
            valued(&["--user"]),
            valued(&["--group"]),
            switch(&["--force-interactive", "-t"]),
            switch(&["--force-noninteractive", "-T"]),
            switch(&["--disable-stdin", "-n"]),
        ],
        Some(1),
    )?;
    let [name] = parsed.positionals.as_slice() else {
        return Err(usage("expected NAME -- COMMAND..."));
    };
    if parsed.rest.is_empty() {
        return Err(usage(
            "expected a command to run: cove exec NAME -- COMMAND...",
        ));
    }
    let terminal = match (
        parsed.has("--force-interactive"),
        parsed.has("--force-noninteractive"),
    ) {
        (true, true) => return Err(usage("-t and -T exclude each other")),
        (true, false) => Terminal::Forced,
        (false, true) => Terminal::Refused,
        (false, false) => Terminal::Automatic,
    };
    Ok(Command::Exec(Exec {
        name: name.clone(),
        command: parsed.rest.clone(),
        environment: parsed
            .all("--env")
            .iter()
            .map(|pair| key_value(pair, "--env"))
            .collect::<Result<_, _>>()?,
        cwd: parsed.last("--cwd"),
        user: parsed
            .last("--user")
            .map(|text| number(&text, "--user"))
            .transpose()?,
        group: parsed
            .last("--group")
            .map(|text| number(&text, "--group"))
            .transpose()?,
        terminal,
        no_stdin: parsed.has("--disable-stdin"),
    }))
}

fn file(arguments: &[String]) -> Result<Command, CliError> {
    let (action, arguments) = arguments
        .split_first()
        .ok_or_else(|| usage("expected file push, pull or delete"))?;
    match action.as_str() {
        "push" => {
            let parsed = read_flags(
                arguments,
                &[
                    valued(&["--uid"]),
                    valued(&["--gid"]),
                    valued(&["--mode"]),
                    switch(&["--recursive", "-r"]),
                    switch(&["--create-dirs", "-p"]),
                ],
                None,
            )?;
            let [sources @ .., target] = parsed.positionals.as_slice() else {
                return Err(usage("expected SOURCE... NAME/PATH"));
            };
            if sources.is_empty() || !parsed.rest.is_empty() {
                return Err(usage("expected SOURCE... NAME/PATH"));
            }
            let mode = match parsed.last("--mode") {
                Some(text) => Some(
                    u32::from_str_radix(&text, 8)
                        .ok()
                        .filter(|mode| *mode <= 0o7777)
                        .ok_or_else(|| {
                            usage(format!(
                                "invalid --mode \"{text}\": give octal permissions such as 0644"
                            ))
                        })?,
                ),
                None => None,
            };
            Ok(Command::FilePush(Push {
                sources: sources.iter().map(PathBuf::from).collect(),
                target: Some(instance_path(target)?),
                uid: parsed
                    .last("--uid")
                    .map(|text| number(&text, "--uid"))
                    .transpose()?,
                gid: parsed
                    .last("--gid")
                    .map(|text| number(&text, "--gid"))
                    .transpose()?,
                mode,
                recursive: parsed.has("--recursive"),
                create_directories: parsed.has("--create-dirs"),
            }))
        }
        "pull" => {
            let parsed = read_flags(arguments, &[switch(&["--recursive", "-r"])], None)?;
            let [sources @ .., destination] = parsed.positionals.as_slice() else {
                return Err(usage("expected NAME/PATH... DESTINATION"));
            };
            if sources.is_empty() || !parsed.rest.is_empty() {
                return Err(usage("expected NAME/PATH... DESTINATION"));
            }
            Ok(Command::FilePull {
                sources: sources
                    .iter()
                    .map(|text| instance_path(text))
                    .collect::<Result<_, _>>()?,
                destination: PathBuf::from(destination),
                recursive: parsed.has("--recursive"),
            })
        }
        "delete" => {
            let parsed = read_flags(arguments, &[], None)?;
            Ok(Command::FileDelete(
                at_least_one(&parsed, "NAME/PATH...")?
                    .iter()
                    .map(|text| instance_path(text))
                    .collect::<Result<_, _>>()?,
            ))
        }
        other => Err(usage(format!(
            "unknown file command \"{other}\": use push, pull or delete"
        ))),
    }
}

fn config(arguments: &[String]) -> Result<Command, CliError> {
    let (action, arguments) = arguments
        .split_first()
        .ok_or_else(|| usage("expected config set, get, unset or show"))?;
    let parsed = read_flags(arguments, &[switch(&["--expanded", "-e"])], None)?;
    let expanded = parsed.has("--expanded");
    match action.as_str() {
        "set" => {
            let (name, rest) = parsed
                .positionals
                .split_first()
                .ok_or_else(|| usage("expected NAME KEY VALUE"))?;
            Ok(Command::ConfigSet {
                name: name.clone(),
                pairs: pairs(rest, "NAME KEY VALUE")?,
            })
        }
        "get" => {
            let positionals = exactly(&parsed, 2, "NAME KEY")?;
            Ok(Command::ConfigGet {
                name: positionals[0].clone(),
                key: positionals[1].clone(),
                expanded,
            })
        }
        "unset" => {
            let positionals = exactly(&parsed, 2, "NAME KEY")?;
            Ok(Command::ConfigUnset {
                name: positionals[0].clone(),
                key: positionals[1].clone(),
            })
        }
        "show" => Ok(Command::ConfigShow {
            name: exactly(&parsed, 1, "NAME")?.remove(0),
            expanded,
        }),
        other => Err(usage(format!(
            "unknown config command \"{other}\": use set, get, unset or show"
        ))),
    }
}

fn profile(arguments: &[String]) -> Result<Command, CliError> {
    let (action, arguments) = arguments
        .split_first()
        .ok_or_else(|| usage("expected profile list, show, create, delete, set, unset or edit"))?;
    let parsed = read_flags(arguments, &[FORMAT], None)?;
    let one = |parsed: &Parsed| exactly(parsed, 1, "NAME").map(|mut names| names.remove(0));
    match action.as_str() {
        "list" => {
            exactly(&parsed, 0, "no arguments")?;
            Ok(Command::ProfileList(format_flag(&parsed)?))
        }
        "show" => Ok(Command::ProfileShow(one(&parsed)?)),
        "create" => Ok(Command::ProfileCreate(one(&parsed)?)),
        "delete" => Ok(Command::ProfileDelete(one(&parsed)?)),
        "edit" => Ok(Command::ProfileEdit(one(&parsed)?)),
        "set" => {
            let (name, rest) = parsed
                .positionals
                .split_first()
                .ok_or_else(|| usage("expected NAME KEY VALUE"))?;
            Ok(Command::ProfileSet {
                name: name.clone(),
                pairs: pairs(rest, "NAME KEY VALUE")?,
            })
        }
        "unset" => {
            let positionals = exactly(&parsed, 2, "NAME KEY")?;
            Ok(Command::ProfileUnset {
                name: positionals[0].clone(),
                key: positionals[1].clone(),
            })
        }
        other => Err(usage(format!(
            "unknown profile command \"{other}\": use list, show, create, delete, set, unset or edit"
        ))),
    }
}

fn image(arguments: &[String]) -> Result<Command, CliError> {
    let (action, arguments) = arguments
        .split_first()
        .ok_or_else(|| usage("expected image import, list, info, delete or alias"))?;
    match action.as_str() {
        "import" => {
            let parsed = read_flags(
                arguments,
                &[valued(&["--alias"]), switch(&["--public"])],
                None,
            )?;
            if !(1..=2).contains(&parsed.positionals.len()) || !parsed.rest.is_empty() {
                return Err(usage("expected FILE [ROOTFS]"));
            }
            Ok(Command::ImageImport {
                files: parsed.positionals.iter().map(PathBuf::from).collect(),
                aliases: parsed.all("--alias"),
                public: parsed.has("--public"),
            })
        }
        "list" => {
            let parsed = read_flags(arguments, &[FORMAT], None)?;
            exactly(&parsed, 0, "no arguments")?;
            Ok(Command::ImageList(format_flag(&parsed)?))
        }
        "info" | "show" => {
            let parsed = read_flags(arguments, &[], None)?;
            Ok(Command::ImageInfo(exactly(&parsed, 1, "IMAGE")?.remove(0)))
        }
        "delete" => {
            let parsed = read_flags(arguments, &[], None)?;
            Ok(Command::ImageDelete(at_least_one(&parsed, "IMAGE...")?))
        }
        "alias" => {
            let (action, arguments) = arguments
                .split_first()
                .ok_or_else(|| usage("expected image alias create, delete or list"))?;
            let parsed = read_flags(arguments, &[FORMAT], None)?;
            match action.as_str() {
                "create" => {
                    let positionals = exactly(&parsed, 2, "NAME IMAGE")?;
                    Ok(Command::AliasCreate {
                        name: positionals[0].clone(),
                        image: positionals[1].clone(),
                    })
                }
                "delete" => Ok(Command::AliasDelete(exactly(&parsed, 1, "NAME")?.remove(0))),
                "list" => {
                    exactly(&parsed, 0, "no arguments")?;
                    Ok(Command::AliasList(format_flag(&parsed)?))
                }
                other => Err(usage(format!(
                    "unknown image alias command \"{other}\": use create, delete or list"
                ))),
            }
        }
        other => Err(usage(format!(
            "unknown image command \"{other}\": use import, list, info, delete or alias"
        ))),
    }
}

fn power(
    arguments: &[String],
    with_force: bool,
) -> Result<(Vec<String>, bool, Option<i64>), CliError> {
    let flags: &[Flag] = if with_force { &[FORCE, TIMEOUT] } else { &[] };
    let parsed = read_flags(arguments, flags, None)?;
    let names = at_least_one(&parsed, "NAME...")?;
    let timeout = parsed
        .last("--timeout")
        .map(|text| number(&text, "--timeout"))
        .transpose()?;
    Ok((names, parsed.has("--force"), timeout))
}

/// Reads the whole command line (without the program name). `cove_dir` is `$COVE_DIR`.
pub fn parse(arguments: &[String], cove_dir: Option<PathBuf>) -> Result<Invocation, CliError> {
    // `--dir` may come anywhere before a `--`; everything else belongs to the subcommand.
    let mut directory = cove_dir.unwrap_or_else(|| PathBuf::from("/var/lib/cove"));
    let mut remaining = Vec::with_capacity(arguments.len());
    let mut index = 0;
    let mut help = false;
    while index < arguments.len() {
        let argument = &arguments[index];
        index += 1;
        if argument == "--" {
            remaining.extend_from_slice(&arguments[index - 1..]);
            break;
        }
        if argument == "--dir" {
            let value = arguments
                .get(index)
                .ok_or_else(|| usage("--dir needs a value"))?;
            directory = PathBuf::from(value);
            index += 1;
        } else if let Some(value) = argument.strip_prefix("--dir=") {
            directory = PathBuf::from(value);
        } else if (argument == "-h" || argument == "--help") && remaining.is_empty() {
            help = true;
        } else {
            remaining.push(argument.clone());
        }
    }
    let command = match remaining.split_first() {
        _ if help => Command::Help,
        None => Command::Help,
        Some((subcommand, arguments)) => {
            let arguments = arguments.to_vec();
            if arguments
                .iter()
                .any(|argument| argument == "-h" || argument == "--help")
                && subcommand != "exec"
            {
                Command::Help
            } else {
                subcommand_of(subcommand, &arguments)?
            }
        }
    };
    Ok(Invocation { directory, command })
}

fn subcommand_of(subcommand: &str, arguments: &[String]) -> Result<Command, CliError> {
    Ok(match subcommand {
        "help" => Command::Help,
        "version" | "--version" => Command::Version,
        "launch" => create(arguments, true)?,
        "init" | "create" => create(arguments, false)?,
        "start" => Command::Start(power(arguments, false)?.0),
        "stop" => {
            let (names, force, timeout) = power(arguments, true)?;
            Command::Stop {
                names,
                force,
                timeout,
            }
        }
        "restart" => {
            let (names, force, timeout) = power(arguments, true)?;
            Command::Restart {
                names,
                force,
                timeout,
            }
        }
        "pause" => Command::Pause(power(arguments, false)?.0),
        "delete" | "rm" => {
            let parsed = read_flags(arguments, &[FORCE, switch(&["--interactive", "-i"])], None)?;
            Command::Delete {
                names: at_least_one(&parsed, "NAME...")?,
                force: parsed.has("--force"),
            }
        }
        "rename" | "move" => {
            let parsed = read_flags(arguments, &[], None)?;
            let positionals = exactly(&parsed, 2, "NAME NEW_NAME")?;
            Command::Rename {
                name: positionals[0].clone(),
                new_name: positionals[1].clone(),
            }
        }
        "list" | "ls" => {
            let parsed = read_flags(arguments, &[FORMAT, valued(&["--columns", "-c"])], None)?;
            if parsed.positionals.len() > 1 || !parsed.rest.is_empty() {
                return Err(usage("expected at most one name prefix"));
            }
            let columns = match parsed.last("--columns") {
                Some(letters) => Column::parse_letters(&letters)?,
                None => Column::parse_letters("ns46tS")?,
            };
            Command::List {
                prefix: parsed.positionals.first().cloned(),
                format: format_flag(&parsed)?,
                columns,
            }
        }
        "info" => {
            let parsed = read_flags(arguments, &[], None)?;
            Command::Info(exactly(&parsed, 1, "NAME")?.remove(0))
        }
        "exec" => exec(arguments)?,
        "console" => {
            let parsed = read_flags(arguments, &[switch(&["--show-log"])], None)?;
            let name = exactly(&parsed, 1, "NAME")?.remove(0);
            if !parsed.has("--show-log") {
                return Err(CliError::Unsupported(
                    "attaching to the console is not supported yet: use cove console NAME \
                     --show-log"
                        .into(),
                ));
            }
            Command::ConsoleLog(name)
        }
        "file" => file(arguments)?,
        "config" => config(arguments)?,
        "profile" => profile(arguments)?,
        "image" => image(arguments)?,
        "snapshot" | "restore" | "copy" | "cp" => {
            Command::Snapshots(super::snapshots::parse(subcommand, arguments)?)
        }
        "storage" => Command::Storage(super::storage::parse(arguments)?),
        "network" => Command::Network(super::networks::parse(arguments)?),
        other => return Err(usage(format!("unknown command \"{other}\""))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(line: &str) -> Result<Command, CliError> {
        let arguments: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse(&arguments, None).map(|invocation| invocation.command)
    }

    #[test]
    fn directory_comes_from_flag_then_environment_then_default() {
        let arguments = vec!["list".to_string()];
        assert_eq!(
            parse(&arguments, None).unwrap().directory,
            PathBuf::from("/var/lib/cove")
        );
        assert_eq!(
            parse(&arguments, Some("/tmp/env".into()))
                .unwrap()
                .directory,
            PathBuf::from("/tmp/env")
        );
        let arguments: Vec<String> = ["--dir", "/tmp/flag", "list"].map(String::from).to_vec();
        assert_eq!(
            parse(&arguments, Some("/tmp/env".into()))
                .unwrap()
                .directory,
            PathBuf::from("/tmp/flag")
        );
        let arguments: Vec<String> = ["list", "--dir=/tmp/late"].map(String::from).to_vec();
        assert_eq!(
            parse(&arguments, None).unwrap().directory,
            PathBuf::from("/tmp/late")
        );
    }

    #[test]
    fn launch_takes_config_profiles_and_ephemeral() {
        let parsed = command("launch busybox web -c limits.memory=64MiB --config user.a=b=c -p default -p small --ephemeral").unwrap();
        assert_eq!(
            parsed,
            Command::Create(Create {
                image: "busybox".into(),
                name: "web".into(),
                config: vec![
                    ("limits.memory".into(), "64MiB".into()),
                    ("user.a".into(), "b=c".into())
                ],
                profiles: Some(vec!["default".into(), "small".into()]),
                ephemeral: true,
                start: true,
                virtual_machine: false,
            })
        );
        let Command::Create(init) = command("init busybox web").unwrap() else {
            panic!("init is a create");
        };
        assert!(!init.start && init.profiles.is_none());
        let Command::Create(machine) = command("launch busybox web --vm").unwrap() else {
            panic!("launch is a create");
        };
        assert!(machine.virtual_machine && machine.start);
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        for line in [
            "launch busybox",
            "launch busybox web -c novalue",
            "frobnicate",
            "stop",
            "stop web --timeout soon",
            "exec web",
            "file push a",
            "file push a web",
            "file push a web/x --mode 99",
            "list -c nz",
            "list -f xml",
            "config set web",
            "launch busybox web --bogus",
        ] {
            assert!(
                matches!(command(line), Err(CliError::Usage(_))),
                "{line} should be refused"
            );
        }
    }

    #[test]
    fn exec_takes_the_command_after_the_name_or_dashes() {
        let Command::Exec(exec) =
            command("exec web --env A=1 --cwd /tmp --user 1000 -T -- sh -c ls -l").unwrap()
        else {
            panic!("an exec");
        };
        assert_eq!(exec.name, "web");
        assert_eq!(exec.command, ["sh", "-c", "ls", "-l"]);
        assert_eq!(exec.environment, [("A".to_string(), "1".to_string())]);
        assert_eq!(exec.cwd.as_deref(), Some("/tmp"));
        assert_eq!(exec.user, Some(1000));
        assert_eq!(exec.terminal, Terminal::Refused);
        let Command::Exec(exec) = command("exec web ls -la").unwrap() else {
            panic!("an exec");
        };
        assert_eq!(exec.command, ["ls", "-la"]);
        assert_eq!(exec.terminal, Terminal::Automatic);
    }

    #[test]
    fn file_paths_split_at_the_instance_name() {
        let Command::FilePush(push) =
            command("file push a b web/tmp/ --mode 0600 --uid 5 -r").unwrap()
        else {
            panic!("a push");
        };
        assert_eq!(push.sources, [PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(
            push.target,
            Some(InstancePath {
                instance: "web".into(),
                path: "/tmp/".into()
            })
        );
        assert_eq!(push.mode, Some(0o600));
        assert_eq!(push.uid, Some(5));
        assert!(push.recursive);
        assert!(instance_path("/etc/hostname").is_err());
        assert!(instance_path("web").is_err());
    }

    #[test]
    fn config_set_takes_key_value_or_pairs() {
        assert_eq!(
            command("config set web user.a 1").unwrap(),
            Command::ConfigSet {
                name: "web".into(),
                pairs: vec![("user.a".into(), "1".into())]
            }
        );
        assert_eq!(
            command("config set web user.a=1 user.b=2").unwrap(),
            Command::ConfigSet {
                name: "web".into(),
                pairs: vec![("user.a".into(), "1".into()), ("user.b".into(), "2".into())]
            }
        );
    }

    #[test]
    fn list_columns_and_format() {
        assert_eq!(
            command("list web -c ns -f csv").unwrap(),
            Command::List {
                prefix: Some("web".into()),
                format: Format::Csv,
                columns: vec![Column::Name, Column::State],
            }
        );
    }

    #[test]
    fn stop_force_and_timeout() {
        assert_eq!(
            command("stop a b --force --timeout=5").unwrap(),
            Command::Stop {
                names: vec!["a".into(), "b".into()],
                force: true,
                timeout: Some(5)
            }
        );
    }

    #[test]
    fn help_anywhere() {
        assert_eq!(command("").unwrap(), Command::Help);
        assert_eq!(command("--help").unwrap(), Command::Help);
        assert_eq!(command("launch --help").unwrap(), Command::Help);
    }
}
