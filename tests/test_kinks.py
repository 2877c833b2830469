"""Kinks: a ReLU unit within rounding distance of 0 may flip between backends.

A constructed case puts one pre-activation at about 1e-9: a backend that takes
the other side of that kink fails a plain comparison, passes the kink-aware one
(reported as ambiguous), and a real bug elsewhere in the same run still fails.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from equiv import MLPSpec, Trajectory, compare_trajectories, make_problem, manual
from equiv.harness import REFERENCE, RUNNERS
from equiv.kinks import analyse_kinks, preactivation_bounds
from equiv.optimizers import OptimizerSpec, manual_init, manual_update

SPEC = MLPSpec((3, 4, 2))
LR = 0.1
EXAMPLE, UNIT = 1, 2  # the unit put on the kink


def _kinked_problem(seed: int):
    """A problem whose unit (EXAMPLE, UNIT) of fc1 has a float64 pre-activation ~1e-9."""
    problem = make_problem(SPEC, batch_size=4, seed=seed)
    params = {k: v.clone() for k, v in problem.params.items()}
    ((x, _),) = problem.batches
    s = float(x[EXAMPLE].double() @ params["fc1.weight"][UNIT].double())
    params["fc1.bias"][UNIT] = -s  # rounded to float32: z = s + b is a rounding residual
    # make the unit matter: a large weight from it to the output
    params["fc2.weight"][:, UNIT] = torch.tensor([1.5, -1.0])
    return dataclasses.replace(problem, params=params)


def _manual_run(
    problem,
    flip: bool,
    scale: dict[str, float] | None = None,
    optimizer=None,
    persist=False,
    scale_from=1,
) -> Trajectory:
    """The hand-derived pass on float32 torch tensors, optionally on the other side of the
    kink (at step 1, or with ``persist`` at every step where its own pre-activation is
    within its own rounding bound), with plain SGD or ``optimizer``."""
    params = {k: v.clone() for k, v in problem.params.items()}
    state = manual_init(optimizer, params) if optimizer is not None else None
    out = Trajectory("flipped" if flip else "manual32", problem.spec.dtype)
    for step, (x, y) in enumerate(problem.batches, start=1):
        _, zs = manual.forward(params, x, problem.spec)
        masks = [z > 0 for z in zs[:-1]]
        if flip and (step == 1 or persist):
            # the side opposite to the exact (float64) pre-activation's
            p64 = {k: v.double().numpy() for k, v in params.items()}
            z64, bound = preactivation_bounds(p64, x.double().numpy(), problem.spec, 2.0**-24)
            z, bound = z64[0][EXAMPLE, UNIT], bound[0][EXAMPLE, UNIT]
            if step == 1 or abs(z) <= bound:
                masks[0][EXAMPLE, UNIT] = not bool(z > 0)
        loss, grads = manual.loss_and_grads(params, x, y, problem.spec, masks)
        if step >= scale_from:
            grads = {k: g * (scale or {}).get(k, 1.0) for k, g in grads.items()}
        if optimizer is None:
            params = manual.sgd_update(params, grads, LR)
        else:
            params, state = manual_update(optimizer, params, grads, state, step)
        out.record(loss, grads, params, state)
    return out


def _runs(problem, optimizer=None, **flipped_kwargs):
    lr = LR if optimizer is None else optimizer.learning_rate
    runs = {
        name: RUNNERS[name](problem, lr, optimizer=optimizer)
        for name in ("torch", "jax", REFERENCE)
    }
    runs["flipped"] = _manual_run(problem, flip=True, optimizer=optimizer, **flipped_kwargs)
    return runs


def test_the_constructed_unit_sits_on_the_kink(equiv_seed):
    problem = _kinked_problem(equiv_seed)
    ((x, _),) = problem.batches
    zs, bounds = preactivation_bounds(
        {k: v.double().numpy() for k, v in problem.params.items()},
        x.double().numpy(),
        SPEC,
        2.0**-24,
    )
    assert abs(zs[0][EXAMPLE, UNIT]) < 1e-7
    assert abs(zs[0][EXAMPLE, UNIT]) <= bounds[0][EXAMPLE, UNIT]


def test_without_kink_handling_the_other_side_fails(equiv_seed):
    problem = _kinked_problem(equiv_seed)
    report = compare_trajectories(problem, _runs(problem), learning_rate=LR, kinks=False)
    failing = {(d.stage, d.name) for d in report.failures if d.actual == "flipped"}
    assert ("grads", "fc1.weight") in failing
    assert "kinks" not in report.settings


def test_with_kink_handling_it_passes_and_is_reported_ambiguous(equiv_seed):
    problem = _kinked_problem(equiv_seed)
    report = compare_trajectories(problem, _runs(problem), learning_rate=LR)
    report.assert_agree()
    assert report.settings["kinks"] >= 1
    assert any(f"fc1 output [{EXAMPLE}, {UNIT}]" in line for line in report.settings["kink_units"])
    leaf = next(
        d
        for d in report.leaves
        if (d.stage, d.name, d.actual, d.expected) == ("grads", "fc1.weight", "flipped", REFERENCE)
    )
    assert leaf.ambiguous > 0


def test_a_real_bug_elsewhere_in_the_same_run_still_fails(equiv_seed):
    problem = _kinked_problem(equiv_seed)
    runs = _runs(problem, scale={"fc2.weight": 1 + 1e-3})
    report = compare_trajectories(problem, runs, learning_rate=LR)
    assert not report.agree
    failing = {(d.stage, d.name) for d in report.failures if d.expected == REFERENCE}
    assert failing == {("grads", "fc2.weight"), ("params", "fc2.weight")}
    assert report.settings["kinks"] >= 1


def test_the_other_side_over_two_steps_passes(equiv_seed):
    problem = _kinked_problem(equiv_seed)
    problem = dataclasses.replace(problem, batches=problem.batches * 2)
    report = compare_trajectories(problem, _runs(problem), learning_rate=LR)
    report.assert_agree()


def test_bounds_cover_float32_rounding(rng):
    # Measured: torch's float32 pre-activations against float64, elementwise.
    spec = MLPSpec((64, 256, 128, 4))
    problem = make_problem(spec, batch_size=32, seed=int(rng.integers(2**31)))
    ((x, _),) = problem.batches
    _, z32 = manual.forward(problem.params, x, spec)
    p64 = {k: v.double().numpy() for k, v in problem.params.items()}
    zs, bounds = preactivation_bounds(p64, x.double().numpy(), spec, 2.0**-24)
    for z, ref, bound in zip(z32, zs, bounds, strict=False):
        err = np.abs(z.double().numpy() - ref)
        assert np.all(err <= bound)
        assert np.max(err / bound) > 1e-3  # the bound is not vacuous either


def test_a_smooth_case_has_no_kinks(equiv_seed):
    problem = make_problem(MLPSpec((4, 3, 2)), batch_size=2, seed=0)
    analysis = analyse_kinks(problem.spec, problem.params, problem.batches, LR, 2.0**-24)
    assert analysis.count == 0 and analysis.slack == {}


def test_masks_must_match_the_hidden_layers():
    params = make_problem(SPEC).params
    with pytest.raises(ValueError) as info:
        manual.loss_and_grads(params, torch.zeros(1, 3), torch.zeros(1, 2), SPEC, masks=[])
    assert str(info.value) == (
        "[equiv] masks needs one entry (an array or None) per hidden layer: 1 for sizes "
        "(3, 4, 2), got 0"
    )


# ---------------------------------------------------------------------------
# Other optimizers: slack at the flip step through the optimizer, propagation after

OPTIMIZERS = {
    "momentum": OptimizerSpec("sgd", learning_rate=LR, momentum=0.9, weight_decay=0.01),
    "adam": OptimizerSpec("adam", learning_rate=1e-2),
    "adamw": OptimizerSpec("adamw", learning_rate=1e-2),
}


def _compare(problem, runs, optimizer, **kwargs):
    return compare_trajectories(
        problem, runs, learning_rate=optimizer.learning_rate, optimizer=optimizer, **kwargs
    )


@pytest.mark.parametrize("optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS)
def test_other_optimizers_accept_either_side_over_three_steps(optimizer, equiv_seed):
    problem = _kinked_problem(equiv_seed)
    problem = dataclasses.replace(problem, batches=problem.batches * 3)
    runs = _runs(problem, optimizer)
    without = _compare(problem, runs, optimizer, kinks=False)
    assert ("grads", 1, "fc1.weight") in {
        (d.stage, d.step, d.name) for d in without.failures if d.actual == "flipped"
    }
    report = _compare(problem, runs, optimizer)
    report.assert_agree()
    assert report.settings["kinks"] >= 1


@pytest.mark.parametrize("optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS)
def test_other_optimizers_still_catch_a_real_bug(optimizer, equiv_seed):
    problem = _kinked_problem(equiv_seed)
    runs = _runs(problem, optimizer, scale={"fc2.weight": 1 + 1e-3})
    report = _compare(problem, runs, optimizer)
    failing = {(d.stage, d.name) for d in report.failures if d.expected == REFERENCE}
    assert ("grads", "fc2.weight") in failing
    assert all(name.endswith("fc2.weight") for _, name in failing)  # its state too


def test_other_optimizers_without_propagation_switch_the_analysis_off(equiv_seed):
    problem = _kinked_problem(equiv_seed)
    optimizer = OPTIMIZERS["momentum"]
    report = _compare(problem, _runs(problem, optimizer), optimizer, propagate=False)
    assert report.settings["kinks"].startswith("off:")
    assert not report.agree  # the flipped side is then a failure, as without the analysis


def _stuck_kink_problem(seed: int, steps: int = 3):
    """A kinked unit that no other example activates, just above 0: a backend on the
    inactive side gives its row no gradient, so the row (and its z) stays put while
    the reference's moves away."""
    problem = make_problem(SPEC, batch_size=4, seed=seed)
    params = {k: v.clone() for k, v in problem.params.items()}
    ((x, _),) = problem.batches
    s = float(x[EXAMPLE].double() @ params["fc1.weight"][UNIT].double())
    b = np.float32(-s)
    while s + float(b) <= 0:
        b = np.nextafter(b, np.float32(np.inf))
    params["fc1.bias"][UNIT] = float(b)
    params["fc2.weight"][:, UNIT] = torch.tensor([1.5, -1.0])
    z = x.double() @ params["fc1.weight"][UNIT].double() + params["fc1.bias"][UNIT].double()
    assert all(z[k] < 0 for k in range(len(z)) if k != EXAMPLE)  # the construction holds
    return dataclasses.replace(problem, params=params, batches=problem.batches * steps)


