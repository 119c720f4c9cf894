//! Support for the tests that drive `coved` over its socket: the daemon on a throw-away
//! `COVE_DIR` (killed and cleaned up when dropped: its instances, monitors, cgroups and
//! directory), a small HTTP/1.1 client over the Unix socket, exec over websockets as LXD
//! clients do it, the busybox and Debian images as `lxc image import` takes them, and the
//! `lxc` and pylxd clients pointed at the daemon.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cove_shim::cgroup::CgroupLayout;
use serde_json::{json, Value};

use crate::container::{busybox_image, mounted_under, require_root};

/// How long an operation may take before a test gives up on it.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(120);

/// The profile directory (`target/<profile>`) of this test binary.
fn profile_directory() -> PathBuf {
    std::env::current_exe()
        .expect("the test binary knows its path")
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// `coved` and `cove-shim` of this build profile, built once per test process (a no-op when
/// they are up to date), so a test never runs a stale daemon.
pub fn binaries() -> &'static (PathBuf, PathBuf) {
    static BINARIES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let profile = profile_directory();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut build = Command::new(cargo);
        build.current_dir(crate::repository()).args([
            "build",
            "-p",
            "cove-supervisor",
            "--bin",
            "coved",
            "-p",
            "cove-shim",
            "--bin",
            "cove-shim",
        ]);
        if profile.file_name().is_some_and(|name| name == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(
            status.success(),
            "building coved and cove-shim failed: {status}"
        );
        let pair = (profile.join("coved"), profile.join("cove-shim"));
        assert!(
            pair.0.exists() && pair.1.exists(),
            "coved or cove-shim missing after the build"
        );
        pair
    })
}

/// The `cove` CLI of this build profile, built once per test process.
pub fn cove_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let profile = profile_directory();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut build = Command::new(cargo);
        build.current_dir(crate::repository()).args([
            "build",
            "-p",
            "cove-supervisor",
            "--bin",
            "cove",
        ]);
        if profile.file_name().is_some_and(|name| name == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "building cove failed: {status}");
        let binary = profile.join("cove");
        assert!(binary.exists(), "cove missing after the build");
        binary
    })
}

/// How long a test waits for a VM to boot under coved: a minute or more on kvm-pvm, and
/// shared machines are slower.
pub const VM_BOOT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// An operation whose streams are websockets (exec, console): its URL and secrets.
pub struct WebsocketOperation {
    pub url: String,
    fds: Value,
    socket: PathBuf,
}

impl WebsocketOperation {
    /// Connects the websocket of `fd` (`0`, `1`, `2`, `control`).
    pub fn connect(&self, fd: &str) -> tungstenite::WebSocket<UnixStream> {
        let secret = self.fds[fd].as_str().expect("a secret for every fd");
        let stream = UnixStream::connect(&self.socket).expect("connect for a websocket");
        let url = format!("ws://cove{}/websocket?secret={secret}", self.url);
        tungstenite::client::client(url.as_str(), stream)
            .unwrap_or_else(|error| panic!("websocket {fd}: {error}"))
            .0
    }
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "the response is not JSON ({error}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// Sends one HTTP/1.1 request over the Unix socket and reads the whole answer; panics on a
/// connection error.
pub fn http(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    try_http(socket, method, path, headers, body)
        .unwrap_or_else(|error| panic!("{method} {path} on {}: {error}", socket.display()))
}

/// Like [`http`], with connection errors (a daemon killed meanwhile) returned.
pub fn try_http(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let malformed = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: cove\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    // A server that refuses an upload answers and closes before reading all of it.
    let _ = stream.write_all(body);
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| malformed(format!("malformed status line {status_line:?}")))?;
    let mut response_headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            response_headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if response_headers
        .get("transfer-encoding")
        .map(String::as_str)
        == Some("chunked")
    {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line)?;
            let size = usize::from_str_radix(size_line.trim(), 16)
                .map_err(|_| malformed(format!("malformed chunk size {size_line:?}")))?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(HttpResponse {
        status,
        headers: response_headers,
        body,
    })
}

