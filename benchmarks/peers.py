"""Fetch alone: lazyserve against the libraries that load safetensors weights from S3, each set up
as its own documentation recommends, next to the link limit measured in the same run.

Loaders (name[:connections]; each run in a fresh subprocess, the endpoint in this process):
  lazyserve         lazyserve's load_model: parallel ranged GETs into one buffer (16 by default),
                    the object as `lazyserve push` stores it (checked by its stored CRC64NVME)
  lazyserve_sha256  the same with LAZYSERVE_MODEL_SHA256 pinned (checked by a sha256)
  boto3             download_file to /tmp (s3transfer: 10 threads, 8 MB parts; `boto3:8` = 8),
                    safetensors.torch.load_file (a memory map), the model on the meta device,
                    load_state_dict(assign=True)
  boto3_crt         the same through s3transfer's CRT transfer manager (awscrt's S3 client)
  runai             Run:ai Model Streamer's SafetensorsStreamer from s3:// (8 by default)
  s3torchconnector  S3Checkpoint.reader (sequential reader) -> safetensors.torch.load
  one_get           one get_object() read whole -> safetensors.torch.load (one connection;
                    not in the default set: the single-connection recipe, for reference)
  link              the link limit: 8 MiB ranged GETs on N connections (8), bytes discarded

`python -m benchmarks.peers --sizes 64 512 1024 --repeats 3`
`python -m benchmarks.peers --sizes 512 --methods lazyserve:4 lazyserve:16 link:4 link:8 link:16`
`python -m benchmarks.peers --timeline 64` (where lazyserve's time goes, one instrumented load)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import (
    BUCKET,
    DATA,
    DEFAULT_SIZES,
    PART_SIZE,
    ROOT,
    WIDTH,
    build_on_meta,
    build_synthetic,
    measured,
    pushed,
    read_link,
    weights_file,
    worker_env,
)
from benchmarks.s3endpoint import DEFAULT_BANDWIDTH, DEFAULT_LATENCY, S3Endpoint

if TYPE_CHECKING:
    from torch import nn

LOADERS = (
    "lazyserve",
    "lazyserve_sha256",
    "boto3",
    "boto3_crt",
    "runai",
    "s3torchconnector",
    "one_get",
    "link",
)
DEFAULT_METHODS = (
    "lazyserve",
    "lazyserve:8",
    "lazyserve_sha256",
    "boto3",
    "boto3:8",
    "boto3:16",
    "boto3_crt",
    "boto3_crt:16",
    "runai",
    "runai:16",
    "s3torchconnector",
    "link:8",
    "link:16",
)
LINK = "link:8"  # the reference every fraction is taken against
LAZYSERVE_DEFAULT = 16  # LAZYSERVE_S3_CONCURRENCY's default
REGION = "us-east-1"
PACKAGES = (
    "lazyserve",
    "torch",
    "safetensors",
    "boto3",
    "botocore",
    "s3transfer",
    "awscrt",
    "runai-model-streamer",
    "runai-model-streamer-s3",
    "s3torchconnector",
    "s3torchconnectorclient",
)


def parse_method(spec: str) -> tuple[str, int | None]:
    """`name` or `name:N` (N connections) -> (name, N or None for the loader's default)."""
    name, _, count = spec.partition(":")
    if name not in LOADERS:
        raise ValueError(f"unknown loader {name!r} in {spec!r}; loaders: {', '.join(LOADERS)}")
    if not count:
        return name, None
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"{spec!r}: the connection count after ':' must be a positive integer")
    return name, int(count)


@dataclass(frozen=True)
class Target:
    """What a worker loads: the object on the endpoint and the model that fits it."""

    endpoint: str
    key: str
    size: int
    layers: int
    width: int
    sha256: str

    @property
    def uri(self) -> str:
        return f"s3://{BUCKET}/{self.key}"

    def build(self) -> nn.Module:
        return build_synthetic(self.layers, self.width)


# --- the loaders: each makes its clients before the clock and returns the timed load ----------


