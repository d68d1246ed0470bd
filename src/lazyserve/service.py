"""`Service`: the one object a model function is built from. It reads the settings, sets up
logging, holds the model and applies the load mode, builds the FastAPI app with every route and
error answer, and is the Lambda handler."""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import torch
from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel, TypeAdapter, ValidationError

from lazyserve.app import setup_app
from lazyserve.aws import LambdaHandler, invalid_input
from lazyserve.environment import on_lambda
from lazyserve.lazy import LazyModel
from lazyserve.logs import configure_logging
from lazyserve.metrics import ModelMetrics, metrics_enabled
from lazyserve.middleware import MetricsMiddleware
from lazyserve.model import Loaded, load_model
from lazyserve.schemas import TOO_LARGE, UNAVAILABLE
from lazyserve.settings import Settings, load_settings
from lazyserve.startup import start_loading
from lazyserve.types import LambdaContext, LambdaEvent, S3Client
from lazyserve.workers import Inference

__all__ = ["Service"]

M = TypeVar("M", bound=torch.nn.Module)
Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp")
PredictFn = Callable[[Loaded[M], Req], Resp]


class Service(Generic[M]):
    """A served model: `app` for uvicorn, `handler` for AWS Lambda, `@predict` for the route.

    `build` makes the user's `nn.Module` (it runs on the meta device, then adopts the loaded
    weights). Settings come from the LAZYSERVE_* environment variables unless given.
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
        self.model: LazyModel[Loaded[M]] = LazyModel(
            lambda: self._load(build, s3_client),
            wait=self.settings.load_wait,
            source=self.settings.model_uri,
        )
        name = getattr(build, "__name__", "model")
        self.app = app if app is not None else FastAPI(title=f"{name} (lazyserve)")
        # Mangum gives a request without a Host header the host "mangum": Starlette's
        # trailing-slash redirect would send clients to https://mangum/... An exact path or 404.
        self.app.router.redirect_slashes = False
        setup_app(self.app, self.model)
        self.metrics = ModelMetrics(self.model) if metrics_enabled(self.settings.metrics) else None
        if self.metrics is not None and not on_lambda():
            # On Lambda the handler publishes once per invocation, whatever the event.
            self.app.add_middleware(MetricsMiddleware, metrics=self.metrics)
        self._answer: Callable[[Mapping[str, Any]], Any] | None = None
        self._direct_keys: frozenset[str] = frozenset()
        self._lambda: LambdaHandler | None = None
        self.load_mode = start_loading(self.model, self.settings)
        # What the imports created lives as long as the process: out of the collector's sight,
        # a full collection no longer walks torch's ~200k objects on every pass.
        gc.freeze()

    def _load(self, build: Callable[[], M], s3_client: S3Client | None) -> Loaded[M]:
        loaded = load_model(build, self.settings, s3_client=s3_client)
        gc.freeze()  # the model's objects too (see __init__)
        return loaded

    def predict(self, fn: PredictFn[M, Req, Resp]) -> PredictFn[M, Req, Resp]:
        """Declare the prediction: `fn(model, request) -> response`, a plain function run under
        `torch.inference_mode()`. It serves `POST /predict` (the body validated as `request`'s
        type before the model is awaited), direct Lambda invocations with the same JSON, and
        SQS records. Returns `fn` unchanged."""
        if self._answer is not None:
            raise TypeError("this Service has a predict function already; it takes one")
        request_type, response_type = _io_types(fn)
        inference = Inference(_in_inference_mode(fn))
        model = self.model

        async def endpoint(request: Any) -> Any:
            return await inference.run(await model.aget(), request)

        endpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=request_type)]
        )
        self.app.router.add_api_route(
            "/predict",
            endpoint,
            methods=["POST"],
            response_model=response_type,
            responses={**UNAVAILABLE, **TOO_LARGE},
            name=fn.__name__,
            description=inspect.getdoc(fn) or "",
            # No Content-Type (API Gateway test events, sam local): read as JSON, as API
            # Gateway itself does.
            strict_content_type=False,
        )
        rules = _rules(request_type)
        dump = _dumper(response_type)

        def answer(payload: Mapping[str, Any]) -> Any:
            try:
                request = request_type.model_validate(payload)
            except ValidationError as exc:
                raise invalid_input(exc, rules) from None
            return dump(inference(model.get(), request))

        self._answer = answer
        self._direct_keys = frozenset(
            field.alias or name for name, field in request_type.model_fields.items()
        )
        self._lambda = None  # rebuilt with the direct answer on the next invocation
        self._lambda_handler()  # now, so INIT (not the first request) pays for Mangum
        return fn

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
        return {"warm": True, "model": self.model.get().info.model_dump()}


def _io_types(fn: Callable[..., Any]) -> tuple[type[BaseModel], Any]:
    """The request model (the second parameter's annotation) and the response type."""
    params = list(inspect.signature(fn).parameters)
    if inspect.iscoroutinefunction(fn) or len(params) != 2:
        raise TypeError(
            f"{fn.__name__}() must be a plain `def {fn.__name__}(model, request)`: it runs in a "
            "worker thread or inline, under torch.inference_mode()"
        )
    request_type = _annotation(fn, params[1])
    if not (isinstance(request_type, type) and issubclass(request_type, BaseModel)):
        raise TypeError(
            f"annotate {fn.__name__}()'s second parameter with a pydantic model (the request "
            f"body), got {request_type!r}"
        )
    return request_type, _annotation(fn, "return")


def _annotation(fn: Callable[..., Any], name: str) -> Any:
    # Only the annotations lazyserve needs are resolved (with `from __future__ import
    # annotations` they are strings): the model parameter's may name a class imported anywhere.
    annotation = fn.__annotations__.get(name)
    if not isinstance(annotation, str):
        return annotation
    names = {**fn.__globals__, **inspect.getclosurevars(fn).nonlocals}
    try:
        return eval(annotation, names)  # the same evaluation typing.get_type_hints does
    except NameError as exc:
        raise TypeError(
            f"cannot resolve the annotation {annotation!r} of {fn.__name__}() ({exc}): define "
            "the request and response models before the function"
        ) from None


def _in_inference_mode(fn: Callable[..., Resp]) -> Callable[..., Resp]:
    def call(*args: Any) -> Resp:
        with torch.inference_mode():
            return fn(*args)

    return call


def _rules(request_type: type[BaseModel]) -> str | None:
    """What a valid request looks like, from the fields' descriptions, for InvalidInput."""
    rules = [
        f"{field.alias or name}: {field.description}"
        for name, field in request_type.model_fields.items()
        if field.description
    ]
    return "; ".join(rules) or None


def _dumper(response_type: Any) -> Callable[[Any], Any]:
    """The JSON-ready form of a response, as the HTTP route would send it."""
    if response_type is None:
        return jsonable_encoder
    adapter: TypeAdapter[Any] = TypeAdapter(response_type)
    return lambda value: adapter.dump_python(value, mode="json")
