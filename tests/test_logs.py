"""Log lines as a user reads them: JSON objects on Lambda (cold_start, request_id, model_sha256 on
each line of an invocation; one "model loaded" line with the load's figures), readable text in a
terminal. The reference function is imported as Lambda or uvicorn would, and every line that
reaches the root logger is captured as it is formatted."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from lazyserve import logs
from lazyserve.cli import FakeContext
from lazyserve.errors import ModelLoadError
from lazyserve.lazy import LazyModel
from tests.helpers import (
    ACCESS_DENIED,
    BUCKET,
    DIGIT_8,
    FAKE_CREDENTIALS,
    KEY,
    PART_SIZE,
    WEIGHTS,
    WEIGHTS_BYTES,
    WEIGHTS_SHA256,
    ImportHandler,
    asgi_client,
    failing_gets,
    load_event,
    s3_uri,
)
from tests.s3server import CountingS3Server

LOAD_FIGURES = ("fetch_seconds", "build_seconds", "total_seconds", "bytes", "mb_per_s")
TEXT_LINE = re.compile(
    r"(?P<time>\d\d:\d\d:\d\d\.\d{3}) (?P<level>[A-Z]+) +(?P<logger>[\w.]+): (?P<rest>.*)"
)


class Captured:
    """Every line the root logger's handlers write, formatted by whatever configure_logging set."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        # The test's S3 server (moto on werkzeug) runs in this process; on Lambda it does not.
        self.handler.addFilter(lambda record: not record.name.startswith("werkzeug"))
        self._read = 0

    def new_lines(self) -> list[str]:
        """The lines written since the last call."""
        text = self.stream.getvalue()
        chunk, self._read = text[self._read :], len(text)
        return chunk.splitlines()

    def new_json(self) -> list[dict[str, Any]]:
        records = []
        for line in self.new_lines():
            record = json.loads(line)  # every line is one JSON object
            assert isinstance(record, dict), line
            records.append(record)
        return records


@pytest.fixture(autouse=True)
def fresh_process_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new process has logged no model yet (model_sha256 is process-wide once set)."""
    monkeypatch.setattr(logs, "_global", {})


@pytest.fixture
def captured() -> Iterator[Captured]:
    """A handler on the root logger, installed before the app is imported: configure_logging
    gives it the formatter it picks, as it does to awslambdaric's handler on Lambda."""
    capture = Captured()
    root = logging.getLogger()
    level = root.level
    root.addHandler(capture.handler)
    # INFO, as under `lazyserve serve` or AWS_LAMBDA_LOG_LEVEL=INFO: Mangum then writes a line
    # per HTTP invocation, which must carry the invocation's fields like lazyserve's own lines.
    root.setLevel(logging.INFO)
    try:
        yield capture
    finally:
        root.setLevel(level)
        root.removeHandler(capture.handler)


@pytest.fixture
def on_lambda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "lazyserve-digits")


def assert_no_credentials(text: str) -> None:
    assert FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in text
    assert FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"] not in text


def model_loaded(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["message"].startswith("model loaded")]


def assert_load_figures(line: dict[str, Any], *, concurrency: int) -> None:
    for name in LOAD_FIGURES:
        value = line[name]
        assert isinstance(value, int | float) and not isinstance(value, bool), (name, value)
        assert value >= 0, (name, value)
    assert line["bytes"] == len(WEIGHTS_BYTES)
    assert line["total_seconds"] > 0
    assert line["total_seconds"] >= line["build_seconds"]
    assert line["total_seconds"] >= line["fetch_seconds"]
    assert line["mb_per_s"] > 0
    assert line["concurrency"] == concurrency
    assert line["format"] == "safetensors"


# --- JSON on Lambda -------------------------------------------------------------------------------


