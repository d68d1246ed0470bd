"""benchmarks/pretrained.py: every variant builds the model from the same directory and the
table judges the two goals from the medians (figures, never timings, are asserted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import pretrained
from benchmarks.s3endpoint import S3Endpoint
from transformers import BertConfig


def test_each_variant_builds_the_model_and_reports_its_figures(tmp_path: Path) -> None:
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
    )
    directory = pretrained.model_dir(tmp_path, config)
    size = (directory / pretrained.WEIGHTS).stat().st_size
    with S3Endpoint(bandwidth=0, latency=0) as s3:
        pretrained.serve_directory(s3, directory)
        for variant in pretrained.VARIANTS:
            if variant == "lazyserve":  # from the stand-in, in a process of its own
                figures = pretrained.measure(variant, directory, s3.endpoint)
                assert 0 < figures["fetch_seconds"] == figures["read_seconds"]
                assert any(r.path.endswith(pretrained.WEIGHTS) for r in s3.requests)
            else:
                figures = pretrained.child(variant, directory)
            assert figures["variant"] == variant
            assert figures["weights"] == size
            assert {"build_seconds", "peak_growth", "rss_after_forward"} <= set(figures)


def fake(variant: str, build: float, peak: float) -> dict[str, Any]:
    weights = 1000
    return {
        "variant": variant,
        "weights": weights,
        "read_seconds": 0.1,
        "fetch_seconds": 0.1,
        "build_seconds": build,
        "peak_growth": peak * weights,
        "rss_after_forward": peak * weights,
    }


def test_the_table_judges_the_goals_on_lazyserve_fetch_and_build() -> None:
    runs = {v: [fake(v, 1.0, 0.05)] for v in pretrained.VARIANTS}
    runs["lazyserve"] = [fake("lazyserve", b, p) for b, p in [(1.1, 1.05), (9, 9)]]
    runs["lazyserve"].append(fake("lazyserve", 1.15, 1.04))
    table = pretrained.table(runs)
    assert "| lazyserve | 0.100 | 1.150 | 1.15 | 0 MiB | 1.05 | 1.05 |" in table
    assert "goal peak RSS growth <= 1.1x the weights (lazyserve): 1.05x, met" in table
    assert "goal build <= 1.2x from_pretrained (lazyserve): 1.15x, met" in table

    runs["lazyserve"] = [fake("lazyserve", 1.3, 1.2)]
    table = pretrained.table(runs)
    assert "1.20x, NOT met" in table and "1.30x, NOT met" in table

    # Without the fetch from S3, the build from memory is judged.
    del runs["lazyserve"]
    assert "(build_pretrained): 1.00x, met" in pretrained.table(runs)
