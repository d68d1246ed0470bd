"""The bytes of one weights file, where they came from, and the check of their digest."""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazyserve.errors import ModelIntegrityError

if TYPE_CHECKING:  # pathlib is not needed to download, and the download helper imports this
    from pathlib import Path

__all__ = ["Weights", "file_identity", "identity_of", "verify"]


@dataclass
class Weights:
    """The bytes of a weights file (or its path, for memory-mapped formats) and their origin."""

    uri: str
    size: int
    sha256: str
    buffer: bytearray | mmap.mmap | None = None
    path: Path | None = None
    version_id: str | None = None
    etag: str | None = None
    fetch_seconds: float = 0.0
    connections: int = 1
    started: float = 0.0  # time.perf_counter() when the fetch began
    identity: str | None = None  # which version of the object this is (see `identity_of`)
    # The check the bytes passed: "sha256" (computed here), or "crc64nvme" (the CRC stored
    # beside the sha256 by push; `sha256` is then the stored one, see sources/checksums.py).
    verified_by: str = "sha256"


def identity_of(etag: str | None, version_id: str | None) -> str | None:
    """An S3 object version's identity: its ETag and version id, or None when it shows neither."""
    return f"s3:{etag}|{version_id}" if etag or version_id else None


def file_identity(size: int, mtime_ns: int, inode: int) -> str:
    """A local file's identity: what changes when it is replaced or rewritten."""
    return f"file:{size}|{mtime_ns}|{inode}"


def verify(uri: str, actual: str, expected: str | None, origin: str) -> None:
    if expected is not None and actual != expected.lower():
        raise ModelIntegrityError(
            f"{uri}: sha256 of the weights is {actual}, expected {expected.lower()} ({origin})"
        )
