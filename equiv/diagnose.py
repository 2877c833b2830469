"""Recognise the signatures of known porting mistakes in a failed comparison.

A failing leaf says *that* two results differ; these detectors say *why*, when the
difference has the shape of a known trap (see the README's "Numerical traps"):

* a square weight equal to the other side's transpose: a converter forgot to
  transpose (torch's ``Linear.weight`` is (out, in), a Flax kernel (in, out));
* one result a constant multiple of the other: a factor 2 (``optax.l2_loss`` is
  half of ``MSELoss``), ``batch · outputs`` (MSE summed instead of averaged), the
  batch size (a mean where torch sums, or the reverse);
* parameter updates a constant multiple of the other's: the learning rate differs
  (factor 2: a step applied twice);
* float32-representable values in a float64 run: JAX truncated float64 to float32
  because x64 was off;
* parameters after a step off by a constant multiple of the parameters before it:
  the weight decays differ (AdamW's default is 1e-2 in torch, 1e-4 in optax);
* parameter updates that a known misreading of the optimizer reproduces
  (:func:`diagnose_optimizer`): Adam's L2 taken for AdamW's decoupled decay or the
  reverse, weight decay added after the momentum instead of before it, dampening
  ignored, Nesterov toggled (SGD) or added (Adam), Adam's ε inside the square root,
  added before the bias correction (Keras) or of another size, Adam's bias corrections
  left out (both, or either) or counted from ``t + 1``.

Each detector returns a one- or two-line hint, or None. Mistakes that change the model
or its backward pass (the other GELU, a transpose inside the forward pass, a ReLU mask
on the wrong side, ...) are computed and matched instead: :mod:`equiv.variants`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from equiv.losses import LOSSES
from equiv.optimizers import OptimizerSpec, manual_init, manual_update

#: The hint for a constant factor that matches no known trap.
GENERIC = "A constant factor: look for a scaled loss, learning rate or reduction."

# A signature "holds" when the residual after explaining the difference is below
# this fraction of the values' magnitude: far above float32 noise (~1e-7) and far
# below the differences the traps cause (O(1) relative).
_EXPLAINED = 1e-4


def diagnose_leaf(
    name: str,
    actual: np.ndarray,
    expected: np.ndarray,
    *,
    stage: str,
    names: tuple[str, str] = ("actual", "expected"),
    before: np.ndarray | None = None,
    dtype: str | None = None,
    numel_output: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    shared: bool = True,
    optimizer: OptimizerSpec | None = None,
    step: int | None = None,
    companion: float | None = None,
    loss_differs: bool = False,
    own_before: np.ndarray | None = None,
    earlier_agreed: bool | None = None,
    layout: str | None = None,
    loss: str | None = None,
    by_hand: bool = False,
) -> str | None:
    """The likeliest known cause of ``actual`` differing from ``expected``, or None.

    Args:
      name: the leaf's torch name (``fc2.weight``) or ``"loss"``.
      stage: ``"loss"``, ``"grads"`` or ``"params"``.
      names: the two backends, for the message.
      before: for ``stage="params"``, the parameters before the step.
      dtype: the run's dtype; ``"float64"`` enables the float32-truncation check.
      numel_output, batch_size: ``batch · outputs`` and the batch, to name factors.
      learning_rate: to turn a decay signature into the difference of weight decays.
      shared: whether every leaf of the stage is off by the same factor as this one
        (:func:`diagnose_trees` tells): a loss's factor scales every gradient.
      optimizer, step: the run's optimizer and the step, for the optimizer state
        (``stage="state"``, where the gradients agree) and a repeated update.
      companion: for Adam's ``exp_avg`` (``exp_avg_sq``), the factor by which the same
        parameter's ``exp_avg_sq`` (``exp_avg``) is off, where it is one.
      loss_differs: for ``stage="grads"``, whether the loss at the same step differs
        too, with no cause found there: a factor in some gradients only is then no
        evidence about their backward.
      own_before: ``actual``'s parameters before the step, where they are not
        ``before`` (``expected``'s): updates are measured each from its own start.
      earlier_agreed: whether the two agreed at every step before ``step``: a
        learning rate that differs from a later step on is then a schedule's.
      by_hand: one side is a hand-written backward (:func:`equiv.check_gradients`,
        :func:`equiv.check_manual_backward`): causes are said in its terms (``dout``,
        the chain rule), not a JAX port's (optax's conventions, ``stop_gradient``).
      layout: the layout of the port's parameters (``"equinox"``...), where known: the
        advice then names its converter.
      loss: the model's loss (``"mse"``...), where known: a factor's advice then speaks
        of it (MSELoss's conventions only for MSE).

    Example:
      >>> import numpy as np
      >>> w = np.arange(4.0).reshape(2, 2)
      >>> hint = diagnose_leaf("fc2.weight", w.T, w, stage="params", names=("jax", "torch"))
      >>> hint.split(". ")[0]
      "fc2.weight: jax holds the transpose of torch's square weight"
    """
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    first, second = names
    precision = precision_cause(name, a, b, dtype, names, by_hand=by_hand)
    if precision:
        return precision
    if a.ndim == 2 and a.shape[0] == a.shape[1] > 1 and _close(a, b.T) and not _close(a, b):
        return (
            f"{name}: {first} holds the transpose of {second}'s square weight. A converter "
            "forgot to transpose it, or transposed it once too often (torch's and Equinox's "
            f"Linear weights are (out, in), a Flax or nnx kernel (in, out)); {_converter(layout)}."
        )
    if stage == "params" and before is not None:
        before = np.asarray(before, np.float64)
        own = before if own_before is None else np.asarray(own_before, np.float64)
        ratio = _ratio(a - own, b - before) if own.shape == a.shape else None
        if ratio is not None and abs(ratio) < _ZERO_SIDE:
            return (
                f"{name}: {first}'s parameters did not move at this step where {second}'s "
                f"did: {first}'s learning rate is 0 here (a schedule that starts at 0, as "
                "optax.linear_schedule(0.0, ...) or a warmup does, where torch's optimizer "
                "takes its learning rate from the first step; or a frozen parameter)."
            )
        if ratio is not None:
            twice = " (or the step was applied twice)" if abs(ratio - 2) < 1e-3 else ""
            mu = optimizer.momentum if optimizer is not None and optimizer.name == "sgd" else 0
            if step == 1 and mu and not optimizer.nesterov and abs(ratio - 2 - mu) < 1e-3:
                twice = (
                    f" (or optimizer.step() ran twice on the same gradients: 1 + (1 + "
                    f"momentum {mu:g}) = {2 + mu:g} updates' worth at step 1)"
                )
            schedule = ""
            if step == 1:
                schedule = (
                    ", or a learning-rate schedule in one side only starts there (a warmup; "
                    "torch's optimizer keeps a constant rate unless a scheduler steps it)"
                )
            elif step is not None and earlier_agreed:
                steps = "step 1" if step == 2 else f"steps 1 to {step - 1}"
                schedule = (
                    f" at step {step}, where {steps} agreed: a learning-rate schedule in one "
                    "side only (a warmup or a decay; torch's optimizer keeps a constant rate "
                    "unless a scheduler steps it) is the likely cause"
                )
            return (
                f"{name}: {first}'s update is {ratio:.4g} times {second}'s: the learning rates "
                f"differ by that factor{twice}{schedule}."
            )
        if own.shape != a.shape:
            return None
        decay = _decay_difference((a - own) - (b - before), before, b - before)
        if decay is not None:
            # Two digits: leaves whose fits differ in the third (rounding) read the same
            # and are named together (found in a user trial: four near-identical lines).
            amount = f"{-decay / learning_rate:.2g}" if learning_rate else f"{-decay:.2g}/lr"
            return (
                f"{name}: {first} minus {second} is {decay:.2g} times the parameters before the "
                f"step: the weight decays differ by {amount} ({first}'s minus {second}'s"
                + _decay_values(-decay / learning_rate if learning_rate else None, optimizer, names)
                + ")."
            )
        return None
    side = _zero_side(a, b) if stage == "grads" else None
    if side is not None:
        zero, other = (first, second) if side == 0 else (second, first)
        small, large = (a, b) if side == 0 else (b, a)
        fraction = float(np.max(np.abs(small))) / float(np.max(np.abs(large)))
        exact = f" (to rounding: at most {fraction:.2g} of {other}'s largest)" if fraction else ""
        if by_hand:
            return (
                f"{name}: {zero}'s gradient is zero{exact} where {other}'s is not: in {zero} "
                "the gradient is left at zero (never computed, or overwritten) or the chain "
                "rule stops before this layer, or the loss does not change with it (a "
                "softmax over the batch axis, not the classes', cancels the output layer's "
                "bias)."
            )
        return (
            f"{name}: {zero}'s gradient is zero{exact} where {other}'s is not: in {zero} the "
            "loss does not reach this parameter (left unused or replaced by a constant, or cut "
            "off by stop_gradient or detach) or does not change with it (a log_softmax over "
            "the batch axis, not the classes', cancels the output layer's bias)."
        )
    ratio = _ratio(a, b)
    if ratio is None or not _ZERO_SIDE < abs(ratio) < 1 / _ZERO_SIDE:
        return None  # a "factor" of 1e-9 is a zero on one side, not a factor
    if stage == "grads" and loss_differs and not shared:
        # Some gradients off by a factor where the loss itself differs and matched no
        # known cause: the mistake is in the loss or the forward pass, whose effect on
        # these leaves only looks like a factor. "Not the loss but these leaves' own
        # backward" would send the user away from it (found in a user trial: a
        # log_softmax over the batch axis was put down to fc3.bias's backward).
        return None
    if stage == "state":
        return f"{name}: {first}'s state is {ratio:.4g} times {second}'s. " + _state_cause(
            name, ratio, first, optimizer, step, companion
        )
    cause = _factor_cause(
        ratio, numel_output, batch_size, names, shared, loss, stage=stage, by_hand=by_hand
    )
    if a.size == 1 and cause == GENERIC:
        return None  # any two scalars are a constant multiple of each other
    verb = "are" if stage == "grads" else "is"
    return f"{name}: {first}'s {stage} {verb} {ratio:.4g} times {second}'s. " + cause


#: A side whose largest value is at most this fraction of the other's is zero to
#: rounding: its "factor" (a log_softmax over the batch axis left fc3.bias's gradient
#: at 2.4e-9 of the reference's, found in a user trial) names no scaled loss or step.
_ZERO_SIDE = 1e-6


def _zero_side(a: np.ndarray, b: np.ndarray) -> int | None:
    """0 if ``a`` is zero to rounding where ``b`` is not (:data:`_ZERO_SIDE`), 1 for
    the reverse, else None.

    >>> _zero_side(np.array([1e-12, -3e-13]), np.array([0.5, 0.25]))
    0
    >>> _zero_side(np.array([1e-3, 0.0]), np.array([0.5, 0.25])) is None
    True
    """
    sizes = [float(np.max(np.abs(v), initial=0.0)) for v in (a, b)]
    for side in (0, 1):
        small, large = sizes[side], sizes[1 - side]
        if large > 0 and small <= _ZERO_SIDE * large:
            return side
    return None


#: Backends that run the optimizer as specified: the other side's weight decay is then
#: the spec's plus the fitted difference.
_AS_SPECIFIED = ("reference", "torch", "manual", "the replay")


def _decay_values(difference: float | None, optimizer: OptimizerSpec | None, names) -> str:
    """The rest of the weight-decay hint's parenthesis: the first side's fitted decay
    where the second runs the optimizer as specified, and the defaults only where
    they are the two values (found in a user trial: the defaults were named for a
    0.01 against 0.05 port, and its own value never).

    >>> adamw = OptimizerSpec("adamw", learning_rate=1e-3)
    >>> print(_decay_values(-0.0099, adamw, ("port", "torch")))
    : port's fits 0.0001 where torch's is 0.01: torch's AdamW defaults to 1e-2, optax.adamw to 1e-4
    >>> heavier = dataclasses.replace(adamw, weight_decay=0.05)
    >>> print(_decay_values(-0.04, heavier, ("port", "torch")))
    : port's fits 0.01 where torch's is 0.05
    >>> print(_decay_values(-0.009912, adamw, ("port", "torch")))  # the fit's noise: 1e-4
    : port's fits 0.0001 where torch's is 0.01: torch's AdamW defaults to 1e-2, optax.adamw to 1e-4
    >>> print(_decay_values(-0.01004, adamw, ("port", "torch")))  # no decay
    : port's fits 0 where torch's is 0.01
    >>> print(_decay_values(-0.0499, heavier, ("port", "torch"))[:62])  # optax's 1e-4, or 0
    : port's fits 0 (or optax.adamw's default 1e-4: the fit cannot
    """
    if difference is None or optimizer is None or names[1] not in _AS_SPECIFIED:
        return ""
    if not (math.isfinite(difference) and difference):
        return ""
    # The difference as shown (two digits: the fit's resolution, review found the third
    # noise), so that the value and the leaves it is named for follow the line's text.
    shown = float(f"{difference:.2g}")
    step = 10.0 ** (math.floor(math.log10(abs(shown))) - 1)
    theirs = round((optimizer.weight_decay + shown) / step) * step
    fits = f"{theirs:.2g}"
    ours = optimizer.weight_decay
    if optimizer.name == "adamw" and fits == "0" and f"{1e-4 - ours:.2g}" == f"{-ours:.2g}":
        # Found in a user trial: optax.adamw's default 1e-4 beside torch's 0.05 read
        # "fits 0"; at two digits of 0.05 the fit cannot tell 1e-4 from 0.
        fits += " (or optax.adamw's default 1e-4: the fit cannot tell them apart)"
    text = f": {names[0]}'s fits {fits} where {names[1]}'s is {optimizer.weight_decay:g}"
    if optimizer.name == "adamw" and {f"{theirs:.2g}", f"{optimizer.weight_decay:g}"} == {
        "0.0001",
        "0.01",
    }:
        text += ": torch's AdamW defaults to 1e-2, optax.adamw to 1e-4"
    elif optimizer.name == "adam" and optimizer.weight_decay:
        text += "; torch's Adam(weight_decay) is L2 added to the gradient, AdamW decays decoupled"
    return text


def _decay_difference(
    diff: np.ndarray, before: np.ndarray, update: np.ndarray | None = None
) -> float | None:
    """The k with diff ≈ k·before, when that explains the difference: everywhere (to
    1% of the greatest difference), or, robustly, in 95% of the elements whose
    parameter is at least a tenth of the leaf's greatest (to 5% each, plus float32's
    rounding of the parameter), beside a part proportional to the ``update`` of at
    most 1e-4 of it (float32's bias corrections: optax rounds ``1 - 0.999`` to
    1.3e-5 relative). Adam moves an element whose gradient sits at rounding level by
    up to 2·lr, far more than a decay of 1e-2·lr·|p| (a 784-512-512-10 AdamW port
    with optax's default decay: a few such elements, and the bias correction's
    rounding everywhere, hid the decay; found in a user trial).

    >>> before = np.linspace(1.0, 2.0, 100)
    >>> update = np.where(np.arange(100) % 2, 1e-3, -1e-3)
    >>> diff = -1e-5 * before + 6e-6 * update
    >>> diff[:3] = [3e-3, -2e-3, 1e-3]  # Adam's elements at rounding level
    >>> f"{_decay_difference(diff, before, update):.3g}"
    '-1e-05'
    """
    denom = float(np.vdot(before, before))
    size = float(np.max(np.abs(diff), initial=0.0))
    if denom == 0.0 or size == 0.0:
        return None
    k = float(np.vdot(diff, before)) / denom
    if k != 0.0 and np.max(np.abs(diff - k * before)) <= 1e-2 * size:
        return k
    held = np.abs(before) >= 0.1 * float(np.max(np.abs(before)))
    if np.count_nonzero(held) < 20:
        return None  # too few elements for a robust fit
    p, d = before[held], diff[held]
    step = np.zeros_like(p) if update is None else np.asarray(update, np.float64)[held]

    def following(k: float, c: float) -> np.ndarray:
        return np.abs(d - k * p - c * step) <= 0.05 * np.abs(k * p) + 4 * 2.0**-24 * np.abs(p)

    # Fitted on the elements that follow it: the median's, then least squares on them.
    k, c = float(np.median(d / p)), 0.0
    for _ in range(2):
        near = following(k, c)
        if np.count_nonzero(near) < 20:
            return None
        columns = np.stack([p[near], step[near]], axis=1)
        (k, c), *_ = np.linalg.lstsq(columns, d[near], rcond=None)
        k, c = float(k), float(c)
    near = following(k, c)
    # k itself must stand well above that rounding: at k of a few u, elements whose
    # difference is rounding alone fit any k (found in review: a flushed Adam v was
    # named a weight decay difference of 1.9e-8).
    if abs(k) < 40 * 2.0**-24 or abs(c) > 1e-4 or np.mean(near) < 0.95:
        return None
    return k


def _converter(layout: str | None) -> str:
    """The converter that gives ``layout``'s weights their order, as advice."""
    if layout == "equinox":
        return (
            "convert with equiv.torch_to_equinox(state_dict, model), which keeps torch's (out, in)"
        )
    if layout is not None:
        return f"convert with equiv.torch_to_jax(state_dict, layout={layout!r})"
    return (
        'convert with equiv.torch_to_jax(state_dict, layout=...) in your layout ("flax", '
        '"nnx" or "torch"), or equiv.torch_to_equinox(state_dict, model), which transpose '
        "where the layout needs it"
    )


