"""New weights without a redeploy (LAZYSERVE_REFRESH_SECONDS), through the reference function
and moto's S3 server: an object replaced while requests flow switches the answers from the old
sha256 to the new one with none failed and none mixed; a corrupt new version, or one that cannot
fit beside the current one, leaves the current one serving."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load

from handler.model import DigitsMLP
from lazyserve import SettingsError, load_settings
from tests.helpers import (
    BUCKET,
    DIGIT_8,
    KEY,
    WEIGHTS_BYTES,
    WEIGHTS_SHA256,
    ImportHandler,
    asgi_client,
    digits_variant,
    put_object,
    s3_uri,
)
from tests.s3server import CountingS3Server

EVERY = "0.05"  # seconds between checks: short, so the tests wait little
LIMIT = 30.0  # bound on every wait for the background refresh; never reached when it works
NEW = digits_variant(1)
NEW_SHA = hashlib.sha256(NEW).hexdigest()


def probabilities(weights: bytes) -> list[float]:
    """What the model with these weights answers for the test digit."""
    model = DigitsMLP()
    model.load_state_dict(load(weights))
    with torch.inference_mode():
        out = torch.softmax(model(torch.tensor([DIGIT_8], dtype=torch.float32)), dim=1)
    return [float(p) for p in out[0]]


EXPECTED = {WEIGHTS_SHA256: probabilities(WEIGHTS_BYTES), NEW_SHA: probabilities(NEW)}


def computed_with(body: dict[str, Any]) -> str:
    """The sha256 the answer names, after checking its numbers came from that very model."""
    sha = str(body["model"]["sha256"])
    got = body["predictions"][0]["probabilities"]
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(got, EXPECTED[sha], strict=True))
    return sha


async def until(condition: Callable[[], Any], client: httpx.AsyncClient, seen: list[str]) -> None:
    """Send predictions until `condition()` holds (bounded), recording whose answers they were."""
    deadline = time.monotonic() + LIMIT
    while not condition():
        assert time.monotonic() < deadline, "the refresh did not happen in time"
        response = await client.post("/predict", json={"inputs": [DIGIT_8]})
        assert response.status_code == 200, response.text
        seen.append(computed_with(response.json()))


@pytest.fixture
def refreshing(s3: CountingS3Server, import_handler: ImportHandler) -> ModuleType:
    return import_handler(LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_REFRESH_SECONDS=EVERY)


@pytest.mark.anyio
async def test_a_replaced_object_switches_the_answers_with_none_failed_or_mixed(
    refreshing: ModuleType, s3: CountingS3Server
) -> None:
    seen: list[str] = []
    async with asgi_client(refreshing) as client:
        await until(lambda: len(seen) >= 5, client, seen)
        put_object(s3, KEY, NEW)
        await until(lambda: seen[-1] == NEW_SHA, client, seen)
        await until(lambda: seen.count(NEW_SHA) >= 5, client, seen)
        meta = (await client.get("/model")).json()
    switch = seen.index(NEW_SHA)
    assert set(seen[:switch]) == {WEIGHTS_SHA256} and set(seen[switch:]) == {NEW_SHA}
    assert meta["sha256"] == NEW_SHA
    assert meta["refresh"]["refreshes"] == 1
    assert meta["refresh"]["failures"] == 0
    assert meta["loads"] == 2


@pytest.mark.anyio
async def test_a_corrupt_new_version_leaves_the_current_one_serving(
    refreshing: ModuleType, s3: CountingS3Server, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    holder = refreshing.service.model
    async with asgi_client(refreshing) as client:
        await until(lambda: len(seen) >= 2, client, seen)
        put_object(s3, KEY, b"not a safetensors file at all" * 100)
        refresher = refreshing.service.refresher
        await until(lambda: refresher.failures >= 2, client, seen)
        meta = (await client.get("/model")).json()
    assert set(seen) == {WEIGHTS_SHA256}
    assert holder.status == "loaded"
    assert meta["sha256"] == WEIGHTS_SHA256
    assert meta["refresh"]["refreshes"] == 0
    failed = [r.getMessage() for r in caplog.records if "refresh of" in r.getMessage()]
    assert failed and failed[0].startswith(
        f"refresh of {s3_uri()} failed; the current version (sha256 {WEIGHTS_SHA256}) keeps "
        "serving: "
    )


@pytest.mark.anyio
async def test_a_refresh_that_cannot_fit_beside_the_current_version_is_refused(
    s3: CountingS3Server, import_handler: ImportHandler, caplog: pytest.LogCaptureFixture
) -> None:
    mod = import_handler(
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_REFRESH_SECONDS=EVERY,
        LAZYSERVE_MEMORY_BUDGET=str(len(WEIGHTS_BYTES) * 3 // 2),
    )
    seen: list[str] = []
    async with asgi_client(mod) as client:
        await until(lambda: len(seen) >= 2, client, seen)
        put_object(s3, KEY, NEW)
        refresher = mod.service.refresher
        await until(lambda: refresher.refused >= 1, client, seen)
    assert set(seen) == {WEIGHTS_SHA256}
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused[0] == (
        f"refresh of {s3_uri()} refused: the new version ({len(NEW)} bytes) cannot be loaded "
        f"beside the current one ({len(WEIGHTS_BYTES)} bytes) within the memory budget; it is "
        "served as it is"
    )


@pytest.mark.anyio
async def test_many_models_refresh_one_at_a_time(
    s3: CountingS3Server, import_handler: ImportHandler
) -> None:
    put_object(s3, "many/a.safetensors", WEIGHTS_BYTES)
    put_object(s3, "many/b.safetensors", WEIGHTS_BYTES)
    mod = import_handler(
        LAZYSERVE_MODEL_URI=f"s3://{BUCKET}/many/", LAZYSERVE_REFRESH_SECONDS=EVERY
    )
    body = {"inputs": [DIGIT_8]}
    async with asgi_client(mod) as client:
        for name in ("a", "b"):
            assert (await client.post(f"/models/{name}/predict", json=body)).status_code == 200
        put_object(s3, "many/b.safetensors", NEW)
        deadline = time.monotonic() + LIMIT
        while True:
            b = (await client.post("/models/b/predict", json=body)).json()
            if computed_with(b) == NEW_SHA:
                break
            assert time.monotonic() < deadline, "the refresh did not happen in time"
        a = (await client.post("/models/a/predict", json=body)).json()
        listed = (await client.get("/models")).json()
    assert computed_with(a) == WEIGHTS_SHA256
    assert listed["refresh"]["refreshes"] == 1
    assert listed["resident_bytes"] == len(WEIGHTS_BYTES) + len(NEW)


@pytest.mark.parametrize(
    ("uri", "what"),
    [(f"{s3_uri()}?versionId=3HL4kq", "pins one version"), ("/srv/w.safetensors", "is not in S3")],
)
def test_refresh_of_a_uri_that_cannot_change_is_refused_at_import(uri: str, what: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"LAZYSERVE_MODEL_URI": uri, "LAZYSERVE_REFRESH_SECONDS": "60"})
    assert str(info.value) == (
        f"LAZYSERVE_REFRESH_SECONDS is set, but LAZYSERVE_MODEL_URI {uri!r} {what}: only an "
        "s3:// URI without ?versionId= can change. Unset one of them."
    )
