"""Half precision: a bfloat16 or float16 model converts and checkpoints as it is, bit for
bit, and is compared as a float32 copy (equiv's bounds are derived for float32 and
float64 runs), which a half-precision spec is told when it asks for a comparison."""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import equiv
from equiv.spec import HALF_DTYPES, check_computable

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _net(seed: int, dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3)
    ).to(dtype)


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_the_half_dtypes_are_the_specs_storage_dtypes():
    assert HALF_DTYPES == tuple(HALF)
    for name in HALF:
        assert equiv.MLPSpec((4, 3, 2), dtype=name).dtype == name


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", ["torch", "flax", "nnx", "equinox"])
def test_a_half_precision_model_converts_both_ways_bit_for_bit(layout, dtype, equiv_seed):
    net = _net(equiv_seed, HALF[dtype])
    ours = equiv.mlp_from_module(net)[1]
    assert equiv.mlp_from_module(net)[0].dtype == dtype
    params = equiv.torch_to_jax(net, layout=layout)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
    _same(equiv.jax_to_torch(params, layout=layout), ours)
    # From NumPy arrays too (ml_dtypes' bfloat16, which torch.from_numpy refuses).
    _same(equiv.jax_to_torch(jax.tree.map(np.asarray, params), layout=layout), ours)
    # Into an existing module, in place.
    target = copy.deepcopy(net)
    for tensor in target.state_dict().values():
        tensor.zero_()
    equiv.jax_to_torch(params, layout=layout, out=target)
    _same(equiv.mlp_from_module(target)[1], ours)


def test_a_half_precision_conversion_shares_memory_only_when_asked(equiv_seed):
    net = _net(equiv_seed, torch.bfloat16)
    copied = equiv.torch_to_jax(net, layout="torch")
    shared = equiv.torch_to_jax(net, layout="torch", copy=False)
    before = np.asarray(copied["fc1.bias"]).copy()
    with torch.no_grad():
        net[0].bias.add_(1.0)
    np.testing.assert_array_equal(np.asarray(copied["fc1.bias"]), before)  # a copy
    assert np.asarray(shared["fc1.bias"])[0] == net[0].bias[0].item()  # the same memory


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_half_precision_checkpoints_read_back_bit_for_bit(tmp_path, suffix, dtype, equiv_seed):
    net = _net(equiv_seed, HALF[dtype])
    ours = equiv.mlp_from_module(net)[1]
    path = tmp_path / f"model.{suffix}"
    equiv.save_torch(net, path)
    _same(equiv.load_torch(path), ours)
    target = copy.deepcopy(net)
    for tensor in target.state_dict().values():
        tensor.zero_()
    equiv.load_torch(path, out=target)
    _same(equiv.mlp_from_module(target)[1], ours)
    flax = equiv.load_jax(path, layout="flax")
    assert {leaf.dtype for leaf in jax.tree.leaves(flax)} == {jnp.dtype(dtype)}
    if suffix == "safetensors":  # the JAX side writes safetensors
        again = tmp_path / "again.safetensors"
        equiv.save_jax(flax, again, layout="flax")
        _same(equiv.load_torch(again), ours)


@pytest.mark.parametrize(
    "run",
    [
        lambda spec: equiv.compare_backends(spec),
        lambda spec: equiv.make_problem(spec),
        lambda spec: spec.unit_roundoff,
        lambda spec: equiv.derived_tolerance(spec, 2, "grads", 1, (spec.dtype, spec.dtype)),
    ],
    ids=["compare_backends", "make_problem", "unit_roundoff", "derived_tolerance"],
)
def test_a_comparison_of_a_half_precision_spec_is_refused_with_what_to_do(run):
    spec = equiv.MLPSpec((4, 3, 2), dtype="bfloat16")
    with pytest.raises(
        ValueError, match="runs in float32 or float64, and this MLP is bfloat16"
    ) as info:
        run(spec)
    assert "spec.replace(dtype='float32'), copy.deepcopy(model).float()" in str(info.value)
    run(spec.replace(dtype="float32"))  # the twin: the float32 copy runs
    check_computable(spec.replace(dtype="float64"))


