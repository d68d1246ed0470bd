"""Log lines as a user reads them: JSON objects on Lambda (cold_start, request_id, model_sha256 on
each line of an invocation; one "model loaded" line with the load's figures), readable text in a
terminal. On Lambda the lines go through awslambdaric's own root handler, installed by its own
`_setup_logging` as the runtime client does, writing to a sink that records what would reach
stdout (or Lambda's telemetry frames); the reference function is imported as Lambda or uvicorn
would. tests/test_lambda_logs.py runs the same through a real `python -m awslambdaric`."""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
from awslambdaric import bootstrap
from awslambdaric.lambda_runtime_log_utils import _JSON_FRAME_TYPES, LogFormat

from lazyserve import logs
from lazyserve.cli import FakeContext
from lazyserve.errors import ModelLoadError
from lazyserve.lazy import LazyModel
from lazyserve.settings import load_settings
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
QUIET = ("lazyserve", "botocore", "boto3", "s3transfer", "urllib3", "werkzeug", "mangum")


class Sink:
    """awslambdaric's log sink interface: what its root handler writes, record by record."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes | None]] = []
        self._read = 0

    def log(self, msg: str, frame_type: bytes | None = None) -> None:
        self.frames.append((msg, frame_type))

    def log_error(self, message_lines: list[str]) -> None:
        self.frames.append(("\r".join(message_lines) + "\n", None))

    def stdout(self) -> str:
        """What awslambdaric's stdout sink writes for these records: each as it is."""
        return "".join(msg for msg, _ in self.frames)

    def new_json(self) -> list[dict[str, Any]]:
        """The records written since the last call; each must be one newline-ended JSON object."""
        frames, self._read = self.frames[self._read :], len(self.frames)
        records = []
        for msg, _ in frames:
            assert msg.endswith("\n") and msg.count("\n") == 1, msg
            record = json.loads(msg)
            assert isinstance(record, dict), msg
            records.append(record)
        return records


@pytest.fixture(autouse=True)
def fresh_process_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new process has logged no model yet (model_sha256 is process-wide once set)."""
    monkeypatch.setattr(logs, "_global", {})


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put back the root logger's handlers and the logger levels configure_logging sets."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in QUIET}
    try:
        yield
    finally:
        root.handlers, root.level = saved
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        logging.captureWarnings(False)
        logging.Formatter.converter = time.localtime  # awslambdaric sets gmtime


def bare_root() -> logging.Logger:
    """The root logger as a new process has it: no handlers (pytest adds its own to each test
    phase; they are set aside until the test ends)."""
    root = logging.getLogger()
    root.handlers = []
    root.setLevel(logging.WARNING)
    return root


StartRuntime = Callable[..., Sink]


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> StartRuntime:
    """awslambdaric's logging set-up, as `bootstrap.run` makes it before importing the handler:
    `runtime("JSON", "WARN")` is AWS_LAMBDA_LOG_FORMAT=JSON, AWS_LAMBDA_LOG_LEVEL=WARN."""

    def start(log_format: str = "Text", level: str = "") -> Sink:
        monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "lazyserve-digits")
        if log_format != "Text":
            monkeypatch.setenv("AWS_LAMBDA_LOG_FORMAT", log_format)
        if level:
            monkeypatch.setenv("AWS_LAMBDA_LOG_LEVEL", level)
        sink = Sink()
        root = bare_root()
        bootstrap._setup_logging(LogFormat.from_str(log_format), level, sink)
        (handler,) = root.handlers
        assert logs.is_runtime_handler(handler)
        # The test's S3 server (moto on werkzeug) runs in this process; on Lambda it does not.
        handler.addFilter(lambda record: not record.name.startswith("werkzeug"))
        if not level:
            # INFO, as with AWS_LAMBDA_LOG_LEVEL=INFO: Mangum then writes a line per HTTP
            # invocation, which must carry the invocation's fields like lazyserve's own lines.
            root.setLevel(logging.INFO)
        return sink

    return start


def invoke(mod: ModuleType, event: str, request_id: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """One invocation, with the request id awslambdaric's filter puts on each record."""
    monkeypatch.setattr(bootstrap, "_GLOBAL_AWS_REQUEST_ID", request_id)
    return mod.handler(load_event(event), FakeContext(aws_request_id=request_id))


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


# --- JSON on Lambda, Text log format (the default) ----------------------------------------------


