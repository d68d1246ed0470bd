"""The S3 GET client loads use (sources/s3client.py over botocore's signer, credential chain and
endpoint rules): signatures S3 accepts (moto checking them, with IAM on) for keys and version ids
that need encoding, requests addressed as botocore addresses them, credentials in botocore's order
(refreshed), S3's errors in words that name the missing permission and never its own text,
retries counted, deadlines on every body, kept-alive connections, proxies by urllib's rules, the
too-large model refused after one GET, and `head`."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from benchmarks.s3endpoint import S3Endpoint
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from moto.core.authorization import enable_iam_authentication

import lazyserve.environment
import lazyserve.sources.deadlines
import lazyserve.sources.s3
import lazyserve.sources.s3client
from lazyserve.errors import ModelFetchError, ModelTooLarge
from lazyserve.settings import ModelURI, parse_model_uri
from lazyserve.sources import S3Fetcher, S3GetClient, head
from lazyserve.sources.endpoints import Endpoint, endpoint_inputs, proxy_for, resolve_endpoint
from tests.helpers import (
    FAKE_CREDENTIALS,
    REGION,
    CredentialsEndpoint,
    expiring_in,
    make_bucket,
    moto_client,
    s3_error_app,
    stalled_gets,
    trickling_app,
)
from tests.s3server import CountingS3Server, Request, WSGIApp

BUCKET = "lazyserve-client"
VERSIONED = "lazyserve-client-versioned"
PART = 4096
# Keys S3 takes literally that a client must percent-encode (once) in the path it signs.
TRICKY_KEYS = [
    "with space.safetensors",
    "plus+sign.safetensors",
    "hash#tag.safetensors",
    "percent%20literal.safetensors",
    "double//slash.safetensors",
    "ünïcödé/ß.safetensors",
    "t~(p)*'!.safetensors",
    "semi;co,ma=eq&amp.safetensors",
    "question?mark.safetensors",
]
MIB = 1024 * 1024


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def uri_of(bucket: str, key: str, version: str | None = None) -> ModelURI:
    # Built directly: the URI parser's handling of `#` and `+` is not what is tested here.
    text = f"s3://{bucket}/{key}" + (f"?versionId={version}" if version else "")
    return ModelURI(text, bucket=bucket, key=key, version_id=version)


def gets(s3: CountingS3Server, bucket: str, key: str) -> list[Request]:
    """The GETs of one object; WSGI hands the server the path's UTF-8 bytes as Latin-1."""
    path = f"/{bucket}/{key}".encode().decode("latin-1")
    return [r for r in s3.requests if r.method == "GET" and r.path == path]


def fetch(uri: ModelURI, client: S3GetClient | None = None, **kwargs: Any) -> Any:
    return S3Fetcher(concurrency=4, part_size=PART, client=client).fetch(uri, **kwargs)


# --- moto with IAM on: signatures checked, policies enforced --------------------------------------


_users = iter(range(1_000_000))


def iam_user(s3: CountingS3Server, actions: list[str], resource: str) -> dict[str, str]:
    """A new IAM user in moto allowed `actions` on `resource`; its access key as environment."""
    iam = moto_client(s3, "iam")
    name = f"reader-{next(_users)}"
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resource}],
    }
    iam.put_user_policy(UserName=name, PolicyName="read", PolicyDocument=json.dumps(policy))
    return {
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
    }


def as_user(s3: CountingS3Server, user: dict[str, str]) -> S3GetClient:
    """A GET client signing as `user` (a botocore session holding its keys)."""
    import botocore.session

    session = botocore.session.Session()
    session.set_credentials(user["AWS_ACCESS_KEY_ID"], user["AWS_SECRET_ACCESS_KEY"])
    environ = {"AWS_REGION": REGION, "AWS_ENDPOINT_URL_S3": s3.endpoint}
    return S3GetClient(environ=environ, session=session)


def version_denied(request: Request) -> WSGIApp | None:
    """A fault: S3's answer to a role with s3:GetObject but not s3:GetObjectVersion."""
    if request.method == "GET" and "versionId" in request.query:
        return s3_error_app("403 Forbidden", "AccessDenied", "Access Denied", request_id="LZV")
    return None


@pytest.mark.parametrize("key", TRICKY_KEYS)
def test_moto_accepts_the_signature_for_keys_that_need_encoding(
    s3: CountingS3Server, key: str
) -> None:
    client = make_bucket(s3, BUCKET)
    data = random_bytes(3 * PART + 5, seed=len(key))
    client.put_object(Bucket=BUCKET, Key=key, Body=data)
    user = iam_user(s3, ["s3:GetObject"], f"arn:aws:s3:::{BUCKET}/*")
    s3.clear()
    with enable_iam_authentication():
        weights = fetch(uri_of(BUCKET, key), as_user(s3, user))
    assert weights.buffer is not None and bytes(weights.buffer) == data
    assert len(gets(s3, BUCKET, key)) == 4  # every part, each accepted at once


