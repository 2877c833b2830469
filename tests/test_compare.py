"""Leaf comparison, reports and the fast path of :mod:`equiv.compare`.

Every check has a passing and a failing case; message lines are pinned; the fast
path (:mod:`equiv.fastcompare`) is held to the NumPy path field by field, with a
small chunk so that the arrays stay small.
"""

from __future__ import annotations

import json
import math
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from equiv import compare, fastcompare
from equiv.compare import LeafDiff, Report, compare_leaf, compare_trees
from equiv.tolerance import Tolerance

T = Tolerance(atol=0.1)
nan, inf = float("nan"), float("inf")

# (id, actual, expected, tolerance, passed, mismatched, nonfinite)
CASES = [
    ("equal", [1.0, 2.0], [1.0, 2.0], Tolerance(), True, 0, 0),
    ("within atol", [1.0, 2.05], [1.0, 2.0], T, True, 0, 0),
    ("beyond atol", [1.0, 2.5], [1.0, 2.0], T, False, 1, 0),
    ("at the bound", [1.0, 2.25], [1.0, 2.0], Tolerance(atol=0.25), True, 0, 0),
    ("within rtol", [101.0], [100.0], Tolerance(rtol=0.011), True, 0, 0),
    ("beyond rtol", [101.0], [100.0], Tolerance(rtol=0.009), False, 1, 0),
    ("within scaled", [10.0, 0.0], [10.0, 0.5], Tolerance(scaled=0.051), True, 0, 0),
    ("beyond scaled", [10.0, 0.0], [10.0, 0.5], Tolerance(scaled=0.049), False, 1, 0),
    ("zero bound, equal", [0.0, 3.0], [0.0, 3.0], Tolerance(), True, 0, 0),
    ("zero bound, differ", [0.0, 3.0], [0.0, 3.5], Tolerance(), False, 1, 0),
    ("NaN both sides", [nan, 1.0], [nan, 1.0], T, True, 0, 0),
    ("NaN one side", [nan, 1.0], [1.0, 1.0], T, False, 1, 1),
    ("NaN other side", [1.0, 1.0], [1.0, nan], T, False, 1, 1),
    ("Inf both sides", [inf, -inf], [inf, -inf], T, True, 0, 0),
    ("Inf of the other sign", [inf], [-inf], T, False, 1, 1),
    ("Inf against finite", [inf, 1.0], [5.0, 1.0], T, False, 1, 1),
    ("NaN against Inf", [nan], [inf], T, False, 1, 1),
]


F32_MAX = float(np.finfo(np.float32).max)  # 3.40e38

# An Inf in float32 against a finite value passes only where the bound reaches past
# float32's largest value the way the Inf points: it is the rounded value of one the
# bound allows. A NaN never passes.
# (id, actual, expected, atol, passed, ratio): float32 actual, float64 expected.
OVERFLOWS = [
    ("Inf the bound reaches", inf, 3.0e38, 0.5e38, True, (F32_MAX - 3.0e38) / 0.5e38),
    ("Inf the bound falls short of", inf, 3.0e38, 0.3e38, False, inf),
    ("Inf the other way", -inf, 3.0e38, 0.5e38, False, inf),
    ("-Inf the bound reaches", -inf, -3.0e38, 0.5e38, True, (F32_MAX - 3.0e38) / 0.5e38),
    ("Inf past a value already beyond float32", inf, 1e183, 1e170, True, 0.0),
    ("NaN, never a rounded value", nan, -3.0e38, 0.5e38, False, inf),
    ("NaN beside an infinite bound", nan, 0.0, inf, False, inf),
]


@pytest.mark.parametrize(
    "actual, expected, atol, passed, ratio",
    [c[1:] for c in OVERFLOWS],
    ids=[c[0] for c in OVERFLOWS],
)
def test_an_overflow_passes_only_where_the_bound_reaches_past_the_dtype(
    actual, expected, atol, passed, ratio
):
    tolerance = Tolerance(atol=atol) if math.isfinite(atol) else Tolerance(atol=1.0, scaled=inf)
    for a, b in ((actual, expected), (expected, actual)):  # either side may overflow
        if not math.isfinite(b):
            a, b = np.array([a], np.float64), np.array([b], np.float32)
        else:
            a, b = np.array([a], np.float32), np.array([b], np.float64)
        d = compare_leaf(a, b, tolerance)
        assert (d.passed, d.nonfinite_mismatched) == (passed, 0 if passed else 1)
        assert d.ratio == pytest.approx(ratio, rel=1e-6)


