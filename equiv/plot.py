"""A picture of how the differences between backends grow over training steps.

Uses matplotlib's object API (``matplotlib.figure.Figure``), never ``pyplot``: no
global backend or state is touched. matplotlib is an optional dependency
(``pip install equiv[plot]``); it is imported only when a plot is asked for.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any


def divergence_series(report: Any) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """Per stage, per backend pair: ``[(step, worst |difference|, worst ratio to bound)]``.

    >>> from equiv import compare_backends
    >>> series = divergence_series(compare_backends(steps=2).report)
    >>> [step for step, _, _ in series["grads"]["torch vs jax"]]
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


def plot_divergence(comparison: Any, path: str) -> str:
    """Write a PNG: per stage, the worst absolute difference and the worst ratio to
    the bound at each step, one line per pair of backends. Returns ``path``.

    The file is written to a temporary name in the same folder and renamed, so a
    failed plot leaves nothing half-written.
    """
    from matplotlib.figure import Figure  # optional dependency, imported on use

    series = divergence_series(comparison.report)
    stages = list(series)
    figure = Figure(figsize=(4.0 * len(stages), 6.0), layout="constrained")
    axes = figure.subplots(2, len(stages), squeeze=False)
    for column, stage in enumerate(stages):
        top, bottom = axes[0][column], axes[1][column]
        for pair, points in series[stage].items():
            steps = [p[0] for p in points]
            # A difference of exactly 0 has no place on a log axis: draw it at the floor.
            top.plot(steps, [max(p[1], 1e-300) for p in points], marker="o", label=pair)
            bottom.plot(steps, [max(p[2], 1e-300) for p in points], marker="o", label=pair)
        top.set_title(stage)
        top.set_yscale("log")
        top.set_ylabel("worst |difference|")
        bottom.set_yscale("log")
        bottom.axhline(1.0, color="red", linestyle="--", linewidth=1)
        bottom.set_ylabel("worst ratio to the bound (fails above 1)")
        bottom.set_xlabel("step")
    axes[0][0].legend(fontsize="small")
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".equiv-plot-", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(temp, format="png", dpi=100)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return path
