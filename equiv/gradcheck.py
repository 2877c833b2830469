r"""A float64 gradient check by random projections, cheap for wide layers.

Like ``jax.test_util.check_vjp``: instead of one finite difference per parameter
(a million forward passes for a 1000×1000 layer), compare the inner product of the
gradient with a random direction ``v`` against a central difference of the loss
along ``v``::

    ⟨g, v⟩   vs   D(h) = (L(p + h·v) - L(p - h·v)) / 2h

Each leaf gets its own directions (``v`` zero outside the leaf), so a failure names
the leaf whose gradient is wrong; ``v`` is Gaussian, scaled by the leaf's RMS, so
``h`` is a relative step.

The loss is the spec's own (:data:`equiv.losses.LOSSES`), so the check covers every
activation and loss the backends support.

Derived tolerance. Along a direction where no kinked unit changes side (and no
output crosses the threshold of ``huber`` or ``smooth_l1``), ``L(p + t·v)`` is smooth
in ``t`` (a polynomial for ReLU and MSE), so ``D(h) = ⟨g, v⟩ + a·h² + O(h⁴)``: the
truncation error.
The computed loss carries a rounding error at most ``r`` (below), so a computed
``D(h)`` is off by at most ``r/h`` more. From ``D(2h) - D(h) = 3a·h² ± (r/h + r/2h)``::

    |⟨g, v⟩ - D(h)| ≤ |a|·h² + r/h ≤ |D(2h) - D(h)|/3 + 1.5·r/h

plus the rounding of the inner product itself, ``c·u·√n·Σ|g_j v_j|``. ``r`` comes
from the elementwise bound on the outputs of :func:`equiv.kinks.preactivation_bounds`
(``ε_L``, float64): ``r = Σ|∂L/∂out|·ε_L + c₂·Σε_L² + c·u·√N·M`` over the ``N``
output elements, ``M`` the loss's magnitude (for MSE ``r = mean(2·|out - y|·ε_L) + ...``).
``h = u^{1/3}`` balances the two terms. A direction along which some pre-activation
changes sign within ``2h``, or an output crosses the loss's threshold (a kink), breaks
the expansion and is replaced by a fresh one (counted in ``skipped``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from equiv import manual
from equiv._messages import message, value_error
from equiv.kinks import preactivation_bounds
from equiv.losses import LOSSES
from equiv.spec import UNIT_ROUNDOFF, MLPSpec
from equiv.tolerance import SAFETY
from equiv.variants import matching_variant

U64 = UNIT_ROUNDOFF["float64"]
#: Relative step along each direction: u^(1/3) balances h² truncation and u/h rounding.
STEP = U64 ** (1.0 / 3.0)
#: Fresh directions tried per requested direction before giving up on kinks.
MAX_TRIES = 8

GradFn = Callable[[Mapping[str, np.ndarray], np.ndarray, np.ndarray], tuple[Any, Mapping[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Projection:
    """One direction: the projected gradient, the finite difference and the bound."""

    name: str
    direction: int
    projected: float
    finite_difference: float
    error: float
    bound: float

    @property
    def ratio(self) -> float:
        return self.error / self.bound if self.bound > 0 else (math.inf if self.error else 0.0)

    @property
    def passed(self) -> bool:
        return self.error <= self.bound

    def describe(self) -> str:
        if self.name == "loss":
            return (
                f"  loss: grad_fn returned {self.projected:.12g}, the spec's float64 loss is "
                f"{self.finite_difference:.12g}, difference {self.error:.3g} (up to "
                f"{self.bound:.3g} allowed, ratio {self.ratio:.3g})"
            )
        return (
            f"  {self.name}, direction {self.direction}: <grad, v> = {self.projected:.12g}, "
            f"finite difference {self.finite_difference:.12g}, difference {self.error:.3g} "
            f"(up to {self.bound:.3g} allowed, ratio {self.ratio:.3g})"
        )


@dataclasses.dataclass
class GradCheck:
    """Every projection of a :func:`check_gradients` run."""

    projections: list[Projection]
    skipped: int = 0
    #: The known mistake the gradients are, when they fail (:mod:`equiv.variants`).
    cause: str | None = None
    #: The loss ``grad_fn`` returned against the spec's float64 loss (named "loss").
    loss: Projection | None = None

    @property
    def agree(self) -> bool:
        return all(p.passed for p in self._checks())

    def _checks(self) -> list[Projection]:
        return ([self.loss] if self.loss is not None else []) + self.projections

    @property
    def worst_ratio(self) -> float:
        return max((p.ratio for p in self.projections), default=0.0)

    def failing_leaves(self) -> list[str]:
        """The leaves whose check fails ("loss" for the returned loss), sorted."""
        return sorted({p.name for p in self._checks() if not p.passed})

    def assert_agree(self) -> None:
        """Raise ``AssertionError`` naming every leaf whose gradient fails the check."""
        if self.agree:
            return
        bad = [p for p in self.projections if not p.passed]
        failed_loss = self.loss is not None and not self.loss.passed
        head = message(
            f"gradient check failed for {', '.join(self.failing_leaves())}: "
            f"{len(bad)} of {len(self.projections)} projections disagree with finite "
            "differences in float64"
            + ("; the returned loss is not the spec's" if failed_loss else "")
        )
        bad = [p for p in self._checks() if not p.passed]  # the loss first
        cause = [f"  likely cause: {self.cause}"] if self.cause else []
        raise AssertionError("\n".join([head] + [p.describe() for p in bad] + cause))

    def to_dict(self) -> dict[str, Any]:
        return {
            "agree": self.agree,
            "worst_ratio": self.worst_ratio,
            "skipped": self.skipped,
            "cause": self.cause,
            "loss": None
            if self.loss is None
            else {
                **dataclasses.asdict(self.loss),
                "ratio": self.loss.ratio,
                "passed": self.loss.passed,
            },
            "projections": [
                {**dataclasses.asdict(p), "ratio": p.ratio, "passed": p.passed}
                for p in self.projections
            ],
        }


def check_gradients(
    params: Mapping[str, Any],
    x: Any,
    y: Any,
    spec: MLPSpec,
    grad_fn: GradFn | None = None,
    *,
    directions: int = 2,
    seed: int = 0,
) -> GradCheck:
    """Check ``grad_fn``'s gradients against float64 central differences of the
    hand-derived loss along random directions, leaf by leaf.

    Args:
      params: parameters under torch names (converted to float64 NumPy).
      x, y: one batch.
      spec: the MLP (its forward defines the loss being differentiated).
      grad_fn: ``(params, x, y) -> (loss, grads)`` on float64 NumPy arrays; by
        default the hand-derived backward :func:`equiv.manual.loss_and_grads`. When
        its gradients fail, the known mistake they are, if any, is named
        (:attr:`GradCheck.cause`, :func:`equiv.variants.matching_variant`).
      directions: random directions per leaf.
      seed: for the directions.

    Example:
      >>> import torch
      >>> from equiv.problem import make_problem
      >>> problem = make_problem(MLPSpec((4, 3, 2)), batch_size=4, seed=0)
      >>> (x, y), = problem.batches
      >>> check_gradients(problem.params, x, y, MLPSpec((4, 3, 2))).agree
      True
    """
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise value_error(f"directions must be an int of at least 1, got {directions!r}")
    spec = spec.replace(dtype="float64")
    params = {k: _f64(v) for k, v in params.items()}
    # Integer class labels stay integers; everything else is computed in float64.
    x = _f64(x)
    y = np.asarray(_to_numpy(y)) if LOSSES[spec.loss].targets == "labels" else _f64(y)
    grad_fn = grad_fn or (lambda p, xb, yb: manual.loss_and_grads(p, xb, yb, spec))
    loss, grads = unpack_grad_fn_result(grad_fn(params, x, y), params)
    grads = {k: _f64(v) for k, v in grads.items()}
    rng = np.random.default_rng(seed)
    base_sides = _sides(params, x, y, spec)
    projections, skipped = [], 0
    for name in spec.param_names():
        leaf = params[name]
        scale = float(np.sqrt(np.mean(leaf * leaf))) or 1.0
        for d in range(directions):
            for _ in range(MAX_TRIES):
                v = rng.standard_normal(leaf.shape) * scale
                if _no_kink(params, name, v, x, y, spec, base_sides):
                    break
                skipped += 1
            else:
                raise value_error(
                    f"every direction for {name} crosses a kink (of an activation, or of the "
                    f"{spec.loss} loss) within the finite difference step; perturb the "
                    "parameters or the batch"
                )
            projections.append(_project(params, grads, name, d, v, x, y, spec))
    # The returned loss against the spec's: both float64, each within r of the exact one.
    exact = _loss(params, x, y, spec)
    returned = float(_f64(loss).reshape(()))
    loss_check = Projection(
        "loss", 0, returned, exact, abs(returned - exact), 2 * _loss_rounding(params, x, y, spec)
    )
    cause = None
    if not (loss_check.passed and all(p.passed for p in projections)):
        # A hand-written backward's gradient check: its mistakes first.
        theirs = {"loss": _f64(loss), **grads}
        cause = matching_variant(spec, params, x, y, theirs, backward_first=True, unit_roundoff=U64)
    return GradCheck(projections, skipped, cause, loss_check)


def unpack_grad_fn_result(result: Any, params: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(loss, grads)`` from what a user's ``grad_fn`` returned, checked: a pair, the
    gradients keyed as ``params`` and shaped like them, the loss one number.

    >>> import numpy as np
    >>> params = {"fc1.weight": np.zeros((3, 2)), "fc1.bias": np.zeros(3)}
    >>> flipped = {"fc1.weight": np.zeros((2, 3)), "fc1.bias": np.zeros(3)}
    >>> unpack_grad_fn_result((0.5, flipped), params)
    Traceback (most recent call last):
    ...
    ValueError: [equiv] grad_fn's gradient for fc1.weight has shape (2, 3), but the ...
    """
    if isinstance(result, Mapping) or not (isinstance(result, tuple | list) and len(result) == 2):
        got = type(result).__name__ + (
            f" of length {len(result)}" if isinstance(result, tuple | list) else ""
        )
        raise value_error(
            f"grad_fn must return a pair (loss, grads), got a {got}; return the loss too: "
            "`return loss, grads`"
        )
    loss, grads = result
    if not isinstance(grads, Mapping) or set(grads) != set(params):
        given = sorted(grads) if isinstance(grads, Mapping) else type(grads).__name__
        raise value_error(
            f"grad_fn must return (loss, grads) with grads keyed {sorted(params)}, got {given}"
        )
    for name, param in params.items():
        want, got = tuple(np.shape(param)), tuple(np.shape(grads[name]))
        if got != want:
            transposed = len(want) == 2 and got == want[::-1]
            raise value_error(
                f"grad_fn's gradient for {name} has shape {got}, but the parameter's is {want}"
                + (
                    ": the transpose. A weight's gradient is (out, in) like the weight: "
                    "dz.T @ h, not h.T @ dz"
                    if transposed
                    else ": each gradient has its parameter's shape (a bias's is (out,): "
                    "sum dz over the batch axis)"
                )
            )
    if np.size(_to_numpy(loss)) != 1:
        raise value_error(
            f"grad_fn must return the loss as one number, got shape {tuple(np.shape(loss))}"
        )
    return loss, dict(grads)


