//! Shared support for cove's black-box tests: find the built binaries, build the test guest and
//! the guest kernel (through the project's own scripts, which cache their results), start a VM
//! and watch its console, and talk to its API.
//!
//! Tests need a usable /dev/kvm; they fail with a message saying so when there is none.

pub mod container;
pub mod container_monitor;
pub mod coved;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `cove-vmm` binary built beside this test binary (`cargo build --workspace` builds it;
/// `tools/test` does so before testing).
pub fn cove_vmm() -> PathBuf {
    let test_binary = std::env::current_exe().expect("the test binary knows its path");
    let profile_dir = test_binary
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let binary = profile_dir.join("cove-vmm");
    assert!(
        binary.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (tools/test does)",
        binary.display()
    );
    binary
}

/// The project's guest kernel of this host's flavour (`resources/build-kernel`), built once
/// per machine.
pub fn project_kernel() -> &'static Path {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL.get_or_init(|| built_by("resources/build-kernel", &[]))
}

/// The release the kernel build recorded beside the vmlinux (`kernelrelease=` in build-info).
pub fn kernel_release(kernel: &Path) -> Option<String> {
    let info = std::fs::read_to_string(kernel.with_file_name("build-info")).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("kernelrelease="))
        .map(str::to_string)
}

/// Fails the test with a clear message when this machine cannot run VMs.
pub fn require_kvm() {
    if let Err(error) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "this test boots VMs and needs read-write access to /dev/kvm, which failed: {error}"
        );
    }
}

/// True on a kvm-pvm host (a software hypervisor: guest kernel code is emulated).
pub fn host_is_kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
        || !std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .any(|line| {
                line.starts_with("flags") && (line.contains(" vmx") || line.contains(" svm"))
            })
}

/// Runs one of the project's build scripts and returns the path it prints on its last line.
pub fn built_by(script: &str, arguments: &[&str]) -> PathBuf {
    let script_path = repository().join(script);
    let output = Command::new(&script_path)
        .args(arguments)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", script_path.display()));
    assert!(
        output.status.success(),
        "{script} failed with {}",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        path.is_file(),
        "{script} printed {path:?}, which is not a file"
    );
    path
}

/// The bare-metal test guest, built once per test process.
pub fn test_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| built_by("tests/guest/build", &[]))
}

/// The same test guest built for Linux's 64-bit boot protocol (no PVH note, a 64-bit ELF
/// entry that reads the zero page), built once per test process.
pub fn test_guest_linux64() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| built_by("tests/guest/build", &["--linux64"]))
}

/// A unique scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cove-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

#[derive(Default)]
struct Output {
    stdout: String,
    stderr: String,
    closed: usize,
}

/// A running `cove-vmm` whose console (stdout) and stderr are collected as they arrive.
pub struct Vmm {
    child: Child,
    output: Arc<(Mutex<Output>, Condvar)>,
}

/// How a `cove-vmm` run ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The console lines that start with `prefix`, with the prefix removed.
    pub fn values(&self, prefix: &str) -> Vec<String> {
        self.stdout
            .lines()
            .filter_map(|line| line.strip_prefix(prefix))
            .map(str::to_string)
            .collect()
    }

    /// The one console line starting with `prefix`, without the prefix.
    pub fn value(&self, prefix: &str) -> String {
        let values = self.values(prefix);
        assert_eq!(
            values.len(),
            1,
            "expected one line starting {prefix:?} in:\n{}",
            self.stdout
        );
        values.into_iter().next().unwrap_or_default()
    }
}

impl Vmm {
    /// Starts `cove-vmm` with `arguments`.
    pub fn start(arguments: &[&str]) -> Self {
        let mut child = Command::new(cove_vmm())
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cove-vmm");
        let output = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        collect(stdout, output.clone(), |output| &mut output.stdout);
        collect(stderr, output.clone(), |output| &mut output.stderr);
        Self { child, output }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the console shows a line containing `needle`; panics with the console so far
    /// if it does not within `timeout`.
    pub fn wait_for_console(&self, needle: &str, timeout: Duration) {
        self.wait_until(timeout, |output| output.stdout.contains(needle))
            .unwrap_or_else(|(stdout, stderr)| {
                panic!("no console line with {needle:?} within {timeout:?}; console:\n{stdout}\nstderr:\n{stderr}")
            });
    }

    /// How many console lines start with `prefix` so far.
    pub fn count_console_lines(&self, prefix: &str) -> usize {
        let guard = self.output.0.lock().expect("output lock");
        guard
            .stdout
            .lines()
            .filter(|line| line.starts_with(prefix))
            .count()
    }

    fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&Output) -> bool,
    ) -> Result<(), (String, String)> {
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.output;
        let mut output = lock.lock().expect("output lock");
        while !done(&output) {
            let now = Instant::now();
            if now >= deadline || output.closed == 2 {
                return Err((output.stdout.clone(), output.stderr.clone()));
            }
            output = changed
                .wait_timeout(output, deadline - now)
                .expect("output lock")
                .0;
        }
        Ok(())
    }

    /// Waits for the process to end (killing it after `timeout`, which fails the test).
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for cove-vmm") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let (stdout, stderr) = self.snapshot();
                panic!("cove-vmm did not exit within {timeout:?}; console:\n{stdout}\nstderr:\n{stderr}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = self.wait_until(Duration::from_secs(5), |output| output.closed == 2);
        let (stdout, stderr) = self.snapshot();
        Finished {
            status,
            stdout,
            stderr,
        }
    }

    fn snapshot(&self) -> (String, String) {
        let output = self.output.0.lock().expect("output lock");
        (output.stdout.clone(), output.stderr.clone())
    }

    /// Sends a signal to the VMM process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill() with the pid of our own child has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(
    stream: impl Read + Send + 'static,
    output: Arc<(Mutex<Output>, Condvar)>,
    field: fn(&mut Output) -> &mut String,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = reader.read_until(b'\n', &mut line).unwrap_or(0);
            let (lock, changed) = &*output;
            let mut guard = lock.lock().expect("output lock");
            if read == 0 {
                guard.closed += 1;
                changed.notify_all();
                return;
            }
            field(&mut guard).push_str(&String::from_utf8_lossy(&line));
            changed.notify_all();
        }
    });
}

