"""Each known-cause detector names its trap, and stays silent on unrelated differences."""

import dataclasses

import numpy as np
import pytest

from equiv.diagnose import GENERIC, diagnose_leaf, diagnose_optimizer, diagnose_trees
from equiv.optimizers import OptimizerSpec

RNG = np.random.default_rng(20261125)
W = RNG.standard_normal((3, 3))
G = RNG.standard_normal(4)

# (case id, kwargs for diagnose_leaf, a phrase the hint must contain)
CASES = [
    (
        "transpose",
        dict(name="fc2.weight", actual=W.T, expected=W, stage="params"),
        "forgot to transpose",
    ),
    (  # a warmup from 0 (a user trial): not "0 times reference's" learning rate
        "update-zero",
        dict(name="fc1.bias", actual=G, expected=G - 0.1, stage="params", before=G),
        "learning rate is 0 here (a schedule that starts at 0",
    ),
    (  # the twin: a halved update is still a learning-rate factor
        "update-half",
        dict(name="fc1.bias", actual=G - 0.05, expected=G - 0.1, stage="params", before=G),
        "update is 0.5 times",
    ),
    (  # the fix names every layout, not flax's alone (an nnx user trial)
        "transpose-any-layout",
        dict(name="fc2.weight", actual=W.T, expected=W, stage="params"),
        'in your layout ("flax", "nnx" or "torch"), or equiv.torch_to_equinox(state_dict, model)',
    ),
    (
        "mse-sum",
        dict(
            name="loss",
            actual=np.array(4 * 2.5),
            expected=np.array(2.5),
            stage="loss",
            numel_output=4,
            batch_size=2,
        ),
        "MSELoss(reduction='sum')",
    ),
    (
        "l2-half",
        dict(
            name="loss",
            actual=np.array(0.5 * 2.5),
            expected=np.array(2.5),
            stage="loss",
            numel_output=6,
            batch_size=3,
        ),
        "optax.l2_loss",
    ),
    (  # the twin (review): cross-entropy doubled is not put down to MSE's conventions
        "factor-two-not-mse",
        dict(
            name="loss",
            actual=np.array(2 * 2.5),
            expected=np.array(2.5),
            stage="loss",
            numel_output=6,
            batch_size=3,
            loss="cross_entropy",
        ),
        "A factor 2, not MSE's: the cross_entropy loss counted twice or halved",
    ),
    (
        "batch-mean",
        dict(
            name="fc1.bias", actual=G / 8, expected=G, stage="grads", numel_output=24, batch_size=8
        ),
        "batch size",
    ),
    (
        "lr",
        dict(
            name="fc1.bias",
            actual=1 - 0.3 * G,
            expected=1 - 0.1 * G,
            stage="params",
            before=np.ones(4),
        ),
        "learning rates differ",
    ),
    (
        "step-twice",
        dict(
            name="fc1.bias",
            actual=1 - 0.2 * G,
            expected=1 - 0.1 * G,
            stage="params",
            before=np.ones(4),
        ),
        "applied twice",
    ),
    (
        "float32",
        dict(
            name="fc1.bias",
            actual=G.astype(np.float32).astype(np.float64),
            expected=G,
            stage="grads",
            dtype="float64",
        ),
        "jax.enable_x64",
    ),
    # AdamW: p(1 - lr·λ) - lr·u with λ = 1e-4 against torch's 1e-2, lr = 0.1.
    (
        "adamw-decay",
        dict(
            name="fc1.weight",
            actual=W * (1 - 0.1 * 1e-4) - 0.1 * np.sign(W),
            expected=W * (1 - 0.1 * 1e-2) - 0.1 * np.sign(W),
            stage="params",
            before=W,
            learning_rate=0.1,
        ),
        "the weight decays differ by -0.0099",
    ),
]