@pytest.mark.parametrize(
    "actual, expected, tol, passed, mismatched, nonfinite",
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_verdict(actual, expected, tol, passed, mismatched, nonfinite):
    d = compare_leaf(np.array(actual), np.array(expected), tol)
    assert (d.passed, d.mismatched, d.nonfinite_mismatched) == (passed, mismatched, nonfinite)
    assert d.ratio <= 1.0 if passed else d.ratio > 1.0


def test_failure_block_lines():
    d = compare_leaf(
        np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
        np.array([[1.0, 2.0], [3.5, 4.0]], np.float32),
        Tolerance(atol=0.25),
        stage="grads",
        step=2,
        name="fc1.weight",
        actual_name="jax",
        expected_name="torch",
    )
    assert d.describe().splitlines() == [
        "grads at step 2, fc1.weight, shape (2, 2), float32: jax vs torch",
        "  Mismatched elements: 1 / 4 (25.0%)",
        "  Greatest absolute difference: 0.5 at index (1, 0) (0.25 allowed there)",
        "  Greatest relative difference: 0.142857 at index (1, 0)",
        "  Ratio to the bound: 2 (bound: atol=0.25, rtol=0)",
    ]


def test_the_ratio_is_located_where_it_is_not_the_greatest_difference():
    # Found in a user trial: "0.00199946 at index (8, 1) (up to 0.002 allowed)" beside a
    # ratio of 174, which was another element's. The twin: the same element, no index.
    d = compare_leaf(
        np.array([1.0, 2.0, 1e-3]),
        np.array([1.1, 2.0, 0.0]),
        Tolerance(rtol=0.5),
        name="b",
    )
    lines = d.describe().splitlines()
    assert lines[2] == "  Greatest absolute difference: 0.1 at index (0,) (0.55 allowed there)"
    assert lines[4].startswith(
        "  Ratio to the bound: inf at index (2,), where the bound is tighter (bound: "
    )
    d = compare_leaf(np.array([1.0, 3.0]), np.array([1.0, 2.0]), Tolerance(atol=0.5))
    assert d.describe().splitlines()[4] == "  Ratio to the bound: 2 (bound: atol=0.5, rtol=0)"
    # A zero bound: every difference's ratio is inf, the greatest difference's included.
    d = compare_leaf(np.array([1.5, 3.0]), np.array([1.0, 2.0]), Tolerance())
    assert d.describe().splitlines()[4] == "  Ratio to the bound: inf (bound: atol=0, rtol=0)"


def test_nonfinite_line():
    # The first non-finite mismatch is located (found in a user trial: the "greatest
    # difference" lines point at finite elements, so the NaN had no position).
    d = compare_leaf(np.array([[1.0, 2.0], [nan, inf]]), np.array([[1.0, 2.0], [1.5, 1.0]]), T)
    assert d.describe().splitlines()[2] == (
        "  Non-finite mismatch: 2 entries are NaN or Inf on one side only "
        "(or Inf of the other sign); the first at index (1, 0): nan (actual) vs 1.5 (expected)"
    )
    assert math.isinf(d.ratio)
    # The twin: the same NaN on both sides is no mismatch, and no line.
    d = compare_leaf(np.array([nan, 1.0]), np.array([nan, 1.0]), T)
    assert d.passed and d.nonfinite_at is None and "Non-finite" not in d.describe()


def test_a_nan_loss_does_not_read_as_no_difference():
    # Found in a user trial: a NaN loss read "Greatest absolute difference: 0" (the
    # greatest differences are taken over the finite elements).
    lines = compare_leaf(np.array(nan), np.array(1.0), T, stage="loss").describe().splitlines()
    assert lines[2].startswith("  Non-finite mismatch: 1 entry is NaN or Inf on one side only")
    assert not any("Greatest" in line for line in lines), lines
    # Beside finite differences they are said to be the finite elements'.
    d = compare_leaf(np.array([nan, 1.0, 2.0]), np.array([1.0, 1.0, 2.5]), T)
    lines = d.describe().splitlines()
    assert lines[3] == (
        "  Greatest absolute difference among the finite elements: 0.5 at index (2,) "
        "(0.1 allowed there)"
    )
    assert lines[5].startswith("  Ratio to the bound: inf at index (0,), the non-finite mismatch")
    assert math.isnan(d.nonfinite_difference)
    # The twin: finite elements only keep the plain lines.
    d = compare_leaf(np.array([1.0, 1.0, 2.0]), np.array([1.0, 1.0, 2.5]), T)
    assert d.describe().splitlines()[2].startswith("  Greatest absolute difference: 0.5")
    assert d.nonfinite_difference is None
    # An Inf whose finite neighbours agree says so.
    d = compare_leaf(np.array([inf, 1.0]), np.array([1.0, 1.0]), T)
    assert d.describe().splitlines()[3] == (
        "  The finite elements agree within the bound (greatest absolute difference 0)"
    )
    assert d.nonfinite_difference == inf


def test_empty_leaf_passes():
    d = compare_leaf(np.zeros((0, 3)), np.zeros((0, 3)), Tolerance())
    assert (d.passed, d.numel, d.max_abs, d.max_abs_index, d.ratio) == (True, 0, 0.0, (), 0.0)


def test_scalar_leaf_index_is_empty():
    d = compare_leaf(np.float32(2.0), np.float32(2.5), T, stage="loss")
    assert (d.passed, d.max_abs_index, d.max_rel_index, d.max_abs) == (False, (), (), 0.5)


def test_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError) as info:
        compare_leaf(
            np.zeros(3),
            np.zeros((3, 1)),
            T,
            name="fc2.bias",
            actual_name="jax",
            expected_name="torch",
        )
    assert str(info.value) == (
        "[equiv] fc2.bias: jax has shape (3,) but torch has (3, 1); results must have the "
        "same shape to be compared"
    )


def test_complex_is_a_type_error():
    with pytest.raises(TypeError, match=r"^\[equiv\] cannot compare complex128 with complex128"):
        compare_leaf(np.zeros(2, complex), np.zeros(2, complex), T)


def test_float32_pair_computes_in_float32_and_float64_pair_in_float64():
    a32 = np.array([1.0 + 2.0**-23], np.float32)
    b32 = np.array([1.0], np.float32)
    assert compare_leaf(a32, b32, Tolerance()).max_abs == 2.0**-23
    d = compare_leaf(a32, np.array([1.0 + 2.0**-40]), Tolerance())
    assert (d.dtype, d.max_abs) == ("float32/float64", 2.0**-23 - 2.0**-40)


def test_torch_and_jax_inputs_match_numpy(rng):
    x = rng.standard_normal((5, 7)).astype(np.float32)
    y = x + rng.standard_normal((5, 7)).astype(np.float32) * 1e-3
    want = compare_leaf(x, y, Tolerance(atol=1e-4))
    assert compare_leaf(torch.from_numpy(x), jnp.asarray(y), Tolerance(atol=1e-4)) == want
    assert compare_leaf(torch.from_numpy(x).requires_grad_(), y, Tolerance(atol=1e-4)) == want


def test_torch_bfloat16_is_compared():
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    d = compare_leaf(a, a + 0.0625, Tolerance(atol=0.05))
    assert (d.dtype, d.mismatched, d.max_abs) == ("bfloat16", 2, 0.0625)


# --- slack (near a kink) -------------------------------------------------------


def test_slack_accepts_and_counts_ambiguous_elements():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.5, 3.0])
    strict = compare_leaf(a, b, T)
    eased = compare_leaf(a, b, T, slack=np.array([0.0, 0.5, 0.0]))
    assert (strict.passed, strict.ambiguous) == (False, 0)
    assert (eased.passed, eased.ambiguous, eased.allowed) == (True, 1, 0.6)
    assert eased.describe().splitlines()[-1] == (
        "  Within the slack only: 1 elements (a unit near a kink, Adam's update where a "
        "gradient element is near rounding level, or two trajectories that parted)"
    )
    assert "Ambiguous" not in strict.describe()


