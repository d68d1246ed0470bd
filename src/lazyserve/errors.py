"""Errors raised by lazyserve.

LazyserveError
├── SettingsError          a LAZYSERVE_* variable is missing or invalid
├── ModelNotFound          no model has that name under the prefix (HTTP 404)
├── ModelUnavailable       the model cannot be served (HTTP 503 when `retryable`, else 500)
│   ├── ModelLoadTimeout   a request waited longer than LAZYSERVE_LOAD_WAIT        retryable
│   └── ModelLoadError     a load ran and failed
│       ├── ModelFetchError      the weights could not be read (S3 or local file)  as S3 said
│       │   └── ModelMissing     no object or file is there                        no
│       ├── ModelTooLarge        the weights cannot fit in the memory allowed       no (a busy
│       │                        pool's budget: yes)
│       ├── ModelChangedError    the S3 object changed while it was being read     retryable
│       ├── ModelIntegrityError  the weights do not match the expected sha256      no
│       └── ModelFormatError     the bytes are not a safe, valid weights file for   no
│                                the model
├── PredictFailed          the predict function raised (HTTP 500 with a request id)
├── LambdaEventError       a direct Lambda invocation that cannot be served
│   ├── InvalidInput       the payload breaks the input rules
│   └── UnsupportedEvent   the event has none of the accepted shapes
└── InitError              `lazyserve init` cannot write the project (its name, its directory)

LazyserveWarning (a UserWarning)   a LAZYSERVE_* variable that is not a setting (a typo?)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

__all__ = [
    "InitError",
    "InvalidInput",
    "LambdaEventError",
    "LazyserveError",
    "LazyserveWarning",
    "ModelChangedError",
    "ModelFetchError",
    "ModelFormatError",
    "ModelIntegrityError",
    "ModelLoadError",
    "ModelLoadTimeout",
    "ModelMissing",
    "ModelNotFound",
    "ModelTooLarge",
    "ModelUnavailable",
    "PredictFailed",
    "SettingsError",
    "UnsupportedEvent",
    "few",
]


class LazyserveError(Exception):
    """Base class of every error lazyserve raises."""


class SettingsError(LazyserveError):
    """A LAZYSERVE_* environment variable is missing or has a value that is not accepted."""


class ModelNotFound(LazyserveError):
    """No model has that name (a name outside the accepted characters, or no object under the
    prefix); HTTP answers 404 and the other models keep serving."""


class ModelUnavailable(LazyserveError):
    """The model cannot be served. `retryable`: whether trying again may change that (S3
    throttling, a timeout, a load still running): HTTP answers 503 with Retry-After; otherwise
    (a bad file, a missing object, denied access) only a change to the object or to the
    function's configuration can, and HTTP answers 500 without Retry-After."""

    retryable: bool = True
    identity: str | None = None
    """The object version a failed load read (its ETag and version id, or a local file's size,
    mtime and inode), when it read one: a failure that is not retryable holds until it changes."""

    def __init__(self, message: str = "", *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class ModelLoadTimeout(ModelUnavailable):
    """A request waited longer than LAZYSERVE_LOAD_WAIT; the load itself carries on."""


class ModelLoadError(ModelUnavailable):
    """A load ran and failed; a retryable failure is tried again by the next request that needs
    the model, any other is remembered until the object changes."""


class ModelFetchError(ModelLoadError):
    """The weights could not be read from S3 or from the local file system."""


class ModelMissing(ModelFetchError):
    """There is no object (or file) where the URI points."""

    retryable = False


class ModelTooLarge(ModelLoadError):
    """The weights cannot fit in the memory the function may use (or its memory budget); the
    load stops before it downloads them."""

    retryable = False


class ModelChangedError(ModelLoadError):
    """The S3 object was replaced while it was being read, so its parts cannot be mixed."""


class ModelIntegrityError(ModelLoadError):
    """The weights' sha256 differs from the digest that was expected."""

    retryable = False


class ModelFormatError(ModelLoadError):
    """The bytes are not a safe, well-formed weights file that fits the model."""

    retryable = False


class PredictFailed(LazyserveError):
    """The predict function raised an exception: HTTP answers a JSON 500 naming the request id,
    and the log has the exception with its traceback under that id."""

    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"the predict function failed; the log has its error under request id {request_id}"
        )
        self.request_id = request_id


class LambdaEventError(LazyserveError):
    """A direct Lambda invocation that cannot be served; raised so Lambda reports its class."""


class InvalidInput(LambdaEventError):
    """A direct invocation payload breaks the input rules."""


class UnsupportedEvent(LambdaEventError):
    """The Lambda event has none of the shapes the function accepts."""


class InitError(LazyserveError):
    """`lazyserve init` cannot write the project; `field` names what to change: `name` (the
    project name) or `directory` (the target directory)."""

    def __init__(self, message: str, *, field: Literal["name", "directory"]) -> None:
        super().__init__(message)
        self.field = field


class LazyserveWarning(UserWarning):
    """Something lazyserve can run with but that is likely a mistake, such as an unknown
    LAZYSERVE_* variable (`-W error::lazyserve.errors.LazyserveWarning` makes it fatal)."""


def few(items: Sequence[str], *, quote: bool = True, shown: int = 5) -> str:
    """`'a', 'b', 'c', 'd', 'e', and 12 more`: how a message lists names that may number in
    the hundreds (a message stays a few hundred bytes)."""
    listed = [repr(item) if quote else item for item in items[:shown]]
    if len(items) > shown:
        listed.append(f"and {len(items) - shown} more")
    return ", ".join(listed)
