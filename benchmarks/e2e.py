"""End-to-end cold start as a Lambda user sees it: a function run by AWS's runtime interface
client (`python -m awslambdaric`), from the process's start to its first response, with the
weights on local disk (the floor, plain and with the `gc.freeze()` lazyserve does at INIT),
downloaded with boto3 at import, or loaded by lazyserve.

Each trial is a fresh function process talking to a Runtime API on 127.0.0.1
(tests/runtime_api.py) that already holds one HTTP API `POST /predict` event, so the event
leaves the moment INIT ends; the weights live on the benchmark S3 endpoint (s3endpoint.py).
With `--cpus 1` the function runs under `taskset -c 0` and this process (the endpoint and the
Runtime API) on the other CPUs: Lambda gives a function one vCPU's worth of CPU at 1,769 MB.

`python -m benchmarks.e2e --sizes 69K 128M --repeats 7 [--cpus 1]`
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.runtime_api import RuntimeAPI

from benchmarks.common import BUCKET, LAYER_MIB, ROOT, pushed, weights_file
from benchmarks.s3endpoint import DEFAULT_BANDWIDTH, DEFAULT_LATENCY, S3Endpoint, _Handler

VARIANTS = ("floor", "floor_frozen", "download_file", "lazy", "background", "eager", "local")
HANDLERS = {
    "floor": "benchmarks.e2e_apps.floor.handler",
    "floor_frozen": "benchmarks.e2e_apps.floor_frozen.handler",
    "download_file": "benchmarks.e2e_apps.download.handler",
    "lazy": "benchmarks.e2e_apps.lazyserve_app.handler",
    "background": "benchmarks.e2e_apps.lazyserve_app.handler",
    "eager": "benchmarks.e2e_apps.lazyserve_app.handler",
    "local": "benchmarks.e2e_apps.lazyserve_app.handler",
}
# A transformers directory's functions: the floor is transformers' own from_pretrained.
HF_HANDLERS = {
    "floor": "benchmarks.e2e_apps.floor_hf.handler",
    "lazy": "benchmarks.e2e_apps.lazyserve_hf.handler",
    "background": "benchmarks.e2e_apps.lazyserve_hf.handler",
    "eager": "benchmarks.e2e_apps.lazyserve_hf.handler",
    "local": "benchmarks.e2e_apps.lazyserve_hf.handler",
}
DIGITS = "69K"  # the reference digits weights, handler/weights/digits.safetensors
BERT = "BERT"  # BERT-base (default BertConfig, random weights, about 440 MB), save_pretrained
BERT_TINY = "BERT-TINY"  # the same with 32 hidden units and one layer (about 4 MB): --quick
BERT_DIRS = {
    BERT: Path("/tmp/lazyserve-bench-bert-base"),
    BERT_TINY: Path("/tmp/lazyserve-bench-bert-tiny"),
}
BERT_PREFIX = "bert/"
DIGITS_WEIGHTS = ROOT / "handler" / "weights" / "digits.safetensors"
EVENT = ROOT / "events" / "http-api-predict.json"
TRIAL_TIMEOUT = 120.0
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIABENCHBENCHBENCH0",
    "AWS_SECRET_ACCESS_KEY": "bench/fake/secret/key/not/a/real/one/000",
    "AWS_SESSION_TOKEN": "bench-fake-session-token",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


# --- the weights and the event --------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One weights file, the event that asks the function for a prediction, and its answer."""

    label: str  # "69K", "128M", "BERT"
    path: Path  # the weights file, or a transformers model's directory
    size: int  # bytes of weights
    layers: int  # 0: the digits MLP
    event: dict[str, Any]
    expected: list[dict[str, float]]  # the predictions, computed here with the same forward
    directory: bool = False  # a save_pretrained directory, served under BERT_PREFIX

    @property
    def key(self) -> str:
        """The weights object's key on the stand-in."""
        return BERT_PREFIX + "model.safetensors" if self.directory else self.path.name

    def handler(self, variant: str) -> str:
        handlers = HF_HANDLERS if self.directory else HANDLERS
        if variant not in handlers:
            raise ValueError(f"variant {variant!r} does not apply to {self.label}")
        return handlers[variant]


