"""Every activation: hand-derived value and derivative against torch autograd and jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equiv.activations import ACTIVATIONS, underflow_size
from equiv.spec import MLPSpec

SPEC = MLPSpec((3, 4, 2), negative_slope=0.1, elu_alpha=1.7)
# Points around the kink, large magnitudes where sigmoid/exp saturate, and ordinary values.
Z = np.array([-30.0, -3.0, -1.0, -0.5, -1e-9, 0.0, 1e-9, 0.3, 1.0, 2.5, 30.0])
# Float64 rounding of a few elementary operations: a handful of ulps of values that are O(1).
ATOL = 64 * 2.0**-53


def torch_value_and_derivative(name):
    act = ACTIVATIONS[name]
    z = torch.tensor(Z, requires_grad=True)
    h = act.torch_module(act.param(SPEC))(z)
    (dz,) = torch.autograd.grad(h.sum(), z)
    return h.detach().numpy(), dz.numpy()


def jax_value_and_derivative(name):
    act = ACTIVATIONS[name]
    with jax.enable_x64(True):
        z = jnp.asarray(Z)
        fn = lambda t: act.jax_fn(t, act.param(SPEC))  # noqa: E731
        value = np.asarray(fn(z))
        deriv = np.asarray(jax.vmap(jax.grad(fn))(z))
    return value, deriv


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_hand_derived_matches_torch(name):
    act = ACTIVATIONS[name]
    value, deriv = torch_value_and_derivative(name)
    np.testing.assert_allclose(act.value(np, Z, act.param(SPEC)), value, rtol=0, atol=ATOL)
    np.testing.assert_allclose(act.derivative(np, Z, act.param(SPEC)), deriv, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_jax_matches_torch_except_leaky_relu_at_zero(name):
    t_value, t_deriv = torch_value_and_derivative(name)
    j_value, j_deriv = jax_value_and_derivative(name)
    np.testing.assert_allclose(j_value, t_value, rtol=0, atol=ATOL)
    differs = np.abs(j_deriv - t_deriv) > ATOL
    if name == "leaky_relu":
        # JAX's leaky_relu'(0) is 1, torch's is the slope: the one documented difference.
        assert Z[differs].tolist() == [0.0]
        assert j_deriv[Z == 0].item() == 1.0 and t_deriv[Z == 0].item() == pytest.approx(0.1)
    else:
        assert not differs.any(), Z[differs]


# Far out on both sides, where the slopes underflow or saturate to exactly 0 or 1.
Z_FAR = np.array([-800.0, -40.0, -1.0, 0.0, 1.0, 40.0, 800.0])


def torch_backward(name, upstream):
    act = ACTIVATIONS[name]
    z = torch.tensor(Z_FAR, requires_grad=True)
    act.torch_module(act.param(SPEC))(z).backward(torch.as_tensor(upstream))
    return z.grad.numpy()


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_chain_rule_matches_torch_when_the_upstream_gradient_overflowed(name):
    # A diverging run overflows the upstream gradient to inf. torch's ReLU backward
    # then gives 0 at dead units (a select), tanh's NaN where 1 - tanh² is 0 (a
    # product): the hand-derived backward must do the same, element by element.
    act = ACTIVATIONS[name]
    upstream = np.full_like(Z_FAR, np.inf)
    _, slope = act.value_and_derivative(np, Z_FAR, act.param(SPEC))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(
            act.chain(np, upstream, slope), torch_backward(name, upstream)
        )
    finite = np.linspace(-2.0, 2.0, Z_FAR.size)
    np.testing.assert_array_equal(act.chain(np, finite, slope), finite * slope)


def test_a_plain_product_gives_nan_where_torch_relu_gives_zero():
    # The failing twin: multiplying by relu's slope turns inf · 0 into NaN.
    upstream = np.full_like(Z_FAR, np.inf)
    _, slope = ACTIVATIONS["relu"].value_and_derivative(np, Z_FAR, 0.0)
    with np.errstate(invalid="ignore"):
        product = upstream * slope
    expected = torch_backward("relu", upstream)
    assert np.isnan(product[Z_FAR <= 0]).all() and (expected[Z_FAR <= 0] == 0).all()


# Past overflow: what each activation makes of NaN and of the infinities.
Z_NONFINITE = np.array([np.nan, -np.inf, np.inf])


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_nan_and_inf_pass_through_as_in_torch_and_jax(name):
    # A float32 run past overflow: torch's and JAX's ReLU pass a NaN on, and a backend
    # that zeroed it gave a finite loss where they gave NaN (found by a random sweep).
    act = ACTIVATIONS[name]
    param = act.param(SPEC)
    with torch.no_grad():
        expected = act.torch_module(param)(torch.tensor(Z_NONFINITE)).numpy()
    with jax.enable_x64(True):
        from_jax = np.asarray(act.jax_fn(jnp.asarray(Z_NONFINITE), param))
    with np.errstate(invalid="ignore", over="ignore"):
        np.testing.assert_array_equal(act.value(np, Z_NONFINITE, param), expected)
    np.testing.assert_array_equal(from_jax, expected)


def test_a_relu_that_selects_on_z_above_0_zeroes_nan():
    # The failing twin: the select the hand-derived ReLU once used.
    with torch.no_grad():
        expected = torch.relu(torch.tensor(Z_NONFINITE)).numpy()
    zeroed = np.where(Z_NONFINITE > 0, Z_NONFINITE, 0.0)
    assert np.isnan(expected[0]) and zeroed[0] == 0.0


def test_hand_derived_runs_on_torch_tensors():
    z = torch.tensor(Z)
    for name, act in ACTIVATIONS.items():
        out = act.derivative(torch, z, act.param(SPEC))
        assert isinstance(out, torch.Tensor), name
        np.testing.assert_allclose(out.numpy(), act.derivative(np, Z, act.param(SPEC)), atol=ATOL)


def test_gelu_tanh_approximation_is_detectably_different_from_exact():
    # The trap: jax.nn.gelu defaults to the tanh approximation, torch to the exact erf form.
    exact, approx = ACTIVATIONS["gelu"], ACTIVATIONS["gelu_tanh"]
    z = np.linspace(-4, 4, 801)
    gap = np.max(np.abs(exact.value(np, z, 0.0) - approx.value(np, z, 0.0)))
    assert 1e-4 < gap < 1e-3  # NUMERICS.md: up to 4.7e-4
    assert gap > 1e3 * 2.0**-24  # about 8000 float32 roundings: never noise


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_lipschitz_bound_holds(name):
    # The bound carries pre-activation errors through the layer: it must cover |h'|.
    act = ACTIVATIONS[name]
    z = np.linspace(-20, 20, 40001)
    slope = np.abs(act.derivative(np, z, act.param(SPEC)))
    assert slope.max() <= act.lipschitz(act.param(SPEC))


@pytest.mark.parametrize("name", [n for n, a in ACTIVATIONS.items() if a.kink])
def test_forced_branch_takes_the_other_side(name):
    act = ACTIVATIONS[name]
    p = act.param(SPEC)
    z = np.array([-1e-9, 1e-9])
    natural = act.value_and_derivative(np, z, p)
    flipped = act.value_and_derivative(np, z, p, np.array([True, False]))
    assert natural[1].tolist() != flipped[1].tolist()  # the derivative changes side
    assert flipped[1][0] == 1.0  # z > 0 branch forced at z < 0
    assert np.allclose(flipped[0], z, atol=1e-8)  # values agree near the kink


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_curvature_matches_jax_second_derivative(name):
    # Curvature moves the slope under an error in z (equiv.manual.magnitudes): a central
    # difference of h', checked against jax.grad(jax.grad(h)). The difference's
    # truncation error is step²/6·|h'''| with step = 1e-4·max(|z|, 1): at most
    # 1.1e-8·|h'''| over Z (z = 2.5), and |h'''| <= 2 for all of these (tanh's at 0),
    # so 2e-8 absolute (measured: 6.6e-9, tanh); the rounding, ~u·|h'|/step, is 1e-12.
    # Not relative: h'' crosses 0. The kink itself (|z| <= 1e-9) is kinks.py's business.
    act = ACTIVATIONS[name]
    z = Z[np.abs(Z) > 1e-6] if act.kink else Z
    with jax.enable_x64(True):
        fn = lambda t: act.jax_fn(t, act.param(SPEC))  # noqa: E731
        expected = np.abs(np.asarray(jax.vmap(jax.grad(jax.grad(fn)))(jnp.asarray(z))))
    got = act.curvature(np, z, act.param(SPEC))
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-8)


def dense_envelope(act, z: float, radius: float, param: float) -> tuple[float, float]:
    """The greatest |h'| and |h''| on a grid over the interval (on z's own side of a
    kink), computed independently of the peaks table: 20,001 points across it, and
    every multiple of 1e-4 in it within [-12, 12], where the peaks lie."""
    lo, hi = z - radius, z + radius
    if act.has_kink(param):
        lo, hi = (max(lo, 1e-12), hi) if z > 0 else (lo, min(hi, -1e-12))
    fine = np.arange(-12.0, 12.0, 1e-4)
    grid = np.concatenate([np.linspace(lo, hi, 20_001), fine[(fine >= lo) & (fine <= hi)]])
    _, slope = act.value_and_derivative(np, grid, param)
    return float(np.abs(slope).max()), float(act.curvature(np, grid, param).max())


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_envelope_is_the_greatest_slope_and_curvature_over_the_interval(name):
    # The peaks table (points where |h'| or |h''| peaks) against a dense grid: over
    # intervals that hold a peak, straddle one, or lie in a tail, the envelope is at
    # least the grid's maximum (less 1e-9: a peak between grid points) and at most
    # 1e-6 above it (the table's 5 decimals place a peak within 1e-5).
    act = ACTIVATIONS[name]
    param = act.param(SPEC)
    rng = np.random.default_rng(0)
    centres = np.concatenate([rng.uniform(-6, 6, 40), [-2505.0, -30.0, 0.3, 40.0]])
    radii = np.concatenate([10.0 ** rng.uniform(-3, 1, 40), [3000.0, 29.5, 0.2, 1.0]])
    slope, curvature = act.envelope(np, centres, radii, param)
    for i, (z, r) in enumerate(zip(centres, radii, strict=True)):
        dense_slope, dense_curvature = dense_envelope(act, z, r, param)
        assert dense_slope - 1e-9 <= slope[i] <= dense_slope + 1e-6, (z, r)
        assert dense_curvature - 1e-9 <= curvature[i] <= dense_curvature + 1e-6, (z, r)


def test_envelope_without_the_peaks_misses_the_steep_middle():
    # The paired failing case: the ends and z alone miss tanh's slope and curvature
    # peaks inside a wide interval around a saturated unit.
    import dataclasses

    tanh = ACTIVATIONS["tanh"]
    bare = dataclasses.replace(tanh, peaks=())
    z, radius = np.array([-2505.0]), np.array([3000.0])
    found = [float(a[0]) for a in tanh.envelope(np, z, radius, 0.0)]
    assert found == pytest.approx([1.0, 0.7698], abs=1e-4)
    assert max(float(a[0]) for a in bare.envelope(np, z, radius, 0.0)) < 0.01


def test_curvature_check_catches_a_one_sided_difference():
    # The paired failing case: a forward difference of h' (truncation step/2·|h''|,
    # about 1e-4 at z = 0.3 for tanh) fails the 2e-8 the central difference meets.
    act, z = ACTIVATIONS["tanh"], Z[np.abs(Z) < 5]
    step = 1e-4 * np.maximum(np.abs(z), 1.0)
    forward = np.abs(act.derivative(np, z + step, 0.0) - act.derivative(np, z, 0.0)) / step
    with jax.enable_x64(True):
        exact = np.abs(np.asarray(jax.vmap(jax.grad(jax.grad(jnp.tanh)))(jnp.asarray(z))))
    np.testing.assert_allclose(act.curvature(np, z, 0.0), exact, rtol=0, atol=2e-8)
    assert np.abs(forward - exact).max() > 100 * 2e-8


# Float32 points from 1e-8 to 80 on both sides: the kink, ordinary values, and
# saturation (where the formulas cancel, then round to exactly ±1). e⁻ᶻ leaves
# float32's normal range at about 87; 80 keeps clear of it.
LOG80 = np.log10(80.0)
Z32 = np.float32(np.concatenate([-np.logspace(-8, LOG80, 3000), np.logspace(-8, LOG80, 3000)]))
U32 = 2.0**-24
# Underflow: kernels flush values below tiny/u = 2e-31 (float32's smallest normal
# number over u) early: torch's gelu slope at z = -13 is 0, the true one -1e-36. The
# evaluation sizes cover it (no size below tiny/u²); the failing twins below set
# such errors aside, to show the cancellation alone.
FLOOR32 = float(np.finfo(np.float32).tiny) / U32


def float32_evaluations(name):
    """h and h' in float32 by torch autograd, jax.grad and the hand-derived formulas."""
    act = ACTIVATIONS[name]
    p = act.param(SPEC)
    z = torch.tensor(Z32, requires_grad=True)
    h = act.torch_module(p)(z)
    (dz,) = torch.autograd.grad(h.sum(), z)
    fn = lambda t: act.jax_fn(t, p)  # noqa: E731
    zj = jnp.asarray(Z32)
    manual = act.value_and_derivative(torch, torch.tensor(Z32), p)
    return {
        "torch": (h.detach().numpy(), dz.numpy()),
        "jax": (np.asarray(fn(zj)), np.asarray(jax.vmap(jax.grad(fn))(zj))),
        "manual": (manual[0].numpy(), manual[1].numpy()),
    }


