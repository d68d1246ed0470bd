"""The download helper started with the interpreter (lazyserve._boot, sources/helper.py), in real
processes: its GETs arrive while the function is still importing torch, the serving process holds
the weights once whichever process fetched them, every way the helper can fail ends in a load in
the server's own process (or in S3's answer, when a retry could not change it), and the helper
neither writes to the function's output nor outlives it for long."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from benchmarks.common import WeightsFile, weights_file
from benchmarks.s3endpoint import S3Endpoint

from lazyserve.settings import Settings
from lazyserve.sources.s3 import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE
from tests.helpers import (
    BUCKET,
    FAKE_CREDENTIALS,
    KEY,
    PART_SIZE,
    PARTS,
    ROOT,
    Gate,
    is_weights_get,
    load_event,
    s3_error_app,
    s3_uri,
)
from tests.runtime_api import RuntimeAPI
from tests.s3server import CountingS3Server, Request, WSGIApp

TIMEOUT = 120.0  # starting Python and importing torch, on a busy machine
HELPER_USED = "weights from the download helper"
MARKER = "/lazyserve-boot-marker/after-import-torch"


def process_env(endpoint: str, **overrides: str) -> dict[str, str]:
    """This venv's environment (its lazyserve.pth runs the boot) shaped like Lambda's: the
    Runtime API's variable set, fake credentials, the S3 endpoint, a background load."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAZYSERVE_"))}
    env.update(
        FAKE_CREDENTIALS,
        PYTHONPATH=str(ROOT),
        AWS_LAMBDA_RUNTIME_API="127.0.0.1:9",
        AWS_ENDPOINT_URL_S3=endpoint,
        LAZYSERVE_LOAD="background",
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),
        LAZYSERVE_LOG_LEVEL="DEBUG",
    )
    env.update(overrides)
    return env


def test_the_helper_reads_the_settings_defaults_the_app_reads() -> None:
    fields = Settings.model_fields
    assert DEFAULT_CONCURRENCY == fields["s3_concurrency"].default
    assert DEFAULT_PART_SIZE == fields["s3_part_size"].default


# --- under the Lambda runtime client: the GETs overlap `import torch` -------------------------


ORDER_FUNCTION = f"""
import os, urllib.error, urllib.request

import torch  # noqa: F401  (the import chain the download overlaps)

# A request moto logs after torch is imported: the weights' GETs should be logged before it.
try:
    urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL_S3"] + "{MARKER}", timeout=10).close()
except urllib.error.HTTPError:
    pass
from handler.app import handler  # noqa: E402,F401
"""


@pytest.fixture
def runtime_api() -> Iterator[RuntimeAPI]:
    api = RuntimeAPI(next_timeout=TIMEOUT).start()
    yield api
    api.stop()


def run_function(env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "awslambdaric", env["_HANDLER"]],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_background_gets_arrive_before_torch_is_imported(
    s3: CountingS3Server, runtime_api: RuntimeAPI, tmp_path: Path
) -> None:
    task = tmp_path / "task"
    task.mkdir()
    (task / "order_function.py").write_text(ORDER_FUNCTION)
    env = process_env(
        s3.endpoint,
        AWS_LAMBDA_RUNTIME_API=runtime_api.address,
        AWS_LAMBDA_FUNCTION_NAME="lazyserve-boot-test",
        AWS_LAMBDA_FUNCTION_MEMORY_SIZE="3008",
        AWS_EXECUTION_ENV="AWS_Lambda_python3.13",
        _HANDLER="order_function.handler",
        PYTHONPATH=os.pathsep.join([str(task), str(ROOT)]),
    )
    log = tmp_path / "function.log"
    process = run_function(env, log, task)
    try:
        request_id = runtime_api.invoke(load_event("direct-predict"), timeout=TIMEOUT)
        result = runtime_api.wait_result(request_id, TIMEOUT, abort=lambda: _exited(process, log))
    finally:
        stop(process)
    assert result.kind == "response", result.body
    assert result.json()["predictions"][0]["label"] == 8
    paths = [r.path for r in s3.requests]
    first_get = next(i for i, r in enumerate(s3.requests) if is_weights_get(r))
    assert first_get < paths.index(MARKER), paths
    # One load, made by the helper: each part once.
    gets = [r.range for r in s3.requests if is_weights_get(r)]
    assert len(gets) == len(set(gets)) == PARTS
    assert HELPER_USED in log.read_text()


def _exited(process: subprocess.Popen[bytes], log: Path) -> str | None:
    if process.poll() is None:
        return None
    return f"the function exited with {process.returncode}:\n{log.read_text()[-4000:]}"


# --- the serving process holds the weights once -----------------------------------------------