def diagnose_trees(
    actual: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    failing: list[str],
    **kwargs,
) -> list[str]:
    """:func:`diagnose_leaf` for each failing leaf; ``before`` and ``own_before`` are
    trees. A
    gradient's factor is ``shared`` when every leaf of the trees is off by it."""
    before = kwargs.pop("before", None)
    own_before = kwargs.pop("own_before", None)
    ratios = {}
    if kwargs.get("stage") in ("grads", "state"):
        for name in actual:
            a, b = (np.asarray(t[name], np.float64) for t in (actual, expected))
            finite = a.shape == b.shape and np.all(np.isfinite(a)) and np.all(np.isfinite(b))
            ratios[name] = _ratio(a, b) if finite else None
    hints = []
    for name in failing:
        mine = ratios.get(name)
        extra = {}
        if kwargs.get("stage") == "state":
            # Adam's other moment of the same parameter: the two together tell a
            # scaled gradient (c, c²) or a doubled update (1 + β₁, 1 + β₂) from a β.
            kind, _, param = name.partition(".")
            other = {"exp_avg": "exp_avg_sq", "exp_avg_sq": "exp_avg"}.get(kind)
            extra["companion"] = ratios.get(f"{other}.{param}") if other else None
        else:
            extra["shared"] = mine is None or all(
                r is not None and abs(r - mine) <= 1e-3 * abs(mine) for r in ratios.values()
            )
        hint = diagnose_leaf(
            name,
            actual[name],
            expected[name],
            before=None if before is None else before[name],
            own_before=None if own_before is None else own_before[name],
            **extra,
            **kwargs,
        )
        if hint:
            hints.append(hint)
    return hints


