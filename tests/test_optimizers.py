"""SGD, Adam and AdamW: torch.optim, the hand-written update and optax, step by step.

Every configuration runs 5 steps of a quadratic whose gradient is written by hand,
``g_k = s_k · a ⊙ (p - t)``, in each implementation: ``torch.optim`` (float32 and
float64), the hand-written update on torch tensors (both dtypes) and on NumPy
float64 (the reference), and optax (float32, and float64 under x64). After every
step the parameters and every state leaf are compared: bitwise for the
hand-written update on torch tensors against ``torch.optim``, within a derived
bound everywhere else. The traps from NUMERICS.md are naive optax ports of the
same configurations, each shown to fail the same comparison.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import equiv.optimizers as optimizers
from equiv.compare import Report, compare_trees, to_numpy
from equiv.convert import jax_to_torch, torch_to_jax
from equiv.optimizers import (
    OptimizerSpec,
    make_optax,
    make_torch_optimizer,
    manual_init,
    manual_update,
    optax_state_to_torch_names,
    torch_optimizer_state,
)
from equiv.spec import MLPSpec
from equiv.tolerance import Tolerance

STEPS = 5
# A 4-4-4 MLP's parameters: two distinct shapes, so eager JAX compiles each op twice.
SHAPES = {"fc1.weight": (4, 4), "fc1.bias": (4,), "fc2.weight": (4, 4), "fc2.bias": (4,)}
# One scale per step, a fresh "batch" each time: powers of two, exact in any dtype.
# Gradients that shrink after growing make v decrease, so AMSGrad's max matters.
STEP_SCALES = (1.0, 4.0, 0.25, 1.0, 0.125)
U = {"float32": 2.0**-24, "float64": 2.0**-53}

# Bound for one leaf x after step s, two implementations computing in dtypes a, b:
#
#     |x_a - x_b| <= C · (u_a + u_b) · s · max|x|
#
# Every step recomputes each leaf elementwise: no reductions (k = 1 in
# equiv.tolerance's √k). The gradient s_k·a·(p - t) (+ λ·p) takes up to 4 roundings;
# exp_avg_sq squares it (8) and adds its own 3 (β₂·v, (1-β₂)·g·g, the sum): at most
# 12 roundings, each at most u relative to an element no larger than the leaf's max.
# C = 16 covers that count; parameters and the other moments take fewer. An error
# carried from earlier steps is not amplified (SGD contracts p - t by 1 - γ·a·s_k > 0;
# an Adam step is at most about γ whatever g is, and |p - t| stays >= 0.25 so the
# relative error of g stays small), so each step adds its own: the factor s.
# optax's float32 bias correction (test_optax_adam_float32_bias_correction) adds
# about 1e-5·γ per step to the parameters: 2·u·max|p| at γ = 1e-2 and |p| ~ 1.
# Measured over 30 seeds x these 12 configurations: worst |diff| / ((u_a+u_b)·s·max|x|)
# = 5.7 (exp_avg_sq at step 1, float32 against the float64 reference), 0.36 of C.
C = 16.0

# (id, spec). Learning rates keep p away from its target within 5 steps (offsets
# >= 0.5, SGD contracts, Adam moves at most ~γ per step), so no gradient comes
# near 0, where Adam's g/|g| would amplify rounding without bound.
CONFIGS = [
    ("sgd", OptimizerSpec("sgd", learning_rate=0.1)),
    ("sgd_weight_decay", OptimizerSpec("sgd", learning_rate=0.1, weight_decay=0.05)),
    ("sgd_momentum", OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9)),
    ("sgd_dampening", OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, dampening=0.5)),
    ("sgd_nesterov", OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, nesterov=True)),
    (
        "sgd_momentum_weight_decay",
        OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.05),
    ),
    ("adam", OptimizerSpec("adam", learning_rate=1e-2)),
    ("adam_weight_decay", OptimizerSpec("adam", learning_rate=1e-2, weight_decay=0.05)),
    ("adam_amsgrad", OptimizerSpec("adam", learning_rate=1e-2, betas=(0.9, 0.9), amsgrad=True)),
    ("adamw", OptimizerSpec("adamw", learning_rate=1e-2)),
    ("adamw_betas_eps", OptimizerSpec("adamw", learning_rate=1e-2, betas=(0.8, 0.99), eps=1e-6)),
    (
        "adamw_amsgrad",
        OptimizerSpec(
            "adamw", learning_rate=1e-2, betas=(0.8, 0.9), weight_decay=0.05, amsgrad=True
        ),
    ),
]
CONFIG_IDS = [name for name, _ in CONFIGS]
CONFIG_SPECS = [spec for _, spec in CONFIGS]

Run = list  # per step: (params, state), NumPy copies under torch names


def make_problem(rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """Initial params, targets (at least 0.5 away) and curvatures, float32-exact."""

    def draw(low, high, shape, signed=False):
        x = rng.uniform(low, high, shape)
        return (x * rng.choice([-1.0, 1.0], shape) if signed else x).astype(np.float32)

    p0 = {n: draw(-1.0, 1.0, s) for n, s in SHAPES.items()}
    targets = {
        n: (p0[n] + draw(0.5, 1.5, s, signed=True)).astype(np.float32) for n, s in SHAPES.items()
    }
    curvature = {n: draw(0.5, 1.5, s) for n, s in SHAPES.items()}
    return {"p0": p0, "targets": targets, "curvature": curvature}


def gradient(params, problem, step: int) -> dict[str, Any]:
    """``s_k · a ⊙ (p - t)`` by hand, in the arrays' own framework and dtype."""
    t, a = problem["targets"], problem["curvature"]
    return {n: (p - t[n]) * a[n] * STEP_SCALES[step] for n, p in params.items()}


