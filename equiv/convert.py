"""Converters between torch modules / state_dicts and JAX pytrees.

A *layout* says, explicitly, where each torch parameter lives on the JAX side and
whether it is transposed. Nothing is guessed from shapes: names follow each
layout's one rule, and every entry (name, shape, dtype) is checked before anything
is converted, with one ``ValueError`` naming every problem.

===========  ===============================================  ==========================
layout       JAX tree                                         weight
===========  ===============================================  ==========================
``torch``    ``{"fc1.weight": ..., "fc1.bias": ...}``         (out, in), as torch keeps it
``flax``     ``{"Dense_0": {"kernel": ..., "bias": ...}}``    kernel (in, out) = weightᵀ
``nnx``      ``{"fc1": {"kernel": ..., "bias": ...}}``        kernel (in, out) = weightᵀ
``equinox``  ``{"layers": {"0": {"weight": ..., "bias": ...}}}``  (out, in)
===========  ===============================================  ==========================

``flax`` is what a stack of ``flax.linen.Dense`` layers accepts as
``{"params": tree}``; ``nnx`` is the state of a ``flax.nnx`` module whose
``nnx.Linear`` layers are attributes ``fc1, fc2, ...`` (load it with
``nnx.update(model, tree)``; ``nnx.state(model)`` converts back); ``equinox`` is
``eqx.nn.MLP``'s structure, filled in by :func:`torch_to_equinox`.

Conversions copy by default. A JAX array that shares memory with a torch tensor
changes when torch updates the tensor in place (``optimizer.step()``), so sharing
is the caller's explicit choice (``copy=False``), possible wherever the result needs
no new layout: every leaf of the torch and equinox layouts, the biases of flax and
nnx, and a weight that is already stored transposed (or has one row or column).
float64 stays float64: JAX truncates it to float32 unless x64 is on, so
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

import collections
import concurrent.futures
import dataclasses
import gc
import itertools
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from equiv._messages import type_error, value_error
from equiv.compare import to_numpy
from equiv.devices import _jax_gpus, jax_device, torch_device
from equiv.spec import HALF_DTYPES, STORAGE_DTYPES, MLPSpec, check_spec

_LAYER = r"(0|[1-9]\d*)"  # no leading zeros: "Dense_00" must not alias "Dense_0"
_TORCH_NAME = re.compile(r"fc([1-9]\d*)\.(weight|bias)")
_KINDS = ("weight", "bias")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where layer ``i``'s weight and bias live in a JAX tree.

    Paths are templates: ``/`` separates nested keys, ``{i}`` is the 1-based layer
    number (torch's ``fc{i}``) and ``{j}`` the 0-based one, or ``{name}`` the layer's
    entry in ``layers``: a model's own names for its layers, in call order (what
    :func:`equiv.nnx_layout` reads off a ``flax.nnx`` model). ``transpose`` means the
    JAX side holds weightᵀ, of shape (in, out). ``index_keys`` makes a key that is the
    layer number alone an int, as the state of an ``nnx.List`` or ``nnx.Sequential``
    holds it (``nnx.update`` refuses ``"0"`` for ``0``: found in a user trial); either
    is read.

    >>> LAYOUTS["flax"].path("fc2.weight")
    ('Dense_1', 'kernel')
    >>> listed = Layout("nnx_list", "layers/{j}/kernel", "layers/{j}/bias", True, index_keys=True)
    >>> listed.path("fc2.weight"), listed.tree_path("fc2.weight")
    (('layers', '1', 'kernel'), ('layers', 1, 'kernel'))
    >>> named = Layout("port", "{name}/kernel", "{name}/bias", True, layers=("hidden", "out"))
    >>> named.path("fc2.weight"), named.torch_name(("hidden", "bias"))
    (('out', 'kernel'), 'fc1.bias')
    """

    name: str
    weight_path: str
    bias_path: str
    transpose: bool
    # How a built tree holds a key, not where a parameter lives: files and paths
    # ignore it (a file's recorded layout equals the one given with it).
    index_keys: bool = dataclasses.field(default=False, repr=False, compare=False)
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.transpose, bool):
            raise type_error(
                f"Layout {self.name!r}: transpose must be True or False, got {self.transpose!r}"
            )
        for field in ("name", "weight_path", "bias_path"):
            if not isinstance(getattr(self, field), str):
                raise type_error(
                    f"Layout {self.name!r}: {field} must be a str, got "
                    f"{type(getattr(self, field)).__name__}"
                )
        example = "e.g. Layout('mine', 'layer{j}/w', 'layer{j}/b', True)"
        self._check_layers()
        for template in (self.weight_path, self.bias_path):
            fields = template.count("{i}") + template.count("{j}") + template.count("{name}")
            if fields != 1:
                raise value_error(
                    f"layout path {template!r} must hold exactly one '{{i}}' (1-based layer) "
                    f"or '{{j}}' (0-based), or '{{name}}' with layers=, {example}"
                )
            if ("{name}" in template) != (self.layers is not None):
                raise value_error(
                    f"layout path {template!r} "
                    + (
                        "uses '{name}' without layers=: pass the layers' names in call order"
                        if self.layers is None
                        else "does not use '{name}', so layers= names nothing: put '{name}' "
                        "where each layer's name goes, e.g. '{name}/kernel'"
                    )
                )
            # Found in review: '{k}' failed with KeyError, '{}' with IndexError.
            rest = template.replace("{i}", "").replace("{j}", "").replace("{name}", "")
            if "{" in rest or "}" in rest:
                raise value_error(
                    f"layout path {template!r} holds a brace other than '{{i}}' or '{{j}}' (or "
                    f"'{{name}}' with layers=); those are its only fields, {example}"
                )
            if "" in template.split("/"):
                raise value_error(
                    f"layout path {template!r} has an empty key (a leading, trailing or "
                    f"doubled '/'), {example}"
                )
            if re.search(r"\d\{[ij]\}|\{[ij]\}\d", template):
                raise value_error(
                    f"layout path {template!r} puts a digit beside the layer number, so "
                    f"layer 1's and layer 11's keys can read alike, {example}"
                )
        count = len(self.layers) if self.layers is not None else 3
        self.check_paths(
            [f"fc{i}.{kind}" for i in range(1, count + 1) for kind in ("weight", "bias")]
        )

    def __repr__(self) -> str:
        # As the dataclass writes it, with layers only where the layout has them.
        named = f", layers={self.layers!r}" if self.layers is not None else ""
        return (
            f"Layout(name={self.name!r}, weight_path={self.weight_path!r}, "
            f"bias_path={self.bias_path!r}, transpose={self.transpose!r}{named})"
        )

    def _check_layers(self) -> None:
        if self.layers is None:
            return
        if not isinstance(self.layers, tuple) or not all(
            isinstance(name, str) for name in self.layers
        ):
            raise type_error(
                f"Layout {self.name!r}: layers must be a tuple of str (each layer's name, "
                f"in call order), got {self.layers!r}"
            )
        if not self.layers:
            raise value_error(f"Layout {self.name!r}: layers names no layer")
        for name in self.layers:
            if not name or "" in name.split("/") or any(c in name for c in "{},"):
                raise value_error(
                    f"Layout {self.name!r}: layer name {name!r} is empty, has an empty key "
                    "('/' at an end or doubled), or holds a brace or a comma"
                )
        if len(set(self.layers)) != len(self.layers):
            raise value_error(f"Layout {self.name!r}: layers names a layer twice: {self.layers}")

    def check_paths(self, torch_names: Sequence[str]) -> None:
        """Refuse two parameters at one path, or one inside the other's (a leaf where
        the other needs a dict): a tree in this layout could not hold both. Found in
        review: ``Layout("s", "p{i}", "p{i}", False)`` silently dropped every weight.

        >>> LAYOUTS["flax"].check_paths(["fc1.weight", "fc1.bias", "fc2.weight"])
        """
        paths = {name: self.path(name) for name in torch_names}
        names = list(paths)
        for k, first in enumerate(names):
            for second in names[k + 1 :]:
                a, b = paths[first], paths[second]
                short, long = (a, b) if len(a) <= len(b) else (b, a)
                if long[: len(short)] == short:
                    raise value_error(
                        f"layout {self.name!r} puts {first} at {'/'.join(a)} and {second} at "
                        f"{'/'.join(b)}: "
                        + ("the same path" if a == b else "one inside the other")
                        + "; a tree cannot hold both. Give weights and biases paths of "
                        "their own, e.g. Layout('mine', 'layer{j}/w', 'layer{j}/b', True)"
                    )

    def path(self, torch_name: str) -> tuple[str, ...]:
        """The JAX path of a torch name such as ``fc1.weight``."""
        match = _TORCH_NAME.fullmatch(torch_name) if isinstance(torch_name, str) else None
        if match is None:  # found in review: AttributeError on None before
            raise value_error(
                f"{torch_name!r} is not a parameter name of equiv's MLP; those are "
                "fc1.weight, fc1.bias, fc2.weight, ... (1-based layers)"
            )
        layer, kind = match.groups()
        template = self.weight_path if kind == "weight" else self.bias_path
        if self.layers is None:
            return tuple(template.format(i=int(layer), j=int(layer) - 1).split("/"))
        if int(layer) > len(self.layers):
            raise value_error(
                f"layout {self.name!r} names {len(self.layers)} layers "
                f"({', '.join(self.layers)}), so {torch_name} has no path in it: the "
                "model it was read from has fewer layers"
            )
        return tuple(template.replace("{name}", self.layers[int(layer) - 1]).split("/"))

    def tree_path(self, torch_name: str) -> tuple[str | int, ...]:
        """:meth:`path` as a tree built in this layout holds it: with ``index_keys``, a
        key that is the layer number alone is an int."""
        if self.layers is not None:  # a layer's own name, "blocks/0": its digits alone
            return tuple(
                int(key) if self.index_keys and key.isdigit() else key
                for key in self.path(torch_name)
            )
        kind = torch_name.rsplit(".", 1)[1]
        template = self.weight_path if kind == "weight" else self.bias_path
        whole = [part in ("{i}", "{j}") for part in template.split("/")]
        return tuple(
            int(key) if self.index_keys and alone else key
            for key, alone in zip(self.path(torch_name), whole, strict=True)
        )

    def torch_name(self, path: tuple[str, ...]) -> str | None:
        """The torch name a JAX path stands for, or None if the layout has no such path."""
        if self.layers is not None:
            names = [f"fc{i}.{kind}" for i in range(1, len(self.layers) + 1) for kind in _KINDS]
            return next((name for name in names if self.path(name) == tuple(path)), None)
        for kind, template, pattern in self._patterns():
            if len(path) == len(pattern):
                matches = [re.fullmatch(p, key) for p, key in zip(pattern, path, strict=True)]
                if all(matches):
                    (number,) = [int(g) for m in matches for g in m.groups()]
                    return f"fc{number if '{i}' in template else number + 1}.{kind}"
        return None

    def shape(self, torch_name: str, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the JAX side holds for a torch parameter of ``torch_shape``."""
        flip = self.transpose and torch_name.endswith(".weight")
        return tuple(torch_shape[::-1]) if flip else tuple(torch_shape)

    def _patterns(self) -> list[tuple[str, str, tuple[str, ...]]]:
        def compile_(template: str) -> tuple[str, ...]:
            return tuple(
                re.escape(part).replace(r"\{i\}", r"([1-9]\d*)").replace(r"\{j\}", _LAYER)
                for part in template.split("/")
            )

        return [
            ("weight", self.weight_path, compile_(self.weight_path)),
            ("bias", self.bias_path, compile_(self.bias_path)),
        ]


LAYOUTS: dict[str, Layout] = {
    "torch": Layout("torch", "fc{i}.weight", "fc{i}.bias", transpose=False),
    "flax": Layout("flax", "Dense_{j}/kernel", "Dense_{j}/bias", transpose=True),
    "nnx": Layout("nnx", "fc{i}/kernel", "fc{i}/bias", transpose=True),
    "equinox": Layout("equinox", "layers/{j}/weight", "layers/{j}/bias", transpose=False),
}


def get_layout(layout: str | Layout) -> Layout:
    """Look a layout up by name (one of :data:`LAYOUTS`) or pass a :class:`Layout` through.

    >>> get_layout("nnx").transpose
    True
    """
    if isinstance(layout, Layout):
        return layout
    if not isinstance(layout, str):
        raise type_error(f"layout must be a name or a Layout, got {type(layout).__name__}")
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
    return {
        ".".join(layout.path(name)): layout.shape(name, shape)
        for name, shape in spec.param_shapes().items()
    }


def torch_to_jax(
    module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    layout: str | Layout = "flax",
    *,
    spec: MLPSpec | None = None,
    copy: bool = True,
    device: jax.Device | str | None = None,
) -> dict[str, Any]:
    """Convert a torch MLP (module or state_dict, names ``fc1.weight``...) to a JAX tree.

    Args:
      module_or_state_dict: a module whose ``state_dict()`` uses equiv's names
        (``fc1.weight, fc1.bias, ...``), or such a state_dict.
      layout: a name in :data:`LAYOUTS` or a :class:`Layout`.
      spec: the expected architecture. Without it, a module's ``spec`` attribute is
        used, else sizes are read from the weights and their consistency checked.
      copy: ``False`` shares memory where no transpose is needed (DLPack, when the
        buffer is aligned; a tensor that is not contiguous, an ``expand``-ed one
        say, is copied). A torch in-place update (``optimizer.step()``) then
        changes the "immutable" JAX array too: share only what neither side mutates.
      device: where to put the arrays: a ``jax.Device`` or a name (``"cpu"``,
        ``"gpu:N"``, ``"cuda:N"``); by default where the tensors are (CPU tensors
        give CPU arrays, CUDA tensors arrays on the same GPU).

    Returns:
      A nested dict of ``jax.Array`` in ``layout``. On the CPU, JAX adopts the
      converted (or, with ``copy=False``, the shared) memory without a further copy
      (``jax.device_put`` of an aligned NumPy view); from a GPU, through DLPack.

    Raises:
      TypeError: not a module or a mapping of tensors.
      ValueError: missing, unexpected, mis-shaped or mis-typed entries (all named in
        one message), or float64 tensors while JAX's x64 mode is off.

    Example:
      >>> import torch
      >>> params = torch_to_jax({"fc1.weight": torch.ones(2, 3)}, layout="torch")
      >>> params["fc1.weight"].shape
      (2, 3)
    """
    layout = get_layout(layout)
    if device is not None:
        device = jax_device(device)  # a bad name fails here, before any copy
    state = _state_dict(module_or_state_dict)
    if spec is None:
        spec = module_spec(module_or_state_dict)
    entries = {(name,): tensor for name, tensor in state.items()}
    own = isinstance(module_or_state_dict, torch.nn.Module)
    spec = check_entries(entries, LAYOUTS["torch"], spec, what="state_dict", from_model=own)
    wide = [name for name, t in state.items() if t.dtype == torch.float64]
    if wide and not jax.config.jax_enable_x64:
        raise value_error(
            f"{', '.join(wide)} {'is' if len(wide) == 1 else 'are'} float64, but JAX's x64 "
            "mode is off and would truncate to float32. Convert (or load) inside a scope:\n"
            "    >>> with jax.enable_x64(True):\n"
            "    ...     params = torch_to_jax(model)  # or load_jax(path)\n"
            "or convert the tensors to float32 first, to keep float32"
        )
    layout.check_paths(spec.param_names())
    if device is None:
        refused = gpu_without_jax({state[name].device for name in spec.param_names()})
        if refused:
            raise value_error(refused)
    # JAX frees what device_put adopted (_adopt) at its next garbage collection, on
    # its next call or Python's next gc pass (it hooks gc.callbacks; jax-ml/jax#14882),
    # not as the array is dropped: let an earlier conversion the caller has dropped go
    # before this one allocates, so that two copies are never alive at once.
    gc.collect(0)
    leaves, fills = [], []
    for name in spec.param_names():
        tensor = state[name].detach()
        transpose = layout.transpose and name.endswith(".weight")
        if transpose:
            # A view: the copy below transposes it (torch's blocked kernel, never
            # NumPy) into a new buffer. Only a view that is already contiguous (a
            # weight with one row or column, or one stored transposed) can be shared.
            tensor = tensor.mT
        on_cpu = tensor.device.type == "cpu"
        if on_cpu or (device is not None and device.platform == "cpu"):
            if copy or not on_cpu or not tensor.is_contiguous():
                buffer = _host_empty(tensor.shape, tensor.dtype)
                fills.append((buffer, tensor))
                tensor = buffer
        elif copy or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        leaves.append((layout.tree_path(name), tensor))
    _fill(fills)
    tree: dict[str, Any] = {}
    for path, tensor in leaves:
        _set(tree, path, _adopt(tensor, device))
    return tree


def _adopt(tensor: torch.Tensor, device: jax.Device | None) -> jax.Array:
    """A JAX array of ``tensor``'s memory where it can be shared, else a copy on ``device``.

    A CPU tensor goes through ``jax.device_put`` of its NumPy view, which XLA:CPU
    adopts (an aligned buffer) as ``jnp.from_dlpack`` does, but whose release, when
    XLA's worker thread drops the buffer, hands the owner back to JAX to free under
    the GIL. The DLPack deleter takes the GIL itself on that thread, and at
    interpreter shutdown that aborts the process (``terminate called without an
    active exception``): found in a user trial, a script that returned from a
    function right after a jitted call on its converted params died with status 134
    in 22 of 30 runs, and the script in ``tests/test_convert.py`` in 12 of 20;
    through ``device_put``, 0 of 20, and 0 of 30 over three shapes and layouts.

    Example:
      >>> import torch
      >>> tensor = torch.ones(2, 3)
      >>> array = _adopt(tensor, None)
      >>> _ = tensor.add_(1)  # shared: the buffer is aligned, no copy was made
      >>> float(array[0, 0])
      2.0
    """
    if tensor.device.type == "cpu":
        # NumPy holds bfloat16 as ml_dtypes', JAX's own (torch's .numpy() refuses it).
        return jax.device_put(to_numpy(tensor), device or jax.devices("cpu")[0])
    array = jnp.from_dlpack(tensor)
    if device is not None and array.devices() != {device}:
        array = jax.device_put(array, device)
    return array


def gpu_without_jax(devices: set[torch.device]) -> str | None:
    """Why tensors on ``devices`` cannot stay where they are in JAX: CUDA tensors where
    JAX sees no GPU (a CPU-only jax beside a CUDA torch, the default pip install), or
    None. Without it DLPack failed deep inside, with no advice.

    >>> gpu_without_jax({torch.device("cpu")}) is None
    True
    """
    cuda = sorted(str(d) for d in devices if d.type == "cuda")
    if not cuda or _jax_gpus():
        return None
    return (
        f"the tensors are on {', '.join(cuda)}, and JAX sees no GPU (its backend: "
        f"{jax.default_backend()}), so the arrays cannot stay on that device: pass "
        "device='cpu' (one copy to the host), or install a CUDA build of jax "
        "(pip install 'jax[cuda12]')"
    )


def jax_to_torch(
    params: Mapping[str, Any],
    layout: str | Layout = "flax",
    *,
    spec: MLPSpec | None = None,
    device: torch.device | str | None = None,
    out: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Convert a JAX tree in ``layout`` to a torch state_dict (``fc1.weight``...).

    The tensors never share memory with ``params``: JAX arrays are immutable and
    torch's are not. New CPU tensors live in memory NumPy allocated (backed by huge
    pages, about 3x faster to fill here): they behave as any tensor except that
    ``resize_`` refuses them, as it refuses ``torch.from_numpy``'s. Gradient trees
    convert the same way, so every backend's gradients and updated parameters come
    back under torch's names.

    Args:
      params: a nested mapping in ``layout`` whose leaves are JAX or NumPy arrays
        (``flax.nnx`` variables are unwrapped), or, with ``layout="equinox"``, an
        Equinox model as :func:`equinox_to_torch` takes it.
      layout: a name in :data:`LAYOUTS` or a :class:`Layout`.
      spec: the expected architecture; by default read from the weights.
      device: torch device of new tensors, a ``torch.device`` or a name (``"cpu"``,
        ``"cuda:N"``, ``"gpu:N"``); by default where the arrays are (ignored with
        ``out``).
      out: a module (equiv's names, or any Linear stack that
        :func:`equiv.mlp_from_module` reads, such as an ``nn.Sequential``) or a
        state_dict to copy into, in place (one copy, no new tensors); it must match
        the same spec.

    Returns:
      The state_dict: new tensors, or ``out``'s own tensors after the copy.

    Raises:
      TypeError: ``params`` is not a mapping, or a leaf is not an array.
      ValueError: missing, unexpected, mis-shaped or mis-typed entries, all named.

    Example:
      >>> import jax.numpy as jnp
      >>> state = jax_to_torch({"Dense_0": {"kernel": jnp.ones((3, 2))}})
      >>> state["fc1.weight"].shape
      torch.Size([2, 3])
    """
    layout = get_layout(layout)
    if device is not None:
        device = torch_device(device)  # a bad name fails here, before any copy
    own = is_jax_model(params)  # a model's own layers: each says whether it has a bias
    params = layout_tree(params, layout)
    if not isinstance(params, Mapping):
        raise type_error(
            f"params must be a dict-like JAX tree, got {type(params).__name__}; for a flax "
            "variables dict pass variables['params']"
        )
    flat = _flatten(params)
    traced = [".".join(p) for p, v in flat.items() if isinstance(v, jax.core.Tracer)]
    if traced:
        raise type_error(
            f"params leaf {traced[0]!r} is traced (jax_to_torch was called inside jax.jit, "
            "grad or vmap, where arrays have no values yet): convert outside the traced "
            "function, on the arrays it returns"
        )
    not_arrays = [
        ".".join(p) for p, v in flat.items() if not isinstance(v, (jax.Array, np.ndarray))
    ]
    if not_arrays:
        raise type_error(
            f"params leaves must be JAX or NumPy arrays; {', '.join(map(repr, not_arrays))} "
            f"{'is' if len(not_arrays) == 1 else 'are'} not. To convert torch tensors, use "
            "torch_to_jax"
        )
    try:
        spec = check_entries(
            flat,
            layout,
            spec,
            what=f"{layout.name}-layout params",
            from_model=own,
            biases=None if out is None or spec is not None else biases_of(out),
            biases_from=None if out is None or spec is not None else "out",
        )
    except ValueError as error:
        if out is None or spec is not None:
            raise
        # Sizes read from entries that do not chain name the wrong ones (found in a user
        # trial: one kernel transposed blamed its bias and the next kernel, against an
        # MLP of neither model): out's own sizes say which entry is off.
        theirs = _own_spec(_state_dict(out))
        if theirs is None:
            raise error from None
        check_entries(flat, layout, theirs, what=f"{layout.name}-layout params (as out holds them)")
        raise
    by_name = {layout.torch_name(path): value for path, value in flat.items()}
    sources = {}
    for name in spec.param_names():
        source = _as_torch(by_name[name])
        sources[name] = source.mT if layout.transpose and name.endswith(".weight") else source
    if out is not None:
        return copy_into(
            out, sources, spec, source=f"the {layout.name}-layout params", label="the params"
        )
    state, fills = {}, []
    for name, source in sources.items():
        if (source.device if device is None else torch.device(device)).type == "cpu":
            state[name] = _host_empty(source.shape, source.dtype)
        else:
            state[name] = source.to(device=device, memory_format=torch.contiguous_format, copy=True)
            continue
        fills.append((state[name], source))
    _fill(fills)
    return state


def biases_of(out: torch.nn.Module | Mapping[str, torch.Tensor]) -> tuple[bool, ...]:
    """Whether each layer of a module (any Linear stack) or state_dict has a bias: what
    a copy into it expects where no spec says.

    >>> import torch
    >>> biases_of(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False)))
    (True, False)
    """
    names = _state_dict(out)
    count = sum(1 for name in names if name.endswith(".weight"))
    return tuple(f"fc{i}.bias" in names for i in range(1, count + 1))


def copy_into(
    out: torch.nn.Module | Mapping[str, torch.Tensor],
    sources: Mapping[str, torch.Tensor],
    spec: MLPSpec,
    *,
    source: str = "params",
    label: str | None = None,
) -> dict[str, torch.Tensor]:
    """Copy ``sources`` (torch names to tensors or views, checked against ``spec``)
    into ``out``'s own tensors, in place: one copy, no new tensors. What
    ``jax_to_torch(..., out=)`` and ``load_torch(..., out=)`` do.

    Args:
      out: a module (equiv's names, or any Linear stack that
        :func:`equiv.mlp_from_module` reads, such as an ``nn.Sequential``) or a
        state_dict; it must match ``spec`` (sizes, bias and dtype).
      source: what ``sources`` came from, for a message (a file's path, ``"params"``),
        and ``label`` what to call it on each line (``"the file"``; ``source`` by default).

    Returns:
      ``out``'s tensors under equiv's names, after the copy.

    Example:
      >>> import torch
      >>> seq = torch.nn.Sequential(torch.nn.Linear(3, 2))
      >>> state = copy_into(seq, {"fc1.weight": torch.ones(2, 3), "fc1.bias": torch.zeros(2)},
      ...                   MLPSpec((3, 2)))
      >>> torch.equal(seq[0].weight, torch.ones(2, 3))
      True
      >>> state["fc1.weight"].data_ptr() == seq[0].weight.data_ptr()
      True
    """
    target = _state_dict(out)
    _refuse_another_model(target, spec, source, label or source)
    names = spec.param_names()
    tied = overlapping({name: target[name] for name in names})
    if tied:
        raise value_error(
            f"out: {tied[0]!r} and {tied[1]!r} share memory (tied weights), so copying "
            "into one would overwrite the other; untie them, or convert without out= "
            "and load the result with load_state_dict"
        )
    _fill([(target[name], sources[name]) for name in names], strips=True)
    return {name: target[name] for name in names}


def _own_spec(target: Mapping[str, torch.Tensor]) -> MLPSpec | None:
    """The spec a module's own tensors (``out``'s, under equiv's names) say, or None
    where they say none."""
    try:
        return check_entries(
            {(n,): t for n, t in target.items()},
            LAYOUTS["torch"],
            None,
            what="out",
            from_model=True,
        )
    except ValueError:
        return None


#: The torch method that casts a module or tensor to each dtype equiv carries.
_CAST = {"float32": "float()", "float64": "double()", "bfloat16": "bfloat16()", "float16": "half()"}


def _refuse_another_model(
    target: Mapping[str, torch.Tensor], spec: MLPSpec, source: str, label: str
) -> None:
    """Refuse to copy ``source``'s parameters (of ``spec``) into ``target``, ``out``'s
    tensors, where they differ, each difference named on both sides (found in a user
    trial: a file of another architecture than ``out`` was reported as "out does not
    match the MLP", the file's, without naming the file)."""
    rows = []
    for name, shape in spec.param_shapes().items():
        if name not in target:
            rows.append(f"  {name!r}: {label} has one, out has none")
        elif tuple(target[name].shape) != shape:
            rows.append(f"  {name!r}: {shape} in {label}, {tuple(target[name].shape)} in out")
        elif _dtype(target[name]) != spec.dtype:
            rows.append(f"  {name!r}: {spec.dtype} in {label}, {_dtype(target[name])} in out")
    rows += [
        f"  {name!r}: out has one, {label} has none"
        for name in target
        if name not in spec.param_shapes()
    ]
    if not rows:
        return
    theirs = _own_spec(target)
    if theirs is not None and theirs.sizes == spec.sizes and theirs.biases == spec.biases:
        # out.to(the source's dtype), not out.float(): found in a user trial, bfloat16
        # parameters into a float32 module were told to call out.float().
        advice = (
            f"convert one side: out.{_CAST[spec.dtype]} before the copy, or read {label} "
            f"without out= and convert its tensors (.{_CAST[theirs.dtype]})"
        )
    else:
        advice = (
            "they are different models: copy into a module of the same architecture, or "
            "convert without out= to get new tensors"
        )

    def described(spec: MLPSpec | None) -> str:
        return (
            "" if spec is None else f" (the MLP {spec.sizes}, {spec.describe_bias()}, {spec.dtype})"
        )

    raise value_error(
        f"cannot copy {source}{described(spec)} into out{described(theirs)}:\n"
        + "\n".join(rows)
        + f"\n{advice[0].upper()}{advice[1:]}"
    )


def check_entries(
    entries: Mapping[tuple[str, ...], Any],
    layout: Layout,
    spec: MLPSpec | None,
    *,
    what: str,
    from_model: bool = False,
    biases: tuple[bool, ...] | None = None,
    biases_from: str | None = None,
) -> MLPSpec:
    """Check JAX-path -> array entries of ``layout`` against ``spec``; return the spec.

    Without a spec, sizes, bias and dtype are read from the entries. Raises one
    ``ValueError`` listing every missing, unexpected, mis-shaped or mis-typed entry,
    shapes shown as the layout holds them.

    A bias on some layers only is read from the entries where that is unambiguous:
    ``from_model``, they are a model's own parameters (a torch module's, an Equinox
    model's), and a layer without a bias entry has none. A file's or a dict's entries
    cannot tell a layer without a bias from a lost entry: there every layer has one if
    any has, the others are reported missing, and the message shows the ``spec=``
    that says otherwise. A ``spec`` given always decides; its biases must be there.
    Without one, ``biases`` (one per layer, where the caller knows them: what a file
    records, the module copied into) say which layers have a bias, and ``biases_from``
    names the module they were read from (``"out"``), for a message.

    >>> import numpy as np
    >>> check_entries({("fc1.weight",): np.zeros((3, 4), "float32")}, LAYOUTS["torch"],
    ...               None, what="state").sizes
    (4, 3)
    >>> mixed = {("fc1.weight",): np.zeros((3, 4), "float32"), ("fc1.bias",): np.zeros(3,
    ...          "float32"), ("fc2.weight",): np.zeros((2, 3), "float32")}
    >>> check_entries(mixed, LAYOUTS["torch"], None, what="model", from_model=True).bias
    (True, False)
    """
    if spec is not None:
        check_spec(spec)
    known = {}
    problems = []
    for path, value in entries.items():
        name = layout.torch_name(path)
        if name is None:
            problems.append(f"  unexpected: {'.'.join(path)!r} (shape {_shape(value)})")
        else:
            known[name] = value
    if not known and entries:
        found = [".".join(path) for path in entries]
        shown = ", ".join(map(repr, found[:6])) + (", ..." if len(found) > 6 else "")
        raise value_error(
            f"{what}: none of its {len(found)} entries is a parameter of the {layout.name} "
            f"layout, which names them {'.'.join(layout.path('fc1.weight'))!r}, ...; found "
            f"{shown}. {_naming_hint(entries, what)}"
        )
    given = spec is not None
    if spec is None:
        spec = _infer_spec(known, layout, what, from_model=from_model, biases=biases)
    expected = spec.param_shapes()
    for name, torch_shape in expected.items():
        key, shape = ".".join(layout.path(name)), layout.shape(name, torch_shape)
        if name not in known:
            problems.append(f"  missing: {key!r} (expected shape {shape})")
        elif _shape(known[name]) != shape:
            got = _shape(known[name])
            flipped = (
                f" (its transpose: the {layout.name} layout holds weights "
                f"{'(in, out)' if layout.transpose else '(out, in)'})"
                if len(shape) == 2 and got == shape[::-1]
                else ""
            )
            problems.append(f"  wrong shape: {key!r} expected {shape}, got {got}{flipped}")
        elif _dtype(known[name]) != spec.dtype:
            problems.append(
                f"  wrong dtype: {key!r} expected {spec.dtype}, got {_dtype(known[name])}"
            )
    problems += [
        f"  unexpected: {'.'.join(layout.path(n))!r} (shape {_shape(known[n])})"
        for n in known
        if n not in expected
    ]
    if problems:
        example = ", ".join(".".join(layout.path(n)) for n in ("fc1.weight", "fc1.bias"))
        found = sorted({_dtype(v) for v in known.values()})
        other = [dtype for dtype in found if dtype not in STORAGE_DTYPES]
        cast = "tensor.float(), array.astype(np.float32)"
        if what.startswith("checkpoint"):
            cast = "torch.load(path, weights_only=True), .float() each tensor, and save it again"
        if other and len(found) == 1 and all(p.startswith("  wrong dtype") for p in problems):
            # Only the dtype is wrong, all of it, and no spec could help (an int8 file;
            # found in a user trial: the spec= advice came first).
            raise value_error(
                f"{what} holds {found[0]} parameters, but equiv carries "
                f"{', '.join(STORAGE_DTYPES)} only: convert them first ({cast})"
            )
        advice = (
            f"\nequiv carries {', '.join(STORAGE_DTYPES)} only, not {', '.join(other)}: "
            f"convert first ({cast})"
            if other
            else ""
        )
        advice += _dtype_advice(known, spec, given, layout)
        advice += _order_advice(known, layout, spec.sizes if given else None)
        lacking = [
            ".".join(layout.path(n)) for n in expected if n.endswith(".bias") and n not in known
        ]
        if biases_from is not None and not given and lacking:
            # Found in a user trial: a file without fc2.bias, read into a module with
            # one, was told to pass spec= saying the model has none there.
            advice += (
                f"\n{biases_from} has a bias where {what} has none ("
                + ", ".join(map(repr, lacking))
                + "): it is another model's, or lost them; copy it into a module without "
                f"a bias there (nn.Linear(..., bias=False)), or read it without {biases_from}="
            )
        elif not given:
            advice += _some_biases_advice(known, layout, spec, problems)
        narrow = [v for v in known.values() if _dtype(v) == "float32"]
        if spec.dtype == "float64" and narrow and not isinstance(narrow[0], jax.Array):
            # torch tensors: nothing about JAX's x64 mode applies (found in a user trial:
            # a float64 file loaded into a float32 module was told to turn x64 on).
            advice += (
                "\nfloat32 tensors where the parameters are float64: convert one side "
                "(module.double(), or the float64 parameters' .float())"
            )
        elif spec.dtype == "float64" and narrow:
            # JAX made float32 arrays of float64 values (found in a user trial: the
            # spec= advice alone sent a user who had passed spec= in a circle).
            advice += (
                "\nfloat32 leaves in a float64 model: JAX makes float32 arrays unless x64 "
                "is on; create them inside `with jax.enable_x64(True):` (or "
                'jax.config.update("jax_enable_x64", True))'
            )
        raise value_error(
            f"{what} does not match the MLP {spec.sizes} ({spec.describe_bias()}, {spec.dtype}):\n"
            + "\n".join(problems)
            + (
                f"\nThe {layout.name} layout names parameters {example}, ..."
                # Only dtypes wrong: no spec helps (found in review: mixed dtypes were told
                # to pass one first).
                if given
                or biases_from is not None
                or all(p.startswith("  wrong dtype") for p in problems)
                else f"\nPass spec=MLPSpec(...) to state the architecture; the {layout.name} "
                f"layout names parameters {example}, ..."
            )
            + advice
        )
    return spec


#: Why a flax.linen model's Dense_j may not be its j-th layer called.
LINEN_ORDER = (
    "flax.linen numbers nn.Dense in the order it constructs them, and "
    "nn.Dense(3)(f(nn.Dense(8)(x))) constructs the outer one first: construct each layer "
    "before calling it (h = nn.Dense(8)(x); out = nn.Dense(3)(f(h))), or pass "
    "layout=equiv.linen_layout(module, params), read off the order it calls them"
)


def _dtype_advice(known: Mapping[str, Any], spec: MLPSpec, given: bool, layout: Layout) -> str:
    """What to do where the entries' dtypes are not the MLP's as a whole: several of
    them (found in a user trial: bfloat16 weights with float32 biases were told to pass
    a spec, which no dtype could satisfy), or one half-precision dtype where the spec
    is float32 or float64 (a bfloat16 port checked against a float32 module)."""
    found = collections.Counter(_dtype(v) for v in known.values() if _dtype(v) in STORAGE_DTYPES)
    if len(found) > 1:
        most = found.most_common(1)[0][0]
        groups = []
        for dtype in sorted(set(found) - {most}):
            names = [".".join(layout.path(n)) for n in known if _dtype(known[n]) == dtype]
            groups.append(f"{dtype}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
        return (
            f"\nthe parameters have several dtypes ({'; '.join(groups)}; the others {most}); "
            "equiv's MLP has one: cast them to one first (module.to(dtype), tensor.to(dtype), "
            "array.astype(dtype))"
        )
    if found and next(iter(found)) in HALF_DTYPES and spec.dtype not in found:
        half = next(iter(found))
        return (
            f"\nthey are {half} where the MLP is {spec.dtype}: cast them to {spec.dtype} "
            f"(jax.tree.map(lambda a: a.astype(jnp.{spec.dtype}), params), tensor.to("
            f"torch.{spec.dtype})); a converter takes them as they are with a spec of "
            f"dtype={half!r}"
        )
    return ""


def _order_advice(known: Mapping[str, Any], layout: Layout, sizes: tuple[int, ...] | None) -> str:
    """Advice for layers numbered out of call order, where the weights chain (each
    layer's input is the previous one's output: ``sizes`` where given) in one other
    order only; "" otherwise. flax.linen numbers ``nn.Dense`` in construction order,
    and ``nn.Dense(3)(f(nn.Dense(8)(x)))`` constructs the outer layer first (found in
    a user trial, where the error listed shapes only)."""
    count = sum(1 for n in known if n.endswith(".weight"))
    weights = [known.get(f"fc{i}.weight") for i in range(1, count + 1)]
    if not 1 < count <= 6 or any(w is None or len(_shape(w)) != 2 for w in weights):
        return ""
    # (in, out) of each layer, whatever the layout's weight order.
    edges = [_shape(w) if layout.transpose else _shape(w)[::-1] for w in weights]

    def chains(order: tuple[int, ...]) -> bool:
        steps = [edges[i] for i in order]
        if sizes is not None:
            return [steps[0][0]] + [out for _, out in steps] == list(sizes)
        return all(a[1] == b[0] for a, b in itertools.pairwise(steps))

    identity = tuple(range(count))
    fits = [o for o in itertools.permutations(identity) if o != identity and chains(o)]
    if chains(identity) or len(fits) != 1:
        return ""
    names = [".".join(layout.path(f"fc{i + 1}.weight")) for i in fits[0]]
    advice = (
        f"\nThe layers are numbered out of call order: their shapes chain in the order "
        f"{', '.join(names)}, and the {layout.name} layout's {layout.weight_path} is the "
        "weight of the layer called "
        + ("j-th from 0" if "{j}" in layout.weight_path else "i-th from 1")
    )
    return advice + (f". {LINEN_ORDER}" if layout.name == "flax" else "")


def dotted_paths(paths: list[tuple[str, ...]]) -> list[list[str]]:
    """Each path's parts, a key holding dots split at them (``'enc.fc.weight'``)."""
    return [[part for key in path for part in str(key).split(".")] for path in paths]


def _naming_hint(entries: Mapping[tuple[str, ...], Any], what: str) -> str:
    """What to do about entries (of ``what``) that no parameter name of the layout
    matches: a file's layout is its reader's ``file_layout=``, a tree's the
    converter's ``layout=``, and a state_dict's is torch's (found in a user trial:
    ``load_jax(path, layout="flax")`` of a flax file without equiv's metadata was told
    to pass ``layout='flax'``, which it had; ``layout=`` is the layout it returns)."""
    paths = list(entries)
    if all(len(p) > 1 and p[0] == "params" for p in paths):
        return "This is a flax variables dict: pass variables['params']"
    # A file's keys and a tree's paths alike, "/"-joined keys too
    # (flax.traverse_util.flatten_dict(sep="/"): found in a user trial), under any prefix
    # they all share (the checkpoint readers read both).
    dotted = [".".join(p).replace("/", ".") for p in paths]
    for name, other in LAYOUTS.items():
        if any(
            all(
                other.torch_name((d[len(prefix) :],)) is not None
                or other.torch_name(tuple(d[len(prefix) :].split("."))) is not None
                for d in dotted
            )
            for prefix in shared_prefixes(dotted)
        ):
            if what.startswith("checkpoint"):
                return (
                    f"These are the names of the {name!r} layout: say so, file_layout={name!r} "
                    "(the file's layout; load_jax's layout= is the one it returns)"
                )
            if what == "state_dict":
                return (
                    f"These are the names of the {name!r} layout, and torch_to_jax reads a "
                    "torch state_dict (fc1.weight, ...): its layout= is the one it returns"
                )
            return f"These are the names of the {name!r} layout: say so, layout={name!r}"
    if len(paths[0]) > 1 and all(p[-1] in ("kernel", "bias") for p in paths):
        # Found in review: nnx.state(port, nnx.Param) under the port's own names was
        # given torch advice.
        names = tuple(dict.fromkeys("/".join(p[:-1]) for p in paths))
        return (
            "These are flax layers under names of their own: pass the layout read off the "
            "order the model calls them, layout=equiv.nnx_layout(model) for a flax.nnx "
            "model or equiv.linen_layout(module, params) for a flax.linen one; or "
            "equiv.Layout(name, '{name}/kernel', '{name}/bias', True, layers=...) with "
            f"the layers in call order (of {names!r})"
        )
    advice = (
        "A torch Linear stack under names of its own ('encoder.weight') is read "
        "when you pass the module itself, or equiv.mlp_from_module(module)[1] (a file of "
        "its state_dict: equiv.load_torch(path, out=module) reads it into the module); a "
        "layout of your own is an equiv.Layout"
    )
    if what != "state_dict" and all(p[-1] in ("weight", "bias") for p in dotted_paths(paths)):
        # Found in a user trial: a checkpoint of a module's own layer names (fc_in,
        # fc_mid, fc_out) reads without the module through such a Layout.
        # Nested paths ({'enc': {'weight'}}) join with "/", a file's flat keys with ".";
        # names in natural order (layer2 before layer10: found in review, a safetensors
        # file's alphabetical order put layer10 second), which only the forward can say.
        nested = any(len(p) > 1 for p in paths)
        sep = "/" if nested else "."
        names = tuple(
            sorted(
                dict.fromkeys(sep.join(p[:-1]) for p in dotted_paths(paths)),
                key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)],
            )
        )
        key = "file_layout" if what.startswith("checkpoint") else "layout"
        advice += (
            f", here {key}=equiv.Layout('own', '{{name}}{sep}weight', '{{name}}{sep}bias', "
            f"False, layers={names!r}) with the layers in the order the forward calls them "
            "(shown in natural order: nothing here says the order of the calls)"
        )
    return advice


