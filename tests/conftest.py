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
def bitwise_diff():
    """:func:`_bitwise_diff`, as a fixture so that test modules need not import conftest."""
    return _bitwise_diff
