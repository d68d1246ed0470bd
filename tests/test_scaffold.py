"""`lazyserve init`: the project it writes (its names, its files, nothing that points back into
this repository), its template and Dockerfile held to the reference's safe defaults, and its
one-line errors. tests/test_init.py installs the built package in a fresh venv and runs the
project's own tests there."""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import json
import re
import subprocess
import tomllib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from lazyserve.cli import main
from lazyserve.scaffold import TEMPLATES, Project, init_project
from lazyserve.settings import load_settings
from lazyserve.uris import parse_model_uri
from tests.helpers import (
    DIRECTORY_SAFE_DEFAULTS,
    FUNCTION,
    PYTHON,
    ROOT,
    SAFE_DEFAULTS,
    Stack,
    cfn_lint,
    check_task_root_readable,
    copies,
    instructions,
    load_template,
)

COMMON = {
    ".dockerignore",
    ".gitignore",
    "Dockerfile",
    "README.md",
    "constraints.txt",
    "events/direct-predict.json",
    "events/http-api-predict.json",
    "events/sqs-predict.json",
    "events/warmup.json",
    "my_model/__init__.py",
    "my_model/app.py",
    "pytest.ini",
    "requirements-dev.txt",
    "requirements.txt",
    "samconfig.toml",
    "template.yaml",
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/runtime_api.py",
    "tests/test_app.py",
    "tests/test_lambda.py",
}
FILES = {
    "basic": COMMON | {"my_model/model.py", "my_model/weights.py"},
    "huggingface": COMMON | {"my_model/train.py"},
}
# Files the two sets share word for word (the same tools, the same stand-ins).
SHARED = [
    "constraints.txt",
    "events/warmup.json",
    "pytest.ini",
    "samconfig.toml",
    "tests/__init__.py",
    "tests/runtime_api.py",
]


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Project]:
    root = tmp_path_factory.mktemp("projects")
    return {
        template: init_project(root / template / "my-model", template=template)
        for template in TEMPLATES
    }


@pytest.fixture(params=sorted(TEMPLATES))
def each(request: pytest.FixtureRequest, projects: dict[str, Project]) -> Project:
    """The project of each template set, in turn."""
    return projects[request.param]


@pytest.fixture
def project(projects: dict[str, Project]) -> Project:
    return projects["basic"]


@pytest.fixture
def hf_project(projects: dict[str, Project]) -> Project:
    return projects["huggingface"]


def text(project: Project, name: str) -> str:
    return (project.directory / name).read_text()


def test_the_project_has_its_files_and_names(each: Project) -> None:
    written = {
        p.relative_to(each.directory).as_posix() for p in each.directory.rglob("*") if p.is_file()
    }
    assert written == FILES[each.template]
    assert {f.as_posix() for f in each.files} == FILES[each.template]
    # my-model: a Python package my_model, a stack (and image tag) my-model.
    assert (each.names.name, each.names.package, each.names.stack) == (
        "my-model",
        "my_model",
        "my-model",
    )
    assert tomllib.loads(text(each, "samconfig.toml"))["default"]["global"]["parameters"] == {
        "stack_name": "my-model"
    }
    metadata_ = load_template(each.directory / "template.yaml")["Resources"][FUNCTION]
    assert metadata_["Metadata"]["DockerTag"] == "my-model"


def test_the_sets_share_their_common_files_word_for_word(projects: dict[str, Project]) -> None:
    for name in SHARED:
        assert text(projects["basic"], name) == text(projects["huggingface"], name), name


def test_nothing_points_back_into_this_repository(each: Project) -> None:
    foreign = [
        str(ROOT),
        "{{",
        "handler.app",
        "handler/",
        "DigitsMLP",
        "digits.safetensors",
        "examples",
        "lazyserve demo",
        "own_model",
        "make_model",
        "tiny_bert",
        "lazyserve-models",
    ]
    for name in FILES[each.template]:
        content = text(each, name)
        found = [word for word in foreign if word in content]
        assert not found, (name, found)


