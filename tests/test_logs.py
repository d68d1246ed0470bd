"""Log lines as a user reads them: on Lambda, JSON objects on stdout, one per line, with an RFC 3339
timestamp and a level (what Lambda's JSON log format filters by), and cold_start, request_id,
model_sha256 on each line of an invocation; elsewhere readable text, or the app's own handlers.
lazyserve touches no logger but its own. tests/test_lambda_logs.py runs the same through a real
`python -m awslambdaric`, with the runtime's own logging set-up."""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterator
from datetime import datetime
from types import ModuleType
from typing import Any

import pytest

from lazyserve import logs
from lazyserve.cli import FakeContext
from lazyserve.errors import LazyserveWarning, ModelLoadError
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


@pytest.fixture(autouse=True)
def fresh_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A new process: no model logged yet, lazyserve's logger as Python makes it, the root
    logger without handlers (pytest's own are set aside until the test ends)."""
    monkeypatch.setattr(logs, "_global", {})
    ours = logging.getLogger("lazyserve")
    root = logging.getLogger()
    saved = (ours.handlers[:], ours.filters[:], ours.level, ours.propagate)
    saved_root = (root.handlers[:], root.level)
    root.handlers = []
    try:
        yield
    finally:
        ours.handlers, ours.filters, ours.level, ours.propagate = saved
        root.handlers, root.level = saved_root


def bare_root() -> logging.Logger:
    """The root logger as a new process has it: no handlers (pytest adds its own for each test
    phase; the fixture puts them back)."""
    root = logging.getLogger()
    root.handlers = []
    return root


@pytest.fixture
def lambda_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "lazyserve-digits")


class Stdout:
    """The JSON lines a process printed, read as Lambda reads them."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def new(self) -> list[dict[str, Any]]:
        """Every line printed since the last call, each one JSON object."""
        out = self.capsys.readouterr().out
        records = []
        for line in out.splitlines():
            record = json.loads(line)
            assert isinstance(record, dict), line
            records.append(record)
        return records

    def lines(self) -> list[dict[str, Any]]:
        """lazyserve's log lines among them (the EMF documents are the others)."""
        return [r for r in self.new() if "_aws" not in r]


@pytest.fixture
def stdout(capsys: pytest.CaptureFixture[str]) -> Stdout:
    return Stdout(capsys)


def invoke(mod: ModuleType, event: str, request_id: str) -> Any:
    return mod.handler(load_event(event), FakeContext(aws_request_id=request_id))


def model_loaded(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["message"].startswith("model loaded")]


def assert_load_figures(line: dict[str, Any], *, concurrency: int) -> None:
    for name in LOAD_FIGURES:
        value = line[name]
        assert isinstance(value, int | float) and not isinstance(value, bool), (name, value)
        assert value >= 0, (name, value)
    assert line["bytes"] == len(WEIGHTS_BYTES)
    assert line["total_seconds"] >= max(line["build_seconds"], line["fetch_seconds"])
    assert line["concurrency"] == concurrency
    assert line["format"] == "safetensors"


def assert_lambda_shape(line: dict[str, Any]) -> None:
    """What Lambda's JSON log format reads: an RFC 3339 timestamp and a level it knows."""
    assert datetime.fromisoformat(line["timestamp"]).tzinfo is not None, line
    assert line["level"] in ("DEBUG", "INFO", "WARN", "ERROR", "FATAL"), line
    assert line["logger"] == "lazyserve", line


# --- on Lambda: JSON lines on stdout --------------------------------------------------------------


