"""A small S3 client for the ranged GETs of a load: keep-alive `http.client` connections, requests
addressed and signed by botocore (`endpoints.py`, `signing.py`), bounded time for everything
(connect, each read, each whole body: `deadlines.py`), and retries as botocore's standard mode
makes them. ListObjectsV2 answers are read in `listing.py`, S3's errors in `s3errors.py`.

Why not botocore's own client for these GETs: a ranged GET through a warm botocore client costs
several times the CPU of one here (about 2 ms against 0.5 ms measured on 2 vCPUs), all of it
under the GIL, so botocore's parallel GETs largely go out one after another; and a plain-HTTP
body is received straight into the load's buffer (docs/how-a-load-works.md, "A GET client of its
own"). What is security-critical (credentials, signatures, endpoints) stays botocore's. Requests
through a proxy go through urllib3 (botocore's HTTP library), which speaks TLS to an `https://`
proxy where http.client cannot."""

from __future__ import annotations

import functools
import http.client
import os
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote

from lazyserve.sources import deadlines
from lazyserve.sources.endpoints import (
    Endpoint,
    Proxy,
    endpoint_inputs,
    proxy_for,
    region_of,
    resolve_endpoint,
)
from lazyserve.sources.listing import Listed, Listing, parse_listing, xml_field
from lazyserve.sources.s3errors import (
    EXPIRED_CODES,
    PreconditionFailed,
    RangeHead,
    S3Error,
    TransferError,
    parse_error,
)
from lazyserve.sources.signing import Signer, user_agent

__all__ = [
    "ATTEMPTS",
    "CONNECT_TIMEOUT",
    "READ_TIMEOUT",
    "ObjectStat",
    "RangeClient",
    "S3GetClient",
]

CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0
"""Seconds any one read may wait for a byte."""
ATTEMPTS = 3  # per request, the first included: S3 errors worth retrying, connections, bodies
BACKOFF = 0.1  # seconds before the first retry (with jitter), doubling, at most BACKOFF_MAX
BACKOFF_MAX = 2.0
_ERROR_BODY_LIMIT = 64 * 1024
_DOCUMENT_LIMIT = 4 * 1024 * 1024  # a ListObjectsV2 page of 1,000 keys is well under 1 MiB
LIST_PAGES = 10


class ObjectStat(NamedTuple):
    """What a cheap look at an object says: its size, ETag and version id (None unversioned)."""

    size: int
    etag: str | None
    version_id: str | None


class RangeClient(Protocol):
    """What a load needs of an S3 client: `S3GetClient`, or a caller's boto3 client wrapped in
    `boto.Boto3Ranges`."""

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
    ) -> RangeHead: ...

    def stat(self, bucket: str, key: str, version_id: str | None = None) -> ObjectStat: ...

    def list_objects(self, bucket: str, prefix: str) -> Listing: ...

    def close(self) -> None: ...


class _Response(Protocol):
    status: int

    def getheader(self, name: str) -> str | None: ...
    def readinto(self, view: memoryview) -> int: ...
    def read(self, amount: int) -> bytes: ...


