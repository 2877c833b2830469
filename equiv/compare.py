"""Leaf-by-leaf comparison of two results, with every statistic a verdict needs.

:func:`compare_leaf` measures one pair of arrays against a :class:`~equiv.tolerance.Tolerance`;
:class:`Report` holds many of them, says whether all agree, and renders the failures
in the layout of ``torch.testing.assert_close``: a headline, ``Mismatched elements:
k / n (p%)``, the greatest absolute and relative differences with their index and
the allowed bound. It lists every failing leaf, never only the first, and says which
backend the float64 reference blames (:meth:`Report.blame`).

Rules, the same in both code paths:

* An element mismatches when ``|a - b| > bound`` (bound from the tolerance and any
  per-element ``atol_elementwise``, plus any ``slack``); the ratio is the greatest
  ``|a - b| / bound``.
* NaN and Inf: the non-finite entries must sit at the same places with the same
  value (NaN with NaN, +Inf with +Inf); any other placement is a mismatch, and a
  NaN on one side only is one. The one exception is overflow: an Inf against a
  finite value passes where the bound reaches past the largest finite value of the
  Inf's dtype, the way the Inf points: that dtype rounds every value beyond it to
  Inf. A NaN is never a rounded value.
* The relative difference is ``|actual - expected| / |expected|``, as in
  ``torch.testing.assert_close``: the second argument is the denominator in
  every path and every row (the float64 reference in a row against it, the
  second backend of a pair, which the harness makes the one run first, torch before
  the others: ``jax vs torch`` divides by torch's values).
  ``0 / 0`` counts as 0 (equal zeros), ``x / 0`` as inf; non-finite entries
  are left out.
* Arithmetic runs in the dtype the two inputs promote to (at least float32):
  float32 against float32 in float32 (a difference of two close float32 values
  is exact), anything against float64 in float64. Where a difference or its
  bound is past that dtype's largest value (``3e38 - (-3e38)`` in float32) the
  element is decided at half scale, exactly, and the greatest difference is
  reported past the dtype (6e38); a bound past twice the largest allows all, as
  does a ``slack`` or ``atol_elementwise`` value at or past the largest.
  No overflow warning escapes.

Speed. Leaves of at least :data:`equiv.fastcompare.FAST_THRESHOLD` elements go
first through :mod:`equiv.fastcompare`, which computes per-chunk maxima in cache
on several threads; the full path then recomputes only the chunks that hold the
greatest differences (for their indices), and takes over the whole leaf when it
fails, holds a NaN or Inf, has ``slack`` or ``atol_elementwise``, or has a bound
past the dtype's range. Both paths give identical statistics.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from equiv import fastcompare
from equiv._messages import message, type_error, value_error
from equiv.tolerance import Tolerance, notation

STAGES = ("loss", "grads", "params")
#: The name of the float64 arbiter's trajectory (the same as ``equiv.harness.REFERENCE``).
REFERENCE = "reference"
#: Elements per NumPy chunk: bounds the temporaries of the NumPy path.
CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class LeafDiff:
    """How far one leaf of ``actual`` is from the same leaf of ``expected``."""

    stage: str
    step: int
    name: str
    actual: str
    expected: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    mismatched: int
    nonfinite_mismatched: int
    max_abs: float
    max_abs_index: tuple[int, ...]
    max_rel: float  # |actual - expected| / |expected| (torch's convention)
    max_rel_index: tuple[int, ...]
    allowed: float  # the bound at the element of greatest absolute difference
    ratio: float  # max over elements of |difference| / bound; <= 1 passes
    tolerance: Tolerance
    ambiguous: int = 0  # elements that pass only thanks to slack (a kink, Adam's update)
    # Where the ratio to the bound is greatest, where that is not the greatest absolute
    # difference's element (None: the same, or not located).
    ratio_index: tuple[int, ...] | None = None
    # The first non-finite mismatch: its index and the two values there, as printed (a
    # NaN is a string that equals itself).
    nonfinite_at: tuple[tuple[int, ...], str, str] | None = None

    @property
    def passed(self) -> bool:
        return self.mismatched == 0

    @property
    def where(self) -> str:
        """``"grads at step 1"``, ``"params after step 2"``, ``"loss at step 1"``."""
        return f"{self.stage} {'after' if self.stage == 'params' else 'at'} step {self.step}"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tolerance"] = dataclasses.asdict(self.tolerance)
        out["shape"] = list(self.shape)
        out["max_abs_index"] = list(self.max_abs_index)
        out["max_rel_index"] = list(self.max_rel_index)
        out["passed"] = self.passed
        return out

    @property
    def nonfinite_difference(self) -> float | None:
        """The difference at the first non-finite mismatch (``nan`` where either side
        is NaN, else ``inf``); None without one. Tables show it as the greatest
        difference, which :attr:`max_abs` (taken over the finite elements) is not.

        >>> compare_leaf(np.array([np.nan, 1.0]), np.ones(2), Tolerance()).nonfinite_difference
        nan
        """
        if self.nonfinite_at is None:
            return None
        _, a, b = self.nonfinite_at
        return math.nan if "nan" in (a, b) else math.inf

    def _first_nonfinite(self) -> str:
        if self.nonfinite_at is None:
            return ""
        index, a, b = self.nonfinite_at
        return f"; the first at index {index}: {a} ({self.actual}) vs {b} ({self.expected})"

    def describe(self) -> str:
        """The torch-style block of lines for a failing (or any) leaf.

        >>> d = compare_leaf(np.array([1.0, 2.0]), np.array([1.0, 2.5]), Tolerance(atol=0.1),
        ...                  stage="grads", name="fc1.bias", actual_name="jax",
        ...                  expected_name="torch")
        >>> print(d.describe())
        grads at step 1, fc1.bias, shape (2,), float64: jax vs torch
          Mismatched elements: 1 / 2 (50.0%)
          Greatest absolute difference: 0.5 at index (1,) (0.1 allowed there)
          Greatest relative difference: 0.2 at index (1,)
          Ratio to the bound: 5 (bound: atol=0.1, rtol=0)
        """
        percent = 100.0 * self.mismatched / max(self.numel, 1)
        lines = [
            f"{self.where}, {self.name}, shape {self.shape}, {self.dtype}: "
            f"{self.actual} vs {self.expected}",
            f"  Mismatched elements: {self.mismatched} / {self.numel} ({percent:.1f}%)",
        ]
        # The greatest differences are taken over the finite elements (a NaN has no
        # size), so beside a non-finite mismatch they say so: found in a user trial, a
        # NaN loss read "Greatest absolute difference: 0".
        among = ""
        if self.nonfinite_mismatched:
            n = self.nonfinite_mismatched
            lines.append(
                f"  Non-finite mismatch: {n} {'entries are' if n != 1 else 'entry is'} NaN or "
                "Inf on one side only (or Inf of the other sign)" + self._first_nonfinite()
            )
            among = " among the finite elements"
        if self.nonfinite_mismatched and self.nonfinite_mismatched == self.mismatched:
            if self.numel > self.mismatched:
                lines.append(
                    "  The finite elements agree within the bound (greatest absolute "
                    f"difference {self.max_abs:.6g})"
                )
        else:
            lines += [
                f"  Greatest absolute difference{among}: {self.max_abs:.6g} at index "
                f"{self.max_abs_index} ({self.allowed:.3g} allowed there)",
                f"  Greatest relative difference{among}: {self.max_rel:.6g} at index "
                f"{self.max_rel_index}",
            ]
        lines.append(
            f"  Ratio to the bound: {self.ratio:.3g}"
            + (
                ""
                if self.ratio_index is None
                else f" at index {self.ratio_index}, "
                + (
                    "the non-finite mismatch"
                    if self.nonfinite_at is not None and self.ratio_index == self.nonfinite_at[0]
                    else "where the bound is tighter"
                )
            )
            + f" (bound: {self.tolerance.describe()})"
        )
        if self.ambiguous:
            lines.append(
                f"  Within the slack only: {self.ambiguous} elements (a unit near a kink, "
                "Adam's update where a gradient element is near rounding level, or two "
                "trajectories that parted)"
            )
        return "\n".join(lines)


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy view (a copy only off the CPU) of a torch tensor, JAX array, NumPy
    array or number; torch bfloat16 becomes ``ml_dtypes.bfloat16``.

    >>> to_numpy(2.5)
    array(2.5)
    """
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes
            import torch

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def compute_dtype(a: np.ndarray, b: np.ndarray) -> np.dtype:
    """The dtype a comparison computes in: the promotion of both, at least float32.

    >>> compute_dtype(np.zeros(1, np.float32), np.zeros(1, np.float64))
    dtype('float64')
    >>> compute_dtype(np.zeros(1, np.float16), np.zeros(1, np.float16))
    dtype('float32')
    """
    ct = np.result_type(a.dtype, b.dtype, np.float32)
    if ct.kind != "f" or ct.itemsize > 8:
        raise type_error(
            f"cannot compare {a.dtype} with {b.dtype}: equiv compares real floating "
            "(or integer) arrays; convert complex values to their real and imaginary parts"
        )
    return ct


