"""Time torch <-> JAX conversion on a GPU against a device-to-device copy.

A ~100M-parameter float32 MLP (sizes (4096,)*7) on ``cuda:0``: ``torch_to_jax`` in
each layout (CUDA tensors to GPU arrays) and ``jax_to_torch`` back, ``copy=False``,
and the transfers between the GPU and the CPU, each timed with both frameworks
synchronised; first call and best of the repeats, against ``clone()`` of the same
tensors on the device. Needs CUDA builds of torch and jax. Run from the repository root:

    python scripts/bench_convert_gpu.py
    python scripts/bench_convert_gpu.py --sizes 1024,1024,1024 --repeats 2

The figures in the README's "On a GPU" came from this on an H200 (2026-12-04).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import jax
import torch

from equiv.convert import jax_to_torch, torch_to_jax
from equiv.spec import MLPSpec
from equiv.torch_mlp import TorchMLP


def _ready(tree: object) -> None:
    """Wait for every JAX array in ``tree``, and for torch's CUDA stream."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            leaf.block_until_ready()
    torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """(first, best) seconds of ``fn()`` over ``repeats`` calls, and its last result."""
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        _ready(out)
        times.append(time.perf_counter() - start)
    return times[0], min(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(["4096"] * 7))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not any(d.platform == "gpu" for d in jax.devices()):
        parser.error("needs CUDA builds of torch and jax and a GPU")
    spec = MLPSpec(tuple(int(w) for w in args.sizes.split(",")))
    model = TorchMLP(spec).cuda()
    gigabytes = sum(p.numel() for p in model.parameters()) * 4 / 1e9
    print(f"MLP {spec.sizes}: {gigabytes:.2f} GB float32 on {torch.cuda.get_device_name(0)}")
    print(f"{'case':40} {'first ms':>9} {'best ms':>9} {'GB/s':>8}")

    def report(label: str, fn: Callable[[], object], repeats: int = args.repeats) -> object:
        first, best, out = timed(fn, repeats)
        print(f"{label:40} {first * 1e3:9.2f} {best * 1e3:9.2f} {gigabytes / best:8.1f}")
        return out

    report(
        "clone() on the device (the copy)",
        lambda: {k: v.clone() for k, v in model.state_dict().items()},
    )
    for layout in ("torch", "equinox", "flax", "nnx"):
        params = report(
            f"torch_to_jax {layout}", functools.partial(torch_to_jax, model, layout=layout)
        )
        back = functools.partial(jax_to_torch, params, layout=layout, device="cuda")
        report(f"jax_to_torch {layout}", back)
    report("torch_to_jax torch copy=False", lambda: torch_to_jax(model, copy=False))
    cpu = jax.devices("cpu")[0]
    report("torch_to_jax, GPU to JAX's CPU", lambda: torch_to_jax(model, device=cpu), 2)
    params = torch_to_jax(model)
    report("jax_to_torch, GPU to torch's CPU", lambda: jax_to_torch(params, device="cpu"), 2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