class S3GetClient:
    """GETs (and looks at) S3 objects; one per process is enough, and threads share it.

    `environ` supplies the endpoint, region and proxy variables (default os.environ, read when
    the client is made); `endpoint_url`/`region` override them; `session` is the
    botocore session whose credentials sign the requests (default: a new one)."""

    def __init__(
        self,
        *,
        environ: Mapping[str, str] | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        session: Any = None,
    ) -> None:
        env = dict(os.environ if environ is None else environ)
        if endpoint_url is not None:
            env["AWS_ENDPOINT_URL_S3"] = endpoint_url
        self._environ = env
        self.signer = Signer(session)
        self._region = region
        self._regions: dict[str, str] = {}  # buckets S3 said live in another region
        self._endpoints: dict[tuple[str, str], Endpoint] = {}
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._proxied: dict[str, Any] = {}  # proxy URL -> urllib3.ProxyManager
        self._lock = threading.Lock()
        self._ssl: Any = None
        self._agent: str | None = None
        self.connections = 0  # connections opened, for tests and benchmarks
        self.requests = 0

    @property
    def region(self) -> str:
        if self._region is None:
            self._region = region_of(self._environ, self.signer.session)
        return self._region

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
        deadline: float | None = None,
    ) -> RangeHead:
        """GET bytes start..end; `into(head)` checks the response's head and gives the buffer
        its body goes to (it may raise to refuse the response). Retries up to ATTEMPTS times
        whatever broke: an S3 error worth retrying, a connection, a timeout, a short or slow
        body. Each attempt must finish by `body_deadline(size)`, and all by `deadline`."""
        headers = {"Range": f"bytes={start}-{end}"}
        if if_match is not None:
            headers["If-Match"] = if_match
        return self._request("GET", bucket, key, version_id, headers, start, end, into, deadline)

    def stat(self, bucket: str, key: str, version_id: str | None = None) -> ObjectStat:
        """Size, ETag and version id, from a 1-byte GET (S3's error codes come with a body;
        a HEAD's do not); an empty object, which has no byte 0, is looked at with a HEAD."""

        def keep(head: RangeHead) -> memoryview:
            return memoryview(bytearray(head.last - head.first + 1 if head.ranged else 0))

        try:
            found = self._request(
                "GET", bucket, key, version_id, {"Range": "bytes=0-0"}, 0, 0, keep, None
            )
        except S3Error as exc:
            if exc.code != "InvalidRange":
                raise
            found = self._request("HEAD", bucket, key, version_id, {}, 0, 0, None, None)
            return ObjectStat(0, found.etag or None, found.version_id)
        return ObjectStat(found.total, found.etag or None, found.version_id)

    def list_objects(self, bucket: str, prefix: str) -> Listing:
        """The objects directly under `prefix` and its sub-prefixes (ListObjectsV2 with the
        delimiter `/`; s3:ListBucket on the prefix), at most LIST_PAGES pages of 1,000."""
        objects: list[Listed] = []
        prefixes: list[str] = []
        token: str | None = None
        for _ in range(LIST_PAGES):
            params = {"list-type": "2", "prefix": prefix, "delimiter": "/"}
            if token is not None:
                params["continuation-token"] = token
            query = "?" + "&".join(
                f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                for k, v in sorted(params.items())
            )
            pages: list[bytes] = []
            self._request(
                "GET", bucket, "", None, {}, 0, 0, None, None, query=query, into_doc=pages
            )
            body = pages[0].decode("utf-8", "replace")
            page = parse_listing(body)
            objects += page.objects
            prefixes += page.prefixes
            token = xml_field(body, "NextContinuationToken")
            if xml_field(body, "IsTruncated") != "true" or not token:
                return Listing(objects, prefixes)
        raise TransferError(f"more than {LIST_PAGES * 1000} objects under it", start=0, end=0)

    def prepare(self, bucket: str) -> None:
        """Find the credentials and the bucket's endpoint now (botocore's imports included),
        without a request: what a load would do first."""
        self._endpoint(bucket)
        self.signer.credentials()

    def close(self) -> None:
        """Close the idle connections."""
        with self._lock:
            idle, self._idle = self._idle, {}
            proxied, self._proxied = self._proxied, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()
        for manager in proxied.values():
            manager.clear()

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
        deadline: float | None,
        *,
        query: str | None = None,
        into_doc: list[bytes] | None = None,
    ) -> RangeHead:
        attempt = 0
        redirected = refreshed = False
        while True:
            attempt += 1
            limit = deadlines.body_deadline(end - start + 1)
            if deadline is not None:
                limit = min(limit, deadline)
            try:
                return self._once(
                    method, bucket, key, version_id, headers, start, end, into, limit,
                    query=query, into_doc=into_doc,
                )  # fmt: skip
            except S3Error as exc:
                region = exc.region
                if region and region != self._region_of(bucket) and not redirected:
                    with self._lock:
                        self._regions[bucket] = region
                    redirected = True
                    attempt -= 1  # S3 told us where to go: not a failed attempt
                    continue
                if exc.code in EXPIRED_CODES and not refreshed:
                    self.signer.invalidate()
                    refreshed = True
                elif not exc.retryable or attempt >= ATTEMPTS:
                    raise
            except TransferError as exc:
                if attempt >= ATTEMPTS or (deadline is not None and time.monotonic() >= deadline):
                    exc.detail = f"{exc.detail} ({attempt} attempts)"
                    exc.args = (exc.detail,)
                    raise
            pause = min(BACKOFF_MAX, BACKOFF * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)

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
        deadline: float,
        *,
        query: str | None = None,
        into_doc: list[bytes] | None = None,
    ) -> RangeHead:
        self.requests += 1
        endpoint = self._endpoint(bucket)
        if query is None:
            query = _version_query(version_id)
        target = (endpoint.path(key) if key else endpoint.root()) + query
        url = f"{endpoint.scheme}://{endpoint.netloc}{target}"
        headers = self.signer.sign(
            method,
            url,
            {"Host": endpoint.netloc, "User-Agent": self._user_agent(), **extra},
            region=endpoint.signing_region,
            name=endpoint.signing_name,
        )
        proxy = proxy_for(endpoint, self._environ)
        watch = deadlines.watch(deadline)
        response: _Response | None = None
        head: RangeHead | None = None
        release: Callable[[bool], None] = _nothing
        try:
            raw: socket.socket | None = None
            if proxy is None:
                response, release, raw = self._direct(endpoint, method, target, headers, watch)
            else:
                response, release = self._through(proxy, method, url, headers, watch)
            head = _head(response, version_id)
            if response.status >= 300:
                body = response.read(_ERROR_BODY_LIMIT) if method != "HEAD" else b""
                if response.status == 412:
                    raise PreconditionFailed
                raise parse_error(
                    response.status, body, response.getheader, version_id, head.request_id
                )
            if into_doc is not None:  # a document (a listing): all of it, within a bound
                document = response.read(_DOCUMENT_LIMIT + 1)
                if len(document) > _DOCUMENT_LIMIT:
                    raise TransferError(
                        f"an answer longer than {_DOCUMENT_LIMIT} bytes", start=0, end=0
                    )
                into_doc.append(document)
                release(True)
                return head
            view = into(head) if into is not None else memoryview(b"")
            if (
                raw is not None
                and isinstance(response, http.client.HTTPResponse)
                and _plain_body(response, len(view))
            ):
                got = _receive(response, raw, view)
            else:
                got = _read_into(response, view)
            if watch.expired:
                raise TransferError(
                    f"the body came slower than {deadlines.BODY_FLOOR // 1024} KiB/s ({got} of "
                    f"{len(view)} bytes when its time ran out)",
                    start=start,
                    end=end,
                    answered=head,
                )
            if got != len(view):
                raise TransferError(
                    f"the body ended after {got} of {len(view)} bytes",
                    start=start,
                    end=end,
                    answered=head,
                )
            if into is None:
                response.read(_ERROR_BODY_LIMIT)
            release(True)
            return head
        except (OSError, http.client.HTTPException) as exc:
            release(False)
            if watch.expired:
                detail = f"{endpoint.netloc} took longer than the time a part may take"
            elif isinstance(exc, TimeoutError):
                detail = f"ReadTimeoutError: {endpoint.netloc} sent nothing for {READ_TIMEOUT:g} s"
            else:
                detail = f"{type(exc).__name__}: {exc}"
            raise TransferError(detail, start=start, end=end, answered=head) from exc
        except BaseException:
            # An S3 error, a short or slow body, or `into` refusing the response: its body is
            # unread, so the connection cannot be reused.
            release(False)
            raise
        finally:
            watch.finish()

    # --- addressing -------------------------------------------------------------------------

    def _endpoint(self, bucket: str) -> Endpoint:
        region = self._region_of(bucket)
        found = self._endpoints.get((bucket, region))
        if found is None:
            inputs = endpoint_inputs(bucket, region, self._environ, self.signer.session)
            found = self._endpoints[(bucket, region)] = resolve_endpoint(inputs)
        return found

    def _region_of(self, bucket: str) -> str:
        return self._regions.get(bucket) or self.region

    def _user_agent(self) -> str:
        if self._agent is None:
            self._agent = user_agent()
        return self._agent

    # --- connections ------------------------------------------------------------------------

    def _direct(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: dict[str, str],
        watch: deadlines.Watch,
    ) -> tuple[_Response, Callable[[bool], None], socket.socket | None]:
        place = (endpoint.scheme, endpoint.host, endpoint.port)
        connection, reused = self._connection(endpoint, place)
        # The socket itself, not the connection's attribute: http.client lets go of it (sets
        # `sock` to None) when a response will close the connection, and reads on through it.
        sock = connection.sock
        watch.arm(functools.partial(_shut, sock))
        try:
            connection.request(method, target, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            if not reused or isinstance(exc, TimeoutError) or watch.expired:
                raise
            # An idle keep-alive connection the server had closed: not a failed attempt.
            connection, _ = self._connection(endpoint, place)
            sock = connection.sock
            watch.arm(functools.partial(_shut, sock))
            connection.request(method, target, headers=headers)
            response = connection.getresponse()

        def release(reuse: bool) -> None:
            if reuse and not response.will_close and response.isclosed():
                with self._lock:
                    self._idle.setdefault(place, []).append(connection)
                return
            # Both: a response the server will close owns the socket once the connection
            # lets go.
            response.close()
            connection.close()

        # A TLS socket decrypts in OpenSSL, one record per call: only a plain one is read raw.
        return response, release, sock if endpoint.scheme == "http" else None

    def _connection(
        self, endpoint: Endpoint, place: tuple[str, str, int]
    ) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(place)
            if idle:
                return idle.pop(), True
            self.connections += 1
        connection: http.client.HTTPConnection
        if endpoint.scheme == "https":
            connection = http.client.HTTPSConnection(
                endpoint.host, endpoint.port, timeout=CONNECT_TIMEOUT, context=self._context()
            )
        else:
            connection = http.client.HTTPConnection(
                endpoint.host, endpoint.port, timeout=CONNECT_TIMEOUT
            )
        try:
            connection.connect()
        except TimeoutError as exc:
            connection.close()
            raise _unreachable(
                f"ConnectTimeoutError: could not connect to {endpoint.netloc} within "
                f"{CONNECT_TIMEOUT:g} s"
            ) from exc
        except OSError as exc:
            connection.close()
            raise _unreachable(
                f"{type(exc).__name__}: could not connect to {endpoint.netloc}: {exc}"
            ) from exc
        assert connection.sock is not None
        connection.sock.settimeout(READ_TIMEOUT)
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, False

    def _through(
        self, proxy: Proxy, method: str, url: str, headers: dict[str, str], watch: deadlines.Watch
    ) -> tuple[_Response, Callable[[bool], None]]:
        import urllib3

        with self._lock:
            manager = self._proxied.get(proxy.url)
            if manager is None:
                auth = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else None
                manager = self._proxied[proxy.url] = urllib3.ProxyManager(
                    proxy.url,
                    proxy_headers=auth,
                    timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT),
                    retries=False,
                    ssl_context=self._context(),
                    proxy_ssl_context=self._context() if proxy.scheme == "https" else None,
                )
                self.connections += 1
        try:
            raw = manager.request(
                method,
                url,
                headers=headers,
                preload_content=False,
                decode_content=False,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise _unreachable(
                f"{type(exc).__name__}: could not reach the endpoint through the proxy "
                f"{proxy.host}:{proxy.port}"
            ) from exc
        response = _Urllib3Response(raw)
        watch.arm(raw.shutdown)

        def release(reuse: bool) -> None:
            if reuse:
                raw.release_conn()
            else:
                raw.close()

        return response, release

    def _context(self) -> Any:
        if self._ssl is None:
            import ssl

            bundle = self._environ.get("AWS_CA_BUNDLE")
            self._ssl = ssl.create_default_context(cafile=bundle or None)
        return self._ssl


class _Urllib3Response:
    """A urllib3 response with the few methods of http.client's that the client uses."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.status = int(raw.status)

    def getheader(self, name: str) -> str | None:
        value = self._raw.headers.get(name)
        return None if value is None else str(value)

    def readinto(self, view: memoryview) -> int:
        return int(self._raw.readinto(view))

    def read(self, amount: int) -> bytes:
        return bytes(self._raw.read(amount))


def _unreachable(detail: str) -> TransferError:
    return TransferError(detail, start=0, end=0)


def _nothing(reuse: bool) -> None:
    pass


def _shut(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _version_query(version_id: str | None) -> str:
    if version_id is None:
        return ""
    return f"?versionId={quote(version_id, safe='-_.~')}"


def _head(response: _Response, version_id: str | None) -> RangeHead:
    get = response.getheader
    try:
        length = int(get("Content-Length") or 0)
    except ValueError:
        length = 0
    match = re.fullmatch(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19})", get("Content-Range") or "")
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
        crc32=get("x-amz-meta-crc32") or None,
        crc64nvme=get("x-amz-meta-crc64nvme") or None,
    )


def _plain_body(response: _Response, size: int) -> bool:
    """Is the body `size` bytes sent as they are (no chunked framing), so that the socket's
    bytes after the headers are the body's?"""
    coding = response.getheader("Transfer-Encoding")
    length = response.getheader("Content-Length")
    return (coding is None or coding.strip().lower() == "identity") and length == str(size)


def _receive(response: http.client.HTTPResponse, sock: socket.socket, view: memoryview) -> int:
    """Receive the body into `view` with few system calls and few GIL hand-offs: what
    http.client buffered with the headers first, then straight from the socket with
    MSG_WAITALL, which fills the view in the kernel (one call per part, the GIL released
    throughout; readinto() returns to Python for every segment that arrives, thousands of
    times a second over 16 connections). Each call waits at most READ_TIMEOUT (SO_RCVTIMEO)
    for the rest; a call that got nothing in that time is a timeout, as a read would be."""
    got = 0
    if len(view):
        # peek() gives the bytes already buffered (or reads once, as readinto() would).
        ahead = len(response.peek(1)[: len(view)])
        got = response.readinto(view[:ahead]) if ahead else 0
    if got < len(view):
        # Blocking, so that MSG_WAITALL waits in the kernel, each call for at most READ_TIMEOUT
        # (SO_RCVTIMEO; a socket with a Python timeout is non-blocking and ignores it).
        sock.settimeout(None)
        seconds = int(READ_TIMEOUT)
        timeout = struct.pack("ll", seconds, round((READ_TIMEOUT - seconds) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        try:
            while got < len(view):
                try:
                    n = sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
                except BlockingIOError:  # SO_RCVTIMEO passed with nothing received
                    raise TimeoutError("timed out") from None
                if not n:
                    break
                got += n
        finally:
            sock.settimeout(READ_TIMEOUT)
    # The body is read: done with this response (the connection stays open for the next).
    response.close()
    return got


def _read_into(response: _Response, view: memoryview) -> int:
    """Receive the body straight into `view`: readinto() loops in C over recv_into, without the
    GIL while it waits; no temporary copy of the part."""
    got = 0
    while got < len(view):
        n = response.readinto(view[got:])
        if not n:
            break
        got += n
    return got
