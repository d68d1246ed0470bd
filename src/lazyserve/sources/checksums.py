"""The CRC a load checks instead of a sha256 where `lazyserve push` stored one beside it.

`lazyserve push` stores the digests of each weights file with it, computed in one pass over the
same bytes and written in the same request: its sha256 (`x-amz-meta-sha256`), its CRC32
(`x-amz-meta-crc32`) and, where awscrt is installed, its CRC64NVME (`x-amz-meta-crc64nvme`),
the CRCs in the encoding S3 uses for its own checksums (base64 of the big-endian value).
Checking the bytes against the stored sha256 proves no more than checking them against a CRC
stored with it: that they are the bytes the writer stored, unchanged and from one version of
the object. Neither proves who wrote them (whoever can write the object can write its metadata),
which is what a digest the deployment pins is for (LAZYSERVE_MODEL_SHA256, always a sha256).
The CRC proves it for less CPU, and the sha256 was the most expensive step of a load after the
network (1.0 CPU-second per GiB on a 2-vCPU Firecracker VM; on one vCPU a load's CPU is the
cold start's).

CRC32 is S3's and botocore's default upload checksum and the standard library computes it
(zlib.crc32, 0.3 CPU-seconds per GiB there). CRC64NVME, S3's default full-object checksum since
December 2024, needs awscrt, the AWS Common Runtime that botocore uses for it (`pip install
lazyserve[crt]`, which is `botocore[crt]`): 0.09 CPU-seconds per GiB, with carry-less
multiplication. awscrt is optional because installing it changes more than this: botocore then
imports it in every process (about 50 ms of CPU) and signs every request with it. Both release
the GIL while they run.
"""

from __future__ import annotations

import base64
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CRC_ALGORITHMS", "Crc", "crc_digests", "stored_crc"]

CRC_ALGORITHMS = ("crc64nvme", "crc32")  # preferred first
_WIDTH = {"crc64nvme": 8, "crc32": 4}
_ENCODED = {
    "crc64nvme": re.compile(r"[A-Za-z0-9+/]{11}="),
    "crc32": re.compile(r"[A-Za-z0-9+/]{6}=="),
}


def _function(algorithm: str) -> Callable[[Any, int], int] | None:
    """The CRC function (data, previous) -> value, or None where it is not available here."""
    if algorithm == "crc32":
        return zlib.crc32
    try:
        from awscrt.checksums import crc64nvme
    except ImportError:
        return None
    function: Callable[[Any, int], int] = crc64nvme
    return function


class Crc:
    """A running CRC with hashlib's shape: `update`, then the value as S3 encodes it."""

    def __init__(self, algorithm: str) -> None:
        function = _function(algorithm)
        if function is None:
            raise ValueError(f"{algorithm} needs awscrt (pip install lazyserve[crt])")
        self.name = algorithm
        self._function = function
        self._value = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._value = self._function(data, self._value)

    def b64digest(self) -> str:
        return base64.b64encode(self._value.to_bytes(_WIDTH[self.name], "big")).decode("ascii")


def available() -> list[str]:
    """The CRCs this process can compute, preferred first."""
    return [name for name in CRC_ALGORITHMS if _function(name) is not None]


def crc_digests(data: bytes | bytearray | memoryview) -> dict[str, str]:
    """Every CRC this process can compute of `data`, by name, as push stores them."""
    crcs = [Crc(name) for name in available()]
    for crc in crcs:
        crc.update(data)
    return {crc.name: crc.b64digest() for crc in crcs}


def stored_crc(metadata: Mapping[str, str | None]) -> tuple[str, str] | None:
    """The CRC to check among those stored with an object: (algorithm, value), the fastest this
    process computes; None when none is stored in S3's encoding (the load hashes instead)."""
    for name in available():
        value = metadata.get(name)
        if value is not None and _ENCODED[name].fullmatch(value):
            return name, value
    return None
