"""docs/deploy.md, held to the template and to AWS's request signing: its Python example runs
against a local server that recomputes the SigV4 signature, its parameter table lists every
template parameter with its default, and its commands name only parameters that exist."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cfnlint.decode import decode  # type: ignore[import-untyped]

from tests.helpers import ROOT

DOC = ROOT / "docs" / "deploy.md"
REGION = "eu-west-1"
KEY_ID = "AKIDEXAMPLEDOCS00000"
SECRET = "docs/example/secret/key/never/a/real/one/0000"
AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[A-Z0-9]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)"
    r"/(?P<service>[a-z-]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<signature>[0-9a-f]{64})"
)
ANSWER = {"predictions": [{"label": 8, "probabilities": [0.1] * 10}], "model": {"sha256": "ab"}}


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", DOC.read_text(), re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def parameters() -> dict[str, Any]:
    decoded, problems = decode(str(ROOT / "template.yaml"))
    assert not problems, [str(p) for p in problems]
    declared: dict[str, Any] = decoded["Parameters"]
    return declared


class Received:
    """What the local endpoint got, and whether the signature was AWS's for those bytes."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []


def verify(method: str, url: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """Recompute the SigV4 signature from what arrived (header names in lower case), as the
    service would."""
    match = AUTHORIZATION.fullmatch(headers.get("authorization", ""))
    assert match, f"no SigV4 Authorization header: {headers.get('authorization')!r}"
    signed = match["signed"].split(";")
    request = AWSRequest(
        method=method, url=url, data=body, headers={name: headers[name] for name in signed}
    )
    request.context["timestamp"] = headers["x-amz-date"]
    token = headers.get("x-amz-security-token")
    auth = SigV4Auth(Credentials(KEY_ID, SECRET, token), match["service"], match["region"])
    expected = auth.signature(
        auth.string_to_sign(request, auth.canonical_request(request)), request
    )
    return {**match.groupdict(), "signed": signed, "valid": expected == match["signature"]}


@pytest.fixture
def endpoint() -> Iterator[tuple[str, Received]]:
    """An HTTP server on 127.0.0.1 that answers like the API once it has checked the
    signature, and 403 otherwise."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {name.lower(): value for name, value in self.headers.items()}
            url = f"http://{self.headers['Host']}{self.path}"
            try:
                check = verify("POST", url, headers, body)
            except AssertionError as exc:
                check = {"valid": False, "error": str(exc)}
            received.requests.append(
                {"path": self.path, "headers": headers, "body": body, "check": check}
            )
            answer = json.dumps(ANSWER if check["valid"] else {"message": "Forbidden"}).encode()
            self.send_response(200 if check["valid"] else 403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("session_token", [None, "docs-example-session-token"])
def test_the_python_example_sends_a_request_signed_for_execute_api(
    endpoint: tuple[str, Received], tmp_path: Path, session_token: str | None
) -> None:
    (snippet,) = [block for block in fenced_blocks("python") if "SigV4Auth" in block]
    api_url, received = endpoint
    # Only what a user's shell would hold: the stack's URL and region, and credentials.
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "API_URL": api_url,
        "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
    }
    if session_token:
        env["AWS_SESSION_TOKEN"] = session_token
    done = subprocess.run(
        [sys.executable, "-c", snippet],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert ast.literal_eval(done.stdout.strip()) == ANSWER

    (request,) = received.requests
    check = request["check"]
    assert check["valid"], check
    assert (check["key"], check["region"], check["service"]) == (KEY_ID, REGION, "execute-api")
    assert check["date"] == request["headers"]["x-amz-date"][:8]
    expected_signed = {"content-type", "host", "x-amz-date"}
    if session_token:
        expected_signed.add("x-amz-security-token")
        assert request["headers"]["x-amz-security-token"] == session_token
    assert set(check["signed"]) == expected_signed
    assert request["path"] == "/predict"
    assert request["headers"]["content-type"] == "application/json"
    (row,) = json.loads(request["body"])["inputs"]
    assert len(row) == 64 and all(0 <= value <= 16 for value in row)


def test_a_request_altered_after_signing_is_refused() -> None:
    # The endpoint really checks: the same signature over another body does not pass.
    url = "http://127.0.0.1:9/predict"
    request = AWSRequest("POST", url, data=b'{"inputs": [[0]]}', headers={"Content-Type": "x"})
    SigV4Auth(Credentials(KEY_ID, SECRET), "execute-api", REGION).add_auth(request)
    headers = {name.lower(): value for name, value in request.headers.items()}
    headers["host"] = url.split("/")[2]
    assert verify("POST", url, headers, b'{"inputs": [[0]]}')["valid"] is True
    check = verify("POST", url, headers, b"{}")
    assert check["valid"] is False


def test_every_parameter_is_documented_with_its_default(parameters: dict[str, Any]) -> None:
    text = DOC.read_text()
    table = text[text.index("### Parameters") :].split("\n\n")[1]
    rows = {}
    for line in table.splitlines()[2:]:
        name, default, meaning = (cell.strip() for cell in line.strip("|").split(" | ", 2))
        assert meaning, name
        rows[name.strip("`")] = default
    assert list(rows) == list(parameters), "same parameters, in the template's order"
    for name, declared in parameters.items():
        if "Default" not in declared:
            expected = "required"
        elif declared["Default"] == "":
            expected = "empty"
        else:
            expected = f"`{declared['Default']}`"
        assert rows[name] == expected, name


def test_the_commands_name_only_template_parameters(parameters: dict[str, Any]) -> None:
    overrides = [
        match
        for block in fenced_blocks("bash")
        for command in block.split("sam deploy")[1:]
        for match in re.findall(r"\b([A-Z][A-Za-z0-9]+)=", command.split("\ncurl")[0])
    ]
    assert {"ModelBucket", "ModelKey", "ApiAuth", "JwtIssuer", "JwtAudience"} <= set(overrides)
    assert set(overrides) <= parameters.keys()


def test_the_shell_examples_sign_for_the_right_service_and_send_a_valid_body() -> None:
    shell = "\n".join(fenced_blocks("bash"))
    (body,) = re.findall(r"^BODY='(.*)'$", shell, re.MULTILINE)
    (row,) = json.loads(body)["inputs"]
    assert len(row) == 64 and all(0 <= value <= 16 for value in row)
    (awscurl,) = [line for line in shell.splitlines() if line.startswith("awscurl")]
    assert '--service execute-api --region "$AWS_REGION" -X POST' in awscurl
