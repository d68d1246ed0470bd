"""Serve a PyTorch model behind FastAPI on AWS Lambda: loaded once, lazily, safely and fast."""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from lazyserve.app import setup_app
    from lazyserve.aws import LambdaHandler, lambda_handler
    from lazyserve.errors import (
        InvalidInput,
        LazyserveError,
        LazyserveWarning,
        ModelLoadError,
        ModelNotFound,
        ModelTooLarge,
        ModelUnavailable,
        SettingsError,
        UnsupportedEvent,
    )
    from lazyserve.lazy import LazyModel
    from lazyserve.model import Loaded, ModelInfo, lazy_model, load_model
    from lazyserve.service import Service
    from lazyserve.settings import Settings, load_settings
    from lazyserve.sources import prefetch
    from lazyserve.startup import start_loading

# Names resolve on first use (PEP 562): `import lazyserve` stays cheap, and the settings and
# sources modules can be used before torch is imported.
_WHERE = {
    "InvalidInput": "errors",
    "LambdaHandler": "aws",
    "LazyModel": "lazy",
    "LazyserveError": "errors",
    "LazyserveWarning": "errors",
    "Loaded": "model",
    "ModelInfo": "model",
    "ModelLoadError": "errors",
    "ModelNotFound": "errors",
    "ModelTooLarge": "errors",
    "ModelUnavailable": "errors",
    "Service": "service",
    "Settings": "settings",
    "SettingsError": "errors",
    "UnsupportedEvent": "errors",
    "lambda_handler": "aws",
    "lazy_model": "model",
    "load_model": "model",
    "load_settings": "settings",
    "prefetch": "sources",
    "setup_app": "app",
    "start_loading": "startup",
}
__all__ = [
    "InvalidInput",
    "LambdaHandler",
    "LazyModel",
    "LazyserveError",
    "LazyserveWarning",
    "Loaded",
    "ModelInfo",
    "ModelLoadError",
    "ModelNotFound",
    "ModelTooLarge",
    "ModelUnavailable",
    "Service",
    "Settings",
    "SettingsError",
    "UnsupportedEvent",
    "lambda_handler",
    "lazy_model",
    "load_model",
    "load_settings",
    "prefetch",
    "setup_app",
    "start_loading",
]


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'lazyserve' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"lazyserve.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
