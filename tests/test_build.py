"""build_module: one build with parameters on the meta device and buffers real, the file's
tensors adopted as they are, and one bounded line for each way a module and a file disagree."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lazyserve.build import build_module
from lazyserve.errors import ModelFormatError
from tests.helpers import in_buffer, safetensors_views

URI = "s3://models/net.safetensors"


class Net(nn.Module):
    """Parameters, a persistent buffer (BatchNorm), a non-persistent buffer and a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)
        self.register_buffer("offset", torch.arange(3.0), persistent=False)
        self.scale = torch.tensor(2.0)  # a plain tensor attribute, not a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(self.fc(x)) * self.scale + self.offset
        return out


def reference() -> Net:
    torch.manual_seed(0)
    net = Net()
    net.norm.running_mean.uniform_()
    return net.eval()


def fit_error(build: Callable[[], nn.Module], state: dict[str, torch.Tensor]) -> str:
    with pytest.raises(ModelFormatError) as info:
        build_module(build, state, URI)
    return str(info.value)


def test_the_module_adopts_the_file_tensors_and_computes_as_a_real_build() -> None:
    ref = reference()
    state, buffer = safetensors_views(ref.state_dict())
    model = build_module(Net, state, URI)

    assert isinstance(model, Net)
    assert not model.training and not model.norm.training
    for name, tensor in model.state_dict().items():
        assert in_buffer(tensor, buffer), name  # the fetched bytes, not a copy
    x = torch.randn(5, 4)
    with torch.inference_mode():
        assert torch.equal(model(x), ref(x))


def test_buffers_and_constants_come_from_the_one_build() -> None:
    calls = []

    def build() -> Net:
        calls.append(1)
        return Net()

    state, _ = safetensors_views(reference().state_dict())
    model = build_module(build, state, URI)
    assert calls == [1]  # no second, real build for the non-persistent buffer
    assert torch.equal(model.offset, torch.arange(3.0))
    assert torch.equal(model.scale, torch.tensor(2.0))
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers(), model.scale))


class ReadsAParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm_at_init = self.fc.weight.norm().item()


def test_a_constructor_reading_a_parameter_is_told_how_to_fix_it() -> None:
    state, _ = safetensors_views(nn.Linear(4, 3).state_dict())
    message = fit_error(ReadsAParameter, {f"fc.{k}": v for k, v in state.items()})
    assert message == (
        f"{URI}: building ReadsAParameter failed: its constructor reads the value of a parameter "
        "(.item(), float(), .tolist(), an operation with a CPU tensor), but lazyserve creates "
        "parameters without data until the weights are loaded; compute that value from "
        "constants or a buffer, or in forward()"
    )


class KeepsAParameterAside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.weights = [self.fc.weight]  # the constructor's parameter, not the loaded one
        self.transposed = self.fc.weight.t()


def test_tensors_left_without_data_are_named_at_load_time() -> None:
    state, _ = safetensors_views(nn.Linear(4, 3).state_dict())
    message = fit_error(KeepsAParameterAside, {f"fc.{k}": v for k, v in state.items()})
    assert message == (
        f"{URI}: KeepsAParameterAside has tensors without data after the load: ['weights[0]', "
        "'transposed']; they are attributes the constructor derived from parameters, which "
        "lazyserve creates without data: register them with register_buffer(name, tensor, "
        "persistent=False) computed from constants, or compute them in forward()"
    )


def test_other_constructor_errors_are_the_users_own() -> None:
    def build() -> nn.Module:
        raise RuntimeError("bad metadata in my config")  # 'meta' only as part of a word

    with pytest.raises(RuntimeError, match="bad metadata in my config"):
        build_module(build, {}, URI)


def test_parameters_go_to_the_meta_device_only_while_this_thread_builds() -> None:
    seen: dict[str, bool] = {}

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            seen["own"] = self.fc.weight.is_meta

            # Another thread building a module meanwhile gets real parameters.
            def elsewhere() -> None:
                seen["other"] = nn.Linear(2, 2).weight.is_meta

            other = threading.Thread(target=elsewhere)
            other.start()
            other.join()

    state, _ = safetensors_views(nn.Linear(2, 2).state_dict())
    build_module(Probe, {f"fc.{k}": v for k, v in state.items()}, URI)
    assert seen == {"own": True, "other": False}
    assert not nn.Linear(2, 2).weight.is_meta  # and nothing is left behind
    with pytest.raises(ModelFormatError):
        build_module(ReadsAParameter, {}, URI)
    assert not nn.Linear(2, 2).weight.is_meta  # not after a failed build either


