"""build_pretrained: a transformers model from a directory's small files and in-memory weights,
the same to the bit as `from_pretrained(directory)` from local disk, without copying weights."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    BertModel,
)

from lazyserve.errors import ModelFormatError
from lazyserve.pretrained import Pretrained, build_pretrained
from tests.helpers import (
    TINY_TEXTS,
    directory_views,
    in_buffer,
    tiny_bert_classifier,
    tiny_gpt2,
)

URI = "s3://models/tiny/"


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert_classifier(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def tokens() -> torch.Tensor:
    return torch.tensor([[2, 17, 40, 41, 9, 3], [2, 50, 51, 52, 60, 3]])


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(x)
    result: torch.Tensor = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return result


def assert_same_as_from_pretrained(
    built: Pretrained, model_class: Any, directory: Path, **kw: Any
) -> None:
    """The reference: transformers' own from_pretrained from the directory on local disk."""
    ref = model_class.from_pretrained(directory, local_files_only=True, **kw)
    assert type(built.module) is type(ref)
    assert not built.module.training
    assert (outputs(built.module, tokens()) - outputs(ref, tokens())).abs().max().item() == 0
    assert built.config.to_dict() == ref.config.to_dict()
    # Parameters and every buffer, the non-persistent ones (position_ids) included.
    ref_tensors = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    tensors = {**dict(built.module.named_parameters()), **dict(built.module.named_buffers())}
    assert tensors.keys() == ref_tensors.keys()
    for name, tensor in tensors.items():
        assert tensor.dtype == ref_tensors[name].dtype, name
        assert torch.equal(tensor, ref_tensors[name]), name
    if ref.can_generate():
        assert built.module.generation_config.to_dict() == ref.generation_config.to_dict()


def test_a_classifier_with_its_tokenizer(bert: Path) -> None:
    state, buffers = directory_views(bert)
    built = build_pretrained(AutoModelForSequenceClassification, bert, state, URI)

    assert_same_as_from_pretrained(built, AutoModelForSequenceClassification, bert)
    for name, param in built.module.named_parameters():
        assert in_buffer(param, buffers[0]), name  # the fetched bytes, not a copy
    expected = AutoTokenizer.from_pretrained(bert, local_files_only=True)
    assert built.tokenizer(TINY_TEXTS)["input_ids"] == expected(TINY_TEXTS)["input_ids"]


def test_the_model_class_itself(bert: Path) -> None:
    state, _ = directory_views(bert)
    built = build_pretrained(BertForSequenceClassification, bert, state, URI)
    assert_same_as_from_pretrained(built, BertForSequenceClassification, bert)


def test_a_base_model_from_a_task_checkpoint_drops_the_head(
    bert: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state, _ = directory_views(bert)
    with caplog.at_level(logging.WARNING, logger="lazyserve"):
        built = build_pretrained(AutoModel, bert, state, URI)
    assert type(built.module) is BertModel
    assert_same_as_from_pretrained(built, AutoModel, bert)
    assert (
        f"{URI}: 2 tensors of the weights are not used by BertModel: 'classifier.bias', "
        "'classifier.weight'"
    ) in caplog.messages


def test_gpt2_with_tied_embeddings(gpt2: Path) -> None:
    state, buffers = directory_views(gpt2)
    assert "lm_head.weight" not in state  # save_pretrained leaves the tied copy out
    built = build_pretrained(AutoModelForCausalLM, gpt2, state, URI)

    assert_same_as_from_pretrained(built, AutoModelForCausalLM, gpt2)
    module: Any = built.module
    assert module.lm_head.weight is module.transformer.wte.weight
    assert in_buffer(module.lm_head.weight, buffers[0])
    assert built.tokenizer is None  # the directory has no tokenizer files
    ref = AutoModelForCausalLM.from_pretrained(gpt2, local_files_only=True)
    prompt = tokens()[:1]
    generated = module.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, ref.generate(prompt, max_new_tokens=5, do_sample=False))


def test_gpt2_sharded(tmp_path: Path) -> None:
    directory = tiny_gpt2(tmp_path, max_shard_size="20KB")
    state, buffers = directory_views(directory)
    assert len(buffers) > 1
    built = build_pretrained(AutoModelForCausalLM, directory, state, URI)
    assert_same_as_from_pretrained(built, AutoModelForCausalLM, directory)
    for name, param in built.module.named_parameters():
        assert any(in_buffer(param, b) for b in buffers), name


def test_without_generation_config_the_model_config_gives_it(tmp_path: Path) -> None:
    directory = tiny_gpt2(tmp_path)
    (directory / "generation_config.json").unlink()
    state, _ = directory_views(directory)
    built = build_pretrained(AutoModelForCausalLM, directory, state, URI)
    assert_same_as_from_pretrained(built, AutoModelForCausalLM, directory)


