"""`tools/bench containers`: system containers in cove (through the `cove-shim` binary),
Debian's LXD and runc, each started from the same busybox rootfs.

    tools/bench containers [--runs N] [--execs N] [--clean-stops N] [--only cove,lxd,runc]
                           [--json PATH]

Every run makes a fresh container in each runtime (the runtimes alternate, run by run, so
that noise on the machine hits all of them alike) and records:

  to init        the request -> the runtime's command returns with the container's PID 1
                 running: `cove-shim start`, `lxc launch` (create and start: cove's start
                 makes its snapshot too), `runc run -d`
  to exec        the request -> the first `exec true` in it has returned 0 (retried until
                 it does)
  exec           one `exec true` in the running container, command to exit status, each
                 after a 100 ms pause (an isolated exec; back to back they are cheaper,
                 see below); the median of --execs per run
  stop           `cove-shim stop --force`, `lxc stop --force`, `runc delete --force`: init is
                 killed and the command returns once the runtime has it gone and its cgroup
                 released
  monitor RSS    after 1.5 s idle, the VmRSS of the process that watches this container:
                 cove-shim's monitor, LXD's `[lxc monitor]`; runc leaves none behind. The
                 report also gives RSS and PSS right after the start: the cove-shim monitor
                 unmaps the code pages its start touched once it has been idle for a second
                 (docs/containers.md says why)
  cgroup memory  the container's memory cgroup (memory.usage_in_bytes, memory.current),
                 page cache included: LXD unpacks the image for each container, cove (an
                 overlay) and runc (the directory itself) share one copy
  per container  monitor RSS + cgroup memory

and, on --clean-stops further containers per runtime, the clean stop: `cove-shim stop`,
`lxc stop`, `runc kill PWR` until `runc state` says stopped and `runc delete`; busybox init's
own shutdown sleeps about two seconds of that.

Joining the container's cgroups dominates `exec` on a hybrid (v1) host: the first write to a
`cgroup.procs` after a quiet spell waits for an RCU grace period (the kernel's
`cgroup_threadgroup_rwsem`), and the v1 `cpu` hierarchy adds a few milliseconds of its own.
Every runtime here pays that; back-to-back execs pay less of it.

The runtimes:
  cove  target/release/cove-shim (built here), unprivileged (user namespace, idmapped
        overlay), no network, cgroup parent `cove-bench`
  lxd   Debian's lxd (5.0.2 in bookworm, installed with apt-get when missing) run by hand:
        lxcfs, then `lxd --group root` with LXD_DIR in a scratch directory, `lxd init
        --preseed` with a `dir` pool and no network, the same rootfs imported as an image
        (metadata and rootfs tarballs); containers unprivileged (LXD's own id map). If LXD
        cannot run here the report says exactly why, and cove and runc are still measured.
  runc  Debian's runc: one OCI bundle per container from `runc spec`, /sbin/init as the
        process, the image directory as a read-only root, a user namespace with cove's
        default map (1000000, 65536 ids), cgroup `cove-bench-runc/<name>`

The figures are min/median/max over the runs; the ratios are each peer's median over cove's.
JSON goes to target/bench/containers.json. Needs root.
"""

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

from bench_setup import REPOSITORY, BenchError, ensure_program, log, run_setup_command

DEFAULT_JSON = REPOSITORY / "target" / "bench" / "containers.json"
COVE_SHIM = REPOSITORY / "target" / "release" / "cove-shim"
IMAGE = REPOSITORY / "target" / "bench" / "containers" / "busybox-image"
BOOT_MARKER = "cove-bench-image: sysinit done"
IMAGE_ALIAS = "cove-bench-busybox"
COVE_CGROUP_PARENT = "cove-bench"
RUNC_CGROUP_PARENT = "cove-bench-runc"
# The cove-shim monitor unmaps the code its work touched after a second of idleness.
IDLE_SECONDS = 1.5
EXEC_PAUSE_SECONDS = 0.1
FIRST_EXEC_TIMEOUT_SECONDS = 30.0
COMMAND_TIMEOUT_SECONDS = 120.0