def _cast(problem, convert) -> dict:
    return {key: {n: convert(v) for n, v in tree.items()} for key, tree in problem.items()}


def _numpy_state(state) -> dict:
    return {key: {n: to_numpy(v).copy() for n, v in tree.items()} for key, tree in state.items()}


def run_torch(spec: OptimizerSpec, problem, dtype: str) -> Run:
    prob = _cast(problem, lambda v: torch.tensor(v, dtype=getattr(torch, dtype)))
    params = prob["p0"]
    optimizer = make_torch_optimizer(spec, list(params.values()))
    run = []
    for k in range(STEPS):
        for name, g in gradient(params, prob, k).items():
            params[name].grad = g
        optimizer.step()
        run.append((_numpy_state({"p": params})["p"], torch_optimizer_state(optimizer, params)))
    return run


def run_manual(spec: OptimizerSpec, problem, convert: Callable) -> Run:
    prob = _cast(problem, convert)
    params = prob["p0"]
    state = manual_init(spec, params)
    run = []
    for k in range(STEPS):
        params, state = manual_update(spec, params, gradient(params, prob, k), state, k + 1)
        run.append((_numpy_state({"p": params})["p"], _numpy_state(state)))
    return run


def run_optax(spec: OptimizerSpec, problem, dtype: str, tx=None) -> Run:
    """optax, eagerly (tiny arrays: dispatch is cheaper than compiling per case)."""
    with jax.enable_x64(dtype == "float64"):
        prob = _cast(problem, lambda v: jnp.asarray(v, dtype=dtype))
        params = prob["p0"]
        tx = make_optax(spec) if tx is None else tx
        state = tx.init(params)
        run = []
        for k in range(STEPS):
            updates, state = tx.update(gradient(params, prob, k), state, params)
            params = optax.apply_updates(params, updates)
            moments = optax_state_to_torch_names(spec, state)
            run.append((_numpy_state({"p": params})["p"], _numpy_state(moments)))
    return run


