"""A BERT-base-sized transformers model (default BertConfig(), about 440 MB of float32): lazyserve's
fetch from the S3 stand-in and build (`Service.from_pretrained`'s load), against transformers'
from_pretrained from local disk, each followed by one forward (which touches every weight), each
variant in a fresh process; also the build alone from bytes already in memory.

    python -m benchmarks.pretrained [--repeats 3] [--dir /tmp/lazyserve-bench-bert-base]

The model directory (random weights, save_pretrained) is written once to --dir and reused; its
pages are read once before the runs, so from_pretrained reads from the page cache, and the
stand-in serves the same files. Peak RSS growth runs to the end of the forward: a memory-mapped
file's pages count once the forward reads them, and lazyserve's include the buffers the files
were fetched into. Goals (on `lazyserve`): peak RSS growth <= 1.10x the weights; build (after
the fetch) <= 1.2x from_pretrained's time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BUCKET,
    ROOT,
    load_average,
    proc_status,
    pushed,
    warm_torch,
    worker_env,
)
from benchmarks.s3endpoint import S3Endpoint

DEFAULT_DIR = Path("/tmp/lazyserve-bench-bert-base")
WEIGHTS = "model.safetensors"
URI = "file://bench/bert-base/"
PREFIX = "bert-base/"  # where the stand-in serves the directory's files
VARIANTS = {
    "from_pretrained": "AutoModel.from_pretrained(dir), transformers from local disk (mmap)",
    "lazyserve": "lazyserve's load_pretrained(AutoModel): fetch from the S3 stand-in, build",
    "build_pretrained": "lazyserve.pretrained.build_pretrained(AutoModel, dir, views)",
    "build_pretrained_cls": "the same with BertModel (no Auto class to resolve)",
    "build_module": "lazyserve.build.build_module(lambda: BertModel(config), views)",
}
BENCH_VARIANTS = ("from_pretrained", "lazyserve")  # what `make bench` runs
JUDGED = "lazyserve"
PEAK_GOAL = 1.10
TIME_GOAL = 1.2


def model_dir(directory: Path, config: Any = None) -> Path:
    """A BertModel with random weights (default BertConfig(), or `config`), saved once with
    save_pretrained."""
    if (directory / WEIGHTS).is_file() and (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(config or BertConfig()).save_pretrained(directory)
    return directory


def _reset_peak() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS.
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _read(path: Path) -> bytearray:
    """The file's bytes in one buffer, as a fetch leaves them (readinto: no second copy)."""
    buffer = bytearray(path.stat().st_size)
    with open(path, "rb", buffering=0) as file:
        view = memoryview(buffer)
        done = 0
        while done < len(buffer):
            done += file.readinto(view[done:]) or 0
    return buffer


def child(variant: str, directory: Path) -> dict[str, Any]:
    """One measurement in this (fresh) process; returns its figures. `lazyserve` fetches from
    the S3 stand-in that AWS_ENDPOINT_URL_S3 names, where the directory is s3://bench/PREFIX."""
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    from lazyserve.build import build_module
    from lazyserve.formats import read_state_dict
    from lazyserve.pretrained import build_pretrained
    from lazyserve.sources import Weights

    config = BertConfig.from_pretrained(directory, local_files_only=True)
    path = directory / WEIGHTS
    size = path.stat().st_size
    fetch_seconds = read_seconds = 0.0
    started = time.perf_counter()

    def views() -> dict[str, torch.Tensor]:
        buffer = _read(path)
        nonlocal read_seconds
        read_seconds = time.perf_counter() - started
        return read_state_dict(Weights(str(path), size, "0" * 64, buffer=buffer))

    def from_s3() -> torch.nn.Module:
        nonlocal read_seconds, fetch_seconds
        loaded = load_pretrained(AutoModel, settings)
        read_seconds = fetch_seconds = loaded.info.fetch_seconds
        module: torch.nn.Module = loaded.module
        return module

    if variant == "lazyserve":
        from lazyserve.model import load_pretrained
        from lazyserve.settings import load_settings
        from lazyserve.sources import s3_get_client

        settings = load_settings({"LAZYSERVE_MODEL_URI": f"s3://{BUCKET}/{PREFIX}"})
        s3_get_client().prepare(BUCKET)  # the client, its credentials and endpoint
    builds: dict[str, Callable[[], torch.nn.Module]] = {
        "from_pretrained": lambda: AutoModel.from_pretrained(directory, local_files_only=True),
        "lazyserve": from_s3,
        "build_pretrained": lambda: build_pretrained(AutoModel, directory, views(), URI).module,
        "build_pretrained_cls": lambda: build_pretrained(BertModel, directory, views(), URI).module,
        "build_module": lambda: build_module(lambda: BertModel(config), views(), URI),
    }
    warm_torch()
    gc.collect()
    baseline = proc_status("VmRSS")
    _reset_peak()
    read_seconds = 0.0
    started = time.perf_counter()
    model = builds[variant]()
    total = time.perf_counter() - started
    with torch.inference_mode():
        model(torch.ones(1, 16, dtype=torch.long))  # a memory map's pages become resident here
    return {
        "variant": variant,
        "weights": size,
        "read_seconds": read_seconds,
        "fetch_seconds": fetch_seconds,
        "build_seconds": total - read_seconds,
        "peak_growth": proc_status("VmHWM") - baseline,
        "rss_after_forward": proc_status("VmRSS") - baseline,
    }


