"""The Lambda side: one entry point for HTTP events (through Mangum), direct invocations and
warm-up pings, plus the load mode chosen for the execution environment's INIT."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Mapping
from typing import Any, cast

from pydantic import ValidationError

from lazyserve import timing
from lazyserve.errors import InvalidInput, ModelLoadTimeout, ModelUnavailable, UnsupportedEvent
from lazyserve.lazy import LazyModel
from lazyserve.logs import bind
from lazyserve.metrics import ModelMetrics
from lazyserve.model import Loaded
from lazyserve.settings import Settings
from lazyserve.sources import reset_s3_clients
from lazyserve.types import LambdaContext, LambdaEvent, LambdaHandler

__all__ = ["INIT_BUDGET", "invalid_input", "lambda_handler", "start_loading"]

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
    metrics: ModelMetrics | None = None,
) -> LambdaHandler:
    """Build the Lambda entry point for `app`; `direct` serves `{direct_key: ...}` payloads,
    `metrics` publishes one EMF document per invocation."""
    from mangum import Mangum

    # lifespan="off": Mangum would run the ASGI lifespan (startup and shutdown) on every
    # invocation; the model lives in `model` for the whole execution environment instead.
    http = Mangum(app, lifespan="off")
    cold = [True]

    def handler(event: LambdaEvent, context: LambdaContext | None = None) -> Any:
        request_id = getattr(context, "aws_request_id", None)
        cold_start, cold[0] = cold[0], False
        token = timing.begin()
        try:
            with bind(request_id=request_id, cold_start=cold_start):
                return dispatch(event, context)
        finally:
            if metrics is not None:
                metrics.publish(timing.current())
            timing.end(token)

    def dispatch(event: LambdaEvent, context: LambdaContext | None) -> Any:
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


INIT_BUDGET = 8.0
"""Seconds an eager load may hold Lambda's INIT (10 s on on-demand functions, less our margin
for the rest of the import) before it goes on in the background."""


def start_loading(
    model: LazyModel[Loaded[Any]], settings: Settings, environ: Mapping[str, str] | None = None
) -> str:
    """Apply LAZYSERVE_LOAD at import time (Lambda's INIT); return the mode applied.

    `eager` waits at most INIT_BUDGET seconds: Lambda would otherwise kill INIT at 10 s and run
    it again inside the first invocation, throwing the partial download away. A load still
    running then carries on in its thread and the first request awaits it. Under SnapStart the
    load always completes before the snapshot (whose INIT may take up to 15 minutes).
    """
    env = os.environ if environ is None else environ
    mode: str = settings.load
    if env.get("AWS_LAMBDA_INITIALIZATION_TYPE") == "snap-start":
        _register_snapstart_hooks(model)
        mode = "snap-start"
    if mode == "lazy":
        return mode
    model.start()
    if mode == "background":
        return mode
    budget = 900.0 if mode == "snap-start" else min(INIT_BUDGET, settings.load_wait)
    try:
        model.get(timeout=budget)
    except ModelLoadTimeout:
        log.warning("model load goes on after init (%.1fs budget); requests will await it", budget)
    except ModelUnavailable as exc:
        # Failing INIT would only make Lambda re-run it inside the first invocation; the
        # first request that needs the model retries the load instead.
        retry = "the before-snapshot hook retries" if mode == "snap-start" else "the next request"
        log.error("model load failed during init; %s tries again: %s", retry, exc)
    return mode


def _register_snapstart_hooks(model: LazyModel[Loaded[Any]]) -> None:
    try:
        from snapshot_restore_py import register_after_restore, register_before_snapshot
    except ImportError:  # not on Lambda's runtime: nothing will take a snapshot
        log.info("snapshot_restore_py is not installed; SnapStart hooks not registered")
        return

    def before_snapshot() -> None:
        model.get(timeout=900.0)

    def after_restore() -> None:
        # Every restored copy would otherwise share the snapshot's connections, credentials
        # and random state.
        reset_s3_clients()
        random.seed()
        import torch

        torch.seed()
        log.info("restored from a SnapStart snapshot: S3 clients and random seeds renewed")

    register_before_snapshot(before_snapshot)
    register_after_restore(after_restore)