@pytest.mark.parametrize("kwargs,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_detector_names_its_trap(kwargs, phrase):
    hint = diagnose_leaf(**kwargs, names=("jax", "torch"))
    assert hint is not None and phrase in hint
    assert hint.startswith(kwargs["name"] + ": ")


UNRELATED = [
    (
        "noise",
        dict(name="fc1.bias", actual=G + RNG.standard_normal(4) * 1e-2, expected=G, stage="grads"),
    ),
    (
        "non-square-transpose-impossible",
        dict(name="fc1.weight", actual=W[:2] + 1, expected=W[:2], stage="grads"),
    ),
    (
        "float32-in-float32-run",
        dict(
            name="fc1.bias",
            actual=G.astype(np.float32) * 1.5,
            expected=G.astype(np.float32),
            stage="grads",
            dtype="float32",
        ),
    ),
    ("nan", dict(name="fc1.bias", actual=np.full(4, np.nan), expected=G, stage="grads")),
    (
        # A difference the size the GELUs' makes: the GELU variant is computed and
        # matched (equiv.variants), never guessed from a size (found in a user trial).
        "gelu-sized-difference",
        dict(name="fc1.weight", actual=W * (1 + 3e-4 * np.cos(W)), expected=W, stage="grads"),
    ),
    (
        "update-noise",
        dict(
            name="fc1.weight",
            actual=W - 0.1 * np.cos(3 * W),
            expected=W - 0.1 * G[0],
            stage="params",
            before=W,
        ),
    ),
]


def test_a_gradient_that_is_zero_on_one_side_only_is_named():
    hint = diagnose_leaf("fc1.bias", G, np.zeros(4), stage="grads", names=("torch", "port"))
    assert hint == (
        "fc1.bias: port's gradient is zero where torch's is not: in port the loss does not "
        "reach this parameter (left unused or replaced by a constant, or cut off by "
        "stop_gradient or detach) or does not change with it (a log_softmax over the batch "
        "axis, not the classes', cancels the output layer's bias)."
    )
    # The twin: both zero, or neither (a tenth of it: a constant factor), names no cut.
    assert diagnose_leaf("fc1.bias", np.zeros(4), np.zeros(4), stage="grads") is None
    assert "reach" not in diagnose_leaf("fc1.bias", G, G / 10, stage="grads")
    # Parameters after a step: a zero is a value like any other.
    assert diagnose_leaf("fc1.bias", G, np.zeros(4), stage="params") is None


@pytest.mark.parametrize("kwargs", [c[1] for c in UNRELATED], ids=[c[0] for c in UNRELATED])
def test_no_hint_for_unrelated_differences(kwargs):
    hint = diagnose_leaf(**kwargs)
    # A plain constant factor still gets the generic hint; nothing else may claim a trap.
    assert hint is None or "constant factor" in hint


def test_trees_diagnose_only_failing_leaves():
    actual = {"fc1.weight": W.T, "fc1.bias": G}
    expected = {"fc1.weight": W, "fc1.bias": G * 3}
    hints = diagnose_trees(actual, expected, ["fc1.weight"], stage="grads")
    assert len(hints) == 1 and hints[0].startswith("fc1.weight: actual holds the transpose")


# ---------------------------------------------------------------------------
# Optimizer misreadings: replayed on the run's own gradients


def _run(spec, steps=3, *, decay_after=0.0, applied_scale=1.0, noise=0.0, seed=7):
    """A float64 run of ``spec`` on random gradients, optionally misread: weight decay
    ``decay_after`` applied after the update, the gradients multiplied by
    ``applied_scale`` before use (but recorded as they were), ``noise`` times the
    largest update added to each update."""
    from equiv.optimizers import manual_init, manual_update

    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(4)}
    initial, state, grads, after = dict(params), manual_init(spec, params), [], []
    for step in range(1, steps + 1):
        g = {n: rng.standard_normal(p.shape) for n, p in params.items()}
        used = {n: applied_scale * v for n, v in g.items()}
        new, state = manual_update(spec, params, used, state, step)
        new = {n: new[n] - decay_after * spec.learning_rate * params[n] for n in new}
        size = max(float(np.max(np.abs(new[n] - params[n]))) for n in new)
        params = {n: v + noise * size * rng.standard_normal(v.shape) for n, v in new.items()}
        grads.append(g)
        after.append(params)
    return initial, grads, after