def _some_biases_advice(
    known: Mapping[str, Any], layout: Layout, spec: MLPSpec, problems: list[str]
) -> str:
    """Where the only problems are biases missing from some layers of entries read
    without a spec, the spec that says those layers have none; "" otherwise."""
    missing = [n for n in spec.param_names() if n.endswith(".bias") and n not in known]
    if not missing or len(missing) != len(problems):
        return ""
    biases = tuple(f"fc{i}.bias" in known for i in range(1, spec.num_layers + 1))
    dtype = ', dtype="float64"' if spec.dtype == "float64" else ""
    lacking = ", ".join(repr(".".join(layout.path(name))) for name in missing)
    return (
        f"\nOnly some layers have a bias (no {lacking}), and entries alone cannot tell a "
        "layer without one from a lost entry. If the model has none there, say so: "
        f"spec=MLPSpec({spec.sizes}, bias={biases}{dtype})"
    )


def _foreign_keys(
    tensors: dict[str, Any],
    layout: Layout,
    numbered: bool = True,
    renamed: dict[str, str] | None = None,
    shown: str = "the file",
) -> dict[str, Any]:
    """A file's (or a state_dict's) keys as ``layout`` names them (a file's: keyed,
    each path one key, :func:`equiv.checkpoint._keyed`), where no key is the layout's as
    it stands but one reading makes every key one; otherwise the keys as they are.

    The readings: keys another tool joined with ``/``
    (``flax.traverse_util.flatten_dict(sep="/")``); one prefix every key shares, up to a
    ``.`` (a flax variables dict written whole, ``params.Dense_0.kernel``; a module that
    holds the MLP, ``model.fc1.weight``); and, in the torch layout with ``numbered``,
    the state_dict of an ``nn.Sequential`` of Linear layers and activations
    (:func:`_numbered_stack`; a ``ValueError`` where its numbers do not say the order the
    layers run in, or a weight is not a Linear layer's). Found in user trials: no
    ``file_layout`` could read such files.

    >>> keys = ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
    >>> list(_foreign_keys(dict.fromkeys(keys, np.zeros((1, 1))), LAYOUTS["torch"]))
    ['fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias']
    """
    shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    names = _layout_names(list(tensors), layout, numbered, shapes)
    if names is None:
        return tensors
    if isinstance(names, str):
        raise value_error(f"{shown}: {names}")
    if renamed is not None:
        renamed.update(zip(names, tensors, strict=True))
    return dict(zip(names, tensors.values(), strict=True))


