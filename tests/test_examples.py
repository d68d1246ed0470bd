"""The "Bring your own model" example (examples/own_model/): the weights script, the app in
process, on moto's S3, on Lambda, and the commands of its README exactly as written."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import anyio
import httpx
import pytest

from lazyserve.cli import FakeContext
from lazyserve.publish import push
from tests.helpers import BUCKET, ROOT, free_port, wait_until_serving
from tests.s3server import CountingS3Server, Request

EXAMPLE = ROOT / "examples" / "own_model"
APP_MODULE = "examples.own_model.app"
LAZYSERVE = Path(sys.executable).parent / "lazyserve"
ROWS = [[5, 4, 1, 0], [0, 1, 2, 3]]  # first two add up to more -> 0, else -> 1
LABELS = [0, 1]

ImportExample = Callable[[str], ModuleType]


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    from examples.own_model.make_weights import make_weights

    return make_weights(tmp_path / "mynet.safetensors")


@pytest.fixture
def import_example(monkeypatch: pytest.MonkeyPatch) -> Iterator[ImportExample]:
    """Import the example app afresh, as a new process would, with LAZYSERVE_MODEL_URI set."""

    def _import(uri: str) -> ModuleType:
        monkeypatch.setenv("LAZYSERVE_MODEL_URI", uri)
        sys.modules.pop(APP_MODULE, None)
        return importlib.import_module(APP_MODULE)

    yield _import
    sys.modules.pop(APP_MODULE, None)


@pytest.fixture
async def example(
    weights: Path, import_example: ImportExample
) -> AsyncIterator[tuple[ModuleType, httpx.AsyncClient]]:
    mod = import_example(str(weights))
    async with asgi(mod) as client:
        yield mod, client


def asgi(mod: ModuleType) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=mod.app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextmanager
def serving(argv: list[str], settings: dict[str, str]) -> Iterator[str]:
    """A README's `lazyserve serve` command on a free port with `settings` in its environment,
    until the block ends; its base URL once it answers."""
    port = free_port()
    server = subprocess.Popen(
        [*argv, "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, **settings},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(server, base)
        yield base
    finally:
        server.terminate()
        server.communicate(timeout=30)


def curl_body(curl: str) -> str:
    """The JSON a README's curl command sends (`-d '...'`)."""
    body = re.search(r"-d '(.*?)'", curl)
    assert body, curl
    return body[1]


