"""Setting up for tools/bench's benchmarks: the builds (cove-vmm, the test guest, the small C
helpers in tools/bench.d), Debian packages that are missing, and the facts about the host
that every report starts with. Shared by `boot` (tools/bench) and `io` (io_benchmark.py);
nothing here runs a VMM.
"""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPOSITORY = Path(__file__).resolve().parent.parent.parent
COVE_VMM = REPOSITORY / "target" / "release" / "cove-vmm"
HELPERS = REPOSITORY / "tools" / "bench.d"
HELPER_BUILDS = REPOSITORY / "target" / "bench"


class BenchError(Exception):
    """A failure that ends the benchmark; the message says what went wrong."""


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


def run_setup_command(argv: list, what: str, capture: bool = False) -> str:
    """Runs a setup step with its output on stderr (or captured); raises on failure."""
    log(f"bench: {what}: {' '.join(argv)}")
    result = subprocess.run(
        argv,
        cwd=REPOSITORY,
        stdout=subprocess.PIPE if capture else sys.stderr,
        stderr=sys.stderr,
        text=True,
    )
    if result.returncode != 0:
        raise BenchError(f"{what} failed (exit status {result.returncode}): {' '.join(argv)}")
    return result.stdout if capture else ""


def ensure_program(program: str, package: str) -> str:
    """Returns the path of `program`, installing Debian's `package` with apt-get if needed."""
    found = shutil.which(program)
    if found:
        return found
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    log(f"bench: {program} not found; installing {package}")
    if subprocess.run(install, env=environment, stdout=sys.stderr).returncode != 0:
        log("bench: install failed; running apt-get update and trying again")
        subprocess.run(["apt-get", "update"], env=environment, stdout=sys.stderr)
        if subprocess.run(install, env=environment, stdout=sys.stderr).returncode != 0:
            raise BenchError(f"cannot install {package} with apt-get (are you root?)")
    found = shutil.which(program)
    if not found:
        raise BenchError(f"{package} is installed but {program} is not on PATH")
    return found


def ensure_qemu() -> str:
    """Returns the path of qemu-system-x86_64, installing Debian's package if needed."""
    return ensure_program("qemu-system-x86_64", "qemu-system-x86")


def build_cove_vmm() -> None:
    run_setup_command(["cargo", "build", "--release", "-p", "cove-vmm"], "building cove-vmm")
    if not COVE_VMM.is_file():
        raise BenchError(f"cargo built cove-vmm but {COVE_VMM} is missing")


def build_guest() -> Path:
    """Builds the test guest; tests/guest/build prints the ELF path as its last line."""
    output = run_setup_command(
        [str(REPOSITORY / "tests" / "guest" / "build")], "building the test guest", capture=True
    )
    lines = output.strip().splitlines()
    if not lines:
        raise BenchError("tests/guest/build printed no ELF path")
    return Path(lines[-1])


def build_c_helper(name: str, static: bool = False) -> Path:
    """Compiles tools/bench.d/<name>.c into target/bench/<name> unless it is up to date."""
    source = HELPERS / f"{name}.c"
    binary = HELPER_BUILDS / name
    if binary.is_file() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise BenchError(f"no C compiler (cc) to build {source}; "
                         "install gcc (apt-get install -y gcc)")
    for extra in (["-static"], []) if static else ([],):
        argv = [compiler, "-O2", *extra, "-o", str(binary), str(source)]
        if subprocess.run(argv, stdout=sys.stderr, stderr=sys.stderr).returncode == 0:
            return binary
    raise BenchError(f"cannot compile {source} with {compiler}")


def read_host_facts(qemu: Optional[str]) -> dict:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu_version = None
    if qemu:
        output = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
        qemu_version = output.splitlines()[0] if output else None
    cove_version = subprocess.run(
        [str(COVE_VMM), "--version"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "kvm_pvm": Path("/sys/module/kvm_pvm").exists(),
        "qemu_version": qemu_version,
        "cove_vmm_version": cove_version or None,
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }
