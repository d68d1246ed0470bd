"""`Service`: the one object a model function is built from. Constructing it reads the settings and
assembles the parts (the model holder, or many models under a memory budget, the FastAPI app and
its routes, the refresh); `@service.predict` declares the prediction; `start()` applies the
process-wide start-up (`startup.py`) once; the service is then the app and the Lambda handler."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, overload

import torch
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError

from lazyserve import startup, timing
from lazyserve.app import setup_app
from lazyserve.aws import Batched, LambdaHandler, invalid_input
from lazyserve.batching import DEFAULT_MAX_SIZE, DEFAULT_MAX_WAIT_MS, Batcher, check_limits
from lazyserve.environment import memory_limit, on_lambda, resident_bytes
from lazyserve.error_handlers import predict_failed, response_invalid
from lazyserve.errors import InvalidInput, ModelNotFound, ModelUnavailable, SettingsError
from lazyserve.lazy import LazyModel
from lazyserve.logs import set_global
from lazyserve.metrics import ModelMetrics, metrics_enabled
from lazyserve.middleware import MetricsMiddleware
from lazyserve.model import AfterLoad, Loaded, load_model, load_pretrained
from lazyserve.pool import ModelPool, PoolEntry
from lazyserve.refresh import Refresher, Target, beside
from lazyserve.routes import model_router, pool_router, prefix_router
from lazyserve.schemas import FAILED, NOT_FOUND, TIMED_OUT, TOO_LARGE, UNAVAILABLE
from lazyserve.settings import (
    Dtype,
    Settings,
    read_settings,
    unknown_notices,
    warn_unknown,
)
from lazyserve.signatures import batch_io_types, dumper, in_inference_mode, io_types
from lazyserve.signatures import rules as signature_rules
from lazyserve.sources import (
    Boto3Ranges,
    ObjectStat,
    RangeClient,
    head,
    identity,
    settle_early_download,
)
from lazyserve.sources.directory import directory_identity, layout, list_directory
from lazyserve.types import LambdaContext, LambdaEvent, S3Client
from lazyserve.uris import ModelURI, parse_model_uri
from lazyserve.workers import Inference

__all__ = ["Service"]

M = TypeVar("M", bound=torch.nn.Module)
Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp")
T = TypeVar("T")
PredictFn = Callable[[Loaded[M], Req], Resp]
BatchFn = Callable[[Loaded[M], list[Req]], list[Resp]]


class BatchDecorator(Protocol[M]):
    """What `service.predict_batch(max_size=..., max_wait_ms=...)` returns."""

    def __call__(self, fn: BatchFn[M, Req, Resp], /) -> BatchFn[M, Req, Resp]: ...


log = logging.getLogger("lazyserve")

INFERENCE_HEADROOM = 0.10
"""Share of the function's memory the default budget leaves for inference (activations)."""


def answered(fn_name: str, compute: Callable[[], Any], dump: Callable[[Any], T]) -> T:
    """A direct (or SQS) invocation's answer, failing as the HTTP route does: the predict
    function's exception is logged with its traceback and raised as PredictFailed (Lambda
    reports its type and the request id, never the function's own words), and so is an answer
    its declared response type refuses. lazyserve's own errors and HTTPExceptions raised on
    purpose pass as they are."""
    try:
        result = compute()
    except Exception as exc:
        failure = predict_failed(exc, fn_name)
        if failure is exc:
            raise
        raise failure from exc
    try:
        return dump(result)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise response_invalid(exc, fn_name) from exc


class Service(Generic[M]):
    """A served model: `app` for uvicorn, `handler` for AWS Lambda, `@predict` (or
    `@predict_batch`, one call for many requests) for the route.

    `build` makes the user's `nn.Module` (its parameters are created on the meta device, then
    the loaded weights become them); `Service.from_pretrained(ModelClass)` serves a transformers
    `save_pretrained` directory instead. Settings come from the LAZYSERVE_* environment
    variables unless given. With a `LAZYSERVE_MODEL_URI` ending in `/`, model NAME is
    `<prefix>NAME.safetensors` (or the directory `<prefix>NAME/`), served at
    `POST /models/{name}/predict` (and `{"model": NAME, ...}` for direct and SQS invocations).
    `s3_client`: a boto3 S3 client to make every GET with (its endpoint, credentials and
    configuration), instead of lazyserve's own. `dtype` ("bfloat16", "float16", "float32"):
    cast while building (LAZYSERVE_DTYPE, when set, wins). `after_load(module)`: run once after
    each load (torch.compile, quantisation); what it returns, if anything, is served.
    `autostart=False`: `@predict` does not call `start()`; call it yourself.
    """

    def __init__(
        self,
        build: Callable[[], M],
        *,
        app: FastAPI | None = None,
        settings: Settings | None = None,
        s3_client: S3Client | None = None,
        dtype: Dtype | None = None,
        after_load: AfterLoad | None = None,
        autostart: bool = True,
    ) -> None:
        self._setup(
            _Maker(build, None, after_load),
            getattr(build, "__name__", "model"),
            app=app,
            settings=settings,
            s3_client=s3_client,
            dtype=dtype,
            autostart=autostart,
        )

    @classmethod
    def from_pretrained(
        cls,
        model_class: Any,
        *,
        app: FastAPI | None = None,
        settings: Settings | None = None,
        s3_client: S3Client | None = None,
        dtype: Dtype | None = None,
        after_load: AfterLoad | None = None,
        autostart: bool = True,
    ) -> Service[Any]:
        """Serve the transformers `save_pretrained` directory LAZYSERVE_MODEL_URI names
        (`s3://bucket/dir/` or a local directory) as `model_class.from_pretrained(directory)`
        would build it (`model_class`: any transformers class with `from_config`, e.g.
        AutoModelForSequenceClassification). The loaded value has `module`, `tokenizer`
        (None without tokenizer files), `config` and `info`. A URI ending in `/` without a
        config.json directly under it is a prefix: model NAME is the directory `<prefix>NAME/`.
        Needs `pip install lazyserve[transformers]`."""
        service: Service[Any] = cls.__new__(cls)
        service._setup(
            _Maker(None, model_class, after_load),
            str(getattr(model_class, "__name__", "model")),
            app=app,
            settings=settings,
            s3_client=s3_client,
            dtype=dtype,
            autostart=autostart,
        )
        return service

    def _setup(
        self,
        maker: _Maker,
        name: str,
        *,
        app: FastAPI | None,
        settings: Settings | None,
        s3_client: S3Client | None,
        dtype: Dtype | None,
        autostart: bool,
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
        if settings.dtype is None and dtype is not None:
            settings = dataclasses.replace(settings, dtype=dtype)
        self.settings = settings
        self._client: RangeClient | None = Boto3Ranges(s3_client) if s3_client else None
        self._maker = maker
        self._autostart = autostart
        self._started = False
        self.uri = maker.directory_uri(self.settings.uri) if maker.pretrained else settings.uri
        # A directory URI is one model when config.json is directly under it, else a prefix of
        # model directories (one listing, at start-up: the routes depend on it).
        many = self.uri.is_prefix and (
            not maker.pretrained or layout(self.uri, self._client) == "many"
        )
        # A download the interpreter started that this app will not take is freed now: another
        # model, a caller's own S3 client, or a prefix of many models.
        settle_early_download(self.settings, adopt=s3_client is None and not many)
        # Mangum gives a request without a Host header the host "mangum": a trailing-slash
        # redirect would send clients to https://mangum/... An exact path or 404.
        self.app = app if app is not None else FastAPI(title=name, redirect_slashes=False)
        setup_app(self.app, body_timeout=self.settings.body_timeout)
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
        if many:
            self.pool = ModelPool(
                self._load_named,
                check=self._check_name,
                budget=self.budget,
                wait=self.settings.load_wait,
                recheck=lambda name, error: self._changed(self._model_uri(name), error),
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
        loaded = self._maker.load(self.settings, self.uri, None, self._client)
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
            now = self._maker.identity(uri, self._client)
        except ModelUnavailable as exc:
            return type(exc) is not type(error)  # still missing, still denied: the same
        return error.identity is None or now != error.identity

    def _model_uri(self, name: str) -> ModelURI:
        return self.uri.for_model(name, directory=self._maker.pretrained)

    def _check_name(self, name: str) -> None:
        try:
            self._model_uri(name)
        except ValueError as exc:
            raise ModelNotFound(str(exc)) from None

    def _load_named(self, name: str, reserve: Callable[[int], None]) -> Loaded[M]:
        # No gc.freeze() here: an evicted model must stay collectable.
        loaded = self._maker.load(self.settings, self._model_uri(name), reserve, self._client)
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
        answer = self._direct_answer(inference, request_type, response_type, fn.__name__)
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
        call = self._batch_call(batcher)
        dump = dumper(response_type)

        def run(name: Hashable, requests: list[Any]) -> list[Any]:
            # An SQS batch or a direct {"batch": [...]}: the handler fails the call's records
            # and logs the failure once, naming them all.
            return [dump(r) for r in call(name, requests)]

        def answer(payload: Mapping[str, Any]) -> Any:
            name, request = prepare(payload)
            return answered(fn.__name__, lambda: call(name, [request])[0], dump)

        self._declare(fn, self._batch_endpoint(batcher), request_type, response_type)
        self._batcher = batcher
        self._batched = Batched(prepare, run, batcher.max_size)

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
                **TIMED_OUT,
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
        async def compute(loaded: Loaded[M], request: Any, name: Hashable) -> Any:
            try:
                return await inference.run(loaded, request)
            except Exception as exc:
                raise predict_failed(exc, fn_name) from None

        return self._route_endpoint(compute)

    def _route_endpoint(
        self, compute: Callable[[Loaded[M], Any, Hashable], Awaitable[Any]]
    ) -> Callable[..., Any]:
        """The predict route's endpoint: `await compute(loaded, request, name)` with the model,
        or with the model the path names (leased from the pool for the request)."""
        pool, holder = self.pool, self._holder
        if holder is not None:

            async def one(request: Any) -> Any:
                return await compute(await holder.aget(), request, None)

            return one
        assert pool is not None

        async def many(name: str, request: Any) -> Any:
            timings = timing.current()
            if timings is not None:
                timings.model = name
            async with pool.alease(name) as loaded:
                return await compute(loaded, request, name)

        return many

    def _with_model(self, name: Hashable, compute: Callable[[Loaded[M]], T]) -> T:
        """`compute(loaded)` in this thread with the model, or with the model `name` (leased
        from the pool meanwhile): direct and SQS invocations."""
        if self._holder is not None:
            return compute(self._holder.get())
        assert self.pool is not None and isinstance(name, str)
        timings = timing.current()
        if timings is not None:
            timings.model = name
        with self.pool.lease(name) as loaded:
            return compute(loaded)

    def _direct_answer(
        self,
        inference: Inference[Any],
        request_type: type[BaseModel],
        response_type: Any,
        fn_name: str,
    ) -> Callable[[Mapping[str, Any]], Any]:
        prepare = self._validator(request_type)
        dump = dumper(response_type)

        def answer(payload: Mapping[str, Any]) -> Any:
            name, request = prepare(payload)
            return self._with_model(
                name, lambda loaded: answered(fn_name, lambda: inference(loaded, request), dump)
            )

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
        async def compute(loaded: Loaded[M], request: Any, name: Hashable) -> Any:
            return await batcher.submit(name, loaded, request)

        return self._route_endpoint(compute)

    def _batch_call(self, batcher: Batcher[Any, Any]) -> Callable[[Hashable, list[Any]], list[Any]]:
        """`call(name, requests) -> responses` for direct and SQS invocations: one call of the
        predict function, in this thread."""

        def call(name: Hashable, requests: list[Any]) -> list[Any]:
            return self._with_model(name, lambda loaded: batcher.run(name, loaded, requests))

        return call

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

    def _refresh_targets(self) -> list[Target]:
        if self._holder is not None:
            uri = self.uri
            return [
                Target(
                    name=self.settings.model_uri,
                    holder=self._holder,
                    stat=lambda: self._maker.stat(uri, self._client),
                    reload=lambda reserve: self._maker.load(
                        self.settings, uri, reserve, self._client
                    ),
                    reserve=beside(self.budget),
                    swapped=lambda old, new: self._loaded(new),
                )
            ]
        assert self.pool is not None
        return [self._pool_target(self.pool, entry) for entry in self.pool.entries()]

    def _pool_target(self, pool: ModelPool[Loaded[M]], entry: PoolEntry[Loaded[M]]) -> Target:
        uri = self._model_uri(entry.name)
        return Target(
            name=uri.uri,
            holder=entry.holder,
            stat=lambda: self._maker.stat(uri, self._client),
            reload=lambda reserve: self._maker.load(self.settings, uri, reserve, self._client),
            reserve=lambda old, new: pool.reserve_beside(entry, new),
            swapped=lambda old, new: pool.swapped(entry, new.info.size_bytes),
            abandoned=lambda: pool.abandoned(entry),
        )


@dataclass(frozen=True)
class _Maker:
    """How a model is made: the user's `build` from a weights file, or a transformers class from
    a save_pretrained directory; and how its object is looked at (refresh, recheck)."""

    build: Callable[[], Any] | None
    model_class: Any
    after_load: AfterLoad | None

    @property
    def pretrained(self) -> bool:
        return self.model_class is not None

    def directory_uri(self, uri: ModelURI) -> ModelURI:
        """A model directory's URI ends in `/`: a local directory named without one gets it."""
        if uri.is_prefix:
            return uri
        if not uri.is_s3 and uri.path is not None and uri.path.is_dir():
            return parse_model_uri(uri.uri + "/")
        raise SettingsError(
            f"LAZYSERVE_MODEL_URI has value {uri.uri[:80]!r}: Service.from_pretrained serves "
            "a save_pretrained directory: give s3://bucket/dir/ (ending in /) or a local "
            "directory"
        )

    def load(
        self,
        settings: Settings,
        uri: ModelURI,
        reserve: Callable[[int], None] | None,
        client: RangeClient | None,
    ) -> Loaded[Any]:
        if self.model_class is not None:
            return load_pretrained(
                self.model_class,
                settings,
                uri=uri,
                reserve=reserve,
                client=client,
                after_load=self.after_load,
            )
        assert self.build is not None
        return load_model(
            self.build,
            settings,
            uri=None if uri.uri == settings.model_uri else uri,
            reserve=reserve,
            client=client,
            after_load=self.after_load,
        )

    def identity(self, uri: ModelURI, client: RangeClient | None) -> str | None:
        if self.pretrained:
            return directory_identity(uri, client)
        return identity(uri, client)

    def stat(self, uri: ModelURI, client: RangeClient | None) -> ObjectStat:
        """What a refresh compares with the loaded model's version (etag, version id)."""
        if not self.pretrained:
            return head(uri, client=client)
        listed = list_directory(uri, client)
        size = sum(size for size, _ in listed.values())
        return ObjectStat(size, directory_identity(uri, client, listed), None)


def _default_budget() -> int | None:
    """The function's memory (Lambda's, or the cgroup limit) less what the process holds after
    its imports and a share for inference; None where no limit is known."""
    limit = memory_limit()
    if limit is None:
        return None
    return max(0, int(limit * (1 - INFERENCE_HEADROOM)) - resident_bytes())
