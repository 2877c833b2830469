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

import contextlib
from typing import Any

import jax
import numpy as np

from equiv._messages import type_error, value_error
from equiv.convert import Layout, _as_torch
from equiv.from_module import _linears_in_float32, call_order_match

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
    return _read(model, name)[0]


def _read(model: Any, name: str | None = None) -> tuple[Layout, list[Any]]:
    """:func:`nnx_layout`'s layout and the model's ``nnx.Linear`` layers in call order."""
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
    if any(path == () for path, _ in linears.values()):  # found in review: "name ''"
        raise value_error(
            f"nnx_layout reads a model holding its nnx.Linear layers, each under a name; "
            f"this is a bare {shown}, which has none: hold it in a module "
            "(self.fc1 = nnx.Linear(...)) and pass that"
        )
    owned = {path + (kind,) for path, _ in linears.values() for kind in ("kernel", "bias")}
    refuse_others(
        shown,
        "nnx.Linear",
        [
            "/".join(map(str, path))
            for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if _keys(path) not in owned
        ],
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
    layout = Layout(
        name or shown,
        "{name}/kernel",
        "{name}/bias",
        transpose=True,
        index_keys=index_keys,
        layers=tuple(order),
    )
    return layout, [linears[key][1] for key, _, _ in calls]


def _keys(path: tuple) -> tuple[str | int, ...]:
    return tuple(getattr(key, "key", key) for key in path)


def refuse_others(shown: str, kind: str, others: list[str]) -> None:
    """Refuse, by name, a port's parameters outside its ``kind`` layers."""
    if others:
        raise value_error(
            f"{shown} has parameters outside its {kind} layers: "
            f"{', '.join(map(repr, others[:4]))}{', ...' if len(others) > 4 else ''}; "
            "equiv's MLP has only the Linear layers' kernels and biases"
        )


def run_on_probe(shown: str, widths: Any, dtype: Any, run: Any, advice: str) -> tuple[Any, Any]:
    """``(x, run(x))`` for the first of the layers' input ``widths`` whose probe batch
    ``x`` (:data:`_ROWS` rows, ``dtype``) the port can be run on, or a ``ValueError``
    saying why none could, with ``advice``."""
    failures = []
    for width in widths:
        x = jax.numpy.asarray(
            np.random.default_rng(0).standard_normal((_ROWS, width)).astype(dtype)
        )
        try:
            return x, run(x)
        except Exception as exc:  # noqa: BLE001 - another width, or a call equiv cannot make
            failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
    raise value_error(
        f"{shown}'s __call__ cannot be run on one batch x of its layers' input widths "
        f"{tuple(widths)} ({failures[0]}), and equiv reads the order of its layers from "
        f"that call: {advice}"
    )


#: Rows of the probe batch: enough that a unit's sign differs across them (with two
#: rows, a 4-1-2 model with another activation passed for 14 of 40 seeds; found in
#: review).
_ROWS = 16


def _probe(model: Any, nnx: Any, fill: Any = None) -> tuple[Any, list[tuple[int, Any, Any]], Any]:
    """Run ``model`` on a probe batch; return the batch, each Linear call (the id of
    the model's own layer, its input and output) in order, and the model's output.

    The probe runs on a copy whose variables are new objects holding the same arrays
    (nothing is copied, and nothing the call updates, an RNG counter or batch
    statistics, reaches the model), in eval mode and with every Dropout's rate 0 (a
    call may pass ``deterministic=False`` itself); ``fill``, a tree of its Params,
    goes into the copy first."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf, state))
    if fill is not None:
        nnx.update(copy, fill)
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

    def run(x: Any) -> Any:
        calls.clear()
        return copy(x)

    widths = dict.fromkeys(int(node.in_features) for node in layers)
    dtype = layers[0].kernel.get_value().dtype
    x, out = run_on_probe(type(model).__name__, widths, dtype, run, _FORM)
    return x, list(calls), out


def _recording(base: type, calls: list, twin: dict[int, int]) -> type:
    class Recording(base):  # type: ignore[misc, valid-type]
        def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            out = super().__call__(inputs, *args, **kwargs)
            calls.append((twin.get(id(self)), inputs, out))
            return out

    return Recording


#: How near an activation of one layer's output must come to the next layer's input to
#: say which activation the port applies (not only that it applies one): the same
#: function in the same dtype gives the same values to a rounding or two, where GELU's
#: tanh form is 1e-4 away from the exact one. A half-precision port's roundings are
#: :func:`~equiv.from_module.call_order_match`'s (GELU's two forms are one there).
_SAME = 1e-5


def _tolerances(*arrays: Any) -> tuple[float, float]:
    """How near two runs of one stack are in the narrowest dtype of ``arrays`` (the
    batch, the layers' outputs: a port may keep float32 parameters and compute in
    bfloat16, found in review), and :data:`_SAME` in it: a float32 or float64 port's
    own, a half-precision one's the larger match."""
    match = max(call_order_match(np.dtype(a.dtype).name) for a in arrays)
    return match, _SAME if match == call_order_match("float32") else match


def _near(a: Any, b: Any, within: float) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-30)
    return a.shape == b.shape and float(np.abs(a - b).max(initial=0.0)) <= within * scale


