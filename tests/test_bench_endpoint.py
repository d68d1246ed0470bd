"""The benchmark S3 endpoint (benchmarks/s3endpoint.py) answers like S3 where the benchmarks rely
on it: ranges, ETags, If-Match, S3's XML errors, keep-alive, and its bandwidth and latency model."""

from __future__ import annotations

import hashlib
import http.client
import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from benchmarks.s3endpoint import S3Endpoint
from botocore.config import Config
from botocore.exceptions import ClientError

from lazyserve.settings import parse_model_uri
from lazyserve.sources import S3Fetcher, S3GetClient

BUCKET = "bench"
KEY = "weights/model.safetensors"
DATA = os.urandom(100_000)


@pytest.fixture
def endpoint() -> Iterator[S3Endpoint]:
    with S3Endpoint(bandwidth=0, latency=0) as s3:
        s3.put(BUCKET, KEY, DATA)
        yield s3


@pytest.fixture
def s3client(endpoint: S3Endpoint) -> Iterator[Any]:
    """A boto3 client for the endpoint, closed afterwards (no socket left to the GC)."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint.endpoint,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}),
    )
    yield client
    client.close()


def raw(
    s3: S3Endpoint, method: str, path: str, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    url = urlsplit(s3.endpoint)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def logged(s3: S3Endpoint, count: int) -> list[Any]:
    """The request log once it holds `count` entries (a request is logged after its response)."""
    deadline = time.monotonic() + 5
    while len(s3.requests) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return list(s3.requests)


def test_ranged_get_is_a_206_with_content_range(endpoint: S3Endpoint, s3client: Any) -> None:
    response = s3client.get_object(Bucket=BUCKET, Key=KEY, Range="bytes=10-99")
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert response["ContentRange"] == f"bytes 10-99/{len(DATA)}"
    assert response["ContentLength"] == 90
    assert response["AcceptRanges"] == "bytes"
    assert response["Body"].read() == DATA[10:100]


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=99990-", 99_990, 99_999),
        ("bytes=-25", 99_975, 99_999),
        ("bytes=99000-200000", 99_000, 99_999),  # S3 clips the end to the object
    ],
)
def test_open_suffix_and_clipped_ranges(
    endpoint: S3Endpoint, s3client: Any, header: str, start: int, end: int
) -> None:
    response = s3client.get_object(Bucket=BUCKET, Key=KEY, Range=header)
    assert response["ContentRange"] == f"bytes {start}-{end}/{len(DATA)}"
    assert response["Body"].read() == DATA[start : end + 1]


def test_range_past_the_end_is_invalid_range(endpoint: S3Endpoint, s3client: Any) -> None:
    with pytest.raises(ClientError) as caught:
        s3client.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={len(DATA)}-")
    assert caught.value.response["Error"]["Code"] == "InvalidRange"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 416


def test_full_get_and_head_agree(endpoint: S3Endpoint, s3client: Any) -> None:
    got = s3client.get_object(Bucket=BUCKET, Key=KEY)
    head = s3client.head_object(Bucket=BUCKET, Key=KEY)
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert got["Body"].read() == DATA
    assert head["ContentLength"] == got["ContentLength"] == len(DATA)
    assert head["ETag"] == got["ETag"] and head["ETag"].startswith('"')
    assert head["LastModified"] == got["LastModified"]
    assert head["ResponseMetadata"]["HTTPHeaders"]["x-amz-request-id"]


def test_if_match_is_honoured_and_a_mismatch_is_412(endpoint: S3Endpoint, s3client: Any) -> None:
    etag = s3client.head_object(Bucket=BUCKET, Key=KEY)["ETag"]
    ok = s3client.get_object(Bucket=BUCKET, Key=KEY, Range="bytes=0-9", IfMatch=etag)
    assert ok["Body"].read() == DATA[:10]
    endpoint.put(BUCKET, KEY, DATA[::-1])  # replaced: a new ETag
    with pytest.raises(ClientError) as caught:
        s3client.get_object(Bucket=BUCKET, Key=KEY, Range="bytes=0-9", IfMatch=etag)
    assert caught.value.response["Error"]["Code"] == "PreconditionFailed"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_missing_key_is_404_no_such_key_in_s3_xml(endpoint: S3Endpoint, s3client: Any) -> None:
    with pytest.raises(ClientError) as caught:
        s3client.get_object(Bucket=BUCKET, Key="nope.safetensors")
    assert caught.value.response["Error"]["Code"] == "NoSuchKey"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    status, headers, body = raw(endpoint, "GET", f"/{BUCKET}/nope.safetensors")
    assert status == 404
    assert headers["Content-Type"] == "application/xml"
    assert body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>')
    assert b"<Key>nope.safetensors</Key>" in body and b"<RequestId>" in body


def test_missing_bucket_is_404_no_such_bucket(endpoint: S3Endpoint, s3client: Any) -> None:
    with pytest.raises(ClientError) as caught:
        s3client.get_object(Bucket="other", Key=KEY)
    assert caught.value.response["Error"]["Code"] == "NoSuchBucket"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_version_ids(endpoint: S3Endpoint, s3client: Any) -> None:
    obj = endpoint.put(BUCKET, "versioned", DATA, versioned=True)
    got = s3client.get_object(Bucket=BUCKET, Key="versioned", VersionId=obj.version_id)
    assert got["VersionId"] == obj.version_id
    assert got["Body"].read() == DATA
    with pytest.raises(ClientError) as caught:
        s3client.get_object(Bucket=BUCKET, Key="versioned", VersionId="not-that-one")
    assert caught.value.response["Error"]["Code"] == "NoSuchVersion"


def test_one_connection_serves_many_requests(endpoint: S3Endpoint) -> None:
    url = urlsplit(endpoint.endpoint)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        for start in range(0, 1000, 100):
            conn.request(
                "GET", f"/{BUCKET}/{KEY}", headers={"Range": f"bytes={start}-{start + 99}"}
            )
            response = conn.getresponse()
            assert response.status == 206 and response.read() == DATA[start : start + 100]
        conn.request("GET", f"/{BUCKET}/missing")
        assert conn.getresponse().read().startswith(b"<?xml")  # errors keep the connection
        conn.request("HEAD", f"/{BUCKET}/{KEY}")
        assert conn.getresponse().read() == b""
    finally:
        conn.close()
    assert len(logged(endpoint, 12)) == 12


def test_bandwidth_per_connection_and_first_byte_latency() -> None:
    data = os.urandom(1_000_000)
    with S3Endpoint(bandwidth=2e6, latency=0.2) as s3:
        s3.put(BUCKET, KEY, data)
        started = time.perf_counter()
        status, _, _ = raw(s3, "HEAD", f"/{BUCKET}/{KEY}")
        assert status == 200 and time.perf_counter() - started >= 0.2
        started = time.perf_counter()
        _, _, body = raw(s3, "GET", f"/{BUCKET}/{KEY}")
        # 2 MB/s after a burst of one 256 KiB chunk: at least 0.37 s, plus the 0.2 s latency.
        assert body == data and time.perf_counter() - started >= 0.5


def test_lazyserve_reads_an_object_through_it(endpoint: S3Endpoint) -> None:
    client = S3GetClient(endpoint_url=endpoint.endpoint)
    fetcher = S3Fetcher(concurrency=4, part_size=4096, client=client)
    endpoint.clear_log()
    try:
        weights = fetcher.fetch(parse_model_uri(f"s3://{BUCKET}/{KEY}"))
    finally:
        client.close()  # its kept-alive connections
    assert weights.buffer is not None and bytes(weights.buffer) == DATA
    assert weights.sha256 == hashlib.sha256(DATA).hexdigest()
    parts = -(-len(DATA) // 4096)
    ranges = [r for r in logged(endpoint, parts) if r.method == "GET"]
    assert len(ranges) == parts and all(r.status == 206 for r in ranges)


def test_list_objects_v2_gives_keys_sizes_etags_and_prefixes(
    endpoint: S3Endpoint, s3client: Any
) -> None:
    endpoint.put(BUCKET, "weights/sub/other.bin", b"x" * 7)
    endpoint.put(BUCKET, "elsewhere.bin", b"y")
    listed = s3client.list_objects_v2(Bucket=BUCKET, Prefix="weights/", Delimiter="/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [(KEY, len(DATA))]
    head = s3client.head_object(Bucket=BUCKET, Key=KEY)
    assert listed["Contents"][0]["ETag"] == head["ETag"]
    assert [p["Prefix"] for p in listed["CommonPrefixes"]] == ["weights/sub/"]
    assert listed["IsTruncated"] is False