def _factor_cause(
    ratio: float,
    numel_output: int | None,
    batch: int | None,
    names: tuple[str, str] = ("actual", "expected"),
    shared: bool = True,
    loss: str | None = None,
    *,
    stage: str | None = None,
    by_hand: bool = False,
) -> str:
    """What a factor ``ratio`` (``names[0]``'s over ``names[1]``'s) points to. ``shared``:
    every leaf of the stage is off by it (a loss's reduction or convention scales
    every gradient; a factor in some leaves only is in their own backward). ``loss``:
    the model's, where known; MSELoss's conventions are named for MSE only (found in
    review: a cross-entropy loss doubled was put down to optax.l2_loss), and a factor
    of a reduction is told from the side that follows the spec (torch, the reference)
    and the loss's own reduction (found in a user trial: for ``mse_sum``, which sums, a
    loss 8 times the spec's at batch 8 read "sums ... where reference takes the mean").

    >>> _factor_cause(1 / 8, 24, 8, ("port", "torch"))
    'A factor of the batch size: port takes the mean over the batch where torch sums.'
    >>> hint = _factor_cause(8.0, 8, 8, ("port", "reference"), loss="mse_sum")
    >>> for part in hint.split(" where "):
    ...     print(part)
    A factor of the batch size: port multiplies by the batch size
    reference's loss (mse_sum) sums over the batch with no factor.
    >>> _factor_cause(1 / 8, 8, 8, ("torch", "port"), loss="mse_sum").split(": ")[1][:45]
    'port multiplies by the batch size where torch'
    >>> for part in _factor_cause(1 / 8, 8, 8, ("port", "reference"), loss="mse").split(", "):
    ...     print(part)
    A factor of the batch size: port divides by the batch size once more than reference
    whose loss (mse) is the mean over the batch.
    >>> _factor_cause(64 / 63, 64, 64, ("port", "reference"), loss="mse")[:60]
    'A factor 64/63: port divides by 63, the batch size less one,'
    >>> _factor_cause(2.0, 16, 8, ("port", "reference"), loss="mse")[:75]
    "A factor 2, port's the larger: port sums over the 2 outputs where MSELoss t"
    >>> _factor_cause(0.5, 16, 8, ("port", "reference"), loss="mse")[:40]
    "A factor 2: torch's MSELoss is mean((p -"
    >>> _factor_cause(-1.0, 24, 8, ("port", "torch"))[:52]
    'The sign is flipped: a gradient of the negated loss '
    >>> print(_factor_cause(3.0, 24, 8, ("port", "reference"), loss="mse_sum")[-64:])  # sums
    reference's loss (mse_sum) sums over the outputs with no factor.
    >>> _factor_cause(-1.0, 24, 8, ("port", "torch"), stage="grads")[-22:]  # no update yet
    '(p - y written y - p).'

    ``by_hand``: the side off the spec is a hand-written backward (:func:`diagnose_leaf`).

    >>> _factor_cause(0.5, 16, 8, ("grad_fn", "the float64 reference"), stage="grads",
    ...               loss="mse", by_hand=True)[:69]
    'A factor 2: the gradient of mean((p - y)²) is 2(p - y)/n; a backward '
    >>> _factor_cause(0.5, 24, 8, ("port", "torch"), shared=False)[:60]
    'A factor 0.5 in these gradients only, not in every one: not '
    """
    first, second = names
    reduction = LOSSES[loss].reduction if loss in LOSSES else None
    odd = _off_spec(names)

    def near(x: float | None) -> bool:
        return x is not None and x > 0 and (abs(ratio / x - 1) < 1e-3 or abs(ratio * x - 1) < 1e-3)

    def sums(what: str, count: str) -> tuple[str, bool]:
        """The reduction each side takes over ``what``, and whether one sums where the
        other takes the mean (not: a mean divided again, a sum multiplied)."""
        if reduction is None or odd is None:  # which side follows the spec is not known
            if ratio > 1:
                return f"{first} sums over {what} where {second} takes the mean", True
            return f"{first} takes the mean over {what} where {second} sums", True
        side, spec_side = names[odd], names[1 - odd]
        larger = (ratio > 1) == (odd == 0)  # the off side's loss is the larger
        if reduction == "mean" and larger:
            return f"{side} sums over {what} where {spec_side} takes the mean", True
        if reduction == "mean":
            return (
                f"{side} divides by {count} once more than {spec_side}, whose loss ({loss}) "
                f"is the mean over {what}"
            ), False
        if larger:
            return (
                f"{side} multiplies by {count} where {spec_side}'s loss ({loss}) sums over "
                f"{what} with no factor"
            ), False
        return f"{side} takes the mean over {what} where {spec_side}'s loss ({loss}) sums", True

    if near(batch) and batch not in (1,):  # a per-leaf reduction: shared or not
        return f"A factor of the batch size: {sums('the batch', 'the batch size')[0]}."
    if abs(ratio + 1) < 1e-3:
        where = "" if shared else " in these gradients only (their own backward)"
        # An update's sign shows in the parameters only (found in a user trial: a
        # gradient check, which takes no step, was told about one).
        update = "" if stage in ("loss", "grads") else ", or an update added instead of subtracted"
        return (
            f"The sign is flipped{where}: a gradient of the negated loss (p - y written "
            f"y - p){update}."
        )
    if not shared:
        return (
            f"A factor {ratio:.4g} in these gradients only, not in every one: not the loss (its "
            "reduction or convention scales every gradient) but these leaves' own backward "
            "(their chain rule or reduction)."
        )
    divisor = _one_less(ratio, numel_output, batch, names) if reduction != "sum" else None
    if divisor:
        return divisor
    mse = loss in (None, "mse")
    if near(numel_output) and numel_output not in (1, 2):
        text, sum_for_mean = sums("the batch and the outputs", "batch · outputs")
        if not sum_for_mean:
            return f"A factor of batch · outputs: {text}."
        return f"A sum where the other takes the mean: {text}" + (
            " (MSELoss(reduction='sum') vs 'mean')." if mse else "."
        )
    outputs = numel_output // batch if numel_output and batch else None
    if near(2.0) and mse:
        halved = (
            "A factor 2: torch's MSELoss is mean((p - y)²) while optax.l2_loss is ½(p - y)² "
            "per element; by hand, the gradient of mean((p - y)²) is 2(p - y)/n."
        )
        if by_hand:
            # Found in a user trial: a hand-written backward was told about optax first.
            halved = (
                "A factor 2: the gradient of mean((p - y)²) is 2(p - y)/n; a backward that "
                "starts from (p - y)/n halves every gradient."
                if stage != "loss"
                else "A factor 2: MSELoss is mean((p - y)²), with no ½ in front."
            )
        if odd is None:
            return halved
        # The direction decides (found in a user trial: a loss twice the spec's, summed
        # over 2 outputs, was told about optax.l2_loss's ½).
        side = names[odd]
        if (ratio > 1) != (odd == 0):
            return halved
        width = (
            f"{side} sums over the {outputs} outputs where MSELoss takes the mean over them "
            "too (a loss summed per sample, then averaged over the batch), or "
            if outputs == 2
            else ""
        )
        return (
            f"A factor 2, {side}'s the larger: {width}{side} counts the 2 of the gradient "
            "of mean((p - y)²), 2(p - y)/n, twice (in the loss and again in its backward)."
        )
    if near(2.0):
        return (
            f"A factor 2, not MSE's: the {loss} loss counted twice or halved, or a factor "
            "2 in its formula or its backward."
        )
    if near(outputs) and outputs not in (1, 2):
        text, sum_for_mean = sums("the outputs", "the output width")
        # Which way decides the example (found in review: a backward a third of the
        # spec's was told it divided by the batch size only), and the loss's own
        # reduction: a summed loss's text says what each side does, with no example.
        if reduction == "sum":
            return f"A factor of the output width: {text}."
        if sum_for_mean:
            how = (
                "dout divided by the batch size where MSELoss divides by batch · outputs, out.size"
                if by_hand and mse
                else "a loss summed per sample, then averaged over the batch, or averaged "
                "over batch and classes"
            )
        else:
            how = (
                "dout divided by out.size and again by the output width"
                if by_hand and mse
                else "a mean over the outputs taken twice"
            )
        return f"A factor of the output width: {text} ({how})."
    return GENERIC


