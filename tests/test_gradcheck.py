"""The float64 gradient check by random projections: passes the hand-derived
backward, catches a backward wrong by 1e-3 relative in one leaf and names it."""

from __future__ import annotations

import numpy as np
import pytest

from equiv import MLPSpec, make_problem, manual
from equiv.gradcheck import check_gradients

SPECS = [
    MLPSpec((4, 3, 2)),
    MLPSpec((6, 5, 5, 5, 3)),  # deep and narrow
    MLPSpec((64, 512, 8)),  # wide: 32k weights, still a handful of forward passes
    MLPSpec((7, 9, 4), bias=False),
]


def _batch(spec: MLPSpec, seed: int, batch: int = 8):
    problem = make_problem(spec, batch_size=batch, seed=seed)
    ((x, y),) = problem.batches
    return problem.params, x, y


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "x".join(map(str, s.sizes)))
def test_hand_derived_backward_passes(spec, equiv_seed):
    params, x, y = _batch(spec, equiv_seed)
    check = check_gradients(params, x, y, spec, seed=equiv_seed)
    check.assert_agree()
    assert len(check.projections) == 2 * len(spec.param_names())
    assert check.worst_ratio < 1.0


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "x".join(map(str, s.sizes)))
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
    assert len(lines) == 3


def test_a_transposed_square_gradient_is_caught(equiv_seed):
    spec = MLPSpec((5, 5, 2))
    params, x, y = _batch(spec, equiv_seed)

    def transposed(p, xb, yb):
        loss, grads = manual.loss_and_grads(p, xb, yb, spec)
        return loss, {**grads, "fc1.weight": grads["fc1.weight"].T}

    assert check_gradients(params, x, y, spec, transposed).failing_leaves() == ["fc1.weight"]


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
