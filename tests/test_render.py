"""The printed report: every leaf and pair, faithful numbers, readable when piped.

Comparisons are computed once per module; the failing one is an honest bug, a
torch run whose SGD step uses a learning rate 1e-3 too large, joined to the
other backends through :func:`equiv.harness.compare_trajectories`.
"""

from __future__ import annotations

import io
import re

import pytest

from equiv.harness import (
    BACKENDS,
    REFERENCE,
    RUNNERS,
    Comparison,
    compare_backends,
    compare_trajectories,
)
from equiv.problem import make_problem
from equiv.render import (
    RATIO_NOTE,
    _pack,
    _pair,
    format_number,
    make_console,
    print_comparison,
    render_comparison,
    verdict_line,
)
from equiv.spec import MLPSpec

LEAVES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
PAIRS = (
    "manual vs torch",
    "jax vs torch",
    "jax vs manual",
    "torch vs reference",
    "manual vs reference",
    "jax vs reference",
)
ANSI = re.compile(r"\x1b\[")
LR = 0.1


def _with_wrong_lr(steps: int) -> Comparison:
    """Every backend at lr 0.1 except torch at 0.1001: a wrong-learning-rate bug."""
    problem = make_problem(MLPSpec((4, 3, 2)), batch_size=2, seed=0, steps=steps)
    trajectories = {
        name: RUNNERS[name](problem, LR * (1 + 1e-3) if name == "torch" else LR, "cpu")
        for name in (*BACKENDS, REFERENCE)
    }
    return Comparison(problem, LR, trajectories, compare_trajectories(problem, trajectories))


@pytest.fixture(scope="module")
def passing() -> Comparison:
    return compare_backends()


@pytest.fixture(scope="module")
def passing3() -> Comparison:
    return compare_backends(steps=3)


@pytest.fixture(scope="module")
def failing2() -> Comparison:
    comparison = _with_wrong_lr(steps=2)
    assert not comparison.agree  # the bug is seen by the library, not only by the renderer
    return comparison


def _rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def _has_row(text: str, cells: list[str]) -> bool:
    return cells in _rows(text)


def test_every_leaf_and_pair_has_a_row_with_its_numbers(passing):
    text = render_comparison(passing, width=80)
    for leaf in passing.report.leaves:
        pair = f"{leaf.actual} vs {leaf.expected}".split()
        numbers = [format_number(x) for x in (leaf.max_abs, leaf.max_rel, leaf.allowed, leaf.ratio)]
        assert _has_row(text, [leaf.name, *pair, *numbers, "ok"]), (leaf.name, pair)
    # leaf, a, vs, b, four numbers, verdict
    rows = [row for row in _rows(text) if len(row) == 9 and row[-1] in ("ok", "FAIL")]
    assert len(rows) == len(passing.report.leaves) == 9 * len(PAIRS)
    for name in (*LEAVES, "loss"):
        expected = len(PAIRS) if name == "loss" else 2 * len(PAIRS)  # grads and params
        assert sum(row[0] == name for row in rows) == expected
    for pair in PAIRS:
        assert sum(" ".join(row[1:4]) == pair for row in rows) == 9
    titles = [line.strip() for line in text.splitlines()]
    for title in ("loss at step 1", "grads at step 1", "params after step 1"):
        assert title in titles


def test_header_shows_configuration_and_every_setting(passing):
    text = render_comparison(passing, width=80, seed=0)
    lines = text.splitlines()
    assert (
        lines[0]
        == "equiv: torch, manual, jax; each also against the float64 hand-derived reference"
    )
    assert lines[1] == "model     sizes 4-3-2, relu between layers, mse loss, bias, float32"
    assert lines[2] == "run       batch 2, seed 0, 1 SGD step at lr 0.1"
    assert lines[3] == "settings  dtype float32, device cpu, precision exact"
    header = "\n".join(lines[: lines.index("")])
    for key, value in passing.report.settings.items():
        if key == "kink_units":
            assert all(str(unit) in header for unit in value)
            continue
        short = key.removeprefix("torch.backends.")
        shown = (f"{short}={value}", f"{key} {value}", f"{key}     {value} ")
        assert any(text in header for text in shown), key
    assert "jax_enable_x64=False" in header
    assert "jax_default_matmul_precision=highest" in header
    assert any(line.startswith("bounds    ") and "8·√4·(u₁+u₂)·1·max|x|" in line for line in lines)


