"""Settings: LAZYSERVE_* variables, validated once, with messages that name variable and value."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest

import lazyserve.sources.s3
from lazyserve.errors import LazyserveError, SettingsError
from lazyserve.settings import Settings, load_settings, parse_model_uri

URI = "s3://models/digits.safetensors"
FORMS = "s3://bucket/key, s3://bucket/key?versionId=V, file:///abs/path or a plain path"
DIGEST = "0123456789abcdef" * 4


def settings(**env: str) -> Settings:
    return load_settings({"LAZYSERVE_MODEL_URI": URI, **env})


def settings_error(**env: str) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    return str(info.value)


def test_defaults() -> None:
    s = settings()
    assert s.model_uri == URI
    assert s.model_sha256 is None
    assert s.load == "lazy"
    assert s.load_wait == 25
    assert s.s3_concurrency == 8
    assert s.s3_part_size == 8 * 1024 * 1024 == 8388608
    assert s.torch_threads == len(os.sched_getaffinity(0))
    assert s.log_level == "INFO"


def test_every_variable_is_read() -> None:
    s = settings(
        LAZYSERVE_MODEL_SHA256=DIGEST,
        LAZYSERVE_LOAD="background",
        LAZYSERVE_LOAD_WAIT="2.5",
        LAZYSERVE_S3_CONCURRENCY="16",
        LAZYSERVE_S3_PART_SIZE="4096",
        LAZYSERVE_TORCH_THREADS="3",
        LAZYSERVE_LOG_LEVEL="debug",
    )
    assert s.model_sha256 == DIGEST
    assert s.load == "background"
    assert s.load_wait == 2.5
    assert s.s3_concurrency == 16
    assert s.s3_part_size == 4096
    assert s.torch_threads == 3
    assert s.log_level == "DEBUG"


@pytest.mark.parametrize("mode", ["lazy", "eager", "background", "EAGER"])
def test_load_modes(mode: str) -> None:
    assert settings(LAZYSERVE_LOAD=mode).load == mode.lower()


def test_sha256_is_normalised_to_lower_case() -> None:
    assert settings(LAZYSERVE_MODEL_SHA256=DIGEST.upper()).model_sha256 == DIGEST


def test_empty_sha256_means_unset() -> None:
    assert settings(LAZYSERVE_MODEL_SHA256="").model_sha256 is None


def test_s3_uri() -> None:
    uri = parse_model_uri("s3://b/k")
    assert (uri.is_s3, uri.bucket, uri.key, uri.version_id, uri.path) == (
        True,
        "b",
        "k",
        None,
        None,
    )


def test_s3_uri_with_version() -> None:
    uri = parse_model_uri("s3://b/dir/model.safetensors?versionId=3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrH")
    assert uri.bucket == "b"
    assert uri.key == "dir/model.safetensors"
    assert uri.version_id == "3HL4kqtJlcpXroDTDmJ.rmSpXd3dIbrH"
    assert uri.suffix == ".safetensors"


def test_file_uri() -> None:
    uri = parse_model_uri("file:///abs/p.pt")
    assert not uri.is_s3
    assert uri.path == Path("/abs/p.pt")
    assert uri.suffix == ".pt"


@pytest.mark.parametrize("path", ["weights/model.safetensors", "/opt/ml/model.safetensors"])
def test_plain_paths(path: str) -> None:
    uri = parse_model_uri(path)
    assert not uri.is_s3
    assert uri.path == Path(path)


@pytest.mark.parametrize(
    "uri", ["s3://b/k", "s3://b/k?versionId=V", "file:///abs/p", "rel/p", "/abs/p"]
)
def test_load_settings_accepts_each_uri_form(uri: str) -> None:
    assert load_settings({"LAZYSERVE_MODEL_URI": uri}).uri == parse_model_uri(uri)


@pytest.mark.parametrize("scheme", ["http", "https", "gs", "ftp"])
def test_other_schemes_are_refused(scheme: str) -> None:
    value = f"{scheme}://x/y"
    assert settings_error(LAZYSERVE_MODEL_URI=value) == (
        f"LAZYSERVE_MODEL_URI has value '{value}': scheme '{scheme}' is not supported; "
        f"accepted: {FORMS}."
    )


def test_missing_model_uri() -> None:
    assert settings_error() == f"LAZYSERVE_MODEL_URI is required but not set: give {FORMS}."


@pytest.mark.parametrize(
    "value", ["s3://b", "s3://b/", "s3://b/k?foo=1", "s3://b/k?versionId=", "file://host/p", ""]
)
def test_malformed_uris_are_refused(value: str) -> None:
    message = settings_error(LAZYSERVE_MODEL_URI=value)
    assert message.startswith(f"LAZYSERVE_MODEL_URI has value '{value}': ")


def test_bad_load_mode() -> None:
    assert settings_error(LAZYSERVE_MODEL_URI=URI, LAZYSERVE_LOAD="sometimes") == (
        "LAZYSERVE_LOAD has value 'sometimes': accepted: 'lazy', 'eager' or 'background'."
    )


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("LAZYSERVE_S3_PART_SIZE", "12", "4096"),
        ("LAZYSERVE_S3_CONCURRENCY", "0", "greater than or equal to 1"),
        ("LAZYSERVE_S3_CONCURRENCY", "4.5", "not a valid integer"),
        ("LAZYSERVE_LOAD_WAIT", "abc", "not a valid number"),
        ("LAZYSERVE_LOAD_WAIT", "0", "greater than 0"),
        ("LAZYSERVE_TORCH_THREADS", "many", "not a valid integer"),
        ("LAZYSERVE_MODEL_SHA256", "xyz", "64 hexadecimal characters"),
        ("LAZYSERVE_LOG_LEVEL", "verbose", "'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"),
    ],
)
def test_bad_values_name_variable_value_and_what_is_accepted(
    name: str, value: str, reason: str
) -> None:
    message = settings_error(LAZYSERVE_MODEL_URI=URI, **{name: value})
    assert message.startswith(f"{name} has value '{value}': ")
    assert reason in message


def test_every_bad_variable_is_reported_at_once() -> None:
    message = settings_error(LAZYSERVE_MODEL_URI="http://x/y", LAZYSERVE_S3_CONCURRENCY="0")
    assert "LAZYSERVE_MODEL_URI has value 'http://x/y'" in message
    assert "LAZYSERVE_S3_CONCURRENCY has value '0'" in message


def test_settings_error_is_a_lazyserve_error_without_a_pydantic_chain() -> None:
    with pytest.raises(LazyserveError) as info:
        load_settings({})
    assert isinstance(info.value, SettingsError)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_load_settings_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYSERVE_MODEL_URI", "s3://b/k?versionId=V")
    monkeypatch.setenv("LAZYSERVE_S3_CONCURRENCY", "3")
    s = load_settings()
    assert s.uri.version_id == "V"
    assert s.s3_concurrency == 3


def test_an_explicit_mapping_ignores_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYSERVE_LOAD", "eager")
    assert load_settings({"LAZYSERVE_MODEL_URI": URI}).load == "lazy"


@pytest.fixture
def no_boto3_clients(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record (and refuse) any boto3 client creation."""
    created: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        created.append((args, kwargs))
        raise AssertionError("a boto3 client was created")

    monkeypatch.setattr(boto3.session.Session, "client", refuse)
    monkeypatch.setattr(boto3, "client", refuse)
    return created


def test_importing_the_function_with_a_bad_uri_fails_at_import(
    import_handler: Callable[..., ModuleType], no_boto3_clients: list[Any]
) -> None:
    with pytest.raises(SettingsError, match="LAZYSERVE_MODEL_URI has value 'http://x/y'"):
        import_handler(LAZYSERVE_MODEL_URI="http://x/y")
    assert lazyserve.sources.s3._clients == {}
    assert no_boto3_clients == []


def test_settings_fail_before_an_eager_load_touches_s3(
    import_handler: Callable[..., ModuleType], no_boto3_clients: list[Any]
) -> None:
    # A valid S3 URI and LAZYSERVE_LOAD=eager: if validation came after the load, S3 would be
    # called during import.
    with pytest.raises(SettingsError, match="LAZYSERVE_S3_PART_SIZE has value '12'"):
        import_handler(
            LAZYSERVE_MODEL_URI="s3://lazyserve-models/digits/digits.safetensors",
            LAZYSERVE_LOAD="eager",
            LAZYSERVE_S3_PART_SIZE="12",
        )
    assert lazyserve.sources.s3._clients == {}
    assert no_boto3_clients == []
