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
_FLOAT32_U = float(np.finfo(np.float32).eps) / 2  # u of float32
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
    # (xp, z, param, u) -> the size of the terms h and h' are computed from, as torch,
    # JAX and the formulas above evaluate them; None: |h| and |h'|. Where they cancel
    # (1 - tanh² z at large |z|) the float error is u times the terms, not the result.
    term_sizes: Callable[[Any, Array, float, float], tuple[Array, Array]] | None = None
    # Where h'(z) = 0, torch's and JAX's backward selects 0 instead of multiplying
    # (torch's threshold_backward, JAX's relu JVP): an infinite upstream gradient then
    # gives 0, not NaN. See :meth:`chain`.
    selects_zero: bool = False
    # Where |h'| or |h''| has a local maximum (the zeros of h'' and h'''), found on a
    # grid of step 1e-5 over [-12, 12]: with the ends of an interval, where the
    # greatest values over it lie. See :meth:`envelope`.
    peaks: tuple[float, ...] = ()
    # Whether torch's and JAX's own functions take different sides at z exactly 0
    # (leaky_relu: torch's slope s, jax.nn.leaky_relu's 1). Only there is a z that
    # every backend computes exactly 0 allowed either side (equiv.kinks).
    sides_differ_at_zero: bool = False

    def has_kink(self, param: float) -> bool:
        """Whether the slope jumps at 0 (ELU's does not at ``alpha = 1``).

        >>> elu = ACTIVATIONS["elu"]
        >>> ACTIVATIONS["relu"].has_kink(0.0), elu.has_kink(1.0), elu.has_kink(0.5)
        (True, False, True)
        """
        return self.kink and not (self.param_field == "elu_alpha" and param == 1.0)

    def envelope(self, xp: Any, z: Array, radius: Array, param: float) -> tuple[Array, Array]:
        """The greatest ``|h'|`` and ``|h''|`` over ``[z - radius, z + radius]``, on
        ``z``'s own side of a kink (the other side is :mod:`equiv.kinks`'s business):
        how far an error of up to ``radius`` in ``z`` can move ``h`` and ``h'``, per unit
        of it (mean value theorem). Taken at ``z``, the two ends and the :attr:`peaks`
        inside, so it is never less than at ``z`` itself. Where ``radius`` is wide, a
        saturated unit (``tanh`` at ``z = -2505``, slope exactly 0) may in fact sit
        anywhere up to the steep middle: found by a random sweep, a diverging float64
        run whose weights reached 1e42, where one backend's sum gave ``z = 3.8`` and
        another's ``-2505``.

        >>> import numpy as np
        >>> tanh = ACTIVATIONS["tanh"]
        >>> z, radius = np.array([-2505.0, 5.0]), np.array([3000.0, 1e-3])
        >>> slope, curvature = tanh.envelope(np, z, radius, 0.0)
        >>> slope.round(4).tolist(), curvature.round(4).tolist()  # the middle; near 5: tiny
        ([1.0, 0.0002], [0.7698, 0.0004])
        """
        lo, hi = z - radius, z + radius
        side = None
        if self.has_kink(param):
            side = z > 0
            zero = xp.zeros_like(z)
            lo = xp.where(side, xp.maximum(lo, zero), lo)
            hi = xp.where(side, hi, xp.minimum(hi, zero))
        points = [z, lo, hi] + [
            xp.where((lo < peak) & (peak < hi), xp.full_like(z, peak), z) for peak in self.peaks
        ]
        slope, curvature = xp.zeros_like(z), xp.zeros_like(z)
        for point in points:
            _, d = self.value_and_derivative(xp, point, param, side)
            c = self.curvature(xp, point, param, side)
            # NaN (an infinite end) is no value: comparisons with it are False.
            slope = xp.where(xp.abs(d) > slope, xp.abs(d), slope)
            curvature = xp.where(c > curvature, c, curvature)
        return slope, curvature

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

    def chain(self, xp: Any, upstream: Array, slope: Array, where: Array | None = None) -> Array:
        """``upstream · slope``, the backward pass's chain rule, as torch and JAX apply it.

        The same product everywhere, except where the activation's slope ``where``
        (default ``slope`` itself) is 0 for an activation whose backward selects rather
        than multiplies (``relu``): there it is exactly 0 even when ``upstream``
        overflowed to ``inf`` in a diverging run (a product gives NaN, as torch's and
        JAX's do for ``tanh`` and the others). At a NaN pre-activation torch's ReLU
        passes the gradient through; JAX's and this select 0.

        >>> import numpy as np
        >>> slope = np.array([0.0, 1.0])
        >>> ACTIVATIONS["relu"].chain(np, np.array([np.inf, 2.0]), slope).tolist()
        [0.0, 2.0]
        >>> ACTIVATIONS["leaky_relu"].chain(np, np.array([3.0, 2.0]), slope).tolist()
        [0.0, 2.0]
        """
        if self.selects_zero:  # select first: no inf · 0 is ever formed
            gate = slope if where is None else where
            upstream = xp.where(gate == 0, xp.zeros_like(upstream), upstream)
        return upstream * slope

    def curvature(self, xp: Any, z: Array, param: float, branch: Array | None = None) -> Array:
        """``|h''(z)|``, by a central difference of ``h'`` on ``z``'s own side of any kink
        (the other side is :mod:`equiv.kinks`'s business; ``branch`` as in
        :meth:`value_and_derivative` picks it): how fast an error in ``z``
        moves the slope the backward pass multiplies by. For float64 inputs; the step
        ``1e-4·max(|z|, 1)`` keeps the difference's own error near 1e-9 relative.

        >>> import numpy as np
        >>> tanh = ACTIVATIONS["tanh"]
        >>> z = np.array([0.0, 0.5])
        >>> np.allclose(tanh.curvature(np, z, 0.0), np.abs(-2 * np.tanh(z) / np.cosh(z) ** 2))
        True
        >>> ACTIVATIONS["relu"].curvature(np, np.array([-1.0, 0.0, 1e-9]), 0.0).tolist()
        [0.0, 0.0, 0.0]
        """
        step = 1e-4 * xp.maximum(xp.abs(z), xp.ones_like(z))
        side = None if self.negative is None else (z > 0) if branch is None else branch
        _, up = self.value_and_derivative(xp, z + step, param, side)
        _, down = self.value_and_derivative(xp, z - step, param, side)
        return xp.abs(up - down) / (2.0 * step)

    def evaluation_sizes(
        self, xp: Any, z: Array, param: float, unit_roundoff: float
    ) -> tuple[Array, Array]:
        """What the float error of evaluating ``h(z)`` and ``h'(z)`` in a dtype of unit
        roundoff ``unit_roundoff`` scales with: at least ``|h|`` and ``|h'|``, more where
        the formula cancels. torch and JAX compute tanh's slope as ``1 - tanh²z``: at
        ``z = 4`` the slope is 1.3e-3, and float32's rounding of ``tanh z`` leaves an
        error of ``u·(1 + tanh²z)``, 8.9e-5 of it. From ``z ≈ 9.36``, where ``1 - tanh z``
        is below ``u/4``, float32's ``tanh z`` is exactly 1 and the error is only the
        slope itself.

        Underflow: kernels may flush a result below ``tiny/u`` to 0 (torch's float32
        gelu slope at ``z = -13`` is 0, the true one -1e-36), an error of up to
        ``tiny/u``: no size is below ``tiny/u²`` (3.3e-24 in float32). It matters
        where an underflowed slope meets a huge upstream gradient (sigmoid at
        ``z = -100`` times 1e13 in a diverging run).

        >>> import numpy as np
        >>> tanh, u = ACTIVATIONS["tanh"], 2.0**-24
        >>> [a.round(3).tolist() for a in tanh.evaluation_sizes(np, np.array([4.0, 10.0]), 0.0, u)]
        [[0.999, 1.0], [1.999, 0.138]]
        >>> float(ACTIVATIONS["sigmoid"].evaluation_sizes(np, np.array([-100.0]), 0.0, u)[1][0])
        3.3...e-24
        """
        value, slope = self.value_and_derivative(xp, z, param)
        if self.term_sizes is None:
            value_size, slope_size = xp.abs(value), xp.abs(slope)
        else:
            # Saturation (a sum that cancels to exactly 0) is checked on float32 kernels
            # only; in float64 JAX's tanh is 1 - 7u, not 1, up to z = 20: keep the terms.
            checked = unit_roundoff if unit_roundoff >= _FLOAT32_U else 0.0
            value_terms, slope_terms = self.term_sizes(xp, z, param, checked)
            value_size = xp.maximum(xp.abs(value), value_terms)
            slope_size = xp.maximum(xp.abs(slope), slope_terms)
        floor = underflow_size(unit_roundoff)
        return xp.clip(value_size, min=floor), xp.clip(slope_size, min=floor)

    def param(self, spec: Any) -> float:
        """The hyper-parameter ``spec`` gives this activation (0.0 if it has none)."""
        return float(getattr(spec, self.param_field)) if self.param_field else 0.0