def test_every_invocation_line_is_json_with_cold_start_request_id_and_sha256(
    on_lambda: None,
    captured: Captured,
    s3: CountingS3Server,
    import_handler: ImportHandler,
) -> None:
    mod = import_handler(
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),  # 5 ranged GETs ...
        LAZYSERVE_S3_CONCURRENCY="3",  # ... 3 at a time
    )
    captured.new_lines()  # whatever the import wrote

    # 1st invocation (cold): S3 refuses, the load fails and says why.
    s3.fault = failing_gets(*ACCESS_DENIED)
    response = mod.handler(load_event("http-api-predict"), FakeContext(aws_request_id="req-1"))
    assert response["statusCode"] == 503
    first = captured.new_json()
    assert first, "a failed load writes a line"
    for line in first:
        assert line["cold_start"] is True, line
        assert line["request_id"] == "req-1", line
        assert "model_sha256" not in line, line
        assert {"timestamp", "level", "logger", "message"} <= set(line)
    (failure,) = [line for line in first if line["level"] == "ERROR"]
    assert failure["logger"] == "lazyserve"
    for word in (f"s3://{BUCKET}/{KEY}", "AccessDenied", "s3:GetObject"):
        assert word in failure["message"], (word, failure)
    assert_no_credentials(json.dumps(first))

    # 2nd invocation (warm): the load succeeds; its line carries this invocation's id.
    s3.fault = None
    response = mod.handler(load_event("http-api-predict"), FakeContext(aws_request_id="req-2"))
    assert response["statusCode"] == 200
    second = captured.new_json()
    for line in second:
        assert line["cold_start"] is False, line
        assert line["request_id"] == "req-2", line
    (loaded,) = model_loaded(second)
    assert loaded["level"] == "INFO"
    assert loaded["model_sha256"] == WEIGHTS_SHA256
    assert_load_figures(loaded, concurrency=3)
    assert s3_uri() in loaded["message"]

    # Later invocations do not load again; every line they write (here Mangum's) has the
    # invocation's fields and the loaded model's digest.
    for request_id in ("req-3", "req-4"):
        mod.handler(load_event("http-api-predict"), FakeContext(aws_request_id=request_id))
        later = captured.new_json()
        assert later
        assert model_loaded(later) == []
        for line in later:
            assert (line["cold_start"], line["request_id"]) == (False, request_id)
            assert line["model_sha256"] == WEIGHTS_SHA256
    assert_no_credentials(captured.stream.getvalue())


def test_cold_invocation_that_loads_writes_one_model_loaded_line(
    on_lambda: None, captured: Captured, import_handler: ImportHandler
) -> None:
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    captured.new_lines()
    for i in range(3):
        event = load_event("warmup" if i == 0 else "http-api-predict")
        mod.handler(event, FakeContext(aws_request_id=f"req-{i}"))
    records = captured.new_json()
    (loaded,) = model_loaded(records)
    assert (loaded["cold_start"], loaded["request_id"]) == (True, "req-0")
    assert loaded["model_sha256"] == WEIGHTS_SHA256
    assert_load_figures(loaded, concurrency=1)  # a local file is one read


def test_eager_load_during_init_logs_json_with_the_digest(
    on_lambda: None, captured: Captured, import_handler: ImportHandler
) -> None:
    import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_LOAD="eager")
    records = captured.new_json()
    (loaded,) = model_loaded(records)
    # INIT belongs to no invocation: no request id, no cold_start flag of one.
    assert "request_id" not in loaded
    assert loaded["model_sha256"] == WEIGHTS_SHA256
    assert loaded["bytes"] == len(WEIGHTS_BYTES)


def test_unexpected_load_error_logs_its_traceback_in_the_exception_field(
    captured: Captured,
) -> None:
    logs.configure_logging("INFO", json_lines=True)

    def load() -> None:
        raise RuntimeError("the GPU caught fire")

    holder: LazyModel[None] = LazyModel(load, name="model")
    with logs.bind(request_id="req-x", cold_start=True), pytest.raises(ModelLoadError):
        holder.get(timeout=10)
    (line,) = captured.new_json()
    assert line["level"] == "ERROR"
    assert "RuntimeError: the GPU caught fire" in line["message"]
    assert (line["request_id"], line["cold_start"]) == ("req-x", True)
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: the GPU caught fire" in line["exception"]


# --- text in a terminal ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_outside_lambda_lines_are_readable_text(
    captured: Captured, import_handler: ImportHandler
) -> None:
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    captured.new_lines()
    async with asgi_client(mod) as client:
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
        assert response.status_code == 200
        assert (await client.post("/predict", json={"inputs": [DIGIT_8]})).status_code == 200
    lines = captured.new_lines()
    (line,) = [line for line in lines if "model loaded" in line]
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    match = TEXT_LINE.fullmatch(line)
    assert match, line
    assert match["level"] == "INFO"
    assert match["logger"] == "lazyserve"
    head, _, pairs = match["rest"].partition(") ")
    assert re.fullmatch(
        rf"model loaded from {re.escape(str(WEIGHTS))}: {len(WEIGHTS_BYTES)} bytes "
        r"in \d+\.\d{3}s \(\d+\.\d MB/s",
        head,
    ), head
    fields = dict(pair.split("=", 1) for pair in pairs.split(" "))
    assert fields["model_sha256"] == WEIGHTS_SHA256
    assert fields["bytes"] == str(len(WEIGHTS_BYTES))
    assert fields["concurrency"] == "1"
    for name in LOAD_FIGURES:
        assert float(fields[name]) >= 0, (name, fields)
    # Under uvicorn there is no invocation, so no request id or cold_start.
    assert "request_id" not in fields
    assert "cold_start" not in fields
