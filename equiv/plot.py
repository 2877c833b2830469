"""A picture of how the differences between backends grow over training steps.

Uses matplotlib's object API (``matplotlib.figure.Figure``), never ``pyplot``: no
global backend or state is touched. matplotlib is an optional dependency
(``pip install equiv[plot]``); it is imported only when a plot is asked for.
"""

from __future__ import annotations

import math
import os
from typing import Any

from equiv._messages import value_error
from equiv.files import atomic_path


def divergence_series(report: Any) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """Per stage, per backend pair: ``[(step, worst |difference|, worst ratio to bound)]``.

    >>> from equiv import compare_backends
    >>> series = divergence_series(compare_backends(steps=2).report)
    >>> [step for step, _, _ in series["grads"]["jax vs torch"]]
    [1, 2]
    """
    worst: dict[tuple[str, str, int], tuple[float, float]] = {}
    for leaf in report.leaves:
        key = (leaf.stage, f"{leaf.actual} vs {leaf.expected}", leaf.step)
        abs_diff, ratio = worst.get(key, (0.0, 0.0))
        worst[key] = (max(abs_diff, leaf.max_abs), max(ratio, leaf.ratio))
    series: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
    for (stage, pair, step), (abs_diff, ratio) in sorted(worst.items(), key=lambda kv: kv[0][2]):
        series.setdefault(stage, {}).setdefault(pair, []).append((step, abs_diff, ratio))
    return series


def log_floor(values: list[float]) -> float:
    """Where a log axis draws an exact 0: a decade below the smallest positive value
    (1e-20 when there is none), not at some fixed tiny number that would squash
    every other point into the top of the panel.

    >>> log_floor([0.0, 3e-7, 1e-5]), log_floor([0.0]), log_floor([0.0, float("inf")])
    (3e-08, 1e-20, 1e-20)
    """
    positive = [v for v in values if 0 < v < math.inf]  # an inf has no place either
    return min(positive) / 10 if positive else 1e-20


def plot_format(path: str) -> str:
    """The image format ``path``'s suffix names (``png`` without one), one that
    matplotlib writes.

    Raises:
      ValueError: a suffix that no matplotlib format has (``.txt``).
      ImportError: matplotlib is not installed.

    >>> plot_format("divergence.svg"), plot_format("divergence")
    ('svg', 'png')
    """
    from matplotlib.backend_bases import FigureCanvasBase  # optional dependency

    suffix = os.path.splitext(os.fspath(path))[1].lower().removeprefix(".")
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in supported:
        raise value_error(
            f"{os.fspath(path)!r}: matplotlib writes no {suffix!r} images; give a file "
            f"ending in one of {', '.join('.' + s for s in sorted(supported))} (.png, say)"
        )
    return suffix or "png"


def plot_divergence(comparison: Any, path: str) -> str:
    """Write an image (PNG, or the format ``path``'s suffix names: ``.svg``, ``.pdf``):
    per stage, the worst absolute difference and the worst ratio to the bound at each
    step, one line per pair of backends. Returns ``path``.

    The file is written to a temporary name in the same folder and renamed, so a
    failed plot leaves nothing half-written.

    Raises:
      ValueError: a suffix that no matplotlib format has (see :func:`plot_format`).
    """
    from matplotlib.figure import Figure  # optional dependency, imported on use
    from matplotlib.ticker import MaxNLocator

    image_format = plot_format(path)

    series = divergence_series(comparison.report)
    stages = list(series)
    figure = Figure(figsize=(4.0 * len(stages), 6.0), layout="constrained")
    axes = figure.subplots(2, len(stages), squeeze=False)
    for column, stage in enumerate(stages):
        top, bottom = axes[0][column], axes[1][column]
        for row, axis in ((1, top), (2, bottom)):
            floor = log_floor([p[row] for points in series[stage].values() for p in points])
            for pair, points in series[stage].items():
                steps = [p[0] for p in points]
                axis.plot(steps, [max(p[row], floor) for p in points], marker="o", label=pair)
            axis.set_yscale("log")
            if any(p[row] == 0 for points in series[stage].values() for p in points):
                axis.annotate(
                    f"exactly 0 drawn at {floor:.0e}",
                    (0.98, 0.08),
                    xycoords="axes fraction",
                    horizontalalignment="right",
                    fontsize="small",
                )
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
        top.set_title(stage)
        top.set_ylabel("worst |difference|")
        bottom.axhline(1.0, color="red", linestyle="--", linewidth=1)
        bottom.set_ylabel("worst ratio to the bound (fails above 1)")
        bottom.set_xlabel("step")
    axes[0][0].legend(fontsize="small")
    with atomic_path(path) as temp:
        figure.savefig(temp, format=image_format, dpi=100)
    return path
