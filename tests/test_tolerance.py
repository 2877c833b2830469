"""Derived tolerances: the formula, user overrides, and the cases the false-alarm
sweep found (cancellation in a sum and in an update) with their failing twins."""

from __future__ import annotations

import math

import pytest

from equiv import MLPSpec, compare_backends
from equiv.tolerance import (
    SAFETY,
    Tolerance,
    derived_tolerance,
    params_tolerance,
    reduction_length,
    user_tolerance,
    with_magnitude,
)

U32, U64 = 2.0**-24, 2.0**-53


def test_derived_scaled_term_follows_the_formula():
    spec = MLPSpec((10, 300, 7))
    tol = derived_tolerance(spec, 64, "grads", 3, ("float32", "float64"))
    assert tol.scaled == pytest.approx(SAFETY * math.sqrt(300) * (U32 + U64) * 3)
    assert reduction_length(spec, 64, "loss") == 448  # 64 · 7 elements in the mean


def test_params_tolerance_carries_every_update():
    base = derived_tolerance(MLPSpec((4, 3, 2)), 2, "params", 3, ("float32", "float32"))
    per_step = SAFETY * 2 * (2 * U32)  # c·√4·(u₁+u₂)
    tol = params_tolerance(base, [1.0, 2.0, 4.0])
    assert tol.atol == pytest.approx(per_step * (1 * 1.0 + 2 * 2.0 + 3 * 4.0))
    assert tol.scaled == base.scaled


def test_with_magnitude_only_adds_the_excess():
    base = Tolerance(scaled=1e-6)
    assert with_magnitude(base, magnitude=1.0, largest=2.0) is base
    assert with_magnitude(base, magnitude=5.0, largest=2.0).atol == pytest.approx(3e-6)


@pytest.mark.parametrize("rtol,atol", [(1e-5, None), (None, 1e-8)])
def test_half_a_user_tolerance_is_refused(rtol, atol):
    with pytest.raises(ValueError) as info:
        user_tolerance(rtol, atol)
    assert str(info.value) == (
        "[equiv] give rtol and atol both, or neither to use derived tolerances; "
        f"got rtol={rtol!r}, atol={atol!r}"
    )


# Found by the false-alarm sweep (tests/test_false_alarms.py) before the fixes.
SWEEP_FINDS = [
    ("gradient sum cancels", dict(sizes=(1, 1), batch_size=20, seed=20, learning_rate=1.0)),
]


@pytest.mark.parametrize("case", [c[1] for c in SWEEP_FINDS], ids=[c[0] for c in SWEEP_FINDS])
def test_sweep_finds_now_agree(case):
    kwargs = dict(case)
    spec = MLPSpec(kwargs.pop("sizes"))
    comparison = compare_backends(spec, **kwargs)
    comparison.assert_agree()


@pytest.mark.parametrize("case", [c[1] for c in SWEEP_FINDS], ids=[c[0] for c in SWEEP_FINDS])
def test_sweep_finds_still_catch_a_1e_4_bug(case):
    from equiv.harness import REFERENCE, RUNNERS, compare_trajectories
    from equiv.problem import make_problem

    kwargs = dict(case)
    spec = MLPSpec(kwargs.pop("sizes"))
    problem = make_problem(spec, batch_size=kwargs["batch_size"], seed=kwargs["seed"])
    runs = {n: RUNNERS[n](problem, kwargs["learning_rate"]) for n in ("torch", REFERENCE)}
    runs["torch"].grads[0]["fc1.bias"] = runs["torch"].grads[0]["fc1.bias"] * (1 + 1e-4)
    report = compare_trajectories(problem, runs, learning_rate=kwargs["learning_rate"])
    assert {(d.stage, d.name) for d in report.failures} == {("grads", "fc1.bias")}