def compare_runs(actual: Run, expected: Run, dtypes: tuple[str, str], names: tuple[str, str]):
    """Every leaf of every step within ``C·(u_a + u_b)·s·max|x|``."""
    leaves = []
    for step, ((p_a, s_a), (p_b, s_b)) in enumerate(zip(actual, expected, strict=True), start=1):
        assert sorted(s_a) == sorted(s_b), (names, sorted(s_a), sorted(s_b))
        scaled = C * (U[dtypes[0]] + U[dtypes[1]]) * step
        tol = Tolerance(scaled=scaled, derivation=f"{C:g}·(u₁+u₂)·{step}·max|x|")
        for stage, a, b in [("params", p_a, p_b)] + [(k, s_a[k], s_b[k]) for k in s_b]:
            leaves += compare_trees(
                a, b, tol, stage=stage, step=step, actual_name=names[0], expected_name=names[1]
            )
    return leaves


def bitwise_mismatches(actual: Run, expected: Run) -> list[str]:
    out = []
    for step, ((p_a, s_a), (p_b, s_b)) in enumerate(zip(actual, expected, strict=True), start=1):
        assert sorted(s_a) == sorted(s_b)
        for stage, a, b in [("params", p_a, p_b)] + [(k, s_a[k], s_b[k]) for k in s_b]:
            out += [
                f"{stage}[{n}] step {step}"
                for n in b
                if a[n].dtype != b[n].dtype or a[n].tobytes() != b[n].tobytes()
            ]
    return out


def _float64(v):
    return v.astype(np.float64)


# ------------------------------------------------------------------ agreement


@pytest.mark.parametrize("spec", CONFIG_SPECS, ids=CONFIG_IDS)
def test_float32_implementations_agree(spec, rng):
    problem = make_problem(rng)
    reference = run_manual(spec, problem, _float64)
    torch_run = run_torch(spec, problem, "float32")
    manual_run = run_manual(spec, problem, torch.from_numpy)
    optax_run = run_optax(spec, problem, "float32")

    # Hand-written update on torch tensors: the same torch ops in the same order.
    assert bitwise_mismatches(manual_run, torch_run) == []
    assert {v.dtype for p, _ in manual_run for v in p.values()} == {np.dtype("float32")}
    leaves = compare_runs(torch_run, reference, ("float32", "float64"), ("torch.optim", "manual"))
    leaves += compare_runs(optax_run, reference, ("float32", "float64"), ("optax", "manual"))
    leaves += compare_runs(optax_run, torch_run, ("float32", "float32"), ("optax", "torch.optim"))
    Report(leaves).assert_agree()


@pytest.mark.parametrize("spec", CONFIG_SPECS, ids=CONFIG_IDS)
def test_float64_implementations_agree(spec, rng):
    problem = make_problem(rng)
    reference = run_manual(spec, problem, _float64)
    torch_run = run_torch(spec, problem, "float64")
    manual_run = run_manual(spec, problem, lambda v: torch.from_numpy(v.astype(np.float64)))
    optax_run = run_optax(spec, problem, "float64")

    assert bitwise_mismatches(manual_run, torch_run) == []
    assert {v.dtype for p, _ in optax_run for v in p.values()} == {np.dtype("float64")}
    leaves = compare_runs(torch_run, reference, ("float64", "float64"), ("torch.optim", "manual"))
    leaves += compare_runs(optax_run, reference, ("float64", "float64"), ("optax", "manual"))
    Report(leaves).assert_agree()


@pytest.mark.parametrize(
    "spec", [s for s in CONFIG_SPECS if s.amsgrad], ids=[n for n, s in CONFIGS if s.amsgrad]
)
def test_amsgrad_cases_exercise_the_max(spec, rng):
    """A case where max(v) is always the latest v could not tell torch's AMSGrad apart."""
    state = run_torch(spec, make_problem(rng), "float32")[-1][1]
    assert any(np.any(state["max_exp_avg_sq"][n] > state["exp_avg_sq"][n]) for n in SHAPES)