def test_a_port_check_of_a_half_precision_module_is_refused_and_its_float32_copy_runs(equiv_seed):
    net = _net(equiv_seed, torch.bfloat16)
    x, y = torch.randn(4, 6), torch.randn(4, 3)

    def loss_fn(params, x, y):
        h = jnp.tanh(x @ params["fc1.weight"].T + params["fc1.bias"])
        h = jax.nn.gelu(h @ params["fc2.weight"].T + params["fc2.bias"], approximate=False)
        return jnp.mean((h @ params["fc3.weight"].T + params["fc3.bias"] - y) ** 2)

    with pytest.raises(
        ValueError, match="a port check runs in float32 or float64, and this MLP is bfloat16"
    ):
        equiv.check_jax_port(net, loss_fn, x.bfloat16(), y.bfloat16(), layout="torch")
    wide = copy.deepcopy(net).float()  # every bfloat16 value is a float32 one, exactly
    assert equiv.check_jax_port(wide, loss_fn, x, y, layout="torch").agree


def test_the_call_order_check_in_half_precision_still_refuses_a_residual(equiv_seed):
    # The check's tolerance grows with the dtype's rounding (16u, 0.0625 in bfloat16):
    # a forward that adds its input back is still far outside it.
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)

        def forward(self, x):
            return self.b(self.act(self.a(x))) + x

    torch.manual_seed(equiv_seed)
    model = Residual().bfloat16()
    with pytest.raises(ValueError, match="a residual connection"):
        equiv.torch_to_jax(model)
    model.forward = lambda x: model.b(model.act(model.a(x)))  # the twin: the plain stack
    assert equiv.torch_to_jax(model, layout="torch")["fc1.weight"].dtype == jnp.bfloat16


def test_a_half_precision_nnx_port_is_filled_and_its_activation_checked(equiv_seed):
    nnx = pytest.importorskip("flax.nnx")

    class Port(nnx.Module):
        def __init__(self, act, rngs):
            kw = {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16, "rngs": rngs}
            self.hidden, self.head, self.act = nnx.Linear(4, 8, **kw), nnx.Linear(8, 2, **kw), act

        def __call__(self, x):
            return self.head(self.act(self.hidden(x)))

    torch.manual_seed(equiv_seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).bfloat16()
    port = Port(jnp.tanh, nnx.Rngs(equiv_seed))
    equiv.torch_to_nnx(net, port)
    np.testing.assert_array_equal(
        np.asarray(port.hidden.kernel[...], np.float32), net[0].weight.detach().float().T.numpy()
    )
    with pytest.raises(ValueError, match="tanh"):  # the twin: a ReLU port
        equiv.torch_to_nnx(net, Port(jax.nn.relu, nnx.Rngs(equiv_seed)))


def test_a_dtype_equiv_does_not_carry_is_refused_by_name(tmp_path):
    state = {
        "fc1.weight": torch.ones(2, 3).to(torch.int8),
        "fc1.bias": torch.ones(2).to(torch.int8),
    }
    with pytest.raises(
        ValueError,
        match="holds int8 parameters, but equiv carries float32, float64, bfloat16, float16 only",
    ):
        equiv.torch_to_jax(state)
    half = {name: tensor.to(torch.float16) for name, tensor in state.items()}
    assert equiv.torch_to_jax(half, layout="torch")["fc1.weight"].dtype == jnp.float16


def test_weights_and_biases_of_several_dtypes_are_refused_with_what_to_cast():
    # Found in a user trial: bfloat16 weights with float32 biases reached the probe
    # forward (torch's "self and mat2 must have the same dtype"), and as a state_dict
    # were told to pass a spec, which no dtype could satisfy.
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    mixed = copy.deepcopy(net)
    for layer in (mixed[0], mixed[2]):
        layer.weight.data = layer.weight.data.bfloat16()
    with pytest.raises(ValueError, match="weights and biases must share one dtype"):
        equiv.torch_to_jax(mixed)
    with pytest.raises(
        ValueError, match=r"several dtypes \(float32: fc1.bias, fc2.bias; the others bfloat16\)"
    ):
        equiv.torch_to_jax(dict(mixed.state_dict()))
    equiv.torch_to_jax(mixed.bfloat16())  # the twin: one dtype throughout


