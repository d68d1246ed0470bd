"""Formats: safetensors views over the fetched buffer, `.pt` only through weights_only, and the
checks that the weights fit the user's model."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save
from torch import nn

from lazyserve.build import build_module
from lazyserve.errors import ModelFormatError
from lazyserve.formats import format_of, read_state_dict, sniff_format
from lazyserve.sources import Weights
from tests.helpers import RunShell, TouchFile

URI = "s3://models/net.safetensors"


def weights(data: bytes | bytearray, uri: str = URI) -> Weights:
    buffer = bytearray(data)
    return Weights(uri, len(buffer), "0" * 64, buffer=buffer)


def safetensors_bytes(header: Any, data: bytes = b"") -> bytearray:
    """A hand-made safetensors file: 8-byte little-endian header length, JSON header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(raw)) + raw + data)


def torch_save_bytes(obj: object) -> bytes:
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


def format_error(w: Weights) -> str:
    with pytest.raises(ModelFormatError) as info:
        read_state_dict(w)
    return str(info.value)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(self.drop(self.fc(x)))
        return out


def net_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in Net().state_dict().items()}


def buffer_range(w: Weights) -> tuple[int, int]:
    assert w.buffer is not None
    start = torch.frombuffer(w.buffer, dtype=torch.uint8).data_ptr()
    return start, start + len(w.buffer)


# --- safetensors ---


def test_safetensors_round_trip() -> None:
    original = net_state()
    loaded = read_state_dict(weights(save(original)))
    assert loaded.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name
        assert loaded[name].dtype == tensor.dtype


def test_safetensors_tensors_share_the_fetched_buffer() -> None:
    w = weights(save({"w": torch.zeros(4, dtype=torch.float32)}))
    tensor = read_state_dict(w)["w"]
    start, end = buffer_range(w)
    assert start <= tensor.data_ptr() < end

    # Writing into the buffer shows through the tensor: no copy was made.
    assert w.buffer is not None
    w.buffer[-4:] = struct.pack("<f", 7.5)
    assert tensor.tolist() == [0.0, 0.0, 0.0, 7.5]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
)
def test_safetensors_dtypes(dtype: torch.dtype) -> None:
    tensor = (torch.arange(24) % 5).reshape(2, 3, 4).to(dtype)
    loaded = read_state_dict(weights(save({"t": tensor, "scalar": tensor[0, 0, 1].clone()})))
    assert loaded["t"].dtype == dtype
    assert loaded["t"].shape == (2, 3, 4)
    assert torch.equal(loaded["t"], tensor)
    assert loaded["scalar"].shape == ()
    assert torch.equal(loaded["scalar"], tensor[0, 0, 1])


def test_safetensors_empty_tensor_and_metadata() -> None:
    data = save({"empty": torch.zeros(0, 3), "w": torch.ones(2)}, metadata={"format": "pt"})
    loaded = read_state_dict(weights(data))
    assert loaded["empty"].shape == (0, 3)
    assert torch.equal(loaded["w"], torch.ones(2))
    assert "__metadata__" not in loaded


@pytest.mark.parametrize("dtype", ["F32", "F4", "F8_E4M3", "BF16"])
def test_empty_tensors_read_with_deterministic_algorithms_on(dtype: str) -> None:
    """An app may switch on torch.use_deterministic_algorithms; an empty tensor must still
    read (torch.empty then fills memory, and float4 has no fill kernel)."""
    header = {"e": {"dtype": dtype, "shape": [0, 4], "data_offsets": [0, 0]}}
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        loaded = read_state_dict(weights(safetensors_bytes(header)))
    finally:
        torch.use_deterministic_algorithms(was)
    assert loaded["e"].numel() == 0
    assert loaded["e"].shape == ((0, 2) if dtype == "F4" else (0, 4))


def test_truncated_file() -> None:
    data = save({"w": torch.ones(100)})
    message = format_error(weights(data[:-10]))
    assert message.startswith(f"{URI}: not a valid safetensors file: ")
    assert "'w'" in message


@pytest.mark.parametrize("size", [0, 3, 7])
def test_shorter_than_the_header_length(size: int) -> None:
    message = format_error(weights(b"\x01" * size))
    assert "shorter than the 8-byte header length" in message


def test_header_length_larger_than_the_file() -> None:
    data = bytearray(save({"w": torch.ones(2)}))
    data[:8] = struct.pack("<Q", 10_000)
    message = format_error(weights(data))
    assert message.startswith(f"{URI}: not a valid safetensors file: header length 10000")


