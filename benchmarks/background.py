"""How much of the weights fetch overlaps the import with LAZYSERVE_LOAD=background, against
LAZYSERVE_LOAD=lazy where the fetch only starts once the imports are done.

Each trial is a fresh `python -m benchmarks.bg_app` (a stand-in for handler/app.py with the
same order: settings -> prefetch -> `import torch` and the web stack -> build) fetching
synthetic weights from the benchmark S3 endpoint.

`python -m benchmarks.background --sizes 256 1024 --repeats 3`
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.cold_start import BUCKET, ROOT, weights_file, worker_env
from benchmarks.s3endpoint import DEFAULT_BANDWIDTH, DEFAULT_LATENCY, S3Endpoint

MODES = ("background", "lazy")
DEFAULT_SIZES = (256, 1024)


@dataclass
class Trial:
    mode: str
    size: int
    process_start: float  # the parent's clock just before it started the process
    started: float  # first line of the module (after the interpreter's own start)
    import_started: float  # after settings (and, in background mode, the prefetch's start)
    imported: float  # torch, FastAPI, Mangum, lazyserve imported
    fetch_started: float
    fetch_ended: float
    ready: float
    fetch_seconds: float
    build_seconds: float

    @property
    def import_seconds(self) -> float:
        return self.imported - self.import_started

    @property
    def overlap_seconds(self) -> float:
        return max(
            0.0, min(self.fetch_ended, self.imported) - max(self.fetch_started, self.import_started)
        )

    @property
    def overlap_fraction(self) -> float:
        return self.overlap_seconds / self.fetch_seconds

    @property
    def ready_seconds(self) -> float:
        """From the process's start to a ready model."""
        return self.ready - self.process_start

    @property
    def waited_seconds(self) -> float:
        """After the imports, how long until the model was ready."""
        return self.ready - self.imported


@dataclass
class BackgroundResults:
    bandwidth: float
    latency: float
    repeats: int
    trials: list[Trial] = field(default_factory=list)

    def median(self, mode: str, size: int, get: Callable[[Trial], float]) -> float:
        return statistics.median(get(t) for t in self.trials if t.mode == mode and t.size == size)

    @property
    def sizes(self) -> list[int]:
        return sorted({t.size for t in self.trials})


def _trial(mode: str, layers: int, key: str, env: dict[str, str]) -> dict[str, Any]:
    env = {
        **env,
        "LAZYSERVE_MODEL_URI": f"s3://{BUCKET}/{key}",
        "LAZYSERVE_LOAD": mode,
        "LAZYSERVE_LOG_LEVEL": "WARNING",
        "BENCH_LAYERS": str(layers),
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bg_app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bg_app ({mode}) failed:\n{proc.stderr[-4000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_start"] = start
    return out


def run(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    repeats: int = 3,
    bandwidth: float = DEFAULT_BANDWIDTH,
    latency: float = DEFAULT_LATENCY,
    log: Callable[[str], None] = print,
) -> BackgroundResults:
    results = BackgroundResults(bandwidth, latency, repeats)
    files = {size: weights_file(size) for size in sizes}
    with S3Endpoint(bandwidth=bandwidth, latency=latency) as s3:
        env = worker_env(s3.endpoint)
        for size, wf in files.items():
            s3.add(BUCKET, wf.path.name, wf.path)
            _trial("lazy", wf.layers, wf.path.name, env)  # warm the page cache; not counted
            for repeat in range(repeats):
                for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                    out = _trial(mode, wf.layers, wf.path.name, env)
                    fields = {k: out[k] for k in Trial.__dataclass_fields__ if k in out}
                    trial = Trial(**{**fields, "mode": mode})
                    results.trials.append(trial)
                    log(
                        f"  {size:>5} MiB  {mode:<10} import {trial.import_seconds:.2f} s  "
                        f"fetch {trial.fetch_seconds:.2f} s  "
                        f"overlap {trial.overlap_fraction:4.0%}  "
                        f"ready after {trial.ready_seconds:.2f} s"
                    )
    return results


def table(results: BackgroundResults) -> str:
    lines = [
        "| size | LAZYSERVE_LOAD | import s | fetch s | fetch overlapped with the import "
        "| waited after the import s | process start to ready model s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in results.sizes:
        for mode in MODES:

            def med(get: Callable[[Trial], float], mode: str = mode, size: int = size) -> float:
                return results.median(mode, size, get)

            lines.append(
                f"| {size / 2**20:.0f} MiB | {mode} | {med(lambda t: t.import_seconds):.2f} "
                f"| {med(lambda t: t.fetch_seconds):.2f} "
                f"| {med(lambda t: t.overlap_seconds):.2f} s "
                f"({med(lambda t: t.overlap_fraction):.0%}) "
                f"| {med(lambda t: t.waited_seconds):.2f} | {med(lambda t: t.ready_seconds):.2f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.background")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="MiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(table(run(args.sizes, repeats=args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
