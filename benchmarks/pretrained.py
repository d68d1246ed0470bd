"""Building a BERT-base-sized transformers model (default BertConfig(), about 440 MB of float32)
from bytes already in memory, against transformers' from_pretrained from local disk: build time
and peak RSS growth, each variant in a fresh process.

    python -m benchmarks.pretrained [--repeats 3] [--dir /tmp/lazyserve-bench-bert-base]

The model directory (random weights, save_pretrained) is written once to --dir and reused; its
pages are read once before the runs, so every variant reads from the page cache. The lazyserve
variants' peak includes the buffer the weights are read into (a fetch's buffer): the growth
they are judged on is the whole cost of the bytes and the model. Goals: peak RSS growth
<= 1.10x the weights; build <= 1.2x from_pretrained's time.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, load_average, proc_status

DEFAULT_DIR = Path("/tmp/lazyserve-bench-bert-base")
WEIGHTS = "model.safetensors"
URI = "file://bench/bert-base/"
VARIANTS = {
    "from_pretrained": "AutoModel.from_pretrained(dir), transformers from local disk (mmap)",
    "build_pretrained": "lazyserve.pretrained.build_pretrained(AutoModel, dir, views)",
    "build_pretrained_cls": "the same with BertModel (no Auto class to resolve)",
    "build_module": "lazyserve.build.build_module(lambda: BertModel(config), views)",
}
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
    """One measurement in this (fresh) process; returns its figures."""
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    from lazyserve.build import build_module
    from lazyserve.formats import read_state_dict
    from lazyserve.pretrained import build_pretrained
    from lazyserve.sources import Weights

    config = BertConfig.from_pretrained(directory, local_files_only=True)
    path = directory / WEIGHTS
    size = path.stat().st_size

    def views() -> dict[str, torch.Tensor]:
        buffer = _read(path)
        nonlocal read_seconds
        read_seconds = time.perf_counter() - started
        return read_state_dict(Weights(str(path), size, "0" * 64, buffer=buffer))

    builds: dict[str, Callable[[], torch.nn.Module]] = {
        "from_pretrained": lambda: AutoModel.from_pretrained(directory, local_files_only=True),
        "build_pretrained": lambda: build_pretrained(AutoModel, directory, views(), URI).module,
        "build_pretrained_cls": lambda: build_pretrained(BertModel, directory, views(), URI).module,
        "build_module": lambda: build_module(lambda: BertModel(config), views(), URI),
    }
    gc.collect()
    baseline = proc_status("VmRSS")
    _reset_peak()
    read_seconds = 0.0
    started = time.perf_counter()
    model = builds[variant]()
    total = time.perf_counter() - started
    peak = proc_status("VmHWM")
    with torch.inference_mode():
        model(torch.ones(1, 16, dtype=torch.long))  # a memory map's pages become resident here
    return {
        "variant": variant,
        "weights": size,
        "read_seconds": read_seconds,
        "build_seconds": total - read_seconds,
        "peak_growth": peak - baseline,
        "rss_after_forward": proc_status("VmRSS") - baseline,
    }


def measure(variant: str, directory: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
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


def run(directory: Path, repeats: int) -> dict[str, list[dict[str, Any]]]:
    model_dir(directory)
    _read(directory / WEIGHTS)  # into the page cache: every variant reads from memory
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):  # interleaved, so a busy moment does not hit one variant only
        for variant in VARIANTS:
            runs[variant].append(measure(variant, directory))
    return runs


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    weights = runs["from_pretrained"][0]["weights"]
    reference = median("from_pretrained", "build_seconds")
    lines = [
        f"weights {weights / 2**20:.0f} MiB, {len(runs['from_pretrained'])} runs each, "
        f"medians; load average {load_average()}",
        "",
        "| variant | read s | build s | build ÷ from_pretrained | peak RSS growth | ÷ weights "
        "| RSS after a forward ÷ weights |",
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
    ours = median("build_pretrained", "peak_growth") / weights
    ratio = median("build_pretrained", "build_seconds") / reference
    lines += [
        "",
        f"goal peak RSS growth <= {PEAK_GOAL}x the weights (build_pretrained): {ours:.2f}x, "
        f"{'met' if ours <= PEAK_GOAL else 'NOT met'}",
        f"goal build <= {TIME_GOAL}x from_pretrained (build_pretrained): {ratio:.2f}x, "
        f"{'met' if ratio <= TIME_GOAL else 'NOT met'}",
        "",
        *(f"- {variant}: {what}" for variant, what in VARIANTS.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.dir)))
        return
    print(table(run(args.dir, args.repeats)))


if __name__ == "__main__":
    main()