LOAD_SCRIPT = """
import json, os, sys
from lazyserve import _boot

helper = _boot.helper.pid if _boot.helper is not None else None
action = os.environ.get("BOOT_TEST_ACTION", "")
if action == "kill-helper":
    os.kill(helper, 9)  # the helper dies before it reports
elif action in ("no-memfd", "no-fork"):
    # The interpreter started lazy (no helper); now the boot runs where it cannot start one.
    def refuse(*args, **kwargs):
        raise OSError(38, "refused by the test")
    setattr(os, "memfd_create" if action == "no-memfd" else "fork", refuse)
    os.environ["LAZYSERVE_LOAD"] = "background"
    _boot.start()

import logging

import torch

from benchmarks.common import build_synthetic
from lazyserve.model import load_model
from lazyserve.settings import load_settings

logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
logging.getLogger("urllib3").setLevel(logging.WARNING)
float(torch.ones(4096).sum())  # torch's thread pools exist before the first measurement


def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssShmem")}


settings = load_settings()
before = status()
layers, width = int(os.environ["LAYERS"]), int(os.environ["WIDTH"])
loaded = load_model(lambda: build_synthetic(layers, width), settings)
sums = [float(p.sum()) for p in loaded.module.parameters()]  # reads every weight
after = status()
print(json.dumps({"helper": helper, "failure": _boot.failure, "before": before, "after": after,
                  "sha256": loaded.info.sha256, "size": loaded.info.size_bytes}))
"""


@pytest.fixture(scope="module")
def weights_64(tmp_path_factory: pytest.TempPathFactory) -> WeightsFile:
    """64 MiB of float32 weights (one 4096 x 4096 layer) and their sha256."""
    return weights_file(64, tmp_path_factory.mktemp("weights"), width=4096)


@pytest.fixture(scope="module")
def endpoint_64(weights_64: WeightsFile) -> Iterator[S3Endpoint]:
    """The benchmark S3 endpoint (keep-alive, sendfile) serving the 64 MiB weights."""
    with S3Endpoint(bandwidth=0, latency=0) as endpoint:
        endpoint.add(BUCKET, KEY, weights_64.path)
        yield endpoint


def run_script(code: str, env: dict[str, str], tmp_path: Path) -> tuple[dict[str, Any], str]:
    """Runs `code` as a script in a fresh interpreter (the .pth hook included): its last line of
    output as JSON, and its stderr."""
    script = tmp_path / "script.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize("mode", ["background", "lazy"], ids=["helper", "in-process"])
def test_the_serving_process_holds_the_weights_once(
    mode: str, weights_64: WeightsFile, endpoint_64: S3Endpoint, tmp_path: Path
) -> None:
    env = process_env(
        endpoint_64.endpoint,
        LAZYSERVE_LOAD=mode,
        LAZYSERVE_S3_PART_SIZE=str(8 * 1024 * 1024),
        LAZYSERVE_MODEL_SHA256=weights_64.sha256,
        LAYERS=str(weights_64.layers),
        WIDTH=str(weights_64.width),
    )
    out, log = run_script(LOAD_SCRIPT, env, tmp_path)
    assert out["sha256"] == weights_64.sha256
    assert (out["helper"] is not None) == (mode == "background")
    assert (HELPER_USED in log) == (mode == "background")
    # Every weight was read (summed) before `after`: all of it is resident, once.
    growth = out["after"]["VmRSS"] - out["before"]["VmRSS"]
    assert weights_64.size <= growth <= 1.10 * weights_64.size, (growth, out)
    if mode == "background":
        # The memfd's pages, mapped privately and never written: shared memory, no private copy.
        shmem = out["after"]["RssShmem"] - out["before"]["RssShmem"]
        assert shmem >= weights_64.size
        assert out["after"]["RssAnon"] - out["before"]["RssAnon"] < 0.10 * weights_64.size


# --- every failure of the helper ends in a load in the server's process -----------------------


@pytest.mark.parametrize(
    ("action", "failure"),
    [
        ("kill-helper", None),
        ("no-memfd", "no memfd for the download helper ([Errno 38] refused by the test)"),
        ("no-fork", "the download helper could not be started ([Errno 38] refused by the test)"),
    ],
)
def test_a_helper_that_fails_is_replaced_by_a_load_in_the_process(
    action: str,
    failure: str | None,
    weights_64: WeightsFile,
    endpoint_64: S3Endpoint,
    tmp_path: Path,
) -> None:
    env = process_env(
        endpoint_64.endpoint,
        LAZYSERVE_LOAD="lazy" if action.startswith("no-") else "background",
        LAZYSERVE_S3_PART_SIZE=str(8 * 1024 * 1024),
        LAZYSERVE_MODEL_SHA256=weights_64.sha256,
        LAYERS=str(weights_64.layers),
        WIDTH=str(weights_64.width),
        BOOT_TEST_ACTION=action,
    )
    out, log = run_script(LOAD_SCRIPT, env, tmp_path)
    assert out["sha256"] == weights_64.sha256
    assert out["failure"] == failure
    assert HELPER_USED not in log
    if action == "kill-helper":
        assert (
            f"the download started with the interpreter failed (the download helper (pid "
            f"{out['helper']}) was killed by signal 9); downloading again" in log
        )
    growth = out["after"]["VmRSS"] - out["before"]["VmRSS"]
    assert growth <= 1.10 * weights_64.size, (growth, out)