@pytest.mark.parametrize("seed", [7, 8])
@pytest.mark.parametrize(
    "optimizer",
    [OptimizerSpec("sgd", learning_rate=LR), *OPTIMIZERS.values()],
    ids=["sgd", *OPTIMIZERS],
)
def test_a_backend_that_stays_on_its_side_passes(optimizer, seed):
    # Its own pre-activation stays within its own rounding bound at every step: each
    # flip is legitimate. Found at the backend's own parameters, not the reference's.
    problem = _stuck_kink_problem(seed)
    runs = _runs(problem, optimizer, persist=True)
    assert not _compare(problem, runs, optimizer, kinks=False).agree
    report = _compare(problem, runs, optimizer)
    report.assert_agree()
    assert any("at flipped's parameters" in unit for unit in report.settings["kink_units"])


def test_a_diverged_backend_fails_without_slack_or_warnings(equiv_seed):
    # An inf in one backend's parameters: no unit is called ambiguous there (no
    # RuntimeWarning either, which this suite turns into errors), and it fails.
    problem = _kinked_problem(equiv_seed)
    problem = dataclasses.replace(problem, batches=problem.batches * 2)
    optimizer = OPTIMIZERS["adam"]
    runs = _runs(problem, optimizer)
    runs["flipped"].params[0]["fc1.weight"][0, 0] = np.inf
    report = _compare(problem, runs, optimizer)
    assert ("params", 1, "fc1.weight") in {
        (d.stage, d.step, d.name) for d in report.failures if d.actual == "flipped"
    }
    assert not any("flipped's parameters" in unit for unit in report.settings["kink_units"])


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_bug_from_step_two_is_not_hidden_by_step_one_branches(seed):
    # Plain SGD with propagation: a branch taken at step 1 is covered at step 2 by
    # the step redone at each backend's own parameters; carrying the reference's
    # branches on as well counted it twice and let a 1e-3 gradient bug through.
    problem = _kinked_problem(seed)
    problem = dataclasses.replace(problem, batches=problem.batches * 3)
    runs = _runs(problem)
    runs["buggy"] = _manual_run(problem, flip=False, scale={"fc2.bias": 1 + 1e-3}, scale_from=2)
    report = compare_trajectories(problem, runs, learning_rate=LR)
    assert ("grads", 2, "fc2.bias") in {
        (d.stage, d.step, d.name) for d in report.failures if d.actual == "buggy"
    }


