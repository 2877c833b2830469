r"""The hand-derived forward and backward pass: the chain rule written out, no autodiff.

Written once against the array API (through ``array_api_compat``), the same code
runs on NumPy arrays (the float64 reference) and on torch tensors (the notebook's
check against autograd). Parameters use torch's layout and names.

For layers :math:`i = 1..L` with weight :math:`W_i` of shape (out, in) and bias
:math:`b_i` of shape (out,), a batch ``x`` of shape (B, in) and targets ``y``:

Forward::

    h_0 = x                                   (B, n_0)
    z_i = h_{i-1} W_iᵀ + b_i                  (B, n_i)
    h_i = act_i(z_i)  for i < L,  h_L = z_L   (the output, no activation)
    loss = ℓ(h_L, y)                          (MSELoss: mean((h_L - y)²) over B·n_L)

Backward, with ``dz_i = ∂loss/∂z_i``::

    dz_L = ∂ℓ/∂h_L                            (MSE: (h_L - y) · 2 / (B·n_L))
    dW_i = dz_iᵀ h_{i-1}                      (n_i, n_{i-1})
    db_i = Σ_batch dz_i                       (n_i,)
    dh_{i-1} = dz_i W_i                       (B, n_{i-1})
    dz_{i-1} = dh_{i-1} · act'(z_{i-1})       relu'(0) = 0, as torch defines it

Each activation's value and derivative are in :mod:`equiv.activations`, each loss's
value and ``∂ℓ/∂h_L`` in :mod:`equiv.losses`, all written out by hand.

Mask override (``masks=``): a backend whose rounded ``z_i`` lands on the other
side of 0 than the exact one takes the other branch of a kinked activation (relu,
leaky_relu, elu). Passing a boolean mask ``m_i`` (shape (B, n_i)) for hidden layer
``i`` replaces ``[z_i > 0]`` by ``m_i`` in both passes: the ``z > 0`` branch where
``m_i`` is True, the other where it is False. This is how :mod:`equiv.kinks`
computes the gradients on the other side of a kink.

SGD: ``p ← p - lr · dp``, rounded once on torch tensors as ``torch.optim.SGD``
rounds it (``p.add(dp, alpha=-lr)``), so the hand-written step equals torch's
bit for bit where the gradients do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from array_api_compat import array_namespace, is_torch_array

from equiv._messages import value_error
from equiv.activations import ACTIVATIONS
from equiv.losses import LOSSES
from equiv.spec import MLPSpec
from equiv.tolerance import SAFETY

Array = Any
Masks = Sequence[Any] | None


def forward(
    params: Mapping[str, Array], x: Array, spec: MLPSpec, masks: Masks = None
) -> tuple[Array, list[Array]]:
    """Return the output ``h_L`` and the pre-activations ``[z_1, ..., z_L]``.

    The inputs of each layer are ``x`` and ``act(z_i)``; the backward pass
    recomputes them from ``zs`` instead of storing both. ``masks`` overrides the
    branch of kinked activations (see the module docstring).
    """
    out, zs, _ = _forward(params, x, spec, _check_masks(masks, spec))
    return out, zs


def loss_and_grads(
    params: Mapping[str, Array], x: Array, y: Array, spec: MLPSpec, masks: Masks = None
) -> tuple[Array, dict[str, Array]]:
    """The spec's loss and every gradient, under torch's parameter names.

    ``masks``: optional per-hidden-layer boolean arrays forcing the branch of a kinked
    activation (``True``: the ``z > 0`` side); a list of ``num_layers - 1`` entries,
    each an array or None.

    Example:
      >>> import numpy as np
      >>> spec = MLPSpec((2, 1), dtype="float64")
      >>> params = {"fc1.weight": np.array([[1.0, 2.0]]), "fc1.bias": np.array([0.5])}
      >>> loss, grads = loss_and_grads(params, np.array([[1.0, 1.0]]), np.array([[3.0]]), spec)
      >>> float(loss), grads["fc1.weight"].tolist(), grads["fc1.bias"].tolist()
      (0.25, [[1.0, 1.0]], [1.0])
    """
    xp = array_namespace(x)
    out, zs, acts = _forward(params, x, spec, _check_masks(masks, spec))
    loss, dz = LOSSES[spec.loss].value_and_grad(out, y, spec)
    grads = _backward(xp, params, x, dz, acts, spec)
    return loss, grads


def magnitudes(
    params: Mapping[str, Array],
    x: Array,
    y: Array,
    spec: MLPSpec,
    unit_roundoff: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    r"""What the rounding error of the loss and of each gradient scales with.

    Each quantity ``q`` the passes compute gets a size ``|q|⁺ ≥ |q|`` such that its
    float error is at most about ``u·√k·|q|⁺`` (:mod:`equiv.tolerance` adds the
    constant). A sum that cancels is small while its error is not, and an error made
    early is carried on: ``|q|⁺`` is the first-order error propagation of the passes
    above. Forward, a pre-activation's size is the root sum of squares of the terms
    it sums, each at its input's size (the error of a sum grows like √k times that,
    and the bound carries the √k; :func:`equiv.kinks.preactivation_bounds` sizes
    them the same way)::

        |h_0|⁺ = |x|,   |z_i|⁺ = max(|z_i|, √(|h_{i-1}|⁺²·W_i²ᵀ + b_i²))
        |h_i|⁺ = max(|h_i|ₑ, (|h'(z_i)| + ½|h''(z_i)|·u·|z_i|⁺)·|z_i|⁺, max_I|h'|·|z_i|⁺)

    where ``|h|ₑ ≥ |h|`` and ``|h'|ₑ ≥ |h'|`` are what evaluating the activation and
    its slope costs in the backends' dtype, of unit roundoff ``unit_roundoff`` (default
    the spec's; :meth:`equiv.activations.Activation.evaluation_sizes`: torch and JAX
    compute tanh's slope as ``1 - tanh²z``, whose float32 error is ``u`` until
    ``tanh z`` rounds to 1). Backward, sums of absolute values, starting from ``|dz_L|⁺``,
    the loss's gradient size at ``|h_L|⁺`` (:attr:`equiv.losses.Loss.magnitude`; for
    MSE ``2·(|h_L|⁺ + |y|)/n`` where ``h_L - y`` cancels)::

        |dW_i|⁺ = |dz_i|⁺ᵀ·r_{i-1} + |dz_i|ᵀ(|h_{i-1}|⁺ - |h_{i-1}|),   |db_i|⁺ = Σ_batch |dz_i|⁺
        |dh|⁺ = |dz_i|⁺·|W_i|
        |dz_{i-1}|⁺ = |dh|⁺·max_I|h'| + |dh|·(|h'(z)|ₑ - |h'(z)| + max_I|h''|·|z_{i-1}|⁺)

    The second terms carry an error made upstream through a product, ``δ(a·b) =
    δa·(b + δb) + a·δb``, with the *values* ``|dz|``, ``|dh|`` as the other factor: a
    product of two sizes would count the error twice over. The slope is off by its own
    evaluation and by ``|h''|`` (:meth:`equiv.activations.Activation.curvature`) times
    the error of ``z``. ``max_I`` is the greatest over the interval ``I = z ± ε`` a
    backend's ``z`` may lie in, ``ε = SAFETY·u·√n·(|z|⁺ + |z|)`` as in
    :mod:`equiv.kinks` (:meth:`equiv.activations.Activation.envelope`), and ``r = |h| +
    max_I|h'|·ε`` the greatest ``|h|`` there: a unit saturated at the reference's ``z``
    may sit on the steep middle in a backend's, where its slope is not 0 and its value
    far off. Where ``ε`` is small these are ``|h'(z)|``, ``|h''(z)|`` and ``|h|`` to
    first order. Where nothing cancels every ``|q|⁺`` is the sum of absolute values of
    what ``q`` sums, but for the slope's error.

    >>> import numpy as np
    >>> spec = MLPSpec((1, 1), dtype="float64")
    >>> params = {"fc1.weight": np.array([[1.0]]), "fc1.bias": np.array([0.0])}
    >>> x, y = np.array([[1.0], [-1.0]]), np.array([[2.0], [-2.0]])
    >>> loss_and_grads(params, x, y, spec)[1]["fc1.bias"].tolist()  # cancels
    [0.0]
    >>> magnitudes(params, x, y, spec)[1]["fc1.bias"].tolist()  # (3 + 3) · 2 / 2
    [6.0]

    A hidden unit that cancels (``z = 2 - 2``, so ``h = tanh(z) = 0``) carries the
    size of its terms, ``|h|⁺ = √(2² + 2²)``, into the next layer's weight gradient,
    ``dW_2 = dz_2·h`` (``dz_2 = 2·(0 - 1) = -2``):

    >>> spec = MLPSpec((2, 1, 1), dtype="float64", bias=False, activation="tanh")
    >>> params = {"fc1.weight": np.array([[1.0, -1.0]]), "fc2.weight": np.array([[1.0]])}
    >>> x, y = np.array([[2.0, 2.0]]), np.array([[1.0]])
    >>> loss_and_grads(params, x, y, spec)[1]["fc2.weight"].tolist()
    [[0.0]]
    >>> magnitudes(params, x, y, spec)[1]["fc2.weight"].round(4).tolist()  # |dz_2|·|h|⁺ = 2·√8
    [[5.6569]]
    """
    xp = array_namespace(x)
    u = spec.unit_roundoff if unit_roundoff is None else unit_roundoff
    last = spec.num_layers
    out, zs, acts = _forward(params, x, spec, [None] * (last - 1))
    h_sizes, z_sizes, slope_errors, steepest_slopes = [xp.abs(x)], [], [], []
    reaches = [xp.abs(x)]  # the greatest |h| a backend may hold (MVT over z's interval)
    for i, z in enumerate(zs, start=1):
        z_sizes.append(
            xp.maximum(xp.abs(z), _root_sum_of_squares(xp, h_sizes[-1], params, i, spec))
        )
        if i < last:
            act, slope = ACTIVATIONS[spec.activations[i - 1]], acts[i - 1][1]
            value_size, slope_size = act.evaluation_sizes(xp, z, act.param(spec), u)
            # z's error moves h by h'·δz + ½h''·δz², δz ~ u·|z|⁺: the second term is what
            # is left where the slope is 0 (gelu at z = -0.75) and |z|⁺ >> |z|.
            curvature = act.curvature(xp, z, act.param(spec))
            moved = (xp.abs(slope) + 0.5 * curvature * u * z_sizes[-1]) * z_sizes[-1]
            # Where a backend's z may be far off (the radius of equiv.kinks), h' and h''
            # are taken at their greatest over that interval: a unit saturated at the
            # reference's z may sit on the steep middle in a backend's.
            radius = SAFETY * u * math.sqrt(spec.sizes[i - 1]) * (z_sizes[-1] + xp.abs(z))
            steepest, most_curved = act.envelope(xp, z, radius, act.param(spec))
            moved = xp.maximum(moved, steepest * z_sizes[-1])
            h_sizes.append(xp.maximum(value_size, moved))
            # How far the slope may be off: its own evaluation, and z's error through h''.
            slope_errors.append(slope_size - xp.abs(slope) + most_curved * z_sizes[-1])
            steepest_slopes.append(steepest)
            reaches.append(xp.abs(acts[i - 1][0]) + steepest * radius)
    loss, dz_size = LOSSES[spec.loss].magnitude(out, y, spec, z_sizes[-1])
    _, dz = LOSSES[spec.loss].value_and_grad(out, y, spec)
    grads: dict[str, Array] = {}
    for i in range(last, 0, -1):
        h = xp.abs(x) if i == 1 else xp.abs(acts[i - 2][0])
        carried = xp.matmul(xp.matrix_transpose(xp.abs(dz)), h_sizes[i - 1] - h)
        # δ(dz·h) ≤ δdz·(|h| + δh) + |dz|·δh: dz's error meets the backend's h, which
        # may be far from the reference's 0 (a diverging run, found by a random sweep).
        grads[f"fc{i}.weight"] = xp.matmul(xp.matrix_transpose(dz_size), reaches[i - 1]) + carried
        if spec.biases[i - 1]:
            grads[f"fc{i}.bias"] = xp.sum(dz_size, axis=0)
        if i > 1:
            weight = params[f"fc{i}.weight"]
            dh, dh_size = xp.matmul(dz, weight), xp.matmul(dz_size, xp.abs(weight))
            act, slope = ACTIVATIONS[spec.activations[i - 2]], acts[i - 2][1]
            # δ(dh·h') ≤ δdh·max|h'| + |dh|·δh', max over z's interval: exact, no product
            # of two errors dropped (a unit saturated at the reference's z but not at a
            # backend's multiplies a far-off upstream gradient by a slope that is not 0).
            # A selecting backward (relu) is exact where its slope is 0: no error there.
            dz_size = act.chain(xp, dh_size, steepest_slopes[i - 2], where=slope) + act.chain(
                xp, xp.abs(dh), slope_errors[i - 2], where=slope
            )
            dz = act.chain(xp, dh, slope)
    return loss, {name: grads[name] for name in spec.param_names()}


def _root_sum_of_squares(xp, h_size, params, i: int, spec: MLPSpec):
    """``√(|h|⁺²·W_i²ᵀ + b_i²)``, each term divided before squaring by the largest it
    can be for that example and unit (``max|h|·max|W_j|`` or ``|b_j|``), so that it
    overflows only where the result does: squares of 1e160 would, and a run whose
    every size is finite would look beyond analysis. (Scaling by ``max|h|·max|W_j|``
    alone overflowed a bias over a dead unit's 1e-300, found by the false-alarm sweep.)

    >>> import numpy as np
    >>> params = {"fc1.weight": np.array([[1e200, 1e200]]), "fc1.bias": np.array([0.0])}
    >>> _root_sum_of_squares(np, np.array([[1.0, 1.0]]), params, 1, MLPSpec((2, 1)))
    array([[1.41421356e+200]])
    >>> params = {"fc1.weight": np.array([[1.0, 1.0]]), "fc1.bias": np.array([3.0])}
    >>> _root_sum_of_squares(np, np.array([[1e-300, 0.0]]), params, 1, MLPSpec((2, 1)))
    array([[3.]])
    """
    one = xp.ones_like
    weight = params[f"fc{i}.weight"]
    unit = xp.max(xp.abs(weight), axis=1)
    unit = xp.where(unit > 0, unit, one(unit))
    example = xp.max(h_size, axis=1, keepdims=True)
    example = xp.where(example > 0, example, one(example))
    reach = example * unit  # (batch, out): the largest a product term can be
    bias = params[f"fc{i}.bias"] if spec.biases[i - 1] else None
    scale = reach if bias is None else xp.maximum(reach, xp.abs(bias))
    scale = xp.where(scale > 0, scale, one(scale))
    scaled = (weight / unit[:, None]) ** 2
    squares = xp.matmul((h_size / example) ** 2, xp.matrix_transpose(scaled)) * (reach / scale) ** 2
    if bias is not None:
        squares = squares + (bias / scale) ** 2
    return xp.sqrt(squares) * scale


def _forward(params, x, spec, masks):
    """Output, pre-activations and per hidden layer ``(h_i, h'(z_i))``."""
    xp = array_namespace(x)
    h, zs, acts = x, [], []
    for i in range(1, spec.num_layers + 1):
        z = xp.matmul(h, xp.matrix_transpose(params[f"fc{i}.weight"]))
        if spec.biases[i - 1]:
            z = z + params[f"fc{i}.bias"]
        zs.append(z)
        if i < spec.num_layers:
            act = ACTIVATIONS[spec.activations[i - 1]]
            h, slope = act.value_and_derivative(xp, z, act.param(spec), masks[i - 1])
            acts.append((h, slope))
        else:
            h = z
    return h, zs, acts


def _backward(xp, params, x, dz, acts, spec, slope_of=None, weight_input=None, bias_grad=None):
    grads: dict[str, Array] = {}
    for i in range(spec.num_layers, 0, -1):
        h_prev = x if i == 1 else acts[i - 2][0]
        h_prev = h_prev if weight_input is None else weight_input(i, h_prev)
        grads[f"fc{i}.weight"] = xp.matmul(xp.matrix_transpose(dz), h_prev)
        if spec.biases[i - 1]:
            grads[f"fc{i}.bias"] = xp.sum(dz, axis=0) if bias_grad is None else bias_grad(i, dz)
        if i > 1:
            act = ACTIVATIONS[spec.activations[i - 2]]
            dh = xp.matmul(dz, params[f"fc{i}.weight"])
            slope = acts[i - 2][1] if slope_of is None else slope_of(i - 1, dh)
            dz = act.chain(xp, dh, slope)
    return {name: grads[name] for name in spec.param_names()}


def miswritten_loss_and_grads(
    params: Mapping[str, Array],
    x: Array,
    y: Array,
    spec: MLPSpec,
    *,
    slope_of: Callable[[int, Array, list[Array], list[tuple[Array, Array]]], Array] | None = None,
    backward_params: Mapping[str, Array] | None = None,
    output_grad: Callable[[Array, Array, Array], Array] | None = None,
    weight_input: Callable[[int, Array, Array, list[Array], list[tuple[Array, Array]]], Array]
    | None = None,
    loss_of: Callable[[Array, Array], tuple[Array, Array]] | None = None,
    bias_grad: Callable[[int, Array], Array] | None = None,
    masks: Masks = None,
) -> tuple[Array, dict[str, Array]]:
    """:func:`loss_and_grads` with its backward pass written wrong on purpose, the
    forward pass and the loss untouched: how :mod:`equiv.variants` computes the
    mistakes a hand-written backward makes.

    ``slope_of(k, dh, zs, acts)`` replaces hidden layer ``k``'s slope ``h'(z_k)``
    (1-based; ``dh`` the upstream gradient ``∂loss/∂h_k``, ``zs`` and ``acts`` as
    :func:`forward` computes them: ``acts[k - 1] = (h_k, h'(z_k))``);
    ``backward_params`` replaces weights in the chain ``dh_{i-1} = dz_i W_i`` only;
    ``output_grad(out, y, dz_L)`` replaces the loss's gradient ``dz_L``;
    ``weight_input(i, h, x, zs, acts)`` replaces ``h``, layer ``i``'s input, in its
    weight gradient ``dz_iᵀ h`` only; ``loss_of(out, y) -> (loss, dz_L)`` replaces the
    spec's loss and its gradient (a loss computed wrong: the backward from ``dz_L`` on
    is the model's); ``bias_grad(i, dz)`` replaces layer ``i``'s bias gradient
    ``dz_i`` summed over the batch; ``masks`` as in :func:`loss_and_grads`.

    >>> import numpy as np
    >>> spec = MLPSpec((1, 1, 1), dtype="float64")
    >>> params = {"fc1.weight": np.array([[-1.0]]), "fc1.bias": np.array([0.0]),
    ...           "fc2.weight": np.array([[2.0]]), "fc2.bias": np.array([0.0])}
    >>> x, y = np.array([[1.0]]), np.array([[1.0]])
    >>> loss_and_grads(params, x, y, spec)[1]["fc1.weight"].tolist()  # ReLU closed: 0
    [[0.0]]
    >>> no_mask = lambda k, dh, zs, acts: np.ones_like(dh)
    >>> miswritten_loss_and_grads(params, x, y, spec, slope_of=no_mask)[1]["fc1.weight"].tolist()
    [[-4.0]]
    """
    xp = array_namespace(x)
    out, zs, acts = _forward(params, x, spec, _check_masks(masks, spec))
    if loss_of is None:
        loss, dz = LOSSES[spec.loss].value_and_grad(out, y, spec)
    else:
        loss, dz = loss_of(out, y)
    dz = dz if output_grad is None else output_grad(out, y, dz)
    chained = {**params, **(backward_params or {})}
    slopes = None if slope_of is None else (lambda k, dh: slope_of(k, dh, zs, acts))
    inputs = None if weight_input is None else (lambda i, h: weight_input(i, h, x, zs, acts))
    return loss, _backward(xp, chained, x, dz, acts, spec, slopes, inputs, bias_grad)


def sgd_update(
    params: Mapping[str, Array], grads: Mapping[str, Array], learning_rate: float
) -> dict[str, Array]:
    """``p - learning_rate · g`` for every parameter, rounded as torch.optim.SGD rounds.

    >>> import numpy as np
    >>> sgd_update({"w": np.array([1.0])}, {"w": np.array([2.0])}, 0.25)["w"].tolist()
    [0.5]
    """
    return {name: _scaled_add(p, grads[name], -learning_rate) for name, p in params.items()}


def _check_masks(masks: Masks, spec: MLPSpec) -> list:
    hidden = spec.num_layers - 1
    if masks is None:
        return [None] * hidden
    masks = list(masks)
    if len(masks) != hidden:
        raise value_error(
            f"masks needs one entry (an array or None) per hidden layer: {hidden} for "
            f"sizes {spec.sizes}, got {len(masks)}"
        )
    return masks


def _scaled_add(p: Array, g: Array, alpha: float) -> Array:
    # torch.optim.SGD calls p.add_(g, alpha=-lr): one fused rounding. Spelling it
    # p - lr * g rounds twice and is one ulp off on some entries, so torch tensors
    # take torch's own add; other array libraries have no alpha and round twice.
    # float(): a NumPy float64 scalar would promote a float32 array (NumPy 2).
    if is_torch_array(p):
        return p.add(g, alpha=float(alpha))
    return p + float(alpha) * g