def _layout_names(
    keys: list[str], layout: Layout, numbered: bool, shapes: Mapping[str, tuple] | None = None
) -> list[str] | str | None:
    """The names :func:`_foreign_keys` reads ``keys`` under, None to read them as they
    are, or why numbered keys cannot be read (:func:`_numbered_stack`)."""
    if not keys or any(layout.torch_name((key,)) for key in keys):
        return None
    for joined in (keys, [key.replace("/", ".") for key in keys]):
        for prefix in shared_prefixes(joined):
            names = [key[len(prefix) :] for key in joined]
            if all(layout.torch_name((name,)) for name in names):
                return names
    if numbered and layout.name == "torch":
        return _numbered_stack(keys, shapes)
    return None


def _numbered_stack(
    keys: list[str], shapes: Mapping[str, tuple] | None = None
) -> list[str] | str | None:
    """equiv's names (``fc1.weight``...) for the keys of an ``nn.Sequential``'s state_dict
    of Linear layers and activations; None if ``keys`` are not numbered so; or, where
    the numbers do not say the order the layers run in, why.

    Such a file names each layer by its index in the container, under one prefix
    (``0.weight``, ``2.weight``; ``net.0.weight``): a Sequential calls them in
    increasing order. Every key must be ``{prefix}{index}.weight`` or ``.bias`` under
    the same prefix, each index holding a weight, and every two Linear layers must have
    a module between them (an activation, whose index holds no parameter): Linear
    layers numbered without a gap are an ``nn.ModuleList``'s, which a forward may call
    in any order (found in a user trial: two 8×8 layers called last-first were read
    swapped, with nothing to show it). The shapes are checked after (each layer's input
    width is the one before's output). A module's own file is read by its calls with
    ``load_torch(path, out=module)``.

    >>> _numbered_stack(["0.weight", "0.bias", "2.weight", "10.weight"])
    ['fc1.weight', 'fc1.bias', 'fc2.weight', 'fc3.weight']
    >>> _numbered_stack(["a.0.weight", "b.1.weight"]) is None  # two prefixes
    True
    >>> print(_numbered_stack(["layers.0.weight", "layers.1.weight"])[:60])
    its entries number Linear layers 0 and 1 with no module betw
    """
    found = [_NUMBERED.fullmatch(key) for key in keys]
    if not all(found) or len({m[1] for m in found}) != 1:
        return None
    indices = sorted({int(m[2]) for m in found})
    if {int(m[2]) for m in found if m[3] == "weight"} != set(indices):
        return None  # a bias without its weight: not a Linear layer
    flat = [m[0] for m in found if m[3] == "weight" and shapes and len(shapes[m[0]]) != 2]
    if flat:
        return (
            f"its entries are numbered as an nn.Sequential's, but {flat[0]!r} has shape "
            f"{shapes[flat[0]]}, not a Linear layer's (out, in): the module holds another "
            "layer (a norm, say), and equiv reads stacks of Linear layers and activations only"
        )
    adjacent = [(a, b) for a, b in itertools.pairwise(indices) if b == a + 1]
    if adjacent:
        a, b = adjacent[0]
        return (
            f"its entries number Linear layers {a} and {b} with no module between them, as an "
            "nn.ModuleList's are (a Sequential's activations take the numbers between), and "
            "a forward may call those in any order, which the names do not record. Read them "
            "with the module, whose calls say the order: pass the module itself, or for a "
            "file equiv.load_torch(path, out=module)"
        )
    layer = {index: i for i, index in enumerate(indices, 1)}
    return [f"fc{layer[int(m[2])]}.{m[3]}" for m in found]


