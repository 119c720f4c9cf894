"""`tools/bench api`: coved's LXD-compatible API against Debian's real LXD.

    tools/bench api [--runs N] [--instances N] [--seconds S] [--clients N] [--only cove,lxd]
                    [--snapshot-runs N] [--vm auto|on|off] [--json PATH]

The same client, Debian's `lxc` (5.0.2), drives both daemons on the same busybox image
(imported by both as the same metadata and rootfs tarballs):

  launch ms      `lxc launch IMAGE NAME` wall time: create + start, returns once running
  first exec ms  from the start of `lxc launch` to the end of the first `lxc exec NAME -- true`

N runs each, interleaved cove/LXD so machine noise hits both alike, each container deleted
after its run. Snapshots, on a `dir` pool and on a `btrfs` pool (a 4 GiB loop file each
daemon makes with `lxc storage create`), on a running container holding 32 MiB of its own
files (--snapshot-runs, default 5, interleaved):

  snapshot ms    `lxc snapshot NAME SNAP` wall time
  restore ms     `lxc restore NAME SNAP` wall time (the running container is stopped,
                 restored and started again, by both daemons)

VMs (--vm; `auto`, the default, measures them where the host has hardware virtualisation):
`cove launch IMAGE NAME --vm` to the guest agent ready (the launch returns once the agent has
announced itself), with the project kernel; `on` measures on kvm-pvm too (with
boot.allow_emulated_kvm=true, minutes of emulated boot). Debian's LXD cannot start VMs on
this host at all (it needs the host's vhost_vsock module); cove's userspace vsock needs none. Then, on coved only (LXD at 100 containers is beyond a 2-core machine's
patience), with --instances running containers (default 100, launched through the API):

  requests/s     GET /1.0/instances?recursion=1, --clients keep-alive connections for
                 --seconds, counted responses per second (every one checked for 200)
  RSS            coved's resident set (VmRSS) idle (right after it started, no instance) and
                 with the instances running

coved and cove-shim are release builds of this tree; coved runs on a scratch COVE_DIR with
its own cgroup parent and is stopped (its containers deleted) at the end. LXD runs as the
`containers` benchmark sets it up (lxcfs, `lxd --group root` on a scratch LXD_DIR, `lxd init
--preseed` with a dir pool); when it cannot run here the reason is printed and only cove is
measured. Python standard library only.
"""

import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from bench_setup import REPOSITORY, BenchError, ensure_program, log, run_setup_command

import containers_benchmark

DEFAULT_JSON = REPOSITORY / "target" / "bench" / "api.json"
COVED = REPOSITORY / "target" / "release" / "coved"
COVE_SHIM = REPOSITORY / "target" / "release" / "cove-shim"
IMAGE_ALIAS = containers_benchmark.IMAGE_ALIAS
CGROUP_PARENT = "cove-bench-api"
COMMAND_TIMEOUT_SECONDS = 180.0


def add_arguments(parser) -> None:
    parser.add_argument("--runs", type=int, default=10,
                        help="launches per daemon (default 10)")
    parser.add_argument("--instances", type=int, default=100,
                        help="running instances for the requests/s and RSS figures (default 100)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long to send GET /1.0/instances?recursion=1 (default 5)")
    parser.add_argument("--clients", type=int, default=4,
                        help="concurrent keep-alive connections (default 4)")
    parser.add_argument("--only", default="cove,lxd",
                        help="daemons to compare, from cove,lxd (default both)")
    parser.add_argument("--snapshot-runs", type=int, default=5,
                        help="snapshots and restores per daemon and pool (default 5)")
    parser.add_argument("--vm", choices=["auto", "on", "off"], default="auto",
                        help="measure `cove launch --vm` (auto: where the host has VT-x/AMD-V)")
    parser.add_argument("--json", help=f"where to write the JSON report (default {DEFAULT_JSON})")


class UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 with keep-alive over a Unix socket."""

    def __init__(self, path: str):
        super().__init__("cove", timeout=120)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(120)
        self.sock.connect(self.socket_path)


def request(path: str, method: str, url: str, body: Optional[dict] = None) -> dict:
    connection = UnixConnection(path)
    try:
        payload = json.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
        connection.request(method, url, body=payload, headers=headers)
        response = connection.getresponse()
        answer = json.loads(response.read() or b"{}")
        if response.status >= 400:
            raise BenchError(f"{method} {url}: {response.status} {answer.get('error')}")
        return answer
    finally:
        connection.close()


def wait_operation(path: str, answer: dict) -> dict:
    done = request(path, "GET", f"{answer['operation']}/wait?timeout=120")["metadata"]
    if done["status"] != "Success":
        raise BenchError(f"operation {done['description']} failed: {done['err']}")
    return done


def memory_kib(pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Coved:
    """coved on a scratch COVE_DIR, driven by `lxc` through LXD_DIR."""

    name = "cove"

    def __init__(self, scratch: Path):
        self.scratch = scratch / "cove"
        self.directory = self.scratch / "dir"
        self.directory.mkdir(parents=True)
        self.environment = dict(os.environ, LXD_DIR=str(self.directory),
                                HOME=str(self.scratch / "home"))
        self.daemon: Optional[subprocess.Popen] = None
        self.version = "coved (this tree, release build)"

    @property
    def socket(self) -> str:
        return str(self.directory / "unix.socket")

    def setup(self, image: Path) -> None:
        run_setup_command(["cargo", "build", "--release", "-p", "cove-supervisor", "--bin",
                           "coved", "-p", "cove-shim", "--bin", "cove-shim"],
                          "building coved and cove-shim")
        log_file = open(self.scratch / "coved.log", "w")
        self.daemon = subprocess.Popen(
            [str(COVED), "--dir", str(self.directory), "--cgroup-parent", CGROUP_PARENT,
             "--shim", str(COVE_SHIM), "--default-network", "none"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.connect(self.socket)
                probe.close()
                break
            except OSError:
                if self.daemon.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("coved did not start:\n"
                                     + (self.scratch / "coved.log").read_text()[-2000:])
                time.sleep(0.02)
        time.sleep(0.5)
        self.idle_rss_kib = memory_kib(self.daemon.pid)
        import_image(self.scratch, image, self.environment)

    def lxc(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        return lxc(self.environment, *arguments, check=check)

    def teardown(self) -> None:
        if self.daemon is None or self.daemon.poll() is not None:
            return
        try:
            listed = request(self.socket, "GET", "/1.0/instances?recursion=1")["metadata"]
        except (BenchError, OSError) as error:
            log(f"bench: cannot list coved's instances: {error}")
            listed = []
        for instance in listed:
            url = f"/1.0/instances/{instance['name']}"
            try:
                if instance["status"] != "Stopped":
                    wait_operation(self.socket, request(self.socket, "PUT", f"{url}/state",
                                                        {"action": "stop", "force": True}))
                wait_operation(self.socket, request(self.socket, "DELETE", url))
            except (BenchError, OSError) as error:
                log(f"bench: cannot delete {instance['name']}: {error}")
        os.killpg(self.daemon.pid, signal.SIGTERM)
        self.daemon.wait(timeout=30)
        for mount in containers_benchmark.cgroup_mounts():
            try:
                (mount / CGROUP_PARENT).rmdir()
            except OSError:
                pass
        subprocess.run(["rm", "-rf", str(self.directory)], check=False)


class Lxd(containers_benchmark.Lxd):
    """Debian's LXD as the containers benchmark sets it up (with the same image)."""

    def lxc(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        return lxc(self.environment, *arguments, check=check)


def lxc(environment: dict, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["lxc", *arguments], env=environment, capture_output=True,
                            text=True, timeout=COMMAND_TIMEOUT_SECONDS)
    if check and result.returncode != 0:
        raise BenchError(f"lxc {' '.join(arguments)} failed: {result.stderr.strip()}")
    return result


def import_image(scratch: Path, image: Path, environment: dict) -> None:
    """The busybox image as metadata and rootfs tarballs, as the LXD side imports it."""
    metadata = scratch / "metadata.yaml"
    metadata.write_text(f"architecture: {os.uname().machine}\ncreation_date: {int(time.time())}"
                        "\nproperties:\n  description: cove bench busybox\n  os: busybox\n")
    metadata_tarball = scratch / "metadata.tar.gz"
    rootfs_tarball = scratch / "rootfs.tar.gz"
    with tarfile.open(metadata_tarball, "w:gz") as archive:
        archive.add(metadata, arcname="metadata.yaml")
    with tarfile.open(rootfs_tarball, "w:gz") as archive:
        archive.add(image, arcname=".")
    lxc(environment, "image", "import", str(metadata_tarball), str(rootfs_tarball),
        "--alias", IMAGE_ALIAS)


def measure_launch(daemon, container: str) -> dict:
    start = time.monotonic()
    daemon.lxc("launch", IMAGE_ALIAS, container)
    launched = time.monotonic()
    daemon.lxc("exec", container, "--", "true")
    executed = time.monotonic()
    daemon.lxc("delete", "--force", container)
    return {"launch_ms": (launched - start) * 1000, "first_exec_ms": (executed - start) * 1000}


SNAPSHOT_POOLS = ("dir", "btrfs")


def prepare_snapshot_pools(daemon) -> dict:
    """A container per pool driver, each holding 32 MiB of its own files; returns
    {driver: container}."""
    containers = {}
    for driver in SNAPSHOT_POOLS:
        pool = f"bench{driver}"
        if driver == "dir":
            daemon.lxc("storage", "create", pool, "dir")
        else:
            daemon.lxc("storage", "create", pool, "btrfs", "size=4GiB")
        container = f"snap{driver}"
        daemon.lxc("launch", IMAGE_ALIAS, container, "-s", pool)
        daemon.lxc("exec", container, "--", "sh", "-c",
                   "mkdir -p /data && for i in 1 2 3 4 5 6 7 8; do "
                   "head -c 4194304 /dev/urandom > /data/file$i; done")
        containers[driver] = container
    return containers


def measure_snapshot(daemon, container: str, run: int) -> dict:
    snapshot = f"s{run}"
    start = time.monotonic()
    daemon.lxc("snapshot", container, snapshot)
    taken = time.monotonic()
    daemon.lxc("exec", container, "--", "sh", "-c", "rm -f /data/file1; echo changed > /data/x")
    restore_start = time.monotonic()
    daemon.lxc("restore", container, snapshot)
    restored = time.monotonic()
    return {"snapshot_ms": (taken - start) * 1000, "restore_ms": (restored - restore_start) * 1000}


def remove_snapshot_pools(daemon, containers: dict) -> None:
    for driver, container in containers.items():
        daemon.lxc("delete", "--force", container, check=False)
        daemon.lxc("storage", "delete", f"bench{driver}", check=False)


def host_is_kvm_pvm() -> bool:
    if Path("/sys/module/kvm_pvm").exists():
        return True
    flags = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = line
            break
    return " vmx" not in flags and " svm" not in flags


def measure_vm_launch(cove, runs: int, emulated: bool) -> list:
    """`cove launch IMAGE NAME --vm` to agent ready, `runs` times."""
    run_setup_command(["cargo", "build", "--release", "-p", "cove-supervisor", "--bin", "cove",
                       "-p", "cove-vmm", "--bin", "cove-vmm"], "building cove and cove-vmm")
    run_setup_command([str(REPOSITORY / "guest-agent" / "build")], "building cove-agent")
    run_setup_command([str(REPOSITORY / "resources" / "build-kernel")],
                      "building the guest kernel (once per machine)")
    cove_cli = REPOSITORY / "target" / "release" / "cove"
    times = []
    for run in range(runs):
        name = f"benchvm{run}"
        command = [str(cove_cli), "--dir", str(cove.directory), "launch", IMAGE_ALIAS, name,
                   "--vm", "-c", "limits.memory=512MiB"]
        if emulated:
            command += ["-c", "boot.allow_emulated_kvm=true"]
        start = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        ready = time.monotonic()
        if result.returncode != 0:
            raise BenchError(f"cove launch --vm failed: {result.stderr.strip()}")
        times.append((ready - start) * 1000)
        subprocess.run([str(cove_cli), "--dir", str(cove.directory), "delete", "--force", name],
                       capture_output=True, timeout=300)
    return times


def launch_many(path: str, count: int) -> float:
    """Creates and starts `count` instances through the API, 8 at a time; returns seconds."""
    start = time.monotonic()
    names = [f"api{index:03d}" for index in range(count)]
    errors = []

    def worker(chunk: list) -> None:
        for name in chunk:
            try:
                answer = request(path, "POST", "/1.0/instances", {
                    "name": name, "start": True,
                    "source": {"type": "image", "alias": IMAGE_ALIAS}})
                wait_operation(path, answer)
            except (BenchError, OSError) as error:
                errors.append(f"{name}: {error}")

    threads = [threading.Thread(target=worker, args=(names[index::8],)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError("launching the instances failed: " + "; ".join(errors[:3]))
    return time.monotonic() - start


def requests_per_second(path: str, seconds: float, clients: int) -> dict:
    counts = [0] * clients
    failures = []
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        connection = UnixConnection(path)
        try:
            while time.monotonic() < deadline:
                connection.request("GET", "/1.0/instances?recursion=1")
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    failures.append(f"{response.status}: {body[:200]!r}")
                    return
                counts[index] += 1
        except OSError as error:
            failures.append(str(error))
        finally:
            connection.close()

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    if failures:
        raise BenchError("GET /1.0/instances?recursion=1 failed: " + failures[0])
    return {"requests": sum(counts), "seconds": elapsed,
            "per_second": sum(counts) / elapsed, "clients": clients}


def summarize(values: list) -> Optional[dict]:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "runs": len(values)}


def api_benchmark(arguments) -> int:
    only = {name.strip() for name in arguments.only.split(",") if name.strip()}
    unknown = only - {"cove", "lxd"}
    if unknown or "cove" not in only:
        raise BenchError("--only takes cove or cove,lxd")
    if os.geteuid() != 0:
        raise BenchError("run as root: containers need namespaces, cgroups and mounts")
    ensure_program("lxc", "lxd-client")
    image = containers_benchmark.build_image()
    scratch = Path(tempfile.mkdtemp(prefix="cove-bench-api-"))
    # An unprivileged container's root (a mapped uid) must be able to reach its snapshot.
    scratch.chmod(0o755)
    daemons = []
    skipped = {}
    report = {"runs": arguments.runs, "daemons": {}, "skipped": skipped}
    try:
        cove = Coved(scratch)
        cove.setup(image)
        daemons.append(cove)
        if "lxd" in only:
            lxd = Lxd(scratch)
            try:
                lxd.setup()
                daemons.append(lxd)
            except containers_benchmark.LxdUnavailable as error:
                skipped["lxd"] = str(error)
                log(f"bench: LXD cannot run here: {error}")
                lxd.teardown()
        results = {daemon.name: [] for daemon in daemons}
        for warm_up in daemons:
            measure_launch(warm_up, "warmup")
        for run in range(arguments.runs):
            for daemon in daemons:
                results[daemon.name].append(measure_launch(daemon, f"bench{run}"))
        for daemon in daemons:
            report["daemons"][daemon.name] = {
                "version": daemon.version,
                "launch_ms": summarize([r["launch_ms"] for r in results[daemon.name]]),
                "first_exec_ms": summarize([r["first_exec_ms"] for r in results[daemon.name]]),
            }
        snapshot_containers = {}
        for daemon in daemons:
            snapshot_containers[daemon.name] = prepare_snapshot_pools(daemon)
        snapshot_results = {daemon.name: {driver: [] for driver in SNAPSHOT_POOLS}
                            for daemon in daemons}
        for run in range(arguments.snapshot_runs):
            for driver in SNAPSHOT_POOLS:
                for daemon in daemons:
                    container = snapshot_containers[daemon.name][driver]
                    snapshot_results[daemon.name][driver].append(
                        measure_snapshot(daemon, container, run))
        for daemon in daemons:
            remove_snapshot_pools(daemon, snapshot_containers.pop(daemon.name))
            report["daemons"][daemon.name]["snapshots"] = {
                driver: {
                    "snapshot_ms": summarize([r["snapshot_ms"] for r in runs]),
                    "restore_ms": summarize([r["restore_ms"] for r in runs]),
                }
                for driver, runs in snapshot_results[daemon.name].items()
            }
        emulated = host_is_kvm_pvm()
        if arguments.vm == "on" or (arguments.vm == "auto" and not emulated):
            log("bench: cove launch --vm to agent ready")
            vm_times = measure_vm_launch(cove, min(arguments.runs, 3), emulated)
            report["daemons"]["cove"]["vm_launch_ms"] = summarize(vm_times)
            report["daemons"]["cove"]["vm_host"] = "kvm-pvm (emulated)" if emulated else "hardware"
        else:
            skipped["cove --vm"] = ("this host's /dev/kvm is kvm-pvm (software): Linux guests boot "
                                    "under emulation; run with --vm on to measure anyway")
        log(f"bench: launching {arguments.instances} instances on coved")
        launch_seconds = launch_many(cove.socket, arguments.instances)
        listed = request(cove.socket, "GET", "/1.0/instances?recursion=1")["metadata"]
        running = sum(1 for instance in listed if instance["status"] == "Running")
        if running != arguments.instances:
            raise BenchError(f"{running} of {arguments.instances} instances are running")
        rps = requests_per_second(cove.socket, arguments.seconds, arguments.clients)
        loaded_rss = memory_kib(cove.daemon.pid)
        report["daemons"]["cove"].update({
            "instances": arguments.instances,
            "launch_all_seconds": launch_seconds,
            "list_recursion_1": rps,
            "rss_idle_mib": (cove.idle_rss_kib or 0) / 1024,
            "rss_loaded_mib": (loaded_rss or 0) / 1024,
        })
    finally:
        for daemon in reversed(daemons):
            daemon.teardown()
        subprocess.run(["rm", "-rf", str(scratch)], check=False)

    print()
    print(f"API benchmark: lxc launch of a busybox image, {arguments.runs} runs per daemon "
          "(min / median / max)")
    for name, figures in report["daemons"].items():
        launch, first = figures["launch_ms"], figures["first_exec_ms"]
        print(f"  {name:5} launch {launch['min']:7.1f} / {launch['median']:7.1f} / "
              f"{launch['max']:7.1f} ms   first exec {first['min']:7.1f} / "
              f"{first['median']:7.1f} / {first['max']:7.1f} ms   ({figures['version']})")
    if "lxd" in report["daemons"]:
        ratio = (report["daemons"]["lxd"]["launch_ms"]["median"]
                 / report["daemons"]["cove"]["launch_ms"]["median"])
        print(f"  LXD's median launch / cove's: {ratio:.1f}x")
    print(f"Snapshots of a running container with 32 MiB of its own files, "
          f"{arguments.snapshot_runs} runs (median ms):")
    for driver in SNAPSHOT_POOLS:
        line = f"  {driver:5}"
        for name, figures in report["daemons"].items():
            snapshot = figures.get("snapshots", {}).get(driver)
            if snapshot:
                line += (f"   {name}: snapshot {snapshot['snapshot_ms']['median']:7.1f}"
                         f" restore {snapshot['restore_ms']['median']:7.1f}")
        if "lxd" in report["daemons"]:
            cove_s = report["daemons"]["cove"]["snapshots"][driver]
            lxd_s = report["daemons"]["lxd"]["snapshots"][driver]
            line += (f"   LXD/cove: snapshot "
                     f"{lxd_s['snapshot_ms']['median'] / cove_s['snapshot_ms']['median']:.1f}x"
                     f" restore {lxd_s['restore_ms']['median'] / cove_s['restore_ms']['median']:.1f}x")
        print(line)
    vm = report["daemons"]["cove"].get("vm_launch_ms")
    if vm:
        print(f"  cove launch --vm to agent ready ({report['daemons']['cove']['vm_host']}): "
              f"{vm['min']:.0f} / {vm['median']:.0f} / {vm['max']:.0f} ms")
    for name, reason in skipped.items():
        print(f"  {name}: not measured: {reason.splitlines()[0]}")
    cove_figures = report["daemons"]["cove"]
    rps = cove_figures["list_recursion_1"]
    print(f"coved with {arguments.instances} running instances (launched through the API in "
          f"{cove_figures['launch_all_seconds']:.1f} s):")
    print(f"  GET /1.0/instances?recursion=1: {rps['per_second']:.0f} requests/s "
          f"({rps['requests']} in {rps['seconds']:.1f} s, {rps['clients']} connections)")
    print(f"  coved RSS: {cove_figures['rss_idle_mib']:.1f} MiB idle, "
          f"{cove_figures['rss_loaded_mib']:.1f} MiB with {arguments.instances} instances")
    json_path = Path(arguments.json) if arguments.json else DEFAULT_JSON
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"JSON: {json_path}")
    return 0
