"""Malformed Lambda events: every stored event in events/ (as `sam local generate-event` wrote
them) mutated field by field (null, wrong types, removed, huge strings, nested junk, records that
are not objects, bodies that are not strings, base64 garbage), deterministically from a seed.
Each must end in an answer a caller can use: an HTTP response (below 500), a partial batch
response, a direct answer, or `UnsupportedEvent` / `InvalidInput`; never another exception, and
never a 500 that lazyserve made of a bad event."""

from __future__ import annotations

import base64
import collections
import copy
import json
import logging
import random
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from lazyserve.errors import InvalidInput, UnsupportedEvent
from tests.helpers import EVENTS, WEIGHTS, ImportHandler

SEED = 20240611
CASES = 6000

Place = tuple[str | int, ...]

JUNK: list[Any] = [
    None,
    0,
    -1,
    1.5,
    10**40,
    float("nan"),
    float("inf"),
    True,
    False,
    "",
    " ",
    "null",
    "{",
    "\x00",
    "\ud800",
    "é\u202e",
    "../../etc/passwd",
    "%%%",
    "GET",
    "/",
    [],
    {},
    [None],
    [1, "a", None],
    {"a": {"b": [None]}},
    {"": None},
]

# The fields lazyserve and Mangum read: most mutations land on one of these (uniform choice
# would spend them on requestContext's many fields that nothing reads).
READ = {
    "Records",
    "attributes",
    "body",
    "cookies",
    "elb",
    "eventSource",
    "eventSourceARN",
    "headers",
    "http",
    "httpMethod",
    "identity",
    "inputs",
    "isBase64Encoded",
    "messageId",
    "method",
    "model",
    "multiValueHeaders",
    "multiValueQueryStringParameters",
    "MessageGroupId",
    "path",
    "queryStringParameters",
    "rawPath",
    "rawQueryString",
    "requestContext",
    "resource",
    "sourceIp",
    "version",
    "warmup",
    "x-forwarded-port",
    "host",
    "Host",
    "content-type",
    "content-length",
}

STORED = {path.stem: json.loads(path.read_text()) for path in sorted(EVENTS.glob("*.json"))}


def paths(value: Any, prefix: Place = ()) -> Iterator[Place]:
    """Every place in a JSON value down to 8 levels (a stored event has 6), itself first."""
    yield prefix
    if len(prefix) == 8:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*prefix, index))


def nested(rng: random.Random) -> Any:
    depth = rng.choice([3, 50, 400])
    value: Any = rng.choice(["x", None, 1, {}])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def huge(rng: random.Random) -> str:
    size = rng.choice([70_000, 300_000, 7 * 1024 * 1024 if rng.random() < 0.05 else 1_000])
    return rng.choice("aZ9/+=é") * size


def garbage_base64(rng: random.Random) -> str:
    return rng.choice(
        [
            "%%% not base64 %%%",
            "YQ",  # bad padding
            "YWJj=ZGVm",
            base64.b64encode(rng.randbytes(rng.randrange(1, 200))).decode(),
            base64.b64encode(b'{"inputs": [[1, 2, 3]]}').decode(),
            "\u00e9\u00e9\u00e9\u00e9",
        ]
    )


