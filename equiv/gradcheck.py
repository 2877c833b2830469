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

Known causes. Where the check fails, the failing leaves are held to the spec's float64
hand-derived gradient (:func:`equiv.manual.loss_and_grads`), trusted only where it agrees
with the finite differences along every direction, within their bound: the catalogue of
:func:`equiv.diagnose.diagnose_trees` then names a leaf that is a constant factor ``c`` of
it (2, ½, a flipped sign, the batch size, a zero gradient, ...). As the reference is
``D(h)`` along each direction, ``⟨g, v⟩ / D(h)`` is ``c`` along each too: the hint gives
that measured factor, over how many directions, and its spread. Otherwise the known
mistakes of a hand-written backward are tried (:func:`equiv.variants.matching_variant`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from equiv import manual
from equiv._messages import message, value_error
from equiv.compare import to_numpy
from equiv.convert import LAYOUTS, check_entries
from equiv.diagnose import _close, diagnose_leaf, diagnose_trees, precision_cause
from equiv.environment import environment
from equiv.kinks import preactivation_bounds
from equiv.losses import LOSSES
from equiv.spec import UNIT_ROUNDOFF, MLPSpec, check_spec
from equiv.tolerance import SAFETY
from equiv.variants import matching_variant

#: The name your hand-written backward carries in reports, here and in
#: :func:`equiv.check_manual_backward`.
GRAD_FN = "grad_fn"

U64 = UNIT_ROUNDOFF["float64"]
#: Relative step along each direction: u^(1/3) balances h² truncation and u/h rounding.
STEP = U64 ** (1.0 / 3.0)
#: Fresh directions tried per requested direction before giving up on kinks.
MAX_TRIES = 8
#: Factors nearer 1 than this are not named: at the catalogue's own floor (1e-3, where
#: :mod:`equiv.diagnose` tells a factor from 1) rounding decides whether a leaf 1e-3 off
#: is "a factor" (for 2 of the 11 models of the 1e-3 case in tests/test_gradcheck.py,
#: without this), and none of its known factors (0, -1, 2, ½, the batch and output
#: sizes) is this near 1.
SMALLEST_FACTOR = 1e-2

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
    # Where the gradient holds NaN or Inf: how many entries and the first's index (the
    # bound is then the finite entries'; found in a user trial: "up to nan allowed").
    nonfinite: str = ""

    @property
    def ratio(self) -> float:
        if math.isnan(self.error):
            return math.inf
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
        if self.nonfinite:
            return (
                f"  {self.name}, direction {self.direction}: <grad, v> = {self.projected:.12g}, "
                f"finite difference {self.finite_difference:.12g}: {self.nonfinite}"
            )
        return (
            f"  {self.name}, direction {self.direction}: <grad, v> = {self.projected:.12g}, "
            f"finite difference {self.finite_difference:.12g}, difference {self.error:.3g} "
            f"(up to {self.bound:.3g} allowed, ratio {self.ratio:.3g})"
        )


@dataclasses.dataclass
class GradCheck:
    """Every projection of a :func:`check_gradients` run, and the known causes of a
    failure (:meth:`hints`)."""

    projections: list[Projection]
    skipped: int = 0
    #: The known causes of a failure, each with the numbers behind it (:meth:`hints`).
    causes: list[str] = dataclasses.field(default_factory=list)
    #: The loss ``grad_fn`` returned against the spec's float64 loss (named "loss").
    loss: Projection | None = None

    @property
    def agree(self) -> bool:
        return all(p.passed for p in self._checks())

    @property
    def cause(self) -> str | None:
        """The first known cause (:meth:`hints`), or None."""
        return self.causes[0] if self.causes else None

    def hints(self) -> list[str]:
        """The known causes of the failure, as :meth:`equiv.harness.Comparison.hints`
        gives them: ``"leaves: what differs. Why."``, then the numbers that show it (a
        factor measured by finite differences along every direction of those leaves);
        empty when the check passes or no known cause fits.

        >>> import numpy as np
        >>> from equiv.problem import make_problem
        >>> spec = MLPSpec((3, 2))
        >>> (x, y), = make_problem(spec, batch_size=4, seed=0).batches
        >>> def halved(p, xb, yb):  # d/dout of mean((out - y)²) written (out - y)/n
        ...     loss, grads = manual.loss_and_grads(p, xb, yb, spec.replace(dtype="float64"))
        ...     return loss, {name: g / 2 for name, g in grads.items()}
        >>> params = make_problem(spec, batch_size=4, seed=0).params
        >>> hint = check_gradients(params, x, y, spec, halved).hints()[0]
        >>> print(hint[:76])
        fc1.weight, fc1.bias: grad_fn's grads are 0.5 times the float64 reference's.
        >>> print(hint[hint.index("(<grad"):][:78])
        (<grad, v> / finite difference = 0.5 along each of 4 random directions, spread
        """
        return [] if self.agree else list(self.causes)

    def _checks(self) -> list[Projection]:
        return ([self.loss] if self.loss is not None else []) + self.projections

    @property
    def worst_ratio(self) -> float:
        return max((p.ratio for p in self.projections), default=0.0)

    def failing_leaves(self) -> list[str]:
        """The leaves whose check fails ("loss" for the returned loss), sorted."""
        return sorted({p.name for p in self._checks() if not p.passed})

    def failure_text(self) -> str:
        """What :meth:`assert_agree` raises: a headline, ``likely cause: ...`` for each
        hint, then every failing projection (the loss first); ``""`` when it passes."""
        if self.agree:
            return ""
        bad = [p for p in self.projections if not p.passed]
        failed_loss = self.loss is not None and not self.loss.passed
        head = message(
            f"gradient check failed for {', '.join(self.failing_leaves())}: "
            f"{len(bad)} of {len(self.projections)} projections disagree with finite "
            "differences in float64"
            + ("; the returned loss is not the spec's" if failed_loss else "")
        )
        bad = [p for p in self._checks() if not p.passed]  # the loss first
        causes = [f"  likely cause: {hint}" for hint in self.hints()]
        return "\n".join([head] + causes + [p.describe() for p in bad])

    def __str__(self) -> str:
        if not self.agree:
            return self.failure_text()
        loss = " and the returned loss" if self.loss is not None else ""
        return message(
            f"gradient check passed: {len(self.projections)} projections{loss} agree with "
            f"finite differences in float64 (worst ratio to the bound {self.worst_ratio:.3g})"
        )

    def assert_agree(self) -> None:
        """Raise ``AssertionError`` naming every leaf whose gradient fails the check,
        and the known causes (:meth:`hints`)."""
        __tracebackhide__ = True  # pytest shows the caller's line and this message only
        if not self.agree:
            raise AssertionError(self.failure_text())

    def to_dict(self) -> dict[str, Any]:
        return {
            "agree": self.agree,
            "worst_ratio": self.worst_ratio,
            "skipped": self.skipped,
            "cause": self.cause,
            "hints": self.hints(),
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
            "environment": environment("cpu"),  # the check runs on the CPU
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
        its loss or gradients fail, their known causes, if any, are named
        (:meth:`GradCheck.hints`): a constant factor of the spec's float64 ones that
        the finite differences measure too (:func:`equiv.diagnose.diagnose_trees`),
        else a known mistake of a hand-written backward
        (:func:`equiv.variants.matching_variant`).
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
    check_spec(spec)
    spec = spec.replace(dtype="float64")
    params = {k: _f64(v) for k, v in params.items()}
    # Integer class labels stay integers; everything else is computed in float64.
    x = _f64(x)
    labels = LOSSES[spec.loss].targets == "labels"
    y = np.asarray(_to_numpy(y)) if labels else _f64(y)
    _check_inputs(params, x, y, spec)
    if labels:
        y = y.astype(np.int64)  # labels held as whole floats (torch.float64 ones) too
    # The spec's own float64 backward: the reference a failing gradient is held to for
    # its known causes, trusted where it agrees with the finite differences below.
    with np.errstate(all="ignore"):
        _, reference = manual.loss_and_grads(params, x, y, spec)
    grad_fn = grad_fn or (lambda p, xb, yb: manual.loss_and_grads(p, xb, yb, spec))
    loss, grads = unpack_grad_fn_result(grad_fn(params, x, y), params)
    grads = {k: _f64(v) for k, v in grads.items()}
    rng = np.random.default_rng(seed)
    base_sides = _sides(params, x, y, spec)
    r = _loss_rounding(params, x, y, spec)
    projections, reference_holds, skipped = [], True, 0
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
            fd, fd_bound = _difference(params, name, v, x, y, spec, r)
            projections.append(_project(name, d, grads[name], v, fd, fd_bound))
            reference_holds &= _project(name, d, reference[name], v, fd, fd_bound).passed
    # The returned loss against the spec's: both float64, each within r of the exact one.
    exact = _loss(params, x, y, spec)
    returned = float(_f64(loss).reshape(()))
    loss_check = Projection("loss", 0, returned, exact, abs(returned - exact), 2 * r)
    check = GradCheck(projections, skipped, [], loss_check)
    if not check.agree:
        factors, explained = (
            _factor_causes(check, grads, reference, spec, x.shape[0])
            if reference_holds
            else ([], set())
        )
        if factors and set(check.failing_leaves()) <= explained:
            # A constant factor explains every failing check: it is none of the variants.
            check.causes = factors
        else:
            # A hand-written backward's gradient check: its mistakes first.
            theirs = {"loss": _f64(loss), **grads}
            variant = matching_variant(
                spec, params, x, y, theirs, backward_first=True, unit_roundoff=U64
            )
            # Said of grad_fn, and of its one call (found in a user trial: a hint with no
            # subject, of a "step-1" loss where no step is taken).
            if variant:
                variant = "grad_fn " + variant.replace("its step-1 ", "its ")
            check.causes = [variant] if variant else factors
    return check


def _check_inputs(params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, spec) -> None:
    """Refuse parameters that are not ``spec``'s and a batch that is not its shape.

    Found in a user trial: a spec of other sizes passed the check (``(9, 9, 9, 9)``
    for a 5-6-6-3 model), or failed deep inside the forward pass.
    """
    entries = {(name,): value for name, value in params.items()}
    try:
        check_entries(entries, LAYOUTS["torch"], spec, what="params")
    except ValueError as error:
        try:
            theirs = check_entries(entries, LAYOUTS["torch"], None, what="params")
        except ValueError:
            raise error from None
        raise ValueError(
            f"{error}\nThe params are those of an MLP of sizes {theirs.sizes} "
            f"({theirs.describe_bias()}): pass spec=MLPSpec({theirs.sizes}"
            + ("" if theirs.bias is True else f", bias={theirs.bias}")
            + ", ...) with the model's activation and loss"
        ) from None
    if x.ndim != 2 or x.shape[1] != spec.sizes[0] or x.shape[0] == 0:
        raise value_error(
            f"x must have shape (batch, {spec.sizes[0]}) with at least one row, got {x.shape}"
        )
    batch, width = x.shape[0], spec.sizes[-1]
    if LOSSES[spec.loss].targets == "labels":
        integral = np.issubdtype(y.dtype, np.integer) or (
            np.issubdtype(y.dtype, np.floating) and bool(np.all(y == np.round(y)))
        )
        if y.ndim != 1 or y.shape[0] != batch or not integral:
            raise value_error(
                f"y must hold integer class labels of shape ({batch},) for {spec.loss}, got "
                f"{y.dtype} of shape {y.shape}"
            )
        if y.size and (int(y.min()) < 0 or int(y.max()) >= width):
            raise value_error(
                f"y holds labels outside [0, {width}): {int(y.min())} to {int(y.max())}"
            )
    elif y.shape != (batch, width):
        column = ": a column, y.reshape(-1, 1)" if y.shape == (batch,) and width == 1 else ""
        raise value_error(
            f"y must have shape ({batch}, {width}) as x has {batch} rows, got {y.shape}{column}"
        )


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
    if isinstance(loss, Mapping) and not isinstance(grads, Mapping):
        # Found in a user trial: (grads, loss) was told only that grads was a float.
        raise value_error(
            f"grad_fn returned (grads, loss): the gradients first, then a "
            f"{type(grads).__name__}; return them the other way round: `return loss, grads`"
        )
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


def _difference(params, name, v, x, y, spec, r) -> tuple[float, float]:
    """``D(h)`` along ``v`` in leaf ``name``, and the bound on its distance from the
    exact ``⟨∇L, v⟩``: the truncation ``|D(2h) - D(h)|/3`` and the loss's rounding
    ``1.5·r/h`` (the module docstring)."""

    def loss_at(t: float) -> float:
        moved = dict(params)
        moved[name] = params[name] + t * v
        return _loss(moved, x, y, spec)

    h = STEP
    fd_h = (loss_at(h) - loss_at(-h)) / (2 * h)
    fd_2h = (loss_at(2 * h) - loss_at(-2 * h)) / (4 * h)
    return fd_h, abs(fd_2h - fd_h) / 3.0 + 1.5 * r / h


def _project(name, d, g, v, fd, fd_bound) -> Projection:
    """``⟨g, v⟩`` against ``D(h)``, allowed ``fd_bound`` plus the inner product's own
    rounding."""
    with np.errstate(all="ignore"):  # an Inf gradient: its projection is inf or nan
        products = g * v
        projected = float(np.sum(products))
    finite = np.isfinite(g)
    size = float(np.sum(np.abs(products[finite])))
    bound = fd_bound + SAFETY * U64 * math.sqrt(products.size) * size
    nonfinite = ""
    if not finite.all():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), g.shape))
        nonfinite = (
            f"the gradient holds NaN or Inf at {int(np.count_nonzero(~finite))} of {g.size} "
            f"entries, the first at index {first}"
        )
    return Projection(name, d, projected, fd, abs(projected - fd), bound, nonfinite)


