"""The layout of a ``flax.nnx`` model's own Linear layers, read off the calls it makes.

The ``"nnx"`` layout names a model's Linear attributes ``fc1``, ``fc2``, ...; a port
whose attributes are ``hidden`` and ``out`` (or ``blocks[0]``, ...) takes the layout
:func:`nnx_layout` reads from the model itself: its own paths, in the order its
``__call__`` calls them on a probe batch, as ``mlp_from_module`` reads a torch module.
Nothing is guessed from names or shapes, and the model is not changed (the probe runs
on a copy that shares its arrays, in eval mode).

Example:
  >>> import jax
  >>> from flax import nnx
  >>> class Port(nnx.Module):
  ...     def __init__(self, rngs):
  ...         self.out = nnx.Linear(8, 2, rngs=rngs)  # defined first, called last
  ...         self.hidden = nnx.Linear(4, 8, rngs=rngs)
  ...     def __call__(self, x):
  ...         return self.out(jax.nn.relu(self.hidden(x)))
  >>> nnx_layout(Port(nnx.Rngs(0))).layers
  ('hidden', 'out')
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from equiv._messages import type_error, value_error
from equiv.convert import Layout

_FORM = (
    "give its __call__ one input batch x, or name its Linear attributes fc1, fc2, ... "
    "in call order and pass layout='nnx'"
)


def nnx_layout(model: Any, *, name: str | None = None) -> Layout:
    """The :class:`~equiv.convert.Layout` of ``model``'s own ``nnx.Linear`` layers.

    Args:
      model: a ``flax.nnx.Module`` whose ``__call__(x)`` calls each of its
        ``nnx.Linear`` layers once (activations in between may be functions).
      name: the layout's name, in messages and files (the model's class name by
        default).

    Returns:
      A layout whose paths are the model's own (``hidden/kernel``, ``out/bias``,
      ``blocks/0/kernel``), layer ``fc{i}`` the ``i``-th called; every converter,
      checkpoint function and ``check_jax_port`` takes it as ``layout=``, and
      ``nnx.update(model, tree)`` takes the trees built in it.

    Raises:
      TypeError: ``model`` is not a ``flax.nnx.Module``.
      ValueError: a parameter outside its Linear layers, a forward that cannot be
        run on one batch, a Linear layer called twice or never, or widths that do
        not chain (each named).
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise type_error(f"nnx_layout reads a flax.nnx.Module, got {type(model).__name__}")
    linears = {
        id(node): _keys(path)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear)
    }
    shown = type(model).__name__
    if not linears:
        raise value_error(f"{shown} holds no nnx.Linear layer")
    owned = {path + (kind,) for path in linears.values() for kind in ("kernel", "bias")}
    others = [
        "/".join(map(str, path))
        for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if _keys(path) not in owned
    ]
    if others:
        raise value_error(
            f"{shown} has parameters outside its nnx.Linear layers: "
            f"{', '.join(map(repr, others[:4]))}{', ...' if len(others) > 4 else ''}; "
            "equiv's MLP has only the Linear layers' kernels and biases"
        )
    order = _called(model, nnx)
    called = [linears.get(key) for key in order]
    if sorted(map(str, called)) != sorted(map(str, linears.values())):
        listed = ", ".join("/".join(map(str, p)) for p in called if p is not None) or "none"
        raise value_error(
            f"{shown}'s __call__ calls its Linear layers as {listed}, not each of "
            f"{', '.join('/'.join(map(str, p)) for p in linears.values())} once: equiv's "
            "MLP calls each layer once, in order"
        )
    _check_widths(model, called, shown)
    index_keys = any(isinstance(key, int) for path in called for key in path)
    return Layout(
        name or shown,
        "{name}/kernel",
        "{name}/bias",
        transpose=True,
        index_keys=index_keys,
        layers=tuple("/".join(map(str, path)) for path in called),
    )


def _keys(path: tuple) -> tuple[str | int, ...]:
    return tuple(getattr(key, "key", key) for key in path)


def _called(model: Any, nnx: Any) -> list[int]:
    """The ids of ``model``'s Linear layers (its own objects') in the order its
    ``__call__`` calls them on a probe batch, run on a copy that shares its arrays
    (``nnx.split`` and ``merge``: the model's RNG state and modes are left as they
    are), in eval mode, with each Linear of the copy recording its call."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    copy.eval()  # dropout off, batch statistics fixed
    own = [id(node) for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)]
    layers = [node for _, node in nnx.iter_graph(copy) if isinstance(node, nnx.Linear)]
    twin = {id(node): original for node, original in zip(layers, own, strict=True)}
    calls: list[int] = []
    for node in layers:
        node.__class__ = _recording(type(node), calls)
    widths = dict.fromkeys(int(node.in_features) for node in layers)
    dtype = layers[0].kernel.get_value().dtype
    failures = []
    for width in widths:
        calls.clear()
        x = np.random.default_rng(0).standard_normal((2, width)).astype(dtype)
        try:
            copy(jax.numpy.asarray(x))
        except Exception as exc:  # noqa: BLE001 - another width, or a call equiv cannot make
            failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            continue
        return [twin[key] for key in calls]
    raise value_error(
        f"{type(model).__name__}'s __call__ cannot be run on one batch x of its layers' "
        f"input widths {tuple(widths)} ({failures[0]}), and equiv reads the order of its "
        f"Linear layers from that call: {_FORM}"
    )


def _recording(base: type, calls: list[int]) -> type:
    class Recording(base):  # type: ignore[misc, valid-type]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(id(self))
            return super().__call__(*args, **kwargs)

    return Recording


def _check_widths(model: Any, called: list[tuple], shown: str) -> None:
    def layer(path: tuple) -> Any:
        node = model
        for key in path:
            node = node[key] if isinstance(key, int) else getattr(node, key)
        return node

    for before, after in zip(called, called[1:], strict=False):
        gives, takes = int(layer(before).out_features), int(layer(after).in_features)
        if gives != takes:
            raise value_error(
                f"{shown}'s Linear {'/'.join(map(str, after))} takes {takes} inputs but "
                f"{'/'.join(map(str, before))}, called before it, gives {gives}: equiv's MLP "
                "calls each layer on the output of the one before it"
            )
