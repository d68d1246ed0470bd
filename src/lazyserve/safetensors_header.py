"""The safetensors header, checked exactly as strictly as the reference reader
(huggingface/safetensors): its JSON as serde_json parses it, its layout as `Metadata::validate`
checks it, its shapes as torch must accept them; every refusal in lazyserve's own words, with
any value it quotes cut short, and no step allocating more than the read's headroom allows.

Where lazyserve is stricter than the reference, on purpose: a header that names a tensor (or a
`__metadata__` key) twice is refused (the reference keeps the last, and another reader may keep
the first: one file, two models); a shape whose strides overflow 64 bits is refused even when
it holds no element (`safetensors.torch.load` refuses it too, `safe_open` accepts some)."""

from __future__ import annotations

import itertools
import json
import math
import mmap
import re
import struct
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

from lazyserve.errors import ModelFormatError
from lazyserve.headroom import Headroom

__all__ = ["MAX_DEPTH", "MAX_HEADER", "Entry", "read_header", "show"]

MAX_HEADER = 100_000_000  # the reference's MAX_HEADER_SIZE
# serde_json stops at 128 levels of recursion: at most 127 arrays and objects, one inside another.
MAX_DEPTH = 127
_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1
_FIELDS = ("dtype", "shape", "data_offsets")

Bad = Callable[[str], ModelFormatError]


def _torch_dtype(name: str) -> torch.dtype | None:
    # The newest formats need a recent torch; without them those dtypes cannot be read.
    found = getattr(torch, name, None)
    return found if isinstance(found, torch.dtype) else None


# Every dtype the reference reads (its `Dtype` enum): bits per element, and what `safe_open`
# makes of it in torch (None: the reference does not give it to torch either).
_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (8, torch.bool),
    "F4": (4, _torch_dtype("float4_e2m1fn_x2")),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
    "U8": (8, torch.uint8),
    "I8": (8, torch.int8),
    "F8_E5M2": (8, torch.float8_e5m2),
    "F8_E4M3": (8, torch.float8_e4m3fn),
    "F8_E8M0": (8, _torch_dtype("float8_e8m0fnu")),
    "F8_E4M3FNUZ": (8, torch.float8_e4m3fnuz),
    "F8_E5M2FNUZ": (8, torch.float8_e5m2fnuz),
    "I16": (16, torch.int16),
    "U16": (16, torch.uint16),
    "F16": (16, torch.float16),
    "BF16": (16, torch.bfloat16),
    "I32": (32, torch.int32),
    "U32": (32, torch.uint32),
    "F32": (32, torch.float32),
    "C64": (64, torch.complex64),
    "F64": (64, torch.float64),
    "I64": (64, torch.int64),
    "U64": (64, torch.uint64),
}

# What reading a header holds at its peak, per unit, measured on CPython 3.11: a parsed JSON
# value costs 33-77 bytes; a tensor over the shared buffer about 850, with its dict entry and
# this module's record of it about 1,000.
_JSON_VALUE_BYTES = 80  # per `{`, `[`, `,` or `:` in the header: each starts one value at most
_TENSOR_BYTES = 1200


class Entry(NamedTuple):
    """One tensor of the header: where its bytes lie in the data, what torch makes of them."""

    name: str
    dtype: torch.dtype
    shape: list[int]  # as torch holds it (F4 packs two values into each element)
    begin: int
    end: int


def read_header(
    uri: str, buffer: bytearray | mmap.mmap, headroom: Headroom
) -> tuple[int, list[Entry]]:
    """The offset of the data in `buffer` and the tensors, in the header's order; raises
    ModelFormatError for any file the reference refuses, ModelTooLarge before any step that
    would need more memory than `headroom`."""

    def bad(reason: str) -> ModelFormatError:
        return ModelFormatError(f"{uri}: not a valid safetensors file: {reason}")

    size = len(buffer)
    if size < 8:
        raise bad(f"{size} bytes is shorter than the 8-byte header length")
    (length,) = struct.unpack_from("<Q", buffer, 0)
    if length > MAX_HEADER:
        raise bad(f"header length {length:,} is over the {MAX_HEADER:,} bytes safetensors allows")
    if length > size - 8:
        raise bad(f"header length {length} does not fit in {size} bytes")
    # A str takes up to 4 bytes a character (one character above U+FFFF makes them all 4).
    headroom.need(4 * length, f"its header of {length:,} bytes")
    with memoryview(buffer) as view:
        try:
            text = str(view[8 : 8 + length], "utf-8")
        except UnicodeDecodeError as exc:
            raise bad(f"the header is not UTF-8 (at byte {8 + exc.start} of the file)") from None
    values = sum(text.count(c) for c in "{[,:")
    # The text, the strings parsed out of it (no longer than the text), and every JSON value.
    parsed = 2 * sys.getsizeof(text) + _JSON_VALUE_BYTES * values
    headroom.need(parsed, f"its header of {length:,} bytes ({values:,} JSON values at most)")
    header = _parse(text, bad)
    # Only an escape of half a surrogate pair can put one in a parsed string.
    strings = _Strings(bad, look=_SURROGATE_ESCAPE.search(text) is not None)
    del text
    found = _tensors(header, strings, bad)
    del header
    headroom.need(
        parsed + _TENSOR_BYTES * len(found),
        f"its header of {length:,} bytes ({len(found):,} tensors)",
    )
    _check_layout(found, size - 8 - length, bad)
    return 8 + length, [_for_torch(t, bad) for t in found]


