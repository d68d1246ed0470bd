"""README.md and the docs site (docs/, mkdocs.yml) held to the code: the README's size, links and
anchors that resolve, every setting, error, status and command documented as the code has it,
the code shown being the examples' own, and the commands shown running as written. (`make lint`
builds the site with `mkdocs build --strict`, which checks the site's own links and navigation.)"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import typing
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

import lazyserve
from lazyserve import errors
from lazyserve.cli import main as cli_main
from lazyserve.error_handlers import RETRY_AFTER_FAILED, RETRY_AFTER_LOADING, too_large_response
from lazyserve.middleware import MAX_BODY_BYTES
from lazyserve.scaffold import init_project
from lazyserve.schemas import ModelNotFoundDetail, ModelUnavailableDetail, PredictFailedDetail
from lazyserve.settings import Settings, known_variables
from tests.helpers import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
LAZYSERVE = Path(sys.executable).parent / "lazyserve"
README_LIMIT = 15_000


def pages() -> list[Path]:
    """README.md, the examples' READMEs and every page of the site."""
    return [README, *sorted(ROOT.glob("examples/*/README.md")), *sorted(DOCS.rglob("*.md"))]


def unfenced(text: str) -> str:
    """`text` without its fenced code blocks."""
    return re.sub(r"^```.*?^```$", "", text, flags=re.MULTILINE | re.DOTALL)


def prose(text: str) -> str:
    """`text` without fenced code blocks and code spans, where a link is only text."""
    return re.sub(r"`[^`\n]*`", "", unfenced(text))


def links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", prose(text))


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and mkdocs' toc make it: lower case, punctuation dropped,
    spaces as hyphens."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", unfenced(page.read_text()), re.MULTILINE)
    return {slug(h) for h in headings}


