"""Any torch MLP made of ``nn.Linear`` layers and supported activations, as equiv's MLP.

:func:`mlp_from_module` reads an ``nn.Sequential``, or any module whose ``forward``
calls ``nn.Linear`` layers and activation modules in turn (under any names, in any
registration order, one activation module shared by every layer), and returns the
:class:`~equiv.spec.MLPSpec` and the parameters under equiv's names (``fc1.weight``,
...). From there every converter, the JAX function
(:func:`equiv.jax_mlp.loss_fn`), the hand-derived pass and the harness apply::

    spec, params = mlp_from_module(my_model)
    jax_params = torch_to_jax(params, layout="flax", spec=spec)
    compare_backends(problem=make_problem(spec, params=params, batch_size=32, steps=3))

The order is read from the forward's calls on a probe batch (forward hooks), or,
where the forward cannot be run on one batch, from the registration order. The
reading is checked: the module's own forward pass and the spec's are run on a probe
batch in float64 and must agree, or a ``ValueError`` says so. Anything else inside the module (a
dropout, a norm, a residual connection) is refused with its name.

Example:
  >>> import torch
  >>> from torch import nn
  >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
  >>> spec, params = mlp_from_module(model)
  >>> spec.sizes, spec.activations, sorted(params)
  ((4, 8, 2), ('tanh',), ['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight'])
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from equiv._messages import type_error, value_error
from equiv.convert import _TORCH_NAME, overlapping, refuse_without_values
from equiv.spec import HALF_UNIT_ROUNDOFF, STORAGE_DTYPES, MLPSpec

#: The dtypes a module's Linear layers may hold: :data:`equiv.spec.STORAGE_DTYPES`.
_DTYPES = {getattr(torch, name): name for name in STORAGE_DTYPES}


def _activation(module: nn.Module) -> tuple[str, dict[str, float]] | None:
    """equiv's name and spec fields for a supported activation module, else None."""
    if isinstance(module, nn.ReLU):
        return "relu", {}
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", {"negative_slope": float(module.negative_slope)}
    if isinstance(module, nn.ELU):
        return "elu", {"elu_alpha": float(module.alpha)}
    if isinstance(module, nn.Tanh):
        return "tanh", {}
    if isinstance(module, nn.Sigmoid):
        return "sigmoid", {}
    if isinstance(module, nn.GELU):
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), {}
    if isinstance(module, nn.SiLU):
        return "silu", {}
    return None


SUPPORTED = (
    "nn.Linear, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, and, read "
    "as absent, nn.Identity, nn.Flatten() and dropout in eval mode"
)
#: Modules the converters take after the last Linear layer, besides the activations:
#: they carry no parameters, and a classifier's head often ends with one.
_FINAL = (nn.Softmax, nn.LogSoftmax)

# Parameterless, and the identity in eval mode: read as absent. In training mode they
# drop random units, which equiv's MLP does not (found in a user trial: a model with
# nn.Dropout was refused by the converters, which need only its parameters).
_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _absent(module: nn.Module) -> bool:
    """Whether a parameterless leaf is the identity on a batch of rows, and so read as
    absent: dropout (in eval mode: :func:`_refuse_training_dropout`), ``nn.Identity``
    (a placeholder beside an activation, or after the last layer), and ``nn.Flatten``
    from dim 1 (an MNIST model's first module). Found in a user trial: the converters
    refused all three, though they need only the parameters."""
    if isinstance(module, nn.Flatten):  # from dim 1 or -1 to either: no-op on rows
        return module.start_dim in (1, -1) and module.end_dim in (1, -1)
    return isinstance(module, (nn.Identity, *_DROPOUTS))


def _refuse_training_dropout(name: str, child: nn.Module) -> None:
    if child.training and child.p > 0:
        raise value_error(
            f"submodule {name!r} is {type(child).__name__}(p={child.p}) in training mode: it "
            "zeroes random units, which equiv's MLP does not, so no comparison of its training "
            "could agree. Call model.eval() to compare the model with dropout off (it is the "
            "identity then, and the Linear layers train as without it), or build it with p=0"
        )


def mlp_from_module(
    module: nn.Module, *, check: bool = True
) -> tuple[MLPSpec, dict[str, torch.Tensor]]:
    """The spec and the parameters (copies, equiv's names) of a torch Linear stack.

    Args:
      module: an ``nn.Sequential`` or a module whose leaf submodules are Linear
        layers and supported activations, read in the order its forward calls them.
      check: run the module and the spec on a float64 probe batch and require the
        same output (catches a ``forward`` that calls its layers in another order).

    Raises:
      TypeError: ``module`` is not a ``torch.nn.Module``.
      ValueError: an unsupported submodule (named), two activations in a row, an
        activation after the last layer, mixed dtypes, mixed hyper-parameters of
        one activation kind, or a forward pass that the reading does not reproduce.
        A bias on some layers only is read, as a tuple (``spec.biases``).

    >>> spec, params = mlp_from_module(nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
    ...                                              nn.Linear(8, 2, bias=False)))
    >>> spec.bias, list(params)
    ((True, False), ['fc1.weight', 'fc1.bias', 'fc2.weight'])
    """
    spec, layers, *_ = _read_stack(module, trainable=True)
    params = {name: tensor.clone() for name, tensor in _named(layers, spec).items()}
    if check:
        _check_forward(module, spec, params, layers)
    return spec, params


