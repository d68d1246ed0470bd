"""The library's shape, as a reviewer checks it: no import circles, every declared dependency
used, security-critical protocol code left to the library that owns it, transformers imported
only where a model is built."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from tests.helpers import ROOT

SRC = ROOT / "src" / "lazyserve"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """The lazyserve modules `path` imports when it is imported: module-level statements, not
    those under `if TYPE_CHECKING:` nor inside functions."""
    tree = ast.parse(path.read_text())
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("lazyserve"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                if base.startswith("lazyserve"):
                    found.add(base)
                    found.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))

    visit(tree.body)
    return found


def test_no_import_circles_in_the_library() -> None:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {
        name: {m for m in runtime_imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    circles: list[list[str]] = []
    state: dict[str, int] = {}

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    # A package's __init__ importing its own submodules is how a package is made, not a circle.
    circles = [c for c in circles if not all(m.startswith(c[0] + ".") for m in c[1:-1])]
    assert circles == []


def test_every_declared_dependency_is_imported_by_the_library() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {
        re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("-", "_")
        for spec in project["dependencies"]
    }
    code = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    imported = set(re.findall(r"^\s*(?:from|import) ([A-Za-z_][\w]*)", code, re.M))
    assert sorted(names - imported) == []


def test_extras_hold_what_only_they_need() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(spec.startswith("transformers") for spec in extras["transformers"])
    core = " ".join(project["dependencies"])
    for name in ("transformers", "moto", "scikit-learn", "matplotlib", "powertools", "settings"):
        assert name not in core, name
    # awscrt is optional: installed, it changes how botocore signs every request of the
    # process, and botocore imports it in every process (sources/checksums.py).
    assert extras["crt"] == ["botocore[crt]>=1.36"]
    assert "crt" not in core


def test_awscrt_is_imported_only_inside_functions() -> None:
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            assert not any(n.split(".")[0] == "awscrt" for n in names), path


def test_requests_are_signed_by_botocore_not_by_hand() -> None:
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import hmac|from hmac )", text, re.M), path


def test_transformers_is_imported_only_inside_functions() -> None:
    for path in SRC.rglob("*.py"):
        assert not {m for m in runtime_imports(path)} & {"transformers", "tokenizers"}, path
        tree = ast.parse(path.read_text())
        top = [
            n
            for n in tree.body
            if (
                isinstance(n, ast.Import | ast.ImportFrom)
                and (getattr(n, "module", None) or "").split(".")[0]
                in ("transformers", "tokenizers")
            )
            or (
                isinstance(n, ast.Import)
                and any(a.name.split(".")[0] in ("transformers", "tokenizers") for a in n.names)
            )
        ]
        assert top == [], path
