"""The download helper started with the interpreter (`lazyserve._boot`): the child's side (fetch
one S3 object into a memfd while the server imports torch, report one JSON line, exit) and the
server's side (wait for that line in the load thread, map the memfd: one copy of the weights)."""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lazyserve import _boot, errors
from lazyserve.errors import (
    LazyserveError,
    ModelChangedError,
    ModelFetchError,
    ModelFormatError,
    ModelIntegrityError,
    ModelTooLarge,
)
from lazyserve.sources.s3 import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE, S3Fetcher
from lazyserve.sources.s3client import S3Error
from lazyserve.sources.weights import Weights

if TYPE_CHECKING:
    from lazyserve.uris import ModelURI

__all__ = ["DEADLINE", "HelperDownload", "HelperFailed", "child_main", "discard", "take"]

log = logging.getLogger("lazyserve")

DEADLINE = 900
"""Seconds the helper may live (Lambda's longest timeout): whatever happens, it ends."""
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_lock = threading.Lock()


class HelperFailed(Exception):
    """The helper delivered nothing the load can use; the load downloads in its own process."""


# --- the server's side ------------------------------------------------------------------------


class HelperDownload:
    """The helper's download of one URI; `result()` waits for it in the calling thread."""

    def __init__(self, started: _boot.Helper) -> None:
        self.pid = started.pid
        self.uri = started.uri
        self._report = started.report
        self._memfd = started.memfd

    def result(self, timeout: float | None = None) -> Weights:
        """The weights, mapped from the helper's memfd; raises the helper's error when S3's
        answer settles it (retrying in this process would get the same), else HelperFailed."""
        try:
            # os.read() blocks without the GIL: the server's other threads run meanwhile.
            line = _read_line(self._report)
        finally:
            os.close(self._report)
            status = _reap(self.pid)
        try:
            return self._weights(line, status)
        finally:
            os.close(self._memfd)

    def _weights(self, line: bytes, status: str) -> Weights:
        try:
            report: dict[str, Any] = json.loads(line)
        except ValueError:
            raise HelperFailed(f"the download helper (pid {self.pid}) {status}") from None
        for note in report.get("warnings", []):
            log.warning("download helper: %s", note)
        if not report.get("ok"):
            name, message = str(report.get("error")), str(report.get("message"))
            kind = getattr(errors, name, None)
            if report.get("final") and isinstance(kind, type) and issubclass(kind, LazyserveError):
                raise kind(message)
            raise HelperFailed(f"{name}: {message}")
        size = int(report["size"])
        # Private and writable (copy-on-write, so torch.frombuffer has a writable buffer): the
        # pages are the memfd's, shared with nobody once the helper has exited; nothing
        # writes them, so the weights exist once.
        buffer = mmap.mmap(
            self._memfd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        log.debug("weights from the download helper (pid %d): %d bytes", self.pid, size)
        return Weights(
            str(report["uri"]),
            size,
            str(report["sha256"]),
            buffer=buffer,
            version_id=report.get("version_id"),
            etag=report.get("etag"),
            fetch_seconds=float(report["fetch_seconds"]),
            connections=int(report["connections"]),
            started=float(report["started"]),
        )

    def discard(self) -> None:
        """Stop the helper and free what it fetched (nobody will take it)."""
        try:
            os.kill(self.pid, 9)
        except OSError:
            pass
        _reap(self.pid)
        for fd in (self._report, self._memfd):
            try:
                os.close(fd)
            except OSError:
                pass


def take(uri: str) -> HelperDownload | None:
    """The helper's download of `uri`, if the interpreter started one; taken once."""
    with _lock:
        started = _boot.helper
        if started is None or started.uri != uri:
            return None
        _boot.helper = None
    return HelperDownload(started)


def discard() -> None:
    """Stop a helper no load has taken (tests; a process that changes its settings)."""
    with _lock:
        started, _boot.helper = _boot.helper, None
    if started is not None:
        HelperDownload(started).discard()


def _read_line(fd: int) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data


def _reap(pid: int) -> str:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # reaped by someone else (a SIGCHLD handler, os.wait())
        return "ended"
    code = os.waitstatus_to_exitcode(status)
    return f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"


# --- the helper's side ------------------------------------------------------------------------


def child_main(memfd: int, out: int, parent: int) -> None:
    """Fetch the object LAZYSERVE_MODEL_URI names into `memfd`, write one JSON line to `out`."""
    import signal

    signal.alarm(DEADLINE)  # SIGALRM's default action ends the process
    threading.Thread(target=_watch, args=(parent,), name="lazyserve-parent", daemon=True).start()
    notes = _Notes()
    log.addHandler(notes)
    log.setLevel(logging.WARNING)
    report: dict[str, Any]
    try:
        uri, concurrency, part_size, sha256 = _settings(os.environ)
        fetcher = S3Fetcher(
            concurrency=concurrency,
            part_size=part_size,
            allocate=lambda size: _shared(memfd, size),
        )
        weights = fetcher.fetch(uri, expected_sha256=sha256)
        report = {
            "ok": True,
            "uri": weights.uri,
            "size": weights.size,
            "sha256": weights.sha256,
            "etag": weights.etag,
            "version_id": weights.version_id,
            "started": weights.started,
            "fetch_seconds": weights.fetch_seconds,
            "connections": weights.connections,
            "finished": time.perf_counter(),
        }
    except Exception as exc:
        report = {
            "ok": False,
            "error": type(exc).__name__,
            "message": str(exc),
            "final": _final(exc),
        }
    report["warnings"] = notes.lines
    data = (json.dumps(report) + "\n").encode()
    while data:  # a parent that has died makes this fail (EPIPE): nothing left to do then
        data = data[os.write(out, data) :]


def _settings(environ: Mapping[str, str]) -> tuple[ModelURI, int, int, str | None]:
    """The settings a download needs, read without pydantic (its import would delay the first
    GET by ~0.2 s). Invalid values fail here; the app's own validation reports them."""
    from lazyserve.uris import parse_model_uri  # standard library only: no pydantic

    env = {k.upper(): v for k, v in environ.items() if k.upper().startswith("LAZYSERVE_")}
    sha256 = env.get("LAZYSERVE_MODEL_SHA256") or None
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        raise ValueError("LAZYSERVE_MODEL_SHA256 is not 64 hexadecimal characters")
    return (
        parse_model_uri(env["LAZYSERVE_MODEL_URI"].strip()),
        _integer(env, "LAZYSERVE_S3_CONCURRENCY", DEFAULT_CONCURRENCY, 1, 64),
        _integer(env, "LAZYSERVE_S3_PART_SIZE", DEFAULT_PART_SIZE, 4096, 1 << 62),
        sha256.lower() if sha256 else None,
    )


def _integer(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = env.get(name, "").strip()
    value = int(text) if text else default
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is out of range")
    return value


def _shared(memfd: int, size: int) -> mmap.mmap:
    os.ftruncate(memfd, size)
    return mmap.mmap(memfd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _final(exc: BaseException) -> bool:
    """Would the same download in the server's process end the same way? Then the server
    raises this error rather than download again: the bytes did not match, the object is too
    large or not a file, or S3 answered an error no retry changes (NoSuchKey, AccessDenied)."""
    if isinstance(exc, ModelIntegrityError | ModelFormatError | ModelTooLarge | ModelChangedError):
        return True
    cause = exc.__cause__
    return (
        isinstance(exc, ModelFetchError)
        and isinstance(cause, S3Error)
        and not cause.retryable
        and cause.code not in ("ExpiredToken", "TokenRefreshRequired")
    )


def _watch(parent: int) -> None:
    # Reparented (the server died): nobody will read the result.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


class _Notes(logging.Handler):
    """The helper's warnings (a retried body, a restart), for the server to log."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
