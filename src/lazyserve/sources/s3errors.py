"""What S3 (or something claiming to be S3) answered, and how lazyserve words it for the user.

Everything that reaches a message comes from lazyserve's own wording: S3's error code and request
id only when they have the shape S3 gives them, never its free-text `<Message>` (an endpoint may
echo the request back into it, credentials included). The message goes to the log, with anything
shaped like a credential removed and its length bounded."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from lazyserve.errors import LazyserveError, ModelFetchError, ModelFormatError, ModelMissing

__all__ = [
    "PreconditionFailed",
    "RangeHead",
    "S3Error",
    "TransferError",
    "load_error",
    "parse_error",
    "redact",
]

log = logging.getLogger("lazyserve")

# botocore's standard retry mode retries these (botocore/retries/standard.py), and so do we.
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_RETRY_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
        "ExpiredToken",
        "TokenRefreshRequired",
    }
)
EXPIRED_CODES = frozenset({"ExpiredToken", "TokenRefreshRequired"})
_HINTS = {
    "NoSuchKey": "no object has that key",
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchVersion": "the object has no such version",
    "SlowDown": "S3 is throttling requests",
    "InvalidAccessKeyId": "S3 does not know the access key id; check the function's credentials",
    "SignatureDoesNotMatch": "S3 refused the request signature; check the secret access key",
    "ExpiredToken": "the credentials' session token has expired",
    "InvalidToken": "the credentials' session token is not valid",
    "RequestTimeTooSkewed": "this machine's clock is too far from S3's",
    "PermanentRedirect": "the bucket is in another region; set AWS_REGION to it",
    "InternalError": "S3 had an internal error",
    "ServiceUnavailable": "S3 is unavailable",
}
_CODE = re.compile(r"[A-Za-z][A-Za-z0-9.]{0,63}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9+/=-]{1,128}")
_REGION = re.compile(r"[a-z]{2,}(-[a-z0-9]+){1,4}")
_XML_FIELD = re.compile(r"<(Code|Message|RequestId|Region)>(.{0,4096}?)</\1>", re.S)
_ENTITIES = {"&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'", "&amp;": "&"}
# Shapes of secrets a hostile or careless endpoint may echo back: access key ids, the signature
# and credential parts of an Authorization header, and long base64 runs (secret keys, tokens).
_SECRETS = re.compile(
    r"((?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12,})"
    r"|((?:Signature|Credential|X-Amz-Security-Token|X-Amz-Signature|X-Amz-Credential)[=:]\s*[^\s,&\"'<]+)"
    r"|([A-Za-z0-9+/]{32,}={0,2})",
    re.I,
)
_MAX_LOGGED = 300


@dataclass(frozen=True)
class RangeHead:
    """What one response said before its body: the bytes it carries and the object's identity."""

    status: int
    first: int
    last: int
    total: int
    ranged: bool  # it carried a Content-Range (an endpoint that ignores Range sends none)
    etag: str
    version_id: str | None
    sha256: str | None  # x-amz-meta-sha256, stored by `lazyserve push`
    request_id: str
    encryption: str | None  # x-amz-server-side-encryption
    # x-amz-meta-crc32 and -crc64nvme, stored beside the sha256 by push (sources/checksums.py)
    crc32: str | None = None
    crc64nvme: str | None = None


