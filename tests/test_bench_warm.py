"""The warm-path benchmark harness runs and its rows answer correctly: benchmarks.warm (main and
attribution rows, a few invocations), benchmarks.gcstats, and benchmarks.uvicorn_load when wrk
and two CPUs are there. Counts and answers only, never timings."""

from __future__ import annotations

import gc
import hashlib
import os
import shutil

import pytest
from benchmarks import gcstats, warm

from tests.helpers import WEIGHTS

ROWS = list(dict.fromkeys([*warm.MAIN_ROWS, *warm.ATTRIBUTE_ROWS]))


def test_every_warm_row_answers_the_same_prediction() -> None:
    lines: list[str] = []
    n, warmup = 3, 1
    results = warm.run(n, warmup=warmup, rows=ROWS, log=lines.append)

    assert list(results.rows) == ROWS
    assert all(len(line) > 0 for line in lines)
    answer = results.answer
    assert answer["model"]["sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    (prediction,) = answer["predictions"]
    assert 0 <= prediction["label"] <= 9
    assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert results.goal_row == "reference_lambda"
    table = warm.table(results)
    for name in ROWS:
        assert warm.label(name) in table
    # Three rows publish EMF once per invocation (the first answer, warm-up, measured), and
    # the documents reach the worker's log file, not a pipe.
    emf = warm.WORKER_LOG.read_text().count('"InferenceMs"')
    assert emf >= 3 * (1 + warmup + n)


def test_gcstats_counts_full_collections() -> None:
    stats = gcstats.install()
    try:
        before = stats.snapshot()
        gc.collect()
        gc.collect()
        after = stats.snapshot(tracked=True)
    finally:
        gc.callbacks.remove(stats.callback)
    figures = gcstats.delta(before, after, requests=500)
    assert figures["full"] == 2
    assert figures["full_per_1k"] == 4.0
    assert figures["tracked"] > 0
    ran, _ = gcstats.schedstat()
    assert ran > 0 or not os.path.exists("/proc/self/task")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_uvicorn_load_serves_both_slow_apps_without_errors() -> None:
    """The slow-model scenario only (the throughput runs take the same path through wrk and
    the GC endpoint, with two more server starts)."""
    from benchmarks import uvicorn_load

    cpus = sorted(os.sched_getaffinity(0))
    report = uvicorn_load.run(
        concurrency=[],
        slow=["sleep"],
        slow_duration=2,
        server_cpu=cpus[0],
        client_cpu=cpus[1],
        log=lambda line: None,
    )

    assert report["throughput"] == []
    assert {row["app"] for row in report["slow"]} == {"floor", "reference"}
    for row in report["slow"]:
        predict = row["predict"]
        assert predict["requests"] > 0
        assert predict["errors"] == 0
        assert predict["gc"]["tracked"] > 0
        assert row["health"]["errors"] == 0
        assert row["health"]["probes"] > 0
    assert "| sleep | reference |" in uvicorn_load.table(report)
