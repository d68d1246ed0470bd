"""A transformers `save_pretrained` directory as a source, in S3 or on local disk: which files it
holds (one listing), then its small files (config, tokenizer, shard index) and its weights (one
file, or its shards on the same connections), each into a buffer of its own. Also: whether a URI
ending in `/` is one such directory or a prefix of many."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lazyserve.checkpoint import CONFIG, ShardIndex, pretrained_files, read_shard_index
from lazyserve.errors import ModelFetchError, ModelMissing, ModelUnavailable
from lazyserve.sources.listing import Listing
from lazyserve.sources.local import fetch_local
from lazyserve.sources.s3 import Allocate, Known, S3Fetcher, private_buffer, s3_get_client
from lazyserve.sources.s3client import RangeClient
from lazyserve.sources.s3errors import S3Error, TransferError, load_error
from lazyserve.sources.signing import CredentialsError
from lazyserve.sources.weights import Weights

if TYPE_CHECKING:
    from lazyserve.settings import Settings
    from lazyserve.uris import ModelURI

__all__ = ["Directory", "directory_identity", "fetch_directory", "layout", "list_directory"]

_CHAT_TEMPLATES = "additional_chat_templates/"


@dataclass
class Directory:
    """The fetched files of one model directory, by name relative to it."""

    uri: ModelURI
    files: dict[str, Weights]
    weights: tuple[str, ...]  # the names of the weights files (the shards, or the one file)
    index: ShardIndex | None
    started: float
    fetch_seconds: float
    connections: int
    identity: str | None

    @property
    def size(self) -> int:
        """Bytes of weights."""
        return sum(self.files[name].size for name in self.weights)

    @property
    def sha256(self) -> str:
        """The weights' digest: the one file's sha256, or for shards the sha256 of their
        `sha256sum` lines (`<sha256>  <name>\\n`, sorted by name)."""
        if len(self.weights) == 1:
            return self.files[self.weights[0]].sha256
        lines = "".join(f"{self.files[n].sha256}  {n}\n" for n in sorted(self.weights))
        return hashlib.sha256(lines.encode()).hexdigest()

    def small_files(self) -> dict[str, bytes]:
        """Every file but the weights, as bytes (config, tokenizer, index...)."""
        return {
            name: bytes(weights.buffer[: weights.size]) if weights.buffer is not None else b""
            for name, weights in self.files.items()
            if name not in self.weights
        }


def layout(uri: ModelURI, client: RangeClient | None = None) -> Literal["one", "many"]:
    """`one` when `uri` (ending in `/`) holds a config.json directly under it, else `many`: a
    prefix whose model NAME is the directory `<prefix>NAME/`. One listing (or a stat)."""
    if not uri.is_s3:
        assert uri.path is not None
        return "one" if os.path.isfile(uri.path / CONFIG) else "many"
    found = list_directory(uri, client)
    return "one" if CONFIG in found else "many"


def list_directory(uri: ModelURI, client: RangeClient | None = None) -> dict[str, tuple[int, str]]:
    """The directory's files (name -> size and a version tag: the ETag, or a local file's
    mtime and inode), chat templates in their sub-directory included."""
    if not uri.is_s3:
        return _list_local(uri)
    where = f"s3://{uri.bucket}/{uri.key}"
    prefix = uri.key or ""
    try:
        listing = (client or s3_get_client()).list_objects(uri.bucket or "", prefix)
        found = _names(listing, prefix)
        if prefix + _CHAT_TEMPLATES in listing.prefixes:
            nested = (client or s3_get_client()).list_objects(
                uri.bucket or "", prefix + _CHAT_TEMPLATES
            )
            found.update(_names(nested, prefix))
    except (S3Error, TransferError, CredentialsError) as exc:
        raise load_error(where, exc) from exc
    return found


def _names(listing: Listing, prefix: str) -> dict[str, tuple[int, str]]:
    return {
        obj.key[len(prefix) :]: (obj.size, obj.etag or "")
        for obj in listing.objects
        if obj.key.startswith(prefix) and obj.key != prefix
    }


def _list_local(uri: ModelURI) -> dict[str, tuple[int, str]]:
    assert uri.path is not None
    found: dict[str, tuple[int, str]] = {}
    try:
        for folder in (uri.path, uri.path / _CHAT_TEMPLATES):
            if folder != uri.path and not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if entry.is_file():
                    stat = entry.stat()
                    name = os.path.relpath(entry.path, uri.path).replace(os.sep, "/")
                    found[name] = (stat.st_size, f"{stat.st_mtime_ns}:{stat.st_ino}")
    except FileNotFoundError:
        raise ModelMissing(f"{uri.uri}: no such directory") from None
    except OSError as exc:
        raise ModelFetchError(f"{uri.uri}: cannot list it: {exc.strerror}") from exc
    return found


def directory_identity(
    uri: ModelURI,
    client: RangeClient | None = None,
    listed: Mapping[str, tuple[int, str]] | None = None,
) -> str:
    """Which version of the directory this is: every file's name, size and version tag."""
    found = list_directory(uri, client) if listed is None else listed
    lines = "".join(f"{name}\t{size}\t{tag}\n" for name, (size, tag) in sorted(found.items()))
    return "dir:" + hashlib.sha256(lines.encode()).hexdigest()


