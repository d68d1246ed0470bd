"""Throughput and latency under uvicorn: the floor (benchmarks.bare_app: `async def`, forward
inline) against the reference app (handler.app), each in one uvicorn worker pinned to one core,
driven by wrk pinned to the other; then a slow model (200 ms per forward) with /health probed
while /predict is busy.

`python -m benchmarks.uvicorn_load [--duration 10] [--warmup 3] [--concurrency 1 16 64]
[--slow sleep torch python] [--slow-duration 10] [--rounds 1] [--no-access-log]`

Needs two CPUs and wrk (the Debian package `wrk`; installed with apt-get when missing). Servers
and wrk write their output to benchmarks/data/uvicorn-*.log; the figures also go to
benchmarks/data/uvicorn-last.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from benchmarks import gcstats
from benchmarks.common import free_port

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data"
BODY = (ROOT / "events" / "direct-predict.json").read_text().strip()
APPS = ("floor", "reference")
CONCURRENCY = (1, 16, 64)
SLOW_MODES = ("sleep", "torch", "python")
SLOW_CONCURRENCY = 16
HEALTH_INTERVAL = 0.05
STARTUP_LIMIT = 120.0
LUA = """-- written by benchmarks/uvicorn_load.py
wrk.method = "{method}"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
    .. '"max_us": %d, "mean_us": %.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def ensure_wrk(log: Callable[[str], None] = print) -> str:
    """The path of wrk; installs the Debian package `wrk` with apt-get when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise SystemExit(
            "wrk not found on PATH and apt-get is not available to install it: install the "
            "HTTP load generator wrk (Debian/Ubuntu package `wrk`, or build "
            "https://github.com/wg/wrk) and run again"
        )
    command = ["apt-get", "install", "-y", "--no-install-recommends", "wrk"]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise SystemExit("wrk not found, and installing it needs root: `apt-get install wrk`")
        command = ["sudo", "-n", *command]
    log(f"wrk not found: installing it with `{' '.join(command)}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, env=env).returncode != 0:
        log("apt-get install failed; running apt-get update and trying once more")
        subprocess.run([*command[:-5], "apt-get", "update"], env=env)
        subprocess.run(command, env=env)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit(f"`{' '.join(command)}` did not install wrk; install it and run again")
    return found


class Server:
    """One uvicorn worker serving `benchmarks.served:APP`, pinned to `cpu`."""

    def __init__(
        self,
        app: str,
        cpu: int,
        *,
        env: dict[str, str] | None = None,
        access_log: bool = True,
        gc_freeze: bool = False,
    ) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        suffix = f"-{env['BENCH_SLOW_FORWARD']}" if env and "BENCH_SLOW_FORWARD" in env else ""
        self.log_path = DATA / f"uvicorn-{app}{suffix}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LAZYSERVE_"))}
        base.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")])),
            LAZYSERVE_MODEL_URI=str(ROOT / "handler" / "weights" / "digits.safetensors"),
            BENCH_GC="1",
            BENCH_GC_FREEZE="1" if gc_freeze else "0",
            **(env or {}),
        )
        # uvicorn's defaults otherwise, as `lazyserve serve` runs it: one worker, h11, asyncio.
        command = ["taskset", "-c", str(cpu), sys.executable, "-m", "uvicorn"]
        command += [f"benchmarks.served:{app}", "--host", "127.0.0.1", "--port", str(self.port)]
        command += [] if access_log else ["--no-access-log"]
        DATA.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=base,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def post_predict(self) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = {"Content-Type": "application/json"}
            conn.request("POST", "/predict", body=BODY, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_LIMIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"uvicorn serving {self.app} exited with {self.process.returncode}:\n"
                    + self.log_path.read_text(errors="replace")[-3000:]
                )
            try:
                if self.get("/_bench/gc", timeout=5)[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"uvicorn serving {self.app} did not answer in {STARTUP_LIMIT:g}s")

    def gc(self) -> dict[str, Any]:
        status, body = self.get("/_bench/gc")
        if status != 200:
            raise RuntimeError(f"GET /_bench/gc on {self.app}: {status} {body[:200]!r}")
        figures: dict[str, Any] = json.loads(body)
        return figures

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self._log.close()


@contextmanager
def serving(
    apps: Sequence[str],
    cpu: int,
    *,
    env: dict[str, str] | None = None,
    access_log: bool = True,
    gc_freeze: bool = False,
) -> Iterator[dict[str, Server]]:
    """Start a server per app (in parallel), wait until each answers, stop them all after."""
    with ExitStack() as stack:
        servers: dict[str, Server] = {}
        for app in apps:
            server = Server(app, cpu, env=env, access_log=access_log, gc_freeze=gc_freeze)
            stack.callback(server.stop)
            servers[app] = server
        for server in servers.values():
            server.wait_ready()
        yield servers


def wrk(
    binary: str,
    url: str,
    *,
    connections: int,
    seconds: float,
    cpu: int,
    method: str = "POST",
    timeout: float = 10.0,
) -> dict[str, Any]:
    """One wrk run (one thread, pinned to `cpu`); its summary as a dict, latencies in ms."""
    DATA.mkdir(parents=True, exist_ok=True)
    script = DATA / f"wrk-{method.lower()}.lua"
    script.write_text(LUA.format(method=method, body=BODY if method == "POST" else ""))
    command = ["taskset", "-c", str(cpu), binary, "-t1", f"-c{connections}"]
    command += [f"-d{max(1, round(seconds))}s", f"--timeout={max(1, round(timeout))}s"]
    command += ["-s", str(script), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("WRK_RESULT "))
    socket_errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    seconds_run = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "seconds": round(seconds_run, 3),
        "rps": round(raw["requests"] / seconds_run, 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 3),
        "non_2xx": raw["status"],
        "socket_errors": socket_errors,
        "errors": raw["status"] + socket_errors,
    }


def measure(
    server: Server, binary: str, connections: int, seconds: float, cpu: int
) -> dict[str, Any]:
    """A wrk run against /predict with the served process's full collections meanwhile."""
    before = server.gc()
    ran, waited = gcstats.schedstat(server.process.pid)
    result = wrk(binary, f"{server.url}/predict", connections=connections, seconds=seconds, cpu=cpu)
    ran_after, waited_after = gcstats.schedstat(server.process.pid)
    after = server.gc()
    result["gc"] = gcstats.delta(before, after, result["requests"])
    per = 1 / max(1, result["requests"])
    result["server_cpu_ms_per_req"] = round((ran_after - ran) * per, 3)
    result["runqueue_wait_ms_per_req"] = round((waited_after - waited) * per, 3)
    return result


