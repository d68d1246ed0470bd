"""Each loader of the peers benchmark (benchmarks/peers.py) loads a small weights file from the
benchmark S3 endpoint into a model whose tensors match the file (correctness, not time)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
from benchmarks import peers
from benchmarks.common import BUCKET, WeightsFile, weights_file
from benchmarks.s3endpoint import S3Endpoint

# The Python modules each loader needs beyond lazyserve's own dependencies (the `bench` extra).
NEEDS = {
    "boto3_crt": ("awscrt",),
    "runai": ("runai_model_streamer", "runai_model_streamer_s3"),
    "s3torchconnector": ("s3torchconnector",),
}
METHODS = [
    "lazyserve",
    "boto3",
    "boto3:8",
    "boto3_crt",
    "runai",
    "runai:8",
    "s3torchconnector",
    "one_get",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> WeightsFile:
    """4 MiB of float32: one 1024 x 1024 layer."""
    return weights_file(4, tmp_path_factory.mktemp("weights"), width=1024)


@pytest.fixture(scope="module")
def endpoint(tiny: WeightsFile) -> Iterator[S3Endpoint]:
    with S3Endpoint(bandwidth=0, latency=0) as s3:
        s3.add(BUCKET, tiny.path.name, tiny.path)
        yield s3


@pytest.mark.parametrize("method", METHODS)
def test_loader_loads_the_file(method: str, endpoint: S3Endpoint, tiny: WeightsFile) -> None:
    name, _ = peers.parse_method(method)
    for module in NEEDS.get(name, ()):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -c constraints.txt -e '.[bench]')")
    out, seen = peers.measure_in_worker(endpoint, method, tiny.path.name, tiny)
    # The worker compares sums of the loaded parameters with the file's and fails otherwise.
    assert out["verified"] is True
    assert seen["gets"] >= 1
    assert seen["bytes_served"] >= tiny.size


def test_unknown_loader_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown loader 'boto4' in 'boto4:8'; loaders: "):
        peers.parse_method("boto4:8")
    with pytest.raises(ValueError, match=r"'runai:x': the connection count after ':'"):
        peers.parse_method("runai:x")


def test_the_lazyserve_label_shows_the_settings_default() -> None:
    from lazyserve.settings import Settings

    assert peers.LAZYSERVE_DEFAULT == Settings(model_uri="s3://bkt/k").s3_concurrency