def test_the_python_is_lint_clean(each: Project) -> None:
    ruff = str(PYTHON.parent / "ruff")
    rules = ["--isolated", "--line-length", "100", "--target-version", "py311"]
    done = subprocess.run(
        [ruff, "check", *rules, "--select", "E,F,I,UP,B,RUF", "."],
        cwd=each.directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run(
        [ruff, "format", *rules, "--check", "."],
        cwd=each.directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def imported(source: str) -> set[str]:
    """The top-level modules a module imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found


def test_the_app_imports_only_lazyserves_public_names(each: Project) -> None:
    module = ast.parse(text(each, "my_model/app.py"))
    lazyserve = [
        node
        for node in module.body
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lazyserve")
    ]
    assert [(n.module, [a.name for a in n.names]) for n in lazyserve] == [
        ("lazyserve", ["Loaded", "Service"])
    ]


def test_the_weights_script_builds_the_model_without_the_app(project: Project) -> None:
    # The app reads its settings when imported.
    weights = ast.parse(text(project, "my_model/weights.py"))
    modules = {n.module for n in ast.walk(weights) if isinstance(n, ast.ImportFrom)}
    assert "my_model.model" in modules and "my_model.app" not in modules


def test_the_classifier_app_uses_transformers_and_nothing_else(hf_project: Project) -> None:
    app = text(hf_project, "my_model/app.py")
    assert imported(app) <= {"__future__", "typing", "lazyserve", "pydantic", "transformers"}
    assert "service = Service.from_pretrained(AutoModelForSequenceClassification)" in app
    assert "@service.predict\n" in app
    # The training script stands alone: neither lazyserve nor the app (which reads settings).
    train = imported(text(hf_project, "my_model/train.py"))
    assert train == {
        "__future__",
        "argparse",
        "pathlib",
        "string",
        "tokenizers",
        "torch",
        "transformers",
    }


def test_the_requirements_pin_this_lazyserve_and_its_torch(each: Project) -> None:
    requirements = text(each, "requirements.txt").splitlines()
    assert "-c constraints.txt" in requirements
    extra = "[transformers]" if each.template == "huggingface" else ""
    assert f"lazyserve{extra}=={metadata.version('lazyserve')}" in requirements
    assert len([line for line in requirements if line and not line.startswith("#")]) == 2
    torch = metadata.version("torch").split("+")[0]
    assert f"torch=={torch}" in text(each, "constraints.txt").splitlines()
    dev = text(each, "requirements-dev.txt").splitlines()
    assert "-r requirements.txt" in dev
    for tool in ("pytest", "httpx2", "moto[server]", "awslambdaric"):
        assert any(line.startswith(f"{tool}>=") for line in dev), tool


def check_events(project: Project, direct: dict[str, Any], bad: dict[str, Any]) -> None:
    assert json.loads(text(project, "events/direct-predict.json")) == direct
    http = json.loads(text(project, "events/http-api-predict.json"))
    assert (http["version"], http["rawPath"], http["requestContext"]["http"]["method"]) == (
        "2.0",
        "/predict",
        "POST",
    )
    assert json.loads(http["body"]) == direct
    (first, second) = json.loads(text(project, "events/sqs-predict.json"))["Records"]
    assert (json.loads(first["body"]), json.loads(second["body"])) == (direct, bad)
    for record in (first, second):
        assert record["md5OfBody"] == hashlib.md5(record["body"].encode()).hexdigest()
    assert json.loads(text(project, "events/warmup.json")) == {"warmup": True}


def test_the_events_carry_one_request(project: Project, hf_project: Project) -> None:
    check_events(project, {"inputs": [[5, 4, 1, 0], [0, 1, 2, 3]]}, {"inputs": [[1, 2, 3]]})
    check_events(hf_project, {"texts": ["what a lovely day", "this is terrible"]}, {"texts": []})


# -- the deployment: the reference's safe defaults ------------------------------------------


def test_cfn_lint_is_clean(each: Project) -> None:
    done = cfn_lint(each.directory / "template.yaml")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.parametrize("check", SAFE_DEFAULTS, ids=lambda check: check.__name__)
def test_the_template_keeps_the_safe_defaults(
    project: Project, check: Callable[[dict[str, Any]], None]
) -> None:
    check(load_template(project.directory / "template.yaml"))


@pytest.mark.parametrize("check", DIRECTORY_SAFE_DEFAULTS, ids=lambda check: check.__name__)
def test_the_directory_template_keeps_the_safe_defaults(
    hf_project: Project, check: Callable[[dict[str, Any]], None]
) -> None:
    check(load_template(hf_project.directory / "template.yaml"))


def without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: without_descriptions(value)
            for key, value in node.items()
            if key not in ("Description", "AlarmDescription", "DockerTag")
        }
    if isinstance(node, list):
        return [without_descriptions(item) for item in node]
    return node


def test_the_template_is_the_reference_one_but_for_its_words(project: Project) -> None:
    # The same parameters, rules, conditions, resources and outputs: whatever the reference
    # template's tests establish holds for the user's.
    generated = without_descriptions(load_template(project.directory / "template.yaml"))
    assert generated == without_descriptions(load_template(ROOT / "template.yaml"))


def for_directories(node: Any) -> Any:
    """The reference template with ModelKey always a prefix: every `Fn::If` on KeyIsPrefix
    taken."""
    if isinstance(node, dict):
        if list(node) == ["Fn::If"] and node["Fn::If"][0] == "KeyIsPrefix":
            return for_directories(node["Fn::If"][1])
        return {key: for_directories(value) for key, value in node.items()}
    if isinstance(node, list):
        return [for_directories(item) for item in node]
    return node


def test_the_directory_template_is_the_reference_one_for_a_prefix(hf_project: Project) -> None:
    # What differs, and why: a directory is listed and read below ModelKey, which therefore
    # ends in "/"; it has no single object to pin to a version id or check against one sha256
    # (each file's sha256 is stored by `lazyserve push` and checked by every load), and needs
    # no GetObjectVersion. Everything else is the reference's, and so are its tests' findings.
    reference = for_directories(without_descriptions(load_template(ROOT / "template.yaml")))
    parameters, conditions = reference["Parameters"], reference["Conditions"]
    del parameters["ModelVersionId"], parameters["ModelSha256"]
    del conditions["HasVersion"], conditions["KeyIsPrefix"]
    function = reference["Resources"][FUNCTION]["Properties"]
    variables = function["Environment"]["Variables"]
    variables["LAZYSERVE_MODEL_URI"] = {"Fn::Sub": "s3://${ModelBucket}/${ModelKey}"}
    del variables["LAZYSERVE_MODEL_SHA256"]
    (policy,) = reference["Resources"]["FunctionRole"]["Properties"]["Policies"]
    statements = policy["PolicyDocument"]["Statement"]
    (read,) = [s for s in statements if s.get("Sid") == "ReadModelWeights"]
    read["Action"].remove("s3:GetObjectVersion")
    generated = without_descriptions(load_template(hf_project.directory / "template.yaml"))
    key, reference_key = generated["Parameters"]["ModelKey"], parameters["ModelKey"]
    assert (key.pop("AllowedPattern"), key.pop("MinLength")) == (
        r"^(?!.*\$\{)[^*?\x00-\x1F\x7F]*[^/*?\x00-\x1F\x7F]/$",
        2,
    )
    assert key.pop("ConstraintDescription").startswith('must end in "/"')
    del reference_key["AllowedPattern"], reference_key["MinLength"]
    assert generated == reference


@pytest.mark.parametrize("key", ["my_model/", "models/", "a b+c/", "ünï/çødé=1&2;3/", "%41/"])
def test_every_directory_uri_the_template_builds_parses_back(hf_project: Project, key: str) -> None:
    stack = Stack(load_template(hf_project.directory / "template.yaml"), ModelKey=key)
    uri = parse_model_uri(stack.environment["LAZYSERVE_MODEL_URI"])
    assert (uri.bucket, uri.key, uri.version_id, uri.is_prefix) == (
        "models-bucket",
        key,
        None,
        True,
    )
    assert load_settings(stack.environment).model_sha256 is None


def test_the_dockerfile_builds_the_function_on_the_cpu_torch(each: Project) -> None:
    dockerfile = each.directory / "Dockerfile"
    steps = instructions(dockerfile)
    reference = [args for keyword, args in instructions(ROOT / "Dockerfile") if keyword == "FROM"]
    assert [args for keyword, args in steps if keyword == "FROM"] == reference
    runs = [i for i, (keyword, args) in enumerate(steps) if keyword == "RUN" and "pip" in args]
    torch_step, requirements_step = runs
    assert steps[torch_step][1] == (
        "pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "
        "-c /tmp/build/constraints.txt torch"
    )
    assert steps[requirements_step][1].startswith(
        "pip install --no-cache-dir -r /tmp/build/requirements.txt"
    )
    code = next(i for i, (keyword, args) in enumerate(steps) if "my_model/" in args)
    assert torch_step < requirements_step < code
    check_task_root_readable(dockerfile)
    (cmd,) = [args for keyword, args in steps if keyword == "CMD"]
    assert json.loads(cmd) == ["my_model.app.handler"]
    assert "handler = service.handler" in text(each, "my_model/app.py")
    # transformers and huggingface_hub never reach for the Hub: the model comes from S3.
    offline = [("ENV", "HF_HUB_OFFLINE=1")] if each.template == "huggingface" else []
    assert [step for step in steps if step[0] == "ENV"] == offline


def test_every_copy_source_is_in_the_build_context(each: Project) -> None:
    ignored = [
        line.strip()
        for line in text(each, ".dockerignore").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for sources, _ in copies(each.directory / "Dockerfile"):
        for source in sources:
            path = source.rstrip("/").removeprefix("/tmp/build/")
            assert (each.directory / path).exists(), source
            assert not [p for p in ignored if fnmatch.fnmatch(path, p)], source
    for left_out in ("weights", "tests", ".venv", ".git"):
        assert left_out in ignored


def test_samconfig_is_the_references_but_for_the_stack_name(each: Project) -> None:
    generated = tomllib.loads(text(each, "samconfig.toml"))
    reference = tomllib.loads((ROOT / "samconfig.toml").read_text())
    reference["default"]["global"]["parameters"]["stack_name"] = "my-model"
    assert generated == reference


README_COMMANDS = {
    "basic": [
        "python -m my_model.weights",
        "LAZYSERVE_MODEL_URI=weights/my_model.safetensors lazyserve invoke "
        "events/http-api-predict.json --handler my_model.app.handler",
        "LAZYSERVE_MODEL_URI=weights/my_model.safetensors lazyserve serve my_model.app:app",
        "lazyserve push weights/my_model.safetensors "
        "s3://YOUR-BUCKET/my_model/my_model.safetensors",
    ],
    "huggingface": [
        "python -m my_model.train",
        "LAZYSERVE_MODEL_URI=weights/my_model/ lazyserve invoke "
        "events/http-api-predict.json --handler my_model.app.handler",
        "LAZYSERVE_MODEL_URI=weights/my_model/ lazyserve serve my_model.app:app",
        "lazyserve push weights/my_model/ s3://YOUR-BUCKET/my_model/",
    ],
}


def test_the_readme_names_its_commands(each: Project) -> None:
    # tests/test_init.py runs them; here, that they are the ones the project's files support.
    readme = text(each, "README.md")
    for command in (
        "pip install --index-url https://download.pytorch.org/whl/cpu -c constraints.txt torch",
        "pip install -r requirements-dev.txt",
        *README_COMMANDS[each.template],
        "sam build && sam deploy --guided",
    ):
        assert f"\n{command}\n" in readme, command


# -- the command and its errors -------------------------------------------------------------


def init(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["init", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("flags", "template", "script"),
    [([], "basic", "weights"), (["--huggingface"], "huggingface", "train")],
    ids=["basic", "huggingface"],
)
def test_init_prints_what_it_wrote_and_what_to_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    template: str,
    script: str,
) -> None:
    target = tmp_path / "fn"
    code, out, err = init(capsys, str(target), *flags)
    assert (code, err) == (0, "")
    # The README's set-up first: the CPU torch (PyPI's brings GBs of CUDA libraries on Linux).
    assert out == (
        f"wrote {len(FILES[template])} files to {target}/ (package fn); next:\n"
        f"  cd {target}\n"
        "  pip install --index-url https://download.pytorch.org/whl/cpu -c constraints.txt torch\n"
        "  pip install -r requirements-dev.txt\n"
        f"  python -m fn.{script}\n"
        "  pytest\n"
        "README.md has the rest: the local runs, lazyserve invoke, "
        "sam build && sam deploy --guided\n"
    )
    assert (target / "fn" / f"{script}.py").is_file()


def test_a_non_empty_directory_is_refused_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "fn"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "README.md").write_text("old")
    code, out, err = init(capsys, str(target))
    assert (code, out) == (1, "")
    assert err == (
        f"lazyserve init: error: argument DIR: {target} is not empty (README.md, notes.txt); "
        "give a new directory, or add --force to write the project into it (replacing files "
        "of the same names)\n"
    )
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "notes.txt"]

    code, _, err = init(capsys, str(target), "--force")
    assert (code, err) == (0, "")
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "README.md").read_text().startswith("# fn\n")


def test_a_long_listing_is_cut_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(200):
        (tmp_path / f"file{i:03}").touch()
    _, _, err = init(capsys, str(tmp_path), "--name", "fn")
    assert "(file000, file001, file002 and 197 more)" in err
    assert len(err) < 300


def test_a_file_is_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "fn"
    target.write_text("")
    assert init(capsys, str(target))[2] == (
        f"lazyserve init: error: argument DIR: {target} is a file; give a directory\n"
    )


RULE = (
    "use lowercase letters and digits, with single '-' or '_' between them, starting with a "
    "letter, at most 64 characters (e.g. my-model)"
)


@pytest.mark.parametrize("name", ["My-Model", "2fast", "my--model", "model-", "my model", "a" * 65])
def test_a_name_outside_the_rule_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    code, _, err = init(capsys, str(tmp_path / "fn"), "--name", name)
    assert code == 1
    assert err == (
        f"lazyserve init: error: argument --name: project name {name!r} is not accepted: {RULE}\n"
    )
    assert not (tmp_path / "fn").exists()


def test_the_directorys_name_is_checked_as_the_projects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = init(capsys, str(tmp_path / "My Model"))
    assert code == 1
    assert err == (
        f"lazyserve init: error: argument DIR: project name 'My Model' is not accepted: {RULE} "
        "(the name is the directory's; give --name NAME to choose another)\n"
    )
    code, _, err = init(capsys, str(tmp_path / "My Model"), "--name", "my-model")
    assert (code, err) == (0, "")
    assert (tmp_path / "My Model" / "my_model" / "app.py").is_file()


@pytest.mark.parametrize(
    "name", ["torch", "transformers", "lazyserve", "tests", "json", "email", "class", "weights"]
)
def test_a_name_that_would_shadow_a_module_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    _, _, err = init(capsys, str(tmp_path / "fn"), "--name", name)
    assert err == (
        f"lazyserve init: error: argument --name: project name {name!r} is not accepted: its "
        f"package {name!r} would shadow the module of that name (a Python keyword, standard "
        f"library module, dependency or project folder); choose another, e.g. {name}-model\n"
    )


def test_underscores_and_hyphens_give_each_form_its_own(tmp_path: Path) -> None:
    names = init_project(tmp_path / "x", name="churn_model-v2").names
    assert (names.package, names.stack) == ("churn_model_v2", "churn-model-v2")
    assert (tmp_path / "x" / "churn_model_v2" / "app.py").is_file()
    (cmd,) = [a for k, a in instructions(tmp_path / "x" / "Dockerfile") if k == "CMD"]
    assert json.loads(cmd) == ["churn_model_v2.app.handler"]


def test_the_help_says_what_init_does() -> None:
    done = subprocess.run(
        [str(PYTHON.parent / "lazyserve"), "init", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert re.search(
        r"usage: lazyserve init \[-h\] \[--name NAME\] \[--force\] \[--huggingface\]\s+DIR",
        done.stdout,
    )
    assert "save_pretrained directory in S3" in done.stdout
