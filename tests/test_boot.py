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
from benchmarks.common import WeightsFile, pushed, weights_file
from benchmarks.s3endpoint import S3Endpoint

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
PUSHED_KEY = "models/pushed.safetensors"
MARKER = "/lazyserve-boot-marker/after-import-torch"


def process_env(endpoint: str, **overrides: str) -> dict[str, str]:
    """This venv's environment (its lazyserve.pth runs the boot) shaped like Lambda's: the
    Runtime API's variable set, fake credentials, the S3 endpoint, a background load."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAZYSERVE_"))}
    env.update(
        FAKE_CREDENTIALS,
        # This checkout's code, not whichever the environment's editable install points at.
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        AWS_LAMBDA_RUNTIME_API="127.0.0.1:9",
        AWS_ENDPOINT_URL_S3=endpoint,
        LAZYSERVE_LOAD="background",
        LAZYSERVE_MODEL_URI=s3_uri(),
        LAZYSERVE_S3_PART_SIZE=str(PART_SIZE),
        LAZYSERVE_LOG_LEVEL="DEBUG",
    )
    env.update(overrides)
    return env


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
        PYTHONPATH=os.pathsep.join([str(task), str(ROOT / "src"), str(ROOT)]),
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
from lazyserve.sources import helper as helpers

helper = int(os.environ["_LAZYSERVE_HELPER"]) if "_LAZYSERVE_HELPER" in os.environ else None
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
# The S3 client's own imports (botocore signs and resolves) come before the measurement: it
# compares the weights with what they cost in memory.
from lazyserve.sources import head
head(settings.uri)
before = status()
layers, width = int(os.environ["LAYERS"]), int(os.environ["WIDTH"])
loaded = load_model(lambda: build_synthetic(layers, width), settings)
sums = [float(p.sum()) for p in loaded.module.parameters()]  # reads every weight
after = status()
print(json.dumps({"helper": helper, "failure": helpers.failure(), "before": before, "after": after,
                  "sha256": loaded.info.sha256, "size": loaded.info.size_bytes,
                  "verified_by": loaded.info.verified_by}))
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
        # The same file as `lazyserve push` stores it: with its sha256 and CRCs.
        endpoint.add(BUCKET, PUSHED_KEY, weights_64.path, metadata=pushed(weights_64.path))
        yield endpoint


def runtime_script(code: str, env: dict[str, str], tmp_path: Path) -> Path:
    """`code` written where a managed runtime keeps its bootstrap: the interpreter that runs it is
    the runtime's own process, as the start-up download recognises it (the .pth hook runs)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(exist_ok=True)
    script = runtime / "bootstrap.py"
    script.write_text(code)
    env["LAMBDA_RUNTIME_DIR"] = str(runtime)
    return script


def run_script(code: str, env: dict[str, str], tmp_path: Path) -> tuple[dict[str, Any], str]:
    """Runs `code` as the runtime's own script in a fresh interpreter: its last line of output
    as JSON, and its stderr."""
    script = runtime_script(code, env, tmp_path)
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


