"""Sources: S3 objects read with parallel ranged GETs into one buffer, and local files."""

from __future__ import annotations

import base64
import hashlib
import random
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch

import lazyserve.sources.s3client
from lazyserve.errors import (
    ModelChangedError,
    ModelFetchError,
    ModelFormatError,
    ModelIntegrityError,
    ModelTooLarge,
    ModelUnavailable,
)
from lazyserve.settings import load_settings, parse_model_uri
from lazyserve.sources import (
    S3Fetcher,
    Weights,
    fetch_local,
    fetch_weights,
    prefetch,
    reset_s3_clients,
    s3_client,
    s3_get_client,
    take_prefetched,
)
from lazyserve.sources import directory as directory_module
from lazyserve.sources.checksums import crc_digests, stored_crc
from lazyserve.sources.directory import fetch_directory
from lazyserve.sources.s3client import S3Error
from tests.helpers import REGION, make_bucket, moto_client, stalled_gets
from tests.s3server import CountingS3Server, Request, WSGIApp

BUCKET = "lazyserve-sources"
VERSIONED = "lazyserve-sources-versioned"
KEY = "nets/net.safetensors"
PART = 4096


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content(weights: Weights) -> bytes:
    assert weights.buffer is not None, "no bytes were fetched"
    return bytes(weights.buffer)


def seed(s3: CountingS3Server, key: str, data: bytes, **extra: Any) -> tuple[Any, str]:
    client = make_bucket(s3, BUCKET)
    etag = client.put_object(Bucket=BUCKET, Key=key, Body=data, **extra)["ETag"]
    s3.clear()
    return client, etag


def fetcher() -> S3Fetcher:
    # No client given: the fetcher uses the process's GET client, which follows
    # AWS_ENDPOINT_URL_S3 (set by the s3 fixture).
    return S3Fetcher(concurrency=4, part_size=PART)


def ranged_gets(s3: CountingS3Server, key: str, name: str = BUCKET) -> list[Request]:
    return [r for r in s3.object_gets(name, key) if r.range is not None]


# --- S3 (moto's server over HTTP) ---


def test_fetch_returns_the_exact_bytes(s3: CountingS3Server) -> None:
    data = random_bytes(50_000, seed=1)
    _, etag = seed(s3, "exact.safetensors", data)

    weights = fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/exact.safetensors"))

    assert content(weights) == data
    assert weights.size == 50_000
    assert weights.sha256 == sha256(data)
    assert weights.etag == etag
    assert weights.uri == f"s3://{BUCKET}/exact.safetensors"
    assert weights.version_id is None
    assert weights.connections == 4