def test_torch_compile_in_the_builder() -> None:
    ref = reference()
    state, buffer = safetensors_views(ref.state_dict())
    model = build_module(lambda: torch.compile(Net(), backend="eager"), state, URI)
    assert all(in_buffer(t, buffer) for t in model.state_dict().values())
    x = torch.randn(3, 4)
    with torch.inference_mode():
        assert torch.equal(model(x), ref(x))


def test_weights_saved_from_a_compiled_module_load_into_a_plain_one() -> None:
    ref = reference()
    compiled = torch.compile(reference(), backend="eager")
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    state, _ = safetensors_views(compiled.state_dict())
    model = build_module(Net, state, URI)
    x = torch.randn(3, 4)
    with torch.inference_mode():
        assert torch.equal(model(x), ref(x))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_parameters_stored_once_are_tied_again() -> None:
    # safetensors keeps one name of tensors that share memory (save_model drops the others).
    state, buffer = safetensors_views({"embed.weight": torch.randn(10, 4)})
    model = build_module(Tied, state, URI)
    assert model.head.weight is model.embed.weight
    assert in_buffer(model.head.weight, buffer)
    assert len(list(model.parameters())) == 1


def sequential(count: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Sequential(*(nn.Linear(2, 2) for _ in range(count))).to(dtype)


def test_a_float32_file_for_a_bfloat16_model_is_summed_up_in_one_line() -> None:
    state = sequential(100).state_dict()
    message = fit_error(lambda: sequential(100, torch.bfloat16), state)
    assert message == (
        f"{URI}: weights do not fit Sequential: 200 tensors are float32 where the model has "
        "bfloat16 ['0.weight', '0.bias', '1.weight', '1.bias', '2.weight', and 195 more]; set "
        "LAZYSERVE_DTYPE=bfloat16 or save the weights in bfloat16"
    )


def test_dtype_casts_one_tensor_at_a_time() -> None:
    ref = sequential(3)
    state, buffer = safetensors_views(ref.state_dict())
    model = build_module(lambda: sequential(3), state, URI, dtype=torch.bfloat16)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, state[name].to(torch.bfloat16)), name
    # The dtype the file already has: the file's tensors stay as they are.
    same = build_module(lambda: sequential(3), state, URI, dtype=torch.float32)
    assert all(in_buffer(t, buffer) for t in same.state_dict().values())


def test_dtype_casts_a_bfloat16_model_to_the_file() -> None:
    state, _ = safetensors_views(sequential(2).state_dict())
    model = build_module(lambda: sequential(2, torch.bfloat16), state, URI, dtype=torch.float32)
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32}


def test_dtype_must_be_a_float_type() -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_module(Net, {}, URI, dtype=torch.int8)


def test_missing_unexpected_and_shapes_are_named_together() -> None:
    state = reference().state_dict()
    del state["fc.bias"]
    state["extra"] = torch.ones(1)
    state["norm.weight"] = torch.ones(5)
    state["norm.num_batches_tracked"] = torch.ones((), dtype=torch.float32)
    assert fit_error(Net, state) == (
        f"{URI}: weights do not fit Net: missing keys ['fc.bias'], unexpected keys ['extra'], "
        "shape or dtype mismatches [norm.weight: file (5,) torch.float32, model (3,) "
        "torch.float32, norm.num_batches_tracked: file torch.float32, model torch.int64]"
    )


def test_hundreds_of_missing_keys_make_a_short_message() -> None:
    message = fit_error(lambda: sequential(300), {})
    assert message.startswith(
        f"{URI}: weights do not fit Sequential: missing keys ['0.weight', '0.bias', '1.weight', "
        "'1.bias', '2.weight', and 595 more]"
    )
    assert len(message) < 200