SGD_MOM_WD = OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.1)
ADAMW = OptimizerSpec("adamw", learning_rate=1e-2, weight_decay=0.1)
MISREADINGS = {
    "adam-as-adamw": (
        OptimizerSpec("adam", learning_rate=1e-2, weight_decay=0.1),
        dict(ran=ADAMW),
        "decoupled",
    ),
    "adamw-as-adam": (
        ADAMW,
        dict(ran=dataclasses.replace(ADAMW, name="adam")),
        "to the gradient",
    ),
    "decay-after-momentum": (
        SGD_MOM_WD,
        dict(ran=dataclasses.replace(SGD_MOM_WD, weight_decay=0.0), decay_after=0.1),
        "after the momentum",
    ),
    "no-dampening": (
        OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, dampening=0.5),
        dict(ran=OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9)),
        "ignores dampening=0.5",
    ),
    "nesterov": (
        OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9),
        dict(ran=OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, nesterov=True)),
        "nesterov=True",
    ),
}


@pytest.mark.parametrize(("spec", "run", "phrase"), MISREADINGS.values(), ids=MISREADINGS)
def test_optimizer_misreading_is_named(spec, run, phrase):
    run = dict(run)
    initial, grads, params = _run(run.pop("ran"), **run)
    assert phrase in diagnose_optimizer(spec, initial, grads, params)


@pytest.mark.parametrize(("noise", "named"), [(1e-6, True), (1e-3, False)])
def test_a_misreading_must_explain_the_updates_closely(noise, named):
    # The threshold is 1e-4 of the largest update: a run that follows the variant to
    # 1e-6 is named, one that departs from it by 1e-3 is not.
    spec, run, _ = MISREADINGS["decay-after-momentum"]
    run = dict(run)
    initial, grads, params = _run(run.pop("ran"), noise=noise, **run)
    assert (diagnose_optimizer(spec, initial, grads, params) is not None) is named


@pytest.mark.parametrize(
    ("ran", "applied_scale"),
    [
        (SGD_MOM_WD, 1.0),  # the optimizer it should be: nothing to name
        (SGD_MOM_WD, 3.0),  # wrong gradients, right optimizer: not an optimizer misreading
        (dataclasses.replace(SGD_MOM_WD, learning_rate=0.2), 1.0),  # the lr detector's job
        # No known misreading: another momentum and another learning rate at once
        # (another momentum alone is named since 2026-12-05: tests/test_named_mistakes.py).
        (dataclasses.replace(SGD_MOM_WD, momentum=0.5, learning_rate=0.13), 1.0),
        (dataclasses.replace(SGD_MOM_WD, weight_decay=0.0), 1.0),  # the decay detector's job
    ],
    ids=["correct", "wrong-gradients", "learning-rate", "unknown", "no-decay"],
)
def test_no_optimizer_misreading_is_invented(ran, applied_scale):
    initial, grads, params = _run(ran, applied_scale=applied_scale)
    assert diagnose_optimizer(SGD_MOM_WD, initial, grads, params) is None


