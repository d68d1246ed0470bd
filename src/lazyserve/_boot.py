"""Run by `lazyserve.pth` when the interpreter starts: inside a Lambda execution environment,
with LAZYSERVE_LOAD=background or eager (or under SnapStart), start the weights download before
the function module's first import, so it overlaps `import torch` whatever order the user's
imports are in. Costs nothing elsewhere: it reads three environment variables and returns.

The same pattern as coverage.py's `process_startup()` .pth hook: an environment variable turns it
on (https://coverage.readthedocs.io/en/latest/subprocess.html)."""

from __future__ import annotations

import os

_started = False
failure: str | None = None
"""Why the start-up prefetch could not start, for the app to log once logging is set up."""


def start() -> None:
    global _started, failure
    env = os.environ
    if _started or "AWS_LAMBDA_RUNTIME_API" not in env or "LAZYSERVE_MODEL_URI" not in env:
        return
    mode = env.get("LAZYSERVE_LOAD", "").strip().lower()
    if mode not in ("background", "eager") and (
        env.get("AWS_LAMBDA_INITIALIZATION_TYPE") != "snap-start"
    ):
        return
    _started = True
    try:
        from lazyserve.settings import load_settings
        from lazyserve.sources import prefetch

        prefetch(load_settings())
    except Exception as exc:
        # The app's own import validates the settings and reports them (an init error); a
        # failed prefetch is redone by the load. Nothing here may break an interpreter start.
        failure = f"{type(exc).__name__}: {exc}"


start()