#: Backends that compute the spec's loss: a factor of a reduction is the other side's.
_SPEC_LOSS = ("reference", "torch", "manual", "jax", "the replay", "the float64 reference")


def _off_spec(names: tuple[str, str]) -> int | None:
    """The index of the side of ``names`` that does not follow the spec, where the
    other does (:data:`_SPEC_LOSS`), else None.

    >>> _off_spec(("port", "reference")), _off_spec(("torch", "port"))
    (0, 1)
    >>> _off_spec(("jax", "torch")) is None  # equiv's own backends both follow it
    True
    """
    follows = [name in _SPEC_LOSS for name in names]
    return follows.index(False) if follows.count(False) == 1 else None


def _one_less(ratio: float, numel_output: int | None, batch: int | None, names) -> str | None:
    """The cause of a factor ``n/(n - 1)``, ``n`` the batch or batch · outputs, at least
    3 (``2/1`` is MSE's factor 2): a mean's divisor one less than ``n`` on the side that
    does not follow the spec (:func:`_off_spec`; either, where that is not known).
    Within 1e-5 relative, far above float32's rounding of a loss and its ratio, and at
    most ``0.25/n²``, a quarter of the way to ``n/(n - 2)`` and ``(n + 1)/n``; a factor
    within 1e-3 of 1 (``n`` from about 1000 on) is no factor (:func:`_ratio`). A single
    number near 1 is too easily near one of these by chance: at 1e-2 a wrong loss 1.253
    times the spec's was named a divisor 4 for 5 (found in review). Found in a user
    trial: ``sum(...) / (n - 1)`` was a bare "constant factor" on the gradients and
    nothing on the loss.

    >>> for part in _one_less(63 / 64, 64, 64, ("torch", "port")).split(", "):
    ...     print(part)
    A factor 64/63: port divides by 63
    the batch size less one
    where torch divides by the batch size
    64 (a sum over 64 terms divided as an unbiased variance is
    or an off-by-one count).
    >>> _one_less(63 / 64, 64, 64, ("port", "torch")) is None  # port's the smaller
    True
    >>> _one_less(65 / 64, 64, 64, ("port", "torch")) is None  # (n + 1)/n
    True
    """
    odd = _off_spec(names)
    sides = [names, names[::-1]] if odd is None else [names if odd == 0 else names[::-1]]
    for n, count in ((batch, "the batch size"), (numel_output, "batch · outputs")):
        if n is None or n < 3:
            continue
        for off, other in sides:
            # The off side's loss over the other's.
            factor = ratio if off == names[0] else 1 / ratio
            if abs(factor * (n - 1) / n - 1) <= min(1e-5, 0.25 / n**2):
                return (
                    f"A factor {n}/{n - 1}: {off} divides by {n - 1}, {count} less one, "
                    f"where {other} divides by {count}, {n} (a sum over {n} terms divided as "
                    "an unbiased variance is, or an off-by-one count)."
                )
    return None


def _state_cause(
    name: str,
    ratio: float,
    first: str,
    optimizer: OptimizerSpec | None,
    step: int | None,
    companion: float | None = None,
) -> str:
    """What an optimizer state off by ``ratio`` where the gradients agree points to: its
    hyper-parameters, fitted at step 1 where the state is one term (found in review: a
    β₂ of 0.98 against 0.999 was put down to MSELoss's factor 2). With Adam's other
    moment off by ``companion``: ``(c, c²)`` is the gradient scaled by ``c`` before the
    optimizer, ``(1 + β₁, 1 + β₂)`` at step 1 its update run twice on one gradient
    (found in a user trial: both were put down to a β).

    >>> adam = OptimizerSpec("adam", learning_rate=1e-3)
    >>> _state_cause("exp_avg_sq.fc1.weight", 20.0, "port", adam, 1)
    "At step 1 it is (1 - β₂)·g²: port's β₂ is 0.98, not 0.999."
    >>> _state_cause("exp_avg.fc1.weight", 0.35, "port", adam, 1, companion=0.1225)[:58]
    "port's optimizer takes the gradient scaled by 0.35 (exp_av"
    """
    kind = name.split(".", 1)[0]
    moments = {"exp_avg": (0, "β₁", "g"), "exp_avg_sq": (1, "β₂", "g²")}
    adam = optimizer is not None and optimizer.name in ("adam", "adamw")
    if adam and kind in moments and companion is not None:
        m, v = (ratio, companion) if kind == "exp_avg" else (companion, ratio)
        b1, b2 = optimizer.betas
        if step == 1 and abs(m - 1 - b1) < 1e-3 and abs(v - 1 - b2) < 1e-3:
            return (
                f"{first}'s exp_avg is (1 + β₁) and exp_avg_sq (1 + β₂) times the other's at "
                "step 1: its optimizer's update ran twice on the same gradient (two "
                "tx.update calls, or optimizer.step() twice)."
            )
        if m > 0 and abs(v - m * m) <= 1e-3 * m * m:
            return (
                f"{first}'s optimizer takes the gradient scaled by {m:.4g} (exp_avg by c, "
                "exp_avg_sq by c²) where the gradients agree: a transformation before it "
                "(optax.clip_by_global_norm, a scaled loss or gradient)."
            )
    if step == 1 and adam and kind in moments:
        index, symbol, term = moments[kind]
        beta = optimizer.betas[index]
        return (
            f"At step 1 it is (1 - {symbol})·{term}: {first}'s {symbol} is "
            f"{1 - ratio * (1 - beta):.6g}, not {beta:.6g}."
        )
    return (
        "Where the gradients agree, the optimizer's hyper-parameters differ: Adam's β₁ "
        "scales exp_avg's new term by (1 - β₁) and β₂ exp_avg_sq's by (1 - β₂); SGD's "
        "dampening scales the momentum buffer's by (1 - dampening), from step 2 in torch."
    )


