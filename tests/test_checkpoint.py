"""checkpoint: which files of a save_pretrained directory a load fetches, and the shard index
checked before any shard name is used as a path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lazyserve.checkpoint import (
    PretrainedFiles,
    ShardIndex,
    merge_shards,
    pretrained_files,
    read_shard_index,
)
from lazyserve.errors import ModelFormatError
from tests.helpers import tiny_bert_classifier, tiny_gpt2

URI = "s3://models/bert/"
INDEX = "model.safetensors.index.json"


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_classifier_directory_with_its_tokenizer(tmp_path: Path) -> None:
    files = pretrained_files(names(tiny_bert_classifier(tmp_path)), URI)
    assert files == PretrainedFiles(
        config="config.json",
        weights=("model.safetensors",),
        index=None,
        generation_config=None,
        tokenizer=("tokenizer.json", "tokenizer_config.json"),
        other=(),
    )
    assert files.has_tokenizer
    assert files.needed == ("config.json", "tokenizer.json", "tokenizer_config.json")


def test_a_sharded_directory_names_its_index(tmp_path: Path) -> None:
    directory = tiny_gpt2(tmp_path, max_shard_size="20KB")
    files = pretrained_files(names(directory), URI)
    assert (files.weights, files.index) == ((), INDEX)
    assert files.generation_config == "generation_config.json"
    assert not files.has_tokenizer
    assert files.needed == ("config.json", INDEX, "generation_config.json")
    index = read_shard_index((directory / INDEX).read_bytes(), URI + INDEX)
    shards = sorted(n for n in names(directory) if n.endswith(".safetensors"))
    assert len(shards) > 1
    assert index.files == tuple(shards)


@pytest.mark.parametrize(
    ("present", "weights", "index"),
    [
        (["model.safetensors", INDEX, "pytorch_model.bin"], ("model.safetensors",), None),
        ([INDEX, "pytorch_model.bin"], (), INDEX),
        (["pytorch_model.bin", "pytorch_model.bin.index.json"], ("pytorch_model.bin",), None),
        (["pytorch_model.bin.index.json"], (), "pytorch_model.bin.index.json"),
    ],
)
def test_weights_are_chosen_as_transformers_chooses_them(
    present: list[str], weights: tuple[str, ...], index: str | None
) -> None:
    files = pretrained_files(["config.json", *present], URI)
    assert (files.weights, files.index) == (weights, index)


def test_files_a_build_does_not_read_are_other() -> None:
    listed = [
        "config.json",
        "model.safetensors",
        "README.md",
        "training_args.bin",
        "1_Pooling/config.json",
        "vocab.txt",
        "additional_chat_templates/tools.jinja",
    ]
    files = pretrained_files(listed, URI)
    assert files.tokenizer == ("additional_chat_templates/tools.jinja", "vocab.txt")
    assert files.other == ("1_Pooling/config.json", "README.md", "training_args.bin")
    assert files.has_tokenizer  # an old BERT directory: vocab.txt alone


def test_a_chat_template_alone_is_not_a_tokenizer() -> None:
    files = pretrained_files(["config.json", "model.safetensors", "chat_template.jinja"], URI)
    assert files.tokenizer == ("chat_template.jinja",)
    assert not files.has_tokenizer


def test_a_directory_without_config() -> None:
    with pytest.raises(ModelFormatError) as info:
        pretrained_files(["model.safetensors", "README.md"], URI)
    assert str(info.value) == (
        f"{URI}: not a transformers model directory: it has no config.json (found 'README.md', "
        "'model.safetensors'); save the model with save_pretrained"
    )


def test_a_directory_without_weights() -> None:
    with pytest.raises(ModelFormatError) as info:
        pretrained_files(["config.json"], URI)
    assert str(info.value) == (
        f"{URI}: no weights in the model directory: none of model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json "
        "(found 'config.json')"
    )


def index_error(data: bytes | str) -> str:
    with pytest.raises(ModelFormatError) as info:
        read_shard_index(data, URI + INDEX)
    return str(info.value)


@pytest.mark.parametrize(
    "shard",
    [
        "../model-1.safetensors",
        "sub/model-1.safetensors",
        "/etc/model.safetensors",
        "..\\model.safetensors",
        "..",
        "model-1.py",
        ".hidden.safetensors",
        "",
    ],
)
def test_a_shard_name_must_be_a_plain_file_name(shard: str) -> None:
    data = json.dumps({"weight_map": {"a": "model-1.safetensors", "b": shard}})
    assert index_error(data) == (
        f"{URI}{INDEX}: not a valid shard index: shard {shard!r} is not a plain file name in "
        "the same directory (no '/', '\\', '..', and ending in .safetensors or .bin)"
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff", "it is not JSON"),
        ("[1]", "it is not a JSON object"),
        ("{}", 'it has no "weight_map" object of tensor name -> file name'),
        ('{"weight_map": {}}', 'it has no "weight_map" object of tensor name -> file name'),
        ('{"weight_map": {"a": 1}}', "tensor 'a' maps to int, not a file name"),
        (
            '{"weight_map": {"a": "m-1.safetensors", "b": "m-2.bin"}}',
            "its shards mix .safetensors and .bin files ('m-1.safetensors', 'm-2.bin')",
        ),
    ],
)
def test_a_malformed_index(data: bytes | str, reason: str) -> None:
    assert index_error(data) == f"{URI}{INDEX}: not a valid shard index: {reason}"


def test_the_index_keeps_its_weight_map() -> None:
    data = json.dumps(
        {
            "metadata": {"total_size": 8},
            "weight_map": {"b": "m-2.safetensors", "a": "m-1.safetensors"},
        }
    )
    index = read_shard_index(data, URI)
    assert index == ShardIndex(
        files=("m-1.safetensors", "m-2.safetensors"),
        weight_map={"b": "m-2.safetensors", "a": "m-1.safetensors"},
    )


INDEX_AB = ShardIndex(
    files=("1.safetensors", "2.safetensors"),
    weight_map={"a": "1.safetensors", "b": "2.safetensors"},
)


def test_shards_merge_into_one_state_dict() -> None:
    merged = merge_shards({"1.safetensors": {"a": 1}, "2.safetensors": {"b": 2}}, URI, INDEX_AB)
    assert merged == {"a": 1, "b": 2}


def test_a_missing_shard() -> None:
    with pytest.raises(ModelFormatError) as info:
        merge_shards({"1.safetensors": {"a": 1}}, URI, INDEX_AB)
    assert str(info.value) == f"{URI}: shards named by the index are missing: '2.safetensors'"


def test_a_tensor_in_two_shards() -> None:
    with pytest.raises(ModelFormatError) as info:
        merge_shards({"1.safetensors": {"a": 1}, "2.safetensors": {"a": 1, "b": 2}}, URI)
    assert str(info.value) == (
        f"{URI}: tensors in more than one shard: 'a' in 1.safetensors and 2.safetensors"
    )


def test_a_tensor_elsewhere_than_the_index_says() -> None:
    # Shards of two different saves mixed together, say.
    with pytest.raises(ModelFormatError) as info:
        merge_shards({"1.safetensors": {"a": 1, "b": 2}, "2.safetensors": {}}, URI, INDEX_AB)
    assert str(info.value) == f"{URI}: tensors not in the shard the index names: 'b'"