def _read_stack(
    module: nn.Module, *, trainable: bool, reorder: bool = False
) -> tuple[MLPSpec, list[nn.Linear], bool]:
    """The spec and the Linear layers of a Linear stack, in the order its forward calls
    them, whether that order was read from its calls (else registration order), and, with
    ``reorder`` (the converters), the activation or softmax module its forward calls after
    the last Linear layer (None without one; a comparison's MLP has none), or
    the refusal of what equiv's MLP cannot hold; ``trainable`` also refuses
    frozen parameters (a training check needs them trainable, a copy into them does not).

    The order is read from the forward's calls on a probe batch (:func:`called_leaves`):
    Linear layers and activation modules alike, so one activation module shared by
    every layer (``self.act``) and submodules registered in another order than they are
    called are read as called (found in a user trial: both were refused, where the same
    model calling ``F.gelu`` converted). An activation called as a function leaves no
    call: the spec then has none there (identity), which the converters, needing only
    the parameters, do not read, and :func:`mlp_from_module`'s check refuses. Where the
    forward cannot be run on one batch, registration order stands in, and ``reorder``
    (the converters) refuses a stack that registers no activation."""
    if not isinstance(module, nn.Module):
        raise type_error(f"expected a torch.nn.Module, got {type(module).__name__}")
    _refuse_what_the_mlp_lacks(module, trainable=trainable)
    registered: list[tuple[str, nn.Module]] = []
    kinds: dict[int, str] = {}
    fields: dict[str, float] = {}
    placeholders = False  # an nn.Identity registered says "no activation" as a module
    for name, child in module.named_modules():
        if list(child.children()):
            continue  # containers: their leaves are visited (a bare Linear is one leaf)
        if _absent(child):
            placeholders = placeholders or isinstance(child, nn.Identity)
            if trainable and isinstance(child, _DROPOUTS):  # the converters take any mode
                _refuse_training_dropout(name, child)
            continue
        registered.append((name, child))
        if isinstance(child, nn.Linear):
            continue
        found = _activation(child)
        # Over the outputs of each example only (found in review: dim=0 mixes a batch).
        if found is None and reorder and isinstance(child, _FINAL) and child.dim in (-1, 1):
            kinds[id(child)] = "final"  # after the last Linear only (checked below)
            continue
        if found is None:
            raise value_error(
                f"submodule {name!r} is {type(child).__name__}, which equiv cannot express; "
                f"supported: {SUPPORTED}"
            )
        kinds[id(child)], params = found
        for field, value in params.items():
            if fields.setdefault(field, value) != value:
                raise value_error(
                    f"{field} differs between layers ({fields[field]} and {value} "
                    f"at {name!r}); equiv's MLPSpec holds one value"
                )
    linears = [m for _, m in registered if isinstance(m, nn.Linear)]
    if not linears:
        raise value_error(f"found no nn.Linear in {type(module).__name__}")
    calls = called_leaves(module) if len(registered) > 1 else None
    if calls is not None:
        calls = [(name, m) for name, m in calls if not _absent(m)]
        called = [m for _, m in calls if isinstance(m, nn.Linear)]
        if sorted(map(id, called)) != sorted(map(id, linears)):
            order = ", ".join(n for n, m in calls if isinstance(m, nn.Linear))
            registered_names = ", ".join(n for n, m in registered if isinstance(m, nn.Linear))
            raise value_error(
                f"{type(module).__name__}'s forward calls its Linear layers as "
                f"{order or 'none'}, not each of {registered_names} once: equiv's MLP calls "
                "each layer once, in order"
            )
    elif reorder and not kinds and not placeholders and len(linears) > 1 and _has_forward(module):
        # (An nn.Identity between the layers reads their registration order, as before
        # it was read as absent; found in review.)
        # Activations called as functions and a forward that cannot be run: nothing
        # says the layers' order (found in review: a forward taking more than x, or
        # calling a layer twice, fell back silently to registration order).
        raise value_error(
            f"{type(module).__name__} registers no activation module (activations "
            "called as functions), so equiv reads its layers' order from the calls of "
            "its forward on a probe batch, which cannot be run on one batch x: wrap it "
            "in a module whose forward takes x alone, or write it as an nn.Sequential"
        )
    order = "the order its forward calls them" if calls is not None else "registration order"
    layers: list[nn.Linear] = []
    layer_names: list[str] = []
    activation_names: list[str] = []
    activations: list[str] = []
    pending: str | None = None
    trailing: nn.Module | None = None  # the module after the last Linear, if any
    for name, child in calls if calls is not None else registered:
        if isinstance(child, nn.Linear):
            if pending == "final":
                raise value_error(
                    f"{type(trailing).__name__} {activation_names[-1]!r} comes before Linear "
                    f"{name!r} in {order}; equiv takes it only after the last Linear layer"
                )
            if layers:
                activations.append(pending or "identity")
            layers.append(child)
            layer_names.append(name)
            pending = None
            continue
        act = kinds[id(child)]
        activation_names.append(name)
        trailing = child
        if not layers or pending is not None:
            where = "before the first Linear" if not layers else "right after another activation"
            raise value_error(
                f"activation {name!r} ({act}) comes {where} in {order}; its MLP has "
                "exactly one activation between consecutive Linear layers"
                + (
                    ""
                    if calls is not None
                    else ": register each Linear and its activation in call order, or write "
                    "the model as an nn.Sequential"
                )
            )
        pending = act
    if calls is None and pending is not None and len(set(activation_names)) == 1 < len(layers) - 1:
        raise value_error(
            f"{type(module).__name__} registers one activation module "
            f"({activation_names[0]!r}) for {len(layers)} Linear layers: a forward that "
            "reuses it between every pair is read from its calls on a probe batch, and this "
            "forward cannot be run on one batch x; registration order found the activation "
            f"after {layer_names[-1]!r}, the last Linear. Write the model as an "
            "nn.Sequential with one activation between consecutive Linear layers"
        )
    if pending is None:
        trailing = None
    elif reorder and calls is not None:
        # The converters need only the parameters: a final activation (a classifier's
        # sigmoid or softmax) is left as it is, and the check runs the stack with it
        # (found in a user trial: a binary classifier could not be copied back into its
        # module). A comparison's MLP ends with a Linear layer.
        pass
    else:
        raise value_error(
            f"an activation comes after the last Linear layer in {order}; equiv's MLP "
            "ends with a Linear layer (put a final activation in the loss instead)"
            + (
                ""
                if calls is not None
                else ". If your forward reuses one activation module between layers, or "
                "calls the layers in another order than they are registered, write the model "
                "as an nn.Sequential"
            )
        )
    sizes = [layers[0].in_features]
    for i, layer in enumerate(layers):
        if layer.in_features != sizes[-1]:
            raise value_error(
                f"Linear {layer_names[i]!r} takes {layer.in_features} inputs but "
                f"{layer_names[i - 1]!r}, before it in {order}, gives {sizes[-1]}: equiv's "
                "MLP calls each layer on the output of the one before it"
            )
        sizes.append(layer.out_features)
    # Each layer's own: nn.Linear(..., bias=False) says it has none, so a bias on some
    # layers only is read as such (the spec holds one bool per layer).
    biases = tuple(layer.bias is not None for layer in layers)
    # Biases too: found in a user trial, bfloat16 weights with float32 biases reached
    # the probe forward, and torch's "self and mat2 must have the same dtype".
    dtypes = {p.dtype for layer in layers for p in (layer.weight, layer.bias) if p is not None}
    if len(dtypes) == 1 and next(iter(dtypes)) not in _DTYPES:
        # Found in a user trial: a float8 (then: bfloat16) model was told its biases
        # must agree.
        raise value_error(
            f"the Linear layers are {next(iter(dtypes))}; equiv's MLP is "
            f"{', '.join(_DTYPES.values())}: convert first, model.float() (or a copy "
            f"of it, to keep yours in {str(next(iter(dtypes))).removeprefix('torch.')})"
        )
    if len(dtypes) != 1:
        raise value_error(
            "all Linear layers' weights and biases must share one dtype; got dtypes "
            f"{sorted(map(str, dtypes))}: convert the model first (model.float(), "
            "model.double() or model.bfloat16())"
        )
    spec = MLPSpec(
        tuple(sizes),
        activation=tuple(activations)
        if len(set(activations)) > 1
        else (activations[0] if activations else "relu"),
        bias=biases if len(set(biases)) > 1 else biases[0],
        dtype=_DTYPES[dtypes.pop()],
        **fields,
    )
    return spec, layers, calls is not None, trailing


