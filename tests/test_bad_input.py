"""Bad input, hand-written: what tests/test_app.py and tests/test_aws.py do not already send.

Over HTTP in-process, as direct invocations, through every HTTP event type (base64 and plain
bodies) and through a real uvicorn: always a JSON 422 (or 413) naming the problem, or an
InvalidInput naming the row and the rule; never an exception escaping, a 400 or a 500."""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

from lazyserve.error_handlers import MAX_ERRORS
from lazyserve.errors import InvalidInput
from tests.helpers import (
    DIGIT_8,
    FAKE_CREDENTIALS,
    HTTP_EVENTS,
    MAX_BODY,
    WEIGHTS,
    ImportHandler,
    UvicornProcess,
    asgi_client,
    assert_prediction_shape,
    body_of,
    event_with,
    header,
)

RULES = "1 to 256 rows, each exactly 64 finite numbers in 0..16"
ONES = ",".join(["1"] * 64)


def body_with(token: str, column: int = 5) -> bytes:
    """Two rows of 64 numbers; row 1, `column` holds `token` (raw JSON text)."""
    cells = ["1"] * 64
    cells[column] = token
    return ('{"inputs": [[' + ONES + "], [" + ",".join(cells) + "]]}").encode()


def rows(count: int, width: int = 64) -> bytes:
    row = "[" + ",".join(["1"] * width) + "]"
    return ('{"inputs": [' + ",".join([row] * count) + "]}").encode()


CELL = ["body", "inputs", 1, 5]
JSON = "application/json"

# name: (body, content type, the loc one error must start with)
BAD_BODIES: dict[str, tuple[bytes, str, list[Any]]] = {
    # wrong content type (text/plain is in test_app.py)
    "form-urlencoded": (b"inputs=1&inputs=2", "application/x-www-form-urlencoded", ["body"]),
    "multipart": (
        b'--b\r\nContent-Disposition: form-data; name="inputs"\r\n\r\n1\r\n--b--\r\n',
        "multipart/form-data; boundary=b",
        ["body"],
    ),
    "json-labelled-xml": (rows(1), "application/xml", ["body"]),
    # not JSON (truncated JSON and an empty body are in test_app.py)
    "latin-1-bytes": ('{"inputs": "é"}'.encode("latin-1"), JSON, ["body"]),
    "lone-surrogate-escape": (b'{"inputs": "\\ud800"}', JSON, ["body", "inputs"]),
    "trailing-garbage": (rows(1) + b" xyz", JSON, ["body"]),
    "single-quotes": (b"{'inputs': [[1]]}", JSON, ["body"]),
    "control-character": (b'{"inputs": "\x00"}', JSON, ["body"]),
    "top-level-string": (b'"inputs"', JSON, ["body"]),
    "top-level-array": (b"[[" + ONES.encode() + b"]]", JSON, ["body"]),
    "top-level-null": (b"null", JSON, ["body"]),
    "top-level-number": (b"5", JSON, ["body"]),
    "empty-object": (b"{}", JSON, ["body", "inputs"]),
    # huge numbers (1e400 is in test_app.py)
    "1e308": (body_with("1e308"), JSON, CELL),
    "-1e308": (body_with("-1e308"), JSON, CELL),
    "-1e400": (body_with("-1e400"), JSON, CELL),
    "10**400-integer": (body_with("1" + "0" * 400), JSON, CELL),
    "10**5000-integer": (body_with("1" + "0" * 5000), JSON, ["body"]),
    "5000-digit-float": (body_with("1" + "0" * 5000 + ".5"), JSON, CELL),
    # NaN and infinities (NaN, Infinity, -Infinity in a cell are in test_app.py)
    "NaN-first-cell": (body_with("NaN", column=0), JSON, ["body", "inputs", 1, 0]),
    "inputs-is-NaN": (b'{"inputs": NaN}', JSON, ["body", "inputs"]),
    "lowercase-nan": (body_with("nan"), JSON, ["body"]),
    "inf-literal": (body_with("inf"), JSON, ["body"]),
    # batch sizes (0 and 257 rows are in test_app.py)
    "1000-rows": (rows(1000), JSON, ["body", "inputs"]),
    "row-256-of-256-bad": (
        ('{"inputs": [' + ",".join([f"[{ONES}]"] * 255) + ",[17" + ",1" * 63 + "]]}").encode(),
        JSON,
        ["body", "inputs", 255, 0],
    ),
    # row widths (63 and 65 are in test_app.py)
    "row-of-0": (rows(1, width=0), JSON, ["body", "inputs", 0]),
    "row-of-128": (rows(1, width=128), JSON, ["body", "inputs", 0]),
    # types (true, null and "5" in a cell are in test_app.py)
    "false": (body_with("false"), JSON, CELL),
    "string-abc": (body_with('"abc"'), JSON, CELL),
    "empty-string": (body_with('""'), JSON, CELL),
    "object-in-cell": (body_with('{"a": 1}'), JSON, CELL),
    "list-in-cell": (body_with("[1]"), JSON, CELL),
    "row-is-null": (b'{"inputs": [null]}', JSON, ["body", "inputs", 0]),
    "row-is-object": (b'{"inputs": [{"a": 1}]}', JSON, ["body", "inputs", 0]),
    "inputs-is-null": (b'{"inputs": null}', JSON, ["body", "inputs"]),
    "inputs-is-object": (b'{"inputs": {"0": [1]}}', JSON, ["body", "inputs"]),
    # nesting (100,000 levels of lists are in test_app.py)
    "lists-500-deep": (b'{"inputs": ' + b"[" * 500 + b"]" * 500 + b"}", JSON, ["body", "inputs"]),
    "objects-100000-deep": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, JSON, ["body"]),
    "cell-100000-deep": (body_with("[" * 100_000 + "]" * 100_000), JSON, ["body"]),
    # a body just under the limit whose 422 must still fit Lambda's 6 MB response limit
    "6-MiB-string": (b'{"inputs": "' + b"x" * (MAX_BODY - 20) + b'"}', JSON, ["body", "inputs"]),
}

