"""`make bench`: every benchmark in one run (fetch against the peers, end to end under
awslambdaric, a transformers model fetched and built, batched against single prediction, warm
Lambda invocations, uvicorn, many models, load from the cold start), the goals computed from it,
written to benchmarks/RESULTS.md, cold_start.png and data/last-run.json.

`python -m benchmarks.run` (everything, about 35 minutes on 2 vCPUs)
`python -m benchmarks.run --quick` (smallest sizes, one repeat, short runs: wiring, not numbers)
`python -m benchmarks.run --only peers many` (some parts)
A quick or partial run writes benchmarks/data/RESULTS-partial.md, never RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import batching, e2e, load, many, peers, pretrained, uvicorn_load, warm
from benchmarks.common import BUCKET, ROOT, WeightsFile, load_average, pushed
from benchmarks.e2e import E2EResults
from benchmarks.s3endpoint import S3Endpoint

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
PARTIAL = HERE / "data" / "RESULTS-partial.md"
PLOT = "cold_start.png"  # beside the results file
RAW = HERE / "data" / "last-run.json"
README = HERE / "README.md"
PARTS = ("peers", "e2e", "pretrained", "batching", "warm", "uvicorn", "load", "many")
# Where each part's method is described, once (benchmarks/README.md's headings).
METHOD = {
    "peers": "#fetch-peerspy",
    "e2e": "#end-to-end-e2epy",
    "pretrained": "#a-transformers-model-pretrainedpy",
    "batching": "#batching-batchingpy",
    "warm": "#warm-invocations-warmpy",
    "uvicorn": "#under-uvicorn-uvicorn_loadpy",
    "many": "#many-models-manypy",
    "load": "#load-from-the-cold-start-loadpy",
    "goals": "#the-goals",
}
VERSIONS = (
    *peers.PACKAGES,
    "fastapi",
    "starlette",
    "pydantic",
    "mangum",
    "uvicorn",
    "awslambdaric",
    "httpx",
    "moto",
    "transformers",
)

# --- the goals (benchmarks/README.md, "The goals") ---------------------------------------------
FETCH_SMALL, FETCH_SMALL_AT = 0.90, 64  # fraction of link8 at 64 MiB
FETCH_LARGE, FETCH_LARGE_FROM = 0.85, 512  # fraction of link16 at 512 MiB and above
LINK16 = "link:16"
CPU_GOAL = 1.2  # lazyserve's client CPU-seconds per GiB fetched
RSS_GOAL = 1.10  # peak RSS growth / weights
E2E_GOAL = 1.05  # background / max(floor, link time), 2 vCPUs
E2E_ONE_CPU, E2E_ONE_CPU_AT = 1.10, "128M"  # background / floor on one vCPU, at 128 MiB
E2E_MODE = "background"  # the template's LAZYSERVE_LOAD
HF_BUILD_GOAL = 1.2  # lazyserve's build after the fetch / from_pretrained's
HF_E2E_VARIANTS = ("floor", "local", "lazy", "background")
WARM_P50, WARM_P99 = 1.10, 1.20
UVICORN_RPS, UVICORN_P99 = 0.95, 1.3
HEALTH_P99_MS = 20.0
HEALTH_JUDGED = ("sleep", "torch")  # `python` holds the GIL: a worst case no torch model makes
WARM_LOG_LEVEL = "INFO"  # template.yaml's ApplicationLogLevel default, with the JSON format


@dataclass(frozen=True)
class Config:
    """How much of each part a run does."""

    peer_sizes: tuple[int, ...] = (64, 512, 1024)
    peer_repeats: int = 3
    e2e_sizes: tuple[str, ...] = (e2e.DIGITS, "128M")
    e2e_repeats: int = 7
    e2e_warmup: bool = True
    e2e_cpus: tuple[int, ...] = (2, 1)
    link_repeats: int = 3
    hf_model: str = e2e.BERT  # BERT-base (about 440 MB), or BERT-TINY
    hf_repeats: int = 3
    hf_e2e_repeats: int = 5
    batching_quick: bool = False  # a tiny BERT and short runs
    warm_n: int = 5000
    warm_warmup: int = 500
    uvicorn_duration: float = 10.0
    uvicorn_warmup: float = 3.0
    uvicorn_slow_duration: float = 10.0
    load_requests: int = 5000
    load_concurrency: int = 64
    many_models: int = 8
    many_repeats: int = 5
    many_resident: int = 20


FULL = Config()
QUICK = Config(
    peer_sizes=(64,),
    peer_repeats=1,
    e2e_sizes=(e2e.DIGITS,),
    e2e_repeats=1,
    e2e_warmup=False,
    link_repeats=1,
    hf_model=e2e.BERT_TINY,
    hf_repeats=1,
    hf_e2e_repeats=1,
    batching_quick=True,
    warm_n=200,
    warm_warmup=20,
    uvicorn_duration=2.0,
    uvicorn_warmup=1.0,
    uvicorn_slow_duration=2.0,
    load_requests=500,
    load_concurrency=16,
    many_models=4,
    many_repeats=1,
    many_resident=5,
)


@dataclass
class Run:
    """What one run measured (each part None when it did not run or failed)."""

    peers: peers.PeersResults | None = None
    e2e: list[e2e.E2EResults] = field(default_factory=list)
    link: dict[str, float] = field(default_factory=dict)  # e2e size -> link8 seconds
    pretrained: dict[str, list[dict[str, Any]]] | None = None  # variant -> figures per run
    hf_e2e: E2EResults | None = None
    batching: dict[str, Any] | None = None
    warm: warm.WarmResults | None = None
    uvicorn: dict[str, Any] | None = None
    load: dict[str, Any] | None = None
    many: many.ManyResults | None = None
    failed: dict[str, str] = field(default_factory=dict)  # part -> the error's last line
    seconds: dict[str, float] = field(default_factory=dict)  # part -> wall time
    load_at: dict[str, str] = field(default_factory=dict)  # part -> load average at its start

    def as_dict(self) -> dict[str, Any]:
        return {
            "peers": self.peers.as_dict() if self.peers else None,
            "e2e": [r.as_dict() for r in self.e2e],
            "link": self.link,
            "pretrained": self.pretrained,
            "hf_e2e": self.hf_e2e.as_dict() if self.hf_e2e else None,
            "batching": self.batching,
            "warm": asdict(self.warm) if self.warm else None,
            "uvicorn": self.uvicorn,
            "load": self.load,
            "many": self.many.as_dict() if self.many else None,
            "failed": self.failed,
            "seconds": self.seconds,
            "load_at": self.load_at,
        }


# --- the parts ---------------------------------------------------------------------------------


def link_times(sizes: Sequence[str], repeats: int) -> dict[str, float]:
    """Median seconds for the link (8 connections, 8 MiB ranges, bytes discarded) to carry each
    e2e weights file from the same stand-in, in a fresh process each time."""
    out = {}
    with S3Endpoint() as s3:
        for size in sizes:
            work = e2e.workload(size)
            s3.add(BUCKET, work.key, work.path, metadata=pushed(work.path))
            wf = WeightsFile(work.path, work.size, max(work.layers, 1), "", {})
            seconds = [
                peers.measure_in_worker(s3, peers.LINK, work.key, wf)[0]["seconds"]
                for _ in range(repeats)
            ]
            out[size] = statistics.median(seconds)
    return out


def run_part(part: str, config: Config, result: Run, log: Callable[[str], None]) -> None:
    if part == "peers":
        log(f"peers: sizes {config.peer_sizes} MiB, {config.peer_repeats} repeats")
        result.peers = peers.run(config.peer_sizes, config.peer_repeats, log=log)
        log(peers.table(result.peers))
    elif part == "e2e":
        for cpus in config.e2e_cpus:
            log(f"e2e: {cpus} vCPU(s), sizes {config.e2e_sizes}, {config.e2e_repeats} repeats")
            results = e2e.run(
                config.e2e_sizes,
                repeats=config.e2e_repeats,
                cpus=cpus,
                warmup=config.e2e_warmup,
                log=log,
            )
            result.e2e.append(results)
            log(e2e.table(results))
        result.link = link_times(config.e2e_sizes, config.link_repeats)
        log(f"link time (8 connections): {result.link}")
    elif part == "pretrained":
        directory = e2e.BERT_DIRS[config.hf_model]
        tiny = e2e.workload(config.hf_model)  # writes the directory once (tiny or BERT-base)
        log(f"pretrained: {tiny.label} ({tiny.size / 2**20:.0f} MiB), {config.hf_repeats} repeats")
        result.pretrained = pretrained.run(
            directory, config.hf_repeats, pretrained.BENCH_VARIANTS, log=log
        )
        log(pretrained.table(result.pretrained))
        log(f"pretrained e2e: 2 vCPUs, {config.hf_e2e_repeats} repeats")
        result.hf_e2e = e2e.run(
            (config.hf_model,),
            repeats=config.hf_e2e_repeats,
            variants=HF_E2E_VARIANTS,
            cpus=2,
            warmup=config.e2e_warmup,
            log=log,
        )
        log(e2e.table(result.hf_e2e))
    elif part == "batching":
        if config.batching_quick:
            log("batching: a tiny BERT, short runs")
            result.batching = batching.run(quick=True, log=log, **batching.QUICK)
        else:
            log("batching: BERT-base, @service.predict_batch against @service.predict")
            result.batching = batching.run(log=log)
        log(batching.table(result.batching))
    elif part == "warm":
        log(f"warm: {config.warm_n} invocations of each row, log level {WARM_LOG_LEVEL}")
        result.warm = warm.run(
            config.warm_n, warmup=config.warm_warmup, log_level=WARM_LOG_LEVEL, log=log
        )
        log(warm.table(result.warm))
    elif part == "uvicorn":
        log(f"uvicorn: {config.uvicorn_duration:g} s per wrk run")
        result.uvicorn = uvicorn_load.run(
            duration=config.uvicorn_duration,
            warmup=config.uvicorn_warmup,
            slow_duration=config.uvicorn_slow_duration,
            log=log,
        )
        log(uvicorn_load.table(result.uvicorn))
    elif part == "load":
        log(f"load: {config.load_requests} requests at {config.load_concurrency} concurrent")
        result.load = load.run(config.load_requests, config.load_concurrency)
        log(json.dumps(result.load))
    elif part == "many":
        log(f"many: {config.many_models} models, {config.many_repeats} repeats")
        result.many = many.run(
            config.many_models,
            repeats=config.many_repeats,
            resident=config.many_resident,
            log=log,
        )
        log(many.table(result.many))
    else:
        raise ValueError(f"unknown part {part!r}; parts: {', '.join(PARTS)}")


# --- the goals ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def lazyserve_default_connections() -> int:
    from lazyserve.settings import DEFAULT_CONCURRENCY

    return DEFAULT_CONCURRENCY


def fetch_goals(results: peers.PeersResults | None) -> list[Goal]:
    small = f"fetch ≥ {FETCH_SMALL:.2f} of link8 at {FETCH_SMALL_AT} MiB"
    large = f"fetch ≥ {FETCH_LARGE:.2f} of link16 from {FETCH_LARGE_FROM} MiB"
    cpu = f"lazyserve's fetch ≤ {CPU_GOAL:g} CPU-seconds per GiB (client, at each size)"
    rss = f"lazyserve's peak RSS growth ≤ {RSS_GOAL:.2f}x the weights"
    faster = "lazyserve faster than every peer at every size (equal connections, and defaults)"
    if results is None:
        return [Goal(name, "not run", None) for name in (small, large, cpu, rss, faster)]
    by = {(s.size, s.method): s for s in results.summaries()}
    sizes = sorted({s.size for s in results.summaries()})
    smalls, larges, cpus, ratios = [], [], [], []
    ok_small = ok_large = ok_cpu = ok_rss = True
    for size in sizes:
        lazy = by.get((size, "lazyserve"))
        if lazy is None:
            continue
        ratios.append(f"{_mib(size)}: {lazy.rss_ratio:.3f}")
        ok_rss &= lazy.rss_ratio <= RSS_GOAL
        per_gib = lazy.cpu / (size / 2**30)
        cpus.append(f"{_mib(size)}: {per_gib:.2f}")
        ok_cpu &= per_gib <= CPU_GOAL
        link8, link16 = by.get((size, peers.LINK)), by.get((size, LINK16))
        # A file's size is its MiB of tensors plus the safetensors header: judged by its MiB.
        if round(size / 2**20) == FETCH_SMALL_AT and link8 is not None:
            fraction = link8.seconds / lazy.seconds
            smalls.append(f"{_mib(size)}: {fraction:.2f}")
            ok_small &= fraction >= FETCH_SMALL
        if size >= FETCH_LARGE_FROM * 2**20 and link16 is not None:
            fraction = link16.seconds / lazy.seconds
            larges.append(f"{_mib(size)}: {fraction:.2f}")
            ok_large &= fraction >= FETCH_LARGE
    default = lazyserve_default_connections()
    closest: list[str] = []
    ok_faster = True
    for size in sizes:
        worst: tuple[float, str] | None = None
        for (at, method), summary in by.items():
            name, count = peers.parse_method(method)
            if at != size or name in ("lazyserve", "lazyserve_sha256", "link"):
                continue
            # Equal connection counts where the peer names one, else lazyserve's default.
            mine = by.get((size, f"lazyserve:{count}")) if count not in (None, default) else None
            mine = mine or by.get((size, "lazyserve"))
            if mine is None:
                continue
            ratio = summary.seconds / mine.seconds  # > 1: lazyserve is faster
            ok_faster &= ratio > 1
            if worst is None or ratio < worst[0]:
                worst = (ratio, method)
        if worst is not None:
            closest.append(f"{_mib(size)}: {worst[1]} {worst[0]:.2f}x")

    def goal(name: str, found: list[str], ok: bool, missing: str) -> Goal:
        return Goal(name, ", ".join(found) or missing, ok if found else None)

    return [
        goal(small, smalls, ok_small, f"no {FETCH_SMALL_AT} MiB row with link8"),
        goal(large, larges, ok_large, f"no row from {FETCH_LARGE_FROM} MiB with link16"),
        goal(cpu, cpus, ok_cpu, "no lazyserve row"),
        goal(rss, ratios, ok_rss, "no lazyserve row"),
        Goal(
            faster,
            "closest peer's time ÷ lazyserve's: " + "; ".join(closest) if closest else "no peers",
            ok_faster if closest else None,
        ),
    ]


def e2e_goals(runs: Sequence[e2e.E2EResults], link: dict[str, float]) -> list[Goal]:
    within = (
        f"e2e, 2 vCPUs: `{E2E_MODE}` ≤ {E2E_GOAL:.2f}x max(floor, link time), process start to "
        "response (floor: the faster of the plain one and the one with `gc.freeze()`)"
    )
    one = f"e2e, 1 vCPU: `{E2E_MODE}` ≤ {E2E_ONE_CPU:.2f}x the floor at {E2E_ONE_CPU_AT}"
    never = f"e2e: `{E2E_MODE}` never slower than `lazy`"
    if not runs:
        return [Goal(name, "not run", None) for name in (within, one, never)]
    ratios, ok_within = [], True
    ones, ok_one = [], True
    pairs, ok_never = [], True
    for results in runs:
        for size in results.sizes():

            def total(variant: str, size: str = size, results: e2e.E2EResults = results) -> Any:
                return results.median(variant, size, lambda t: t.total)

            # The faster of the two floors: the plain function, and the same with the
            # gc.freeze() lazyserve does at INIT.
            floors = [f for f in (total("floor"), total("floor_frozen")) if f is not None]
            floor, mode, lazy = min(floors, default=None), total(E2E_MODE), total("lazy")
            where = f"{results.cpus} vCPU {size}"
            if floor is not None and mode is not None:
                fastest = "floor_frozen" if floor == total("floor_frozen") else "floor"
                if results.cpus == 1:
                    if size == E2E_ONE_CPU_AT:
                        paired = results.paired(E2E_MODE, size, fastest)
                        same = "" if paired is None else f" (same-repeat {paired:.2f})"
                        ones.append(f"{mode / floor:.2f}{same}")
                        ok_one &= mode <= E2E_ONE_CPU * floor
                else:
                    bound = max(floor, link.get(size, 0.0))
                    paired = results.paired(E2E_MODE, size, fastest) if bound == floor else None
                    same = "" if paired is None else f" (same-repeat {paired:.2f})"
                    ratios.append(f"{size}: {mode / bound:.2f}{same}")
                    ok_within &= mode <= E2E_GOAL * bound
            if lazy is not None and mode is not None:
                pairs.append(f"{where}: {mode:.2f} vs {lazy:.2f} s")
                ok_never &= mode <= lazy
    return [
        Goal(within, ", ".join(ratios) or "no 2-vCPU run", ok_within if ratios else None),
        Goal(
            one, ", ".join(ones) or f"no 1-vCPU run at {E2E_ONE_CPU_AT}", ok_one if ones else None
        ),
        Goal(never, ", ".join(pairs), ok_never if pairs else None),
    ]


def pretrained_goals(
    runs: dict[str, list[dict[str, Any]]] | None, hf: e2e.E2EResults | None
) -> list[Goal]:
    rss = f"transformers: lazyserve's fetch + build peak RSS growth ≤ {RSS_GOAL:.2f}x the weights"
    build = f"transformers: build after the fetch ≤ {HF_BUILD_GOAL:g}x from_pretrained's"
    cold = (
        f"transformers e2e, 2 vCPUs: `{E2E_MODE}` ≤ {E2E_GOAL:.2f}x the floor (the faster of "
        "from_pretrained and lazyserve, directory on local disk)"
    )
    found = []
    if runs is None or not runs.get(pretrained.JUDGED) or not runs.get("from_pretrained"):
        found += [Goal(rss, "not run", None), Goal(build, "not run", None)]
    else:
        _, peak, ratio = pretrained.judged(runs)
        found.append(Goal(rss, f"{peak:.2f}x", peak <= RSS_GOAL))
        found.append(Goal(build, f"{ratio:.2f}x", ratio <= HF_BUILD_GOAL))
    if hf is None or not hf.sizes():
        return [*found, Goal(cold, "not run", None)]
    size = hf.sizes()[0]
    floors = {v: hf.median(v, size, lambda t: t.total) for v in ("floor", "local")}
    present = {v: f for v, f in floors.items() if f is not None}
    mode = hf.median(E2E_MODE, size, lambda t: t.total)
    if not present or mode is None:
        return [*found, Goal(cold, "no floor or no background trial", None)]
    fastest = min(present, key=lambda v: present[v])
    floor = present[fastest]
    paired = hf.paired(E2E_MODE, size, fastest)
    same = "" if paired is None else f" (same-repeat {paired:.2f})"
    measured = f"{size}: {mode / floor:.2f} of `{fastest}`{same}"
    return [*found, Goal(cold, measured, mode <= E2E_GOAL * floor)]


def warm_goal(results: warm.WarmResults | None) -> Goal:
    goal = (
        f"warm Lambda invocation ≤ {WARM_P50:.2f}x the inline floor at p50, "
        f"≤ {WARM_P99:.2f}x at p99 (JSON logs at {WARM_LOG_LEVEL}, EMF on)"
    )
    if results is None:
        return Goal(goal, "not run", None)
    p50, p99 = results.ratio_p50, results.ratio_p99
    return Goal(goal, f"p50 {p50:.2f}x, p99 {p99:.2f}x", p50 <= WARM_P50 and p99 <= WARM_P99)


def uvicorn_goals(report: dict[str, Any] | None) -> list[Goal]:
    throughput = (
        f"uvicorn: reference ≥ {UVICORN_RPS:.2f}x the floor's req/s and p99 ≤ "
        f"{UVICORN_P99:g}x at each concurrency, zero errors"
    )
    health = (
        f"/health p99 ≤ {HEALTH_P99_MS:g} ms beside a slow (200 ms) model "
        f"({' and '.join(HEALTH_JUDGED)} forwards)"
    )
    if report is None:
        return [Goal(throughput, "not run", None), Goal(health, "not run", None)]
    rows = report["throughput"]
    cells, ok = [], True
    errors = sum(r["errors"] for r in rows)
    for c in sorted({r["concurrency"] for r in rows}):

        def med(app: str, key: str, c: int = c) -> float:
            return float(
                statistics.median(r[key] for r in rows if r["app"] == app and r["concurrency"] == c)
            )

        rps = med("reference", "rps") / med("floor", "rps")
        p99 = med("reference", "p99_ms") / med("floor", "p99_ms")
        cells.append(f"c={c}: {rps:.2f}x req/s, p99 {p99:.2f}x")
        ok &= rps >= UVICORN_RPS and p99 <= UVICORN_P99
    probes, ok_health = [], True
    for row in report["slow"]:
        if row["app"] != "reference":
            continue
        h = row["health"]
        judged = row["mode"] in HEALTH_JUDGED
        probes.append(f"{row['mode']}: {h['p99_ms']:.1f} ms" + ("" if judged else " (not judged)"))
        if judged:
            ok_health &= h["p99_ms"] <= HEALTH_P99_MS and h["errors"] == 0
    return [
        Goal(
            throughput,
            "; ".join(cells) + f"; {errors} errors",
            (ok and errors == 0) if cells else None,
        ),
        Goal(health, ", ".join(probes), ok_health if probes else None),
    ]


def batching_goals(results: dict[str, Any] | None) -> list[Goal]:
    """batching.py judges its own goals; they are shown here with the others."""
    names = (
        f"batching, 32 clients: requests/s ≥ {batching.GOAL_RPS:g}x `@service.predict`'s",
        "batching, 32 clients: p50 no worse than `@service.predict`'s",
        f"batching, 1 client: p50 ≤ {batching.GOAL_ONE_CLIENT:g}x `@service.predict`'s",
        f"batching, Lambda: one SQS batch of 10 ≥ {batching.GOAL_SQS:g}x faster than 10 "
        "direct invocations",
    )
    if results is None:
        return [Goal(name, "not run", None) for name in names]
    found = []
    for name, judged in zip(names, results["goals"], strict=True):
        value = judged["value"]
        shown = "-" if value is None else f"{value:.2f}x"
        found.append(Goal(name, shown, bool(judged["met"]) if value is not None else None))
    return found


def goals(result: Run) -> list[Goal]:
    return [
        *fetch_goals(result.peers),
        *e2e_goals(result.e2e, result.link),
        *pretrained_goals(result.pretrained, result.hf_e2e),
        *batching_goals(result.batching),
        warm_goal(result.warm),
        *uvicorn_goals(result.uvicorn),
    ]


def goals_table(found: Sequence[Goal]) -> str:
    marks = {True: "**met**", False: "**not met**", None: "not measured"}
    lines = ["| goal | measured | |", "| --- | --- | --- |"]
    lines += [f"| {g.goal} | {g.measured} | {marks[g.met]} |" for g in found]
    return "\n".join(lines)


# --- the plot ----------------------------------------------------------------------------------


def plot(results: peers.PeersResults, path: Path) -> None:
    """Seconds to a ready model against the weights' size, one line per loader; the link's
    lines dashed (8 connections) and dotted (16)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    summaries = results.summaries()
    sizes = sorted({round(s.size / 2**20) for s in summaries})
    methods = list(dict.fromkeys(s.method for s in summaries))
    fig, ax = plt.subplots(figsize=(9.5, 6), dpi=120)
    # One colour per loader; its own default count drawn solid, other counts dash-dotted.
    family = {
        "lazyserve": "#1f77b4",
        "boto3": "#2ca02c",
        "boto3_crt": "#8c564b",
        "runai": "#ff7f0e",
        "s3torchconnector": "#9467bd",
    }
    spare = itertools.cycle(["#d62728", "#e377c2", "#17becf", "#bcbd22"])
    for method in methods:
        points = sorted((round(s.size / 2**20), s.seconds) for s in summaries if s.method == method)
        xs, ys = zip(*points, strict=True)
        name, count = peers.parse_method(method)
        style: dict[str, Any]
        if name == "link":
            dash = "--" if (count or 8) == 8 else ":"
            style = {"color": "#555555", "linestyle": dash, "marker": "_", "markersize": 12}
        else:
            color = family.get(name) or next(spare)
            own = count is None
            style = {
                "color": color,
                "linestyle": "-" if own else "-.",
                "marker": "o" if own else "s",
            }
        width = 2.6 if name == "lazyserve" else 1.6
        ax.plot(xs, ys, label=peers.label(method).replace("**", ""), linewidth=width, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} MiB"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("weights size (safetensors, float32; log scale)")
    ax.set_ylabel("seconds from the start of the fetch to a ready model (log scale)")
    ax.set_title(
        "Fetch from S3: seconds to a ready model\n"
        f"(local S3 stand-in: {results.bandwidth / 1e6:g} MB/s per connection, "
        f"{results.latency * 1e3:g} ms to the first byte; median of {results.repeats})",
        fontsize=11,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.95)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- RESULTS.md --------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo") as info:
            kib = int(next(line for line in info if line.startswith("MemTotal")).split()[1])
            mem = f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    return {
        "CPU": f"{cpu}, {len(os.sched_getaffinity(0))} visible",
        "RAM": mem,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "commit measured": revision(),
    }


