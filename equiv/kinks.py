r"""Kinks: units whose branch may legitimately flip between backends.

Kinked activations (:func:`kinked`): ``relu``, ``leaky_relu`` and ``elu`` with
``alpha != 1`` (at ``alpha = 1`` ELU is C¹: both branches have derivative 1 at 0).
The analysis below is written for ReLU and holds for all three: the forward pass
uses the activation's value, the carried error its Lipschitz constant, and a flip
swaps the branch (:func:`equiv.manual.loss_and_grads` with ``masks``). For a loss
reduced by ``"sum"``, one example's term is not divided by the batch.

A ReLU passes its gradient where ``z > 0``. When the exact pre-activation ``z``
lies within rounding distance of 0, a backend's rounded ``ẑ`` may land on the other
side, and its gradient then takes the other branch of the kink: a difference of
the size of one example's contribution, not of rounding, and not a bug.

Rounding bound on the pre-activations. A backend with unit roundoff ``u`` computes
``z_i = h_{i-1} W_iᵀ + b_i`` from its own ``ĥ_{i-1}`` (off by ``e_{i-1}``) and its
own parameters (off by ``δW_i``, ``δb_i`` after earlier steps). Elementwise, with
the float64 reference's values and the per-tensor rule of :mod:`equiv.tolerance`
applied to each dot product of length ``n_{i-1}``::

    |ẑ_i - z_i| ≤ ε_i = c·u·√n_{i-1}·(√(h_{i-1}²·(W_i²)ᵀ + b_i²) + |z_i|)   this layer
                      + √(e_{i-1}²·(W_i²)ᵀ)                       carried from below
                      + max|δW_i|·√(Σ_j h_{i-1,j}²) + max|δb_i|   parameters after steps

The rounding of one dot product ``Σ_j a_j`` of length ``n`` is about ``u`` times the
root sum of squares of its partial sums. Near a kink the terms cancel (``z ≈ 0``),
the partial sums wander like a random bridge and that is ``u·√n·√(Σ a_j²)/√6`` at
most, typically; where they do not cancel it is up to ``u·√n·|z|/√3``. The first
term covers both with the constant ``c`` of :mod:`equiv.tolerance` (the worst case
``c·u·√n·Σ|a_j|`` is ``√n`` times larger again and would call ``√n`` times more
units ambiguous). ``e_0 = 0`` (the batch is exact) and ``e_i = ε_i`` for hidden layers (ReLU is
1-Lipschitz). The carried terms add the errors of the ``n_{i-1}`` inputs in root
sum of squares, as independent roundings add (the same probabilistic model as the
``√k`` of :mod:`equiv.tolerance`); the worst case ``e·|W|ᵀ`` was measured 10⁴ to
10⁷ times pessimistic at depth 4 to 6 and width 512, which would make nearly every
unit look ambiguous. Measured against torch's float32 pre-activations, the bound
held everywhere (tests/test_kinks.py). A unit (example ``b``, hidden unit ``j`` of layer ``i``) is
*ambiguous* where ``|z_i[b, j]| ≤ ε_i[b, j]``.

Accepting either side. Every combination of mask choices at the ambiguous units is
a float64 trajectory some backend may legitimately follow. The loss is a mean over
examples, so a flip moves only its own example's term: for each example with
ambiguous units, :func:`analyse_kinks` runs the hand-derived pass on that example
alone (:mod:`equiv.manual` with the mask overridden) for every combination of its
flips (up to :data:`MAX_EXHAUSTIVE` of them; above that each flip alone, summed,
plus the backward pass in interval arithmetic over all of them at once, which
bounds the products of slopes across layers that single flips miss), and sums the
examples' envelopes. The result, per stage and leaf,
is ``slack ≥ |branch - reference|`` for every branch. A backend near branch ``β``
satisfies ``|x - ref| ≤ |x - β| + |β - ref| ≤ bound + slack``; two backends on
different branches differ by at most ``bound + 2·slack``.

Later steps, plain SGD without the harness's propagation (with it, see below).
The parameters after step ``s`` carry ``learning_rate`` times the
gradient slack of every step so far. A branch taken at one step also moves later
gradients (through the changed parameters): the branch that moves the gradient
most for each example is carried on (up to :data:`MAX_BRANCHES`, largest first),
run without new flips, and its deviations from the reference are added to the
later slack (first order: the effects of separate branches add).

Other optimizers (momentum, weight decay, Adam, AdamW) and later steps.
:func:`flip_envelope` does one step at given parameters and optimizer state: it
finds the ambiguous units there (rounding only), the loss and gradient envelope
as above, and pushes the gradient's interval ``g ± slack`` through the optimizer.
Every optimizer here updates each element from that element's gradient and state
alone, so the parameters and state after the step may differ by the largest
change of the update over the interval: taken at :data:`UPDATE_SAMPLES` evenly
spaced points, ends included, and at the update's stationary points inside (Adam's
``m/(√v + ε)`` has one; AMSGrad adds the gradient where ``v`` meets its running
maximum). SGD's update is linear in ``g``, so its ends are exact. For such
optimizers (and for plain SGD when the harness propagates) the analysis here covers
step 1 only; from step 2 on, the harness's
propagation runs :func:`flip_envelope` at each backend's own parameters and state
(:func:`equiv.harness.compare_trajectories`), which also covers a backend that
stays on its side of a kink while the reference moves away.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from equiv import manual
from equiv.activations import ACTIVATIONS
from equiv.compare import to_numpy
from equiv.losses import LOSSES
from equiv.optimizers import OptimizerSpec, is_plain_sgd, manual_init, manual_update
from equiv.spec import UNIT_ROUNDOFF, MLPSpec
from equiv.tolerance import SAFETY

#: Up to this many ambiguous units in one step, every combination of flips is run.
MAX_EXHAUSTIVE = 5
#: At most this many alternative branches are carried to later steps.
MAX_BRANCHES = 64
#: Points of ``g_ref ± slack`` at which an optimizer's update is evaluated.
UPDATE_SAMPLES = 33
#: Fixed-point iterations for Adam's stationary point with ε (converges in a few:
#: ε·s is tiny beside √v wherever the point matters).
_STATIONARY_ITERATIONS = 8


@dataclasses.dataclass(frozen=True)
class Kink:
    """One ambiguous unit: hidden layer ``layer`` (1-based, ``fc{layer}``), example
    ``example``, unit ``unit``, its float64 pre-activation and the rounding bound."""

    step: int
    layer: int
    example: int
    unit: int
    z: float
    bound: float

    activation: str = "relu"
    #: Found at this backend's own parameters (from step 2 on), or "" at the reference's.
    backend: str = ""

    def describe(self) -> str:
        where = f" at {self.backend}'s parameters" if self.backend else ""
        text = (
            f"step {self.step}, fc{self.layer} output [{self.example}, {self.unit}]{where}: "
            f"z = {self.z:.3g}, within rounding bound {self.bound:.3g} of the kink"
        )
        if self.z == 0.0 and self.activation == "leaky_relu":
            text += (
                " (exactly 0: torch's leaky_relu'(0) is the slope, jax.nn.leaky_relu's is 1;"
                " a port that differs only here is that convention, accepted as either side)"
            )
        return text


@dataclasses.dataclass
class KinkAnalysis:
    """Ambiguous units and the slack they allow, per ``(stage, step)`` and leaf."""

    kinks: list[Kink]
    slack: dict[tuple[str, int], dict[str, np.ndarray]]
    exhaustive: bool = True

    @property
    def count(self) -> int:
        return len(self.kinks)

    def slack_for(self, stage: str, step: int, name: str) -> np.ndarray | None:
        """The envelope for one leaf, or None where no branch moves it."""
        leaf = self.slack.get((stage, step), {}).get(name)
        if leaf is None or not np.any(leaf > 0):
            return None
        return leaf

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "exhaustive": self.exhaustive,
            "units": [dataclasses.asdict(k) for k in self.kinks],
        }


def preactivation_bounds(
    params: Mapping[str, np.ndarray],
    x: np.ndarray,
    spec: MLPSpec,
    unit_roundoff: float,
    param_error: Mapping[str, float] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The float64 pre-activations ``z_i`` and the bounds ``ε_i`` on a backend's error.

    See the module docstring for the derivation; ``param_error`` maps a torch name
    to the greatest absolute error of that parameter in the backend (0 at step 1).

    Example:
      >>> import numpy as np
      >>> spec = MLPSpec((2, 2, 1), dtype="float64")
      >>> params = {"fc1.weight": np.eye(2), "fc1.bias": np.array([-1.0, 0.0]),
      ...           "fc2.weight": np.ones((1, 2)), "fc2.bias": np.zeros(1)}
      >>> zs, eps = preactivation_bounds(params, np.array([[1.0, 3.0]]), spec, 2.0**-24)
      >>> zs[0].tolist(), bool(eps[0][0, 0] > 0)
      ([[0.0, 3.0]], True)
    """
    param_error = param_error or {}
    h, e = np.asarray(x, dtype=np.float64), np.zeros_like(x, dtype=np.float64)
    zs, bounds = [], []
    for i in range(1, spec.num_layers + 1):
        weight = np.asarray(params[f"fc{i}.weight"], dtype=np.float64)
        z = h @ weight.T
        squares = (h * h) @ (weight * weight).T
        if spec.biases[i - 1]:
            bias = np.asarray(params[f"fc{i}.bias"], dtype=np.float64)
            z = z + bias
            squares = squares + bias * bias
        magnitude = np.sqrt(squares)
        bound = SAFETY * unit_roundoff * math.sqrt(spec.sizes[i - 1]) * (magnitude + np.abs(z))
        bound = bound + np.sqrt((e * e) @ (weight * weight).T)
        bound = bound + param_error.get(f"fc{i}.weight", 0.0) * np.sqrt(
            np.sum(h * h, axis=1, keepdims=True)
        )
        bound = bound + param_error.get(f"fc{i}.bias", 0.0)
        zs.append(z)
        bounds.append(bound)
        if i < spec.num_layers:
            act = ACTIVATIONS[spec.activations[i - 1]]
            param = act.param(spec)
            h, e = act.value(np, z, param), act.lipschitz(param) * bound
    return zs, bounds