# Unusual but valid: served, not refused.
ACCEPTED: dict[str, tuple[bytes, str]] = {
    "json-with-charset": (rows(1), "application/json; charset=utf-8"),
    "vendor-json-type": (rows(1), "application/vnd.api+json"),
    "1e-400-underflows-to-0": (body_with("1e-400"), JSON),
}


@pytest.fixture
def mod(import_handler: ImportHandler) -> ModuleType:
    """The reference function with the committed weights (no S3: bad input never loads)."""
    return import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))


@pytest.fixture
async def client(mod: ModuleType) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(mod) as http:
        yield http


def assert_422(status: int, content_type: str | None, raw: bytes, loc: list[Any]) -> None:
    """FastAPI's 422, JSON, naming `loc`, small enough for a Lambda response."""
    assert status == 422, raw[:300]
    assert content_type == JSON
    # Lambda refuses responses over 6 MB: API Gateway would answer 502 instead of this 422.
    assert len(raw) <= MAX_BODY, f"the 422 is {len(raw)} bytes"
    detail = json.loads(raw)["detail"]
    assert isinstance(detail, list) and detail
    assert any(error["loc"][: len(loc)] == loc for error in detail), detail[:3]
    assert all(isinstance(error["msg"], str) and error["msg"] for error in detail)


# --- HTTP, in-process -----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("case", BAD_BODIES)
async def test_bad_body_is_a_json_422_naming_the_field(
    client: httpx.AsyncClient, mod: ModuleType, case: str
) -> None:
    body, content_type, loc = BAD_BODIES[case]
    response = await client.post("/predict", content=body, headers={"content-type": content_type})
    assert_422(response.status_code, response.headers.get("content-type"), response.content, loc)
    assert mod.service.model.loads_started == 0  # a bad body never starts a load


