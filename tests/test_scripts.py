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


def _run_script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT.parent / name), *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=300,
    )


def test_the_precision_canary_script_shows_each_setting_and_the_exact_scope_undoing_it():
    torch = pytest.importorskip("torch")
    out = _run_script("precision_canary.py", "--device", "cpu").stdout
    rows = {line[:48].strip(): line[48:].split() for line in out.splitlines()[2:]}
    assert rows["comparison_scope(precision='exact')"] == ["exact", "exact"]
    assert rows["torch allow_tf32 = True, in the exact scope"] == ["exact", "exact"]
    mkldnn = torch.backends.mkldnn.matmul
    if hasattr(mkldnn, "fp32_precision"):
        before = mkldnn.fp32_precision
        mkldnn.fp32_precision = "bf16"
        try:  # does this CPU take oneDNN's bf16 path? (tests/conftest.py's onednn_bf16)
            x = torch.full((256, 256), 1.0 + 2.0**-20)
            lowers = not torch.equal(x @ torch.eye(256), x)
        finally:
            mkldnn.fp32_precision = before
        assert rows["torch mkldnn bf16, in the exact scope"] == ["exact", "exact"]
        # The failing counterpart, where the CPU has the path: outside the scope, and
        # again after it (the scope restores the user's setting).
        lowered = ["NOT", "exact", "exact"] if lowers else ["exact", "exact"]
        assert rows["torch mkldnn bf16"] == lowered
        assert rows["torch mkldnn bf16, after the exact scope"] == lowered


def test_the_gpu_conversion_benchmark_says_what_it_needs():
    out = _run_script("bench_convert_gpu.py", "--sizes", "64,64,8", check=False)
    if out.returncode == 0:  # a GPU machine: the table
        assert "torch_to_jax flax" in out.stdout and "clone() on the device" in out.stdout
    else:
        assert "needs CUDA builds of torch and jax and a GPU" in out.stderr
