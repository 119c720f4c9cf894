//! What confines a container's processes, as LXD confines them, seen from inside a busybox
//! container: the capability bounding set, the default seccomp filter (and that setuid
//! binaries still work under it), and what `security.nesting` opens up for nested container
//! runtimes. Real namespaces, cgroups and mounts; run as root.

use std::process::Command;

use cove_shim::capabilities::CapabilitySet;
use cove_shim::{Container, ContainerConfig, ExecRequest, SyscallPolicy};
use cove_tests::container::{busybox_image, TestContainer};

fn run(container: &Container, command: &[&str]) -> (i32, String) {
    run_as(container, 0, command)
}

fn run_as(container: &Container, uid: u32, command: &[&str]) -> (i32, String) {
    let mut request = ExecRequest::new(command);
    request.uid = uid;
    request.gid = uid;
    let output = container
        .exec_output(&request, b"")
        .unwrap_or_else(|error| panic!("exec {command:?} failed: {error}"));
    (output.exit_code, output.stdout + &output.stderr)
}

fn sh(container: &Container, script: &str) -> (i32, String) {
    run(container, &["sh", "-c", script])
}

/// The value of `field` (such as `CapBnd`) in a `/proc/<pid>/status` text.
fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in:\n{status}"))
        .trim()
        .to_string()
}

fn bounding_set(status: &str) -> u64 {
    u64::from_str_radix(&status_field(status, "CapBnd"), 16).expect("CapBnd is hex")
}

/// The test's own bounding set: what a privileged container starts from.
fn host_bounding_set() -> u64 {
    bounding_set(&std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status"))
}

#[test]
fn capabilities_are_dropped_as_lxd_drops_them() {
    let dropped = CapabilitySet::lxd_dropped(true);

    // Unprivileged: LXD keeps the whole bounding set (the capabilities are the user
    // namespace's and give no power over the host's clock, modules or raw I/O). A new user
    // namespace starts with every capability the kernel knows, whatever the host's set.
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .expect("read cap_last_cap")
        .trim()
        .parse()
        .expect("a number");
    let everything = CapabilitySet::EMPTY.complement_up_to(last).0;
    let config = ContainerConfig::new("capsuser", busybox_image());
    let test = TestContainer::start("capsuser", &config);
    for file in ["/proc/1/status", "/proc/self/status"] {
        let (_, status) = run(test.get(), &["cat", file]);
        assert_eq!(bounding_set(&status), everything, "{file}");
    }
    drop(test);

    // Privileged: sys_time, sys_module, sys_rawio, mac_admin and mac_override are gone, from
    // init and from every command.
    let mut config = ContainerConfig::new("capsroot", busybox_image());
    config.privileged = true;
    let test = TestContainer::start("capsroot", &config);
    let expected = host_bounding_set() & !dropped.0;
    for file in ["/proc/1/status", "/proc/self/status"] {
        let (_, status) = run(test.get(), &["cat", file]);
        assert_eq!(
            bounding_set(&status),
            expected,
            "{file}: expected {expected:016x}"
        );
    }
    let (_, status) = run_as(test.get(), 1000, &["cat", "/proc/self/status"]);
    assert_eq!(bounding_set(&status), expected, "a command run as a user");
    // Root inside holds none of them, even in its effective set.
    let (_, status) = run(test.get(), &["cat", "/proc/self/status"]);
    let effective = u64::from_str_radix(&status_field(&status, "CapEff"), 16).expect("hex");
    assert_eq!(effective & dropped.0, 0, "{effective:016x}");
}

/// The C source of a system call probe: no libc, one system call with the arguments
/// (-1, SECOND, 0), then exit with the errno it got (0 on success).
const PROBE_SOURCE: &str = r#"
#if defined(__x86_64__)
static long call(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}
#define EXIT 60
#else
static long call(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(n), "b"(a), "c"(b), "d"(c) : "memory");
    return r;
}
#define EXIT 1
#endif
void _start(void) {
    long r = call(NUMBER, -1, SECOND, 0);
    call(EXIT, r < 0 ? -r : 0, 0, 0);
    for (;;) {}
}
"#;

