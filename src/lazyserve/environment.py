"""Facts about where this process runs, each decided here once: on Lambda or not, how it was
initialised, the CPUs it may use (and their time), the memory it may use and the memory it
holds."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Mapping

__all__ = [
    "cpu_capacity",
    "cpus",
    "initialization_type",
    "is_runtime_process",
    "memory_limit",
    "memory_limit_source",
    "on_lambda",
    "resident_bytes",
]

_MIB = 1024 * 1024
# cgroup v2, then v1: the limit a container runtime (or Lambda's sandbox) puts on this process.
# (Plain paths: the download helper asks too, and needs no pathlib.)
_CGROUP_LIMITS = (
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
)
_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a number near 2**63
_CPU_QUOTA = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>" or "max <period>"
# Lambda gives a function one vCPU's worth of CPU time at 1,769 MB, in proportion below and
# above (https://docs.aws.amazon.com/lambda/latest/dg/configuration-memory.html).
_LAMBDA_MB_PER_VCPU = 1769


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def on_lambda(environ: Mapping[str, str] | None = None) -> bool:
    """Inside an AWS Lambda execution environment (also `sam local` and the runtime emulator,
    which set the same variables)."""
    return "AWS_LAMBDA_FUNCTION_NAME" in _env(environ)


def is_runtime_process(
    argv: list[str] | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """This interpreter is the one that serves the function: Lambda's Python runtime, started as
    its image or managed runtime starts it, not an extension, a shell command or `pip` run in the
    same execution environment (they inherit AWS_LAMBDA_RUNTIME_API too). Told from the command
    line, which is public: container images run `python -m awslambdaric HANDLER` (the AWS base
    images' entry point and AWS's documented ENTRYPOINT for other images); managed runtimes
    run `$LAMBDA_RUNTIME_DIR/bootstrap.py`, possibly behind a wrapper script
    (AWS_LAMBDA_EXEC_WRAPPER)."""
    env = _env(environ)
    if "AWS_LAMBDA_RUNTIME_API" not in env:
        return False
    # sys.orig_argv: the whole command line, already there when .pth files run (sys.argv then
    # holds only ['-m'] or ['-c']).
    args = list(sys.orig_argv) if argv is None else argv
    if any(a == "-m" and b == "awslambdaric" for a, b in itertools.pairwise(args)):
        return True
    bootstrap = os.path.join(env.get("LAMBDA_RUNTIME_DIR") or "/var/runtime", "bootstrap.py")
    return bootstrap in args


def initialization_type(environ: Mapping[str, str] | None = None) -> str | None:
    """`on-demand`, `provisioned-concurrency` or `snap-start` on Lambda; None elsewhere."""
    return _env(environ).get("AWS_LAMBDA_INITIALIZATION_TYPE") or None


def cpus() -> int:
    """CPUs this process may run on: Lambda and containers restrict them, and
    os.cpu_count() reports the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def cpu_capacity(environ: Mapping[str, str] | None = None) -> float:
    """How many CPUs' worth of time this process may use: the fewest of the CPUs it may run on,
    its cgroup's CPU quota and, on Lambda, its memory size's share (Lambda may show two vCPUs
    to a function it gives one vCPU's worth of time)."""
    env = _env(environ)
    found = float(cpus())
    size = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "")
    if on_lambda(env) and size.isdigit():
        found = min(found, int(size) / _LAMBDA_MB_PER_VCPU)
    try:
        with open(_CPU_QUOTA, encoding="ascii") as file:
            quota, _, period = file.read().strip().partition(" ")
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            found = min(found, int(quota) / int(period))
    except OSError:
        pass
    return found


def memory_limit(environ: Mapping[str, str] | None = None) -> int | None:
    """Bytes this process may use: the function's memory on Lambda
    (AWS_LAMBDA_FUNCTION_MEMORY_SIZE, in MB), else the cgroup limit; None when unbounded."""
    size = _env(environ).get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "")
    if size.isdigit():
        return int(size) * _MIB
    for path in _CGROUP_LIMITS:
        try:
            with open(path, encoding="ascii") as file:
                text = file.read().strip()
        except (OSError, ValueError):
            continue
        if text.isdigit() and int(text) < _NO_LIMIT:
            return int(text)
        return None  # "max": this cgroup sets no limit
    return None


def memory_limit_source(environ: Mapping[str, str] | None = None) -> str:
    """Where memory_limit() found its number, for messages."""
    if _env(environ).get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "").isdigit():
        return "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"
    return "the cgroup memory limit"


def resident_bytes() -> int:
    """This process's resident set size (VmRSS), or 0 where /proc is not there."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
