"""Small helpers shared by the tests (fixtures from equiv's own pytest plugin too)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from equiv.compare import to_numpy


@pytest.fixture
def rng(equiv_seed: int) -> np.random.Generator:
    """A NumPy generator seeded from the test's own name."""
    return np.random.default_rng(equiv_seed)


def _bitwise_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The names of the leaves where two flat trees differ in any bit (or dtype, shape).

    Empty when the trees are identical (``-0.0`` and ``0.0`` differ here, unlike
    ``torch.equal``). Works on torch tensors, JAX and NumPy arrays.
    """
    assert set(a) == set(b), (sorted(a), sorted(b))
    differ = []
    for name in a:
        x, y = to_numpy(a[name]), to_numpy(b[name])
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            differ.append(name)
    return differ


@pytest.fixture
def fast_path_used(monkeypatch) -> list[bool]:
    """Whether each call of ``equiv.compare._fast_stats`` in the test took the fast path
    (a result, not None), in order."""
    from equiv import compare

    used: list[bool] = []
    fast_stats = compare._fast_stats

    def spy(*args):
        out = fast_stats(*args)
        used.append(out is not None)
        return out

    monkeypatch.setattr(compare, "_fast_stats", spy)
    return used


@pytest.fixture
def bitwise_diff():
    """:func:`_bitwise_diff`, as a fixture so that test modules need not import conftest."""
    return _bitwise_diff


@pytest.fixture
def onednn_bf16():
    """torch's oneDNN float32 matmuls in bf16 (``mkldnn.matmul.fp32_precision``) for the
    test, restored after; skips where torch lacks the setting or this CPU ignores it
    (no bf16 path: its float32 matmuls stay exact). Yields the width of a square
    matmul seen to be lowered: a model at least that wide has its matmuls lowered
    (oneDNN takes the bf16 path above a size that varies with torch and the CPU)."""
    import torch

    mkldnn = torch.backends.mkldnn.matmul
    if not hasattr(mkldnn, "fp32_precision"):
        pytest.skip("this torch has no mkldnn fp32_precision setting")
    before = mkldnn.fp32_precision
    try:
        mkldnn.fp32_precision = "bf16"
        width = 256
        x = torch.full((width, width), 1.0 + 2.0**-20)
        if torch.equal(x @ torch.eye(width), x):
            pytest.skip("this CPU computes float32 matmuls exactly under the bf16 setting")
        yield width
    finally:
        mkldnn.fp32_precision = before


def _flax_port(activation, loss, layers: int = 3):
    """A Flax-layout port of an MLP of ``layers`` layers, written as a user would, with
    the activation ``activation`` (a callable: a formula of one's own) and
    ``loss(output, y)``."""

    def loss_fn(params, x, y):
        h = x
        for i in range(layers):
            h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
            h = activation(h) if i < layers - 1 else h
        return loss(h, y)

    return loss_fn


@pytest.fixture
def flax_port():
    """:func:`_flax_port`, as a fixture so that test modules need not import conftest."""
    return _flax_port
