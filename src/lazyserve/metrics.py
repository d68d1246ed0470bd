"""CloudWatch metrics in the Embedded Metric Format (EMF): ColdStart, ModelLoadSeconds,
ModelBytes and InferenceMs, one document per Lambda invocation (or per request under another
server when asked), in namespace `lazyserve` with the dimension `service`, and `model` too when
one function serves many models.

The documents are written here, to the format's specification
(https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html),
rather than through Powertools' Metrics: importing it costs INIT about 0.3 s, and its flush
(a JSON-schema validation of every document) added about 0.05-0.2 ms to every warm invocation
(benchmarks/README.md, "Warm invocations")."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Mapping

from lazyserve import timing
from lazyserve.environment import on_lambda
from lazyserve.model import ModelInfo

__all__ = ["NAMESPACE", "ModelMetrics", "metrics_enabled"]

NAMESPACE = "lazyserve"
_UNITS = {
    "ColdStart": "Count",
    "ModelLoadSeconds": "Seconds",
    "ModelBytes": "Bytes",
    "InferenceMs": "Milliseconds",
}


def metrics_enabled(setting: str, environ: Mapping[str, str] | None = None) -> bool:
    """`on`, `off`, or `auto`: on inside Lambda, else off."""
    return setting == "on" or (setting == "auto" and on_lambda(environ))


class ModelMetrics:
    """Collects what loads and requests did and prints one EMF document per invocation."""

    def __init__(self, *, service: str | None = None) -> None:
        self.service = service or os.environ.get("POWERTOOLS_SERVICE_NAME") or "lazyserve"
        self._cold = True
        # Loads finish in their own threads; their figures go out with the next document of
        # the model they belong to.
        self._loads: dict[str | None, ModelInfo] = {}
        self._lock = threading.Lock()
        self._fixed: dict[tuple[str | None, ...], tuple[str, str]] = {}

    def loaded(self, info: ModelInfo, model: str | None = None) -> None:
        """A load succeeded: report its duration and size with the next document."""
        with self._lock:
            self._loads[model] = info

    def publish(self, timings: timing.Timings | None) -> None:
        """Print the document of one invocation (or request); nothing when it recorded nothing."""
        model = timings.model if timings is not None else None
        values: dict[str, float] = {}
        with self._lock:
            if self._cold:
                self._cold = False
                values["ColdStart"] = 1
            info = self._loads.pop(model, None)
        if info is not None:
            values["ModelLoadSeconds"] = info.total_seconds
            values["ModelBytes"] = info.size_bytes
        infer = timings.total("infer") if timings is not None else None
        if infer is not None:
            values["InferenceMs"] = infer
        if values:
            sys.stdout.write(self._document(values, model) + "\n")

    def _document(self, values: dict[str, float], model: str | None) -> str:
        # Only the timestamp and the numbers change between documents: the directive and the
        # dimensions are serialised once per set of metric names (a few per process).
        key = (*values, "@", model)
        fixed = self._fixed.get(key)
        if fixed is None:
            dimensions = {"service": self.service}
            if model is not None:
                dimensions["model"] = model
            directive = {
                "Namespace": NAMESPACE,
                "Dimensions": [list(dimensions)],
                "Metrics": [{"Name": name, "Unit": _UNITS[name]} for name in values],
            }
            compact = (",", ":")
            fixed = (
                json.dumps([directive], separators=compact),
                json.dumps(dimensions, separators=compact)[1:-1],
            )
            self._fixed[key] = fixed
        directive_json, dimensions_json = fixed
        numbers = ",".join(f'"{name}":{float(value)!r}' for name, value in values.items())
        return (
            f'{{"_aws":{{"Timestamp":{int(time.time() * 1000)},'
            f'"CloudWatchMetrics":{directive_json}}},{dimensions_json},{numbers}}}'
        )