def _ratio(a: np.ndarray, b: np.ndarray) -> float | None:
    """The r with a ≈ r·b when that explains the difference and r is not 1.

    Scaled to the larger magnitude first: a diverging run's 1e200s would overflow
    ``b·b`` and make r NaN.

    >>> _ratio(np.array([2e200, 4e200]), np.array([1e200, 2e200]))
    2.0
    """
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    if not 0.0 < scale < math.inf:
        return None
    a, b = a / scale, b / scale
    denom = float(np.vdot(b, b))
    if denom == 0.0:
        return None
    r = float(np.vdot(a, b)) / denom
    if not math.isfinite(r) or abs(r - 1.0) < 1e-3 or np.max(np.abs(a - r * b)) > _EXPLAINED:
        return None
    return r


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    return bool(np.max(np.abs(a - b), initial=0.0) <= _EXPLAINED * scale)


def precision_cause(
    name: str,
    a: np.ndarray,
    b: np.ndarray,
    dtype: str | None,
    names: tuple[str, str],
    *,
    by_hand: bool = False,
) -> str | None:
    """The cause of ``a`` and ``b`` differing where one side's values are all numbers of
    a narrower format than the run's ``dtype`` (float32 in a float64 run, float16 or
    bfloat16 in a float32 one), or None. ``a``, ``b``: float64 arrays of one shape.

    >>> precision_cause("w", np.array([0.1, 0.2]), np.float32([0.1, 0.2]).astype(float),
    ...                 "float64", ("port", "torch"))[:60]
    "w: torch's values are all float32 numbers in a float64 run: "
    """
    first, second = names
    if dtype == "float64" and _float32_representable(a) != _float32_representable(b):
        narrow = first if _float32_representable(a) else second
        jax = (
            ""
            if by_hand
            else "JAX truncates float64 to float32 unless x64 is on: "
            "`with jax.enable_x64(True): ...`; "
        )
        return (
            f"{name}: {narrow}'s values are all float32 numbers in a float64 run: it computed in "
            f"float32. {jax}NumPy and torch compute in float32 where an input or a constant "
            "array is float32"
            + (", or where the result is cast (.astype(np.float32))." if by_hand else ".")
        )
    if dtype == "float32":
        # Half precision in a float32 run (found in a user trial: a hand-written backward
        # returning float16 gradients was caught with no cause).
        # bfloat16 first: its numbers (8 significant bits) are float16's too, mostly.
        # At least 8 distinct values: a few simple ones (±1/8, found in a review of this
        # check: a log_softmax's gradients) are every format's by chance.
        for half, rounding in (("bfloat16", "2⁻⁸"), ("float16", "2⁻¹¹")):
            ra, rb = _representable(a, half, distinct=8), _representable(b, half, distinct=8)
            if ra != rb:
                narrow = first if ra else second
                return (
                    f"{name}: {narrow}'s values are all {half} numbers in a float32 run: it "
                    f"computed or returned them in {half}, whose rounding ({rounding} "
                    "relative) is far beyond float32's. Compute and return float32."
                )
    return None


def _float32_representable(a: np.ndarray) -> bool:
    return _representable(a, "float32")


def _representable(a: np.ndarray, dtype: str, distinct: int = 1) -> bool:
    """Whether every value of ``a`` (float64, finite) is a number of ``dtype``, with at
    least ``distinct`` distinct values other than 0 (zeros are every format's).

    >>> _representable(np.array([0.5, 1.0]), "float16"), _representable(np.array([0.1]), "float16")
    (True, False)
    """
    import ml_dtypes  # JAX's own dependency, for bfloat16

    kind = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    with np.errstate(over="ignore"):
        back = a.astype(kind).astype(np.float64)
    nonzero = np.unique(np.abs(a[a != 0]))
    return nonzero.size >= distinct and bool(np.all(back == a))


# ---------------------------------------------------------------------------
# Optimizers: which known misreading of the optimizer reproduces a run's updates


@dataclasses.dataclass(frozen=True)
class OptimizerVariant:
    """A known way of getting an optimizer wrong, as an update rule.

    The rule is ``rule(spec, params, grads, state, step)`` (by default ``spec``'s own
    update, :func:`equiv.optimizers.manual_update`; the rules below change Adam's
    division), then ``decay_after · learning_rate · p`` subtracted: weight decay
    applied to the update after the momentum rather than to the gradient before it.
    """

    what: str
    spec: OptimizerSpec
    decay_after: float = 0.0
    rule: Callable[..., tuple[dict, dict]] = manual_update


def _eps_root_rule(eps_root: float) -> Callable[..., tuple[dict, dict]]:
    """Adam with ``ε`` inside the square root, ``m̂ / √(v̂ + ε)`` for torch's
    ``m̂ / (√v̂ + ε)`` (optax's ``eps_root`` taken for its ``eps``), by torch's own rule
    with ``ε = 0``: its second moment is shifted by ``ε·(1 - β₂ᵗ)`` for the step (so
    that ``√(v̂ + ε) = √((v + ε·(1 - β₂ᵗ)) / (1 - β₂ᵗ))``), and the state kept unshifted.
    """

    def rule(spec: OptimizerSpec, before, g, state, step: int):
        shift = eps_root * (1 - spec.betas[1] ** float(step))
        # manual_update computes v_t = β₂·v + (1 - β₂)·g²: shift the v it starts from.
        shifted = {
            **state,
            "exp_avg_sq": {n: v + shift / spec.betas[1] for n, v in state["exp_avg_sq"].items()},
        }
        predicted, new = manual_update(spec, before, g, shifted, step)
        new["exp_avg_sq"] = {n: v - shift for n, v in new["exp_avg_sq"].items()}
        return predicted, new

    return rule


def _eps_before_correction(spec: OptimizerSpec, before, g, state, step: int):
    """Adam as Keras (and the Adam paper's "efficient version") writes it: the step
    size ``lr·√(1 - β₂ᵗ)/(1 - β₁ᵗ)`` times ``m / (√v + ε)``, ``ε`` added before the
    bias correction. That is torch's ``m̂ / (√v̂ + ε)`` with ``ε / √(1 - β₂ᵗ)`` for ``ε``:
    31.6 times ``ε`` at step 1 at ``β₂ = 0.999``, shrinking to ``ε`` as ``t`` grows."""
    wider = dataclasses.replace(spec, eps=spec.eps / math.sqrt(1 - spec.betas[1] ** float(step)))
    return manual_update(wider, before, g, state, step)


def _nesterov_adam(spec: OptimizerSpec, before, g, state, step: int):
    """Adam with Nesterov momentum, as ``optax.adam(..., nesterov=True)``,
    ``optax.nadam`` and ``optax.nadamw`` compute it (Dozat 2016): the first moment
    used is ``β₁·m_t/(1 - β₁ᵗ⁺¹) + (1 - β₁)·g/(1 - β₁ᵗ)``, not ``m_t/(1 - β₁ᵗ)``; the
    moments themselves are Adam's. 1.47 times Adam's first update at ``β₁ = 0.9``."""
    _, new = manual_update(spec, before, g, state, step)
    lr, lam, (beta1, beta2) = spec.learning_rate, spec.weight_decay, spec.betas
    predicted = {}
    for name, p in before.items():
        grad = g[name] + (lam * p if spec.name == "adam" else 0.0)
        start = p * (1 - lr * lam) if spec.name == "adamw" else p
        m_hat = beta1 * new["exp_avg"][name] / (1 - beta1 ** (step + 1)) + (1 - beta1) * grad / (
            1 - beta1**step
        )
        v_hat = new["max_exp_avg_sq" if spec.amsgrad else "exp_avg_sq"][name] / (1 - beta2**step)
        predicted[name] = start - lr * m_hat / (np.sqrt(v_hat) + spec.eps)
    return predicted, new


