"""Settings from LAZYSERVE_* environment variables, validated once, before any AWS call."""

from __future__ import annotations

import difflib
import math
import os
import re
import warnings
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from lazyserve.errors import LazyserveWarning, SettingsError

__all__ = ["ModelURI", "Settings", "load_settings", "parse_model_uri"]

PREFIX = "LAZYSERVE_"
URI_FORMS = (
    "s3://bucket/key, s3://bucket/key?versionId=V, file:///abs/path or a plain path "
    "(ending in / for a prefix of many models)"
)
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # RFC 3986, as urllib.parse reads it
_VERSION = "?versionId="
# A `?` followed by NAME= inside a key reads as a query parameter; only versionId is one.
_QUERY_LIKE = re.compile(r"\?([A-Za-z0-9_.-]+)=")
_BUCKET = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{1,253})[A-Za-z0-9]")
BUCKET_RULE = (
    "3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter "
    "or digit (buckets made in us-east-1 before March 2018 may also hold capitals and "
    "underscores, up to 255)"
)
_MAX_KEY_BYTES = 1024  # S3's limit on a key's UTF-8 encoding
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
NAME_RULE = "ASCII letters, digits, '-', '_' and '.', not starting with '.'"
MODEL_SUFFIX = ".safetensors"
_BYTES = re.compile(r"([0-9]+)([KMGkmg]?)")
_BINARY = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
MEMORY_BUDGET_FORM = (
    "a whole number of bytes above 0, optionally followed by K, M or G (binary multiples: "
    "1K = 1024 bytes, 1M = 1024K, 1G = 1024M), e.g. 1536M; leave it unset (or empty) for "
    "the default"
)
REFRESH_FORM = "a number of seconds above 0, e.g. 300; leave it unset (or empty) to never refresh"


@dataclass(frozen=True)
class ModelURI:
    """Where the weights live: an S3 object (optionally one version), a local file, or a
    prefix (ending in `/`) under which each model NAME is `NAME.safetensors`."""

    uri: str
    bucket: str | None = None
    key: str | None = None
    version_id: str | None = None
    path: Path | None = None

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    @property
    def is_prefix(self) -> bool:
        """A prefix of many models (the URI ends in `/`), not one weights file."""
        if self.key is not None:
            return self.key == "" or self.key.endswith("/")
        return self.uri.endswith(("/", os.sep))

    @property
    def suffix(self) -> str:
        name = self.key if self.key is not None else str(self.path)
        return PurePosixPath(name).suffix.lower()

    @property
    def format(self) -> Literal["pt", "safetensors"]:
        """The weights format, from the name: `pt` for `.pt`/`.pth`, else `safetensors`."""
        return "pt" if self.suffix in (".pt", ".pth") and not self.is_prefix else "safetensors"

    def for_model(self, name: str) -> ModelURI:
        """The weights of model `name` under this prefix: `<prefix>NAME.safetensors`."""
        if not self.is_prefix:
            raise ValueError(f"{self.uri} names one weights file, not a prefix (one ends in /)")
        if not _NAME.fullmatch(name):
            raise ValueError(f"model name {name!r} is not accepted: use {NAME_RULE}")
        file = name + MODEL_SUFFIX
        if self.key is not None:
            key = self.key + file
            if len(key.encode()) > _MAX_KEY_BYTES:
                raise ValueError(
                    f"model name {name!r} makes the key longer than S3's {_MAX_KEY_BYTES} bytes"
                )
            return ModelURI(f"s3://{self.bucket}/{key}", bucket=self.bucket, key=key)
        assert self.path is not None
        return ModelURI(self.uri + file, path=self.path / file)


def parse_model_uri(uri: str) -> ModelURI:
    """Parse `s3://bucket/key[?versionId=V]`, `file:///abs/path` or a plain path; see
    `_parse_s3` for how keys are read (literally)."""
    if not uri.strip():
        raise ValueError(f"must not be empty; accepted: {URI_FORMS}")
    scheme = _SCHEME.match(uri)
    # One-letter "schemes" are Windows drive letters, i.e. plain paths.
    if scheme is None or len(scheme[1]) == 1:
        return ModelURI(uri, path=Path(uri))
    name = scheme[1].lower()
    rest = uri[scheme.end() :]
    if name == "s3":
        return _parse_s3(uri, rest)
    if name == "file":
        return _parse_file(uri, rest)
    raise ValueError(f"scheme {scheme[1]!r} is not supported; accepted: {URI_FORMS}")