def test_every_invocation_line_is_json_with_cold_start_request_id_and_sha256(
    runtime: StartRuntime,
    s3: CountingS3Server,
    import_handler: ImportHandler,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink = runtime()
    mod = import_handler(
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),  # 5 ranged GETs ...
        LAZYSERVE_S3_CONCURRENCY="3",  # ... 3 at a time
    )
    sink.new_json()  # whatever the import wrote

    # 1st invocation (cold): S3 refuses, the load fails and says why.
    s3.fault = failing_gets(*ACCESS_DENIED)
    response = invoke(mod, "http-api-predict", "req-1", monkeypatch)
    assert response["statusCode"] == 503
    first = sink.new_json()
    assert first, "a failed load writes a line"
    for line in first:
        assert line["cold_start"] is True, line
        assert line["request_id"] == "req-1", line
        assert line["requestId"] == "req-1", line  # the runtime's, named as Lambda names it
        assert "model_sha256" not in line, line
        assert {"timestamp", "level", "logger", "message"} <= set(line)
        assert not {"aws_request_id", "tenant_id", "tenantId", "_frame_type"} & set(line)
    (failure,) = [line for line in first if line["level"] == "ERROR"]
    assert failure["logger"] == "lazyserve"
    for word in (f"s3://{BUCKET}/{KEY}", "AccessDenied", "s3:GetObject"):
        assert word in failure["message"], (word, failure)
    assert_no_credentials(json.dumps(first))

    # 2nd invocation (warm): the load succeeds; its line carries this invocation's id.
    s3.fault = None
    response = invoke(mod, "http-api-predict", "req-2", monkeypatch)
    assert response["statusCode"] == 200
    second = sink.new_json()
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
        invoke(mod, "http-api-predict", request_id, monkeypatch)
        later = sink.new_json()
        assert later
        assert model_loaded(later) == []
        for line in later:
            assert (line["cold_start"], line["request_id"]) == (False, request_id)
            assert line["model_sha256"] == WEIGHTS_SHA256
    assert_no_credentials(sink.stdout())


