"""A bias on some layers and not others: ``MLPSpec(sizes, bias=(True, False, True))``.

Every backend, the hand-derived backward, :func:`equiv.mlp_from_module` and every
layout take one bool per layer; each check has its failing twin: a hand-written
backward that gives a layer the bias it lacks, or leaves out one it has, a module
whose biases are not the spec's, entries whose biases are not the spec's.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import equiv
from equiv import (
    BACKENDS,
    REFERENCE,
    MLPSpec,
    OptimizerSpec,
    Trajectory,
    check_jax_port,
    check_manual_backward,
    compare_backends,
    compare_trajectories,
    jax_to_torch,
    make_problem,
    manual,
    mlp_from_module,
    torch_to_jax,
)
from equiv.convert import LAYOUTS, expected_jax_shapes
from equiv.harness import RUNNERS
from equiv.kinks import preactivation_bounds
from equiv.torch_mlp import torch_mlp_with_params

pytestmark = pytest.mark.equivalence

# (sizes, bias): a layer without one in the middle, and at both ends.
SPECS = {
    "middle_off": ((4, 8, 8, 2), (True, False, True)),
    "ends_off": ((3, 5, 5, 5, 2), (False, True, True, False)),
}
OPTIMIZERS = {"sgd": None, "adam": OptimizerSpec("adam", learning_rate=1e-2)}
DTYPES = ("float32", "float64")


def _spec(case: str, dtype: str = "float32") -> MLPSpec:
    sizes, bias = SPECS[case]
    return MLPSpec(sizes, bias=bias, dtype=dtype)


def _sequential(seed: int) -> nn.Sequential:
    """The user's model: a bias on the first and last Linear, none on the middle one."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 2)
    )


def _batches(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=gen) for _ in range(2)], [
        torch.randn(6, 2, generator=gen) for _ in range(2)
    ]


# ---------------------------------------------------------------------------
# Every backend, the hand-derived backward included


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SPECS))
def test_every_backend_agrees_with_a_bias_on_some_layers(case, dtype, optimizer, equiv_seed):
    spec = _spec(case, dtype)
    comparison = compare_backends(
        spec, batch_size=5, steps=2, seed=equiv_seed, optimizer=OPTIMIZERS[optimizer]
    )
    comparison.assert_agree()
    assert set(comparison.trajectories) == {*BACKENDS, REFERENCE}  # manual: hand-derived
    names = {d.name for d in comparison.report.leaves if d.stage in ("grads", "params")}
    assert names == set(spec.param_names())
    without = {f"fc{i}.bias" for i, has in enumerate(spec.biases, start=1) if not has}
    assert not any(d.name.endswith(tuple(without)) for d in comparison.report.leaves)
    for name in BACKENDS:  # every backend ran in the spec's dtype
        grads = comparison.trajectories[name].grads[-1]
        assert list(grads) == spec.param_names(), name
        assert {str(g.dtype) for g in grads.values()} == {dtype}, name


def test_the_report_says_which_layers_have_a_bias(equiv_seed):
    comparison = compare_backends(_spec("middle_off"), seed=equiv_seed)
    header = equiv.render_comparison(comparison).splitlines()
    assert header[1] == (
        "model     sizes 4-8-8-2, relu between layers, mse loss, bias on fc1 and fc3 only, float32"
    )
    assert json.loads(json.dumps(comparison.to_dict()))["config"]["bias"] == [True, False, True]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_hand_written_backward_with_a_bias_on_some_layers_agrees(optimizer, equiv_seed):
    net = _sequential(equiv_seed)
    spec, _ = mlp_from_module(net)
    xs, ys = _batches(equiv_seed)
    report = check_manual_backward(
        net,
        lambda p, x, y: manual.loss_and_grads(p, x, y, spec),
        xs,
        ys,
        steps=2,
        optimizer=OPTIMIZERS[optimizer],
    )
    report.assert_agree()


def test_a_backward_written_for_a_bias_on_every_layer_is_refused(equiv_seed):
    # The twin: the same derivation, given a bias for fc2, which has none.
    net = _sequential(equiv_seed)
    spec, _ = mlp_from_module(net)
    xs, ys = _batches(equiv_seed)

    def every_layer(params, x, y):
        full = {**params, "fc2.bias": np.zeros(8, np.float32)}
        return manual.loss_and_grads(full, x, y, spec.replace(bias=True))

    with pytest.raises(ValueError) as info:
        check_manual_backward(net, every_layer, xs, ys, steps=2)
    assert str(info.value) == (
        "[equiv] grad_fn returned a gradient for fc2.bias, but fc2 has no bias (the model has "
        "bias on fc1 and fc3 only): leave it out of the forward pass (z = h Wᵀ there) and out "
        "of grads"
    )


