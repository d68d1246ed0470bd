"""From the built package to the user's own function, outside this repository: the wheel
`make dist` builds is installed into a fresh venv (torch held to constraints.txt, so the CPU
build), `lazyserve init myfn` and `lazyserve init --huggingface myhf` write a project each
there, and their README's commands run as written: the setup, the script that writes the model,
the project's own tests (the app in process, and the function under awslambdaric with its model
in moto's S3), `lazyserve invoke`, `lazyserve serve` with the curl request, and `lazyserve push`.
Their templates get cfn-lint and the safe-default checks. Only `sam build && sam deploy` cannot
run here (no Docker, no AWS).

Slow: the install copies torch into the venv (about a minute here), and the --huggingface
project's set-up installs transformers and tokenizers from the package index (PyPI) into it
(about half a minute here)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    BUCKET,
    DIRECTORY_SAFE_DEFAULTS,
    PYTHON,
    REGION,
    ROOT,
    SAFE_DEFAULTS,
    Dist,
    cfn_lint,
    free_port,
    load_template,
    wait_until_serving,
)
from tests.s3server import CountingS3Server

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    """A template set, and what its project's commands should do."""

    name: str  # the project's, and its package's
    flags: str  # of `lazyserve init`
    files: int  # how many files init writes
    written: str  # what the README's first command writes (relative to the project)
    key: str  # the S3 key the README pushes to and tells `sam deploy --guided`
    passed: int  # the project's own tests
    labels: Callable[[dict[str, Any]], list[Any]]  # an answer's labels
    expected: list[Any]  # the sample request's labels
    checks: tuple[Callable[[dict[str, Any]], None], ...]  # of its template.yaml


CASES = {
    "basic": Case(
        name="myfn",
        flags="",
        files=23,
        written="weights/myfn.safetensors",
        key="myfn/myfn.safetensors",
        # The app in process (4 tests), and the function under awslambdaric with its weights
        # from moto's S3 (5 tests).
        passed=9,
        labels=lambda body: list(body["labels"]),
        expected=[0, 1],
        checks=SAFE_DEFAULTS,
    ),
    "huggingface": Case(
        name="myhf",
        flags="--huggingface ",
        files=22,
        written="weights/myhf/",
        key="myhf/",
        # The app in process (8 tests), and the function under awslambdaric with its model
        # directory from moto's S3 (5 tests).
        passed=13,
        labels=lambda body: [p["label"] for p in body["predictions"]],
        expected=["positive", "negative"],
        checks=DIRECTORY_SAFE_DEFAULTS,
    ),
}


