"""MLPSpec: what passes, what fails, and the exact message of each failure."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import equiv
from equiv import MLPSpec
from equiv.spec import ACTIVATIONS, DTYPES, LOSSES

VALID = [  # (kwargs, param_shapes)
    ({}, {"fc1.weight": (3, 4), "fc1.bias": (3,), "fc2.weight": (2, 3), "fc2.bias": (2,)}),
    (
        {"sizes": [4, 3, 2]},
        {"fc1.weight": (3, 4), "fc1.bias": (3,), "fc2.weight": (2, 3), "fc2.bias": (2,)},
    ),
    ({"sizes": (1, 1)}, {"fc1.weight": (1, 1), "fc1.bias": (1,)}),
    # The twins of a 1-class cross-entropy: 2 classes, and one output under BCE.
    ({"sizes": (4, 2), "loss": "cross_entropy"}, {"fc1.weight": (2, 4), "fc1.bias": (2,)}),
    ({"sizes": (4, 1), "loss": "bce_with_logits"}, {"fc1.weight": (1, 4), "fc1.bias": (1,)}),
    ({"sizes": (5, 7, 3), "bias": False}, {"fc1.weight": (7, 5), "fc2.weight": (3, 7)}),
    (  # one bool per Linear layer
        {"sizes": (4, 8, 8, 2), "bias": (True, False, True)},
        {
            "fc1.weight": (8, 4),
            "fc1.bias": (8,),
            "fc2.weight": (8, 8),
            "fc3.weight": (2, 8),
            "fc3.bias": (2,),
        },
    ),
    (
        {"sizes": (5, 7, 3), "bias": [False, True]},
        {"fc1.weight": (7, 5), "fc2.weight": (3, 7), "fc2.bias": (3,)},
    ),
    (
        {"sizes": (784, 512, 512, 10), "dtype": "float64"},
        {
            "fc1.weight": (512, 784),
            "fc1.bias": (512,),
            "fc2.weight": (512, 512),
            "fc2.bias": (512,),
            "fc3.weight": (10, 512),
            "fc3.bias": (10,),
        },
    ),
]


@pytest.mark.parametrize(("kwargs", "shapes"), VALID)
def test_valid_specs(kwargs, shapes):
    spec = MLPSpec(**kwargs)
    assert isinstance(spec.sizes, tuple)
    assert spec.param_shapes() == shapes
    assert spec.param_names() == list(shapes)
    assert spec.num_layers == len(spec.sizes) - 1
    assert spec.unit_roundoff == {"float32": 2.0**-24, "float64": 2.0**-53}[spec.dtype]


def test_defaults_are_the_notebook_model():
    spec = MLPSpec()
    assert (spec.sizes, spec.activation, spec.loss, spec.bias, spec.dtype) == (
        (4, 3, 2),
        "relu",
        "mse",
        True,
        "float32",
    )
    assert "relu" in ACTIVATIONS and "mse" in LOSSES and DTYPES == ("float32", "float64")


def test_spec_is_frozen_hashable_and_equal_by_value():
    # Compiled JAX steps are cached per spec: a list and a tuple of sizes are one spec.
    a, b = MLPSpec([4, 3, 2]), MLPSpec((4, 3, 2))
    assert a == b and hash(a) == hash(b)
    assert MLPSpec((4, 3, 2), dtype="float64") != a
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.sizes = (1, 1)


def test_replace_validates_again():
    spec = MLPSpec((4, 3, 2))
    assert spec.replace(dtype="float64").dtype == "float64"
    assert spec.replace(bias=False).param_names() == ["fc1.weight", "fc2.weight"]
    assert spec.replace(dtype="bfloat16").dtype == "bfloat16"  # a stored model's
    with pytest.raises(ValueError, match=r"^\[equiv\] unknown dtype 'float8_e4m3fn'"):
        spec.replace(dtype="float8_e4m3fn")


INVALID = [  # (kwargs, exception, exact message)
    (
        {"sizes": (4,)},
        ValueError,
        "[equiv] sizes needs at least an input and an output width, got (4,); "
        "for example MLPSpec(sizes=(4, 3, 2))",
    ),
    (
        {"sizes": ()},
        ValueError,
        "[equiv] sizes needs at least an input and an output width, got (); "
        "for example MLPSpec(sizes=(4, 3, 2))",
    ),
    (
        {"sizes": (4, 0, 2)},
        ValueError,
        "[equiv] every width must be at least 1, got sizes=(4, 0, 2)",
    ),
    ({"sizes": (4, -3)}, ValueError, "[equiv] every width must be at least 1, got sizes=(4, -3)"),
    (
        {"sizes": "432"},
        TypeError,
        "[equiv] sizes must be a sequence of ints such as (4, 3, 2), got '432'",
    ),
    ({"sizes": 4}, TypeError, "[equiv] sizes must be a sequence of ints such as (4, 3, 2), got 4"),
    ({"sizes": (4, 2.0)}, TypeError, "[equiv] sizes must hold ints, got (4, 2.0)"),
    ({"sizes": (4, True)}, TypeError, "[equiv] sizes must hold ints, got (4, True)"),
    (
        {"activation": "rleu"},
        ValueError,
        f"[equiv] unknown activation 'rleu'; expected one of {', '.join(ACTIVATIONS)}",
    ),
    ({"loss": "l2"}, ValueError, f"[equiv] unknown loss 'l2'; expected one of {', '.join(LOSSES)}"),
    (
        {"dtype": "float8_e4m3fn"},
        ValueError,
        "[equiv] unknown dtype 'float8_e4m3fn'; expected one of float32, float64, bfloat16, "
        "float16",
    ),
    (
        {"dtype": "int32"},
        ValueError,
        "[equiv] unknown dtype 'int32'; expected one of float32, float64, bfloat16, float16",
    ),
    (  # found in a user trial: every loss and gradient 0, and every comparison passed
        {"sizes": (4, 3, 1), "loss": "cross_entropy"},
        ValueError,
        "[equiv] cross_entropy over 1 class is 0 for every input (softmax of one logit is 1), "
        "so its gradients are all 0 and a comparison proves nothing; for one output use "
        "loss='bce_with_logits', or give the model 2 or more outputs",
    ),
    (
        {"sizes": (4, 3, 2), "activation": ("tanh", "relu")},
        ValueError,
        "[equiv] activation has 2 names for 1 hidden layer (sizes=(4, 3, 2)); give one name, "
        "or one per hidden layer",
    ),
    ({"bias": 1}, TypeError, "[equiv] bias must be True or False, got 1"),
    ({"bias": "yes"}, TypeError, "[equiv] bias must be True or False, got 'yes'"),
    ({"bias": None}, TypeError, "[equiv] bias must be True or False, got None"),
    (
        {"bias": (True, False, True)},
        ValueError,
        "[equiv] bias has 3 entries for 2 Linear layers (sizes=(4, 3, 2)); give True or False "
        "for every layer, or one bool per layer, fc1 first: MLPSpec((4, 3, 2), bias=(True, "
        "False)) leaves fc2 without a bias",
    ),
    (
        {"bias": ()},
        ValueError,
        "[equiv] bias has 0 entries for 2 Linear layers (sizes=(4, 3, 2)); give True or False "
        "for every layer, or one bool per layer, fc1 first: MLPSpec((4, 3, 2), bias=(True, "
        "False)) leaves fc2 without a bias",
    ),
    (
        {"bias": (1, 0)},
        TypeError,
        "[equiv] bias must hold True or False for each Linear layer, got (1, 0) (fc1's 1, "
        "fc2's 0 are not bools): write bias=(True, False)",
    ),
    (
        {"bias": (True, "no")},
        TypeError,
        "[equiv] bias must hold True or False for each Linear layer, got (True, 'no') (fc2's "
        "'no' is not a bool): for example MLPSpec((4, 3, 2), bias=(True, False)) leaves fc2 "
        "without a bias",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    INVALID,
    ids=[",".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _, _ in INVALID],
)
def test_invalid_specs(kwargs, error, message):
    with pytest.raises(error) as info:
        MLPSpec(**kwargs)
    assert type(info.value) is error
    assert str(info.value) == message
    assert "\n" not in str(info.value)  # one line


def test_bias_is_one_bool_or_one_per_layer_and_biases_is_per_layer():
    assert MLPSpec((4, 8, 8, 2)).biases == (True, True, True)
    assert MLPSpec((4, 8, 8, 2), bias=False).biases == (False, False, False)
    mixed = MLPSpec((4, 8, 8, 2), bias=[True, False, True])
    assert mixed.bias == (True, False, True) and mixed.biases == (True, False, True)
    # A list and a tuple are one spec (its compiled JAX step is cached per spec).
    assert mixed == MLPSpec((4, 8, 8, 2), bias=(True, False, True))
    assert hash(mixed) == hash(MLPSpec((4, 8, 8, 2), bias=(True, False, True)))
    # What the user gave is kept: a tuple of equal entries stays a tuple, and reads the
    # same through biases as the bool.
    same = MLPSpec((4, 8, 8, 2), bias=(True, True, True))
    assert same.bias == (True, True, True) and same.biases == MLPSpec((4, 8, 8, 2)).biases
    assert same.param_shapes() == MLPSpec((4, 8, 8, 2)).param_shapes()
    assert mixed.replace(bias=True).biases == (True, True, True)
    with pytest.raises(ValueError, match=r"^\[equiv\] bias has 3 entries for 2 Linear layers"):
        mixed.replace(sizes=(4, 8, 2))  # sizes and bias are checked together


@pytest.mark.parametrize(
    ("bias", "text"),
    [
        (True, "bias=True"),
        (False, "bias=False"),
        ((True, False, True), "bias on fc1 and fc3 only"),
        ((False, True, False), "bias on fc2 only"),
        ((True, True, True), "bias on every layer"),
        ((False, False, False), "no bias on any layer"),
    ],
)
def test_describe_bias_names_the_layers_with_one(bias, text):
    assert MLPSpec((4, 8, 8, 2), bias=bias).describe_bias() == text


@pytest.mark.parametrize("field", ["activation", "loss", "dtype"])
def test_choices_must_be_exact(field):
    # No guessing: "ReLU", "MSE", "FLOAT32" are not the names.
    value = {"activation": "ReLU", "loss": "MSE", "dtype": "FLOAT32"}[field]
    with pytest.raises(ValueError, match=rf"^\[equiv\] unknown {field} {re.escape(repr(value))};"):
        MLPSpec(**{field: value})


SPEC_TAKERS = {
    "torch_to_jax": lambda model, spec, path: equiv.torch_to_jax(model, spec=spec),
    "jax_to_torch": lambda model, spec, path: equiv.jax_to_torch(
        equiv.torch_to_jax(model), spec=spec
    ),
    "save_torch": lambda model, spec, path: equiv.save_torch(model, path, spec=spec),
    "load_torch": lambda model, spec, path: (
        equiv.save_torch(model, path),
        equiv.load_torch(path, spec=spec),
    ),
    "save_jax": lambda model, spec, path: equiv.save_jax(
        equiv.torch_to_jax(model), path, spec=spec
    ),
    "load_jax": lambda model, spec, path: (
        equiv.save_torch(model, path),
        equiv.load_jax(path, spec=spec),
    ),
    # Found in review: the port checks and check_gradients raised AttributeError.
    "check_jax_port": lambda model, spec, path: equiv.check_jax_port(
        model, _flax_mse, torch.randn(3, 4), torch.randn(3, 2), spec=spec
    ),
    "check_manual_backward": lambda model, spec, path: equiv.check_manual_backward(
        model, _manual_grads, torch.randn(3, 4), torch.randn(3, 2), spec=spec
    ),
    "check_gradients": lambda model, spec, path: equiv.check_gradients(
        equiv.mlp_from_module(model)[1], torch.randn(3, 4), torch.randn(3, 2), spec
    ),
}


def _flax_mse(params, x, y):
    import jax

    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return ((h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"] - y) ** 2).mean()


def _manual_grads(params, x, y):
    return equiv.manual.loss_and_grads(params, x, y, MLPSpec((4, 8, 2)))


@pytest.mark.parametrize("taker", list(SPEC_TAKERS))
def test_sizes_passed_as_spec_are_refused_with_the_spec_to_write(taker, tmp_path):
    # Found in a user trial: torch_to_jax(model, spec=(4, 8, 2)) raised a bare
    # AttributeError ('tuple' object has no attribute 'param_shapes').
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    path = tmp_path / "model.safetensors"
    SPEC_TAKERS[taker](model, MLPSpec((4, 8, 2)), path)  # the spec written out works
    path.unlink(missing_ok=True)
    with pytest.raises(
        TypeError, match=re.escape("got tuple (4, 8, 2): write spec=equiv.MLPSpec((4, 8, 2))")
    ):
        SPEC_TAKERS[taker](model, (4, 8, 2), path)
    assert not path.exists() or taker in ("load_torch", "load_jax")


def test_an_activation_given_as_a_module_or_function_is_told_its_name():
    # Found in a user trial: activation=nn.ReLU() raised "'ReLU' object is not iterable";
    # in review, nn.GELU(approximate="tanh") and jax.nn.gelu were told 'gelu', and a
    # LeakyReLU's slope was left out.
    import jax
    import numpy as np

    for given, hint in (
        (torch.nn.ReLU(), "'relu'"),
        (torch.nn.LeakyReLU(0.2), "'leaky_relu', negative_slope=0.2"),
        (torch.nn.ELU(0.5), "'elu', elu_alpha=0.5"),
        (torch.nn.GELU(), "'gelu'"),
        (torch.nn.GELU(approximate="tanh"), "'gelu_tanh'"),
        (jax.nn.gelu, "'gelu_tanh' (jax.nn.gelu's default form; 'gelu' for approximate=False)"),
        (jax.nn.silu, "'silu'"),
    ):
        with pytest.raises(TypeError) as info:
            MLPSpec((4, 3, 2), activation=given)
        assert str(info.value).endswith(f"write activation={hint}"), str(info.value)
    with pytest.raises(TypeError, match=r"or one name per hidden layer, got torch.float32$"):
        MLPSpec((4, 3, 2), activation=torch.float32)
    # The twins: names in any sequence, a NumPy array of them included, as before.
    assert MLPSpec((4, 3, 2), activation=["tanh"]).activations == ("tanh",)
    both = MLPSpec((4, 8, 3, 2), activation=np.array(["relu", "tanh"]))
    assert both.activation == ("relu", "tanh") and type(both.activation[0]) is str


def test_a_dtype_given_as_an_object_is_read_by_its_name():
    # Found in a user trial: dtype=torch.float32 was an "unknown dtype".
    import jax.numpy as jnp
    import numpy as np

    for given, name in (
        (torch.float32, "float32"),
        (jnp.float32, "float32"),
        (np.float64, "float64"),
        (np.dtype("float64"), "float64"),
        (torch.bfloat16, "bfloat16"),
        (jnp.bfloat16, "bfloat16"),
        (np.float16, "float16"),
    ):
        assert MLPSpec((4, 3, 2), dtype=given) == MLPSpec((4, 3, 2), dtype=name)
    with pytest.raises(ValueError, match="unknown dtype 'float8_e4m3fn'; expected one of float32"):
        MLPSpec((4, 3, 2), dtype=torch.float8_e4m3fn)
    # Found in review: None became float64 (NumPy's reading), an array its dtype.
    for odd in (None, np.zeros(2), jnp.zeros(2), {}):
        with pytest.raises(ValueError, match="unknown dtype"):
            MLPSpec((4, 3, 2), dtype=odd)
