"""Errors raised by lazyserve.

LazyserveError
├── SettingsError          a LAZYSERVE_* variable is missing or invalid
├── ModelUnavailable       the model cannot be served right now (HTTP 503)
│   ├── ModelLoadTimeout   a request waited longer than LAZYSERVE_LOAD_WAIT
│   └── ModelLoadError     a load ran and failed
│       ├── ModelFetchError      the weights could not be read (S3 or local file)
│       ├── ModelChangedError    the S3 object changed while it was being read
│       ├── ModelIntegrityError  the weights do not match the expected sha256
│       ├── ModelFormatError     the bytes are not a safe, valid weights file for the model
│       └── ModelTooLarge        the weights cannot fit in the memory the function may use
└── LambdaEventError       a direct Lambda invocation that cannot be served
    ├── InvalidInput       the payload breaks the input rules
    └── UnsupportedEvent   the event has none of the accepted shapes
"""

from __future__ import annotations

__all__ = [
    "InvalidInput",
    "LambdaEventError",
    "LazyserveError",
    "ModelChangedError",
    "ModelFetchError",
    "ModelFormatError",
    "ModelIntegrityError",
    "ModelLoadError",
    "ModelLoadTimeout",
    "ModelTooLarge",
    "ModelUnavailable",
    "SettingsError",
    "UnsupportedEvent",
]


class LazyserveError(Exception):
    """Base class of every error lazyserve raises."""


class SettingsError(LazyserveError):
    """A LAZYSERVE_* environment variable is missing or has a value that is not accepted."""


class ModelUnavailable(LazyserveError):
    """The model cannot be served right now; HTTP answers 503 with Retry-After."""


class ModelLoadTimeout(ModelUnavailable):
    """A request waited longer than LAZYSERVE_LOAD_WAIT; the load itself carries on."""


class ModelLoadError(ModelUnavailable):
    """A load ran and failed; the next request that needs the model tries again."""


class ModelFetchError(ModelLoadError):
    """The weights could not be read from S3 or from the local file system."""


class ModelChangedError(ModelLoadError):
    """The S3 object was replaced while it was being read, so its parts cannot be mixed."""


class ModelIntegrityError(ModelLoadError):
    """The weights' sha256 differs from the digest that was expected."""


class ModelFormatError(ModelLoadError):
    """The bytes are not a safe, well-formed weights file that fits the model."""


class ModelTooLarge(ModelLoadError):
    """The weights are larger than the memory the function may use minus what it already holds;
    refused from the first response's size, before the rest is downloaded."""


class LambdaEventError(LazyserveError):
    """A direct Lambda invocation that cannot be served; raised so Lambda reports its class."""


class InvalidInput(LambdaEventError):
    """A direct invocation payload breaks the input rules."""


class UnsupportedEvent(LambdaEventError):
    """The Lambda event has none of the shapes the function accepts."""
