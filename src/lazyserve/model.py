"""A served model: settings -> source (bytes) -> format (tensors) -> the user's nn.Module."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

from lazyserve.build import build_module
from lazyserve.errors import ModelUnavailable
from lazyserve.formats import format_of, read_state_dict
from lazyserve.settings import Settings
from lazyserve.sources import RangeClient, load_weights
from lazyserve.uris import ModelURI

__all__ = ["Loaded", "ModelInfo", "load_model"]

M = TypeVar("M", bound=torch.nn.Module)
log = logging.getLogger("lazyserve")


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
    total_seconds: float
    loaded_at: str
    connections: int


@dataclass(frozen=True)
class Loaded(Generic[M]):
    """The ready module (in eval mode) and its metadata."""

    module: M
    info: ModelInfo


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
) -> Loaded[M]:
    """Fetch, check and build the model once; raises a ModelLoadError subclass on failure.
    `uri` names one model of a prefix (default: the settings' URI); `reserve(size)` runs once
    the weights' size is known, before they are read (see sources.fetch_weights); `client`
    makes the S3 GETs (default: the process's own)."""
    weights = load_weights(settings, uri=uri, reserve=reserve, client=client)
    fetched = time.perf_counter()
    try:
        module = build_module(
            build, read_state_dict(weights), weights.uri, dtype=torch_dtype(settings.dtype)
        )
    except ModelUnavailable as exc:
        exc.identity = weights.identity  # these bytes cannot serve until the object changes
        raise
    done = time.perf_counter()
    info = ModelInfo(
        uri=weights.uri,
        sha256=weights.sha256,
        size_bytes=weights.size,
        format=format_of(weights),
        version_id=weights.version_id,
        etag=weights.etag,
        fetch_seconds=round(weights.fetch_seconds, 6),
        build_seconds=round(done - fetched, 6),
        total_seconds=round(done - weights.started, 6),
        loaded_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        connections=weights.connections,
    )
    mbps = weights.size / 1e6 / max(info.fetch_seconds, 1e-9)
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
            "total_seconds": info.total_seconds,
            "bytes": info.size_bytes,
            "mb_per_s": round(mbps, 1),
            "concurrency": info.connections,
            "format": info.format,
        },
    )
    return Loaded(module, info)