def underflow_size(unit_roundoff: float) -> float:
    """``tiny/u²`` of the dtype whose unit roundoff is ``unit_roundoff`` (float32 at or
    above float32's ``u``, else float64): the size whose error ``u·size`` is ``tiny/u``,
    what a kernel may lose by flushing a result to 0.

    >>> f"{underflow_size(2.0**-24):.3g}", f"{underflow_size(2.0**-53):.3g}"
    ('3.31e-24', '1.81e-276')
    """
    dtype = np.float32 if unit_roundoff >= _FLOAT32_U else np.float64
    return float(np.finfo(dtype).tiny) / unit_roundoff**2


def _sigmoid(xp, z):
    # Both branches exponentiate a non-positive number: no overflow either way.
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _erf(xp, z):
    # The array API has no erf: torch has one, NumPy does not; SciPy's (a dependency
    # of JAX) is vectorized, where a per-element math.erf took most of a GELU bound.
    if is_torch_array(z):
        return z.erf()
    from scipy import special

    return special.erf(z)


def _erfc(xp, z):
    if is_torch_array(z):
        return z.erfc()
    from scipy import special

    return special.erfc(z)


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


def _rounds_to_one(xp, gap, lost, terms, u):
    """The error size of a sum that cancels as ``r → 1`` (``1 - r``, ``1 + erf``...):
    ``terms`` (the rounding of ``r`` and of the sum) while ``r`` is apart from 1, and
    only ``lost / u`` once the true gap ``1 - |r|`` is below ``u/4``, where float
    ``r`` is exactly ±1, the sum exactly 0, and its error the true result ``lost``
    (``tests/test_activations.py`` checks this on torch's and JAX's float32 kernels;
    ``u = 0`` keeps the terms)."""
    if u == 0.0:
        return terms
    return xp.where(gap < 0.25 * u, lost / u, terms)


