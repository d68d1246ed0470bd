"""Batched (`@service.predict_batch`) against single (`@service.predict`) prediction, with a BERT
text classifier (benchmarks/batching_app.py; BERT-base: hidden 768, 12 layers, 110 M parameters,
418 MiB of float32, random weights written once to --dir) and texts of 14 words (16 tokens).

1. uvicorn, one process a function (uvicorn's defaults), both up for the whole run. At --clients
   concurrent clients: requests/s and p50, in --rounds rounds a function, the functions taking
   turns, so what else the machine runs weighs on both alike. At 1 client: p50, the client's
   requests alternating between the two functions. The load comes from an httpx/anyio client
   in a process of its own (wrk, which uvicorn_load.py uses, is not installable everywhere):
   one keep-alive connection a client, each client's next request sent when its answer
   arrives, requests that start in a round's first --warmup seconds not counted.
2. The Lambda handler, in process: one SQS batch of 10 records through the batched function
   against 10 direct invocations of the single one (and, for reference, the same SQS batch
   through the single function, and the model alone: 10 forwards of one text against one of
   10, the most batching can gain with this model here); the median of --repeats.

    python -m benchmarks.batching [--clients 32] [--duration 20] [--rounds 2] [--warmup 5]
                                  [--one-client-duration 30] [--repeats 5] [--dir DIR]
                                  [--bert '{"hidden_size": 256, ...}']  # another size
    python -m benchmarks.batching --quick     # a tiny BERT, short runs: the wiring, not numbers

Goals: at --clients, batched >= 3x the requests/s and a p50 no worse; at 1 client, batched p50
<= 1.05x single's; the SQS batch of 10 >= 3x faster than 10 single invocations. Figures go to
benchmarks/data/batching-last.json (--quick: batching-quick.json); every answer is checked
against the other function's for the same text.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import DATA, ROOT, free_port, load_average

BERT_BASE: dict[str, Any] = {"num_labels": 2}  # BertConfig's defaults are BERT-base's
TINY: dict[str, Any] = {
    "num_labels": 2,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "vocab_size": 1000,
    "max_position_embeddings": 64,
}
DEFAULT_DIR = Path("/tmp/lazyserve-bench-batching")
WORDS = 14  # + [CLS] and [SEP]: 16 tokens a text
SQS_RECORDS = 10
STARTUP_LIMIT = 180.0
GOAL_RPS, GOAL_ONE_CLIENT, GOAL_SQS = 3.0, 1.05, 3.0
MODES = ("single", "batch")
QUICK: dict[str, Any] = {
    "clients": 4,
    "duration": 1.0,
    "rounds": 1,
    "warmup": 0.5,
    "one_client_duration": 1.0,
    "repeats": 2,
}
_VOCABULARY = (
    "the a model serves requests fast slow batch queue token word text answer label score "
    "cloud lambda function server client load weight tensor layer small large good bad new old"
).split()


def texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_VOCABULARY) for _ in range(WORDS)) for _ in range(count)]


def weights(directory: Path, bert: dict[str, Any]) -> Path:
    """The model's weights (random, seeded), written once per config to `directory`."""
    tag = hashlib.sha256(json.dumps(bert, sort_keys=True).encode()).hexdigest()[:12]
    path = directory / f"bert-{tag}.safetensors"
    if path.is_file():
        return path
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    state = BertForSequenceClassification(BertConfig(**bert)).state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial))
    partial.rename(path)
    return path


def _env(bert: dict[str, Any], path: Path, mode: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAZYSERVE_"))}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        LAZYSERVE_MODEL_URI=str(path),
        LAZYSERVE_LOAD="eager",
        LAZYSERVE_LOG_LEVEL="WARNING",
        BENCH_BERT_CONFIG=json.dumps(bert),
    )
    if mode is not None:
        env["BENCH_BATCH_MODE"] = mode
    return env