@pytest.mark.parametrize("seed", [3, 5, 7])
@pytest.mark.parametrize(
    "optimizer",
    [OptimizerSpec("sgd", learning_rate=LR), *OPTIMIZERS.values()],
    ids=["sgd", *OPTIMIZERS],
)
def test_a_bug_from_step_two_is_not_hidden_behind_a_flip_at_step_one(optimizer, seed):
    # The backend legitimately took the other side at step 1, then has a 1e-3 gradient
    # bug from step 2. Checked against the float64 step from its own parameters, the
    # bug is exposed at step 2. An allowance between its trajectory and the
    # reference's (the check before this one) cancels against the bug where the two
    # have opposite signs: it missed step 2 in 8 of these 12 cases, every step in 6.
    problem = _kinked_problem(seed)
    problem = dataclasses.replace(problem, batches=problem.batches * 3)
    runs = _runs(problem, optimizer)
    _compare(problem, runs, optimizer).assert_agree()  # the flip alone is legitimate
    runs["flipped"] = _manual_run(
        problem, flip=True, optimizer=optimizer, scale={"fc2.bias": 1 + 1e-3}, scale_from=2
    )
    report = _compare(problem, runs, optimizer)
    assert ("grads", 2, "fc2.bias") in {
        (d.stage, d.step, d.name)
        for d in report.failures
        if (d.actual, d.expected) == ("flipped", REFERENCE)
    }
    assert report.blame().keys() >= {"grads at step 2, fc2.bias"}