class HealthProbe(threading.Thread):
    """GET /health every `interval` on one keep-alive connection, from a thread pinned to
    `cpu`, until stopped; a load balancer's health check, not a load."""

    def __init__(self, port: int, cpu: int, interval: float = HEALTH_INTERVAL) -> None:
        super().__init__(daemon=True)
        self.port, self.cpu, self.interval = port, cpu, interval
        self.latencies: list[float] = []
        self.errors = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        os.sched_setaffinity(0, {self.cpu})  # this thread only
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stopping.is_set():
            started = time.perf_counter()
            try:
                conn.request("GET", "/health")
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    self.errors += 1
                else:
                    self.latencies.append((time.perf_counter() - started) * 1000)
            except (OSError, http.client.HTTPException):
                self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.stopping.wait(self.interval)
        conn.close()

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def pct(q: float) -> float:
            return (
                round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2) if ordered else 0.0
            )

        return {
            "probes": len(ordered) + self.errors,
            "errors": self.errors,
            "p50_ms": round(statistics.median(ordered), 2) if ordered else 0.0,
            "p99_ms": pct(0.99),
            "max_ms": round(ordered[-1], 2) if ordered else 0.0,
        }


def throughput(
    binary: str,
    *,
    duration: float,
    warmup: float,
    concurrency: Sequence[int],
    rounds: int,
    server_cpu: int,
    client_cpu: int,
    access_log: bool,
    gc_freeze: bool,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Floor and reference side by side, the order alternating; one row per app, concurrency
    and round."""
    rows: list[dict[str, Any]] = []
    if not concurrency:
        return rows
    with serving(APPS, server_cpu, access_log=access_log, gc_freeze=gc_freeze) as servers:
        for app, server in servers.items():
            if server.post_predict() != 200:
                raise RuntimeError(f"{app}: POST /predict did not answer 200")
            wrk(binary, f"{server.url}/predict", connections=16, seconds=warmup, cpu=client_cpu)
        turn = 0
        for round_ in range(rounds):
            for c in concurrency:
                order = list(APPS) if turn % 2 == 0 else list(reversed(APPS))
                turn += 1
                for app in order:
                    result = measure(servers[app], binary, c, duration, client_cpu)
                    result.update(app=app, concurrency=c, round=round_)
                    rows.append(result)
                    log(
                        f"  {app:<9} c={c:<3} {result['rps']:8.1f} req/s  p50 "
                        f"{result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  errors "
                        f"{result['errors']}  full GCs {result['gc']['full']} "
                        f"({result['gc']['full_pause_ms']:.0f} ms)  run-queue wait "
                        f"{result['runqueue_wait_ms_per_req']:.3f} ms/req"
                    )
    return rows


def slow_model(
    binary: str,
    *,
    modes: Sequence[str],
    duration: float,
    server_cpu: int,
    client_cpu: int,
    access_log: bool,
    gc_freeze: bool,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Per forward mode and app: /predict at SLOW_CONCURRENCY while /health is probed."""
    rows: list[dict[str, Any]] = []
    for mode in modes:
        env = {"BENCH_SLOW_FORWARD": mode}
        with serving(
            APPS, server_cpu, env=env, access_log=access_log, gc_freeze=gc_freeze
        ) as servers:
            for app, server in servers.items():
                if server.post_predict() != 200:  # loads the model, warms the path
                    raise RuntimeError(f"{app} ({mode}): POST /predict did not answer 200")
                probe = HealthProbe(server.port, client_cpu)
                predict: dict[str, Any] = {}

                def drive(server: Server = server, out: dict[str, Any] = predict) -> None:
                    out.update(measure(server, binary, SLOW_CONCURRENCY, duration, client_cpu))

                load = threading.Thread(target=drive)
                load.start()
                time.sleep(min(1.0, duration / 4))  # let wrk's connections fill the queue
                probe.start()
                time.sleep(max(0.5, duration - min(1.0, duration / 4) - 0.5))
                probe.stopping.set()
                probe.join()
                load.join()
                health = probe.summary()
                rows.append({"mode": mode, "app": app, "predict": predict, "health": health})
                log(
                    f"  slow {mode:<6} {app:<9} predict {predict['rps']:6.1f} req/s p99 "
                    f"{predict['p99_ms']:8.1f} ms; /health p50 {health['p50_ms']:7.2f} ms "
                    f"p99 {health['p99_ms']:7.2f} ms ({health['probes']} probes)"
                )
    return rows


def run(
    *,
    duration: float = 10.0,
    warmup: float = 3.0,
    concurrency: Sequence[int] = CONCURRENCY,
    rounds: int = 1,
    slow: Sequence[str] = SLOW_MODES,
    slow_duration: float = 10.0,
    server_cpu: int = 0,
    client_cpu: int = 1,
    access_log: bool = True,
    gc_freeze: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Everything; the report as a dict (see table())."""
    cpus = os.sched_getaffinity(0)
    if not {server_cpu, client_cpu} <= cpus or server_cpu == client_cpu:
        raise SystemExit(
            f"needs two distinct CPUs for the server ({server_cpu}) and wrk ({client_cpu}); "
            f"this process may use {sorted(cpus)}: pass --server-cpu and --client-cpu"
        )
    binary = ensure_wrk(log)
    report: dict[str, Any] = {
        "duration": duration,
        "warmup": warmup,
        "access_log": access_log,
        "gc_freeze": gc_freeze,
        "load_before": os.getloadavg(),
    }
    report["throughput"] = throughput(
        binary,
        duration=duration,
        warmup=warmup,
        concurrency=concurrency,
        rounds=rounds,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        access_log=access_log,
        gc_freeze=gc_freeze,
        log=log,
    )
    report["slow"] = slow_model(
        binary,
        modes=slow,
        duration=slow_duration,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        access_log=access_log,
        gc_freeze=gc_freeze,
        log=log,
    )
    report["load_after"] = os.getloadavg()
    return report


def _median(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(key(row) for row in rows)


def table(report: dict[str, Any]) -> str:
    """Markdown: throughput per concurrency with the ratios to the floor, then the slow model."""
    out: list[str] = []
    rows = report["throughput"]
    if rows:
        out += [
            "| concurrency | app | req/s | p50 ms | p99 ms | errors | full GCs per 1k req "
            "| full-GC ms per 1k req | server CPU ms per req | run-queue wait ms per req "
            "| req/s / floor | p99 / floor | CPU per req / floor |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: |",
        ]
        for c in sorted({row["concurrency"] for row in rows}):
            by_app = {
                app: [r for r in rows if r["app"] == app and r["concurrency"] == c] for app in APPS
            }
            floor_rps = _median(by_app["floor"], lambda r: r["rps"])
            floor_p99 = _median(by_app["floor"], lambda r: r["p99_ms"])
            floor_cpu = _median(by_app["floor"], lambda r: r["server_cpu_ms_per_req"])
            for app, runs in by_app.items():
                rps = _median(runs, lambda r: r["rps"])
                p99 = _median(runs, lambda r: r["p99_ms"])
                cpu = _median(runs, lambda r: r["server_cpu_ms_per_req"])
                out.append(
                    f"| {c} | {app} | {rps:.1f} | {_median(runs, lambda r: r['p50_ms']):.2f} "
                    f"| {p99:.2f} | {sum(r['errors'] for r in runs)} "
                    f"| {_median(runs, lambda r: r['gc']['full_per_1k']):.2f} "
                    f"| {_median(runs, lambda r: r['gc']['full_pause_ms_per_1k']):.1f} "
                    f"| {cpu:.3f} | {_median(runs, lambda r: r['runqueue_wait_ms_per_req']):.3f} "
                    f"| {rps / floor_rps:.2f} | {p99 / floor_p99:.2f} | {cpu / floor_cpu:.2f} |"
                )
        tracked = {r["app"]: r["gc"]["tracked"] for r in rows}
        out += [
            "",
            f"wrk, one thread, {report['duration']:g} s per run after a {report['warmup']:g} s "
            f"warm-up; uvicorn access log {'on' if report['access_log'] else 'off'}"
            f"{'; gc.freeze() after the import' if report.get('gc_freeze') else ''}; objects the "
            f"collector tracks: floor {tracked.get('floor', 0):,}, reference "
            f"{tracked.get('reference', 0):,}.",
        ]
    if report["slow"]:
        out += [
            "",
            f"Slow model (200 ms per forward), /predict at {SLOW_CONCURRENCY} connections, "
            f"GET /health every {HEALTH_INTERVAL * 1000:g} ms on its own connection:",
            "",
            "| forward | app | /predict req/s | /predict p50 ms | /predict p99 ms | errors "
            "| /health p50 ms | /health p99 ms | /health max ms | probes "
            "| run-queue wait ms per req |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in report["slow"]:
            p, h = row["predict"], row["health"]
            out.append(
                f"| {row['mode']} | {row['app']} | {p['rps']:.1f} | {p['p50_ms']:.0f} "
                f"| {p['p99_ms']:.0f} | {p['errors'] + h['errors']} | {h['p50_ms']:.2f} "
                f"| {h['p99_ms']:.2f} | {h['max_ms']:.2f} | {h['probes']} "
                f"| {p['runqueue_wait_ms_per_req']:.1f} |"
            )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.uvicorn_load", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per app")
    parser.add_argument("--concurrency", type=int, nargs="*", default=list(CONCURRENCY))
    parser.add_argument("--rounds", type=int, default=1, help="repeat the runs; medians shown")
    parser.add_argument("--slow", nargs="*", choices=SLOW_MODES, default=list(SLOW_MODES))
    parser.add_argument("--slow-duration", type=float, default=10.0)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--no-access-log", dest="access_log", action="store_false")
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() in both apps after the import"
    )
    parser.add_argument("--json", type=Path, default=DATA / "uvicorn-last.json")
    args = parser.parse_args(argv)
    report = run(
        duration=args.duration,
        warmup=args.warmup,
        concurrency=args.concurrency,
        rounds=args.rounds,
        slow=args.slow,
        slow_duration=args.slow_duration,
        server_cpu=args.server_cpu,
        client_cpu=args.client_cpu,
        access_log=args.access_log,
        gc_freeze=args.gc_freeze,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
