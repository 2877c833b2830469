"""Time torch <-> JAX conversion of a ~100M-parameter float32 MLP against a plain copy.

Each measurement runs in a fresh subprocess so that its peak resident memory
(``ru_maxrss``) is its own. For every direction and layout it reports the
conversion time (first call and best of the repeats), the first jitted use of the
result (compilation included: a jitted sum over every leaf, which reads every
byte), and the peak resident memory above what the process held before converting.
The baselines are ``np.copyto`` of the same bytes into buffers that already exist
(memory bandwidth alone) and into new ``np.empty`` buffers (what any conversion
returning new arrays must also pay: the kernel maps and zeroes the new pages).

    python scripts/bench_convert.py                # sizes (4096,)*7: 100.7M params
    python scripts/bench_convert.py --sizes 1024,1024,1024 --repeats 2
    python scripts/bench_convert.py --successive 8  # N conversions kept alive, each timed

``--successive`` shows where first-touch costs come from: it keeps every result alive,
so each conversion needs memory never used before in the process, and compares
``torch_to_jax`` (torch layout) with ``tensor.clone()`` from torch's own allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = [
    ("np.copyto (existing buffers)", "copyto", None),
    ("np.copyto (new np.empty buffers)", "copyto_new", None),
    ("torch_to_jax torch copy=False", "to_jax_shared", "torch"),
    ("torch_to_jax torch", "to_jax", "torch"),
    ("torch_to_jax equinox", "to_jax", "equinox"),
    ("torch_to_jax flax", "to_jax", "flax"),
    ("torch_to_jax nnx", "to_jax", "nnx"),
    ("jax_to_torch torch", "to_torch", "torch"),
    ("jax_to_torch flax", "to_torch", "flax"),
    ("jax_to_torch flax out=module", "to_torch_out", "flax"),
    ("jax_to_torch equinox out=module", "to_torch_out", "equinox"),
]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(kind: str, layout: str | None, sizes: tuple[int, ...], repeats: int) -> dict:
    """Run inside the subprocess: one kind of conversion, timed."""
    import jax
    import numpy as np
    import torch

    from equiv.convert import jax_to_torch, torch_to_jax
    from equiv.spec import MLPSpec
    from equiv.torch_mlp import TorchMLP

    spec = MLPSpec(sizes)
    with torch.no_grad():
        model = TorchMLP(spec, device="meta").to_empty(device="cpu")
        for p in model.parameters():
            p.normal_()
    state = dict(model.state_dict())
    touch = jax.jit(lambda tree: sum(leaf.sum() for leaf in jax.tree.leaves(tree)))
    if kind.startswith("to_torch"):
        source = torch_to_jax(state, layout=layout)
        target = TorchMLP(spec, device="meta").to_empty(device="cpu")
        for t in target.state_dict().values():
            t.zero_()  # touch the pages now, not inside the timed copy
    elif kind.startswith("copyto"):
        source = [t.numpy() for t in state.values()]
        target = [np.zeros_like(a) for a in source] if kind == "copyto" else None
    before = rss_mb()

    def once():
        if kind == "copyto":
            for dst, src in zip(target, source, strict=True):
                np.copyto(dst, src)
            return target
        if kind == "copyto_new":
            fresh = [np.empty_like(a) for a in source]
            for dst, src in zip(fresh, source, strict=True):
                np.copyto(dst, src)
            return fresh
        if kind == "to_jax":
            return torch_to_jax(state, layout=layout)
        if kind == "to_jax_shared":
            return torch_to_jax(state, layout=layout, copy=False)
        if kind == "to_torch":
            return jax_to_torch(source, layout=layout)
        return jax_to_torch(source, layout=layout, out=target)

    times, result = [], None
    for _ in range(repeats):
        del result
        start = time.perf_counter()
        result = once()
        times.append(time.perf_counter() - start)
    first_use = None
    if kind.startswith("to_jax"):
        start = time.perf_counter()
        touch(result).block_until_ready()
        first_use = time.perf_counter() - start
    return {
        "first_s": times[0],
        "best_s": min(times),
        "first_jit_use_s": first_use,
        "peak_extra_mb": rss_mb() - before,
        "baseline_rss_mb": before,
    }


def successive(sizes: tuple[int, ...], count: int) -> None:
    """Run inside the subprocess: ``count`` conversions kept alive, each timed."""
    import torch

    from equiv.convert import torch_to_jax
    from equiv.spec import MLPSpec
    from equiv.torch_mlp import TorchMLP

    with torch.no_grad():
        model = TorchMLP(MLPSpec(sizes), device="meta").to_empty(device="cpu")
        for p in model.parameters():
            p.normal_()
    state = dict(model.state_dict())
    convert = {
        "tensor.clone() (torch's allocator)": lambda: [t.clone() for t in state.values()],
        "torch_to_jax (torch layout)": lambda: torch_to_jax(state, layout="torch"),
    }
    for label, once in convert.items():
        kept, times = [], []
        for _ in range(count):
            start = time.perf_counter()
            kept.append(once())
            times.append(time.perf_counter() - start)
        print(f"{label:36} " + " ".join(f"{t:.3f}" for t in times) + " s")
        del kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(["4096"] * 7))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--successive", type=int, metavar="N")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if args.successive:
        successive(sizes, args.successive)
        return 0
    if args.child:
        kind, layout = args.child
        result = measure(kind, None if layout == "-" else layout, sizes, args.repeats)
        print(json.dumps(result), flush=True)
        # Leave without interpreter shutdown: an XLA worker may still be releasing a
        # DLPack-imported buffer, whose deleter (torch's, NumPy's) takes the GIL and
        # aborts the process when that happens during finalization (README, Limits).
        os._exit(0)
    count = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
    megabytes = count * 4 / 1e6
    print(
        f"MLP {sizes}: {count / 1e6:.1f}M float32 parameters, {megabytes:.0f} MB; "
        f"best of {args.repeats}; peak = max RSS above the process before converting\n"
    )
    header = (
        f"{'case':34} {'first s':>8} {'best s':>8} {'GB/s':>6} {'1st jit use s':>13} "
        f"{'peak+ MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for label, kind, layout in CASES:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--sizes",
                args.sizes,
                "--repeats",
                str(args.repeats),
                "--child",
                kind,
                layout or "-",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        use = "" if r["first_jit_use_s"] is None else f"{r['first_jit_use_s']:.3f}"
        print(
            f"{label:34} {r['first_s']:8.3f} {r['best_s']:8.3f} "
            f"{megabytes / 1e3 / r['best_s']:6.2f} {use:>13} {r['peak_extra_mb']:9.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