def kinked(spec: MLPSpec) -> bool:
    """Whether any hidden activation has a kink that rounding can flip.

    >>> kinked(MLPSpec((4, 3, 2))), kinked(MLPSpec((4, 3, 2), activation="tanh"))
    (True, False)
    >>> elu = MLPSpec((4, 3, 2), activation="elu")
    >>> kinked(elu), kinked(elu.replace(elu_alpha=0.5))
    (False, True)
    """
    return any(_kinked_layer(spec, name) for name in spec.activations)


def _kinked_layer(spec: MLPSpec, name: str) -> bool:
    act = ACTIVATIONS[name]
    if not act.kink:
        return False
    return not (name == "elu" and spec.elu_alpha == 1.0)


def analyse_kinks(
    spec: MLPSpec,
    params: Mapping[str, Any],
    batches: Any,
    learning_rate: float,
    unit_roundoff: float,
    param_error: Any = None,
    optimizer: OptimizerSpec | None = None,
) -> KinkAnalysis:
    """Find the ambiguous units of every step and the slack their branches allow.

    Args:
      spec: the MLP (kinked activations per :func:`kinked`).
      params: the initial parameters under torch names (any array type).
      batches: ``[(x, y), ...]``, one per step.
      learning_rate: SGD's learning rate (plain SGD; an ``optimizer`` has its own).
      unit_roundoff: ``u`` of the backends compared (the larger one for a mix).
      param_error: optional ``param_error(step) -> {name: max abs error}`` of the
        backends' parameters before ``step`` (for the bound on ``z``).
      optimizer: anything but plain SGD: step 1 only, through the optimizer (see
        the module's "Other optimizers"); ``param_error`` is then unused.

    Example:
      >>> import numpy as np
      >>> spec = MLPSpec((2, 2, 1), dtype="float64")
      >>> params = {"fc1.weight": np.eye(2), "fc1.bias": np.array([-1.0, 0.0]),
      ...           "fc2.weight": np.ones((1, 2)), "fc2.bias": np.zeros(1)}
      >>> x, y = np.array([[1.0, 3.0]]), np.array([[0.0]])
      >>> analysis = analyse_kinks(spec, params, [(x, y)], 0.1, 2.0**-24)
      >>> analysis.count, analysis.kinks[0].layer, analysis.kinks[0].unit
      (1, 1, 0)
      >>> analysis.slack_for("grads", 1, "fc1.weight").round(4).tolist()  # + O(δz)
      [[6.0, 18.0], [0.0, 0.0]]
    """
    if not is_plain_sgd(optimizer):
        return _analyse_with_optimizer(spec, params, batches, optimizer, unit_roundoff)
    names = spec.param_names()
    p_ref = {k: _f64(v) for k, v in params.items()}
    branches: list[dict[str, np.ndarray]] = []
    kinks: list[Kink] = []
    slack: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    exhaustive = True
    carried = {name: np.zeros_like(v) for name, v in p_ref.items()}  # parameter slack so far
    for step, (x, y) in enumerate(batches, start=1):
        x, y = _f64(x), _target(y)
        errors = param_error(step) if param_error is not None else None
        zs, bounds = preactivation_bounds(p_ref, x, spec, unit_roundoff, errors)
        by_example = _ambiguous_units(spec, zs, bounds, step, kinks)
        loss_ref, g_ref = manual.loss_and_grads(p_ref, x, y, spec)
        p_next = manual.sgd_update(p_ref, g_ref, learning_rate)
        d_loss, d_grads, worsts, complete = _batch_envelope(
            p_ref, x, y, spec, zs, by_example, bounds
        )
        exhaustive = exhaustive and complete
        new_branches = []
        for worst in worsts:
            if worst is not None:
                new_branches.append(
                    (
                        sum(float(np.sum(np.abs(v))) for v in worst.values()),
                        manual.sgd_update(
                            p_ref, {n: g_ref[n] + worst[n] for n in names}, learning_rate
                        ),
                    )
                )
        for p_alt in branches:  # branches taken at earlier steps, carried on
            loss, grads = manual.loss_and_grads(p_alt, x, y, spec)
            d_loss = d_loss + np.abs(loss - loss_ref)
            for name in names:
                d_grads[name] = d_grads[name] + np.abs(grads[name] - g_ref[name])
            new_branches.append((0.0, manual.sgd_update(p_alt, grads, learning_rate)))
        carried = {name: carried[name] + learning_rate * d_grads[name] for name in names}
        if by_example or branches:
            slack[("loss", step)] = {"loss": d_loss}
            slack[("grads", step)] = d_grads
            slack[("params", step)] = dict(carried)
        # Carry the branches that move the parameters most; earlier ones first.
        new_branches.sort(key=lambda item: -item[0])
        branches = [p for _, p in new_branches][:MAX_BRANCHES]
        p_ref = p_next
    return KinkAnalysis(kinks=kinks, slack=slack, exhaustive=exhaustive)


