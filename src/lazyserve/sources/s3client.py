"""A small S3 client for the ranged GETs of a load: `http.client` with keep-alive connections,
SigV4 (`sigv4.py`), bounded timeouts, retries, and S3's answers turned into lazyserve's errors
in one place (`load_error`).

Why not botocore for these GETs (measured on this project's 2-vCPU Firecracker VM, the same
kind of machine as Lambda's): in a fresh process, `import boto3` plus a client took 0.55 s of
CPU (0.3 s to 1 s of wall time depending on load) before the first request could leave, against
0.13-0.16 s for this module and everything it imports (stdlib the web stack imports anyway);
each ranged GET then spent 2-2.5 ms of CPU in botocore once warm (4 ms on a cold process, more
under load; ~20 ms was seen in a loaded run) under the GIL, against 0.3 ms here, so botocore's
parallel GETs went out one after another. boto3 stays for `lazyserve push` and as the last place
credentials are looked for (`credentials.py`)."""

from __future__ import annotations

import http.client
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

from lazyserve.errors import LazyserveError, ModelFetchError, ModelFormatError, ModelMissing
from lazyserve.sources.credentials import CredentialsError, CredentialSource
from lazyserve.sources.endpoints import Endpoint, Route, region_of, resolve_endpoint, route
from lazyserve.sources.sigv4 import Signer

__all__ = [
    "ATTEMPTS",
    "CONNECT_TIMEOUT",
    "READ_TIMEOUT",
    "ObjectStat",
    "PreconditionFailed",
    "RangeHead",
    "S3Error",
    "S3GetClient",
    "TransferError",
    "load_error",
]

CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0
ATTEMPTS = 3  # per ranged GET, the first included: S3 errors worth retrying, connections, bodies
BACKOFF = 0.1  # seconds before the first retry (with jitter), doubling, at most BACKOFF_MAX
BACKOFF_MAX = 2.0
_ERROR_BODY_LIMIT = 64 * 1024
# botocore's standard retry mode retries these (botocore/retries/standard.py), and so do we.
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_RETRY_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
    }
)
_EXPIRED_CODES = frozenset({"ExpiredToken", "TokenRefreshRequired"})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_HINTS = {
    "NoSuchKey": "no object has that key",
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchVersion": "the object has no such version",
    "SlowDown": "S3 is throttling requests",
    "InvalidAccessKeyId": "S3 does not know the access key id; check the function's credentials",
    "SignatureDoesNotMatch": "S3 refused the request signature; check the secret access key",
    "ExpiredToken": "the credentials' session token has expired",
    "InvalidToken": "the credentials' session token is not valid",
    "RequestTimeTooSkewed": "this machine's clock is too far from S3's",
    "PermanentRedirect": "the bucket is in another region; set AWS_REGION to it",
}


class ObjectStat(NamedTuple):
    """What a cheap look at an object says: its size, ETag and version id (None unversioned)."""

    size: int
    etag: str | None
    version_id: str | None


@dataclass(frozen=True)
class RangeHead:
    """What one response said before its body: the bytes it carries and the object's identity."""

    status: int
    first: int
    last: int
    total: int
    ranged: bool  # it carried a Content-Range (an endpoint that ignores Range sends none)
    etag: str
    version_id: str | None
    sha256: str | None  # x-amz-meta-sha256, stored by `lazyserve push`
    request_id: str
    encryption: str | None  # x-amz-server-side-encryption


