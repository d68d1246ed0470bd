"""Hugging Face models as transformers saves them, served with `Service.from_pretrained`: a BERT
classifier directory with its tokenizer, GPT-2 with tied embeddings in one file and in shards, a
legacy extra key, many models under one prefix; from moto's S3 server over HTTP (pushed with
`lazyserve push DIR`), from local disk, and under AWS's runtime client. Every model is compared
with transformers' own `from_pretrained` from local disk: max abs diff 0."""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lazyserve import ModelFormatError, Service, Settings
from lazyserve.publish import push_directory
from tests.helpers import (
    BUCKET,
    FAKE_CREDENTIALS,
    REGION,
    ROOT,
    StartFunction,
    http_body,
    tiny_bert_classifier,
    tiny_gpt2,
)
from tests.s3server import CountingS3Server

EXAMPLE_APP = "examples.huggingface.app"
TEXTS = ["the quick brown fox", "hello"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model directories, built offline from small configs with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    bert = tiny_bert_classifier(root / "bert")
    legacy = tiny_bert_classifier(root / "legacy", seed=1)
    # As transformers < 4.31 saved BERT: the position_ids buffer in the file.
    state = load_file(legacy / "model.safetensors")
    state["bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    save_file(state, str(legacy / "model.safetensors"), metadata={"format": "pt"})
    return {
        "bert": bert,
        "legacy": legacy,
        "gpt2": tiny_gpt2(root / "gpt2"),
        "gpt2-sharded": tiny_gpt2(root / "gpt2-sharded", max_shard_size="20KB"),
    }


@pytest.fixture(scope="module")
def pushed(dirs: dict[str, Path], s3_server: CountingS3Server) -> dict[str, str]:
    """Each directory pushed to moto's S3 with `push_directory` (what `lazyserve push DIR`
    does): name -> its s3:// URI; `many/` holds two of them as models of one prefix."""
    import boto3

    client = boto3.client(
        "s3",
        region_name=REGION,
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    uris = {}
    for name, path in dirs.items():
        uris[name] = push_directory(path, f"s3://{BUCKET}/hf/{name}/", client=client).uri
    for name in ("bert", "legacy"):
        push_directory(dirs[name], f"s3://{BUCKET}/hf/many/{name}/", client=client)
    return uris


def serve(model_class: Any, uri: str, **settings: Any) -> Service[Any]:
    return Service.from_pretrained(
        model_class, settings=Settings(model_uri=uri, **settings), autostart=False
    )


def reference(model_class: Any, path: Path) -> Any:
    return model_class.from_pretrained(path).eval()


def tokens(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt"))


def assert_same_model(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Every parameter and buffer equal, names and dtypes included."""
    mine = dict(ours.state_dict())
    expected = dict(theirs.state_dict())
    assert mine.keys() == expected.keys()
    for name, tensor in expected.items():
        assert mine[name].dtype == tensor.dtype, name
        assert torch.equal(mine[name], tensor), name
    assert not ours.training


# --- from S3 --------------------------------------------------------------------------------------


def test_a_bert_classifier_directory_from_s3_is_from_pretrained_bit_for_bit(
    s3: CountingS3Server, dirs: dict[str, Path], pushed: dict[str, str]
) -> None:
    from transformers import AutoModelForSequenceClassification

    service = serve(AutoModelForSequenceClassification, pushed["bert"])
    loaded = service.model.get()
    theirs = reference(AutoModelForSequenceClassification, dirs["bert"])
    assert type(loaded.module) is type(theirs)
    assert_same_model(loaded.module, theirs)
    batch = tokens(dirs["bert"])
    assert loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")["input_ids"].tolist() == (
        batch["input_ids"].tolist()
    )
    with torch.inference_mode():
        diff = (loaded.module(**batch).logits - theirs(**batch).logits).abs().max()
    assert diff.item() == 0
    assert loaded.config.num_labels == 3
    # The sha256 of the one weights file, as push stored it, the bytes checked by the CRC
    # stored beside it.
    file_sha = loaded.info.files["model.safetensors"]
    assert loaded.info.sha256 == file_sha
    assert file_sha == hashlib.sha256((dirs["bert"] / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.info.verified_by == "crc64nvme"
    assert loaded.info.size_bytes == (dirs["bert"] / "model.safetensors").stat().st_size


@pytest.mark.parametrize("name", ["gpt2", "gpt2-sharded"])
def test_gpt2_with_tied_embeddings_is_tied_and_equal(
    name: str, s3: CountingS3Server, dirs: dict[str, Path], pushed: dict[str, str]
) -> None:
    from transformers import AutoModelForCausalLM

    loaded = serve(AutoModelForCausalLM, pushed[name]).model.get()
    theirs = reference(AutoModelForCausalLM, dirs[name])
    module = loaded.module
    # lm_head.weight is not in the file: tied to the embeddings, the same storage.
    assert module.lm_head.weight.data_ptr() == module.transformer.wte.weight.data_ptr()
    assert_same_model(module, theirs)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        assert (module(ids).logits - theirs(ids).logits).abs().max().item() == 0
        ours_text = module.generate(ids, max_new_tokens=5, do_sample=False)
        theirs_text = theirs.generate(ids, max_new_tokens=5, do_sample=False)
    assert ours_text.tolist() == theirs_text.tolist()
    shards = sorted(p.name for p in dirs[name].glob("*.safetensors"))
    assert sorted(loaded.info.files) == shards
    assert loaded.info.verified_by == "crc64nvme"  # every shard's stored CRC
    if name == "gpt2-sharded":
        assert len(shards) > 1
        # Every shard fetched once, each in ranged GETs of its own object.
        for shard in shards:
            assert s3.object_gets(BUCKET, f"hf/{name}/{shard}"), shard


def test_a_legacy_extra_key_is_ignored_as_transformers_ignores_it(
    s3: CountingS3Server, dirs: dict[str, Path], pushed: dict[str, str]
) -> None:
    from transformers import AutoModelForSequenceClassification

    loaded = serve(AutoModelForSequenceClassification, pushed["legacy"]).model.get()
    theirs = reference(AutoModelForSequenceClassification, dirs["legacy"])
    assert_same_model(loaded.module, theirs)


def test_many_models_under_one_prefix_are_model_directories(
    s3: CountingS3Server, dirs: dict[str, Path], pushed: dict[str, str]
) -> None:
    from transformers import AutoModelForSequenceClassification

    service = serve(AutoModelForSequenceClassification, f"s3://{BUCKET}/hf/many/")
    assert service.pool is not None
    for name in ("bert", "legacy"):
        with service.pool.lease(name) as loaded:
            theirs = reference(AutoModelForSequenceClassification, dirs[name])
            assert_same_model(loaded.module, theirs)
            # The budget counts a model's weights: the sum of its files.
            assert loaded.info.size_bytes == sum(
                p.stat().st_size for p in dirs[name].glob("*.safetensors")
            )
    assert {m["name"] for m in service.pool.describe()["models"]} == {"bert", "legacy"}


# --- the example app, in process and under AWS's runtime client -----------------------------------


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    def load(uri: str) -> ModuleType:
        monkeypatch.setenv("LAZYSERVE_MODEL_URI", uri)
        sys.modules.pop(EXAMPLE_APP, None)
        return importlib.import_module(EXAMPLE_APP)

    yield load
    sys.modules.pop(EXAMPLE_APP, None)


def expected_labels(path: Path) -> list[str]:
    from transformers import AutoModelForSequenceClassification

    theirs = reference(AutoModelForSequenceClassification, path)
    with torch.inference_mode():
        best = theirs(**tokens(path)).logits.argmax(dim=-1).tolist()
    return [theirs.config.id2label[i] for i in best]


@pytest.mark.anyio
async def test_the_example_serves_the_directory_and_many_of_them(
    s3: CountingS3Server, dirs: dict[str, Path], pushed: dict[str, str], example: Any
) -> None:
    mod = example(pushed["bert"])
    transport = httpx.ASGITransport(app=mod.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post("/predict", json={"texts": TEXTS})
        assert response.status_code == 200, response.text
        assert response.json() == {"labels": expected_labels(dirs["bert"])}
        meta = (await client.get("/model")).json()
        assert meta["files"] == {"model.safetensors": mod.service.model.get().info.sha256}
        assert "load" in response.headers["server-timing"]
        assert (await client.post("/predict", json={"texts": []})).status_code == 422
    many = example(f"s3://{BUCKET}/hf/many/")
    transport = httpx.ASGITransport(app=many.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for name in ("bert", "legacy"):
            response = await client.post(f"/models/{name}/predict", json={"texts": TEXTS})
            assert response.status_code == 200, response.text
            assert response.json() == {"labels": expected_labels(dirs[name])}
        missing = await client.post("/models/nobody/predict", json={"texts": TEXTS})
        assert missing.status_code == 404
        assert "nobody" in missing.json()["detail"]["message"]


@pytest.mark.parametrize("slash", ["/", ""], ids=["slash", "no-slash"])
def test_a_local_directory_is_served_too(dirs: dict[str, Path], slash: str) -> None:
    from transformers import AutoModelForSequenceClassification

    loaded = serve(AutoModelForSequenceClassification, f"{dirs['bert']}{slash}").model.get()
    assert_same_model(loaded.module, reference(AutoModelForSequenceClassification, dirs["bert"]))


def test_lambda_runtime_serves_the_directory_fetched_by_the_start_up_download(
    start_function: StartFunction,
    s3: CountingS3Server,
    dirs: dict[str, Path],
    pushed: dict[str, str],
) -> None:
    from tests.helpers import with_body

    event = with_body("http-api-predict", json.dumps({"texts": TEXTS}).encode())
    function = start_function(
        LAZYSERVE_MODEL_URI=pushed["bert"],
        LAZYSERVE_LOAD="background",
        _HANDLER=f"{EXAMPLE_APP}.handler",
        HF_HUB_OFFLINE="1",
        LAZYSERVE_LOG_LEVEL="DEBUG",
    )
    request = function.api.invoke(event)
    result = function.api.wait_result(request, 120, abort=function.exited)
    function.stop()
    assert http_body(result) == {"labels": expected_labels(dirs["bert"])}
    log = function.log()
    # The helper forked at interpreter start listed and fetched the directory (config,
    # tokenizer, weights) while the function imported torch and transformers.
    assert "from the download helper" in log
    assert "downloading again" not in log
    loaded = [json.loads(line) for line in log.splitlines() if '"model loaded from' in line]
    assert len(loaded) == 1 and loaded[0]["format"] == "safetensors"


# --- options: dtype, after_load -------------------------------------------------------------------


def test_dtype_casts_while_building_and_after_load_runs_once(
    s3: CountingS3Server, dirs: dict[str, Path], pushed: dict[str, str]
) -> None:
    from transformers import AutoModelForSequenceClassification

    calls: list[torch.nn.Module] = []

    def after(module: torch.nn.Module) -> None:
        calls.append(module)

    service = Service.from_pretrained(
        AutoModelForSequenceClassification,
        settings=Settings(model_uri=pushed["bert"]),
        dtype="bfloat16",
        after_load=after,
        autostart=False,
    )
    loaded = service.model.get()
    service.model.get()
    assert calls == [loaded.module]
    assert {p.dtype for p in loaded.module.parameters()} == {torch.bfloat16}
    theirs = AutoModelForSequenceClassification.from_pretrained(
        dirs["bert"], dtype=torch.bfloat16
    ).eval()
    assert_same_model(loaded.module, theirs)
    assert loaded.info.after_load_seconds >= 0


# --- what is refused ------------------------------------------------------------------------------


def test_push_refuses_a_directory_without_config_or_weights(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFormatError, match=r"no config\.json"):
        push_directory(empty, f"s3://{BUCKET}/hf/x/")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}")
    with pytest.raises(ModelFormatError, match="no weights in the model directory"):
        push_directory(config_only, f"s3://{BUCKET}/hf/x/")
    with pytest.raises(ValueError, match="ending in /"):
        push_directory(config_only, f"s3://{BUCKET}/hf/x")


def test_the_cli_pushes_a_directory_and_names_each_weights_file(
    s3: CountingS3Server, dirs: dict[str, Path]
) -> None:
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "lazyserve"),
            "push",
            str(dirs["gpt2-sharded"]),
            f"s3://{BUCKET}/hf/cli/",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "AWS_ENDPOINT_URL_S3": s3.endpoint},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"uri: s3://{BUCKET}/hf/cli/"
    shards = sorted(p.name for p in dirs["gpt2-sharded"].glob("*.safetensors"))
    assert [line.split(":")[0] for line in lines[2:]] == [f"sha256 {s}" for s in shards]


def test_a_function_that_does_not_use_from_pretrained_never_imports_transformers() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import handler.app"],
        cwd=ROOT,
        env={
            **__import__("os").environ,
            "LAZYSERVE_MODEL_URI": str(ROOT / "handler/weights/digits.safetensors"),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert "lazyserve.aws" in imported  # the whole serving stack was imported
    assert [m for m in imported if m.split(".")[0] in ("transformers", "tokenizers")] == []


@pytest.mark.anyio
async def test_the_examples_model_is_the_same_every_run_and_takes_a_long_text(
    tmp_path: Path, example: Any
) -> None:
    from examples.huggingface.make_model import make_model

    first, second = make_model(tmp_path / "one"), make_model(tmp_path / "two")
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    mod = example(str(first))
    transport = httpx.ASGITransport(app=mod.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        # Longer than the model's 128 positions: the tokenizer truncates it (it used to overrun
        # the position embeddings, a 500).
        long_text = " ".join(["lovely"] * 1000)
        response = await client.post("/predict", json={"texts": [long_text, "terrible"]})
    assert response.status_code == 200, response.text
    assert len(response.json()["labels"]) == 2