def test_moto_refuses_a_wrong_secret_so_the_check_is_real(s3: CountingS3Server) -> None:
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key="k.safetensors", Body=b"x" * 10)
    user = iam_user(s3, ["s3:GetObject"], f"arn:aws:s3:::{BUCKET}/*")
    user["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    with enable_iam_authentication(), pytest.raises(ModelFetchError) as info:
        fetch(uri_of(BUCKET, "k.safetensors"), as_user(s3, user))
    assert "S3 error SignatureDoesNotMatch" in str(info.value)


def test_moto_accepts_the_signature_with_a_version_id(s3: CountingS3Server) -> None:
    client = make_bucket(s3, VERSIONED, versioned=True)
    key = "versions/with space+plus.safetensors"
    old, new = random_bytes(2 * PART, seed=1), random_bytes(2 * PART, seed=2)
    v1 = client.put_object(Bucket=VERSIONED, Key=key, Body=old)["VersionId"]
    client.put_object(Bucket=VERSIONED, Key=key, Body=new)
    resource = f"arn:aws:s3:::{VERSIONED}/*"
    user = iam_user(s3, ["s3:GetObject", "s3:GetObjectVersion"], resource)
    with enable_iam_authentication():
        weights = fetch(uri_of(VERSIONED, key, v1), as_user(s3, user))
    assert weights.version_id == v1
    assert weights.buffer is not None and bytes(weights.buffer) == old


# --- AccessDenied names the permission the request needed -----------------------------------------


def test_access_denied_names_s3_get_object(s3: CountingS3Server) -> None:
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key="denied.safetensors", Body=b"x" * 10)
    user = iam_user(s3, ["s3:ListBucket"], f"arn:aws:s3:::{BUCKET}")
    with enable_iam_authentication(), pytest.raises(ModelFetchError) as info:
        fetch(uri_of(BUCKET, "denied.safetensors"), as_user(s3, user))
    assert str(info.value).startswith(
        f"cannot read s3://{BUCKET}/denied.safetensors: S3 error AccessDenied (access denied: "
        "the function's role needs s3:GetObject on this key (without s3:ListBucket, a missing "
        "key is also answered AccessDenied)), request id "
    )


def test_access_denied_for_a_version_names_s3_get_object_version(s3: CountingS3Server) -> None:
    # (moto 5.2 lets s3:GetObject read versions too; S3 does not: the answer is injected.)
    client = make_bucket(s3, VERSIONED, versioned=True)
    key = "denied-version.safetensors"
    version = client.put_object(Bucket=VERSIONED, Key=key, Body=b"x" * 10)["VersionId"]
    s3.fault = version_denied
    with pytest.raises(ModelFetchError) as info:
        fetch(uri_of(VERSIONED, key, version))
    assert str(info.value) == (
        f"cannot read s3://{VERSIONED}/{key}: S3 error AccessDenied (access denied: the "
        "function's role needs s3:GetObjectVersion on this key), request id LZV"
    )
    assert not info.value.retryable


def test_without_get_object_version_a_load_pins_the_etag_instead(
    s3: CountingS3Server, caplog: pytest.LogCaptureFixture
) -> None:
    # Every range after the first is pinned to the first response's object. In a versioned
    # bucket that is its version id, which s3:GetObject alone may not read: the ETag (If-Match)
    # pins the load just as well.
    client = make_bucket(s3, VERSIONED, versioned=True)
    key = "etag-pinned.safetensors"
    data = random_bytes(3 * PART, seed=3)
    version = client.put_object(Bucket=VERSIONED, Key=key, Body=data)["VersionId"]
    s3.clear()
    s3.fault = version_denied
    weights = fetch(uri_of(VERSIONED, key))
    assert weights.buffer is not None and bytes(weights.buffer) == data
    assert weights.version_id == version
    gets = s3.object_gets(VERSIONED, key)
    denied = [g for g in gets if "versionId" in g.query]
    pinned = [g for g in gets if g.headers.get("if-match") == weights.etag]
    assert 1 <= len(denied) <= 2  # one per range in flight when the first was refused
    assert {g.range for g in pinned} == {
        f"bytes={PART}-{2 * PART - 1}",
        f"bytes={2 * PART}-{3 * PART - 1}",
    }
    assert len(gets) == 1 + len(denied) + len(pinned)
    assert any("no s3:GetObjectVersion" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("message", "headers"),
    [
        ("Access Denied", {"x-amz-server-side-encryption": "aws:kms"}),
        (
            "User: arn:aws:sts::123456789012:assumed-role/fn/fn is not authorized to perform: "
            "kms:Decrypt on resource: arn:aws:kms:us-east-1:123456789012:key/abc",
            {},
        ),
    ],
    ids=["sse-header", "kms-message"],
)
def test_access_denied_on_an_sse_kms_object_names_kms_decrypt(
    s3: CountingS3Server, message: str, headers: dict[str, str]
) -> None:
    make_bucket(s3, BUCKET)
    app = s3_error_app("403 Forbidden", "AccessDenied", message, request_id="LZCLIENT", **headers)
    s3.fault = lambda request: app if request.method == "GET" else None
    with pytest.raises(ModelFetchError) as info:
        fetch(uri_of(BUCKET, "kms.safetensors"))
    assert str(info.value) == (
        f"cannot read s3://{BUCKET}/kms.safetensors: S3 error AccessDenied (access denied: the "
        "object is encrypted with SSE-KMS; the function's role needs kms:Decrypt on its KMS "
        "key), request id LZCLIENT"
    )
    assert len(s3.object_gets(BUCKET, "kms.safetensors")) == 1  # not retried


