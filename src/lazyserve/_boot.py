"""Run by `lazyserve.pth` when the interpreter starts: inside a Lambda execution environment
(AWS_LAMBDA_RUNTIME_API set), with LAZYSERVE_LOAD=background or eager (or under SnapStart) and
one `s3://` object as the model, start downloading the weights in a helper process before the
function module's first import, so the download overlaps `import torch` whatever order the
user's imports are in, without competing with it for this interpreter's GIL.

This process's share is a memfd, a pipe, a fork, and the import of the helper's code (stdlib
modules and lazyserve's sources, which the function imports anyway; no pydantic, torch or boto3,
and no thread exists yet). The child fetches into the memfd and reports one JSON line on the
pipe (`lazyserve.sources.helper`); the load takes it from there. Elsewhere the .pth line
imports nothing: it checks AWS_LAMBDA_RUNTIME_API before importing this module. An environment
variable turns it on, as coverage.py's `process_startup()` .pth hook does
(https://coverage.readthedocs.io/en/latest/subprocess.html).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

MARK = "_LAZYSERVE_HELPER"
"""Set (to the helper's pid) once a helper started: Python processes this one starts inherit it
and start none of their own."""

_started = False
failure: str | None = None
"""Why the helper could not start, for the app to log once logging is set up."""


class Helper:
    """A started helper: its pid, the pipe end its report arrives on, the memfd it fills."""

    __slots__ = ("memfd", "pid", "report", "uri")

    def __init__(self, pid: int, report: int, memfd: int, uri: str) -> None:
        self.pid = pid
        self.report = report
        self.memfd = memfd
        self.uri = uri


helper: Helper | None = None
"""The helper this interpreter started, until the load takes it."""


def wanted(environ: Mapping[str, str]) -> str | None:
    """The model URI a helper should download at interpreter start, or None."""
    if "AWS_LAMBDA_RUNTIME_API" not in environ or MARK in environ:
        return None
    uri = environ.get("LAZYSERVE_MODEL_URI", "").strip()
    if not uri.startswith("s3://") or uri.endswith("/"):
        return None  # a local file, a prefix of many models, or not ours to judge
    mode = environ.get("LAZYSERVE_LOAD", "").strip().lower()
    if mode in ("background", "eager"):
        return uri
    return uri if environ.get("AWS_LAMBDA_INITIALIZATION_TYPE") == "snap-start" else None


def start() -> None:
    global _started, failure, helper
    uri = wanted(os.environ)
    if _started or uri is None:
        return
    _started = True
    try:
        memfd = os.memfd_create("lazyserve-weights")  # close-on-exec by default
    except (AttributeError, OSError) as exc:  # not Linux, or refused by a sandbox
        failure = f"no memfd for the download helper ({exc})"
        return
    try:
        # The helper's code, imported before the fork rather than in the helper: the function
        # imports all of it anyway (lazyserve's sources; http.client, ssl, logging, json and
        # concurrent.futures come with the web stack and asyncio), so this process does no
        # extra work and the helper inherits it instead of importing it again. On one vCPU
        # that duplicated import cost ~0.05-0.1 s of CPU and delayed the first GET by ~0.12 s
        # (benchmarks/README.md). Nothing here starts a thread or imports pydantic or torch.
        import lazyserve.sources.helper  # noqa: F401
    except Exception as exc:
        os.close(memfd)
        failure = f"the download helper's code could not be imported ({exc!r})"
        return
    report, out = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in (memfd, report, out):
            os.close(fd)
        failure = f"the download helper could not be started ({exc})"
        return
    if pid == 0:
        _child(memfd, report, out, parent)
    os.close(out)  # the child holds the only write end: its death reads as end of file
    os.environ[MARK] = str(pid)
    helper = Helper(pid, report, memfd, uri)


def _child(memfd: int, report: int, out: int, parent: int) -> None:
    """The helper's whole life: it never returns into the interpreter's start-up."""
    try:
        os.close(report)
        # Nothing the helper does may reach the function's stdout/stderr (its log).
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        from lazyserve.sources.helper import child_main

        child_main(memfd, out, parent)
    finally:
        os._exit(0)


start()
