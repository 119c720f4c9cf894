//! The control messages: what the host asks (`HostMessage`) and what the agent answers
//! (`AgentMessage`), as JSON objects tagged by `"type"`. Unknown types and unknown fields are
//! refused: a message is either exactly understood or an error. The checks that JSON cannot
//! express (absolute paths, no NUL bytes, mode bits, window sizes) are in `validate` methods,
//! which the agent calls before acting on a request.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Messages from the host (the client) to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    /// The first message of every connection.
    Hello {
        /// The protocol version the client speaks.
        version: u32,
        /// The client's name and version, for the agent's log.
        client: String,
    },
    /// Runs a command; the request of an exec connection.
    Exec(ExecRequest),
    /// Sends a signal to the running command (or its process group).
    Signal {
        signal: i32,
        #[serde(default)]
        group: bool,
    },
    /// The terminal's new size (pty execs only).
    Resize(WindowSize),
    /// Creates a file, directory or symlink; a file's content follows as data frames.
    Push(PushRequest),
    /// Asks for a file's content, a directory's entries or a symlink's target.
    Pull { path: String },
    /// Asks for the guest's state.
    State {},
    /// Powers off or reboots the guest.
    Shutdown {
        action: PowerAction,
        /// Seconds between SIGTERM and SIGKILL to the other processes (agent as PID 1 only);
        /// 5 unless given, at most 60.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grace_seconds: Option<u32>,
    },
}

/// Messages from the agent to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentMessage {
    /// The answer to the client's hello, and the announcement the agent sends when it is up.
    Hello(AgentHello),
    /// The command runs, as `pid` (the guest's pid).
    Started { pid: i32 },
    /// The command ended and all its output has been sent.
    Exited(ExitStatus),
    /// What `pull` found at the path; a file's content follows as data frames.
    FileInfo(FileInfo),
    /// The answer to `state`.
    State(GuestState),
    /// A push or a shutdown request has been carried out.
    Done {
        /// Bytes written (file pushes).
        #[serde(default)]
        bytes: u64,
    },
    /// The request failed; the agent closes the connection after this.
    Error(ErrorReply),
}

/// The agent's hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentHello {
    /// The protocol version the agent speaks.
    pub version: u32,
    /// `cove-agent <crate version>`.
    pub agent: String,
    /// Facts about the guest, in the announcement only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootFacts>,
}

/// What the agent tells the host when it announces itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootFacts {
    /// The agent's pid (1 when it is the guest's init).
    pub pid: i32,
    /// Seconds since the guest's kernel started, when the agent was ready.
    pub uptime_seconds: f64,
    /// `uname -r`.
    pub kernel: String,
    pub hostname: String,
    /// Where it serves: `vsock:<port>` or `unix:<path>`.
    pub serving: String,
}

/// A command to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments. A program without a `/` is looked up in the
    /// environment's `PATH` (or `DEFAULT_PATH`).
    pub argv: Vec<String>,
    /// The command's whole environment: nothing is inherited from the agent.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Absolute; `/` unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The user to run as; the agent's own unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The group to run as; `uid` unless given (when `uid` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Run on a new pseudo-terminal of this size; three pipes when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<WindowSize>,
}

/// The PATH used when the command's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSize {
    pub rows: u16,
    pub columns: u16,
}

/// How a command ended: exactly one of the two is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStatus {
    /// The exit code, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that killed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + the signal.
    pub fn shell_status(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 255,
        }
    }
}

/// The kinds of file push and pull handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Directory,
    Symlink,
}

/// What to create in the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// Absolute. Its parent directory must exist. An existing file or symlink there is
    /// replaced; an existing directory is kept (for a directory push) or refused.
    pub path: String,
    pub kind: FileKind,
    /// Permission bits (at most 0o7777); ignored for symlinks.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// The link's target (symlinks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// What the agent found at a pulled path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInfo {
    pub kind: FileKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// The file's size in bytes when it was opened (files); 0 otherwise.
    pub size: u64,
    /// The link's target (symlinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The entries' names, sorted, without `.` and `..` (directories).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    Poweroff,
    Reboot,
}

