"""The Lambda entry point `handler.app.handler(event, context)`, driven directly with the stored
events (as Mangum's own tests do), the model loaded from moto's S3 server over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import pytest

from lazyserve.errors import InvalidInput, ModelUnavailable, UnsupportedEvent
from tests.helpers import (
    ACCESS_DENIED,
    BUCKET,
    DIGIT_8,
    KEY,
    PART_SIZE,
    PARTS,
    SLOW_DOWN,
    WEIGHTS_BYTES,
    WEIGHTS_SHA256,
    ImportHandler,
    assert_label_8,
    assert_prediction_shape,
    assert_unavailable,
    body_of,
    failing_gets,
    header,
    held_out_digits,
    load_event,
    s3_uri,
    weights_gets,
    with_body,
    with_path,
)
from tests.s3server import CountingS3Server

HTTP_PREDICT_EVENTS = ["rest-predict", "http-api-predict", "alb-predict", "function-url-predict"]
HTTP_HEALTH_EVENTS = ["rest-health", "http-api-health"]


@pytest.fixture
def mod(s3: CountingS3Server, import_handler: ImportHandler) -> ModuleType:
    """A fresh execution environment: handler.app imported, lazy load from moto's S3."""
    return import_handler(LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_S3_PART_SIZE=str(PART_SIZE))


# --- the stored events ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", HTTP_PREDICT_EVENTS)
def test_http_predict_event_answers_label_8(
    name: str, s3: CountingS3Server, mod: ModuleType
) -> None:
    assert_label_8(mod.handler(load_event(name), None))
    assert weights_gets(s3) == PARTS


@pytest.mark.parametrize("name", HTTP_HEALTH_EVENTS)
def test_http_health_event_answers_without_loading(
    name: str, s3: CountingS3Server, mod: ModuleType
) -> None:
    response = mod.handler(load_event(name), None)
    assert response["statusCode"] == 200, response
    assert body_of(response) == {"status": "ok", "model": "not_loaded"}
    assert weights_gets(s3) == 0

    mod.handler(load_event("warmup"), None)
    response = mod.handler(load_event(name), None)
    assert body_of(response) == {"status": "ok", "model": "loaded"}


def test_direct_predict_returns_the_same_json_as_post_predict(mod: ModuleType) -> None:
    direct = mod.handler(load_event("direct-predict"), None)
    over_http = body_of(mod.handler(load_event("function-url-predict"), None))
    assert direct == over_http
    assert_prediction_shape(direct, 1)
    assert direct["predictions"][0]["label"] == 8
    json.dumps(direct)  # what Lambda does with the return value


def test_direct_predict_classifies_real_digits(mod: ModuleType) -> None:
    rows, labels = held_out_digits(20)
    result = mod.handler({"inputs": rows}, None)
    assert_prediction_shape(result, 20)
    right = sum(p["label"] == y for p, y in zip(result["predictions"], labels, strict=True))
    assert right >= 19


@pytest.mark.parametrize("name", ["warmup", "empty"])
def test_warmup_event_loads_the_model(name: str, s3: CountingS3Server, mod: ModuleType) -> None:
    result = mod.handler(load_event(name), None)
    assert result["warm"] is True
    assert result["model"]["sha256"] == WEIGHTS_SHA256
    assert result["model"]["size_bytes"] == len(WEIGHTS_BYTES)
    assert result["model"]["uri"] == s3_uri()
    json.dumps(result)
    assert weights_gets(s3) == PARTS
    # A second ping finds the model loaded.
    assert mod.handler(load_event(name), None)["model"]["sha256"] == WEIGHTS_SHA256
    assert weights_gets(s3) == PARTS
    assert mod.service.model.loads_started == 1


def test_direct_invalid_event_raises_invalid_input(mod: ModuleType) -> None:
    with pytest.raises(InvalidInput) as info:
        mod.handler(load_event("direct-invalid"), None)
    assert type(info.value).__name__ == "InvalidInput"  # Lambda's errorType
    message = str(info.value)
    assert "inputs[0]" in message
    assert "64" in message
    assert "1 to 256 rows, each exactly 64 finite numbers in 0..16" in message


