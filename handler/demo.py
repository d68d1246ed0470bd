"""`make demo` (or `lazyserve demo` in this repository): an embedded S3 endpoint (moto) on loopback,
the reference weights uploaded to it, and the digits function served by uvicorn, loading from
that endpoint on the first request. Run `python -m handler.demo [--port N]`."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

BUCKET = "lazyserve-demo"
KEY = "digits/digits.safetensors"
WEIGHTS = Path(__file__).parent / "weights" / "digits.safetensors"
DIGIT = 1791  # a held-out "4" of scikit-learn's digits (not used in training)


def main(port: int = 8000) -> int:
    """Serve the demo on 127.0.0.1:`port` (0: a free one) until Ctrl-C; 1 when it cannot."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        print(f"lazyserve demo: error: the demo needs moto ({exc.name} is missing): make demo")
        return 1
    # The embedded S3 runs on werkzeug in this process: its access lines are the demo's
    # plumbing, not the service a newcomer is looking at.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        sock = _listen(port)
    except OSError as exc:
        print(f"lazyserve demo: error: cannot listen on 127.0.0.1:{port}: {exc.strerror}")
        return 1
    port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, s3_port = server.get_host_and_port()
        endpoint = f"http://{host}:{s3_port}"
        # The embedded S3 takes any credentials; these keep boto3 from looking for real ones.
        os.environ.update(
            AWS_ACCESS_KEY_ID="demo",
            AWS_SECRET_ACCESS_KEY="demo",
            AWS_REGION="us-east-1",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL_S3=endpoint,
            LAZYSERVE_MODEL_URI=f"s3://{BUCKET}/{KEY}",
        )
        data = WEIGHTS.read_bytes()
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(
            Bucket=BUCKET, Key=KEY, Body=data, Metadata={"sha256": hashlib.sha256(data).hexdigest()}
        )
        label, pixels = _digit()
        body = json.dumps({"inputs": [pixels]}, separators=(",", ":"))
        from handler.app import app

        print(f"embedded S3 at {endpoint}: s3://{BUCKET}/{KEY} ({len(data)} bytes)")
        print(f"serving the digits function on http://127.0.0.1:{port} (Ctrl-C stops)")
        print(f'try it (a real handwritten {label}; expect "label":{label}):')
        print(
            f"  curl -s http://127.0.0.1:{port}/predict "
            f"-H 'content-type: application/json' -d '{body}'",
            flush=True,
        )
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=_log_config())
        # Ctrl-C: uvicorn shuts down, then passes the interrupt on (the caller's exit 130).
        uvicorn.Server(config).run(sockets=[sock])
        return 0
    finally:
        sock.close()
        server.stop()


def _listen(port: int) -> socket.socket:
    # Bound and listening before uvicorn starts: a request sent as soon as the demo prints its
    # URL waits in the backlog instead of being refused.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _log_config() -> dict[str, Any]:
    # uvicorn's own configuration, minus its start-up lines (the demo prints its own banner):
    # what is left is its access log, and any warning or error.
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["uvicorn.error"]["level"] = "WARNING"
    return config


def _digit() -> tuple[int, list[int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return int(digits.target[DIGIT]), [int(v) for v in digits.data[DIGIT]]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m handler.demo", description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    try:
        sys.exit(main(parser.parse_args().port))
    except KeyboardInterrupt:
        sys.exit(130)
