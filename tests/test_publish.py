"""`lazyserve push` and `lazyserve convert`, run as a user runs them (a subprocess from the
repository root) against moto's S3 server over HTTP: a pushed object carries its sha256, and
every later load verifies it without LAZYSERVE_MODEL_SHA256."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from handler.model import DigitsMLP
from lazyserve.errors import ModelIntegrityError
from lazyserve.model import load_model
from lazyserve.settings import load_settings
from tests.helpers import (
    DIGIT_8,
    REGION,
    ROOT,
    WEIGHTS,
    WEIGHTS_BYTES,
    WEIGHTS_SHA256,
    ImportHandler,
    asgi_client,
    assert_unavailable,
    body_of,
    load_event,
)
from tests.s3server import CountingS3Server, Request

LAZYSERVE = Path(sys.executable).parent / "lazyserve"
VERSIONED = "lazyserve-versioned"
PLAIN = "lazyserve-plain"
MIB = 1024 * 1024
PUSHED = re.compile(
    r"uri: (?P<uri>\S+)\nsha256: (?P<sha256>[0-9a-f]{64})\nsize: (?P<size>\d+)\n"
    r"version_id: (?P<version_id>\S+)\n"
)


class WideNet(nn.Module):
    """One layer whose weights (~9 MB) are larger than push's 8 MiB multipart threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1024, 2200)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


