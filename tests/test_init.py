"""From the built package to the user's own function, outside this repository: the wheel
`make dist` builds is installed into a fresh venv (torch held to constraints.txt, so the CPU
build), `lazyserve init myfn` writes a project there, and its README's commands run as written:
the setup, the weights script, the project's own tests (the app in process, and the function
under awslambdaric with its weights in moto's S3), `lazyserve invoke`, `lazyserve serve` with the
curl request, and `lazyserve push`. Its template gets cfn-lint and the reference's safe-default
checks. Only `sam build && sam deploy` cannot run here (no Docker, no AWS).

Slow: the install alone copies torch into the venv (about a minute here)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    BUCKET,
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

NAME = "myfn"
ROWS_ANSWER = [0, 1]  # the labels of the sample request's two rows


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


@pytest.fixture(scope="module")
def project(venv: Venv) -> Path:
    """`lazyserve init myfn` in the user's directory, then the README's set-up commands."""
    home = venv.path.parent
    printed = ok(venv.sh(f"lazyserve init {NAME}", cwd=home))
    assert printed.startswith(f"wrote 23 files to {NAME}/ (package {NAME}); next:\n"), printed
    project = home / NAME
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


def test_the_projects_own_tests_pass(venv: Venv, project: Path) -> None:
    (weights, pytest_, *_) = readme_block(project, "Run it on your machine")
    assert (weights, pytest_) == (f"python -m {NAME}.weights", "pytest")
    out = ok(venv.sh(pytest_, cwd=project))
    # The app in process (4 tests), and the function under awslambdaric with its weights from
    # moto's S3 (5 tests), all of them run.
    assert re.search(r"^=+ 9 passed in [\d.]+s", out, re.MULTILINE), out[-3000:]


def test_the_local_commands_run_as_written(venv: Venv, project: Path) -> None:
    weights, _, invoke, serve = readme_block(project, "Run it on your machine")
    out = ok(venv.sh(weights, cwd=project))
    written = project / "weights" / f"{NAME}.safetensors"
    assert out == f"wrote weights/{NAME}.safetensors\n"
    assert written.stat().st_mode & 0o777 == 0o644

    out = ok(venv.sh(invoke, cwd=project))
    answer, report = out.splitlines()
    response = json.loads(answer)
    assert response["statusCode"] == 200, response
    assert json.loads(response["body"])["labels"] == ROWS_ANSWER
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
    assert json.loads(out)["labels"] == ROWS_ANSWER


def readme_block_after(project: Path, section: str, line: str) -> list[str]:
    """The commands of the second bash block of a README section (the one after `line`)."""
    readme = (project / "README.md").read_text()
    text = readme.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].split(line, 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)
    assert block, section
    return block[1].splitlines()


def test_push_stores_the_weights_where_the_template_reads_them(
    venv: Venv, project: Path, s3: CountingS3Server
) -> None:
    push, deploy = readme_block(project, "Deploy to AWS Lambda")
    assert deploy == "sam build && sam deploy --guided"  # needs Docker and AWS: not run here
    ok(venv.sh(f"python -m {NAME}.weights", cwd=project))
    out = ok(venv.sh(push.replace("YOUR-BUCKET", BUCKET), cwd=project, AWS_REGION=REGION))
    key = f"{NAME}/{NAME}.safetensors"
    assert out.startswith(f"uri: s3://{BUCKET}/{key}\nsha256: "), out
    import boto3

    head = boto3.client("s3", region_name=REGION, endpoint_url=s3.endpoint).head_object(
        Bucket=BUCKET, Key=key
    )
    assert head["Metadata"]["sha256"] in out
    # The key the README pushes to is the one it tells `sam deploy --guided` (ModelKey).
    assert f"`ModelKey`\n(`{key}`)" in (project / "README.md").read_text()


def test_the_template_passes_cfn_lint_and_the_safe_default_checks(project: Path) -> None:
    done = cfn_lint(project / "template.yaml")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    template = load_template(project / "template.yaml")
    check: Callable[[dict[str, Any]], None]
    for check in SAFE_DEFAULTS:
        check(template)