# --- signatures, checked against botocore's signer on the raw request -----------------------------


@dataclass
class Recorded:
    target: str
    headers: dict[str, str]


@dataclass
class RawServer:
    """An HTTP server on 127.0.0.1:0 that records each raw request and answers every GET with
    `body`'s bytes for the range asked for (206)."""

    body: bytes
    requests: list[Recorded] = field(default_factory=list)
    etag: str | None = '"fixed"'

    def __post_init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.requests.append(Recorded(self.path, dict(self.headers.items())))
                first, last = map(int, self.headers["Range"].removeprefix("bytes=").split("-"))
                last = min(last, len(outer.body) - 1)
                chunk = outer.body[first : last + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(outer.body)}")
                self.send_header("Content-Length", str(len(chunk)))
                if outer.etag is not None:
                    self.send_header("ETag", outer.etag)
                self.end_headers()
                self.wfile.write(chunk)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        host, port = self.server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def raw_server() -> Iterator[RawServer]:
    server = RawServer(random_bytes(2 * PART, seed=9))
    yield server
    server.stop()


def botocore_signature(request: Recorded, endpoint: str, secret: str) -> str:
    """What botocore's S3 signer computes for the request as it was received (moto's check)."""
    authorization = request.headers["Authorization"]
    signed = authorization.split("SignedHeaders=")[1].split(",")[0].split(";")
    access_key = authorization.split("Credential=")[1].split("/")[0]
    headers = {k: v for k, v in request.headers.items() if k.lower() in signed}
    aws_request = AWSRequest(method="GET", url=endpoint + request.target, headers=headers)
    aws_request.context["timestamp"] = request.headers["X-Amz-Date"]
    token = request.headers.get("X-Amz-Security-Token")
    auth = S3SigV4Auth(BotoCredentials(access_key, secret, token), "s3", REGION)
    canonical = auth.canonical_request(aws_request)
    return str(auth.signature(auth.string_to_sign(aws_request, canonical), aws_request))


@pytest.mark.parametrize(
    ("key", "version", "target"),
    [
        (
            "a b+c#d%e//f/ü.safetensors",
            None,
            "/b/a%20b%2Bc%23d%25e//f/%C3%BC.safetensors",
        ),
        (
            "k.safetensors",
            "3/L4kqtJl40Nr8X8gdRQBpUMLUo+Ab=",
            "/b/k.safetensors?versionId=3%2FL4kqtJl40Nr8X8gdRQBpUMLUo%2BAb%3D",
        ),
        ("~tilde_-.safetensors", "null", "/b/~tilde_-.safetensors?versionId=null"),
    ],
)
def test_the_signature_is_botocores_for_the_path_and_query_as_sent(
    raw_server: RawServer, monkeypatch: pytest.MonkeyPatch, key: str, version: str, target: str
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", raw_server.endpoint)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token/with+chars=")
    fetch(uri_of("b", key, version))
    assert [r.target for r in raw_server.requests] == [target, target]
    secret = FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    for request in raw_server.requests:
        ours = request.headers["Authorization"].split("Signature=")[1]
        assert ours == botocore_signature(request, raw_server.endpoint, secret)
        assert request.headers["X-Amz-Security-Token"] == "token/with+chars="


# --- where requests go: as botocore addresses them ------------------------------------------------


