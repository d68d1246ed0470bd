"""`@service.predict_batch`: requests in flight together answered by one call of the function.

The gathering rules on the batcher itself (a clock that never moves shows what waits and what
does not), then the service as users see it: in process under real concurrency (anyio tasks
against the ASGI app), under a real uvicorn, and on Lambda (HTTP a batch of one, SQS batches and
direct lists in one call per model). Calls are counted by the predict function itself; a first
call held open lets each test know which requests the next call gathers."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
import torch
from examples.own_model.make_weights import make_weights
from examples.own_model.net import MyNet
from fastapi import HTTPException
from pydantic import BaseModel, Field

from lazyserve import InvalidInput, Loaded, PredictFailed, Service, timing
from lazyserve.batching import Batcher
from lazyserve.cli import FakeContext
from lazyserve.settings import load_settings
from tests.helpers import (
    UvicornProcess,
    body_of,
    failures,
    header,
    sqs_batch,
    wait_until,
    with_body,
)

LIMIT = 30.0  # seconds any one wait of a test may take before it fails
ROW_0 = [5.0, 4.0, 1.0, 0.0]  # MyNet: class 0 when the first two add up to more
ROW_1 = [0.0, 1.0, 2.0, 3.0]


class Row(BaseModel):
    id: int
    inputs: list[float] = Field(min_length=4, max_length=4, description="4 numbers")


class Label(BaseModel):
    id: int
    label: int


def row(i: int) -> dict[str, Any]:
    """Request `i`: even ids are class 0, odd ones class 1."""
    return {"id": i, "inputs": ROW_0 if i % 2 == 0 else ROW_1}


def label(i: int) -> dict[str, int]:
    return {"id": i, "label": i % 2}


class Model:
    """The tests' predict function: records each call (the ids, the model's file), holds its
    first call open until `release()` when asked, and raises for a request with a negative id."""

    def __init__(self, *, hold: bool = False, wrong_count: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.files: list[str] = []
        self.threads: list[str] = []
        self._gate = threading.Event()
        self.wrong_count = wrong_count
        if not hold:
            self._gate.set()

    def release(self) -> None:
        self._gate.set()

    def __call__(self, model: Loaded[MyNet], requests: list[Row]) -> list[Label]:
        self.calls.append([r.id for r in requests])
        self.files.append(Path(model.info.uri).name)
        self.threads.append(threading.current_thread().name)
        assert torch.is_inference_mode_enabled()
        if len(self.calls) == 1:
            assert self._gate.wait(LIMIT)
        if any(r.id < 0 for r in requests):
            raise ValueError("a negative id")
        labels = model.module(torch.tensor([r.inputs for r in requests])).argmax(1).tolist()
        answers = [Label(id=r.id, label=n) for r, n in zip(requests, labels, strict=True)]
        return answers[1:] if self.wrong_count else answers


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return make_weights(tmp_path / "mynet.safetensors")


@pytest.fixture
def prefix(tmp_path: Path, weights: Path) -> str:
    """A directory of two models, `a` and `b` (the same weights)."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a", "b"):
        shutil.copy(weights, models / f"{name}.safetensors")
    return f"{models}/"


Serve = Callable[..., Service[MyNet]]


@pytest.fixture
def serve(weights: Path) -> Iterator[Serve]:
    """`serve(model, uri=..., max_size=..., LAZYSERVE_X=...)`: a Service whose batched predict
    function is `model`."""
    made: list[Service[MyNet]] = []

    def make(model: Model, uri: str | None = None, **options: Any) -> Service[MyNet]:
        env = {k: v for k, v in options.items() if k.startswith("LAZYSERVE_")}
        limits = {k: v for k, v in options.items() if k not in env}
        settings = load_settings({"LAZYSERVE_MODEL_URI": uri or str(weights), **env})
        service = Service(MyNet, settings=settings)
        made.append(service)

        @service.predict_batch(**limits)
        def predict(model_: Loaded[MyNet], requests: list[Row]) -> list[Label]:
            """Label each row."""
            return model(model_, requests)

        return service

    yield make
    for service in made:
        service.close()