def _analyse_with_optimizer(spec, params, batches, optimizer, unit_roundoff):
    """:func:`analyse_kinks` for any optimizer but plain SGD: step 1 only (later steps
    are :func:`flip_envelope` at each backend's own parameters, in the harness)."""
    p0 = {k: _f64(v) for k, v in params.items()}
    (x, y), *_ = batches
    kinks, slack, exhaustive = flip_envelope(
        spec, p0, x, y, unit_roundoff, 1, optimizer, manual_init(optimizer, p0)
    )
    return KinkAnalysis(
        kinks=kinks,
        slack={(stage, 1): leaves for stage, leaves in slack.items()},
        exhaustive=exhaustive,
    )


def flip_envelope(
    spec: MLPSpec,
    params: Mapping[str, Any],
    x: Any,
    y: Any,
    unit_roundoff: float,
    step: int,
    optimizer: OptimizerSpec,
    state: Mapping[str, Mapping[str, Any]],
    *,
    backend: str = "",
) -> tuple[list[Kink], dict[str, dict[str, np.ndarray]], bool]:
    """The ambiguous units at ``params`` and how far their other sides may move one step.

    Args:
      spec, params, x, y: the model, the parameters the step starts from (a backend's
        own, exactly as it holds them) and the batch.
      unit_roundoff: ``u`` of the backend whose rounding may flip a unit.
      step: 1-based step (the optimizer's bias corrections depend on it).
      optimizer, state: the optimizer and its state before the step (torch names).
      backend: recorded in each :class:`Kink`.

    Returns:
      ``(kinks, slack, exhaustive)``: ``slack[stage][leaf]`` for stages ``loss``,
      ``grads``, ``params`` and ``state`` (leaves ``exp_avg.fc1.weight``...), empty
      when no unit is ambiguous.

    Example:
      >>> import numpy as np
      >>> spec = MLPSpec((2, 2, 1), dtype="float64")
      >>> params = {"fc1.weight": np.eye(2), "fc1.bias": np.array([-1.0, 0.0]),
      ...           "fc2.weight": np.ones((1, 2)), "fc2.bias": np.zeros(1)}
      >>> x, y = np.array([[1.0, 3.0]]), np.array([[0.0]])
      >>> adam = OptimizerSpec("adam", learning_rate=0.1)
      >>> state = manual_init(adam, params)
      >>> kinks, slack, _ = flip_envelope(spec, params, x, y, 2.0**-24, 1, adam, state)
      >>> len(kinks), slack["params"]["fc1.weight"].round(3).tolist()
      (1, [[0.1, 0.1], [0.0, 0.0]])
    """
    p = {k: _f64(v) for k, v in params.items()}
    x, y = _f64(x), _target(y)
    zs, bounds = preactivation_bounds(p, x, spec, unit_roundoff)
    kinks: list[Kink] = []
    by_example = _ambiguous_units(spec, zs, bounds, step, kinks, backend)
    if not by_example:
        return kinks, {}, True
    d_loss, d_grads, _, exhaustive = _batch_envelope(p, x, y, spec, zs, by_example, bounds)
    _, g_ref = manual.loss_and_grads(p, x, y, spec)
    state = {key: {n: _f64(v) for n, v in tree.items()} for key, tree in state.items()}
    d_params, d_state = _update_envelope(optimizer, p, g_ref, d_grads, state, step)
    slack = {
        "loss": {"loss": d_loss},
        "grads": d_grads,
        "params": d_params,
        "state": {f"{key}.{n}": v for key, tree in d_state.items() for n, v in tree.items()},
    }
    return kinks, slack, exhaustive


