"""The `lazyserve` command line: demo, serve, invoke, push, convert (`lazyserve --help`)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["main"]

DEFAULT_APP = "handler.app:app"
DEFAULT_HANDLER = "handler.app.handler"
DEMO_BUCKET = "lazyserve-demo"
DEMO_KEY = "digits/digits.safetensors"
DEMO_WEIGHTS = Path("handler/weights/digits.safetensors")
DEMO_DIGIT = 1791  # a held-out "4" of scikit-learn's digits (not used in training)


def _importable_cwd() -> None:
    # Like `uvicorn --app-dir .`: the reference function lives in ./handler, not in site-packages.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def serve(app: str, host: str, port: int, workers: int) -> int:
    import uvicorn

    _importable_cwd()
    uvicorn.run(app, host=host, port=port, workers=workers)
    return 0


def demo(port: int) -> int:
    """An embedded S3 (moto) on loopback, the reference weights in it, the function on uvicorn."""
    import hashlib

    import boto3
    from moto.server import ThreadedMotoServer

    if not DEMO_WEIGHTS.is_file():
        print(f"error: {DEMO_WEIGHTS} not found: run `lazyserve demo` from the repository root")
        return 2
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, s3_port = server.get_host_and_port()
    endpoint = f"http://{host}:{s3_port}"
    # The embedded S3 takes any credentials; these keep boto3 from looking for real ones.
    os.environ.update(
        AWS_ACCESS_KEY_ID="demo",
        AWS_SECRET_ACCESS_KEY="demo",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=endpoint,
        LAZYSERVE_MODEL_URI=f"s3://{DEMO_BUCKET}/{DEMO_KEY}",
    )
    data = DEMO_WEIGHTS.read_bytes()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=DEMO_BUCKET)
    s3.put_object(
        Bucket=DEMO_BUCKET,
        Key=DEMO_KEY,
        Body=data,
        Metadata={"sha256": hashlib.sha256(data).hexdigest()},
    )
    label, pixels = _demo_digit()
    body = json.dumps({"inputs": [pixels]}, separators=(",", ":"))
    print(f"embedded S3 at {endpoint}: s3://{DEMO_BUCKET}/{DEMO_KEY} ({len(data)} bytes)")
    print(f"serving the digits function on http://127.0.0.1:{port} (Ctrl-C stops)")
    print(f'try it (a real handwritten {label}; expect "label":{label}):')
    print(
        f"  curl -s http://127.0.0.1:{port}/predict "
        f"-H 'content-type: application/json' -d '{body}'",
        flush=True,
    )
    try:
        return serve(DEFAULT_APP, "127.0.0.1", port, 1)
    finally:
        server.stop()


def _demo_digit() -> tuple[int, list[int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return int(digits.target[DEMO_DIGIT]), [int(v) for v in digits.data[DEMO_DIGIT]]


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


def invoke(events: Sequence[str], handler_path: str, repeat: int) -> int:
    """Run the Lambda handler here like `sam local invoke`, one REPORT line per invocation."""
    payloads = [json.loads(Path(p).read_text()) for p in events]
    _importable_cwd()
    module_name, _, attr = handler_path.rpartition(".")
    started = time.perf_counter()
    try:
        handler = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:
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
    from lazyserve.errors import LazyserveError
    from lazyserve.publish import push as push_file

    try:
        pushed = push_file(Path(file), uri)
    except (LazyserveError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"uri: {pushed.uri}")
    print(f"sha256: {pushed.sha256}")
    print(f"size: {pushed.size}")
    print(f"version_id: {pushed.version_id or '-'}")
    return 0


def convert(source: str, target: str) -> int:
    from lazyserve.errors import LazyserveError
    from lazyserve.publish import convert as convert_file
    from lazyserve.publish import file_sha256

    try:
        count = convert_file(Path(source), Path(target))
    except (LazyserveError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {target}: {count} tensors, sha256 {file_sha256(Path(target))}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lazyserve", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="embedded S3 + the reference function on 127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p = sub.add_parser("serve", help="serve an ASGI app with uvicorn")
    p.add_argument("app", nargs="?", default=DEFAULT_APP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p = sub.add_parser("invoke", help="run the Lambda handler on event files, like sam local")
    p.add_argument("events", nargs="+", metavar="EVENT.json")
    p.add_argument("--handler", default=DEFAULT_HANDLER)
    p.add_argument("--repeat", type=int, default=1)
    p = sub.add_parser("push", help="upload weights to S3 with their sha256 (multipart)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("uri", metavar="s3://bucket/key")
    p = sub.add_parser("convert", help="a .pt state dict (weights_only=True) to safetensors")
    p.add_argument("source", metavar="IN.pt")
    p.add_argument("target", metavar="OUT.safetensors")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "demo":
        return demo(args.port)
    if args.command == "serve":
        return serve(args.app, args.host, args.port, args.workers)
    if args.command == "push":
        return push(args.file, args.uri)
    if args.command == "convert":
        return convert(args.source, args.target)
    return invoke(args.events, args.handler, args.repeat)


if __name__ == "__main__":
    raise SystemExit(main())
