"""CloudWatch metrics as CloudWatch reads them: the Embedded Metric Format documents Powertools
prints to stdout, parsed and checked for namespace, dimensions, names, units and values; one
document per Lambda invocation (none when it recorded nothing), off under uvicorn unless asked."""

from __future__ import annotations

import json
import time
from types import ModuleType
from typing import Any

import pytest

from lazyserve.cli import FakeContext
from lazyserve.errors import InvalidInput, SettingsError
from lazyserve.settings import load_settings
from tests.helpers import (
    DIGIT_8,
    PART_SIZE,
    SLOW_DOWN,
    WEIGHTS,
    WEIGHTS_BYTES,
    ImportHandler,
    asgi_client,
    failing_gets,
    load_event,
    s3_uri,
)
from tests.s3server import CountingS3Server

UNITS = {
    "ColdStart": "Count",
    "ModelLoadSeconds": "Seconds",
    "ModelBytes": "Bytes",
    "InferenceMs": "Milliseconds",
}


@pytest.fixture
def on_lambda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "lazyserve-digits")


def emf_documents(out: str) -> list[dict[str, Any]]:
    """The EMF documents in captured stdout. Every line there is one JSON object: the EMF
    documents, and on Lambda lazyserve's own log lines (which carry a level)."""
    documents = []
    for line in out.splitlines():
        document = json.loads(line)
        if "_aws" in document:
            documents.append(document)
        else:
            assert document.get("logger") == "lazyserve" and "level" in document, line
    return documents


def metrics_of(document: dict[str, Any]) -> dict[str, list[float]]:
    """name -> values of one EMF document, after checking its envelope and units."""
    meta = document["_aws"]
    assert abs(meta["Timestamp"] / 1000 - time.time()) < 60
    (directive,) = meta["CloudWatchMetrics"]
    assert directive["Namespace"] == "lazyserve"
    assert directive["Dimensions"] == [["service"]]
    assert document["service"] == "lazyserve"
    values: dict[str, list[float]] = {}
    for metric in directive["Metrics"]:
        name = metric["Name"]
        assert metric["Unit"] == UNITS[name], metric
        raw = document[name]
        values[name] = [float(v) for v in (raw if isinstance(raw, list) else [raw])]
    return values


def invoke(mod: ModuleType, event: str, capsys: pytest.CaptureFixture[str]) -> list[Any]:
    """One invocation; the EMF documents it printed."""
    capsys.readouterr()
    mod.handler(load_event(event), FakeContext(aws_request_id=f"req-{event}"))
    return emf_documents(capsys.readouterr().out)


# --- on Lambda: one document per invocation -------------------------------------------------------


def test_one_document_per_invocation_with_what_it_did(
    on_lambda: None, import_handler: ImportHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    assert emf_documents(capsys.readouterr().out) == []  # INIT publishes nothing

    (cold,) = invoke(mod, "http-api-health", capsys)
    assert metrics_of(cold) == {"ColdStart": [1.0]}

    # A warm /health records nothing: no document at all (Powertools would warn on empty).
    assert invoke(mod, "http-api-health", capsys) == []

    (loading,) = invoke(mod, "http-api-predict", capsys)
    values = metrics_of(loading)
    assert set(values) == {"ModelLoadSeconds", "ModelBytes", "InferenceMs"}
    assert values["ModelBytes"] == [float(len(WEIGHTS_BYTES))]
    (load_seconds,) = values["ModelLoadSeconds"]
    assert 0 < load_seconds < 60
    (infer_ms,) = values["InferenceMs"]
    assert infer_ms > 0

    for event in ("http-api-predict", "direct-predict", "rest-predict"):
        (warm,) = invoke(mod, event, capsys)
        values = metrics_of(warm)
        assert set(values) == {"InferenceMs"}, event
        assert values["InferenceMs"][0] > 0

    assert invoke(mod, "warmup", capsys) == []  # loaded already: nothing to report


def test_cold_invocation_that_loads_reports_all_four(
    on_lambda: None, import_handler: ImportHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    (document,) = invoke(mod, "http-api-predict", capsys)
    values = metrics_of(document)
    assert set(values) == set(UNITS)
    assert values["ColdStart"] == [1.0]
    assert values["ModelBytes"] == [float(len(WEIGHTS_BYTES))]
    loaded = mod.service.model.peek()
    assert loaded is not None
    assert values["ModelLoadSeconds"] == [loaded.info.total_seconds]


def test_a_failed_load_is_not_reported_as_a_load(
    on_lambda: None,
    s3: CountingS3Server,
    import_handler: ImportHandler,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mod = import_handler(LAZYSERVE_MODEL_URI=s3_uri(), LAZYSERVE_S3_PART_SIZE=str(PART_SIZE))
    s3.fault = failing_gets(*SLOW_DOWN)
    (cold,) = invoke(mod, "http-api-predict", capsys)
    assert metrics_of(cold) == {"ColdStart": [1.0]}

    s3.fault = None
    (loaded,) = invoke(mod, "http-api-predict", capsys)
    assert set(metrics_of(loaded)) == {"ModelLoadSeconds", "ModelBytes", "InferenceMs"}


def test_an_invocation_that_raises_still_publishes(
    on_lambda: None, import_handler: ImportHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    capsys.readouterr()
    with pytest.raises(InvalidInput):
        mod.handler(load_event("direct-invalid"), FakeContext(aws_request_id="req-bad"))
    (document,) = emf_documents(capsys.readouterr().out)
    assert metrics_of(document) == {"ColdStart": [1.0]}


def test_metrics_off_on_lambda_prints_nothing(
    on_lambda: None, import_handler: ImportHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_METRICS="off")
    for event in ("http-api-predict", "http-api-predict", "direct-predict", "http-api-health"):
        assert invoke(mod, event, capsys) == []


# --- under uvicorn: off unless asked --------------------------------------------------------------


@pytest.mark.anyio
async def test_off_outside_lambda_by_default(
    import_handler: ImportHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS))
    async with asgi_client(mod) as client:
        for _ in range(3):
            response = await client.post("/predict", json={"inputs": [DIGIT_8]})
            assert response.status_code == 200
    assert emf_documents(capsys.readouterr().out) == []


@pytest.mark.anyio
async def test_on_outside_lambda_when_asked_one_document_per_request(
    import_handler: ImportHandler, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_METRICS="on")
    documents = []
    async with asgi_client(mod) as client:
        for _ in range(3):
            capsys.readouterr()
            response = await client.post("/predict", json={"inputs": [DIGIT_8]})
            assert response.status_code == 200
            (document,) = emf_documents(capsys.readouterr().out)
            documents.append(metrics_of(document))
        assert (await client.get("/health")).status_code == 200
        assert emf_documents(capsys.readouterr().out) == []
    assert set(documents[0]) == set(UNITS)
    assert [set(d) for d in documents[1:]] == [{"InferenceMs"}] * 2


def test_invalid_metrics_setting_names_the_variable(import_handler: ImportHandler) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"LAZYSERVE_MODEL_URI": str(WEIGHTS), "LAZYSERVE_METRICS": "yes"})
    assert str(info.value) == (
        "LAZYSERVE_METRICS has value 'yes': accepted: 'auto', 'on' or 'off'."
    )
    with pytest.raises(SettingsError, match="LAZYSERVE_METRICS has value 'sometimes'"):
        import_handler(LAZYSERVE_MODEL_URI=str(WEIGHTS), LAZYSERVE_METRICS="sometimes")
