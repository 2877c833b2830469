r"""Tolerances derived from the arithmetic, not guessed.

A bound on ``|actual - expected|`` per element is

    atol + rtol·|expected| + scaled·S,     S = max over the leaf of max(|actual|, |expected|)

where user tolerances set ``atol`` and ``rtol`` (as ``torch.testing.assert_close``
does) and derived tolerances set ``scaled``.

Derivation of ``scaled``. A floating-point result computed through reductions of
length at most ``k`` carries a rounding error that grows like ``√k·u`` (the
probabilistic model of Higham & Mary, 2019), not like the worst case ``k·u``,
relative to the magnitude of the values involved. So per tensor

    |q̂ - q| ≤ c · u · √k · max|q|

with ``u`` the dtype's unit roundoff (2⁻²⁴ for float32, 2⁻⁵³ for float64) and
``c = 8``, a constant that absorbs the few operations chained per layer and the
tail of the distribution; measured against float64 results on MLPs this rule held
with the worst ratio at about 1.1 of ``c = 8``. Two backends, each within that of
the exact value, differ by at most the sum, so a pair gets ``c·√k·(u_a + u_b)``:
twice ``c·√k·u`` for two float32 backends, and essentially ``c·√k·u₃₂`` against
the float64 reference. After ``s`` SGD steps each step starts from parameters
already off by the previous bound, so the bound grows linearly: a factor ``s``.

Cancellation. A sum that cancels is small while its rounding error is not: the
error of ``Σ_b dz_b h_b`` scales with ``Σ_b |dz_b|·|h_b|``, not with the result (found
by the false-alarm sweep: a 1×1 layer over a batch of 20 whose weight gradient
nearly cancelled, 1.3 times a bound relative to ``max|g|``). So ``max|q|`` above is
the larger of the leaf's own magnitude and the magnitude of what it sums,
:func:`equiv.manual.magnitudes` of the float64 values (the backward pass on absolute
values; for the loss ``mean(|f(x) - y|·(|f(x)| + |y|))``, since ``f(x) - y`` cancels
too). :func:`with_magnitude` adds the excess as an absolute term.

Parameters after an update. ``p_s = p_{s-1} - lr·g_s`` can cancel: ``|p_s|`` may be far
smaller than ``|p_{s-1}|`` and ``|lr·g_s|`` (found by the false-alarm sweep: a 1×1
layer whose weight the step nearly zeroed, off by 23 times a bound relative to
``max|p_s|``). The error of ``p_s`` is the error carried from ``p_{s-1}``, plus ``lr``
times the error of ``g_s``, plus the rounding of the update itself::

    δp_s ≤ δp_{s-1} + lr·δg_s + u·|p_s|,     δg_t ≤ c·√k·(u₁+u₂)·t·max|g_t|

so, with ``Δp_t = p_t - p_{t-1}`` (``lr·g_t`` for SGD, read off the trajectories so
that any optimizer's step counts), the parameters get an absolute term on top of
the scaled one (:func:`params_tolerance`)::

    c·√k·(u₁+u₂)·(s·max|p_s| + Σ_{t≤s} t·max|Δp_t|)

``k`` is the longest reduction that produced the value: the widest layer input
or output (forward ``h Wᵀ`` reduces over the input width, backward ``dz W`` over
the output width), the batch (``dW = dzᵀ h`` and ``db = Σ dz`` reduce over it) and,
for the loss, the ``batch · outputs`` elements of the mean.
"""

from __future__ import annotations

import dataclasses
import math

from equiv._messages import value_error
from equiv.spec import UNIT_ROUNDOFF, MLPSpec