def compare_leaf(
    actual: Any,
    expected: Any,
    tolerance: Tolerance,
    *,
    stage: str = "params",
    step: int = 1,
    name: str = "",
    actual_name: str = "actual",
    expected_name: str = "expected",
    slack: Any = None,
    atol_elementwise: Any = None,
    fast_threshold: int | None = None,
) -> LeafDiff:
    """Compare two arrays of the same shape elementwise.

    Args:
      actual, expected: NumPy, torch or JAX arrays (or numbers) of one shape.
      tolerance: the per-element bound ``atol + rtol·|expected| + scaled·S``.
      stage, step, name, actual_name, expected_name: labels for the report.
      slack: None, or a non-negative finite array broadcastable to the leaf: extra
        allowed difference per element (for units near a ReLU kink). Elements that
        pass only thanks to it are counted in ``ambiguous``. A value at or past the
        compute dtype's largest allows every difference there.
      atol_elementwise: None, or a non-negative finite array broadcastable to the leaf:
        an absolute term of the bound per element, added to ``tolerance``'s (the
        harness's error sizes per element). Unlike ``slack``, part of the bound proper.
      fast_threshold: leaves with at least this many elements take the fast path;
        default :data:`equiv.fastcompare.FAST_THRESHOLD`.

    Returns:
      A :class:`LeafDiff`; its relative difference is ``|actual - expected| /
      |expected|`` (torch's ``assert_close`` convention), whichever path computed it.

    Raises:
      ValueError: shapes differ, or ``slack`` or ``atol_elementwise`` is negative, NaN
        or of another shape.
      TypeError: complex or non-numeric input.

    Example:
      >>> import numpy as np
      >>> d = compare_leaf(np.array([1.0, 2.0]), np.array([1.0, 2.5]), Tolerance(atol=0.1))
      >>> d.passed, d.mismatched, d.max_abs, d.max_abs_index
      (False, 1, 0.5, (1,))
      >>> compare_leaf(np.array([1.0, 2.0]), np.array([1.0, 2.5]), Tolerance(atol=0.1),
      ...              slack=np.array([0.0, 0.5])).ambiguous
      1
      >>> d = compare_leaf(np.array([1.0, 2.0]), np.array([1.0, 2.5]), Tolerance(atol=0.1),
      ...                  atol_elementwise=np.array([0.0, 0.5]))
      >>> d.passed, d.ambiguous, round(d.allowed, 3)
      (True, 0, 0.6)
    """
    a, b = to_numpy(actual), to_numpy(expected)
    if a.shape != b.shape:
        raise ValueError(
            message(
                f"{name or 'leaf'}: {actual_name} has shape {a.shape} but {expected_name} "
                f"has {b.shape}; results must have the same shape to be compared"
            )
        )
    ct = compute_dtype(a, b)
    dtype = str(a.dtype) if a.dtype == b.dtype else f"{a.dtype}/{b.dtype}"
    flat_slack = None if slack is None else _check_slack(slack, a.shape, ct, name)
    flat_atol = (
        None
        if atol_elementwise is None
        else _check_slack(atol_elementwise, a.shape, ct, name, "atol_elementwise")
    )
    fa, fb = a.reshape(-1), b.reshape(-1)
    threshold = fastcompare.FAST_THRESHOLD if fast_threshold is None else fast_threshold
    stats = None
    if (
        flat_slack is None
        and flat_atol is None
        and fa.size >= threshold
        and fa.size
        and not (tolerance.rtol > 0 and tolerance.scaled > 0)
    ):
        stats = _fast_stats(fa, fb, tolerance, ct)
    if stats is None:
        stats = _numpy_stats(fa, fb, tolerance, flat_slack, ct, flat_atol)
    if a.size:
        abs_index, rel_index, nonfinite_index = (
            tuple(int(i) for i in np.unravel_index(k, a.shape))
            for k in (stats.i_abs, stats.i_rel, stats.i_nonfinite)
        )
    else:
        abs_index = rel_index = nonfinite_index = ()
    return LeafDiff(
        stage=stage,
        step=step,
        name=name,
        actual=actual_name,
        expected=expected_name,
        shape=tuple(a.shape),
        dtype=dtype,
        numel=int(a.size),
        mismatched=stats.mismatched,
        nonfinite_mismatched=stats.nonfinite,
        ratio_index=(
            tuple(int(i) for i in np.unravel_index(stats.i_ratio, a.shape))
            if a.size
            and stats.i_ratio is not None
            and stats.i_ratio != stats.i_abs
            and not stats.ratio <= 1  # a failing leaf's (the fast path locates none)
            else None
        ),
        nonfinite_at=(
            (nonfinite_index, f"{fa[stats.i_nonfinite]:.6g}", f"{fb[stats.i_nonfinite]:.6g}")
            if stats.nonfinite
            else None
        ),
        max_abs=float(stats.max_abs),
        max_abs_index=abs_index,
        max_rel=float(stats.max_rel),
        max_rel_index=rel_index,
        allowed=float(stats.allowed),
        ratio=float(stats.ratio),
        tolerance=tolerance,
        ambiguous=stats.ambiguous,
    )


