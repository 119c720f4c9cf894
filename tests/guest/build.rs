//! Hands the linker the script of the build's boot protocol (`linker-pvh.ld`, or
//! `linker-linux64.ld` with the `linux64` feature), which includes the shared layout in
//! `linker.ld`: the image is linked at 1 MiB physical.

fn main() {
    let manifest_directory =
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let protocol = if std::env::var_os("CARGO_FEATURE_LINUX64").is_some() {
        "linux64"
    } else {
        "pvh"
    };
    // The search path comes first: GNU ld looks up INCLUDE files in the -L directories given
    // before the script.
    println!("cargo:rustc-link-arg-bins=-L{manifest_directory}");
    println!("cargo:rustc-link-arg-bins=-T{manifest_directory}/linker-{protocol}.ld");
    for script in ["linker.ld", "linker-pvh.ld", "linker-linux64.ld"] {
        println!("cargo:rerun-if-changed={script}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