def test_a_backward_that_leaves_out_a_bias_the_layer_has_fails_and_is_named(equiv_seed):
    net = _sequential(equiv_seed)
    spec, _ = mlp_from_module(net)
    xs, ys = _batches(equiv_seed)
    fc3_without = spec.replace(bias=(True, False, False))

    def forgets_fc3(params, x, y):
        kept = {k: v for k, v in params.items() if k != "fc3.bias"}
        loss, grads = manual.loss_and_grads(kept, x, y, fc3_without)
        return loss, {**grads, "fc3.bias": np.zeros_like(params["fc3.bias"])}

    report = check_manual_backward(net, forgets_fc3, xs, ys, steps=2)
    with pytest.raises(AssertionError) as info:
        report.assert_agree()
    lines = str(info.value).splitlines()
    assert lines[1] == "  arbiter: torch agrees with the float64 reference"
    blocks = lines.index("  every failing comparison:")
    assert lines[blocks - 1].startswith("  likely cause: loss: grad_fn leaves out fc3.bias: ")
    assert lines[blocks + 1] == "loss at step 1, loss, shape (), float32: grad_fn vs torch"
    assert ("grads", 1, "fc3.bias") in {(d.stage, d.step, d.name) for d in report.report.failures}


# ---------------------------------------------------------------------------
# mlp_from_module and check_jax_port


def _flax_port(with_fc2_bias: bool = False, with_fc3_bias: bool = True):
    def loss_fn(params, x, y):
        h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
        h = h @ params["Dense_1"]["kernel"]
        h = jnp.tanh(h + params["Dense_1"]["bias"] if with_fc2_bias else h)
        out = h @ params["Dense_2"]["kernel"]
        out = out + params["Dense_2"]["bias"] if with_fc3_bias else out
        return jnp.mean((out - y) ** 2)

    return loss_fn


def test_mlp_from_module_reads_a_bias_on_some_layers_and_the_harness_agrees(equiv_seed):
    torch.manual_seed(equiv_seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2, bias=False))
    spec, params = mlp_from_module(model)
    assert spec == MLPSpec((4, 8, 2), bias=(True, False))
    assert list(params) == ["fc1.weight", "fc1.bias", "fc2.weight"]
    assert torch.equal(params["fc1.bias"], model[0].bias)
    problem = make_problem(spec, params=params, batch_size=5, steps=2, seed=equiv_seed)
    compare_backends(problem=problem).assert_agree()
    # One bool for every layer stays one bool.
    assert mlp_from_module(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))[0].bias


def _nnx_port(params, x, y):
    """:func:`_flax_port` reading the nnx layout's keys (``fc1``, ...)."""
    return _flax_port()({f"Dense_{i - 1}": params[f"fc{i}"] for i in (1, 2, 3)}, x, y)


@pytest.mark.parametrize(("layout", "port"), [("flax", _flax_port()), ("nnx", _nnx_port)])
def test_a_port_of_a_module_with_a_bias_on_some_layers_agrees(layout, port, equiv_seed):
    net = _sequential(equiv_seed)
    xs, ys = _batches(equiv_seed)
    report = check_jax_port(net, port, xs, ys, layout=layout, steps=2)
    report.assert_agree()
    assert report.problem.spec.bias == (True, False, True)


def test_a_port_that_leaves_out_a_bias_fails_and_one_that_adds_one_is_refused(equiv_seed):
    net = _sequential(equiv_seed)
    xs, ys = _batches(equiv_seed)
    report = check_jax_port(net, _flax_port(with_fc3_bias=False), xs, ys, steps=2)
    assert not report.agree
    assert any("leaves out fc3.bias" in hint for hint in report.hints()), report.hints()
    with pytest.raises(ValueError) as info:  # Dense_1 has no bias to read
        check_jax_port(net, _flax_port(with_fc2_bias=True), xs, ys, steps=2)
    assert "KeyError: 'bias'" in str(info.value)
    assert str(info.value).endswith(
        "Its params, in the 'flax' layout: Dense_0.bias (8,); Dense_0.kernel (4, 8); "
        "Dense_1.kernel (8, 8); Dense_2.bias (2,); Dense_2.kernel (8, 2)"
    )


@pytest.mark.parametrize(
    ("bias", "says"), [(True, "bias=True"), ((True, True, False), "bias on fc1 and fc2 only")]
)
def test_a_spec_whose_biases_are_not_the_modules_is_refused(bias, says, equiv_seed):
    net = _sequential(equiv_seed)
    xs, ys = _batches(equiv_seed)
    spec = MLPSpec((4, 8, 8, 2), activation="tanh", bias=bias)
    with pytest.raises(ValueError) as info:
        check_jax_port(net, _flax_port(), xs, ys, steps=2, spec=spec)
    assert str(info.value) == (
        "[equiv] spec does not describe Sequential: bias: the module has bias on fc1 and fc3 "
        f"only, spec says {says}. Leave spec out to read it from the module, or fix it"
    )
    # The twin: the module's own pattern, given as a tuple, is taken.
    twin = spec.replace(bias=(True, False, True))
    check_jax_port(net, _flax_port(), xs, ys, steps=2, spec=twin).assert_agree()


