"""Protocols and aliases at lazyserve's boundaries, so tests can hand in small fakes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client as S3Client
else:
    S3Client = Any

__all__ = ["LambdaContext", "LambdaEvent", "LambdaHandler", "S3Client"]

LambdaEvent: TypeAlias = dict[str, Any]


class LambdaContext(Protocol):
    """The parts of the Lambda context object that lazyserve reads."""

    aws_request_id: str
    function_name: str
    memory_limit_in_mb: str

    def get_remaining_time_in_millis(self) -> int: ...


LambdaHandler: TypeAlias = Callable[[LambdaEvent, LambdaContext | None], Any]