class Venv:
    """A virtual environment outside the repository, and a shell as if it were activated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bin = path / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        # As `. .venv/bin/activate` leaves it; none of this checkout's paths (a PYTHONPATH
        # would put its sources ahead of the installed wheel).
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env |= {"VIRTUAL_ENV": str(self.path), "PATH": f"{self.bin}:{os.environ['PATH']}"}
        return env | extra

    def sh(
        self, command: str, cwd: Path, timeout: float = 600, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command],
            cwd=cwd,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    """The wheel installed into a fresh venv, with this repository's constraints.txt (the
    `-c constraints.txt` every install here uses: torch stays the CPU build)."""
    home = tmp_path_factory.mktemp("user")
    env = Venv(home / ".venv")
    try:
        made = subprocess.run(
            [str(PYTHON), "-m", "venv", str(env.path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        ok(made)
        constraints = ROOT / "constraints.txt"
        ok(env.sh(f"pip install -q -c {constraints} {dist.wheel}", cwd=home))
        where = ok(env.sh('python -c "import lazyserve; print(lazyserve.__file__)"', cwd=home))
        assert where.startswith(str(env.path)), where
        yield env
    finally:
        shutil.rmtree(env.path, ignore_errors=True)  # ~1 GB: torch


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


@pytest.fixture(scope="module")
def project(venv: Venv, case: Case) -> Path:
    """`lazyserve init [--huggingface] NAME` in the user's directory, then the README's set-up
    commands."""
    home = venv.path.parent
    printed = ok(venv.sh(f"lazyserve init {case.flags}{case.name}", cwd=home))
    expected = f"wrote {case.files} files to {case.name}/ (package {case.name}); next:\n"
    assert printed.startswith(expected), printed
    project = home / case.name
    for command in readme_block(project, "Set up"):
        ok(venv.sh(command, cwd=project))
    return project


def readme_block(project: Path, section: str) -> list[str]:
    """The commands of the first bash block under a README heading, one per line."""
    readme = (project / "README.md").read_text()
    text = readme.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)
    assert block, section
    return block[1].splitlines()


def test_the_projects_own_tests_pass(venv: Venv, project: Path, case: Case) -> None:
    (script, pytest_, *_) = readme_block(project, "Run it on your machine")
    assert script.startswith(f"python -m {case.name}.") and pytest_ == "pytest"
    out = ok(venv.sh(pytest_, cwd=project))
    # All of them run: none skipped.
    assert re.search(rf"^=+ {case.passed} passed in [\d.]+s", out, re.MULTILINE), out[-3000:]


def test_the_local_commands_run_as_written(venv: Venv, project: Path, case: Case) -> None:
    script, _, invoke, serve = readme_block(project, "Run it on your machine")
    out = ok(venv.sh(script, cwd=project))
    written = project / case.written
    assert out == f"wrote {case.written}\n"
    files = sorted(written.iterdir()) if written.is_dir() else [written]
    assert files and {f.stat().st_mode & 0o777 for f in files} == {0o644}

    out = ok(venv.sh(invoke, cwd=project))
    answer, report = out.splitlines()
    response = json.loads(answer)
    assert response["statusCode"] == 200, response
    assert case.labels(json.loads(response["body"])) == case.expected
    assert report.startswith("REPORT RequestId: ")

    (curl,) = readme_block_after(project, "Run it on your machine", serve)
    words = shlex.split(serve)
    settings = dict(w.split("=", 1) for w in words if re.match(r"[A-Z_]+=", w))
    port = free_port()
    server = subprocess.Popen(
        [*words[len(settings) :], "--port", str(port)],
        cwd=project,
        env=venv.env(**settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(server, f"http://127.0.0.1:{port}")
        out = ok(venv.sh(curl.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), cwd=project))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert case.labels(json.loads(out)) == case.expected


def readme_block_after(project: Path, section: str, line: str) -> list[str]:
    """The commands of the second bash block of a README section (the one after `line`)."""
    readme = (project / "README.md").read_text()
    text = readme.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].split(line, 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)
    assert block, section
    return block[1].splitlines()


def test_push_stores_the_model_where_the_template_reads_it(
    venv: Venv, project: Path, case: Case, s3: CountingS3Server
) -> None:
    push, deploy = readme_block(project, "Deploy to AWS Lambda")
    assert deploy == "sam build && sam deploy --guided"  # needs Docker and AWS: not run here
    script = readme_block(project, "Run it on your machine")[0]
    ok(venv.sh(script, cwd=project))
    out = ok(venv.sh(push.replace("YOUR-BUCKET", BUCKET), cwd=project, AWS_REGION=REGION))
    assert out.startswith(f"uri: s3://{BUCKET}/{case.key}\n"), out
    # The weights object, or the directory's: its sha256 stored with it, as push printed it.
    weights = case.key + ("model.safetensors" if case.key.endswith("/") else "")
    import boto3

    head = boto3.client("s3", region_name=REGION, endpoint_url=s3.endpoint).head_object(
        Bucket=BUCKET, Key=weights
    )
    assert head["Metadata"]["sha256"] in out
    # The key the README pushes to is the one it tells `sam deploy --guided` (ModelKey).
    assert f"`ModelKey`\n(`{case.key}`" in (project / "README.md").read_text()


def test_the_template_passes_cfn_lint_and_the_safe_default_checks(
    project: Path, case: Case
) -> None:
    done = cfn_lint(project / "template.yaml")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    template = load_template(project / "template.yaml")
    for check in case.checks:
        check(template)
