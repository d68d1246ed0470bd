"""The `lazyserve` command line, run as a user runs it: a subprocess from the repository root."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, WEIGHTS

LAZYSERVE = Path(sys.executable).parent / "lazyserve"
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
    for command in ("demo", "serve", "invoke"):
        assert re.search(rf"^\s+{command}\s", done.stdout, re.MULTILINE), done.stdout