def client(service: Service[MyNet]) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=service.app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def waiting(service: Service[MyNet], count: int, key: str | None = None) -> Callable[[], bool]:
    batcher = service._batcher
    assert batcher is not None
    return lambda: batcher.waiting(key) == count


async def post_all(
    http: httpx.AsyncClient, bodies: list[Any], path: str = "/predict"
) -> list[httpx.Response]:
    """POST every body at once, each from its own task; the responses in the bodies' order."""
    responses: list[httpx.Response | None] = [None] * len(bodies)

    async def post(i: int, body: Any) -> None:
        responses[i] = await http.post(path, json=body)

    async with anyio.create_task_group() as group:
        for i, body in enumerate(bodies):
            group.start_soon(post, i, body)
    return [r for r in responses if r is not None]


# -- the gathering rules, on the batcher -----------------------------------------------------------


class FrozenClock:
    """A clock that stays where the test puts it; remembers whether a worker thread read it
    (the gathering, deciding whether to wait for more)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.read_by_worker = threading.Event()

    def __call__(self) -> float:
        if threading.current_thread() is not threading.main_thread():
            self.read_by_worker.set()
        return self.now


class Echo:
    """A batch function that answers each request with itself, holding its first call open."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []
        self.gate = threading.Event()

    def __call__(self, loaded: Any, requests: list[Any]) -> list[Any]:
        self.calls.append(list(requests))
        if len(self.calls) == 1:
            assert self.gate.wait(LIMIT)
        return list(requests)


async def submit_all(batcher: Batcher[Any, Any], requests: list[Any], loaded: Any = "v1") -> None:
    async with anyio.create_task_group() as group:
        for request in requests:
            group.start_soon(batcher.submit, None, loaded, request)


@pytest.mark.anyio
async def test_a_lone_request_goes_at_once_however_long_the_wait_allowed() -> None:
    # With a clock that never moves, a call that waited for company would never start.
    echo, clock = Echo(), FrozenClock()
    echo.gate.set()
    batcher = Batcher(echo, name="predict", max_size=8, max_wait_ms=1000, clock=clock)
    with anyio.fail_after(LIMIT):
        assert await batcher.submit(None, "v1", 1) == 1
        assert await batcher.submit(None, "v1", 2) == 2  # and again once the queue is idle
    assert echo.calls == [[1], [2]]
    assert not clock.read_by_worker.is_set()  # not even asked how long to wait
    assert batcher.stats() == {
        "max_size": 8,
        "max_wait_ms": 1000.0,
        "calls": 2,
        "mean_size": 1.0,
        "last_size": 1,
    }


@pytest.mark.anyio
async def test_requests_queued_behind_a_call_go_in_the_next_at_most_max_size_each() -> None:
    echo = Echo()
    batcher = Batcher(echo, name="predict", max_size=4, max_wait_ms=5)
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as group:
            group.start_soon(batcher.submit, None, "v1", 0)
            await wait_until(lambda: len(echo.calls) == 1)
            group.start_soon(submit_all, batcher, list(range(1, 10)))
            await wait_until(lambda: batcher.waiting() == 9)
            echo.gate.set()
    assert echo.calls == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert batcher.stats()["calls"] == 4 and batcher.stats()["last_size"] == 1


@pytest.mark.anyio
async def test_requests_that_queue_before_the_call_gathers_go_together() -> None:
    # Queued in the same turn of the loop: all there when the call gathers, none waits.
    echo = Echo()
    echo.gate.set()
    batcher = Batcher(echo, name="predict", max_size=4, max_wait_ms=1000, clock=FrozenClock())
    with anyio.fail_after(LIMIT):
        await submit_all(batcher, list(range(8)))
    assert sorted(r for call in echo.calls for r in call) == list(range(8))
    assert all(len(call) <= 4 for call in echo.calls)


