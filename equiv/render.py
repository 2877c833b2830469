"""The printed report of a comparison: a header, tables of differences, a verdict.

Layout, top to bottom:

* a header: which backends were compared, the configuration (sizes, activation,
  loss, bias, dtype, batch, seed, steps, learning rate) and every setting in
  force (device, precision, JAX x64 and matmul precision, torch's TF32 flags);
* for the last step, one row per leaf (the loss, every gradient, every updated
  parameter) and pair of backends: the greatest absolute and relative
  difference, the bound at the element of greatest absolute difference, the
  ratio to the bound (the greatest over the elements; a leaf passes when it is
  at most 1) and the verdict;
* with several steps, the worst ratio per step, stage and pair, so that a
  divergence that grows over steps is visible, and the full rows of every leaf
  that failed at an earlier step;
* when any leaf fails, the text :meth:`equiv.harness.Comparison.assert_agree` raises
  (:meth:`equiv.compare.Report.failure_text` and what the harness adds);
* one verdict line.

Rich lays the tables out to the width of the terminal. Colour is used only on a
terminal (rich's own detection; ``NO_COLOR`` is honoured): piped output is
plain text whose lines can be searched.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from equiv._messages import message
from equiv.compare import STAGES, LeafDiff, Report
from equiv.tolerance import notation

if TYPE_CHECKING:
    from equiv.harness import Comparison

_REFERENCE = "reference"  # equiv.harness.REFERENCE, without importing torch and JAX here

#: The report's width when none is given and there is no terminal to measure.
DEFAULT_WIDTH = 100

_TORCH_FLAG_PREFIX = "torch.backends."


def render_comparison(
    comparison: Comparison,
    *,
    width: int = DEFAULT_WIDTH,
    color: bool = False,
    seed: int | None = None,
    params: str | None = None,
) -> str:
    """The printed report of ``comparison`` as a string.

    Args:
      comparison: an :class:`equiv.harness.Comparison`.
      width: the number of columns to lay the tables out in.
      color: ANSI colour codes in the text (as on a terminal) or none.
      seed: the seed the problem was drawn from, shown in the header when given.
      params: the file the initial parameters were read from, shown in the header
        when given (the seed then drew the batches only).

    Returns:
      The report, lines separated by ``\\n``.

    Example:
      >>> from equiv import compare_backends
      >>> text = render_comparison(compare_backends(), width=80)
      >>> text.splitlines()[-1].startswith("[equiv] PASS: all 54 comparisons agree")
      True
    """
    console = make_console(io.StringIO(), width=width, color=color)
    print_comparison(comparison, console, seed=seed, params=params)
    return console.file.getvalue()


class _ReportConsole(Console):
    """rich's console, but a closed pipe raises ``BrokenPipeError`` to the caller: rich
    exits with status 1 there, which equiv's command line gives a disagreement (found
    in a user trial: `equiv-compare | head -1` exited 1 with everything agreeing)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def make_console(
    file: Any = None, *, width: int | None = None, color: bool | None = None
) -> Console:
    """A rich console for reports: no markup, emoji or highlighting in our text.

    ``file=None`` writes to ``sys.stdout`` at print time; ``color=None`` lets rich
    decide (colour on a terminal only); ``width=None`` measures the terminal, or
    takes ``COLUMNS``, or 80 columns when piped.
    """
    return _ReportConsole(
        file=file,
        width=width,
        force_terminal=color,
        color_system="standard" if color else (None if color is False else "auto"),
        markup=False,
        emoji=False,
        highlight=False,
        soft_wrap=False,
    )


def print_comparison(
    comparison: Comparison,
    console: Console | None = None,
    *,
    seed: int | None = None,
    params: str | None = None,
) -> None:
    """Print the report of ``comparison`` on ``console`` (default: standard output);
    ``seed`` and ``params`` as :func:`render_comparison` takes them."""
    console = console or make_console()
    report = comparison.report
    last = max((leaf.step for leaf in report.leaves), default=1)
    for line in header_lines(comparison, seed=seed, params=params, width=console.width):
        console.print(line, soft_wrap=True)
    for group in _groups(leaf for leaf in report.leaves if leaf.step == last):
        console.print()
        _print_table(console, leaf_table(group, title=group[0].where))
    if last > 1:
        console.print()
        _print_table(console, summary_table(report.leaves))
        earlier = [leaf for leaf in report.failures if leaf.step != last]
        for group in _groups(earlier):
            console.print()
            title = f"failing at an earlier step: {group[0].where}"
            _print_table(console, leaf_table(group, title=title))
    if any(leaf.ratio_index is not None for leaf in report.leaves):
        console.print()
        console.print(RATIO_NOTE, soft_wrap=True)
    console.print()
    if not report.agree:
        console.print(failure_text(comparison), soft_wrap=True)
        console.print()
    if report.leaves:
        console.print(worst_line(report), soft_wrap=True)
    console.print(
        Text(verdict_line(report), style="bold green" if report.agree else "bold red"),
        soft_wrap=True,
    )


_OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


def header_lines(
    comparison: Comparison,
    *,
    seed: int | None = None,
    params: str | None = None,
    width: int = DEFAULT_WIDTH,
) -> list[str]:
    """The header: backends, configuration and the settings in force, one fact per item."""
    problem = comparison.problem
    spec = problem.spec
    backends = [name for name in comparison.trajectories if name != _REFERENCE]
    title = "equiv: " + ", ".join(backends)
    if _REFERENCE in comparison.trajectories:
        title += "; each also against the float64 hand-derived reference"
    steps = problem.steps
    model = [
        f"sizes {'-'.join(str(s) for s in spec.sizes)}",
        f"{spec.activation} between layers" + _changed(spec, ("negative_slope", "elu_alpha")),
        f"{spec.loss} loss" + _changed(spec, ("label_smoothing", "huber_delta", "smooth_l1_beta")),
        _bias(spec),
        spec.dtype,
    ]
    run = [f"batch {problem.batch_size}"]
    if params is not None:
        run.append(f"initial params from {params}")
    if seed is not None:
        run.append(f"{'batches from ' if params is not None else ''}seed {seed}")
    optimizer = comparison.optimizer
    name = optimizer.name if optimizer is not None else "sgd"
    extras = ""
    if optimizer is not None:
        defaults = type(optimizer)(optimizer.name, learning_rate=optimizer.learning_rate)
        changed = [
            f"{field}={getattr(optimizer, field)}"
            for field in (
                "momentum",
                "dampening",
                "nesterov",
                "weight_decay",
                "betas",
                "eps",
                "amsgrad",
            )
            if getattr(optimizer, field) != getattr(defaults, field)
        ]
        extras = f" ({', '.join(changed)})" if changed else ""
    lr = optimizer.learning_rate if optimizer is not None else comparison.learning_rate
    run.append(
        f"{steps} {_OPTIMIZER_NAMES[name]} step{'s' if steps != 1 else ''} at lr {lr:g}{extras}"
    )
    settings = dict(comparison.report.settings)
    main = [f"{k} {settings.pop(k)}" for k in ("dtype", "device", "precision") if k in settings]
    jax_keys = [k for k in settings if k.startswith("jax_")]
    torch_keys = [k for k in settings if k.startswith("torch_")]
    flag_keys = [k for k in settings if k.startswith(_TORCH_FLAG_PREFIX)]
    kinks, kink_units = settings.pop("kinks", None), settings.pop("kink_units", None) or []
    other_keys = [k for k in settings if k not in {*jax_keys, *torch_keys, *flag_keys}]
    lines = [title]
    lines += _pack("model", model, width)
    lines += _pack("run", run, width)
    lines += _pack("settings", main, width)
    lines += _pack("jax", [f"{k}={settings[k]}" for k in jax_keys], width)
    lines += _pack(
        "torch",
        [f"{k}={settings[k]}" for k in torch_keys]
        + [f"{k[len(_TORCH_FLAG_PREFIX) :]}={settings[k]}" for k in flag_keys],
        width,
    )
    if kinks is not None:
        # Named by the model's kinked activations (found in a user trial: "ReLU" for a
        # leaky ReLU model).
        spec = comparison.problem.spec
        kinked = sorted({a for a in spec.activations if a in _KINKED}) or ["kinked"]
        count = f"{kinks} {'/'.join(kinked)} unit(s) within rounding of 0"
        lines += _pack("kinks", [count, *map(str, kink_units)], width, sep="; ")
    lines += _pack("other", [f"{k}={settings[k]}" for k in other_keys], width)
    lines += _pack("bounds", _bounds(comparison.report.leaves, steps), width, sep="; ")
    shown = [leaf.tolerance.describe() for leaf in comparison.report.leaves]
    lines += _pack("notation", notation(shown), width, sep="; ")
    lines += ["ratio     max over elements of |difference| / bound; a leaf passes at <= 1"]
    return lines


#: Marks a ratio taken at another element than the greatest difference (whose bound
#: the table shows). Found in a user trial: bound times ratio did not give max abs.
RATIO_ELSEWHERE = " †"
RATIO_NOTE = (
    "† the ratio is greatest at another element than the greatest difference, one "
    "with a tighter bound or a non-finite value (the failure text gives its index)"
)

