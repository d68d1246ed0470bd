"""The function run the way the Lambda image runs it: the package pip-installed (not editable),
`handler/` in a separate task root, `python -m awslambdaric handler.app.handler` as a real
process, talking to the Runtime API in tests/runtime_api.py, the weights in moto's S3 server."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.helpers import BUCKET, FAKE_CREDENTIALS, KEY, REGION, ROOT, WEIGHTS, load_event
from tests.runtime_api import Call, Result, RuntimeAPI
from tests.s3server import CountingS3Server

HANDLER = "handler.app.handler"
PYTHON = Path(sys.executable)
PART_SIZE = 16384
WEIGHTS_BYTES = WEIGHTS.read_bytes()
WEIGHTS_SHA256 = hashlib.sha256(WEIGHTS_BYTES).hexdigest()
LOAD_GETS = math.ceil(len(WEIGHTS_BYTES) / PART_SIZE)  # ranged GETs of one load
EXPECTED_RANGES = {
    f"bytes={start}-{min(start + PART_SIZE, len(WEIGHTS_BYTES)) - 1}"
    for start in range(0, len(WEIGHTS_BYTES), PART_SIZE)
}
DIGIT = 8  # the label of the image in every stored predict event
INIT_TIMEOUT = 60.0  # starting Python, importing torch and FastAPI
INVOKE_TIMEOUT = 30.0
HTTP_PREDICT = ["rest-predict", "http-api-predict", "alb-predict", "function-url-predict"]


@dataclass(frozen=True)
class TaskImage:
    """What the container image holds: a Python whose site-packages has lazyserve installed
    from its wheel (its .pth start-up hook included), and the task root."""

    python: Path
    site: Path
    task: Path


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


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
    built = _run([*wheel_cmd, "--no-build-isolation", str(source)], 180)
    if built.returncode != 0:  # e.g. a build backend missing from the venv
        built = _run([*wheel_cmd, str(source)], 300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("lazyserve-*.whl")
    env = root / "python"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(env)], 120)
    assert made.returncode == 0, made.stdout + made.stderr
    python = env / "bin" / "python"
    (site,) = (
        Path(p)
        for p in _run(
            [str(python), "-c", "import site; print(site.getsitepackages()[0])"], 60
        ).stdout.split()
    )
    installed = _run(
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


def lambda_environ(
    image: TaskImage, runtime_api: str, s3_endpoint: str, home: Path, **overrides: str
) -> dict[str, str]:
    """The environment Lambda gives a container-image function (python3.13 base image),
    pointed at the test's Runtime API and S3; `overrides` add or replace variables."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "en_US.UTF-8",
        "TZ": ":UTC",
        "PYTHONPATH": str(image.task),
        "LAMBDA_TASK_ROOT": str(image.task),
        "LAMBDA_RUNTIME_DIR": "/var/runtime",
        "_HANDLER": HANDLER,
        "AWS_LAMBDA_RUNTIME_API": runtime_api,
        # As for the python3.13 base image; it makes awslambdaric poll /next from a thread.
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
        "AWS_LAMBDA_FUNCTION_NAME": "lazyserve-test",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3008",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/lazyserve-test",
        "AWS_LAMBDA_LOG_STREAM_NAME": "2026/01/01/[$LATEST]0123456789abcdef0123456789abcdef",
        **FAKE_CREDENTIALS,
        "AWS_SESSION_TOKEN": "fake-session-token",
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "LAZYSERVE_MODEL_URI": f"s3://{BUCKET}/{KEY}",
        "LAZYSERVE_S3_PART_SIZE": str(PART_SIZE),
    }
    env.update(overrides)
    return env


class LambdaFunction:
    """One execution environment: the awslambdaric process and the Runtime API it talks to."""

    def __init__(self, api: RuntimeAPI, env: dict[str, str], image: TaskImage, log: Path) -> None:
        self.api = api
        self.log_path = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [str(image.python), "-m", "awslambdaric", env["_HANDLER"]],
                cwd=image.task,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exited(self) -> str | None:
        """Why waiting is pointless (the process ended), else None."""
        code = self.process.poll()
        if code is None:
            return None
        return f"the function exited with code {code}; its output:\n{self.log()[-4000:]}"

    def invoke(self, event: Any, timeout: float = INVOKE_TIMEOUT) -> Result:
        request_id = self.api.invoke(event, timeout=timeout)
        return self.api.wait_result(request_id, timeout, abort=self.exited)

    def wait_call(self, method: str, suffix: str, timeout: float = INIT_TIMEOUT) -> Call:
        return self.api.wait_call(method, suffix, timeout, abort=self.exited)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


