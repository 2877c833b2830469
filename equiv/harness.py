"""Run the same training steps in every backend and compare the results.

Backends:

* ``"torch"``: :class:`~equiv.torch_mlp.TorchMLP`, autograd and ``torch.optim.SGD``.
* ``"manual"``: the hand-derived pass of :mod:`equiv.manual` on torch tensors.
* ``"jax"``: :mod:`equiv.jax_mlp`, ``jax.value_and_grad`` and ``optax.sgd``.
* ``"reference"``: the hand-derived pass on NumPy in float64, the arbiter. In a
  float32 run every backend is also held against it, so a report says which
  backend is off, not only that two disagree.

Every backend starts from its own copy of the initial parameters: nothing is
shared between frameworks, since a torch in-place update would change a JAX
array sharing its buffer.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import torch

from equiv import jax_mlp, manual
from equiv._messages import value_error
from equiv.compare import LeafDiff, Report, compare_leaf, compare_trees, to_numpy
from equiv.convert import jax_to_torch, torch_to_jax
from equiv.devices import resolve_device
from equiv.kinks import KinkAnalysis, analyse_kinks
from equiv.precision import comparison_scope
from equiv.problem import Problem, make_problem
from equiv.spec import UNIT_ROUNDOFF, MLPSpec
from equiv.tolerance import (
    derived_tolerance,
    params_tolerance,
    user_tolerance,
    with_magnitude,
)
from equiv.torch_mlp import torch_loss_fn, torch_mlp_with_params, torch_sgd_step

BACKENDS = ("torch", "manual", "jax")
REFERENCE = "reference"


@dataclasses.dataclass
class Trajectory:
    """What one backend computed: per step the loss, the gradients (before the
    update) and the parameters after it, as NumPy arrays under torch's names."""

    backend: str
    dtype: str
    losses: list[np.ndarray] = dataclasses.field(default_factory=list)
    grads: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    params: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)

    def record(self, loss: Any, grads: dict[str, Any], params: dict[str, Any]) -> None:
        self.losses.append(np.array(to_numpy(loss)))
        self.grads.append({k: np.array(to_numpy(v)) for k, v in grads.items()})
        self.params.append({k: np.array(to_numpy(v)) for k, v in params.items()})

    def stage(self, stage: str, step: int) -> dict[str, np.ndarray]:
        """The flat tree of ``stage`` at 1-based ``step``."""
        if stage == "loss":
            return {"loss": self.losses[step - 1]}
        return (self.grads if stage == "grads" else self.params)[step - 1]


def run_torch(problem: Problem, learning_rate: float, device: str = "cpu") -> Trajectory:
    """``TorchMLP`` + autograd + ``torch.optim.SGD``."""
    torch_device, _ = resolve_device(device)
    model = torch_mlp_with_params(problem.spec, problem.params, torch_device)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    loss_module = torch_loss_fn(problem.spec)
    out = Trajectory("torch", problem.spec.dtype)
    for x, y in problem.batches:
        x, y = x.to(torch_device), y.to(torch_device)
        loss, grads = torch_sgd_step(model, optimizer, loss_module, x, y)
        out.record(loss, grads, model.state_dict())
    return out


def run_manual(problem: Problem, learning_rate: float, device: str = "cpu") -> Trajectory:
    """The hand-derived pass and update on torch tensors."""
    torch_device, _ = resolve_device(device)
    params = _copy_to(problem.params, torch_device)
    out = Trajectory("manual", problem.spec.dtype)
    for x, y in problem.batches:
        x, y = x.to(torch_device), y.to(torch_device)
        loss, grads = manual.loss_and_grads(params, x, y, problem.spec)
        params = manual.sgd_update(params, grads, learning_rate)
        out.record(loss, grads, params)
    return out


