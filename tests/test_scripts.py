"""scripts/adamw_default_margins.py runs, and its table says what the port checks say."""

import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "adamw_default_margins.py"


def test_adamw_default_margins_catches_and_names_each_mistake():
    pytest.importorskip("flax.linen")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--seeds", "1", "--steps", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    lines = out.splitlines()
    assert lines[0] == "20,32,32,5, batch 16, 1 steps, 1 seeds"
    assert lines[1].startswith("  right") and "agrees True" in lines[1]
    for line in lines[2:]:  # every mistake caught and named; the right port agrees
        assert "caught 1/1" in line and line.endswith("named 1/1"), line
    assert len(lines) == 7


def test_a_bug_starting_late_is_caught_as_small_as_one_from_step_one():
    # Found in review: the bounds against a backend's own float64 step grew with the
    # step number, so a bug from step T on had to be about T times larger to be caught.
    script = SCRIPT.parent / "late_bug_thresholds.py"
    out = subprocess.run(
        [sys.executable, str(script), "--steps", "4", "--starts", "1", "4"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    first, late = (float(line.rsplit(" ", 1)[1]) for line in out.splitlines())
    assert late <= 2 * first, out
