from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import boto3
import pytest

from tests.helpers import (
    BUCKET,
    FAKE_CREDENTIALS,
    KEY,
    PYTHON,
    REGION,
    ROOT,
    WEIGHTS,
    CredentialsEndpoint,
    Dist,
    Gate,
    LambdaFunction,
    StartFunction,
    TaskImage,
    expiring_in,
    lambda_environ,
    run_command,
)
from tests.runtime_api import RuntimeAPI
from tests.s3server import CountingS3Server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests (a fresh venv, the Lambda image) run first, so under two workers the rest
    of the suite runs beside them instead of after them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def mangum_event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh current event loop per test, closed after it: Mangum adopts the current loop when
    an app module builds its handler, and one left open would leak into the next test."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield loop
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No LAZYSERVE_* or AWS_* variable leaks into a test; fake credentials, fixed region."""
    from lazyserve.sources import reset_prefetches, reset_s3_clients

    for name in list(os.environ):
        if name.startswith(("LAZYSERVE_", "AWS_")):
            monkeypatch.delenv(name)
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    reset_s3_clients()
    yield
    reset_s3_clients()
    # A prefetch an eager import started and no load took must not serve a later test.
    reset_prefetches()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[CountingS3Server]:
    """moto's S3 server on 127.0.0.1 (a free port), for the whole session."""
    server = CountingS3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: CountingS3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingS3Server]:
    """The S3 server, cleared, with boto3 pointed at it (AWS_ENDPOINT_URL_S3) and the reference
    weights uploaded to s3://BUCKET/KEY."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    client = boto3.client("s3", region_name=REGION, endpoint_url=s3_server.endpoint)
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    client.put_object(Bucket=BUCKET, Key=KEY, Body=WEIGHTS.read_bytes())
    s3_server.fault = None
    s3_server.clear()
    yield s3_server
    s3_server.fault = None


@pytest.fixture
def import_handler(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ModuleType]]:
    """Import handler.app afresh with the given LAZYSERVE_* settings, as a new process would."""

    def _import(**settings: str) -> ModuleType:
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        sys.modules.pop("handler.app", None)
        return importlib.import_module("handler.app")

    yield _import
    module = sys.modules.pop("handler.app", None)
    if module is not None:
        module.service.close()


@pytest.fixture
def gate(s3: CountingS3Server) -> Iterator[Gate]:
    gate = Gate()
    s3.fault = gate
    try:
        yield gate
    finally:
        gate.open()
        s3.fault = None


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """`python -m build` of this checkout, as `make dist` runs it: the sdist, then the wheel built
    from the unpacked sdist (so the sdist alone must make a working wheel). Build isolation
    fetches the build backend from the package index."""
    out = tmp_path_factory.mktemp("dist")
    done = run_command([str(PYTHON), "-m", "build", "--outdir", str(out), str(ROOT)], 600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (sdist,) = out.glob("lazyserve-*.tar.gz")
    (wheel,) = out.glob("lazyserve-*.whl")
    return Dist(sdist, wheel, done.stdout + done.stderr)


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> TaskImage:
    """Build a wheel of the project, install it non-editable into the site-packages of a
    Python of its own, and copy handler/ and examples/ into a task root, as the Dockerfile does.

    The dependencies (torch, FastAPI, awslambdaric...) come from this venv through a path
    entry: only a real site-packages directory runs .pth files, so this venv's editable
    lazyserve stays out of the picture and the wheel's own start-up hook is what runs."""
    root = tmp_path_factory.mktemp("lambda-image")
    # Build from a copy: an in-tree build would write build/ into the checkout.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    dist = root / "dist"
    wheel_cmd = [str(PYTHON), "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist)]
    built = run_command([*wheel_cmd, "--no-build-isolation", str(source)], 180)
    if built.returncode != 0:  # e.g. a build backend missing from the venv
        built = run_command([*wheel_cmd, str(source)], 300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("lazyserve-*.whl")
    env = root / "python"
    made = run_command([sys.executable, "-m", "venv", "--without-pip", str(env)], 120)
    assert made.returncode == 0, made.stdout + made.stderr
    python = env / "bin" / "python"
    (site,) = (
        Path(p)
        for p in run_command(
            [str(python), "-c", "import site; print(site.getsitepackages()[0])"], 60
        ).stdout.split()
    )
    installed = run_command(
        [str(PYTHON), "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        180,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (site / "lazyserve.pth").is_file()
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    (site / "00-dependencies.pth").write_text(f"{deps}\n")
    task = root / "task"
    shutil.copytree(ROOT / "handler", task / "handler", ignore=ignore)
    shutil.copytree(ROOT / "examples", task / "examples", ignore=ignore)
    return TaskImage(python, site, task)


@pytest.fixture
def start_function(
    image: TaskImage, s3: CountingS3Server, tmp_path: Path
) -> Iterator[StartFunction]:
    """Start execution environments (`start_function(LAZYSERVE_LOAD="eager")`); each Runtime
    API records, on every call, how many GETs of the weights moto had served by then."""
    started: list[LambdaFunction] = []

    def start(**overrides: str) -> LambdaFunction:
        # Whichever object LAZYSERVE_MODEL_URI names: "s3://bucket/key" -> ("bucket", "key").
        uri = overrides.get("LAZYSERVE_MODEL_URI", f"s3://{BUCKET}/{KEY}")
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        api = RuntimeAPI(
            next_timeout=60.0, observe=lambda: len(s3.object_gets(bucket, key))
        ).start()
        env = lambda_environ(image, api.address, s3.endpoint, tmp_path, **overrides)
        log = tmp_path / f"function-{len(started)}.log"
        try:
            function = LambdaFunction(api, env, image, log)
        except BaseException:
            api.stop()
            raise
        started.append(function)
        return function

    yield start
    for function in started:
        try:
            function.stop()
        finally:
            function.api.stop()


@pytest.fixture
def container(monkeypatch: pytest.MonkeyPatch) -> Iterator[CredentialsEndpoint]:
    """A credentials endpoint named by AWS_CONTAINER_CREDENTIALS_FULL_URI, with a token, and no
    credentials in the environment (as under SnapStart)."""
    endpoint = CredentialsEndpoint(
        {
            "AccessKeyId": "ASIACONTAINERFAKE",
            "SecretAccessKey": "container/secret",
            "Token": "container-token",
            "Expiration": expiring_in(3600),
        }
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", endpoint.url)
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "the-auth-token")
    yield endpoint
    endpoint.stop()
