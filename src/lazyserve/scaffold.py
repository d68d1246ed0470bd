"""`lazyserve init`: write a function project the user owns (model, app, weights script, tests,
sample events, AWS SAM template, Dockerfile) from a template set shipped in the package.

A template set is a folder of `lazyserve/templates/`, one file per generated file, each named
as its output plus `.tmpl` (so no tool reads a template as code). In paths, `__package__` stands
for the project's Python package and a leading `dot-` for `.` (a hidden file is easily lost in
packaging). In contents, `{{ NAME }}` is a value of `context()`; nothing else is special."""

from __future__ import annotations

import keyword
import re
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata, resources
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

from lazyserve.errors import InitError

__all__ = [
    "DEFAULT_TEMPLATE",
    "NAME_RULE",
    "TEMPLATES",
    "Project",
    "ProjectNames",
    "TemplateSet",
    "context",
    "init_project",
    "project_names",
    "render",
]


@dataclass(frozen=True)
class TemplateSet:
    """What a template set serves, and the module of its project that writes the model (run
    as `python -m PACKAGE.SCRIPT`: it stands in for the user's training)."""

    description: str
    script: str


TEMPLATES = {
    "basic": TemplateSet("your own nn.Module, its weights in S3", "weights"),
    "huggingface": TemplateSet(
        "a transformers text classifier, its save_pretrained directory in S3", "train"
    ),
}
"""The template sets, by name (a folder of lazyserve/templates/ each)."""
DEFAULT_TEMPLATE = "basic"

_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
_MAX_NAME = 64
NAME_RULE = (
    f"lowercase letters and digits, with single '-' or '_' between them, starting with a "
    f"letter, at most {_MAX_NAME} characters (e.g. my-model)"
)
# A package of one of these names would shadow what the generated project imports, or clash
# with one of its own folders.
_TAKEN = frozenset(
    {
        "awslambdaric",
        "boto3",
        "botocore",
        "conftest",
        "events",
        "fastapi",
        "httpx",
        "huggingface_hub",
        "lazyserve",
        "mangum",
        "moto",
        "numpy",
        "pydantic",
        "pytest",
        "safetensors",
        "starlette",
        "tests",
        "tokenizers",
        "torch",
        "transformers",
        "uvicorn",
        "weights",
    }
)


_PLACEHOLDER = r"""
\{\{(?:
    \s*(?P<named>[a-z_][a-z0-9_]*)\s*\}\}
  | (?P<escaped>(?!))
  | (?P<braced>(?!))
  | (?P<invalid>)
)
"""


class _Template(string.Template):
    """`{{ name }}` placeholders. string.Template's own `$` cannot serve: the generated files
    use it themselves (CloudFormation's `${Param}`, the Dockerfile's `${LAMBDA_TASK_ROOT}`).
    Any other `{{` is an error, so a mistyped placeholder cannot reach a generated file."""

    # A str, which Template.__init_subclass__ compiles (typeshed knows only the compiled form).
    pattern = _PLACEHOLDER  # type: ignore[assignment]


@dataclass(frozen=True)
class ProjectNames:
    """One project name in each of the forms the generated files need."""

    name: str  # as given: the project's name, e.g. my-model
    package: str  # the Python package: my_model
    stack: str  # the CloudFormation stack and the image's tag: my-model


def project_names(name: str) -> ProjectNames:
    """The names of project `name`; InitError(field="name") if it is not accepted."""
    if not _NAME.fullmatch(name) or len(name) > _MAX_NAME:
        raise InitError(f"project name {name!r} is not accepted: use {NAME_RULE}", field="name")
    package = name.replace("-", "_")
    if keyword.iskeyword(package) or package in sys.stdlib_module_names or package in _TAKEN:
        raise InitError(
            f"project name {name!r} is not accepted: its package {package!r} would shadow the "
            f"module of that name (a Python keyword, standard library module, dependency or "
            f"project folder); choose another, e.g. {package}-model",
            field="name",
        )
    return ProjectNames(name=name, package=package, stack=name.replace("_", "-"))


def _release(distribution: str) -> str | None:
    """The installed version of `distribution` without a local label (2.13.0+cpu: 2.13.0)."""
    try:
        return metadata.version(distribution).split("+", 1)[0]
    except metadata.PackageNotFoundError:
        return None


