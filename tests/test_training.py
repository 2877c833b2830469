"""Breadth (issue 4): every activation, loss and optimizer in all three backends,
2-3 steps, float32 and float64, with the optimizer state compared leaf by leaf.

Each case also has a failing counterpart at the bottom: a state perturbed by more
than its bound is reported under the stage ``"state"``. Compiled JAX steps are
shared between cases (``equiv.jax_mlp.make_train_step`` is cached per spec and
optimizer).
"""

from __future__ import annotations

import pytest

from equiv.harness import REFERENCE, compare_backends, compare_trajectories
from equiv.optimizers import OptimizerSpec
from equiv.spec import MLPSpec

pytestmark = pytest.mark.equivalence

SIZES = (4, 5, 3)
SGD = OptimizerSpec("sgd", learning_rate=0.1)
MOMENTUM = OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
NESTEROV = OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, nesterov=True)
ADAM = OptimizerSpec("adam", learning_rate=1e-2)
ADAM_L2 = OptimizerSpec("adam", learning_rate=1e-2, weight_decay=0.1)
ADAMW = OptimizerSpec("adamw", learning_rate=1e-2)
AMSGRAD = OptimizerSpec("adamw", learning_rate=1e-2, amsgrad=True, betas=(0.8, 0.99))

#: (id, MLPSpec fields, optimizer, steps): every activation, loss and optimizer at
#: least once; each runs in float32 and float64.
CASES = [
    ("relu-mse-sgd", dict(activation="relu"), SGD, 3),
    (
        "leaky-mse_sum-momentum",
        dict(activation="leaky_relu", negative_slope=0.2, loss="mse_sum"),
        MOMENTUM,
        3,
    ),
    (
        "elu-huber-nesterov",
        dict(activation="elu", elu_alpha=0.5, loss="huber", huber_delta=0.5),
        NESTEROV,
        2,
    ),
    ("tanh-ce-adam", dict(activation="tanh", loss="cross_entropy", label_smoothing=0.1), ADAM, 3),
    ("sigmoid-ceprobs-adam_l2", dict(activation="sigmoid", loss="cross_entropy_probs"), ADAM_L2, 2),
    ("gelu-bce-adamw", dict(activation="gelu", loss="bce_with_logits"), ADAMW, 3),
    (
        "gelu_tanh-smoothl1-amsgrad",
        dict(activation="gelu_tanh", loss="smooth_l1", smooth_l1_beta=0.5),
        AMSGRAD,
        3,
    ),
    ("silu-ce-momentum", dict(activation="silu", loss="cross_entropy"), MOMENTUM, 2),
    (
        "per_layer-mse-adam",
        dict(sizes=(4, 5, 5, 3), activation=("identity", "leaky_relu")),
        ADAM,
        2,
    ),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("fields", "optimizer", "steps"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_backends_agree_over_steps(fields, optimizer, steps, dtype, equiv_seed):
    spec = MLPSpec(**{"sizes": SIZES, **fields, "dtype": dtype})
    comparison = compare_backends(
        spec, batch_size=3, steps=steps, seed=equiv_seed, optimizer=optimizer
    )
    comparison.assert_agree()
    stages = {d.stage for d in comparison.report.leaves}
    assert stages >= {"loss", "grads", "params"}
    assert ("state" in stages) == bool(optimizer.state_names)
    assert {d.step for d in comparison.report.leaves} == set(range(1, steps + 1))
    assert comparison.learning_rate == optimizer.learning_rate


def test_labels_stay_integers():
    spec = MLPSpec(SIZES, loss="cross_entropy")
    comparison = compare_backends(spec, batch_size=3, steps=1, optimizer=ADAM)
    assert not comparison.problem.batches[0][1].is_floating_point()
    comparison.assert_agree()


def _other(diff, name: str) -> str:
    """The side of a row that is not ``name``."""
    return diff.expected if diff.actual == name else diff.actual


def test_state_bound_grows_with_steps_between_trajectories_only():
    # Between two backends' trajectories what each step left carries on: the bound grows.
    # A backend held to the float64 step from its own parameters and state carries
    # nothing: its bound is one step's (found in review: sized for `step` steps, a bug
    # from step 10 on had to be 40 times larger than at step 1 to be caught).
    spec = MLPSpec(SIZES, activation="tanh")
    comparison = compare_backends(spec, batch_size=3, steps=3, optimizer=MOMENTUM)
    allowed = {}
    for d in comparison.report.leaves:
        if (
            d.stage == "state"
            and d.name == "momentum_buffer.fc1.weight"
            and "torch" in (d.actual, d.expected)
        ):
            allowed[_other(d, "torch"), d.step] = d.tolerance.atol
    assert allowed["jax", 1] < allowed["jax", 2] < allowed["jax", 3]
    assert allowed[REFERENCE, 3] < allowed["jax", 3] / 2


def test_sgd_with_weight_decay_alone_gets_one_steps_bound_against_its_own_step():
    # Found in review: SGD with a weight decay keeps no state, and the one-step bound was
    # keyed on a state: a learning rate off from step 10 had to be 56 times larger.
    spec = MLPSpec(SIZES, activation="tanh")
    decay = OptimizerSpec("sgd", learning_rate=0.1, weight_decay=0.01)
    comparison = compare_backends(spec, batch_size=3, steps=4, optimizer=decay)
    allowed = {}
    for d in comparison.report.leaves:
        if d.stage == "params" and d.name == "fc1.weight" and "torch" in (d.actual, d.expected):
            allowed[_other(d, "torch"), d.step] = d.tolerance.atol
    assert allowed[REFERENCE, 4] < 2 * allowed[REFERENCE, 1], allowed
    assert allowed["jax", 4] > 2 * allowed["jax", 1]  # the twin: between trajectories it grows


def test_perturbed_state_fails():
    spec = MLPSpec(SIZES, activation="tanh")
    comparison = compare_backends(spec, batch_size=3, steps=2, optimizer=ADAM)
    runs = comparison.trajectories
    state = runs["jax"].states[1]["exp_avg"]
    state["fc2.bias"] = state["fc2.bias"] + 1e-4
    report = compare_trajectories(
        comparison.problem, runs, learning_rate=ADAM.learning_rate, optimizer=ADAM
    )
    failing = {(d.stage, d.step, d.name, d.actual) for d in report.failures}
    assert ("state", 2, "exp_avg.fc2.bias", "jax") in failing
    assert {d.stage for d in report.failures} == {"state"}
    assert "exp_avg.fc2.bias" in report.failure_text()


def test_kinks_under_other_optimizers_need_propagation():
    comparison = compare_backends(MLPSpec(SIZES), batch_size=3, steps=2, optimizer=ADAM)
    assert isinstance(comparison.report.settings["kinks"], int)
    off = compare_trajectories(
        comparison.problem,
        comparison.trajectories,
        learning_rate=ADAM.learning_rate,
        optimizer=ADAM,
        propagate=False,
    )
    assert off.settings["kinks"].startswith("off:")
    assert isinstance(compare_backends(MLPSpec(SIZES), batch_size=3).report.settings["kinks"], int)


def test_optimizer_learning_rate_wins():
    comparison = compare_backends(MLPSpec(SIZES), learning_rate=0.5, optimizer=SGD)
    assert comparison.learning_rate == 0.1
    assert comparison.to_dict()["config"]["optimizer"]["name"] == "sgd"


# Adam at learning rate 0.1 in float32: before propagation was accounted for, this
# case was flagged (loss at step 2, jax vs reference, 1.77 times the bound).
PROPAGATION_CASE = dict(
    spec=MLPSpec((3, 32, 32, 2)),
    batch_size=17,
    seed=0,
    steps=3,
    optimizer=OptimizerSpec("adam", learning_rate=0.1),
)


def test_propagated_differences_are_allowed_and_measured():
    comparison = compare_backends(
        PROPAGATION_CASE["spec"], **{k: v for k, v in PROPAGATION_CASE.items() if k != "spec"}
    )
    comparison.assert_agree()
    # Without the computed propagation the same trajectories are flagged: the
    # allowance is needed, and it is what makes this pass.
    bare = compare_trajectories(
        comparison.problem,
        comparison.trajectories,
        learning_rate=0.1,
        optimizer=PROPAGATION_CASE["optimizer"],
        propagate=False,
    )
    assert not bare.agree
    assert {d.step for d in bare.failures} >= {2}


def test_propagation_does_not_hide_a_bug_at_a_later_step():
    comparison = compare_backends(
        PROPAGATION_CASE["spec"], **{k: v for k, v in PROPAGATION_CASE.items() if k != "spec"}
    )
    runs = comparison.trajectories
    runs["jax"].grads[1]["fc2.weight"] = runs["jax"].grads[1]["fc2.weight"] * (1 + 1e-3)
    report = compare_trajectories(
        comparison.problem,
        runs,
        learning_rate=0.1,
        optimizer=PROPAGATION_CASE["optimizer"],
    )
    failing = {
        (d.stage, d.step, d.name) for d in report.failures if "jax" in (d.actual, d.expected)
    }
    assert ("grads", 2, "fc2.weight") in failing
