"""The start-up download, run by `lazyserve.pth` when an interpreter starts with
AWS_LAMBDA_RUNTIME_API set. Only in the runtime's own process (not an extension, a shell command or
`pip` in the same execution environment), and only when the settings ask for the model before
the first request (LAZYSERVE_LOAD=background or eager, or SnapStart) and name an `s3://` object
or model directory, it forks the download helper (`lazyserve.sources.helper`): the GETs then
overlap the function's imports (torch, transformers), whatever order the user's imports are in,
without competing for this interpreter's GIL. LAZYSERVE_PREFETCH=off turns it off (the load then
starts when the app module starts its Service).

A `.pth` line is the one hook Python runs before the handler module's first import (coverage.py
starts its subprocess measurement the same way: https://coverage.readthedocs.io/en/latest/subprocess.html).
Importing this module does nothing; `start()` does the work."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lazyserve.settings import Settings

__all__ = ["problem", "start", "wanted"]

_problem: str | None = None


def wanted(
    environ: Mapping[str, str] | None = None, *, argv: list[str] | None = None
) -> Settings | None:
    """The settings to download for now, or None (see the module docstring); `argv` stands for
    the command line (sys.orig_argv)."""
    from lazyserve.environment import initialization_type, is_runtime_process
    from lazyserve.errors import SettingsError
    from lazyserve.settings import read_settings

    env = os.environ if environ is None else environ
    if not is_runtime_process(argv, env):
        return None
    try:
        settings = read_settings(env)
    except SettingsError:
        return None  # the app reports it when it reads its settings
    # One object, or a prefix: the helper fetches it if it is a model directory (a config.json
    # directly under it), and leaves a prefix of many models alone after one listing.
    if settings.prefetch == "off" or not settings.uri.is_s3:
        return None
    early = settings.load != "lazy" or initialization_type(env) == "snap-start"
    return settings if early else None


def start() -> None:
    """Start the download helper if `wanted()`. Never raises: it runs at every interpreter
    start, and a start-up download that cannot start must not stop the function (its load
    then downloads in the function's own process)."""
    global _problem
    try:
        settings = wanted()
        if settings is not None:
            from lazyserve.sources.helper import start as start_helper

            start_helper(settings)
    except Exception as exc:
        _problem = f"{type(exc).__name__}: {exc}"


def problem() -> str | None:
    """What went wrong in `start()`, for the app to log once its logging is set up."""
    return _problem