def test_passing_report_ends_with_the_verdict(passing):
    lines = render_comparison(passing, width=80).splitlines()
    assert lines[-1] == "[equiv] PASS: all 54 comparisons agree"
    assert lines[-2].startswith("worst     ratio ")
    assert "FAIL" not in "\n".join(lines)


def test_failing_report_marks_rows_and_includes_failure_text(failing2):
    text = render_comparison(failing2, width=80)
    lines = text.splitlines()
    report = failing2.report
    assert (
        lines[-1]
        == f"[equiv] FAIL: {len(report.failures)} of {len(report.leaves)} comparisons disagree"
    )
    for line in report.failure_text().splitlines():
        assert line in lines
    last = [leaf for leaf in report.failures if leaf.step == 2]
    assert last, "the wrong learning rate must show at the last step"
    for leaf in last:
        pair = f"{leaf.actual} vs {leaf.expected}".split()
        assert _has_row(
            text,
            [
                leaf.name,
                *pair,
                *(format_number(x) for x in (leaf.max_abs, leaf.max_rel, leaf.allowed, leaf.ratio)),
                "FAIL",
            ],
        )
    # torch is the odd one out: every failing pair involves it
    assert all("torch" in (leaf.actual, leaf.expected) for leaf in report.failures)


def test_failures_of_earlier_steps_get_their_full_rows(failing2):
    text = render_comparison(failing2, width=80)
    earlier = [leaf for leaf in failing2.report.failures if leaf.step == 1]
    assert earlier and {leaf.stage for leaf in earlier} == {"params"}
    assert "failing at an earlier step: params after step 1" in [
        line.strip() for line in text.splitlines()
    ]
    block = text.split("failing at an earlier step: params after step 1", 1)[1]
    for leaf in earlier:
        pair = f"{leaf.actual} vs {leaf.expected}".split()
        assert _has_row(
            block,
            [
                leaf.name,
                *pair,
                *(format_number(x) for x in (leaf.max_abs, leaf.max_rel, leaf.allowed, leaf.ratio)),
                "FAIL",
            ],
        )


def test_summary_has_the_worst_ratio_per_step_stage_and_pair(passing3):
    text = render_comparison(passing3, width=80)
    block = text.split("worst ratio to the bound per step, stage and pair", 1)[1]
    rows = {
        (r[0], r[1]): r[2:] for r in _rows(block) if len(r) == 2 + len(PAIRS) and r[0].isdigit()
    }
    assert sorted(rows) == sorted(
        (str(s), st) for s in (1, 2, 3) for st in ("loss", "grads", "params")
    )
    for (step, stage), cells in rows.items():
        for pair, cell in zip(PAIRS, cells, strict=True):
            a, b = pair.split(" vs ")
            worst = max(
                leaf.ratio
                for leaf in passing3.report.leaves
                if (leaf.step, leaf.stage, leaf.actual, leaf.expected) == (int(step), stage, a, b)
            )
            assert cell == format_number(worst)
    assert "failing at an earlier step" not in text
    titles = [line.strip() for line in text.splitlines()]
    assert "params after step 3" in titles and "params after step 2" not in titles


def test_summary_marks_failing_cells(failing2):
    block = render_comparison(failing2, width=80).split("worst ratio to the bound per step", 1)[1]
    assert re.search(r"^\s+1\s+params\s+\S+ FAIL", block, re.M)
    grads1 = re.search(r"^\s+1\s+grads\s.*$", block, re.M).group(0)
    assert "FAIL" not in grads1  # the step-1 gradients come before the wrong update


@pytest.mark.parametrize("width", [80, 120])
def test_default_report_fits_the_width(passing3, width):
    for line in render_comparison(passing3, width=width).splitlines():
        if not line.startswith("[equiv]") and not line.startswith("worst "):
            assert len(line.rstrip()) <= width, line


@pytest.mark.parametrize("width", range(60, 121))
def test_header_items_are_split_only_between_items(width):
    # Found in review: a line that just fitted its items lost its last one to the
    # comma after it ("cudnn.conv.fp32_precision=ieee," on a line of its own, indented
    # as a fold), at 90 columns.
    items = [f"flag{i}.fp32_precision=ieee" for i in range(12)]
    lines = _pack("torch", items, width)
    assert all(len(line) <= width for line in lines)
    assert not any(line.startswith(" " * 11) for line in lines)  # no folded continuation
    assert " ".join(lines).replace(",", " ").split()[1:] == items


