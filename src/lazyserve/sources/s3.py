"""Weights from S3: parallel ranged GETs of one object version straight into a single buffer."""

from __future__ import annotations

import hashlib
import logging
import mmap
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lazyserve.errors import ModelChangedError, ModelFetchError, ModelFormatError, ModelMissing
from lazyserve.settings import ModelURI
from lazyserve.sources.weights import Weights, verify
from lazyserve.types import S3Client

__all__ = [
    "BOTO_ATTEMPTS",
    "CONNECT_TIMEOUT",
    "READ_TIMEOUT",
    "S3Fetcher",
    "reset_s3_clients",
    "s3_client",
]

log = logging.getLogger("lazyserve")

CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0
BOTO_ATTEMPTS = 3  # botocore's attempts per GET (first + retries): SlowDown, 5xx, connections
BODY_ATTEMPTS = 3  # ours: errors while a range's body streams in, which botocore cannot retry
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_S3_HINTS = {
    "NoSuchKey": "no object has that key",
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchVersion": "the object has no such version",
    "AccessDenied": "access denied: the function's role needs s3:GetObject on this key",
    "SlowDown": "S3 is throttling requests",
    "InvalidRange": "the object is empty",
}


_clients: dict[int, S3Client] = {}
_clients_lock = threading.Lock()


def s3_client(max_connections: int = 10) -> S3Client:
    """One boto3 S3 client per process and pool size, with bounded timeouts and retries."""
    with _clients_lock:
        client = _clients.get(max_connections)
        if client is None:
            import boto3
            from botocore.config import Config

            # boto3 honours AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and the credentials chain.
            config = Config(
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                # total_max_attempts: botocore reads max_attempts as retries after the first.
                retries={"mode": "standard", "total_max_attempts": BOTO_ATTEMPTS},
                max_pool_connections=max_connections,
            )
            client = boto3.session.Session().client("s3", config=config)
            _clients[max_connections] = client
        return client


def reset_s3_clients() -> None:
    """Forget cached clients (after a SnapStart restore: new connections, new credentials)."""
    with _clients_lock:
        _clients.clear()


@dataclass(frozen=True)
class ObjectVersion:
    """What identifies the bytes an S3 URI names right now."""

    size: int
    etag: str
    version_id: str | None


