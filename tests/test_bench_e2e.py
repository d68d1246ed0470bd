"""benchmarks/e2e.py runs a function under AWS's runtime client end to end: one trial answers
the stored event with the right prediction, and its timestamps come in the order they happen."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from benchmarks import e2e
from benchmarks.common import BUCKET
from benchmarks.s3endpoint import DEFAULT_BANDWIDTH, DEFAULT_LATENCY


@pytest.fixture
def s3() -> Iterator[e2e.TimedS3Endpoint]:
    with e2e.TimedS3Endpoint() as endpoint:
        yield endpoint


def test_one_background_trial_answers_and_its_timestamps_are_ordered(
    s3: e2e.TimedS3Endpoint,
) -> None:
    work = e2e.workload("69K")
    assert [p["label"] for p in work.expected] == [8]  # the stored event is an image of an 8
    s3.add(BUCKET, work.key, work.path)

    # trial() itself asserts a 200 with the expected prediction.
    trial = e2e.trial("background", work, s3)

    assert trial.gets == 1  # 69 KB: one ranged GET of the weights, one load
    assert trial.first_get is not None and trial.last_byte is not None
    # The background fetch starts during INIT; the response follows INIT and the last byte.
    assert 0 < trial.first_get < trial.init < trial.total
    assert trial.first_get < trial.last_byte < trial.total
    assert 0 < trial.invoke
    assert trial.cpu > 0  # read from /proc while the function still ran
    assert trial.total == pytest.approx(trial.init + trial.invoke)


def test_the_table_has_a_row_per_variant_and_the_floor_ratio() -> None:
    results = e2e.E2EResults(2, DEFAULT_BANDWIDTH, DEFAULT_LATENCY, repeats=1)
    for n, variant in enumerate(e2e.VARIANTS):
        total = 2.0 + n / 2
        results.trials.append(e2e.Trial(variant, "69K", 0, total - 0.5, 0.5, total, None, None, 0))
    rows = e2e.table(results).splitlines()[2:]
    assert len(rows) == len(e2e.VARIANTS)
    assert rows[0].split("|")[6].strip() == "1.00"  # the floor against itself
    last = 2.0 + (len(e2e.VARIANTS) - 1) / 2
    assert rows[-1].split("|")[6].strip() == f"{last / 2:.2f}"  # against the floor's 2.0 s
    assert rows[-1].split("|")[7].strip() == f"{last / 2:.2f}"  # the same, repeat by repeat
    assert rows[-1].split("|")[8].strip() == f"{last:.2f} to {last:.2f}"
    assert e2e.E2EResults.from_dict(results.as_dict()) == results


def test_same_repeat_ratios_pair_each_variant_with_the_floor_of_its_own_repeat() -> None:
    results = e2e.E2EResults(2, DEFAULT_BANDWIDTH, DEFAULT_LATENCY, repeats=3)
    # The machine is slow in repeat 1: both the floor and lazy take longer there.
    for repeat, floor, lazy in ((0, 2.0, 2.2), (1, 4.0, 4.4), (2, 2.1, 2.31)):
        results.trials.append(e2e.Trial("floor", "69K", repeat, floor, 0, floor, None, None, 0))
        results.trials.append(e2e.Trial("lazy", "69K", repeat, lazy, 0, lazy, None, None, 0))
    assert results.paired("lazy", "69K") == pytest.approx(1.1)
    assert results.spread("floor", "69K") == (2.0, 4.0)
    assert results.paired("eager", "69K") is None and results.spread("eager", "69K") is None


def test_an_unknown_size_is_refused_with_the_accepted_forms() -> None:
    with pytest.raises(ValueError, match=r"size '100M' is not supported; accepted: 69K"):
        e2e.workload("100M")
