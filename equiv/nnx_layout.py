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
        id(node): (_keys(path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear)
    }
    shown = type(model).__name__
    if not linears:
        raise value_error(f"{shown} holds no nnx.Linear layer")
    owned = {path + (kind,) for path, _ in linears.values() for kind in ("kernel", "bias")}
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
    x, calls, out = _probe(model, nnx)
    name_of = {key: "/".join(map(str, path)) for key, (path, _) in linears.items()}
    order = [name_of.get(key) for key, _, _ in calls]
    if None in order:
        raise value_error(
            f"{shown}'s __call__ calls a Linear layer through an nnx transform (nnx.jit, "
            "nnx.remat, nnx.vmap, ...), which calls a copy of it that equiv cannot tell "
            f"apart from the others: call the layers directly, or {_FORM}"
        )
    if sorted(order) != sorted(name_of.values()):
        raise value_error(
            f"{shown}'s __call__ calls its Linear layers as {', '.join(order) or 'none'}, "
            f"not each of {', '.join(name_of.values())} once: equiv's MLP calls each layer "
            "once, in order"
        )
    _check_stack(shown, x, [(name_of[key], linears[key][1], i, o) for key, i, o in calls], out)
    called = [linears[key][0] for key, _, _ in calls]
    index_keys = any(isinstance(key, int) for path in called for key in path)
    return Layout(
        name or shown,
        "{name}/kernel",
        "{name}/bias",
        transpose=True,
        index_keys=index_keys,
        layers=tuple(order),
    )


def _keys(path: tuple) -> tuple[str | int, ...]:
    return tuple(getattr(key, "key", key) for key in path)


#: How far a layer's input may be from an activation of the layer before's output
#: (or the model's output from the last layer's), relative to the largest value: the
#: same float ops in the model's dtype, where a forward that does more (a residual
#: connection, a branch, a scale, a norm) is off by O(1). As the torch converters'.
_MATCH = 1e-3


def _probe(model: Any, nnx: Any) -> tuple[Any, list[tuple[int, Any, Any]], Any]:
    """Run ``model`` on a probe batch; return the batch, each Linear call (the id of
    the model's own layer, its input and output) in order, and the model's output.

    The probe runs on a copy whose variables are new objects holding the same arrays
    (nothing is copied, and nothing the call updates, an RNG counter or batch
    statistics, reaches the model), in eval mode and with every Dropout's rate 0 (a
    call may pass ``deterministic=False`` itself)."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf, state))
    copy.eval()
    own = [id(node) for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)]
    nodes = list(nnx.iter_graph(copy))
    layers = [node for _, node in nodes if isinstance(node, nnx.Linear)]
    for _, node in nodes:
        if isinstance(node, nnx.Dropout):
            node.rate = 0.0
    twin = {id(node): original for node, original in zip(layers, own, strict=True)}
    calls: list[tuple[int, Any, Any]] = []
    for node in layers:
        node.__class__ = _recording(type(node), calls, twin)
    widths = dict.fromkeys(int(node.in_features) for node in layers)
    dtype = layers[0].kernel.get_value().dtype
    failures = []
    for width in widths:
        calls.clear()
        x = jax.numpy.asarray(np.random.default_rng(0).standard_normal((2, width)).astype(dtype))
        try:
            out = copy(x)
        except Exception as exc:  # noqa: BLE001 - another width, or a call equiv cannot make
            failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            continue
        return x, list(calls), out
    raise value_error(
        f"{type(model).__name__}'s __call__ cannot be run on one batch x of its layers' "
        f"input widths {tuple(widths)} ({failures[0]}), and equiv reads the order of its "
        f"Linear layers from that call: {_FORM}"
    )


def _recording(base: type, calls: list, twin: dict[int, int]) -> type:
    class Recording(base):  # type: ignore[misc, valid-type]
        def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            out = super().__call__(inputs, *args, **kwargs)
            calls.append((twin.get(id(self)), inputs, out))
            return out

    return Recording


def _check_stack(shown: str, x: Any, calls: list[tuple[str, Any, Any, Any]], out: Any) -> None:
    """Refuse a call that is not its Linear layers in turn with one of equiv's
    activations between consecutive ones: each layer's input the activation of the
    one before's output, the first's the batch, and the model's output the last's."""
    from equiv.activations import ACTIVATIONS
    from equiv.spec import MLPSpec

    def near(a: Any, b: Any) -> bool:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        scale = max(float(np.abs(b).max(initial=0.0)), 1e-30)
        return a.shape == b.shape and float(np.abs(a - b).max(initial=0.0)) <= _MATCH * scale

    defaults = MLPSpec((1, 1))
    names = [name for name, *_ in calls]
    for (before, layer, _, given), (after, nxt, taken, _) in zip(calls, calls[1:], strict=False):
        gives, takes = int(layer.out_features), int(nxt.in_features)
        if gives != takes:
            raise value_error(
                f"{shown}'s Linear {after} takes {takes} inputs but {before}, called before "
                f"it, gives {gives}: equiv's MLP calls each layer on the output of the one "
                "before it"
            )
        if not any(
            near(taken, act.jax_fn(given, act.param(defaults))) for act in ACTIVATIONS.values()
        ):
            raise value_error(
                f"{shown}'s Linear {after} is not called on an activation of {before}'s "
                "output (run on a probe batch: a residual connection, a branch, a norm or a "
                "scale between them?), and equiv's MLP is its Linear layers with one of its "
                f"activations between them. If the layers are {', '.join(names)} all the same, "
                "say so: equiv.Layout(name, '{name}/kernel', '{name}/bias', True, "
                f"layers={tuple(names)!r})"
            )
    if not near(calls[0][2], x):
        raise value_error(
            f"{shown}'s first Linear {names[0]} is not called on the input batch itself "
            "(run on a probe batch): equiv's MLP starts with a Linear layer"
        )
    if not near(out, calls[-1][3]):
        raise value_error(
            f"{shown}'s output is not its last Linear {names[-1]}'s (run on a probe batch): "
            "equiv's MLP ends with a Linear layer (put a final activation in the loss "
            "instead)"
        )