def test_params_whose_biases_are_not_the_specs_are_refused(equiv_seed):
    spec = _spec("middle_off")
    params = dict(make_problem(spec.replace(bias=True), seed=equiv_seed).params)
    with pytest.raises(ValueError) as info:
        make_problem(spec, params=params)
    assert str(info.value) == (
        "[equiv] params do not fit (4, 8, 8, 2) (float32, bias on fc1 and fc3 only): "
        "fc2.bias: unexpected"
    )
    del params["fc2.bias"]
    assert make_problem(spec, params=params).params.keys() == params.keys()  # the twin


# ---------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(SPECS))
def test_every_layout_round_trips_a_bias_on_some_layers(case, layout, equiv_seed, bitwise_diff):
    spec = _spec(case)
    state = make_problem(spec, seed=equiv_seed).params
    tree = torch_to_jax(state, layout=layout, spec=spec)
    flat = {}
    for path, leaf in _flatten(tree):
        flat[path] = leaf.shape
    assert flat == expected_jax_shapes(spec, layout)
    back = jax_to_torch(tree, layout=layout, spec=spec)
    assert list(back) == spec.param_names()
    assert bitwise_diff(back, state) == []
    # A model's own layers say which have a bias: no spec needed either way.
    model = torch_mlp_with_params(spec, state)
    assert (
        bitwise_diff(
            jax_to_torch(torch_to_jax(model, layout=layout), spec=spec, layout=layout), state
        )
        == []
    )


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from _flatten(value, path)
        else:
            yield path, value


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_entries_whose_biases_are_not_the_specs_are_named(layout, equiv_seed):
    spec = _spec("middle_off")
    tree = torch_to_jax(make_problem(spec, seed=equiv_seed).params, layout=layout, spec=spec)
    bias_key = ".".join(LAYOUTS[layout].path("fc2.bias"))
    with pytest.raises(ValueError) as info:  # the spec says fc2 has one: it is missing
        jax_to_torch(tree, layout=layout, spec=spec.replace(bias=True))
    assert str(info.value).splitlines()[:2] == [
        f"[equiv] {layout}-layout params does not match the MLP (4, 8, 8, 2) (bias=True, float32):",
        f"  missing: {bias_key!r} (expected shape (8,))",
    ]
    every = torch_to_jax(
        make_problem(spec.replace(bias=True), seed=equiv_seed).params, layout=layout
    )
    with pytest.raises(ValueError) as info:  # the spec says fc2 has none: it is unexpected
        jax_to_torch(every, layout=layout, spec=spec)
    assert str(info.value).splitlines()[:2] == [
        f"[equiv] {layout}-layout params does not match the MLP (4, 8, 8, 2) "
        "(bias on fc1 and fc3 only, float32):",
        f"  unexpected: {bias_key!r} (shape (8,))",
    ]


def test_entries_alone_never_guess_a_bias_on_some_layers(equiv_seed):
    # A dict (or a file) whose fc2.bias is absent may have lost it: without a spec it is
    # reported missing, and the message shows the spec that says fc2 has none.
    spec = _spec("middle_off")
    tree = torch_to_jax(make_problem(spec, seed=equiv_seed).params, layout="flax", spec=spec)
    with pytest.raises(ValueError) as info:
        jax_to_torch(tree, layout="flax")
    assert str(info.value).splitlines() == [
        "[equiv] flax-layout params does not match the MLP (4, 8, 8, 2) (bias=True, float32):",
        "  missing: 'Dense_1.bias' (expected shape (8,))",
        "Pass spec=MLPSpec(...) to state the architecture; the flax layout names parameters "
        "Dense_0.kernel, Dense_0.bias, ...",
        "Only some layers have a bias (no 'Dense_1.bias'), and entries alone cannot tell a "
        "layer without one from a lost entry. If the model has none there, say so: "
        "spec=MLPSpec((4, 8, 8, 2), bias=(True, False, True))",
    ]
    assert list(jax_to_torch(tree, layout="flax", spec=spec)) == spec.param_names()  # twin


