"""The MLP as a pure JAX function; gradients only through ``jax.grad``.

Parameters are held as Flax holds them: ``{"Dense_0": {"kernel": (in, out), "bias":
(out,)}, "Dense_1": ...}``, so ``flax.linen`` ``Dense`` layers accept the tree as
``{"params": params}``. The SGD step is ``optax.sgd``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

from equiv.activations import ACTIVATIONS
from equiv.losses import LOSSES
from equiv.spec import MLPSpec

Params = dict[str, dict[str, jax.Array]]


def forward(params: Params, x: jax.Array, spec: MLPSpec) -> jax.Array:
    """The network's output for a batch ``x`` of shape (batch, sizes[0])."""
    h = x
    for i in range(spec.num_layers):
        layer = params[f"Dense_{i}"]
        h = h @ layer["kernel"]
        if spec.bias:
            h = h + layer["bias"]
        if i < spec.num_layers - 1:
            activation = ACTIVATIONS[spec.activations[i]]
            h = activation.jax_fn(h, activation.param(spec))
    return h


def loss_fn(params: Params, x: jax.Array, y: jax.Array, spec: MLPSpec) -> jax.Array:
    """The spec's loss; ``"mse"`` is ``mean((f(x) - y)²)`` over all elements, as
    ``torch.nn.MSELoss`` (``optax.l2_loss`` would be half of it, per element).

    Example:
      >>> import jax.numpy as jnp
      >>> spec = MLPSpec((2, 1))
      >>> params = {"Dense_0": {"kernel": jnp.array([[1.0], [2.0]]), "bias": jnp.array([0.5])}}
      >>> float(loss_fn(params, jnp.array([[1.0, 1.0]]), jnp.array([[3.0]]), spec))
      0.25
    """
    return LOSSES[spec.loss].jax_fn(forward(params, x, spec), y, spec)


@functools.cache
def make_sgd_step(spec: MLPSpec, learning_rate: float) -> Callable[..., Any]:
    """A jitted ``step(params, opt_state, x, y) -> (loss, grads, params, opt_state)``
    using ``jax.value_and_grad`` and ``optax.sgd``; returns it with its optimizer.

    Cached per spec and learning rate, so repeated comparisons reuse one compiled
    function (jit still recompiles for a new shape, dtype or precision setting).
    """
    optimizer = optax.sgd(learning_rate)
    value_and_grad = jax.value_and_grad(functools.partial(loss_fn, spec=spec))

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = value_and_grad(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return loss, grads, optax.apply_updates(params, updates), opt_state

    return step, optimizer
