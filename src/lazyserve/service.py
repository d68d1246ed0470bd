"""`Service`: the one object a model function is built from. It reads the settings, sets up
logging, holds the model (or, for a URI ending in `/`, many models under a memory budget) and
applies the load mode, builds the FastAPI app with every route and error answer, renews
changed weights when asked, and is the Lambda handler."""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import torch
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError

from lazyserve import timing
from lazyserve.app import setup_app
from lazyserve.aws import LambdaHandler, invalid_input
from lazyserve.environment import memory_limit, on_lambda, resident_bytes
from lazyserve.errors import InvalidInput, ModelNotFound
from lazyserve.lazy import LazyModel
from lazyserve.logs import configure_logging
from lazyserve.metrics import ModelMetrics, metrics_enabled
from lazyserve.middleware import MetricsMiddleware
from lazyserve.model import Loaded, load_model
from lazyserve.pool import ModelPool, PoolEntry
from lazyserve.refresh import Refresher, Target, beside
from lazyserve.routes import model_router, pool_router
from lazyserve.schemas import NOT_FOUND, TOO_LARGE, UNAVAILABLE
from lazyserve.settings import Settings, load_settings
from lazyserve.signatures import dumper, in_inference_mode, io_types
from lazyserve.signatures import rules as signature_rules
from lazyserve.sources import head
from lazyserve.startup import start_loading
from lazyserve.types import LambdaContext, LambdaEvent, S3Client
from lazyserve.workers import Inference

__all__ = ["Service"]

M = TypeVar("M", bound=torch.nn.Module)
Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp")
PredictFn = Callable[[Loaded[M], Req], Resp]

INFERENCE_HEADROOM = 0.10
"""Share of the function's memory the default budget leaves for inference (activations)."""