def test_slack_elsewhere_does_not_hide_a_real_difference():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.5, 3.0])
    d = compare_leaf(a, b, T, slack=np.array([0.0, 1.0, 0.0]))
    assert (d.passed, d.mismatched, d.ambiguous, d.max_abs_index) == (False, 1, 1, (0,))


def test_slack_broadcasts():
    d = compare_leaf(np.zeros((2, 3)), np.full((2, 3), 0.3), T, slack=np.array([0.25, 0.0, 0.25]))
    assert (d.mismatched, d.ambiguous) == (2, 4)


@pytest.mark.parametrize(
    "slack, text",
    [
        (np.array([-1.0, 0.0]), "slack must be finite and non-negative"),
        (np.array([nan, 0.0]), "slack must be finite and non-negative"),
        (np.array([inf, 0.0]), "slack must be finite and non-negative"),
        (np.zeros(3), "slack of shape (3,) does not broadcast to the leaf's shape (2,)"),
    ],
    ids=["negative", "nan", "inf", "shape"],
)
def test_bad_slack_is_a_value_error(slack, text):
    with pytest.raises(ValueError, match=r"^\[equiv\] w: ") as info:
        compare_leaf(np.zeros(2), np.zeros(2), T, name="w", slack=slack)
    assert text in str(info.value)


def test_compare_trees_passes_slack_by_name():
    a, b = {"w": np.zeros(2), "v": np.zeros(2)}, {"w": np.full(2, 0.3), "v": np.full(2, 0.3)}
    diffs = compare_trees(a, b, T, slack={"w": np.full(2, 0.3)})
    assert [(d.name, d.passed, d.ambiguous) for d in diffs] == [("w", True, 2), ("v", False, 0)]


def test_compare_trees_names_missing_leaves():
    with pytest.raises(ValueError) as info:
        compare_trees(
            {"w": np.zeros(1)}, {"v": np.zeros(1)}, T, actual_name="jax", expected_name="torch"
        )
    assert str(info.value) == (
        "[equiv] jax and torch hold different leaves: missing from jax: ['v']; not in torch: ['w']"
    )


# --- reports, blame, JSON ----------------------------------------------------------


def _report() -> Report:
    """torch and jax disagree at fc1.weight; the reference blames jax there."""
    ref = np.array([1.0, 2.0])
    good, bad = np.array([1.0, 2.0]), np.array([1.0, 2.5])
    leaves = []
    for name, jax_value in (("fc1.weight", bad), ("fc1.bias", good)):
        kw = dict(stage="grads", step=1, name=name)
        leaves += [
            compare_leaf(good, jax_value, T, actual_name="torch", expected_name="jax", **kw),
            compare_leaf(good, ref, T, actual_name="torch", expected_name="reference", **kw),
            compare_leaf(jax_value, ref, T, actual_name="jax", expected_name="reference", **kw),
        ]
    return Report(leaves, settings={"dtype": "float32", "device": "cpu"})


def test_blame_names_the_backend_off_against_the_reference():
    assert _report().blame() == {"grads at step 1, fc1.weight": ["jax"]}
    assert Report(_report().leaves[3:]).blame() == {}


def test_failure_text_lists_every_failing_leaf_and_the_blame():
    lines = _report().failure_text().splitlines()
    assert lines[0] == (
        "[equiv] 2 of 6 comparisons disagree (jax vs reference; torch vs jax) "
        "[dtype=float32, device=cpu]"
    )
    assert lines[1] == "grads at step 1, fc1.weight, shape (2,), float64: torch vs jax"
    assert lines[6] == "  Float64 reference blames: jax"
    assert lines[7] == "grads at step 1, fc1.weight, shape (2,), float64: jax vs reference"
    assert lines[-1] == "[equiv] the float64 reference blames: jax (1 leaf)"
    assert len(lines) == 13


def test_failure_text_when_the_reference_blames_neither():
    ref = np.array([1.0])
    kw = dict(stage="params", step=1, name="w")
    leaves = [
        compare_leaf(
            np.array([1.09]), np.array([0.91]), T, actual_name="torch", expected_name="jax", **kw
        ),
        compare_leaf(
            np.array([1.09]), ref, T, actual_name="torch", expected_name="reference", **kw
        ),
        compare_leaf(np.array([0.91]), ref, T, actual_name="jax", expected_name="reference", **kw),
    ]
    lines = Report(leaves).failure_text().splitlines()
    assert lines[-1] == (
        "  Float64 reference blames neither: both are within the bound of the reference"
    )


