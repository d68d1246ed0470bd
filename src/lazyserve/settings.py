"""Settings from LAZYSERVE_* environment variables: one parser, standard library only, read by the
app at import and by the start-up download before anything heavy is imported. Every bad value is
reported at once, naming the variable, its value and what is accepted, before any AWS call."""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, Literal

from lazyserve.environment import cpus
from lazyserve.errors import LazyserveWarning, SettingsError
from lazyserve.uris import URI_FORMS, ModelURI, parse_model_uri

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_PART_SIZE",
    "PREFIX",
    "SHA256_HEX",
    "Dtype",
    "ModelURI",
    "Settings",
    "known_variables",
    "load_settings",
    "parse_model_uri",
    "read_settings",
    "unknown_notices",
    "unknown_variables",
    "warn_unknown",
]

PREFIX = "LAZYSERVE_"
# Parallel ranged GETs per load. One S3 connection carries about 85-90 MB/s (AWS's "Performance
# guidelines for Amazon S3": one connection per ~90 MB/s wanted) and Lambda publishes no network
# limit, so 16 rather than 8; benchmarks/README.md ("Choosing the defaults") has the measurements.
DEFAULT_CONCURRENCY = 16
# The largest ranged GET (AWS recommends 8-16 MB ranges).
DEFAULT_PART_SIZE = 8 * 1024 * 1024
# Seconds from a request's start by which its body must be complete, under a server that streams
# bodies (uvicorn): 6 MiB at 200 KB/s.
DEFAULT_BODY_TIMEOUT = 30.0
_MAX_QUOTED = 80  # characters of a bad value a message repeats
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")  # a sha256 digest, either case
_BYTES = re.compile(r"([0-9]+)([KMGkmg]?)")
_BINARY = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
_BYTES_FORM = (
    "optionally followed by K, M or G (binary multiples: 1K = 1024 bytes, 1M = 1024K, 1G = 1024M)"
)
MEMORY_BUDGET_FORM = (
    f"a whole number of bytes above 0, {_BYTES_FORM}, e.g. 1536M; leave it unset (or empty) for "
    "the default"
)
REFRESH_FORM = "a number of seconds above 0, e.g. 300; leave it unset (or empty) to never refresh"

Dtype = Literal["bfloat16", "float16", "float32"]


@dataclass(frozen=True)
class Settings:
    """The LAZYSERVE_* settings (the README's settings table); `load_settings()` reads them from
    the environment, and constructing one directly checks the same rules."""

    model_uri: str
    model_sha256: str | None = None
    load: Literal["lazy", "eager", "background"] = "lazy"
    load_wait: float = 25.0
    s3_concurrency: int = DEFAULT_CONCURRENCY
    s3_part_size: int = DEFAULT_PART_SIZE
    torch_threads: int = field(default_factory=cpus)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    metrics: Literal["auto", "on", "off"] = "auto"
    memory_budget: int | None = None
    refresh_seconds: float | None = None
    dtype: Dtype | None = None
    batch_max: int | None = None
    batch_wait_ms: float | None = None
    prefetch: Literal["auto", "off"] = "auto"
    body_timeout: float = DEFAULT_BODY_TIMEOUT

    def __post_init__(self) -> None:
        problems = [
            _message(PREFIX + f.name.upper(), getattr(self, f.name), reason)
            for f in fields(self)
            if (reason := _RULES[f.name].check(getattr(self, f.name))) is not None
        ]
        if not problems:
            problems = _across(self)
        if problems:
            raise SettingsError(" ".join(problems))

    @cached_property
    def uri(self) -> ModelURI:
        """`model_uri`, parsed."""
        return parse_model_uri(self.model_uri)


@dataclass(frozen=True)
class _Rule:
    """How one variable's text becomes a value, and what it accepts."""

    parse: Callable[[str], Any]  # raises ValueError with the reason
    check: Callable[[Any], str | None]  # the typed value's problem, or None


def _choice(*accepted: str, fold: Callable[[str], str] = str.lower) -> _Rule:
    names = [f"'{a}'" for a in accepted]
    words = f"accepted: {', '.join(names[:-1])} or {names[-1]}"

    def check(value: Any) -> str | None:
        return None if value in accepted else words

    def parse(text: str) -> str:
        value = fold(text.strip())
        if value not in accepted:
            raise ValueError(words)
        return value

    return _Rule(parse, check)