def _update_envelope(optimizer, p, g_ref, d_grads, state, step):
    """Per element, the largest change of the parameters and state after the step
    over gradients in ``g_ref ± d_grads`` (see the module's "Other optimizers")."""
    p_ref, s_ref = manual_update(optimizer, p, g_ref, state, step)
    lo = {n: g_ref[n] - d_grads[n] for n in g_ref}
    hi = {n: g_ref[n] + d_grads[n] for n in g_ref}
    points = [
        {n: g_ref[n] + t * d_grads[n] for n in g_ref} for t in np.linspace(-1, 1, UPDATE_SAMPLES)
    ]
    points += [
        {n: np.clip(g[n], lo[n], hi[n]) for n in g}
        for g in _stationary_gradients(optimizer, p, state, g_ref, step)
    ]
    d_params = {n: np.zeros_like(v) for n, v in p.items()}
    d_state = {key: {n: np.zeros_like(v) for n, v in tree.items()} for key, tree in s_ref.items()}
    for g in points:
        p_t, s_t = manual_update(optimizer, p, g, state, step)
        for n in d_params:
            d_params[n] = np.maximum(d_params[n], np.abs(p_t[n] - p_ref[n]))
        for key, tree in s_t.items():
            for n, v in tree.items():
                d_state[key][n] = np.maximum(d_state[key][n], np.abs(v - s_ref[key][n]))
    return d_params, d_state


