"""The process-wide effects of starting a function, in one place (`Service.start()` calls them, in
this order): lazyserve's logging, torch's thread count, LAZYSERVE_LOAD applied (lazy, background,
eager, and what SnapStart and provisioned concurrency change about them), and `gc.freeze()`.
Each is idempotent."""

from __future__ import annotations

import gc
import logging
import random
from collections.abc import Mapping
from typing import Any

from lazyserve import _boot
from lazyserve.environment import initialization_type
from lazyserve.errors import ModelLoadTimeout, ModelUnavailable
from lazyserve.lazy import LazyModel
from lazyserve.logs import configure_logging
from lazyserve.settings import Settings
from lazyserve.sources import helper, reset_s3_clients

__all__ = ["INIT_BUDGET", "PREINIT_BUDGET", "configure_process", "freeze", "start_loading"]

log = logging.getLogger("lazyserve")

INIT_BUDGET = 8.0
"""Seconds an eager load may hold an on-demand INIT (Lambda stops INIT at 10 s and runs it
again inside the first invocation) before it goes on in the background."""
PREINIT_BUDGET = 120.0
"""Seconds a load may hold INIT under provisioned concurrency or SnapStart, where the 10 s
limit does not apply: Lambda allows the larger of 130 s and the function's timeout
(https://docs.aws.amazon.com/lambda/latest/dg/lambda-runtime-environment.html)."""

_threads_set = False


def configure_process(settings: Settings) -> None:
    """lazyserve's logging (see logs.py) and torch's intra-op threads (LAZYSERVE_TORCH_THREADS,
    by default the CPUs this process may use: Lambda gives fewer than the host has)."""
    global _threads_set
    configure_logging(settings.log_level)
    if not _threads_set:
        import torch

        torch.set_num_threads(settings.torch_threads)
        _threads_set = True
    for problem in (_boot.problem(), helper.failure()):
        if problem is not None:
            log.warning("the download could not start with the interpreter: %s", problem)


def freeze() -> None:
    """Move what exists now (the imports, a loaded model) out of the cycle collector's sight: a
    full collection then no longer walks torch's ~200k objects on every pass."""
    gc.freeze()


def start_loading(
    model: LazyModel[Any], settings: Settings, environ: Mapping[str, str] | None = None
) -> str:
    """Apply LAZYSERVE_LOAD at import time (Lambda's INIT); return the mode applied.

    `eager` waits at most INIT_BUDGET seconds on an on-demand function, then the load carries
    on in its thread and the first request awaits it. Where INIT happens ahead of any request
    (provisioned concurrency, SnapStart), Lambda freezes the environment as soon as INIT ends:
    a download left running would stall until the first request, so `background` and `eager`
    both wait for the model there.
    """
    mode: str = settings.load
    kind = initialization_type(environ)
    if kind == "snap-start":
        _register_snapstart_hooks(model)
        mode = "snap-start"
    elif kind == "provisioned-concurrency" and mode != "lazy":
        mode = "provisioned"
    if mode == "lazy":
        return mode
    model.start()
    if mode == "background":
        return mode
    budget = INIT_BUDGET if mode == "eager" else PREINIT_BUDGET
    try:
        model.get(timeout=budget)
    except ModelLoadTimeout:
        log.warning("model load goes on after init (%.1fs budget); requests will await it", budget)
    except ModelUnavailable as exc:
        # Failing INIT would only make Lambda re-run it inside the first invocation; the
        # first request that needs the model retries the load instead (when a retry can
        # change it; otherwise the failure is answered until the object changes).
        if not exc.retryable:
            after = "it is answered until the object changes"
        elif mode == "snap-start":
            after = "the before-snapshot hook tries again"
        else:
            after = "the next request tries again"
        log.error("model load failed during init; %s: %s", after, exc)
    return mode


def _register_snapstart_hooks(model: LazyModel[Any]) -> None:
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