StartFunction = Callable[..., LambdaFunction]


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


def weights_gets(s3: CountingS3Server) -> list[Any]:
    return s3.object_gets(BUCKET, KEY)


def assert_one_load(s3: CountingS3Server) -> None:
    """Exactly one load's worth of ranged GETs: each part of the object read once."""
    gets = weights_gets(s3)
    assert len(gets) == LOAD_GETS, [g.range for g in gets]
    assert {g.range for g in gets} == EXPECTED_RANGES


def assert_prediction(payload: dict[str, Any]) -> None:
    (prediction,) = payload["predictions"]
    assert prediction["label"] == DIGIT
    assert len(prediction["probabilities"]) == 10
    assert max(prediction["probabilities"]) == prediction["probabilities"][DIGIT]
    assert payload["model"]["sha256"] == WEIGHTS_SHA256


def http_body(result: Result) -> Any:
    """The JSON body of a 200 answer to an HTTP event (API Gateway, ALB, Function URL)."""
    assert result.kind == "response", result.body
    response = result.json()
    assert response["statusCode"] == 200, response
    assert not response.get("isBase64Encoded"), response
    return json.loads(response["body"])


def error_of(result: Result) -> dict[str, Any]:
    assert result.kind == "error", result.body
    error: dict[str, Any] = result.json()
    return error


# -- the image's layout ------------------------------------------------------------------------


def test_the_installed_package_shadows_the_checkout(image: TaskImage, tmp_path: Path) -> None:
    """The process imports lazyserve from the non-editable install, handler from the task root."""
    env = lambda_environ(image, "127.0.0.1:9", "http://127.0.0.1:9", tmp_path)
    probe = (
        "import importlib.util as u, json; "
        "print(json.dumps({n: u.find_spec(n).origin for n in ('lazyserve', 'handler')}))"
    )
    done = subprocess.run(
        [str(image.python), "-c", probe],
        cwd=image.task,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    origins = json.loads(done.stdout)
    assert Path(origins["lazyserve"]) == image.site / "lazyserve" / "__init__.py"
    assert Path(origins["handler"]) == image.task / "handler" / "__init__.py"
    assert not (image.site / "lazyserve").is_symlink()
    assert (image.task / "handler" / "weights" / WEIGHTS.name).read_bytes() == WEIGHTS_BYTES


# -- a sequence of events through one execution environment ------------------------------------


def test_stored_events_through_the_runtime_client(
    start_function: StartFunction, s3: CountingS3Server
) -> None:
    function = start_function(LAZYSERVE_LOAD="background")  # template.yaml's default
    for name in HTTP_PREDICT:
        assert_prediction(http_body(function.invoke(load_event(name))))
    assert http_body(function.invoke(load_event("rest-health"))) == {
        "status": "ok",
        "model": "loaded",
    }
    direct = function.invoke(load_event("direct-predict"))
    assert direct.kind == "response", direct.body
    assert_prediction(direct.json())
    for name in ("warmup", "empty"):
        warm = function.invoke(load_event(name))
        assert warm.kind == "response", warm.body
        body = warm.json()
        assert body["warm"] is True
        assert body["model"]["sha256"] == WEIGHTS_SHA256

    invalid = error_of(function.invoke(load_event("direct-invalid")))
    assert invalid["errorType"] == "InvalidInput"
    assert "inputs[0]" in invalid["errorMessage"]
    assert "64" in invalid["errorMessage"]
    unsupported = error_of(function.invoke(load_event("s3-put")))
    assert unsupported["errorType"] == "UnsupportedEvent"
    assert "Records" in unsupported["errorMessage"]

    # Errors leave the execution environment serving, with the same model.
    assert http_body(function.invoke(load_event("http-api-health")))["model"] == "loaded"
    assert_one_load(s3)
    assert function.api.violations == []
    assert function.api.init_errors == []
    assert function.api.calls_to("GET", "/restore/next") == []
    # Credentials never reach a response, an error or the log.
    secret = FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    assert all(secret.encode() not in r.body for r in function.api.results.values())
    assert secret not in function.log()


# -- an invalid setting is an init error -----------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("LAZYSERVE_LOAD", "fast", "'lazy', 'eager' or 'background'"),
        ("LAZYSERVE_MODEL_URI", "http://x", "s3://bucket/key"),
    ],
)
def test_an_invalid_setting_is_an_init_error(
    start_function: StartFunction,
    s3: CountingS3Server,
    image: TaskImage,
    variable: str,
    value: str,
    accepted: str,
) -> None:
    function = start_function(**{variable: value})
    call = function.wait_call("POST", "/init/error")
    # awslambdaric reports an exception raised while importing the handler module (anything
    # but ImportError/SyntaxError) with the exception's class name, in the body and the header.
    error = call.json()
    assert error["errorType"] == "SettingsError"
    assert call.headers["lambda-runtime-function-error-type"] == "SettingsError"
    assert f"{variable} has value {value!r}" in error["errorMessage"]
    assert accepted in error["errorMessage"]
    # The trace runs through the task root's handler and the installed lazyserve.
    trace = "".join(error["stackTrace"])
    assert str(image.task / "handler" / "app.py") in trace
    assert str(image.site / "lazyserve" / "settings.py") in trace
    # The runtime client then exits without asking for an invocation, before any AWS call.
    assert function.process.wait(timeout=INIT_TIMEOUT) == 1
    assert function.api.calls_to("GET", "/invocation/next") == []
    assert weights_gets(s3) == []