@pytest.mark.anyio
@pytest.mark.parametrize("case", ACCEPTED)
async def test_unusual_but_valid_body_is_served(client: httpx.AsyncClient, case: str) -> None:
    body, content_type = ACCEPTED[case]
    response = await client.post("/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == 200, response.text[:300]
    assert_prediction_shape(response.json(), body.count(b"[") - 1)


# --- direct invocations ---------------------------------------------------------------------------

ROW = [1.0] * 64


def _cell(value: Any, row: int = 1, column: int = 7) -> dict[str, Any]:
    payload: list[list[Any]] = [list(ROW), list(ROW)]
    payload[row][column] = value
    return {"inputs": payload}


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


# name: (payload, where the message must point); test_aws.py has 13 others
DIRECT_INVALID: dict[str, tuple[Any, str]] = {
    "1e308": (_cell(1e308), "inputs[1][7]"),
    "-1e308": (_cell(-1e308), "inputs[1][7]"),
    "-inf": (_cell(float("-inf")), "inputs[1][7]"),
    "10**400-integer": (_cell(10**400), "inputs[1][7]"),
    "false": (_cell(False), "inputs[1][7]"),
    "string-abc": (_cell("abc"), "inputs[1][7]"),
    "object-in-cell": (_cell({"a": 1}), "inputs[1][7]"),
    "list-in-cell": (_cell([1]), "inputs[1][7]"),
    "row-is-null": ({"inputs": [ROW, None]}, "inputs[1]"),
    "row-is-object": ({"inputs": [{"a": 1}]}, "inputs[0]"),
    "inputs-is-null": ({"inputs": None}, "inputs"),
    "inputs-is-object": ({"inputs": {"0": ROW}}, "inputs"),
    "row-of-0": ({"inputs": [[]]}, "inputs[0]"),
    "row-of-128": ({"inputs": [ROW * 2]}, "inputs[0]"),
    "1000-rows": ({"inputs": [ROW] * 1000}, "inputs"),
    "row-256-of-256-bad": ({"inputs": [ROW] * 255 + [[17.0, *ROW[1:]]]}, "inputs[255][0]"),
    "lists-500-deep": ({"inputs": _nested(500)}, "inputs[0]"),
    "6-MiB-string": ({"inputs": "x" * MAX_BODY}, "inputs"),
}


@pytest.mark.parametrize("case", DIRECT_INVALID)
def test_direct_invalid_payload_raises_invalid_input_naming_row_and_rule(
    mod: ModuleType, case: str
) -> None:
    payload, where = DIRECT_INVALID[case]
    with pytest.raises(InvalidInput) as info:
        mod.handler(payload, None)
    assert type(info.value).__name__ == "InvalidInput"
    message = str(info.value)
    assert where in message, message[:300]
    assert message.endswith(f"Accepted: inputs: {RULES}"), message[-200:]
    assert len(message) < 2000  # Lambda's error payload carries it; no echo of the input
    assert mod.service.model.loads_started == 0


def test_direct_invocation_at_the_limits_is_served(mod: ModuleType) -> None:
    # 256 rows of the boundary values and 1e-400 (0.0 once parsed): served.
    payload = {"inputs": [[0.0] * 32 + [16.0] * 32] * 255 + [[1e-400] * 64]}
    result = mod.handler(payload, None)
    assert len(result["predictions"]) == 256
    json.dumps(result, allow_nan=False)


# --- every HTTP event type, base64 and plain bodies -----------------------------------------------

EVENT_BODIES = [
    "json-labelled-xml",
    "latin-1-bytes",
    "lone-surrogate-escape",
    "trailing-garbage",
    "-1e400",
    "10**400-integer",
    "10**5000-integer",
    "NaN-first-cell",
    "1000-rows",
    "row-of-128",
    "false",
    "object-in-cell",
    "lists-500-deep",
    "objects-100000-deep",
]


def _encodings(case: str) -> list[bool]:
    # A plain event body is text; bodies that are not UTF-8 only travel base64.
    try:
        BAD_BODIES[case][0].decode()
    except UnicodeDecodeError:
        return [True]
    return [True, False]


EVENT_CASES = [
    pytest.param(name, case, b64, id=f"{name}-{case}-{'base64' if b64 else 'plain'}")
    for name in HTTP_EVENTS
    for case in EVENT_BODIES
    for b64 in _encodings(case)
]


@pytest.mark.parametrize(("name", "case", "b64"), EVENT_CASES)
def test_http_event_with_bad_body_answers_a_json_422(
    mod: ModuleType, name: str, case: str, b64: bool
) -> None:
    body, content_type, loc = BAD_BODIES[case]
    event = event_with(name, body, content_type if content_type != JSON else None, b64=b64)
    response = mod.handler(event, None)  # an HTTP answer, never an exception
    raw = response["body"]
    raw = base64.b64decode(raw) if response.get("isBase64Encoded") else raw.encode()
    assert_422(response["statusCode"], header(response, "content-type"), raw, loc)
    assert mod.service.model.loads_started == 0


@pytest.mark.parametrize("b64", [True, False], ids=["base64", "plain"])
@pytest.mark.parametrize("name", HTTP_EVENTS)
def test_http_event_with_a_text_plain_body_answers_422(
    mod: ModuleType, name: str, b64: bool
) -> None:
    event = event_with(name, json.dumps({"inputs": [DIGIT_8]}).encode(), "text/plain", b64=b64)
    response = mod.handler(event, None)
    assert response["statusCode"] == 422, response
    assert body_of(response)["detail"][0]["loc"] == ["body"]


# --- a real uvicorn: the 413 comes before the body ------------------------------------------------


@pytest.fixture(scope="module")
def uvicorn_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One uvicorn process on 127.0.0.1 serving the committed weights, for this module."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAZYSERVE_"))}
    env.update(FAKE_CREDENTIALS)
    env.update(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_LOG_LEVEL="WARNING")
    server = UvicornProcess(env, Path(tmp_path_factory.mktemp("uvicorn")) / "uvicorn.log")
    try:
        server.wait_healthy()
        yield server.url
    finally:
        server.stop()


