//! Support for the container tests: a busybox image built in a temporary directory, a
//! container that cleans up after itself even when the test fails, and waiting for console
//! lines.
//!
//! Container tests need root (namespaces, cgroups, mounts); they fail with a message saying so
//! otherwise.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cove_shim::cgroup::CgroupLayout;
use cove_shim::{Container, ContainerConfig, ExecRequest, Host};

/// What the busybox image's init prints on its console once it has started.
pub const BOOT_MARKER: &str = "cove-test-image: sysinit done";

/// Fails the test with a clear message unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "container tests make namespaces, cgroups and mounts and need root: run them as root \
         (uid 0), not uid {uid}"
    );
}

/// The busybox binary, installing Debian's `busybox-static` if it is missing.
fn busybox() -> PathBuf {
    let path = PathBuf::from("/bin/busybox");
    if !path.exists() {
        let status = Command::new("apt-get")
            .args(["install", "-y", "busybox-static"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .expect("run apt-get");
        assert!(status.success(), "apt-get install busybox-static failed");
    }
    path
}

/// A busybox image (a static busybox, its applet links, an inittab whose sysinit prints
/// [`BOOT_MARKER`], passwd and group). Built once per machine in the temporary directory (in a
/// private directory, then renamed into place, so parallel test runs never see half of one)
/// and never written to: containers run on snapshots of it.
pub fn busybox_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let image = std::env::temp_dir().join("cove-test-busybox-image-1");
        if image.join("sbin/init").symlink_metadata().is_ok() {
            return image;
        }
        let building = std::env::temp_dir().join(format!(
            "cove-test-busybox-image-building-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&building);
        build_busybox_image(&building);
        if std::fs::rename(&building, &image).is_err() {
            // Another test run finished first; its image is the same.
            let _ = std::fs::remove_dir_all(&building);
        }
        image
    })
}

fn build_busybox_image(image: &Path) {
    for directory in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev",
    ] {
        std::fs::create_dir_all(image.join(directory)).expect("create an image directory");
    }
    std::fs::copy(busybox(), image.join("bin/busybox")).expect("copy busybox");
    let applets = Command::new(image.join("bin/busybox"))
        .arg("--list-full")
        .output()
        .expect("list busybox applets");
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if applet != "bin/busybox" {
            let _ = symlink("/bin/busybox", image.join(applet));
        }
    }
    let files = [
        (
            "etc/inittab",
            format!(
                "::sysinit:/bin/echo {BOOT_MARKER}\n\
                 ::shutdown:/bin/echo cove-test-image: shutting down\n"
            ),
        ),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n".to_string()),
        ("etc/group", "root:x:0:\ntty:x:5:\n".to_string()),
        ("etc/hostname", "image\n".to_string()),
    ];
    for (name, text) in files {
        std::fs::write(image.join(name), text).expect("write an image file");
    }
}

/// The Debian bookworm image (systemd as init) that `resources/build-rootfs` builds, once per
/// machine (cached by content hash; about a minute when cold). Without the guest agent: a
/// container is reached through its namespaces.
pub fn debian_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| build_rootfs(&["--agent", "none"]))
}

/// The Debian image with containerd and runc (`resources/build-rootfs --with containerd`), for
/// nested container runtimes; built once per machine like [`debian_image`].
pub fn debian_containerd_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| build_rootfs(&["--with", "containerd", "--agent", "none"]))
}

fn build_rootfs(arguments: &[&str]) -> PathBuf {
    let script = crate::repository().join("resources/build-rootfs");
    let output = Command::new(&script)
        .args(arguments)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", script.display()));
    assert!(
        output.status.success(),
        "resources/build-rootfs {arguments:?} failed with {}",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let image = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        image.join("sbin/init").symlink_metadata().is_ok(),
        "resources/build-rootfs printed {image:?}, which is not an image directory"
    );
    image
}

/// Units that fail in a systemd container for a reason outside cove's container core, and why.
/// `sys-kernel-debug.mount` (unprivileged only): systemd mounts debugfs when it holds
/// CAP_SYS_RAWIO, which an unprivileged container keeps in its bounding set (as under LXD and
/// LXC: lxc/lxc#3903, #4724), and the kernel refuses debugfs in a user namespace. Dropping
/// CAP_SYS_RAWIO there (it gives nothing in a user namespace) makes systemd skip the unit and
/// report `running`, as it does in a privileged container.
pub const SYSTEMD_EXPECTED_FAILURES: [&str; 1] = ["sys-kernel-debug.mount"];

/// How a systemd container's boot ended.
#[derive(Debug)]
pub struct SystemdBoot {
    /// `systemctl is-system-running --wait`: `running`, `degraded`, or what went wrong.
    pub state: String,
    /// The failed units' names.
    pub failed: Vec<String>,
}

impl SystemdBoot {
    /// The failed units not in [`SYSTEMD_EXPECTED_FAILURES`].
    pub fn unexpected_failures(&self) -> Vec<&str> {
        self.failed
            .iter()
            .map(String::as_str)
            .filter(|unit| !SYSTEMD_EXPECTED_FAILURES.contains(unit))
            .collect()
    }
}