# -- load modes under the runtime client ---------------------------------------------------------


def test_lazy_loads_on_the_first_invocation(
    start_function: StartFunction, s3: CountingS3Server
) -> None:
    function = start_function(LAZYSERVE_LOAD="lazy")
    first_next = function.wait_call("GET", "/invocation/next")
    assert first_next.observed == 0  # INIT read nothing
    time.sleep(1.0)
    assert weights_gets(s3) == []  # and nothing starts a load until a request needs it
    assert_prediction(function.invoke(load_event("direct-predict")).json())
    assert_one_load(s3)


def test_eager_loads_during_init(start_function: StartFunction, s3: CountingS3Server) -> None:
    function = start_function(LAZYSERVE_LOAD="eager")
    first_next = function.wait_call("GET", "/invocation/next")
    assert first_next.observed == LOAD_GETS  # the whole load happened before INIT ended
    assert_prediction(http_body(function.invoke(load_event("http-api-predict"))))
    assert_one_load(s3)


def test_background_loads_without_waiting_for_a_request(
    start_function: StartFunction, s3: CountingS3Server
) -> None:
    function = start_function(LAZYSERVE_LOAD="background")
    first_next = function.wait_call("GET", "/invocation/next")
    # The fetch starts before handler.app imports torch, so it is under way (at least) by the
    # time INIT ends and the runtime client first asks for an invocation.
    assert first_next.observed >= 1
    # No invocation is queued: only the load started at import can read the weights.
    function.api.wait_for(
        lambda: len(weights_gets(s3)) >= LOAD_GETS,
        INVOKE_TIMEOUT,
        what="the background load's GETs",
        abort=function.exited,
    )
    assert function.api.results == {}
    assert_prediction(http_body(function.invoke(load_event("http-api-predict"))))
    assert_one_load(s3)


def test_snap_start_loads_before_the_snapshot_and_serves_after_restore(
    start_function: StartFunction, s3: CountingS3Server
) -> None:
    # LAZYSERVE_LOAD=lazy is overridden: the snapshot must hold the loaded model.
    function = start_function(AWS_LAMBDA_INITIALIZATION_TYPE="snap-start", LAZYSERVE_LOAD="lazy")
    restore = function.wait_call("GET", "/restore/next")
    assert restore.observed == LOAD_GETS  # loaded before the "snapshot"
    first_next = function.wait_call("GET", "/invocation/next")
    assert restore.seq < first_next.seq
    assert_prediction(function.invoke(load_event("direct-predict")).json())
    assert_prediction(http_body(function.invoke(load_event("function-url-predict"))))
    assert_one_load(s3)  # no second load after the restore
    assert function.api.init_errors == []
    assert function.api.calls_to("POST", "/restore/error") == []
    assert "restored from a SnapStart snapshot" in function.log()