def _activations(given: Any, taken: Any, within: float) -> dict[str, float]:
    """Each of equiv's activations that maps ``given`` (a layer's output) to ``taken``
    (the next layer's input) within ``within``, with its parameter: a leaky_relu slope
    or an ELU alpha is fitted (least squares on the negative inputs, where both are
    linear in it), so ``leaky_relu(h, 0.2)`` is read as such."""
    from equiv.activations import ACTIVATIONS
    from equiv.spec import MLPSpec

    defaults = MLPSpec((1, 1))
    g = np.asarray(given, dtype=np.float64)
    t = np.asarray(taken, dtype=np.float64)
    found = {}
    for name, act in ACTIVATIONS.items():
        param = act.param(defaults)
        if act.param_field is not None and g.shape == t.shape:
            negative = g <= 0
            basis = np.where(negative, act.value(np, g, 1.0), 0.0)
            if float((basis * basis).sum()) > 0:
                param = float((basis * t).sum() / (basis * basis).sum())
        if _near(taken, act.jax_fn(jax.numpy.asarray(given), param), within):
            found[name] = param
    return found


def _check_stack(
    shown: str, x: Any, calls: list[tuple[str, Any, Any, Any]], out: Any
) -> list[dict[str, float]]:
    """Refuse a call that is not its Linear layers in turn with one of equiv's
    activations between consecutive ones: each layer's input an activation of the
    one before's output, the first's the batch, and the model's output the last's.
    Returns, for each gap, the activations that say which one it is (:data:`_SAME`)."""
    names = [name for name, *_ in calls]
    if not isinstance(out, jax.Array):
        raise value_error(
            f"{shown}'s __call__ returns a {type(out).__name__}, not an array: equiv's MLP "
            "returns its output alone (wrap the model in one that returns it)"
        )
    match, same = _tolerances(x, out, *(given for _, _, _, given in calls))
    gaps = []
    for (before, layer, _, given), (after, nxt, taken, _) in zip(calls, calls[1:], strict=False):
        gives, takes = int(layer.out_features), int(nxt.in_features)
        if gives != takes:
            raise value_error(
                f"{shown}'s Linear {after} takes {takes} inputs but {before}, called before "
                f"it, gives {gives}: equiv's MLP calls each layer on the output of the one "
                "before it"
            )
        if not _activations(given, taken, match):
            raise value_error(
                f"{shown}'s Linear {after} is not called on one of equiv's activations of "
                f"{before}'s output (run on a probe batch: a residual connection, a branch, "
                "a norm, a scale, or an activation equiv does not have, between them?), and "
                "equiv's MLP is its Linear layers with one of its activations between them. "
                f"If the layers are {', '.join(names)} all the same, say so: "
                "equiv.Layout(name, '{name}/kernel', '{name}/bias', True, "
                f"layers={tuple(names)!r})"
            )
        gaps.append(_activations(given, taken, same))
    if not _near(calls[0][2], x, match):
        raise value_error(
            f"{shown}'s first Linear {names[0]} is not called on the input batch itself "
            "(run on a probe batch): equiv's MLP starts with a Linear layer"
        )
    if not _near(out, calls[-1][3], match):
        raise value_error(
            f"{shown}'s output is not its last Linear {names[-1]}'s (run on a probe batch): "
            "equiv's MLP ends with a Linear layer (put a final activation in the loss "
            "instead)"
        )
    return gaps


