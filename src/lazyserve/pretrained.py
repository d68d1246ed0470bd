"""Hugging Face models built from in-memory weights exactly as `from_pretrained(directory)` builds
them from disk, with their tokenizer; transformers is imported only when a model is built."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lazyserve.build import FLOAT_DTYPES
from lazyserve.checkpoint import CONFIG, GENERATION_CONFIG, has_tokenizer
from lazyserve.errors import ModelFormatError, few

if TYPE_CHECKING:
    from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

__all__ = ["AfterLoad", "Pretrained", "build_pretrained"]

log = logging.getLogger("lazyserve")
# A hook run once on the built model (torch.compile, quantisation): None keeps the model.
AfterLoad = Callable[[torch.nn.Module], "torch.nn.Module | None"]


@dataclass(frozen=True)
class Pretrained:
    """A built transformers model (in eval mode), its tokenizer (None when the directory has
    none), its config, and how long each step took."""

    module: torch.nn.Module
    tokenizer: Any
    config: PretrainedConfig
    build_seconds: float
    after_load_seconds: float
    tokenizer_seconds: float


def build_pretrained(
    model_class: Any,
    directory: str | os.PathLike[str],
    state: Mapping[str, torch.Tensor],
    uri: str,
    *,
    dtype: torch.dtype | None = None,
    after_load: AfterLoad | None = None,
) -> Pretrained:
    """`model_class.from_pretrained(directory)` with the weights taken from `state` (views stay
    views) instead of the directory's weights files; `model_class` is a transformers model class
    or an Auto class (AutoModelForSequenceClassification...). `dtype` casts while building;
    `after_load(module)` runs once after the build and may return a replacement module."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype}")
    folder = Path(directory)
    started = time.perf_counter()
    with _quiet_transformers():
        config = _read_config(model_class, folder, uri)
        cls, config = _concrete_class(model_class, config, uri)
        model = _from_state(cls, config, folder, state, uri, dtype)
    config = model.config
    module: torch.nn.Module = model
    built = time.perf_counter()
    if after_load is not None:
        replaced = after_load(module)
        if replaced is not None:
            module = replaced
    loaded = time.perf_counter()
    tokenizer = _tokenizer(folder, uri)
    return Pretrained(
        module=module,
        tokenizer=tokenizer,
        config=config,
        build_seconds=built - started,
        after_load_seconds=loaded - built,
        tokenizer_seconds=time.perf_counter() - loaded,
    )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" progress bar on stderr while lazyserve builds (on Lambda each bar
    would be lines of text among the JSON log lines); transformers' own switch, put back after.
    What transformers would warn about is in lazyserve's log instead (see _check_loading)."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if bars:
            transformers_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _read_config(model_class: Any, folder: Path, uri: str) -> PretrainedConfig:
    """The config as `from_pretrained` reads it: the class's own config class, or AutoConfig for
    an Auto class."""
    from transformers import AutoConfig, PreTrainedModel

    path = folder / CONFIG
    try:
        raw = json.loads(path.read_bytes())
    except OSError as exc:
        raise ModelFormatError(f"{uri}: cannot read {CONFIG}: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFormatError(f"{uri}: {CONFIG} is not JSON") from None
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{uri}: {CONFIG} is not a JSON object")
    concrete = isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)
    reader: Any = model_class.config_class if concrete else AutoConfig
    try:
        config: PretrainedConfig = reader.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        import transformers

        log.warning("%s: transformers could not read %s: %s", uri, CONFIG, exc)
        model_type = str(raw.get("model_type"))[:100]
        raise ModelFormatError(
            f"{uri}: {CONFIG} (model_type {model_type!r}) is not a config transformers "
            f"{transformers.__version__} can read; the log has its reason"
        ) from exc
    return config