@pytest.mark.parametrize("where", ["helper", "thread"])
def test_the_start_up_download_checks_the_crc_push_stored(
    where: str, weights_64: WeightsFile, endpoint_64: S3Endpoint, tmp_path: Path
) -> None:
    # No digest pinned: the helper process, or the thread on one vCPU, checks the stored
    # CRC64NVME instead of hashing, and the load reports the sha256 stored beside it.
    one_vcpu = {"AWS_LAMBDA_FUNCTION_NAME": "lazyserve-boot-test"}
    one_vcpu["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] = "1769"
    env = process_env(
        endpoint_64.endpoint,
        LAZYSERVE_MODEL_URI=f"s3://{BUCKET}/{PUSHED_KEY}",
        LAYERS=str(weights_64.layers),
        WIDTH=str(weights_64.width),
        **(one_vcpu if where == "thread" else {}),
    )
    out, log = run_script(LOAD_SCRIPT if where == "helper" else THREAD_SCRIPT, env, tmp_path)
    assert HELPER_USED in log
    assert (out["sha256"], out["verified_by"]) == (weights_64.sha256, "crc64nvme")


THREAD_SCRIPT = """
import json, os, threading

threads = [t.name for t in threading.enumerate()]  # what the interpreter's start left running
import logging, sys

from benchmarks.common import build_synthetic
from lazyserve.model import load_model
from lazyserve.settings import load_settings


def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem")}


logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(message)s")
logging.getLogger("urllib3").setLevel(logging.WARNING)
before = status()
layers, width = int(os.environ["LAYERS"]), int(os.environ["WIDTH"])
loaded = load_model(lambda: build_synthetic(layers, width), load_settings())
sums = [float(p.sum()) for p in loaded.module.parameters()]  # reads every weight
print(json.dumps({"mark": os.environ.get("_LAZYSERVE_HELPER"), "threads": threads,
                  "before": before, "after": status(), "sha256": loaded.info.sha256,
                  "verified_by": loaded.info.verified_by}))
"""


def test_with_one_vcpu_the_download_runs_in_a_thread_of_the_function(
    weights_64: WeightsFile, endpoint_64: S3Endpoint, tmp_path: Path
) -> None:
    # Lambda gives one vCPU's worth of CPU time at 1,769 MB: no process is forked, the
    # download starts in a thread as the interpreter starts, and the load takes it.
    env = process_env(
        endpoint_64.endpoint,
        AWS_LAMBDA_FUNCTION_NAME="lazyserve-boot-test",
        AWS_LAMBDA_FUNCTION_MEMORY_SIZE="1769",
        LAZYSERVE_S3_PART_SIZE=str(8 * 1024 * 1024),
        LAZYSERVE_MODEL_SHA256=weights_64.sha256,
        LAYERS=str(weights_64.layers),
        WIDTH=str(weights_64.width),
    )
    endpoint_64.clear_log()
    out, log = run_script(THREAD_SCRIPT, env, tmp_path)
    assert out["sha256"] == weights_64.sha256
    assert out["mark"] == "thread"
    assert "lazyserve-download" in out["threads"]
    assert "weights from the download helper (a thread of this process)" in log
    # One download (each part once), into this process's own memory, not a shared memfd.
    gets = [r.range or "" for r in endpoint_64.requests if r.method == "GET"]
    spans = [tuple(map(int, g.removeprefix("bytes=").split("-"))) for g in gets]
    assert len(gets) == len(set(gets))
    assert sum(end - start + 1 for start, end in spans) == weights_64.size
    assert out["after"]["RssAnon"] - out["before"]["RssAnon"] < 0.10 * weights_64.size
    assert out["after"]["RssShmem"] - out["before"]["RssShmem"] < 0.01 * weights_64.size


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
import json, os
from handler.model import DigitsMLP
from lazyserve.model import load_model
from lazyserve.settings import load_settings
helper = os.environ.get("_LAZYSERVE_HELPER")
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


# --- the helper writes nothing to the function's output and ends with it -------------------------


PARENT_EXITS = """
import os, sys
print(f"parent {os.environ['_LAZYSERVE_HELPER']}", flush=True)
sys.stdin.readline()  # the test has seen the helper's first GET arrive (and holds it)
os._exit(0)  # the function dies
"""


def test_the_helper_ends_when_the_function_dies_and_never_writes_its_output(
    s3: CountingS3Server, gate: Gate, tmp_path: Path
) -> None:
    env = process_env(s3.endpoint)
    script = runtime_script(PARENT_EXITS, env, tmp_path)
    process = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
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


PROBE = """
import json, os
from lazyserve.sources import helper
print(json.dumps({"helper": os.environ.get("_LAZYSERVE_HELPER"), "failure": helper.failure()}))
"""


@pytest.mark.parametrize(
    "overrides",
    [
        {"LAZYSERVE_LOAD": "lazy"},
        {"LAZYSERVE_PREFETCH": "off"},
        {"AWS_LAMBDA_RUNTIME_API": ""},
        {"LAZYSERVE_S3_CONCURRENCY": "0"},  # invalid: the app reports it, nothing starts
    ],
    ids=["lazy", "prefetch-off", "not-lambda", "bad-setting"],
)
def test_no_helper_where_the_settings_do_not_ask_for_one(
    overrides: dict[str, str], s3: CountingS3Server, tmp_path: Path
) -> None:
    env = process_env(s3.endpoint, **overrides)
    if not env["AWS_LAMBDA_RUNTIME_API"]:
        del env["AWS_LAMBDA_RUNTIME_API"]
    out, _ = run_script(PROBE, env, tmp_path)
    assert out == {"helper": None, "failure": None}
    assert [r for r in s3.requests if is_weights_get(r)] == []


@pytest.mark.parametrize(
    "command",
    [
        ["-c", PROBE],  # a shell command, an extension written in Python
        ["-m", "pip", "--version"],
        ["-S", "-c", "import lazyserve.settings, lazyserve.sources, lazyserve._boot; print('{}')"],
    ],
    ids=["python-c", "pip", "no-site-import"],
)
def test_other_processes_in_the_environment_start_nothing(
    command: list[str], s3: CountingS3Server
) -> None:
    # The same Lambda environment as the runtime's own process, asking for a background load:
    # only the runtime's process (python -m awslambdaric, or $LAMBDA_RUNTIME_DIR/bootstrap.py)
    # may start the download.
    env = process_env(s3.endpoint)
    if command[0] == "-S":  # no site-packages: the library from the source tree, stdlib only
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    before = _children()
    done = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "_LAZYSERVE_HELPER" not in done.stdout
    assert [r for r in s3.requests if is_weights_get(r)] == []
    assert _children() == before


def _children() -> set[int]:
    """This test process's children (a helper that outlived its parent would be re-parented, so
    the weights GETs are the sure sign; this catches one still starting)."""
    me = os.getpid()
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            found.add(int(stat.parent.name))
    return found


UNCLAIMED = """
import json, os, time
from lazyserve import Service, Settings
from handler.model import DigitsMLP

helper = int(os.environ["_LAZYSERVE_HELPER"])
fds = len(os.listdir("/proc/self/fd"))
# The app serves another model than the environment named: the helper's download is not for it.
settings = Settings(model_uri=os.environ["OTHER_URI"])
service = Service(DigitsMLP, settings=settings, autostart=False)
if os.path.exists(f"/proc/{helper}"):
    state = open(f"/proc/{helper}/stat").read().rsplit(")", 1)[1].split()[0]
else:
    state = "gone"
freed = fds - len(os.listdir("/proc/self/fd"))
print(json.dumps({"helper": helper, "state": state, "fds_freed": freed}))
"""


def test_an_unclaimed_helper_is_stopped_reaped_and_freed_when_the_app_reads_its_settings(
    s3: CountingS3Server, gate: Gate, tmp_path: Path
) -> None:
    env = process_env(s3.endpoint, OTHER_URI=str(ROOT / "handler/weights/digits.safetensors"))
    out, _ = run_script(UNCLAIMED, env, tmp_path)
    assert out["state"] == "gone"  # killed and reaped: not a zombie
    assert out["fds_freed"] == 2  # the memfd and the report pipe
