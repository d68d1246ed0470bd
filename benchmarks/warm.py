"""Warm invocations: the reference handler (`handler.app.handler`) against a bare Mangum +
FastAPI app with the same /predict endpoint and the model in a plain global
(`benchmarks.bare_app`), on the same stored HTTP API v2 event, interleaved in one process.

Then, for information, the bare app alone in its own processes: as is, with inference in a
persistent executor instead of `run_in_threadpool`, and with OMP_WAIT_POLICY=PASSIVE (see
bare_app.py for why these matter under Mangum).

`python -m benchmarks.warm [-n 2000] [--profile]`
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EVENT = ROOT / "events" / "http-api-predict.json"
WEIGHTS = ROOT / "handler" / "weights" / "digits.safetensors"
Handler = Callable[[dict[str, Any], Any], Any]
LABELS = {
    "reference": "reference handler (`handler.app.handler`)",
    "bare": "bare Mangum + FastAPI, model in a global",
    "bare_pooled": "bare, inference in a persistent executor",
    "bare_passive": "bare, with OMP_WAIT_POLICY=PASSIVE",
}
# Each alone in its own processes: interleaved, their OpenMP threads disturb one another.
FLOORS: dict[str, tuple[str, dict[str, str]]] = {
    "bare": ("bare", {}),
    "bare_pooled": ("bare_pooled", {}),
    "bare_passive": ("bare", {"OMP_WAIT_POLICY": "PASSIVE"}),
}


class Context:
    """The parts of a Lambda context object a handler may read."""

    function_name = "bench"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"
    memory_limit_in_mb = "3008"
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    log_group_name = "/aws/lambda/bench"
    log_stream_name = "bench"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def make_handler(name: str) -> Handler:
    """`reference`: handler.app.handler, lazily loading the committed digits weights from the
    local file; `bare` / `bare_pooled`: the apps in benchmarks.bare_app."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if name == "reference":
        os.environ["LAZYSERVE_MODEL_URI"] = str(WEIGHTS)
        os.environ.setdefault("LAZYSERVE_LOAD", "lazy")
        os.environ.setdefault("LAZYSERVE_LOG_LEVEL", "WARNING")
        import handler.app

        return handler.app.handler
    import benchmarks.bare_app

    handlers: dict[str, Handler] = {
        "bare": benchmarks.bare_app.handler,
        "bare_pooled": benchmarks.bare_app.pooled_handler,
    }
    return handlers[name]


def _body(response: dict[str, Any]) -> Any:
    if response.get("statusCode") != 200:
        raise RuntimeError(f"expected a 200, got {response}")
    return json.loads(response["body"])


def measure(names: Sequence[str], n: int, warmup: int, profile: bool) -> dict[str, Any]:
    """In this process: time `n` invocations of each handler, interleaved, the order rotating."""
    event = json.loads(EVENT.read_text())
    context = Context()
    handlers = [(name, make_handler(name)) for name in names]
    bodies = [_body(handler(event, context)) for _, handler in handlers]
    if any(body != bodies[0] for body in bodies):
        raise RuntimeError(f"the apps disagree: {bodies}")
    for _ in range(warmup):
        for _, handler in handlers:
            handler(event, context)
    gc.collect()
    timings: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    clock, cpu_clock = time.perf_counter_ns, time.process_time_ns
    for i in range(n):
        shift = i % len(handlers)
        for name, handler in handlers[shift:] + handlers[:shift]:
            started, cpu_started = clock(), cpu_clock()
            handler(event, context)
            timings[name].append((clock() - started) / 1e6)
            cpu[name].append((cpu_clock() - cpu_started) / 1e6)
    report = ""
    if profile:
        report = profile_each(handlers, event, context)
    return {"timings": timings, "cpu": cpu, "profile": report}