class S3Error(Exception):
    """S3 answered with an error: the status, its code and request id (checked for shape), and
    its message (for the log only)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        request_id: str,
        *,
        version_id: str | None = None,
        encryption: str | None = None,
        region: str | None = None,
    ) -> None:
        super().__init__(f"HTTP {status} {code}")
        self.status = status
        self.code = code if _CODE.fullmatch(code) else f"HTTP{status}"
        self.message = redact(message)
        self.request_id = request_id if _REQUEST_ID.fullmatch(request_id) else ""
        self.version_id = version_id  # the version the request asked for, if any
        self.encryption = encryption
        # x-amz-bucket-region, when S3 says the bucket lives elsewhere
        self.region = region if region and _REGION.fullmatch(region) else None

    @property
    def retryable(self) -> bool:
        return self.status in _RETRY_STATUSES or self.code in _RETRY_CODES


class PreconditionFailed(Exception):
    """412: the object no longer has the ETag the request was pinned to."""


class TransferError(Exception):
    """No usable answer: a connection or a timeout failed, a body broke off or came too slowly."""

    def __init__(
        self, detail: str, *, start: int, end: int, answered: RangeHead | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.start = start
        self.end = end
        # S3 had answered (status and headers) when the body broke: its request id is what
        # AWS support asks for.
        self.answered = answered is not None
        self.request_id = answered.request_id if answered is not None else ""


def redact(text: str) -> str:
    """`text` without anything shaped like a credential, at most a few hundred characters."""
    cleaned = _SECRETS.sub("[redacted]", text.replace("\r", " ").replace("\n", " "))
    return cleaned if len(cleaned) <= _MAX_LOGGED else cleaned[:_MAX_LOGGED] + "..."


def parse_error(
    status: int,
    body: bytes,
    header: Callable[[str], str | None],
    version_id: str | None,
    request_id: str,
) -> S3Error:
    """S3's XML error body (Code, Message, RequestId, Region), or what the status says."""
    fields = {
        name: re.sub(r"&\w+;", lambda m: _ENTITIES.get(m.group(), m.group()), value).strip()
        for name, value in _XML_FIELD.findall(body.decode("utf-8", "replace"))
    }
    code = fields.get("Code") or {
        301: "PermanentRedirect",
        403: "AccessDenied",
        404: "NoSuchKey",
        416: "InvalidRange",
    }.get(status, f"HTTP{status}")
    return S3Error(
        status,
        code,
        fields.get("Message", ""),
        fields.get("RequestId") or request_id,
        version_id=version_id,
        encryption=header("x-amz-server-side-encryption"),
        region=header("x-amz-bucket-region") or fields.get("Region"),
    )


def load_error(uri: str, exc: BaseException) -> LazyserveError:
    """The lazyserve error for a failed read of `uri` (`s3://bucket/key`): S3's answer with a
    hint, a failed transfer, or missing credentials. The one place these are worded."""
    from lazyserve.sources.signing import CredentialsError

    where = f"cannot read {uri}"
    if isinstance(exc, S3Error):
        if exc.message:
            log.warning("%s: S3 error %s said: %s", uri, exc.code, exc.message)
        if exc.code == "InvalidRange":
            return ModelFormatError(f"{uri}: the object is empty")
        request = f", request id {exc.request_id}" if exc.request_id else ""
        text = f"{where}: S3 error {exc.code} ({_hint(exc)}){request}"
        if exc.code in ("NoSuchKey", "NoSuchVersion"):
            return ModelMissing(text)
        return ModelFetchError(text, retryable=exc.retryable)
    if isinstance(exc, TransferError):
        if exc.answered:  # the body broke
            tail = f", request id {exc.request_id}" if exc.request_id else ""
            return ModelFetchError(f"{where} bytes {exc.start}-{exc.end}: {exc.detail}{tail}")
        return ModelFetchError(f"{where}: {exc.detail}")
    if isinstance(exc, CredentialsError):
        return ModelFetchError(f"{where}: {exc}")
    log.warning("%s: %s", where, redact(f"{type(exc).__name__}: {exc}"))
    return ModelFetchError(f"{where}: {type(exc).__name__}")


def _hint(exc: S3Error) -> str:
    if exc.code == "AccessDenied":
        # Name the permission this request needed: a version is its own action, and an SSE-KMS
        # object also needs the key.
        if (exc.encryption or "").startswith("aws:kms") or "kms" in exc.message.lower():
            return (
                "access denied: the object is encrypted with SSE-KMS; the function's role needs "
                "kms:Decrypt on its KMS key"
            )
        if exc.version_id is not None:
            return "access denied: the function's role needs s3:GetObjectVersion on this key"
        return (
            "access denied: the function's role needs s3:GetObject on this key "
            "(without s3:ListBucket, a missing key is also answered AccessDenied)"
        )
    return _HINTS.get(exc.code) or f"HTTP {exc.status}"
