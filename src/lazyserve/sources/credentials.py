"""AWS credentials for the S3 GET client: the environment (what Lambda sets), else the container
credentials endpoint (SnapStart, ECS, EKS Pod Identity), else botocore's own chain; credentials
that expire are fetched again before they do. Nothing here ever prints a credential."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["CredentialSource", "Credentials", "CredentialsError"]

# botocore's rules for the container endpoint (botocore/credentials.py ContainerProvider,
# botocore/utils.py ContainerMetadataFetcher): a relative URI goes to the ECS agent's address;
# a full URI must be https, a loopback address or one of the hosts AWS uses for it.
RELATIVE_URI = "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"
FULL_URI = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
TOKEN = "AWS_CONTAINER_AUTHORIZATION_TOKEN"
TOKEN_FILE = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
ECS_AGENT = "http://169.254.170.2"
ALLOWED_HOSTS = ("169.254.170.2", "169.254.170.23", "fd00:ec2::23", "localhost")
CONTAINER_TIMEOUT = 2.0
CONTAINER_ATTEMPTS = 3
CONTAINER_PAUSE = 1.0
# Fetched again this long before they expire (botocore's advisory window); if that fails, the
# old ones are used until the last REFRESH_REQUIRED seconds (botocore's mandatory window).
REFRESH_BEFORE = 15 * 60.0
REFRESH_REQUIRED = 10 * 60.0


class CredentialsError(Exception):
    """No credentials could be found or fetched (the message names where it looked)."""


@dataclass(frozen=True, repr=False)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None
    expires: float | None = None  # time.time() when they stop working; None: they do not

    def __repr__(self) -> str:  # a log line or a traceback must never carry them
        return "Credentials(...)"

    def expiring(self, within: float) -> bool:
        return self.expires is not None and self.expires - time.time() < within


class CredentialSource:
    """Where one process's S3 credentials come from, decided on first use; thread-safe."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self._lock = threading.Lock()
        self._current: Credentials | None = None
        self._botocore: Any = None  # botocore's credentials object, when it is the source
        self.origin = ""

    @classmethod
    def of_botocore(cls, credentials: Any) -> CredentialSource:
        """The credentials of a botocore session or client (botocore refreshes them)."""
        source = cls({})
        source._botocore = credentials
        source.origin = "botocore"
        return source

    def get(self) -> Credentials:
        if self._botocore is not None:
            frozen = self._botocore.get_frozen_credentials()  # botocore refreshes them itself
            return Credentials(frozen.access_key, frozen.secret_key, frozen.token)
        current = self._current
        if current is not None and not current.expiring(REFRESH_BEFORE):
            return current
        with self._lock:
            current = self._current
            if current is not None and not current.expiring(REFRESH_BEFORE):
                return current
            try:
                fresh = self._load()
            except CredentialsError:
                if current is not None and not current.expiring(REFRESH_REQUIRED):
                    return current  # still good for a while; the next request tries again
                raise
            if fresh is not None:
                self._current = fresh
                return fresh
        return self.get()  # botocore's chain became the source

    def invalidate(self) -> None:
        """Forget the current credentials (S3 said they expired): the next get() fetches."""
        with self._lock:
            self._current = None

    def _load(self) -> Credentials | None:
        env = self._environ
        access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if access and secret:
            self.origin = "environment"
            token = env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN") or None
            return Credentials(access, secret, token, _expiry(env.get("AWS_CREDENTIAL_EXPIRATION")))
        if env.get(RELATIVE_URI) or env.get(FULL_URI):
            self.origin = "container credentials endpoint"
            return _from_container(env)
        # Profiles, SSO, web identity, instance metadata...: botocore knows them all, at the
        # cost of importing it (~0.2 s), paid only here.
        import botocore.session

        credentials = botocore.session.get_session().get_credentials()
        if credentials is None:
            raise CredentialsError(
                "no AWS credentials found: looked in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                f"{RELATIVE_URI}/{FULL_URI} and botocore's chain (profiles, SSO, instance "
                "metadata); run with a role or set those variables"
            )
        self.origin = "botocore"
        self._botocore = credentials
        return None


def _from_container(env: Mapping[str, str]) -> Credentials:
    relative = env.get(RELATIVE_URI)
    url = f"{ECS_AGENT}{relative}" if relative else env.get(FULL_URI, "")
    parts = urlsplit(url)
    where = RELATIVE_URI if relative else FULL_URI
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CredentialsError(f"{where} is not an http(s) URL: {url!r}")
    if parts.scheme == "http" and not _allowed_host(parts.hostname):
        raise CredentialsError(
            f"{where} names host {parts.hostname!r}: over plain http only a loopback address "
            f"or {', '.join(ALLOWED_HOSTS)} is accepted (botocore's rule); use https"
        )
    headers = {"Accept": "application/json"}
    authorization = _authorization(env)
    if authorization is not None:
        headers["Authorization"] = authorization
    problem = ""
    for attempt in range(CONTAINER_ATTEMPTS):
        if attempt:
            time.sleep(CONTAINER_PAUSE)
        try:
            status, body = _get(parts.scheme, parts.netloc, _target(url), headers)
            if status != 200:
                # The body is not shown: it is the endpoint's and may echo what it was sent.
                problem = f"HTTP {status}"
                continue
            data = json.loads(body)
            return Credentials(
                str(data["AccessKeyId"]),
                str(data["SecretAccessKey"]),
                data.get("Token") or None,
                _expiry(data.get("Expiration")),
            )
        except (OSError, http.client.HTTPException) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        except (ValueError, KeyError, TypeError) as exc:
            problem = f"an answer that is not a credentials document ({type(exc).__name__})"
    raise CredentialsError(
        f"the container credentials endpoint ({where}, host {parts.hostname}) gave no "
        f"credentials after {CONTAINER_ATTEMPTS} attempts: {problem}"
    )


def _allowed_host(host: str) -> bool:
    from ipaddress import ip_address  # only here: the download helper's imports are its delay

    try:
        return ip_address(host).is_loopback or host in ALLOWED_HOSTS
    except ValueError:
        return host in ALLOWED_HOSTS


def _authorization(env: Mapping[str, str]) -> str | None:
    # The file wins over the variable and is read on every fetch: the agent rotates it.
    if env.get(TOKEN_FILE):
        try:
            with open(env[TOKEN_FILE], encoding="utf-8") as file:
                token = file.read().strip()  # botocore keeps a trailing newline; S3 would not
        except OSError as exc:
            raise CredentialsError(f"cannot read {TOKEN_FILE}: {exc.strerror}") from None
        where = TOKEN_FILE
    elif TOKEN in env:
        token, where = env[TOKEN], TOKEN
    else:
        return None
    if "\r" in token or "\n" in token:
        raise CredentialsError(f"{where} holds a line break: not a valid header value")
    return token


def _target(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _get(scheme: str, netloc: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    connection: http.client.HTTPConnection
    if scheme == "https":
        import ssl

        connection = http.client.HTTPSConnection(
            netloc, timeout=CONTAINER_TIMEOUT, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(netloc, timeout=CONTAINER_TIMEOUT)
    try:
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _expiry(text: Any) -> float | None:
    """An ISO 8601 time (`2026-01-01T00:00:00Z`) as time.time(); None when absent."""
    if not text:
        return None
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise CredentialsError(f"the credentials' expiration {text!r} is not ISO 8601") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