def run_jax(problem: Problem, learning_rate: float, device: str = "cpu") -> Trajectory:
    """``jax.value_and_grad`` of :func:`equiv.jax_mlp.loss_fn` and ``optax.sgd``, jitted."""
    _, jax_device = resolve_device(device)
    step, optimizer = jax_mlp.make_sgd_step(problem.spec, float(learning_rate))
    params = torch_to_jax(problem.params, layout="flax", spec=problem.spec, device=jax_device)
    opt_state = optimizer.init(params)
    out = Trajectory("jax", problem.spec.dtype)
    for x, y in problem.batches:
        x, y = (jax.device_put(t.numpy(), jax_device) for t in (x, y))
        loss, grads, params, opt_state = step(params, opt_state, x, y)
        out.record(
            loss,
            jax_to_torch(grads, layout="flax", spec=problem.spec),
            jax_to_torch(params, layout="flax", spec=problem.spec),
        )
    return out


def run_reference(problem: Problem, learning_rate: float, device: str = "cpu") -> Trajectory:
    """The hand-derived pass on NumPy in float64: the arbiter (always on the CPU)."""
    params = {k: v.double().numpy().copy() for k, v in problem.params.items()}
    out = Trajectory(REFERENCE, "float64")
    for x, y in problem.batches:
        x, y = x.double().numpy(), y.double().numpy()
        loss, grads = manual.loss_and_grads(params, x, y, problem.spec)
        params = manual.sgd_update(params, grads, learning_rate)
        out.record(loss, grads, params)
    return out