def _tanh_gap(xp, z):
    e = xp.exp(-2.0 * xp.abs(z))
    return 2.0 * e / (1.0 + e)  # 1 - |tanh z|, without cancelling


def _elu_terms(xp, z, p, u):
    # JAX differentiates α·expm1(z) as α·(expm1(z) + 1): a sum near -α + α for z << 0.
    zn = xp.where(z > 0, 0 * z, z)
    m, e = xp.expm1(zn), xp.exp(zn)
    slope = _rounds_to_one(xp, e, e, 1.0 - m, u)
    return xp.abs(xp.where(z > 0, z, p * m)), xp.where(z > 0, _ones(xp, z), p * slope)


def _tanh_terms(xp, z, _, u):
    t, gap = xp.tanh(z), _tanh_gap(xp, z)
    return xp.abs(t), _rounds_to_one(xp, gap, gap * (2.0 - gap), 1.0 + t * t, u)  # 1 - t²


def _sigmoid_terms(xp, z, _, u):
    # σ(1 - σ): 1 - σ carries u·σ, times σ (σ(1 - σ) + σ² = σ), until σ rounds to 1.
    s, gap = _sigmoid(xp, z), _sigmoid(xp, -z)
    return s, _rounds_to_one(xp, gap, s * gap, s, u)


def _gelu_terms(xp, z, _, u):
    # ½z(1 + erf(z/√2)) and ½(1 + erf) + z·φ(z): 1 + erf = 2Φ(z) cancels for z << 0.
    # The value is exact 0 once erf rounds to -1; torch's slope is not: it is off by
    # up to u/2 down to z = -6 (multiples of 2⁻²⁵ there), so it keeps the full terms.
    erf = xp.abs(_erf(xp, z / math.sqrt(2.0)))
    cdf = 0.5 * _erfc(xp, -z / math.sqrt(2.0))  # Φ(z), without cancelling
    gap = xp.where(z < 0, 2.0 * cdf, 1.0 + 0 * z)
    phi = xp.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    value = xp.abs(z) * _rounds_to_one(xp, gap, cdf, 0.5 * (1.0 + erf), u)
    return value, 0.5 * (1.0 + erf) + xp.abs(z) * phi