def _stationary_gradients(optimizer, p, state, g_ref, step) -> list[dict[str, np.ndarray]]:
    """Gradients where Adam's update may peak inside an interval (unclipped).

    With ``A = β₁·m``, ``B = β₂·v`` from the state before the step, ``γ`` the gradient
    after L2 decay, ``D = √(B + (1-β₂)γ²)`` and ``s = √(1 - β₂^step)``, the update is
    proportional to ``(A + (1-β₁)γ) / (D + ε·s)``, stationary where
    ``γ = (1-β₁)·(B + ε·s·D) / ((1-β₂)·A)``: solved by fixed-point iteration from
    its ``ε = 0`` value. AMSGrad's running maximum ``v_max`` is met where
    ``B + (1-β₂)γ² = v_max``. Elements without such a point keep ``g_ref``.
    """
    if optimizer.name == "sgd":
        return []
    beta1, beta2 = optimizer.betas
    l2 = optimizer.weight_decay if optimizer.name == "adam" else 0.0
    eps_s = optimizer.eps * math.sqrt(1 - beta2**step)
    out = []
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a = {n: beta1 * state["exp_avg"][n] for n in g_ref}
        b = {n: beta2 * state["exp_avg_sq"][n] for n in g_ref}
        star = {n: (1 - beta1) * b[n] / ((1 - beta2) * a[n]) for n in g_ref}
        for _ in range(_STATIONARY_ITERATIONS):
            star = {
                n: (1 - beta1)
                * (b[n] + eps_s * np.sqrt(b[n] + (1 - beta2) * star[n] ** 2))
                / ((1 - beta2) * a[n])
                for n in g_ref
            }
        out.append(star)
        if optimizer.amsgrad:
            meet = {
                n: np.sqrt(np.maximum(state["max_exp_avg_sq"][n] - b[n], 0.0) / (1 - beta2))
                for n in g_ref
            }
            out += [meet, {n: -v for n, v in meet.items()}]
    return [
        {n: np.where(np.isfinite(g[n]), g[n] - l2 * p[n], g_ref[n]) for n in g_ref} for g in out
    ]