def evaluation_error_ratio(name, sizes, floor=FLOOR32):
    """Greatest float32 error of h and h' (vs float64) over u·size, over every backend,
    errors below ``floor`` (underflow) set aside."""
    act = ACTIVATIONS[name]
    z = Z32.astype(np.float64)
    exact = act.value_and_derivative(np, z, act.param(SPEC))
    worst = 0.0
    for h, d in float32_evaluations(name).values():
        for got, want, size in zip((h, d), exact, sizes, strict=True):
            error = np.maximum(np.abs(got.astype(np.float64) - want) - floor, 0.0)
            worst = max(worst, float(np.max(error / np.maximum(U32 * size, 1e-300))))
    return worst


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_evaluation_sizes_cover_float32_evaluation(name):
    # To first order a chain of n rounded operations is off by at most n·u times the
    # size of its terms, a function of at most 1 ulp (erf, exp) counting as 2. The
    # longest chain here is torch's erf GELU backward (x/√2, erf, 1 + erf, ½·, x²,
    # exp, ·1/√(2π), x·φ, cdf + x·φ, ·grad): 12. Measured worst: 7.7 (that slope at
    # z = 0.054), then 4.4 (JAX's elu near 0), every other activation at most 3.9.
    # Where a sum cancels to exactly 0 (tanh z rounded to 1), the size is
    # only the true result over u: this also checks that torch's and JAX's float32
    # kernels round to ±1 where the evaluation sizes say they do (float64 keeps the
    # terms: JAX's float64 tanh is 1 - 7u, not 1, up to z = 20).
    chain = 12
    act = ACTIVATIONS[name]
    sizes = act.evaluation_sizes(np, Z32.astype(np.float64), act.param(SPEC), U32)
    assert evaluation_error_ratio(name, sizes, floor=0.0) <= chain