def _named(layers: list[nn.Linear], spec: MLPSpec) -> dict[str, torch.Tensor]:
    """The layers' own tensors (detached, not copied) under equiv's names."""
    params = {}
    for i, layer in enumerate(layers, start=1):
        params[f"fc{i}.weight"] = layer.weight.detach()
        if spec.biases[i - 1]:
            params[f"fc{i}.bias"] = layer.bias.detach()
    return params


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A Linear stack's own parameter tensors (not copies) under equiv's names, read
    and checked as :func:`mlp_from_module` reads them: what ``jax_to_torch(...,
    out=module)`` copies into when the module's names are its own (an
    ``nn.Sequential``'s ``0.weight``).

    >>> seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> tensors = module_tensors(seq)
    >>> sorted(tensors), tensors["fc2.weight"].data_ptr() == seq[2].weight.data_ptr()
    (['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight'], True)
    """
    spec, layers, called, trailing = _read_stack(module, trainable=False, reorder=True)
    tensors = _named(layers, spec)  # frozen ones too
    if not called or "identity" not in spec.activations:
        _check_call_order(module, spec, tensors, layers if called else None, trailing)
    # else: the layers' order was read off the forward's calls, and a layer pair with no
    # activation module between them may have one called as a function (F.gelu), which
    # the output cannot be reproduced without: the converters need only the parameters
    # (found in a user trial: a forward with one activation module and one F.gelu was
    # refused as "not its Linear layers and activations applied in the order read").
    return tensors


def read_spec(module: nn.Module) -> MLPSpec:
    """A Linear stack's spec as its modules say it, without the check of
    :func:`mlp_from_module`: an activation its forward calls as a function is read as
    the identity (the converters check what the modules say, nothing more).

    >>> read_spec(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).activation
    'tanh'
    """
    return _read_stack(module, trainable=False, reorder=True)[0]


def has_equiv_names(state: dict) -> bool:
    """Whether a module's state_dict names are all equiv's (``fc1.weight``,
    ``fc1.bias``, ... from 1 without a gap), which are then read as they are.

    >>> has_equiv_names({"fc1.weight": 0, "fc2.weight": 0}), has_equiv_names(
    ...     {"fc1.weight": 0, "out.weight": 0})
    (True, False)
    """
    matches = [_TORCH_NAME.fullmatch(name) for name in state]
    if not matches or not all(matches):
        return False
    layers = {int(match[1]) for match in matches}
    return layers == set(range(1, len(layers) + 1))


def own_names(module: nn.Module) -> dict[str, str]:
    """A Linear stack's own state_dict names for its parameters, each mapped to
    equiv's name (``0.weight`` to ``fc1.weight`` in an ``nn.Sequential``): how a
    file of the module's own ``state_dict`` is read into it
    (``load_torch(path, out=module)``). The module defines the mapping, so no name is
    guessed. A module with equiv's names (``fc1.weight``...) needs no mapping: empty.

    >>> names = own_names(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    >>> names["0.weight"], names["2.bias"], len(names)
    ('fc1.weight', 'fc2.bias', 4)
    """
    by_name = module.state_dict(keep_vars=True)
    if has_equiv_names(by_name):  # read as they are (convert._state_dict)
        return {}
    spec, layers, *_ = _read_stack(module, trainable=False, reorder=True)
    by_tensor = {id(tensor): name for name, tensor in by_name.items()}
    names = {}
    for i, layer in enumerate(layers, start=1):
        for kind in ("weight", "bias") if spec.biases[i - 1] else ("weight",):
            own = by_tensor.get(id(getattr(layer, kind)))
            if own is not None:
                names[own] = f"fc{i}.{kind}"
    return names


#: How far a module's output on the probe batch may be from the spec's run on its own
#: tensors, relative: both compute the same products in the module's dtype and may
#: sum them in another order (about c·√k·u ≈ 3e-5 per layer in float32 at k = 4096),
#: while a forward that does more than the stack read (a scale, a skipped or extra
#: activation) changes the output by O(1).
_CALL_ORDER_MATCH = 1e-3


def call_order_match(dtype: str) -> float:
    """How far apart, relative to the output's largest value, two runs of one stack
    computed in ``dtype`` (a name) may be at each call a port makes.

    :data:`_CALL_ORDER_MATCH` in float32 and float64. A half-precision port rounds each
    operation's result to its own unit roundoff ``u`` (2⁻⁸ in bfloat16, 2⁻¹¹ in float16),
    far above that: an activation taken in float32 and rounded, against one taken in
    half, is one rounding (u) apart element by element; 16u (0.0625, 0.0078) holds a
    few such roundings. It bounds single operations (an nnx port's layer inputs against
    an activation of the layer before's outputs), not a whole half-precision forward,
    whose error grows with depth and with cancellation in the output: a torch module's
    forward is checked in float32 instead (:func:`_check_call_order`).

    >>> call_order_match("float32"), call_order_match("bfloat16")
    (0.001, 0.0625)
    """
    return max(_CALL_ORDER_MATCH, 16 * HALF_UNIT_ROUNDOFF.get(dtype, 0.0))


class _Float32(Mapping):
    """Tensors read as float32, each when it is read (one layer's copy at a time)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name].float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


@contextlib.contextmanager
def _linears_in_float32(module: nn.Module) -> Iterator[None]:
    """Every Linear layer of ``module`` computing in float32 on its own values (exact:
    each half-precision value is a float32 one), its weight upcast as it is called."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]

    def in_float32(layer: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            bias = None if layer.bias is None else layer.bias.float()
            return nn.functional.linear(x.float(), layer.weight.float(), bias)

        return forward

    for layer in linears:
        layer.forward = in_float32(layer)  # an instance attribute, over the class's
    try:
        yield
    finally:
        for layer in linears:
            del layer.forward


def _check_call_order(
    module: nn.Module,
    spec: MLPSpec,
    tensors: dict[str, torch.Tensor],
    called: list[nn.Linear] | None = None,
    trailing: nn.Module | None = None,
) -> None:
    """Refuse a module whose forward is not the stack :func:`_read_stack` read (in the
    order of its calls, ``called``, or registration order where they cannot be read), run once on
    a small probe batch in the module's own dtype, without copying its
    parameters (found in review: the float64 check of :func:`mlp_from_module` took 11
    times a 64 MiB model's memory to copy weights into it)."""
    from equiv.manual import forward  # no import cycle at module level

    if not _has_forward(module):
        return  # an nn.ModuleList holds its layers in order and has no forward to check
    weight = tensors["fc1.weight"]
    half = spec.dtype in HALF_UNIT_ROUNDOFF
    # A half-precision stack is run in float32 (found in review: its own rounding, which
    # grows with depth and with cancellation in the output, refused plain deep stacks
    # at a half-precision tolerance, and let a 2% scale pass): float32's match applies.
    dtype = torch.float32 if half else weight.dtype
    probe = _probe_batch(spec)[0].to(dtype=dtype, device=weight.device)
    in_float32 = _linears_in_float32(module) if half else contextlib.nullcontext()
    with torch.no_grad(), _probing(module, weight.device), in_float32:  # dropout off: the
        theirs = _call(module, probe)  # converters take a model in training mode
        ours, _ = forward(
            _Float32(tensors) if half else tensors,
            probe,
            spec.replace(dtype="float32") if half else spec,
        )
        if trailing is not None:  # a classifier's final sigmoid or softmax, its own module
            ours = trailing(ours)
    if not bool(torch.isfinite(ours).all()) and all(
        bool(torch.isfinite(t).all()) for t in tensors.values()
    ):
        # Found in a user trial: a residual whose probe overflowed to inf was accepted,
        # as every comparison with NaN is false; the check would prove nothing. (A model
        # holding inf or NaN itself, a diverged one, converts as it is: found in review.)
        wider = "float64 copy (copy.deepcopy(model).double())"
        raise value_error(
            f"{type(module).__name__}'s Linear layers give inf or NaN on a probe batch (of "
            f"standard normal inputs) in {str(dtype).removeprefix('torch.')}, so equiv cannot "
            "check that its forward is those layers and activations alone: convert a "
            f"{wider} and cast the "
            "result back, or pass the parameters under equiv's names ({'fc1.weight': ..., "
            "'fc1.bias': ..., ...}), which are taken as they are"
        )
    finite = torch.isfinite(ours)
    if theirs.shape == ours.shape and bool((finite == torch.isfinite(theirs)).all()):
        # Non-finite values in the same places (a model holding a NaN): alike there, and
        # the finite ones are compared (none at all: a model of NaNs converts as it is).
        theirs, ours = theirs[finite], ours[finite]
    worst, scale = math.inf, 1.0
    if theirs.shape == ours.shape:
        worst = float((theirs - ours).abs().max()) if ours.numel() else 0.0
        scale = (float(ours.abs().max()) if ours.numel() else 0.0) or 1.0
    if not worst <= _CALL_ORDER_MATCH * scale:  # NaN too
        if called is None:
            raise value_error(
                f"{type(module).__name__}'s forward pass is not its Linear layers and "
                "activations applied in the order read (run on a probe batch, its output "
                "differs), so equiv cannot tell which of its layers is fc1, fc2, ...: write it "
                "as an nn.Sequential, or copy into it with load_state_dict under its own names"
            )
        # Found in a user trial: a residual connection (b(act(a(x)) + x)) was told that
        # equiv cannot tell which layer is fc1, though it had read the order of the calls.
        names = {id(m): n for n, m in module.named_modules()}
        order = ", ".join(repr(names[id(layer)]) for layer in called)
        example = ", ".join(
            f"'fc{i}.weight': model.{names[id(layer)]}.weight"
            for i, layer in enumerate(called[:2], 1)
        )
        raise value_error(
            f"{type(module).__name__}'s forward calls its Linear layers as {order}, but its "
            "output is not theirs with its activation modules between them (run on a probe "
            "batch: a residual connection, a scale or another operation in the forward?): "
            "equiv's MLP is the Linear layers and activations alone. To convert the "
            f"parameters all the same, pass them under equiv's names ({{{example}, ...}})"
        )


def _call(module: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """``module(probe)``, or a ``ValueError`` saying why equiv cannot run it: a
    forward that takes more than the input or returns something other than a tensor
    (found in review: a raw TypeError from deep inside either)."""
    try:
        out = module(probe)
    except TypeError as exc:
        raise value_error(
            f"{type(module).__name__}'s forward cannot be called on one input batch, as "
            f"equiv calls module(x) to check it: {exc}. Wrap it in a module whose forward "
            "takes x alone, or pass check=False to mlp_from_module"
        ) from exc
    if not isinstance(out, torch.Tensor):
        raise value_error(
            f"{type(module).__name__}'s forward returns a {type(out).__name__}, not a "
            "tensor; equiv's MLP returns its output tensor: wrap the module in one whose "
            "forward returns the output alone"
        )
    return out


def _refuse_what_the_mlp_lacks(module: nn.Module, *, trainable: bool = True) -> None:
    """Refuse, by name, what equiv's MLP cannot hold and would silently drop: a layer
    used twice, tied parameters, parameters outside the Linear layers, frozen ones,
    buffers."""
    seen: dict[int, str] = {}
    for name, child in module.named_modules(remove_duplicate=False):
        if isinstance(child, nn.Linear):
            if id(child) in seen:
                raise value_error(
                    f"Linear {name!r} is the same module as {seen[id(child)]!r}; equiv's MLP "
                    "has independent layers: give each its own nn.Linear"
                )
            seen[id(child)] = name
    linear = {id(p) for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    for name, _ in module.named_buffers():
        raise value_error(
            f"buffer {name!r} is state equiv's MLP does not have (Linear layers and "
            "activations keep none); remove it, or check the model without it"
        )
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            other = [
                n for n, _ in child.named_parameters(recurse=False) if n not in ("weight", "bias")
            ]
            if other:
                raise value_error(
                    f"Linear {name!r} holds parameters {', '.join(other)} besides its weight and "
                    "bias: its weight is computed from them (weight_norm?), and equiv's MLP "
                    "would train it as a plain weight. Remove the reparametrization first "
                    "(torch.nn.utils.remove_weight_norm)"
                )
    for name, param in module.named_parameters(remove_duplicate=False):
        refuse_without_values(name, param)
        if id(param) not in linear:
            # Its module named (found in a user trial: a PReLU's and a LayerNorm's weight
            # were "a parameter of no nn.Linear", whatever held them).
            prefix = name.rpartition(".")[0]
            owner = type(module.get_submodule(prefix)).__name__
            raise value_error(
                f"parameter {name!r} belongs to {owner} {prefix or 'the module itself'!r}, "
                "not an nn.Linear; equiv's MLP has only the Linear layers' weights and biases "
                f"(and activations without parameters), so it would be left out. Supported: "
                f"{SUPPORTED}"
            )
        if trainable and not param.requires_grad:
            raise value_error(frozen_message(name))
    # Overlapping memory, a transposed view included (a flat buffer of parameters
    # packed side by side does not overlap and is fine).
    tied = overlapping(dict(module.named_parameters(remove_duplicate=False)))
    if tied:
        raise value_error(
            f"parameters {tied[0]!r} and {tied[1]!r} share memory (tied weights); equiv's MLP "
            "has independent parameters, which train differently from tied ones"
        )


def forward_mismatch(
    module: nn.Module,
    spec: MLPSpec,
    params: dict[str, torch.Tensor],
    names: list[str] | None = None,
) -> str | None:
    """How the module differs from the spec's MLP on a float64 probe batch (its output,
    or the gradients of a random projection of it: a forward that detaches, or scales
    by a constant, matches the output but not the gradients), or None. ``names``: the
    module's parameter names for ``spec.param_names()``, in that order; by default its
    Linear layers' in registration order."""
    from equiv.torch_mlp import torch_mlp_with_params  # no import cycle at module level

    # Found in a user trial: a model in training mode with dropout (a module, or
    # F.dropout(training=self.training)) checked against a right spec was told to fix
    # the spec. Dropout modules are named; a forward that draws is caught by two calls.
    for name, child in module.named_modules():
        if isinstance(child, _DROPOUTS):
            _refuse_training_dropout(name, child)
    probe, projection = _probe_batch(spec)
    theirs = copy.deepcopy(module).to(torch.float64)  # the user's module is left as is
    ours = torch_mlp_with_params(
        spec.replace(dtype="float64"), {k: v.double().cpu() for k, v in params.items()}
    )
    if names is None:
        names = [
            f"{prefix}.{kind}" if prefix else kind
            for prefix, layer in module.named_modules()
            if isinstance(layer, nn.Linear)
            for kind in ("weight", "bias")
            if getattr(layer, kind) is not None
        ]
    cuda = [p.device for p in module.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=cuda):  # a forward that draws leaves ours as it was
        out, grads = _output_and_grads(theirs, probe, projection, names)
        with torch.no_grad():  # the output alone says whether it draws
            again = _call(theirs, probe).cpu()
    if not torch.allclose(out, again, rtol=0, atol=0, equal_nan=True):  # a NaN is no draw
        raise value_error(
            f"{type(module).__name__}'s forward gives another output on the same batch at "
            "each call: it draws random numbers (F.dropout in training mode?), which "
            "equiv's MLP does not. Call model.eval() to compare it without them"
        )
    out_ours, grads_ours = _output_and_grads(ours, probe, projection, spec.param_names())
    if float((out - out_ours).abs().max()) > 1e-10 * (float(out_ours.abs().max()) or 1.0):
        return "its output differs"
    for name, theirs_grad, ours_grad in zip(spec.param_names(), grads, grads_ours, strict=True):
        scale = float(ours_grad.abs().max()) or 1.0
        if float((theirs_grad - ours_grad).abs().max()) > 1e-10 * scale:
            return f"its gradients differ for {name}"
    return None


def _probe_batch(spec: MLPSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 probe batch (8 rows) the reading is checked on, and a random
    projection of the output, the same for every call."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(8, spec.sizes[0], dtype=torch.float64, generator=generator)
    return probe, torch.randn(8, spec.sizes[-1], dtype=torch.float64, generator=generator)


def frozen_message(name: str) -> str:
    """Why a frozen parameter cannot be checked, and what to do (one wording for all)."""
    return (
        f"parameter {name!r} is frozen (requires_grad=False); equiv's MLP trains every "
        "parameter: unfreeze it, or check the trainable part on its own"
    )


def refuse_frozen(module: nn.Module) -> None:
    """A ``ValueError`` naming ``module``'s first frozen parameter, if any (found in
    review: one reached torch's autograd as a raw RuntimeError)."""
    for name, param in module.named_parameters():
        if not param.requires_grad:
            raise value_error(frozen_message(name))


def _has_forward(module: nn.Module) -> bool:
    """Whether ``module`` (a compiled one's original) defines a forward of its own."""
    return type(_runnable(module)).forward is not nn.Module.forward


def _runnable(module: nn.Module) -> nn.Module:
    """The module whose forward runs: a ``torch.compile`` wrapper's original (its class's
    ``forward`` is ``nn.Module``'s in torch 2.13, which hid the calls; found in review)."""
    return getattr(module, "_orig_mod", module)


def called_leaves(module: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The leaf submodules (Linear layers, activations, ...) in the order ``module``'s
    forward calls them, with their names, recorded by forward hooks on a probe batch
    (no gradients, every submodule in eval mode for the call and its mode restored
    after); a module called twice appears twice. None where the module cannot be run on
    one batch of any of its layers' input widths (a forward that takes more than ``x``,
    say): the order is then unknown. Activations called as functions leave no call.

    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.head, self.body, self.act = nn.Linear(8, 2), nn.Linear(4, 8), nn.Tanh()
    ...     def forward(self, x):
    ...         return self.head(self.act(self.body(x)))
    >>> [name for name, _ in called_leaves(Net())]
    ['body', 'act', 'head']
    """
    leaves = [(n, m) for n, m in module.named_modules() if not list(m.children())]
    linears = [m for _, m in leaves if isinstance(m, nn.Linear)]
    if not _has_forward(module) or not linears:
        return None
    runner = _runnable(module)
    names = {id(m): n for n, m in leaves}
    calls: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append(m)) for _, m in leaves]
    weight = linears[0].weight
    generator = torch.Generator().manual_seed(0)
    try:
        with _probing(runner, weight.device):
            for width in dict.fromkeys(m.in_features for m in linears):
                calls.clear()
                probe = torch.randn(2, width, generator=generator, dtype=torch.float64)
                try:
                    with torch.no_grad():
                        runner(probe.to(dtype=weight.dtype, device=weight.device))
                except Exception:  # noqa: BLE001 - another width, or a forward equiv cannot run
                    continue
                return [(names[id(m)], m) for m in calls]
        return None
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def _probing(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Every submodule of ``module`` in eval mode (dropout off) and the caller's random
    stream untouched (a forward may draw: ``F.dropout``), for a probe call; each
    module's mode is set and restored flag by flag, calling no ``train()`` override."""
    modes = {m: m.training for m in module.modules()}
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for m in modes:
                m.training = False
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def called_linears(module: nn.Module) -> list[tuple[str, nn.Linear]] | None:
    """The ``nn.Linear`` submodules in the order ``module``'s forward calls them
    (:func:`called_leaves`), or None where that cannot be read.

    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.head, self.body = nn.Linear(8, 2), nn.Linear(4, 8)
    ...     def forward(self, x):
    ...         return self.head(torch.relu(self.body(x)))
    >>> [name for name, _ in called_linears(Net())]
    ['body', 'head']
    """
    calls = called_leaves(module)
    return None if calls is None else [(n, m) for n, m in calls if isinstance(m, nn.Linear)]


def registers_activations(module: nn.Module) -> bool:
    """Whether ``module`` holds any supported activation as a submodule (``nn.ReLU()``),
    rather than calling activations as functions in its forward (``F.relu``).

    >>> registers_activations(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
    True
    """
    return any(
        _activation(m) is not None
        for m in module.modules()
        if not list(m.children()) and not isinstance(m, nn.Linear)
    )


def check_named_call_order(module: nn.Module) -> None:
    """Refuse a module whose Linear layers are named as equiv names them (``fc1``,
    ``fc2``, ...) but called in another order: equiv's ``fc1`` is the first layer
    called, so its names would pair each tensor with the wrong layer (found in a user
    trial: an ``nn.Sequential`` registering ``fc2`` first converted with the layers
    swapped, silently). A module that cannot be run keeps its names unchecked."""
    called = called_linears(module)
    if called is None:
        return
    order = [name for name, _ in called]
    expected = [f"fc{i}" for i in range(1, len(order) + 1)]
    if order != expected:
        raise value_error(
            f"{type(module).__name__}'s Linear layers are named as equiv names them, but "
            f"its forward calls them in the order {', '.join(order)}: equiv's fc1 is the "
            "first layer called, each called once, so these names would pair its tensors "
            "with the wrong layers. Rename them in call order (fc1 the first called; an "
            "nn.Sequential's own index names are mapped by call order)"
        )


def _check_forward(
    module: nn.Module, spec: MLPSpec, params: dict[str, torch.Tensor], layers: list[nn.Linear]
) -> None:
    """Refuse a module whose forward pass is not the MLP read from its submodules
    (``layers``, in the order read)."""
    if not _has_forward(module):
        raise value_error(
            f"{type(module).__name__} has no forward pass to check (an nn.ModuleList or "
            "nn.ModuleDict only holds layers): wrap them in nn.Sequential(*layers), or pass "
            "check=False to take the layers in registration order"
        )
    where = {id(layer): name for name, layer in module.named_modules()}
    names = [
        f"{where[id(layer)]}.{kind}" if where[id(layer)] else kind
        for layer in layers
        for kind in ("weight", "bias")
        if getattr(layer, kind) is not None
    ]
    mismatch = forward_mismatch(module, spec, params, names=names)
    if mismatch is None:
        return
    functional = ""
    if spec.num_layers > 1 and "identity" in spec.activations:
        functional = (
            " Between some of its layers the forward calls no activation module (one it "
            "registers goes unused there): a function called there (F.relu, torch.tanh) is "
            "not a submodule and cannot be read; use modules (nn.ReLU())."
            if registers_activations(module)
            else " No activation module was found: activations called as functions in "
            "forward (F.relu, torch.tanh) are not submodules and cannot be read; use "
            "modules (nn.ReLU())."
        )
    raise value_error(
        f"the module's forward pass is not its Linear layers and activations applied in "
        f"the order it calls them: run on a float64 probe batch, {mismatch} (a forward "
        f"that detaches, or does more).{functional} Write it as an "
        "nn.Sequential; or, "
        # Activations all functions: the spec says which, under any names (port._as_mlp;
        # found in a user trial: this said the layers had to be named fc1, fc2, ...).
        + ("with Linear layers named fc1, fc2, ..., " if registers_activations(module) else "")
        + "pass spec=equiv.MLPSpec(...) saying its activations to check_jax_port or "
        "check_manual_backward; or, where you are sure, read it with "
        "equiv.mlp_from_module(module, check=False)"
    )


def _output_and_grads(
    model: nn.Module, probe: torch.Tensor, projection: torch.Tensor, names: list[str]
):
    """``model(probe)`` and the gradients of ``<output, projection>`` with respect to
    its parameters ``names``, in that order (zero where none reaches them)."""
    device = next(model.parameters()).device
    named = dict(model.named_parameters())
    tensors = [named[name] for name in names]
    with torch.enable_grad():
        out = _call(model, probe.to(device))
        grads = torch.autograd.grad((out * projection.to(device)).sum(), tensors, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads, strict=True)]
    return out.detach().cpu(), [g.cpu() for g in grads]