# The issue's goals for cove, and what it measured for LXD.
GOALS = {"to_init_ms": 50.0, "exec_ms": 10.0, "stop_ms": 50.0, "monitor_rss_mib": 2.0}
ISSUE_LXD = {"to_init_ms": 270.0, "exec_ms": 42.0, "stop_ms": 660.0, "monitor_rss_mib": 15.0}

RUNTIMES = ("cove", "lxd", "runc")
METRICS = [
    # key, column title, decimals
    ("to_init_ms", "to init ms", 1),
    ("to_exec_ms", "to exec ms", 1),
    ("exec_ms", "exec ms", 1),
    ("stop_ms", "stop ms", 1),
    ("clean_stop_ms", "clean stop ms", 0),
    ("monitor_rss_mib", "monitor RSS MiB", 2),
    ("cgroup_mib", "cgroup MiB", 2),
    ("per_container_mib", "per container MiB", 2),
]


def tail(text: str, lines: int = 12) -> str:
    kept = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join("    | " + line for line in kept) if kept else "    | (nothing)"


def run(argv: list, what: str, env: Optional[dict] = None, check: bool = True,
        stdin=subprocess.DEVNULL, output=None) -> subprocess.CompletedProcess:
    """Runs a command to completion; with `output` (an open file) its stdout and stderr go
    there instead of being captured (for a container that keeps them)."""
    try:
        result = subprocess.run(
            argv, env=env, stdin=stdin, text=True, timeout=COMMAND_TIMEOUT_SECONDS,
            stdout=output if output else subprocess.PIPE,
            stderr=output if output else subprocess.PIPE,
        )
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"{what} did not finish within {COMMAND_TIMEOUT_SECONDS:.0f} s: "
                         f"{' '.join(argv)}") from error
    if check and result.returncode != 0:
        captured = (result.stdout or "") + (result.stderr or "")
        raise BenchError(f"{what} failed (exit status {result.returncode}): {' '.join(argv)}\n"
                         f"{tail(captured)}")
    return result


def milliseconds_since(start: float) -> float:
    return (time.monotonic() - start) * 1000.0


def cgroup_mounts() -> list:
    """Every cgroup hierarchy's mount point."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        if after.split(" ")[0] in ("cgroup", "cgroup2"):
            mounts.append(Path(before.split(" ")[4]))
    return mounts


def remove_cgroup(relative: str) -> None:
    """Removes an (empty) cgroup and its empty children from every hierarchy."""
    for mount in cgroup_mounts():
        path = mount / relative
        if not path.is_dir():
            continue
        for directory in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
            try:
                directory.rmdir()
            except OSError:
                pass
        try:
            path.rmdir()
        except OSError:
            pass


def cgroup_memory_bytes(relative: str) -> Optional[int]:
    """Memory charged to a cgroup: the v1 memory hierarchy's usage, or v2's memory.current."""
    for path in (Path("/sys/fs/cgroup/memory") / relative / "memory.usage_in_bytes",
                 Path("/sys/fs/cgroup") / relative / "memory.current"):
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def process_memory_kib(pid: int) -> Optional[dict]:
    """A process's VmRSS and PSS in KiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    field_of = lambda text, name: next(  # noqa: E731
        int(line.split()[1]) for line in text.splitlines() if line.startswith(name + ":"))
    return {"rss_kib": field_of(status, "VmRSS"), "pss_kib": field_of(rollup, "Pss")}