def test_s3_notification_raises_unsupported_event_naming_the_accepted_shapes(
    mod: ModuleType,
) -> None:
    with pytest.raises(UnsupportedEvent) as info:
        mod.handler(load_event("s3-put"), None)
    assert type(info.value).__name__ == "UnsupportedEvent"
    message = str(info.value)
    assert "Records" in message
    for shape in ("API Gateway REST", "HTTP API", "Function URL", "ALB", '{"inputs"', "warmup"):
        assert shape in message, (shape, message)


@pytest.mark.parametrize(
    "event", [[1, 2, 3], "hello", None, 42], ids=["list", "str", "None", "int"]
)
def test_non_dict_event_raises_unsupported_event(event: Any, mod: ModuleType) -> None:
    with pytest.raises(UnsupportedEvent) as info:
        mod.handler(event, None)
    assert type(event).__name__ in str(info.value)
    assert "warmup" in str(info.value)


@pytest.mark.parametrize(
    "event",
    [{"warmup": False}, {"warmup": True, "extra": 1}, {"hello": "world"}],
    ids=["warmup-false", "warmup-plus-key", "unknown-key"],
)
def test_other_dict_events_raise_unsupported_event(event: Any, mod: ModuleType) -> None:
    with pytest.raises(UnsupportedEvent):
        mod.handler(event, None)
    assert mod.service.model.loads_started == 0


# --- one load per execution environment -----------------------------------------------------------


def test_twenty_mixed_invocations_make_exactly_one_load(
    s3: CountingS3Server, mod: ModuleType
) -> None:
    names = [
        "rest-health", "http-api-predict", "direct-predict", "warmup", "rest-predict",
        "alb-predict", "empty", "function-url-predict", "http-api-health", "direct-predict",
    ] * 2  # fmt: skip
    for name in names:
        result = mod.handler(load_event(name), None)
        if name.endswith("-predict") and name != "direct-predict":
            assert_label_8(result)
        elif name.endswith("-health"):
            assert result["statusCode"] == 200
        elif name == "direct-predict":
            assert result["predictions"][0]["label"] == 8
        else:
            assert result["warm"] is True
    # Invalid events in the same environment neither load nor break later invocations.
    with pytest.raises(UnsupportedEvent):
        mod.handler(load_event("s3-put"), None)
    with pytest.raises(InvalidInput):
        mod.handler(load_event("direct-invalid"), None)
    assert_label_8(mod.handler(load_event("http-api-predict"), None))

    assert weights_gets(s3) == PARTS
    assert mod.service.model.loads_started == 1
    meta = body_of(mod.handler(with_path("http-api-health", "/model"), None))
    assert meta["loads"] == 1


# --- direct invocations that break the input rules ------------------------------------------------

ROW = [1.0] * 64


def _bad_value(value: Any, row: int = 1, column: int = 7) -> dict[str, Any]:
    rows: list[list[Any]] = [list(ROW), list(ROW), list(ROW)]
    rows[row][column] = value
    return {"inputs": rows}


DIRECT_INVALID: dict[str, tuple[Any, str]] = {
    # name: (payload, what the message must name)
    "row-of-65": ({"inputs": [ROW, [*ROW, 1.0]]}, "inputs[1]"),
    "row-of-63": ({"inputs": [ROW[:63]]}, "inputs[0]"),
    "zero-rows": ({"inputs": []}, "inputs"),
    "257-rows": ({"inputs": [ROW] * 257}, "inputs"),
    "nan": (_bad_value(float("nan")), "inputs[1][7]"),
    "inf": (_bad_value(float("inf")), "inputs[1][7]"),
    "16.5": (_bad_value(16.5), "inputs[1][7]"),
    "-0.5": (_bad_value(-0.5), "inputs[1][7]"),
    "string": (_bad_value("5"), "inputs[1][7]"),
    "none": (_bad_value(None), "inputs[1][7]"),
    "bool": (_bad_value(True), "inputs[1][7]"),
    "inputs-not-a-list": ({"inputs": "0,0,0"}, "inputs"),
    "row-not-a-list": ({"inputs": [5]}, "inputs[0]"),
}


