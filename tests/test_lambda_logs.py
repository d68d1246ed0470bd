"""Log lines as CloudWatch receives them: `python -m awslambdaric handler.app.handler` as a real
process (the runtime client's own logging set-up and its stdout sink, as under `sam local` and
the runtime emulator), its stdout and stderr captured together. Every line must be one JSON
object, with Lambda's Text log format (the default) and with its JSON format: lazyserve's own
(with an RFC 3339 timestamp and a level Lambda knows, and its fields), the runtime's (left as the
runtime writes them), and the EMF metric documents, each on a line of its own;
AWS_LAMBDA_LOG_LEVEL is honoured."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest

from tests.helpers import (
    BUCKET,
    FAKE_CREDENTIALS,
    SLOW_DOWN,
    WEIGHTS_SHA256,
    StartFunction,
    assert_prediction,
    failing_gets,
    http_body,
    load_event,
)
from tests.s3server import CountingS3Server

MODEL_LOADED = "model loaded from "


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line of the output, each parsed as one JSON object (fails on any other line)."""
    records = []
    for number, line in enumerate(output.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"line {number} is not one JSON object: {line!r}\n--- output:\n{output}")
        assert isinstance(record, dict), line
        records.append(record)
    assert output.endswith("\n"), "the last line is not terminated"
    return records


def emf_documents(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "_aws" in r]


def log_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "_aws" not in r]


def loaded_lines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in log_records(records) if str(r.get("message", "")).startswith(MODEL_LOADED)]


def assert_no_secrets(output: str) -> None:
    assert FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in output
    assert FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"] not in output


def test_text_format_every_line_is_one_json_object(
    start_function: StartFunction, s3: CountingS3Server
) -> None:
    function = start_function(LAZYSERVE_LOAD="lazy")  # AWS_LAMBDA_LOG_FORMAT unset: Text
    ids = []
    for name in ("http-api-predict", "direct-predict", "warmup", "rest-predict"):
        ids.append(function.api.invoke(load_event(name)))
        result = function.api.wait_result(ids[-1], 30, abort=function.exited)
        assert result.kind == "response", result.body
    function.stop()
    output = function.log()
    records = json_lines(output)

    # One EMF document per invocation that had a metric (the warm-up had none), each on a
    # line of its own.
    documents = emf_documents(records)
    assert [sorted(k for k in d if k[0].isupper()) for d in documents] == [
        ["ColdStart", "InferenceMs", "ModelBytes", "ModelLoadSeconds"],
        ["InferenceMs"],
        ["InferenceMs"],
    ], output
    # The model loaded once, during the first invocation; its line carries lazyserve's fields
    # and the runtime's request id.
    (loaded,) = loaded_lines(records)
    assert loaded["level"] == "INFO"
    assert loaded["logger"] == "lazyserve"
    assert loaded["cold_start"] is True
    assert loaded["request_id"] == ids[0]
    assert loaded["model_sha256"] == WEIGHTS_SHA256
    assert loaded["bytes"] > 0
    assert f"s3://{BUCKET}/" in loaded["message"]
    for record in log_records(records):
        assert {"timestamp", "level", "logger", "message"} <= set(record), record
        assert "_frame_type" not in record
    assert_no_secrets(output)