@pytest.mark.parametrize("name", ["gelu", "elu"])
def test_sizes_without_the_underflow_floor_miss_flushed_results(name):
    # The failing twin of the floor: where a kernel flushes a result below tiny/u to 0
    # (gelu's slope at z = -13, JAX's elu), sizes that follow the true
    # value down miss by orders of magnitude.
    act = ACTIVATIONS[name]
    z = Z32.astype(np.float64)
    sizes = act.evaluation_sizes(np, z, act.param(SPEC), U32)
    exact = act.value_and_derivative(np, z, act.param(SPEC))
    floor = underflow_size(U32)
    bare = tuple(
        np.where(size <= floor, np.abs(e), size) for size, e in zip(sizes, exact, strict=True)
    )
    assert evaluation_error_ratio(name, bare, floor=0.0) > 100


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "gelu", "gelu_tanh", "silu", "elu"])
def test_result_sizes_do_not_cover_float32_evaluation(name):
    # The failing twin: sizing by the result alone (|h|, |h'|) misses the cancellation
    # (1 - tanh²z, 1 + erf(z/√2), expm1(z) + 1 in JAX's elu) by orders of magnitude.
    act = ACTIVATIONS[name]
    h, d = act.value_and_derivative(np, Z32.astype(np.float64), act.param(SPEC))
    assert evaluation_error_ratio(name, (np.abs(h), np.abs(d))) > 100
