"""`Service`: the one object a model function is built from. Constructing it reads the settings and
assembles the parts (the model holder, or many models under a memory budget, the FastAPI app and
its routes, the refresh); `@service.predict` declares the prediction; `start()` applies the
process-wide start-up (`startup.py`) once; the service is then the app and the Lambda handler."""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, Protocol, TypeVar, overload

import torch
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError

from lazyserve import startup, timing
from lazyserve.app import setup_app
from lazyserve.aws import Batched, LambdaHandler, invalid_input
from lazyserve.batching import DEFAULT_MAX_SIZE, DEFAULT_MAX_WAIT_MS, Batcher, check_limits
from lazyserve.environment import memory_limit, on_lambda, resident_bytes
from lazyserve.error_handlers import predict_failed
from lazyserve.errors import InvalidInput, ModelNotFound, ModelUnavailable
from lazyserve.lazy import LazyModel
from lazyserve.logs import set_global
from lazyserve.metrics import ModelMetrics, metrics_enabled
from lazyserve.middleware import MetricsMiddleware
from lazyserve.model import Loaded, load_model
from lazyserve.pool import ModelPool, PoolEntry
from lazyserve.refresh import Refresher, Target, beside
from lazyserve.routes import model_router, pool_router, prefix_router
from lazyserve.schemas import FAILED, NOT_FOUND, TOO_LARGE, UNAVAILABLE
from lazyserve.settings import Settings, read_settings, unknown_notices, warn_unknown
from lazyserve.signatures import batch_io_types, dumper, in_inference_mode, io_types
from lazyserve.signatures import rules as signature_rules
from lazyserve.sources import Boto3Ranges, RangeClient, head, identity, settle_early_download
from lazyserve.types import LambdaContext, LambdaEvent, S3Client
from lazyserve.uris import ModelURI
from lazyserve.workers import Inference

__all__ = ["Service"]

M = TypeVar("M", bound=torch.nn.Module)
Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp")
PredictFn = Callable[[Loaded[M], Req], Resp]
BatchFn = Callable[[Loaded[M], list[Req]], list[Resp]]


class BatchDecorator(Protocol[M]):
    """What `service.predict_batch(max_size=..., max_wait_ms=...)` returns."""

    def __call__(self, fn: BatchFn[M, Req, Resp], /) -> BatchFn[M, Req, Resp]: ...


log = logging.getLogger("lazyserve")

INFERENCE_HEADROOM = 0.10
"""Share of the function's memory the default budget leaves for inference (activations)."""