def test_what_reaches_stdout_is_one_json_object_per_line(
    runtime: StartRuntime, import_handler: ImportHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    # awslambdaric's stdout sink writes each record as the formatter returns it, and
    # Powertools prints EMF documents between them: each record must end its own line.
    sink = runtime()
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    for i in range(3):
        invoke(mod, "http-api-predict", f"req-{i}", monkeypatch)
    out = sink.stdout()
    assert out.endswith("\n")
    lines = out.splitlines()
    assert len(lines) == len(sink.frames) >= 4
    assert all(isinstance(json.loads(line), dict) for line in lines)


def test_cold_invocation_that_loads_writes_one_model_loaded_line(
    runtime: StartRuntime, import_handler: ImportHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = runtime()
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    sink.new_json()
    for i in range(3):
        invoke(mod, "warmup" if i == 0 else "http-api-predict", f"req-{i}", monkeypatch)
    records = sink.new_json()
    (loaded,) = model_loaded(records)
    assert (loaded["cold_start"], loaded["request_id"]) == (True, "req-0")
    assert loaded["model_sha256"] == WEIGHTS_SHA256
    assert_load_figures(loaded, concurrency=1)  # a local file is one read


def test_eager_load_during_init_logs_json_with_the_digest(
    runtime: StartRuntime, import_handler: ImportHandler
) -> None:
    sink = runtime()
    import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_LOAD="eager")
    records = sink.new_json()
    (loaded,) = model_loaded(records)
    # INIT belongs to no invocation: no request id, no cold_start flag of one.
    assert "request_id" not in loaded
    assert "requestId" not in loaded
    assert loaded["model_sha256"] == WEIGHTS_SHA256
    assert loaded["bytes"] == len(WEIGHTS_BYTES)


def test_unexpected_load_error_logs_its_traceback_in_the_exception_field(
    runtime: StartRuntime,
) -> None:
    sink = runtime()
    logs.configure_logging("INFO")

    def load() -> None:
        raise RuntimeError("the GPU caught fire")

    holder: LazyModel[None] = LazyModel(load, name="model")
    with logs.bind(request_id="req-x", cold_start=True), pytest.raises(ModelLoadError):
        holder.get(timeout=10)
    (line,) = sink.new_json()
    assert line["level"] == "ERROR"
    assert "RuntimeError: the GPU caught fire" in line["message"]
    assert (line["request_id"], line["cold_start"]) == ("req-x", True)
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: the GPU caught fire" in line["exception"]


# --- Lambda's JSON log format and log level ---------------------------------------------------


def test_lambda_json_format_keeps_the_runtimes_formatter_and_adds_lazyserves_fields(
    runtime: StartRuntime, import_handler: ImportHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = runtime("JSON", "INFO")
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    sink.new_json()
    invoke(mod, "http-api-predict", "req-1", monkeypatch)
    records = sink.new_json()
    (loaded,) = model_loaded(records)
    # The runtime's JSON formatter wrote it: its timestamp and request id ...
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", loaded["timestamp"])
    assert loaded["requestId"] == "req-1"
    assert (loaded["level"], loaded["logger"]) == ("INFO", "lazyserve")
    # ... with lazyserve's context fields and the line's own figures.
    assert (loaded["cold_start"], loaded["request_id"]) == (True, "req-1")
    assert loaded["model_sha256"] == WEIGHTS_SHA256
    assert_load_figures(loaded, concurrency=1)
    # Each record keeps the JSON frame type of its level (Lambda filters levels by it).
    frames = dict(sink.frames)
    (text,) = [msg for msg in frames if msg.startswith('{"timestamp"') and "model loaded" in msg]
    assert frames[text] == _JSON_FRAME_TYPES[logging.INFO]
    mangum = [r for r in records if r["logger"].startswith("mangum")]
    assert mangum and all(r["model_sha256"] == WEIGHTS_SHA256 for r in mangum)


def test_extra_fields_win_over_context_fields_in_lambdas_json(runtime: StartRuntime) -> None:
    sink = runtime("JSON", "INFO")
    logs.configure_logging("INFO")
    logs.set_global(model_sha256="abc")
    with logs.bind(request_id="req-9", cold_start=False):
        logging.getLogger("lazyserve").info("hello %s", "there", extra={"cold_start": "x"})
    (line,) = sink.new_json()
    assert line["message"] == "hello there"
    assert (line["request_id"], line["cold_start"], line["model_sha256"]) == ("req-9", "x", "abc")


@pytest.mark.parametrize("log_format", ["Text", "JSON"])
def test_lambda_log_level_warn_hides_lazyserves_info_lines(
    runtime: StartRuntime, log_format: str
) -> None:
    sink = runtime(log_format, "WARN")
    logs.configure_logging("DEBUG")  # LAZYSERVE_LOG_LEVEL=DEBUG: Lambda's level still rules
    log = logging.getLogger("lazyserve")
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")
    logging.getLogger("lazyserve.sources").info("a child's info line")
    (line,) = sink.new_json()
    assert line["message"] == "a warning line"
    assert line["level"] in ("WARNING", "WARN")


def test_python_warnings_on_lambda_are_json_lines(runtime: StartRuntime) -> None:
    sink = runtime()
    logs.configure_logging("INFO")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        load_settings({"LAZYSERVE_MODEL_URI": str(WEIGHTS), "LAZYSERVE_LOAD_MODE": "eager"})
    (line,) = sink.new_json()
    assert line["level"] == "WARNING"
    assert line["logger"] == "py.warnings"
    assert (
        "LazyserveWarning: LAZYSERVE_LOAD_MODE is not a lazyserve setting and is ignored; "
        "did you mean LAZYSERVE_LOAD?"
    ) in line["message"]


# --- whose handlers are touched -----------------------------------------------------------------


class Collect(logging.Handler):
    """An app's own handler with its own format."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s|%(name)s|%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.mark.parametrize("json_lines", [None, True, False])
def test_an_apps_own_root_handler_is_never_reformatted(
    json_lines: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "lazyserve-digits")
    root = bare_root()
    mine = Collect()
    formatter = mine.formatter
    root.addHandler(mine)
    root.setLevel(logging.INFO)
    logs.configure_logging("INFO", json_lines=json_lines)
    assert root.handlers == [mine]  # nothing added
    assert mine.formatter is formatter
    with logs.bind(request_id="req-1"):
        logging.getLogger("lazyserve").info("model loaded")
    assert mine.lines == ["INFO|lazyserve|model loaded"]


def test_beside_the_runtimes_handler_an_apps_handler_is_left_alone(
    runtime: StartRuntime,
) -> None:
    sink = runtime()
    mine = Collect()
    logging.getLogger().addHandler(mine)
    logs.configure_logging("INFO")
    logging.getLogger("lazyserve").info("hello")
    assert mine.lines == ["INFO|lazyserve|hello"]
    (line,) = sink.new_json()
    assert line["message"] == "hello"


def test_configuring_twice_keeps_one_handler_of_lazyserves(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = bare_root()
    logs.configure_logging("INFO", json_lines=True)
    logs.configure_logging("INFO", json_lines=False)
    logs.configure_logging("INFO", json_lines=False)
    assert len(root.handlers) == 1
    logging.getLogger("lazyserve").info("once")
    (line,) = capsys.readouterr().err.splitlines()
    assert TEXT_LINE.fullmatch(line), line


def test_botocore_info_lines_are_quiet_and_its_debug_is_never_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bare_root()
    logging.getLogger("urllib3").setLevel(logging.DEBUG)  # asked for before configuring
    logs.configure_logging("INFO")
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    logging.getLogger("urllib3.connectionpool").debug("a header with a token")
    logging.getLogger("botocore").warning("a warning is still shown")
    (line,) = capsys.readouterr().err.splitlines()
    assert "a warning is still shown" in line
    assert logging.getLogger("urllib3").level == logging.INFO


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