def _gelu_tanh_terms(xp, z, _, u):
    # ½z(1 + t) and ½(1 + t) + ½z(1 - t²)·√(2/π)(1 + 3c z²), t = tanh(inner): 1 + t
    # cancels for z << 0, 1 - t² for |z| >> 0.
    inner, t = _gelu_tanh_parts(xp, z)
    gap = _tanh_gap(xp, inner)
    half = _rounds_to_one(  # 1 + t = gap for z < 0, without cancelling
        xp, xp.where(z < 0, gap, 1.0 + 0 * z), 0.5 * gap, 0.5 * (1.0 + xp.abs(t)), u
    )
    square = _rounds_to_one(xp, gap, gap * (2.0 - gap), 1.0 + t * t, u)
    chain = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * z * z)
    return xp.abs(z) * half, half + 0.5 * xp.abs(z) * square * chain


def _silu_terms(xp, z, _, u):
    # σ·(1 + z(1 - σ)) (torch) or σ + z·σ(1 - σ) (JAX): σ·(1 + |z|) either way, but
    # z(1 - σ) is exact 0 once σ rounds to 1.
    s, gap = _sigmoid(xp, z), _sigmoid(xp, -z)
    return xp.abs(z) * s, s * (1.0 + xp.abs(z) * _rounds_to_one(xp, gap, gap, _ones(xp, z), u))


def _ones(xp, z):
    return xp.ones_like(z)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation(
            "relu",
            lambda p: nn.ReLU(),
            lambda z, p: jax.nn.relu(z),
            # z <= 0, not z > 0: a NaN passes through, as torch's and JAX's ReLU pass
            # it (found by a random sweep: a float32 run past overflow whose NaNs this
            # zeroed gave a finite loss of 1.1 where the others gave NaN).
            lambda xp, z, p: xp.where(z <= 0, xp.zeros_like(z), z),
            lambda xp, z, p: xp.where(z > 0, _ones(xp, z), xp.zeros_like(z)),
            kink=True,
            negative=lambda xp, z, p: (xp.zeros_like(z), xp.zeros_like(z)),
            selects_zero=True,
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
            sides_differ_at_zero=True,
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
            term_sizes=_elu_terms,
            peaks=(0.0,),  # h'' jumps from alpha to 0 there
        ),
        Activation(
            "tanh",
            lambda p: nn.Tanh(),
            lambda z, p: jnp.tanh(z),
            lambda xp, z, p: xp.tanh(z),
            lambda xp, z, p: 1.0 - xp.tanh(z) * xp.tanh(z),
            term_sizes=_tanh_terms,
            peaks=(-0.65848, 0.0, 0.65848),
        ),
        Activation(
            "sigmoid",
            lambda p: nn.Sigmoid(),
            lambda z, p: jax.nn.sigmoid(z),
            lambda xp, z, p: _sigmoid(xp, z),
            lambda xp, z, p: _sigmoid(xp, z) * (1.0 - _sigmoid(xp, z)),
            term_sizes=_sigmoid_terms,
            peaks=(-1.31696, 0.0, 1.31696),
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
            term_sizes=_gelu_terms,
            peaks=(-2.0, -1.41421, 0.0, 1.41421, 2.0),
        ),
        Activation(
            "gelu_tanh",
            lambda p: nn.GELU(approximate="tanh"),
            lambda z, p: jax.nn.gelu(z, approximate=True),
            lambda xp, z, p: 0.5 * z * (1.0 + _gelu_tanh_parts(xp, z)[1]),
            _gelu_tanh_derivative,
            lipschitz=lambda p: 1.13,
            term_sizes=_gelu_tanh_terms,
            peaks=(-2.01348, -1.4185, 0.0, 1.4185, 2.01348),
        ),
        Activation(
            "silu",
            lambda p: nn.SiLU(),
            lambda z, p: jax.nn.silu(z),
            lambda xp, z, p: z * _sigmoid(xp, z),
            _silu_derivative,
            lipschitz=lambda p: 1.1,  # max of σ(z)(1 + z(1 - σ(z))): 1.0998
            term_sizes=_silu_terms,
            peaks=(-3.43584, -2.39936, 0.0, 2.39936, 3.43584),
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
