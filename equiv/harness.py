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
from typing import Any, Callable, Sequence

import jax
import numpy as np
import torch

from equiv import jax_mlp, manual
from equiv._messages import value_error
from equiv.compare import LeafDiff, Report, compare_trees, to_numpy
from equiv.convert import jax_to_torch, torch_to_jax
from equiv.devices import resolve_device
from equiv.precision import comparison_scope
from equiv.problem import Problem, make_problem
from equiv.spec import MLPSpec
from equiv.tolerance import derived_tolerance, user_tolerance
from equiv.torch_mlp import TorchMLP, load_params, torch_loss_fn, torch_sgd_step

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
    model = load_params(TorchMLP(problem.spec, device=torch_device), _copy_to(problem.params, torch_device))
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    loss_module = torch_loss_fn(problem.spec)
    out = Trajectory("torch", problem.spec.dtype)
    for x, y in problem.batches:
        loss, grads = torch_sgd_step(model, optimizer, loss_module, x.to(torch_device), y.to(torch_device))
        out.record(loss, grads, model.state_dict())
    return out


def run_manual(problem: Problem, learning_rate: float, device: str = "cpu") -> Trajectory:
    """The hand-derived pass and update on torch tensors."""
    torch_device, _ = resolve_device(device)
    params = _copy_to(problem.params, torch_device)
    out = Trajectory("manual", problem.spec.dtype)
    for x, y in problem.batches:
        loss, grads = manual.loss_and_grads(params, x.to(torch_device), y.to(torch_device), problem.spec)
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
        loss, grads = manual.loss_and_grads(params, x.double().numpy(), y.double().numpy(), problem.spec)
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
        """Raise ``AssertionError`` listing every failing leaf."""
        self.report.assert_agree()

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
            "loss": {b: [float(l) for l in t.losses] for b, t in self.trajectories.items()},
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
    report = compare_trajectories(problem, trajectories, rtol=rtol, atol=atol)
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
    rtol: float | None = None,
    atol: float | None = None,
) -> Report:
    """Compare any trajectories of one problem: every pair of backends, and each
    backend against :data:`REFERENCE` when that trajectory is present.

    This is how a trajectory from your own implementation (or a deliberately
    broken one, in tests) joins a comparison: build a :class:`Trajectory` with
    :meth:`Trajectory.record` and pass it beside the others.
    """
    fixed = user_tolerance(rtol, atol)
    backends = [name for name in trajectories if name != REFERENCE]
    pairs = list(itertools.combinations(backends, 2))
    if REFERENCE in trajectories:
        pairs += [(name, REFERENCE) for name in backends]
    leaves: list[LeafDiff] = []
    for step in range(1, problem.steps + 1):
        for stage in ("loss", "grads", "params"):
            for a, b in pairs:
                ta, tb = trajectories[a], trajectories[b]
                tol = fixed or derived_tolerance(
                    problem.spec, problem.batch_size, stage, step, (ta.dtype, tb.dtype)
                )
                leaves += compare_trees(
                    ta.stage(stage, step), tb.stage(stage, step), tol,
                    stage=stage, step=step, actual_name=a, expected_name=b,
                )
    return Report(leaves)


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
