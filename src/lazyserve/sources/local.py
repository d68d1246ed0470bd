"""Weights from a local file: one private copy, hashed as it is read, so a file rewritten or
truncated under a served model cannot change it (or kill the process)."""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from lazyserve.errors import ModelFetchError, ModelMissing, ModelUnavailable
from lazyserve.sources.weights import Weights, file_identity, verify

if TYPE_CHECKING:
    from lazyserve.uris import ModelURI

__all__ = ["fetch_local"]


def fetch_local(
    uri: ModelURI,
    *,
    expected_sha256: str | None = None,
    reserve: Callable[[int], None] | None = None,
) -> Weights:
    """Read a local weights file (safetensors or `.pt`) into one private buffer, hashing the
    bytes read: the sha256 describes exactly what is served."""
    assert uri.path is not None
    started = time.perf_counter()
    digest = hashlib.sha256()
    try:
        with open(uri.path, "rb") as file:
            found = os.fstat(file.fileno())
            identity = file_identity(found.st_size, found.st_mtime_ns, found.st_ino)
            size = file.seek(0, 2)
            file.seek(0)
            if reserve is not None:
                _identified(reserve, size, identity)
            # A private copy, not a map of the file: a file rewritten in place while we serve
            # would change (or, truncated, SIGBUS) a mapped model under us. (torch.load then
            # reads a `.pt` from this copy: see formats.py.)
            buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE) if size else bytearray()
            with memoryview(buffer) as view:
                got = 0
                while got < size and (n := file.readinto(view[got:])):
                    got += n
                digest.update(view[:got])
            if got != size:
                raise ModelFetchError(f"{uri.uri}: file shrank while reading ({got}/{size})")
    except OSError as exc:
        kind = ModelMissing if isinstance(exc, FileNotFoundError) else ModelFetchError
        raise kind(f"{uri.uri}: cannot read {uri.path}: {exc.strerror}") from exc
    sha = digest.hexdigest()
    _identified(
        lambda _: verify(uri.uri, sha, expected_sha256, "LAZYSERVE_MODEL_SHA256"), 0, identity
    )
    elapsed = time.perf_counter() - started
    return Weights(
        uri.uri,
        size,
        sha,
        buffer=buffer,
        path=uri.path,
        fetch_seconds=elapsed,
        started=started,
        identity=identity,
    )


def _identified(check: Callable[[int], None], size: int, identity: str) -> None:
    """`check(size)`, its failure marked with the file's identity (see errors.ModelUnavailable)."""
    try:
        check(size)
    except ModelUnavailable as exc:
        exc.identity = identity
        raise
