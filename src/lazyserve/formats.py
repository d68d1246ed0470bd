"""How bytes become tensors, and tensors become the user's model, without running any pickle."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import IO, Literal, TypeVar, cast

import torch

from lazyserve.errors import ModelFormatError
from lazyserve.headroom import Headroom, available_memory
from lazyserve.safetensors_header import read_header
from lazyserve.sources import Weights
from lazyserve.torch_save import MemoryReader, Source, check_archive, check_legacy, failure
from lazyserve.uris import ModelURI, parse_model_uri

__all__ = ["format_of", "read_state_dict", "sniff_format"]

M = TypeVar("M", bound=torch.nn.Module)


def format_of(weights: Weights) -> str:
    """`pt` for `.pt`/`.pth` state dicts, else `safetensors`, as `ModelURI.format` decides."""
    try:
        uri = parse_model_uri(weights.uri)
    except ValueError:  # not a setting's URI (a caller's own label): read it as a path
        uri = ModelURI(weights.uri, path=Path(weights.uri))
    return uri.format


def read_state_dict(
    weights: Weights,
    format: Literal["pt", "safetensors"] | None = None,
    *,
    limit: int | Literal["available"] | None = "available",
) -> dict[str, torch.Tensor]:
    """Tensors that share the fetched buffer (safetensors) or that torch.load copied out of it,
    or out of `weights.path` when nothing was fetched (`.pt`); `format` overrides the one the
    URI's name gives (`lazyserve push`/`convert` know it). `limit`: the bytes the reading may
    allocate beyond the weights it is given (None: no limit; default: what the process may
    still allocate, see `headroom.available_memory`); a file that would need more raises
    ModelTooLarge first."""
    if limit == "available":
        headroom = Headroom(weights.uri, available_memory())
    else:
        headroom = Headroom(weights.uri, limit, source="the limit given")
    if (format or format_of(weights)) == "pt":
        return _read_pt(weights, headroom)
    if weights.buffer is None:
        raise ModelFormatError(f"{weights.uri}: no bytes were fetched")
    return _read_safetensors(weights.uri, weights.buffer, headroom)


def _read_safetensors(
    uri: str, buffer: bytearray | mmap.mmap, headroom: Headroom
) -> dict[str, torch.Tensor]:
    # safetensors.torch.load(bytes) copies every tensor out of the buffer; views over the
    # buffer we already hold avoid a second full copy of the weights.
    if buffer[:2] == b"PK":
        raise ModelFormatError(
            f"{uri}: not a valid safetensors file: it is a zip archive (a torch.save file?); "
            "name it .pt, or convert it"
        )
    base, entries = read_header(uri, buffer, headroom)
    # One view of the whole buffer (per dtype), sliced for each tensor: a tensor costs no
    # buffer export of its own.
    data = torch.frombuffer(buffer, dtype=torch.uint8) if len(buffer) > base else None
    typed: dict[torch.dtype, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        if data is None or entry.begin == entry.end:
            # No element: a view of an empty byte tensor. torch.empty would run a fill kernel
            # when the app enabled torch.use_deterministic_algorithms, and some dtypes
            # (float4_e2m1fn_x2) have none.
            empty = torch.empty(0, dtype=torch.uint8).view(entry.dtype)
            tensors[entry.name] = empty.view(entry.shape)
            continue
        start, end, size = base + entry.begin, base + entry.end, entry.dtype.itemsize
        if start % size:
            # The reference accepts any offset; torch's kernels expect elements at addresses
            # that are multiples of their size, so a tensor that is not gets its own copy.
            piece = data[start:end].clone().view(entry.dtype)
        else:
            if entry.dtype not in typed:
                typed[entry.dtype] = data[: len(data) - len(data) % size].view(entry.dtype)
            piece = typed[entry.dtype][start // size : end // size]
        tensors[entry.name] = piece.view(entry.shape)
    return tensors


_ZIP = b"PK\x03\x04"  # torch.save's default format since PyTorch 1.6: a zip archive
# The legacy format (_use_new_zipfile_serialization=False) opens a pickle: PROTO, then 2 to 5.
_PICKLE = b"\x80"
_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")


def sniff_format(head: bytes) -> Literal["pt", "safetensors"] | None:
    """What the first bytes of a file say it is: `pt` (a torch.save zip archive or legacy
    pickle), `safetensors` (an 8-byte header length then a JSON object), or None."""
    # safetensors first: its 8-byte header length may begin with 0x80 (a 128-byte header), as
    # a pickle does; a pickle then has its protocol (2 to 5), never a JSON object at byte 8.
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(_ZIP) or (head.startswith(_PICKLE) and head[1:2] in _PROTOCOLS):
        return "pt"
    return None


def _read_pt(weights: Weights, headroom: Headroom) -> dict[str, torch.Tensor]:
    # Never torch.load(mmap=True): mapped, torch takes a record at the size the pickle declares
    # (a tensor can run on over the next records' bytes) where reading a copy it checks the
    # record's size; one file, one verdict, wherever it comes from.
    source: Source
    if weights.buffer is not None:  # from S3, or the private copy of a local file
        source = MemoryReader(weights.buffer)
        size = len(weights.buffer)
    elif weights.path is not None:  # a caller's file, read where it lies
        try:
            source = open(weights.path, "rb")  # closed by `with source` below
            size = source.seek(0, 2)
        except OSError as exc:
            raise ModelFormatError(f"{weights.uri}: cannot read it: {exc.strerror}") from exc
    else:
        raise ModelFormatError(f"{weights.uri}: no bytes were fetched")
    with source:
        source.seek(0)
        head = source.read(16)
        _check_torch_save(weights.uri, head)
        if head.startswith(_ZIP):
            check_archive(weights.uri, source, size, headroom=headroom)
        else:
            check_legacy(weights.uri, source, size, headroom=headroom)
        source.seek(0)
        try:
            # weights_only=True: tensors and plain containers only; a pickle that names any
            # other callable is refused before it runs.
            state = torch.load(
                cast(IO[bytes], source), map_location="cpu", weights_only=True, mmap=False
            )
        except Exception as exc:  # any failure of torch.load on these bytes
            # from None: torch's exception holds its text (logged at DEBUG by failure()) and,
            # through its frames, the buffer a failed load must not keep.
            raise failure(weights.uri, exc) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelFormatError(f"{weights.uri}: expected a state dict of name -> tensor")
    return state


def _check_torch_save(uri: str, head: bytes) -> None:
    if not head:
        raise ModelFormatError(f"{uri}: not a torch.save file: it is empty")
    found = sniff_format(head)
    if found == "safetensors":
        raise ModelFormatError(
            f"{uri}: not a torch.save file: it is a safetensors file; name it .safetensors"
        )
    if found is None:
        raise ModelFormatError(
            f"{uri}: not a torch.save file: it starts with {head[:8]!r}, neither a zip archive "
            "(torch.save) nor a pickle (torch.save with _use_new_zipfile_serialization=False)"
        )
