"""The `lazyserve` command line, run as a user runs it: a subprocess from the repository root."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import LAZYSERVE, ROOT, WEIGHTS, Console

REPORT = re.compile(
    r"REPORT RequestId: (?P<id>\S+)\tDuration: (?P<duration>\d+\.\d+) ms"
    r"\tMax Memory Used: (?P<memory>\d+) MB"
    r"(?:\tInit Duration: (?P<init>\d+\.\d+) ms)?\t(?P<start>cold|warm)"
)
DIGIT = 8  # the label of the image in every stored predict event


def lazyserve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # os.environ holds no LAZYSERVE_* or AWS_* variable of the developer's (conftest's
    # clean_environ), only fake credentials and a fixed region.
    return subprocess.run(
        [str(LAZYSERVE), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def invocations(stdout: str) -> list[tuple[Any, re.Match[str]]]:
    """(printed result, REPORT line) per invocation; nothing else may be on stdout."""
    lines = stdout.splitlines()
    assert len(lines) % 2 == 0, stdout
    pairs = []
    for result, report in zip(lines[::2], lines[1::2], strict=True):
        match = REPORT.fullmatch(report)
        assert match, report
        pairs.append((json.loads(result), match))
    return pairs


def assert_prediction(response: Any) -> None:
    assert response["statusCode"] == 200, response
    (prediction,) = json.loads(response["body"])["predictions"]
    assert prediction["label"] == DIGIT


def test_invoke_reports_each_invocation_and_fails_when_one_fails() -> None:
    done = lazyserve(
        "invoke",
        "events/http-api-predict.json",
        "events/warmup.json",
        "events/s3-put.json",
        "--repeat",
        "2",
        LAZYSERVE_MODEL_URI=str(WEIGHTS),
    )
    assert done.returncode == 1, done.stderr
    runs = invocations(done.stdout)
    assert len(runs) == 6
    for i, (result, report) in enumerate(runs):
        kind = i % 3
        if kind == 0:
            assert_prediction(result)
        elif kind == 1:
            assert result["warm"] is True
            assert result["model"]["uri"] == str(WEIGHTS)
        else:
            assert result["errorType"] == "UnsupportedEvent"
            assert "Records" in result["errorMessage"]
        uuid.UUID(report["id"])
        if i == 0:
            assert report["start"] == "cold"
            assert float(report["init"]) > 0
        else:
            assert report["start"] == "warm"
            assert report["init"] is None
        assert int(report["memory"]) > 0
    assert len({report["id"] for _, report in runs}) == 6


def test_invoke_exits_zero_when_every_invocation_succeeds() -> None:
    done = lazyserve(
        "invoke",
        "events/rest-predict.json",
        "events/direct-predict.json",
        "events/empty.json",
        LAZYSERVE_MODEL_URI=str(WEIGHTS),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (rest, _), (direct, _), (empty, _) = invocations(done.stdout)
    assert_prediction(rest)
    assert direct["predictions"][0]["label"] == DIGIT
    assert empty["warm"] is True


def test_invoke_reports_an_invalid_setting_like_an_init_error() -> None:
    done = lazyserve(
        "invoke", "events/warmup.json", LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_LOAD="fast"
    )
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["errorType"] == "SettingsError"
    assert "LAZYSERVE_LOAD has value 'fast'" in error["errorMessage"]


def test_help_lists_the_commands() -> None:
    done = lazyserve("--help")
    assert done.returncode == 0, done.stderr
    for command in ("demo", "serve", "invoke", "push", "convert", "init"):
        assert re.search(rf"^\s+{command}\s", done.stdout, re.MULTILINE), done.stdout


# --- every error is one line naming the argument ---------------------------------------------

BAD_JSON = '{"inputs": [1, 2,]}'


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done.stdout
    assert done.stdout == ""
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.splitlines()
    return line


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (
            ["invoke", "events/nothere.json"],
            "lazyserve invoke: error: argument EVENT.json: events/nothere.json: no such file",
            2,
        ),
        (
            ["invoke", "events"],
            "lazyserve invoke: error: argument EVENT.json: events: is a directory, not an event "
            "file",
            2,
        ),
        (
            ["invoke", "events/empty.json", "--handler", "nothere"],
            "lazyserve invoke: error: argument --handler: 'nothere' is not MODULE.FUNCTION "
            "(e.g. handler.app.handler) (see lazyserve invoke --help)",
            2,
        ),
        (
            ["invoke", "events/empty.json", "--handler", "nothere.handler"],
            "lazyserve invoke: error: argument --handler: nothere.handler: no module named "
            "'nothere' (run from the directory that holds it)",
            2,
        ),
        (
            ["invoke", "events/empty.json", "--handler", "handler.model.nothere"],
            "lazyserve invoke: error: argument --handler: handler.model.nothere: module "
            "'handler.model' has no attribute 'nothere'",
            2,
        ),
        (
            ["invoke", "events/empty.json", "--handler", "handler.model.CLASSES"],
            "lazyserve invoke: error: argument --handler: handler.model.CLASSES: not a function "
            "but a int",
            2,
        ),
        (
            ["invoke", "events/empty.json", "--repeat", "0"],
            "lazyserve invoke: error: argument --repeat: '0' is not accepted: a whole number, 1 "
            "or more (see lazyserve invoke --help)",
            2,
        ),
        (
            ["demo", "--port", "65536"],
            "lazyserve demo: error: argument --port: '65536' is not a port: accepted: 0 to 65535 "
            "(0 picks a free one) (see lazyserve demo --help)",
            2,
        ),
        (
            ["serve", "--port", "http"],
            "lazyserve serve: error: argument --port: 'http' is not a port: accepted: 0 to 65535 "
            "(0 picks a free one) (see lazyserve serve --help)",
            2,
        ),
        (
            ["serve", "--workers", "0"],
            "lazyserve serve: error: argument --workers: '0' is not accepted: a whole number, 1 "
            "or more (see lazyserve serve --help)",
            2,
        ),
        (
            ["serve", "--body-timeout", "0"],
            "lazyserve serve: error: argument --body-timeout: '0' is not accepted: a number of "
            "seconds above 0, at most 3600 (see lazyserve serve --help)",
            2,
        ),
        (
            ["serve", "handler/app.py"],
            "lazyserve serve: error: argument APP: 'handler/app.py' is not MODULE:ATTRIBUTE "
            "(e.g. handler.app:app) (see lazyserve serve --help)",
            2,
        ),
        (
            ["serve", "nothere:app"],
            'lazyserve serve: error: argument APP: nothere:app: Could not import module "nothere".',
            2,
        ),
        (
            ["serve", "nothere:app", "--workers", "2"],
            "lazyserve serve: error: argument APP: nothere:app: no module named 'nothere'",
            2,
        ),
        (
            ["serve", "--host", "no-such-host.invalid", "--port", "0"],
            "lazyserve serve: error: argument --host: cannot listen on no-such-host.invalid:0: "
            "Name or service not known",
            1,
        ),
        (
            ["nothere"],
            "lazyserve: error: argument COMMAND: invalid choice: 'nothere' (choose from 'demo', "
            "'serve', 'invoke', 'push', 'convert', 'init') (see lazyserve --help)",
            2,
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_errors_are_one_line_naming_the_argument(args: list[str], message: str, code: int) -> None:
    done = lazyserve(*args, LAZYSERVE_MODEL_URI=str(WEIGHTS))
    assert one_line_error(done) == message
    assert done.returncode == code


def test_an_event_file_that_is_not_json_names_file_line_and_column(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_text(BAD_JSON)
    done = lazyserve("invoke", str(event), LAZYSERVE_MODEL_URI=str(WEIGHTS))
    assert one_line_error(done) == (
        f"lazyserve invoke: error: argument EVENT.json: {event}: not JSON: Expecting value at "
        "line 1 column 18"
    )
    assert done.returncode == 2


def test_an_event_file_that_is_not_text_is_named(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_bytes(b"\xff\xfe{}")
    done = lazyserve("invoke", str(event), LAZYSERVE_MODEL_URI=str(WEIGHTS))
    assert one_line_error(done) == (
        f"lazyserve invoke: error: argument EVENT.json: {event}: not UTF-8 text (invalid start "
        "byte at byte 0)"
    )


def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = lazyserve("serve", "--port", str(port), LAZYSERVE_MODEL_URI=str(WEIGHTS))
    assert one_line_error(done) == (
        f"lazyserve serve: error: argument --port: cannot listen on 127.0.0.1:{port}: Address "
        "already in use"
    )
    assert done.returncode == 1


def test_serve_reports_an_invalid_setting_in_one_line() -> None:
    done = lazyserve("serve", "--port", "0", LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_LOAD="x")
    assert one_line_error(done) == (
        "lazyserve serve: error: handler.app:app: SettingsError: LAZYSERVE_LOAD has value 'x': "
        "accepted: 'lazy', 'eager' or 'background'."
    )
    assert done.returncode == 1


def test_an_import_error_inside_the_handler_module_is_its_init_error(tmp_path: Path) -> None:
    # The module exists; something it imports does not: Lambda reports that as the function's
    # INIT error (Runtime.ImportModuleError), not as a wrong --handler.
    (tmp_path / "broken_app.py").write_text(
        "import no_such_dependency\n\n\ndef handler(e, c): ...\n"
    )
    done = subprocess.run(
        [
            str(LAZYSERVE),
            "invoke",
            str(ROOT / "events" / "empty.json"),
            "--handler",
            "broken_app.handler",
        ],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error == {
        "errorType": "ModuleNotFoundError",
        "errorMessage": "No module named 'no_such_dependency'",
    }


# --- the demo's console --------------------------------------------------------------------------


def test_demo_console_shows_the_banner_lazyserves_line_and_the_access_log() -> None:
    process = subprocess.Popen(
        [str(LAZYSERVE), "demo", "--port", "0"],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    console = Console(process)
    try:
        curl = console.wait_for(r"curl -s (http://127\.0\.0\.1:(\d+)/predict) .* -d '(.*)'$", 180)
        url, port, body = curl[1], int(curl[2]), curl[3]
        assert port != 0
        request = urllib.request.Request(
            url, data=body.encode(), headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer["predictions"][0]["label"] == 4
        console.wait_for(r'"POST /predict HTTP/1\.1" 200', 30)
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        console.rest()
    assert process.returncode == 130, console.seen  # Ctrl-C's exit status, and no traceback
    stdout = [line for name, line in console.seen if name == "stdout"]
    stderr = [line for name, line in console.seen if name == "stderr"]
    # The banner, then uvicorn's access line for the one request; nothing else.
    assert stdout[0].startswith("embedded S3 at http://127.0.0.1:")
    assert stdout[1] == f"serving the digits function on http://127.0.0.1:{port} (Ctrl-C stops)"
    assert stdout[2] == 'try it (a real handwritten 4; expect "label":4):'
    assert stdout[3].startswith(f"  curl -s http://127.0.0.1:{port}/predict ")
    (access,) = stdout[4:]
    assert re.fullmatch(r'INFO: +127\.0\.0\.1:\d+ - "POST /predict HTTP/1\.1" 200 OK', access)
    # lazyserve's one line: the model it loaded for that request.
    (loaded,) = stderr
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3} INFO +lazyserve: model loaded from s3://", loaded)


def test_serve_on_port_0_announces_the_port_it_bound() -> None:
    process = subprocess.Popen(
        [str(LAZYSERVE), "serve", "--port", "0"],
        cwd=ROOT,
        env={**os.environ, "LAZYSERVE_MODEL_URI": str(WEIGHTS)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    console = Console(process)
    try:
        running = console.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+) ", 180)
        port = int(running[1])
        assert port != 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as response:
            assert json.loads(response.read()) == {"status": "ok", "model": "not_loaded"}
    finally:
        process.send_signal(signal.SIGINT)
        console.rest()
    assert process.returncode == 130, console.seen
    assert not any("Traceback" in line for _, line in console.seen)


def test_invoke_with_the_app_instead_of_the_handler_says_which_to_give() -> None:
    done = lazyserve(
        "invoke",
        str(ROOT / "events" / "empty.json"),
        "--handler",
        "handler.app.app",
        LAZYSERVE_MODEL_URI=str(WEIGHTS),
    )
    assert one_line_error(done) == (
        "lazyserve invoke: error: argument --handler: handler.app.app is an ASGI app or a "
        "coroutine, not a Lambda handler: give the handler function (`handler = "
        "service.handler`), e.g. handler.app.handler"
    )
    assert done.returncode == 2