def replacement(rng: random.Random, old: Any, key: str | int | None) -> Any:
    """A value to put where `old` was."""
    if key == "body" or (key is not None and rng.random() < 0.1):
        pick = rng.randrange(5)
        if pick == 0:
            return garbage_base64(rng)
        if pick == 1:
            return rng.choice(JUNK)
        if pick == 2:
            return json.dumps(rng.choice([*JUNK[:10], [[1] * 64], {"inputs": "x"}]))
        if pick == 3:  # JSON text nested deeper than Python's recursion limit
            depth = rng.choice([100, 5000])
            return '{"inputs": ' + "[" * depth + "]" * depth + "}"
    pick = rng.randrange(10)
    if pick <= 3:
        return rng.choice(JUNK)
    if pick == 4:
        return huge(rng)
    if pick == 5:
        return nested(rng)
    if pick == 6 and isinstance(old, dict):
        return list(old.values())  # an object as an array
    if pick == 6 and isinstance(old, list):
        return {str(i): item for i, item in enumerate(old)}  # an array as an object
    if pick == 7 and isinstance(old, str):
        return old.upper() if rng.random() < 0.5 else old[: len(old) // 2]
    if pick == 8:
        return [rng.choice(JUNK) for _ in range(rng.randrange(1, 4))]
    return {rng.choice(["", "x", "Host", "content-type"]): rng.choice(JUNK)}


def mutate(rng: random.Random, event: Any) -> Any:
    """`event` with one to three places changed (the event itself is one of the places), or
    with one field added that nothing reads (AWS adds fields to its events over time)."""
    if isinstance(event, dict) and rng.random() < 0.1:
        event[rng.choice(["extra", "X-Extra", "warmup", "model"])] = rng.choice(JUNK)
        return event
    for _ in range(rng.randrange(1, 4)):
        places = list(paths(event))
        read = [p for p in places if p and (p[-1] in READ or p[-2:-1] == ("Records",))]
        place = rng.choice(read if read and rng.random() < 0.7 else places)
        if not place:
            event = replacement(rng, event, None)
            continue
        parent = event
        for step in place[:-1]:
            parent = parent[step]
        key = place[-1]
        action = rng.random()
        if action < 0.2:
            del parent[key]  # a removed field (a list loses that item)
        elif action < 0.3 and isinstance(parent, dict) and isinstance(key, str):
            parent[key.upper() if key != key.upper() else key.lower()] = parent.pop(key)
        else:
            parent[key] = replacement(rng, parent[key], key)
    return event


def cases(count: int, seed: int = SEED) -> Iterator[tuple[str, Any]]:
    rng = random.Random(seed)
    names = sorted(STORED)
    for i in range(count):
        name = names[i % len(names)]
        yield name, mutate(rng, copy.deepcopy(STORED[name]))


def outcome(handler: Callable[[Any, Any], Any], event: Any) -> tuple[str, str | None]:
    """The kind of the handler's answer to `event`, and what is wrong with it (None: a proper
    answer)."""
    try:
        answer = handler(event, None)
    except (UnsupportedEvent, InvalidInput) as exc:
        size = len(str(exc))
        return type(exc).__name__, f"a message of {size} characters" if size > 1000 else None
    except Exception as exc:
        return "raised", f"raised {type(exc).__name__}: {str(exc)[:120]}"
    try:
        json.dumps(answer)  # what the runtime does with it
    except (TypeError, ValueError) as exc:
        return "unserialisable", f"an answer the runtime cannot serialise: {exc}"
    if isinstance(answer, dict) and "statusCode" in answer:
        status = answer["statusCode"]
        if not isinstance(status, int) or status >= 500:
            return "HTTP 5xx", f"HTTP {status}: {str(answer.get('body'))[:120]}"
        if not isinstance(answer.get("body"), str):
            return "HTTP", "an HTTP answer without a string body"
        return f"HTTP {status // 100}xx", None
    if isinstance(answer, dict) and set(answer) == {"batchItemFailures"}:
        items = answer["batchItemFailures"]
        if not all(isinstance(item.get("itemIdentifier"), str) for item in items):
            return "batch", f"batch failures without string ids: {str(items)[:120]}"
        return "batch with failures" if items else "batch", None
    if isinstance(answer, dict) and "predictions" in answer:
        return "direct answer", None
    if isinstance(answer, dict) and answer.get("warm") is True:
        return "warm-up", None
    return "unknown", f"an answer of no known shape: {str(answer)[:120]}"


@pytest.fixture
def reference(import_handler: ImportHandler) -> ModuleType:
    # The model is read from the local file: the outcomes are the events', not S3's.
    return import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_LOAD="lazy")


def test_mutated_events_get_proper_answers(
    reference: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    kinds: collections.Counter[str] = collections.Counter()
    problems: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    # Only errors are kept: a bad event must not be logged as a failure of the function
    # (an error line with a traceback is what an operator is paged for).
    with caplog.at_level(logging.ERROR, "lazyserve"), caplog.at_level(logging.ERROR, "mangum"):
        for name, event in cases(CASES):
            caplog.clear()
            kind, problem = outcome(reference.handler, event)
            kinds[kind] += 1
            if problem is None and caplog.records:
                record = caplog.records[0]
                problem = f"logged {record.levelname}: {record.getMessage()[:120]}"
            if problem is not None:
                key = problem.split(":")[0]
                problems[key] += 1
                examples.setdefault(key, f"{name}: {problem}")
    assert not problems, (sum(problems.values()), dict(problems), examples)
    # Every kind of answer was reached: the mutations are neither all fatal nor all harmless.
    for kind in (
        "HTTP 2xx",
        "HTTP 4xx",
        "batch",
        "batch with failures",
        "direct answer",
        "warm-up",
        "UnsupportedEvent",
        "InvalidInput",
    ):
        assert kinds[kind] >= 10, (kind, sorted(kinds.items()))
    # And the environment still answers the stored events as before.
    answer = reference.handler(STORED["http-api-predict"], None)
    assert answer["statusCode"] == 200
    assert json.loads(answer["body"])["predictions"][0]["label"] == 8
