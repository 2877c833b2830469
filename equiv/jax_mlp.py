"""The MLP as a pure JAX function; gradients only through ``jax.grad``.

Parameters are held as Flax holds them: ``{"Dense_0": {"kernel": (in, out), "bias":
(out,)}, "Dense_1": ...}``, so ``flax.linen`` ``Dense`` layers accept the tree as
``{"params": params}``. The training step uses optax, composed to torch.optim's
semantics by :func:`equiv.optimizers.make_optax`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

from equiv.activations import ACTIVATIONS
from equiv.losses import LOSSES
from equiv.optimizers import OptimizerSpec, make_optax
from equiv.spec import MLPSpec

Params = dict[str, dict[str, jax.Array]]


def forward(params: Params, x: jax.Array, spec: MLPSpec) -> jax.Array:
    """The network's output for a batch ``x`` of shape (batch, sizes[0])."""
    h = x
    for i in range(spec.num_layers):
        layer = params[f"Dense_{i}"]
        h = h @ layer["kernel"]
        if spec.biases[i]:
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


#: How many configurations keep their compiled train step. Each holds about 36
#: memory mappings of compiled code; unbounded, a sweep of about 1,800 distinct
#: configurations in one process exhausted Linux's 65,530 (XLA: "LLVM ERROR: Unable
#: to allocate section memory").
_TRAIN_STEP_CACHE = 64


@functools.lru_cache(maxsize=_TRAIN_STEP_CACHE)
def make_train_step(spec: MLPSpec, optimizer: OptimizerSpec) -> tuple[Callable[..., Any], Any]:
    """A jitted ``step(params, opt_state, x, y) -> (loss, grads, params, opt_state)``
    with ``jax.value_and_grad`` of :func:`loss_fn` and
    :func:`equiv.optimizers.make_optax`; returns it with the optax transformation.

    Cached per (spec, optimizer), for the last 64 of them: every
    comparison of one configuration reuses one compiled function (jit still
    recompiles for a new shape, dtype or precision), and a long sweep's memory stays
    bounded.

    >>> step, tx = make_train_step(MLPSpec(), OptimizerSpec("adam"))
    >>> make_train_step(MLPSpec(), OptimizerSpec("adam"))[0] is step
    True
    """
    tx = make_optax(optimizer)
    value_and_grad = jax.value_and_grad(functools.partial(loss_fn, spec=spec))

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = value_and_grad(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return loss, grads, optax.apply_updates(params, updates), opt_state

    return step, tx