@pytest.mark.parametrize(
    ("spec", "ran"),
    [
        # Adam's first update is lr·sign(g): L2 decay barely shows; optax.adamw's
        # default decay 1e-4 (torch: 1e-2) is a decay difference, not L2.
        (
            OptimizerSpec("adamw", learning_rate=1e-2),
            OptimizerSpec("adamw", learning_rate=1e-2, weight_decay=1e-4),
        ),
        (ADAMW, OptimizerSpec("adam", learning_rate=1e-2)),  # decay ignored, not L2
        # Nesterov's first step is (1 + momentum) times plain SGD's: momentum missing,
        # or a learning rate 1.9 times too large, are not "nesterov toggled".
        (
            OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, nesterov=True),
            OptimizerSpec("sgd", learning_rate=0.1),
        ),
        (
            OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9),
            OptimizerSpec("sgd", learning_rate=0.19),
        ),
        # Dampening changes nothing at step 1.
        (
            OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, dampening=0.5),
            OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, dampening=0.5),
        ),
    ],
    ids=["adamw-1e-4", "adamw-no-decay", "no-momentum", "lr-1.9x", "dampening"],
)
def test_one_step_cannot_name_what_it_cannot_tell_apart(spec, ran):
    initial, grads, params = _run(ran, steps=1)
    found = diagnose_optimizer(spec, initial, grads, params)
    if ran.learning_rate == 0.19:
        # A first update 1.9 times the optimizer's is Nesterov's too: both are offered,
        # the learning rate first (before, neither was; and Nesterov's Adam beside
        # AdamW's decay got no hint at all).
        assert found.startswith("moves 1.9 times as far as torch's sgd: its learning rate is 1.9")
        assert "or it uses nesterov=True" in found and "cannot tell the two apart" in found
    else:
        assert found is None


@pytest.mark.parametrize("learning_rate", [1e-2, 1e-4, 1e-5])
def test_float32_rounding_is_not_a_misreading(learning_rate):
    # A correct float32 run differs from the float64 replay by rounding only; at
    # small learning rates that rounding is a large part of each update.
    spec = OptimizerSpec("adam", learning_rate=learning_rate, weight_decay=0.1)
    initial, grads, params = _run(spec)
    narrow = [{n: v.astype(np.float32) for n, v in p.items()} for p in params]
    assert diagnose_optimizer(spec, initial, grads, narrow) is None


def test_a_step_that_moves_nothing_keeps_the_evidence_of_the_others():
    # Step 1 fits no known rule; step 2 moves nothing, which the Nesterov variant
    # also predicts: the step-1 miss must still rule it out.
    spec = OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9)
    p0, g1 = {"w": np.array([1.0, -2.0])}, {"w": np.array([0.5, 0.25])}
    p1 = {"w": p0["w"] - 0.3 * g1["w"]}
    g2 = {"w": -0.81 / 1.9 * g1["w"]}
    assert diagnose_optimizer(spec, p0, [g1, g2], [p1, dict(p1)]) is None


def test_a_factor_in_some_gradients_only_is_not_put_on_the_loss():
    # Found in a user trial: fc2.weight's gradient alone halved was called optax.l2_loss's
    # convention, which would halve every gradient. The twin: every gradient halved is.
    expected = {"fc1.weight": W, "fc1.bias": G}
    hints = diagnose_trees(
        {**expected, "fc1.weight": W / 2}, expected, ["fc1.weight"], stage="grads"
    )
    assert hints == [
        "fc1.weight: actual's grads are 0.5 times expected's. A factor 0.5 in these gradients "
        "only, not in every one: not the loss (its reduction or convention scales every "
        "gradient) but these leaves' own backward (their chain rule or reduction)."
    ]
    halved = {k: v / 2 for k, v in expected.items()}
    hints = diagnose_trees(halved, expected, ["fc1.weight", "fc1.bias"], stage="grads")
    assert len(hints) == 2 and all("A factor 2: torch's MSELoss" in h for h in hints), hints


def test_a_factor_says_which_side_sums_and_a_sign_flip_is_named():
    # Found in a user trial: gradients 32 times too large were said to take "a mean over
    # the batch where the other sums", and -1 was "a constant factor".
    kwargs = dict(stage="grads", numel_output=24, batch_size=8, names=("port", "torch"))
    assert diagnose_leaf("fc1.bias", G * 8, G, **kwargs).endswith(
        "A factor of the batch size: port sums over the batch where torch takes the mean."
    )
    assert diagnose_leaf("fc1.bias", G / 8, G, **kwargs).endswith(
        "A factor of the batch size: port takes the mean over the batch where torch sums."
    )
    assert "The sign is flipped: a gradient of the negated loss" in diagnose_leaf(
        "fc1.bias", -G, G, **kwargs
    )
    state = diagnose_leaf("exp_avg.fc1.bias", 3 * G, G, stage="state", names=("port", "torch"))
    assert state.startswith("exp_avg.fc1.bias: port's state is 3 times torch's.")


