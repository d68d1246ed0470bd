"""Weights from S3: parallel ranged GETs of one object version straight into a single buffer,
hashed as the parts arrive."""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from lazyserve import environment
from lazyserve.errors import ModelChangedError, ModelFetchError, ModelTooLarge
from lazyserve.sources.credentials import CredentialsError
from lazyserve.sources.s3client import (
    ObjectStat,
    PreconditionFailed,
    RangeHead,
    S3Error,
    S3GetClient,
    TransferError,
    load_error,
)
from lazyserve.sources.weights import Weights, verify

if TYPE_CHECKING:
    from lazyserve.uris import ModelURI

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_PART_SIZE",
    "S3Fetcher",
    "head",
    "private_buffer",
    "reset_s3_clients",
    "s3_get_client",
]

log = logging.getLogger("lazyserve")

# The defaults of LAZYSERVE_S3_CONCURRENCY and LAZYSERVE_S3_PART_SIZE (settings.py says why),
# defined here, where the download helper (which reads its few settings without pydantic) and
# settings.py both take them.
DEFAULT_CONCURRENCY = 16
DEFAULT_PART_SIZE = 8 * 1024 * 1024
_MIB = 1024 * 1024
# The first GET learns the object's size: a small one, so the others (sized from it) leave
# early and its own body is not the last to arrive.
FIRST_PART = _MIB
# Objects too small for one `part_size` part per connection are split evenly over the
# connections, in parts of at least this (one connection streams ~90 MB/s: a 1 MiB part
# is ~12 ms of transfer against S3's ~20 ms to the first byte).
MIN_PART = _MIB

Allocate = Callable[[int], mmap.mmap]
_clients: dict[str, S3GetClient] = {}
_clients_lock = threading.Lock()


def s3_get_client() -> S3GetClient:
    """The process's S3 GET client, made on first use from the environment of that moment."""
    with _clients_lock:
        client = _clients.get("default")
        if client is None:
            client = _clients["default"] = S3GetClient()
        return client


def reset_s3_clients() -> None:
    """Forget the clients (after a SnapStart restore: new connections, new credentials)."""
    from lazyserve.sources.boto import reset_boto3_clients

    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        client.close()
    reset_boto3_clients()


def private_buffer(size: int) -> mmap.mmap:
    # An anonymous private mapping: the kernel hands out zeroed pages as the ranges land, in
    # the threads that write them. bytearray(size) would first memset every page here, on the
    # critical path: 0.25-0.5 s for 512 MiB on a 2-vCPU Firecracker VM, where first touches of
    # memory run at about 1 GB/s.
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


def head(uri: ModelURI, *, client: S3GetClient | None = None) -> ObjectStat:
    """The object's size, ETag and version id, from one 1-byte GET: a cheap check for a new
    version. Raises ModelFetchError as a load would."""
    where = f"s3://{uri.bucket}/{uri.key}"
    try:
        return (client or s3_get_client()).stat(uri.bucket or "", uri.key or "", uri.version_id)
    except (S3Error, TransferError, CredentialsError) as exc:
        raise load_error(where, exc) from exc


class _Replaced(Exception):
    """The object changed between two ranged GETs of one load."""


class _Load:
    """One attempt's state, filled in when the first response's headers arrive."""

    def __init__(self) -> None:
        self.buffer: mmap.mmap | None = None
        self.view = memoryview(b"")
        self.pin: _Pin | None = None
        self.parts: list[tuple[int, int, Future[None]]] = []


class _Pin:
    """What keeps every range of a load on the first response's object: its version id where
    the bucket has versions, else its ETag (If-Match)."""

    def __init__(self, version: str | None, etag: str, *, ours: bool) -> None:
        self.version = version
        self.etag = etag
        self.ours = ours  # the version came from S3's answer, not from the URI