def test_assert_agree_raises_the_failure_text():
    report = _report()
    with pytest.raises(AssertionError) as info:
        report.assert_agree()
    assert str(info.value) == report.failure_text()
    Report(report.leaves[3:]).assert_agree()
    assert Report(report.leaves[3:]).failure_text() == "[equiv] all 3 comparisons agree"


def test_json_round_trip_keeps_every_field_and_spells_inf():
    leaves = _report().leaves + [compare_leaf(np.array([nan]), np.array([1.0]), T, name="x")]
    report = Report(leaves, settings={"dtype": "float32"})
    text = report.to_json()
    back = json.loads(text)
    assert back == json.loads(json.dumps(report.to_dict()))
    assert back["agree"] is False and back["worst_ratio"] == "inf"
    assert back["blame"] == {"grads at step 1, fc1.weight": ["jax"]}
    leaf = back["leaves"][0]
    assert set(leaf) == {f.name for f in dataclasses_fields()} | {"passed"}
    assert (leaf["shape"], leaf["max_abs_index"], leaf["mismatched"]) == ([2], [1], 1)
    assert back["leaves"][-1]["ratio"] == "inf"


def dataclasses_fields():
    import dataclasses

    return dataclasses.fields(LeafDiff)


# --- fast path against the NumPy path ----------------------------------------------

CHUNK = 1024


def _pair(rng, n, dtype=np.float32, noise=1e-6):
    a = rng.standard_normal(n).astype(dtype)
    return a, (a + noise * rng.standard_normal(n)).astype(dtype)


def _variants(rng):
    """(id, a, b, tolerance, passes) for the fast/NumPy equality test; n spans
    several chunks and ends in a partial one."""
    n = 7 * CHUNK + 13
    a, b = _pair(rng, n)
    zeros_a, zeros_b = a.copy(), b.copy()
    zeros_a[::7] = zeros_b[::7] = 0  # 0/0 relative differences
    zeros_b[3::11] = 0  # b == 0 != a: infinite relative difference
    zeros_a[3::11] = 1e-7
    tie_a, tie_b = np.zeros(n, np.float32), np.zeros(n, np.float32)
    tie_b[[5, 3 * CHUNK + 1]] = 1e-6  # two equal maxima: the first index wins
    fail_b = b.copy()
    fail_b[4 * CHUNK + 2] += 1.0
    nan_a = a.copy()
    nan_a[2 * CHUNK] = np.nan
    nan_both = nan_a.copy(), b.copy()
    nan_both[1][2 * CHUNK] = np.nan
    derived = Tolerance(scaled=1e-5)
    user = Tolerance(atol=1e-5, rtol=1e-4)
    return [
        ("derived", a, b, derived, True),
        ("user rtol", a, b, user, True),
        ("identical", a, a.copy(), Tolerance(), True),
        ("zeros", zeros_a, zeros_b, derived, True),
        ("ties", tie_a, tie_b, Tolerance(atol=1e-5), True),
        ("float32 vs float64", a, b.astype(np.float64), derived, True),
        ("float64", a.astype(np.float64), b.astype(np.float64), derived, True),
        ("failing", a, fail_b, derived, False),
        ("failing rtol", a, fail_b, user, False),
        ("NaN one side", nan_a, b, derived, False),
        ("NaN both sides", *nan_both, derived, True),
        ("overflow", np.full(n, 3e38, np.float32), np.full(n, -3e38, np.float32), derived, False),
    ]


VARIANT_IDS = [v[0] for v in _variants(np.random.default_rng(0))]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("index", range(len(VARIANT_IDS)), ids=VARIANT_IDS)
def test_fast_path_equals_numpy_path(rng, monkeypatch, index, threads, fast_path_used):
    monkeypatch.setattr(fastcompare, "CHUNK", CHUNK)
    monkeypatch.setattr(fastcompare, "THREADS", threads)
    _, a, b, tol, passes = _variants(rng)[index]
    used = fast_path_used
    fast = compare_leaf(a, b, tol, name="w", fast_threshold=0)
    slow = compare_leaf(a, b, tol, name="w", fast_threshold=a.size + 1)
    assert fast == slow
    assert fast.passed is passes
    # A passing leaf is decided by the fast path alone; any other leaf falls back.
    assert used == [passes and VARIANT_IDS[index] != "NaN both sides"]


