"""Each known-cause detector names its trap, and stays silent on unrelated differences."""

import numpy as np
import pytest

from equiv.diagnose import diagnose_leaf, diagnose_trees

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
