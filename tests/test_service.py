"""`Service`, the public object a model function is built from: what `@service.predict` accepts,
the routes and answers it wires, direct and SQS invocations through the same request model, and
the load mode applied for a function written the documented way (examples/own_model)."""

from __future__ import annotations

import copy
import gc
import importlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
import torch
from pydantic import BaseModel

from lazyserve import InvalidInput, Loaded, ModelUnavailable, Service, UnsupportedEvent
from lazyserve.settings import load_settings
from tests.helpers import (
    BUCKET,
    DIGIT_8,
    KEY,
    PARTS,
    WEIGHTS,
    ImportHandler,
    asgi_client,
    body_of,
    failing_gets,
    failures,
    load_event,
    s3_uri,
    sqs_batch,
    weights_gets,
    with_body,
)
from tests.s3server import CountingS3Server

ImportExample = Callable[..., ModuleType]
ROWS = [[5, 4, 1, 0], [0, 1, 2, 3]]  # MyNet: class 0 when the first two add up to more


class Request(BaseModel):
    inputs: list[list[float]]


class Response(BaseModel):
    labels: list[int]


def settings_for(uri: Path | str) -> Any:
    return load_settings({"LAZYSERVE_MODEL_URI": str(uri), "LAZYSERVE_LOAD": "lazy"})


@pytest.fixture
def example_weights(tmp_path: Path) -> Path:
    from examples.own_model.make_weights import make_weights

    return make_weights(tmp_path / "mynet.safetensors")


@pytest.fixture
def import_example(monkeypatch: pytest.MonkeyPatch) -> Iterator[ImportExample]:
    """Import examples.own_model.app afresh with the given settings, as a new process would."""

    def _import(**settings: str) -> ModuleType:
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        sys.modules.pop("examples.own_model.app", None)
        return importlib.import_module("examples.own_model.app")

    yield _import
    sys.modules.pop("examples.own_model.app", None)


# -- what @service.predict accepts -------------------------------------------------------------


def test_predict_needs_a_plain_function_of_model_and_request(example_weights: Path) -> None:
    from examples.own_model.net import MyNet

    service = Service(MyNet, settings=settings_for(example_weights))

    async def coroutine(model: Loaded[MyNet], request: Request) -> Response:
        raise AssertionError

    def one_parameter(request: Request) -> Response:
        raise AssertionError

    def not_a_model(model: Loaded[MyNet], request: dict[str, Any]) -> Response:
        raise AssertionError

    for fn, words in [
        (coroutine, "must be a plain `def coroutine(model, request)`"),
        (one_parameter, "must be a plain `def one_parameter(model, request)`"),
        (not_a_model, "annotate not_a_model()'s second parameter with a pydantic model"),
    ]:
        with pytest.raises(TypeError) as info:
            service.predict(fn)
        assert words in str(info.value)


def test_a_service_takes_one_predict_function(example_weights: Path) -> None:
    from examples.own_model.net import MyNet

    service = Service(MyNet, settings=settings_for(example_weights))

    def first(model: Loaded[MyNet], request: Request) -> Response:
        return Response(labels=[])

    assert service.predict(first) is first  # returned unchanged: callable in the user's tests
    with pytest.raises(TypeError, match="has a predict function already"):
        service.predict(first)


def test_annotations_that_name_later_classes_are_reported(example_weights: Path) -> None:
    from examples.own_model.net import MyNet

    service = Service(MyNet, settings=settings_for(example_weights))

    def early(model: Loaded[MyNet], request: DefinedLater) -> Response:  # type: ignore[name-defined]  # noqa: F821
        raise AssertionError

    with pytest.raises(TypeError, match="define the request and response models before"):
        service.predict(early)


# -- the example, as a user runs it --------------------------------------------------------------


@pytest.mark.anyio
async def test_the_example_serves_predict_health_ready_and_model(
    import_example: ImportExample, example_weights: Path
) -> None:
    mod = import_example(LAZYSERVE_MODEL_URI=str(example_weights))
    async with asgi_client(mod) as client:
        assert (await client.get("/health")).json() == {"status": "ok", "model": "not_loaded"}
        response = await client.post("/predict", json={"inputs": ROWS})
        assert response.status_code == 200, response.text
        assert response.json() == {"labels": [0, 1]}
        assert "infer;dur=" in response.headers["server-timing"]
        assert (await client.get("/ready")).status_code == 200
        meta = (await client.get("/model")).json()
        assert meta["status"] == "loaded"
        assert meta["size_bytes"] == example_weights.stat().st_size