def test_half_precision_values_where_the_mlp_is_float32_are_told_the_cast():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    params = equiv.torch_to_jax(copy.deepcopy(net).bfloat16(), layout="flax")
    with pytest.raises(ValueError) as info:
        equiv.torch_to_jax(copy.deepcopy(net).bfloat16(), spec=equiv.MLPSpec((4, 8, 2)))
    assert "they are bfloat16 where the MLP is float32: cast them" in str(info.value)
    # Into a float32 module: out.to(the params' dtype), not out.float() (user trial).
    with pytest.raises(ValueError, match=r"out.bfloat16\(\) before the copy"):
        equiv.jax_to_torch(params, layout="flax", out=net)
    equiv.jax_to_torch(params, layout="flax", out=copy.deepcopy(net).bfloat16())  # the twin


def test_a_half_precision_stack_is_checked_in_float32_and_an_overflow_is_refused(equiv_seed):
    # Found in a user trial: a float16 residual whose probe output was inf passed the
    # call-order check (every comparison with NaN is false). A half-precision stack is
    # now checked in float32 (found in review: its own rounding refused deep plain
    # stacks), where that residual is refused as what it is; a probe that overflows
    # even so is refused as such, and a model holding a NaN (diverged) still converts.
    class Residual(nn.Module):
        def __init__(self, scale: float):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)
            with torch.no_grad():  # a's outputs pass the dtype's range; b brings them back
                for _ in range(2):  # scale², each factor a float32 itself
                    self.a.weight.mul_(scale)
                    self.b.weight.div_(scale)

        def forward(self, x):
            return self.b(self.act(self.a(x))) + x

    torch.manual_seed(equiv_seed)
    with pytest.raises(ValueError, match="a residual connection"):
        equiv.torch_to_jax(Residual(500.0).half())  # inf in float16, finite in float32
    with pytest.raises(ValueError, match="give inf or NaN on a probe batch"):
        equiv.torch_to_jax(Residual(3e19))  # inf in float32 too
    diverged = _net(equiv_seed, torch.float32)
    with torch.no_grad():
        diverged[0].weight[0, 0] = float("nan")
    assert bool(jnp.isnan(equiv.torch_to_jax(diverged, layout="torch")["fc1.weight"][0, 0]))
    assert equiv.mlp_from_module(diverged)[0].sizes == (6, 16, 16, 3)


def test_a_deep_half_precision_stack_with_one_output_converts(equiv_seed):
    # Found in review: checked in its own precision, about 1 in 10 to 30 such stacks
    # (nine GELU layers, one output: cancellation in the output) was refused as a
    # residual. The twin above: a residual is still refused.
    for seed in (2, *range(equiv_seed, equiv_seed + 5)):  # 2: the review's, refused before
        torch.manual_seed(seed)
        layers = [nn.Linear(8, 16)]
        for _ in range(7):
            layers += [nn.GELU(), nn.Linear(16, 16)]
        net = nn.Sequential(*layers, nn.GELU(), nn.Linear(16, 1))
        for dtype in HALF.values():
            equiv.torch_to_jax(copy.deepcopy(net).to(dtype), layout="torch")


