//! The command line words the guest understands; everything else on the line is ignored.
//!
//! - `exit=reset|triple-fault|halt|cmpxchg16b|tick|poweroff` picks what happens after the
//!   report (default `reset`);
//! - `tick-loops=<decimal>` spaces `tick` lines by that many busy-loop iterations instead of
//!   the default of about 100 ms measured with the time stamp counter;
//! - `brief` skips the report and the other vCPUs: `hello`, the boot timer, `done`, then the
//!   exit action. Benchmarks use it, so that they time the VMM rather than console output.

use crate::serial::Console;

/// What the guest does once it has printed `cove-test-guest: done`.
#[derive(Clone, Copy)]
pub enum ExitAction {
    Reset,
    TripleFault,
    Halt,
    Cmpxchg16b,
    Tick,
    PowerOff,
}

/// The options read from the command line.
pub struct Options {
    pub exit_action: ExitAction,
    /// Busy-loop iterations between two `tick` lines; `None` for the time-based default.
    pub tick_loops: Option<u64>,
    /// Skip the report and the application processors.
    pub brief: bool,
}

impl Options {
    /// Reads the options from the command line. A recognised word with a bad value is
    /// reported on the console with an `error:` line and the default is kept.
    pub fn parse(command_line: &[u8]) -> Self {
        let mut options = Options {
            exit_action: ExitAction::Reset,
            tick_loops: None,
            brief: false,
        };
        let words = command_line
            .split(|byte| byte.is_ascii_whitespace())
            .filter(|word| !word.is_empty());
        for word in words {
            if word == b"brief" {
                options.brief = true;
            } else if let Some(value) = word.strip_prefix(b"exit=") {
                match parse_exit_action(value) {
                    Some(action) => options.exit_action = action,
                    None => Console::lock()
                        .text("error: unknown exit=")
                        .bytes(value)
                        .text(", using exit=reset")
                        .end_line(),
                }
            } else if let Some(value) = word.strip_prefix(b"tick-loops=") {
                match parse_decimal(value) {
                    Some(loops) => options.tick_loops = Some(loops),
                    None => Console::lock()
                        .text("error: tick-loops=")
                        .bytes(value)
                        .text(" is not a decimal number")
                        .end_line(),
                }
            }
        }
        options
    }
}

fn parse_exit_action(value: &[u8]) -> Option<ExitAction> {
    match value {
        b"reset" => Some(ExitAction::Reset),
        b"triple-fault" => Some(ExitAction::TripleFault),
        b"halt" => Some(ExitAction::Halt),
        b"cmpxchg16b" => Some(ExitAction::Cmpxchg16b),
        b"tick" => Some(ExitAction::Tick),
        b"poweroff" => Some(ExitAction::PowerOff),
        _ => None,
    }
}

fn parse_decimal(value: &[u8]) -> Option<u64> {
    core::str::from_utf8(value).ok()?.parse().ok()
}
