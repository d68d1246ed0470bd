"""Serve a PyTorch model behind FastAPI on AWS Lambda: loaded once, lazily, safely and fast."""

from lazyserve.app import setup_app
from lazyserve.aws import lambda_handler, start_loading
from lazyserve.errors import (
    InvalidInput,
    LazyserveError,
    ModelLoadError,
    ModelUnavailable,
    SettingsError,
    UnsupportedEvent,
)
from lazyserve.lazy import LazyModel
from lazyserve.model import Loaded, ModelInfo, lazy_model, load_model
from lazyserve.settings import Settings, load_settings

__all__ = [
    "InvalidInput",
    "LazyModel",
    "LazyserveError",
    "Loaded",
    "ModelInfo",
    "ModelLoadError",
    "ModelUnavailable",
    "Settings",
    "SettingsError",
    "UnsupportedEvent",
    "lambda_handler",
    "lazy_model",
    "load_model",
    "load_settings",
    "setup_app",
    "start_loading",
]