def test_fast_path_first_index_of_tied_maxima(monkeypatch):
    monkeypatch.setattr(fastcompare, "CHUNK", CHUNK)
    a, b = np.zeros(4 * CHUNK, np.float32), np.zeros(4 * CHUNK, np.float32)
    b[[3 * CHUNK + 1, 2 * CHUNK + 5]] = 1e-6
    d = compare_leaf(a.reshape(64, -1), b.reshape(64, -1), Tolerance(atol=1e-5), fast_threshold=0)
    assert (d.passed, d.max_abs_index, d.max_rel_index) == (True, (32, 5), (32, 5))


def test_fast_path_on_torch_and_jax_arrays(rng, monkeypatch):
    monkeypatch.setattr(fastcompare, "CHUNK", CHUNK)
    a, b = _pair(rng, 3 * CHUNK + 1)
    want = compare_leaf(a, b, Tolerance(scaled=1e-5), fast_threshold=a.size + 1)
    got = compare_leaf(
        torch.from_numpy(a), jax.device_put(b), Tolerance(scaled=1e-5), fast_threshold=0
    )
    assert got == want and got.passed


def test_default_threshold_sends_small_leaves_to_numpy(monkeypatch):
    def boom(*args):
        raise AssertionError("fast path used")

    monkeypatch.setattr(compare, "_fast_stats", boom)
    compare_leaf(
        np.zeros(fastcompare.FAST_THRESHOLD - 1, np.float32),
        np.zeros(fastcompare.FAST_THRESHOLD - 1, np.float32),
        Tolerance(),
    )
    with pytest.raises(AssertionError, match="fast path used"):
        compare_leaf(np.zeros(4), np.zeros(4), Tolerance(), fast_threshold=4)


def test_chunk_maxima_reports_nonfinite_as_nonfinite():
    a = np.ones(8, np.float32)
    b = a.copy()
    b[6] = np.nan
    out = fastcompare.chunk_maxima(a, b, np.dtype(np.float32), chunk=4)
    assert out["max_abs"][0] == 0 and np.isnan(out["max_abs"][1])


@pytest.mark.parametrize("field", ["atol", "rtol", "scaled"])
def test_negative_or_nan_tolerances_are_refused(field):
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=f"Tolerance {field} must be a non-negative"):
            Tolerance(**{field: bad})


# --- a per-element absolute term (error sizes element by element) ---------------


def test_atol_elementwise_is_part_of_the_bound_not_an_ambiguity():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.5, 3.0])
    d = compare_leaf(a, b, T, atol_elementwise=np.array([0.0, 0.5, 0.0]))
    # Element 1 passes on its own term, element 0 fails on the leaf's: a per-element
    # term elsewhere hides nothing, and nothing is counted as near a kink.
    assert (d.passed, d.mismatched, d.ambiguous, d.max_abs_index) == (False, 1, 0, (0,))
    assert d.allowed == pytest.approx(0.1)
    assert compare_leaf(a, b, T, atol_elementwise=np.array([0.5, 0.5, 0.0])).passed


def test_atol_elementwise_forces_the_full_path_with_identical_statistics():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(4096)
    b = a + rng.standard_normal(4096) * 1e-3
    extra = np.abs(rng.standard_normal(4096)) * 1e-3
    fast = compare_leaf(a, b, T, atol_elementwise=extra, fast_threshold=1)
    slow = compare_leaf(a, b, T, atol_elementwise=extra, fast_threshold=10**9)
    assert fast == slow


@pytest.mark.parametrize("bad", [np.array([-1.0, 0.0]), np.array([nan, 0.0]), np.zeros(3)])
def test_bad_atol_elementwise_is_a_value_error(bad):
    with pytest.raises(ValueError, match=r"^\[equiv\] w: atol_elementwise"):
        compare_leaf(np.zeros(2), np.zeros(2), T, name="w", atol_elementwise=bad)


