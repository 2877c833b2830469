"""The hand-derived backward pass against finite differences, on NumPy and on torch.

Finite differences run in float64 on NumPy and use only :func:`equiv.manual.forward`,
so they check :func:`equiv.manual.loss_and_grads` against an independent derivative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from array_api_compat import array_namespace

import equiv
from equiv import manual
from equiv.compare import compare_trees
from equiv.tolerance import derived_tolerance

# (name, sizes, bias, batch)
FD_CASES = [
    ("notebook", (4, 3, 2), True, 2),
    ("deep_narrow", (3, 4, 4, 4, 4, 4, 2), True, 5),
    ("no_bias", (5, 7, 3), False, 4),
    ("deep_no_bias", (3, 4, 4, 4, 2), False, 3),
    ("one_layer", (2, 1), True, 1),
    ("bottleneck", (6, 1, 6), True, 3),
    ("batch_17", (4, 8, 3), True, 17),
    ("mixed_bias", (4, 5, 5, 3), (True, False, True), 4),  # one bool per layer
    ("mixed_bias_ends_off", (3, 4, 4, 4, 2), (False, True, True, False), 3),
]
H = 1e-6
U64 = 2.0**-53
# A pre-activation this far from 0 cannot change sign when one parameter moves by H:
# the move changes each z by at most H times a product of O(1) weights and inputs.
KINK_MARGIN = 1e-4


def draw(spec: equiv.MLPSpec, batch: int, rng: np.random.Generator):
    """Parameters (scaled as torch's init scales them), a batch and targets in float64,
    redrawn until no hidden pre-activation lies within KINK_MARGIN of the ReLU kink."""
    for _ in range(100):
        params = {}
        for name, shape in spec.param_shapes().items():
            fan_in = spec.sizes[int(name[2 : name.index(".")]) - 1]
            params[name] = rng.standard_normal(shape) / math.sqrt(fan_in)
        x = rng.standard_normal((batch, spec.sizes[0]))
        y = rng.standard_normal((batch, spec.sizes[-1]))
        _, zs = manual.forward(params, x, spec)
        if all(np.min(np.abs(z)) > KINK_MARGIN for z in zs[:-1]):
            return params, x, y
    raise AssertionError("no draw without a pre-activation near the kink")  # pragma: no cover


def fd_ratios(params, x, y, spec, grads) -> dict[str, float]:
    """Per leaf, max over entries of |central difference - grads| / bound.

    Bound. For one scalar parameter p with the ReLU pattern fixed (``draw`` ensures
    it stays fixed within ±H), every later pre-activation is affine in p, so the
    loss is a quadratic in p and the central difference
    (L(p+h) - L(p-h)) / 2h has no truncation error: the h²/6·L''' term is 0. What
    is left is rounding: each evaluated loss is off by at most δ = 8·√k·u·S
    (NUMERICS.md's c·u·√k rule, k the longest reduction, S = mean((|out|+|y|)²) the
    size of the summands of the mean), and the difference quotient by at most
    2δ / 2h = δ/h. With h = 1e-6, u = 2⁻⁵³ and k ≤ 17 that is about 4e-9·S, while
    a gradient wrong by 1e-4 relative is off by about 1e-5 here. The step used is
    (p+h) - p, the representable one, so rounding p+h costs nothing.
    """
    out, _ = manual.forward(params, x, spec)
    k = max(max(spec.sizes), x.shape[0], out.size)
    summands = float(np.mean((np.abs(out) + np.abs(y)) ** 2))
    bound = 8.0 * math.sqrt(k) * U64 * max(summands, 1.0) / H

    def loss(p):
        o, _ = manual.forward(p, x, spec)
        return float(np.mean((o - y) ** 2))

    ratios = {}
    for name, value in params.items():
        worst = 0.0
        for index in np.ndindex(value.shape):
            plus, minus = dict(params), dict(params)
            plus[name], minus[name] = value.copy(), value.copy()
            plus[name][index] = value[index] + H
            minus[name][index] = value[index] - H
            step = (plus[name][index] - minus[name][index]) / 2
            fd = (loss(plus) - loss(minus)) / (2 * step)
            worst = max(worst, abs(fd - float(grads[name][index])) / bound)
        ratios[name] = worst
    return ratios


def assert_grads_match_fd(params, x, y, spec, grads) -> dict[str, float]:
    ratios = fd_ratios(params, x, y, spec, grads)
    failing = [
        f"{name}: {ratio:.3g} times the bound" for name, ratio in ratios.items() if not ratio <= 1.0
    ]
    if failing:
        raise AssertionError("finite differences disagree: " + "; ".join(failing))
    return ratios


@pytest.mark.parametrize(("name", "sizes", "bias", "batch"), FD_CASES, ids=[c[0] for c in FD_CASES])
def test_backward_matches_finite_differences(name, sizes, bias, batch, rng):
    spec = equiv.MLPSpec(sizes, bias=bias, dtype="float64")
    params, x, y = draw(spec, batch, rng)
    loss, grads = manual.loss_and_grads(params, x, y, spec)
    assert list(grads) == spec.param_names()
    assert all(grads[k].shape == params[k].shape and grads[k].dtype == np.float64 for k in grads)
    assert float(loss) == pytest.approx(
        float(np.mean((manual.forward(params, x, spec)[0] - y) ** 2)), rel=1e-15
    )
    ratios = assert_grads_match_fd(params, x, y, spec, grads)
    assert max(ratios.values()) < 1.0


class _FirstRowSum:
    """An array namespace whose ``sum`` keeps the first row: a bias gradient not summed."""

    def __init__(self, xp):
        self._xp = xp

    def __getattr__(self, attr):
        return getattr(self._xp, attr)

    def sum(self, a, axis=None):
        return a[0]


def _scale_one_leaf(grads, leaf, factor):
    return {k: v * factor if k == leaf else v for k, v in grads.items()}


@pytest.mark.parametrize("case", ["notebook", "deep_narrow"])
def test_fd_check_catches_a_bias_gradient_not_summed(case, rng, monkeypatch):
    _, sizes, bias, batch = next(c for c in FD_CASES if c[0] == case)
    spec = equiv.MLPSpec(sizes, bias=bias, dtype="float64")
    params, x, y = draw(spec, batch, rng)
    monkeypatch.setattr(manual, "array_namespace", lambda *a: _FirstRowSum(array_namespace(*a)))
    _, grads = manual.loss_and_grads(params, x, y, spec)
    monkeypatch.undo()
    with pytest.raises(AssertionError, match=r"finite differences disagree: .*fc1\.bias") as info:
        assert_grads_match_fd(params, x, y, spec, grads)
    # Only bias leaves are wrong: every weight gradient still passes.
    assert ".weight" not in str(info.value)


def test_fd_check_catches_a_backward_that_leaves_out_a_layers_bias(rng):
    # The twin of the mixed_bias cases: a backward written as if fc3, which has a bias,
    # had none (its forward pass without it, its gradient reported 0).
    _, sizes, bias, batch = next(c for c in FD_CASES if c[0] == "mixed_bias")
    spec = equiv.MLPSpec(sizes, bias=bias, dtype="float64")
    params, x, y = draw(spec, batch, rng)
    kept = {k: v for k, v in params.items() if k != "fc3.bias"}
    _, grads = manual.loss_and_grads(kept, x, y, spec.replace(bias=(True, False, False)))
    grads["fc3.bias"] = np.zeros_like(params["fc3.bias"])
    with pytest.raises(AssertionError, match=r"finite differences disagree: .*fc3\.bias"):
        assert_grads_match_fd(params, x, y, spec, grads)


def test_layers_without_a_bias_get_no_bias_gradient(rng):
    spec = equiv.MLPSpec((4, 5, 5, 3), bias=(True, False, True), dtype="float64")
    params, x, y = draw(spec, 3, rng)
    assert "fc2.bias" not in params
    _, grads = manual.loss_and_grads(params, x, y, spec)
    _, sizes = manual.magnitudes(params, x, y, spec)
    expected = ["fc1.weight", "fc1.bias", "fc2.weight", "fc3.weight", "fc3.bias"]
    assert list(grads) == list(sizes) == expected


@pytest.mark.parametrize(
    ("bug", "leaf", "factor"),
    [
        ("1e-4 relative on one leaf", "fc2.weight", 1 + 1e-4),
        ("MSE gradient without its factor 2", None, 0.5),
    ],
)
def test_fd_check_catches_a_wrong_gradient(bug, leaf, factor, rng):
    spec = equiv.MLPSpec((3, 4, 4, 4, 4, 4, 2), dtype="float64")
    params, x, y = draw(spec, 5, rng)
    _, grads = manual.loss_and_grads(params, x, y, spec)
    wrong = (
        {k: v * factor for k, v in grads.items()}
        if leaf is None
        else _scale_one_leaf(grads, leaf, factor)
    )
    with pytest.raises(AssertionError, match="finite differences disagree") as info:
        assert_grads_match_fd(params, x, y, spec, wrong)
    if leaf is not None:
        assert str(info.value) == (
            "finite differences disagree: "
            f"{leaf}: {fd_ratios(params, x, y, spec, wrong)[leaf]:.3g} times the bound"
        )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("name", "sizes", "bias", "batch"), FD_CASES[:3], ids=[c[0] for c in FD_CASES[:3]]
)
def test_same_code_on_numpy_and_torch_agrees(name, sizes, bias, batch, dtype, equiv_seed):
    spec = equiv.MLPSpec(sizes, bias=bias, dtype=dtype)
    problem = equiv.make_problem(spec, batch_size=batch, seed=equiv_seed)
    x, y = problem.batches[0]
    t_loss, t_grads = manual.loss_and_grads(problem.params, x, y, spec)
    n_params = {k: v.numpy() for k, v in problem.params.items()}
    n_loss, n_grads = manual.loss_and_grads(n_params, x.numpy(), y.numpy(), spec)
    # Each runs in its own library and keeps the dtype (NumPy 2 promotes silently).
    assert isinstance(t_loss, torch.Tensor) and all(
        isinstance(g, torch.Tensor) for g in t_grads.values()
    )
    assert isinstance(n_loss, np.ndarray | np.generic)
    assert all(isinstance(g, np.ndarray) for g in n_grads.values())
    assert {str(g.dtype) for g in n_grads.values()} | {str(n_loss.dtype)} == {dtype}
    assert {g.dtype for g in t_grads.values()} | {t_loss.dtype} == {getattr(torch, dtype)}
    for stage, a, b in [("loss", {"loss": t_loss}, {"loss": n_loss}), ("grads", t_grads, n_grads)]:
        tol = derived_tolerance(spec, batch, stage, 1, (dtype, dtype))
        diffs = compare_trees(a, b, tol, stage=stage, actual_name="torch", expected_name="numpy")
        assert all(d.passed for d in diffs), [d.describe() for d in diffs if not d.passed]


def _notebook_steps():
    """The notebook's three steps, manual gradients on torch tensors."""
    spec = equiv.MLPSpec((4, 3, 2))
    problem = equiv.make_problem(spec, batch_size=2, seed=0, steps=3)
    params = dict(problem.params)
    for x, y in problem.batches:
        _, grads = manual.loss_and_grads(params, x, y, spec)
        yield params, grads
        params = manual.sgd_update(params, grads, 0.1)


def _torch_sgd(params, grads, lr):
    tensors = [torch.nn.Parameter(p.clone()) for p in params.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = g.clone()
    torch.optim.SGD(tensors, lr=lr).step()
    return {name: t.detach() for name, t in zip(params, tensors, strict=True)}


@pytest.mark.parametrize(("sizes", "batch", "lr"), [((4, 3, 2), 2, 0.1), ((16, 64, 8), 33, 0.037)])
def test_sgd_update_rounds_as_torch_optim_sgd(sizes, batch, lr, equiv_seed, bitwise_diff):
    spec = equiv.MLPSpec(sizes)
    problem = equiv.make_problem(spec, batch_size=batch, seed=equiv_seed, steps=2)
    params = dict(problem.params)
    for x, y in problem.batches:
        _, grads = manual.loss_and_grads(params, x, y, spec)
        ours, theirs = manual.sgd_update(params, grads, lr), _torch_sgd(params, grads, lr)
        assert bitwise_diff(ours, theirs) == []
        params = ours


def test_p_minus_lr_g_is_an_ulp_off_on_the_notebook_model():
    # NUMERICS.md: `p - lr * g` rounds twice; torch.optim.SGD's p.add_(g, alpha=-lr) once.
    # Measured with torch 2.13: one entry per step is off (fc2.bias at steps 1 and 2,
    # fc1.bias at step 3), by exactly one ulp, never more.
    off = 0
    for params, grads in _notebook_steps():
        once = manual.sgd_update(params, grads, 0.1)
        for name in params:
            twice = (params[name] - 0.1 * grads[name]).numpy()
            single = once[name].numpy()
            ulp = np.maximum(np.spacing(np.abs(single)), np.spacing(np.abs(twice)))
            assert np.all(np.abs(twice - single) <= ulp), name
            off += int(np.count_nonzero(twice != single))
    assert off > 0


def test_sgd_update_on_numpy_rounds_twice_as_written():
    # NumPy has no fused scaled add: the reference spells p + (-lr)·g.
    p, g = np.array([0.3, -1.7, 2.5]), np.array([0.11, 0.7, -3.3])
    assert manual.sgd_update({"w": p}, {"w": g}, 0.1)["w"].tolist() == (p + (-0.1) * g).tolist()


def test_sgd_update_keeps_float32_with_a_numpy_scalar_learning_rate():
    p = np.ones(3, dtype=np.float32)
    assert manual.sgd_update({"w": p}, {"w": p}, 0.1)["w"].dtype == np.float32
    assert manual.sgd_update({"w": p}, {"w": p}, np.float64(0.1))["w"].dtype == np.float32