def botocore_url(bucket: str, region: str, environ: dict[str, str], config_file: str) -> str:
    """The URL a boto3 client made with `environ` and the profile file sends a GetObject to."""
    import boto3

    class Sent(Exception):
        pass

    def capture(request: Any, **kwargs: Any) -> None:
        raise Sent(request.url)

    old = dict(os.environ)
    os.environ.update(environ)
    os.environ["AWS_CONFIG_FILE"] = config_file
    try:
        client = boto3.session.Session(region_name=region).client("s3")
        client.meta.events.register("before-send.s3.GetObject", capture)
        with pytest.raises(Sent) as sent:
            client.get_object(Bucket=bucket, Key="k/x.bin")
    finally:
        os.environ.clear()
        os.environ.update(old)
    parts = urlsplit(str(sent.value))
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def our_url(bucket: str, region: str, environ: dict[str, str], config_file: str) -> str:
    import botocore.session

    session = botocore.session.Session()
    session.set_config_variable("config_file", config_file)
    endpoint: Endpoint = resolve_endpoint(endpoint_inputs(bucket, region, environ, session))
    return f"{endpoint.scheme}://{endpoint.netloc}{endpoint.path('k/x.bin')}"


ENDPOINT_CASES = [
    ("models", "us-east-1", {}, ""),
    ("my.models", "us-east-1", {}, ""),
    ("My_Legacy_Bucket", "us-east-1", {}, ""),
    ("models", "eu-west-1", {"AWS_USE_FIPS_ENDPOINT": "true"}, ""),
    ("models", "eu-west-1", {"AWS_USE_DUALSTACK_ENDPOINT": "true"}, ""),
    ("models", "cn-north-1", {}, ""),
    ("models", "us-gov-west-1", {"AWS_USE_FIPS_ENDPOINT": "true"}, ""),
    ("models", "us-iso-east-1", {}, ""),
    ("models", "us-east-1", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}, ""),
    ("models", "us-east-1", {"AWS_ENDPOINT_URL_S3": "https://minio.internal:9000/"}, ""),
    (
        "models",
        "us-east-1",
        {"AWS_ENDPOINT_URL": "http://other:1", "AWS_ENDPOINT_URL_S3": "http://minio:9000"},
        "",
    ),
    ("models", "eu-west-1", {}, "[default]\ns3 =\n    addressing_style = path\n"),
    ("models", "eu-west-1", {}, "[default]\nuse_fips_endpoint = true\n"),
    (
        "models",
        "us-east-1",
        {"AWS_ENDPOINT_URL_S3": "http://localhost:9000"},
        "[default]\ns3 =\n    addressing_style = virtual\n",
    ),
]


@pytest.mark.parametrize(("bucket", "region", "environ", "profile"), ENDPOINT_CASES)
def test_requests_go_where_botocore_sends_them(
    bucket: str, region: str, environ: dict[str, str], profile: str, tmp_path: Path
) -> None:
    config_file = tmp_path / "config"
    config_file.write_text(profile)
    expected = botocore_url(bucket, region, environ, str(config_file))
    assert our_url(bucket, region, environ, str(config_file)) == expected


def test_a_partition_without_fips_is_refused_with_botocores_reason() -> None:
    inputs = endpoint_inputs("models", "cn-north-1", {"AWS_USE_FIPS_ENDPOINT": "true"})
    with pytest.raises(ValueError, match=r"S3 has no endpoint for these settings: .*FIPS"):
        resolve_endpoint(inputs)


def test_every_get_names_lazyserve_and_botocore_in_its_user_agent(raw_server: RawServer) -> None:
    import botocore

    client = S3GetClient(endpoint_url=raw_server.endpoint)
    fetch(uri_of("b", "ua.safetensors"), client)
    client.close()
    from lazyserve import __version__

    agent = f"lazyserve/{__version__} botocore/{botocore.__version__}"
    assert {r.headers["User-Agent"] for r in raw_server.requests} == {agent}


def test_region_comes_from_aws_region_then_aws_default_region() -> None:
    assert S3GetClient(environ={"AWS_REGION": "eu-west-3"}).region == "eu-west-3"
    assert S3GetClient(environ={"AWS_DEFAULT_REGION": "ap-south-1"}).region == "ap-south-1"
    assert S3GetClient(environ={}).region == "us-east-1"


# --- credentials: botocore's chain, in botocore's order -------------------------------------------