# --- the JSON, as serde_json reads it ----------------------------------------------------------


class _NotJSON(ValueError):
    """What Python's json module reads and serde_json refuses."""


class _Duplicates(dict[str, object]):
    """A JSON object that names a key more than once: the last value of each, as a dict; every
    pair, as written; and the keys named twice."""

    __slots__ = ("pairs", "twice")

    def __init__(self, pairs: list[tuple[str, object]], twice: set[str]) -> None:
        super().__init__(pairs)
        self.pairs = pairs
        self.twice = twice


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    made = dict(pairs)
    if len(made) == len(pairs):
        return made
    seen: set[str] = set()
    twice = {k for k, _ in pairs if k in seen or seen.add(k)}  # type: ignore[func-returns-value]
    return _Duplicates(pairs, twice)


def _integer(literal: str) -> int | float:
    # serde_json reads an integer that fits u64 (or i64, when negative) as one and any other
    # as f64, which no usize field takes; "-0" is the float -0.0. (Python's int() refuses a
    # literal over 4,300 digits; no integer that fits has more than 20.)
    if len(literal) <= 20 and literal != "-0":
        value = int(literal)
        if -(1 << 63) <= value < _U64:
            return value
    return _finite(literal)


def _finite(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise _NotJSON(f"the number {show(literal)} is out of range")
    return value


def _constant(name: str) -> object:
    raise _NotJSON(f"{name} is not a JSON value")


# Only where the text has "-0" or a run of 21 digits can Python's int() read an integer
# otherwise than serde_json: elsewhere the faster built-in parsing of integers is exact.
_INTEGER_RISK = re.compile(r"-0(?![.\deE])|\d{21}")


def _parse(text: str, bad: Bad) -> object:
    integer = _integer if _INTEGER_RISK.search(text) else int
    try:
        return json.loads(
            text,
            object_pairs_hook=_object,
            parse_int=integer,
            parse_float=_finite,
            parse_constant=_constant,
        )
    except _NotJSON as exc:
        raise bad(f"the header is not valid JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise bad(f"the header is not valid JSON (at {where})") from None
    except RecursionError:
        raise bad(_TOO_DEEP) from None


_TOO_DEEP = f"the header nests arrays and objects deeper than the {MAX_DEPTH} levels allowed"
# An escape of half a surrogate pair (\ud800-\udfff): serde_json refuses one that is not one
# half of a pair, Python keeps it as a lone surrogate. (`\\` before `ud8..` matches too: only
# a header that matches has its strings looked at.)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Strings:
    """Refuses a string that holds a lone surrogate, when the header had escapes that can make
    one (`look`)."""

    def __init__(self, bad: Bad, *, look: bool) -> None:
        self.bad = bad
        self.look = look

    def check(self, text: str) -> None:
        if self.look and _SURROGATE.search(text):
            raise self.bad("the header is not valid JSON: a string holds half a surrogate pair")


# --- what the header holds, as the reference's `HashMetadata` takes it --------------------------


class _Tensor(NamedTuple):
    name: str
    dtype: str
    shape: list[int]
    begin: int
    end: int


def _tensors(header: object, strings: _Strings, bad: Bad) -> list[_Tensor]:
    if not isinstance(header, dict):
        raise bad(f"the header is {kind(header)}, not a JSON object")
    if isinstance(header, _Duplicates):
        twice = min(header.twice)
        what = "__metadata__" if twice == "__metadata__" else f"tensor {show(twice)}"
        raise bad(f"the header names {what} twice")
    found: list[_Tensor] = []
    for name, info in header.items():
        strings.check(name)
        if name == "__metadata__":
            _check_metadata(info, strings, bad)
        else:
            found.append(_tensor(name, info, strings, bad))
    return found


def _check_metadata(info: object, strings: _Strings, bad: Bad) -> None:
    if info is None:
        return
    if not isinstance(info, dict):
        raise bad(f"__metadata__ is {kind(info)}, not an object of strings")
    if isinstance(info, _Duplicates):
        raise bad(f"__metadata__ names {show(min(info.twice))} twice")
    for key, value in info.items():
        if not isinstance(value, str):
            raise bad(f"__metadata__ {show(key)} is {kind(value)}, not a string")
        strings.check(key)
        strings.check(value)


def _tensor(name: str, info: object, strings: _Strings, bad: Bad) -> _Tensor:
    # The usual entry, exactly the three fields and nothing wrong with them, at little cost a
    # tensor (a header may hold millions); anything else is looked at field by field below.
    if type(info) is dict and len(info) == 3:
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if (
            type(dtype) is str
            and dtype in _DTYPES
            and type(shape) is list
            and type(offsets) is list
            and len(offsets) == 2
            and all(type(v) is int and 0 <= v < _U64 for v in (*shape, *offsets))
        ):
            return _Tensor(name, dtype, shape, offsets[0], offsets[1])
    return _any_tensor(name, info, strings, bad)


def _any_tensor(name: str, info: object, strings: _Strings, bad: Bad) -> _Tensor:
    def wrong(reason: str) -> ModelFormatError:
        return bad(f"tensor {show(name)}: {reason}")

    # serde reads a struct from an object or from an array of its fields in order.
    if isinstance(info, list):
        if len(info) != len(_FIELDS):
            raise wrong(f"its entry is {kind(info)}, not [dtype, shape, data_offsets]")
        dtype, shape, offsets = info
    elif isinstance(info, dict):
        twice = sorted(set(_FIELDS) & info.twice) if isinstance(info, _Duplicates) else []
        if twice:
            raise wrong(f"its entry names {twice[0]} twice")
        missing = [f for f in _FIELDS if f not in info]
        if missing:
            raise wrong(f"its entry has no {missing[0]}")
        dtype, shape, offsets = (info[f] for f in _FIELDS)
        pairs = info.pairs if isinstance(info, _Duplicates) else info.items()
        for key, value in pairs:
            if key not in _FIELDS:  # other fields are ignored, but must be JSON serde reads
                strings.check(key)
                _check_ignored(value, strings, wrong)
    else:
        raise wrong(f"its entry is {kind(info)}, not an object with dtype, shape, data_offsets")
    name_of_dtype = _dtype_name(dtype)
    if name_of_dtype is None:
        raise wrong(f"dtype {show(dtype)} is not a safetensors dtype (F32, F16, BF16, I64, ...)")
    if not isinstance(shape, list) or not all(_is_usize(d) for d in shape):
        raise wrong(f"shape {show(shape)} is not a list of integers from 0 to 2**64-1")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_usize, offsets))):
        raise wrong(f"data_offsets {show(offsets)} is not two integers from 0 to 2**64-1")
    return _Tensor(name, name_of_dtype, shape, offsets[0], offsets[1])


