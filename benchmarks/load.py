"""Bounded load against the reference function under uvicorn, starting during its cold start.

`python -m benchmarks.load [--requests 5000] [--concurrency 64]` starts moto's S3 server in this
process (127.0.0.1, a free port) with the reference weights uploaded, starts uvicorn as a
subprocess on a socket bound to 127.0.0.1:0 (`--fd`), and, from this process, sends the
requests as soon as uvicorn answers /health, before anything has loaded the model. Meanwhile a
separate connection probes GET /health. Prints one JSON object: counts (successes, 5xx, loads,
S3 GETs), throughput, and p50/p99 latency of /predict and of /health during the load.

`python -m benchmarks.load --url http://127.0.0.1:PORT [--requests N] [--concurrency C]` drives
a server that is already running (the tests start their own) and prints the same client-side
figures. `run(requests, concurrency)` returns the full report as a dict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["drive", "run"]

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "handler" / "weights" / "digits.safetensors"
EVENT = ROOT / "events" / "direct-predict.json"
BUCKET = "lazyserve-bench"
KEY = "digits/digits.safetensors"
PART_SIZE = 16384  # 5 ranged GETs per load of the 69 KB reference weights
REGION = "us-east-1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKEFAKE",
    "AWS_SECRET_ACCESS_KEY": "fake/secret/key/for/the/load/benchmark0",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}
STARTUP_LIMIT = 60.0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`, 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50) * 1000, 2),
        "p99_ms": round(percentile(values, 99) * 1000, 2),
        "max_ms": round(max(values, default=0.0) * 1000, 2),
    }


async def _drive(
    url: str, requests: int, concurrency: int, rows: int, health_interval: float
) -> dict[str, Any]:
    import httpx

    digit = json.loads(EVENT.read_text())["inputs"][0]
    body = json.dumps({"inputs": [digit] * rows}).encode()
    headers = {"content-type": "application/json"}
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    waited = 0  # answers whose Server-Timing has a `load` entry: they arrived during the load
    health_statuses: Counter[str] = Counter()
    health_latencies: list[float] = []
    next_index = 0
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index, waited
            while next_index < requests:
                next_index += 1
                started = time.perf_counter()
                try:
                    response = await client.post("/predict", content=body, headers=headers)
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                statuses[str(response.status_code)] += 1
                if "load;" in response.headers.get("server-timing", ""):
                    waited += 1

        async def probe() -> None:
            # Its own connection: a probe must not queue behind the predictions' pool.
            async with httpx.AsyncClient(base_url=url, timeout=60) as health:
                while not done.is_set():
                    started = time.perf_counter()
                    try:
                        response = await health.get("/health")
                    except httpx.HTTPError as exc:
                        health_statuses[type(exc).__name__] += 1
                    else:
                        health_latencies.append(time.perf_counter() - started)
                        health_statuses[str(response.status_code)] += 1
                    await asyncio.sleep(health_interval)

        started = time.perf_counter()
        prober = asyncio.create_task(probe())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        done.set()
        await prober

    return {
        "requests": requests,
        "concurrency": concurrency,
        "rows_per_request": rows,
        "statuses": dict(sorted(statuses.items())),
        "successes": statuses["200"],
        "server_errors": sum(n for s, n in statuses.items() if s.isdigit() and int(s) >= 500),
        "transport_errors": sum(n for s, n in statuses.items() if not s.isdigit()),
        "waited_for_load": waited,
        "duration_s": round(elapsed, 3),
        "throughput_rps": round(requests / elapsed, 1),
        "latency": _ms(latencies),
        "health": {
            "probes": sum(health_statuses.values()),
            "statuses": dict(sorted(health_statuses.items())),
            **_ms(health_latencies),
        },
    }


def drive(
    url: str,
    requests: int,
    concurrency: int,
    *,
    rows: int = 1,
    health_interval: float = 0.01,
) -> dict[str, Any]:
    """Send `requests` POST /predict (`rows` digits each) with `concurrency` in flight to the
    server at `url`, probing GET /health meanwhile; the client-side figures."""
    return asyncio.run(_drive(url, requests, concurrency, rows, health_interval))


# --- the servers: moto's S3 in this process, uvicorn in a subprocess -----------------------------


def _moto(gets: list[str]) -> Any:
    """ThreadedMotoServer on 127.0.0.1:0 that records the path of every GET it serves."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class CountingMoto(ThreadedMotoServer):
        def _server_entry(self) -> None:
            moto_app = DomainDispatcherApplication(create_backend_app)

            def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
                if environ["REQUEST_METHOD"] == "GET":
                    gets.append(environ.get("PATH_INFO", ""))
                result: Iterable[bytes] = moto_app(environ, start_response)
                return result

            self._server = make_server(
                self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    return CountingMoto(ip_address="127.0.0.1", port=0, verbose=False)


def _wait_healthy(url: str, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + STARTUP_LIMIT
    with httpx.Client(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {process.returncode}")
            try:
                response = client.get("/health")
                if response.status_code == 200:
                    health: dict[str, Any] = response.json()
                    return health
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"uvicorn did not answer /health within {STARTUP_LIMIT:g}s")


def run(requests: int, concurrency: int) -> dict[str, Any]:
    """The whole benchmark: moto + uvicorn, `requests` at `concurrency` from the cold start."""
    import boto3
    import httpx

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    gets: list[str] = []
    s3 = _moto(gets)
    s3.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    process: subprocess.Popen[bytes] | None = None
    try:
        host, port = s3.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        uploader = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        uploader.create_bucket(Bucket=BUCKET)
        uploader.put_object(Bucket=BUCKET, Key=KEY, Body=WEIGHTS.read_bytes())
        gets.clear()

        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        url = "http://{}:{}".format(*sock.getsockname())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAZYSERVE_"))}
        env.update(CREDENTIALS)
        env.update(
            AWS_ENDPOINT_URL_S3=endpoint,
            LAZYSERVE_MODEL_URI=f"s3://{BUCKET}/{KEY}",
            LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),
            LAZYSERVE_LOG_LEVEL="WARNING",
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "handler.app:app", "--fd", str(sock.fileno()),
             "--no-access-log", "--log-level", "warning"],
            pass_fds=(sock.fileno(),),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        before = _wait_healthy(url, process)
        report = drive(url, requests, concurrency)
        with httpx.Client(base_url=url, timeout=10) as client:
            meta = client.get("/model").json()
        weights_gets = sum(1 for path in gets if path == f"/{BUCKET}/{KEY}")
        report.update(
            model_before=before["model"],
            loads=meta["loads"],
            load_attempts=meta["load_attempts"],
            s3_gets=weights_gets,
            parts_per_load=math.ceil(WEIGHTS.stat().st_size / PART_SIZE),
            cpus=len(os.sched_getaffinity(0)),
            load_average_1m=round(os.getloadavg()[0], 2),
        )
        return report
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        sock.close()
        s3.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rows", type=int, default=1, help="digits per request (--url only)")
    parser.add_argument("--url", help="drive this running server instead of starting one")
    args = parser.parse_args(argv)
    if args.requests < 1 or not 1 <= args.concurrency <= 1024:
        parser.error("--requests must be >= 1 and --concurrency in 1..1024")
    if args.url:
        report = drive(args.url, args.requests, args.concurrency, rows=args.rows)
    else:
        report = run(args.requests, args.concurrency)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
