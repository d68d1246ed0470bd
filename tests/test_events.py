"""events/: every sample event, run with `lazyserve invoke` against the reference function,
answers what events/README.md says it answers, and the README lists every file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import EVENTS, ROOT, WEIGHTS

LAZYSERVE = Path(sys.executable).parent / "lazyserve"
README = EVENTS / "README.md"


def label_8(answer: Any) -> bool:
    (prediction,) = answer["predictions"]
    return bool(prediction["label"] == 8)


def http(status: int, body: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda answer: answer["statusCode"] == status and body(json.loads(answer["body"]))


def failed_messages(*numbers: int) -> Callable[[Any], bool]:
    ids = [f"00000000-0000-4000-8000-00000000000{n}" for n in numbers]
    return lambda answer: answer == {"batchItemFailures": [{"itemIdentifier": i} for i in ids]}


def error(kind: str) -> Callable[[Any], bool]:
    return lambda answer: answer.get("errorType") == kind


def warm(answer: Any) -> bool:
    return answer["warm"] is True and answer["model"]["uri"] == str(WEIGHTS)


def health(body: Any) -> bool:
    return bool(body["status"] == "ok")


# The README's words for each file's answer, and what they mean.
EXPECTED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "rest-predict.json": ("200, label 8", http(200, label_8)),
    "rest-health.json": ('200, `{"status": "ok", ...}`', http(200, health)),
    "http-api-predict.json": ("200, label 8", http(200, label_8)),
    "http-api-health.json": ('200, `{"status": "ok", ...}`', http(200, health)),
    "alb-predict.json": ("200, label 8", http(200, label_8)),
    "sqs.json": (
        "its message in `batchItemFailures`",
        lambda answer: (
            answer
            == {"batchItemFailures": [{"itemIdentifier": "19dd0b57-b21e-4ac1-bd88-01bbb068cb78"}]}
        ),
    ),
    "sqs-predict.json": ('`{"batchItemFailures": []}`', failed_messages()),
    "sqs-batch.json": ("messages 2 and 3 in `batchItemFailures`", failed_messages(2, 3)),
    "s3-put.json": ("error `UnsupportedEvent`", error("UnsupportedEvent")),
    "function-url-predict.json": ("200, label 8", http(200, label_8)),
    "direct-predict.json": ("label 8", label_8),
    "warmup.json": ('`{"warm": true, "model": {...}}`', warm),
    "empty.json": ('`{"warm": true, "model": {...}}`', warm),
    "direct-invalid.json": ("error `InvalidInput`", error("InvalidInput")),
}


def readme_answers() -> dict[str, str]:
    """File -> the README table's `lazyserve invoke` answers cell."""
    rows = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 4 and re.fullmatch(r"`[a-z0-9-]+\.json`", cells[0]):
            rows[cells[0].strip("`")] = cells[2]
    return rows


def test_the_readme_lists_every_event_with_its_answer() -> None:
    files = sorted(p.name for p in EVENTS.glob("*.json"))
    assert sorted(readme_answers()) == files
    assert readme_answers() == {name: words for name, (words, _) in EXPECTED.items()}


@pytest.fixture(scope="module")
def answers() -> dict[str, Any]:
    """Every event through one `lazyserve invoke` (one cold start): file -> printed answer."""
    names = list(EXPECTED)
    done = subprocess.run(
        [str(LAZYSERVE), "invoke", *(f"events/{name}" for name in names)],
        cwd=ROOT,
        env={**os.environ, "LAZYSERVE_MODEL_URI": str(WEIGHTS)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = done.stdout.splitlines()
    # An answer line, then its REPORT line, per event.
    assert len(lines) == 2 * len(names), done.stdout + done.stderr
    assert all(line.startswith("REPORT RequestId: ") for line in lines[1::2])
    return dict(zip(names, map(json.loads, lines[::2]), strict=True))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_event_gets_the_answer_the_readme_gives(name: str, answers: dict[str, Any]) -> None:
    words, check = EXPECTED[name]
    assert check(answers[name]), (words, answers[name])
