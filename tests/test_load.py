"""Bounded load from a second process against uvicorn on 127.0.0.1, a leak check over 10,000
warm handler invocations, and /health under a load of /predict. Counts only, no timings: the
throughput and latency figures come from `python -m benchmarks.load` (see docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.helpers import (
    FAKE_CREDENTIALS,
    PART_SIZE,
    PARTS,
    ROOT,
    WEIGHTS,
    WEIGHTS_SHA256,
    Gate,
    UvicornProcess,
    s3_uri,
    weights_gets,
)
from tests.s3server import CountingS3Server

LOAD_REQUESTS = 600
LOAD_CONCURRENCY = 32
LEAK_WARMUP = 500
LEAK_INVOCATIONS = 10_000
LEAK_LIMIT_KB = 5 * 1024


def load_client(url: str, requests: int, concurrency: int, rows: int = 1) -> subprocess.Popen[str]:
    """benchmarks/load.py's client in a second process, against `url`; prints JSON counts."""
    command = [sys.executable, "-m", "benchmarks.load", "--url", url]
    command += ["--requests", str(requests), "--concurrency", str(concurrency)]
    command += ["--rows", str(rows)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def finish(client: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = client.communicate(timeout=120)
    assert client.returncode == 0, out
    report: dict[str, Any] = json.loads(out)
    print(json.dumps(report))
    return report


@pytest.fixture
def cold_url(s3: CountingS3Server, tmp_path: Path) -> Iterator[str]:
    """uvicorn serving the reference function, lazy, loading from moto's S3 (16 KiB parts)."""
    env = dict(os.environ)  # fake credentials, region and AWS_ENDPOINT_URL_S3 (s3 fixture)
    env.update(
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),
        LAZYSERVE_LOG_LEVEL="WARNING",
    )
    server = UvicornProcess(env, tmp_path / "uvicorn.log")
    try:
        server.wait_healthy()
        yield server.url
    finally:
        server.stop()


# --- (a) a load from a second process, started during the cold start ------------------------------


def test_a_load_started_during_the_cold_start_makes_one_load_and_no_5xx(
    s3: CountingS3Server, cold_url: str, gate: Gate
) -> None:
    url = cold_url
    with httpx.Client(base_url=url, timeout=10) as probe:
        assert probe.get("/health").json() == {"status": "ok", "model": "not_loaded"}

    client = load_client(url, LOAD_REQUESTS, LOAD_CONCURRENCY)
    try:
        # S3 holds the weights until the first request has started the load and the others
        # have had time to pile up behind it; then the load completes.
        deadline = time.monotonic() + 60
        while gate.held == 0 and client.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gate.held >= 1
        time.sleep(1.0)
    finally:
        gate.open()
    report = finish(client)

    assert report["statuses"] == {"200": LOAD_REQUESTS}
    assert report["server_errors"] == 0
    assert report["transport_errors"] == 0
    assert report["waited_for_load"] >= 2  # requests really arrived during the cold start
    assert report["health"]["statuses"] == {"200": report["health"]["probes"]}
    assert weights_gets(s3) == PARTS  # exactly one load's ranged GETs
    with httpx.Client(base_url=url, timeout=10) as probe:
        meta = probe.get("/model").json()
    assert meta["loads"] == 1
    assert meta["load_attempts"] == 1
    assert meta["sha256"] == WEIGHTS_SHA256


# --- (b) no leak over 10,000 warm invocations -----------------------------------------------------

LEAK_SCRIPT = """
import json, sys
from pathlib import Path

from handler.app import handler


def rss_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])


event = json.loads(Path("events/http-api-predict.json").read_text())
warmup, invocations = int(sys.argv[1]), int(sys.argv[2])
statuses = {}
for _ in range(warmup):
    handler(event, None)
before = rss_kb()
for _ in range(invocations):
    status = handler(event, None)["statusCode"]
    statuses[status] = statuses.get(status, 0) + 1
after = rss_kb()
print(json.dumps({"before_kb": before, "after_kb": after, "statuses": statuses}))
"""


def test_ten_thousand_warm_invocations_grow_rss_by_less_than_5_mb() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAZYSERVE_"))}
    env.update(FAKE_CREDENTIALS)
    env.update(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_LOG_LEVEL="WARNING")
    done = subprocess.run(
        [sys.executable, "-c", LEAK_SCRIPT, str(LEAK_WARMUP), str(LEAK_INVOCATIONS)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    growth = report["after_kb"] - report["before_kb"]
    print(
        f"VmRSS after {LEAK_WARMUP} warm-up invocations: {report['before_kb']} kB; "
        f"after {LEAK_INVOCATIONS} more: {report['after_kb']} kB; growth {growth} kB"
    )
    assert report["statuses"] == {"200": LEAK_INVOCATIONS}
    assert growth < LEAK_LIMIT_KB


# --- (c) /health keeps answering under a load of /predict -----------------------------------------


@pytest.fixture(scope="module")
def warm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """uvicorn with the committed weights, loaded before the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAZYSERVE_"))}
    env.update(FAKE_CREDENTIALS)
    env.update(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_LOG_LEVEL="WARNING")
    server = UvicornProcess(env, Path(tmp_path_factory.mktemp("uvicorn")) / "uvicorn.log")
    try:
        server.wait_healthy()
        with httpx.Client(base_url=server.url, timeout=30) as probe:
            assert probe.get("/ready").status_code == 200
        yield server.url
    finally:
        server.stop()


@pytest.mark.anyio
async def test_health_answers_every_probe_while_heavy_predictions_run(warm_url: str) -> None:
    # 256-row batches keep inference busy; the client in the second process probes /health
    # on its own connection, and so does this process.
    client = load_client(warm_url, 120, 8, rows=256)
    ours: list[int] = []
    async with httpx.AsyncClient(base_url=warm_url, timeout=30) as http:
        while client.poll() is None:
            response = await http.get("/health")
            ours.append(response.status_code)
            await anyio.sleep(0.02)
    report = finish(client)

    assert report["statuses"] == {"200": 120}
    probes = report["health"]["probes"]
    assert probes >= 10
    assert report["health"]["statuses"] == {"200": probes}
    assert len(ours) >= 10
    assert ours == [200] * len(ours)
