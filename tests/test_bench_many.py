"""benchmarks/many.py serves many models under a budget of two through the real Service: every
answer comes from the right weights, each cold model past the budget evicts exactly one, and the
table has the three cases and the eviction cost (counts, never timings)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import many


def test_a_small_run_loads_evicts_and_tabulates(tmp_path: Path) -> None:
    results = many.run(
        models=4,
        size_mib=1,
        repeats=1,
        resident=3,
        bandwidth=0,
        latency=0,
        data_dir=tmp_path,
        width=512,  # 1 MiB per model
        log=lambda line: None,
    )

    (sample,) = results.samples
    # The worker itself checks each answer's sha256 and one eviction per cold model past two.
    assert sample.evictions == 4 - many.FITS
    assert len(sample.resident) == 3
    assert len(sample.evict) == 4 - many.FITS
    assert sample.resident_bytes <= results.budget
    table = many.table(results)
    for row in ("(a) resident model", "(b) cold model", "(c) cold model", "eviction cost"):
        assert row in table
    assert many.ManyResults.from_dict(results.as_dict()) == results