def context(names: ProjectNames) -> dict[str, str]:
    """The values a template may use. The generated project pins the lazyserve and torch
    releases it was made with, so its image is built with what its tests ran on."""
    lazyserve = _release("lazyserve")
    pin = f"=={lazyserve}" if lazyserve else ""
    torch = _release("torch")
    return {
        "name": names.name,
        "package": names.package,
        "stack": names.stack,
        "lazyserve_requirement": f"lazyserve{pin}",
        "lazyserve_transformers_requirement": f"lazyserve[transformers]{pin}",
        "torch_requirement": f"torch=={torch}" if torch else "torch",
    }


def _template_root(template: str) -> Traversable:
    if template not in TEMPLATES:
        raise ValueError(f"no template set {template!r}; accepted: {', '.join(TEMPLATES)}")
    return resources.files("lazyserve").joinpath("templates", template)


def _walk(folder: Traversable, parts: tuple[str, ...] = ()) -> Iterator[tuple[str, Traversable]]:
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            yield from _walk(entry, (*parts, entry.name))
        elif entry.name.endswith(".tmpl"):
            yield "/".join((*parts, entry.name)), entry


def _output_path(template_path: str, package: str) -> PurePosixPath:
    parts = []
    for part in PurePosixPath(template_path.removesuffix(".tmpl")).parts:
        part = package if part == "__package__" else part
        parts.append("." + part.removeprefix("dot-") if part.startswith("dot-") else part)
    return PurePosixPath(*parts)


def render(template: str, values: dict[str, str]) -> dict[PurePosixPath, str]:
    """Every file of template set `template`, rendered with `values`: output path -> text."""
    files = {}
    for template_path, entry in _walk(_template_root(template)):
        text = entry.read_text(encoding="utf-8")
        try:
            files[_output_path(template_path, values["package"])] = _Template(text).substitute(
                values
            )
        except (KeyError, ValueError) as exc:  # a broken template set: a bug, not user input
            raise RuntimeError(f"template {template}/{template_path}: {exc!r}") from exc
    return files


@dataclass(frozen=True)
class Project:
    """A project `init_project` wrote: where, its names, its template set and its files
    (relative paths)."""

    directory: Path
    names: ProjectNames
    template: str
    files: tuple[PurePosixPath, ...]

    def summary(self) -> str:
        """What was written and the first commands to run, as `lazyserve init` prints it."""
        return "\n".join(
            [
                f"wrote {len(self.files)} files to {self.directory}/ "
                f"(package {self.names.package}); next:",
                f"  cd {self.directory}",
                # PyPI's torch brings GBs of CUDA libraries on Linux: the CPU build first.
                "  pip install --index-url https://download.pytorch.org/whl/cpu "
                "-c constraints.txt torch",
                "  pip install -r requirements-dev.txt",
                f"  python -m {self.names.package}.{TEMPLATES[self.template].script}",
                "  pytest",
                "README.md has the rest: the local runs, lazyserve invoke, "
                "sam build && sam deploy --guided",
            ]
        )


def _check_directory(directory: Path, force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise InitError(f"{directory} is a file; give a directory", field="directory")
    if directory.is_dir() and not force:
        entries = sorted(p.name for p in directory.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (
                f" and {len(entries) - 3} more" if entries[3:] else ""
            )
            raise InitError(
                f"{directory} is not empty ({shown}); give a new directory, or add --force to "
                "write the project into it (replacing files of the same names)",
                field="directory",
            )


def init_project(
    directory: Path,
    *,
    name: str | None = None,
    template: str = DEFAULT_TEMPLATE,
    force: bool = False,
) -> Project:
    """Write the project of template set `template` into `directory` (created if missing; a
    non-empty one only with `force`). `name` defaults to the directory's name."""
    if name is None:
        name = directory.resolve().name
        try:
            names = project_names(name)
        except InitError as exc:
            raise InitError(
                f"{exc} (the name is the directory's; give --name NAME to choose another)",
                field="directory",
            ) from exc
    else:
        names = project_names(name)
    _check_directory(directory, force)
    files = render(template, context(names))  # all of them, before the first is written
    for relative, text in files.items():
        path = directory.joinpath(*relative.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return Project(directory, names, template, tuple(files))
