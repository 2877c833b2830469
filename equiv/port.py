"""Check your own port: a JAX loss function or a hand-written backward against torch.

You have a torch model and wrote its JAX version (or a backward pass by hand).
:func:`check_jax_port` converts the model's parameters, takes gradients of *your*
loss function with ``jax.grad``, runs the training step(s) with ``optax`` (plain
SGD, or the optimizer you name), and compares the loss, every gradient, every
updated parameter and the optimizer's state, leaf by leaf under torch's names, with
the torch model trained by ``torch.optim`` and with the float64 hand-derived
reference (the arbiter, which says which side is off).
:func:`check_manual_backward` does the same for ``(params, x, y) -> (loss, grads)``.
The model may be equiv's :class:`~equiv.TorchMLP` or any stack of ``nn.Linear``
layers and supported activations (:func:`equiv.mlp_from_module` reads it).

Batches: ``x`` and ``y`` are either one batch (arrays of shape (B, in) and
(B, out)), used for every one of ``steps`` steps, or two sequences of ``steps``
arrays, one batch per step.

Neither function changes your model: torch trains a deep copy, and every backend
starts from its own copy of the parameters.

Example (a Flax-layout port of a 4-3-2 ReLU MLP)::

    >>> import jax, jax.numpy as jnp, torch
    >>> from equiv import MLPSpec, TorchMLP
    >>> def loss_fn(params, x, y):
    ...     h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    ...     out = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    ...     return jnp.mean((out - y) ** 2)
    >>> _ = torch.manual_seed(0)
    >>> model = TorchMLP(MLPSpec((4, 3, 2)))
    >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
    >>> report = check_jax_port(model, loss_fn, x, y, learning_rate=0.1)
    >>> report.agree
    True
    >>> report.assert_agree()  # raises AssertionError with every failing leaf
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
import torch

from equiv import manual
from equiv._messages import type_error, value_error
from equiv.compare import to_numpy
from equiv.convert import (
    LINEN_ORDER,
    equinox_own_layout,
    get_layout,
    is_equinox_model,
    jax_to_torch,
    module_spec,
    torch_to_jax,
)
from equiv.devices import device_name, resolve_device, torch_device
from equiv.from_module import (
    check_named_call_order,
    forward_mismatch,
    mlp_from_module,
    own_names,
    refuse_frozen,
    registers_activations,
)
from equiv.gradcheck import GRAD_FN, unpack_grad_fn_result
from equiv.harness import (
    HAND_WRITTEN,
    REFERENCE,
    Comparison,
    Trajectory,
    compare_trajectories,
    jax_labels,
    resolve_optimizer,
    run_reference,
    train_torch_model,
    unjitted_replay,
)
from equiv.losses import LOSSES
from equiv.optimizers import (
    OptimizerSpec,
    is_plain_sgd,
    make_optax,
    manual_init,
    manual_update,
    optax_state_to_torch_names,
)
from equiv.precision import comparison_scope
from equiv.problem import Problem
from equiv.spec import MLPSpec, check_computable, check_spec
from equiv.torch_mlp import TORCH_DTYPES, TorchMLP, torch_mlp_with_params

#: The name your implementation carries in reports: a JAX port (check_jax_port).
PORT = "port"
# A hand-written backward is GRAD_FN, as in check_gradients: a researcher's NumPy
# backward read "port sums fc2's bias gradient ..." and asked what was ported (found
# in a user trial).

LossFn = Callable[[Any, Any, Any], Any]
GradFn = Callable[[Mapping[str, Any], Any, Any], tuple[Any, Mapping[str, Any]]]


def check_jax_port(
    model: torch.nn.Module,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    *,
    layout: str = "flax",
    learning_rate: float | None = None,
    steps: int = 1,
    params: Any = None,
    optimizer: OptimizerSpec | torch.optim.Optimizer | None = None,
    port_optimizer: optax.GradientTransformation | None = None,
    spec: MLPSpec | None = None,
    jit: bool = True,
    precision: str = "exact",
    rtol: float | None = None,
    atol: float | None = None,
    device: str | torch.device | jax.Device = "cpu",
) -> Comparison:
    """Compare your JAX loss function's loss, ``jax.grad`` gradients and optimizer
    updates (plain SGD, or ``optimizer``) with the torch model's and with the float64
    reference.

    Args:
      model: the torch model: an :class:`equiv.TorchMLP`; a stack of ``nn.Linear``
        layers and supported activations under any names (an ``nn.Sequential``,
        say), read by :func:`equiv.mlp_from_module` into a TorchMLP with the same
        parameters (its forward pass checked on a probe batch); or any module whose
        state_dict uses equiv's names (``fc1.weight``, ...) with ``spec`` given, whose
        arbiter is then the module itself run in float64 (autograd), since the
        hand-derived pass only knows equiv's MLP.
      loss_fn: your ``loss_fn(params, x, y) -> scalar``, params in ``layout``.
      x, y: one batch, or one batch per step (see the module docstring); torch
        tensors or NumPy arrays of the model's dtype.
      layout: the layout of your params: ``"flax"`` (``Dense_0.kernel`` (in, out)),
        ``"nnx"`` (``fc1.kernel`` (in, out)), ``"equinox"`` (``layers.0.weight``
        (out, in)), ``"torch"`` (the state_dict's names and shapes), or an
        :class:`equiv.convert.Layout` of your own; see :mod:`equiv.convert`.
      learning_rate: plain SGD's learning rate (0.1 when None) when ``optimizer`` is
        None; with an ``optimizer``, leave it out or give the optimizer's own.
      steps: how many training steps.
      params: your own conversion of the model's parameters (a JAX tree in
        ``layout``), to check it too; by default :func:`equiv.convert.torch_to_jax`.
      optimizer: an :class:`equiv.OptimizerSpec` (torch.optim's semantics) that torch,
        the reference and, by default, your port use, or a fresh ``torch.optim`` SGD,
        Adam or AdamW to read it from (:meth:`~equiv.OptimizerSpec.from_torch`); plain
        SGD when None.
      port_optimizer: your own optax transformation for your port, to check it too;
        by default :func:`equiv.optimizers.make_optax` of ``optimizer``.
      spec: the architecture; read from a TorchMLP or a Linear stack (give it to set
        the loss: its sizes, activations and bias must match the module's).
      jit: whether to ``jax.jit`` your ``value_and_grad``.
      precision: ``"exact"`` (IEEE float32 matmuls in a scope) or ``"native"``.
      rtol, atol: fixed tolerances, both or neither (default: derived).
      device: where the torch model trains and your port runs (``"cpu"``,
        ``"cuda:N"``/``"gpu:N"``: both frameworks must see it); the float64 reference
        runs on the CPU. Recorded in the report's settings.

    Returns:
      A :class:`equiv.harness.Comparison` of ``"torch"``, ``"port"`` and
      ``"reference"``: ``agree``, ``assert_agree()``, ``to_dict()``, ``report``.

    Raises:
      ValueError: bad batches, layout, steps or learning rate.
      TypeError: a model without a spec.
    """
    if port_optimizer is not None and optimizer is None and learning_rate is None:
        raise value_error(
            "port_optimizer is your port's optimizer; say what torch and the reference run "
            "too: optimizer=equiv.OptimizerSpec(...) with its torch.optim settings, or "
            "learning_rate= for plain SGD (without either they would train with SGD at 0.1, "
            "whatever your port_optimizer does)"
        )
    optimizer = _optimizer_of(optimizer, model)
    learning_rate = _learning_rate(learning_rate, optimizer)
    assumed = _loss_assumed(model, spec)
    model, spec = _as_mlp(model, spec)
    spec, problem = _problem(model, x, y, steps, spec, learning_rate)
    get_layout(layout)
    if _nnx_module(params) and get_layout(layout) == get_layout("flax"):  # the default
        from equiv.nnx_layout import nnx_layout  # noqa: PLC0415 - an optional extra

        layout = nnx_layout(params)  # the report names it (found in review: "flax")
    if not callable(loss_fn):
        raise type_error(f"loss_fn must be callable as loss_fn(params, x, y), got {loss_fn!r}")
    if optimizer is not None and not isinstance(optimizer, OptimizerSpec):
        raise type_error(
            f"optimizer must be an equiv.OptimizerSpec or a torch.optim SGD, Adam or AdamW "
            f"(torch.optim's semantics, used by torch "
            f"and the reference), got {type(optimizer).__name__}; pass your own optax "
            "transformation as port_optimizer="
        )
    optimizer = resolve_optimizer(optimizer, learning_rate)
    device = device_name(device)  # a torch or JAX device too; the report records its name
    torch_device, jax_device = resolve_device(device)  # a missing GPU fails here, said so
    with comparison_scope(spec.dtype, precision) as settings:
        trajectories = {
            "torch": run_torch_model(
                model, problem, optimizer.learning_rate, optimizer=optimizer, device=torch_device
            ),
            PORT: run_jax_port(
                problem,
                loss_fn,
                layout,
                optimizer.learning_rate,
                params=params,
                optimizer=port_optimizer or make_optax(optimizer),
                jit=jit,
                state_spec=optimizer,
                device=jax_device,
            ),
            REFERENCE: _run_arbiter(model, problem, optimizer),
        }
    return _comparison(
        problem,
        optimizer.learning_rate,
        trajectories,
        settings,
        model,
        rtol,
        atol,
        port=f"jax loss_fn, {get_layout(layout).name} layout",
        optimizer=optimizer,
        device=device,
        loss_assumed=assumed,
        port_optimizer=(
            "your own (port_optimizer=)"
            if port_optimizer is not None
            else f"equiv.optimizers.make_optax({optimizer.name!r} spec)"
        ),
    )


def check_manual_backward(
    model: torch.nn.Module,
    grad_fn: GradFn,
    x: Any,
    y: Any,
    *,
    learning_rate: float | None = None,
    steps: int = 1,
    optimizer: OptimizerSpec | torch.optim.Optimizer | None = None,
    arrays: str = "numpy",
    spec: MLPSpec | None = None,
    precision: str = "exact",
    rtol: float | None = None,
    atol: float | None = None,
    device: str | torch.device | jax.Device = "cpu",
) -> Comparison:
    """Compare your hand-written ``grad_fn(params, x, y) -> (loss, grads)`` with the
    torch model and the float64 reference, over ``steps`` optimizer steps.

    ``params`` and ``grads`` are dicts under torch's names (``fc1.weight`` of shape
    (out, in), ...). Your function receives NumPy arrays (``arrays="numpy"``) or
    torch tensors (``arrays="torch"``) in the model's dtype, and may return NumPy
    arrays, torch tensors or JAX arrays. The update is applied for you: plain SGD
    ``p - learning_rate · g`` (0.1 when None), or ``optimizer`` (an
    :class:`equiv.OptimizerSpec`, by the hand-written update
    :func:`equiv.optimizers.manual_update`, rounded as ``torch.optim`` rounds it
    for torch tensors), whose state is compared too. ``model`` and ``spec`` are read
    as in :func:`check_jax_port`. ``device`` (``"cpu"``, ``"cuda:N"``) is where the
    torch model trains and where your function's torch tensors are (``arrays="torch"``;
    NumPy arrays are on the CPU); the float64 reference runs on the CPU. Reports
    name your function ``grad_fn`` (``grad_fn vs torch``).

    Example:
      >>> import torch
      >>> from equiv import MLPSpec, TorchMLP, manual
      >>> spec = MLPSpec((4, 3, 2))
      >>> _ = torch.manual_seed(0)
      >>> model = TorchMLP(spec)
      >>> def grad_fn(params, x, y):
      ...     return manual.loss_and_grads(params, x, y, spec)
      >>> check_manual_backward(model, grad_fn, torch.randn(8, 4), torch.randn(8, 2)).agree
      True
    """
    optimizer = _optimizer_of(optimizer, model)
    learning_rate = _learning_rate(learning_rate, optimizer)
    assumed = _loss_assumed(model, spec)
    model, spec = _as_mlp(model, spec)
    spec, problem = _problem(model, x, y, steps, spec, learning_rate)
    if optimizer is not None and not isinstance(optimizer, OptimizerSpec):
        raise type_error(
            f"optimizer must be an equiv.OptimizerSpec or a torch.optim SGD, Adam or AdamW, "
            f"got {type(optimizer).__name__}"
        )
    optimizer = resolve_optimizer(optimizer, learning_rate)
    if arrays not in ("numpy", "torch"):
        raise value_error(f"arrays must be 'numpy' or 'torch', got {arrays!r}")
    if not callable(grad_fn):
        raise type_error(f"grad_fn must be callable as grad_fn(params, x, y), got {grad_fn!r}")
    device = device_name(device)  # a torch or JAX device too; the report records its name
    on = torch_device(device)  # a missing GPU fails here, said so
    with comparison_scope(spec.dtype, precision) as settings:
        trajectories = {
            "torch": run_torch_model(model, problem, learning_rate, optimizer=optimizer, device=on),
            GRAD_FN: run_manual_port(
                problem, grad_fn, learning_rate, arrays=arrays, optimizer=optimizer, device=on
            ),
            REFERENCE: _run_arbiter(model, problem, optimizer),
        }
    return _comparison(
        problem,
        learning_rate,
        trajectories,
        settings,
        model,
        rtol,
        atol,
        port=f"{HAND_WRITTEN} on {arrays}",
        optimizer=optimizer,
        device=device,
        loss_assumed=assumed,
    )


def run_jax_port(
    problem: Problem,
    loss_fn: LossFn,
    layout: str,
    learning_rate: float,
    *,
    params: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    jit: bool = True,
    name: str = PORT,
    state_spec: OptimizerSpec | None = None,
    device: jax.Device | None = None,
) -> Trajectory:
    """Your loss function under ``jax.value_and_grad`` and optax, as a :class:`Trajectory`
    (gradients and parameters converted back to torch names).

    The trajectory carries the problem's dtype, so a port that silently computes
    in float32 is held to float64's bound and fails. With ``state_spec``, the optax
    state is recorded under torch's names too
    (:func:`equiv.optimizers.optax_state_to_torch_names`) when it holds the moments
    that optimizer keeps; otherwise no state is recorded, and ``state_note`` of the
    trajectory says why (the report's ``settings["state_not_compared"]``).
    """
    spec = problem.spec
    given = params is not None
    if not given:
        params = torch_to_jax(problem.params, layout=layout, spec=spec, device=device)
    elif device is not None:  # the caller's arrays, where the port runs (no copy if there)
        params = jax.tree.map(
            lambda v: jax.device_put(v, device) if isinstance(v, (jax.Array, np.ndarray)) else v,
            params,
        )
    params, loss_fn, to_torch, from_torch, own = _port_tree(params, loss_fn, layout, spec)
    optimizer = optimizer if optimizer is not None else optax.sgd(learning_rate)
    out = Trajectory(name, spec.dtype, layout=get_layout(layout).name)
    if get_layout(layout).name != "torch":
        out.own_names = own or get_layout(layout)
    if given:  # checked before optax sees it: a wrong tree failed inside optimizer.init
        out.initial = {k: to_numpy(v) for k, v in to_torch(params).items()}
    value_and_grad = jax.value_and_grad(loss_fn)
    state = optimizer.init(params)
    if jit:
        # The replay runs where the port ran (found in review: on JAX's default device,
        # so a hint would have put a device difference down to compilation).
        def on_device(state: dict[str, torch.Tensor]) -> Any:
            tree = from_torch(state)
            return tree if device is None else jax.device_put(tree, device)

        out.unjitted = unjitted_replay(value_and_grad, on_device, to_torch, device)
        value_and_grad = jax.jit(value_and_grad)
    for x, y in problem.batches:
        try:
            batch = jax.device_put((x.numpy(), jax_labels(y)), device)
            loss, grads = value_and_grad(params, *batch)
        except Exception as error:
            # Flax's own errors (ScopeParamNotFoundError: a linen model whose names are
            # not the layout's) derive from Exception only (found in a user trial).
            ours = (TypeError, KeyError, ValueError, IndexError)
            if not (isinstance(error, ours) or type(error).__module__.startswith("flax")):
                raise
            raise value_error(_loss_fn_failure(error, layout, params)) from error
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.record(
            loss,
            to_torch(grads),
            to_torch(params),
            _torch_named_state(state_spec, state, to_torch, out),
        )
    return out


def _loss_fn_failure(error: Exception, layout: str, params: Any) -> str:
    """What went wrong in the caller's ``loss_fn`` and what to do, by the kind of error:
    a branch on a traced value, an output that is not a scalar, a shape mismatch, or a
    key the tree lacks (the tree's keys and shapes are listed for every kind)."""
    text, known = str(error).strip(), get_layout(layout)
    said = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(":. ")
    if isinstance(error, jax.errors.TracerArrayConversionError):
        advice = (
            "It hands a traced array to NumPy (np.* or np.asarray inside loss_fn), which "
            "cannot trace it: use jax.numpy (jnp) there"
        )
    elif isinstance(error, jax.errors.ConcretizationTypeError):
        advice = (
            "It branches in Python on a traced value (if or bool() on an array), which "
            "jax.jit cannot do: pass jit=False to run it eagerly, or branch with "
            "jnp.where or jax.lax.cond"
        )
    elif type(error).__name__ == "TraceContextError":
        # Found in review: a flax.nnx port in training mode, its Dropout drawing from its
        # Rngs inside jax.grad, was told about the tree's keys.
        advice = (
            "The model changes its own state inside loss_fn (an nnx.Dropout in training "
            "mode draws from its Rngs, a BatchNorm updates its statistics), which jax.grad "
            "cannot trace: call port.eval() first, as the torch model compares in "
            "model.eval(), or pass deterministic=True where loss_fn calls it"
        )
    elif type(error).__name__ == "ScopeParamNotFoundError" and known.layers is None:
        # Found in a user trial: a linen model of nn.Dense(name="hidden") layers, checked
        # in the flax layout (Dense_0, ...), was given no way forward.
        advice = (
            "Your model names its layers itself (nn.Dense(name=...)), not Dense_0, Dense_1, "
            "...: pass layout=equiv.linen_layout(module, params), which reads its names in "
            "the order it calls them (or an equiv.Layout('mine', '{name}/kernel', "
            "'{name}/bias', True, layers=(...)) naming them so)"
        )
    elif "scalar-output" in text and "Output was (" in text:
        # Found in a user trial: a (loss, aux) pair was told to reduce over the batch.
        advice = (
            "It returns a tuple, such as (loss, aux): return the loss alone, for example "
            "check with lambda params, x, y: loss_fn(params, x, y)[0]"
        )
    elif "scalar-output" in text:
        advice = (
            "It must return a scalar: reduce the loss over the batch as the torch model's "
            "loss does (a mean for MSELoss)"
        )
    elif type(error).__name__ == "ScopeParamShapeError":
        advice = (
            "Your flax.linen model's layers take other shapes than the params' (Dense_j: "
            f"the j-th layer called); if its layers are the model's, their order differs. "
            f"{LINEN_ORDER}"
        )
    elif isinstance(error, TypeError) and "shape" in text:
        order = "(in, out)" if known.transpose else "(out, in)"
        advice = f"A shape does not fit: the {known.name!r} layout's weights are {order}"
        if known.name == "nnx":
            # Found in a user trial: attributes proj, hid, mix merged out of call order.
            advice += (
                "; and nnx.merge pairs the state's arrays with the model's in the sorted "
                "order of their keys, not by name: a model whose Linear attributes are not "
                "fc1, fc2, ... in call order takes them in another order. Name them so, or "
                "keep your names and pass layout=equiv.nnx_layout(model), read off the "
                "order it calls them (or params=model itself)"
            )
    else:
        advice = "Its params are a tree of the layout's keys"
    shapes = "; ".join(
        f"{jax.tree_util.keystr(path, simple=True, separator='.')} {tuple(np.shape(leaf))}"
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    )
    return (
        f"your loss_fn(params, x, y) failed: {said}. {advice}. Its params, in the "
        f"{known.name!r} layout: {shapes}"
    )


def _port_tree(params: Any, loss_fn: LossFn, layout: str, spec: MLPSpec):
    """``(the tree differentiated, the loss over it, tree -> torch names, torch names
    -> tree, the port's own names where its layout's are not them)`` for a port's
    params: a tree in ``layout``, or an Equinox model (an
    ``eqx.nn.MLP``, say) whose ``loss_fn(model, x, y)`` takes the model itself: its
    arrays are differentiated (``eqx.partition``) and the model rebuilt around them
    for each call (found in a user trial: a model passed as params failed inside
    optax, ``zeros_like requires ndarray``). A ``flax.nnx`` model likewise: its
    ``nnx.Param`` state is differentiated, in the layout :func:`equiv.nnx_layout` reads
    unless one is given, and ``loss_fn(model, x, y)`` receives the model merged from it
    and the rest of its state (found in a user trial: a model with an ``nnx.Dropout``
    failed inside ``jax.grad`` on its RNG state, reported as the loss_fn's failure)."""
    if _nnx_module(params):
        from flax import nnx  # noqa: PLC0415 - an optional extra

        graphdef, state, rest = nnx.split(params, nnx.Param, ...)

        def module_loss(tree, x, y):
            return loss_fn(nnx.merge(graphdef, tree, rest), x, y)

        return (
            nnx.to_pure_dict(state),
            module_loss,
            lambda tree: jax_to_torch(tree, layout=layout, spec=spec),
            lambda torch_state: torch_to_jax(torch_state, layout=layout, spec=spec),
            None,
        )
    if is_equinox_model(params):
        import equinox as eqx  # noqa: PLC0415 - an optional extra

        from equiv.convert import (  # noqa: PLC0415
            _at_path,
            _equinox_paths,
            equinox_to_torch,
            torch_to_equinox,
        )

        if get_layout(layout).name != "equinox":
            raise value_error(
                f"params is an Equinox {type(params).__name__}, which holds its weights "
                f"(out, in) as equinox does, but layout={layout!r}: pass layout='equinox'"
            )
        try:
            # Read once, off the model itself: its partitions and gradients hold None
            # for every function and cannot be called (found in review: an
            # eqx.nn.Sequential with a Lambda failed at every step).
            paths = _equinox_paths(params)
        except TypeError as error:
            raise type_error(
                f"params is an Equinox {type(params).__name__} whose Linear layers equiv "
                f"cannot read: {str(error).removeprefix('[equiv] ')}; or pass a dict in the "
                "equinox layout ({'layers': {'0': {'weight', 'bias'}}})"
            ) from None
        model = params
        arrays, static = eqx.partition(model, eqx.is_array)

        def model_loss(tree, x, y):
            return loss_fn(eqx.combine(tree, static), x, y)

        def filled(state):
            layers = torch_to_equinox(state, [_at_path(model, p) for p in paths], spec=spec)
            where = lambda m: [_at_path(m, p) for p in paths]  # noqa: E731
            return eqx.partition(eqx.tree_at(where, model, layers), eqx.is_array)[0]

        return (
            arrays,
            model_loss,
            lambda tree: equinox_to_torch([_at_path(tree, p) for p in paths], spec=spec),
            filled,
            equinox_own_layout(model, paths),  # the paths read once, not probed again
        )
    return (
        params,
        loss_fn,
        lambda tree: jax_to_torch(tree, layout=layout, spec=spec),
        lambda state: torch_to_jax(state, layout=layout, spec=spec),
        None,
    )


def _nnx_module(value: Any) -> bool:
    nnx = getattr(sys.modules.get("flax"), "nnx", None)
    return nnx is not None and isinstance(value, nnx.Module)


def _torch_named_state(state_spec, state, to_torch, out: Trajectory) -> dict | None:
    """The optax state under torch's names, or None where it does not hold
    ``state_spec``'s moments (a chain of your own may keep others, or none, or keep them
    in another dtype: ``mu_dtype=jnp.bfloat16``), said in ``out.state_note``."""
    if state_spec is None or not state_spec.state_names:
        return None
    try:
        return optax_state_to_torch_names(state_spec, state, to_torch)
    except ValueError as error:
        lines = str(error).removeprefix("[equiv] ").splitlines()
        reason = " ".join(line.strip() for line in lines[:2])
        reason += f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        out.state_note = f"its optax state is not compared with {state_spec.name}'s: {reason}"
        return None


def run_manual_port(
    problem: Problem,
    grad_fn: GradFn,
    learning_rate: float,
    *,
    arrays: str = "numpy",
    name: str = GRAD_FN,
    optimizer: OptimizerSpec | None = None,
    device: torch.device | str = "cpu",
) -> Trajectory:
    """Your ``grad_fn`` and the update (plain SGD at ``learning_rate``, or the
    hand-written ``optimizer``), as a :class:`Trajectory`; torch tensors on ``device``."""
    spec = problem.spec

    def convert(t: torch.Tensor) -> Any:
        return t.detach().to(device, copy=True) if arrays == "torch" else t.numpy().copy()

    params = {k: convert(v) for k, v in problem.params.items()}
    optimizer = resolve_optimizer(optimizer, learning_rate)
    state = manual_init(optimizer, params)
    out = Trajectory(name, spec.dtype)
    for step, (x, y) in enumerate(problem.batches, start=1):
        result = grad_fn(params, convert(x), convert(y))
        refuse_absent_biases(result, spec)
        loss, grads = unpack_grad_fn_result(result, params)
        grads = {k: _like(grads[k], params[k]) for k in params}
        if is_plain_sgd(optimizer):
            params = manual.sgd_update(params, grads, optimizer.learning_rate)
        else:
            params, state = manual_update(optimizer, params, grads, state, step)
        out.record(loss, grads, params, state or None)
    return out


def refuse_absent_biases(result: Any, spec: MLPSpec) -> None:
    """A ``ValueError`` naming the gradients ``grad_fn`` returned for biases the model
    does not have: a backward written for a bias on every layer, where a spec with one
    bool per layer (``bias=(True, False)``) has some without. (With one bool for every
    layer, :func:`equiv.gradcheck.unpack_grad_fn_result` names the keys, as it did.)

    >>> spec = MLPSpec((4, 8, 2), bias=(True, False))
    >>> refuse_absent_biases((0.0, {"fc2.bias": 0.0}), spec)
    Traceback (most recent call last):
    ...
    ValueError: [equiv] grad_fn returned a gradient for fc2.bias, but fc2 has no bias (...
    """
    grads = result[1] if isinstance(result, tuple | list) and len(result) == 2 else None
    if isinstance(spec.bias, bool) or not isinstance(grads, Mapping):
        return  # unpack_grad_fn_result says what is wrong with it
    absent = [i for i, has in enumerate(spec.biases, start=1) if not has and f"fc{i}.bias" in grads]
    if absent:
        names = ", ".join(f"fc{i}.bias" for i in absent)
        layers = " and ".join(f"fc{i}" for i in absent)
        raise value_error(
            f"grad_fn returned a gradient for {names}, but {layers} "
            f"{'has' if len(absent) == 1 else 'have'} no bias (the model has "
            f"{spec.describe_bias()}): leave {'it' if len(absent) == 1 else 'them'} out of the "
            "forward pass (z = h Wᵀ there) and out of grads"
        )


def run_torch_model(
    model: torch.nn.Module,
    problem: Problem,
    learning_rate: float,
    dtype: torch.dtype | None = None,
    name: str = "torch",
    optimizer: OptimizerSpec | None = None,
    device: torch.device | str = "cpu",
) -> Trajectory:
    """A deep copy of ``model`` trained by ``torch.optim`` (plain SGD at
    ``learning_rate`` unless ``optimizer`` says otherwise) on ``device``, optionally
    cast to ``dtype``."""
    model = copy.deepcopy(model).to(device)
    if dtype is not None:
        model = model.to(dtype)
    return train_torch_model(
        model,
        problem,
        resolve_optimizer(optimizer, learning_rate),
        name=name,
        dtype=dtype,
        device=device,
    )


def _run_arbiter(model: torch.nn.Module, problem: Problem, optimizer: OptimizerSpec) -> Trajectory:
    if isinstance(model, TorchMLP):
        return run_reference(problem, optimizer.learning_rate, optimizer=optimizer)
    return run_torch_model(
        model,
        problem,
        optimizer.learning_rate,
        dtype=torch.float64,
        name=REFERENCE,
        optimizer=optimizer,
    )


def _comparison(
    problem,
    learning_rate,
    trajectories,
    settings,
    model,
    rtol,
    atol,
    port,
    optimizer=None,
    device="cpu",
    loss_assumed=False,
    port_optimizer=None,
):
    report = compare_trajectories(
        problem,
        trajectories,
        learning_rate=learning_rate,
        rtol=rtol,
        atol=atol,
        kinks=isinstance(model, TorchMLP),
        propagate=isinstance(model, TorchMLP),
        optimizer=optimizer,
    )
    arbiter = "hand-derived float64" if isinstance(model, TorchMLP) else "torch model in float64"
    report.settings.update(
        {
            "dtype": problem.spec.dtype,
            "device": device,
            **settings,
            "port": port,
            **({"port_optimizer": port_optimizer} if port_optimizer else {}),
            "arbiter": arbiter,
        }
    )
    if loss_assumed:
        # Read by Comparison.hints: a port of another loss is told so, not just blamed.
        report.settings["loss_assumed"] = True
    return Comparison(problem, float(learning_rate), trajectories, report, optimizer)


#: The fields of a spec that describe its loss rather than its layers.
_LOSS_FIELDS = ("loss", "label_smoothing", "huber_delta", "smooth_l1_beta")


def _optimizer_of(optimizer: Any, model: Any) -> Any:
    """A ``torch.optim`` optimizer as its spec (:meth:`equiv.OptimizerSpec.from_torch`),
    refused where its parameters are not ``model``'s (found in review: an optimizer
    over another model, or a part of this one, was taken as it was)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if isinstance(model, torch.nn.Module):
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        own = {id(p) for p in model.parameters()}
        if held != own:
            raise value_error(
                f"the {type(optimizer).__name__} holds {len(held & own)} of the model's "
                f"{len(own)} parameters and {len(held - own)} others: build it on "
                "model.parameters()"
            )
    return OptimizerSpec.from_torch(optimizer)


def _learning_rate(learning_rate: float | None, optimizer: OptimizerSpec | None) -> float:
    """Plain SGD's learning rate (0.1 by default); with an optimizer, its own."""
    if not isinstance(optimizer, OptimizerSpec):  # None, or refused by the caller's check
        return 0.1 if learning_rate is None else learning_rate
    own = optimizer.learning_rate
    # A float32 rate (a torch optimizer's tensor lr, read at the value torch steps
    # with) is the same as any number that rounds to it: lr=torch.tensor(1e-3) beside
    # learning_rate=1e-3 was refused as a contradiction (found in a user trial).
    in_float32 = float(np.float32(own)) == own
    if learning_rate is None or learning_rate == own:
        return own
    if in_float32 and float(np.float32(learning_rate)) == own:
        return own
    shown = repr(own)
    if in_float32 and str(np.float32(own)) != shown:  # 0.001 in float32, not 0.5
        shown = f"{np.float32(own)!s} in float32 ({own!r})"
    raise value_error(
        f"learning_rate={learning_rate!r} but the optimizer's is {shown}; the optimizer's "
        "is the one used: leave learning_rate out or make them the same"
    )


def _loss_assumed(model: Any, spec: MLPSpec | None) -> bool:
    """Whether the loss is MSE because nothing said otherwise: no ``spec``, and a module
    that cannot say its loss (any but equiv's own, which carries a spec). Found in a
    user trial: a Huber port of an ``nn.Sequential`` was blamed with no hint."""
    return spec is None and isinstance(model, torch.nn.Module) and module_spec(model) is None


def _as_mlp(model: Any, spec: MLPSpec | None) -> tuple[Any, MLPSpec | None]:
    """``model`` as it is when it is a TorchMLP or already uses equiv's names with
    ``spec`` given; a Linear stack under other names read into a TorchMLP with the
    same parameters (:func:`equiv.mlp_from_module`), so that the hand-derived float64
    pass arbitrates. A given ``spec`` then sets the loss; its structure must match."""
    if spec is not None:
        check_spec(spec)
    if not isinstance(model, torch.nn.Module) or isinstance(model, TorchMLP):
        return model, spec
    if module_spec(model) is not None:
        return model, spec
    if spec is not None:
        refuse_frozen(model)  # the check trains every parameter
    if spec is not None and set(model.state_dict()) == set(spec.param_names()):
        # equiv's names already: the spec says what the forward pass computes, and is
        # checked against it (a ReLU module given a tanh spec was accepted silently).
        check_named_call_order(model)  # names in another order than the calls: said so
        params = {k: v.detach() for k, v in model.state_dict().items()}
        mismatch = forward_mismatch(model, spec, params, names=spec.param_names())
        if mismatch:
            # Leaving the spec out reads the module's activation submodules; with none
            # (F.relu in forward) that advice went in a circle (found in a user trial).
            registered = registers_activations(model)
            raise value_error(
                f"spec does not describe {type(model).__name__}: run on a float64 probe "
                f"batch beside the spec's MLP with its parameters, {mismatch}. Fix the "
                f"spec (activations {spec.activations}, {spec.describe_bias()})"
                + (
                    ", or leave it out to read the module"
                    if registered
                    else ": its forward calls its activations as functions, so the spec "
                    "is all that says which they are"
                )
            )
        return model, spec
    if spec is not None and not registers_activations(model):
        # Activations called as functions (F.gelu): the spec says which they are, the
        # forward's calls say the layers' order (own_names), and the two are checked
        # against the forward (found in a user trial: such a module could not be
        # checked under names other than fc1, fc2, ...).
        mine = {equiv: theirs for theirs, equiv in own_names(model).items()}
        state = model.state_dict()
        params = {
            name: state[mine[name]].detach().clone() for name in spec.param_names() if name in mine
        }
        if set(params) == set(spec.param_names()):
            names = [mine[name] for name in spec.param_names()]
            mismatch = forward_mismatch(model, spec, params, names=names)
            if mismatch:
                raise value_error(
                    f"spec does not describe {type(model).__name__}: run on a float64 probe "
                    f"batch beside the spec's MLP with its parameters, {mismatch}. Fix the "
                    f"spec (activations {spec.activations}, {spec.describe_bias()}): its forward "
                    "calls its activations as functions, so the spec is all that says "
                    "which they are"
                )
            return torch_mlp_with_params(spec, params), spec
    read, params = mlp_from_module(model)
    if spec is not None:
        # The spec sets the loss; everything else is the module's and must agree.
        loss = {field: getattr(spec, field) for field in _LOSS_FIELDS}
        # Per layer: bias=True and (True, True) are one model.
        differs = [
            f"{field}: the module has {getattr(read, field)!r}, spec says {getattr(spec, field)!r}"
            if field != "biases"
            else f"bias: the module has {read.describe_bias()}, spec says {spec.describe_bias()}"
            for field in ("sizes", "activations", "biases", "dtype", "negative_slope", "elu_alpha")
            if getattr(read, field) != getattr(spec, field)
        ]
        if differs:
            raise value_error(
                f"spec does not describe {type(model).__name__}: {'; '.join(differs)}. Leave "
                "spec out to read it from the module, or fix it"
            )
        read = read.replace(**loss)
    return torch_mlp_with_params(read, params), read


def _problem(model, x, y, steps, spec, learning_rate) -> tuple[MLPSpec, Problem]:
    if not isinstance(model, torch.nn.Module):
        raise type_error(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if spec is None:
        spec = module_spec(model)
    if not isinstance(spec, MLPSpec):
        raise type_error(
            f"cannot tell the architecture of {type(model).__name__}; pass "
            "spec=MLPSpec(sizes=(...), bias=..., dtype=...)"
        )
    check_computable(spec, "a port check")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise value_error(f"steps must be an int of at least 1, got {steps!r}")
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise value_error(f"learning_rate must be a positive number, got {learning_rate!r}")
    dtype = TORCH_DTYPES[spec.dtype]
    xs, ys = _per_step("x", x, steps), _per_step("y", y, steps)
    labels = LOSSES[spec.loss].targets == "labels"

    def named(what: str, given: Any, i: int) -> str:
        # One batch for every step is named as the caller named it, not "y[0]".
        return f"{what}[{i}]" if isinstance(given, (list, tuple)) else what

    batches = tuple(
        (
            _tensor(named("x", x, i), xi, dtype, spec.sizes[0]),
            _labels(named("y", y, i), yi, spec.sizes[-1])
            if labels
            else _tensor(named("y", y, i), yi, dtype, spec.sizes[-1], loss=spec.loss),
        )
        for i, (xi, yi) in enumerate(zip(xs, ys, strict=False))
    )
    for i, (xi, yi) in enumerate(batches):
        if xi.shape[0] != yi.shape[0]:
            raise value_error(
                f"a batch needs as many rows in y as in x; batch {i} has x "
                f"{tuple(xi.shape)} and y {tuple(yi.shape)}"
            )
    sizes = [xi.shape[0] for xi, _ in batches]
    if len(set(sizes)) > 1:
        # The bounds and the reference's step are sized for one batch size (a review
        # found the x-and-y message given for batches whose x and y matched).
        raise value_error(
            f"every step's batch must have the same size; the batches have "
            f"{', '.join(map(str, sizes))} rows: drop the last, smaller batch (drop_last=True "
            "in a DataLoader) or compare the steps of one size"
        )
    params = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return spec, Problem(spec=spec, params=params, batches=batches)


def _per_step(name: str, value: Any, steps: int) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != steps:
            raise value_error(
                f"{name} holds {len(value)} batches but steps={steps}; pass one batch "
                "(used for every step) or exactly one per step"
            )
        return list(value)
    return [value] * steps


def _tensor(
    name: str, value: Any, dtype: torch.dtype, width: int, loss: str | None = None
) -> torch.Tensor:
    # np.array copies: a JAX array's NumPy view is read-only, which torch warns about.
    tensor = torch.as_tensor(np.array(to_numpy(value)))
    integer = not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)
    if loss is not None and integer and tensor.ndim == 1:
        # Class labels, while the loss takes targets of the output's shape (found in a
        # user trial: the dtype advice led to a shape error, and neither named the loss).
        raise value_error(
            f"{name} holds integer class labels of shape {tuple(tensor.shape)}, but the loss "
            f"is {loss!r}, which takes targets of shape (batch, {width}); for class labels "
            "pass spec=MLPSpec(..., loss='cross_entropy') (the module cannot tell its loss)"
        )
    if tensor.dtype != dtype:
        short = str(dtype).removeprefix("torch.")
        raise value_error(
            f"{name} is {str(tensor.dtype).removeprefix('torch.')} but the model is {short}; "
            f"convert it first, for example {name.split('[')[0]}.astype(np.{short}) or "
            f"{name.split('[')[0]}.to(torch.{short})"
        )
    if tensor.ndim != 2 or tensor.shape[1] != width:
        # A model of one output beside targets of shape (batch,) (found in a user trial).
        column = f": a column, {name}.reshape(-1, 1)" if tensor.ndim == 1 and width == 1 else ""
        raise value_error(
            f"{name} must have shape (batch, {width}), got {tuple(tensor.shape)}{column}"
        )
    return tensor


def _labels(name: str, value: Any, classes: int) -> torch.Tensor:
    """Integer class labels of shape (batch,), as torch's CrossEntropyLoss takes them."""
    # np.array copies: a JAX array's NumPy view is read-only, which torch warns about.
    tensor = torch.as_tensor(np.array(to_numpy(value)))
    if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.ndim != 1:
        raise value_error(
            f"{name} must hold integer class labels of shape (batch,) for cross_entropy, got "
            f"{str(tensor.dtype).removeprefix('torch.')} of shape {tuple(tensor.shape)}; for "
            "probability targets use MLPSpec(loss='cross_entropy_probs')"
        )
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= classes):
        raise value_error(
            f"{name} holds labels outside [0, {classes}): "
            f"{int(tensor.min())} to {int(tensor.max())}"
        )
    return tensor.to(torch.int64)


def _like(grad: Any, param: Any) -> Any:
    """The gradient as the same kind of array as the parameter, in its dtype and on its
    device, for the update (found in review: float64 gradients of a float32 model made
    the parameters float64 from step 2 on)."""
    if isinstance(param, torch.Tensor):
        if not isinstance(grad, torch.Tensor):
            grad = torch.as_tensor(np.array(to_numpy(grad)))
        return grad.detach().to(param.device, dtype=param.dtype, copy=True)
    return np.array(to_numpy(grad), dtype=param.dtype)