def test_every_invocation_line_is_json_with_cold_start_request_id_and_sha256(
    lambda_env: None, stdout: Stdout, s3: CountingS3Server, import_handler: ImportHandler
) -> None:
    mod = import_handler(
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),  # 5 ranged GETs ...
        LAZYSERVE_S3_CONCURRENCY="3",  # ... 3 at a time
    )
    stdout.new()  # whatever the import wrote

    # 1st invocation (cold): S3 refuses, the load fails and says why.
    s3.fault = failing_gets(*ACCESS_DENIED)
    assert invoke(mod, "http-api-predict", "req-1")["statusCode"] == 500
    first = stdout.lines()
    assert first, "a failed load writes a line"
    for line in first:
        assert_lambda_shape(line)
        assert (line["cold_start"], line["request_id"]) == (True, "req-1"), line
        assert "model_sha256" not in line, line
    (failure,) = [line for line in first if line["level"] == "ERROR"]
    for word in (f"s3://{BUCKET}/{KEY}", "AccessDenied", "s3:GetObject"):
        assert word in failure["message"], (word, failure)

    # The object becomes readable; the load succeeds, its line carries this invocation's id.
    s3.fault = None
    mod.service.model.forget()
    assert invoke(mod, "http-api-predict", "req-2")["statusCode"] == 200
    second = stdout.lines()
    for line in second:
        assert (line["cold_start"], line["request_id"]) == (False, "req-2"), line
    (loaded,) = model_loaded(second)
    assert loaded["level"] == "INFO"
    assert loaded["model_sha256"] == WEIGHTS_SHA256
    assert_load_figures(loaded, concurrency=3)
    assert s3_uri() in loaded["message"]

    # A line written during a later invocation names the model it serves.
    with logs.bind(request_id="req-3", cold_start=False):
        logging.getLogger("lazyserve").warning("something to say")
    (later,) = stdout.lines()
    assert later["model_sha256"] == WEIGHTS_SHA256
    assert FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in json.dumps(first + second)


def test_what_reaches_stdout_is_one_json_object_per_line(
    lambda_env: None, stdout: Stdout, import_handler: ImportHandler
) -> None:
    # lazyserve's lines and the EMF documents share stdout: each is one line of its own.
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    for i in range(3):
        invoke(mod, "http-api-predict", f"req-{i}")
    records = stdout.new()
    assert len(records) >= 4
    assert any("_aws" in r for r in records) and any("level" in r for r in records)


def test_cold_invocation_that_loads_writes_one_model_loaded_line(
    lambda_env: None, stdout: Stdout, import_handler: ImportHandler
) -> None:
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    stdout.new()
    for i in range(3):
        invoke(mod, "warmup" if i == 0 else "http-api-predict", f"req-{i}")
    (loaded,) = model_loaded(stdout.lines())
    assert (loaded["cold_start"], loaded["request_id"]) == (True, "req-0")
    assert loaded["model_sha256"] == WEIGHTS_SHA256
    assert_load_figures(loaded, concurrency=1)  # a local file is one read


def test_eager_load_during_init_logs_json_with_the_digest(
    lambda_env: None, stdout: Stdout, import_handler: ImportHandler
) -> None:
    import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_LOAD="eager")
    (loaded,) = model_loaded(stdout.lines())
    # INIT belongs to no invocation: no request id, no cold_start flag of one.
    assert "request_id" not in loaded
    assert loaded["model_sha256"] == WEIGHTS_SHA256
    assert loaded["bytes"] == len(WEIGHTS_BYTES)


def test_unexpected_load_error_logs_its_traceback_in_the_exception_field(
    lambda_env: None, stdout: Stdout
) -> None:
    logs.configure_logging("INFO")

    def load() -> None:
        raise RuntimeError("the GPU caught fire")

    holder: LazyModel[None] = LazyModel(load, name="model")
    with logs.bind(request_id="req-x", cold_start=True), pytest.raises(ModelLoadError):
        holder.get(timeout=10)
    (line,) = stdout.lines()
    assert line["level"] == "ERROR"
    assert "RuntimeError: the GPU caught fire" in line["message"]
    assert (line["request_id"], line["cold_start"]) == ("req-x", True)
    assert line["exception"].startswith("Traceback (most recent call last):")


def test_extra_fields_win_over_context_fields(lambda_env: None, stdout: Stdout) -> None:
    logs.configure_logging("INFO")
    logs.set_global(model_sha256="abc")
    with logs.bind(request_id="req-9", cold_start=False):
        logging.getLogger("lazyserve").info("hello %s", "there", extra={"cold_start": "x"})
    (line,) = stdout.lines()
    assert line["message"] == "hello there"
    assert (line["request_id"], line["cold_start"], line["model_sha256"]) == ("req-9", "x", "abc")


