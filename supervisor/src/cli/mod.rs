//! `cove`, the command line of coved, in `lxc`'s shape: `cove launch busybox web`,
//! `cove exec web -- sh`, `cove list`. It talks to coved over `$COVE_DIR/unix.socket` with the
//! same LXD API types coved serves (`crate::api::types`), so the two cannot drift apart.
//!
//! What lives here: reading the command line into a typed [`arguments::Command`] (once), the
//! blocking HTTP and websocket client (`client`), one module per family of commands, and the
//! printing of tables, CSV and YAML. What must not: anything of the daemon (`crate::server`,
//! the store, the runtime): the CLI knows coved only through its socket.

pub mod arguments;
pub mod client;
pub mod exec;
pub mod files;
pub mod flags;
pub mod format;
pub mod images;
pub mod instances;
pub mod networks;
pub mod profiles;
pub mod snapshots;
pub mod storage;
pub mod yaml;

use std::io::Write;
use std::path::PathBuf;

use arguments::{Command, USAGE};
use client::Client;

/// Every way a command can fail; the message is what the user reads after `cove: `.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line is wrong; the usage follows the message.
    #[error("{0}")]
    Usage(String),
    /// The socket cannot be reached; the message says how to start coved.
    #[error("{0}")]
    Unreachable(String),
    #[error("lost the connection to coved: {0}")]
    Connection(String),
    /// coved refused the request: its own message, which names the problem.
    #[error("{message}")]
    Api { code: u16, message: String },
    #[error("unexpected answer from coved: {0}")]
    Protocol(String),
    /// Something on this side: a file to read or write, the terminal.
    #[error("{0}")]
    Local(String),
    #[error("{0}")]
    Unsupported(String),
}

impl CliError {
    /// A local file error, naming the file.
    pub fn file(what: &str, path: &std::path::Path, error: &std::io::Error) -> Self {
        Self::Local(format!(
            "cannot {what} {}: {}",
            path.display(),
            client::plain_error(error)
        ))
    }
}

/// Writes to stdout, ignoring a reader that went away (`cove list | head`).
pub fn print(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Runs the command line (without the program name); returns the exit code: 0, 1 for any
/// error, or the remote command's code for `exec`.
pub fn main(arguments: &[String]) -> i32 {
    let invocation =
        match arguments::parse(arguments, std::env::var_os("COVE_DIR").map(PathBuf::from)) {
            Ok(invocation) => invocation,
            Err(error) => return report(&error),
        };
    let client = Client::new(invocation.directory);
    match run(&client, invocation.command) {
        Ok(code) => code,
        Err(error) => report(&error),
    }
}

fn report(error: &CliError) -> i32 {
    match error {
        CliError::Usage(message) => {
            eprintln!("cove: {message}\nRun cove --help for the usage.");
        }
        other => eprintln!("cove: {other}"),
    }
    1
}

fn run(client: &Client, command: Command) -> Result<i32, CliError> {
    match command {
        Command::Help => print(&format!("{USAGE}\n")),
        Command::Version => print(&format!("{}\n", env!("CARGO_PKG_VERSION"))),
        Command::Create(create) => instances::create(client, &create)?,
        Command::Start(names) => instances::change_state(client, &names, "start", false, None)?,
        Command::Stop {
            names,
            force,
            timeout,
        } => instances::change_state(client, &names, "stop", force, timeout)?,
        Command::Restart {
            names,
            force,
            timeout,
        } => instances::change_state(client, &names, "restart", force, timeout)?,
        Command::Pause(names) => instances::change_state(client, &names, "freeze", false, None)?,
        Command::Delete { names, force } => instances::delete(client, &names, force)?,
        Command::Rename { name, new_name } => instances::rename(client, &name, &new_name)?,
        Command::List {
            prefix,
            format,
            columns,
        } => instances::list(client, prefix.as_deref(), format, &columns)?,
        Command::Info(name) => instances::info(client, &name)?,
        Command::Exec(request) => return exec::exec(client, &request),
        Command::ConsoleLog(name) => instances::console_log(client, &name)?,
        Command::FilePush(push) => files::push(client, &push)?,
        Command::FilePull {
            sources,
            destination,
            recursive,
        } => files::pull(client, &sources, &destination, recursive)?,
        Command::FileDelete(paths) => files::delete(client, &paths)?,
        Command::ConfigSet { name, pairs } => instances::config_set(client, &name, &pairs)?,
        Command::ConfigGet {
            name,
            key,
            expanded,
        } => instances::config_get(client, &name, &key, expanded)?,
        Command::ConfigUnset { name, key } => {
            instances::config_set(client, &name, &[(key, String::new())])?
        }
        Command::ConfigShow { name, expanded } => instances::config_show(client, &name, expanded)?,
        Command::ProfileList(format) => profiles::list(client, format)?,
        Command::ProfileShow(name) => profiles::show(client, &name)?,
        Command::ProfileCreate(name) => profiles::create(client, &name)?,
        Command::ProfileDelete(name) => profiles::delete(client, &name)?,
        Command::ProfileSet { name, pairs } => profiles::set(client, &name, &pairs)?,
        Command::ProfileUnset { name, key } => profiles::unset(client, &name, &key)?,
        Command::ProfileEdit(name) => profiles::edit(client, &name)?,
        Command::ImageImport {
            files,
            aliases,
            public,
        } => images::import(client, &files, &aliases, public)?,
        Command::ImageList(format) => images::list(client, format)?,
        Command::ImageInfo(image) => images::info(client, &image)?,
        Command::ImageDelete(images) => images::delete(client, &images)?,
        Command::AliasCreate { name, image } => images::alias_create(client, &name, &image)?,
        Command::AliasDelete(name) => images::alias_delete(client, &name)?,
        Command::AliasList(format) => images::alias_list(client, format)?,
        Command::Snapshots(command) => snapshots::run(client, &command)?,
        Command::Storage(command) => storage::run(client, command)?,
        Command::Network(command) => networks::run(client, command)?,
    }
    Ok(0)
}
