"""Attribution for benchmarks.warm: the floor app of bare_app plus lazyserve's pieces, chosen by
name, so each piece's cost shows against the floor. Each piece is wired in one small function:
when lazyserve's internals move, only that function changes.

| piece | what it adds to the floor |
| --- | --- |
| `in_worker` | the forward runs through `lazyserve.workers.in_worker` (a thread hop per call) |
| `dependency` | a dependency that takes the body and awaits the model holder, as the reference |
| `setup_app` | `lazyserve.app.setup_app`: exception handlers, body limit, Server-Timing, routes |
| `edge` | `lazyserve.middleware.Edge` alone: body limit and Server-Timing (forward timed) |
| `lambda_handler` | `lazyserve.aws.LambdaHandler` around Mangum instead of bare Mangum |
| `emf` | one EMF document per invocation (`lazyserve.metrics.ModelMetrics.publish`) |
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import Depends, FastAPI
from mangum import Mangum

from benchmarks import bare_app
from benchmarks.bare_app import PredictRequest, PredictResponse
from handler.model import DigitsMLP

__all__ = ["PIECES", "build"]

PIECES = (
    "in_worker",
    "dependency",
    "setup_app",
    "edge",
    "lambda_handler",
    "emf",
)
Handler = Callable[[dict[str, Any], Any], Any]
Forward = Callable[[list[list[float]]], PredictResponse]
Hop = Callable[[Forward, list[list[float]]], Awaitable[PredictResponse]]


@functools.cache
def holder() -> Any:
    """A lazyserve model holder, loaded, for the pieces that need one (the same weights as the
    floor's global; the forward keeps using the global)."""
    from lazyserve import LazyModel, load_settings
    from lazyserve.model import load_model

    settings = load_settings({"LAZYSERVE_MODEL_URI": str(bare_app.WEIGHTS)})
    model: Any = LazyModel(lambda: load_model(DigitsMLP, settings), source=settings.model_uri)
    model.get()
    return model


# --- the forward and how it reaches a thread -----------------------------------------------------


def timed_forward() -> Forward:
    """The forward with its duration recorded, as the reference does for Server-Timing and the
    InferenceMs metric."""
    from lazyserve import timing

    def infer(rows: list[list[float]]) -> PredictResponse:
        with timing.timed("infer"):
            return bare_app.infer(rows)

    return infer


async def inline(forward: Forward, rows: list[list[float]]) -> PredictResponse:
    return forward(rows)


def in_worker_hop() -> Hop:
    from lazyserve.workers import in_worker

    async def hop(forward: Forward, rows: list[list[float]]) -> PredictResponse:
        return await in_worker(forward, rows)

    return hop


# --- the endpoint --------------------------------------------------------------------------------


def add_predict(app: FastAPI, forward: Forward, hop: Hop) -> None:
    @app.post("/predict")
    async def predict(request: PredictRequest) -> PredictResponse:
        return await hop(forward, request.inputs)


def add_predict_with_dependency(app: FastAPI, forward: Forward, hop: Hop) -> None:
    model = holder()

    async def digits_model(request: PredictRequest) -> Any:
        return await model.aget()

    # A default rather than Annotated[...]: with postponed annotations FastAPI would look the
    # local `digits_model` up in the module's globals.
    @app.post("/predict")
    async def predict(
        request: PredictRequest,
        loaded: Any = Depends(digits_model),  # noqa: B008
    ) -> PredictResponse:
        return await hop(forward, request.inputs)


# --- middlewares ---------------------------------------------------------------------------------


def with_setup_app(app: FastAPI) -> None:
    from lazyserve.app import setup_app

    setup_app(app, holder())


def with_edge(app: FastAPI) -> None:
    from lazyserve.middleware import MAX_BODY_BYTES, Edge

    app.add_middleware(Edge, limit=MAX_BODY_BYTES)


# --- the Lambda entry point ----------------------------------------------------------------------


def metrics() -> Any:
    from lazyserve.metrics import ModelMetrics

    return ModelMetrics()


def with_lambda_handler(app: FastAPI, emf: bool) -> Handler:
    from lazyserve.aws import LambdaHandler

    model = holder()
    handler: Handler = LambdaHandler(
        app,
        warmup=lambda event: {"warm": True, "model": model.get().info.model_dump()},
        metrics=metrics() if emf else None,
    )
    return handler


def with_emf(handler: Handler) -> Handler:
    """Bare Mangum plus the per-invocation timings collector and EMF flush lambda_handler adds."""
    from lazyserve import timing

    published = metrics()

    def invoke(event: dict[str, Any], context: Any) -> Any:
        token = timing.begin()
        try:
            return handler(event, context)
        finally:
            published.publish(timing.current())
            timing.end(token)

    return invoke


def build(pieces: Iterable[str]) -> Handler:
    """The floor with `pieces` (names from PIECES) added, as a Lambda handler; with none, an
    app built as the floor is."""
    chosen = set(pieces)
    unknown = chosen - set(PIECES)
    if unknown:
        raise ValueError(f"unknown pieces {sorted(unknown)}; accepted: {', '.join(PIECES)}")
    app = bare_app.new_app()
    # The reference adds its middlewares and model routes before /predict; so does this.
    if "setup_app" in chosen:
        with_setup_app(app)
    if "edge" in chosen:
        with_edge(app)
    # Without a timed forward the EMF document would be empty, and Server-Timing shorter.
    timed = chosen & {"setup_app", "edge", "emf"}
    forward = timed_forward() if timed else bare_app.infer
    hop = in_worker_hop() if "in_worker" in chosen else inline
    if "dependency" in chosen:
        add_predict_with_dependency(app, forward, hop)
    else:
        add_predict(app, forward, hop)
    if "setup_app" not in chosen:  # which has its own
        bare_app.add_health(app)
    if "lambda_handler" in chosen:
        return with_lambda_handler(app, emf="emf" in chosen)
    handler: Handler = Mangum(app, lifespan="off")
    return with_emf(handler) if "emf" in chosen else handler