@pytest.mark.anyio
async def test_the_example_openapi_documents_413_422_and_503(
    import_example: ImportExample, example_weights: Path
) -> None:
    mod = import_example(LAZYSERVE_MODEL_URI=str(example_weights))
    async with asgi_client(mod) as client:
        schema = (await client.get("/openapi.json")).json()
    predict = schema["paths"]["/predict"]["post"]
    assert {"200", "413", "422", "503"} <= set(predict["responses"])
    body = predict["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body.endswith("/PredictRequest")
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/PredictResponse"
    )


@pytest.mark.anyio
async def test_a_trailing_slash_is_a_404_not_a_redirect_to_a_made_up_host(
    import_example: ImportExample, example_weights: Path
) -> None:
    mod = import_example(LAZYSERVE_MODEL_URI=str(example_weights))
    async with asgi_client(mod) as client:
        response = await client.post("/predict/", json={"inputs": ROWS})
    assert response.status_code == 404


def test_a_trailing_slash_on_lambda_is_a_404(
    import_example: ImportExample, example_weights: Path
) -> None:
    mod = import_example(LAZYSERVE_MODEL_URI=str(example_weights))
    event = copy.deepcopy(load_event("http-api-predict"))
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/predict/"
    answer = mod.handler(event, None)
    assert answer["statusCode"] == 404
    assert "mangum" not in json.dumps(answer)


def test_the_example_answers_direct_invocations_with_the_same_json(
    import_example: ImportExample, example_weights: Path
) -> None:
    mod = import_example(LAZYSERVE_MODEL_URI=str(example_weights))
    assert mod.handler({"inputs": ROWS}, None) == {"labels": [0, 1]}
    with pytest.raises(InvalidInput) as info:
        mod.handler({"inputs": [[1, 2, 3]]}, None)
    assert str(info.value) == (
        "inputs[0]: List should have at least 4 items after validation, not 3. "
        "Accepted: inputs: 1 to 256 rows of 4"
    )
    with pytest.raises(UnsupportedEvent) as unsupported:
        mod.handler(load_event("s3-put"), None)
    assert '{"inputs": ...} for a direct prediction' in str(unsupported.value)


@pytest.mark.parametrize("mode", ["eager", "background"])
def test_the_example_applies_the_load_mode_at_import(
    import_example: ImportExample, example_weights: Path, mode: str
) -> None:
    mod = import_example(LAZYSERVE_MODEL_URI=str(example_weights), LAZYSERVE_LOAD=mode)
    if mode == "eager":
        assert mod.service.model.status == "loaded"  # before any request
    else:
        assert mod.service.model.status in ("loading", "loaded")
        mod.service.model.get(timeout=30)
    assert mod.service.model.loads_started == 1


def test_imports_and_the_model_are_frozen_out_of_the_collector(
    import_example: ImportExample, example_weights: Path
) -> None:
    mod = import_example(LAZYSERVE_MODEL_URI=str(example_weights), LAZYSERVE_LOAD="eager")
    assert mod.service.model.status == "loaded"
    # torch alone leaves about 200k objects; full collections would walk them all.
    assert gc.get_freeze_count() > 50_000


# -- SQS batches through the reference function ---------------------------------------------------


@pytest.fixture
def reference(s3: CountingS3Server, import_handler: ImportHandler) -> ModuleType:
    return import_handler(LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_S3_PART_SIZE="16384")


GOOD = json.dumps({"inputs": [DIGIT_8]})
BAD = json.dumps({"inputs": [[1, 2, 3]]})


def test_sqs_lists_only_invalid_records_and_logs_the_answers(
    reference: ModuleType, s3: CountingS3Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="lazyserve")
    answer = reference.handler(sqs_batch(GOOD, BAD, "not json", "[1, 2]", GOOD), None)
    assert failures(answer) == ["message-1", "message-2", "message-3"]
    answered = [r for r in caplog.records if r.getMessage().endswith("answered")]
    assert [r.getMessage() for r in answered] == [
        "SQS message message-0 answered",
        "SQS message message-4 answered",
    ]
    assert all(r.answer["predictions"][0]["label"] == 8 for r in answered)  # type: ignore[attr-defined]
    assert weights_gets(s3) == PARTS


def test_sqs_all_good_is_an_empty_failure_list(reference: ModuleType) -> None:
    assert failures(reference.handler(load_event("sqs-predict"), None)) == []


