"""The download helper: a process forked when the function's interpreter starts (`lazyserve._boot`)
that fetches the weights into a memfd while the function imports torch, reports one JSON line and
exits; and the server's side, which waits for that line in the load thread and maps the memfd (one
copy of the weights). With one vCPU's worth of CPU time or less, the same download runs in a
thread of the function's own process instead (see `start`). A download no load claims is stopped
and freed when the app reads its settings (`settle`)."""

from __future__ import annotations

import json
import logging
import mmap
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lazyserve import environment, errors
from lazyserve.errors import (
    ModelChangedError,
    ModelFetchError,
    ModelFormatError,
    ModelIntegrityError,
    ModelTooLarge,
    ModelUnavailable,
)
from lazyserve.sources.weights import Weights

if TYPE_CHECKING:
    from lazyserve.settings import Settings
    from lazyserve.sources.directory import Directory

__all__ = [
    "DEADLINE",
    "HelperDownload",
    "HelperFailed",
    "ThreadDownload",
    "discard",
    "failure",
    "settle",
    "start",
    "take",
]

log = logging.getLogger("lazyserve")

DEADLINE = 900
"""Seconds the helper may live (Lambda's longest timeout): whatever happens, it ends."""
MARK = "_LAZYSERVE_HELPER"
"""Set (to the helper's pid) once a helper started: Python processes this one starts inherit it
and start none of their own."""


class HelperFailed(Exception):
    """The helper delivered nothing the load can use; the load downloads in its own process."""


@dataclass(frozen=True)
class _Started:
    pid: int
    report: int  # the pipe end its report arrives on
    memfd: int
    settings: Settings


@dataclass(frozen=True)
class _InThread:
    """A start-up download running in a thread of this process."""

    future: Future[Weights | Directory]
    settings: Settings
    notes: _ThreadNotes = field(compare=False)


# This process's helper (one at most, started once): the state of the server's side.
_lock = threading.Lock()
_started: _Started | _InThread | None = None
_tried = False
_failure: str | None = None
ONE_CPU = 1.0
"""With this many CPUs' worth of time or fewer, the start-up download runs in a thread."""


def start(settings: Settings) -> None:
    """Fork a helper that fetches `settings.uri` (one S3 object, or a model directory) into a
    memfd; at most once per process, never in a process a helper started. Failing to start is
    remembered (`failure()`) and the load then fetches in its own process.

    With one vCPU's worth of CPU time or less (`environment.cpu_capacity()`), nothing runs
    beside the imports anyway, and a process costs more CPU than a thread: the fork and the
    copies-on-write that follow it, and the memfd's pages, faulted twice (by the helper that
    fills them, then by the function that maps them: about 0.9 + 0.5 CPU-seconds per GiB on
    this project's 2-vCPU test machine, where a thread's anonymous memory costs about 0.85 once).
    The download then runs in a thread of this process. (With more, the helper's
    Python, botocore's import among it, runs beside the function's imports, not under their
    GIL.)"""
    global _started, _tried, _failure
    with _lock:
        if _tried or MARK in os.environ:
            return
        _tried = True
        if environment.cpu_capacity() <= ONE_CPU:
            try:
                _started = _start_thread(settings)
            except Exception as exc:
                _failure = f"the download thread could not be started ({exc!r})"
                return
            os.environ[MARK] = "thread"
            return
        try:
            memfd = os.memfd_create("lazyserve-weights")  # close-on-exec by default
        except (AttributeError, OSError) as exc:  # not Linux, or refused by a sandbox
            _failure = f"no memfd for the download helper ({exc})"
            return
        try:
            # The helper's code, imported before the fork rather than in the helper: the
            # function imports all of it anyway (the S3 client and what it needs come with the
            # web stack), so the helper inherits it instead of importing it again.
            from lazyserve.sources.s3 import S3Fetcher  # noqa: F401
        except Exception as exc:
            os.close(memfd)
            _failure = f"the download helper's code could not be imported ({exc!r})"
            return
        report, out = os.pipe()
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (memfd, report, out):
                os.close(fd)
            _failure = f"the download helper could not be started ({exc})"
            return
        if pid == 0:
            _child(settings, memfd, report, out, parent)
        os.close(out)  # the child holds the only write end: its death reads as end of file
        os.environ[MARK] = str(pid)
        _started = _Started(pid, report, memfd, settings)


