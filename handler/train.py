"""Reproducibly train the reference DigitsMLP on sklearn's built-in 8x8 digits data.

Usage: python -m handler.train [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from handler.model import DigitsMLP

DEFAULT_OUT = Path("handler/weights/digits.safetensors")
EPOCHS = 60
BATCH_SIZE = 64
LEARNING_RATE = 1e-3


def load_split(
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (x_train, x_test, y_train, y_test); x is float32 in 0..16, y is int64."""
    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return (
        torch.from_numpy(x_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_tr),
        torch.from_numpy(y_te),
    )


def evaluate(model: DigitsMLP, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Return (accuracy, number correct) of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        correct = int((model(x).argmax(dim=1) == y).sum().item())
    return correct / len(y), correct


def train(seed: int = 0) -> tuple[DigitsMLP, float]:
    """Train a DigitsMLP deterministically; return the model and its held-out accuracy."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(seed)
    finally:  # a process-wide switch: give it back as it was
        torch.use_deterministic_algorithms(was_deterministic)


def _train(seed: int) -> tuple[DigitsMLP, float]:
    x_tr, x_te, y_tr, y_te = load_split(seed)
    model = DigitsMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)

    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x_tr), generator=generator)
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            optimizer.step()

    accuracy, _ = evaluate(model, x_te, y_te)
    return model, accuracy


def save(model: DigitsMLP, out: Path, accuracy: float, seed: int = 0) -> str:
    """Write the state dict as contiguous float32 safetensors (mode 0644); return the file's
    sha256."""
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "model": "DigitsMLP",
        "dataset": "sklearn.datasets.load_digits",
        "test_accuracy": f"{accuracy:.4f}",
        "seed": str(seed),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=metadata)
    canonicalize_header(out)
    # save_file creates the file under the process's umask (0600 under umask 077); the
    # Dockerfile copies it into the image, where the function's non-root user must read it.
    out.chmod(0o644)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def canonicalize_header(path: Path) -> None:
    """Rewrite the safetensors header with ``__metadata__`` keys sorted, in place.

    safetensors (<= 0.8.0 at least) serializes the metadata from a Rust HashMap, so its key
    order, and thus the file's bytes, change from run to run (safetensors/safetensors#584).
    Sorting the keys gives byte-identical files; the header length and tensor data are unchanged.
    """
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:
        raise ValueError(f"canonical header of {path} is longer than the original")
    path.write_bytes(raw[:8] + text.ljust(size, b" ") + raw[8 + size :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    args = parser.parse_args(argv)
    out: Path = args.out

    seed = 0
    model, accuracy = train(seed)
    _, x_te, _, y_te = load_split(seed)
    _, correct = evaluate(model, x_te, y_te)
    digest = save(model, out, accuracy, seed)
    print(f"test accuracy: {accuracy:.4f} ({correct}/{len(y_te)})")
    print(f"wrote {out} sha256: {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