def test_a_second_optimizer_step_on_the_same_gradients_with_momentum_is_named():
    # Found in review: optimizer.step() twice on one gradient with momentum 0.9 moves
    # 1 + (1 + 0.9) = 2.9 times as far, which was put down to the learning rate alone.
    sgd = OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9)
    kwargs = dict(stage="params", before=np.ones(4), names=("port", "torch"), optimizer=sgd)
    hint = diagnose_leaf("fc1.bias", 1 - 0.29 * G, 1 - 0.1 * G, step=1, **kwargs)
    assert "(or optimizer.step() ran twice on the same gradients: 1 + (1 + momentum 0.9)" in hint
    # The twins: another factor, or a later step (the buffer is no longer the gradient).
    assert "ran twice" not in diagnose_leaf("fc1.bias", 1 - 0.3 * G, 1 - 0.1 * G, step=1, **kwargs)
    assert "ran twice" not in diagnose_leaf("fc1.bias", 1 - 0.29 * G, 1 - 0.1 * G, step=2, **kwargs)


def test_an_adam_state_off_by_a_factor_names_the_beta():
    # Found in review: β₂ 0.98 against 0.999 was "a constant factor: a scaled loss",
    # β₂ 0.998 "torch's MSELoss is mean((p - y)²)". At step 1 the moment is one term.
    adam = OptimizerSpec("adam", learning_rate=1e-3, betas=(0.9, 0.98))
    kwargs = dict(stage="state", names=("port", "torch"), optimizer=adam)
    hint = diagnose_leaf("exp_avg_sq.fc1.bias", G * G * 0.001, G * G * 0.02, step=1, **kwargs)
    assert hint.endswith("At step 1 it is (1 - β₂)·g²: port's β₂ is 0.999, not 0.98.")
    hint = diagnose_leaf("exp_avg.fc1.bias", G * 0.2, G * 0.1, step=1, **kwargs)
    assert hint.endswith("At step 1 it is (1 - β₁)·g: port's β₁ is 0.8, not 0.9.")
    # Later the moments mix steps: the hyper-parameters are named, nothing fitted.
    hint = diagnose_leaf("exp_avg.fc1.bias", G * 0.2, G * 0.1, step=2, **kwargs)
    assert "the optimizer's hyper-parameters differ" in hint and "MSELoss" not in hint


def test_adam_moments_off_together_name_a_scaled_gradient_or_a_doubled_update():
    # Found in a user trial: a clip_by_global_norm before Adam (exp_avg × c, exp_avg_sq ×
    # c²) and tx.update run twice on one gradient (× 1 + β₁, × 1 + β₂) were put down to
    # invented βs. The twin: one moment off alone is a β.
    adam = OptimizerSpec("adam", learning_rate=1e-3)
    m, v = 0.1 * G, 0.001 * G * G
    expected = {"exp_avg.fc1.bias": m, "exp_avg_sq.fc1.bias": v}
    kwargs = dict(stage="state", names=("port", "torch"), optimizer=adam, step=1)
    failing = list(expected)
    clipped = {"exp_avg.fc1.bias": 0.35 * m, "exp_avg_sq.fc1.bias": 0.1225 * v}
    hints = diagnose_trees(clipped, expected, failing, **kwargs)
    assert all("port's optimizer takes the gradient scaled by 0.35" in h for h in hints), hints
    twice = {"exp_avg.fc1.bias": 1.9 * m, "exp_avg_sq.fc1.bias": 1.999 * v}
    hints = diagnose_trees(twice, expected, failing, **kwargs)
    assert all("update ran twice on the same gradient" in h for h in hints), hints
    beta = {"exp_avg.fc1.bias": m, "exp_avg_sq.fc1.bias": 20 * v}
    (hint,) = diagnose_trees(beta, expected, ["exp_avg_sq.fc1.bias"], **kwargs)
    assert hint.endswith("port's β₂ is 0.98, not 0.999."), hint