/// The guest's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestState {
    pub memory: MemoryState,
    /// The file system of `/`.
    pub disk: DiskState,
    pub interfaces: Vec<InterfaceState>,
    /// Processes the guest (the agent's pid namespace) has, the agent included.
    pub processes: u32,
    pub uptime_seconds: f64,
    pub load_average: [f64; 3],
    pub cpus: u32,
    pub hostname: String,
    /// `uname -r`.
    pub kernel: String,
}

/// From /proc/meminfo: `used` is `total - available`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryState {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
}

/// From statvfs(2): `used` is what is allocated, `available` what an unprivileged user can
/// still write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskState {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceState {
    pub name: String,
    pub up: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    pub mtu: u32,
    pub addresses: Vec<InterfaceAddress>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceAddress {
    /// `inet` or `inet6`.
    pub family: String,
    pub address: String,
    pub prefix_length: u8,
}

/// Why a request failed, in a form a program can act on, and a message for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A malformed frame or message, or one that does not fit the conversation.
    BadRequest,
    /// The client's hello names a protocol version the agent does not speak.
    UnsupportedVersion,
    NotFound,
    /// The disk (or quota) is full.
    NoSpace,
    PermissionDenied,
    /// The path holds a different kind of file than the request needs.
    WrongKind,
    /// The command could not be started.
    ExecFailed,
    /// The agent has too many connections open.
    Busy,
    /// Anything else the operating system refused.
    Io,
}

/// A request field that breaks a rule JSON cannot express.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InvalidRequest {
    #[error("argv is empty: name a program to run")]
    EmptyArgv,
    #[error("{what} contains a NUL byte")]
    NulByte { what: String },
    #[error("environment variable name {name:?} is empty or contains '='")]
    EnvironmentName { name: String },
    #[error("{what} {path:?} is not an absolute path")]
    NotAbsolute { what: &'static str, path: String },
    #[error("mode {mode:#o} has bits beyond 0o7777")]
    Mode { mode: u32 },
    #[error("a window size needs at least one row and one column (got {rows}x{columns})")]
    WindowSize { rows: u16, columns: u16 },
    #[error("a symlink push needs a target")]
    MissingTarget,
    #[error("only a symlink push has a target")]
    UnexpectedTarget,
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("grace_seconds {0} is more than 60")]
    Grace(u32),
}

fn no_nul(what: impl FnOnce() -> String, text: &str) -> Result<(), InvalidRequest> {
    if text.contains('\0') {
        return Err(InvalidRequest::NulByte { what: what() });
    }
    Ok(())
}

/// Checks that `path` is absolute and has no NUL byte.
pub fn check_path(what: &'static str, path: &str) -> Result<(), InvalidRequest> {
    no_nul(|| what.to_string(), path)?;
    if !path.starts_with('/') {
        return Err(InvalidRequest::NotAbsolute {
            what,
            path: path.to_string(),
        });
    }
    Ok(())
}

impl ExecRequest {
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        if self.argv.is_empty() {
            return Err(InvalidRequest::EmptyArgv);
        }
        if self.argv[0].is_empty() {
            return Err(InvalidRequest::Empty { what: "argv[0]" });
        }
        for (index, argument) in self.argv.iter().enumerate() {
            no_nul(|| format!("argv[{index}]"), argument)?;
        }
        for (name, value) in &self.environment {
            if name.is_empty() || name.contains('=') {
                return Err(InvalidRequest::EnvironmentName { name: name.clone() });
            }
            no_nul(|| format!("environment variable {name:?}"), name)?;
            no_nul(|| format!("the value of {name:?}"), value)?;
        }
        if let Some(cwd) = &self.cwd {
            check_path("cwd", cwd)?;
        }
        if let Some(size) = self.pty {
            size.validate()?;
        }
        Ok(())
    }
}

