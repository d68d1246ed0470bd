"""A small S3-compatible endpoint on 127.0.0.1 for benchmarks: objects served from files on disk
with S3's per-connection bandwidth and first-byte latency.

The model of S3: each connection carries at most `bandwidth` bytes/s (default 90 MB/s: AWS's
S3 performance guidelines count 85-90 MB/s per concurrent request,
https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance-guidelines.html)
and every request waits `latency` seconds (default 20 ms, an assumed first-byte time) before its
first byte. moto re-reads the whole object for each ranged GET, so it cannot
stand in for large objects; this endpoint serves ranges with os.sendfile, paced per connection
by a token bucket, so its own CPU cost stays small.

Supported: path-style `GET`/`HEAD /bucket/key` (`Range: bytes=a-b`, `a-`, `-n`), `ETag`,
ListObjectsV2 (`GET /bucket?list-type=2&prefix=...&delimiter=...`, one page),
`Last-Modified`, `Accept-Ranges`, `x-amz-request-id`, `x-amz-meta-*`, `If-Match` (412
PreconditionFailed), `If-None-Match` (304), `?versionId=` and S3's XML errors (NoSuchBucket,
NoSuchKey, NoSuchVersion, InvalidRange, PreconditionFailed, MethodNotAllowed).

    with S3Endpoint(bandwidth=90e6, latency=0.02) as s3:
        s3.add("bucket", "model.safetensors", "/path/to/file")
        boto3.client("s3", endpoint_url=s3.endpoint, ...)

CLI: `python -m benchmarks.s3endpoint --file PATH --bucket B --key K [--port N]`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import select
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

__all__ = ["DEFAULT_BANDWIDTH", "DEFAULT_LATENCY", "S3Endpoint", "S3Object"]

DEFAULT_BANDWIDTH = 90e6  # bytes/s per connection
DEFAULT_LATENCY = 0.020  # seconds before the first byte of every response
CHUNK = 256 * 1024  # bytes per sendfile call; also the token bucket's burst
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class S3Object:
    """One registered object: a file on disk, its ETag and metadata, computed once."""

    bucket: str
    key: str
    path: Path
    size: int
    etag: str  # quoted, as S3 sends it
    last_modified: str
    fd: int
    version_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    range: str | None
    status: int
    bytes_sent: int


class _Pacer:
    """A token bucket for one connection: at most `rate` bytes/s, bursts of one chunk."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - n
        self.stamp = now
        if self.tokens < 0:
            time.sleep(-self.tokens / self.rate)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    endpoint: S3Endpoint


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lazyserve-bench-s3"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes; without NODELAY, Nagle plus the client's
        # delayed ACK can stall the tail of a response by 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        endpoint = self.server.endpoint
        self.pacer = _Pacer(endpoint.bandwidth, CHUNK)
        endpoint._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.endpoint._track(self.connection, add=False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a benchmark endpoint stays quiet

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_PUT(self) -> None:
        self._not_allowed()

    def do_POST(self) -> None:
        self._not_allowed()

    def do_DELETE(self) -> None:
        self._not_allowed()

    def _not_allowed(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)  # keep the connection usable
        self._error(405, "MethodNotAllowed", "This benchmark endpoint only serves GET and HEAD.")

    def _serve(self, *, body: bool) -> None:
        endpoint = self.server.endpoint
        self.request_id = uuid.uuid4().hex[:16].upper()
        self.head_only = not body
        self.range_header = self.headers.get("Range")
        if endpoint.latency > 0:
            time.sleep(endpoint.latency)
        parts = urlsplit(self.path)
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        query = parse_qs(parts.query, keep_blank_values=True)
        if bucket not in endpoint.buckets:
            self._error(404, "NoSuchBucket", "The specified bucket does not exist", bucket=bucket)
            return
        if not key and query.get("list-type") == ["2"]:
            self._list(bucket, query)
            return
        obj = endpoint.objects.get((bucket, key))
        if not key or obj is None:
            self._error(404, "NoSuchKey", "The specified key does not exist.", key=key)
            return
        version = query.get("versionId", [None])[0]
        if version is not None and version != (obj.version_id or "null"):
            self._error(404, "NoSuchVersion", "The specified version does not exist.", key=key)
            return
        if_match = self.headers.get("If-Match")
        if if_match is not None and not _etag_matches(if_match, obj.etag):
            self._error(
                412,
                "PreconditionFailed",
                "At least one of the pre-conditions you specified did not hold",
                condition="If-Match",
            )
            return
        if_none_match = self.headers.get("If-None-Match")
        if if_none_match is not None and _etag_matches(if_none_match, obj.etag):
            self.send_response(304)
            self._object_headers(obj)
            self.end_headers()
            endpoint._log(self, 304, 0)
            return
        start, end, status = 0, obj.size - 1, 200
        if self.range_header is not None:
            parsed = _parse_range(self.range_header, obj.size)
            if parsed == "unsatisfiable":
                self._error(
                    416,
                    "InvalidRange",
                    "The requested range is not satisfiable",
                    extra={"Content-Range": f"bytes */{obj.size}"},
                    range_requested=self.range_header,
                    size=obj.size,
                )
                return
            if isinstance(parsed, tuple):  # S3 ignores a Range it cannot parse
                start, end = parsed
                status = 206
        length = end - start + 1
        self.send_response(status)
        self._object_headers(obj)
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{obj.size}")
        self.end_headers()
        sent = 0
        if body and length > 0:
            try:
                sent = self._send_file(obj.fd, start, length)
            except OSError:  # the client went away mid-body
                self.close_connection = True
        endpoint._log(self, status, sent)

    def _list(self, bucket: str, query: dict[str, list[str]]) -> None:
        """ListObjectsV2 with `prefix` and `delimiter`: one page of every match (up to 1,000
        keys; a benchmark bucket holds a few)."""
        prefix = query.get("prefix", [""])[0]
        delimiter = query.get("delimiter", [""])[0]
        with self.server.endpoint._lock:
            found = sorted(
                (k, o) for (b, k), o in self.server.endpoint.objects.items() if b == bucket
            )
        contents, prefixes = [], set()
        for key, obj in found:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
                continue
            contents.append(
                f"<Contents><Key>{escape(key)}</Key><LastModified>2026-01-01T00:00:00.000Z"
                f"</LastModified><ETag>{escape(obj.etag, {chr(34): '&quot;'})}</ETag>"
                f"<Size>{obj.size}</Size><StorageClass>STANDARD</StorageClass></Contents>"
            )
        common = "".join(
            f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>"
            for p in sorted(prefixes)
        )
        document = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
            f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount><MaxKeys>1000</MaxKeys>"
            f"<Delimiter>{escape(delimiter)}</Delimiter><IsTruncated>false</IsTruncated>"
            f"{''.join(contents)}{common}</ListBucketResult>"
        ).encode()
        self.send_response(200)
        self.send_header("x-amz-request-id", self.request_id)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(document)))
        self.end_headers()
        if not self.head_only:
            self.wfile.write(document)
        self.server.endpoint._log(self, 200, len(document))

    def _object_headers(self, obj: S3Object) -> None:
        self.send_header("x-amz-request-id", self.request_id)
        self.send_header("x-amz-id-2", self.request_id)
        self.send_header("Content-Type", "binary/octet-stream")
        self.send_header("ETag", obj.etag)
        self.send_header("Last-Modified", obj.last_modified)
        self.send_header("Accept-Ranges", "bytes")
        if obj.version_id is not None:
            self.send_header("x-amz-version-id", obj.version_id)
        for name, value in obj.metadata.items():
            self.send_header(f"x-amz-meta-{name}", value)

    def _send_file(self, fd: int, offset: int, count: int) -> int:
        sock = self.connection
        out = sock.fileno()
        sent = 0
        while sent < count:
            n = min(CHUNK, count - sent)
            self.pacer.take(n)
            done = 0
            while done < n:
                try:
                    k = os.sendfile(out, fd, offset + sent + done, n - done)
                except BlockingIOError:  # a socket with a timeout is non-blocking underneath
                    select.select([], [sock], [], 30.0)
                    continue
                if k == 0:
                    raise ConnectionResetError("sendfile sent nothing")
                done += k
            sent += n
        return sent

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        *,
        extra: dict[str, str] | None = None,
        **fields: Any,
    ) -> None:
        names = {
            "bucket": "BucketName",
            "key": "Key",
            "condition": "Condition",
            "range_requested": "RangeRequested",
            "size": "ActualObjectSize",
        }
        details = "".join(
            f"<{names[k]}>{escape(str(v))}</{names[k]}>" for k, v in fields.items() if v is not None
        )
        document = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>{details}"
            f"<RequestId>{self.request_id}</RequestId><HostId>{self.request_id}</HostId></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("x-amz-request-id", self.request_id)
        self.send_header("x-amz-id-2", self.request_id)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        # Like S3, a HEAD error has the status and headers but no body.
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.head_only else str(len(document)))
        self.end_headers()
        if not self.head_only:
            self.wfile.write(document)
        self.server.endpoint._log(self, status, 0)


