//! cove: the command line of coved, in `lxc`'s shape (`cove launch IMAGE NAME`, `cove exec
//! NAME -- CMD`, `cove list`), talking to coved over `$COVE_DIR/unix.socket`. The commands
//! live in `cove_supervisor::cli`; this is only the process around them.

fn main() {
    let mut arguments = Vec::new();
    for argument in std::env::args_os().skip(1) {
        match argument.into_string() {
            Ok(argument) => arguments.push(argument),
            Err(argument) => {
                eprintln!("cove: the argument {argument:?} is not valid UTF-8");
                std::process::exit(1);
            }
        }
    }
    std::process::exit(cove_supervisor::cli::main(&arguments));
}
