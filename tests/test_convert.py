"""Converters: bitwise round trips in every layout and dtype, every error message, aliasing."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import equiv
from equiv import mlp_from_module
from equiv.convert import LAYOUTS, Layout, expected_jax_shapes, jax_to_torch, torch_to_jax
from equiv.spec import MLPSpec
from equiv.torch_mlp import TORCH_DTYPES, TorchMLP

SPECS = {
    "notebook": MLPSpec((4, 3, 2)),
    "square": MLPSpec((5, 5, 5)),  # a forgotten transpose would keep every shape
    "no_bias": MLPSpec((3, 6, 2), bias=False),
    "deep": MLPSpec((2, 7, 7, 7, 1)),
}
DTYPES = ("float32", "float64")


def random_state(spec: MLPSpec, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dtype = TORCH_DTYPES[spec.dtype]
    return {
        name: torch.randn(shape, generator=gen, dtype=dtype)
        for name, shape in spec.param_shapes().items()
    }


def leaves(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def assert_states_identical(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture
def x32():
    with jax.enable_x64(False):
        yield


# ---------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SPECS))
def test_torch_round_trip_is_bitwise(case, dtype, layout, equiv_seed):
    spec = SPECS[case].replace(dtype=dtype)
    state = random_state(spec, equiv_seed)
    with jax.enable_x64(dtype == "float64"):
        params = torch_to_jax(state, layout=layout)
    assert expected_jax_shapes(spec, layout) == {
        key: leaf.shape for key, leaf in _dotted(params).items()
    }
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(dtype)}
    assert_states_identical(jax_to_torch(params, layout=layout), state)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_jax_round_trip_is_bitwise(dtype, layout, equiv_seed, x64):
    # x64 on for both dtypes: a float32 tree must stay float32 there too.
    spec = SPECS["square"].replace(dtype=dtype)
    rng = np.random.default_rng(equiv_seed)
    params = {}
    for key, shape in expected_jax_shapes(spec, layout).items():
        tree = params
        *parents, last = key.split(".") if layout != "torch" else [key]
        for parent in parents:
            tree = tree.setdefault(parent, {})
        tree[last] = jnp.asarray(rng.standard_normal(shape).astype(dtype))
    back = torch_to_jax(jax_to_torch(params, layout=layout), layout=layout)
    expected, actual = leaves(params), leaves(back)
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(actual[key], expected[key])


def test_flax_kernel_is_the_transposed_weight(equiv_seed):
    # A square layer: a forgotten transpose keeps every shape, so compare values.
    state = random_state(SPECS["square"], equiv_seed)
    params = torch_to_jax(state, layout="flax")
    np.testing.assert_array_equal(params["Dense_0"]["kernel"], state["fc1.weight"].numpy().T)
    assert not np.array_equal(params["Dense_0"]["kernel"], state["fc1.weight"].numpy())


def test_module_with_its_spec_converts(equiv_seed):
    torch.manual_seed(equiv_seed)
    model = TorchMLP(SPECS["notebook"])
    params = torch_to_jax(model, layout="torch")
    assert_states_identical(jax_to_torch(params, layout="torch"), dict(model.state_dict()))


def test_custom_layout_round_trips(equiv_seed):
    layout = Layout("mine", "block{i}/w", "block{i}/b", transpose=False)
    state = random_state(SPECS["notebook"], equiv_seed)
    params = torch_to_jax(state, layout=layout)
    assert sorted(params) == ["block1", "block2"]
    assert_states_identical(jax_to_torch(params, layout=layout), state)


def test_jax_device_is_honoured(equiv_seed):
    device = jax.devices("cpu")[0]
    params = torch_to_jax(random_state(SPECS["notebook"], equiv_seed), device=device)
    assert {leaf.devices().pop() for leaf in jax.tree.leaves(params)} == {device}


def test_nnx_variables_are_unwrapped(equiv_seed):
    nnx = pytest.importorskip("flax.nnx")
    state = random_state(SPECS["notebook"], equiv_seed)
    params = torch_to_jax(state, layout="nnx")
    wrapped = jax.tree.map(nnx.Param, params)
    assert_states_identical(jax_to_torch(wrapped, layout="nnx"), state)


# ---------------------------------------------------------------------------
# float64 is never truncated


def test_float64_outside_x64_is_refused(x32):
    state = random_state(SPECS["notebook"].replace(dtype="float64"), 0)
    with pytest.raises(ValueError) as info:
        torch_to_jax(state)
    assert str(info.value).splitlines() == [
        "[equiv] fc1.weight, fc1.bias, fc2.weight, fc2.bias are float64, but JAX's x64 mode "
        "is off and would truncate to float32. Convert (or load) inside a scope:",
        "    >>> with jax.enable_x64(True):",
        "    ...     params = torch_to_jax(model)  # or load_jax(path)",
        "or convert the tensors to float32 first, to keep float32",
    ]


def test_float64_inside_x64_stays_float64(x64):
    state = random_state(SPECS["notebook"].replace(dtype="float64"), 0)
    params = torch_to_jax(state)
    assert params["Dense_0"]["kernel"].dtype == jnp.float64


def test_float32_outside_x64_converts(x32):
    params = torch_to_jax(random_state(SPECS["notebook"], 0))
    assert params["Dense_0"]["kernel"].dtype == jnp.float32


# ---------------------------------------------------------------------------
# One ValueError naming every offending key


def test_every_bad_torch_entry_is_named_at_once():
    state = random_state(SPECS["notebook"], 0)
    del state["fc1.bias"]
    state["fc2.weight"] = torch.zeros(3, 2)
    state["fc3.weight"] = torch.zeros(2, 2)
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        torch_to_jax(state, spec=SPECS["notebook"])
    assert str(info.value).splitlines() == [
        "[equiv] state_dict does not match the MLP (4, 3, 2) (bias=True, float32):",
        "  unexpected: 'head.weight' (shape (1,))",
        "  missing: 'fc1.bias' (expected shape (3,))",
        "  wrong shape: 'fc2.weight' expected (2, 3), got (3, 2) (its transpose: the torch "
        "layout holds weights (out, in))",
        "  unexpected: 'fc3.weight' (shape (2, 2))",
        "The torch layout names parameters fc1.weight, fc1.bias, ...",  # spec= was given
    ]
    with pytest.raises(ValueError) as info:  # without spec=, the advice is to give it
        torch_to_jax(state)
    assert (
        str(info.value)
        .splitlines()[-1]
        .startswith("Pass spec=MLPSpec(...) to state the architecture; the torch layout names")
    )


def test_every_bad_flax_entry_is_named_with_flax_shapes():
    params = torch_to_jax(random_state(SPECS["notebook"], 0), layout="flax")
    params["Dense_0"]["kernel"] = jnp.zeros((3, 4))  # the torch shape: not transposed
    del params["Dense_1"]["bias"]
    params["Dense_00"] = {"kernel": jnp.zeros((4, 3))}  # must not alias Dense_0
    with pytest.raises(ValueError) as info:
        jax_to_torch(params, layout="flax", spec=SPECS["notebook"])
    assert str(info.value).splitlines() == [
        "[equiv] flax-layout params does not match the MLP (4, 3, 2) (bias=True, float32):",
        "  unexpected: 'Dense_00.kernel' (shape (4, 3))",
        "  wrong shape: 'Dense_0.kernel' expected (4, 3), got (3, 4) (its transpose: the "
        "flax layout holds weights (in, out))",
        "  missing: 'Dense_1.bias' (expected shape (2,))",
        "The flax layout names parameters Dense_0.kernel, Dense_0.bias, ...",
    ]


def test_inconsistent_widths_without_spec_are_reported():
    state = random_state(SPECS["notebook"], 0)
    state["fc2.weight"] = torch.zeros(2, 5)
    with pytest.raises(ValueError) as info:
        torch_to_jax(state)
    assert str(info.value).splitlines()[:2] == [
        "[equiv] state_dict does not match the MLP (4, 3, 2) (bias=True, float32):",
        "  wrong shape: 'fc2.weight' expected (2, 3), got (2, 5)",
    ]


def test_wrong_dtype_is_named():
    state = random_state(SPECS["notebook"], 0)
    state["fc2.bias"] = state["fc2.bias"].half()
    with pytest.raises(ValueError) as info:
        torch_to_jax(state)
    assert str(info.value).splitlines()[1] == (
        "  wrong dtype: 'fc2.bias' expected float32, got float16"
    )


def test_flax_variables_wrapper_is_unexpected():
    params = torch_to_jax(random_state(SPECS["notebook"], 0))
    with pytest.raises(ValueError) as info:
        jax_to_torch({"params": params})
    assert str(info.value).endswith("This is a flax variables dict: pass variables['params']")
    # Found in a user trial: with another collection beside params (batch_stats, sown
    # intermediates), the message was about names, or that a leaf is not an array.
    for other in ({"mean": jnp.zeros(3)}, {"h": (jnp.ones((1, 3)),)}):
        with pytest.raises(ValueError) as info:
            jax_to_torch({"params": params, "batch_stats": other})
        assert str(info.value) == (
            "[equiv] params is a flax variables dict (collections 'params', 'batch_stats'): "
            "pass variables['params']"
        )


@pytest.mark.parametrize("layout", ["flax", "torch"])
def test_a_sequential_takes_jax_params_back_in_place(layout, equiv_seed):
    # Found in a user trial: torch_to_jax pointed an nn.Sequential to mlp_from_module,
    # but jax_to_torch(out=sequential) had no way back. Its own layers take the copy.
    torch.manual_seed(equiv_seed)
    seq = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    spec, start = mlp_from_module(seq)
    params = jax.tree.map(lambda a: a * 2, torch_to_jax(start, layout=layout, spec=spec))
    pointer = seq[2].weight.data_ptr()
    jax_to_torch(params, layout=layout, out=seq)
    assert seq[2].weight.data_ptr() == pointer  # in place
    for name, value in jax_to_torch(params, layout=layout).items():
        layer = seq[{"fc1": 0, "fc2": 2}[name.split(".")[0]]]
        assert torch.equal(getattr(layer, name.split(".")[1]).detach(), value)
    # The twin: a module that is not a Linear stack is refused by name, nothing copied.
    seq.append(torch.nn.Softplus())  # (a final Softmax is taken: see below)
    with pytest.raises(ValueError, match="Softplus"):
        jax_to_torch(params, layout=layout, out=seq)


def test_a_bias_on_some_layers_is_read_from_a_module_never_guessed_from_a_dict(equiv_seed):
    torch.manual_seed(equiv_seed)
    seq = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2, bias=False)
    )
    _, state = mlp_from_module(seq)
    params = torch_to_jax(seq, layout="flax")  # nn.Linear(bias=False) says fc2 has none
    assert sorted(params["Dense_0"]) == ["bias", "kernel"] and sorted(params["Dense_1"]) == [
        "kernel"
    ]
    spec = MLPSpec((4, 3, 2), bias=(True, False))
    assert_states_identical(jax_to_torch(params, layout="flax", spec=spec), state)
    # The twin: the same entries as a dict may have lost fc2.bias: reported missing,
    # with the spec that says fc2 has none.
    with pytest.raises(ValueError) as info:
        torch_to_jax(state)
    assert str(info.value).splitlines() == [
        "[equiv] state_dict does not match the MLP (4, 3, 2) (bias=True, float32):",
        "  missing: 'fc2.bias' (expected shape (2,))",
        "Pass spec=MLPSpec(...) to state the architecture; the torch layout names parameters "
        "fc1.weight, fc1.bias, ...",
        "Only some layers have a bias (no 'fc2.bias'), and entries alone cannot tell a layer "
        "without one from a lost entry. If the model has none there, say so: "
        "spec=MLPSpec((4, 3, 2), bias=(True, False))",
    ]
    # Where more is wrong than biases, no spec is offered: it would not be the fix.
    with pytest.raises(ValueError) as info:
        torch_to_jax({**state, "head.weight": torch.zeros(1)})
    assert str(info.value).splitlines()[-1].startswith("Pass spec=MLPSpec(...) to state")
    # A spec given decides: fc2.bias must be there when it says so.
    with pytest.raises(ValueError) as info:
        torch_to_jax(seq, spec=MLPSpec((4, 3, 2), activation="tanh"))
    assert str(info.value).splitlines()[1:] == [
        "  missing: 'fc2.bias' (expected shape (2,))",
        "The torch layout names parameters fc1.weight, fc1.bias, ...",
    ]


def test_a_stack_in_a_dtype_equiv_does_not_carry_is_told_its_dtype_not_its_biases():
    # Found in a user trial: "all Linear layers must share bias on/off and a float32 or
    # float64 dtype; got bias [True]" for a model.bfloat16() (which now converts). The
    # twin: bfloat16 reads.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    eight = copy.deepcopy(model).to(torch.float8_e4m3fn)
    with pytest.raises(
        ValueError, match=r"the Linear layers are torch.float8_e4m3fn; .* model.float"
    ):
        torch_to_jax(eight)
    assert set(torch_to_jax(model.bfloat16(), layout="torch")) == {
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    }


def test_module_with_other_names_is_read_as_a_linear_stack():
    # Found in a user trial: torch_to_equinox refused an nn.Sequential (and so did
    # torch_to_jax), though jax_to_torch(out=) took one. Any Linear stack is read now.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    _, params = mlp_from_module(model)
    assert_states_identical(jax_to_torch(torch_to_jax(model)), params)
    # The twins: a module that is no Linear stack is refused by name; a state_dict
    # under a module's own names (not a Sequential's, which are read by their
    # indices) is refused as before, with the way to read it.
    with pytest.raises(ValueError, match="Softplus"):
        torch_to_jax(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softplus()))
    own = {"inp": "0", "head": "2"}
    with pytest.raises(ValueError) as info:
        torch_to_jax(
            {
                f"{n}.{k}": model.state_dict()[f"{i}.{k}"]
                for n, i in own.items()
                for k in ("weight", "bias")
            }
        )
    assert str(info.value).startswith(
        "[equiv] state_dict: none of its 4 entries is a parameter of the torch layout"
    )
    assert "pass the module itself, or equiv.mlp_from_module(module)[1]" in str(info.value)
    flax_named = {"Dense_0.kernel": torch.ones(4, 3), "Dense_0.bias": torch.ones(3)}
    with pytest.raises(ValueError, match="the names of the 'flax' layout, and torch_to_jax reads"):
        torch_to_jax(flax_named)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("w", "[equiv] layout path 'w' must hold exactly one '{i}'"),
        ("{i}/{j}", "[equiv] layout path '{i}/{j}' must hold exactly one '{i}'"),
    ],
)
def test_layout_templates_are_checked(template, message):
    with pytest.raises(ValueError) as info:
        Layout("bad", template, "b{j}", transpose=False)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("weight", "bias", "message"),
    [  # found in review: the first dropped every weight, the others crashed deep inside
        ("p{i}", "p{i}", "puts fc1.weight at p1 and fc1.bias at p1: the same path"),
        ("l{j}", "l{j}/b", "puts fc1.weight at l0 and fc1.bias at l0/b: one inside the other"),
        ("l{j}/w", "l{i}/w", "puts fc1.bias at l1/w and fc2.weight at l1/w: the same path"),
        ("l{j}/{k}", "l{j}/b", "holds a brace other than '{i}' or '{j}'"),
        ("l{j}/{}", "l{j}/b", "holds a brace other than '{i}' or '{j}'"),
        ("l{j}//w", "l{j}/b", "has an empty key"),
        ("l1{i}/w", "l{i}/b", "puts a digit beside the layer number"),
    ],
)
def test_layouts_whose_paths_collide_or_cannot_be_read_are_refused(weight, bias, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Layout("bad", weight, bias, transpose=False)
    # The twin: paths of their own convert and come back.
    state = random_state(SPECS["notebook"], 0)
    layout = Layout("good", "l{j}/w", "l{j}/b", transpose=True)
    assert_states_identical(jax_to_torch(torch_to_jax(state, layout), layout), state)


def test_a_collision_beyond_three_layers_is_refused_at_conversion():
    # Layer 3's weight and layer 5's bias share "L3_5": only a model that deep meets it.
    layout = Layout("late", "L3_{i}", "L{i}_5", transpose=False)
    state = random_state(MLPSpec((2, 2, 2, 2, 2, 2)), 0)
    with pytest.raises(ValueError, match="puts fc3.bias at L3_5 and fc5.weight at L3_5"):
        torch_to_jax(state, layout)
    torch_to_jax(random_state(MLPSpec((2, 2, 2)), 0), layout)  # the twin: two layers


def test_a_name_that_is_no_parameter_is_refused_by_path():
    with pytest.raises(ValueError, match="'foo' is not a parameter name of equiv's MLP"):
        LAYOUTS["flax"].path("foo")
    assert LAYOUTS["flax"].path("fc1.bias") == ("Dense_0", "bias")


def test_a_layout_transpose_that_is_not_a_bool_is_refused():
    # A 1 would be written to a checkpoint as "1" and not read back as the layout.
    with pytest.raises(TypeError, match="transpose must be True or False, got 1"):
        Layout("mine", "w{i}", "b{i}", transpose=1)
    assert Layout("mine", "w{i}", "b{i}", transpose=True).transpose is True


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError) as info:
        torch_to_jax({}, layout="haiku")
    assert str(info.value) == (
        "[equiv] unknown layout 'haiku'; expected one of 'torch', 'flax', 'nnx', 'equinox'"
    )


# ---------------------------------------------------------------------------
# Wrong types are TypeError

TYPE_CASES = {
    "module_expected": (
        lambda: torch_to_jax([torch.zeros(1)]),
        "[equiv] expected a torch.nn.Module or a state_dict, got list",
    ),
    "tensor_values": (
        lambda: torch_to_jax({"fc1.weight": np.zeros((2, 2))}),
        "[equiv] state_dict values must be torch tensors; 'fc1.weight' is not. "
        "To convert a JAX tree, use jax_to_torch",
    ),
    "mapping_params": (
        lambda: jax_to_torch([jnp.zeros(2)]),
        "[equiv] params must be a dict-like JAX tree, got list; for a flax variables dict "
        "pass variables['params']",
    ),
    "array_leaves": (
        lambda: jax_to_torch({"Dense_0": {"kernel": torch.zeros(2, 2), "bias": [0.0, 0.0]}}),
        "[equiv] params leaves must be JAX or NumPy arrays; 'Dense_0.kernel', "
        "'Dense_0.bias' are not. To convert torch tensors, use torch_to_jax",
    ),
    "layout_type": (
        lambda: torch_to_jax({}, layout=3),
        "[equiv] layout must be a name or a Layout, got int",
    ),
}


@pytest.mark.parametrize("case", list(TYPE_CASES))
def test_wrong_types_raise_type_error(case):
    call, message = TYPE_CASES[case]
    with pytest.raises(TypeError) as info:
        call()
    assert str(info.value) == message


# ---------------------------------------------------------------------------
# Aliasing: shared memory is an explicit choice


def _torch_step(model: torch.nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.ones(1, model.spec.sizes[0])).square().sum().backward()
    optimizer.step()


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_default_conversion_survives_a_torch_step(layout, equiv_seed):
    torch.manual_seed(equiv_seed)
    model = TorchMLP(SPECS["notebook"])
    params = torch_to_jax(model, layout=layout)
    before = leaves(jax.tree.map(np.array, params))  # independent copies
    _torch_step(model)
    after = leaves(params)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    # ...while the torch parameters did move:
    moved = torch_to_jax(model, layout=layout)
    assert not all(np.array_equal(leaves(moved)[k], before[k]) for k in before)


def test_copy_false_shares_memory_with_torch(equiv_seed):
    # The documented hazard: an in-place torch update shows through the JAX array.
    torch.manual_seed(equiv_seed)
    model = TorchMLP(SPECS["notebook"])
    params = torch_to_jax(model, layout="torch", copy=False)
    _torch_step(model)
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(params[name], tensor.numpy())


def test_copy_false_cannot_share_a_transposed_kernel(equiv_seed):
    torch.manual_seed(equiv_seed)
    model = TorchMLP(SPECS["notebook"])
    params = torch_to_jax(model, layout="flax", copy=False)
    kernel = np.array(params["Dense_0"]["kernel"])
    _torch_step(model)
    np.testing.assert_array_equal(params["Dense_0"]["kernel"], kernel)  # a fresh buffer
    np.testing.assert_array_equal(params["Dense_0"]["bias"], model.fc1.bias.detach().numpy())


def test_copy_is_adopted_by_jax_without_a_second_copy():
    # A copying conversion holds one new buffer per leaf: JAX adopts the buffer
    # equiv filled instead of copying it again. That needs a 64-byte-aligned start.
    from equiv.convert import _fill, _host_empty

    for source in (torch.randn(37, 5), torch.randn(37, 5).mT, torch.randn(3, dtype=torch.float64)):
        with jax.enable_x64(source.dtype == torch.float64):
            buffer = _host_empty(source.shape, source.dtype)
            _fill([(buffer, source)])
            assert torch.equal(buffer, source) and buffer.is_contiguous()
            assert jnp.from_dlpack(buffer).unsafe_buffer_pointer() == buffer.data_ptr()


def test_a_misaligned_buffer_would_be_copied_again():
    # The premise of the alignment above, and its failing counterpart: NumPy's own
    # 16-byte alignment is not enough for XLA:CPU, so a plain np.empty buffer would
    # cost a second copy. If a JAX release adopts it, the alignment can go.
    raw = np.empty(4 * 1024 + 64, np.uint8)
    start = (-raw.ctypes.data % 64) + 16
    misaligned = torch.from_numpy(raw[start : start + 4 * 1000]).view(torch.float32)
    assert jnp.from_dlpack(misaligned).unsafe_buffer_pointer() != misaligned.data_ptr()


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_a_weight_stored_transposed_is_copied_too(layout):
    # A weight whose storage is (in, out) makes weight.mT contiguous: the copy must
    # still be a new buffer (`.mT.contiguous()` would have returned the storage).
    state = random_state(SPECS["notebook"], 0)
    state["fc1.weight"] = state["fc1.weight"].mT.contiguous().mT  # same values, transposed storage
    params = torch_to_jax(state, layout=layout)
    before = leaves(jax.tree.map(np.array, params))
    for tensor in state.values():
        tensor.add_(1.0)
    assert all(np.array_equal(leaves(params)[k], before[k]) for k in before)


def test_parallel_transposes_fill_every_leaf(monkeypatch):
    # Large enough for the threaded path; the result equals the one-thread result.
    from equiv import convert

    spec = MLPSpec((300, 400, 500, 10))
    state = random_state(spec, 0)
    serial = torch_to_jax(state, layout="flax")
    monkeypatch.setattr(convert, "_PARALLEL_MIN_BYTES", 0)
    with_threads = torch_to_jax(state, layout="flax")
    assert all(np.array_equal(leaves(with_threads)[k], v) for k, v in leaves(serial).items())
    module = TorchMLP(spec)
    jax_to_torch(with_threads, layout="flax", out=dict(module.named_parameters()))
    assert_states_identical(dict(module.state_dict()), state)


def test_default_device_is_where_the_data_is():
    cpu = jax.devices("cpu")[0]
    params = torch_to_jax(random_state(SPECS["notebook"], 0), layout="flax")
    assert {d for leaf in jax.tree.leaves(params) for d in leaf.devices()} == {cpu}
    state = jax_to_torch(params, layout="flax")
    assert {t.device.type for t in state.values()} == {"cpu"}


def test_jax_to_torch_never_shares(equiv_seed):
    params = torch_to_jax(random_state(SPECS["notebook"], equiv_seed), layout="torch")
    state = jax_to_torch(params, layout="torch")
    before = np.array(params["fc1.weight"])
    state["fc1.weight"].add_(1.0)
    np.testing.assert_array_equal(params["fc1.weight"], before)


# ---------------------------------------------------------------------------
# Copying into an existing module


def test_out_copies_into_the_module(equiv_seed):
    spec = SPECS["square"]
    params = torch_to_jax(random_state(spec, equiv_seed), layout="flax")
    model = TorchMLP(spec)
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    state = jax_to_torch(params, layout="flax", out=model)
    assert {name: t.data_ptr() for name, t in state.items()} == pointers
    assert_states_identical(dict(model.state_dict()), jax_to_torch(params, layout="flax"))


def test_out_of_another_shape_is_refused():
    params = torch_to_jax(random_state(SPECS["notebook"], 0), layout="flax")
    with pytest.raises(ValueError) as info:
        jax_to_torch(params, layout="flax", out=TorchMLP(MLPSpec((4, 5, 2))))
    assert str(info.value).splitlines()[:3] == [
        "[equiv] cannot copy the flax-layout params (the MLP (4, 3, 2), bias=True, float32) "
        "into out (the MLP (4, 5, 2), bias=True, float32):",
        "  'fc1.weight': (3, 4) in the params, (5, 4) in out",
        "  'fc1.bias': (3,) in the params, (5,) in out",
    ]


def _dotted(tree) -> dict:
    return {
        ".".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_devices_are_taken_by_name_on_either_side():
    state = random_state(MLPSpec((3, 4, 2)), 0)
    for name in ("cpu", jax.devices("cpu")[0]):
        tree = torch_to_jax(state, layout="flax", device=name)
        assert tree["Dense_0"]["kernel"].devices() == {jax.devices("cpu")[0]}
    for name in ("cpu", torch.device("cpu")):
        back = jax_to_torch(tree, layout="flax", device=name)
        assert back["fc1.weight"].device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_missing_or_unknown_device_is_refused_before_any_copy(monkeypatch):
    import equiv.convert

    state = random_state(MLPSpec((3, 4, 2)), 0)
    tree = torch_to_jax(state, layout="flax")
    monkeypatch.setattr(equiv.convert, "_fill", lambda pairs: pytest.fail("copied first"))
    with pytest.raises(ValueError) as info:
        torch_to_jax(state, device="gpu:0")
    assert str(info.value).startswith(
        "[equiv] device 'gpu:0' is not available to JAX, which sees 0 GPU(s)"
    )
    with pytest.raises(ValueError) as info:
        jax_to_torch(tree, device="cuda:1")
    assert str(info.value).startswith(
        "[equiv] device 'cuda:1' is not available to torch, which sees 0 CUDA device(s)"
    )
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        torch_to_jax(state, device="tpu")


def test_copy_false_copies_a_tensor_that_is_not_contiguous():
    # An expand()-ed bias has stride 0: no array can share it, so it is copied.
    state = random_state(MLPSpec((3, 4, 2)), 0)
    state["fc1.bias"] = torch.randn(1).expand(4)
    tree = torch_to_jax(state, layout="torch", copy=False)
    np.testing.assert_array_equal(np.asarray(tree["fc1.bias"]), state["fc1.bias"].numpy())
    state["fc1.weight"].add_(1.0)  # the contiguous leaves are still shared
    np.testing.assert_array_equal(np.asarray(tree["fc1.weight"]), state["fc1.weight"].numpy())


def test_out_with_tied_weights_is_refused_before_any_copy():
    params = torch_to_jax(random_state(SPECS["square"], 0), layout="flax")
    tied = TorchMLP(SPECS["square"])
    tied.fc2.weight = tied.fc1.weight  # one tensor under two names
    before = tied.fc1.weight.detach().clone()
    with pytest.raises(ValueError) as info:
        jax_to_torch(params, layout="flax", out=tied)
    assert str(info.value).startswith(
        "[equiv] out: 'fc1.weight' and 'fc2.weight' share memory (tied weights)"
    )
    assert torch.equal(tied.fc1.weight, before)  # nothing was written
    untied = TorchMLP(SPECS["square"])
    jax_to_torch(params, layout="flax", out=untied)
    np.testing.assert_array_equal(untied.fc2.weight.detach().numpy(), params["Dense_1"]["kernel"].T)


def test_only_overlapping_memory_counts_as_shared():
    from equiv.convert import overlapping

    flat = torch.zeros(10)
    packed = {"a": flat[:4].view(2, 2), "b": flat[4:].view(2, 3)}  # side by side
    assert overlapping(packed) is None
    assert overlapping({**packed, "c": flat[3:5]}) == ("a", "c")  # straddles both
    assert overlapping({"w": flat[:6].view(2, 3), "t": flat[:6].view(2, 3).T}) == ("w", "t")


def test_a_modules_spec_is_read_in_its_current_dtype_and_only_if_it_is_one(x64):
    model = TorchMLP(SPECS["notebook"]).double()  # the spec it was built with says float32
    params = torch_to_jax(model, layout="torch")
    assert params["fc1.weight"].dtype == jnp.float64
    assert_states_identical(jax_to_torch(params, layout="torch"), dict(model.state_dict()))

    class Named(torch.nn.Module):  # an attribute called spec that is not an MLPSpec
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
            self.spec = {"hidden": 3}

    other = Named()
    assert torch_to_jax(other, layout="torch")["fc2.bias"].shape == (2,)
    with pytest.raises(ValueError, match="wrong dtype: 'fc1.weight' expected float32, got float64"):
        torch_to_jax(model, layout="torch", spec=SPECS["notebook"])  # a spec given is kept


def test_tensors_without_values_and_unnamed_entries_are_refused():
    meta = TorchMLP(SPECS["notebook"], device="meta")
    params = torch_to_jax(random_state(SPECS["notebook"], 0), layout="flax")
    for convert in (
        lambda: torch_to_jax(meta),
        lambda: jax_to_torch(params, layout="flax", out=meta),
    ):
        with pytest.raises(ValueError, match="'fc1.weight' is on the meta device and holds no"):
            convert()
    lazy = torch.nn.Module()
    lazy.fc1 = torch.nn.LazyLinear(3)
    with pytest.raises(ValueError, match="'fc1.weight' is an uninitialised lazy parameter"):
        torch_to_jax(lazy)
    lazy.fc1(torch.ones(1, 4))
    assert torch_to_jax(lazy)["Dense_0"]["kernel"].shape == (4, 3)
    with pytest.raises(TypeError, match=r"keys must be strings .*; got 0 \(int\)"):
        torch_to_jax({0: torch.ones(3, 4)})


def test_a_reversed_numpy_view_converts():
    kernel = np.arange(12, dtype=np.float32).reshape(4, 3)
    state = jax_to_torch({"Dense_0": {"kernel": kernel[::-1]}}, layout="flax")
    np.testing.assert_array_equal(state["fc1.weight"].numpy(), kernel[::-1].T)


def test_a_zero_width_is_named_as_such():
    with pytest.raises(ValueError, match=r"every width must be at least 1, got sizes=\(0, 3\)"):
        torch_to_jax({"fc1.weight": torch.ones(3, 0)}, layout="torch")


def test_a_cpu_index_beyond_the_cpus_is_refused():
    from equiv.devices import jax_device, resolve_device, torch_device

    count = len(jax.devices("cpu"))
    assert jax_device(f"cpu:{count - 1}") == jax.devices("cpu")[-1]
    with pytest.raises(ValueError, match=f"which sees {count} CPU device"):
        jax_device(f"cpu:{count}")
    with pytest.raises(ValueError, match="torch has one CPU device"):
        torch_device("cpu:1")
    # For both frameworks, cpu:N is JAX's host device N with torch's one CPU (a
    # comparison on a second host device: test_port.py's replay test), refused beyond
    # JAX's host devices.
    with pytest.raises(ValueError, match=f"which sees {count} CPU device"):
        resolve_device(f"cpu:{count}")
    assert resolve_device(f"cpu:{count - 1}") == (torch.device("cpu"), jax.devices("cpu")[-1])
    assert torch_device("cpu:0") == torch.device("cpu")


def test_arrays_over_several_devices_convert_back():
    # Found in review: a replicated or sharded array has no one buffer for DLPack
    # (BufferError). Two host devices need a fresh process.
    code = """
