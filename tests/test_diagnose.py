"""Each known-cause detector names its trap, and stays silent on unrelated differences."""

import dataclasses

import numpy as np
import pytest

from equiv.diagnose import diagnose_leaf, diagnose_optimizer, diagnose_trees
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
    (
        "gelu",
        dict(
            name="fc1.weight",
            actual=W * (1 + 3e-4 * np.cos(W)),
            expected=W,
            stage="grads",
            activations=("gelu",),
        ),
        "approximate=False",
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
        "gelu-too-far",
        dict(
            name="fc1.weight",
            actual=W * (1 + 0.3 * np.cos(W)),
            expected=W,
            stage="grads",
            activations=("gelu",),
        ),
    ),
    (
        "small-difference-without-gelu",
        dict(
            name="fc1.weight",
            actual=W * (1 + 3e-4 * np.cos(W)),
            expected=W,
            stage="grads",
            activations=("relu",),
        ),
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
    ("zero-reference", dict(name="fc1.bias", actual=G, expected=np.zeros(4), stage="grads")),
]


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


def _run(spec, steps=3, *, decay_after=0.0, grad_scale=1.0, seed=7):
    """A float64 run of ``spec`` (optionally misread as ``decay_after``) on random grads."""
    from equiv.optimizers import manual_init, manual_update

    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(4)}
    initial, state, grads, after = dict(params), manual_init(spec, params), [], []
    for step in range(1, steps + 1):
        g = {n: grad_scale * rng.standard_normal(p.shape) for n, p in params.items()}
        new, state = manual_update(spec, params, g, state, step)
        params = {n: new[n] - decay_after * spec.learning_rate * params[n] for n in new}
        grads.append(g)
        after.append(params)
    return initial, grads, after


SGD_MOM_WD = OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.1)


@pytest.mark.parametrize(
    ("spec", "ran", "decay_after", "phrase"),
    [
        (
            OptimizerSpec("adam", learning_rate=1e-2, weight_decay=0.1),
            OptimizerSpec("adamw", learning_rate=1e-2, weight_decay=0.1),
            0.0,
            "decoupled",
        ),
        (
            OptimizerSpec("adamw", learning_rate=1e-2, weight_decay=0.1),
            OptimizerSpec("adam", learning_rate=1e-2, weight_decay=0.1),
            0.0,
            "to the gradient",
        ),
        (SGD_MOM_WD, dataclasses.replace(SGD_MOM_WD, weight_decay=0.0), 0.1, "after the momentum"),
        (
            OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, dampening=0.5),
            OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9),
            0.0,
            "ignores dampening=0.5",
        ),
        (
            OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9),
            OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, nesterov=True),
            0.0,
            "nesterov=True",
        ),
    ],
    ids=["adam-as-adamw", "adamw-as-adam", "decay-after-momentum", "no-dampening", "nesterov"],
)
def test_optimizer_misreading_is_named(spec, ran, decay_after, phrase):
    initial, grads, params = _run(ran, decay_after=decay_after)
    assert phrase in diagnose_optimizer(spec, initial, grads, params)


@pytest.mark.parametrize(
    ("ran", "grad_scale"),
    [
        (SGD_MOM_WD, 1.0),  # the optimizer it should be: nothing to name
        (SGD_MOM_WD, 3.0),  # wrong gradients, right optimizer: not an optimizer misreading
        (dataclasses.replace(SGD_MOM_WD, learning_rate=0.2), 1.0),  # the lr detector's job
        (dataclasses.replace(SGD_MOM_WD, momentum=0.5), 1.0),  # no known misreading
    ],
    ids=["correct", "wrong-gradients", "learning-rate", "unknown"],
)
def test_no_optimizer_misreading_is_invented(ran, grad_scale):
    initial, grads, params = _run(ran, grad_scale=grad_scale)
    assert diagnose_optimizer(SGD_MOM_WD, initial, grads, params) is None


def test_float32_rounding_is_not_a_misreading():
    # A correct float32 run differs from the float64 replay by rounding only.
    initial, grads, params = _run(OptimizerSpec("adam", learning_rate=1e-2, weight_decay=0.1))
    narrow = [{n: v.astype(np.float32) for n, v in p.items()} for p in params]
    spec = OptimizerSpec("adam", learning_rate=1e-2, weight_decay=0.1)
    assert diagnose_optimizer(spec, initial, grads, narrow) is None
