r"""The losses every backend supports, each written three ways, reduced as torch does.

:data:`LOSSES` maps a name to its torch module, its JAX function (optax where optax
has it) and its hand-derived value and gradient with respect to the network's
output ``o`` (array-API code for NumPy and torch tensors). ``n`` is the number of
elements of ``o`` (batch · outputs), ``B`` the batch.

* ``mse``: mean (o - y)²; gradient 2(o - y) / n (torch's default ``reduction="mean"``).
* ``mse_sum``: Σ (o - y)²; gradient 2(o - y).
* ``cross_entropy`` (integer labels) and ``cross_entropy_probs`` (probability
  targets): mean over the batch of -Σ_c q_c log softmax(o)_c; gradient
  (softmax(o)·Σ_c q_c - q) / B, which is (softmax(o) - q) / B for rows summing to 1.
* ``bce_with_logits``: mean of max(o, 0) - o·y + log(1 + e^-|o|); gradient (σ(o) - y) / n.
* ``huber``: mean of ½d² if |d| ≤ δ else δ(|d| - ½δ), d = o - y; gradient clip(d, -δ, δ) / n.
* ``smooth_l1``: mean of ½d²/β if |d| < β else |d| - ½β; gradient d/β if |d| < β else
  sign(d), over n.
* ``l1``: mean |d| (``torch.nn.L1Loss``, mean absolute error); gradient sign(d) / n.
  At d = 0 exactly torch's gradient is 0 and ``jax.grad(jnp.abs)`` is 1: equiv's JAX
  loss takes torch's (``jnp.sign``), a port's own ``jnp.abs`` differs there only.

Cross-entropy targets ``q`` are smoothed as torch smooths them:
``q = (1 - ε)·target + ε / C`` with ``ε = MLPSpec.label_smoothing`` (``optax.smooth_labels``).
The log-softmax is computed stably: ``o - max o - log Σ exp(o - max o)``.

Note ``optax.l2_loss`` is ½(o - y)² per element: half of ``mse`` and not averaged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import torch
from array_api_compat import array_namespace, device
from torch import nn

Array = Any


@dataclasses.dataclass(frozen=True)
class Loss:
    """One loss in every backend.

    ``targets`` says what ``y`` is: ``"values"`` (real, shaped like the output),
    ``"labels"`` (integer class indices, shape (B,)), ``"probabilities"`` (rows
    summing to 1) or ``"binary"`` (in [0, 1], shaped like the output).
    """

    name: str
    targets: str
    torch_module: Callable[[Any], nn.Module]  # spec -> module
    jax_fn: Callable[[jax.Array, jax.Array, Any], jax.Array]  # (o, y, spec) -> scalar
    value_and_grad: Callable[[Array, Array, Any], tuple[Array, Array]]  # (o, y, spec)
    # (o, y, spec, o_size) -> the size of what the loss and each entry of its gradient
    # are computed from (no cancellation): what their rounding errors scale with.
    # o_size (>= |o|, default |o|) is the size of what the outputs were summed from:
    # their own rounding error scales with it (equiv.manual.magnitudes).
    magnitude: Callable[..., tuple[Array, Array]]
    # "mean": one example's term is divided by the batch; "sum": it is not.
    reduction: str = "mean"


def draw_targets(loss: Loss, batch: int, outputs: int, dtype: torch.dtype) -> torch.Tensor:
    """Targets for a batch from torch's global generator (the caller seeds it)."""
    if loss.targets == "labels":
        return torch.randint(0, outputs, (batch,))
    if loss.targets == "probabilities":
        return torch.softmax(torch.randn(batch, outputs, dtype=dtype), dim=1)
    if loss.targets == "binary":
        return torch.rand(batch, outputs, dtype=dtype)
    return torch.randn(batch, outputs, dtype=dtype)


def _mse(o, y, spec):
    d = o - y
    return array_namespace(o).mean(d * d), d * (2.0 / (o.shape[0] * o.shape[1]))


def _mse_sum(o, y, spec):
    d = o - y
    return array_namespace(o).sum(d * d), d * 2.0


def _log_softmax(xp, o):
    shifted = o - xp.max(o, axis=1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))


def _one_hot(xp, labels, classes, like):
    # On the labels' device: torch tensors on a GPU (check_manual_backward(device="cuda")).
    classes = xp.arange(classes, device=device(labels))
    return xp.astype(classes[None, :] == labels[:, None], like.dtype)


