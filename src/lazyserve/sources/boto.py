"""boto3 S3 clients: the one `lazyserve push` uploads with, and a caller's own client
(`Service(..., s3_client=client)`) used for every GET of a load and refresh, so its endpoint,
region, credentials and configuration (FIPS, addressing style, retries, timeouts, proxies) all
apply: the GETs then pay botocore's CPU per request (see s3client.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from lazyserve.sources.deadlines import body_deadline
from lazyserve.sources.listing import Listed, Listing
from lazyserve.sources.s3client import CONNECT_TIMEOUT, READ_TIMEOUT, ObjectStat
from lazyserve.sources.s3errors import PreconditionFailed, RangeHead, S3Error, TransferError
from lazyserve.types import S3Client

__all__ = ["BOTO_ATTEMPTS", "Boto3Ranges", "reset_boto3_clients", "s3_client"]

BOTO_ATTEMPTS = 3  # botocore's attempts per request (first + retries)
_CHUNK = 1024 * 1024

_clients: dict[int, S3Client] = {}
_lock = threading.Lock()


def s3_client(max_connections: int = 10) -> S3Client:
    """One boto3 S3 client per process and pool size, with bounded timeouts and retries."""
    with _lock:
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


def reset_boto3_clients() -> None:
    with _lock:
        _clients.clear()


class Boto3Ranges:
    """The GETs of a load made through a caller's boto3 S3 client (`get_object` with Range),
    with the same interface as `S3GetClient`. botocore retries them as the client is
    configured; lazyserve adds the deadline of each body."""

    def __init__(self, client: S3Client) -> None:
        self.client = client

    def get_range(
        self,
        bucket: str,
        key: str,
        start: int,
        end: int,
        *,
        into: Callable[[RangeHead], memoryview],
        version_id: str | None = None,
        if_match: str | None = None,
        deadline: float | None = None,
    ) -> RangeHead:
        import time

        from botocore.exceptions import BotoCoreError, ClientError

        params: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{end}"}
        if version_id is not None:
            params["VersionId"] = version_id
        if if_match is not None:
            params["IfMatch"] = if_match
        limit = body_deadline(end - start + 1)
        if deadline is not None:
            limit = min(limit, deadline)
        try:
            answer = self.client.get_object(**params)
        except ClientError as exc:
            raise _s3_error(exc, version_id) from exc
        except BotoCoreError as exc:
            raise TransferError(f"{type(exc).__name__}", start=start, end=end) from exc
        head = _head(dict(answer))
        body = answer["Body"]
        try:
            view = into(head)
            got = 0
            while got < len(view):
                if time.monotonic() > limit:
                    raise TransferError(
                        f"the body came too slowly ({got} of {len(view)} bytes in time)",
                        start=start,
                        end=end,
                        answered=head,
                    )
                chunk = body.read(min(_CHUNK, len(view) - got))
                if not chunk:
                    break
                view[got : got + len(chunk)] = chunk
                got += len(chunk)
            if got != len(view):
                raise TransferError(
                    f"the body ended after {got} of {len(view)} bytes",
                    start=start,
                    end=end,
                    answered=head,
                )
        except (BotoCoreError, OSError) as exc:
            raise TransferError(
                f"{type(exc).__name__}", start=start, end=end, answered=head
            ) from exc
        finally:
            body.close()
        return head

    def stat(self, bucket: str, key: str, version_id: str | None = None) -> ObjectStat:
        from botocore.exceptions import ClientError

        params: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if version_id is not None:
            params["VersionId"] = version_id
        try:
            answer = self.client.head_object(**params)
        except ClientError as exc:
            raise _s3_error(exc, version_id) from exc
        return ObjectStat(
            int(answer.get("ContentLength", 0)), answer.get("ETag"), answer.get("VersionId")
        )

    def list_objects(self, bucket: str, prefix: str) -> Listing:
        from botocore.exceptions import ClientError

        objects: list[Listed] = []
        prefixes: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                for item in page.get("Contents", []):
                    objects.append(Listed(item["Key"], int(item["Size"]), item.get("ETag")))
                prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        except ClientError as exc:
            raise _s3_error(exc, None) from exc
        return Listing(objects, prefixes)

    def close(self) -> None:
        """The caller's client is the caller's: nothing to close."""


def _head(answer: dict[str, Any]) -> RangeHead:
    import re

    meta = answer.get("ResponseMetadata", {})
    headers = meta.get("HTTPHeaders", {})
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", answer.get("ContentRange") or "")
    length = int(answer.get("ContentLength", 0))
    first, last, total = (
        (int(g) for g in match.groups()) if match is not None else (0, length - 1, length)
    )
    return RangeHead(
        status=int(meta.get("HTTPStatusCode", 200)),
        first=first,
        last=last,
        total=total,
        ranged=match is not None,
        etag=answer.get("ETag") or "",
        version_id=answer.get("VersionId"),
        sha256=(answer.get("Metadata") or {}).get("sha256"),
        request_id=str(meta.get("RequestId") or headers.get("x-amz-request-id") or ""),
        encryption=answer.get("ServerSideEncryption"),
        crc32=(answer.get("Metadata") or {}).get("crc32"),
        crc64nvme=(answer.get("Metadata") or {}).get("crc64nvme"),
    )


def _s3_error(exc: Any, version_id: str | None) -> Exception:
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    status = int(meta.get("HTTPStatusCode") or 0)
    if status == 412 or error.get("Code") == "PreconditionFailed":
        return PreconditionFailed()
    headers = meta.get("HTTPHeaders", {})
    return S3Error(
        status,
        str(error.get("Code") or f"HTTP{status}"),
        str(error.get("Message") or ""),
        str(meta.get("RequestId") or ""),
        version_id=version_id,
        encryption=headers.get("x-amz-server-side-encryption"),
        region=headers.get("x-amz-bucket-region"),
    )
