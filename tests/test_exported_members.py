"""The public names of `lazyserve` and its `__all__` agree (as in httpx's test of the same name)."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import Any

import lazyserve


def test_all_names_exist() -> None:
    missing = [name for name in lazyserve.__all__ if not hasattr(lazyserve, name)]
    assert missing == []


def test_all_has_no_duplicates() -> None:
    assert len(set(lazyserve.__all__)) == len(lazyserve.__all__)


def test_public_attributes_are_exported() -> None:
    # dir() rather than vars(): names may resolve lazily (PEP 562 __getattr__).
    public = {
        name
        for name in dir(lazyserve)
        if not name.startswith("_") and not isinstance(getattr(lazyserve, name), types.ModuleType)
    }
    assert sorted(public - set(lazyserve.__all__)) == []
    assert sorted(set(lazyserve.__all__) - public) == []


def test_star_import_binds_every_exported_name() -> None:
    namespace: dict[str, Any] = {}
    exec("from lazyserve import *", namespace)
    assert set(lazyserve.__all__) <= set(namespace)


def test_exported_objects_carry_their_own_names() -> None:
    for name in lazyserve.__all__:
        member = getattr(lazyserve, name)
        assert getattr(member, "__name__", name) == name, name


def test_settings_and_sources_import_without_torch() -> None:
    # The weights prefetch starts before `import torch`; importing the package, its settings
    # and its sources must therefore not pull torch in.
    code = (
        "import sys, lazyserve, lazyserve.settings, lazyserve.sources, lazyserve.errors\n"
        "print(sorted(m for m in ('torch', 'fastapi', 'boto3') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