def _bias_corrections(first: bool, second: bool, ahead: int = 0) -> Callable[..., tuple]:
    """Adam with its bias corrections as a port may get them wrong: the first moment's
    (``1 - β₁ᵗ``) and the second's (``1 - β₂ᵗ``) each kept or left out, and counted from
    ``t + ahead``. Found in a user trial: all left out, the only hint was a learning
    rate 3.162 times torch's, which is ``(1 - β₁)/√(1 - β₂)`` at step 1."""

    def rule(spec: OptimizerSpec, before, g, state, step: int):
        _, new = manual_update(spec, before, g, state, step)
        lr, lam, (beta1, beta2) = spec.learning_rate, spec.weight_decay, spec.betas
        c1 = 1 - beta1 ** float(step + ahead) if first else 1.0
        c2 = 1 - beta2 ** float(step + ahead) if second else 1.0
        v = new["max_exp_avg_sq" if spec.amsgrad else "exp_avg_sq"]
        predicted = {}
        for name, p in before.items():
            start = p * (1 - lr * lam) if spec.name == "adamw" else p
            m_hat, v_hat = new["exp_avg"][name] / c1, v[name] / c2
            predicted[name] = start - lr * m_hat / (np.sqrt(v_hat) + spec.eps)
        return predicted, new

    return rule


def optimizer_variants(spec: OptimizerSpec) -> list[OptimizerVariant]:
    """The known misreadings of ``spec`` that change its updates.

    Each variant's ``what`` says what the misreading run does, then the fix.

    Example:
      >>> spec = OptimizerSpec("adam", learning_rate=1e-2, weight_decay=0.1)
      >>> for variant in optimizer_variants(spec):
      ...     print(variant.what.split(",")[0].split(" (")[0])
      decays the weights decoupled
      puts eps=1e-08 inside the square root
      adds eps=1e-08 before the bias correction
      uses Nesterov momentum
      leaves out Adam's bias corrections
      leaves out the first moment's bias correction
      leaves out the second moment's bias correction
      counts the bias corrections from t + 1
    """
    lam, mu, variants = spec.weight_decay, spec.momentum, []
    replace = dataclasses.replace
    if spec.name == "adam" and lam:
        variants.append(
            OptimizerVariant(
                f"decays the weights decoupled, as AdamW and optax.adamw do; torch's "
                f"Adam(weight_decay={lam:g}) adds {lam:g}·p to the gradient (L2): use "
                f"optax.chain(optax.add_decayed_weights({lam:g}), optax.adam(...))",
                replace(spec, name="adamw"),
            )
        )
    if spec.name == "adamw" and lam:
        variants.append(
            OptimizerVariant(
                f"adds {lam:g}·p to the gradient (L2, as torch's Adam(weight_decay) does); "
                f"torch's AdamW decays the weights decoupled: use "
                f"optax.adamw(..., weight_decay={lam:g})",
                replace(spec, name="adam"),
            )
        )
    if spec.name == "sgd" and mu and lam:
        variants.append(
            OptimizerVariant(
                f"adds the weight decay {lam:g}·p after the momentum (optax.trace before "
                "optax.add_decayed_weights); torch adds it to the gradient before the "
                "momentum: put optax.add_decayed_weights first",
                replace(spec, weight_decay=0.0),
                decay_after=lam,
            )
        )
    if spec.name == "sgd" and mu and spec.dampening:
        variants.append(
            OptimizerVariant(
                f"ignores dampening={spec.dampening:g} (optax.sgd has none); torch's buffer is "
                f"{mu:g}·b + (1 - {spec.dampening:g})·g after step 1: use "
                "equiv.optimizers.make_optax(spec), which has it",
                replace(spec, dampening=0.0),
            )
        )
    if spec.name == "sgd" and mu and not spec.dampening:
        variants.append(
            OptimizerVariant(
                f"uses nesterov={not spec.nesterov}; torch's SGD here has nesterov="
                f"{spec.nesterov}: use optax.sgd(..., momentum={mu:g}, "
                f"nesterov={spec.nesterov})",
                replace(spec, nesterov=not spec.nesterov),
            )
        )
    if spec.name in ("adam", "adamw") and not spec.amsgrad and spec.eps and spec.betas[1] > 0:
        variants.append(
            OptimizerVariant(
                f"puts eps={spec.eps:g} inside the square root, m̂/√(v̂ + eps) (optax's "
                f"eps_root); torch divides by √v̂ + eps: use optax.{spec.name}(..., "
                f"eps={spec.eps:g}, eps_root=0.0"
                + (f", weight_decay={spec.weight_decay:g}" if spec.name == "adamw" else "")
                + ")",
                replace(spec, eps=0.0),
                rule=_eps_root_rule(spec.eps),
            )
        )
    if spec.name in ("adam", "adamw") and spec.eps and spec.betas[1] > 0:
        variants.append(
            OptimizerVariant(
                f"adds eps={spec.eps:g} before the bias correction, lr·√(1-β₂ᵗ)/(1-β₁ᵗ)·"
                f"m/(√v + eps) (Keras's Adam, the Adam paper's efficient version): "
                f"eps/√(1-β₂ᵗ) in torch's terms, {spec.eps / math.sqrt(1 - spec.betas[1]):.3g}"
                f" at step 1; torch divides by √v̂ + eps: use optax.{spec.name}(..., "
                f"eps={spec.eps:g})",
                spec,
                rule=_eps_before_correction,
            )
        )
    if spec.name in ("adam", "adamw") and spec.betas[0] > 0:
        variants.append(
            OptimizerVariant(
                f"uses Nesterov momentum (optax.{spec.name}(..., nesterov=True), optax.nadam"
                f"{'w' if spec.name == 'adamw' else ''}): its first update is "
                f"{1 + spec.betas[0] / (1 + spec.betas[0]):.4g} times Adam's; torch's "
                f"{'AdamW' if spec.name == 'adamw' else 'Adam'} has none: use "
                f"optax.{spec.name}(..., nesterov=False)",
                spec,
                rule=_nesterov_adam,
            )
        )
    if spec.name in ("adam", "adamw") and 0 < spec.betas[0] and 0 < spec.betas[1]:
        fix = "torch divides m̂ = m/(1 - β₁ᵗ) by √v̂ + eps, v̂ = v/(1 - β₂ᵗ), t from 1"
        for what, first, second, ahead in (
            ("leaves out Adam's bias corrections (m/(√v + eps) for m̂/(√v̂ + eps))", 0, 0, 0),
            ("leaves out the first moment's bias correction (m for m̂ = m/(1 - β₁ᵗ))", 0, 1, 0),
            ("leaves out the second moment's bias correction (v for v̂ = v/(1 - β₂ᵗ))", 1, 0, 0),
            ("counts the bias corrections from t + 1 (1 - βᵗ⁺¹ for 1 - βᵗ)", 1, 1, 1),
        ):
            rule = _bias_corrections(bool(first), bool(second), ahead)
            variants.append(OptimizerVariant(f"{what}; {fix}", spec, rule=rule))
    # A weight decay that is missing or has another value is not a variant: the
    # per-leaf decay detector measures by how much the decays differ.
    return variants


#: A variant explains a run when its updates match the run's to this fraction of
#: the largest update at every step. A float32 run's update, read as
#: p_after - p_before, carries about u·|p| = 6e-8·|p| of rounding: below 1e-4 of
#: the update whenever a step moves the parameters by more than 6e-4 of their size
#: (with smaller steps the optimizer's own rule misses by more than the threshold
#: too, and the detector stays silent rather than guess). A variant is named only
#: if every mundane explanation misses by more than ten times the threshold: the
#: optimizer itself, the optimizer without its weight decay or without its momentum
#: (where no fitted momentum, 0 included, replays the run: :func:`_momentum_variant`),
#: and the optimizer with the learning rate that best fits step 1. That rules out
#: what step 1 cannot tell apart: Adam's first update is lr·sign(g) with or without
#: L2 decay, Nesterov's first is (1 + momentum) times the plain one, and decay
#: after momentum and dampening change nothing before step 2.
UPDATE_EXPLAINED = 1e-4


