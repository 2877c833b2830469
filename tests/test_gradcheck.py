"""The float64 gradient check by random projections: passes the hand-derived
backward, catches a backward wrong by 1e-3 relative in one leaf and names it, for
every loss (the check differentiates the spec's own loss)."""

from __future__ import annotations

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
        "reports fc1.weight's gradient transposed (h.T @ dz for dz.T @ h) in the backward pass:"
    )
    with pytest.raises(AssertionError, match="likely cause: reports fc1.weight's gradient"):
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
    assert lines[1].startswith("  loss: grad_fn returned ")


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