def test_the_weights_are_readable_by_anyone_whatever_the_umask(tmp_path: Path) -> None:
    from examples.own_model.make_weights import make_weights

    previous = os.umask(0o077)
    try:
        path = make_weights(tmp_path / "mynet.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


# --- in process -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_predict_health_and_model(
    weights: Path, example: tuple[ModuleType, httpx.AsyncClient]
) -> None:
    _, client = example
    health = await client.get("/health")
    assert health.json() == {"status": "ok", "model": "not_loaded"}

    response = await client.post("/predict", json={"inputs": ROWS})
    assert response.status_code == 200, response.text
    assert response.json() == {"labels": LABELS}
    assert "infer;dur=" in response.headers["server-timing"]

    health = await client.get("/health")
    assert health.json() == {"status": "ok", "model": "loaded"}
    meta = (await client.get("/model")).json()
    assert meta["status"] == "loaded"
    assert meta["source"] == str(weights)
    assert meta["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta["size_bytes"] == weights.stat().st_size
    assert meta["format"] == "safetensors"
    assert meta["loads"] == 1


@pytest.mark.anyio
async def test_ten_concurrent_cold_requests_share_one_load_from_s3(
    s3: CountingS3Server, weights: Path, import_example: ImportExample
) -> None:
    key = "examples/mynet.safetensors"
    uri = f"s3://{BUCKET}/{key}"
    push(weights, uri, progress=io.StringIO())
    s3.clear()
    mod = import_example(uri)
    # S3 holds the first GET until all ten requests wait for the load it belongs to.
    held, release = threading.Event(), threading.Event()

    def gate(request: Request) -> None:
        if request.method == "GET" and request.path == f"/{BUCKET}/{key}":
            held.set()
            release.wait(30)

    s3.fault = gate
    answers: list[httpx.Response] = []

    async def one(client: httpx.AsyncClient) -> None:
        answers.append(await client.post("/predict", json={"inputs": ROWS}))

    try:
        async with asgi(mod) as client, anyio.create_task_group() as group:
            for _ in range(10):
                group.start_soon(one, client)
            await anyio.to_thread.run_sync(held.wait, 30)
            await anyio.sleep(0.1)  # the other nine reach the wait for the same load
            release.set()
    finally:
        release.set()
        s3.fault = None
    assert [a.status_code for a in answers] == [200] * 10
    assert all(a.json() == {"labels": LABELS} for a in answers)
    assert mod.service.model.loads_started == 1
    assert len(s3.object_gets(BUCKET, key)) == 1


@pytest.mark.anyio
async def test_bad_body_is_422_at_once_without_a_load(
    example: tuple[ModuleType, httpx.AsyncClient],
) -> None:
    mod, client = example
    response = await client.post("/predict", json={"inputs": [[1, 2, 3]]})
    assert response.status_code == 422
    (error,) = response.json()["detail"]  # each problem once
    assert error["loc"] == ["body", "inputs", 0]
    assert mod.service.model.loads_started == 0


@pytest.mark.anyio
async def test_bad_body_is_422_even_when_the_model_cannot_load(
    tmp_path: Path, import_example: ImportExample
) -> None:
    mod = import_example(str(tmp_path / "missing.safetensors"))
    async with asgi(mod) as client:
        bad = await client.post("/predict", json={"inputs": []})
        assert bad.status_code == 422
        good = await client.post("/predict", json={"inputs": ROWS})
    assert good.status_code == 500  # a missing file: answered until it appears
    assert good.json()["detail"]["error"] == "model_unloadable"
    assert "missing.safetensors" in good.json()["detail"]["message"]


def test_lambda_handler_answers_the_http_api_event(
    weights: Path, import_example: ImportExample
) -> None:
    mod = import_example(str(weights))
    event = json.loads((EXAMPLE / "event.json").read_text())
    for request_id in ("cold", "warm"):
        response = mod.handler(event, FakeContext(aws_request_id=request_id))
        assert response["statusCode"] == 200, response
        assert json.loads(response["body"]) == {"labels": LABELS}
    assert mod.service.model.loads_started == 1


# --- the commands of examples/own_model/README.md, as written -------------------------------------


def readme_commands() -> list[str]:
    text = (EXAMPLE / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_commands_make_weights_invoke_and_serve(tmp_path: Path) -> None:
    commands = readme_commands()
    make, invoke, serve, curl = (
        next(c for c in commands if word in c)
        for word in ("make_weights", "lazyserve invoke", "lazyserve serve", "curl")
    )
    out = "/tmp/mynet.safetensors"
    assert out in make and f"LAZYSERVE_MODEL_URI={out}" in serve
    # Run each as written, with the weights in this test's directory instead of /tmp.
    path = tmp_path / "mynet.safetensors"

    def argv(command: str) -> list[str]:
        words = command.split("#", 1)[0].replace(out, str(path)).split()
        return [w for w in words if not w.startswith("LAZYSERVE_MODEL_URI=")]

    done = run(*argv(make))
    assert done.returncode == 0, done.stderr
    assert path.is_file()

    done = run(*argv(invoke), LAZYSERVE_MODEL_URI=str(path))
    assert done.returncode == 0, done.stderr
    response = json.loads(done.stdout.splitlines()[0])
    assert response["statusCode"] == 200
    assert json.loads(response["body"]) == {"labels": LABELS}

    with serving(argv(serve), {"LAZYSERVE_MODEL_URI": str(path)}) as base:
        url = re.search(r"http://127\.0\.0\.1:8000(/\S*)", curl)
        assert url, curl
        response = httpx.post(
            f"{base}{url[1]}",
            content=curl_body(curl),
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"labels": LABELS}


# --- the README shows the example's code ----------------------------------------------------------


def test_the_readme_shows_the_example_code() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Bring your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    for name in ("net.py", "app.py"):
        assert (EXAMPLE / name).read_text() in blocks, f"README differs from {name}"


def page_section(page: str, title: str) -> list[str]:
    """The bash blocks of one section of a docs page, as written."""
    text = (ROOT / "docs" / page).read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.DOTALL)


def test_the_many_models_example_runs_as_shown(s3: CountingS3Server) -> None:
    """docs/many-models.md's three models from one prefix: the push loop, `lazyserve serve` and
    the curl commands, run as written against moto's S3 (YOUR-BUCKET is its bucket) on a free
    port."""
    push_loop, serve_and_curl = page_section("many-models.md", "A worked example")
    (serve,) = [line for line in push_loop.splitlines() if "lazyserve serve" in line]
    push = push_loop.replace(serve, "").replace("YOUR-BUCKET", BUCKET)
    done = subprocess.run(
        ["bash", "-c", push], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("sha256: ") == 3
    settings = dict(w.split("=", 1) for w in serve.split() if w.startswith("LAZYSERVE_"))
    assert settings == {
        "LAZYSERVE_MODEL_URI": "s3://YOUR-BUCKET/digits/",
        "LAZYSERVE_MEMORY_BUDGET": "150K",
    }
    settings["LAZYSERVE_MODEL_URI"] = f"s3://{BUCKET}/digits/"
    command = [w for w in serve.split() if not w.startswith("LAZYSERVE_")]
    with serving(command, settings) as base:
        answers = []
        for line in serve_and_curl.splitlines():
            line = line.replace("127.0.0.1:8000", base.removeprefix("http://"))
            done = subprocess.run(
                line, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
            )
            assert done.returncode == 0, (line, done.stderr)
            answers.append(json.loads(done.stdout))
    *predictions, listing = answers
    assert [a["predictions"][0]["label"] for a in predictions] == [8, 8, 8]
    # 150K holds two 69 KB models: gamma evicted alpha, the least recently used.
    assert [m["name"] for m in listing["models"]] == ["beta", "gamma"]
    assert listing["evictions"] == 1
    assert listing["budget_bytes"] == 150 * 1024


# --- the commands of examples/huggingface/README.md, as written -----------------------------------

HF = ROOT / "examples" / "huggingface"


def test_the_huggingface_readme_commands_make_invoke_and_serve(tmp_path: Path) -> None:
    text = (HF / "README.md").read_text()
    commands = [
        line
        for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
        for line in block.splitlines()
        if line.strip()
    ]
    make, invoke, serve, curl = (
        next(c for c in commands if word in c)
        for word in ("make_model", "lazyserve invoke", "lazyserve serve", "curl")
    )
    out = "/tmp/sentiment"
    directory = tmp_path / "sentiment"

    def argv(command: str) -> list[str]:
        words = command.replace(out, str(directory)).split()
        return [w for w in words if not w.startswith("LAZYSERVE_MODEL_URI=")]

    uri = f"{directory}/"
    assert f"LAZYSERVE_MODEL_URI={out}/" in invoke and f"LAZYSERVE_MODEL_URI={out}/" in serve
    done = run(*argv(make))
    assert done.returncode == 0, done.stderr
    assert (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file()

    done = run(*argv(invoke), LAZYSERVE_MODEL_URI=uri)
    assert done.returncode == 0, done.stderr
    response = json.loads(done.stdout.splitlines()[0])
    assert response["statusCode"] == 200, response
    labels = json.loads(response["body"])["labels"]
    assert len(labels) == 2 and set(labels) <= {"positive", "negative"}

    with serving(argv(serve), {"LAZYSERVE_MODEL_URI": uri}) as base:
        answer = httpx.post(
            f"{base}/predict",
            content=curl_body(curl),
            headers={"content-type": "application/json"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["labels"][0] in ("positive", "negative")
        meta = httpx.get(f"{base}/model", timeout=30).json()
        assert list(meta["files"]) == ["model.safetensors"]


def test_the_huggingface_example_is_at_most_30_lines_and_imports_lazyserve_only() -> None:
    code = (HF / "app.py").read_text()
    assert len(code.splitlines()) <= 30
    imports = re.findall(r"^(?:from|import) (\S+)", code, re.M)
    assert [m for m in imports if m.startswith("lazyserve")] == ["lazyserve"]
