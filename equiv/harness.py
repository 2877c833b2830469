"""Run the same training steps in every backend and compare the results.

Backends:

* ``"torch"``: :class:`~equiv.torch_mlp.TorchMLP`, autograd and ``torch.optim``
  (:func:`equiv.optimizers.make_torch_optimizer`).
* ``"manual"``: the hand-derived pass of :mod:`equiv.manual` and the hand-written
  update (:func:`equiv.optimizers.manual_update`) on torch tensors.
* ``"jax"``: :mod:`equiv.jax_mlp`, ``jax.value_and_grad`` and optax
  (:func:`equiv.optimizers.make_optax`), one jitted step
  (:func:`equiv.jax_mlp.make_train_step`).
* ``"reference"``: the hand-derived pass and update on NumPy in float64, the
  arbiter. In a float32 run every backend is also held against it, so a report
  says which backend is off, not only that two disagree.

The optimizer is an :class:`~equiv.optimizers.OptimizerSpec`; without one it is
plain SGD with ``learning_rate`` (``optimizer=None`` keeps the API of the first
issue). When an optimizer is given, ITS learning rate is the one used and the
``learning_rate`` argument is ignored (the comparison's ``learning_rate`` reports
the optimizer's). Each step records the optimizer state under torch's names
(``{"exp_avg": {"fc1.weight": ...}}``), compared as the stage ``"state"`` with
leaves named ``exp_avg.fc1.weight``; plain SGD keeps no state.

Integer labels (``cross_entropy``) stay integers everywhere: int64 in torch and
the reference, int32 in JAX.

Every backend starts from its own copy of the initial parameters: nothing is
shared between frameworks, since a torch in-place update would change a JAX
array sharing its buffer.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import torch

from equiv import jax_mlp, manual
from equiv._messages import type_error, value_error
from equiv.compare import LeafDiff, Report, compare_trees, json_safe, to_numpy
from equiv.convert import jax_to_torch, torch_to_jax
from equiv.devices import device_name, jax_device, resolve_device, torch_device
from equiv.diagnose import (
    GENERIC,
    UPDATE_EXPLAINED,
    diagnose_leaf,
    diagnose_optimizer,
    diagnose_trees,
)
from equiv.environment import environment
from equiv.kinks import Kink, KinkAnalysis, analyse_kinks, flip_envelope, kinked
from equiv.losses import LOSSES
from equiv.memory import check_fits
from equiv.optimizers import (
    OptimizerSpec,
    is_plain_sgd,
    make_torch_optimizer,
    manual_init,
    manual_update,
    optax_state_to_torch_names,
    torch_optimizer_state,
)
from equiv.precision import comparison_scope, lowered_matmuls
from equiv.problem import Problem, check_counts, make_problem
from equiv.spec import UNIT_ROUNDOFF, MLPSpec, check_computable, check_spec
from equiv.tolerance import (
    Tolerance,
    derived_tolerance,
    optimizer_bounds,
    params_tolerance,
    user_tolerance,
    with_magnitude,
)
from equiv.torch_mlp import torch_loss_fn, torch_mlp_with_params, torch_sgd_step
from equiv.variants import (
    VARIANT_FLOPS,
    VARIANT_MATCH,
    VARIANT_NOISE,
    matching_variant,
    tree_distance,
)

State = dict[str, dict[str, np.ndarray]]
#: ``(params, x, y) -> (loss, grads)``: torch-named NumPy trees (:attr:`Trajectory.unjitted`).
UnjittedFn = Callable[
    [dict[str, np.ndarray], np.ndarray, np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]
]

BACKENDS = ("torch", "manual", "jax")
REFERENCE = "reference"

#: The stages in the order a step computes them, named as
#: :meth:`Comparison.overflow_note` names them.
_STAGE_NAMES = {
    "loss": "loss",
    "grads": "gradients",
    "state": "optimizer state",
    "params": "parameters",
}


def _nonfinite(tree: Mapping[str, np.ndarray]) -> bool:
    return any(not np.all(np.isfinite(v)) for v in tree.values())


#: Each stage's place in the order a step computes them.
_STAGE_RANK = {stage: rank for rank, stage in enumerate(_STAGE_NAMES)}


def _earliest(*whens: tuple[int, str] | None) -> tuple[int, str] | None:
    """The earliest of several ``(step, stage)`` (None: none)."""
    found = [w for w in whens if w is not None]
    return min(found, key=lambda w: (w[0], _STAGE_RANK[w[1]]), default=None)


def _at_or_after(diff: LeafDiff, when: tuple[int, str]) -> bool:
    """Whether ``diff`` comes at or after ``(step, stage)`` in the order a step computes."""
    return (diff.step, _STAGE_RANK[diff.stage]) >= (when[0], _STAGE_RANK[when[1]])


def _is_evidence(
    d: LeafDiff, limit: tuple[int, str] | None, own: Mapping[str, tuple[int, str]]
) -> bool:
    """Whether ``d`` comes before the run's analysis limit and before the overflow of
    either backend it compares (:meth:`Comparison.backend_overflows`)."""
    if limit is not None and _at_or_after(d, limit):
        return False
    return not any(side in own and _at_or_after(d, own[side]) for side in (d.actual, d.expected))


def _largest(tree: Mapping[str, np.ndarray]) -> float:
    return max((float(np.max(np.abs(v), initial=0.0)) for v in tree.values()), default=0.0)


@dataclasses.dataclass
class Trajectory:
    """What one backend computed: per step the loss, the gradients (before the
    update), the parameters after it and the optimizer state after it, as NumPy
    arrays under torch's names (state: ``{state name: {param name: array}}``;
    ``None`` for a backend that does not report its state).

    ``unjitted``, where set (JAX backends that compile their step), recomputes
    ``(loss, grads)`` op by op under ``jax.disable_jit`` from torch-named NumPy
    parameters and a batch, in the settings the run had: a hint then tells an inf
    or NaN that XLA's compilation made from one that the formula itself makes.

    ``initial``, where set (a port given its own conversion of the parameters), is
    what the backend started from, under torch's names: a hint then compares it
    with the model's own start, before any step could blur a difference."""

    backend: str
    dtype: str
    losses: list[np.ndarray] = dataclasses.field(default_factory=list)
    grads: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    params: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    states: list[State | None] = dataclasses.field(default_factory=list)
    unjitted: UnjittedFn | None = dataclasses.field(default=None, repr=False, compare=False)
    initial: dict[str, np.ndarray] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )
    #: Why a backend that keeps an optimizer state records none (its state then goes
    #: uncompared, and the report's settings say so under "state_not_compared").
    state_note: str | None = dataclasses.field(default=None, compare=False)
    #: The layout of a port's parameters (``"equinox"``...): hints name its converter.
    layout: str | None = dataclasses.field(default=None, compare=False)
    #: That layout itself, where it is not torch's: hints name the port's own
    #: parameters beside equiv's (``fc1.weight``, the port's ``Dense_0/kernel``).
    own_names: Any = dataclasses.field(default=None, compare=False, repr=False)

    def record(
        self,
        loss: Any,
        grads: dict[str, Any],
        params: dict[str, Any],
        state: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.losses.append(np.array(to_numpy(loss)))
        self.grads.append({k: np.array(to_numpy(v)) for k, v in grads.items()})
        self.params.append({k: np.array(to_numpy(v)) for k, v in params.items()})
        self.states.append(
            None
            if state is None
            else {
                key: {k: np.array(to_numpy(v)) for k, v in tree.items()}
                for key, tree in state.items()
            }
        )

    def has_state(self, step: int) -> bool:
        return len(self.states) >= step and self.states[step - 1] is not None

    def stage(self, stage: str, step: int) -> dict[str, np.ndarray]:
        """The flat tree of ``stage`` at 1-based ``step`` (``"state"``: leaves named
        ``exp_avg.fc1.weight``)."""
        if stage == "loss":
            return {"loss": self.losses[step - 1]}
        if stage == "state":
            state = self.states[step - 1] if self.has_state(step) else None
            return {
                f"{key}.{name}": v
                for key, tree in (state or {}).items()
                for name, v in tree.items()
            }
        return (self.grads if stage == "grads" else self.params)[step - 1]


def resolve_optimizer(optimizer: OptimizerSpec | None, learning_rate: float) -> OptimizerSpec:
    """``optimizer``, or plain SGD with ``learning_rate`` when it is None.

    >>> resolve_optimizer(None, 0.1)
    OptimizerSpec(name='sgd', learning_rate=0.1, momentum=0.0, dampening=0.0, nesterov=False, \
weight_decay=0.0, betas=(0.9, 0.999), eps=1e-08, amsgrad=False)
    """
    if optimizer is None:
        return OptimizerSpec("sgd", learning_rate=float(learning_rate))
    if not isinstance(optimizer, OptimizerSpec):
        raise type_error(
            f"optimizer must be an equiv.OptimizerSpec, got {type(optimizer).__name__}"
        )
    return optimizer


def _numpy_batch(y: Any) -> np.ndarray:
    """A target batch in float64 NumPy, integer labels kept as int64."""
    y = to_numpy(y)
    return y.astype(np.int64) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float64)


def run_torch(
    problem: Problem,
    learning_rate: float,
    device: str = "cpu",
    optimizer: OptimizerSpec | None = None,
) -> Trajectory:
    """``TorchMLP`` + autograd + ``torch.optim`` (single-tensor path)."""
    on = torch_device(device)
    model = torch_mlp_with_params(problem.spec, problem.params, on)
    return train_torch_model(model, problem, resolve_optimizer(optimizer, learning_rate), device=on)