@dataclasses.dataclass
class _Stats:
    """Statistics of a stretch of a flat leaf; :meth:`then` appends a later stretch."""

    mismatched: int = 0
    nonfinite: int = 0
    i_nonfinite: int = 0  # the first non-finite mismatch, where there is one
    ambiguous: int = 0
    max_abs: float = 0.0
    i_abs: int = 0
    max_rel: float = 0.0
    i_rel: int = 0
    ratio: float = 0.0
    allowed: float = 0.0
    i_ratio: int | None = None  # where the ratio is greatest (None: not located)

    def then(self, later: _Stats | None) -> _Stats:
        if later is None:
            return self
        out = dataclasses.replace(
            self,
            mismatched=self.mismatched + later.mismatched,
            nonfinite=self.nonfinite + later.nonfinite,
            i_nonfinite=self.i_nonfinite if self.nonfinite else later.i_nonfinite,
            ambiguous=self.ambiguous + later.ambiguous,
            ratio=max(self.ratio, later.ratio),
            i_ratio=self.i_ratio if self.ratio >= later.ratio else later.i_ratio,
        )
        if later.max_abs > self.max_abs:  # strict: the first index wins, as np.argmax
            out.max_abs, out.i_abs, out.allowed = later.max_abs, later.i_abs, later.allowed
        if later.max_rel > self.max_rel:
            out.max_rel, out.i_rel = later.max_rel, later.i_rel
        return out