@pytest.mark.parametrize("case", DIRECT_INVALID)
def test_direct_invalid_payload_raises_invalid_input(
    case: str, s3: CountingS3Server, mod: ModuleType
) -> None:
    payload, where = DIRECT_INVALID[case]
    with pytest.raises(InvalidInput) as info:
        mod.handler(payload, None)
    assert type(info.value).__name__ == "InvalidInput"
    message = str(info.value)
    assert where in message, message
    assert "1 to 256 rows, each exactly 64 finite numbers in 0..16" in message
    # A bad payload is refused before any S3 traffic.
    assert weights_gets(s3) == 0


# --- HTTP events with bad bodies: an HTTP answer, not a Lambda error ------------------------------

BAD_HTTP_BODIES: dict[str, tuple[bytes, list[Any]]] = {
    "not-json": (b'{"inputs": [[1, 2', ["body"]),
    "not-utf8": (b"\xff\xfe\x00garbage", ["body"]),
    "row-of-3": (b'{"inputs": [[1, 2, 3]]}', ["body", "inputs", 0]),
    "NaN-token": (b'{"inputs": [[NaN' + b", 1" * 63 + b"]]}", ["body", "inputs", 0, 0]),
}


@pytest.mark.parametrize("name", ["http-api-predict", "rest-predict", "alb-predict"])
@pytest.mark.parametrize("case", BAD_HTTP_BODIES)
def test_http_event_with_bad_base64_body_answers_422(name: str, case: str, mod: ModuleType) -> None:
    body, loc = BAD_HTTP_BODIES[case]
    response = mod.handler(with_body(name, body), None)
    assert response["statusCode"] == 422, response
    assert header(response, "content-type") == "application/json"
    detail = body_of(response)["detail"]
    assert any(error["loc"][: len(loc)] == loc for error in detail), detail


def test_http_event_with_plain_text_body_answers(mod: ModuleType) -> None:
    event = with_body("http-api-predict", json.dumps({"inputs": [DIGIT_8]}).encode(), b64=False)
    assert_label_8(mod.handler(event, None))


# --- a failed S3 read, then recovery --------------------------------------------------------------


def test_failed_s3_read_raises_on_warmup_answers_503_over_http_then_recovers(
    s3: CountingS3Server, mod: ModuleType
) -> None:
    s3.fault = failing_gets(*SLOW_DOWN)
    with pytest.raises(ModelUnavailable) as info:
        mod.handler(load_event("warmup"), None)
    assert type(info.value).__name__ == "ModelFetchError"
    assert "SlowDown" in str(info.value)
    assert f"s3://{BUCKET}/{KEY}" in str(info.value)

    response = mod.handler(load_event("http-api-predict"), None)
    assert header(response, "content-type") == "application/json"
    assert_unavailable(
        response["statusCode"],
        {k.lower(): v for k, v in (response.get("headers") or {}).items()},
        body_of(response),
        BUCKET,
        KEY,
        "SlowDown",
    )
    with pytest.raises(ModelUnavailable):
        mod.handler(load_event("direct-predict"), None)
    health = body_of(mod.handler(load_event("rest-health"), None))
    assert health == {"status": "ok", "model": "failed"}

    s3.fault = None
    s3.clear()
    assert_label_8(mod.handler(load_event("rest-predict"), None))
    assert weights_gets(s3) == PARTS
    assert mod.handler(load_event("direct-predict"), None)["predictions"][0]["label"] == 8
    assert mod.service.model.loads_started == 4  # three failed attempts, one success
    assert weights_gets(s3) == PARTS