LOAD_DIGITS = """
import json
from handler.model import DigitsMLP
from lazyserve import _boot
from lazyserve.model import load_model
from lazyserve.settings import load_settings
helper = _boot.helper.pid if _boot.helper is not None else None
try:
    info = load_model(DigitsMLP, load_settings()).info
    print(json.dumps({"helper": helper, "sha256": info.sha256}))
except Exception as exc:
    print(json.dumps({"helper": helper, "error": type(exc).__name__, "message": str(exc)}))
"""


class FailFirst:
    """A fault: the first `count` GETs of the reference weights get `app`'s answer."""

    def __init__(self, count: int, app: WSGIApp) -> None:
        self.left, self.app = count, app

    def __call__(self, request: Request) -> WSGIApp | None:
        if not is_weights_get(request) or self.left <= 0:
            return None
        self.left -= 1
        return self.app


def test_an_error_a_retry_may_change_is_retried_in_the_process(
    s3: CountingS3Server, tmp_path: Path
) -> None:
    # The helper meets SlowDown on all its attempts at the first part; the server's own load
    # then reads the object.
    s3.fault = FailFirst(3, s3_error_app("503 Slow Down", "SlowDown"))
    out, log = run_script(LOAD_DIGITS, process_env(s3.endpoint), tmp_path)
    assert out["helper"] is not None and "sha256" in out
    assert "S3 error SlowDown" in log and "downloading again" in log
    assert len([r for r in s3.requests if is_weights_get(r)]) == 3 + PARTS


def test_an_answer_no_retry_changes_is_raised_without_a_second_download(
    s3: CountingS3Server, tmp_path: Path
) -> None:
    s3.fault = FailFirst(100, s3_error_app("404 Not Found", "NoSuchKey"))
    out, _ = run_script(LOAD_DIGITS, process_env(s3.endpoint), tmp_path)
    assert out["helper"] is not None
    assert out["error"] == "ModelMissing"  # a ModelFetchError
    assert out["message"].startswith(f"cannot read {s3_uri()}: S3 error NoSuchKey")
    assert len([r for r in s3.requests if is_weights_get(r)]) == 1


PREFETCH_TOO = """
import json, logging, sys
from handler.model import DigitsMLP
from lazyserve import _boot, prefetch
from lazyserve.model import load_model
from lazyserve.settings import load_settings
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
helper = _boot.helper.pid if _boot.helper is not None else None
settings = load_settings()
prefetch(settings)  # an app written for the in-process prefetch, as before the helper
print(json.dumps({"helper": helper, "sha256": load_model(DigitsMLP, settings).info.sha256}))
"""


def test_an_explicit_prefetch_adopts_the_helpers_download(
    s3: CountingS3Server, tmp_path: Path
) -> None:
    out, log = run_script(PREFETCH_TOO, process_env(s3.endpoint), tmp_path)
    assert out["helper"] is not None
    assert HELPER_USED in log
    gets = [r.range for r in s3.requests if is_weights_get(r)]
    assert len(gets) == len(set(gets)) == PARTS  # one download, not two


# --- the helper writes nothing to the function's output and ends with it -------------------------


PARENT_EXITS = """
import os, sys
from lazyserve import _boot
print(f"parent {_boot.helper.pid}", flush=True)
sys.stdin.readline()  # the test has seen the helper's first GET arrive (and holds it)
os._exit(0)  # the function dies
"""


def test_the_helper_ends_when_the_function_dies_and_never_writes_its_output(
    s3: CountingS3Server, gate: Gate, tmp_path: Path
) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_EXITS)
    process = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=process_env(s3.endpoint),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        pid = int(process.stdout.readline().removeprefix("parent "))
        _wait(lambda: gate.held >= 1, "the helper's first GET")
        # The helper holds none of the function's output: reading it to the end returns as
        # soon as the function exits, while the helper still waits for S3.
        out, err = process.communicate("go\n", timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    assert (out, err) == ("", "")
    _wait(lambda: not _alive(pid), f"the helper (pid {pid}) to end after the function")
    # It ended because its parent did, not by giving up on S3: its first GET, still held by
    # the gate, is the only one it sent (its timeouts would have made it try three times).
    assert gate.held == 1


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60  # a bound for a broken helper, not a timing goal
    while not condition():
        assert time.monotonic() < deadline, f"waited 60 s for {what}"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (not gone, and not a zombie waiting for whoever adopted it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def test_no_helper_outside_lambda_or_for_a_lazy_load(s3: CountingS3Server, tmp_path: Path) -> None:
    probe = "from lazyserve import _boot; print(_boot.helper is None, _boot.failure)"
    for overrides in ({"LAZYSERVE_LOAD": "lazy"}, {"AWS_LAMBDA_RUNTIME_API": ""}):
        env = process_env(s3.endpoint, **overrides)
        if not env["AWS_LAMBDA_RUNTIME_API"]:
            del env["AWS_LAMBDA_RUNTIME_API"]
        done = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        )
        assert done.stdout.split() == ["True", "None"]
    assert [r for r in s3.requests if is_weights_get(r)] == []