def test_compare_trees_passes_atol_elementwise_by_name():
    a, b = {"w": np.zeros(2), "v": np.zeros(2)}, {"w": np.full(2, 0.3), "v": np.full(2, 0.3)}
    diffs = compare_trees(a, b, T, atol_elementwise={"w": np.full(2, 0.3)})
    assert [(d.name, d.passed, d.ambiguous) for d in diffs] == [("w", True, 0), ("v", False, 0)]


def test_a_bound_beyond_the_dtypes_range_allows_everything_without_a_warning():
    # float32: 3e38 - (-3e38) is inf; a bound of 1e39 (beyond float32's range) must
    # still allow it, as inf does, and adding a per-element term must not warn.
    a = np.array([3e38, 1.0], np.float32)
    b = np.array([-3e38, 1.0], np.float32)
    assert compare_leaf(a, b, Tolerance(atol=1e39)).passed
    d = compare_leaf(a, a, Tolerance(atol=3e38), atol_elementwise=np.array([3e38, 0.0]))
    assert d.passed
    assert not compare_leaf(a, b, Tolerance(atol=1e38)).passed  # within range: it fails


# --- differences and bounds past the compute dtype's range --------------------------
# Arithmetic past the largest value gave inf, an inf against an inf passed anything
# (0/0 read as 0), and some paths warned: an overflow RuntimeWarning from _stats_part
# (a bound plus a slack capped at float32's largest) in a user trial. Now such an
# element is decided at half scale, exactly, and nothing warns.

# (id, actual, expected, atol, rtol, passed, ratio), in units of the dtype's largest L:
# 0.9·L - (-0.9·L) = 1.8·L is past it.
PAST_RANGE = [
    ("both past the range, within", 0.9, -0.9, 0.5, 1.5, True, 1.8 / 1.85),
    ("both past the range, beyond", 0.9, -0.9, 0.3, 1.0, False, 1.8 / 1.2),
    ("atol past the range, within", 0.9, -0.9, 1.9, 0.0, True, 1.8 / 1.9),
    ("atol past the range, beyond", 0.9, -0.9, 1.5, 0.0, False, 1.8 / 1.5),
    ("bound past twice the range", 0.9, -0.9, 0.5, 2.0, True, 0.0),
    ("within the range, within", 0.9, 0.4, 0.3, 1.0, True, 0.5 / 0.7),
    ("within the range, beyond", 0.9, 0.4, 0.3, 0.2, False, 0.5 / 0.38),
]
PAST_RANGE_DTYPES = ["float32", "float64", "bfloat16"]


@pytest.mark.parametrize(
    "dtype, actual, expected, atol, rtol, passed, ratio",
    [
        pytest.param(dtype, *case[1:], id=f"{case[0]}-{dtype}")
        for case in PAST_RANGE
        for dtype in PAST_RANGE_DTYPES
        # A Python float (float64) holds no atol past float64's range but inf.
        if not (dtype == "float64" and case[3] > 1)
    ],
)
def test_a_difference_past_the_dtypes_range_is_decided_exactly(
    dtype, actual, expected, atol, rtol, passed, ratio
):
    dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    top = float(np.finfo(dtype).max)
    a = np.array([actual * top, 1.0], dtype)
    b = np.array([expected * top, 1.0], dtype)
    x, y = float(a[0]), float(b[0])  # the values as rounded to the dtype
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = compare_leaf(a, b, Tolerance(atol=atol * top, rtol=rtol))
    assert (d.passed, d.mismatched, d.max_abs_index) == (passed, 0 if passed else 1, (0,))
    assert d.ratio == pytest.approx(ratio, rel=1e-2)  # bfloat16 rounds to 3 digits
    assert d.max_abs == 2.0 * abs(x / 2 - y / 2)  # float64's past its range: inf
    assert d.max_rel == pytest.approx(abs(x / 2 - y / 2) / abs(y / 2), rel=1e-6)