def test_a_gradient_zero_to_rounding_on_one_side_is_not_a_factor():
    # Found in a user trial: a port's fc3.bias gradient at 2.4e-9 of the reference's
    # (log_softmax over the batch axis) was "a factor -2.423e-09 ... these leaves' own
    # backward". A side at rounding level is a zero, named as such; the twin: a factor
    # 1e-3 is still a factor.
    tiny = 2.4e-9 * np.cos(np.arange(4.0))
    hint = diagnose_leaf("fc3.bias", tiny, G, stage="grads", names=("port", "reference"))
    assert hint.startswith("fc3.bias: port's gradient is zero (to rounding: at most "), hint
    assert "times" not in hint and "own backward" not in hint
    hint = diagnose_leaf("fc3.bias", G, tiny, stage="grads", names=("port", "reference"))
    assert hint.startswith("fc3.bias: reference's gradient is zero (to rounding"), hint
    assert "1000 times" in diagnose_leaf("fc3.bias", G, G / 1e3, stage="grads", names=("p", "r"))
    # Not a factor at the other stages either (no hint rather than "1e-09 times").
    assert diagnose_leaf("fc3.bias", 1e-9 * G, G, stage="state") is None


def test_a_factor_in_some_gradients_only_where_the_loss_differs_too_is_not_named():
    # The loss differing with no cause found: a factor in fc1.weight's gradient alone
    # is a consequence of the loss, not evidence about its own backward (which the
    # hint would send the user to). The twin, the loss agreeing, is named (above).
    expected = {"fc1.weight": W, "fc1.bias": G}
    actual = {**expected, "fc1.weight": W / 2}
    assert diagnose_trees(actual, expected, ["fc1.weight"], stage="grads", loss_differs=True) == []
    assert diagnose_trees(actual, expected, ["fc1.weight"], stage="grads", loss_differs=False)


def test_adam_in_place_of_sgd_is_named():
    # Found in a user trial: optax.adamw for check_jax_port's plain SGD failed every
    # leaf with no cause named (the mirror, SGD for Adam, was named). Adam's first
    # update moves every element by about lr whatever |g|. The twins: a learning rate
    # twice torch's, and SGD itself, are not Adam.
    sgd = OptimizerSpec("sgd", learning_rate=1e-2)
    found = diagnose_optimizer(sgd, *_run(OptimizerSpec("adam", learning_rate=1e-2)))
    assert found.startswith("moves every element by about the learning rate at step 1"), found
    assert 'optimizer=equiv.OptimizerSpec("adam" or "adamw", ...)' in found
    found = diagnose_optimizer(sgd, *_run(OptimizerSpec("adam", learning_rate=3e-2)))
    assert found.startswith("moves every element by about 0.03 (torch's learning rate is 0.01)")
    assert diagnose_optimizer(sgd, *_run(OptimizerSpec("sgd", learning_rate=2e-2))) is None
    assert diagnose_optimizer(sgd, *_run(sgd)) is None
    with_momentum = OptimizerSpec("sgd", learning_rate=1e-2, momentum=0.9)
    assert diagnose_optimizer(with_momentum, *_run(with_momentum)) is None