def test_sqs_fifo_failure_fails_the_rest_of_its_group_only(reference: ModuleType) -> None:
    batch = sqs_batch(GOOD, BAD, GOOD, GOOD, fifo_groups=["a", "a", "a", "b"])
    # message-2 comes after a failure in group "a": it must wait for message-1's retry.
    assert failures(reference.handler(batch, None)) == ["message-1", "message-2"]


def test_sqs_with_an_unloadable_model_fails_every_record_after_one_load_attempt(
    reference: ModuleType, s3: CountingS3Server
) -> None:
    s3.fault = failing_gets(503, "SlowDown", "Please reduce your request rate.")
    answer = reference.handler(sqs_batch(GOOD, GOOD, GOOD), None)
    assert failures(answer) == ["message-0", "message-1", "message-2"]
    assert reference.service.model.loads_started == 1
    s3.fault = None
    assert failures(reference.handler(sqs_batch(GOOD), None)) == []  # the next batch recovers


def test_sqs_with_a_model_that_cannot_load_fails_its_records_without_a_load_each(
    reference: ModuleType, s3: CountingS3Server
) -> None:
    s3.fault = failing_gets(403, "AccessDenied", "Access Denied")
    for _ in range(3):
        answer = reference.handler(sqs_batch(GOOD, GOOD), None)
        assert failures(answer) == ["message-0", "message-1"]
    assert reference.service.model.loads_started == 1  # remembered, not tried per batch


def test_malformed_http_events_raise_unsupported_event(reference: ModuleType) -> None:
    broken_v2 = {"version": "2.0", "requestContext": {}}
    no_method = copy.deepcopy(load_event("rest-predict"))
    del no_method["httpMethod"]
    bad_base64 = with_body("http-api-predict", b"")
    bad_base64["body"] = "%%% not base64 %%%"
    for event in (broken_v2, no_method, bad_base64):
        with pytest.raises(UnsupportedEvent) as info:
            reference.handler(event, None)
        assert str(info.value).startswith("malformed HTTP event (")
    # The environment still serves.
    assert body_of(reference.handler(load_event("http-api-predict"), None))["model"]["sha256"]


def test_direct_invocation_of_an_unloadable_model_raises_model_unavailable(
    reference: ModuleType, s3: CountingS3Server
) -> None:
    s3.fault = failing_gets(404, "NoSuchKey", "The specified key does not exist.")
    with pytest.raises(ModelUnavailable) as info:
        reference.handler(load_event("direct-predict"), None)
    assert f"s3://{BUCKET}/{KEY}" in str(info.value)
    assert "NoSuchKey" in str(info.value)


@pytest.mark.anyio
async def test_a_users_own_app_gets_the_same_wiring(example_weights: Path) -> None:
    from examples.own_model.net import MyNet
    from fastapi import FastAPI

    app = FastAPI(title="mine")
    service = Service(MyNet, app=app, settings=settings_for(example_weights))

    @service.predict
    def predict(model: Loaded[MyNet], request: Request) -> Response:
        return Response(labels=model.module(torch.tensor(request.inputs)).argmax(1).tolist())

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"sha256": (await service.model.aget()).info.sha256}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/predict", content=json.dumps({"inputs": ROWS}))).json() == {
            "labels": [0, 1]
        }  # no Content-Type: read as JSON, as API Gateway does
        assert len((await client.get("/version")).json()["sha256"]) == 64
        assert (await client.post("/predict", json={"inputs": "x"})).status_code == 422


@pytest.mark.anyio
async def test_full_collections_per_1000_requests_are_rare_and_walk_little(
    import_handler: ImportHandler,
) -> None:
    """Counts, not times: after gc.freeze() (imports, then the load) a full collection has only
    what requests left behind to walk, not torch's ~200k objects."""
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_LOAD="eager")
    full = 0

    def count(phase: str, info: dict[str, Any]) -> None:
        nonlocal full
        if phase == "stop" and info["generation"] == 2:
            full += 1

    async with asgi_client(mod) as client:

        async def requests(n: int) -> None:
            for _ in range(n):
                response = await client.post("/predict", json={"inputs": [DIGIT_8]})
                assert response.status_code == 200

        await requests(100)
        gc.callbacks.append(count)
        try:
            async with anyio.create_task_group() as group:
                for _ in range(8):
                    group.start_soon(requests, 125)
        finally:
            gc.callbacks.remove(count)
    assert full <= 1
    assert gc.get_freeze_count() > 150_000
    assert len(gc.get_objects(generation=2)) < 20_000