@pytest.mark.parametrize("naive", ["add_two_roundings", "lerp_as_moving_average"])
def test_bitwise_check_detects_a_rounding_order_change(naive, rng, monkeypatch):
    """The bitwise check sees one rounding more: ``p - γ·g`` for ``p.add(g, alpha=-γ)``
    (NUMERICS.md), or ``(1-w)·m + w·g`` for torch's ``m.lerp(g, w)``."""
    if naive == "add_two_roundings":
        spec = OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9)
        monkeypatch.setattr(optimizers, "_add", lambda a, b, alpha: a + alpha * b)
    else:
        spec = OptimizerSpec("adam", learning_rate=1e-2)
        monkeypatch.setattr(optimizers, "_lerp", lambda a, b, w: (1 - w) * a + w * b)
    problem = make_problem(rng)
    torch_run = run_torch(spec, problem, "float32")
    assert bitwise_mismatches(run_manual(spec, problem, torch.from_numpy), torch_run) != []
    # ... and only the bitwise check: the derived bound still holds.
    leaves = compare_runs(
        run_manual(spec, problem, torch.from_numpy),
        torch_run,
        ("float32", "float32"),
        ("manual", "torch.optim"),
    )
    Report(leaves).assert_agree()


def test_optax_sgd_first_momentum_step_is_the_gradient(rng):
    """optax.trace starts from zeros: ``0·μ + g`` is ``g`` bit for bit, torch's ``b_1 = g``."""
    spec = OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, nesterov=True)
    problem = make_problem(rng)
    first = run_optax(spec, problem, "float32")[0][1]["momentum_buffer"]
    g = gradient(problem["p0"], problem, 0)
    assert all(first[n].tobytes() == g[n].tobytes() for n in SHAPES)
    assert all(
        run_torch(spec, problem, "float32")[0][1]["momentum_buffer"][n].tobytes() == g[n].tobytes()
        for n in SHAPES
    )


def test_optax_adam_float32_bias_correction():
    """optax computes 1 - β₂ᵗ in float32: about 1e-5 relative in √v̂ at t = 1.

    torch computes it in Python float64; :func:`scale_by_torch_amsgrad` uses
    ``-expm1(t·ln β)``. With g = 1 the first Adam step is exactly ``g/|g| = 1``
    up to ε, so any difference from 1 is the bias correction's error.
    """
    g = {"w": jnp.ones(1, jnp.float32)}
    optax_step = optax.scale_by_adam(eps=0.0).update(g, optax.scale_by_adam().init(g))[0]
    torch_like = optimizers.scale_by_torch_amsgrad(eps=0.0)
    ours = torch_like.update(g, torch_like.init(g))[0]
    assert abs(float(optax_step["w"][0]) - 1.0) > 50 * U["float32"]
    assert abs(float(ours["w"][0]) - 1.0) <= 4 * U["float32"]
    w = torch.zeros(1)
    opt = make_torch_optimizer(OptimizerSpec("adam", learning_rate=1.0, eps=0.0), [w])
    w.grad = torch.ones(1)
    opt.step()
    assert abs(w.item() + 1.0) <= 4 * U["float32"]


# ---------------------------------------------------------------------- traps

# (id, torch.optim configuration, the naive optax port, a leaf the report must name)
TRAPS = [
    (
        "adam_l2_ported_as_adamw",
        OptimizerSpec("adam", learning_rate=1e-2, weight_decay=1e-2),
        lambda: optax.adamw(1e-2, weight_decay=1e-2),
        "params after step 5, fc1.weight",
    ),
    (
        "adamw_default_decay",
        OptimizerSpec("adamw", learning_rate=1e-2),  # torch's default λ = 1e-2
        lambda: optax.adamw(1e-2),  # optax's default λ = 1e-4
        "params after step 5, fc1.weight",
    ),
    (
        "sgd_decay_after_momentum",
        OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.05),
        lambda: optax.chain(optax.trace(0.9), optax.add_decayed_weights(0.05), optax.scale(-0.1)),
        "momentum_buffer at step 5, fc1.weight",
    ),
    (
        "optax_amsgrad",
        OptimizerSpec("adam", learning_rate=1e-2, amsgrad=True),
        lambda: optax.amsgrad(1e-2),
        "max_exp_avg_sq at step 5, fc1.weight",
    ),
    (
        "dampening_ignored",
        OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, dampening=0.5),
        lambda: optax.sgd(0.1, momentum=0.9),
        "momentum_buffer at step 2, fc1.weight",
    ),
    (
        "dampening_on_the_first_step",  # b_1 = (1-τ)·g from a zero buffer, not torch's g
        OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, dampening=0.5),
        lambda: optax.chain(optax.scale(0.5), optax.trace(0.9), optax.scale(-0.1)),
        "momentum_buffer at step 1, fc1.weight",
    ),
]


