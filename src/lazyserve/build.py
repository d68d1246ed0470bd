"""Tensors become the user's module: parameters built without memory, the file's tensors adopted."""

from __future__ import annotations

import logging
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from lazyserve.errors import ModelFormatError, few

__all__ = ["FLOAT_DTYPES", "build_module"]

M = TypeVar("M", bound=nn.Module)
log = logging.getLogger("lazyserve")

# The dtypes a model may be cast to while it is built.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_COMPILED = "_orig_mod."  # the key segment torch.compile's wrapper adds to a state dict
# torch's errors for data read from a meta tensor: "cannot be called on meta tensors", "Tensor
# on device meta is not on the expected device cpu", "meta tensor; no data!".
_ABOUT_META = re.compile(r"\bmeta\b")


def build_module(
    build: Callable[[], M],
    state: Mapping[str, torch.Tensor],
    uri: str,
    *,
    dtype: torch.dtype | None = None,
) -> M:
    """`build()` with its parameters on the meta device and its buffers real, then `state`'s
    tensors adopted as the parameters (views stay views), in eval mode; `dtype` casts the
    model's floating-point tensors, file tensors one at a time."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype}")
    model = _construct(build, uri)
    if dtype is not None:
        model.to(dtype)  # the parameters are on the meta device: only the buffers are cast
    tied = _tied_parameters(model)
    to_load = _match(model, state, uri, tied, cast=dtype is not None)
    model.load_state_dict(to_load, strict=True, assign=True)
    _retie(model, tied)
    _check_materialised(model, uri)
    return model.eval()


def _construct(build: Callable[[], M], uri: str) -> M:
    try:
        with _parameters_on_meta():
            model = build()
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        if not _ABOUT_META.search(str(exc)):
            raise
        # torch's text goes to the log; the message says what lazyserve needs instead.
        log.warning("building %s on the meta device failed: %s", _name_of(build), exc)
        raise ModelFormatError(
            f"{uri}: building {_name_of(build)} failed: its constructor reads the value of a "
            "parameter (.item(), float(), .tolist(), an operation with a CPU tensor), but "
            "lazyserve creates parameters without data until the weights are loaded; compute "
            "that value from constants or a buffer, or in forward()"
        ) from exc
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_name_of(build)}() returned {type(model).__name__}, not an nn.Module")
    return model


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every nn.Parameter this thread registers is replaced by one on the meta device; tensors
    that are not parameters (buffers, plain attributes) stay real."""
    # The pattern of accelerate's init_empty_weights(include_buffers=False), written here
    # because the core does not depend on accelerate. Unlike `with torch.device("meta")`, a
    # buffer or a constant the constructor computes keeps its value, so no module needs a
    # second, real build; torch's global registration hook replaces patching nn.Module, and
    # the thread check leaves modules other threads build meanwhile alone.
    owner = threading.get_ident()

    # Annotated Any: torch types the hook as returning None, though a returned value replaces
    # the parameter (documented).
    def to_meta(module: nn.Module, name: str, param: nn.Parameter) -> Any:
        # A subclass (a quantised parameter type) may need more than data to be rebuilt: it
        # stays as it is and the load replaces it.
        if threading.get_ident() != owner or type(param) is not nn.Parameter or param.is_meta:
            return None
        return nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter (`head.weight = embed.weight`), each group in the order
    the module lists them; safetensors files keep only one name of each."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    return [group for group in names.values() if len(group) > 1]


