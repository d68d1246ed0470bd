"""The `lazyserve` command line: init, demo, serve, invoke, push, convert (`lazyserve --help`)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import logging
import os
import resource
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from lazyserve.errors import LazyserveError

__all__ = ["main"]

DEFAULT_APP = "handler.app:app"
DEFAULT_HANDLER = "handler.app.handler"


class CommandError(Exception):
    """A one-line error for the user: `lazyserve CMD: error: argument ARG: message`."""

    def __init__(self, argument: str | None, message: str, code: int = 1) -> None:
        super().__init__(f"argument {argument}: {message}" if argument else message)
        self.code = code


def _importable_cwd() -> None:
    # Like `uvicorn --app-dir .`: the reference function lives in ./handler, not in site-packages.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), as uvicorn would bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        argument = "--host" if isinstance(exc, socket.gaierror) else "--port"
        raise CommandError(argument, f"cannot listen on {host}:{port}: {reason}") from None
    # Listening now, not when uvicorn starts: a request sent as soon as the demo prints its
    # URL waits in the backlog instead of being refused.
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _load_app(app: str) -> Any:
    from uvicorn.importer import ImportFromStringError, import_from_string

    _importable_cwd()
    try:
        return import_from_string(app)
    except ImportFromStringError as exc:
        raise CommandError("APP", f"{app}: {exc}", code=2) from None
    except LazyserveError as exc:  # a setting the app refused while importing
        raise CommandError(None, f"{app}: {type(exc).__name__}: {exc}") from None


def serve(app: str, host: str, port: int, workers: int, body_timeout: float | None = None) -> int:
    import uvicorn

    if body_timeout is not None:
        # A setting, so that it reaches the app in every worker process (each imports it).
        os.environ["LAZYSERVE_BODY_TIMEOUT"] = repr(body_timeout)

    if workers > 1:
        # Each worker imports the app itself; the parent only checks that the module exists.
        _importable_cwd()
        module = app.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise CommandError("APP", f"{app}: no module named {module!r}", code=2)
        _listen(host, port).close()
        uvicorn.run(app, host=host, port=port, workers=workers)
        return 0
    asgi = _load_app(app)
    sock = _listen(host, port)
    server = uvicorn.Server(uvicorn.Config(asgi, host=host, port=port))
    # uvicorn announces the address only for sockets it binds itself.
    bound = sock.getsockname()[1]
    where = f"[{host}]" if ":" in host else host
    logging.getLogger("uvicorn.error").info(
        "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", where, bound
    )
    server.run(sockets=[sock])
    return 0


def demo(port: int) -> int:
    """The repository's demo (`make demo`): its module, `handler/demo.py`, embeds an S3 endpoint
    and serves the reference function; it is not part of the installed library."""
    _importable_cwd()
    try:
        module = importlib.import_module("handler.demo")
    except ModuleNotFoundError as exc:
        if exc.name not in ("handler", "handler.demo"):
            raise
        raise CommandError(
            None,
            "the demo is the lazyserve repository's reference function: run `make demo` (or "
            "`lazyserve demo`) from a clone of it; to start a project of your own, run "
            "`lazyserve init DIR`",
        ) from None
    result: int = module.main(port)
    return result


@dataclass
class FakeContext:
    """What the Lambda runtime hands a handler, enough for `lazyserve invoke`."""

    function_name: str = "lazyserve-local"
    memory_limit_in_mb: str = "3008"
    aws_request_id: str = ""
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:000000000000:function:lazyserve-local"
    deadline: float = 0.0

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.time()) * 1000))


def _read_event(path: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CommandError("EVENT.json", f"{path}: no such file", code=2) from None
    except IsADirectoryError:
        raise CommandError(
            "EVENT.json", f"{path}: is a directory, not an event file", code=2
        ) from None
    except UnicodeDecodeError as exc:
        raise CommandError(
            "EVENT.json", f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", code=2
        ) from None
    except OSError as exc:
        raise CommandError("EVENT.json", f"{path}: {exc.strerror}", code=2) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(
            "EVENT.json",
            f"{path}: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            code=2,
        ) from None


def _handler_path(text: str) -> str:
    """argparse type: MODULE.FUNCTION, each part a Python name (awslambdaric's _HANDLER)."""
    module, _, attr = text.rpartition(".")
    if not module or not all(part.isidentifier() for part in (*module.split("."), attr)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not MODULE.FUNCTION (e.g. {DEFAULT_HANDLER})"
        )
    return text


def _app_path(text: str) -> str:
    """argparse type: MODULE:ATTRIBUTE, as uvicorn takes it."""
    module, _, attr = text.partition(":")
    if (
        not module
        or not attr
        or not all(p.isidentifier() for p in (*module.split("."), *attr.split(".")))
    ):
        raise argparse.ArgumentTypeError(f"{text!r} is not MODULE:ATTRIBUTE (e.g. {DEFAULT_APP})")
    return text


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 to 65535 (0: a free one)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port: accepted: 0 to 65535 (0 picks a free one)"
        )
    return port