@pytest.mark.parametrize("port", ["naive", "aligned"])
@pytest.mark.parametrize("spec, naive_tx, leaf", [t[1:] for t in TRAPS], ids=[t[0] for t in TRAPS])
def test_trap(spec, naive_tx, leaf, port, rng):
    problem = make_problem(rng)
    torch_run = run_torch(spec, problem, "float32")
    tx = naive_tx() if port == "naive" else make_optax(spec)
    optax_run = run_optax(spec, problem, "float32", tx=tx)
    report = Report(
        compare_runs(optax_run, torch_run, ("float32", "float32"), ("optax", "torch.optim"))
    )
    if port == "aligned":
        report.assert_agree()
        return
    with pytest.raises(AssertionError) as info:
        report.assert_agree()
    lines = str(info.value).splitlines()
    assert re.fullmatch(
        r"\[equiv\] \d+ of \d+ comparisons disagree \(optax vs torch\.optim\)", lines[0]
    )
    assert f"{leaf}, shape {SHAPES[leaf.split(', ')[1]]}, float32: optax vs torch.optim" in lines


# ------------------------------------------------------------ state plumbing


def test_optax_state_through_the_flax_converter(rng):
    """Moments of a Flax-layout tree come back under torch's names, transposed.

    Square layers (the shapes the other tests compiled for): a missing transpose
    would raise nothing here, but the values would disagree.
    """
    mlp = MLPSpec((4, 4, 4))
    spec = OptimizerSpec("adamw", learning_rate=1e-2, amsgrad=True)
    model = {
        n: torch.from_numpy(rng.uniform(-1, 1, s).astype(np.float32))
        for n, s in mlp.param_shapes().items()
    }
    grads = {
        n: torch.from_numpy(rng.normal(size=s).astype(np.float32))
        for n, s in mlp.param_shapes().items()
    }
    params = {n: p.clone() for n, p in model.items()}
    optimizer = make_torch_optimizer(spec, list(params.values()))
    for n, g in grads.items():
        params[n].grad = g
    optimizer.step()

    tx = make_optax(spec)
    flax_params = torch_to_jax(model, layout="flax", spec=mlp)
    flax_grads = torch_to_jax(grads, layout="flax", spec=mlp)
    _, state = tx.update(flax_grads, tx.init(flax_params), flax_params)
    moments = optax_state_to_torch_names(
        spec, state, lambda tree: jax_to_torch(tree, layout="flax", spec=mlp)
    )
    expected = torch_optimizer_state(optimizer, params)
    tol = Tolerance(scaled=C * 2 * U["float32"])
    leaves = [d for k in expected for d in compare_trees(moments[k], expected[k], tol, stage=k)]
    Report(leaves).assert_agree()
    # Without the converter the Flax tree's names cannot match torch's.
    with pytest.raises(ValueError, match=r"^\[equiv\] actual and expected hold different"):
        compare_trees(optax_state_to_torch_names(spec, state)["exp_avg"], expected["exp_avg"], tol)