def _etag_matches(header: str, etag: str) -> bool:
    wanted = {t.strip() for t in header.split(",")}
    return "*" in wanted or etag in wanted or etag.strip('"') in wanted


def _parse_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    match = _RANGE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        return "unsatisfiable"
    return start, end


class S3Endpoint:
    """The endpoint: register objects with `add`, point boto3 at `endpoint`, `close` when done."""

    def __init__(
        self,
        *,
        bandwidth: float = DEFAULT_BANDWIDTH,
        latency: float = DEFAULT_LATENCY,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.bandwidth = bandwidth
        self.latency = latency
        self.buckets: set[str] = set()
        self.objects: dict[tuple[str, str], S3Object] = {}
        self.requests: list[LoggedRequest] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._retired: list[int] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._server = _Server((host, port), _Handler)
        self._server.endpoint = self
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> S3Endpoint:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},
                name="bench-s3",
                daemon=True,
            )
            self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread = None
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # wake keep-alive threads blocked in a read
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            fds = [obj.fd for obj in self.objects.values()] + self._retired
            self.objects.clear()
            self._retired.clear()
        for fd in fds:
            os.close(fd)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> S3Endpoint:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def create_bucket(self, bucket: str) -> None:
        self.buckets.add(bucket)

    def add(
        self,
        bucket: str,
        key: str,
        path: str | os.PathLike[str],
        *,
        metadata: dict[str, str] | None = None,
        versioned: bool = False,
        etag: str | None = None,
    ) -> S3Object:
        """Serve the file at `path` as s3://bucket/key (replacing any object there).

        The ETag is a hash of the path, size and mtime, taken now (the file must not change
        afterwards); `versioned` adds an `x-amz-version-id`.
        """
        file = Path(path).resolve()
        stat = file.stat()
        if etag is None:
            etag = hashlib.md5(
                f"{file}:{stat.st_size}:{stat.st_mtime_ns}:{time.time_ns()}".encode(),
                usedforsecurity=False,
            ).hexdigest()
        obj = S3Object(
            bucket=bucket,
            key=key,
            path=file,
            size=stat.st_size,
            etag=f'"{etag.strip(chr(34))}"',
            last_modified=formatdate(stat.st_mtime, usegmt=True),
            fd=os.open(file, os.O_RDONLY),
            version_id=uuid.uuid4().hex if versioned else None,
            metadata=dict(metadata or {}),
        )
        with self._lock:
            self.buckets.add(bucket)
            old = self.objects.get((bucket, key))
            self.objects[(bucket, key)] = obj
            if old is not None:
                # Closed only in close(): a response may still be sending from it, and a
                # reused descriptor number would send another file's bytes.
                self._retired.append(old.fd)
        return obj

    def put(self, bucket: str, key: str, data: bytes, **kwargs: Any) -> S3Object:
        """Serve `data` (written to a temporary file owned by the endpoint)."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bench-s3-")
        path = Path(self._tmp.name) / uuid.uuid4().hex
        path.write_bytes(data)
        return self.add(bucket, key, path, **kwargs)

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def _log(self, handler: _Handler, status: int, sent: int) -> None:
        entry = LoggedRequest(handler.command, handler.path, handler.range_header, status, sent)
        with self._lock:
            self.requests.append(entry)

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.s3endpoint", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--file", required=True, type=Path, help="file to serve")
    parser.add_argument("--bucket", default="bench")
    parser.add_argument("--key", help="object key (default: the file's name)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH / 1e6, help="MB/s")
    parser.add_argument("--latency", type=float, default=DEFAULT_LATENCY * 1e3, help="ms")
    parser.add_argument("--versioned", action="store_true")
    args = parser.parse_args(argv)
    key = args.key or args.file.name
    s3 = S3Endpoint(bandwidth=args.bandwidth * 1e6, latency=args.latency / 1e3, port=args.port)
    obj = s3.add(args.bucket, key, args.file, versioned=args.versioned)
    with s3:
        print(f"serving s3://{args.bucket}/{key} ({obj.size} bytes, ETag {obj.etag})")
        print(f"  per connection {args.bandwidth:g} MB/s, first byte after {args.latency:g} ms")
        print(f"  export AWS_ENDPOINT_URL_S3={s3.endpoint}   (Ctrl-C stops)")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