#: Safety constant of the derived bound (see the module docstring).
SAFETY = 8.0


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Per-element bound ``atol + rtol·|expected| + scaled·S`` with a derivation.

    >>> Tolerance(atol=1e-6, rtol=0.0).allowed(expected_abs=2.0, scale=2.0)
    1e-06
    """

    atol: float = 0.0
    rtol: float = 0.0
    scaled: float = 0.0
    derivation: str = ""

    def allowed(self, expected_abs: float, scale: float) -> float:
        return self.atol + self.rtol * expected_abs + self.scaled * scale

    def describe(self) -> str:
        if self.derivation:
            return self.derivation
        return f"atol={self.atol:.3g}, rtol={self.rtol:.3g}"


def user_tolerance(rtol: float | None, atol: float | None) -> Tolerance | None:
    """A fixed tolerance from the user, or None to derive one. Both or neither.

    >>> user_tolerance(None, None) is None
    True
    >>> user_tolerance(1e-5, 1e-8).rtol
    1e-05
    """
    if (rtol is None) != (atol is None):
        raise value_error(
            "give rtol and atol both, or neither to use derived tolerances; "
            f"got rtol={rtol!r}, atol={atol!r}"
        )
    if rtol is None:
        return None
    if not (rtol >= 0 and atol >= 0):
        raise value_error(f"rtol and atol must be non-negative, got rtol={rtol}, atol={atol}")
    return Tolerance(atol=float(atol), rtol=float(rtol))


def reduction_length(spec: MLPSpec, batch_size: int, stage: str) -> int:
    """The longest reduction behind a value of ``stage`` ("loss", "grads", "params").

    >>> reduction_length(MLPSpec((4, 3, 2)), batch_size=2, stage="grads")
    4
    >>> reduction_length(MLPSpec((4, 3, 2)), batch_size=2, stage="loss")
    4
    """
    k = max(max(spec.sizes), batch_size)
    if stage == "loss":
        k = max(k, batch_size * spec.sizes[-1])
    return k


def derived_tolerance(
    spec: MLPSpec, batch_size: int, stage: str, step: int, dtypes: tuple[str, str]
) -> Tolerance:
    """The bound for two results of ``stage`` at ``step`` computed in ``dtypes``.

    >>> tol = derived_tolerance(MLPSpec((4, 3, 2)), 2, "grads", 1, ("float32", "float32"))
    >>> round(tol.scaled / 2.0**-24, 6)  # 8 · √4 · (u + u) / u
    32.0
    """
    k = reduction_length(spec, batch_size, stage)
    u_sum = sum(UNIT_ROUNDOFF[d] for d in dtypes)
    scaled = SAFETY * math.sqrt(k) * u_sum * step
    return Tolerance(
        scaled=scaled,
        derivation=f"{SAFETY:g}·√{k}·(u₁+u₂)·{step}·max|x|",
    )


def params_tolerance(base: Tolerance, update_sizes: list[float]) -> Tolerance:
    """Add the carried update errors to a derived ``"params"`` bound at step ``s``.

    ``update_sizes[t-1]`` is ``max|p_t - p_{t-1}|`` of the leaf for ``t = 1..s``; see
    the module docstring (``base.scaled`` is ``c·√k·(u₁+u₂)·s``).

    >>> tol = derived_tolerance(MLPSpec((4, 3, 2)), 2, "params", 2, ("float32", "float32"))
    >>> extra = params_tolerance(tol, [1.0, 0.5])
    >>> round(extra.atol / (tol.scaled / 2), 6)  # c·√k·(u₁+u₂)·(1·1.0 + 2·0.5)
    2.0
    """
    steps = len(update_sizes)
    per_step = base.scaled / steps if steps else 0.0
    carried = per_step * sum(t * size for t, size in enumerate(update_sizes, start=1))
    return dataclasses.replace(
        base,
        atol=base.atol + carried,
        derivation=base.derivation + f" + {carried:.3g} (updates carried)",
    )


def with_magnitude(base: Tolerance, magnitude: float, largest: float) -> Tolerance:
    """Scale the bound by ``max(largest, magnitude)`` instead of ``largest`` alone:
    ``magnitude`` is what the leaf sums (module docstring), ``largest`` its max|value|.

    >>> tol = with_magnitude(Tolerance(scaled=1e-7), magnitude=6.0, largest=0.5)
    >>> round(tol.atol, 12)
    5.5e-07
    """
    extra = base.scaled * max(0.0, magnitude - largest)
    if extra == 0.0:
        return base
    return dataclasses.replace(
        base, atol=base.atol + extra, derivation=base.derivation + f" + {extra:.3g} (cancellation)"
    )