def _ambiguous_units(spec, zs, bounds, step, kinks, backend="") -> dict[int, list[tuple[int, int]]]:
    """``{example: [(layer index, unit), ...]}`` within rounding of a kink; each is
    appended to ``kinks``."""
    by_example: dict[int, list[tuple[int, int]]] = {}
    for i in range(spec.num_layers - 1):  # hidden layers only: no ReLU after the last
        if not _kinked_layer(spec, spec.activations[i]):
            continue
        # A bound of 0 means z is exactly 0 in every backend (its inputs, weights and
        # bias multiply to exact zeros: an all-zero input row with zero biases), so
        # every backend takes its function's own side: the same one unless torch's and
        # JAX's functions differ there (found in a user trial: ReLU units at an exact 0
        # were allowed either side, and a zeroed fc1.bias gradient passed).
        either = ACTIVATIONS[spec.activations[i]].sides_differ_at_zero
        ambiguous = (np.abs(zs[i]) <= bounds[i]) & ((bounds[i] > 0) | either)
        for b, j in np.argwhere(ambiguous):
            by_example.setdefault(int(b), []).append((i, int(j)))
            z, bound = float(zs[i][b, j]), float(bounds[i][b, j])
            act = spec.activations[i]
            kinks.append(Kink(step, i + 1, int(b), int(j), z, bound, act, backend))
    return by_example


