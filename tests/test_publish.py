"""`lazyserve push` and `lazyserve convert`, run as a user runs them (a subprocess from the
repository root) against moto's S3 server over HTTP: a pushed object carries its sha256, and
every later load verifies it without LAZYSERVE_MODEL_SHA256."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
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
from lazyserve.errors import ModelFormatError, ModelIntegrityError
from lazyserve.model import load_model
from lazyserve.publish import push
from lazyserve.settings import load_settings
from lazyserve.sources.checksums import crc_digests
from tests.helpers import (
    ACCESS_DENIED,
    DIGIT_8,
    REGION,
    ROOT,
    WEIGHTS,
    WEIGHTS_BYTES,
    WEIGHTS_SHA256,
    ImportHandler,
    asgi_client,
    assert_unloadable,
    body_of,
    load_event,
    s3_error_app,
)
from tests.s3server import CountingS3Server, Fault, Request

LAZYSERVE = Path(sys.executable).parent / "lazyserve"
VERSIONED = "lazyserve-versioned"
PLAIN = "lazyserve-plain"
MIB = 1024 * 1024
WEIGHTS_PUSHED = {"sha256": WEIGHTS_SHA256, **crc_digests(WEIGHTS_BYTES)}
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


def lazyserve_on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Run `lazyserve ARGS` with its stderr on a terminal (a pty) and its stdout in a pipe:
    (exit code, stdout, what the terminal showed)."""
    primary, secondary = os.openpty()
    try:
        process = subprocess.Popen(
            [str(LAZYSERVE), *args],
            cwd=ROOT,
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=secondary,
            text=True,
        )
    finally:
        os.close(secondary)
    shown = bytearray()

    def drain() -> None:  # concurrently: a full pty buffer would block the writer
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the last writer closed its end
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        stdout, _ = process.communicate(timeout=120)
    finally:
        reader.join(timeout=30)
        os.close(primary)
    # The terminal ends lines with \r\n (its onlcr setting); the program wrote \n.
    return process.returncode, stdout, shown.decode(errors="replace").replace("\r\n", "\n")


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
    assert head["Metadata"] == {"sha256": result["sha256"], **crc_digests(data)}
    assert head["ContentLength"] == len(data)
    assert done.stderr == ""  # no progress bar into a pipe

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
    assert loaded.info.verified_by == "crc64nvme"  # the CRC stored beside it (no second hash)
    assert loaded.info.size_bytes == len(data)
    x = torch.randn(3, 1024)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), net(x))


def test_without_awscrt_push_stores_the_crc32_and_the_load_checks_it(
    s3: CountingS3Server, client: Any, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "awscrt.checksums", None)  # no lazyserve[crt]
    uri = f"s3://{PLAIN}/{key}"
    result = push(WEIGHTS, uri, client=client)
    assert result.sha256 == WEIGHTS_SHA256
    stored = client.head_object(Bucket=PLAIN, Key=key)["Metadata"]
    assert stored == {"sha256": WEIGHTS_SHA256, "crc32": WEIGHTS_PUSHED["crc32"]}
    loaded = load_model(DigitsMLP, load_settings({"LAZYSERVE_MODEL_URI": uri}))
    assert (loaded.info.sha256, loaded.info.verified_by) == (WEIGHTS_SHA256, "crc32")


