"""Settings from LAZYSERVE_* environment variables, validated once, before any AWS call."""

from __future__ import annotations

import difflib
import math
import os
import re
import warnings
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from lazyserve.environment import cpus
from lazyserve.errors import LazyserveWarning, SettingsError
from lazyserve.sources.s3 import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE
from lazyserve.uris import URI_FORMS, ModelURI, parse_model_uri

__all__ = ["ModelURI", "Settings", "load_settings", "parse_model_uri"]

PREFIX = "LAZYSERVE_"
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_BYTES = re.compile(r"([0-9]+)([KMGkmg]?)")
_BINARY = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
MEMORY_BUDGET_FORM = (
    "a whole number of bytes above 0, optionally followed by K, M or G (binary multiples: "
    "1K = 1024 bytes, 1M = 1024K, 1G = 1024M), e.g. 1536M; leave it unset (or empty) for "
    "the default"
)
REFRESH_FORM = "a number of seconds above 0, e.g. 300; leave it unset (or empty) to never refresh"


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
    # Parallel ranged GETs. One S3 connection carries about 85-90 MB/s (AWS's S3 performance
    # guidelines: one connection per ~90 MB/s wanted) and Lambda publishes no network limit, so
    # 16 (up to ~1.4 GB/s) rather than 8 (~0.7 GB/s). Measured against a stand-in with S3's
    # per-connection rate and first-byte latency on a 2-vCPU VM (benchmarks/README.md,
    # "Choosing the defaults"): 0.88 / 1.09 / 1.12 of the 8-connection link at 64 MiB / 512 MiB
    # / 1 GiB, against 0.75 / 0.94 / 0.96 with 8; under heavy load from other processes 8 did
    # better at 512 MiB and up (the sha256 thread competes with 16 receiving threads).
    s3_concurrency: int = Field(default=DEFAULT_CONCURRENCY, ge=1, le=64)
    # The largest ranged GET (AWS recommends 8-16 MB ranges): the first GET is 1 MiB (it learns
    # the size), and an object too small for one part per connection is split evenly over them.
    s3_part_size: int = Field(default=DEFAULT_PART_SIZE, ge=4096)
    torch_threads: int = Field(default_factory=cpus, ge=1, le=256)
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
