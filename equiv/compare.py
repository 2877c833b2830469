"""Leaf-by-leaf comparison of two results, with every statistic a verdict needs.

:func:`compare_leaf` measures one pair of arrays against a :class:`~equiv.tolerance.Tolerance`;
:class:`Report` holds many of them, says whether all agree, and renders the failures
in the layout of ``torch.testing.assert_close``: a headline, ``Mismatched elements:
k / n (p%)``, the greatest absolute and relative differences with their index and
the allowed bound. It lists every failing leaf, never only the first.

NaN and Inf: the non-finite entries must sit at the same places with the same
value (NaN with NaN, +Inf with +Inf); any other placement is a mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import numpy as np

from equiv._messages import message
from equiv.tolerance import Tolerance

STAGES = ("loss", "grads", "params")


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
    max_rel: float
    max_rel_index: tuple[int, ...]
    allowed: float  # the bound at the element of greatest absolute difference
    ratio: float  # max over elements of |difference| / bound; <= 1 passes
    tolerance: Tolerance

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

    def describe(self) -> str:
        """The torch-style block of lines for a failing (or any) leaf."""
        percent = 100.0 * self.mismatched / max(self.numel, 1)
        lines = [
            f"{self.where}, {self.name}, shape {self.shape}, {self.dtype}: "
            f"{self.actual} vs {self.expected}",
            f"  Mismatched elements: {self.mismatched} / {self.numel} ({percent:.1f}%)",
            f"  Greatest absolute difference: {self.max_abs:.6g} at index "
            f"{self.max_abs_index} (up to {self.allowed:.3g} allowed)",
            f"  Greatest relative difference: {self.max_rel:.6g} at index {self.max_rel_index}",
            f"  Ratio to the bound: {self.ratio:.3g} (bound: {self.tolerance.describe()})",
        ]
        if self.nonfinite_mismatched:
            lines.append(
                f"  Non-finite mismatch: {self.nonfinite_mismatched} entries are NaN or Inf "
                "on one side only (or Inf of the other sign)"
            )
        return "\n".join(lines)


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy view or copy of a torch tensor, JAX array, NumPy array or number."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
        return x.numpy()
    return np.asarray(x)


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
) -> LeafDiff:
    """Compare two arrays of the same shape elementwise.

    Example:
      >>> import numpy as np
      >>> d = compare_leaf(np.array([1.0, 2.0]), np.array([1.0, 2.5]), Tolerance(atol=0.1))
      >>> d.passed, d.mismatched, d.max_abs, d.max_abs_index
      (False, 1, 0.5, (1,))
    """
    a, b = to_numpy(actual), to_numpy(expected)
    if a.shape != b.shape:
        raise ValueError(
            message(
                f"{name or 'leaf'}: {actual_name} has shape {a.shape} but {expected_name} "
                f"has {b.shape}; results must have the same shape to be compared"
            )
        )
    dtype = str(a.dtype) if a.dtype == b.dtype else f"{a.dtype}/{b.dtype}"
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    same_nonfinite = ~finite & ((a64 == b64) | (np.isnan(a64) & np.isnan(b64)))
    nonfinite_bad = ~finite & ~same_nonfinite
    diff = np.where(finite, np.abs(a64 - b64), 0.0)
    abs_b = np.where(finite, np.abs(b64), 0.0)
    scale = float(max(np.max(np.abs(np.where(finite, a64, 0.0)), initial=0.0),
                      np.max(abs_b, initial=0.0)))
    allowed = tolerance.atol + tolerance.rtol * abs_b + tolerance.scaled * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        over = np.where(allowed > 0, diff / allowed, np.where(diff > 0, np.inf, 0.0))
        rel = np.where(abs_b > 0, diff / abs_b, np.where(diff > 0, np.inf, 0.0))
    over = np.where(nonfinite_bad, np.inf, over)
    mismatched = int(np.count_nonzero(over > 1.0))
    if a.size:
        i_abs = int(np.argmax(diff))
        i_rel = int(np.argmax(rel))
        max_abs, max_rel = float(diff.flat[i_abs]), float(rel.flat[i_rel])
        ratio, bound = float(np.max(over)), float(np.broadcast_to(allowed, a.shape).flat[i_abs])
        abs_index = tuple(int(i) for i in np.unravel_index(i_abs, a.shape))
        rel_index = tuple(int(i) for i in np.unravel_index(i_rel, a.shape))
    else:
        max_abs = max_rel = ratio = bound = 0.0
        abs_index = rel_index = ()
    return LeafDiff(
        stage=stage,
        step=step,
        name=name,
        actual=actual_name,
        expected=expected_name,
        shape=tuple(a.shape),
        dtype=dtype,
        numel=int(a.size),
        mismatched=mismatched,
        nonfinite_mismatched=int(np.count_nonzero(nonfinite_bad)),
        max_abs=max_abs,
        max_abs_index=abs_index,
        max_rel=max_rel,
        max_rel_index=rel_index,
        allowed=bound,
        ratio=ratio,
        tolerance=tolerance,
    )


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "agree": self.agree,
            "worst_ratio": _json_float(self.worst_ratio),
            "settings": self.settings,
            "leaves": [_json_safe(leaf.to_dict()) for leaf in self.leaves],
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def failure_text(self) -> str:
        """Headline plus a torch-style block for every failing leaf."""
        failures = self.failures
        if not failures:
            return message(f"all {len(self.leaves)} comparisons agree")
        pairs = sorted({f"{f.actual} vs {f.expected}" for f in failures})
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items() if k in _HEADLINE)
        head = message(
            f"{len(failures)} of {len(self.leaves)} comparisons disagree "
            f"({'; '.join(pairs)}){f' [{settings}]' if settings else ''}"
        )
        return "\n".join([head] + [f.describe() for f in failures])

    def assert_agree(self) -> None:
        """Raise ``AssertionError`` naming every failing leaf; return None if all agree."""
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
) -> list[LeafDiff]:
    """Compare two flat ``{name: array}`` trees leaf by leaf (names must match).

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
                actual[name], expected[name], tol, stage=stage, step=step, name=name,
                actual_name=actual_name, expected_name=expected_name,
            )
        )
    return out


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return _json_float(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