def _dtype_name(value: object) -> str | None:
    # A unit variant of a serde enum reads from its name, or from an object {name: null}.
    if isinstance(value, dict) and len(value) == 1 and not isinstance(value, _Duplicates):
        ((value, unit),) = value.items()
        if unit is not None:
            return None
    return value if isinstance(value, str) and value in _DTYPES else None


def _is_usize(value: object) -> bool:
    return type(value) is int and 0 <= value < _U64


def _check_ignored(value: object, strings: _Strings, wrong: Bad) -> None:
    # A field serde ignores sits in an entry (level 2) of the header (level 1). Iterative: a
    # value that nests deep must not exhaust Python's stack here either.
    stack: list[tuple[object, int]] = [(value, 3)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str):
            strings.check(item)
        elif isinstance(item, list):
            if level > MAX_DEPTH:
                raise wrong(_TOO_DEEP)
            stack.extend((v, level + 1) for v in item)
        elif isinstance(item, dict):
            if level > MAX_DEPTH:
                raise wrong(_TOO_DEEP)
            for key, v in item.pairs if isinstance(item, _Duplicates) else item.items():
                strings.check(key)
                stack.append((v, level + 1))


# --- the layout, as the reference's `Metadata::validate` checks it ------------------------------


def _check_layout(found: list[_Tensor], data_size: int, bad: Bad) -> None:
    """The tensors, in the order of their offsets, must cover the data from its first byte to
    its last, one after another: no gap, no overlap, nothing after the last."""
    end = 0
    for t in sorted(found, key=lambda t: (t.begin, t.end)):
        where = f"tensor {show(t.name)}"
        if t.end < t.begin:
            raise bad(f"{where}: data_offsets [{t.begin}, {t.end}] end before they begin")
        if t.begin != end:
            after = "where the tensor before it ends" if end else "the start of the data"
            raise bad(
                f"{where}: data_offsets [{t.begin}, {t.end}] "
                f"{'overlap the tensor before' if t.begin < end else 'leave a gap'}: "
                f"it must begin at {end}, {after} (tensors, in the order of their offsets, "
                "cover the data one after another)"
            )
        end = t.end
        count = 1
        for dim in t.shape:
            count *= dim
            if count >= _U64:
                raise bad(f"{where}: shape {show(t.shape)} has more than 2**64 elements")
        bits = count * _DTYPES[t.dtype][0]
        if bits >= _U64:
            raise bad(f"{where}: shape {show(t.shape)} of {t.dtype} is over 2**64 bits")
        if bits % 8:
            raise bad(f"{where}: {count} elements of {t.dtype} do not fill whole bytes")
        if t.end - t.begin != bits // 8:
            raise bad(
                f"{where}: shape {show(t.shape)} of {t.dtype} is {bits // 8} bytes, "
                f"data_offsets [{t.begin}, {t.end}] give {t.end - t.begin}"
            )
        if t.end > data_size:
            raise bad(f"{where} lies outside the data ({t.begin}..{t.end} of {data_size})")
    if end != data_size:
        raise bad(f"{data_size - end} bytes after the last tensor, which ends at {end}")