def _concrete_class(
    model_class: Any, config: PretrainedConfig, uri: str
) -> tuple[type[PreTrainedModel], PretrainedConfig]:
    """The model class an Auto class picks for this config (and the config it is built with)."""
    from transformers import PreTrainedModel

    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        return model_class, config
    if not hasattr(model_class, "from_config"):
        raise TypeError(f"{model_class!r} is neither a transformers model class nor an Auto class")
    # `from_pretrained` takes in-memory weights only on a model class, not on an Auto class
    # (which needs a directory to resolve); the Auto class's public `from_config`, building on
    # the meta device (no memory, no initialisation), names the class it picks.
    try:
        with torch.device("meta"):
            probe = model_class.from_config(copy.deepcopy(config))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s: %s cannot build this config: %s", uri, _name(model_class), exc)
        raise ModelFormatError(
            f"{uri}: {_name(model_class)} has no model for {type(config).__name__} "
            f"(model_type {getattr(config, 'model_type', None)!r}); the log has the reason"
        ) from exc
    cls: type[PreTrainedModel] = type(probe)
    # An Auto class builds a text model from a composite config's text part.
    if cls.config_class is not None and not isinstance(config, cls.config_class):
        config = config.get_text_config()
    return cls, config


def _from_state(
    cls: type[PreTrainedModel],
    config: PretrainedConfig,
    folder: Path,
    state: Mapping[str, torch.Tensor],
    uri: str,
    dtype: torch.dtype | None,
) -> PreTrainedModel:
    """transformers' own loading (renames, ignored keys, tied weights, buffers, dtype) from the
    documented `from_pretrained(None, config=..., state_dict=...)`."""
    try:
        # ignore_mismatched_sizes: transformers reports mismatched shapes instead of raising a
        # generic error, so the message below can name them.
        built: Any = cls.from_pretrained(
            None,
            config=config,
            state_dict=dict(state),
            dtype=dtype if dtype is not None else "auto",
            local_files_only=True,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: transformers could not build %s: %s", uri, cls.__name__, exc)
        raise ModelFormatError(
            f"{uri}: transformers could not build {cls.__name__} from these weights "
            f"({type(exc).__name__}); the log has its reason"
        ) from exc
    model: PreTrainedModel = built[0]
    _check_loading(cls.__name__, built[1], uri)
    # What from_pretrained(directory) does after the build and cannot do without a directory:
    # record where the model came from, and read its generation config.
    model.config.name_or_path = str(folder)
    if model.can_generate():
        model.generation_config = _generation_config(folder, uri)
    return model


def _generation_config(folder: Path, uri: str) -> GenerationConfig:
    """generation_config.json, else the generation settings of config.json, as from_pretrained
    reads them (GenerationMixin.adjust_generation_fn)."""
    from transformers import GenerationConfig

    if not (folder / GENERATION_CONFIG).is_file():
        return GenerationConfig.from_model_config(json.loads((folder / CONFIG).read_bytes()))
    try:
        return GenerationConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s: transformers could not read %s: %s", uri, GENERATION_CONFIG, exc)
        raise ModelFormatError(
            f"{uri}: {GENERATION_CONFIG} is not a generation config transformers can read "
            f"({type(exc).__name__}); the log has its reason"
        ) from exc


def _check_loading(name: str, info: dict[str, Any], uri: str) -> None:
    """ModelFormatError when transformers would have initialised weights at random (missing or
    mismatched keys): a served model never should. Unexpected keys are logged, as transformers
    does: a task checkpoint loaded into a base model carries a head the model drops."""
    missing = sorted(info["missing_keys"])
    mismatched = sorted(info["mismatched_keys"])
    unexpected = sorted(info["unexpected_keys"])
    if unexpected:
        log.warning(
            "%s: %d tensors of the weights are not used by %s: %s",
            uri,
            len(unexpected),
            name,
            few(unexpected),
        )
    problems = []
    if missing:
        problems.append(f"missing keys [{few(missing)}]")
    if mismatched:
        shapes = [f"{k}: file {tuple(got)}, model {tuple(want)}" for k, got, want in mismatched]
        problems.append(f"shape mismatches [{few(shapes, quote=False)}]")
    if problems:
        raise ModelFormatError(f"{uri}: weights do not fit {name}: {', '.join(problems)}")


def _tokenizer(folder: Path, uri: str) -> Any:
    """AutoTokenizer from the directory when it holds a tokenizer, else None."""
    if not has_tokenizer(p.name for p in folder.iterdir() if p.is_file()):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: transformers could not read the tokenizer: %s", uri, exc)
        raise ModelFormatError(
            f"{uri}: the tokenizer files cannot be read by AutoTokenizer "
            f"({type(exc).__name__}); the log has its reason"
        ) from exc


def _name(model_class: Any) -> str:
    return str(getattr(model_class, "__name__", model_class))