def test_rest_event_503_carries_retry_after(s3: CountingS3Server, mod: ModuleType) -> None:
    s3.fault = failing_gets(*SLOW_DOWN)
    response = mod.handler(load_event("rest-predict"), None)
    assert response["statusCode"] == 503
    assert header(response, "retry-after") == "5"
    assert body_of(response)["detail"]["error"] == "model_unavailable"


def test_rest_event_for_a_model_that_cannot_load_is_a_500_without_retry_after(
    s3: CountingS3Server, mod: ModuleType
) -> None:
    s3.fault = failing_gets(*ACCESS_DENIED)
    response = mod.handler(load_event("rest-predict"), None)
    assert response["statusCode"] == 500
    assert header(response, "retry-after") is None
    assert body_of(response)["detail"]["error"] == "model_unloadable"
    s3.clear()
    assert mod.handler(load_event("rest-predict"), None)["statusCode"] == 500
    assert weights_gets(s3) == 0  # remembered: not tried again by each request


# --- LAZYSERVE_LOAD at INIT -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {"LAZYSERVE_LOAD": "eager"},
        {"AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start"},
        {"LAZYSERVE_LOAD": "lazy", "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start"},
    ],
    ids=["eager", "snap-start", "snap-start-overrides-lazy"],
)
def test_eager_load_happens_during_init(
    environ: dict[str, str],
    s3: CountingS3Server,
    import_handler: ImportHandler,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    mod = import_handler(LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_S3_PART_SIZE=str(PART_SIZE))
    # Loaded before the first invocation (the snapshot, or INIT, holds the model).
    assert mod.service.model.status == "loaded"
    assert weights_gets(s3) == PARTS
    assert_label_8(mod.handler(load_event("http-api-predict"), None))
    assert weights_gets(s3) == PARTS
    assert mod.service.model.loads_started == 1


def test_background_load_starts_during_init(
    s3: CountingS3Server, import_handler: ImportHandler
) -> None:
    mod = import_handler(
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),
        LAZYSERVE_LOAD="background",
    )
    assert mod.service.model.loads_started == 1  # started at import, without any invocation
    assert_label_8(mod.handler(load_event("http-api-predict"), None))
    assert mod.handler(load_event("direct-predict"), None)["predictions"][0]["label"] == 8
    assert weights_gets(s3) == PARTS
    assert mod.service.model.loads_started == 1


def test_eager_load_that_fails_does_not_fail_init_and_is_retried(
    s3: CountingS3Server, import_handler: ImportHandler
) -> None:
    s3.fault = failing_gets(*SLOW_DOWN)
    mod = import_handler(
        LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_S3_PART_SIZE=str(PART_SIZE), LAZYSERVE_LOAD="eager"
    )
    assert mod.service.model.status == "failed"
    s3.fault = None
    s3.clear()
    assert_label_8(mod.handler(load_event("alb-predict"), None))
    assert weights_gets(s3) == PARTS
    assert mod.service.model.loads_started == 2


# --- Mangum: no lifespan per invocation, one loop for all invocations -----------------------------


def test_invocations_reuse_one_event_loop_and_run_no_lifespan(
    s3: CountingS3Server, mod: ModuleType, mangum_event_loop: asyncio.AbstractEventLoop
) -> None:
    lifespan_runs: list[str] = []

    @contextlib.asynccontextmanager
    async def counting_lifespan(app: Any) -> AsyncIterator[None]:
        lifespan_runs.append("startup")
        yield

    mod.app.router.lifespan_context = counting_lifespan

    for _ in range(10):
        assert_label_8(mod.handler(load_event("http-api-predict"), None))
        assert body_of(mod.handler(load_event("http-api-health"), None))["model"] == "loaded"
    assert lifespan_runs == []
    assert not mangum_event_loop.is_closed()
    assert asyncio.get_event_loop() is mangum_event_loop
    assert mod.service.model.loads_started == 1
    assert weights_gets(s3) == PARTS
    assert math.isclose(
        sum(mod.handler(load_event("direct-predict"), None)["predictions"][0]["probabilities"]),
        1.0,
        abs_tol=1e-4,
    )
