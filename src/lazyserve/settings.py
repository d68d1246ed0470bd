"""Settings from LAZYSERVE_* environment variables, validated once, before any AWS call."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from lazyserve.errors import SettingsError

__all__ = ["ModelURI", "Settings", "load_settings", "parse_model_uri"]

PREFIX = "LAZYSERVE_"
URI_FORMS = "s3://bucket/key, s3://bucket/key?versionId=V, file:///abs/path or a plain path"
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class ModelURI:
    """Where the weights live: an S3 object (optionally one version) or a local file."""

    uri: str
    bucket: str | None = None
    key: str | None = None
    version_id: str | None = None
    path: Path | None = None

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    @property
    def suffix(self) -> str:
        name = self.key if self.key is not None else str(self.path)
        return Path(name).suffix.lower()


def parse_model_uri(uri: str) -> ModelURI:
    """Parse `s3://bucket/key[?versionId=V]`, `file:///abs/path` or a plain path."""
    if not uri.strip():
        raise ValueError(f"must not be empty; accepted: {URI_FORMS}")
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        key = unquote(parts.path.lstrip("/"))
        if not parts.netloc or not key:
            raise ValueError(f"an s3:// URI needs a bucket and a key; accepted: {URI_FORMS}")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"versionId"})
        if unknown or len(query.get("versionId", [])) > 1:
            raise ValueError(
                f"the only query parameter accepted is one versionId, got {parts.query!r}"
            )
        version = query.get("versionId", [None])[0]
        if version == "":
            raise ValueError("versionId is empty; drop it or give the object's version id")
        return ModelURI(uri, bucket=parts.netloc, key=key, version_id=version)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"a file:// URI names a local absolute path; accepted: {URI_FORMS}")
        return ModelURI(uri, path=Path(unquote(parts.path)))
    # One-letter "schemes" are Windows drive letters, i.e. plain paths.
    if parts.scheme and len(parts.scheme) > 1:
        raise ValueError(f"scheme {parts.scheme!r} is not supported; accepted: {URI_FORMS}")
    return ModelURI(uri, path=Path(uri))


def _cpus() -> int:
    # Lambda and containers restrict the CPUs a process may use; os.cpu_count() ignores that.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """The LAZYSERVE_* settings; see the README's settings table."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, case_sensitive=False, frozen=True)

    model_uri: str
    model_sha256: str | None = None
    load: Literal["lazy", "eager", "background"] = "lazy"
    load_wait: float = Field(default=25.0, gt=0, le=900)
    # Parallel ranged GETs. One S3 connection carries about 85-90 MB/s (AWS's S3 performance
    # guidelines: one connection per ~90 MB/s wanted) and Lambda publishes no network limit, so
    # 16 (up to ~1.4 GB/s) rather than 8 (~0.7 GB/s). Measured against a stand-in with S3's
    # per-connection rate and first-byte latency on a 2-vCPU VM (benchmarks/README.md,
    # "Choosing the defaults"): 0.88 / 1.09 / 1.12 of the 8-connection link at 64 MiB / 512 MiB
    # / 1 GiB, against 0.75 / 0.94 / 0.96 with 8; under heavy load from other processes 8 did
    # better at 512 MiB and up (the sha256 thread competes with 16 receiving threads).
    s3_concurrency: int = Field(default=16, ge=1, le=64)
    # The largest ranged GET (AWS recommends 8-16 MB ranges): the first GET is 1 MiB (it learns
    # the size), and an object too small for one part per connection is split evenly over them.
    s3_part_size: int = Field(default=8 * 1024 * 1024, ge=4096)
    torch_threads: int = Field(default_factory=_cpus, ge=1, le=256)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    metrics: Literal["auto", "on", "off"] = "auto"

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
    field = str(error["loc"][0]) if error["loc"] else "?"
    var = PREFIX + field.upper()
    if error["type"] == "missing":
        hint = f": give {URI_FORMS}" if field == "model_uri" else ""
        return f"{var} is required but not set{hint}."
    value = next((v for k, v in environ.items() if k.upper() == var), error.get("input"))
    reason = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "literal_error":
        reason = reason.replace("Input should be", "accepted:")
    elif error["type"] in ("int_parsing", "float_parsing"):
        reason = f"not a valid {'integer' if error['type'] == 'int_parsing' else 'number'}"
    return f"{var} has value {value!r}: {reason}."


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the settings; raise SettingsError naming each bad variable."""
    env = os.environ if environ is None else environ
    token = _environ.set(env)
    try:
        return Settings()  # type: ignore[call-arg]  # values come from the environment
    except ValidationError as exc:
        lines = [_describe(err, env) for err in exc.errors()]
        raise SettingsError(" ".join(lines)) from None
    finally:
        _environ.reset(token)
