"""Time equiv's tree comparison against stock asserts on two 100M-parameter trees.

Usage: python scripts/bench_compare.py [--params 100_000_000] [--repeats 5]

Builds two float32 trees shaped like a wide MLP (square ``layers.i.weight`` and
``layers.i.bias`` leaves, NumPy arrays as NumPy allocates them), the second equal
to the first plus noise of about 1e-7, so every comparison passes and does all
its work. Then times, in GB/s of input read (2 × bytes / seconds):

* ``equiv.compare_trees`` with a derived-style tolerance (``scaled``) and with
  a user tolerance (``rtol``, ``atol``), cold (first call: compiles) and warm;
* ``chex.assert_trees_all_close`` (on JAX arrays), ``np.testing.assert_allclose``
  and ``torch.testing.assert_close`` (on torch views of the same memory).

Warm figures are the best of ``--repeats`` runs; stock asserts are timed warm too.
"""

from __future__ import annotations

import argparse
import math
import time

import chex
import jax
import numpy as np
import torch

from equiv.compare import compare_trees
from equiv.tolerance import Tolerance


def make_trees(params: int, seed: int = 0) -> tuple[dict, dict]:
    """Two ``{name: float32 array}`` trees of about ``params`` parameters."""
    width = 4096
    layers = max(1, round(params / (width * width + width)))
    rng = np.random.default_rng(seed)
    a, b = {}, {}
    for i in range(layers):
        for name, shape in ((f"layers.{i}.weight", (width, width)), (f"layers.{i}.bias", (width,))):
            x = rng.standard_normal(shape, dtype=np.float32)
            a[name] = x
            b[name] = x + np.float32(1e-7) * rng.standard_normal(shape, dtype=np.float32)
    return a, b


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    a, b = make_trees(args.params)
    nbytes = sum(x.nbytes for x in a.values()) + sum(x.nbytes for x in b.values())
    n = sum(x.size for x in a.values())
    print(
        f"two trees of {n:,} float32 parameters in {len(a)} leaves; "
        f"{nbytes / 1e9:.2f} GB read per comparison; {torch.get_num_threads()} torch threads"
    )

    derived = Tolerance(scaled=8 * math.sqrt(4096) * 2 * 2.0**-24, derivation="8·√4096·2u·max|x|")
    user = Tolerance(atol=1e-6, rtol=1e-5)
    rows: list[tuple[str, float]] = []

    def equiv_run(tol):
        diffs = compare_trees(a, b, tol)
        assert all(d.passed for d in diffs), [d.describe() for d in diffs if not d.passed]

    start = time.perf_counter()
    equiv_run(derived)
    rows.append(("equiv compare_trees, derived tolerance, cold", time.perf_counter() - start))
    rows.append(
        (
            "equiv compare_trees, derived tolerance, warm",
            best_of(lambda: equiv_run(derived), args.repeats),
        )
    )
    start = time.perf_counter()
    equiv_run(user)
    rows.append(("equiv compare_trees, rtol/atol, cold", time.perf_counter() - start))
    rows.append(
        ("equiv compare_trees, rtol/atol, warm", best_of(lambda: equiv_run(user), args.repeats))
    )

    ta = {k: torch.from_numpy(v) for k, v in a.items()}
    tb = {k: torch.from_numpy(v) for k, v in b.items()}
    rows.append(
        (
            "equiv compare_trees on torch tensors, warm",
            best_of(lambda: compare_trees(ta, tb, derived), args.repeats),
        )
    )
    ja = {k: jax.device_put(v) for k, v in a.items()}
    jb = {k: jax.device_put(v) for k, v in b.items()}
    jax.block_until_ready((ja, jb))
    rows.append(
        (
            "equiv compare_trees on JAX arrays, warm",
            best_of(lambda: compare_trees(ja, jb, derived), args.repeats),
        )
    )

    stock_repeats = max(1, min(args.repeats, 3))

    def chex_run():
        chex.assert_trees_all_close(ja, jb, rtol=1e-5, atol=1e-6)

    def numpy_run():
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)

    def torch_run():
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)

    for label, fn in (
        ("chex.assert_trees_all_close", chex_run),
        ("np.testing.assert_allclose", numpy_run),
        ("torch.testing.assert_close", torch_run),
    ):
        fn()  # warm
        rows.append((label, best_of(fn, stock_repeats)))

    print(f"{'what':50s} {'seconds':>9s} {'GB/s':>7s}")
    for label, seconds in rows:
        print(f"{label:50s} {seconds:9.3f} {nbytes / seconds / 1e9:7.2f}")
    ours = dict(rows)["equiv compare_trees, derived tolerance, warm"]
    fastest_stock = min(s for label, s in rows if not label.startswith("equiv"))
    print(
        f"equiv (derived tolerance, warm) is {fastest_stock / ours:.1f}x the fastest stock "
        f"assert here ({nbytes / ours / 1e9:.1f} GB/s)"
    )


if __name__ == "__main__":
    main()