@pytest.mark.anyio
async def test_two_queued_wait_for_more_until_max_size() -> None:
    echo, clock = Echo(), FrozenClock()
    batcher = Batcher(echo, name="predict", max_size=3, max_wait_ms=5, clock=clock)
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as group:
            group.start_soon(batcher.submit, None, "v1", 0)
            await wait_until(lambda: len(echo.calls) == 1)
            group.start_soon(submit_all, batcher, [1, 2])
            await wait_until(lambda: batcher.waiting() == 2)
            echo.gate.set()
            # The gathering found two, under max_size, the oldest not yet 5 ms old: it waits.
            await anyio.to_thread.run_sync(clock.read_by_worker.wait, LIMIT)
            assert echo.calls == [[0]]
            group.start_soon(batcher.submit, None, "v1", 3)  # the third fills the call
    assert echo.calls == [[0], [1, 2, 3]]


@pytest.mark.anyio
async def test_two_queued_go_once_the_oldest_has_waited_max_wait() -> None:
    echo, clock = Echo(), FrozenClock()
    batcher = Batcher(echo, name="predict", max_size=3, max_wait_ms=5, clock=clock)
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as group:
            group.start_soon(batcher.submit, None, "v1", 0)
            await wait_until(lambda: len(echo.calls) == 1)
            group.start_soon(submit_all, batcher, [1, 2])
            await wait_until(lambda: batcher.waiting() == 2)
            echo.gate.set()
            await anyio.to_thread.run_sync(clock.read_by_worker.wait, LIMIT)
            clock.now = 0.005  # the oldest has now waited max_wait_ms
    assert echo.calls == [[0], [1, 2]]


@pytest.mark.anyio
async def test_a_call_never_mixes_two_versions_of_a_model() -> None:
    # A refresh swaps the model between two requests: each version answers its own.
    echo = Echo()
    seen: list[Any] = []
    batcher = Batcher(
        lambda loaded, requests: seen.append(loaded) or echo(loaded, requests),
        name="predict",
        max_size=8,
    )
    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as group:
            group.start_soon(batcher.submit, None, "v1", 0)
            await wait_until(lambda: len(echo.calls) == 1)
            group.start_soon(submit_all, batcher, [1, 2], "v1")
            await wait_until(lambda: batcher.waiting() == 2)
            group.start_soon(submit_all, batcher, [3, 4], "v2")
            await wait_until(lambda: batcher.waiting() == 4)
            echo.gate.set()
    assert echo.calls == [[0], [1, 2], [3, 4]]
    assert seen == ["v1", "v1", "v2"]


@pytest.mark.anyio
async def test_a_request_whose_client_left_is_not_computed() -> None:
    echo = Echo()
    batcher = Batcher(echo, name="predict", max_size=8)
    gone = anyio.CancelScope()
    left = anyio.Event()

    async def leave() -> None:
        with gone:
            await batcher.submit(None, "v1", 1)
        left.set()

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as group:
            group.start_soon(batcher.submit, None, "v1", 0)
            await wait_until(lambda: len(echo.calls) == 1)
            group.start_soon(leave)
            await wait_until(lambda: batcher.waiting() == 1)
            gone.cancel()
            await left.wait()
            group.start_soon(batcher.submit, None, "v1", 2)
            await wait_until(lambda: batcher.waiting() == 2)
            echo.gate.set()
    assert echo.calls == [[0], [2]]


def test_the_limits_are_checked() -> None:
    for max_size, max_wait_ms, words in [
        (0, 5, "max_size=0: accepted: a whole number from 1 to 4096"),
        (4097, 5, "max_size=4097: accepted: a whole number from 1 to 4096"),
        (True, 5, "max_size=True: accepted: a whole number from 1 to 4096"),
        (8, -1, "max_wait_ms=-1: accepted: a number of milliseconds from 0 to 1000"),
        (8, float("nan"), "max_wait_ms=nan: accepted: a number of milliseconds from 0 to 1000"),
    ]:
        with pytest.raises(ValueError) as info:
            Batcher(Echo(), name="predict", max_size=max_size, max_wait_ms=max_wait_ms)
        assert str(info.value) == words