def test_header_is_not_json() -> None:
    message = format_error(weights(safetensors_bytes(b"{not json", b"\0" * 8)))
    assert message == (
        f"{URI}: not a valid safetensors file: the header is not valid JSON (at line 1, column 2)"
    )


def test_header_is_not_utf8() -> None:
    message = format_error(weights(safetensors_bytes(b"\xff{}")))
    assert message == (
        f"{URI}: not a valid safetensors file: the header is not UTF-8 (at byte 8 of the file)"
    )


def test_header_is_not_an_object() -> None:
    assert "not a JSON object" in format_error(weights(safetensors_bytes([1, 2])))


def test_tensor_offsets_outside_the_data() -> None:
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    message = format_error(weights(safetensors_bytes(header, b"\0" * 8)))
    assert message.endswith("tensor 'w' lies outside the data (0..16 of 8)")


def test_tensor_size_does_not_match_its_shape() -> None:
    header = {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}
    message = format_error(weights(safetensors_bytes(header, b"\0" * 16)))
    assert message.endswith(
        "tensor 'w': shape [3] of F32 is 12 bytes, data_offsets [0, 16] give 16"
    )


@pytest.mark.parametrize(
    "entry",
    [
        5,
        {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},
        {"shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},
    ],
    ids=["not-an-object", "unknown-dtype", "one-offset", "no-dtype", "negative-dim", "float-dim"],
)
def test_malformed_tensor_entries(entry: Any) -> None:
    message = format_error(weights(safetensors_bytes({"w": entry}, b"\0" * 4)))
    assert message.startswith(f"{URI}: not a valid safetensors file: tensor 'w'")


@pytest.mark.parametrize("dim", ["NaN", "Infinity"])
def test_nan_and_infinity_are_not_json(dim: str) -> None:
    # Python's json module reads them; JSON (and the reference reader) does not.
    header = b'{"w":{"dtype":"F32","shape":[%s],"data_offsets":[0,4]}}' % dim.encode()
    message = format_error(weights(safetensors_bytes(header, b"\0" * 4)))
    assert message == (
        f"{URI}: not a valid safetensors file: the header is not valid JSON: {dim} is not a "
        "JSON value"
    )


def test_torch_save_file_named_safetensors_suggests_pt() -> None:
    message = format_error(weights(torch_save_bytes({"w": torch.ones(2)})))
    assert "zip archive" in message
    assert ".pt" in message


def test_no_buffer() -> None:
    message = format_error(Weights(URI, 0, "0" * 64, buffer=None))
    assert "no bytes were fetched" in message


# --- the tensors read, built into the module (build.py) ---


def test_built_model_adopts_the_loaded_tensors_in_eval_mode() -> None:
    w = weights(save(net_state()))
    state = read_state_dict(w)
    model = build_module(Net, state, URI)

    assert isinstance(model, Net)
    assert not model.training
    assert all(not m.training for m in model.modules())
    start, end = buffer_range(w)
    for name, tensor in model.state_dict().items():
        # The parameters and buffers are the loaded tensors: same memory, inside the buffer.
        assert tensor.data_ptr() == state[name].data_ptr(), name
        if tensor.numel():
            assert start <= tensor.data_ptr() < end, name
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))

    x = torch.randn(5, 4)
    expected = Net()
    expected.load_state_dict(net_state())
    expected.eval()
    with torch.inference_mode():
        assert torch.equal(model(x), expected(x))