def measure(variant: str, directory: Path, endpoint: str | None = None) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if endpoint is not None:
        env = {**worker_env(endpoint), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH")])
    )
    command = [sys.executable, "-m", "benchmarks.pretrained", "--child", variant]
    result = subprocess.run(
        [*command, "--dir", str(directory)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{result.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def serve_directory(s3: S3Endpoint, directory: Path, prefix: str = PREFIX) -> None:
    """Every file of the directory as s3://bench/<prefix><name>."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            key = prefix + path.relative_to(directory).as_posix()
            s3.add(BUCKET, key, path, metadata=pushed(path))


def run(
    directory: Path,
    repeats: int,
    variants: Sequence[str] = tuple(VARIANTS),
    *,
    config: Any = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every variant `repeats` times, interleaved, each in a fresh process; `config` makes a
    smaller model (the directory is made once)."""
    model_dir(directory, config)
    _read(directory / WEIGHTS)  # into the page cache: every variant reads from memory
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with S3Endpoint() as s3:
        serve_directory(s3, directory)
        for _ in range(repeats):  # interleaved, so a busy moment does not hit one variant only
            for variant in variants:
                endpoint = s3.endpoint if variant == "lazyserve" else None
                runs[variant].append(measure(variant, directory, endpoint))
                if log is not None:
                    last = runs[variant][-1]
                    log(
                        f"  pretrained {variant:<20} fetch {last['fetch_seconds']:6.3f}  "
                        f"build {last['build_seconds']:6.3f}  "
                        f"peak +{last['peak_growth'] / last['weights']:5.2f}x"
                    )
    return runs


def judged(runs: dict[str, list[dict[str, Any]]]) -> tuple[str, float, float]:
    """(variant, peak growth / weights, build / from_pretrained's build): the goals' figures,
    on `lazyserve` when it ran, else on build_pretrained."""
    variant = JUDGED if runs.get(JUDGED) else "build_pretrained"

    def median(name: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[name]))

    weights = runs[variant][0]["weights"]
    peak = median(variant, "peak_growth") / weights
    ratio = median(variant, "build_seconds") / median("from_pretrained", "build_seconds")
    return variant, peak, ratio


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    def median(variant: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[variant]))

    weights = runs["from_pretrained"][0]["weights"]
    reference = median("from_pretrained", "build_seconds")
    lines = [
        f"weights {weights / 2**20:.0f} MiB, {len(runs['from_pretrained'])} runs each, "
        f"medians; load average {load_average()}",
        "",
        "| variant | fetch or read s | build s | build ÷ from_pretrained | peak RSS growth "
        "| ÷ weights | RSS after a forward ÷ weights |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant in runs:
        build = median(variant, "build_seconds")
        peak = median(variant, "peak_growth")
        lines.append(
            f"| {variant} | {median(variant, 'read_seconds'):.3f} | {build:.3f} | "
            f"{build / reference:.2f} | {peak / 2**20:.0f} MiB | {peak / weights:.2f} | "
            f"{median(variant, 'rss_after_forward') / weights:.2f} |"
        )
    name, ours, ratio = judged(runs)
    lines += [
        "",
        f"goal peak RSS growth <= {PEAK_GOAL}x the weights ({name}): {ours:.2f}x, "
        f"{'met' if ours <= PEAK_GOAL else 'NOT met'}",
        f"goal build <= {TIME_GOAL}x from_pretrained ({name}): {ratio:.2f}x, "
        f"{'met' if ratio <= TIME_GOAL else 'NOT met'}",
        "",
        *(f"- {variant}: {what}" for variant, what in VARIANTS.items() if variant in runs),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.dir)))
        return
    print(table(run(args.dir, args.repeats, args.variants, log=print)))


if __name__ == "__main__":
    main()