def torch_to_nnx(module_or_state_dict: Any, model: Any, *, spec: Any = None) -> Any:
    """Fill a ``flax.nnx`` port's Linear layers with a torch MLP's parameters, in place.

    The port's layers are read as :func:`nnx_layout` reads them (its own names, in the
    order its ``__call__`` calls them), and the torch parameters must fit them layer by
    layer: the same shapes, a bias where the port has one and none where it has none,
    the same dtype. From a torch module, each activation the port applies between two
    layers (read off its probe call, a leaky_relu's slope and an ELU's alpha with it)
    must be the module's there. ``nnx.update`` alone installs arrays of any shape and
    leaves a bias the tree lacks as it was (found in a user trial: a 4-16-2 checkpoint
    went into a 4-8-8-2 port, and a port's bias the torch model lacked was kept).

    Args:
      module_or_state_dict: a torch Linear stack (any names) or a state_dict, as
        :func:`equiv.torch_to_jax` takes it.
      model: the ``flax.nnx.Module`` to fill.
      spec: the torch side's architecture, as for :func:`equiv.torch_to_jax`.

    Returns:
      ``model``, its Linear layers holding the torch parameters.

    Raises:
      TypeError: ``model`` is not a ``flax.nnx.Module``.
      ValueError: what :func:`nnx_layout` refuses, or the torch parameters or
        activations do not fit the port (every difference named).

    Example:
      >>> import jax, torch
      >>> from flax import nnx
      >>> class Port(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.body, self.head = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.head(jax.nn.tanh(self.body(x)))
      >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
      >>> port = torch_to_nnx(net, Port(nnx.Rngs(0)))
      >>> bool((port.head.bias[...] == net[2].bias.detach().numpy()).all())
      True
    """
    import torch
    from flax import nnx

    from equiv.convert import LAYOUTS, _state_dict, check_entries, module_spec, torch_to_jax

    layout, layers = _read(model)
    own = isinstance(module_or_state_dict, torch.nn.Module)
    state = _state_dict(module_or_state_dict)  # a module's own tensors, under equiv's names
    theirs = check_entries(
        {(n,): t for n, t in state.items()},
        LAYOUTS["torch"],
        spec if spec is not None else module_spec(module_or_state_dict),
        what="state_dict",
        from_model=own,
    )
    if theirs.num_layers != len(layers):
        raise value_error(
            f"the torch MLP {theirs.sizes} has {theirs.num_layers} Linear layers and "
            f"{type(model).__name__} {len(layers)} ({', '.join(layout.layers or ())}, in the "
            "order it calls them): they are different models"
        )
    tree = torch_to_jax(state, layout=layout, spec=theirs)
    rows = []
    for i, (name, layer) in enumerate(zip(layout.layers, layers, strict=True), start=1):
        kernel = _at(tree, layout.tree_path(f"fc{i}.weight"))
        ours = layer.kernel.get_value()
        where = f"  {name} (torch's fc{i}):"
        if tuple(kernel.shape) != tuple(ours.shape):
            rows.append(
                f"{where} kernel {tuple(ours.shape)} in the port, {tuple(kernel.shape)} from torch"
            )
        elif kernel.dtype != ours.dtype:
            rows.append(f"{where} {ours.dtype} in the port, {kernel.dtype} from torch")
        has = getattr(layer, "bias", None) is not None
        if has != (_at(tree, layout.tree_path(f"fc{i}.bias")) is not None):
            rows.append(
                f"{where} the port has a bias and torch's fc{i} none (build it with use_bias=False)"
                if has
                else f"{where} torch's fc{i} has a bias and the port none"
            )
    if not rows and own:
        rows = _output_rows(module_or_state_dict, model, tree, layout, nnx)
    if rows:
        raise value_error(
            f"the torch parameters do not fit {type(model).__name__}, layer by layer in the "
            "order it calls them:\n" + "\n".join(rows)
        )
    nnx.update(model, tree)
    return model


def _output_rows(module: Any, model: Any, tree: Any, layout: Layout, nnx: Any) -> list[str]:
    """Where the port, filled with the torch parameters (a copy of it), computes
    another output than the torch module on a probe batch: each gap whose activation
    tells them apart, or the output's difference alone. Found in review: comparing the
    activations the module registers left out gaps it leaves empty (an nn.Sequential of
    Linear layers into a tanh port), and reading the port's on its own weights let a
    shell of zeros match any."""

    from equiv.convert import module_spec
    from equiv.from_module import read_spec

    x, calls, out = _probe(model, nnx, fill=tree)
    shown = type(model).__name__
    named = {
        key: name for key, name in zip((k for k, _, _ in calls), layout.layers or (), strict=False)
    }
    gaps = _check_stack(shown, x, [(named[k], _Widths(i, o), i, o) for k, i, o in calls], out)
    match = _tolerances(x, out, *(o for _, _, o in calls))[0]
    apart = _torch_gaps_apart(module, x, calls, out, match)
    read = module_spec(module) or read_spec(module)
    rows = _activation_rows(read, layout, gaps, empty=False)  # GELU's two forms differ by
    if rows or apart is None:  # less than the match: named first
        return rows
    rows = _activation_rows(read, layout, gaps, empty=True)
    names = [named[k] for k, _, _ in calls]
    gap, worst = apart
    where = (
        "on its input batch"
        if gap == 0
        else f"after {names[-1]}"
        if gap == len(names)
        else f"between {names[gap - 1]} and {names[gap]}"
    )
    from equiv.from_module import _read_stack

    trailing = _read_stack(module, trainable=False, reorder=True)[3]
    if gap == len(names) and trailing is not None:
        # Found in review: a module ending in Softmax was told only of a difference.
        where += (
            f", where the torch module applies its final {type(trailing).__name__}, which "
            "the port does not (equiv's nnx port ends with its last Linear layer: fill it "
            "from the state_dict, or apply it in the loss)"
        )
    return rows or [
        f"  filled with them, it computes something else than the torch module {where}: "
        f"{worst:.3g} apart there on a probe batch"
    ]