def test_non_finite_optimizer_state_fails_cleanly(equiv_seed):
    problem = _kinked_problem(equiv_seed)
    problem = dataclasses.replace(problem, batches=problem.batches * 2)
    optimizer = OPTIMIZERS["adam"]
    runs = _runs(problem, optimizer, persist=True)
    runs["flipped"].states[0]["exp_avg_sq"]["fc1.weight"][0, 0] = np.inf
    report = _compare(problem, runs, optimizer)
    assert not report.agree


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("decay", [0.0, 0.1])
@pytest.mark.parametrize("scale", [1e-8, 1e-2])
def test_the_update_envelope_finds_adams_peak(scale, decay, amsgrad):
    # Against a dense scan of the interval: the sampled envelope (33 points plus
    # the stationary points) must not miss the largest change of the update.
    from equiv.kinks import _update_envelope

    rng = np.random.default_rng(0)
    optimizer = OptimizerSpec("adam", learning_rate=1e-2, weight_decay=decay, amsgrad=amsgrad)
    shape = (2000,)
    p = {"w": rng.standard_normal(shape)}
    state = {
        "exp_avg": {"w": scale * rng.standard_normal(shape)},
        "exp_avg_sq": {"w": scale**2 * rng.random(shape)},
    }
    if amsgrad:
        state["max_exp_avg_sq"] = {"w": state["exp_avg_sq"]["w"] * (1 + rng.random(shape))}
    g_ref = {"w": scale * rng.standard_normal(shape)}
    d = {"w": scale * 2 * rng.random(shape)}
    envelope, _ = _update_envelope(optimizer, p, g_ref, d, state, 3)
    base, _ = manual_update(optimizer, p, g_ref, state, 3)
    dense = np.zeros(shape)
    for t in np.linspace(-1, 1, 4001):
        moved, _ = manual_update(optimizer, p, {"w": g_ref["w"] + t * d["w"]}, state, 3)
        dense = np.maximum(dense, np.abs(moved["w"] - base["w"]))
    ulps = 4 * np.finfo(np.float64).eps * np.abs(p["w"])  # float64 rounding of p - lr·u
    assert np.all(envelope["w"] >= dense * (1 - 1e-6) - ulps)