class Server:
    """`uvicorn --factory benchmarks.batching_app:create_app` on 127.0.0.1, in `mode`."""

    def __init__(self, mode: str, bert: dict[str, Any], path: Path, log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "uvicorn", "--factory"]
        command += ["benchmarks.batching_app:create_app", "--host", "127.0.0.1", "--port", port]
        command += ["--no-access-log"]
        self._log = log.open("w")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=_env(bert, path, mode),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.log_path = log

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + STARTUP_LIMIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"uvicorn exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"uvicorn not ready in {STARTUP_LIMIT}s: {self.log_path}")

    def batches(self) -> tuple[int, float]:
        """Calls the batched function made so far and the requests they answered (0, 0 for the
        single function)."""
        import httpx

        found = httpx.get(f"{self.url}/model", timeout=30).json().get("batches")
        if not found or not found["calls"]:
            return 0, 0.0
        return int(found["calls"]), float(found["calls"] * found["mean_size"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self._log.close()


# -- the load generator (a process of its own) ----------------------------------------------------


def drive(urls: list[str], clients: int, duration: float, warmup: float) -> dict[str, Any]:
    """`clients` closed-loop clients for warmup + duration seconds, each sending its requests to
    `urls` in turn; per URL, the latencies of requests started after the warm-up and answered
    before the end, their statuses, and every distinct answer."""
    import anyio
    import httpx

    bodies = texts(64, seed=1)
    figures: dict[str, dict[str, Any]] = {
        url: {"latencies": [], "statuses": {}, "answers": {}} for url in urls
    }

    async def client(i: int, http: httpx.AsyncClient, start: float, end: float) -> None:
        n = i
        while time.perf_counter() < end:
            text = bodies[n % len(bodies)]
            url = urls[n % len(urls)]
            n += clients
            sent = time.perf_counter()
            response = await http.post(f"{url}/predict", json={"text": text})
            done = time.perf_counter()
            mine = figures[url]
            if sent >= start and done <= end:
                mine["latencies"].append(done - sent)
                status = str(response.status_code)
                mine["statuses"][status] = mine["statuses"].get(status, 0) + 1
            if response.status_code == 200:
                mine["answers"][text] = response.json()

    async def run() -> None:
        connections = clients * len(urls)
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=300) as http:
            began = time.perf_counter()
            start, end = began + warmup, began + warmup + duration
            async with anyio.create_task_group() as group:
                for i in range(clients):
                    group.start_soon(client, i, http, start, end)

    anyio.run(run)
    return figures


def load(urls: list[str], clients: int, duration: float, warmup: float) -> dict[str, Any]:
    """drive() in a process of its own."""
    command = [sys.executable, "-m", "benchmarks.batching", "--drive", *urls]
    command += ["--clients", str(clients), "--duration", str(duration), "--warmup", str(warmup)]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=duration + warmup + 600
    )
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def summary(runs: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Requests/s and latency quantiles of one URL's runs together (`duration` in all)."""
    ordered = sorted(v for run in runs for v in run["latencies"])
    statuses: dict[str, int] = {}
    for run in runs:
        for status, count in run["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count

    def quantile(q: float) -> float | None:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else None

    return {
        "requests": len(ordered),
        "requests_per_s": len(ordered) / duration,
        "p50_ms": quantile(0.50),
        "p90_ms": quantile(0.90),
        "p99_ms": quantile(0.99),
        "statuses": statuses,
    }


# -- the Lambda handler (a process of its own) -----------------------------------------------------


def sqs_event(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    template = json.loads((ROOT / "events" / "sqs-predict.json").read_text())["Records"][0]
    records = []
    for i, body in enumerate(bodies):
        record = copy.deepcopy(template)
        record["messageId"] = f"message-{i}"
        record["body"] = json.dumps(body)
        records.append(record)
    return {"Records": records}


def same_answers(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """The same labels, the scores equal but for the last bits (another batch shape sums in
    another order)."""
    return len(a) == len(b) and all(
        x["label"] == y["label"] and abs(x["score"] - y["score"]) < 1e-4
        for x, y in zip(a, b, strict=True)
    )


def lambda_figures(repeats: int) -> dict[str, Any]:
    """In this process (its environment names the weights): median seconds of an SQS batch of
    10 through each function and of 10 direct invocations of the single one."""
    import torch

    from benchmarks import batching_app

    single, batched = batching_app.build("single"), batching_app.build("batch")
    payloads = [{"text": t} for t in texts(SQS_RECORDS, seed=2)]
    event = sqs_event(payloads)
    expected = [single.handler(p, None) for p in payloads]  # also the warm-up
    got = batched.handler({"batch": payloads}, None)["batch"]
    assert same_answers(expected, got), (expected, got)
    runs: dict[str, list[float]] = {
        "direct_10": [],
        "sqs_10_single": [],
        "sqs_10_batched": [],
        "model_10_alone": [],
        "model_10_together": [],
    }
    module = single.model.get().module
    with torch.inference_mode():  # the same forwards without lazyserve: the model's own ratio
        batching_app.classify(module, [payloads[0]["text"]])
    for _ in range(repeats):
        started = time.perf_counter()
        for payload in payloads:
            single.handler(payload, None)
        runs["direct_10"].append(time.perf_counter() - started)
        with torch.inference_mode():
            started = time.perf_counter()
            for payload in payloads:
                batching_app.classify(module, [payload["text"]])
            runs["model_10_alone"].append(time.perf_counter() - started)
            started = time.perf_counter()
            batching_app.classify(module, [p["text"] for p in payloads])
            runs["model_10_together"].append(time.perf_counter() - started)
        for name, service in (("sqs_10_single", single), ("sqs_10_batched", batched)):
            started = time.perf_counter()
            answer = service.handler(event, None)
            runs[name].append(time.perf_counter() - started)
            assert answer == {"batchItemFailures": []}, answer
    calls = batched.handler({"warmup": True}, None)
    figures: dict[str, Any] = {name: statistics.median(v) for name, v in runs.items()}
    figures["runs"] = runs
    figures["batched_model"] = calls["model"]["uri"]
    batcher = batched._batcher
    assert batcher is not None
    figures["batched_calls"] = batcher.stats()
    return figures


# -- the whole run ---------------------------------------------------------------------------------


def run(
    *,
    quick: bool = False,
    bert: dict[str, Any] | None = None,
    clients: int = 32,
    duration: float = 20.0,
    warmup: float = 5.0,
    one_client_duration: float = 30.0,
    rounds: int = 2,
    repeats: int = 5,
    directory: Path = DEFAULT_DIR,
    data_dir: Path = DATA,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Both functions under uvicorn at once: `clients` clients in `rounds` rounds a function,
    the functions alternating (what else the machine runs moves both alike), then one client
    whose requests alternate between them; then the Lambda handler."""
    name = "tiny BERT" if quick else "BERT-base" if bert is None else f"BERT {json.dumps(bert)}"
    bert = TINY if quick else {**BERT_BASE, **(bert or {})}
    path = weights(directory, bert)
    data_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "model": name,
        "config": bert,
        "weights_bytes": path.stat().st_size,
        "tokens": WORDS + 2,
        "cpus": os.cpu_count(),
        "load_average_start": load_average(),
        "uvicorn": {mode: {} for mode in MODES},
    }
    out = data_dir / ("batching-quick.json" if quick else "batching-last.json")
    servers = {m: Server(m, bert, path, data_dir / f"batching-uvicorn-{m}.log") for m in MODES}
    answers: dict[str, dict[str, Any]] = {mode: {} for mode in MODES}  # by text
    try:
        for server in servers.values():
            server.wait_ready()
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        calls = {mode: 0.0 for mode in MODES}  # (calls, requests) of the many-client rounds
        sizes = {mode: 0.0 for mode in MODES}
        for r in range(rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                url = servers[mode].url
                log(f"uvicorn {mode}: {clients} clients, {warmup:g}+{duration / rounds:g} s")
                before = servers[mode].batches()
                run_ = load([url], clients, duration / rounds, warmup)[url]
                after = servers[mode].batches()
                calls[mode] += after[0] - before[0]
                sizes[mode] += after[1] - before[1]
                answers[mode].update(run_["answers"])
                runs[mode].append(run_)
        for mode in MODES:
            figures = summary(runs[mode], duration)
            if mode == "batch":
                figures["calls"] = int(calls[mode])
                figures["mean_size"] = round(sizes[mode] / max(calls[mode], 1), 2)
            results["uvicorn"][mode][str(clients)] = figures
        log(f"uvicorn: 1 client, alternating, {warmup:g}+{one_client_duration:g} s")
        urls = [servers[mode].url for mode in MODES]
        alternating = load(urls, 1, one_client_duration, warmup)
        for mode, url in zip(MODES, urls, strict=True):
            # Each function has the client half the time.
            results["uvicorn"][mode]["1"] = summary([alternating[url]], one_client_duration / 2)
            answers[mode].update(alternating[url]["answers"])
    finally:
        for server in servers.values():
            server.stop()
    single, batch = answers["single"], answers["batch"]
    both = sorted(single.keys() & batch.keys())
    results["answers_compared"] = len(both)
    results["answers_agree"] = same_answers([single[t] for t in both], [batch[t] for t in both])
    out.write_text(json.dumps(results, indent=2))  # kept if the Lambda part fails
    log(f"lambda handler: {repeats} repeats")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.batching", "--lambda-worker", str(repeats)],
        cwd=ROOT,
        env=_env(bert, path),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the Lambda worker failed: {done.stderr[-3000:]}")
    results["lambda"] = json.loads(done.stdout.strip().splitlines()[-1])
    results["load_average_end"] = load_average()
    results["goals"] = goals(results)
    out.write_text(json.dumps(results, indent=2))
    return results


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal: its figure, the bound, met or not."""
    uv = results["uvicorn"]
    many = next(k for k in uv["single"] if k != "1")
    single, batch = uv["single"][many], uv["batch"][many]
    lam = results["lambda"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    rows = [
        (
            f"{many} clients: requests/s, batched / single",
            ratio(batch["requests_per_s"], single["requests_per_s"]),
            ">=",
            GOAL_RPS,
        ),
        (
            f"{many} clients: p50, batched / single",
            ratio(batch["p50_ms"], single["p50_ms"]),
            "<=",
            1.0,
        ),
        (
            "1 client: p50, batched / single",
            ratio(uv["batch"]["1"]["p50_ms"], uv["single"]["1"]["p50_ms"]),
            "<=",
            GOAL_ONE_CLIENT,
        ),
        (
            "Lambda: 10 direct invocations / one SQS batch of 10",
            ratio(lam["direct_10"], lam["sqs_10_batched"]),
            ">=",
            GOAL_SQS,
        ),
    ]
    judged = []
    for name, value, op, bound in rows:
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        judged.append({"goal": name, "value": value, "bound": f"{op} {bound:g}", "met": met})
    return judged


def table(results: dict[str, Any]) -> str:
    uv, lam = results["uvicorn"], results["lambda"]
    many = next(k for k in uv["single"] if k != "1")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [
        f"{results['model']} ({results['weights_bytes'] / 2**20:.0f} MiB), "
        f"{results['tokens']} tokens a request, {results['cpus']} CPUs, load average "
        f"{results['load_average_start']} -> {results['load_average_end']}",
        "",
        "| uvicorn | clients | requests/s | p50 ms | p90 ms | p99 ms | statuses | calls "
        "| mean size |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in MODES:
        for n in (many, "1"):
            f = uv[mode][n]
            lines.append(
                f"| {mode} | {n} | {f['requests_per_s']:.1f} | {ms(f['p50_ms'])} | "
                f"{ms(f['p90_ms'])} | {ms(f['p99_ms'])} | {f['statuses']} | "
                f"{f.get('calls', '')} | {f.get('mean_size', '')} |"
            )
    lines += [
        "",
        "| Lambda handler, 10 predictions | median ms |",
        "| --- | --- |",
        f"| 10 direct invocations, @service.predict | {lam['direct_10'] * 1000:.1f} |",
        f"| one SQS batch of 10, @service.predict | {lam['sqs_10_single'] * 1000:.1f} |",
        f"| one SQS batch of 10, @service.predict_batch | {lam['sqs_10_batched'] * 1000:.1f} |",
        f"| the model alone: 10 forwards of 1 | {lam['model_10_alone'] * 1000:.1f} |",
        f"| the model alone: one forward of 10 | {lam['model_10_together'] * 1000:.1f} |",
        "",
        f"answers compared: {results['answers_compared']}, the same: {results['answers_agree']}",
        "",
    ]
    for goal in results["goals"]:
        value = "-" if goal["value"] is None else f"{goal['value']:.2f}"
        verdict = "met" if goal["met"] else "NOT met"
        lines.append(f"goal {goal['goal']} {goal['bound']}: {value}, {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batching",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a tiny BERT and short runs")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured a mode")
    parser.add_argument("--rounds", type=int, default=2, help="rounds the duration is cut in")
    parser.add_argument("--one-client-duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds not counted a round")
    parser.add_argument("--repeats", type=int, default=5, help="Lambda handler repeats")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the weights go")
    parser.add_argument(
        "--bert",
        type=json.loads,
        default=None,
        help="BertConfig fields over BERT-base's, as JSON: '{\"hidden_size\": 256, ...}'",
    )
    parser.add_argument("--drive", nargs="+", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--lambda-worker", type=int, metavar="REPEATS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        print(json.dumps(drive(args.drive, args.clients, args.duration, args.warmup)))
        return 0
    if args.lambda_worker:
        print(json.dumps(lambda_figures(args.lambda_worker)))
        return 0
    if args.quick:
        results = run(quick=True, directory=args.dir, **QUICK)
    else:
        results = run(
            bert=args.bert,
            clients=args.clients,
            duration=args.duration,
            rounds=args.rounds,
            warmup=args.warmup,
            one_client_duration=args.one_client_duration,
            repeats=args.repeats,
            directory=args.dir,
        )
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