def test_optax_state_of_another_optimizer_is_refused():
    spec = OptimizerSpec("adam")
    p = {"w": jnp.zeros(2)}
    state = optax.sgd(0.1, momentum=0.9).init(p)
    with pytest.raises(ValueError) as info:
        optax_state_to_torch_names(spec, state)
    assert str(info.value) == (
        "[equiv] the optax state holds ['momentum_buffer'] but adam keeps "
        "['exp_avg', 'exp_avg_sq']; build it with make_optax(spec)"
    )
    assert optax_state_to_torch_names(spec, make_optax(spec).init(p))["exp_avg"]["w"].shape == (2,)


def test_torch_state_of_an_unnamed_tensor_is_refused():
    w, v = torch.ones(2), torch.ones(3)
    optimizer = make_torch_optimizer(OptimizerSpec("sgd", momentum=0.5), [w, v])
    w.grad, v.grad = torch.ones(2), torch.ones(3)
    optimizer.step()
    assert sorted(torch_optimizer_state(optimizer, {"w": w, "v": v})["momentum_buffer"]) == [
        "v",
        "w",
    ]
    with pytest.raises(
        ValueError,
        match=r"^\[equiv\] the optimizer holds state for a tensor "
        r"of shape \(3,\) that named_params does not name",
    ):
        torch_optimizer_state(optimizer, {"w": w})


def test_torch_optimizer_uses_the_single_tensor_path():
    for spec in CONFIG_SPECS:
        group = make_torch_optimizer(spec, [torch.zeros(1)]).param_groups[0]
        assert group["foreach"] is False and group["fused"] is False, spec


def test_manual_update_does_not_modify_its_inputs(rng):
    """torch.optim updates in place; the hand-written update must not (aliasing)."""
    spec = OptimizerSpec("adamw", learning_rate=0.1, amsgrad=True)
    params = {"w": torch.from_numpy(rng.normal(size=3).astype(np.float32))}
    grads = {"w": torch.ones(3)}
    state = manual_init(spec, params)
    inputs = [params["w"], grads["w"]] + [tree["w"] for tree in state.values()]

    def snapshot():
        return [t.clone() for t in inputs]

    before = snapshot()
    manual_update(spec, params, grads, state, 1)
    assert all(map(torch.equal, before, inputs))
    # The same check sees torch.optim's in-place step.
    params["w"].grad = grads["w"]
    make_torch_optimizer(spec, [params["w"]]).step()
    assert not all(map(torch.equal, before, inputs))


@pytest.mark.parametrize(
    "kwargs, step, message",
    [
        ({}, 0, "[equiv] step is torch's 1-based step counter, got 0; the first is 1"),
        (
            {"grads": {"v": np.ones(1)}},
            1,
            "[equiv] grads and params name different tensors: ['v', 'w']",
        ),
        (
            {"state": {}},
            1,
            "[equiv] state holds [] but sgd keeps ['momentum_buffer']; start "
            "from manual_init(spec, params)",
        ),
    ],
    ids=["step_zero", "grads_names", "state_entries"],
)
def test_manual_update_bad_input(kwargs, step, message):
    spec = OptimizerSpec("sgd", momentum=0.9)
    params = {"w": np.ones(1)}
    args = {"params": params, "grads": {"w": np.ones(1)}, "state": manual_init(spec, params)}
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        manual_update(spec, args["params"], args["grads"], args["state"], step)
    assert str(info.value) == message


# ------------------------------------------------------------- validation

GOOD_SPECS = [
    ("sgd_defaults", {"name": "sgd"}, {"weight_decay": 0.0, "learning_rate": 1e-3}),
    ("adam_defaults", {"name": "adam"}, {"weight_decay": 0.0, "betas": (0.9, 0.999)}),
    ("adamw_defaults", {"name": "adamw"}, {"weight_decay": 1e-2, "eps": 1e-8}),
    ("nesterov", {"name": "sgd", "momentum": 0.9, "nesterov": True}, {"dampening": 0.0}),
    ("betas_list", {"name": "adam", "betas": [0.5, 0.5]}, {"betas": (0.5, 0.5)}),
    ("int_lr", {"name": "sgd", "learning_rate": 1}, {"learning_rate": 1.0}),
]

