"""scripts/random_sweep.py: its cases run, and failures before the analysis limit count."""

import importlib.util
import pathlib

import numpy as np

from equiv.harness import compare_trajectories

PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "random_sweep.py"
spec = importlib.util.spec_from_file_location("random_sweep", PATH)
random_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(random_sweep)


def _case() -> dict:
    case = random_sweep.draw(np.random.default_rng(0))
    fixed = {"sizes": (3, 4, 2), "activation": "tanh", "loss": "mse", "steps": 2, "lr": 0.1}
    return {**case, **fixed, "opt": 1}


def test_a_correct_case_has_no_early_failure():
    comparison = random_sweep.run(_case())
    early, worst = random_sweep.early_failures(comparison)
    assert early == [] and 0.0 < worst <= 1.0


def test_a_broken_step_is_an_early_failure():
    # The twin: JAX's gradient at step 1 off by 1e-3 relative is counted.
    comparison = random_sweep.run(_case())
    runs = dict(comparison.trajectories)
    runs["jax"].grads[0]["fc1.weight"] *= 1.001
    report = compare_trajectories(comparison.problem, runs, optimizer=comparison.optimizer)
    comparison.report = report
    early, _ = random_sweep.early_failures(comparison)
    assert any((d.stage, d.step, d.name) == ("grads", 1, "fc1.weight") for d in early)


def test_a_refused_configuration_is_skipped():
    # Two activations for one hidden layer: equiv refuses, the sweep goes on.
    assert random_sweep.run({**_case(), "activation": ["tanh", "relu"]}) is None