def _parse_s3(uri: str, rest: str) -> ModelURI:
    # By hand, not urllib.parse: a key is taken literally (`#`, `%`, `+`, `//`, spaces), and a
    # version id keeps its `+` (AWS's own example ids hold some). The rule: the bucket runs to
    # the first `/`; the key is everything after it up to the LAST `?versionId=`, whose value
    # runs to the end. A version id never holds `?`, so the split is unambiguous; a key that
    # holds `?NAME=` (NAME of letters, digits, `-`, `_`, `.`) would read as a query
    # parameter, so it is refused rather than guessed at.
    if not rest.startswith("//"):
        raise ValueError(f"an s3 URI starts with s3://; accepted: {URI_FORMS}")
    bucket, slash, key = rest[2:].partition("/")
    if bucket.lower().startswith("arn:"):
        raise ValueError(
            "ARNs (access points, Outposts, Object Lambda) are not supported as the bucket; "
            "give the access point's alias (it ends in -s3alias) as the bucket instead"
        )
    if not bucket:
        raise ValueError(f"an s3:// URI needs a bucket and a key; accepted: {URI_FORMS}")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"bucket {bucket!r} is not a valid S3 bucket name: {BUCKET_RULE}")
    if not slash:
        raise ValueError(
            f"an s3:// URI needs a key after the bucket (s3://{bucket}/key), or a / for a "
            f"prefix of many models (s3://{bucket}/)"
        )
    version: str | None = None
    at = key.rfind(_VERSION)
    if at >= 0:
        key, version = key[:at], key[at + len(_VERSION) :]
        if not version:
            raise ValueError("versionId is empty; drop it or give the object's version id")
        if any(c == "?" or c.isspace() or not c.isprintable() for c in version):
            raise ValueError(
                f"versionId {version!r} is not an S3 version id (no '?', spaces or "
                "control characters)"
            )
        if len(version.encode()) > _MAX_KEY_BYTES:
            raise ValueError(f"versionId is longer than S3's {_MAX_KEY_BYTES} bytes")
    query = _QUERY_LIKE.search(key)
    if query:
        raise ValueError(
            f"the only query parameter accepted is versionId, once, at the end "
            f"(s3://bucket/key?versionId=V), got {query[0]!r}"
        )
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise ValueError("the key is not valid Unicode (a lone surrogate)") from None
    if size > _MAX_KEY_BYTES:
        raise ValueError(f"the key is {size} bytes; S3 keys are at most {_MAX_KEY_BYTES}")
    parsed = ModelURI(uri, bucket=bucket, key=key, version_id=version)
    if parsed.is_prefix and version is not None:
        raise ValueError("a versionId pins one object; a URI ending in / names many models")
    return parsed


def _parse_file(uri: str, rest: str) -> ModelURI:
    # RFC 8089: file:///abs, file://localhost/abs or file:/abs, percent-encoded as
    # Path.as_uri() writes it; `?` and `#` are part of the path, not a query or fragment.
    if rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        if host not in ("", "localhost") or not slash:
            raise ValueError(
                f"a file:// URI names a local absolute path (file:///abs/path); accepted: "
                f"{URI_FORMS}"
            )
        path = "/" + path
    elif rest.startswith("/"):
        path = rest
    else:
        raise ValueError(f"a file: URI names an absolute path (file:///abs/path), got {uri!r}")
    return ModelURI(uri, path=Path(unquote(path)))