def _project(params, grads, name, d, v, x, y, spec) -> Projection:
    def loss_at(t: float) -> float:
        moved = dict(params)
        moved[name] = params[name] + t * v
        return _loss(moved, x, y, spec)

    h = STEP
    fd_h = (loss_at(h) - loss_at(-h)) / (2 * h)
    fd_2h = (loss_at(2 * h) - loss_at(-2 * h)) / (4 * h)
    products = grads[name] * v
    projected = float(np.sum(products))
    r = _loss_rounding(params, x, y, spec)
    bound = (
        abs(fd_2h - fd_h) / 3.0
        + 1.5 * r / h
        + SAFETY * U64 * math.sqrt(products.size) * float(np.sum(np.abs(products)))
    )
    return Projection(name, d, projected, fd_h, abs(projected - fd_h), bound)


def _loss(params, x, y, spec) -> float:
    out, _ = manual.forward(params, x, spec)
    loss, _ = LOSSES[spec.loss].value_and_grad(out, y, spec)
    return float(loss)


def _loss_rounding(params, x, y, spec) -> float:
    """Bound ``r`` on the rounding error of the computed float64 loss.

    The outputs are off by at most ``ε`` (elementwise): the loss moves by at most
    ``Σ|∂L/∂o|·ε`` plus a second-order term, ``c·Σε²`` with ``c`` at least every loss's
    second derivative per element (2 for ``mse_sum``; the means divide by ``n``;
    ``1/β`` for ``smooth_l1``). The loss's own arithmetic adds ``c·u·√N`` times its
    magnitude (:attr:`equiv.losses.Loss.magnitude`; for MSE ``mean(d²)`` itself: the
    subtraction ``d = o - y`` is one rounding relative to ``d``).
    """
    zs, bounds = preactivation_bounds(params, x, spec, U64)
    out, eps = zs[-1], bounds[-1]
    loss_fn = LOSSES[spec.loss]
    loss, grad_out = loss_fn.value_and_grad(out, y, spec)
    if spec.loss in ("mse", "mse_sum"):
        magnitude = abs(float(loss))
    else:
        magnitude = float(loss_fn.magnitude(out, y, spec)[0])
    curvature = max(2.0, 1.0 / spec.smooth_l1_beta if spec.loss == "smooth_l1" else 0.0)
    return (
        float(np.sum(np.abs(grad_out) * eps) + curvature * np.sum(eps * eps))
        + SAFETY * U64 * math.sqrt(out.size) * magnitude
    )


def _sides(params, x, y, spec) -> list[np.ndarray]:
    """Which side of its kink every kinked element is on, from one forward pass: each
    hidden unit (``z > 0``), and for ``huber`` and ``smooth_l1`` each output
    (``|out - y|`` within the loss's threshold)."""
    out, zs = manual.forward(params, x, spec)
    sides = [z > 0 for z in zs[:-1]]
    threshold = {"huber": spec.huber_delta, "smooth_l1": spec.smooth_l1_beta}.get(spec.loss)
    if threshold is not None:
        sides.append(np.abs(out - y) <= threshold)
    return sides


def _no_kink(params, name, v, x, y, spec, base_sides) -> bool:
    for t in (-2 * STEP, -STEP, STEP, 2 * STEP):
        moved = dict(params)
        moved[name] = params[name] + t * v
        sides = _sides(moved, x, y, spec)
        if any(not np.array_equal(a, b) for a, b in zip(sides, base_sides, strict=True)):
            return False
    return True


def _to_numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def _f64(x: Any) -> np.ndarray:
    return np.array(_to_numpy(x), dtype=np.float64)
