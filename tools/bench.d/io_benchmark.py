"""`tools/bench io`: virtio-blk and virtio-net throughput of cove-vmm beside QEMU's microvm
machine (and Firecracker when its binary is on PATH), measured with the same guest drivers.

    tools/bench io [--seconds N] [--runs N] [--cases LIST] [--cache writeback,none]
                   [--guest-driver poll|interrupt] [--json PATH] [--guest PATH]

The guest is cove's bare-metal test guest (tests/guest) in its benchmark mode
(`bench=<case>`, see tests/guest/src/virtio/bench/mod.rs): it drives one device as hard as its
driver can for --seconds, with as many requests in flight as the device's queue holds (85
block requests of three descriptors, or 256 frames, in a queue of 256), and prints
`bench: start` and `bench: end requests=N bytes=N ...`. The figures:

  requests/s, MiB/s   requests (frames) and payload bytes the guest counted between its
                      start and end lines, divided by the time between those two lines
                      arriving on the VMM's console, read off this host's monotonic clock.
                      The guest has no calibrated clock; it only decides roughly when to
                      stop, and every request it counts was submitted after the start line
                      and completed before the end line.
  CPU us/req          time on a CPU (from /proc/<pid>/task/*/schedstat) of the VMM's threads
                      other than its vCPU threads over the same interval, per request: what
                      the device path costs the host, beside what it delivers. The JSON also
                      has the time those threads waited runnable for a CPU, which on a
                      loaded host is often what limits a single-threaded device loop.

Block payload is data bytes; network payload is Ethernet frames without the virtio-net
header. Each case runs --runs times on every VMM, the VMMs alternating (the first VMM
alternates too), and the report gives medians (min and max in the JSON); the ratio is cove-vmm's
median requests/s over the peer's, so above 1 means cove-vmm moved more.

The cases: sequential 64 KiB and random 4 KiB reads and writes on a raw image of 1 GiB in
target/bench/ (the same file for every VMM), once through the host's page cache (cove-vmm's
default, QEMU cache=writeback; the whole image is read into the page cache before each such
case) and once around it (cove-vmm direct=on, QEMU cache=none); and UDP frames of 1514 and
60 bytes, transmitted and received.

The network cases run in a network namespace of their own (made and removed here), on a
persistent tap `covebench0` with the host address 192.0.2.1/24 that every VMM attaches to by
name; the guest is 192.0.2.2. Nothing touches the host's own network. Transmit: the guest
sends datagrams to 192.0.2.1:9999, where a socket that never reads keeps the host from
answering with ICMP; the tap's own counters are kept beside the guest's. Receive: once the
guest has posted its buffers (`bench: ready`), tools/bench.d/udp_flood.c floods 192.0.2.2
with datagrams from inside the namespace until the guest's end line, offering more than any
VMM here delivers; the tap's drop counter shows the surplus.

The guest driver polls the used rings at CPL 3 by default (`--guest-driver poll`): on kvm-pvm
hosts every instruction a guest runs at CPL 0 is emulated (about a microsecond each) while
CPL 3 runs natively, so an interrupt-driven CPL 0 loop measures the emulator, not the VMM.
Polling keeps the vCPU busy (one host CPU) and makes no use of interrupts: the device path
measured is the VMM's notification handling, request processing and used-ring updates.
`--guest-driver interrupt` halts at CPL 0 until the device interrupts instead, as Linux
would; use it on hardware KVM.

Everything the VMMs are given is in the report; QEMU runs with its defaults otherwise (block
I/O on its thread pool, aio=threads; virtio-mmio with ioeventfd; vhost off, as asked).
"""

import json
import os
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bench_setup import (
    COVE_VMM, REPOSITORY, BenchError, build_c_helper, build_cove_vmm, build_guest,
    ensure_program, ensure_qemu, log, read_host_facts,
)

DEFAULT_JSON = REPOSITORY / "target" / "bench" / "io.json"
IMAGE = REPOSITORY / "target" / "bench" / "io-disk.img"
IMAGE_MIB = 1024
MEMORY_MIB = 256