def test_adams_stationary_point_accounts_for_eps(monkeypatch):
    # With ε comparable to √v the update's peak moves away from its ε = 0 value; the
    # fixed-point iteration finds where the update's slope is zero. Without the
    # iterations (the ε = 0 point), the slope there is up to 0.75 of its size at 0.
    import equiv.kinks

    rng = np.random.default_rng(0)
    optimizer = OptimizerSpec("adam", learning_rate=1e-2, eps=1e-3)
    scale, shape = 1e-3, (1000,)
    p = {"w": rng.standard_normal(shape)}
    state = {
        "exp_avg": {"w": scale * rng.standard_normal(shape)},
        "exp_avg_sq": {"w": scale**2 * rng.random(shape)},
    }
    zero = {"w": np.zeros(shape)}

    def slope(g):  # of the updated parameter, by central differences
        h = 1e-5 * np.maximum(np.abs(g), scale)
        up, _ = manual_update(optimizer, p, {"w": g + h}, state, 3)
        down, _ = manual_update(optimizer, p, {"w": g - h}, state, 3)
        return np.abs(up["w"] - down["w"]) / (2 * h)

    def flatness():
        (star,) = equiv.kinks._stationary_gradients(optimizer, p, state, zero, 3)
        return np.max(slope(star["w"]) / slope(zero["w"]))

    assert flatness() < 1e-3
    monkeypatch.setattr(equiv.kinks, "_STATIONARY_ITERATIONS", 0)
    assert flatness() > 0.1


def test_an_optimizer_without_learning_rate_uses_its_own(equiv_seed):
    # compare_trajectories(optimizer=...) alone: propagation needs a learning rate, and
    # the optimizer's is the one the runs used.
    problem = _kinked_problem(equiv_seed)
    problem = dataclasses.replace(problem, batches=problem.batches * 3)
    optimizer = OPTIMIZERS["adam"]
    runs = {
        name: RUNNERS[name](problem, optimizer.learning_rate, optimizer=optimizer)
        for name in ("torch", "jax", REFERENCE)
    }
    given = compare_trajectories(
        problem, runs, learning_rate=optimizer.learning_rate, optimizer=optimizer
    )
    implied = compare_trajectories(problem, runs, optimizer=optimizer)
    assert implied.agree and given.agree
    assert [d.ratio for d in implied.leaves] == [d.ratio for d in given.leaves]


def _zero_rows_problem():
    """A one-hot batch with 4 all-zero rows and a zero fc1 bias: those rows' fc1
    pre-activations are exactly 0 in every backend (found in a user trial)."""
    from equiv import TorchMLP

    torch.manual_seed(2)
    spec = MLPSpec((10, 32, 3), loss="cross_entropy")
    model = TorchMLP(spec)
    with torch.no_grad():
        model.fc1.bias.zero_()
    x = torch.zeros(16, 10)
    x[torch.arange(16), torch.randint(0, 10, (16,))] = 1
    x[:4] = 0
    return spec, model, x, torch.randint(0, 3, (16,))


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_units_exactly_at_zero_in_every_backend_get_no_allowance(scale):
    # Before, the 128 units at z = 0 exactly were taken as "within rounding of the
    # kink", and a zeroed or halved fc1.bias gradient passed (ratio 0.56). A bound of
    # 0 means every backend computes z = 0 exactly. The twin: the right gradient.
    from equiv.port import check_manual_backward

    spec, model, x, y = _zero_rows_problem()

    def grad_fn(params, x, y):
        loss, grads = manual.loss_and_grads(params, x, y, spec)
        return loss, {**grads, "fc1.bias": scale * grads["fc1.bias"]}

    comparison = check_manual_backward(model, grad_fn, x, y)
    assert comparison.agree == (scale == 1.0)


def test_jnp_maximum_at_exactly_zero_is_caught_and_named():
    # jnp.maximum(z, 0) differentiates to 1/2 at 0, torch's ReLU to 0: the same in
    # every backend, so no rounding excuses it. The twin: jax.nn.relu agrees.
    import jax
    import jax.numpy as jnp

    from equiv.port import check_jax_port

    spec, model, x, y = _zero_rows_problem()

    def port(relu):
        def loss_fn(p, x, y):
            h = relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
            out = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
            return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(out.shape[0]), y])

        return loss_fn

    check_jax_port(model, port(jax.nn.relu), x, y).assert_agree()
    maximum = check_jax_port(model, port(lambda z: jnp.maximum(z, 0)), x, y)
    assert not maximum.agree
    assert "takes relu's slope at z exactly 0 as 1/2 after fc1" in maximum.hints()[0]
