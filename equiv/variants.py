"""Known porting mistakes, computed rather than guessed.

A port that computes another model than torch's, or a hand-written backward pass that
differentiates it wrongly, leaves a step-1 loss and gradients that are exactly those of
the mistaken computation. Each known mistake is therefore *computed*, in float64 by the
hand-derived pass of :mod:`equiv.manual`, and named only when a backend's step 1 is that
mistake's, in the loss and in every gradient (:func:`matching_variant`). A guess from the
size of a difference alone named the tanh GELU for a forgotten transpose (found in a user
trial); a match of the loss alone named a weight scaled by 1.05 a missing bias (found in
review).

Three families (:func:`variants`):

* mistakes in the loss, the model's forward pass and backward from the loss's gradient
  on (:func:`loss_variants`), each offered only where its loss is the backend's, which
  costs no pass: an output of width 1 broadcast against its targets, (N, 1) against
  (N,), every output against every target; probabilities for logits (softmax before
  cross-entropy, sigmoid before binary cross-entropy with logits); the loss of part of
  the batch (``x[:-1]``, ``x[1:]``) or of targets one row off;
* mistakes in the model (:func:`model_variants`): the other GELU, a square weight used
  transposed, a nonzero bias left out, neighbouring layers swapped, label smoothing left
  out or another ε (fitted), another activation in place of the model's, another leaky
  ReLU slope or ELU alpha (JAX's default, or fitted: :class:`Fit`), an activation left
  out, the activations in another order;
* mistakes in a hand-written backward pass, the forward pass and loss untouched
  (:func:`backward_variants`): an activation's slope left out, a ReLU mask for a leaky
  ReLU's or ELU's, the slope taken on the other side of the kink, at the upstream
  gradient, at the output ``h`` instead of ``z``, or another layer's; the value ``h`` in
  its place; an output-form slope (``1 - h²``) fed ``z``; a weight gradient built from
  the wrong input (``z`` for ``h``, or another layer's); cross-entropy's gradient
  without the targets, or without the smoothing the loss has; a square weight
  transposed in the chain; a square weight's gradient reported transposed.

Each is computed with kinked units near 0 on either side where a backend's rounding may
have put them (:func:`matching_variant`, ``unit_roundoff``).

>>> import numpy as np
>>> from equiv import MLPSpec, manual
>>> spec = MLPSpec((3, 3, 1), dtype="float64")
>>> rng = np.random.default_rng(0)
>>> params = {"fc1.weight": rng.normal(size=(3, 3)), "fc1.bias": rng.normal(size=3),
...           "fc2.weight": rng.normal(size=(1, 3)), "fc2.bias": rng.normal(size=1)}
>>> x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 1))
>>> def no_mask(k, dh, zs, acts):
...     return np.ones_like(dh)
>>> loss, grads = manual.miswritten_loss_and_grads(params, x, y, spec, slope_of=no_mask)
>>> print(matching_variant(spec, params, x, y, {"loss": loss, **grads}).split(":")[0])
leaves out relu's slope (the mask z > 0) after fc1 in the backward pass
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from equiv import manual
from equiv.activations import ACTIVATIONS
from equiv.kinks import preactivation_bounds
from equiv.losses import LOSSES
from equiv.spec import UNIT_ROUNDOFF, MLPSpec

#: Floating-point operations the variants may spend: 7e10, about 2 s of float64
#: forward and backward passes on a 2-core machine (33 GFLOP/s measured for a
#: 784-1024-1024-10 model at batch 256: 24 passes, its 21 tier-1 variants and 3 more; a
#: 100M-parameter model at batch 32 gets 3). 2e10 reached 6 of that model's, none of the
#: backward's but two (found in review).
VARIANT_FLOPS = 7e10
#: Step-1 values further than this from the model's (relative, greatest over the loss
#: and every gradient, :func:`tree_distance`) are looked into: a thousand unit
#: roundoffs, beyond what rounding gives at step 1 in all but very deep or wide models.
VARIANT_NOISE = {dtype: 1e3 * u for dtype, u in UNIT_ROUNDOFF.items()}
#: A variant explains a run whose step-1 values are this near its own (and ten times
#: nearer than the model's): far above float32 rounding, far below what the variants
#: change (1e-4 relative for the GELUs, O(1) for the others).
VARIANT_MATCH = 1e-5

Tree = Mapping[str, np.ndarray]


def _same(grads: dict) -> dict:
    return grads


@dataclasses.dataclass(frozen=True)
class Variant:
    """One known mistake: ``what`` the mistaken code does (a phrase after the backend's
    name) and ``advice`` on the fix ("" for none); the model it computes (``spec`` and
    ``params``, with its backward pass written wrong as ``miswritten`` says: keyword
    arguments of :func:`equiv.manual.miswritten_loss_and_grads`), and how such code
    reports its gradients (``reported``)."""

    what: str
    advice: str
    spec: MLPSpec
    params: Mapping[str, np.ndarray]
    reported: Callable[[dict], dict] = _same
    miswritten: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: 1: a mistake made everywhere, or at one site; 2: one made everywhere, here at
    #: one layer only (tried after every tier-1 variant: the flop budget may end first).
    tier: int = 1
    #: The batch as the mistaken code sees it, ``(x, y) -> (x, y)`` (None: as given).
    batch: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None

    def step_one(self, x, y, masks=None) -> dict[str, np.ndarray]:
        """The float64 step-1 loss (under ``"loss"``) and gradients, as reported;
        ``masks`` forces the side of kinked units (:func:`equiv.manual.loss_and_grads`)."""
        if self.batch is not None:
            x, y = self.batch(x, y)
        values = _step_one(self.spec, self.params, x, y, masks=masks, **self.miswritten)
        return {"loss": values.pop("loss"), **self.reported(values)}


@dataclasses.dataclass(frozen=True)
class Fit:
    """A known mistake with a value left free (another leaky ReLU slope), found by
    fitting it: ``find(theirs, own, passes)`` spends at most ``passes`` float64 passes
    (each counted in :data:`VARIANT_FLOPS`) and returns ``(variant, passes spent)``,
    the variant None where no value fits ``theirs`` (a backend's step-1 loss under
    ``"loss"`` and gradients; ``own`` the model's)."""

    what: str
    find: Callable[[Tree, Tree, int], tuple[Variant | None, int]]
    tier: int = 1


def matching_variant(
    spec: MLPSpec,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    theirs: Tree,
    *,
    noise: float = 0.0,
    backward_first: bool = False,
    unit_roundoff: float = 0.0,
    layout: str | None = None,
) -> str | None:
    """Which known mistake (:func:`variants`) a backend's step 1 is, as a hint, or
    None: ``theirs`` (its loss under ``"loss"`` and its gradients) must be within
    :data:`VARIANT_MATCH` of the mistake's, relative, in the loss and every gradient,
    and ten times nearer than the model's. Steps within ``noise`` of the model's are
    not looked into. ``backward_first``: try a hand-written backward's mistakes before
    the model's (for a big model the flop budget may reach only the first few).
    ``unit_roundoff``: the backend's; a unit of a kinked activation whose pre-activation
    it may round to the other side of 0 (:func:`equiv.kinks.preactivation_bounds`) is
    tried on that side too, as the backend may have computed it. ``layout``: the
    backend's parameter layout, where known (the advice for a transpose names it)."""
    own, output = _model_step(spec, params, x, y)
    apart = tree_distance(theirs, own)
    if not apart > noise:
        return None  # step 1 is the model's, up to rounding: no variant to look for
    # Each pass costs a float64 forward and backward pass of the first batch; at most
    # VARIANT_FLOPS of them in all (a few seconds), the likeliest variants first.
    cost = 6.0 * x.shape[0] * sum(v.size for v in params.values())
    budget = max(1, int(VARIANT_FLOPS // max(cost, 1.0)))

    def attempt(variant: Variant, masks=None, flipped: int = 0):
        """One pass: ``(match or None, distance)``. The loss and every gradient must be
        the variant's (a single scalar matched by chance: a scaled weight was named a
        missing bias in a deep model, in review)."""
        other = variant.step_one(x, y, masks)
        near = tree_distance(theirs, other)
        found = near <= VARIANT_MATCH and near * 10 <= apart
        return ((variant, other, near, flipped) if found else None), near

    matches = []
    nearest: tuple[float, Variant | None] = (math.inf, None)  # for _partial_hint
    float64_run = 0 < unit_roundoff <= UNIT_ROUNDOFF["float64"]
    for variant in variants(
        spec, params, x, y, backward_first, theirs, output, float64_run, layout
    ):
        if budget <= 0:
            break
        if isinstance(variant, Fit):
            # Its passes are the budget's too; one is left for the attempt.
            variant, spent = variant.find(theirs, own, budget - 1)
            budget -= spent
            if variant is None or budget <= 0:
                continue
        budget -= 1
        found, near = attempt(variant)
        nearest = min(nearest, (near, variant), key=lambda pair: pair[0])
        if found is None and unit_roundoff and near * 10 <= apart:
            # Near, not matched: units at a kink may explain the rest.
            for masks, flipped in _flips(variant, x, unit_roundoff):
                if budget <= 0:
                    break
                budget -= 1
                found, flipped_near = attempt(variant, masks, flipped)
                nearest = min(nearest, (flipped_near, variant), key=lambda pair: pair[0])
                if found is not None:
                    break
        if found is not None:
            matches.append(found)
    if not matches:
        near, variant = nearest
        return _partial_hint(variant, near, apart) if near * PARTIAL_MATCH <= apart else None
    # Every match is named: two mistakes may give the same step on this batch (tanh's
    # slope taken at a small dh is 1 - dh² ≈ 1, the slope left out; a layer whose
    # units are all active hides a mask on either side: found in review).
    (variant, other, near, flipped), rest = matches[0], [m[0].what for m in matches[1:]]
    also = f" (or, the same on this batch: {'; '.join(rest)})" if rest else ""
    kink = (
        f", with {flipped} unit{'s' if flipped > 1 else ''} at a kink on the other side of 0, "
        "where the backend's rounding may put it"
        if flipped
        else ""
    )
    loss = float(theirs["loss"])
    advice = f" {variant.advice}." if variant.advice else ""
    if f"{float(other['loss']):.9g}" == f"{float(own['loss']):.9g}":
        # One loss printed three times said nothing (found in a user trial: "its loss
        # 0.399520713 ... (loss 0.399520713, ...), not the model's (loss 0.399520713,
        # ...)"). A backward's mistake leaves it as it is, to the bit; a forward's (x
        # rounded to float32) moves it beyond the digits shown (found in review).
        same = (
            "the same either way"
            if float(other["loss"]) == float(own["loss"])
            else "the model's to the 9 digits shown"
        )
        return (
            f"{variant.what}{also}: its step-1 gradients are the float64 ones of the model "
            f"computed that way{kink} (within {near:.2g} relative), not the model's (up to "
            f"{apart:.2g} relative away); the loss, {loss:.9g}, is {same}.{advice}"
        )
    return (
        f"{variant.what}{also}: its step-1 loss {loss:.9g} and gradients are the float64 "
        f"ones of the model computed that way{kink} (loss {float(other['loss']):.9g}, "
        f"gradients within {near:.2g} relative), not the model's (loss "
        f"{float(own['loss']):.9g}, gradients up to {apart:.2g} relative away).{advice}"
    )


#: A variant whose step 1 is this many times nearer the backend's than the model's is
#: named as most of the difference where none matches (two mistakes at once, found in
#: review: a transposed square weight beside GELU's tanh approximation, 5800 times
#: nearer, named neither). Not less: a leaky ReLU in one layer of ten, the others'
#: units mostly open, is 255 times nearer "leaky ReLU in every layer" (seed 19 of
#: tests/test_detection.py::test_a_mistake_outside_the_variants_is_not_named_one, the
#: most of its 40 cases; a weight scaled by 1.05, 21).
PARTIAL_MATCH = 1000.0


def _partial_hint(variant: Variant | None, near: float, apart: float) -> str | None:
    """The hint for a variant that explains most of a step, not all of it, or None.

    >>> v = Variant("uses fc1.weight transposed", "", MLPSpec((2, 2)), {})
    >>> print(_partial_hint(v, 3.2e-4, 1.86)[:89])
    uses fc1.weight transposed, and something more: its step-1 loss and gradients are 0.00032
    """
    if variant is None:
        return None
    advice = f" {variant.advice}." if variant.advice else ""
    return (
        f"{variant.what}, and something more: its step-1 loss and gradients are {near:.2g} "
        f"relative from the float64 ones of the model computed that way, {apart:.2g} from the "
        f"model's ({apart / near:.3g} times nearer, not within the {VARIANT_MATCH:g} of one "
        f"mistake alone): that mistake, and a smaller one beside it.{advice} Once it is "
        "fixed, compare again: the rest is named then where it is a known mistake."
    )


#: The kinked units nearest 0 (relative to the backend's rounding bound) tried on
#: the other side: each alone, then all together.
_MAX_FLIPS = 4


def _flips(variant: Variant, x, unit_roundoff: float):
    """``(masks, units flipped)`` for computing ``variant`` with units of a kinked
    activation on the other side of 0, where the backend's rounding may have put them
    (:func:`equiv.kinks.preactivation_bounds`): the nearest to 0 first, each alone, then
    together (found in review: one ReLU unit at z = -2.8e-8 in float64, +4.2e-9 in JAX's
    float32, hid a forgotten transpose; 17 units lay within the bound)."""
    spec = variant.spec
    kinked = [ACTIVATIONS[a].has_kink(ACTIVATIONS[a].param(spec)) for a in spec.activations]
    if not any(kinked):
        return
    zs, bounds = preactivation_bounds(variant.params, x, spec, unit_roundoff)
    candidates = []  # (|z| / bound, layer, unit)
    for layer, (z, e, kink) in enumerate(zip(zs[:-1], bounds[:-1], kinked, strict=True)):
        if kink:
            for unit in zip(*np.nonzero(np.abs(z) <= e), strict=True):
                candidates.append((float(abs(z[unit]) / e[unit]), layer, unit))
    nearest = sorted(candidates)[:_MAX_FLIPS]
    sides = [z > 0 for z in zs[:-1]]

    def flipped(units) -> list[np.ndarray]:
        masks = [side.copy() for side in sides]
        for _, layer, unit in units:
            masks[layer][unit] = ~masks[layer][unit]
        return masks

    for one in nearest:
        yield flipped([one]), 1
    if len(nearest) > 1:
        yield flipped(nearest), len(nearest)


def tree_distance(a: Tree, b: Tree) -> float:
    """The greatest over the leaves of ``max|a - b| / max|b|`` (0 where both are 0).

    >>> tree_distance({"w": np.array([1.0, 2.5])}, {"w": np.array([1.0, 2.0])})
    0.25
    """
    worst = 0.0
    for name, expected in b.items():
        e = np.asarray(expected, np.float64)
        diff = float(np.max(np.abs(np.asarray(a[name], np.float64) - e), initial=0.0))
        scale = float(np.max(np.abs(e), initial=0.0))
        worst = max(worst, diff / scale if scale else (math.inf if diff else 0.0))
    return worst


def variants(
    spec: MLPSpec,
    params: dict[str, np.ndarray],
    x,
    y,
    backward_first: bool = False,
    loss: float | Tree | None = None,
    output: np.ndarray | None = None,
    float64_run: bool = False,
    layout: str | None = None,
) -> Iterator[Variant | Fit]:
    """Every known mistake for this model and batch, the likeliest first: the loss's
    mistakes that give the backend's loss, then each family's tier-1 variants, then
    the tier-2 ones (a mistake made everywhere, at one layer).
    ``loss``: the backend's step-1 loss, or its loss (under ``"loss"``) and gradients,
    to fit what a mistake leaves free (the label smoothing's ε) and to pass over the
    loss's mistakes whose loss it is not (:func:`loss_variants`); ``output``: the
    model's float64 output on ``x``, where known (computed here otherwise);
    ``float64_run``: the backend ran in float64, where inputs rounded to float32 are a
    mistake a step can show (:func:`float32_inputs_variants`, tried last)."""
    families = [
        # A hand-written backward's check (backward_first) is told in its terms.
        model_variants(spec, params, x, y, loss, by_hand=backward_first, layout=layout),
        backward_variants(spec, params, x, y),
    ]
    ordered = [v for family in (families[::-1] if backward_first else families) for v in family]
    ordered = [*loss_variants(spec, params, x, y, loss, output), *ordered]
    if float64_run:
        ordered += float32_inputs_variants(spec, params, x, y, by_hand=backward_first)
    return iter(sorted(ordered, key=lambda v: v.tier))  # stable: the order within a tier


def _model_step(spec: MLPSpec, params, x, y) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`_step_one` of the model, and its output, from the same pass."""
    outputs = []

    def keep(out, y_, dz):
        outputs.append(out)
        return dz

    return _step_one(spec, params, x, y, output_grad=keep), outputs[0]


def _step_one(spec: MLPSpec, params, x, y, masks=None, **miswritten) -> dict[str, np.ndarray]:
    with np.errstate(all="ignore"):
        if miswritten:
            loss, grads = manual.miswritten_loss_and_grads(
                params, x, y, spec, masks=masks, **miswritten
            )
        else:
            loss, grads = manual.loss_and_grads(params, x, y, spec, masks)
    return {"loss": np.asarray(loss), **grads}


def _transpose_advice(layout: str | None, by_hand: bool) -> str:
    """What a square weight used transposed means in ``layout``'s terms (found in a
    user trial: an Equinox port was told about Flax's kernels).

    >>> print(_transpose_advice("equinox", False).split(": ")[1])
    torch and Equinox both hold W (out, in) and compute x @ W.T (W @ x per example), not x @ W
    """
    head = "A square weight hides a forgotten transpose: "
    if by_hand:
        return head + (
            "torch computes x @ W.T with W (out, in); the weight's gradient is then dz.T @ h"
        )
    if layout == "equinox":
        return head + (
            "torch and Equinox both hold W (out, in) and compute x @ W.T (W @ x per "
            "example), not x @ W"
        )
    if layout == "torch":
        return head + "the torch layout holds W (out, in), used as x @ W.T, not x @ W"
    kernel = "an nnx kernel" if layout == "nnx" else "a Flax kernel"
    return head + (
        f"torch computes x @ W.T with W (out, in), while {kernel} is (in, out) and used as "
        "x @ kernel"
    )


_GELU_SWAP = {"gelu": "gelu_tanh", "gelu_tanh": "gelu"}
_GELU_ADVICE = (
    "torch.nn.GELU() is exact (erf) and nn.GELU(approximate='tanh') is not; jax.nn.gelu "
    "defaults to approximate=True: use jax.nn.gelu(x, approximate=False) for the exact one"
)
#: The same for a hand-written forward and backward (found in a user trial: a
#: hand-written backward's hints named JAX's and optax's functions).
_GELU_BY_HAND = (
    "torch.nn.GELU() is exact, x·Φ(x) with Φ(x) = ½(1 + erf(x/√2)), and "
    "nn.GELU(approximate='tanh') is ½x(1 + tanh(√(2/π)(x + 0.044715x³))): use the model's "
    "in the forward and its derivative in the backward"
)


def _fitted_smoothing(observed: Tree, at_zero: Tree, at_one: Tree) -> float | None:
    """The label smoothing ε in (0, 1] whose step-1 loss and gradients, ``at_zero +
    ε·(at_one - at_zero)`` (cross-entropy's are affine in ε), best fit ``observed``'s
    (:func:`_affine_fit`), rounded to the fewest significant digits (up to 6) that move
    them by at most a tenth of :data:`VARIANT_MATCH`; or None. Fitted to the loss
    alone, a float32 loss put ε = 0.1 at 0.09988 where the loss barely depends on it
    (a 784-128-10 model at initialisation: 0.0094 per unit of ε), and its gradients
    missed by 1e-3 (found in a user trial).

    >>> zero, one = {"loss": np.array(2.0), "w": np.array([1.0, -1.0])}, {
    ...     "loss": np.array(2.5), "w": np.array([0.0, 1.0])}
    >>> seen = {"loss": np.array(2.05 + 1e-7), "w": np.array([0.9, -0.8])}
    >>> _fitted_smoothing(seen, zero, one)
    0.1
    """
    fit = _affine_fit(observed, at_zero, at_one)
    if fit is None or not 0 < fit[0] <= 1:
        return None
    rounded = _rounded(*fit)
    return rounded if 0 < rounded <= 1 else None


def _affine_fit(observed: Tree, at_zero: Tree, at_one: Tree) -> tuple[float, float] | None:
    """``(s, slope)``: the ``s`` whose ``at_zero + s·(at_one - at_zero)`` best fits
    ``observed`` (least squares over the loss and every gradient, each leaf relative to
    its size), and how far the leaves move per unit of ``s`` relative to their size
    there (:func:`tree_distance`'s measure); None where nothing moves."""
    num = den = 0.0
    pairs = []
    for name, value in observed.items():
        if name not in at_zero:
            return None
        v0, v1 = (np.asarray(t[name], np.float64) for t in (at_zero, at_one))
        scale = max(float(np.max(np.abs(v0), initial=0.0)), float(np.max(np.abs(v1), initial=0.0)))
        if not (scale > 0 and math.isfinite(scale)):
            continue
        d = (v1 - v0) / scale
        num += float(np.vdot((np.asarray(value, np.float64) - v0) / scale, d))
        den += float(np.vdot(d, d))
        pairs.append((v0, v1 - v0))
    if not (den > 0 and math.isfinite(num)):
        return None
    fitted = num / den
    sizes = [float(np.max(np.abs(v0 + fitted * d), initial=0.0)) for v0, d in pairs]
    slope = max(
        (float(np.max(np.abs(d), initial=0.0)) / size if size else math.inf)
        for (_, d), size in zip(pairs, sizes, strict=True)
    )
    return fitted, slope


def _rounded(value: float, slope: float) -> float:
    """``value`` to the fewest significant digits (up to 6) that move the leaves, at
    ``slope`` per unit (:func:`_affine_fit`), by at most a tenth of :data:`VARIANT_MATCH`.

    >>> _rounded(0.19999931, 1.0), _rounded(0.19999931, 10.0)
    (0.2, 0.199999)
    """
    for digits in range(1, 7):
        rounded = float(f"{value:.{digits}g}")
        if abs(rounded - value) * slope <= VARIANT_MATCH / 10:
            return rounded
    return float(f"{value:.6g}")


#: Float64 passes a fitted activation parameter may take: JAX's default, then secant
#: steps (:func:`_fitted_parameter`). Leaky ReLU's slope 0.1 or 0.2 for 0.2 or 0.01, and
#: ELU's α 0.3 for 1, took 4 to 8 in random 4-8-8-2 models (40 seeds each).
_FIT_PASSES = 8
#: Each parameter's field in :class:`~equiv.spec.MLPSpec`, its name in torch and JAX,
#: and JAX's default (torch's too).
_ACTIVATION_PARAMETERS = {
    "leaky_relu": ("negative_slope", "nn.LeakyReLU", "jax.nn.leaky_relu", "negative_slope", 0.01),
    "elu": ("elu_alpha", "nn.ELU", "jax.nn.elu", "alpha", 1.0),
}


#: Each loss's hyper-parameter: its field in :class:`~equiv.spec.MLPSpec`, its name, torch's
#: loss and the port's (``{v}`` for the value), and optax's default (torch's too).
_LOSS_PARAMETERS = {
    "huber": (
        "huber_delta",
        "delta",
        "nn.HuberLoss(delta={v})",
        "optax.huber_loss(o, y, delta={v})",
        "optax.huber_loss's default",
    ),
    "smooth_l1": (
        "smooth_l1_beta",
        "beta",
        "nn.SmoothL1Loss(beta={v})",
        "optax.huber_loss(o, y, delta={v}) / {v}",
        "optax.huber_loss's default delta",
    ),
}


def _activation_parameter_fits(spec: MLPSpec, params, x, y, by_hand: bool = False) -> Iterator[Fit]:
    """For leaky ReLU's slope and ELU's alpha: the value the port used, where it is not
    the spec's, fitted to its step-1 loss and gradients (:func:`_fitted_parameter`),
    JAX's default tried first (found in a user trial: ``nn.LeakyReLU(0.2)`` ported as
    ``jax.nn.leaky_relu(x)``, slope 0.01, was caught with no cause)."""
    for act in _ACTIVATION_PARAMETERS:
        if act in spec.activations:
            yield Fit(
                f"uses another {act} {_ACTIVATION_PARAMETERS[act][0]} (fitted)",
                functools.partial(_find_parameter, spec, params, x, y, act, by_hand=by_hand),
            )


def _loss_parameter_fits(spec: MLPSpec, params, x, y, by_hand: bool = False) -> Iterator[Fit]:
    """For Huber's δ and smooth L1's β: the value the port used, as
    :func:`_activation_parameter_fits` fits an activation's, optax's default (1, as
    torch's) tried first where the spec's is another (found in a user trial:
    ``optax.huber_loss(delta=0.5)`` for ``nn.HuberLoss(delta=1.0)``, or the reverse,
    was caught with no cause named). The loss and every gradient are continuous in it."""
    if spec.loss in _LOSS_PARAMETERS:
        yield Fit(
            f"uses another {spec.loss} {_LOSS_PARAMETERS[spec.loss][1]} (fitted)",
            functools.partial(_find_loss_parameter, spec, params, x, y, by_hand=by_hand),
        )


def _find_parameter(
    spec: MLPSpec,
    params,
    x,
    y,
    act: str,
    theirs: Tree,
    own: Tree,
    passes: int,
    *,
    by_hand: bool = False,
) -> tuple[Variant | None, int]:
    """:attr:`Fit.find` for ``act``'s parameter (:func:`_activation_parameter_fits`)."""
    field, module, function, keyword, default = _ACTIVATION_PARAMETERS[act]
    last = spec.num_layers
    smooth = ("loss", f"fc{last}.weight", f"fc{last}.bias")
    value, spent = _fit_field(spec, params, x, y, field, default, theirs, own, passes, smooth)
    ours = float(getattr(spec, field))
    # 0 is ReLU, for either; 1 a leaky ReLU left out: other variants name those.
    if value is None or value in (ours, 0.0) or (act == "leaky_relu" and value == 1.0):
        return None, spent
    jax_default = f" ({function}'s default)" if value == default and not by_hand else ""
    use = (
        f"use {ours:g} in the forward and in its derivative"
        if by_hand
        else f"pass it to the port, {function}(x, {keyword}={ours:g})"
    )
    return (
        Variant(
            f"uses {act}'s {keyword} {value:g}{jax_default}, not {ours:g} as the spec has",
            f"torch's {module}({ours:g}) is the model's: {use}; if torch's is "
            f"{module}({value:g}), set {field}={value:g} in the MLPSpec",
            spec.replace(**{field: value}),
            params,
        ),
        spent,
    )


def _find_loss_parameter(
    spec: MLPSpec, params, x, y, theirs: Tree, own: Tree, passes: int, *, by_hand: bool = False
) -> tuple[Variant | None, int]:
    """:attr:`Fit.find` for the loss's parameter (:func:`_loss_parameter_fits`)."""
    field, keyword, module, function, where = _LOSS_PARAMETERS[spec.loss]
    value, spent = _fit_field(spec, params, x, y, field, 1.0, theirs, own, passes)
    ours = float(getattr(spec, field))
    if value is None or value == ours:
        return None, spent
    default = f" ({where})" if value == 1.0 and not by_hand else ""
    use = (
        f"use {ours:g} in the loss and in its derivative"
        if by_hand
        else f"pass it to the port, {function.format(v=f'{ours:g}')}"
    )
    return (
        Variant(
            f"uses {spec.loss}'s {keyword} {value:g}{default}, not {ours:g} as the spec has",
            f"torch's {module.format(v=f'{ours:g}')} is the model's: {use}; if torch's is "
            f"{module.format(v=f'{value:g}')}, set {field}={value:g} in the MLPSpec",
            spec.replace(**{field: value}),
            params,
        ),
        spent,
    )


def _fit_field(
    spec: MLPSpec, params, x, y, field, default, theirs, own, passes, smooth=()
) -> tuple[float | None, int]:
    """:func:`_fitted_parameter` of the spec's ``field``, from the spec's value and
    ``default`` (twice the spec's where that is the default, or 0.1 for 0)."""
    ours = float(getattr(spec, field))

    def evaluate(value: float) -> dict[str, np.ndarray]:
        return _step_one(spec.replace(**{field: value}), params, x, y)

    first = default if default != ours else (2 * ours if ours else 0.1)
    return _fitted_parameter(theirs, evaluate, ours, own, first, passes, smooth)


def _fitted_parameter(
    observed: Tree,
    evaluate: Callable[[float], Tree],
    start: float,
    at_start: Tree,
    first: float,
    passes: int,
    smooth: tuple[str, ...] = (),
) -> tuple[float | None, int]:
    """``(value, passes spent)``: the value of a model parameter whose step-1 loss and
    gradients (``evaluate(value)``, one pass each) are ``observed``'s, rounded
    (:func:`_rounded`), or None where no positive value within a tenth of
    :data:`VARIANT_MATCH` is found in ``min(passes, _FIT_PASSES)`` passes: secant steps
    of the least-squares fit (:func:`_affine_fit`) from ``start`` (where they are
    ``at_start``) and ``first``, fitted to the leaves ``smooth`` only where given,
    those continuous in the parameter. An activation's parameter moves units across
    its kink, and the gradients below them jump (a fit of every leaf stalled at ELU's
    α = 0.465 for 0.3, and one of the loss alone found another root, found in review);
    the loss and the output layer's gradients do not jump.

    >>> quadratic = lambda a: {"loss": np.array(1 + a * a), "w": np.array([a, 2 - a])}
    >>> _fitted_parameter(quadratic(0.2), quadratic, 0.5, quadratic(0.5), 0.2, 6)  # first
    (0.2, 1)
    >>> _fitted_parameter(quadratic(0.2), quadratic, 0.5, quadratic(0.5), 0.1, 6)
    (0.2, 5)
    >>> _fitted_parameter(quadratic(0.2), quadratic, 0.5, quadratic(0.5), 0.1, 3)
    (None, 3)
    """
    fitted = {k: v for k, v in observed.items() if k in smooth} if smooth else observed
    points, value, spent = [(start, at_start)], first, 0
    while spent < min(passes, _FIT_PASSES):
        points.append((value, evaluate(value)))
        spent += 1
        (a0, t0), (a1, t1) = points[-2:]
        fit = _affine_fit(fitted, t0, t1)
        if tree_distance(observed, t1) <= VARIANT_MATCH / 10:
            return _rounded(a1, math.inf if fit is None else fit[1] / abs(a1 - a0)), spent
        if fit is None:
            return None, spent
        value = a0 + fit[0] * (a1 - a0)
        if not (math.isfinite(value) and value > 0 and value != a1):
            return None, spent
    return None, spent


def _same_shape_runs(spec: MLPSpec, params: dict) -> list[tuple[int, int]]:
    """The first and last layer of each run of three or more consecutive layers of one
    weight shape and one bias presence.

    >>> spec = MLPSpec((4, 8, 8, 8, 8, 2))
    >>> _same_shape_runs(spec, {f"fc{i}.weight": np.zeros(s) for i, s in
    ...                         enumerate([(8, 4), (8, 8), (8, 8), (8, 8), (2, 8)], 1)})
    [(2, 4)]
    """
    runs, start = [], 1
    for i in range(2, spec.num_layers + 2):
        same = i <= spec.num_layers and (
            params[f"fc{i}.weight"].shape == params[f"fc{start}.weight"].shape
            and spec.biases[i - 1] == spec.biases[start - 1]
        )
        if not same:
            if i - start >= 3:
                runs.append((start, i - 1))
            start = i
    return runs


def _swap_advice(layout: str | None) -> str:
    """Why a port's layers may take each other's parameters in ``layout``, and the fix
    (found in a user trial: the swap was named without either)."""
    if layout == "nnx":
        return (
            "nnx.merge pairs a state's arrays with the model's in the sorted order of "
            "their keys: attributes that sort otherwise than they are called take each "
            "other's parameters. Name them fc1, fc2, ... in call order, or pass "
            "layout=equiv.nnx_layout(port)"
        )
    if layout == "flax":
        from equiv.convert import LINEN_ORDER  # noqa: PLC0415 - no cycle at import

        return f"If the port is a flax.linen model: {LINEN_ORDER}"
    return ""


def model_variants(
    spec: MLPSpec,
    params: dict[str, np.ndarray],
    x,
    y,
    loss: float | Tree | None = None,
    *,
    by_hand: bool = False,
    layout: str | None = None,
) -> Iterator[Variant | Fit]:
    """Ways of computing another model than ``spec`` that a single step tells apart,
    each with its gradients as such a port reports them (a weight used transposed
    reports its gradient transposed back, a bias left out reports 0, swapped layers
    report each other's):

    * the other GELU (tanh's approximation for the exact erf, or the reverse), in
      every GELU layer, then in each one;
    * a square weight used transposed (``x @ W`` where torch computes ``x @ Wᵀ``:
      the shapes cannot tell);
    * a bias left out;
    * two neighbouring layers of the same shape used in each other's place;
    * cross-entropy's label smoothing left out, or another ε, none included (fitted to
      ``loss``, the backend's loss and gradients: each is affine in ε,
      :func:`_fitted_smoothing`);
    * another activation in place of one of the model's, in every layer it is in
      (SiLU for GELU, ReLU for leaky ReLU, ...), or none after every layer or one;
    * another leaky ReLU slope or ELU alpha (JAX's default, or fitted: a :class:`Fit`);
    * another Huber δ or smooth L1 β (optax's default, or fitted: a :class:`Fit`);
    * the model's activations in another order (two neighbours swapped, or all
      shifted by one layer).

    ``by_hand``: the advice is for a hand-written forward and backward, not a JAX port;
    ``layout``: the port's parameter layout, where known, for the transpose's advice.
    """

    def variant(what, advice, other_spec, changed, reported=_same, tier=1) -> Variant:
        return Variant(what, advice, other_spec, {**params, **changed}, reported, tier=tier)

    layers = [i for i, name in enumerate(spec.activations) if name in _GELU_SWAP]
    for changed in [layers] + ([[i] for i in layers] if len(layers) > 1 else []):
        if not changed:
            continue
        acts = tuple(_GELU_SWAP[n] if i in changed else n for i, n in enumerate(spec.activations))
        kind = "the tanh approximation" if acts[changed[0]] == "gelu_tanh" else "the exact erf"
        where = "every GELU layer" if changed == layers else f"the GELU after fc{changed[0] + 1}"
        what = f"computes GELU with {kind} in {where}"
        tier = 1 if changed == layers else 2
        advice = _GELU_BY_HAND if by_hand else _GELU_ADVICE
        yield variant(what, advice, spec.replace(activation=acts), {}, tier=tier)
    if spec.loss in ("cross_entropy", "cross_entropy_probs") and spec.label_smoothing > 0:
        yield variant(
            f"leaves out the label smoothing ({spec.label_smoothing:g})",
            "torch's CrossEntropyLoss(label_smoothing=ε) mixes ε/classes into every "
            + (
                "target: (1 - ε)·one_hot + ε/classes, in the loss and in its backward, "
                "softmax(z) - targets"
                if by_hand
                else "target; optax.softmax_cross_entropy_with_integer_labels has no "
                "smoothing: use optax.smooth_labels on one-hot targets with "
                "softmax_cross_entropy"
            ),
            spec.replace(label_smoothing=0.0),
            {},
        )
    observed = loss if isinstance(loss, Mapping) or loss is None else {"loss": loss}
    if spec.loss in ("cross_entropy", "cross_entropy_probs") and observed is not None:
        ends = [_step_one(spec.replace(label_smoothing=e), params, x, y) for e in (0.0, 1.0)]
        fitted = _fitted_smoothing(observed, *ends)
        if fitted is not None and fitted != spec.label_smoothing:
            ours = spec.label_smoothing
            # Either side may be the one to change: the spec says what torch's loss is
            # (found in a user trial: torch's CrossEntropyLoss(label_smoothing=0.1),
            # ported with it, but left out of the MLPSpec, got no hint).
            side = "the backward's targets" if by_hand else "the port"
            port_fix = f"use {ours:g} in {side}" if ours else f"remove it from {side}"
            yield variant(
                f"uses label smoothing {fitted:g}, not {ours:g} as the spec has",
                f"If torch's CrossEntropyLoss has label_smoothing={fitted:g}, set "
                f"label_smoothing={fitted:g} in the MLPSpec (torch's and the reference's "
                f"loss follow it); if not, {port_fix}"
                + ("" if by_hand else " (optax.smooth_labels)"),
                spec.replace(label_smoothing=fitted),
                {},
            )
    for i in range(1, spec.num_layers + 1):
        weight = params[f"fc{i}.weight"]
        if weight.shape[0] == weight.shape[1] > 1:
            name = f"fc{i}.weight"
            yield variant(
                f"uses {name} transposed",
                _transpose_advice(layout, by_hand),
                spec,
                {name: weight.T},
                lambda grads, name=name: {**grads, name: grads[name].T},
            )
        # A layer's zero bias left out is the model itself.
        if spec.biases[i - 1] and np.any(params[f"fc{i}.bias"]):
            name = f"fc{i}.bias"
            yield variant(
                f"leaves out {name}",
                "",
                spec,
                {name: np.zeros_like(params[name])},
                lambda grads, name=name: {**grads, name: np.zeros_like(grads[name])},
            )
    for i, j in itertools.pairwise(range(1, spec.num_layers + 1)):  # neighbours
        # Layers of one shape and, as the spec holds a bias per position, one bias.
        same_bias = spec.biases[i - 1] == spec.biases[j - 1]
        if params[f"fc{i}.weight"].shape == params[f"fc{j}.weight"].shape and same_bias:
            kinds = ("weight", "bias") if spec.biases[i - 1] else ("weight",)
            pairs = ((i, j), (j, i))
            swapped = {f"fc{a}.{k}": params[f"fc{b}.{k}"] for a, b in pairs for k in kinds}

            def back(grads: dict, pairs=pairs, kinds=kinds) -> dict:
                return {
                    **grads,
                    **{f"fc{a}.{k}": grads[f"fc{b}.{k}"] for a, b in pairs for k in kinds},
                }

            yield variant(
                f"uses fc{i} and fc{j} in each other's place",
                _swap_advice(layout),
                spec,
                swapped,
                back,
            )
    for first, last in _same_shape_runs(spec, params):
        # Three or more layers of one shape in reverse order: flax.linen's nested calls,
        # Dense(8)(f(Dense(8)(f(Dense(8)(x))))), construct (and number) the outermost
        # first (found in a user trial: only the loss was hinted at).
        kinds = ("weight", "bias") if spec.biases[first - 1] else ("weight",)
        pairs = tuple((a, first + last - a) for a in range(first, last + 1))
        reversed_params = {f"fc{a}.{k}": params[f"fc{b}.{k}"] for a, b in pairs for k in kinds}

        def back_reversed(grads: dict, pairs=pairs, kinds=kinds) -> dict:
            return {**grads, **{f"fc{a}.{k}": grads[f"fc{b}.{k}"] for a, b in pairs for k in kinds}}

        yield variant(
            f"uses fc{first} to fc{last} in reverse order",
            _swap_advice(layout),
            spec,
            reversed_params,
            back_reversed,
        )
    for own in dict.fromkeys(spec.activations):  # each of the model's, in order
        for other in ACTIVATIONS:
            if other in (own, _GELU_SWAP.get(own)):
                continue  # the GELUs' variants above say more
            acts = tuple(other if a == own else a for a in spec.activations)
            where = "every layer" if len(set(spec.activations)) == 1 else f"every {own} layer"
            what = (
                f"leaves out the {own} activation in {where}"
                if other == "identity"
                else f"computes {other} where the model has {own} ({where})"
            )
            yield variant(what, "", spec.replace(activation=acts), {})
    yield from _activation_parameter_fits(spec, params, x, y, by_hand)
    yield from _loss_parameter_fits(spec, params, x, y, by_hand)
    yield from _reordered_activations(spec, variant)
    if spec.num_layers > 2:
        for k, own in enumerate(spec.activations, start=1):
            if own != "identity":
                acts = tuple("identity" if i == k else a for i, a in enumerate(spec.activations, 1))
                what = f"leaves out the {own} activation after fc{k}"
                yield variant(what, "", spec.replace(activation=acts), {}, tier=2)


def _reordered_activations(spec: MLPSpec, variant: Callable[..., Variant]) -> Iterator[Variant]:
    """The model's own activations in another order: two neighbours in each other's
    place, or all shifted by one layer (a port that applies the activation of layer
    k after layer k + 1; found in a user trial, where it was caught with no cause)."""
    acts = tuple(spec.activations)
    if len(set(acts)) < 2:
        return
    orders = {}
    for i in range(len(acts) - 1):
        swapped = (*acts[:i], acts[i + 1], acts[i], *acts[i + 2 :])
        orders.setdefault(swapped, ("swaps the activations after fc{} and fc{}", (i + 1, i + 2)))
    for shift, word in ((1, "earlier"), (-1, "later")):
        rotated = acts[shift:] + acts[:shift]
        orders.setdefault(rotated, (f"applies every activation one layer {word}", ()))
    for order, (what, layers) in orders.items():
        if order == acts:
            continue
        where = ", ".join(f"{a} after fc{k}" for k, a in enumerate(order, start=1))
        tier = 1 if layers else 2
        yield variant(
            f"{what.format(*layers)} ({where})", "", spec.replace(activation=order), {}, tier=tier
        )


def loss_variants(
    spec: MLPSpec,
    params: dict[str, np.ndarray],
    x,
    y,
    loss: float | Tree | None = None,
    output: np.ndarray | None = None,
) -> Iterator[Variant]:
    """Mistakes in the loss, the model's forward pass and backward from the loss's
    gradient on (:func:`_loss_mistakes`): each is offered only where its loss is the
    backend's step-1 ``loss`` (given alone or under ``"loss"``; to ten times
    :data:`VARIANT_MATCH`, kinked units rounded across 0 allowed for), computed from
    the model's float64 ``output`` (one forward pass where it is not given, none per
    mistake): a mistake in the loss shows in the loss, and those that do not give it
    cost no pass. None without ``loss``."""
    if loss is None:
        return
    observed = np.asarray(loss["loss"] if isinstance(loss, Mapping) else loss, np.float64)
    observed = float(observed.reshape(-1)[0]) if observed.size == 1 else math.nan
    if output is None:
        with np.errstate(all="ignore"):
            output = manual.forward(params, x, spec)[0]
    for what, advice, loss_of in _loss_mistakes(spec, output.shape):
        with np.errstate(all="ignore"):
            value = float(loss_of(output, y)[0])
        if abs(observed - value) <= 10 * VARIANT_MATCH * abs(value):
            yield Variant(what, advice, spec, params, miswritten={"loss_of": loss_of})


#: The greatest batch whose outputs are paired with every target (:func:`_broadcast`):
#: N² loss terms, 1.7e7 at this size, a few hundred million flops (0.15 s for MSE to 0.4 s
#: for binary cross-entropy here), beside the 7e10 of :data:`VARIANT_FLOPS`.
_BROADCAST_BATCH = 4096


def _loss_mistakes(spec: MLPSpec, shape: tuple[int, ...]):
    """``(what, advice, loss_of)`` for each mistake in ``spec``'s loss that an output of
    ``shape`` (batch, outputs) allows, ``loss_of(out, y) -> (loss, ∂loss/∂out)``:

    * an output of width 1 and targets broadcast against each other, (N, 1) against
      (N,) or the reverse: the loss of every output against every target
      (:func:`_broadcast`; losses of values or binary targets);
    * probabilities where the loss takes logits: softmax before cross-entropy, sigmoid
      before binary cross-entropy with logits (both apply their own);
    * the loss of part of the batch: its last row or first left out (``x[:-1]``,
      ``x[1:]``), or the targets one row off (``x[:-1]`` with ``y[1:]``, and the reverse).
    """
    batch, outputs = shape
    loss = LOSSES[spec.loss]
    if outputs == 1 and 1 < batch <= _BROADCAST_BATCH and loss.targets in ("values", "binary"):
        n = batch
        yield (
            f"broadcasts ({n},1) against ({n},) in its loss (or the reverse), so that out - y "
            f"is ({n},{n}), every output against every target",
            "Reshape y to out's shape (y.reshape(out.shape)): torch's loss warns of the "
            "broadcast, jax.numpy broadcasts silently",
            functools.partial(_broadcast, spec),
        )
    if spec.loss in ("cross_entropy", "cross_entropy_probs"):
        yield (
            "applies softmax to the outputs before a cross-entropy that applies log_softmax "
            "itself (probabilities for logits)",
            "Pass the logits: torch's CrossEntropyLoss and optax.softmax_cross_entropy"
            "(_with_integer_labels) apply log_softmax to what they are given",
            functools.partial(_squashed_first, spec),
        )
    if spec.loss == "bce_with_logits":
        yield (
            "applies sigmoid to the outputs before a binary cross-entropy that applies it "
            "itself (probabilities for logits)",
            "Pass the logits: torch's BCEWithLogitsLoss and optax.sigmoid_binary_cross_entropy "
            "apply the sigmoid to what they are given",
            functools.partial(_squashed_first, spec),
        )
    if batch > 1:
        head, tail = slice(None, -1), slice(1, None)  # x[:-1], x[1:]
        part = f"{batch - 1} of the {batch} rows"
        for what, taken, targets in (
            (f"computes its loss on x[:-1] and y[:-1], {part}", head, head),
            (f"computes its loss on x[1:] and y[1:], {part}", tail, tail),
            (
                "pairs x[:-1] with y[1:] in its loss, each row with the next one's target",
                head,
                tail,
            ),
            (
                "pairs x[1:] with y[:-1] in its loss, each row with the one before's target",
                tail,
                head,
            ),
        ):
            yield (
                what,
                "An off-by-one slice: torch's loss takes every row of x with its own target",
                functools.partial(_rows, spec, taken, targets),
            )


def _broadcast(spec: MLPSpec, out, y):
    """The loss of ``out[:, 0] - y[:, 0]`` broadcast to (N, N), ``o_i`` against every
    ``y_j``, and its gradient ``Σ_j ∂ℓ(o_i, y_j)/∂o_i`` (a mean over the N² terms, or a
    sum), in blocks of rows. For MSE, ``mean_i (o_i - ȳ)² + var(y)``: each output
    pulled to the targets' mean.

    >>> o, t = np.array([[1.0], [3.0]]), np.array([[0.0], [2.0]])
    >>> loss, grad = _broadcast(MLPSpec((1, 1), dtype="float64"), o, t)
    >>> float(loss), grad.tolist()  # ((1-0)² + (1-2)² + (3-0)² + (3-2)²)/4; 2(o - 1)/2
    (3.0, [[0.0], [2.0]])
    """
    n = out.shape[0]
    loss = LOSSES[spec.loss]
    o, t = out[:, 0], y[:, 0]
    block = max(1, (1 << 20) // n)
    total, grad = 0.0, np.zeros_like(out)
    for start in range(0, n, block):
        rows = o[start : start + block, None] + np.zeros((1, n))
        value, d = loss.value_and_grad(rows, np.broadcast_to(t, rows.shape), spec)
        # Each block's mean undone: the mistake averages over all N² terms.
        scale = rows.size if loss.reduction == "mean" else 1
        total += float(value) * scale
        grad[start : start + block, 0] = np.sum(d, axis=1) * scale
    norm = n * n if loss.reduction == "mean" else 1
    return np.asarray(total / norm), grad / norm


def _squashed_first(spec: MLPSpec, out, y):
    """The loss of ``softmax(out)`` (cross-entropy) or ``σ(out)`` (binary cross-entropy)
    taken as logits, and its gradient through the softmax or sigmoid: ``p ⊙ (g - Σ p·g)``
    or ``g·σ(1 - σ)``, ``g`` the loss's gradient at the probabilities."""
    if spec.loss == "bce_with_logits":
        p = 0.5 * (1.0 + np.tanh(0.5 * out))  # σ, without overflow
        value, g = LOSSES[spec.loss].value_and_grad(p, y, spec)
        return value, g * p * (1.0 - p)
    e = np.exp(out - np.max(out, axis=1, keepdims=True))
    p = e / np.sum(e, axis=1, keepdims=True)
    value, g = LOSSES[spec.loss].value_and_grad(p, y, spec)
    return value, p * (g - np.sum(p * g, axis=1, keepdims=True))


def _rows(spec: MLPSpec, taken: slice, targets: slice, out, y):
    """The loss of the rows ``taken`` of the output against the targets' rows
    ``targets`` (a mean over them, or a sum), and its gradient, 0 for the rows left
    out."""
    value, d = LOSSES[spec.loss].value_and_grad(out[taken], y[targets], spec)
    grad = np.zeros_like(out)
    grad[taken] = d
    return value, grad


# A slope written wrong in a hand-written backward: (what it does, which activations it
# changes, slope(act, param, k, dh, zs, acts) -> the slope used for hidden layer k).
_SLOPE_MISTAKES = (
    (
        "leaves out {act}'s slope{mask}",
        lambda a: a.name != "identity",
        lambda a, p, k, dh, zs, acts: np.ones_like(dh),
    ),
    (
        "takes a ReLU mask for {act}'s slope (0 where z <= 0)",
        lambda a: a.name in ("leaky_relu", "elu"),
        lambda a, p, k, dh, zs, acts: (zs[k - 1] > 0).astype(dh.dtype),
    ),
    (
        "takes {act}'s slope on the wrong side of 0 (z < 0 for z > 0)",
        lambda a: a.kink,
        lambda a, p, k, dh, zs, acts: a.value_and_derivative(np, zs[k - 1], p, zs[k - 1] <= 0)[1],
    ),
    (
        "takes {act}'s slope at the upstream gradient dh instead of z",
        lambda a: a.name != "identity",
        lambda a, p, k, dh, zs, acts: a.derivative(np, dh, p),
    ),
    (
        "multiplies by {act}'s output h instead of its slope",
        lambda a: a.name != "identity",
        lambda a, p, k, dh, zs, acts: acts[k - 1][0],
    ),
    (
        "takes {act}'s slope at its output h instead of z",
        lambda a: a.name not in ("identity", "relu", "leaky_relu"),  # same slope there
        lambda a, p, k, dh, zs, acts: a.derivative(np, acts[k - 1][0], p),
    ),
    (
        "feeds z to {act}'s slope written for its output (1 - h² as 1 - z²)",
        lambda a: a.name == "tanh",
        lambda a, p, k, dh, zs, acts: 1.0 - zs[k - 1] ** 2,
    ),
    (
        "feeds z to {act}'s slope written for its output (h(1 - h) as z(1 - z))",
        lambda a: a.name == "sigmoid",
        lambda a, p, k, dh, zs, acts: zs[k - 1] * (1.0 - zs[k - 1]),
    ),
)


def _float32_advice(by_hand: bool) -> str:
    """How a float64 run's inputs get rounded to float32, in a port's or a hand-written
    pass's terms."""
    last = "an .astype(np.float32)" if by_hand else "a jnp array made before jax.enable_x64"
    return (
        "Keep a float64 run's inputs float64: a float32 array among them (np.float32, "
        f"torch.float32, {last}) is rounded first"
    )


def float32_inputs_variants(
    spec: MLPSpec, params: dict[str, np.ndarray], x, y, *, by_hand: bool = False
) -> Iterator[Variant]:
    """Float64 code that rounds its inputs to float32 first (found in a user trial: a
    float64 port whose input went through float32 was caught with no cause named): x,
    the parameters, or x, y and the parameters. Each is tried only where the rounding
    changes something (a batch drawn in float32 is float32's numbers already); class
    labels are left as they are. ``by_hand``: the advice is a hand-written pass's.
    """
    labels = LOSSES[spec.loss].targets == "labels"
    advice = _float32_advice(by_hand)

    def rounded(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float32).astype(np.float64)

    narrow = {name: rounded(value) for name, value in params.items()}
    x_changes = not np.array_equal(rounded(x), x)
    params_change = any(not np.array_equal(narrow[n], params[n]) for n in params)
    y_changes = not labels and not np.array_equal(rounded(y), y)
    # Tier 3: after every other variant, as the docstring of variants says (found in
    # review: at tier 1 they came before the one-layer variants).
    if x_changes:
        yield Variant(
            "rounds x to float32 before computing in float64",
            advice,
            spec,
            params,
            tier=3,
            batch=lambda xb, yb: (rounded(xb), yb),
        )
    if params_change:
        yield Variant(
            "rounds the parameters to float32 before computing in float64",
            advice,
            spec,
            narrow,
            tier=3,
        )
    if sum((x_changes, params_change, y_changes)) > 1 or (y_changes and not x_changes):
        yield Variant(
            "rounds x, y and the parameters to float32 before computing in float64",
            advice,
            spec,
            narrow,
            tier=3,
            batch=lambda xb, yb: (rounded(xb), yb if labels else rounded(yb)),
        )


def backward_variants(spec: MLPSpec, params: dict[str, np.ndarray], x, y) -> Iterator[Variant]:
    """Mistakes of a hand-written backward pass, the forward pass and the loss the
    model's: each slope mistake (:data:`_SLOPE_MISTAKES`) after every hidden layer it
    applies to (one helper used everywhere), then after each one; another hidden
    layer's slope (a neighbour of the same width: an index off by one); a weight
    gradient built from its layer's input before the activation, or from a neighbouring
    layer's input of the same width; a square weight transposed in the chain
    ``dh = dz W``; a square weight's gradient reported transposed (``hᵀ dz``, shape
    (in, out), where torch's is ``dzᵀ h``); a bias gradient summed over the outputs
    (where the batch is as wide as them, so the shape is right)."""
    hidden = range(1, spec.num_layers)

    def act(k: int):
        return ACTIVATIONS[spec.activations[k - 1]]

    def variant(what, reported=_same, tier=1, **miswritten) -> Variant:
        return Variant(f"{what} in the backward pass", "", spec, params, reported, miswritten, tier)

    def slopes(mistake, layers):
        def slope_of(k, dh, zs, acts):
            if k not in layers:
                return acts[k - 1][1]
            a = act(k)
            return mistake(a, a.param(spec), k, dh, zs, acts)

        return slope_of

    for form, applies, mistake in _SLOPE_MISTAKES:
        layers = [k for k in hidden if applies(act(k))]
        for chosen in [layers] + ([[k] for k in layers] if len(layers) > 1 else []):
            if not chosen:
                continue
            names = sorted({spec.activations[k - 1] for k in chosen})
            where = ", ".join(f"fc{k}" for k in chosen)
            what = form.format(
                act=" and ".join(names),
                mask=" (the mask z > 0)" if names == ["relu"] else "",
            )
            tier = 1 if chosen == layers else 2
            yield variant(f"{what} after {where}", tier=tier, slope_of=slopes(mistake, set(chosen)))
    if spec.loss in ("cross_entropy", "cross_entropy_probs"):

        def no_targets(out, y, dz):
            e = np.exp(out - np.max(out, axis=1, keepdims=True))
            return e / np.sum(e, axis=1, keepdims=True) / out.shape[0]

        yield variant(
            "leaves the targets out of cross-entropy's gradient (softmax / batch for "
            "(softmax - targets) / batch)",
            output_grad=no_targets,
        )
    if spec.loss in ("cross_entropy", "cross_entropy_probs") and spec.label_smoothing > 0:
        unsmoothed = spec.replace(label_smoothing=0.0)

        def one_hot(out, y, dz):
            return LOSSES[spec.loss].value_and_grad(out, y, unsmoothed)[1]

        yield variant(
            "leaves the label smoothing out of cross-entropy's gradient (the loss has it)",
            output_grad=one_hot,
        )
    relus = [k for k in hidden if spec.activations[k - 1] == "relu"]
    if relus:
        # Found in a user trial: jnp.maximum(z, 0) differentiates to 1/2 at z exactly 0
        # (an all-zero input row with zero biases), torch's ReLU to 0; in every backend
        # alike, so no rounding allows for it.
        def half_at_zero(k, dh, zs, acts):
            slope = acts[k - 1][1]
            return np.where(zs[k - 1] == 0, 0.5, slope) if k in relus else slope

        yield Variant(
            f"takes relu's slope at z exactly 0 as 1/2 after {', '.join(f'fc{k}' for k in relus)}"
            " (jnp.maximum(z, 0)'s derivative there; torch's is 0)",
            "Use jax.nn.relu, whose derivative at 0 is torch's (0); or, by hand, the mask z > 0",
            spec,
            params,
            miswritten={"slope_of": half_at_zero},
        )
    for k, j in itertools.permutations(hidden, 2):
        if abs(k - j) == 1 and spec.sizes[k] == spec.sizes[j]:

            def other_layer(k_, dh, zs, acts, k=k, j=j):
                return acts[j - 1][1] if k_ == k else acts[k_ - 1][1]

            what = f"takes the slope after fc{j} for the one after fc{k}"
            yield variant(what, slope_of=other_layer)
    # A weight gradient dzᵢᵀ h built from the wrong h: the layer's input before its
    # activation (the cached z for the cached h), or another layer's input of the
    # same width (an index off by one; x for the first hidden layer's output).
    pre = [i for i in range(2, spec.num_layers + 1) if spec.activations[i - 2] != "identity"]
    for chosen in [pre] + ([[i] for i in pre] if len(pre) > 1 else []):
        if not chosen:
            continue

        def before_activation(i, h, x_, zs, acts, chosen=frozenset(chosen)):
            return zs[i - 2] if i in chosen else h

        where = ", ".join(f"fc{i}" for i in chosen)
        yield variant(
            f"builds {where}'s weight gradient from its input before the activation "
            "(dz.T @ z for dz.T @ h)",
            tier=1 if chosen == pre else 2,
            weight_input=before_activation,
        )
    for i, j in itertools.permutations(range(1, spec.num_layers + 1), 2):
        if abs(i - j) == 1 and spec.sizes[i - 1] == spec.sizes[j - 1]:

            def other_input(i_, h, x_, zs, acts, i=i, j=j):
                return h if i_ != i else (x_ if j == 1 else acts[j - 2][0])

            yield variant(
                f"builds fc{i}'s weight gradient from fc{j}'s input",
                tier=2,  # a slip at one layer, after every mistake made everywhere
                weight_input=other_input,
            )
    # A bias gradient summed over the features instead of the batch has the bias's
    # shape only where the batch is as wide as the layer's output, as in the
    # notebook's default (batch 2, 2 outputs): caught, never named before.
    across = [
        i
        for i in range(1, spec.num_layers + 1)
        if spec.biases[i - 1] and spec.sizes[i] == len(x) > 1
    ]
    for chosen in [across] + ([[i] for i in across] if len(across) > 1 else []):
        if not chosen:
            continue

        def over_features(i, dz, chosen=frozenset(chosen)):
            return np.sum(dz, axis=1 if i in chosen else 0)

        where = ", ".join(f"fc{i}" for i in chosen)
        yield variant(
            f"sums {where}'s bias gradient over the outputs, not the batch "
            "(dz.sum(axis=1) for dz.sum(axis=0); the shapes agree only because the batch "
            "is as wide as the layer)",
            tier=1 if chosen == across else 2,
            bias_grad=over_features,
        )
    for i in range(1, spec.num_layers + 1):
        name = f"fc{i}.weight"
        if params[name].shape[0] == params[name].shape[1] > 1:
            if i > 1:
                yield variant(
                    f"multiplies by {name} transposed (dz @ W.T for dz @ W)",
                    backward_params={name: params[name].T},
                )
            yield variant(
                f"reports {name}'s gradient transposed (h.T @ dz for dz.T @ h)",
                lambda grads, name=name: {**grads, name: grads[name].T},
            )
