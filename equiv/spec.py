"""What an MLP is: layer sizes, activation, loss, bias and dtype.

One :class:`MLPSpec` describes the model that every backend builds, so the torch
module, the hand-derived pass and the JAX function cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from equiv._messages import type_error, value_error
from equiv.activations import ACTIVATIONS as _ACTIVATION_TABLE
from equiv.losses import LOSSES as _LOSS_TABLE

#: Activations between layers; :mod:`equiv.activations` holds each in every backend.
ACTIVATIONS = tuple(_ACTIVATION_TABLE)
#: Losses, reduced as ``torch.nn`` reduces them; :mod:`equiv.losses` holds them.
LOSSES = tuple(_LOSS_TABLE)
#: Floating dtypes a comparison can run in, with their unit roundoff ``u = 2**-p``.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53}
DTYPES = tuple(UNIT_ROUNDOFF)
#: Half-precision dtypes a model may be stored in: the converters and checkpoints carry
#: them as they are; a comparison runs in one of :data:`DTYPES` (:func:`check_computable`).
HALF_UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
HALF_DTYPES = tuple(HALF_UNIT_ROUNDOFF)
#: Every dtype an :class:`MLPSpec` may hold.
STORAGE_DTYPES = DTYPES + HALF_DTYPES


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """A multilayer perceptron: ``sizes[0]`` inputs, ``sizes[-1]`` outputs.

    Layer ``i`` (1-based, as torch names it ``fc{i}``) maps ``sizes[i-1]`` to
    ``sizes[i]``; the activation sits between layers, never after the last.

    Args:
      sizes: at least two positive widths, input first.
      activation: one of :data:`ACTIVATIONS` for every hidden layer, or a tuple
        with one name per hidden layer (``len(sizes) - 2`` of them).
      loss: one of :data:`LOSSES`; ``"mse"`` is ``torch.nn.MSELoss()``, the mean
        over every element.
      bias: whether every layer has a bias, or a tuple with one bool per Linear
        layer (``len(sizes) - 1`` of them, ``fc1`` first), as ``activation`` takes
        one name or one per hidden layer. Read it through :attr:`biases`.
      dtype: ``"float32"`` or ``"float64"``, what a comparison runs in; or
        ``"bfloat16"`` or ``"float16"``, a model stored in half precision, which the
        converters and checkpoints carry but no comparison runs in
        (:func:`check_computable`).
      negative_slope: ``leaky_relu``'s slope (torch's default 0.01).
      elu_alpha: ``elu``'s alpha (torch's default 1.0).
      label_smoothing: cross-entropy's ε, as ``torch.nn.CrossEntropyLoss`` takes it.
      huber_delta: ``huber``'s δ; smooth_l1_beta: ``smooth_l1``'s β.

    Example:
      >>> spec = MLPSpec((4, 3, 2))
      >>> spec.param_shapes()
      {'fc1.weight': (3, 4), 'fc1.bias': (3,), 'fc2.weight': (2, 3), 'fc2.bias': (2,)}
      >>> MLPSpec((4, 3, 2), bias=(True, False)).param_names()
      ['fc1.weight', 'fc1.bias', 'fc2.weight']
    """

    sizes: tuple[int, ...] = (4, 3, 2)
    activation: str = "relu"
    loss: str = "mse"
    bias: bool | tuple[bool, ...] = True
    dtype: str = "float32"
    negative_slope: float = 0.01
    elu_alpha: float = 1.0
    label_smoothing: float = 0.0
    huber_delta: float = 1.0
    smooth_l1_beta: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.sizes, (str, bytes)) or not isinstance(self.sizes, Sequence):
            raise type_error(
                f"sizes must be a sequence of ints such as (4, 3, 2), got {self.sizes!r}"
            )
        sizes = tuple(self.sizes)
        if len(sizes) < 2:
            raise value_error(
                f"sizes needs at least an input and an output width, got {sizes}; "
                "for example MLPSpec(sizes=(4, 3, 2))"
            )
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int):
                raise type_error(f"sizes must hold ints, got {sizes}")
            if size < 1:
                raise value_error(f"every width must be at least 1, got sizes={sizes}")
        object.__setattr__(self, "sizes", sizes)
        if isinstance(self.activation, str):
            _check_choice("activation", self.activation, ACTIVATIONS)
        else:
            try:
                names = tuple(self.activation)
            except TypeError:
                names = None
            if names is None or not all(isinstance(name, str) for name in names):  # np.str_ too
                # Found in a user trial: activation=nn.ReLU() raised "'ReLU' object is
                # not iterable" with no word of what to write.
                raise type_error(
                    f"activation must be a name ({', '.join(ACTIVATIONS)}) or one name per "
                    f"hidden layer, got {self.activation!r}{_activation_hint(self.activation)}"
                )
            if len(names) != len(sizes) - 2:
                hidden = len(sizes) - 2
                raise value_error(
                    f"activation has {len(names)} name{'s' if len(names) != 1 else ''} for "
                    f"{hidden} hidden layer{'s' if hidden != 1 else ''} (sizes={sizes}); give "
                    "one name, or one per hidden layer"
                )
            for name in names:
                _check_choice("activation", name, ACTIVATIONS)
            object.__setattr__(self, "activation", tuple(str(name) for name in names))
        _check_choice("loss", self.loss, LOSSES)
        if self.loss in ("cross_entropy", "cross_entropy_probs") and sizes[-1] == 1:
            # Found in a user trial: every loss 0 and every gradient 0, so every
            # comparison passed and proved nothing.
            raise value_error(
                f"{self.loss} over 1 class is 0 for every input (softmax of one logit is "
                f"1), so its gradients are all 0 and a comparison proves nothing; for one "
                "output use loss='bce_with_logits', or give the model 2 or more outputs"
            )
        for field, check, allowed in _HYPER_PARAMETERS:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise type_error(f"{field} must be a number, got {value!r}")
            if not check(value):
                raise value_error(f"{field} must be {allowed}, got {value}")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        _check_choice("dtype", self.dtype, STORAGE_DTYPES)
        if not isinstance(self.bias, bool):
            object.__setattr__(self, "bias", _per_layer_bias(self.bias, sizes))

    @property
    def num_layers(self) -> int:
        """The number of Linear layers."""
        return len(self.sizes) - 1

    @property
    def activations(self) -> tuple[str, ...]:
        """The activation after each hidden layer (one fewer than the layers).

        >>> MLPSpec((4, 8, 8, 2), activation="tanh").activations
        ('tanh', 'tanh')
        """
        if isinstance(self.activation, str):
            return (self.activation,) * (self.num_layers - 1)
        return tuple(self.activation)

    @property
    def biases(self) -> tuple[bool, ...]:
        """Whether each Linear layer has a bias, ``fc1`` first: what every backend reads.

        >>> MLPSpec((4, 8, 8, 2)).biases
        (True, True, True)
        >>> MLPSpec((4, 8, 8, 2), bias=(True, False, True)).biases
        (True, False, True)
        """
        if isinstance(self.bias, bool):
            return (self.bias,) * self.num_layers
        return tuple(self.bias)

    def describe_bias(self) -> str:
        """The bias for a message: ``bias=True`` or ``bias=False`` for one bool for every
        layer; for a tuple, the layers that have one.

        >>> MLPSpec((4, 3, 2)).describe_bias()
        'bias=True'
        >>> MLPSpec((4, 8, 8, 2), bias=(True, False, True)).describe_bias()
        'bias on fc1 and fc3 only'
        """
        if isinstance(self.bias, bool):
            return f"bias={self.bias}"
        if len(set(self.biases)) == 1:
            return "bias on every layer" if self.biases[0] else "no bias on any layer"
        names = [f"fc{i}" for i, has in enumerate(self.biases, start=1) if has]
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        return f"bias on {listed} only"

    @property
    def unit_roundoff(self) -> float:
        """``u`` of :attr:`dtype`: half the gap between 1 and the next float.

        Defined for the dtypes a comparison runs in; a half-precision spec's bounds are
        refused as :func:`check_computable` refuses them."""
        check_computable(self)
        return UNIT_ROUNDOFF[self.dtype]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes in torch's layout (weight is (out, in))."""
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(1, self.num_layers + 1):
            fan_in, fan_out = self.sizes[i - 1], self.sizes[i]
            shapes[f"fc{i}.weight"] = (fan_out, fan_in)
            if self.biases[i - 1]:
                shapes[f"fc{i}.bias"] = (fan_out,)
        return shapes

    def param_names(self) -> list[str]:
        """Parameter names in torch's order: ``fc1.weight, fc1.bias, fc2.weight, ...``."""
        return list(self.param_shapes())

    def code(self) -> str:
        """The spec as Python that builds it: the sizes, then every field that is not
        its default, so that advice can be pasted as it is (found in review: advice
        that left out a module's leaky ReLU slope was refused when passed).

        >>> MLPSpec((6, 12, 3), activation="leaky_relu", negative_slope=0.2).code()
        "MLPSpec((6, 12, 3), activation='leaky_relu', negative_slope=0.2)"
        """
        given = [
            f"{field.name}={getattr(self, field.name)!r}"
            for field in dataclasses.fields(self)
            if field.name != "sizes" and getattr(self, field.name) != field.default
        ]
        return f"MLPSpec({', '.join([repr(self.sizes), *given])})"

    def replace(self, **changes) -> MLPSpec:
        """A copy with some fields changed.

        >>> MLPSpec((4, 3, 2)).replace(dtype="float64").dtype
        'float64'
        """
        return dataclasses.replace(self, **changes)