def fetch_directory(
    settings: Settings,
    uri: ModelURI,
    *,
    reserve: Callable[[int], None] | None = None,
    client: RangeClient | None = None,
    allocate: Allocate = private_buffer,
) -> Directory:
    """Fetch the files a build reads: one listing, then the config, tokenizer and index with
    the weights on the same connections (the shards after the index, when sharded). `reserve`
    runs with the bytes fetched so far as they become known, as for one file."""
    started = time.perf_counter()
    listed = list_directory(uri, client)
    if not listed:
        raise ModelMissing(f"{uri.uri}: no model directory is there (no file under it)")
    files = pretrained_files(listed, uri.uri)
    identity = directory_identity(uri, client, listed)
    try:
        first = list(files.needed) + list(files.weights)
        fetched = _fetch(settings, uri, first, listed, reserve, client, allocate)
        index = None
        weights = files.weights
        if files.index is not None:
            index_file = fetched[files.index]
            assert index_file.buffer is not None
            index = read_shard_index(bytes(index_file.buffer[: index_file.size]), uri.uri)
            missing = [name for name in index.files if name not in listed]
            if missing:
                raise ModelMissing(
                    f"{uri.uri}: the shard index names files the directory does not hold: "
                    f"{', '.join(repr(n[:80]) for n in missing[:5])}"
                )
            weights = index.files
            already = sum(w.size for w in fetched.values())
            fetched.update(
                _fetch(
                    settings,
                    uri,
                    list(weights),
                    listed,
                    None if reserve is None else (lambda total: reserve(already + total)),
                    client,
                    allocate,
                )
            )
    except ModelUnavailable as exc:
        if exc.identity is None:
            exc.identity = identity
        raise
    return Directory(
        uri=uri,
        files=fetched,
        weights=tuple(weights),
        index=index,
        started=started,
        fetch_seconds=time.perf_counter() - started,
        connections=max((w.connections for w in fetched.values()), default=1),
        identity=identity,
    )


def _fetch(
    settings: Settings,
    uri: ModelURI,
    names: list[str],
    listed: Mapping[str, tuple[int, str]],
    reserve: Callable[[int], None] | None,
    client: RangeClient | None,
    allocate: Allocate,
) -> dict[str, Weights]:
    """The named files of the directory, each into its own buffer."""
    empty = [name for name in names if listed[name][0] == 0]
    wanted = [name for name in names if name not in empty]
    found = {name: Weights(uri.child(name).uri, 0, _EMPTY, buffer=bytearray()) for name in empty}
    if uri.is_s3:
        fetcher = S3Fetcher(
            concurrency=settings.s3_concurrency,
            part_size=settings.s3_part_size,
            client=client,
            allocate=allocate,
        )
        objects = [(uri.child(name), None) for name in wanted]
        # The listing's sizes and ETags: every file's ranges leave at once, without a first GET
        # to learn its size, and the whole directory is reserved before any byte is read.
        known = [Known(*listed[name]) for name in wanted]
        fetched = fetcher.fetch_all(objects, reserve=reserve, known=known)
        found.update(zip(wanted, fetched, strict=True))
        return found
    total = 0

    def add(size: int) -> None:
        nonlocal total
        total += size
        if reserve is not None:
            reserve(total)

    for name in wanted:
        found[name] = fetch_local(uri.child(name), reserve=add)
    return found


_EMPTY = hashlib.sha256(b"").hexdigest()