def test_a_checkpoint_with_a_bias_on_some_layers_is_read_with_its_spec(tmp_path, equiv_seed):
    spec = _spec("ends_off")
    state = make_problem(spec, seed=equiv_seed).params
    path = tmp_path / "mixed.safetensors"
    equiv.save_torch(state, path, spec=spec)
    back = equiv.load_torch(path, spec=spec)
    assert list(back) == spec.param_names()
    assert all(torch.equal(back[k], v) for k, v in state.items())
    # equiv's file records which layers have a bias: read back without the spec too.
    assert list(equiv.load_torch(path)) == spec.param_names()
    import safetensors.torch

    safetensors.torch.save_file(state, path)  # the twin: a file that records nothing
    with pytest.raises(ValueError) as info:
        equiv.load_torch(path)
    assert str(info.value).splitlines()[-1] == (
        "Only some layers have a bias (no 'fc1.bias', 'fc4.bias'), and entries alone cannot "
        "tell a layer without one from a lost entry. If the model has none there, say so: "
        "spec=MLPSpec((3, 5, 5, 5, 2), bias=(False, True, True, False))"
    )


def test_an_equinox_model_without_a_final_bias_round_trips(equiv_seed, bitwise_diff):
    eqx = pytest.importorskip("equinox")
    import jax

    torch.manual_seed(equiv_seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2, bias=False))
    model = eqx.nn.MLP(4, 2, 8, 1, use_final_bias=False, key=jax.random.key(equiv_seed))
    filled = equiv.torch_to_equinox(net, model)
    assert filled.layers[1].bias is None
    _, params = mlp_from_module(net)
    assert bitwise_diff(equiv.equinox_to_torch(filled), params) == []
    assert bitwise_diff(jax_to_torch(filled, layout="equinox"), params) == []
    # The twin: an Equinox model with a final bias is not this torch model.
    with pytest.raises(ValueError) as info:
        equiv.torch_to_equinox(net, eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0)))
    assert str(info.value).splitlines()[:2] == [
        "[equiv] equinox model does not match the MLP (4, 8, 2) (bias on fc1 only, float32):",
        "  unexpected: 'layers.1.bias' (shape (2,))",
    ]


# ---------------------------------------------------------------------------
# Kinks: a unit of a layer without a bias has no bias to shift its z


def _kinked_in_the_layer_without_a_bias(seed: int):
    """``MLPSpec((3, 4, 4, 2), bias=(True, False, True))`` whose unit 2 of fc2 (no bias)
    has, for one example, a float64 pre-activation that is a float32 rounding residual:
    ``h_a·1 + h_b·w`` with ``w = -h_a/h_b`` rounded. Returns it and the example."""
    spec = MLPSpec((3, 4, 4, 2), bias=(True, False, True))
    problem = make_problem(spec, batch_size=4, seed=seed)
    params = {k: v.clone() for k, v in problem.params.items()}
    ((x, _),) = problem.batches
    h1 = torch.relu(x.double() @ params["fc1.weight"].double().T + params["fc1.bias"].double())
    example = next(e for e in range(4) if int((h1[e] > 0).sum()) >= 2)
    a, b = [int(j) for j in torch.nonzero(h1[example] > 0)[:2]]
    params["fc2.weight"][2] = 0.0
    params["fc2.weight"][2, a] = 1.0
    params["fc2.weight"][2, b] = -float(h1[example, a] / h1[example, b])
    params["fc3.weight"][:, 2] = torch.tensor([1.5, -1.0])  # the unit matters
    return dataclasses.replace(problem, params=params), example


def _the_other_side(problem, example: int) -> Trajectory:
    """The hand-derived float32 step with that unit on the other side of its kink."""
    spec, params = problem.spec, problem.params
    ((x, y),) = problem.batches
    _, zs = manual.forward(params, x, spec)
    masks = [z > 0 for z in zs[:-1]]
    p64 = {k: v.double().numpy() for k, v in params.items()}
    z64, bounds = preactivation_bounds(p64, x.double().numpy(), spec, 2.0**-24)
    z, bound = z64[1][example, 2], bounds[1][example, 2]
    assert 0 < abs(z) <= bound  # on the kink, within rounding
    masks[1][example, 2] = not bool(z > 0)
    loss, grads = manual.loss_and_grads(params, x, y, spec, masks)
    out = Trajectory("flipped", spec.dtype)
    out.record(loss, grads, manual.sgd_update(params, grads, 0.1))
    return out


def test_a_kink_in_a_layer_without_a_bias_may_be_taken_either_way(equiv_seed):
    problem, example = _kinked_in_the_layer_without_a_bias(equiv_seed)
    runs = {name: RUNNERS[name](problem, 0.1) for name in ("torch", "jax", REFERENCE)}
    runs["flipped"] = _the_other_side(problem, example)
    report = compare_trajectories(problem, runs, learning_rate=0.1)
    report.assert_agree()
    assert any(f"fc2 output [{example}, 2]" in line for line in report.settings["kink_units"])
    # The twin: without the kink analysis the other side is a disagreement.
    plain = compare_trajectories(problem, runs, learning_rate=0.1, kinks=False)
    assert ("grads", "fc2.weight") in {(d.stage, d.name) for d in plain.failures}