def lazyserve_loader(
    target: Target, connections: int | None, *, pinned: bool = False
) -> Callable[[], nn.Module]:
    """The one place that calls lazyserve: load_model, as a function would. The object carries
    what `lazyserve push` stores (its sha256 and CRC64NVME, checked by the CRC); `pinned` also
    pins the sha256 in LAZYSERVE_MODEL_SHA256, which a load checks as a sha256."""
    from lazyserve.model import load_model
    from lazyserve.settings import load_settings
    from lazyserve.sources import s3_get_client

    env = {"LAZYSERVE_MODEL_URI": target.uri}
    if pinned:
        env["LAZYSERVE_MODEL_SHA256"] = target.sha256
    if connections is not None:
        env["LAZYSERVE_S3_CONCURRENCY"] = str(connections)
    settings = load_settings(env)
    # The client lazyserve will use, its credentials and endpoint (botocore's imports).
    s3_get_client().prepare(settings.uri.bucket or "")
    return lambda: load_model(target.build, settings).module


def _download_then_build(target: Target, download: Callable[[str], None]) -> nn.Module:
    import safetensors.torch

    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        path = os.path.join(tmp, "weights.safetensors")
        download(path)
        # load_file maps the file: the tensors stay valid after the file is unlinked.
        return build_on_meta(target.build, safetensors.torch.load_file(path))


