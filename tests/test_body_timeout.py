"""Request bodies that never complete, against `lazyserve serve` over real sockets: each gets a
JSON 408 once the body timeout has passed and its connection is closed (uvicorn alone keeps such
a connection open for as long as the client does), while complete requests are served."""

from __future__ import annotations

import json
import os
import selectors
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import DIGIT_8, WEIGHTS, serving

TIMEOUT = 3  # the server's --body-timeout, seconds
CONNECTIONS = 200
HEAD = b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
STALLED = [
    # a body shorter than its Content-Length
    HEAD + b'Content-Length: 1000\r\n\r\n{"inputs": [[1, 2',
    # headers, then no body at all
    HEAD + b"Content-Length: 1000\r\n\r\n",
    # a chunked body without its last chunk
    HEAD + b'Transfer-Encoding: chunked\r\n\r\nc\r\n{"inputs": [\r\n',
]
DETAIL = (
    f"the request body was not complete {TIMEOUT} s after the request started (the server's "
    "body timeout, LAZYSERVE_BODY_TIMEOUT)"
)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def read_until_closed(socks: list[socket.socket], limit: float) -> dict[socket.socket, bytes]:
    """What each socket received until the server closed it (or `limit` seconds passed)."""
    received = {sock: b"" for sock in socks}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + limit
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[sock] += chunk
                else:  # the server closed the connection
                    selector.unregister(sock)
        assert not selector.get_map(), f"{len(selector.get_map())} connections still open"
    return received


def slow_but_complete(host: str, port: int) -> bytes:
    """A body sent in two parts, half a second apart: well inside the timeout."""
    body = json.dumps({"inputs": [DIGIT_8]}).encode()
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(HEAD + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        sock.sendall(body[:100])
        time.sleep(0.5)
        sock.sendall(body[100:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts the server's open fds")
def test_unfinished_bodies_get_a_408_and_their_connections_are_closed() -> None:
    with serving("--body-timeout", str(TIMEOUT), LAZYSERVE_MODEL_URI=str(WEIGHTS)) as (
        url,
        console,
    ):
        host, port = url.removeprefix("http://").split(":")
        with httpx.Client(base_url=url, timeout=30) as client:
            schema = client.get("/openapi.json").json()
        # The answer is part of the route's documented contract.
        documented = schema["paths"]["/predict"]["post"]["responses"]["408"]
        assert documented["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/TimedOutBody"
        }
        pid = console.process.pid
        before = open_fds(pid)
        socks = [socket.create_connection((host, int(port))) for _ in range(CONNECTIONS)]
        try:
            for i, sock in enumerate(socks):
                sock.sendall(STALLED[i % len(STALLED)])
            # Meanwhile a complete request is served, even one whose body comes slowly.
            answer = slow_but_complete(host, int(port))
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["predictions"][0]["label"] == 8
            received = read_until_closed(socks, TIMEOUT + 60)
        finally:
            for sock in socks:
                sock.close()
        for data in received.values():
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            assert lines[0] == "HTTP/1.1 408 Request Timeout", data
            assert "connection: close" in lines
            assert "content-type: application/json" in lines
            assert json.loads(body) == {"detail": DETAIL}
        # The server holds none of them: its descriptors are back to where they were.
        deadline = time.monotonic() + 30
        while open_fds(pid) > before:
            assert time.monotonic() < deadline, (open_fds(pid), before)
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/predict", json={"inputs": [DIGIT_8]}).status_code == 200