def _check_slack(
    slack: Any, shape: tuple[int, ...], ct: np.dtype, name: str, what: str = "slack"
) -> np.ndarray:
    s = to_numpy(slack)
    try:
        s = np.broadcast_to(s, shape)
    except ValueError:
        raise value_error(
            f"{name or 'leaf'}: {what} of shape {s.shape} does not broadcast to the leaf's "
            f"shape {shape}; give one extra allowed difference per element (or a scalar)"
        ) from None
    if not np.all(np.isfinite(s) & (s >= 0)):
        raise value_error(
            f"{name or 'leaf'}: {what} must be finite and non-negative; got values from "
            f"{np.nanmin(s, initial=np.inf)} to {np.nanmax(s, initial=-np.inf)}"
            f"{' and NaN' if np.isnan(s).any() else ''}"
        )
    # A value at or past the compute dtype's largest stands for one beyond its range
    # (equiv.harness caps there): it allows every difference, as inf does.
    with np.errstate(over="ignore"):
        s = s.astype(ct).reshape(-1)
    return np.where(s < np.finfo(ct).max, s, ct.type(np.inf))


def _scale_part(a: np.ndarray, b: np.ndarray, ct: np.dtype) -> Any:
    """The greatest magnitude over the elements finite on both sides."""
    a, b = a.astype(ct, copy=False), b.astype(ct, copy=False)
    finite = np.isfinite(a) & np.isfinite(b)
    return ct.type(np.max(np.where(finite, np.maximum(np.abs(a), np.abs(b)), 0), initial=0))


def _rounded(x: float, ct: np.dtype) -> Any:
    """``x`` rounded to ``ct``; inf where it is beyond the dtype's range (no warning)."""
    return ct.type(x) if x <= float(np.finfo(ct).max) else ct.type(np.inf)


def _bound_constant(tolerance: Tolerance, scale: Any, ct: np.dtype, factor: float = 1.0) -> Any:
    """``factor·(atol + scaled·S)``, rounded once to the compute dtype (inf where it is
    beyond its range, without a warning: every difference within the range passes, and
    one past it is decided at half scale, ``factor = 0.5``, in :func:`_stats_part`)."""
    bound = tolerance.atol + tolerance.scaled * max(float(scale), tolerance.floor)
    return _rounded(factor * bound, ct)