def test_an_update_is_measured_from_its_own_start():
    # After a failed step the two sides start the next from different parameters:
    # each update is measured from its own (both from the reference's named a
    # warmup's learning rate -0.71 times torch's). The twin: a shared start.
    own = W + 0.01 * np.cos(W)
    hint = diagnose_leaf(
        "fc1.weight", own - 0.05 * W, W - 0.1 * W, stage="params", before=W, own_before=own
    )
    assert "update is 0.5 times" in hint, hint
    assert "update is 0.5 times" in diagnose_leaf(
        "fc1.weight", W - 0.05 * W, W - 0.1 * W, stage="params", before=W
    )


def test_a_learning_rate_factor_after_agreeing_steps_names_a_schedule():
    # Found in a user trial: a cosine decay in the port alone got "0.9045 times ...
    # (step 2)", though step 1 agreed, and a warmup "0.1 times": the factor of a rate
    # that changes from step to step. The twins: the same factor without agreeing
    # steps before it names no schedule as the likely cause; at step 1 a warmup is
    # offered beside a constant rate.
    kw = dict(stage="params", before=np.ones(4), names=("port", "reference"))
    later = diagnose_leaf("fc1.bias", 1 - 0.09 * G, 1 - 0.1 * G, step=3, earlier_agreed=True, **kw)
    assert (
        "0.9 times reference's: the learning rates differ by that factor at step 3, where " in later
    )
    assert "steps 1 to 2 agreed: a learning-rate schedule in one side only" in later
    parted = diagnose_leaf(
        "fc1.bias", 1 - 0.09 * G, 1 - 0.1 * G, step=3, earlier_agreed=False, **kw
    )
    assert "schedule" not in parted, parted
    first = diagnose_leaf("fc1.bias", 1 - 0.01 * G, 1 - 0.1 * G, step=1, **kw)
    assert first.endswith(
        "differ by that factor, or a learning-rate schedule in one side only "
        "starts there (a warmup; torch's optimizer keeps a constant rate unless "
        "a scheduler steps it)."
    )


# (loss, the first side's factor over the second's, the pair, what the hint says)
BATCH_FACTORS = [
    (
        "mse_sum",
        8.0,
        ("port", "reference"),
        "port multiplies by the batch size where "
        "reference's loss (mse_sum) sums over the batch with no factor.",
    ),
    (
        "mse_sum",
        1 / 8,
        ("port", "reference"),
        "port takes the mean over the batch where reference's loss (mse_sum) sums.",
    ),
    (
        "mse_sum",
        1 / 8,
        ("torch", "port"),
        "port multiplies by the batch size where "
        "torch's loss (mse_sum) sums over the batch with no factor.",
    ),
    ("mse", 8.0, ("port", "reference"), "port sums over the batch where reference takes the mean."),
    (
        "mse",
        1 / 8,
        ("port", "reference"),
        "port divides by the batch size once more than "
        "reference, whose loss (mse) is the mean over the batch.",
    ),
    (
        "cross_entropy",
        8.0,
        ("torch", "port"),
        "port divides by the batch size once more "
        "than torch, whose loss (cross_entropy) is the mean over the batch.",
    ),
]


def test_a_factor_of_the_batch_says_which_way_from_the_losss_own_reduction():
    # Found in a user trial: for loss="mse_sum", which sums, a loss 8 times the spec's
    # (batch 8) read "port sums over the batch where reference takes the mean". The
    # twins: the other direction, either order of the pair, a loss that takes the mean.
    for loss, factor, names, cause in BATCH_FACTORS:
        hint = diagnose_leaf(
            "loss",
            np.array(1.75 * factor),
            np.array(1.75),
            stage="loss",
            names=names,
            numel_output=8,
            batch_size=8,
            loss=loss,
        )
        assert hint == f"loss: {names[0]}'s loss is {factor:.4g} times {names[1]}'s. " + (
            f"A factor of the batch size: {cause}"
        ), hint
    # batch · outputs (24): "a sum where the other takes the mean" only where one does.
    kwargs = dict(stage="loss", names=("port", "reference"), numel_output=24, batch_size=8)
    for loss, factor, cause in [
        (
            "mse",
            24.0,
            "A sum where the other takes the mean: port sums over the batch and "
            "the outputs where reference takes the mean (MSELoss(reduction='sum') vs 'mean').",
        ),
        (
            "mse",
            1 / 24,
            "A factor of batch · outputs: port divides by batch · outputs once "
            "more than reference, whose loss (mse) is the mean over the batch and the outputs.",
        ),
        (
            "mse_sum",
            1 / 24,
            "A sum where the other takes the mean: port takes the mean over "
            "the batch and the outputs where reference's loss (mse_sum) sums.",
        ),
        (
            "mse_sum",
            24.0,
            "A factor of batch · outputs: port multiplies by batch · outputs "
            "where reference's loss (mse_sum) sums over the batch and the outputs with no factor.",
        ),
    ]:
        hint = diagnose_leaf("loss", np.array(factor), np.array(1.0), loss=loss, **kwargs)
        assert hint.endswith(cause), hint