def _batch_envelope(p, x, y, spec, zs, by_example, bounds=None):
    """Every ambiguous example's envelope, summed: examples add up in the mean, so a
    flip moves only its own example's term. Returns ``(|Δloss|, {name: |Δgrad|},
    [worst branch per example], exhaustive)``."""
    d_loss = np.zeros(())
    d_grads = {name: np.zeros_like(v) for name, v in p.items()}
    worsts, exhaustive = [], True
    for b, units in by_example.items():
        loss_b, grads_b, worst = _example_envelope(p, x, y, spec, zs, b, units, bounds)
        exhaustive = exhaustive and len(units) <= MAX_EXHAUSTIVE
        d_loss = d_loss + loss_b
        d_grads = {name: d_grads[name] + grads_b[name] for name in d_grads}
        worsts.append(worst)
    return d_loss, d_grads, worsts, exhaustive


def _example_envelope(p_ref, x, y, spec, zs, b, units, bounds=None):
    """Envelope of one example's loss and gradient terms over its mask choices.

    A flipped unit is taken both at the reference's ``z`` and at the far edge of its
    rounding bound on its new side (``bounds``, with its layer's bias to shift ``z``;
    a unit of a layer without one is taken at the reference's ``z`` only): a unit at
    ``z = 0`` exactly has ``h = 0`` on either side at the reference's ``z``, while a
    backend whose ``z`` rounded to ``+δz`` holds ``h = δz`` (found in review: ReLU units
    at exactly 0 in float64 and +3e-8 in JAX failed a correct port at 1e6 times the
    bound, and the hint blamed a stop_gradient).

    Returns ``(|Δloss|, {name: |Δgrad|}, worst)``: ``worst`` is the signed change of
    the combination that moves the gradient most (the branch carried on).
    """
    # A mean divides one example's term by the batch; a sum does not.
    batch = x.shape[0] if getattr(LOSSES[spec.loss], "reduction", "mean") == "mean" else 1
    xb, yb = x[b : b + 1], y[b : b + 1]
    base = [z[b : b + 1] > 0 for z in zs[:-1]]
    # One example alone: MSE's mean then runs over n_L instead of B·n_L elements.
    loss0, grads0 = manual.loss_and_grads(p_ref, xb, yb, spec, base)
    if len(units) <= MAX_EXHAUSTIVE:
        subsets = [s for r in range(1, len(units) + 1) for s in itertools.combinations(units, r)]
        combine = np.maximum
    else:
        subsets, combine = [(unit,) for unit in units], np.add
    d_loss = np.zeros(())
    d_grads = {name: np.zeros_like(g) for name, g in grads0.items()}
    if len(units) > MAX_EXHAUSTIVE:
        # Summed single flips are first order across layers, where slopes multiply:
        # the interval pass bounds every combination at once (found in review: a zero
        # input row with zero biases put every leaky_relu unit of two layers at z = 0,
        # and JAX's slope 1·1 against torch's s·s was 50 times the single flips' sum).
        interval = _interval_envelope(p_ref, xb, yb, spec, base, units, grads0)
        for name, extra in interval.items():
            d_grads[name] = d_grads[name] + extra / batch
    worst, worst_size = None, -1.0
    for subset in subsets:
        masks = [m.copy() for m in base]
        for i, j in subset:
            masks[i][0, j] = not masks[i][0, j]
        loss, grads = manual.loss_and_grads(p_ref, xb, yb, spec, masks)
        delta = {name: (grads[name] - grads0[name]) / batch for name in grads0}
        moved_loss, moved = np.abs(loss - loss0) / batch, {n: np.abs(v) for n, v in delta.items()}
        # Units in a layer with a bias, which can shift their z (one example alone).
        movable = [(i, j) for i, j in subset if spec.biases[i]]
        if bounds is not None and movable:
            # The same masks with each flipped unit's z at the edge of its bound there.
            shifted = {name: value.copy() for name, value in p_ref.items()}
            for i, j in movable:
                edge = bounds[i][b, j] if masks[i][0, j] else -bounds[i][b, j]
                shifted[f"fc{i + 1}.bias"][j] += edge
            loss_e, grads_e = manual.loss_and_grads(shifted, xb, yb, spec, masks)
            moved_loss = np.maximum(moved_loss, np.abs(loss_e - loss0) / batch)
            for name in grads0:
                moved[name] = np.maximum(moved[name], np.abs(grads_e[name] - grads0[name]) / batch)
        d_loss = combine(d_loss, moved_loss)
        for name in grads0:
            d_grads[name] = combine(d_grads[name], moved[name])
        size = sum(float(np.sum(np.abs(v))) for v in delta.values())
        if size > worst_size:
            worst, worst_size = delta, size
    return d_loss, d_grads, worst


