"""Cold start: seconds from the start of the weights fetch to a ready model, for three ways of
loading safetensors weights from S3, next to the link limit measured in the same run.

Methods (each in a fresh subprocess, so RSS is clean; the endpoint runs in this process):
  naive     boto3 download_file to /tmp (s3transfer's defaults: 10 threads, 8 MB parts),
            safetensors.torch.load_file (a memory map), the model built on the meta device,
            load_state_dict(assign=True): the best-practice recipe without lazyserve
  one_get   get_object()["Body"].read(), safetensors.torch.load(bytes), meta build, assign
  lazyserve lazyserve.model.load_model (parallel ranged GETs into one buffer, tensor views)
  link8     the same ranged GETs on 8 connections, bytes discarded: the endpoint+loopback limit
  link1     one full GET on one connection, bytes discarded

`python -m benchmarks.cold_start --sizes 64 512 --repeats 3`
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.s3endpoint import DEFAULT_BANDWIDTH, DEFAULT_LATENCY, S3Endpoint

if TYPE_CHECKING:
    from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
BUCKET = "bench"
WIDTH = 4096  # nn.Linear(4096, 4096, bias=False) in float32: exactly 64 MiB per layer
LAYER_MIB = WIDTH * WIDTH * 4 // 2**20
METHODS = ("naive", "one_get", "lazyserve", "link8", "link1")
LOADERS = ("naive", "one_get", "lazyserve")
DEFAULT_SIZES = (64, 512, 1024)
CONCURRENCY = 8
PART_SIZE = 8 * 1024 * 1024
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIABENCHBENCHBENCH0",
    "AWS_SECRET_ACCESS_KEY": "bench/fake/secret/key/not/a/real/one/000",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def build_synthetic(layers: int, width: int = WIDTH) -> nn.Sequential:
    """The benchmark model: `layers` x nn.Linear(4096, 4096, bias=False), 64 MiB each."""
    from torch import nn

    return nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))


def build_on_meta(build: Callable[[], nn.Module], state: dict[str, Any]) -> nn.Module:
    """PyTorch's recipe for loading a state dict without initialising the model first: build on
    the meta device, then let load_state_dict(assign=True) adopt the tensors as parameters
    (https://pytorch.org/tutorials/recipes/recipes/module_load_state_dict_tips.html)."""
    import torch

    with torch.device("meta"):
        module = build()
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    size: int
    layers: int
    sha256: str
    checks: dict[str, float]  # float64 sums of a few tensors, to verify what was loaded
    width: int = WIDTH


def weights_file(size_mib: int, data_dir: Path = DATA, *, width: int = WIDTH) -> WeightsFile:
    """A deterministic safetensors file of `size_mib` MiB of float32 (made once, then reused);
    `width` x `width` layers (a smaller width makes small files for tests)."""
    layer_mib = width * width * 4 / 2**20
    layers = round(size_mib / layer_mib)
    if layers < 1 or layers * layer_mib != size_mib:
        raise ValueError(f"sizes are multiples of {layer_mib:g} MiB, got {size_mib}")
    suffix = "" if width == WIDTH else f"-w{width}"
    path = data_dir / f"synthetic-{size_mib}mib{suffix}.safetensors"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        if meta.get("size") == path.stat().st_size and meta.get("layers") == layers:
            return WeightsFile(path, meta["size"], layers, meta["sha256"], meta["checks"], width)
    import torch
    from safetensors.torch import save_file

    data_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(size_mib)
    state = {f"{i}.weight": torch.randn(width, width) / 64 for i in range(layers)}
    checks = {name: _checksum(state[name]) for name in _checked(layers)}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"generator": "benchmarks.cold_start"})
    del state
    digest = hashlib.sha256()
    with open(tmp, "rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)
    tmp.replace(path)
    meta = {"size": path.stat().st_size, "layers": layers, "sha256": digest.hexdigest()}
    sidecar.write_text(json.dumps({**meta, "checks": checks}, indent=1))
    return WeightsFile(path, meta["size"], layers, digest.hexdigest(), checks, width)


def _checked(layers: int) -> list[str]:
    return sorted({"0.weight", f"{layers // 2}.weight", f"{layers - 1}.weight"})


def _checksum(tensor: Any) -> float:
    return float(tensor.double().sum().item())


# --- one measurement, in a fresh subprocess ---------------------------------------------------


def _status(field_name: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return _status("VmHWM") <= _status("VmRSS") + 1024 * 1024


def _link(endpoint: str, bucket: str, key: str, size: int, connections: int, part: int) -> None:
    """Read the object over `connections` keep-alive connections, discarding the bytes."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    starts = list(range(0, size, part))[::-1]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port)
        sink = memoryview(bytearray(1 << 20))
        try:
            while True:
                with lock:
                    if not starts:
                        return
                    start = starts.pop()
                end = min(start + part, size) - 1
                conn.request("GET", f"/{bucket}/{key}", headers={"Range": f"bytes={start}-{end}"})
                response = conn.getresponse()
                got = 0
                while n := response.readinto(sink):
                    got += n
                if response.status != 206 or got != end - start + 1:
                    raise RuntimeError(f"bad range {start}-{end}: {response.status}, {got} bytes")
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=work) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def measure(
    method: str,
    *,
    endpoint: str,
    key: str,
    size: int,
    layers: int,
    sha256: str,
    checks: dict[str, float],
    concurrency: int = CONCURRENCY,
    part_size: int = PART_SIZE,
) -> dict[str, Any]:
    """Load (or read) the weights once by `method`; run in a fresh process."""
    import functools
    import tempfile

    import boto3
    import safetensors.torch
    from botocore.config import Config

    from lazyserve.model import load_model
    from lazyserve.settings import load_settings
    from lazyserve.sources import s3_get_client

    build = functools.partial(build_synthetic, layers)
    # Clients are made before the clock starts, for every method alike.
    client = boto3.client("s3", config=Config(max_pool_connections=concurrency + 2))
    settings = load_settings(
        {
            "LAZYSERVE_MODEL_URI": f"s3://{BUCKET}/{key}",
            "LAZYSERVE_MODEL_SHA256": sha256,
            "LAZYSERVE_S3_CONCURRENCY": str(concurrency),
            "LAZYSERVE_S3_PART_SIZE": str(part_size),
        }
    )
    s3_get_client().credentials.get()  # lazyserve's S3 client, and its credentials
    extra: dict[str, Any] = {}

    def naive() -> Any:
        with tempfile.TemporaryDirectory(dir="/tmp", prefix="bench-naive-") as tmp:
            path = os.path.join(tmp, "weights.safetensors")
            client.download_file(BUCKET, key, path)
            # The tensors map the file; unlinking it (leaving the block) keeps the mapping valid.
            return build_on_meta(build, safetensors.torch.load_file(path))

    def one_get() -> Any:
        data = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return build_on_meta(build, safetensors.torch.load(data))

    def lazy() -> Any:
        loaded = load_model(build, settings)
        extra["fetch_seconds"] = loaded.info.fetch_seconds
        extra["build_seconds"] = loaded.info.build_seconds
        return loaded.module

    runs: dict[str, Callable[[], Any]] = {
        "naive": naive,
        "one_get": one_get,
        "lazyserve": lazy,
        "link8": lambda: _link(endpoint, BUCKET, key, size, concurrency, part_size),
        "link1": lambda: _link(endpoint, BUCKET, key, size, 1, size),
    }
    return {"method": method, "size": size, **measured(runs[method], checks, label=method), **extra}


def measured(
    run: Callable[[], Any], checks: dict[str, float], *, label: str, touch_all: bool = False
) -> dict[str, Any]:
    """Time `run()` (which returns a model, or None for a link measurement), with its peak RSS
    growth and CPU; then check the model's tensors against the file's sums. `touch_all` adds
    `rss_touched`: RSS growth once every parameter has been read (a memory-mapped file's pages
    become resident only then, e.g. at the first inference)."""
    import torch

    gc.collect()
    baseline = _status("VmRSS")
    peak_reset = _reset_peak()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    model = run()
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    after = resource.getrusage(resource.RUSAGE_SELF)
    verified: bool | None = None
    if model is not None:
        params = dict(model.named_parameters())
        if any(p.is_meta or p.dtype != torch.float32 for p in params.values()):
            raise RuntimeError(f"{label}: the model has meta or non-float32 parameters")
        for name, expected in checks.items():
            got = _checksum(params[name].detach())
            if abs(got - expected) > 1e-6 * max(1.0, abs(expected)):
                raise RuntimeError(f"{label}: {name} sums to {got}, the file's to {expected}")
        verified = True
    extra: dict[str, Any] = {}
    if touch_all:
        for param in params.values() if model is not None else ():
            param.detach().sum()
        extra["rss_touched"] = _status("VmRSS") - baseline
    return {
        "seconds": seconds,
        "peak_growth": peak - baseline,
        "peak_reset": peak_reset,
        "cpu_user": after.ru_utime - usage.ru_utime,
        "cpu_sys": after.ru_stime - usage.ru_stime,
        "minor_faults": after.ru_minflt - usage.ru_minflt,
        "verified": verified,
        **extra,
    }


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Sample:
    method: str
    size: int
    repeat: int
    seconds: float
    peak_growth: int
    peak_reset: bool
    cpu_user: float
    cpu_sys: float
    minor_faults: int
    server_cpu: float  # CPU seconds the endpoint (this process) spent meanwhile
    verified: bool | None
    fetch_seconds: float | None = None
    build_seconds: float | None = None


@dataclass
class Summary:
    """Medians per method for one size."""

    size: int
    seconds: dict[str, float]
    peak_growth: dict[str, int]
    cpu: dict[str, float]
    server_cpu: dict[str, float]
    fetch_seconds: float | None
    build_seconds: float | None

    def mbps(self, method: str) -> float:
        return self.size / 1e6 / self.seconds[method]

    @property
    def link_fraction(self) -> float:
        return self.mbps("lazyserve") / self.mbps("link8")

    @property
    def speedup_vs_naive(self) -> float:
        return self.seconds["naive"] / self.seconds["lazyserve"]

    def rss_ratio(self, method: str) -> float:
        return self.peak_growth[method] / self.size


@dataclass
class ColdStartResults:
    bandwidth: float
    latency: float
    concurrency: int
    part_size: int
    repeats: int
    samples: list[Sample] = field(default_factory=list)

    def summaries(self) -> list[Summary]:
        out = []
        for size in sorted({s.size for s in self.samples}):
            rows = [s for s in self.samples if s.size == size]

            def med(
                method: str, get: Callable[[Sample], float], rows: list[Sample] = rows
            ) -> float:
                return statistics.median(get(s) for s in rows if s.method == method)

            methods = [m for m in METHODS if any(s.method == m for s in rows)]
            lazy = [s for s in rows if s.method == "lazyserve"]
            out.append(
                Summary(
                    size=size,
                    seconds={m: med(m, lambda s: s.seconds) for m in methods},
                    peak_growth={m: int(med(m, lambda s: s.peak_growth)) for m in methods},
                    cpu={m: med(m, lambda s: s.cpu_user + s.cpu_sys) for m in methods},
                    server_cpu={m: med(m, lambda s: s.server_cpu) for m in methods},
                    fetch_seconds=statistics.median(s.fetch_seconds or 0 for s in lazy)
                    if lazy
                    else None,
                    build_seconds=statistics.median(s.build_seconds or 0 for s in lazy)
                    if lazy
                    else None,
                )
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ColdStartResults:
        samples = [Sample(**s) for s in data.pop("samples")]
        return cls(**data, samples=samples)


def worker_env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAZYSERVE_"))}
    env.update(FAKE_AWS, AWS_ENDPOINT_URL_S3=endpoint)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _spawn(args: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.cold_start", "--worker", json.dumps(args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{args['method']} worker failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    repeats: int = 3,
    methods: Sequence[str] = METHODS,
    bandwidth: float = DEFAULT_BANDWIDTH,
    latency: float = DEFAULT_LATENCY,
    concurrency: int = CONCURRENCY,
    part_size: int = PART_SIZE,
    log: Callable[[str], None] = print,
) -> ColdStartResults:
    """Measure every method for every size, `repeats` times, rotating the methods' order."""
    results = ColdStartResults(bandwidth, latency, concurrency, part_size, repeats)
    files = {size: weights_file(size) for size in sizes}
    with S3Endpoint(bandwidth=bandwidth, latency=latency) as s3:
        env = worker_env(s3.endpoint)
        for size, wf in files.items():
            key = wf.path.name
            s3.add(BUCKET, key, wf.path)
            for repeat in range(repeats):
                shift = repeat % len(methods)
                for method in [*methods[shift:], *methods[:shift]]:
                    args = {
                        "method": method,
                        "endpoint": s3.endpoint,
                        "key": key,
                        "size": wf.size,
                        "layers": wf.layers,
                        "sha256": wf.sha256,
                        "checks": wf.checks,
                        "concurrency": concurrency,
                        "part_size": part_size,
                    }
                    cpu = time.process_time()
                    out = _spawn(args, env)
                    out["server_cpu"] = time.process_time() - cpu
                    out["repeat"] = repeat
                    results.samples.append(Sample(**out))
                    log(
                        f"  {size:>5} MiB  {method:<9} {out['seconds']:7.3f} s  "
                        f"{wf.size / 1e6 / out['seconds']:7.1f} MB/s  "
                        f"peak +{out['peak_growth'] / wf.size:5.2f}x  (repeat {repeat + 1})"
                    )
    return results


def table(results: ColdStartResults) -> str:
    """A markdown table of the medians."""
    lines = [
        "| size | method | seconds to ready model | MB/s | fraction of link limit (8 conn) "
        "| peak RSS growth ÷ size | client CPU s | endpoint CPU s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {
        "naive": "naive (download_file → load_file)",
        "one_get": "one GET → safetensors.load",
        "lazyserve": "**lazyserve**",
        "link8": "link limit, 8 connections",
        "link1": "link, 1 connection",
    }
    for summary in results.summaries():
        for method, seconds in summary.seconds.items():
            fraction = "n/a"
            if "link8" in summary.seconds:
                fraction = f"{summary.mbps(method) / summary.mbps('link8'):.2f}"
            is_link = method.startswith("link")
            rss = "n/a" if is_link else f"{summary.rss_ratio(method):.2f}"
            lines.append(
                f"| {summary.size / 2**20:.0f} MiB | {names[method]} | {seconds:.3f} "
                f"| {summary.mbps(method):.0f} | {fraction} | {rss} "
                f"| {summary.cpu[method]:.2f} | {summary.server_cpu[method]:.2f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cold_start")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH / 1e6, help="MB/s")
    parser.add_argument("--latency", type=float, default=DEFAULT_LATENCY * 1e3, help="ms")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return 0
    results = run(
        args.sizes,
        repeats=args.repeats,
        methods=args.methods,
        bandwidth=args.bandwidth * 1e6,
        latency=args.latency / 1e3,
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