# -- what @service.predict_batch accepts -----------------------------------------------------------


def test_predict_batch_needs_a_function_of_a_model_and_a_list_of_requests(weights: Path) -> None:
    service = Service(MyNet, settings=load_settings({"LAZYSERVE_MODEL_URI": str(weights)}))

    def one_request(model: Loaded[MyNet], requests: Row) -> list[Label]:
        raise AssertionError

    def one_response(model: Loaded[MyNet], requests: list[Row]) -> Label:
        raise AssertionError

    async def coroutine(model: Loaded[MyNet], requests: list[Row]) -> list[Label]:
        raise AssertionError

    for fn, words in [
        (one_request, "annotate one_request()'s second parameter as list[YourRequest]"),
        (one_response, "annotate one_response()'s return as list[YourResponse] (one response"),
        (coroutine, "coroutine() must be a plain `def coroutine(model, requests)`"),
    ]:
        with pytest.raises(TypeError) as info:
            service.predict_batch(fn)
        assert words in str(info.value)
    with pytest.raises(ValueError, match="max_size=0: accepted: a whole number from 1 to 4096"):
        service.predict_batch(max_size=0)


def test_a_service_takes_predict_or_predict_batch_not_both(serve: Serve) -> None:
    service = serve(Model())

    def predict(model: Loaded[MyNet], request: Row) -> Label:
        raise AssertionError

    with pytest.raises(TypeError, match="has a predict function already"):
        service.predict(predict)
    with pytest.raises(TypeError, match="has a predict function already"):
        service.predict_batch(lambda model, requests: [])


