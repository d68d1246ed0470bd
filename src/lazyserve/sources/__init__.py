"""Where weights come from: S3 (`s3.py`, over the GET client in `s3client.py`) or a local file
(`local.py`), into one `Weights`; fetched now, or taken from a download started earlier (by
`prefetch`, or by the helper process the interpreter started, `helper.py`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

from lazyserve.errors import ModelFetchError, ModelMissing
from lazyserve.sources import helper as _helper
from lazyserve.sources import registry as _registry
from lazyserve.sources.boto import Boto3Ranges, s3_client
from lazyserve.sources.local import fetch_local
from lazyserve.sources.s3 import S3Fetcher, head, reset_s3_clients, s3_get_client
from lazyserve.sources.s3client import ObjectStat, RangeClient, S3GetClient
from lazyserve.sources.weights import Weights, file_identity, identity_of, verify

if TYPE_CHECKING:
    from lazyserve.settings import Settings
    from lazyserve.sources.directory import Directory
    from lazyserve.uris import ModelURI

__all__ = [
    "Boto3Ranges",
    "ObjectStat",
    "Pending",
    "RangeClient",
    "S3Fetcher",
    "S3GetClient",
    "Weights",
    "fetch_local",
    "fetch_weights",
    "head",
    "identity",
    "load_weights",
    "prefetch",
    "reset_prefetches",
    "reset_s3_clients",
    "s3_client",
    "s3_get_client",
    "settle_early_download",
    "take_directory",
    "take_prefetched",
]

log = logging.getLogger("lazyserve")


class Pending(Protocol):
    """A download started ahead of the load that takes it."""

    def result(self, timeout: float | None = None) -> Weights: ...


def fetch_weights(
    settings: Settings,
    *,
    uri: ModelURI | None = None,
    reserve: Callable[[int], None] | None = None,
    client: RangeClient | None = None,
) -> Weights:
    """The weights' bytes, fetched now in this process from S3 or a local file, checked against
    the expected sha256. `uri` defaults to the settings' (one model of a prefix names its own);
    `reserve(size)` runs once the size is known, before the bytes are read, and raises to
    refuse the load; `client` makes the GETs (default: the process's `S3GetClient`)."""
    uri = settings.uri if uri is None else uri
    # LAZYSERVE_MODEL_SHA256 names the one file of a single-model URI, not each of a prefix's.
    expected = settings.model_sha256 if uri.uri == settings.model_uri else None
    if uri.is_s3:
        fetcher = S3Fetcher(
            concurrency=settings.s3_concurrency, part_size=settings.s3_part_size, client=client
        )
        return fetcher.fetch(uri, expected_sha256=expected, reserve=reserve)
    return fetch_local(uri, expected_sha256=expected, reserve=reserve)


def load_weights(
    settings: Settings,
    *,
    uri: ModelURI | None = None,
    reserve: Callable[[int], None] | None = None,
    client: RangeClient | None = None,
) -> Weights:
    """The weights for these settings (or for `uri`, one model of a prefix): from the download
    started ahead (the helper process, or `prefetch`), else fetched now."""
    pending = take_prefetched(settings) if uri is None else None
    if pending is not None:
        weights = _settle(pending, settings, client)
        if reserve is not None:
            reserve(weights.size)
        return weights
    return fetch_weights(settings, uri=uri, reserve=reserve, client=client)


def prefetch(settings: Settings, *, client: RangeClient | None = None) -> Future[Weights]:
    """Start fetching the weights in a thread now, so the download overlaps what the process
    does next; the next load with these settings takes the result. A download the helper process
    is making is adopted, not made twice."""
    started = _helper.take(settings)
    if started is not None:
        return _registry.start(settings.model_uri, lambda: _settle(started, settings, client))
    return _registry.start(settings.model_uri, lambda: fetch_weights(settings, client=client))


def identity(uri: ModelURI, client: RangeClient | None = None) -> str | None:
    """Which version of the object `uri` names is there now (`Weights.identity`), by one cheap
    look (a 1-byte GET, a stat of the file); raises the error a load would meet."""
    if uri.is_s3:
        stat = head(uri, client=client)
        return identity_of(stat.etag, stat.version_id)
    assert uri.path is not None
    try:
        found = os.stat(uri.path)
    except FileNotFoundError:
        raise ModelMissing(f"{uri.uri}: cannot read {uri.path}: no such file") from None
    except OSError as exc:
        raise ModelFetchError(f"{uri.uri}: cannot read {uri.path}: {exc.strerror}") from None
    return file_identity(found.st_size, found.st_mtime_ns, found.st_ino)


def settle_early_download(settings: Settings, *, adopt: bool) -> None:
    """The app has read its settings: a download the interpreter started that the app will not
    take is stopped and freed now (see `helper.settle`)."""
    _helper.settle(settings, adopt=adopt)


def _settle(pending: Pending, settings: Settings, client: RangeClient | None) -> Weights:
    """The weights a download started ahead delivers; a helper process that delivered nothing
    usable is logged and replaced by a download in this process."""
    try:
        weights = pending.result()
    except _helper.HelperFailed as exc:
        log.warning("the download started with the interpreter failed (%s); downloading again", exc)
        return fetch_weights(settings, client=client)
    verify(weights.uri, weights.sha256, settings.model_sha256, "LAZYSERVE_MODEL_SHA256")
    return weights


def take_directory(settings: Settings) -> Directory | None:
    """The model directory the helper process fetched for these settings, if it did; a helper
    that delivered nothing usable is logged (the load then fetches in this process)."""
    started = _helper.take(settings)
    if started is None:
        return None
    try:
        return started.directory()
    except _helper.HelperFailed as exc:
        log.warning("the download started with the interpreter failed (%s); downloading again", exc)
        return None


def take_prefetched(settings: Settings) -> Pending | None:
    """The download started ahead for these settings, if any; each is taken once."""
    started: Any = _helper.take(settings)
    return started if started is not None else _registry.take(settings.model_uri)


def reset_prefetches() -> None:
    """Forget every download started ahead that no load has taken (tests; a process that
    changes its settings); a helper process is stopped."""
    _registry.reset()
    _helper.discard()