def _match(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    uri: str,
    tied: list[list[str]],
    *,
    cast: bool,
) -> dict[str, torch.Tensor]:
    """The tensors to load under the model's own names, or ModelFormatError naming what does
    not fit (bounded: a few names and a count)."""
    expected = model.state_dict()
    # A module wrapped by torch.compile names its tensors `_orig_mod.x`, one saved from such a
    # module carries the prefix too: match names without it, whichever side has it.
    by_plain: dict[str, str] = {}
    for key in state:
        by_plain.setdefault(key.replace(_COMPILED, ""), key)
    source: dict[str, str] = {}
    for key in expected:
        found = key if key in state else by_plain.get(key.replace(_COMPILED, ""))
        if found is not None:
            source[key] = found
    for group in tied:  # one stored name of a tied group serves them all
        stored = next((source[name] for name in group if name in source), None)
        if stored is not None:
            source.update({name: stored for name in group})

    missing = [key for key in expected if key not in source]
    unexpected = sorted(set(state) - set(source.values()))
    mismatches: list[str] = []
    floats: dict[tuple[torch.dtype, torch.dtype], list[str]] = defaultdict(list)
    to_load: dict[str, torch.Tensor] = {}
    for key, found in source.items():
        tensor, want = state[found], expected[key]
        if tensor.shape != want.shape:
            mismatches.append(
                f"{key}: file {tuple(tensor.shape)} {tensor.dtype}, model {tuple(want.shape)} "
                f"{want.dtype}"
            )
        elif tensor.dtype != want.dtype:
            if not (tensor.is_floating_point() and want.is_floating_point()):
                mismatches.append(f"{key}: file {tensor.dtype}, model {want.dtype}")
            elif cast:
                tensor = tensor.to(want.dtype)  # one tensor at a time, never the whole model
            else:
                floats[tensor.dtype, want.dtype].append(key)
        to_load[key] = tensor

    problems = []
    if missing:
        problems.append(f"missing keys {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_list(unexpected)}")
    if mismatches:
        problems.append(f"shape or dtype mismatches [{few(mismatches, quote=False)}]")
    if floats:
        problems.append(_dtype_summary(floats))
    if problems:
        raise ModelFormatError(
            f"{uri}: weights do not fit {type(model).__name__}: {', '.join(problems)}"
        )
    return to_load


def _dtype_summary(floats: dict[tuple[torch.dtype, torch.dtype], list[str]]) -> str:
    parts = []
    for (file_dtype, model_dtype), keys in floats.items():
        count = f"{len(keys)} tensors are" if len(keys) > 1 else "1 tensor is"
        parts.append(
            f"{count} {_short(file_dtype)} where the model has {_short(model_dtype)} {_list(keys)}"
        )
    # The model's dtype that most tensors disagree with is the one to convert to.
    (_, target), _ = max(floats.items(), key=lambda item: len(item[1]))
    return (
        f"{'; '.join(parts)}; set LAZYSERVE_DTYPE={_short(target)} or save the weights in "
        f"{_short(target)}"
    )


def _list(names: list[str]) -> str:
    return f"[{few(names)}]"


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _retie(model: nn.Module, tied: list[list[str]]) -> None:
    # load_state_dict(assign=True) gives each name its own Parameter (over the same tensor):
    # the aliases get the first name's Parameter again, as the constructor tied them.
    for first, *aliases in tied:
        param = model.get_parameter(first)
        for alias in aliases:
            owner, _, leaf = alias.rpartition(".")
            setattr(model.get_submodule(owner), leaf, param)


def _check_materialised(model: nn.Module, uri: str) -> None:
    """ModelFormatError naming the tensors still on the meta device after the load: every
    request would fail on them."""
    left = [name for name, t in _tensors(model) if t.is_meta]
    if left:
        raise ModelFormatError(
            f"{uri}: {type(model).__name__} has tensors without data after the load: "
            f"{_list(left)}; they are attributes the constructor derived from parameters, which "
            "lazyserve creates without data: register them with register_buffer(name, tensor, "
            "persistent=False) computed from constants, or compute them in forward()"
        )


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor the module holds: parameters, buffers, and plain attributes (directly or in
    a list, tuple or dict)."""
    yield from model.named_parameters()
    yield from model.named_buffers()
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in ("_parameters", "_buffers", "_modules"):
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            for suffix, item in _items(value):
                if isinstance(item, torch.Tensor):
                    yield name + suffix, item


def _items(value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield f"[{i}]", item
    elif isinstance(value, dict):
        for key, item in value.items():
            yield f"[{key!r}]", item
    else:
        yield "", value


def _name_of(build: Callable[..., Any]) -> str:
    return getattr(build, "__name__", type(build).__name__)