def versions() -> str:
    found = []
    for package in VERSIONS:
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} missing")
    wrk = shutil.which("wrk")
    if wrk:
        done = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
        first = (done.stdout or done.stderr).splitlines()
        found.append(first[0].split(" [")[0] if first else "wrk ?")
    return ", ".join(found)


def revision() -> str:
    """The commit measured, and whether src/ or handler/ differ from it."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            )
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src", "handler")
    return commit + (" with uncommitted changes in src/ or handler/" if dirty else "")


def load_table(r: dict[str, Any]) -> str:
    lat, health = r["latency"], r["health"]
    return "\n".join(
        [
            "| requests | 200 | 5xx | loads (S3 GETs / parts per load) | waited for the load "
            "| req/s | p50 | p99 | /health p50 | /health p99 |",
            "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {r['requests']} | {r['successes']} | {r['server_errors']} | {r['loads']} "
            f"({r['s3_gets']} / {r['parts_per_load']}) | {r['waited_for_load']} "
            f"| {r['throughput_rps']} | {lat['p50_ms']} ms | {lat['p99_ms']} ms "
            f"| {health['p50_ms']} ms | {health['p99_ms']} ms |",
        ]
    )


def render(
    result: Run,
    *,
    command: str,
    started: datetime,
    seconds: float,
    loads: tuple[str, str],
    output: Path,
) -> str:
    readme = os.path.relpath(README, output.parent)

    def method(part: str) -> str:
        return f"([method]({readme}{METHOD[part]}))"

    took = ", ".join(f"{part} {s / 60:.1f}" for part, s in result.seconds.items())
    at = ", ".join(f"{part} {value}" for part, value in result.load_at.items())
    out = [
        "# Benchmark results",
        "",
        f"`{command}`, {started:%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min ({took}). "
        f"Written by `benchmarks/run.py`; how each number is made is in [README.md]({readme}).",
        "",
        *[f"- {k}: {v}" for k, v in machine().items()],
        f"- load average (1/5/15 min): {loads[0]} at the start, {loads[1]} at the end; "
        f"1-minute load at the start of each part: {at}",
        f"- versions: {versions()}",
        "",
    ]
    if result.failed:
        out += ["**Failed parts:** " + "; ".join(f"{k}: {v}" for k, v in result.failed.items())]
        out += [""]
    out += [f"## Goals {method('goals')}", "", goals_table(goals(result)), ""]
    if result.peers is not None:
        p = result.peers
        out += [
            f"## Fetch alone {method('peers')}",
            "",
            f"Seconds from the start of the fetch to a model ready for inference, median of "
            f"{p.repeats}, each load in a fresh process; the fraction is link8's time over the "
            "loader's.",
            "",
            peers.table(p),
            "",
            f"![seconds to a ready model against size]({PLOT})",
            "",
        ]
    if result.e2e:
        link = ", ".join(f"{size} {s:.3f} s" for size, s in result.link.items())
        out += [
            f"## End to end under awslambdaric {method('e2e')}",
            "",
            "Seconds from the function process's start to its first response (medians); the "
            f"link alone carries the weights in: {link or 'not measured'}.",
            "",
        ]
        for one in result.e2e:
            cpus = "1 vCPU" if one.cpus == 1 else f"{one.cpus} vCPUs"
            out += [f"{cpus}, median of {one.repeats}:", "", e2e.table(one), ""]
    if result.pretrained is not None or result.hf_e2e is not None:
        out += [f"## A transformers model {method('pretrained')}", ""]
        if result.pretrained is not None:
            out += [pretrained.table(result.pretrained), ""]
        if result.hf_e2e is not None:
            out += [
                "End to end under awslambdaric, 2 vCPUs, median of "
                f"{result.hf_e2e.repeats}; the floor is transformers' from_pretrained from local "
                "disk:",
                "",
                e2e.table(result.hf_e2e),
                "",
            ]
    if result.batching is not None:
        out += [
            f"## Batching {method('batching')}",
            "",
            "`@service.predict_batch` against `@service.predict`, the same model, both served "
            "at once and measured in alternating rounds:",
            "",
            batching.table(result.batching),
            "",
        ]
    if result.warm is not None:
        out += [
            f"## Warm Lambda invocations {method('warm')}",
            "",
            warm.table(result.warm),
            "",
        ]
    if result.uvicorn is not None:
        out += [
            f"## Under uvicorn {method('uvicorn')}",
            "",
            uvicorn_load.table(result.uvicorn),
            "",
        ]
    if result.many is not None:
        out += [
            f"## Many models under a memory budget {method('many')}",
            "",
            "`POST /models/{name}/predict`, in-process ASGI, medians over the requests of "
            "every repeat.",
            "",
            many.table(result.many),
            "",
        ]
    if result.load is not None:
        r = result.load
        out += [
            f"## Load from the cold start {method('load')}",
            "",
            f"{r['requests']:,} `POST /predict` at {r['concurrency']} concurrent against "
            "uvicorn from the moment `/health` first answers, `/health` probed meanwhile.",
            "",
            load_table(r),
            "",
        ]
    return "\n".join(out)


# --- the command ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--only", nargs="+", choices=PARTS, metavar="PART", help=", ".join(PARTS))
    parser.add_argument("--quick", action="store_true", help="small and short: the wiring only")
    parser.add_argument("--output", type=Path, help="default: RESULTS.md for a full run")
    parser.add_argument("--json", type=Path, default=RAW, help="the raw figures")
    args = parser.parse_args(argv)
    parts = [p for p in PARTS if p in (args.only or PARTS)]
    full = not args.quick and len(parts) == len(PARTS)
    output: Path = args.output or (RESULTS if full else PARTIAL)
    config = QUICK if args.quick else FULL
    command = " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])])
    started = datetime.now(UTC)
    clock = time.perf_counter()
    load_start = load_average()

    def log(line: str) -> None:
        print(line, flush=True)

    result = Run()
    for part in parts:
        result.load_at[part] = load_average().split(" / ")[0]
        part_clock = time.perf_counter()
        try:
            run_part(part, config, result, log)
        except Exception as exc:  # one part failing must not lose the others' figures
            traceback.print_exc()
            last = str(exc).strip().splitlines()[-1:] or [""]
            result.failed[part] = f"{type(exc).__name__}: {last[0]}"
        result.seconds[part] = time.perf_counter() - part_clock
        log(f"{part}: {result.seconds[part]:.0f} s")
    output.parent.mkdir(parents=True, exist_ok=True)
    if result.peers is not None:
        plot(result.peers, output.parent / PLOT)
    text = render(
        result,
        command=command,
        started=started,
        seconds=time.perf_counter() - clock,
        loads=(load_start, load_average()),
        output=output,
    )
    output.write_text(text + "\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": command, **result.as_dict()}, indent=1))
    log(goals_table(goals(result)))
    log(f"wrote {output} (raw figures: {args.json})")
    return 1 if result.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