def train_torch_model(
    model: torch.nn.Module,
    problem: Problem,
    optimizer: OptimizerSpec,
    *,
    name: str = "torch",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Trajectory:
    """Train ``model`` in place on the problem's batches with ``torch.optim``, recording
    loss, gradients, parameters and optimizer state. With ``dtype``, inputs are cast
    to it (integer labels stay integers); the model must already hold that dtype."""
    opt = make_torch_optimizer(optimizer, model.parameters())
    loss_module = torch_loss_fn(problem.spec)
    out = Trajectory(name, str(next(model.parameters()).dtype).removeprefix("torch."))
    for x, y in problem.batches:
        if dtype is not None:
            x = x.to(dtype)
            y = y.to(dtype) if y.is_floating_point() else y
        loss, grads = torch_sgd_step(model, opt, loss_module, x.to(device), y.to(device))
        out.record(
            loss, grads, model.state_dict(), torch_optimizer_state(opt, model.named_parameters())
        )
    return out


def run_manual(
    problem: Problem,
    learning_rate: float,
    device: str = "cpu",
    optimizer: OptimizerSpec | None = None,
) -> Trajectory:
    """The hand-derived pass and update on torch tensors."""
    opt_spec = resolve_optimizer(optimizer, learning_rate)
    on = torch_device(device)
    params = _copy_to(problem.params, on)
    state = manual_init(opt_spec, params)
    out = Trajectory("manual", problem.spec.dtype)
    for step, (x, y) in enumerate(problem.batches, start=1):
        x, y = x.to(on), y.to(on)
        loss, grads = manual.loss_and_grads(params, x, y, problem.spec)
        params, state = manual_update(opt_spec, params, grads, state, step)
        out.record(loss, grads, params, state)
    return out


def run_jax(
    problem: Problem,
    learning_rate: float,
    device: str = "cpu",
    optimizer: OptimizerSpec | None = None,
) -> Trajectory:
    """``jax.value_and_grad`` of :func:`equiv.jax_mlp.loss_fn` and optax, jitted."""
    opt_spec = resolve_optimizer(optimizer, learning_rate)
    spec = problem.spec
    on = jax_device(device)
    step, tx = jax_mlp.make_train_step(spec, opt_spec)
    params = torch_to_jax(problem.params, layout="flax", spec=spec, device=on)
    opt_state = tx.init(params)
    out = Trajectory("jax", spec.dtype)

    def to_torch(tree):
        return jax_to_torch(tree, layout="flax", spec=spec)

    out.unjitted = unjitted_replay(
        lambda p, x, y: jax.value_and_grad(jax_mlp.loss_fn)(p, x, y, spec),
        lambda p: torch_to_jax(p, layout="flax", spec=spec, device=on),
        to_torch,
        on,
    )
    for x, y in problem.batches:
        x, y = (jax.device_put(t, on) for t in (x.numpy(), jax_labels(y)))
        loss, grads, params, opt_state = step(params, opt_state, x, y)
        out.record(
            loss,
            to_torch(grads),
            to_torch(params),
            optax_state_to_torch_names(opt_spec, opt_state, to_torch),
        )
    return out


def _float64_batch(problem: Problem, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``step`` (1-based) for the hand-derived float64 pass: inputs in float64,
    targets too unless they are labels."""
    spec = problem.spec
    x, y = (to_numpy(v) for v in problem.batches[step - 1])
    y = y if LOSSES[spec.loss].targets == "labels" else y.astype(np.float64)
    return x.astype(np.float64), y


def _float64_params(problem: Problem) -> dict[str, np.ndarray]:
    """The problem's initial parameters in float64."""
    return {k: to_numpy(v).astype(np.float64) for k, v in problem.params.items()}


def _params_before(problem: Problem, trajectory: Trajectory, step: int) -> dict[str, np.ndarray]:
    """The parameters ``trajectory`` started 1-based ``step`` from, as NumPy arrays."""
    if step == 1:
        return {k: to_numpy(v) for k, v in problem.params.items()}
    return trajectory.params[step - 2]


def jax_labels(y: torch.Tensor) -> np.ndarray:
    """A batch's targets for JAX: integer labels as int32 (JAX's default integer, no
    x64 truncation warning), anything else as is."""
    y = y.numpy()
    return y.copy() if np.issubdtype(y.dtype, np.floating) else y.astype(np.int32)


def unjitted_replay(
    value_and_grad: Callable[[Any, jax.Array, jax.Array], tuple[Any, Any]],
    to_tree: Callable[[dict[str, torch.Tensor]], Any],
    to_torch: Callable[[Any], dict[str, Any]],
    device: Any = None,
) -> UnjittedFn:
    """A :attr:`Trajectory.unjitted` for a JAX backend: ``value_and_grad(tree, x, y)``
    run op by op (``jax.disable_jit``) from torch-named NumPy parameters, under the
    x64 and matmul-precision settings in force now (when the run is recorded), which
    the hint that calls it later no longer has."""
    x64 = bool(jax.config.jax_enable_x64)
    matmul = jax.config.jax_default_matmul_precision

    def replay(params, x, y):
        with jax.enable_x64(x64), jax.default_matmul_precision(matmul), jax.disable_jit():
            tree = to_tree({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
            x, y = (jax.device_put(np.asarray(t), device) for t in (x, y))
            loss, grads = value_and_grad(tree, x, y)
            return np.asarray(loss), {k: to_numpy(v) for k, v in to_torch(grads).items()}

    return replay


def run_reference(
    problem: Problem,
    learning_rate: float,
    device: str = "cpu",
    optimizer: OptimizerSpec | None = None,
) -> Trajectory:
    """The hand-derived pass and update on NumPy in float64: the arbiter (always on
    the CPU)."""
    opt_spec = resolve_optimizer(optimizer, learning_rate)
    params = {k: v.double().numpy().copy() for k, v in problem.params.items()}
    state = manual_init(opt_spec, params)
    out = Trajectory(REFERENCE, "float64")
    for step, (x, y) in enumerate(problem.batches, start=1):
        x, y = x.double().numpy(), _numpy_batch(y)
        loss, grads = manual.loss_and_grads(params, x, y, problem.spec)
        params, state = manual_update(opt_spec, params, grads, state, step)
        out.record(loss, grads, params, state)
    return out


#: How :func:`equiv.check_manual_backward` names its port in ``settings["port"]``.
HAND_WRITTEN = "hand-written backward"

RUNNERS: dict[str, Callable[..., Trajectory]] = {
    "torch": run_torch,
    "manual": run_manual,
    "jax": run_jax,
    REFERENCE: run_reference,
}


@dataclasses.dataclass
class Comparison:
    """The trajectories of every backend and the report comparing them."""

    problem: Problem
    learning_rate: float
    trajectories: dict[str, Trajectory]
    report: Report
    optimizer: OptimizerSpec | None = None
    _misreadings: dict[str, str | None] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _own_overflows: dict[str, tuple[int, str, float]] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )
    _variants: dict[str, str | None] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def agree(self) -> bool:
        return self.report.agree

    @property
    def _hand_written(self) -> bool:
        """Whether the port is a hand-written backward (:func:`equiv.check_manual_backward`):
        its causes are said in a backward's terms, and its mistakes tried first."""
        return str(self.report.settings.get("port", "")).startswith(HAND_WRITTEN)

    def assert_agree(self) -> None:
        """Raise ``AssertionError``: the headline, the arbiter's verdict and the known
        causes the failing leaves point to (:meth:`hints`), then every failing leaf.

        The summary comes first (found in a user trial: a 784-wide AdamW run's 870
        lines put the likely cause last, where pytest's summary line never shows it).
        """
        __tracebackhide__ = True  # pytest shows the caller's line and this message only
        if not self.agree:
            head, _, blocks = self.report.failure_text().partition("\n")
            summary = self.arbiter_verdict() + [f"  likely cause: {h}" for h in self.hints()]
            if summary and blocks:
                summary.append("  every failing comparison:")
            raise AssertionError("\n".join([head, *summary, blocks]).rstrip("\n"))

    def hints(self) -> list[str]:
        """Known-cause hints (:func:`equiv.diagnose.diagnose_trees`) for the failing leaves,
        each ending, where it names parameters or layers (``fc2.weight``, ``fc2``) of a
        port whose layout names them otherwise, with the port's own names (found in a
        user trial: a flax port was told of ``fc2.weight`` and left to work out
        ``Dense_1/kernel``).
        """
        return [self._with_own_names(hint) for hint in self._hints()]

    def _with_own_names(self, hint: str) -> str:
        layouts = {id(t.own_names): t.own_names for t in self.trajectories.values() if t.own_names}
        if len(layouts) != 1:
            return hint  # no port, or several with layouts of their own: equiv's names
        layout = next(iter(layouts.values()))
        spec = self.problem.spec

        def own(torch_name: str) -> str:
            return "/".join(layout.path(torch_name))

        names = {name: own(name) for name in spec.param_names()}
        names |= {  # a layer: its own name where the layout has them (any template)
            f"fc{i}": layout.layers[i - 1]
            if layout.layers
            else own(f"fc{i}.weight").rpartition("/")[0] or own(f"fc{i}.weight")
            for i in range(1, spec.num_layers + 1)
        }
        found = []
        for name, theirs in names.items():
            match = re.search(rf"(?<![\w.']){re.escape(name)}(?![\w.]*\w)", hint)
            if match and theirs != name:
                found.append((match.start(), f"{name} is {theirs!r}"))
        if not found:
            return hint
        return (
            f"{hint} In the port's {layout.name} layout, "
            + ", ".join(text for _, text in sorted(found))
            + "."
        )

    def _hints(self) -> list[str]:
        """:meth:`hints` under equiv's names.

        Only the first (step, stage) whose failures match a known trap speaks: later
        differences are consequences of the first (a halved gradient also halves the
        update). A bare constant factor is named only when no known trap matches at
        the first failing step. Leaves with the same hint are named together, and where
        the float64 reference fails a backend at that step only the pairs against the
        reference speak (the same cause, once). From
        the step at which every backend overflows (:meth:`overflowed_at`) or the error
        sizes do (:meth:`unbounded_at`), :meth:`overflow_note` or
        :meth:`unbounded_note` speaks instead, after any cause found before it (inf or
        NaN on one side only included: JAX's float32 silu backward gives NaN where
        ``upstream · z`` overflows and torch's is finite, a step before the run does).
        """
        groups: dict[tuple[int, int, str, str], list[str]] = {}
        order = _STAGE_RANK
        overflowed, unbounded = self.overflowed_at(), self.unbounded_at()
        limit = _earliest(overflowed, unbounded)
        start = self._start_causes()
        if start and self.report.failures:
            return start  # every later difference follows from the start
        assumed = self._assumed_loss_cause()
        if assumed and assumed[1]:
            return [assumed[0]]  # the port computes another loss: the rest follows
        own = self.backend_overflows()
        for d in self.report.failures:
            if not _is_evidence(d, limit, own):
                continue  # overflow, not a trap: the notes below say so
            if d.actual in self.trajectories and d.expected in self.trajectories:
                key = (d.step, order[d.stage], d.actual, d.expected)
                groups.setdefault(key, []).append(d.name)
        # Where the float64 reference speaks at a (step, stage), only the pairs against
        # it do: "port vs torch" says again what "port vs reference" says (found in a
        # user trial: a dozen near-identical lines).
        judged = {key[:2] for key in groups if REFERENCE in key[2:]}
        groups = {
            key: names
            for key, names in groups.items()
            if REFERENCE in key[2:] or key[:2] not in judged
        }
        spec = self.problem.spec
        numel = self.problem.batch_size * spec.sizes[-1]
        found_at, merged, generic = None, {}, {}
        first_step = min((key[0] for key in groups), default=None)
        for (step, rank, a, b), names in sorted(groups.items(), key=lambda kv: kv[0][:2]):
            if found_at is not None and (step, rank) != found_at:
                break
            stage = next(k for k, v in order.items() if v == rank)
            ta, tb = self.trajectories[a], self.trajectories[b]
            before = own_before = None
            if stage == "params" and (step, order["grads"], a, b) not in groups:
                # Only where the gradients agree can a different update be the
                # learning rate's or the weight decay's (a zero gradient, a
                # stop_gradient, gives a zero update whatever the learning rate).
                # Each side's update from its own start: after a failed step the
                # starts differ (b's for both named a warmup's lr -0.71 times torch's).
                before = _float64_params(self.problem) if step == 1 else tb.params[step - 2]
                own_before = before if step == 1 else ta.params[step - 2]
            cause = None
            if stage in ("state", "params"):
                cause = self._flushed_second_moment(step, a, b) or self._optimizer_cause(a, b)
            cause = f"{cause} (from step {step} on)" if cause else self._variant_cause(a, b)
            if cause:
                found_at = (step, rank)
                leaves = merged.setdefault(cause, [])
                leaves.extend(n for n in names if n not in leaves)
                continue
            if stage == "state" and (step, order["grads"], a, b) in groups:
                continue  # the state follows the gradients: their hint speaks
            try:
                found = diagnose_trees(
                    ta.stage(stage, step),
                    tb.stage(stage, step),
                    names,
                    stage=stage,
                    names=(a, b),
                    before=before,
                    own_before=own_before,
                    earlier_agreed=not any(
                        d.step < step and {d.actual, d.expected} == {a, b}
                        for d in self.report.failures
                    ),
                    dtype=spec.dtype,
                    numel_output=numel,
                    batch_size=self.problem.batch_size,
                    learning_rate=self.learning_rate,
                    optimizer=resolve_optimizer(self.optimizer, self.learning_rate),
                    step=step,
                    # The loss of this step failed too, with no cause found there.
                    loss_differs=(step, order["loss"], a, b) in groups,
                    layout=ta.layout or tb.layout,
                    loss=spec.loss,
                    by_hand=self._hand_written,
                )
            except (KeyError, ValueError):  # a hand-built trajectory missing a leaf
                found = []
            if (
                stage == "params"
                and (step, order["grads"], a, b) not in groups
                and all(hint.endswith(GENERIC) for hint in found)
            ):
                # No known cause of the update (a weight decay, a learning rate) fits:
                # a gradient element near ε may explain it.
                near = self._adam_near_eps(step, a, b, names)
                if near:
                    found_at = (step, rank)
                    merged.setdefault(f"{near} (step {step}, {a} vs {b})", []).extend(names)
                    continue
            for hint in found:
                leaf, text = hint.split(": ", 1)
                key = f"{text} (step {step}, {a} vs {b})"
                if text.endswith(GENERIC):
                    if step == first_step:
                        generic.setdefault(key, []).append(leaf)
                    continue
                found_at = (step, rank)
                merged.setdefault(key, []).append(leaf)
        causes = [f"{', '.join(leaves)}: {text}" for text, leaves in (merged or generic).items()]
        if merged:
            # Leaves failing where a cause was found that no cause names (found in a user
            # trial: an Adam learning rate 3 times torch's named 5 of 6 failing leaves,
            # as if the sixth agreed).
            covered = {leaf for leaves in merged.values() for leaf in leaves}
            rest = dict.fromkeys(
                name for key, names in groups.items() if key[:2] == found_at for name in names
            )
            rest = [name for name in rest if name not in covered]
            if rest:
                causes.append(
                    f"{', '.join(rest)}: {'fails' if len(rest) == 1 else 'fail'} at that "
                    "step and stage too, with no known cause found there (the same mistake "
                    "showing otherwise, or another)"
                )
        if found_at is not None and found_at[1] < order["state"]:
            # A cause in the loss or gradients speaks first; an optimizer mistake beside
            # it is still found, from the backend's own gradients (found in a user
            # trial: GELU's approximation beside optax's default decay named the GELU).
            failing = {side for key in groups for side in key[2:] if side != REFERENCE}
            for backend in sorted(failing):
                causes += self._own_update_causes(backend)
        note = (
            self.overflow_note(overflowed)
            if limit is not None and limit == overflowed
            else self.unbounded_note(unbounded)
        )
        if not causes:  # inf or NaN on one side before the run overflowed
            causes = self._nonfinite_cause(limit, own)
        lowered = self._lowered_precision() if self.report.failures else None
        return (
            ([lowered] if lowered else [])
            + causes
            + self._backend_overflow_notes(limit)
            + ([note] if note else [])
            # What was assumed, where no known cause explains the difference.
            + ([assumed[0]] if assumed and not merged else [])
        )

    def _assumed_loss_cause(self) -> tuple[str, bool] | None:
        """Where the loss was taken to be MSE for want of a spec (``settings
        ["loss_assumed"]``, recorded by :func:`equiv.check_jax_port` and
        :func:`equiv.check_manual_backward` for a module, which cannot say its loss) and
        a backend's step-1 loss fails against the reference: the other loss (of those
        taking the same targets, at the spec's hyper-parameters) whose float64 value that
        loss is, within 1e-5, as ``(hint, True)``; else a note saying what was assumed,
        ``(note, False)``. None otherwise. Found in a user trial: a Huber port of an
        ``nn.Sequential`` was blamed, with no hint, though it was right."""
        if not self.report.settings.get("loss_assumed"):
            return None
        failed = [
            d.actual
            for d in self.report.failures
            if (d.stage, d.step, d.expected) == ("loss", 1, REFERENCE)
            and d.actual in self.trajectories
        ]
        if not failed:
            return None
        spec = self.problem.spec
        x, y = (np.asarray(v, np.float64) for v in self.problem.batches[0])
        params = _float64_params(self.problem)
        theirs = float(np.asarray(self.trajectories[failed[0]].losses[0], np.float64))

        # Every field the module gave (a user trial pasted the advice and was refused:
        # "spec says bias=True" for a model whose last layer had none; a review, the
        # same for a leaky ReLU's slope and a float64 model's dtype).
        def fix(loss: str | None) -> str:
            if loss is None:
                return (
                    f"pass spec=equiv.MLPSpec({spec.sizes}, activation={spec.activation!r}, "
                    "loss=...) with the module's sizes, activations and bias"
                )
            return f"pass spec=equiv.{spec.replace(loss=loss).code()}"

        targets = LOSSES[spec.loss].targets
        for name, loss in LOSSES.items():
            if name == spec.loss or loss.targets != targets:
                continue
            other = spec.replace(loss=name, dtype="float64")
            with np.errstate(all="ignore"):
                value = float(manual.loss_and_grads(params, x, y, other)[0])
            if np.isfinite(value) and abs(theirs - value) <= 1e-5 * max(abs(value), 1e-30):
                # Either reading may be the true one: the port right and the spec
                # unsaid, or the port wrong (found in a user trial: a summed MSE port
                # of a mean MSELoss was told only to pass loss='mse_sum', which turns
                # the check green on a wrong port).
                assumed = self.trajectories[REFERENCE].losses[0]
                ratio = theirs / float(assumed) if float(assumed) else math.inf
                return (
                    f"loss: {failed[0]}'s loss is the {name} loss of the model's output "
                    f"({theirs:.6g}), not the {spec.loss} that equiv took it to be, as no "
                    "spec said otherwise (a module cannot say its loss). If the torch "
                    f"model's loss is {name}, "
                    + fix(name)
                    + f"; if it is {spec.loss}, {failed[0]} computes the wrong loss "
                    f"({ratio:.4g} times the {spec.loss} loss)",
                    True,
                )
        return (
            f"loss: equiv took the loss to be {spec.loss}, as no spec said otherwise (a "
            f"module cannot say its loss); if {failed[0]}'s is another, {fix(None)}",
            False,
        )

    def _lowered_precision(self) -> str | None:
        """The recorded settings under which float32 matmuls are not IEEE (a comparison
        under ``precision="native"``), as a hint, or None: the bounds model IEEE float32,
        and bf16 (2⁻⁸) or TF32 (2⁻¹¹) rounding is far beyond them (found in a user trial:
        mkldnn's bf16 flag gave 46 failures and no hint, though the settings said it)."""
        settings = self.report.settings
        lowered = lowered_matmuls(settings)
        if not lowered:
            return None
        return (
            f"float32 matmuls were not IEEE in this comparison ({', '.join(lowered)}; "
            f"precision={settings.get('precision', 'native')!r}): bf16 or TF32 rounding is "
            "far beyond the float32 bounds. Compare with precision='exact' (the default), "
            "which pins IEEE float32 in a scope, or set those to 'ieee' / 'highest'"
        )

    def _own_update_causes(self, backend: str) -> list[str]:
        """What ``backend``'s optimizer does wrong, judged from its own gradients, as
        hints: a known misreading its whole run replays (:meth:`_optimizer_cause`), or
        its step-1 update against torch's optimizer applied to its gradients, read by
        the update detectors (a learning rate, a weight decay). Independent of whether
        those gradients are right; empty when the update is torch's to
        ``UPDATE_EXPLAINED`` of its size (plus 4 roundings of its
        parameters: a float32 update read as p_after - p_before carries u·|p|)."""
        run = self.trajectories[backend]
        if not run.params or not run.grads:
            return []
        misread = self._optimizer_cause(backend, backend)
        optimizer = resolve_optimizer(self.optimizer, self.learning_rate)
        also = f"Also, from {backend}'s own gradients, whatever they are: "
        if misread:
            return [f"{also}{misread}"]
        also = f"Also, torch's {optimizer.name} replayed on {backend}'s own gradients: "
        try:
            start = (
                {k: np.asarray(v, np.float64) for k, v in run.initial.items()}
                if run.initial is not None
                else _float64_params(self.problem)
            )
            grads = {k: to_numpy(v).astype(np.float64) for k, v in run.grads[0].items()}
            after = {k: to_numpy(v).astype(np.float64) for k, v in run.params[0].items()}
            with np.errstate(all="ignore"):
                predicted, _ = manual_update(
                    optimizer, start, grads, manual_init(optimizer, start), 1
                )
        except (KeyError, ValueError):  # a hand-built trajectory missing a leaf
            return []
        u = UNIT_ROUNDOFF.get(run.dtype, 0.0)
        with np.errstate(all="ignore"):
            scale = max(float(np.max(np.abs(predicted[k] - start[k]), initial=0.0)) for k in start)
            off = [
                name
                for name in start
                if float(np.max(np.abs(after[name] - predicted[name]), initial=0.0))
                > UPDATE_EXPLAINED * scale + 4 * u * float(np.max(np.abs(after[name]), initial=0.0))
            ]
        if not off or not math.isfinite(scale) or scale == 0.0:
            return []
        spec = self.problem.spec
        found = diagnose_trees(
            after,
            predicted,
            off,
            stage="params",
            names=(backend, "the replay"),
            before=start,
            own_before=start,
            dtype=spec.dtype,
            numel_output=self.problem.batch_size * spec.sizes[-1],
            batch_size=self.problem.batch_size,
            learning_rate=self.learning_rate,
            optimizer=optimizer,
            step=1,
        )
        merged: dict[str, list[str]] = {}
        for hint in found:
            leaf, text = hint.split(": ", 1)
            if not text.endswith(GENERIC):
                merged.setdefault(text, []).append(leaf)
        return [f"{also}{', '.join(leaves)}: {text} (step 1)" for text, leaves in merged.items()]

    def _backend_overflow_notes(self, limit: tuple[int, str] | None) -> list[str]:
        """One line per backend that overflowed on its own with failures after it."""
        notes = []
        for name, (step, stage, held) in self._overflows().items():
            if limit is not None and _earliest(limit, (step, stage)) == limit:
                continue  # the run's own note speaks
            if not any(
                name in (d.actual, d.expected) and _at_or_after(d, (step, stage))
                for d in self.report.failures
            ):
                continue
            notes.append(
                f"{name} holds inf or NaN in its {_STAGE_NAMES[stage]} at step {step}, where the "
                f"float64 values from its own parameters reach {held:.3g}: beyond what "
                f"{self.problem.spec.dtype} holds. From there {name}'s "
                "differences are overflow, not evidence about the code: "
                + (f"compare fewer steps (--steps {step - 1}) or " if step > 1 else "")
                + "lower the learning rate."
            )
        return notes

    def analysis_limit(self) -> tuple[int, str] | None:
        """The first ``(step, stage)`` from which failures are not evidence about the
        implementations: the earlier of :meth:`overflowed_at` and :meth:`unbounded_at`,
        or None."""
        return _earliest(self.overflowed_at(), self.unbounded_at())

    def leaves_before_limit(self) -> list[LeafDiff]:
        """The report's leaves before :meth:`analysis_limit` (all where there is none),
        less those of a backend from its own overflow on (:meth:`backend_overflows`):
        the comparisons that are evidence about the implementations. A diverging run
        may fail only from its limit on (``tests/test_false_alarms.py``)."""
        limit, own = self.analysis_limit(), self.backend_overflows()
        return [d for d in self.report.leaves if _is_evidence(d, limit, own)]

    def backend_overflows(self) -> dict[str, tuple[int, str]]:
        """For each backend that overflows on its own: the first ``(step, stage)`` at
        which it holds an inf or NaN, where the float64 values at its own parameters
        are beyond the dtype's range (or inf or NaN). Its dtype cannot hold them, so
        from there its differences with any backend are overflow, not evidence, even
        where a backend on another trajectory stays finite (found by random sweeps:
        torch's float32 gradients were NaN, ``inf · 0`` at a dead unit, where the
        float64 ones at torch's parameters were 8.7e167 while JAX, parted by XLA's
        flushing of subnormals, stayed finite; and the reverse, JAX's loss inf where
        the float64 loss at JAX's parted parameters was 6.8e74 and torch's 2.5e23).

        The float64 values of the loss and gradients come from the hand-derived pass
        at the parameters the backend started that step from; for the parameters and
        optimizer state, from the reference, when the backend agreed with it on every
        comparison before. An inf or NaN where those values are in range may be a bug,
        and stays evidence."""
        return {name: (step, stage) for name, (step, stage, _) in self._overflows().items()}

    def _overflows(self) -> dict[str, tuple[int, str, float]]:
        """:meth:`backend_overflows` with the float64 size found there, computed once
        (each needs a float64 pass)."""
        if self._own_overflows is not None:
            return self._own_overflows
        found = {}
        for name, run in self.trajectories.items():
            if name == REFERENCE:
                continue
            first = next(
                (
                    (step, stage)
                    for step in range(1, len(run.losses) + 1)
                    for stage in _STAGE_NAMES
                    if run.stage(stage, step) and _nonfinite(run.stage(stage, step))
                ),
                None,
            )
            if first is not None:
                held = self._float64_at_own_start(name, *first)
                if held is not None and not held <= float(np.finfo(self.problem.spec.dtype).max):
                    found[name] = (*first, held)
        self._own_overflows = found
        return found

    def _float64_at_own_start(self, name: str, step: int, stage: str) -> float | None:
        """The greatest float64 value of ``stage`` at step ``step`` computed from the
        parameters ``name`` started it from (inf for an inf or NaN), or None where it
        cannot be computed."""
        run = self.trajectories[name]
        if stage in ("loss", "grads"):
            spec = self.problem.spec.replace(dtype="float64")
            x, y = _float64_batch(self.problem, step)
            try:
                start = _params_before(self.problem, run, step)
                before = {k: v.astype(np.float64) for k, v in start.items()}
                with np.errstate(all="ignore"):
                    loss, grads = manual.loss_and_grads(before, x, y, spec)
            except (KeyError, ValueError, IndexError):  # a hand-built trajectory
                return None
            values = {"loss": np.asarray(loss)} if stage == "loss" else grads
        else:
            reference = self.trajectories.get(REFERENCE)
            if reference is None or len(reference.losses) < step:
                return None
            if any(
                {d.actual, d.expected} == {name, REFERENCE} and not _at_or_after(d, (step, stage))
                for d in self.report.failures
            ):
                return None  # parted: the reference did not compute this trajectory
            values = reference.stage(stage, step)
            if not values:
                return None
        return math.inf if _nonfinite(values) else _largest(values)

    def unbounded_at(self) -> tuple[int, str] | None:
        """The first ``(step, stage)`` whose rounding-error sizes
        (:func:`equiv.manual.magnitudes`), or float64 values, overflow at the
        reference's or some backend's parameters while those are finite, or None. The
        backends' values may all be finite: the analysis says that their rounding
        errors are beyond what it can bound (a chaotic run: found by a random sweep, a
        float64 run whose weights reached 1e42 and whose pre-activations were off by
        thousands between libraries; another whose loss overflowed in torch and the
        reference but came out 2.7e243 in JAX)."""
        found = self.report.settings.get("sizes_overflow")
        return (int(found[0]), str(found[1])) if found else None

    def unbounded_note(self, found: tuple[int, str] | None = None) -> str | None:
        """Why failures from :meth:`unbounded_at` on say nothing about the code, or None."""
        found = found or self.unbounded_at()
        if found is None or not any(_at_or_after(d, found) for d in self.report.failures):
            return None
        step, stage = found
        fewer = f"compare fewer steps (--steps {step - 1}) or " if step > 1 else ""
        return (
            f"the rounding errors of the {_STAGE_NAMES[stage]} at step {step} are beyond what "
            "equiv can bound: they, or the values themselves, overflow float64 at finite "
            "parameters (the run diverged). "
            "From there a bound allows nothing it cannot compute, and a difference is not "
            f"evidence about the implementations: {fewer}lower the learning rate."
        )

    def _nonfinite_cause(
        self, limit: tuple[int, str] | None, own: Mapping[str, tuple[int, str]]
    ) -> list[str]:
        """For the first failure with inf or NaN on one side only (before ``limit``,
        :meth:`analysis_limit`, and a backend's own overflow, :meth:`backend_overflows`):
        which side, where, and how large the other side is there."""
        for d in sorted(self.report.failures, key=lambda d: (d.step, _STAGE_RANK[d.stage])):
            if not _is_evidence(d, limit, own):
                continue
            if not d.nonfinite_mismatched or not {d.actual, d.expected} <= set(self.trajectories):
                continue
            a = self.trajectories[d.actual].stage(d.stage, d.step).get(d.name)
            b = self.trajectories[d.expected].stage(d.stage, d.step).get(d.name)
            if a is None or b is None or np.shape(a) != np.shape(b):
                continue
            for bad, good, bad_name, good_name in (
                (a, b, d.actual, d.expected),
                (b, a, d.expected, d.actual),
            ):
                lone = ~np.isfinite(bad) & np.isfinite(good)
                if lone.any():
                    what = _STAGE_NAMES[d.stage]
                    top = float(np.max(np.abs(np.asarray(good, np.float64)[lone])))
                    count = int(lone.sum())
                    # "its loss holds ... at 1 entry", "its gradients hold ... at 3 entries"
                    # (found in a user trial: "loss hold inf or NaN at 1 entries").
                    verb = "holds" if what == "loss" else "hold"
                    entries = "entry" if count == 1 else "entries"
                    finite = "is finite" if count == 1 else "are finite"
                    return [
                        f"{d.name}: {bad_name}'s {what} {verb} inf or NaN at {count} {entries} "
                        f"where {good_name}'s {finite} (at most {top:.3g} there), "
                        f"at step {d.step}: {bad_name}'s arithmetic overflowed, divided by "
                        f"zero or took an invalid operation where {good_name}'s did not."
                        + self._unjitted_note(bad_name, d, lone)
                    ]
        return []

    def _unjitted_note(self, backend: str, d: LeafDiff, lone: np.ndarray) -> str:
        """Whether ``backend``'s step ``d.step``, run op by op from the same parameters
        (:attr:`Trajectory.unjitted`), is finite where its compiled step was not: then
        XLA's compilation changed the arithmetic, not the formula (found by a random
        sweep: JAX's jitted float64 cross-entropy gave -inf for a loss of 1.7e27, as
        XLA fused a 1-wide layer's product into ``o - max(o)`` as a fused
        multiply-add, so the largest logit minus itself was -5.4e9 and every exp
        underflowed; op by op the loss was finite). "" where there is no replay."""
        trajectory = self.trajectories[backend]
        if trajectory.unjitted is None or d.stage not in ("loss", "grads"):
            return ""
        params = _params_before(self.problem, trajectory, d.step)
        x, y = self.problem.batches[d.step - 1]
        try:
            with np.errstate(all="ignore"):
                loss, grads = trajectory.unjitted(params, x.numpy(), jax_labels(y))
        except Exception as error:  # a hint must not raise: it says why it has no replay
            return f" (Its op-by-op replay failed: {type(error).__name__}: {error}.)"
        value = loss if d.stage == "loss" else grads.get(d.name)
        if value is None or np.shape(value) != np.shape(lone):
            return ""
        replayed = np.asarray(value)[lone]
        if np.isfinite(replayed).all():
            top = float(np.max(np.abs(replayed.astype(np.float64))))
            return (
                f" Run op by op (jax.disable_jit) from the same parameters they are finite "
                f"(at most {top:.3g}): XLA's compilation changed the arithmetic (a fusion, "
                f"such as a fused multiply-add), not the formula."
            )
        return (
            " Run op by op (jax.disable_jit) from the same parameters they are inf or NaN "
            "too: the formula itself, not XLA's compilation."
        )

    def overflowed_at(self) -> tuple[int, str] | None:
        """The first ``(step, stage)`` at which the run overflowed: every backend holds
        an inf or NaN in that stage, and either at least two backends do (independent
        implementations that agree on it: the dtype, not a bug) or the float64
        reference does too (the run diverged) or holds a value beyond the dtype's range.
        None otherwise: inf or NaN in a lone backend against a reference in range may
        be a bug."""
        runs = [t for name, t in self.trajectories.items() if name != REFERENCE]
        reference = self.trajectories.get(REFERENCE)
        top = float(np.finfo(self.problem.spec.dtype).max)
        for step in range(1, self.problem.steps + 1):
            for stage in _STAGE_NAMES:
                trees = [t.stage(stage, step) for t in runs if len(t.losses) >= step]
                trees = [tree for tree in trees if tree]
                if not trees or not all(_nonfinite(tree) for tree in trees):
                    continue
                if len(trees) >= 2:
                    return step, stage
                if reference is not None and len(reference.losses) >= step:
                    held = reference.stage(stage, step)
                    if _nonfinite(held) or _largest(held) > top:
                        return step, stage
        return None

    def overflow_note(self, found: tuple[int, str] | None = None) -> str | None:
        """Why failures from :meth:`overflowed_at` on say nothing about the code, or None.

        A diverging run overflows: its rounding errors outgrow what the derived bounds
        model (the error sizes overflow too), and ``inf - inf`` or ``0 · inf`` give NaN
        wherever two libraries order their arithmetic differently. ``found``: what
        :meth:`overflowed_at` returned, when the caller has it.
        """
        found = found or self.overflowed_at()
        if found is None or not any(_at_or_after(d, found) for d in self.report.failures):
            return None
        step, stage = found
        what, dtype = _STAGE_NAMES[stage], self.problem.spec.dtype
        plural = stage in ("grads", "params")
        verb, holds = ("overflow", "hold") if plural else ("overflows", "holds")
        reference = self.trajectories.get(REFERENCE)
        held = None
        if reference is not None and len(reference.losses) >= step:
            tree = reference.stage(stage, step)
            held = None if _nonfinite(tree) else _largest(tree)
        why = (
            f"{dtype} cannot hold this run"
            if held is not None and held > float(np.finfo(dtype).max)
            else f"an intermediate result is beyond {dtype}'s range"
        )
        where = (
            f"every backend's {what} {verb} {dtype} at step {step}, where the float64 "
            f"reference holds values up to {held:.3g}: {why}"
            if held is not None
            else f"the run diverged: its {what} {holds} inf or NaN at step {step} in every "
            "backend" + (" and the float64 reference" if reference is not None else "")
        )
        fewer = f"compare fewer steps (--steps {step - 1}) or " if step > 1 else ""
        underflow = self._adam_underflow(step) if stage == "params" else None
        if underflow:
            return (
                f"every backend's parameters overflow {dtype} at step {step}: {underflow}. "
                "From there the differences are the dtype's, not evidence about the "
                f"implementations: {fewer}use a larger eps (torch's default is 1e-8) or "
                "float64."
            )
        return (
            f"{where}. From there the differences are overflow, not evidence about the "
            f"implementations: {fewer}lower the learning rate."
        )

    def _adam_second_moment(self) -> tuple[OptimizerSpec, str, float] | None:
        """For Adam and AdamW: the optimizer, the state that divides its update
        (``exp_avg_sq``, AMSGrad's ``max_exp_avg_sq``) and the dtype's smallest normal
        number, below which that state may be flushed; None for other optimizers."""
        optimizer = resolve_optimizer(self.optimizer, self.learning_rate)
        if optimizer.name not in ("adam", "adamw"):
            return None
        key = "max_exp_avg_sq" if optimizer.amsgrad else "exp_avg_sq"
        return optimizer, key, float(np.finfo(self.problem.spec.dtype).tiny)

    def _adam_near_eps(self, step: int, a: str, b: str, names: list[str]) -> str | None:
        """Why Adam's first updates of ``a`` and ``b`` differ where their gradients
        agree, or None: the leaf's worst element has a gradient near ε, where the
        update ``lr·g/(|g| + ε)`` carries the gradient's relative error whole, and one
        side's gradient there is off by more, relatively, than its rounding allows
        elementwise, though within the gradients' leaf-wide bound (found in review:
        tanh written 2σ(2z) - 1, correct but less accurate for small z, passed its
        gradients and failed its parameters at ratio 3.6, with no hint)."""
        adam = self._adam_second_moment()
        if adam is None or step != 1 or (adam[0].name == "adam" and adam[0].weight_decay):
            return None  # (Adam's L2 decay puts λ·p in g: not this one-gradient form)
        eps = adam[0].eps
        ta, tb = self.trajectories[a], self.trajectories[b]
        start = _float64_params(self.problem)
        for name in names:
            moved = [np.asarray(t.params[0][name], np.float64) - start[name] for t in (ta, tb)]
            grads = [np.asarray(t.grads[0][name], np.float64) for t in (ta, tb)]
            if moved[0].shape != moved[1].shape or not np.all(np.isfinite(moved[0] - moved[1])):
                continue
            at = np.unravel_index(np.argmax(np.abs(moved[0] - moved[1])), moved[0].shape)
            g, theirs = float(grads[1][at]), float(grads[0][at])
            if not 0 < abs(g) <= 100 * eps:
                continue
            # The two step-1 updates lr·g/(|g| + ε) of their own gradients must account
            # for the difference: another cause (a weight decay) leaves it unexplained.
            lr = adam[0].learning_rate
            explained = abs(lr * theirs / (abs(theirs) + eps) - lr * g / (abs(g) + eps))
            if explained < 0.5 * float(np.abs(moved[0] - moved[1])[at]):
                continue
            off = abs(theirs - g) / abs(g)
            largest = float(np.max(np.abs(grads[1])))
            return (
                f"{a}'s Adam update differs from {b}'s at {tuple(map(int, at))}, "
                f"where the gradient is {g:.3g}, near ε = {eps:g} (the leaf's largest is "
                f"{largest:.3g}): there lr·g/(|g| + ε) turns the gradient's relative error "
                f"into the update's, and {a}'s gradient is {off:.2g} off relatively, within "
                "the gradients' bound, which is sized by the leaf's largest, but not the "
                "update's, which follows each element. A formula less accurate than "
                "torch's for small values does this (tanh written 2σ(2z) - 1, say): write "
                "it as torch does (jnp.tanh, jax.nn.*)"
            )
        return None

    def _flushed_second_moment(self, step: int, a: str, b: str) -> str | None:
        """Why Adam's updates of ``a`` and ``b`` differ at ``step`` where one holds
        ``v = 0`` and the other a ``v`` below the dtype's smallest normal number, or
        None: XLA flushes subnormal numbers to zero and torch keeps them, and with a
        tiny ε the update ``m̂/(√v̂ + ε)`` then moves by far more than the learning rate
        (found in review: gradients of 3e-20 at ε = 1e-20, JAX's update 2.8·lr against
        torch's 0.74·lr; the hint named a weight decay of 1.9e-8)."""
        adam = self._adam_second_moment()
        runs = [self.trajectories[name] for name in (a, b)]
        if adam is None or not all(run.has_state(step) for run in runs):
            return None
        optimizer, key, tiny = adam
        if any(
            not np.all(np.isfinite(g)) for run in runs for t in run.grads[:step] for g in t.values()
        ):
            # An inf or NaN gradient is the cause, and has its own hint (found in review:
            # a port's NaN gradients under Adam were put down to a flushed subnormal).
            return None
        states = [run.states[step - 1].get(key, {}) for run in runs]
        for zero, kept, names in ((0, 1, (a, b)), (1, 0, (b, a))):
            for leaf, v in states[zero].items():
                other = states[kept].get(leaf)
                if other is None or np.shape(other) != np.shape(v):
                    continue
                flushed = (np.asarray(v) == 0) & (np.asarray(other) > 0) & (other < tiny)
                if flushed.any():
                    grad = np.abs(np.asarray(runs[zero].grads[step - 1][leaf], np.float64))
                    return (
                        f"{names[0]}'s Adam second moment v is 0 where {names[1]}'s is "
                        f"{float(np.max(np.asarray(other)[flushed])):.3g}, below "
                        f"{self.problem.spec.dtype}'s smallest normal number {tiny:.3g} "
                        f"({leaf}, gradients as small as {float(np.min(grad[flushed])):.3g}): "
                        "XLA flushes subnormal numbers to zero and torch keeps them, and "
                        f"with eps = {optimizer.eps:g} the update m̂/(√v̂ + eps) then moves by "
                        "far more than the learning rate. The dtype's, not the code's: use "
                        + (
                            "a larger eps (torch's default is 1e-8) or float64"
                            if optimizer.eps < 1e-8
                            else f"an eps larger than {optimizer.eps:g}, or float64"
                        )
                    )
        return None

    def _adam_underflow(self, step: int) -> str | None:
        """Why Adam's parameters are inf or NaN at ``step`` where the second moment
        underflowed the dtype, or None. ``v = (1 - β₂)·g²`` below the smallest normal
        number is kept subnormal by torch and flushed to 0 by XLA on the CPU, and below
        the smallest subnormal it is 0 in both: with a tiny or zero ε the update
        ``m̂/(√v̂ + ε)`` is then huge or ``m̂/0`` (found in review: gradients of 1e-21
        at ε = 0 gave inf in both float32 backends; the hint blamed the learning rate).
        """
        adam = self._adam_second_moment()
        if adam is None:
            return None
        optimizer, key, tiny = adam
        held, smallest = [], math.inf
        for name, run in self.trajectories.items():
            if name == REFERENCE or not run.has_state(step) or len(run.params) < step:
                continue
            v = run.states[step - 1].get(key, {})
            for leaf, value in run.params[step - 1].items():
                bad = ~np.isfinite(value)
                if leaf not in v or not bad.any() or not np.all(v[leaf][bad] < tiny):
                    continue
                grad = np.abs(np.asarray(run.grads[step - 1][leaf], np.float64))[bad]
                smallest = min(smallest, float(np.min(grad)))
                if name not in held:
                    held.append(name)
        if not held:
            return None
        b2 = optimizer.betas[1]
        if smallest == 0.0 and optimizer.eps == 0:
            # Found in review: "gradients as small as 0" called a 0/0 an underflow.
            return (
                f"gradients of exactly 0 there in {', '.join(held)} (a unit that is dead or "
                "a parameter the loss does not use) leave Adam's m and v at 0, and with "
                "eps = 0 the update m̂/(√v̂ + eps) is 0/0"
            )
        return (
            f"Adam's second moment v = (1-β₂)·g² underflowed there in {', '.join(held)}: "
            f"gradients as small as {smallest:.3g} give v below "
            f"{tiny:.3g}, the smallest normal {self.problem.spec.dtype} (gradients under "
            f"{math.sqrt(tiny / (1 - b2)):.3g} at β₂ = {b2:g}; torch keeps a subnormal v, "
            f"XLA flushes it to 0), and with eps = {optimizer.eps:g} the update "
            "m̂/(√v̂ + eps) " + ("divides by 0" if optimizer.eps == 0 else "is m̂/eps")
        )

    def _optimizer_cause(self, a: str, b: str) -> str | None:
        """Which of ``a`` and ``b`` a known misreading of the optimizer explains, and how
        (:func:`equiv.diagnose.diagnose_optimizer`), or None. Each backend's whole
        trajectory is replayed once per comparison, whatever step failed first."""
        optimizer = resolve_optimizer(self.optimizer, self.learning_rate)
        for backend in (a, b):
            if backend not in self._misreadings:
                run = self.trajectories[backend]
                initial = {k: to_numpy(v) for k, v in self.problem.params.items()}
                try:
                    what = diagnose_optimizer(optimizer, initial, run.grads, run.params)
                except (KeyError, ValueError):  # a hand-built trajectory missing a leaf
                    what = None
                if what:
                    what = f"{backend}'s updates are torch's {optimizer.name} misread: it {what}"
                self._misreadings[backend] = what or self._stepped_twice(backend, optimizer)
            if self._misreadings[backend]:
                return self._misreadings[backend]
        return None

    def _stepped_twice(self, backend: str, optimizer: OptimizerSpec) -> str | None:
        """Whether ``backend``'s first update is two of the optimizer's on the first
        batch, the gradients recomputed in between (a training step called twice per
        batch), as a hint, or None: its update must be within ``VARIANT_MATCH`` of the
        float64 two-step one, relative (plus the rounding of its parameters), and ten
        times nearer than the one-step one and than twice it.
        (The update, not the parameters: a step is small beside the weights.)"""
        run = self.trajectories[backend]
        spec = self.problem.spec
        cost = 12.0 * self.problem.batch_size * sum(v.numel() for v in self.problem.params.values())
        if backend == REFERENCE or not run.params or cost > VARIANT_FLOPS:
            return None
        batch = self.problem.batches[0]
        twice = dataclasses.replace(self.problem, spec=spec.replace(dtype="float64"))
        twice = dataclasses.replace(twice, batches=(batch, batch))
        with np.errstate(all="ignore"):
            steps = run_reference(twice, self.learning_rate, optimizer=optimizer).params
        start = _float64_params(self.problem)
        try:
            first = run.params[0].items()
            theirs = {k: to_numpy(v).astype(np.float64) - start[k] for k, v in first}
            once, two = ({k: p[k] - start[k] for k in theirs} for p in steps)
        except (KeyError, ValueError):  # a hand-built trajectory missing a leaf
            return None
        if _nonfinite(theirs):
            return None
        near, apart = tree_distance(theirs, two), tree_distance(theirs, once)
        # The backend's parameters are rounded to its dtype: its update carries u·|p|,
        # beyond VARIANT_MATCH relative where the step is small beside the weights
        # (Adam at lr 1e-3 in float32: 1.2e-5, found in review). Allowed per leaf.
        u = UNIT_ROUNDOFF.get(run.dtype, 0.0)
        for name, update in two.items():
            size = float(np.max(np.abs(update), initial=0.0))
            after = float(np.max(np.abs(theirs[name] + start[name]), initial=0.0))
            allowed = VARIANT_MATCH + (2 * u * after / size if size else 0.0)
            if tree_distance({name: theirs[name]}, {name: update}) > allowed:
                return None
        # Twice the one-step update (a learning rate twice the model's) must be ten
        # times further too: where the gradients barely move the two cannot be told
        # apart, and the factor hint names both.
        doubled = tree_distance(theirs, {k: 2 * v for k, v in once.items()})
        if not near * 10 <= min(apart, doubled):
            return None
        return (
            f"{backend} applies two {optimizer.name} updates to the first batch, the "
            f"gradients recomputed in between: its step-1 update is the float64 "
            f"two-step one within {near:.2g} relative, not the one-step one ({apart:.2g} "
            "apart). Check that the training step is called once per batch"
        )

    def _start_causes(self) -> list[str]:
        """For each backend that started from parameters of its own (``initial``), the
        leaves that differ from the model's: a square weight transposed named as such
        (after a step the update hides it), the others together with how far off."""
        causes = []
        model = _float64_params(self.problem)
        for backend, run in self.trajectories.items():
            if run.initial is None:
                continue
            other = []
            for name, ours in model.items():
                if name not in run.initial:
                    continue  # a leaf the run itself could not find: its error says so
                theirs = np.asarray(run.initial[name], np.float64)
                if theirs.shape == ours.shape and np.array_equal(theirs, ours):
                    continue
                square = theirs.ndim == 2 and theirs.shape[0] == theirs.shape[1] > 1
                if square and theirs.shape == ours.shape and np.array_equal(theirs, ours.T):
                    names = (backend, "the model")
                    found = diagnose_leaf(
                        name, theirs, ours, stage="start", names=names, layout=run.layout
                    )
                    causes.append(found or f"{name}: {backend} holds the model's transposed")
                elif theirs.shape == ours.shape:
                    other.append(f"{name} (by up to {np.max(np.abs(theirs - ours)):.3g})")
                else:
                    other.append(f"{name} (shape {theirs.shape}, not {ours.shape})")
            if other:
                causes.append(
                    f"{backend} starts from parameters other than the model's: "
                    f"{', '.join(other)}. Check the conversion you passed as params"
                )
        return causes

    def _variant_cause(self, a: str, b: str) -> str | None:
        """Which of ``a`` and ``b`` computes a known variant of the model
        (:func:`matching_variant`, cached per backend), or None. (A guess from the
        size of the difference alone named GELU for a forgotten transpose or bias:
        found in a user trial.)"""
        for backend in (a, b):
            if backend not in self._variants:
                self._variants[backend] = self._variant_of(backend)
            if self._variants[backend]:
                return f"{backend} {self._variants[backend]}"
        return None

    def _variant_of(self, backend: str) -> str | None:
        run = self.trajectories[backend]
        if backend == REFERENCE or not run.losses or not run.grads:
            return None
        theirs = {"loss": np.asarray(run.losses[0], np.float64), **run.grads[0]}
        if _nonfinite(theirs):
            return None
        spec = self.problem.spec.replace(dtype="float64")
        x, y = _float64_batch(self.problem, 1)
        noise = VARIANT_NOISE[self.problem.spec.dtype]
        return matching_variant(
            spec,
            _float64_params(self.problem),
            x,
            y,
            theirs,
            noise=noise,
            # A hand-written backward (check_manual_backward) is likelier wrong there.
            backward_first=self._hand_written and backend != "torch",
            unit_roundoff=UNIT_ROUNDOFF[run.dtype],
            layout=run.layout,
        )

    def arbiter_verdict(self) -> list[str]:
        """One line per backend: does it agree with the float64 reference, and if
        not, where it first departs. Empty without a reference trajectory."""
        if REFERENCE not in self.trajectories:
            return []
        lines = []
        for name in self.trajectories:
            if name == REFERENCE:
                continue
            bad = [d for d in self.report.failures if d.expected == REFERENCE and d.actual == name]
            if not bad:
                lines.append(f"  arbiter: {name} agrees with the float64 reference")
            else:
                first = bad[0]
                lines.append(
                    f"  arbiter: {name} is off: {len(bad)} leaves disagree with the float64 "
                    f"reference, first {first.name} ({first.where})"
                )
        return lines

    def to_dict(self, *, params: bool = True) -> dict[str, Any]:
        """A JSON-ready report: verdict, config, settings, environment (library
        versions and device), hints, losses and final parameters per backend, diffs;
        non-finite numbers as strings (``"nan"``), so that strict JSON holds it (found
        in a user trial: a NaN loss gave ``NaN``). ``params=False`` leaves out the final
        parameters, every element of every backend's (found in a user trial: 850 MB of
        JSON for a 12.6M-parameter model); the diffs keep each leaf's statistics.

        >>> comparison = compare_backends()
        >>> "params" in comparison.to_dict(), "params" in comparison.to_dict(params=False)
        (True, False)
        """
        report = self.report.to_dict()
        out = self._fields(report)
        if not params:
            del out["params"]  # before json_safe turns every element into a list item
        return json_safe(out)

    def _fields(self, report: dict[str, Any]) -> dict[str, Any]:
        return {
            "agree": report["agree"],
            "worst_ratio": report["worst_ratio"],
            "config": {
                "sizes": list(self.problem.spec.sizes),
                "activation": self.problem.spec.activation,
                "loss": self.problem.spec.loss,  # MLPSpec's field and --loss
                **{
                    field: getattr(self.problem.spec, field)
                    for field in (
                        "label_smoothing",
                        "huber_delta",
                        "smooth_l1_beta",
                        "negative_slope",
                        "elu_alpha",
                    )
                },
                "bias": self.problem.spec.bias,
                "dtype": self.problem.spec.dtype,
                "batch_size": self.problem.batch_size,
                "steps": self.problem.steps,
                "learning_rate": self.learning_rate,
                "optimizer": (
                    dataclasses.asdict(self.optimizer) if self.optimizer is not None else None
                ),
            },
            "settings": report["settings"],
            # Which torch, jaxlib and chip gave these figures (found in a user
            # trial: two CI runs' reports differed and neither said why).
            "environment": environment(str(report["settings"].get("device", "cpu"))),
            "hints": self.hints() if not report["agree"] else [],
            "loss": {b: [float(v) for v in t.losses] for b, t in self.trajectories.items()},
            "params": {
                b: {k: np.asarray(v) for k, v in t.params[-1].items()}
                for b, t in self.trajectories.items()
            },
            "diffs": report["leaves"],
        }

    def to_json(self, *, params: bool = True, **kwargs) -> str:
        """:meth:`to_dict` as strict JSON text (``params=False``: without the final
        parameters); ``kwargs`` go to :func:`json.dumps` (``indent=2``)."""
        return json.dumps(self.to_dict(params=params), allow_nan=False, **kwargs)


def compare_backends(
    spec: MLPSpec | None = None,
    *,
    batch_size: int = 2,
    seed: int = 0,
    learning_rate: float = 0.1,
    steps: int = 1,
    device: str | torch.device | jax.Device = "cpu",
    backends: Sequence[str] = BACKENDS,
    reference: bool = True,
    precision: str = "exact",
    rtol: float | None = None,
    atol: float | None = None,
    problem: Problem | None = None,
    optimizer: OptimizerSpec | None = None,
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Run ``steps`` training steps in every backend from one problem and compare them.

    Every pair of backends is compared at every stage (loss, gradients, parameters
    and optimizer state after each step), and with ``reference=True`` every backend is also compared
    with the float64 hand-derived reference. Tolerances are derived per leaf
    (:mod:`equiv.tolerance`) unless ``rtol`` and ``atol`` are both given.

    Args:
      spec: the MLP; default the notebook's 4-3-2 ReLU MLP in float32.
      batch_size, seed, steps: the problem, drawn as :func:`equiv.problem.make_problem`
        draws it; ignored when ``problem`` is given.
      learning_rate: plain SGD's learning rate, used when ``optimizer`` is None.
      optimizer: an :class:`~equiv.optimizers.OptimizerSpec` (SGD with momentum,
        Adam, AdamW, ...); its own learning rate wins over ``learning_rate``.
      device: ``"cpu"``, ``"cuda[:N]"`` (= ``"gpu[:N]"``) or a torch or JAX device,
        for torch and JAX alike; only the frameworks ``backends`` use must see it.
      backends: any of ``"torch"``, ``"manual"``, ``"jax"`` (at least one).
      precision: ``"exact"`` pins IEEE float32 matmuls (no TF32) in a scope;
        ``"native"`` keeps your settings.
      progress: called with the name of each phase as it starts (each backend, then
        ``"compare"``), for a progress display.

    Example:
      >>> comparison = compare_backends()
      >>> comparison.agree
      True
      >>> round(float(comparison.trajectories["torch"].losses[0]), 4)
      2.5145
    """
    if spec is not None:
        check_spec(spec)
    if spec is not None and problem is not None and spec != problem.spec:
        raise value_error(f"spec {spec} differs from problem.spec {problem.spec}; pass one of them")
    spec = spec or (problem.spec if problem else MLPSpec())
    check_computable(spec)
    backends = _check_backends(backends)
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise value_error(f"learning_rate must be a positive number, got {learning_rate!r}")
    if optimizer is not None:
        optimizer = resolve_optimizer(optimizer, learning_rate)
        learning_rate = optimizer.learning_rate
    user_tolerance(rtol, atol)  # fail early on a half-given tolerance
    # Fail early, before any work, on a missing device: only the frameworks the
    # backends use must see it (torch and manual run on torch tensors).
    device = device_name(device)
    uses_torch, uses_jax = bool({"torch", "manual"} & set(backends)), "jax" in backends
    if uses_torch and uses_jax:
        resolve_device(device)  # one message for both frameworks
    elif uses_jax:
        jax_device(device)
    else:
        torch_device(device)
    if problem is None:
        check_counts(batch_size=batch_size, steps=steps, seed=seed)
    else:
        batch_size, steps = len(problem.batches[0][0]), len(problem.batches)
    # What every backend's trajectory will hold, before anything is drawn or run.
    check_fits(
        spec,
        batch_size=batch_size,
        steps=steps,
        backends=backends,
        reference=reference,
        optimizer=optimizer,
    )
    if problem is None:
        problem = make_problem(spec, batch_size=batch_size, seed=seed, steps=steps)
    names = list(backends) + ([REFERENCE] if reference else [])
    report_phase = progress or (lambda phase: None)
    trajectories = {}
    with comparison_scope(spec.dtype, precision) as settings:
        for name in names:
            report_phase(name)
            trajectories[name] = RUNNERS[name](problem, learning_rate, device, optimizer)
    settings = {"dtype": spec.dtype, "device": device, **settings}
    report_phase("compare")
    report = compare_trajectories(
        problem,
        trajectories,
        learning_rate=learning_rate,
        rtol=rtol,
        atol=atol,
        optimizer=optimizer,
    )
    report.settings.update(settings)
    return Comparison(problem, float(learning_rate), trajectories, report, optimizer)


def assert_backends_agree(spec: MLPSpec | None = None, **kwargs) -> Comparison:
    """:func:`compare_backends`, raising ``AssertionError`` with the full report
    when any leaf disagrees; returns the comparison when all agree."""
    __tracebackhide__ = True
    comparison = compare_backends(spec, **kwargs)
    comparison.assert_agree()
    return comparison


def compare_trajectories(
    problem: Problem,
    trajectories: dict[str, Trajectory],
    *,
    learning_rate: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    kinks: bool = True,
    optimizer: OptimizerSpec | None = None,
    propagate: bool = True,
) -> Report:
    """Compare any trajectories of one problem: every pair of backends, and each
    backend against :data:`REFERENCE` when that trajectory is present.

    This is how a trajectory from your own implementation (or a deliberately
    broken one, in tests) joins a comparison: build a :class:`Trajectory` with
    :meth:`Trajectory.record` and pass it beside the others.

    Optimizer (``optimizer``, default plain SGD with ``learning_rate``): the stage
    ``"state"`` is compared for every pair that both recorded a state, and the
    state and parameter bounds carry the gradient bound through the optimizer
    (:func:`equiv.tolerance.optimizer_bounds`).

    Kinks (:mod:`equiv.kinks`): with ``kinks=True``, kinked activations
    (:func:`equiv.kinks.kinked`), the float64 reference present and
    ``learning_rate`` given, the units whose pre-activation lies within rounding
    distance of the kink are found, and a leaf they move may differ by the slack
    of the other side of the kink on top of its bound (twice that between two
    backends). The report's settings count them (``settings["kinks"]``); a
    difference elsewhere still fails. With propagation on, the reference's
    parameters are analysed at step 1, and from step 2 on each backend's own
    parameters, pushed through the optimizer from its own state
    (:func:`equiv.kinks.flip_envelope`): a backend that stays on its side of a
    kink while the reference moves away passes. A backend without a recorded
    optimizer state is analysed at step 1 only (``settings["kinks_limited"]``).
    Without propagation (``propagate=False`` or user ``rtol``/``atol``) plain SGD
    carries the reference's branches to later steps itself, and for other
    optimizers the analysis is off and ``settings["kinks"]`` says why.

    Propagation (``propagate=True``, the spec's own MLP): from step 2 on, two
    backends compute their loss and gradients at parameters that already differ by
    what earlier steps legitimately left (checked at those steps). That difference
    moves the loss and gradients by an amount no rounding bound of this step covers
    (Adam's normalised update makes it large: at learning rate 0.1, float32 runs
    were flagged 14 times in 36 without it). It is computed, not bounded: the
    float64 hand-derived step from each backend's own parameters and optimizer
    state before it (loss ``L(p_a)``, gradients ``∇L(p_a)``, parameters and state
    after the update). Each backend is held against its own: the comparison named
    "``a`` vs reference" from step 2 on is the local error of ``a``'s step, so
    nothing earlier steps left (a branch taken at a kink included) can mask a bug
    of this step. Two backends may differ by ``|∇L(p_a) - ∇L(p_b)|`` (and so on
    for each stage) on top of their bound. A backend without a recorded optimizer
    state is held against its own loss and gradients only; its parameters and
    state, against the reference's.

    Example:
      >>> problem = make_problem(MLPSpec((4, 3, 2)), batch_size=2, seed=0)
      >>> runs = {name: RUNNERS[name](problem, 0.1) for name in ("torch", REFERENCE)}
      >>> compare_trajectories(problem, runs, learning_rate=0.1).agree
      True
    """
    # Found in review: a half-precision problem (built directly) or trajectory reached
    # the bounds, and failed there with a KeyError or torch's "unsupported ScalarType".
    check_computable(problem.spec, "compare_trajectories")
    for trajectory in trajectories.values():
        check_computable(trajectory.dtype, f"compare_trajectories ({trajectory.backend!r})")
    fixed = user_tolerance(rtol, atol)
    if learning_rate is None and optimizer is not None:
        learning_rate = optimizer.learning_rate  # the optimizer's own, when it is given
    plain = is_plain_sgd(optimizer)
    backends = [name for name in trajectories if name != REFERENCE]
    # "candidate vs trusted": the backend run first (torch) is the second side, the
    # denominator of the relative difference, as the reference is in its own rows.
    pairs = [(b, a) for a, b in itertools.combinations(backends, 2)]
    if REFERENCE in trajectories:
        pairs += [(name, REFERENCE) for name in backends]
    analysis = None
    kink_note = None
    stateless = [
        b for b in backends if not _state_known(optimizer, trajectories[b], range(1, problem.steps))
    ]
    propagating = propagate and fixed is None
    if kinks and REFERENCE in trajectories and learning_rate is not None and backends:
        if plain or propagating:
            analysis = analyse_trajectory_kinks(
                problem,
                learning_rate,
                [trajectories[b].dtype for b in backends],
                trajectories[REFERENCE],
                optimizer=None if plain else resolve_optimizer(optimizer, learning_rate),
                # With propagation, later steps are analysed at each backend's own
                # parameters: the reference's step 1 is all that is left to do here
                # (carrying its branches on as well would count them twice).
                first_step_only=propagating,
            )
        elif kinked(problem.spec):
            kink_note = (
                f"off: with {optimizer.name}, a branch taken at a kink is carried to later "
                "steps by propagation, which is off here"
            )
    arbiter = trajectories[REFERENCE if REFERENCE in trajectories else backends[-1]]
    magnitude = _magnitudes(problem, trajectories.values()) if fixed is None else {}
    bounds_cache: dict[tuple[str, str], Any] = {}

    def carried(dtypes, own=None):  # the optimizer's carried bounds for dtypes (cached)
        return _optimizer_bounds(
            problem, optimizer, trajectories, arbiter, dtypes, magnitude, bounds_cache, own
        )

    leaves: list[LeafDiff] = []
    flips: list[Kink] = []  # ambiguous units at the backends' own parameters, steps >= 2
    for step in range(1, problem.steps + 1):
        moved = (
            _propagated(
                problem,
                trajectories,
                step,
                resolve_optimizer(optimizer, learning_rate),
                kinks=analysis is not None,
            )
            if propagate and step > 1 and fixed is None and learning_rate is not None
            else None
        )
        if moved is not None:
            flips += [k for name in moved for k in moved[name]["kinks"]]
        for stage in ("loss", "grads", "params", "state"):
            for a, b in pairs:
                ta, tb = trajectories[a], trajectories[b]
                if stage == "state" and (plain or not (ta.has_state(step) and tb.has_state(step))):
                    continue  # plain SGD keeps no state
                dtypes = (ta.dtype, tb.dtype)
                slack = None
                # From step 2 on a pair of backends may also differ by how far apart
                # their own float64 steps are, computed (below): the float64 rounding of
                # those two steps then counts as well (in a float64 run as much as the
                # backends' own: a loss of 4e69 at lr 91 was off by 7.6 times a bound
                # without it).
                local = moved is not None and b == REFERENCE and bool(moved[a][stage])
                parted = moved is not None and not local and moved[a][stage] and moved[b][stage]
                # Parted: the float64 rounding of the two float64 steps counts too.
                bounded = dtypes + (("float64", "float64") if parted else ())
                # Held to its own float64 step, a backend's difference is this step's
                # rounding alone: nothing earlier steps left is in it, so the bound is
                # one step's (found in review: sized for `step` steps, a learning rate
                # 1e-3 off from step 10 on passed where 2.4e-5 off from step 1 failed).
                tol = fixed or derived_tolerance(
                    problem.spec,
                    problem.batch_size,
                    "grads" if stage == "state" else stage,
                    1 if local else step,
                    bounded,
                    problem.repeats,
                )
                if parted and fixed is None:
                    # Said in the bound (found in a user trial: a difference equal to
                    # its bound, ratio 0.9997, read as a near false alarm).
                    tol = dataclasses.replace(
                        tol,
                        derivation=tol.derivation.replace("(u₁+u₂)", "(u₁+u₂+2u₆₄)")
                        + " + the trajectories' separation (they parted: each is held to "
                        "its own float64 step)",
                    )
                elementwise = None
                cap = _largest_of(dtypes)
                if fixed is None and stage in ("loss", "grads"):
                    sizes = magnitude[(stage, step)]
                    parts = {name: _elementwise_sizes(tol, sizes, name, cap) for name in sizes.each}
                    tol = {name: part[0] for name, part in parts.items()}
                    elementwise = {n: part[1] for n, part in parts.items() if part[1] is not None}
                elif fixed is None and stage == "params":
                    rate = _update_rate(problem, bounded)
                    tol = {
                        name: params_tolerance(
                            tol,
                            _update_sizes(
                                problem,
                                (ta, tb),
                                name,
                                step,
                                magnitude,
                                resolve_optimizer(optimizer, learning_rate)
                                if learning_rate is not None
                                else None,
                            )[-1 if local else 0 :],  # held to its own step: this update's
                            rate,
                        )
                        for name in problem.spec.param_names()
                    }
                    if not plain:
                        bounds = carried(dtypes, _own(local, a, step, moved, optimizer))
                        tol = {
                            name: _plus(t, bounds.params_atol[step][name], "optimizer carry")
                            for name, t in tol.items()
                        }
                        slack = bounds.params_slack.get(step)
                elif fixed is None and stage == "state":
                    bounds = carried(dtypes, _own(local, a, step, moved, optimizer))
                    tol = {
                        f"{key}.{name}": _plus(tol, value, "gradient bound carried")
                        for key, tree in bounds.state[step].items()
                        for name, value in tree.items()
                    }
                # From step 2 on, with propagation, a backend is checked against the
                # float64 step taken from its own parameters and state: what earlier
                # steps legitimately left (a branch taken at a kink included) then
                # cannot mask a bug of this step, as an allowance between two
                # trajectories can (a triangle bound: opposite signs cancel).
                expected = moved[a][stage] if local else tb.stage(stage, step)
                extra = dict(slack or {})
                if parted:
                    for name, value in moved[a][stage].items():
                        with np.errstate(invalid="ignore"):
                            apart = np.abs(value - moved[b][stage][name])
                        # A diverged backend's inf/NaN allows nothing: its values fail.
                        apart = np.where(np.isfinite(apart), apart, 0.0)
                        extra[name] = extra.get(name, 0.0) + apart
                # An envelope that overflowed (NaN: a flipped ELU unit at z = 1e6 with
                # α = 10) allows nothing, and must not wipe out the allowances beside it
                # (two parted trajectories' own steps: found in review, a correct deep
                # ELU run failed at 130 times the bound once the NaN was added in).
                if moved is not None:  # either backend may sit on the other side of a kink
                    for side in (a,) if local else (a, b):
                        for name, value in moved[side]["flips"].get(stage, {}).items():
                            extra[name] = extra.get(name, 0.0) + np.nan_to_num(value, nan=0.0)
                if analysis is not None:
                    # Two backends may sit on different sides of a kink: twice the envelope.
                    factor = 1.0 if REFERENCE in (a, b) else 2.0
                    for name in expected:
                        kink = analysis.slack_for(stage, step, name)
                        if kink is not None:
                            kink = np.nan_to_num(kink, nan=0.0)
                            extra[name] = extra.get(name, 0.0) + factor * kink
                diffs = compare_trees(
                    ta.stage(stage, step),
                    expected,
                    tol,
                    stage=stage,
                    step=step,
                    actual_name=a,
                    expected_name=b,
                    # Capped where it would overflow the dtype the leaves are compared
                    # in (its largest value allows all that inf would; float64 unless
                    # both are float32: a float64 run's 8.9e56 is no cap). A NaN (an
                    # envelope that overflowed float64 in a diverging run, inf - inf)
                    # allows nothing: the numbers then fail and the report shows them.
                    slack={
                        n: np.minimum(np.nan_to_num(v, nan=0.0, posinf=cap), cap)
                        for n, v in extra.items()
                        if np.any(np.asarray(v) > 0)
                    },
                    atol_elementwise=elementwise,
                )
                leaves += diffs
    report = Report(leaves)
    unbounded = [(step, stage) for (stage, step), sizes in magnitude.items() if sizes.overflowed]
    if unbounded:  # where the error analysis itself gives out (Comparison.unbounded_at)
        report.settings["sizes_overflow"] = list(_earliest(*unbounded))
    notes = [f"{name}: {t.state_note}" for name, t in trajectories.items() if t.state_note]
    if notes:  # a port's state left out is said, never silent (found in a user trial)
        report.settings["state_not_compared"] = "; ".join(notes)
    if analysis is not None:
        units = analysis.kinks + flips
        report.settings["kinks"] = len(units)
        report.settings["kink_units"] = [k.describe() for k in units]
        if stateless and problem.steps > 1:
            report.settings["kinks_limited"] = (
                f"{', '.join(stateless)} report no optimizer state: kinks at their own "
                "parameters after step 1 are not analysed"
            )
    elif kink_note is not None:
        report.settings["kinks"] = kink_note
    return report


def _own(
    local: bool, name: str, step: int, moved: dict | None, optimizer: OptimizerSpec | None
) -> tuple | None:
    """``(backend, step, its float64 state after the step)`` where a backend is held to
    its own float64 step (its parameters were stepped from its own) and any state the
    optimizer keeps is known, for :func:`_optimizer_bounds`. SGD with a weight decay
    alone keeps none (found in review: keyed on the state, it kept the carried bound,
    and a learning rate off from step 10 had to be 56 times larger to be caught)."""
    if not local or moved is None or not moved[name]["params"]:
        return None
    if optimizer is not None and optimizer.state_names and not moved[name]["state"]:
        return None
    return name, step, moved[name]["state"]


def _largest_of(dtypes: Sequence[str]) -> float:
    """The largest value of the dtype two leaves of ``dtypes`` are compared in (their
    promotion, at least float32): what a slack or bound term is capped at, so that it
    stays finite there."""
    return float(np.finfo(np.result_type(*dtypes, np.float32)).max)


def _update_rate(problem: Problem, dtypes: Sequence[str]) -> float:
    """The relative error of one step's gradient, ``c·√k·(u₁+u₂)``, at which gradient
    errors carry into the parameters (:func:`equiv.tolerance.params_tolerance`)."""
    spec, batch = problem.spec, problem.batch_size
    return derived_tolerance(spec, batch, "grads", 1, tuple(dtypes), problem.repeats).scaled


def _plus(tol: Tolerance, extra: float, why: str) -> Tolerance:
    if extra == 0.0 or not math.isfinite(extra):
        return tol  # a diverged run's carried bound (inf, NaN) allows nothing more
    return dataclasses.replace(
        tol, atol=tol.atol + extra, derivation=tol.derivation + f" + {extra:.3g} ({why})"
    )


def _optimizer_bounds(
    problem, optimizer, trajectories, arbiter, dtypes, magnitude, cache, own=None
):
    """:func:`equiv.tolerance.optimizer_bounds` for a pair of dtypes (cached). ``own``,
    ``(backend, step, state)``: that step's bound alone, for a backend held to the
    float64 step from its own parameters and state, taken at ``state``, the float64
    state after that step (Adam's update is sensitive where its own ``v`` is small,
    which the reference's ``v`` need not be once the two have parted)."""
    fresh = own is not None
    key = (*sorted(dtypes), *(own[:2] if fresh else ()))
    if key in cache:
        return cache[key]
    spec, names = problem.spec, problem.spec.param_names()
    grad_bounds, grad_max, param_bounds = [], [], []
    first_grads = derived_tolerance(spec, problem.batch_size, "grads", 1, dtypes, problem.repeats)
    rate = first_grads.scaled  # _update_rate
    # Held to its own step, one step's entries are all the bound reads.
    for step in [own[1]] if fresh else range(1, problem.steps + 1):
        g_tol = derived_tolerance(
            spec, problem.batch_size, "grads", 1 if fresh else step, dtypes, problem.repeats
        )
        p_tol = derived_tolerance(spec, problem.batch_size, "params", step, dtypes, problem.repeats)
        largest, excess = magnitude[("grads", step)][:2]
        grad_bounds.append(
            {
                n: with_magnitude(g_tol, largest[n] + excess[n], largest[n]).allowed(
                    0.0, largest[n]
                )
                for n in names
            }
        )
        if optimizer.name == "adam" and optimizer.weight_decay:
            # L2 decay: the moments take g + λ·p, which may be far larger than g (a
            # float64 Adam run whose gradient was exactly 0 in torch and 5e-13 in JAX,
            # against λ·p = 0.05: its second moment differed by 4.8e-17 where 1.2e-17
            # was allowed; random sweep). max|g + λ·p| ≤ max|g| + λ·max|p|.
            before = _params_before(problem, arbiter, step)
            decay = optimizer.weight_decay
            largest = {
                n: largest[n] + decay * float(np.max(np.abs(before[n]), initial=0.0)) for n in names
            }
        grad_max.append(dict(largest))
        param_bounds.append(
            {
                n: params_tolerance(
                    p_tol,
                    _update_sizes(problem, (arbiter,), n, step, magnitude, optimizer),
                    rate,
                ).allowed(0.0, float(np.max(np.abs(arbiter.params[step - 1][n]), initial=0.0)))
                for n in names
            }
        )
    u = sum(UNIT_ROUNDOFF[d] for d in dtypes)
    if fresh:
        _, step, state = own
        nested: dict[str, dict[str, np.ndarray]] = {}
        for flat, value in state.items():
            kind, _, param = flat.partition(".")
            nested.setdefault(kind, {})[param] = value
        cache[key] = optimizer_bounds(
            optimizer, grad_bounds, grad_max, param_bounds, [nested], u, fresh=True, first=step
        )
        return cache[key]
    states = [s or {} for s in arbiter.states] or [{}] * problem.steps
    first = None
    sizes = magnitude[("grads", 1)].sizes if problem.steps else None
    if optimizer.name in ("adam", "adamw") and sizes is not None and arbiter.grads:
        # Step 1 starts every backend from the same parameters: each gradient element
        # is off by at most its own size's share (manual.magnitudes), not the leaf's
        # greatest. Adam divides each element by its own √v: with the leaf's bound, an
        # element whose gradient is 1e-5 of the leaf's may move by 2·lr, which let ε
        # inside the square root (optax's eps_root) pass at torch's ε = 1e-8 (found in
        # a user trial).
        g_tol = first_grads
        taken = {n: np.asarray(arbiter.grads[0][n], np.float64) for n in names}
        values = {n: np.abs(taken[n]) for n in names}
        each = {n: g_tol.atol + g_tol.scaled * np.maximum(sizes[n], g_tol.floor) for n in names}
        if optimizer.name == "adam" and optimizer.weight_decay:
            # L2: the moments take g + λ·p, which may cancel (a float64 AMSGrad run
            # whose g + λ·p was 1e-3 of |g| + λ·|p| failed at 9 times a bound sized by
            # the latter; found by the slow sweep), and each backend rounds λ·p and
            # the sum: up to twice its u times |g| + λ·|p|.
            start = _float64_params(problem)
            decay = {n: optimizer.weight_decay * start[n] for n in names}
            taken = {n: taken[n] + decay[n] for n in names}
            values = {n: values[n] + np.abs(decay[n]) for n in names}
            each = {n: each[n] + 2 * u * values[n] for n in names}
        # v = (1 - β₂)·g² below the dtype's smallest normal number may be flushed to 0
        # (XLA on the CPU) or kept subnormal (torch): off by up to that number (found
        # in review: a gradient of 4.8e-21 at ε = 1e-19, ratio 99 before).
        tiny = max(float(np.finfo(d).tiny) for d in dtypes)
        first = (each, values, tiny, {n: np.abs(taken[n]) for n in names})
    cache[key] = optimizer_bounds(
        optimizer, grad_bounds, grad_max, param_bounds, states, u, first_step_each=first
    )
    return cache[key]


def analyse_trajectory_kinks(
    problem: Problem,
    learning_rate: float,
    dtypes: Sequence[str],
    reference: Trajectory | None = None,
    *,
    optimizer: OptimizerSpec | None = None,
    first_step_only: bool = False,
) -> KinkAnalysis:
    """:func:`equiv.kinks.analyse_kinks` for a problem compared in ``dtypes``.

    Before step ``s`` a backend's parameters may already differ from the reference
    by the parameter bound after step ``s - 1`` against float64 (the updates' rounding
    and the gradient errors they carried, :func:`equiv.tolerance.params_tolerance`,
    along the reference's updates); the bound on the pre-activations takes
    that into account. With an ``optimizer`` other than plain SGD, or with
    ``first_step_only``: step 1 only.
    """
    dtype = max(dtypes, key=lambda d: UNIT_ROUNDOFF[d])
    spec = problem.spec

    def param_error(step: int) -> dict[str, float]:
        if step == 1:
            return {}
        dtypes = (dtype, "float64")
        tol = derived_tolerance(spec, problem.batch_size, "params", step - 1, dtypes)
        rate = _update_rate(problem, dtypes)
        out = {}
        for name, v in reference.params[step - 2].items():
            moves = _update_sizes(problem, (reference,), name, step - 1)
            largest = float(np.max(np.abs(v), initial=0.0))
            out[name] = params_tolerance(tol, moves, rate).allowed(0.0, largest)
        return out

    if not kinked(spec):
        return KinkAnalysis(kinks=[], slack={})
    if reference is None:
        reference = run_reference(problem, learning_rate)
    return analyse_kinks(
        spec,
        problem.params,
        problem.batches[:1] if first_step_only else problem.batches,
        learning_rate,
        UNIT_ROUNDOFF[dtype],
        param_error,
        optimizer=optimizer,
    )


class Sizes(NamedTuple):
    """What a stage's rounding errors scale with, beyond the values themselves (float64,
    the largest over the sized parameters): per leaf, ``largest`` its greatest
    ``|value|``, ``excess`` how far the greatest of :func:`equiv.manual.magnitudes`
    exceeds it, and ``each`` per element how far that element's size exceeds it (None
    where no element does). Each excess is taken at one set of parameters before the
    largest over them, so a backend that drifted (large values) cannot cancel another's
    excess."""

    largest: dict[str, float]
    excess: dict[str, float]
    each: dict[str, np.ndarray | None]
    # Whether some element's size, or value, overflowed float64 at finite parameters
    # (it then allows nothing).
    overflowed: bool = False
    # Per element the size itself (:func:`equiv.manual.magnitudes`; inf where it
    # overflowed), for bounds that follow each element (Adam's update).
    sizes: dict[str, np.ndarray] | None = None


def _magnitudes(problem: Problem, trajectories: Iterable[Trajectory]) -> dict:
    """Per (stage, step): :class:`Sizes` at the parameters every backend starts the
    step from (each distinct set once). Each backend computes a step at its own
    parameters, and its errors scale with the sizes there: a chaotic run's trajectories
    part (a float32 tanh unit saturated to exactly ±1 at a backend's parameters, and so
    a gradient lost entirely, was not saturated at the reference's: found at learning
    rate 178). Nor is "close" parameters safe to skip: sizes are continuous in them but
    can be steep. A threshold of 2⁻¹⁶ of the leaf's largest value once took JAX's
    step-2 sizes at torch's parameters, 3.3e-6 away after optax's float32 bias
    correction, and a correct JAX run failed at 1.39 times the bound (a 1-1-1 tanh
    model, x = 500, Adam at lr 1; found in review). Sizing every start costs one
    float64 forward and backward pass per backend and step."""
    out = {}
    trajectories = list(trajectories)
    starts = [{k: to_numpy(v).astype(np.float64) for k, v in problem.params.items()}]
    for step, (x, y) in enumerate(problem.batches, start=1):
        x64, y64 = to_numpy(x).astype(np.float64), _numpy_batch(y)
        found = [_sizes_at(problem, params, x64, y64) for params in starts]
        out[("loss", step)] = _larger_sizes(*(f["loss"] for f in found))
        out[("grads", step)] = _larger_sizes(*(f["grads"] for f in found))
        starts = []
        for t in trajectories:
            if len(t.params) >= step:
                held = {k: np.asarray(v) for k, v in t.params[step - 1].items()}
                if not any(_same_params(held, other) for other in starts):
                    starts.append({k: v.astype(np.float64) for k, v in held.items()})
        if not starts:
            break
    return out


def _same_params(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """Whether every leaf of ``a`` equals ``b``'s (NaN never does), in value: a float32
    leaf equal to a float64 one is the same start."""
    return all(np.array_equal(value, b[name]) for name, value in a.items())


def _sizes_at(problem: Problem, params, x64, y64) -> dict[str, Sizes]:
    """``{"loss": Sizes, "grads": Sizes}`` at ``params`` (float64)."""
    spec = problem.spec.replace(dtype="float64")
    with np.errstate(all="ignore"):  # a diverged backend: the report says so
        loss, grads = manual.loss_and_grads(params, x64, y64, spec)
        size_loss, size_grads = manual.magnitudes(
            params, x64, y64, spec, problem.spec.unit_roundoff
        )
    # At finite parameters an inf or NaN size, or value, is float64 giving out: the
    # analysis cannot bound what it cannot compute (a float64 run whose cancelling
    # 1e123 sums put a unit on ELU's linear side in torch and the reference, whose
    # losses overflowed, and on its flat side in JAX, whose loss was 2.7e243: found by
    # a random sweep). At parameters that are themselves inf or NaN the run overflowed
    # (Comparison.overflowed_at), or a backend has a bug: neither is the analysis's.
    computable = all(np.all(np.isfinite(v)) for v in params.values())
    out = {}
    for stage, values, sizes in (
        ("loss", {"loss": loss}, {"loss": size_loss}),
        ("grads", grads, size_grads),
    ):
        largest, excess, each, overflowed, raw = {}, {}, {}, False, {}
        for name, value in values.items():
            top = float(np.max(np.abs(value), initial=0.0))
            size = np.asarray(sizes[name], np.float64)
            with np.errstate(invalid="ignore"):
                over = np.maximum(size - top, 0.0)  # NaN where either is inf or NaN
            finite = np.isfinite(over)
            overflowed = overflowed or (computable and not finite.all())
            over = np.where(finite, over, 0.0)  # overflowed: allows nothing
            largest[name], excess[name] = top, float(np.max(over, initial=0.0))
            each[name] = over if excess[name] > 0 else None
            with np.errstate(invalid="ignore"):
                raw[name] = np.where(np.isnan(size), np.inf, np.maximum(size, np.abs(value)))
        out[stage] = Sizes(largest, excess, each, overflowed, raw)
    return out


def _larger_sizes(*sizes: Sizes) -> Sizes:
    """Per leaf and element, the larger of several :class:`Sizes` (NaN ignored)."""
    first = sizes[0]

    def each(name: str) -> np.ndarray | None:
        parts = [part.each[name] for part in sizes if part.each[name] is not None]
        return functools.reduce(np.fmax, parts) if parts else None

    raw = None
    if all(part.sizes is not None for part in sizes):
        raw = {k: functools.reduce(np.fmax, [part.sizes[k] for part in sizes]) for k in first.sizes}
    return Sizes(
        {k: float(np.fmax.reduce([part.largest[k] for part in sizes])) for k in first.largest},
        {k: float(np.fmax.reduce([part.excess[k] for part in sizes])) for k in first.excess},
        {k: each(k) for k in first.each},
        any(part.overflowed for part in sizes),
        raw,
    )


def _elementwise_sizes(
    tol: Tolerance, sizes: Sizes, name: str, cap: float = float(np.finfo(np.float32).max)
) -> tuple[Tolerance, np.ndarray | None]:
    """The bound's per-element term for leaf ``name``: ``scaled·(|q_e|⁺ - max|q|)`` where
    an element's size exceeds the leaf's greatest value, none elsewhere (None: no such
    element, and big leaves keep the fast comparison), with the derivation noted. Per
    element, so that one poorly conditioned unit does not widen the rows that are not
    (a leaf-wide term did: ``with_magnitude``).

    The bound's scale ``S`` is also taken no smaller than the leaf's greatest float64
    value (``sizes.largest``, the ``max|q|`` of :mod:`equiv.tolerance`): the excesses
    are measured above it, so ``S`` plus an element's excess is at least that element's
    size only if ``S`` reaches it. ``S`` is read off the two compared leaves, and two
    float32 leaves can both fall far short of it: where the greatest float64 value is
    itself cancellation (2.8e-15 out of terms of 4e-8) that float32 returns as 0,
    ``S`` was the 5e-31 of a sigmoid tail's gradients whose own size is 2.6e-15
    (found by a random sweep: manual vs JAX off by 1.7 times the bound, while each
    was within its own of the float64 step, whose value set ``S``).
    """
    top = sizes.largest[name]
    if math.isfinite(top) and top > tol.floor:  # overflowed: allows nothing (Sizes)
        tol = dataclasses.replace(tol, floor=min(top, cap))
    if sizes.each[name] is None:
        return tol, None
    # Capped where it would overflow the dtype of the comparison (``cap``, its largest
    # value, allows all that inf would).
    extra = np.minimum(tol.scaled * sizes.each[name], cap)
    top = float(np.max(extra, initial=0.0))
    # "≤": a term per element, at most this (a scalar leaf: exactly this).
    note = f" + {'≤' if extra.ndim else ''}{top:.3g} (cancellation)"
    return dataclasses.replace(tol, derivation=tol.derivation + note), extra


def _update_sizes(
    problem: Problem,
    trajectories: Sequence[Trajectory],
    name: str,
    step: int,
    magnitude: dict | None = None,
    optimizer: OptimizerSpec | None = None,
) -> list[float]:
    """``max|p_t - p_{t-1}|`` of leaf ``name`` for ``t = 1..step``, the larger of two sides,
    plus (given the ``magnitude`` sizes) what the gradient's error moves the update by
    beyond that, in the gradient's terms' sizes ``|g_t|⁺`` against ``max|g_t|``:

    * SGD (any momentum, dampening, weight decay): the update is ``lr·g`` plus terms
      that do not depend on this gradient, so ``+ lr·(|g_t|⁺ - max|g_t|)`` (times
      ``1 + momentum`` with Nesterov), whatever the update's own size. A weight decay
      of 1e4 per step beside a gradient of 1e-32 whose float32 slope underflowed
      (``|g|⁺`` 1e-18) is not off by 1e4·1e14; a step whose float32 gradient was lost
      entirely (a sigmoid saturated to exactly 1, so the update is 0) is off by all of
      ``lr·|g|``, however small the update it took.
    * Adam and AdamW normalise the gradient: the update moves relatively, by
      ``|g_t|⁺ / max|g_t|`` times its size.

    Without an optimizer (a hand-built comparison without a learning rate) the whole
    update counts as the gradient's, relatively. Momentum and Adam carry gradient
    errors into later updates through :func:`equiv.tolerance.optimizer_bounds`.
    """
    sizes = []
    for t in range(1, step + 1):
        size = 0.0
        for traj in trajectories:
            before = (
                to_numpy(problem.params[name]) if t == 1 else traj.params[t - 2][name]
            ).astype(np.float64)
            with np.errstate(invalid="ignore"):  # inf - inf in a diverged run
                delta = np.abs(traj.params[t - 1][name].astype(np.float64) - before)
            finite = delta[np.isfinite(delta)]
            size = max(size, float(np.max(finite, initial=0.0)))
        if magnitude is None:
            sizes.append(size)
            continue
        largest, excess = magnitude[("grads", t)][:2]
        if optimizer is None or optimizer.name != "sgd":
            # Relative: the update scales with the gradient.
            extra = size * excess[name] / largest[name] if largest[name] > 0 else 0.0
        else:
            rate = optimizer.learning_rate
            extra = rate * (1.0 + optimizer.momentum if optimizer.nesterov else 1.0)
            extra *= excess[name]
        # A term that overflowed (a gradient at 1e-300 beside sizes of 1e10) allows
        # nothing: Adam's own bounds cap its update's difference at 2·lr·R_t.
        sizes.append(size + extra if math.isfinite(extra) else size)
    return sizes


def _propagated(
    problem: Problem,
    trajectories: dict[str, Trajectory],
    step: int,
    optimizer: OptimizerSpec,
    *,
    kinks: bool = False,
) -> dict:
    """Per backend, ``step`` done exactly (float64, hand-derived) from where that backend
    stood before it: ``{"loss", "grads", "params", "state"}`` flat trees. With
    ``kinks``, also ``"flips"`` (:func:`equiv.kinks.flip_envelope` at the backend's own
    parameters and state, by stage) and ``"kinks"`` (the units found there)."""
    spec = problem.spec.replace(dtype="float64")
    x, y = problem.batches[step - 1]
    x64, y64 = to_numpy(x).astype(np.float64), _numpy_batch(y)
    out = {}
    for name, trajectory in trajectories.items():
        params = {k: v.astype(np.float64) for k, v in trajectory.params[step - 2].items()}
        with np.errstate(all="ignore"):  # a diverged backend's inf/NaN: the report says so
            loss, grads = manual.loss_and_grads(params, x64, y64, spec)
        out[name] = {
            "loss": {"loss": np.asarray(loss)},
            "grads": grads,
            "params": {},
            "state": {},
            "flips": {},
            "kinks": [],
        }
        if not _state_known(optimizer, trajectory, [step - 1]):
            # Its optimizer state is unknown: inventing one (zeros) would turn the step
            # into another optimizer's and could allow a real difference. Loss and
            # gradients, functions of the parameters alone, are still propagated.
            continue
        state = (
            {
                key: {k: v.astype(np.float64) for k, v in tree.items()}
                for key, tree in trajectory.states[step - 2].items()
            }
            if trajectory.has_state(step - 1)
            else manual_init(optimizer, params)
        )
        finite = all(np.all(np.isfinite(v)) for v in params.values()) and all(
            np.all(np.isfinite(v)) for tree in state.values() for v in tree.values()
        )
        if kinks and finite and name != REFERENCE and kinked(spec):
            out[name]["kinks"], out[name]["flips"], _ = flip_envelope(
                spec,
                params,
                x64,
                y64,
                UNIT_ROUNDOFF[trajectory.dtype],
                step,
                optimizer,
                state,
                backend=name,
            )
        with np.errstate(all="ignore"):
            new_params, new_state = manual_update(optimizer, params, grads, state, step)
        out[name]["params"] = new_params
        if trajectory.has_state(step):
            out[name]["state"] = {
                f"{key}.{k}": v for key, tree in new_state.items() for k, v in tree.items()
            }
    return out


def _state_known(optimizer: OptimizerSpec | None, trajectory: Trajectory, steps) -> bool:
    """Whether ``trajectory``'s optimizer state after each of ``steps`` is known:
    recorded, or there is none to keep (plain SGD, SGD with weight decay only)."""
    if optimizer is None or not optimizer.state_names:
        return True
    return all(trajectory.has_state(step) for step in steps)


def _check_backends(backends: Sequence[str]) -> tuple[str, ...]:
    backends = tuple(backends)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends or len(set(backends)) != len(backends):
        raise value_error(
            f"backends must be distinct names from {', '.join(BACKENDS)}; got {list(backends)}"
        )
    return backends


def _copy_to(params: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(device, copy=True) for k, v in params.items()}