BAD_SPECS = [
    (
        "unknown",
        {"name": "adagrad"},
        ValueError,
        "[equiv] unknown optimizer 'adagrad'; choose one of sgd, adam, adamw",
    ),
    ("name_type", {"name": 3}, TypeError, "[equiv] optimizer name must be a string, got int"),
    (
        "negative_lr",
        {"name": "sgd", "learning_rate": -0.1},
        ValueError,
        "[equiv] learning_rate must be >= 0, got -0.1",
    ),
    (
        "nan_lr",
        {"name": "adam", "learning_rate": float("nan")},
        ValueError,
        "[equiv] learning_rate must be >= 0, got nan",
    ),
    (
        "negative_momentum",
        {"name": "sgd", "momentum": -0.5},
        ValueError,
        "[equiv] momentum must be >= 0, got -0.5",
    ),
    (
        "negative_decay",
        {"name": "adamw", "weight_decay": -1e-2},
        ValueError,
        "[equiv] weight_decay must be >= 0, got -0.01",
    ),
    (
        "nesterov_no_momentum",
        {"name": "sgd", "nesterov": True},
        ValueError,
        "[equiv] nesterov=True needs momentum > 0 and dampening == 0 (torch.optim.SGD requires "
        "both), got momentum=0.0, dampening=0.0; for example "
        'OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, nesterov=True)',
    ),
    (
        "nesterov_dampening",
        {"name": "sgd", "momentum": 0.9, "dampening": 0.1, "nesterov": True},
        ValueError,
        "[equiv] nesterov=True needs momentum > 0 and dampening == 0 (torch.optim.SGD requires "
        "both), got momentum=0.9, dampening=0.1; for example "
        'OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, nesterov=True)',
    ),
    (
        "beta_one",
        {"name": "adam", "betas": (0.9, 1.0)},
        ValueError,
        "[equiv] betas[1] must lie in [0, 1), got 1.0; torch's default is betas=(0.9, 0.999)",
    ),
    (
        "betas_triple",
        {"name": "adam", "betas": (0.9, 0.9, 0.9)},
        ValueError,
        "[equiv] betas must be a pair (beta1, beta2), got (0.9, 0.9, 0.9)",
    ),
    (
        "negative_eps",
        {"name": "adam", "eps": -1e-8},
        ValueError,
        "[equiv] eps must be >= 0, got -1e-08",
    ),
    (
        "string_lr",
        {"name": "sgd", "learning_rate": "0.1"},
        TypeError,
        "[equiv] learning_rate must be a real number, got '0.1'",
    ),
    (
        "amsgrad_type",
        {"name": "adam", "amsgrad": 1},
        TypeError,
        "[equiv] amsgrad must be True or False, got 1",
    ),
    (
        "momentum_on_adam",
        {"name": "adam", "momentum": 0.9},
        ValueError,
        "[equiv] momentum=0.9 applies to SGD only, not to 'adam'; drop it, or choose an "
        "optimizer that has it",
    ),
    (
        "amsgrad_on_sgd",
        {"name": "sgd", "amsgrad": True},
        ValueError,
        "[equiv] amsgrad=True applies to Adam and AdamW only, not to 'sgd'; drop it, or choose "
        "an optimizer that has it",
    ),
]


@pytest.mark.parametrize(
    "kwargs, expected", [c[1:] for c in GOOD_SPECS], ids=[c[0] for c in GOOD_SPECS]
)
def test_spec_accepts(kwargs, expected):
    spec = OptimizerSpec(**kwargs)
    assert {k: getattr(spec, k) for k in expected} == expected
    make_torch_optimizer(spec, [torch.zeros(1)])  # torch accepts it too


@pytest.mark.parametrize(
    "kwargs, error, message", [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS]
)
def test_spec_rejects(kwargs, error, message):
    with pytest.raises(error) as info:
        OptimizerSpec(**kwargs)
    assert str(info.value) == message