def _quotient(num: np.ndarray, den: Any) -> np.ndarray:
    """``num / den`` with ``x / 0 = inf`` for ``x > 0`` and ``0 / 0 = 0``."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = num / den
    return np.where(np.isnan(q), np.zeros((), q.dtype), q)


def _largest(dtype: np.dtype) -> float:
    """The largest finite value of a float dtype (beyond it, a value rounds to Inf)."""
    return float(np.finfo(dtype).max) if dtype.kind == "f" else math.inf


def _relative_term(rtol: float, size: np.ndarray, ct: np.dtype) -> np.ndarray:
    """``rtol·|expected|`` in ``ct``, inf past its range: 0 where ``|expected|`` is 0
    (an infinite ``rtol`` too), and taken in float64 where ``rtol`` itself is past
    ``ct``'s range (1e39 times 1e-40 is 0.1, not inf, in float32)."""
    r = _rounded(rtol, ct)
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(r):
            return r * size
        term = (rtol * size.astype(np.float64)).astype(ct)
    return np.where(size > 0, term, ct.type(0))


def _bounds(c, rtol: float, size_b, atol, slack, ct: np.dtype):
    """The bound per element without and with ``slack``: ``c + rtol·|b| + atol``; inf
    where it is beyond the dtype's range (without a warning)."""
    with np.errstate(over="ignore"):
        allowed = c + _relative_term(rtol, size_b, ct) if rtol else c
        if atol is not None:
            allowed = allowed + atol
        return allowed, (allowed if slack is None else allowed + slack)


def _size(b: np.ndarray, ct: np.dtype) -> np.ndarray:
    """``|b|``, 0 where ``b`` is not finite (the size ``rtol`` multiplies)."""
    return np.where(np.isfinite(b), np.abs(b), ct.type(0))


def _stats_part(a, b, c, rtol: float, slack, ct, offset: int, atol=None) -> _Stats:
    """The statistics of one chunk; ``c`` is the bound's constant term and half of it
    (:func:`_bound_constant`), ``rtol`` the tolerance's."""
    top_a, top_b = _largest(a.dtype), _largest(b.dtype)
    a, b = a.astype(ct, copy=False), b.astype(ct, copy=False)
    finite = np.isfinite(a) & np.isfinite(b)
    same_nonfinite = ~finite & ((a == b) | (np.isnan(a) & np.isnan(b)))
    bad = ~finite & ~same_nonfinite
    with np.errstate(over="ignore", invalid="ignore"):
        diff = np.where(finite, np.abs(a - b), ct.type(0))
    abs_b = np.where(finite, np.abs(b), ct.type(0))
    allowed, held = _bounds(c[0], rtol, _size(b, ct), atol, slack, ct)
    # Where |a - b| or its bound is past the dtype's largest value (inf, of finite
    # terms), both are taken at half scale, exact for values so large: the verdict, the
    # ratio and the numbers are the exact values' (an inf against an inf passed, with an
    # overflow warning, in a user trial). A bound past twice the largest allows all.
    lost = None  # where |a - b| itself is past the range
    d, low, high, scale = diff, allowed, held, ct.type(1)  # the values compared, scaled
    if np.isinf(np.max(diff)) or np.isinf(np.max(held)):  # rare: no masks otherwise
        lost = np.isinf(diff)
        big = lost | np.isinf(held)
        half = ct.type(0.5)
        with np.errstate(over="ignore", invalid="ignore"):
            h_diff = np.where(finite, np.abs(a * half - b * half), ct.type(0))
        h_allowed, h_held = _bounds(
            c[1],
            rtol,
            _size(b, ct) * half,
            None if atol is None else atol * half,
            None if slack is None else slack * half,
            ct,
        )
        d, low, high = (
            np.where(big, h, x) for h, x in ((h_diff, diff), (h_allowed, allowed), (h_held, held))
        )
        scale = np.where(big, half, ct.type(1))
        if not lost.any():
            lost = None
    over = np.where(finite, _quotient(d, high), ct.type(0)).astype(ct, copy=False)
    if bad.any():
        over, bad = _overflow_within_bound(a, b, top_a, top_b, high, scale, over, bad, ct)
    if lost is None:
        rel = _quotient(diff, abs_b)
        i_abs = int(np.argmax(diff))
    else:  # |a - b| / |b| at half scale; the greatest difference is a lost one
        rel = _quotient(np.where(lost, d, diff), np.where(lost, abs_b * scale, abs_b))
        i_abs = int(np.argmax(np.where(lost, d, ct.type(-1))))
    i_rel = int(np.argmax(rel))
    ambiguous = 0
    if slack is not None:
        ambiguous = int(np.count_nonzero((d > low) & (d <= high)))
    held_at = np.broadcast_to(held, diff.shape)[i_abs]
    return _Stats(
        mismatched=int(np.count_nonzero(d > high)) + int(np.count_nonzero(bad)),
        nonfinite=int(np.count_nonzero(bad)),
        i_nonfinite=offset + int(np.argmax(bad)) if bad.any() else 0,
        ambiguous=ambiguous,
        # Past the dtype's range, as float (2 times the half-scale value: exact).
        max_abs=diff[i_abs] if lost is None else 2.0 * float(d[i_abs]),
        i_abs=offset + i_abs,
        max_rel=rel[i_rel],
        i_rel=offset + i_rel,
        ratio=np.max(over),
        allowed=held_at
        if np.isfinite(held_at)
        else 2.0 * float(np.broadcast_to(high, diff.shape)[i_abs]),
        # The greatest difference's element, where its ratio is the greatest too (ties
        # such as every ratio inf under a zero bound); else where the ratio is greatest.
        i_ratio=(
            None
            if not over.size
            else offset + (i_abs if over[i_abs] >= np.max(over) else int(np.argmax(over)))
        ),
    )


