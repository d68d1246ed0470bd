"""Write MyNet's weights as safetensors: `python -m examples.own_model.make_weights OUT`.

This stands in for your training script, which ends the same way: `save_file(state_dict, path)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from examples.own_model.net import MyNet


def make_weights(path: Path) -> Path:
    net = MyNet()
    with torch.no_grad():
        # "Trained" by hand so the answers are easy to check: class 0 when the first two
        # inputs add up to more than the last two, else class 1.
        net.linear.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
        net.linear.bias.zero_()
    save_file(net.state_dict(), str(path))
    # save_file creates the file under the process's umask (0600 under umask 077), which a
    # non-root reader, such as a Lambda function's user, could not open.
    path.chmod(0o644)
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "mynet.safetensors")
    print(f"wrote {make_weights(out)}")