def _cross_entropy(o, y, spec):
    xp = array_namespace(o)
    q = _one_hot(xp, y, o.shape[1], o) if spec.loss == "cross_entropy" else y
    eps = spec.label_smoothing
    if eps:
        q = (1.0 - eps) * q + eps / o.shape[1]
    log_p = _log_softmax(xp, o)
    loss = xp.mean(-xp.sum(q * log_p, axis=1))
    # Σ_c q_c·softmax(o) - q: targets whose rows do not sum to exactly 1 (float32
    # probabilities read in float64) are differentiated as torch's autograd does.
    total = xp.sum(q, axis=1, keepdims=True)
    return loss, (xp.exp(log_p) * total - q) / o.shape[0]


def _bce_with_logits(o, y, spec):
    xp = array_namespace(o)
    zero = xp.zeros_like(o)
    loss = xp.mean(xp.maximum(o, zero) - o * y + xp.log1p(xp.exp(-xp.abs(o))))
    e = xp.exp(-xp.abs(o))
    sigmoid = xp.where(o >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return loss, (sigmoid - y) / (o.shape[0] * o.shape[1])


def _huber(o, y, spec):
    xp = array_namespace(o)
    d, delta = o - y, spec.huber_delta
    a = xp.abs(d)
    loss = xp.mean(xp.where(a <= delta, 0.5 * d * d, delta * (a - 0.5 * delta)))
    return loss, xp.clip(d, -delta, delta) / (o.shape[0] * o.shape[1])


def _smooth_l1(o, y, spec):
    xp = array_namespace(o)
    d, beta = o - y, spec.smooth_l1_beta
    a = xp.abs(d)
    loss = xp.mean(xp.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta))
    grad = xp.where(a < beta, d / beta, xp.sign(d))
    return loss, grad / (o.shape[0] * o.shape[1])


def _l1(o, y, spec):
    xp = array_namespace(o)
    d = o - y
    return xp.mean(xp.abs(d)), xp.sign(d) / (o.shape[0] * o.shape[1])


@jax.custom_jvp
def _jax_abs(d: jax.Array) -> jax.Array:
    return jnp.abs(d)


@_jax_abs.defjvp
def _jax_abs_jvp(primals: tuple, tangents: tuple) -> tuple:
    (d,), (t,) = primals, tangents
    return jnp.abs(d), jnp.sign(d) * t  # 0 at d = 0, as torch's abs (jnp.abs: 1)


def _values_magnitude(weight):
    """For losses of d = o - y: the loss and gradient with |o|⁺ + |y| for |d| where
    ``weight(|d|, s, spec)`` gives each element's factor on ``s = |o|⁺ + |y|``."""

    def magnitude(o, y, spec, o_size=None):
        xp = array_namespace(o)
        s = (xp.abs(o) if o_size is None else o_size) + xp.abs(y)
        loss_factor, grad_factor = weight(xp, xp.abs(o - y), s, spec)
        reduce = xp.sum if spec.loss == "mse_sum" else xp.mean
        scale = 1.0 if spec.loss == "mse_sum" else 1.0 / (o.shape[0] * o.shape[1])
        return reduce(loss_factor * s), grad_factor * scale

    return magnitude


def _cross_entropy_magnitude(o, y, spec, o_size=None):
    # An error δ in the logits moves log p by at most 2·max δ per row and p by
    # p·2·max δ: the gradient's size gains 2·p·Σq times the row's largest output size.
    xp = array_namespace(o)
    q = _one_hot(xp, y, o.shape[1], o) if spec.loss == "cross_entropy" else y
    log_p = _log_softmax(xp, o)
    size = xp.abs(o) if o_size is None else o_size
    row_max = xp.max(size, axis=1, keepdims=True)
    loss = xp.mean(xp.sum(q * (xp.abs(log_p) + 2.0 * row_max), axis=1) + row_max[:, 0])
    total = xp.sum(xp.abs(q), axis=1, keepdims=True)
    p = xp.exp(log_p)
    return loss, (p * total * (1.0 + 2.0 * row_max) + xp.abs(q) + 1.0 / o.shape[1]) / o.shape[0]