def section(page: Path, title: str) -> str:
    """The text under the `## title` heading of `page`, up to the next `## ` heading."""
    return page.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def table_rows(text: str) -> list[list[str]]:
    """The cells of every row of the first Markdown table in `text`, after its header."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


# --- the README --------------------------------------------------------------------------------


def test_the_readme_is_an_entry_point_of_at_most_15000_bytes() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to docs/"


# --- links ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in links(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        # normpath, not resolve(): a page linked through a symlink stays where the site has it.
        where = Path(os.path.normpath(page.parent / path_part)) if path_part else page
        if not where.exists():
            broken.append(f"{target}: no such file")
            continue
        if page.is_relative_to(DOCS) and not where.is_relative_to(DOCS):
            # The site holds docs/ only: mkdocs cannot serve a link out of it (GitHub could).
            broken.append(f"{target}: outside docs/")
        if fragment and where.suffix == ".md" and fragment not in anchors(where):
            broken.append(f"{target}: no heading #{fragment}")
    assert broken == []


def test_the_site_shows_the_benchmark_pages_themselves() -> None:
    # The benchmark pages are the files `make bench` writes, not copies that would go stale.
    for name in ("README.md", "RESULTS.md", "cold_start.png"):
        shown = DOCS / "benchmarks" / name
        assert shown.resolve() == (ROOT / "benchmarks" / name).resolve(), name


# --- settings ------------------------------------------------------------------------------------


def documented_settings(text: str) -> dict[str, str]:
    """variable -> its default cell, from the settings table in `text`."""
    return {
        row[0].strip("`"): row[1]
        for row in table_rows(text)
        if row and row[0].startswith("`LAZYSERVE_")
    }


def shown(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda: section(README, "Settings"), id="README"),
        pytest.param(lambda: (DOCS / "settings.md").read_text(), id="docs/settings.md"),
    ],
)
def test_every_setting_is_documented_with_its_default(where: Any) -> None:
    table = documented_settings(where())
    assert list(table) == known_variables(), "every setting, in settings.py's order"
    for field in dataclasses.fields(Settings):
        cell = table["LAZYSERVE_" + field.name.upper()]
        if field.default is None or field.default is dataclasses.MISSING:
            assert not cell.startswith("`"), (field.name, cell)  # no made-up value
        else:
            assert cell.startswith(shown(field.default)), (field.name, cell)


# --- errors and status codes ---------------------------------------------------------------------


def error_codes() -> set[str]:
    """Every `detail.error` an HTTP answer can carry."""
    found: set[str] = set()
    for detail in (ModelUnavailableDetail, PredictFailedDetail, ModelNotFoundDetail):
        found |= set(typing.get_args(detail.model_fields["error"].annotation))
    return found


def test_every_error_code_is_in_the_status_tables() -> None:
    codes = error_codes()
    assert codes == {"model_unavailable", "model_unloadable", "model_not_found", "predict_failed"}
    for text in (section(README, "Errors"), (DOCS / "errors.md").read_text()):
        assert {code for code in codes if re.search(rf"[`\"]{code}[`\"]", text)} == codes


def test_the_status_page_says_what_the_answers_are() -> None:
    text = (DOCS / "errors.md").read_text()
    assert f"503, `Retry-After: {RETRY_AFTER_LOADING}`" in text
    assert f"503, `Retry-After: {RETRY_AFTER_FAILED}`" in text
    body = json.loads(bytes(too_large_response(MAX_BODY_BYTES).body))
    assert f"`{json.dumps(body)}`" in text


def test_every_public_error_class_is_on_the_errors_page() -> None:
    text = (DOCS / "errors.md").read_text()
    public = [
        name
        for name in lazyserve.__all__
        if isinstance(getattr(lazyserve, name), type)
        and issubclass(getattr(lazyserve, name), errors.LazyserveError | Warning)
    ]
    assert len(public) >= 15
    assert [name for name in public if name not in text] == []


# --- the code's map ------------------------------------------------------------------------------


def test_every_module_is_on_the_map_of_the_code() -> None:
    text = section(DOCS / "how-a-load-works.md", "Where the code is")
    package = ROOT / "src" / "lazyserve"
    modules = [p.name for p in [*package.glob("*.py"), *package.glob("sources/*.py")]]
    assert [m for m in modules if m != "__init__.py" and f"`{m}`" not in text] == []


# --- the command line ----------------------------------------------------------------------------


def command_help(*argv: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        cli_main([*argv, "--help"])
    return out.getvalue()


def test_every_command_and_option_is_on_the_command_line_page() -> None:
    # `lazyserve --help` lists the commands under COMMAND, one an indented line each.
    commands = re.findall(r"^    ([a-z]+) ", command_help(), re.MULTILINE)
    assert len(commands) >= 6, command_help()
    text = (DOCS / "cli.md").read_text()
    rows = {row[0]: row[1] for row in table_rows(text)}
    for command in commands:
        usage = [cell for cell in rows if cell.startswith(f"`lazyserve {command} ")]
        assert usage, f"lazyserve {command} has no row"
        options = set(re.findall(r"(--[a-z][a-z-]+)", command_help(command))) - {"--help"}
        assert {o for o in options if not any(o in cell for cell in usage)} == set(), command


# --- the code shown is the examples' ------------------------------------------------------------

OWN = ROOT / "examples" / "own_model"
HF = ROOT / "examples" / "huggingface"


def lines_of(code: str) -> list[str]:
    return [line for line in code.splitlines() if line.strip()]


def is_excerpt(block: str, source: Path) -> bool:
    """Every line of `block` is a line of `source`, in the same order."""
    remaining = iter(lines_of(source.read_text()))
    return all(any(line == other for other in remaining) for line in lines_of(block))


def test_the_own_model_page_shows_the_example_code() -> None:
    blocks = fenced((DOCS / "own-model.md").read_text(), "python")
    for name in ("net.py", "app.py"):
        assert (OWN / name).read_text() in blocks, f"docs/own-model.md differs from {name}"


def test_the_huggingface_page_shows_the_example_code() -> None:
    assert (HF / "app.py").read_text() in fenced((DOCS / "huggingface.md").read_text(), "python")


def test_the_excerpts_are_the_examples_own_lines() -> None:
    (readme_hf,) = fenced(section(README, "Hugging Face models"), "python")
    assert is_excerpt(readme_hf, HF / "app.py")
    (overview,) = fenced((DOCS / "index.md").read_text(), "python")
    assert is_excerpt(overview, OWN / "app.py")


def test_the_pages_run_the_examples_with_their_readmes_commands() -> None:
    # Each command a page shows for an example is one its README shows (and test_examples runs).
    for page, example in (("own-model.md", OWN), ("huggingface.md", HF)):
        readme_lines = set(lines_of((example / "README.md").read_text()))
        text = (DOCS / page).read_text()
        commands = [line for block in fenced(text, "bash") for line in lines_of(block)]
        commands += [line for block in fenced(text, "text") for line in lines_of(block)]
        shown_commands = [c for c in commands if "examples." in c or c.startswith("curl")]
        assert shown_commands, page
        assert [c for c in shown_commands if c not in readme_lines] == [], page


# --- the commands shown run ----------------------------------------------------------------------


def test_the_deploy_path_is_the_one_lazyserve_init_writes(tmp_path: Path) -> None:
    """README's and docs/deploy.md's commands from `lazyserve init` to `sam deploy`: the same
    in both, and each one a command of the README `lazyserve init` writes (tests/test_init.py
    runs those as written, all but sam)."""
    (readme_block,) = fenced(section(README, "Deploy"), "bash")
    (docs_block,) = fenced(section(DOCS / "deploy.md", "Your own function"), "bash")
    assert readme_block == docs_block
    first, *commands = lines_of(readme_block)
    init, cd = first.split(" && ")
    directory = init.removeprefix("lazyserve init ")
    assert cd == f"cd {directory}"
    project = init_project(tmp_path / directory)
    written = set(lines_of((project.directory / "README.md").read_text()))
    assert [c for c in commands if c not in written] == []
    assert commands[-1] == "sam build && sam deploy --guided"


def test_the_getting_started_invoke_runs_as_written() -> None:
    (command,) = [
        line
        for block in fenced((DOCS / "getting-started.md").read_text(), "bash")
        for line in lines_of(block)
        if " invoke " in line
    ]
    setting, program, *args = command.split()
    name, _, uri = setting.partition("=")
    assert (name, program) == ("LAZYSERVE_MODEL_URI", ".venv/bin/lazyserve")
    done = subprocess.run(
        [str(LAZYSERVE), *args],
        cwd=ROOT,
        env={**os.environ, name: uri},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    answers = [json.loads(line) for line in out if not line.startswith("REPORT")]
    assert len(answers) == len([line for line in out if line.startswith("REPORT")]) == 6
    predictions, warmups = answers[0::2], answers[1::2]
    for answer in predictions:
        assert answer["statusCode"] == 200
        assert json.loads(answer["body"])["predictions"][0]["label"] == 8
    assert all(answer["warm"] is True for answer in warmups)


def test_the_batching_page_code_answers_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched predict function docs/batching.md shows, run on the own-model example's
    model and types: one response per request, in order."""
    from lazyserve import Service

    if not hasattr(Service, "predict_batch"):
        pytest.skip("Service.predict_batch is not in this tree")
    from examples.own_model.make_weights import make_weights
    from examples.own_model.net import MyNet

    weights = make_weights(tmp_path / "mynet.safetensors")
    # The example's request and response types; importing its app builds its own Service.
    monkeypatch.setenv("LAZYSERVE_MODEL_URI", str(weights))
    monkeypatch.delitem(sys.modules, "examples.own_model.app", raising=False)
    from examples.own_model.app import PredictRequest, PredictResponse

    monkeypatch.delitem(sys.modules, "examples.own_model.app")
    service = Service(MyNet, settings=Settings(model_uri=str(weights)))
    (code,) = fenced((DOCS / "batching.md").read_text(), "python")
    namespace: dict[str, Any] = {
        "service": service,
        "torch": __import__("torch"),
        "Loaded": lazyserve.Loaded,
        "MyNet": MyNet,
        "PredictRequest": PredictRequest,
        "PredictResponse": PredictResponse,
    }
    exec(compile(code, "docs/batching.md", "exec"), namespace)
    requests = [PredictRequest(inputs=[[5, 4, 1, 0]]), PredictRequest(inputs=[[0, 1, 2, 3]] * 2)]
    answers = namespace["predict"](service.model.get(), requests)
    assert [a.labels for a in answers] == [[0], [1, 1]]


def test_every_test_the_reliability_page_names_exists() -> None:
    # The page is evidence only while the tests it cites run: a renamed test must take its
    # row along. Each `file.py::name` (or a `::name` after a file in the same cell) is looked up.
    defined: dict[str, set[str]] = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        names = re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.MULTILINE)
        defined[path.name] = set(names)
    cited = 0
    for line in (DOCS / "reliability.md").read_text().splitlines():
        for cell in line.split(" | "):
            current = None
            for file, name in re.findall(r"`(?:(test_\w+\.py))?(?:::(test_\w+))?", cell):
                current = file or current
                if name:
                    assert current is not None, (name, cell[:200])
                    assert name in defined.get(current, set()), f"{current}::{name}"
                    cited += 1
    assert cited > 50