def test_lambda_log_level_warn_hides_lazyserves_info_lines(
    lambda_env: None, stdout: Stdout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_LOG_LEVEL", "WARN")
    logs.configure_logging("DEBUG")  # LAZYSERVE_LOG_LEVEL=DEBUG: Lambda's level still rules
    log = logging.getLogger("lazyserve")
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")
    logging.getLogger("lazyserve.sources").info("a child's info line")
    (line,) = stdout.lines()
    assert (line["message"], line["level"]) == ("a warning line", "WARN")


def test_an_unknown_variable_on_lambda_is_one_json_warning_line(
    lambda_env: None, stdout: Stdout, import_handler: ImportHandler
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing reaches Python's warnings on stderr
        import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_LOAD_MODE="eager")
    (line,) = [r for r in stdout.lines() if r["level"] == "WARN"]
    assert line["message"] == (
        "LAZYSERVE_LOAD_MODE is not a lazyserve setting and is ignored; did you mean "
        "LAZYSERVE_LOAD?"
    )


def test_elsewhere_an_unknown_variable_is_a_warning_at_the_apps_line(
    import_handler: ImportHandler,
) -> None:
    with pytest.warns(LazyserveWarning) as caught:
        import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_LOAD_MODE="eager")
    (warning,) = caught
    # The line that made the Service, in the reference function: not lazyserve's own code.
    assert warning.filename.endswith("handler/app.py"), warning.filename


# --- whose loggers are touched: lazyserve's only ------------------------------------------------


class Collect(logging.Handler):
    """An app's own (or the runtime's) handler with its own format."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s|%(name)s|%(message)s|%(request_id)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_on_lambda_the_runtimes_root_handler_is_left_as_it_was(
    lambda_env: None, stdout: Stdout
) -> None:
    root = bare_root()
    runtimes = Collect()
    formatter = runtimes.formatter
    root.addHandler(runtimes)
    root.setLevel(logging.INFO)
    logs.configure_logging("INFO")
    assert root.handlers == [runtimes] and runtimes.formatter is formatter
    assert root.level == logging.INFO
    with logs.bind(request_id="req-1"):
        logging.getLogger("lazyserve").info("model loaded")
    assert runtimes.lines == []  # lazyserve's line went to stdout once, not through it too
    (line,) = stdout.lines()
    assert (line["message"], line["request_id"]) == ("model loaded", "req-1")


def test_elsewhere_an_apps_root_handler_gets_lazyserves_lines_with_their_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = bare_root()
    mine = Collect()
    root.addHandler(mine)
    root.setLevel(logging.INFO)
    logs.configure_logging("INFO")
    assert root.handlers == [mine]  # nothing added
    with logs.bind(request_id="req-1"):
        logging.getLogger("lazyserve").info("model loaded")
    assert mine.lines == ["INFO|lazyserve|model loaded|req-1"]
    assert capsys.readouterr() == ("", "")


def test_configuring_twice_keeps_one_handler_of_lazyserves(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bare_root()
    logs.configure_logging("INFO", json_lines=True)
    logs.configure_logging("INFO", json_lines=False)
    logs.configure_logging("INFO", json_lines=False)
    assert len(logging.getLogger("lazyserve").handlers) == 1
    logging.getLogger("lazyserve").info("once")
    (line,) = capsys.readouterr().err.splitlines()
    assert TEXT_LINE.fullmatch(line), line


def test_other_loggers_keep_their_levels_and_handlers() -> None:
    names = ("botocore", "urllib3", "mangum", "uvicorn.error")
    before = {n: (logging.getLogger(n).level, logging.getLogger(n).handlers[:]) for n in names}
    logs.configure_logging("DEBUG", json_lines=True)
    after = {n: (logging.getLogger(n).level, logging.getLogger(n).handlers[:]) for n in names}
    assert after == before


# --- text in a terminal ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_outside_lambda_lines_are_readable_text(
    import_handler: ImportHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    bare_root()
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    capsys.readouterr()
    async with asgi_client(mod) as client:
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
        assert response.status_code == 200
        assert (await client.post("/predict", json={"inputs": [DIGIT_8]})).status_code == 200
    lines = capsys.readouterr().err.splitlines()
    (line,) = [line for line in lines if "model loaded" in line]
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    match = TEXT_LINE.fullmatch(line)
    assert match, line
    assert (match["level"], match["logger"]) == ("INFO", "lazyserve")
    head, _, pairs = match["rest"].partition(") ")
    assert re.fullmatch(
        rf"model loaded from {re.escape(str(WEIGHTS))}: {len(WEIGHTS_BYTES)} bytes "
        r"in \d+\.\d{3}s \(\d+\.\d MB/s",
        head,
    ), head
    fields = dict(pair.split("=", 1) for pair in pairs.split(" "))
    assert fields["model_sha256"] == WEIGHTS_SHA256
    assert fields["bytes"] == str(len(WEIGHTS_BYTES))
    for name in LOAD_FIGURES:
        assert float(fields[name]) >= 0, (name, fields)
    # Under uvicorn there is no invocation, so no request id or cold_start.
    assert "request_id" not in fields
    assert "cold_start" not in fields