def test_a_mean_divided_by_one_less_than_its_count_is_named():
    # Found in a user trial: sum(...) / (n - 1) (batch 64) failed every leaf with "a
    # constant factor" on the gradients and nothing on the loss. The twins: the other
    # side off, batch · outputs, and factors near it that are not it: (n + 1)/n, and a
    # wrong loss 1.253 times the spec's at batch 5 (found in review: named 5/4 at 1e-2).
    kwargs = dict(stage="grads", numel_output=64, batch_size=64, names=("port", "reference"))
    hint = diagnose_leaf("fc1.bias", G * 64 / 63, G, **kwargs)
    assert hint == (
        "fc1.bias: port's grads are 1.016 times reference's. A factor 64/63: port divides by "
        "63, the batch size less one, where reference divides by the batch size, 64 (a sum "
        "over 64 terms divided as an unbiased variance is, or an off-by-one count)."
    ), hint
    flipped = dict(kwargs, names=("torch", "port"))
    assert "A factor 64/63: port divides by 63, the batch size less one, where torch " in (
        diagnose_leaf("fc1.bias", G * 63 / 64, G, **flipped)
    )
    wide = dict(kwargs, numel_output=192)
    loss = diagnose_leaf(
        "loss", np.array(2.0 * 192 / 191), np.array(2.0), **wide | {"stage": "loss"}
    )
    assert "A factor 192/191: port divides by 191, batch · outputs less one" in loss, loss
    assert diagnose_leaf("fc1.bias", G * 65 / 64, G, **kwargs).endswith(GENERIC)
    small = dict(kwargs, numel_output=5, batch_size=5, stage="loss")
    assert diagnose_leaf("loss", np.array(1.253), np.array(1.0), **small) is None
    assert "A factor 5/4" in diagnose_leaf("loss", np.array(1.25), np.array(1.0), **small)
    # A loss that sums has no divisor to be off by one.
    summed = diagnose_leaf("fc1.bias", G * 64 / 63, G, **kwargs, loss="mse_sum")
    assert "64/63" not in summed, summed


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_values_in_a_float32_run_are_named(half):
    # Found in a user trial: a hand-written backward returning float16 gradients was
    # caught with no cause. The twin: float32 values off by as much are not named so.
    import ml_dtypes

    rng = np.random.default_rng(0)
    expected = rng.normal(size=(4, 3)).astype(np.float32)
    kind = ml_dtypes.bfloat16 if half == "bfloat16" else np.float16
    rounded = expected.astype(kind).astype(np.float32)
    hint = diagnose_leaf(
        "fc1.weight", rounded, expected, stage="grads", names=("port", "torch"), dtype="float32"
    )
    assert hint.startswith(f"fc1.weight: port's values are all {half} numbers in a float32 run")
    off = expected + (rounded - expected)[::-1]  # as far off, not half precision
    other = diagnose_leaf(
        "fc1.weight", off, expected, stage="grads", names=("port", "torch"), dtype="float32"
    )
    assert other is None or half not in other
