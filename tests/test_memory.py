"""A comparison beyond the machine's memory is refused up front, with what it needs.

Before, ``equiv-compare --sizes 1000000000,2`` was killed by the kernel without a word
(this machine overcommits memory), and ``--batch 99999999999999999999`` ended in a
torch traceback: the exit status 2 and one ``[equiv]`` line promised for bad input
did not hold for sizes beyond memory.
"""

from __future__ import annotations

import numpy as np
import pytest

from equiv import MLPSpec, OptimizerSpec, compare_backends, make_problem, memory
from equiv.cli import main
from equiv.memory import available_memory, check_fits, comparison_floor


def nbytes(tree) -> int:
    if tree is None:
        return 0
    if isinstance(tree, dict):
        return sum(nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(nbytes(v) for v in tree)
    return np.asarray(tree).nbytes


@pytest.mark.parametrize(
    "dtype, optimizer",
    [
        ("float32", None),
        ("float32", OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9)),
        ("float64", OptimizerSpec("adam", amsgrad=True)),
    ],
)
def test_the_floor_is_at_most_what_a_comparison_holds(dtype, optimizer):
    spec = MLPSpec((5, 7, 3), dtype=dtype)
    comparison = compare_backends(spec, batch_size=4, steps=3, optimizer=optimizer)
    held = sum(
        nbytes(t.grads) + nbytes(t.params) + nbytes(t.states)
        for t in comparison.trajectories.values()
    )
    held += nbytes({k: v.numpy() for k, v in comparison.problem.params.items()})
    held += sum(x.numpy().nbytes for x, _ in comparison.problem.batches)
    floor = comparison_floor(
        spec, batch_size=4, steps=3, backends=3, reference=True, optimizer=optimizer
    )
    # A floor: a refused run cannot fit. Here it counts exactly the recorded arrays.
    assert 0 < floor <= held
    assert floor == held


def test_a_run_within_memory_passes_and_one_beyond_is_refused_by_what_it_needs():
    spec = MLPSpec((4, 3, 2))
    needed = comparison_floor(spec, batch_size=2, steps=1, backends=3, reference=True)
    kwargs = {"batch_size": 2, "steps": 1, "backends": ["torch", "manual", "jax"]}
    check_fits(spec, reference=True, available=needed, **kwargs)
    with pytest.raises(ValueError) as info:
        check_fits(spec, reference=True, available=needed - 1, **kwargs)
    assert str(info.value) == (
        "[equiv] this comparison needs at least 1.04 kB at once (3 backends and the float64 "
        "reference keep the gradients and parameters of 23 parameters for each of 1 step, "
        "beside 2 input rows of 4); this machine has 1.04 kB: use fewer steps, fewer "
        "backends, a smaller batch or a smaller model"
    )


def test_compare_backends_refuses_before_drawing_or_running(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    phases = []
    with pytest.raises(ValueError, match=r"needs at least .* this machine has 1 kB"):
        compare_backends(MLPSpec((4, 3, 2)), progress=phases.append)
    assert phases == []
    monkeypatch.setattr(memory, "available_memory", lambda: 10**9)
    assert compare_backends(MLPSpec((4, 3, 2))).agree


def test_the_command_line_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda: 8 * 10**9)
    assert main(["--sizes", "1000000000,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("[equiv] this comparison needs at least 96 GB at once")
    assert "this machine has 8 GB" in err and "\n" not in err


def test_a_batch_beyond_torch_sizes_is_refused_not_a_traceback():
    with pytest.raises(ValueError, match="input rows of 4"):
        make_problem(MLPSpec((4, 3, 2)), batch_size=10**20)
    assert main(["--batch", str(10**20)]) == 2


def test_available_memory_takes_the_lower_of_machine_and_container(tmp_path, monkeypatch):
    machine = available_memory()
    assert machine is None or machine > 0
    limit = tmp_path / "memory.max"
    limit.write_text("1000\n")
    monkeypatch.setattr(memory, "_CGROUP_LIMITS", (str(limit),))
    assert available_memory() == 1000
    limit.write_text("max\n")  # no limit
    assert available_memory() == machine
