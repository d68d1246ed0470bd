"""benchmarks/run.py: the goals are judged from the figures handed in (met, not met, not
measured), the results file has a section per part that ran and cites no file outside the
project, and one quick part runs through `main` and writes both outputs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import e2e, peers, run

MIB = 2**20
HEADER = 1000  # about what common.weights_file's header adds to the MiB of tensors


def sample(
    method: str, size_mib: int, seconds: float, peak: float = 1.0, cpu: float = 0.1
) -> peers.PeersSample:
    size = size_mib * MIB + HEADER  # a weights file: the tensors and the safetensors header
    return peers.PeersSample(
        method, size, 0, seconds, int(peak * size), True, cpu, 0.0, 0, True, size, 0.1, 8, 8, size
    )


def peers_results(lazyserve_512: float, cpu_512: float = 0.5) -> peers.PeersResults:
    results = peers.PeersResults(90e6, 0.02, 1, {})
    results.samples = [
        sample("lazyserve", 64, 0.16, cpu=0.05),
        sample("boto3", 64, 0.30),
        sample("boto3:8", 64, 0.40),
        sample("link:8", 64, 0.15),
        sample("lazyserve", 512, lazyserve_512, cpu=cpu_512),
        sample("boto3", 512, 1.30),
        sample("link:8", 512, 0.95),
        sample("link:16", 512, 0.85),
    ]
    return results


def by_goal(found: list[run.Goal], starts: str) -> run.Goal:
    (goal,) = [g for g in found if g.goal.startswith(starts)]
    return goal


def test_fetch_goals_take_each_size_against_its_threshold() -> None:
    met = run.fetch_goals(peers_results(lazyserve_512=1.0))  # 0.85 of link16 at 512 MiB
    assert [g.met for g in met] == [True, True, True, True, True]
    assert by_goal(met, "fetch ≥ 0.90 of link8").measured == "64 MiB: 0.94"
    assert by_goal(met, "fetch ≥ 0.85 of link16").measured == "512 MiB: 0.85"
    assert by_goal(met, "lazyserve's fetch ≤ 1.2 CPU").measured == "64 MiB: 0.80, 512 MiB: 1.00"

    slow = run.fetch_goals(peers_results(lazyserve_512=1.4, cpu_512=1.0))  # and boto3 is faster
    assert by_goal(slow, "fetch ≥ 0.85 of link16").met is False
    assert by_goal(slow, "fetch ≥ 0.90 of link8").met is True  # 64 MiB only
    assert by_goal(slow, "lazyserve's fetch ≤ 1.2 CPU").met is False
    faster = by_goal(slow, "lazyserve faster")
    assert faster.met is False
    assert "512 MiB: boto3 0.93x" in faster.measured

    assert [g.met for g in run.fetch_goals(None)] == [None] * 5


def e2e_run(cpus: int, size: str, totals: dict[str, float]) -> e2e.E2EResults:
    results = e2e.E2EResults(cpus, 90e6, 0.02, repeats=1)
    for variant, total in totals.items():
        results.trials.append(e2e.Trial(variant, size, 0, total, 0.0, total, None, None, 0))
    return results


def test_e2e_goals_bound_background_by_the_floor_or_the_link() -> None:
    results = e2e_run(2, "128M", {"floor": 2.0, "lazy": 2.3, "background": 2.08})
    within, one, never = run.e2e_goals([results], {"128M": 0.2})
    assert (within.met, one.met, never.met) == (True, None, True)
    # A link slower than the whole import chain moves the bound to the link.
    within, _, _ = run.e2e_goals([results], {"128M": 3.0})
    assert within.met is True and "128M: 0.69" in within.measured


def test_e2e_goals_on_one_vcpu_judge_128m_against_the_floor() -> None:
    two = e2e_run(2, "128M", {"floor": 2.0, "lazy": 2.3, "background": 2.05})
    one = e2e_run(1, "128M", {"floor": 2.5, "lazy": 2.8, "background": 2.7})
    within, on_one, never = run.e2e_goals([two, one], {"128M": 0.2})
    assert within.met is True
    assert on_one.met is True and on_one.measured.startswith("1.08")  # 2.7 / 2.5
    assert never.measured == "2 vCPU 128M: 2.05 vs 2.30 s, 1 vCPU 128M: 2.70 vs 2.80 s"

    slower = e2e_run(1, "128M", {"floor": 2.5, "lazy": 2.6, "background": 2.8})
    _, on_one, never = run.e2e_goals([two, slower], {"128M": 0.2})
    assert (on_one.met, never.met) == (False, False)


def test_e2e_goals_take_the_faster_floor() -> None:
    results = e2e_run(2, "69K", {"floor": 2.4, "floor_frozen": 2.0, "lazy": 2.3, "background": 2.2})
    within, _, _ = run.e2e_goals([results], {"69K": 0.03})
    # 2.2 s is within 1.05x of the plain floor's 2.4 s, not of the frozen floor's 2.0 s.
    assert within.met is False and "69K: 1.10 (same-repeat 1.10)" in within.measured


def hf_figures(variant: str, build: float, peak: float) -> dict[str, float | str]:
    return {
        "variant": variant,
        "weights": 1000,
        "read_seconds": 0.5,
        "fetch_seconds": 0.5,
        "build_seconds": build,
        "peak_growth": peak * 1000,
        "rss_after_forward": peak * 1000,
    }


def test_pretrained_goals_judge_lazyserve_against_from_pretrained() -> None:
    runs = {
        "from_pretrained": [hf_figures("from_pretrained", 1.0, 0.8)],
        "lazyserve": [hf_figures("lazyserve", 1.1, 1.04)],
    }
    cold = e2e_run(2, "BERT", {"floor": 6.0, "local": 5.0, "background": 5.2})
    rss, build, e2e_goal = run.pretrained_goals(runs, cold)
    assert (rss.met, rss.measured) == (True, "1.04x")
    assert (build.met, build.measured) == (True, "1.10x")
    # Against the faster floor: lazyserve's own function with the directory on local disk.
    assert e2e_goal.met is True and e2e_goal.measured.startswith("BERT: 1.04 of `local`")

    runs["lazyserve"] = [hf_figures("lazyserve", 1.3, 1.2)]
    rss, build, e2e_goal = run.pretrained_goals(runs, None)
    assert (rss.met, build.met, e2e_goal.met) == (False, False, None)


def test_batching_goals_are_the_batching_parts_own_verdicts() -> None:
    judged = [
        {"goal": "rps", "value": 2.4, "bound": ">= 3", "met": False},
        {"goal": "p50", "value": 0.5, "bound": "<= 1", "met": True},
        {"goal": "one", "value": 1.01, "bound": "<= 1.05", "met": True},
        {"goal": "sqs", "value": None, "bound": ">= 3", "met": False},
    ]
    rps, p50, one, sqs = run.batching_goals({"goals": judged})
    assert (rps.met, rps.measured) == (False, "2.40x")
    assert (p50.met, one.met) == (True, True)
    assert (sqs.met, sqs.measured) == (None, "-")  # not measured is not "not met"
    assert all(g.met is None for g in run.batching_goals(None))
    assert [g.goal for g in run.goals(run.Run())].count(rps.goal) == 1


def test_the_results_file_has_a_section_per_part_and_stands_alone(tmp_path: Path) -> None:
    result = run.Run(peers=peers_results(1.0), seconds={"peers": 60.0}, load_at={"peers": "0.5"})
    text = run.render(
        result,
        command="python -m benchmarks.run --only peers",
        started=datetime.now(UTC),
        seconds=60.0,
        loads=("0.5 / 0.5 / 0.5", "0.6 / 0.5 / 0.5"),
        output=tmp_path / "RESULTS.md",
    )
    assert "## Goals" in text and "## Fetch alone" in text
    assert "## Warm Lambda invocations" not in text  # it did not run
    assert "| not measured |" in text
    assert "LAMBDA-FACTS" not in text and "shared" not in text


def test_main_runs_one_quick_part_and_writes_both_files(tmp_path: Path) -> None:
    out, raw = tmp_path / "RESULTS.md", tmp_path / "run.json"
    code = run.main(["--quick", "--only", "many", "--output", str(out), "--json", str(raw)])

    assert code == 0
    assert "## Many models under a memory budget" in out.read_text()
    figures = json.loads(raw.read_text())
    assert figures["many"]["samples"][0]["evictions"] == run.QUICK.many_models - 2
    assert figures["failed"] == {}


def test_every_method_link_names_a_heading_of_the_benchmarks_readme() -> None:
    def slug(heading: str) -> str:  # GitHub's anchors: lower case, punctuation dropped
        kept = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
        return "#" + kept.replace(" ", "-")

    headings = {
        slug(line.removeprefix("## ").strip())
        for line in run.README.read_text().splitlines()
        if line.startswith("## ")
    }
    assert set(run.METHOD.values()) <= headings