def failure() -> str | None:
    """Why the helper could not start, if it was asked to and could not."""
    return _failure


def take(settings: Settings) -> HelperDownload | ThreadDownload | None:
    """The helper's download, if it fetches what `settings` name; taken once."""
    global _started
    with _lock:
        started = _started
        if started is None or not _same_fetch(started.settings, settings):
            return None
        _started = None
    return _download(started)


def settle(settings: Settings, *, adopt: bool) -> None:
    """Called when the app has read its settings: a helper whose download the app will not take
    (another URI or digest, a lazy load, a caller's own S3 client: `adopt=False`) is stopped, its
    child reaped and its memfd closed now rather than held for the life of the process."""
    with _lock:
        started = _started
    if started is not None and not (adopt and _same_fetch(started.settings, settings)):
        discard()


def discard() -> None:
    """Stop a helper no load has taken and free what it fetched."""
    global _started
    with _lock:
        started, _started = _started, None
    if started is not None:
        _download(started).discard()


def _download(started: _Started | _InThread) -> HelperDownload | ThreadDownload:
    if isinstance(started, _InThread):
        return ThreadDownload(started)
    return HelperDownload(started)


def _same_fetch(a: Settings, b: Settings) -> bool:
    return (a.model_uri, a.model_sha256) == (b.model_uri, b.model_sha256)


class _Taken:
    """A start-up download, taken by the load that uses it."""

    def fetched(self) -> Weights | Directory:
        raise NotImplementedError

    def result(self, timeout: float | None = None) -> Weights:
        """The weights; raises the download's error when S3's answer settles it (retrying in
        this process would get the same), else HelperFailed."""
        found = self.fetched()
        if not isinstance(found, Weights):
            raise HelperFailed("the download helper fetched a model directory, not one file")
        return found

    def directory(self) -> Directory:
        """The model directory the download fetched (see `result`)."""
        found = self.fetched()
        if isinstance(found, Weights):
            raise HelperFailed("the download helper fetched one file, not a model directory")
        return found