/// A coved on a scratch `COVE_DIR` with its own cgroup parent.
pub struct Coved {
    pub directory: PathBuf,
    pub cgroup_parent: String,
    extra_arguments: Vec<String>,
    child: Option<Child>,
}

impl Coved {
    /// Starts coved for one test; `arguments` are added to its command line.
    pub fn start(test: &str, arguments: &[&str]) -> Self {
        require_root();
        binaries();
        let directory = crate::scratch_dir(&format!("coved-{test}"));
        let mut coved = Self {
            directory,
            cgroup_parent: format!("cove-test-{}-{test}", std::process::id()),
            extra_arguments: arguments
                .iter()
                .map(|argument| argument.to_string())
                .collect(),
            child: None,
        };
        coved.spawn();
        coved
    }

    /// Starts coved with the VM pieces of this build named explicitly (cove-vmm, the static
    /// agent, the project kernel), then `arguments`.
    pub fn start_with_vms(test: &str, arguments: &[&str]) -> Self {
        crate::require_kvm();
        let path = |path: &Path| path.to_str().expect("UTF-8 path").to_string();
        let mut all = vec![
            "--vmm".to_string(),
            path(&crate::cove_vmm()),
            "--vm-agent".to_string(),
            path(crate::cove_agent()),
            "--vm-kernel".to_string(),
            path(crate::project_kernel()),
            "--vm-ready-timeout".to_string(),
            VM_BOOT_TIMEOUT.as_secs().to_string(),
        ];
        all.extend(arguments.iter().map(|argument| argument.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        Self::start(test, &all)
    }

    /// Runs `cove --dir <this coved's directory> ARGUMENTS` with no stdin.
    pub fn cove(&self, arguments: &[&str]) -> Output {
        Command::new(cove_binary())
            .arg("--dir")
            .arg(&self.directory)
            .args(arguments)
            .env_remove("COVE_DIR")
            .stdin(Stdio::null())
            .output()
            .expect("run cove")
    }

    /// POSTs `body` to `path` (an exec or console attach), which must answer with a
    /// websocket operation.
    pub fn websocket_operation(&self, path: &str, body: Value) -> WebsocketOperation {
        let response = self.request("POST", path, Some(body));
        let answer = response.json();
        assert_eq!(response.status, 202, "{path}: {answer}");
        WebsocketOperation {
            url: answer["operation"]
                .as_str()
                .expect("an operation")
                .to_string(),
            fds: answer["metadata"]["metadata"]["fds"].clone(),
            socket: self.socket(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.directory.join("unix.socket")
    }

    pub fn run_directory(&self) -> PathBuf {
        self.directory.join("run")
    }

    pub fn containers_directory(&self) -> PathBuf {
        self.directory
            .join("storage-pools")
            .join("default")
            .join("containers")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("coved runs")
    }

    fn spawn(&mut self) {
        let (coved, shim) = binaries();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.directory.join("coved.log"))
            .expect("open coved's log");
        let child = Command::new(coved)
            .arg("--dir")
            .arg(&self.directory)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg("--shim")
            .arg(shim)
            .args(&self.extra_arguments)
            .args(self.default_network_arguments())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log"))
            .stderr(log)
            .spawn()
            .expect("start coved");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(self.socket()).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("coved exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "coved did not listen within 30s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// No default network (no bridge, no dnsmasq) unless the test asks for one with
    /// `--default-network NAME`: a test's coved must not touch the network it runs in.
    fn default_network_arguments(&self) -> &'static [&'static str] {
        if self
            .extra_arguments
            .iter()
            .any(|argument| argument == "--default-network")
        {
            &[]
        } else {
            &["--default-network", "none"]
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.directory.join("coved.log")).unwrap_or_default()
    }

    /// `kill -9` coved.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM: coved stops serving and leaves its instances running.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// Starts coved again on the same directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn request(&self, method: &str, path: &str, body: Option<Value>) -> HttpResponse {
        let bytes = body.map(|body| body.to_string()).unwrap_or_default();
        let headers: &[(&str, &str)] = if bytes.is_empty() {
            &[]
        } else {
            &[("Content-Type", "application/json")]
        };
        http(&self.socket(), method, path, headers, bytes.as_bytes())
    }

    /// A request that must answer sync 200; returns its metadata.
    pub fn get(&self, path: &str) -> Value {
        let response = self.request("GET", path, None);
        let body = response.json();
        assert_eq!(response.status, 200, "GET {path}: {body}");
        assert_eq!(body["type"], "sync", "GET {path}: {body}");
        body["metadata"].clone()
    }

    /// Waits for the operation an async answer names; panics unless it succeeded.
    pub fn wait(&self, response: &HttpResponse) -> Value {
        let body = response.json();
        assert_eq!(response.status, 202, "expected an async answer: {body}");
        assert_eq!(body["type"], "async", "{body}");
        let url = body["operation"]
            .as_str()
            .expect("an operation URL")
            .to_string();
        assert_eq!(response.header("location"), Some(url.as_str()));
        let done = self.get(&format!(
            "{url}/wait?timeout={}",
            OPERATION_TIMEOUT.as_secs()
        ));
        assert_eq!(
            done["status"],
            "Success",
            "the operation failed: {done}\n{}",
            self.log()
        );
        done
    }

    /// Sends a request and waits for its operation.
    pub fn operation(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let response = self.request(method, path, body);
        self.wait(&response)
    }

    /// Uploads an image file as `lxc image import` does (raw body) and names it `alias`.
    pub fn import_image(&self, tarball: &Path, alias: &str) -> String {
        let bytes = std::fs::read(tarball).expect("read the image");
        let filename = tarball
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let response = http(
            &self.socket(),
            "POST",
            "/1.0/images",
            &[
                ("Content-Type", "application/octet-stream"),
                ("X-LXD-filename", &filename),
            ],
            &bytes,
        );
        let done = self.wait(&response);
        let fingerprint = done["metadata"]["fingerprint"]
            .as_str()
            .expect("a fingerprint")
            .to_string();
        let response = self.request(
            "POST",
            "/1.0/images/aliases",
            Some(json!({"name": alias, "target": fingerprint})),
        );
        assert_eq!(response.status, 200, "{}", response.json());
        fingerprint
    }

    /// Creates and starts `name` from the image `alias`.
    pub fn launch(&self, name: &str, alias: &str, config: Value) {
        self.operation(
            "POST",
            "/1.0/instances",
            Some(json!({"name": name, "source": {"type": "image", "alias": alias}, "config": config})),
        );
        self.operation(
            "PUT",
            &format!("/1.0/instances/{name}/state"),
            Some(json!({"action": "start"})),
        );
    }

    pub fn status(&self, name: &str) -> String {
        self.get(&format!("/1.0/instances/{name}"))["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Runs a command over websockets as `lxc exec` does (non-interactive); returns the exit
    /// code, stdout and stderr.
    pub fn exec(&self, name: &str, command: &[&str], stdin: &[u8]) -> (i64, String, String) {
        let operation = self.websocket_operation(
            &format!("/1.0/instances/{name}/exec"),
            json!({
                "command": command, "wait-for-websocket": true, "interactive": false,
                "environment": {"GREETING": "hello"},
            }),
        );
        let connect = |fd: &str| operation.connect(fd);
        let mut input = connect("0");
        let outputs: Vec<_> = ["1", "2"]
            .iter()
            .map(|fd| {
                let mut socket = connect(fd);
                std::thread::spawn(move || {
                    let mut text = Vec::new();
                    while let Ok(message) = socket.read() {
                        match message {
                            tungstenite::Message::Binary(data) => text.extend_from_slice(&data),
                            tungstenite::Message::Close(_) => break,
                            _ => {}
                        }
                    }
                    String::from_utf8_lossy(&text).into_owned()
                })
            })
            .collect();
        if !stdin.is_empty() {
            input
                .send(tungstenite::Message::Binary(stdin.to_vec().into()))
                .expect("send stdin");
        }
        // An empty text message is end-of-file, as LXD's clients send it.
        input
            .send(tungstenite::Message::Text("".into()))
            .expect("send end-of-file");
        let done = self.get(&format!(
            "{}/wait?timeout={}",
            operation.url,
            OPERATION_TIMEOUT.as_secs()
        ));
        assert_eq!(done["status"], "Success", "exec failed: {done}");
        let mut outputs = outputs
            .into_iter()
            .map(|thread| thread.join().expect("a reader"));
        let stdout = outputs.next().unwrap_or_default();
        let stderr = outputs.next().unwrap_or_default();
        let _ = input.close(None);
        (
            done["metadata"]["return"].as_i64().expect("an exit code"),
            stdout,
            stderr,
        )
    }

    /// Deletes every instance (stopping it first).
    pub fn delete_all(&self) {
        let names = self.request("GET", "/1.0/instances", None).json()["metadata"].clone();
        for url in names.as_array().cloned().unwrap_or_default() {
            let url = url.as_str().unwrap_or_default().to_string();
            let response = self.request(
                "PUT",
                &format!("{url}/state"),
                Some(json!({"action": "stop", "force": true})),
            );
            if response.status == 202 {
                let _ = self.get(&format!(
                    "{}/wait?timeout=60",
                    response.json()["operation"].as_str().unwrap_or_default()
                ));
            }
            let response = self.request("DELETE", &url, None);
            if response.status == 202 {
                let _ = self.get(&format!(
                    "{}/wait?timeout=60",
                    response.json()["operation"].as_str().unwrap_or_default()
                ));
            }
        }
    }

    /// `lxc ARGS` with `LXD_DIR` pointing at this daemon.
    pub fn lxc(&self, arguments: &[&str]) -> Output {
        lxc_binary();
        let mut command = Command::new("lxc");
        command
            .args(arguments)
            .env("LXD_DIR", &self.directory)
            .env("HOME", self.directory.join("client-home"))
            .stdin(Stdio::null());
        crate::container_monitor::run_with_timeout(command, Duration::from_secs(180))
    }

    /// Like [`Coved::lxc`], and fails the test unless it succeeds; returns stdout.
    pub fn lxc_ok(&self, arguments: &[&str]) -> String {
        let output = self.lxc(arguments);
        assert!(
            output.status.success(),
            "lxc {} failed with {}:\n{}{}",
            arguments.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Coved {
    fn drop(&mut self) {
        if self.child.is_none() && UnixStream::connect(self.socket()).is_err() {
            self.spawn_quietly();
        }
        if self.child.is_some() {
            self.delete_all();
        }
        self.kill();
        // Whatever the API could not remove: monitors and their containers.
        let (_, shim) = binaries();
        if let Ok(entries) = std::fs::read_dir(self.run_directory()) {
            for entry in entries.flatten() {
                let _ = Command::new(shim)
                    .arg("delete")
                    .arg(entry.file_name())
                    .arg("--force")
                    .arg("--run-dir")
                    .arg(self.run_directory())
                    .output();
            }
        }
        if let Ok(layout) = CgroupLayout::detect() {
            for mount in layout.mounts() {
                let _ = std::fs::remove_dir(mount.join(&self.cgroup_parent));
            }
        }
        if !mounted_under(&self.directory) {
            let _ = std::fs::remove_dir_all(&self.directory);
        }
    }
}

impl Coved {
    fn spawn_quietly(&mut self) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.spawn()));
        if result.is_err() {
            self.child = None;
        }
    }
}

/// The command lines (NUL-separated) of every process whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(bytes) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if text.contains(needle) {
                found.push((pid, text));
            }
        }
    }
    found
}

/// Installs Debian's `lxc` client (package lxd-client) when it is missing.
pub fn lxc_binary() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        if Command::new("lxc").arg("version").output().is_ok() {
            return;
        }
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "-q", "lxd-client"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .expect("run apt-get")
        };
        if !install().success() {
            let _ = Command::new("apt-get").args(["update", "-q"]).status();
            assert!(install().success(), "apt-get install lxd-client failed");
        }
    });
}

