"""The relative difference: ``|actual - expected| / |expected|`` in every path and row.

torch's ``assert_close`` convention: the second argument (the expected side, the
float64 reference in a row against it) is the denominator. Each case is held in
both code paths (the NumPy path and :mod:`equiv.fastcompare`) and with the sides
swapped, where the number (and an ``rtol`` verdict) must change.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from equiv import MLPSpec, fastcompare
from equiv.compare import compare_leaf, compute_dtype
from equiv.harness import REFERENCE, RUNNERS, compare_trajectories
from equiv.problem import make_problem
from equiv.tolerance import Tolerance

inf = math.inf
CHUNK = 1024
N = 3 * CHUNK + 5  # several chunks and a partial one: the fast path's own indexing

# (id, actual, expected, tolerance, max_rel, passed): one element differs, at AT.
CASES = [
    ("expected is the denominator", 2.0, 1.0, Tolerance(rtol=0.6), 1.0, False),
    ("the same pair swapped", 1.0, 2.0, Tolerance(rtol=0.6), 0.5, True),
    ("expected zero", 1.0, 0.0, Tolerance(atol=2.0), inf, True),
    ("actual zero", 0.0, 1.0, Tolerance(atol=2.0), 1.0, True),
    ("actual zero, beyond rtol", 0.0, 1.0, Tolerance(rtol=0.5), 1.0, False),
]
# (actual dtype, expected dtype): the values above are exact in each.
DTYPES = [
    (np.float32, np.float32),
    (np.float32, np.float64),
    (np.float64, np.float32),
    (ml_dtypes.bfloat16, np.float32),
    (np.float16, np.float16),
]
AT = 2 * CHUNK + 7


def _leaf(value, dtype) -> np.ndarray:
    x = np.full(N, 1.0, dtype)
    x[AT] = value
    return x


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{np.dtype(d[0])}-{np.dtype(d[1])}")
@pytest.mark.parametrize("path", ["numpy", "fast"])
@pytest.mark.parametrize(
    "actual, expected, tol, max_rel, passed", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_relative_difference_divides_by_the_expected_side(
    monkeypatch, actual, expected, tol, max_rel, passed, path, dtypes, fast_path_used
):
    monkeypatch.setattr(fastcompare, "CHUNK", CHUNK)
    used = fast_path_used
    a, b = _leaf(actual, dtypes[0]), _leaf(expected, dtypes[1])
    d = compare_leaf(a, b, tol, fast_threshold=0 if path == "fast" else N + 1)
    assert (d.max_rel, d.max_rel_index, d.passed) == (max_rel, (AT,), passed)
    # A passing leaf is decided by the fast path alone: its own division is held here.
    assert used == ([passed] if path == "fast" else [])


def test_the_report_line_shows_the_expected_sides_relative_difference():
    d = compare_leaf(
        np.array([2.0]), np.array([1.0]), Tolerance(), actual_name="jax", expected_name="torch"
    )
    assert d.describe().splitlines()[3] == "  Greatest relative difference: 1 at index (0,)"
    swapped = compare_leaf(
        np.array([1.0]), np.array([2.0]), Tolerance(), actual_name="torch", expected_name="jax"
    )
    assert swapped.describe().splitlines()[3] == (
        "  Greatest relative difference: 0.5 at index (0,)"
    )


def test_every_row_of_a_comparison_divides_by_its_second_name():
    # Pairs of backends and rows against the float64 reference alike: the row "a vs b"
    # holds |a - b| / |b|, and the reference is always b (the expected side).
    problem = make_problem(MLPSpec((4, 3, 2)), batch_size=2, seed=0)
    runs = {name: RUNNERS[name](problem, 0.1) for name in ("torch", "jax", REFERENCE)}
    report = compare_trajectories(problem, runs, learning_rate=0.1)
    pairs = {(d.actual, d.expected) for d in report.leaves}
    assert {frozenset(p) for p in pairs} == {
        frozenset(p) for p in (("torch", "jax"), ("torch", REFERENCE), ("jax", REFERENCE))
    }
    assert all(actual != REFERENCE for actual, _ in pairs)  # the reference is expected
    swapped_differs = False
    for d in report.leaves:
        a = np.asarray(runs[d.actual].stage(d.stage, d.step)[d.name])
        b = np.asarray(runs[d.expected].stage(d.stage, d.step)[d.name])
        ct = compute_dtype(a, b)
        a, b = a.astype(ct), b.astype(ct)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.nan_to_num(np.abs(a - b) / np.abs(b), nan=0.0, posinf=inf)
            other = np.nan_to_num(np.abs(a - b) / np.abs(a), nan=0.0, posinf=inf)
        assert d.max_rel == rel.max(), (d.where, d.name, d.actual, d.expected)
        swapped_differs |= d.max_rel != other.max()
    assert swapped_differs  # the swapped definition is told apart by some row