def _overflow_within_bound(a, b, top_a, top_b, held, scale, over, bad, ct):
    """Pass an Inf against a finite value ``f`` where the bound allows a value past the
    largest finite one of the Inf's dtype, the way the Inf points (``±f + bound ≥
    largest``): that dtype rounds every value beyond it to Inf, so the Inf is the
    correctly rounded value of one the bound allows. The ratio is the least difference
    the Inf stands for over the bound (at most 1). A NaN is never a rounded value
    (``inf − inf`` gives it), and neither is an Inf the bound does not reach or one
    against the other Inf: their ratio stays inf (JAX's NaN ``silu`` backward beside
    torch's 0 is caught, and a run whose float32 values are all NaN does not agree).
    ``held`` is the bound times ``scale`` (1, or 1/2 where it is past the dtype's range).
    """
    held = np.broadcast_to(held, a.shape)
    over = np.where(bad, ct.type(np.inf), over)
    for lost, other, top in ((a, b, top_a), (b, a, top_b)):
        one_sided = bad & np.isinf(lost) & np.isfinite(other)
        if not one_sided.any():
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            toward = np.sign(lost).astype(ct) * other
            # to the dtype's edge
            need = np.maximum(ct.type(top) * scale - toward * scale, ct.type(0))
            ratio = _quotient(need, held)
        reached = one_sided & (ratio <= 1)
        over = np.where(reached, ratio, over)
        bad = bad & ~reached
    return over, bad


def _no_nan(x: np.ndarray) -> np.ndarray:
    """NaN to 0 (a chunk of only ``0/0``), keeping Inf (``np.nan_to_num`` would not)."""
    return np.where(np.isnan(x), np.zeros((), x.dtype), x)


def _chunks(lo: int, hi: int) -> list[tuple[int, int]]:
    return [(i, min(i + CHUNK, hi)) for i in range(lo, hi, CHUNK)]


def _numpy_stats(a, b, tolerance: Tolerance, slack, ct: np.dtype, atol=None) -> _Stats:
    """The reference path: NumPy, chunk by chunk (bounded temporaries)."""
    if a.size == 0:
        return _Stats()
    scale = max(_scale_part(a[i:j], b[i:j], ct) for i, j in _chunks(0, a.size))
    c = _bound_constant(tolerance, scale, ct), _bound_constant(tolerance, scale, ct, 0.5)
    out = None
    for i, j in _chunks(0, a.size):
        part = _stats_part(
            a[i:j],
            b[i:j],
            c,
            tolerance.rtol,
            None if slack is None else slack[i:j],
            ct,
            i,
            None if atol is None else atol[i:j],
        )
        out = part if out is None else out.then(part)
    return out


