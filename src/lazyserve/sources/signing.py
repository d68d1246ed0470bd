"""Who the GETs are made as, and their signatures: botocore's credential chain (in botocore's order:
environment, assume-role and web identity, SSO, shared files, container endpoint, instance
metadata; refreshed before they expire) and its SigV4 signer for S3. lazyserve owns neither:
botocore is imported here on first use, in the thread (or helper process) that loads, not when
lazyserve is imported."""

from __future__ import annotations

import logging
import threading
from typing import Any

from lazyserve import __version__

__all__ = ["CredentialsError", "Signer", "user_agent"]


class _OwnSignatures(logging.Filter):
    """botocore's signer logs every canonical request at DEBUG, the session token in it: the
    records of lazyserve's own signatures (tens per load) are dropped; an app's own boto3 calls
    log exactly as the app set logging up. Installed once, on botocore.auth's logger."""

    active = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.active, "signing", False)


_filter: _OwnSignatures | None = None
_filter_lock = threading.Lock()


def _quiet() -> _OwnSignatures:
    global _filter
    with _filter_lock:
        if _filter is None:
            _filter = _OwnSignatures()
            logging.getLogger("botocore.auth").addFilter(_filter)
        return _filter


class CredentialsError(Exception):
    """No credentials could be found, or botocore's provider failed to give them."""


def user_agent() -> str:
    """`lazyserve/VERSION botocore/VERSION`, the User-Agent of every GET."""
    import botocore

    return f"lazyserve/{__version__} botocore/{botocore.__version__}"


class Signer:
    """Signs S3 requests with the credentials botocore's chain finds (a `botocore.session.Session`
    of its own unless one is given); thread-safe."""

    def __init__(self, session: Any = None) -> None:
        self._session = session
        self._own_session = session is None
        self._credentials: Any = None
        self._lock = threading.Lock()

    @property
    def session(self) -> Any:
        with self._lock:
            if self._session is None:
                import botocore.session

                self._session = botocore.session.Session()
            return self._session

    def sign(
        self, method: str, url: str, headers: dict[str, str], *, region: str, name: str = "s3"
    ) -> dict[str, str]:
        """`headers` (Host included) with X-Amz-Date, X-Amz-Content-SHA256, the session token and
        Authorization added by botocore's `S3SigV4Auth`. `url` must be encoded exactly as sent."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method=method, url=url, headers=headers)
        credentials = self._frozen()
        quiet = _quiet()
        quiet.active.signing = True
        try:
            S3SigV4Auth(credentials, name, region).add_auth(request)
        finally:
            quiet.active.signing = False
        return dict(request.headers.items())

    def credentials(self) -> Any:
        """The current credentials (botocore's frozen copy), found or refreshed as needed."""
        return self._frozen()

    def invalidate(self) -> None:
        """S3 said the credentials expired: look them up again on the next request (a session
        caches what its chain found, so a session of lazyserve's own is made anew)."""
        with self._lock:
            self._credentials = None
            if self._own_session:
                self._session = None

    def _frozen(self) -> Any:
        session = self.session
        with self._lock:
            if self._credentials is None:
                try:
                    found = session.get_credentials()
                except Exception as exc:  # botocore's providers raise their own kinds
                    raise CredentialsError(
                        f"botocore could not get credentials ({_which(exc)})"
                    ) from exc
                if found is None:
                    raise CredentialsError(
                        "no AWS credentials found (botocore looked in the environment, the "
                        "shared files, the container endpoint and instance metadata); run with "
                        "a role or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                    )
                self._credentials = found
            credentials = self._credentials
        try:
            # Refreshable credentials renew themselves here, before they expire.
            return credentials.get_frozen_credentials()
        except Exception as exc:
            raise CredentialsError(
                f"botocore could not refresh the credentials ({_which(exc)})"
            ) from exc


def _which(exc: Exception) -> str:
    """The error's class and, for botocore's own, the provider that raised it (its message may
    quote what an endpoint answered, so it goes no further than the log)."""
    provider = (getattr(exc, "kwargs", None) or {}).get("provider")
    return f"{type(exc).__name__} from {provider}" if provider else type(exc).__name__
