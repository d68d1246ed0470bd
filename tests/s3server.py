"""moto's S3 server over real HTTP on 127.0.0.1, counting the requests it receives and able to
misbehave on demand (for fault tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# A fault sees each request first; it returns a WSGI app to answer instead of moto, or None.
Fault = Callable[["Request"], WSGIApp | None]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    range: str | None
    headers: dict[str, str]


class CountingS3Server(ThreadedMotoServer):
    """ThreadedMotoServer bound to 127.0.0.1 on a free port, with a request log and faults."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.requests: list[Request] = []
        self.fault: Fault | None = None
        self._log_lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def object_gets(self, bucket: str, key: str) -> list[Request]:
        """GET requests for one object (the ranged reads of loads)."""
        return [r for r in self.requests if r.method == "GET" and r.path == f"/{bucket}/{key}"]

    def clear(self) -> None:
        with self._log_lock:
            self.requests.clear()

    def _server_entry(self) -> None:
        moto_app = DomainDispatcherApplication(create_backend_app)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            request = Request(
                method=environ["REQUEST_METHOD"],
                path=environ.get("PATH_INFO", ""),
                query=environ.get("QUERY_STRING", ""),
                range=environ.get("HTTP_RANGE"),
                headers={
                    k[5:].replace("_", "-").lower(): str(v)
                    for k, v in environ.items()
                    if k.startswith("HTTP_")
                },
            )
            with self._log_lock:
                self.requests.append(request)
            fault = self.fault
            replacement = fault(request) if fault is not None else None
            if replacement is not None:
                return replacement(environ, start_response)
            result: Iterable[bytes] = moto_app(environ, start_response)
            return result

        self._server = make_server(
            self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()
