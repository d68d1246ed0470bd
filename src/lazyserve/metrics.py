"""CloudWatch metrics in Embedded Metric Format (Powertools Metrics): ColdStart,
ModelLoadSeconds, ModelBytes and InferenceMs, one EMF document per invocation or request."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from lazyserve import timing
from lazyserve.environment import on_lambda
from lazyserve.lazy import LazyModel
from lazyserve.model import Loaded

__all__ = ["ModelMetrics", "metrics_enabled"]

NAMESPACE = "lazyserve"


def metrics_enabled(setting: str, environ: Mapping[str, str] | None = None) -> bool:
    """`on`, `off`, or `auto`: on inside Lambda, else off."""
    return setting == "on" or (setting == "auto" and on_lambda(environ))


class ModelMetrics:
    """Publishes what one invocation did; the EMF document goes to stdout (CloudWatch Logs)."""

    def __init__(self, model: LazyModel[Loaded[Any]], *, service: str | None = None) -> None:
        from aws_lambda_powertools import Metrics

        self.model = model
        service = service or os.environ.get("POWERTOOLS_SERVICE_NAME") or "lazyserve"
        self._metrics = Metrics(namespace=NAMESPACE, service=service)
        self._reported_loads = 0
        self._cold = True
        self._lock = threading.Lock()

    def publish(self, timings: timing.Timings | None) -> None:
        from aws_lambda_powertools.metrics import MetricUnit

        with self._lock:
            added = 0
            if self._cold:
                self._cold = False
                self._metrics.add_metric("ColdStart", MetricUnit.Count, 1)
                added += 1
            loaded = self.model.peek()
            if loaded is not None and self.model.loads_succeeded > self._reported_loads:
                self._reported_loads = self.model.loads_succeeded
                info = loaded.info
                self._metrics.add_metric("ModelLoadSeconds", MetricUnit.Seconds, info.total_seconds)
                self._metrics.add_metric("ModelBytes", MetricUnit.Bytes, info.size_bytes)
                added += 2
            infer = timings.total("infer") if timings is not None else None
            if infer is not None:
                self._metrics.add_metric("InferenceMs", MetricUnit.Milliseconds, infer)
                added += 1
            if added:  # Powertools warns on an empty flush
                self._metrics.flush_metrics()
