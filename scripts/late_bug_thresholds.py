"""The smallest planted bug caught when it starts at a later step.

A hand-written backward of a 6-8-8-8-8-2 ELU model (batch 16, SGD at 0.1) whose
``fc1.bias`` gradient is off by a factor ``1 + s`` from step ``T`` on: a bisection on
``s`` (to a factor 1.5) finds the smallest caught, per ``T``. A bound that grew with
the step number let such bugs grow with ``T`` too. Run from the repository root:

    python scripts/late_bug_thresholds.py --seed 0 --steps 10 --starts 1 6 10
"""

from __future__ import annotations

import argparse
import math

import torch

from equiv import MLPSpec, TorchMLP, manual
from equiv.port import check_manual_backward

SPEC = MLPSpec((6, 8, 8, 8, 8, 2), activation="elu")


def caught(start: int, s: float, seed: int, steps: int) -> bool:
    """Whether a bias gradient off by ``1 + s`` from step ``start`` on is caught."""
    torch.manual_seed(seed)
    model = TorchMLP(SPEC)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, 6, generator=gen) for _ in range(steps)]
    ys = [torch.randn(16, 2, generator=gen) for _ in range(steps)]
    calls = []

    def grad_fn(params, x, y):
        calls.append(None)
        loss, grads = manual.loss_and_grads(params, x, y, SPEC)
        if len(calls) >= start:
            grads = {**grads, "fc1.bias": grads["fc1.bias"] * (1 + s)}
        return loss, grads

    return not check_manual_backward(model, grad_fn, xs, ys, steps=steps, learning_rate=0.1).agree


def threshold(start: int, seed: int, steps: int) -> float | None:
    """The smallest ``s`` caught (within a factor 1.5), or None if 1 is not."""
    lo, hi = 1e-8, 1.0
    if not caught(start, hi, seed, steps):
        return None
    while hi / lo > 1.5:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if caught(start, mid, seed, steps) else (mid, hi)
    return hi


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--starts", type=int, nargs="+", default=[1, 6, 10])
    args = parser.parse_args(argv)
    for start in args.starts:
        found = threshold(start, args.seed, args.steps)
        shown = "not caught at 1" if found is None else f"{found:.2g}"
        print(f"from step {start}: smallest caught {shown}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