#: The most a float32 gradient may differ from the float64 one, relative to the leaf's
#: largest, to be put down to float32 alone: 1e-4, 1700 float32 unit roundoffs, far
#: above what a float32 backward of these sizes rounds to (1e-7 to 1e-6 measured on
#: the 5-6-6-3 tanh model of tests/test_gradcheck.py), far below a mistake's factor.
FLOAT32_ALONE = 1e-4


def _within_float32_rounding(g: np.ndarray, ref: np.ndarray) -> bool:
    """``g`` is finite and within :data:`FLOAT32_ALONE` of ``ref``, relative to the
    larger of their largest magnitudes.

    >>> _within_float32_rounding(np.float32([0.1, 0.2]).astype(float), np.array([0.1, 0.2]))
    True
    >>> _within_float32_rounding(np.array([np.inf, 0.0]), np.array([0.1, 0.2]))
    False
    """
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(ref))):
        return False
    scale = max(float(np.max(np.abs(g), initial=0.0)), float(np.max(np.abs(ref), initial=0.0)))
    return bool(np.max(np.abs(g - ref), initial=0.0) <= FLOAT32_ALONE * scale)


def _swapped(grads, reference, failing: set[str]) -> list[tuple[str, str]]:
    """Pairs of failing leaves of one shape whose gradients are each other's reference
    ones (found in a user trial: fc1's and fc2's gradients stored under each other's
    names were caught with no cause).

    >>> g = {"a": np.array([1.0, 2.0]), "b": np.array([3.0, 4.0]), "c": np.ones(2)}
    >>> _swapped(g, {"a": g["b"], "b": g["a"], "c": g["c"]}, {"a", "b"})
    [('a', 'b')]
    """
    names = sorted(failing)
    pairs = []
    for i, one in enumerate(names):
        for other in names[i + 1 :]:
            a, b = grads[one], grads[other]
            if a.shape == b.shape and _close(a, reference[other]) and _close(b, reference[one]):
                pairs.append((one, other))
    return pairs


