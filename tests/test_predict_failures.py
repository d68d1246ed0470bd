"""A predict function that raises, or answers what its declared response type refuses: a JSON
500 naming a request id whose log line has the error (and its traceback), on every path: HTTP
under `lazyserve serve`, HTTP events and direct invocations through the Lambda handler, SQS
records (that record fails alone). The function's own words never reach the answer."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from lazyserve import PredictFailed
from tests.helpers import (
    HTTP_EVENTS,
    WEIGHTS,
    body_of,
    header,
    load_event,
    serving,
    with_body,
)

SECRET = "boom: the secret internal detail"
ID = "8f14e45f-ceea-467f-a0e6-6a5d3f2e8a11"

# The function under test: `inputs` says what predict does. With `-> Response` an answer that is
# not a Response is refused; without an annotation only an answer that is not JSON is.
APP = """
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from handler.model import DigitsMLP
from lazyserve import Loaded, Service

service = Service(DigitsMLP)


class Request(BaseModel):
    inputs: Literal["ok", "raise", "mismatch", "object"]


class Response(BaseModel):
    label: int


@service.predict
def predict(model: Loaded[DigitsMLP], request: Request) -> Response:
    if request.inputs == "raise":
        raise RuntimeError("boom: the secret internal detail")
    if request.inputs == "mismatch":
        return {"label": "not a number"}
    if request.inputs == "object":
        return object()
    return Response(label=1)


app = service.app
handler = service.handler
"""
UNTYPED_APP = APP.replace(" -> Response:", ":")

Import = Callable[[str], ModuleType]


class Context:
    aws_request_id = ID


def predict_failed_body(request_id: str) -> dict[str, Any]:
    message = f"the predict function failed; the log has its error under request id {request_id}"
    return {"detail": {"error": "predict_failed", "message": message, "request_id": request_id}}


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lazyserve" and r.levelno >= logging.ERROR]


def assert_logged(caplog: pytest.LogCaptureFixture, kind: str, request_id: str = ID) -> None:
    """The one error line of lazyserve's: the request id and, for a raise, the traceback."""
    (record,) = errors(caplog)
    assert record.request_id == request_id  # type: ignore[attr-defined]
    if kind == "raise":
        assert record.getMessage() == "predict() raised RuntimeError"
        assert record.exc_info is not None and str(record.exc_info[1]) == SECRET
    elif kind == "object" and "fit its declared" not in record.getMessage():
        # No declared type (over HTTP): FastAPI's encoder raised while serialising the answer.
        assert record.getMessage() == "predict() raised ValueError"
        assert record.exc_info is not None
    else:
        assert record.getMessage().startswith(
            "predict() returned an answer that does not fit its declared response type (or is "
            "not JSON): "
        )


@pytest.fixture
def load_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Import]:
    """Import a function's source as a fresh module, as a new execution environment would."""
    monkeypatch.setenv("LAZYSERVE_MODEL_URI", str(WEIGHTS))
    loaded: list[ModuleType] = []

    def load(source: str) -> ModuleType:
        name = f"failing_app_{len(loaded)}"
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        loaded.append(module)
        return module

    yield load
    for module in loaded:
        module.service.close()
        sys.modules.pop(module.__name__, None)


# -- HTTP events through the Lambda handler -------------------------------------------------------


@pytest.mark.parametrize("event", HTTP_EVENTS)
@pytest.mark.parametrize(
    ("typed", "kind"), [(True, "raise"), (True, "mismatch"), (True, "object"), (False, "object")]
)
def test_an_http_event_gets_a_json_500_naming_the_invocations_id(
    load_app: Import, caplog: pytest.LogCaptureFixture, event: str, typed: bool, kind: str
) -> None:
    function = load_app(APP if typed else UNTYPED_APP)
    body = json.dumps({"inputs": kind}).encode()
    with caplog.at_level(logging.INFO):
        answer = function.handler(with_body(event, body), Context())
    assert answer["statusCode"] == 500
    assert header(answer, "content-type") == "application/json"
    assert body_of(answer) == predict_failed_body(ID)
    assert "secret" not in answer["body"] and "not a number" not in answer["body"]
    assert_logged(caplog, kind)
    # The environment serves the next request.
    ok = function.handler(with_body(event, b'{"inputs": "ok"}'), Context())
    assert (ok["statusCode"], body_of(ok)) == (200, {"label": 1})


