"""How bytes become tensors, and tensors become the user's model, without running any pickle."""

from __future__ import annotations

import io
import json
import math
import mmap
import re
import struct
from collections.abc import Callable
from typing import TypeVar

import torch

from lazyserve.errors import ModelFormatError
from lazyserve.sources import Weights

__all__ = ["build_model", "read_state_dict"]

M = TypeVar("M", bound=torch.nn.Module)

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024


def format_of(weights: Weights) -> str:
    """`pt` for `.pt`/`.pth` state dicts, else `safetensors`."""
    name = weights.uri.split("?", 1)[0].lower()
    return "pt" if name.endswith((".pt", ".pth")) else "safetensors"


def read_state_dict(weights: Weights) -> dict[str, torch.Tensor]:
    """Tensors that share the fetched buffer (safetensors) or a memory map (`.pt` files)."""
    if format_of(weights) == "pt":
        return _read_pt(weights)
    if weights.buffer is None:
        raise ModelFormatError(f"{weights.uri}: no bytes were fetched")
    return _read_safetensors(weights.uri, weights.buffer)


def _read_safetensors(uri: str, buffer: bytearray | mmap.mmap) -> dict[str, torch.Tensor]:
    # safetensors.torch.load(bytes) copies every tensor out of the buffer; views over the
    # buffer we already hold avoid a second full copy of the weights.
    def bad(reason: str) -> ModelFormatError:
        return ModelFormatError(f"{uri}: not a valid safetensors file: {reason}")

    if buffer[:2] == b"PK":
        raise bad("it is a zip archive (a torch.save file?); name it .pt, or convert it")
    if len(buffer) < 8:
        raise bad(f"{len(buffer)} bytes is shorter than the 8-byte header length")
    (length,) = struct.unpack_from("<Q", buffer, 0)
    if length > min(_MAX_HEADER, len(buffer) - 8):
        raise bad(f"header length {length} does not fit in {len(buffer)} bytes")
    try:
        header = json.loads(bytes(buffer[8 : 8 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    base = 8 + length
    data_size = len(buffer) - base
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            if not isinstance(info["shape"], list):
                raise TypeError
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise bad(f"tensor {name!r} has a malformed entry {info!r}") from None
        count = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size:
            raise bad(f"tensor {name!r} lies outside the data ({begin}..{end} of {data_size})")
        if end - begin != count * itemsize:
            raise bad(f"tensor {name!r}: {end - begin} bytes for shape {shape} of {info['dtype']}")
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=base + begin)
            tensors[name] = flat.view(shape)
    return tensors


def _read_pt(weights: Weights) -> dict[str, torch.Tensor]:
    import pickle

    source: str | io.BytesIO
    if weights.path is not None:
        source = str(weights.path)
    elif weights.buffer is not None:
        source = io.BytesIO(weights.buffer)
    else:
        raise ModelFormatError(f"{weights.uri}: no bytes were fetched")
    try:
        # weights_only=True: tensors and plain containers only; a pickle that names any other
        # callable is refused before it runs. mmap needs a real file.
        state = torch.load(
            source, map_location="cpu", weights_only=True, mmap=weights.path is not None
        )
    except pickle.UnpicklingError as exc:
        raise ModelFormatError(
            f"{weights.uri}: refused: not a plain state dict "
            f"(torch.load weights_only=True: {_refusal(str(exc))})"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise ModelFormatError(f"{weights.uri}: not a torch.save file ({exc})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelFormatError(f"{weights.uri}: expected a state dict of name -> tensor")
    return state


def _refusal(message: str) -> str:
    # torch's message opens with advice to retry with weights_only=False (and terminal colour
    # codes); the line that matters names the global or opcode that was refused.
    text = re.sub(r"\x1b\[[0-9;]*m", "", message)
    for line in text.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error: ")
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line.split(" Please use ", 1)[0]
    return "it holds objects other than tensors and plain containers"


def build_model(build: Callable[[], M], state: dict[str, torch.Tensor], uri: str) -> M:
    """Build the module without allocating its parameters, then adopt the loaded tensors."""
    # On the meta device the constructor allocates nothing; assign=True then makes the loaded
    # tensors the parameters, so the weights are held once, not twice.
    with torch.device("meta"):
        model = build()
    _check_fits(model, state, uri)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # Non-persistent buffers are not in any state dict: build for real, then load.
        model = build()
        model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], uri: str) -> None:
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} {state[k].dtype}, model {shape} {dtype}"
        for k in sorted(set(expected) & set(state))
        for shape, dtype in [expected[k]]
        if (tuple(state[k].shape), state[k].dtype) != (shape, dtype)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append(f"shape or dtype mismatches [{'; '.join(shapes)}]")
    if problems:
        name = type(model).__name__
        raise ModelFormatError(f"{uri}: weights do not fit {name}: {', '.join(problems)}")