class WithNonPersistentBuffer(nn.Module):
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.register_buffer("scale", torch.full((2,), 3.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x) * self.scale
        return out


def test_non_persistent_buffers_come_from_the_constructor() -> None:
    state = {"fc.weight": torch.eye(2), "fc.bias": torch.zeros(2)}
    model = build_module(WithNonPersistentBuffer, read_state_dict(weights(save(state))), URI)
    assert torch.equal(model.scale, torch.full((2,), 3.0))
    assert torch.equal(model.fc.weight, torch.eye(2))
    assert torch.equal(model(torch.ones(1, 2)), torch.full((1, 2), 3.0))
    assert not model.training


def fit_error(state: dict[str, torch.Tensor]) -> str:
    with pytest.raises(ModelFormatError) as info:
        build_module(Net, state, URI)
    return str(info.value)


def test_missing_keys() -> None:
    state = net_state()
    del state["fc.bias"]
    message = fit_error(state)
    assert message.startswith(f"{URI}: weights do not fit Net: ")
    assert "missing keys ['fc.bias']" in message


def test_unexpected_keys() -> None:
    state = net_state()
    state["head.weight"] = torch.ones(1)
    assert "unexpected keys ['head.weight']" in fit_error(state)


def test_shape_mismatch() -> None:
    state = net_state()
    state["fc.weight"] = torch.zeros(2, 4)
    message = fit_error(state)
    assert "fc.weight" in message
    assert "(2, 4)" in message and "(3, 4)" in message


def test_dtype_mismatch() -> None:
    state = net_state()
    state["fc.weight"] = state["fc.weight"].half()
    message = fit_error(state)
    assert message == (
        f"{URI}: weights do not fit Net: 1 tensor is float16 where the model has float32 "
        "['fc.weight']; set LAZYSERVE_DTYPE=float32 or save the weights in float32"
    )


def test_all_problems_are_named_together() -> None:
    state = net_state()
    del state["fc.bias"]
    state["extra"] = torch.ones(1)
    state["norm.weight"] = torch.ones(5)
    message = fit_error(state)
    assert "missing keys ['fc.bias']" in message
    assert "unexpected keys ['extra']" in message
    assert "norm.weight" in message


# --- .pt state dicts ---


def mapped_from(path: Path, address: int) -> bool:
    """Whether `address` lies in a memory mapping of `path` (Linux /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= address < high:
                return True
    return False


def test_pt_from_a_file_is_read_not_mapped(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    torch.save(net_state(), path)
    w = Weights(str(path), path.stat().st_size, "0" * 64, path=path)
    state = read_state_dict(w)
    for name, tensor in net_state().items():
        assert torch.equal(state[name], tensor), name
    # Not mmap=True: mapped, torch would not check each record's size against the pickle's.
    assert not any(mapped_from(path, t.data_ptr()) for t in state.values() if t.numel())
    model = build_module(Net, state, w.uri)
    assert not model.training


def test_pt_from_a_buffer() -> None:
    w = weights(torch_save_bytes(net_state()), uri="s3://models/net.pt")
    state = read_state_dict(w)
    for name, tensor in net_state().items():
        assert torch.equal(state[name], tensor), name


def test_pth_is_a_pt_file() -> None:
    w = weights(torch_save_bytes({"w": torch.ones(3)}), uri="s3://models/net.PTH?versionId=1")
    assert torch.equal(read_state_dict(w)["w"], torch.ones(3))


@pytest.mark.parametrize("payload", [TouchFile, RunShell])
def test_pickle_that_runs_code_is_refused_from_a_buffer(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    data = torch_save_bytes({"w": torch.ones(2), "x": payload(marker)})
    message = format_error(weights(data, uri="s3://models/evil.pt"))
    assert "weights_only" in message
    assert not marker.exists()


@pytest.mark.parametrize("payload", [TouchFile, RunShell])
def test_pickle_that_runs_code_is_refused_from_a_file(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": payload(marker)}, path)
    message = format_error(Weights(str(path), 0, "0" * 64, path=path))
    assert "weights_only" in message
    assert not marker.exists()


def test_the_malicious_payload_is_live(tmp_path: Path) -> None:
    # Guards the two tests above: without weights_only the same bytes do create the file.
    marker = tmp_path / "pwned"
    data = torch_save_bytes({"x": TouchFile(marker)})
    torch.load(io.BytesIO(data), weights_only=False)
    assert marker.exists()


def test_refusal_names_the_refused_callable_in_plain_text(tmp_path: Path) -> None:
    # The message ends up in a 503 body and in CloudWatch: it should say what was refused,
    # not carry terminal colour codes or advise loading with weights_only=False.
    message = format_error(
        weights(torch_save_bytes({"x": RunShell(tmp_path / "m")}), uri="s3://models/evil.pt")
    )
    assert "posix.system" in message
    assert "\x1b" not in message
    assert "weights_only` set to `False` will likely succeed" not in message


@pytest.mark.parametrize(
    "obj",
    [[torch.ones(2)], torch.ones(2), {"epoch": 3}, {1: torch.ones(1)}, {"w": [torch.ones(1)]}],
    ids=["list", "tensor", "int-value", "int-key", "nested"],
)
def test_pt_that_is_not_a_state_dict_is_refused(obj: object) -> None:
    message = format_error(weights(torch_save_bytes(obj), uri="s3://models/net.pt"))
    assert message == "s3://models/net.pt: expected a state dict of name -> tensor"


def legacy_save_bytes(obj: object) -> bytes:
    """torch.save's format before PyTorch 1.6: pickles one after another, not a zip archive."""
    out = io.BytesIO()
    torch.save(obj, out, _use_new_zipfile_serialization=False)
    return out.getvalue()


def from_file(tmp_path: Path, data: bytes, name: str = "net.pt") -> Weights:
    path = tmp_path / name
    path.write_bytes(data)
    return Weights(str(path), len(data), "0" * 64, path=path)


def test_legacy_pt_from_a_file_loads(tmp_path: Path) -> None:
    w = from_file(tmp_path, legacy_save_bytes(net_state()))
    state = read_state_dict(w)
    for name, tensor in net_state().items():
        assert torch.equal(state[name], tensor), name
    assert not build_module(Net, state, w.uri).training


def test_legacy_pt_from_a_buffer_loads() -> None:
    state = read_state_dict(weights(legacy_save_bytes(net_state()), uri="s3://models/net.pt"))
    assert torch.equal(state["fc.weight"], net_state()["fc.weight"])


@pytest.mark.parametrize("payload", [TouchFile, RunShell])
def test_legacy_pickle_that_runs_code_is_refused_from_a_file(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    w = from_file(tmp_path, legacy_save_bytes({"w": torch.ones(2), "x": payload(marker)}))
    message = format_error(w)
    assert message.startswith(f"{w.uri}: refused: not a plain state dict (torch.load ")
    assert "GLOBAL" in message
    assert not marker.exists()


DAMAGED = "cannot read this torch.save file, it is damaged or truncated"


@pytest.mark.parametrize("where", ["file", "buffer"])
@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (torch_save_bytes({"w": torch.ones(200)})[:300], "the zip archive's directory is missing"),
        (legacy_save_bytes({"w": torch.ones(200)})[:300], "its pickles are cut short or damaged"),
        (b"PK\x03\x04" + b"\0" * 60, "the zip archive's directory is missing"),
        (legacy_save_bytes({"w": torch.ones(200)})[:-10], "torch.load raised RuntimeError"),
    ],
    ids=["truncated-zip", "truncated-legacy", "zip-header-only", "legacy-storage-cut-short"],
)
def test_a_damaged_pt_says_so(tmp_path: Path, where: str, data: bytes, detail: str) -> None:
    w = from_file(tmp_path, data) if where == "file" else weights(data, uri="s3://models/net.pt")
    assert format_error(w) == f"{w.uri}: {DAMAGED} ({detail})"


