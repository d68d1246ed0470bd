"""Where weights come from: S3 (`s3.py`) or a local file (`local.py`), into one `Weights`."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

from lazyserve.settings import ModelURI, Settings
from lazyserve.sources import registry as _registry
from lazyserve.sources.local import fetch_local
from lazyserve.sources.s3 import ObjectVersion, S3Fetcher, reset_s3_clients, s3_client, stat
from lazyserve.sources.weights import Weights
from lazyserve.types import S3Client

__all__ = [
    "ObjectVersion",
    "S3Fetcher",
    "Weights",
    "fetch_local",
    "fetch_weights",
    "prefetch",
    "reset_prefetches",
    "reset_s3_clients",
    "s3_client",
    "stat",
    "take_prefetched",
]


def fetch_weights(
    settings: Settings,
    *,
    uri: ModelURI | None = None,
    reserve: Callable[[int], None] | None = None,
    s3_client: S3Client | None = None,
) -> Weights:
    """The weights' bytes, from S3 or a local file, checked against the expected sha256.
    `uri` defaults to the settings' (one model of a prefix names its own); `reserve(size)` runs
    once the size is known, before the bytes are read, and raises to refuse the load."""
    uri = settings.uri if uri is None else uri
    # LAZYSERVE_MODEL_SHA256 names the one file of a single-model URI, not each of a prefix's.
    expected = settings.model_sha256 if uri.uri == settings.model_uri else None
    if uri.is_s3:
        fetcher = S3Fetcher(
            concurrency=settings.s3_concurrency,
            part_size=settings.s3_part_size,
            s3_client=s3_client,
        )
        return fetcher.fetch(uri, expected_sha256=expected, reserve=reserve)
    return fetch_local(uri, expected_sha256=expected, reserve=reserve)


def prefetch(settings: Settings, *, s3_client: S3Client | None = None) -> Future[Weights]:
    """Start fetching the weights in a thread now, e.g. before `import torch`, so the download
    overlaps the rest of the import; the next load with these settings takes the result."""
    return _registry.start(settings.model_uri, lambda: fetch_weights(settings, s3_client=s3_client))


def take_prefetched(settings: Settings) -> Future[Weights] | None:
    """The prefetch started for these settings, if any; each prefetch is taken once."""
    return _registry.take(settings.model_uri)


def reset_prefetches() -> None:
    """Forget every prefetch no load has taken (tests; a process that changes its settings)."""
    _registry.reset()