def boto3_loader(target: Target, connections: int | None) -> Callable[[], nn.Module]:
    """download_file with s3transfer's TransferConfig (defaults, or max_concurrency=N)."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    config = (
        TransferConfig() if connections is None else TransferConfig(max_concurrency=connections)
    )
    # botocore's pool (10 by default) must not be smaller than the transfer's threads.
    client = boto3.client("s3", config=Config(max_pool_connections=max(10, connections or 0)))
    return lambda: _download_then_build(
        target, lambda path: client.download_file(BUCKET, target.key, path, Config=config)
    )


def boto3_crt_loader(target: Target, connections: int | None) -> Callable[[], nn.Module]:
    """s3transfer's CRTTransferManager, as boto3 builds it for preferred_transfer_client="crt",
    except use_ssl=False: boto3 hard-codes TLS for its CRT client (boto3/crt.py), which cannot
    speak to a plain-HTTP endpoint."""
    import botocore.session
    from boto3.s3.transfer import TransferConfig
    from s3transfer.crt import (
        BotocoreCRTCredentialsWrapper,
        BotocoreCRTRequestSerializer,
        CRTTransferManager,
        create_s3_crt_client,
    )

    session = botocore.session.Session()
    credentials = BotocoreCRTCredentialsWrapper(session.get_credentials())
    crt_client = create_s3_crt_client(
        REGION, crt_credentials_provider=credentials.to_crt_credentials_provider(), use_ssl=False
    )
    serializer = BotocoreCRTRequestSerializer(
        session, {"region_name": REGION, "endpoint_url": target.endpoint}
    )
    options: dict[str, Any] = {"preferred_transfer_client": "crt"}
    if connections is not None:
        options["max_concurrency"] = connections  # boto3 maps it to max_request_concurrency
    config = TransferConfig(**options)

    def download(path: str) -> None:
        with CRTTransferManager(crt_client, serializer, config=config) as manager:
            manager.download(BUCKET, target.key, path).result()

    return lambda: _download_then_build(target, download)


def runai_loader(target: Target, connections: int | None) -> Callable[[], nn.Module]:
    """SafetensorsStreamer.stream_file("s3://...") -> get_tensors(); the environment (set by
    `loader_env`) points it at the endpoint, path-style."""
    import runai_model_streamer_s3  # type: ignore[import-untyped]  # noqa: F401  (before the clock)
    from runai_model_streamer import SafetensorsStreamer  # type: ignore[import-untyped]

    def load() -> nn.Module:
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(target.uri)
            # Tensors are the caller's by default (owned=True): they outlive the streamer.
            state = dict(streamer.get_tensors())
        return build_on_meta(target.build, state)

    return load


def s3torchconnector_loader(target: Target, connections: int | None) -> Callable[[], nn.Module]:
    """S3Checkpoint(...).reader(uri) (the sequential reader) -> read() -> safetensors.load."""
    import safetensors.torch
    from s3torchconnector import S3Checkpoint, S3ClientConfig

    checkpoint = S3Checkpoint(
        REGION, endpoint=target.endpoint, s3client_config=S3ClientConfig(force_path_style=True)
    )

    def load() -> nn.Module:
        with checkpoint.reader(target.uri) as reader:
            data = reader.read()
        return build_on_meta(target.build, safetensors.torch.load(data))

    return load


def one_get_loader(target: Target, connections: int | None) -> Callable[[], nn.Module]:
    """The whole object in one GET into memory, then safetensors.torch.load(bytes)."""
    import boto3
    import safetensors.torch

    client = boto3.client("s3")

    def load() -> nn.Module:
        data = client.get_object(Bucket=BUCKET, Key=target.key)["Body"].read()
        return build_on_meta(target.build, safetensors.torch.load(data))

    return load


def link_loader(target: Target, connections: int | None) -> Callable[[], None]:
    count = connections or 8
    return lambda: read_link(target.endpoint, BUCKET, target.key, target.size, count, PART_SIZE)


MAKERS: dict[str, Callable[[Target, int | None], Callable[[], Any]]] = {
    "lazyserve": lazyserve_loader,
    "lazyserve_sha256": functools.partial(lazyserve_loader, pinned=True),
    "boto3": boto3_loader,
    "boto3_crt": boto3_crt_loader,
    "runai": runai_loader,
    "s3torchconnector": s3torchconnector_loader,
    "one_get": one_get_loader,
    "link": link_loader,
}


def loader_env(name: str, connections: int | None, endpoint: str) -> dict[str, str]:
    """Environment a loader's worker needs beyond the fake credentials and AWS_ENDPOINT_URL_S3."""
    if name != "runai":
        return {}
    # Run:ai's documented settings for an S3-compatible store (docs/src/usage.md, env-vars.md).
    env = {"AWS_ENDPOINT_URL": endpoint, "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}
    if connections is not None:
        env["RUNAI_STREAMER_CONCURRENCY"] = str(connections)
    return env


def measure(method: str, target: dict[str, Any], checks: dict[str, float]) -> dict[str, Any]:
    """One load by `method` in this (fresh) process."""
    name, connections = parse_method(method)
    run = MAKERS[name](Target(**target), connections)
    out = measured(run, checks, label=method, touch_all=True)
    return {"method": method, "size": target["size"], **out}


# --- the run ----------------------------------------------------------------------------------


@dataclass
class PeersSample:
    method: str
    size: int
    repeat: int
    seconds: float
    peak_growth: int
    peak_reset: bool
    cpu_user: float
    cpu_sys: float
    minor_faults: int
    verified: bool | None
    rss_touched: int  # RSS growth once every parameter was read (0 for the link)
    server_cpu: float  # CPU seconds the endpoint (this process) spent meanwhile
    connections: int  # most connections open at the endpoint at once
    gets: int  # GET requests the endpoint answered
    bytes_served: int


@dataclass
class PeersSummary:
    """Medians of one method at one size."""

    method: str
    size: int
    seconds: float
    peak_growth: int
    rss_touched: int
    cpu: float
    server_cpu: float
    connections: int
    gets: int
    bytes_served: int

    @property
    def mbps(self) -> float:
        return self.size / 1e6 / self.seconds

    @property
    def rss_ratio(self) -> float:
        return self.peak_growth / self.size


@dataclass
class PeersResults:
    bandwidth: float
    latency: float
    repeats: int
    versions: dict[str, str]
    load_average: list[str] = field(default_factory=list)  # at the start and at the end
    samples: list[PeersSample] = field(default_factory=list)

    def summaries(self) -> list[PeersSummary]:
        out = []
        methods = list(dict.fromkeys(s.method for s in self.samples))
        for size in sorted({s.size for s in self.samples}):
            for method in methods:
                rows = [s for s in self.samples if s.size == size and s.method == method]
                if not rows:
                    continue

                def med(
                    get: Callable[[PeersSample], float], rows: list[PeersSample] = rows
                ) -> float:
                    return statistics.median(get(s) for s in rows)

                out.append(
                    PeersSummary(
                        method=method,
                        size=size,
                        seconds=med(lambda s: s.seconds),
                        peak_growth=int(med(lambda s: s.peak_growth)),
                        rss_touched=int(med(lambda s: s.rss_touched)),
                        cpu=med(lambda s: s.cpu_user + s.cpu_sys),
                        server_cpu=med(lambda s: s.server_cpu),
                        connections=int(med(lambda s: s.connections)),
                        gets=int(med(lambda s: s.gets)),
                        bytes_served=int(med(lambda s: s.bytes_served)),
                    )
                )
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeersResults:
        data = dict(data)
        samples = [PeersSample(**s) for s in data.pop("samples")]
        return cls(**data, samples=samples)


def versions() -> dict[str, str]:
    """Installed versions of lazyserve and every peer (`missing` when not installed)."""
    out = {}
    for package in PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "missing"
    return out


class _ConnectionWatch:
    """The most connections the endpoint holds open at once while a worker runs."""

    def __init__(self, s3: S3Endpoint, interval: float = 0.002) -> None:
        self._s3 = s3
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._watch, name="bench-conn-watch", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            # S3Endpoint keeps its open connections in a set for close(); reading its size is
            # all this needs (a public counter on S3Endpoint would be the cleaner hook).
            self.peak = max(self.peak, len(self._s3._connections))

    def __enter__(self) -> _ConnectionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _spawn(args: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--worker", json.dumps(args)],
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


def measure_in_worker(
    s3: S3Endpoint, method: str, key: str, wf: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run `method` once in a fresh process against `s3`; (worker result, endpoint view)."""
    name, connections = parse_method(method)
    env = {**worker_env(s3.endpoint), **loader_env(name, connections, s3.endpoint)}
    target = Target(s3.endpoint, key, wf.size, wf.layers, wf.width, wf.sha256)
    s3.clear_log()
    cpu = time.process_time()
    with _ConnectionWatch(s3) as watch:
        out = _spawn({"method": method, "target": asdict(target), "checks": wf.checks}, env)
    gets = [r for r in s3.requests if r.method == "GET"]
    seen = {
        "server_cpu": time.process_time() - cpu,
        "connections": watch.peak,
        "gets": len(gets),
        "bytes_served": sum(r.bytes_sent for r in gets),
    }
    return out, seen


def run(
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 3,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    bandwidth: float = DEFAULT_BANDWIDTH,
    latency: float = DEFAULT_LATENCY,
    data_dir: Path = DATA,
    width: int = WIDTH,
    log: Callable[[str], None] = print,
) -> PeersResults:
    """Every method at every size, `repeats` times, the methods' order rotating each repeat."""
    for method in methods:
        parse_method(method)
    results = PeersResults(bandwidth, latency, repeats, versions(), [_load_average()])
    files = {size: weights_file(size, data_dir, width=width) for size in sizes}
    with S3Endpoint(bandwidth=bandwidth, latency=latency) as s3:
        for size, wf in files.items():
            key = wf.path.name
            s3.add(BUCKET, key, wf.path, metadata=pushed(wf.path))
            for repeat in range(repeats):
                shift = repeat % len(methods)
                for method in [*methods[shift:], *methods[:shift]]:
                    out, seen = measure_in_worker(s3, method, key, wf)
                    sample = PeersSample(repeat=repeat, **out, **seen)
                    results.samples.append(sample)
                    log(
                        f"  {size:>5} MiB  {method:<18} {sample.seconds:7.3f} s  "
                        f"{wf.size / 1e6 / sample.seconds:7.1f} MB/s  "
                        f"peak +{sample.peak_growth / wf.size:5.2f}x  "
                        f"{sample.connections:>2} conn  (repeat {repeat + 1})"
                    )
    results.load_average.append(_load_average())
    return results


def _load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def label(method: str) -> str:
    name, count = parse_method(method)
    labels = {
        "lazyserve": f"**lazyserve** ({count or LAZYSERVE_DEFAULT} conn)",
        "lazyserve_sha256": f"lazyserve, sha256 pinned ({count or LAZYSERVE_DEFAULT} conn)",
        "boto3": f"boto3 download_file → load_file ({count or 10} threads)",
        "boto3_crt": "boto3 CRT download → load_file"
        + (f" ({count} conn)" if count else " (CRT default)"),
        "runai": "Run:ai Model Streamer "
        + (f"(RUNAI_STREAMER_CONCURRENCY={count})" if count else "(default: 8)"),
        "s3torchconnector": "s3torchconnector S3Checkpoint reader → safetensors.load",
        "one_get": "one GET into memory → safetensors.load",
        "link": f"link limit, {count or 8} connections",
    }
    return labels[name]


def table(results: PeersResults) -> str:
    """A markdown table of the medians: loader x size."""
    lines = [
        "| size | loader | seconds to ready model | fraction of link8 | MB/s "
        "| peak RSS growth ÷ weights | RSS after reading every weight ÷ weights "
        "| client CPU s | client CPU s per GiB | connections seen | GETs |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    summaries = results.summaries()
    links = {s.size: s for s in summaries if s.method in (LINK, "link")}
    for s in summaries:
        link = links.get(s.size)
        fraction = f"{link.seconds / s.seconds:.2f}" if link else "n/a"
        link_row = s.method.startswith("link")
        rss = "n/a" if link_row else f"{s.rss_ratio:.2f}"
        touched = "n/a" if link_row else f"{s.rss_touched / s.size:.2f}"
        lines.append(
            f"| {s.size / 2**20:.0f} MiB | {label(s.method)} | {s.seconds:.3f} | {fraction} "
            f"| {s.mbps:.0f} | {rss} | {touched} | {s.cpu:.2f} | {s.cpu / (s.size / 2**30):.2f} "
            f"| {s.connections} | {s.gets} |"
        )
    return "\n".join(lines)


# --- where lazyserve's time goes (one instrumented load) --------------------------------------


def timeline(
    size_mib: int = 64, repeats: int = 3, *, log: Callable[[str], None] = print
) -> dict[str, float]:
    """Load with lazyserve in `repeats` fresh processes, stamping its steps (see
    `_timeline_worker`); the median of each stamp."""
    wf = weights_file(size_mib)
    runs: list[dict[str, float]] = []
    with S3Endpoint() as s3:
        key = wf.path.name
        s3.add(BUCKET, key, wf.path, metadata=pushed(wf.path))
        target = Target(s3.endpoint, key, wf.size, wf.layers, wf.width, wf.sha256)
        for _ in range(repeats):
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.peers", "--timeline-worker"],
                input=json.dumps(asdict(target)),
                cwd=ROOT,
                env=worker_env(s3.endpoint),
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"timeline worker failed:\n{proc.stderr[-4000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    stamps = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    log(f"lazyserve at {size_mib} MiB, median of {repeats} (ms; load average {_load_average()})")
    for name, value in stamps.items():
        each = " ".join(f"{r[name] * 1e3:6.1f}" for r in runs)
        log(f"  {name:<48} {value * 1e3:8.1f}   ({each})")
    return stamps


def _timeline_worker(target: Target) -> dict[str, float]:
    """Stamps one lazyserve load by wrapping pieces of lazyserve.sources (internal: this
    follows the fetcher's current shape and must follow it when it changes)."""
    import hashlib
    import mmap

    clock = time.perf_counter
    t0 = clock()
    import lazyserve.sources.s3 as s3_module

    t_import = clock() - t0
    import torch  # noqa: F401

    from lazyserve.model import load_model
    from lazyserve.settings import load_settings
    from lazyserve.sources import s3_get_client

    settings = load_settings(
        {"LAZYSERVE_MODEL_URI": target.uri, "LAZYSERVE_MODEL_SHA256": target.sha256}
    )
    t1 = clock()
    client = s3_get_client()
    client.prepare(BUCKET)
    client.signer.credentials()
    t_client = clock() - t1

    gets: list[tuple[float, float, float]] = []  # (request sent, headers in, last byte in)
    hashing: list[tuple[float, float]] = []  # each sha256 update
    real_get = client.get_range

    def get_range(*args: Any, into: Callable[[Any], Any], **kwargs: Any) -> Any:
        sent, headers = clock(), [0.0]

        def stamped(head: Any) -> Any:
            headers[0] = clock()
            return into(head)

        head = real_get(*args, into=stamped, **kwargs)
        gets.append((sent, headers[0], clock()))
        return head

    class Digest:
        def __init__(self) -> None:
            self._inner = hashlib.sha256()

        def update(self, data: Any) -> None:
            started = clock()
            self._inner.update(data)
            hashing.append((started, clock()))

        def hexdigest(self) -> str:
            return self._inner.hexdigest()

    client.get_range = get_range  # type: ignore[method-assign]
    vars(s3_module)["hashlib"] = type("hashlib", (), {"sha256": Digest})
    start = clock()
    loaded = load_model(target.build, settings)
    done = clock()
    first_sent, first_headers, first_done = min(gets)
    rest = sorted(gets)[1:] or [(start, start, start)]
    last_byte = max(end for _, _, end in gets)
    # First touches of fresh anonymous memory, alone: the cost the receiving threads pay as
    # the ranges land in lazyserve's buffer (one write per 4 KiB page).
    buffer = mmap.mmap(-1, target.size, flags=mmap.MAP_PRIVATE)
    view = memoryview(buffer)
    touch = clock()
    for offset in range(0, target.size, mmap.PAGESIZE):
        view[offset] = 1
    t_touch = clock() - touch
    view.release()
    buffer.close()
    return {
        "import lazyserve's S3 fetcher (stdlib client)": t_import,
        "S3 client creation and credentials": t_client,
        "first GET: request to response headers": first_headers - first_sent,
        "first GET sent, after the clock started": first_sent - start,
        "first part's last byte in": first_done - start,
        "other GETs: first sent": rest[0][0] - start,
        "other GETs: first headers in": min(h for _, h, _ in rest) - start,
        "other GETs: last headers in": max(h for _, h, _ in rest) - start,
        "last byte in": last_byte - start,
        "sha256 done (fetch_seconds)": loaded.info.fetch_seconds,
        "sha256 tail after the last byte": hashing[-1][1] - last_byte,
        "sha256 total time in update()": sum(b - a for a, b in hashing),
        "build (meta + assign)": loaded.info.build_seconds,
        "model ready": done - start,
        "first-touch of the buffer's pages, alone": t_touch,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--timeline-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), help="name[:connections]"
    )
    parser.add_argument("--bandwidth", type=float, default=DEFAULT_BANDWIDTH / 1e6, help="MB/s")
    parser.add_argument("--latency", type=float, default=DEFAULT_LATENCY * 1e3, help="ms")
    parser.add_argument("--timeline", type=int, metavar="MIB", help="instrumented lazyserve loads")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure(spec["method"], spec["target"], spec["checks"])))
        return 0
    if args.timeline_worker:
        print(json.dumps(_timeline_worker(Target(**json.loads(sys.stdin.read())))))
        return 0
    if args.timeline:
        timeline(args.timeline, args.repeats)
        return 0
    results = run(
        args.sizes,
        args.repeats,
        methods=args.methods,
        bandwidth=args.bandwidth * 1e6,
        latency=args.latency / 1e3,
    )
    print(table(results))
    print(f"\nload average (1/5/15 min): {' → '.join(results.load_average)}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in results.versions.items()))
    if args.json:
        args.json.write_text(json.dumps(results.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
