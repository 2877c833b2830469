"""Every activation: hand-derived value and derivative against torch autograd and jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equiv.activations import ACTIVATIONS
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
