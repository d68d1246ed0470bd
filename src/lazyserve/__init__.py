"""Serve a PyTorch model behind FastAPI on AWS Lambda: loaded once, lazily, safely and fast."""

import importlib as _importlib
import typing as _typing

__version__ = "0.2.0"

if _typing.TYPE_CHECKING:
    from lazyserve.errors import (
        InvalidInput,
        LambdaEventError,
        LazyserveError,
        LazyserveWarning,
        ModelChangedError,
        ModelFetchError,
        ModelFormatError,
        ModelIntegrityError,
        ModelLoadError,
        ModelLoadTimeout,
        ModelMissing,
        ModelNotFound,
        ModelTooLarge,
        ModelUnavailable,
        PredictFailed,
        SettingsError,
        UnsupportedEvent,
    )
    from lazyserve.lazy import LazyModel
    from lazyserve.model import Loaded, ModelInfo
    from lazyserve.service import Service
    from lazyserve.settings import Settings, load_settings

# Names resolve on first use (PEP 562): `import lazyserve` stays cheap, and the settings can be
# read before torch is imported.
_WHERE = {
    "InvalidInput": "errors",
    "LambdaEventError": "errors",
    "LazyModel": "lazy",
    "LazyserveError": "errors",
    "LazyserveWarning": "errors",
    "Loaded": "model",
    "ModelChangedError": "errors",
    "ModelFetchError": "errors",
    "ModelFormatError": "errors",
    "ModelInfo": "model",
    "ModelIntegrityError": "errors",
    "ModelLoadError": "errors",
    "ModelLoadTimeout": "errors",
    "ModelMissing": "errors",
    "ModelNotFound": "errors",
    "ModelTooLarge": "errors",
    "ModelUnavailable": "errors",
    "PredictFailed": "errors",
    "Service": "service",
    "Settings": "settings",
    "SettingsError": "errors",
    "UnsupportedEvent": "errors",
    "load_settings": "settings",
}
__all__ = [
    "InvalidInput",
    "LambdaEventError",
    "LazyModel",
    "LazyserveError",
    "LazyserveWarning",
    "Loaded",
    "ModelChangedError",
    "ModelFetchError",
    "ModelFormatError",
    "ModelInfo",
    "ModelIntegrityError",
    "ModelLoadError",
    "ModelLoadTimeout",
    "ModelMissing",
    "ModelNotFound",
    "ModelTooLarge",
    "ModelUnavailable",
    "PredictFailed",
    "Service",
    "Settings",
    "SettingsError",
    "UnsupportedEvent",
    "load_settings",
]


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'lazyserve' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"lazyserve.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
