"""Every loss: hand-derived value and gradient against torch autograd and jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equiv.losses import LOSSES, draw_targets
from equiv.spec import MLPSpec

# Float64 rounding through a log-sum-exp or a mean of a few dozen terms.
ATOL = 256 * 2.0**-53

CASES = [
    ("mse", {}),
    ("mse_sum", {}),
    ("cross_entropy", {}),
    ("cross_entropy", {"label_smoothing": 0.2}),
    ("cross_entropy_probs", {}),
    ("cross_entropy_probs", {"label_smoothing": 0.1}),
    ("bce_with_logits", {}),
    ("huber", {"huber_delta": 0.5}),
    ("smooth_l1", {"smooth_l1_beta": 0.7}),
    ("l1", {}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw in CASES]


def make_case(name, kwargs, seed=0):
    spec = MLPSpec((3, 5), loss=name, dtype="float64", **kwargs)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        out = torch.randn(6, 5, dtype=torch.float64) * 3  # large enough to cross huber's δ
        y = draw_targets(LOSSES[name], 6, 5, torch.float64)
    finally:
        torch.random.set_rng_state(generator_state)
    return spec, out, y


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_hand_derived_matches_torch_and_jax(name, kwargs):
    spec, out, y = make_case(name, kwargs)
    loss = LOSSES[name]
    o = out.clone().requires_grad_(True)
    t_loss = loss.torch_module(spec)(o, y)
    (t_grad,) = torch.autograd.grad(t_loss, o)

    m_loss, m_grad = loss.value_and_grad(out.numpy(), y.numpy(), spec)
    np.testing.assert_allclose(m_loss, t_loss.item(), rtol=ATOL, atol=ATOL)
    np.testing.assert_allclose(m_grad, t_grad.numpy(), rtol=ATOL, atol=ATOL)

    with jax.enable_x64(True):
        j_loss, j_grad = jax.value_and_grad(loss.jax_fn)(
            jnp.asarray(out.numpy()), jnp.asarray(y.numpy()), spec
        )
    np.testing.assert_allclose(float(j_loss), t_loss.item(), rtol=ATOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(j_grad), t_grad.numpy(), rtol=ATOL, atol=ATOL)


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_hand_derived_runs_on_torch_tensors(name, kwargs):
    spec, out, y = make_case(name, kwargs)
    t_loss, t_grad = LOSSES[name].value_and_grad(out, y, spec)
    n_loss, n_grad = LOSSES[name].value_and_grad(out.numpy(), y.numpy(), spec)
    assert isinstance(t_grad, torch.Tensor)
    np.testing.assert_allclose(t_grad.numpy(), n_grad, rtol=ATOL, atol=ATOL)
    np.testing.assert_allclose(t_loss.item(), n_loss, rtol=ATOL, atol=ATOL)


def test_log_softmax_is_stable_for_huge_logits():
    spec = MLPSpec((3, 3), loss="cross_entropy", dtype="float64")
    out = np.array([[1000.0, 0.0, -1000.0]])
    loss, grad = LOSSES["cross_entropy"].value_and_grad(out, np.array([1]), spec)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss == pytest.approx(1000.0)


@pytest.mark.parametrize(
    "naive,name,factor",
    [
        # optax.l2_loss is ½(o - y)² per element: half of MSELoss when averaged.
        (lambda o, y: jnp.mean(0.5 * (o - y) ** 2), "mse", 0.5),
        # reduction="sum" against "mean": a factor of batch · outputs.
        (lambda o, y: jnp.sum((o - y) ** 2), "mse", 30.0),
    ],
    ids=["optax-l2-loss", "sum-vs-mean"],
)
def test_naive_jax_losses_differ_by_their_factor(naive, name, factor):
    spec, out, y = make_case(name, {})
    expected = LOSSES[name].torch_module(spec)(out, y).item()
    with jax.enable_x64(True):
        got = float(naive(jnp.asarray(out.numpy()), jnp.asarray(y.numpy())))
    assert got == pytest.approx(factor * expected, rel=1e-12)
    assert abs(got - expected) > 1e3 * ATOL


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_magnitude_covers_value_and_gradient(name, kwargs):
    # The magnitudes bound what rounding errors scale with: never below the values.
    spec, out, y = make_case(name, kwargs)
    loss, grad = LOSSES[name].value_and_grad(out.numpy(), y.numpy(), spec)
    loss_mag, grad_mag = LOSSES[name].magnitude(out.numpy(), y.numpy(), spec)
    assert loss_mag >= abs(loss)
    assert np.all(grad_mag >= np.abs(grad))


def test_l1_at_a_zero_residual_takes_torchs_gradient_not_jnp_abs():
    # torch's L1Loss has gradient 0 where o == y; jax.grad(jnp.abs) is 1 there. The
    # twin: jnp.abs itself shows the trap.
    spec = MLPSpec((3, 2), loss="l1")
    o = torch.zeros(2, 2, requires_grad=True)
    LOSSES["l1"].torch_module(spec)(o, torch.zeros(2, 2)).backward()
    grad = jax.grad(LOSSES["l1"].jax_fn)(jnp.zeros((2, 2)), jnp.zeros((2, 2)), spec)
    np.testing.assert_array_equal(np.asarray(grad), o.grad.numpy())
    assert float(jax.grad(lambda d: jnp.mean(jnp.abs(d)))(jnp.zeros((2, 2)))[0, 0]) == 0.25