def exchange(url: str, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a raw request (head, then `body`, possibly less than announced) and read the answer
    without sending anything more: the server must answer on what it has."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head_end = data.index(b"\r\n\r\n")
        lines = data[:head_end].decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        content = data[head_end + 4 :]
        while len(content) < int(headers.get("content-length", "0")):
            chunk = sock.recv(65536)
            assert chunk
            content += chunk
    return int(lines[0].split()[1]), headers, content


@pytest.mark.parametrize("announced", [MAX_BODY + 1, 7 * 1024 * 1024, 10**12])
def test_uvicorn_answers_413_on_the_content_length_before_the_body(
    uvicorn_url: str, announced: int
) -> None:
    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {announced}\r\n\r\n"
    ).encode()
    # 1 KiB of the announced body is sent; the answer arrives anyway (the socket never sends more).
    status, headers, content = exchange(uvicorn_url, head, b" " * 1024)
    assert status == 413
    assert headers["content-type"] == JSON
    assert json.loads(content) == {"detail": f"the request body is larger than {MAX_BODY} bytes"}


@pytest.mark.parametrize("case", ["lone-surrogate-escape", "lists-500-deep", "10**5000-integer"])
def test_uvicorn_answers_422_for_bodies_that_break_the_error_handler(
    uvicorn_url: str, case: str
) -> None:
    body, content_type, loc = BAD_BODIES[case]
    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    status, headers, content = exchange(uvicorn_url, head, body)
    assert_422(status, headers.get("content-type"), content, loc)


@pytest.mark.anyio
async def test_a_body_with_thousands_of_errors_gets_a_bounded_422(
    client: httpx.AsyncClient,
) -> None:
    # 256 rows x 64 out-of-range numbers: 16,384 validation errors in a 49 KB body.
    body = json.dumps({"inputs": [[99] * 64] * 256}).encode()
    response = await client.post("/predict", content=body)
    assert response.status_code == 422
    assert len(response.content) < 8 * 1024
    detail = response.json()["detail"]
    assert len(detail) == MAX_ERRORS + 1
    assert detail[0]["loc"] == ["body", "inputs", 0, 0]
    assert detail[0]["type"] == "less_than_equal"
    assert detail[-1] == {
        "type": "too_many_errors",
        "loc": ["body"],
        "msg": f"{256 * 64 - MAX_ERRORS} more errors not listed (at most {MAX_ERRORS} are)",
    }


@pytest.mark.anyio
async def test_health_answers_while_bad_bodies_are_answered(client: httpx.AsyncClient) -> None:
    body = json.dumps({"inputs": [[99] * 64] * 256}).encode()
    statuses: list[int] = []

    async def bad() -> None:
        statuses.append((await client.post("/predict", content=body)).status_code)

    async def health() -> None:
        statuses.append((await client.get("/health")).status_code)

    async with anyio.create_task_group() as group:
        for _ in range(8):
            group.start_soon(bad)
            group.start_soon(health)
    assert sorted(statuses) == [200] * 8 + [422] * 8


@pytest.mark.anyio
async def test_a_body_not_sent_as_json_says_which_header_to_send(
    import_handler: ImportHandler,
) -> None:
    # What `curl -d '{...}'` without -H sends: the JSON arrives as a form.
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    async with asgi_client(mod) as client:
        response = await client.post(
            "/predict",
            content=json.dumps({"inputs": [[0] * 64]}),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert response.status_code == 422
    (hint,) = [d for d in response.json()["detail"] if d["type"] == "content_type"]
    assert hint == {
        "type": "content_type",
        "loc": ["header", "content-type"],
        "msg": "the body was sent as application/x-www-form-urlencoded; send JSON with the "
        "header content-type: application/json (curl: -H 'content-type: application/json')",
    }