def test_narrow_terminal_cuts_no_cell(passing):
    text = render_comparison(passing, width=40)
    assert "…" not in text
    for name in LEAVES:
        assert name in text


@pytest.mark.parametrize(("color", "has_codes"), [(False, False), (True, True)])
def test_colour_only_when_asked(failing2, color, has_codes):
    assert bool(ANSI.search(render_comparison(failing2, width=80, color=color))) is has_codes


def test_piped_standard_output_has_no_colour(failing2, capsys, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    print_comparison(failing2)
    out = capsys.readouterr().out
    assert "FAIL" in out and not ANSI.search(out)
    table_lines = [line for line in out.splitlines() if "─" in line]
    assert table_lines and all(len(line.rstrip()) <= 80 for line in table_lines)


def test_text_is_not_read_as_rich_markup(passing):
    console = make_console(io.StringIO(), width=80, color=False)
    console.print("[equiv] [bold]x[/bold]")
    assert console.file.getvalue() == "[equiv] [bold]x[/bold]\n"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0"),
        (1.23456e-7, "1.23e-07"),
        (0.5, "0.5"),
        (float("inf"), "inf"),
        (float("nan"), "nan"),
    ],
)
def test_format_number(value, text):
    assert format_number(value) == text


def test_verdict_line_pass_and_fail(passing, failing2):
    assert verdict_line(passing.report) == "[equiv] PASS: all 54 comparisons agree"
    n, k = len(failing2.report.leaves), len(failing2.report.failures)
    assert verdict_line(failing2.report) == f"[equiv] FAIL: {k} of {n} comparisons disagree"


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_the_kinks_line_names_the_models_kinked_activation(activation):
    # Found in a user trial: "kinks 0 ReLU unit(s)" for a leaky ReLU model.
    from equiv import compare_backends
    from equiv.render import header_lines

    comparison = compare_backends(MLPSpec((4, 8, 2), activation=activation), steps=1)
    (line,) = [line for line in header_lines(comparison) if line.startswith("kinks")]
    assert line.split()[2] == f"{activation}"


def _halved_mse_port() -> Comparison:
    """A Flax-layout port with optax's ½ in its MSE: fails everywhere after step 1, with
    ratios greatest at other elements than the greatest differences (tighter bounds)."""
    import jax
    import jax.numpy as jnp
    import torch

    from equiv import TorchMLP, check_jax_port

    def loss_fn(params, x, y):
        h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
        out = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
        return jnp.mean(0.5 * (out - y) ** 2)

    torch.manual_seed(0)
    model = TorchMLP(MLPSpec((4, 3, 2)))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    return check_jax_port(model, loss_fn, x, y, layout="flax", learning_rate=0.1, steps=2)


def test_a_ratio_taken_elsewhere_is_marked(passing):
    # Found in a user trial: the table's bound is the greatest difference's, the ratio
    # the greatest over all elements, so bound times ratio did not give max abs.
    comparison = _halved_mse_port()
    text = render_comparison(comparison, width=120)
    marked = {
        leaf.name + " " + _pair(leaf)
        for leaf in comparison.report.leaves
        if leaf.step == 2 and leaf.ratio_index is not None
    }
    assert marked, "the port should have a ratio away from its greatest difference"
    rows = [row for row in _rows(text) if row[-2:] in (["†", "FAIL"], ["†", "ok"])]
    assert {" ".join(row[:4]) for row in rows} == marked
    assert RATIO_NOTE in text.replace("\n", " ")
    # The twin: no ratio taken elsewhere, no mark and no note.
    plain = render_comparison(passing, width=120)
    assert "†" not in plain


def test_the_bounds_symbols_are_explained(passing):
    # Found in a user trial: u₆₄ was unexplained and max|x| read as the model's input.
    lines = render_comparison(passing, width=100).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("notation  "))
    block = " ".join(lines[at : at + 4])
    assert "u₁, u₂: unit roundoff of each side's dtype" in block
    assert "max|x|: the leaf's largest magnitude, not the input" in block
    assert "u₆₄" not in block  # one step: no pair is held to its own float64 step
    # The twin: the user's own rtol/atol have no symbols, and no notation line.
    fixed = compare_backends(rtol=1e-5, atol=1e-6)
    assert not any(line.startswith("notation") for line in render_comparison(fixed).splitlines())