class S3Fetcher:
    """Reads one S3 object version with parallel ranged GETs straight into a single buffer.

    `allocate(size)` makes the buffer (default: anonymous memory; the download helper gives a
    shared mapping of its memfd)."""

    def __init__(
        self,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        part_size: int = DEFAULT_PART_SIZE,
        client: S3GetClient | None = None,
        allocate: Allocate = private_buffer,
    ) -> None:
        self.concurrency = concurrency
        self.part_size = part_size
        self._client = client
        self.allocate = allocate

    @property
    def client(self) -> S3GetClient:
        return self._client if self._client is not None else s3_get_client()

    def fetch(
        self,
        uri: ModelURI,
        *,
        expected_sha256: str | None = None,
        reserve: Callable[[int], None] | None = None,
    ) -> Weights:
        """Fetch the object; restart once if it is replaced mid-read, never mixing versions.
        `reserve(size)` runs once the first response gives the size, before the buffer is
        allocated and the other GETs leave; it raises to refuse the load."""
        where = f"s3://{uri.bucket}/{uri.key}"
        try:
            try:
                return self._fetch(uri, expected_sha256, reserve)
            except _Replaced:
                log.warning(
                    "%s changed during the load; starting again from the new version", where
                )
            try:
                return self._fetch(uri, expected_sha256, reserve)
            except _Replaced:
                raise ModelChangedError(
                    f"{where}: the object changed twice while it was being read; "
                    "give a ?versionId= to pin one version"
                ) from None
        except (S3Error, TransferError, CredentialsError) as exc:
            raise load_error(where, exc) from exc

    def _fetch(
        self, uri: ModelURI, expected: str | None, reserve: Callable[[int], None] | None
    ) -> Weights:
        started = time.perf_counter()
        client = self.client
        bucket, key = uri.bucket or "", uri.key or ""
        where = f"s3://{bucket}/{key}"
        load = _Load()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="lazyserve-s3") as pool:

            def first_part(head: RangeHead) -> memoryview:
                _check_range(where, head, 0)
                if load.pin is not None:  # a retry of the first part, the others under way
                    if head.etag != load.pin.etag or head.total != len(load.view):
                        raise _Replaced
                    return load.view[: head.last + 1]
                # The size is known from here: a model that cannot fit fails now, before the
                # other ranged GETs (issue 11).
                _check_fits(where, head.total)
                if reserve is not None:
                    reserve(head.total)
                load.buffer = self.allocate(head.total)
                load.view = memoryview(load.buffer)
                load.pin = _Pin(
                    head.version_id or uri.version_id, head.etag, ours=uri.version_id is None
                )
                # The other ranges leave now, while this one's body is still arriving.
                for start, end in self.split(head.last + 1, head.total):
                    job = (client, where, bucket, key, load.view, start, end, load.pin)
                    load.parts.append((start, end, pool.submit(self._range, *job)))
                return load.view[: head.last + 1]

            first_job = pool.submit(
                client.get_range,
                bucket,
                key,
                0,
                min(self.part_size, FIRST_PART) - 1,
                version_id=uri.version_id,
                into=first_part,
            )
            digest = hashlib.sha256()
            try:
                first: RangeHead = first_job.result()
                # Hash each part as soon as it and those before it are in: the digest
                # overlaps the download instead of making a second pass.
                digest.update(load.view[: first.last + 1])
                for start, end, future in load.parts:
                    future.result()
                    digest.update(load.view[start : end + 1])
            except BaseException:
                for _, _, future in load.parts:
                    future.cancel()
                raise
        sha = digest.hexdigest()
        if expected is not None:
            verify(where, sha, expected, "LAZYSERVE_MODEL_SHA256")
        else:
            verify(where, sha, first.sha256, "the sha256 stored with the object")
        assert load.buffer is not None
        return Weights(
            uri.uri,
            first.total,
            sha,
            buffer=load.buffer,
            version_id=first.version_id or uri.version_id,
            etag=first.etag,
            fetch_seconds=time.perf_counter() - started,
            connections=min(self.concurrency, len(load.parts) + 1),
            started=started,
        )

    def split(self, start: int, total: int) -> list[tuple[int, int]]:
        """The ranges after the first: `part_size` bytes each, or, when that would leave
        connections idle, the rest split evenly over them (parts of at least MIN_PART)."""
        rest = total - start
        count = min(self.concurrency, -(-rest // MIN_PART))
        if rest <= 0 or -(-rest // self.part_size) >= count:
            return [
                (at, min(at + self.part_size, total) - 1)
                for at in range(start, total, self.part_size)
            ]
        return [
            (start + rest * i // count, start + rest * (i + 1) // count - 1) for i in range(count)
        ]

    def _range(
        self,
        client: S3GetClient,
        where: str,
        bucket: str,
        key: str,
        view: memoryview,
        start: int,
        end: int,
        pin: _Pin,
    ) -> None:
        def same_object(head: RangeHead) -> memoryview:
            if head.etag != pin.etag:
                raise _Replaced
            _check_range(where, head, start)
            return view[start : end + 1]

        while True:
            version = pin.version
            try:
                client.get_range(
                    bucket,
                    key,
                    start,
                    end,
                    into=same_object,
                    version_id=version,
                    if_match=None if version is not None else (pin.etag or None),
                )
                return
            except PreconditionFailed:
                raise _Replaced from None
            except S3Error as exc:
                if exc.code != "AccessDenied" or version is None or not pin.ours:
                    raise
                # A role with s3:GetObject but not s3:GetObjectVersion may read the object,
                # not a version of it: the ETag pins the rest of the load just as well.
                if pin.version is not None:
                    pin.version = None
                    log.warning(
                        "%s: reading a version is denied (no s3:GetObjectVersion); the rest of "
                        "the load is pinned to the object's ETag instead",
                        where,
                    )


def _check_range(where: str, head: RangeHead, start: int) -> None:
    if not head.ranged or head.first != start:
        raise ModelFetchError(
            f"cannot read {where}: the endpoint ignored the Range header (status {head.status}, "
            f"{'Content-Range from ' + str(head.first) if head.ranged else 'no Content-Range'})"
        )


def _check_fits(where: str, size: int) -> None:
    limit = environment.memory_limit()
    if limit is None:
        return
    held = environment.resident_bytes()
    if size + held <= limit:
        return
    source = environment.memory_limit_source()
    need = math.ceil((size + held) / _MIB)
    fix = (
        f"raise the function's MemorySize to at least {need} MB"
        if source == "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"
        else f"give the process at least {need} MiB"
    )
    raise ModelTooLarge(
        f"{where} is {size} bytes ({size / _MIB:.1f} MiB) and cannot fit: this process may use "
        f"{limit / _MIB:.0f} MiB ({source}) and already holds {held / _MIB:.0f} MiB; {fix}"
    )
