"""benchmarks/batching.py --quick: both functions under uvicorn answer every request with the same
labels, the batched one in calls of many, and its SQS batch of 10 is one call; the goals are
judged from the figures (counts and verdicts, never timings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import batching


def test_a_quick_run_serves_both_functions_and_judges_the_goals(tmp_path: Path) -> None:
    lines: list[str] = []
    results = batching.run(
        quick=True, directory=tmp_path, data_dir=tmp_path, log=lines.append, **batching.QUICK
    )
    assert (tmp_path / "batching-quick.json").is_file()
    for mode in ("single", "batch"):
        for clients in ("4", "1"):
            figures = results["uvicorn"][mode][clients]
            assert figures["requests"] > 0
            assert figures["statuses"] == {"200": figures["requests"]}  # no error at all
    batched = results["uvicorn"]["batch"]["4"]
    assert batched["calls"] > 0 and batched["mean_size"] >= 1
    assert "calls" not in results["uvicorn"]["single"]["4"]
    assert results["answers_compared"] > 0 and results["answers_agree"]
    # The SQS batches and the direct list of 10 (the check): one call of 10 each.
    calls = results["lambda"]["batched_calls"]
    assert (calls["calls"], calls["mean_size"], calls["last_size"]) == (1 + 2, 10.0, 10)
    table = batching.table(results)
    assert table.count("\ngoal ") == 4
    assert "one SQS batch of 10, @service.predict_batch" in table


def figures(rps: tuple[float, float], p50: tuple[float, float], one: tuple[float, float]) -> Any:
    def load(requests_per_s: float, p50_ms: float) -> dict[str, Any]:
        return {"requests_per_s": requests_per_s, "p50_ms": p50_ms}

    return {
        "uvicorn": {
            mode: {"32": load(rps[i], p50[i]), "1": load(10.0, one[i])}
            for i, mode in enumerate(("single", "batch"))
        },
        "lambda": {"direct_10": 1.0, "sqs_10_batched": 0.25},
    }


def test_the_goals_are_judged_from_the_figures() -> None:
    met = batching.goals(figures(rps=(10, 31), p50=(3000, 900), one=(80, 84)))
    assert [(g["goal"], round(g["value"], 2), g["met"]) for g in met] == [
        ("32 clients: requests/s, batched / single", 3.1, True),
        ("32 clients: p50, batched / single", 0.3, True),
        ("1 client: p50, batched / single", 1.05, True),
        ("Lambda: 10 direct invocations / one SQS batch of 10", 4.0, True),
    ]
    missed = batching.goals(figures(rps=(10, 29), p50=(3000, 3001), one=(80, 85)))
    assert [g["met"] for g in missed] == [False, False, False, True]
