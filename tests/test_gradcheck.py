"""The float64 gradient check by random projections: passes the hand-derived
backward, catches a backward wrong by 1e-3 relative in one leaf and names it, for
every loss (the check differentiates the spec's own loss)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from equiv import LOSSES, MLPSpec, make_problem, manual
from equiv.gradcheck import check_gradients

SPECS = [
    MLPSpec((4, 3, 2)),
    MLPSpec((6, 5, 5, 5, 3)),  # deep and narrow
    MLPSpec((64, 512, 8)),  # wide: 32k weights, still a handful of forward passes
    MLPSpec((7, 9, 4), bias=False),
    # every other loss, with smooth and kinked activations; huber and smooth_l1 with
    # thresholds that put outputs on both sides of their own kink
    *(
        MLPSpec(
            (5, 6, 3),
            activation=("tanh", "gelu", "elu", "leaky_relu", "silu", "sigmoid")[i % 6],
            loss=name,
            label_smoothing=0.1 if name == "cross_entropy" else 0.0,
            huber_delta=0.5,
            smooth_l1_beta=0.5,
        )
        for i, name in enumerate(n for n in LOSSES if n != "mse")
    ),
]


def _ids(spec: MLPSpec) -> str:
    return "x".join(map(str, spec.sizes)) + ("" if spec.loss == "mse" else f"-{spec.loss}")


def _batch(spec: MLPSpec, seed: int, batch: int = 8):
    problem = make_problem(spec, batch_size=batch, seed=seed)
    ((x, y),) = problem.batches
    return problem.params, x, y


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_hand_derived_backward_passes(spec, equiv_seed):
    params, x, y = _batch(spec, equiv_seed)
    check = check_gradients(params, x, y, spec, seed=equiv_seed)
    check.assert_agree()
    assert len(check.projections) == 2 * len(spec.param_names())
    assert check.worst_ratio < 1.0


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_one_leaf_wrong_by_1e_3_is_caught_and_named(spec, equiv_seed):
    params, x, y = _batch(spec, equiv_seed)
    leaf = spec.param_names()[0]  # fc1.weight: the leaf furthest from the loss

    def wrong(p, xb, yb):
        loss, grads = manual.loss_and_grads(p, xb, yb, spec)
        return loss, {**grads, leaf: grads[leaf] * (1 + 1e-3)}

    check = check_gradients(params, x, y, spec, wrong, seed=equiv_seed)
    assert check.failing_leaves() == [leaf]
    with pytest.raises(AssertionError) as info:
        check.assert_agree()
    lines = str(info.value).splitlines()
    assert lines[0] == (
        f"[equiv] gradient check failed for {leaf}: 2 of {len(check.projections)} projections "
        "disagree with finite differences in float64"
    )
    assert lines[1].startswith(f"  {leaf}, direction 0: <grad, v> = ")
    assert len(lines) == 3 and check.cause is None


def test_a_transposed_square_gradient_is_caught(equiv_seed):
    spec = MLPSpec((5, 5, 2))
    params, x, y = _batch(spec, equiv_seed)

    def transposed(p, xb, yb):
        loss, grads = manual.loss_and_grads(p, xb, yb, spec)
        return loss, {**grads, "fc1.weight": grads["fc1.weight"].T}

    check = check_gradients(params, x, y, spec, transposed)
    assert check.failing_leaves() == ["fc1.weight"]
    # The mistake is named (the test above: a leaf off by 1e-3 is not named one).
    assert check.cause.startswith(
        "grad_fn reports fc1.weight's gradient transposed (h.T @ dz for dz.T @ h) in the "
        "backward pass: its gradients "  # of grad_fn's one call: no "step-1" (user trial)
    )
    # The loss, the same with the mistake as without, is given once (user trial).
    assert check.cause.count(f"{check.loss.projected:.9g}") == 1, check.cause
    with pytest.raises(AssertionError, match="likely cause: grad_fn reports fc1.weight's"):
        check.assert_agree()


def test_directions_must_be_positive(equiv_seed):
    params, x, y = _batch(SPECS[0], equiv_seed)
    with pytest.raises(ValueError) as info:
        check_gradients(params, x, y, SPECS[0], directions=0)
    assert str(info.value) == "[equiv] directions must be an int of at least 1, got 0"


def test_to_dict_is_json_ready(equiv_seed):
    import json

    params, x, y = _batch(SPECS[0], equiv_seed)
    data = json.loads(json.dumps(check_gradients(params, x, y, SPECS[0]).to_dict()))
    assert data["agree"] is True and len(data["projections"]) == 8
    assert np.isfinite(data["worst_ratio"])
    assert data["environment"]["versions"]["numpy"] == np.__version__


def test_a_loss_kink_under_an_output_is_detected(equiv_seed):
    # smooth_l1's threshold set to one output's |o - y|: every direction moving that
    # output crosses the loss's own kink, so the check refuses rather than difference
    # across it; with the threshold far away no direction is replaced.
    spec = MLPSpec((4, 3, 2), loss="smooth_l1")
    params, x, y = _batch(spec, equiv_seed)
    p64 = {k: v.double().numpy() for k, v in params.items()}
    out, _ = manual.forward(p64, x.double().numpy(), spec.replace(dtype="float64"))
    on_kink = spec.replace(smooth_l1_beta=float(abs(out[0, 0] - y[0, 0].double().item())))
    with pytest.raises(ValueError, match="of the smooth_l1 loss"):
        check_gradients(params, x, y, on_kink, seed=equiv_seed)
    far = check_gradients(params, x, y, spec.replace(smooth_l1_beta=1e3), seed=equiv_seed)
    assert far.agree and far.skipped == 0


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_a_wrong_loss_is_caught_even_with_right_gradients(spec, equiv_seed):
    # Found in a user trial: a loss summed where the spec takes the mean passed, as the
    # returned loss was never looked at. The twin: the right loss passes (above).
    params, x, y = _batch(spec, equiv_seed)

    def summed(p, xb, yb):
        loss, grads = manual.loss_and_grads(p, xb, yb, spec)
        return loss * 8, grads

    check = check_gradients(params, x, y, spec, summed, seed=equiv_seed)
    assert check.failing_leaves() == ["loss"]
    assert check.loss.ratio > 1e6
    with pytest.raises(AssertionError) as info:
        check.assert_agree()
    lines = str(info.value).splitlines()
    assert lines[0].endswith("; the returned loss is not the spec's")
    # The likely causes come first (a factor of the batch size here), then the checks.
    causes = [line for line in lines[1:] if line.startswith("  likely cause: ")]
    assert lines[1 : 1 + len(causes)] == causes
    assert lines[1 + len(causes)].startswith("  loss: grad_fn returned ")


def _returning(spec, change):
    def grad_fn(p, xb, yb):
        loss, grads = manual.loss_and_grads(p, xb, yb, spec)
        return change(loss, grads)

    return grad_fn


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda loss, g: (loss, {**g, "fc1.weight": g["fc1.weight"].T}),
            "grad_fn's gradient for fc1.weight has shape (3, 4), but the parameter's is (4, 3): "
            "the transpose. A weight's gradient is (out, in) like the weight: dz.T @ h, not "
            "h.T @ dz",
        ),
        (
            lambda loss, g: (loss, {**g, "fc1.bias": g["fc1.bias"][None]}),
            "grad_fn's gradient for fc1.bias has shape (1, 4), but the parameter's is (4,): "
            "each gradient has its parameter's shape (a bias's is (out,): sum dz over the "
            "batch axis)",
        ),
        (
            lambda loss, g: g,
            "grad_fn must return a pair (loss, grads), got a dict; return the loss too: "
            "`return loss, grads`",
        ),
        (
            lambda loss, g: (np.full(3, loss), g),
            "grad_fn must return the loss as one number, got shape (3,)",
        ),
    ],
    ids=["transposed", "bias-kept-dims", "grads-only", "loss-not-scalar"],
)
def test_a_misshapen_result_is_refused_by_name(change, expected, equiv_seed):
    # Found in a user trial: h.T @ dz for a non-square weight crashed inside the update
    # with NumPy's broadcast error, and a (1, out) bias gradient broadcast silently.
    import torch

    from equiv import TorchMLP, check_manual_backward

    spec = MLPSpec((3, 4, 2), dtype="float64")
    params, x, y = _batch(spec, equiv_seed)
    with pytest.raises(ValueError) as info:
        check_gradients(params, x, y, spec, _returning(spec, change))
    assert str(info.value) == f"[equiv] {expected}"
    torch.manual_seed(equiv_seed)
    model = TorchMLP(spec).double()
    with pytest.raises(ValueError) as info:
        check_manual_backward(model, _returning(spec, change), x, y)
    assert str(info.value) == f"[equiv] {expected}"
    # The twin: unchanged, both accept it.
    assert check_gradients(params, x, y, spec, _returning(spec, lambda *r: r)).agree
    assert check_manual_backward(model, _returning(spec, lambda *r: r), x, y).agree


# Known causes of a failing gradient check: each wrong grad_fn below is named by the
# catalogue (equiv.diagnose), and the factor is measured by the finite differences
# too. (id, spec, change of the right (loss, grads), the hint's leaves, what it says,
# the factor the finite differences must measure).
_MSE = MLPSpec((4, 6, 3), activation="tanh")
_CE = MLPSpec((4, 6, 3), activation="tanh", loss="cross_entropy")
_ALL = "fc1.weight, fc1.bias, fc2.weight, fc2.bias"
_REF = "the float64 reference"
FACTOR_CASES = [
    (
        "mse-dout-without-2",  # d/dout of mean((out - y)²) written (out - y)/N: the user trial
        _MSE,
        lambda loss, g: (loss, {k: v / 2 for k, v in g.items()}),
        _ALL,
        # In a backward's terms, not optax's (found in a user trial).
        f"grad_fn's grads are 0.5 times {_REF}'s. A factor 2: the gradient of mean((p - y)²) "
        "is 2(p - y)/n; a backward that starts from (p - y)/n halves every gradient (<grad",
        0.5,
    ),
    (
        "mse-doubled",
        _MSE,
        lambda loss, g: (loss, {k: v * 2 for k, v in g.items()}),
        _ALL,
        # Doubled, not halved: not optax.l2_loss's ½ (found in a user trial).
        f"grad_fn's grads are 2 times {_REF}'s. A factor 2, grad_fn's the larger: grad_fn "
        "counts the 2 of the gradient of mean((p - y)²), 2(p - y)/n, twice",
        2.0,
    ),
    (
        "sign-flipped",
        _MSE,
        lambda loss, g: (loss, {k: -v for k, v in g.items()}),
        _ALL,
        # No update in a gradient check: none is named (found in a user trial).
        f"grad_fn's grads are -1 times {_REF}'s. The sign is flipped: a gradient of the "
        "negated loss (p - y written y - p) (<grad",
        -1.0,
    ),
    (
        "summed-over-the-batch",
        _MSE,
        lambda loss, g: (loss, {k: v * 8 for k, v in g.items()}),
        _ALL,
        f"grad_fn's grads are 8 times {_REF}'s. A factor of the batch size: grad_fn sums "
        f"over the batch where {_REF} takes the mean",
        8.0,
    ),
    (
        "one-leaf-doubled",
        _MSE,
        lambda loss, g: (loss, {**g, "fc1.weight": g["fc1.weight"] * 2}),
        "fc1.weight",
        f"grad_fn's grads are 2 times {_REF}'s. A factor 2 in these gradients only, not in "
        "every one: not the loss (its reduction or convention scales every gradient) but these "
        "leaves' own backward (their chain rule or reduction)",
        2.0,
    ),
    (
        "one-leaf-5-percent-off",  # a constant factor 1.05: measured, not a rounding
        _MSE,
        lambda loss, g: (loss, {**g, "fc2.weight": g["fc2.weight"] * 1.05}),
        "fc2.weight",
        f"grad_fn's grads are 1.05 times {_REF}'s. A factor 1.05 in these gradients only",
        1.05,
    ),
    (
        "bias-gradient-left-zero",
        _MSE,
        lambda loss, g: (loss, {**g, "fc2.bias": np.zeros_like(g["fc2.bias"])}),
        "fc2.bias",
        f"grad_fn's gradient is zero where {_REF}'s is not: in grad_fn the gradient is left "
        "at zero (never computed, or overwritten) or the chain rule stops before this layer",
        0.0,
    ),
    (
        "cross-entropy-halved",
        _CE,
        lambda loss, g: (loss, {k: v / 2 for k, v in g.items()}),
        _ALL,
        f"grad_fn's grads are 0.5 times {_REF}'s. A factor 2, not MSE's: the cross_entropy "
        "loss counted twice or halved, or a factor 2 in its formula or its backward",
        0.5,
    ),
]

_MEASURED = re.compile(
    r" \(<grad, v> / finite difference = (\S+) along each of (\d+) random directions, "
    r"spread (\S+)\)\.$"
)


def _hand_written(spec, change):
    """A user's grad_fn: the spec's float64 backward, then ``change`` (a mistake)."""
    spec64 = spec.replace(dtype="float64")

    def grad_fn(p, xb, yb):
        loss, grads = manual.loss_and_grads(p, xb, yb, spec64)
        return change(loss, grads)

    return grad_fn


@pytest.mark.parametrize(
    ("spec", "change", "leaves", "says", "factor"),
    [case[1:] for case in FACTOR_CASES],
    ids=[case[0] for case in FACTOR_CASES],
)
def test_a_constant_factor_is_named_with_its_measurement(
    spec, change, leaves, says, factor, equiv_seed
):
    params, x, y = _batch(spec, equiv_seed)
    check = check_gradients(params, x, y, spec, _hand_written(spec, change), seed=equiv_seed)
    assert check.failing_leaves() == sorted(leaves.split(", "))
    # Before, cause was None here (found in a user trial) and there were no hints.
    assert check.cause is not None and check.cause.startswith(f"{leaves}: {says}")
    (hint,) = check.hints()
    assert hint == check.cause
    # The numbers behind it: the factor <g, v> / D(h) along every direction of those
    # leaves, as the projections give it, and their spread.
    mean, count, spread = _MEASURED.search(hint).groups()
    ratios = [p.projected / p.finite_difference for p in check.projections if p.name in leaves]
    assert int(count) == len(ratios) == 2 * len(leaves.split(", "))
    assert float(mean) == pytest.approx(np.mean(ratios), rel=1e-6, abs=1e-300)
    assert float(mean) == pytest.approx(factor, abs=1e-6)
    assert float(spread) == pytest.approx(max(ratios) - min(ratios), rel=0.06, abs=1e-300)
    assert float(spread) < 1e-6 * max(abs(factor), 1.0)
    lines = str(check).splitlines()
    assert lines[1] == f"  likely cause: {hint}"  # under the headline, before the checks
    assert not any("likely cause" in line for line in lines[2:])
    assert str(check) == check.failure_text()
    with pytest.raises(AssertionError) as info:
        check.assert_agree()
    assert str(info.value) == str(check)
    assert check.to_dict()["hints"] == [hint]


@pytest.mark.parametrize("spec", [_MSE, _CE], ids=_ids)
def test_the_right_gradient_gets_no_hint(spec, equiv_seed):
    # The twin of every case above: the spec's own backward, unchanged, by hand.
    params, x, y = _batch(spec, equiv_seed)
    check = check_gradients(params, x, y, spec, _hand_written(spec, lambda *r: r))
    assert check.agree and check.hints() == [] and check.cause is None
    assert str(check) == (
        "[equiv] gradient check passed: 8 projections and the returned loss agree with finite "
        f"differences in float64 (worst ratio to the bound {check.worst_ratio:.3g})"
    )
    assert check.failure_text() == "" and check.to_dict()["hints"] == []


@pytest.mark.parametrize("leaves", [("fc1.weight",), ("fc1.weight", "fc2.bias", "fc2.weight")])
def test_a_random_error_gets_no_hint(leaves, equiv_seed):
    # 10% noise: no constant factor, no known mistake; the check fails and names none.
    params, x, y = _batch(_MSE, equiv_seed)
    noise = np.random.default_rng(equiv_seed)

    def noisy(loss, g):
        return loss, {
            k: v + 0.1 * np.abs(v).mean() * noise.standard_normal(v.shape) if k in leaves else v
            for k, v in g.items()
        }

    check = check_gradients(params, x, y, _MSE, _hand_written(_MSE, noisy), seed=equiv_seed)
    assert check.failing_leaves() == sorted(leaves)
    assert check.hints() == [] and check.cause is None
    assert "likely cause" not in str(check)


def test_a_loss_and_gradients_at_half_are_each_named(equiv_seed):
    # optax.l2_loss's convention, ½ mean((out - y)²), with its (right) gradient: the loss
    # and the gradients are each half the spec's, and each hint says so with its numbers.
    params, x, y = _batch(_MSE, equiv_seed)
    change = _hand_written(_MSE, lambda loss, g: (loss / 2, {k: v / 2 for k, v in g.items()}))
    check = check_gradients(params, x, y, _MSE, change, seed=equiv_seed)
    assert check.failing_leaves() == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight", "loss"]
    loss_hint, grads_hint = check.hints()
    returned, exact = check.loss.projected, check.loss.finite_difference
    assert loss_hint == (
        f"loss: grad_fn's loss is 0.5 times {_REF}'s. A factor 2: MSELoss is "
        f"mean((p - y)²), with no ½ in front (grad_fn returned {returned:.9g}, the spec's "
        f"float64 loss is {exact:.9g})."
    )
    assert returned == pytest.approx(exact / 2, rel=1e-12)
    assert grads_hint.startswith(f"{_ALL}: grad_fn's grads are 0.5 times {_REF}'s. A factor 2")
    assert _MEASURED.search(grads_hint).group(1) == "0.5"


@pytest.mark.parametrize(
    "wrong",
    [
        lambda g: {k: 2 * v for k, v in g.items()},
        lambda g: {**g, "fc2.bias": np.zeros_like(g["fc2.bias"])},
    ],
    ids=["doubled", "one-leaf-zero"],
)
def test_a_reference_that_disagrees_with_the_finite_differences_names_nothing(
    wrong, monkeypatch, equiv_seed
):
    # The catalogue holds grad_fn to the float64 reference only where the finite
    # differences confirm the reference. Here the reference is made wrong: doubled, the
    # gradients at 4 times would read as "a factor 2"; with one leaf zero, the others
    # (at 4 times too) as a factor "in these gradients only". No hint instead.
    from types import SimpleNamespace

    from equiv import gradcheck

    spec = MLPSpec((4, 3, 2))
    params, x, y = _batch(spec, equiv_seed)
    quadrupled = _hand_written(spec, lambda loss, g: (loss, {k: 4 * v for k, v in g.items()}))
    honest = check_gradients(params, x, y, spec, quadrupled, seed=equiv_seed)
    assert honest.hints()[0].startswith(f"{_ALL}: grad_fn's grads are 4 times {_REF}'s.")

    def wrong_reference(p, xb, yb, s, masks=None):
        loss, grads = manual.loss_and_grads(p, xb, yb, s, masks)
        return loss, wrong(grads)

    fake = SimpleNamespace(forward=manual.forward, loss_and_grads=wrong_reference)
    monkeypatch.setattr(gradcheck, "manual", fake)
    check = check_gradients(params, x, y, spec, quadrupled, seed=equiv_seed)
    assert check.failing_leaves() == honest.failing_leaves() and check.hints() == []


# ---------------------------------------------------------------------------
# Inputs refused before any check (found in a user trial)

TANH_5663 = MLPSpec((5, 6, 6, 3), activation="tanh")


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (MLPSpec((9, 9, 9, 9), activation="tanh"), "wrong shape: 'fc1.weight' expected (9, 9)"),
        (MLPSpec((5, 7, 6, 3), activation="tanh"), "wrong shape: 'fc1.weight' expected (7, 5)"),
        (MLPSpec((5, 6, 6, 6, 3), activation="tanh"), "missing: 'fc4.weight'"),
        (MLPSpec((5, 6, 3), activation="tanh"), "unexpected: 'fc3.weight'"),
        (TANH_5663.replace(bias=False), "unexpected: 'fc1.bias'"),
    ],
    ids=["other-sizes", "other-width", "deeper", "shallower", "no-bias"],
)
def test_a_spec_that_does_not_describe_the_params_is_refused(spec, says, equiv_seed):
    # Before, (9, 9, 9, 9) and (5, 7, 6, 3) passed, and the others failed deep inside
    # the forward pass or the diagnosis (KeyError, a NumPy broadcast error).
    params, x, y = _batch(TANH_5663, equiv_seed, batch=6)
    with pytest.raises(ValueError) as info:
        check_gradients(params, x, y, spec)
    text = str(info.value)
    assert says in text, text
    assert text.endswith(
        "The params are those of an MLP of sizes (5, 6, 6, 3) (bias=True): pass "
        "spec=MLPSpec((5, 6, 6, 3), ...) with the model's activation and loss"
    )
    assert check_gradients(params, x, y, TANH_5663).agree  # the twin: the params' spec


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            lambda x, y: (x[:, :4], y),
            "x must have shape (batch, 5) with at least one row, got (6, 4)",
        ),
        (lambda x, y: (x[:0], y[:0]), "with at least one row, got (0, 5)"),  # found in review
        (lambda x, y: (x, y[:5]), "y must have shape (6, 3) as x has 6 rows, got (5, 3)"),
        (lambda x, y: (x, y[:, 0]), "y must have shape (6, 3) as x has 6 rows, got (6,)"),
    ],
    ids=["x-narrow", "x-empty", "y-short", "y-flat"],
)
def test_a_batch_of_another_shape_is_refused(change, says, equiv_seed):
    params, x, y = _batch(TANH_5663, equiv_seed, batch=6)
    with pytest.raises(ValueError, match=re.escape(says)):
        check_gradients(params, *change(x, y), TANH_5663)


def test_labels_are_checked_for_cross_entropy(equiv_seed):
    spec = MLPSpec((4, 5, 3), loss="cross_entropy")
    params, x, y = _batch(spec, equiv_seed, batch=6)
    with pytest.raises(ValueError, match=r"y holds labels outside \[0, 3\): 0 to 3"):
        check_gradients(params, x, np.array([0, 1, 2, 3, 0, 1]), spec)
    with pytest.raises(ValueError, match=r"integer class labels of shape \(6,\)"):
        check_gradients(params, x, np.zeros((6, 3)), spec)
    assert check_gradients(params, x, y, spec).agree  # the twin: labels in range
    # Whole-number float labels are labels (they passed before the check was added).
    assert check_gradients(params, x, np.asarray(y, np.float64), spec).agree
    with pytest.raises(ValueError, match=r"integer class labels"):
        check_gradients(params, x, np.asarray(y, np.float64) + 0.5, spec)


def test_a_pair_returned_the_other_way_round_is_told(equiv_seed):
    params, x, y = _batch(TANH_5663, equiv_seed, batch=6)
    swapped = _hand_written(TANH_5663, lambda loss, grads: (grads, loss))
    with pytest.raises(ValueError, match=re.escape("grad_fn returned (grads, loss)")):
        check_gradients(params, x, y, TANH_5663, swapped)


def test_a_nan_in_a_gradient_is_located(equiv_seed):
    # Before: "difference nan (up to nan allowed, ratio inf)".
    params, x, y = _batch(TANH_5663, equiv_seed, batch=6)

    def nan_at_1_2(loss, grads):
        weight = grads["fc2.weight"].copy()
        weight[1, 2] = np.nan
        return loss, {**grads, "fc2.weight": weight}

    check = check_gradients(params, x, y, TANH_5663, _hand_written(TANH_5663, nan_at_1_2))
    assert check.failing_leaves() == ["fc2.weight"]
    bad = [p for p in check.projections if not p.passed]
    assert all(math.isfinite(p.bound) and p.ratio == math.inf for p in bad)
    assert all(
        p.describe().endswith(
            ": the gradient holds NaN or Inf at 1 of 36 entries, the first at index (1, 2)"
        )
        for p in bad
    )
    assert "nan allowed" not in str(check)


# ---------------------------------------------------------------------------
# A hand-written backward is told in its own terms (found in a user trial: its hints
# named optax.l2_loss, jax.nn.leaky_relu, optax.smooth_labels and an update)

JAX_WORDS = ("optax", "jax.", "stop_gradient", "update added")


@pytest.mark.parametrize(
    ("spec", "wrong", "says"),
    [
        (
            MLPSpec((4, 6, 3), activation="leaky_relu", negative_slope=0.2),
            {"negative_slope": 0.01},
            "torch's nn.LeakyReLU(0.2) is the model's: use 0.2 in the forward and in its "
            "derivative",
        ),
        (
            MLPSpec((4, 6, 3), activation="tanh", loss="cross_entropy", label_smoothing=0.1),
            {"label_smoothing": 0.0},
            "target: (1 - ε)·one_hot + ε/classes, in the loss and in its backward",
        ),
        (
            MLPSpec((4, 6, 3), activation="gelu"),
            {"activation": "gelu_tanh"},
            "is ½x(1 + tanh(√(2/π)(x + 0.044715x³))): use the model's in the forward",
        ),
    ],
    ids=["leaky-slope", "smoothing-left-out", "gelu-tanh"],
)
def test_a_hand_written_backwards_mistake_is_told_in_its_terms(spec, wrong, says, equiv_seed):
    params, x, y = _batch(spec, equiv_seed)
    theirs = spec.replace(dtype="float64", **wrong)
    check = check_gradients(
        params, x, y, spec, lambda p, xb, yb: manual.loss_and_grads(p, xb, yb, theirs)
    )
    text = " ".join(check.hints())
    assert says in text, text
    assert not any(word in text for word in JAX_WORDS), text


def test_check_manual_backward_names_a_halved_dout_in_a_backwards_terms(equiv_seed):
    import torch

    from equiv import TorchMLP, check_manual_backward

    spec = MLPSpec((4, 6, 3), activation="tanh")
    torch.manual_seed(equiv_seed)
    model = TorchMLP(spec)
    x, y = torch.randn(8, 4), torch.randn(8, 3)

    def halved(p, xb, yb):
        loss, grads = manual.loss_and_grads(p, xb, yb, spec.replace(dtype="float32"))
        return loss, {name: g / 2 for name, g in grads.items()}

    hints = check_manual_backward(model, halved, x, y).hints()
    text = " ".join(hints)
    assert "a backward that starts from (p - y)/n halves every gradient" in text, hints
    assert not any(word in text for word in JAX_WORDS), text


def test_gradients_returned_in_float32_are_named():
    # float32's rounding is near the check's bound: it fails some leaves for 2 seeds in
    # 3 of this model's (30 measured). Seed 12 fails two leaves, at ratio 3.2.
    params, x, y = _batch(TANH_5663, 12)

    def in_float32(loss, grads):
        return loss, {name: g.astype(np.float32) for name, g in grads.items()}

    check = check_gradients(params, x, y, TANH_5663, _hand_written(TANH_5663, in_float32))
    assert len(check.failing_leaves()) == 2
    (hint,) = check.hints()
    assert hint.startswith(
        ", ".join(n for n in TANH_5663.param_names() if n in check.failing_leaves())
    )
    assert "grad_fn's values are all float32 numbers in a float64 run" in hint
    assert ".astype(np.float32)" in hint and "jax" not in hint

    # The twin: float64 values off by as much are no float32 numbers, and not so named.
    def off(loss, grads):
        return loss, {n: g * (1 + 1e-6) for n, g in grads.items()}

    check = check_gradients(params, x, y, TANH_5663, _hand_written(TANH_5663, off))
    assert check.failing_leaves()
    assert not any("float32 numbers" in hint for hint in check.hints())


def test_two_gradients_stored_under_each_others_names_are_named(equiv_seed):
    params, x, y = _batch(TANH_5663, equiv_seed, batch=6)

    def swapped(loss, grads):
        return loss, {**grads, "fc1.bias": grads["fc2.bias"], "fc2.bias": grads["fc1.bias"]}

    check = check_gradients(params, x, y, TANH_5663, _hand_written(TANH_5663, swapped))
    assert check.failing_leaves() == ["fc1.bias", "fc2.bias"]
    assert check.hints() == [
        "fc1.bias, fc2.bias: grad_fn returns each one's gradient under the other's name (a "
        "layer index off by one where the results are stored, or two results exchanged)."
    ]

    # The twin: one of them wrong in another way is no exchange.
    def one_swapped(loss, grads):
        return loss, {**grads, "fc1.bias": grads["fc2.bias"], "fc2.bias": 2 * grads["fc2.bias"]}

    check = check_gradients(params, x, y, TANH_5663, _hand_written(TANH_5663, one_swapped))
    assert not any("under the other's name" in hint for hint in check.hints())


def test_a_mean_over_the_outputs_taken_twice_is_said_of_dout(equiv_seed):
    # Found in review: a third of the spec's gradients was told "dout divided by the
    # batch size where MSELoss divides by batch · outputs", the other direction's.
    params, x, y = _batch(TANH_5663, equiv_seed, batch=6)
    twice = _hand_written(TANH_5663, lambda loss, g: (loss, {k: v / 3 for k, v in g.items()}))
    (hint,) = check_gradients(params, x, y, TANH_5663, twice).hints()
    assert "A factor of the output width: grad_fn divides by the output width once more" in hint
    assert "(dout divided by out.size and again by the output width)" in hint, hint


def test_a_mean_over_the_batch_only_is_said_of_dout(equiv_seed):
    # Found in a user trial: "a loss summed per sample, then averaged over the batch" is
    # a port's wording; a backward divides dout by the batch size, not by out.size.
    params, x, y = _batch(TANH_5663, equiv_seed, batch=6)
    by_batch = _hand_written(TANH_5663, lambda loss, g: (loss, {k: 3 * v for k, v in g.items()}))
    (hint,) = check_gradients(params, x, y, TANH_5663, by_batch).hints()
    assert "A factor of the output width: grad_fn sums over the outputs where " in hint
    assert (
        "(dout divided by the batch size where MSELoss divides by batch · outputs, out.size)"
        in hint
    )


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda g: {k: np.float32(0.5) * v.astype(np.float32) for k, v in g.items()}, "A factor 2"),
        (lambda g: {**g, "fc2.bias": np.sign(g["fc2.bias"])}, None),
        (lambda g: {**g, "fc2.bias": np.full_like(g["fc2.bias"], np.inf)}, None),
    ],
    ids=["float32-and-halved", "sign", "inf"],
)
def test_float32_is_named_only_where_it_is_all_the_difference(change, says, equiv_seed):
    # Found in review: a float32 backward that also halves its gradients was put down to
    # float32, and so were np.sign(g) and an Inf, whose values are float32 numbers too.
    params, x, y = _batch(TANH_5663, equiv_seed, batch=6)
    check = check_gradients(
        params, x, y, TANH_5663, _hand_written(TANH_5663, lambda loss, g: (loss, change(g)))
    )
    assert check.failing_leaves()
    text = " ".join(check.hints())
    assert "float32 numbers" not in text, text
    if says:
        assert says in text, text
