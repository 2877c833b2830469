"""Whether a comparison fits in memory, checked before any work.

A comparison keeps, for every backend and every step, the parameters after the step
and the gradients before it (and the optimizer's state), so that every pair can be
compared at every stage; the float64 reference keeps the same in float64. A model or
a step count beyond the machine's memory otherwise ends in a traceback from the
allocator, or, where the kernel overcommits memory, in the process being killed
without a word. :func:`check_fits` refuses such a run up front with what it needs
and how to shrink it.

The figure is a floor, not an estimate: only what the comparison must hold at once is
counted (the recorded trajectories, the problem's parameters and input batches), so a
run it refuses cannot fit, and one it admits may still need more.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from equiv._messages import value_error
from equiv.optimizers import OptimizerSpec
from equiv.spec import MLPSpec

# cgroup (container) memory limits, v2 then v1; "max" or a huge number means none.
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def available_memory() -> int | None:
    """Bytes of memory this process may use at most: the machine's physical memory, or
    the container's limit where that is lower; None where neither can be read.

    Example:
      >>> available_memory() is None or available_memory() > 0
      True
    """
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not POSIX (Windows)
        pass
    for path in _CGROUP_LIMITS:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    limits = [limit for limit in limits if limit > 0]
    return min(limits) if limits else None


def comparison_floor(
    spec: MLPSpec,
    *,
    batch_size: int,
    steps: int,
    backends: int,
    reference: bool,
    optimizer: OptimizerSpec | None = None,
) -> int:
    """The fewest bytes a comparison of ``steps`` steps holds at once.

    Per step, each of ``backends`` backends records its gradients and parameters (and
    the optimizer's state, one tree per name in ``optimizer.state_names``) in the
    spec's dtype, the reference the same in float64; the problem holds the initial
    parameters and ``steps`` input batches. Targets, activations and the comparison's
    own work come on top.

    Example:
      >>> comparison_floor(MLPSpec((4, 3, 2)), batch_size=2, steps=1, backends=3, reference=True)
      1044
    """
    itemsize, reference_itemsize = np.dtype(spec.dtype).itemsize, np.dtype(np.float64).itemsize
    parameters = _parameters(spec)
    trees = 2 + (len(optimizer.state_names) if optimizer is not None else 0)
    per_step = parameters * trees * (backends * itemsize + (reference_itemsize if reference else 0))
    inputs = steps * batch_size * spec.sizes[0] * itemsize
    return steps * per_step + parameters * itemsize + inputs


def check_fits(
    spec: MLPSpec,
    *,
    batch_size: int,
    steps: int,
    backends: Sequence[str],
    reference: bool,
    optimizer: OptimizerSpec | None = None,
    available: int | None = None,
) -> None:
    """Raise ``ValueError`` if :func:`comparison_floor` exceeds the memory available
    (:func:`available_memory` unless ``available`` is given; unknown: no check).

    Example:
      >>> check_fits(MLPSpec((4, 3, 2)), batch_size=2, steps=1, backends=["torch"],
      ...            reference=True, available=10**9)
      >>> check_fits(MLPSpec((100_000, 100_000, 2)), batch_size=2, steps=1,
      ...            backends=["torch"], reference=True, available=10**9)
      Traceback (most recent call last):
      ...
      ValueError: [equiv] this comparison needs at least 280 GB at once ...
    """
    available = available_memory() if available is None else available
    if available is None:
        return
    needed = comparison_floor(
        spec,
        batch_size=batch_size,
        steps=steps,
        backends=len(backends),
        reference=reference,
        optimizer=optimizer,
    )
    if needed <= available:
        return
    parameters = _parameters(spec)
    keepers = [f"{len(backends)} backend{'s' if len(backends) != 1 else ''}"] if backends else []
    keepers += ["the float64 reference"] if reference else []
    state = " and the optimizer state" if optimizer is not None and optimizer.state_names else ""
    held = (
        f"{' and '.join(keepers)} keep the gradients and parameters{state} of {parameters:,} "
        f"parameters for each of {steps} step{'s' if steps != 1 else ''}, beside "
        if keepers
        else f"{parameters:,} parameters and "
    )
    raise value_error(
        f"this comparison needs at least {_size(needed)} at once ({held}"
        f"{steps * batch_size:,} input rows of {spec.sizes[0]:,}); this machine has "
        f"{_size(available)}: use fewer steps, fewer backends, a smaller batch or a "
        "smaller model"
    )


def _parameters(spec: MLPSpec) -> int:
    return sum(math.prod(shape) for shape in spec.param_shapes().values())


def _size(nbytes: float) -> str:
    """``nbytes`` in decimal units, three figures.

    >>> _size(1044), _size(96e9), _size(3.6e21)
    ('1.04 kB', '96 GB', '3.6e+09 TB')
    """
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 999.5:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} TB"