RUNNERS: dict[str, Callable[[Problem, float, str], Trajectory]] = {
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

    @property
    def agree(self) -> bool:
        return self.report.agree

    def assert_agree(self) -> None:
        """Raise ``AssertionError`` listing every failing leaf, then the arbiter's verdict."""
        if not self.agree:
            verdict = self.arbiter_verdict()
            text = self.report.failure_text()
            raise AssertionError(text + ("\n" + "\n".join(verdict) if verdict else ""))

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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready report: verdict, losses and final parameters per backend, diffs."""
        report = self.report.to_dict()
        return {
            "agree": report["agree"],
            "worst_ratio": report["worst_ratio"],
            "config": {
                "sizes": list(self.problem.spec.sizes),
                "activation": self.problem.spec.activation,
                "loss_fn": self.problem.spec.loss,
                "bias": self.problem.spec.bias,
                "dtype": self.problem.spec.dtype,
                "batch_size": self.problem.batch_size,
                "steps": self.problem.steps,
                "learning_rate": self.learning_rate,
            },
            "settings": report["settings"],
            "loss": {b: [float(v) for v in t.losses] for b, t in self.trajectories.items()},
            "params": {
                b: {k: v.tolist() for k, v in t.params[-1].items()}
                for b, t in self.trajectories.items()
            },
            "diffs": report["leaves"],
        }


def compare_backends(
    spec: MLPSpec | None = None,
    *,
    batch_size: int = 2,
    seed: int = 0,
    learning_rate: float = 0.1,
    steps: int = 1,
    device: str = "cpu",
    backends: Sequence[str] = BACKENDS,
    reference: bool = True,
    precision: str = "exact",
    rtol: float | None = None,
    atol: float | None = None,
    problem: Problem | None = None,
) -> Comparison:
    """Run ``steps`` SGD steps in every backend from one problem and compare them.

    Every pair of backends is compared at every stage (loss, gradients, parameters
    after each step), and with ``reference=True`` every backend is also compared
    with the float64 hand-derived reference. Tolerances are derived per leaf
    (:mod:`equiv.tolerance`) unless ``rtol`` and ``atol`` are both given.

    Args:
      spec: the MLP; default the notebook's 4-3-2 ReLU MLP in float32.
      batch_size, seed, steps: the problem, drawn as :func:`equiv.problem.make_problem`
        draws it; ignored when ``problem`` is given.
      learning_rate: SGD's learning rate.
      device: ``"cpu"`` or ``"cuda[:N]"`` for torch and JAX alike.
      backends: any of ``"torch"``, ``"manual"``, ``"jax"`` (at least one).
      precision: ``"exact"`` pins IEEE float32 matmuls (no TF32) in a scope;
        ``"native"`` keeps your settings.

    Example:
      >>> comparison = compare_backends()
      >>> comparison.agree
      True
      >>> round(float(comparison.trajectories["torch"].losses[0]), 4)
      2.5145
    """
    spec = spec or (problem.spec if problem else MLPSpec())
    backends = _check_backends(backends)
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise value_error(f"learning_rate must be a positive number, got {learning_rate!r}")
    user_tolerance(rtol, atol)  # fail early on a half-given tolerance
    resolve_device(device)  # fail early, before any work, on a missing device
    if problem is None:
        problem = make_problem(spec, batch_size=batch_size, seed=seed, steps=steps)
    names = list(backends) + ([REFERENCE] if reference else [])
    with comparison_scope(spec.dtype, precision) as settings:
        trajectories = {name: RUNNERS[name](problem, learning_rate, device) for name in names}
    settings = {"dtype": spec.dtype, "device": device, **settings}
    report = compare_trajectories(
        problem, trajectories, learning_rate=learning_rate, rtol=rtol, atol=atol
    )
    report.settings.update(settings)
    return Comparison(problem, float(learning_rate), trajectories, report)


def assert_backends_agree(spec: MLPSpec | None = None, **kwargs) -> Comparison:
    """:func:`compare_backends`, raising ``AssertionError`` with the full report
    when any leaf disagrees; returns the comparison when all agree."""
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
) -> Report:
    """Compare any trajectories of one problem: every pair of backends, and each
    backend against :data:`REFERENCE` when that trajectory is present.

    This is how a trajectory from your own implementation (or a deliberately
    broken one, in tests) joins a comparison: build a :class:`Trajectory` with
    :meth:`Trajectory.record` and pass it beside the others.

    Kinks (:mod:`equiv.kinks`): with ``kinks=True``, a ReLU MLP, the float64
    reference present and ``learning_rate`` given, the units whose pre-activation
    lies within rounding distance of 0 are found, and a leaf they move may differ
    by the slack of the other side of the kink on top of its bound (twice that
    between two backends). The report's settings count them
    (``settings["kinks"]``); a difference elsewhere still fails.

    Example:
      >>> problem = make_problem(MLPSpec((4, 3, 2)), batch_size=2, seed=0)
      >>> runs = {name: RUNNERS[name](problem, 0.1) for name in ("torch", REFERENCE)}
      >>> compare_trajectories(problem, runs, learning_rate=0.1).agree
      True
    """
    fixed = user_tolerance(rtol, atol)
    backends = [name for name in trajectories if name != REFERENCE]
    pairs = list(itertools.combinations(backends, 2))
    if REFERENCE in trajectories:
        pairs += [(name, REFERENCE) for name in backends]
    analysis = None
    if kinks and REFERENCE in trajectories and learning_rate is not None and backends:
        analysis = analyse_trajectory_kinks(
            problem, learning_rate, [trajectories[b].dtype for b in backends],
            trajectories[REFERENCE],
        )
    magnitude = _magnitudes(problem, trajectories[REFERENCE if REFERENCE in trajectories
                                                   else backends[-1]])
    leaves: list[LeafDiff] = []
    for step in range(1, problem.steps + 1):
        for stage in ("loss", "grads", "params"):
            for a, b in pairs:
                ta, tb = trajectories[a], trajectories[b]
                tol = fixed or derived_tolerance(
                    problem.spec, problem.batch_size, stage, step, (ta.dtype, tb.dtype)
                )
                if fixed is None and stage in ("loss", "grads"):
                    mags, largest = magnitude[(stage, step)]
                    tol = {name: with_magnitude(tol, mags[name], largest[name]) for name in mags}
                elif fixed is None:
                    tol = {
                        name: params_tolerance(
                            tol, _update_sizes(problem, (ta, tb), name, step, magnitude)
                        )
                        for name in problem.spec.param_names()
                    }
                diffs = compare_trees(
                    ta.stage(stage, step), tb.stage(stage, step), tol,
                    stage=stage, step=step, actual_name=a, expected_name=b,
                )
                if analysis is not None:
                    # Two backends may sit on different sides of a kink: twice the envelope.
                    factor = 1.0 if REFERENCE in (a, b) else 2.0
                    diffs = [_with_slack(d, ta, tb, analysis, factor) for d in diffs]
                leaves += diffs
    report = Report(leaves)
    if analysis is not None:
        report.settings["kinks"] = analysis.count
        report.settings["kink_units"] = [k.describe() for k in analysis.kinks]
    return report


def analyse_trajectory_kinks(
    problem: Problem,
    learning_rate: float,
    dtypes: Sequence[str],
    reference: Trajectory | None = None,
) -> KinkAnalysis:
    """:func:`equiv.kinks.analyse_kinks` for a problem compared in ``dtypes``.

    Before step ``s`` a backend's parameters may already differ from the reference
    by the parameter bound after step ``s - 1`` (:func:`derived_tolerance` against
    float64, times the leaf's magnitude); the bound on the pre-activations takes
    that into account.
    """
    dtype = max(dtypes, key=lambda d: UNIT_ROUNDOFF[d])
    spec = problem.spec

    def param_error(step: int) -> dict[str, float]:
        if step == 1:
            return {}
        tol = derived_tolerance(spec, problem.batch_size, "params", step - 1, (dtype, "float64"))
        params = reference_params[step - 2]
        return {
            name: tol.scaled * float(np.max(np.abs(v), initial=0.0)) for name, v in params.items()
        }

    if spec.activation != "relu":
        return KinkAnalysis(kinks=[], slack={})
    if reference is None:
        reference = run_reference(problem, learning_rate)
    reference_params = reference.params
    return analyse_kinks(
        spec, problem.params, problem.batches, learning_rate, UNIT_ROUNDOFF[dtype], param_error
    )


def _magnitudes(problem: Problem, trajectory: Trajectory) -> dict:
    """Per (stage, step): ``{leaf: max of manual.magnitudes}``, ``{leaf: max|value|}``,
    in float64 at the parameters ``trajectory`` starts each step from."""
    out = {}
    spec = problem.spec.replace(dtype="float64")
    params = {k: to_numpy(v).astype(np.float64) for k, v in problem.params.items()}
    for step, (x, y) in enumerate(problem.batches, start=1):
        x64, y64 = to_numpy(x).astype(np.float64), to_numpy(y).astype(np.float64)
        loss, grads = manual.magnitudes(params, x64, y64, spec)
        ref_loss, ref_grads = manual.loss_and_grads(params, x64, y64, spec)
        out[("loss", step)] = ({"loss": float(loss)}, {"loss": float(abs(ref_loss))})
        out[("grads", step)] = (
            {k: float(np.max(v, initial=0.0)) for k, v in grads.items()},
            {k: float(np.max(np.abs(v), initial=0.0)) for k, v in ref_grads.items()},
        )
        params = {k: v.astype(np.float64) for k, v in trajectory.params[step - 1].items()}
    return out


def _update_sizes(
    problem: Problem, trajectories: Sequence[Trajectory], name: str, step: int, magnitude: dict
) -> list[float]:
    """``max|p_t - p_{t-1}|`` of leaf ``name`` for ``t = 1..step``, the larger of two sides,
    times how much larger the magnitude of its gradient's terms is than the gradient."""
    sizes = []
    for t in range(1, step + 1):
        size = 0.0
        for traj in trajectories:
            before = (
                to_numpy(problem.params[name]) if t == 1 else traj.params[t - 2][name]
            ).astype(np.float64)
            delta = np.abs(traj.params[t - 1][name].astype(np.float64) - before)
            finite = delta[np.isfinite(delta)]
            size = max(size, float(np.max(finite, initial=0.0)))
        mags, largest = magnitude[("grads", t)]
        sizes.append(size * max(1.0, mags[name] / largest[name] if largest[name] > 0 else 1.0))
    return sizes


def _with_slack(
    diff: LeafDiff,
    ta: Trajectory,
    tb: Trajectory,
    analysis: KinkAnalysis,
    factor: float,
) -> LeafDiff:
    slack = analysis.slack_for(diff.stage, diff.step, diff.name)
    if slack is None:
        return diff
    tol = diff.tolerance
    return compare_leaf(
        ta.stage(diff.stage, diff.step)[diff.name],
        tb.stage(diff.stage, diff.step)[diff.name],
        tol,
        stage=diff.stage,
        step=diff.step,
        name=diff.name,
        actual_name=diff.actual,
        expected_name=diff.expected,
        slack=factor * slack,
    )


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
