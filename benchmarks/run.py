"""`make bench`: runs the cold-start, warm-invocation and background-load benchmarks, rewrites
benchmarks/RESULTS.md and renders benchmarks/cold_start.png.

`python -m benchmarks.run` (everything, several minutes), or a quick subset:
`python -m benchmarks.run --sizes 64 --repeats 1 --warm-n 200 --bg-sizes 64 --bg-repeats 1`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import background, cold_start, load, warm
from benchmarks.s3endpoint import DEFAULT_BANDWIDTH, DEFAULT_LATENCY

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
PNG = HERE / "cold_start.png"
RAW = HERE / "data" / "last-run.json"

LINK_GOAL = 0.85
NAIVE_GOAL = 4.0
NAIVE_GOAL_SIZE = 512
RSS_GOAL = 1.15
WARM_GOAL = 1.10


def machine() -> dict[str, str]:
    import boto3
    import fastapi
    import torch

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
    try:
        from importlib.metadata import version

        mangum = version("mangum")
    except Exception:
        mangum = "?"
    return {
        "CPU": cpu,
        "cores visible": str(len(os.sched_getaffinity(0))),
        "RAM": mem,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "boto3": boto3.__version__,
        "FastAPI": fastapi.__version__,
        "Mangum": mangum,
        "lazyserve measured at": revision(),
    }


def revision() -> str:
    """The commit measured, and whether src/ or handler/ differ from it."""
    import subprocess

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=HERE.parent, capture_output=True, text=True, timeout=10
            )
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src", "handler")
    return f"{commit}" + (" with uncommitted changes in src/ or handler/" if dirty else "")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def goals(
    cold: cold_start.ColdStartResults | None, warm_results: warm.WarmResults | None
) -> list[str]:
    rows = ["| goal | measured | |", "| --- | --- | --- |"]
    if cold is not None:
        summaries = [s for s in cold.summaries() if {"lazyserve", "link8"} <= set(s.seconds)]
        if summaries:
            fractions = ", ".join(
                f"{s.size / 2**20:.0f} MiB: {s.link_fraction:.2f}" for s in summaries
            )
            ok = all(s.link_fraction >= LINK_GOAL for s in summaries)
            rows.append(
                f"| lazyserve ≥ {LINK_GOAL} of the link limit at 8 connections "
                f"| {fractions} | {_yes(ok)} |"
            )
        at = [
            s
            for s in cold.summaries()
            if round(s.size / 2**20) == NAIVE_GOAL_SIZE and {"naive", "lazyserve"} <= set(s.seconds)
        ]
        if at:
            s = at[0]
            extra = ""
            if "one_get" in s.seconds:
                extra = f" (and {s.seconds['one_get'] / s.seconds['lazyserve']:.1f}x one GET)"
            rows.append(
                f"| lazyserve ≥ {NAIVE_GOAL:g}x faster than naive at {NAIVE_GOAL_SIZE} MiB "
                f"| {s.speedup_vs_naive:.2f}x{extra} | {_yes(s.speedup_vs_naive >= NAIVE_GOAL)} |"
            )
        lazy = [s for s in cold.summaries() if "lazyserve" in s.seconds]
        if lazy:
            ratios = ", ".join(
                f"{s.size / 2**20:.0f} MiB: {s.rss_ratio('lazyserve'):.2f}" for s in lazy
            )
            ok = all(s.rss_ratio("lazyserve") <= RSS_GOAL for s in lazy)
            rows.append(
                f"| lazyserve peak RSS growth ≤ {RSS_GOAL}x the weights | {ratios} | {_yes(ok)} |"
            )
    if warm_results is not None:
        ok = warm_results.ratio_p50 <= WARM_GOAL and warm_results.ratio_p99 <= WARM_GOAL
        rows.append(
            f"| warm invocation ≤ {WARM_GOAL:.2f}x the bare floor (p50 and p99) "
            f"| p50 {warm_results.ratio_p50:.2f}x, p99 {warm_results.ratio_p99:.2f}x | {_yes(ok)} |"
        )
    return rows


def plot(cold: cold_start.ColdStartResults, path: Path = PNG) -> None:
    """Seconds to a ready model against model size, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    summaries = cold.summaries()
    sizes = [round(s.size / 2**20) for s in summaries]
    styles = {
        "one_get": ("one GET into memory → safetensors.load", "#d62728", "o", "-"),
        "naive": ("naive: download_file to /tmp → load_file", "#ff7f0e", "s", "-"),
        "lazyserve": ("lazyserve (8 ranged GETs into one buffer)", "#1f77b4", "D", "-"),
        "link8": ("link limit: 8 connections, bytes discarded", "#555555", "|", "--"),
        "link1": ("link: 1 connection, bytes discarded", "#999999", "|", ":"),
    }
    fig, ax = plt.subplots(figsize=(9.5, 6), dpi=120)
    offsets = {"one_get": (-8, 8), "naive": (-8, 8), "lazyserve": (8, -14)}
    for method, (label, color, marker, line) in styles.items():
        points = [
            (x, s.seconds[method])
            for x, s in zip(sizes, summaries, strict=True)
            if method in s.seconds
        ]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, line, color=color, marker=marker, label=label, linewidth=2, markersize=7)
        if method in offsets:
            dx, dy = offsets[method]
            for x, y in points:
                ax.annotate(
                    f"{y:.2f} s",
                    (x, y),
                    textcoords="offset points",
                    xytext=(dx, dy),
                    ha="right" if dx < 0 else "left",
                    fontsize=9,
                    color=color,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} MiB"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("weights size (safetensors, float32; log scale)", fontsize=11)
    ax.set_ylabel("seconds from fetch start to a ready model (log scale)", fontsize=11)
    ax.set_title(
        "Cold start from S3: seconds to a ready model\n"
        f"(local S3 stand-in: {cold.bandwidth / 1e6:g} MB/s per connection, "
        f"{cold.latency * 1e3:g} ms first byte; median of {cold.repeats})",
        fontsize=12,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", framealpha=0.95)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render(
    *,
    command: str,
    started: datetime,
    seconds: float,
    info: dict[str, str],
    loads: tuple[str, str],
    cold: cold_start.ColdStartResults | None,
    warm_results: warm.WarmResults | None,
    bg: background.BackgroundResults | None,
    load_report: dict[str, Any] | None = None,
) -> str:
    bandwidth = cold.bandwidth if cold else DEFAULT_BANDWIDTH
    latency = cold.latency if cold else DEFAULT_LATENCY
    out = [
        "# Benchmark results",
        "",
        f"Generated by `{command}` on {started:%Y-%m-%d %H:%M} UTC in {seconds / 60:.1f} min. "
        "Do not edit by hand: `make bench` rewrites this file. How the numbers are made, and "
        "what limits them, is in [README.md](README.md).",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- load average (1/5/15 min) at the start: {loads[0]}; at the end: {loads[1]} "
        "(a shared machine: other jobs ran meanwhile)",
        "",
        "## The S3 endpoint",
        "",
        "`benchmarks/s3endpoint.py`, an S3-compatible HTTP/1.1 endpoint on 127.0.0.1 serving the "
        "weights file from disk with `os.sendfile`: path-style GET/HEAD, `Range`, `ETag`, "
        "`If-Match` (412), S3 XML errors. It models S3 the way LAMBDA-FACTS.md describes it: "
        f"at most **{bandwidth / 1e6:g} MB/s per connection** (a token bucket per connection) "
        f"and **{latency * 1e3:g} ms before the first byte** of every response. It is a local "
        "stand-in, not S3: no TLS, no network beyond loopback, no throttling. moto is not used "
        "because its server reads the whole object for every ranged GET (quadratic work for "
        "a ranged load) and has no bandwidth or latency model.",
        "",
    ]
    out += ["## Goals", "", *goals(cold, warm_results), ""]
    if cold is not None:
        out += [
            "## Cold start: seconds from the start of the fetch to a ready model",
            "",
            f"Median of {cold.repeats} runs per cell, each method in a fresh process (imports "
            "done and boto3 clients made before the clock starts; the methods' order rotates "
            f"between repeats). lazyserve: {cold.concurrency} connections, "
            f"{cold.part_size // 2**20} MiB parts, sha256 verified. MB/s = weights bytes / "
            "seconds. Peak RSS growth = VmHWM after the load (reset with `clear_refs` before) "
            "minus VmRSS before (the reset worked in "
            f"{sum(x.peak_reset for x in cold.samples)} of {len(cold.samples)} runs). "
            "The link limit reads the same object with the same "
            "connections and part size, discarding the bytes. Client CPU = user+sys of the "
            "loading process; endpoint CPU = the endpoint's process meanwhile. Every loaded "
            "model is checked against sums of its tensors taken when the file was written.",
            "",
            cold_start.table(cold),
            "",
        ]
        lazy = [s for s in cold.summaries() if s.fetch_seconds is not None]
        if lazy:
            split = "; ".join(
                f"{s.size / 2**20:.0f} MiB: fetch {s.fetch_seconds:.3f} s, "
                f"build {s.build_seconds:.3f} s"
                for s in lazy
            )
            out += [f"lazyserve's own split (ModelInfo, medians): {split}.", ""]
        out += ["![seconds to a ready model against size](cold_start.png)", ""]
    if warm_results is not None:
        out += [
            "## Warm invocations",
            "",
            f"`events/http-api-predict.json` (HTTP API v2, one digit), {warm_results.n} "
            f"invocations of each app after {warm_results.warmup} warm-up rounds, interleaved "
            "in one process (the order alternates), timed around the handler call.",
            "",
            warm.table(warm_results),
            "",
        ]
    if bg is not None:
        out += [
            "## Background load: how much of the fetch overlaps the import",
            "",
            "A fresh process per trial runs `benchmarks/bg_app.py`, which follows "
            "handler/app.py's order (settings → `prefetch` unless lazy → `import torch`, "
            "FastAPI, Mangum, lazyserve → build the model) and fetches synthetic weights from "
            f"the endpoint above; median of {bg.repeats}. *import* = from after the settings "
            "to the end of the imports; *overlapped* = the part of the fetch inside that window; "
            "*process start to ready model* includes the interpreter's start.",
            "",
            background.table(bg),
            "",
        ]
    if load_report is not None:
        r, lat, health = load_report, load_report["latency"], load_report["health"]
        out += [
            f"## Load: {r['requests']:,} requests at {r['concurrency']} concurrent from the "
            "cold start",
            "",
            "`benchmarks/load.py`: moto's S3 server and uvicorn (`handler.app:app`, one worker) "
            "on 127.0.0.1 as their own process; this process sends `POST /predict` (one digit) "
            "from the moment /health first answers, i.e. during the cold start, and probes "
            "`GET /health` on its own connection meanwhile.",
            "",
            "| requests | 200 | 5xx | loads (S3 GETs / parts per load) | waited for the load "
            "| throughput | p50 | p99 | /health p50 | /health p99 |",
            "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {r['requests']} | {r['successes']} | {r['server_errors']} | {r['loads']} "
            f"({r['s3_gets']} / {r['parts_per_load']}) | {r['waited_for_load']} "
            f"| {r['throughput_rps']} req/s | {lat['p50_ms']} ms | {lat['p99_ms']} ms "
            f"| {health['p50_ms']} ms | {health['p99_ms']} ms |",
            "",
        ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(cold_start.DEFAULT_SIZES), help="MiB"
    )
    parser.add_argument("--repeats", type=int, default=3, help="cold-start repeats")
    parser.add_argument("--warm-n", type=int, default=2000, help="warm invocations of each app")
    parser.add_argument(
        "--bg-sizes", type=int, nargs="+", default=list(background.DEFAULT_SIZES), help="MiB"
    )
    parser.add_argument("--bg-repeats", type=int, default=3)
    parser.add_argument(
        "--only", nargs="+", choices=("cold", "warm", "background", "load"), help="only these"
    )
    parser.add_argument("--load-requests", type=int, default=5000)
    parser.add_argument("--load-concurrency", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of warm runs")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    only = set(args.only or ("cold", "warm", "background", "load"))
    command = " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])])
    started = datetime.now(UTC)
    clock = time.perf_counter()
    load_start = _load()
    info = machine()

    def log(line: str) -> None:
        print(line, flush=True)

    cold = warm_results = bg = None
    if "cold" in only:
        log(f"cold start: sizes {args.sizes} MiB, {args.repeats} repeats")
        cold = cold_start.run(args.sizes, repeats=args.repeats, log=log)
        log(cold_start.table(cold))
        plot(cold)
        log(f"wrote {PNG}")
    if "warm" in only:
        log(f"warm invocations: {args.warm_n} each")
        warm_results = warm.run(args.warm_n, profile=args.profile, log=log)
        log(warm.table(warm_results))
        if warm_results.profile:
            log(warm_results.profile)
    if "background" in only:
        log(f"background load: sizes {args.bg_sizes} MiB, {args.bg_repeats} repeats")
        bg = background.run(args.bg_sizes, repeats=args.bg_repeats, log=log)
        log(background.table(bg))
    load_report = None
    if "load" in only:
        log(f"load: {args.load_requests} requests at {args.load_concurrency} concurrent")
        load_report = load.run(args.load_requests, args.load_concurrency)
        log(json.dumps(load_report))
    text = render(
        command=command,
        started=started,
        seconds=time.perf_counter() - clock,
        info=info,
        loads=(load_start, _load()),
        cold=cold,
        warm_results=warm_results,
        bg=bg,
        load_report=load_report,
    )
    args.output.write_text(text + "\n")
    RAW.parent.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {
        "command": command,
        "cold": cold.as_dict() if cold else None,
        "warm": asdict(warm_results) if warm_results else None,
        "background": asdict(bg) if bg else None,
        "load": load_report,
    }
    RAW.write_text(json.dumps(raw, indent=1))
    log(f"wrote {args.output} (raw samples: {RAW})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
