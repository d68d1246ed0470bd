"""Warm invocations against the inline floor: the reference handler (`handler.app.handler`), as
is and in Lambda mode, and other ways of writing the bare app, each against the floor (bare
Mangum + FastAPI, an `async def` endpoint running the forward inline, `benchmarks.bare_app`),
on the same stored HTTP API v2 event, interleaved in random order in one fresh process.

`python -m benchmarks.warm [-n 5000] [--warmup 500] [--attribute] [--pairwise] [--profile]`

`--attribute` measures the floor plus lazyserve's pieces one at a time (`benchmarks.pieces`);
`--pairwise` measures each row against the floor in a process of its own, the two interleaved.
The measured process writes its stdout and stderr (EMF documents, logs) to
`benchmarks/data/warm-worker.log`, never to a pipe.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import io
import json
import logging
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
EVENT = ROOT / "events" / "http-api-predict.json"
WEIGHTS = ROOT / "handler" / "weights" / "digits.safetensors"
WORKER_LOG = ROOT / "benchmarks" / "data" / "warm-worker.log"
Handler = Callable[[dict[str, Any], Any], Any]

FLOOR = "floor"
GOAL_ROW = "reference_lambda"
LABELS = {
    "floor": "**floor**: bare Mangum + FastAPI, `async def`, forward inline",
    "reference": "reference handler (`handler.app.handler`), default env",
    "reference_lambda": "reference handler, Lambda mode (JSON logs, EMF per invocation)",
    "pooled": "bare, forward in a persistent 1-thread executor",
    "threadpool": "bare, `def` endpoint (run_in_threadpool)",
    "floor_again": "floor again: a second, identical app (its distance from 1.00 is noise)",
}
MAIN_ROWS = ("floor", "reference", "reference_lambda", "pooled", "threadpool", "floor_again")
# Everything the reference adds; `setup_app` includes Server-Timing and the body limit.
ALL_PIECES = ("in_worker", "dependency", "setup_app", "lambda_handler", "emf")
ATTRIBUTE_ROWS = (
    "floor",
    "floor_again",
    "floor+in_worker",
    "floor+dependency",
    "floor+setup_app",
    "floor+edge",
    "floor+lambda_handler",
    "floor+emf",
    "floor+" + "+".join(ALL_PIECES),
    "reference_lambda",
)
# What the Lambda execution environment sets that lazyserve or Powertools read.
LAMBDA_ENV = {
    "AWS_LAMBDA_FUNCTION_NAME": "bench",
    "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3008",
    "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/bench",
    "AWS_LAMBDA_LOG_STREAM_NAME": "bench",
    "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
    "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    if name.startswith(f"{FLOOR}/"):
        return f"floor, in the process of the next row ({name.split('/', 1)[1]})"
    pieces = name.removeprefix("floor+").split("+")
    if tuple(pieces) == ALL_PIECES:
        return "floor + all of them (≈ the reference in Lambda mode)"
    return "floor + " + " + ".join(f"`{p}`" for p in pieces)


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


class _FlushEachWrite:
    """stdout as Lambda's Python runtime sets it up: flushed after every write
    (awslambdaric's bootstrap.py wraps sys.stdout and sys.stderr so)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        self._stream.flush()
        return written

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def lambda_runtime_logging(level: str | None) -> None:
    """Logging as Lambda's Python runtime leaves it before it imports the handler: stdout and
    stderr flushed after every write, one handler on the root logger, the root level WARNING
    unless the function sets an application log level (AWS_LAMBDA_LOG_LEVEL, e.g. INFO with
    the JSON log format). awslambdaric's bootstrap.py does this; lazyserve's configure_logging
    then keeps that handler and level and only swaps the formatter."""
    sys.stdout = _FlushEachWrite(sys.stdout)
    sys.stderr = _FlushEachWrite(sys.stderr)
    root = logging.getLogger()
    root.addHandler(logging.StreamHandler(sys.stdout))
    if level:
        os.environ["AWS_LAMBDA_LOG_LEVEL"] = level
        os.environ["AWS_LAMBDA_LOG_FORMAT"] = "JSON"
        root.setLevel(level)


def reference_handler(lambda_mode: bool) -> Handler:
    """handler.app.handler, lazily loading the committed weights from the local file.

    Lambda mode imports a second copy of handler/app.py (module `handler.app_lambda`) with
    Lambda's variables set, so JSON logs and EMF metrics are on for that copy while the default
    copy, imported first, has them off. The variables stay set afterwards, as on Lambda."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ["LAZYSERVE_MODEL_URI"] = str(WEIGHTS)
    if not lambda_mode:
        import handler.app

        return handler.app.handler
    os.environ.update(LAMBDA_ENV)
    spec = importlib.util.spec_from_file_location("handler.app_lambda", ROOT / "handler" / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    lambda_copy: Handler = module.handler
    return lambda_copy


def make_handler(name: str) -> Handler:
    """A row's handler by name: see LABELS, and `floor+PIECE+...` (benchmarks.pieces)."""
    if name in ("reference", "reference_lambda"):
        return reference_handler(name == "reference_lambda")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import bare_app

    if name.startswith("floor+") or name == "floor_again":
        from benchmarks import pieces

        chosen = name.removeprefix("floor+").split("+") if name != "floor_again" else []
        return pieces.build(chosen)
    handlers: dict[str, Handler] = {
        "floor": bare_app.handler,
        "pooled": bare_app.pooled_handler,
        "threadpool": bare_app.threadpool_handler,
    }
    if name not in handlers:
        accepted = ", ".join(
            [*handlers, "floor_again", "reference", "reference_lambda", "floor+PIECE+..."]
        )
        raise ValueError(f"unknown row {name!r}; accepted: {accepted}")
    return handlers[name]


def _body(name: str, response: dict[str, Any]) -> Any:
    if response.get("statusCode") != 200:
        raise RuntimeError(f"{name}: expected a 200, got {response}")
    return json.loads(response["body"])


def _same_answer(a: Any, b: Any) -> bool:
    # Labels and digest exactly; probabilities to float32 precision (the reference builds its
    # module from its own buffer, and the last bits can differ from load_state_dict's).
    if a["model"] != b["model"] or len(a["predictions"]) != len(b["predictions"]):
        return False
    for x, y in zip(a["predictions"], b["predictions"], strict=True):
        if x["label"] != y["label"]:
            return False
        if any(
            abs(p - q) > 1e-6 for p, q in zip(x["probabilities"], y["probabilities"], strict=True)
        ):
            return False
    return True


def measure(
    names: Sequence[str],
    n: int,
    warmup: int,
    profile: bool = False,
    log_level: str | None = None,
) -> dict[str, Any]:
    """In this process, set up as Lambda's runtime sets it up: time `n` invocations of each row,
    interleaved, in a random order each round."""
    from benchmarks import gcstats

    lambda_runtime_logging(log_level)
    event = json.loads(EVENT.read_text())
    context = Context()
    # The default reference must be imported before Lambda's variables are set.
    imports = sorted(names, key=lambda name: name == "reference_lambda")
    built = {name: make_handler(name) for name in imports}
    handlers = [(name, built[name]) for name in names]
    bodies = {name: _body(name, handler(event, context)) for name, handler in handlers}
    if not all(_same_answer(body, bodies[names[0]]) for body in bodies.values()):
        raise RuntimeError(f"the rows disagree: {bodies}")
    for _ in range(warmup):
        for _, handler in handlers:
            handler(event, context)
    gc.collect()
    collector = gcstats.install()
    ran, waited = gcstats.schedstat()
    timings: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    full_gcs = dict.fromkeys(names, 0)
    full_gc_ms = dict.fromkeys(names, 0.0)
    clock, cpu_clock = time.perf_counter_ns, time.process_time_ns
    # A fresh random order each round (seeded: runs repeat), not a rotation: under a rotation
    # every row always follows the same row, and pays for what that one leaves behind (its
    # worker threads, torch's spinning OpenMP threads) on every round.
    shuffler = random.Random(0)
    order = list(handlers)
    for _ in range(n):
        shuffler.shuffle(order)
        for name, handler in order:
            collections, paused = collector.full, collector.pause_ns[2]
            started, cpu_started = clock(), cpu_clock()
            handler(event, context)
            timings[name].append((clock() - started) / 1e6)
            cpu[name].append((cpu_clock() - cpu_started) / 1e6)
            full_gcs[name] += collector.full - collections
            full_gc_ms[name] += (collector.pause_ns[2] - paused) / 1e6
    ran_after, waited_after = gcstats.schedstat()
    tracked = len(gc.get_objects())
    report = profile_each(handlers, event, context) if profile else ""
    return {
        "timings": timings,
        "cpu": cpu,
        "full_gcs": full_gcs,
        "full_gc_ms": full_gc_ms,
        "tracked": tracked,
        "cpu_ms": ran_after - ran,
        "runqueue_wait_ms": waited_after - waited,
        "invocations": n * len(names),
        "answer": bodies[names[0]],
        "profile": report,
    }


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


def summarise(result: dict[str, Any], floor: str = FLOOR) -> dict[str, dict[str, float]]:
    """Per row: p50/p90/p99/mean ms, CPU p50, full GCs and their ms per 1,000 invocations, and
    the ratios to `floor` in the same result."""
    out: dict[str, dict[str, float]] = {}
    for name, values in result["timings"].items():
        stats = _stats(values)
        stats["cpu_p50"] = statistics.median(result["cpu"][name])
        stats["full_gcs_per_1k"] = result["full_gcs"][name] * 1000 / len(values)
        stats["full_gc_ms_per_1k"] = result["full_gc_ms"][name] * 1000 / len(values)
        out[name] = stats
    base = out[floor]
    for stats in out.values():
        for key in ("p50", "p99", "mean"):
            stats[f"{key}_ratio"] = stats[key] / base[key]
    return out


@dataclass
class WarmResults:
    n: int
    warmup: int
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    pairwise: bool = False
    log_level: str | None = None  # the Lambda application log level emulated; None: WARNING
    tracked: int = 0  # objects the collector tracked at the end, in the (first) process
    # Run-queue wait of the measured process over its run time: above a few per cent, other
    # processes held the CPU and the figures measure the machine.
    runqueue_wait_share: float = 0.0
    answer: Any = None
    profile: str = ""

    @property
    def ratio_p50(self) -> float:
        """The goal row (reference in Lambda mode) over the floor, or the first non-floor row."""
        return self.rows[self.goal_row]["p50_ratio"]

    @property
    def ratio_p99(self) -> float:
        return self.rows[self.goal_row]["p99_ratio"]

    @property
    def goal_row(self) -> str:
        if GOAL_ROW in self.rows:
            return GOAL_ROW
        return next(name for name in self.rows if name != FLOOR)


def _spawn(
    names: Sequence[str], n: int, warmup: int, profile: bool, log_level: str | None
) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAZYSERVE_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    WORKER_LOG.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = {
            "names": list(names),
            "n": n,
            "warmup": warmup,
            "profile": profile,
            "log_level": log_level,
        }
        # A file, not a pipe: in Lambda mode every invocation writes an EMF document to stdout,
        # and a pipe nobody reads fills and blocks the process.
        with WORKER_LOG.open("w") as log_file:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.warm", "--worker", json.dumps(args), str(out)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                timeout=3600,
            )
        if proc.returncode != 0:
            tail = WORKER_LOG.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"warm worker {list(names)} failed ({WORKER_LOG}):\n{tail}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def run(
    n: int = 5000,
    *,
    warmup: int = 500,
    profile: bool = False,
    attribute: bool = False,
    pairwise: bool = False,
    rows: Sequence[str] | None = None,
    log_level: str | None = None,
    log: Callable[[str], None] = print,
) -> WarmResults:
    """The rows (MAIN_ROWS, or ATTRIBUTE_ROWS with `attribute`) against the floor in one fresh
    process, or with `pairwise` each row with the floor in a process of its own."""
    names = list(rows or (ATTRIBUTE_ROWS if attribute else MAIN_ROWS))
    if FLOOR not in names:
        names.insert(0, FLOOR)
    results = WarmResults(n, warmup, pairwise=pairwise, log_level=log_level)
    if not pairwise:
        raw = _spawn(names, n, warmup, profile, log_level)
        results.rows = summarise(raw)
        results.tracked, results.answer, results.profile = (
            raw["tracked"],
            raw["answer"],
            raw["profile"],
        )
        results.runqueue_wait_share = raw["runqueue_wait_ms"] / max(raw["cpu_ms"], 1e-9)
    else:
        for name in names:
            if name == FLOOR:
                continue
            raw = _spawn([FLOOR, name], n, warmup, profile, log_level)
            pair = summarise(raw)
            # Each row's ratios are to the floor of its own process, shown above it.
            results.rows[FLOOR if FLOOR not in results.rows else f"{FLOOR}/{name}"] = pair[FLOOR]
            results.rows[name] = pair[name]
            results.tracked = results.tracked or raw["tracked"]
            share = raw["runqueue_wait_ms"] / max(raw["cpu_ms"], 1e-9)
            results.runqueue_wait_share = max(results.runqueue_wait_share, share)
            results.answer, results.profile = raw["answer"], results.profile + raw["profile"]
    goal = results.goal_row
    log(
        f"  warm: floor p50 {results.rows[FLOOR]['p50']:.3f} ms; {goal} p50 "
        f"{results.rows[goal]['p50']:.3f} ms ({results.ratio_p50:.2f}x), "
        f"p99 {results.rows[goal]['p99']:.3f} ms ({results.ratio_p99:.2f}x)"
    )
    return results