def _bce_magnitude(o, y, spec, o_size=None):
    # σ moves by at most σ'(o) = e/(1 + e)² times an error in o (e = exp(-|o|)).
    xp = array_namespace(o)
    e = xp.exp(-xp.abs(o))
    size = xp.abs(o) if o_size is None else o_size
    loss = xp.mean(size * (1.0 + xp.abs(y)) + xp.log1p(e))
    slope = e / ((1.0 + e) * (1.0 + e))
    return loss, (1.0 + xp.abs(y) + slope * size) / (o.shape[0] * o.shape[1])


def _jax_cross_entropy(o, y, spec):
    q = jax.nn.one_hot(y, o.shape[1], dtype=o.dtype) if spec.loss == "cross_entropy" else y
    q = optax.smooth_labels(q, spec.label_smoothing) if spec.label_smoothing else q
    return jnp.mean(optax.softmax_cross_entropy(o, q))


# (o - y)² : the loss sums |d|·s, the gradient 2·s per element (over n for the mean).
_SQUARED = _values_magnitude(lambda xp, a, s, spec: (a, 2.0 * s))

LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in [
        Loss(
            "mse",
            "values",
            lambda s: nn.MSELoss(),
            lambda o, y, s: jnp.mean((o - y) ** 2),
            _mse,
            _SQUARED,
        ),
        Loss(
            "mse_sum",
            "values",
            lambda s: nn.MSELoss(reduction="sum"),
            lambda o, y, s: jnp.sum((o - y) ** 2),
            _mse_sum,
            _SQUARED,
            reduction="sum",
        ),
        Loss(
            "cross_entropy",
            "labels",
            lambda s: nn.CrossEntropyLoss(label_smoothing=s.label_smoothing),
            _jax_cross_entropy,
            _cross_entropy,
            _cross_entropy_magnitude,
        ),
        Loss(
            "cross_entropy_probs",
            "probabilities",
            lambda s: nn.CrossEntropyLoss(label_smoothing=s.label_smoothing),
            _jax_cross_entropy,
            _cross_entropy,
            _cross_entropy_magnitude,
        ),
        Loss(
            "bce_with_logits",
            "binary",
            lambda s: nn.BCEWithLogitsLoss(),
            lambda o, y, s: jnp.mean(optax.sigmoid_binary_cross_entropy(o, y)),
            _bce_with_logits,
            _bce_magnitude,
        ),
        Loss(
            "huber",
            "values",
            lambda s: nn.HuberLoss(delta=s.huber_delta),
            lambda o, y, s: jnp.mean(optax.huber_loss(o, y, delta=s.huber_delta)),
            _huber,
            _values_magnitude(
                lambda xp, a, s, spec: (
                    xp.minimum(a, spec.huber_delta),
                    # d itself inside the threshold (its error scales with s), ±δ beyond;
                    # inside, optax.huber_loss's backward adds (q - δ) + δ, which cancels
                    # to q with an error of u·δ (found in review: δ = 1e4 put a correct
                    # JAX gradient at 92 times a bound that left δ out)
                    xp.where(
                        a <= spec.huber_delta,
                        s + spec.huber_delta,
                        xp.minimum(s, spec.huber_delta),
                    ),
                )
            ),
        ),
        Loss(
            "smooth_l1",
            "values",
            lambda s: nn.SmoothL1Loss(beta=s.smooth_l1_beta),
            lambda o, y, s: (
                jnp.mean(optax.huber_loss(o, y, delta=s.smooth_l1_beta)) / s.smooth_l1_beta
            ),
            _smooth_l1,
            _values_magnitude(
                lambda xp, a, s, spec: (
                    xp.minimum(a / spec.smooth_l1_beta, 1.0 + 0 * a),
                    xp.where(  # optax.huber_loss / β: (q - β) + β inside, as above
                        a < spec.smooth_l1_beta,
                        (s + spec.smooth_l1_beta) / spec.smooth_l1_beta,
                        xp.minimum(s / spec.smooth_l1_beta, 1.0 + 0 * s),
                    ),
                )
            ),
        ),
        Loss(
            "l1",
            "values",
            lambda s: nn.L1Loss(),
            lambda o, y, s: jnp.mean(_jax_abs(o - y)),
            _l1,
            # |d| itself (its error scales with s); sign(d) exact, only the 1/n rounds.
            _values_magnitude(lambda xp, a, s, spec: (1.0 + 0 * a, 1.0 + 0 * s)),
        ),
    ]
}