NAMESPACE_PREFIX = "cove-bench-io"
TAP = "covebench0"
HOST_ADDRESS = "192.0.2.1"
GUEST_ADDRESS = "192.0.2.2"
PREFIX_LENGTH = 24
HOST_MAC = "02:00:00:c0:7e:01"
GUEST_MAC = "52:54:00:c0:7e:02"
UDP_PORT = 9999
# Ethernet, IPv4 and UDP headers before a datagram's payload.
FRAME_OVERHEAD = 14 + 20 + 8

# Time a run may take beyond --seconds: boot, device setup and draining the queue.
RUN_SLACK_SECONDS = 60.0
# Threads of a VMM that run the guest rather than the device path.
VCPU_THREAD = re.compile(r"^(vcpu\d*|CPU \d+/KVM|fc_vcpu \d+)$")
END_LINE = re.compile(r"^bench: end ((?:[a-z-]+=\d+ ?)+)$")


# ---------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One measurement: a guest benchmark and the host side it needs."""

    guest_case: str
    size: int
    # Block cases: "writeback" (through the host's page cache) or "none" (O_DIRECT).
    cache: Optional[str] = None

    @property
    def name(self) -> str:
        size = f"{self.size // 1024}K" if self.size % 1024 == 0 else f"{self.size}B"
        cache = f" cache={self.cache}" if self.cache else ""
        return f"{self.guest_case} {size}{cache}"

    @property
    def is_net(self) -> bool:
        return self.guest_case.startswith("net-")

    @property
    def receives(self) -> bool:
        return self.guest_case == "net-rx"


def all_cases(caches: list) -> list:
    cases = []
    for cache in caches:
        cases += [
            Case("blk-seq-read", 64 * 1024, cache),
            Case("blk-seq-write", 64 * 1024, cache),
            Case("blk-rand-read", 4096, cache),
            Case("blk-rand-write", 4096, cache),
        ]
    cases += [
        Case("net-tx", 1514),
        Case("net-tx", 60),
        Case("net-rx", 1514),
        Case("net-rx", 60),
    ]
    return cases


def guest_command_line(case: Case, seconds: int, driver: str) -> str:
    words = [
        "exit=reset", f"bench={case.guest_case}", f"bench-seconds={seconds}",
        f"bench-size={case.size}", f"bench-driver={driver}",
    ]
    if case.is_net:
        words += [f"net-ip={GUEST_ADDRESS}", f"net-peer={HOST_ADDRESS}",
                  f"bench-peer-mac={HOST_MAC}"]
    return " ".join(words)


# ---------------------------------------------------------------------------------------
# The VMMs
# ---------------------------------------------------------------------------------------

@dataclass
class IoVmm:
    """A VMM and how it runs the guest with one device for a case."""

    name: str
    # (case, guest, guest command line, scratch directory) -> argv
    command: object
    # case -> why the VMM cannot run it, or None
    unsupported: object = lambda case: None
    notes: list = field(default_factory=list)


def cove_vmm() -> IoVmm:
    def command(case: Case, guest: Path, cmdline: str, scratch: Path) -> list:
        argv = [
            str(COVE_VMM), "--kernel", str(guest), "--cpus", "boot=1",
            "--memory", f"size={MEMORY_MIB}M", "--serial", "tty", "--cmdline", cmdline,
        ]
        if case.is_net:
            argv += ["--net", f"tap={TAP},mac={GUEST_MAC}"]
        else:
            direct = ",direct=on" if case.cache == "none" else ""
            argv += ["--disk", f"path={IMAGE}{direct}"]
        return argv

    return IoVmm(
        name="cove-vmm",
        command=command,
        notes=["cache=writeback: --disk path=IMAGE; cache=none: --disk path=IMAGE,direct=on"],
    )


