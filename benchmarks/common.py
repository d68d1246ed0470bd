"""What the fetch benchmarks share: the synthetic weights files, the model that fits them, the
link-limit reader, one timed load with its peak RSS, and the environment of a worker process."""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import resource
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
BUCKET = "bench"
WIDTH = 4096  # nn.Linear(4096, 4096, bias=False) in float32: exactly 64 MiB per layer
LAYER_MIB = WIDTH * WIDTH * 4 // 2**20
DEFAULT_SIZES = (64, 512, 1024)
PART_SIZE = 8 * 1024 * 1024
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIABENCHBENCHBENCH0",
    "AWS_SECRET_ACCESS_KEY": "bench/fake/secret/key/not/a/real/one/000",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def build_synthetic(layers: int, width: int = WIDTH) -> nn.Sequential:
    """The benchmark model: `layers` x nn.Linear(width, width, bias=False)."""
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


def pushed(path: Path) -> dict[str, str]:
    """The metadata `lazyserve push` stores with the file (its sha256 and CRCs): the
    stand-in serves the benchmarks' objects as a user's pushed ones look."""
    stat = path.stat()
    return dict(_pushed(path.resolve(), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _pushed(path: Path, size: int, mtime_ns: int) -> tuple[tuple[str, str], ...]:
    from lazyserve.publish import file_digests

    return tuple(sorted(file_digests(path).items()))


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
    checks = {name: checksum(state[name]) for name in _checked(layers)}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"generator": "benchmarks.common"})
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


def checksum(tensor: Any) -> float:
    return float(tensor.double().sum().item())


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


# --- one measurement, in a fresh subprocess ---------------------------------------------------


def proc_status(field_name: str) -> int:
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
    return proc_status("VmHWM") <= proc_status("VmRSS") + 1024 * 1024


def read_link(endpoint: str, bucket: str, key: str, size: int, connections: int, part: int) -> None:
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


def warm_torch() -> None:
    """Run once, on a tiny model, the torch code every recipe runs (frombuffer and views, a
    module built on the meta device, load_state_dict(assign=True), a forward): the first use of
    that code pages about 10 MiB of torch's libraries into RSS, which is not what the weights
    cost (it made lazyserve's peak growth 1.16x instead of 1.02x at 64 MiB)."""
    import torch

    data = torch.frombuffer(bytearray(8 * 8 * 4), dtype=torch.uint8)
    module = build_on_meta(
        lambda: build_synthetic(1, 8), {"0.weight": data.view(torch.float32).view(8, 8)}
    )
    module(torch.ones(1, 8))


def measured(
    run: Callable[[], Any], checks: dict[str, float], *, label: str, touch_all: bool = False
) -> dict[str, Any]:
    """Time `run()` (which returns a model, or None for a link measurement), with its peak RSS
    growth and CPU; then check the model's tensors against the file's sums. `touch_all` adds
    `rss_touched`: RSS growth once every parameter has been read (a memory-mapped file's pages
    become resident only then, e.g. at the first inference)."""
    import torch

    warm_torch()
    gc.collect()
    baseline = proc_status("VmRSS")
    peak_reset = _reset_peak()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    model = run()
    seconds = time.perf_counter() - started
    peak = proc_status("VmHWM")
    after = resource.getrusage(resource.RUSAGE_SELF)
    verified: bool | None = None
    if model is not None:
        params = dict(model.named_parameters())
        if any(p.is_meta or p.dtype != torch.float32 for p in params.values()):
            raise RuntimeError(f"{label}: the model has meta or non-float32 parameters")
        for name, expected in checks.items():
            got = checksum(params[name].detach())
            if abs(got - expected) > 1e-6 * max(1.0, abs(expected)):
                raise RuntimeError(f"{label}: {name} sums to {got}, the file's to {expected}")
        verified = True
    extra: dict[str, Any] = {}
    if touch_all:
        for param in params.values() if model is not None else ():
            param.detach().sum()
        extra["rss_touched"] = proc_status("VmRSS") - baseline
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


def worker_env(endpoint: str) -> dict[str, str]:
    """This process's environment without AWS_* and LAZYSERVE_*, plus fake credentials, the
    endpoint as AWS_ENDPOINT_URL_S3 and the project on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAZYSERVE_"))}
    env.update(FAKE_AWS, AWS_ENDPOINT_URL_S3=endpoint)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a uvicorn child (`--port`). uvicorn --fd would avoid
    the race, but it wraps the socket as AF_UNIX, so asyncio would not set TCP_NODELAY on the
    accepted connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
