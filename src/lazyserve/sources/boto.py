"""boto3 S3 clients, for `lazyserve push` (multipart uploads); loads use `s3client.py`."""

from __future__ import annotations

import threading

from lazyserve.sources.s3client import CONNECT_TIMEOUT, READ_TIMEOUT
from lazyserve.types import S3Client

__all__ = ["BOTO_ATTEMPTS", "reset_boto3_clients", "s3_client"]

BOTO_ATTEMPTS = 3  # botocore's attempts per request (first + retries)

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