def _cpus() -> int:
    # Lambda and containers restrict the CPUs a process may use; os.cpu_count() ignores that.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """The LAZYSERVE_* settings; see the README's settings table."""

    # env_ignore_empty: an empty value means unset, for every setting (the SAM template passes
    # "" for the optional parameters a deployment leaves blank).
    model_config = SettingsConfigDict(
        env_prefix=PREFIX, case_sensitive=False, frozen=True, env_ignore_empty=True
    )

    model_uri: str
    model_sha256: str | None = None
    load: Literal["lazy", "eager", "background"] = "lazy"
    load_wait: float = Field(default=25.0, gt=0, le=900)
    s3_concurrency: int = Field(default=8, ge=1, le=64)
    s3_part_size: int = Field(default=8 * 1024 * 1024, ge=4096)
    torch_threads: int = Field(default_factory=_cpus, ge=1, le=256)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    metrics: Literal["auto", "on", "off"] = "auto"
    memory_budget: int | None = None
    refresh_seconds: float | None = None

    @field_validator("model_uri")
    @classmethod
    def _check_uri(cls, value: str) -> str:
        parse_model_uri(value)
        return value

    @field_validator("model_sha256", mode="before")
    @classmethod
    def _check_sha256(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            raise ValueError("accepted: 64 hexadecimal characters (a sha256 digest)")
        return value.lower()

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _check_memory_budget(cls, value: Any) -> Any:
        if value is None or isinstance(value, int):
            return value
        match = _BYTES.fullmatch(str(value).strip())
        if match is None or int(match[1]) == 0:
            raise ValueError(f"accepted: {MEMORY_BUDGET_FORM}")
        return int(match[1]) * _BINARY[match[2].upper()]

    @field_validator("refresh_seconds", mode="before")
    @classmethod
    def _check_refresh_seconds(cls, value: Any) -> Any:
        if value is None:
            return None
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"accepted: {REFRESH_FORM}")
        return seconds

    @model_validator(mode="after")
    def _check_refresh_target(self) -> Settings:
        uri = self.uri
        if self.refresh_seconds is not None and (not uri.is_s3 or uri.version_id is not None):
            what = "pins one version" if uri.is_s3 else "is not in S3"
            raise ValueError(
                f"LAZYSERVE_REFRESH_SECONDS is set, but LAZYSERVE_MODEL_URI {self.model_uri!r} "
                f"{what}: only an s3:// URI without ?versionId= can change. Unset one of them."
            )
        return self

    @field_validator("load", "log_level", "metrics", mode="before")
    @classmethod
    def _fold_case(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    @property
    def uri(self) -> ModelURI:
        return parse_model_uri(self.model_uri)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the environment (or the mapping handed to load_settings): no .env files, no
        # secrets directories that could differ between a laptop and Lambda.
        environ = _environ.get()
        if environ is None:
            return (init_settings, env_settings)
        return (init_settings, _MappingEnvSource(settings_cls, environ))


# The mapping load_settings was given, for settings_customise_sources to read from.
_environ: ContextVar[Mapping[str, str] | None] = ContextVar("lazyserve_environ", default=None)


class _MappingEnvSource(EnvSettingsSource):
    # pydantic-settings reads os.environ only; tests and callers hand in a plain mapping
    # instead (Starlette's Config(environ=...) habit).
    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env_vars = parse_env_vars(
            environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def _describe(error: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    if not error["loc"]:  # a rule across settings, which names them itself
        return str(error["msg"]).removeprefix("Value error, ")
    field = str(error["loc"][0])
    var = PREFIX + field.upper()
    value = next((v for k, v in environ.items() if k.upper() == var), error.get("input"))
    if error["type"] == "missing":
        hint = f": give {URI_FORMS}" if field == "model_uri" else ""
        if value == "":
            return f"{var} has value '': empty means unset, and it is required{hint}."
        typos = [name for name, guess in unknown_variables(environ) if guess == var]
        typo = f" ({', '.join(typos)} is set: a typo?)" if typos else ""
        return f"{var} is required but not set{hint}.{typo}"
    reason = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "literal_error":
        reason = reason.replace("Input should be", "accepted:")
    elif error["type"] in ("int_parsing", "float_parsing"):
        reason = f"not a valid {'integer' if error['type'] == 'int_parsing' else 'number'}"
    return f"{var} has value {value!r}: {reason}."


def known_variables() -> list[str]:
    """Every LAZYSERVE_* variable lazyserve reads."""
    return [PREFIX + name.upper() for name in Settings.model_fields]


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """(variable, the known one it most likely meant, or None) for each LAZYSERVE_* variable
    in `environ` that is not a setting."""
    known = known_variables()
    tails = {name.removeprefix(PREFIX): name for name in known}
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper in known:
            continue
        tail = upper.removeprefix(PREFIX)
        # Compare what follows the prefix: the shared prefix alone makes every pair "close".
        close = difflib.get_close_matches(tail, tails, n=1, cutoff=0.6)
        if not close and len(tail) >= 3:
            close = [t for t in tails if tail in t or t in tail][:1]
        found.append((name, tails[close[0]] if close else None))
    return found


def _warn_unknown(environ: Mapping[str, str]) -> None:
    for name, guess in unknown_variables(environ):
        if guess is not None:
            hint = f"did you mean {guess}?"
        else:
            hint = f"the settings are {', '.join(known_variables())}"
        # stacklevel 3: the line that called load_settings, which is what the user can change.
        warnings.warn(
            f"{name} is not a lazyserve setting and is ignored; {hint}",
            LazyserveWarning,
            stacklevel=3,
        )


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the settings; raise SettingsError naming each bad variable, and warn
    (LazyserveWarning) about each LAZYSERVE_* variable that is not a setting."""
    env = os.environ if environ is None else environ
    _warn_unknown(env)
    token = _environ.set(env)
    try:
        return Settings()  # type: ignore[call-arg]  # values come from the environment
    except ValidationError as exc:
        lines = [_describe(err, env) for err in exc.errors()]
        raise SettingsError(" ".join(lines)) from None
    finally:
        _environ.reset(token)