def diagnose_optimizer(
    spec: OptimizerSpec,
    initial: Mapping[str, np.ndarray],
    grads: Sequence[Mapping[str, np.ndarray]],
    params: Sequence[Mapping[str, np.ndarray]],
) -> str | None:
    """What the run does, if a known misreading of ``spec`` (:func:`optimizer_variants`)
    reproduces its parameter updates and nothing more mundane does; else None.

    Each rule is replayed in float64 on the run's own gradients, from the run's own
    parameters before each step, carrying its own state: a wrong gradient does not
    hide a wrong optimizer, nor the reverse.

    Args:
      spec: the optimizer the run should have used.
      initial: the parameters before step 1, by torch name.
      grads, params: per step, the run's gradients and its parameters after the step.

    Example:
      >>> import numpy as np
      >>> spec = OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, dampening=0.5)
      >>> p0, g = {"w": np.array([1.0, -2.0])}, {"w": np.array([0.5, 0.25])}
      >>> p1 = {"w": p0["w"] - 0.1 * g["w"]}  # torch: buffer = g at step 1
      >>> p2 = {"w": p1["w"] - 0.1 * (0.9 + 1) * g["w"]}  # dampening ignored
      >>> diagnose_optimizer(spec, p0, [g, g], [p1, p2]).split(" (")[0]
      'ignores dampening=0.5'
    """
    variants = optimizer_variants(spec)
    if not params:
        return None
    eps = _eps_variant(spec, initial, grads, params)
    if eps is not None:
        variants.append(eps)
    mundane = [spec]
    if spec.weight_decay:
        mundane.append(dataclasses.replace(spec, weight_decay=0.0))
    momentum = _momentum_variant(spec, initial, grads, params)
    if momentum is not None:
        variants.append(momentum)
    elif spec.momentum:
        mundane.append(dataclasses.replace(spec, momentum=0.0, dampening=0.0, nesterov=False))
    fitted = _fitted_learning_rate(spec, initial, grads[0], params[0])
    faster = None if fitted is None else dataclasses.replace(spec, learning_rate=fitted)
    for other in mundane + ([faster] if faster else []):
        residual = optimizer_residual(OptimizerVariant("", other), initial, grads, params)
        if residual <= 10 * UPDATE_EXPLAINED:
            if other is not faster:
                # Near enough to blame nothing, unless a misreading replays the run ten
                # times nearer still (found in a user trial: optax.adam(eps=3e-8) for
                # torch's 1e-8 replayed to 9e-4 as torch's Adam, to 2e-5 with its ε).
                for variant in variants:
                    nearer = optimizer_residual(variant, initial, grads, params)
                    if nearer <= UPDATE_EXPLAINED and 10 * nearer < residual:
                        return variant.what
                return None
            # One step cannot tell a variant whose first update is a multiple of the
            # optimizer's (Nesterov's: 1.47 times Adam's, 1 + μ times SGD's) from a
            # learning rate that much larger: name both, or leave it to the learning
            # rate's hint.
            for variant in variants:
                if optimizer_residual(variant, initial, grads, params) <= UPDATE_EXPLAINED:
                    factor = fitted / spec.learning_rate
                    return (
                        f"moves {factor:.4g} times as far as torch's {spec.name}: its learning "
                        f"rate is {factor:.4g} times torch's, or it {variant.what} ("
                        f"{len(params)} step{'s' if len(params) > 1 else ''} cannot tell the "
                        "two apart, a second step can)"
                    )
            return None
    if spec.name in ("adam", "adamw"):
        # Along the gradient itself: an SGD chain in place of Adam (a user trial).
        moves, slopes = _moves_and_slopes(initial, grads[0], params[0])
        # Relative to the moves themselves (_ratio scales by the larger of the two,
        # which a gradient far larger than its update would pass trivially).
        denom = float(np.vdot(slopes, slopes))
        along = float(np.vdot(moves, slopes)) / denom if denom > 0 else 0.0
        off = float(np.max(np.abs(moves - along * slopes), initial=0.0))
        if along < 0 and np.isfinite(along) and off <= 1e-2 * np.max(np.abs(moves)):
            return (
                f"steps along the gradient itself, {-along:.3g}·g at step 1 (SGD), not "
                f"Adam's m̂/(√v̂ + eps), which moves every element by about the learning "
                f"rate: use optax.{spec.name}(...)"
            )
    if spec.name == "sgd":
        # The mirror: Adam's first update, lr·g/(|g| + ε) ≈ lr·sign(g), where torch's
        # SGD takes lr·g (a user trial: optax.adamw for check_jax_port's plain SGD
        # failed 60 leaves with no cause named).
        size = _sign_step(initial, grads[0], params[0])
        if size is not None:
            rate = (
                "the learning rate"
                if abs(size / spec.learning_rate - 1) <= 0.1
                else f"{size:.3g} (torch's learning rate is {spec.learning_rate:g})"
            )
            return (
                f"moves every element by about {rate} at step 1 whatever its gradient's size, "
                "as Adam does (lr·sign(g) at step 1), where torch's SGD moves it by lr·g: pass "
                'optimizer=equiv.OptimizerSpec("adam" or "adamw", ...) to compare against '
                "torch's Adam, or use optax.sgd in the port"
            )
    for variant in variants:
        if optimizer_residual(variant, initial, grads, params) <= UPDATE_EXPLAINED:
            return variant.what
    return None


def _sign_step(
    initial: Mapping[str, np.ndarray],
    grads: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
) -> float | None:
    """The size ``s`` when a step moves 90% of the elements with a gradient by ``-s·sign(g)``
    (to 10%: AdamW's decoupled decay moves them by ``lr·λ·|p|`` more) and those elements'
    gradients span a factor of 4 or more, so that ``lr·g`` cannot do it; else None.

    >>> g = {"w": np.array([1e-3, -0.5, 2.0, 0.1])}
    >>> p0 = {"w": np.zeros(4)}
    >>> _sign_step(p0, g, {"w": -1e-2 * g["w"] / (np.abs(g["w"]) + 1e-8)})
    0.01
    >>> _sign_step(p0, g, {"w": -1e-2 * g["w"]}) is None  # SGD
    True
    """
    moves, slopes = _moves_and_slopes(initial, grads, after)
    moves, slopes = moves[slopes != 0], slopes[slopes != 0]
    if moves.size < 4 or not np.all(np.isfinite(moves)):
        return None
    size = float(np.median(np.abs(moves)))
    if size == 0.0:
        return None
    follows = np.abs(moves + size * np.sign(slopes)) <= 0.1 * size
    if np.mean(follows) < 0.9:
        return None
    spread = np.abs(slopes[follows])
    if float(np.max(spread)) < 4 * float(np.min(spread)):
        return None
    return float(f"{size:.3g}")


def _moves_and_slopes(initial, grads, after) -> tuple[np.ndarray, np.ndarray]:
    """A step's moves ``after - initial`` and its gradients, every leaf flattened in
    float64, in one order."""
    before, grads, after = _wide(initial), _wide(grads), _wide(after)
    moves = np.concatenate([(after[n] - before[n]).ravel() for n in before])
    return moves, np.concatenate([grads[n].ravel() for n in before])


def optimizer_residual(
    variant: OptimizerVariant,
    initial: Mapping[str, np.ndarray],
    grads: Sequence[Mapping[str, np.ndarray]],
    params: Sequence[Mapping[str, np.ndarray]],
) -> float:
    """max over steps of max |variant's update - run's update| / max |run's update|.

    A step that moves nothing counts only if the variant moves something (then it
    cannot explain the run); a non-finite value makes the residual infinite.
    """
    before, state, worst = _wide(initial), None, 0.0
    for step, (g, after) in enumerate(zip(grads, params, strict=True), start=1):
        g, after = _wide(g), _wide(after)
        if state is None:
            state = manual_init(variant.spec, before)
        predicted, state = variant.rule(variant.spec, before, g, state, step)
        lr = variant.spec.learning_rate
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: checked below
            scale = max(float(np.max(np.abs(after[n] - before[n]), initial=0.0)) for n in after)
            miss = max(
                float(
                    np.max(
                        np.abs(predicted[n] - variant.decay_after * lr * before[n] - after[n]),
                        initial=0.0,
                    )
                )
                for n in after
            )
        if not (np.isfinite(miss) and np.isfinite(scale)):
            return np.inf
        if scale == 0.0:
            if miss != 0.0:
                return np.inf
        else:
            worst = max(worst, miss / scale)
        before = after
    return worst


