"""The package as `make dist` builds it: an sdist of the library's sources, a wheel built from
that sdist holding the library, its templates and its start-up hook (no tests, no reference
function, no benchmarks), both accepted by `twine check --strict`."""

from __future__ import annotations

import email
import subprocess
import tarfile
import zipfile
from pathlib import Path

from lazyserve import __version__
from lazyserve.scaffold import TEMPLATES
from tests.helpers import PYTHON, ROOT, Dist

SRC = ROOT / "src"


def library_files() -> set[str]:
    """Every file of src/lazyserve that belongs in the package (Python, templates, py.typed)."""
    return {
        p.relative_to(SRC).as_posix()
        for p in (SRC / "lazyserve").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_twine_accepts_both(dist: Dist) -> None:
    done = subprocess.run(
        [str(PYTHON.parent / "twine"), "check", "--strict", str(dist.sdist), str(dist.wheel)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_the_wheel_is_built_from_the_sdist(dist: Dist) -> None:
    assert "Building wheel from sdist" in dist.log, dist.log


def test_the_wheel_holds_the_library_its_templates_and_its_start_up_hook(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = set(wheel.namelist())
        hook = wheel.read("lazyserve.pth").decode()
        meta = email.message_from_bytes(wheel.read(f"lazyserve-{__version__}.dist-info/METADATA"))
        entry_points = wheel.read(f"lazyserve-{__version__}.dist-info/entry_points.txt").decode()
    info = {n for n in names if n.startswith(f"lazyserve-{__version__}.dist-info/")}
    assert names - info == library_files() | {"lazyserve.pth"}
    for template in TEMPLATES:
        assert any(n.startswith(f"lazyserve/templates/{template}/") for n in names), template
    assert hook == (SRC / "lazyserve.pth").read_text()
    assert "lazyserve = lazyserve.cli:main" in entry_points
    assert set(meta.get_all("Provides-Extra") or []) == {"transformers", "crt", "dev", "bench"}
    requires = meta.get_all("Requires-Dist") or []
    assert "transformers>=5.0; extra == 'transformers'" in requires
    assert "tokenizers>=0.21; extra == 'transformers'" in requires
    # Nothing of the repository's own: its tests, the reference function, the benchmarks.
    for top in ("tests/", "handler/", "benchmarks/", "examples/", "events/"):
        assert not [n for n in names if n.startswith(top)], top


def test_the_sdist_holds_the_library_sources_only(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as sdist:
        names = {
            Path(n).relative_to(f"lazyserve-{__version__}").as_posix() for n in sdist.getnames()
        }
    sources = {f"src/{name}" for name in library_files()} | {"src/lazyserve.pth"}
    assert names == sources | {"README.md", "pyproject.toml", "PKG-INFO", ".gitignore"}