def test_assumed_role_credentials_from_the_container_endpoint_are_accepted(
    s3: CountingS3Server, container: CredentialsEndpoint
) -> None:
    # moto's STS hands out a role's temporary credentials; moto then checks the session token
    # and the signature of every GET made with them.
    iam, sts = moto_client(s3, "iam"), moto_client(s3, "sts")
    role = f"fn-role-{next(_users)}"
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
    arn = iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    read = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/*"}
        ],
    }
    iam.put_role_policy(RoleName=role, PolicyName="read", PolicyDocument=json.dumps(read))
    issued = sts.assume_role(RoleArn=arn, RoleSessionName="lazyserve")["Credentials"]
    container.document = {
        "AccessKeyId": issued["AccessKeyId"],
        "SecretAccessKey": issued["SecretAccessKey"],
        "Token": issued["SessionToken"],
        "Expiration": expiring_in(3600),
    }
    data = random_bytes(2 * PART + 1, seed=4)
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key="role.safetensors", Body=data)
    s3.clear()
    with enable_iam_authentication():
        weights = fetch(uri_of(BUCKET, "role.safetensors"))
    assert weights.buffer is not None and bytes(weights.buffer) == data
    assert container.seen == ["the-auth-token"]  # fetched once, with the token
    gets = s3.object_gets(BUCKET, "role.safetensors")
    assert len(gets) == 3
    assert {g.headers["x-amz-security-token"] for g in gets} == {issued["SessionToken"]}


def test_a_profile_wins_over_the_container_endpoint_as_in_botocore(
    s3: CountingS3Server,
    container: CredentialsEndpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With AWS_PROFILE and container variables both set, botocore (so `lazyserve push`) uses
    # the profile: the loads must act as the same identity.
    files = tmp_path / "credentials"
    files.write_text(
        "[fn]\naws_access_key_id = AKIAPROFILEPROFILEPR\naws_secret_access_key = s3cr3t\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(files))
    monkeypatch.setenv("AWS_PROFILE", "fn")
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key="profile.safetensors", Body=b"p" * 10)
    s3.clear()
    fetch(uri_of(BUCKET, "profile.safetensors"))
    (get,) = s3.object_gets(BUCKET, "profile.safetensors")
    assert "Credential=AKIAPROFILEPROFILEPR/" in get.headers["authorization"]
    assert container.seen == []


def test_expired_token_answer_fetches_credentials_again(
    s3: CountingS3Server, container: CredentialsEndpoint
) -> None:
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key="expired.safetensors", Body=b"y" * 10)
    expired = s3_error_app(
        "400 Bad Request", "ExpiredToken", "The provided token has expired.", request_id="LZCLIENT"
    )
    answered: list[str] = []

    def once(request: Request) -> WSGIApp | None:
        if request.method == "GET" and not answered:
            answered.append(request.path)
            return expired
        return None

    s3.fault = once
    weights = fetch(uri_of(BUCKET, "expired.safetensors"))
    assert weights.size == 10
    assert len(container.seen) == 2  # the first credentials, then fresh ones after the 400


def test_no_credentials_anywhere_is_a_fetch_error(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    with pytest.raises(ModelFetchError) as info:
        fetch(uri_of(BUCKET, "any.safetensors"))
    assert str(info.value) == (
        f"cannot read s3://{BUCKET}/any.safetensors: no AWS credentials found (botocore looked "
        "in the environment, the shared files, the container endpoint and instance metadata); "
        "run with a role or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )
    assert s3.object_gets(BUCKET, "any.safetensors") == []


# --- retries and connections ----------------------------------------------------------------------


class FailFirst:
    """A fault: the first `count` GETs of `key` get `app`'s answer, the rest go to moto."""

    def __init__(self, key: str, count: int, app: WSGIApp) -> None:
        self.key, self.left, self.app = key, count, app
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> WSGIApp | None:
        if request.method != "GET" or not request.path.endswith(self.key):
            return None
        with self._lock:
            if self.left <= 0:
                return None
            self.left -= 1
        return self.app


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("500 Internal Server Error", "InternalError"),
        ("503 Slow Down", "SlowDown"),
        ("429 Too Many Requests", "TooManyRequestsException"),
        ("400 Bad Request", "RequestTimeout"),
    ],
)
def test_answers_worth_retrying_are_retried_up_to_three_attempts(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch, status: str, code: str
) -> None:
    monkeypatch.setattr(lazyserve.sources.s3client, "BACKOFF", 0.001)
    key = f"retry-{code}.safetensors"
    data = random_bytes(100, seed=5)
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key=key, Body=data)
    s3.clear()
    s3.fault = FailFirst(key, 2, s3_error_app(status, code, "try again", request_id="LZCLIENT"))
    assert fetch(uri_of(BUCKET, key)).size == 100
    assert len(s3.object_gets(BUCKET, key)) == 3

    s3.clear()
    s3.fault = FailFirst(key, 3, s3_error_app(status, code, "try again", request_id="LZCLIENT"))
    with pytest.raises(ModelFetchError) as info:
        fetch(uri_of(BUCKET, key))
    assert f"S3 error {code}" in str(info.value)
    assert len(s3.object_gets(BUCKET, key)) == 3


def test_an_answer_no_retry_changes_is_not_retried(s3: CountingS3Server) -> None:
    make_bucket(s3, BUCKET)
    s3.clear()
    with pytest.raises(ModelFetchError, match="S3 error NoSuchKey"):
        fetch(uri_of(BUCKET, "missing.safetensors"))
    assert len(s3.object_gets(BUCKET, "missing.safetensors")) == 1


def test_connections_are_kept_alive_and_reused() -> None:
    data = random_bytes(10 * PART, seed=6)
    with S3Endpoint(bandwidth=0, latency=0) as endpoint:
        endpoint.put("bench", "kept.safetensors", data)
        client = S3GetClient(endpoint_url=endpoint.endpoint)
        fetcher = S3Fetcher(concurrency=2, part_size=PART, client=client)
        uri = uri_of("bench", "kept.safetensors")
        assert fetcher.fetch(uri).sha256 == hashlib.sha256(data).hexdigest()
        opened = client.connections
        assert 1 <= opened <= 2  # the first GET's connection, then the two workers' at most
        fetcher.fetch(uri)
        assert client.connections == opened  # the second load opened none
        client.close()


# --- a model that cannot fit ----------------------------------------------------------------------


def test_a_model_that_cannot_fit_is_refused_after_one_get(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "too-large.safetensors"
    size = 9 * MIB
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key=key, Body=bytes(size))
    s3.clear()
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
    monkeypatch.setattr(lazyserve.environment, "resident_bytes", lambda: 120 * MIB)
    with pytest.raises(ModelTooLarge) as info:
        fetch(uri_of(BUCKET, key))
    assert str(info.value) == (
        f"s3://{BUCKET}/{key} is 9437184 bytes (9.0 MiB) and cannot fit: this process may use "
        "128 MiB (AWS_LAMBDA_FUNCTION_MEMORY_SIZE) and already holds 120 MiB; raise the "
        "function's MemorySize to at least 129 MB"
    )
    assert [g.range for g in s3.object_gets(BUCKET, key)] == [f"bytes=0-{PART - 1}"]


def test_a_model_that_fits_is_loaded(s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "fits.safetensors"
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key=key, Body=bytes(8 * MIB))
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
    monkeypatch.setattr(lazyserve.environment, "resident_bytes", lambda: 120 * MIB)
    assert S3Fetcher(concurrency=4, part_size=MIB).fetch(uri_of(BUCKET, key)).size == 8 * MIB


# --- head -----------------------------------------------------------------------------------------


def test_head_gives_size_etag_and_version_from_one_small_get(s3: CountingS3Server) -> None:
    client = make_bucket(s3, VERSIONED, versioned=True)
    key = "head/model.safetensors"
    put = client.put_object(Bucket=VERSIONED, Key=key, Body=b"z" * 12345)
    s3.clear()
    stat = head(parse_model_uri(f"s3://{VERSIONED}/{key}"))
    assert stat == (12345, put["ETag"], put["VersionId"])
    assert [g.range for g in s3.object_gets(VERSIONED, key)] == ["bytes=0-0"]


def test_head_of_an_empty_object_and_of_a_missing_one(s3: CountingS3Server) -> None:
    client = make_bucket(s3, BUCKET)
    put = client.put_object(Bucket=BUCKET, Key="head/empty.safetensors", Body=b"")
    assert head(uri_of(BUCKET, "head/empty.safetensors")) == (0, put["ETag"], None)
    with pytest.raises(ModelFetchError, match=r"S3 error NoSuchKey \(no object has that key\)"):
        head(uri_of(BUCKET, "head/missing.safetensors"))


def test_stalled_answers_are_cut_by_the_read_timeout(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lazyserve.sources.s3client, "READ_TIMEOUT", 0.1)
    monkeypatch.setattr(lazyserve.sources.s3client, "BACKOFF", 0.001)
    make_bucket(s3, BUCKET)
    with stalled_gets(s3), pytest.raises(ModelFetchError) as info:
        fetch(uri_of(BUCKET, "stalled.safetensors"))
    host = urlsplit(s3.endpoint).netloc
    assert str(info.value) == (
        f"cannot read s3://{BUCKET}/stalled.safetensors: ReadTimeoutError: {host} sent nothing "
        "for 0.1 s (3 attempts)"
    )
    assert len(s3.object_gets(BUCKET, "stalled.safetensors")) == 3


# --- proxies, as boto3 honoured them --------------------------------------------------------------


@dataclass
class ForwardProxy:
    """An HTTP proxy on 127.0.0.1:0 that relays absolute-form requests and records them."""

    seen: list[tuple[str, str | None]] = field(default_factory=list)  # target, Proxy-Auth
    tls: tuple[Path, Path] | None = None  # certificate and key: TLS between client and proxy
    tls_handshakes: int = 0

    def __post_init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.seen.append((self.path, self.headers.get("Proxy-Authorization")))
                parts = urlsplit(self.path)
                upstream = http.client.HTTPConnection(parts.netloc, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k != "Proxy-Authorization"}
                upstream.request(
                    "GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers
                )
                answer = upstream.getresponse()
                body = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                upstream.close()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, self.tls))
            plain = self.server.get_request

            def get_request() -> Any:
                sock, address = plain()
                wrapped = context.wrap_socket(sock, server_side=True)
                outer.tls_handshakes += 1
                return wrapped, address

            self.server.get_request = get_request  # type: ignore[method-assign]
        host, port = self.server.server_address[:2]
        self.address = f"{host}:{port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    forward = ForwardProxy()
    yield forward
    forward.stop()


def test_http_proxy_carries_the_gets_with_its_credentials(
    s3: CountingS3Server, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random_bytes(2 * PART, seed=10)
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key="proxied.safetensors", Body=data)
    monkeypatch.setenv("HTTP_PROXY", f"http://user:pa%40ss@{proxy.address}")
    weights = fetch(uri_of(BUCKET, "proxied.safetensors"))
    assert weights.buffer is not None and bytes(weights.buffer) == data
    basic = "Basic " + base64.b64encode(b"user:pa@ss").decode()
    assert proxy.seen == [(f"{s3.endpoint}/{BUCKET}/proxied.safetensors", basic)] * 2


def test_no_proxy_goes_around_the_proxy(
    s3: CountingS3Server, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key="direct.safetensors", Body=b"d" * 10)
    monkeypatch.setenv("http_proxy", f"http://{proxy.address}")
    monkeypatch.setenv("NO_PROXY", "example.com, .127.0.0.1")
    assert fetch(uri_of(BUCKET, "direct.safetensors")).size == 10
    assert proxy.seen == []


def test_no_proxy_with_a_port_goes_around_the_proxy_for_that_port_only(
    s3: CountingS3Server, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key="port.safetensors", Body=b"d" * 10)
    monkeypatch.setenv("HTTP_PROXY", f"http://{proxy.address}")
    host_port = urlsplit(s3.endpoint).netloc
    monkeypatch.setenv("NO_PROXY", f"example.com,{host_port}")
    assert fetch(uri_of(BUCKET, "port.safetensors")).size == 10
    assert proxy.seen == []  # the signed request, token and all, never reached the proxy
    monkeypatch.setenv("NO_PROXY", f"{urlsplit(s3.endpoint).hostname}:1")
    client = S3GetClient()
    assert fetch(uri_of(BUCKET, "port.safetensors"), client).size == 10
    client.close()
    assert len(proxy.seen) == 1


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypassed"),
    [
        ("*", "s3.amazonaws.com", 443, True),
        ("amazonaws.com", "b.s3.eu-west-1.amazonaws.com", 443, True),
        (".amazonaws.com", "b.s3.eu-west-1.amazonaws.com", 443, True),
        ("s3.eu-west-1.amazonaws.com:443", "s3.eu-west-1.amazonaws.com", 443, True),
        ("s3.eu-west-1.amazonaws.com:80", "s3.eu-west-1.amazonaws.com", 443, False),
        ("example.com", "s3.eu-west-1.amazonaws.com", 443, False),
        ("zonaws.com", "s3.amazonaws.com", 443, False),
    ],
)
def test_no_proxy_follows_urllibs_rules(
    no_proxy: str, host: str, port: int, bypassed: bool
) -> None:
    import urllib.request

    environ = {"HTTPS_PROXY": "http://u:p@proxy.internal:3128", "NO_PROXY": no_proxy}
    endpoint = Endpoint("https", f"{host}:{port}", host, port, "", "eu-west-1")
    found = proxy_for(endpoint, environ)
    assert (found is None) == bypassed
    # urllib's own (not public) matcher agrees.
    assert (
        urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
            f"{host}:{port}", {"no": no_proxy}
        )
        == bypassed
    )
    if found is not None:
        assert (found.scheme, found.host, found.port) == ("http", "proxy.internal", 3128)
        assert found.authorization == "Basic dTpw"


def test_an_https_proxy_is_spoken_to_over_tls(
    s3: CountingS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path)
    data = random_bytes(2 * PART, seed=12)
    make_bucket(s3, BUCKET).put_object(Bucket=BUCKET, Key="tls-proxy.safetensors", Body=data)
    tls_proxy = ForwardProxy(tls=(cert, key))
    try:
        monkeypatch.setenv("HTTP_PROXY", f"https://{tls_proxy.address}")
        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
        client = S3GetClient()
        weights = fetch(uri_of(BUCKET, "tls-proxy.safetensors"), client)
        client.close()
    finally:
        tls_proxy.stop()
    assert weights.buffer is not None and bytes(weights.buffer) == data
    assert len(tls_proxy.seen) == 2  # both GETs, each over TLS (the handshake is the server's)
    assert tls_proxy.tls_handshakes >= 1


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, in PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "proxy.pem", tmp_path / "proxy.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# --- every body has a deadline: a trickle ends like a stall ---------------------------------------


def test_a_body_that_trickles_is_given_up_on_at_its_deadline(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One byte every 0.3 s: under the 5 s read timeout forever. Each GET of 4 KiB may take
    # FIRST_BYTE + 4096 / BODY_FLOOR seconds: here 0.5 + 1.
    monkeypatch.setattr(lazyserve.sources.deadlines, "FIRST_BYTE", 0.5)
    monkeypatch.setattr(lazyserve.sources.deadlines, "BODY_FLOOR", PART)
    monkeypatch.setattr(lazyserve.sources.s3client, "BACKOFF", 0.001)
    make_bucket(s3, BUCKET)
    app = trickling_app(PART)
    s3.fault = lambda request: app if request.method == "GET" else None
    started = time.monotonic()
    with pytest.raises(ModelFetchError) as info:
        fetch(uri_of(BUCKET, "trickle.safetensors"))
    assert str(info.value).startswith(
        f"cannot read s3://{BUCKET}/trickle.safetensors bytes 0-{PART - 1}: the body came slower "
        "than 4 KiB/s ("
    )
    assert str(info.value).endswith("(3 attempts), request id ") or "(3 attempts)" in str(
        info.value
    )
    assert info.value.retryable  # the next request tries again
    assert len(s3.object_gets(BUCKET, "trickle.safetensors")) == 3
    assert time.monotonic() - started < 60  # it ends (a bound for a broken deadline, not a goal)


def test_a_whole_load_has_a_deadline_too(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lazyserve.sources.s3, "LOAD_SETUP", 0.5)
    monkeypatch.setattr(lazyserve.sources.deadlines, "FIRST_BYTE", 30.0)
    monkeypatch.setattr(lazyserve.sources.s3client, "BACKOFF", 0.001)
    make_bucket(s3, BUCKET)
    app = trickling_app(PART, every=0.05)
    s3.fault = lambda request: app if request.method == "GET" else None
    with pytest.raises(ModelFetchError, match="the body came slower than"):
        fetch(uri_of(BUCKET, "slow-load.safetensors"))
    # The load's deadline cut the first GET; no retry starts past it.
    assert len(s3.object_gets(BUCKET, "slow-load.safetensors")) == 1


# --- what an endpoint says is never repeated as it is ---------------------------------------------


def test_s3s_message_never_reaches_the_answer_and_reaches_the_log_without_credentials(
    s3: CountingS3Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKENVALUEthatislongenough")

    def echo(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        authorization = environ.get("HTTP_AUTHORIZATION")
        said = f"you sent {authorization} with {environ.get('HTTP_X_AMZ_SECURITY_TOKEN')}"
        return s3_error_app("400 Bad Request", "InvalidArgument<x>", said)(environ, start_response)

    s3.fault = lambda request: echo if request.method == "GET" else None
    with pytest.raises(ModelFetchError) as info:
        fetch(uri_of(BUCKET, "echo.safetensors"))
    secrets = (FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"], "FwoGZXIvYXdzEXAMPLETOKEN", "Signature=")
    logged = caplog.text
    for secret in secrets:
        assert secret not in str(info.value)
        assert secret not in logged
    # The code is not S3's shape either: the status stands for it.
    assert "S3 error HTTP400 (HTTP 400)" in str(info.value)


def test_without_an_etag_or_a_digest_one_get_carries_the_whole_object(
    raw_server: RawServer,
) -> None:
    raw_server.etag = None
    client = S3GetClient(endpoint_url=raw_server.endpoint)
    weights = fetch(uri_of("b", "no-etag.safetensors"), client)
    client.close()
    assert weights.buffer is not None and bytes(weights.buffer) == raw_server.body
    # The first GET learns the size; then one GET of everything, nothing mixed from two.
    assert [r.headers["Range"] for r in raw_server.requests] == [
        f"bytes=0-{PART - 1}",
        f"bytes=0-{2 * PART - 1}",
    ]