class Service(Generic[M]):
    """A served model: `app` for uvicorn, `handler` for AWS Lambda, `@predict` (or
    `@predict_batch`, one call for many requests) for the route.

    `build` makes the user's `nn.Module` (its parameters are created on the meta device, then
    the loaded weights become them). Settings come from the LAZYSERVE_* environment variables
    unless given. With a `LAZYSERVE_MODEL_URI` ending in `/`, model NAME is
    `<prefix>NAME.safetensors`, served at `POST /models/{name}/predict` (and
    `{"model": NAME, ...}` for direct and SQS invocations). `s3_client`: a boto3 S3 client to
    make every GET with (its endpoint, credentials and configuration), instead of lazyserve's
    own. `autostart=False`: `@predict` does not call `start()`; call it yourself.
    """

    def __init__(
        self,
        build: Callable[[], M],
        *,
        app: FastAPI | None = None,
        settings: Settings | None = None,
        s3_client: S3Client | None = None,
        autostart: bool = True,
    ) -> None:
        self._notices: list[str] = []
        if settings is None:
            # On Lambda a notice is one JSON log line, written once logging is set up (start());
            # elsewhere a LazyserveWarning at the line that made this Service.
            if on_lambda():
                self._notices = unknown_notices(os.environ)
            else:
                warn_unknown(os.environ)
            settings = read_settings()
        self.settings = settings
        self._client: RangeClient | None = Boto3Ranges(s3_client) if s3_client else None
        # A download the interpreter started that this app will not take is freed now.
        settle_early_download(self.settings, adopt=s3_client is None)
        self._build = build
        self._autostart = autostart
        self._started = False
        self.uri = self.settings.uri
        name = getattr(build, "__name__", "model")
        # Mangum gives a request without a Host header the host "mangum": a trailing-slash
        # redirect would send clients to https://mangum/... An exact path or 404.
        self.app = app if app is not None else FastAPI(title=name, redirect_slashes=False)
        setup_app(self.app)
        self.metrics = ModelMetrics() if metrics_enabled(self.settings.metrics) else None
        if self.metrics is not None and not on_lambda():
            # On Lambda the handler publishes once per invocation, whatever the event.
            self.app.add_middleware(MetricsMiddleware, metrics=self.metrics)
        # Decided once, after the imports: the weights may use what the imports left.
        self.budget = self.settings.memory_budget or _default_budget()
        self.refresher: Refresher | None = None
        if self.settings.refresh_seconds is not None:
            self.refresher = Refresher(self.settings.refresh_seconds, self._refresh_targets)
        self._holder: LazyModel[Loaded[M]] | None = None
        self.pool: ModelPool[Loaded[M]] | None = None
        if self.uri.is_prefix:
            self.pool = ModelPool(
                self._load_named,
                check=self._check_name,
                budget=self.budget,
                wait=self.settings.load_wait,
                recheck=lambda name, error: self._changed(self.uri.for_model(name), error),
            )
        else:
            self._holder = LazyModel(
                self._load,
                wait=self.settings.load_wait,
                source=self.settings.model_uri,
                recheck=lambda error: self._changed(self.uri, error),
            )
        self._answer: Callable[[Mapping[str, Any]], Any] | None = None
        self._direct_keys: frozenset[str] = frozenset()
        self._batcher: Batcher[Any, Any] | None = None
        self._batched: Batched | None = None
        self._lambda: LambdaHandler | None = None
        self._routes_added = False
        self.load_mode = "lazy"

    def start(self) -> None:
        """The process-wide start-up, once (later calls do nothing): the model routes
        (`/health`, `/ready`, `/model`, or `/models`) join the app after the predict route;
        lazyserve's logging is set up (JSON lines on Lambda, see logs.py); torch's thread count
        is set (LAZYSERVE_TORCH_THREADS); the refresh thread starts (LAZYSERVE_REFRESH_SECONDS);
        LAZYSERVE_LOAD is applied (a `background` or `eager` load starts, `eager` waits for it
        up to 8 s on an on-demand Lambda); and `gc.freeze()` moves what the imports made out of
        the collector's sight. `@service.predict` (and `@service.predict_batch`) calls it unless
        `autostart=False`."""
        if self._started:
            return
        self._started = True
        self._add_model_routes()
        startup.configure_process(self.settings)
        for notice in self._notices:
            log.warning(notice)
        if self.refresher is not None:
            self.refresher.start()
        if self._holder is not None:
            self.load_mode = startup.start_loading(self._holder, self.settings)
        startup.freeze()

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

    def _add_model_routes(self) -> None:
        if self._routes_added:
            return
        self._routes_added = True
        batches = self._batcher.stats if self._batcher is not None else None
        if self.pool is not None:
            self.app.include_router(pool_router(self.pool, self.refresher, batches))
        else:
            assert self._holder is not None
            self.app.include_router(model_router(self._holder, self.refresher, batches))

    # -- loading ----------------------------------------------------------------------------------

    def _load(self) -> Loaded[M]:
        loaded = load_model(self._build, self.settings, client=self._client)
        self._loaded(loaded)
        startup.freeze()  # the model's objects too (see start())
        return loaded

    def _loaded(self, loaded: Loaded[M], name: str | None = None) -> None:
        if self.metrics is not None:
            self.metrics.loaded(loaded.info, name)
        if name is None:  # the process serves this one model: every log line may name it
            set_global(model_sha256=loaded.info.sha256)

    def _changed(self, uri: ModelURI, error: ModelUnavailable) -> bool:
        """May the object behind a load that failed with `error` (not retryable) have changed?
        One cheap look: another version there, or a different failure to look at it."""
        try:
            now = identity(uri, self._client)
        except ModelUnavailable as exc:
            return type(exc) is not type(error)  # still missing, still denied: the same
        return error.identity is None or now != error.identity

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
            client=self._client,
        )
        self._loaded(loaded, name)
        return loaded

    # -- the prediction ---------------------------------------------------------------------------

    def predict(self, fn: PredictFn[M, Req, Resp]) -> PredictFn[M, Req, Resp]:
        """Declare the prediction: `fn(model, request) -> response`, a plain function run under
        `torch.inference_mode()`. It serves `POST /predict` (the body validated as `request`'s
        type before the model is awaited), direct Lambda invocations with the same JSON, and
        SQS records. Returns `fn` unchanged; then starts the service (see `start()`)."""
        self._check_undeclared()
        request_type, response_type = io_types(fn)
        inference = Inference(in_inference_mode(fn))
        answer = self._direct_answer(inference, request_type, response_type)
        self._declare(fn, self._endpoint(inference, fn.__name__), request_type, response_type)
        self._answer = answer
        self._finish_declaring()
        return fn

    @overload
    def predict_batch(self, fn: BatchFn[M, Req, Resp], /) -> BatchFn[M, Req, Resp]: ...

    @overload
    def predict_batch(
        self,
        fn: None = None,
        /,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    ) -> BatchDecorator[M]: ...

    def predict_batch(
        self,
        fn: BatchFn[M, Req, Resp] | None = None,
        /,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    ) -> Any:
        """Declare a batched prediction: `fn(model, requests) -> responses`, one response per
        request, in order, run under `torch.inference_mode()` in a worker thread. The same
        routes, validation, errors and invocations as `@service.predict`; requests in flight
        together are answered by one call (at most `max_size`, waiting at most `max_wait_ms`
        for more, never for a lone request; LAZYSERVE_BATCH_MAX and LAZYSERVE_BATCH_WAIT_MS
        override them). `@service.predict_batch` or `@service.predict_batch(max_size=...)`."""
        check_limits(max_size, max_wait_ms)
        if fn is None:
            return functools.partial(
                self._predict_batch, max_size=max_size, max_wait_ms=max_wait_ms
            )
        return self._predict_batch(fn, max_size=max_size, max_wait_ms=max_wait_ms)

    def _predict_batch(
        self, fn: BatchFn[M, Req, Resp], *, max_size: int, max_wait_ms: float
    ) -> BatchFn[M, Req, Resp]:
        self._check_undeclared()
        request_type, response_type = batch_io_types(fn)
        wait = self.settings.batch_wait_ms
        batcher: Batcher[Any, Any] = Batcher(
            in_inference_mode(fn),
            name=fn.__name__,
            max_size=self.settings.batch_max or max_size,
            max_wait_ms=max_wait_ms if wait is None else wait,
        )
        prepare = self._validator(request_type)
        run = self._batch_run(batcher, response_type)
        self._declare(fn, self._batch_endpoint(batcher), request_type, response_type)
        self._batcher = batcher
        self._batched = Batched(prepare, run, batcher.max_size)

        def answer(payload: Mapping[str, Any]) -> Any:
            name, request = prepare(payload)
            return run(name, [request])[0]

        self._answer = answer
        self._finish_declaring()
        return fn

    def _check_undeclared(self) -> None:
        if self._answer is not None:
            raise TypeError(
                "this Service has a predict function already (@service.predict or "
                "@service.predict_batch); it takes one"
            )
        if self._routes_added:
            raise TypeError("declare the predict function before calling service.start()")

    def _declare(
        self,
        fn: Callable[..., Any],
        endpoint: Callable[..., Any],
        request_type: type[BaseModel],
        response_type: Any,
    ) -> None:
        """`POST /predict` (or `/models/{name}/predict`) with `endpoint`, and the direct keys."""
        params = [
            inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=request_type)
        ]
        if self.pool is not None:
            params.insert(
                0, inspect.Parameter("name", inspect.Parameter.KEYWORD_ONLY, annotation=str)
            )
        endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        # Added before the model routes (start() adds those): every warm request takes this
        # route, and Starlette tries the routes in order.
        self.app.router.add_api_route(
            "/predict" if self.pool is None else "/models/{name}/predict",
            endpoint,
            methods=["POST"],
            response_model=response_type,
            responses={
                **UNAVAILABLE,
                **FAILED,
                **TOO_LARGE,
                **(NOT_FOUND if self.pool else {}),
            },
            name=fn.__name__,
            description=inspect.getdoc(fn) or "",
            # No Content-Type (API Gateway test events, sam local): read as JSON, as API
            # Gateway itself does.
            strict_content_type=False,
        )
        if self.pool is not None:
            self.app.include_router(prefix_router())
        self._direct_keys = frozenset(
            field.alias or name for name, field in request_type.model_fields.items()
        )

    def _finish_declaring(self) -> None:
        self._lambda = None  # rebuilt with the direct answer on the next invocation
        self._lambda_handler()  # now, so INIT (not the first request) pays for Mangum
        if self._autostart:
            self.start()

    def _endpoint(self, inference: Inference[Any], fn_name: str) -> Callable[..., Any]:
        pool, holder = self.pool, self._holder
        if holder is not None:

            async def one(request: Any) -> Any:
                loaded = await holder.aget()
                try:
                    return await inference.run(loaded, request)
                except Exception as exc:
                    raise predict_failed(exc, fn_name) from None

            return one
        assert pool is not None

        async def many(name: str, request: Any) -> Any:
            timings = timing.current()
            if timings is not None:
                timings.model = name
            async with pool.alease(name) as loaded:
                try:
                    return await inference.run(loaded, request)
                except Exception as exc:
                    raise predict_failed(exc, fn_name) from None

        return many

    def _direct_answer(
        self, inference: Inference[Any], request_type: type[BaseModel], response_type: Any
    ) -> Callable[[Mapping[str, Any]], Any]:
        prepare = self._validator(request_type)
        dump = dumper(response_type)
        pool, holder = self.pool, self._holder

        def answer(payload: Mapping[str, Any]) -> Any:
            name, request = prepare(payload)
            if holder is not None:
                return dump(inference(holder.get(), request))
            assert pool is not None and isinstance(name, str)
            timings = timing.current()
            if timings is not None:
                timings.model = name
            with pool.lease(name) as loaded:
                return dump(inference(loaded, request))

        return answer

    def _validator(
        self, request_type: type[BaseModel]
    ) -> Callable[[Mapping[str, Any]], tuple[Hashable, Any]]:
        """`prepare(payload) -> (model name or None, request)` for direct and SQS invocations:
        raises InvalidInput naming what is wrong."""
        rules = signature_rules(request_type)
        many = self.pool is not None
        own_model_field = "model" in request_type.model_fields

        def prepare(payload: Mapping[str, Any]) -> tuple[Hashable, Any]:
            name = None
            if many:
                name = payload.get("model")
                if not isinstance(name, str):
                    raise InvalidInput(
                        'name the model: a "model" field beside the request\'s (this function '
                        "serves many models)"
                    )
                if not own_model_field:
                    payload = {k: v for k, v in payload.items() if k != "model"}
            try:
                return name, request_type.model_validate(payload)
            except ValidationError as exc:
                raise invalid_input(exc, rules) from None

        return prepare

    def _batch_endpoint(self, batcher: Batcher[Any, Any]) -> Callable[..., Any]:
        pool, holder = self.pool, self._holder
        if holder is not None:

            async def one(request: Any) -> Any:
                return await batcher.submit(None, await holder.aget(), request)

            return one
        assert pool is not None

        async def many(name: str, request: Any) -> Any:
            timings = timing.current()
            if timings is not None:
                timings.model = name
            async with pool.alease(name) as loaded:
                return await batcher.submit(name, loaded, request)

        return many

    def _batch_run(
        self, batcher: Batcher[Any, Any], response_type: Any
    ) -> Callable[[Hashable, list[Any]], list[Any]]:
        """`run(name, requests) -> answers` for direct and SQS invocations: one call, in this
        thread, the answers JSON-ready."""
        dump = dumper(response_type)
        pool, holder = self.pool, self._holder

        def run(name: Hashable, requests: list[Any]) -> list[Any]:
            if holder is not None:
                return [dump(r) for r in batcher.run(None, holder.get(), requests)]
            assert pool is not None and isinstance(name, str)
            timings = timing.current()
            if timings is not None:
                timings.model = name
            with pool.lease(name) as loaded:
                return [dump(r) for r in batcher.run(name, loaded, requests)]

        return run

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
                batched=self._batched,
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

    def _stat(self, uri: Any) -> Any:
        return head(uri, client=self._client)

    def _refresh_targets(self) -> list[Target]:
        if self._holder is not None:
            return [
                Target(
                    name=self.settings.model_uri,
                    holder=self._holder,
                    stat=lambda: self._stat(self.uri),
                    reload=lambda reserve: load_model(
                        self._build,
                        self.settings,
                        uri=self.uri,
                        reserve=reserve,
                        client=self._client,
                    ),
                    reserve=beside(self.budget),
                    swapped=lambda old, new: self._loaded(new),
                )
            ]
        assert self.pool is not None
        return [self._pool_target(self.pool, entry) for entry in self.pool.entries()]

    def _pool_target(self, pool: ModelPool[Loaded[M]], entry: PoolEntry[Loaded[M]]) -> Target:
        uri = self.uri.for_model(entry.name)
        return Target(
            name=uri.uri,
            holder=entry.holder,
            stat=lambda: self._stat(uri),
            reload=lambda reserve: load_model(
                self._build, self.settings, uri=uri, reserve=reserve, client=self._client
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