@pytest.mark.parametrize("size", [1, PART - 1, PART, PART + 1, 3 * PART])
def test_sizes_around_the_part_size(s3: CountingS3Server, size: int) -> None:
    data = random_bytes(size, seed=size)
    key = f"sizes/{size}.safetensors"
    seed(s3, key, data)
    weights = fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/{key}"))
    assert content(weights) == data
    assert weights.sha256 == sha256(data)
    assert len(ranged_gets(s3, key)) == -(-size // PART)


def test_expected_sha256_that_matches(s3: CountingS3Server) -> None:
    data = random_bytes(10_000, seed=2)
    seed(s3, "match.safetensors", data)
    uri = parse_model_uri(f"s3://{BUCKET}/match.safetensors")
    assert content(fetcher().fetch(uri, expected_sha256=sha256(data))) == data


def test_pinned_version_is_fetched_after_an_overwrite(s3: CountingS3Server) -> None:
    client = make_bucket(s3, VERSIONED, versioned=True)
    first, second = random_bytes(20_000, seed=3), random_bytes(30_000, seed=4)
    key = "pinned.safetensors"
    v1 = client.put_object(Bucket=VERSIONED, Key=key, Body=first)["VersionId"]
    v2 = client.put_object(Bucket=VERSIONED, Key=key, Body=second)["VersionId"]

    pinned = fetcher().fetch(parse_model_uri(f"s3://{VERSIONED}/{key}?versionId={v1}"))
    latest = fetcher().fetch(parse_model_uri(f"s3://{VERSIONED}/{key}"))

    assert content(pinned) == first
    assert pinned.version_id == v1
    assert pinned.sha256 == sha256(first)
    assert content(latest) == second
    assert latest.version_id == v2


def fetch_error(uri: str, **kwargs: Any) -> ModelUnavailable:
    with pytest.raises(ModelUnavailable) as info:
        fetcher().fetch(parse_model_uri(uri), **kwargs)
    return info.value


def test_missing_key(s3: CountingS3Server) -> None:
    make_bucket(s3, BUCKET)
    error = fetch_error(f"s3://{BUCKET}/nope.safetensors")
    assert isinstance(error, ModelFetchError)
    message = str(error)
    assert message.startswith(
        f"cannot read s3://{BUCKET}/nope.safetensors: S3 error NoSuchKey (no object has that key)"
    )
    assert isinstance(error.__cause__, S3Error)
    assert error.__cause__.request_id in message


def test_missing_bucket(s3: CountingS3Server) -> None:
    error = fetch_error("s3://no-such-bucket/k.safetensors")
    assert isinstance(error, ModelFetchError)
    assert str(error).startswith(
        "cannot read s3://no-such-bucket/k.safetensors: S3 error NoSuchBucket"
    )
    assert isinstance(error.__cause__, S3Error)


def test_missing_version(s3: CountingS3Server) -> None:
    client = make_bucket(s3, VERSIONED, versioned=True)
    client.put_object(Bucket=VERSIONED, Key="v.safetensors", Body=b"x" * 10)
    error = fetch_error(f"s3://{VERSIONED}/v.safetensors?versionId=not-a-version")
    assert isinstance(error, ModelFetchError)
    assert f"s3://{VERSIONED}/v.safetensors" in str(error)


def test_wrong_expected_sha256(s3: CountingS3Server) -> None:
    data = random_bytes(9_000, seed=5)
    seed(s3, "wrong.safetensors", data)
    wrong = "ab" * 32
    error = fetch_error(f"s3://{BUCKET}/wrong.safetensors", expected_sha256=wrong)
    assert isinstance(error, ModelIntegrityError)
    assert sha256(data) in str(error)
    assert wrong in str(error)
    assert "LAZYSERVE_MODEL_SHA256" in str(error)


def test_sha256_stored_with_the_object_is_checked(s3: CountingS3Server) -> None:
    data = random_bytes(9_000, seed=6)
    seed(s3, "stored.safetensors", data, Metadata={"sha256": sha256(data)})
    weights = fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/stored.safetensors"))
    assert content(weights) == data


def test_wrong_sha256_stored_with_the_object_fails(s3: CountingS3Server) -> None:
    data = random_bytes(9_000, seed=7)
    stored = "cd" * 32
    seed(s3, "stored-wrong.safetensors", data, Metadata={"sha256": stored})
    error = fetch_error(f"s3://{BUCKET}/stored-wrong.safetensors")
    assert isinstance(error, ModelIntegrityError)
    assert sha256(data) in str(error)
    assert stored in str(error)
    assert "stored with the object" in str(error)


def b64(value: int, width: int) -> str:
    return base64.b64encode(value.to_bytes(width, "big")).decode()


def test_the_crcs_are_the_standard_ones_in_s3s_encoding() -> None:
    # The catalogued check values (the CRC of "123456789"), as S3 encodes its own checksums:
    # base64 of the big-endian value.
    assert crc_digests(b"123456789") == {
        "crc64nvme": b64(0xAE8B14860A799888, 8),
        "crc32": b64(0xCBF43926, 4),
    }
    good = {"crc64nvme": b64(0xAE8B14860A799888, 8), "crc32": b64(0xCBF43926, 4)}
    assert stored_crc(good) == ("crc64nvme", good["crc64nvme"])  # the faster one first
    assert stored_crc({"crc32": good["crc32"]}) == ("crc32", good["crc32"])
    for bad in (None, "", "nonsense", good["crc64nvme"][:-1], good["crc32"] + "=", "!" * 11 + "="):
        assert stored_crc({"crc64nvme": bad, "crc32": bad}) is None


def without_awscrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as one without `lazyserve[crt]` installed."""
    monkeypatch.setitem(sys.modules, "awscrt.checksums", None)  # import raises ImportError


def pushed_metadata(data: bytes) -> dict[str, str]:
    """What `lazyserve push` stores with a file (awscrt installed)."""
    return {"sha256": sha256(data), **crc_digests(data)}


@pytest.mark.parametrize("crt", [True, False], ids=["with-awscrt", "without-awscrt"])
def test_a_crc_stored_beside_the_sha256_is_checked_instead(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch, crt: bool
) -> None:
    data = random_bytes(3 * PART + 123, seed=31)
    seed(s3, "crc.safetensors", data, Metadata=pushed_metadata(data))
    if not crt:
        without_awscrt(monkeypatch)
    weights = fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/crc.safetensors"))
    assert content(weights) == data
    assert len(ranged_gets(s3, "crc.safetensors")) > 1  # checked across parts, in order
    assert weights.verified_by == ("crc64nvme" if crt else "crc32")
    assert weights.sha256 == sha256(data)  # the stored one, bound to the bytes by the CRC


@pytest.mark.parametrize("crt", [True, False], ids=["with-awscrt", "without-awscrt"])
def test_a_wrong_crc_fails_whatever_the_sha256_says(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch, crt: bool
) -> None:
    data = random_bytes(3 * PART + 5, seed=32)
    changed = data[:-1] + bytes([data[-1] ^ 1])  # one bit, in the last part
    stored = pushed_metadata(data)
    seed(s3, "crc-wrong.safetensors", changed, Metadata=stored)
    if not crt:
        without_awscrt(monkeypatch)
    name = "crc64nvme" if crt else "crc32"
    error = fetch_error(f"s3://{BUCKET}/crc-wrong.safetensors")
    assert isinstance(error, ModelIntegrityError)
    assert str(error) == (
        f"s3://{BUCKET}/crc-wrong.safetensors: {name.upper()} of the weights is "
        f"{crc_digests(changed)[name]}, expected {stored[name]} (the one stored with the object)"
    )


def test_a_pinned_digest_is_always_a_sha256(s3: CountingS3Server) -> None:
    data = random_bytes(9_000, seed=33)
    seed(s3, "crc-pinned.safetensors", data, Metadata=pushed_metadata(data))
    uri = parse_model_uri(f"s3://{BUCKET}/crc-pinned.safetensors")
    weights = fetcher().fetch(uri, expected_sha256=sha256(data))
    assert weights.verified_by == "sha256"
    wrong = "ab" * 32
    error = fetch_error(f"s3://{BUCKET}/crc-pinned.safetensors", expected_sha256=wrong)
    assert isinstance(error, ModelIntegrityError)
    assert "LAZYSERVE_MODEL_SHA256" in str(error)


@pytest.mark.parametrize("crc", ["not-a-crc", "", "AAAAAAAAAAA"])
def test_a_malformed_crc_leaves_the_sha256_check(s3: CountingS3Server, crc: str) -> None:
    data = random_bytes(9_000, seed=34)
    stored = "cd" * 32
    seed(
        s3, "crc-bad.safetensors", data, Metadata={"sha256": stored, "crc64nvme": crc, "crc32": crc}
    )
    error = fetch_error(f"s3://{BUCKET}/crc-bad.safetensors")
    assert isinstance(error, ModelIntegrityError)
    assert "the sha256 stored with the object" in str(error)


def test_a_crc_beside_a_malformed_sha256_is_not_enough(s3: CountingS3Server) -> None:
    # The stored sha256 is what every answer would name: one that is not a sha256 is checked
    # (and fails), never passed on because a CRC matched.
    data = random_bytes(9_000, seed=36)
    seed(s3, "crc-bad-sha.safetensors", data, Metadata={"sha256": "x" * 64, **crc_digests(data)})
    error = fetch_error(f"s3://{BUCKET}/crc-bad-sha.safetensors")
    assert isinstance(error, ModelIntegrityError)
    assert "the sha256 stored with the object" in str(error)


def test_a_crc_without_a_sha256_is_not_enough(s3: CountingS3Server) -> None:
    # Without a stored sha256 there is none to report: the load computes it.
    data = random_bytes(9_000, seed=35)
    seed(s3, "crc-only.safetensors", data, Metadata=crc_digests(data))
    weights = fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/crc-only.safetensors"))
    assert (weights.verified_by, weights.sha256) == ("sha256", sha256(data))


def test_empty_object(s3: CountingS3Server) -> None:
    seed(s3, "empty.safetensors", b"")
    error = fetch_error(f"s3://{BUCKET}/empty.safetensors")
    assert isinstance(error, ModelFormatError)
    assert str(error) == f"s3://{BUCKET}/empty.safetensors: the object is empty"


# --- clients ---


def test_one_get_client_per_process_until_reset() -> None:
    client = s3_get_client()
    assert s3_get_client() is client
    reset_s3_clients()
    assert s3_get_client() is not client


def test_one_boto3_client_per_pool_size_with_bounded_timeouts() -> None:
    # boto3 stays for `lazyserve push` (multipart uploads).
    client = s3_client(6)
    assert s3_client(6) is client
    assert s3_client(10) is not client
    config: Any = client.meta.config
    assert config.connect_timeout == lazyserve.sources.s3client.CONNECT_TIMEOUT
    assert config.read_timeout == lazyserve.sources.s3client.READ_TIMEOUT
    assert config.max_pool_connections == 6
    reset_s3_clients()
    assert s3_client(6) is not client


# --- local files ---


def test_local_file(tmp_path: Path) -> None:
    data = random_bytes(30_000, seed=8)
    path = tmp_path / "net.safetensors"
    path.write_bytes(data)

    weights = fetch_local(parse_model_uri(str(path)))

    assert content(weights) == data
    assert weights.size == 30_000
    assert weights.sha256 == sha256(data)
    assert weights.path == path


def test_local_file_uri(tmp_path: Path) -> None:
    path = tmp_path / "net.safetensors"
    path.write_bytes(b"abc")
    weights = fetch_local(parse_model_uri(path.as_uri()), expected_sha256=sha256(b"abc"))
    assert content(weights) == b"abc"


def test_local_pt_file_is_read_into_memory_like_safetensors(tmp_path: Path) -> None:
    # torch.load reads it from this copy: a file rewritten under the served model changes
    # nothing (test_hostile_files.py).
    data = random_bytes(5_000, seed=9)
    path = tmp_path / "net.pt"
    path.write_bytes(data)
    weights = fetch_local(parse_model_uri(str(path)))
    assert content(weights) == data
    assert weights.path == path
    assert weights.sha256 == sha256(data)
    assert weights.size == 5_000


def test_missing_local_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.safetensors"
    with pytest.raises(ModelFetchError) as info:
        fetch_local(parse_model_uri(str(path)))
    assert str(path) in str(info.value)
    assert "No such file or directory" in str(info.value)


def test_local_file_with_the_wrong_sha256(tmp_path: Path) -> None:
    path = tmp_path / "net.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(ModelIntegrityError) as info:
        fetch_local(parse_model_uri(str(path)), expected_sha256="00" * 32)
    assert sha256(b"abc") in str(info.value)
    assert "00" * 32 in str(info.value)


# --- fetch_weights and prefetch ---


def test_fetch_weights_follows_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "net.safetensors"
    path.write_bytes(b"weights")
    settings = load_settings(
        {"LAZYSERVE_MODEL_URI": str(path), "LAZYSERVE_MODEL_SHA256": sha256(b"weights").upper()}
    )
    assert content(fetch_weights(settings)) == b"weights"

    bad = load_settings({"LAZYSERVE_MODEL_URI": str(path), "LAZYSERVE_MODEL_SHA256": "0" * 64})
    with pytest.raises(ModelIntegrityError):
        fetch_weights(bad)


def test_prefetch_is_taken_once(tmp_path: Path) -> None:
    path = tmp_path / "net.safetensors"
    path.write_bytes(b"early bytes")
    settings = load_settings({"LAZYSERVE_MODEL_URI": str(path)})

    future = prefetch(settings)
    assert prefetch(settings) is future  # a second call does not fetch again
    assert content(future.result(10)) == b"early bytes"
    assert take_prefetched(settings) is future
    assert take_prefetched(settings) is None


def test_prefetch_failure_is_kept_for_the_load(tmp_path: Path) -> None:
    settings = load_settings({"LAZYSERVE_MODEL_URI": str(tmp_path / "missing.safetensors")})
    prefetch(settings)
    taken = take_prefetched(settings)
    assert taken is not None
    with pytest.raises(ModelFetchError, match=r"missing\.safetensors"):
        taken.result(10)


def test_prefetch_over_s3_fetches_once(s3: CountingS3Server) -> None:
    key = "http/prefetch.safetensors"
    data = random_bytes(20_000, seed=17)
    seed(s3, key, data)
    settings = load_settings(
        {"LAZYSERVE_MODEL_URI": f"s3://{BUCKET}/{key}", "LAZYSERVE_S3_PART_SIZE": str(PART)}
    )
    try:
        futures = [prefetch(settings) for _ in range(3)]
        assert content(futures[0].result(10)) == data
    finally:
        taken = take_prefetched(settings)
    assert all(f is taken for f in futures)
    assert len(ranged_gets(s3, key)) == -(-len(data) // PART)


# --- S3 over HTTP, with faults ---


def test_http_fetch_reads_each_part_once(s3: CountingS3Server) -> None:
    key = "http/plain.safetensors"
    data = random_bytes(50_000, seed=10)
    _, etag = seed(s3, key, data)

    weights = fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/{key}"))

    assert content(weights) == data
    assert weights.etag == etag
    gets = s3.object_gets(BUCKET, key)
    expected = [f"bytes={s}-{min(s + PART, len(data)) - 1}" for s in range(0, len(data), PART)]
    assert sorted((r.range or "" for r in gets), key=lambda r: int(r[6:].split("-")[0])) == (
        expected
    )
    # Every part after the first is pinned to the first part's ETag.
    assert gets[0].headers.get("if-match") is None
    assert all(r.headers.get("if-match") == etag for r in gets[1:])


def test_object_replaced_during_a_load_restarts_from_the_new_version(
    s3: CountingS3Server,
) -> None:
    key = "http/replaced.safetensors"
    old, new = random_bytes(40_000, seed=11), random_bytes(45_000, seed=12)
    client, old_etag = seed(s3, key, old)
    replaced: list[str] = []
    lock = threading.Lock()

    def replace_on_first_pinned_get(request: Request) -> WSGIApp | None:
        if request.method == "GET" and request.headers.get("if-match"):
            with lock:
                if not replaced:
                    replaced.append(client.put_object(Bucket=BUCKET, Key=key, Body=new)["ETag"])
        return None

    s3.fault = replace_on_first_pinned_get
    weights = fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/{key}"))

    assert len(replaced) == 1
    new_etag = replaced[0]
    # Never a mix: the result is exactly the new version.
    assert content(weights) == new
    assert weights.sha256 == sha256(new)
    assert weights.etag == new_etag
    assert weights.size == len(new)

    gets = ranged_gets(s3, key)
    unpinned = [i for i, r in enumerate(gets) if r.headers.get("if-match") is None]
    assert len(unpinned) == 2, "expected one restart from the first part"
    restart = unpinned[1]
    assert gets[restart].range == f"bytes=0-{PART - 1}"
    assert {r.headers.get("if-match") for r in gets[1:restart]} == {old_etag}
    assert gets[restart + 1 :]
    assert all(r.headers.get("if-match") == new_etag for r in gets[restart + 1 :])


def test_versioned_object_replaced_during_a_load_keeps_the_first_version(
    s3: CountingS3Server,
) -> None:
    name = VERSIONED
    key = "http/versioned.safetensors"
    client = make_bucket(s3, name, versioned=True)
    old, new = random_bytes(30_000, seed=18), random_bytes(30_000, seed=19)
    v1 = client.put_object(Bucket=name, Key=key, Body=old)["VersionId"]
    s3.clear()
    replaced: list[str] = []
    lock = threading.Lock()

    def replace_after_the_first_get(request: Request) -> WSGIApp | None:
        if request.method == "GET" and request.path == f"/{name}/{key}":
            with lock:
                if len(s3.object_gets(name, key)) >= 2 and not replaced:
                    replaced.append(client.put_object(Bucket=name, Key=key, Body=new)["VersionId"])
        return None

    s3.fault = replace_after_the_first_get
    weights = fetcher().fetch(parse_model_uri(f"s3://{name}/{key}"))

    assert replaced and replaced[0] != v1
    # The version seen first is read to the end: consistent, no restart needed.
    assert content(weights) == old
    assert weights.version_id == v1
    gets = s3.object_gets(name, key)
    assert "versionId" not in gets[0].query
    assert all(f"versionId={v1}" in r.query for r in gets[1:])
    assert len(gets) == -(-len(old) // PART)


def test_object_replaced_twice_during_a_load_fails_clearly(s3: CountingS3Server) -> None:
    key = "http/flapping.safetensors"
    _, first_etag = seed(s3, key, random_bytes(20_000, seed=13))
    client = moto_client(s3)
    lock = threading.Lock()
    replaced_for: set[str] = set()

    def replace_each_version_once(request: Request) -> WSGIApp | None:
        etag = request.headers.get("if-match")
        if request.method == "GET" and etag:
            with lock:
                if etag not in replaced_for and len(replaced_for) < 2:
                    replaced_for.add(etag)
                    body = random_bytes(20_000, seed=100 + len(replaced_for))
                    client.put_object(Bucket=BUCKET, Key=key, Body=body)
        return None

    s3.fault = replace_each_version_once
    with pytest.raises(ModelChangedError) as info:
        fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/{key}"))

    assert first_etag in replaced_for
    assert len(replaced_for) == 2
    assert str(info.value).startswith(f"s3://{BUCKET}/{key}: the object changed twice")
    assert "versionId" in str(info.value)


def answer_once(
    s3: CountingS3Server, key: str, wanted_range: str, app: WSGIApp
) -> Callable[[Request], WSGIApp | None]:
    used = threading.Event()

    def fault(request: Request) -> WSGIApp | None:
        if request.path == f"/{BUCKET}/{key}" and request.range == wanted_range:
            if not used.is_set():
                used.set()
                return app
        return None

    return fault


def test_a_range_with_a_short_body_is_retried(s3: CountingS3Server) -> None:
    key = "http/short.safetensors"
    data = random_bytes(30_000, seed=14)
    _, etag = seed(s3, key, data)
    start, end = 2 * PART, 3 * PART - 1

    def short_body(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response(
            "206 Partial Content",
            [
                ("Content-Type", "binary/octet-stream"),
                ("Content-Range", f"bytes {start}-{end}/{len(data)}"),
                ("Content-Length", "100"),
                ("ETag", etag),
            ],
        )
        return [data[start : start + 100]]

    s3.fault = answer_once(s3, key, f"bytes={start}-{end}", short_body)
    weights = fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/{key}"))

    assert content(weights) == data
    assert weights.sha256 == sha256(data)
    assert [r.range for r in ranged_gets(s3, key)].count(f"bytes={start}-{end}") == 2


def test_a_range_answered_with_a_500_is_retried(s3: CountingS3Server) -> None:
    key = "http/500.safetensors"
    data = random_bytes(30_000, seed=15)
    seed(s3, key, data)
    start, end = PART, 2 * PART - 1

    def internal_error(
        environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
            b"<Message>We encountered an internal error. Please try again.</Message></Error>"
        )
        start_response(
            "500 Internal Server Error",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
        )
        return [body]

    s3.fault = answer_once(s3, key, f"bytes={start}-{end}", internal_error)
    weights = fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/{key}"))

    assert content(weights) == data
    assert [r.range for r in ranged_gets(s3, key)].count(f"bytes={start}-{end}") == 2


def test_a_stalled_endpoint_ends_in_a_fetch_error(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "http/stalled.safetensors"
    seed(s3, key, random_bytes(10_000, seed=16))
    monkeypatch.setattr(lazyserve.sources.s3client, "READ_TIMEOUT", 0.2)
    monkeypatch.setattr(lazyserve.sources.s3client, "ATTEMPTS", 1)
    with stalled_gets(s3), pytest.raises(ModelFetchError) as info:
        fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/{key}"))

    assert str(info.value).startswith(f"cannot read s3://{BUCKET}/{key}: ReadTimeoutError")
    assert len(s3.object_gets(BUCKET, key)) == 1  # one attempt, cut by the read timeout


def test_a_body_that_stops_halfway_is_cut_by_the_read_timeout(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The headers and half the body, then silence: the wait for the rest is bounded as every
    # read is, though the rest is received in one call.
    key = "http/halfway.safetensors"
    data = random_bytes(3 * PART, seed=17)
    _, etag = seed(s3, key, data)
    release = threading.Event()
    start, end = PART, 2 * PART - 1

    def halfway(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response(
            "206 Partial Content",
            [
                ("Content-Range", f"bytes {start}-{end}/{len(data)}"),
                ("Content-Length", str(PART)),
                ("ETag", etag),
            ],
        )
        yield data[start : start + PART // 2]
        release.wait(10)

    s3.fault = answer_once(s3, key, f"bytes={start}-{end}", halfway)
    monkeypatch.setattr(lazyserve.sources.s3client, "READ_TIMEOUT", 0.3)
    monkeypatch.setattr(lazyserve.sources.s3client, "ATTEMPTS", 1)
    try:
        with pytest.raises(ModelFetchError) as info:
            fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/{key}"))
    finally:
        release.set()
    host = s3.endpoint.removeprefix("http://")
    assert str(info.value).startswith(
        f"cannot read s3://{BUCKET}/{key} bytes {start}-{end}: ReadTimeoutError: {host} sent "
        "nothing for 0.3 s (1 attempts)"
    )


def test_a_chunked_answer_is_read_as_http_frames_it(s3: CountingS3Server) -> None:
    # No Content-Length (werkzeug then frames the body in chunks): the socket's bytes are not
    # the body's, and the part is read through http.client, which removes the framing.
    key = "http/chunked.safetensors"
    data = random_bytes(3 * PART, seed=18)
    _, etag = seed(s3, key, data)
    start, end = PART, 2 * PART - 1

    def chunked(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response(
            "206 Partial Content",
            [("Content-Range", f"bytes {start}-{end}/{len(data)}"), ("ETag", etag)],
        )
        yield data[start : start + 1000]
        yield data[start + 1000 : end + 1]

    s3.fault = answer_once(s3, key, f"bytes={start}-{end}", chunked)
    weights = fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/{key}"))

    assert content(weights) == data
    assert [r.range for r in ranged_gets(s3, key)].count(f"bytes={start}-{end}") == 1


# --- a model directory: sizes and ETags from its listing ---


DIRECTORY = "dir/"


def seed_directory(s3: CountingS3Server, files: dict[str, bytes]) -> dict[str, str]:
    """The files under s3://BUCKET/dir/; their ETags by name."""
    client = make_bucket(s3, BUCKET)
    etags = {
        name: client.put_object(Bucket=BUCKET, Key=DIRECTORY + name, Body=data)["ETag"]
        for name, data in files.items()
    }
    s3.clear()
    return etags


def directory_settings() -> Any:
    return load_settings(
        {
            "LAZYSERVE_MODEL_URI": f"s3://{BUCKET}/{DIRECTORY}",
            "LAZYSERVE_S3_CONCURRENCY": "4",
            "LAZYSERVE_S3_PART_SIZE": str(PART),
        }
    )


def test_a_directorys_files_are_reserved_whole_then_all_their_ranges_leave_at_once(
    s3: CountingS3Server,
) -> None:
    weights = random_bytes(5 * PART + 7, seed=19)
    config = b'{"model_type": "bert"}'
    etags = seed_directory(s3, {"config.json": config, "model.safetensors": weights})
    settings = directory_settings()
    reserved: list[tuple[int, int]] = []  # (total, GETs of the files made by then)

    def reserve(total: int) -> None:
        files = [r for r in s3.requests if r.method == "GET" and r.range is not None]
        reserved.append((total, len(files)))

    directory = fetch_directory(settings, settings.uri, reserve=reserve)

    assert content(directory.files["model.safetensors"]) == weights
    assert content(directory.files["config.json"]) == config
    assert directory.files["model.safetensors"].sha256 == sha256(weights)
    # Both sizes came from the listing: the whole directory was reserved before any GET.
    assert reserved[-1] == (len(config) + len(weights), 0)
    # No GET to learn a size: each file is its parts, each pinned to the listed ETag.
    for name, data in (("config.json", config), ("model.safetensors", weights)):
        gets = ranged_gets(s3, DIRECTORY + name)
        expected = [f"bytes={a}-{min(a + PART, len(data)) - 1}" for a in range(0, len(data), PART)]
        assert sorted(r.range or "" for r in gets) == sorted(expected)
        assert {r.headers.get("if-match") for r in gets} == {etags[name]}


def test_a_directory_too_large_is_refused_before_any_get_of_its_files(
    s3: CountingS3Server,
) -> None:
    seed_directory(s3, {"config.json": b"{}", "model.safetensors": random_bytes(PART, seed=20)})
    settings = directory_settings()

    def reserve(total: int) -> None:
        if total > PART:
            raise ModelTooLarge(f"{total} bytes do not fit")

    with pytest.raises(ModelTooLarge, match=f"{PART + 2} bytes do not fit"):
        fetch_directory(settings, settings.uri, reserve=reserve)
    assert [r for r in s3.requests if r.method == "GET" and r.range is not None] == []


def test_a_file_replaced_after_the_listing_is_read_as_it_is_now(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = random_bytes(3 * PART, seed=21), random_bytes(4 * PART + 1, seed=22)
    seed_directory(s3, {"config.json": b"{}", "model.safetensors": old})
    settings = directory_settings()
    listed = directory_module.list_directory(settings.uri)  # the listing before the change
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key=DIRECTORY + "model.safetensors", Body=new)
    monkeypatch.setattr(directory_module, "list_directory", lambda uri, client=None: listed)

    directory = fetch_directory(settings, settings.uri)

    # The listed ETag no longer matched (412): the load started again, sizes from the GETs.
    assert content(directory.files["model.safetensors"]) == new
    assert directory.files["model.safetensors"].size == len(new)
    assert f"s3://{BUCKET}/{DIRECTORY}model.safetensors changed during the load" in caplog.text


def test_an_endpoint_that_ignores_range_is_refused(s3: CountingS3Server) -> None:
    # A whole-object 200 to a ranged GET: the parts cannot be placed, and reading every
    # object whole once per part would multiply the download.
    key = "http/no-range.safetensors"
    data = random_bytes(3 * PART, seed=20)
    seed(s3, key, data)

    def whole(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", str(len(data))), ("ETag", '"whole"')])
        return [data]

    s3.fault = lambda request: whole if request.method == "GET" else None
    with pytest.raises(ModelFetchError) as info:
        fetcher().fetch(parse_model_uri(f"s3://{BUCKET}/{key}"))
    assert str(info.value) == (
        f"cannot read s3://{BUCKET}/{key}: the endpoint ignored the Range header "
        "(status 200, no Content-Range)"
    )
    assert len(ranged_gets(s3, key)) == 1


def test_a_boto3_client_given_to_the_service_makes_every_get_and_every_look(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Everything the client holds applies: its endpoint, its credentials, its configuration
    # (here a user agent of its own, which lazyserve's GET client would not send).
    from botocore.config import Config

    from lazyserve import Service, Settings

    key = "http/given-client.safetensors"
    data = random_bytes(2 * PART, seed=21)
    seed(s3, key, data)
    given = boto3.client(
        "s3",
        region_name=REGION,
        endpoint_url=s3.endpoint,
        aws_access_key_id="AKIAGIVENCLIENT00000",
        aws_secret_access_key="given/secret",
        config=Config(user_agent_extra="given-client/1"),
    )
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # only the given client knows where S3 is
    settings = Settings(model_uri=f"s3://{BUCKET}/{key}", s3_part_size=PART, refresh_seconds=3600)
    service = Service(lambda: torch.nn.Identity(), settings=settings, s3_client=given)
    weights = fetch_weights(settings, client=service._client)
    assert content(weights) == data
    (target,) = service._refresh_targets()
    assert target.stat().etag == weights.etag  # a refresh looks through the same client
    gets = s3.object_gets(BUCKET, key)
    assert len(gets) == 2
    assert all("Credential=AKIAGIVENCLIENT00000/" in g.headers["authorization"] for g in gets)
    assert all("given-client/1" in g.headers["user-agent"] for g in gets)
    service.close()