def _interval_envelope(p_ref, x, y, spec, base, units, nominal) -> dict[str, np.ndarray]:
    """``|Δgrad|`` bounds for one example over every mask choice at ``units`` at once:
    the backward pass in interval arithmetic (center and radius), each such unit's
    slope the interval between its two sides' and every other slope, the outputs and
    the loss's gradient the base masks' (a flip at a kink moves the forward pass by
    ``O(|z|)`` only, which the single flips beside this count). Sound and loose:
    intervals forget that one unit's slope is shared by every path through it.
    ``nominal``: the example's gradients at the base masks."""
    flipped = [m.copy() for m in base]
    for i, j in units:
        flipped[i][0, j] = not flipped[i][0, j]
    out, _, acts = manual._forward(p_ref, x, spec, base)
    _, _, other = manual._forward(p_ref, x, spec, flipped)
    _, dz = LOSSES[spec.loss].value_and_grad(out, y, spec)
    center, radius = np.asarray(dz, np.float64), np.zeros(np.shape(dz))
    envelope = {}
    for i in range(spec.num_layers, 0, -1):
        h = x if i == 1 else acts[i - 2][0]
        weight = f"fc{i}.weight"
        c_w, r_w = center.T @ h, radius.T @ np.abs(h)
        envelope[weight] = np.abs(c_w - nominal[weight]) + r_w
        if spec.biases[i - 1]:
            bias = f"fc{i}.bias"
            c_b, r_b = center.sum(axis=0), radius.sum(axis=0)
            envelope[bias] = np.abs(c_b - nominal[bias]) + r_b
        if i > 1:
            w = p_ref[weight]
            c_h, r_h = center @ w, radius @ np.abs(w)
            a, b = acts[i - 2][1], other[i - 2][1]
            c_s, r_s = (a + b) / 2, np.abs(a - b) / 2
            center = c_h * c_s
            radius = np.abs(c_h) * r_s + r_h * np.abs(c_s) + r_h * r_s
    return envelope


def max_unit_roundoff(dtypes) -> float:
    """The largest unit roundoff among dtype names (``"float32"``, ``"float64"``)."""
    return max(UNIT_ROUNDOFF[d] for d in dtypes)


def _target(y: Any) -> np.ndarray:
    """Targets in float64, integer labels kept as int64."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    return y.astype(np.int64) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float64)


def _f64(x: Any) -> np.ndarray:
    return np.array(to_numpy(x), dtype=np.float64)  # bfloat16 too
