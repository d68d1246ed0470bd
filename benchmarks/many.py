"""Many models under a memory budget: the latency of `POST /models/{name}/predict` for a resident
model, for a cold one with room in the budget, and for a cold one that needs an eviction first.

The function is benchmarks/many_app.py (`Service`, one synthetic 16 MiB model per name) with
LAZYSERVE_MODEL_URI=s3://bench/many/ on the S3 stand-in (s3endpoint.py, in this process) and a
LAZYSERVE_MEMORY_BUDGET that holds two models. Requests go in-process through
httpx.ASGITransport, in a fresh process per repeat:

  1. model 0, cold, the first load of the process (boto3 client, threads): reported apart
  2. model 1, cold, room for it in the budget                                  -> (b)
  3. models 0 and 1, resident, alternately                                     -> (a)
  4. models 2..N-1, cold, each evicting the least recently used one first      -> (c)

`python -m benchmarks.many [--models 8] [--size 16] [--repeats 5] [--resident 20]`
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BUCKET,
    DATA,
    ROOT,
    WeightsFile,
    load_average,
    proc_status,
    pushed,
    weights_file,
    worker_env,
)
from benchmarks.s3endpoint import DEFAULT_BANDWIDTH, DEFAULT_LATENCY, S3Endpoint

WIDTH = 2048  # Linear(2048, 2048) in float32: 16 MiB per layer
PREFIX = "many/"
FITS = 2  # models the budget holds
TIMEOUT = 600


def model_key(index: int) -> str:
    return f"{PREFIX}m{index}.safetensors"


def budget_for(size: int) -> int:
    """Bytes that hold FITS models of `size` bytes and not one more."""
    return FITS * size + size // 2


# --- one repeat, in a fresh process -----------------------------------------------------------


async def _session(models: int, resident: int, sha256: str) -> dict[str, Any]:
    import httpx

    from benchmarks.many_app import WIDTH as width
    from benchmarks.many_app import app

    body = json.dumps({"inputs": [[(i * 7) % 17 / 16 for i in range(width)]]}).encode()
    headers = {"content-type": "application/json"}
    gc.collect()
    baseline = proc_status("VmRSS")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:

        async def post(index: int) -> float:
            started = time.perf_counter()
            response = await client.post(f"/models/m{index}/predict", content=body, headers=headers)
            elapsed = time.perf_counter() - started
            if response.status_code != 200 or response.json()["sha256"] != sha256:
                raise RuntimeError(
                    f"model m{index}: expected a 200 with sha256 {sha256}, got "
                    f"{response.status_code} {response.text[:500]}"
                )
            return elapsed

        async def pool() -> dict[str, Any]:
            described: dict[str, Any] = (await client.get("/models")).json()
            return described

        first = await post(0)
        room = await post(1)
        rss_two = proc_status("VmRSS") - baseline
        if (await pool())["evictions"] != 0:
            raise RuntimeError("a model was evicted while the budget still had room")
        warm = [await post(i % 2) for i in range(resident)]
        evict = []
        rss_steps = []
        for index in range(2, models):
            before = (await pool())["evictions"]
            evict.append(await post(index))
            if (await pool())["evictions"] != before + 1:
                raise RuntimeError(f"model m{index}: expected exactly one eviction before its load")
            rss_steps.append(proc_status("VmRSS") - baseline)
        described = await pool()
    rss_end = proc_status("VmRSS") - baseline
    gc.collect()
    rss_collected = proc_status("VmRSS") - baseline
    return {
        "first": first,
        "room": room,
        "resident": warm,
        "evict": evict,
        "evictions": described["evictions"],
        "resident_bytes": described["resident_bytes"],
        "rss_two": rss_two,
        "rss_steps": rss_steps,
        "rss_growth": rss_end,
        "rss_growth_collected": rss_collected,
    }


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_session(spec["models"], spec["resident"], spec["sha256"]))


# --- the run ----------------------------------------------------------------------------------


@dataclass
class ManySample:
    repeat: int
    first: float
    room: float
    resident: list[float]
    evict: list[float]
    evictions: int
    resident_bytes: int
    rss_two: int  # VmRSS once two models are resident, over VmRSS before the first request
    rss_steps: list[int]  # ... after each request that evicted a model
    rss_growth: int  # ... after the last request
    rss_growth_collected: int  # ... after a gc.collect()


@dataclass
class ManyResults:
    models: int
    size: int  # bytes of one model's file
    budget: int
    repeats: int
    bandwidth: float
    latency: float
    samples: list[ManySample] = field(default_factory=list)

    def _median(self, get: Callable[[ManySample], list[float]]) -> float:
        return statistics.median(v for s in self.samples for v in get(s))

    @property
    def first(self) -> float:
        return self._median(lambda s: [s.first])

    @property
    def resident(self) -> float:
        return self._median(lambda s: s.resident)

    @property
    def room(self) -> float:
        return self._median(lambda s: [s.room])

    @property
    def evict(self) -> float:
        return self._median(lambda s: s.evict)

    @property
    def eviction_cost(self) -> float:
        return self.evict - self.room

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManyResults:
        data = dict(data)
        samples = [ManySample(**s) for s in data.pop("samples")]
        return cls(**data, samples=samples)


def _spawn(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-many-") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.many", "--worker", json.dumps(spec), str(out)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"many-models worker failed:\n{proc.stderr[-4000:]}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def run(
    models: int = 8,
    size_mib: int = 16,
    repeats: int = 5,
    *,
    resident: int = 20,
    bandwidth: float = DEFAULT_BANDWIDTH,
    latency: float = DEFAULT_LATENCY,
    data_dir: Path = DATA,
    width: int = WIDTH,
    log: Callable[[str], None] = print,
) -> ManyResults:
    """`repeats` fresh processes, each going through the steps in the module's docstring."""
    if models < 3:
        raise ValueError(f"models is {models}; at least 3 are needed for an eviction (budget: 2)")
    wf: WeightsFile = weights_file(size_mib, data_dir, width=width)
    budget = budget_for(wf.size)
    results = ManyResults(models, wf.size, budget, repeats, bandwidth, latency)
    with S3Endpoint(bandwidth=bandwidth, latency=latency) as s3:
        for index in range(models):
            # One file under every name: each name is still its own object and its own load.
            s3.add(BUCKET, model_key(index), wf.path, metadata=pushed(wf.path))
        env = {
            **worker_env(s3.endpoint),
            "LAZYSERVE_MODEL_URI": f"s3://{BUCKET}/{PREFIX}",
            "LAZYSERVE_MEMORY_BUDGET": str(budget),
            "LAZYSERVE_LOG_LEVEL": "WARNING",
            "BENCH_MANY_LAYERS": str(wf.layers),
            "BENCH_MANY_WIDTH": str(width),
        }
        spec = {"models": models, "resident": resident, "sha256": wf.sha256}
        for repeat in range(repeats):
            sample = ManySample(repeat=repeat, **_spawn(spec, env))
            results.samples.append(sample)
            log(
                f"  many: resident {statistics.median(sample.resident) * 1e3:7.2f} ms  "
                f"cold with room {sample.room * 1e3:7.2f} ms  cold after an eviction "
                f"{statistics.median(sample.evict) * 1e3:7.2f} ms  (repeat {repeat + 1})"
            )
    return results