# ---------------------------------------------------------------------------
# A torch.optim optimizer read as its spec (found in a user trial: refused, its
# hyper-parameters had to be written again)


def _params():
    return [torch.zeros(3, requires_grad=True)]


@pytest.mark.parametrize(
    ("make", "spec"),
    [
        (
            lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.85, 0.98), weight_decay=0.05),
            OptimizerSpec("adamw", learning_rate=3e-3, betas=(0.85, 0.98), weight_decay=0.05),
        ),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
            OptimizerSpec("sgd", learning_rate=0.1, momentum=0.9, nesterov=True),
        ),
        (lambda p: torch.optim.Adam(p, eps=1e-6), OptimizerSpec("adam", eps=1e-6)),
        (
            lambda p: torch.optim.Adam(p, weight_decay=0.1, decoupled_weight_decay=True),
            OptimizerSpec("adamw", weight_decay=0.1),
        ),
        (
            # The tensor's own value: float32's 0.01, as torch steps with it.
            lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01)),
            OptimizerSpec("adam", learning_rate=float(np.float32(0.01))),
        ),
    ],
    ids=["adamw", "sgd-nesterov", "adam", "adam-decoupled", "tensor-lr"],
)
def test_a_torch_optimizer_reads_as_its_spec(make, spec):
    assert OptimizerSpec.from_torch(make(_params())) == spec


def test_torch_optimizers_equiv_cannot_state_are_refused():
    p = _params()
    with pytest.raises(TypeError, match="must be torch.optim.SGD, Adam or AdamW"):
        OptimizerSpec.from_torch(torch.optim.RMSprop(p))
    with pytest.raises(ValueError, match="maximize=True"):
        OptimizerSpec.from_torch(torch.optim.SGD(p, lr=0.1, maximize=True))
    two = torch.optim.SGD([{"params": p[:1], "lr": 0.1}, {"params": [torch.zeros(1)], "lr": 0.2}])
    with pytest.raises(ValueError, match="2 parameter groups have different hyper-parameters"):
        OptimizerSpec.from_torch(two)
    stepped = torch.optim.SGD(p, lr=0.1, momentum=0.9)
    p[0].grad = torch.ones(3)
    stepped.step()
    with pytest.raises(ValueError, match="has taken steps") as info:
        OptimizerSpec.from_torch(stepped)
    assert "write its hyper-parameters out as equiv.OptimizerSpec" in str(info.value)
    # A scheduler attached moves the rate (found in review: LinearLR's first rate was
    # taken as the constant one).
    scheduled = torch.optim.SGD(_params(), lr=0.1)
    torch.optim.lr_scheduler.LinearLR(scheduled, start_factor=0.25)
    with pytest.raises(ValueError, match="learning-rate scheduler attached"):
        OptimizerSpec.from_torch(scheduled)


def test_check_jax_port_takes_a_torch_optimizer(equiv_seed):
    import jax.numpy as jnp

    from equiv import TorchMLP, check_jax_port

    torch.manual_seed(equiv_seed)
    model = TorchMLP(MLPSpec((4, 3, 2), activation="tanh"))
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def loss_fn(params, xb, yb):
        h = jnp.tanh(xb @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
        out = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
        return jnp.mean((out - yb) ** 2)

    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.85, 0.98))
    report = check_jax_port(model, loss_fn, x, y, optimizer=adamw, steps=2)
    report.assert_agree()
    assert report.optimizer == OptimizerSpec("adamw", learning_rate=3e-3, betas=(0.85, 0.98))
    # An optimizer over other parameters than the model's is refused (found in review).
    other = TorchMLP(MLPSpec((4, 3, 2), activation="tanh"))
    for params in (other.parameters(), [next(iter(model.parameters()))]):
        with pytest.raises(ValueError, match="build it on model.parameters()"):
            check_jax_port(model, loss_fn, x, y, optimizer=torch.optim.AdamW(params), steps=2)