#: A Linear layer's entry in a Sequential's state_dict: prefix, index, kind.
_NUMBERED = re.compile(r"((?:.*\.)?)(\d+)\.(weight|bias)")


def shared_prefixes(keys: list[str]) -> list[str]:
    """The prefixes up to a ``.`` that every key has, ``""`` first, longest last.

    >>> shared_prefixes(["a.b.c", "a.b.d"])
    ['', 'a.', 'a.b.']
    """
    common = os.path.commonprefix(keys)
    return [""] + [common[: i + 1] for i, char in enumerate(common) if char == "."]


def _infer_spec(
    known: Mapping[str, Any],
    layout: Layout,
    what: str,
    *,
    from_model: bool = False,
    biases: tuple[bool, ...] | None = None,
) -> MLPSpec:
    """Read sizes off the weights: layer i maps weight.shape[1] to weight.shape[0].

    The first weight fixes the dtype; anything inconsistent is reported by the check.
    The bias is ``biases`` where they count the layers, else each layer's own
    ``from_model`` (:func:`check_entries`), else on every layer if on any.
    """
    if not known:
        raise value_error(
            f"{what}: found no layer parameters; the {layout.name} layout expects names "
            f"such as {'.'.join(layout.path('fc1.weight'))!r}"
        )
    count = max(int(_TORCH_NAME.fullmatch(n).group(1)) for n in known)
    sizes: list[int | None] = [None] * (count + 1)
    for i in range(1, count + 1):
        weight, bias = known.get(f"fc{i}.weight"), known.get(f"fc{i}.bias")
        if weight is not None and len(_shape(weight)) == 2:
            out, fan_in = layout.shape(f"fc{i}.weight", _shape(weight))
            sizes[i] = sizes[i] or out
            sizes[i - 1] = sizes[i - 1] or fan_in
        elif bias is not None and len(_shape(bias)) == 1:
            sizes[i] = sizes[i] or _shape(bias)[0]
    dtypes = [_dtype(v) for _, v in sorted(known.items()) if _dtype(v) in STORAGE_DTYPES]
    found = tuple(f"fc{i}.bias" in known for i in range(1, count + 1))
    if biases is not None and len(biases) == count:
        bias = biases[0] if len(set(biases)) == 1 else tuple(biases)
    else:
        bias = found if from_model and len(set(found)) > 1 else any(found)
    return MLPSpec(
        # A width no entry shows: any value (the check then names the entry missing).
        sizes=tuple(1 if size is None else size for size in sizes),
        bias=bias,
        dtype=dtypes[0] if dtypes else "float32",
    )


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def _dtype(value: Any) -> str:
    return str(value.dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------
# Trees


def _state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """A module's or a mapping's tensors by name, each holding values that can be read.

    A module whose names are not equiv's (an ``nn.Sequential``'s ``0.weight``) is read
    as a Linear stack, its layers in order (:func:`equiv.from_module.module_tensors`,
    its own tensors under equiv's names): found in user trials, there was no way back
    into one (``jax_to_torch(..., out=)``) and ``torch_to_equinox`` refused one.
    """
    if isinstance(obj, torch.nn.Module):
        from equiv.from_module import (  # imports this module
            check_named_call_order,
            has_equiv_names,
            module_tensors,
        )
        from equiv.torch_mlp import TorchMLP

        state = dict(obj.state_dict(keep_vars=True))
        if not has_equiv_names(state):
            state = module_tensors(obj)
        elif not isinstance(obj, TorchMLP):
            check_named_call_order(obj)  # names that say another order than the calls
    elif isinstance(obj, Mapping):
        keys = [k for k in obj if not isinstance(k, str)]
        if keys:
            raise type_error(
                f"state_dict keys must be strings such as 'fc1.weight'; got "
                f"{', '.join(f'{k!r} ({type(k).__name__})' for k in keys)}"
            )
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise type_error(
                f"state_dict values must be torch tensors; {', '.join(map(repr, bad))} "
                f"{'is' if len(bad) == 1 else 'are'} not. To convert a JAX tree, use jax_to_torch"
            )
        state = _read_names(dict(obj))
    else:
        raise type_error(f"expected a torch.nn.Module or a state_dict, got {type(obj).__name__}")
    for name, tensor in state.items():
        refuse_without_values(name, tensor)
    return {name: tensor.detach() for name, tensor in state.items()}


def _read_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict under equiv's names where none of its names is, but they are an
    ``nn.Sequential``'s or all under one prefix, as the checkpoint readers read a file
    (:func:`_foreign_keys`; found in a user trial: the file of a
    state_dict was read, the state_dict itself refused); otherwise as it is."""
    return _foreign_keys(state, LAYOUTS["torch"], shown="state_dict")


def missing_values(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` holds no dense values to read, or None: an uninitialised lazy
    parameter, a nested or sparse layout (any of them), or the meta device.

    >>> missing_values(torch.zeros(2).to_sparse()), missing_values(torch.zeros(2))
    ('sparse_coo', None)
    """
    if isinstance(tensor, torch.nn.parameter.UninitializedTensorMixin):
        return "an uninitialised lazy parameter"
    if tensor.is_nested:
        return "nested"
    if tensor.layout != torch.strided:
        return str(tensor.layout).removeprefix("torch.")
    if tensor.device.type == "meta":
        return "on the meta device"
    return None


def refuse_without_values(name: str, tensor: torch.Tensor) -> None:
    """A ``ValueError`` naming ``tensor`` if it holds no dense values to read
    (:func:`missing_values`), with what to do about it."""
    what = missing_values(tensor)
    if what is None:
        return
    if what == "an uninitialised lazy parameter":
        raise value_error(
            f"{name!r} is an uninitialised lazy parameter (nn.LazyLinear) and holds no "
            "values yet: run one forward pass to materialise it first"
        )
    if what == "on the meta device":
        raise value_error(
            f"{name!r} is on the meta device and holds no values: materialise the module "
            "first (module.to_empty(device='cpu'), then load its weights)"
        )
    # Found in review: a sparse weight failed inside copy_ with torch's RuntimeError.
    raise value_error(
        f"{name!r} is {what}: equiv reads dense tensors, convert it first (.to_dense())"
    )


def module_spec(module: Any) -> MLPSpec | None:
    """The :class:`MLPSpec` a module carries (equiv's :class:`TorchMLP` does), in the
    dtype its parameters have now (``model.double()`` changes them, not the spec);
    None for anything else, an attribute called ``spec`` of another type included.

    >>> import torch
    >>> from equiv.torch_mlp import TorchMLP
    >>> module_spec(TorchMLP(MLPSpec((4, 3, 2))).double()).dtype
    'float64'
    """
    spec = getattr(module, "spec", None)
    if not isinstance(module, torch.nn.Module) or not isinstance(spec, MLPSpec):
        return None
    dtypes = {_dtype(p) for p in module.parameters()}
    if len(dtypes) == 1 and dtypes <= set(STORAGE_DTYPES):
        return spec.replace(dtype=dtypes.pop())
    return spec  # mixed or unsupported: the check of the entries names them


def overlapping(tensors: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """The names of two tensors whose memory overlaps (tied weights, a view of
    another), or None. Tensors packed side by side in one flat buffer do not overlap.

    >>> import torch
    >>> weight = torch.zeros(2, 3)
    >>> overlapping({"a": weight, "b": weight.T, "c": torch.zeros(2)})
    ('a', 'b')
    """
    spans: list[tuple[torch.device, int, int, str]] = []
    for name, tensor in tensors.items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue  # no memory to share
        start = tensor.data_ptr()
        extent = sum((n - 1) * abs(st) for n, st in zip(tensor.shape, tensor.stride(), strict=True))
        end = start + (extent + 1) * tensor.element_size()
        for device, other_start, other_end, other in spans:
            if device == tensor.device and start < other_end and other_start < end:
                return other, name
        spans.append((tensor.device, start, end, name))
    return None


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = _unwrap(value)
    return flat


def _unwrap(leaf: Any) -> Any:
    """A ``flax.nnx`` variable's array (``nnx.state(model)`` holds variables)."""
    if type(leaf).__module__.startswith("flax.") and hasattr(leaf, "get_value"):
        return leaf.get_value()
    return leaf


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# XLA:CPU adopts a DLPack buffer without copying only if it starts on a 64-byte
# boundary (it copies otherwise); NumPy aligns its allocations to 16 bytes.
_XLA_CPU_ALIGNMENT = 64


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new, uninitialised, contiguous CPU tensor whose memory JAX can adopt.

    The memory comes from NumPy rather than torch's allocator because NumPy asks the
    kernel for transparent huge pages on allocations of 4 MiB and more
    (``madvise``): first touch then faults once per 2 MiB instead of once per 4 KiB.
    New memory is what a copying conversion must return, and its page faults, not
    the copy, were the cost: 403 MB took 98,310 faults and ran at 3.6 GB/s from
    torch's allocator, 2,753 faults and 9.8 GB/s from here (``python
    scripts/bench_convert.py``). The start is aligned for XLA:CPU, so that
    ``jax.device_put`` adopts the buffer instead of copying it.

    Example:
      >>> import torch
      >>> buffer = _host_empty((2, 3), torch.float32)
      >>> buffer.shape, buffer.is_contiguous(), buffer.data_ptr() % _XLA_CPU_ALIGNMENT
      (torch.Size([2, 3]), True, 0)
    """
    memory = _aligned_bytes(math.prod(shape) * dtype.itemsize)
    return torch.from_numpy(memory).view(dtype).view(shape)


def _aligned_bytes(nbytes: int) -> np.ndarray:
    """New uninitialised uint8 memory from NumPy, its start aligned for XLA:CPU."""
    raw = np.empty(nbytes + _XLA_CPU_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _XLA_CPU_ALIGNMENT
    return raw[start : start + nbytes]


# Below this many bytes of transposing copies, starting threads costs more than
# they save.
_PARALLEL_MIN_BYTES = 1 << 22
# A transposing copy runs in strips of this many columns of its target: each strip
# reads whole rows of the source (a row is pages apart from the next, so reading one
# column of it at a time misses the TLB on every row) and writes rows of 128 bytes.
_STRIP = 32
# Below this many bytes a transposing copy is one copy_: strips save nothing there.
_STRIP_MIN_BYTES = 1 << 20
# At most this many strips per target: wider ones take wider strips.
_MAX_STRIPS = 512


def _fill(pairs: list[tuple[torch.Tensor, torch.Tensor]], *, strips: bool = False) -> None:
    """``target.copy_(source)`` for each pair, without autograd.

    Transposing copies (a source whose transpose is contiguous: a weight's ``.mT``)
    run on threads: torch's transposing kernel is single-threaded, while its other
    copies already use every thread. With ``strips`` (targets that exist already: a
    module's own tensors), each runs in strips of :data:`_STRIP` columns of its
    target, each strip reading whole rows of the source, where torch's kernel reads
    it a column at a time: ``jax_to_torch(..., out=module)`` in the flax layout, six
    4096×4096 float32 weights, 3.3 GB/s one leaf per thread through the kernel, 6.3
    GB/s in strips (``python scripts/bench_convert.py``, best of 5, three runs each).
    Into new memory the kernel is as fast or faster (4.1 to 4.5 GB/s against 4.0 to
    4.2: the kernel's page faults dominate there), so new targets take the kernel.

    Example:
      >>> import torch
      >>> weight, kernel = torch.arange(6.0).reshape(2, 3), torch.empty(3, 2)
      >>> _fill([(kernel, weight.mT)])
      >>> torch.equal(kernel, weight.mT)
      True
    """

    def copy(target: torch.Tensor, source: torch.Tensor) -> None:
        with torch.no_grad():  # grad mode is per thread
            target.copy_(source)

    strided = [pair for pair in pairs if not pair[1].is_contiguous()]
    for target, source in pairs:
        if source.is_contiguous():
            copy(target, source)
    workers = min(torch.get_num_threads(), os.cpu_count() or 1)
    if workers < 2 or sum(target.nbytes for target, _ in strided) < _PARALLEL_MIN_BYTES:
        for target, source in strided:
            copy(target, source)
        return

    def in_strips(target: torch.Tensor, source: torch.Tensor) -> bool:
        # On the CPU, and with rows enough that a strip is more than a few bytes: a
        # (4, 2_000_000) target took 665 ms in 62,500 strips against 12 ms through the
        # kernel (found in review); on a GPU each strip would be a kernel launch.
        return (
            strips
            and target.device.type == "cpu"
            and source.dim() == 2
            and source.mT.is_contiguous()
            and target.shape[0] >= _STRIP
            and target.nbytes >= _STRIP_MIN_BYTES
        )

    # One task per pair, all its strips, while there are pairs enough for every worker
    # (few tasks, each long); fewer pairs than workers: each pair's strips split into
    # one contiguous run per worker.
    parts = workers if sum(in_strips(*pair) for pair in strided) < workers else 1
    tasks = []
    for target, source in strided:
        if not in_strips(target, source):
            tasks.append([(target, source)])
            continue
        columns = target.shape[1]
        width = max(_STRIP, -(-columns // _MAX_STRIPS))  # few copy_ calls for wide targets
        bounds = [round(columns * k / parts) for k in range(parts + 1)]
        for low, high in zip(bounds, bounds[1:], strict=False):
            tasks.append(
                [
                    (target[:, c : min(c + width, high)], source[:, c : min(c + width, high)])
                    for c in range(low, high, width)
                ]
            )

    def run(task: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for target, source in task:
            copy(target, source)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, tasks))


def _as_torch(array: jax.Array | np.ndarray) -> torch.Tensor:
    """A torch view of an array (DLPack or NumPy, no copy): callers copy it.

    An array over several devices (sharded or replicated) has no one buffer to share
    through DLPack: it is gathered to the host first (found in review: BufferError).
    """
    if isinstance(array, jax.Array) and len(array.sharding.device_set) > 1:
        array = np.asarray(jax.device_get(array))
    if isinstance(array, np.ndarray):
        if any(stride < 0 for stride in array.strides):
            # torch has no negative strides (a reversed view, x[::-1]): one more copy.
            array = np.ascontiguousarray(array)
        bfloat16 = array.dtype.name == "bfloat16"  # ml_dtypes', which torch cannot read
        with warnings.catch_warnings():
            # A read-only array (jax.device_get returns them, found in review) is
            # only read here: callers copy it, so torch's warning would mislead.
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            tensor = torch.from_numpy(array.view(np.int16) if bfloat16 else array)
        return tensor.view(torch.bfloat16) if bfloat16 else tensor
    return torch.from_dlpack(array)


# ---------------------------------------------------------------------------
# Equinox: models are pytrees of modules, not dicts, so they get their own pair.


def torch_to_equinox(
    module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    model: Any,
    *,
    spec: MLPSpec | None = None,
    layout: str | Layout = "equinox",
) -> Any:
    """Return a copy of an Equinox model holding a torch MLP's parameters.

    Args:
      module_or_state_dict: as for :func:`torch_to_jax`, or a JAX tree in ``layout``
        (what ``load_jax(path, layout="equinox")`` returns).
      model: an ``eqx.nn.MLP``, an ``eqx.nn.Linear`` or a list/tuple of
        ``eqx.nn.Linear`` (layer ``j`` receives torch's ``fc{j+1}``). Its shapes,
        biases and dtype must match the torch parameters.
      spec: the expected architecture, as for :func:`torch_to_jax`.
      layout: the layout of a JAX tree given as ``module_or_state_dict``.

    Returns:
      A new model of the same structure; the torch parameters are copied.

    Raises:
      TypeError: ``model`` is none of the supported kinds.
      ValueError: source or model do not match (every entry named).

    Example:
      >>> import equinox as eqx, jax, torch
      >>> model = eqx.nn.MLP(4, 2, width_size=3, depth=1, key=jax.random.key(0))
      >>> state = {k: torch.zeros(v) for k, v in MLPSpec((4, 3, 2)).param_shapes().items()}
      >>> float(torch_to_equinox(state, model).layers[1].weight.sum())
      0.0
    """
    import equinox as eqx

    paths = _equinox_paths(model)  # read once: tree_at's copy cannot be called
    layers = [_at_path(model, path) for path in paths]
    if _is_array_tree(module_or_state_dict):
        # A JAX tree in the equinox layout (what load_jax(layout="equinox") returns; found
        # in a user trial, refused with advice to go through torch): the model's own
        # layers say which have a bias.
        biases = tuple(layer.bias is not None for layer in layers)
        layout = get_layout(layout)
        tree = layout_tree(module_or_state_dict, layout)
        flat = _flatten(tree) if isinstance(tree, Mapping) else {}
        spec = check_entries(flat, layout, spec, what="params", biases=biases)
        module_or_state_dict = jax_to_torch(tree, layout=layout, spec=spec)
    state = _state_dict(module_or_state_dict)
    if spec is None:
        spec = module_spec(module_or_state_dict)
    own = isinstance(module_or_state_dict, torch.nn.Module)
    spec = check_entries(
        {(n,): t for n, t in state.items()},
        LAYOUTS["torch"],
        spec,
        what="state_dict",
        from_model=own,
    )
    check_entries(_flatten(_equinox_tree(layers)), LAYOUTS["equinox"], spec, what="equinox model")
    if isinstance(module_or_state_dict, torch.nn.Module):
        _check_equinox_activations(module_or_state_dict, model, spec)
    params = torch_to_jax(state, layout="equinox", spec=spec)["layers"]
    names = [("weight", "bias") if has else ("weight",) for has in spec.biases]

    def where(m: Any) -> list[Any]:
        return [
            getattr(_at_path(m, path), n) for path, ns in zip(paths, names, strict=True) for n in ns
        ]

    values = [params[str(j)][n] for j in range(len(layers)) for n in names[j]]
    return eqx.tree_at(where, model, values)


#: How to write each of equiv's activations for ``eqx.nn.MLP(..., activation=)``.
_EQUINOX_ACTIVATIONS = {
    "relu": "jax.nn.relu",
    "leaky_relu": "functools.partial(jax.nn.leaky_relu, negative_slope={negative_slope})",
    "elu": "functools.partial(jax.nn.elu, alpha={elu_alpha})",
    "tanh": "jax.nn.tanh",
    "sigmoid": "jax.nn.sigmoid",
    "gelu": "functools.partial(jax.nn.gelu, approximate=False)",
    "gelu_tanh": "jax.nn.gelu",
    "silu": "jax.nn.silu",
    "identity": "lambda x: x",
}


#: An eqx.nn.MLP's final_activation for a torch module's last one.
_EQUINOX_FINAL = {
    "Sigmoid": "jax.nn.sigmoid",
    "Softmax": "jax.nn.softmax",
    "LogSoftmax": "jax.nn.log_softmax",
    "Tanh": "jax.nn.tanh",
    "ReLU": "jax.nn.relu",
}


def _equinox_activation(fn: Any, z: np.ndarray) -> str:
    """What an Equinox activation computes, as equiv names it, its slope or alpha fitted
    (found in a user trial: jax.nn.leaky_relu against torch's slope 0.2 was shown as
    ``<PjitFunction of <function leaky_relu ...>>``); its repr where none of equiv's."""
    from equiv.activations import ACTIVATIONS
    from equiv.nnx_layout import _activations

    found = _activations(z, np.asarray(fn(jnp.asarray(z))), 1e-5)
    if not found:
        return f"{getattr(fn, '__name__', None) or repr(fn)}, none of equiv's"
    # The simplest name first: no activation reads as a leaky_relu of slope 1.
    name, param = min(found.items(), key=lambda kv: ACTIVATIONS[kv[0]].param_field is not None)
    field = ACTIVATIONS[name].param_field
    return f"{name} with {field} {param:.4g}" if field else name


def _check_equinox_activations(module: torch.nn.Module, model: Any, spec: MLPSpec) -> None:
    """Refuse an ``eqx.nn.MLP`` whose activation computes another function than the
    torch module's activation modules, or whose ``final_activation`` is not the
    identity: filled with the same parameters, it would compute another function
    (found in a user trial: a ReLU module's parameters went into a tanh MLP silently).
    Compared by value on a probe, so a ``functools.partial`` or lambda is read too; an
    activation the torch forward calls as a function leaves no module and is not
    checked."""
    import equinox as eqx

    if not isinstance(model, eqx.nn.MLP):
        return  # Linear layers alone carry no activation
    from equiv.activations import ACTIVATIONS
    from equiv.from_module import _read_stack

    # One reading of the stack (a probe forward): its spec and its final module.
    stack, *_, trailing = _read_stack(module, trainable=False, reorder=True)
    read = module_spec(module) or stack
    z = np.linspace(-4.0, 4.0, 33, dtype=np.float32)

    def computes(fn: Any, name: str) -> bool:
        expected = ACTIVATIONS[name].jax_fn(jnp.asarray(z), ACTIVATIONS[name].param(read))
        return np.allclose(np.asarray(fn(jnp.asarray(z))), expected, rtol=1e-5, atol=1e-6)

    wanted = set(read.activations) - {"identity"}  # identity: perhaps a function call
    problems = []
    for name in sorted(wanted):
        if not computes(model.activation, name):
            field = ACTIVATIONS[name].param_field
            problems.append(
                f"its activation is {_equinox_activation(model.activation, z)}, but the "
                f"torch module's is {name}"
                + (f" with {field} {getattr(read, field):.4g}" if field else "")
                + ": build it with activation="
                + _EQUINOX_ACTIVATIONS[name].format(**dataclasses.asdict(read))
            )
    if trailing is None and not computes(model.final_activation, "identity"):
        problems.append(
            "its final_activation is not the identity, and the torch module ends with a "
            "Linear layer: build it without final_activation (put one in the loss instead)"
        )
    elif trailing is not None:
        # A classifier's final sigmoid or softmax (found in a user trial: taken by the
        # converters), which eqx.nn.MLP holds as its final_activation.
        rows = np.stack([z, z[::-1] * 0.5])  # two rows: a function over the batch differs
        with torch.no_grad():
            wanted = trailing(torch.from_numpy(rows)).numpy()
        got = np.asarray(jax.vmap(model.final_activation)(jnp.asarray(rows)))
        if got.shape != wanted.shape or not np.allclose(got, wanted, rtol=1e-5, atol=1e-6):
            kind = type(trailing).__name__
            problems.append(
                f"its final_activation is not the torch module's final {kind}: build it "
                f"with final_activation={_EQUINOX_FINAL.get(kind, 'the same function')}"
            )
    if problems:
        raise value_error(
            "the equinox model would compute another function than the torch module with "
            "the same parameters: " + "; ".join(problems)
        )


def equinox_to_torch(
    model: Any,
    *,
    spec: MLPSpec | None = None,
    device: torch.device | str | None = None,
    out: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
    like: Any = None,
) -> dict[str, torch.Tensor]:
    """The torch state_dict (``fc1.weight``...) of an Equinox model (or its gradients).

    ``model`` is an ``eqx.nn.MLP``, an ``eqx.nn.Linear``, a list/tuple of them or an
    ``eqx.Module`` made of them, as for :func:`torch_to_equinox`; a gradient of such a
    model (``eqx.filter_grad``) has the same structure and converts the same way. A
    module of your own is read in the order it calls its layers, which its gradient
    cannot say (its functions are None there): pass ``like=model``. ``device`` and
    ``out`` are
    :func:`jax_to_torch`'s: ``out=module`` copies the weights into an existing torch
    module (an ``nn.Sequential``...) in place. ``jax_to_torch(model,
    layout="equinox")`` is the same call.

    Example:
      >>> import equinox as eqx, jax
      >>> model = eqx.nn.MLP(4, 2, width_size=3, depth=1, key=jax.random.key(0))
      >>> list(equinox_to_torch(model))
      ['fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias']
    """
    # The model's own layers, not their tree: each says whether it has a bias.
    try:
        paths = _equinox_paths(model if like is None else like)
    except TypeError as error:
        if like is not None or "could not be called" not in str(error):
            raise
        raise type_error(
            f"{str(error).removeprefix('[equiv] ')}. A gradient or an eqx.partition of a "
            "model holds None for its functions and cannot be called: pass like=model"
        ) from None
    layers = [_at_path(model, path) for path in paths]
    return jax_to_torch(layers, layout="equinox", spec=spec, device=device, out=out)


def layout_tree(params: Any, layout: Layout) -> Any:
    """``params`` as the layout's tree: an Equinox model (``layout`` equinox) becomes
    ``{"layers": {"0": {"weight", "bias"}}}`` of its arrays, and a ``flax.nnx`` module
    its parameters' state, ``nnx.state(model, nnx.Param)`` (found in a user trial: a
    module was refused with advice for linen's variables); anything else is returned
    as it is. Every function taking a JAX tree takes these models this way."""
    nnx = getattr(sys.modules.get("flax"), "nnx", None)
    if nnx is not None and isinstance(params, nnx.Module):
        state = nnx.state(params, nnx.Param)
        paths = [tuple(str(getattr(k, "key", k)) for k in p) for p, _ in nnx.to_flat_state(state)]
        if paths and not any(layout.torch_name(p) for p in paths):
            # A port's own names (hidden, out): the layout read off its calls holds them.
            raise value_error(
                f"{type(params).__name__}'s parameters ({', '.join('/'.join(p) for p in paths[:4])}"
                f"{', ...' if len(paths) > 4 else ''}) are not where the {layout.name} layout "
                f"puts them ({'/'.join(layout.path('fc1.weight'))}, ...): pass "
                "layout=equiv.nnx_layout(model), which reads the model's own names in the "
                "order it calls its Linear layers"
            )
        return state
    if nnx is not None and isinstance(params, nnx.State):
        # Found in a user trial: nnx.state(model) of a model with nnx.Dropout holds its
        # random state, which was reported as unexpected parameters with spec= advice.
        others = [
            f"{'.'.join(str(getattr(k, 'key', k)) for k in path)!r} ({type(leaf).__name__})"
            for path, leaf in jax.tree_util.tree_leaves_with_path(
                params, is_leaf=lambda x: isinstance(x, nnx.Variable)
            )
            if isinstance(leaf, nnx.Variable) and not isinstance(leaf, nnx.Param)
        ]
        if others:
            raise value_error(
                f"params is a flax.nnx state holding more than parameters: "
                f"{', '.join(others[:4])}{', ...' if len(others) > 4 else ''}. Pass "
                "nnx.state(model, nnx.Param), or the model itself"
            )
    if (
        isinstance(params, Mapping)
        and isinstance(params.get("params"), Mapping)
        and len(params) > 1
        and layout.path("fc1.weight")[0] != "params"
    ):
        # Found in a user trial: linen variables with batch_stats (or sown
        # intermediates) were told about names, or that a leaf is not an array.
        collections = ", ".join(map(repr, params))
        raise value_error(
            f"params is a flax variables dict (collections {collections}): pass variables['params']"
        )
    if not is_equinox_model(params):
        return params
    if layout.name != "equinox":
        raise type_error(
            f"params is an Equinox {type(params).__name__}, which holds its weights "
            f"(out, in), but layout={layout.name!r}: pass layout='equinox'"
        )
    return _equinox_tree(_equinox_layers(params))


def _is_array_tree(value: Any) -> bool:
    """Whether ``value`` is a JAX tree of arrays (a mapping or an Equinox model), not
    torch's: a module or a state_dict of tensors.

    >>> import jax.numpy as jnp, torch
    >>> _is_array_tree({"layers": {"0": {"weight": jnp.ones((2, 2))}}})
    True
    >>> _is_array_tree({"fc1.weight": torch.ones(2, 2)})
    False
    """
    if is_equinox_model(value):
        return True
    if not isinstance(value, Mapping) or not value:
        return False
    return all(isinstance(v, (jax.Array, np.ndarray)) for v in _flatten(value).values())


def is_jax_model(value: Any) -> bool:
    """Whether ``value`` is a model (Equinox, or ``flax.nnx``) whose own layers say which
    have a bias, as a torch module's do (found in review: an nnx port with
    ``use_bias=False`` on one layer needed ``spec=``)."""
    nnx = getattr(sys.modules.get("flax"), "nnx", None)
    return is_equinox_model(value) or (nnx is not None and isinstance(value, nnx.Module))


def is_equinox_model(value: Any) -> bool:
    """Whether ``value`` is an ``equinox.Module`` or a list of them (without importing
    equinox if the caller has not)."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return False
    if isinstance(value, (list, tuple)):  # a list of eqx.nn.Linear, say
        return bool(value) and all(isinstance(v, eqx.Module) for v in value)
    return isinstance(value, eqx.Module)


def _equinox_layers(model: Any) -> list[Any]:
    """The model's eqx.nn.Linear layers, in the order it calls them."""
    return [_at_path(model, path) for path in _equinox_paths(model)]


def _equinox_paths(model: Any) -> list[tuple[Any, ...]]:
    """Where the model's eqx.nn.Linear layers are (JAX key paths), in the order it calls
    them: an ``eqx.nn.MLP``'s ``layers``, a list's order, or, for an ``eqx.Module`` of
    your own, the order its ``__call__`` calls them on a probe (found in a user trial:
    a module with fields ``enc``, ``mid``, ``head``, the usual way to write Equinox,
    was refused)."""
    import equinox as eqx
    from jax.tree_util import GetAttrKey, SequenceKey

    if isinstance(model, eqx.nn.Linear):
        return [()]
    if isinstance(model, eqx.nn.MLP) and isinstance(model.layers, (list, tuple)):
        return [(GetAttrKey("layers"), SequenceKey(i)) for i in range(len(model.layers))]
    if isinstance(model, (list, tuple)) and all(isinstance(m, eqx.nn.Linear) for m in model):
        return [(SequenceKey(i),) for i in range(len(model))]
    advice = (
        ": pass its Linear layers in call order as a list instead, e.g. "
        "torch_to_equinox(state, [model.enc, model.head])"
    )
    if not isinstance(model, eqx.Module):
        raise type_error(
            f"expected an eqx.nn.MLP, an eqx.nn.Linear, a list of eqx.nn.Linear or an "
            f"eqx.Module made of them, got {type(model).__name__}" + advice.replace(":", ";", 1)
        )
    return _equinox_call_order(model, advice)


def _equinox_call_order(model: Any, advice: str) -> list[tuple[Any, ...]]:
    """The key paths of an ``eqx.Module``'s Linear layers in the order its ``__call__``
    calls them on a probe (one example of each layer's input width, then a batch of
    them), recorded by ``eqx.nn.Linear.__call__`` replaced for the call and restored
    (so not while another thread calls one)."""
    import equinox as eqx

    def is_linear(node: Any) -> bool:
        return isinstance(node, eqx.nn.Linear)

    found = [
        (path, node)
        for path, node in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_linear)[0]
        if is_linear(node)
    ]
    shown = type(model).__name__
    if not found:
        raise type_error(f"{shown} holds no eqx.nn.Linear" + advice)
    by_weight = {id(node.weight): path for path, node in found}
    calls: list[int] = []
    original = eqx.nn.Linear.__call__

    def recording(self: Any, x: Any, *, key: Any = None) -> Any:
        calls.append(id(self.weight))
        return original(self, x, key=key)

    dtype = found[0][1].weight.dtype
    rng = np.random.default_rng(0)
    widths = [node.in_features for _, node in found if isinstance(node.in_features, int)]
    eqx.nn.Linear.__call__ = recording
    # Without jit: a jitted __call__ (eqx.filter_jit, the usual style) would see tracers
    # for weights, or replay its cache with no call recorded (found in review).
    try:
        with jax.disable_jit():
            for width in dict.fromkeys(widths):
                for shape in ((width,), (16, width)):
                    calls.clear()
                    try:
                        model(jnp.asarray(rng.standard_normal(shape), dtype))
                    except Exception:  # noqa: BLE001 - another width, or a call equiv cannot make
                        continue
                    if sorted(calls) != sorted(by_weight):
                        raise value_error(
                            f"{shown}'s __call__ calls its eqx.nn.Linear layers "
                            f"{len(calls)} times for {len(by_weight)} layers: equiv's MLP calls "
                            "each once, in order;" + advice.removeprefix(":")
                        )
                    return [by_weight[c] for c in calls]
    finally:
        eqx.nn.Linear.__call__ = original
    raise type_error(
        f"{shown} could not be called on a probe of any of its layers' input widths "
        "(one example or a batch), so the order of its layers is unknown" + advice
    )


def equinox_own_layout(model: Any, paths: list[tuple[Any, ...]] | None = None) -> Layout | None:
    """An Equinox module of your own's layout under its own names (``enc``, ``mid``,
    ``head``, in the order it calls them), for messages: the equinox layout's
    ``layers/0`` is an ``eqx.nn.MLP``'s (found in review: a port with fields ``enc``,
    ``mid``, ``head`` was told of ``layers/1/bias``); None for an ``eqx.nn.MLP``, a
    list or a single layer, or where its layers cannot be read."""
    import equinox as eqx

    if isinstance(model, (eqx.nn.MLP, eqx.nn.Linear, list, tuple)):
        return None
    if paths is None:
        try:
            paths = _equinox_paths(model)
        except (TypeError, ValueError):
            return None
    from jax.tree_util import GetAttrKey, SequenceKey

    def part(key: Any) -> str:
        if isinstance(key, GetAttrKey):
            return key.name
        return str(key.idx if isinstance(key, SequenceKey) else getattr(key, "key", key))

    names = tuple("/".join(part(k) for k in path) for path in paths)  # a DictKey's key
    return Layout("equinox", "{name}/weight", "{name}/bias", False, layers=names)


def _at_path(tree: Any, path: tuple[Any, ...]) -> Any:
    """The node of ``tree`` at a JAX key path (attributes, indices, keys)."""
    from jax.tree_util import DictKey, GetAttrKey, SequenceKey

    for key in path:
        if isinstance(key, GetAttrKey):
            tree = getattr(tree, key.name)
        elif isinstance(key, SequenceKey):
            tree = tree[key.idx]
        elif isinstance(key, DictKey):
            tree = tree[key.key]
        else:
            raise type_error(f"cannot follow {key!r} in {type(tree).__name__}")
    return tree


def _equinox_tree(layers: list[Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for j, layer in enumerate(layers):
        tree[str(j)] = {"weight": layer.weight}
        if layer.bias is not None:
            tree[str(j)]["bias"] = layer.bias
    return {"layers": tree}