def _optional(rule: _Rule) -> _Rule:
    return _Rule(rule.parse, lambda v: None if v is None else rule.check(v))


def _whole(low: int, high: int, *, sizes: bool = False, unit: str = "") -> _Rule:
    suffix = f", {_BYTES_FORM}" if sizes else ""
    words = f"accepted: a whole number{unit} from {low} to {high}{suffix}"

    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return None if ok else words

    def parse(text: str) -> int:
        match = _BYTES.fullmatch(text.strip()) if sizes else None
        if match is not None:
            value = int(match[1]) * _BINARY[match[2].upper()]
        elif re.fullmatch(r"[+-]?[0-9]+", text.strip()):
            value = int(text)
        else:
            raise ValueError(words)
        if check(value) is not None:
            raise ValueError(words)
        return value

    return _Rule(parse, check)


def _number(words: str, low: float, high: float, *, include_low: bool = False) -> _Rule:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return words
        above = value >= low if include_low else value > low
        return None if math.isfinite(value) and above and value <= high else words

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(words) from None
        if check(value) is not None:
            raise ValueError(words)
        return value

    return _Rule(parse, check)


def _uri_parse(text: str) -> str:
    parse_model_uri(text)  # its ValueError says what is wrong
    return text


def _uri_check(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"accepted: {URI_FORMS}"
    try:
        parse_model_uri(value)
    except ValueError as exc:
        return str(exc)
    return None


def _sha_parse(text: str) -> str:
    if not SHA256_HEX.fullmatch(text.strip()):
        raise ValueError("accepted: 64 hexadecimal characters (a sha256 digest)")
    return text.strip().lower()


def _sha_check(value: Any) -> str | None:
    ok = value is None or (
        isinstance(value, str) and SHA256_HEX.fullmatch(value) and value == value.lower()
    )
    return None if ok else "accepted: 64 lower-case hexadecimal characters (a sha256 digest)"


_RULES: dict[str, _Rule] = {
    "model_uri": _Rule(_uri_parse, _uri_check),
    "model_sha256": _Rule(_sha_parse, _sha_check),
    "load": _choice("lazy", "eager", "background"),
    "load_wait": _number("accepted: a number of seconds above 0, at most 900", 0, 900),
    "s3_concurrency": _whole(1, 64),
    "s3_part_size": _whole(4096, 5 * 1024**3, sizes=True, unit=" of bytes"),
    "torch_threads": _whole(1, 256),
    "log_level": _choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", fold=str.upper),
    "metrics": _choice("auto", "on", "off"),
    "memory_budget": _optional(
        _Rule(
            lambda text: _budget(text),
            lambda v: (
                None
                if isinstance(v, int) and not isinstance(v, bool) and v > 0
                else f"accepted: {MEMORY_BUDGET_FORM}"
            ),
        )
    ),
    "refresh_seconds": _optional(_number(f"accepted: {REFRESH_FORM}", 0, math.inf)),
    "dtype": _optional(_choice("bfloat16", "float16", "float32")),
    "batch_max": _optional(_whole(1, 4096)),
    "batch_wait_ms": _optional(
        _number("accepted: a number of milliseconds from 0 to 1000", 0, 1000, include_low=True)
    ),
    "prefetch": _choice("auto", "off"),
    "body_timeout": _number("accepted: a number of seconds above 0, at most 3600", 0, 3600),
}


def _budget(text: str) -> int:
    match = _BYTES.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise ValueError(f"accepted: {MEMORY_BUDGET_FORM}")
    return int(match[1]) * _BINARY[match[2].upper()]


def _across(settings: Settings) -> list[str]:
    """Rules across settings, which name the variables themselves."""
    uri = settings.uri
    problems = []
    if settings.refresh_seconds is not None and (not uri.is_s3 or uri.version_id is not None):
        what = "pins one version" if uri.is_s3 else "is not in S3"
        problems.append(
            f"LAZYSERVE_REFRESH_SECONDS is set, but LAZYSERVE_MODEL_URI "
            f"{_quote(settings.model_uri)} {what}: only an s3:// URI without ?versionId= can "
            "change. Unset one of them."
        )
    if settings.model_sha256 is not None and uri.is_prefix:
        # A prefix names many files (a model directory, or many models): one digest cannot
        # check them. Each file's own sha256, stored by `lazyserve push`, is checked instead.
        problems.append(
            f"LAZYSERVE_MODEL_SHA256 is set, but LAZYSERVE_MODEL_URI {_quote(settings.model_uri)} "
            "ends in / (a model directory or many models): a digest names one file. Unset "
            "LAZYSERVE_MODEL_SHA256; lazyserve push stores each file's sha256, and every load "
            "checks them."
        )
    return problems


def _quote(value: Any) -> str:
    text = str(value)
    if len(text) > _MAX_QUOTED:
        text = text[:_MAX_QUOTED] + "..."
    return repr(text)


def _message(var: str, value: Any, reason: str) -> str:
    return f"{var} has value {_quote(value)}: {reason}."


def known_variables() -> list[str]:
    """Every LAZYSERVE_* variable lazyserve reads."""
    return [PREFIX + f.name.upper() for f in fields(Settings)]


def read_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Parse the LAZYSERVE_* variables of `environ` (default os.environ); raise SettingsError
    naming every bad one. Warns about nothing: the start-up download reads them this way."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in fields(Settings):
        var = PREFIX + f.name.upper()
        text = env.get(var)
        if text is None or text == "":  # empty means unset: SAM passes "" for blank parameters
            if f.name == "model_uri":
                problems.append(_missing(var, text, env))
            continue
        try:
            values[f.name] = _RULES[f.name].parse(text)
        except ValueError as exc:
            problems.append(_message(var, text, str(exc)))
    if problems:
        raise SettingsError(" ".join(problems))
    return Settings(**values)


def _missing(var: str, text: str | None, env: Mapping[str, str]) -> str:
    hint = f": give {URI_FORMS}"
    if text == "":
        return f"{var} has value '': empty means unset, and it is required{hint}."
    typos = [name for name, guess in unknown_variables(env) if guess == var]
    typo = f" ({', '.join(typos)} is set: a typo?)" if typos else ""
    return f"{var} is required but not set{hint}.{typo}"


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """(variable, the known one it most likely meant, or None) for each variable in `environ`
    that starts with LAZYSERVE_ in any case and is not a setting (the names are upper case)."""
    known = known_variables()
    tails = {name.removeprefix(PREFIX): name for name in known}
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(PREFIX) or name in known:
            continue
        tail = upper.removeprefix(PREFIX)
        # A setting's name cut short or extended (LAZYSERVE_REFRESH, LAZYSERVE_LOAD_MODE) first;
        # then the closest spelling, comparing what follows the prefix (the shared prefix alone
        # makes every pair "close"); then a name that holds it (LAZYSERVE_URI).
        close = [t for t in tails if len(tail) >= 3 and (t.startswith(tail) or tail.startswith(t))]
        close = close[:1] or difflib.get_close_matches(tail, tails, n=1, cutoff=0.6)
        if not close and len(tail) >= 3:
            close = [t for t in tails if tail in t or t in tail][:1]
        found.append((name, tails[close[0]] if close else None))
    return found


def unknown_notices(environ: Mapping[str, str]) -> list[str]:
    """What to tell the user about each LAZYSERVE_* variable that is not a setting."""
    notices = []
    for name, guess in unknown_variables(environ):
        if guess is not None:
            hint = f"did you mean {guess}?"
        else:
            hint = f"the settings are {', '.join(known_variables())}"
        notices.append(f"{name} is not a lazyserve setting and is ignored; {hint}")
    return notices


def warn_unknown(environ: Mapping[str, str]) -> None:
    """A LazyserveWarning per unknown LAZYSERVE_* variable, pointing at the first line outside
    lazyserve (the user's)."""
    for notice in unknown_notices(environ):
        warnings.warn(notice, LazyserveWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The stacklevel of the first frame outside lazyserve: the line a user can change (Python
    3.12's `skip_file_prefixes` does this; 3.11 has no such argument)."""
    package = os.path.dirname(__file__) + os.sep
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
        level += 1
    return level


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the settings (default: os.environ); raise SettingsError naming each bad
    variable, and warn (LazyserveWarning) about each LAZYSERVE_* variable that is not a setting."""
    env = os.environ if environ is None else environ
    warn_unknown(env)
    return read_settings(env)