fn run(command: &mut Command) {
    let output = command.output().expect("run a command");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn metadata_yaml(description: &str, os: &str) -> String {
    format!(
        "architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  description: \
         {description}\n  os: {os}\n  release: test\n"
    )
}

/// The busybox image as a unified tarball (`metadata.yaml` + `rootfs/`, gzip), built once
/// per test process in `directory`.
pub fn busybox_unified_tarball(directory: &Path) -> PathBuf {
    let image = busybox_image();
    let staging = directory.join("busybox-metadata");
    std::fs::create_dir_all(&staging).expect("create a staging directory");
    std::fs::write(
        staging.join("metadata.yaml"),
        metadata_yaml("busybox", "busybox"),
    )
    .expect("write metadata.yaml");
    let tarball = directory.join("busybox.tar.gz");
    let parent = image.parent().expect("the image has a parent");
    let base = image
        .file_name()
        .expect("the image has a name")
        .to_string_lossy()
        .into_owned();
    run(Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(&staging)
        .arg("metadata.yaml")
        .arg("-C")
        .arg(parent)
        .arg(format!("--transform=s,^{base},rootfs,"))
        .arg(&base));
    tarball
}

/// The busybox image split in two: a metadata tarball (xz) and a rootfs tarball (gzip).
pub fn busybox_split_tarballs(directory: &Path) -> (PathBuf, PathBuf) {
    let staging = directory.join("busybox-split");
    std::fs::create_dir_all(&staging).expect("create a staging directory");
    std::fs::write(
        staging.join("metadata.yaml"),
        metadata_yaml("busybox split", "busybox"),
    )
    .expect("write metadata.yaml");
    let metadata = directory.join("busybox-metadata.tar.xz");
    run(Command::new("tar")
        .arg("-cJf")
        .arg(&metadata)
        .arg("-C")
        .arg(&staging)
        .arg("metadata.yaml"));
    let rootfs = directory.join("busybox-rootfs.tar.gz");
    run(Command::new("tar")
        .arg("-czf")
        .arg(&rootfs)
        .arg("-C")
        .arg(busybox_image())
        .arg("."));
    (metadata, rootfs)
}

/// The project's Debian root file system (`resources/build-rootfs`, cached per machine) as a
/// unified, uncompressed tarball in `directory`.
pub fn debian_tarball(directory: &Path) -> PathBuf {
    let script = crate::repository().join("resources/build-rootfs");
    let output = Command::new(&script)
        .args(["--agent", "none"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", script.display()));
    assert!(
        output.status.success(),
        "resources/build-rootfs failed: {}",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let rootfs = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        rootfs.join("sbin/init").symlink_metadata().is_ok(),
        "{} has no /sbin/init",
        rootfs.display()
    );
    let staging = directory.join("debian-metadata");
    std::fs::create_dir_all(&staging).expect("create a staging directory");
    std::fs::write(
        staging.join("metadata.yaml"),
        metadata_yaml("Debian bookworm", "Debian"),
    )
    .expect("write metadata.yaml");
    let tarball = directory.join("debian.tar");
    let parent = rootfs.parent().expect("the rootfs has a parent");
    let base = rootfs
        .file_name()
        .expect("the rootfs has a name")
        .to_string_lossy()
        .into_owned();
    run(Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("-C")
        .arg(&staging)
        .arg("metadata.yaml")
        .arg("-C")
        .arg(parent)
        .arg(format!("--transform=s,^{base},rootfs,"))
        .arg(&base));
    tarball
}

/// Builds a multipart/form-data body with `metadata` and `rootfs` parts, as `lxc image
/// import META ROOTFS` sends it; returns the content type and the body.
pub fn multipart(metadata: &Path, rootfs: &Path) -> (String, Vec<u8>) {
    let boundary = "cove-test-boundary-7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (field, path) in [("metadata", metadata), ("rootfs", rootfs)] {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; \
                 filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(&std::fs::read(path).expect("read an image part"));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Waits until `check` holds, polling; panics with `what` after `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
