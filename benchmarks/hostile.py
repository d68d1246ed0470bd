"""Hostile weights files: what reading each one costs (peak RSS, time) and how it ends.

Each hostile file is small on disk and built to take far more memory than its size, or to
break a reader: a safetensors header full of empty JSON objects, a million one-byte tensors,
a header nested 100 million deep, a `.pt` zip archive with one record that deflates to 1 GiB.
Two well-formed files of 256 MiB (safetensors and `.pt`) show what a normal read costs. Each
read runs in a fresh process with `AWS_LAMBDA_FUNCTION_MEMORY_SIZE` set (a 1 GiB function by
default), from a local file (`fetch_local`) and, for `.pt`, also from memory as an S3 download
leaves it; every tensor read is then summed (serving touches them all), and the process
reports VmHWM (peak RSS) after importing torch and at the end.

`python -m benchmarks.hostile [--memory-mb 1024] [--only NAME ...] [--keep DIR]`
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def _safetensors(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def metadata_objects(path: Path) -> None:
    """90 MB: `__metadata__` holding 30 million empty objects (the reference wants strings)."""
    count = 30_000_000
    header = b'{"__metadata__":{"a":[' + b"{}," * (count - 1) + b"{}]}}"
    path.write_bytes(_safetensors(header))


def metadata_lists(path: Path) -> None:
    """90 MB: the same with empty lists, which no JSON hook sees."""
    count = 30_000_000
    header = b'{"__metadata__":{"a":[' + b"[]," * (count - 1) + b"[]]}}"
    path.write_bytes(_safetensors(header))


def many_tensors(path: Path) -> None:
    """About 58 MB: one million one-byte tensors, each a valid header entry."""
    count = 1_000_000
    entries = b",".join(
        b'"t%d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1)
        for i in range(count)
    )
    path.write_bytes(_safetensors(b"{" + entries + b"}", b"\x01" * count))


def deep_header(path: Path) -> None:
    """100 MB of `[`: a header nested far deeper than any JSON parser's recursion."""
    n = 100_000_000
    path.write_bytes(_safetensors(b'{"t":{"x":' + b"[" * (n - 12)))


def pt_zip_bomb(path: Path) -> None:
    """About 1 MB: a torch.save archive whose one tensor record deflates to 1 GiB of zeros."""
    import torch

    # skip_data writes the archive torch would write for a 1 GiB tensor, without its bytes (a
    # sparse file); every record but the tensor's is copied, the tensor's is deflated.
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.pt"
        with torch.serialization.skip_data():
            torch.save({"w": torch.empty(GIB // 4)}, plain)
        with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as out:
            for info in src.infolist():
                if info.filename.endswith("/data/0"):
                    deflated = zipfile.ZipInfo(info.filename)
                    deflated.compress_type = zipfile.ZIP_DEFLATED
                    with out.open(deflated, "w", force_zip64=True) as record:
                        chunk = bytes(16 * 1024 * 1024)
                        for _ in range(GIB // len(chunk)):
                            record.write(chunk)
                else:
                    out.writestr(info, src.read(info.filename))


def _layers() -> dict[str, object]:
    import torch

    return {f"layer{i}.weight": torch.full((2048, 2048), float(i)) for i in range(16)}


def plain_safetensors(path: Path) -> None:
    """256 MiB: 16 float32 tensors of 16 MiB, as safetensors writes them."""
    from safetensors.torch import save_file

    save_file(_layers(), str(path))  # type: ignore[arg-type]


def plain_pt(path: Path) -> None:
    """256 MiB: the same tensors, as torch.save writes them."""
    import torch

    torch.save(_layers(), path)


FILES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "metadata-objects": ("safetensors", metadata_objects),
    "metadata-lists": ("safetensors", metadata_lists),
    "many-tensors": ("safetensors", many_tensors),
    "deep-header": ("safetensors", deep_header),
    "pt-zip-bomb": ("pt", pt_zip_bomb),
    "plain-safetensors": ("safetensors", plain_safetensors),
    "plain-pt": ("pt", plain_pt),
}

# Runs in the measured process: the file into memory as a load would have it, then the read.
_READ = r"""
import json, mmap, sys, time
from pathlib import Path

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

import torch
from lazyserve.errors import LazyserveError
from lazyserve.formats import read_state_dict
from lazyserve.sources import Weights, fetch_local
from lazyserve.uris import parse_model_uri

path, how = Path(sys.argv[1]), sys.argv[2]
before = hwm()
started = time.perf_counter()
try:
    if how == "file":
        weights = fetch_local(parse_model_uri(str(path)))
    else:  # as an S3 download leaves it: the bytes in private memory, no path
        size = path.stat().st_size
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        with open(path, "rb") as file:
            file.readinto(buffer)
        weights = Weights("s3://bucket/" + path.name, size, "", buffer=buffer)
    state = read_state_dict(weights)
    for tensor in state.values():
        tensor.sum()
    outcome = f"read {len(state)} tensors"
except LazyserveError as exc:
    outcome = f"{type(exc).__name__}: {str(exc)[:300]}"
except BaseException as exc:
    outcome = f"UNEXPECTED {type(exc).__name__}: {str(exc)[:300]}"
seconds = time.perf_counter() - started
print(json.dumps({"outcome": outcome, "seconds": round(seconds, 2),
                  "hwm_after_import_mb": round(before / 1024),
                  "hwm_mb": round(hwm() / 1024)}))
"""


def measure(path: Path, how: str, memory_mb: int) -> dict[str, object]:
    env = {**os.environ, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb)}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    done = subprocess.run(
        [sys.executable, "-c", _READ, str(path), how],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        return {"outcome": f"process exited {done.returncode}: {done.stderr[-300:]}"}
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-mb", type=int, default=1024)
    parser.add_argument("--only", nargs="*", choices=sorted(FILES), default=sorted(FILES))
    parser.add_argument("--keep", type=Path, help="build the files here and keep them")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        where = args.keep or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        for name in args.only:
            fmt, build = FILES[name]
            path = where / f"{name}.{fmt}"
            if not path.exists():
                build(path)
            for how in ("file", "buffer") if fmt == "pt" else ("file",):
                result = measure(path, how, args.memory_mb)
                size_mb = path.stat().st_size / 1e6
                print(
                    json.dumps({"file": name, "size_mb": round(size_mb, 1), "from": how, **result})
                )
                sys.stdout.flush()


if __name__ == "__main__":
    main()