@pytest.mark.parametrize("where", ["file", "buffer"])
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "it is empty"),
        (
            b"# My model\n\nWeights for the digits net.\n",
            "it starts with b'# My mod', neither a zip archive (torch.save) nor a pickle "
            "(torch.save with _use_new_zipfile_serialization=False)",
        ),
        (
            bytes(save({"w": torch.ones(2)})),
            "it is a safetensors file; name it .safetensors",
        ),
    ],
    ids=["empty", "text", "safetensors"],
)
def test_a_pt_that_is_not_a_torch_save_file_says_what_it_is(
    tmp_path: Path, where: str, data: bytes, reason: str
) -> None:
    w = from_file(tmp_path, data) if where == "file" else weights(data, uri="s3://models/net.pt")
    assert format_error(w) == f"{w.uri}: not a torch.save file: {reason}"


@pytest.mark.parametrize(
    ("uri", "fmt"),
    [
        ("s3://models/net.pt?versionId=v1", "pt"),
        ("s3://models/what?.pt", "pt"),
        ("s3://models/net.pt#1.safetensors", "safetensors"),
        ("/srv/net.PTH", "pt"),
        ("s3://models/net.safetensors?versionId=a.pt", "safetensors"),
    ],
)
def test_format_of_follows_the_model_uri(uri: str, fmt: str) -> None:
    assert format_of(Weights(uri, 0, "0" * 64)) == fmt


def test_a_safetensors_header_of_128_bytes_is_not_taken_for_a_pickle() -> None:
    # Its 8-byte length then begins with 0x80, the byte a pickle begins with.
    header = json.dumps({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    header += b" " * (128 - len(header))
    data = struct.pack("<Q", 128) + header + b"\x07"
    assert data[:1] == b"\x80"
    assert sniff_format(data[:16]) == "safetensors"
    assert read_state_dict(weights(data))["x"].tolist() == [7]