def _torch_gaps_apart(
    module: Any, x: Any, calls: list[tuple[int, Any, Any]], out: Any, match: float
) -> tuple[int, float] | None:
    """The first gap (0: before the first layer; ``k``: after the ``k``-th; the last:
    after the last) where the torch module, given the port's own layer outputs, makes
    another input for its next layer (or output) than the port does, with how far apart
    (relative to the port's largest value there); None where every gap agrees within
    ``match``.

    Each torch Linear, in the order the module calls them, returns the port's output of
    that layer (a forward hook), so each gap is compared on its own, one operation: a
    whole forward compared end to end would carry each layer's rounding into the next,
    and a deep half-precision port was refused (found in review: 1 in 10 ten-layer
    bfloat16 GELU stacks). In half precision the module runs in float32, on the port's
    values exactly."""
    import torch

    from equiv.from_module import _probing, called_leaves

    linears = [m for _, m in called_leaves(module) or [] if isinstance(m, torch.nn.Linear)]
    if len(linears) != len(calls):
        return 0, float("inf")  # another stack than the port's: not one gap alike
    weight = linears[0].weight
    half = match > call_order_match("float32")
    wanted = torch.float32 if half else weight.dtype
    seen: list[Any] = []

    def given(layer: Any, args: tuple) -> None:
        seen.append(args[0])

    def replaced(k: int) -> Any:
        port_out = _as_torch(np.array(calls[k][2])).to(device=weight.device, dtype=wanted)
        return lambda layer, args, result: port_out

    hooks = [layer.register_forward_pre_hook(given) for layer in linears]
    hooks += [layer.register_forward_hook(replaced(k)) for k, layer in enumerate(linears)]
    wide = _linears_in_float32(module) if half else contextlib.nullcontext()
    try:
        with torch.no_grad(), _probing(module, weight.device), wide:
            probe = _as_torch(np.array(x)).to(device=weight.device, dtype=wanted)
            theirs = module(probe)
    finally:
        for hook in hooks:
            hook.remove()
    ports = [i for _, i, _ in calls] + [out]
    for k, (torch_side, port_side) in enumerate(zip([*seen, theirs], ports, strict=False)):
        a = torch_side.detach().cpu().double().numpy()
        b = np.asarray(port_side, np.float64)
        if not _near(a, b, match):
            worst = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
            return k, worst
    return None


class _Widths:
    """A layer's widths as :func:`_check_stack` reads them, from its call."""

    def __init__(self, given: Any, out: Any):
        self.in_features, self.out_features = given.shape[-1], out.shape[-1]


def _activation_rows(
    read: Any, layout: Layout, gaps: list[dict[str, float]], empty: bool
) -> list[str]:
    """Each gap whose activation the port (filled with torch's parameters) and the
    torch module's activation modules tell apart; with ``empty``, gaps the module
    leaves empty too (read as identity: it may call a function there, which is then
    named as a possibility)."""
    from equiv.activations import ACTIVATIONS

    rows = []
    names = layout.layers or ()
    for k, (theirs, found) in enumerate(zip(read.activations, gaps, strict=False)):
        if not found or (theirs == "identity" and not empty):
            continue  # none of equiv's exactly, or perhaps a function: the output says
        between = f"  between {names[k]} and {names[k + 1]}:"
        if theirs not in found:
            # The simplest name first: no activation reads as a leaky_relu of slope 1.
            first, param = min(
                found.items(), key=lambda kv: ACTIVATIONS[kv[0]].param_field is not None
            )
            field = ACTIVATIONS[first].param_field
            shown = f"{first} ({field} {param:.4g})" if field else first
            torch_side = (
                f"torch's module {theirs}"
                if theirs != "identity"
                else "torch's module none there (or a function it calls, which equiv cannot read)"
            )
            rows.append(f"{between} the port applies {shown}, {torch_side}")
            continue
        field = ACTIVATIONS[theirs].param_field
        if field is not None:
            want, got = float(getattr(read, field)), found[theirs]
            if abs(want - got) > 1e-3 * max(1.0, abs(want)):
                rows.append(
                    f"{between} {theirs} with {field} {got:.4g} in the port, {want:.4g} in torch"
                )
    return rows


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        if not hasattr(tree, "get"):
            return None
        tree = tree.get(key)
        if tree is None:
            return None
    return tree