def test_push_draws_its_progress_bar_on_a_terminal(
    s3: CountingS3Server, client: Any, key: str, wide_weights: tuple[Path, WideNet]
) -> None:
    path, _ = wide_weights
    code, stdout, shown = lazyserve_on_a_terminal("push", str(path), f"s3://{PLAIN}/{key}")
    assert code == 0, shown
    assert pushed(subprocess.CompletedProcess([], code, stdout, ""))["sha256"]
    # One line redrawn in place (carriage returns), ending full with a newline.
    assert "\r[" in shown
    assert shown.rstrip().endswith(
        f"100.0% {path.stat().st_size / 1e6:.1f}/{path.stat().st_size / 1e6:.1f} MB"
    )


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
async def test_the_reference_function_answers_500_for_a_replaced_object(
    s3: CountingS3Server, client: Any, key: str, import_handler: ImportHandler
) -> None:
    uri = f"s3://{PLAIN}/{key}"
    result = pushed(lazyserve("push", str(WEIGHTS), uri))
    tampered(client, PLAIN, key, result["sha256"])
    mod = import_handler(LAZYSERVE_MODEL_URI=uri)
    async with asgi_client(mod) as http:
        response = await http.post("/predict", json={"inputs": [DIGIT_8]})
    assert_unloadable(
        response.status_code,
        response.headers,
        response.json(),
        "the sha256 stored with the object",
        result["sha256"],
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command: no traceback, no progress bar, no output."""
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert "\r" not in done.stderr  # no progress bar was drawn
    return line


def test_push_to_a_uri_that_is_not_s3_is_refused() -> None:
    uri = "http://example.com/weights.safetensors"
    # What push accepts, and the value it got; not the forms only a load accepts.
    assert one_line_error(lazyserve("push", str(WEIGHTS), uri)) == (
        "lazyserve push: error: argument URI: push needs s3://bucket/key or "
        f"s3://bucket/prefix/, without a versionId; got {uri!r}"
    )


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        (
            "s3://bkt/k.safetensors?versionId=v1",
            "push needs s3://bucket/key or s3://bucket/prefix/, without a versionId (S3 gives "
            "the upload its own); got 's3://bkt/k.safetensors?versionId=v1'",
        ),
        (
            "s3://b/k.safetensors",
            "'s3://b/k.safetensors' is not accepted: bucket 'b' is not a valid S3 bucket name: "
            "3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a "
            "letter or digit (buckets made in us-east-1 before March 2018 may also hold capitals "
            "and underscores, up to 255)",
        ),
    ],
)
def test_push_refuses_uris_before_reading_anything(uri: str, reason: str) -> None:
    assert one_line_error(lazyserve("push", str(WEIGHTS), uri)) == (
        f"lazyserve push: error: argument URI: {reason}"
    )


def test_push_to_a_missing_bucket_fails_before_any_upload(
    s3: CountingS3Server, tmp_path: Path, wide_weights: tuple[Path, WideNet]
) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    for path in (WEIGHTS, wide_weights[0]):  # one PutObject; multipart
        s3.clear()
        done = lazyserve("push", str(path), f"s3://{bucket}/digits.safetensors")
        assert one_line_error(done) == (
            f"lazyserve push: error: argument URI: cannot upload to s3://{bucket}: S3 error "
            "NoSuchBucket (no bucket has that name; create it, or check the name and AWS_REGION)"
        )
        # HeadBucket, and nothing that sends the file.
        assert [(r.method, r.path) for r in s3.requests] == [("HEAD", f"/{bucket}")]


def test_push_of_a_missing_file_fails_naming_it(s3: CountingS3Server, tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    done = lazyserve("push", str(missing), "s3://lazyserve-plain/nope.safetensors")
    assert one_line_error(done) == f"lazyserve push: error: argument FILE: {missing}: no such file"
    assert s3.requests == []


def test_push_of_a_directory_to_a_key_fails_naming_both(
    s3: CountingS3Server, tmp_path: Path
) -> None:
    # A directory is a save_pretrained directory: it goes under a prefix ending in /.
    done = lazyserve("push", str(tmp_path), "s3://lazyserve-plain/x.safetensors")
    assert one_line_error(done) == (
        f"lazyserve push: error: argument URI: {tmp_path} is a directory: push it to "
        "s3://bucket/dir/ (ending in /), without a versionId; got "
        "'s3://lazyserve-plain/x.safetensors'"
    )


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def torch_save_file(tmp_path: Path, name: str, obj: object, **kwargs: Any) -> Path:
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path


def test_push_checks_the_file_is_weights_of_the_keys_format(
    s3: CountingS3Server, client: Any, tmp_path: Path
) -> None:
    readme = write(tmp_path, "README.md", b"# digits\n\nA small model.\n")
    state = {"w": torch.ones(4)}
    pt = torch_save_file(tmp_path, "net.pt", state)
    legacy = torch_save_file(tmp_path, "old.pt", state, _use_new_zipfile_serialization=False)
    whole = safetensors_bytes(state)
    truncated = write(tmp_path, "cut.safetensors", whole[:-4])
    cases = [
        (
            readme,
            "k.safetensors",
            f"{readme} is not a weights file: it starts with b'# digits', which is neither "
            "safetensors (an 8-byte header length, then a JSON header) nor torch.save",
        ),
        (
            pt,
            "k.safetensors",
            f"{pt} is a torch.save file, not safetensors: convert it first (lazyserve convert "
            f"{pt} OUT.safetensors), or give the key a .pt suffix",
        ),
        (
            legacy,
            "k.safetensors",
            f"{legacy} is a torch.save file, not safetensors: convert it first (lazyserve "
            f"convert {legacy} OUT.safetensors), or give the key a .pt suffix",
        ),
        (
            WEIGHTS,
            "k.pt",
            f"{WEIGHTS} is a safetensors file, not a torch.save file: give the key a "
            ".safetensors suffix",
        ),
        (
            truncated,
            "k.safetensors",
            f"{truncated}: not a valid safetensors file: tensor 'w' lies outside the data "
            "(0..16 of 12)",
        ),
        (write(tmp_path, "empty.safetensors", b""), "k.safetensors", None),
    ]
    # The library call, in this process (each `lazyserve push` would import torch again) ...
    for path, key, reason in cases:
        with pytest.raises(ModelFormatError) as info:
            push(path, f"s3://{PLAIN}/{key}", client=client)
        assert str(info.value) == (reason or f"{path}: the file is empty")
    assert s3.requests == []  # each refused before any request
    # ... and one through the command line, as a user sees it.
    done = lazyserve("push", str(readme), f"s3://{PLAIN}/k.safetensors")
    assert one_line_error(done) == f"lazyserve push: error: argument FILE: {cases[0][2]}"
    assert s3.requests == []


def test_push_refuses_a_pt_pickle_that_would_run_code(s3: CountingS3Server, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = torch_save_file(tmp_path, "evil.pt", {"w": torch.zeros(2), "x": Exploit(marker)})
    line = one_line_error(lazyserve("push", str(evil), f"s3://{PLAIN}/evil.pt"))
    assert line.startswith(f"lazyserve push: error: argument FILE: {evil}: refused: ")
    assert "GLOBAL" in line and "open" in line
    assert not marker.exists()
    assert s3.requests == []


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_push_of_a_pt_state_dict_to_a_pt_key_then_loads(
    s3: CountingS3Server, client: Any, key: str, tmp_path: Path, legacy: bool
) -> None:
    torch.manual_seed(3)
    net = DigitsMLP().eval()
    path = torch_save_file(
        tmp_path, "digits.pt", net.state_dict(), _use_new_zipfile_serialization=not legacy
    )
    uri = f"s3://{VERSIONED}/{key.removesuffix('.safetensors')}.pt"
    result = pushed(lazyserve("push", str(path), uri))
    loaded = load_model(DigitsMLP, load_settings({"LAZYSERVE_MODEL_URI": uri}))
    assert loaded.info.sha256 == result["sha256"]
    x = torch.tensor([DIGIT_8])
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), net(x))


def test_push_into_a_prefix_names_the_object_after_the_file(
    s3: CountingS3Server, client: Any, tmp_path: Path
) -> None:
    prefix = f"s3://{PLAIN}/models-{uuid.uuid4().hex[:8]}/"
    named = write(tmp_path, "digits-v2.safetensors", WEIGHTS_BYTES)
    result = pushed(lazyserve("push", str(named), prefix))
    assert result["uri"] == prefix + "digits-v2.safetensors"
    head = client.head_object(Bucket=PLAIN, Key=result["uri"].removeprefix(f"s3://{PLAIN}/"))
    assert head["Metadata"] == WEIGHTS_PUSHED

    other = write(tmp_path, "my model.safetensors", WEIGHTS_BYTES)
    assert one_line_error(lazyserve("push", str(other), prefix)) == (
        f"lazyserve push: error: argument URI: my model.safetensors cannot go under the prefix "
        f"{prefix}: model name 'my model' is not accepted: use ASCII letters, digits, '-', '_' "
        "and '.', not starting with '.'"
    )


def denied_uploads(bucket: str, key: str) -> Fault:
    """S3 refusing PutObject and CreateMultipartUpload of one key (a role without s3:PutObject)."""
    app = s3_error_app(*ACCESS_DENIED)
    return lambda r: app if r.path == f"/{bucket}/{key}" and r.method in ("PUT", "POST") else None


def test_a_refused_upload_draws_no_progress(
    s3: CountingS3Server, client: Any, key: str, wide_weights: tuple[Path, WideNet]
) -> None:
    for path in (WEIGHTS, wide_weights[0]):  # one PutObject; multipart
        s3.fault = denied_uploads(PLAIN, key)
        # On a terminal, where a bar would be drawn.
        code, stdout, shown = lazyserve_on_a_terminal("push", str(path), f"s3://{PLAIN}/{key}")
        line = one_line_error(subprocess.CompletedProcess([], code, stdout, shown))
        assert line.startswith(
            f"lazyserve push: error: argument URI: cannot upload to s3://{PLAIN}/{key}: "
        )
        assert "AccessDenied" in line
        assert "%" not in shown  # no progress bar at all


def test_a_bucket_that_hides_itself_from_head_bucket_still_takes_the_upload(
    s3: CountingS3Server, client: Any, key: str
) -> None:
    # HeadBucket needs s3:ListBucket, which an upload-only role may lack: its 403 is no reason
    # to refuse an upload that s3:PutObject allows.
    forbidden = s3_error_app(*ACCESS_DENIED)
    s3.fault = lambda r: forbidden if r.method == "HEAD" and r.path == f"/{PLAIN}" else None
    result = pushed(lazyserve("push", str(WEIGHTS), f"s3://{PLAIN}/{key}"))
    assert result["sha256"] == WEIGHTS_SHA256
    assert client.head_object(Bucket=PLAIN, Key=key)["Metadata"] == WEIGHTS_PUSHED


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


def test_convert_writes_weights_anyone_can_read_whatever_the_umask(tmp_path: Path) -> None:
    # Under umask 077 safetensors' writer leaves 0600, which Lambda's non-root user could not
    # read once the file is copied into an image.
    source, target = tmp_path / "digits.pt", tmp_path / "digits.safetensors"
    torch.save(DigitsMLP().state_dict(), source)
    done = subprocess.run(
        [str(LAZYSERVE), "convert", str(source), str(target)],
        cwd=ROOT,
        preexec_fn=lambda: os.umask(0o077),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert target.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name", ["digits.pt", "digits.pth", "digits", "digits.SAFETENSORS"])
def test_convert_insists_on_a_safetensors_name(tmp_path: Path, name: str) -> None:
    # Served or pushed, a .pt name is read as torch.save: safetensors bytes under it would be
    # refused there as a broken file.
    source, target = tmp_path / "in.pt", tmp_path / name
    torch.save(DigitsMLP().state_dict(), source)
    done = lazyserve("convert", str(source), str(target))
    assert one_line_error(done) == (
        f"lazyserve convert: error: argument OUT.safetensors: {target}: the output is a "
        "safetensors file, so its name must end in .safetensors (serving and push read a "
        f"name's suffix as its format); e.g. {tmp_path / 'digits.safetensors'}"
    )
    assert not target.exists()


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


def test_convert_a_legacy_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = DigitsMLP().eval()
    source, target = tmp_path / "old.pt", tmp_path / "old.safetensors"
    torch.save(net.state_dict(), source, _use_new_zipfile_serialization=False)
    done = lazyserve("convert", str(source), str(target))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {target}: 6 tensors, sha256 ")
    converted = load_file(str(target))
    for name, tensor in net.state_dict().items():
        assert torch.equal(converted[name], tensor), name


def test_convert_of_a_safetensors_file_says_it_is_one_already(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    done = lazyserve("convert", str(WEIGHTS), str(target))
    assert one_line_error(done) == (
        f"lazyserve convert: error: argument IN.pt: {WEIGHTS} is already a safetensors file: "
        "nothing to convert; push or serve it as it is"
    )
    assert not target.exists()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            b"# notes\n",
            "not a torch.save file: it starts with b'# notes\\n', neither a zip archive "
            "(torch.save) nor a pickle (torch.save with _use_new_zipfile_serialization=False)",
        ),
        (b"", "not a torch.save file: it is empty"),
    ],
    ids=["text", "empty"],
)
def test_convert_of_a_file_that_is_not_torch_save(tmp_path: Path, data: bytes, reason: str) -> None:
    source = write(tmp_path, "notes.pt", data)
    done = lazyserve("convert", str(source), str(tmp_path / "out.safetensors"))
    assert one_line_error(done) == f"lazyserve convert: error: argument IN.pt: {source}: {reason}"


def test_convert_of_a_truncated_file(tmp_path: Path) -> None:
    whole = torch_save_file(tmp_path, "whole.pt", {"w": torch.ones(1000)}).read_bytes()
    source = write(tmp_path, "cut.pt", whole[: len(whole) // 2])
    line = one_line_error(lazyserve("convert", str(source), str(tmp_path / "out.safetensors")))
    assert line == (
        f"lazyserve convert: error: argument IN.pt: {source}: cannot read this torch.save file, "
        "it is damaged or truncated (the zip archive's directory is missing)"
    )


def test_convert_names_a_missing_input_or_an_unwritable_output(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    done = lazyserve("convert", str(missing), str(tmp_path / "out.safetensors"))
    assert (
        one_line_error(done) == f"lazyserve convert: error: argument IN.pt: {missing}: no such file"
    )

    source = torch_save_file(tmp_path, "net.pt", {"w": torch.ones(2)})
    nowhere = tmp_path / "no-such-dir" / "out.safetensors"
    done = lazyserve("convert", str(source), str(nowhere))
    assert one_line_error(done) == (
        f"lazyserve convert: error: argument OUT.safetensors: {nowhere}: no directory "
        f"{nowhere.parent}"
    )
    done = lazyserve("convert", str(source), str(tmp_path))
    assert one_line_error(done) == (
        f"lazyserve convert: error: argument OUT.safetensors: {tmp_path}: is a directory; give "
        "a file name"
    )
    done = lazyserve("convert", str(source), str(source))
    assert one_line_error(done) == (
        f"lazyserve convert: error: argument OUT.safetensors: {source} is the input file; give "
        "another output path"
    )
    assert torch.equal(torch.load(source, weights_only=True)["w"], torch.ones(2))