def _fast_stats(a, b, tolerance: Tolerance, ct: np.dtype) -> _Stats | None:
    """The fast path for a big passing leaf; None where the NumPy path must decide
    (a failing or borderline leaf, NaN or Inf anywhere, or a bound past the dtype's
    range, which the NumPy path takes at half scale)."""
    chunk = fastcompare.CHUNK
    maxima = fastcompare.chunk_maxima(a, b, ct, c=tolerance.atol, rtol=tolerance.rtol, chunk=chunk)
    if not (np.isfinite(maxima["max_abs"]).all() and np.isfinite(maxima["scale"]).all()):
        return None
    scale = np.max(maxima["scale"])
    c, rtol = _bound_constant(tolerance, scale, ct), _rounded(tolerance.rtol, ct)
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(c + rtol * scale):  # the greatest bound (|b| <= S)
            return None
    max_abs = np.max(maxima["max_abs"])
    if rtol:
        ratio = np.max(_no_nan(maxima["ratio"]))
    else:
        ratio = _quotient(np.asarray(max_abs), c)[()]
    if not ratio < 1:
        return None  # failing or borderline: the NumPy path counts every element

    k_abs = int(np.argmax(maxima["max_abs"]))  # the first chunk holding the maximum
    rel = _no_nan(maxima["max_rel"])
    k_rel = int(np.argmax(rel))
    i_abs, found_abs, abs_b, i_rel, found_rel = _locate(a, b, ct, k_abs, k_rel, chunk)
    if found_abs != max_abs or found_rel != rel[k_rel]:
        return None  # cannot happen with IEEE arithmetic; the NumPy path decides
    return _Stats(
        max_abs=max_abs,
        i_abs=i_abs,
        max_rel=found_rel,
        i_rel=i_rel,
        ratio=ratio,
        allowed=c + rtol * abs_b if rtol else c,
    )


def _locate(a, b, ct, k_abs: int, k_rel: int, chunk: int):
    """First indices of the greatest absolute (in chunk ``k_abs``) and relative (in
    chunk ``k_rel``, ``|a - b| / |b|``, ``b`` the expected side) differences of an
    all-finite leaf, with their values."""
    found = {}
    xs, ys, ds, qs = fastcompare.scratch(4, chunk, ct)
    for k in dict.fromkeys((k_abs, k_rel)):
        lo = k * chunk
        n = min(chunk, a.size - lo)
        x, y, d, q = xs[:n], ys[:n], ds[:n], qs[:n]
        np.copyto(x, a[lo : lo + n], casting="unsafe")
        np.copyto(y, b[lo : lo + n], casting="unsafe")
        np.subtract(x, y, out=d)
        np.abs(d, out=d)
        np.abs(y, out=y)
        i = int(np.argmax(d))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            np.divide(d, y, out=q)
        np.copyto(q, 0, where=np.isnan(q))  # 0 / 0: equal zeros differ by nothing
        j = int(np.argmax(q))
        found[k] = (lo + i, d[i], y[i], lo + j, q[j])
    i_abs, max_abs, abs_b = found[k_abs][:3]
    i_rel, max_rel = found[k_rel][3:]
    return i_abs, max_abs, abs_b, i_rel, max_rel


@dataclasses.dataclass
class Report:
    """Every leaf comparison of a run, with the settings it ran under."""

    leaves: list[LeafDiff]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def agree(self) -> bool:
        return all(leaf.passed for leaf in self.leaves)

    @property
    def failures(self) -> list[LeafDiff]:
        return [leaf for leaf in self.leaves if not leaf.passed]

    @property
    def worst_ratio(self) -> float:
        return max((leaf.ratio for leaf in self.leaves), default=0.0)

    def blame(self, reference: str = REFERENCE) -> dict[str, list[str]]:
        """Which backends the float64 ``reference`` blames, per leaf.

        A backend is blamed for a leaf when its comparison against ``reference``
        at that stage and step fails. Keys are ``"<where>, <name>"`` (for example
        ``"grads at step 1, fc1.weight"``), in report order; leaves where no
        backend is blamed are left out. Empty without reference comparisons.

        >>> t = Tolerance(atol=0.1)
        >>> r = Report([compare_leaf(np.ones(2), np.ones(2), t, name="w", actual_name="torch",
        ...                          expected_name="reference"),
        ...             compare_leaf(np.ones(2) * 2, np.ones(2), t, name="w", actual_name="jax",
        ...                          expected_name="reference")])
        >>> r.blame()
        {'params after step 1, w': ['jax']}
        """
        out: dict[str, list[str]] = {}
        for leaf in self.leaves:
            if leaf.expected == reference and not leaf.passed:
                key = f"{leaf.where}, {leaf.name}"
                if leaf.actual not in out.setdefault(key, []):
                    out[key].append(leaf.actual)
        return out

    def _verdict(self, leaf: LeafDiff, blame: dict[str, list[str]]) -> str | None:
        """The arbiter's line for a failing comparison of two backends."""
        if leaf.expected == REFERENCE or not any(
            d.expected == REFERENCE and d.where == leaf.where and d.name == leaf.name
            for d in self.leaves
        ):
            return None
        blamed = [
            b
            for b in blame.get(f"{leaf.where}, {leaf.name}", [])
            if b in (leaf.actual, leaf.expected)
        ]
        if blamed:
            return f"  Float64 reference blames: {', '.join(blamed)}"
        return "  Float64 reference blames neither: both are within the bound of the reference"

    def to_dict(self) -> dict[str, Any]:
        return {
            "agree": self.agree,
            "worst_ratio": _json_float(self.worst_ratio),
            "settings": json_safe(self.settings),
            "blame": self.blame(),
            "leaves": [json_safe(leaf.to_dict()) for leaf in self.leaves],
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def failure_text(self) -> str:
        """Headline plus a torch-style block for every failing leaf.

        The headline names the pairs that disagree and the settings; then one
        block per failing leaf (with the arbiter's verdict under a comparison of
        two backends when reference comparisons exist); a last line totals the
        blame.
        """
        failures = self.failures
        if not failures:
            return message(f"all {len(self.leaves)} comparisons agree")
        pairs = sorted({f"{f.actual} vs {f.expected}" for f in failures})
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items() if k in _HEADLINE)
        head = message(
            f"{len(failures)} of {len(self.leaves)} comparisons disagree "
            f"({'; '.join(pairs)}){f' [{settings}]' if settings else ''}"
        )
        blame = self.blame()
        lines = [head]
        for leaf in failures:
            lines.append(leaf.describe())
            verdict = self._verdict(leaf, blame)
            if verdict:
                lines.append(verdict)
        if blame:
            counts: dict[str, int] = {}
            for backends in blame.values():
                for backend in backends:
                    counts[backend] = counts.get(backend, 0) + 1
            lines.append(
                message("the float64 reference blames: ")
                + "; ".join(
                    f"{b} ({n} {'leaves' if n != 1 else 'leaf'})" for b, n in counts.items()
                )
            )
        symbols = notation(leaf.tolerance.describe() for leaf in failures)
        if symbols:
            lines.append(message("in the bounds:"))
            lines += [f"  {entry}" for entry in symbols]
        return "\n".join(lines)

    def assert_agree(self) -> None:
        """Raise ``AssertionError`` naming every failing leaf; return None if all agree."""
        __tracebackhide__ = True  # pytest shows the caller's line and this message only
        if not self.agree:
            raise AssertionError(self.failure_text())