def table(results: WarmResults) -> str:
    """A Markdown table: one line per row, with its ratios to the floor."""
    lines = [
        "| row | p50 ms | p90 ms | p99 ms | mean ms | p50 / floor | p99 / floor | mean / floor "
        "| CPU ms (p50) | full GCs per 1k | full-GC ms per 1k |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in results.rows.items():
        lines.append(
            f"| {label(name)} | {s['p50']:.3f} | {s['p90']:.3f} | {s['p99']:.3f} "
            f"| {s['mean']:.3f} | {s['p50_ratio']:.2f} | {s['p99_ratio']:.2f} "
            f"| {s['mean_ratio']:.2f} | {s['cpu_p50']:.3f} | {s['full_gcs_per_1k']:.2f} "
            f"| {s['full_gc_ms_per_1k']:.1f} |"
        )
    how = "each row with the floor in its own process" if results.pairwise else "one process"
    lines += [
        "",
        f"{results.n} invocations of each row after {results.warmup} warm-up rounds, "
        f"interleaved ({how}); logging as Lambda's runtime sets it up, application log level "
        f"{results.log_level or 'unset (root logger at WARNING)'}; "
        f"{results.tracked:,} objects tracked by the collector at the end; the measured "
        f"process waited for a CPU {results.runqueue_wait_share:.0%} as long as it ran.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warm", description=__doc__)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("-n", type=int, default=5000, help="invocations of each row")
    parser.add_argument("--warmup", type=int, default=500, help="warm-up rounds")
    parser.add_argument("--attribute", action="store_true", help="the floor plus each piece")
    parser.add_argument("--pairwise", action="store_true", help="each row with the floor alone")
    parser.add_argument("--rows", nargs="+", help="these rows only (names as in the JSON output)")
    parser.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="emulate a Lambda application log level (JSON format); default: none (WARNING)",
    )
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of each")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    if args.worker:
        spec, out = args.worker
        Path(out).write_text(json.dumps(measure(**json.loads(spec))))
        return 0
    results = run(
        args.n,
        warmup=args.warmup,
        profile=args.profile,
        attribute=args.attribute,
        pairwise=args.pairwise,
        rows=args.rows,
        log_level=args.log_level,
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"rows": results.rows, "n": results.n}, indent=1))
    if results.profile:
        print(results.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
