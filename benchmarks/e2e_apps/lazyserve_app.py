"""The lazyserve function, wired as handler/app.py is today: settings, the prefetch unless
loading is lazy, the imports, `lazy_model`, the app, `lambda_handler`, `start_loading`."""

from __future__ import annotations

from lazyserve.settings import load_settings
from lazyserve.sources import prefetch

settings = load_settings()
if settings.load != "lazy":
    prefetch(settings)

from fastapi import FastAPI  # noqa: E402

from benchmarks.e2e_apps.common import PredictRequest, PredictResponse, build, infer  # noqa: E402
from lazyserve import lambda_handler, lazy_model, setup_app, start_loading  # noqa: E402
from lazyserve.app import in_worker  # noqa: E402

model = lazy_model(build, settings)
app = FastAPI(strict_content_type=False)
setup_app(app, model)


@app.post("/predict")
async def predict(request: PredictRequest) -> PredictResponse:
    loaded = await model.aget()
    return await in_worker(infer, loaded.module, request.inputs)


handler = lambda_handler(app, model)
start_loading(model, settings)