def test_json_format_keeps_lambdas_fields_and_adds_lazyserves(
    start_function: StartFunction, s3: CountingS3Server
) -> None:
    function = start_function(
        LAZYSERVE_LOAD="lazy", AWS_LAMBDA_LOG_FORMAT="JSON", AWS_LAMBDA_LOG_LEVEL="INFO"
    )
    first = function.api.invoke(load_event("http-api-predict"))
    assert_prediction(http_body(function.api.wait_result(first, 30, abort=function.exited)))
    invalid = function.api.invoke(load_event("direct-invalid"))
    assert function.api.wait_result(invalid, 30, abort=function.exited).kind == "error"
    later = function.api.invoke(load_event("http-api-predict"))
    assert_prediction(http_body(function.api.wait_result(later, 30, abort=function.exited)))
    function.stop()
    output = function.log()
    # Lambda's JSON throughout, the runtime's own report of the failed invocation included.
    records = json_lines(output)
    assert len(emf_documents(records)) == 2  # the invalid invocation ran no inference

    (loaded,) = loaded_lines(records)
    # What Lambda's JSON format reads (an RFC 3339 timestamp, a level it knows) ...
    assert datetime.fromisoformat(loaded["timestamp"]).tzinfo is not None
    assert loaded["level"] == "INFO"
    assert loaded["logger"] == "lazyserve"
    # ... with lazyserve's context and the line's own figures (logging's `extra=`).
    assert loaded["cold_start"] is True
    assert loaded["request_id"] == first
    assert loaded["model_sha256"] == WEIGHTS_SHA256
    assert loaded["format"] == "safetensors"
    assert loaded["total_seconds"] > 0

    # Mangum's INFO line, as the runtime's own JSON formatter writes it (lazyserve leaves the
    # runtime's handler alone): the runtime's request id.
    mangum = [r for r in records if r.get("logger", "").startswith("mangum")]
    assert [r for r in mangum if r["requestId"] == later], output

    # The failed invocation: the runtime's own JSON error record, naming the exception.
    errors = [r for r in records if r.get("errorType") == "InvalidInput"]
    assert errors, output
    assert errors[0]["requestId"] == invalid
    assert_no_secrets(output)


def test_lambda_log_level_warn_hides_info_lines(
    start_function: StartFunction, s3: CountingS3Server
) -> None:
    # LAZYSERVE_LOG_LEVEL=DEBUG asks for more; Lambda's level is the ceiling on what is written.
    s3.fault = failing_gets(*SLOW_DOWN)
    function = start_function(
        LAZYSERVE_LOAD="lazy",
        LAZYSERVE_LOG_LEVEL="DEBUG",
        AWS_LAMBDA_LOG_FORMAT="JSON",
        AWS_LAMBDA_LOG_LEVEL="WARN",
    )
    failed = function.api.invoke(load_event("http-api-predict"))
    response = http_body_or_status(function.api.wait_result(failed, 30, abort=function.exited))
    assert response == 503
    s3.fault = None
    served = function.api.invoke(load_event("http-api-predict"))
    assert_prediction(http_body(function.api.wait_result(served, 30, abort=function.exited)))
    function.stop()
    records = log_records(json_lines(function.log()))
    levels = {r["level"] for r in records}
    assert levels <= {"WARN", "WARNING", "ERROR", "CRITICAL", "FATAL"}, records
    (failure,) = [r for r in records if r["level"] == "ERROR" and r["logger"] == "lazyserve"]
    assert "SlowDown" in failure["message"]
    assert failure["request_id"] == failed
    assert failure["cold_start"] is True
    assert loaded_lines(records) == []  # the INFO line of the load that succeeded is hidden


def http_body_or_status(result: Any) -> int:
    assert result.kind == "response", result.body
    status: int = result.json()["statusCode"]
    return status


# -- an unknown LAZYSERVE_* variable --------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["Text", "JSON"])
def test_an_unknown_variable_is_one_json_warning_line(
    start_function: StartFunction, s3: CountingS3Server, log_format: str
) -> None:
    function = start_function(
        LAZYSERVE_LOAD="lazy", AWS_LAMBDA_LOG_FORMAT=log_format, LAZYSERVE_LOAD_MODE="eager"
    )
    warmed = function.api.invoke(load_event("warmup"))
    assert function.api.wait_result(warmed, 30, abort=function.exited).kind == "response"
    function.stop()
    records = log_records(json_lines(function.log()))
    (warning,) = [r for r in records if r.get("level") in ("WARN", "WARNING")]
    assert warning["logger"] == "lazyserve"
    assert warning["message"] == (
        "LAZYSERVE_LOAD_MODE is not a lazyserve setting and is ignored; did you mean "
        "LAZYSERVE_LOAD?"
    )
