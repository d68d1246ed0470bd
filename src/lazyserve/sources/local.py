"""Weights from a local file: read once into private memory and hashed as they are read, so a
file rewritten or truncated under a served model cannot change it (or kill the process)."""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from lazyserve.errors import ModelFetchError, ModelMissing
from lazyserve.sources.weights import Weights, verify

if TYPE_CHECKING:  # as in weights.py: the download helper imports sources, not pathlib
    from pathlib import Path

    from lazyserve.uris import ModelURI

__all__ = ["fetch_local"]


class _Digest(Protocol):
    def update(self, data: memoryview, /) -> None: ...


def fetch_local(
    uri: ModelURI,
    *,
    expected_sha256: str | None = None,
    reserve: Callable[[int], None] | None = None,
) -> Weights:
    """Read a local weights file into one private buffer, hashing what was read. A `.pt` file
    goes into a sealed memfd where Linux has one, which `Weights.path` names (/proc/self/fd/N)
    for torch.load to map: no one can write to it or shorten it. `Weights.path` of a `.pt` file
    is never the file itself (None without a memfd: torch.load reads the buffer)."""
    assert uri.path is not None
    started = time.perf_counter()
    digest = hashlib.sha256()
    sealed: _Sealed | None = None
    try:
        with open(uri.path, "rb") as file:
            size = file.seek(0, 2)
            file.seek(0)
            if reserve is not None:
                reserve(size)
            if uri.format == "pt" and size:
                sealed = _sealed_copy(file, size, digest, uri.uri)
            if sealed is None:
                buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE) if size else bytearray()
                _read_into(file, buffer, size, digest, uri.uri)
    except OSError as exc:
        kind = ModelMissing if isinstance(exc, FileNotFoundError) else ModelFetchError
        raise kind(f"{uri.uri}: cannot read {uri.path}: {exc.strerror}") from exc
    sha = digest.hexdigest()
    verify(uri.uri, sha, expected_sha256, "LAZYSERVE_MODEL_SHA256")
    elapsed = time.perf_counter() - started
    if sealed is None:
        path = uri.path if uri.format != "pt" else None
        return Weights(
            uri.uri, size, sha, buffer=buffer, path=path, fetch_seconds=elapsed, started=started
        )
    weights = Weights(
        uri.uri,
        size,
        sha,
        buffer=sealed.view,
        path=sealed.path,
        fetch_seconds=elapsed,
        started=started,
    )
    import weakref

    # The descriptor lives as long as the weights; torch's map of the memfd outlives both.
    weakref.finalize(weights, os.close, sealed.fd)
    return weights


def _read_into(
    file: io.BufferedReader, buffer: bytearray | mmap.mmap, size: int, digest: _Digest, uri: str
) -> None:
    # A private copy, not a map of the file: a file rewritten in place while we serve would
    # change (or, truncated, SIGBUS) a mapped model under us.
    with memoryview(buffer) as view:
        got = 0
        while got < size and (n := file.readinto(view[got:])):
            got += n
        digest.update(view[:got])
    if got != size:
        raise ModelFetchError(f"{uri}: file shrank while reading ({got}/{size})")


class _Sealed:
    """A memfd holding a copy of the file, sealed against any write or change of size."""

    def __init__(self, fd: int, view: mmap.mmap) -> None:
        from pathlib import Path

        self.fd = fd
        self.view = view  # read-only
        self.path: Path = Path(f"/proc/self/fd/{fd}")


def _sealed_copy(file: io.BufferedReader, size: int, digest: _Digest, uri: str) -> _Sealed | None:
    """The file's bytes in a sealed memfd, or None where there is none to be had (not Linux, a
    sandbox without memfd_create or /proc): the caller then copies into plain memory."""
    # torch.load maps only a file it can open by name; a memfd under /proc/self/fd is one that
    # nothing else can change once sealed, so the map costs no second copy of the weights.
    import fcntl

    try:
        fd = os.memfd_create("lazyserve-weights", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except (AttributeError, OSError):
        return None
    try:
        if not os.path.exists(f"/proc/self/fd/{fd}"):
            os.close(fd)
            return None
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED) as shared:
            _read_into(file, shared, size, digest, uri)
        # Sealing against writes needs every writable shared map gone: `shared` is closed.
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        view = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    return _Sealed(fd, view)
