"""New weights without a redeploy (LAZYSERVE_REFRESH_SECONDS), through the reference function
and moto's S3 server: an object replaced while requests flow switches the answers from the old
sha256 to the new one with none failed and none mixed; a corrupt new version (downloaded once),
or one that cannot fit beside the current one, leaves the current one serving. Then the
refresh's bookkeeping against a stand-in for S3: the budget follows what is resident however
sizes drift, a full pool evicts idle models for a refresh, and failures that no retry changes
are not downloaded again."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load

from handler.model import DigitsMLP
from lazyserve import SettingsError, load_settings
from lazyserve.errors import ModelChangedError, ModelFormatError, ModelIntegrityError
from lazyserve.pool import ModelPool
from lazyserve.refresh import Refresher, Target
from lazyserve.sources import ObjectStat
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


def weights_reads(s3: CountingS3Server) -> int:
    """GETs that read weights (a refresh's check is a 1-byte GET)."""
    return sum(r.range != "bytes=0-0" for r in s3.object_gets(BUCKET, KEY))


@pytest.fixture
def refreshing(s3: CountingS3Server, import_handler: ImportHandler) -> ModuleType:
    return import_handler(LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_REFRESH_SECONDS=EVERY)


@pytest.mark.anyio
async def test_a_replaced_object_switches_the_answers_with_none_failed_or_mixed(
    refreshing: ModuleType, s3: CountingS3Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lazyserve")
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
    # Each "model loaded" line names the digest of the model it loaded, the new one included;
    # lines written after the swap name the model then served.
    loaded = [r for r in caplog.records if r.getMessage().startswith("model loaded")]
    assert [r.model_sha256 for r in loaded] == [WEIGHTS_SHA256, NEW_SHA]
    logging.getLogger("lazyserve").info("after the swap")
    (after,) = [r for r in caplog.records if r.getMessage() == "after the swap"]
    assert after.model_sha256 == NEW_SHA


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
        await until(lambda: refresher.failures >= 1, client, seen)
        gets = weights_reads(s3)
        checks = refresher.checks
        await until(lambda: refresher.checks >= checks + 3, client, seen)
        meta = (await client.get("/model")).json()
    assert set(seen) == {WEIGHTS_SHA256}
    assert holder.status == "loaded"
    assert meta["sha256"] == WEIGHTS_SHA256
    assert meta["refresh"]["refreshes"] == 0
    # A version that cannot load is downloaded once, not once per round.
    assert meta["refresh"]["failures"] == 1
    assert weights_reads(s3) == gets
    failed = [r.getMessage() for r in caplog.records if "refresh of" in r.getMessage()]
    assert failed and failed[0].startswith(
        f"refresh of {s3_uri()} failed; the current version (sha256 {WEIGHTS_SHA256}) keeps "
        "serving and this version is not tried again: "
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


# -- the refresh's bookkeeping, with a stand-in for S3 (no network) ---------------------------


class Weights:
    """Stands in for a loaded model: what a refresh reads of it is its info."""

    def __init__(self, name: str, size: int, etag: str) -> None:
        self.name = name
        self.info = SimpleNamespace(
            sha256=f"{name}@{etag}", size_bytes=size, etag=etag, version_id=None
        )


class Prefix:
    """Objects by name: an ETag, the size a HEAD reports and the size a GET reads (they differ
    when the object is replaced between the two), or the error a load of it raises. Counts the
    loads that started reading, per name."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[str, int, int, BaseException | None]] = {}
        self.gets: Counter[str] = Counter()

    def put(
        self, name: str, etag: str, size: int, *, read: int | None = None, error: Any = None
    ) -> None:
        self.objects[name] = (etag, size, size if read is None else read, error)

    def stat(self, name: str) -> ObjectStat:
        etag, size, _, _ = self.objects[name]
        return ObjectStat(size=size, etag=etag, version_id=None)

    def load(self, name: str, reserve: Callable[[int], None]) -> Any:
        etag, _, read, error = self.objects[name]
        reserve(read)  # what the load will hold, before it reads
        self.gets[name] += 1
        if error is not None:
            raise error
        return Weights(name, read, etag)


def check_name(name: str) -> None:
    pass


def pool_of(prefix: Prefix, budget: int | None) -> ModelPool[Any]:
    return ModelPool(prefix.load, check=check_name, budget=budget, wait=LIMIT)


def target_of(models: ModelPool[Any], name: str, prefix: Prefix) -> Target:
    """What Service._pool_target builds, with the stand-in's HEAD and load."""
    (entry,) = [e for e in models.entries() if e.name == name]
    return Target(
        name=name,
        holder=entry.holder,
        stat=lambda: prefix.stat(name),
        reload=lambda reserve: prefix.load(name, reserve),
        reserve=lambda old, new: models.reserve_beside(entry, new),
        swapped=lambda old, new: models.swapped(entry, new.info.size_bytes),
        abandoned=lambda: models.abandoned(entry),
    )


def resident(models: ModelPool[Any]) -> int:
    """Bytes of the versions the pool's models serve now (each a Weights of a known size)."""
    return sum(
        loaded.info.size_bytes
        for entry in models.entries()
        if (loaded := entry.holder.peek()) is not None
    )


def use(models: ModelPool[Any], *names: str) -> None:
    for name in names:
        with models.lease(name):
            pass


def refresher() -> Refresher:
    return Refresher(3600, list)  # never started: each test calls check() itself


def test_the_budget_follows_what_is_resident_however_the_size_drifts() -> None:
    # A model alternating between 69 KB and 4.2 MB, replaced between each HEAD and GET (the
    # HEAD says one size, the load reads the other), beside two models that come and go. The
    # review saw 12.6 MB reserved for 4.3 MB held, and -87 MB with 68 MB held under 20 MiB.
    small, big = 69_000, 4_200_000
    budget = 2 * big + small  # two copies of the big version fit beside one small model
    prefix = Prefix()
    for name in ("a", "b", "c"):
        prefix.put(name, "v0", small)
    models = pool_of(prefix, budget)
    use(models, "a", "b")
    refresh = refresher()
    during: list[tuple[int, int]] = []
    for step in range(1, 13):
        head, read = (small, big) if step % 2 else (big, small)
        prefix.put("a", f"v{step}", head, read=read)
        reload = target_of(models, "a", prefix)

        def spy(reserve: Callable[[int], None], reload: Target = reload) -> Any:
            fresh = reload.reload(reserve)
            during.append((models.reserved, resident(models) + fresh.info.size_bytes))
            return fresh

        assert refresh.check(dataclasses.replace(reload, reload=spy)), step
        assert (models.reserved, step) == (resident(models), step)
        assert models.reserved <= budget
        use(models, "c" if step % 3 else "b")  # loads and evictions in between
        assert (models.reserved, step) == (resident(models), step)
        assert models.reserved <= budget
    assert all(reserved == held for reserved, held in during)  # both copies, while reloading
    assert refresh.counts() == {"checks": 12, "refreshes": 12, "failures": 0, "refused": 0}
    assert models.peak_reserved <= budget
    assert models.evictions > 0  # the big HEADs made room


def test_a_refresh_in_a_full_pool_evicts_an_idle_model_to_make_room() -> None:
    # Budget 150K, alpha and beta loaded (69 KB each), a new alpha pushed: refused forever
    # before, although evicting the idle beta makes room.
    prefix = Prefix()
    for name in ("alpha", "beta"):
        prefix.put(name, "v1", 69_000)
    models = pool_of(prefix, 150 * 1024)
    use(models, "alpha", "beta")
    prefix.put("alpha", "v2", 69_000)

    prefix.put("beta", "v2", 69_000)
    refresh = refresher()
    alpha, beta = target_of(models, "alpha", prefix), target_of(models, "beta", prefix)
    with models.lease("beta") as loaded:
        beta_weights = weakref.ref(loaded)
    del loaded
    gc.disable()  # freed by reference counting alone, not by a later collection
    try:
        assert refresh.check(alpha)
        assert beta_weights() is None  # evicted for alpha; the round's targets keep nothing
    finally:
        gc.enable()
    assert not refresh.check(beta)  # gone: nothing to renew, no failure
    assert refresh.counts() == {"checks": 1, "refreshes": 1, "failures": 0, "refused": 0}
    described = models.describe()
    assert [m["name"] for m in described["models"]] == ["alpha"]
    assert described["evictions"] == 1
    assert described["resident_bytes"] == resident(models) == 69_000
    with models.lease("alpha") as loaded:
        assert loaded.info.etag == "v2"


def test_a_refresh_never_evicts_a_model_in_use_nor_its_own_and_refuses_before_any_get(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prefix = Prefix()
    for name in ("alpha", "beta", "gamma"):
        prefix.put(name, "v1", 69_000)
    models = pool_of(prefix, 220_000)
    use(models, "alpha", "beta", "gamma")
    prefix.put("alpha", "v2", 100_000)
    refresh = refresher()
    with models.lease("gamma"):
        # 207 KB held + 100 KB: evicting the idle beta would still leave 238 KB > 220 KB.
        assert not refresh.check(target_of(models, "alpha", prefix))
    assert refresh.refused == 1
    assert models.evictions == 0  # beta was not evicted for nothing
    assert prefix.gets["alpha"] == 1  # the first load only: the refusal downloaded nothing
    assert models.reserved == resident(models) == 207_000
    assert (
        "refresh of alpha refused: the new version (100000 bytes) cannot be loaded beside the "
        "current one (69000 bytes) within the memory budget; it is served as it is"
    ) in caplog.text

    alone = pool_of(prefix, 150_000)
    use(alone, "alpha")  # 100 KB now; a new 100 KB version cannot fit beside it
    prefix.put("alpha", "v3", 100_000)
    assert not refresh.check(target_of(alone, "alpha", prefix))
    assert [m["name"] for m in alone.describe()["models"]] == ["alpha"]
    assert alone.reserved == resident(alone) == 100_000


def test_a_refresh_that_fails_gives_its_reservation_back() -> None:
    prefix = Prefix()
    prefix.put("a", "v1", 100)
    models = pool_of(prefix, 1000)
    use(models, "a")
    prefix.put("a", "v2", 100, read=300, error=ModelChangedError("replaced while read"))
    refresh = refresher()
    assert not refresh.check(target_of(models, "a", prefix))
    assert refresh.failures == 1
    assert models.reserved == resident(models) == 100
    assert not refresh.check(target_of(models, "a", prefix))  # retryable: tried again
    assert prefix.gets["a"] == 3


def test_a_new_version_that_fails_for_good_is_not_downloaded_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prefix = Prefix()
    prefix.put("a", "v1", 100)
    models = pool_of(prefix, None)
    use(models, "a")
    prefix.put("a", "v2", 100, error=ModelFormatError("s3://b/p/a.safetensors: not safetensors"))
    refresh = refresher()
    for _ in range(4):
        assert not refresh.check(target_of(models, "a", prefix))
    assert prefix.gets["a"] == 2  # the first load and one try of v2
    assert refresh.counts() == {"checks": 4, "refreshes": 0, "failures": 1, "refused": 0}
    assert (
        "refresh of a failed; the current version (sha256 a@v1) keeps serving and this version "
        "is not tried again: s3://b/p/a.safetensors: not safetensors"
    ) in caplog.text

    prefix.put("a", "v3", 120)  # fixed
    assert refresh.check(target_of(models, "a", prefix))
    with models.lease("a") as loaded:
        assert loaded.info.etag == "v3"
    assert models.reserved == resident(models) == 120


def test_a_refresh_that_sees_a_new_version_clears_a_remembered_failure() -> None:
    prefix = Prefix()
    prefix.put("a", "v1", 100, error=ModelIntegrityError("s3://b/p/a.safetensors: sha256 differs"))
    models = pool_of(prefix, None)
    for _ in range(3):
        with pytest.raises(ModelIntegrityError), models.lease("a"):
            pass
    assert prefix.gets["a"] == 1
    assert models.status() == "failed"

    refresh = refresher()
    assert not refresh.check(target_of(models, "a", prefix))  # unchanged: still remembered
    with pytest.raises(ModelIntegrityError), models.lease("a"):
        pass
    assert prefix.gets["a"] == 1

    prefix.put("a", "v2", 100)  # fixed
    assert not refresh.check(target_of(models, "a", prefix))  # forgets; the next request loads
    with models.lease("a") as loaded:
        assert loaded.info.etag == "v2"
    assert prefix.gets["a"] == 2
    assert models.status() == "loaded"


def test_one_round_goes_on_past_a_target_whose_hook_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prefix = Prefix()
    prefix.put("a", "v1", 100)
    prefix.put("b", "v1", 100)
    models = pool_of(prefix, None)
    use(models, "a", "b")
    prefix.put("a", "v2", 100, error=ModelChangedError("replaced while read"))
    prefix.put("b", "v2", 100)

    def broken() -> None:
        raise RuntimeError("a bug in a hook")

    refresh = refresher()
    a = dataclasses.replace(target_of(models, "a", prefix), abandoned=broken)
    refresh.check_all([a, target_of(models, "b", prefix)])
    assert "refresh of a failed unexpectedly" in caplog.text
    assert refresh.refreshes == 1  # b was renewed all the same
    with models.lease("b") as loaded:
        assert loaded.info.etag == "v2"