/// Runs `cove-vmm` to completion.
pub fn run_vmm(arguments: &[&str], timeout: Duration) -> Finished {
    Vmm::start(arguments).wait(timeout)
}

/// One HTTP request to a VMM's API socket: returns the status and the body.
pub fn api_request(socket: &Path, method: &str, path: &str) -> (u16, String) {
    raw_api_request(
        socket,
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
    )
}

/// Sends `bytes` as they are and returns the status and body of the answer.
pub fn raw_api_request(socket: &Path, bytes: &[u8]) -> (u16, String) {
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|error| panic!("cannot connect to {}: {error}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    stream.write_all(bytes).expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Waits until `path` exists (a socket the VMM creates at start).
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Starts `cove-vmm` in a network namespace of its own, so that a tap it creates (`--net
/// ip=...`) and the address it gives the tap never appear on the host's network; the
/// namespace goes away with cove-vmm. Needs root. The namespace is entered by a thread that
/// exists only to start the VMM: the process it starts inherits the thread's namespaces, and
/// the test's other threads stay where they were.
pub fn start_vmm_in_own_network_namespace(arguments: &[&str]) -> Vmm {
    let arguments: Vec<String> = arguments
        .iter()
        .map(|argument| argument.to_string())
        .collect();
    std::thread::spawn(move || {
        // SAFETY: unshare() takes no pointers; CLONE_NEWNET moves only this thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!(
                "cannot create a network namespace for the VM's tap (the test needs root): {}",
                std::io::Error::last_os_error()
            );
        }
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        Vmm::start(&arguments)
    })
    .join()
    .expect("start cove-vmm in a network namespace")
}

// ---------------------------------------------------------------------------------------
// cove-agent
// ---------------------------------------------------------------------------------------

/// cove-agent, built static by `guest-agent/build` once per test process: the very binary the
/// microVM initramfs holds. `cove-agent-ctl` lies beside it.
pub fn cove_agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| built_by("guest-agent/build", &[]))
}

/// The static `cove-agent-ctl` built with `cove_agent()`.
pub fn cove_agent_ctl() -> PathBuf {
    cove_agent().with_file_name("cove-agent-ctl")
}

/// A cove-agent started as PID 1 of new mount, pid and network namespaces, as it runs as
/// the init of a microVM, serving on a Unix socket in a scratch directory (which the host
/// sees too). Needs root. Dropping it kills the agent, and with it its namespaces; so does
/// its watchdog if a test hangs for `AGENT_WATCHDOG`.
pub struct AgentInNamespaces {
    child: Child,
    socket: PathBuf,
    scratch: PathBuf,
    announcement: cove_agent::protocol::AgentHello,
    log: Arc<Mutex<String>>,
    watchdog: Option<std::sync::mpsc::Sender<()>>,
}

/// How long one agent may live in a test before its watchdog ends it.
pub const AGENT_WATCHDOG: Duration = Duration::from_secs(300);

impl AgentInNamespaces {
    /// Starts the agent and waits for its announcement.
    pub fn start(name: &str) -> Self {
        let agent = cove_agent();
        let scratch = scratch_dir(&format!("agent-{name}"));
        let socket = scratch.join("agent.sock");
        let announce = scratch.join("announce.sock");
        let listener = std::os::unix::net::UnixListener::bind(&announce)
            .unwrap_or_else(|error| panic!("cannot listen at {}: {error}", announce.display()));
        let mut child = Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--net",
                "--fork",
                "--mount-proc",
                "--kill-child",
            ])
            .arg(agent)
            .arg("--unix")
            .arg(&socket)
            .arg("--announce")
            .arg(&announce)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cove-agent with unshare (util-linux); the agent tests need root");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let ready = cove_agent::client::wait_ready(&listener, Duration::from_secs(30));
        let announcement = match ready {
            Ok(announcement) => announcement,
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the agent did not announce itself: {error}; its log:\n{}",
                    log.lock().map(|log| log.clone()).unwrap_or_default()
                );
            }
        };
        let (watchdog, expired) = std::sync::mpsc::channel::<()>();
        let pid = child.id() as i32;
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                expired.recv_timeout(AGENT_WATCHDOG)
            {
                eprintln!(
                    "agent watchdog: the test ran past {AGENT_WATCHDOG:?}; killing the agent"
                );
                // SAFETY: kill() takes no pointers; unshare's --kill-child takes the agent along.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        AgentInNamespaces {
            child,
            socket,
            scratch,
            announcement,
            log,
            watchdog: Some(watchdog),
        }
    }

    /// A client for this agent.
    pub fn client(&self) -> cove_agent::client::Client {
        cove_agent::client::Client::new(cove_agent::client::Endpoint::Unix(self.socket.clone()))
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A directory of this test's own, the same path inside the agent's namespaces.
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    pub fn announcement(&self) -> &cove_agent::protocol::AgentHello {
        &self.announcement
    }

    /// What the agent wrote on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|log| log.clone()).unwrap_or_default()
    }

    /// Waits for the agent's namespaces to end and returns how `unshare` ended (it re-raises
    /// the signal that ended the agent); panics after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for unshare") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not end within {timeout:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for AgentInNamespaces {
    fn drop(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.send(());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}
