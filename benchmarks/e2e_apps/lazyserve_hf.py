"""The lazyserve transformers function, written the documented way: `Service.from_pretrained`
(LAZYSERVE_MODEL_URI names the directory, in S3 or on local disk), `@service.predict`."""

from __future__ import annotations

from typing import Any

from transformers import AutoModel

from benchmarks.e2e_apps.common import PredictResponse
from benchmarks.e2e_apps.hf_common import TokensRequest, infer
from lazyserve import Loaded, Service

service = Service.from_pretrained(AutoModel)


@service.predict
def predict(model: Loaded[Any], request: TokensRequest) -> PredictResponse:
    return infer(model.module, request.input_ids)


handler = service.handler
