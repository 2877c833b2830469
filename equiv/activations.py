r"""The activations every backend supports, each written three ways.

One table, :data:`ACTIVATIONS`, maps a name to its torch module, its JAX function
and its hand-derived value and derivative (array-API code that runs on NumPy and
torch tensors alike). Derivatives at kinks follow torch's convention:

==============  ===============================  ====================================
name            value                            derivative (hand-derived, as torch)
==============  ===============================  ====================================
``relu``        max(z, 0)                        1 if z > 0 else 0
``leaky_relu``  z if z > 0 else s·z              1 if z > 0 else s  (JAX: 1 at z = 0)
``elu``         z if z > 0 else α·(eᶻ - 1)       1 if z > 0 else α·eᶻ
``tanh``        tanh z                           1 - tanh² z
``sigmoid``     σ(z) = 1 / (1 + e⁻ᶻ)             σ(z)·(1 - σ(z))
``gelu``        z·Φ(z), Φ the normal CDF         Φ(z) + z·φ(z)
``gelu_tanh``   ½z(1 + tanh(√(2/π)(z + c z³)))   ½(1 + t) + ½z(1 - t²)·√(2/π)(1 + 3c z²)
``silu``        z·σ(z)                           σ(z)·(1 + z(1 - σ(z)))
``identity``    z                                1
==============  ===============================  ====================================

(``s`` is ``MLPSpec.negative_slope``, ``α`` is ``MLPSpec.elu_alpha``, ``c = 0.044715``.)

``gelu`` is torch's default (exact, erf); ``jax.nn.gelu`` defaults to the tanh
approximation, so the JAX backend calls it with ``approximate=False``: the two differ
by up to 4.7e-4 in value, far above float32 rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from array_api_compat import is_torch_array
from torch import nn

Array = Any
_GELU_C = 0.044715
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclasses.dataclass(frozen=True)
class Activation:
    """One activation in every backend. ``param`` is its hyper-parameter, if any."""

    name: str
    torch_module: Callable[[float], nn.Module]
    jax_fn: Callable[[jax.Array, float], jax.Array]
    value: Callable[[Any, Array, float], Array]  # (xp, z, param) -> h
    derivative: Callable[[Any, Array, float], Array]  # (xp, z, param) -> dh/dz
    kink: bool = False  # non-differentiable at z = 0
    param_field: str | None = None  # the MLPSpec field holding the hyper-parameter
    # For kinked activations, the branch for z <= 0 as (xp, z, param) -> (value, derivative);
    # the branch for z > 0 is the identity. Lets a caller force either side of the kink.
    negative: Callable[[Any, Array, float], tuple[Array, Array]] | None = None
    # A bound on |h'(z)|: how much an error in z can grow through the activation.
    lipschitz: Callable[[float], float] = lambda param: 1.0

    def value_and_derivative(
        self, xp: Any, z: Array, param: float, branch: Array | None = None
    ) -> tuple[Array, Array]:
        """``h(z)`` and ``h'(z)``; ``branch`` (boolean, kinked activations only) forces
        the side of the kink: True takes the ``z > 0`` branch, False the other.

        >>> import numpy as np
        >>> relu = ACTIVATIONS["relu"]
        >>> z = np.array([-1.0, 1e-9])
        >>> [a.tolist() for a in relu.value_and_derivative(np, z, 0.0)]
        [[0.0, 1e-09], [0.0, 1.0]]
        >>> [a.tolist() for a in relu.value_and_derivative(np, z, 0.0, np.array([True, False]))]
        [[-1.0, 0.0], [1.0, 0.0]]
        """
        if branch is None or self.negative is None:
            return self.value(xp, z, param), self.derivative(xp, z, param)
        # Evaluate the negative branch only where it is taken (0 elsewhere: no overflow).
        value, slope = self.negative(xp, xp.where(branch, xp.zeros_like(z), z), param)
        return xp.where(branch, z, value), xp.where(branch, xp.ones_like(z), slope)

    def param(self, spec: Any) -> float:
        """The hyper-parameter ``spec`` gives this activation (0.0 if it has none)."""
        return float(getattr(spec, self.param_field)) if self.param_field else 0.0


def _sigmoid(xp, z):
    # Both branches exponentiate a non-positive number: no overflow either way.
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _erf(xp, z):
    # The array API has no erf: torch has one, NumPy does not (math.erf per element).
    if is_torch_array(z):
        return z.erf()
    return np.vectorize(math.erf, otypes=[z.dtype])(z)


def _gelu_tanh_parts(xp, z):
    inner = _SQRT_2_OVER_PI * (z + _GELU_C * z * z * z)
    return inner, xp.tanh(inner)


def _gelu_tanh_derivative(xp, z, _):
    _, t = _gelu_tanh_parts(xp, z)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (
        1.0 + 3.0 * _GELU_C * z * z
    )


def _silu_derivative(xp, z, _):
    s = _sigmoid(xp, z)
    return s * (1.0 + z * (1.0 - s))


def _ones(xp, z):
    return xp.ones_like(z)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation(
            "relu",
            lambda p: nn.ReLU(),
            lambda z, p: jax.nn.relu(z),
            lambda xp, z, p: xp.where(z > 0, z, xp.zeros_like(z)),
            lambda xp, z, p: xp.where(z > 0, _ones(xp, z), xp.zeros_like(z)),
            kink=True,
            negative=lambda xp, z, p: (xp.zeros_like(z), xp.zeros_like(z)),
        ),
        Activation(
            "leaky_relu",
            lambda p: nn.LeakyReLU(p),
            lambda z, p: jax.nn.leaky_relu(z, p),
            lambda xp, z, p: xp.where(z > 0, z, p * z),
            lambda xp, z, p: xp.where(z > 0, _ones(xp, z), p * _ones(xp, z)),
            kink=True,
            param_field="negative_slope",
            negative=lambda xp, z, p: (p * z, p * _ones(xp, z)),
            lipschitz=lambda p: max(1.0, p),
        ),
        Activation(
            "elu",
            lambda p: nn.ELU(p),
            lambda z, p: jax.nn.elu(z, p),
            lambda xp, z, p: xp.where(z > 0, z, p * xp.expm1(xp.where(z > 0, 0 * z, z))),
            lambda xp, z, p: xp.where(z > 0, _ones(xp, z), p * xp.exp(xp.where(z > 0, 0 * z, z))),
            kink=True,
            param_field="elu_alpha",  # a kink unless alpha == 1
            negative=lambda xp, z, p: (p * xp.expm1(z), p * xp.exp(z)),
            lipschitz=lambda p: max(1.0, p),
        ),
        Activation(
            "tanh",
            lambda p: nn.Tanh(),
            lambda z, p: jnp.tanh(z),
            lambda xp, z, p: xp.tanh(z),
            lambda xp, z, p: 1.0 - xp.tanh(z) * xp.tanh(z),
        ),
        Activation(
            "sigmoid",
            lambda p: nn.Sigmoid(),
            lambda z, p: jax.nn.sigmoid(z),
            lambda xp, z, p: _sigmoid(xp, z),
            lambda xp, z, p: _sigmoid(xp, z) * (1.0 - _sigmoid(xp, z)),
        ),
        Activation(
            "gelu",
            lambda p: nn.GELU(),
            lambda z, p: jax.nn.gelu(z, approximate=False),
            lambda xp, z, p: 0.5 * z * (1.0 + _erf(xp, z / math.sqrt(2.0))),
            lambda xp, z, p: (
                0.5 * (1.0 + _erf(xp, z / math.sqrt(2.0)))
                + z * xp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
            ),
            lipschitz=lambda p: 1.13,  # max of Φ(z) + z·φ(z), at z = √2: 1.1289
        ),
        Activation(
            "gelu_tanh",
            lambda p: nn.GELU(approximate="tanh"),
            lambda z, p: jax.nn.gelu(z, approximate=True),
            lambda xp, z, p: 0.5 * z * (1.0 + _gelu_tanh_parts(xp, z)[1]),
            _gelu_tanh_derivative,
            lipschitz=lambda p: 1.13,
        ),
        Activation(
            "silu",
            lambda p: nn.SiLU(),
            lambda z, p: jax.nn.silu(z),
            lambda xp, z, p: z * _sigmoid(xp, z),
            _silu_derivative,
            lipschitz=lambda p: 1.1,  # max of σ(z)(1 + z(1 - σ(z))): 1.0998
        ),
        Activation(
            "identity",
            lambda p: nn.Identity(),
            lambda z, p: z,
            lambda xp, z, p: z,
            lambda xp, z, p: _ones(xp, z),
        ),
    ]
}