def table(results: ManyResults) -> str:
    """A markdown table of the medians, and the eviction cost."""
    mib = results.size / 2**20
    n = len(results.samples)
    resident = sum(len(s.resident) for s in results.samples)
    evict = sum(len(s.evict) for s in results.samples)
    rows = [
        ("(a) resident model", results.resident, resident),
        ("(b) cold model, room in the budget", results.room, n),
        ("(c) cold model, one eviction first", results.evict, evict),
        ("eviction cost (c - b)", results.eviction_cost, None),
    ]
    lines = [
        "| `POST /models/{name}/predict` | median ms | requests |",
        "| --- | ---: | ---: |",
    ]
    for name, seconds, count in rows:
        lines.append(f"| {name} | {seconds * 1e3:.2f} | {'' if count is None else count} |")

    def extra(get: Callable[[ManySample], int]) -> float:
        # Growth over the RSS with two models resident, in models' worth.
        return statistics.median(get(s) - s.rss_two for s in results.samples) / results.size

    lingering = extra(lambda s: s.rss_growth)
    collected = extra(lambda s: s.rss_growth_collected)
    processes = f"{n} fresh process{'es' if n > 1 else ''}"
    lines += [
        "",
        f"{results.models} models of {mib:.0f} MiB, budget {results.budget / 2**20:.0f} MiB "
        f"(holds {FITS}); {processes}. The first load of each process, which also creates the "
        f"S3 client, took {results.first * 1e3:.0f} ms (not in the table). After the "
        f"{results.models - FITS} evictions the process held {lingering:.1f} models' worth "
        f"more RSS than with two models resident, {collected:.1f} after a `gc.collect()`.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.many", description=__doc__)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="MiB per model, a multiple of 16")
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes")
    parser.add_argument("--resident", type=int, default=20, help="resident requests per process")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args(argv)
    if args.worker:
        spec, out = args.worker
        Path(out).write_text(json.dumps(worker(json.loads(spec))))
        return 0
    results = run(args.models, args.size, args.repeats, resident=args.resident)
    print(table(results))
    print(f"\nload average (1/5/15 min) at the end: {load_average()}")
    if args.json:
        args.json.write_text(json.dumps(results.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