def test_an_untyped_answer_that_is_json_is_sent(load_app: Import) -> None:
    function = load_app(UNTYPED_APP)
    answer = function.handler(with_body("http-api-predict", b'{"inputs": "mismatch"}'), None)
    assert (answer["statusCode"], body_of(answer)) == (200, {"label": "not a number"})


# -- direct invocations: raised for Lambda to report ----------------------------------------------


@pytest.mark.parametrize("kind", ["raise", "mismatch", "object"])
def test_a_direct_invocation_raises_predict_failed_naming_the_invocations_id(
    load_app: Import, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    function = load_app(APP)
    with caplog.at_level(logging.INFO), pytest.raises(PredictFailed) as info:
        function.handler({"inputs": kind}, Context())
    assert str(info.value) == predict_failed_body(ID)["detail"]["message"]
    assert info.value.request_id == ID
    assert isinstance(info.value.__cause__, RuntimeError if kind == "raise" else ValueError)
    assert_logged(caplog, kind)
    assert function.handler({"inputs": "ok"}, Context()) == {"label": 1}


def test_an_untyped_direct_answer_that_is_not_json_raises_predict_failed(
    load_app: Import, caplog: pytest.LogCaptureFixture
) -> None:
    function = load_app(UNTYPED_APP)
    with caplog.at_level(logging.INFO), pytest.raises(PredictFailed):
        function.handler({"inputs": "object"}, Context())
    assert_logged(caplog, "object")
    assert function.handler({"inputs": "mismatch"}, Context()) == {"label": "not a number"}


# -- SQS: the record fails alone -----------------------------------------------------------------


def test_an_sqs_record_whose_predict_fails_is_the_only_one_retried(
    load_app: Import, caplog: pytest.LogCaptureFixture
) -> None:
    function = load_app(APP)
    template = load_event("sqs-predict")["Records"][0]
    kinds = ["ok", "raise", "ok", "mismatch", "object", "ok"]
    records = [
        {**template, "messageId": f"m{i}", "body": json.dumps({"inputs": kind})}
        for i, kind in enumerate(kinds)
    ]
    with caplog.at_level(logging.INFO):
        answer = function.handler({"Records": records}, Context())
    assert answer == {"batchItemFailures": [{"itemIdentifier": m} for m in ("m1", "m3", "m4")]}
    # Each failure: one error line (with the traceback for the raise) and one warning naming
    # the message and the id the error is under.
    failed = [r for r in errors(caplog)]
    assert [r.message_id for r in failed] == ["m1", "m3", "m4"]  # type: ignore[attr-defined]
    assert failed[0].exc_info is not None and str(failed[0].exc_info[1]) == SECRET
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"SQS message {m} failed: {predict_failed_body(ID)['detail']['message']}"
        for m in ("m1", "m3", "m4")
    ]


# -- HTTP under `lazyserve serve` ------------------------------------------------------------------


def test_under_lazyserve_serve_the_answer_names_the_id_its_log_lines_carry(
    tmp_path: Path,
) -> None:
    (tmp_path / "failing_app.py").write_text(APP)
    with (
        serving("failing_app:app", cwd=tmp_path, LAZYSERVE_MODEL_URI=str(WEIGHTS)) as (url, log),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        for kind in ("raise", "mismatch"):
            response = client.post("/predict", json={"inputs": kind})
            assert response.status_code == 500
            assert response.headers["content-type"] == "application/json"
            request_id = response.json()["detail"]["request_id"]
            assert re.fullmatch(r"[0-9a-f]{32}", request_id)
            assert response.json() == predict_failed_body(request_id)
            assert "secret" not in response.text and "not a number" not in response.text
            if kind == "raise":
                log.wait_for(
                    rf"ERROR +lazyserve: predict\(\) raised RuntimeError .*request_id={request_id}",
                    30,
                )
                log.wait_for(r"^Traceback \(most recent call last\):$", 30)
                log.wait_for(f"^RuntimeError: {SECRET}$", 30)
            else:  # pydantic's lines, then the context fields
                log.wait_for(r"ERROR +lazyserve: predict\(\) returned an answer that does not", 30)
                log.wait_for(f"request_id={request_id}", 30)
        assert client.post("/predict", json={"inputs": "ok"}).json() == {"label": 1}