def _seconds(text: str) -> float:
    """argparse type: a number of seconds above 0, at most 3600."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not accepted: a number of seconds above 0, at most 3600"
        )
    return seconds


def _positive(text: str) -> int:
    """argparse type: a whole number, 1 or more."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted: a whole number, 1 or more")
    return number


def _import_handler(handler_path: str) -> Any:
    """The handler function; a module that fails while importing raises as Lambda's INIT would."""
    _importable_cwd()
    module_name, _, attr = handler_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the module asked for (or a package on its path) missing is the argument's fault;
        # a missing import inside the module is the module's own init error.
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise
        raise CommandError(
            "--handler",
            f"{handler_path}: no module named {exc.name!r} (run from the directory that holds it)",
            code=2,
        ) from None
    handler = getattr(module, attr, None)
    if handler is None:
        raise CommandError(
            "--handler", f"{handler_path}: module {module_name!r} has no attribute {attr!r}", code=2
        )
    if not callable(handler):
        kind = type(handler).__name__
        raise CommandError("--handler", f"{handler_path}: not a function but a {kind}", code=2)
    call = handler if inspect.isroutine(handler) else type(handler).__call__
    if inspect.iscoroutinefunction(call):
        raise CommandError(
            "--handler",
            f"{handler_path} is an ASGI app or a coroutine, not a Lambda handler: give the "
            f"handler function (`handler = service.handler`), e.g. {DEFAULT_HANDLER}",
            code=2,
        )
    return handler


def invoke(events: Sequence[str], handler_path: str, repeat: int) -> int:
    """Run the Lambda handler here like `sam local invoke`, one REPORT line per invocation."""
    payloads = [_read_event(p) for p in events]
    started = time.perf_counter()
    try:
        handler = _import_handler(handler_path)
    except CommandError:
        raise
    except Exception as exc:  # the module's INIT failed: reported as Lambda reports it
        print(json.dumps({"errorType": type(exc).__name__, "errorMessage": str(exc)}))
        return 1
    init_ms = (time.perf_counter() - started) * 1000
    failures = 0
    first = True
    for _ in range(repeat):
        for payload in payloads:
            context = FakeContext(aws_request_id=str(uuid.uuid4()), deadline=time.time() + 900)
            begin = time.perf_counter()
            try:
                result: Any = handler(payload, context)
                print(json.dumps(result))
            except Exception as exc:
                failures += 1
                error = {
                    "errorType": type(exc).__name__,
                    "errorMessage": str(exc),
                    "stackTrace": traceback.format_tb(exc.__traceback__),
                }
                print(json.dumps(error))
            duration = (time.perf_counter() - begin) * 1000
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; bytes on macOS
            max_mb = peak // (1024 * 1024 if sys.platform == "darwin" else 1024)
            init = f"\tInit Duration: {init_ms:.2f} ms" if first else ""
            print(
                f"REPORT RequestId: {context.aws_request_id}\tDuration: {duration:.2f} ms\t"
                f"Max Memory Used: {max_mb} MB{init}\t{'cold' if first else 'warm'}",
                flush=True,
            )
            first = False
    return 1 if failures else 0