_HEADLINE = ("dtype", "precision", "device")


def compare_trees(
    actual: Mapping[str, Any],
    expected: Mapping[str, Any],
    tolerances: Tolerance | Mapping[str, Tolerance],
    *,
    stage: str = "params",
    step: int = 1,
    actual_name: str = "actual",
    expected_name: str = "expected",
    slack: Mapping[str, Any] | None = None,
    atol_elementwise: Mapping[str, Any] | None = None,
    fast_threshold: int | None = None,
) -> list[LeafDiff]:
    """Compare two flat ``{name: array}`` trees leaf by leaf (names must match).

    ``slack`` and ``atol_elementwise`` optionally map leaf names to the arrays of
    :func:`compare_leaf`; ``fast_threshold`` is passed on.

    Example:
      >>> import numpy as np
      >>> diffs = compare_trees({"w": np.ones(2)}, {"w": np.ones(2)}, Tolerance(atol=0.0))
      >>> [d.passed for d in diffs]
      [True]
    """
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        raise ValueError(
            message(
                f"{actual_name} and {expected_name} hold different leaves: missing from "
                f"{actual_name}: {missing or 'none'}; not in {expected_name}: {extra or 'none'}"
            )
        )
    out = []
    for name in expected:
        tol = tolerances if isinstance(tolerances, Tolerance) else tolerances[name]
        out.append(
            compare_leaf(
                actual[name],
                expected[name],
                tol,
                stage=stage,
                step=step,
                name=name,
                actual_name=actual_name,
                expected_name=expected_name,
                slack=None if slack is None else slack.get(name),
                atol_elementwise=None if atol_elementwise is None else atol_elementwise.get(name),
                fast_threshold=fast_threshold,
            )
        )
    return out


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as a string (``"nan"``, ``"inf"``) and NumPy
    scalars as Python's: what strict JSON (``allow_nan=False``) holds.

    >>> json_safe({"loss": [float("nan"), np.float32(0.5)], "n": np.int64(3)})
    {'loss': ['nan', 0.5], 'n': 3}
    >>> json_safe({"ok": np.bool_(True), "w": np.array([1.0, np.inf])})
    {'ok': True, 'w': [1.0, 'inf']}
    """
    if isinstance(obj, (float, np.floating)):
        return _json_float(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        # A finite array needs no walk in Python: a 100M-parameter model's final
        # parameters go to JSON at tolist's speed.
        if not np.issubdtype(obj.dtype, np.floating) or np.isfinite(obj).all():
            return obj.tolist()
        return json_safe(obj.tolist())
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
