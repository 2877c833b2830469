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
already off by the previous bound, so the bound grows linearly: a factor ``s``. That
holds between two backends' trajectories. A backend held to the float64 step taken from
its own parameters and state (the harness's propagation, every step after the first)
differs from it by that step's rounding alone: its factor is 1, its parameters carry
the last update's error only, and its optimizer's bounds are that step's
(``optimizer_bounds(fresh=True)``). Found in review: with the factor ``s`` there, a
learning rate off by 1e-3 from step 10 on passed where 2.4e-5 from step 1 failed.

Cancellation. A sum that cancels is small while its rounding error is not: the
error of ``Σ_b dz_b h_b`` scales with ``Σ_b |dz_b|·|h_b|``, not with the result (found
by the false-alarm sweep: a 1×1 layer over a batch of 20 whose weight gradient
nearly cancelled, 1.3 times a bound relative to ``max|g|``). So ``max|q|`` above is
the larger of the leaf's own magnitude and the size its error scales with,
:func:`equiv.manual.magnitudes` of the float64 values: the error propagated to first
order through both passes, each sum at the size of its terms (for the loss
``mean(|f(x) - y|·(|f(x)|⁺ + |y|))``, since ``f(x) - y`` cancels too). A hidden
unit that cancels counts as well: ``z = 1.0001·a - a`` is O(1) while its float32
error is O(u·a), and ``h'(z)`` moves by ``|h''(z)|`` times that (found in review: a
2-2-1 tanh MLP with ``a = 10⁴`` was off by 84 times a bound that ignored it); so
do activation formulas that cancel (``1 - tanh²z``, see
:meth:`equiv.activations.Activation.evaluation_sizes`) and, where the slope is 0,
the second-order move ``½|h''|·δz²``.
The harness adds the excess element by element for the loss and gradients
(``atol_elementwise`` of :func:`equiv.compare.compare_leaf`), so that one poorly
conditioned unit widens its own elements only, and takes ``S`` no smaller than the
float64 leaf's greatest value, above which those excesses are measured (two float32
leaves can both fall far short of it where that value is itself cancellation that
float32 returns as 0); :func:`with_magnitude` adds the leaf's
largest excess as one absolute term where one number per leaf is needed (the
optimizer's carried bounds).

Parameters after an update. ``p_s = p_{s-1} - lr·g_s`` can cancel: ``|p_s|`` may be far
smaller than ``|p_{s-1}|`` and ``|lr·g_s|`` (found by the false-alarm sweep: a 1×1
layer whose weight the step nearly zeroed, off by 23 times a bound relative to
``max|p_s|``). The error of ``p_s`` is the error carried from ``p_{s-1}``, plus ``lr``
times the error of ``g_s``, plus the rounding of the update itself::

    δp_s ≤ δp_{s-1} + lr·δg_s + r·u·|p_s|,     δg_t ≤ c·√k·(u₁+u₂)·t·max|g_t|

so, with ``Δp_t = p_t - p_{t-1}`` (``lr·g_t`` for SGD, read off the trajectories so
that any optimizer's step counts), the parameters get an absolute term on top of
the scaled one (:func:`params_tolerance`)::

    (u₁+u₂)·(r·s·max|p_s| + c·√k·Σ_{t≤s} t·max|Δp_t|)

Everything an update computes from the gradient (momentum, Adam's moments, a weight
decay added to the gradient) is relative to ``Δp_t`` and within the second term. What
is relative to ``p`` itself is the update's own rounding: ``r = 3`` roundings per step
(torch's AdamW: ``1 - lr·λ`` rounded to the dtype, ``p·(1 - lr·λ)``, then the add;
every other update rounds ``p`` once, in the add). Before, the first term was
``c·√k·s·max|p_s|`` as well, 75 times ``r`` for a 784-wide layer: optax's default
AdamW decay (1e-4) for torch's (1e-2) at lr 1e-3 moves ``p`` by ``1e-5·|p|`` per step
and passed in a 784-256-10 model (found in a user trial).

Underflow. Below the smallest normal number ``tiny`` a result is off by up to ``tiny``
absolutely, not ``u`` relatively: ``max|x|`` is taken no smaller than ``tiny/u``
(:func:`underflow_scale`; 2e-31 for float32). Found in review: a float32 sigmoid unit
at ``z = -120`` has gradients near 1e-52, which float32 flushes to 0.

``k`` is the longest reduction that produced the value: the widest layer input
or output (forward ``h Wᵀ`` reduces over the input width, backward ``dz W`` over
the output width), the batch (``dW = dzᵀ h`` and ``db = Σ dz`` reduce over it) and,
for the loss, the ``batch · outputs`` elements of the mean.

Repeated examples. The ``√k`` model takes the rounding errors of a sum's terms as
independent. Identical terms round alike, and their errors add up: ``r`` of them in
one sum are off by up to ``(r-1)·u`` relative to their sum (recursive summation's
worst case, Higham 2002, §4.2), which ``√k`` falls short of once ``r`` passes about
``c·√k``. A batch that repeats one example ``r`` times puts ``r`` identical terms in
every sum over the batch (``dW = dzᵀ h`` in a BLAS kernel: 8,192 copies of one
example gave torch's float32 weight gradient an error of 1,900·u relative to the size
of its terms, against ``c·√k = 724``; 16 examples tiled 512 times each, 260·u; found
in review, ratio 1.95). So with ``r`` the most copies of one example in a batch
(:func:`repeated_examples`), the reduction's factor is ``c·√k + r`` (``c·√k`` when no
example repeats). Identical terms from other sources (a layer whose every unit is
dead, constant weights against constant inputs) are not counted.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from equiv._messages import value_error
from equiv.spec import UNIT_ROUNDOFF, MLPSpec, check_computable

#: Safety constant of the derived bound (see the module docstring).
SAFETY = 8.0
#: Roundings relative to ``|p|`` in one parameter update (see the module docstring).
UPDATE_ROUNDINGS = 3.0


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
    # The least S: below tiny/u a float no longer holds a value to u (underflow).
    floor: float = 0.0

    def __post_init__(self) -> None:
        for field in ("atol", "rtol", "scaled", "floor"):
            value = getattr(self, field)
            if not value >= 0:  # NaN fails too
                raise value_error(f"Tolerance {field} must be a non-negative number, got {value}")

    def allowed(self, expected_abs: float, scale: float) -> float:
        return self.atol + self.rtol * expected_abs + self.scaled * max(scale, self.floor)

    def describe(self) -> str:
        if self.derivation:
            return self.derivation
        return f"atol={self.atol:.3g}, rtol={self.rtol:.3g}"


#: What each symbol of a derivation (:attr:`Tolerance.derivation`) stands for, in
#: the order :func:`notation` lists them. Found in a user trial: ``u₆₄`` was
#: unexplained and ``max|x|`` read as the model's input.
_SYMBOLS = (
    (
        r"\(u₁\+u₂",
        "u₁, u₂: unit roundoff of each side's dtype (float32 5.96e-08, float64 1.11e-16)",
    ),
    ("u₆₄", "u₆₄: float64's (each side is held to its own float64 step)"),
    ("√", f"{SAFETY:g}·√k·(u₁+u₂)·s: k the longest sum's length, s the step"),
    (
        rf"(?<![√\d.]){UPDATE_ROUNDINGS:g}·\(",
        f"{UPDATE_ROUNDINGS:g}·(u₁+u₂)·s: the update's {UPDATE_ROUNDINGS:g} roundings, s the step",
    ),
    (r"max\|x\|", "max|x|: the leaf's largest magnitude, not the input"),
    (r"max\|p\|", "max|p|: the parameter's largest magnitude"),
)


def notation(derivations: Iterable[str]) -> list[str]:
    """What the symbols in ``derivations`` stand for, one entry per symbol present.

    >>> print(notation(["3·(u₁+u₂)·2·max|p|"])[0])
    u₁, u₂: unit roundoff of each side's dtype (float32 5.96e-08, float64 1.11e-16)
    >>> [entry.split(":")[0] for entry in notation(["3·(u₁+u₂)·2·max|p|"])]
    ['u₁, u₂', '3·(u₁+u₂)·s', 'max|p|']
    >>> notation(["8·√3·(u₁+u₂)·1·max|x|"])[1].split(":")[0]  # √3 is a sum's length
    '8·√k·(u₁+u₂)·s'
    >>> notation(["atol=0.1, rtol=0"])
    []
    """
    text = " ".join(derivations)
    return [entry for symbol, entry in _SYMBOLS if re.search(symbol, text)]


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
    spec: MLPSpec,
    batch_size: int,
    stage: str,
    step: int,
    dtypes: tuple[str, str],
    repeats: int = 1,
) -> Tolerance:
    """The bound for two results of ``stage`` at ``step`` computed in ``dtypes``, over
    batches in which one example occurs at most ``repeats`` times (see the module
    docstring). For ``"params"``, the updates' own rounding only: add what the
    gradients' errors carry with :func:`params_tolerance`.

    >>> tol = derived_tolerance(MLPSpec((4, 3, 2)), 2, "grads", 1, ("float32", "float32"))
    >>> round(tol.scaled / 2.0**-24, 6)  # 8 · √4 · (u + u) / u
    32.0
    >>> tol = derived_tolerance(MLPSpec((4, 3, 2)), 64, "grads", 1, ("float32", "float32"), 64)
    >>> round(tol.scaled / 2.0**-24, 6), tol.derivation  # (8 · √64 + 64) · (u + u) / u
    (256.0, '(8·√64 + 64 repeats)·(u₁+u₂)·1·max|x|')
    >>> derived_tolerance(MLPSpec((4, 3, 2)), 2, "params", 2, ("float32", "float32")).derivation
    '3·(u₁+u₂)·2·max|p|'
    """
    check_computable(spec, "derived_tolerance")
    for dtype in dtypes:
        check_computable(dtype, "derived_tolerance")
    u_sum = sum(UNIT_ROUNDOFF[d] for d in dtypes)
    floor = max(underflow_scale(d) for d in dtypes)
    if stage == "params":
        return Tolerance(
            scaled=UPDATE_ROUNDINGS * u_sum * step,
            derivation=f"{UPDATE_ROUNDINGS:g}·(u₁+u₂)·{step}·max|p|",
            floor=floor,
        )
    k = reduction_length(spec, batch_size, stage)
    factor, why = SAFETY * math.sqrt(k), f"{SAFETY:g}·√{k}"
    if repeats > 1:
        factor, why = factor + repeats, f"({why} + {repeats} repeats)"
    return Tolerance(
        scaled=factor * u_sum * step,
        derivation=f"{why}·(u₁+u₂)·{step}·max|x|",
        floor=floor,
    )