def workload(label: str) -> Workload:
    """`69K` (the reference digits weights), `<N>M`, N MiB of synthetic Linear(4096, 4096)
    layers (a multiple of 64, written once to benchmarks/data/), or `BERT` / `BERT-TINY`, a
    save_pretrained directory (written once to /tmp)."""
    spec = label.upper()
    if spec in BERT_DIRS:
        return _bert_workload(spec)
    if spec in (DIGITS, "DIGITS"):
        path, layers, label = DIGITS_WEIGHTS, 0, DIGITS
        # The reference event: one 8x8 image of an 8.
        event = json.loads(EVENT.read_text())
        rows = json.loads(base64.b64decode(event["body"]))["inputs"]
    elif spec.endswith("M") and spec[:-1].isdigit() and int(spec[:-1]) % LAYER_MIB == 0:
        wf = weights_file(int(spec[:-1]))
        path, layers = wf.path, wf.layers
        rows = [[(i * 7) % 17 for i in range(4096)]]  # one row of 0..16, as wide as the model
        event = copy.deepcopy(json.loads(EVENT.read_text()))
        event["body"] = base64.b64encode(json.dumps({"inputs": rows}).encode()).decode()
    else:
        raise ValueError(
            f"size {label!r} is not supported; accepted: {DIGITS} (the digits weights) or "
            f"<N>M with N a multiple of {LAYER_MIB}, e.g. 128M"
        )
    from benchmarks.e2e_apps.common import infer, load_local

    answer = infer(load_local(str(path), layers), rows).model_dump()["predictions"]
    return Workload(label, path, path.stat().st_size, layers, event, answer)


def _bert_workload(label: str) -> Workload:
    from transformers import AutoModel, BertConfig

    from benchmarks import pretrained
    from benchmarks.e2e_apps import hf_common

    tiny = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    directory = pretrained.model_dir(BERT_DIRS[label], tiny if label == BERT_TINY else None)
    ids = [[101, *((i * 37) % 1000 + 1000 for i in range(hf_common.TOKENS - 2)), 102]]
    event = copy.deepcopy(json.loads(EVENT.read_text()))
    event["body"] = base64.b64encode(json.dumps({"input_ids": ids}).encode()).decode()
    model = AutoModel.from_pretrained(directory, local_files_only=True).eval()
    answer = hf_common.infer(model, ids).model_dump()["predictions"]
    size = (directory / pretrained.WEIGHTS).stat().st_size
    return Workload(label, directory, size, 0, event, answer, directory=True)


def serve(s3: S3Endpoint, work: Workload) -> None:
    """Put the workload's weights (every file of a directory) on the stand-in."""
    if not work.directory:
        s3.add(BUCKET, work.key, work.path, metadata=pushed(work.path))
        return
    for path in sorted(work.path.rglob("*")):
        if path.is_file():
            key = BERT_PREFIX + path.relative_to(work.path).as_posix()
            s3.add(BUCKET, key, path, metadata=pushed(path))


# --- the S3 endpoint, with arrival times ----------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    method: str
    path: str
    at: float  # time.monotonic() when the request line was read
    done: float  # ... when the response was sent


class TimedS3Endpoint(S3Endpoint):
    """The benchmark endpoint, also noting when each request arrived and when it was answered
    (S3Endpoint.requests records neither)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.arrivals: list[Arrival] = []
        arrivals, lock = self.arrivals, threading.Lock()

        class Handler(_Handler):
            def _serve(self, *, body: bool) -> None:
                at = time.monotonic()
                super()._serve(body=body)
                with lock:
                    arrivals.append(Arrival(self.command, self.path, at, time.monotonic()))

        self._server.RequestHandlerClass = Handler

    def __enter__(self) -> TimedS3Endpoint:
        self.start()
        return self

    def object_arrivals(self, bucket: str, key: str, method: str = "GET") -> list[Arrival]:
        path = f"/{bucket}/{key}"
        found = [a for a in self.arrivals if a.method == method and a.path.split("?")[0] == path]
        return sorted(found, key=lambda a: a.at)


# --- one trial ------------------------------------------------------------------------------


@dataclass
class Trial:
    variant: str
    size: str  # the workload's label
    repeat: int
    init: float  # process start -> the runtime client's first GET /invocation/next
    invoke: float  # that GET (the event leaves at once) -> the response POSTed
    total: float  # process start -> the response POSTed
    first_get: float | None  # process start -> the first GET of the weights at the endpoint
    last_byte: float | None  # process start -> the last GET of the weights answered
    gets: int  # GETs of the weights
    cpu: float = 0.0  # CPU seconds (user + system, all threads) the function used to the response,
    # its reaped children included (the download helper, which the load reaps before it answers)
    children_cpu: float = 0.0  # ... of which its reaped children's


def lambda_env(runtime_api: str, handler: str, *, one_cpu: bool = False) -> dict[str, str]:
    """The variables Lambda sets for a python3.13 container-image function (not inherited from
    this process: nothing of the benchmark's own environment leaks in)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "en_US.UTF-8",
        "TZ": ":UTC",
        # This checkout's code (src first: an editable install may point at another checkout).
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        # run() compiled the project's modules; site-packages were compiled by pip. Nothing is
        # written during the trials, so every trial imports the same .pyc files.
        "PYTHONDONTWRITEBYTECODE": "1",
        "LAMBDA_TASK_ROOT": str(ROOT),
        "_HANDLER": handler,
        "AWS_LAMBDA_RUNTIME_API": runtime_api,
        # As in the python3.13 base image; awslambdaric then polls /next from a thread.
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
        "AWS_LAMBDA_FUNCTION_NAME": "lazyserve-bench",
        # One vCPU's worth of CPU time at 1,769 MB; 3,008 MB shows two.
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1769" if one_cpu else "3008",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/lazyserve-bench",
        "AWS_LAMBDA_LOG_STREAM_NAME": "2026/01/01/[$LATEST]0123456789abcdef0123456789abcdef",
        **FAKE_AWS,
    }