/// Waits until systemd in `container` has finished booting (at most until `deadline`). Until
/// systemd has made its private socket, `systemctl` cannot reach it (and says `offline`): it
/// asks again.
pub fn wait_for_systemd(container: &Container, deadline: Instant) -> SystemdBoot {
    let run = |command: &[&str]| {
        let output = container
            .exec_output(&ExecRequest::new(command), b"")
            .unwrap_or_else(|error| panic!("exec {command:?} failed: {error}"));
        output.stdout + &output.stderr
    };
    let state = loop {
        let left = deadline.saturating_duration_since(Instant::now()).as_secs() + 1;
        let state = run(&[
            "timeout",
            &left.to_string(),
            "systemctl",
            "is-system-running",
            "--wait",
        ])
        .trim()
        .to_string();
        let unreachable = state == "offline" || state.contains("Failed to connect to bus");
        if !unreachable || Instant::now() > deadline {
            break state;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let failed = run(&[
        "systemctl",
        "list-units",
        "--failed",
        "--plain",
        "--no-legend",
    ])
    .lines()
    .filter_map(|line| line.split_whitespace().next())
    .map(str::to_string)
    .collect();
    SystemdBoot { state, failed }
}

/// Every file in `directory` with its size, owner, mode and modification time: equal
/// listings mean nothing was changed.
pub fn listing(directory: &Path) -> Vec<String> {
    let output = Command::new("find")
        .arg(directory)
        .args(["-printf", "%P %s %U:%G %m %T@ %l\\n"])
        .output()
        .expect("run find");
    let mut lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// A scratch containers directory and cgroup parent for one test; dropping it removes both
/// (the cgroup parent only once no container of this process is left in it).
pub struct TestHost {
    pub host: Host,
}

impl TestHost {
    /// Containers under a scratch directory, cgroups under `cove-test-<pid>`, so that test runs
    /// side by side never share a cgroup.
    pub fn new(test: &str) -> Self {
        Self {
            host: Host {
                containers_directory: crate::scratch_dir(test).join("containers"),
                cgroup_parent: format!("cove-test-{}", std::process::id()),
            },
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Ok(layout) = CgroupLayout::detect() {
            for mount in layout.mounts() {
                let _ = std::fs::remove_dir(mount.join(&self.host.cgroup_parent));
            }
        }
        if let Some(scratch) = self.host.containers_directory.parent() {
            let _ = std::fs::remove_dir_all(scratch);
        }
    }
}

/// A container for one test with its own [`TestHost`]; dropping it deletes the container and
/// then the scratch directory, so a failing test leaves nothing behind.
pub struct TestContainer {
    pub container: Option<Container>,
    pub host: TestHost,
}

impl TestContainer {
    /// Starts `config` (built on [`busybox_image`] by the caller) and panics with the error if
    /// it does not start.
    pub fn start(test: &str, config: &ContainerConfig) -> Self {
        require_root();
        let host = TestHost::new(test);
        let container = Container::start(config, &host.host)
            .unwrap_or_else(|error| panic!("container {} did not start: {error}", config.name));
        Self {
            container: Some(container),
            host,
        }
    }

    pub fn get(&self) -> &Container {
        self.container
            .as_ref()
            .expect("the container was not deleted")
    }

    pub fn get_mut(&mut self) -> &mut Container {
        self.container
            .as_mut()
            .expect("the container was not deleted")
    }

    /// Waits until the console log holds `needle`; panics with the log so far if it does not
    /// within `timeout`.
    pub fn wait_for_console(&self, needle: &str, timeout: Duration) {
        let log = self.get().console_log();
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no console line with {needle:?} within {timeout:?}; console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TestContainer {
    fn drop(&mut self) {
        if let Some(container) = self.container.take() {
            if let Err(error) = container.delete() {
                eprintln!("cleaning up the test container failed: {error}");
            }
        }
    }
}

/// True if any mount point lies under `path`.
pub fn mounted_under(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let path = path.to_string_lossy();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| mount_point.starts_with(path.as_ref()))
}

/// The bridge [`in_private_network`] makes.
pub const BRIDGE: &str = "covetest0";

/// Runs `ip` in the calling thread's network namespace and returns its output.
pub fn ip(arguments: &[&str]) -> String {
    let output = Command::new("ip")
        .args(arguments)
        .output()
        .unwrap_or_else(|error| panic!("cannot run ip {arguments:?}: {error}"));
    assert!(
        output.status.success(),
        "ip {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `body` on a thread in a new network namespace holding the bridge [`BRIDGE`] with
/// 192.0.2.1/24 (TEST-NET-1), so nothing touches the host's network.
pub fn in_private_network<T: Send>(body: impl FnOnce() -> T + Send) -> T {
    require_root();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare(CLONE_NEWNET) changes only this thread's network namespace.
                let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(
                    unshared,
                    0,
                    "cannot make a network namespace: {}",
                    std::io::Error::last_os_error()
                );
                ip(&["link", "set", "lo", "up"]);
                ip(&["link", "add", BRIDGE, "type", "bridge"]);
                ip(&["addr", "add", "192.0.2.1/24", "dev", BRIDGE]);
                ip(&["link", "set", BRIDGE, "up"]);
                body()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