def unmount_under(directory: Path) -> None:
    """Lazily unmounts everything mounted at or below `directory`, deepest first."""
    prefix = str(directory)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split(" ")[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------------------------------
# The image: the same busybox rootfs as the tests' (tests/src/container.rs)
# ---------------------------------------------------------------------------------------

def build_image() -> Path:
    if (IMAGE / "sbin" / "init").is_symlink():
        return IMAGE
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        ensure_program("busybox", "busybox-static")
    building = IMAGE.with_name(IMAGE.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc",
                      "sys", "dev"):
        (building / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, building / "bin" / "busybox")
    applets = run([str(building / "bin" / "busybox"), "--list-full"], "listing busybox applets")
    for applet in applets.stdout.split():
        if applet != "bin/busybox" and not (building / applet).exists():
            (building / applet).symlink_to("/bin/busybox")
    (building / "etc" / "inittab").write_text(
        f"::sysinit:/bin/echo {BOOT_MARKER}\n::shutdown:/bin/echo cove-bench-image: halting\n")
    (building / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (building / "etc" / "group").write_text("root:x:0:\ntty:x:5:\n")
    (building / "etc" / "hostname").write_text("image\n")
    building.rename(IMAGE)
    return IMAGE


# ---------------------------------------------------------------------------------------
# The runtimes
# ---------------------------------------------------------------------------------------

class Runtime:
    """One container runtime: how to start, exec in, stop and remove a container."""

    name = ""

    def __init__(self, scratch: Path):
        self.scratch = scratch / self.name
        self.scratch.mkdir(parents=True)
        self.version = ""
        self.notes = []

    def setup(self) -> None:
        pass

    def start(self, container: str) -> None:
        raise NotImplementedError

    def exec_true(self, container: str) -> bool:
        raise NotImplementedError

    def stop(self, container: str, force: bool) -> None:
        raise NotImplementedError

    def remove(self, container: str) -> None:
        """Removes a container whatever its state; never raises."""
        raise NotImplementedError

    def monitor_pid(self, container: str) -> Optional[int]:
        return None

    def cgroup(self, container: str) -> str:
        raise NotImplementedError

    def teardown(self) -> None:
        pass


class Cove(Runtime):
    name = "cove"

    def setup(self) -> None:
        run_setup_command(["cargo", "build", "--release", "-p", "cove-shim", "--bin",
                           "cove-shim"], "building cove-shim")
        self.run_directory = self.scratch / "run"
        self.containers = self.scratch / "containers"
        self.version = "cove-shim (this tree, release build)"
        self.notes.append("unprivileged: user namespace, idmapped overlay snapshot of the image")

    def shim(self, *arguments: str) -> list:
        command, rest = arguments[0], list(arguments[1:])
        return [str(COVE_SHIM), command, *rest[:1], "--run-dir", str(self.run_directory),
                *rest[1:]]

    def start(self, container: str) -> None:
        run([str(COVE_SHIM), "start", "--name", container, "--rootfs", str(IMAGE),
             "--run-dir", str(self.run_directory), "--containers-dir", str(self.containers),
             "--cgroup-parent", COVE_CGROUP_PARENT], "cove-shim start")

    def exec_true(self, container: str) -> bool:
        return run(self.shim("exec", container, "--", "true"), "cove-shim exec",
                   check=False).returncode == 0

    def stop(self, container: str, force: bool) -> None:
        timeout = ["--force"] if force else ["--timeout", "30"]
        run(self.shim("stop", container, *timeout), "cove-shim stop")

    def remove(self, container: str) -> None:
        run(self.shim("delete", container, "--force"), "cove-shim delete", check=False)

    def monitor_pid(self, container: str) -> Optional[int]:
        state = json.loads((self.run_directory / container / "state.json").read_text())
        return state["monitor_pid"]

    def cgroup(self, container: str) -> str:
        return f"{COVE_CGROUP_PARENT}/{container}"

    def teardown(self) -> None:
        if self.run_directory.is_dir():
            for entry in self.run_directory.iterdir():
                self.remove(entry.name)
        remove_cgroup(COVE_CGROUP_PARENT)


class LxdUnavailable(Exception):
    """LXD cannot run here; the message says why."""


class Lxd(Runtime):
    name = "lxd"

    def setup(self) -> None:
        for program, package in (("lxd", "lxd"), ("lxc", "lxd-client"), ("lxcfs", "lxcfs")):
            try:
                ensure_program(program, package)
            except BenchError as error:
                raise LxdUnavailable(f"cannot install {package}: {error}") from error
        self.directory = self.scratch / "lxd"
        self.directory.mkdir()
        self.environment = dict(os.environ, LXD_DIR=str(self.directory))
        self.lxcfs = None
        self.daemon = None
        self.start_lxcfs()
        log(f"bench: starting lxd with LXD_DIR={self.directory}")
        daemon_log = open(self.scratch / "lxd.out", "w")
        self.daemon = subprocess.Popen(
            ["lxd", "--group", "root", "--logfile", str(self.scratch / "lxd.log")],
            env=self.environment, stdin=subprocess.DEVNULL, stdout=daemon_log,
            stderr=daemon_log, start_new_session=True)
        ready = run(["lxd", "waitready", "--timeout", "60"], "lxd waitready",
                    env=self.environment, check=False)
        if ready.returncode != 0 or self.daemon.poll() is not None:
            raise LxdUnavailable(self.why_not("the LXD daemon did not become ready",
                                              ready.stdout + ready.stderr))
        self.version = "LXD " + run(["lxd", "--version"], "lxd --version").stdout.strip()
        preseed = (
            "config: {}\nnetworks: []\nstorage_pools:\n- name: default\n  driver: dir\n"
            "profiles:\n- name: default\n  devices:\n    root:\n      path: /\n"
            "      pool: default\n      type: disk\n")
        result = subprocess.run(["lxd", "init", "--preseed"], input=preseed, text=True,
                                env=self.environment, capture_output=True,
                                timeout=COMMAND_TIMEOUT_SECONDS)
        if result.returncode != 0:
            raise LxdUnavailable(self.why_not("lxd init --preseed failed",
                                              result.stdout + result.stderr))
        self.import_image()
        self.notes.append("dir storage pool, no network; unprivileged with LXD's own id map; "
                          "the image is unpacked (and its ownership shifted) per container")
        if self.lxcfs is None:
            self.notes.append("lxcfs: " + self.lxcfs_note)

    def start_lxcfs(self) -> None:
        mount_point = Path("/var/lib/lxcfs")
        if os.path.ismount(mount_point):
            self.lxcfs_note = "already mounted on /var/lib/lxcfs (not started here)"
            return
        mount_point.mkdir(parents=True, exist_ok=True)
        output = open(self.scratch / "lxcfs.log", "w")
        process = subprocess.Popen(["lxcfs", str(mount_point)], stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=output, start_new_session=True)
        deadline = time.monotonic() + 10
        while not os.path.ismount(mount_point):
            if process.poll() is not None or time.monotonic() > deadline:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                self.lxcfs_note = ("did not start, LXD runs without it:\n"
                                   + tail((self.scratch / "lxcfs.log").read_text()))
                log(f"bench: lxcfs {self.lxcfs_note}")
                return
            time.sleep(0.05)
        self.lxcfs = process

    def why_not(self, what: str, output: str) -> str:
        log_text = ""
        for name in ("lxd.log", "lxd.out"):
            path = self.scratch / name
            if path.exists():
                log_text += path.read_text()
        return f"{what}:\n{tail(output)}\n  its log:\n{tail(log_text, 20)}"

    def import_image(self) -> None:
        metadata = self.scratch / "metadata.yaml"
        metadata.write_text(f"architecture: {platform.machine()}\n"
                            f"creation_date: {int(time.time())}\n"
                            "properties:\n  description: cove bench busybox\n  os: busybox\n")
        metadata_tarball = self.scratch / "metadata.tar.gz"
        rootfs_tarball = self.scratch / "rootfs.tar.gz"
        with tarfile.open(metadata_tarball, "w:gz") as archive:
            archive.add(metadata, arcname="metadata.yaml")
        with tarfile.open(rootfs_tarball, "w:gz") as archive:
            archive.add(IMAGE, arcname=".")
        result = run(["lxc", "image", "import", str(metadata_tarball), str(rootfs_tarball),
                      "--alias", IMAGE_ALIAS], "lxc image import", env=self.environment,
                     check=False)
        if result.returncode != 0:
            raise LxdUnavailable(self.why_not("lxc image import failed",
                                              result.stdout + result.stderr))

    def lxc(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["lxc", *arguments], f"lxc {arguments[0]}", env=self.environment,
                   check=check)

    def start(self, container: str) -> None:
        self.lxc("launch", IMAGE_ALIAS, container)

    def exec_true(self, container: str) -> bool:
        return self.lxc("exec", container, "--", "true", check=False).returncode == 0

    def stop(self, container: str, force: bool) -> None:
        self.lxc("stop", container, *(["--force"] if force else ["--timeout", "30"]))

    def remove(self, container: str) -> None:
        self.lxc("delete", container, "--force", check=False)

    def monitor_pid(self, container: str) -> Optional[int]:
        suffix = f"{self.directory}/containers {container}"
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            if command.startswith("[lxc monitor]") and command.endswith(suffix):
                return int(entry.name)
        return None

    def daemon_memory(self) -> Optional[dict]:
        return process_memory_kib(self.daemon.pid) if self.daemon else None

    def cgroup(self, container: str) -> str:
        return f"lxc.payload.{container}"

    def teardown(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            listed = self.lxc("list", "--format", "csv", "-c", "n", check=False)
            for container in listed.stdout.split():
                self.remove(container)
            self.lxc("image", "delete", IMAGE_ALIAS, check=False)
            shutdown = run(["lxd", "shutdown", "--timeout", "60"], "lxd shutdown",
                           env=self.environment, check=False)
            try:
                self.daemon.wait(timeout=10 if shutdown.returncode == 0 else 1)
            except subprocess.TimeoutExpired:
                os.killpg(self.daemon.pid, signal.SIGKILL)
                self.daemon.wait()
        if self.lxcfs is not None:
            self.lxcfs.terminate()
            try:
                self.lxcfs.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.lxcfs.kill()
                self.lxcfs.wait()
            if os.path.ismount("/var/lib/lxcfs"):
                subprocess.run(["umount", "-l", "/var/lib/lxcfs"])
        if hasattr(self, "directory"):
            unmount_under(self.directory)
        remove_cgroup("lxc.pivot")


class Runc(Runtime):
    name = "runc"

    def setup(self) -> None:
        ensure_program("runc", "runc")
        self.state = self.scratch / "state"
        self.version = run(["runc", "--version"], "runc --version").stdout.splitlines()[0]
        template = self.scratch / "template"
        template.mkdir()
        run(["runc", "spec", "--bundle", str(template)], "runc spec")
        self.template = json.loads((template / "config.json").read_text())
        self.notes.append("a user namespace with cove's default map (1000000, 65536 ids); "
                          "the image directory as a read-only root; no monitor process "
                          "(containerd-shim or conmon would add one)")

    def bundle(self, container: str) -> Path:
        return self.scratch / "bundles" / container

    def runc(self, *arguments: str, check: bool = True, output=None) -> subprocess.CompletedProcess:
        return run(["runc", "--root", str(self.state), *arguments], f"runc {arguments[0]}",
                   check=check, output=output)

    def start(self, container: str) -> None:
        bundle = self.bundle(container)
        bundle.mkdir(parents=True)
        config = json.loads(json.dumps(self.template))
        config["process"]["terminal"] = False
        config["process"]["args"] = ["/sbin/init"]
        config["process"]["env"].append("container=runc")
        config["root"] = {"path": str(IMAGE), "readonly": True}
        config["hostname"] = container
        linux = config["linux"]
        linux["cgroupsPath"] = f"/{RUNC_CGROUP_PARENT}/{container}"
        linux["namespaces"].append({"type": "user"})
        linux["uidMappings"] = [{"containerID": 0, "hostID": 1000000, "size": 65536}]
        linux["gidMappings"] = [{"containerID": 0, "hostID": 1000000, "size": 65536}]
        (bundle / "config.json").write_text(json.dumps(config))
        # The container keeps runc's stdout and stderr: a file, not a pipe to wait on.
        with open(bundle / "console.log", "w") as console:
            self.runc("run", "--detach", "--bundle", str(bundle), container, output=console)

    def exec_true(self, container: str) -> bool:
        return self.runc("exec", container, "true", check=False).returncode == 0

    def stop(self, container: str, force: bool) -> None:
        if force:
            self.runc("delete", "--force", container)
            return
        self.runc("kill", container, "PWR")
        deadline = time.monotonic() + 30
        while True:
            state = self.runc("state", container, check=False)
            if state.returncode != 0 or json.loads(state.stdout)["status"] == "stopped":
                break
            if time.monotonic() > deadline:
                raise BenchError(f"runc: {container} did not stop within 30 s of SIGPWR")
            time.sleep(0.002)
        self.runc("delete", container)

    def remove(self, container: str) -> None:
        self.runc("delete", "--force", container, check=False)
        shutil.rmtree(self.bundle(container), ignore_errors=True)

    def cgroup(self, container: str) -> str:
        return f"{RUNC_CGROUP_PARENT}/{container}"

    def teardown(self) -> None:
        if self.state.is_dir():
            for entry in self.state.iterdir():
                self.remove(entry.name)
        remove_cgroup(RUNC_CGROUP_PARENT)


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------

def measure_run(runtime: Runtime, container: str, execs: int) -> dict:
    """One container's life: start, first exec, execs, idle memory, forced stop."""
    try:
        started = time.monotonic()
        runtime.start(container)
        to_init_ms = milliseconds_since(started)
        pid = runtime.monitor_pid(container)
        at_start = process_memory_kib(pid) if pid else None
        while not runtime.exec_true(container):
            if time.monotonic() - started > FIRST_EXEC_TIMEOUT_SECONDS:
                raise BenchError(f"{runtime.name}: `exec true` in {container} did not succeed "
                                 f"within {FIRST_EXEC_TIMEOUT_SECONDS:.0f} s of the start")
            time.sleep(0.001)
        to_exec_ms = milliseconds_since(started)
        exec_times = []
        for _ in range(execs):
            time.sleep(EXEC_PAUSE_SECONDS)
            began = time.monotonic()
            if not runtime.exec_true(container):
                raise BenchError(f"{runtime.name}: `exec true` in {container} failed")
            exec_times.append(milliseconds_since(began))
        time.sleep(IDLE_SECONDS)
        pid = runtime.monitor_pid(container)
        monitor = process_memory_kib(pid) if pid else None
        cgroup_bytes = cgroup_memory_bytes(runtime.cgroup(container))
        began = time.monotonic()
        runtime.stop(container, force=True)
        stop_ms = milliseconds_since(began)
    finally:
        runtime.remove(container)
    monitor_rss_mib = monitor["rss_kib"] / 1024.0 if monitor else 0.0
    cgroup_mib = cgroup_bytes / 1048576.0 if cgroup_bytes is not None else None
    return {
        "to_init_ms": to_init_ms,
        "to_exec_ms": to_exec_ms,
        "exec_ms": statistics.median(exec_times) if exec_times else None,
        "exec_all_ms": exec_times,
        "stop_ms": stop_ms,
        "monitor_pid": pid,
        "monitor_rss_mib": monitor_rss_mib,
        "monitor_pss_mib": monitor["pss_kib"] / 1024.0 if monitor else 0.0,
        "monitor_rss_at_start_mib": at_start["rss_kib"] / 1024.0 if at_start else 0.0,
        "monitor_pss_at_start_mib": at_start["pss_kib"] / 1024.0 if at_start else 0.0,
        "cgroup_mib": cgroup_mib,
        "per_container_mib": monitor_rss_mib + (cgroup_mib or 0.0),
    }


def measure_clean_stop(runtime: Runtime, container: str) -> float:
    try:
        runtime.start(container)
        started = time.monotonic()
        while not runtime.exec_true(container):
            if time.monotonic() - started > FIRST_EXEC_TIMEOUT_SECONDS:
                raise BenchError(f"{runtime.name}: {container} never ran a command")
            time.sleep(0.001)
        time.sleep(0.5)  # let busybox init finish its sysinit
        began = time.monotonic()
        runtime.stop(container, force=False)
        return milliseconds_since(began)
    finally:
        runtime.remove(container)


def summarize(values: list) -> Optional[dict]:
    values = [value for value in values if value is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def format_triple(triple: Optional[dict], decimals: int) -> str:
    if not triple:
        return "-"
    return "/".join(f"{triple[key]:.{decimals}f}" for key in ("min", "median", "max"))


def host_facts() -> dict:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    layout = "unified (v2)" if not Path("/sys/fs/cgroup/memory").is_dir() else "hybrid (v1 + v2)"
    return {
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "cgroups": layout,
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def print_report(host: dict, arguments, runtimes: list, summaries: dict, extras: dict,
                 skipped: dict, ratios: dict) -> None:
    print("cove containers benchmark")
    print(f"  cpu:     {host['cpu_model']} ({host['cpus']} cpus)")
    print(f"  kernel:  {host['kernel']}, cgroups {host['cgroups']}")
    print(f"  load:    {' '.join(str(value) for value in host['load_average_at_start'])}")
    print(f"  image:   {IMAGE} (busybox, init prints {BOOT_MARKER!r})")
    print(f"  runs:    {arguments.runs} containers per runtime, interleaved; {arguments.execs} "
          f"execs each; {arguments.clean_stops} clean stops")
    print()
    for runtime in runtimes:
        print(f"  {runtime.name}: {runtime.version}")
        for note in runtime.notes:
            print(f"    note: {note}")
    for name, why in skipped.items():
        print(f"  {name}: NOT MEASURED: {why}")
    print()
    headers = ["runtime"] + [title for _, title, _ in METRICS]
    rows = [[runtime.name] + [format_triple(summaries[runtime.name].get(key), decimals)
                              for key, _, decimals in METRICS] for runtime in runtimes]
    widths = [max(len(row[column]) for row in rows + [headers]) for column in range(len(headers))]
    print("min/median/max")
    print("  ".join(header.ljust(width) for header, width in zip(headers, widths)))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    print()
    cove = summaries.get("cove", {})
    if cove:
        print("cove against the issue's goals (medians)")
        for key, goal in GOALS.items():
            value = cove.get(key)
            if value:
                verdict = "met" if value["median"] < goal else "MISSED"
                print(f"  {key}: {value['median']:.2f} (goal under {goal:g}; the issue "
                      f"measured LXD at {ISSUE_LXD[key]:g}): {verdict}")
        print()
    print("monitor memory, medians (MiB): right after start -> idle")
    for runtime in runtimes:
        summary = summaries[runtime.name]
        if summary.get("monitor_rss_mib") and summary["monitor_rss_mib"]["median"] > 0:
            print(f"  {runtime.name}: RSS {summary['monitor_rss_at_start_mib']['median']:.2f} -> "
                  f"{summary['monitor_rss_mib']['median']:.2f}, PSS "
                  f"{summary['monitor_pss_at_start_mib']['median']:.2f} -> "
                  f"{summary['monitor_pss_mib']['median']:.2f}")
    print()
    for name, ratio in ratios.items():
        parts = [f"{ratio[key]:.1f}x {title}" for key, title, _ in METRICS
                 if ratio.get(key) is not None]
        print(f"  {name} / cove: {', '.join(parts)}")
    for line in extras.get("lines", []):
        print(line)


def containers_benchmark(arguments) -> int:
    if os.geteuid() != 0:
        raise BenchError("the containers benchmark makes namespaces, cgroups and mounts: run it "
                         "as root")
    if arguments.runs < 1 or arguments.execs < 1 or arguments.clean_stops < 0:
        raise BenchError("--runs and --execs must be at least 1, --clean-stops at least 0")
    wanted = [name.strip() for name in arguments.only.split(",") if name.strip()]
    for name in wanted:
        if name not in RUNTIMES:
            raise BenchError(f"--only: unknown runtime {name!r} (known: {', '.join(RUNTIMES)})")
    build_image()
    host = host_facts()
    scratch = Path(tempfile.mkdtemp(prefix="cove-bench-ct-"))
    # An unprivileged container's root (host uid 1000000 and up) must reach its directory.
    scratch.chmod(0o755)
    runtimes = []
    skipped = {}
    extras = {"lines": []}
    try:
        for kind in (Cove, Lxd, Runc):
            if kind.name not in wanted:
                continue
            runtime = kind(scratch)
            try:
                runtime.setup()
                runtimes.append(runtime)
            except LxdUnavailable as error:
                skipped[runtime.name] = f"LXD cannot run here: {error}"
                log(f"bench: LXD cannot run here: {error}")
                runtime.teardown()
        if not runtimes:
            raise BenchError("no runtime to measure")
        results = {runtime.name: [] for runtime in runtimes}
        clean_stops = {runtime.name: [] for runtime in runtimes}
        log("bench: warm-up container in each runtime")
        for runtime in runtimes:
            measure_run(runtime, f"cbwarm{runtime.name}", 1)
        for number in range(1, arguments.runs + 1):
            for runtime in runtimes:
                results[runtime.name].append(
                    measure_run(runtime, f"cb{number}{runtime.name}", arguments.execs))
            log(f"bench: run {number}/{arguments.runs}: " + ", ".join(
                f"{name} {runs[-1]['to_init_ms']:.0f}/{runs[-1]['exec_ms']:.1f}/"
                f"{runs[-1]['stop_ms']:.0f} ms" for name, runs in results.items()))
        for number in range(1, arguments.clean_stops + 1):
            for runtime in runtimes:
                clean_stops[runtime.name].append(
                    measure_clean_stop(runtime, f"cbclean{number}{runtime.name}"))
            log(f"bench: clean stop {number}/{arguments.clean_stops}")
        lxd_daemon = next((runtime.daemon_memory() for runtime in runtimes
                           if isinstance(runtime, Lxd)), None)
        if lxd_daemon:
            extras["lines"].append(f"  the LXD daemon itself (shared by all its containers): "
                                   f"RSS {lxd_daemon['rss_kib'] / 1024:.1f} MiB, "
                                   f"PSS {lxd_daemon['pss_kib'] / 1024:.1f} MiB")
    finally:
        for runtime in runtimes:
            runtime.teardown()
        unmount_under(scratch)
        shutil.rmtree(scratch, ignore_errors=True)

    summaries = {}
    for runtime in runtimes:
        runs = results[runtime.name]
        summary = {key: summarize([run[key] for run in runs]) for key, _, _ in METRICS
                   if key != "clean_stop_ms"}
        for key in ("monitor_pss_mib", "monitor_rss_at_start_mib", "monitor_pss_at_start_mib"):
            summary[key] = summarize([run[key] for run in runs])
        summary["clean_stop_ms"] = summarize(clean_stops[runtime.name])
        summaries[runtime.name] = summary
    ratios = {}
    if "cove" in summaries:
        for name, summary in summaries.items():
            if name == "cove":
                continue
            ratios[name] = {}
            for key, _, _ in METRICS:
                ours, theirs = summaries["cove"].get(key), summary.get(key)
                ratios[name][key] = (theirs["median"] / ours["median"]
                                     if ours and theirs and ours["median"] else None)
    print_report(host, arguments, runtimes, summaries, extras, skipped, ratios)
    report = {
        "benchmark": "containers",
        "host": host,
        "image": str(IMAGE),
        "runs": arguments.runs,
        "execs_per_run": arguments.execs,
        "goals": GOALS,
        "issue_lxd": ISSUE_LXD,
        "runtimes": {
            runtime.name: {
                "version": runtime.version,
                "notes": runtime.notes,
                "summary": summaries[runtime.name],
                "runs": results[runtime.name],
                "clean_stops_ms": clean_stops[runtime.name],
            }
            for runtime in runtimes
        },
        "ratios_to_cove": ratios,
        "skipped": skipped,
    }
    json_path = Path(arguments.json) if arguments.json else DEFAULT_JSON
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(f"JSON: {json_path}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--runs", type=int, default=10,
                        help="containers per runtime (default 10)")
    parser.add_argument("--execs", type=int, default=10,
                        help="timed `exec true` per container (default 10)")
    parser.add_argument("--clean-stops", type=int, default=3,
                        help="further containers per runtime stopped cleanly (default 3)")
    parser.add_argument("--only", default=",".join(RUNTIMES),
                        help="comma-separated runtimes to measure (default cove,lxd,runc)")
    parser.add_argument("--json", help=f"where to write the JSON report (default {DEFAULT_JSON})")