def _factor_causes(
    check: GradCheck, grads, reference, spec: MLPSpec, batch: int
) -> tuple[list[str], set[str]]:
    """The known causes (:func:`equiv.diagnose.diagnose_trees`) of the failing checks
    that are a constant factor of the float64 ``reference`` (which the finite
    differences confirm: the caller's to check), and the checks they explain ("loss"
    for the loss). Each hint names its leaves, then the factor ``⟨g, v⟩ / D(h)``
    measured along their directions and its spread (greatest minus least); the loss's,
    the returned loss and the spec's."""
    common = {
        "names": (GRAD_FN, "the float64 reference"),
        "numel_output": batch * spec.sizes[-1],
        "batch_size": batch,
        "loss": spec.loss,
        "by_hand": True,
    }
    causes, explained, loss = [], set(), check.loss
    failing = set(check.failing_leaves())
    # Gradients computed or returned in float32: no factor, the format (found in a user
    # trial: a float32 gradient failed at ratio 4.96 with no cause named). Only where
    # float32's rounding is all the difference: a float32 backward with a mistake in
    # it is the mistake's (found in review: 0.5·g in float32 was put down to float32).
    narrow: dict[str, list[str]] = {}
    for name in [n for n in spec.param_names() if n in failing]:
        g, ref = grads[name], reference[name]
        if not _within_float32_rounding(g, ref):
            continue
        hint = precision_cause(name, g, ref, "float64", common["names"], by_hand=True)
        if hint:
            narrow.setdefault(hint.split(": ", 1)[1], []).append(name)
    for text, names in narrow.items():
        causes.append(f"{', '.join(names)}: {text}")
        explained.update(names)
    for one, other in _swapped(grads, reference, (failing - explained) & set(grads)):
        causes.append(
            f"{one}, {other}: grad_fn returns each one's gradient under the other's name (a "
            "layer index off by one where the results are stored, or two results exchanged)."
        )
        explained.update((one, other))
    loss_hint = None
    if loss is not None and not loss.passed and loss.finite_difference:
        factor = loss.projected / loss.finite_difference
        if abs(factor - 1) >= SMALLEST_FACTOR:
            loss_hint = diagnose_leaf(
                "loss",
                np.array(loss.projected),
                np.array(loss.finite_difference),
                stage="loss",
                **common,
            )
        if loss_hint:
            explained.add("loss")
            causes.append(
                f"{_unstopped(loss_hint)} (grad_fn returned {loss.projected:.9g}, the spec's "
                f"float64 loss is {loss.finite_difference:.9g})."
            )
    found = diagnose_trees(
        grads,
        reference,
        [name for name in spec.param_names() if name in failing - explained],
        stage="grads",
        loss_differs=loss is not None and not loss.passed and loss_hint is None,
        **common,
    )
    groups: dict[str, list[str]] = {}
    measured: dict[str, list[float]] = {}
    for hint in found:
        name, text = hint.split(": ", 1)
        factor = _multiple(grads[name], reference[name])
        if factor is None or abs(factor - 1) < SMALLEST_FACTOR:
            continue  # not a factor (a transposed weight), or too near 1 to be a mistake's
        # Directions along which D(h) is within its bound of 0 measure no factor; a
        # leaf with none is not named (its hint would have no numbers).
        ratios = [
            p.projected / p.finite_difference
            for p in check.projections
            if p.name == name and abs(p.finite_difference) > p.bound
        ]
        if ratios:
            groups.setdefault(text, []).append(name)
            measured.setdefault(text, []).extend(ratios)
    for text, names in groups.items():
        ratios = measured[text]
        along = (
            "along 1 random direction"
            if len(ratios) == 1
            else f"along each of {len(ratios)} random directions"
        )
        causes.append(
            f"{', '.join(names)}: {_unstopped(text)} (<grad, v> / finite difference = "
            f"{float(np.mean(ratios)) + 0.0:.6g} {along}, spread "
            f"{max(ratios) - min(ratios):.2g})."
        )
        explained.update(names)
    return causes, explained


def _unstopped(text: str) -> str:
    """``text`` without its final full stop, for the numbers to follow in parentheses."""
    return text[:-1] if text.endswith(".") else text


def _multiple(a: np.ndarray, b: np.ndarray) -> float | None:
    """The least-squares ``c`` with ``a ≈ c·b`` where it explains ``a`` to 1e-4 of the
    larger magnitude (the catalogue's own criterion, :mod:`equiv.diagnose`), else None.

    >>> _multiple(np.array([1.0, -2.0]), np.array([-0.5, 1.0]))
    -2.0
    >>> _multiple(np.eye(2), np.ones((2, 2))) is None
    True
    """
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    if not 0.0 < scale < math.inf or not np.any(b):
        return None
    a, b = a / scale, b / scale
    c = float(np.vdot(a, b)) / float(np.vdot(b, b))
    return c if float(np.max(np.abs(a - c * b))) <= 1e-4 else None


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
    elif spec.loss == "l1":  # its kink: d = 0
        sides.append(out - y > 0)
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
    return to_numpy(x) if hasattr(x, "detach") else x  # bfloat16 too (found in review)


def _f64(x: Any) -> np.ndarray:
    return np.array(_to_numpy(x), dtype=np.float64)