def _for_torch(t: _Tensor, bad: Bad) -> Entry:
    """The tensor as `safe_open` gives it to torch, with the shapes torch cannot hold refused."""

    def wrong(reason: str) -> ModelFormatError:
        return bad(f"tensor {show(t.name)}: {reason}")

    dtype = _DTYPES[t.dtype][1]
    if dtype is None:
        raise wrong(f"torch {torch.__version__} has no dtype for {t.dtype}")
    shape = t.shape
    if t.dtype == "F4":  # two 4-bit values to each float4_e2m1fn_x2 element
        if shape[-1] % 2:
            raise wrong(f"F4 shape {show(shape)}: the last dimension must be even")
        shape = [*shape[:-1], shape[-1] // 2]
    if t.begin == t.end:  # no element: the sizes are not bounded by the data's
        # torch holds sizes and strides in int64; the strides of a contiguous tensor are the
        # products of the sizes after each dimension (one of 0 counting as 1).
        stride = 1
        for dim in reversed(shape[1:]):
            stride *= max(dim, 1)
            if stride > _I64_MAX:
                break
        if stride > _I64_MAX or any(d > _I64_MAX for d in shape):
            raise wrong(f"shape {show(t.shape)} does not fit torch's 64-bit sizes and strides")
    return Entry(t.name, dtype, shape, t.begin, t.end)


# --- words ----------------------------------------------------------------------------------------

_SHOWN = 60  # characters of a value a message quotes


def show(value: object) -> str:
    """`value` as a message quotes it: about 60 characters at most, whatever its size."""
    if isinstance(value, str) and len(value) > _SHOWN:
        return f"{value[:_SHOWN]!r}... ({len(value):,} characters)"
    text = _brief(value, 2)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}..."


def _brief(value: object, depth: int) -> str:
    # Never more than a few items of a few levels: a value may hold millions, or nest deep.
    if isinstance(value, str):
        return repr(value[:_SHOWN])
    if isinstance(value, list):
        if not value:
            return "[]"
        if depth == 0:
            return "[...]"
        items = [_brief(v, depth - 1) for v in value[:8]]
        return f"[{', '.join(items)}{', ...' * (len(value) > 8)}]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        if depth == 0:
            return "{...}"
        pairs = [
            f"{_brief(k, 0)}: {_brief(v, depth - 1)}" for k, v in itertools.islice(value.items(), 4)
        ]
        return f"{{{', '.join(pairs)}{', ...' * (len(value) > 4)}}}"
    # null, true, false and numbers: the parser let through no integer over 20 digits
    return json.dumps(value)


def kind(value: object) -> str:
    """A JSON value in words: `the string 'x'`, `a list of 5 items`, `null`."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    if isinstance(value, dict):
        return f"an object of {len(value)} field{'s' * (len(value) != 1)}"
    if isinstance(value, str):
        return f"the string {show(value)}"
    return f"the number {show(value)}"
