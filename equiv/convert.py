"""Converters between torch modules / state_dicts and JAX pytrees.

A *layout* says, explicitly, where each torch parameter lives on the JAX side and
whether it is transposed. Nothing is guessed from shapes; names follow each
layout's one rule, and every entry is checked before anything is converted.

=========  ==========================================  ============================
layout     JAX tree                                    weight
=========  ==========================================  ============================
``torch``  ``{"fc1.weight": ..., "fc1.bias": ...}``    (out, in), as torch keeps it
``flax``   ``{"Dense_0": {"kernel": ..., "bias": ...}}``  kernel (in, out) = weightᵀ
=========  ==========================================  ============================

Conversions copy by default. A JAX array that shares memory with a torch tensor
changes when torch updates the tensor in place (``optimizer.step()``), so sharing
is the caller's explicit choice (``copy=False``) and only possible without a
transpose. float64 stays float64: JAX truncates it to float32 unless x64 is on, so
a float64 conversion outside x64 mode is refused rather than silently truncated.

Example:
  >>> import torch
  >>> state = {"fc1.weight": torch.ones(3, 4), "fc1.bias": torch.zeros(3)}
  >>> params = torch_to_jax(state, layout="flax")
  >>> params["Dense_0"]["kernel"].shape
  (4, 3)
  >>> back = jax_to_torch(params, layout="flax")
  >>> all(torch.equal(back[k], state[k]) for k in state)
  True
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch

from equiv._messages import type_error, value_error
from equiv.spec import MLPSpec

_TORCH_NAME = re.compile(r"fc(\d+)\.(weight|bias)")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where layer ``i``'s (1-based) weight and bias live in a JAX tree."""

    name: str
    weight_path: str  # format string with {i} (1-based) or {j} (0-based); dots nest
    bias_path: str
    transpose: bool  # JAX side holds weightᵀ

    def paths(self, layer: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        def fill(template: str) -> tuple[str, ...]:
            return tuple(template.format(i=layer, j=layer - 1).split("/"))

        return fill(self.weight_path), fill(self.bias_path)


LAYOUTS: dict[str, Layout] = {
    "torch": Layout("torch", "fc{i}.weight", "fc{i}.bias", transpose=False),
    "flax": Layout("flax", "Dense_{j}/kernel", "Dense_{j}/bias", transpose=True),
}


def get_layout(layout: str | Layout) -> Layout:
    """Look a layout up by name (``"torch"`` or ``"flax"``)."""
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise value_error(
            f"unknown layout {layout!r}; expected one of {', '.join(map(repr, LAYOUTS))}"
        )
    return LAYOUTS[layout]


def expected_jax_shapes(spec: MLPSpec, layout: str | Layout = "flax") -> dict[str, tuple]:
    """Dotted JAX path -> shape for every parameter of ``spec`` in ``layout``.

    >>> expected_jax_shapes(MLPSpec((4, 3, 2), bias=False))
    {'Dense_0.kernel': (4, 3), 'Dense_1.kernel': (3, 2)}
    """
    layout = get_layout(layout)
    shapes = {}
    for name, shape in spec.param_shapes().items():
        path, is_weight = _jax_path(layout, name)
        shapes[".".join(path)] = shape[::-1] if (is_weight and layout.transpose) else shape
    return shapes


def torch_to_jax(
    module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    layout: str | Layout = "flax",
    *,
    spec: MLPSpec | None = None,
    copy: bool = True,
    device: jax.Device | None = None,
) -> dict[str, Any]:
    """Convert a torch MLP (module or state_dict, names ``fc1.weight``...) to a JAX tree.

    Args:
      module_or_state_dict: a module whose ``state_dict()`` uses equiv's names, or
        such a state_dict.
      layout: ``"flax"`` (default) or ``"torch"``; see the module docstring.
      spec: the expected architecture. Without it, sizes are read from the weights
        and only their consistency is checked.
      copy: ``False`` shares memory where no transpose is needed (DLPack). A torch
        in-place update then changes the JAX array too.
      device: where to put the arrays; by default, JAX's default device.

    Raises:
      ValueError: missing, unexpected or mis-shaped entries (all named in one
        message), or float64 tensors while JAX's x64 mode is off.
    """
    layout = get_layout(layout)
    state = _state_dict(module_or_state_dict)
    if spec is None and isinstance(module_or_state_dict, torch.nn.Module):
        spec = getattr(module_or_state_dict, "spec", None)
    spec = _checked_spec(state, spec, "state_dict", lambda n: n, lambda n: tuple(state[n].shape))
    _refuse_silent_float64(state.items())
    tree: dict[str, Any] = {}
    for name in spec.param_names():
        tensor = state[name].detach()
        path, is_weight = _jax_path(layout, name)
        transpose = is_weight and layout.transpose
        if transpose:
            tensor = tensor.mT  # transposed by torch, never through NumPy
        if copy or transpose:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        array = jnp.from_dlpack(tensor if tensor.device.type == "cpu" else tensor.cpu())
        if device is not None:
            array = jax.device_put(array, device)
        _set(tree, path, array)
    return tree


def jax_to_torch(
    params: Mapping[str, Any],
    layout: str | Layout = "flax",
    *,
    spec: MLPSpec | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Convert a JAX tree in ``layout`` to a torch state_dict (``fc1.weight``...).

    The tensors are fresh copies: JAX arrays are immutable and torch's are not.
    Gradient trees convert the same way, so every backend's gradients and updated
    parameters come back under torch's names.

    Raises:
      ValueError: missing, unexpected or mis-shaped entries, all named at once.
    """
    layout = get_layout(layout)
    if not isinstance(params, Mapping):
        raise type_error(
            f"params must be a dict-like JAX tree, got {type(params).__name__}; for a flax "
            "variables dict pass variables['params']"
        )
    flat = _flatten(params)
    torch_names = {}
    for dotted in flat:
        torch_names[dotted] = _torch_name(layout, dotted)
    by_torch = {t: d for d, t in torch_names.items() if t is not None}

    def shape_of(torch_name: str) -> tuple[int, ...]:
        shape = tuple(np.shape(flat[by_torch[torch_name]]))
        is_weight = torch_name.endswith(".weight")
        return shape[::-1] if (is_weight and layout.transpose) else shape

    unknown = [d for d, t in torch_names.items() if t is None]
    spec = _checked_spec(
        by_torch, spec, f"{layout.name}-layout params", lambda n: by_torch[n], shape_of,
        extra=unknown, to_display=lambda n: ".".join(_jax_path(layout, n)[0]),
    )
    state = {}
    for name in spec.param_names():
        array = flat[by_torch[name]]
        tensor = _as_torch(array)
        if name.endswith(".weight") and layout.transpose:
            tensor = tensor.mT
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        state[name] = tensor if device is None else tensor.to(device)
    return state


# ---------------------------------------------------------------------------
# Checking


def _checked_spec(
    entries: Mapping[str, Any],
    spec: MLPSpec | None,
    what: str,
    display_key,
    shape_of,
    *,
    extra: list[str] = (),
    to_display=None,
) -> MLPSpec:
    """Return the spec the entries must match; raise one error naming every problem.

    ``entries`` is keyed by torch name; ``to_display`` maps a torch name to the key
    the caller used (a dotted JAX path for JAX trees).
    """
    to_display = to_display or (lambda n: n)
    problems = [f"  unexpected: {key!r}" for key in extra]
    names = [n for n in entries if _TORCH_NAME.fullmatch(n)]
    problems += [f"  unexpected: {display_key(n)!r}" for n in entries if n not in names]
    if spec is None:
        spec = _infer_spec(names, shape_of)
    expected = spec.param_shapes()
    for name, shape in expected.items():
        shown = _display_shape(name, shape, to_display)
        if name not in entries:
            problems.append(f"  missing: {to_display(name)!r} (expected shape {shown})")
        elif shape_of(name) != shape:
            actual = _display_shape(name, shape_of(name), to_display)
            problems.append(
                f"  wrong shape: {to_display(name)!r} expected {shown}, got {actual}"
            )
    problems += [
        f"  unexpected: {to_display(n)!r} (shape {_display_shape(n, shape_of(n), to_display)})"
        for n in names
        if n not in expected
    ]
    if problems:
        raise value_error(
            f"{what} does not match the MLP {spec.sizes} (bias={spec.bias}):\n"
            + "\n".join(problems)
            + "\nPass spec=MLPSpec(...) to state the architecture, and name layers "
            "as the layout does (fc1.weight, ... for torch; Dense_0.kernel, ... for flax)."
        )
    return spec


def _display_shape(name: str, torch_shape: tuple, to_display) -> tuple:
    # Shapes are shown on the caller's side: a flax kernel is (in, out).
    transposed = name.endswith(".weight") and to_display(name).endswith("kernel")
    return tuple(torch_shape[::-1]) if transposed else tuple(torch_shape)


def _infer_spec(names: list[str], shape_of) -> MLPSpec:
    """Read sizes off the weights: layer i maps weight.shape[1] to weight.shape[0]."""
    layers = sorted({int(_TORCH_NAME.fullmatch(n).group(1)) for n in names})
    count = layers[-1] if layers else 0
    if count == 0:
        raise value_error(
            "found no layer parameters; expected names such as 'fc1.weight' (torch layout) "
            "or 'Dense_0.kernel' (flax layout)"
        )
    sizes: list[int | None] = [None] * (count + 1)
    for i in range(1, count + 1):
        weight, bias = f"fc{i}.weight", f"fc{i}.bias"
        if weight in names and len(shape_of(weight)) == 2:
            out, fan_in = shape_of(weight)
            sizes[i] = sizes[i] or out
            sizes[i - 1] = sizes[i - 1] or fan_in
        elif bias in names and len(shape_of(bias)) == 1:
            sizes[i] = sizes[i] or shape_of(bias)[0]
    # A width no entry shows (a missing weight): any value keeps the report going.
    filled = tuple(size or 1 for size in sizes)
    has_bias = any(n.endswith(".bias") for n in names)
    return MLPSpec(sizes=filled, bias=has_bias)


def _refuse_silent_float64(items) -> None:
    wide = [name for name, t in items if t.dtype == torch.float64]
    if wide and not jax.config.jax_enable_x64:
        raise value_error(
            f"{', '.join(wide)} {'is' if len(wide) == 1 else 'are'} float64, but JAX's x64 "
            "mode is off and would truncate to float32. Convert inside a scope:\n"
            "    >>> with jax.enable_x64(True):\n"
            "    ...     params = torch_to_jax(model)"
        )


# ---------------------------------------------------------------------------
# Names and trees


def _jax_path(layout: Layout, torch_name: str) -> tuple[tuple[str, ...], bool]:
    match = _TORCH_NAME.fullmatch(torch_name)
    layer, kind = int(match.group(1)), match.group(2)
    weight_path, bias_path = layout.paths(layer)
    return (weight_path if kind == "weight" else bias_path), kind == "weight"


def _torch_name(layout: Layout, dotted: str) -> str | None:
    """The torch name a dotted JAX path stands for in ``layout``, or None."""
    for kind, template in (("weight", layout.weight_path), ("bias", layout.bias_path)):
        pattern = re.escape(template.replace("/", ".")).replace(r"\{i\}", r"(?P<i>\d+)")
        pattern = pattern.replace(r"\{j\}", r"(?P<j>\d+)")
        match = re.fullmatch(pattern, dotted)
        if match:
            layer = int(match["i"]) if "i" in match.groupdict() else int(match["j"]) + 1
            if layer >= 1:
                return f"fc{layer}.{kind}"
    return None


def _state_dict(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise type_error(
                f"state_dict values must be torch tensors; {', '.join(map(repr, bad))} "
                "are not. To convert a JAX tree, use jax_to_torch"
            )
        return dict(obj)
    raise type_error(
        f"expected a torch.nn.Module or a state_dict, got {type(obj).__name__}"
    )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _as_torch(array: Any) -> torch.Tensor:
    """A torch view of a JAX array (DLPack, no copy), or a copy of anything else."""
    if isinstance(array, jax.Array):
        return torch.from_dlpack(array)
    return torch.tensor(np.asarray(array))