/// A tiny static program making system call `number` (of the i386 ABI when `i386`, else
/// x86_64's) and exiting with its errno, built with the host's gcc: it shows what the filter
/// answers where busybox has no applet that makes the call, and for 32-bit programs.
fn syscall_probe(i386: bool, number: u32, second: u64) -> Vec<u8> {
    let directory = cove_tests::scratch_dir(&format!("probe-{i386}-{number}-{second}"));
    std::fs::write(directory.join("probe.c"), PROBE_SOURCE).expect("write the probe");
    let mut gcc = Command::new("gcc");
    gcc.current_dir(&directory).args([
        "-static",
        "-nostdlib",
        "-fno-pic",
        "-no-pie",
        "-fno-stack-protector",
        "-O2",
        &format!("-DNUMBER={number}"),
        &format!("-DSECOND={second}"),
        "-o",
        "probe",
        "probe.c",
    ]);
    if i386 {
        gcc.arg("-m32");
    }
    let output = gcc.output().expect("run gcc (needed to build the probe)");
    assert!(
        output.status.success(),
        "gcc could not build the probe: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let probe = std::fs::read(directory.join("probe")).expect("read the probe");
    let _ = std::fs::remove_dir_all(&directory);
    probe
}

/// Copies `program` into the container as `/tmp/<name>` and runs it: its exit code.
fn run_probe(container: &Container, name: &str, program: &[u8]) -> i32 {
    let path = format!("/tmp/{name}");
    let install = container
        .exec_output(
            &ExecRequest::new(&["sh", "-c", &format!("cat > {path} && chmod 755 {path}")]),
            program,
        )
        .expect("install the probe");
    assert_eq!(install.exit_code, 0, "{}", install.stderr);
    run(container, &[&path]).0
}

const ENOSYS: i32 = libc::ENOSYS;
const EACCES: i32 = libc::EACCES;
const EFAULT: i32 = libc::EFAULT;

/// The filter's refusals, as a command in `container` sees them.
fn assert_lxd_refusals(container: &Container) {
    for file in ["/proc/1/status", "/proc/self/status"] {
        let (_, status) = run(container, &["cat", file]);
        assert_eq!(
            status_field(&status, "Seccomp"),
            "2",
            "{file}: not filtered"
        );
        // As in LXD: no no_new_privs, so setuid binaries keep working.
        assert_eq!(status_field(&status, "NoNewPrivs"), "0", "{file}");
    }
    // ENOSYS is the filter's answer (busybox's insmod words it "kernel does not support
    // requested operation"); without the filter the kernel says EPERM (no CAP_SYS_MODULE over
    // the host) or ENOEXEC (not a module).
    let (status, output) = sh(
        container,
        "echo not-a-module > /tmp/dummy.ko && insmod /tmp/dummy.ko",
    );
    assert_ne!(status, 0, "{output}");
    assert!(
        output.contains("kernel does not support requested operation"),
        "insmod: {output}"
    );
    // open_by_handle_at from a 64-bit and a 32-bit program (without the filter: EFAULT from
    // the bad pointer), and a forced umount2 from a 32-bit one.
    assert_eq!(
        run_probe(container, "handle64", &syscall_probe(false, 304, 0)),
        ENOSYS
    );
    assert_eq!(
        run_probe(container, "handle32", &syscall_probe(true, 342, 0)),
        ENOSYS
    );
    let forced = libc::MNT_FORCE as u64;
    assert_eq!(
        run_probe(container, "umount32", &syscall_probe(true, 52, forced)),
        EACCES
    );
    let (status, output) = run(container, &["rmmod", "dummy"]);
    assert_ne!(status, 0, "{output}");
    assert!(
        output.contains("Function not implemented"),
        "rmmod: {output}"
    );
    // LXC's reject_force_umount: `umount -f` is refused, a plain one is not.
    let (status, output) = sh(
        container,
        "mkdir -p /tmp/forced && mount -t tmpfs scratch /tmp/forced && umount -f /tmp/forced",
    );
    assert_ne!(status, 0, "umount -f went through: {output}");
    assert!(output.contains("Permission denied"), "umount -f: {output}");
    assert_eq!(sh(container, "umount /tmp/forced").0, 0);
}

#[test]
fn the_default_seccomp_filter_refuses_what_lxd_refuses() {
    let config = ContainerConfig::new("filtered", busybox_image());
    let test = TestContainer::start("filtered", &config);
    assert_lxd_refusals(test.get());

    let mut config = ContainerConfig::new("filteredroot", busybox_image());
    config.privileged = true;
    let test = TestContainer::start("filteredroot", &config);
    assert_lxd_refusals(test.get());
}

#[test]
fn deny_default_false_installs_no_filter() {
    let mut config = ContainerConfig::new("unfiltered", busybox_image());
    config.syscalls = SyscallPolicy {
        deny_default: false,
        deny_compat: false,
    };
    let test = TestContainer::start("unfiltered", &config);
    let (_, status) = run(test.get(), &["cat", "/proc/1/status"]);
    assert_eq!(status_field(&status, "Seccomp"), "0");
    // The kernel's own answers now.
    assert_eq!(
        run_probe(test.get(), "handle64", &syscall_probe(false, 304, 0)),
        EFAULT
    );
    let (status, output) = sh(
        test.get(),
        "mkdir -p /tmp/forced && mount -t tmpfs scratch /tmp/forced && umount -f /tmp/forced",
    );
    assert_eq!(
        status, 0,
        "a forced unmount was refused without the filter: {output}"
    );
}

#[test]
fn setuid_binaries_work_under_the_filter() {
    let config = ContainerConfig::new("setuid", busybox_image());
    let test = TestContainer::start("setuid", &config);
    let container = test.get();
    // busybox's ping keeps the privileges of a setuid binary (it needs a raw socket); as a
    // plain user without them it cannot ping at all.
    let (status, output) = sh(
        container,
        "mkdir /tmp/setuid && cp /bin/busybox /tmp/setuid/busybox && \
         chmod 4755 /tmp/setuid/busybox && ln -s busybox /tmp/setuid/ping",
    );
    assert_eq!(status, 0, "{output}");
    let (status, output) = run_as(container, 1000, &["ping", "-c", "1", "127.0.0.1"]);
    assert_ne!(
        status, 0,
        "a plain user could ping without setuid: {output}"
    );
    let (status, output) = run_as(
        container,
        1000,
        &["/tmp/setuid/ping", "-c", "1", "-W", "5", "127.0.0.1"],
    );
    assert_eq!(status, 0, "the setuid ping failed: {output}");
}

#[test]
fn nesting_lets_nested_runtimes_mount_proc_overlay_and_cgroups() {
    let mut config = ContainerConfig::new("nesting", busybox_image());
    config.nesting = true;
    let test = TestContainer::start("nesting", &config);
    let container = test.get();

    // A nested pid namespace with its own /proc, in the container's user namespace and in a
    // nested one (as nested LXD and user-namespaced runtimes make).
    assert_eq!(
        sh(container, "unshare -m -p -f --mount-proc sh -c 'echo $$'"),
        (0, "1\n".to_string())
    );
    assert_eq!(
        sh(
            container,
            "unshare -U -r -m -p -f --mount-proc sh -c 'echo $$; cat /proc/self/uid_map'"
        )
        .1
        .split_whitespace()
        .collect::<Vec<_>>(),
        ["1", "0", "0", "1"]
    );
    // The unobstructed proc that makes it possible.
    assert_eq!(
        run(container, &["cat", "/dev/.lxc/proc/1/comm"]),
        (0, "init\n".to_string())
    );

    // overlayfs, as containerd's snapshotter mounts it.
    let (status, output) = sh(
        container,
        "mkdir /tmp/layers && mount -t tmpfs layers /tmp/layers && cd /tmp/layers && \
         mkdir lower upper work merged && echo lower > lower/file && \
         mount -t overlay overlay -o lowerdir=lower,upperdir=upper,workdir=work merged && \
         echo upper >> merged/file && cat merged/file && cat upper/file",
    );
    assert_eq!(
        (status, output.as_str()),
        (0, "lower\nupper\nlower\nupper\n")
    );

    // A cgroup subtree the container's root may manage.
    let delegated = if test.get().cgroup().layout().is_unified() {
        "/sys/fs/cgroup/nested"
    } else {
        "/sys/fs/cgroup/pids/nested"
    };
    let (status, output) = sh(
        container,
        &format!("mkdir {delegated} && echo $$ > {delegated}/cgroup.procs"),
    );
    assert_eq!(status, 0, "{output}");

    // What kubelet reads and writes: /dev/kmsg opens for reading; its own network
    // namespace's knobs are writable; vm.overcommit_memory can be read.
    let (status, output) = sh(container, "test -c /dev/kmsg && exec 3< /dev/kmsg");
    assert_eq!(status, 0, "/dev/kmsg: {output}");
    let (status, output) = sh(
        container,
        "echo 1 > /proc/sys/net/ipv4/ip_forward && cat /proc/sys/vm/overcommit_memory",
    );
    assert_eq!(status, 0, "{output}");
}

#[test]
fn without_nesting_a_nested_user_namespace_cannot_mount_proc() {
    let config = ContainerConfig::new("flat", busybox_image());
    let test = TestContainer::start("flat", &config);
    let container = test.get();
    // The kernel refuses a fresh proc to a nested user namespace while every proc it can see
    // has something mounted over it (here the read-only /proc/sys), as in LXD without
    // security.nesting.
    let (status, output) = sh(
        container,
        "unshare -U -r -m -p -f --mount-proc sh -c 'echo $$'",
    );
    assert_ne!(status, 0, "a nested user namespace mounted proc: {output}");
    assert!(output.contains("Operation not permitted"), "{output}");
    // In the container's own user namespace the mounts it made are its own, and the kernel
    // allows a nested pid namespace its /proc (systemd's services do such mounts).
    assert_eq!(
        sh(container, "unshare -m -p -f --mount-proc sh -c 'echo $$'"),
        (0, "1\n".to_string())
    );
    assert_ne!(
        sh(container, "test -e /dev/kmsg").0,
        0,
        "/dev/kmsg without nesting"
    );
    assert_ne!(
        sh(container, "test -e /dev/.lxc").0,
        0,
        "/dev/.lxc without nesting"
    );
}
