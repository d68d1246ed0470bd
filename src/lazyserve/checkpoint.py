"""What a transformers `save_pretrained` directory holds: which files are the weights, config and
tokenizer, and the shard index. Standard library only: the sources read it before torch."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from lazyserve.errors import ModelFormatError, few

__all__ = [
    "CONFIG",
    "GENERATION_CONFIG",
    "TOKENIZER_FILES",
    "PretrainedFiles",
    "ShardIndex",
    "has_tokenizer",
    "merge_shards",
    "pretrained_files",
    "read_shard_index",
]

T = TypeVar("T")

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
# transformers' own order of preference in a local directory (modeling_utils,
# _get_resolved_checkpoint_files): one safetensors file, its shards, then the pickled forms.
_WEIGHTS = (
    ("model.safetensors", None),
    (None, "model.safetensors.index.json"),
    ("pytorch_model.bin", None),
    (None, "pytorch_model.bin.index.json"),
)
_CHAT_TEMPLATE_FILES = frozenset({"chat_template.jinja", "chat_template.json"})
# The files tokenizers save (tokenization_utils_base's names and the `vocab_files_names` of
# transformers' tokenizer classes); AutoTokenizer reads the ones its class needs.
TOKENIZER_FILES = _CHAT_TEMPLATE_FILES | {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "sentencepiece.model",
    "spm.model",
}
_CHAT_TEMPLATES = "additional_chat_templates/"


@dataclass(frozen=True)
class PretrainedFiles:
    """The files of a save_pretrained directory, by role (names relative to the directory).
    `weights` is empty when the weights are sharded: `index` names the shard index, whose
    `read_shard_index(...).files` are the shards."""

    config: str
    weights: tuple[str, ...]
    index: str | None
    generation_config: str | None
    tokenizer: tuple[str, ...]
    other: tuple[str, ...]

    @property
    def needed(self) -> tuple[str, ...]:
        """Every file but the weights and shards that a build reads: config, generation config,
        tokenizer, shard index."""
        optional = (self.index, self.generation_config)
        return (self.config, *(n for n in optional if n is not None), *self.tokenizer)

    @property
    def has_tokenizer(self) -> bool:
        return has_tokenizer(self.tokenizer)


def has_tokenizer(names: Iterable[str]) -> bool:
    """Whether the files hold a tokenizer (a chat template alone is not one)."""
    return any(n in TOKENIZER_FILES and n not in _CHAT_TEMPLATE_FILES for n in names)


def pretrained_files(names: Iterable[str], uri: str) -> PretrainedFiles:
    """Sort a directory's file names (relative, `/`-separated) into config, weights (as
    transformers chooses them), generation config, tokenizer and other files; ModelFormatError
    when there is no config.json or no weights."""
    present = set(names)
    if CONFIG not in present:
        raise ModelFormatError(
            f"{uri}: not a transformers model directory: it has no {CONFIG} "
            f"(found {_listed(sorted(present))}); save the model with save_pretrained"
        )
    chosen = next(((w, i) for w, i in _WEIGHTS if (w or i) in present), None)
    if chosen is None:
        raise ModelFormatError(
            f"{uri}: no weights in the model directory: none of "
            f"{', '.join(w or i or '' for w, i in _WEIGHTS)} (found {_listed(sorted(present))})"
        )
    single, index = chosen
    tokenizer = sorted(
        n
        for n in present
        if n in TOKENIZER_FILES or (n.startswith(_CHAT_TEMPLATES) and n.endswith(".jinja"))
    )
    generation = GENERATION_CONFIG if GENERATION_CONFIG in present else None
    used = {CONFIG, single, index, generation, *tokenizer}
    return PretrainedFiles(
        config=CONFIG,
        weights=(single,) if single else (),
        index=index,
        generation_config=generation,
        tokenizer=tuple(tokenizer),
        other=tuple(sorted(present - used)),
    )


@dataclass(frozen=True)
class ShardIndex:
    """A `model.safetensors.index.json`: which shard file holds each tensor."""

    files: tuple[str, ...]  # the shard file names, sorted
    weight_map: Mapping[str, str]  # tensor name -> shard file name


def read_shard_index(data: bytes | str, uri: str) -> ShardIndex:
    """Parse and check a shard index: a JSON object whose `weight_map` maps tensor names to
    plain file names in the same directory (no `/`, `\\` or `..`), all `.safetensors` or all
    `.bin`."""

    def bad(reason: str) -> ModelFormatError:
        return ModelFormatError(f"{uri}: not a valid shard index: {reason}")

    try:
        index = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("it is not JSON") from None
    if not isinstance(index, dict):
        raise bad("it is not a JSON object")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise bad('it has no "weight_map" object of tensor name -> file name')
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise bad(f"tensor {name[:100]!r} maps to {type(file).__name__}, not a file name")
    files = sorted(set(weight_map.values()))
    for file in files:
        if not _plain_name(file):
            raise bad(
                f"shard {file[:100]!r} is not a plain file name in the same directory "
                "(no '/', '\\', '..', and ending in .safetensors or .bin)"
            )
    if len({file.rsplit(".", 1)[1] for file in files}) > 1:
        raise bad(f"its shards mix .safetensors and .bin files ({_listed(files)})")
    return ShardIndex(files=tuple(files), weight_map=dict(weight_map))


def _plain_name(name: str) -> bool:
    return (
        0 < len(name) <= 255
        and name not in (".", "..")
        and not any(c in name for c in "/\\\x00")
        and name.endswith((".safetensors", ".bin"))
        and not name.startswith(".")
    )


def merge_shards(
    shards: Mapping[str, Mapping[str, T]], uri: str, index: ShardIndex | None = None
) -> dict[str, T]:
    """One state dict from the shards' (file name -> state dict); ModelFormatError when a tensor
    is in two shards or, with `index`, when a shard is missing or a tensor is not where the
    index says."""
    if index is not None:
        absent = [file for file in index.files if file not in shards]
        if absent:
            raise ModelFormatError(
                f"{uri}: shards named by the index are missing: {_listed(absent)}"
            )
    merged: dict[str, T] = {}
    where: dict[str, str] = {}
    twice: list[str] = []
    for file, state in shards.items():
        for name, tensor in state.items():
            if name in merged:
                twice.append(f"{name!r} in {where[name]} and {file}")
            merged[name] = tensor
            where[name] = file
    if twice:
        raise ModelFormatError(
            f"{uri}: tensors in more than one shard: {_listed(twice, quote=False)}"
        )
    if index is not None:
        misplaced = sorted(
            name for name, file in index.weight_map.items() if where.get(name) != file
        )
        if misplaced:
            raise ModelFormatError(
                f"{uri}: tensors not in the shard the index names: {_listed(misplaced)}"
            )
    return merged


def _listed(items: list[str], *, quote: bool = True) -> str:
    return few(items, quote=quote) or "nothing"