def repeated_examples(x: Any, y: Any) -> int:
    """The most times one example (a row of ``x`` with its label or target row of
    ``y``) occurs in the batch: 1 where every example differs.

    >>> repeated_examples(np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]]), np.array([0, 0, 0]))
    2
    >>> repeated_examples(np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([0, 1]))
    1
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) < 2:
        return len(x)
    # Rows compared as bytes (one void scalar each): 20 times faster than
    # np.unique(axis=0) on an 8,192 × 784 batch, and no float64 copy of it. Adding 0
    # turns -0.0 into 0.0, which the bytes would tell apart.
    _, xs = np.unique(_rows_as_bytes(x), return_inverse=True)
    _, ys = np.unique(_rows_as_bytes(y), return_inverse=True)
    pairs = xs.astype(np.int64) * (int(ys.max()) + 1) + ys
    return int(np.unique(pairs, return_counts=True)[1].max())


def _rows_as_bytes(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a.reshape(len(a), -1) + 0)
    return a.view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).ravel()


def underflow_scale(dtype: str) -> float:
    """``tiny/u``: below it a value's rounding error is no longer ``u`` times the value
    but up to ``tiny``, the smallest normal number (flushed to zero, as XLA does on
    the CPU), so a derived bound takes ``max|x|`` no smaller than this.

    >>> f"{underflow_scale('float32'):.3g}"
    '1.97e-31'
    """
    return float(np.finfo(dtype).tiny) / UNIT_ROUNDOFF[dtype]


def params_tolerance(base: Tolerance, update_sizes: list[float], rate: float) -> Tolerance:
    """Add the carried update errors to a derived ``"params"`` bound at step ``s``.

    ``update_sizes[t-1]`` is ``max|p_t - p_{t-1}|`` of the leaf for ``t = 1..s`` and
    ``rate`` the relative error of one step's gradient, ``c·√k·(u₁+u₂)`` (the
    ``"grads"`` bound's ``scaled`` at step 1); see the module docstring.

    >>> grads = derived_tolerance(MLPSpec((4, 3, 2)), 2, "grads", 1, ("float32", "float32"))
    >>> tol = derived_tolerance(MLPSpec((4, 3, 2)), 2, "params", 2, ("float32", "float32"))
    >>> extra = params_tolerance(tol, [1.0, 0.5], grads.scaled)
    >>> round(extra.atol / grads.scaled, 6)  # c·√k·(u₁+u₂)·(1·1.0 + 2·0.5)
    2.0
    """
    carried = rate * sum(t * size for t, size in enumerate(update_sizes, start=1))
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


@dataclasses.dataclass
class OptimizerBounds:
    """Absolute bounds for the optimizer's state and the extra parameter error,
    per 1-based step: ``state[step][state name][param]``, ``params_atol[step][param]``
    and, for Adam and AdamW, ``params_slack[step][param]`` per element."""

    state: dict[int, dict[str, dict[str, float]]]
    params_atol: dict[int, dict[str, float]]
    params_slack: dict[int, dict[str, np.ndarray]]


def optimizer_bounds(
    optimizer: Any,
    grad_bounds: list[dict[str, float]],
    grad_max: list[dict[str, float]],
    param_bounds: list[dict[str, float]],
    states: list[dict[str, dict[str, np.ndarray]]],
    unit_roundoff: float,
    first_step_each: tuple[
        dict[str, np.ndarray], dict[str, np.ndarray], float, dict[str, np.ndarray]
    ]
    | None = None,
    fresh: bool = False,
    first: int = 1,
) -> OptimizerBounds:
    r"""Carry the gradient bound through the optimizer (module docstring, "Optimizers").

    Args:
      optimizer: an :class:`equiv.optimizers.OptimizerSpec`.
      grad_bounds: per step, per leaf, the allowed gradient difference ``G_t``.
      grad_max: per step, per leaf, ``max|g_t|`` (float64 reference) of the gradient
        the moments take: ``g + λ·p`` under Adam's L2 ``weight_decay``.
      param_bounds: per step, per leaf, the rounding part of the parameters' bound.
      states: per step, the float64 optimizer state after the step (Adam's ``m, v``).
      unit_roundoff: ``u₁ + u₂`` of the pair (for Adam's bias corrections).
      first_step_each: for Adam and AdamW, per leaf and element at step 1, the bound
        on the gradient's difference and the size ``|g|`` (of the gradient the moments
        take, ``|g| + λ·|p|`` under L2): Adam divides each element by its own ``√v``,
        so step 1's update bound follows each element (``δg_e`` and ``|g_e|`` in place
        of ``G`` and ``max|g|``); the third item, the smallest normal number of the
        dtypes, bounds ``v``'s underflow; the fourth, per element, the float64 value
        ``|g + λ·p|`` itself, at which :func:`adam_first_update_slack` is taken. What
        step 1 carries to later steps, and their bounds, stay the leaf's, as do the
        state's bounds.
      fresh: each step's bound alone, as if it started from exact parameters and
        state: for a backend held to the float64 step taken from its own parameters
        and state, where nothing earlier steps left is in the difference.
      first: the step the lists start at (``fresh`` only: one step's bound needs that
        step's entries alone).

    >>> from equiv.optimizers import OptimizerSpec
    >>> b = optimizer_bounds(OptimizerSpec("sgd", learning_rate=0.5, momentum=0.5),
    ...                      [{"w": 1.0}, {"w": 1.0}], [{"w": 1.0}] * 2, [{"w": 0.0}] * 2,
    ...                      [{}, {}], 2.0**-24)
    >>> b.state[2]["momentum_buffer"]["w"], b.params_atol[2]["w"]  # 0.5·1 + 1; 0.5·(1 + 1.5)
    (1.5, 1.25)
    """
    lr, wd = optimizer.learning_rate, optimizer.weight_decay
    names = list(grad_bounds[0]) if grad_bounds else []
    out = OptimizerBounds({}, {}, {})
    b1, b2 = optimizer.betas
    buf = {n: 0.0 for n in names}
    m_b, v_b, vmax_b = dict(buf), dict(buf), dict(buf)
    carried = {n: 0.0 for n in names}
    carried_el: dict[str, Any] = {n: 0.0 for n in names}
    if first != 1 and not fresh:
        raise value_error("optimizer_bounds: first != 1 needs fresh=True (errors carry)")
    for t in range(first, first + len(grad_bounds)):
        i = t - first  # the lists' index of step t
        if fresh:  # the step starts from its own exact parameters and state
            buf = dict.fromkeys(names, 0.0)
            m_b, v_b, vmax_b, carried, carried_el = (dict(buf) for _ in range(5))
        prev_p = {
            n: (param_bounds[i - 1][n] + carried[n]) if t > 1 and not fresh else 0.0 for n in names
        }
        ge = {
            n: grad_bounds[i][n] + (wd * prev_p[n] if optimizer.name != "adamw" else 0.0)
            for n in names
        }
        state: dict[str, dict[str, float]] = {}
        if optimizer.name == "sgd":
            mu, tau = optimizer.momentum, optimizer.dampening
            if mu != 0:
                buf = {n: ge[n] if t == 1 else mu * buf[n] + abs(1 - tau) * ge[n] for n in names}
                state["momentum_buffer"] = dict(buf)
                direction = {n: ge[n] + mu * buf[n] for n in names} if optimizer.nesterov else buf
            else:
                direction = ge
            carried = {n: carried[n] + lr * direction[n] for n in names}
            out.params_atol[t] = dict(carried)
        else:
            m_b = {n: b1 * m_b[n] + (1 - b1) * ge[n] for n in names}
            v_b = {
                n: b2 * v_b[n] + (1 - b2) * (2 * grad_max[i][n] * ge[n] + ge[n] ** 2) for n in names
            }
            state["exp_avg"], state["exp_avg_sq"] = dict(m_b), dict(v_b)
            if optimizer.amsgrad:
                vmax_b = {n: max(vmax_b[n], v_b[n]) for n in names}
                state["max_exp_avg_sq"] = dict(vmax_b)
            second_b = vmax_b if optimizer.amsgrad else v_b
            ref = states[i]
            second = ref["max_exp_avg_sq" if optimizer.amsgrad else "exp_avg_sq"]
            decay = abs(1 - lr * wd) if optimizer.name == "adamw" else 1.0
            slack = {}
            for n in names:
                e = adam_update_slack(
                    optimizer, t, ref["exp_avg"][n], second[n], m_b[n], second_b[n], unit_roundoff
                )
                carried_el[n] = decay * carried_el[n] + e
                slack[n] = carried_el[n]
                carried[n] = float(np.max(carried_el[n], initial=0.0))
                if first_step_each is not None and t == 1:
                    # Step 1 alone is held to the per-element bound. What it carries to
                    # later steps stays the leaf's: a step-1 difference moves the next
                    # gradients, and Adam turns that into up to 2·lr where a gradient
                    # element is small (a tanh run at lr 1.4 saturated by inputs of 500
                    # failed its step 2 with the per-element bound carried; found in
                    # review). Later steps' bounds are the leaf-wide ones.
                    each, size, underflow, value = first_step_each
                    m_el = (1 - b1) * each[n]
                    v_el = (1 - b2) * (2 * size[n] * each[n] + each[n] ** 2) + underflow
                    apart = adam_update_slack(
                        optimizer, 1, ref["exp_avg"][n], second[n], m_el, v_el, unit_roundoff
                    )
                    # Where v cannot underflow, step 1's m and v come from one gradient:
                    # the update is a function of it alone (adam_first_update_slack).
                    safe = (1 - b2) * (value[n] - each[n]) ** 2 >= underflow
                    one = adam_first_update_slack(optimizer, value[n], each[n], unit_roundoff)
                    slack[n] = np.where(safe, np.minimum(one, apart), apart)
            out.params_slack[t] = slack
            out.params_atol[t] = {n: 0.0 for n in names}
        out.state[t] = state
    return out


def adam_first_update_slack(
    optimizer: Any, size: np.ndarray, bound: np.ndarray, unit_roundoff: float
) -> np.ndarray:
    r"""Per-element bound on how much two Adam updates at step 1 may differ, where each
    backend's gradient is within ``bound`` of the float64 one, of size ``|g| = size``.

    At step 1 ``m̂ = g`` and ``v̂ = g²`` (the bias corrections undo the betas), so the
    update is ``γ·f(g)``, ``f(g) = g/(|g| + ε)``, one odd and increasing function of
    one gradient: two gradients within ``δ`` of ``g`` give updates within
    ``γ·(F(|g| + δ) - f(|g| - δ))``, ``F(a) = a/(a + ε)``, plus the rounding of the
    few operations that compute it (8 of them, and the bias corrections' ``ρ`` of
    :func:`adam_update_slack`) relative to the update. :func:`adam_update_slack` bounds
    ``m`` and ``v`` apart, which cannot see that their errors cancel in ``m̂/√v̂``:
    ``2γ·δ/|g|``, where this is ``γ·ε·2δ/|g|²`` for ``|g| ≫ ε``. That slack let
    optax's default AdamW decay for torch's pass (found in a user trial). Only where
    ``v`` cannot underflow: a flushed ``v`` is another function.

    >>> import numpy as np
    >>> from equiv.optimizers import OptimizerSpec
    >>> spec = OptimizerSpec("adam", learning_rate=0.1)  # ε = 1e-8
    >>> e = adam_first_update_slack(spec, np.array([1e-3, 1e-9]), np.array([1e-9, 2e-9]), 0.0)
    >>> f"{e[0]:.3g}"  # |g| ≫ ε: γ·ε·2δ/|g|² (m and v bounded apart: 2γ·δ/|g| = 2e-7)
    '2e-12'
    >>> round(float(e[1]), 4)  # |g| < δ: the sign may flip, γ·(3/13 + 1/11)
    0.0322
    """
    lr, eps, (b1, b2) = optimizer.learning_rate, optimizer.eps, optimizer.betas
    a = np.abs(np.asarray(size, np.float64))
    d = np.abs(np.asarray(bound, np.float64))

    def unit(z):  # z/(z + ε) for z ≥ 0, 0 at 0 (ε = 0 included)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(z > 0, z / (z + eps), 0.0)

    low = a - d
    spread = unit(a + d) - np.sign(low) * unit(np.abs(low))
    rho = _bias_correction_rounding(b1, b2, 1, unit_roundoff)
    return lr * (spread + unit(a + d) * (rho + 8 * unit_roundoff))


def _bias_correction_rounding(b1: float, b2: float, step: int, unit_roundoff: float) -> float:
    """``ρ``, the relative error of Adam's update from its bias corrections computed in
    the backend's precision: ``2·t·u·(β₁ᵗ/(1 - β₁ᵗ) + ½·β₂ᵗ/(1 - β₂ᵗ))`` (β rounded,
    then ``1 - βᵗ`` cancels; see :func:`adam_update_slack`)."""
    c1, c2 = 1 - b1**step, 1 - b2**step
    return 2 * step * unit_roundoff * (b1**step / c1 + 0.5 * b2**step / c2)


def adam_bound_ratio(beta1: float, beta2: float, step: int) -> float:
    r"""``R_t ≥ |m̂_t| / √v̂_t`` for any gradients (Cauchy-Schwarz on the two sums):
    ``(1-β₁)/(1-β₁ᵗ)·√(1-β₂ᵗ)·√(Σ_{k<t} β₁^{2k} / ((1-β₂)·β₂ᵏ))``; 1 at step 1.

    With ``β₂ = 0`` (torch takes any β in [0, 1)) ``v̂`` forgets every gradient but the
    last, and an earlier one in ``m̂`` can be any multiple of it: no bound (found in
    review, a ZeroDivisionError), unless ``β₁ = 0`` too.

    >>> adam_bound_ratio(0.9, 0.999, 1)
    1.0
    >>> adam_bound_ratio(0.9, 0.0, 2), adam_bound_ratio(0.0, 0.0, 2)
    (inf, 1.0)
    """
    terms = []
    for k in range(step):
        if beta2**k == 0.0:  # k ≥ 1 at β₂ = 0: a past gradient that v̂ no longer holds
            terms.append(0.0 if beta1 == 0.0 else math.inf)
        else:
            terms.append(beta1 ** (2 * k) / ((1 - beta2) * beta2**k))
    return (1 - beta1) / (1 - beta1**step) * math.sqrt((1 - beta2**step) * sum(terms))


def adam_update_slack(
    optimizer: Any,
    step: int,
    m: np.ndarray,
    v: np.ndarray,
    m_bound: float,
    v_bound: float,
    unit_roundoff: float,
) -> np.ndarray:
    r"""Per-element bound on how much two Adam updates ``γ·m̂/(√v̂ + ε)`` may differ.

    ``m, v`` are the float64 moments after ``step`` (``v`` the max for AMSGrad),
    ``m_bound, v_bound`` the bounds on their differences, ``unit_roundoff`` the
    pair's ``u₁ + u₂``. With ``s = √v̂`` and ``δs = min(δv̂/(2s), √δv̂)`` (√ is
    ½-Hölder, so the second holds even at ``s = 0``)::

        γ·[δm̂/(s' + ε) + |m̂|·δs/(s' + ε)² + |m̂|/(s + ε)·(ρ₁ + ρ₂/2)],  s' = max(s - δs, 0)

    ``ρ_i = 2·t·u·βᵢᵗ/(1 - βᵢᵗ)`` is the relative error of a bias correction computed
    in the backend's precision (β rounded, then ``1 - βᵗ`` cancels:
    ``optax.scale_by_adam`` in float32). Capped at ``2·γ·R_t``
    (:func:`adam_bound_ratio`): each update is at most ``γ·R_t``. Where ``|g| ≫ ε``
    the sensitivity is ``γ·ε/(|g| + ε)²·δg`` at step 1: negligible; where a gradient
    entry sits at rounding level, the update may legitimately differ by up to ``2γ``.

    >>> import numpy as np
    >>> from equiv.optimizers import OptimizerSpec
    >>> spec = OptimizerSpec("adam", learning_rate=0.1)
    >>> e = adam_update_slack(spec, 1, np.array([1e-9]), np.array([1e-18]), 1e-6, 1e-12, 0.0)
    >>> float(e[0]) == 2 * 0.1  # a gradient at rounding level: capped at 2·lr
    True
    """
    lr, eps, (b1, b2) = optimizer.learning_rate, optimizer.eps, optimizer.betas
    c1, c2 = 1 - b1**step, 1 - b2**step
    m_hat = np.abs(np.asarray(m, np.float64)) / c1
    s = np.sqrt(np.maximum(np.asarray(v, np.float64), 0.0) / c2)
    dm, dv = m_bound / c1, v_bound / c2
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(dv)
        ds = np.where(s > 0, np.minimum(dv / (2 * s), root), root)
    low = np.maximum(s - ds, 0.0) + eps
    rho = _bias_correction_rounding(b1, b2, step, unit_roundoff)
    # Each update is at most γ·R_t, computed: its bias corrections and few operations
    # round too (found in review: optax's float32 1 - 0.9999 put an update at
    # γ·(1 + 8.3e-5), and two of opposite signs 2γ·(1 + 4e-5) apart, past a cap of 2γ).
    cap = 2 * lr * adam_bound_ratio(b1, b2, step) * (1 + rho + 8 * unit_roundoff)
    with np.errstate(divide="ignore", invalid="ignore"):  # ε = 0 and v̂ within δv̂ of 0
        e = lr * (dm / low + m_hat * ds / (low * low) + m_hat / (s + eps) * rho)
    return np.where(np.isnan(e), cap, np.minimum(e, cap))  # 0/0: any update at all