class S3Error(Exception):
    """S3 answered with an error (its XML body's Code, Message and RequestId)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        request_id: str,
        *,
        version_id: str | None = None,
        encryption: str | None = None,
        region: str | None = None,
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.version_id = version_id  # the version the request asked for, if any
        self.encryption = encryption
        self.region = region  # x-amz-bucket-region, when S3 says the bucket lives elsewhere

    @property
    def retryable(self) -> bool:
        return self.status in _RETRY_STATUSES or self.code in _RETRY_CODES


class PreconditionFailed(Exception):
    """412: the object no longer has the ETag the request was pinned to."""


class TransferError(Exception):
    """No usable answer: a connection or a timeout failed, or a body broke off."""

    def __init__(
        self, detail: str, *, start: int, end: int, answered: RangeHead | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.start = start
        self.end = end
        # S3 had answered (status and headers) when the body broke: its request id is what
        # AWS support asks for.
        self.answered = answered is not None
        self.request_id = answered.request_id if answered is not None else ""


def load_error(uri: str, exc: BaseException) -> LazyserveError:
    """The lazyserve error for a failed read of `uri` (`s3://bucket/key`): S3's answer with a
    hint, a failed transfer, or missing credentials. The one place these are worded."""
    where = f"cannot read {uri}"
    if isinstance(exc, S3Error):
        if exc.code == "InvalidRange":
            return ModelFormatError(f"{uri}: the object is empty")
        request = f", request id {exc.request_id}" if exc.request_id else ""
        kind = ModelMissing if exc.code in ("NoSuchKey", "NoSuchVersion") else ModelFetchError
        return kind(f"{where}: S3 error {exc.code} ({_hint(exc)}){request}")
    if isinstance(exc, TransferError):
        if exc.answered:  # the body broke
            tail = f", request id {exc.request_id}" if exc.request_id else ""
            return ModelFetchError(f"{where} bytes {exc.start}-{exc.end}: {exc.detail}{tail}")
        return ModelFetchError(f"{where}: {exc.detail}")
    if isinstance(exc, CredentialsError):
        return ModelFetchError(f"{where}: {exc}")
    return ModelFetchError(f"{where}: {type(exc).__name__}: {exc}")


def _hint(exc: S3Error) -> str:
    if exc.code == "AccessDenied":
        # Name the permission this request needed (issue 10): a version is its own action,
        # and an SSE-KMS object also needs the key.
        kms = (exc.encryption or "").startswith("aws:kms") or "kms" in exc.message.lower()
        if kms:
            return (
                "access denied: the object is encrypted with SSE-KMS; the function's role needs "
                "kms:Decrypt on its KMS key"
            )
        if exc.version_id is not None:
            return "access denied: the function's role needs s3:GetObjectVersion on this key"
        return (
            "access denied: the function's role needs s3:GetObject on this key "
            "(without s3:ListBucket, a missing key is also answered AccessDenied)"
        )
    return _HINTS.get(exc.code) or exc.message or f"HTTP {exc.status}"


class S3GetClient:
    """GETs (and looks at) S3 objects; one per process is enough, and threads share it.

    `environ` supplies the endpoint, region and credentials variables (default os.environ,
    read when the client is made); `endpoint_url`/`region`/`credentials` override them."""

    def __init__(
        self,
        *,
        environ: Mapping[str, str] | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        credentials: CredentialSource | None = None,
    ) -> None:
        env = dict(os.environ if environ is None else environ)
        if endpoint_url is not None:
            env["AWS_ENDPOINT_URL_S3"] = endpoint_url
        self._environ = env
        self.region = region or region_of(env)
        self.credentials = credentials if credentials is not None else CredentialSource(env)
        self._regions: dict[str, str] = {}  # buckets S3 said live in another region
        self._idle: dict[Endpoint, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._signer = Signer("s3")
        self._routes: dict[Endpoint, Route] = {}
        self._ssl: Any = None
        self.connections = 0  # connections opened, for tests and benchmarks

    @classmethod
    def from_boto3(cls, client: Any) -> S3GetClient:
        """A client with a boto3 S3 client's endpoint, region and credentials."""
        endpoint = str(client.meta.endpoint_url or "")
        custom = endpoint and not urlsplit(endpoint).netloc.endswith(
            ("amazonaws.com", "amazonaws.com.cn")
        )
        # A private botocore method (BaseClient._get_credentials): without it, the usual chain.
        get = getattr(client, "_get_credentials", None)
        found = get() if callable(get) else None
        source = CredentialSource.of_botocore(found) if found is not None else None
        return cls(
            endpoint_url=endpoint if custom else None,
            region=client.meta.region_name,
            credentials=source,
        )

    # --- requests ---------------------------------------------------------------------------

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
    ) -> RangeHead:
        """GET bytes start..end; `into(head)` checks the response's head and gives the buffer
        its body goes to (it may raise to refuse the response). Retries up to ATTEMPTS times
        whatever broke: an S3 error worth retrying, a connection, a timeout, a short body."""
        headers = {"Range": f"bytes={start}-{end}"}
        if if_match is not None:
            headers["If-Match"] = if_match
        return self._request("GET", bucket, key, version_id, headers, start, end, into)

    def stat(self, bucket: str, key: str, version_id: str | None = None) -> ObjectStat:
        """Size, ETag and version id, from a 1-byte GET (S3's error codes come with a body;
        a HEAD's do not); an empty object, which has no byte 0, is looked at with a HEAD."""
        found: list[RangeHead] = []

        def keep(head: RangeHead) -> memoryview:
            found.append(head)
            return memoryview(bytearray(head.last - head.first + 1 if head.ranged else 0))

        try:
            head = self._request("GET", bucket, key, version_id, {"Range": "bytes=0-0"}, 0, 0, keep)
        except S3Error as exc:
            if exc.code != "InvalidRange":
                raise
            head = self._request("HEAD", bucket, key, version_id, {}, 0, 0, None)
            return ObjectStat(0, head.etag or None, head.version_id)
        return ObjectStat(head.total, head.etag or None, head.version_id)

    def close(self) -> None:
        """Close the idle connections."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def _request(
        self,
        method: str,
        bucket: str,
        key: str,
        version_id: str | None,
        headers: dict[str, str],
        start: int,
        end: int,
        into: Callable[[RangeHead], memoryview] | None,
    ) -> RangeHead:
        attempt = 0
        redirected = refreshed = False
        while True:
            attempt += 1
            try:
                return self._once(method, bucket, key, version_id, headers, start, end, into)
            except S3Error as exc:
                region = exc.region
                if region and region != self._region(bucket) and not redirected:
                    with self._lock:
                        self._regions[bucket] = region
                    redirected = True
                    attempt -= 1  # S3 told us where to go: not a failed attempt
                    continue
                if exc.code in _EXPIRED_CODES and not refreshed:
                    self.credentials.invalidate()
                    refreshed = True
                elif not exc.retryable or attempt >= ATTEMPTS:
                    raise
            except TransferError as exc:
                if attempt >= ATTEMPTS:
                    exc.detail = f"{exc.detail} ({attempt} attempts)"
                    exc.args = (exc.detail,)
                    raise
            pause = min(BACKOFF_MAX, BACKOFF * 2 ** (attempt - 1))
            time.sleep(pause * random.uniform(0.5, 1.0))

    def _once(
        self,
        method: str,
        bucket: str,
        key: str,
        version_id: str | None,
        extra: dict[str, str],
        start: int,
        end: int,
        into: Callable[[RangeHead], memoryview] | None,
    ) -> RangeHead:
        region = self._region(bucket)
        endpoint = resolve_endpoint(bucket, region, self._environ)
        path = endpoint.path(bucket, key)
        query = f"versionId={quote(version_id, safe='-_.~')}" if version_id is not None else ""
        headers = self._signer.sign(
            method, path, query, {"Host": endpoint.netloc, **extra}, self.credentials.get(), region
        )
        way = self._route(endpoint)
        headers.update(way.proxy_headers if not way.tunnel else {})
        target = way.target_prefix + (f"{path}?{query}" if query else path)
        connection, reused = self._connection(endpoint, way, start, end)
        response: http.client.HTTPResponse | None = None
        head: RangeHead | None = None
        try:
            try:
                connection.request(method, target, headers=headers)
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                if not reused or isinstance(exc, TimeoutError):
                    raise
                # An idle keep-alive connection the server had closed: not a failed attempt.
                connection.close()
                connection, reused = self._connection(endpoint, way, start, end)
                connection.request(method, target, headers=headers)
                response = connection.getresponse()
            head = _head(response, version_id)
            if response.status >= 300:
                body = response.read(_ERROR_BODY_LIMIT) if method != "HEAD" else b""
                if response.status == 412:
                    raise PreconditionFailed
                raise _s3_error(response, body, version_id, head.request_id)
            view = into(head) if into is not None else memoryview(b"")
            got = _read_into(response, view)
            if got != len(view):
                raise TransferError(
                    f"the body ended after {got} of {len(view)} bytes",
                    start=start,
                    end=end,
                    answered=head,
                )
            if into is None:
                response.read()
            self._release(endpoint, connection, response)
            return head
        except (OSError, http.client.HTTPException) as exc:
            _discard(connection, response)
            detail = (
                f"ReadTimeoutError: {endpoint.netloc} sent nothing for {READ_TIMEOUT:g} s"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            raise TransferError(detail, start=start, end=end, answered=head) from exc
        except BaseException:
            # An S3 error, a short body, or `into` refusing the response: its body is unread.
            _discard(connection, response)
            raise

    # --- connections --------------------------------------------------------------------------

    def _route(self, endpoint: Endpoint) -> Route:
        found = self._routes.get(endpoint)
        if found is None:
            found = self._routes[endpoint] = route(endpoint, self._environ)
        return found

    def _connection(
        self, endpoint: Endpoint, way: Route, start: int, end: int
    ) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(endpoint)
            if idle:
                return idle.pop(), True
            self.connections += 1
        connection: http.client.HTTPConnection
        if endpoint.scheme == "https":
            connection = http.client.HTTPSConnection(
                way.host, way.port, timeout=CONNECT_TIMEOUT, context=self._context()
            )
        else:
            connection = http.client.HTTPConnection(way.host, way.port, timeout=CONNECT_TIMEOUT)
        if way.tunnel:
            connection.set_tunnel(endpoint.host, endpoint.port, headers=way.proxy_headers)
        where = (
            endpoint.netloc
            if (way.host, way.port) == (endpoint.host, endpoint.port)
            else (f"{endpoint.netloc} through the proxy {way.host}:{way.port}")
        )
        try:
            connection.connect()
        except TimeoutError as exc:
            connection.close()
            raise TransferError(
                f"ConnectTimeoutError: could not connect to {where} within {CONNECT_TIMEOUT:g} s",
                start=start,
                end=end,
            ) from exc
        except OSError as exc:
            connection.close()
            raise TransferError(
                f"{type(exc).__name__}: could not connect to {where}: {exc}", start=start, end=end
            ) from exc
        assert connection.sock is not None
        connection.sock.settimeout(READ_TIMEOUT)
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, False

    def _release(
        self,
        endpoint: Endpoint,
        connection: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
    ) -> None:
        if response.will_close or not response.isclosed():
            _discard(connection, response)
            return
        with self._lock:
            self._idle.setdefault(endpoint, []).append(connection)

    def _context(self) -> Any:
        if self._ssl is None:
            import ssl

            bundle = self._environ.get("AWS_CA_BUNDLE")
            self._ssl = ssl.create_default_context(cafile=bundle or None)
        return self._ssl

    def _region(self, bucket: str) -> str:
        return self._regions.get(bucket, self.region)


def _head(response: http.client.HTTPResponse, version_id: str | None) -> RangeHead:
    get = response.getheader
    length = int(get("Content-Length") or 0)
    match = _CONTENT_RANGE.fullmatch(get("Content-Range") or "")
    if match is not None:
        first, last, total = (int(group) for group in match.groups())
    else:
        first, last, total = 0, length - 1, length
    return RangeHead(
        status=response.status,
        first=first,
        last=last,
        total=total,
        ranged=match is not None,
        etag=get("ETag") or "",
        version_id=get("x-amz-version-id") or None,
        sha256=get("x-amz-meta-sha256") or None,
        request_id=get("x-amz-request-id") or get("x-amzn-requestid") or "",
        encryption=get("x-amz-server-side-encryption") or None,
    )


def _discard(
    connection: http.client.HTTPConnection, response: http.client.HTTPResponse | None
) -> None:
    # Both: a response the server will close owns the socket once the connection lets go.
    if response is not None:
        response.close()
    connection.close()


def _read_into(response: http.client.HTTPResponse, view: memoryview) -> int:
    """Receive the body straight into `view`: one readinto() that loops in C over recv_into,
    without the GIL while it waits; no temporary copy of the part."""
    got = 0
    while got < len(view):
        n = response.readinto(view[got:])
        if not n:
            break
        got += n
    return got


_XML_FIELD = re.compile(r"<(Code|Message|RequestId|Region)>(.*?)</\1>", re.S)
_ENTITIES = {"&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'", "&amp;": "&"}


def _s3_error(
    response: http.client.HTTPResponse, body: bytes, version_id: str | None, request_id: str
) -> S3Error:
    """S3's XML error body (Code, Message, RequestId), or what the status says without one."""
    fields = {
        name: re.sub(r"&\w+;", lambda m: _ENTITIES.get(m.group(), m.group()), value).strip()
        for name, value in _XML_FIELD.findall(body.decode("utf-8", "replace"))
    }
    status = response.status
    code = fields.get("Code") or {
        301: "PermanentRedirect",
        403: "AccessDenied",
        404: "NoSuchKey",
        416: "InvalidRange",
    }.get(status, f"HTTP{status}")
    return S3Error(
        status,
        code,
        fields.get("Message", ""),
        fields.get("RequestId") or request_id,
        version_id=version_id,
        encryption=response.getheader("x-amz-server-side-encryption"),
        region=response.getheader("x-amz-bucket-region") or fields.get("Region"),
    )
