"""`GET /health`, `GET /ready` and `GET /model` for a model holder."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from fastapi import APIRouter

from lazyserve import timing
from lazyserve.error_handlers import bounded
from lazyserve.errors import ModelNotFound
from lazyserve.lazy import LazyModel
from lazyserve.model import Loaded
from lazyserve.pool import ModelPool
from lazyserve.refresh import Refresher
from lazyserve.schemas import FAILED, UNAVAILABLE, Batches, Health, ModelMetadata, ModelStatus

__all__ = ["BatchStats", "model_metadata", "model_router", "pool_router", "prefix_router"]

BatchStats = Callable[[Hashable], dict[str, Any]]
"""A batched predict function's figures for one model (None: the only one): Batcher.stats."""


def model_router(
    holder: LazyModel[Loaded[Any]],
    refresher: Refresher | None = None,
    batches: BatchStats | None = None,
) -> APIRouter:
    """`/health` (never starts a load), `/ready` (starts one; 503 until loaded), `/model`."""
    router = APIRouter()

    @router.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(model=holder.status)

    @router.get("/ready", response_model=Health, responses={**UNAVAILABLE, **FAILED})
    async def ready() -> Health:
        await holder.aget()
        return Health(model=holder.status)

    @router.get("/model", response_model=ModelMetadata)
    async def model() -> ModelStatus:
        meta = model_metadata(holder)
        if refresher is not None:
            meta.refresh = refresher.counts()
        if batches is not None:
            meta.batches = Batches(**batches(None))
        return meta

    return router


def model_metadata(holder: LazyModel[Loaded[Any]]) -> ModelStatus:
    """The holder's status and, once loaded, what was loaded (every ModelInfo field)."""
    loaded = holder.peek()
    error = holder.last_error
    return ModelMetadata(
        status=holder.status,
        source=holder.source,
        loads=holder.loads_succeeded,
        load_attempts=holder.loads_started,
        last_error=bounded(str(error)) if error is not None else None,
        requests=timing.stats(),
        **(loaded.info.model_dump() if loaded is not None else {}),
    )


def pool_router(
    pool: ModelPool[Any], refresher: Refresher | None = None, batches: BatchStats | None = None
) -> APIRouter:
    """With many models: `/health`, `/ready` (nothing to load up front: 200) and `/models`."""
    router = APIRouter()

    @router.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(model=pool.status())

    @router.get("/ready", response_model=Health)
    async def ready() -> Health:
        return Health(model=pool.status())

    @router.get("/models")
    async def models() -> dict[str, Any]:
        described = pool.describe()
        if batches is not None:
            for model in described["models"]:
                model["batches"] = batches(model["name"])
        if refresher is not None:
            described["refresh"] = refresher.counts()
        return described

    return router


def prefix_router() -> APIRouter:
    """With many models, the single-model paths answer a 404 that says where to go instead."""
    router = APIRouter(include_in_schema=False)
    where = (
        "this function serves many models (LAZYSERVE_MODEL_URI ends in /): POST "
        "/models/{name}/predict to predict with model NAME, GET /models for the resident ones"
    )

    @router.post("/predict")
    async def predict() -> None:
        raise ModelNotFound(where)

    @router.get("/model")
    async def model() -> None:
        raise ModelNotFound(where)

    return router
