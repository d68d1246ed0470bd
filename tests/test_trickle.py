"""An S3 endpoint that answers at once and then sends the body one byte at a time never trips a
read timeout. Through the reference function and moto's S3 server over HTTP: a trickle ends like
a stall (a retryable 503, `/health` not stuck at `loading`, the next request after S3 recovers
loads), and with a prefix of many models, hundreds of names asked for at once against the
trickle leave lazyserve's threads and the process's descriptors bounded while it lasts and back
where they were after."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import anyio
import pytest

import lazyserve.sources.deadlines
from tests.helpers import (
    BUCKET,
    DIGIT_8,
    PART_SIZE,
    PARTS,
    WEIGHTS_BYTES,
    WEIGHTS_SHA256,
    ImportHandler,
    asgi_client,
    assert_prediction_shape,
    assert_unavailable,
    digits_variant,
    is_weights_get,
    put_object,
    s3_uri,
    trickling_app,
    weights_gets,
)
from tests.s3server import CountingS3Server

BODY = {"inputs": [DIGIT_8]}


@pytest.fixture
def quick_deadlines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ranged GET of PART_SIZE bytes may take 0.5 + 1 s (the real figures are 5 s plus a
    second per MiB: the same rule, scaled down so the test takes seconds)."""
    monkeypatch.setattr(lazyserve.sources.deadlines, "FIRST_BYTE", 0.5)
    monkeypatch.setattr(lazyserve.sources.deadlines, "BODY_FLOOR", PART_SIZE)
    monkeypatch.setattr(lazyserve.sources.s3client, "BACKOFF", 0.01)


def lazyserve_threads() -> int:
    # The loads, their ranged GETs and the deadline watchdog: every thread lazyserve starts is
    # named lazyserve-*, so the in-process moto server's own threads are not counted.
    return sum(t.name.startswith("lazyserve-") for t in threading.enumerate())


def load_threads() -> int:
    names = ("lazyserve-load-", "lazyserve-s3")
    return sum(t.name.startswith(names) for t in threading.enumerate())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def wait_until(condition: object, timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_a_trickling_body_fails_the_load_and_the_next_request_after_s3_recovers_loads(
    s3: CountingS3Server, import_handler: ImportHandler, quick_deadlines: None
) -> None:
    mod = import_handler(
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),
        LAZYSERVE_MODEL_SHA256=WEIGHTS_SHA256,
    )
    trickle = trickling_app(len(WEIGHTS_BYTES), every=0.2)
    s3.fault = lambda request: trickle if is_weights_get(request) else None
    s3.clear()
    async with asgi_client(mod) as client:
        started = time.monotonic()
        response = await client.post("/predict", json=BODY)
        took = time.monotonic() - started
        # Retryable: the trickle is the endpoint's state, not the object's.
        assert_unavailable(
            response.status_code, response.headers, response.json(), BUCKET, "slower than"
        )
        assert "still loading" not in response.json()["detail"]["message"]
        assert took < 25  # LAZYSERVE_LOAD_WAIT: the load ended; no request waited it out
        health = await client.get("/health")
        assert health.json() == {"status": "ok", "model": "failed"}
        # Every part's GET ran out its deadline, each retried to its attempts, nothing more.
        assert weights_gets(s3) == PARTS * lazyserve.sources.s3client.ATTEMPTS
        await wait_until(lambda: load_threads() == 0)

        s3.fault = None  # S3 recovers
        s3.clear()
        response = await client.post("/predict", json=BODY)
        assert response.status_code == 200, response.text
        assert_prediction_shape(response.json(), rows=1)
        assert weights_gets(s3) == PARTS  # one load's ranged GETs
        assert (await client.get("/health")).json() == {"status": "ok", "model": "loaded"}


PREFIX = "crowd/"
NAMES = [f"m{i:03d}" for i in range(300)]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts the open descriptors")
@pytest.mark.anyio
async def test_hundreds_of_names_against_a_trickle_keep_threads_and_descriptors_bounded(
    s3: CountingS3Server, import_handler: ImportHandler, quick_deadlines: None
) -> None:
    data = digits_variant(1)
    for name in NAMES:
        put_object(s3, f"{PREFIX}{name}.safetensors", data)
    mod = import_handler(
        LAZYSERVE_MODEL_URI=f"s3://{BUCKET}/{PREFIX}",
        LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),
        LAZYSERVE_LOAD_WAIT="2",
    )
    trickle = trickling_app(len(data), every=0.2)
    prefix = f"/{BUCKET}/{PREFIX}"
    s3.fault = lambda r: trickle if r.method == "GET" and r.path.startswith(prefix) else None
    pool = mod.service.pool
    async with asgi_client(mod) as client:
        # One request first, so the GET client and its watchdog exist in the baseline.
        await client.post(f"/models/{NAMES[0]}/predict", json=BODY)
        await wait_until(lambda: load_threads() == 0)
        threads_before, fds_before = lazyserve_threads(), open_fds()
        peak_threads, peak_fds = threads_before, fds_before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak_threads, peak_fds
            while not done.wait(0.02):
                peak_threads = max(peak_threads, lazyserve_threads())
                peak_fds = max(peak_fds, open_fds())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        statuses: list[int] = []

        async def ask(name: str) -> None:
            response = await client.post(f"/models/{name}/predict", json=BODY)
            statuses.append(response.status_code)

        async with anyio.create_task_group() as group:
            for name in NAMES[1:]:
                group.start_soon(ask, name)
        # Every request was answered within its wait, as a retryable 503.
        assert statuses == [503] * (len(NAMES) - 1)
        described = pool.describe()
        assert described["loads_running"] <= lazyserve.pool.LOADS_AT_ONCE
        await wait_until(lambda: load_threads() == 0)
        done.set()
        sampler.join()

        # At most LOADS_AT_ONCE loads, each with at most one GET thread per part of the object,
        # ran at once: not a thread per name (the issue saw 3 -> 603 for 300 names).
        parts = -(-len(data) // PART_SIZE)
        bound = threads_before + lazyserve.pool.LOADS_AT_ONCE * (1 + parts)
        assert peak_threads <= bound, (peak_threads, bound)
        # Descriptors: a socket per GET of those loads, and the moto server's side of it, which
        # lingers until the trickle's next write fails while the retry has opened the next one.
        assert peak_fds - fds_before <= 3 * lazyserve.pool.LOADS_AT_ONCE * parts + 8, (
            peak_fds,
            fds_before,
        )
        # After: the threads end and the descriptors are given back (kept-alive connections
        # of the GET client aside, which are reused).
        assert lazyserve_threads() <= threads_before
        await wait_until(lambda: open_fds() <= fds_before + 2 * PARTS + 4)

        s3.fault = None  # S3 recovers: a name that failed loads on its next request
        response = await client.post(f"/models/{NAMES[7]}/predict", json=BODY)
        assert response.status_code == 200, response.text