def variant_env(variant: str, work: Workload, s3: str, tmp: Path) -> dict[str, str]:
    uri = f"s3://{BUCKET}/{work.key}"
    env = {"AWS_ENDPOINT_URL_S3": s3, "BENCH_E2E_LAYERS": str(work.layers)}
    if work.directory:
        env["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded from the Hub
        if variant == "floor":
            env["BENCH_E2E_HF_DIR"] = str(work.path)
        elif variant == "local":
            env["LAZYSERVE_MODEL_URI"] = f"{work.path}/"
            env["LAZYSERVE_LOAD"] = "background"
        else:
            env["LAZYSERVE_MODEL_URI"] = f"s3://{BUCKET}/{BERT_PREFIX}"
            env["LAZYSERVE_LOAD"] = variant
        return env
    if variant == "local":
        env["LAZYSERVE_MODEL_URI"] = str(work.path)
        env["LAZYSERVE_LOAD"] = "background"
    elif variant in ("floor", "floor_frozen"):
        env["BENCH_E2E_WEIGHTS"] = str(work.path)
    elif variant == "download_file":
        env["BENCH_E2E_S3_URI"] = uri
        env["BENCH_E2E_DOWNLOAD_TO"] = str(tmp / work.key)
    else:
        env["LAZYSERVE_MODEL_URI"] = uri
        env["LAZYSERVE_LOAD"] = variant
    return env


def check_answer(variant: str, work: Workload, payload: dict[str, Any]) -> None:
    """A 200 from the app, with the predictions this process computed (label exact,
    probability to 1e-4: thread counts may change the last bits)."""
    if payload.get("statusCode") != 200:
        raise AssertionError(f"{variant} ({work.label}): answered {payload!r:.2000}")
    got = json.loads(payload["body"])["predictions"]
    ok = len(got) == len(work.expected) and all(
        g["label"] == e["label"] and abs(g["probability"] - e["probability"]) <= 1e-4
        for g, e in zip(got, work.expected, strict=False)
    )
    if not ok:
        raise AssertionError(f"{variant} ({work.label}): predicted {got}, expected {work.expected}")


def trial(
    variant: str,
    work: Workload,
    s3: TimedS3Endpoint,
    *,
    cpu: int | None = None,
    repeat: int = 0,
    extra_env: Mapping[str, str] | None = None,
) -> Trial:
    """One cold start: a fresh function process (on CPU `cpu` only, if given), its first
    invocation, then it is stopped. `extra_env` adds or replaces the function's variables
    (for profiling runs, e.g. a PYTHONPATH that puts a tracing sitecustomize first)."""
    handler = work.handler(variant)
    cmd = [sys.executable, "-m", "awslambdaric", handler]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    s3.arrivals.clear()
    api = RuntimeAPI(next_timeout=TRIAL_TIMEOUT).start()
    # Queued before the process starts: the event leaves as soon as INIT ends.
    request_id = api.invoke(work.event, timeout=TRIAL_TIMEOUT)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        env = {
            **lambda_env(api.address, handler, one_cpu=cpu is not None),
            **variant_env(variant, work, s3.endpoint, Path(tmp)),
            "HOME": tmp,
            **(extra_env or {}),
        }
        log_path = Path(tmp) / "function.log"
        with open(log_path, "wb") as log:
            started = time.monotonic()
            process = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

        def exited() -> str | None:
            code = process.poll()
            if code is None:
                return None
            return f"{variant} exited with {code}:\n{log_path.read_text()[-4000:]}"

        try:
            result = api.wait_result(request_id, TRIAL_TIMEOUT, abort=exited)
            cpu_seconds, children_seconds = _cpu_seconds(process.pid)
            # The runtime client asks for the next event once it has read the answer to its
            # POST; stopping it earlier would cut that exchange (a reset in the Runtime API).
            api.wait_call("GET", "/invocation/next", TRIAL_TIMEOUT, count=2, abort=exited)
        finally:
            api.stop()  # the waiting /next gets an error: the runtime client exits on its own
            _stop(process)
    if result.kind != "response":
        raise AssertionError(f"{variant} ({work.label}) failed: {result.body[:2000]!r}")
    check_answer(variant, work, result.json())
    first_next = api.calls_to("GET", "/invocation/next")[0]
    (posted,) = api.calls_to("POST", f"/invocation/{request_id}/response")
    gets = s3.object_arrivals(BUCKET, work.key)
    return Trial(
        variant=variant,
        size=work.label,
        repeat=repeat,
        init=first_next.at - started,
        invoke=posted.at - first_next.at,
        total=posted.at - started,
        first_get=gets[0].at - started if gets else None,
        last_byte=max(g.done for g in gets) - started if gets else None,
        gets=len(gets),
        cpu=cpu_seconds,
        children_cpu=children_seconds,
    )


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU time of a running process, all its threads, and of the children it
    has waited for; and the children's alone (clock ticks, 10 ms)."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name, in parentheses, may hold spaces: count fields after it.
        fields = stat.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    children = (int(fields[13]) + int(fields[14])) / tick
    return (int(fields[11]) + int(fields[12])) / tick + children, children


def _stop(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def pinned(cpus: int) -> Iterator[int | None]:
    """With one CPU for the function, yield that CPU and keep this thread (and the endpoint
    and Runtime API threads it starts, which inherit its affinity) on the others."""
    if cpus == 2:
        yield None
        return
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        raise RuntimeError(f"--cpus 1 needs two CPUs (one for the function), found {before}")
    cpu = min(before)
    os.sched_setaffinity(0, before - {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


# --- the run --------------------------------------------------------------------------------


@dataclass
class E2EResults:
    cpus: int
    bandwidth: float
    latency: float
    repeats: int
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)  # os.getloadavg() at the start
    trials: list[Trial] = field(default_factory=list)

    def sizes(self) -> list[str]:
        return list(dict.fromkeys(t.size for t in self.trials))

    def variants(self, size: str) -> list[str]:
        found = {t.variant for t in self.trials if t.size == size}
        return [v for v in VARIANTS if v in found]

    def median(self, variant: str, size: str, get: Callable[[Trial], float | None]) -> float | None:
        values = [get(t) for t in self.trials if t.variant == variant and t.size == size]
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    def spread(self, variant: str, size: str) -> tuple[float, float] | None:
        """The fastest and slowest total of a variant: how far one process start is from the
        next on this machine (the import chain alone varies by a few tenths of a second)."""
        totals = [t.total for t in self.trials if t.variant == variant and t.size == size]
        return (min(totals), max(totals)) if totals else None

    def paired(self, variant: str, size: str, against: str = "floor") -> float | None:
        """The median, over repeats, of variant's total ÷ `against`'s total in the same repeat:
        both ran back to back, so a slow stretch of the machine weighs on both."""
        by_repeat = {
            t.repeat: t.total for t in self.trials if t.variant == against and t.size == size
        }
        ratios = [
            t.total / by_repeat[t.repeat]
            for t in self.trials
            if t.variant == variant and t.size == size and t.repeat in by_repeat
        ]
        return statistics.median(ratios) if ratios else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> E2EResults:
        data = dict(data)
        trials = [Trial(**t) for t in data.pop("trials")]
        return cls(**{**data, "load": tuple(data["load"])}, trials=trials)


def precompile() -> None:
    """Compile the project's modules once: with PYTHONDONTWRITEBYTECODE set (as on this
    machine) they would otherwise be compiled again in every process, and lazyserve's variants
    import more of them than the floor does."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "src", "handler", "benchmarks"],
        cwd=ROOT,
        check=True,
        timeout=300,
    )


def run(
    sizes: Sequence[str] = (DIGITS, "128M"),
    *,
    repeats: int = 5,
    variants: Sequence[str] = VARIANTS,
    cpus: int = 2,
    warmup: bool = True,
    bandwidth: float = DEFAULT_BANDWIDTH,
    latency: float = DEFAULT_LATENCY,
    log: Callable[[str], None] = print,
) -> E2EResults:
    """Every variant for every size, `repeats` times, the variants' order rotating; with
    `warmup`, one untimed round per size first (page cache, lazily created files)."""
    if cpus not in (1, 2):
        raise ValueError(f"cpus is {cpus}; accepted: 1 (taskset -c 0) or 2 (no pinning)")
    precompile()
    works = [workload(size) for size in sizes]
    results = E2EResults(cpus, bandwidth, latency, repeats, os.getloadavg())
    with pinned(cpus) as cpu, TimedS3Endpoint(bandwidth=bandwidth, latency=latency) as s3:
        for work in works:
            serve(s3, work)
            # The variants that apply: a directory has no frozen floor nor download_file.
            mine = [v for v in variants if v in (HF_HANDLERS if work.directory else HANDLERS)]
            if warmup:
                for variant in mine:
                    trial(variant, work, s3, cpu=cpu, repeat=-1)
            for repeat in range(repeats):
                shift = repeat % len(mine)
                for variant in [*mine[shift:], *mine[:shift]]:
                    t = trial(variant, work, s3, cpu=cpu, repeat=repeat)
                    results.trials.append(t)
                    get = "" if t.first_get is None else f"  first GET {t.first_get:6.3f}"
                    log(
                        f"  {cpus} CPU {work.label:>5} {variant:<13} init {t.init:6.3f}  "
                        f"invoke {t.invoke:6.3f}  total {t.total:6.3f}  cpu {t.cpu:6.2f} "
                        f"(children {t.children_cpu:4.2f}){get}  "
                        f"(repeat {repeat + 1})"
                    )
    return results


def table(results: E2EResults) -> str:
    """A markdown table of the medians, seconds from the function process's start."""
    lines = [
        "| size | variant | INIT s | first invocation s | total s | total ÷ floor "
        "| same-repeat ÷ floor | total fastest to slowest s "
        "| first GET of the weights at s | last byte at s | function CPU s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {
        "floor": "floor (weights on local disk)",
        "floor_frozen": "floor + `gc.freeze()` after its imports, as lazyserve does",
        "download_file": "boto3 download_file at import",
        "lazy": "lazyserve `lazy`",
        "background": "lazyserve `background`",
        "eager": "lazyserve `eager`",
        "local": "lazyserve `background`, weights on local disk",
    }

    def fmt(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    for size in results.sizes():
        floor = results.median("floor", size, lambda t: t.total)
        for variant in results.variants(size):

            def med(
                get: Callable[[Trial], float | None], variant: str = variant, size: str = size
            ) -> float | None:
                return results.median(variant, size, get)

            total = med(lambda t: t.total)
            ratio = "n/a" if floor is None or total is None else f"{total / floor:.2f}"
            spread = results.spread(variant, size)
            lines.append(
                f"| {size} | {names[variant]} | {fmt(med(lambda t: t.init))} "
                f"| {fmt(med(lambda t: t.invoke))} | {fmt(total)} | {ratio} "
                f"| {fmt(results.paired(variant, size), 2)} "
                f"| {'n/a' if spread is None else f'{spread[0]:.2f} to {spread[1]:.2f}'} "
                f"| {fmt(med(lambda t: t.first_get))} | {fmt(med(lambda t: t.last_byte))} "
                f"| {fmt(med(lambda t: t.cpu), 2)} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__)
    parser.add_argument(
        "--sizes", nargs="+", default=[DIGITS, "128M"], help="69K, <N>M, BERT or BERT-TINY"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpus", type=int, nargs="+", default=[2], choices=(1, 2))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", type=Path, help="also write the trials here")
    args = parser.parse_args(argv)
    runs = []
    for cpus in args.cpus:
        results = run(args.sizes, repeats=args.repeats, variants=args.variants, cpus=cpus)
        runs.append(results)
        one, five, fifteen = results.load
        print(f"\n{cpus} vCPU(s); load average at the start {one:.2f} / {five:.2f} / {fifteen:.2f}")
        print(table(results))
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
