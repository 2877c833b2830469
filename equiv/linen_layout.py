"""The layout of a ``flax.linen`` port's own Dense layers, read off the calls it makes.

The ``"flax"`` layout names a port's layers ``Dense_0``, ``Dense_1``, ... in call order,
but linen numbers ``nn.Dense`` in the order it *constructs* them
(``nn.Dense(3)(f(nn.Dense(8)(x)))`` constructs the outer one first), names them
``layers_0``, ``layers_2`` in an ``nn.Sequential`` that interleaves functions, and
takes ``nn.Dense(name=...)``. :func:`linen_layout` reads the port's own names in the
order its ``__call__`` calls them on a probe batch (``nn.intercept_methods``), with
each gap of that call checked as :func:`equiv.nnx_layout` checks an nnx port's.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> class Port(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, x):
  ...         return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))  # Dense_0 is the outer one
  >>> params = Port().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  >>> linen_layout(Port(), params).layers
  ('Dense_1', 'Dense_0')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from equiv._messages import type_error, value_error
from equiv.convert import Layout
from equiv.nnx_layout import _check_stack, _Widths, refuse_others, run_on_probe


def linen_layout(module: Any, params: Any, *, name: str | None = None) -> Layout:
    """The :class:`~equiv.convert.Layout` of a ``flax.linen`` port's own Dense layers.

    Args:
      module: the ``flax.linen.Module`` whose ``__call__(x)`` calls each of its
        ``nn.Dense`` layers once (activations in between may be functions).
      params: its params (``variables["params"]``) or its variables dict.
      name: the layout's name, in messages and files (the module's class name by
        default).

    Returns:
      A layout whose paths are the port's own (``hidden/kernel``, ``Dense_1/bias``,
      ``layers_2/kernel``), layer ``fc{i}`` the ``i``-th called; every converter,
      checkpoint function and ``check_jax_port`` takes it as ``layout=``.

    Raises:
      TypeError: ``module`` is not a ``flax.linen.Module``, or ``params`` not a mapping.
      ValueError: a parameter outside its Dense layers, a call that cannot be run on
        one batch, a layer called twice or never, or a gap that is more than one of
        equiv's activations (each named).
    """
    import flax.linen as nn

    if not isinstance(module, nn.Module):
        raise type_error(f"linen_layout reads a flax.linen.Module, got {type(module).__name__}")
    if not isinstance(params, Mapping):
        raise type_error(f"params must be the module's params dict, got {type(params).__name__}")
    variables = dict(params) if "params" in params else {"params": params}
    shown = type(module).__name__
    flat = {
        tuple(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
    }
    dense = {path[:-1] for path in flat if path[-1] == "kernel"}
    if not dense:
        raise value_error(f"{shown}'s params hold no Dense layer (no 'kernel')")
    refuse_others(
        shown,
        "Dense",
        [
            "/".join(path)
            for path in flat
            if path[:-1] not in dense or path[-1] not in ("kernel", "bias")
        ],
    )
    calls: list[tuple[str, Any, Any]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            calls.append(("/".join(context.module.path), args[0], out))
        return out

    def run(x: Any) -> Any:
        calls.clear()
        with nn.intercept_methods(record):
            return module.apply(variables, x)

    widths = dict.fromkeys(int(flat[(*path, "kernel")].shape[0]) for path in dense)
    x, out = run_on_probe(
        shown,
        widths,
        next(iter(flat.values())).dtype,
        run,
        "give its __call__ one input batch x (deterministic, no mutable collections), or "
        "write a Layout with layers= naming them in call order",
    )
    order = [path for path, _, _ in calls]
    owned = sorted("/".join(path) for path in dense)
    if sorted(order) != owned:
        raise value_error(
            f"{shown}'s __call__ calls its Dense layers as {', '.join(order) or 'none'}, not "
            f"each of {', '.join(owned)} once: equiv's MLP calls each layer once, in order"
        )
    _check_stack(shown, x, [(p, _Widths(i, o), i, o) for p, i, o in calls], out)
    return Layout(
        name or shown, "{name}/kernel", "{name}/bias", transpose=True, layers=tuple(order)
    )