def test_snap_start_reports_a_model_that_cannot_load_before_the_snapshot(
    start_function: StartFunction, s3: CountingS3Server
) -> None:
    missing = f"s3://{BUCKET}/digits/missing.safetensors"
    function = start_function(
        AWS_LAMBDA_INITIALIZATION_TYPE="snap-start", LAZYSERVE_MODEL_URI=missing
    )
    call = function.wait_call("POST", "/init/error")
    # awslambdaric runs the before-snapshot hooks; the one that fails is reported as an init
    # error typed Runtime.BeforeSnapshotError in the header, the exception's class in the body.
    assert call.headers["lambda-runtime-function-error-type"] == "Runtime.BeforeSnapshotError"
    error = call.json()
    assert error["errorType"] == "ModelFetchError"
    assert "digits/missing.safetensors" in error["errorMessage"]
    assert "NoSuchKey" in error["errorMessage"]
    assert function.process.wait(timeout=INIT_TIMEOUT) == 64
    assert function.api.calls_to("GET", "/restore/next") == []
    assert function.api.calls_to("GET", "/invocation/next") == []


# -- a user's function written the documented way (examples/own_model) ----------------------

EXAMPLE_HANDLER = "examples.own_model.app.handler"
EXAMPLE_KEY = "examples/mynet.safetensors"


@pytest.fixture
def example_weights(s3: CountingS3Server, tmp_path: Path) -> str:
    """MyNet's weights in moto's S3; returns their s3:// URI."""
    from examples.own_model.make_weights import make_weights

    data = make_weights(tmp_path / "mynet.safetensors").read_bytes()
    client = boto3.client("s3", region_name=REGION, endpoint_url=s3.endpoint)
    client.put_object(Bucket=BUCKET, Key=EXAMPLE_KEY, Body=data)
    s3.clear()
    return f"s3://{BUCKET}/{EXAMPLE_KEY}"


def example_labels(function: LambdaFunction) -> Any:
    event = json.loads((ROOT / "examples" / "own_model" / "event.json").read_text())
    return http_body(function.invoke(event))["labels"]


def test_example_with_eager_is_loaded_when_init_ends(
    start_function: StartFunction, s3: CountingS3Server, example_weights: str
) -> None:
    function = start_function(
        _HANDLER=EXAMPLE_HANDLER, LAZYSERVE_MODEL_URI=example_weights, LAZYSERVE_LOAD="eager"
    )
    first_next = function.wait_call("GET", "/invocation/next")
    gets = len(s3.object_gets(BUCKET, EXAMPLE_KEY))
    assert gets >= 1
    assert first_next.observed == gets  # the whole load happened before INIT ended
    health = http_body(function.invoke(load_event("http-api-health")))
    assert health == {"status": "ok", "model": "loaded"}
    assert example_labels(function) == [0, 1]
    assert len(s3.object_gets(BUCKET, EXAMPLE_KEY)) == gets  # no second load
    assert function.api.init_errors == []


def test_example_with_background_sends_the_first_get_during_init(
    start_function: StartFunction, s3: CountingS3Server, example_weights: str
) -> None:
    function = start_function(
        _HANDLER=EXAMPLE_HANDLER,
        LAZYSERVE_MODEL_URI=example_weights,
        LAZYSERVE_LOAD="background",
    )
    first_next = function.wait_call("GET", "/invocation/next")
    # No invocation was queued yet: only the load started at interpreter start can have
    # asked S3 for the weights by the time INIT ends.
    assert first_next.observed >= 1
    assert function.api.results == {}
    assert example_labels(function) == [0, 1]
    assert function.api.init_errors == []


@pytest.mark.xfail(
    strict=True, reason="JSON log lines run together under awslambdaric's stdout sink (issue 10)"
)
def test_sqs_batch_reports_only_the_bad_records(
    start_function: StartFunction, s3: CountingS3Server
) -> None:
    function = start_function()
    batch = load_event("sqs-batch")
    result = function.invoke(batch)
    assert result.kind == "response", result.body
    # Records 2 (a 3-number row) and 3 (not JSON) fail; 1 and 4 (a real digit) succeed.
    ids = [record["messageId"] for record in batch["Records"]]
    assert result.json() == {
        "batchItemFailures": [{"itemIdentifier": ids[1]}, {"itemIdentifier": ids[2]}]
    }
    answered = [
        line for line in function.log().splitlines() if "SQS message" in line and "answered" in line
    ]
    assert len(answered) == 2
    for line, message_id in zip(answered, (ids[0], ids[3]), strict=True):
        record = json.loads(line[line.index("{") :])
        assert record["message_id"] == message_id
        assert record["answer"]["predictions"][0]["label"] == 8
    assert_one_load(s3)