def stat(uri: ModelURI, *, client: S3Client | None = None) -> ObjectVersion:
    """The object's size, ETag and version id (a HEAD request), to tell whether it changed."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = client if client is not None else s3_client()
    params: dict[str, Any] = {"Bucket": uri.bucket or "", "Key": uri.key or ""}
    if uri.version_id:
        params["VersionId"] = uri.version_id
    try:
        head = client.head_object(**params)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
        raise ModelFetchError(
            f"cannot read s3://{uri.bucket}/{uri.key}: S3 error {code} (HEAD)"
        ) from exc
    except BotoCoreError as exc:
        raise ModelFetchError(
            f"cannot read s3://{uri.bucket}/{uri.key}: {type(exc).__name__}: {exc}"
        ) from exc
    return ObjectVersion(int(head["ContentLength"]), str(head["ETag"]), head.get("VersionId"))


class _Replaced(Exception):
    """The object changed between two ranged GETs of one load."""


class S3Fetcher:
    """Reads one S3 object version with parallel ranged GETs straight into a single buffer."""

    def __init__(
        self,
        *,
        concurrency: int = 8,
        part_size: int = 8 * 1024 * 1024,
        s3_client: S3Client | None = None,
    ) -> None:
        self.concurrency = concurrency
        self.part_size = part_size
        self._client = s3_client

    @property
    def client(self) -> S3Client:
        return self._client if self._client is not None else s3_client(self.concurrency + 2)

    def fetch(
        self,
        uri: ModelURI,
        *,
        expected_sha256: str | None = None,
        reserve: Callable[[int], None] | None = None,
    ) -> Weights:
        """Fetch the object; restart once if it is replaced mid-read, never mixing versions.
        `reserve(size)` runs once the first response gives the size, before the buffer is
        allocated; it raises to refuse the load."""
        try:
            return self._fetch(uri, expected_sha256, reserve)
        except _Replaced:
            log.warning("%s changed during the load; starting again from the new version", uri.uri)
        try:
            return self._fetch(uri, expected_sha256, reserve)
        except _Replaced:
            raise ModelChangedError(
                f"{uri.uri}: the object changed twice while it was being read; "
                "give a ?versionId= to pin one version"
            ) from None

    def _fetch(
        self, uri: ModelURI, expected: str | None, reserve: Callable[[int], None] | None
    ) -> Weights:
        started = time.perf_counter()
        first = self._get(uri, 0, self.part_size - 1, {"VersionId": uri.version_id})
        total, etag = first["total"], first["ETag"]
        if reserve is not None:
            try:
                reserve(total)
            except BaseException:
                first["Body"].close()
                raise
        version = first.get("VersionId")
        # An anonymous private mapping: the kernel hands out zeroed pages as the ranges land,
        # in the threads that write them. bytearray(total) would first memset every page here,
        # on the critical path: 0.25-0.5 s for 512 MiB on a 2-vCPU Firecracker VM, where first
        # touches of memory run at about 1 GB/s.
        buffer = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE)
        view = memoryview(buffer)
        # Later ranges must come from the same version: pin its id where the bucket has
        # versions, else make S3 refuse any other ETag (412 PreconditionFailed).
        pin = {"VersionId": version} if version else {"IfMatch": etag}
        digest = hashlib.sha256()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="lazyserve-s3") as pool:
            head: Future[Any] = pool.submit(self._read, uri, view, 0, first)
            futures = [head]
            for start in range(int(first["end"]) + 1, total, self.part_size):
                end = min(start + self.part_size, total) - 1
                futures.append(pool.submit(self._range, uri, view, start, end, pin, etag))
            try:
                offset = 0
                # Hash each part as soon as it and those before it are in: the digest
                # overlaps the download instead of making a second pass.
                for future in futures:
                    end = future.result()
                    digest.update(view[offset : end + 1])
                    offset = end + 1
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        sha = digest.hexdigest()
        stored = (first.get("Metadata") or {}).get("sha256")
        if expected is not None:
            verify(uri.uri, sha, expected, "LAZYSERVE_MODEL_SHA256")
        else:
            verify(uri.uri, sha, stored, "the sha256 stored with the object")
        return Weights(
            uri.uri,
            total,
            sha,
            buffer=buffer,
            version_id=version,
            etag=etag,
            fetch_seconds=time.perf_counter() - started,
            connections=min(self.concurrency, len(futures)),
            started=started,
        )

    def _range(
        self, uri: ModelURI, view: memoryview, start: int, end: int, pin: dict[str, Any], etag: str
    ) -> int:
        for attempt in range(1, BODY_ATTEMPTS + 1):
            response = self._get(uri, start, end, pin)
            if response["ETag"] != etag:
                raise _Replaced
            try:
                return self._read(uri, view, start, response)
            except ModelFetchError:
                if attempt == BODY_ATTEMPTS:
                    raise
                delay = min(2.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.0)
                log.warning("%s bytes %d-%d: retrying after a broken body", uri.uri, start, end)
                threading.Event().wait(delay)
        raise AssertionError("unreachable")

    def _get(self, uri: ModelURI, start: int, end: int, extra: dict[str, Any]) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        params = {k: v for k, v in extra.items() if v is not None}
        try:
            response: dict[str, Any] = dict(
                self.client.get_object(
                    Bucket=uri.bucket or "",
                    Key=uri.key or "",
                    Range=f"bytes={start}-{end}",
                    **params,
                )
            )
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            if code in ("PreconditionFailed", "412"):
                raise _Replaced from exc
            if code == "InvalidRange":
                raise ModelFormatError(f"{uri.uri}: the object is empty") from exc
            request_id = exc.response.get("ResponseMetadata", {}).get("RequestId", "")
            hint = _S3_HINTS.get(code, str(error.get("Message", "")))
            kind = ModelMissing if code in ("NoSuchKey", "NoSuchVersion") else ModelFetchError
            raise kind(
                f"cannot read s3://{uri.bucket}/{uri.key}: S3 error {code} ({hint})"
                + (f", request id {request_id}" if request_id else "")
            ) from exc
        except BotoCoreError as exc:
            raise ModelFetchError(
                f"cannot read s3://{uri.bucket}/{uri.key}: {type(exc).__name__}: {exc}"
            ) from exc
        match = _CONTENT_RANGE.fullmatch(str(response.get("ContentRange", "")))
        if match is None or int(match.group(1)) != start:
            response["Body"].close()
            raise ModelFetchError(
                f"cannot read s3://{uri.bucket}/{uri.key}: the endpoint ignored the Range header "
                f"(Content-Range {response.get('ContentRange')!r})"
            )
        response["total"] = int(match.group(3))
        response["end"] = int(match.group(2))
        return response

    def _read(self, uri: ModelURI, view: memoryview, start: int, response: dict[str, Any]) -> int:
        from http.client import HTTPException

        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        end = int(response["end"])
        body = response["Body"]
        target = view[start : end + 1]
        direct = _direct_reader(body)
        readinto = direct[0].readinto if direct is not None else body.readinto
        got = 0
        request_id = response.get("ResponseMetadata", {}).get("RequestId", "")
        where = f"cannot read s3://{uri.bucket}/{uri.key} bytes {start}-{end}"
        tail = f", request id {request_id}" if request_id else ""
        try:
            with body:
                while got < len(target):
                    n = readinto(target[got:])
                    if not n:
                        break
                    got += n
                if direct is not None and got == len(target):
                    direct[1].release_conn()  # fully read: the connection can be reused
        except (BotoCoreError, HTTPError, HTTPException, OSError) as exc:
            raise ModelFetchError(f"{where}: {type(exc).__name__}: {exc}{tail}") from exc
        if got != len(target):
            raise ModelFetchError(f"{where}: body ended after {got} of {len(target)} bytes{tail}")
        return end


def _direct_reader(body: Any) -> tuple[Any, Any] | None:
    """(http.client response, urllib3 response) under a botocore body, when both are there.

    urllib3 2.x's readinto() reads into a temporary bytes object and copies it over: for each
    part an extra allocation the size of the part and a second copy of every byte. http.client's
    own readinto() receives from the socket straight into our buffer. botocore asks urllib3 for
    undecoded bytes, so reading below it changes nothing else; any other layout falls back.
    """
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if callable(getattr(fp, "readinto", None)) and callable(getattr(raw, "release_conn", None)):
        return fp, raw
    return None
