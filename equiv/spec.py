"""What an MLP is: layer sizes, activation, loss, bias and dtype.

One :class:`MLPSpec` describes the model that every backend builds, so the torch
module, the hand-derived pass and the JAX function cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from equiv._messages import type_error, value_error

#: Activations between layers. Each backend maps a name to its own implementation.
ACTIVATIONS = ("relu",)
#: Losses, with their reductions as ``torch.nn`` defines them.
LOSSES = ("mse",)
#: Floating dtypes a comparison can run in, with their unit roundoff ``u = 2**-p``.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53}
DTYPES = tuple(UNIT_ROUNDOFF)


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """A multilayer perceptron: ``sizes[0]`` inputs, ``sizes[-1]`` outputs.

    Layer ``i`` (1-based, as torch names it ``fc{i}``) maps ``sizes[i-1]`` to
    ``sizes[i]``; the activation sits between layers, never after the last.

    Args:
      sizes: at least two positive widths, input first.
      activation: one of :data:`ACTIVATIONS`.
      loss: one of :data:`LOSSES`; ``"mse"`` is ``torch.nn.MSELoss()``, the mean
        over every element.
      bias: whether each layer has a bias.
      dtype: ``"float32"`` or ``"float64"``.

    Example:
      >>> spec = MLPSpec((4, 3, 2))
      >>> spec.param_shapes()
      {'fc1.weight': (3, 4), 'fc1.bias': (3,), 'fc2.weight': (2, 3), 'fc2.bias': (2,)}
    """

    sizes: tuple[int, ...] = (4, 3, 2)
    activation: str = "relu"
    loss: str = "mse"
    bias: bool = True
    dtype: str = "float32"

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
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.bias, bool):
            raise type_error(f"bias must be True or False, got {self.bias!r}")

    @property
    def num_layers(self) -> int:
        """The number of Linear layers."""
        return len(self.sizes) - 1

    @property
    def unit_roundoff(self) -> float:
        """``u`` of :attr:`dtype`: half the gap between 1 and the next float."""
        return UNIT_ROUNDOFF[self.dtype]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes in torch's layout (weight is (out, in))."""
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(1, self.num_layers + 1):
            fan_in, fan_out = self.sizes[i - 1], self.sizes[i]
            shapes[f"fc{i}.weight"] = (fan_out, fan_in)
            if self.bias:
                shapes[f"fc{i}.bias"] = (fan_out,)
        return shapes

    def param_names(self) -> list[str]:
        """Parameter names in torch's order: ``fc1.weight, fc1.bias, fc2.weight, ...``."""
        return list(self.param_shapes())

    def replace(self, **changes) -> MLPSpec:
        """A copy with some fields changed.

        >>> MLPSpec((4, 3, 2)).replace(dtype="float64").dtype
        'float64'
        """
        return dataclasses.replace(self, **changes)


def _check_choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise value_error(f"unknown {field} {value!r}; expected one of {', '.join(choices)}")
