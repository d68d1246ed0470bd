"""Weights from S3: parallel ranged GETs of one object version (or of several, the shards of one
model, on the same connections) straight into one buffer per object, hashed as the parts arrive."""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from lazyserve import environment
from lazyserve.errors import (
    ModelChangedError,
    ModelFetchError,
    ModelIntegrityError,
    ModelTooLarge,
    ModelUnavailable,
)
from lazyserve.settings import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE, SHA256_HEX
from lazyserve.sources.checksums import Crc, stored_crc
from lazyserve.sources.deadlines import body_deadline
from lazyserve.sources.s3client import ObjectStat, RangeClient, S3GetClient
from lazyserve.sources.s3errors import (
    PreconditionFailed,
    RangeHead,
    S3Error,
    TransferError,
    load_error,
)
from lazyserve.sources.signing import CredentialsError
from lazyserve.sources.weights import Weights, identity_of, verify

if TYPE_CHECKING:
    from lazyserve.uris import ModelURI

__all__ = [
    "LOAD_FLOOR",
    "LOAD_SETUP",
    "Known",
    "S3Fetcher",
    "head",
    "private_buffer",
    "reset_s3_clients",
    "s3_get_client",
]

log = logging.getLogger("lazyserve")

_MIB = 1024 * 1024
# The first GET learns the object's size: a small one, so the others (sized from it) leave
# early and its own body is not the last to arrive.
FIRST_PART = _MIB
# Objects too small for one `part_size` part per connection are split evenly over the
# connections, in parts of at least this (one connection streams ~90 MB/s: a 1 MiB part
# is ~12 ms of transfer against S3's ~20 ms to the first byte).
MIN_PART = _MIB
LOAD_SETUP = 30.0
LOAD_FLOOR = 8 * _MIB
"""A whole load must end within LOAD_SETUP + size / LOAD_FLOOR seconds (1 GiB: 158 s), retries
included; each GET within its own deadline (s3client.BODY_FLOOR). A load that runs out of time
fails as a retryable error, and the next request that needs the model starts a new one."""

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
    return mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE)


def head(uri: ModelURI, *, client: RangeClient | None = None) -> ObjectStat:
    """The object's size, ETag and version id, from one 1-byte GET: a cheap check for a new
    version. Raises ModelFetchError as a load would."""
    where = f"s3://{uri.bucket}/{uri.key}"
    try:
        return (client or s3_get_client()).stat(uri.bucket or "", uri.key or "", uri.version_id)
    except (S3Error, TransferError, CredentialsError) as exc:
        raise load_error(where, exc) from exc


class Known(NamedTuple):
    """An object's size and ETag as a listing gave them, before any GET."""

    size: int
    etag: str


class _Replaced(Exception):
    """The object changed between two ranged GETs of one load."""


class _Pin:
    """What keeps every range of a load on the first response's object: its version id where
    the bucket has versions, else its ETag (If-Match)."""

    def __init__(self, version: str | None, etag: str, *, ours: bool) -> None:
        self.version = version
        self.etag = etag
        self.ours = ours  # the version came from S3's answer, not from the URI


@dataclass
class _Object:
    """One object of a load, filled in when its first response's headers arrive."""

    uri: ModelURI
    expected: str | None
    buffer: mmap.mmap | None = None
    view: memoryview = field(default_factory=lambda: memoryview(b""))
    pin: _Pin | None = None
    version: str | None = None  # the version the first response named (kept if pins change)
    single: bool = False  # nothing pins its ranges: read in one GET
    known: Known | None = None  # size and ETag from a listing: every range leaves at once
    parts: list[tuple[int, int, Future[RangeHead]]] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"s3://{self.uri.bucket}/{self.uri.key}"


class _Load:
    """What the objects of one load share: the running size, its reservation and its deadline."""

    def __init__(self, started: float) -> None:
        self.lock = threading.Lock()
        self.total = 0
        self.deadline = started + LOAD_SETUP