import jax, numpy as np, torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from equiv.convert import jax_to_torch, torch_to_jax
assert len(jax.devices()) == 2
state = {"fc1.weight": torch.randn(4, 2), "fc1.bias": torch.randn(4)}
params = torch_to_jax(state)
mesh = Mesh(np.array(jax.devices()), ("d",))
for spec in (P(), P("d")):  # replicated; the kernel's rows split over the two devices
    put = {"Dense_0": {
        "kernel": jax.device_put(params["Dense_0"]["kernel"], NamedSharding(mesh, spec)),
        "bias": jax.device_put(params["Dense_0"]["bias"], NamedSharding(mesh, spec)),
    }}
    assert len(put["Dense_0"]["kernel"].sharding.device_set) == 2
    back = jax_to_torch(put)
    assert all(torch.equal(back[k], state[k]) for k in state)
print("ok")
"""
    # JAX on the CPU only: on a GPU machine jax.devices() would be its one GPU.
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_jax_to_torch_inside_a_traced_function_is_refused():
    params = torch_to_jax(random_state(SPECS["notebook"], 0))

    @jax.jit
    def traced(p):
        jax_to_torch(p)
        return p

    with pytest.raises(TypeError, match="is traced .jax_to_torch was called inside jax.jit"):
        traced(params)
    assert set(jax_to_torch(params)) == set(SPECS["notebook"].param_names())  # the twin


def test_read_only_numpy_leaves_convert_without_a_warning():
    # jax.device_get returns read-only arrays; equiv copies them, so torch's "not
    # writable" warning (found in review) does not apply.
    state = random_state(SPECS["notebook"], 0)
    host = jax.device_get(torch_to_jax(state))
    assert not host["Dense_0"]["kernel"].flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = jax_to_torch(host)
    assert_states_identical(back, state)
    back["fc1.weight"].add_(1.0)  # the copy is ours to change; the array is untouched
    assert np.array_equal(host["Dense_0"]["kernel"], state["fc1.weight"].numpy().T)


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_a_sparse_weight_is_refused_by_name(layout):
    # Found in review: torch_to_jax failed inside copy_ with torch's RuntimeError. The
    # twin: the same weight dense converts.
    state = random_state(SPECS["notebook"], 0)
    sparse = {**state, "fc1.weight": state["fc1.weight"].to_sparse()}
    with pytest.raises(ValueError, match=r"'fc1.weight' is sparse_coo: .*\.to_dense\(\)"):
        torch_to_jax(sparse, layout=layout)
    dense = {**state, "fc1.weight": sparse["fc1.weight"].to_dense()}
    assert_states_identical(jax_to_torch(torch_to_jax(dense, layout), layout), state)


def test_cuda_tensors_where_jax_sees_no_gpu_are_told_to_name_a_device(monkeypatch):
    # Found in review: torch_to_jax of a CUDA model beside a CPU-only jax (the default
    # pip install) failed inside DLPack with no advice. No CUDA here: the decision is
    # tested on device objects, which need none, with and without a JAX GPU.
    from equiv import convert

    cuda = {torch.device("cuda:1"), torch.device("cpu")}
    monkeypatch.setattr(convert, "_jax_gpus", lambda: [])
    text = convert.gpu_without_jax(cuda)
    assert text.startswith("the tensors are on cuda:1, and JAX sees no GPU") and (
        "pass device='cpu'" in text
    )
    assert convert.gpu_without_jax({torch.device("cpu")}) is None  # the twins
    monkeypatch.setattr(convert, "_jax_gpus", lambda: ["a GPU"])
    assert convert.gpu_without_jax(cuda) is None


def test_a_sequentials_state_dict_converts_as_its_file_is_read():
    # Found in a user trial: load_jax read a file of seq.state_dict() by its indices, but
    # torch_to_jax refused the state_dict itself. The twin: a ModuleList's names.
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    for state in (seq.state_dict(), {f"model.{k}": v for k, v in seq.state_dict().items()}):
        tree = torch_to_jax(state, layout="flax")
        np.testing.assert_array_equal(tree["Dense_1"]["kernel"], seq[2].weight.detach().T)
    listed = {"layers.0.weight": torch.ones(3, 3), "layers.1.weight": torch.ones(3, 3)}
    with pytest.raises(ValueError, match="state_dict: its entries number Linear layers 0 and 1"):
        torch_to_jax(listed)


_EXIT_AFTER_A_JITTED_CALL = """
import jax, torch
from torch import nn
from equiv.convert import torch_to_jax