impl WindowSize {
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        if self.rows == 0 || self.columns == 0 {
            return Err(InvalidRequest::WindowSize {
                rows: self.rows,
                columns: self.columns,
            });
        }
        Ok(())
    }
}

impl PushRequest {
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        check_path("path", &self.path)?;
        if self.path.trim_end_matches('/').is_empty() {
            return Err(InvalidRequest::Empty {
                what: "the path's last component",
            });
        }
        if self.mode > 0o7777 {
            return Err(InvalidRequest::Mode { mode: self.mode });
        }
        match (self.kind, &self.target) {
            (FileKind::Symlink, None) => Err(InvalidRequest::MissingTarget),
            (FileKind::Symlink, Some(target)) if target.is_empty() => {
                Err(InvalidRequest::Empty { what: "target" })
            }
            (FileKind::Symlink, Some(target)) => no_nul(|| "target".to_string(), target),
            (_, Some(_)) => Err(InvalidRequest::UnexpectedTarget),
            (_, None) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_host(json: &str) -> Result<HostMessage, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn host_messages_have_the_documented_shape() {
        assert_eq!(
            parse_host(r#"{"type":"hello","version":1,"client":"test"}"#).unwrap(),
            HostMessage::Hello {
                version: 1,
                client: "test".into()
            }
        );
        assert_eq!(
            parse_host(r#"{"type":"exec","argv":["echo","hi"]}"#).unwrap(),
            HostMessage::Exec(ExecRequest {
                argv: vec!["echo".into(), "hi".into()],
                ..ExecRequest::default()
            })
        );
        assert_eq!(
            parse_host(r#"{"type":"signal","signal":15}"#).unwrap(),
            HostMessage::Signal {
                signal: 15,
                group: false
            }
        );
        assert_eq!(
            parse_host(r#"{"type":"resize","rows":24,"columns":80}"#).unwrap(),
            HostMessage::Resize(WindowSize {
                rows: 24,
                columns: 80
            })
        );
        assert_eq!(
            parse_host(r#"{"type":"state"}"#).unwrap(),
            HostMessage::State {}
        );
        assert_eq!(
            parse_host(r#"{"type":"shutdown","action":"reboot"}"#).unwrap(),
            HostMessage::Shutdown {
                action: PowerAction::Reboot,
                grace_seconds: None
            }
        );
        let push = r#"{"type":"push","path":"/a","kind":"symlink","mode":511,"uid":1,"gid":2,"target":"b"}"#;
        assert!(matches!(parse_host(push).unwrap(), HostMessage::Push(_)));
    }

    #[test]
    fn every_message_survives_a_round_trip() {
        let host = [
            HostMessage::Hello {
                version: 1,
                client: "x".into(),
            },
            HostMessage::Exec(ExecRequest {
                argv: vec!["sh".into()],
                environment: [("A".to_string(), "b".to_string())].into(),
                cwd: Some("/tmp".into()),
                uid: Some(1),
                gid: Some(2),
                pty: Some(WindowSize {
                    rows: 3,
                    columns: 4,
                }),
            }),
            HostMessage::Signal {
                signal: 9,
                group: true,
            },
            HostMessage::Pull { path: "/x".into() },
            HostMessage::State {},
            HostMessage::Shutdown {
                action: PowerAction::Poweroff,
                grace_seconds: Some(3),
            },
        ];
        for message in host {
            let json = serde_json::to_string(&message).unwrap();
            assert_eq!(parse_host(&json).unwrap(), message, "{json}");
        }
        let agent = [
            AgentMessage::Started { pid: 5 },
            AgentMessage::Exited(ExitStatus {
                code: None,
                signal: Some(9),
            }),
            AgentMessage::Done { bytes: 3 },
            AgentMessage::Error(ErrorReply {
                code: ErrorCode::NoSpace,
                message: "full".into(),
            }),
            AgentMessage::FileInfo(FileInfo {
                kind: FileKind::Directory,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                target: None,
                entries: Some(vec!["a".into()]),
            }),
        ];
        for message in agent {
            let json = serde_json::to_string(&message).unwrap();
            let back: AgentMessage = serde_json::from_str(&json).unwrap();
            assert_eq!(back, message, "{json}");
        }
    }

    #[test]
    fn unknown_types_fields_and_wrong_types_are_refused() {
        for json in [
            r#"{"type":"format_disk"}"#,
            r#"{"argv":["x"]}"#,
            r#"{"type":"exec","argv":["x"],"privileged":true}"#,
            r#"{"type":"state","extra":1}"#,
            r#"{"type":"signal","signal":"TERM"}"#,
            r#"{"type":"resize","rows":70000,"columns":1}"#,
            r#"{"type":"exec","argv":"echo hi"}"#,
            r#"{"type":"push","path":"/a","kind":"fifo","mode":1,"uid":1,"gid":1}"#,
            r#"{"type":"hello","version":-1,"client":"x"}"#,
            r#"{"type":"shutdown","action":"explode"}"#,
            r#"null"#,
            r#"{"type":"exec","type":"state"}"#,
        ] {
            assert!(parse_host(json).is_err(), "accepted {json}");
        }
    }

    #[test]
    fn exec_requests_are_checked() {
        let request = |argv: &[&str]| ExecRequest {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            ..ExecRequest::default()
        };
        assert!(request(&["true"]).validate().is_ok());
        assert_eq!(request(&[]).validate(), Err(InvalidRequest::EmptyArgv));
        assert!(matches!(
            request(&[""]).validate(),
            Err(InvalidRequest::Empty { .. })
        ));
        assert!(matches!(
            request(&["echo", "a\0b"]).validate(),
            Err(InvalidRequest::NulByte { .. })
        ));
        let mut bad_env = request(&["true"]);
        bad_env.environment.insert("A=B".into(), "c".into());
        assert!(matches!(
            bad_env.validate(),
            Err(InvalidRequest::EnvironmentName { .. })
        ));
        let mut relative = request(&["true"]);
        relative.cwd = Some("tmp".into());
        assert!(matches!(
            relative.validate(),
            Err(InvalidRequest::NotAbsolute { .. })
        ));
        let mut no_rows = request(&["true"]);
        no_rows.pty = Some(WindowSize {
            rows: 0,
            columns: 80,
        });
        assert!(matches!(
            no_rows.validate(),
            Err(InvalidRequest::WindowSize { .. })
        ));
    }

    #[test]
    fn push_requests_are_checked() {
        let push = |path: &str, kind, mode, target: Option<&str>| PushRequest {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            target: target.map(str::to_string),
        };
        assert!(push("/a", FileKind::File, 0o644, None).validate().is_ok());
        assert!(push("/a", FileKind::Symlink, 0, Some("b"))
            .validate()
            .is_ok());
        assert!(push("a", FileKind::File, 0o644, None).validate().is_err());
        assert!(push("/", FileKind::File, 0o644, None).validate().is_err());
        assert!(push("/a", FileKind::File, 0o10000, None)
            .validate()
            .is_err());
        assert!(push("/a", FileKind::Symlink, 0, None).validate().is_err());
        assert!(push("/a", FileKind::File, 0, Some("b")).validate().is_err());
        assert!(push("/a\0", FileKind::File, 0, None).validate().is_err());
    }

    #[test]
    fn shell_status() {
        let code = ExitStatus {
            code: Some(3),
            signal: None,
        };
        let signal = ExitStatus {
            code: None,
            signal: Some(9),
        };
        assert_eq!(code.shell_status(), 3);
        assert_eq!(signal.shell_status(), 137);
    }
}