def push(file: str, uri: str) -> int:
    from lazyserve.errors import ModelFormatError
    from lazyserve.publish import push as push_file
    from lazyserve.publish import push_directory

    path = Path(file)
    try:
        if path.is_dir():
            pushed_dir = push_directory(path, uri)
        else:
            pushed = push_file(path, uri)
    except (FileNotFoundError, IsADirectoryError, PermissionError, ModelFormatError) as exc:
        raise CommandError("FILE", str(exc)) from None
    except OSError as exc:
        raise CommandError("FILE", f"{file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CommandError("URI", str(exc)) from None
    except LazyserveError as exc:  # S3 refused or failed the upload
        raise CommandError("URI", str(exc)) from None
    if path.is_dir():
        print(f"uri: {pushed_dir.uri}")
        print(f"files: {len(pushed_dir.files)}")
        for item in pushed_dir.files:
            name = item.uri.removeprefix(pushed_dir.uri)
            if name in pushed_dir.weights:
                print(f"sha256 {name}: {item.sha256}")
        return 0
    print(f"uri: {pushed.uri}")
    print(f"sha256: {pushed.sha256}")
    print(f"size: {pushed.size}")
    print(f"version_id: {pushed.version_id or '-'}")
    return 0


def convert(source: str, target: str) -> int:
    from lazyserve.publish import convert as convert_file
    from lazyserve.publish import file_digests

    out = Path(target)
    if out.is_dir():
        raise CommandError("OUT.safetensors", f"{target}: is a directory; give a file name")
    if not out.parent.is_dir():
        raise CommandError("OUT.safetensors", f"{target}: no directory {out.parent}")
    try:
        count = convert_file(Path(source), Path(target))
    except ValueError as exc:
        raise CommandError("OUT.safetensors", str(exc)) from None
    except (LazyserveError, FileNotFoundError, IsADirectoryError) as exc:
        raise CommandError("IN.pt", str(exc)) from None
    except OSError as exc:  # the output could not be written
        raise CommandError("OUT.safetensors", str(exc)) from None
    digest = file_digests(Path(target), crcs=False)["sha256"]
    print(f"wrote {target}: {count} tensors, sha256 {digest}")
    return 0


def init(directory: str, name: str | None, force: bool, huggingface: bool) -> int:
    from lazyserve.errors import InitError
    from lazyserve.scaffold import DEFAULT_TEMPLATE, init_project

    template = "huggingface" if huggingface else DEFAULT_TEMPLATE
    try:
        project = init_project(Path(directory), name=name, template=template, force=force)
    except InitError as exc:
        raise CommandError("--name" if exc.field == "name" else "DIR", str(exc)) from None
    print(project.summary())
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, naming the argument; `--help` has the usage.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="lazyserve", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("demo", help="embedded S3 + the reference function on 127.0.0.1")
    p.add_argument("--port", type=_port, default=8000, help="0 picks a free port (default 8000)")
    p = sub.add_parser("serve", help="serve an ASGI app with uvicorn")
    p.add_argument("app", nargs="?", default=DEFAULT_APP, type=_app_path, metavar="APP")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--workers", type=_positive, default=1)
    p.add_argument(
        "--body-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="answer 408 and close the connection when a request body is not complete SECONDS "
        "after the request started (default: LAZYSERVE_BODY_TIMEOUT, else 30)",
    )
    p = sub.add_parser("invoke", help="run the Lambda handler on event files, like sam local")
    p.add_argument("events", nargs="+", metavar="EVENT.json")
    p.add_argument("--handler", default=DEFAULT_HANDLER, type=_handler_path)
    p.add_argument("--repeat", type=_positive, default=1)
    p = sub.add_parser(
        "push", help="upload weights (a file, or a save_pretrained directory) with their sha256"
    )
    p.add_argument("file", metavar="FILE", help="a weights file, or a save_pretrained directory")
    p.add_argument(
        "uri", metavar="URI", help="s3://bucket/key, s3://bucket/prefix/, or s3://bucket/dir/"
    )
    p = sub.add_parser("convert", help="a .pt state dict (weights_only=True) to safetensors")
    p.add_argument("source", metavar="IN.pt")
    p.add_argument("target", metavar="OUT.safetensors")
    p = sub.add_parser("init", help="write a new function project (model, app, tests, deployment)")
    p.add_argument(
        "directory", metavar="DIR", help="created if missing; its name names the project"
    )
    p.add_argument("--name", help="the project's name, if not DIR's (e.g. my-model)")
    p.add_argument("--force", action="store_true", help="write into a non-empty DIR")
    p.add_argument(
        "--huggingface",
        action="store_true",
        help="a transformers text classifier served from its save_pretrained directory in S3 "
        "(default: your own nn.Module and its safetensors weights)",
    )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "demo":
            return demo(args.port)
        if args.command == "serve":
            return serve(args.app, args.host, args.port, args.workers, args.body_timeout)
        if args.command == "push":
            return push(args.file, args.uri)
        if args.command == "convert":
            return convert(args.source, args.target)
        if args.command == "init":
            return init(args.directory, args.name, args.force, args.huggingface)
        return invoke(args.events, args.handler, args.repeat)
    except CommandError as exc:
        print(f"lazyserve {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:  # Ctrl-C: uvicorn shut down cleanly and passed the signal on
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