def test_a_legacy_position_ids_tensor_is_ignored_as_transformers_ignores_it(
    tmp_path: Path,
) -> None:
    directory = tiny_bert_classifier(tmp_path, tokenizer=False)
    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    tensors["bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    save_file(tensors, weights, metadata={"format": "pt"})
    state, _ = directory_views(directory)
    built = build_pretrained(AutoModelForSequenceClassification, directory, state, URI)
    assert_same_as_from_pretrained(built, AutoModelForSequenceClassification, directory)


def test_legacy_layer_norm_names_are_renamed_as_transformers_renames_them(tmp_path: Path) -> None:
    directory = tiny_bert_classifier(tmp_path, tokenizer=False)
    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in tensors.items()
    }
    assert "bert.embeddings.LayerNorm.gamma" in renamed
    save_file(renamed, weights, metadata={"format": "pt"})
    state, _ = directory_views(directory)
    built = build_pretrained(AutoModelForSequenceClassification, directory, state, URI)
    assert_same_as_from_pretrained(built, AutoModelForSequenceClassification, directory)
    module: Any = built.module
    assert torch.equal(
        module.bert.embeddings.LayerNorm.weight, tensors["bert.embeddings.LayerNorm.weight"]
    )


def test_a_legacy_pytorch_model_bin(tmp_path: Path) -> None:
    # transformers 5 saves safetensors only; older directories hold a torch.save state dict.
    directory = tiny_bert_classifier(tmp_path, tokenizer=False)
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    state, _ = directory_views(directory)
    built = build_pretrained(AutoModelForSequenceClassification, directory, state, URI)
    assert_same_as_from_pretrained(built, AutoModelForSequenceClassification, directory)


def test_a_float32_file_built_in_bfloat16(bert: Path) -> None:
    state, _ = directory_views(bert)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    built = build_pretrained(
        AutoModelForSequenceClassification, bert, state, URI, dtype=torch.bfloat16
    )
    assert {p.dtype for p in built.module.parameters()} == {torch.bfloat16}
    assert_same_as_from_pretrained(
        built, AutoModelForSequenceClassification, bert, dtype=torch.bfloat16
    )


class Logits(torch.nn.Module):
    """What an after_load hook may put in the model's place (a compiled or quantised module)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return outputs(self.inner, x)


def test_after_load_runs_once_and_may_replace_the_module(bert: Path) -> None:
    state, _ = directory_views(bert)
    seen: list[torch.nn.Module] = []

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        seen.append(module)
        return Logits(module)

    built = build_pretrained(AutoModelForSequenceClassification, bert, state, URI, after_load=wrap)
    assert len(seen) == 1 and type(seen[0]) is BertForSequenceClassification
    assert isinstance(built.module, Logits) and built.module.inner is seen[0]
    assert built.config is seen[0].config
    ref = AutoModelForSequenceClassification.from_pretrained(bert, local_files_only=True)
    with torch.inference_mode():
        assert torch.equal(built.module(tokens()), outputs(ref, tokens()))

    kept = build_pretrained(
        AutoModelForSequenceClassification, bert, state, URI, after_load=lambda m: None
    )
    assert type(kept.module) is BertForSequenceClassification


def test_a_checkpoint_without_the_head_is_refused_rather_than_initialised_at_random(
    tmp_path: Path,
) -> None:
    directory = tiny_bert_classifier(tmp_path, tokenizer=False)
    state, _ = directory_views(directory)
    del state["classifier.weight"], state["classifier.bias"]
    with pytest.raises(ModelFormatError) as info:
        build_pretrained(AutoModelForSequenceClassification, directory, state, URI)
    assert str(info.value) == (
        f"{URI}: weights do not fit BertForSequenceClassification: missing keys "
        "['classifier.bias', 'classifier.weight']"
    )


def test_a_head_of_another_shape_is_refused(tmp_path: Path) -> None:
    directory = tiny_bert_classifier(tmp_path, tokenizer=False)
    state, _ = directory_views(directory)
    state["classifier.weight"] = torch.zeros(5, 32)
    state["classifier.bias"] = torch.zeros(5)
    with pytest.raises(ModelFormatError) as info:
        build_pretrained(AutoModelForSequenceClassification, directory, state, URI)
    assert str(info.value) == (
        f"{URI}: weights do not fit BertForSequenceClassification: shape mismatches "
        "[classifier.bias: file (5,), model (3,), classifier.weight: file (5, 32), "
        "model (3, 32)]"
    )


def test_an_unknown_model_type(tmp_path: Path) -> None:
    directory = tiny_bert_classifier(tmp_path, tokenizer=False)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    with pytest.raises(ModelFormatError) as info:
        build_pretrained(AutoModelForSequenceClassification, directory, {}, URI)
    assert str(info.value).startswith(
        f"{URI}: config.json (model_type 'no-such-model') is not a config transformers "
    )
    assert str(info.value).endswith(" can read; the log has its reason")


def test_an_auto_class_without_a_model_for_the_config(bert: Path) -> None:
    with pytest.raises(ModelFormatError) as info:
        build_pretrained(AutoModelForImageClassification, bert, {}, URI)
    assert str(info.value) == (
        f"{URI}: AutoModelForImageClassification has no model for BertConfig (model_type "
        "'bert'); the log has the reason"
    )


def test_a_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError) as info:
        build_pretrained(AutoModel, tmp_path, {}, URI)
    assert str(info.value) == f"{URI}: cannot read config.json: No such file or directory"


def test_importing_the_module_does_not_import_transformers() -> None:
    code = (
        "import sys, lazyserve.pretrained\n"
        "print(sorted(m for m in ('transformers', 'tokenizers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
