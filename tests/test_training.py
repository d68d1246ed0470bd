from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from handler.model import DigitsMLP
from handler.train import evaluate, load_split, train

WEIGHTS = Path(__file__).resolve().parents[1] / "handler" / "weights" / "digits.safetensors"


def test_train_reaches_accuracy() -> None:
    model, accuracy = train()
    assert isinstance(model, DigitsMLP)
    assert accuracy >= 0.95


def test_committed_weights_classify_held_out_split() -> None:
    state = load_file(str(WEIGHTS))
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values())
    model = DigitsMLP()
    model.load_state_dict(state, strict=True)

    _, x_te, _, y_te = load_split(seed=0)
    accuracy, _ = evaluate(model, x_te, y_te)
    assert accuracy >= 0.95

    with safe_open(str(WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["model"] == "DigitsMLP"
    assert metadata["dataset"] == "sklearn.datasets.load_digits"
    assert metadata["seed"] == "0"
    assert float(metadata["test_accuracy"]) >= 0.95