_HYPER_PARAMETERS = [
    ("negative_slope", lambda v: v >= 0, "at least 0"),
    ("elu_alpha", lambda v: v >= 0, "at least 0"),
    ("label_smoothing", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("huber_delta", lambda v: v > 0, "positive"),
    ("smooth_l1_beta", lambda v: v > 0, "positive"),
]


def _per_layer_bias(bias: object, sizes: tuple[int, ...]) -> tuple[bool, ...]:
    """``bias`` given as one bool per Linear layer, checked, as a tuple (a list is one)."""
    if isinstance(bias, (str, bytes)) or not isinstance(bias, Sequence):
        raise type_error(f"bias must be True or False, got {bias!r}")
    given, layers = tuple(bias), len(sizes) - 1
    example = (True,) * (layers - 1) + (False,)
    fix = f"MLPSpec({sizes}, bias={example}) leaves fc{layers} without a bias"
    if len(given) != layers:
        raise value_error(
            f"bias has {len(given)} entries for {layers} Linear layers (sizes={sizes}); give "
            f"True or False for every layer, or one bool per layer, fc1 first: {fix}"
        )
    wrong = [f"fc{i}'s {v!r}" for i, v in enumerate(given, start=1) if not isinstance(v, bool)]
    if wrong:
        read = tuple(_as_bool(v) for v in given)
        raise type_error(
            f"bias must hold True or False for each Linear layer, got {given!r} "
            f"({', '.join(wrong)} {'is not a bool' if len(wrong) == 1 else 'are not bools'}): "
            + (f"write bias={read}" if None not in read else f"for example {fix}")
        )
    return given


def _as_bool(value: object) -> bool | None:
    """A 0/1 entry (1, 0.0, numpy.True_) as the bool it stands for, else None."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return {0: False, 1: True}.get(value)
    except TypeError:  # unhashable: an array
        return None


def _activation_hint(value: object) -> str:
    """``": write activation='relu'"`` for an activation given as a module or a
    function that equiv has under a name (``nn.ReLU()``, ``jax.nn.relu``), else ""."""
    own = getattr(value, "__name__", None) or type(value).__name__
    key = re.sub(r"[^a-z]", "", own.lower())
    names = {re.sub(r"[^a-z]", "", name): name for name in ACTIVATIONS}
    if key not in names:
        return ""
    name = names[key]
    # A torch module says its form and parameter; jax.nn.gelu is the tanh form by
    # default (found in review: both were told 'gelu', and slopes were left out).
    if name == "gelu" and getattr(value, "approximate", "tanh" if callable(value) else "none") in (
        "tanh",
        True,
    ):
        name = "gelu_tanh"
    extra = ""
    for attribute, field in (("negative_slope", "negative_slope"), ("alpha", "elu_alpha")):
        if isinstance(getattr(value, attribute, None), (int, float)):
            extra = f", {field}={float(getattr(value, attribute))}"
    hint = f": write activation={name!r}{extra}"
    if name == "gelu_tanh" and not hasattr(value, "approximate"):
        hint += " (jax.nn.gelu's default form; 'gelu' for approximate=False)"
    return hint


def _dtype_name(dtype: object) -> object:
    """A dtype given as an object (``torch.float32``, ``jnp.float32``, ``np.float64``)
    as its name, which the spec holds; anything else as it is, for the check to name
    (found in a user trial: ``dtype=torch.float32`` was an "unknown dtype")."""
    if isinstance(dtype, str):
        return dtype
    if type(dtype).__name__ == "dtype" and type(dtype).__module__ == "torch":
        return str(dtype).removeprefix("torch.")
    import numpy as np  # noqa: PLC0415 - only for a dtype given as an object

    # A NumPy dtype, or a scalar type (np.float64, jnp.float32); not None, which NumPy
    # reads as float64, nor an array (found in review).
    if isinstance(dtype, np.dtype):
        return dtype.name
    if isinstance(dtype, type) and (issubclass(dtype, np.generic) or hasattr(dtype, "dtype")):
        return np.dtype(dtype).name
    return dtype


def _check_choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:  # an array compares elementwise
        raise value_error(f"unknown {field} {value!r}; expected one of {', '.join(choices)}")


def check_spec(spec: object) -> None:
    """Refuse anything but an :class:`MLPSpec` passed as ``spec=``, saying how to write one.

    Found in a user trial: ``torch_to_jax(model, spec=(4, 8, 2))`` raised a bare
    ``AttributeError`` from deep inside the converter.

    >>> check_spec(MLPSpec((4, 3, 2)))
    >>> check_spec((4, 8, 2))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: [equiv] spec must be an equiv.MLPSpec ..., got tuple (4, 8, 2): write ...
    """
    if isinstance(spec, MLPSpec):
        return
    shown = type(spec).__name__
    if (
        isinstance(spec, Sequence)
        and not isinstance(spec, (str, bytes))
        and len(spec) >= 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in spec)
    ):
        shown += f" {spec!r}: write spec=equiv.MLPSpec({tuple(spec)!r})"
    raise type_error(f"spec must be an equiv.MLPSpec such as MLPSpec((4, 3, 2)), got {shown}")


def check_computable(spec: MLPSpec | str, what: str = "a comparison") -> None:
    """Refuse a half-precision spec where equiv would compute with it, saying what to do.

    equiv's bounds are derived for float32 and float64 runs, with a float64 reference;
    a ``bfloat16`` or ``float16`` spec describes a stored model, which the converters
    and checkpoints carry, and which is compared as a float32 (or float64) copy.

    >>> check_computable(MLPSpec((4, 3, 2)))
    >>> check_computable(MLPSpec((4, 3, 2), dtype="bfloat16"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: [equiv] a comparison runs in float32 or float64, and this MLP is bfloat16: ...
    """
    dtype = spec if isinstance(spec, str) else spec.dtype  # a spec's, or a dtype's name
    if dtype in DTYPES:
        return
    this = f"this run is in {dtype}" if isinstance(spec, str) else f"this MLP is {dtype}"
    raise value_error(
        f"{what} runs in float32 or float64, and {this}: equiv converts and stores {dtype} "
        "models, but derives its bounds for float32 and float64 runs. Compare a float32 "
        "copy, whose values are the same exactly: spec.replace(dtype='float32'), "
        "copy.deepcopy(model).float() (model.float() converts the model itself), torch "
        "tensors' .float(), JAX arrays' .astype(jnp.float32)"
    )
