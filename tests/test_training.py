from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from handler.model import DigitsMLP
from handler.train import evaluate, load_split, save, train

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


def test_saved_weights_are_readable_by_anyone_whatever_the_umask(tmp_path: Path) -> None:
    # Under umask 077 safetensors' writer leaves 0600: the Dockerfile copies the file into the
    # image, where Lambda's non-root user could not read it.
    out = tmp_path / "digits.safetensors"
    previous = os.umask(0o077)
    try:
        save(DigitsMLP(), out, accuracy=0.0)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o644
    assert set(load_file(str(out))) == set(DigitsMLP().state_dict())