def qemu_microvm(qemu: str) -> IoVmm:
    # acpi=off: only then does microvm announce its virtio-mmio devices on the kernel command
    # line (virtio_mmio.device=512@0xfeb00000+0x200*i:5+i, last transport first), and keeps
    # one IOAPIC; force-legacy=false: modern (version 2) virtio-mmio, which the guest drives.
    def command(case: Case, guest: Path, cmdline: str, scratch: Path) -> list:
        argv = [
            qemu,
            "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off",
            "-global", "virtio-mmio.force-legacy=false",
            "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-m", f"{MEMORY_MIB}M", "-smp", "1",
            "-kernel", str(guest), "-append", cmdline,
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-no-reboot",
            # Thread names ("CPU 0/KVM", "worker"), for telling vCPU time from the rest.
            "-name", "qemu-microvm,debug-threads=on",
        ]
        if case.is_net:
            argv += [
                "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}",
            ]
        else:
            argv += [
                "-drive", f"file={IMAGE},format=raw,if=none,id=d0,cache={case.cache}",
                "-device", "virtio-blk-device,drive=d0",
            ]
        return argv

    return IoVmm(
        name="qemu-microvm",
        command=command,
        notes=[
            "acpi=off so that microvm appends virtio_mmio.device= to the command line",
            "virtio-mmio.force-legacy=false: modern devices; block on QEMU's thread pool "
            "(aio=threads, its default); no i8042: the guest's reset ends in a triple "
            "fault, which -no-reboot turns into an exit",
        ],
    )


def firecracker(binary: str) -> IoVmm:
    # Not available on the development host: written from Firecracker's documented JSON
    # configuration and not run there. It appends virtio_mmio.device= itself.
    def command(case: Case, guest: Path, cmdline: str, scratch: Path) -> list:
        config = {
            "boot-source": {"kernel_image_path": str(guest), "boot_args": cmdline},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": MEMORY_MIB, "smt": False},
            "drives": [],
            "network-interfaces": [],
        }
        if case.is_net:
            config["network-interfaces"].append(
                {"iface_id": "n0", "host_dev_name": TAP, "guest_mac": GUEST_MAC})
        else:
            config["drives"].append({
                "drive_id": "d0", "path_on_host": str(IMAGE), "is_root_device": False,
                "is_read_only": False, "cache_type": "Unsafe",
            })
        path = scratch / f"firecracker-{case.guest_case}-{case.size}.json"
        path.write_text(json.dumps(config, indent=2))
        return [binary, "--no-api", "--config-file", str(path), "--level", "Warning"]

    return IoVmm(
        name="firecracker",
        command=command,
        unsupported=lambda case: "Firecracker has no O_DIRECT disks"
        if case.cache == "none" else None,
        notes=["block through the page cache (cache_type Unsafe: no flush is sent anyway)"],
    )


# ---------------------------------------------------------------------------------------
# The host side of the network cases
# ---------------------------------------------------------------------------------------

def run_quietly(argv: list, what: str) -> None:
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise BenchError(f"cannot {what}: {' '.join(argv)}: {result.stderr.strip()}")