def main():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(500, 500), nn.Tanh(), nn.Linear(500, 2))
    params = torch_to_jax(net, layout="flax")

    @jax.jit
    def total(p, x):
        return jax.tree_util.tree_reduce(lambda a, b: a + b.sum(), p, 0.0) + x.sum()

    return total(params, jax.numpy.ones(3))

out = main()  # params dropped while the call may still read them; the script ends
"""


def test_a_script_may_end_right_after_a_jitted_call_on_converted_params():
    # Found in a user trial: converted params dropped by a returning function while a
    # jitted call still read them aborted the process at exit ("terminate called
    # without an active exception", status 134): 22 of 30 runs there, 12 of 20 of
    # this script before the fix (the DLPack deleter took the GIL on XLA's thread
    # during interpreter shutdown), 0 of 20 after. Six runs, two at a time: all six
    # pass by chance at about 0.4**6 = 0.4% on the old code.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    codes = []
    for _ in range(3):
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", _EXIT_AFTER_A_JITTED_CALL],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            for _ in range(2)
        ]
        codes += [(run.wait(timeout=120), run.communicate()[1][-500:]) for run in runs]
    assert all(code == 0 for code, _ in codes), codes


def test_a_dropped_conversion_is_freed_before_the_next_one_allocates(monkeypatch):
    # JAX frees what device_put adopted at its next garbage collection, not as the
    # array is dropped: without one at its start, torch_to_jax allocated its copy
    # while the dropped one was still alive (scripts/bench_convert.py: 774 MiB peak
    # for a 384 MiB model, against 434 MiB). The twin: a conversion still referenced
    # stays alive.
    from equiv import convert

    buffers: list[weakref.ref] = []
    alive_at_allocation: list[int] = []

    def recording(nbytes):
        alive_at_allocation.append(sum(ref() is not None for ref in buffers))
        memory = aligned_bytes(nbytes)
        buffers.append(weakref.ref(memory))
        return memory

    aligned_bytes = convert._aligned_bytes
    monkeypatch.setattr(convert, "_aligned_bytes", recording)
    state = random_state(SPECS["notebook"], 0)
    kept = torch_to_jax(state, layout="torch")
    count = len(buffers)
    dropped = torch_to_jax(state, layout="torch")
    assert alive_at_allocation[count] == count  # kept is alive
    del dropped
    torch_to_jax(state, layout="torch")
    assert alive_at_allocation[2 * count] == count, alive_at_allocation  # kept only
    assert jax_to_torch(kept, layout="torch").keys() == state.keys()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dropout_is_parameterless_and_the_converters_take_it_in_either_mode(mode, equiv_seed):
    # Found in a user trial: a model with nn.Dropout was refused by the converters,
    # which need only its parameters (mlp_from_module, which claims the forward,
    # refuses it in training mode: tests/test_from_module.py).
    torch.manual_seed(equiv_seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.drop, self.out = (
                torch.nn.Linear(4, 6),
                torch.nn.Dropout(0.5),
                torch.nn.Linear(6, 2),
            )

        def forward(self, x):
            return self.out(self.drop(torch.tanh(self.inp(x))))

    net = Net().train(mode == "train")
    rng = torch.get_rng_state()
    params = torch_to_jax(net, layout="flax")
    np.testing.assert_array_equal(params["Dense_1"]["kernel"], net.out.weight.detach().T)
    doubled = jax.tree.map(lambda a: a * 2, params)
    expected = net.out.weight.detach() * 2
    jax_to_torch(doubled, layout="flax", out=net)
    assert torch.equal(net.out.weight.detach(), expected)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe forward drew nothing of ours
    assert net.training == net.drop.training == (mode == "train")  # modes restored
    # The twin: a parameterless module that is not the identity in eval mode is refused.
    net.drop = torch.nn.Softmax(dim=-1)
    with pytest.raises(ValueError, match="Softmax 'drop' comes before Linear 'out'"):
        torch_to_jax(net)


def test_a_forward_mixing_activation_modules_and_functions_converts(tmp_path, equiv_seed):
    # Found in a user trial: one activation module and one F.gelu in a forward were
    # refused by the converters as "not its Linear layers and activations applied in
    # the order read", though the order was read off the forward's calls and the
    # converters need only the parameters (all-functional forwards were taken).
    torch.manual_seed(equiv_seed)

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b, self.act, self.a = (
                torch.nn.Linear(8, 8),
                torch.nn.ReLU(),
                torch.nn.Linear(4, 8),
            )
            self.c = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.c(torch.nn.functional.gelu(self.b(self.act(self.a(x)))))

    model = Mixed()
    tree = torch_to_jax(model, layout="torch")
    assert [tree[f"fc{i}.weight"].shape for i in (1, 2, 3)] == [(8, 4), (8, 8), (2, 8)]
    np.testing.assert_array_equal(tree["fc2.weight"], model.b.weight.detach())
    jax_to_torch(jax.tree.map(lambda a: a * 2, tree), layout="torch", out=model)
    np.testing.assert_array_equal(model.b.weight.detach(), tree["fc2.weight"] * 2)
    torch.save(model.state_dict(), tmp_path / "mixed.pt")
    from equiv.checkpoint import load_torch

    assert torch.equal(load_torch(tmp_path / "mixed.pt", out=Mixed())["fc3.weight"], model.c.weight)
    # The twin: mlp_from_module, which claims the forward, cannot read F.gelu.
    with pytest.raises(ValueError, match="a function called there .* is not a submodule"):
        mlp_from_module(model)


def test_a_residual_forward_is_told_apart_from_an_unknown_call_order(equiv_seed):
    # Found in a user trial: b(act(a(x)) + x) was told that equiv "cannot tell which
    # of its layers is fc1", though it had read the order of the calls.
    torch.manual_seed(equiv_seed)

    class Residual(torch.nn.Module):
        def __init__(self, skip: bool):
            super().__init__()
            self.a, self.act, self.b, self.skip = (
                torch.nn.Linear(4, 4),
                torch.nn.ReLU(),
                torch.nn.Linear(4, 2),
                skip,
            )

        def forward(self, x):
            h = self.act(self.a(x))
            return self.b(h + x if self.skip else h)

    with pytest.raises(ValueError) as info:
        torch_to_jax(Residual(skip=True), spec=MLPSpec((4, 4, 2)))
    assert str(info.value) == (
        "[equiv] Residual's forward calls its Linear layers as 'a', 'b', but its output is "
        "not theirs with its activation modules between them (run on a probe batch: a "
        "residual connection, a scale or another operation in the forward?): equiv's MLP "
        "is the Linear layers and activations alone. To convert the parameters all the "
        "same, pass them under equiv's names ({'fc1.weight': model.a.weight, "
        "'fc2.weight': model.b.weight, ...})"
    )
    model = Residual(skip=False)  # the twin: without the skip it is a Linear stack
    np.testing.assert_array_equal(
        torch_to_jax(model, layout="torch")["fc2.weight"], model.b.weight.detach()
    )


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("count", [1, 4])
def test_transposing_copies_on_threads_and_in_strips_are_exact(workers, count, monkeypatch):
    # Weights above the strip threshold (1 MiB), widths not a multiple of the strip,
    # one pair (split among the workers) and more pairs than workers (one each): into
    # new memory through torch's kernel, into existing tensors (out=) in strips.
    import equiv.convert

    monkeypatch.setattr(equiv.convert.torch, "get_num_threads", lambda: workers)
    monkeypatch.setattr(equiv.convert.os, "cpu_count", lambda: workers)
    gen = torch.Generator().manual_seed(count)
    sizes = (1000, 701, 603, 523, 530)[: count + 1]
    state = {}
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False), start=1):
        state[f"fc{i}.weight"] = torch.randn(n_out, n_in, generator=gen)
        state[f"fc{i}.bias"] = torch.randn(n_out, generator=gen)
    assert all(
        t.nbytes >= equiv.convert._STRIP_MIN_BYTES for n, t in state.items() if "weight" in n
    )
    tree = torch_to_jax(state, layout="flax")
    for i in range(1, count + 1):
        np.testing.assert_array_equal(
            tree[f"Dense_{i - 1}"]["kernel"], state[f"fc{i}.weight"].numpy().T
        )
    target = {name: torch.zeros_like(t) for name, t in state.items()}
    jax_to_torch(tree, layout="flax", out=target)
    assert_states_identical(target, state)


def test_flatten_and_identity_placeholders_are_read_as_absent(equiv_seed):
    # Found in a user trial: a leading nn.Flatten (an MNIST model), an nn.Identity
    # placeholder beside an activation and one after the last layer were refused, though
    # each is the identity on a batch of rows and has no parameters.
    torch.manual_seed(equiv_seed)
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(4, 8),
        torch.nn.Identity(),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 2),
        torch.nn.Identity(),
    )
    spec, params = mlp_from_module(model)
    assert (spec.sizes, spec.activation) == ((4, 8, 2), "relu")
    assert torch.equal(params["fc2.weight"], model[4].weight)
    np.testing.assert_array_equal(
        torch_to_jax(model, layout="torch")["fc1.bias"], model[1].bias.detach()
    )
    for flat in (torch.nn.Flatten(-1), torch.nn.Flatten(1, 1)):  # no-ops on rows too
        torch_to_jax(torch.nn.Sequential(flat, torch.nn.Linear(4, 8)))
    # The twin: a Flatten that flattens the batch too is no identity, and is refused.
    with pytest.raises(ValueError, match="submodule '0' is Flatten, which equiv cannot express"):
        torch_to_jax(torch.nn.Sequential(torch.nn.Flatten(0), torch.nn.Linear(4, 8)))


def test_a_transposed_kernel_copied_into_out_is_named_against_outs_sizes(equiv_seed):
    # Found in a user trial: the sizes read from entries that do not chain blamed
    # Dense_0.bias and Dense_1.kernel against an MLP (8, 4, 2) of neither model.
    torch.manual_seed(equiv_seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    params = torch_to_jax(net, layout="flax")
    params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].T
    with pytest.raises(ValueError) as info:
        jax_to_torch(params, layout="flax", out=net)
    assert str(info.value).splitlines()[:2] == [
        "[equiv] flax-layout params (as out holds them) does not match the MLP (4, 8, 2) "
        "(bias=True, float32):",
        "  wrong shape: 'Dense_0.kernel' expected (4, 8), got (8, 4) (its transpose: the flax "
        "layout holds weights (in, out))",
    ]
    params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].T  # the twin, put right
    jax_to_torch(params, layout="flax", out=net)


def test_strips_are_kept_to_targets_of_enough_rows_and_a_bounded_count(monkeypatch):
    # Found in review: a (4, 2_000_000) target ran in 62,500 strips of 32 columns (665
    # ms, against 16 ms in one copy through torch's kernel). Strips need >= 32 rows, and
    # a wide target takes wider strips (at most 512). The twin: (1000, 2000) runs in 63.
    import equiv.convert

    shapes = []
    real = torch.Tensor.copy_

    def counted(self, source, *args, **kwargs):
        shapes.append(tuple(self.shape))
        return real(self, source, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", counted)
    monkeypatch.setattr(equiv.convert.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(equiv.convert.os, "cpu_count", lambda: 2)
    for rows, columns, most in ((4, 2_000_000, 1), (32, 200_000, 512), (1000, 2000, 64)):
        shapes.clear()
        source = torch.randn(columns, rows)
        target = torch.zeros(rows, columns)
        equiv.convert._fill([(target, source.mT)], strips=True)
        assert torch.equal(target, source.mT)
        assert 0 < len(shapes) <= most, (rows, columns, len(shapes))
        if most > 1:
            assert len(shapes) > 2, (rows, columns)  # in strips, not one copy per worker


@pytest.mark.parametrize(
    "final", [torch.nn.Sigmoid(), torch.nn.Softmax(dim=-1), torch.nn.LogSoftmax(dim=1)]
)
def test_a_final_activation_is_taken_by_the_converters_not_by_a_comparison(final, tmp_path):
    # Found in a user trial: a binary classifier (Linear, ReLU, Linear, Sigmoid) could
    # not be converted, saved or filled from JAX through its module; the converters
    # need only the parameters. A comparison's MLP still ends with a Linear layer.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3), final)
    params = torch_to_jax(net)
    target = copy.deepcopy(net)
    for tensor in target.state_dict().values():
        tensor.zero_()
    jax_to_torch(params, out=target)
    assert_states_identical(target.state_dict(), net.state_dict())
    equiv.save_torch(net, tmp_path / "net.safetensors")
    with pytest.raises(ValueError, match="comes after the last Linear layer|cannot express"):
        equiv.mlp_from_module(net)
    # The twins: a softmax over the batch (dim=0), between two layers, or a forward
    # that does more after it.
    with pytest.raises(ValueError, match="is Softmax, which equiv cannot express"):
        torch_to_jax(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(dim=0)))
    with pytest.raises(ValueError, match="equiv takes it only after the last Linear layer"):
        torch_to_jax(
            torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Softmax(-1), torch.nn.Linear(8, 3))
        )

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = net

        def forward(self, x):
            return 2 * self.stack(x)

    with pytest.raises(ValueError, match="its output is not theirs"):
        torch_to_jax(Scaled())


def test_an_equinox_model_must_end_with_the_torch_modules_final_activation():
    eqx = pytest.importorskip("equinox")
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1), torch.nn.Sigmoid()
    )
    key = jax.random.key(0)
    equiv.torch_to_equinox(net, eqx.nn.MLP(4, 1, 8, 1, final_activation=jax.nn.sigmoid, key=key))
    with pytest.raises(ValueError, match="final_activation=jax.nn.sigmoid"):
        equiv.torch_to_equinox(net, eqx.nn.MLP(4, 1, 8, 1, key=key))
