"""The Lambda side: one entry point for HTTP events (through Mangum), direct invocations and
warm-up pings, plus the load mode chosen for the execution environment's INIT."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

from pydantic import ValidationError

from lazyserve.errors import InvalidInput, ModelUnavailable, UnsupportedEvent
from lazyserve.lazy import LazyModel
from lazyserve.model import Loaded
from lazyserve.settings import Settings
from lazyserve.types import LambdaContext, LambdaEvent, LambdaHandler

__all__ = ["invalid_input", "lambda_handler", "start_loading"]

log = logging.getLogger("lazyserve")

ACCEPTED = (
    "an API Gateway REST (v1) or HTTP API (v2) request, a Function URL request, an ALB request, "
    '{"inputs": [...]} for a direct prediction, or {} / {"warmup": true} to load the model'
)


def _is_http(event: Mapping[str, Any]) -> bool:
    # The shapes Mangum can infer (ALB, HTTP API v1/v2 and Function URL, REST); checked here
    # first because Mangum answers anything else with a bare RuntimeError.
    context = event.get("requestContext")
    if not isinstance(context, Mapping):
        return False
    return "elb" in context or "version" in event or "resource" in event


def _is_warmup(event: Mapping[str, Any]) -> bool:
    return not event or (set(event) == {"warmup"} and event["warmup"] is True)


def lambda_handler(
    app: Any,
    model: LazyModel[Loaded[Any]],
    *,
    direct: Callable[[LambdaEvent], Any] | None = None,
    direct_key: str = "inputs",
) -> LambdaHandler:
    """Build the Lambda entry point for `app`; `direct` serves `{direct_key: ...}` payloads."""
    from mangum import Mangum

    # lifespan="off": Mangum would run the ASGI lifespan (startup and shutdown) on every
    # invocation; the model lives in `model` for the whole execution environment instead.
    http = Mangum(app, lifespan="off")

    def handler(event: LambdaEvent, context: LambdaContext | None = None) -> Any:
        if not isinstance(event, Mapping):
            raise UnsupportedEvent(f"the event is a {type(event).__name__}; accepted: {ACCEPTED}")
        if _is_http(event):
            return http(event, cast(Any, context))
        if direct is not None and direct_key in event:
            return direct(event)
        if _is_warmup(event):
            loaded = model.get()
            return {"warm": True, "model": loaded.info.as_dict()}
        keys = ", ".join(sorted(map(str, event))[:8])
        raise UnsupportedEvent(f"unsupported event with keys [{keys}]; accepted: {ACCEPTED}")

    return handler


def invalid_input(exc: ValidationError, rules: str) -> InvalidInput:
    """An InvalidInput naming each bad place (`inputs[3]`), what is wrong and the rules."""
    problems = []
    for error in exc.errors()[:5]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        problems.append(f"{where.lstrip('.') or 'payload'}: {error['msg']}")
    more = len(exc.errors()) - len(problems)
    tail = f" (and {more} more)" if more > 0 else ""
    return InvalidInput(f"{'; '.join(problems)}{tail}. Accepted: {rules}")


def start_loading(
    model: LazyModel[Loaded[Any]], settings: Settings, environ: Mapping[str, str] | None = None
) -> None:
    """Apply LAZYSERVE_LOAD at import time (Lambda's INIT): nothing, load now, or start now."""
    env = os.environ if environ is None else environ
    mode = settings.load
    if env.get("AWS_LAMBDA_INITIALIZATION_TYPE") == "snap-start":
        mode = "eager"  # the snapshot must hold the loaded model
    if mode == "background":
        model.start()
    elif mode == "eager":
        try:
            model.get()
        except ModelUnavailable as exc:
            # Failing INIT would only make Lambda re-run it inside the first invocation; the
            # first request that needs the model retries the load instead.
            log.error("eager load did not complete during init: %s", exc)
