"""The S3 GET client loads use (sources/s3client.py, sources/credentials.py): SigV4 signatures S3
accepts (moto checking them, with IAM on) for keys and version ids that need encoding, where
requests go, credentials from the environment or the container endpoint (refreshed), S3's errors
in words that name the missing permission, retries counted, kept-alive connections, the too-large
model refused after one GET, and `head`."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import random
import threading
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
import lazyserve.sources.s3client
from lazyserve.errors import ModelFetchError, ModelTooLarge
from lazyserve.settings import ModelURI, parse_model_uri
from lazyserve.sources import S3Fetcher, S3GetClient, head
from lazyserve.sources.credentials import Credentials, CredentialsError, CredentialSource
from lazyserve.sources.endpoints import Route, resolve_endpoint, route
from tests.helpers import (
    FAKE_CREDENTIALS,
    REGION,
    CredentialsEndpoint,
    expiring_in,
    make_bucket,
    moto_client,
    s3_error_app,
    stalled_gets,
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


# --- moto with IAM on: signatures checked, policies enforced -----------------------------------


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
    return S3GetClient(environ={**user, "AWS_REGION": REGION, "AWS_ENDPOINT_URL_S3": s3.endpoint})


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


# --- AccessDenied names the permission the request needed -----------------------------------


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
    client = make_bucket(s3, VERSIONED, versioned=True)
    key = "denied-version.safetensors"
    version = client.put_object(Bucket=VERSIONED, Key=key, Body=b"x" * 10)["VersionId"]
    user = iam_user(s3, ["s3:GetObject"], f"arn:aws:s3:::{VERSIONED}/*")
    with enable_iam_authentication(), pytest.raises(ModelFetchError) as info:
        fetch(uri_of(VERSIONED, key, version), as_user(s3, user))
    assert str(info.value).startswith(
        f"cannot read s3://{VERSIONED}/{key}: S3 error AccessDenied (access denied: the "
        "function's role needs s3:GetObjectVersion on this key), request id "
    )


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
    user = iam_user(s3, ["s3:GetObject"], f"arn:aws:s3:::{VERSIONED}/*")
    s3.clear()
    with enable_iam_authentication():
        weights = fetch(uri_of(VERSIONED, key), as_user(s3, user))
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


# --- signatures, checked against botocore's signer on the raw request -----------------------


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
                self.send_header("ETag", '"fixed"')
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


# --- where requests go ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bucket", "environ", "expected"),
    [
        ("models", {}, ("https", "models.s3.us-east-1.amazonaws.com", "/k/x.bin")),
        (
            "my.models",
            {},
            ("https", "s3.us-east-1.amazonaws.com", "/my.models/k/x.bin"),
        ),
        (
            "models",
            {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"},
            ("http", "127.0.0.1:9000", "/models/k/x.bin"),
        ),
        (
            "models",
            {"AWS_ENDPOINT_URL": "http://other:1", "AWS_ENDPOINT_URL_S3": "https://minio:9000/"},
            ("https", "minio:9000", "/models/k/x.bin"),
        ),
        (
            "models",
            {"AWS_USE_FIPS_ENDPOINT": "true"},
            ("https", "models.s3-fips.eu-west-1.amazonaws.com", "/k/x.bin"),
        ),
    ],
)
def test_endpoint(bucket: str, environ: dict[str, str], expected: tuple[str, str, str]) -> None:
    region = "eu-west-1" if "AWS_USE_FIPS_ENDPOINT" in environ else "us-east-1"
    endpoint = resolve_endpoint(bucket, region, environ)
    assert (endpoint.scheme, endpoint.netloc, endpoint.path(bucket, "k/x.bin")) == expected


def test_region_comes_from_aws_region_then_aws_default_region() -> None:
    assert S3GetClient(environ={"AWS_REGION": "eu-west-3"}).region == "eu-west-3"
    assert S3GetClient(environ={"AWS_DEFAULT_REGION": "ap-south-1"}).region == "ap-south-1"
    assert S3GetClient(environ={}).region == "us-east-1"


# --- credentials ------------------------------------------------------------------------------


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


def test_container_credentials_close_to_expiry_are_fetched_again(
    container: CredentialsEndpoint,
) -> None:
    source = CredentialSource()
    container.document["Expiration"] = expiring_in(3600)
    assert source.get().access_key == "ASIACONTAINERFAKE"
    source.get()
    assert len(container.seen) == 1  # an hour left: kept
    container.document["Expiration"] = expiring_in(5 * 60)
    source.invalidate()
    source.get()
    source.get()
    assert len(container.seen) == 3  # five minutes left: fetched on each use until renewed


def test_the_token_file_wins_over_the_token_variable(
    container: CredentialsEndpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("token-from-the-file\n")
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token_file))
    CredentialSource().get()
    assert container.seen == ["token-from-the-file"]


def test_a_relative_uri_goes_to_the_ecs_agent_and_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, str]] = []

    def fake_get(scheme: str, netloc: str, target: str, headers: dict[str, str]) -> Any:
        calls.append((scheme, netloc, target))
        return 200, json.dumps({"AccessKeyId": "A", "SecretAccessKey": "S", "Token": "T"}).encode()

    monkeypatch.setattr(lazyserve.sources.credentials, "_get", fake_get)
    environ = {
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/abc",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:1/ignored",
    }
    credentials = CredentialSource(environ).get()
    assert calls == [("http", "169.254.170.2", "/v2/credentials/abc")]
    assert (credentials.access_key, credentials.token, credentials.expires) == ("A", "T", None)


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("http://127.0.0.1:9/creds", True),
        ("http://localhost:9/creds", True),
        ("http://169.254.170.23/v1/credentials", True),
        ("https://credentials.example.com/creds", True),
        ("http://credentials.example.com/creds", False),
        ("http://10.0.0.1/creds", False),
    ],
)
def test_full_uri_hosts_follow_botocores_rule(
    url: str, accepted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lazyserve.sources.credentials, "CONTAINER_PAUSE", 0.0)
    monkeypatch.setattr(
        lazyserve.sources.credentials,
        "_get",
        lambda *args: (200, b'{"AccessKeyId": "A", "SecretAccessKey": "S"}'),
    )
    source = CredentialSource({"AWS_CONTAINER_CREDENTIALS_FULL_URI": url})
    if accepted:
        assert source.get().access_key == "A"
        return
    host = urlsplit(url).hostname
    with pytest.raises(CredentialsError) as info:
        source.get()
    assert str(info.value) == (
        f"AWS_CONTAINER_CREDENTIALS_FULL_URI names host {host!r}: over plain http only a "
        "loopback address or 169.254.170.2, 169.254.170.23, fd00:ec2::23, localhost is "
        "accepted (botocore's rule); use https"
    )


def test_an_endpoint_that_fails_is_tried_three_times_and_named(
    container: CredentialsEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lazyserve.sources.credentials, "CONTAINER_PAUSE", 0.0)
    container.status = 500
    with pytest.raises(CredentialsError) as info:
        CredentialSource().get()
    assert len(container.seen) == 3
    assert str(info.value) == (
        "the container credentials endpoint (AWS_CONTAINER_CREDENTIALS_FULL_URI, host "
        "127.0.0.1) gave no credentials after 3 attempts: HTTP 500"
    )


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


def test_no_credentials_anywhere_is_a_fetch_error_naming_where_it_looked(
    s3: CountingS3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ModelFetchError) as info:
        fetch(uri_of(BUCKET, "any.safetensors"))
    assert str(info.value) == (
        f"cannot read s3://{BUCKET}/any.safetensors: no AWS credentials found: looked in "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_CONTAINER_CREDENTIALS_RELATIVE_URI/"
        "AWS_CONTAINER_CREDENTIALS_FULL_URI and botocore's chain (profiles, SSO, instance "
        "metadata); run with a role or set those variables"
    )
    assert s3.object_gets(BUCKET, "any.safetensors") == []


def test_credentials_never_show_in_their_repr() -> None:
    credentials = Credentials("AKIAVISIBLE", "secret-value", "token-value", 1.0)
    assert repr(credentials) == str(credentials) == "Credentials(...)"


# --- retries and connections --------------------------------------------------------------------


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


# --- a model that cannot fit ----------------------------------------------------------------


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


# --- head -------------------------------------------------------------------------------------


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


# --- proxies, as boto3 honoured them -------------------------------------------------------------


@dataclass
class ForwardProxy:
    """An HTTP proxy on 127.0.0.1:0 that relays absolute-form requests and records them."""

    seen: list[tuple[str, str | None]] = field(default_factory=list)  # target, Proxy-Auth

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


def test_https_goes_through_a_connect_tunnel() -> None:
    environ = {"HTTPS_PROXY": "http://u:p@proxy.internal:3128", "NO_PROXY": "localhost"}
    endpoint = resolve_endpoint("models", "eu-west-1", environ)
    way = route(endpoint, environ)
    assert (way.host, way.port, way.tunnel, way.target_prefix) == (
        "proxy.internal",
        3128,
        True,
        "",
    )
    assert way.proxy_headers == {"Proxy-Authorization": "Basic dTpw"}
    assert route(endpoint, {}) == Route("models.s3.eu-west-1.amazonaws.com", 443)