class Namespace:
    """A network namespace with the tap every VMM attaches to, and the UDP sink."""

    def __init__(self, ip: str):
        self.ip = ip
        self.name = f"{NAMESPACE_PREFIX}-{os.getpid()}"
        self.sink: Optional[subprocess.Popen] = None

    def wrap(self, argv: list) -> list:
        return [self.ip, "netns", "exec", self.name, *argv]

    def remove_stale(self) -> None:
        """Deletes namespaces that runs of this benchmark which were killed left behind."""
        listing = subprocess.run([self.ip, "netns", "list"], capture_output=True, text=True)
        for line in listing.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            match = re.fullmatch(rf"{NAMESPACE_PREFIX}-(\d+)", name)
            if match and not Path(f"/proc/{match.group(1)}").exists():
                log(f"bench: deleting the stale network namespace {name}")
                subprocess.run([self.ip, "netns", "delete", name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> "Namespace":
        self.remove_stale()
        run_quietly([self.ip, "netns", "add", self.name], "create a network namespace")
        try:
            inside = [self.ip, "-n", self.name]
            run_quietly([*inside, "link", "set", "lo", "up"], "bring up lo")
            # No IPv6: its router and neighbour solicitations would reach the guest.
            run_quietly(self.wrap(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                                   "net.ipv6.conf.default.disable_ipv6=1"]),
                        "disable IPv6 in the namespace")
            run_quietly([*inside, "tuntap", "add", "dev", TAP, "mode", "tap"], "create the tap")
            run_quietly([*inside, "link", "set", "dev", TAP, "address", HOST_MAC],
                        "set the tap's MAC address")
            run_quietly([*inside, "address", "add", f"{HOST_ADDRESS}/{PREFIX_LENGTH}",
                         "dev", TAP], "give the tap its address")
            run_quietly([*inside, "link", "set", "dev", TAP, "up"], "bring the tap up")
            sink = ("import signal, socket\n"
                    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    f"s.bind(({HOST_ADDRESS!r}, {UDP_PORT}))\n"
                    "print('bound', flush=True)\n"
                    "signal.pause()\n")
            self.sink = subprocess.Popen(self.wrap(["python3", "-c", sink]),
                                         stdout=subprocess.PIPE, text=True)
            if self.sink.stdout.readline().strip() != "bound":
                raise BenchError("the UDP sink in the namespace did not start")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def refresh_neighbour(self) -> None:
        """The guest does not answer ARP while it benchmarks: its address is made static."""
        run_quietly([self.ip, "-n", self.name, "neigh", "replace", GUEST_ADDRESS, "lladdr",
                     GUEST_MAC, "dev", TAP, "nud", "permanent"], "add the guest's neighbour entry")

    def __exit__(self, *exception) -> None:
        if self.sink and self.sink.poll() is None:
            self.sink.terminate()
            self.sink.wait()
        subprocess.run([self.ip, "netns", "delete", self.name],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tap_counters(pid: int) -> Optional[dict]:
    """The tap's counters as the VMM's namespace sees them (/proc/<pid>/net/dev)."""
    try:
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, values = line.partition(":")
        if name.strip() == TAP:
            fields = [int(value) for value in values.split()]
            # Receive: from the VMM (the guest's transmit); transmit: toward the VMM.
            return {"from_vmm_frames": fields[1], "to_vmm_frames": fields[9],
                    "to_vmm_dropped": fields[11]}
    return None


def thread_times(pid: int) -> Optional[dict]:
    """Per thread: whether it is a vCPU thread, and the seconds it has run and waited runnable
    for a CPU (/proc/<pid>/task/*/schedstat: nanoseconds on the CPU and on the run queue)."""
    times = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            comm = (task / "comm").read_text().strip()
            running, waiting = (task / "schedstat").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        times[task.name] = (bool(VCPU_THREAD.match(comm)), int(running) / 1e9,
                            int(waiting) / 1e9)
    return times


def thread_difference(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    """Seconds on a CPU and waiting for one between two `thread_times`, summed over the vCPU
    threads and over the others. A thread that started in between counts whole (QEMU starts
    thread-pool workers on demand); one that ended in between is lost, which undercounts."""
    if before is None or after is None:
        return None
    sums = {"vcpu_cpu": 0.0, "vcpu_wait": 0.0, "other_cpu": 0.0, "other_wait": 0.0}
    for thread, (is_vcpu, running, waiting) in after.items():
        _, running_before, waiting_before = before.get(thread, (is_vcpu, 0.0, 0.0))
        kind = "vcpu" if is_vcpu else "other"
        sums[f"{kind}_cpu"] += running - running_before
        sums[f"{kind}_wait"] += waiting - waiting_before
    return {key: round(value, 6) for key, value in sums.items()}


def difference(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    if before is None or after is None:
        return None
    return {key: after[key] - before[key] for key in before}


# ---------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------

@dataclass
class IoResult:
    interval_s: float
    requests: int
    payload_bytes: int
    guest: dict
    # Seconds on the CPU and waiting for one, of the vCPU threads and of the others.
    threads_s: Optional[dict]
    tap: Optional[dict]
    flood: Optional[dict]

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.interval_s

    @property
    def mib_per_s(self) -> float:
        return self.payload_bytes / self.interval_s / (1 << 20)

    @property
    def vmm_cpu_us_per_request(self) -> Optional[float]:
        if not self.threads_s or not self.requests:
            return None
        return self.threads_s["other_cpu"] * 1e6 / self.requests

    def as_json(self) -> dict:
        return {
            "interval_s": round(self.interval_s, 6),
            "requests": self.requests,
            "payload_bytes": self.payload_bytes,
            "requests_per_s": round(self.requests_per_s, 1),
            "mib_per_s": round(self.mib_per_s, 2),
            "guest": self.guest,
            "guest_tsc_hz_implied": round(self.guest["tsc"] / self.interval_s),
            "threads_s": self.threads_s,
            "vmm_cpu_us_per_request": self.vmm_cpu_us_per_request,
            "tap": self.tap,
            "flood": self.flood,
        }


def tail(text: str, lines: int = 15) -> str:
    picked = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join("    | " + line for line in picked) if picked else "    | (nothing)"


def start_flood(namespace: Namespace, flooder: Path, case: Case) -> subprocess.Popen:
    payload = case.size - FRAME_OVERHEAD
    return subprocess.Popen(
        namespace.wrap([str(flooder), HOST_ADDRESS, GUEST_ADDRESS, str(UDP_PORT), str(payload)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def stop_flood(flood: Optional[subprocess.Popen]) -> Optional[dict]:
    if flood is None:
        return None
    if flood.poll() is None:
        flood.send_signal(signal.SIGTERM)
    try:
        output, errors = flood.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        flood.kill()
        output, errors = flood.communicate()
    fields = dict(item.split("=", 1) for item in output.split() if "=" in item)
    if flood.returncode != 0 or "sent" not in fields:
        raise BenchError(f"the UDP flood failed (status {flood.returncode}): {errors.strip()}")
    return {"sent": int(fields["sent"]), "refused": int(fields["refused"]),
            "seconds": float(fields["seconds"])}


def run_once(vmm: IoVmm, case: Case, guest: Path, scratch: Path, seconds: int, driver: str,
             namespace: Optional[Namespace], flooder: Path, label: str) -> IoResult:
    argv = vmm.command(case, guest, guest_command_line(case, seconds, driver), scratch)
    if case.is_net:
        namespace.refresh_neighbour()
        argv = namespace.wrap(argv)
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
    stdout = bytearray()
    stderr = bytearray()
    pending = b""
    start_at = end_at = None
    start_snapshot = end_snapshot = None
    end_fields = None
    flood = None
    flood_report = None
    began = time.monotonic()

    def fail(why: str) -> BenchError:
        return BenchError(
            f"{label}: {vmm.name} {why}\n  command: {' '.join(argv)}\n"
            f"  console (last lines):\n{tail(stdout.decode('utf-8', 'replace'))}\n"
            f"  stderr (last lines):\n{tail(stderr.decode('utf-8', 'replace'))}")

    def snapshot() -> dict:
        return {"threads": thread_times(process.pid), "tap": tap_counters(process.pid)}

    selector = selectors.DefaultSelector()
    selector.register(process.stdout.fileno(), selectors.EVENT_READ, stdout)
    selector.register(process.stderr.fileno(), selectors.EVENT_READ, stderr)
    try:
        while selector.get_map():
            if time.monotonic() - began > seconds + RUN_SLACK_SECONDS:
                raise fail(f"did not finish within {seconds + RUN_SLACK_SECONDS:.0f} s")
            for key, _ in selector.select(timeout=0.1):
                chunk = os.read(key.fd, 65536)
                now = time.monotonic()
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                key.data.extend(chunk)
                if key.data is not stdout:
                    continue
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    if line == "bench: ready" and case.receives:
                        flood = start_flood(namespace, flooder, case)
                    elif line == "bench: start":
                        start_at, start_snapshot = now, snapshot()
                    elif line.startswith("bench: end "):
                        end_at, end_snapshot = now, snapshot()
                        match = END_LINE.match(line)
                        if match:
                            end_fields = {name: int(value) for name, value in
                                          (item.split("=") for item in match.group(1).split())}
                        flood_report = stop_flood(flood)
                        flood = None
        status = process.wait(timeout=30)
    except BaseException:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise
    finally:
        selector.close()
        process.stdout.close()
        process.stderr.close()
        if flood is not None:
            flood.kill()
            flood.wait()

    console = stdout.decode("utf-8", "replace")
    if "error:" in console or "panic" in console:
        raise fail("the guest reported an error")
    if start_at is None or end_fields is None:
        raise fail(f"exited with status {status} without 'bench: start' and 'bench: end'")
    if status != 0:
        raise fail(f"exited with status {status}")
    threads = thread_difference(start_snapshot["threads"], end_snapshot["threads"])
    return IoResult(
        interval_s=end_at - start_at,
        requests=end_fields["requests"],
        payload_bytes=end_fields["bytes"],
        guest=end_fields,
        threads_s=threads,
        tap=difference(start_snapshot["tap"], end_snapshot["tap"]),
        flood=flood_report,
    )


# ---------------------------------------------------------------------------------------
# The disk image
# ---------------------------------------------------------------------------------------

def prepare_image() -> None:
    """A raw image of IMAGE_MIB MiB full of non-zero data, made once and kept."""
    size = IMAGE_MIB << 20
    if IMAGE.is_file() and IMAGE.stat().st_size == size:
        return
    log(f"bench: writing a {IMAGE_MIB} MiB disk image at {IMAGE}")
    IMAGE.parent.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(1 << 20)
    with open(IMAGE, "wb") as image:
        for _ in range(IMAGE_MIB):
            image.write(chunk)
        image.flush()
        os.fsync(image.fileno())


def load_image_into_page_cache() -> None:
    """Reads the whole image, so that cache=writeback cases start from a warm page cache
    whatever earlier cases did (O_DIRECT writes drop the cached pages they overwrite)."""
    with open(IMAGE, "rb", buffering=0) as image:
        buffer = bytearray(8 << 20)
        while image.readinto(buffer):
            pass


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------

def summarize(results: list) -> dict:
    def triple(values: list) -> Optional[dict]:
        values = [value for value in values if value is not None]
        if not values:
            return None
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    return {
        "requests_per_s": triple([result.requests_per_s for result in results]),
        "mib_per_s": triple([result.mib_per_s for result in results]),
        "vmm_cpu_us_per_request": triple([result.vmm_cpu_us_per_request
                                          for result in results]),
    }


def rate(value: float) -> str:
    if value >= 100_000:
        return f"{value / 1000:.0f}k"
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    return f"{value:.0f}"


def print_table(cases: list, vmms: list, summaries: dict, skipped_cases: dict) -> None:
    reference = vmms[0].name
    headers = ["case"]
    for vmm in vmms:
        headers += [f"{vmm.name} MiB/s", "req/s", "CPU us/req"]
    for vmm in vmms[1:]:
        headers.append(f"{reference}/{vmm.name}")
    rows = []
    for case in cases:
        row = [case.name]
        for vmm in vmms:
            summary = summaries.get((case.name, vmm.name))
            if summary is None:
                row += ["n/a", "", ""]
                continue
            cpu = summary["vmm_cpu_us_per_request"]
            row += [f"{summary['mib_per_s']['median']:.1f}",
                    rate(summary["requests_per_s"]["median"]),
                    f"{cpu['median']:.1f}" if cpu else "-"]
        for vmm in vmms[1:]:
            ours = summaries.get((case.name, reference))
            theirs = summaries.get((case.name, vmm.name))
            if ours and theirs:
                ratio = ours["requests_per_s"]["median"] / theirs["requests_per_s"]["median"]
                row.append(f"{ratio:.2f}")
            else:
                row.append("n/a")
        rows.append(row)
    widths = [max(len(row[column]) for row in rows + [headers]) for column in range(len(headers))]
    print("  ".join(header.ljust(width) for header, width in zip(headers, widths)).rstrip())
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for (case_name, vmm_name), why in skipped_cases.items():
        print(f"  {vmm_name} skipped {case_name}: {why}")


def print_report(host: dict, arguments, guest: Path, vmms: list, skipped: dict, cases: list,
                 summaries: dict, skipped_cases: dict, results: dict) -> None:
    print("cove io benchmark")
    print(f"  cpu:      {host['cpu_model']} ({host['cpus']} cpus)")
    print(f"  kernel:   {host['kernel']}")
    kvm = "kvm-pvm (software hypervisor: guest CPL 0 code is emulated)" \
        if host["kvm_pvm"] else "hardware KVM"
    print(f"  /dev/kvm: {kvm}")
    print(f"  qemu:     {host['qemu_version'] or 'not used'}")
    print(f"  cove-vmm: {host['cove_vmm_version']}")
    print(f"  load:     {' '.join(str(value) for value in host['load_average_at_start'])}")
    print(f"  guest:    {guest} (bench-driver={arguments.guest_driver}, "
          f"{arguments.seconds} s per run)")
    print(f"  runs:     {arguments.runs} per case and VMM, VMMs alternating; medians below")
    print(f"  disk:     {IMAGE} ({IMAGE_MIB} MiB raw)")
    for vmm in vmms:
        for note in vmm.notes:
            print(f"  {vmm.name}: {note}")
    for name, why in skipped.items():
        print(f"  {name}: skipped ({why})")
    print()
    print_table(cases, vmms, summaries, skipped_cases)
    print()
    print("MiB/s and req/s: payload and requests (frames) the guest counted between its start "
          "and end lines,")
    print("over the time between the lines' arrival on the console; CPU us/req: host CPU of "
          "the VMM's")
    print(f"non-vCPU threads per request; {vmms[0].name}/peer: ratio of the req/s medians "
          "(above 1: cove-vmm moved more).")
    flooded = [(case, vmm) for case in cases if case.receives for vmm in vmms
               if results.get((case.name, vmm.name))]
    if flooded:
        print()
        print("receive cases, host side (medians): offered by the flood / dropped at the tap, "
              "frames per second")
        for case, vmm in flooded:
            runs = results[(case.name, vmm.name)]
            offered = statistics.median(run.flood["sent"] / run.flood["seconds"]
                                        for run in runs if run.flood)
            dropped = statistics.median((run.tap or {}).get("to_vmm_dropped", 0) / run.interval_s
                                        for run in runs)
            print(f"  {case.name:<16} {vmm.name:<14} offered {rate(offered):>6}/s  "
                  f"dropped {rate(dropped):>6}/s")


# ---------------------------------------------------------------------------------------
# The io benchmark
# ---------------------------------------------------------------------------------------

def io_benchmark(arguments) -> int:
    if arguments.runs < 1 or arguments.seconds < 1:
        raise BenchError("--runs and --seconds must be at least 1")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise BenchError("/dev/kvm is missing or not accessible; the benchmark needs KVM")
    if os.geteuid() != 0:
        raise BenchError("tools/bench io needs root: it makes a network namespace and a tap")
    caches = [cache.strip() for cache in arguments.cache.split(",") if cache.strip()]
    if not caches or any(cache not in ("writeback", "none") for cache in caches):
        raise BenchError("--cache takes writeback, none or both separated by a comma")
    cases = all_cases(caches)
    if arguments.cases:
        wanted = [word.strip() for word in arguments.cases.split(",") if word.strip()]
        cases = [case for case in cases if any(word in case.name for word in wanted)]
        if not cases:
            raise BenchError(f"--cases {arguments.cases!r} matches none of the cases")

    qemu = ensure_qemu()
    ip = ensure_program("ip", "iproute2")
    flooder = build_c_helper("udp_flood")
    build_cove_vmm()
    if arguments.guest:
        guest = Path(arguments.guest).resolve()
        if not guest.is_file():
            raise BenchError(f"--guest {guest}: no such file")
    else:
        guest = build_guest()
    if any(not case.is_net for case in cases):
        prepare_image()

    vmms = [cove_vmm(), qemu_microvm(qemu)]
    skipped = {}
    found = shutil.which("firecracker")
    if found:
        vmms.append(firecracker(found))
    else:
        skipped["firecracker"] = "no firecracker on PATH"
    skipped["cloud-hypervisor"] = (
        "its x86_64 virtio devices are PCI only, and the test guest drives virtio-mmio"
        + ("" if shutil.which("cloud-hypervisor") else "; not on PATH either"))

    host = read_host_facts(qemu)
    scratch = REPOSITORY / "target" / "bench" / "io-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    results = {}
    skipped_cases = {}
    namespace = Namespace(ip) if any(case.is_net for case in cases) else None
    if namespace:
        namespace.__enter__()
    try:
        for case in cases:
            if case.cache == "writeback":
                load_image_into_page_cache()
            for run in range(arguments.runs):
                # The VMMs alternate, and so does which goes first.
                order = vmms if run % 2 == 0 else list(reversed(vmms))
                figures = []
                for vmm in order:
                    why = vmm.unsupported(case)
                    if why:
                        skipped_cases[(case.name, vmm.name)] = why
                        continue
                    label = f"{case.name} run {run + 1}/{arguments.runs}"
                    result = run_once(vmm, case, guest, scratch, arguments.seconds,
                                      arguments.guest_driver, namespace, flooder, label)
                    results.setdefault((case.name, vmm.name), []).append(result)
                    figures.append(f"{vmm.name} {rate(result.requests_per_s)} req/s "
                                   f"{result.mib_per_s:.1f} MiB/s")
                log(f"bench: {case.name} run {run + 1}/{arguments.runs}: " + ", ".join(figures))
    finally:
        if namespace:
            namespace.__exit__(None, None, None)

    summaries = {key: summarize(runs) for key, runs in results.items()}
    print_report(host, arguments, guest, vmms, skipped, cases, summaries, skipped_cases, results)

    report = {
        "benchmark": "io",
        "host": host,
        "guest": str(guest),
        "guest_driver": arguments.guest_driver,
        "seconds_per_run": arguments.seconds,
        "runs_per_case": arguments.runs,
        "image": {"path": str(IMAGE), "mib": IMAGE_MIB},
        "vmms": {vmm.name: {"notes": vmm.notes} for vmm in vmms},
        "skipped": skipped,
        "cases": [
            {
                "case": case.name,
                "guest_command_line": guest_command_line(case, arguments.seconds,
                                                         arguments.guest_driver),
                "vmms": {
                    vmm.name: {
                        "command": vmm.command(case, guest, guest_command_line(
                            case, arguments.seconds, arguments.guest_driver), scratch),
                        "summary": summaries.get((case.name, vmm.name)),
                        "runs": [result.as_json()
                                 for result in results.get((case.name, vmm.name), [])],
                        "skipped": skipped_cases.get((case.name, vmm.name)),
                    }
                    for vmm in vmms
                },
            }
            for case in cases
        ],
    }
    json_path = Path(arguments.json) if arguments.json else DEFAULT_JSON
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(f"JSON: {json_path}")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--seconds", type=int, default=5,
                        help="length of each run's measured interval (default 5)")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs per case and VMM (default 3)")
    parser.add_argument("--cases", help="comma-separated words; run only the cases whose name "
                        "contains one (e.g. blk-seq,net-rx)")
    parser.add_argument("--cache", default="writeback,none",
                        help="block cases through the page cache (writeback), around it "
                        "(none), or both (default writeback,none)")
    parser.add_argument("--guest-driver", choices=["poll", "interrupt"], default="poll",
                        help="the guest polls at CPL 3 (default) or halts for interrupts")
    parser.add_argument("--json", help=f"where to write the JSON report (default {DEFAULT_JSON})")
    parser.add_argument("--guest", help="the guest ELF to boot (default: build tests/guest)")