def _fitted_learning_rate(spec, initial, grads, after) -> float | None:
    """The learning rate that best explains step 1 (every update here is linear in it)."""
    before = _wide(initial)
    predicted, _ = manual_update(spec, before, _wide(grads), manual_init(spec, before), 1)
    ours = np.concatenate([(predicted[n] - before[n]).ravel() for n in before])
    after = _wide(after)
    theirs = np.concatenate([(after[n] - before[n]).ravel() for n in before])
    denom = float(np.vdot(ours, ours))
    if denom == 0.0 or not np.isfinite(denom):
        return None
    fitted = spec.learning_rate * float(np.vdot(ours, theirs)) / denom
    return fitted if fitted > 0 and np.isfinite(fitted) else None


def _fitted_eps(spec, initial, grads, after) -> tuple[float, float] | None:
    """Adam's ε that explains step 1 and the fit's standard error, or None: there
    each update is
    ``lr·g/(|g| + ε)`` (``g + λ·p`` under L2; AdamW first decays ``p`` by ``1 - lr·λ``),
    so ``ε = |g|·(lr/|Δ| - 1)`` for each element that moved; their mean weighted by
    the inverse square of each one's error (the rounding of the parameters after the
    step, ``|g|·lr·δΔ/Δ²``, and of ``√v̂`` against ``|g|``). Found in user trials:
    optax.adamw(eps=1e-6) for torch's 1e-8 failed with no cause named; so did eps=1e-7,
    where no element's update is far enough below ``lr`` to read ε from it alone (the
    median of those between 5% and 95% of ``lr`` it took before): every element says a
    little, and together they say it.

    >>> spec = OptimizerSpec("adam", learning_rate=0.1)
    >>> g = {"w": np.array([1e-6, 3e-6, 5e-6, 1.0])}
    >>> p0 = {"w": np.zeros(4)}
    >>> p1 = {"w": -0.1 * g["w"] / (np.abs(g["w"]) + 2e-6)}  # eps 2e-6
    >>> eps, spread = _fitted_eps(spec, p0, g, p1)
    >>> f"{eps:.6g}"
    '2e-06'
    """
    if spec.name not in ("adam", "adamw") or spec.amsgrad:
        return None
    lr, lam = spec.learning_rate, spec.weight_decay
    # The run's own unit roundoff (its parameters' dtype), before they are widened.
    u = max((float(np.finfo(np.asarray(v).dtype).eps) / 2 for v in after.values()), default=0.0)
    before, grads, after = _wide(initial), _wide(grads), _wide(after)
    estimates, weights = [], []
    for name, p in before.items():
        g = np.abs(grads[name] + (lam * p if spec.name == "adam" else 0.0))
        start = p * (1 - lr * lam) if spec.name == "adamw" else p
        move = np.abs(after[name] - start)
        moved = (move > 0) & (g > 0) & np.isfinite(move) & np.isfinite(g)
        g, move = g[moved], move[moved]
        rounding = u * (np.abs(after[name][moved]) + np.abs(start[moved])) + u * move
        error = np.hypot(g * lr * rounding / move**2, 4 * u * g)
        with np.errstate(divide="ignore"):
            weight = 1 / error**2
        keep = np.isfinite(weight) & (weight > 0)
        estimates.append((g * (lr / move - 1))[keep])
        weights.append(weight[keep])
    estimates, weights = np.concatenate(estimates), np.concatenate(weights)
    if estimates.size < 3:
        return None
    total = float(np.sum(weights))
    eps = float(np.sum(weights * estimates)) / total
    spread = 1 / math.sqrt(total)  # the fit's own standard error
    if not np.isfinite(eps) or eps <= 0:
        return None
    if abs(eps - spec.eps) <= max(3 * spread, 0.01 * max(spec.eps, eps)):
        return None
    return eps, spread


def _eps_variant(spec, initial, grads, params) -> OptimizerVariant | None:
    """Adam with the ε :func:`_fitted_eps` reads from step 1, given the fewest digits
    (up to 3) that replay the whole run to :data:`UPDATE_EXPLAINED`; else None."""
    fitted = _fitted_eps(spec, initial, grads[0], params[0])
    if fitted is None:
        return None
    fitted, spread = fitted
    for digits in (1, 2, 3):
        eps = float(f"{fitted:.{digits}g}")
        # Where ε is small beside the gradients, one step reads it only roughly.
        shown = (
            f"eps={eps:g}" if spread <= 0.05 * eps else f"eps of about {eps:g} (±{3 * spread:.1g})"
        )
        variant = OptimizerVariant(
            f"uses {shown}, not torch's {spec.eps:g} (fitted to its first update): "
            f"use optax.{spec.name}(..., eps={spec.eps:g})",
            dataclasses.replace(spec, eps=eps),
        )
        if optimizer_residual(variant, initial, grads, params) <= UPDATE_EXPLAINED:
            return variant
    return None


def _momentum_variant(spec, initial, grads, params) -> OptimizerVariant | None:
    """SGD with another momentum ``μ`` than ``spec``'s (0 for none) that replays the
    whole run, or None. ``μ`` is fitted to step 2, where torch's update is
    ``lr·(μ·b₁ + (1 - τ)·g₂)``, ``b₁ = g₁`` (``g + λ·p`` under weight decay), by least
    squares, then given the fewest digits (up to 6) that replay the run to
    :data:`UPDATE_EXPLAINED`. Nesterov's is fitted only as none. Found in a user trial:
    torch's ``SGD(lr, momentum=0.9)`` ported as ``optax.sgd(lr)`` or
    ``optax.sgd(lr, momentum=0.99)`` was caught from step 2 with no cause named.

    >>> spec = OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9)
    >>> p0, g = {"w": np.array([1.0, -2.0])}, {"w": np.array([0.5, 0.25])}
    >>> p1 = {"w": p0["w"] - 0.1 * g["w"]}
    >>> p2 = {"w": p1["w"] - 0.1 * (1 + 0.99) * g["w"]}  # μ = 0.99
    >>> _momentum_variant(spec, p0, [g, g], [p1, p2]).spec.momentum
    0.99
    """
    if spec.name != "sgd" or len(params) < 2:
        return None
    lr, lam, tau = spec.learning_rate, spec.weight_decay, spec.dampening
    p0, p1, p2 = _wide(initial), _wide(params[0]), _wide(params[1])
    g1, g2 = _wide(grads[0]), _wide(grads[1])
    b1 = np.concatenate([(g1[n] + lam * p0[n]).ravel() for n in p0])
    rest = np.concatenate(
        [((p1[n] - p2[n]) / lr - (1 - tau) * (g2[n] + lam * p1[n])).ravel() for n in p0]
    )
    denom = float(np.vdot(b1, b1))
    fitted = float(np.vdot(rest, b1)) / denom if denom > 0 else math.nan
    candidates = [] if spec.nesterov else [float(f"{fitted:.{d}g}") for d in range(1, 7)]
    for mu in ([0.0] if spec.momentum else []) + candidates:
        if not (math.isfinite(mu) and mu >= 0) or abs(mu - spec.momentum) <= 1e-3 * spec.momentum:
            continue
        other = (
            dataclasses.replace(spec, momentum=mu)
            if mu
            else dataclasses.replace(spec, momentum=0.0, dampening=0.0, nesterov=False)
        )
        variant = OptimizerVariant(_momentum_what(spec, mu), other)
        if optimizer_residual(variant, initial, grads, params) <= UPDATE_EXPLAINED:
            return variant
    return None


def _momentum_what(spec: OptimizerSpec, mu: float) -> str:
    """What a run with momentum ``mu`` for ``spec``'s does, and both fixes."""
    ours, theirs = spec.momentum, f"{mu:g}" + (" (none)" if mu == 0 else "")
    if spec.dampening:
        port = "equiv.optimizers.make_optax(spec), which has torch's dampening"
    elif ours:
        nesterov = ", nesterov=True" if spec.nesterov else ""
        port = f"optax.sgd(..., momentum={ours:g}{nesterov})"
    else:
        port = "optax.sgd(...) without momentum"
    return (
        f"uses momentum {theirs}, not torch's {ours:g}{' (none)' if not ours else ''} "
        f"(fitted to its step-2 update, lr·(μ·g₁ + g₂) for torch's SGD): use {port}; if "
        + (
            f"torch's SGD has momentum={mu:g}, pass that in the OptimizerSpec"
            if mu
            else "torch's SGD has none, leave momentum out of the OptimizerSpec"
        )
    )


def _wide(tree: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.asarray(v, np.float64) for n, v in tree.items()}
