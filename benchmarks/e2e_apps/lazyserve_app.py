"""The lazyserve function, written the documented way: `Service(build)`, `@service.predict`."""

from __future__ import annotations

from torch import nn

from benchmarks.e2e_apps.common import PredictRequest, PredictResponse, build, infer
from lazyserve import Loaded, Service

service = Service(build)


@service.predict
def predict(model: Loaded[nn.Module], request: PredictRequest) -> PredictResponse:
    return infer(model.module, request.inputs)


handler = service.handler
