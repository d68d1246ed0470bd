"""`GET /health`, `GET /ready` and `GET /model` for a model holder."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from lazyserve import timing
from lazyserve.lazy import LazyModel
from lazyserve.model import Loaded
from lazyserve.schemas import UNAVAILABLE, Health, ModelMetadata, ModelStatus

__all__ = ["model_metadata", "model_router"]


def model_router(holder: LazyModel[Loaded[Any]]) -> APIRouter:
    """`/health` (never starts a load), `/ready` (starts one; 503 until loaded), `/model`."""
    router = APIRouter()

    @router.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(model=holder.status)

    @router.get("/ready", response_model=Health, responses=UNAVAILABLE)
    async def ready() -> Health:
        await holder.aget()
        return Health(model=holder.status)

    @router.get("/model", response_model=ModelMetadata)
    async def model() -> ModelStatus:
        return model_metadata(holder)

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
        last_error=str(error) if error is not None else None,
        requests=timing.stats(),
        **(loaded.info.model_dump() if loaded is not None else {}),
    )