class S3Fetcher:
    """Reads S3 object versions with parallel ranged GETs straight into one buffer each.

    `allocate(size)` makes a buffer (default: anonymous memory; the download helper gives
    mappings of its memfd)."""

    def __init__(
        self,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        part_size: int = DEFAULT_PART_SIZE,
        client: RangeClient | None = None,
        allocate: Allocate = private_buffer,
    ) -> None:
        self.concurrency = concurrency
        self.part_size = part_size
        self._client = client
        self.allocate = allocate

    @property
    def client(self) -> RangeClient:
        return self._client if self._client is not None else s3_get_client()

    def fetch(
        self,
        uri: ModelURI,
        *,
        expected_sha256: str | None = None,
        reserve: Callable[[int], None] | None = None,
    ) -> Weights:
        """Fetch one object; see `fetch_all`."""
        return self.fetch_all([(uri, expected_sha256)], reserve=reserve)[0]

    def fetch_all(
        self,
        objects: Sequence[tuple[ModelURI, str | None]],
        *,
        reserve: Callable[[int], None] | None = None,
        known: Sequence[Known | None] | None = None,
    ) -> list[Weights]:
        """Fetch every (uri, expected sha256) on the same connections; restart once if one is
        replaced mid-read, never mixing versions. `reserve(total)` runs each time an object's
        size is learned, with the total so far, before its buffer is allocated and its other
        GETs leave; it raises to refuse the load. `known` gives objects' sizes and ETags from a
        listing (None where not known): their sizes are reserved before any GET, and all their
        ranges leave at once, each pinned to the listed ETag (If-Match)."""
        try:
            try:
                return self._fetch(objects, reserve, known)
            except _Replaced as replaced:
                log.warning(
                    "%s changed during the load; starting again from the new version", replaced
                )
            try:
                # What the listing said is out of date: sizes are learned from the GETs now.
                return self._fetch(objects, reserve, None)
            except _Replaced as replaced:
                raise ModelChangedError(
                    f"{replaced}: the object changed twice while it was being read; "
                    "give a ?versionId= to pin one version"
                ) from None
        except (S3Error, TransferError, CredentialsError) as exc:
            where = getattr(exc, "where", None) or _where(objects[0][0])
            raise load_error(where, exc) from exc

    def _fetch(
        self,
        objects: Sequence[tuple[ModelURI, str | None]],
        reserve: Callable[[int], None] | None,
        known: Sequence[Known | None] | None,
    ) -> list[Weights]:
        started = time.perf_counter()
        load = _Load(time.monotonic())
        client = self.client
        items = [_Object(uri, expected) for uri, expected in objects]
        for item, hint in zip(items, known or (), strict=False):
            if hint is not None and hint.etag and hint.size > 0:
                item.known = hint
        # Objects whose sizes a listing gave are reserved and allocated before any GET: a
        # model that cannot fit is refused before a byte of it is read.
        for item in items:
            if item.known is not None:
                self._admit(load, item, item.known.size, item.known.etag, reserve)
                item.buffer = self.allocate(item.known.size)
                item.view = memoryview(item.buffer)[: item.known.size]
                item.pin = _Pin(None, item.known.etag, ours=True)
        firsts: list[Future[RangeHead]] = []
        results: list[Weights] = []
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="lazyserve-s3") as pool:
            try:
                for item in items:
                    if item.known is not None:
                        firsts.append(self._planned(client, pool, load, item))
                    else:
                        firsts.append(pool.submit(self._first, client, pool, load, item, reserve))
                for item, first_job in zip(items, firsts, strict=True):
                    results.append(self._finish(item, first_job, started))
            except BaseException:
                for item in items:
                    for _, _, future in item.parts:
                        future.cancel()
                raise
        return results

    def _planned(
        self, client: RangeClient, pool: ThreadPoolExecutor, load: _Load, item: _Object
    ) -> Future[RangeHead]:
        """All the ranges of an object a listing sized (admitted already) leave at once; the
        future of its first range is returned."""
        (start, end), *rest = self.split(0, len(item.view))
        first = pool.submit(self._range, client, item, start, end, load.deadline)
        for start, end in rest:
            job = (client, item, start, end, load.deadline)
            item.parts.append((start, end, pool.submit(self._range, *job)))
        return first

    def _admit(
        self,
        load: _Load,
        item: _Object,
        size: int,
        etag: str,
        reserve: Callable[[int], None] | None,
        version: str | None = None,
    ) -> None:
        """The object's size is known: count it in the load's total and deadline, and refuse
        the load now if the model cannot fit, before its bytes are read."""
        with load.lock:
            load.total += size
            load.deadline += size / LOAD_FLOOR
            total = load.total
        try:
            _check_fits(item.where, total)
            if reserve is not None:
                reserve(total)
        except ModelUnavailable as exc:
            exc.identity = identity_of(etag, version or item.uri.version_id)
            raise

    def _first(
        self,
        client: RangeClient,
        pool: ThreadPoolExecutor,
        load: _Load,
        item: _Object,
        reserve: Callable[[int], None] | None,
    ) -> RangeHead:
        """The first GET of one object: its headers give the size, and the rest leaves then."""
        uri = item.uri
        bucket, key = uri.bucket or "", uri.key or ""

        def first_part(head: RangeHead) -> memoryview:
            _check_range(item.where, head, 0)
            if item.pin is not None:  # a retry of the first part, the others under way
                if head.etag != item.pin.etag or head.total != len(item.view):
                    raise _Replaced(item.where)
                return item.view[: head.last + 1]
            # The size is known from here: a model that cannot fit fails now, before the
            # other ranged GETs.
            self._admit(load, item, head.total, head.etag, reserve, head.version_id)
            item.buffer = self.allocate(head.total)
            item.view = memoryview(item.buffer)[: head.total]
            version = head.version_id or uri.version_id
            item.version = version
            item.pin = _Pin(version, head.etag, ours=uri.version_id is None)
            verified = item.expected is not None or head.sha256 is not None
            if not version and not head.etag and not verified:
                # Nothing would keep two ranges on one object, and no digest would catch a
                # mix: one GET carries the whole object instead.
                item.single = True
                return item.view[:0]
            # The other ranges leave now, while this one's body is still arriving.
            for start, end in self.split(head.last + 1, head.total, busy=1):
                job = (client, item, start, end, load.deadline)
                item.parts.append((start, end, pool.submit(self._range, *job)))
            return item.view[: head.last + 1]

        try:
            got = client.get_range(
                bucket,
                key,
                0,
                min(self.part_size, FIRST_PART) - 1,
                version_id=uri.version_id,
                into=first_part,
                deadline=load.deadline,
            )
        except (S3Error, TransferError) as exc:
            exc.where = item.where  # type: ignore[union-attr]
            raise
        if item.single:
            item.parts.append(
                (0, got.total - 1, pool.submit(self._whole, client, item, got.total, load))
            )
        return got

    def _finish(self, item: _Object, first_job: Future[RangeHead], started: float) -> Weights:
        first = first_job.result()
        if item.known is not None:
            item.version = first.version_id
        # A digest the deployment pins is checked as a sha256; one stored with the object, by
        # a CRC push stored beside it (the same proof for less CPU: sources/checksums.py).
        stored = None
        if item.expected is None and first.sha256 and SHA256_HEX.fullmatch(first.sha256):
            stored = stored_crc({"crc64nvme": first.crc64nvme, "crc32": first.crc32})
        digest: Crc | hashlib._Hash = Crc(stored[0]) if stored else hashlib.sha256()
        # Each part is checked as soon as it and those before it are in: the check overlaps
        # the download instead of making a second pass.
        if not item.single:
            digest.update(item.view[: first.last + 1])
        for start, end, future in item.parts:
            future.result()
            digest.update(item.view[start : end + 1])
        identity = identity_of(first.etag, item.version)
        try:
            if isinstance(digest, Crc):
                assert stored is not None and first.sha256 is not None
                sha, crc = first.sha256.lower(), digest.b64digest()
                if crc != stored[1]:
                    raise ModelIntegrityError(
                        f"{item.where}: {digest.name.upper()} of the weights is {crc}, expected "
                        f"{stored[1]} (the one stored with the object)"
                    )
            else:
                sha = digest.hexdigest()
                if item.expected is not None:
                    verify(item.where, sha, item.expected, "LAZYSERVE_MODEL_SHA256")
                else:
                    verify(item.where, sha, first.sha256, "the sha256 stored with the object")
        except ModelUnavailable as exc:
            exc.identity = identity
            raise
        assert item.buffer is not None and item.pin is not None
        return Weights(
            item.uri.uri,
            first.total,
            sha,
            buffer=item.buffer,
            version_id=item.version,
            etag=first.etag or None,
            fetch_seconds=time.perf_counter() - started,
            connections=min(self.concurrency, len(item.parts) + 1),
            started=started,
            identity=identity,
            verified_by=digest.name,
        )

    def split(self, start: int, total: int, busy: int = 0) -> list[tuple[int, int]]:
        """The ranges of bytes start..total-1: `part_size` bytes each, or, when that would leave
        connections idle, split evenly over the connections (parts of at least MIN_PART) but
        `busy` ones, still receiving another body when these ranges leave (a range queued
        behind one would finish a whole part after the others)."""
        rest = total - start
        count = max(1, min(self.concurrency - busy, -(-rest // MIN_PART)))
        if rest <= 0 or -(-rest // self.part_size) >= count:
            return [
                (at, min(at + self.part_size, total) - 1)
                for at in range(start, total, self.part_size)
            ]
        return [
            (start + rest * i // count, start + rest * (i + 1) // count - 1) for i in range(count)
        ]

    def _whole(self, client: RangeClient, item: _Object, total: int, load: _Load) -> RangeHead:
        """The whole object in one GET (see `first_part`); it must be the object first seen."""

        def same_size(head: RangeHead) -> memoryview:
            _check_range(item.where, head, 0)
            if head.total != total:
                raise _Replaced(item.where)
            return item.view

        return client.get_range(
            item.uri.bucket or "",
            item.uri.key or "",
            0,
            total - 1,
            into=same_size,
            version_id=item.uri.version_id,
            deadline=max(load.deadline, body_deadline(total)),
        )

    def _range(
        self, client: RangeClient, item: _Object, start: int, end: int, deadline: float
    ) -> RangeHead:
        pin = item.pin
        assert pin is not None

        def same_object(head: RangeHead) -> memoryview:
            if head.etag != pin.etag or head.total != len(item.view):
                raise _Replaced(item.where)
            _check_range(item.where, head, start)
            return item.view[start : end + 1]

        while True:
            version = pin.version
            try:
                return client.get_range(
                    item.uri.bucket or "",
                    item.uri.key or "",
                    start,
                    end,
                    into=same_object,
                    version_id=version,
                    if_match=None if version is not None else (pin.etag or None),
                    deadline=deadline,
                )
            except PreconditionFailed:
                raise _Replaced(item.where) from None
            except S3Error as exc:
                if exc.code != "AccessDenied" or version is None or not pin.ours:
                    exc.where = item.where  # type: ignore[attr-defined]
                    raise
                # A role with s3:GetObject but not s3:GetObjectVersion may read the object,
                # not a version of it: the ETag pins the rest of the load just as well.
                if pin.version is not None:
                    pin.version = None
                    log.warning(
                        "%s: reading a version is denied (no s3:GetObjectVersion); the rest of "
                        "the load is pinned to the object's ETag instead",
                        item.where,
                    )
            except TransferError as exc:
                exc.where = item.where  # type: ignore[attr-defined]
                raise


def _where(uri: ModelURI) -> str:
    return f"s3://{uri.bucket}/{uri.key}"


def _check_range(where: str, head: RangeHead, start: int) -> None:
    if not head.ranged or head.first != start:
        raise ModelFetchError(
            f"cannot read {where}: the endpoint ignored the Range header (status {head.status}, "
            f"{'Content-Range from ' + str(head.first) if head.ranged else 'no Content-Range'})",
            retryable=False,
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
