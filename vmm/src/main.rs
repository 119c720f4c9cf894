//! The `cove-vmm` command: parse the command line, build the VM, run it, exit with a status that
//! says how it ended (see `cove-vmm --help`).

use std::time::Instant;

use cove_vmm::cli::{self, Command, HELP};
use cove_vmm::{describe_error, Vm};

fn main() {
    let started = Instant::now();
    let code = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{HELP}");
            0
        }
        Ok(Command::Version) => {
            println!("cove-vmm {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Command::Run(config)) => match Vm::build(&config, started).and_then(Vm::run) {
            Ok(reason) => {
                let outcome = if reason.exit_code() == 0 {
                    "stopped"
                } else {
                    "failed"
                };
                eprintln!("cove-vmm: VM {outcome}: {}", reason.describe());
                reason.exit_code()
            }
            Err(error) => {
                eprintln!("cove-vmm: {}", describe_error(&error));
                1
            }
        },
        Err(error) => {
            eprintln!("cove-vmm: {}", describe_error(&error));
            1
        }
    };
    std::process::exit(code);
}