class HelperDownload(_Taken):
    """The helper's download of one URI; `result()` waits for it in the calling thread."""

    def __init__(self, started: _Started) -> None:
        self.pid = started.pid
        self.uri = started.settings.model_uri
        self._report = started.report
        self._memfd = started.memfd

    def fetched(self) -> Weights | Directory:
        """What the helper fetched: one file's weights, or a model directory's files."""
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

    def _weights(self, line: bytes, status: str) -> Weights | Directory:
        try:
            report: dict[str, Any] = json.loads(line)
        except ValueError:
            raise HelperFailed(f"the download helper (pid {self.pid}) {status}") from None
        for note in report.get("warnings", []):
            log.warning("download helper: %s", note)
        if not report.get("ok"):
            name, message = str(report.get("error")), str(report.get("message"))
            kind = getattr(errors, name, None)
            if (
                report.get("final")
                and isinstance(kind, type)
                and issubclass(kind, ModelUnavailable)
            ):
                raise kind(message, retryable=bool(report.get("retryable")))
            raise HelperFailed(f"{name}: {message}")
        files = {str(f["name"]): self._map(f) for f in report["files"]}
        log.debug("weights from the download helper (pid %d): %d files", self.pid, len(files))
        if "directory" not in report:
            return files[""]
        from lazyserve.checkpoint import read_shard_index
        from lazyserve.sources.directory import Directory
        from lazyserve.uris import parse_model_uri

        uri = parse_model_uri(str(report["directory"]))
        index = None
        if report.get("index"):
            found = files[str(report["index"])]
            assert found.buffer is not None
            index = read_shard_index(bytes(found.buffer[: found.size]), uri.uri)
        return Directory(
            uri=uri,
            files=files,
            weights=tuple(report["weights"]),
            index=index,
            started=float(report["started"]),
            fetch_seconds=float(report["fetch_seconds"]),
            connections=int(report["connections"]),
            identity=report.get("identity"),
        )

    def _map(self, entry: dict[str, Any]) -> Weights:
        size = int(entry["size"])
        # Private and writable (copy-on-write, so torch.frombuffer has a writable buffer): the
        # pages are the memfd's, shared with nobody once the helper has exited; nothing
        # writes them, so the weights exist once.
        buffer = (
            mmap.mmap(
                self._memfd,
                size,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=int(entry["offset"]),
            )
            if size
            else bytearray()
        )
        return Weights(
            str(entry["uri"]),
            size,
            str(entry["sha256"]),
            buffer=buffer,
            version_id=entry.get("version_id"),
            etag=entry.get("etag"),
            fetch_seconds=float(entry["fetch_seconds"]),
            connections=int(entry["connections"]),
            started=float(entry["started"]),
            identity=entry.get("identity"),
            verified_by=str(entry.get("verified_by", "sha256")),
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


class ThreadDownload(_Taken):
    """The start-up download made in a thread of this process; `fetched()` waits for it."""

    def __init__(self, started: _InThread) -> None:
        self.uri = started.settings.model_uri
        self._future = started.future
        self._notes = started.notes

    def fetched(self) -> Weights | Directory:
        try:
            found = self._future.result()
            log.debug("weights from the download helper (a thread of this process)")
            return found
        except Exception as exc:
            if _final(exc):
                raise
            raise HelperFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            for note in self._notes.take():
                log.warning("start-up download: %s", note)

    def discard(self) -> None:
        """Nobody will take the download: it finishes on its own and is dropped then (a thread
        cannot be stopped), its warnings logged now."""
        for note in self._notes.take():
            log.warning("start-up download: %s", note)


class _ThreadNotes(logging.Filter):
    """The download thread's warnings (a retried body, a restart), held back from lazyserve's
    logger while the download runs (the interpreter is starting: the app has not set logging
    up yet), for the load that takes it to log."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        # The download's threads: its own and the fetcher's pool.
        if not (record.threadName or "").startswith(("lazyserve-download", "lazyserve-s3")):
            return True
        if record.levelno >= logging.WARNING:
            with self._lock:
                self.lines.append(record.getMessage())
        return False

    def take(self) -> list[str]:
        with self._lock:
            lines, self.lines = self.lines, []
        return lines


def _start_thread(settings: Settings) -> _InThread:
    """Start the download in a thread of this process (see `start`)."""
    future: Future[Weights | Directory] = Future()
    future.set_running_or_notify_cancel()
    notes = _ThreadNotes()
    log.addFilter(notes)

    def run() -> None:
        try:
            future.set_result(_fetch_here(settings))
        except BaseException as exc:
            future.set_exception(exc)
        finally:
            log.removeFilter(notes)

    threading.Thread(target=run, name="lazyserve-download", daemon=True).start()
    return _InThread(future, settings, notes)


def _fetch_here(settings: Settings) -> Weights | Directory:
    """What the helper fetches, fetched in this process into anonymous memory."""
    from lazyserve.sources.s3 import S3Fetcher

    uri = settings.uri
    if uri.is_prefix:
        from lazyserve.checkpoint import CONFIG
        from lazyserve.sources.directory import fetch_directory, list_directory

        if CONFIG not in list_directory(uri):
            raise HelperFailed("not a model directory: nothing to fetch ahead")
        return fetch_directory(settings, uri)
    fetcher = S3Fetcher(concurrency=settings.s3_concurrency, part_size=settings.s3_part_size)
    return fetcher.fetch(uri, expected_sha256=settings.model_sha256)


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


def _child(settings: Settings, memfd: int, report: int, out: int, parent: int) -> None:
    """The helper's whole life: it never returns into the interpreter's start-up."""
    try:
        os.close(report)
        # Nothing the helper does may reach the function's stdout/stderr (its log).
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        _fetch(settings, memfd, out, parent)
    finally:
        os._exit(0)


def _fetch(settings: Settings, memfd: int, out: int, parent: int) -> None:
    """Fetch the object `settings` name into `memfd`, write one JSON line to `out`."""
    import signal

    from lazyserve.sources.s3 import S3Fetcher

    signal.alarm(DEADLINE)  # SIGALRM's default action ends the process
    threading.Thread(target=_watch, args=(parent,), name="lazyserve-parent", daemon=True).start()
    notes = _Notes()
    log.addHandler(notes)
    log.setLevel(logging.WARNING)
    report: dict[str, Any]
    arena = _Arena(memfd)
    try:
        uri = settings.uri
        if uri.is_prefix:
            from lazyserve.checkpoint import CONFIG
            from lazyserve.sources.directory import fetch_directory, list_directory

            if CONFIG not in list_directory(uri):
                raise HelperFailed("not a model directory: nothing to fetch ahead")
            directory = fetch_directory(settings, uri, allocate=arena.allocate)
            files = {name: arena.entry(w) for name, w in directory.files.items()}
            report = {
                "ok": True,
                "directory": uri.uri,
                "files": [{**entry, "name": name} for name, entry in files.items()],
                "weights": list(directory.weights),
                "index": next((n for n in files if n.endswith(".index.json")), None)
                if directory.index is not None
                else None,
                "identity": directory.identity,
                "started": directory.started,
                "fetch_seconds": directory.fetch_seconds,
                "connections": directory.connections,
            }
        else:
            fetcher = S3Fetcher(
                concurrency=settings.s3_concurrency,
                part_size=settings.s3_part_size,
                allocate=arena.allocate,
            )
            weights = fetcher.fetch(uri, expected_sha256=settings.model_sha256)
            report = {"ok": True, "files": [{**arena.entry(weights), "name": ""}]}
    except Exception as exc:
        report = {
            "ok": False,
            "error": type(exc).__name__,
            "message": str(exc),
            "final": _final(exc),
            "retryable": getattr(exc, "retryable", True),
        }
    report["warnings"] = notes.lines
    data = (json.dumps(report) + "\n").encode()
    while data:  # a parent that has died makes this fail (EPIPE): nothing left to do then
        data = data[os.write(out, data) :]


class _Arena:
    """The memfd the helper fills: each object gets a page-aligned stretch of it, mapped
    shared; `entry` tells the server where each one lies."""

    def __init__(self, memfd: int) -> None:
        self.memfd = memfd
        self.end = 0
        self.offsets: dict[int, int] = {}  # id(mapping) -> offset
        self.lock = threading.Lock()

    def allocate(self, size: int) -> mmap.mmap:
        with self.lock:
            step = mmap.ALLOCATIONGRANULARITY
            offset = -(-self.end // step) * step
            self.end = offset + max(size, 1)
            os.ftruncate(self.memfd, self.end)
            mapping = mmap.mmap(
                self.memfd,
                max(size, 1),
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=offset,
            )
            self.offsets[id(mapping)] = offset
            return mapping

    def entry(self, weights: Weights) -> dict[str, Any]:
        """What the server needs to map `weights` and know them."""
        offset = self.offsets.get(id(weights.buffer), 0) if weights.size else 0
        return {
            "uri": weights.uri,
            "offset": offset,
            "size": weights.size,
            "sha256": weights.sha256,
            "etag": weights.etag,
            "version_id": weights.version_id,
            "identity": weights.identity,
            "started": weights.started,
            "fetch_seconds": weights.fetch_seconds,
            "connections": weights.connections,
            "verified_by": weights.verified_by,
        }


def _final(exc: BaseException) -> bool:
    """Would the same download in the server's process end the same way? Then the server
    raises this error rather than download again: the bytes did not match, the object is too
    large or not a file, or S3 answered an error no retry changes (NoSuchKey, AccessDenied)."""
    if isinstance(exc, ModelIntegrityError | ModelFormatError | ModelTooLarge | ModelChangedError):
        return True
    return isinstance(exc, ModelFetchError) and not exc.retryable


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