def profile_each(
    handlers: Sequence[tuple[str, Handler]], event: dict[str, Any], context: Any, n: int = 1000
) -> str:
    """cProfile of `n` invocations of each handler, by own time."""
    out = io.StringIO()
    for name, handler in handlers:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(n):
            handler(event, context)
        profiler.disable()
        out.write(f"### {name}: {n} invocations\n")
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(15)
    return out.getvalue()


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50": statistics.median(ordered),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "mean": statistics.fmean(ordered),
    }


def _summary(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {name: _stats(values) for name, values in result["timings"].items()}
    for name, values in result["cpu"].items():
        out[name]["cpu_p50"] = statistics.median(values)
    return out


@dataclass
class WarmResults:
    n: int
    warmup: int
    main: dict[str, dict[str, float]] = field(default_factory=dict)  # reference vs bare
    floors: dict[str, dict[str, float]] = field(default_factory=dict)  # bare vs bare_pooled
    profile: str = ""

    @property
    def ratio_p50(self) -> float:
        return self.main["reference"]["p50"] / self.main["bare"]["p50"]

    @property
    def ratio_p99(self) -> float:
        return self.main["reference"]["p99"] / self.main["bare"]["p99"]


def _spawn(
    names: Sequence[str], n: int, warmup: int, profile: bool, extra: dict[str, str] | None = None
) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAZYSERVE_"))}
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    args = {"names": list(names), "n": n, "warmup": warmup, "profile": profile}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.warm", "--worker", json.dumps(args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"warm worker {names} failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(
    n: int = 2000, *, warmup: int = 200, profile: bool = False, log: Callable[[str], None] = print
) -> WarmResults:
    """Both comparisons, each in a fresh process."""
    results = WarmResults(n, warmup)
    main = _spawn(["reference", "bare"], n, warmup, profile)
    results.main = _summary(main)
    results.profile = main["profile"]
    merged: dict[str, dict[str, list[float]]] = {"timings": {}, "cpu": {}}
    for _ in range(2):  # two rounds, alternating, half the invocations each
        for key, (name, extra) in FLOORS.items():
            one = _spawn([name], max(1, n // 2), warmup, False, extra)
            for part in ("timings", "cpu"):
                merged[part].setdefault(key, []).extend(one[part][name])
    results.floors = _summary(merged)
    log(
        f"  warm: reference p50 {results.main['reference']['p50']:.3f} ms, "
        f"bare p50 {results.main['bare']['p50']:.3f} ms, ratio {results.ratio_p50:.2f}; "
        f"bare with a persistent executor p50 {results.floors['bare_pooled']['p50']:.3f} ms"
    )
    return results


def _rows(stats: dict[str, dict[str, float]]) -> list[str]:
    return [
        f"| {LABELS[name]} | {s['p50']:.3f} | {s['p90']:.3f} | {s['p99']:.3f} | {s['mean']:.3f} "
        f"| {s['cpu_p50']:.3f} |"
        for name, s in stats.items()
    ]


def table(results: WarmResults) -> str:
    ref, bare = results.main["reference"], results.main["bare"]
    head = [
        "| app | p50 ms | p90 ms | p99 ms | mean ms | CPU ms (p50) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratio = (
        f"| **ratio reference / bare** | **{results.ratio_p50:.2f}** "
        f"| {ref['p90'] / bare['p90']:.2f} | **{results.ratio_p99:.2f}** "
        f"| {ref['mean'] / bare['mean']:.2f} | {ref['cpu_p50'] / bare['cpu_p50']:.2f} |"
    )
    floors = results.floors
    lines = [*head, *_rows(results.main), ratio]
    if floors:
        lines += [
            "",
            "The bare app alone, each variant in its own processes (information, not a goal):",
            "",
            *head,
            *_rows(floors),
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warm")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=2000, help="invocations of each app")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of each")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return 0
    results = run(args.n, warmup=args.warmup, profile=args.profile)
    print(table(results))
    if results.profile:
        print(results.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