class Service(Generic[M]):
    """A served model: `app` for uvicorn, `handler` for AWS Lambda, `@predict` for the route.

    `build` makes the user's `nn.Module` (it runs on the meta device, then adopts the loaded
    weights). Settings come from the LAZYSERVE_* environment variables unless given. With a
    `LAZYSERVE_MODEL_URI` ending in `/`, model NAME is `<prefix>NAME.safetensors`, served at
    `POST /models/{name}/predict` (and `{"model": NAME, ...}` for direct and SQS invocations).
    """

    def __init__(
        self,
        build: Callable[[], M],
        *,
        app: FastAPI | None = None,
        settings: Settings | None = None,
        s3_client: S3Client | None = None,
    ) -> None:
        # Logging first: what loading the settings warns about (a mistyped LAZYSERVE_*
        # variable) then reaches Lambda's log as one JSON line, like everything else.
        configure_logging()
        self.settings = settings if settings is not None else load_settings()
        configure_logging(self.settings.log_level)
        torch.set_num_threads(self.settings.torch_threads)
        self._build = build
        self._s3_client = s3_client
        self.uri = self.settings.uri
        name = getattr(build, "__name__", "model")
        self.app = app if app is not None else FastAPI(title=f"{name} (lazyserve)")
        # Mangum gives a request without a Host header the host "mangum": Starlette's
        # trailing-slash redirect would send clients to https://mangum/... An exact path or 404.
        self.app.router.redirect_slashes = False
        setup_app(self.app)
        self.metrics = ModelMetrics() if metrics_enabled(self.settings.metrics) else None
        if self.metrics is not None and not on_lambda():
            # On Lambda the handler publishes once per invocation, whatever the event.
            self.app.add_middleware(MetricsMiddleware, metrics=self.metrics)
        # Decided once, after the imports: the weights may use what the imports left.
        self.budget = self.settings.memory_budget or _default_budget()
        self.refresher: Refresher | None = None
        every = self.settings.refresh_seconds
        if every is not None and self.uri.is_s3 and self.uri.version_id is None:
            self.refresher = Refresher(every, self._refresh_targets).start()
        self._holder: LazyModel[Loaded[M]] | None = None
        self.pool: ModelPool[Loaded[M]] | None = None
        if self.uri.is_prefix:
            self.pool = ModelPool(
                self._load_named,
                check=self._check_name,
                budget=self.budget,
                wait=self.settings.load_wait,
            )
            self.app.include_router(pool_router(self.pool, self.refresher))
        else:
            self._holder = LazyModel(
                self._load, wait=self.settings.load_wait, source=self.settings.model_uri
            )
            self.app.include_router(model_router(self._holder, self.refresher))
        self._answer: Callable[[Mapping[str, Any]], Any] | None = None
        self._direct_keys: frozenset[str] = frozenset()
        self._lambda: LambdaHandler | None = None
        self.load_mode = (
            "lazy" if self._holder is None else start_loading(self._holder, self.settings)
        )
        # What the imports created lives as long as the process: out of the collector's sight,
        # a full collection no longer walks torch's ~200k objects on every pass.
        gc.freeze()

    def close(self) -> None:
        """Stop the background refresh, if any (a process that builds services repeatedly)."""
        if self.refresher is not None:
            self.refresher.stop()

    @property
    def model(self) -> LazyModel[Loaded[M]]:
        """The model holder (`await service.model.aget()` in your own routes)."""
        if self._holder is None:
            raise AttributeError(
                "this Service serves many models (its URI ends in /): use "
                "`async with service.pool.alease(name) as model:` instead of service.model"
            )
        return self._holder

    # -- loading ----------------------------------------------------------------------------------

    def _load(self) -> Loaded[M]:
        loaded = load_model(self._build, self.settings, s3_client=self._s3_client)
        if self.metrics is not None:
            self.metrics.loaded(loaded.info)
        gc.freeze()  # the model's objects too (see __init__)
        return loaded

    def _check_name(self, name: str) -> None:
        try:
            self.uri.for_model(name)
        except ValueError as exc:
            raise ModelNotFound(str(exc)) from None

    def _load_named(self, name: str, reserve: Callable[[int], None]) -> Loaded[M]:
        # No gc.freeze() here: an evicted model must stay collectable.
        loaded = load_model(
            self._build,
            self.settings,
            uri=self.uri.for_model(name),
            reserve=reserve,
            s3_client=self._s3_client,
        )
        if self.metrics is not None:
            self.metrics.loaded(loaded.info, name)
        return loaded

    # -- the prediction ---------------------------------------------------------------------------

    def predict(self, fn: PredictFn[M, Req, Resp]) -> PredictFn[M, Req, Resp]:
        """Declare the prediction: `fn(model, request) -> response`, a plain function run under
        `torch.inference_mode()`. It serves `POST /predict` (the body validated as `request`'s
        type before the model is awaited), direct Lambda invocations with the same JSON, and
        SQS records. Returns `fn` unchanged."""
        if self._answer is not None:
            raise TypeError("this Service has a predict function already; it takes one")
        request_type, response_type = io_types(fn)
        inference = Inference(in_inference_mode(fn))
        endpoint = self._endpoint(inference)
        params = [
            inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=request_type)
        ]
        if self.pool is not None:
            params.insert(
                0, inspect.Parameter("name", inspect.Parameter.KEYWORD_ONLY, annotation=str)
            )
        endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        self.app.router.add_api_route(
            "/predict" if self.pool is None else "/models/{name}/predict",
            endpoint,
            methods=["POST"],
            response_model=response_type,
            responses={**UNAVAILABLE, **TOO_LARGE, **(NOT_FOUND if self.pool else {})},
            name=fn.__name__,
            description=inspect.getdoc(fn) or "",
            # No Content-Type (API Gateway test events, sam local): read as JSON, as API
            # Gateway itself does.
            strict_content_type=False,
        )
        # Matched first: every warm request takes this route, and Starlette tries the routes in
        # order (the docs, /health, /ready, /model before it cost ~10 us each per request).
        routes = self.app.router.routes
        routes.insert(0, routes.pop())
        if self.pool is not None:

            async def which() -> Any:
                raise ModelNotFound("this function serves many models: POST /models/{name}/predict")

            self.app.router.add_api_route(
                "/predict", which, methods=["POST"], include_in_schema=False
            )
        self._answer = self._direct_answer(inference, request_type, response_type)
        self._direct_keys = frozenset(
            field.alias or name for name, field in request_type.model_fields.items()
        )
        self._lambda = None  # rebuilt with the direct answer on the next invocation
        self._lambda_handler()  # now, so INIT (not the first request) pays for Mangum
        return fn

    def _endpoint(self, inference: Inference[Any]) -> Callable[..., Any]:
        pool, holder = self.pool, self._holder
        if holder is not None:

            async def one(request: Any) -> Any:
                return await inference.run(await holder.aget(), request)

            return one
        assert pool is not None

        async def many(name: str, request: Any) -> Any:
            timings = timing.current()
            if timings is not None:
                timings.model = name
            async with pool.alease(name) as loaded:
                return await inference.run(loaded, request)

        return many

    def _direct_answer(
        self, inference: Inference[Any], request_type: type[BaseModel], response_type: Any
    ) -> Callable[[Mapping[str, Any]], Any]:
        rules = signature_rules(request_type)
        dump = dumper(response_type)
        pool, holder = self.pool, self._holder
        own_model_field = "model" in request_type.model_fields

        def answer(payload: Mapping[str, Any]) -> Any:
            name = None
            if pool is not None:
                name = payload.get("model")
                if not isinstance(name, str):
                    raise InvalidInput(
                        'name the model: a "model" field beside the request\'s (this function '
                        "serves many models)"
                    )
                if not own_model_field:
                    payload = {k: v for k, v in payload.items() if k != "model"}
            try:
                request = request_type.model_validate(payload)
            except ValidationError as exc:
                raise invalid_input(exc, rules) from None
            if holder is not None:
                return dump(inference(holder.get(), request))
            assert pool is not None and name is not None
            timings = timing.current()
            if timings is not None:
                timings.model = name
            with pool.lease(name) as loaded:
                return dump(inference(loaded, request))

        return answer

    # -- Lambda -----------------------------------------------------------------------------------

    def handler(self, event: LambdaEvent, context: LambdaContext | None = None) -> Any:
        """The AWS Lambda entry point (`CMD ["your.module.handler"]`)."""
        return self._lambda_handler()(event, context)

    def _lambda_handler(self) -> LambdaHandler:
        if self._lambda is None:
            self._lambda = LambdaHandler(
                self.app,
                warmup=self._warmup,
                direct=self._answer,
                direct_keys=self._direct_keys,
                metrics=self.metrics,
            )
        return self._lambda

    def _warmup(self, event: Mapping[str, Any]) -> dict[str, Any]:
        if self._holder is not None:
            return {"warm": True, "model": self._holder.get().info.model_dump()}
        assert self.pool is not None
        name = event.get("model")
        if isinstance(name, str):
            with self.pool.lease(name) as loaded:
                return {"warm": True, "model": loaded.info.model_dump()}
        return {"warm": True, "models": self.pool.describe()}

    # -- refresh ----------------------------------------------------------------------------------

    def _refresh_targets(self) -> list[Target]:
        if self._holder is not None:
            return [
                Target(
                    name=self.settings.model_uri,
                    holder=self._holder,
                    stat=lambda: head(self.uri),
                    reload=lambda reserve: load_model(
                        self._build,
                        self.settings,
                        uri=self.uri,
                        reserve=reserve,
                        s3_client=self._s3_client,
                    ),
                    reserve=beside(self.budget),
                )
            ]
        assert self.pool is not None
        return [self._pool_target(self.pool, entry) for entry in self.pool.entries()]

    def _pool_target(self, pool: ModelPool[Loaded[M]], entry: PoolEntry[Loaded[M]]) -> Target:
        uri = self.uri.for_model(entry.name)
        return Target(
            name=uri.uri,
            holder=entry.holder,
            stat=lambda: head(uri),
            reload=lambda reserve: load_model(
                self._build, self.settings, uri=uri, reserve=reserve, s3_client=self._s3_client
            ),
            reserve=lambda old, new: pool.reserve_beside(entry, new),
            swapped=lambda old, new: pool.swapped(entry, new.info.size_bytes),
            abandoned=lambda: pool.abandoned(entry),
        )


def _default_budget() -> int | None:
    """The function's memory (Lambda's, or the cgroup limit) less what the process holds after
    its imports and a share for inference; None where no limit is known."""
    limit = memory_limit()
    if limit is None:
        return None
    return max(0, int(limit * (1 - INFERENCE_HEADROOM)) - resident_bytes())