@pytest.mark.anyio
async def test_the_route_is_documented_as_predicts_is(serve: Serve) -> None:
    service = serve(Model())
    async with client(service) as http:
        schema = (await http.get("/openapi.json")).json()
    predict = schema["paths"]["/predict"]["post"]
    assert set(predict["responses"]) == {"200", "408", "413", "422", "500", "503"}
    assert predict["description"] == "Label each row."
    body = predict["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body.endswith("/Row")
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/Label")


# -- in process, under real concurrency ------------------------------------------------------------


async def held_first(
    http: httpx.AsyncClient,
    model: Model,
    group: anyio.abc.TaskGroup,
    path: str = "/predict",
    body: dict[str, Any] | None = None,
) -> list[httpx.Response]:
    """POST `body` (request 0) from a task of `group` and return once its call is running
    (held open by `model`); its response lands in the list returned."""
    answers: list[httpx.Response] = []
    calls = len(model.calls)

    async def send() -> None:
        answers.append(await http.post(path, json=body or row(0)))

    group.start_soon(send)
    await wait_until(lambda: len(model.calls) > calls)
    return answers


async def send_all(
    group: anyio.abc.TaskGroup, http: httpx.AsyncClient, bodies: list[Any], path: str = "/predict"
) -> list[httpx.Response]:
    """post_all from a task of `group`; the responses land in the list returned."""
    answers: list[httpx.Response] = []

    async def send() -> None:
        answers.extend(await post_all(http, bodies, path))

    group.start_soon(send)
    return answers


@pytest.mark.anyio
async def test_concurrent_requests_are_gathered_into_one_call(serve: Serve) -> None:
    model = Model(hold=True)
    service = serve(model)
    async with client(service) as http:
        with anyio.fail_after(LIMIT):
            async with anyio.create_task_group() as group:
                first = await held_first(http, model, group)
                rest = await send_all(group, http, [row(i) for i in range(1, 16)])
                await wait_until(waiting(service, 15))
                model.release()
        answers = first + rest
        assert [r.status_code for r in answers] == [200] * 16
        assert [r.json() for r in answers] == [label(i) for i in range(16)]
        assert model.calls[0] == [0] and sorted(model.calls[1]) == list(range(1, 16))
        assert len(model.calls) == 2
        assert all(name.startswith("lazyserve-worker") for name in model.threads)
        timings = [r.headers["server-timing"] for r in answers]
        assert 'batch;desc="size=1"' in timings[0]
        assert all('batch;desc="size=15"' in t for t in timings[1:])
        assert all("queue;dur=" in t and "infer;dur=" in t for t in timings)
        meta = (await http.get("/model")).json()
    assert meta["batches"] == {
        "max_size": 32,
        "max_wait_ms": 5.0,
        "calls": 2,
        "mean_size": 8.0,
        "last_size": 15,
    }
    assert meta["requests"]["infer"]["count"] >= 2  # per call, not per request


@pytest.mark.anyio
async def test_the_model_reports_no_calls_before_the_first(serve: Serve) -> None:
    service = serve(Model(), max_size=4, max_wait_ms=1)
    async with client(service) as http:
        meta = (await http.get("/model")).json()
    assert meta["batches"] == {
        "max_size": 4,
        "max_wait_ms": 1.0,
        "calls": 0,
        "mean_size": None,
        "last_size": None,
    }


@pytest.mark.anyio
async def test_an_invalid_request_is_answered_422_before_it_joins_and_fails_no_neighbour(
    serve: Serve,
) -> None:
    model = Model(hold=True)
    service = serve(model)
    async with client(service) as http:
        with anyio.fail_after(LIMIT):
            async with anyio.create_task_group() as group:
                held = await held_first(http, model, group)
                valid = await send_all(group, http, [row(1), row(2), row(3)])
                await wait_until(waiting(service, 3))
                # Answered while the call before theirs is still held: they never joined.
                invalid = await post_all(http, [{"id": 4, "inputs": [1]}, {"id": "x"}])
                assert [r.status_code for r in invalid] == [422, 422]
                model.release()
    assert held[0].status_code == 200
    assert [r.json() for r in valid] == [label(1), label(2), label(3)]
    assert model.calls == [[0], [1, 2, 3]]


@pytest.mark.anyio
async def test_a_failing_call_fails_its_requests_only_each_with_its_request_id(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    model = Model(hold=True)
    service = serve(model)
    async with client(service) as http:
        with anyio.fail_after(LIMIT):
            async with anyio.create_task_group() as group:
                before = await held_first(http, model, group)
                failed = await send_all(group, http, [row(-1), row(5), row(6)])
                await wait_until(waiting(service, 3))
                model.release()
        after = await http.post("/predict", json=row(7))
    assert before[0].json() == label(0)  # the call before is unaffected
    assert [r.status_code for r in failed] == [500] * 3
    details = [r.json()["detail"] for r in failed]
    ids = [d["request_id"] for d in details]
    assert len(set(ids)) == 3
    for detail in details:
        assert detail == {
            "error": "predict_failed",
            "message": "the predict function failed; the log has its error under request id "
            + detail["request_id"],
            "request_id": detail["request_id"],
        }
    (logged,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged.getMessage() == "predict() raised ValueError for a batch of 3 requests"
    assert sorted(logged.request_ids) == sorted(ids)  # type: ignore[attr-defined]
    assert logged.exc_info is not None and "a negative id" in str(logged.exc_info[1])
    assert after.status_code == 200 and after.json() == label(7)  # and the call after


@pytest.mark.anyio
async def test_a_wrong_number_of_responses_is_a_predict_failure(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    service = serve(Model(wrong_count=True))
    async with client(service) as http:
        response = await http.post("/predict", json=row(0))
    assert response.status_code == 500
    assert response.json()["detail"]["error"] == "predict_failed"
    (logged,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged.exc_info is not None
    assert str(logged.exc_info[1]) == (
        "predict() returned 0 responses for 1 requests: return a list with one response per "
        "request, in order"
    )


@pytest.mark.anyio
async def test_an_http_exception_the_function_raises_answers_every_request_of_its_call(
    weights: Path,
) -> None:
    service = Service(MyNet, settings=load_settings({"LAZYSERVE_MODEL_URI": str(weights)}))

    @service.predict_batch
    def predict(model: Loaded[MyNet], requests: list[Row]) -> list[Label]:
        raise HTTPException(409, "not today")

    async with client(service) as http:
        answers = await post_all(http, [row(0), row(1)])
    assert [(r.status_code, r.json()) for r in answers] == [(409, {"detail": "not today"})] * 2


@pytest.mark.anyio
async def test_many_models_are_gathered_per_model_and_never_wait_for_each_other(
    serve: Serve, prefix: str
) -> None:
    model = Model(hold=True)
    service = serve(model, uri=prefix)
    a_path, b_path = "/models/a/predict", "/models/b/predict"
    async with client(service) as http:
        with anyio.fail_after(LIMIT):
            async with anyio.create_task_group() as group:
                first = await held_first(http, model, group, a_path)
                rest = await send_all(group, http, [row(1), row(2), row(3)], a_path)
                await wait_until(waiting(service, 3, "a"))
                # a's call is held; b's requests are answered meanwhile.
                b = await post_all(http, [row(i) for i in (4, 5, 6)], b_path)
                assert [r.json() for r in b] == [label(i) for i in (4, 5, 6)]
                model.release()
        assert [r.json() for r in first + rest] == [label(i) for i in range(4)]
        calls = list(zip(model.files, model.calls, strict=True))
        assert calls[0] == ("a.safetensors", [0])
        assert ("a.safetensors", [1, 2, 3]) in calls
        b_ids = [i for name, ids in calls if name == "b.safetensors" for i in ids]
        assert sorted(b_ids) == [4, 5, 6]
        models = (await http.get("/models")).json()["models"]
    described = {m["name"]: m["batches"] for m in models}
    assert described["a"]["calls"] == 2 and described["a"]["last_size"] == 3
    b_calls = described["b"]["calls"]
    assert described["b"]["mean_size"] == round(3 / b_calls, 3)


# -- under a real uvicorn --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_clients_of_a_real_uvicorn_share_calls(
    weights: Path, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "LAZYSERVE_MODEL_URI": str(weights),
        "LAZYSERVE_LOG_LEVEL": "WARNING",
        "BATCH_APP_HOLD": "15",
    }
    server = UvicornProcess(env, tmp_path / "uvicorn.log", app="tests.batch_app:app")
    answers: list[dict[str, Any]] = []

    async def one_client(i: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=LIMIT) as http:
            response = await http.post("/predict", json=row(i))
            assert response.status_code == 200, response.text
            answers.append(response.json())

    try:
        server.wait_healthy()
        async with httpx.AsyncClient(base_url=server.url, timeout=LIMIT) as probe:

            async def calls() -> int:
                return int((await probe.get("/model")).json()["batches"]["calls"])

            with anyio.fail_after(2 * LIMIT):
                async with anyio.create_task_group() as group:
                    group.start_soon(one_client, 0)
                    while await calls() == 0:  # the first call runs, held until 15 queue
                        await anyio.sleep(0.02)
                    for i in range(1, 16):
                        group.start_soon(one_client, i)
            meta = (await probe.get("/model")).json()
    finally:
        server.stop()
    by_id = sorted(answers, key=lambda a: int(a["id"]))
    assert [(a["id"], a["label"]) for a in by_id] == [(i, i % 2) for i in range(16)]
    assert [a["size"] for a in by_id] == [1] + [15] * 15
    assert meta["batches"]["calls"] == 2 and meta["batches"]["last_size"] == 15


# -- on Lambda -------------------------------------------------------------------------------------


def test_an_http_request_on_lambda_is_a_call_of_one(serve: Serve) -> None:
    model = Model()
    service = serve(model)
    event = with_body("http-api-predict", json.dumps(row(3)).encode())
    answer = service.handler(event, None)
    assert answer["statusCode"] == 200
    assert body_of(answer) == label(3)
    assert 'batch;desc="size=1"' in (header(answer, "server-timing") or "")
    assert model.calls == [[3]]
    assert model.threads == [threading.current_thread().name]  # inline: nothing else runs


def test_an_sqs_batch_is_one_call_for_its_valid_records(serve: Serve) -> None:
    model = Model()
    service = serve(model)
    bodies = [json.dumps(row(i)) for i in range(5)]
    bodies[1] = json.dumps({"id": 1, "inputs": [1]})
    bodies[3] = "not json"
    answer = service.handler(sqs_batch(*bodies), None)
    assert failures(answer) == ["message-1", "message-3"]
    assert model.calls == [[0, 2, 4]]


def test_an_sqs_batch_publishes_one_metrics_document_with_its_calls_inference_time(
    serve: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    model = Model()
    service = serve(model, LAZYSERVE_METRICS="on")
    event = sqs_batch(*[json.dumps(row(i)) for i in range(3)])
    service.handler(event, None)  # the cold one: the load's figures too
    capsys.readouterr()
    service.handler(event, None)
    lines = capsys.readouterr().out.splitlines()
    (document,) = [json.loads(line) for line in lines if line.startswith('{"_aws"')]
    (directive,) = document["_aws"]["CloudWatchMetrics"]
    assert [m["Name"] for m in directive["Metrics"]] == ["InferenceMs"]
    # One call's time, not one per record.
    assert document["InferenceMs"] == pytest.approx(timing.stats()["infer"]["last_ms"], abs=1e-3)
    assert model.calls == [[0, 1, 2], [0, 1, 2]]


def test_an_sqs_batch_larger_than_max_size_is_split(serve: Serve) -> None:
    model = Model()
    service = serve(model, max_size=2)
    answer = service.handler(sqs_batch(*[json.dumps(row(i)) for i in range(5)]), None)
    assert failures(answer) == []
    assert model.calls == [[0, 1], [2, 3], [4]]


def test_a_failing_call_fails_its_sqs_records(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    model = Model()
    service = serve(model)
    answer = service.handler(sqs_batch(*[json.dumps(row(i)) for i in (0, -1, 2)]), None)
    assert failures(answer) == ["message-0", "message-1", "message-2"]
    assert model.calls == [[0, -1, 2]]
    (logged,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged.getMessage() == (
        "the predict function raised ValueError for 3 requests: message-0, message-1, message-2"
    )


def test_sqs_fifo_a_failure_fails_the_later_records_of_its_group_unrun(serve: Serve) -> None:
    model = Model()
    service = serve(model)
    bodies = [json.dumps(row(i)) for i in range(5)]
    bodies[1] = json.dumps({"id": 1})
    batch = sqs_batch(*bodies, fifo_groups=["a", "a", "b", "a", "b"])
    assert failures(service.handler(batch, None)) == ["message-1", "message-3"]
    assert model.calls == [[0, 2, 4]]


def test_sqs_fifo_with_many_models_keeps_each_groups_order(serve: Serve, prefix: str) -> None:
    model = Model()
    service = serve(model, uri=prefix)

    def body(name: str, i: int) -> str:
        return json.dumps({"model": name, **row(i)})

    records = [body("a", 0), body("b", 1), body("a", 2), body("a", 3)]
    batch = sqs_batch(*records, fifo_groups=["g", "g", "g", "h"])
    assert failures(service.handler(batch, None)) == []
    # Message 2 may not run before message 1 (its group's), which is another model's.
    assert list(zip(model.files, model.calls, strict=True)) == [
        ("a.safetensors", [0, 3]),
        ("b.safetensors", [1]),
        ("a.safetensors", [2]),
    ]

    model.calls.clear()
    model.files.clear()
    records[1] = body("b", -1)
    failed = failures(service.handler(sqs_batch(*records, fifo_groups=["g", "g", "g", "h"]), None))
    assert failed == ["message-1", "message-2"]
    assert model.calls == [[0, 3], [-1]]  # message 2 never ran: its group's earlier one failed


def test_a_direct_list_is_answered_in_order_in_one_call(serve: Serve) -> None:
    model = Model()
    service = serve(model)
    payloads: list[Any] = [row(0), {"id": 1, "inputs": [1]}, row(2), "x", row(4)]
    assert service.handler({"batch": payloads}, None) == {
        "batch": [
            label(0),
            {
                "errorType": "InvalidInput",
                "errorMessage": "inputs: List should have at least 4 items after validation, "
                "not 1. Accepted: inputs: 4 numbers",
            },
            label(2),
            {"errorType": "InvalidInput", "errorMessage": "batch[3] is not a JSON object"},
            label(4),
        ]
    }
    assert model.calls == [[0, 2, 4]]
    assert service.handler({"batch": []}, None) == {"batch": []}
    assert service.handler(row(5), None) == label(5)  # a single payload, as with predict
    assert model.calls == [[0, 2, 4], [5]]
    with pytest.raises(InvalidInput) as info:
        service.handler({"batch": {"id": 1}}, None)
    assert str(info.value) == (
        '"batch" is a dict; accepted: a list of request objects, each as a direct invocation '
        "carries one"
    )


def test_a_direct_list_entry_of_a_failing_call_names_the_invocations_request_id(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    model = Model()
    service = serve(model, max_size=2)
    context = FakeContext()
    context.aws_request_id = "the-invocation"
    answer = service.handler({"batch": [row(0), row(1), row(-2)]}, context)["batch"]
    assert answer == [
        label(0),
        label(1),
        {"errorType": "PredictFailed", "errorMessage": str(PredictFailed("the-invocation"))},
    ]
    assert model.calls == [[0, 1], [-2]]
    (logged,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged.request_id == "the-invocation"  # type: ignore[attr-defined]
    with pytest.raises(PredictFailed) as info:  # a single payload raises, as with predict
        service.handler(row(-3), context)
    assert str(info.value) == str(PredictFailed("the-invocation"))
    assert isinstance(info.value.__cause__, ValueError)


def test_a_direct_list_names_its_models(serve: Serve, prefix: str) -> None:
    model = Model()
    service = serve(model, uri=prefix)
    payloads = [{"model": "a", **row(0)}, {"model": "b", **row(1)}, {"model": "a", **row(2)}]
    payloads.append(row(3))  # no model named
    payloads.append({"model": "nope", **row(4)})
    answer = service.handler({"batch": payloads}, None)["batch"]
    assert answer[:3] == [label(0), label(1), label(2)]
    assert answer[3]["errorType"] == "InvalidInput"
    assert answer[4]["errorType"] == "ModelNotFound"
    assert answer[4]["errorMessage"].startswith("no model named 'nope': ")
    assert list(zip(model.files, model.calls, strict=True)) == [
        ("a.safetensors", [0, 2]),
        ("b.safetensors", [1]),
    ]


def test_the_settings_override_the_decorators_limits(serve: Serve) -> None:
    model = Model()
    service = serve(
        model, max_size=8, max_wait_ms=50, LAZYSERVE_BATCH_MAX="2", LAZYSERVE_BATCH_WAIT_MS="0"
    )
    assert service.handler({"batch": [row(i) for i in range(5)]}, None)["batch"][4] == label(4)
    assert model.calls == [[0, 1], [2, 3], [4]]
    batcher = service._batcher
    assert batcher is not None
    assert (batcher.max_size, batcher.max_wait_ms) == (2, 0.0)