def test_a_deep_half_precision_nnx_port_is_checked_gap_by_gap(equiv_seed):
    # Found in review: the port's output compared with the module's end to end carried
    # each layer's rounding into the next, and refused 1 in 10 ten-layer bfloat16 GELU
    # ports. Each gap is now compared on its own (the module given the port's layer
    # outputs). The twin: a port with tanh where torch has GELU is refused.
    nnx = pytest.importorskip("flax.nnx")

    class Deep(nnx.Module):
        def __init__(self, act, rngs):
            kw = {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16, "rngs": rngs}
            widths = (8, *(16,) * 10, 1)
            self.layers = nnx.List(
                [nnx.Linear(a, b, **kw) for a, b in zip(widths, widths[1:], strict=False)]
            )
            self.act = act

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = self.act(layer(x))
            return self.layers[-1](x)

    gelu = functools.partial(jax.nn.gelu, approximate=False)
    for seed in (9, 15, *range(equiv_seed, equiv_seed + 4)):  # 9, 15: refused before
        torch.manual_seed(seed)
        layers = [nn.Linear(8, 16)]
        for _ in range(9):
            layers += [nn.GELU(), nn.Linear(16, 16)]
        net = nn.Sequential(*layers, nn.GELU(), nn.Linear(16, 1)).bfloat16()
        equiv.torch_to_nnx(net, Deep(gelu, nnx.Rngs(seed)))
    with pytest.raises(ValueError, match="tanh"):
        equiv.torch_to_nnx(net, Deep(jnp.tanh, nnx.Rngs(0)))


def test_compare_trajectories_refuses_a_half_precision_problem_or_run():
    # Found in review: a Problem built directly with a bfloat16 spec, or a trajectory
    # recorded in bfloat16, failed inside the bounds (KeyError, unsupported ScalarType).
    from equiv.harness import RUNNERS

    problem = equiv.make_problem(equiv.MLPSpec((4, 3, 2)))
    run = RUNNERS["torch"](problem, 0.1)
    half = equiv.Problem(
        spec=problem.spec.replace(dtype="bfloat16"),
        params={k: v.bfloat16() for k, v in problem.params.items()},
        batches=problem.batches,
    )
    with pytest.raises(
        ValueError,
        match="compare_trajectories runs in float32 or float64, and this MLP is bfloat16",
    ):
        equiv.compare_trajectories(half, {"torch": run}, learning_rate=0.1)
    mine = equiv.Trajectory("mine", "bfloat16")
    with pytest.raises(
        ValueError,
        match=r"compare_trajectories \('mine'\) runs in float32 or float64, and this run is "
        "in bfloat16",
    ):
        equiv.compare_trajectories(problem, {"torch": run, "mine": mine}, learning_rate=0.1)
    assert equiv.compare_trajectories(problem, {"torch": run}, learning_rate=0.1).agree  # twin


def test_check_gradients_reads_bfloat16_tensors(equiv_seed):
    # Found in review: bfloat16 tensors failed in .numpy() (the check runs in float64).
    spec = equiv.MLPSpec((4, 3, 2), dtype="bfloat16")
    net = equiv.TorchMLP(spec)
    params = {k: v.detach() for k, v in net.state_dict().items()}
    x, y = torch.randn(4, 4).bfloat16(), torch.randn(4, 2).bfloat16()
    assert equiv.check_gradients(params, x, y, spec).agree


def test_a_mixed_precision_nnx_port_is_held_to_its_compute_dtype(equiv_seed):
    # Found in review: float32 parameters computing in bfloat16 (flax's usual mixed
    # precision) were held to float32's match and refused every time. The twin: such a
    # port with ReLU where torch has tanh is refused.
    nnx = pytest.importorskip("flax.nnx")

    class Mixed(nnx.Module):
        def __init__(self, act, rngs):
            kw = {"dtype": jnp.bfloat16, "param_dtype": jnp.float32, "rngs": rngs}
            self.a, self.head, self.act = nnx.Linear(4, 16, **kw), nnx.Linear(16, 2, **kw), act

        def __call__(self, x):
            return self.head(self.act(self.a(x)))

    torch.manual_seed(equiv_seed)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    equiv.torch_to_nnx(net, Mixed(jnp.tanh, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="tanh"):
        equiv.torch_to_nnx(net, Mixed(jax.nn.relu, nnx.Rngs(0)))