def lazyserve(*args: str) -> subprocess.CompletedProcess[str]:
    # os.environ: conftest's fake credentials and region, and the s3 fixture's
    # AWS_ENDPOINT_URL_S3 pointing at moto's server.
    return subprocess.run(
        [str(LAZYSERVE), *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def pushed(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert done.returncode == 0, done.stderr
    match = PUSHED.fullmatch(done.stdout)
    assert match, done.stdout
    return match.groupdict()


@pytest.fixture
def client(s3: CountingS3Server) -> Any:
    client = boto3.client("s3", region_name=REGION, endpoint_url=s3.endpoint)
    for bucket in (VERSIONED, PLAIN):
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
    client.put_bucket_versioning(Bucket=VERSIONED, VersioningConfiguration={"Status": "Enabled"})
    s3.clear()
    return client


@pytest.fixture
def key() -> str:
    return f"models/{uuid.uuid4().hex}.safetensors"


@pytest.fixture
def wide_weights(tmp_path: Path) -> tuple[Path, WideNet]:
    torch.manual_seed(0)
    net = WideNet().eval()
    path = tmp_path / "wide.safetensors"
    save_file(net.state_dict(), str(path))
    assert path.stat().st_size > 8 * MIB
    return path, net


def uploads(s3: CountingS3Server, bucket: str, key: str) -> list[Request]:
    return [r for r in s3.requests if r.path == f"/{bucket}/{key}" and r.method in ("PUT", "POST")]


# --- push -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bucket", [VERSIONED, PLAIN])
def test_push_of_a_large_file_is_multipart_and_the_load_verifies_it(
    bucket: str,
    s3: CountingS3Server,
    client: Any,
    key: str,
    wide_weights: tuple[Path, WideNet],
) -> None:
    path, net = wide_weights
    uri = f"s3://{bucket}/{key}"
    done = lazyserve("push", str(path), uri)
    result = pushed(done)
    data = path.read_bytes()
    assert result["uri"] == uri
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["size"] == str(len(data))
    head = client.head_object(Bucket=bucket, Key=key)
    if bucket == VERSIONED:
        assert result["version_id"] == head["VersionId"] != "null"
    else:
        assert result["version_id"] == "-"
    assert head["Metadata"] == {"sha256": result["sha256"]}
    assert head["ContentLength"] == len(data)
    assert "100.0%" in done.stderr  # the progress bar reached the end

    # Multipart: CreateMultipartUpload, one UploadPart per 8 MiB, CompleteMultipartUpload.
    requests = uploads(s3, bucket, key)
    assert [r.method for r in requests if r.query in ("uploads", "uploads=")] == ["POST"]
    parts = sorted(
        int(m[1])
        for r in requests
        if r.method == "PUT" and (m := re.search(r"partNumber=(\d+)", r.query))
    )
    assert parts == [1, 2]
    assert any(r.method == "POST" and "uploadId=" in r.query for r in requests)

    # A load with no LAZYSERVE_MODEL_SHA256 checks the stored digest and builds the same model.
    loaded = load_model(WideNet, load_settings({"LAZYSERVE_MODEL_URI": uri}))
    assert loaded.info.sha256 == result["sha256"]
    assert loaded.info.size_bytes == len(data)
    x = torch.randn(3, 1024)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), net(x))


def test_push_then_the_reference_function_serves_it(
    s3: CountingS3Server, client: Any, key: str, import_handler: ImportHandler
) -> None:
    uri = f"s3://{VERSIONED}/{key}"
    result = pushed(lazyserve("push", str(WEIGHTS), uri))
    assert result["sha256"] == WEIGHTS_SHA256
    assert result["size"] == str(len(WEIGHTS_BYTES))
    # Under 8 MiB: one PutObject, no multipart.
    assert [(r.method, r.query) for r in uploads(s3, VERSIONED, key)] == [("PUT", "")]

    mod = import_handler(LAZYSERVE_MODEL_URI=uri)
    response = mod.handler(load_event("http-api-predict"), None)
    assert response["statusCode"] == 200, response
    body = body_of(response)
    assert body["predictions"][0]["label"] == 8
    assert body["model"] == {"sha256": result["sha256"]}
    loaded = mod.service.model.peek()
    assert loaded is not None
    assert loaded.info.version_id == result["version_id"]
    assert loaded.info.sha256 == result["sha256"]


def tampered(client: Any, bucket: str, key: str, stored_sha256: str) -> bytes:
    """Overwrite the object with other valid weights, keeping the old digest as metadata."""
    state = load_file(str(WEIGHTS))
    state["layers.0.bias"] = state["layers.0.bias"] + 1.0
    data = safetensors_bytes(state)
    client.put_object(Bucket=bucket, Key=key, Body=data, Metadata={"sha256": stored_sha256})
    return data


def test_an_object_replaced_behind_the_stored_digest_fails_the_load(
    s3: CountingS3Server, client: Any, key: str
) -> None:
    uri = f"s3://{VERSIONED}/{key}"
    result = pushed(lazyserve("push", str(WEIGHTS), uri))
    data = tampered(client, VERSIONED, key, result["sha256"])
    actual = hashlib.sha256(data).hexdigest()

    with pytest.raises(ModelIntegrityError) as info:
        load_model(DigitsMLP, load_settings({"LAZYSERVE_MODEL_URI": uri}))
    message = str(info.value)
    assert "the sha256 stored with the object" in message
    assert actual in message
    assert result["sha256"] in message

    # The version that was pushed still loads, pinned by its id.
    pinned = f"{uri}?versionId={result['version_id']}"
    loaded = load_model(DigitsMLP, load_settings({"LAZYSERVE_MODEL_URI": pinned}))
    assert loaded.info.sha256 == result["sha256"]


@pytest.mark.anyio
async def test_the_reference_function_answers_503_for_a_replaced_object(
    s3: CountingS3Server, client: Any, key: str, import_handler: ImportHandler
) -> None:
    uri = f"s3://{PLAIN}/{key}"
    result = pushed(lazyserve("push", str(WEIGHTS), uri))
    tampered(client, PLAIN, key, result["sha256"])
    mod = import_handler(LAZYSERVE_MODEL_URI=uri)
    async with asgi_client(mod) as http:
        response = await http.post("/predict", json={"inputs": [DIGIT_8]})
    assert_unavailable(
        response.status_code,
        response.headers,
        response.json(),
        "the sha256 stored with the object",
        result["sha256"],
    )


def test_push_to_a_uri_that_is_not_s3_is_refused() -> None:
    uri = "http://example.com/weights.safetensors"
    done = lazyserve("push", str(WEIGHTS), uri)
    assert done.returncode != 0
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ")
    # What push accepts, and the value it got; not the forms only a load accepts.
    assert "s3://bucket/key" in done.stderr
    assert repr(uri) in done.stderr
    assert "file://" not in done.stderr


def test_push_to_a_missing_bucket_fails_with_the_s3_error(s3: CountingS3Server) -> None:
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/digits.safetensors"
    done = lazyserve("push", str(WEIGHTS), uri)
    assert done.returncode != 0
    assert done.stdout == ""
    assert "Traceback" not in done.stderr, done.stderr
    error = done.stderr.splitlines()[-1]  # after the progress bar, if the upload began
    assert error.startswith("error: ")
    assert uri in error
    assert "NoSuchBucket" in error


def test_push_of_a_missing_file_fails_naming_it(s3: CountingS3Server, tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    done = lazyserve("push", str(missing), "s3://lazyserve-plain/nope.safetensors")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert str(missing) in done.stderr


# --- convert --------------------------------------------------------------------------------------


def test_convert_a_state_dict_gives_the_same_model(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = DigitsMLP().eval()
    source, target = tmp_path / "digits.pt", tmp_path / "digits.safetensors"
    torch.save(net.state_dict(), source)
    done = lazyserve("convert", str(source), str(target))
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    assert done.stdout == f"wrote {target}: 6 tensors, sha256 {digest}\n"

    loaded = load_model(DigitsMLP, load_settings({"LAZYSERVE_MODEL_URI": str(target)}))
    x = torch.tensor([DIGIT_8, [0.0] * 64, [16.0] * 64])
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), net(x))


def test_convert_keeps_tied_weights(tmp_path: Path) -> None:
    shared = torch.randn(10, 4)
    state = {"embed.weight": shared, "head.weight": shared, "head.bias": torch.zeros(10)}
    source, target = tmp_path / "tied.pt", tmp_path / "tied.safetensors"
    torch.save(state, source)
    done = lazyserve("convert", str(source), str(target))
    assert done.returncode == 0, done.stderr
    converted = load_file(str(target))
    assert set(converted) == set(state)
    assert torch.equal(converted["embed.weight"], shared)
    assert torch.equal(converted["head.weight"], shared)


class Exploit:
    """Pickles as a call to open(marker, "w"): running the pickle creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_convert_refuses_a_pickle_that_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    source, target = tmp_path / "evil.pt", tmp_path / "evil.safetensors"
    torch.save({"weight": torch.zeros(2), "payload": Exploit(marker)}, source)
    done = lazyserve("convert", str(source), str(target))
    assert done.returncode != 0
    assert not marker.exists()
    assert not target.exists()
    assert "Traceback" not in done.stderr
    assert "refused" in done.stderr
    assert "open" in done.stderr  # names the global it refused