#: Activations with a kink at 0 (ELU has one where its alpha is not 1).
_KINKED = ("relu", "leaky_relu", "elu")


def leaf_table(leaves: Sequence[LeafDiff], *, title: str) -> Table:
    """One row per leaf and pair: max abs, max rel, bound, ratio, verdict.

    The bound is the one at the element of greatest absolute difference; the
    ratio is the greatest over all elements of ``|difference| / bound``, marked
    ``†`` where that is another element (whose bound is tighter, or which is
    non-finite). A non-finite mismatch shows as ``nan`` or ``inf`` in the
    difference columns.
    """
    table = _table(title)
    table.add_column("leaf", no_wrap=True)
    table.add_column("pair")  # on a narrow terminal the pair wraps, nothing is cut
    for name in ("max abs", "max rel", "bound", "ratio"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    previous = None
    for leaf in _ordered(leaves):
        if previous is not None and leaf.name != previous:
            table.add_section()
        previous = leaf.name
        nonfinite = leaf.nonfinite_difference
        table.add_row(
            leaf.name,
            _pair(leaf),
            format_number(leaf.max_abs if nonfinite is None else nonfinite),
            format_number(leaf.max_rel if nonfinite is None else nonfinite),
            format_number(leaf.allowed),
            format_number(leaf.ratio) + (RATIO_ELSEWHERE if leaf.ratio_index is not None else ""),
            Text("ok", style="green") if leaf.passed else Text("FAIL", style="bold red"),
        )
    return table


def summary_table(leaves: Iterable[LeafDiff]) -> Table:
    """The worst ratio to the bound per step, stage and pair ("FAIL" above 1)."""
    worst: dict[tuple[int, str, str], float] = {}
    pairs: list[str] = []
    for leaf in leaves:
        pair = _pair(leaf)
        if pair not in pairs:
            pairs.append(pair)
        key = (leaf.step, leaf.stage, pair)
        worst[key] = max(worst.get(key, 0.0), leaf.ratio)
    table = _table("worst ratio to the bound per step, stage and pair (FAIL above 1)")
    table.add_column("step", justify="right")
    table.add_column("stage")
    for pair in pairs:
        # As wide as the longest word of the header, so "reference" is never cut.
        table.add_column(pair, justify="right", min_width=max(len(w) for w in pair.split()))
    steps = sorted({step for step, _, _ in worst})
    stages = [*STAGES, *sorted({stage for _, stage, _ in worst} - set(STAGES))]
    for step in steps:
        for stage in stages:
            if not any((step, stage, pair) in worst for pair in pairs):
                continue
            cells = []
            for pair in pairs:
                ratio = worst.get((step, stage, pair))
                if ratio is None:
                    cells.append(Text(""))
                elif ratio <= 1.0:
                    cells.append(Text(format_number(ratio)))
                else:
                    cells.append(Text(f"{format_number(ratio)} FAIL", style="bold red"))
            table.add_row(str(step), stage, *cells)
        if step != steps[-1]:
            table.add_section()
    return table


def failure_text(comparison: Comparison) -> str:
    """What :meth:`~equiv.harness.Comparison.assert_agree` raises: the report's
    failure text (a torch-style block per failing leaf) and whatever the harness
    adds to it; ``""`` when all agree."""
    try:
        comparison.assert_agree()
    except AssertionError as error:
        return str(error)
    return ""


def verdict_line(report: Report) -> str:
    """``[equiv] PASS: all N comparisons agree`` or ``[equiv] FAIL: k of N comparisons disagree``.

    >>> from equiv.compare import Report
    >>> verdict_line(Report([]))
    '[equiv] PASS: all 0 comparisons agree'
    """
    n = len(report.leaves)
    if report.agree:
        return message(f"PASS: all {n} comparisons agree")
    return message(f"FAIL: {len(report.failures)} of {n} comparisons disagree")


def worst_line(report: Report) -> str:
    """The leaf nearest its bound (the first of equals): where, what, which pair."""
    worst = max(report.leaves, key=lambda leaf: leaf.ratio)
    ratio = format_number(worst.ratio)
    return f"worst     ratio {ratio}: {worst.where}, {worst.name}, {_pair(worst)}"


def format_number(x: float) -> str:
    """Three significant digits; ``0`` for zero, ``inf``/``nan`` spelled out.

    >>> [format_number(x) for x in (0.0, 1.23456e-7, 0.5, float("inf"))]
    ['0', '1.23e-07', '0.5', 'inf']
    """
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def _pair(leaf: LeafDiff) -> str:
    return f"{leaf.actual} vs {leaf.expected}"


def _ordered(leaves: Sequence[LeafDiff]) -> list[LeafDiff]:
    """By step, stage, then leaf (in first-seen order), then pair: a leaf's pairs together."""
    names: dict[str, int] = {}
    pairs: dict[str, int] = {}
    for leaf in leaves:
        names.setdefault(leaf.name, len(names))
        pairs.setdefault(_pair(leaf), len(pairs))
    stage_order = {stage: i for i, stage in enumerate(STAGES)}

    def key(leaf: LeafDiff) -> tuple[int, int, int, int]:
        stage = stage_order.get(leaf.stage, len(STAGES))
        return leaf.step, stage, names[leaf.name], pairs[_pair(leaf)]

    return sorted(leaves, key=key)


def _bounds(leaves: Sequence[LeafDiff], step: int) -> list[str]:
    """Per stage at ``step``, the bound's derivation (the numbers are in the tables)."""
    forms: dict[str, list[str]] = {}
    for leaf in leaves:
        if leaf.step == step:
            seen = forms.setdefault(leaf.stage, [])
            if leaf.tolerance.describe() not in seen:
                seen.append(leaf.tolerance.describe())
    if len({form for seen in forms.values() for form in seen}) == 1:
        return [next(iter(forms.values()))[0]]
    return [
        f"{stage}: {seen[0]}" + (f" (1 of {len(seen)})" if len(seen) > 1 else "")
        for stage, seen in forms.items()
    ]


def _print_table(console: Console, table: Table) -> None:
    # Rich fits a table to the console by cutting cells with "…"; a number or a
    # name cut short is worse than a line the terminal wraps, so below the
    # table's least width it is printed at that width, uncut.
    least = Measurement.get(console, console.options.update_width(10_000), table).minimum
    if least <= console.width:
        console.print(table)
        return
    width = console.width
    console.width = least
    try:
        console.print(table, crop=False)
    finally:
        console.width = width


def _groups(leaves: Iterable[LeafDiff]) -> list[list[LeafDiff]]:
    """Leaves grouped by (step, stage), in step and stage order."""
    groups: dict[tuple[int, str], list[LeafDiff]] = {}
    for leaf in _ordered(list(leaves)):
        groups.setdefault((leaf.step, leaf.stage), []).append(leaf)
    return list(groups.values())


def _table(title: str) -> Table:
    # No edges and no vertical rules: the default report fits 80 columns, and
    # piped output is plain columns of text.
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )


def _pack(label: str, items: list[str], width: int, sep: str = ", ") -> list[str]:
    """``label`` and the items, several to a line, each line at most ``width`` when it can be."""
    if not items:
        return []
    indent = " " * 10
    lines, current = [], f"{label:<9} {items[0]}"
    for item in items[1:]:
        candidate = current + sep + item
        # Room for the separator that ends the line if another item follows.
        if len(candidate + sep.rstrip()) <= width:
            current = candidate
        else:
            lines.append(current + sep.rstrip())
            current = indent + item
    lines.append(current)
    # An item longer than a line on its own is folded at spaces, deeper indented.
    return [part for line in lines for part in _fold(line, width, indent + "  ")]


def _fold(line: str, width: int, indent: str) -> list[str]:
    """``line`` cut at spaces into pieces of at most ``width`` (where a word allows),
    the continuations indented by ``indent``."""
    if len(line) <= width:
        return [line]
    return textwrap.wrap(
        line,
        width,
        subsequent_indent=indent,
        initial_indent="",
        break_long_words=False,
        break_on_hyphens=False,
        drop_whitespace=True,
    ) or [line]


def _changed(spec, fields: tuple[str, ...]) -> str:
    """The spec's ``fields`` set away from their defaults, as ``" (label_smoothing=0.1)"``
    (found in a user trial: a report of a smoothed loss did not say so).

    >>> from equiv import MLPSpec
    >>> _changed(MLPSpec((2, 2), loss="cross_entropy", label_smoothing=0.1), ("label_smoothing",))
    ' (label_smoothing=0.1)'
    """
    defaults = type(spec)(spec.sizes)
    changed = [
        f"{f}={getattr(spec, f):g}" for f in fields if getattr(spec, f) != getattr(defaults, f)
    ]
    return f" ({', '.join(changed)})" if changed else ""


def _bias(spec) -> str:
    """The model's bias in the header: ``bias`` or ``no bias`` on every layer, else
    which layers have one.

    >>> from equiv import MLPSpec
    >>> _bias(MLPSpec((4, 3, 2))), _bias(MLPSpec((4, 8, 8, 2), bias=(True, False, True)))
    ('bias', 'bias on fc1 and fc3 only')
    """
    if isinstance(spec.bias, bool):
        return "bias" if spec.bias else "no bias"
    return spec.describe_bias()