def test_a_slack_at_the_dtypes_largest_beside_a_large_bound_does_not_warn():
    # The user trial: equiv.harness caps a slack at float32's largest; with a bound of
    # 1e38 beside it, allowed + slack overflowed with a RuntimeWarning. That cap
    # allows every difference, as inf would; elsewhere a real difference still fails.
    a = np.array([3e38, 1.0], np.float32)
    slack = np.array([F32_MAX, 0.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = compare_leaf(a, np.array([-3e38, 1.0], np.float32), Tolerance(atol=1e38), slack=slack)
        assert (d.passed, d.ambiguous, d.ratio) == (True, 1, 0.0)
        d = compare_leaf(a, np.array([3e38, 4.0], np.float32), Tolerance(rtol=0.5), slack=slack)
        assert (d.passed, d.mismatched, d.ratio) == (False, 1, 1.5)
        # A slack below the largest: the difference past the range is held to it.
        d = compare_leaf(
            a, np.array([-3e38, 1.0], np.float32), Tolerance(atol=1e38), slack=slack / 3
        )
        assert (d.passed, d.mismatched) == (False, 1)
        assert d.ratio == pytest.approx(6e38 / (1e38 + F32_MAX / 3), rel=1e-6)


def test_a_slack_past_the_compute_dtype_allows_without_a_warning():
    # float64 slack beside float32 leaves: 1e300 does not fit float32 (the cast warned,
    # then the slack was refused as infinite).
    a, b = np.ones(2, np.float32), np.full(2, 3.0, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = compare_leaf(a, b, T, slack=np.array([1e300, 1e300]))
        assert (d.passed, d.ambiguous) == (True, 2)
        d = compare_leaf(a, b, T, slack=np.array([1e300, 0.0]))
        assert (d.passed, d.mismatched, d.ambiguous) == (False, 1, 1)
        d = compare_leaf(a, b, T, atol_elementwise=np.array([1e300, 0.0]))
        assert (d.passed, d.mismatched, d.ambiguous) == (False, 1, 0)


@pytest.mark.parametrize("rtol", [1e39, inf], ids=["past float32's range", "inf"])
def test_an_rtol_past_the_dtypes_range_allows_nothing_at_zero(rtol):
    # rtol·|expected| is 0 where expected is 0 (inf·0 was NaN: a warning and a pass),
    # and 1e39·1e-40 is 0.1, not inf.
    tol = Tolerance(rtol=rtol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = compare_leaf(np.array([1.0, 5.0], np.float32), np.array([0.0, 1.0], np.float32), tol)
        assert (d.passed, d.mismatched, d.ratio) == (False, 1, inf)
        d = compare_leaf(np.array([0.0, 5.0], np.float32), np.array([0.0, 1.0], np.float32), tol)
        assert (d.passed, d.ratio) == (True, 0.0)
        if math.isfinite(rtol):
            tiny = np.array([1e-40, 1e-40], np.float32)
            within = compare_leaf(tiny + np.float32(0.05), tiny, tol)
            beyond = compare_leaf(tiny + np.float32(0.2), tiny, tol)
            assert (within.passed, beyond.passed) == (True, False)
            assert beyond.ratio == pytest.approx(2.0, rel=1e-3)


def test_the_fast_path_leaves_a_bound_past_the_range_to_the_numpy_path(monkeypatch):
    # The fast path warned (a cast of atol=1e300 to float32; c + rtol·|b| past the
    # range) or passed a leaf whose rtol·0 was NaN (skipped as 0/0).
    monkeypatch.setattr(fastcompare, "CHUNK", CHUNK)
    n = 3 * CHUNK + 5
    big = np.full(n, 3e38, np.float32)
    apart = big.copy()
    apart[CHUNK + 3] = -3e38
    ones = np.ones(n, np.float32)
    zero = ones.copy()
    zero[2 * CHUNK] = 0.0
    cases = [
        (big, big, Tolerance(atol=1e300), True),
        (big, apart, Tolerance(atol=1e300), True),
        (big, big, Tolerance(atol=1e38, rtol=2.0), True),
        (big, apart, Tolerance(atol=1e38, rtol=1.0), False),
        (zero, zero, Tolerance(rtol=inf), True),
        (ones, zero, Tolerance(rtol=inf), False),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for a, b, tol, passed in cases:
            fast = compare_leaf(a, b, tol, fast_threshold=0)
            slow = compare_leaf(a, b, tol, fast_threshold=n + 1)
            assert fast == slow and fast.passed is passed, (tol, passed)
