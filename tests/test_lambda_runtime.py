"""The function run the way the Lambda image runs it: the package pip-installed (not editable),
`handler/` in a separate task root, `python -m awslambdaric handler.app.handler` as a real
process, talking to the Runtime API in tests/runtime_api.py, the weights in moto's S3 server."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.helpers import (
    BUCKET,
    FAKE_CREDENTIALS,
    INIT_TIMEOUT,
    INVOKE_TIMEOUT,
    KEY,
    REGION,
    ROOT,
    WEIGHTS,
    LambdaFunction,
    StartFunction,
    TaskImage,
    assert_prediction,
    error_of,
    http_body,
    lambda_environ,
    load_event,
)
from tests.s3server import CountingS3Server

PART_SIZE = 16384
WEIGHTS_BYTES = WEIGHTS.read_bytes()
WEIGHTS_SHA256 = hashlib.sha256(WEIGHTS_BYTES).hexdigest()
LOAD_GETS = math.ceil(len(WEIGHTS_BYTES) / PART_SIZE)  # ranged GETs of one load
EXPECTED_RANGES = {
    f"bytes={start}-{min(start + PART_SIZE, len(WEIGHTS_BYTES)) - 1}"
    for start in range(0, len(WEIGHTS_BYTES), PART_SIZE)
}
DIGIT = 8  # the label of the image in every stored predict event
HTTP_PREDICT = ["rest-predict", "http-api-predict", "alb-predict", "function-url-predict"]


def weights_gets(s3: CountingS3Server) -> list[Any]:
    return s3.object_gets(BUCKET, KEY)


def assert_one_load(s3: CountingS3Server) -> None:
    """Exactly one load's worth of ranged GETs: each part of the object read once."""
    gets = weights_gets(s3)
    assert len(gets) == LOAD_GETS, [g.range for g in gets]
    assert {g.range for g in gets} == EXPECTED_RANGES


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
    assert error["errorType"] == "ModelMissing"  # a ModelFetchError: no object is there
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
