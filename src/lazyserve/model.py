"""A served model: settings -> source (bytes) -> format (tensors) -> the user's nn.Module, or a
transformers model with its tokenizer and config."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

from lazyserve.build import build_module
from lazyserve.checkpoint import merge_shards
from lazyserve.errors import ModelUnavailable
from lazyserve.formats import format_of, read_state_dict
from lazyserve.settings import Settings
from lazyserve.sources import RangeClient, load_weights, take_directory
from lazyserve.sources.directory import Directory, fetch_directory
from lazyserve.uris import ModelURI

__all__ = ["AfterLoad", "Loaded", "ModelInfo", "load_model", "load_pretrained", "torch_dtype"]

M = TypeVar("M", bound=torch.nn.Module)
log = logging.getLogger("lazyserve")
# A hook run once on the built module (torch.compile, quantisation): None keeps the module.
AfterLoad = Callable[[torch.nn.Module], "torch.nn.Module | None"]


class ModelInfo(BaseModel):
    """What was loaded, from where, and how long it took (`GET /model` shows every field)."""

    model_config = ConfigDict(frozen=True)

    uri: str
    sha256: str
    size_bytes: int
    format: str
    version_id: str | None
    etag: str | None
    fetch_seconds: float
    build_seconds: float
    after_load_seconds: float = 0.0
    total_seconds: float
    loaded_at: str
    connections: int
    files: dict[str, str] | None = None  # a model directory: each weights file's sha256
    # What proved the bytes are the ones stored: "sha256" (computed at load), or "crc64nvme"
    # (the CRC push stored beside the sha256; `sha256` is then the stored one).
    verified_by: str = "sha256"


@dataclass(frozen=True)
class Loaded(Generic[M]):
    """The ready module (in eval mode) and its metadata; for a transformers model also its
    tokenizer (None when the directory holds none) and its config."""

    module: M
    info: ModelInfo
    tokenizer: Any = None
    config: Any = None


def torch_dtype(name: str | None) -> torch.dtype | None:
    """LAZYSERVE_DTYPE as a torch dtype (None: as stored)."""
    return None if name is None else getattr(torch, name)


def load_model(
    build: Callable[[], M],
    settings: Settings,
    *,
    uri: ModelURI | None = None,
    reserve: Callable[[int], None] | None = None,
    client: RangeClient | None = None,
    after_load: AfterLoad | None = None,
) -> Loaded[M]:
    """Fetch, check and build the model once; raises a ModelLoadError subclass on failure.
    `uri` names one model of a prefix (default: the settings' URI); `reserve(size)` runs once
    the weights' size is known, before they are read (see sources.fetch_weights); `client`
    makes the S3 GETs (default: the process's own); `after_load(module)` runs once, last."""
    weights = load_weights(settings, uri=uri, reserve=reserve, client=client)
    fetched = time.perf_counter()
    try:
        module = build_module(
            build, read_state_dict(weights), weights.uri, dtype=torch_dtype(settings.dtype)
        )
    except ModelUnavailable as exc:
        exc.identity = weights.identity  # these bytes cannot serve until the object changes
        raise
    built = time.perf_counter()
    module = _after(module, after_load)
    done = time.perf_counter()
    info = ModelInfo(
        uri=weights.uri,
        sha256=weights.sha256,
        size_bytes=weights.size,
        format=format_of(weights),
        version_id=weights.version_id,
        etag=weights.etag,
        fetch_seconds=round(weights.fetch_seconds, 6),
        build_seconds=round(built - fetched, 6),
        after_load_seconds=round(done - built, 6),
        total_seconds=round(done - weights.started, 6),
        loaded_at=_now(),
        connections=weights.connections,
        verified_by=weights.verified_by,
    )
    _log_loaded(info)
    return Loaded(module, info)


def load_pretrained(
    model_class: Any,
    settings: Settings,
    *,
    uri: ModelURI | None = None,
    reserve: Callable[[int], None] | None = None,
    client: RangeClient | None = None,
    after_load: AfterLoad | None = None,
    directory: Directory | None = None,
) -> Loaded[Any]:
    """A transformers model from a `save_pretrained` directory (`uri`, default the settings'),
    built as `model_class.from_pretrained(directory)` would build it, with its tokenizer.
    `directory`: its files, fetched already (the start-up download's)."""
    from lazyserve.pretrained import build_pretrained

    uri = settings.uri if uri is None else uri
    if directory is None and uri.uri == settings.model_uri:
        directory = take_directory(settings)  # the start-up download's, if it made one
    if directory is None:
        directory = fetch_directory(settings, uri, reserve=reserve, client=client)
    elif reserve is not None:
        reserve(directory.size)
    try:
        pt = any(not name.endswith(".safetensors") for name in directory.weights)
        shards = {
            name: read_state_dict(directory.files[name], "pt" if pt else "safetensors")
            for name in directory.weights
        }
        state = merge_shards(shards, uri.uri, directory.index)
        del shards
        # transformers reads the config, generation config and tokenizer from a directory.
        with tempfile.TemporaryDirectory(prefix="lazyserve-") as folder:
            for name, data in directory.small_files().items():
                path = Path(folder, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            built = build_pretrained(
                model_class,
                folder,
                state,
                uri.uri,
                dtype=torch_dtype(settings.dtype),
                after_load=after_load,
            )
        del state
    except ModelUnavailable as exc:
        exc.identity = directory.identity
        raise
    built.config.name_or_path = uri.uri
    done = time.perf_counter()
    sha256s = {name: directory.files[name].sha256 for name in directory.weights}
    info = ModelInfo(
        uri=uri.uri,
        sha256=directory.sha256,
        size_bytes=directory.size,
        format="pt" if pt else "safetensors",
        version_id=None,
        etag=directory.identity,
        fetch_seconds=round(directory.fetch_seconds, 6),
        build_seconds=round(built.build_seconds + built.tokenizer_seconds, 6),
        after_load_seconds=round(built.after_load_seconds, 6),
        total_seconds=round(done - directory.started, 6),
        loaded_at=_now(),
        connections=directory.connections,
        files=sha256s,
        verified_by="+".join(sorted({directory.files[n].verified_by for n in directory.weights}))
        or "sha256",
    )
    _log_loaded(info)
    return Loaded(built.module, info, tokenizer=built.tokenizer, config=built.config)


def _after(module: M, after_load: AfterLoad | None) -> M:
    if after_load is None:
        return module
    replaced = after_load(module)
    return module if replaced is None else replaced  # type: ignore[return-value]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _log_loaded(info: ModelInfo) -> None:
    mbps = info.size_bytes / 1e6 / max(info.fetch_seconds, 1e-9)
    log.info(
        "model loaded from %s: %d bytes in %.3fs (%.1f MB/s)",
        info.uri,
        info.size_bytes,
        info.total_seconds,
        mbps,
        extra={
            "model_sha256": info.sha256,
            "fetch_seconds": info.fetch_seconds,
            "build_seconds": info.build_seconds,
            "after_load_seconds": info.after_load_seconds,
            "total_seconds": info.total_seconds,
            "bytes": info.size_bytes,
            "mb_per_s": round(mbps, 1),
            "concurrency": info.connections,
            "format": info.format,
            "verified_by": info.verified_by,
        },
    )
